"""The fused Triton decode kernels (backends/triton_decode.py) and the decoder using them.

On a GPU the kernel tests run directly. Without CUDA they run in Triton's
interpreter, which must be on before triton is first imported:
`test_the_kernels_in_the_interpreter` re-runs this file in a child pytest with
TRITON_INTERPRET=1. The interpreter truncates float32 to bfloat16 (CUDA rounds)
and mis-multiplies bfloat16, so the CPU checks are float32; bfloat16 equality
is a GPU test. `compile_for_gpu` checks that every kernel lowers to an H100
(sm_90) cubin, with no GPU present.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from contextwise.backends.static_decode import StaticDecoder, _decode_layer_for
from pydantic import ValidationError
from test_static_decode import PROMPTS, reference, static_greedy, tiny

from contextwise.errors import InputError
from contextwise.policy import Local

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
INTERPRETED = triton.knobs.runtime.interpret
kernels_run = pytest.mark.skipif(not (CUDA or INTERPRETED),
                                 reason="needs CUDA or Triton's interpreter (run by "
                                 "test_the_kernels_in_the_interpreter)")
DEVICE = "cuda" if CUDA else "cpu"


def tiny32(kind: str = "llama", dtype: Any = None, biases: bool = False) -> Any:
    """A tiny model with head_dim 32 (the kernels need a power of two >= 32); biases: a
    llama with a bias on every linear (attention_bias, mlp_bias)."""
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    extra = {"attention_bias": True, "mlp_bias": True} if biases else {}
    cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=128,
                  max_position_embeddings=512, initializer_range=0.2, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.to(device=DEVICE, dtype=dtype or torch.float32).eval()


def layer_inputs(n: int, positions: list[int], bias: bool, heads: int, kv_heads: int,
                 dtype: Any = torch.float32, d: int = 32, hidden: int = 96,
                 inter: int = 160, slots: int = 4, max_len: int = 512) -> dict[str, Any]:
    torch.manual_seed(0)

    def g(*shape: int) -> Any:
        return (torch.randn(*shape) * 0.2).to(device=DEVICE, dtype=dtype)

    qkv = (heads + 2 * kv_heads) * d
    w = (1 + g(hidden), g(qkv, hidden), g(qkv) if bias else None, g(hidden, heads * d),
         g(hidden) if bias else None, 1 + g(hidden), g(2 * inter, hidden),
         g(2 * inter) if bias else None, g(hidden, inter), g(hidden) if bias else None)
    angles = torch.arange(max_len)[:, None] * (1 / 10000 ** (torch.arange(0, d, 2) / d))[None]
    table = torch.cat([angles, angles], -1)
    return {"x": g(n, hidden), "w": w, "kc": g(slots, kv_heads, max_len, d),
            "vc": g(slots, kv_heads, max_len, d),
            "pos": torch.tensor(positions[:n], device=DEVICE),
            "cos": table.cos().to(device=DEVICE, dtype=dtype),
            "sin": table.sin().to(device=DEVICE, dtype=dtype)}


def torch_layer(a: dict[str, Any], heads: int, kv_heads: int, d: int, window: int) -> tuple:
    layer = _decode_layer_for(heads, kv_heads, d, 1e-5, d ** -0.5)
    kc, vc, pos = a["kc"].clone(), a["vc"].clone(), a["pos"]
    n = len(pos)
    mask = (torch.arange(window, device=DEVICE)[None] <= pos[:, None])[:, None, None, :]
    x = layer(a["x"].clone(), a["w"], kc, vc, torch.arange(n, device=DEVICE), pos,
              a["cos"][pos][:, None], a["sin"][pos][:, None], mask)
    return x, kc, vc


def triton_layer(a: dict[str, Any], heads: int, kv_heads: int, d: int, window: int,
                 tiles: dict[str, int] | None = None) -> tuple:
    from contextwise.backends.triton_decode import TritonLayers

    kc, vc = a["kc"].clone(), a["vc"].clone()
    slots = torch.arange(len(a["pos"]), device=DEVICE)
    x = TritonLayers(heads, kv_heads, d, 1e-5, d ** -0.5, tiles).layer(
        a["x"].clone(), a["w"], kc, vc, a["pos"], a["cos"], a["sin"], window, slots)
    return x, kc, vc


# --------------------------------------------------------------------------- the kernels


@kernels_run
@pytest.mark.parametrize(("n", "positions", "bias", "heads", "kv_heads", "window"), [
    (3, [5, 200, 0], True, 6, 2, 256),      # GQA, biases (qwen2), one attention split
    (3, [5, 200, 0], False, 6, 2, 512),     # two splits: rows x kv heads are few
    (1, [450], True, 4, 4, 512),            # one query head per kv head (MHA)
    (2, [511, 64], False, 8, 1, 512),       # the last position; eight heads on one kv head
])
def test_a_layer_equals_the_torch_layer(n: int, positions: list[int], bias: bool, heads: int,
                                        kv_heads: int, window: int) -> None:
    from contextwise.backends.triton_decode import TritonLayers

    a = layer_inputs(n, positions, bias, heads, kv_heads)
    want_x, want_k, want_v = torch_layer(a, heads, kv_heads, 32, window)
    got_x, got_k, got_v = triton_layer(a, heads, kv_heads, 32, window)
    torch.testing.assert_close(got_x, want_x, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_k, want_k, atol=2e-5, rtol=1e-5)  # the new keys, rotated
    torch.testing.assert_close(got_v, want_v, atol=2e-5, rtol=1e-5)
    splits = TritonLayers(heads, kv_heads, 32, 1e-5, 1.0).splits(n, window)
    assert (splits > 1) == (window == 512)  # rows x kv heads are always few here


@kernels_run
def test_many_attention_splits_some_empty_combine_exactly() -> None:
    from contextwise.backends.triton_decode import TritonLayers

    tiles = {"min_split": 64}
    assert TritonLayers(6, 2, 32, 1e-5, 1.0, tiles).splits(3, 512) == 8
    a = layer_inputs(3, [5, 300, 70], False, 6, 2)  # rows end in splits 0, 4 and 1
    want_x, want_k, _ = torch_layer(a, 6, 2, 32, 512)
    got_x, got_k, _ = triton_layer(a, 6, 2, 32, 512, tiles)
    torch.testing.assert_close(got_x, want_x, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_k, want_k, atol=2e-5, rtol=1e-5)


@kernels_run
@pytest.mark.parametrize("tiles", [
    {"qkv_split": 2, "bk_small": 1024, "stages_small": 1, "warps_small": 2},
    {"bk_small": 64},  # three blocks of the reduction
    {"bk_small": 64, "early": 0},  # the loads after the matmul, the RMS loop not unrolled
    {"early": 2},  # the RMS scale after the matmul (float32: the same up to rounding)
])
def test_small_batch_tiles_and_a_position_major_cache_give_the_same_layer(
        tiles: dict[str, int]) -> None:
    """Two programs per q/k/v head, the reduction in one block or in several, on a cache
    laid out position-major (strides, not shapes, differ)."""
    a = layer_inputs(2, [7, 130], True, 4, 2, d=64)
    want_x, want_k, want_v = torch_layer(a, 4, 2, 64, 256)
    for name in ("kc", "vc"):  # the same values, each position's slots together
        a[name] = a[name].permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    got_x, got_k, got_v = triton_layer(a, 4, 2, 64, 256, tiles)
    assert got_k.stride()[2] == 4 * 2 * 64  # still position-major after the writes
    torch.testing.assert_close(got_x, want_x, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_k, want_k, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_v, want_v, atol=2e-5, rtol=1e-5)


@kernels_run
@pytest.mark.parametrize(("positions", "bias", "heads", "kv_heads"), [
    ([130], True, 6, 2),   # GQA, biases, three key blocks
    ([5], False, 4, 4),    # MHA, one block
])
def test_attention_fused_into_the_o_projection_gives_the_same_layer(
        positions: list[int], bias: bool, heads: int, kv_heads: int) -> None:
    """One row, a short window: `_attend_o` (every program repeats the attention) in
    place of `_attend` + `_matmul_add`."""
    a = layer_inputs(1, positions, bias, heads, kv_heads)
    want_x, want_k, want_v = torch_layer(a, heads, kv_heads, 32, 256)
    got_x, got_k, got_v = triton_layer(a, heads, kv_heads, 32, 256, {"attend_o": 256})
    torch.testing.assert_close(got_x, want_x, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_k, want_k, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_v, want_v, atol=2e-5, rtol=1e-5)


@kernels_run
def test_the_triton_prefill_fills_the_cache_as_the_module_path_does(monkeypatch: Any) -> None:
    from contextwise.backends import static_decode

    model = tiny32("qwen2")
    ref = StaticDecoder(model, slots=4, max_len=256)  # torch kernels: the modules prefill
    dec = StaticDecoder(model, slots=4, max_len=256, kernels="triton", kv_layout="position")
    prompts, slots = [PROMPTS[2], PROMPTS[1]], [3, 0]  # mixed lengths, slots out of order
    want = ref.prefill(slots, prompts)
    torch.testing.assert_close(dec.prefill(slots, prompts), want, atol=1e-4, rtol=1e-4)
    for i in range(2):
        for slot, p in zip(slots, prompts, strict=True):
            for mine, theirs in ((dec.k[i], ref.k[i]), (dec.v[i], ref.v[i])):
                torch.testing.assert_close(mine[slot, :, :len(p)], theirs[slot, :, :len(p)],
                                           atol=1e-5, rtol=1e-5)
    assert dec.kernels == "triton" and "kernels_note" not in dec.stats
    monkeypatch.setattr(static_decode, "TRITON_PREFILL_MAX", 4)  # longer: the modules do it
    torch.testing.assert_close(dec.prefill(slots, prompts), want, atol=1e-4, rtol=1e-4)


@kernels_run
@pytest.mark.parametrize(("kind", "layout"), [("llama", "slot"), ("qwen2", "slot"),
                                              ("llama", "position")])
def test_the_decoder_with_triton_kernels_equals_transformers_greedy(kind: str,
                                                                    layout: str) -> None:
    model = tiny32(kind)
    dec = StaticDecoder(model, slots=4, max_len=512, kernels="triton", kv_layout=layout)
    assert dec.kernels == "triton"
    assert static_greedy(dec, PROMPTS, 12, 3) == [reference(model, p, 12) for p in PROMPTS]


@kernels_run
def test_one_row_with_attention_fused_into_the_o_projection_equals_transformers() -> None:
    model = tiny32()
    dec = StaticDecoder(model, slots=1, max_len=512, kernels="triton")
    dec.triton.tiles["attend_o"] = 256
    for prompt in PROMPTS:
        assert static_greedy(dec, [prompt], 12, 3) == [reference(model, prompt, 12)]
    assert dec.kernels == "triton"


@kernels_run
def test_the_greedy_head_picks_the_first_of_equal_logits_and_skips_a_banned_eos() -> None:
    from contextwise.backends.triton_decode import TritonLayers

    torch.manual_seed(0)
    n, hidden, vocab, eps = 3, 64, 100, 1e-5  # 100: the last block of 64 is partly empty
    x = torch.randn(n, hidden, device=DEVICE)
    norm_w = 1 + 0.1 * torch.randn(hidden, device=DEVICE)
    head_w = 0.2 * torch.randn(vocab, hidden, device=DEVICE)
    h = norm_w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    head_w[3] = head_w[70] = 10 * h[0]  # row 0: two equal largest logits, in two blocks
    layers = TritonLayers(4, 2, 32, eps, 32 ** -0.5)
    for eos, ban, first in ((None, [0, 0, 0], 3), (3, [1, 0, 0], 70), (3, [0, 5, 0], 3)):
        logits = h @ head_w.T
        if eos is not None:
            logits[torch.tensor(ban, device=DEVICE) > 0, eos] = float("-inf")
        want = logits.argmax(-1)  # torch: the first index of the largest
        out = torch.zeros((n, 2), dtype=torch.long, device=DEVICE)
        tokens = torch.zeros(n, dtype=torch.long, device=DEVICE)
        pos = torch.tensor([4, 9, 0], device=DEVICE)
        ban_t = torch.tensor(ban, device=DEVICE)
        layers.greedy_head(x, norm_w, head_w, eos, out[:, 1], tokens, pos, ban_t)
        assert out[:, 1].tolist() == tokens.tolist() == want.tolist()
        assert want[0].item() == first  # 70 when EOS (3), the first of the two, is banned
        assert out[:, 0].tolist() == [0, 0, 0]  # only its column
        assert pos.tolist() == [5, 10, 1] and ban_t.tolist() == [b - 1 for b in ban]


@kernels_run
def test_launched_chunks_pick_greedy_tokens_without_logits() -> None:
    model = tiny32()
    dec = StaticDecoder(model, slots=4, max_len=512, kernels="triton", eos=2)
    slots = list(range(len(PROMPTS)))
    made = [[t] for t in dec.prefill(slots, PROMPTS).argmax(-1).tolist()]
    pos = [len(p) for p in PROMPTS]
    run = dec.launch(len(PROMPTS), [m[-1] for m in made], pos, steps=3)
    for _ in range(3):  # chunks resumed on the device, not restarted from the host
        for row, toks in zip(made, run.tokens(), strict=True):
            row.extend(toks)
        pos = [p + 3 for p in pos]
        run = dec.launch(len(PROMPTS), None, pos, steps=3)
    want = [reference(model, p, 10) for p in PROMPTS]
    assert [m[:10] for m in made] == want and dec.kernels == "triton"


@kernels_run
def test_a_one_prompt_prefill_padded_for_its_graph_leaves_the_same_cache() -> None:
    """The graphed one-prompt prefill pads the prompt to a power of two with rows past
    its end; the logits and the tokens decoded after it are the unpadded prefill's."""
    model = tiny32()
    plain = StaticDecoder(model, slots=4, max_len=512, kernels="triton", cuda_graphs=False)
    padded = StaticDecoder(model, slots=4, max_len=512, kernels="triton", cuda_graphs=False)
    if not CUDA:  # the graph path without a graph: the replay runs the captured function
        padded.cuda_graphs = True
        padded._replay = lambda key, run, inputs: run()  # type: ignore[method-assign]
    else:
        padded = StaticDecoder(model, slots=4, max_len=512, kernels="triton")
    made = {}
    for dec in (plain, padded):
        first = [dec.prefill([slot], [p]) for slot, p in enumerate(PROMPTS)]
        if dec is padded:
            for want, got in zip(made["logits"], first, strict=True):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        tokens = [int(f.argmax(-1)) for f in first]
        out, _ = dec.decode(3, tokens, [len(p) for p in PROMPTS], steps=6)
        made.setdefault("logits", first)
        made[dec is padded] = out.tolist()
    assert made[True] == made[False]
    if CUDA:
        assert {k[1] for k in padded._graphs if k[0] == "prefill"} == {16}


