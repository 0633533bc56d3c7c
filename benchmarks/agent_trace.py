"""Agent-trace benchmark: prompt tokens per turn, passthrough against engineered.

    python -m benchmarks.agent_trace [--json-only]

Replays the scripted 40-turn, 200-tool travel session of
`benchmarks.agent_scenario` through a real `Pipeline` (SQLite session memory,
ledger, every context stage of the default policy, summaries extractive so no
chat model runs). The assistant side is replayed (`benchmarks.replay`), so what
is measured is the prompt each model call would get:

- passthrough: the whole history plus all 200 tool schemas, every call;
- engineered: what the stages hand to the model.

Reported: cl100k prompt tokens per turn for both and the ratio
(`token_reduction`, target >= 5x), the share of `FACTS` the final recap needs
that are still readable in its prompt (`fact_retention`, target >= 95%), and
whether the injected tool output was quarantined (`injection_quarantined`:
stored with a reason, and its text in no prompt after it arrived).
Writes benchmarks/results/agent_trace.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from contextwise.memory.store import Store
from rich.console import Console
from rich.table import Table

from benchmarks.agent_scenario import FACTS, INJECTION, facts_kept, tools, turns
from benchmarks.common import write_results
from benchmarks.replay import ReplayBackend
from contextwise import Pipeline, Policy
from contextwise.policy import Storage, Summarize
from contextwise.tokens import count_messages
from contextwise.types import Call, parse_tools

SESSION = "lisbon-trip"
INJECTION_MARK = "ignore all previous instructions"


def policy() -> Policy:
    return Policy(
        summarize=Summarize(mode="extractive"),  # no chat model in this benchmark
        storage=Storage(path=":memory:"),
    )


def prompt_text(call: Call) -> str:
    return "\n".join(
        [m.content or "" for m in call.messages]
        + [f"{tc.name} {tc.arguments}" for m in call.messages for tc in m.tool_calls or []]
    )


def run(pol: Policy | None = None) -> dict[str, Any]:
    pol = pol or policy()
    backend = ReplayBackend()
    store = Store(":memory:")
    pipe = Pipeline(pol, backend=backend, store=store)
    catalogue = tools()
    rows: list[dict[str, Any]] = []
    injection_seen_after = False
    injected_turn = None
    t0 = time.perf_counter()
    for number, turn in enumerate(turns(), start=1):
        raw_tokens = engineered_tokens = calls = 0
        new: list[dict[str, Any]] = [{"role": "user", "content": turn.user}]
        for tool_name, args, result in turn.steps:
            backend.call_tool(tool_name, args)
            reply = pipe(new, tools=catalogue, session=SESSION)
            raw, seen = _last_pair(pipe)
            raw_tokens, engineered_tokens, calls = (
                raw_tokens + raw, engineered_tokens + seen, calls + 1)
            call_id = reply.tool_calls[0].id
            new = [{"role": "tool", "tool_call_id": call_id, "content": result}]
            if result == INJECTION:
                injected_turn = number
        backend.say(turn.answer)
        pipe(new, tools=catalogue, session=SESSION)
        raw, seen = _last_pair(pipe)
        raw_tokens, engineered_tokens, calls = raw_tokens + raw, engineered_tokens + seen, calls + 1
        if injected_turn is not None and INJECTION_MARK in prompt_text(backend.seen[-1]).lower():
            injection_seen_after = True
        rows.append({"turn": number, "calls": calls, "passthrough": raw_tokens,
                     "engineered": engineered_tokens})
    seconds = time.perf_counter() - t0

    final = backend.seen[-1]
    kept = facts_kept(prompt_text(final))
    quarantine = [s for s in pipe.stages if getattr(s, "name", "") == "quarantine"]
    records = quarantine[0].records() if quarantine else []
    injection_stored = any(INJECTION_MARK in (r.content or "").lower() for r in records)
    total_raw = sum(r["passthrough"] for r in rows)
    total_eng = sum(r["engineered"] for r in rows)
    tool_schema_raw = count_messages([], parse_tools(catalogue))
    return {
        "turns": len(rows),
        "model_calls": sum(r["calls"] for r in rows),
        "tools": len(catalogue),
        "passthrough_tokens": total_raw,
        "engineered_tokens": total_eng,
        "token_reduction": round(total_raw / max(total_eng, 1), 2),
        "final_turn_passthrough": rows[-1]["passthrough"],
        "final_turn_engineered": rows[-1]["engineered"],
        "tool_schema_tokens_passthrough": tool_schema_raw,
        "fact_retention": round(sum(kept.values()) / len(kept), 3),
        "facts_missing": [k for k, v in kept.items() if not v],
        "injection_quarantined": bool(injection_stored and not injection_seen_after),
        "quarantined_items": len(records),
        "quarantine_reasons": sorted({r.detector for r in records}),
        "seconds": round(seconds, 2),
        "per_turn": rows,
    }


def _last_pair(pipe: Pipeline) -> tuple[int, int]:
    """(passthrough, engineered) cl100k prompt tokens of the call just made."""
    assert pipe.ledger is not None
    row = pipe.ledger.rows()[-1]
    return int(row["cl100k_raw_prompt"]), int(row["cl100k_prompt"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.parse_args(argv)
    console = Console()
    result = run()
    table = Table(title="Agent trace: cl100k prompt tokens per turn (40 turns, 200 tools)")
    for col in ("turn", "calls", "passthrough", "engineered", "ratio"):
        table.add_column(col, justify="right")
    for r in result["per_turn"]:
        table.add_row(str(r["turn"]), str(r["calls"]), f"{r['passthrough']:,}",
                      f"{r['engineered']:,}", f"{r['passthrough'] / max(r['engineered'], 1):.1f}x")
    console.print(table)
    console.print(
        f"total passthrough {result['passthrough_tokens']:,} vs engineered "
        f"{result['engineered_tokens']:,}: [bold]{result['token_reduction']}x[/] fewer tokens "
        f"(target >= 5x)\nfact retention at the final turn: [bold]{result['fact_retention']:.0%}[/] "
        f"of {len(FACTS)} (target >= 95%); missing: {result['facts_missing'] or 'none'}\n"
        f"injection quarantined: [bold]{result['injection_quarantined']}[/] "
        f"({result['quarantined_items']} items quarantined: {', '.join(result['quarantine_reasons'])})"
        f"\nwall time {result['seconds']} s for {result['model_calls']} calls"
    )
    path = write_results("agent_trace", result)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
