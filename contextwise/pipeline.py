"""The Pipeline: a policy's stages around a backend, as one callable.

    pipeline = Pipeline(policy)
    reply = pipeline(messages, tools=tools, session="s1", max_tokens=64)

For each call it (1) validates the input into a `Call`, (2) puts the session's
stored history in front of the new messages, (3) runs the stages as an onion
around the backend, (4) records the call in the ledger and appends the new
turn to the session. `achat` is the async twin; `stream`/`astream` yield text
deltas and then the final Reply.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from contextwise.backends import Backend, build_backend
from contextwise.errors import Cancelled
from contextwise.memory.conversations import Conversations
from contextwise.memory.ledger import Ledger
from contextwise.memory.store import Store
from contextwise.middleware.base import acompose, compose
from contextwise.policy import Policy
from contextwise.types import Call, Message, Params, Reply, parse_messages

__all__ = ["Pipeline"]


def build_stages(
    policy: Policy,
    *,
    store: Store | None = None,
    backend: Callable[[], Backend] | None = None,
    embedder: Any = None,
    counter: Callable[[], Any] | None = None,
    model_id: str | None = None,
) -> list[Any]:
    """The stages a policy turns on, outermost first:
    templating, quarantine, summarize, prune, tool loadout, budget fit, cache.

    Summarize runs before prune (DESIGN.md draws them the other way round):
    pruning is for the current query (stale results, chunks this question
    does not need), while the summary is for the rest of the session, so it
    must read the turns it folds in full, after quarantine but before pruning
    throws away what this query happens not to need.

    `backend` is a getter (the model loads on first use only): the summarizer
    writes with it and budget fit counts with its tokenizer. Without one, the
    summary is extractive and budget fit needs `policy.budget.max_context_tokens`.
    `counter` (default: `backend`) is a getter of an object with
    `context_window` and `prompt_tokens(call)`; the pipeline passes one that
    needs only the tokenizer, so a cache hit never loads the model.
    The embedder, shared by every stage, also loads on first use.
    The cache is last, so its key is the engineered context the model would see.
    """
    from contextwise.middleware.budget import BudgetStage
    from contextwise.middleware.cache import CacheStage
    from contextwise.middleware.prune import PruneStage
    from contextwise.middleware.quarantine import QuarantineStage
    from contextwise.middleware.summarize import SummarizeStage, model_summarizer
    from contextwise.middleware.templating import TemplatingStage
    from contextwise.middleware.tool_loadout import ToolLoadoutStage
    from contextwise.retrievers.embedder import get_embedder

    if embedder is None:
        model, device = policy.embedding.model, policy.embedding.device
        embedder = lambda: get_embedder(model, device)
    stages: list[Any] = []
    if policy.templating is not None:
        stages.append(TemplatingStage(policy.templating, embedder=embedder))
    if policy.quarantine is not None:
        stages.append(QuarantineStage(policy.quarantine, embedder=embedder, store=store))
    if policy.summarize is not None:
        summarizer = None
        if backend is not None and policy.summarize.mode == "model":
            summarizer = model_summarizer(_generate_text(backend))
        stages.append(SummarizeStage(policy.summarize, store=store, summarizer=summarizer))
    if policy.prune is not None:
        stages.append(PruneStage(policy.prune, embedder=embedder))
    if policy.tools is not None:
        stages.append(ToolLoadoutStage(policy.tools, embedder=embedder))
    counter = counter or backend
    if counter is not None:
        stages.append(BudgetStage(
            policy.budget,
            window=lambda: counter().context_window,
            counter=lambda call: counter().prompt_tokens(call),
        ))
    elif policy.budget.max_context_tokens is not None:
        stages.append(BudgetStage(policy.budget))
    if policy.cache is not None:
        stages.append(CacheStage(policy.cache, store=store, embedder=embedder,
                                 model=model_id or model_identity(policy)))
    return stages


def model_identity(policy: Policy) -> str:
    """What the cache fingerprints as "the model": anything that changes its output."""
    b = policy.backend
    if b.cascade is not None:  # replies may be the small model's
        from contextwise.backends import cascade_identity

        return cascade_identity(b)
    return f"{b.model}|quantization={b.quantization}|dtype={b.dtype}"


def backend_identity(backend: Backend) -> str:
    """The cache's model identity for a given backend: its `model_name`, plus its
    weight quantization when it has one (an int8 reply is not an fp32 reply); a
    backend's own `identity` string (a cascade's) wins."""
    identity = getattr(backend, "identity", None)
    if isinstance(identity, str):
        return identity
    quantization = getattr(backend, "quantization", "none")
    if quantization in (None, "none"):
        return backend.model_name
    return f"{backend.model_name}|quantization={quantization}"


def _generate_text(backend: Callable[[], Backend]) -> Callable[[list[Message], int], str]:
    """`generate(messages, max_tokens) -> text` on the serving model, greedy."""

    def generate(messages: list[Message], max_tokens: int) -> str:
        call = Call(messages=messages, params=Params(max_tokens=max_tokens))
        return backend().generate([call])[0].text

    return generate


class Pipeline:
    """Callable front door: `pipeline(messages, tools=None, session=None, **params) -> Reply`."""

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        backend: Backend | None = None,
        stages: Sequence[Any] | None = None,
        store: Store | None = None,
        model_id: str | None = None,
    ):
        """`model_id`: the model identity the response cache keys on; default: the
        policy's backend (model, quantization, dtype), or the given backend's
        `model_name` (with its quantization, if any)."""
        self.policy = policy or Policy()
        self._backend = backend
        self._backend_lock = threading.Lock()
        self.store = store or Store(self.policy.storage.path)
        self._counter: Any = None
        self.stages = (
            list(stages) if stages is not None
            else build_stages(self.policy, store=self.store, backend=lambda: self.backend,
                              counter=self.prompt_counter,
                              model_id=model_id or (backend_identity(backend) if backend else None))
        )
        self.conversations = Conversations(self.store)
        self.ledger = Ledger(self.store) if self.policy.storage.ledger else None

    @property
    def backend(self) -> Backend:
        """The model backend, built (and the model loaded) on first use."""
        with self._backend_lock:
            if self._backend is None:
                self._backend = build_backend(self.policy.backend, self.policy.budget)
            return self._backend

    @property
    def loaded(self) -> bool:
        """Whether the model backend has been built (a cache hit does not build it)."""
        return self._backend is not None

    def prompt_counter(self) -> Any:
        """The loaded backend, or a tokenizer-only counter while the model is not loaded."""
        if self._backend is not None:
            return self._backend
        with self._backend_lock:
            if self._backend is not None:
                return self._backend
            if self._counter is None:
                from contextwise.backends.prompt import PromptCounter

                spec = self.policy.backend
                self._counter = PromptCounter(spec.model, spec.cache_dir,
                                              self.policy.budget.max_context_tokens)
            return self._counter

    @property
    def cache(self) -> Any:
        """The response cache (`ResponseCache`) of the cache stage, or None."""
        return next((s.cache for s in self.stages if getattr(s, "name", "") == "cache"), None)

    # -- 1, 2: input

    def prepare(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        tools: Sequence[Any] | None = None,
        session: str | None = None,
        user: str | None = None,
        variables: Mapping[str, Any] | None = None,
        cache: str = "use",
        **params: Any,
    ) -> tuple[Call, list[Message]]:
        """(the full call, the messages new to the session)."""
        history = self.conversations.history(session) if session is not None else []
        new = parse_messages(messages, prior=history)
        if session is not None:
            # Callers may resend the whole conversation (OpenAI style) or only the new turn.
            if new[: len(history)] == history:
                new = new[len(history):]
            full = history + new
        else:
            full = new
        params.setdefault("max_tokens", self.policy.budget.max_output_tokens)
        call = Call.build(
            full, tools=tools, session=session, user=user, variables=variables, cache=cache,
            **params
        )
        return call, new

    # -- 4: bookkeeping

    def _finish(self, raw: Call, seen: Call, reply: Reply, new: list[Message], t0: float) -> Reply:
        reply.latency_s = time.perf_counter() - t0
        if self.ledger is not None:
            raw_tokens = self.prompt_counter().prompt_tokens(raw)
            self.ledger.record(raw, seen, reply, raw_tokens)
        if raw.session is not None:
            # Long-term memory keeps quarantine placeholders, never the withheld content.
            for stage in self.stages:
                clean = getattr(stage, "clean", None)
                if clean is not None:
                    new = clean(new, session=raw.session, context=raw.messages)
            self.conversations.append(raw.session, [*new, reply.message])
        return reply

    # -- 3: the onion, sync and async

    def _run(self, call: Call, new: list[Message]) -> Reply:
        t0 = time.perf_counter()
        seen: dict[str, Call] = {}

        def inner(c: Call) -> Reply:
            seen["call"] = c
            return self.backend.generate([c])[0]

        reply = compose(self.stages, inner)(call)
        return self._finish(call, seen.get("call", call), reply, new, t0)

    async def _arun(self, call: Call, new: list[Message]) -> Reply:
        t0 = time.perf_counter()
        seen: dict[str, Call] = {}

        async def inner(c: Call) -> Reply:
            seen["call"] = c
            backend = await asyncio.to_thread(lambda: self.backend)  # may load the model
            return (await backend.agenerate([c]))[0]

        reply = await acompose(self.stages, inner)(call)
        # SQLite writes (ledger, session) off the event loop
        return await asyncio.to_thread(self._finish, call, seen.get("call", call), reply, new, t0)

    def __call__(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        tools: Sequence[Any] | None = None,
        session: str | None = None,
        **params: Any,
    ) -> Reply:
        """One call. `params`: the generation parameters (`max_tokens`, `temperature`,
        `stop`, `seed`, `tool_choice`, `response_format`...) plus `user=` (per-user cache
        scope), `variables=` (template values) and `cache=` ("use", "skip": no lookup and
        no store, "refresh": answer anew and store)."""
        call, new = self.prepare(messages, tools, session, **params)
        return self._run(call, new)

    chat = __call__

    async def achat(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        tools: Sequence[Any] | None = None,
        session: str | None = None,
        **params: Any,
    ) -> Reply:
        call, new = await asyncio.to_thread(self.prepare, messages, tools, session, **params)
        return await self._arun(call, new)

    # -- streaming: the backend calls call.on_delta; a worker thread runs the onion

    def stream(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        tools: Sequence[Any] | None = None,
        session: str | None = None,
        **params: Any,
    ) -> Iterator[str | Reply]:
        """Yield text deltas, then the final Reply. Closing the iterator stops generation."""
        call, new = self.prepare(messages, tools, session, **params)
        q: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()
        call = call.model_copy(update={"on_delta": _sink(q.put, stop)})

        def work() -> None:
            try:
                q.put(self._run(call, new))
            except BaseException as e:  # noqa: BLE001  (handed to the consumer, not swallowed)
                q.put(e)

        threading.Thread(target=work, daemon=True, name="contextwise-stream").start()
        try:
            while True:
                item = q.get()  # a text delta, the final Reply, or the error
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Reply):
                    return
        finally:
            stop.set()

    async def astream(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        tools: Sequence[Any] | None = None,
        session: str | None = None,
        **params: Any,
    ) -> AsyncIterator[str | Reply]:
        """Async twin of `stream`."""
        call, new = await asyncio.to_thread(self.prepare, messages, tools, session, **params)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        call = call.model_copy(
            update={"on_delta": _sink(lambda d: loop.call_soon_threadsafe(q.put_nowait, d), stop)}
        )

        async def work() -> None:
            # call_soon, not put_nowait: deltas a stage sent from this loop thread (a cache
            # hit) are queued callbacks, and the final Reply must come after them
            try:
                loop.call_soon(q.put_nowait, await self._arun(call, new))
            except BaseException as e:  # noqa: BLE001  (handed to the consumer, re-raised)
                loop.call_soon(q.put_nowait, e)

        task = asyncio.ensure_future(work())
        try:
            while True:
                item = await q.get()  # a text delta, the final Reply, or the error
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Reply):
                    return
        finally:
            stop.set()
            if not task.done():
                await asyncio.gather(task, return_exceptions=True)


def _sink(put: Callable[[str], Any], stop: threading.Event) -> Callable[[str], None]:
    def on_delta(delta: str) -> None:
        if stop.is_set():
            raise Cancelled("stream closed by the caller")
        put(delta)

    return on_delta
