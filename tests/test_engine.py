"""The batching engine: queue, dynamic batches, streaming and cancellation per row.

Queue and batching logic run against FakeBackend (the engine hands a non-local
backend each compatible group as one `generate(calls)`); the `model` tests run
the padded batched generate of the real embedded model and compare it with the
backend's own single-request path.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import FakeBackend
from contextwise.backends.engine import BatchingEngine

from contextwise.errors import BackendError, Cancelled, InputError, Overloaded
from contextwise.types import Call, Reply


def call(text: str, **params: Any) -> Call:
    return Call.build([{"role": "user", "content": text}], **params)


class SlowBackend(FakeBackend):
    """A FakeBackend whose generate waits for `gate` and tells when it started."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.started = threading.Event()

    def generate(self, calls):
        self.started.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return super().generate(calls)


@pytest.fixture
def slow() -> Iterator[SlowBackend]:
    backend = SlowBackend()
    yield backend
    backend.gate.set()


# --------------------------------------------------------------------------- queue and batches


def test_compatible_calls_share_one_batch_the_rest_run_alone(fake_backend: FakeBackend) -> None:
    with BatchingEngine(fake_backend, max_batch=8, max_wait_ms=50) as engine:
        calls = [call("one"), call("two"), call("three", temperature=0.7),
                 call("four", seed=1), call("five", temperature=0.7), call("six")]
        replies = engine.generate(calls)
    assert [r.text for r in replies] == ["one", "two", "three", "four", "five", "six"]
    texts = [[c.messages[-1].text for c in b] for b in fake_backend.batches]
    # greedy calls together, sampled ones with the same settings together, the seeded alone
    assert texts == [["one", "two", "six"], ["three", "five"], ["four"]]
    s = engine.stats()
    assert (s["batches"], s["batched_calls"], s["single_calls"]) == (2, 5, 1)
    assert s["largest_batch"] == 3 and s["submitted"] == 6 and s["queued"] == 0


def test_max_batch_caps_a_batch(fake_backend: FakeBackend) -> None:
    with BatchingEngine(fake_backend, max_batch=2, max_wait_ms=50) as engine:
        replies = engine.generate([call(str(i)) for i in range(5)])
    assert [r.text for r in replies] == ["0", "1", "2", "3", "4"]
    assert [len(b) for b in fake_backend.batches] == [2, 2, 1]


def test_a_full_queue_is_overloaded_at_once(slow: SlowBackend) -> None:
    engine = BatchingEngine(slow, max_batch=1, max_queue=1)
    running = engine.submit([call("running")])
    assert slow.started.wait(5)  # the worker holds it: the queue is empty again
    waiting = engine.submit([call("waiting")])
    with pytest.raises(Overloaded, match=r"queue full: 1 requests waiting"):
        engine.submit([call("one too many")])
    with pytest.raises(Overloaded):  # all or none: two calls do not fit either
        engine.generate([call("a"), call("b")])
    assert engine.stats()["rejected"] == 3
    slow.gate.set()
    assert running[0].result(5).text == "running" and waiting[0].result(5).text == "waiting"
    assert engine.generate([call("room again")])[0].text == "room again"
    engine.close()


def test_async_callers_await_without_blocking_the_loop(slow: SlowBackend) -> None:
    engine = BatchingEngine(slow, max_wait_ms=0)

    async def main() -> tuple[list[Reply], int]:
        task = asyncio.ensure_future(engine.agenerate([call("async one"), call("async two")]))
        ticks = 0
        while not slow.started.is_set() or ticks < 3:  # the loop keeps running meanwhile
            await asyncio.sleep(0.01)
            ticks += 1
        slow.gate.set()
        return await task, ticks

    replies, ticks = asyncio.run(main())
    assert [r.text for r in replies] == ["async one", "async two"] and ticks >= 3
    engine.close()


def test_sync_and_async_callers_from_many_threads(fake_backend: FakeBackend) -> None:
    engine = BatchingEngine(fake_backend, max_batch=4, max_wait_ms=20)
    out: dict[int, str] = {}

    def worker(i: int) -> None:
        if i % 2:
            out[i] = asyncio.run(engine.agenerate([call(f"q{i}")]))[0].text
        else:
            out[i] = engine.generate([call(f"q{i}")])[0].text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == {i: f"q{i}" for i in range(10)}
    assert all(len(b) <= 4 for b in fake_backend.batches)
    engine.close()


