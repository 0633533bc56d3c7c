"""The confidence cascade: a small model answers first, unsure replies go to the main model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeBackend
from contextwise.backends.cascade import CascadeBackend, confidence
from contextwise.memory.store import Store
from pydantic import ValidationError

from contextwise.errors import BackendError, ContextOverflow, InputError, PolicyError
from contextwise.pipeline import Pipeline
from contextwise.policy import Budget, Cascade, Local, Policy, Storage
from contextwise.types import Call, Message, Params, Reply

PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Say hello in Spanish.",
]


def call(text: str, **params: Any) -> Call:
    params.setdefault("max_tokens", 8)
    return Call(messages=[Message(role="user", content=text)], params=Params(**params))


def cascade_record(reply: Reply) -> dict[str, Any]:
    return reply.trace.of("cascade")[-1]


class ScoredFake(FakeBackend):
    """A small backend without a model: replies like FakeBackend, with fixed token probs."""

    model_name = "small-fake"

    def __init__(self, probs: list[float], **kw: Any):
        super().__init__(**kw)
        self.probs = probs

    def generate_scored(self, c: Call) -> tuple[Reply, list[float]]:
        return self.generate([c])[0], list(self.probs)


class Factory:
    """A zero-argument backend factory that counts how often it was called."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.backend


# -- no model: policy, arguments, the decision logic on fake backends


def test_policy_defaults_and_validation() -> None:
    assert Local().cascade is None
    c = Local(cascade=Cascade()).cascade
    assert c is not None
    assert (c.model, c.quantization, c.confidence) == (None, "int8", "mean_prob")
    assert 0 < c.threshold < 1
    with pytest.raises(ValidationError, match="threshold"):
        Cascade(threshold=1.5)
    with pytest.raises(ValidationError, match="confidence"):
        Cascade(confidence="entropy")
    with pytest.raises(ValidationError, match="quantization"):
        Cascade(quantization="int3")
    with pytest.raises(PolicyError, match="the small model is the main model itself"):
        Policy.from_dict({"backend": {"cascade": {"quantization": "none"}}})
    with pytest.raises(PolicyError, match=r"backend\.cascade\.threshold"):
        Policy.from_dict({"backend": {"cascade": {"threshold": -0.1}}})
    # a different small model may keep the main model's quantization
    assert Local(cascade=Cascade(model="/some/small", quantization="none")).cascade is not None
    described = Policy(backend=Local(cascade=Cascade(threshold=0.3))).describe()
    assert "cascade:" in described and "threshold: 0.3  *" in described


def test_backend_arguments_are_checked() -> None:
    small, large = ScoredFake([0.9]), FakeBackend()
    with pytest.raises(InputError, match="threshold: must be a number in"):
        CascadeBackend(small, large, threshold=1.5)
    with pytest.raises(InputError, match="threshold"):
        CascadeBackend(small, large, threshold=True)
    with pytest.raises(InputError, match="confidence: must be one of"):
        CascadeBackend(small, large, confidence="entropy")
    with pytest.raises(InputError, match="large: must be a Backend"):
        CascadeBackend(small, "big-model")  # type: ignore[arg-type]


def test_confidence_measures() -> None:
    probs = [0.9, 0.5, 1.0]
    assert confidence(probs, "min_prob") == 0.5
    assert confidence(probs, "mean_prob") == pytest.approx((0.9 * 0.5 * 1.0) ** (1 / 3))
    assert confidence([], "mean_prob") == 1.0
    assert confidence([0.0], "mean_prob") == pytest.approx(math.exp(math.log(1e-12)))


def test_a_confident_small_reply_is_kept() -> None:
    small, large = ScoredFake([0.9, 0.8], reply_text="small says"), FakeBackend(reply_text="big")
    cascade = CascadeBackend(small, large, threshold=0.5)
    reply = cascade.generate([call("hi")])[0]
    assert reply.text == "small says" and not large.calls
    record = cascade_record(reply)
    assert record["decision"] == "accepted" and record["confidence"] == pytest.approx(0.8485, 1e-3)
    assert record["small_model"] == "small-fake"
    assert cascade.stats() == {"accepted": 1, "escalated": 0, "direct": 0,
                               "small_tokens_wasted": 0, "acceptance_rate": 1.0,
                               "escalation_rate": 0.0}


