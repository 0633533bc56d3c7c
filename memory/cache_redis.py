"""Response-cache entries in Redis: one cache shared by many processes or hosts.

The same contract as `CacheEntries` (SQLite), so `ResponseCache` takes either.
Redis holds the entries and a change log; each process keeps its own FAISS
index per bucket and catches up by replaying the log, exactly as with SQLite.
(Vector search inside Redis needs the RediSearch 2.4+ module, which the Debian
redis-server does not ship; this layout needs plain Redis 6+ only.)

Keys under `prefix` (default "contextwise:cache:"):

- `e:<id>` a hash per entry (vector as float32 bytes), `k:<exact_key>` -> id;
- `lru`, `lfu`, `created`: sorted sets of ids for eviction order and age;
- `log`: sorted set of "<seq>:<op>:<id>:<bucket>" scored by seq; `seq`, `next_id`;
- `bytes`: running size; `fb`: list of verified hits "id:similarity:correct".

Writes that touch several keys run as Lua scripts, so they are atomic.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from contextwise.memory.cache_entries import LOG_KEEP, CacheEntry, EntryFilter
from contextwise.memory.store import default_home

from contextwise.errors import ContextwiseError

__all__ = ["RedisCacheEntries"]

_FIELDS = ("bucket", "exact_key", "namespace", "query", "reply", "vector", "session", "user",
           "tools", "model", "created", "last_used", "hits", "bytes", "threshold",
           "prompt_tokens", "completion_tokens", "latency_s")

# KEYS: none (prefix in ARGV[1]); deletes entry ids ARGV[2..], logging each.
_DELETE = """
local p = ARGV[1]
local n = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local e = p .. 'e:' .. id
  local f = redis.call('HMGET', e, 'bucket', 'exact_key', 'bytes')
  if f[1] then
    redis.call('DEL', e)
    if redis.call('GET', p .. 'k:' .. f[2]) == id then redis.call('DEL', p .. 'k:' .. f[2]) end
    redis.call('ZREM', p .. 'lru', id)
    redis.call('ZREM', p .. 'lfu', id)
    redis.call('ZREM', p .. 'created', id)
    redis.call('DECRBY', p .. 'bytes', tonumber(f[3]))
    local s = redis.call('INCR', p .. 'seq')
    redis.call('ZADD', p .. 'log', s, s .. ':del:' .. id .. ':' .. f[1])
    n = n + 1
  end
end
return n
"""

# ARGV: prefix, exact_key, bucket, bytes, created, then field/value pairs. Returns the id.
_PUT = """
local p = ARGV[1]
local old = redis.call('GET', p .. 'k:' .. ARGV[2])
if old then
  local f = redis.call('HMGET', p .. 'e:' .. old, 'bucket', 'bytes')
  redis.call('DEL', p .. 'e:' .. old)
  redis.call('ZREM', p .. 'lru', old)
  redis.call('ZREM', p .. 'lfu', old)
  redis.call('ZREM', p .. 'created', old)
  if f[2] then redis.call('DECRBY', p .. 'bytes', tonumber(f[2])) end
  local s = redis.call('INCR', p .. 'seq')
  redis.call('ZADD', p .. 'log', s, s .. ':del:' .. old .. ':' .. (f[1] or ''))
