"""Static decoding: the static-KV decoder, continuous batching in the engine, CUDA graphs.

Tiny randomly initialised Llama / Qwen2 models (built from a config, nothing
downloaded) check the decoder against transformers' own greedy generate; the
`model` tests run the engine with `static_decode="on"` on the real embedded
model (CPU, float32) against the backend's single-request path; the `gpu`
tests (skipped without CUDA) check CUDA-graph replay against eager steps.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from contextwise.backends.continuous import PromptLookup, Row
from contextwise.backends.engine import BatchingEngine
from contextwise.backends.static_decode import StaticDecoder, supported
from pydantic import ValidationError
from test_engine import QUESTIONS, all_at_once, call, same, streamed_calls

from contextwise.errors import Cancelled, InputError
from contextwise.policy import Local

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

def tiny(kind: str = "llama", device: str = "cpu", dtype: Any = None) -> Any:
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "gpt2": transformers.GPT2Config}[kind]
    if kind == "gpt2":
        cfg = cfg_cls(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    else:
        cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                      max_position_embeddings=512, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def reference(model: Any, prompt: list[int], n: int) -> list[int]:
    x = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=None, temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt):].tolist()


def static_greedy(dec: StaticDecoder, prompts: list[list[int]], n: int,
                  steps: int) -> list[list[int]]:
    slots = list(range(len(prompts)))
    first = dec.prefill(slots, prompts).argmax(-1).tolist()
    made = [[t] for t in first]
    pos = [len(p) for p in prompts]
    while len(made[0]) < n:
        out, _ = dec.decode(len(prompts), [m[-1] for m in made], pos, steps=steps)
        for row, toks in zip(made, out.tolist(), strict=True):
            row.extend(toks)
        pos = [p + steps for p in pos]
    return [m[:n] for m in made]


# --------------------------------------------------------------------------- the decoder


PROMPTS = [[5, 17, 3, 99, 42], [7, 7, 1], [12, 40, 41, 42, 43, 44, 45, 46, 2]]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("steps", [1, 3])
def test_decoder_equals_transformers_greedy(kind: str, steps: int) -> None:
    model = tiny(kind)
    dec = StaticDecoder(model, slots=4, max_len=256)
    got = static_greedy(dec, PROMPTS, 20, steps)
    assert got == [reference(model, p, 20) for p in PROMPTS]


def test_a_position_major_cache_gives_the_same_tokens_and_verifies() -> None:
    model = tiny("qwen2")
    dec = StaticDecoder(model, slots=4, max_len=256, kv_layout="position")
    assert dec.k[0].shape == (4, 2, 256, 16) and dec.k[0].stride()[2] == 4 * 2 * 16
    want = [reference(model, p, 14) for p in PROMPTS]
    assert static_greedy(dec, PROMPTS, 8, 3) == [w[:8] for w in want]
    pos = [len(p) + 8 for p in PROMPTS]
    got = dec.verify(3, [[w[7], *w[8:12]] for w in want], [p - 1 for p in pos])
    assert got == [w[8:13] for w in want]
    with pytest.raises(ValueError, match="kv_layout must be one of"):
        StaticDecoder(model, slots=1, max_len=16, kv_layout="paged")


def test_a_resumed_launch_goes_on_from_the_last_one_on_the_device() -> None:
    model = tiny()
    want = [reference(model, p, 13) for p in PROMPTS]
    dec = StaticDecoder(model, slots=4, max_len=256)
    first = dec.prefill([0, 1, 2], PROMPTS).argmax(-1).tolist()
    pos = [len(p) for p in PROMPTS]
    a = dec.launch(3, first, pos, steps=4)
    b = dec.launch(3, None, [p + 4 for p in pos], steps=4)  # before a's tokens are read
    c = dec.launch(3, None, [p + 8 for p in pos], steps=4)
    got = [[f, *x, *y, *z] for f, x, y, z in zip(first, a.tokens(), b.tokens(), c.tokens(),
                                                  strict=True)]
    assert got == want


def test_launches_in_flight_land_in_different_host_buffers() -> None:
    """On CUDA a launch's tokens are copied into a pinned host buffer; a chunk launched
    before the one before it is read must not write that one's buffer (it did for the
    first two launches of a shape: on an H100 a runner's first chunk read the second
    chunk's tokens)."""
    from contextwise.backends.static_decode import Alternating

    made: list[tuple[int, ...]] = []
    buffers = Alternating(lambda shape: made.append(shape) or object())
    a, b = buffers.take((4, 8)), buffers.take((4, 8))
    assert a is not b
    assert [buffers.take((4, 8)) for _ in range(4)] == [a, b, a, b]
    c = buffers.take((2, 8))
    assert c is not a and c is not b
    assert made == [(4, 8), (4, 8), (2, 8)]