@kernels_run
@pytest.mark.parametrize(("graphed", "limit"), [(False, 1024), (True, 1024), (False, 8)])
def test_a_triton_prefill_after_a_reused_prefix_equals_a_whole_one(
        graphed: bool, limit: int, monkeypatch: Any) -> None:
    """Rows from a prompt's start position on attend over the prefix a slot already
    holds (in place, or copied from another slot); one prompt alone takes the graphed
    path, padded, whose attention window must reach past the start. A prompt longer
    than TRITON_PREFILL_MAX prefills on the modules, and its rest, when short enough
    after a reused prefix, on the kernels."""
    from contextwise.backends import static_decode
    from test_static_decode import SHARED, decode_after

    monkeypatch.setattr(static_decode, "TRITON_PREFILL_MAX", limit)
    model = tiny32()
    dec = StaticDecoder(model, slots=4, max_len=512, kernels="triton", kv_layout="position",
                        cuda_graphs=CUDA and graphed)
    if graphed and not CUDA:  # the graph path without a graph, as above
        dec.cuda_graphs = True
        dec._replay = lambda key, run, inputs: run()  # type: ignore[method-assign]
    on_kernels: list[list[int]] = []
    kernel_prefill = dec._prefill_triton

    def spy(slots: Any, prompts: Any, lengths: Any, starts: Any = None) -> Any:
        on_kernels.append(list(starts or [0]))
        return kernel_prefill(slots, prompts, lengths, starts)

    dec._prefill_triton = spy  # type: ignore[method-assign]
    a, b = SHARED + [50, 51, 52], SHARED[:33] + [60, 61]
    c, d = SHARED + [70, 71], SHARED[:20] + [80]
    whole = StaticDecoder(model, slots=4, max_len=512).prefill([0, 1], [c, d])
    for slot, p in ((0, a), (1, b)):  # one at a time: each one-prompt path
        dec.prefill([slot], [p])
    dec.copy_prefix([(0, 2, 40)])
    got = [dec.prefill([2], [c], starts=[40]), dec.prefill([1], [d], starts=[20])]
    for mine, want in zip(got, whole, strict=True):
        torch.testing.assert_close(mine[0], want, atol=1e-4, rtol=1e-4)
    made = decode_after(dec, [2, 1], [c, d], torch.cat(got), 6)
    assert made == [reference(model, p, 6) for p in (c, d)]
    assert dec.kernels == "triton"
    assert on_kernels == ([[0], [0], [40], [20]] if limit > 43 else [[40], [20]])
    if CUDA and graphed:  # a start moves the graph's attention window past its width
        assert {k[1:] for k in dec._graphs if k[0] == "prefill"} >= {(16, 128), (64, 64)}


