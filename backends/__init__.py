"""Model backends: the innermost `next` of the pipeline.

Heavy imports (torch, transformers) happen only when a backend is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from contextwise.backends.base import Backend

if TYPE_CHECKING:
    from contextwise.policy import Budget, Local

__all__ = ["Backend", "build_backend"]


def build_backend(spec: Local, budget: Budget) -> Backend:
    """The backend a policy asks for: a LocalBackend, behind a BatchingEngine
    (dynamic batching, bounded queue) unless `spec.max_batch` is 1."""
    from contextwise.backends.local import LocalBackend

    backend = LocalBackend(
        model=spec.model,
        device=spec.device,
        dtype=spec.dtype,
        cache_dir=spec.cache_dir,
        max_context_tokens=budget.max_context_tokens,
        default_max_tokens=budget.max_output_tokens,
        prefix_cache_mb=spec.prefix_cache_mb,
        prefix_cache_min_tokens=spec.prefix_cache_min_tokens,
        quantization=spec.quantization,
        speculative=spec.speculative,
        speculative_tokens=spec.speculative_tokens,
    )
    if spec.max_batch > 1 and isinstance(backend, Backend):
        from contextwise.backends.engine import BatchingEngine

        return BatchingEngine(backend, max_batch=spec.max_batch, max_wait_ms=spec.max_wait_ms,
                              max_queue=spec.max_queue)
    return backend
