"""Response-cache entries in SQLite: the source of truth the vector index is rebuilt from.

Tables in the store:

- `cache_entries`: one row per cached reply: its bucket (scope + context
  fingerprint), exact key, the query as asked, the reply (JSON), the query's
  embedding (float32 blob; NULL for exact-only entries), who and what it
  belongs to (session, user, the tools it mentions), use counts for LRU/LFU,
  its size, an optional learned threshold, and what a hit saves.
- `cache_log`: every insert and delete, written by triggers, so a process's
  in-memory index (or one saved to disk) catches up by replaying the log from
  the last sequence number it saw, whichever process or CLI made the change.
- `cache_meta`: running entry and byte totals (kept by the same triggers), so
  the eviction check on each put does not scan the table.
- `cache_feedback`: verified hits (similarity, correct or not) the adaptive
  threshold learns from.

Every write is one transaction; the WAL journal makes several processes safe.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from contextwise.memory.store import Store

__all__ = ["LOG_KEEP", "CacheEntries", "CacheEntry", "EntryFilter"]

LOG_KEEP = 200_000  # log rows kept; a reader further behind rebuilds from the entries

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS cache_entries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        bucket TEXT NOT NULL,             -- scope + context fingerprint: who may share it
        exact_key TEXT NOT NULL UNIQUE,   -- bucket + normalized query
        namespace TEXT NOT NULL,          -- 'global', 'user:<id>' or 'session:<id>'
        query TEXT NOT NULL,              -- the latest user turn, as asked
        reply TEXT NOT NULL,              -- the Reply as JSON
        vector BLOB,                      -- float32 query embedding; NULL: exact only
        session TEXT,
        user TEXT,
        tools TEXT NOT NULL DEFAULT '[]', -- JSON list: tools offered or called
        model TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        last_used REAL NOT NULL,
        hits INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL,
        threshold REAL,                   -- learned per-entry threshold; NULL: the policy's
        prompt_tokens INTEGER NOT NULL DEFAULT 0,     -- what one hit saves
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        latency_s REAL NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS cache_entries_lru ON cache_entries (last_used)",
    "CREATE INDEX IF NOT EXISTS cache_entries_lfu ON cache_entries (hits, last_used)",
    "CREATE INDEX IF NOT EXISTS cache_entries_created ON cache_entries (created)",
    "CREATE INDEX IF NOT EXISTS cache_entries_session ON cache_entries (session)",
    """CREATE TABLE IF NOT EXISTS cache_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        op TEXT NOT NULL,                 -- 'add' or 'del'
        entry_id INTEGER NOT NULL,
        bucket TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS cache_meta (
        k TEXT PRIMARY KEY, v INTEGER NOT NULL
    )""",
    "INSERT OR IGNORE INTO cache_meta (k, v) VALUES ('entries', 0), ('bytes', 0)",
    """CREATE TRIGGER IF NOT EXISTS cache_entries_added AFTER INSERT ON cache_entries BEGIN
        INSERT INTO cache_log (op, entry_id, bucket) VALUES ('add', NEW.id, NEW.bucket);
        UPDATE cache_meta SET v = v + 1 WHERE k = 'entries';
        UPDATE cache_meta SET v = v + NEW.bytes WHERE k = 'bytes';
    END""",
    """CREATE TRIGGER IF NOT EXISTS cache_entries_deleted AFTER DELETE ON cache_entries BEGIN
        INSERT INTO cache_log (op, entry_id, bucket) VALUES ('del', OLD.id, OLD.bucket);
        UPDATE cache_meta SET v = v - 1 WHERE k = 'entries';
        UPDATE cache_meta SET v = v - OLD.bytes WHERE k = 'bytes';
    END""",
    """CREATE TABLE IF NOT EXISTS cache_feedback (
        entry_id INTEGER NOT NULL,
        similarity REAL NOT NULL,
        correct INTEGER NOT NULL,
        ts REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS cache_feedback_entry ON cache_feedback (entry_id)",
]

