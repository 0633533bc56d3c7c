"""`contextwise.wrap(fn)`: the pipeline in front of any chat function.

    ask = contextwise.wrap(my_client_call, model="gpt-4o-mini")
    text = ask([{"role": "user", "content": "Hi"}], session="u1")

`fn` takes OpenAI-style message dicts and returns the reply text (a hosted
model's client, a local server, a test double); it may be sync or async. The
wrapped callable runs the policy's stages first (quarantine, summaries,
pruning, tool loadout, budget fit and the response cache), so `fn` sees a
smaller context and is not called at all on a cache hit. Tokens are counted
with cl100k (the function's own tokenizer is unknown). `fn` also gets
`max_tokens`, `temperature`, `top_p`, `stop`, `seed` and `tools` when its
signature names them (or takes **kwargs).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from contextwise.backends.base import Backend
from contextwise.errors import BackendError, InputError
from contextwise.pipeline import Pipeline
from contextwise.policy import Policy
from contextwise.types import Call, Message, Reply, Tool, Usage

__all__ = ["FunctionBackend", "Wrapped", "wrap"]

DEFAULT_WINDOW = 128_000  # hosted chat models' usual window; set context_window= to change
_FORWARDED = ("max_tokens", "temperature", "top_p", "stop", "seed")


class FunctionBackend(Backend):
    """A backend that calls `fn(messages, **params) -> str`."""

    def __init__(self, fn: Callable[..., str | Awaitable[str]], model_name: str,
                 context_window: int = DEFAULT_WINDOW):
        if not callable(fn):
            raise InputError("fn", f"must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.model_name = model_name
        self.context_window = context_window
        self.is_async = inspect.iscoroutinefunction(fn)
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # builtins without a signature: messages only
            sig = None
        params = sig.parameters if sig else {}
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._accepts = {n for n in (*_FORWARDED, "tools") if takes_all or n in params}

    def _args(self, call: Call) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        messages = [m.to_openai() for m in call.messages]
        p = call.params
        kwargs = {n: getattr(p, n) for n in _FORWARDED if n in self._accepts
                  and getattr(p, n) is not None}
        if "tools" in self._accepts and call.tools:
            kwargs["tools"] = [t.to_openai() for t in call.tools]
        return messages, kwargs

    def _reply(self, call: Call, text: Any, t0: float) -> Reply:
        """The function's answer as a Reply (and, for a streaming call, one delta)."""
        if call.on_delta is not None and isinstance(text, str) and text:
            call.on_delta(text)
        if not isinstance(text, str):
            raise BackendError(f"the wrapped function returned {type(text).__name__}, not str")
        from contextwise.tokens import count_messages, count_text

        call.trace.add("backend", model=self.model_name, function=True)
        return Reply(
            message=Message(role="assistant", content=text),
            usage=Usage(prompt_tokens=count_messages(call.messages, call.tools),
                        completion_tokens=count_text(text)),
            model=self.model_name, trace=call.trace, latency_s=time.perf_counter() - t0,
        )

    def generate(self, calls: Sequence[Call]) -> list[Reply]:
        out = []
        for call in calls:
            t0 = time.perf_counter()
            messages, kwargs = self._args(call)
            result = self.fn(messages, **kwargs)
            if inspect.isawaitable(result):
                result = asyncio.run(_awaited(result))
            out.append(self._reply(call, result, t0))
        return out

    async def agenerate(self, calls: Sequence[Call]) -> list[Reply]:
        if not self.is_async:
            return await asyncio.to_thread(self.generate, calls)
        out = []
        for call in calls:
            t0 = time.perf_counter()
            messages, kwargs = self._args(call)
            result = await self.fn(messages, **kwargs)  # type: ignore[misc]
            out.append(self._reply(call, result, t0))
        return out

    def count_tokens(self, messages: Sequence[Message], tools: Iterable[Tool] = ()) -> int:
        from contextwise.tokens import count_messages

        return count_messages(messages, tools)


async def _awaited(result: Awaitable[Any]) -> Any:
    return await result


class Wrapped:
    """The wrapped function: `wrapped(messages, session=None, **params) -> str`.

    `.chat(...)` returns the full `Reply` (usage, trace), `await .acall(...)` and
    `await .achat(...)` are the async twins; `.pipeline` is the Pipeline behind it.
    """

    def __init__(self, pipeline: Pipeline, fn: Callable[..., Any]):
        self.pipeline = pipeline
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", "wrapped")
        self.__doc__ = getattr(fn, "__doc__", None)

    def chat(self, messages: Sequence[Mapping[str, Any] | Message], session: str | None = None,
             **params: Any) -> Reply:
        return self.pipeline(messages, session=session, **params)

    def __call__(self, messages: Sequence[Mapping[str, Any] | Message],
                 session: str | None = None, **params: Any) -> str:
        return self.chat(messages, session=session, **params).text

    async def achat(self, messages: Sequence[Mapping[str, Any] | Message],
                    session: str | None = None, **params: Any) -> Reply:
        return await self.pipeline.achat(messages, session=session, **params)

    async def acall(self, messages: Sequence[Mapping[str, Any] | Message],
                    session: str | None = None, **params: Any) -> str:
        return (await self.achat(messages, session=session, **params)).text


def wrap(
    fn: Callable[..., Any],
    policy: Policy | None = None,
    *,
    model: str | None = None,
    context_window: int | None = None,
    store: Any = None,
) -> Wrapped:
    """Put the pipeline in front of `fn(messages) -> str` (see the module doc).

    `model` names what `fn` calls (the response cache keys on it; default: the
    function's qualified name). `context_window`: the model's window for budget
    fit (default: `policy.budget.max_context_tokens`, else 128,000).
    """
    policy = policy or Policy()
    window = context_window or policy.budget.max_context_tokens or DEFAULT_WINDOW
    name = model or getattr(fn, "__qualname__", None) or type(fn).__name__
    backend = FunctionBackend(fn, model_name=name, context_window=window)
    return Wrapped(Pipeline(policy, backend=backend, store=store), fn)
