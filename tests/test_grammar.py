"""The grammar's closing reserve (backends/grammar.py), with the real tokenizer only.

That a model's JSON reply then closes in time is tested with the model in
tests/test_local_backend.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from contextwise.backends.grammar import ClosingProcessor, Grammars, closing_reserve, in_string
from contextwise.backends.loading import load_tokenizer

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer("smollm2-135m-instruct")[0]


@pytest.fixture(scope="module")
def grammars(tokenizer: Any) -> Grammars:
    return Grammars(tokenizer, len(tokenizer))


def test_in_string_follows_quotes_and_escapes() -> None:
    assert not in_string('{"a": "b"')
    assert in_string('{"setup": "Why did')
    assert not in_string('{"setup": "Why"')
    assert in_string('{"a": "say \\"hi')  # an escaped quote does not end it
    assert not in_string('{"a": "x\\\\"')  # an escaped backslash, then the end quote
    assert in_string('{"')


def test_the_reserve_counts_every_required_key(tokenizer: Any) -> None:
    flat = {"type": "object", "required": ["setup", "punchline"],
            "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}}}
    nested = {"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"type": "string"},
        "arguments": {"type": "object", "required": ["city"],
                      "properties": {"city": {"type": "string"}}}}}
    assert closing_reserve(None, tokenizer) == 4
    assert 4 + 2 * 3 <= closing_reserve(flat, tokenizer) <= 4 + 2 * 8
    assert closing_reserve(nested, tokenizer) > closing_reserve(
        {**nested, "properties": {**nested["properties"], "arguments": {"type": "object"}}},
        tokenizer)


def test_closer_tokens_do_what_their_names_say(grammars: Grammars, tokenizer: Any) -> None:
    c = grammars.closers()
    ends = [tokenizer.decode([int(i)]) for i in c.end_string]
    closes = [tokenizer.decode([int(i)]) for i in c.close]
    assert '"' in ends and all(t[0] == '"' and set(t[1:]) <= set("}]") for t in ends)
    assert "}" in closes and all(set(t) <= set("}]") for t in closes)
    assert int(c.lengths[tokenizer.convert_tokens_to_ids("}")]) == 1


def test_in_the_reserve_only_closing_tokens_stay(grammars: Grammars, tokenizer: Any) -> None:
    c = grammars.closers()
    prompt = tokenizer("prompt", add_special_tokens=False)["input_ids"]
    made = tokenizer('{"setup": "Why did the cat', add_special_tokens=False)["input_ids"]
    proc = ClosingProcessor(lambda ids, scores: scores, tokenizer, c, max_new=len(made) + 3,
                            reserve=4)
    proc(torch.tensor([prompt]), torch.zeros(1, len(tokenizer)))  # the first call: the prompt
    scores = proc(torch.tensor([prompt + made]), torch.zeros(1, len(tokenizer)))
    kept = set((scores[0] > float("-inf")).nonzero()[:, 0].tolist())
    assert kept == set(c.end_string.tolist())
    early = ClosingProcessor(lambda ids, scores: scores, tokenizer, c, max_new=100, reserve=4)
    early(torch.tensor([prompt]), torch.zeros(1, len(tokenizer)))
    scores = early(torch.tensor([prompt + made]), torch.zeros(1, len(tokenizer)))
    assert bool((scores > float("-inf")).all())  # outside the reserve: the grammar's mask only
