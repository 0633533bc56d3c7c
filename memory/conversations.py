"""Per-session conversation memory: the messages of each session, in order."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from contextwise.memory.store import Store

from contextwise.types import Message

__all__ = ["Conversations"]

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS conversation_messages (
        session TEXT NOT NULL,
        seq INTEGER NOT NULL,
        message TEXT NOT NULL,      -- the message as OpenAI JSON
        created REAL NOT NULL,
        PRIMARY KEY (session, seq)
    )""",
]


class Conversations:
    """Append-only message history per session id."""

    def __init__(self, store: Store):
        self.store = store
        store.ensure_schema("conversations", 1, SCHEMA)

    def history(self, session: str) -> list[Message]:
        rows = self.store.query(
            "SELECT message FROM conversation_messages WHERE session=? ORDER BY seq", (session,)
        )
        return [Message.model_validate(json.loads(r[0])) for r in rows]

    def append(self, session: str, messages: Iterable[Message]) -> None:
        now = time.time()
        with self.store.transaction() as db:
            (last,) = db.execute(
                "SELECT COALESCE(MAX(seq), -1) FROM conversation_messages WHERE session=?",
                (session,),
            ).fetchone()
            db.executemany(
                "INSERT INTO conversation_messages (session, seq, message, created) VALUES (?,?,?,?)",
                [
                    (session, last + 1 + i, json.dumps(m.to_openai()), now)
                    for i, m in enumerate(messages)
                ],
            )

    def sessions(self) -> list[str]:
        return [r[0] for r in self.store.query(
            "SELECT DISTINCT session FROM conversation_messages ORDER BY session")]

    def clear(self, session: str) -> int:
        return self.store.execute("DELETE FROM conversation_messages WHERE session=?", (session,))
