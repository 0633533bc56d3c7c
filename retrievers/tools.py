"""Find the few tools a query needs in a catalogue of hundreds or thousands.

An agent that sends 200 tool schemas with every request pays for all of them
on every call. `ToolRetriever` ranks the catalogue for a query so the tool
loadout stage can keep the handful that matter. Three signals:

- dense: cosine between the query and the tool's document (name split into
  words, description, parameter names and descriptions) with the shared
  sentence embedder, searched through a `VectorIndex`;
- lexical: BM25 over the same documents, so an exact identifier
  ("get_weather", an error code) counts even when the embedding misses it;
- usage: past queries that led to each tool (`examples`, `learn`): the best
  cosine (mean of the top-m) between the query and the tool's past queries. A
  query is far more like another query than like a description, which makes
  this the strongest signal once a tool has history.

The signals live on different scales (cosines around 0.1-0.6, BM25 unbounded,
query-to-query cosines higher than query-to-document ones), so each is turned
into a z-score: how many standard deviations a tool stands above the whole
catalogue for this query. That is exact and cheap at any size: for the dense
signal the mean and variance over all documents follow from the documents' mean
vector and second-moment matrix (q.mu and q'Sq - (q.mu)^2, O(dim^2) per query);
BM25 is scored for every document anyway; the usage signal is standardized by
the moments of all past queries and documents together (the documents keep
that scale stable while history is thin). Then

    base  = (1 - lexical_weight) * z(dense) + lexical_weight * z(lexical)
    score = (1 - example_weight) * base + example_weight * z(usage)  (tools with history)
    score = base                                                     (tools without)

so `lexical_weight` means the same thing on any catalogue. On MetaTool's training
split, z-scores at the policy default 0.3 were as good as the best weight for
any other normalization (max-scaled BM25 wanted 0.1 and lost 5 points at 0.3).
History counts both ways: a tool whose past queries are unlike this one drops
below its document score (that beat "history can only lift a tool" on the
training split, narrowly).

A query that asks for two things ("latest Tesla news and how the stock moved")
embeds as a blur of both. With `decompose`, a query with two or more clauses
(split at sentence ends, "and", "also", "then", ...) is also scored clause by
clause and each tool keeps its best score, so both tools surface (on MetaTool
it costs ~2 points of single-tool recall@5 without history and buys ~5-8
points of two-tool complete@5). The defaults (example_weight 0.7, top-m 1,
decompose on) were chosen on MetaTool's training split; benchmarks/tool_retrieval.py
re-tunes the weights on its training split and never on its test queries.

Ranking scores exactly only candidates: per query, the dense top-c from the
index, the lexical top-c and the tools of the nearest past queries (c >= 64),
which keeps a search at 10,000 tools to a few milliseconds.

Building the index embeds every document once (a 10,000-tool catalogue takes
minutes on a small CPU), so built indexes are kept by a hash of the catalogue
(names, descriptions, parameters; not their order) and the embedder: in memory
for the process, and on disk under `cache_dir` so the next process loads
instead of embedding.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from contextwise.retrievers.embedder import Embedder, get_embedder
from contextwise.retrievers.index import VectorIndex
from contextwise.retrievers.lexical import BM25

from contextwise.errors import InputError
from contextwise.types import Tool, parse_tools

__all__ = ["ToolRetriever", "catalogue_hash", "clauses", "name_words", "tool_document"]

DOC_VERSION = 1  # bump when tool_document changes: cached indexes are then rebuilt
MEMORY_CACHE = 8  # built catalogues kept per process
CANDIDATES = 64  # minimum candidates taken from each signal before exact scoring
EXAMPLE_NEIGHBOURS = 256  # minimum example queries looked at per search

# Clause boundaries for decomposition: sentence ends and joining words.
_CLAUSE = re.compile(
    r"\s*(?:[;?!.]+\s+|,?\s+\b(?:and also|and then|and|also|as well as|plus|then)\b\s+)",
    re.IGNORECASE,
)
MIN_CLAUSE_WORDS = 3

EmbedderLike: TypeAlias = Embedder | Callable[[], Embedder] | None

_WORDS = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|[_\-.\s]+")


def name_words(name: str) -> str:
    """`getWeatherForecast` / `get_weather-forecast` -> 'get Weather Forecast'."""
    return " ".join(w for w in _WORDS.split(name) if w)


def clauses(query: str) -> list[str]:
    """The query's clauses of 3+ words, when it has two or more of them (else [])."""
    parts = [p.strip(" ,") for p in _CLAUSE.split(query)]
    parts = [p for p in parts if len(p.split()) >= MIN_CLAUSE_WORDS]
    return parts if len(parts) >= 2 else []


