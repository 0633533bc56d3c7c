"""The prefix KV cache: the LRU itself (small tensors) and, with the real
embedded model, replies identical with the cache on and off."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from contextwise.backends.prefix_cache import PrefixCache, cache_nbytes
from transformers import DynamicCache

from contextwise.types import Call, Reply

# --------------------------------------------------------------------------- the LRU


def kv(tokens: int, layers: int = 2, value: float = 0.0) -> DynamicCache:
    """A real DynamicCache holding `tokens` positions (1 x 2 heads x 4 dims, fp32)."""
    c = DynamicCache()
    for i in range(layers):
        t = torch.full((1, 2, tokens, 4), float(value))
        c.update(t, t.clone(), i)
    return c


def nbytes(tokens: int, layers: int = 2) -> int:
    return layers * 2 * (2 * tokens * 4 * 4)  # layers x (k, v) x heads*tokens*dims x fp32


def test_size_is_the_key_value_bytes():
    assert cache_nbytes(kv(5)) == nbytes(5) == 640


def test_longest_stored_prefix_wins_and_leaves_a_token():
    pc = PrefixCache(max_bytes=10_000, min_tokens=2)
    assert pc.store([1, 2], kv(2, value=2))
    assert pc.store([1, 2, 3, 4], kv(4, value=4))
    assert pc.store([9, 9, 9], kv(3))
    n, c = pc.lookup([1, 2, 3, 4, 5])
    assert n == 4 and c.get_seq_length() == 4 and float(c.layers[0].keys[0, 0, 0, 0]) == 4
    n, c = pc.lookup([1, 2, 3, 4])  # the 4-token entry would leave nothing to prefill
    assert n == 2 and float(c.layers[0].keys[0, 0, 0, 0]) == 2
    n, _ = pc.lookup([1, 2, 3, 7, 8])
    assert n == 2
    assert pc.lookup([1, 3, 2]) is None
    assert pc.lookup([1, 2]) is None
    s = pc.stats()
    assert (s["entries"], s["hits"], s["misses"], s["tokens_reused"]) == (3, 3, 2, 8)
    assert s["bytes"] == nbytes(2) + nbytes(4) + nbytes(3)


def test_lru_eviction_keeps_bytes_under_the_bound():
    pc = PrefixCache(max_bytes=nbytes(4) * 2, min_tokens=1)
    pc.store([1, 1, 1, 1], kv(4))
    pc.store([2, 2, 2, 2], kv(4))
    assert pc.lookup([1, 1, 1, 1, 0]) is not None  # 1 is now the most recently used
    pc.store([3, 3, 3, 3], kv(4))  # evicts 2, the least recently used
    assert [1, 1, 1, 1] in pc and [3, 3, 3, 3] in pc and [2, 2, 2, 2] not in pc
    s = pc.stats()
    assert s["entries"] == 2 and s["bytes"] == nbytes(4) * 2 <= s["max_bytes"]
    assert s["evictions"] == 1
    pc.store([4] * 8, kv(8))  # as big as the whole bound: everything else goes
    assert len(pc) == 1 and pc.stats()["bytes"] == nbytes(8)
    assert pc.lookup([4] * 9)[0] == 8 and pc.lookup([1, 1, 1, 1, 0]) is None


def test_too_big_or_too_short_is_not_stored():
    pc = PrefixCache(max_bytes=nbytes(4), min_tokens=3)
    assert not pc.store([1] * 5, kv(5))
    assert not pc.store([1, 2], kv(2))
    assert pc.store([1, 2, 3], kv(3))
    assert pc.stats()["entries"] == 1
    assert not pc.store([7] * 3, kv(3), nbytes=nbytes(4) + 1)  # explicit size counts
    pc.clear()
    assert pc.stats()["entries"] == 0 and pc.stats()["bytes"] == 0
    assert pc.lookup([1, 2, 3, 4]) is None


def test_lookup_returns_an_independent_copy():
    pc = PrefixCache(max_bytes=10_000, min_tokens=1)
    pc.store([1, 2, 3], kv(3, value=1.0))
    _, c = pc.lookup([1, 2, 3, 4])
    c.layers[0].keys.add_(5)  # in place
    c.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), 0)  # grows, as generate does
    c.crop(-2)
    _, again = pc.lookup([1, 2, 3, 4])
    assert again.get_seq_length() == 3
    assert torch.equal(again.layers[0].keys, torch.ones(1, 2, 3, 4))
    assert again.layers[0].keys.data_ptr() != c.layers[0].keys.data_ptr()


def test_threads_share_it_safely():
    pc = PrefixCache(max_bytes=nbytes(2) * 5, min_tokens=1)

    def work(k: int) -> None:
        for i in range(50):
            key = [k, i % 7]
            pc.store(key, kv(2))
            pc.lookup([*key, 0])

    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(work, k) for k in range(4)]:
            f.result()  # re-raises what a thread raised
    s = pc.stats()
    assert s["bytes"] <= s["max_bytes"] and s["entries"] == s["bytes"] // nbytes(2)


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        PrefixCache(max_bytes=-1)
    with pytest.raises(ValueError):
        PrefixCache(max_bytes=10, min_tokens=0)


def test_policy_fields_reach_the_backend(monkeypatch):
    from contextwise.backends import build_backend, local

    from contextwise.policy import Budget, Local, Policy

    assert Policy().backend.prefix_cache_mb is None  # by device: 256 MB on CPU, off on GPUs
    assert Policy().backend.prefix_cache_min_tokens == 32
    with pytest.raises(ValueError):
        Local(prefix_cache_mb=-1)
    got: dict = {}
    monkeypatch.setattr(local, "LocalBackend", lambda **kw: got.update(kw) or "backend")
    spec = Local(prefix_cache_mb=0, prefix_cache_min_tokens=64)
    assert build_backend(spec, Budget()) == "backend"
    assert got["prefix_cache_mb"] == 0 and got["prefix_cache_min_tokens"] == 64


# --------------------------------------------------------------------------- the real model


def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather for a city.

    Args:
        city: City name.
        unit: celsius or fahrenheit.
    """
    return "sunny"