def test_an_unsure_small_reply_escalates() -> None:
    small = ScoredFake([0.9, 0.2], reply_text="two words")
    large = FakeBackend(reply_text="the big answer")
    cascade = CascadeBackend(small, large, threshold=0.5, confidence="min_prob")
    reply = cascade.generate([call("hi")])[0]
    assert reply.text == "the big answer" and len(large.calls) == 1
    record = cascade_record(reply)
    assert record["decision"] == "escalated" and record["confidence"] == 0.2
    assert record["small_tokens_wasted"] == 2
    stats = cascade.stats()
    assert stats["escalated"] == 1 and stats["escalation_rate"] == 1.0
    assert stats["small_tokens_wasted"] == 2


def test_a_group_is_decided_call_by_call() -> None:
    # a list in (what the BatchingEngine hands a non-local backend), a reply per call out
    small = ScoredFake([0.95], reply_text="small")
    large = FakeBackend(reply_text="large")
    cascade = CascadeBackend(small, large, threshold=0.9)
    replies = cascade.generate([call("a"), call("b"), call("c")])
    assert [r.text for r in replies] == ["small"] * 3
    small.probs = [0.1]
    assert cascade.generate([call("d")])[0].text == "large"
    assert cascade.stats()["acceptance_rate"] == 0.75


class Batched(FakeBackend):
    """A fake with `generate_scored_batch`: echoes, token probs by prompt ("sure..."
    0.95, else 0.2), a ContextOverflow for prompts starting "long"."""

    def __init__(self) -> None:
        super().__init__()
        self.scored_batches: list[list[str]] = []

        self.scored_alone: list[str] = []

    def _scored(self, c: Call) -> Any:
        text = c.messages[-1].content
        if text.startswith("long"):
            return ContextOverflow(5000, 8, 4096)
        return self.generate([c])[0], [0.95 if text.startswith("sure") else 0.2]

    def generate_scored(self, c: Call) -> tuple[Reply, list[float]]:
        self.scored_alone.append(c.messages[-1].content)
        result = self._scored(c)
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[no-any-return]

    def generate_scored_batch(self, calls: list[Call]) -> list[Any]:
        self.scored_batches.append([c.messages[-1].content for c in calls])
        return [self._scored(c) for c in calls]


def test_a_group_runs_as_one_small_batch_and_one_large_batch() -> None:
    small, large = Batched(), Batched()
    cascade = CascadeBackend(small, large, threshold=0.5)
    streamed: list[str] = []
    group = [call("sure a"), call("unsure b"), call("sure c"), call("unsure d"),
             call("long e"), call("sampled f", temperature=0.7),
             call("forced g", response_format={"type": "json_object"}),
             call("unsure streamed h"), call("sure with a stop", stop=["\n\n"])]
    group[7].on_delta = streamed.append
    replies = cascade.generate(group)
    assert [r.text for r in replies] == [c.messages[-1].content for c in group]  # in order
    # the greedy unconstrained ones went to the small model together, quietly
    assert small.scored_batches == [["sure a", "unsure b", "sure c", "unsure d", "long e",
                                     "unsure streamed h"]]
    assert all(c.on_delta is None for c in small.calls)
    # the unsure unstreamed ones escalated in one batch; the streamed one streams alone
    assert large.scored_batches == [["unsure b", "unsure d"]]
    assert "".join(streamed) == "unsure streamed h"
    decisions = [r.trace.of("cascade")[-1]["decision"] for r in replies]
    assert decisions == ["accepted", "escalated", "accepted", "escalated", "direct",
                         "escalated", "direct", "escalated", "accepted"]
    assert replies[4].trace.of("cascade")[-1]["reason"] == "small_overflow"
    # sampled, and with stop strings: alone on the small model
    assert small.scored_alone == ["sampled f", "sure with a stop"]
    assert large.calls[-1].messages[-1].content == "unsure streamed h"


