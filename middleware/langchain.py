"""LangChain agent middleware: the contextwise stages inside `create_agent`.

    from langchain.agents import create_agent
    from contextwise.middleware.langchain import ContextwiseMiddleware, ToolLoadoutMiddleware

    agent = create_agent(model, tools, middleware=[ContextwiseMiddleware(policy)])
    # or one stage at a time:
    agent = create_agent(model, tools, middleware=[ToolLoadoutMiddleware(ToolLoadout(top_k=5))])

Each middleware implements `wrap_model_call` and `awrap_model_call`. Per model
call it turns the `ModelRequest` into a contextwise `Call` (system message +
messages, tools, generation settings, session), runs its stage(s) as the
onion `Pipeline` runs them (`stage(call, next)`), and hands the engineered call
back to LangChain with `request.override(...)`:

- messages the stages left alone are the ORIGINAL LangChain objects; a changed
  one is a copy of its original (a `ToolMessage` keeps its `tool_call_id`,
  `name`, `id`, `artifact`); new ones (a summary) are fresh messages. The
  system head (the system prompt plus anything a stage put there: templates,
  the running summary) becomes `request.system_message`;
- `request.tools` keeps the ORIGINAL tool objects the stages kept, in their
  order; provider built-in tools (dicts that are not functions) always stay;
- a stage that answers without the model (a cache hit) returns an `AIMessage`
  and the model is never called; otherwise the model's own `ModelResponse` is
  returned untouched.

Content the stages cannot read (images, audio, files: a multimodal agent model
reads them) is not refused: the stages see a message's text, and a message they
leave alone goes to the model as the original object, blocks and all. A message
a stage rewrites (cut, withheld, omitted) keeps the new text only, recorded in
the trace (`trace.of("langchain")`, `non_text_dropped`), so a withheld result
never reaches the model through its image. A call with such content is never
cached (the cache key sees text only). Details: `langchain_convert`.

A stage never orphans a tool result (stages drop whole tool-call units); the
adapter checks it after every conversion and raises `StageError` if one did.

Session identity (quarantine memo and facts, stored summaries, session-scoped
cache entries): `session=` when given (a string, or a function of the
request); else the LangGraph thread id (`config={"configurable": {"thread_id":
...}}`); else a per-middleware default, `"<middleware name>:<digest of the
conversation's first user message>"`, so runs without a thread id that are
different conversations do not share summaries or facts.

Generation settings for the cache key and budget: `request.model_settings`
(`max_tokens`, `temperature`, `top_p`, `stop`, `seed`), else the chat model's
own attributes of those names; unknown temperature counts as 0 (greedy). A
request with a `response_format` (structured output) is never cached.

The LangChain state is not changed: the next model call sends the full
history again and the stages engineer it again (quarantine and summaries are
memoized per session, so that costs little).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from contextwise.memory.store import Store
from contextwise.middleware.base import Stage, acompose, compose
from contextwise.middleware.budget import BudgetStage
from contextwise.middleware.cache import CacheStage, ResponseCache
from contextwise.middleware.context import EmbedderSource, coerce_policy, split_head
from contextwise.middleware.langchain_convert import (
    from_langchain_messages,
    from_langchain_tools,
    message_text,
    non_text_blocks,
    orphan_tool_results,
    reply_from_ai_message,
    reply_to_ai_message,
    to_langchain_message,
    tool_choice_from_langchain,
)
from contextwise.middleware.prune import PruneStage
from contextwise.middleware.quarantine import QuarantineStage
from contextwise.middleware.summarize import Summarizer, SummarizeStage
from contextwise.middleware.templating import TemplatingStage
from contextwise.middleware.tool_loadout import ToolLoadoutStage
from langchain.agents.middleware.types import (
    AgentMiddleware,
    ExtendedModelResponse,
    ModelRequest,
    ModelResponse,
)
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    SystemMessage,
    ToolMessage,
)
from pydantic import ValidationError

from contextwise.errors import InputError, StageError
from contextwise.policy import (
    Budget,
    Cache,
    Policy,
    Prune,
    Quarantine,
    Summarize,
    Templating,
    ToolLoadout,
)
from contextwise.types import (
    Call,
    Message,
    Params,
    Reply,
    Trace,
)

__all__ = [
    "BudgetMiddleware",
    "CacheMiddleware",
    "ContextwiseMiddleware",
    "PruneMiddleware",
    "QuarantineMiddleware",
    "StageMiddleware",
    "SummarizeMiddleware",
    "TemplatingMiddleware",
    "ToolLoadoutMiddleware",
    "from_langchain_messages",
    "from_langchain_tools",
    "model_identity",
    "orphan_tool_results",
    "reply_from_ai_message",
    "reply_to_ai_message",
    "to_langchain_message",
]

SessionSource = str | Callable[[ModelRequest], str | None] | None
UserSource = str | Callable[[ModelRequest], str | None] | None
VariablesSource = Mapping[str, Any] | Callable[[ModelRequest], Mapping[str, Any] | None] | None

# The request being engineered, for stage callbacks that need the model (its window,
# its identity for the cache key, a model summarizer). Copied into worker threads by
# asyncio.to_thread, so concurrent agent runs each see their own.
_REQUEST: contextvars.ContextVar[ModelRequest | None] = contextvars.ContextVar(
    "contextwise_langchain_request", default=None)

_COUNTERS: dict[str, itertools.count[int]] = {}
_COUNTERS_LOCK = threading.Lock()

def _unique_name(kind: str) -> str:
    with _COUNTERS_LOCK:
        n = next(_COUNTERS.setdefault(kind, itertools.count(1)))
    return f"contextwise_{kind}_{n}"


def _first_ai(result: Any) -> AIMessage | None:
    if isinstance(result, AIMessage):
        return result
    if isinstance(result, ExtendedModelResponse):
        result = result.model_response
    if isinstance(result, ModelResponse):
        return next((m for m in result.result if isinstance(m, AIMessage)), None)
    return None


# --------------------------------------------------------------------------- settings

_PARAM_SOURCES: dict[str, tuple[str, ...]] = {
    "max_tokens": ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_new_tokens"),
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "stop": ("stop", "stop_sequences"),
    "seed": ("seed",),
}


def _params(request: ModelRequest) -> Params:
    settings = request.model_settings or {}
    values: dict[str, Any] = {}
    for field, names in _PARAM_SOURCES.items():
        for where, source in (("model_settings", settings), ("model", None)):
            found = False
            for n in names:
                v = settings.get(n) if source is not None else getattr(request.model, n, None)
                if v is None:
                    continue
                try:
                    Params.model_validate({field: v})
                except ValidationError as e:
                    if where == "model_settings":  # the caller set it: say so
                        problem = e.errors()[0]["msg"].removeprefix("Value error, ")
                        raise InputError(f"model_settings.{n}", problem) from None
                    continue  # a model attribute we cannot read this way: not ours to judge
                values[field] = v
                found = True
                break
            if found:
                break
    # a provider's own form the stages cannot read counts as "auto"; the model gets it as is
    values["tool_choice"] = tool_choice_from_langchain(request.tool_choice, strict=False) or "auto"
    return Params.model_validate(values)


def model_identity(model: Any) -> str:
    """What the cache fingerprints as "the model" of a LangChain chat model."""
    name = ""
    for attr in ("model_name", "model", "model_id", "deployment_name"):
        v = getattr(model, attr, None)
        if isinstance(v, str) and v:
            name = v
            break
    return f"langchain:{type(model).__name__}:{name}"


def _model_window(model: Any) -> int | None:
    profile = getattr(model, "profile", None)
    if isinstance(profile, Mapping):
        n = profile.get("max_input_tokens")
        if isinstance(n, int) and n > 0:
            return n
    return None


# --------------------------------------------------------------------------- one model call


class _Run:
    """One model call: the Call built from the request, and the way back."""

    def __init__(self, mw: _AdapterMiddleware, request: ModelRequest):
        self.request = request
        self.system = request.system_message
        lc = ([self.system] if self.system is not None else []) + list(request.messages)
        # the stages read text; blocks they cannot see stay in the original messages
        converted = from_langchain_messages(lc, non_text="skip")
        self.non_text = any(non_text_blocks(o) for o in lc)
        self.lc, self.converted = lc, converted
        self.index = {id(m): k for k, m in enumerate(converted)}  # unchanged -> its original
        self.system_conv = converted[0] if self.system is not None else None
        self.by_tool_result = {o.tool_call_id: o for o in lc if isinstance(o, ToolMessage)}
        self.by_calls = {tc.get("id"): o for o in lc if isinstance(o, AIMessage)
                         for tc in o.tool_calls if tc.get("id")}
        self.orphans_before = set(orphan_tool_results(request.messages))

        tools = list(request.tools or [])
        self.tools_in = tools
        self.tool_of = from_langchain_tools(tools)
        staged = [t for t in self.tool_of if t is not None]
        names = [t.name for t in staged]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise InputError("tools", f"duplicate tool name {dup!r}")

        variables = mw._variables(request)
        self.call = Call(
            messages=converted,
            tools=staged,
            params=_params(request),
            session=mw._session(request, converted),
            user=mw._user(request),
            variables=dict(variables or {}),
            # never cached: structured output, or content the cache key cannot see
            cache="skip" if request.response_format is not None or self.non_text else "use",
        )
        self.ids_in = [id(m) for m in converted]
        self.names_in = names
        self.responses: dict[int, tuple[Reply, Any]] = {}
        self.seen: Call | None = None
        self.stage_names = ", ".join(getattr(s, "name", type(s).__name__) for s in mw.stages)

    # -- the way in (to the model)

    def request_for(self, call: Call) -> ModelRequest:
        """The LangChain request for the engineered call (the original one if nothing
        changed)."""
        self.seen = call
        overrides: dict[str, Any] = {}
        if [id(m) for m in call.messages] != self.ids_in:
            system, messages = self._messages(call)
            orphans = set(orphan_tool_results(messages)) - self.orphans_before
            if orphans:
                raise StageError(f"{self.stage_names} left tool result(s) without the "
                                 f"assistant call they answer: {sorted(orphans)}")
            if system is not self.system:
                overrides["system_message"] = system
            if len(messages) != len(self.request.messages) or any(
                    a is not b for a, b in zip(messages, self.request.messages, strict=False)):
                overrides["messages"] = messages
        kept = [t.name for t in call.tools]
        if kept != self.names_in:
            keep = set(kept)
            overrides["tools"] = [o for o, t in zip(self.tools_in, self.tool_of, strict=True)
                                  if t is None or t.name in keep]
        if call.params.max_tokens != self.call.params.max_tokens and call.params.max_tokens:
            overrides["model_settings"] = {**(self.request.model_settings or {}),
                                           "max_tokens": call.params.max_tokens}
        return self.request.override(**overrides) if overrides else self.request

    def _messages(self, call: Call) -> tuple[SystemMessage | None, list[BaseMessage]]:
        out = call.messages
        head = split_head(out)
        system: SystemMessage | None
        if head == 0:
            system = None
        elif head == 1 and out[0] is self.system_conv:
            system = self.system
        elif (out[0] is self.system_conv and self.system is not None
              and isinstance(self.system.content, list)):
            # content blocks (e.g. with cache_control) stay; what stages added follows
            extra = "\n\n".join(m.content for m in out[1:head] if m.content)
            system = self.system.model_copy(update={"content": [
                *self.system.content, {"type": "text", "text": "\n\n" + extra}]})
        else:
            text = "\n\n".join(m.content for m in out[:head] if m.content)
            if self.system is not None:  # a copy: its id and any non-text blocks stay
                system = cast("SystemMessage", to_langchain_message(
                    Message(role="system", content=text), self.system))
            else:
                system = SystemMessage(content=text)
        body = out[head:]
        messages: list[BaseMessage] = []
        dropped = []
        for k, (m, original) in enumerate(zip(body, self._originals(body), strict=True)):
            back = (original if original is not None and id(m) in self.index
                    else to_langchain_message(m, original))
            if original is not None and back is not original and (
                    kinds := non_text_blocks(original)):
                # a stage rewrote what it could read; what it could not read goes with it
                dropped.append({"index": k, "blocks": kinds})
            messages.append(back)
        if dropped:
            call.trace.add("langchain", non_text_dropped=dropped)
        return system, messages

    def _originals(self, body: list[Message]) -> list[BaseMessage | None]:
        """The LangChain message each outgoing message was made from (None: a new one).

        Unchanged messages are their originals; a changed tool result is found by its
        tool_call_id, a changed tool-call turn by its calls' ids; any other changed
        message by position: the one message of its role between the unchanged
        neighbours (stages rewrite in place; they do not reorder)."""
        at = [self.index.get(id(m)) for m in body]
        lo, hi = [-1] * len(body), [len(self.lc)] * len(body)
        for j in range(1, len(body)):
            prev = at[j - 1]
            lo[j] = prev if prev is not None else lo[j - 1]
        for j in range(len(body) - 2, -1, -1):
            nxt = at[j + 1]
            hi[j] = nxt if nxt is not None else hi[j + 1]
        taken = {k for k in at if k is not None}
        found: list[BaseMessage | None] = []
        for j, m in enumerate(body):
            k = at[j]
            if k is not None:
                found.append(self.lc[k])
            elif m.role == "tool":
                found.append(self.by_tool_result.get(m.tool_call_id or ""))
            elif m.role == "assistant" and m.tool_calls:
                found.append(self.by_calls.get(m.tool_calls[0].id))
            else:
                same = [i for i in range(lo[j] + 1, hi[j])
                        if i not in taken and self.converted[i].role == m.role]
                if len(same) == 1:
                    taken.add(same[0])
                found.append(self.lc[same[0]] if len(same) == 1 else None)
        return found

    # -- the way out (from the model)

    def reply_of(self, response: Any) -> Reply:
        ai = _first_ai(response)
        if ai is None:  # nothing we can read: never cached, returned untouched
            reply = Reply(message=Message(role="assistant", content=""), finish_reason="error")
        else:
            reply = reply_from_ai_message(ai)
        if self.seen is not None:
            reply.trace = self.seen.trace
        self.responses[id(reply)] = (reply, response)
        return reply

    def result(self, reply: Reply) -> Any:
        """The model's own response when the stages passed it through, else an AIMessage."""
        known = self.responses.get(id(reply))
        if known is not None and known[0] is reply:
            return known[1]
        return ModelResponse(result=[reply_to_ai_message(reply)])