def test_a_slot_refilled_forgets_its_old_sequence() -> None:
    model = tiny()
    dec = StaticDecoder(model, slots=1, max_len=256)
    static_greedy(dec, [list(range(30, 90))], 10, 2)  # a long sequence first
    assert static_greedy(dec, [PROMPTS[1]], 12, 4) == [reference(model, PROMPTS[1], 12)]


SHARED = list(range(3, 43))  # a 40-token "system prompt": two whole blocks of 16 and 8 more


def decode_after(dec: StaticDecoder, slots: list[int], prompts: list[list[int]],
                 logits: Any, n: int) -> list[list[int]]:
    """n greedy tokens for prompts prefilled in `slots` (their first from `logits`)."""
    made = [[t] for t in logits.argmax(-1).tolist()]
    for _ in range(n - 1):
        tokens, pos = [0] * dec.slots, [0] * dec.slots
        for slot, p, m in zip(slots, prompts, made, strict=True):
            tokens[slot], pos[slot] = m[-1], len(p) + len(m) - 1
        out, _ = dec.decode(dec.slots, tokens, pos)
        for slot, m in zip(slots, made, strict=True):
            m.append(int(out[slot, 0]))
    return made


@pytest.mark.parametrize("layout", ["slot", "position"])
def test_a_prefill_after_a_reused_prefix_equals_a_whole_one(layout: str) -> None:
    model = tiny()
    dec = StaticDecoder(model, slots=4, max_len=256, kv_layout=layout)
    a, b = SHARED + [50, 51, 52], SHARED[:33] + [60, 61]
    dec.prefill([0, 1], [a, b])
    c, d = SHARED + [70, 71], SHARED[:20] + [80]
    whole = StaticDecoder(model, slots=4, max_len=256, kv_layout=layout).prefill([0, 1], [c, d])
    dec.copy_prefix([(0, 2, 40)])  # slot 2 takes slot 0's first 40 positions
    # c from position 40 in slot 2 (copied), d from 20 in slot 1 (in place: b's first 20)
    got = dec.prefill([2, 1], [c, d], starts=[40, 20])
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
    assert decode_after(dec, [2, 1], [c, d], got, 6) == [reference(model, p, 6) for p in (c, d)]


