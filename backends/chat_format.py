"""Tools in, tool calls out, for chat templates that know nothing of tools.

SmolLM2's template renders only role and content, so tools go into the system
prompt (Hermes-style `<tools>` block) and the model writes calls as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Parsing is lenient
about a missing closing tag or a bare JSON call, and strict about the schema:
a call that names an unknown tool or whose arguments do not validate becomes an
InvalidToolCall, never a silent drop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from contextwise.types import Call, InvalidToolCall, Message, Tool, ToolCall

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "parse_tool_calls",
    "template_messages",
    "tool_call_schema",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)",
                      re.DOTALL)


def tools_prompt(tools: Sequence[Tool]) -> str:
    lines = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters})
        for t in tools
    )
    return (
        "You can call these tools:\n<tools>\n" + lines + "\n</tools>\n"
        "To call a tool, reply with a JSON object inside tags, like this:\n"
        f'{TOOL_CALL_OPEN}{{"name": "tool_name", "arguments": {{}}}}{TOOL_CALL_CLOSE}'
    )


def _render_calls(calls: Sequence[ToolCall]) -> str:
    return "".join(
        f"{TOOL_CALL_OPEN}{json.dumps({'name': c.name, 'arguments': c.arguments})}{TOOL_CALL_CLOSE}"
        for c in calls
    )


def template_messages(call: Call) -> list[dict[str, str]]:
    """The call's messages as plain {role, content} dicts for a tool-less chat template."""
    extra: list[str] = []
    if call.tools and call.params.tool_choice != "none":
        extra.append(tools_prompt(call.tools))
    schema = call.params.json_schema
    if schema is not None:
        extra.append("Reply only with JSON that matches this schema:\n" + json.dumps(schema))
    elif call.params.response_format:
        extra.append("Reply only with a JSON object.")

    out: list[dict[str, str]] = []
    messages: list[Message] = list(call.messages)
    if extra:
        if messages and messages[0].role == "system":
            head = messages.pop(0).text + "\n\n"
        else:
            head = ""
        out.append({"role": "system", "content": head + "\n\n".join(extra)})
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            text = (m.text + "\n" if m.text else "") + _render_calls(m.tool_calls)
            out.append({"role": "assistant", "content": text})
        else:
            out.append({"role": m.role, "content": m.text})
    return out


def _to_call(raw: str, tools: Sequence[Tool]) -> ToolCall | InvalidToolCall:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return InvalidToolCall(raw=raw, error=f"not valid JSON: {e}")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return InvalidToolCall(raw=raw, error='expected {"name": ..., "arguments": {...}}')
    name = obj["name"]
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return InvalidToolCall(raw=raw, name=name, error="arguments are not a JSON object")
    tool = next((t for t in tools if t.name == name), None)
    if tool is None:
        return InvalidToolCall(raw=raw, name=name, error=f"unknown tool {name!r}")
    if not isinstance(args, dict):
        return InvalidToolCall(raw=raw, name=name, error="arguments are not a JSON object")
    errors = tool.argument_errors(args)
    if errors:
        return InvalidToolCall(raw=raw, name=name, error="; ".join(errors))
    return ToolCall(name=name, arguments=args)


def parse_tool_calls(
    text: str, tools: Sequence[Tool]
) -> tuple[str | None, list[ToolCall], list[InvalidToolCall]]:
    """Split model output into (content before the calls, calls, invalid calls)."""
    start = text.find(TOOL_CALL_OPEN)
    if start >= 0:
        raws = [m.group(1).strip() for m in _CALL_RE.finditer(text, start)]
        content = text[:start].strip() or None
    else:
        stripped = text.strip()
        # A bare JSON call naming one of our tools counts too (small models do this).
        if stripped.startswith("{") and any(f'"{t.name}"' in stripped for t in tools):
            raws, content = [stripped], None
        else:
            return text, [], []
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for raw in raws:
        parsed = _to_call(raw, tools)
        (calls if isinstance(parsed, ToolCall) else invalid).append(parsed)  # type: ignore[arg-type]
    if not calls and invalid and start < 0:
        return text, [], []  # plain JSON that merely mentions a tool: it is content
    return content, calls, invalid


def tool_call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """JSON schema of one call to any of `tools`: what constrained decoding emits."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}