# --------------------------------------------------------------------------- the adapter


class _OffLoop:
    """A stage whose async side would run `apply` on the event loop: run it in a thread."""

    def __init__(self, stage: Any):
        self.stage = stage
        self.name = getattr(stage, "name", type(stage).__name__)

    def __call__(self, call: Call, next: Any) -> Reply:
        return self.stage(call, next)

    async def acall(self, call: Call, anext: Any) -> Reply:
        call = await asyncio.to_thread(self.stage.apply, call)
        return self.stage.on_reply(call, await anext(call))


def _async_stage(stage: Any) -> Any:
    if isinstance(stage, Stage) and type(stage).acall is Stage.acall:
        return _OffLoop(stage)
    return stage  # its own acall, or a plain callable (acompose runs it in a thread)


class _AdapterMiddleware(AgentMiddleware):
    """Runs contextwise stages (outermost first) around a LangChain model call."""

    _kind = "stages"

    def __init__(
        self,
        stages: Sequence[Any],
        *,
        name: str | None = None,
        session: SessionSource = None,
        user: UserSource = None,
        variables: VariablesSource = None,
        on_trace: Callable[[Trace], Any] | None = None,
    ):
        super().__init__()
        for i, s in enumerate(stages):
            if not callable(s):
                raise InputError(f"stages[{i}]", f"a stage must be callable "
                                 f"(stage(call, next) -> Reply), got {type(s).__name__}")
        if name is not None and (not isinstance(name, str) or not name):
            raise InputError("name", "must be a non-empty string")
        for what, v in (("session", session), ("user", user)):
            if v is not None and not isinstance(v, str) and not callable(v):
                raise InputError(what, f"must be a string or a function of the request, "
                                 f"got {type(v).__name__}")
        if variables is not None and not isinstance(variables, Mapping) and not callable(
                variables):
            raise InputError("variables", "must be a mapping or a function of the request")
        if on_trace is not None and not callable(on_trace):
            raise InputError("on_trace", "must be callable")
        self.stages = list(stages)
        self._async_stages = [_async_stage(s) for s in self.stages]
        self._name = name or _unique_name(self._kind)
        self._session_source = session
        self._user_source = user
        self._variables_source = variables
        self.on_trace = on_trace
        self.last_trace: Trace | None = None

    @property
    def name(self) -> str:  # unique per instance: one class may be used twice in an agent
        return self._name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r})"

    # -- per-request identity

    def _session(self, request: ModelRequest, messages: Sequence[Message]) -> str | None:
        src = self._session_source
        if isinstance(src, str):
            return src
        if callable(src):
            return src(request)
        thread = _thread_id(request)
        if thread is not None:
            return thread
        first = next((m.text for m in messages if m.role == "user"), "")
        return f"{self._name}:{hashlib.sha256(first.encode()).hexdigest()[:16]}"

    def _user(self, request: ModelRequest) -> str | None:
        src = self._user_source
        return src(request) if callable(src) else src

    def _variables(self, request: ModelRequest) -> Mapping[str, Any] | None:
        src = self._variables_source
        out = src(request) if callable(src) else src
        if out is not None and not isinstance(out, Mapping):
            raise InputError("variables", f"the function returned {type(out).__name__}, "
                             "not a mapping")
        return out

    # -- the hooks

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], Any]
                        ) -> Any:
        token = _REQUEST.set(request)
        try:
            t0 = time.perf_counter()
            run = _Run(self, request)

            def inner(call: Call) -> Reply:
                return run.reply_of(handler(run.request_for(call)))

            reply = compose(self.stages, inner)(run.call)
            self._done(run, reply, time.perf_counter() - t0)
            return run.result(reply)
        finally:
            _REQUEST.reset(token)

    async def awrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest],
                                                                                Any]) -> Any:
        token = _REQUEST.set(request)
        try:
            t0 = time.perf_counter()
            run = await asyncio.to_thread(_Run, self, request)

            async def inner(call: Call) -> Reply:
                return run.reply_of(await handler(run.request_for(call)))

            reply = await acompose(self._async_stages, inner)(run.call)
            await asyncio.to_thread(self._done, run, reply, time.perf_counter() - t0)
            return run.result(reply)
        finally:
            _REQUEST.reset(token)

    def _done(self, run: _Run, reply: Reply, seconds: float) -> None:
        reply.latency_s = seconds
        self.last_trace = run.call.trace
        if self.on_trace is not None:
            self.on_trace(run.call.trace)


