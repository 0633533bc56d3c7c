"""Confidence cascade: a small (compressed) model answers first, the main model only
when the small one is unsure.

    backend = CascadeBackend(small=lambda: LocalBackend(quantization="int8"),
                             large=lambda: LocalBackend(), threshold=0.6)

Each call runs on the small backend, which also hands back the probability it
gave every token it chose (its own softmax over the raw logits). Those make the
reply's confidence: `mean_prob` (default) their geometric mean, `min_prob` the
lowest one. At or above `threshold` the small reply is returned (trace:
`cascade` record with decision="accepted"); below it the small reply is thrown
away and the call runs again on the large backend (decision="escalated", with
the small tokens wasted). An escalated call costs both models, so the cascade
pays off when most calls are accepted and the small model is much cheaper.

- Streaming: the small model's text can't be streamed before the cascade knows
  it keeps it, so the small model runs without `on_delta` and an accepted reply
  is handed to `on_delta` in one piece once decided; an escalated call streams
  from the large model as usual.
- Grammar-constrained calls (a forced tool call, a `response_format`): the
  grammar bends the small model's probabilities, so they say little about the
  reply; these go straight to the large model (decision="direct",
  reason="constrained"). So does a call too long for the small model's window
  (reason="small_overflow").
- Loading: `small` and `large` may be zero-argument factories; each is called
  on first use (the small one on the first call, the large one on the first
  escalation), so a response-cache hit loads neither. Prompts are counted with
  the large backend once loaded, before that with `counter` (a tokenizer-only
  `PromptCounter` in `build_backend`).
- Batching: `generate(calls)` takes a list (the BatchingEngine hands a
  non-LocalBackend its groups whole). Its greedy, unconstrained calls without
  stop strings run on the small model as one padded batch
  (`LocalBackend.generate_scored_batch`), and the escalated ones that are not
  streamed as one batch on the large model; the rest, and backends without
  that method, run one by one. Padding
  can change float rounding, so a batched reply may differ from a lone one at
  a near-tie, as in the engine's padded batches.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from contextwise.backends.base import Backend
from contextwise.backends.local import plain_greedy
from contextwise.backends.prompt import forced_tools

from contextwise.errors import BackendError, ContextOverflow, InputError
from contextwise.types import Call, Message, Reply, Tool

__all__ = ["CONFIDENCE_MODES", "CascadeBackend", "confidence"]

CONFIDENCE_MODES = ("mean_prob", "min_prob")


def confidence(probs: Sequence[float], mode: str = "mean_prob") -> float:
    """A reply's confidence from the probabilities of its chosen tokens (1.0 for none)."""
    if not probs:
        return 1.0
    if mode == "min_prob":
        return float(min(probs))
    if mode == "mean_prob":
        return math.exp(sum(math.log(max(p, 1e-12)) for p in probs) / len(probs))
    raise InputError("confidence", f"must be one of {CONFIDENCE_MODES}, got {mode!r}")


class _Lazy:
    """A backend (or counter) given directly or built by a factory on first use."""

    def __init__(self, value: Any):
        self._factory = value if callable(value) and not isinstance(value, Backend) else None
        self._value = None if self._factory is not None else value
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def peek(self) -> Any:
        return self._value

    def get(self) -> Any:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    assert self._factory is not None
                    self._value = self._factory()
        return self._value


