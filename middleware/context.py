"""Helpers every context stage shares: token counts, turns, tool-call units, tracing.

A *unit* is what a stage may drop or keep as a whole: an assistant message that
calls tools together with the tool messages answering it, or any other single
message. Working in units is how no stage ever orphans a tool result.
A *turn* starts at each user message; system messages before the first user
message are the head, which stages leave alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

from contextwise.retrievers.embedder import DEFAULT_EMBEDDER, Embedder, get_embedder
from pydantic import BaseModel, ValidationError

from contextwise.errors import PolicyError
from contextwise.tokens import count_text
from contextwise.types import Call, Message, Tool

P = TypeVar("P", bound=BaseModel)

__all__ = [
    "EmbedderSource",
    "coerce_policy",
    "count_messages",
    "embedder_getter",
    "latest_query",
    "message_text",
    "message_tokens",
    "record",
    "split_head",
    "tool_tokens",
    "turn_index",
    "units",
]

EmbedderSource: TypeAlias = Embedder | Callable[[], Embedder] | None


def embedder_getter(source: EmbedderSource, model: str = DEFAULT_EMBEDDER) -> Callable[[], Embedder]:
    """A zero-argument getter; the shared default embedder loads on first use only."""
    if isinstance(source, Embedder):
        return lambda: source
    if source is not None:
        return source
    return lambda: get_embedder(model)


def message_text(m: Message) -> str:
    """What a message says, tool calls included (for counting, hashing, embedding)."""
    parts = [m.content or ""]
    for tc in m.tool_calls or []:
        parts.append(f"{tc.name}({json.dumps(tc.arguments, sort_keys=True)})")
    return "\n".join(p for p in parts if p)


def message_tokens(m: Message) -> int:
    """cl100k tokens of one message plus OpenAI's per-message framing (3)."""
    return count_text(message_text(m)) + 3


def tool_tokens(tool: Tool) -> int:
    """cl100k tokens of a tool's OpenAI schema (the JSON a hosted model is sent)."""
    return count_text(json.dumps(tool.to_openai()))


def coerce_policy(policy: P | Mapping[str, Any] | None, cls: type[P]) -> P:
    """A stage's sub-policy from None (defaults), an instance or a dict; PolicyError otherwise."""
    if policy is None:
        return cls()
    if isinstance(policy, cls):
        return policy
    what = cls.__name__
    if isinstance(policy, Mapping):
        try:
            return cls.model_validate(dict(policy))
        except ValidationError as e:
            raise PolicyError(f"invalid {what.lower()} policy: {e.errors()[0]['msg']}") from None
    raise PolicyError(f"{what}Stage needs a {what} policy, got {type(policy).__name__}")


def count_messages(messages: Sequence[Message]) -> int:
    return sum(message_tokens(m) for m in messages)


def split_head(messages: Sequence[Message]) -> int:
    """Index of the first non-system message: messages[:i] is the head."""
    for i, m in enumerate(messages):
        if m.role != "system":
            return i
    return len(messages)


def turn_index(messages: Sequence[Message]) -> list[int]:
    """For each message, the number of its turn (a turn starts at a user message)."""
    out, turn = [], 0
    for i, m in enumerate(messages):
        if m.role == "user" and i > 0:
            turn += 1
        out.append(turn)
    return out


def units(messages: Sequence[Message]) -> list[list[int]]:
    """Index groups that must stay together: an assistant tool call and its results."""
    out: list[list[int]] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        group = [i]
        if m.role == "assistant" and m.tool_calls:
            ids = {tc.id for tc in m.tool_calls}
            j = i + 1
            while j < len(messages) and messages[j].role == "tool" and messages[j].tool_call_id in ids:
                group.append(j)
                j += 1
        out.append(group)
        i = group[-1] + 1
    return out


def latest_query(call: Call) -> str:
    """The text the current request is about: the last user message."""
    for m in reversed(call.messages):
        if m.role == "user" and m.content:
            return m.content
    return ""


def record(call: Call, stage: str, before: Sequence[Message], after: Sequence[Message], **data: object) -> None:
    """Trace one stage's effect with the token counts the ledger sums."""
    call.trace.add(
        stage,
        tokens_before=count_messages(before),
        tokens_after=count_messages(after),
        messages_before=len(before),
        messages_after=len(after),
        **data,
    )