def test_bad_prefix_reuse_input_is_refused() -> None:
    dec = StaticDecoder(tiny(), slots=2, max_len=64)
    with pytest.raises(ValueError, match="starts must be one per prompt"):
        dec.prefill([0], [[1, 2, 3]], starts=[3])  # the last token must be computed
    with pytest.raises(ValueError, match="starts must be one per prompt"):
        dec.prefill([0, 1], [[1, 2], [3, 4]], starts=[0])
    with pytest.raises(ValueError, match="slots must be distinct, 0..1"):
        dec.prefill([2], [[1, 2]])
    with pytest.raises(ValueError, match="slots must be distinct"):
        dec.prefill([1, 1], [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="both a source and a target"):
        dec.copy_prefix([(0, 1, 4), (1, 0, 4)])
    with pytest.raises(ValueError, match="target of two copies"):
        dec.copy_prefix([(0, 1, 4), (0, 1, 8)])
    with pytest.raises(ValueError, match="bad copy"):
        dec.copy_prefix([(0, 1, 65)])


def runner_for(dec: StaticDecoder, got: dict[tuple[int, ...], list[int]],
               max_new: int = 6, later: list[Any] | None = None, **kw: Any) -> Any:
    """A ContinuousRunner whose finished rows land in `got` (prompt -> tokens); `later`:
    requests handed to it one poll at a time once it runs (None: nothing that poll)."""
    from contextwise.backends.continuous import ContinuousRunner, _Active

    later = later if later is not None else []

    def poll(limit: int) -> list[Any]:
        req = later.pop(0) if later and limit > 0 else None
        return [req] if req is not None else []

    return ContinuousRunner(
        dec, eos=-1, steps=2,
        make_row=lambda req, slot: _Active(req, req.ids, req.max_new, None, None, slot=slot),
        complete=lambda row, size: got.__setitem__(tuple(row.ids), row.new),
        poll=poll, decode_text=lambda ids: "", **kw)


class Req:
    def __init__(self, ids: list[int], max_new: int = 6) -> None:
        from concurrent.futures import Future

        self.ids, self.max_new, self.future = ids, max_new, Future()


def test_the_runner_shares_a_prefix_among_new_rows_then_reuses_it_in_place() -> None:
    model = tiny()
    dec = StaticDecoder(model, slots=4, max_len=256)
    got: dict[tuple[int, ...], list[int]] = {}
    runner = runner_for(dec, got)
    first = [SHARED + [60 + i, 70 + i] for i in range(3)]
    runner.run([Req(p) for p in first])
    assert [got[tuple(p)] for p in first] == [reference(model, p, 6) for p in first]
    s = runner.stats  # 32 shared tokens (whole blocks) prefilled once, copied to the others
    assert (s["reused_tokens"], s["copied_tokens"], s["prefill_tokens"]) == (64, 64, 32 + 30)
    second = [SHARED + [80 + i] for i in range(3)]
    runner.run([Req(p) for p in second])
    assert [got[tuple(p)] for p in second] == [reference(model, p, 6) for p in second]
    # each slot still holds an earlier prompt: its first 40 tokens are reused in place
    assert (s["reused_tokens"], s["copied_tokens"], s["prefill_tokens"]) == (
        64 + 120, 64, 62 + 3)
    assert s["reused_tokens"] + s["prefill_tokens"] == sum(map(len, first + second))


def test_the_runner_copies_from_a_busy_slot_and_skips_overwritten_ones() -> None:
    model = tiny()
    dec = StaticDecoder(model, slots=4, max_len=256)
    got: dict[tuple[int, ...], list[int]] = {}
    short, long = [9] * 20 + SHARED, SHARED + [1, 2]
    # `short` ends after the first chunk; each chunk after it (none runs ahead here) is
    # launched afresh over slots 0-1, slot 0 dormant: its cache overwritten from position
    # 0, so `again`, which then takes slot 0, must not reuse short's 25 shared tokens
    again = [9] * 20 + SHARED[:5] + [3]
    late = SHARED + [4]  # long's first 40 tokens: copied from its busy slot
    runner = runner_for(dec, got, later=[None, None, Req(again, 4), Req(late, 4)],
                        run_ahead=False)
    runner.run([Req(short, 2), Req(long, 12)])
    want = {tuple(p): reference(model, p, n) for p, n in
            ((short, 2), (long, 12), (again, 4), (late, 4))}
    assert got == want
    assert runner.stats["copied_tokens"] == 40 and runner.stats["reused_tokens"] == 40


def test_reuse_off_prefills_every_token() -> None:
    model = tiny()
    dec = StaticDecoder(model, slots=4, max_len=256)
    got: dict[tuple[int, ...], list[int]] = {}
    runner = runner_for(dec, got, reuse_prefixes=False)
    prompts = [SHARED + [60 + i] for i in range(3)]
    runner.run([Req(p) for p in prompts])
    runner.run([Req(p) for p in prompts])
    assert [got[tuple(p)] for p in prompts] == [reference(model, p, 6) for p in prompts]
    assert runner.stats["prefill_tokens"] == 6 * 41 and "reused_tokens" not in runner.stats


def test_a_failed_graph_capture_falls_back_to_plain_steps(monkeypatch: Any) -> None:
    model = tiny()
    dec = StaticDecoder(model, slots=4, max_len=256)
    dec.cuda_graphs = True  # as on a GPU; the capture below fails as a broken one would

    def broken(*args: Any) -> Any:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(dec, "_replay", broken)
    assert static_greedy(dec, PROMPTS, 12, 4) == [reference(model, p, 12) for p in PROMPTS]
    assert not dec.cuda_graphs and "not permitted" in dec.stats["graph_error"]


def test_unsupported_architectures_are_named() -> None:
    assert supported(tiny()) is None
    assert "gpt2" in (supported(tiny("gpt2")) or "")
    assert StaticDecoder.build(tiny("gpt2"), slots=2, max_len=64) is None
    with pytest.raises(ValueError, match="unsupported"):
        StaticDecoder(tiny("gpt2"), slots=2, max_len=64)


def test_bad_prefill_input_is_refused() -> None:
    dec = StaticDecoder(tiny(), slots=2, max_len=16)
    with pytest.raises(ValueError, match="lengths"):
        dec.prefill([0], [list(range(20))])
    with pytest.raises(ValueError, match="one prompt per slot"):
        dec.prefill([0, 1], [[1, 2]])
    with pytest.raises(ValueError, match="n must be"):
        dec.decode(3, [1, 1, 1], [0, 0, 0])


# ------------------------------------------------------------------- policy and engine options


def test_policy_and_engine_validate_the_options(fake_backend: Any) -> None:
    assert Local().static_decode == "auto" and Local().decode_steps == 8
    assert Local().reuse_prefixes is True
    for bad in ({"static_decode": "always"}, {"decode_steps": 0}, {"kv_cache_mb": 0},
                {"reuse_prefixes": "sometimes"}):
        with pytest.raises(ValidationError):
            Local(**bad)
    with pytest.raises(InputError, match="static_decode"):
        BatchingEngine(fake_backend, static_decode="yes")
    with pytest.raises(InputError, match="decode_steps"):
        BatchingEngine(fake_backend, decode_steps=0)
    with pytest.raises(InputError, match="kv_cache_mb"):
        BatchingEngine(fake_backend, kv_cache_mb=-1)
    with pytest.raises(InputError, match="reuse_prefixes"):
        BatchingEngine(fake_backend, reuse_prefixes="yes")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_verify_pass_gives_the_greedy_tokens_and_drops_rejected_drafts(kind: str) -> None:
    model = tiny(kind)
    want = [reference(model, p, 12) for p in PROMPTS]
    dec = StaticDecoder(model, slots=4, max_len=256)
    assert dec.prefill([0, 1, 2], PROMPTS).argmax(-1).tolist() == [w[0] for w in want]
    pos = [len(p) for p in PROMPTS]
    # a right draft: every position's greedy token is the next one
    got = dec.verify(3, [[w[0], *w[1:6]] for w in want], pos)
    assert got == [w[1:7] for w in want]
    # a draft wrong after its first token: the tokens up to the mismatch still hold
    pos = [p + 6 for p in pos]
    got = dec.verify(3, [[w[6], w[7], 99, 98] for w in want], pos)
    assert [g[:2] for g in got] == [w[7:9] for w in want]
    # the rejected positions' keys/values are overwritten before anything reads them
    out, _ = dec.decode(3, [w[8] for w in want], [p + 2 for p in pos], steps=3)
    assert out.tolist() == [w[9:12] for w in want]
    with pytest.raises(ValueError, match="the same for all"):
        dec.verify(2, [[1, 2], [3]], [5, 5])
    with pytest.raises(ValueError, match="pass the slot length"):
        dec.verify(1, [[1, 2, 3]], [254])


def test_prompt_lookup_drafts_what_followed_the_latest_match() -> None:
    look = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8])
    look.extend([1, 2, 3])
    assert look.draft(3) == [4, 5, 9]  # the trigram "1 2 3" beats the later bigram "2 3"
    look.extend([4])
    assert look.draft(2) == [5, 9]
    assert PromptLookup([2, 3, 7, 9, 2, 3, 8, 1, 2, 3]).draft(2) == [8, 1]  # latest "2 3"
    assert PromptLookup([5, 6, 7]).draft(4) == []  # 7 never seen before
    assert PromptLookup([5, 6, 5]).draft(4) == [6, 5]
    assert look.draft(0) == []


