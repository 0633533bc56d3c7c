"""The prune stage: duplicates, superseded and stale tool results, query-aware cutting,
and never an orphaned tool call or tool result."""

from __future__ import annotations

import json
import random
import threading
import uuid
from typing import Any

import pytest
from contextwise.middleware.prune import FRESH_KEEP_FACTOR, PruneStage, placeholder

from contextwise.errors import PolicyError
from contextwise.policy import Prune
from contextwise.tokens import count_text
from contextwise.types import Call, Message, Reply, ToolCall, parse_messages

SYSTEM = Message(role="system", content="You are a helpful travel assistant.")


def user(text: str) -> Message:
    return Message(role="user", content=text)


def assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


def tool_unit(name: str, args: dict[str, Any], *results: str) -> list[Message]:
    """An assistant call (one per result) followed by its results."""
    calls = [ToolCall(id=f"call_{uuid.uuid4().hex[:8]}", name=name, arguments=args)
             for _ in results]
    return [Message(role="assistant", tool_calls=calls),
            *(Message(role="tool", tool_call_id=c.id, content=r)
              for c, r in zip(calls, results, strict=True))]


def stage(embedder: Any, **policy: Any) -> PruneStage:
    return PruneStage(Prune(**policy), embedder=embedder)


def texts(call: Call) -> list[str]:
    return [m.content or "" for m in call.messages]


def check_integrity(messages: list[Message], original: list[Message]) -> None:
    """No orphans: every tool message follows its call, every answered call keeps its result."""
    parse_messages([m.to_openai() for m in messages])  # a tool message needs an earlier call
    answered_before = {m.tool_call_id for m in original if m.role == "tool"}
    for i, m in enumerate(messages):
        if m.role == "assistant" and m.tool_calls:
            j = i + 1
            got = set()
            while j < len(messages) and messages[j].role == "tool":
                got.add(messages[j].tool_call_id)
                j += 1
            want = {tc.id for tc in m.tool_calls} & answered_before
            assert got == want, f"assistant call at {i} lost results {want - got}"
        if m.role == "tool":
            prev = messages[i - 1]
            owner = next(k for k in range(i - 1, -1, -1) if messages[k].role != "tool")
            assert prev.role in ("assistant", "tool")
            ids = {tc.id for tc in messages[owner].tool_calls or ()}
            assert m.tool_call_id in ids, f"tool message at {i} lost its call"


# --------------------------------------------------------------------------- duplicates


def test_exact_duplicates_keep_the_latest(embedder: Any) -> None:
    msgs = [SYSTEM, user("Book a table for two."), assistant("Which restaurant?"),
            user("Book a table for two."), assistant("Which restaurant?"),
            user("Chez Anna, 8pm.")]
    call = Call(messages=msgs)
    out = stage(embedder).apply(call)
    assert texts(out) == [SYSTEM.content, "Book a table for two.", "Which restaurant?",
                          "Chez Anna, 8pm."]
    assert out.messages[1] is msgs[3]  # the later copy stayed
    data = call.trace.of("prune")[-1]
    assert data["duplicate"] == 2 and data["messages_dropped"] == 2
    assert data["tokens_after"] < data["tokens_before"]


def test_head_and_last_user_message_are_never_dropped(embedder: Any) -> None:
    head = [SYSTEM, SYSTEM]  # even a duplicated head stays
    msgs = [*head, user("Hello"), assistant("Hi!"), user("Hello")]
    out = stage(embedder).apply(Call(messages=msgs))
    assert out.messages[:2] == head
    assert out.messages[-1] is msgs[-1]
    assert [m.content for m in out.messages[2:]] == ["Hi!", "Hello"]


