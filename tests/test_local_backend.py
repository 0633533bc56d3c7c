"""Integration tests with the real embedded model (SmolLM2-135M-Instruct, CPU)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from contextwise.backends.loading import ALIASES, converted_dir, load_model, packaged_path
from contextwise.memory.store import Store

from contextwise import ContextOverflow, ModelNotFound, Pipeline, Policy, Reply
from contextwise.policy import Budget

pytestmark = pytest.mark.model


def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather for a city.

    Args:
        city: City name.
        unit: celsius or fahrenheit.
    """
    return "sunny"


def convert_currency(amount: float, from_currency: str, to_currency: str) -> str:
    """Convert money between currencies.

    Args:
        amount: How much.
        from_currency: ISO code, e.g. EUR.
        to_currency: ISO code, e.g. USD.
    """
    return "1.0"


TOOLS = [get_weather, convert_currency]
USER = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Pipeline:
    store = Store(tmp_path_factory.mktemp("db") / "cw.db")
    # no response cache: these tests compare the model's own paths (stream, async, sync)
    return Pipeline(Policy(cache=None), store=store)


def _collect(stream) -> tuple[list[str], Reply]:
    deltas, final = [], None
    for item in stream:
        if isinstance(item, Reply):
            final = item
        else:
            deltas.append(item)
    assert final is not None
    return deltas, final


def test_required_tool_call_parses_and_validates(pipeline):
    reply = pipeline(USER, tools=TOOLS, tool_choice="required", max_tokens=48)
    assert reply.finish_reason == "tool_calls"
    assert reply.invalid_tool_calls == []
    (call,) = reply.tool_calls
    tool = next(t for t in pipeline_tools() if t.name == call.name)
    assert tool.argument_errors(call.arguments) == []
    assert reply.message.to_openai()["tool_calls"][0]["function"]["name"] == call.name


def pipeline_tools():
    from contextwise.types import parse_tools

    return parse_tools(TOOLS)


def test_named_tool_choice_calls_that_tool(pipeline):
    reply = pipeline([{"role": "user", "content": "Convert 10 EUR to USD"}], tools=TOOLS,
                     tool_choice={"type": "function", "function": {"name": "convert_currency"}},
                     max_tokens=48)
    (call,) = reply.tool_calls
    assert call.name == "convert_currency"
    jsonschema.validate(call.arguments, pipeline_tools()[1].parameters)


def test_streaming_matches_non_streaming_under_greedy(pipeline):
    msgs = [{"role": "user", "content": "Name three colors."}]
    plain = pipeline(msgs, max_tokens=24)
    deltas, final = _collect(pipeline.stream(msgs, max_tokens=24))
    assert len(deltas) > 1
    assert "".join(deltas) == final.text == plain.text
    assert final.usage == plain.usage


def test_streaming_with_stop_and_tools_adds_up(pipeline):
    msgs = [{"role": "user", "content": "Count from 1 to 9, separated by commas."}]
    plain = pipeline(msgs, stop=["5"], max_tokens=40)
    deltas, final = _collect(pipeline.stream(msgs, stop=["5"], max_tokens=40))
    assert "".join(deltas) == final.text == plain.text
    assert "5" not in final.text
    deltas, final = _collect(pipeline.stream(USER, tools=TOOLS, max_tokens=40))
    assert "".join(deltas) == final.text


async def test_async_matches_sync(pipeline):
    msgs = [{"role": "user", "content": "Say hello."}]
    sync = pipeline(msgs, max_tokens=12)
    reply = await pipeline.achat(msgs, max_tokens=12)
    assert reply.text == sync.text
    deltas = []
    async for item in pipeline.astream(msgs, max_tokens=12):
        if isinstance(item, str):
            deltas.append(item)
    assert "".join(deltas) == sync.text


def test_json_schema_output_validates(pipeline):
    schema = {"type": "object", "properties": {"name": {"type": "string"},
              "age": {"type": "integer"}}, "required": ["name", "age"],
              "additionalProperties": False}
    reply = pipeline([{"role": "user", "content": "Invent a person."}], max_tokens=48,
                     response_format={"type": "json_schema",
                                      "json_schema": {"name": "person", "schema": schema}})
    jsonschema.validate(json.loads(reply.text), schema)


@pytest.mark.parametrize("max_tokens", [32, 64])
def test_a_json_reply_closes_within_max_tokens(pipeline, max_tokens):
    # Asked for a joke, the 135M model repeats itself inside the first string until the
    # budget ends; the grammar's closing reserve still hands back a complete object.
    schema = {"type": "object", "properties": {"setup": {"type": "string"},
              "punchline": {"type": "string"}}, "required": ["setup", "punchline"]}
    reply = pipeline([{"role": "user", "content": "Tell me a joke about cats."}],
                     max_tokens=max_tokens, cache="skip",
                     response_format={"type": "json_schema",
                                      "json_schema": {"name": "joke", "schema": schema}})
    jsonschema.validate(json.loads(reply.text), schema)
    assert reply.finish_reason == "stop" and reply.usage.completion_tokens <= max_tokens


def test_json_object_output_parses(pipeline):
    reply = pipeline([{"role": "user", "content": "Give a JSON object with a city."}],
                     max_tokens=40, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.text), dict)


def test_max_tokens_caps_output(pipeline):
    reply = pipeline([{"role": "user", "content": "Write a long essay about rivers."}],
                     max_tokens=5)
    assert reply.usage.completion_tokens == 5
    assert reply.finish_reason == "length"


def test_seeded_sampling_is_reproducible(pipeline):
    msgs = [{"role": "user", "content": "Write a word."}]
    a = pipeline(msgs, temperature=1.0, seed=7, max_tokens=10)
    b = pipeline(msgs, temperature=1.0, seed=7, max_tokens=10)
    assert a.text == b.text


def test_session_memory_feeds_the_next_turn(pipeline):
    first = pipeline([{"role": "user", "content": "My name is Ann."}], session="s", max_tokens=8)
    second = pipeline([{"role": "user", "content": "What is my name?"}], session="s",
                      max_tokens=8)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    history = pipeline.conversations.history("s")
    assert [m.role for m in history] == ["user", "assistant", "user", "assistant"]


def test_prompt_over_budget_is_a_clear_error(tmp_path):
    small = Pipeline(Policy(budget=Budget(max_context_tokens=64, max_output_tokens=32)),
                     store=Store(tmp_path / "cw.db"))
    with pytest.raises(ContextOverflow, match="over by"):
        small([{"role": "user", "content": "word " * 100}])


def test_converted_weights_are_cached_and_reload_from_folder(pipeline):
    _ = pipeline.backend
    gguf = packaged_path(ALIASES["smollm2-135m-instruct"])
    converted = converted_dir(str(gguf), None)
    assert (converted / "config.json").is_file()
    loaded = load_model(str(converted))
    assert loaded.source == "dir"
    assert loaded.model.config.vocab_size == pipeline.backend.model.config.vocab_size


def test_bad_model_specs_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFound, match="without config.json"):
        load_model(str(tmp_path))


def test_decode_texts_equals_decoding_each_reply(pipeline):
    backend = getattr(pipeline.backend, "backend", pipeline.backend)  # under a BatchingEngine
    tok = backend.tokenizer
    seqs = [tok("Paris is the capital of France.")["input_ids"], [tok.eos_token_id],
            tok(" spaces  and\nnewlines, ünïcode")["input_ids"] + [tok.eos_token_id], []]
    assert backend.decode_texts(seqs) == [tok.decode(s, skip_special_tokens=True) for s in seqs]