def test_a_row_takes_a_chunk_up_to_its_end() -> None:
    def row(max_new: int, stop: tuple[str, ...] | None = None) -> Row:
        return Row(req=None, ids=[1, 2], max_new=max_new, stop=stop, streamer=None)  # type: ignore[arg-type]

    r = row(10)
    assert r.take_many([5, 6, 7], eos=0, stopped=lambda: False) == (3, False)
    assert r.take_many([8, 0, 9], eos=0, stopped=lambda: False) == (2, True)  # EOS ends it
    assert r.new == [5, 6, 7, 8, 0]
    r = row(4)
    assert r.take_many([5, 6, 7, 8, 9, 0], eos=0, stopped=lambda: False) == (4, True)
    assert r.new == [5, 6, 7, 8]  # max_new: the rest of the chunk is dropped
    r = row(10)
    assert r.take_many([5, 6], eos=None, stopped=lambda: False) == (2, False)
    r = row(10, stop=("x",))  # stop strings: checked after every token
    seen: list[int] = []

    def stopped() -> bool:
        seen.append(len(r.new))
        return len(r.new) == 2

    assert r.take_many([5, 6, 7], eos=0, stopped=stopped) == (2, True)
    assert r.new == [5, 6] and seen == [1, 2]


def test_slots_shrink_before_they_get_fewer() -> None:
    from contextwise.backends.engine import slot_shape

    kb = 1024
    assert slot_shape(256 * 4096 * kb, kb, 4096, 256) == (4096, 256)  # all fit
    assert slot_shape(16 * 2048 * kb, kb, 4096, 16) == (2048, 16)  # shorter slots
    assert slot_shape(4 * 1024 * kb, kb, 4096, 16) == (1024, 4)  # shortest, then fewer
    assert slot_shape(512 * kb, kb, 4096, 16) == (1024, 0)  # not one slot
    assert slot_shape(10**12, kb, 512, 8) == (512, 8)  # a short context window