def test_the_wait_adapts_to_the_arrival_rate(fake_backend: FakeBackend) -> None:
    engine = BatchingEngine(fake_backend, max_batch=6, max_wait_ms=5)
    assert engine.window_s() == pytest.approx(0.005)  # nothing known yet: wait
    for i in range(3):  # requests 20 ms apart or more: a 5 ms wait would buy nothing
        engine.generate([call(f"sparse {i}")])
        time.sleep(0.02)
    assert engine.window_s() == 0.0
    assert engine.stats()["no_waits"] >= 1
    engine.generate([call(str(i)) for i in range(6)])  # a full batch: wait the full window
    assert engine.window_s() == pytest.approx(0.005)
    engine.close()


def test_a_burst_arriving_slower_than_the_window_is_taken_whole(
        fake_backend: FakeBackend) -> None:
    engine = BatchingEngine(fake_backend, max_batch=32, max_wait_ms=100)
    futures = []
    for i in range(20):  # 10 ms apart: 190 ms in all, past the first request's window
        futures += engine.submit([call(f"burst {i}")])
        time.sleep(0.01)
    assert [f.result(30).text for f in futures] == [f"burst {i}" for i in range(20)]
    assert [len(b) for b in fake_backend.batches] == [20]  # not cut after 100 ms
    engine.close()


def test_a_pause_before_a_burst_does_not_read_as_sparse_traffic(
        fake_backend: FakeBackend) -> None:
    engine = BatchingEngine(fake_backend, max_batch=6, max_wait_ms=5)
    engine.generate([call(str(i)) for i in range(5)])  # a burst: 5 arrivals, no gaps
    time.sleep(0.2)  # idle for 40 windows
    engine.generate([call("the next burst's first request")])
    # the pause counts as two windows at most, so the burst that follows is waited for
    assert engine.window_s() == pytest.approx(0.005)
    engine.close()


def test_a_failing_group_fails_its_calls_only(make_backend: type[FakeBackend]) -> None:
    class Broken(FakeBackend):
        def generate(self, calls):
            if any(c.params.temperature > 0 for c in calls):
                raise BackendError("sampling is broken")
            return super().generate(calls)

    with BatchingEngine(Broken(), max_wait_ms=50) as engine:
        futures = engine.submit([call("fine"), call("hot", temperature=1.0),
                                 call("hot too", temperature=1.0), call("fine too")])
        assert futures[0].result(5).text == "fine" and futures[3].result(5).text == "fine too"
        for f in futures[1:3]:
            with pytest.raises(BackendError, match="sampling is broken"):
                f.result(5)


def test_closed_engine_and_bad_settings_are_clear_errors(fake_backend: FakeBackend) -> None:
    engine = BatchingEngine(fake_backend)
    engine.close()
    with pytest.raises(BackendError, match="closed"):
        engine.generate([call("late")])
    for bad in ({"max_batch": 0}, {"max_queue": 0}, {"max_wait_ms": -1}, {"max_batch": "8"}):
        with pytest.raises(InputError, match=next(iter(bad))):
            BatchingEngine(fake_backend, **bad)


def test_the_engine_stands_in_for_its_backend(fake_backend: FakeBackend) -> None:
    engine = BatchingEngine(fake_backend)
    assert engine.model_name == "fake-model" and engine.context_window == 4096
    assert engine.count_tokens(call("three little words").messages) == 3
    assert engine.prompt_tokens(call("two words")) == 2
    assert engine.calls is fake_backend.calls  # anything else: the backend's attribute
    engine.context_window = 100
    assert fake_backend.context_window == 100
    engine.close()


