"""The SQLite store every piece of persistent state lives in.

One file, WAL journal (readers never block the writer, a crash loses at most
the transaction in flight), a busy timeout so several processes can share it.
Components (conversations, ledger, ...) declare their own tables through
`ensure_schema`; the store knows nothing about what they hold.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Store", "default_home"]

BUSY_TIMEOUT_MS = 10_000  # wait this long for another process's write lock


def default_home() -> Path:
    """$CONTEXTWISE_HOME, else ~/.contextwise: the store and other state."""
    return Path(os.environ.get("CONTEXTWISE_HOME") or Path.home() / ".contextwise")


class Store:
    """A thread-safe handle on one SQLite database file (or ':memory:')."""

    def __init__(self, path: str | Path | None = None):
        if path is None:
            path = default_home() / "contextwise.db"
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves in transaction().
        self._conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
        )
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            if self.path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER)"
            )

    def ensure_schema(self, component: str, version: int, ddl: Sequence[str]) -> None:
        """Create a component's tables once; a newer version on disk is an error."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT version FROM schema_versions WHERE component=?", (component,)
            ).fetchone()
            if row is not None and row[0] > version:
                raise RuntimeError(
                    f"{self.path}: {component} schema is version {row[0]}, this contextwise "
                    f"knows {version}; upgrade contextwise"
                )
            if row is None or row[0] < version:
                for stmt in ddl:
                    db.execute(stmt)
                db.execute(
                    "INSERT OR REPLACE INTO schema_versions (component, version) VALUES (?, ?)",
                    (component, version),
                )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error), one thread at a time."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write statement in its own transaction; returns rows changed."""
        with self.transaction() as db:
            return db.execute(sql, params).rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()