class _FlakyDecoder:
    """A StaticDecoder stand-in whose decode fails once: the runner's error handling."""

    slots, max_len = 2, 64

    def __init__(self) -> None:
        self.fail = True

    def prefill(self, slots: list[int], prompts: list[list[int]], starts: Any = None) -> Any:
        return torch.zeros(len(slots), 8)

    def bucket(self, n: int) -> int:
        return n

    def decode(self, n: int, tokens: Any, pos: Any, steps: int = 1, ban_eos: Any = None) -> Any:
        if self.fail:
            self.fail = False
            raise RuntimeError("CUDA out of memory")
        return torch.ones(n, steps, dtype=torch.long), torch.zeros(n, 8)

    def launch(self, n: int, tokens: Any, pos: Any, steps: int = 1, ban_eos: Any = None) -> Any:
        from contextwise.backends.static_decode import Pending

        return Pending(self.decode(n, tokens, pos, steps, ban_eos)[0], None)


@pytest.mark.parametrize("run_ahead", [True, False])
def test_chunks_run_one_ahead_but_not_past_the_last_token(run_ahead: bool) -> None:
    from concurrent.futures import Future

    from contextwise.backends.continuous import ContinuousRunner, _Active

    model = tiny()
    dec = StaticDecoder(model, slots=4, max_len=256)
    resumed: list[bool] = []
    real = dec.launch

    def launch(n: int, tokens: Any, pos: Any, steps: int = 1, ban_eos: Any = None) -> Any:
        resumed.append(tokens is None)
        return real(n, tokens, pos, steps, ban_eos)

    dec.launch = launch  # type: ignore[method-assign]

    class Req:
        def __init__(self, ids: list[int]) -> None:
            self.ids, self.future = ids, Future()

    got: dict[int, list[int]] = {}
    runner = ContinuousRunner(
        dec, eos=-1, steps=4, run_ahead=run_ahead,
        make_row=lambda req, slot: _Active(req, req.ids, 9, None, None, slot=slot),
        complete=lambda row, size: got.__setitem__(PROMPTS.index(row.ids), row.new),
        poll=lambda limit: [], decode_text=lambda ids: "")
    runner.run([Req(p) for p in PROMPTS])
    assert [got[i] for i in range(3)] == [reference(model, p, 9) for p in PROMPTS]
    # 1 token from the prefill, then 4 + 4: the second chunk resumes from the device
    # (when running ahead), and nothing is launched past the ninth token
    assert resumed == [False, run_ahead]
    assert runner.stats["resumed"] == int(run_ahead) and not runner.active