def _thread_id(request: ModelRequest) -> str | None:
    info = getattr(getattr(request, "runtime", None), "execution_info", None)
    thread = getattr(info, "thread_id", None)
    if thread:
        return str(thread)
    try:
        from langgraph.config import get_config

        thread = (get_config().get("configurable") or {}).get("thread_id")
    except (RuntimeError, ImportError):
        return None
    return str(thread) if thread else None


class StageMiddleware(_AdapterMiddleware):
    """Any one stage (`stage(call, next) -> Reply`, e.g. a `Stage` subclass of your own) as
    LangChain agent middleware. The named subclasses build the stage from its policy."""

    def __init__(self, stage: Any, **options: Any):
        self._kind = getattr(stage, "name", None) or "stage"
        super().__init__([stage], **options)

    @property
    def stage(self) -> Any:
        return self.stages[0]


# --------------------------------------------------------------------------- one per stage


class QuarantineMiddleware(StageMiddleware):
    """Withholds flagged tool results (injection, tool errors, contradictions, oversized
    blobs) before the model reads them: `QuarantineMiddleware(Quarantine(...))`."""

    def __init__(self, policy: Quarantine | QuarantineStage | Mapping[str, Any] | None = None,
                 *, store: Store | None = None, embedder: EmbedderSource = None,
                 volatile: Sequence[str] | None = None, **options: Any):
        stage = policy if isinstance(policy, QuarantineStage) else QuarantineStage(
            coerce_policy(policy, Quarantine), store=store, embedder=embedder,
            volatile=volatile)
        super().__init__(stage, **options)