@kernels_run
def test_the_runner_reuses_prefixes_on_the_triton_kernels() -> None:
    """Continuous batching with prefix reuse on the kernels (on a GPU: graphed one-prompt
    prefills after a reused prefix, device copies between slots): transformers' tokens."""
    from test_static_decode import SHARED, Req, runner_for

    model = tiny32()
    dec = StaticDecoder(model, slots=4, max_len=512, kernels="triton", kv_layout="position")
    got: dict[tuple[int, ...], list[int]] = {}
    runner = runner_for(dec, got, later=[None, Req(SHARED + [90], 5)])
    first = [SHARED + [60 + i, 70 + i] for i in range(3)]
    runner.run([Req(p) for p in first])  # shared among new rows, then one more copied
    second = [SHARED + [80 + i] for i in range(2)]
    runner.run([Req(p) for p in second])  # in place
    for p in first + second + [SHARED + [90]]:
        assert got[tuple(p)] == reference(model, p, 5 if p[-1] == 90 else 6)
    assert runner.stats["reused_tokens"] > 0 and runner.stats["copied_tokens"] > 0
    assert dec.kernels == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_kernels_under_cuda_graphs_equal_the_torch_kernels(dtype: str,
                                                                  monkeypatch: Any) -> None:
    from contextwise.backends import static_decode

    if dtype == "bfloat16":  # the prefills' bfloat16 roundings differ (cuBLAS and SDPA
        # against the kernels'): a near-tie 20 tokens on flipped. Compare the decode steps.
        monkeypatch.setattr(static_decode, "TRITON_PREFILL_MAX", 0)
    model = tiny32(dtype=getattr(torch, dtype))
    want = static_greedy(StaticDecoder(model, slots=4, max_len=512, cuda_graphs=False),
                         PROMPTS, 24, 4)
    dec = StaticDecoder(model, slots=4, max_len=512, kernels="triton")
    assert dec.kernels == "triton" and static_greedy(dec, PROMPTS, 24, 4) == want
    assert dec.stats["graphs_captured"] >= 1 and "graph_error" not in dec.stats
    if dtype == "bfloat16":  # real shapes: the kernels' bfloat16 arithmetic
        a = layer_inputs(3, [5, 900, 0], True, 9, 3, dtype=torch.bfloat16, d=64, hidden=576,
                         inter=1536, max_len=1024)
        want_x = torch_layer(a, 9, 3, 64, 1024)[0].float()
        got_x = triton_layer(a, 9, 3, 64, 1024)[0].float()
        assert (got_x - want_x).abs().mean() < 0.02 * want_x.abs().mean()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_after_warm_up_no_traffic_shape_compiles_a_kernel() -> None:
    """Row counts, prompt mixes and attention splits vary with the traffic; compiling a
    kernel variant mid-serving stalls every request for seconds."""
    from contextwise.backends.triton_decode import compiled_variants

    model = tiny32(dtype=torch.bfloat16)
    dec = StaticDecoder(model, slots=128, max_len=1024, kernels="triton")
    dec.warm_up()
    before = compiled_variants()
    for rows in (2, 3, 5, 16, 17, 24, 31, 32, 40, 48, 100):  # prefills, 2 prompts each
        a = rows // 2
        dec.prefill([0, 1], [list(range(1, a + 1)), list(range(1, rows - a + 1))])
    dec.prefill([2], [[i % 100 + 1 for i in range(300)]])  # past the graphs' widths
    for n in (1, 2, 4, 8, 16, 32, 64, 128):  # decode buckets, short and long windows
        for pos in (5, 900):
            dec.launch(n, [1] * n, [pos] * n, steps=8).tokens()
    assert dec.kernels == "triton"
    assert compiled_variants() == before


