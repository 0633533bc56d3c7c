"""Per-session running summaries: what the summarize stage folded, and how far it got.

A summary is rewritten incrementally: each call reads only the messages the
stored summary does not cover yet. So next to the text we keep how many
messages it covers, `anchors` (short keys of the last covered messages, which
let the stage find where the summary ends even after other stages dropped
messages before it) and the pinned facts, stored apart from the text so that
rewriting the text can never lose them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from contextwise.memory.store import Store

from contextwise.errors import InputError

__all__ = ["Summaries", "Summary"]

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS summaries (
        session TEXT PRIMARY KEY,
        text TEXT NOT NULL,             -- the running summary (without pinned facts)
        covered INTEGER NOT NULL,       -- messages after the head it covers
        pinned TEXT NOT NULL,           -- JSON list of sentences kept verbatim
        anchors TEXT NOT NULL,          -- JSON list of keys of the last covered messages
        updated REAL NOT NULL
    )""",
]


@dataclass(frozen=True)
class Summary:
    """One session's running summary."""

    session: str
    text: str
    covered: int
    pinned: list[str] = field(default_factory=list)
    anchors: list[str] = field(default_factory=list)
    updated: float = 0.0


def _session(session: object) -> str:
    if not isinstance(session, str) or not session:
        raise InputError("session", f"must be a non-empty string, got {session!r}")
    return session


class Summaries:
    """`get(session)`, `put(session, text, covered, ...)`, `clear(session)` over a Store."""

    def __init__(self, store: Store):
        self.store = store
        store.ensure_schema("summaries", 1, SCHEMA)

    def get(self, session: str) -> Summary | None:
        rows = self.store.query(
            "SELECT text, covered, pinned, anchors, updated FROM summaries WHERE session=?",
            (_session(session),),
        )
        if not rows:
            return None
        r = rows[0]
        return Summary(session, r[0], int(r[1]), json.loads(r[2]), json.loads(r[3]), float(r[4]))

    def put(
        self,
        session: str,
        text: str,
        covered: int,
        *,
        pinned: Sequence[str] = (),
        anchors: Sequence[str] = (),
    ) -> Summary:
        """Replace the session's summary (one atomic write)."""
        session = _session(session)
        if not isinstance(text, str):
            raise InputError("text", f"must be a string, got {type(text).__name__}")
        if not isinstance(covered, int) or isinstance(covered, bool) or covered < 0:
            raise InputError("covered", f"must be a non-negative integer, got {covered!r}")
        now = time.time()
        self.store.execute(
            "INSERT OR REPLACE INTO summaries (session, text, covered, pinned, anchors, updated) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (session, text, covered, json.dumps(list(pinned)), json.dumps(list(anchors)), now),
        )
        return Summary(session, text, covered, list(pinned), list(anchors), now)

    def clear(self, session: str) -> bool:
        """Forget the session's summary; True when there was one."""
        return self.store.execute("DELETE FROM summaries WHERE session=?",
                                  (_session(session),)) > 0

    def sessions(self) -> list[str]:
        return [r[0] for r in self.store.query("SELECT session FROM summaries ORDER BY session")]
