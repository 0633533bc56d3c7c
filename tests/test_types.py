"""Message / Tool / Params / Call / Reply: OpenAI conversions and input validation."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field, ValidationError

from contextwise.errors import ContextwiseError, InputError
from contextwise.types import (
    Call,
    Message,
    Params,
    Reply,
    Tool,
    ToolCall,
    Trace,
    Usage,
    parse_messages,
    parse_tools,
)

USER = {"role": "user", "content": "hi"}


def weather_tool(name: str = "get_weather") -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": "Weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }


# --------------------------------------------------------------------------- ToolCall


def test_toolcall_to_openai_serializes_arguments_as_json_string() -> None:
    tc = ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris", "days": 2})
    d = tc.to_openai()
    assert d == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})},
    }
    assert ToolCall.from_openai(d) == tc


def test_toolcall_from_openai_accepts_dict_arguments_flat_form_and_empty_string() -> None:
    assert ToolCall.from_openai({"id": "a", "function": {"name": "f", "arguments": {"x": 1}}}) == (
        ToolCall(id="a", name="f", arguments={"x": 1})
    )
    flat = ToolCall.from_openai({"name": "f", "arguments": '{"y": [1, 2]}'})
    assert flat.name == "f" and flat.arguments == {"y": [1, 2]}
    assert flat.id.startswith("call_")
    assert ToolCall.from_openai({"function": {"name": "f", "arguments": "  "}}).arguments == {}
    tc = ToolCall(name="g")
    assert ToolCall.from_openai(tc) is tc


def test_toolcall_ids_are_unique_by_default() -> None:
    assert ToolCall(name="f").id != ToolCall(name="f").id


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("not a dict", "must be a dict"),
        ({"function": {"arguments": "{}"}}, "function.name"),
        ({"function": {"name": "f", "arguments": "{bad"}}, "not valid JSON"),
        ({"function": {"name": "f", "arguments": "[1, 2]"}}, "JSON object"),
    ],
)
def test_toolcall_from_openai_rejects_bad_input(raw: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ToolCall.from_openai(raw)


# --------------------------------------------------------------------------- Message


@pytest.mark.parametrize(
    "d",
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi", "name": "alice"},
        {"role": "assistant", "content": "hello"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
    ],
)
def test_message_openai_round_trip(d: dict[str, Any]) -> None:
    m = Message.from_openai(d)
    assert m.to_openai() == d
    assert Message.from_openai(m.to_openai()) == m


def test_message_to_openai_always_has_content_and_omits_empty_fields() -> None:
    assert Message(role="user", content="x").to_openai() == {"role": "user", "content": "x"}


def test_tool_message_round_trip_in_a_conversation() -> None:
    convo = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    msgs = parse_messages(convo)
    assert [m.role for m in msgs] == ["user", "assistant", "tool", "assistant"]
    assert msgs[1].tool_calls == [ToolCall(id="c1", name="w", arguments={})]
    assert msgs[2].tool_call_id == "c1" and msgs[2].text == "sunny"
    assert [m.to_openai() for m in msgs] == convo
    assert parse_messages([m.to_openai() for m in msgs]) == msgs


def test_content_as_list_of_text_parts_is_joined() -> None:
    m = Message.from_openai(
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, "wor", {"type": "text",
                                                                                 "text": "ld"}]}
    )
    assert m.content == "Hello, world"
    assert m.to_openai() == {"role": "user", "content": "Hello, world"}


def test_message_text_property_and_immutability() -> None:
    m = Message.from_openai({"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f"}}]})
    assert m.text == ""
    with pytest.raises(ValidationError):
        m.content = "changed"  # type: ignore[misc]


def test_parse_messages_accepts_message_objects_and_keeps_them() -> None:
    m = Message(role="user", content="x")
    out = parse_messages([m, {"role": "assistant", "content": "y"}])
    assert out[0] is m
    assert out[1] == Message(role="assistant", content="y")


def test_input_error_is_a_value_error_and_contextwise_error() -> None:
    with pytest.raises(InputError) as ei:
        parse_messages([{"role": "robot", "content": "x"}])
    assert isinstance(ei.value, ValueError)
    assert isinstance(ei.value, ContextwiseError)


# --------------------------------------------------------------------------- bad messages


@pytest.mark.parametrize(
    ("messages", "where", "problem"),
    [
        # unknown role
        ([USER, {"role": "robot", "content": "x"}], "messages[1].role", "unknown role 'robot'"),
        # tool message answering a call nobody made
        ([USER, {"role": "tool", "tool_call_id": "c9", "content": "x"}],
         "messages[1].tool_call_id", "'c9'"),
        # tool message whose call id was made *later* does not count either
        ([USER,
          {"role": "tool", "tool_call_id": "c1", "content": "x"},
          {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f"}}]}],
         "messages[1].tool_call_id", "no earlier assistant message"),
        # non-string content
        ([USER, USER, {"role": "user", "content": 5}], "messages[2].content", "got int"),
        # image part
        ([{"role": "user", "content": [{"type": "text", "text": "look"},
                                       {"type": "image_url", "image_url": {"url": "http://x"}}]}],
         "messages[0].content", "content part 1 is 'image_url'"),
        # user message without content
        ([USER, {"role": "user"}], "messages[1]", "user message needs text content"),
        ([{"role": "system", "content": None}], "messages[0]", "system message needs text content"),
        ([{"role": "assistant"}], "messages[0]", "needs content or tool_calls"),
        ([{"role": "tool", "content": "x"}], "messages[0]", "needs tool_call_id"),
        ([{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}],
         "messages[0]", "only assistant messages carry tool_calls"),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}],
         "messages[0].tool_calls", "not valid JSON"),
        ([{"role": "user", "content": "x", "colour": "red"}], "messages[0].colour", "Extra inputs"),
        ([USER, 42], "messages[1]", "must be a dict or Message, got int"),
    ],
)
def test_bad_messages_name_index_and_field(
    messages: list[Any], where: str, problem: str
) -> None:
    with pytest.raises(InputError) as ei:
        parse_messages(messages)
    assert ei.value.where == where
    assert problem in ei.value.problem
    assert str(ei.value).startswith(where + ": ")


@pytest.mark.parametrize("bad", ["hi", b"hi", {"role": "user", "content": "hi"}])
def test_messages_must_be_a_list(bad: Any) -> None:
    with pytest.raises(InputError, match=r"^messages: must be a list"):
        parse_messages(bad)


# --------------------------------------------------------------------------- tools


def get_weather(city: str, unit: Literal["c", "f"] = "c", days: int = 1, *args: Any,
                **kwargs: Any) -> str:
    """Get the weather forecast for a city.

    Uses a made-up service.

    Args:
        city: Name of the city,
            for example Paris.
        unit (str): Temperature unit.
        days: How many days ahead.

    Returns:
        The forecast: a short text.
    """
    return f"{city}/{unit}/{days}"


def test_tool_from_function_builds_schema_from_hints_and_docstring() -> None:
    t = Tool.from_function(get_weather)
    assert t.name == "get_weather"
    assert t.description == "Get the weather forecast for a city. Uses a made-up service."
    assert t.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "Name of the city, for example Paris."},
            "unit": {"type": "string", "enum": ["c", "f"], "default": "c",
                     "description": "Temperature unit."},
            "days": {"type": "integer", "default": 1, "description": "How many days ahead."},
        },
        "required": ["city"],
    }
    assert t.fn is get_weather
    assert t.run({"city": "Oslo", "days": 3}) == "Oslo/c/3"
    # the function is not part of the data
    assert "fn" not in t.model_dump()


def test_tool_from_function_without_docstring_or_hints() -> None:
    def ping(host, count: int = 3):  # type: ignore[no-untyped-def]
        return host

    t = Tool.from_function(ping, name="net.ping")
    assert t.name == "net.ping"
    assert t.description == ""
    assert t.parameters["required"] == ["host"]
    assert t.parameters["properties"]["count"] == {"type": "integer", "default": 3}
    assert "description" not in t.parameters["properties"]["host"]


class SearchArgs(BaseModel):
    """Search the web."""

    query: str = Field(description="what to look for")
    limit: int = 5


def test_tool_from_model() -> None:
    t = Tool.from_model(SearchArgs)
    assert t.name == "SearchArgs"
    assert t.description == "Search the web."
    assert t.parameters == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "what to look for"},
            "limit": {"type": "integer", "default": 5},
        },
        "required": ["query"],
    }
    assert Tool.from_model(SearchArgs, name="search").name == "search"
    assert t.fn is None
    with pytest.raises(ValueError, match="no Python function"):
        t.run({"query": "x"})


def test_tool_from_openai_and_round_trip() -> None:
    d = weather_tool()
    t = Tool.from_openai(d)
    assert t.name == "get_weather"
    assert t.description == "Weather for a city."
    assert t.parameters["required"] == ["city"]
    assert t.to_openai() == d
    assert Tool.from_openai(t.to_openai()) == t


def test_tool_from_openai_flat_and_defaults() -> None:
    t = Tool.from_openai({"name": "noop"})
    assert t.description == ""
    assert t.parameters == {"type": "object", "properties": {}}
    assert Tool.from_openai({"type": "function", "function": {"name": "n", "parameters": None,
                                                              "strict": True}}).name == "n"


@pytest.mark.parametrize(
    ("d", "problem"),
    [
        ({"type": "retrieval"}, "unsupported tool type"),
        ({"type": "function", "function": {"name": "f", "colour": 1}}, "unknown tool field"),
        ({"type": "function", "function": {"description": "no name"}}, "needs a name"),
    ],
)
def test_tool_from_openai_rejects(d: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Tool.from_openai(d)


def test_tool_coerce_each_kind() -> None:
    t = Tool(name="x")
    assert Tool.coerce(t) is t
    assert Tool.coerce(weather_tool()).name == "get_weather"
    assert Tool.coerce(SearchArgs).name == "SearchArgs"
    assert Tool.coerce(get_weather).fn is get_weather
    with pytest.raises(ValueError, match="cannot make a tool from int"):
        Tool.coerce(42)


def test_parse_tools_mixed_and_none() -> None:
    assert parse_tools(None) == []
    tools = parse_tools([weather_tool("a"), SearchArgs, get_weather])
    assert [t.name for t in tools] == ["a", "SearchArgs", "get_weather"]


def test_parse_tools_duplicate_names() -> None:
    with pytest.raises(InputError) as ei:
        parse_tools([weather_tool("a"), weather_tool("b"), weather_tool("a")])
    assert ei.value.where == "tools[2].name"
    assert "duplicate tool name 'a'" in str(ei.value)


@pytest.mark.parametrize(
    ("tool", "where", "problem"),
    [
        ({"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "nonsense"}}}}},
         "tools[1].parameters", "malformed JSON schema at properties/a/type"),
        ({"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}},
         "tools[1].parameters", "type 'object'"),
        ({"type": "function", "function": {"name": "f", "parameters": ["x"]}},
         "tools[1].parameters", "JSON-schema object"),
        ({"type": "function", "function": {"name": "bad name!"}}, "tools[1].name", "bad name!"),
        ({"type": "function", "function": {"name": "f", "x": 1}}, "tools[1]",
         "unknown tool field(s): x"),
        (42, "tools[1]", "cannot make a tool"),
    ],
)
def test_bad_tools_name_index_and_field(tool: Any, where: str, problem: str) -> None:
    with pytest.raises(InputError) as ei:
        parse_tools([weather_tool("ok"), tool])
    assert ei.value.where == where
    assert problem in ei.value.problem


def test_tool_name_too_long_rejected() -> None:
    with pytest.raises(ValidationError):
        Tool(name="x" * 65)
    assert Tool(name="x" * 64).name == "x" * 64


def test_tool_argument_errors() -> None:
    t = Tool.from_function(get_weather)
    assert t.argument_errors({"city": "Paris"}) == []
    assert t.argument_errors({"city": "Paris", "unit": "f", "days": 2}) == []
    assert t.argument_errors({}) == ["(root): 'city' is a required property"]
    assert t.argument_errors({"city": 3}) == ["city: 3 is not of type 'string'"]
    errs = t.argument_errors({"city": "x", "unit": "kelvin", "days": "two"})
    assert len(errs) == 2
    assert any(e.startswith("unit: ") for e in errs)
    assert any(e.startswith("days: ") for e in errs)


# --------------------------------------------------------------------------- params


def test_params_defaults() -> None:
    p = Params()
    assert p.max_tokens is None
    assert p.temperature == 0.0
    assert p.top_p == 1.0
    assert p.stop is None
    assert p.tool_choice == "auto"
    assert p.response_format is None
    assert p.json_schema is None


def test_params_normalization() -> None:
    assert Params.parse({"stop": "\n"}).stop == ["\n"]
    assert Params.parse({"stop": []}).stop is None
    assert Params.parse({"tool_choice": None}).tool_choice == "auto"
    choice = {"type": "function", "function": {"name": "get_weather"}}
    assert Params.parse({"tool_choice": choice}).tool_choice == "get_weather"
    assert Params.parse({"response_format": {"type": "text"}}).response_format is None
    assert Params.parse({"response_format": {"type": "json_object", "x": 1}}).response_format == {
        "type": "json_object"
    }


def test_params_response_format_from_model_and_schema() -> None:
    p = Params.parse({"response_format": SearchArgs})
    assert p.response_format is not None
    assert p.response_format["json_schema"]["name"] == "SearchArgs"
    assert p.json_schema == SearchArgs.model_json_schema()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    p2 = Params.parse({"response_format": {"type": "json_schema",
                                           "json_schema": {"name": "A", "schema": schema}}})
    assert p2.json_schema == schema


@pytest.mark.parametrize(
    ("params", "where", "problem"),
    [
        ({"temprature": 0.5}, "temprature", "unknown parameter"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"stop": ["ok", ""]}, "stop", "non-empty string"),
        ({"tool_choice": {"type": "function"}}, "tool_choice", "tool_choice dict"),
        ({"response_format": "json"}, "response_format", "must be a dict"),
        ({"response_format": {"type": "yaml"}}, "response_format", "unknown response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"schema": {"type": 7}}}},
         "response_format", "malformed JSON schema"),
    ],
)
def test_bad_params_name_the_field(params: dict[str, Any], where: str, problem: str) -> None:
    with pytest.raises(InputError) as ei:
        Params.parse(params)
    assert ei.value.where == where
    assert problem in ei.value.problem


# --------------------------------------------------------------------------- Call


def test_call_build() -> None:
    call = Call.build(
        [{"role": "system", "content": "s"}, USER],
        tools=[weather_tool(), SearchArgs],
        session="s1",
        user="u1",
        temperature=0.7,
        max_tokens=12,
        tool_choice="get_weather",
    )
    assert [m.role for m in call.messages] == ["system", "user"]
    assert [t.name for t in call.tools] == ["get_weather", "SearchArgs"]
    assert call.params == Params(temperature=0.7, max_tokens=12, tool_choice="get_weather")
    assert call.session == "s1" and call.user == "u1"
    assert call.tool("SearchArgs") is call.tools[1]
    assert call.tool("missing") is None
    assert call.trace.records == []
    assert call.on_delta is None


def test_call_build_tool_choice_required_with_tools_is_ok() -> None:
    call = Call.build([USER], tools=[weather_tool()], tool_choice="required")
    assert call.params.tool_choice == "required"
    assert Call.build([USER], tool_choice="none").params.tool_choice == "none"


@pytest.mark.parametrize(
    ("kwargs", "where", "problem"),
    [
        ({"messages": []}, "messages", "at least one message"),
        ({"messages": [USER], "frequency_penalty": 1.0}, "frequency_penalty",
         "unknown parameter"),
        ({"messages": [USER], "temperature": 9}, "temperature", "less than or equal to 2"),
        ({"messages": [USER], "tools": [weather_tool()], "tool_choice": "search"},
         "tool_choice", "'search', which is not in tools"),
        ({"messages": [USER], "tool_choice": "required"}, "tool_choice", "no tools were given"),
        ({"messages": [USER, {"role": "wizard", "content": "x"}]}, "messages[1].role",
         "unknown role"),
        ({"messages": [USER], "tools": [weather_tool(), weather_tool()]}, "tools[1].name",
         "duplicate"),
    ],
)
def test_call_build_errors(kwargs: dict[str, Any], where: str, problem: str) -> None:
    messages = kwargs.pop("messages")
    with pytest.raises(InputError) as ei:
        Call.build(messages, **kwargs)
    assert ei.value.where == where
    assert problem in ei.value.problem


def test_call_model_copy_shares_trace_and_keeps_original() -> None:
    call = Call.build([USER])
    changed = call.model_copy(update={"messages": [Message(role="user", content="other")]})
    changed.trace.add("stage_a", tokens_before=10, tokens_after=4)
    assert call.messages[0].content == "hi"
    assert changed.messages[0].content == "other"
    assert call.trace.of("stage_a") == [{"tokens_before": 10, "tokens_after": 4}]


def test_trace_add_and_of() -> None:
    t = Trace()
    t.add("a", x=1)
    t.add("b")
    t.add("a", x=2)
    assert t.of("a") == [{"x": 1}, {"x": 2}]
    assert t.of("b") == [{}]
    assert t.of("c") == []
    assert [r.stage for r in t.records] == ["a", "b", "a"]


# --------------------------------------------------------------------------- Reply


def test_usage_total_and_to_openai() -> None:
    u = Usage(prompt_tokens=7, completion_tokens=5)
    assert u.total_tokens == 12
    assert u.to_openai() == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def test_reply_to_openai() -> None:
    r = Reply(
        message=Message(role="assistant", content="Hello"),
        usage=Usage(prompt_tokens=3, completion_tokens=1),
        model="m",
    )
    d = r.to_openai(id="chatcmpl-1", created=123)
    assert d == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 123,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    assert r.text == "Hello"
    assert r.tool_calls == []
    assert r.to_openai()["id"].startswith("chatcmpl-")
    # the message in the OpenAI reply parses back into the same message
    assert Message.from_openai(d["choices"][0]["message"]) == r.message


def test_reply_with_tool_calls_round_trip() -> None:
    tc = ToolCall(id="call_9", name="get_weather", arguments={"city": "Rome"})
    r = Reply(message=Message(role="assistant", tool_calls=[tc]), finish_reason="tool_calls")
    assert r.text == ""
    assert r.tool_calls == [tc]
    msg = r.to_openai()["choices"][0]["message"]
    assert msg["content"] is None
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"city": "Rome"}'
    assert Message.from_openai(msg) == r.message
    assert r.to_openai()["choices"][0]["finish_reason"] == "tool_calls"


# --------------------------------------------------------------------------- known bugs


def test_docstring_returns_section_is_not_part_of_description() -> None:
    def now() -> str:
        """Get the current time.

        Returns:
            The time as ISO text.
        """
        return ""

    assert Tool.from_function(now).description == "Get the current time."


def test_from_function_parameter_named_json() -> None:
    def fetch(url: str, json: bool = False) -> str:
        """Fetch a URL.

        Args:
            url: The address.
            json: Parse the body as JSON.
        """
        return url

    t = Tool.from_function(fetch)
    assert t.parameters["properties"]["json"]["description"] == "Parse the body as JSON."


def test_parse_tools_function_with_underscore_parameter() -> None:
    def lookup(_key: str) -> str:
        return _key

    try:
        tools = parse_tools([lookup])
    except InputError as e:
        assert e.where == "tools[0]"
        return
    assert "_key" in tools[0].parameters["properties"]


def test_tool_from_openai_flat_with_type() -> None:
    t = Tool.from_openai({"type": "function", "name": "f", "description": "d"})
    assert (t.name, t.description) == ("f", "d")