class SummarizeMiddleware(StageMiddleware):
    """Folds old turns into a running summary (stored per session) past `trigger_tokens`;
    the cut never separates a tool call from its results."""

    def __init__(self, policy: Summarize | SummarizeStage | Mapping[str, Any] | None = None,
                 *, store: Store | None = None, summarizer: Summarizer | None = None,
                 **options: Any):
        if isinstance(policy, SummarizeStage):
            stage = policy
        else:
            p = coerce_policy(policy, Summarize)
            if summarizer is None and p.mode == "model":
                summarizer = agent_model_summarizer()
            stage = SummarizeStage(p, store=store, summarizer=summarizer)
        super().__init__(stage, **options)


class PruneMiddleware(StageMiddleware):
    """Drops duplicates, superseded and stale tool results, and cuts long items to what the
    query needs."""

    def __init__(self, policy: Prune | PruneStage | Mapping[str, Any] | None = None, *,
                 embedder: EmbedderSource = None, **options: Any):
        stage = policy if isinstance(policy, PruneStage) else PruneStage(
            coerce_policy(policy, Prune), embedder=embedder)
        super().__init__(stage, **options)


class ToolLoadoutMiddleware(StageMiddleware):
    """Shows the model only the `top_k` tools the request needs: `request.tools` is
    filtered to the original tool objects it keeps."""

    def __init__(self, policy: ToolLoadout | ToolLoadoutStage | Mapping[str, Any] | None = None,
                 *, embedder: EmbedderSource = None, cache_dir: str | Path | None = None,
                 examples: Mapping[str, Sequence[str]] | None = None,
                 learn_from_calls: bool = False, **options: Any):
        stage = policy if isinstance(policy, ToolLoadoutStage) else ToolLoadoutStage(
            coerce_policy(policy, ToolLoadout), embedder=embedder, cache_dir=cache_dir,
            examples=examples, learn_from_calls=learn_from_calls)
        super().__init__(stage, **options)


