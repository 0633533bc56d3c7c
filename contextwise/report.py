"""The cost report: ledger totals, estimated hosted-model cost, per-stage savings, a plot.

Reads the ledger only; knows nothing about models or stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from contextwise.memory.ledger import Ledger
from contextwise.policy import Pricing
from contextwise.tokens import estimate_cost, price_table

__all__ = ["plot_report", "print_report", "summarize"]


def summarize(ledger: Ledger, pricing: Pricing, since: float = 0.0) -> dict[str, Any]:
    """Totals, savings and estimated costs as one flat-ish dict (also the --json output)."""
    t = ledger.totals(since)
    raw, seen = t["raw_prompt_tokens"], t["prompt_tokens"]
    prices = price_table(pricing.prices)
    costs = {}
    for name in pricing.compare_to:
        if name not in prices:
            continue
        costs[name] = {
            "passthrough_usd": estimate_cost(t["cl100k_raw_prompt"], t["cl100k_completion"], name, prices),
            "engineered_usd": estimate_cost(t["cl100k_prompt"], t["cl100k_completion"], name, prices),
        }
    return {
        **t,
        "prompt_tokens_saved": raw - seen,
        "prompt_reduction": (raw / seen) if seen else None,
        "mean_latency_s": t["latency_s"] / t["calls"] if t["calls"] else None,
        "estimated_cost": costs,
        "per_stage": ledger.per_stage(since),
    }


def print_report(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    if not summary["calls"]:
        console.print("No calls recorded yet. Run `contextwise demo` or use a Pipeline.")
        return
    totals = Table(title="contextwise: totals")
    totals.add_column("metric")
    totals.add_column("value", justify="right")
    totals.add_row("calls", f"{summary['calls']:,}")
    totals.add_row("prompt tokens, passthrough", f"{summary['raw_prompt_tokens']:,}")
    totals.add_row("prompt tokens, engineered", f"{summary['prompt_tokens']:,}")
    totals.add_row("prompt tokens saved", f"{summary['prompt_tokens_saved']:,}")
    totals.add_row("completion tokens", f"{summary['completion_tokens']:,}")
    totals.add_row("mean latency", f"{summary['mean_latency_s']:.2f} s")
    console.print(totals)

    if summary["estimated_cost"]:
        cost = Table(title="estimated cost on hosted models (cl100k tokens, list prices)")
        for col in ("model", "passthrough", "engineered", "saved"):
            cost.add_column(col, justify="right" if col != "model" else "left")
        for name, c in summary["estimated_cost"].items():
            saved = c["passthrough_usd"] - c["engineered_usd"]
            cost.add_row(name, f"${c['passthrough_usd']:.6f}", f"${c['engineered_usd']:.6f}",
                         f"${saved:.6f}")
        console.print(cost)

    stages = Table(title="per stage")
    stages.add_column("stage")
    stages.add_column("calls", justify="right")
    stages.add_column("prompt tokens saved", justify="right")
    for name, s in summary["per_stage"].items():
        stages.add_row(name, f"{int(s['calls']):,}", f"{int(s['tokens_saved']):,}")
    console.print(stages)


def plot_report(ledger: Ledger, path: str | Path, since: float = 0.0) -> Path:
    """Per-call prompt tokens (passthrough vs engineered) and per-stage savings, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ledger.rows(since)
    per_stage = ledger.per_stage(since)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(1, len(rows) + 1))
    ax1.plot(xs, [r["raw_prompt_tokens"] for r in rows], label="passthrough", marker=".")
    ax1.plot(xs, [r["prompt_tokens"] for r in rows], label="engineered", marker=".")
    ax1.set_xlabel("call")
    ax1.set_ylabel("prompt tokens")
    ax1.set_title("prompt tokens per call")
    ax1.legend()
    names = list(per_stage) or ["(none)"]
    ax2.bar(names, [per_stage[n]["tokens_saved"] if n in per_stage else 0 for n in names])
    ax2.set_title("prompt tokens saved per stage")
    ax2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
