"""The response cache: standalone put/get, what is never cached, eviction, invalidation,
persistence across processes and crashes, adaptive thresholds, and the pipeline stage."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from contextwise.memory import cache_entries
from contextwise.memory.store import Store
from contextwise.middleware.cache import ResponseCache, adaptive_threshold

from contextwise import Pipeline, Policy
from contextwise.errors import InputError
from contextwise.policy import Cache, Storage
from contextwise.types import Message, Reply, ToolCall


def u(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "cache.db"


@pytest.fixture
def cache(db: Path, embedder) -> ResponseCache:
    return ResponseCache(Cache(), path=db, embedder=embedder, model="m")


# ---------------------------------------------------------------- standalone use


def test_exact_and_semantic_hits_and_hard_negatives(cache: ResponseCache) -> None:
    assert cache.get(u("What is the capital of France?")) is None
    cache.put(u("What is the capital of France?"), "Paris.")
    assert cache.get(u("what is the capital of france")).text == "Paris."
    hit = cache.lookup(u("Tell me the capital city of France"))
    assert hit is not None and hit.kind == "semantic" and hit.reply.text == "Paris."
    assert hit.similarity >= cache.policy.similarity
    for other in ("What is the capital of Germany?", "What is not the capital of France?"):
        assert cache.get(u(other)) is None


def test_context_decides_not_just_the_question(cache: ResponseCache) -> None:
    a = [{"role": "user", "content": "Tell me about Marie Curie."},
         {"role": "assistant", "content": "A physicist and chemist."},
         {"role": "user", "content": "How old was she when she died?"}]
    cache.put(a, "66.")
    b = [{"role": "user", "content": "Tell me about Ada Lovelace."},
         {"role": "assistant", "content": "A mathematician."}, a[2]]
    assert cache.get(b) is None
    assert cache.get(a).text == "66."
    assert cache.get(u("How old was she when she died?")) is None
    assert cache.get(a, max_tokens=5) is None  # output-changing parameter
    tool = {"name": "search", "description": "web search", "parameters": {"type": "object"}}
    assert cache.get(a, tools=[tool]) is None


def test_scopes(db: Path, embedder) -> None:
    per_session = ResponseCache(Cache(scope="session"), path=db, embedder=embedder)
    per_session.put(u("What is 2+2?"), "4", session="s1")
    assert per_session.get(u("What is 2+2?"), session="s1").text == "4"
    assert per_session.get(u("What is 2+2?"), session="s2") is None
    per_user = ResponseCache(Cache(scope="user"), path=db, embedder=embedder)
    per_user.put(u("What is my plan?"), "Pro", user="ana", session="a")
    assert per_user.get(u("What is my plan?"), user="ana", session="b").text == "Pro"
    assert per_user.get(u("What is my plan?"), user="bob") is None


def test_reply_kinds_round_trip(cache: ResponseCache) -> None:
    call = ToolCall(name="get_weather", arguments={"city": "Lisbon"})
    reply = Reply(message=Message(role="assistant", content=None, tool_calls=[call]),
                  finish_reason="tool_calls")
    tool = {"name": "get_weather", "description": "weather", "parameters": {"type": "object"}}
    assert cache.put(u("Weather in Lisbon?"), reply, tools=[tool]) is not None
    got = cache.get(u("weather in lisbon"), tools=[tool])
    assert got.tool_calls[0].arguments == {"city": "Lisbon"} and got.finish_reason == "tool_calls"
    assert got.tool_calls[0].id != call.id  # every served call gets a fresh id
    cache.put(u("Say hi"), {"content": "hi"})
    assert cache.get(u("Say hi")).text == "hi"
    with pytest.raises(InputError, match="reply"):
        cache.put(u("x"), 42)  # type: ignore[arg-type]


# ---------------------------------------------------------------- never cached


def test_never_cached(db: Path, embedder) -> None:
    cache = ResponseCache(Cache(side_effect_tools=["send_email"]), path=db, embedder=embedder)
    bad = Reply(message=Message(role="assistant", content="oops"),
                invalid_tool_calls=[{"raw": "{", "error": "bad json"}])
    assert cache.put(u("a"), bad) is None
    assert cache.put(u("b"), "") is None
    assert cache.put(u("c"), "sampled", temperature=0.7) is None
    assert cache.put(u("c"), "seeded", temperature=0.7, seed=1) is not None
    send = Reply(message=Message(role="assistant", content=None,
                                 tool_calls=[ToolCall(name="send_email", arguments={})]))
    tool = {"name": "send_email", "description": "send", "parameters": {"type": "object"}}
    assert cache.put(u("email bob"), send, tools=[tool]) is None
    poisoned = [{"role": "user", "content": "read the page"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "[quarantined q3: injection]"}]
    assert cache.put(poisoned, "done") is None
    assert cache.stats()["entries"] == 1
    allowed = ResponseCache(Cache(cache_sampled=True), path=db, embedder=embedder)
    assert allowed.put(u("c"), "sampled", temperature=0.7) is not None


# ---------------------------------------------------------------- eviction, TTL, invalidation


def test_lru_lfu_and_byte_cap(tmp_path: Path, embedder) -> None:
    lru = ResponseCache(Cache(max_entries=3, semantic=False), path=tmp_path / "a.db")
    for q in ("q1", "q2", "q3"):
        lru.put(u(q), q.upper())
    assert lru.get(u("q1"))  # q1 is now the most recent
    lru.put(u("q4"), "Q4")
    found = [lru.get(u(q)) is not None for q in ("q1", "q2", "q3", "q4")]
    assert found == [True, False, True, True]

    lfu = ResponseCache(Cache(max_entries=3, semantic=False, eviction="lfu"),
                        path=tmp_path / "b.db")
    for q in ("q1", "q2", "q3"):
        lfu.put(u(q), q.upper())
    for _ in range(3):
        lfu.get(u("q1"))
        lfu.get(u("q3"))
    lfu.put(u("q4"), "Q4")
    assert lfu.get(u("q2")) is None and lfu.get(u("q1")) and lfu.get(u("q3"))

    sized = ResponseCache(Cache(max_bytes=4096, semantic=False), path=tmp_path / "c.db")
    for i in range(10):
        sized.put(u(f"question {i}"), "x" * 1000)
    stats = sized.stats()
    assert stats["bytes"] <= 4096 and stats["entries"] == 3  # ~1.15 kB each
    assert sized.get(u("question 9")) and sized.get(u("question 0")) is None


def test_ttl(db: Path, embedder) -> None:
    clock = Clock()
    cache = ResponseCache(Cache(ttl_s=60), path=db, embedder=embedder, clock=clock)
    cache.put(u("What is the capital of France?"), "Paris.")
    clock.now += 59
    assert cache.get(u("What is the capital of France?"))
    clock.now += 2
    assert cache.get(u("What is the capital of France?")) is None
    assert cache.get(u("Tell me the capital city of France")) is None


def test_invalidate_by_session_tool_age_and_predicate(db: Path) -> None:
    clock = Clock()
    cache = ResponseCache(Cache(semantic=False, ttl_s=None), path=db, clock=clock)
    tool = {"name": "lookup", "description": "d", "parameters": {"type": "object"}}
    cache.put(u("a"), "A", session="s1")
    cache.put(u("b"), "B", session="s2", tools=[tool])
    clock.now += 3600
    cache.put(u("c"), "C", session="s2")
    cache.put(u("d"), "D", user="ana")
    assert cache.invalidate(session="s1") == 1
    assert cache.invalidate(tool="lookup") == 1
    assert cache.invalidate(older_than_s=1800) == 0
    clock.now += 3600
    assert cache.invalidate(older_than_s=1800, session="s2") == 1
    assert cache.invalidate(predicate=lambda e: e.user == "ana") == 1
    assert cache.stats()["entries"] == 0
    with pytest.raises(InputError, match="filter"):
        cache.invalidate()


# ---------------------------------------------------------------- persistence


def test_index_persists_and_replays_what_came_after(db: Path, embedder, monkeypatch) -> None:
    first = ResponseCache(Cache(), path=db, embedder=embedder)
    first.put(u("How do I reset my password?"), "Settings > Security.")
    first.get(u("warm up the index"))
    first.save_index()
    first.put(u("What is the capital of France?"), "Paris.")  # after the save: only in the log
    # a new process: loads the saved index, replays the log, never rebuilds from scratch
    monkeypatch.setattr(ResponseCache, "_rebuild", lambda self: pytest.fail("rebuilt"))
    second = ResponseCache(Cache(), path=db, embedder=embedder)
    assert second.get(u("how can i reset my password")).text == "Settings > Security."
    assert second.get(u("Tell me the capital city of France")).text == "Paris."


def test_damaged_or_stale_index_is_rebuilt(db: Path, embedder, monkeypatch) -> None:
    first = ResponseCache(Cache(), path=db, embedder=embedder)
    first.put(u("How do I reset my password?"), "Settings > Security.")
    first.get(u("x"))
    first.save_index()
    (first.index_dir / "manifest.json").write_text("{not json")
    second = ResponseCache(Cache(), path=db, embedder=embedder)
    assert second.get(u("how can i reset my password")).text == "Settings > Security."
    # the log trimmed past a saved index: it cannot catch up by replay, so it rebuilds
    second.save_index()
    monkeypatch.setattr(cache_entries, "LOG_KEEP", 1)
    for i in range(5):
        second.put(u(f"filler question number {i}"), "f")
    second.invalidate(session="nobody-has-this")  # nothing deleted: no trim
    second.entries.trim_log()
    third = ResponseCache(Cache(), path=db, embedder=embedder)
    assert third.get(u("how can i reset my password")).text == "Settings > Security."
    assert third.get(u("filler question number 3")).text == "f"


def test_two_handles_see_each_others_writes(db: Path, embedder) -> None:
    a = ResponseCache(Cache(), store=Store(db), embedder=embedder)
    b = ResponseCache(Cache(), store=Store(db), embedder=embedder)
    assert b.get(u("What is the capital of France?")) is None  # b's index is built now
    a.put(u("What is the capital of France?"), "Paris.")
    assert b.get(u("Tell me the capital city of France")).text == "Paris."
    a.invalidate(everything=True)
    assert b.get(u("Tell me the capital city of France")) is None


def test_several_processes_write_without_losing_entries(db: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        from contextwise.middleware.cache import ResponseCache
        from contextwise.policy import Cache
        c = ResponseCache(Cache(semantic=False), path={str(db)!r})
        for i in range(40):
            c.put([{{"role": "user", "content": f"p{{sys.argv[1]}} q{{i}}"}}], "a")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)]) for n in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    cache = ResponseCache(Cache(semantic=False), path=db)
    assert cache.stats()["entries"] == 120
    assert cache.get(u("p2 q39")).text == "a"


# ---------------------------------------------------------------- thresholds


def test_wrong_hit_feedback_raises_that_entrys_threshold(db: Path, embedder) -> None:
    cache = ResponseCache(Cache(threshold="adaptive"), path=db, embedder=embedder)
    cache.put(u("How do I reset my password?"), "Settings > Security.")
    hit = cache.lookup(u("how can i reset my password"))
    assert hit is not None and hit.kind == "semantic"
    cache.feedback(hit, correct=False)
    assert cache.lookup(u("how can i reset my password")) is None
    assert cache.get(u("How do I reset my password?"))  # the exact match still holds


def test_adaptive_threshold_follows_verified_error_rate() -> None:
    assert adaptive_threshold([], 0.82, 0.01) == 0.82
    assert adaptive_threshold([(0.9, False)], 0.84, 0.01) == pytest.approx(0.905)
    good = [(0.80 + i * 0.001, True) for i in range(200)]
    assert adaptive_threshold(good, 0.84, 0.01) < 0.84  # enough evidence to go lower
    bad = good + [(0.85, False)] * 5
    assert adaptive_threshold(bad, 0.84, 0.01) > 0.85


# ---------------------------------------------------------------- the pipeline stage


@pytest.fixture
def pipeline(tmp_path: Path, fake_backend, embedder) -> Pipeline:
    policy = Policy(storage=Storage(path=str(tmp_path / "p.db")), tools=None)
    return Pipeline(policy, backend=fake_backend, store=Store(tmp_path / "p.db"))


def test_pipeline_serves_repeats_without_the_model(pipeline, fake_backend) -> None:
    first = pipeline(u("What is the capital of France?"))
    assert len(fake_backend.calls) == 1
    again = pipeline(u("what is the capital of france?"))
    para = pipeline(u("Tell me the capital city of France"))
    assert len(fake_backend.calls) == 1
    assert again.text == para.text == first.text
    assert again.usage.prompt_tokens == 0 and again.trace.of("cache")[0]["hit"] == "exact"
    assert para.trace.of("cache")[0]["hit"] == "semantic"
    rows = pipeline.ledger.rows()
    assert [r["prompt_tokens"] == 0 for r in rows] == [False, True, True]
    assert rows[1]["raw_prompt_tokens"] > 0


def test_stream_and_async_are_served_and_stored(pipeline, fake_backend) -> None:
    streamed = list(pipeline.stream(u("Name three primary colours")))
    *deltas, final = streamed
    assert "".join(deltas) == final.text and len(fake_backend.calls) == 1
    *deltas2, final2 = list(pipeline.stream(u("name three primary colours")))
    assert len(fake_backend.calls) == 1 and "".join(deltas2) == final2.text == final.text
    assert len(deltas2) > 1  # served as a stream, not one blob

    async def twice() -> tuple[Reply, Reply]:
        return (await pipeline.achat(u("What is the boiling point of water?")),
                await pipeline.achat(u("What is the boiling point of water?")))

    a, b = asyncio.run(twice())
    assert a.text == b.text and len(fake_backend.calls) == 2


def test_sessions_with_different_histories_do_not_share(pipeline, fake_backend) -> None:
    pipeline(u("My name is Ana."), session="s1")
    pipeline(u("My name is Bob."), session="s2")
    pipeline(u("What is my name?"), session="s1")
    pipeline(u("What is my name?"), session="s2")
    assert len(fake_backend.calls) == 4


def test_pipeline_cache_commands(pipeline, tmp_path: Path) -> None:
    from contextwise.cli import main

    pipeline(u("What is the capital of France?"), session="s9")
    db = str(tmp_path / "p.db")
    assert main(["cache", "stats", "--db", db, "--json"]) == 0
    assert main(["cache", "list", "--db", db, "--session", "s9"]) == 0
    assert main(["cache", "purge", "--db", db]) == 2  # no filter: refused
    assert main(["cache", "purge", "--db", db, "--session", "s9"]) == 0
    assert pipeline.cache.stats()["entries"] == 0


def test_examples_use_the_cache() -> None:
    root = Path(__file__).resolve().parents[1]
    policy = Policy.load(root / "examples" / "my_policy.py")
    assert policy.cache is not None and policy.cache.side_effect_tools == ["book_flight"]
    out = subprocess.run([sys.executable, str(root / "examples" / "response_cache.py")],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "hit (exact)" in out and "hit (semantic)" in out and out.count("miss") == 2


@pytest.mark.model
async def test_cached_stream_and_async_match_the_model(tmp_path: Path) -> None:
    """On the real model: a miss is stored, and stream / async replays of it equal it."""
    pipe = Pipeline(Policy(tools=None, storage=Storage(path=str(tmp_path / "m.db"))),
                    store=Store(tmp_path / "m.db"))
    msgs = u("Name three colors.")
    first = pipe(msgs, max_tokens=16)
    assert first.usage.completion_tokens > 0
    deltas = [d async for d in pipe.astream(msgs, max_tokens=16) if isinstance(d, str)]
    assert "".join(deltas) == first.text and len(deltas) > 1
    again = await pipe.achat(msgs, max_tokens=16)
    assert again.text == first.text and again.usage.completion_tokens == 0
    assert pipe.cache.stats()["exact_hits"] == 2


@pytest.mark.model
def test_a_hit_never_loads_the_model(tmp_path: Path) -> None:
    pipe = Pipeline(Policy(tools=None, storage=Storage(path=str(tmp_path / "h.db"))),
                    store=Store(tmp_path / "h.db"))
    msgs = u("What is the capital of France?")
    pipe.cache.put(msgs, "Paris.", max_tokens=pipe.policy.budget.max_output_tokens)
    reply = pipe(msgs)
    assert reply.text == "Paris." and pipe._backend is None  # tokenizer only, no weights
    assert pipe.ledger.rows()[0]["raw_prompt_tokens"] > 0