SYSTEM = (
    "You are the support assistant of Northwind Outfitters, a shop for hiking and camping gear. "
    "Follow these rules. " + " ".join(
        f"Rule {i}: {rule}" for i, rule in enumerate([
            "Greet the customer briefly and answer in plain, short sentences.",
            "Never invent prices, stock levels or delivery dates; say you will check instead.",
            "Returns are accepted within 30 days with the receipt; worn boots cannot be returned.",
            "Shipping is free above 50 euros inside the EU and costs 4.90 euros below that.",
            "Tents come with a two-year warranty; sleeping bags with one year.",
            "Do not give medical advice; for injuries tell the customer to see a doctor.",
            "When asked about the weather, suggest checking a forecast before any trip.",
            "Recommend layering: a base layer, an insulating layer and a waterproof shell.",
            "Stores open 9 to 19 on weekdays and 10 to 16 on Saturdays; closed on Sundays.",
            "Gift cards never expire and can be used online and in stores.",
            "Members of the Trail Club get 10 percent off full-price items.",
            "If the customer is angry, apologise once and offer to connect them to a person.",
        ], 1)
    )
)
QUESTIONS = ["Can I return my boots after two weeks?", "How much is shipping for 30 euros?"]


@pytest.fixture(scope="module")
def backends():
    """(cache off, cache on): two backends over the one process-wide model."""
    from contextwise.backends.loading import load_model
    from contextwise.backends.local import LocalBackend

    loaded = load_model("smollm2-135m-instruct")
    return LocalBackend(loaded=loaded, prefix_cache_mb=0), LocalBackend(loaded=loaded)


def chat(question: str, system: str | list[str] = SYSTEM) -> list[dict]:
    systems = [system] if isinstance(system, str) else system
    return [*({"role": "system", "content": s} for s in systems),
            {"role": "user", "content": question}]


def run(backend, messages, stream: bool = False, **kw) -> tuple[Reply, list[str]]:
    """One call; the reply carries the token ids generate returned in `reply.trace`."""
    call = Call.build(messages, **kw)
    deltas: list[str] = []
    if stream:
        call.on_delta = deltas.append
    generate = backend.model.generate
    ids: list[list[int]] = []

    def recording(*args, **kwargs):
        out = generate(*args, **kwargs)
        ids.append(out[0].tolist())
        return out

    backend.model.generate = recording  # an instance attribute over the method
    try:
        reply = backend.generate([call])[0]
    finally:
        del backend.model.generate
    reply.trace.add("test", token_ids=ids[0])
    return reply, deltas


def same(a: Reply, b: Reply) -> None:
    """Same tokens, text, tool calls (ids aside), usage and finish reason."""
    assert a.trace.of("test")[0]["token_ids"] == b.trace.of("test")[0]["token_ids"]
    assert a.message.content == b.message.content
    calls = [[(c.name, c.arguments) for c in r.message.tool_calls or []] for r in (a, b)]
    assert calls[0] == calls[1]
    assert a.usage == b.usage
    assert a.finish_reason == b.finish_reason


def cached_tokens(reply: Reply) -> tuple[int, int]:
    (rec,) = reply.trace.of("backend")
    return rec["prefix_cached_tokens"], rec["prefix_stored_tokens"]


