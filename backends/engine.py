"""Dynamic batching in front of a backend: a bounded queue, one worker, padded batches.

    engine = BatchingEngine(LocalBackend(), max_batch=16, max_wait_ms=5, max_queue=256)
    reply = engine.generate([call])[0]          # from any thread
    reply = (await engine.agenerate([call]))[0]  # from an event loop, never blocking it

Every call goes through one bounded queue (a full queue raises `Overloaded` at
once, it never grows without end) to one worker thread, which takes up to
`max_batch` requests at a time and runs them:

- Waiting: after the first request the worker waits for more until
  `max_wait_ms` pass without one (so a burst is taken whole, not cut where
  its first request's window ends: 256 callers' threads took more than 20 ms to
  arrive on the H100 host), at most `_BURST_WINDOWS` windows after the first,
  and no longer once `max_batch` are queued. It adapts to the arrival rate:
  when the last batch filled up it waits
  the full window; when requests arrive further apart than the window (an
  EWMA of the gaps, each counted as two windows at most: the pause before a
  burst is not a slow arrival rate) it does not wait at all and takes what is
  queued.
- Grouping: plain text calls with the same decoding class (greedy, or sampled
  with the same temperature and top_p and no seed) share one padded
  `model.generate` (left padding, attention mask). Calls that need grammar-
  constrained decoding (a forced tool call, a response_format), a seed, or
  whose system part the prefix KV cache takes (see `LocalBackend.system_prefix`;
  not with static decoding and `reuse_prefixes`: the slots reuse it, batched)
  run on the backend's own single-request path, still in queue order; so does a
  compatible group of one (which is where `Local(speculative="prompt_lookup")`
  applies: under load requests batch, a request that runs alone speculates). A
  backend that is not a `LocalBackend` gets each compatible group as one
  `generate(calls)` (the batch-native contract).
- Per row: its own `max_tokens`, stop strings (transformers' StopStringCriteria,
  as on the single path), stream (`call.on_delta`, held back like the single
  path's so the deltas add up to the final text) and cancellation: when a row's
  `on_delta` raises (`Cancelled`: the caller closed its stream) that row stops
  and its caller gets the error; the other rows go on. A row's Reply is handed
  back the moment the row finishes, not when the whole batch does.

Greedy batched output equals the single path's token for token, except where
padding changes float rounding enough to flip a near-tie (see tests/test_engine.py).

Static decoding (`static_decode`: "auto" = on for CUDA with a Llama-family
model, "on" also on CPU, "off"): the batchable requests go to a
`ContinuousRunner` over a `StaticDecoder` instead of a padded generate: KV-cache
slots (`max_batch`, or fewer if `kv_cache_mb` holds fewer), decode steps replayed
as CUDA graphs (`decode_steps` greedy tokens per replay), requests admitted into
free slots between chunks (continuous batching), and queued calls the slots
can't take run on the single path between chunks. With the backend's
`speculative="prompt_lookup"`, prompt lookup runs in the slots too: while at most
4 requests decode, greedy rows draft from their own context and one verify pass
checks all drafts (`speculative="draft"` applies on the single path only).
`decode_kernels="auto"` (the default: "triton" on CUDA, "torch" elsewhere or
with `compile_decode`) computes each decode layer, and prefills prompts of up to
1,024 tokens, with five fused Triton kernels (backends/triton_decode.py) instead
of PyTorch ops. A new request whose prompt starts (in whole 16-token blocks) like
what a slot's cache still holds, its own slot's from an earlier request or another
slot's, prefills only the rest (`reuse_prefixes`; backends/slot_prefixes.py): the
shared system prompt of agent traffic is computed once, not per request. Built on
the first batch; `stats()["static_decode"]` says "on" or why not,
`stats()["static"]` its counters (`prefill_tokens` computed, `reused_tokens` not
computed thanks to reuse, `copied_tokens` copied between slots; `kernels_note`
when the Triton kernels were asked for but could not run).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import gc
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Self

from contextwise.backends.base import Backend
from contextwise.backends.continuous import ContinuousRunner, Row, _Active
from contextwise.backends.local import LocalBackend, left_padded
from contextwise.backends.static_decode import KERNELS

from contextwise.errors import BackendError, ContextOverflow, InputError, Overloaded
from contextwise.types import Call, Message, Reply, Tool

__all__ = ["STATIC_MODES", "BatchingEngine"]

STATIC_MODES = ("auto", "on", "off")
MAX_STATIC_LEN = 4096  # longest sequence a static slot holds; longer calls take the single path
MIN_STATIC_LEN = 1024  # slots get no shorter than this when the KV budget is tight

_ALPHA = 0.3  # weight of the newest inter-arrival gap in the rate estimate
_GAP_CAP = 2  # gaps count as at most this many windows: an idle pause is not an arrival rate
_BURST_WINDOWS = 4  # a burst still arriving is waited for up to this many windows in all


@dataclass(eq=False)
class _Request:
    call: Call
    future: Future[Reply] = field(default_factory=Future)
    t_in: float = field(default_factory=time.perf_counter)
    ids: list[int] | None = None  # prompt token ids (local backend, batchable calls)


class BatchingEngine(Backend):
    """A `Backend` that queues calls and runs them in dynamic batches on `backend`.

    `max_batch` requests at most per batch; `max_wait_ms` how long the worker
    waits for another request before it runs what is queued (4 windows after the
    first at most); `max_queue` requests waiting at most (then
    `Overloaded`); the worker thread exits after `idle_exit_s` without work and
    starts again on the next call. Attributes the engine lacks (`model`,
    `tokenizer`, `loaded`, `prefix_cache`...) are the wrapped backend's.
    """

    def __init__(self, backend: Backend, max_batch: int = 16, max_wait_ms: float = 5.0,
                 max_queue: int = 256, idle_exit_s: float = 30.0, static_decode: str = "auto",
                 decode_steps: int = 8, cuda_graphs: bool = True,
                 kv_cache_mb: float | None = None, compile_decode: bool = False,
                 decode_kernels: str = "auto", reuse_prefixes: bool = True):
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1),
                                 ("max_wait_ms", max_wait_ms, 0), ("idle_exit_s", idle_exit_s, 0),
                                 ("decode_steps", decode_steps, 1)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
                raise InputError(name, f"must be a number >= {low}, got {value!r}")
        if static_decode not in STATIC_MODES:
            raise InputError("static_decode",
                             f"must be one of {STATIC_MODES}, got {static_decode!r}")
        if decode_kernels not in KERNELS:
            raise InputError("decode_kernels",
                             f"must be one of {KERNELS}, got {decode_kernels!r}")
        if not isinstance(reuse_prefixes, bool):
            raise InputError("reuse_prefixes", f"must be True or False, got {reuse_prefixes!r}")
        if kv_cache_mb is not None and (not isinstance(kv_cache_mb, (int, float))
                                        or isinstance(kv_cache_mb, bool) or kv_cache_mb <= 0):
            raise InputError("kv_cache_mb", f"must be a number > 0 or None, got {kv_cache_mb!r}")
        self.static_decode = static_decode
        self.decode_steps = int(decode_steps)
        self.cuda_graphs = bool(cuda_graphs)
        self.compile_decode = bool(compile_decode)
        self.decode_kernels = decode_kernels
        self.kv_cache_mb = kv_cache_mb
        self.reuse_prefixes = bool(reuse_prefixes)
        self._runner: ContinuousRunner | None = None
        self._static_reason: str | None = None  # why static decoding is off, once decided
        self.backend = backend
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1000
        self.max_queue = int(max_queue)
        self.idle_exit_s = float(idle_exit_s)
        self._local = _is_local(backend)
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._last_arrival: float | None = None
        self._gap_ewma: float | None = None  # seconds between arrivals, smoothed
        self._last_full = False
        self._stats = {"submitted": 0, "rejected": 0, "batches": 0, "batched_calls": 0,
                       "single_calls": 0, "largest_batch": 0, "waits": 0, "no_waits": 0}
        self._names = itertools.count(1)

    # -- what the pipeline reads, passed through

    @property  # type: ignore[override]
    def model_name(self) -> str:
        return self.backend.model_name

    @property  # type: ignore[override]
    def context_window(self) -> int:
        return self.backend.context_window

    @context_window.setter
    def context_window(self, value: int) -> None:
        self.backend.context_window = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "backend":
            raise AttributeError(name)
        return getattr(self.backend, name)

    def count_tokens(self, messages: Sequence[Message], tools: Iterable[Tool] = ()) -> int:
        return self.backend.count_tokens(messages, tools)

    def prompt_tokens(self, call: Call) -> int:
        return self.backend.prompt_tokens(call)

    # -- the Backend contract, through the queue

    def generate(self, calls: Sequence[Call]) -> list[Reply]:
        return [f.result() for f in self.submit(calls)]

    async def agenerate(self, calls: Sequence[Call]) -> list[Reply]:
        futures = self.submit(calls)  # a lock and an append: does not block the loop
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    def submit(self, calls: Sequence[Call]) -> list[Future[Reply]]:
        """Queue `calls` (all or none); one Future per call, in order."""
        reqs = [_Request(c) for c in calls]
        if not reqs:
            return []
        with self._cond:
            if self._closed:
                raise BackendError("the batching engine is closed")
            waiting = len(self._queue)
            if waiting + len(reqs) > self.max_queue:
                self._stats["rejected"] += len(reqs)
                raise Overloaded(f"queue full: {waiting} requests waiting "
                                 f"(max_queue={self.max_queue}); retry later")
            now = time.perf_counter()
            for _ in reqs:  # k calls at once: k arrivals, the last k - 1 after no gap
                if self._last_arrival is not None:
                    # capped: after a pause, a burst's first request must not read as
                    # sparse traffic (no wait, and the burst trickling in one by one)
                    gap = min(now - self._last_arrival, _GAP_CAP * self.max_wait_s)
                    self._gap_ewma = gap if self._gap_ewma is None else (
                        _ALPHA * gap + (1 - _ALPHA) * self._gap_ewma)
                self._last_arrival = now
            self._queue.extend(reqs)
            self._stats["submitted"] += len(reqs)
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._loop, daemon=True,
                    name=f"contextwise-engine-{next(self._names)}")
                self._worker.start()
            if waiting == 0 or len(self._queue) >= self.max_batch:
                # the worker waits for a first request, or for a full batch: waking it
                # for every arrival of a burst would make it fight the callers for the GIL
                self._cond.notify()
        return [r.future for r in reqs]

    def stats(self) -> dict[str, Any]:
        """Counters: submitted, rejected (Overloaded), batches (batched generates),
        batched_calls, single_calls, largest_batch, waits / no_waits (adaptive
        window decisions), queued (waiting now)."""
        with self._cond:
            out: dict[str, Any] = {**self._stats, "queued": len(self._queue)}
        out["static_decode"] = self._static_reason or ("on" if self._runner else "undecided")
        if self._runner is not None:
            out["static"] = {**self._runner.stats, **self._runner.decoder.stats,
                             "slots": self._runner.decoder.slots,
                             "max_len": self._runner.decoder.max_len,
                             "kv_cache_mb": round(self._runner.decoder.kv_bytes / 2**20, 1),
                             "fused": self._runner.decoder.fused is not None,
                             "compiled": self._runner.decoder.compiled,
                             "kernels": self._runner.decoder.kernels}
        return out

    def close(self) -> None:
        """Stop the worker after the current batch; queued calls fail with BackendError."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            worker = self._worker
        for r in pending:
            if r.future.set_running_or_notify_cancel():
                r.future.set_exception(BackendError("the batching engine was closed"))
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=60)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the worker

    def window_s(self) -> float:
        """How long to wait for more requests after the first (the adaptive rule)."""
        if self._last_full:
            return self.max_wait_s
        if self._gap_ewma is not None and self._gap_ewma > self.max_wait_s:
            return 0.0  # requests arrive further apart than the window: waiting buys nothing
        return self.max_wait_s

    def _take(self) -> list[_Request] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    self._worker = None
                    return None
                if not self._cond.wait(self.idle_exit_s) and not self._queue:
                    self._worker = None  # idle: the next submit starts a new worker
                    return None
            window = self.window_s() if self.max_batch > 1 else 0.0
            self._stats["waits" if window > 0 else "no_waits"] += 1
            latest = self._queue[0].t_in + _BURST_WINDOWS * window
            while len(self._queue) < self.max_batch and not self._closed:
                # a window after the newest arrival: quiet that long, the burst is over
                left = min(self._queue[-1].t_in + window, latest) - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(self.max_batch, len(self._queue))
            batch = [self._queue.popleft() for _ in range(n)]
            self._last_full = n >= self.max_batch
        return [r for r in batch if r.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as e:  # a bug here must not strand the callers
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(
                            e if isinstance(e, Exception) else BackendError(repr(e)))
                if not isinstance(e, Exception):
                    with self._cond:
                        self._worker = None  # the next submit starts a new worker
                    raise

    def _run(self, batch: list[_Request]) -> None:
        groups: dict[Any, list[_Request]] = {}
        self._encode(batch)
        for r in batch:
            try:
                key = self._key(r)
            except Exception as e:  # noqa: BLE001  (the caller gets it, e.g. ContextOverflow)
                r.future.set_exception(e)
                continue
            groups.setdefault(key, []).append(r)
        runner = self._static_runner() if any(k[0] != "single" for k in groups) else None
        if runner is not None:
            static: list[_Request] = []
            for key, group in groups.items():
                for r in group:
                    if key[0] == "single" or not self._fits(runner, r):
                        self._run_single(r)
                    else:
                        static.append(r)
            if static:
                self._count_batch(len(static))
                runner.run(static)
            return
        for key, group in groups.items():
            if key[0] == "single" or len(group) == 1:
                for r in group:
                    self._run_single(r)
            elif self._local:
                self._run_padded(group)
            else:
                self._run_group(group)

    @staticmethod
    def _alone(r: _Request) -> bool:
        """Whether the call's parameters keep it off any batch (seed, grammar)."""
        p = r.call.params
        return p.seed is not None or bool(p.response_format) or p.tool_choice not in (
            "auto", "none")

    def _encode(self, batch: list[_Request]) -> None:
        """The prompt ids of the batchable requests of a local backend, in one tokenizer
        call (a fast tokenizer encodes a list in parallel, outside the GIL: 256 prompts
        one at a time took the worker ~40 ms on the H100 host). A prompt that fails to
        render is left to `_key`, which raises its error for that caller only."""
        if not self._local or len(batch) < 2:
            return
        b = self.backend
        texts: dict[int, str] = {}
        for i, r in enumerate(batch):
            if not self._alone(r):
                with contextlib.suppress(Exception):  # _key raises it for this caller
                    texts[i] = b.render(r.call)
        if len(texts) < 2:
            return
        encoded = b.tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"]
        for i, ids in zip(texts, encoded, strict=True):
            batch[i].ids = list(ids)

    def _key(self, r: _Request) -> tuple[Any, ...]:
        """The decoding class a request can share a batch with, or ("single", id)."""
        call, p = r.call, r.call.params
        if self._alone(r):
            return ("single", id(r))
        if self._local:
            b = self.backend
            ids = r.ids if r.ids is not None else b.tokenizer(
                b.render(call), add_special_tokens=False)["input_ids"]
            max_new = p.max_tokens or b.default_max_tokens
            if len(ids) + max_new > b.context_window:
                raise ContextOverflow(len(ids), max_new, b.context_window)
            if b.system_prefix(call, ids) is not None and not self._reusing_prefixes():
                return ("single", id(r))  # the prefix KV cache serves it better alone
            r.ids = list(ids)
        if p.temperature > 0:
            return ("sample", p.temperature, p.top_p)
        return ("greedy",)

    # -- static decoding (continuous batching, CUDA graphs)

    def _static_runner(self) -> ContinuousRunner | None:
        """The continuous-batching runner, built on first use; None when static decoding
        is off (the reason is in stats()["static_decode"])."""
        if self._runner is not None or self._static_reason is not None:
            return self._runner
        reason = None
        if self.static_decode == "off":
            reason = "off by policy"
        elif not self._local:
            reason = "the backend is not a LocalBackend"
        else:
            from contextwise.backends.static_decode import (
                StaticDecoder,
                cache_dtype,
                kv_bytes_per_slot,
                supported,
            )

            b = self.backend
            model = b.model
            on_gpu = model.device.type == "cuda"
            reason = supported(model)
            if reason is None and self.static_decode == "auto" and not on_gpu:
                reason = "auto: on for CUDA devices only"
            if reason is None:
                max_len, slots = slot_shape(
                    self._kv_budget(on_gpu), kv_bytes_per_slot(model, 1, cache_dtype(model)),
                    min(b.context_window, MAX_STATIC_LEN), self.max_batch)
                if slots < 1:
                    per_slot = kv_bytes_per_slot(model, max_len, cache_dtype(model))
                    reason = (f"kv_cache_mb holds no slot: one slot of {max_len} tokens "
                              f"takes {per_slot / 2**20:.0f} MB")
                else:
                    with b._lock:  # fusing q/k/v rewrites the weights: not under a generate
                        decoder = StaticDecoder(
                            model, slots, max_len, cuda_graphs=self.cuda_graphs, lock=b._lock,
                            compile=self.compile_decode, eos=b.tokenizer.eos_token_id,
                            kernels=self.decode_kernels)
                    decoder.warm_up()  # compiling (if asked) before the first chunk
                    _freeze_gc_heap()
                    self._runner = ContinuousRunner(
                        decoder, b.tokenizer.eos_token_id, self.decode_steps,
                        make_row=self._make_row, complete=self._complete, poll=self._poll,
                        decode_text=lambda ids: b.tokenizer.decode(ids, skip_special_tokens=True),
                        decode_texts=b.decode_texts,
                        speculate=(b.speculative_tokens if b.speculative == "prompt_lookup"
                                   else 0),
                        reuse_prefixes=self.reuse_prefixes)
        self._static_reason = reason
        return self._runner

    def _reusing_prefixes(self) -> bool:
        """Whether static decoding runs with prefix reuse: then a call with a cacheable
        system prompt is batched, its prefix reused from the slots, instead of running
        alone on the backend's prefix cache."""
        return self.reuse_prefixes and self._static_runner() is not None

    def _kv_budget(self, on_gpu: bool) -> float:
        if self.kv_cache_mb is not None:
            return self.kv_cache_mb * 2**20
        if on_gpu:
            import torch

            free, _ = torch.cuda.mem_get_info(self.backend.model.device)
            return 0.3 * free  # what is free now, less room for activations and graphs
        return 512 * 2**20

    def _fits(self, runner: ContinuousRunner, r: _Request) -> bool:
        assert r.ids is not None
        return runner.fits(len(r.ids), self._max_new(r))

    def _make_row(self, r: _Request, slot: int) -> _Active:
        p = r.call.params
        min_new = getattr(self.backend.model.generation_config, "min_new_tokens", None) or 0
        return self._row(r, _Active, slot=slot, temperature=p.temperature, top_p=p.top_p,
                         min_new=min_new)

    def _max_new(self, r: _Request) -> int:
        return r.call.params.max_tokens or self.backend.default_max_tokens

    def _row(self, r: _Request, cls: type[Row] = Row, **extra: Any) -> Any:
        """A batch row for `r`: its prompt ids, token budget, stop strings and stream."""
        assert r.ids is not None
        stop = r.call.params.stop
        return cls(r, r.ids, self._max_new(r), tuple(stop) if stop else None,
                   self.backend.streamer(r.call, prompt_seen=True), **extra)

    def _poll(self, limit: int) -> list[_Request]:
        """Up to `limit` queued requests the runner can take, without waiting; the
        queued requests it can't take (grammar, seed, too long) run here, in order."""
        out: list[_Request] = []
        runner = self._runner
        while len(out) < limit:
            with self._cond:
                if not self._queue or self._closed:
                    break
                taken = [self._queue.popleft()
                         for _ in range(min(limit - len(out), len(self._queue)))]
            taken = [r for r in taken if r.future.set_running_or_notify_cancel()]
            self._encode(taken)  # the late part of a burst: one tokenizer call too
            for r in taken:
                try:
                    key = self._key(r)
                except Exception as e:  # noqa: BLE001  (the caller gets it)
                    r.future.set_exception(e)
                    continue
                if key[0] == "single" or runner is None or not self._fits(runner, r):
                    self._run_single(r)
                else:
                    with self._cond:
                        self._stats["batched_calls"] += 1
                    out.append(r)
        return out

    def _finish(self, r: _Request, reply: Reply | None = None,
                error: BaseException | None = None) -> None:
        if error is not None:
            r.future.set_exception(error)
        else:
            assert reply is not None
            reply.latency_s = time.perf_counter() - r.t_in  # queue wait included
            r.future.set_result(reply)

    def _run_single(self, r: _Request) -> None:
        with self._cond:
            self._stats["single_calls"] += 1
        try:
            reply = self.backend.generate([r.call])[0]
        except Exception as e:  # noqa: BLE001  (the caller gets it)
            self._finish(r, error=e)
        else:
            self._finish(r, reply)

    def _count_batch(self, n: int) -> None:
        with self._cond:
            self._stats["batches"] += 1
            self._stats["batched_calls"] += n
            self._stats["largest_batch"] = max(self._stats["largest_batch"], n)

    def _run_group(self, group: list[_Request]) -> None:
        """A backend other than LocalBackend: the group as one batch-native generate."""
        self._count_batch(len(group))
        try:
            replies = self.backend.generate([r.call for r in group])
        except Exception as e:  # noqa: BLE001  (every caller of the group gets it)
            for r in group:
                self._finish(r, error=e)
            return
        for r, reply in zip(group, replies, strict=True):
            self._finish(r, reply)

    def _run_padded(self, group: list[_Request]) -> None:
        """One left-padded `model.generate` for a compatible group (LocalBackend)."""
        import torch
        from transformers import StoppingCriteriaList
        from transformers.generation.stopping_criteria import StopStringCriteria

        b = self.backend
        tok = b.tokenizer
        rows: list[Row] = [self._row(r) for r in group]
        stops = {row.stop: StopStringCriteria(tok, list(row.stop)) for row in rows if row.stop}
        self._count_batch(len(rows))

        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids, mask = left_padded([row.ids for row in rows], pad)
        p = rows[0].req.call.params  # the group shares its decoding class
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(row.max_new for row in rows),
            "pad_token_id": pad,
            "eos_token_id": tok.eos_token_id,
            "stopping_criteria": StoppingCriteriaList(
                [_RowControl(self, rows, stops, tok.eos_token_id)]),
        }
        if p.temperature > 0:
            kwargs.update(do_sample=True, temperature=p.temperature, top_p=p.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        failure: BaseException | None = None
        with b._lock, torch.inference_mode():
            try:
                b.model.generate(input_ids=input_ids.to(b.model.device),
                                 attention_mask=mask.to(b.model.device), **kwargs)
            except Exception as e:  # noqa: BLE001  (the unfinished rows get it)
                failure = BackendError(f"generation failed: {type(e).__name__}: {e}")
                failure.__cause__ = e
        for row in rows:  # rows generate ended without our criteria finishing them
            if not row.done:
                row.done = True
                if failure is not None:
                    self._finish(row.req, error=failure)
                else:
                    self._complete(row, len(rows))

    def _complete(self, row: Row, batch_size: int) -> None:
        """Hand a finished row its Reply (or its error) right away."""
        r = row.req
        if row.error is not None:
            self._finish(r, error=row.error)
            return
        trace: dict[str, Any] = {}
        if isinstance(row, _Active):
            trace["decode"] = "static"
            if row.lookup is not None:
                trace.update(speculative="prompt_lookup", draft_tokens=row.drafted,
                             draft_accepted_tokens=row.accepted)
        try:
            reply = self.backend._reply(
                r.call, row.new, row.n_prompt, r.t_in, None, row.streamer,
                prefix_cached_tokens=0, prefix_stored_tokens=0, batch_size=batch_size,
                text=row.text, **trace)
        except Exception as e:  # noqa: BLE001  (e.g. Cancelled from the stream's last delta)
            self._finish(r, error=e)
        else:
            self._finish(r, reply)


class _RowControl:
    """A per-row stopping criterion that also streams each row and finishes it.

    transformers calls it once per decoding step with the grown `input_ids`
    and stops the rows it returns True for (their later tokens are padding).
    """

    def __init__(self, engine: BatchingEngine, rows: list[Row],
                 stops: dict[tuple[str, ...], Any], eos: int):
        self.engine = engine
        self.rows = rows
        self.stops = stops
        self.eos = eos

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        last = input_ids[:, -1].tolist()
        done: list[bool] = []
        for i, row in enumerate(self.rows):
            if not row.done:
                stop = row.take(last[i], self.eos, lambda row=row, i=i: bool(
                    self.stops[row.stop](input_ids[i:i + 1], scores)[0]))
                if stop:
                    row.done = True
                    self.engine._complete(row, len(self.rows))
            done.append(row.done)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def slot_shape(budget: float, per_token: int, longest: int, wanted: int) -> tuple[int, int]:
    """(tokens per slot, slots) for a KV budget of `budget` bytes at `per_token` bytes
    per cached token: `wanted` slots of `longest` tokens if they fit; else shorter
    slots, down to MIN_STATIC_LEN tokens (calls longer than a slot take the single
    path), then fewer slots. Slots = 0 when not even one slot of the shortest fits."""
    shortest = min(MIN_STATIC_LEN, longest)
    length = max(shortest, min(longest, int(budget // (wanted * per_token))))
    return length, min(wanted, int(budget // (length * per_token)))


@functools.cache  # once per process
def _freeze_gc_heap() -> None:
    """With the model loaded and the decoder warm: move every object alive now into the
    garbage collector's permanent generation, which collections skip (`gc.freeze()`, as
    vLLM does after start-up). A full collection otherwise walks the model's,
    tokenizer's and libraries' ~440,000 objects: 196-212 ms on 2 CPU cores; one landing
    in a round of 256 concurrent requests made it 0.477 s instead of ~0.27
    (benchmarks/engine_host.py). Objects frozen are long-lived anyway; reference
    counting still frees them."""
    gc.collect()
    gc.freeze()
    # at exit, thawed again: the interpreter's last collection must see them (bindings
    # such as nanobind's report objects still alive then as leaks)
    atexit.register(gc.unfreeze)


def _is_local(backend: Backend) -> bool:
    return isinstance(backend, LocalBackend)