def test_running_ahead_stops_for_waiting_requests_drafts_and_the_last_chunk() -> None:
    from collections import deque

    from contextwise.backends.continuous import ContinuousRunner, _Active, _Flight

    runner = ContinuousRunner(
        _FlakyDecoder(), eos=7, steps=4, make_row=lambda req, slot: None,
        complete=lambda row, size: None, poll=lambda limit: [], decode_text=lambda ids: "",
        speculate=5, speculate_rows=2)
    rows = [_Active(None, [1], 20, None, None, slot=i) for i in range(3)]
    flight = _Flight(rows, 3, [1, 1, 1], 4, None)
    assert runner._go_on(flight, deque())  # 3 rows: more than a verify pass takes
    rows[0].done = True
    assert not runner._go_on(flight, deque())  # 2 left: they may draft
    runner.speculate = 0
    assert runner._go_on(flight, deque())
    runner.free = [5]
    assert not runner._go_on(flight, deque(["a request waiting for a slot"]))
    for r in rows:
        r.new = [0] * 16  # 16 + 4 = max_tokens: every row ends in this chunk
    assert not runner._go_on(flight, deque())
    runner.run_ahead, rows[1].new = False, []
    assert not runner._go_on(flight, deque())


def test_a_failing_pass_fails_its_callers_and_frees_the_slots() -> None:
    from concurrent.futures import Future

    from contextwise.backends.continuous import ContinuousRunner, _Active

    class Req:
        def __init__(self) -> None:
            self.future: Future[Any] = Future()

    done: list[tuple[Any, Any]] = []
    reqs = [Req() for _ in range(3)]
    runner = ContinuousRunner(
        _FlakyDecoder(), eos=7, steps=2,
        make_row=lambda req, slot: _Active(req, [1, 2], 4, None, None, slot=slot),
        complete=lambda row, size: done.append((row.req, row.error)),
        poll=lambda limit: [], decode_text=lambda ids: "")
    runner.run(reqs)  # two rows take the slots; the third waits; the decode fails
    assert [str(e) for _, e in done] == ["CUDA out of memory"] * 2
    assert "out of memory" in str(reqs[2].future.exception(0))
    assert sorted(runner.free) == [0, 1] and not runner.active
    again = [Req(), Req()]
    runner.run(again)  # the next batch runs normally
    assert [e for _, e in done[2:]] == [None, None]


def test_a_non_local_backend_keeps_the_batch_native_path(fake_backend: Any) -> None:
    with BatchingEngine(fake_backend, static_decode="on", max_wait_ms=50) as engine:
        assert [r.text for r in engine.generate([call("a"), call("b")])] == ["a", "b"]
        assert engine.stats()["static_decode"] == "the backend is not a LocalBackend"


# --------------------------------------------------------------------------- the engine, real model


@pytest.fixture(scope="module")
def local() -> Any:
    from contextwise.backends.loading import load_model
    from contextwise.backends.local import LocalBackend

    # No prefix cache: with it, calls with a system prompt run alone by design.
    return LocalBackend(loaded=load_model("smollm2-135m-instruct"), prefix_cache_mb=0,
                        max_context_tokens=1024)


@pytest.fixture
def engine(local: Any) -> Iterator[BatchingEngine]:
    with BatchingEngine(local, max_batch=8, max_wait_ms=200, static_decode="on",
                        decode_steps=4, kv_cache_mb=512) as e:
        yield e


@pytest.mark.model
def test_static_engine_gives_the_single_path_greedy_text(local: Any,
                                                         engine: BatchingEngine) -> None:
    sequential = [local.generate([call(q, max_tokens=16)])[0] for q in QUESTIONS]
    got = all_at_once(engine, QUESTIONS, 16)
    for a, b in zip(sequential, got, strict=True):
        same(a, b)
        (rec,) = b.trace.of("backend")
        assert rec["decode"] == "static"
    s = engine.stats()
    assert s["static_decode"] == "on" and s["static"]["admitted"] == len(QUESTIONS)
    assert s["static"]["slots"] == 8 and s["static"]["largest_active"] >= 2
    assert s["static"]["resumed"] >= 1  # chunks launched before the last one's tokens landed


SUPPORT = ("You are the support assistant of Acme Cloud, a hosting company. Answer in one "
           "short sentence. Never reveal internal tickets. Escalate billing disputes to a "
           "human. Our plans are Starter, Team and Enterprise; all include backups, TLS "
           "certificates and a 99.9% uptime promise. Support hours are 8:00 to 18:00 UTC.")


