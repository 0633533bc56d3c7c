"""Converting between LangChain and contextwise: messages, tools, tool choice, replies.

The one converter for both LangChain integrations: the agent middleware
(`contextwise.middleware.langchain`) and the `ChatContextwise` chat model
(`contextwise.chat_model`). Needs langchain-core only (the `langchain` extra);
it knows nothing about agents, requests or pipelines.

Messages in (`from_langchain_messages`). System, human, AI (with `tool_calls`)
and tool messages (with `tool_call_id`) convert; a `ChatMessage` with role
user/human, assistant/ai, system or developer too. Anything else raises
`InputError` naming the message (``messages[2]``). Content is text: a string,
or text blocks joined. An assistant's own blocks (tool-call and reasoning
blocks) are skipped: its tool calls travel in `tool_calls`. A tool call
without an id gets a stable one (``lc_call_<message>_<call>``), so the same
conversation converts the same way every time. An assistant tool-call turn
with no text has content None, as the pipeline stores it: a conversation sent
again then matches the session's memory (`Pipeline.prepare`).

Content that is not text (an image, audio, a file) is where the two callers
differ, through `non_text=`:

- "error" (the default; `ChatContextwise`): `InputError` naming the block,
  e.g. ``messages[1].content[1]: 'image' content is not supported``. The local
  model reads text only; it never gets a message with a part cut out.
- "skip" (the agent middleware, whose model may well read images): the
  stages see the message's text only. A message they leave alone goes to the
  agent's model as the ORIGINAL object, blocks and all (the middleware maps
  unchanged messages back by identity). A message they rewrite (a long text
  cut by prune, a tool result withheld by quarantine or omitted by prune)
  becomes a copy of its original holding the new text and NOT the other
  blocks: the stage decided what the model sees of that message without
  seeing them, and a withheld result must not reach the model through its
  image. The middleware records each such message in the call's trace
  (stage "langchain", `non_text_dropped`). A message dropped (budget) or
  folded into a summary goes whole; a summary is text. The middleware never
  caches a call with such blocks: the cache key sees text only, and two
  different images under one question must not share an answer.
  `non_text_blocks` lists a message's blocks that are not text.

Messages out (`to_langchain_message`): with the original LangChain message, the
original itself when its text is unchanged, else a copy of it whose content is
the new text (ids, tool calls, tool names, artifacts and metadata stay);
without one, a fresh message.

Tools (`from_langchain_tools`): BaseTool, typed functions, pydantic classes,
TypedDicts, OpenAI dicts (nested or flat), Anthropic and Bedrock dicts and
JSON schemas with a title become contextwise `Tool`s, checked by `Tool`
itself (errors name ``tools[i]``). A dict of another `type` ({"type":
"web_search"}) is a provider's built-in tool: `builtin="keep"` gives None for
it (the middleware passes it to the model untouched; stages never see it),
`builtin="error"` refuses it (`ChatContextwise`: the local model has no
built-ins). Converted non-dict tools are memoized by identity (an agent sends
the same tools on every model call).

Replies: `reply_from_ai_message` reads a model's `AIMessage` (text, tool calls,
invalid tool calls, usage, model, finish reason); `reply_to_ai_message` and
`reply_to_ai_chunk` (the last chunk of a stream) write a `Reply` as LangChain
messages: `tool_calls` with their ids, the calls that did not parse or
validate in `invalid_tool_calls`, `usage_metadata` (prefix-cache reads as
`input_token_details.cache_read`) and `response_metadata` (`model_name`,
`finish_reason`, `model_provider` "contextwise", `cache`: "exact", "semantic"
or None, and on a hit `cache_entry` and `cache_similarity`).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

try:
    from langchain_core.messages import (
        AIMessage,
        AIMessageChunk,
        BaseMessage,
        ChatMessage,
        HumanMessage,
        SystemMessage,
        ToolMessage,
    )
    from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
    from langchain_core.utils.function_calling import convert_to_openai_tool
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the LangChain integration needs langchain-core: pip install 'contextwise[langchain]'"
    ) from e
from pydantic import ValidationError

from contextwise.errors import InputError
from contextwise.types import InvalidToolCall, Message, Reply, Tool, ToolCall, Usage

__all__ = [
    "from_langchain_message",
    "from_langchain_messages",
    "from_langchain_tools",
    "message_text",
    "non_text_blocks",
    "orphan_tool_results",
    "reply_from_ai_message",
    "reply_to_ai_chunk",
    "reply_to_ai_message",
    "to_langchain_message",
    "tool_choice_from_langchain",
]

NonText = Literal["error", "skip"]
TOOL_MEMO = 4096  # converted non-dict tools kept (an agent resends the same tools)

# Content blocks of an assistant message that are not text for the model to re-read:
# tool calls (carried by `tool_calls`) and the model's own reasoning.
_AI_OWN_BLOCKS = frozenset({
    "tool_use", "tool_call", "tool_call_chunk", "invalid_tool_call", "server_tool_call",
    "server_tool_call_chunk", "server_tool_result", "reasoning", "thinking", "redacted_thinking",
})
_ROLE_OF_CHAT = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant",
                 "system": "system", "developer": "system"}
_SUPPORTED = "use SystemMessage, HumanMessage, AIMessage or ToolMessage"


# --------------------------------------------------------------------------- content


def _is_text(block: Any) -> bool:
    return isinstance(block, str) or (isinstance(block, Mapping) and block.get("type") == "text"
                                      and isinstance(block.get("text"), str))


def _kind(block: Any) -> str:
    kind = block.get("type") if isinstance(block, Mapping) else None
    return str(kind) if kind is not None else type(block).__name__


def _content_text(content: Any, where: str, *, assistant: bool, non_text: NonText
                  ) -> tuple[str, list[str]]:
    """(the text of LangChain content, kinds of the blocks left out of it). An assistant's
    own blocks are skipped and not listed; other non-text blocks raise with "error"."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise InputError(where, f"content must be a string or a list of blocks, "
                                f"got {type(content).__name__}")
    parts: list[str] = []
    left_out: list[str] = []
    for j, block in enumerate(content):
        if _is_text(block):
            parts.append(block if isinstance(block, str) else block["text"])
        elif assistant and _kind(block) in _AI_OWN_BLOCKS:
            continue
        elif non_text == "skip":
            left_out.append(_kind(block))
        else:
            raise InputError(f"{where}[{j}]",
                             f"{_kind(block)!r} content is not supported: the model reads "
                             "text only (pass text blocks or a string)")
    return "".join(parts), left_out


