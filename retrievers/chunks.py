"""Query-aware cutting of long texts: split into chunks, rank them, keep the best.

A tool result of 75 JSON records or a 4,000-token log rarely matters in full:
the question usually needs a few records or lines. This module splits a text
along its own structure (JSON records, paragraphs, lines, sentences), scores
each chunk against the query and keeps the best ones within a token budget,
in their original order, with a short marker saying what was cut.

Scoring is hybrid: BM25 (exact words, `retrievers.lexical`) plus the cosine of
sentence embeddings (paraphrases). Embeddings miss exact identifiers (a UUID,
an order number, an error code), and BM25 only weighs them by rarity, so a
chunk that contains an identifier the query names gets a large bonus on top:
a needle the user asked for by id is never ranked below a loosely related
paragraph.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeAlias

import numpy as np
from contextwise.retrievers.embedder import Embedder, get_embedder
from contextwise.retrievers.lexical import BM25

from contextwise.tokens import count_text

__all__ = [
    "DEFAULT_TARGET_TOKENS",
    "ID_WEIGHT",
    "LEXICAL_WEIGHT",
    "MAX_QUERY_IDS",
    "Chunk",
    "Document",
    "identifiers",
    "rank_chunks",
    "select_chunks",
    "split_chunks",
]

DEFAULT_TARGET_TOKENS = 64  # a chunk is about this many cl100k tokens (JSON records may be bigger)
LEXICAL_WEIGHT = 0.5  # BM25 share of the base score; the rest is embedding cosine
ID_WEIGHT = 2.0  # bonus per query identifier a chunk contains: beats any base score (<= 1)
MAX_QUERY_IDS = 32  # a query that is itself a pasted document: its first identifiers only
GAP = "[...]"  # between two kept text chunks that were not adjacent

EmbedderLike: TypeAlias = Embedder | Callable[[], Embedder] | None

# --------------------------------------------------------------------------- identifiers

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# A run of word characters joined by - _ . / : # (ends on a letter or digit).
_TOKEN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_\-./:#]*[A-Za-z0-9])?")


def identifiers(text: str) -> list[str]:
    """Exact identifiers in `text`: UUIDs, emails, numbers (2+ digits) and codes
    (tokens holding a digit like `ORD-1234`, `v2.3`, `2024-05-01`, or an underscore
    like `user_id`). Lowercased, deduplicated, in order of appearance."""
    found: list[str] = []
    for rx in (_UUID, _EMAIL):
        found.extend(m.group(0) for m in rx.finditer(text))
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        digits = sum(c.isdigit() for c in tok)
        if (digits and len(tok) >= 2) or ("_" in tok and len(tok) >= 3):
            found.append(tok)
    seen: dict[str, None] = {}
    for tok in found:
        seen.setdefault(tok.lower(), None)
    return list(seen)


def _id_pattern(ident: str) -> re.Pattern[str]:
    # Whole-token match: "12" must not hit "2012".
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(ident) + r"(?![A-Za-z0-9])", re.IGNORECASE)


# --------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class Chunk:
    """One piece of a document. `text` is what is scored; `path` locates a JSON
    record; `start`/`end` are the character span of a text chunk; `lines` is how
    many non-empty lines it holds (for the omission marker)."""

    index: int
    text: str
    tokens: int
    kind: str  # "record", "paragraph", "line", "sentence" or "words"
    path: tuple[Any, ...] = ()
    start: int = 0
    end: int = 0
    lines: int = 1


class Document:
    """A text split into chunks, able to render any subset of them.

    JSON objects and arrays split into records (one key-value pair or one element
    each, descending into a record that alone is far over the target); anything
    else into paragraphs, then lines, sentences and word windows, with small
    neighbours merged up to the target size.
    """

    def __init__(self, text: str, target_tokens: int = DEFAULT_TARGET_TOKENS):
        if target_tokens < 1:
            raise ValueError(f"target_tokens must be >= 1, got {target_tokens}")
        self.text = text
        self.target_tokens = target_tokens
        self.json: Any = _parse_json(text)
        chunks = _json_chunks(self.json, target_tokens) if self.json is not None else None
        # A record that cannot be split further (a long string) and is far over the
        # target would be all-or-nothing: cut such JSON as plain text instead.
        if chunks is None or len(chunks) < 2 or max(c.tokens for c in chunks) > 4 * target_tokens:
            self.json = None
            chunks = _text_chunks(text, target_tokens)
        self.chunks: list[Chunk] = chunks
        if self.json is not None:
            self.unit = "records"
        elif any(c.kind == "line" for c in chunks) and not any(
            c.kind in ("sentence", "words") for c in chunks
        ):
            self.unit = "lines"  # whole lines only (logs, CSV): count lines, not chunks
        else:
            self.unit = "chunks"

    def __len__(self) -> int:
        return len(self.chunks)

    def _count(self, c: Chunk) -> int:
        return c.lines if self.unit == "lines" else 1

    def marker(self, keep: Iterable[int]) -> str:
        kept = set(keep)
        total = sum(self._count(c) for c in self.chunks)
        omitted = sum(self._count(c) for c in self.chunks if c.index not in kept)
        return f"[... {omitted} of {total} {self.unit} omitted ...]" if omitted else ""

    def render(self, keep: Iterable[int]) -> str:
        """The text with only the chunks in `keep`, in original order, plus the marker."""
        kept = sorted(set(keep))
        body = self._render_json(kept) if self.json is not None else self._render_text(kept)
        marker = self.marker(kept)
        return f"{body}\n{marker}" if body and marker else body or marker

    def _render_text(self, kept: list[int]) -> str:
        parts: list[str] = []
        prev: Chunk | None = None
        for i in kept:
            c = self.chunks[i]
            if prev is None:
                parts.append(self.text[c.start : c.end])
            elif c.index == prev.index + 1:
                parts.append(self.text[prev.end : c.end])  # keeps the separator in between
            else:
                parts.append(f"\n{GAP}\n" + self.text[c.start : c.end])
            prev = c
        return "".join(parts).strip()

    def _render_json(self, kept: list[int]) -> str:
        if not kept:
            return ""
        paths = {self.chunks[i].path for i in kept}
        prefixes = {p[:n] for p in paths for n in range(1, len(p) + 1)}
        value = self.json
        # Top-level items one per line (as the record-per-line formats do), nested compact.
        if isinstance(value, dict):
            items = [
                f"{_dumps(k)}: {_dumps(_filter(v, (k,), paths, prefixes))}"
                for k, v in value.items()
                if (k,) in prefixes
            ]
            return "{" + ",\n ".join(items) + "}"
        items = [
            _dumps(_filter(v, (i,), paths, prefixes))
            for i, v in enumerate(value)
            if (i,) in prefixes
        ]
        return "[" + ",\n ".join(items) + "]"


def split_chunks(text: str, target_tokens: int = DEFAULT_TARGET_TOKENS) -> list[Chunk]:
    """The chunks of `text` (see `Document`)."""
    return Document(text, target_tokens).chunks


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _parse_json(text: str) -> Any:
    s = text.strip()
    if not s or s[0] not in "[{":
        return None
    try:
        value = json.loads(s)
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


def _filter(value: Any, path: tuple[Any, ...], paths: set[tuple[Any, ...]],
            prefixes: set[tuple[Any, ...]]) -> Any:
    """`value` with only the kept records below `path` (a kept path keeps all of it)."""
    if path in paths:
        return value
    if isinstance(value, dict):
        return {k: _filter(v, (*path, k), paths, prefixes)
                for k, v in value.items() if (*path, k) in prefixes}
    if isinstance(value, list):
        return [_filter(v, (*path, i), paths, prefixes)
                for i, v in enumerate(value) if (*path, i) in prefixes]
    return value


def _children(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, list):
        return list(enumerate(value))
    return []


def _json_chunks(value: Any, target: int) -> list[Chunk] | None:
    """One chunk per key-value pair / element; a container far over the target
    (and with 2+ children) is split into its own records instead."""
    out: list[Chunk] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        for key, child in _children(node):
            text = f"{_dumps(key)}: {_dumps(child)}" if isinstance(node, dict) else _dumps(child)
            tokens = count_text(text)
            if tokens > 2 * target and len(_children(child)) >= 2:
                walk(child, (*path, key))
            else:
                out.append(Chunk(len(out), text, tokens, "record", path=(*path, key)))

    walk(value, ())
    return out


_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def _spans(text: str, start: int, end: int, rx: re.Pattern[str]) -> list[tuple[int, int]]:
    """Non-blank spans of text[start:end] between the separators `rx` matches."""
    out, pos = [], start
    for m in rx.finditer(text, start, end):
        out.append((pos, m.start()))
        pos = m.end()
    out.append((pos, end))
    return [(a, b) for a, b in out if text[a:b].strip()]


def _lines(text: str, start: int, end: int) -> list[tuple[int, int]]:
    out, pos = [], start
    while pos < end:
        nl = text.find("\n", pos, end)
        stop = end if nl < 0 else nl
        if text[pos:stop].strip():
            out.append((pos, stop))
        pos = stop + 1
    return out


def _word_windows(text: str, start: int, end: int, target: int) -> list[tuple[int, int]]:
    """Fallback for a sentence over the target: windows of whole words."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text[start:end])]
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(words):
        j = i + 1
        while j < len(words) and count_text(
            text[start + words[i][0] : start + words[j][1]]
        ) <= target:
            j += 1
        out.append((start + words[i][0], start + words[j - 1][1]))
        i = j
    return out


