"""Lexical scoring: a tokenizer for code-ish text and Okapi BM25 over an inverted index.

Embeddings miss exact identifiers (UUIDs, order numbers, tool names like
`get_weather`); BM25 catches them. The tokenizer splits camelCase, snake_case
and punctuation, lowercases, drops stopwords and strips common suffixes so
"flights"/"flight" and "booking"/"book" meet. Scoring touches only the
postings of the query's terms, so it stays fast at 10,000+ documents.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

__all__ = ["BM25", "tokenize"]

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_WORD = re.compile(r"[A-Za-z0-9]+")
STOPWORDS = frozenset(
    """a an and are as at be but by can could do does for from has have how i if in into is it
    its me my of on or our please should so than that the their them then there these this to
    us was we what when where which who why will with would
    you your""".split()  # noqa: SIM905  (a word list, read as text)
)
_SUFFIXES = ("ations", "ation", "ings", "ing", "ies", "es", "ed", "ly", "s")


@lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            stem = word[: -len(suffix)]
            return stem + "y" if suffix == "ies" else stem
    return word


def tokenize(text: str) -> list[str]:
    """Lowercased, stemmed word tokens without stopwords; camelCase and snake_case split."""
    out: list[str] = []
    for raw in _WORD.findall(text):
        for part in _CAMEL.split(raw):
            word = part.lower()
            if word and word not in STOPWORDS:
                out.append(_stem(word))
    return out


class BM25:
    """Okapi BM25 over a fixed list of documents: `scores(query) -> (n_docs,)`."""

    def __init__(self, docs: Sequence[str], *, k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.n = len(docs)
        lengths = np.zeros(self.n, dtype=np.float32)
        postings: dict[str, list[tuple[int, int]]] = {}
        for i, doc in enumerate(docs):
            counts = Counter(tokenize(doc))
            lengths[i] = sum(counts.values())
            for term, tf in counts.items():
                postings.setdefault(term, []).append((i, tf))
        avg = float(lengths.mean()) if self.n else 1.0
        self._norm = k1 * (1 - b + b * lengths / max(avg, 1e-9))
        self._postings: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        for term, items in postings.items():
            ids = np.fromiter((i for i, _ in items), dtype=np.int64, count=len(items))
            tfs = np.fromiter((tf for _, tf in items), dtype=np.float32, count=len(items))
            df = len(items)
            idf = math.log(1 + (self.n - df + 0.5) / (df + 0.5))
            self._postings[term] = (ids, tfs, idf)

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float32)
        for term in set(tokenize(query)):
            hit = self._postings.get(term)
            if hit is None:
                continue
            ids, tfs, idf = hit
            out[ids] += idf * tfs * (self.k1 + 1) / (tfs + self._norm[ids])
        return out

    def __len__(self) -> int:
        return self.n