_COLUMNS = ("id, bucket, exact_key, namespace, query, reply, vector, session, user, tools, "
            "model, created, last_used, hits, bytes, threshold, prompt_tokens, "
            "completion_tokens, latency_s")


@dataclass
class CacheEntry:
    """One cached reply (see the module doc for the fields)."""

    bucket: str
    exact_key: str
    namespace: str
    query: str
    reply: str
    vector: np.ndarray | None = None
    session: str | None = None
    user: str | None = None
    tools: list[str] = field(default_factory=list)
    model: str = ""
    created: float = 0.0
    last_used: float = 0.0
    hits: int = 0
    bytes: int = 0
    threshold: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    id: int = 0

    def summary(self) -> dict[str, Any]:
        """The entry as a plain dict without the vector (for listings and JSON)."""
        out = {k: v for k, v in self.__dict__.items() if k != "vector"}
        out["semantic"] = self.vector is not None
        return out


@dataclass(frozen=True)
class EntryFilter:
    """Which entries an invalidation or listing touches; every field set must hold."""

    session: str | None = None
    user: str | None = None
    tool: str | None = None
    created_before: float | None = None
    namespace: str | None = None

    def empty(self) -> bool:
        return all(v is None for v in self.__dict__.values())

    def matches(self, e: CacheEntry) -> bool:
        return ((self.session is None or e.session == self.session)
                and (self.user is None or e.user == self.user)
                and (self.tool is None or self.tool in e.tools)
                and (self.created_before is None or e.created < self.created_before)
                and (self.namespace is None or e.namespace == self.namespace))

    def sql(self) -> tuple[str, list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("session", self.session), ("user", self.user),
                              ("namespace", self.namespace)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if self.tool is not None:
            where.append("EXISTS (SELECT 1 FROM json_each(tools) WHERE value = ?)")
            params.append(self.tool)
        if self.created_before is not None:
            where.append("created < ?")
            params.append(self.created_before)
        return " AND ".join(where) or "1", params


def _delete_ids(db: Any, ids: Sequence[int]) -> int:
    """Delete these entries inside the caller's transaction, in chunks of 500 (SQLite's
    host-parameter limit); the triggers log each one."""
    n = 0
    for start in range(0, len(ids), 500):
        chunk = list(ids[start:start + 500])
        marks = ",".join("?" * len(chunk))
        n += db.execute(f"DELETE FROM cache_entries WHERE id IN ({marks})", chunk).rowcount
    return n


def _row_entry(row: Any) -> CacheEntry:
    vec = row["vector"]
    return CacheEntry(
        id=row["id"], bucket=row["bucket"], exact_key=row["exact_key"],
        namespace=row["namespace"], query=row["query"], reply=row["reply"],
        vector=None if vec is None else np.frombuffer(vec, dtype=np.float32).copy(),
        session=row["session"], user=row["user"], tools=json.loads(row["tools"]),
        model=row["model"], created=row["created"], last_used=row["last_used"],
        hits=row["hits"], bytes=row["bytes"], threshold=row["threshold"],
        prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"],
        latency_s=row["latency_s"],
    )


class CacheEntries:
    """Cache rows in a `Store`; every method is one transaction."""

    def __init__(self, store: Store):
        self.store = store
        store.ensure_schema("cache", 1, SCHEMA)

    # -- writes

    def put(self, entry: CacheEntry) -> int:
        """Insert `entry` (replacing one with the same exact key); returns its id."""
        return self.put_many([entry])[0]

    def put_many(self, entries: Sequence[CacheEntry]) -> list[int]:
        """Insert several entries in one transaction (bulk loads); returns their ids."""
        ids = []
        with self.store.transaction() as db:
            for entry in entries:
                vec = (None if entry.vector is None
                       else np.asarray(entry.vector, np.float32).tobytes())
                entry.bytes = len(entry.query.encode()) + len(entry.reply.encode()) + len(
                    vec or b"")
                now = entry.created or time.time()
                db.execute("DELETE FROM cache_entries WHERE exact_key = ?", (entry.exact_key,))
                cur = db.execute(
                    f"INSERT INTO cache_entries ({_COLUMNS.removeprefix('id, ')}) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (entry.bucket, entry.exact_key, entry.namespace, entry.query, entry.reply,
                     vec, entry.session, entry.user, json.dumps(entry.tools), entry.model, now,
                     now, entry.hits, entry.bytes, entry.threshold, entry.prompt_tokens,
                     entry.completion_tokens, entry.latency_s),
                )
                entry.id = int(cur.lastrowid or 0)
                entry.created = entry.last_used = now
                ids.append(entry.id)
        return ids

    def touch(self, entry_id: int, now: float | None = None) -> None:
        """Count a hit: LRU and LFU order."""
        self.store.execute(
            "UPDATE cache_entries SET hits = hits + 1, last_used = ? WHERE id = ?",
            (now or time.time(), entry_id),
        )

    def set_threshold(self, entry_id: int, threshold: float | None) -> None:
        self.store.execute("UPDATE cache_entries SET threshold = ? WHERE id = ?",
                           (threshold, entry_id))

    def delete(self, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        with self.store.transaction() as db:
            return _delete_ids(db, ids)

    def evict(self, *, max_entries: int, max_bytes: int | None, order: str) -> list[int]:
        """Drop entries past the caps, least recently (lru) or least often (lfu) used first."""
        by = "last_used" if order == "lru" else "hits, last_used"
        with self.store.transaction() as db:
            count, size = self._totals(db)
            if count <= max_entries and (max_bytes is None or size <= max_bytes):
                return []
            doomed: list[int] = []
            for row in db.execute(f"SELECT id, bytes FROM cache_entries ORDER BY {by}, id"):
                if count <= max_entries and (max_bytes is None or size <= max_bytes):
                    break
                doomed.append(row["id"])
                count -= 1
                size -= row["bytes"]
            _delete_ids(db, doomed)
            return doomed

    def expire(self, ttl_s: float | None, now: float | None = None) -> list[int]:
        """Delete entries created more than `ttl_s` ago."""
        if ttl_s is None:
            return []
        return self.purge(EntryFilter(created_before=(now or time.time()) - ttl_s))

    def purge(
        self,
        filters: EntryFilter | None = None,
        predicate: Callable[[CacheEntry], bool] | None = None,
    ) -> list[int]:
        """Delete the entries matching `filters` (and `predicate`); returns their ids."""
        where, params = (filters or EntryFilter()).sql()
        with self.store.transaction() as db:
            if predicate is None:
                ids = [r[0] for r in db.execute(
                    f"SELECT id FROM cache_entries WHERE {where}", params)]
            else:
                ids = [e.id for e in map(_row_entry, db.execute(
                    f"SELECT {_COLUMNS} FROM cache_entries WHERE {where}", params))
                       if predicate(e)]
            _delete_ids(db, ids)
            if ids:
                db.execute("DELETE FROM cache_log "
                           "WHERE seq <= (SELECT MAX(seq) FROM cache_log) - ?", (LOG_KEEP,))
            return ids

    def add_feedback(self, entry_id: int, similarity: float, correct: bool) -> None:
        self.store.execute(
            "INSERT INTO cache_feedback (entry_id, similarity, correct, ts) VALUES (?,?,?,?)",
            (entry_id, float(similarity), int(bool(correct)), time.time()),
        )

    def trim_log(self) -> None:
        self.store.execute(
            "DELETE FROM cache_log WHERE seq <= (SELECT MAX(seq) FROM cache_log) - ?", (LOG_KEEP,)
        )

    # -- reads

    def by_key(self, exact_key: str) -> CacheEntry | None:
        rows = self.store.query(f"SELECT {_COLUMNS} FROM cache_entries WHERE exact_key = ?",
                                (exact_key,))
        return _row_entry(rows[0]) if rows else None

    def get(self, entry_id: int) -> CacheEntry | None:
        rows = self.store.query(f"SELECT {_COLUMNS} FROM cache_entries WHERE id = ?", (entry_id,))
        return _row_entry(rows[0]) if rows else None

    def feedback(self, entry_id: int | None = None) -> list[tuple[float, bool]]:
        """Verified hits (similarity, correct) of one entry, or of all entries."""
        if entry_id is None:
            rows = self.store.query("SELECT similarity, correct FROM cache_feedback")
        else:
            rows = self.store.query(
                "SELECT similarity, correct FROM cache_feedback WHERE entry_id = ?", (entry_id,))
        return [(r[0], bool(r[1])) for r in rows]

    def vectors(self, since_id: int = 0) -> Iterator[tuple[int, str, np.ndarray]]:
        """(id, bucket, vector) of every semantic entry, in id order."""
        rows = self.store.query(
            "SELECT id, bucket, vector FROM cache_entries WHERE vector IS NOT NULL AND id > ? "
            "ORDER BY id", (since_id,))
        for r in rows:
            yield r[0], r[1], np.frombuffer(r[2], dtype=np.float32)

    def vectors_of(self, ids: Sequence[int]) -> dict[int, tuple[str, np.ndarray]]:
        out: dict[int, tuple[str, np.ndarray]] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            rows = self.store.query(
                f"SELECT id, bucket, vector FROM cache_entries WHERE vector IS NOT NULL "
                f"AND id IN ({','.join('?' * len(chunk))})", chunk)
            out.update({r[0]: (r[1], np.frombuffer(r[2], dtype=np.float32)) for r in rows})
        return out

    def log_since(self, seq: int) -> tuple[list[tuple[int, str, int, str]], bool]:
        """Log rows after `seq`, and whether rows the reader needs were trimmed already."""
        rows = self.store.query(
            "SELECT seq, op, entry_id, bucket FROM cache_log WHERE seq > ? ORDER BY seq", (seq,))
        (first,) = self.store.query("SELECT MIN(seq) FROM cache_log")
        # seqs are contiguous (AUTOINCREMENT, rolled-back inserts roll back the counter
        # too), so a first row past seq + 1 means rows were trimmed before we read them
        gap = first[0] is not None and first[0] > seq + 1
        return [(r[0], r[1], r[2], r[3]) for r in rows], bool(gap)

    def last_seq(self) -> int:
        (row,) = self.store.query("SELECT COALESCE(MAX(seq), 0) FROM cache_log")
        return int(row[0])

    def totals(self) -> tuple[int, int]:
        with self.store.transaction() as db:
            return self._totals(db)

    @staticmethod
    def _totals(db: Any) -> tuple[int, int]:
        rows = dict(db.execute("SELECT k, v FROM cache_meta").fetchall())
        return int(rows.get("entries", 0)), int(rows.get("bytes", 0))

    def list(self, filters: EntryFilter | None = None, limit: int = 50) -> list[CacheEntry]:
        """Matching entries, most recently used first."""
        where, params = (filters or EntryFilter()).sql()
        return [_row_entry(r) for r in self.store.query(
            f"SELECT {_COLUMNS} FROM cache_entries WHERE {where} "
            "ORDER BY last_used DESC, id DESC LIMIT ?", (*params, limit))]

    def stats(self) -> dict[str, Any]:
        (row,) = self.store.query(
            """SELECT COUNT(*) AS entries, COALESCE(SUM(bytes), 0) AS bytes,
                      COALESCE(SUM(hits), 0) AS hits,
                      COALESCE(SUM(vector IS NOT NULL), 0) AS semantic_entries,
                      COUNT(DISTINCT bucket) AS buckets,
                      MIN(created) AS oldest, MAX(last_used) AS last_used,
                      COALESCE(SUM(hits * prompt_tokens), 0) AS prompt_tokens_saved,
                      COALESCE(SUM(hits * completion_tokens), 0) AS completion_tokens_saved,
                      COALESCE(SUM(hits * latency_s), 0) AS seconds_saved
               FROM cache_entries""")
        return dict(row)
