"""Model backends: the innermost `next` of the pipeline.

Heavy imports (torch, transformers) happen only when a backend is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from contextwise.backends.base import Backend

if TYPE_CHECKING:
    from contextwise.policy import Budget, Local

__all__ = ["Backend", "build_backend", "cascade_identity", "default_max_batch"]


def build_backend(spec: Local, budget: Budget) -> Backend:
    """The backend a policy asks for: a LocalBackend (or, with `spec.cascade`, a
    CascadeBackend over a small and the main LocalBackend, each loaded on first
    use), behind a BatchingEngine (dynamic batching, bounded queue) unless
    `spec.max_batch` is 1."""
    from contextwise.backends.local import LocalBackend

    def local(model: str, quantization: str, **extra: Any) -> Backend:
        return LocalBackend(
            model=model,
            device=spec.device,
            dtype=spec.dtype,
            cache_dir=spec.cache_dir,
            max_context_tokens=budget.max_context_tokens,
            default_max_tokens=budget.max_output_tokens,
            prefix_cache_mb=spec.prefix_cache_mb,
            prefix_cache_min_tokens=spec.prefix_cache_min_tokens,
            quantization=quantization,
            **extra,
        )

    def main() -> Backend:
        return local(spec.model, spec.quantization, speculative=spec.speculative,
                     speculative_tokens=spec.speculative_tokens, draft_model=spec.draft_model,
                     draft_layers=spec.draft_layers)

    backend = main() if spec.cascade is None else _cascade(spec, budget, local, main)
    max_batch = spec.max_batch or default_max_batch(spec.device)
    if max_batch > 1 and isinstance(backend, Backend):
        from contextwise.backends.engine import BatchingEngine

        return BatchingEngine(backend, max_batch=max_batch, max_wait_ms=spec.max_wait_ms,
                              max_queue=spec.max_queue, static_decode=spec.static_decode,
                              decode_steps=spec.decode_steps, cuda_graphs=spec.cuda_graphs,
                              kv_cache_mb=spec.kv_cache_mb,
                              compile_decode=spec.compile_decode,
                              decode_kernels=spec.decode_kernels,
                              reuse_prefixes=spec.reuse_prefixes)
    return backend


def default_max_batch(device: str) -> int:
    """`Local.max_batch=None`: 256 where the model runs on CUDA (the static decoder's
    slots; measured on an H100), 16 on a CPU (2 cores saturate well before)."""
    if device.startswith("cuda") or device == "auto":
        import torch

        if torch.cuda.is_available():
            return 256
    return 16


def _cascade(spec: Local, budget: Budget, local: Callable[..., Backend],
             main: Callable[[], Backend]) -> Backend:
    """The CascadeBackend of `spec.cascade`: nothing is loaded until a call needs it."""
    from contextwise.backends.cascade import CascadeBackend
    from contextwise.backends.prompt import PromptCounter

    c = spec.cascade
    assert c is not None
    small_model = c.model or spec.model
    return CascadeBackend(
        small=lambda: local(small_model, c.quantization),
        large=main,
        threshold=c.threshold,
        confidence=c.confidence,
        counter=lambda: PromptCounter(spec.model, spec.cache_dir, budget.max_context_tokens),
        model_name=spec.model,
        identity=cascade_identity(spec),
    )


def cascade_identity(spec: Local) -> str:
    """The response cache's model identity of a cascaded backend (its replies may be
    the small model's, so they must not mix with the main model's alone)."""
    c = spec.cascade
    assert c is not None
    return (f"{spec.model}|quantization={spec.quantization}|dtype={spec.dtype}"
            f"|cascade={c.model or spec.model}:{c.quantization}:{c.confidence}>={c.threshold}")