class _AgentBudgetStage(BudgetStage):
    """Budget fit whose window is the agent model's (its profile's `max_input_tokens`)
    unless given; with no window and no `max_context_tokens` it passes calls through."""

    def __init__(self, budget: Budget | None = None, *,
                 window: int | Callable[[], int | None] | None = None,
                 counter: Callable[[Call], int] | None = None):
        self._given_window = window
        super().__init__(budget, window=self._agent_window, counter=counter)

    def _agent_window(self) -> int | None:
        w = self._given_window
        if callable(w):
            return w()
        if w is not None:
            return w
        request = _REQUEST.get()
        return _model_window(request.model) if request is not None else None

    def apply(self, call: Call) -> Call:
        if self.budget.max_context_tokens is None and not self._agent_window():
            call.trace.add(self.name, passthrough=True,
                           reason="no window: set Budget.max_context_tokens or a model "
                                  "profile with max_input_tokens")
            return call
        return super().apply(call)


class BudgetMiddleware(StageMiddleware):
    """Fits the prompt into the window (model profile's `max_input_tokens`, or
    `Budget.max_context_tokens`, or `window=`) by dropping whole old units; counts cl100k
    tokens unless `counter=` is given. Raises `ContextOverflow` when pinned content alone
    does not fit."""

    def __init__(self, budget: Budget | BudgetStage | Mapping[str, Any] | None = None, *,
                 window: int | Callable[[], int | None] | None = None,
                 counter: Callable[[Call], int] | None = None, **options: Any):
        stage = budget if isinstance(budget, BudgetStage) else _AgentBudgetStage(
            coerce_policy(budget, Budget), window=window, counter=counter)
        super().__init__(stage, **options)