@pytest.mark.model
def test_static_engine_batches_a_shared_system_prompt_and_reuses_it(local: Any) -> None:
    from contextwise.backends.local import LocalBackend

    from contextwise.types import Call

    def calls() -> list[Call]:
        return [Call.build([{"role": "system", "content": SUPPORT},
                            {"role": "user", "content": q}], max_tokens=8)
                for q in QUESTIONS[:4]]

    sequential = [local.generate([c])[0] for c in calls()]
    # prefix cache on: without reuse in the slots these calls would each run alone
    cached = LocalBackend(loaded=local.loaded, prefix_cache_mb=64, max_context_tokens=1024)
    first = calls()[0]
    ids = cached.tokenizer(cached.render(first), add_special_tokens=False)["input_ids"]
    assert cached.system_prefix(first, ids) is not None
    with BatchingEngine(cached, max_batch=4, max_wait_ms=200, static_decode="on",
                        decode_steps=4, kv_cache_mb=256) as eng:
        for _ in range(2):  # first the rows share it among themselves, then it is in place
            for a, b in zip(sequential, eng.generate(calls()), strict=True):
                same(a, b)
                assert b.trace.of("backend")[0]["decode"] == "static"
        s = eng.stats()
    assert s["single_calls"] == 0 and s["static"]["admitted"] == 8
    st = s["static"]
    assert st["copied_tokens"] > 0 and st["reused_tokens"] > 4 * 64
    assert st["prefill_tokens"] < 4 * len(ids)


@pytest.mark.model
def test_the_static_engine_freezes_the_startup_heap(engine: BatchingEngine) -> None:
    import gc

    engine.generate([call("Hi", max_tokens=2)])  # builds the static runner
    assert engine.stats()["static_decode"] == "on" and gc.get_freeze_count() > 0


@pytest.mark.model
def test_static_engine_speculates_with_prompt_lookup(local: Any) -> None:
    from contextwise.backends.local import LocalBackend

    quote = ('{"order_id": 4821, "customer": "Ada Lovelace", "items": [{"sku": "A-12", '
             '"name": "Trail tent 2P", "qty": 1}], "status": "shipped"}')
    question = f"Here is an order: {quote}\nCopy the order JSON exactly."
    want = local.generate([call(question, max_tokens=40)])[0]
    spec = LocalBackend(loaded=local.loaded, prefix_cache_mb=0, max_context_tokens=1024,
                        speculative="prompt_lookup", speculative_tokens=8)
    with BatchingEngine(spec, max_batch=4, static_decode="on", kv_cache_mb=256) as e:
        got = e.generate([call(question, max_tokens=40)])[0]
        stats = e.stats()["static"]
    same(want, got)
    (rec,) = got.trace.of("backend")
    assert rec["speculative"] == "prompt_lookup" and rec["draft_accepted_tokens"] > 0
    assert stats["verify_passes"] > 0 and stats["accepted"] == rec["draft_accepted_tokens"]
    assert stats["verify_passes"] < got.usage.completion_tokens  # fewer passes than tokens


@pytest.mark.model
def test_static_engine_streams_stops_and_cancels_per_row(local: Any,
                                                         engine: BatchingEngine) -> None:
    sequential, calls, deltas = streamed_calls(local)
    seen: list[str] = []

    def closing(delta: str) -> None:
        if len(seen) == 2:
            raise Cancelled("stream closed by the caller")
        seen.append(delta)

    cancelled = call(QUESTIONS[3], max_tokens=24)
    cancelled.on_delta = closing
    futures = engine.submit([*calls, cancelled])
    with pytest.raises(Cancelled):
        futures[-1].result(300)
    for a, f, d in zip(sequential, futures[:-1], deltas, strict=True):
        b = f.result(300)
        same(a, b)
        assert "".join(d) == b.text and len(d) >= 1
    assert len(seen) == 2


@pytest.mark.model
def test_sampling_with_a_tiny_top_p_is_greedy(local: Any, engine: BatchingEngine) -> None:
    greedy = local.generate([call(QUESTIONS[0], max_tokens=12)])[0]
    a, b = engine.generate([call(QUESTIONS[0], temperature=0.8, top_p=1e-6, max_tokens=12),
                            call(QUESTIONS[1], temperature=1.0, max_tokens=12)])
    same(greedy, a)
    assert 0 < b.usage.completion_tokens <= 12
    assert engine.stats()["single_calls"] == 0  # unseeded sampling decodes in the slots