def _pieces(text: str, target: int) -> list[tuple[int, int, str, tuple[int, ...]]]:
    """Finest needed split: paragraphs, else lines, else sentences, else words.
    A piece up to 1.5x the target stays whole: a log line just over it is not cut.
    Each piece carries its parent (paragraph, line): only siblings merge."""
    out: list[tuple[int, int, str, tuple[int, ...]]] = []
    slack = target + target // 2
    for p, (pa, pb) in enumerate(_spans(text, 0, len(text), _PARAGRAPH)):
        if count_text(text[pa:pb]) <= slack:
            out.append((pa, pb, "paragraph", ()))
            continue
        for n, (la, lb) in enumerate(_lines(text, pa, pb)):
            if count_text(text[la:lb]) <= slack:
                out.append((la, lb, "line", (p,)))
                continue
            for sa, sb in _spans(text, la, lb, _SENTENCE_END):
                if count_text(text[sa:sb]) <= slack:
                    out.append((sa, sb, "sentence", (p, n)))
                else:
                    out.extend((wa, wb, "words", (p, n))
                               for wa, wb in _word_windows(text, sa, sb, target))
    return out


def _text_chunks(text: str, target: int) -> list[Chunk]:
    """Pieces with small siblings merged while the span fits the target."""
    merged: list[tuple[int, int, str, tuple[int, ...]]] = []
    for a, b, kind, parent in _pieces(text, target):
        if merged:
            ma, _, mkind, mparent = merged[-1]
            if (mkind, mparent) == (kind, parent) and count_text(text[ma:b]) <= target:
                merged[-1] = (ma, b, kind, parent)
                continue
        merged.append((a, b, kind, parent))
    chunks: list[Chunk] = []
    for a, b, kind, _ in merged:
        span = text[a:b]
        lines = sum(1 for line in span.splitlines() if line.strip())
        chunks.append(Chunk(len(chunks), span.strip(), count_text(span), kind,
                            start=a, end=b, lines=max(lines, 1)))
    return chunks


