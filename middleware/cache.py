"""The response cache: exact, then semantic; a stage, and a standalone object.

    cache = ResponseCache(Cache(similarity=0.86), path="cache.db")
    cache.put(messages, "Paris.")                 # a chat app, no model involved
    cache.get(messages2)                          # -> Reply | None

Lookup (`lookup_call`): the query is the latest user turn; everything else the
answer depends on goes into the context fingerprint (cache_keys.fingerprint),
which names the *bucket* an entry lives in. First the exact key (bucket +
normalized query) is tried, then the query's embedding is searched among the
bucket's entries only; a candidate counts when its cosine is at or above the
threshold (the policy's, or a learned one) and, with `guard`, the key-term
check finds nothing that tells the two queries apart.

Storing (`store_call`) refuses replies that must not be reused: errors and
invalid tool calls, empty replies, replies built on quarantined content,
sampled replies (unless the policy allows them), and replies calling a tool the
policy marks as having side effects. Every refusal is in the trace.

Entries live in SQLite (memory/cache_entries.py) or Redis (memory/cache_redis.py);
the per-bucket FAISS indexes are derived from them: kept in step by replaying
the entries' change log (so other processes' writes show up), saved to
`index_dir` now and then, and rebuilt from the entries when a saved copy is
missing, damaged or too far behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from contextwise.memory.cache_entries import CacheEntries, CacheEntry, EntryFilter
from contextwise.memory.store import Store
from contextwise.middleware.base import ANext, Next, Stage
from contextwise.middleware.cache_keys import (
    exact_key,
    fingerprint,
    guard,
    latest_user_index,
)
from contextwise.middleware.context import embedder_getter

from contextwise.errors import InputError
from contextwise.policy import Cache
from contextwise.types import Call, Message, Reply, Usage

__all__ = ["CacheKey", "CacheStage", "Hit", "ResponseCache"]

EXACT_LIMIT = 8192  # a bucket past this many entries gets an IVF index (sub-ms at 100k)
CANDIDATES = 4  # nearest stored queries checked per lookup
SAVE_EVERY = 2000  # index changes between saves of the index to disk
PRUNE_EVERY = 256  # puts between TTL sweeps
SYNONYM_SIMILARITY = 0.62  # guard: two words this close count as the same term
ADAPTIVE_GRID = np.round(np.arange(0.70, 0.995, 0.005), 3)
MIN_THRESHOLD_FEEDBACK = 20  # adaptive: verified hits needed before moving the threshold


@dataclass
class Hit:
    """A cache answer: the reply, how it matched, and the entry it came from."""

    reply: Reply
    kind: Literal["exact", "semantic"]
    similarity: float
    entry_id: int
    query: str  # the stored query that matched


@dataclass(frozen=True)
class CacheKey:
    """Where a call's answer lives: scope, context fingerprint (the bucket) and query."""

    namespace: str
    bucket: str
    query: str

    @property
    def exact(self) -> str:
        return exact_key(self.bucket, self.query)


