"""Running summaries: the store, the summarize stage (incremental, pinned, no orphans,
fallback, async) and the extractive summarizer (real, no model)."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
from contextwise.memory.store import Store
from contextwise.memory.summaries import Summaries
from contextwise.middleware.summarize import (
    SUMMARY_HEADER,
    SUMMARY_PROMPT,
    SummarizeStage,
    cap_tokens,
    extractive_summary,
    model_summarizer,
    transcript,
)

from contextwise.errors import InputError, PolicyError
from contextwise.policy import Summarize
from contextwise.tokens import count_text
from contextwise.types import Call, Message, Reply, ToolCall, parse_messages

SYSTEM = Message(role="system", content="You are a travel assistant.")

TRIP = [
    ("Hi there!", "Hello! How can I help you today?"),
    ("I want to fly from Berlin to Lisbon on 2024-06-14.", "Sure. Window or aisle seat?"),
    ("I prefer a window seat. My budget is 300 EUR.", "Noted. Flight TP 537 costs 249 EUR."),
    ("Great, book it please.", "Booked flight TP 537, confirmation LX-99812."),
    ("Thanks!", "You're welcome."),
    ("Remember: I am allergic to peanuts.", "I will note the peanut allergy."),
    ("What is the weather in Lisbon in June?", "Usually sunny, around 25 degrees."),
    ("Ok.", "Anything else?"),
]


def user(text: str) -> Message:
    return Message(role="user", content=text)


def assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


def conversation(turns: list[tuple[str, str]], question: str = "What was my flight?"
                 ) -> list[Message]:
    msgs = [SYSTEM]
    for u, a in turns:
        msgs += [user(u), assistant(a)]
    return [*msgs, user(question)]


def summary_of(call: Call) -> str:
    assert call.messages[1].role == "system"
    return call.messages[1].content or ""


class FakeSummarizer:
    """Records what it was given; writes `summary #N` and the identifiers it read (a
    faithful summary), or only `summary #N` when `faithful` is False."""

    def __init__(self, fail: bool = False, faithful: bool = True):
        self.inputs: list[str] = []
        self.fail = fail
        self.faithful = faithful
        self.threads: list[int] = []

    def __call__(self, text: str, max_tokens: int) -> str:
        from contextwise.retrievers.chunks import identifiers

        self.inputs.append(text)
        self.threads.append(threading.get_ident())
        if self.fail:
            raise RuntimeError("model crashed")
        facts = " ".join(identifiers(text)) if self.faithful else ""
        return f"summary #{len(self.inputs)} {facts}".strip()


def stage(store: Store | None = None, summarizer: Any = None, **policy: Any) -> SummarizeStage:
    defaults: dict[str, Any] = {"trigger_tokens": 64, "keep_last": 2, "mode": "extractive"}
    return SummarizeStage(Summarize(**(defaults | policy)), store=store, summarizer=summarizer)


# --------------------------------------------------------------------------- store


def test_summaries_store_roundtrip(store_path: Path) -> None:
    s = Summaries(Store(store_path))
    assert s.get("a") is None
    s.put("a", "User flies to Lisbon.", 12, pinned=["Allergic to peanuts."], anchors=["k1"])
    s.put("a", "User flies to Lisbon on 2024-06-14.", 14, pinned=["Allergic to peanuts."])
    got = Summaries(Store(store_path)).get("a")  # persisted, latest write wins
    assert got is not None
    assert (got.text, got.covered, got.pinned) == ("User flies to Lisbon on 2024-06-14.", 14,
                                                   ["Allergic to peanuts."])
    assert got.updated > 0 and s.sessions() == ["a"]
    assert s.clear("a") is True and s.get("a") is None and s.clear("a") is False


def test_summaries_store_rejects_bad_input(store: Store) -> None:
    s = Summaries(store)
    with pytest.raises(InputError, match="session"):
        s.put("", "x", 1)
    with pytest.raises(InputError, match="covered"):
        s.put("a", "x", -1)
    with pytest.raises(InputError, match="text"):
        s.put("a", None, 1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- folding


def test_under_the_trigger_nothing_changes() -> None:
    call = Call(messages=conversation(TRIP[:2]))
    out = stage(trigger_tokens=5000).apply(call)
    assert out.messages == call.messages
    assert call.trace.of("summarize")[-1]["reason"] == "under trigger"


def test_old_turns_fold_into_one_system_message_after_the_head(store: Store) -> None:
    msgs = conversation(TRIP)
    call = Call(messages=msgs, session="s1")
    out = stage(store, keep_last=2).apply(call)
    assert out.messages[0] is SYSTEM
    assert summary_of(out).startswith(SUMMARY_HEADER)
    assert out.messages[2:] == msgs[-3:]  # last 2 turns verbatim: Ok./Anything else?, question
    data = call.trace.of("summarize")[-1]
    assert data["turns_folded"] == len(TRIP) - 1 and data["incremental"] is False
    assert data["tokens_after"] < data["tokens_before"]
    assert data["summary_tokens"] == count_text(summary_of(out)) + 3


def test_extractive_summary_keeps_facts_and_drops_filler() -> None:
    out = stage(max_summary_tokens=120, keep_last=1).apply(Call(messages=conversation(TRIP)))
    text = summary_of(out)
    for fact in ("2024-06-14", "window seat", "300 EUR", "TP 537", "LX-99812", "peanuts"):
        assert fact in text, fact
    for filler in ("Hi there", "How can I help", "You're welcome", "Thanks!", "Anything else"):
        assert filler not in text, filler
    body = text.removeprefix(SUMMARY_HEADER).strip()
    assert count_text(body) <= 120
    again = stage(max_summary_tokens=120, keep_last=1).apply(Call(messages=conversation(TRIP)))
    assert summary_of(again) == text  # deterministic


def test_extractive_summary_respects_the_cap() -> None:
    lines = "\n".join(f"User: Order ORD-{i:04d} ships to Berlin on 2024-06-{i % 28 + 1:02d}."
                      for i in range(80))
    out = extractive_summary(lines, 60)
    assert 0 < count_text(out) <= 60
    assert "ORD-0079" in out  # later facts win ties
    assert extractive_summary("", 60) == ""


def test_cap_tokens_cuts_whole_sentences_then_words() -> None:
    assert cap_tokens("One. Two. Three.", 100) == "One. Two. Three."
    assert cap_tokens("First sentence here. Second sentence here.", 5) == "First sentence here."
    assert count_text(cap_tokens("word " * 100, 10)) <= 10


# --------------------------------------------------------------------------- incremental


def test_incremental_calls_read_only_new_messages(store: Store) -> None:
    fake = FakeSummarizer()
    s = stage(store, fake, mode="model", keep_last=1)
    first = conversation(TRIP[:4], "Which hotel?")
    s.apply(Call(messages=first, session="trip"))
    assert "Berlin to Lisbon" in fake.inputs[0] and "Summary so far" not in fake.inputs[0]

    later = [*first, assistant("Hotel Avenida, 120 EUR a night."),
             user("Book the hotel for 3 nights."), assistant("Booked, reference HX-4411."),
             user("Total cost?")]
    call = Call(messages=later, session="trip")
    out = s.apply(call)
    second = fake.inputs[1]
    assert second.startswith("Summary so far:\nsummary #1")
    assert "Berlin to Lisbon" not in second  # already covered: not read again
    assert "Which hotel?" in second and "HX-4411" in second
    data = call.trace.of("summarize")[-1]
    assert data["incremental"] is True and data["new_messages"] == 4 and data["mode"] == "model"
    assert "summary #2" in summary_of(out)

    # Nothing new to fold: the stored summary is reused without a summarizer call.
    third = Call(messages=later, session="trip")
    again = s.apply(third)
    assert len(fake.inputs) == 2
    assert third.trace.of("summarize")[-1]["mode"] == "stored"
    assert summary_of(again) == summary_of(out)


def test_anchors_survive_dropped_messages_and_catch_a_new_conversation(store: Store) -> None:
    fake = FakeSummarizer()
    s = stage(store, fake, mode="model", keep_last=1)
    first = conversation(TRIP[:5], "Next?")
    s.apply(Call(messages=first, session="t"))
    # Another stage dropped two old messages; two new turns arrived.
    dropped = ("Hi there!", "Hello! How can I help you today?")
    trimmed = [m for m in first if m.content not in dropped]
    grown = [*trimmed, assistant("Next is the hotel."), user("Fine."), assistant("Done."),
             user("Bye?")]
    call = Call(messages=grown, session="t")
    s.apply(call)
    assert call.trace.of("summarize")[-1]["incremental"] is True
    assert "Berlin" not in fake.inputs[-1]

    pasta = [(f"How long do I cook pasta shape number {i} in salted water?",
              f"Cook shape {i} for about {8 + i} minutes, then drain it.") for i in range(4)]
    other = Call(messages=conversation(pasta, "Salt?"), session="t")
    s.apply(other)
    assert other.trace.of("summarize")[-1]["incremental"] is False


def test_without_a_session_nothing_is_stored() -> None:
    fake = FakeSummarizer()
    s = stage(None, fake, mode="model", keep_last=1)
    msgs = conversation(TRIP[:4])
    s.apply(Call(messages=msgs))
    s.apply(Call(messages=msgs))
    assert len(fake.inputs) == 2 and fake.inputs[0] == fake.inputs[1]
    assert s.summaries.sessions() == []


# --------------------------------------------------------------------------- pins, fallback


def test_pinned_facts_survive_every_rewrite(store: Store) -> None:
    fake = FakeSummarizer()  # rewrites the whole summary each time: pins must survive that
    s = stage(store, fake, mode="model", keep_last=1, pin=[r"(?i)allerg", r"LX-\d+"])
    msgs = conversation(TRIP, "Q1")
    for n in range(3):
        msgs = [*msgs, assistant(f"Answer {n}"), user(f"Question {n} about the hotel")]
        out = s.apply(Call(messages=msgs, session="p"))
        text = summary_of(out)
        assert "Pinned facts:\n" in text
        assert "- Remember: I am allergic to peanuts." in text
        assert "- Booked flight TP 537, confirmation LX-99812." in text
        assert text.count("allergic to peanuts") == 1  # deduplicated
    assert f"summary #{len(fake.inputs)}" in text


def test_a_failing_summarizer_falls_back_to_extractive(store: Store) -> None:
    call = Call(messages=conversation(TRIP), session="f")
    out = stage(store, FakeSummarizer(fail=True), mode="model", keep_last=1).apply(call)
    data = call.trace.of("summarize")[-1]
    assert data["mode"] == "extractive"
    assert "RuntimeError: model crashed" in data["fallback"]
    assert "TP 537" in summary_of(out)

    call = Call(messages=conversation(TRIP))
    stage(None, None, mode="model").apply(call)
    assert call.trace.of("summarize")[-1]["fallback"] == "no summarizer given"


def test_model_summarizer_builds_the_prompt_and_cleans_the_answer() -> None:
    got: list[tuple[list[Message], int]] = []

    def generate(messages: list[Message], max_tokens: int) -> str:
        got.append((messages, max_tokens))
        return "  Summary: The user flies TP 537 on 2024-06-14. " + "More words. " * 50

    summarize = model_summarizer(generate)
    out = summarize("User: I fly TP 537.", 20)
    messages, cap = got[0]
    assert cap == 20
    assert [m.role for m in messages] == ["system", "user"]
    assert messages[0].content == SUMMARY_PROMPT and messages[1].content == "User: I fly TP 537."
    assert out.startswith("The user flies TP 537 on 2024-06-14.") and count_text(out) <= 20
    with pytest.raises(ValueError, match="empty"):
        model_summarizer(lambda m, n: "   ")("x", 20)


# --------------------------------------------------------------------------- contract


def tool_conversation(rng: random.Random) -> list[Message]:
    msgs = [SYSTEM]
    for t in range(rng.randint(2, 8)):
        msgs.append(user(f"Turn {t}: check order {100 + t} and the weather in city {t}."))
        for k in range(rng.randint(0, 2)):
            calls = [ToolCall(id=f"c{t}{k}{j}", name="lookup", arguments={"q": t})
                     for j in range(rng.randint(1, 2))]
            msgs.append(Message(role="assistant", tool_calls=calls))
            msgs += [Message(role="tool", tool_call_id=c.id,
                             content=f"Result for order {100 + t}: shipped on 2024-05-{t + 1:02d}")
                     for c in calls]
        msgs.append(assistant(f"Order {100 + t} shipped."))
    return msgs


def test_the_cut_never_orphans_a_tool_result() -> None:
    rng = random.Random(99)
    for _ in range(25):
        msgs = tool_conversation(rng)
        keep = rng.randint(0, 3)
        out = stage(None, trigger_tokens=64, keep_last=keep).apply(Call(messages=msgs))
        parse_messages([m.to_openai() for m in out.messages])  # no tool message without a call
        if len(out.messages) < len(msgs):
            tail = out.messages[2:]
            assert tail == msgs[len(msgs) - len(tail):]  # the kept tail is verbatim
            assert tail[0].role == "user"  # cut at a turn start


def test_apply_never_mutates_its_input(store: Store) -> None:
    msgs = conversation(TRIP)
    snapshot = [m.model_dump() for m in msgs]
    call = Call(messages=msgs, session="m")
    out = stage(store).apply(call)
    assert out is not call and [m.model_dump() for m in call.messages] == snapshot


def test_policy_errors() -> None:
    with pytest.raises(PolicyError, match="summarize policy"):
        SummarizeStage({"keep_last": -1})
    with pytest.raises(PolicyError, match="callable"):
        SummarizeStage(summarizer="gpt")  # type: ignore[arg-type]
    assert SummarizeStage({"mode": "extractive"}).policy.mode == "extractive"


async def test_async_path_summarizes_in_a_worker_thread(store: Store) -> None:
    fake = FakeSummarizer()
    s = stage(store, fake, mode="model", keep_last=1)
    seen: list[Call] = []

    async def anext(call: Call) -> Reply:
        seen.append(call)
        return Reply(message=assistant("ok"))

    reply = await s.acall(Call(messages=conversation(TRIP), session="a"), anext)
    assert reply.text == "ok"
    assert "summary #1" in summary_of(seen[0])
    assert fake.threads[0] != threading.get_ident()


def test_transcript_shortens_tool_results_and_shows_calls() -> None:
    calls = [ToolCall(id="x1", name="search", arguments={"q": "Lisbon"})]
    msgs = [user("Find hotels"), Message(role="assistant", tool_calls=calls),
            Message(role="tool", tool_call_id="x1", content="hotel " * 500)]
    text = transcript(msgs)
    lines = text.splitlines()
    assert lines[0] == "User: Find hotels"
    assert lines[1] == 'Assistant: called search({"q": "Lisbon"})'
    assert lines[2].startswith("Tool search: hotel") and count_text(lines[2]) < 100


def test_unfaithful_model_summary_falls_back_to_extractive(store: Store) -> None:
    msgs = [user("Book flight LX-1234 on 2026-12-18 for Ana, window seat, one checked bag."),
            assistant("Booked LX-1234 for Ana on 2026-12-18, seat 14A, one bag included."),
            user("And a hotel near the old town for four nights, under 150 EUR a night?"),
            assistant("Hotel Avenida, reference HX-4411, four nights at 120 EUR a night."),
            user("Thanks, what next?")]
    out = stage(store, FakeSummarizer(faithful=False), mode="model", keep_last=1).apply(
        Call(messages=msgs, session="f"))
    data = out.trace.of("summarize")[0]
    assert data["mode"] == "extractive" and "identifiers" in data["fallback"]
    assert "LX-1234" in (out.messages[0].content or "")