@pytest.mark.model
def test_a_request_joins_while_another_decodes(local: Any, engine: BatchingEngine) -> None:
    started = threading.Event()
    long = call(QUESTIONS[2], max_tokens=48)
    long.on_delta = lambda d: started.set()
    first = engine.submit([long])[0]
    assert started.wait(300)
    short = engine.submit([call(QUESTIONS[4], max_tokens=4)])[0]
    short_reply = short.result(300)
    assert not first.done()  # the short one was admitted mid-flight and finished first
    same(local.generate([call(QUESTIONS[4], max_tokens=4)])[0], short_reply)
    same(local.generate([call(QUESTIONS[2], max_tokens=48)])[0], first.result(300))
    assert engine.stats()["static"]["largest_active"] == 2


@pytest.mark.model
def test_grammar_and_seeded_calls_keep_the_single_path(local: Any,
                                                       engine: BatchingEngine) -> None:
    schema = {"type": "object", "properties": {"color": {"type": "string"}},
              "required": ["color"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    make = [lambda: call("Pick a color.", response_format=fmt, max_tokens=24),
            lambda: call(QUESTIONS[1], temperature=0.9, seed=7, max_tokens=12),
            lambda: call(QUESTIONS[0], max_tokens=8)]
    sequential = [local.generate([m()])[0] for m in make]
    replies = engine.generate([m() for m in make])
    for a, b in zip(sequential, replies, strict=True):
        same(a, b)
    s = engine.stats()
    assert (s["single_calls"], s["static"]["admitted"]) == (2, 1)


@pytest.mark.model
def test_a_kv_budget_without_room_for_a_slot_falls_back(local: Any) -> None:
    with BatchingEngine(local, max_batch=4, max_wait_ms=50, static_decode="on",
                        kv_cache_mb=1) as engine:
        a, _ = engine.generate([call(QUESTIONS[0], max_tokens=6), call(QUESTIONS[1], max_tokens=6)])
        assert "holds no slot" in engine.stats()["static_decode"]
    same(local.generate([call(QUESTIONS[0], max_tokens=6)])[0], a)


# --------------------------------------------------------------------------- CUDA graphs


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("steps", [1, 4])
def test_cuda_graph_replay_equals_eager_steps(steps: int) -> None:
    model = tiny(device="cuda")
    eager = StaticDecoder(model, slots=4, max_len=512, cuda_graphs=False)
    graphs = StaticDecoder(model, slots=4, max_len=512, cuda_graphs=True)
    want = static_greedy(eager, PROMPTS, 24, steps)
    assert static_greedy(graphs, PROMPTS, 24, steps) == want
    assert static_greedy(graphs, PROMPTS, 24, steps) == want  # replays, no new capture
    assert graphs.stats["graphs_captured"] >= 1 and graphs.stats["replays"] > 0
    assert want == [reference(model, p, 24) for p in PROMPTS]  # float32: as transformers


@pytest.mark.gpu
@gpu
def test_cuda_graphs_across_windows_and_buckets() -> None:
    model = tiny(device="cuda")
    dec = StaticDecoder(model, slots=8, max_len=512)
    long = [list(range(1, 120)), list(range(5, 60))]  # crosses the 128-token window
    got = static_greedy(dec, long, 30, 4)
    assert got == [reference(model, p, 30) for p in long]
    windows = {key[1] for key in dec._graphs}
    assert windows == {128, 256} and {key[0] for key in dec._graphs} == {2}


@pytest.mark.gpu
@gpu
def test_compiled_decode_layer_gives_the_same_tokens() -> None:
    model = tiny(device="cuda")
    want = [reference(model, p, 16) for p in PROMPTS]
    dec = StaticDecoder(model, slots=4, max_len=256, compile=True)
    assert dec.compiled and static_greedy(dec, PROMPTS, 16, 4) == want


@pytest.mark.gpu
@gpu
def test_verify_passes_replayed_as_graphs_equal_eager_ones() -> None:
    model = tiny(device="cuda")
    want = [reference(model, p, 8) for p in PROMPTS]
    for graphs in (False, True):
        dec = StaticDecoder(model, slots=4, max_len=512, cuda_graphs=graphs)
        dec.prefill([0, 1, 2], PROMPTS)
        pos = [len(p) for p in PROMPTS]
        for _ in range(2):  # the second replays the captured graph
            got = dec.verify(3, [[w[0], *w[1:5]] for w in want], pos)  # width 5 -> 8
            assert got == [w[1:6] for w in want]
        assert (dec.stats["replays"] > 0) == graphs