def test_near_duplicates_need_same_role_and_same_identifiers(embedder: Any) -> None:
    msgs = [SYSTEM,
            user("What is the weather like in Paris today?"), assistant("Sunny, 21 degrees."),
            user("Order 123 has shipped."), assistant("Noted."),
            user("Order 124 has shipped."), assistant("Noted too."),
            user("What's the weather like in Paris today?")]
    call = Call(messages=msgs)
    out = stage(embedder, dedupe_similarity=0.9).apply(call)
    kept = texts(out)
    assert "What is the weather like in Paris today?" not in kept  # paraphrase of the query
    assert "Order 123 has shipped." in kept and "Order 124 has shipped." in kept
    assert call.trace.of("prune")[-1]["near_duplicate"] == 1

    exact_only = stage(embedder, dedupe_similarity=None).apply(Call(messages=msgs))
    assert len(exact_only.messages) == len(msgs)


# --------------------------------------------------------------------------- tool results


def test_superseded_result_drops_its_whole_unit(embedder: Any) -> None:
    first = tool_unit("get_weather", {"city": "Paris"}, "Paris: 18C and sunny, wind 10 km/h")
    other = tool_unit("get_weather", {"city": "Rome"}, "Rome: 25C and clear, wind 5 km/h")
    again = tool_unit("get_weather", {"city": "Paris"}, "Paris: 16C and rainy, wind 20 km/h")
    msgs = [SYSTEM, user("Weather in Paris and Rome?"), *first, *other,
            assistant("Paris 18C, Rome 25C."), user("And Paris now?"), *again]
    call = Call(messages=msgs)
    out = stage(embedder).apply(call)
    kept = texts(out)
    assert "Paris: 18C and sunny, wind 10 km/h" not in kept
    assert first[0] not in out.messages  # the call went with its result
    assert "Rome: 25C and clear, wind 5 km/h" in kept  # different arguments
    assert kept[-1] == "Paris: 16C and rainy, wind 20 km/h"
    data = call.trace.of("prune")[-1]
    assert data["superseded"] == 1 and data["units_dropped"] == 1
    check_integrity(out.messages, msgs)

    keep = stage(embedder, drop_superseded=False).apply(Call(messages=msgs))
    assert "Paris: 18C and sunny, wind 10 km/h" in texts(keep)


def test_partly_removed_unit_keeps_the_call_with_a_placeholder(embedder: Any) -> None:
    long_result = "Paris forecast: " + "mild with scattered clouds and a light breeze. " * 6
    calls = [ToolCall(id="a1", name="get_weather", arguments={"city": "Paris"}),
             ToolCall(id="a2", name="get_time", arguments={"city": "Paris"})]
    unit = [Message(role="assistant", tool_calls=calls),
            Message(role="tool", tool_call_id="a1", content=long_result),
            Message(role="tool", tool_call_id="a2", content="14:05 local time")]
    again = tool_unit("get_weather", {"city": "Paris"}, "Paris forecast: heavy rain tonight.")
    msgs = [SYSTEM, user("Weather and time in Paris?"), *unit, assistant("Mild, 14:05."),
            user("Weather again?"), *again]
    out = stage(embedder).apply(Call(messages=msgs))
    assert unit[0] in out.messages
    i = out.messages.index(unit[0])
    assert out.messages[i + 1].tool_call_id == "a1"
    assert out.messages[i + 1].content == placeholder("get_weather", "superseded")
    assert out.messages[i + 2] is unit[2]
    check_integrity(out.messages, msgs)


def test_stale_results_go_after_n_turns(embedder: Any) -> None:
    lookup = tool_unit("search_hotels", {"city": "Lisbon"},
                       "Found: Hotel Avenida (120 EUR), Casa Azul (95 EUR), Rio Inn (80 EUR)")
    msgs = [SYSTEM, user("Hotels in Lisbon?"), *lookup, assistant("Three options.")]
    for n in range(3):
        msgs += [user(f"Question number {n + 2} about the trip"), assistant(f"Answer {n + 2}")]
    msgs.append(user("Anything else?"))  # the lookup is now 4 turns old
    call = Call(messages=msgs)
    out = stage(embedder, stale_tool_results_after=3).apply(call)
    assert lookup[0] not in out.messages and lookup[1] not in out.messages
    assert call.trace.of("prune")[-1]["stale"] == 1
    check_integrity(out.messages, msgs)

    kept = stage(embedder, stale_tool_results_after=4).apply(Call(messages=msgs))
    assert lookup[1] in kept.messages
    never = stage(embedder, stale_tool_results_after=None).apply(Call(messages=msgs))
    assert lookup[1] in never.messages