def test_policy_turns_the_engine_on_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from contextwise.backends import build_backend, local

    from contextwise.policy import Budget, Local, Policy

    assert (Policy().backend.max_batch, Policy().backend.max_wait_ms,
            Policy().backend.max_queue) == (None, 5, 256)
    for bad in ({"max_batch": 0}, {"max_wait_ms": -1}, {"max_queue": 0}):
        with pytest.raises(ValueError):
            Local(**bad)
    monkeypatch.setattr(local, "LocalBackend", lambda **kw: FakeBackend())
    engine = build_backend(Local(max_batch=4, max_wait_ms=2, max_queue=8), Budget())
    assert isinstance(engine, BatchingEngine) and isinstance(engine.backend, FakeBackend)
    assert (engine.max_batch, engine.max_wait_s, engine.max_queue) == (4, 0.002, 8)
    assert isinstance(build_backend(Local(max_batch=1), Budget()), FakeBackend)
    import torch

    default = build_backend(Local(), Budget())  # None: by device
    assert default.max_batch == (256 if torch.cuda.is_available() else 16)
    assert build_backend(Local(device="cpu"), Budget()).max_batch == 16


# --------------------------------------------------------------------------- the real model

QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain.",
             "How do I boil an egg?", "What is 2+2?", "Why is the sky blue?"]


def get_weather(city: str) -> str:
    """Get the current weather for a city.

    Args:
        city: City name.
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


@pytest.fixture(scope="module")
def local() -> Any:
    from contextwise.backends.loading import load_model
    from contextwise.backends.local import LocalBackend

    return LocalBackend(loaded=load_model("smollm2-135m-instruct"))


@pytest.fixture
def engine(local: Any) -> Iterator[BatchingEngine]:
    with BatchingEngine(local, max_batch=8, max_wait_ms=200) as e:
        yield e


def all_at_once(engine: BatchingEngine, questions: list[str], max_tokens: int) -> list[Reply]:
    """One thread per question, all released together: each one's reply, in order."""
    got: list[Reply | None] = [None] * len(questions)
    barrier = threading.Barrier(len(questions))

    def worker(i: int) -> None:
        barrier.wait()
        got[i] = engine.generate([call(questions[i], max_tokens=max_tokens)])[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(r is not None for r in got), "a caller got no reply"
    return got  # type: ignore[return-value]


def streamed_calls(local: Any) -> tuple[list[Reply], list[Call], list[list[str]]]:
    """Three streamed calls (one plain, two with stop strings): the single path's replies,
    the calls, and the list each call's deltas go to."""
    params = [{"max_tokens": 24}, {"max_tokens": 12, "stop": ["\n"]},
              {"max_tokens": 20, "stop": ["rain", "."]}]
    qs = [QUESTIONS[1], QUESTIONS[2], QUESTIONS[5]]
    sequential = [local.generate([call(q, **p)])[0] for q, p in zip(qs, params, strict=True)]
    deltas: list[list[str]] = [[], [], []]
    calls = []
    for i, (q, p) in enumerate(zip(qs, params, strict=True)):
        c = call(q, **p)
        c.on_delta = deltas[i].append
        calls.append(c)
    return sequential, calls, deltas


def same(a: Reply, b: Reply) -> None:
    assert a.message.content == b.message.content
    assert [(c.name, c.arguments) for c in a.tool_calls] == [
        (c.name, c.arguments) for c in b.tool_calls]
    assert a.usage == b.usage and a.finish_reason == b.finish_reason


@pytest.mark.model
def test_threads_and_asyncio_get_the_sequential_greedy_text(local: Any,
                                                            engine: BatchingEngine) -> None:
    sequential = [local.generate([call(q, max_tokens=16)])[0] for q in QUESTIONS]
    got = all_at_once(engine, QUESTIONS, 16)

    async def gather() -> list[Reply]:
        return [r for rs in await asyncio.gather(
            *(engine.agenerate([call(q, max_tokens=16)]) for q in QUESTIONS)) for r in rs]

    for replies in (got, asyncio.run(gather())):
        for a, b in zip(sequential, replies, strict=True):
            same(a, b)
    assert engine.stats()["batched_calls"] >= 2  # some of them did share a generate


@pytest.mark.model
def test_one_batch_one_generate_and_a_trace_record(local: Any, engine: BatchingEngine) -> None:
    generate = local.model.generate
    shapes: list[tuple[int, ...]] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(kwargs["input_ids"].shape if "input_ids" in kwargs else ()))
        return generate(*args, **kwargs)

    local.model.generate = counting
    try:
        replies = engine.generate([call(QUESTIONS[0], max_tokens=8),
                                   call(QUESTIONS[1], max_tokens=12)])
    finally:
        del local.model.generate
    assert len(shapes) == 1 and shapes[0][0] == 2  # one padded generate for both
    for r, cap in zip(replies, (8, 12), strict=True):
        (rec,) = r.trace.of("backend")
        assert rec["batch_size"] == 2 and rec["completion_tokens"] == r.usage.completion_tokens
        assert 0 < r.usage.completion_tokens <= cap