class _BucketIndex:
    """One FAISS index per bucket, fed from the entries' change log."""

    def __init__(self, dim: int):
        self.dim = dim
        self.buckets: dict[str, Any] = {}
        self.where: dict[int, str] = {}
        self.seq = 0
        self.changes = 0  # since the last save

    def add(self, entry_id: int, bucket: str, vector: np.ndarray) -> None:
        from contextwise.retrievers.index import VectorIndex

        old = self.where.get(entry_id)
        if old is not None and old != bucket:
            self.remove(entry_id)
        index = self.buckets.get(bucket)
        if index is None:
            index = self.buckets[bucket] = VectorIndex(
                self.dim, exact_limit=EXACT_LIMIT, use_gpu=False)
        index.add([entry_id], vector.reshape(1, -1))
        self.where[entry_id] = bucket
        self.changes += 1

    def remove(self, entry_id: int) -> None:
        bucket = self.where.pop(entry_id, None)
        if bucket is None:
            return
        index = self.buckets[bucket]
        index.remove([entry_id])
        if not len(index):
            del self.buckets[bucket]
        self.changes += 1

    def search(self, bucket: str, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        index = self.buckets.get(bucket)
        if index is None:
            return []
        scores, ids = index.search(vector.reshape(1, -1), k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def __len__(self) -> int:
        return len(self.where)

    # -- persistence: a manifest naming one file per bucket, replaced atomically

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, str] = {}
        # unique names: another process may be saving into the same folder right now
        token = f"{self.seq}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for bucket, index in list(self.buckets.items()):
            name = f"b-{hashlib.sha256(bucket.encode()).hexdigest()[:16]}-{token}.npz"
            index.save(folder / name)
            files[bucket] = name
        manifest = {"format": "contextwise.cache_index", "version": 1, "dim": self.dim,
                    "seq": self.seq, "buckets": files}
        fd, tmp = tempfile.mkstemp(prefix="manifest.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f)
        os.replace(tmp, folder / "manifest.json")
        keep = set(files.values()) | {"manifest.json"}
        for old in folder.iterdir():
            if old.name not in keep and not old.name.endswith(".tmp"):
                old.unlink(missing_ok=True)
        self.changes = 0

    @classmethod
    def load(cls, folder: Path, dim: int) -> _BucketIndex | None:
        """The saved index, or None when there is none or it cannot be read."""
        from contextwise.retrievers.index import VectorIndex

        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            if manifest.get("format") != "contextwise.cache_index" or manifest["dim"] != dim:
                return None
            self = cls(dim)
            for bucket, name in manifest["buckets"].items():
                index = VectorIndex.load(folder / name, use_gpu=False)
                self.buckets[bucket] = index
                for i in index.ids().tolist():
                    self.where[int(i)] = bucket
            self.seq = int(manifest["seq"])
            return self
        except (OSError, ValueError, KeyError, TypeError):
            return None


class ResponseCache:
    """Exact + semantic reply cache over SQLite (or Redis) and per-bucket FAISS indexes.

    `path`/`store` pick the SQLite file (default: `Store()`'s); `embedder` is an
    `Embedder` or a getter (default: the shared MiniLM, loaded on first semantic
    use); `model` is the model identity baked into every fingerprint.
    """

    def __init__(
        self,
        policy: Cache | Mapping[str, Any] | None = None,
        *,
        store: Store | None = None,
        path: str | Path | None = None,
        embedder: Any = None,
        model: str = "",
        entries: Any = None,
        clock: Callable[[], float] = time.time,
    ):
        if isinstance(policy, Mapping):
            policy = Cache(**policy)
        self.policy = policy or Cache()
        self.model = model
        self.clock = clock
        if entries is None and self.policy.backend == "redis":
            from contextwise.memory.cache_redis import RedisCacheEntries

            if not self.policy.redis_url:
                raise InputError("cache.redis_url", "is required when cache.backend is 'redis'")
            entries = RedisCacheEntries(self.policy.redis_url)
        if entries is None:
            store = store or Store(path)
        self.store = store
        self.entries = entries or CacheEntries(store)  # type: ignore[arg-type]
        self._embedder = embedder_getter(embedder)
        self._index: _BucketIndex | None = None
        self._lock = threading.RLock()
        self._puts = 0
        self._threshold_memo: float | None = None
        self._word_vectors: dict[str, np.ndarray] = {}
        self.counts = {"exact_hits": 0, "semantic_hits": 0, "misses": 0, "stored": 0,
                       "refused": 0, "guard_rejections": 0}
        self.index_dir = self._index_dir(store)
        weakref.finalize(self, ResponseCache._save_on_exit, weakref.ref(self))

    # ------------------------------------------------------------------ standalone API

    def get(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        tools: Sequence[Any] | None = None,
        *,
        session: str | None = None,
        user: str | None = None,
        **params: Any,
    ) -> Reply | None:
        """The cached reply for this conversation, or None."""
        hit = self.lookup(messages, tools, session=session, user=user, **params)
        return hit.reply if hit else None

    def lookup(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        tools: Sequence[Any] | None = None,
        *,
        session: str | None = None,
        user: str | None = None,
        **params: Any,
    ) -> Hit | None:
        """Like `get`, with how it matched (for feedback on semantic hits)."""
        return self.lookup_call(Call.build(messages, tools, session=session, user=user, **params))

    def put(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        reply: Reply | Message | Mapping[str, Any] | str,
        tools: Sequence[Any] | None = None,
        *,
        session: str | None = None,
        user: str | None = None,
        **params: Any,
    ) -> int | None:
        """Store `reply` as the answer to `messages`; returns the entry id, or None if refused."""
        call = Call.build(messages, tools, session=session, user=user, **params)
        return self.store_call(call, _as_reply(reply, self.model))

    # ------------------------------------------------------------------ the two halves

    def key(self, call: Call) -> CacheKey:
        """The call's cache key; the stage computes it once for its lookup and its store."""
        q = latest_user_index(call.messages)
        query = call.messages[q].content or "" if q is not None else ""
        namespace = self._namespace(call)
        return CacheKey(namespace, fingerprint(call, model=self.model, namespace=namespace),
                        query)

    def lookup_call(self, call: Call, key: CacheKey | None = None) -> Hit | None:
        started = time.perf_counter()
        why = self._unusable(call)
        if why:
            call.trace.add("cache", hit=None, skipped=why)
            return None
        key = key or self.key(call)
        query, bucket = key.query, key.bucket
        now = self.clock()
        entry = self.entries.by_key(key.exact)
        if entry is not None and not self._expired(entry, now):
            return self._serve(call, entry, "exact", 1.0, now, started)
        if self.policy.semantic:
            vector = self._embed(query)
            self._sync()
            threshold = self._global_threshold()
            assert self._index is not None
            for entry_id, score in self._index.search(bucket, vector, CANDIDATES):
                if score < threshold:  # per-entry thresholds only ever sit higher
                    break
                entry = self.entries.get(entry_id)
                # the bucket check guards against an index file another process replaced
                if entry is None or entry.bucket != bucket or self._expired(entry, now):
                    continue
                needed = max(threshold, entry.threshold or 0.0)
                if score < needed:
                    continue
                if self.policy.guard:
                    reason = guard(query, entry.query, word_similarity=self._word_similarity,
                                   synonym_similarity=SYNONYM_SIMILARITY)
                    if reason:
                        self.counts["guard_rejections"] += 1
                        call.trace.add("cache", hit=None, rejected=entry_id,
                                       similarity=round(score, 4), reason=reason)
                        continue
                return self._serve(call, entry, "semantic", score, now, started)
        self.counts["misses"] += 1
        call.trace.add("cache", hit=None,
                       lookup_ms=round((time.perf_counter() - started) * 1e3, 3))
        return None

    def store_call(self, call: Call, reply: Reply, key: CacheKey | None = None) -> int | None:
        why = self._unusable(call) or self._uncacheable(call, reply)
        if why:
            self.counts["refused"] += 1
            call.trace.add("cache", stored=False, reason=why)
            return None
        key = key or self.key(call)
        tools = sorted({t.name for t in call.tools} | {c.name for c in reply.tool_calls})
        body = reply.model_dump(include={"message", "model", "finish_reason"}, mode="json")
        vector = self._embed(key.query) if self.policy.semantic else None
        entry = CacheEntry(
            bucket=key.bucket, exact_key=key.exact, namespace=key.namespace,
            query=key.query, reply=json.dumps(body), vector=vector, session=call.session,
            user=call.user, tools=tools, model=reply.model or self.model, created=self.clock(),
            prompt_tokens=reply.usage.prompt_tokens,
            completion_tokens=reply.usage.completion_tokens, latency_s=reply.latency_s,
        )
        with self._lock:
            entry_id = self.entries.put(entry)
            self.counts["stored"] += 1
            self._puts += 1
            if self._puts % PRUNE_EVERY == 0:
                self.entries.expire(self.policy.ttl_s, self.clock())
            self.entries.evict(max_entries=self.policy.max_entries,
                               max_bytes=self.policy.max_bytes, order=self.policy.eviction)
        call.trace.add("cache", stored=True, entry=entry_id)
        if self._index is not None and self._index.changes >= SAVE_EVERY:
            self.save_index()
        return entry_id

    # ------------------------------------------------------------------ feedback

    def feedback(self, hit: Hit | int, correct: bool, similarity: float | None = None) -> None:
        """Report whether a served hit was right. Always recorded; with an adaptive
        threshold a wrong hit raises that entry's threshold above its similarity, and
        the policy-wide threshold moves to the lowest value whose verified error rate
        stays under `target_error_rate`."""
        entry_id = hit.entry_id if isinstance(hit, Hit) else int(hit)
        sim = hit.similarity if isinstance(hit, Hit) else similarity
        if sim is None:
            raise InputError("similarity", "is needed when feedback is given by entry id")
        self.entries.add_feedback(entry_id, sim, correct)
        self._threshold_memo = None
        if self.policy.threshold == "adaptive" and not correct:
            entry = self.entries.get(entry_id)
            if entry is not None:
                self.entries.set_threshold(
                    entry_id, min(1.0, max(entry.threshold or 0.0, sim + 0.005)))
        if not correct and sim >= 0.9999:  # an exact hit was wrong: it must not be served again
            self.entries.delete([entry_id])

    def threshold(self) -> float:
        """The policy-wide similarity threshold in force now."""
        return self._global_threshold()

    # ------------------------------------------------------------------ invalidation

    def invalidate(
        self,
        *,
        session: str | None = None,
        user: str | None = None,
        tool: str | None = None,
        older_than_s: float | None = None,
        namespace: str | None = None,
        predicate: Callable[[CacheEntry], bool] | None = None,
        everything: bool = False,
    ) -> int:
        """Delete matching entries (all filters must hold); returns how many went."""
        filters = self._filter(session, user, tool, older_than_s, namespace)
        if filters.empty() and predicate is None and not everything:
            raise InputError("invalidate", "give a filter (session, user, tool, older_than_s, "
                             "namespace, predicate) or everything=True")
        return len(self.entries.purge(filters, predicate))

    def list(
        self,
        limit: int = 50,
        *,
        session: str | None = None,
        user: str | None = None,
        tool: str | None = None,
        older_than_s: float | None = None,
        namespace: str | None = None,
    ) -> list[CacheEntry]:
        """Entries matching the filters, most recently used first."""
        return self.entries.list(self._filter(session, user, tool, older_than_s, namespace),
                                 limit=limit)

    def _filter(self, session: str | None, user: str | None, tool: str | None,
                older_than_s: float | None, namespace: str | None) -> EntryFilter:
        before = None if older_than_s is None else self.clock() - older_than_s
        return EntryFilter(session, user, tool, before, namespace)

    def stats(self) -> dict[str, Any]:
        out = dict(self.entries.stats())
        out.update(self.counts)
        out["threshold"] = self._global_threshold()
        return out

    def save_index(self) -> None:
        """Write the in-memory index to `index_dir` (it is also saved now and then)."""
        with self._lock:
            if self._index is not None and self.index_dir is not None:
                self._index.save(self.index_dir)

    def close(self) -> None:
        self.save_index()

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _save_on_exit(ref: Callable[[], ResponseCache | None]) -> None:
        cache = ref()
        if cache is not None:
            try:
                cache.save_index()
            except Exception:  # noqa: BLE001, S110  (never fail exit over a derived file)
                pass

    def _index_dir(self, store: Store | None) -> Path | None:
        if self.policy.index_dir:
            return Path(self.policy.index_dir)
        path = getattr(self.entries, "index_dir", None)
        if path is not None:
            return Path(path)
        if store is None or store.path == ":memory:":
            return None
        return Path(store.path + ".cache-index")

    def _namespace(self, call: Call) -> str:
        scope = self.policy.scope
        if scope == "user":
            return f"user:{call.user or ''}"
        if scope == "session":
            return f"session:{call.session or ''}"
        return "global"

    def _unusable(self, call: Call) -> str | None:
        """Why this call must not be served from (or stored in) the cache."""
        if latest_user_index(call.messages) is None:
            return "no user query"
        p = call.params
        if p.temperature > 0 and p.seed is None and not self.policy.cache_sampled:
            return "sampled (temperature > 0, no seed)"
        return None

    def _uncacheable(self, call: Call, reply: Reply) -> str | None:
        from contextwise.middleware.quarantine import PLACEHOLDER

        if reply.finish_reason in ("error", "cancelled") or reply.invalid_tool_calls:
            return "error reply"
        if not reply.text.strip() and not reply.tool_calls:
            return "empty reply"
        if any(r.get("flagged") or r.get("withheld") for r in call.trace.of("quarantine")) or any(
            m.content and PLACEHOLDER.match(m.content.strip()) for m in call.messages
        ):
            return "built on quarantined content"
        side = set(self.policy.side_effect_tools) & {c.name for c in reply.tool_calls}
        if side:
            return f"calls a tool with side effects: {min(side)}"
        return None

    def _expired(self, entry: CacheEntry, now: float) -> bool:
        return self.policy.ttl_s is not None and now - entry.created > self.policy.ttl_s

    def _serve(self, call: Call, entry: CacheEntry, kind: Literal["exact", "semantic"],
               similarity: float, now: float, started: float) -> Hit:
        self.entries.touch(entry.id, now)
        self.counts[f"{kind}_hits"] += 1
        body = json.loads(entry.reply)
        message = Message.model_validate(body["message"])
        if message.tool_calls:  # a fresh id per served call: ids must not repeat across chats
            message = message.model_copy(update={"tool_calls": [
                tc.model_copy(update={"id": "call_" + uuid.uuid4().hex[:24]})
                for tc in message.tool_calls]})
        reply = Reply(
            message=message, model=body.get("model", ""),
            finish_reason=body.get("finish_reason", "stop"), usage=Usage(), trace=call.trace,
        )
        from contextwise.tokens import count_messages

        call.trace.add(
            "cache", hit=kind, entry=entry.id, similarity=round(similarity, 4),
            tokens_before=count_messages(call.messages, call.tools), tokens_after=0,
            saved_prompt_tokens=entry.prompt_tokens,
            saved_completion_tokens=entry.completion_tokens,
            saved_seconds=round(entry.latency_s, 4),
            lookup_ms=round((time.perf_counter() - started) * 1e3, 3),
        )
        return Hit(reply, kind, similarity, entry.id, entry.query)


    def _embed(self, text: str) -> np.ndarray:
        return np.asarray(self._embedder().embed_one(text), dtype=np.float32)

    def _word_similarity(self, a: str, b: str) -> float:
        missing = [w for w in (a, b) if w not in self._word_vectors]
        if missing:
            for w, v in zip(missing, self._embedder().embed(missing), strict=True):
                if len(self._word_vectors) > 50_000:
                    self._word_vectors.clear()
                self._word_vectors[w] = v
        return float(self._word_vectors[a] @ self._word_vectors[b])

    def _sync(self) -> None:
        """Bring the in-memory index up to the entries' change log."""
        with self._lock:
            if self._index is None:
                self._index = self._open_index()
            last = self.entries.last_seq()
            if last == self._index.seq:
                return
            log, gap = self.entries.log_since(self._index.seq)
            if gap:  # the log was trimmed past us: start over from the entries
                self._index = self._rebuild()
                return
            adds = [e for _, op, e, _ in log if op == "add"]
            vectors = self.entries.vectors_of(adds) if adds else {}
            for seq, op, entry_id, _ in log:
                if op == "add" and entry_id in vectors:
                    bucket, vec = vectors[entry_id]
                    self._index.add(entry_id, bucket, vec)
                elif op == "del":
                    self._index.remove(entry_id)
                self._index.seq = seq

    def _open_index(self) -> _BucketIndex:
        dim = int(self._embedder().dim)
        if self.index_dir is not None:
            saved = _BucketIndex.load(self.index_dir, dim)
            if saved is not None:
                _, gap = self.entries.log_since(saved.seq)
                if not gap and saved.seq <= self.entries.last_seq():
                    return saved
        return self._rebuild()

    def _rebuild(self) -> _BucketIndex:
        index = _BucketIndex(int(self._embedder().dim))
        index.seq = self.entries.last_seq()  # entries read after this include its changes
        for entry_id, bucket, vec in self.entries.vectors():
            index.add(entry_id, bucket, vec)
        return index

    def _global_threshold(self) -> float:
        if self.policy.threshold == "static":
            return self.policy.similarity
        if self._threshold_memo is None:
            self._threshold_memo = adaptive_threshold(
                self.entries.feedback(), self.policy.similarity, self.policy.target_error_rate)
        return self._threshold_memo


def adaptive_threshold(
    feedback: Sequence[tuple[float, bool]], start: float, target: float
) -> float:
    """The lowest threshold whose verified hits above it err at most `target` of the time.

    Hits are only observed above the threshold in force, so the data can only
    say where it is safe, not what lies below: with fewer than
    MIN_THRESHOLD_FEEDBACK verified hits the starting threshold stays, and the
    threshold never drops more than 0.02 below the lowest verified similarity.
    """
    if len(feedback) < MIN_THRESHOLD_FEEDBACK:
        wrong = [s for s, ok in feedback if not ok]
        return max([start] + [min(1.0, s + 0.005) for s in wrong])
    sims = np.asarray([s for s, _ in feedback], dtype=np.float64)
    bad = np.asarray([not ok for _, ok in feedback], dtype=bool)
    floor = float(sims.min()) - 0.02
    for t in ADAPTIVE_GRID:
        if t < floor:
            continue
        above = sims >= t
        n = int(above.sum())
        # (errors + 1) / (n + 1): no threshold is called safe on a handful of hits
        if n and (int(bad[above].sum()) + 1) / (n + 1) <= target:
            return float(t)
    return 1.0


def _as_reply(reply: Reply | Message | Mapping[str, Any] | str, model: str) -> Reply:
    if isinstance(reply, Reply):
        return reply
    if isinstance(reply, str):
        return Reply(message=Message(role="assistant", content=reply), model=model)
    if isinstance(reply, Message):
        return Reply(message=reply, model=model)
    if isinstance(reply, Mapping):
        return Reply(message=Message.from_openai({"role": "assistant", **reply}), model=model)
    raise InputError("reply", f"must be a str, Message, Reply or message dict, "
                              f"got {type(reply).__name__}")


class CacheStage(Stage):
    """The cache as a pipeline stage: answer a hit without calling `next`, store a miss."""

    name = "cache"

    def __init__(self, policy: Cache, *, cache: ResponseCache | None = None, **kwargs: Any):
        self.policy = policy
        self.cache = cache or ResponseCache(policy, **kwargs)

    def __call__(self, call: Call, next: Next) -> Reply:
        if call.cache == "skip":
            return next(call)
        key = self.cache.key(call)
        hit = self.cache.lookup_call(call, key) if call.cache == "use" else None
        if hit is not None:
            _replay_stream(call, hit.reply)
            return hit.reply
        reply = next(call)
        self.cache.store_call(call, reply, key)
        return reply

    async def acall(self, call: Call, anext: ANext) -> Reply:
        import asyncio

        if call.cache == "skip":
            return await anext(call)
        key = self.cache.key(call)
        hit = (await asyncio.to_thread(self.cache.lookup_call, call, key)
               if call.cache == "use" else None)
        if hit is not None:
            _replay_stream(call, hit.reply)
            return hit.reply
        reply = await anext(call)
        await asyncio.to_thread(self.cache.store_call, call, reply, key)
        return reply


def _replay_stream(call: Call, reply: Reply) -> None:
    """A streaming caller gets the cached text as deltas (words), adding up to the reply."""
    if call.on_delta is None or not reply.text:
        return
    text, start = reply.text, 0
    while start < len(text):
        end = text.find(" ", start + 1)
        end = len(text) if end < 0 else end
        call.on_delta(text[start:end])
        start = end
