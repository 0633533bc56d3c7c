"""The Pipeline: stages as an onion around a (fake) backend, sessions, ledger, streaming."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from contextwise.memory.conversations import Conversations
from contextwise.memory.ledger import Ledger
from contextwise.memory.store import Store
from contextwise.middleware.base import ANext, Next, Stage, acompose, compose

from contextwise import InputError, Pipeline, Policy
from contextwise.errors import Cancelled
from contextwise.policy import Budget, Storage
from contextwise.types import Call, Message, Reply, Usage

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}


def u(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


@pytest.fixture
def build(fake_backend: Any, store: Store) -> Callable[..., Pipeline]:
    """Pipeline(policy, backend=fake_backend, stages=..., store=store)."""

    def make(stages: Sequence[Any] = (), policy: Policy | None = None,
             backend: Any = None) -> Pipeline:
        return Pipeline(policy or Policy(), backend=backend or fake_backend, stages=list(stages),
                        store=store)

    return make


def recorder(name: str, log: list[str]) -> Callable[[Call, Next], Reply]:
    def stage(call: Call, next: Next) -> Reply:
        log.append(f"{name}>")
        reply = next(call)
        log.append(f"<{name}")
        return reply

    return stage


class Recording(Stage):
    """A Stage subclass with an async twin that logs enter/exit."""

    def __init__(self, name: str, log: list[str]):
        self.name = name
        self.log = log

    def apply(self, call: Call) -> Call:
        self.log.append(f"{self.name}>")
        return call

    def on_reply(self, call: Call, reply: Reply) -> Reply:
        self.log.append(f"<{self.name}")
        return reply


def logging_backend(cls: type, log: list[str]) -> Any:
    class LoggingBackend(cls):  # type: ignore[misc, valid-type]
        def generate(self, calls: Sequence[Call]) -> list[Reply]:
            log.append("backend")
            return super().generate(calls)

    return LoggingBackend()


def canned(text: str) -> Reply:
    return Reply(message=Message(role="assistant", content=text), model="cache",
                 usage=Usage(prompt_tokens=0, completion_tokens=1))


# --------------------------------------------------------------------------- basics


def test_plain_call_echoes_through_the_backend(build: Callable[..., Pipeline],
                                               fake_backend: Any) -> None:
    p = build()
    reply = p([u("hello there")])
    assert isinstance(reply, Reply)
    assert reply.text == "hello there"
    assert reply.model == "fake-model"
    assert reply.usage.prompt_tokens == 2
    assert reply.usage.completion_tokens == 2
    assert reply.latency_s > 0
    assert len(fake_backend.calls) == 1
    assert fake_backend.last_call.messages == [Message(role="user", content="hello there")]
    assert p.chat([u("again")]).text == "again"


def test_given_backend_is_used_not_built(build: Callable[..., Pipeline],
                                         fake_backend: Any) -> None:
    assert build().backend is fake_backend


def test_default_store_lives_in_contextwise_home(fake_backend: Any) -> None:
    p = Pipeline(backend=fake_backend, stages=[])
    try:
        assert p.store.path == str(Path(os.environ["CONTEXTWISE_HOME"]) / "contextwise.db")
        p([u("x")], session="s")
        assert Path(p.store.path).is_file()
    finally:
        p.store.close()


def test_tool_call_reply(build: Callable[..., Pipeline], make_backend: Any) -> None:
    backend = make_backend(tool_call=("get_weather", {"city": "Paris"}))
    p = build(backend=backend)
    reply = p([u("weather in Paris?")], tools=[WEATHER])
    assert reply.finish_reason == "tool_calls"
    assert reply.text == ""
    assert [(tc.name, tc.arguments) for tc in reply.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert [t.name for t in backend.last_call.tools] == ["get_weather"]


# --------------------------------------------------------------------------- onion


def test_onion_order_first_listed_is_outermost(build: Callable[..., Pipeline],
                                               make_backend: Any) -> None:
    log: list[str] = []
    p = build([recorder("A", log), Recording("B", log), recorder("C", log)],
              backend=logging_backend(make_backend, log))
    p([u("x")])
    assert log == ["A>", "B>", "C>", "backend", "<C", "<B", "<A"]


async def test_onion_order_async(build: Callable[..., Pipeline], make_backend: Any) -> None:
    log: list[str] = []
    p = build([Recording("A", log), recorder("B", log), Recording("C", log)],
              backend=logging_backend(make_backend, log))
    reply = await p.achat([u("x")])
    assert reply.text == "x"
    assert log == ["A>", "B>", "C>", "backend", "<C", "<B", "<A"]


def test_compose_without_stages_is_the_inner_handler() -> None:
    def inner(call: Call) -> Reply:
        return canned("inner")

    assert compose([], inner) is inner


async def test_acompose_directly() -> None:
    log: list[str] = []

    async def inner(call: Call) -> Reply:
        log.append("inner")
        return canned("inner")

    handler: ANext = acompose([Recording("A", log), recorder("B", log)], inner)
    reply = await handler(Call.build([u("x")]))
    assert reply.text == "inner"
    assert log == ["A>", "B>", "inner", "<B", "<A"]


def test_stage_can_short_circuit(build: Callable[..., Pipeline], fake_backend: Any) -> None:
    log: list[str] = []

    def cache(call: Call, next: Next) -> Reply:
        call.trace.add("cache", hit=True)
        return canned("from cache")

    p = build([recorder("outer", log), cache, recorder("inner", log)])
    reply = p([u("x")], session="s")
    assert reply.text == "from cache"
    assert fake_backend.calls == []
    assert log == ["outer>", "<outer"]  # the inner stage never ran
    # bookkeeping still happens: ledger row and session turn
    assert p.ledger is not None
    (row,) = p.ledger.rows()
    assert row["model"] == "cache"
    assert row["trace"] == []  # the canned reply carries its own (empty) trace
    assert [m.content for m in p.conversations.history("s")] == ["x", "from cache"]


async def test_short_circuit_async(build: Callable[..., Pipeline], fake_backend: Any) -> None:
    class Cache(Stage):
        def __call__(self, call: Call, next: Next) -> Reply:
            return canned("sync hit")

        async def acall(self, call: Call, anext: ANext) -> Reply:
            return canned("async hit")

    def plain_cache(call: Call, next: Next) -> Reply:
        return canned("plain hit")

    assert (await build([Cache()]).achat([u("x")])).text == "async hit"
    assert build([Cache()])([u("x")]).text == "sync hit"
    assert (await build([plain_cache]).achat([u("x")])).text == "plain hit"
    assert fake_backend.calls == []
    assert fake_backend.agenerate_batches == 0


def test_stage_rewrites_call_with_model_copy(build: Callable[..., Pipeline],
                                             fake_backend: Any) -> None:
    seen: dict[str, Call] = {}

    def keep_last(call: Call, next: Next) -> Reply:
        seen["original"] = call
        before = len(call.messages)
        changed = call.model_copy(update={"messages": call.messages[-1:]})
        call.trace.add("keep_last", tokens_before=before, tokens_after=1)
        return next(changed)

    p = build([keep_last])
    messages = [{"role": "system", "content": "be nice"}, u("one"), a("two"), u("three")]
    reply = p(messages)
    assert [m.content for m in fake_backend.last_call.messages] == ["three"]
    original = seen["original"]
    assert [m.content for m in original.messages] == ["be nice", "one", "two", "three"]
    assert fake_backend.last_call is not original
    # the trace is shared between the copies and comes back on the reply
    assert fake_backend.last_call.trace is original.trace
    assert reply.trace.of("keep_last") == [{"tokens_before": 4, "tokens_after": 1}]


def test_stage_rewrites_params(build: Callable[..., Pipeline], fake_backend: Any) -> None:
    def cap(call: Call, next: Next) -> Reply:
        params = call.params.model_copy(update={"max_tokens": 7, "temperature": 0.5})
        return next(call.model_copy(update={"params": params}))

    build([cap])([u("x")], max_tokens=100)
    assert fake_backend.last_call.params.max_tokens == 7
    assert fake_backend.last_call.params.temperature == 0.5


class AddSystem(Stage):
    name = "add_system"

    def apply(self, call: Call) -> Call:
        system = Message(role="system", content="You are terse.")
        call.trace.add(self.name, added=1)
        return call.model_copy(update={"messages": [system, *call.messages]})

    def on_reply(self, call: Call, reply: Reply) -> Reply:
        assert call.messages[0].role == "system"  # on_reply gets the rewritten call
        return reply.model_copy(
            update={"message": Message(role="assistant", content=reply.text.upper())}
        )


def test_stage_subclass_apply_alone_needs_no_model() -> None:
    call = Call.build([u("hi")])
    out = AddSystem().apply(call)
    assert [m.role for m in out.messages] == ["system", "user"]
    assert [m.role for m in call.messages] == ["user"]


def test_base_stage_is_a_pass_through(build: Callable[..., Pipeline], fake_backend: Any) -> None:
    reply = build([Stage()])([u("same")])
    assert reply.text == "same"
    assert fake_backend.last_call.messages == [Message(role="user", content="same")]


def test_stage_subclass_apply_and_on_reply(build: Callable[..., Pipeline],
                                           fake_backend: Any) -> None:
    reply = build([AddSystem()])([u("hi there")])
    assert [m.role for m in fake_backend.last_call.messages] == ["system", "user"]
    assert reply.text == "HI THERE"
    assert reply.trace.of("add_system") == [{"added": 1}]


async def test_stage_subclass_async(build: Callable[..., Pipeline], fake_backend: Any) -> None:
    reply = await build([AddSystem()]).achat([u("hi there")])
    assert [m.role for m in fake_backend.last_call.messages] == ["system", "user"]
    assert reply.text == "HI THERE"
    assert fake_backend.agenerate_batches == 1


async def test_sync_only_function_stage_on_async_path(build: Callable[..., Pipeline],
                                                      fake_backend: Any) -> None:
    threads: list[threading.Thread] = []

    def shout(call: Call, next: Next) -> Reply:
        threads.append(threading.current_thread())
        changed = call.model_copy(
            update={"messages": [Message(role="user", content=call.messages[-1].text + "!")]}
        )
        reply = next(changed)
        return reply.model_copy(update={"finish_reason": "shouted"})

    reply = await build([shout]).achat([u("hey")])
    assert reply.text == "hey!"
    assert reply.finish_reason == "shouted"
    assert fake_backend.agenerate_batches == 1
    # it ran off the event loop's thread, so it could block freely
    assert threads and threads[0] is not threading.main_thread()


async def test_achat(build: Callable[..., Pipeline], fake_backend: Any) -> None:
    p = build()
    reply = await p.achat([u("async hello")], session="s", temperature=0.3)
    assert reply.text == "async hello"
    assert fake_backend.agenerate_batches == 1
    assert fake_backend.last_call.params.temperature == 0.3
    assert [m.content for m in p.conversations.history("s")] == ["async hello", "async hello"]
    assert p.ledger is not None and p.ledger.totals()["calls"] == 1


async def test_achat_concurrent_calls(build: Callable[..., Pipeline],
                                      fake_backend: Any) -> None:
    p = build()
    replies = await asyncio.gather(*(p.achat([u(f"q{i}")]) for i in range(5)))
    assert [r.text for r in replies] == [f"q{i}" for i in range(5)]
    assert len(fake_backend.calls) == 5


def test_stage_errors_propagate(build: Callable[..., Pipeline], fake_backend: Any) -> None:
    def broken(call: Call, next: Next) -> Reply:
        raise RuntimeError("stage broke")

    p = build([broken])
    with pytest.raises(RuntimeError, match="stage broke"):
        p([u("x")], session="s")
    assert fake_backend.calls == []
    assert p.conversations.history("s") == []
    assert p.ledger is not None and p.ledger.rows() == []


# --------------------------------------------------------------------------- streaming


def test_stream_yields_deltas_then_reply(build: Callable[..., Pipeline],
                                         fake_backend: Any) -> None:
    text = "the quick brown fox"
    items = list(build().stream([u(text)]))
    *deltas, final = items
    assert all(isinstance(d, str) for d in deltas)
    assert deltas == ["the", " quick", " brown", " fox"]
    assert isinstance(final, Reply)
    assert final.text == "".join(deltas) == text
    assert fake_backend.last_call.on_delta is not None


def test_stream_through_stages_and_session(build: Callable[..., Pipeline],
                                           fake_backend: Any) -> None:
    p = build([AddSystem()])
    items = list(p.stream([u("one two")], session="s"))
    assert items[:-1] == ["one", " two"]
    final = items[-1]
    assert isinstance(final, Reply)
    assert final.text == "ONE TWO"  # on_reply changed the final reply, not the deltas
    assert [m.content for m in p.conversations.history("s")] == ["one two", "ONE TWO"]


def test_stream_reraises_errors(build: Callable[..., Pipeline]) -> None:
    def broken(call: Call, next: Next) -> Reply:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(build([broken]).stream([u("x")]))


async def test_astream_yields_deltas_then_reply(build: Callable[..., Pipeline],
                                                fake_backend: Any) -> None:
    text = "jumps over  the lazy dog"
    items = [item async for item in build().astream([u(text)], session="s")]
    *deltas, final = items
    assert deltas == ["jumps", " over", "  the", " lazy", " dog"]
    assert all(isinstance(d, str) for d in deltas)
    assert isinstance(final, Reply)
    assert final.text == "".join(deltas) == text
    assert fake_backend.agenerate_batches == 1


async def test_astream_reraises_errors(build: Callable[..., Pipeline]) -> None:
    def broken(call: Call, next: Next) -> Reply:
        raise RuntimeError("async boom")

    with pytest.raises(RuntimeError, match="async boom"):
        [item async for item in build([broken]).astream([u("x")])]


def test_closing_a_stream_early_stops_generation(build: Callable[..., Pipeline],
                                                 make_backend: Any) -> None:
    pause = threading.Event()
    backend = make_backend(pause_after_first_delta=pause)
    p = build(backend=backend)
    it = p.stream([u("one two three four")], session="s")
    assert next(it) == "one"
    it.close()
    pause.set()  # let the backend try its next delta
    assert backend.cancelled.wait(5)
    assert len(backend.delta_errors) == 1
    assert isinstance(backend.delta_errors[0], Cancelled)
    # a cancelled call is not a finished turn
    assert p.conversations.history("s") == []
    assert p.ledger is not None and p.ledger.rows() == []


async def test_closing_an_astream_early_stops_generation(build: Callable[..., Pipeline],
                                                         make_backend: Any) -> None:
    pause = threading.Event()
    backend = make_backend(pause_after_first_delta=pause)
    p = build(backend=backend)
    agen = p.astream([u("one two three four")], session="s")
    assert await agen.__anext__() == "one"
    timer = threading.Timer(0.05, pause.set)
    timer.start()
    await agen.aclose()  # waits for the worker to stop
    timer.join()
    assert backend.cancelled.is_set()
    assert isinstance(backend.delta_errors[0], Cancelled)
    assert p.conversations.history("s") == []


# --------------------------------------------------------------------------- sessions


def test_session_memory_second_call_sees_first_turn(build: Callable[..., Pipeline],
                                                    fake_backend: Any) -> None:
    p = build()
    p([u("my name is Ada")], session="s1")
    p([u("what is my name?")], session="s1")
    assert [(m.role, m.content) for m in fake_backend.last_call.messages] == [
        ("user", "my name is Ada"),
        ("assistant", "my name is Ada"),
        ("user", "what is my name?"),
    ]
    assert fake_backend.last_call.session == "s1"
    # another session does not see it
    p([u("hello")], session="s2")
    assert [m.content for m in fake_backend.last_call.messages] == ["hello"]
    # no session: nothing is stored or recalled
    p([u("anon")])
    assert [m.content for m in fake_backend.last_call.messages] == ["anon"]
    assert sorted(p.conversations.sessions()) == ["s1", "s2"]


def test_resending_whole_conversation_does_not_duplicate(build: Callable[..., Pipeline],
                                                         fake_backend: Any) -> None:
    p = build()
    first = p([{"role": "system", "content": "sys"}, u("q1")], session="s")
    convo = [{"role": "system", "content": "sys"}, u("q1"), first.message.to_openai(), u("q2")]
    p(convo, session="s")
    assert [m.content for m in fake_backend.last_call.messages] == ["sys", "q1", "q1", "q2"]
    assert [m.content for m in p.conversations.history("s")] == ["sys", "q1", "q1", "q2", "q2"]


def test_session_persists_across_pipelines(store_path: Path, make_backend: Any) -> None:
    s1 = Store(store_path)
    Pipeline(backend=make_backend(), stages=[], store=s1)([u("remember")], session="s")
    s1.close()
    backend = make_backend()
    s2 = Store(store_path)
    try:
        Pipeline(backend=backend, stages=[], store=s2)([u("next")], session="s")
        assert [m.content for m in backend.last_call.messages] == ["remember", "remember", "next"]
    finally:
        s2.close()


def test_session_tool_result_answers_stored_tool_call(build: Callable[..., Pipeline],
                                                      make_backend: Any) -> None:
    backend = make_backend(tool_call=("get_weather", {"city": "Oslo"}))
    p = build(backend=backend)
    first = p([u("weather in Oslo?")], tools=[WEATHER], session="s")
    (tc,) = first.tool_calls
    # only the new turn: a tool result for the call stored in the session
    p([{"role": "tool", "tool_call_id": tc.id, "content": "rain"}], session="s")
    assert [m.role for m in backend.last_call.messages] == ["user", "assistant", "tool"]
    assert backend.last_call.messages[1].tool_calls == [tc]
    assert [m.role for m in p.conversations.history("s")] == [
        "user", "assistant", "tool", "assistant"
    ]


def test_session_unknown_tool_result_still_rejected(build: Callable[..., Pipeline],
                                                    fake_backend: Any) -> None:
    p = build()
    p([u("hi")], session="s")
    with pytest.raises(InputError) as ei:
        p([{"role": "tool", "tool_call_id": "nope", "content": "x"}], session="s")
    assert ei.value.where == "messages[0].tool_call_id"
    assert len(fake_backend.calls) == 1


# --------------------------------------------------------------------------- params & ledger


def test_max_tokens_default_comes_from_policy(build: Callable[..., Pipeline],
                                              fake_backend: Any) -> None:
    p = build(policy=Policy(budget=Budget(max_output_tokens=33)))
    p([u("x")])
    assert fake_backend.last_call.params.max_tokens == 33
    p([u("x")], max_tokens=5)
    assert fake_backend.last_call.params.max_tokens == 5
    build()([u("x")])
    assert fake_backend.last_call.params.max_tokens == 256


def test_params_reach_the_backend(build: Callable[..., Pipeline], fake_backend: Any) -> None:
    build()([u("x")], temperature=0.2, stop="\n", seed=3)
    params = fake_backend.last_call.params
    assert (params.temperature, params.stop, params.seed) == (0.2, ["\n"], 3)


def test_ledger_records_one_row_per_call(build: Callable[..., Pipeline]) -> None:
    def drop_system(call: Call, next: Next) -> Reply:
        kept = [m for m in call.messages if m.role != "system"]
        return next(call.model_copy(update={"messages": kept}))

    p = build([drop_system])
    system = {"role": "system", "content": "a very long system prompt of ten words here ok"}
    p([system, u("short question")], session="s")
    p([u("again")])
    assert p.ledger is not None
    rows = p.ledger.rows()
    assert len(rows) == 2
    first = rows[0]
    assert first["session"] == "s"
    assert first["model"] == "fake-model"
    assert first["raw_prompt_tokens"] == 10 + 2  # the call as it came in, in backend tokens
    assert first["prompt_tokens"] == 2  # what the backend saw
    assert first["completion_tokens"] == 2
    assert first["cl100k_raw_prompt"] > first["cl100k_prompt"]
    assert rows[1]["session"] is None
    assert rows[1]["raw_prompt_tokens"] == rows[1]["prompt_tokens"] == 1
    assert p.ledger.totals()["calls"] == 2
    # the ledger is in the pipeline's store
    assert Ledger(p.store).totals()["calls"] == 2


def test_ledger_off(build: Callable[..., Pipeline], store: Store) -> None:
    p = build(policy=Policy(storage=Storage(ledger=False)))
    assert p.ledger is None
    p([u("x")], session="s")
    assert Ledger(store).rows() == []
    assert [m.content for m in Conversations(store).history("s")] == ["x", "x"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("messages", "kwargs", "where"),
    [
        ([{"role": "robot", "content": "x"}], {}, "messages[0].role"),
        ([u("x"), {"role": "user", "content": 3}], {}, "messages[1].content"),
        ([], {}, "messages"),
        ([u("x")], {"temperature": 5}, "temperature"),
        ([u("x")], {"frobnicate": True}, "frobnicate"),
        ([u("x")], {"tool_choice": "required"}, "tool_choice"),
        ([u("x")], {"tools": [WEATHER, WEATHER]}, "tools[1].name"),
    ],
)
async def test_input_error_before_backend(
    build: Callable[..., Pipeline], fake_backend: Any,
    messages: list[Any], kwargs: dict[str, Any], where: str,
) -> None:
    log: list[str] = []
    p = build([recorder("A", log)])
    with pytest.raises(InputError) as ei:
        p(messages, session="s", **kwargs)
    assert ei.value.where == where
    with pytest.raises(InputError):
        await p.achat(messages, **kwargs)
    with pytest.raises(InputError):
        next(p.stream(messages, **kwargs))
    with pytest.raises(InputError):
        await p.astream(messages, **kwargs).__anext__()
    assert fake_backend.calls == []
    assert log == []
    assert p.conversations.history("s") == []
    assert p.ledger is not None and p.ledger.rows() == []