@pytest.mark.model
def test_streams_add_up_per_request(local: Any, engine: BatchingEngine) -> None:
    sequential, calls, deltas = streamed_calls(local)
    replies = engine.generate(calls)
    for a, b, d in zip(sequential, replies, deltas, strict=True):
        same(a, b)
        assert "".join(d) == b.text and len(d) >= 1
    assert engine.stats()["largest_batch"] == 3


@pytest.mark.model
def test_a_cancelled_stream_stops_only_itself(local: Any, engine: BatchingEngine) -> None:
    sequential = local.generate([call(QUESTIONS[5], max_tokens=24)])[0]
    seen: list[str] = []

    def closing(delta: str) -> None:
        if len(seen) == 2:
            raise Cancelled("stream closed by the caller")
        seen.append(delta)

    a, b = call(QUESTIONS[3], max_tokens=24), call(QUESTIONS[5], max_tokens=24)
    a.on_delta = closing
    futures = engine.submit([a, b])
    with pytest.raises(Cancelled):
        futures[0].result(300)
    same(sequential, futures[1].result(300))
    assert len(seen) == 2 and engine.stats()["batches"] == 1


@pytest.mark.model
def test_tools_in_auto_mode_are_parsed_in_a_batch(local: Any) -> None:
    from contextwise.backends.local import LocalBackend

    uncached = LocalBackend(loaded=local.loaded, prefix_cache_mb=0)  # else these run alone
    qs = ["What's the weather in Paris?", "Convert 10 EUR to USD", "Hello, who are you?"]
    sequential = [uncached.generate([call(q, tools=TOOLS, max_tokens=40)])[0] for q in qs]
    with BatchingEngine(uncached, max_wait_ms=200) as engine:
        batched = engine.generate([call(q, tools=TOOLS, max_tokens=40) for q in qs])
        assert engine.stats()["batched_calls"] == 3
    for a, b in zip(sequential, batched, strict=True):
        same(a, b)
        assert a.invalid_tool_calls == b.invalid_tool_calls


@pytest.mark.model
def test_grammar_seeded_and_oversized_calls_still_correct(local: Any,
                                                          engine: BatchingEngine) -> None:
    schema = {"type": "object", "properties": {"color": {"type": "string"}},
              "required": ["color"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    make = [
        lambda: call("What's the weather in Paris?", tools=TOOLS, tool_choice="required",
                     max_tokens=48),
        lambda: call(QUESTIONS[1], temperature=0.9, seed=7, max_tokens=12),
        lambda: call("Pick a color.", response_format=fmt, max_tokens=24),
        lambda: call(QUESTIONS[0], max_tokens=8),
        lambda: call(QUESTIONS[4], max_tokens=8),
    ]
    sequential = [local.generate([m()])[0] for m in make]
    futures = engine.submit([m() for m in make] + [call("too long", max_tokens=10**6)])
    replies = [f.result(300) for f in futures[:-1]]
    for a, b in zip(sequential, replies, strict=True):
        same(a, b)
    assert replies[0].finish_reason == "tool_calls" and not replies[0].invalid_tool_calls
    assert set(json.loads(replies[2].text)) >= {"color"}
    with pytest.raises(ValueError, match="over by"):  # ContextOverflow, for that call only
        futures[-1].result(5)
    s = engine.stats()
    assert (s["single_calls"], s["batched_calls"]) == (3, 2)