def test_the_kernels_compile_for_an_h100() -> None:
    from contextwise.backends.triton_decode import compile_for_gpu

    if INTERPRETED:
        pytest.skip("the interpreter does not compile")
    h100_shared = 227 * 1024
    for dtype, bm, bn, splits in (("bf16", 16, 16, 4), ("bf16", 64, 64, 1),  # batch 1, 256
                                  ("fp32", 64, 64, 1)):
        kernels = compile_for_gpu(90, dtype, bm=bm, bn=bn, splits=splits)
        assert set(kernels) == {"norm_qkv_rope", "attend", "combine", "attend_o",
                                "matmul_add", "norm_gate_up", "head_argmax", "pick"}
        for name, k in kernels.items():
            assert k["cubin_bytes"] > 0 and k["shared_bytes"] <= h100_shared, (name, k)


def test_chained_kernels_prefetch_their_weights_before_waiting() -> None:
    """With programmatic dependent launch a kernel starts while the one before it runs:
    it may touch only its constants (L2 prefetches of its weights, its bias) before
    `griddepcontrol.wait`, and lets the next kernel start right after that wait."""
    from contextwise.backends.triton_decode import compile_for_gpu

    if INTERPRETED:
        pytest.skip("the interpreter does not compile")
    for bm, bn, splits in ((16, 16, 4), (64, 64, 1)):
        kernels = compile_for_gpu(90, "bf16", bm=bm, bn=bn, splits=splits, pdl=True)
        for name, k in kernels.items():
            lines = k["ptx"].splitlines()
            wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
            launch = next(i for i, line in enumerate(lines)
                          if "griddepcontrol.launch_dependents" in line)
            first_load = next(i for i, line in enumerate(lines) if "ld.global" in line)
            first_store = next(i for i, line in enumerate(lines) if "st.global" in line)
            prefetches = [i for i, line in enumerate(lines) if "prefetch.global.L2" in line]
            copies = [i for i, line in enumerate(lines) if "cp.async.c" in line]
            assert wait < launch and wait < first_store and wait < min(copies, default=wait + 1)
            biased = name in ("norm_qkv_rope", "matmul_add", "norm_gate_up", "attend_o")
            assert (first_load < wait) == biased, name
            if name in ("norm_qkv_rope", "matmul_add", "norm_gate_up", "head_argmax",
                        "attend_o"):
                assert prefetches and max(prefetches) < wait, name
            else:
                assert not prefetches, name