def test_a_lone_call_or_a_small_backend_without_batches_runs_alone() -> None:
    small, large = Batched(), Batched()
    cascade = CascadeBackend(small, large, threshold=0.5)
    assert cascade.generate([call("unsure a")])[0].text == "unsure a"
    assert small.scored_batches == [] and large.scored_batches == []
    assert small.scored_alone == ["unsure a"]
    plain = CascadeBackend(ScoredFake([0.1], reply_text="s"), large, threshold=0.5)
    assert [r.text for r in plain.generate([call("x"), call("y")])] == ["x", "y"]
    assert large.scored_batches == [["x", "y"]]  # the escalations still batch on the large


def test_streaming_replays_an_accepted_reply_and_streams_an_escalated_one() -> None:
    small = ScoredFake([0.9], reply_text="small reply text")
    large = FakeBackend(reply_text="large reply text")
    cascade = CascadeBackend(small, large, threshold=0.5)
    deltas: list[str] = []
    c = call("hi")
    c.on_delta = deltas.append
    reply = cascade.generate([c])[0]
    assert deltas == ["small reply text"] and reply.text == "small reply text"
    assert small.last_call.on_delta is None  # the small model never streams

    small.probs = [0.1]
    deltas.clear()
    c = call("hi")
    c.on_delta = deltas.append
    reply = cascade.generate([c])[0]
    assert "".join(deltas) == "large reply text" == reply.text
    assert deltas == FakeBackend.deltas("large reply text")  # streamed by the large model


def test_constrained_calls_go_straight_to_the_large_model() -> None:
    small, large = ScoredFake([1.0]), FakeBackend(reply_text="{}")
    cascade = CascadeBackend(small, large, threshold=0.0)
    reply = cascade.generate([call("json please", response_format={"type": "json_object"})])[0]
    assert reply.text == "{}" and not small.calls
    assert cascade_record(reply) == {"decision": "direct", "reason": "constrained"}
    assert cascade.stats()["direct"] == 1 and cascade.stats()["acceptance_rate"] == 0.0


def test_too_long_for_the_small_model_goes_to_the_large_one() -> None:
    class Overflowing(ScoredFake):
        def generate_scored(self, c: Call) -> tuple[Reply, list[float]]:
            raise ContextOverflow(600, 8, 512)

    large = FakeBackend(reply_text="large")
    cascade = CascadeBackend(Overflowing([1.0]), large, threshold=0.0)
    reply = cascade.generate([call("a long one")])[0]
    assert reply.text == "large" and cascade_record(reply)["reason"] == "small_overflow"


def test_a_small_backend_without_scores_is_a_clear_error() -> None:
    cascade = CascadeBackend(FakeBackend(), FakeBackend(), threshold=0.5)
    with pytest.raises(BackendError, match="no generate_scored"):
        cascade.generate([call("hi")])


def test_models_load_on_first_use_only() -> None:
    small = Factory(ScoredFake([0.9], reply_text="small"))
    large = Factory(FakeBackend(reply_text="large"))
    counter = Factory(FakeBackend())
    cascade = CascadeBackend(small, large, threshold=0.5, counter=counter, model_name="m")
    assert cascade.model_name == "m"
    assert cascade.prompt_tokens(call("three words here")) == 3
    assert cascade.context_window == 4096
    assert (small.calls, large.calls, counter.calls) == (0, 0, 1)
    assert not cascade.small_loaded and not cascade.large_loaded
    cascade.generate([call("hi")])
    assert (small.calls, large.calls) == (1, 0)  # accepted: the large one is not needed
    small.backend.probs = [0.1]
    cascade.generate([call("hi")])
    cascade.generate([call("again")])
    assert (small.calls, large.calls) == (1, 1)  # built once, on the first escalation


