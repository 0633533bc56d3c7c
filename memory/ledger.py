"""The ledger: one row per call (tokens, latency, model, trace) and the cost report.

"raw" figures are what the request would have cost passed straight through
(the full incoming conversation and every tool); the others are what the model
actually saw. Counts are the serving model's tokens; the cl100k columns count
the same text for hosted-model cost estimates.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from contextwise.memory.store import Store

from contextwise.types import Call, Reply

__all__ = ["CallRecord", "Ledger"]

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS ledger_calls (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,                 -- unix seconds
        session TEXT,
        model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,   -- what the model saw
        completion_tokens INTEGER NOT NULL,
        raw_prompt_tokens INTEGER NOT NULL, -- passthrough: what it would have seen
        cl100k_prompt INTEGER NOT NULL,
        cl100k_raw_prompt INTEGER NOT NULL,
        cl100k_completion INTEGER NOT NULL,
        latency_s REAL NOT NULL,
        finish_reason TEXT NOT NULL,
        trace TEXT NOT NULL               -- JSON list of {stage, data}
    )""",
    "CREATE INDEX IF NOT EXISTS ledger_calls_ts ON ledger_calls (ts)",
]


@dataclass(frozen=True)
class CallRecord:
    session: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    raw_prompt_tokens: int
    cl100k_prompt: int
    cl100k_raw_prompt: int
    cl100k_completion: int
    latency_s: float
    finish_reason: str
    trace: list[dict[str, Any]]


class Ledger:
    def __init__(self, store: Store):
        self.store = store
        store.ensure_schema("ledger", 1, SCHEMA)

    def record(self, raw: Call, seen: Call, reply: Reply, raw_prompt_tokens: int) -> None:
        """`raw`: the call as it came in; `seen`: the call the model got."""
        from contextwise.tokens import count_messages, count_text

        self.add(CallRecord(
            session=raw.session,
            model=reply.model,
            prompt_tokens=reply.usage.prompt_tokens,
            completion_tokens=reply.usage.completion_tokens,
            raw_prompt_tokens=raw_prompt_tokens,
            cl100k_prompt=count_messages(seen.messages, seen.tools),
            cl100k_raw_prompt=count_messages(raw.messages, raw.tools),
            cl100k_completion=count_text(reply.text)
            + sum(count_text(json.dumps(tc.arguments)) for tc in reply.tool_calls),
            latency_s=reply.latency_s,
            finish_reason=reply.finish_reason,
            trace=[r.model_dump() for r in reply.trace.records],
        ))

    def add(self, rec: CallRecord) -> None:
        self.store.execute(
            """INSERT INTO ledger_calls (ts, session, model, prompt_tokens, completion_tokens,
               raw_prompt_tokens, cl100k_prompt, cl100k_raw_prompt, cl100k_completion,
               latency_s, finish_reason, trace) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)""",
            (time.time(), rec.session, rec.model, rec.prompt_tokens, rec.completion_tokens,
             rec.raw_prompt_tokens, rec.cl100k_prompt, rec.cl100k_raw_prompt,
             rec.cl100k_completion, rec.latency_s, rec.finish_reason, json.dumps(rec.trace)),
        )

    def rows(self, since: float = 0.0) -> list[dict[str, Any]]:
        rows = self.store.query("SELECT * FROM ledger_calls WHERE ts >= ? ORDER BY id", (since,))
        return [{**dict(r), "trace": json.loads(r["trace"])} for r in rows]

    def totals(self, since: float = 0.0) -> dict[str, Any]:
        (row,) = self.store.query(
            """SELECT COUNT(*) AS calls,
                      COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens,
                      COALESCE(SUM(completion_tokens), 0) AS completion_tokens,
                      COALESCE(SUM(raw_prompt_tokens), 0) AS raw_prompt_tokens,
                      COALESCE(SUM(cl100k_prompt), 0) AS cl100k_prompt,
                      COALESCE(SUM(cl100k_raw_prompt), 0) AS cl100k_raw_prompt,
                      COALESCE(SUM(cl100k_completion), 0) AS cl100k_completion,
                      COALESCE(SUM(latency_s), 0) AS latency_s
               FROM ledger_calls WHERE ts >= ?""",
            (since,),
        )
        return dict(row)

    def per_stage(self, since: float = 0.0) -> dict[str, dict[str, float]]:
        """Per stage: calls it touched and prompt tokens it saved (before - after)."""
        out: dict[str, dict[str, float]] = {}
        for row in self.rows(since):
            for rec in row["trace"]:
                data = rec.get("data", {})
                s = out.setdefault(rec["stage"], {"calls": 0, "tokens_saved": 0})
                s["calls"] += 1
                if "tokens_before" in data and "tokens_after" in data:
                    s["tokens_saved"] += data["tokens_before"] - data["tokens_after"]
        return out

    def clear(self) -> int:
        return self.store.execute("DELETE FROM ledger_calls")