class _AgentCache(ResponseCache):
    """A ResponseCache whose model identity, unless fixed, is the request's chat model."""

    @property  # type: ignore[override]
    def model(self) -> str:
        if self._fixed_model:
            return self._fixed_model
        request = _REQUEST.get()
        return model_identity(request.model) if request is not None else ""

    @model.setter
    def model(self, value: str) -> None:
        self._fixed_model = value


class CacheMiddleware(StageMiddleware):
    """Answers a repeated question from the response cache without calling the model, and
    stores the model's answers. Put it LAST in `middleware=[...]` so its key is the context
    the model really sees. `model_id` (default: the chat model's class and name) is part of
    every key."""

    def __init__(self, policy: Cache | CacheStage | Mapping[str, Any] | None = None, *,
                 store: Store | None = None, path: str | Path | None = None,
                 embedder: EmbedderSource = None, model_id: str | None = None,
                 cache: ResponseCache | None = None, **options: Any):
        if isinstance(policy, CacheStage):
            stage = policy
        else:
            p = coerce_policy(policy, Cache)
            stage = CacheStage(p, cache=cache or _AgentCache(
                p, store=store, path=path, embedder=embedder, model=model_id or ""))
        super().__init__(stage, **options)

    @property
    def cache(self) -> ResponseCache:
        return self.stage.cache


