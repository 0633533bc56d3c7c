"""The stages: each rewrites a Call on its way to the model (`apply(call) -> Call`,
usable alone) and/or looks at the Reply on its way back. Order and policy:
`contextwise.pipeline.build_stages`."""

from contextwise.middleware.base import Stage, acompose, compose
from contextwise.middleware.budget import BudgetStage
from contextwise.middleware.prune import PruneStage
from contextwise.middleware.quarantine import QuarantineStage
from contextwise.middleware.summarize import SummarizeStage
from contextwise.middleware.templating import TemplatingStage
from contextwise.middleware.tool_loadout import ToolLoadoutStage

__all__ = [
    "BudgetStage",
    "PruneStage",
    "QuarantineStage",
    "Stage",
    "SummarizeStage",
    "TemplatingStage",
    "ToolLoadoutStage",
    "acompose",
    "compose",
]
