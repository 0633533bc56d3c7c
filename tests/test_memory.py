"""The SQLite store, per-session conversations and the ledger."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from contextwise.memory.conversations import Conversations
from contextwise.memory.ledger import CallRecord, Ledger
from contextwise.memory.store import Store, default_home

from contextwise.tokens import count_messages, count_text
from contextwise.types import Call, Message, Reply, ToolCall, Usage


def user(text: str) -> Message:
    return Message(role="user", content=text)


def assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


# --------------------------------------------------------------------------- Store


def test_default_home_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTEXTWISE_HOME", str(tmp_path / "h"))
    assert default_home() == tmp_path / "h"
    s = Store()
    try:
        assert s.path == str(tmp_path / "h" / "contextwise.db")
        assert (tmp_path / "h" / "contextwise.db").exists()
    finally:
        s.close()


def test_conftest_isolates_home() -> None:
    home = os.environ["CONTEXTWISE_HOME"]
    assert Path(home) != Path.home() / ".contextwise"
    assert default_home() == Path(home)


def test_store_file_uses_wal(store: Store, store_path: Path) -> None:
    assert store.path == str(store_path)
    assert store_path.parent.is_dir()  # created on demand
    (mode,) = store.query("PRAGMA journal_mode")[0]
    assert mode == "wal"
    (timeout,) = store.query("PRAGMA busy_timeout")[0]
    assert timeout == 10_000


def test_memory_store_works_without_wal() -> None:
    s = Store(":memory:")
    try:
        (mode,) = s.query("PRAGMA journal_mode")[0]
        assert mode == "memory"
        s.execute("CREATE TABLE t (a)")
        assert s.execute("INSERT INTO t VALUES (1)") == 1
        assert [r["a"] for r in s.query("SELECT a FROM t")] == [1]
    finally:
        s.close()


def test_execute_returns_rowcount_and_rows_by_name(store: Store) -> None:
    store.execute("CREATE TABLE t (a INTEGER, b TEXT)")
    for i in range(3):
        assert store.execute("INSERT INTO t VALUES (?, ?)", (i, f"v{i}")) == 1
    assert store.execute("UPDATE t SET b='x' WHERE a >= ?", (1,)) == 2
    rows = store.query("SELECT a, b FROM t ORDER BY a")
    assert [(r["a"], r["b"]) for r in rows] == [(0, "v0"), (1, "x"), (2, "x")]


def test_transaction_commits(store: Store) -> None:
    store.execute("CREATE TABLE t (a)")
    with store.transaction() as db:
        db.execute("INSERT INTO t VALUES (1)")
        db.execute("INSERT INTO t VALUES (2)")
    assert [r[0] for r in store.query("SELECT a FROM t ORDER BY a")] == [1, 2]


def test_transaction_rolls_back_on_error(store: Store, store_path: Path) -> None:
    store.execute("CREATE TABLE t (a)")
    store.execute("INSERT INTO t VALUES (0)")
    with pytest.raises(ZeroDivisionError), store.transaction() as db:
        db.execute("INSERT INTO t VALUES (1)")
        db.execute("DELETE FROM t WHERE a = 0")
        1 / 0  # noqa: B018
    assert [r[0] for r in store.query("SELECT a FROM t")] == [0]
    # the store is usable afterwards, and another connection sees the same
    store.execute("INSERT INTO t VALUES (2)")
    other = Store(store_path)
    try:
        assert [r[0] for r in other.query("SELECT a FROM t ORDER BY a")] == [0, 2]
    finally:
        other.close()


def test_transaction_rolls_back_on_sql_error(store: Store) -> None:
    store.execute("CREATE TABLE t (a PRIMARY KEY)")
    store.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(Exception, match="UNIQUE"), store.transaction() as db:
        db.execute("INSERT INTO t VALUES (2)")
        db.execute("INSERT INTO t VALUES (1)")
    assert [r[0] for r in store.query("SELECT a FROM t")] == [1]


def test_ensure_schema_creates_once_and_records_version(store: Store) -> None:
    # not idempotent on purpose: running it twice would fail
    ddl = ["CREATE TABLE thing (a)"]
    store.ensure_schema("thing", 1, ddl)
    store.ensure_schema("thing", 1, ddl)
    rows = store.query("SELECT component, version FROM schema_versions WHERE component='thing'")
    assert [(r[0], r[1]) for r in rows] == [("thing", 1)]


def test_ensure_schema_upgrade_runs_new_ddl(store: Store) -> None:
    store.ensure_schema("thing", 1, ["CREATE TABLE IF NOT EXISTS thing (a)"])
    store.ensure_schema("thing", 2, ["CREATE TABLE IF NOT EXISTS thing (a)",
                                     "CREATE TABLE IF NOT EXISTS thing_extra (b)"])
    (version,) = store.query("SELECT version FROM schema_versions WHERE component='thing'")[0]
    assert version == 2
    store.execute("INSERT INTO thing_extra VALUES (1)")


def test_ensure_schema_newer_on_disk_is_an_error(store: Store, store_path: Path) -> None:
    store.ensure_schema("thing", 3, ["CREATE TABLE thing (a)"])
    old = Store(store_path)  # an older contextwise opening the same file
    try:
        with pytest.raises(RuntimeError, match=r"thing schema is version 3.*knows 2.*upgrade"):
            old.ensure_schema("thing", 2, ["CREATE TABLE thing (a)"])
        # the failed check left no transaction open
        old.execute("INSERT INTO thing VALUES (1)")
    finally:
        old.close()


def test_ensure_schema_failing_ddl_records_no_version(store: Store) -> None:
    with pytest.raises(Exception, match="syntax"):
        store.ensure_schema("broken", 1, ["CREATE TABLE ok (a)", "CREATE TABEL nope (b)"])
    assert store.query("SELECT * FROM schema_versions WHERE component='broken'") == []
    assert store.query("SELECT name FROM sqlite_master WHERE name='ok'") == []


# --------------------------------------------------------------------------- Conversations


def test_conversations_append_and_history_order(store: Store) -> None:
    conv = Conversations(store)
    assert conv.history("s1") == []
    conv.append("s1", [user("one"), assistant("two")])
    conv.append("s1", [user("three")])
    conv.append("s2", [user("other")])
    conv.append("s1", [assistant("four")])
    assert [m.content for m in conv.history("s1")] == ["one", "two", "three", "four"]
    assert [m.content for m in conv.history("s2")] == ["other"]
    assert conv.sessions() == ["s1", "s2"]


def test_conversations_append_nothing_is_a_no_op(store: Store) -> None:
    conv = Conversations(store)
    conv.append("s", [])
    assert conv.history("s") == []
    assert conv.sessions() == []


def test_conversations_keep_every_message_shape(store: Store) -> None:
    conv = Conversations(store)
    msgs = [
        Message(role="system", content="sys"),
        Message(role="user", content="weather?", name="bob"),
        Message(role="assistant", tool_calls=[ToolCall(id="c1", name="w",
                                                       arguments={"city": "Oslo"})]),
        Message(role="tool", tool_call_id="c1", content="rain"),
        Message(role="assistant", content="It rains."),
    ]
    conv.append("s", msgs)
    assert conv.history("s") == msgs


def test_conversations_clear(store: Store) -> None:
    conv = Conversations(store)
    conv.append("a", [user("1"), user("2")])
    conv.append("b", [user("3")])
    assert conv.clear("a") == 2
    assert conv.clear("a") == 0
    assert conv.history("a") == []
    assert conv.sessions() == ["b"]
    # a cleared session starts again from the beginning
    conv.append("a", [user("new")])
    assert [m.content for m in conv.history("a")] == ["new"]


def test_conversations_persist_across_stores(store_path: Path) -> None:
    s1 = Store(store_path)
    Conversations(s1).append("s", [user("remember me"), assistant("ok")])
    s1.close()
    s2 = Store(store_path)
    try:
        conv = Conversations(s2)
        assert [m.content for m in conv.history("s")] == ["remember me", "ok"]
        assert conv.sessions() == ["s"]
    finally:
        s2.close()


def test_two_stores_on_one_file_interleave(store_path: Path) -> None:
    a, b = Store(store_path), Store(store_path)
    try:
        ca, cb = Conversations(a), Conversations(b)
        ca.append("s", [user("a1")])
        cb.append("s", [user("b1")])
        ca.append("s", [user("a2")])
        cb.append("s", [user("b2"), user("b3")])
        expected = ["a1", "b1", "a2", "b2", "b3"]
        assert [m.content for m in ca.history("s")] == expected
        assert [m.content for m in cb.history("s")] == expected
    finally:
        a.close()
        b.close()


def test_two_stores_writing_concurrently_lose_nothing(store_path: Path) -> None:
    n = 40
    stores = [Store(store_path) for _ in range(2)]
    try:
        convs = [Conversations(s) for s in stores]
        errors: list[BaseException] = []

        def writer(k: int) -> None:
            try:
                for i in range(n):
                    convs[k].append("shared", [user(f"w{k}-{i}")])
            except BaseException as e:  # noqa: BLE001  (asserted below)  # pragma: no cover
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        texts = [m.content for m in convs[0].history("shared")]
        assert len(texts) == 2 * n
        assert sorted(texts) == sorted(f"w{k}-{i}" for k in range(2) for i in range(n))
        # each writer's own messages keep their order
        for k in range(2):
            mine = [t for t in texts if t and t.startswith(f"w{k}-")]
            assert mine == [f"w{k}-{i}" for i in range(n)]
        seqs = [r[0] for r in stores[1].query(
            "SELECT seq FROM conversation_messages WHERE session='shared' ORDER BY seq")]
        assert seqs == list(range(2 * n))
    finally:
        for s in stores:
            s.close()


def test_another_process_writes_the_same_file(store_path: Path) -> None:
    mine = Store(store_path)
    try:
        conv = Conversations(mine)
        conv.append("s", [user("from parent")])
        code = (
            "import sys\n"
            "from contextwise.memory.store import Store\n"
            "from contextwise.memory.conversations import Conversations\n"
            "from contextwise.types import Message\n"
            "s = Store(sys.argv[1])\n"
            "c = Conversations(s)\n"
            "assert [m.content for m in c.history('s')] == ['from parent']\n"
            "c.append('s', [Message(role='assistant', content='from child')])\n"
            "s.close()\n"
        )
        subprocess.run([sys.executable, "-c", code, str(store_path)], check=True, timeout=60)
        assert [m.content for m in conv.history("s")] == ["from parent", "from child"]
        conv.append("s", [user("parent again")])
        assert [m.content for m in conv.history("s")][-1] == "parent again"
    finally:
        mine.close()


# --------------------------------------------------------------------------- Ledger


def make_call(text: str = "hello world", session: str | None = "s") -> Call:
    return Call.build([{"role": "user", "content": text}], session=session)


def make_reply(call: Call, text: str = "Hello, world!", prompt: int = 5,
               completion: int = 3) -> Reply:
    return Reply(
        message=Message(role="assistant", content=text),
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion),
        model="fake-model",
        trace=call.trace,
        latency_s=0.25,
    )


def test_ledger_record_row(store: Store) -> None:
    ledger = Ledger(store)
    raw = Call.build([{"role": "system", "content": "long long system prompt"},
                      {"role": "user", "content": "hello world"}], session="s1")
    seen = raw.model_copy(update={"messages": raw.messages[1:]})
    reply = make_reply(seen)
    ledger.record(raw, seen, reply, raw_prompt_tokens=42)
    (row,) = ledger.rows()
    assert row["session"] == "s1"
    assert row["model"] == "fake-model"
    assert row["prompt_tokens"] == 5
    assert row["completion_tokens"] == 3
    assert row["raw_prompt_tokens"] == 42
    assert row["cl100k_prompt"] == count_messages(seen.messages) == 3 + 3 + 2
    assert row["cl100k_raw_prompt"] == count_messages(raw.messages)
    assert row["cl100k_raw_prompt"] > row["cl100k_prompt"]
    assert row["cl100k_completion"] == count_text("Hello, world!") == 4
    assert row["latency_s"] == 0.25
    assert row["finish_reason"] == "stop"
    assert row["trace"] == []
    assert row["ts"] <= time.time()


def test_ledger_counts_tool_call_arguments_as_completion(store: Store) -> None:
    ledger = Ledger(store)
    call = make_call()
    tc = ToolCall(name="w", arguments={"city": "Paris"})
    reply = Reply(message=Message(role="assistant", tool_calls=[tc]), model="m",
                  finish_reason="tool_calls")
    ledger.record(call, call, reply, raw_prompt_tokens=1)
    (row,) = ledger.rows()
    assert row["cl100k_completion"] == count_text('{"city": "Paris"}')
    assert row["finish_reason"] == "tool_calls"


def test_ledger_totals(store: Store) -> None:
    ledger = Ledger(store)
    empty = ledger.totals()
    assert empty["calls"] == 0
    assert empty["prompt_tokens"] == 0 and empty["latency_s"] == 0
    for p, c, raw in [(5, 3, 10), (7, 1, 20)]:
        call = make_call()
        ledger.record(call, call, make_reply(call, prompt=p, completion=c), raw_prompt_tokens=raw)
    t = ledger.totals()
    assert t["calls"] == 2
    assert t["prompt_tokens"] == 12
    assert t["completion_tokens"] == 4
    assert t["raw_prompt_tokens"] == 30
    assert t["cl100k_prompt"] == 2 * (3 + 3 + 2)
    assert t["cl100k_raw_prompt"] == 2 * (3 + 3 + 2)
    assert t["cl100k_completion"] == 2 * 4
    assert t["latency_s"] == pytest.approx(0.5)
    assert ledger.totals(since=time.time() + 60)["calls"] == 0


def test_ledger_per_stage(store: Store) -> None:
    ledger = Ledger(store)
    c1 = make_call()
    c1.trace.add("prune", tokens_before=100, tokens_after=60)
    c1.trace.add("cache", hit=False)
    ledger.record(c1, c1, make_reply(c1), raw_prompt_tokens=100)
    c2 = make_call()
    c2.trace.add("prune", tokens_before=50, tokens_after=45)
    c2.trace.add("summarize", tokens_before=45, tokens_after=20)
    ledger.record(c2, c2, make_reply(c2), raw_prompt_tokens=50)
    assert ledger.per_stage() == {
        "prune": {"calls": 2, "tokens_saved": 45},
        "cache": {"calls": 1, "tokens_saved": 0},
        "summarize": {"calls": 1, "tokens_saved": 25},
    }
    # the trace is stored as JSON and comes back as data
    assert ledger.rows()[0]["trace"] == [
        {"stage": "prune", "data": {"tokens_before": 100, "tokens_after": 60}},
        {"stage": "cache", "data": {"hit": False}},
    ]


def test_ledger_add_and_clear(store: Store) -> None:
    ledger = Ledger(store)
    rec = CallRecord(session=None, model="m", prompt_tokens=1, completion_tokens=2,
                     raw_prompt_tokens=3, cl100k_prompt=4, cl100k_raw_prompt=5,
                     cl100k_completion=6, latency_s=0.1, finish_reason="length", trace=[])
    ledger.add(rec)
    ledger.add(rec)
    assert ledger.totals()["calls"] == 2
    assert ledger.rows()[0]["session"] is None
    assert ledger.clear() == 2
    assert ledger.rows() == []
    assert ledger.totals()["calls"] == 0
    assert ledger.per_stage() == {}


def test_ledger_and_conversations_share_a_store(store: Store, store_path: Path) -> None:
    conv, ledger = Conversations(store), Ledger(store)
    conv.append("s", [user("x")])
    call = make_call()
    ledger.record(call, call, make_reply(call), raw_prompt_tokens=1)
    other = Store(store_path)
    try:
        assert Ledger(other).totals()["calls"] == 1
        assert [m.content for m in Conversations(other).history("s")] == ["x"]
        versions = {r[0]: r[1] for r in other.query("SELECT * FROM schema_versions")}
        assert versions == {"conversations": 1, "ledger": 1}
    finally:
        other.close()