def tool_document(tool: Tool) -> str:
    """The text a tool is retrieved by: name words, description, parameters."""
    doc = name_words(tool.name)
    if tool.description:
        doc += ": " + " ".join(tool.description.split())
    props = tool.parameters.get("properties")
    if isinstance(props, Mapping) and props:
        parts = []
        for pname, spec in props.items():
            desc = spec.get("description") if isinstance(spec, Mapping) else None
            parts.append(name_words(str(pname)) + (f" ({desc})" if desc else ""))
        doc += ". Parameters: " + "; ".join(parts)
    return doc


def catalogue_hash(tools: Iterable[Tool], embedder_name: str = "") -> str:
    """A digest of what retrieval depends on: the tools' names, descriptions and
    parameters (order ignored), the document format and the embedder."""
    items = sorted(
        (t.name, t.description, json.dumps(t.parameters, sort_keys=True, default=str))
        for t in tools
    )
    blob = json.dumps([DOC_VERSION, embedder_name, items], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class _Built:
    """What a catalogue costs to build: documents, their vectors, the two indexes."""

    names: list[str]  # sorted by name; position = id in the index
    docs: list[str]
    vectors: np.ndarray  # (n, dim) normalized
    index: VectorIndex
    bm25: BM25
    moments: _Moments


class _Moments:
    """Running mean vector and second-moment matrix of a set of vectors: the mean and
    standard deviation of q.v over the set, for any q, without touching the set."""

    def __init__(self, dim: int):
        self.n = 0
        self._sum = np.zeros(dim, np.float64)
        self._outer = np.zeros((dim, dim), np.float64)

    def add(self, vectors: np.ndarray) -> None:
        v = np.asarray(vectors, np.float64)
        self.n += len(v)
        self._sum += v.sum(axis=0)
        self._outer += v.T @ v

    def merged(self, other: _Moments) -> _Moments:
        out = _Moments(len(self._sum))
        out.n = self.n + other.n
        out._sum = self._sum + other._sum
        out._outer = self._outer + other._outer
        return out

    def stats(self, q: np.ndarray) -> tuple[float, float]:
        """Mean and standard deviation of q.v over the set."""
        if self.n == 0:
            return 0.0, 1.0
        q64 = q.astype(np.float64)
        mean = float(q64 @ self._sum) / self.n
        var = float(q64 @ self._outer @ q64) / self.n - mean * mean
        return mean, max(var, 0.0) ** 0.5 + 1e-6


_BUILT: OrderedDict[str, _Built] = OrderedDict()
_BUILT_LOCK = threading.Lock()


def _getter(source: EmbedderLike) -> Callable[[], Embedder]:
    if source is None:
        return get_embedder
    if callable(source) and not hasattr(source, "embed"):
        return source
    return lambda: source  # an Embedder (or anything with .embed/.name/.dim)


class ToolRetriever:
    """Hybrid (dense + BM25 + usage) tool search over a catalogue.

    `search(query, k)` returns `[(tool, score), ...]`, best first.
    """

    def __init__(
        self,
        tools: Iterable[Tool | Mapping[str, Any]],
        *,
        embedder: EmbedderLike = None,
        lexical_weight: float = 0.3,
        example_weight: float = 0.7,
        example_top_m: int = 1,
        decompose: bool = True,
        examples: Mapping[str, Sequence[str]] | None = None,
        cache_dir: str | Path | None = None,
    ):
        if not 0 <= lexical_weight <= 1:
            raise ValueError(f"lexical_weight must be in [0, 1], got {lexical_weight}")
        if not 0 <= example_weight <= 1:
            raise ValueError(f"example_weight must be in [0, 1], got {example_weight}")
        if example_top_m < 1:
            raise ValueError(f"example_top_m must be >= 1, got {example_top_m}")
        self.lexical_weight = float(lexical_weight)
        self.example_weight = float(example_weight)
        self.example_top_m = int(example_top_m)
        self.decompose = bool(decompose)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._embedder = _getter(embedder)
        self._lock = threading.RLock()
        self.rebuilds = 0  # catalogues this retriever embedded itself (not from a cache)
        # learned usage: (query, tool name) pairs, their vectors and an index over them
        self._examples: list[tuple[str, str]] = []
        self._example_set: set[tuple[str, str]] = set()
        self._example_vecs: list[np.ndarray] = []
        self._ex_index: VectorIndex | None = None
        self._ex_tool = np.empty(0, np.int64)  # example id -> tool position
        self._ex_moments: _Moments | None = None
        self._usage_moments: _Moments | None = None
        self.update(tools)
        pairs: list[tuple[str, str]] = []
        for tool_name, queries in (examples or {}).items():
            if isinstance(queries, str):
                raise TypeError(f"examples[{tool_name!r}] must be a list of queries, not a str")
            pairs.extend((q, tool_name) for q in queries)
        self.learn_many(pairs)

    # ------------------------------------------------------------------ catalogue

    @property
    def tools(self) -> list[Tool]:
        """The catalogue in the order it was given."""
        return list(self._tools)

    @property
    def key(self) -> str:
        """The catalogue hash this retriever's index is built for."""
        return self._key

    def __len__(self) -> int:
        return len(self._tools)

    def update(self, tools: Iterable[Tool | Mapping[str, Any]]) -> bool:
        """Switch to another catalogue; rebuilds only when its hash changed. Returns
        whether the catalogue changed. Learned examples of tools that remain are kept."""
        parsed = _parse(tools)
        embedder = self._embedder()
        key = catalogue_hash(parsed, getattr(embedder, "name", type(embedder).__name__))
        with self._lock:
            if getattr(self, "_key", None) == key:
                self._tools = parsed  # same content, maybe another order
                return False
            self._built = self._build(parsed, key, embedder)
            self._key = key
            self._tools = parsed
            self._by_name = {t.name: t for t in parsed}
            self._pos = {n: i for i, n in enumerate(self._built.names)}
            self._reindex_examples()
            return True

    def _build(self, tools: list[Tool], key: str, embedder: Embedder) -> _Built:
        with _BUILT_LOCK:
            hit = _BUILT.get(key)
            if hit is not None:
                _BUILT.move_to_end(key)
                return hit
        ordered = sorted(tools, key=lambda t: t.name)
        names = [t.name for t in ordered]
        docs = [tool_document(t) for t in ordered]
        path = self.cache_dir / f"tools-{key[:32]}.cwv" if self.cache_dir else None
        index = None
        if path is not None and path.is_file():
            try:
                index = VectorIndex.load(path)
                if len(index) != len(names):
                    index = None
            except (ValueError, OSError):
                index = None  # a damaged cache file is rebuilt, not fatal
        if index is not None:
            vectors = index.get(np.arange(len(names)))
        else:
            vectors = embedder.embed(docs) if docs else np.empty((0, embedder.dim), np.float32)
            index = VectorIndex(vectors.shape[1])
            index.add(np.arange(len(names)), vectors)
            self.rebuilds += 1
            if path is not None:
                index.save(path)
        vectors = np.ascontiguousarray(vectors, np.float32)
        moments = _Moments(vectors.shape[1])
        moments.add(vectors)
        built = _Built(names, docs, vectors, index, BM25(docs), moments)
        with _BUILT_LOCK:
            _BUILT[key] = built
            while len(_BUILT) > MEMORY_CACHE:
                _BUILT.popitem(last=False)
        return built

    # ------------------------------------------------------------------ usage

    def learn(self, query: str, tool_name: str) -> bool:
        """Remember that `query` led to `tool_name`. Returns False for a pair already known."""
        return self.learn_many([(query, tool_name)]) == 1

    def learn_many(self, pairs: Iterable[tuple[str, str]]) -> int:
        """`learn` for many (query, tool name) pairs, embedded in one batch."""
        new: dict[tuple[str, str], None] = {}  # ordered set
        with self._lock:
            for query, tool_name in pairs:
                if not isinstance(query, str) or not query.strip():
                    raise ValueError(f"an example query must be non-empty text, got {query!r}")
                if tool_name not in self._by_name:
                    raise ValueError(f"unknown tool {tool_name!r}: not in this catalogue")
                pair = (query.strip(), tool_name)
                if pair not in self._example_set:
                    new[pair] = None
            if not new:
                return 0
            vecs = self._embedder().embed([q for q, _ in new])
            start = len(self._examples)
            self._examples.extend(new)
            self._example_set.update(new)
            self._example_vecs.extend(vecs)
            self._index_examples(start)
        return len(new)

    @property
    def examples(self) -> dict[str, list[str]]:
        """Learned queries per tool name."""
        out: dict[str, list[str]] = {}
        for query, name in self._examples:
            out.setdefault(name, []).append(query)
        return out

    def _reindex_examples(self) -> None:
        """After a catalogue change: forget examples of tools that left, re-point the rest
        at their new positions (no embedding: the vectors are kept)."""
        keep = [i for i, (_, name) in enumerate(self._examples) if name in self._pos]
        self._examples = [self._examples[i] for i in keep]
        self._example_vecs = [self._example_vecs[i] for i in keep]
        self._example_set = set(self._examples)
        self._ex_index, self._ex_moments, self._usage_moments = None, None, None
        self._ex_tool = np.empty(0, np.int64)
        self._ex_has = np.zeros(len(self._built.names), bool)  # position -> has history
        self._index_examples(0)

    def _index_examples(self, start: int) -> None:
        """Add examples[start:] to the example index and the usage moments."""
        if start >= len(self._examples):
            return
        vecs = np.vstack(self._example_vecs[start:]).astype(np.float32)
        if self._ex_index is None:
            self._ex_index = VectorIndex(vecs.shape[1])
            self._ex_moments = _Moments(vecs.shape[1])
        self._ex_index.add(np.arange(start, len(self._examples)), vecs)
        assert self._ex_moments is not None
        self._ex_moments.add(vecs)
        # usage is standardized over documents and past queries together: with little
        # history the documents still give a stable scale
        self._usage_moments = self._ex_moments.merged(self._built.moments)
        tools = [self._pos[name] for _, name in self._examples[start:]]
        self._ex_tool = np.concatenate([self._ex_tool, np.asarray(tools, np.int64)])
        self._ex_has[tools] = True

    # ------------------------------------------------------------------ search

    def search(self, query: str, k: int = 5) -> list[tuple[Tool, float]]:
        """The k best tools for `query`, best first, with their fused scores (z-units:
        standard deviations above the catalogue's mean for this query)."""
        return self.search_many([query], k)[0]

    def search_many(self, queries: Sequence[str], k: int = 5) -> list[list[tuple[Tool, float]]]:
        """`search` for many queries; their embeddings are computed in one batch."""
        if isinstance(queries, str):
            raise TypeError("search_many takes a list of queries; use search() for one")
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"a query must be non-empty text, got {q!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        # one embedding batch: every query, then the clauses of those that have some
        parts = [clauses(q) if self.decompose else [] for q in queries]
        texts = list(queries) + [c for p in parts for c in p]
        vectors = self._embedder().embed(texts) if texts else np.empty((0, 0), np.float32)
        out = []
        j = len(queries)
        with self._lock:
            for i, q in enumerate(queries):
                subs = [(c, vectors[j + n]) for n, c in enumerate(parts[i])]
                j += len(subs)
                out.append(self._rank([(q, vectors[i]), *subs], k))
        return out

    def scores(self, query: str) -> dict[str, float]:
        """Every tool's fused score (z-units) for the whole `query`, without
        decomposition: for inspection and tuning."""
        vec = self._embedder().embed_one(query)
        with self._lock:
            pos, s = self._score(query, vec, np.arange(len(self._built.names)))
            return {self._built.names[p]: float(v) for p, v in zip(pos, s, strict=True)}

    def _rank(self, views: list[tuple[str, np.ndarray]], k: int) -> list[tuple[Tool, float]]:
        """Rank the catalogue for a query given as (text, vector) views: the query itself
        and, when decomposed, its clauses. A tool's score is its best over the views."""
        built = self._built
        n = len(built.names)
        if n == 0:
            return []
        c = min(n, max(CANDIDATES, 4 * k))
        # candidates: per view, the dense top-c, the lexical top-c, the nearest examples' tools
        cand, prepared = [], []
        for text, qvec in views:
            _, dense_ids = built.index.search(qvec, c)
            cand.append(dense_ids[0][dense_ids[0] >= 0])
            lex = built.bm25.scores(text)
            hits = np.flatnonzero(lex)
            if len(hits) > c:
                hits = hits[np.argpartition(-lex[hits], c - 1)[:c]]
            cand.append(hits)
            ex = self._example_scores(qvec, c)
            if ex is not None:
                cand.append(ex[0])
            prepared.append((text, qvec, lex, ex))
        pos = np.unique(np.concatenate(cand))
        scores = np.full(len(pos), -np.inf, np.float32)
        for text, qvec, lex, ex in prepared:
            scores = np.maximum(scores, self._score(text, qvec, pos, lex=lex, ex=ex)[1])
        order = np.argsort(-scores, kind="stable")[:k]
        return [(self._by_name[built.names[pos[i]]], float(scores[i])) for i in order]

    def _score(
        self,
        query: str,
        qvec: np.ndarray,
        pos: np.ndarray,
        *,
        lex: np.ndarray | None = None,
        ex: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fused scores of the tools at positions `pos` (see the module docstring)."""
        built = self._built
        if lex is None:
            lex = built.bm25.scores(query)
        if ex is None:
            ex = self._example_scores(qvec, len(self._examples))
        mean, std = built.moments.stats(qvec)
        dense = (built.vectors[pos] @ qvec - mean) / std
        lexical = (lex[pos] - lex.mean()) / (lex.std() + 1e-6)
        base = (1 - self.lexical_weight) * dense + self.lexical_weight * lexical
        if ex is None:
            return pos, base
        tools, sims = ex
        # tools with history whose past queries are not among the nearest: the farthest seen
        at = np.minimum(np.searchsorted(tools, pos), len(tools) - 1)
        usage = np.where(tools[at] == pos, sims[at],
                         np.where(self._ex_has[pos], sims.min(), np.nan))
        assert self._usage_moments is not None
        mean, std = self._usage_moments.stats(qvec)
        mixed = (1 - self.example_weight) * base + self.example_weight * (usage - mean) / std
        return pos, np.where(np.isnan(usage), base, mixed)

    def _example_scores(self, qvec: np.ndarray, c: int
                        ) -> tuple[np.ndarray, np.ndarray] | None:
        """Over the nearest past queries: (tool positions ascending, mean of each tool's
        top-m cosines). None without history."""
        if self._ex_index is None:
            return None
        m = self.example_top_m
        want = min(len(self._examples), max(4 * c * m, EXAMPLE_NEIGHBOURS))
        sims, ids = self._ex_index.search(qvec, want)
        keep = ids[0] >= 0
        sims, tools = sims[0][keep].astype(np.float64), self._ex_tool[ids[0][keep]]
        if not len(tools):
            return None
        # group by tool, best first within a tool, and keep each tool's first m
        order = np.lexsort((-sims, tools))
        tools, sims = tools[order], sims[order]
        starts = np.flatnonzero(np.r_[True, tools[1:] != tools[:-1]])
        rank = np.arange(len(tools)) - np.repeat(starts, np.diff(np.r_[starts, len(tools)]))
        top = rank < m
        tools, sims = tools[top], sims[top]
        uniq, first, counts = np.unique(tools, return_index=True, return_counts=True)
        return uniq, np.add.reduceat(sims, first) / counts

def _parse(tools: Iterable[Tool | Mapping[str, Any]]) -> list[Tool]:
    """Tools or OpenAI tool dicts -> Tools; InputError (a ValueError) names the bad item."""
    if isinstance(tools, (str, bytes, Mapping)):
        raise InputError("tools", "must be a list of tools")
    return parse_tools(tools)