@pytest.mark.slow
@pytest.mark.skipif(CUDA or INTERPRETED, reason="the kernels run directly here")
def test_the_kernels_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", ("layer_equals or decoder_with_triton or attention_splits or small_batch_tiles"
                " or triton_prefill or greedy_head or launched_chunks or padded_for_its_graph")],
        env=env, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(__file__),
        check=False)  # the status is asserted below, with the output
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]


# --------------------------------------------------------------------------- choosing them


def test_a_failing_triton_kernel_hands_over_to_the_torch_kernels(monkeypatch: Any) -> None:
    from contextwise.backends.triton_decode import TritonLayers

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(StaticDecoder, "_triton_unusable", lambda self: None)
    monkeypatch.setattr(TritonLayers, "layer", broken)
    model = tiny32()
    dec = StaticDecoder(model, slots=2, max_len=256, kernels="triton")
    assert dec.kernels == "triton"
    assert static_greedy(dec, PROMPTS[:2], 6, 2) == [reference(model, p, 6) for p in PROMPTS[:2]]
    assert dec.kernels == "torch" and "shared memory" in dec.stats["kernels_note"]


@pytest.mark.skipif(CUDA or INTERPRETED, reason="checks the CPU fallback")
def test_without_cuda_the_decoder_keeps_the_torch_kernels_and_says_why() -> None:
    dec = StaticDecoder(tiny32(), slots=2, max_len=256, kernels="triton")
    assert dec.kernels == "torch" and "need CUDA" in dec.stats["kernels_note"]
    assert static_greedy(dec, PROMPTS[:1], 6, 2) == [reference(dec.model, PROMPTS[0], 6)]


