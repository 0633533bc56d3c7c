"""The stages: each rewrites a Call on its way to the model (`apply(call) -> Call`,
usable alone) and/or looks at the Reply on its way back. Order and policy:
`contextwise.pipeline.build_stages`.

Names load on first use, so `import contextwise` does not pull in the retrieval
stack (FAISS, the embedder) until a stage is built."""

from importlib import import_module
from typing import Any

from contextwise.middleware.base import Stage, acompose, compose

_LAZY = {
    "BudgetStage": "budget",
    "CacheStage": "cache",
    "PruneStage": "prune",
    "QuarantineStage": "quarantine",
    "ResponseCache": "cache",
    "SummarizeStage": "summarize",
    "TemplatingStage": "templating",
    "ToolLoadoutStage": "tool_loadout",
}

# Spelled out, not built from _LAZY, so tools that read `__all__` see every name
__all__ = [
    "BudgetStage",
    "CacheStage",
    "PruneStage",
    "QuarantineStage",
    "ResponseCache",
    "Stage",
    "SummarizeStage",
    "TemplatingStage",
    "ToolLoadoutStage",
    "acompose",
    "compose",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'contextwise.middleware' has no attribute {name!r}")
    return getattr(import_module(f"contextwise.middleware.{module}"), name)