class CascadeBackend(Backend):
    """A `Backend` that tries `small` first and escalates unsure replies to `large`.

    `small`: a LocalBackend (it must offer `generate_scored`), or a factory of
    one; `large`: any Backend, or a factory; `threshold` in [0, 1]; `confidence`:
    'mean_prob' or 'min_prob'; `counter`: what counts prompts (and gives the
    context window) until the large backend is loaded, or a factory of it
    (None: the large backend, loaded then); `model_name`: what the pipeline
    sees (None: the large backend's).
    """

    def __init__(self, small: Backend | Callable[[], Backend],
                 large: Backend | Callable[[], Backend], threshold: float = 0.6,
                 confidence: str = "mean_prob", counter: Any = None,
                 model_name: str | None = None, identity: str | None = None):
        if (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                or not 0 <= threshold <= 1):
            raise InputError("threshold", f"must be a number in [0, 1], got {threshold!r}")
        if confidence not in CONFIDENCE_MODES:
            raise InputError("confidence",
                             f"must be one of {CONFIDENCE_MODES}, got {confidence!r}")
        for name, value in (("small", small), ("large", large)):
            if not isinstance(value, Backend) and not callable(value):
                raise InputError(name, f"must be a Backend or a factory of one, got {value!r}")
        self.threshold = float(threshold)
        self.confidence = confidence
        self._small = _Lazy(small)
        self._large = _Lazy(large)
        self._counter = _Lazy(counter) if counter is not None else None
        self._model_name = model_name
        self._window: int | None = None
        self.identity = identity  # the response cache's model identity, when given
        self._stats_lock = threading.Lock()
        self._stats = {"accepted": 0, "escalated": 0, "direct": 0, "small_tokens_wasted": 0}

    # -- what the pipeline reads

    @property  # type: ignore[override]
    def model_name(self) -> str:
        if self._model_name is not None:
            return self._model_name
        return str(self._large.get().model_name)

    @property
    def small(self) -> Backend:
        """The small backend (loaded now if it was not)."""
        return self._small.get()  # type: ignore[no-any-return]

    @property
    def large(self) -> Backend:
        """The large backend (loaded now if it was not)."""
        return self._large.get()  # type: ignore[no-any-return]

    @property
    def small_loaded(self) -> bool:
        return self._small.loaded

    @property
    def large_loaded(self) -> bool:
        return self._large.loaded

    def _count_with(self) -> Any:
        if self._large.loaded or self._counter is None:
            return self._large.get()
        return self._counter.get()

    @property  # type: ignore[override]
    def context_window(self) -> int:
        if self._window is not None:
            return self._window
        return int(self._count_with().context_window)

    @context_window.setter
    def context_window(self, value: int) -> None:
        self._window = value

    def count_tokens(self, messages: Sequence[Message], tools: Iterable[Tool] = ()) -> int:
        return self.prompt_tokens(Call(messages=list(messages), tools=list(tools)))

    def prompt_tokens(self, call: Call) -> int:
        return int(self._count_with().prompt_tokens(call))

    def stats(self) -> dict[str, Any]:
        """Counters: accepted (small replies returned), escalated (small replies thrown
        away, the large model answered), direct (straight to the large model:
        constrained or too long for the small one), small_tokens_wasted, and
        acceptance_rate / escalation_rate over the calls the small model answered."""
        with self._stats_lock:
            s: dict[str, Any] = dict(self._stats)
        tried = s["accepted"] + s["escalated"]
        s["acceptance_rate"] = s["accepted"] / tried if tried else 0.0
        s["escalation_rate"] = s["escalated"] / tried if tried else 0.0
        return s

    def _count(self, **inc: int) -> None:
        with self._stats_lock:
            for k, v in inc.items():
                self._stats[k] += v

    # -- generation

    def generate(self, calls: Sequence[Call]) -> list[Reply]:
        """Each call decided on its own; a group's greedy, unconstrained calls run on
        the small model in one padded batch, and those escalated on the large one
        in another, when the backends offer `generate_scored_batch` (LocalBackend)."""
        t0 = time.perf_counter()
        tries = [i for i, c in enumerate(calls) if plain_greedy(c)]  # the small never streams
        scored: dict[int, tuple[Reply, list[float]] | BaseException] = {}
        if len(tries) > 1:
            quiet = [calls[i].model_copy(update={"on_delta": None}) for i in tries]
            many = getattr(self.small, "generate_scored_batch", None)
            results = many(quiet) if many is not None else [self._small_scored(q) for q in quiet]
            scored = dict(zip(tries, results, strict=True))
        replies: list[Reply | None] = [None] * len(calls)
        escalated: list[int] = []
        for i, call in enumerate(calls):
            if i not in scored:
                replies[i] = self._one(call)
                continue
            result = scored[i]
            if isinstance(result, ContextOverflow):
                replies[i] = self._direct(call, t0, "small_overflow")
            elif isinstance(result, BaseException):
                raise result
            else:
                replies[i] = self._decide(call, *result, t0)
                if replies[i] is None:
                    escalated.append(i)
        for i, reply in zip(escalated, self._large_many([calls[i] for i in escalated]),
                            strict=True):
            reply.latency_s = time.perf_counter() - t0
            replies[i] = reply
        assert all(r is not None for r in replies)
        return replies  # type: ignore[return-value]

    def _large_many(self, calls: list[Call]) -> list[Reply]:
        """The escalated calls on the large model: unstreamed ones in one batch
        when it can, the rest one by one."""
        if not calls:
            return []  # the large model stays unloaded
        large = self.large
        many = getattr(large, "generate_scored_batch", None)
        together = [c for c in calls if c.on_delta is None] if many is not None else []
        done: dict[int, Reply] = {}
        if many is not None and len(together) > 1:  # together is empty without it
            for c, result in zip(together, many(together), strict=True):
                if isinstance(result, BaseException):
                    raise result
                done[id(c)] = result[0]
        return [done[id(c)] if id(c) in done else large.generate([c])[0] for c in calls]

    def _direct(self, call: Call, t0: float, reason: str) -> Reply:
        reply = self.large.generate([call])[0]
        self._count(direct=1)
        call.trace.add("cascade", decision="direct", reason=reason)
        reply.latency_s = time.perf_counter() - t0
        return reply

    def _one(self, call: Call) -> Reply:
        t0 = time.perf_counter()
        p = call.params
        if p.response_format or forced_tools(call):
            return self._direct(call, t0, "constrained")
        result = self._small_scored(call.model_copy(update={"on_delta": None}))
        if isinstance(result, ContextOverflow):
            return self._direct(call, t0, "small_overflow")
        decided = self._decide(call, *result, t0)
        if decided is not None:
            return decided
        final = self.large.generate([call])[0]
        final.latency_s = time.perf_counter() - t0
        return final

    def _small_scored(self, quiet: Call) -> tuple[Reply, list[float]] | ContextOverflow:
        """One call on the small model: (reply, token probabilities), or the
        ContextOverflow that sends it to the large model."""
        small = self.small
        scored = getattr(small, "generate_scored", None)
        if scored is None:
            raise BackendError(f"the cascade's small backend ({type(small).__name__}) "
                               "has no generate_scored(call); use a LocalBackend")
        try:
            return scored(quiet)  # type: ignore[no-any-return]
        except ContextOverflow as e:
            return e

    def _decide(self, call: Call, reply: Reply, probs: list[float], t0: float) -> Reply | None:
        """The small reply when its confidence passes the threshold (streamed to
        `on_delta` in one piece), else None: the call escalates (both traced)."""
        small = self.small
        conf = confidence(probs, self.confidence)
        record = {"confidence": round(conf, 4), "threshold": self.threshold,
                  "measure": self.confidence, "small_model": small.model_name}
        if conf >= self.threshold:
            self._count(accepted=1)
            call.trace.add("cascade", decision="accepted", **record)
            if call.on_delta is not None and reply.message.content:
                call.on_delta(reply.message.content)  # the whole text, once decided
            reply.latency_s = time.perf_counter() - t0
            return reply
        wasted = reply.usage.completion_tokens
        self._count(escalated=1, small_tokens_wasted=wasted)
        call.trace.add("cascade", decision="escalated", small_tokens_wasted=wasted, **record)
        return None
