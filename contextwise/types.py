"""The values that flow through the pipeline: Message, Tool, Params, Call, Reply.

Everything here is plain data (pydantic v2). Messages follow the OpenAI chat
format and convert to and from OpenAI dicts. Parsing functions (`parse_messages`,
`parse_tools`, `Params.parse`) turn user input into these types and raise
`InputError` naming the field and the message index when something is wrong.
This module knows nothing about models, stages or storage.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import typing
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import jsonschema
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PydanticUserError,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from contextwise.errors import InputError

__all__ = [
    "ROLES",
    "Call",
    "InvalidToolCall",
    "Message",
    "Params",
    "Reply",
    "StageRecord",
    "Tool",
    "ToolCall",
    "Trace",
    "Usage",
    "parse_messages",
    "parse_tools",
]

ROLES = ("system", "user", "assistant", "tool")
Role = Literal["system", "user", "assistant", "tool"]
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def _first_error(err: ValidationError) -> tuple[str, str]:
    """(dotted location, message) of a pydantic error, for our own error text."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if p != "__root__")
    msg = e["msg"].removeprefix("Value error, ")
    return loc, msg


# --------------------------------------------------------------------------- messages


class ToolCall(BaseModel):
    """One function call the assistant asked for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default_factory=lambda: "call_" + uuid.uuid4().hex[:12])
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }

    @classmethod
    def from_openai(cls, d: Mapping[str, Any]) -> ToolCall:
        if isinstance(d, ToolCall):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"a tool call must be a dict, got {type(d).__name__}")
        fn = d.get("function", d)
        if not isinstance(fn, Mapping) or "name" not in fn:
            raise ValueError("a tool call needs function.name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"tool call arguments are not valid JSON: {e}") from None
        if not isinstance(args, dict):
            raise ValueError("tool call arguments must be a JSON object")
        extra = {"id": d["id"]} if d.get("id") else {}
        return cls(name=fn["name"], arguments=args, **extra)


def _text_content(v: Any) -> str | None:
    """OpenAI content: a string, None, or a list of text parts (joined)."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list):
        texts = []
        for j, part in enumerate(v):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(
                part.get("text"), str
            ):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"content part {j} is {kind!r}; only text parts are supported")
        return "".join(texts)
    raise ValueError(f"content must be a string or a list of text parts, got {type(v).__name__}")


