"""The one-row decode step as one persistent Triton kernel (backends/triton_persistent.py).

As test_triton_decode.py: on a GPU the kernel tests run directly; without CUDA
`test_the_persistent_step_in_the_interpreter` re-runs this file in a child pytest with
TRITON_INTERPRET=1 (float32 there). The interpreter runs a grid's programs one after
another, so a grid barrier is met only by one program: there the step runs as one
program, and with several programs one stage a launch (`p_staged`). The barriers
themselves run on a GPU only; `compile_for_gpu` checks their code for an H100.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest
from contextwise.backends.static_decode import StaticDecoder
from test_static_decode import PROMPTS, reference
from test_triton_decode import CUDA, DEVICE, INTERPRETED, kernels_run, tiny32

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

ONE = {"persistent": 1}
STAGED = {"persistent": 1, "p_staged": 1, "p_programs": 3}  # several programs, no barriers
AHEAD = {"persistent": 1, "p_ahead": 1}  # weights loaded a stage early
AT_BARRIER = {"persistent": 1, "p_ahead": 2}  # weights loaded between arrival and wait
FUSED = {"persistent": 1, "p_fuse_mlp": 1}  # gate/up + down in one stage, split-K sums
FUSED_STAGED = {**STAGED, "p_fuse_mlp": 1, "p_ahead": 1}
# a launch a stage, each its units' programs (PDL on a GPU: weights loaded before the wait)
STAGE_LAUNCHES = {"persistent": 1, "p_staged": 1, "p_ahead": 2}


def launched(dec: StaticDecoder, prompt: list[int], n: int, steps: int = 3,
             ban: int | None = None) -> list[int]:
    """n greedy tokens of one prompt in slot 0: prefill, then chunks of `steps` launched
    and resumed on the device, as the engine's runner decodes."""
    made = dec.prefill([0], [prompt]).argmax(-1).tolist()
    pos = len(prompt)
    run = dec.launch(1, made, [pos], steps=steps, ban_eos=None if ban is None else [ban])
    while len(made) < n:
        made.extend(run.tokens()[0])
        pos += steps
        run = dec.launch(1, None, [pos], steps=steps)
    run.tokens()
    return made[:n]


def decoder(model: Any, tiles: dict[str, int], **kwargs: Any) -> StaticDecoder:
    dec = StaticDecoder(model, slots=1, max_len=512, kernels="triton", **kwargs)
    dec.triton.tiles.update(tiles)
    return dec


@kernels_run
@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k/v biases
@pytest.mark.parametrize("tiles", [ONE, STAGED, AHEAD, AT_BARRIER, FUSED, FUSED_STAGED],
                         ids=["one_program", "staged", "ahead", "at_barrier", "fused_mlp",
                              "fused_mlp_staged"])
def test_the_one_row_step_equals_transformers_greedy(kind: str, tiles: dict[str, int]) -> None:
    model = tiny32(kind)
    dec = decoder(model, tiles)
    for prompt in PROMPTS[:1 if tiles.get("p_staged") else 2]:  # (staged: a launch a stage)
        assert launched(dec, prompt, 10) == reference(model, prompt, 10)
    assert dec._one_row is not None and dec._one_row.healthy()
    assert "persistent_note" not in dec.stats


@kernels_run
@pytest.mark.parametrize("tiles", [ONE, FUSED_STAGED], ids=["one_program", "fused_mlp_staged"])
def test_the_one_row_step_adds_every_bias_as_transformers(tiles: dict[str, int]) -> None:
    """A llama with biases on q/k/v, o, gate/up and down (the fused MLP adds the down
    bias in the stage after it)."""
    model = tiny32(biases=True)
    assert model.model.layers[0].mlp.down_proj.bias is not None
    dec = decoder(model, tiles)
    assert launched(dec, PROMPTS[1], 8) == reference(model, PROMPTS[1], 8)
    assert "persistent_note" not in dec.stats