# --------------------------------------------------------------------------- ranking


def _resolve(embedder: EmbedderLike) -> Embedder:
    if embedder is None:
        return get_embedder()
    return embedder if isinstance(embedder, Embedder) else embedder()


def rank_chunks(
    query: str,
    chunks: Sequence[Chunk | str],
    *,
    embedder: EmbedderLike = None,
    lexical_weight: float = LEXICAL_WEIGHT,
    id_weight: float = ID_WEIGHT,
    dense_query: str | None = None,
) -> np.ndarray:
    """Relevance of each chunk to `query`, higher is better.

    score = lexical_weight * BM25/max(BM25) + (1 - lexical_weight) * cosine
            + id_weight * (number of the query's identifiers the chunk contains).
    `embedder`: an Embedder, a getter, or None for the process default; it is
    not touched when lexical_weight is 1. A blank query scores every chunk 0.
    `dense_query`: embed this instead of `query` (the bare user question, which other
    stages embed too, so it comes from the memo, while `query` may add keywords).
    """
    if not 0.0 <= lexical_weight <= 1.0:
        raise ValueError(f"lexical_weight must be within [0, 1], got {lexical_weight}")
    texts = [c.text if isinstance(c, Chunk) else c for c in chunks]
    scores = np.zeros(len(texts), dtype=np.float32)
    if not texts or not query.strip():
        return scores
    if lexical_weight > 0:
        bm = _bm25(tuple(texts)).scores(query)
        top = float(bm.max())
        if top > 0:
            scores += lexical_weight * bm / top
    if lexical_weight < 1:
        emb = _resolve(embedder)
        q = emb.embed_one(dense_query or query)
        scores += (1.0 - lexical_weight) * (emb.embed(texts) @ q)
    if id_weight:
        for ident in identifiers(query)[:MAX_QUERY_IDS]:
            rx = _id_pattern(ident)
            hits = np.fromiter((rx.search(t) is not None for t in texts), dtype=bool,
                               count=len(texts))
            scores[hits] += id_weight
    return scores