end
local id = redis.call('INCR', p .. 'next_id')
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', p .. 'e:' .. id, unpack(fields))
redis.call('SET', p .. 'k:' .. ARGV[2], id)
redis.call('ZADD', p .. 'lru', tonumber(ARGV[5]), id)
redis.call('ZADD', p .. 'lfu', tonumber(ARGV[5]) / 1e10, id)
redis.call('ZADD', p .. 'created', tonumber(ARGV[5]), id)
redis.call('INCRBY', p .. 'bytes', tonumber(ARGV[4]))
local s = redis.call('INCR', p .. 'seq')
redis.call('ZADD', p .. 'log', s, s .. ':add:' .. id .. ':' .. ARGV[3])
return id
"""

# ARGV: prefix, id, now. Counts a hit (LFU score: hits, then recency).
_TOUCH = """
local p = ARGV[1]
local e = p .. 'e:' .. ARGV[2]
if redis.call('EXISTS', e) == 0 then return 0 end
local hits = redis.call('HINCRBY', e, 'hits', 1)
redis.call('HSET', e, 'last_used', ARGV[3])
redis.call('ZADD', p .. 'lru', tonumber(ARGV[3]), ARGV[2])
redis.call('ZADD', p .. 'lfu', hits + tonumber(ARGV[3]) / 1e10, ARGV[2])
return hits
"""


class RedisCacheEntries:
    """Cache rows in Redis (see the module doc); every write is atomic."""

    def __init__(self, url: str, prefix: str = "contextwise:cache:", client: Any = None):
        try:
            import redis
        except ImportError:
            raise ContextwiseError(
                "the Redis cache backend needs the redis package: pip install 'contextwise[redis]'"
            ) from None
        self.url = url
        self.prefix = prefix
        # Any: redis-py types replies as bytes | str (decode_responses is a run-time option);
        # this code reads them as bytes, the default
        self.r: Any = client or redis.Redis.from_url(url)
        try:
            self.r.ping()
        except redis.RedisError as e:
            raise ContextwiseError(f"cannot reach Redis at {url}: {e}") from None
        self._put = self.r.register_script(_PUT)
        self._delete = self.r.register_script(_DELETE)
        self._touch = self.r.register_script(_TOUCH)
        key = hashlib.sha256(f"{url}|{prefix}".encode()).hexdigest()[:12]
        self.index_dir = default_home() / "cache-index" / f"redis-{key}"

    def _k(self, name: str) -> str:
        return self.prefix + name

    # -- writes

    def put(self, entry: CacheEntry) -> int:
        vec = None if entry.vector is None else np.asarray(entry.vector, np.float32).tobytes()
        entry.bytes = len(entry.query.encode()) + len(entry.reply.encode()) + len(vec or b"")
        now = entry.created or time.time()
        entry.created = entry.last_used = now
        values = {
            "bucket": entry.bucket, "exact_key": entry.exact_key, "namespace": entry.namespace,
            "query": entry.query, "reply": entry.reply, "vector": vec if vec is not None else b"",
            "session": entry.session if entry.session is not None else "\x00",
            "user": entry.user if entry.user is not None else "\x00",
            "tools": json.dumps(entry.tools), "model": entry.model, "created": repr(now),
            "last_used": repr(now), "hits": entry.hits, "bytes": entry.bytes,
            "threshold": "" if entry.threshold is None else repr(entry.threshold),
            "prompt_tokens": entry.prompt_tokens, "completion_tokens": entry.completion_tokens,
            "latency_s": repr(entry.latency_s),
        }
        flat: list[Any] = []
        for k, v in values.items():
            flat += [k, v]
        entry.id = int(self._put(args=[self.prefix, entry.exact_key, entry.bucket, entry.bytes,
                                       repr(now), *flat]))
        return entry.id

    def touch(self, entry_id: int, now: float | None = None) -> None:
        self._touch(args=[self.prefix, entry_id, repr(now or time.time())])

    def set_threshold(self, entry_id: int, threshold: float | None) -> None:
        if self.r.exists(self._k(f"e:{entry_id}")):
            self.r.hset(self._k(f"e:{entry_id}"), "threshold",
                        "" if threshold is None else repr(threshold))

    def delete(self, ids: Sequence[int]) -> int:
        n = 0
        for start in range(0, len(ids), 500):
            n += int(self._delete(args=[self.prefix, *ids[start:start + 500]]))
        return n

    def evict(self, *, max_entries: int, max_bytes: int | None, order: str) -> list[int]:
        count, size = self.totals()
        if count <= max_entries and (max_bytes is None or size <= max_bytes):
            return []
        zset = self._k("lru" if order == "lru" else "lfu")
        doomed: list[int] = []
        offset = 0
        while count > max_entries or (max_bytes is not None and size > max_bytes):
            batch = [int(i) for i in self.r.zrange(zset, offset, offset + 99)]
            if not batch:
                break
            offset += len(batch)
            sizes = self._pipe_hget(batch, "bytes")
            for entry_id, b in zip(batch, sizes, strict=True):
                if count <= max_entries and (max_bytes is None or size <= max_bytes):
                    break
                doomed.append(entry_id)
                count -= 1
                size -= int(b or 0)
        self.delete(doomed)
        return doomed

    def expire(self, ttl_s: float | None, now: float | None = None) -> list[int]:
        if ttl_s is None:
            return []
        cutoff = (now or time.time()) - ttl_s
        ids = [int(i) for i in self.r.zrangebyscore(self._k("created"), "-inf", f"({cutoff}")]
        self.delete(ids)
        return ids

    def purge(self, filters: EntryFilter | None = None,
              predicate: Callable[[CacheEntry], bool] | None = None) -> list[int]:
        filters = filters or EntryFilter()
        ids = [e.id for e in self._scan() if filters.matches(e) and (predicate is None or
                                                                    predicate(e))]
        self.delete(ids)
        if ids:
            self.trim_log()
        return ids

    def add_feedback(self, entry_id: int, similarity: float, correct: bool) -> None:
        self.r.rpush(self._k("fb"), f"{entry_id}:{float(similarity)!r}:{int(bool(correct))}")

    def trim_log(self) -> None:
        last = self.last_seq()
        self.r.zremrangebyscore(self._k("log"), "-inf", last - LOG_KEEP)

    # -- reads

    def by_key(self, exact_key: str) -> CacheEntry | None:
        entry_id = self.r.get(self._k(f"k:{exact_key}"))
        return None if entry_id is None else self.get(int(entry_id))

    def get(self, entry_id: int) -> CacheEntry | None:
        raw = self.r.hgetall(self._k(f"e:{entry_id}"))
        return _entry(entry_id, raw) if raw else None

    def feedback(self, entry_id: int | None = None) -> list[tuple[float, bool]]:
        out = []
        for item in self.r.lrange(self._k("fb"), 0, -1):
            eid, sim, ok = item.decode().split(":")
            if entry_id is None or int(eid) == entry_id:
                out.append((float(sim), ok == "1"))
        return out

    def vectors(self, since_id: int = 0) -> Iterator[tuple[int, str, np.ndarray]]:
        ids = sorted(int(i) for i in self.r.zrange(self._k("created"), 0, -1))
        ids = [i for i in ids if i > since_id]
        for start in range(0, len(ids), 500):
            for entry_id, (bucket, vec) in sorted(self.vectors_of(ids[start:start + 500]).items()):
                yield entry_id, bucket, vec

    def vectors_of(self, ids: Sequence[int]) -> dict[int, tuple[str, np.ndarray]]:
        pipe = self.r.pipeline(transaction=False)
        for entry_id in ids:
            pipe.hmget(self._k(f"e:{entry_id}"), "bucket", "vector")
        out = {}
        for entry_id, (bucket, vec) in zip(ids, pipe.execute(), strict=True):
            if bucket is not None and vec:
                out[int(entry_id)] = (bucket.decode(), np.frombuffer(vec, dtype=np.float32))
        return out

    def log_since(self, seq: int) -> tuple[list[tuple[int, str, int, str]], bool]:
        rows = []
        for member in self.r.zrangebyscore(self._k("log"), f"({seq}", "+inf"):
            s, op, entry_id, bucket = member.decode().split(":", 3)
            rows.append((int(s), op, int(entry_id), bucket))
        first = self.r.zrange(self._k("log"), 0, 0, withscores=True)
        gap = bool(first) and int(first[0][1]) > seq + 1
        return rows, gap

    def last_seq(self) -> int:
        return int(self.r.get(self._k("seq")) or 0)

    def totals(self) -> tuple[int, int]:
        pipe = self.r.pipeline(transaction=True)
        pipe.zcard(self._k("lru"))
        pipe.get(self._k("bytes"))
        count, size = pipe.execute()
        return int(count), int(size or 0)

    def list(self, filters: EntryFilter | None = None, limit: int = 50) -> list[CacheEntry]:
        filters = filters or EntryFilter()
        found = [e for e in self._scan() if filters.matches(e)]
        found.sort(key=lambda e: (e.last_used, e.id), reverse=True)
        return found[:limit]

    def stats(self) -> dict[str, Any]:
        entries = list(self._scan())
        return {
            "entries": len(entries),
            "bytes": sum(e.bytes for e in entries),
            "hits": sum(e.hits for e in entries),
            "semantic_entries": sum(e.vector is not None for e in entries),
            "buckets": len({e.bucket for e in entries}),
            "oldest": min((e.created for e in entries), default=None),
            "last_used": max((e.last_used for e in entries), default=None),
            "prompt_tokens_saved": sum(e.hits * e.prompt_tokens for e in entries),
            "completion_tokens_saved": sum(e.hits * e.completion_tokens for e in entries),
            "seconds_saved": sum(e.hits * e.latency_s for e in entries),
        }

    def clear(self) -> None:
        """Delete every key under the prefix (tests, `purge --all` on a dedicated prefix)."""
        for key in self.r.scan_iter(match=self.prefix + "*", count=1000):
            self.r.delete(key)

    def _scan(self) -> Iterator[CacheEntry]:
        ids = [int(i) for i in self.r.zrange(self._k("created"), 0, -1)]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            pipe = self.r.pipeline(transaction=False)
            for entry_id in chunk:
                pipe.hgetall(self._k(f"e:{entry_id}"))
            for entry_id, raw in zip(chunk, pipe.execute(), strict=True):
                if raw:
                    yield _entry(entry_id, raw)

    def _pipe_hget(self, ids: Sequence[int], field: str) -> builtins.list[Any]:
        pipe = self.r.pipeline(transaction=False)
        for entry_id in ids:
            pipe.hget(self._k(f"e:{entry_id}"), field)
        return list(pipe.execute())


def _entry(entry_id: int, raw: dict[bytes, bytes]) -> CacheEntry:
    f = {k.decode(): v for k, v in raw.items()}

    def text(name: str) -> str:
        return f[name].decode()

    def optional(name: str) -> str | None:
        value = text(name)
        return None if value == "\x00" else value

    vec = f.get("vector") or b""
    return CacheEntry(
        id=entry_id, bucket=text("bucket"), exact_key=text("exact_key"),
        namespace=text("namespace"), query=text("query"), reply=text("reply"),
        vector=np.frombuffer(vec, dtype=np.float32).copy() if vec else None,
        session=optional("session"), user=optional("user"), tools=json.loads(text("tools")),
        model=text("model"), created=float(text("created")), last_used=float(text("last_used")),
        hits=int(text("hits")), bytes=int(text("bytes")),
        threshold=float(text("threshold")) if text("threshold") else None,
        prompt_tokens=int(text("prompt_tokens")),
        completion_tokens=int(text("completion_tokens")), latency_s=float(text("latency_s")),
    )
