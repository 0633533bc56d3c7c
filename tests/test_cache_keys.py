"""Cache keys: normalization, the context fingerprint and the key-term guard."""

from __future__ import annotations

import pytest
from contextwise.middleware.cache_keys import exact_key, fingerprint, guard, key_terms, normalize

from contextwise.types import Call


def _call(messages, **kw) -> Call:
    return Call.build(messages, **kw)


def test_normalize_folds_case_space_and_trailing_punctuation() -> None:
    assert normalize("  What IS   the capital of France?? ") == "what is the capital of france"
    assert normalize("ＡＢＣ") == "abc"  # NFKC


def test_exact_key_ignores_surface_differences_only() -> None:
    assert exact_key("fp", "Hello there!") == exact_key("fp", "hello   there")
    assert exact_key("fp", "hello") != exact_key("other", "hello")


def test_fingerprint_ignores_the_query_but_not_the_context() -> None:
    base = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    other_q = [base[0], {"role": "user", "content": "something else"}]
    fp = fingerprint(_call(base), model="m")
    assert fingerprint(_call(other_q), model="m") == fp  # only the latest turn differs
    assert fingerprint(_call(base), model="m2") != fp
    assert fingerprint(_call(base), model="m", namespace="session:s1") != fp
    sys2 = [{"role": "system", "content": "Be verbose."}, base[1]]
    assert fingerprint(_call(sys2), model="m") != fp
    assert fingerprint(_call(base, max_tokens=10), model="m") != fp
    assert fingerprint(_call(base, stop=["x"]), model="m") != fp
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert fingerprint(_call(base, tools=[tool]), model="m") != fp


def test_same_question_in_two_conversations_gets_two_fingerprints() -> None:
    a = [{"role": "user", "content": "Tell me about Marie Curie."},
         {"role": "assistant", "content": "A physicist."},
         {"role": "user", "content": "How old is he?"}]
    b = [{"role": "user", "content": "Tell me about Pele."}, a[1], a[2]]
    assert fingerprint(_call(a), model="m") != fingerprint(_call(b), model="m")


@pytest.mark.parametrize(("a", "b", "why"), [
    ("What is the capital of Austria?", "What is the capital of Australia?", "entit"),
    ("convert 5 km to miles", "convert 50 km to miles", "numbers"),
    ("What time is it in Tokyo at 9am in London?", "What time is it in Tokyo at 9pm in London?",
     "numbers"),
    ("Which foods are not safe for dogs?", "Which foods are safe for dogs?", "negated"),
    ("How do I install numpy?", "How do I uninstall numpy?", "opposites"),
    ("cheapest flight to Tokyo", "most expensive flight to Tokyo", "opposites"),
    ("How do I zoom in on a Mac?", "how do i zoom out on a mac", "opposites"),
    ("Is a square a rectangle?", "Is a rectangle a square?", "other roles"),
    ("How do I redirect HTTP to HTTPS in nginx?", "How do I redirect HTTPS to HTTP in nginx?",
     "other roles"),
    ("When was Mozart born?", "Where was Mozart born?", "asks"),
])
def test_guard_refuses_lookalikes(a: str, b: str, why: str) -> None:
    reason = guard(a, b)
    assert reason is not None and why in reason
    assert guard(b, a) is not None  # symmetric


@pytest.mark.parametrize(("a", "b"), [
    ("What is the capital of France?", "what's the capital of france"),
    ("How do I reset my password?", "how can i reset my pasword"),  # typo
    ("What is the capital of France?", "Tell me the capital city of France"),  # an addition
    ("How do I buy a car?", "how do i purchase a car"),  # a synonym
    ("How do I merge two lists in Python?", "merge 2 lists into one in python"),
])
def test_guard_lets_paraphrases_through(a: str, b: str) -> None:
    synonyms = {frozenset({"buy", "purchase"})}
    assert guard(a, b, word_similarity=lambda x, y: 0.9 if {x, y} in synonyms else 0.0) is None


def test_key_terms_reads_numbers_in_words_and_digits() -> None:
    t = key_terms("Split 1,000 items into twelve boxes by 9am")
    assert {"1000", "12", "9am"} <= t.numbers


def test_fingerprint_keys_the_catalogue_when_loadout_narrowed_it() -> None:
    def tool(name: str) -> dict:
        return {"name": name, "description": name, "parameters": {"type": "object"}}

    a = _call([{"role": "user", "content": "weather in Lisbon"}], tools=[tool("w"), tool("x")])
    b = _call([{"role": "user", "content": "how is the weather in Lisbon"}],
              tools=[tool("w"), tool("y")])
    assert fingerprint(a, model="m") != fingerprint(b, model="m")
    for c in (a, b):
        c.trace.add("tools", catalogue="abc123", kept=[t.name for t in c.tools])
    assert fingerprint(a, model="m") == fingerprint(b, model="m")


def test_fingerprint_ignores_random_tool_call_ids() -> None:
    def convo(call_id: str) -> list[dict]:
        return [{"role": "user", "content": "weather in Lisbon"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function",
                     "function": {"name": "w", "arguments": "{\"city\": \"Lisbon\"}"}}]},
                {"role": "tool", "tool_call_id": call_id, "content": "19 C"},
                {"role": "user", "content": "and tomorrow?"}]

    assert fingerprint(_call(convo("call_a")), model="m") == fingerprint(
        _call(convo("call_b")), model="m")
