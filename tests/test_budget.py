"""Budget fit: the prompt fits the window minus the reply; pinned content is never dropped."""

from __future__ import annotations

import pytest
from contextwise.middleware.budget import BudgetStage, approx_prompt_tokens

from contextwise.errors import ContextOverflow
from contextwise.policy import Budget
from contextwise.types import Call


def _conversation(turns: int) -> list[dict]:
    msgs: list[dict] = [{"role": "system", "content": "You are terse."}]
    for t in range(turns):
        msgs.append({"role": "user", "content": f"question {t} " + "word " * 40})
        msgs.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{t}", "type": "function", "function": {"name": "look", "arguments": "{}"}}]})
        msgs.append({"role": "tool", "tool_call_id": f"c{t}", "content": "result " * 30})
        msgs.append({"role": "assistant", "content": f"answer {t}"})
    msgs.append({"role": "user", "content": "final question"})
    return msgs


def test_fits_without_change_when_under() -> None:
    call = Call.build(_conversation(1), max_tokens=50)
    out = BudgetStage(Budget(max_context_tokens=4000)).apply(call)
    assert out.messages == call.messages
    assert out.trace.of("budget")[0]["limit"] == 3950


def test_drops_oldest_units_and_never_orphans() -> None:
    call = Call.build(_conversation(10), max_tokens=64)
    out = BudgetStage(Budget(max_context_tokens=600)).apply(call)
    assert approx_prompt_tokens(out) <= 600 - 64
    assert out.messages[0].role == "system"
    assert out.messages[-1].content == "final question"
    ids = {tc.id for m in out.messages for tc in (m.tool_calls or [])}
    answered = {m.tool_call_id for m in out.messages if m.role == "tool"}
    assert ids == answered  # every call keeps its result and vice versa
    kept = [m.content for m in out.messages if m.role == "user"]
    assert kept[-2].startswith("question 9")  # newest history survives, oldest goes
    assert out.trace.of("budget")[0]["dropped_messages"] > 0


def test_exact_counter_and_window_callable() -> None:
    call = Call.build(_conversation(6), max_tokens=10)
    words = lambda c: sum(len((m.content or "").split()) for m in c.messages)
    out = BudgetStage(Budget(), window=lambda: 200, counter=words).apply(call)
    assert words(out) <= 190


def test_pinned_content_over_budget_says_by_how_much() -> None:
    call = Call.build([{"role": "system", "content": "rule " * 300}, {"role": "user", "content": "hi"}],
                      max_tokens=100)
    with pytest.raises(ContextOverflow, match=r"pinned content .* over by \d+ tokens") as e:
        BudgetStage(Budget(max_context_tokens=200)).apply(call)
    assert e.value.over_by == approx_prompt_tokens(call) + 100 - 200


def test_needs_a_window() -> None:
    with pytest.raises(ValueError, match="needs a window"):
        BudgetStage(Budget()).apply(Call.build([{"role": "user", "content": "hi"}]))


def test_exact_count_is_skipped_only_when_clearly_under() -> None:
    counted: list[int] = []

    def exact(c: Call) -> int:
        counted.append(1)
        return approx_prompt_tokens(c) * 2  # a tokenizer twice as verbose as cl100k

    stage = BudgetStage(Budget(), window=100_000, counter=exact)
    call = Call.build(_conversation(2), max_tokens=10)
    stage.apply(call)
    stage.apply(call)
    assert len(counted) == 1  # calibrated: the second call trusted the scaled estimate
    tight = BudgetStage(Budget(), window=approx_prompt_tokens(call) * 2 + 20, counter=exact)
    tight.apply(call)
    tight.apply(call)
    assert len(counted) == 3  # near the limit: always counted exactly