def test_build_backend_loads_nothing_until_a_call(tmp_path: Path) -> None:
    # tokenizer and config only (the prompt counter); no weights
    from contextwise.backends import build_backend

    backend = build_backend(Local(cascade=Cascade(threshold=0.4), max_batch=1), Budget())
    assert isinstance(backend, CascadeBackend)
    assert backend.prompt_tokens(call("Hello there")) > 0
    assert backend.context_window > 0
    assert not backend.small_loaded and not backend.large_loaded
    assert backend.threshold == 0.4 and backend.identity is not None
    assert "cascade=smollm2-135m-instruct:int8:mean_prob>=0.4" in backend.identity


def test_a_cache_hit_loads_neither_model(tmp_path: Path, embedder: Any) -> None:
    small = Factory(ScoredFake([0.9], reply_text="small"))
    large = Factory(FakeBackend(reply_text="large"))
    cascade = CascadeBackend(small, large, threshold=0.5, counter=FakeBackend(),
                             model_name="fake-model", identity="fake-model|cascade")
    pipe = Pipeline(Policy(tools=None, storage=Storage(path=str(tmp_path / "c.db"))),
                    backend=cascade, store=Store(tmp_path / "c.db"))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    first = pipe(msgs, max_tokens=8)
    assert first.text == "small" and small.calls == 1
    small.calls = 0
    pipe.cache.put(msgs, "Paris.", max_tokens=16)
    again = pipe(msgs, max_tokens=16)
    assert again.text == "Paris." and again.trace.of("cache")[0]["hit"] == "exact"
    assert not again.trace.of("cascade")
    assert (small.calls, large.calls) == (0, 0)


def test_a_cascade_policy_gets_its_own_cache_identity() -> None:
    from contextwise.pipeline import model_identity

    plain = model_identity(Policy())
    cascaded = model_identity(Policy(backend=Local(cascade=Cascade())))
    assert cascaded != plain and cascaded.startswith(plain)


# -- the real model: small = int8, large = unquantized


@pytest.fixture(scope="module")
def large() -> Any:
    from contextwise.backends.local import LocalBackend

    return LocalBackend(prefix_cache_mb=0)


@pytest.fixture(scope="module")
def small() -> Any:
    from contextwise.backends.local import LocalBackend

    return LocalBackend(prefix_cache_mb=0, quantization="int8")


@pytest.mark.model
def test_threshold_zero_accepts_every_small_reply(small: Any, large: Any) -> None:
    cascade = CascadeBackend(small, large, threshold=0.0)
    replies = cascade.generate([call(p) for p in PROMPTS])
    for p, r in zip(PROMPTS, replies, strict=True):
        record = cascade_record(r)
        assert record["decision"] == "accepted" and 0 < record["confidence"] <= 1
        assert r.text == small.generate([call(p)])[0].text
        assert len(r.trace.of("backend")) == 1  # only the small model ran
    stats = cascade.stats()
    assert stats["accepted"] == 3 and stats["acceptance_rate"] == 1.0
    assert stats["escalated"] == 0


@pytest.mark.model
def test_an_unreachable_threshold_escalates_every_call(small: Any, large: Any) -> None:
    # min_prob == 1.0 would need every chosen token at probability exactly 1
    cascade = CascadeBackend(small, large, threshold=1.0, confidence="min_prob")
    replies = cascade.generate([call(p) for p in PROMPTS])
    for p, r in zip(PROMPTS, replies, strict=True):
        alone = large.generate([call(p)])[0]
        assert r.text == alone.text and r.usage == alone.usage
        record = cascade_record(r)
        assert record["decision"] == "escalated" and record["small_tokens_wasted"] > 0
        assert len(r.trace.of("backend")) == 2  # the small attempt, then the large model
    stats = cascade.stats()
    assert stats["escalated"] == 3 and stats["escalation_rate"] == 1.0
    assert stats["small_tokens_wasted"] > 0


