"""Tool rendering and tool-call parsing, without a model."""

from contextwise.backends.chat_format import parse_tool_calls, template_messages, tool_call_schema

from contextwise.types import Call, parse_tools


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


TOOLS = parse_tools([add])


def test_tagged_call_parses():
    content, calls, invalid = parse_tool_calls(
        'Sure.<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', TOOLS)
    assert content == "Sure."
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert invalid == []


def test_unterminated_and_bare_calls_parse():
    _, calls, _ = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}',
                                   TOOLS)
    assert calls[0].name == "add"
    _, calls, _ = parse_tool_calls('{"name": "add", "arguments": {"a": 3, "b": 4}}', TOOLS)
    assert calls[0].arguments == {"a": 3, "b": 4}


def test_bad_calls_become_invalid_not_dropped():
    _, calls, invalid = parse_tool_calls(
        '<tool_call>{"name": "add", "arguments": {"a": "x"}}</tool_call>'
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{oops</tool_call>',
        TOOLS)
    assert calls == []
    assert len(invalid) == 3
    assert "unknown tool" in invalid[1].error
    assert "not valid JSON" in invalid[2].error


def test_plain_text_is_content():
    assert parse_tool_calls("Just text about add.", TOOLS) == ("Just text about add.", [], [])


def test_tools_go_into_the_system_prompt_and_history_calls_render():
    call = Call.build(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2?"},
         {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
          "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "3"}],
        tools=[add])
    rendered = template_messages(call)
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.")
    assert '"name": "add"' in rendered[0]["content"]
    assert rendered[2]["content"] == '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    assert rendered[3] == {"role": "tool", "content": "3"}


def test_tool_call_schema_covers_each_tool():
    two = parse_tools([add, {"type": "function", "function": {"name": "noop"}}])
    schema = tool_call_schema(two)
    assert [o["properties"]["name"]["const"] for o in schema["anyOf"]] == ["add", "noop"]