@kernels_run
def test_the_one_row_step_splits_attention_over_a_long_window() -> None:
    """150 cached positions in a 256 window: 4 splits of 64 (the last one empty at
    first), 2 splits at most, and odd unit widths (with weights loaded a stage early):
    the layer kernels' tokens."""
    model = tiny32()
    prompt = [(7 * i + 3) % 128 for i in range(150)]
    want = launched(decoder(model, {}), prompt, 8, steps=4)
    for tiles in ({**STAGED, "p_splits": 8}, {**STAGED, "p_splits": 2, "p_bn": 16, "p_ahead": 1,
                                              "p_bv": 32, "p_bh": 16, "p_bn_mlp": 4},
                  {**FUSED_STAGED, "p_bn_mlp": 16}):
        dec = decoder(model, tiles)
        assert dec.window_for(len(prompt) + 8) == 256
        assert launched(dec, prompt, 8, steps=4) == want
        assert dec._one_row is not None


@kernels_run
def test_the_one_row_step_bans_eos_as_the_layer_kernels_do() -> None:
    model = tiny32()
    prompt = PROMPTS[0]
    free = launched(decoder(model, {}, eos=None), prompt, 6)
    eos = free[2]  # a token greedy decoding picks: banned for the first 4 steps
    want = launched(decoder(model, {}, eos=eos), prompt, 6, ban=4)
    got = launched(decoder(model, ONE, eos=eos), prompt, 6, ban=4)
    assert got == want and eos not in got[1:5]


@kernels_run
def test_a_timed_out_barrier_voids_the_chunk_and_the_decoder_goes_back_to_the_layers() -> None:
    model = tiny32()
    dec = decoder(model, ONE)
    prompt = PROMPTS[0]
    want = reference(model, prompt, 7)
    first = dec.prefill([0], [prompt]).argmax(-1).tolist()
    assert dec.launch(1, first, [len(prompt)], steps=3).tokens()[0] == want[1:4]
    with torch.inference_mode():
        dec._one_row.sync[1] = 1  # as a barrier that gave up leaves it
    pending = dec.launch(1, None, [len(prompt) + 3], steps=3)
    with pytest.raises(RuntimeError, match="grid barrier timed out"):
        pending.tokens()
    assert dec.triton.tiles["persistent"] == 0 and dec._one_row is None
    assert "timed out" in dec.stats["persistent_note"]
    # relaunched from the host on the layer kernels (the void chunk rewrote the cache)
    first = dec.prefill([0], [prompt]).argmax(-1).tolist()
    assert dec.launch(1, first, [len(prompt)], steps=6).tokens()[0] == want[1:7]


@kernels_run
def test_tiles_the_step_cannot_take_leave_the_layer_kernels_and_say_why() -> None:
    model = tiny32()
    for tiles, why in (({**ONE, "p_bn": 12}, "p_bn must be a power of two"),
                       ({**ONE, "p_ahead": 3}, "p_ahead must be 0, 1 or 2"),
                       ({**STAGED, "p_trace": 1}, "p_trace needs the one-launch step"),
                       ({**ONE, "p_programs": 2}, "needs CUDA") if not CUDA else
                       ({**ONE, "p_splits": 3}, "p_splits must be a power of two"),
                       ({**ONE, "p_trace": 1}, "p_trace needs a CUDA GPU") if not CUDA else
                       ({**ONE, "p_trace": 2}, "p_trace must be 0 or 1")):
        dec = decoder(model, tiles)
        assert launched(dec, PROMPTS[1], 5) == reference(model, PROMPTS[1], 5)
        assert dec.triton.tiles["persistent"] == 0 and why in dec.stats["persistent_note"]


