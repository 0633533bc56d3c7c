"""Stage overhead: milliseconds the context stages add to a call, model time excluded.

    python -m benchmarks.stage_overhead [--calls 200]

The default policy's stages (quarantine, summarize (extractive), prune, tool
loadout, budget fit) run as one onion around a backend that answers at once,
on calls with 200 tools and a 30-message history taken from the agent scenario.
Every call carries a new user question, so the query is embedded each time
(the history and the tool catalogue were seen before and come from the
memos, as they do in a live session). Warm-up calls (embedder and tool index
load) are excluded and reported separately. Writes p50/p95 per call and the
share of each stage to benchmarks/results/stage_overhead.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from contextwise.memory.store import Store
from contextwise.middleware.base import compose
from contextwise.retrievers.embedder import get_embedder
from rich.console import Console
from rich.table import Table

from benchmarks.agent_scenario import tools, turns
from benchmarks.common import write_results
from contextwise.pipeline import build_stages
from contextwise.policy import Budget, Policy, Summarize
from contextwise.types import Call, Message, Reply, ToolCall

QUESTIONS = [
    "What's the weather in Lisbon on day {i}?", "Convert {i}0 EUR to USD please",
    "Find a vegetarian place for dinner number {i}", "Which tram goes to Belem, option {i}?",
    "Book {i} museum tickets for Saturday", "Is there a flight back on the {i}th?",
    "Remind me of my hotel for night {i}", "Any jazz bars open late, list {i}?",
]


def history(n: int = 30) -> list[dict[str, Any]]:
    """The first n messages of the scripted session (tool calls with their results)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": "You are a travel agent."}]
    for turn in turns():
        out.append({"role": "user", "content": turn.user})
        for k, (name, args, result) in enumerate(turn.steps):
            tc = ToolCall(id=f"call_{len(out)}_{k}", name=name, arguments=args)
            out.append(Message(role="assistant", tool_calls=[tc]).to_openai())
            out.append({"role": "tool", "tool_call_id": tc.id, "content": result})
        out.append({"role": "assistant", "content": turn.answer})
        if len(out) >= n:
            break
    # End on an assistant message so the next user question starts a turn.
    out = out[:n]
    while out[-1]["role"] != "assistant" or out[-1].get("tool_calls"):
        out.pop()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args(argv)
    console = Console()

    policy = Policy(summarize=Summarize(mode="extractive"), budget=Budget(max_context_tokens=8192))
    stages = build_stages(policy, store=Store(":memory:"))
    timings: dict[str, list[float]] = {getattr(s, "name", "?"): [] for s in stages}
    timed = [_timed(s, timings[getattr(s, "name", "?")]) for s in stages]
    onion = compose(timed, lambda call: Reply(message=Message(role="assistant", content="ok")))
    catalogue = tools()
    base = history(30)

    def one(i: int) -> float:
        question = QUESTIONS[i % len(QUESTIONS)].format(i=i)
        call = Call.build([*base, {"role": "user", "content": question}], tools=catalogue,
                          session="overhead", max_tokens=256)
        t = time.perf_counter()
        onion(call)
        return (time.perf_counter() - t) * 1000

    t = time.perf_counter()
    get_embedder()
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    one(-1)  # builds the tool index, embeds the history once
    first_ms = (time.perf_counter() - t) * 1000
    for v in timings.values():
        v.clear()
    per_call = [one(i) for i in range(args.calls)]

    def pct(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else xs[0]

    embed_ms = _embed_cost(args.calls)
    table = Table(title=f"Stage overhead per call (200 tools, {len(base) + 1} messages, "
                        f"{args.calls} calls, new question each)")
    for col in ("stage", "p50 ms", "p95 ms"):
        table.add_column(col, justify="right")
    for name, xs in timings.items():
        table.add_row(name, f"{pct(xs, 50):.2f}", f"{pct(xs, 95):.2f}")
    table.add_row("[bold]all stages[/]", f"{pct(per_call, 50):.2f}", f"{pct(per_call, 95):.2f}")
    console.print(table)
    result = {
        "p50_ms": round(pct(per_call, 50), 2),
        "p95_ms": round(pct(per_call, 95), 2),
        "mean_ms": round(statistics.fmean(per_call), 2),
        "query_embedding_p50_ms": round(embed_ms, 2),
        "first_call_ms": round(first_ms, 1),
        "embedder_load_s": round(load_s, 2),
        "calls": args.calls,
        "tools": len(catalogue),
        "messages": len(base) + 1,
        **{f"{name}_p50_ms": round(pct(xs, 50), 3) for name, xs in timings.items()},
    }
    console.print(
        f"p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms per call (target p50 <= 10 ms); "
        f"of which embedding the new question ~{result['query_embedding_p50_ms']} ms; "
        f"first call (index build) {result['first_call_ms']} ms"
    )
    console.print(f"wrote {write_results('stage_overhead', result)}")


def _timed(stage: Any, sink: list[float]) -> Any:
    """Wrap a stage to time its own work, excluding the stages inside it."""

    def run(call: Call, next: Any) -> Reply:
        inner = 0.0

        def timed_next(c: Call) -> Reply:
            nonlocal inner
            t = time.perf_counter()
            r = next(c)
            inner += time.perf_counter() - t
            return r

        t = time.perf_counter()
        reply = stage(call, timed_next)
        sink.append((time.perf_counter() - t - inner) * 1000)
        return reply

    return run


def _embed_cost(n: int) -> float:
    e = get_embedder()
    xs = []
    for i in range(min(n, 50)):
        t = time.perf_counter()
        e.embed_one(f"a fresh question about the trip, variant {i} {time.time()}")
        xs.append((time.perf_counter() - t) * 1000)
    return statistics.median(xs)


if __name__ == "__main__":
    main()