@pytest.mark.model
def test_greedy_replies_are_identical_with_the_cache(backends):
    off, on = backends
    assert off.prefix_cache is None and on.prefix_cache is not None
    on.prefix_cache.clear()
    first_off, _ = run(off, chat(QUESTIONS[0]), max_tokens=16)
    first_on, _ = run(on, chat(QUESTIONS[0]), max_tokens=16)
    same(first_on, first_off)
    assert cached_tokens(first_off) == (0, 0)
    reused, stored = cached_tokens(first_on)
    assert reused == 0 and stored >= 200  # the miss prefilled the system part and kept it
    assert stored < first_on.usage.prompt_tokens
    second_off, _ = run(off, chat(QUESTIONS[1]), max_tokens=16)
    second_on, _ = run(on, chat(QUESTIONS[1]), max_tokens=16)
    same(second_on, second_off)
    assert cached_tokens(second_on) == (stored, 0)  # a hit
    s = on.prefix_cache.stats()
    assert s["entries"] == 1 and s["hits"] == 1 and s["tokens_reused"] == stored


@pytest.mark.model
def test_tools_forced_calls_and_stop_strings_are_identical(backends):
    off, on = backends
    kw = {"tools": [get_weather], "max_tokens": 24}
    for extra in ({}, {"tool_choice": "required"}):  # the forced one is grammar-constrained
        a, _ = run(off, chat("What's the weather in Paris?"), **kw, **extra)
        b, _ = run(on, chat("What's the weather in Paris?"), **kw, **extra)
        same(b, a)
    assert cached_tokens(b)[0] > 0  # the auto call stored the system part with the tools block
    run(on, chat(QUESTIONS[0]), max_tokens=1)  # the system part without tools is in the cache
    a, _ = run(off, chat("List five things to pack for a hike."), stop=["3"], max_tokens=24)
    b, _ = run(on, chat("List five things to pack for a hike."), stop=["3"], max_tokens=24)
    same(b, a)
    assert cached_tokens(b)[0] > 0


@pytest.mark.model
def test_streaming_and_seeded_sampling_are_identical(backends):
    off, on = backends
    run(on, chat(QUESTIONS[0]), max_tokens=1)  # the system part is in the cache
    plain, _ = run(off, chat(QUESTIONS[1]), max_tokens=16)
    streamed, deltas = run(on, chat(QUESTIONS[1]), stream=True, max_tokens=16)
    same(streamed, plain)
    assert cached_tokens(streamed)[0] > 0
    assert "".join(deltas) == streamed.text == plain.text
    kw = {"temperature": 1.0, "seed": 11, "max_tokens": 12}
    a, _ = run(off, chat("Write a word."), **kw)
    b, _ = run(on, chat("Write a word."), **kw)
    c, _ = run(on, chat("Write a word."), **kw)
    assert cached_tokens(c)[0] > 0
    assert a.text == b.text == c.text


@pytest.mark.model
def test_a_longer_system_part_extends_a_shorter_cached_one(backends):
    off, on = backends
    on.prefix_cache.clear()
    run(on, chat(QUESTIONS[0]), max_tokens=1)
    (short,) = [len(k) for k in on.prefix_cache._entries]
    two = [SYSTEM, "Today the shop in Lyon is closed for inventory."]
    a, _ = run(off, chat(QUESTIONS[0], two), max_tokens=12)
    b, _ = run(on, chat(QUESTIONS[0], two), max_tokens=12)
    same(b, a)
    reused, stored = cached_tokens(b)
    assert reused == short and stored > short  # only the second system message was prefilled
    assert on.prefix_cache.stats()["entries"] == 2


@pytest.mark.model
def test_short_or_absent_system_parts_are_not_cached(backends):
    _, on = backends
    on.prefix_cache.clear()
    before = on.prefix_cache.stats()
    reply, _ = run(on, [{"role": "user", "content": "Hi"}], max_tokens=2)
    reply2, _ = run(on, chat("Hi", "Be brief."), max_tokens=2)
    assert cached_tokens(reply) == cached_tokens(reply2) == (0, 0)
    after = on.prefix_cache.stats()
    assert after["entries"] == 0 and after["misses"] == before["misses"]


@pytest.mark.model
def test_prefix_cache_default_is_on_for_cpu() -> None:
    from contextwise.backends.loading import load_model
    from contextwise.backends.local import LocalBackend

    backend = LocalBackend(loaded=load_model("smollm2-135m-instruct", device="cpu"))
    assert backend.prefix_cache is not None and backend.prefix_cache.max_bytes == 256 * 2**20