class TemplatingMiddleware(StageMiddleware):
    """Assembles the system prompt from a template, instructions, a length limit and
    few-shot examples; `variables=` (a mapping or a function of the request) fills the
    template. A lowered `max_tokens` goes into `model_settings`."""

    def __init__(self, policy: Templating | TemplatingStage | Mapping[str, Any] | None = None,
                 *, embedder: EmbedderSource = None, registry: Any = None, **options: Any):
        stage = policy if isinstance(policy, TemplatingStage) else TemplatingStage(
            coerce_policy(policy, Templating), embedder=embedder, registry=registry)
        super().__init__(stage, **options)


# --------------------------------------------------------------------------- a whole policy


def agent_model_summarizer() -> Summarizer:
    """For `Summarize(mode="model")`: summaries written by the agent's own chat model."""
    from contextwise.middleware.summarize import model_summarizer

    def generate(messages: list[Message], max_tokens: int) -> str:
        request = _REQUEST.get()
        if request is None:
            raise RuntimeError("no agent model: the summarizer runs inside a model call only")
        # "nostream": LangGraph keeps the summary out of the agent's message stream
        out = request.model.invoke([to_langchain_message(m) for m in messages],
                                   config={"tags": ["nostream", "contextwise_summary"]})
        return message_text(out)

    return model_summarizer(generate)


class ContextwiseMiddleware(_AdapterMiddleware):
    """A whole `Policy` as one middleware: templating, quarantine, summarize, prune, tool
    loadout, budget fit and the cache (last), in the pipeline's order
    (`contextwise.pipeline.build_stages`).

    `store`: the SQLite store for quarantine records, summaries, cache entries and the
    ledger (default: `policy.storage.path`). `model_id`: the model identity in cache keys
    (default: the chat model's class and name). Budget fit uses `Budget.max_context_tokens`
    and/or the model profile's `max_input_tokens` (cl100k counts). With
    `policy.storage.ledger`, every model call is recorded for `contextwise report`.
    """

    _kind = "policy"

    def __init__(self, policy: Policy | Mapping[str, Any] | None = None, *,
                 store: Store | None = None, model_id: str | None = None,
                 embedder: EmbedderSource = None, summarizer: Summarizer | None = None,
                 **options: Any):
        from contextwise.retrievers.embedder import get_embedder

        from contextwise.pipeline import build_stages

        if isinstance(policy, Mapping):
            policy = Policy.from_dict(dict(policy))
        if policy is not None and not isinstance(policy, Policy):
            raise InputError("policy", f"must be a contextwise Policy, got "
                             f"{type(policy).__name__}")
        self.policy = policy = policy or Policy()
        self.store = store or Store(policy.storage.path)
        if embedder is None:
            model, device = policy.embedding.model, policy.embedding.device
            embedder = functools.partial(get_embedder, model, device)
        # the pipeline's stages and order; budget fit and the cache are the agent's own
        # (the model's window, the chat model's identity in cache keys)
        built = build_stages(policy.model_copy(update={"cache": None}), store=self.store,
                             embedder=embedder)
        stages = [s for s in built if getattr(s, "name", "") != "budget"]
        for s in stages:
            if isinstance(s, SummarizeStage) and policy.summarize is not None and (
                    policy.summarize.mode == "model"):
                s.summarizer = summarizer or agent_model_summarizer()
        stages.append(_AgentBudgetStage(policy.budget))
        if policy.cache is not None:
            stages.append(CacheStage(policy.cache, cache=_AgentCache(
                policy.cache, store=self.store, embedder=embedder, model=model_id or "")))
        self.ledger = None
        if policy.storage.ledger:
            from contextwise.memory.ledger import Ledger

            self.ledger = Ledger(self.store)
        super().__init__(stages, **options)

    @property
    def cache(self) -> ResponseCache | None:
        return next((s.cache for s in self.stages if isinstance(s, CacheStage)), None)

    def _done(self, run: _Run, reply: Reply, seconds: float) -> None:
        super()._done(run, reply, seconds)
        if self.ledger is not None:
            from contextwise.middleware.budget import approx_prompt_tokens

            if not reply.model:
                reply.model = model_identity(run.request.model)
            # The agent's model tokenizer is unknown: scale the cl100k count of the raw
            # call by the model's own count of what it saw, so both are in its tokens.
            raw = approx_prompt_tokens(run.call)
            seen = approx_prompt_tokens(run.seen or run.call)
            if reply.usage.prompt_tokens and seen:
                raw = round(raw * reply.usage.prompt_tokens / seen)
            self.ledger.record(run.call, run.seen or run.call, reply, raw)
