"""Prompt-lookup decoding in the local backend: lossless, and skipped where it can't apply."""

from __future__ import annotations

from typing import Any

import pytest
from contextwise.backends.engine import BatchingEngine
from contextwise.backends.local import LocalBackend
from pydantic import ValidationError

from contextwise.errors import InputError
from contextwise.policy import Local
from contextwise.types import Call, Message, Params

ORDER = (
    '{"order_id": 4821, "customer": "Ada Lovelace", "items": [{"sku": "A-12", "qty": 2}, '
    '{"sku": "B-7", "qty": 1}], "ship_to": "12 Analytical Row, London", "status": "shipped"}'
)
PARAGRAPH = (
    "The Rhine rises in the Swiss Alps and flows north through Germany before reaching the "
    "North Sea in the Netherlands. It is one of the busiest inland waterways in Europe, "
    "carrying coal, grain and containers between Basel and Rotterdam."
)
PROMPTS = {
    "repeat_json": f"Repeat the following JSON exactly:\n{ORDER}",
    "extract_sentence": f"Document:\n{PARAGRAPH}\n\nCopy the first sentence of the document.",
    "tool_result": f"Tool result from search_orders:\n{ORDER}\n\nWho is the customer and where "
                   "does the order ship to? Quote the tool result.",
    "open_question": "Why is the sky blue? Answer in two sentences.",
}


def call(text: str, system: str | None = None, **params: Any) -> Call:
    messages = [Message(role="system", content=system)] if system else []
    messages.append(Message(role="user", content=text))
    params.setdefault("max_tokens", 24)
    return Call(messages=messages, params=Params(**params))


def backend_record(reply: Any) -> dict[str, Any]:
    return reply.trace.of("backend")[-1]


# -- no model


def test_policy_defaults_off_and_validates() -> None:
    spec = Local()
    assert spec.speculative == "none" and spec.speculative_tokens == 10
    assert Local(speculative="prompt_lookup", speculative_tokens=4).speculative == "prompt_lookup"
    with pytest.raises(ValidationError, match="speculative"):
        Local(speculative="medusa")
    with pytest.raises(ValidationError, match="speculative_tokens"):
        Local(speculative_tokens=0)


def test_backend_rejects_a_bad_mode_before_loading() -> None:
    with pytest.raises(InputError, match="speculative: must be one of"):
        LocalBackend(model="no-such-model", speculative="medusa")
    with pytest.raises(InputError, match="speculative_tokens"):
        LocalBackend(model="no-such-model", speculative="prompt_lookup", speculative_tokens=0)


# -- the real model


@pytest.fixture(scope="module")
def plain() -> LocalBackend:
    return LocalBackend(prefix_cache_mb=0)


@pytest.fixture(scope="module")
def lookup(plain: LocalBackend) -> LocalBackend:
    return LocalBackend(loaded=plain.loaded, prefix_cache_mb=0, speculative="prompt_lookup",
                        speculative_tokens=8)


@pytest.mark.model
@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_greedy_output_is_unchanged(plain: LocalBackend, lookup: LocalBackend, name: str) -> None:
    base = plain.generate([call(PROMPTS[name])])[0]
    fast = lookup.generate([call(PROMPTS[name])])[0]
    assert fast.message.content == base.message.content
    assert fast.usage == base.usage
    assert fast.finish_reason == base.finish_reason
    assert backend_record(fast)["speculative"] == "prompt_lookup"
    assert "speculative" not in backend_record(base)  # off: the trace is as before


@pytest.mark.model
def test_streaming_with_prompt_lookup_adds_up(plain: LocalBackend, lookup: LocalBackend) -> None:
    deltas: list[str] = []
    c = call(PROMPTS["repeat_json"])
    c.on_delta = deltas.append
    fast = lookup.generate([c])[0]
    assert backend_record(fast)["speculative"] == "prompt_lookup"
    assert "".join(deltas) == fast.message.content
    assert fast.message.content == plain.generate([call(PROMPTS["repeat_json"])])[0].message.content