@lru_cache(maxsize=512)
def _bm25(texts: tuple[str, ...]) -> BM25:
    return BM25(texts)


@lru_cache(maxsize=512)
def _document(text: str, target: int) -> Document:
    """Parsing and splitting a long tool result is the same on every call: once."""
    return Document(text, target)


def select_chunks(
    query: str,
    text: str,
    budget_tokens: int,
    *,
    embedder: EmbedderLike = None,
    lexical_weight: float = LEXICAL_WEIGHT,
    id_weight: float = ID_WEIGHT,
    target_tokens: int | None = None,
    dense_query: str | None = None,
) -> str:
    """`text` cut to at most `budget_tokens` cl100k tokens (marker included): the
    best-ranked chunks for `query`, in their original order, and a marker such as
    `[... 63 of 75 records omitted ...]`. A text within budget comes back as is.

    `target_tokens`: chunk size; default a quarter of the budget, within [24, 64].
    When not even the best chunk fits, the result is the marker alone.
    """
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens must be >= 1, got {budget_tokens}")
    if count_text(text) <= budget_tokens:
        return text
    target = target_tokens or max(24, min(DEFAULT_TARGET_TOKENS, budget_tokens // 4))
    doc = _document(text, target)
    scores = rank_chunks(query, doc.chunks, embedder=embedder, lexical_weight=lexical_weight,
                         id_weight=id_weight, dense_query=dense_query)
    order = sorted(range(len(doc)), key=lambda i: (-float(scores[i]), i))
    # Greedy by score with an estimate (chunk tokens + 2 for the separator), the
    # marker reserved; then shed the weakest until the real render fits.
    used = count_text(doc.marker([]))
    kept: list[int] = []
    for i in order:
        cost = doc.chunks[i].tokens + 2
        if used + cost <= budget_tokens:
            kept.append(i)
            used += cost
    out = doc.render(kept)
    while kept and count_text(out) > budget_tokens:
        kept.pop()  # `kept` is in score order: the last is the weakest
        out = doc.render(kept)
    return out
