"""ONNX Runtime for the embedder on CPU: the same MiniLM forward in ~3 ms instead of ~7.

One short query per call is the stages' main model cost, and on CPU ONNX
Runtime's fused kernels run it about twice as fast as eager torch. The model
(mean pooling and normalization included) is exported once with torch's ONNX
exporter and kept under $CONTEXTWISE_CACHE (default ~/.cache/contextwise)/embedders,
written atomically; later processes only load it. Optional: without `onnx` and
`onnxruntime` installed, or if the export fails, the embedder stays on torch.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OnnxEmbedder", "cache_path"]


def cache_path(model_dir: str, dim: int) -> Path:
    """Where the exported model of `model_dir` lives (keyed by its weights file and torch)."""
    import torch

    weights = Path(model_dir) / "model.safetensors"
    stamp = f"{Path(model_dir).resolve()}|{weights.stat().st_size if weights.exists() else 0}"
    digest = hashlib.sha256(f"{stamp}|{dim}|{torch.__version__}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("CONTEXTWISE_CACHE") or Path.home() / ".cache" / "contextwise")
    return root / "embedders" / f"{digest}.onnx"


def _export(hf_model: Any, path: Path) -> None:
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self, m: Any):
            super().__init__()
            self.m = m

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = self.m(input_ids=ids, attention_mask=mask).last_hidden_state
            w = mask.unsqueeze(-1).to(h.dtype)
            return torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1)

    ids = torch.tensor([[101, 7592, 102, 0], [101, 7592, 2088, 102]])
    mask = (ids != 0).long()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings():  # the exporter's own deprecation/tracer chatter
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Pooled(hf_model).eval(), (ids, mask), tmp, input_names=["ids", "mask"],
                output_names=["embedding"], opset_version=17, dynamo=False,
                dynamic_axes={"ids": {0: "batch", 1: "tokens"}, "mask": {0: "batch", 1: "tokens"}},
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class OnnxEmbedder:
    """`OnnxEmbedder(session)(input_ids, attention_mask) -> (batch, dim)` float32, normalized."""

    def __init__(self, session: Any):
        self.session = session

    @classmethod
    def build(cls, hf_model: Any, path: Path, threads: int) -> OnnxEmbedder | None:
        """Load (exporting first if needed) or None when ONNX Runtime is unavailable."""
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        try:
            if not path.exists():
                _export(hf_model, path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = max(1, threads)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            # Idle worker threads must not spin: they would steal the cores the
            # stages (and the chat model) run on between two embeddings.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001  (no onnx exporter, a broken file: torch still works)
            return None
        return cls(session)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {"ids": input_ids.astype(np.int64),
                                      "mask": attention_mask.astype(np.int64)})[0]
        return np.asarray(out, dtype=np.float32)