class Message(BaseModel):
    """A chat message in OpenAI's format (system, user, assistant or tool)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, v: Any) -> Any:
        if v not in ROLES:
            raise ValueError(f"unknown role {v!r} (expected one of {', '.join(ROLES)})")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> str | None:
        return _text_content(v)

    @field_validator("tool_calls", mode="before")
    @classmethod
    def _tool_calls(cls, v: Any) -> Any:
        if v is None:
            return None
        if not isinstance(v, list):
            raise ValueError("tool_calls must be a list")
        return [ToolCall.from_openai(tc) for tc in v] or None

    @model_validator(mode="after")
    def _shape(self) -> Message:
        if self.role in ("system", "user") and self.content is None:
            raise ValueError(f"a {self.role} message needs text content")
        if self.role == "tool":
            if not self.tool_call_id:
                raise ValueError("a tool message needs tool_call_id")
            if self.content is None:
                raise ValueError("a tool message needs text content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self

    @property
    def text(self) -> str:
        return self.content or ""

    def to_openai(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name:
            d["name"] = self.name
        if self.tool_calls:
            d["tool_calls"] = [tc.to_openai() for tc in self.tool_calls]
        if self.tool_call_id:
            d["tool_call_id"] = self.tool_call_id
        return d

    @classmethod
    def from_openai(cls, d: Mapping[str, Any]) -> Message:
        return parse_messages([d])[0]


def parse_messages(
    items: Iterable[Message | Mapping[str, Any]], prior: Iterable[Message] = ()
) -> list[Message]:
    """Validate a conversation. Errors name the index and field: ``messages[2].role``.

    `prior`: messages that came before these (a stored session), whose tool
    calls later tool messages may answer.
    """
    if isinstance(items, (str, bytes, Mapping)):
        raise InputError("messages", "must be a list of messages")
    out: list[Message] = []
    open_calls = {tc.id for m in prior for tc in m.tool_calls or ()}
    for i, item in enumerate(items):
        if isinstance(item, Message):
            msg = item
        elif isinstance(item, Mapping):
            try:
                msg = Message.model_validate(dict(item))
            except ValidationError as e:
                loc, problem = _first_error(e)
                raise InputError(f"messages[{i}]" + (f".{loc}" if loc else ""), problem) from None
        else:
            raise InputError(f"messages[{i}]", f"must be a dict or Message, got {type(item).__name__}")
        if msg.role == "assistant" and msg.tool_calls:
            open_calls.update(tc.id for tc in msg.tool_calls)
        if msg.role == "tool" and msg.tool_call_id not in open_calls:
            raise InputError(
                f"messages[{i}].tool_call_id",
                f"tool message answers {msg.tool_call_id!r}, but no earlier assistant message "
                "made a tool call with that id",
            )
        out.append(msg)
    return out


# --------------------------------------------------------------------------- tools


def _check_schema(schema: Any) -> dict[str, Any]:
    if not isinstance(schema, Mapping):
        raise ValueError(f"parameters must be a JSON-schema object, got {type(schema).__name__}")
    schema = dict(schema)
    if schema.get("type", "object") != "object":
        raise ValueError(f"parameters must have type 'object', got {schema.get('type')!r}")
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError):
        raise ValueError("parameters must be JSON-serializable") from None
    error = _schema_error(key)
    if error:
        raise ValueError(error)
    return schema


@functools.lru_cache(maxsize=16_384)
def _schema_error(schema_json: str) -> str:
    """Metaschema check, once per distinct schema: an agent resends the same tools on
    every call, and checking 200 schemas costs ~250 ms each time."""
    schema = json.loads(schema_json)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.path) or "(root)"
        return f"malformed JSON schema at {path}: {e.message}"
    return ""


def _strip_titles(schema: Any) -> Any:
    """pydantic adds a `title` to every property: noise in the prompt."""
    if isinstance(schema, dict):
        return {
            k: _strip_titles(v)
            for k, v in schema.items()
            if not (k == "title" and isinstance(v, str))
        }
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


_SECTION = re.compile(
    r"^(Args|Arguments|Parameters|Returns|Return|Raises|Yields|Examples?|Notes?|See Also)\s*:?\s*$"
)


def _docstring_args(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google/NumPy-ish docstring into (summary, {arg: description})."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary: list[str] = []
    args: dict[str, str] = {}
    in_args = False
    current = None
    in_summary = True
    for line in lines:
        stripped = line.strip()
        header = _SECTION.match(stripped)
        if header:
            in_summary = False
            in_args = header.group(1) in ("Args", "Arguments", "Parameters")
            current = None
            continue
        if in_args:
            m = re.match(r"^(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", stripped)
            if m and not line.startswith("        "):
                current = m.group(1)
                args[current] = m.group(3)
            elif current and stripped and not set(stripped) <= {"-"}:
                args[current] = (args[current] + " " + stripped).strip()
        elif in_summary:
            summary.append(line)
    return " ".join(s.strip() for s in summary if s.strip()), args


class Tool(BaseModel):
    """A function the model may call: name, description and a JSON schema of parameters.

    Build one from an OpenAI tool dict, a pydantic model, or a typed Python
    function (`Tool.coerce` takes any of them). A tool built from a function
    keeps it in `fn`, so callers can run the calls the model makes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: dict(EMPTY_PARAMETERS))
    fn: Callable[..., Any] | None = Field(default=None, exclude=True, repr=False)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TOOL_NAME.match(v):
            raise ValueError(f"tool name {v!r} must be 1-64 letters, digits, '_', '.' or '-'")
        return v

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters(cls, v: Any) -> dict[str, Any]:
        return _check_schema(v if v is not None else EMPTY_PARAMETERS)

    # -- constructors

    @classmethod
    def from_openai(cls, d: Mapping[str, Any]) -> Tool:
        if d.get("type", "function") != "function":
            raise ValueError(f"unsupported tool type {d.get('type')!r} (only 'function')")
        # Chat Completions nest under "function"; the Responses API form is flat.
        fn = d["function"] if "function" in d else {k: v for k, v in d.items() if k != "type"}
        if not isinstance(fn, Mapping):
            raise ValueError("tool 'function' must be a dict")
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise ValueError(f"unknown tool field(s): {', '.join(sorted(unknown))}")
        if "name" not in fn:
            raise ValueError("a tool needs a name")
        return cls(
            name=fn["name"],
            description=fn.get("description") or "",
            parameters=fn.get("parameters") or EMPTY_PARAMETERS,
        )

    @classmethod
    def from_model(cls, model: type[BaseModel], name: str | None = None) -> Tool:
        schema = _strip_titles(model.model_json_schema())
        description = schema.pop("description", "") or inspect.getdoc(model) or ""
        return cls(name=name or model.__name__, description=description, parameters=schema)

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None) -> Tool:
        summary, arg_docs = _docstring_args(inspect.getdoc(fn) or "")
        hints = typing.get_type_hints(fn)
        fields: dict[str, Any] = {}
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        for i, p in enumerate(params):
            annotation = hints.get(p.name, Any)
            default = ... if p.default is p.empty else p.default
            # Internal names are neutral (`json`, `_key` would clash with pydantic);
            # the schema shows the real name through the alias.
            fields[f"p{i}"] = (annotation, Field(default, alias=p.name,
                                                 description=arg_docs.get(p.name)))
        model = create_model(f"{fn.__name__}_args", **fields)
        schema = _strip_titles(model.model_json_schema(by_alias=True))
        schema.pop("description", None)
        return cls(name=name or fn.__name__, description=summary, parameters=schema, fn=fn)

    @classmethod
    def coerce(cls, obj: Any) -> Tool:
        if isinstance(obj, Tool):
            return obj
        if isinstance(obj, Mapping):
            return cls.from_openai(obj)
        if isinstance(obj, type) and issubclass(obj, BaseModel):
            return cls.from_model(obj)
        if callable(obj):
            return cls.from_function(obj)
        raise ValueError(
            f"cannot make a tool from {type(obj).__name__}: pass an OpenAI tool dict, "
            "a pydantic model class or a typed function"
        )

    # -- use

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def argument_errors(self, arguments: Any) -> list[str]:
        """Why `arguments` does not validate against the schema ([] when it does)."""
        validator = jsonschema.validators.validator_for(self.parameters)(self.parameters)
        return [
            f"{'/'.join(str(p) for p in e.path) or '(root)'}: {e.message}"
            for e in validator.iter_errors(arguments)
        ]

    def run(self, arguments: Mapping[str, Any]) -> Any:
        if self.fn is None:
            raise ValueError(f"tool {self.name!r} has no Python function to run")
        return self.fn(**arguments)