def test_the_one_row_step_compiles_for_an_h100() -> None:
    """Its grid barrier is cooperative groups' (one thread's release arrival and acquire
    polls), what other SMs wrote is read from L2, the weights through the pointer table
    in 16-byte loads, the next layer's prefetched: for bf16 and float32, with biases,
    for each order of the weight loads; and as stages launched one by one with PDL, no
    barrier."""
    from contextwise.backends.triton_persistent import compile_for_gpu

    if INTERPRETED:
        pytest.skip("the interpreter does not compile")
    for dtype, bias, ahead in (("bf16", False, 0), ("bf16", False, 2), ("fp32", True, 1)):
        k = compile_for_gpu(90, dtype, bias=bias, tiles={"p_ahead": ahead})
        assert k["cubin_bytes"] > 0 and k["shared_bytes"] <= 227 * 1024
        ptx = k["ptx"]
        # the arrival: a release add whose result goes unused (3.9: red, 3.6: atom)
        assert re.search(r"(red|atom)\.global\.gpu\.release\.add", ptx)
        assert "ld.global.gpu.acquire" in ptx
        assert ptx.count("ld.global.cg") >= 10
        assert ptx.count("ld.global.v4") >= 10  # vectorized weight loads
        assert ptx.count("prefetch.global.L2") >= 5  # the next layer's four, the head
        assert "%globaltimer" not in ptx and "%clock64" not in ptx  # untraced
        assert not re.search(r"(red|atom)\.global\.gpu\.relaxed\.add\.v4\.f32", ptx)
    # the fused MLP: the down projection's shares summed in L2, 4 floats an atomic add
    fused = compile_for_gpu(90, "bf16", tiles={"p_fuse_mlp": 1, "p_ahead": 2})
    assert fused["shared_bytes"] <= 227 * 1024
    assert re.search(r"(red|atom)\.global\.gpu\.relaxed\.add\.v4\.f32", fused["ptx"])
    # the staged form: a kernel a stage, chained with PDL, no barrier; with p_ahead its
    # first unit's weights are loaded before the wait for the launch before, else after
    for ahead, fuse in ((0, 0), (2, 0), (2, 1)):
        for kind in ("qkv", "attend", "o", "gate_up", "down", "head", "pick"):
            ptx = compile_for_gpu(90, "bf16", tiles={"p_ahead": ahead, "p_fuse_mlp": fuse},
                                  stage=kind)["ptx"]
            wait = ptx.index("griddepcontrol.wait")
            assert "acquire" not in ptx and "release" not in ptx  # no grid barrier
            atomics = re.findall(r"(red|atom)\.global\.gpu\.relaxed\.add\.v4\.f32", ptx)
            assert bool(atomics) == (fuse and kind == "gate_up")  # the fused MLP's sums
            if kind in ("qkv", "o", "gate_up", "down", "head"):
                weights = ptx.index("ld.global.v4")
                assert (weights < wait) == bool(ahead), (ahead, kind)
    with pytest.raises(ValueError, match="stage must be one of"):
        compile_for_gpu(90, "bf16", stage="mlp")
    # traced (p_trace): both clocks at the start, at each barrier's arrival and going on
    # past it (the layer loop's 5, the head's and the pick's), and at the end; the SM once
    traced = compile_for_gpu(90, "bf16", tiles={"p_trace": 1})["ptx"]
    stamps = 2 + 2 * (5 + 2) + 1
    assert traced.count("%globaltimer") == traced.count("%clock64") == stamps
    assert traced.count("%smid") == 1


def test_a_trace_adds_up_to_the_step_and_names_each_stage() -> None:
    """trace_summary on a made-up timeline of one layer, two programs (one on SM 3, one
    on SM 7): the barrier before each stage is met 5 ns after its last arrival, each
    stage takes 95 ns from there (the first 105 from the start); the SMs clock 2 GHz."""
    from contextwise.backends.triton_persistent import trace_summary

    stages = 1 * 5 + 2
    raw = torch.zeros((stages + 2, 2, 4), dtype=torch.int64)
    for p in range(2):
        raw[0, p, :2] = p  # the start
        for s in range(1, stages + 1):
            raw[s, p, 0] = 100 * s + 5 * p  # arrival: program 1 last, at +5
            raw[s, p, 1] = 100 * s + 10 + p  # going on: program 0 first, at +10
        raw[:stages + 1, p, 2:] = 2 * raw[:stages + 1, p, :2]
        raw[stages + 1, p, 0] = (3, 7)[p]
    got = trace_summary(raw, layers=1)
    assert got["step_us"] == 0.705 and got["barrier_us"] == 0.03 and got["work_us"] == 0.675
    assert got["barriers"] == stages - 1 and got["programs"] == 2 and got["sms"] == 2
    assert got["sm_ghz"] == 2.0 and got["launch_skew_us"] == 0.001
    # program 1 arrives last and waits 6 ns (12 cycles) at each of the 6 barriers
    assert got["step_cycles"] == 1400 and got["barrier_cycles"] == 6 * 12
    assert list(got["stages"]) == ["qkv", "attend", "o", "gate_up", "down", "head", "pick"]
    assert got["stages"]["qkv"]["work_us"] == 0.105 and got["stages"]["qkv"]["barrier_us"] == 0
    attend = got["stages"]["attend"]
    assert attend["barrier_us"] == 0.005 and attend["work_us"] == 0.095
    assert attend["own_us"] == 0.094 and attend["own_cycles"] == 188  # program 1: 94 ns
    assert attend["barrier_cycles"] == 12
    assert attend["wake_spread_us"] == 0.001 and attend["arrival_spread_us"] == 0.005
    with pytest.raises(ValueError, match=r"a trace of 2 layers is \[14, programs, 4\]"):
        trace_summary(raw, layers=2)
    raw[4] = 0  # the fused MLP: no barrier before the (empty) down stage
    got = trace_summary(raw, layers=1)
    assert list(got["stages"]) == ["qkv", "attend", "o", "mlp", "head", "pick"]
    assert got["barriers"] == 5 and got["stages"]["mlp"]["work_us"] == 0.195
    assert got["step_us"] == 0.705 and got["barrier_us"] == 0.025


