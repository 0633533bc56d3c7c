"""The backend contract: one batch-native method, `generate(calls) -> replies`.

A backend turns finished Calls into Replies. It knows nothing about stages,
policies of other stages, or storage; it streams by calling `call.on_delta`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from contextwise.types import Call, Message, Reply, Tool

__all__ = ["Backend"]


class Backend(ABC):
    model_name: str = ""
    context_window: int = 0

    @abstractmethod
    def generate(self, calls: Sequence[Call]) -> list[Reply]:
        """One Reply per Call, in order."""

    async def agenerate(self, calls: Sequence[Call]) -> list[Reply]:
        # Model work is blocking; keep the event loop free.
        return await asyncio.to_thread(self.generate, calls)

    @abstractmethod
    def count_tokens(self, messages: Sequence[Message], tools: Iterable[Tool] = ()) -> int:
        """Exact prompt tokens of these messages and tools for this model."""

    def prompt_tokens(self, call: Call) -> int:
        """Exact prompt tokens of this call as the backend would render it."""
        return self.count_tokens(call.messages, call.tools)