def _is_assistant(m: BaseMessage) -> bool:
    return isinstance(m, AIMessage) or (isinstance(m, ChatMessage)
                                        and _ROLE_OF_CHAT.get(m.role) == "assistant")


def message_text(m: BaseMessage) -> str:
    """The text of a LangChain message (text blocks joined; other blocks left out)."""
    return _content_text(m.content, "", assistant=_is_assistant(m), non_text="skip")[0]


def non_text_blocks(m: BaseMessage) -> list[str]:
    """The kinds of the blocks of a message that are not text ([] for plain text); an
    assistant's tool-call and reasoning blocks do not count."""
    return _content_text(m.content, "", assistant=_is_assistant(m), non_text="skip")[1]


# --------------------------------------------------------------------------- messages in


def _tool_call_id(tc: Mapping[str, Any], i: int, j: int) -> str:
    return tc.get("id") or f"lc_call_{i}_{j}"


def _tool_calls(m: AIMessage, i: int) -> list[ToolCall] | None:
    calls = [ToolCall(id=_tool_call_id(tc, i, j), name=tc["name"],
                      arguments=dict(tc.get("args") or {}))
             for j, tc in enumerate(m.tool_calls)]
    return calls or None


def from_langchain_message(m: BaseMessage, i: int = 0, *, non_text: NonText = "error"
                           ) -> Message:
    """One LangChain message as a contextwise `Message` (InputError names `messages[i]`).
    `non_text`: "error" or "skip" a block that is not text (see the module docstring)."""
    where = f"messages[{i}].content"
    name = m.name or None
    try:
        if isinstance(m, AIMessage):
            text, _ = _content_text(m.content, where, assistant=True, non_text=non_text)
            calls = _tool_calls(m, i)
            # a tool-call turn without text: None, as the pipeline stores it
            return Message(role="assistant", content=text or (None if calls else ""),
                           name=name, tool_calls=calls)
        if isinstance(m, (HumanMessage, SystemMessage, ToolMessage)):
            text, _ = _content_text(m.content, where, assistant=False, non_text=non_text)
            if isinstance(m, HumanMessage):
                return Message(role="user", content=text, name=name)
            if isinstance(m, SystemMessage):
                return Message(role="system", content=text, name=name)
            return Message(role="tool", content=text, name=name, tool_call_id=m.tool_call_id)
        if isinstance(m, ChatMessage):
            role = _ROLE_OF_CHAT.get(m.role)
            if role is None:
                raise InputError(f"messages[{i}].role",
                                 f"ChatMessage role {m.role!r} is not supported (use user, "
                                 "assistant, system or developer; a tool result is a "
                                 "ToolMessage)")
            text, _ = _content_text(m.content, where, assistant=role == "assistant",
                                    non_text=non_text)
            return Message(role=role, content=text, name=name)  # type: ignore[arg-type]
    except ValidationError as e:
        problem = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise InputError(f"messages[{i}]", problem) from None
    raise InputError(f"messages[{i}]", f"{type(m).__name__} is not supported ({_SUPPORTED})")