@pytest.mark.slow
@pytest.mark.skipif(CUDA or INTERPRETED, reason="the kernels run directly here")
def test_the_persistent_step_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "not interpreter and not compiles and not gpu"], env=env, capture_output=True,
        text=True, timeout=900, cwd=os.path.dirname(__file__), check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tiles", [ONE, AHEAD, AT_BARRIER, FUSED, STAGE_LAUNCHES,
                                   {**STAGE_LAUNCHES, "p_fuse_mlp": 1}],
                         ids=["in_stage", "ahead", "at_barrier", "fused_mlp", "staged_pdl",
                              "staged_pdl_fused_mlp"])
def test_the_one_row_step_on_the_gpu_with_every_sm(dtype: str, tiles: dict[str, int]) -> None:
    """One program per SM, grid barriers (or, staged, a launch a stage chained with
    PDL), CUDA graphs: float32 gives transformers' tokens; bfloat16 the layer kernels'
    first ones (its own summation order rounds differently: a near-tie may part them
    later); every barrier is met."""
    model = tiny32(dtype=getattr(torch, dtype))
    dec = decoder(model, tiles)
    dec.warm_up()
    assert dec.triton.tiles["persistent"] == 1, dec.stats
    layers = decoder(model, {})
    for prompt in PROMPTS:
        got = launched(dec, prompt, 12, steps=4)
        if dtype == "float32":
            assert got == reference(model, prompt, 12)
        else:
            assert got[:5] == launched(layers, prompt, 12, steps=4)[:5]
    assert dec._one_row.programs == torch.cuda.get_device_properties(DEVICE).multi_processor_count
    assert dec._one_row.healthy() and dec.stats["graphs_captured"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tiles", [ONE, FUSED], ids=["five_stages", "fused_mlp"])
def test_a_traced_step_gives_the_same_tokens_and_times_every_barrier(
        tiles: dict[str, int]) -> None:
    model = tiny32(dtype=torch.float32)
    dec = decoder(model, {**tiles, "p_trace": 1})
    prompt = PROMPTS[0]
    assert launched(dec, prompt, 9, steps=4) == reference(model, prompt, 9)
    trace = dec.one_row_trace()
    assert trace is not None and dec._one_row.healthy()
    programs = dec._one_row.programs
    # (the block scheduler puts them on distinct SMs in practice; the tiny model's
    # kernel would fit several an SM, so that is not asserted)
    assert trace["programs"] == programs and 1 <= trace["sms"] <= programs
    stages = 4 if tiles is FUSED else 5
    assert trace["barriers"] == dec._one_row.layers * stages + 1
    assert ("mlp" in trace["stages"]) == (tiles is FUSED)
    assert trace["step_us"] > 0 and trace["sm_ghz"] > 0
    assert abs(trace["barrier_us"] + trace["work_us"] - trace["step_us"]) < 0.01
    assert all(fig["own_cycles"] > 0 for fig in trace["stages"].values())
    untraced = decoder(model, ONE)
    assert launched(untraced, prompt, 5) == reference(model, prompt, 5)
    assert untraced._one_row is not None and untraced.one_row_trace() is None
