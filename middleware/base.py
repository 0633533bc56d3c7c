"""The stage contract and the one loop that builds the onion.

A stage is any callable `stage(call, next) -> Reply`. It may rewrite the call
(return `next(changed_copy)`), answer without calling `next` (a cache hit), or
look at the reply on the way out. Its async twin is `stage.acall(call, anext)`;
a plain function without one still works on the async path (it runs in a
worker thread). The first stage listed is the outermost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from contextwise.types import Call, Reply

__all__ = ["ANext", "Next", "Stage", "acompose", "compose"]

Next = Callable[[Call], Reply]
ANext = Callable[[Call], Awaitable[Reply]]


class Stage:
    """Base for stages. Override `apply` (request side, needs no model) and/or
    `on_reply` (reply side); override `__call__`/`acall` to short-circuit."""

    name = "stage"

    def apply(self, call: Call) -> Call:
        return call

    def on_reply(self, call: Call, reply: Reply) -> Reply:
        return reply

    def __call__(self, call: Call, next: Next) -> Reply:
        call = self.apply(call)
        return self.on_reply(call, next(call))

    async def acall(self, call: Call, anext: ANext) -> Reply:
        # request-side work (embedding, counting, SQLite) stays off the event loop
        call = await asyncio.to_thread(self.apply, call)
        return self.on_reply(call, await anext(call))


def _link(stage: Callable[[Call, Next], Reply], then: Next) -> Next:
    # a function of its own binds this stage and this `then`, not the loop's last ones
    return lambda call: stage(call, then)


def _alink(stage: Any, anext: ANext) -> ANext:
    return lambda call: stage.acall(call, anext)


def compose(stages: Sequence[Callable[[Call, Next], Reply]], inner: Next) -> Next:
    handler = inner
    for stage in reversed(stages):
        handler = _link(stage, handler)
    return handler


def _threaded(stage: Callable[[Call, Next], Reply], anext: ANext) -> ANext:
    """Run a sync-only stage off the loop; its `next` hops back onto the loop."""

    async def run(call: Call) -> Reply:
        loop = asyncio.get_running_loop()

        async def awaited(step: Awaitable[Reply]) -> Reply:  # a coroutine, as the loop needs
            return await step

        def sync_next(c: Call) -> Reply:
            return asyncio.run_coroutine_threadsafe(awaited(anext(c)), loop).result()

        return await asyncio.to_thread(stage, call, sync_next)

    return run


def acompose(stages: Sequence[Any], inner: ANext) -> ANext:
    handler = inner
    for stage in reversed(stages):
        if hasattr(stage, "acall"):
            handler = _alink(stage, handler)
        else:
            handler = _threaded(stage, handler)
    return handler
