"""ToolLoadoutStage: keeps the query's top_k tools plus always / called / forced ones,
in catalogue order, reuses one retriever per catalogue, never mutates its input."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from contextwise.middleware.tool_loadout import (
    ToolLoadoutStage,
    called_tools,
    request_views,
    schema_tokens,
)
from contextwise.retrievers import tools as tools_mod

from contextwise.policy import ToolLoadout
from contextwise.tokens import count_text
from contextwise.types import Call, Message, Reply, Tool, ToolCall


def tool(name: str, description: str) -> Tool:
    return Tool(name=name, description=description, parameters={
        "type": "object", "properties": {"arg": {"type": "string", "description": "input"}}})


CATALOGUE = [
    tool("get_weather", "Current weather and forecast for a city."),
    tool("book_flight", "Book a plane ticket between two airports."),
    tool("send_email", "Send an email message to a recipient."),
    tool("calculator", "Evaluate an arithmetic expression."),
    tool("stock_quote", "Latest share price of a listed company."),
    tool("translate_text", "Translate text into another language."),
    tool("create_calendar_event", "Add a meeting to the user's calendar."),
    tool("web_search", "Search the web and return result snippets."),
    tool("hotel_search", "Find hotel rooms in a city for given dates."),
    tool("play_music", "Play a song, album or playlist."),
    tool("set_timer", "Start a countdown timer."),
    tool("read_file", "Read a file from the user's drive."),
]


def call_for(messages: list[dict[str, Any]] | str, **params: Any) -> Call:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return Call.build(messages, tools=CATALOGUE, **params)


@pytest.fixture
def stage(embedder: Any) -> ToolLoadoutStage:
    return ToolLoadoutStage(ToolLoadout(top_k=2), embedder=embedder)


def kept(call: Call) -> list[str]:
    return [t.name for t in call.tools]


def test_keeps_the_top_k_in_catalogue_order(stage: ToolLoadoutStage) -> None:
    call = call_for("Find me a hotel in Lisbon and check the weather there")
    out = stage.apply(call)
    assert set(kept(out)) == {"get_weather", "hotel_search"}
    assert kept(out) == ["get_weather", "hotel_search"]  # catalogue order, not score order
    rec = out.trace.of("tools")[-1]
    assert rec["tools_before"] == 12 and rec["tools_after"] == 2 and rec["dropped"] == 10
    assert rec["kept"] == kept(out)
    total = sum(count_text(json.dumps(t.to_openai())) for t in CATALOGUE)
    assert rec["tokens_before"] == total
    assert rec["tokens_after"] == sum(schema_tokens(t) for t in out.tools) < total


def test_never_mutates_the_input(stage: ToolLoadoutStage) -> None:
    call = call_for("What's the weather in Oslo?")
    before = call.model_dump(exclude={"trace"})  # the trace is shared by design
    out = stage.apply(call)
    assert call.model_dump(exclude={"trace"}) == before and len(call.tools) == 12
    assert out is not call and out.messages == call.messages


def test_passes_through_small_catalogues_without_loading_a_model() -> None:
    def no_embedder() -> Any:
        raise AssertionError("the embedder must not load for a small catalogue")

    stage = ToolLoadoutStage(ToolLoadout(top_k=5), embedder=no_embedder)
    call = Call.build([{"role": "user", "content": "hi"}], tools=CATALOGUE[:5])
    out = stage.apply(call)
    assert out is call
    rec = out.trace.of("tools")[-1]
    assert rec["passthrough"] is True and rec["tools_after"] == 5
    assert rec["tokens_before"] == rec["tokens_after"] > 0


def test_keeps_always_called_and_forced_tools(stage: ToolLoadoutStage) -> None:
    stage.policy = ToolLoadout(top_k=2, always=["set_timer", "no_such_tool"])
    messages = [
        {"role": "user", "content": "Translate 'hello' to German"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "translate_text", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Hallo"},
        {"role": "user", "content": "What's the weather in Berlin?"},
    ]
    out = stage.apply(call_for(messages, tool_choice="read_file"))
    names = kept(out)
    assert "get_weather" in names  # retrieved
    assert {"set_timer", "translate_text", "read_file"} <= set(names)
    assert names == [t.name for t in CATALOGUE if t.name in names]
    rec = out.trace.of("tools")[-1]
    assert rec["unknown_always"] == ["no_such_tool"]
    assert rec["always"] == ["set_timer"]
    assert rec["called"] == ["translate_text"]
    assert rec["forced"] == "read_file"


def test_keep_called_off_drops_old_tools(embedder: Any) -> None:
    stage = ToolLoadoutStage(ToolLoadout(top_k=1, keep_called=False), embedder=embedder)
    messages = [
        {"role": "user", "content": "play some jazz"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "play_music"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "playing"},
        {"role": "user", "content": "Now what's 12 * 7?"},
    ]
    assert kept(stage.apply(call_for(messages))) == ["calculator"]


def test_agent_step_after_the_user_message_is_part_of_the_query(stage: ToolLoadoutStage
                                                                  ) -> None:
    messages = [
        {"role": "user", "content": "Plan my Friday trip to Rome"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "web_search"}}]},
        {"role": "tool", "tool_call_id": "c1",
         "content": "Cheapest option: flight AZ611 Oslo-Rome, Friday 07:10; then pick a hotel."},
    ]
    views = request_views(call_for(messages).messages, "Plan my Friday trip to Rome")
    assert len(views) == 2 and "AZ611" in views[1]
    stage.policy = ToolLoadout(top_k=2, keep_called=False)
    out = stage.apply(call_for(messages))
    assert "book_flight" in kept(out)
    assert out.trace.of("tools")[-1]["views"] == 2


def test_no_user_query_passes_through() -> None:
    def no_embedder() -> Any:
        raise AssertionError("nothing to rank: the embedder must not load")

    stage = ToolLoadoutStage(ToolLoadout(top_k=2), embedder=no_embedder)
    call = Call.build([{"role": "system", "content": "You are terse."}], tools=CATALOGUE)
    out = stage.apply(call)
    assert out is call and out.trace.of("tools")[-1]["reason"] == "no query to rank tools by"


def test_one_retriever_per_catalogue(stage: ToolLoadoutStage, monkeypatch: Any) -> None:
    tools_mod._BUILT.clear()
    built = []
    real = tools_mod.ToolRetriever._build

    def counting_build(self: Any, *args: Any) -> Any:
        built.append(1)
        return real(self, *args)

    monkeypatch.setattr(tools_mod.ToolRetriever, "_build", counting_build)
    for q in ("weather in Rome", "send an email to Ann", "play a song"):
        stage.apply(call_for(q))  # a fresh Call (and fresh Tool objects) each time
    assert len(built) == 1 and len(stage._retrievers) == 1
    assert stage.retriever(CATALOGUE) is stage.retriever(list(reversed(CATALOGUE)))
    stage.apply(Call.build([{"role": "user", "content": "weather"}], tools=CATALOGUE[:-1]))
    assert len(built) == 2 and len(stage._retrievers) == 2


def test_learn_from_calls(embedder: Any, make_backend: Any) -> None:
    tools = [*CATALOGUE, tool("acme_helper", "Internal helper for ACME workflows.")]
    stage = ToolLoadoutStage(ToolLoadout(top_k=1, keep_called=False), embedder=embedder,
                             learn_from_calls=True)
    query = "my VPN token expired, get me a new one"
    first = stage.apply(Call.build([{"role": "user", "content": query}], tools=tools))
    assert kept(first) != ["acme_helper"]
    backend = make_backend(tool_call=("acme_helper", {}))
    call = Call.build([{"role": "user", "content": "reset my VPN token"}], tools=tools,
                      tool_choice="acme_helper")

    def next_(c: Call) -> Reply:
        return backend.generate([c])[0]

    stage(call, next_)
    assert stage.retriever(tools).examples == {"acme_helper": ["reset my VPN token"]}
    again = stage.apply(Call.build([{"role": "user", "content": query}], tools=tools))
    assert kept(again) == ["acme_helper"]
    # a catalogue that changed (a tool added) starts with what was learned
    grown = [*tools, tool("order_pizza", "Order a pizza for delivery.")]
    assert stage.retriever(grown).examples == {"acme_helper": ["reset my VPN token"]}


def test_examples_seed_and_async_path(embedder: Any) -> None:
    tools = [*CATALOGUE, tool("acme_helper", "Internal helper for ACME workflows.")]
    stage = ToolLoadoutStage(ToolLoadout(top_k=1), embedder=embedder,
                             examples={"acme_helper": ["reset my VPN token"],
                                       "not_in_catalogue": ["ignored"]})
    seen: list[Call] = []

    async def anext(c: Call) -> Reply:
        seen.append(c)
        return Reply(message=Message(role="assistant", content="ok"), trace=c.trace)

    call = Call.build([{"role": "user", "content": "VPN token expired, need a new one"}],
                      tools=tools)
    asyncio.run(stage.acall(call, anext))
    assert kept(seen[0]) == ["acme_helper"]


def test_helpers() -> None:
    msgs = call_for([
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [
            ToolCall(id="a", name="calculator"), ToolCall(id="b", name="web_search")]},
        {"role": "tool", "tool_call_id": "a", "content": "1"},
        {"role": "tool", "tool_call_id": "b", "content": "2"},
        {"role": "assistant", "content": None, "tool_calls": [
            ToolCall(id="c", name="calculator")]},
        {"role": "tool", "tool_call_id": "c", "content": "3"},
    ]).messages
    assert called_tools(msgs) == ["calculator", "web_search"]
    assert request_views(msgs, "x") == ["x", "x\n3"]
    assert request_views(msgs[:1], "x") == ["x"]
    assert request_views(msgs[:1], "") == []
