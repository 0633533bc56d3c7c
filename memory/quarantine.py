"""Quarantine records: content a detector withheld from the model, kept so a person can review it.

A flagged item (a tool result carrying a prompt injection, a stack trace, a
contradicting value, a blob) is stored here with why it was flagged, and the
model sees a short placeholder carrying the record's id ("q12"). A person lists
and reads records (`contextwise quarantine list/show`) and may release one:
released content is trusted and goes back into later calls.

Two tables in the store:

- `quarantine`: one row per flagged item (the original content, its hash,
  detector, reason, score, where it came from, released flag and time);
- `quarantine_seen`: (session, item key) of items that were scanned and found
  clean, so a long conversation is scanned once, not on every call.

An *item key* is a hash of everything a verdict depends on (role, tool name,
arguments, content); the *content hash* is the SHA-256 of the content alone,
for `find_by_hash`.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import re
import time
from typing import Any

from contextwise.memory.store import Store
from pydantic import BaseModel, Field

from contextwise.errors import InputError

__all__ = ["QuarantineNotFound", "QuarantineRecord", "QuarantineStore", "content_hash"]

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS quarantine (
        n INTEGER PRIMARY KEY AUTOINCREMENT,   -- the id is "q" + n
        created REAL NOT NULL,
        session TEXT,                          -- NULL: a call without a session
        role TEXT NOT NULL,
        tool TEXT,
        tool_call_id TEXT,
        arguments TEXT,                        -- the tool call's arguments as JSON
        detector TEXT NOT NULL,
        reason TEXT NOT NULL,
        score REAL NOT NULL,
        content TEXT NOT NULL,                 -- the original, withheld content
        content_hash TEXT NOT NULL,
        item_key TEXT,
        released INTEGER NOT NULL DEFAULT 0,
        released_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS quarantine_hash ON quarantine (content_hash)",
    "CREATE INDEX IF NOT EXISTS quarantine_key ON quarantine (item_key, session)",
    """CREATE TABLE IF NOT EXISTS quarantine_seen (
        session TEXT NOT NULL,                 -- '' for calls without a session
        item_key TEXT NOT NULL,
        seen REAL NOT NULL,
        PRIMARY KEY (session, item_key)
    )""",
]
_ID = re.compile(r"^q(\d+)$")
_COLUMNS = ("n, created, session, role, tool, tool_call_id, arguments, detector, reason, score, "
            "content, content_hash, item_key, released, released_at")


def content_hash(text: str) -> str:
    """SHA-256 of the content (hex): the same text always has the same hash."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class QuarantineNotFound(InputError):
    """No quarantine record has this id."""

    def __init__(self, id: str):
        super().__init__("id", f"no quarantined item {id!r} (see `contextwise quarantine list`)")


class QuarantineRecord(BaseModel):
    """One withheld item and why it was withheld."""

    id: str
    created: float
    session: str | None = None
    role: str = "tool"
    tool: str | None = None
    tool_call_id: str | None = None
    arguments: dict[str, Any] = Field(default_factory=dict)
    detector: str
    reason: str
    score: float = 1.0
    content: str
    content_hash: str
    item_key: str | None = None
    released: bool = False
    released_at: float | None = None


def _row(r: Any) -> QuarantineRecord:
    return QuarantineRecord(
        id=f"q{r['n']}", created=r["created"], session=r["session"], role=r["role"],
        tool=r["tool"], tool_call_id=r["tool_call_id"],
        arguments=json.loads(r["arguments"]) if r["arguments"] else {},
        detector=r["detector"], reason=r["reason"], score=r["score"], content=r["content"],
        content_hash=r["content_hash"], item_key=r["item_key"], released=bool(r["released"]),
        released_at=r["released_at"],
    )


def _number(id: str) -> int:
    m = _ID.match(id.strip()) if isinstance(id, str) else None
    if m is None:
        raise InputError("id", f"{id!r} is not a quarantine id (they look like 'q12')")
    return int(m.group(1))


