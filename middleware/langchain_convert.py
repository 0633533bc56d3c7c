"""Converting between LangChain and contextwise: messages, replies and tools.

Shared by the agent middleware (middleware/langchain.py) and the
`ChatContextwise` chat model. Needs langchain-core (the `langchain` extra).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ValidationError

from contextwise.errors import InputError
from contextwise.types import InvalidToolCall, Message, Reply, Tool, ToolCall, Usage

__all__ = [
    "from_langchain_message",
    "message_text",
    "from_langchain_messages",
    "from_langchain_tools",
    "orphan_tool_results",
    "reply_from_ai_message",
    "reply_to_ai_message",
    "to_langchain_message",
]

TOOL_MEMO = 4096  # converted BaseTool schemas kept (an agent resends the same tools)


# --------------------------------------------------------------------------- messages

_ROLE_OF_CHAT = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant",
                 "system": "system", "developer": "system", "tool": "tool"}


def message_text(m: BaseMessage) -> str:
    """The text of a message (text blocks joined; images and other blocks left out)."""
    return str(m.text)


def _tool_call_id(tc: Mapping[str, Any], i: int, j: int) -> str:
    return tc.get("id") or f"lc_call_{i}_{j}"


def from_langchain_message(m: BaseMessage, i: int = 0) -> Message:
    """One LangChain message as a contextwise `Message` (InputError names `messages[i]`)."""
    try:
        if isinstance(m, SystemMessage):
            return Message(role="system", content=message_text(m))
        if isinstance(m, HumanMessage):
            return Message(role="user", content=message_text(m), name=m.name or None)
        if isinstance(m, AIMessage):
            calls = [ToolCall(id=_tool_call_id(tc, i, j), name=tc["name"],
                              arguments=dict(tc.get("args") or {}))
                     for j, tc in enumerate(m.tool_calls)]
            return Message(role="assistant", content=message_text(m), name=m.name or None,
                           tool_calls=calls or None)
        if isinstance(m, ToolMessage):
            return Message(role="tool", content=message_text(m), name=m.name or None,
                           tool_call_id=m.tool_call_id)
        if isinstance(m, ChatMessage) and m.role in _ROLE_OF_CHAT:
            role = _ROLE_OF_CHAT[m.role]
            if role == "tool":
                raise ValueError("a ChatMessage with role 'tool' has no tool_call_id; "
                                 "use ToolMessage")
            return Message(role=role, content=message_text(m), name=m.name or None)  # type: ignore[arg-type]
    except ValidationError as e:
        problem = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise InputError(f"messages[{i}]", problem) from None
    except ValueError as e:
        raise InputError(f"messages[{i}]", str(e)) from None
    kind = type(m).__name__ + (f" (role {m.role!r})" if isinstance(m, ChatMessage) else "")
    raise InputError(f"messages[{i}]", f"unsupported LangChain message type {kind}: use "
                     "SystemMessage, HumanMessage, AIMessage or ToolMessage")


def from_langchain_messages(messages: Sequence[BaseMessage]) -> list[Message]:
    """LangChain messages as contextwise Messages, in order (errors name the index)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise InputError("messages", "must be a list of LangChain messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, BaseMessage):
            raise InputError(f"messages[{i}]",
                             f"must be a LangChain message, got {type(m).__name__}")
        out.append(from_langchain_message(m, i))
    return out


def _lc_tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    return [{"name": tc.name, "args": dict(tc.arguments), "id": tc.id, "type": "tool_call"}
            for tc in calls]


def to_langchain_message(m: Message, original: BaseMessage | None = None) -> BaseMessage:
    """A contextwise Message as a LangChain message. With `original` (the message it was
    made from), a copy of it with the new text: ids, tool calls, tool names, artifacts
    and metadata stay."""
    if original is not None:
        if message_text(original) == (m.content or "") and isinstance(original.content, str):
            return original
        return original.model_copy(update={"content": m.content or ""})
    if m.role == "system":
        return SystemMessage(content=m.content or "")
    if m.role == "user":
        return HumanMessage(content=m.content or "", name=m.name)
    if m.role == "assistant":
        return AIMessage(content=m.content or "", name=m.name,
                         tool_calls=_lc_tool_calls(m.tool_calls or []))
    return ToolMessage(content=m.content or "", tool_call_id=m.tool_call_id or "",
                       name=m.name)


def orphan_tool_results(messages: Sequence[BaseMessage]) -> list[str]:
    """tool_call_ids of ToolMessages no earlier AIMessage called (should be [])."""
    called: set[str] = set()
    orphans = []
    for m in messages:
        if isinstance(m, AIMessage):
            called.update(tc.get("id") or "" for tc in m.tool_calls)
        elif isinstance(m, ToolMessage) and m.tool_call_id not in called:
            orphans.append(m.tool_call_id)
    return orphans


# --------------------------------------------------------------------------- replies


def reply_from_ai_message(ai: AIMessage) -> Reply:
    """The model's AIMessage as a contextwise Reply (text, tool calls, usage, model)."""
    calls = [ToolCall(id=_tool_call_id(tc, 0, j), name=tc["name"],
                      arguments=dict(tc.get("args") or {}))
             for j, tc in enumerate(ai.tool_calls)]
    invalid = [InvalidToolCall(raw=str(tc.get("args") or ""), error=str(tc.get("error") or ""),
                               name=tc.get("name"))
               for tc in ai.invalid_tool_calls]
    meta = ai.response_metadata or {}
    usage: Mapping[str, Any] = ai.usage_metadata or {}
    finish = meta.get("finish_reason") or meta.get("stop_reason")
    if not isinstance(finish, str) or not finish:
        finish = "tool_calls" if calls else "stop"
    model = meta.get("model_name") or meta.get("model") or ""
    return Reply(
        message=Message(role="assistant", content=message_text(ai), name=ai.name or None,
                        tool_calls=calls or None),
        usage=Usage(prompt_tokens=int(usage.get("input_tokens") or 0),
                    completion_tokens=int(usage.get("output_tokens") or 0)),
        model=model if isinstance(model, str) else "",
        finish_reason=finish,
        invalid_tool_calls=invalid,
    )


def reply_to_ai_message(reply: Reply) -> AIMessage:
    """A contextwise Reply (a cache hit, or one a stage rewrote) as an AIMessage; what the
    cache did is in `response_metadata["contextwise"]`."""
    meta: dict[str, Any] = {"finish_reason": reply.finish_reason, "model_name": reply.model}
    hits = [r for r in reply.trace.of("cache") if r.get("hit")]
    if hits:
        meta["contextwise"] = {"cache": hits[-1]["hit"], "entry": hits[-1].get("entry"),
                               "similarity": hits[-1].get("similarity")}
    return AIMessage(
        content=reply.text,
        name=reply.message.name,
        tool_calls=_lc_tool_calls(reply.tool_calls),
        response_metadata=meta,
        usage_metadata={"input_tokens": reply.usage.prompt_tokens,
                        "output_tokens": reply.usage.completion_tokens,
                        "total_tokens": reply.usage.total_tokens},
    )



# --------------------------------------------------------------------------- tools

_TOOL_MEMO: OrderedDict[int, tuple[Any, Tool]] = OrderedDict()
_TOOL_MEMO_LOCK = threading.Lock()


def _convert_tool(t: Any, i: int) -> Tool | None:
    """A LangChain tool as a contextwise Tool; None for a provider built-in (a dict of
    another type than 'function', e.g. {"type": "web_search"}), which stages never see."""
    if isinstance(t, Mapping):
        kind = t.get("type", "function")
        if kind != "function" or not ("function" in t or "name" in t):
            return None
        source: Any = t
    else:
        key = id(t)
        with _TOOL_MEMO_LOCK:
            hit = _TOOL_MEMO.get(key)
            if hit is not None and hit[0] is t:
                _TOOL_MEMO.move_to_end(key)
                return hit[1]
        try:
            source = convert_to_openai_tool(t)
        except Exception as e:  # noqa: BLE001 - whatever LangChain raises, say which tool
            label = getattr(t, "name", None) or type(t).__name__
            raise InputError(f"tools[{i}]", f"cannot read tool {label!r}: {e}") from None
    try:
        tool = Tool.from_openai(source)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise InputError(f"tools[{i}]" + (f".{loc}" if loc else ""),
                         err["msg"].removeprefix("Value error, ")) from None
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"tools[{i}]", str(e)) from None
    if not isinstance(t, Mapping):
        with _TOOL_MEMO_LOCK:
            _TOOL_MEMO[id(t)] = (t, tool)  # the strong ref keeps id(t) from being reused
            while len(_TOOL_MEMO) > TOOL_MEMO:
                _TOOL_MEMO.popitem(last=False)
    return tool


def from_langchain_tools(tools: Sequence[Any]) -> list[Tool | None]:
    """LangChain tools (BaseTool, OpenAI dicts, functions) as contextwise Tools, one per
    input; None for provider built-ins, which are passed through untouched."""
    return [_convert_tool(t, i) for i, t in enumerate(tools)]
