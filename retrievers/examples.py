"""Pick the few-shot examples most like the query, within a token budget.

A fixed block of few-shot examples costs the same tokens on every call and is
mostly about other questions. `ExampleRetriever` keeps a pool of examples and
returns, per query, the most similar ones that fit `budget_tokens` (cl100k
tokens of input + output), at most `max_examples` of them.

Similarity is hybrid like tool retrieval: the cosine between the query and the
example's input (shared sentence embedder) and BM25 over the inputs, each
standardized over the pool (z-scores) and mixed with `lexical_weight`, so an
exact identifier or rare word in the query pulls in the example that has it.

Selection is greedy by similarity: an example that does not fit the remaining
budget is skipped and smaller, less similar ones may still fill it.

Order of the result: least similar first, MOST SIMILAR LAST, so the best
example sits right before the query, where a small model copies from most.
Ties keep pool order. With an empty query there is nothing to compare, so
examples are taken in pool order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

import numpy as np
from contextwise.retrievers.embedder import Embedder, get_embedder
from contextwise.retrievers.lexical import BM25
from pydantic import ValidationError

from contextwise.policy import Example
from contextwise.tokens import count_text

__all__ = ["ExampleRetriever"]

EmbedderLike: TypeAlias = Embedder | Callable[[], Embedder] | None


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-6)


class ExampleRetriever:
    """`select(query, max_examples=..., budget_tokens=...) -> list[Example]`."""

    def __init__(
        self,
        examples: Iterable[Example | Mapping[str, Any]],
        *,
        embedder: EmbedderLike = None,
        lexical_weight: float = 0.3,
    ):
        if not 0 <= lexical_weight <= 1:
            raise ValueError(f"lexical_weight must be in [0, 1], got {lexical_weight}")
        if isinstance(examples, (str, bytes, Mapping)):
            raise TypeError("examples must be a list of Example (or {'input', 'output'} dicts)")
        pool: list[Example] = []
        for i, ex in enumerate(examples):
            try:
                pool.append(ex if isinstance(ex, Example) else Example.model_validate(ex))
            except ValidationError as e:
                err = e.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                raise ValueError(f"examples[{i}]{'.' + loc if loc else ''}: {err['msg']}") from None
        self.examples = pool
        self.lexical_weight = float(lexical_weight)
        self.tokens = [count_text(e.input) + count_text(e.output) for e in pool]
        if embedder is None:
            self._embedder: Callable[[], Embedder] = get_embedder
        elif callable(embedder) and not hasattr(embedder, "embed"):
            self._embedder = embedder
        else:
            self._embedder = lambda: embedder  # type: ignore[assignment,return-value]
        self._vectors: np.ndarray | None = None  # embedded on the first select
        self._bm25 = BM25([e.input for e in pool])
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.examples)

    def scores(self, query: str) -> np.ndarray:
        """Hybrid similarity of `query` to each example's input (z-units), pool order."""
        if not self.examples:
            return np.empty(0, np.float32)
        embedder = self._embedder()
        with self._lock:
            if self._vectors is None:
                self._vectors = embedder.embed([e.input for e in self.examples])
        dense = self._vectors @ embedder.embed_one(query)
        lexical = self._bm25.scores(query)
        w = self.lexical_weight
        return (1 - w) * _z(dense) + w * _z(lexical)

    def select(self, query: str, *, max_examples: int, budget_tokens: int) -> list[Example]:
        """The most similar examples that fit the budget, most similar LAST."""
        if max_examples < 0 or budget_tokens < 0:
            raise ValueError(
                f"max_examples and budget_tokens must be >= 0, got {max_examples}, {budget_tokens}"
            )
        if not isinstance(query, str):
            raise TypeError(f"query must be text, got {type(query).__name__}")
        if not self.examples or max_examples == 0 or budget_tokens == 0:
            return []
        if query.strip():
            order = np.argsort(-self.scores(query), kind="stable")  # best first
        else:
            order = np.arange(len(self.examples))
        picked: list[int] = []
        left = budget_tokens
        for i in order.tolist():
            if self.tokens[i] <= left:
                picked.append(i)
                left -= self.tokens[i]
                if len(picked) == max_examples:
                    break
        return [self.examples[i] for i in reversed(picked)]