def from_langchain_messages(messages: Sequence[BaseMessage], *, non_text: NonText = "error"
                            ) -> list[Message]:
    """LangChain messages as contextwise Messages, in order (errors name the index)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise InputError("messages", "must be a list of LangChain messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, BaseMessage):
            raise InputError(f"messages[{i}]",
                             f"must be a LangChain message, got {type(m).__name__}")
        out.append(from_langchain_message(m, i, non_text=non_text))
    return out


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


# --------------------------------------------------------------------------- messages out


def _lc_tool_calls(calls: Sequence[ToolCall]) -> list[Any]:
    return [tool_call(name=c.name, args=dict(c.arguments), id=c.id) for c in calls]


def to_langchain_message(m: Message, original: BaseMessage | None = None) -> BaseMessage:
    """A contextwise Message as a LangChain message. With `original` (the message it was
    made from): the original when its text is unchanged, else a copy of it whose content
    is the new text (ids, tool calls, tool names, artifacts and metadata stay; blocks that
    are not text do not, see the module docstring)."""
    text = m.content or ""
    if original is not None:
        if message_text(original) == text:
            return original
        return original.model_copy(update={"content": text})
    if m.role == "system":
        return SystemMessage(content=text, name=m.name)
    if m.role == "user":
        return HumanMessage(content=text, name=m.name)
    if m.role == "assistant":
        return AIMessage(content=text, name=m.name, tool_calls=_lc_tool_calls(m.tool_calls or []))
    return ToolMessage(content=text, tool_call_id=m.tool_call_id or "", name=m.name)


# --------------------------------------------------------------------------- tools

_TOOL_MEMO: OrderedDict[int, tuple[Any, Tool | None]] = OrderedDict()
_TOOL_MEMO_LOCK = threading.Lock()
_CONVERT_ERRORS = (ValueError, TypeError, KeyError, AttributeError, NotImplementedError)


def _is_builtin(spec: Mapping[str, Any]) -> bool:
    """A provider's own tool ({"type": "web_search"}, {"type": "bash_20250124", ...}): a
    dict whose type is neither a function nor a JSON schema's object."""
    return spec.get("type", "object") not in ("function", "object")


def _label(t: Any) -> str:
    if isinstance(t, Mapping):
        fn = t.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else t.get("name") or t.get("title")
        return str(name) if name else "dict"
    return str(getattr(t, "name", None) or getattr(t, "__name__", None) or type(t).__name__)


def _convert_tool(t: Any, i: int, builtin: Literal["keep", "error"]) -> Tool | None:
    if not isinstance(t, Mapping):
        with _TOOL_MEMO_LOCK:
            hit = _TOOL_MEMO.get(id(t))
            if hit is not None and hit[0] is t and (hit[1] is not None or builtin == "keep"):
                _TOOL_MEMO.move_to_end(id(t))
                return hit[1]
    spec: Any = t
    if not (isinstance(t, Mapping) and (t.get("type") == "function" or _is_builtin(t))):
        try:  # BaseTool, function, pydantic class, TypedDict, Anthropic/Bedrock/JSON schema
            spec = convert_to_openai_tool(dict(t) if isinstance(t, Mapping) else t)
        except _CONVERT_ERRORS as e:
            raise InputError(f"tools[{i}]", f"cannot read tool {_label(t)!r}: {e}") from None
    tool: Tool | None = None
    if _is_builtin(spec):
        if builtin == "error":
            raise InputError(f"tools[{i}]", f"{spec.get('type')!r} is a provider's built-in "
                             "tool: the local model calls functions only")
    else:
        try:
            tool = Tool.from_openai(spec)
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