class QuarantineStore:
    """Add, look up, list, release and purge quarantine records in a `Store`."""

    def __init__(self, store: Store):
        self.store = store
        store.ensure_schema("quarantine", 1, SCHEMA)

    # -- records

    def add(
        self,
        *,
        content: str,
        detector: str,
        reason: str,
        score: float = 1.0,
        session: str | None = None,
        role: str = "tool",
        tool: str | None = None,
        tool_call_id: str | None = None,
        arguments: dict[str, Any] | None = None,
        item_key: str | None = None,
    ) -> QuarantineRecord:
        now = time.time()
        digest = content_hash(content)
        args_json = json.dumps(arguments, sort_keys=True, default=str) if arguments else None
        with self.store.transaction() as db:
            cur = db.execute(
                "INSERT INTO quarantine (created, session, role, tool, tool_call_id, arguments, "
                "detector, reason, score, content, content_hash, item_key) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (now, session, role, tool, tool_call_id, args_json, detector, reason,
                 float(score), content, digest, item_key),
            )
            n = cur.lastrowid
        return QuarantineRecord(
            id=f"q{n}", created=now, session=session, role=role, tool=tool,
            tool_call_id=tool_call_id, arguments=dict(arguments or {}), detector=detector,
            reason=reason, score=float(score), content=content, content_hash=digest,
            item_key=item_key,
        )

    def get(self, id: str) -> QuarantineRecord | None:
        """The record with this id, or None. A malformed id raises InputError."""
        rows = self.store.query(f"SELECT {_COLUMNS} FROM quarantine WHERE n=?", (_number(id),))
        return _row(rows[0]) if rows else None

    def require(self, id: str) -> QuarantineRecord:
        """Like `get`, but an unknown id raises `QuarantineNotFound`."""
        record = self.get(id)
        if record is None:
            raise QuarantineNotFound(id)
        return record

    def list(
        self, session: str | None = None, include_released: bool = False, limit: int | None = 100
    ) -> list[QuarantineRecord]:
        """Newest first; `session` filters, released records only with `include_released`."""
        where: list[str] = []
        params: list[Any] = []
        if session is not None:
            where.append("session=?")
            params.append(session)
        if not include_released:
            where.append("released=0")
        sql = f"SELECT {_COLUMNS} FROM quarantine"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY n DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [_row(r) for r in self.store.query(sql, params)]

    def release(self, id: str) -> QuarantineRecord:
        """Mark a record released (its content is trusted from now on); idempotent."""
        record = self.require(id)
        if not record.released:
            now = time.time()
            self.store.execute("UPDATE quarantine SET released=1, released_at=? WHERE n=?",
                               (now, _number(id)))
            record = record.model_copy(update={"released": True, "released_at": now})
        return record

    def find_by_hash(self, digest: str) -> builtins.list[QuarantineRecord]:
        """Every record whose content has this SHA-256 (oldest first)."""
        rows = self.store.query(
            f"SELECT {_COLUMNS} FROM quarantine WHERE content_hash=? ORDER BY n", (digest,))
        return [_row(r) for r in rows]

    def find_by_key(self, item_key: str, session: str | None) -> QuarantineRecord | None:
        """The newest record of this item in this session (None session: sessionless calls)."""
        rows = self.store.query(
            f"SELECT {_COLUMNS} FROM quarantine WHERE item_key=? AND session IS ? "
            "ORDER BY n DESC LIMIT 1", (item_key, session))
        return _row(rows[0]) if rows else None

    def purge(
        self,
        *,
        session: str | None = None,
        older_than_s: float | None = None,
        released_only: bool = False,
    ) -> int:
        """Delete records (and clean verdicts) matching every filter given; returns records
        deleted. With no filter at all everything goes."""
        cutoff = None if older_than_s is None else time.time() - older_than_s

        def scope(time_column: str, *extra: str) -> tuple[str, list[Any]]:
            where = list(extra)  # `extra` conditions take no parameters
            params: list[Any] = []
            if session is not None:
                where.append("session=?")
                params.append(session)
            if cutoff is not None:
                where.append(f"{time_column}<?")
                params.append(cutoff)
            return (" WHERE " + " AND ".join(where)) if where else "", params

        with self.store.transaction() as db:
            clause, params = scope("created", *(["released=1"] if released_only else []))
            n = db.execute(f"DELETE FROM quarantine{clause}", params).rowcount
            if not released_only:  # verdicts for the same scope go too
                clause, params = scope("seen")
                db.execute(f"DELETE FROM quarantine_seen{clause}", params)
        return n

    # -- clean verdicts (memo of items scanned and found clean)

    def mark_clean(self, session: str | None, item_key: str) -> None:
        self.store.execute(
            "INSERT OR REPLACE INTO quarantine_seen (session, item_key, seen) VALUES (?,?,?)",
            (session or "", item_key, time.time()))

    def is_clean(self, session: str | None, item_key: str) -> bool:
        return bool(self.store.query(
            "SELECT 1 FROM quarantine_seen WHERE session=? AND item_key=?",
            (session or "", item_key)))