@pytest.mark.model
def test_a_group_on_real_models_decides_as_the_calls_one_by_one(small: Any, large: Any) -> None:
    cascade = CascadeBackend(small, large, threshold=0.6)
    group = PROMPTS + ["Write a haiku about rain.", "What is 12 times 12?"]
    batched = cascade.generate([call(p, max_tokens=16) for p in group])
    alone = [cascade.generate([call(p, max_tokens=16)])[0] for p in group]
    assert [r.text for r in batched] == [r.text for r in alone]
    decided = [(cascade_record(r)["decision"], cascade_record(r)["confidence"]) for r in batched]
    expected = [(cascade_record(r)["decision"], cascade_record(r)["confidence"]) for r in alone]
    assert [d for d, _ in decided] == [d for d, _ in expected]
    assert {d for d, _ in decided} == {"accepted", "escalated"}  # both paths ran
    assert [c for _, c in decided] == pytest.approx([c for _, c in expected], abs=1e-4)
    assert batched[0].trace.of("backend")[0]["batch_size"] == len(group)


@pytest.mark.model
def test_scored_batches_on_the_local_backend(large: Any) -> None:
    prompts = ["Name three colors.", "What is the capital of France?"]
    results = large.generate_scored_batch([call(p, max_tokens=12) for p in prompts]
                                          + [call("word " * 9000)])
    for p, (reply, probs) in zip(prompts, results[:2], strict=True):
        alone, alone_probs = large.generate_scored(call(p, max_tokens=12))
        assert reply.text == alone.text and reply.usage == alone.usage
        assert probs == pytest.approx(alone_probs, abs=1e-4)
    assert isinstance(results[2], ContextOverflow)  # that call only
    for bad in (call("hi", temperature=0.5), call("hi", stop=["."])):
        assert not large.batchable(bad)
        with pytest.raises(InputError, match="greedy, unconstrained"):
            large.generate_scored_batch([bad])


@pytest.mark.model
def test_scores_are_the_models_own_probabilities(large: Any) -> None:
    reply, probs = large.generate_scored(call("Name three colors."))
    assert len(probs) == reply.usage.completion_tokens
    assert all(0 < p <= 1 for p in probs)
    assert reply.text == large.generate([call("Name three colors.")])[0].text


def test_the_batching_engine_hands_the_cascade_whole_groups() -> None:
    from contextwise.backends.engine import BatchingEngine

    from contextwise.pipeline import backend_identity

    small = ScoredFake([0.9], reply_text="small")
    cascade = CascadeBackend(small, FakeBackend(reply_text="large"), threshold=0.5,
                             identity="fake|cascade")
    with BatchingEngine(cascade, max_batch=4, max_wait_ms=50) as engine:
        futures = engine.submit([call("a"), call("b"), call("c")])
        replies = [f.result() for f in futures]
        assert backend_identity(engine) == "fake|cascade"  # passed through the engine
    assert [r.text for r in replies] == ["small"] * 3
    assert [cascade_record(r)["decision"] for r in replies] == ["accepted"] * 3
    assert cascade.stats()["accepted"] == 3


@pytest.mark.model
def test_the_cascade_policy_builds_a_lazy_cascade_behind_the_engine(small: Any) -> None:
    from contextwise.backends import build_backend
    from contextwise.backends.engine import BatchingEngine

    engine = build_backend(Local(cascade=Cascade(threshold=0.0), max_batch=2), Budget())
    try:
        assert isinstance(engine, BatchingEngine)
        cascade = engine.backend
        assert isinstance(cascade, CascadeBackend)
        reply = engine.generate([call(PROMPTS[0])])[0]
        assert cascade_record(reply)["decision"] == "accepted"
        assert reply.text == small.generate([call(PROMPTS[0])])[0].text  # the int8 model
        assert cascade.small_loaded and not cascade.large_loaded
    finally:
        engine.close()