def parse_tools(items: Iterable[Any] | None) -> list[Tool]:
    """Validate a tool list. Errors name the index: ``tools[1].parameters``."""
    if items is None:
        return []
    out: list[Tool] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        try:
            tool = Tool.coerce(item)
        except ValidationError as e:
            loc, problem = _first_error(e)
            raise InputError(f"tools[{i}]" + (f".{loc}" if loc else ""), problem) from None
        except (ValueError, TypeError, PydanticUserError) as e:
            raise InputError(f"tools[{i}]", str(e)) from None
        if tool.name in seen:
            raise InputError(f"tools[{i}].name", f"duplicate tool name {tool.name!r}")
        seen.add(tool.name)
        out.append(tool)
    return out


# --------------------------------------------------------------------------- params


class Params(BaseModel):
    """Generation parameters of one call (OpenAI names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int | None = Field(None, ge=1, description="cap on output tokens; None: policy")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] | None = None
    seed: int | None = None
    tool_choice: str = Field("auto", description="auto, none, required, or a tool name")
    response_format: dict[str, Any] | None = Field(
        None, description="None, {'type': 'json_object'} or {'type': 'json_schema', ...}"
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if v is not None and (not isinstance(v, list) or not all(isinstance(s, str) and s for s in v)):
            raise ValueError("stop must be a non-empty string or a list of them")
        return v or None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if v is None:
            return "auto"
        if isinstance(v, Mapping):  # {"type": "function", "function": {"name": ...}}
            fn = v.get("function")
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise ValueError(
                    "tool_choice dict must be {'type': 'function', 'function': {'name': ...}}")
            return fn["name"]
        return v

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, type) and issubclass(v, BaseModel):
            return {"type": "json_schema", "json_schema": {"name": v.__name__,
                                                           "schema": v.model_json_schema()}}
        if not isinstance(v, Mapping):
            raise ValueError("response_format must be a dict")
        kind = v.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            spec = v.get("json_schema")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
                raise ValueError("json_schema response_format needs json_schema.schema")
            try:
                jsonschema.validators.validator_for(spec["schema"]).check_schema(spec["schema"])
            except jsonschema.SchemaError as e:
                raise ValueError(f"malformed JSON schema in response_format: {e.message}") from None
            return {"type": "json_schema", "json_schema": dict(spec)}
        raise ValueError(f"unknown response_format type {kind!r} (text, json_object, json_schema)")

    @property
    def json_schema(self) -> dict[str, Any] | None:
        rf = self.response_format
        if rf and rf["type"] == "json_schema":
            return dict(rf["json_schema"]["schema"])
        return None

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> Params:
        unknown = set(params) - set(cls.model_fields)
        if unknown:
            name = min(unknown)
            raise InputError(
                name, f"unknown parameter (known: {', '.join(cls.model_fields)})"
            )
        try:
            return cls.model_validate(dict(params))
        except ValidationError as e:
            loc, problem = _first_error(e)
            raise InputError(loc, problem) from None


# --------------------------------------------------------------------------- trace


class StageRecord(BaseModel):
    """What one stage did to one call."""

    stage: str
    data: dict[str, Any] = Field(default_factory=dict)


class Trace(BaseModel):
    """An append-only log that stages write into; shared by copies of a call."""

    records: list[StageRecord] = Field(default_factory=list)

    def add(self, stage: str, **data: Any) -> None:
        self.records.append(StageRecord(stage=stage, data=data))

    def of(self, stage: str) -> list[dict[str, Any]]:
        return [r.data for r in self.records if r.stage == stage]


# --------------------------------------------------------------------------- call / reply


class Call(BaseModel):
    """One request on its way to the model. Stages return changed copies
    (`call.model_copy(update=...)`); the trace is shared between the copies."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    messages: list[Message]
    tools: list[Tool] = Field(default_factory=list)
    params: Params = Field(default_factory=Params)
    session: str | None = None
    user: str | None = None
    variables: dict[str, Any] = Field(
        default_factory=dict, description="values for the policy's prompt template"
    )
    cache: Literal["use", "skip", "refresh"] = Field(
        "use", description="response cache: use it, skip it, or refresh (answer anew, store)"
    )
    trace: Trace = Field(default_factory=Trace)
    # Streaming sink: the backend calls it with each text delta. Not data.
    on_delta: Callable[[str], None] | None = Field(default=None, exclude=True, repr=False)

    @classmethod
    def build(
        cls,
        messages: Iterable[Message | Mapping[str, Any]],
        tools: Iterable[Any] | None = None,
        session: str | None = None,
        user: str | None = None,
        variables: Mapping[str, Any] | None = None,
        cache: str = "use",
        **params: Any,
    ) -> Call:
        """Validate raw user input into a Call; errors name the field."""
        if cache not in ("use", "skip", "refresh"):
            raise InputError("cache", f"must be 'use', 'skip' or 'refresh', got {cache!r}")
        if variables is not None and not isinstance(variables, Mapping):
            raise InputError(
                "variables", f"must map names to values, got {type(variables).__name__}"
            )
        call = cls(
            messages=parse_messages(messages),
            tools=parse_tools(tools),
            params=Params.parse(params),
            session=session,
            user=user,
            variables=dict(variables or {}),
            cache=cache,
        )
        if not call.messages:
            raise InputError("messages", "must hold at least one message")
        choice = call.params.tool_choice
        if choice in ("auto", "none"):
            pass
        elif choice == "required":
            if not call.tools:
                raise InputError("tool_choice", "is 'required' but no tools were given")
        elif call.tool(choice) is None:
            raise InputError("tool_choice", f"names tool {choice!r}, which is not in tools")
        return call

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


class InvalidToolCall(BaseModel):
    """A tool call the model wrote that could not be parsed or validated."""

    raw: str
    error: str
    name: str | None = None


class Reply(BaseModel):
    """The model's answer with its usage and the trace of every stage."""

    message: Message
    usage: Usage = Field(default_factory=Usage)
    model: str = ""
    finish_reason: str = "stop"
    trace: Trace = Field(default_factory=Trace)
    invalid_tool_calls: list[InvalidToolCall] = Field(default_factory=list)
    latency_s: float = 0.0

    @property
    def text(self) -> str:
        return self.message.content or ""

    @property
    def tool_calls(self) -> list[ToolCall]:
        return list(self.message.tool_calls or [])

    def to_openai(self, id: str | None = None, created: int = 0) -> dict[str, Any]:
        return {
            "id": id or "chatcmpl-" + uuid.uuid4().hex[:16],
            "object": "chat.completion",
            "created": created,
            "model": self.model,
            "choices": [
                {"index": 0, "message": self.message.to_openai(), "finish_reason": self.finish_reason}
            ],
            "usage": self.usage.to_openai(),
        }