def test_short_results_are_not_replaced_by_longer_placeholders(embedder: Any) -> None:
    calls = [ToolCall(id="b1", name="ping", arguments={}),
             ToolCall(id="b2", name="lookup_weather_station", arguments={"id": 7})]
    unit = [Message(role="assistant", tool_calls=calls),
            Message(role="tool", tool_call_id="b1", content="ok"),
            Message(role="tool", tool_call_id="b2", content="Station 7 reports 12C")]
    msgs = [SYSTEM, user("Ping and check station 7"), *unit, assistant("Done."),
            user("Ping again"), *tool_unit("ping", {}, "pong")]
    out = stage(embedder).apply(Call(messages=msgs))
    assert unit[1] in out.messages  # "ok" is shorter than any note about it


def test_pending_call_keeps_its_unit(embedder: Any) -> None:
    # The assistant asked for two results; only one arrived so far and it is superseded.
    calls = [ToolCall(id="p1", name="get_rate", arguments={"pair": "EURUSD"}),
             ToolCall(id="p2", name="get_news", arguments={})]
    unit = [Message(role="assistant", tool_calls=calls),
            Message(role="tool", tool_call_id="p1", content="EURUSD 1.0841 at 09:00 UTC, bid/ask")]
    msgs = [SYSTEM, user("Rate?"), *unit, user("Rate now?"),
            *tool_unit("get_rate", {"pair": "EURUSD"}, "EURUSD 1.0850 at 09:05 UTC, bid/ask")]
    out = stage(embedder).apply(Call(messages=msgs))
    assert unit[0] in out.messages  # p2 is still open: the call stays


# --------------------------------------------------------------------------- long items


def records(n: int, start: int = 0) -> str:
    return json.dumps({f"SKU-{i:04d}": {"name": f"part {i}", "stock": i * 3}
                       for i in range(start, start + n)})


def test_long_results_are_cut_to_what_the_query_needs(embedder: Any) -> None:
    old = tool_unit("list_parts", {"page": 2}, records(60, 60))
    fresh = tool_unit("list_parts", {"page": 1}, records(60))
    msgs = [SYSTEM, user("List the parts."), *old, assistant("60 parts."),
            user("How many SKU-0042 are in stock?"), *fresh]
    call = Call(messages=msgs)
    policy = Prune(long_item_tokens=300, keep_tokens=150)
    out = PruneStage(policy, embedder=embedder).apply(call)
    old_cut, fresh_cut = out.messages[3].content or "", out.messages[-1].content or ""
    assert count_text(old_cut) <= 150
    assert count_text(fresh_cut) <= 150 * FRESH_KEEP_FACTOR
    assert '"SKU-0042": {"name": "part 42", "stock": 126}' in fresh_cut
    assert "records omitted" in fresh_cut
    data = call.trace.of("prune")[-1]
    assert data["chunk_pruned"] == 2 and data["chunk_tokens_cut"] > 0
    assert [i["fresh"] for i in data["items"] if i["action"] == "cut"] == [False, True]
    check_integrity(out.messages, msgs)


def test_last_user_message_and_off_switch(embedder: Any) -> None:
    document = "Please check this inventory: " + records(50)
    msgs = [SYSTEM, user(document)]
    out = stage(embedder, long_item_tokens=100, keep_tokens=50).apply(Call(messages=msgs))
    assert out.messages[-1] is msgs[-1]  # the query itself is never cut

    older = [SYSTEM, user(document), assistant("Got it."), user("Which SKU-0007 stock?")]
    cut = stage(embedder, long_item_tokens=100, keep_tokens=50).apply(Call(messages=older))
    assert count_text(cut.messages[1].content or "") <= 50
    off = stage(embedder, long_item_tokens=100, query_aware=False).apply(Call(messages=older))
    assert off.messages[1] is older[1]


# --------------------------------------------------------------------------- contract