def test_auto_kernels_are_the_torch_ones_off_cuda_or_compiled() -> None:
    if not CUDA:  # (in the interpreter too: auto never picks it)
        assert StaticDecoder(tiny32(), slots=2, max_len=64, kernels="auto").kernels == "torch"
    else:
        assert StaticDecoder(tiny32(), slots=2, max_len=64, kernels="auto").kernels == "triton"
        dec = StaticDecoder(tiny32(), slots=2, max_len=64, kernels="auto", compile=True)
        assert dec.kernels == "torch" and dec.compiled
    dec = StaticDecoder(tiny32(), slots=2, max_len=64)
    assert dec.kv_layout == "slot" and "kernels_note" not in dec.stats


def test_unusual_head_dims_keep_the_torch_kernels() -> None:
    dec = StaticDecoder(tiny(), slots=2, max_len=256, kernels="triton")  # head_dim 16
    assert dec.kernels == "torch" and "kernels_note" in dec.stats
    with pytest.raises(ValueError, match="kernels must be one of"):
        StaticDecoder(tiny(), slots=2, max_len=256, kernels="cuda")


def test_policy_and_engine_validate_decode_kernels(fake_backend: Any) -> None:
    from contextwise.backends.engine import BatchingEngine

    assert Local().decode_kernels == "auto"
    assert Local(compile_decode=True).decode_kernels == "auto"  # auto: torch with compile
    assert Local(decode_kernels="triton").decode_kernels == "triton"
    with pytest.raises(ValidationError, match="pick one"):
        Local(decode_kernels="triton", compile_decode=True)
    with pytest.raises(ValidationError):
        Local(decode_kernels="cuda")
    with pytest.raises(InputError, match="decode_kernels"):
        BatchingEngine(fake_backend, decode_kernels="fast")