@pytest.mark.model
def test_prompt_lookup_bypasses_the_prefix_cache(plain: LocalBackend) -> None:
    # assisted decoding can't start from a prefilled cache (it would see the prefix twice)
    cached = LocalBackend(loaded=plain.loaded, prefix_cache_mb=32, prefix_cache_min_tokens=8,
                          speculative="prompt_lookup")
    system = "You answer from the document the user gives you. Quote it exactly when asked."
    base = plain.generate([call(PROMPTS["repeat_json"], system=system)])[0]
    first = cached.generate([call(PROMPTS["repeat_json"], system=system)])[0]
    second = cached.generate([call(PROMPTS["repeat_json"], system=system)])[0]
    for r in (first, second):
        record = backend_record(r)
        assert record["speculative"] == "prompt_lookup"
        assert record["prefix_cache_skipped"] == "speculative"
        assert record["prefix_cached_tokens"] == record["prefix_stored_tokens"] == 0
        assert r.message.content == base.message.content
    sampled = cached.generate([call(PROMPTS["repeat_json"], system=system, temperature=0.5,
                                    seed=3)])[0]
    assert backend_record(sampled)["prefix_stored_tokens"] > 0  # still used where lookup isn't


@pytest.mark.model
@pytest.mark.parametrize(("params", "reason"), [
    ({"temperature": 0.7, "seed": 1}, "sampled"),
    ({"response_format": {"type": "json_object"}}, "constrained"),
    ({"stop": ["London"]}, "stop_strings"),
])
def test_calls_it_cannot_serve_fall_back(plain: LocalBackend, lookup: LocalBackend,
                                         params: dict[str, Any], reason: str) -> None:
    fast = lookup.generate([call(PROMPTS["repeat_json"], **params)])[0]
    record = backend_record(fast)
    assert record["speculative"] == "none" and record["speculative_skipped"] == reason
    base = plain.generate([call(PROMPTS["repeat_json"], **params)])[0]
    assert fast.message.content == base.message.content  # the plain path, same output


@pytest.mark.model
def test_a_forced_tool_call_falls_back(lookup: LocalBackend) -> None:
    def get_weather(city: str) -> str:
        """Get the weather for a city.

        Args:
            city: City name.
        """
        return "sunny"

    c = Call.build([{"role": "user", "content": "Weather in Paris?"}], tools=[get_weather],
                   max_tokens=32, tool_choice="required")
    assert lookup.speculative_skip(c) == "constrained"


@pytest.mark.model
def test_the_engine_sends_a_lone_call_to_prompt_lookup(lookup: LocalBackend) -> None:
    with BatchingEngine(lookup, max_batch=4, max_wait_ms=0) as engine:
        reply = engine.generate([call(PROMPTS["repeat_json"], max_tokens=12)])[0]
        stats = engine.stats()
    assert backend_record(reply)["speculative"] == "prompt_lookup"
    assert stats["single_calls"] == 1


@pytest.mark.model
def test_the_policy_reaches_the_backend() -> None:
    from contextwise.backends import build_backend

    from contextwise.policy import Budget

    engine = build_backend(Local(speculative="prompt_lookup", speculative_tokens=4), Budget())
    try:
        assert isinstance(engine, BatchingEngine)
        assert engine.backend.speculative == "prompt_lookup"
        assert engine.backend.speculative_tokens == 4
    finally:
        engine.close()


# -- draft-model assisted generation (speculative="draft")


def test_draft_policy_fields_validate() -> None:
    spec = Local(speculative="draft")
    assert spec.draft_model is None and spec.draft_layers is None
    assert Local(speculative="draft", draft_layers=12).draft_layers == 12
    with pytest.raises(ValidationError, match="draft_layers"):
        Local(speculative="draft", draft_layers=0)
    with pytest.raises(ValidationError, match="speculative='draft'"):
        Local(draft_layers=12)  # without speculative="draft"
    with pytest.raises(ValidationError, match="self-draft only"):
        Local(speculative="draft", draft_model="smollm2-135m-instruct", draft_layers=4)


def test_backend_rejects_bad_draft_args_before_loading() -> None:
    with pytest.raises(InputError, match="draft_layers: must be an int >= 1"):
        LocalBackend(model="no-such-model", speculative="draft", draft_layers=0)
    with pytest.raises(InputError, match="draft_model: needs speculative='draft'"):
        LocalBackend(model="no-such-model", draft_model="smollm2-135m-instruct")
    with pytest.raises(InputError, match="draft_model"):
        LocalBackend(model="no-such-model", speculative="draft", draft_model="")


@pytest.fixture(scope="module")
def self_draft(plain: LocalBackend) -> LocalBackend:
    return LocalBackend(loaded=plain.loaded, prefix_cache_mb=0, speculative="draft",
                        speculative_tokens=6)


