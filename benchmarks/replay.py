"""A backend that replays scripted assistant turns, for benchmarks of the context stages.

The agent-trace and overhead benchmarks measure what the stages do to the
prompt, not what a model writes, so the assistant side of the session is
scripted: each `generate` returns the next queued reply and keeps the call it
was given (the engineered prompt) for inspection. Tokens are counted with
cl100k_base, the same count the ledger uses for hosted-model costs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from contextwise.backends.base import Backend

from contextwise.tokens import count_messages
from contextwise.types import Call, Message, Reply, Tool, ToolCall, Usage


class ReplayBackend(Backend):
    model_name = "replay"

    def __init__(self, context_window: int = 8192):
        self.context_window = context_window
        self.queue: deque[Message] = deque()
        self.seen: list[Call] = []

    def say(self, text: str) -> None:
        self.queue.append(Message(role="assistant", content=text))

    def call_tool(self, name: str, arguments: dict[str, Any]) -> None:
        self.queue.append(Message(role="assistant", tool_calls=[ToolCall(name=name, arguments=arguments)]))

    def count_tokens(self, messages: Sequence[Message], tools: Iterable[Tool] = ()) -> int:
        return count_messages(list(messages), list(tools))

    def generate(self, calls: Sequence[Call]) -> list[Reply]:
        out = []
        for call in calls:
            self.seen.append(call)
            message = self.queue.popleft() if self.queue else Message(role="assistant", content="")
            out.append(Reply(message=message, model=self.model_name,
                             usage=Usage(prompt_tokens=self.prompt_tokens(call))))
        return out