def from_langchain_tools(tools: Sequence[Any], *, builtin: Literal["keep", "error"] = "keep"
                         ) -> list[Tool | None]:
    """LangChain tools as contextwise Tools, one per input (errors name ``tools[i]``). A
    provider built-in gives None with `builtin="keep"` and raises with "error"."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise InputError("tools", "must be a list of tools")
    return [_convert_tool(t, i, builtin) for i, t in enumerate(tools)]


_CHOICE_WORDS = {"auto": "auto", "none": "none", "any": "required", "required": "required"}


def tool_choice_from_langchain(choice: Any, names: Sequence[str] | None = None, *,
                               strict: bool = True) -> str | None:
    """LangChain's tool_choice in contextwise's words: "auto", "none", "required" or a tool
    name (None when not set). Reads True/False, "any", OpenAI's and Anthropic's dict
    forms. With `names`, a named tool must be one of them. A form it cannot read raises
    InputError, or with `strict=False` counts as "auto" (an agent's model may take
    provider forms the stages need not understand)."""
    if choice is None:
        return None
    if choice is True or choice is False:
        return "required" if choice else "none"
    if isinstance(choice, str) and choice in _CHOICE_WORDS:
        return _CHOICE_WORDS[choice]
    name: Any = choice
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else choice.get("name")
        if name is None and choice.get("type") in _CHOICE_WORDS:  # Anthropic: {"type": "any"}
            return _CHOICE_WORDS[choice["type"]]
    if not isinstance(name, str) or not name:
        if not strict:
            return "auto"
        raise InputError("tool_choice", "must be 'auto', 'none', 'any', 'required', True, a "
                         "tool name or {'type': 'function', 'function': {'name': ...}}, got "
                         f"{choice!r}")
    if names is not None and name not in names:
        raise InputError("tool_choice", f"names tool {name!r}, which is not among the bound "
                                        f"tools ({', '.join(names) or 'none'})")
    return name


# --------------------------------------------------------------------------- replies


def reply_from_ai_message(ai: AIMessage) -> Reply:
    """A model's AIMessage as a contextwise Reply (text, tool calls, usage, model)."""
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
    text = message_text(ai)
    return Reply(
        message=Message(role="assistant", content=text or (None if calls else ""),
                        name=ai.name or None, tool_calls=calls or None),
        usage=Usage(prompt_tokens=int(usage.get("input_tokens") or 0),
                    completion_tokens=int(usage.get("output_tokens") or 0)),
        model=model if isinstance(model, str) else "",
        finish_reason=finish,
        invalid_tool_calls=invalid,
    )


def _usage(reply: Reply) -> dict[str, Any]:
    u = reply.usage
    usage: dict[str, Any] = {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
                             "total_tokens": u.total_tokens}
    cached = sum(int(r.get("prefix_cached_tokens") or 0) for r in reply.trace.of("backend"))
    if cached:  # prompt tokens whose keys/values came from the prefix KV cache
        usage["input_token_details"] = {"cache_read": cached}
    return usage


def _metadata(reply: Reply) -> dict[str, Any]:
    hits = [r for r in reply.trace.of("cache") if r.get("hit")]
    meta: dict[str, Any] = {
        "model_name": reply.model,
        "finish_reason": reply.finish_reason,
        "model_provider": "contextwise",
        "cache": hits[-1]["hit"] if hits else None,  # "exact" / "semantic": the cache answered
    }
    if hits:
        meta["cache_entry"] = hits[-1].get("entry")
        meta["cache_similarity"] = hits[-1].get("similarity")
    return meta


def _invalid_calls(reply: Reply) -> list[Any]:
    return [invalid_tool_call(name=inv.name, args=inv.raw, id="call_" + uuid.uuid4().hex[:12],
                              error=inv.error)
            for inv in reply.invalid_tool_calls]


def reply_to_ai_message(reply: Reply) -> AIMessage:
    """A contextwise Reply as an AIMessage: tool calls, invalid calls, usage, metadata."""
    return AIMessage(
        content=reply.text,
        name=reply.message.name,
        tool_calls=_lc_tool_calls(reply.tool_calls),
        invalid_tool_calls=_invalid_calls(reply),
        usage_metadata=_usage(reply),  # type: ignore[arg-type]
        response_metadata=_metadata(reply),
    )


def reply_to_ai_chunk(reply: Reply, sent: str = "") -> AIMessageChunk:
    """The last chunk of a stream whose text deltas carried `sent`: the rest of the text,
    the tool calls, usage and metadata.

    Invalid calls travel in `response_metadata["invalid_tool_calls"]`, not as
    tool-call chunks: LangChain re-parses chunks when it merges them, and its
    partial-JSON parser would turn a truncated or schema-breaking call into a
    "valid" one. `reply_to_ai_message` puts them in `invalid_tool_calls`.
    """
    rest = reply.text[len(sent):] if reply.text.startswith(sent) else ""
    chunks = [tool_call_chunk(name=c.name, args=json.dumps(c.arguments), id=c.id, index=i)
              for i, c in enumerate(reply.tool_calls)]
    metadata = _metadata(reply)
    if reply.invalid_tool_calls:
        metadata["invalid_tool_calls"] = _invalid_calls(reply)
    return AIMessageChunk(
        content=rest,
        tool_call_chunks=chunks,
        usage_metadata=_usage(reply),  # type: ignore[arg-type]
        response_metadata=metadata,
        chunk_position="last",
    )