DRAFT_PROMPTS = ["repeat_json", "open_question", "extract_sentence"]


@pytest.mark.model
@pytest.mark.parametrize("name", DRAFT_PROMPTS)
def test_self_draft_greedy_output_is_unchanged(plain: LocalBackend, self_draft: LocalBackend,
                                               name: str) -> None:
    base = plain.generate([call(PROMPTS[name])])[0]
    fast = self_draft.generate([call(PROMPTS[name])])[0]
    assert fast.message.content == base.message.content
    assert fast.usage == base.usage
    assert fast.finish_reason == base.finish_reason
    record = backend_record(fast)
    assert record["speculative"] == "draft"
    passes, accepted = record["draft_target_passes"], record["draft_accepted_tokens"]
    assert 1 <= passes <= fast.usage.completion_tokens
    assert accepted == fast.usage.completion_tokens - passes


@pytest.mark.model
def test_self_draft_defaults_to_most_layers_and_rejects_the_whole_model(
        plain: LocalBackend, self_draft: LocalBackend) -> None:
    n = plain.model.config.num_hidden_layers
    assert self_draft.draft_layers == round(0.9 * n) < n
    assert plain.model.config.num_hidden_layers == n  # restored after drafting
    with pytest.raises(InputError, match=f"draft_layers: must be below the model's {n} layers"):
        LocalBackend(loaded=plain.loaded, speculative="draft", draft_layers=n)


@pytest.mark.model
def test_an_unknown_draft_model_names_the_field(plain: LocalBackend) -> None:
    from contextwise.errors import ModelNotFound

    with pytest.raises(ModelNotFound, match="draft_model: '/no/such/draft' is neither"):
        LocalBackend(loaded=plain.loaded, speculative="draft", draft_model="/no/such/draft")


@pytest.mark.model
def test_a_separate_draft_model_is_lossless(plain: LocalBackend) -> None:
    # the same checkpoint as its own draft (int8 would be a second copy): every draft
    # token is accepted, so passes are few; the output is still the plain one
    drafted = LocalBackend(loaded=plain.loaded, prefix_cache_mb=0, speculative="draft",
                           draft_model="smollm2-135m-instruct", speculative_tokens=4)
    assert drafted.draft is not None and drafted.draft_layers is None
    base = plain.generate([call(PROMPTS["open_question"], max_tokens=16)])[0]
    fast = drafted.generate([call(PROMPTS["open_question"], max_tokens=16)])[0]
    assert fast.message.content == base.message.content
    record = backend_record(fast)
    assert record["speculative"] == "draft"
    assert record["draft_accepted_tokens"] > 0


@pytest.mark.model
@pytest.mark.parametrize(("params", "reason"), [
    ({"temperature": 0.7, "seed": 1}, "sampled"),
    ({"stop": ["London"]}, "stop_strings"),
])
def test_draft_skips_what_prompt_lookup_skips(self_draft: LocalBackend, params: dict[str, Any],
                                              reason: str) -> None:
    fast = self_draft.generate([call(PROMPTS["repeat_json"], max_tokens=8, **params)])[0]
    record = backend_record(fast)
    assert record["speculative"] == "none" and record["speculative_skipped"] == reason
    assert "draft_target_passes" not in record


@pytest.mark.model
def test_streaming_with_a_self_draft_adds_up(self_draft: LocalBackend) -> None:
    deltas: list[str] = []
    c = call(PROMPTS["open_question"], max_tokens=16)
    c.on_delta = deltas.append
    reply = self_draft.generate([c])[0]
    assert backend_record(reply)["speculative"] == "draft"
    assert "".join(deltas) == reply.message.content


@pytest.mark.model
def test_the_draft_policy_reaches_the_backend() -> None:
    from contextwise.backends import build_backend

    from contextwise.policy import Budget

    backend = build_backend(Local(speculative="draft", draft_layers=20, speculative_tokens=4,
                                  max_batch=1), Budget())
    assert isinstance(backend, LocalBackend)
    assert (backend.speculative, backend.draft_layers, backend.speculative_tokens) == (
        "draft", 20, 4)
    reply = backend.generate([call(PROMPTS["open_question"], max_tokens=8)])[0]
    assert backend_record(reply)["speculative"] == "draft"