def test_apply_never_mutates_its_input(embedder: Any) -> None:
    msgs = [SYSTEM, user("Hi"), user("Hi"), *tool_unit("list_parts", {}, records(40)),
            user("Stock of SKU-0003?")]
    call = Call(messages=msgs)
    snapshot = [m.model_dump() for m in msgs]
    out = stage(embedder, long_item_tokens=50, keep_tokens=40).apply(call)
    assert out is not call and out.messages is not call.messages
    assert [m.model_dump() for m in call.messages] == snapshot
    assert call.messages == msgs


def test_policy_coercion_and_errors(embedder: Any) -> None:
    assert PruneStage({"keep_tokens": 50}, embedder=embedder).policy.keep_tokens == 50
    assert PruneStage(embedder=embedder).policy == Prune()
    with pytest.raises(PolicyError, match="prune policy"):
        PruneStage({"keep_tokens": 0})
    with pytest.raises(PolicyError, match="needs a Prune policy"):
        PruneStage("aggressive")  # type: ignore[arg-type]


async def test_async_path_prunes_off_the_loop(embedder: Any) -> None:
    loop_thread = threading.get_ident()
    seen: list[Call] = []
    threads: list[int] = []
    s = stage(embedder)
    original_apply = s.apply

    def spy(call: Call) -> Call:
        threads.append(threading.get_ident())
        return original_apply(call)

    s.apply = spy  # type: ignore[method-assign]

    async def anext(call: Call) -> Reply:
        seen.append(call)
        return Reply(message=assistant("ok"))

    msgs = [SYSTEM, user("Same question"), assistant("A"), user("Same question")]
    reply = await s.acall(Call(messages=msgs), anext)
    assert reply.text == "ok"
    assert texts(seen[0]) == [SYSTEM.content, "A", "Same question"]
    assert threads and threads[0] != loop_thread


# --------------------------------------------------------------------------- randomized


def random_conversation(rng: random.Random) -> list[Message]:
    """Turns of user text, tool units (repeats, parallel calls, pending calls), answers."""
    texts_pool = ["What is the status?", "Check order 77 please.", "Thanks!",
                  "What is the status?", "Any update on the shipment?"]
    results_pool = ["status: ok", "Order 77: shipped via DHL on 2024-05-02, tracking 99812",
                    "Order 77: in transit, expected 2024-05-06", records(25)]
    msgs: list[Message] = [SYSTEM]
    for turn in range(rng.randint(1, 7)):
        msgs.append(user(rng.choice(texts_pool)))
        for _ in range(rng.randint(0, 3)):
            n = rng.randint(1, 3)
            calls = [ToolCall(id=f"c{turn}_{len(msgs)}_{k}", name=rng.choice(["track", "status"]),
                              arguments={"order": rng.choice([77, 78])}) for k in range(n)]
            msgs.append(Message(role="assistant", tool_calls=calls))
            answered = calls if rng.random() > 0.1 else calls[:-1]  # sometimes one is pending
            msgs += [Message(role="tool", tool_call_id=c.id, content=rng.choice(results_pool))
                     for c in answered]
            if len(answered) < len(calls):
                break  # a pending call ends the turn
        else:
            if rng.random() < 0.8:
                msgs.append(assistant(rng.choice(["Done.", "It shipped.", "Done."])))
    return msgs


def test_randomized_conversations_never_orphan_anything(embedder: Any) -> None:
    rng = random.Random(1234)
    aggressive = Prune(dedupe_similarity=0.85, stale_tool_results_after=1,
                       long_item_tokens=40, keep_tokens=24)
    s = PruneStage(aggressive, embedder=embedder)
    dropped = 0
    for _ in range(60):
        msgs = random_conversation(rng)
        call = Call(messages=msgs)
        out = s.apply(call)
        check_integrity(out.messages, msgs)
        assert out.messages[0] is SYSTEM
        last_user = max(i for i, m in enumerate(msgs) if m.role == "user")
        assert msgs[last_user] in out.messages
        dropped += len(msgs) - len(out.messages)
    assert dropped > 0  # the property was tested on conversations that did get pruned
