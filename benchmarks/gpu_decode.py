"""Static decoding on a GPU: CUDA graphs and continuous batching against plain `generate`.

    python -m benchmarks.gpu_decode --config-dir DIR [--out DIR] [--compile] [--budget-s 420]
        [--tiles persistent=1]

Like benchmarks/gpu_check.py it builds the embedded model's architecture
(SmolLM2-135M's config.json and real tokenizer) with random bf16 weights,
because the GGUF cannot travel to the device machine: the speed figures have
the real model's shapes, the equality checks compare code paths on the same
weights. Every request generates exactly `--new-tokens` tokens (the model's
generation_config.min_new_tokens, which both paths honour). In one process:

1. baseline: plain `model.generate`, batch 1, greedy (`plain_bs1_tok_s`), and
   one left-padded `generate` of all N requests (`plain_256_tok_s`);
2. contender: the batching engine with `static_decode="on"` and its default
   kernels (`decode_kernels="auto"`: the fused Triton kernels on CUDA; static KV
   cache, decode steps replayed as CUDA graphs, `decode_steps` greedy tokens per
   replay, chunks launched one ahead): one request (`gpu_bs1_tok_s`) and N
   concurrent callers (`gpu_256_tok_s`, latency p50/p95), after a warm-up that
   captures the graphs: the median of 3 timed rounds at batch 1, 5 at N (all of
   them in `*_rounds_tok_s`; at N also the kernel variants triton compiled during
   each round, `gpu_256_rounds_compiled_kernels`: 0 after a complete warm-up);
3. the same engine on the PyTorch kernels (`*_torch` keys; --no-torch skips them
   here and below);
   the Triton decoder alone for a few tile settings at batch 1, the one-row
   persistent step among them (`decoder_bs1_triton_sweep`; --no-sweep skips it;
   `decoder_bs1_triton_sweep_agree`: how many leading tokens each variant shares
   with the default tiles', which bf16's near-ties of random weights may part),
   and the persistent step traced: its barriers' and stages' microseconds from
   each program's clocks (`decoder_bs1_persistent_trace`); then the engine at
   batch 1 again, on the sweep's fastest one-row variant that ran as itself
   (`gpu_bs1_tok_s_one_row`, its tiles `gpu_bs1_one_row_tiles`, against the
   default engine's `gpu_bs1_tok_s` of this process: `gpu_bs1_one_row_ratio`);
   --tiles sets tile defaults for the whole run, the engine's too;
4. the decoder alone, each kind of kernels: batch 1 with 8 and 1 steps per
   replay, without graphs, and N rows; the kernel profile of eager steps (the
   Triton one also without programmatic dependent launch, `*_nopdl`, where each
   kernel's time is its own, not overlapped with the next one's start);
5. greedy equality of the static engine (both kernels) against the
   single-request path, in bf16 and in fp32;
6. optional (--compile, time permitting): the decode step compiled by
   torch.compile (inductor) before capture; int8 weights.

Writes gpu_decode.json (flat keys, the card named) to --out after every phase.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the step")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="skip the int8-weights row")
    parser.add_argument("--no-torch", dest="torch_rows", action="store_false",
                        help="skip everything on the PyTorch kernels (engine, decoder, "
                             "profile, greedy check)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the kernel profiles")
    parser.add_argument("--greedy-checks", type=int, default=6,
                        help="requests in the greedy-equality check (the single path "
                             "runs them at ~10 tok/s)")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="optional phases start only before this many seconds")
    parser.add_argument("--tiles", type=tile_settings, default={},
                        help="Triton tile defaults for everything here, the engine "
                             "included: k=v,... (e.g. persistent=1)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="skip the tile sweeps")
    args = parser.parse_args()

    import torch
    import transformers
    from contextwise.backends.loading import load_model
    from contextwise.backends.local import LocalBackend
    from contextwise.backends.static_decode import StaticDecoder
    from transformers.utils import logging as hf_logging

    from benchmarks import backend as bb
    from benchmarks.gpu_check import random_model_dir

    hf_logging.disable_progress_bar()
    if args.tiles:
        from contextwise.backends.triton_decode import DEFAULT_TILES

        DEFAULT_TILES.update(args.tiles)
    t_start = time.perf_counter()
    gpu = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    new = args.new_tokens
    n = args.requests
    out: dict[str, Any] = {
        "gpu_card": torch.cuda.get_device_name(0) if gpu else "cpu (dry run)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "dtype": "bfloat16", "weights": "random (SmolLM2-135M architecture and tokenizer)",
        "new_tokens_per_request": new, "concurrent_requests": n, "tiles": args.tiles,
    }

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_decode.json").write_text(json.dumps(out, indent=2) + "\n")

    folder = random_model_dir(args.config_dir, Path("/tmp/cw-random-model"))
    loaded = load_model(str(folder), device=args.device, dtype="bfloat16")
    plain = LocalBackend(loaded=loaded, prefix_cache_mb=0)
    model = loaded.model
    questions = [bb.QUESTIONS[i % len(bb.QUESTIONS)] + f" (request {i})" for i in range(n)]
    log("model loaded")

    enc = decode_speed(plain, questions, new, out, log, save)
    prompt = enc[0]
    if args.torch_rows:
        other_rows(plain, questions, prompt, new, out, log, save)
    if gpu and args.sweep:
        tile_sweep(model, prompt, new, out, log, save)
        one_row_engine(plain, questions[0], new, out, log, save)

    # 4. the decoder alone: steps per replay, graphs on/off at batch 1; and at N (the
    # engine's figure against it is the engine's own overhead)
    kinds = (("triton", "torch") if args.torch_rows else ("triton",)) if gpu else ("torch",)
    for kernels in kinds:
        for rows, graphs, steps, count in ((1, True, 8, new), (1, True, 1, new),
                                           (1, False, 1, 16), (n, True, 8, new)):
            dec = StaticDecoder(model, slots=rows, max_len=1024, cuda_graphs=graphs,
                                kernels=kernels)
            tag = "bs1" if rows == 1 else "many"
            key = (f"decoder_{tag}_{'graph' if graphs else 'eager'}_steps{steps}"
                   f"{'_torch' if kernels == 'torch' else ''}_tok_s")
            out[key] = decoder_tok_s(dec, prompt, rows, count, steps, sync)
            log(f"{key}: {out[key]}")
            del dec
    save()

    # 4b. where a decode step's GPU time goes: kernels of eager steps (no graph), top 12
    if gpu and args.profile:
        try:
            profile_steps(out, args.out, model, prompt, n, log, kernels="triton")
            profile_steps(out, args.out, model, prompt, n, log, kernels="triton",
                          tiles={"pdl": 0})
            for compiled in (False, True) if args.compile else (False,):
                if args.torch_rows:
                    profile_steps(out, args.out, model, prompt, n, log, compiled)
        except Exception as e:  # noqa: BLE001  (a figure lost, not the run)
            out["profile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        save()

    # 4. greedy equality, static engine against the single-request path
    few = questions[:args.greedy_checks]  # the single path is slow on a GPU (~12 tok/s)
    for dtype, lb in (("bfloat16", plain), ("float32", None)):
        if lb is None:
            lb = LocalBackend(loaded=load_model(str(folder), device=args.device, dtype=dtype),
                              prefix_cache_mb=0)
        seq = [lb.generate([bb.chat(q, 32)])[0].text for q in few]
        variants = [("", {})]
        if args.torch_rows:
            variants.append(("_torch", {"decode_kernels": "torch"}))
        if args.compile:
            variants.append(("_compiled", {"compile_decode": True}))
        for tag, kw in variants:
            eng = engine_for(lb, len(few), **kw)
            got, _, _ = bb.concurrent(eng, few, 32, check=False)
            eng.close()
            same = sum(a == b for a, b in zip(seq, got, strict=True))
            key = f"static{tag}_greedy_identical_{dtype}"
            out[key] = f"{same}/{len(few)}"
            log(f"{key}: {same}/{len(few)}")
    save()

    # 5. optional: compiled decode step; int8 weights
    if args.compile and time.perf_counter() - t_start < args.budget_s:
        with bb.min_new_tokens(model, new):
            for batch, qs, key in ((1, questions[:1], "gpu_bs1_tok_s_compiled"),
                                   (n, questions, "gpu_256_tok_s_compiled")):
                if time.perf_counter() - t_start > args.budget_s:
                    break
                eng = engine_for(plain, batch, compile_decode=True,
                                 kv_cache_mb=1024 if batch == 1 else None)
                _, secs, warm_s = warm_and_time(eng, qs, new, sync)
                out[f"{key}_warmup_s"] = round(warm_s, 1)
                out[key] = round(len(qs) * new / secs, 1)
                eng.close()
                log(f"{key}: {out[key]} (warm-up {out[f'{key}_warmup_s']} s)")
                save()
    if args.int8 and time.perf_counter() - t_start < args.budget_s:
        try:
            q8 = LocalBackend(loaded=load_model(str(folder), device=args.device,
                                                dtype="bfloat16", quantization="int8"),
                              prefix_cache_mb=0)
            with bb.min_new_tokens(q8.model, new):
                eng = engine_for(q8, 1, kv_cache_mb=1024)
                _, secs, _ = warm_and_time(eng, questions[:1], new, sync)
                eng.close()
            out["gpu_bs1_tok_s_int8"] = round(new / secs, 1)
            log(f"static engine bs1 int8: {out['gpu_bs1_tok_s_int8']} tok/s")
        except Exception as e:  # noqa: BLE001  (record it, keep the rest)
            out["int8_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if gpu:
        out["gpu_peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    out["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print(json.dumps(out, indent=2))


def tile_settings(text: str) -> dict[str, int]:
    """--tiles: "k=v,k=v" into {k: int(v)}, each k a tile of TritonLayers."""
    from contextwise.backends.triton_decode import DEFAULT_TILES

    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in DEFAULT_TILES or not value.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(
                f"{item!r}: want k=integer, k one of {', '.join(sorted(DEFAULT_TILES))}")
        out[key] = int(value)
    return out


def decoder_tok_s(dec: Any, prompt: list[int], rows: int, count: int, steps: int,
                  sync: Any, row0: list[int] | None = None) -> float:
    """Tokens/s of `dec` alone: `rows` copies of `prompt` prefilled, then `count` tokens
    each, `steps` per launch (greedy: as the engine decodes, without logits on the Triton
    kernels), each launch waited for; the second of two rounds (the first compiles and
    captures). row0: given, row 0's tokens of that round are put in it."""
    for _ in range(2):
        tokens = dec.prefill(list(range(rows)), [prompt] * rows).argmax(-1).tolist()
        pos, made, first = len(prompt), 0, [tokens[0]]
        sync()
        t0 = time.perf_counter()
        while made < count:
            toks = dec.launch(rows, tokens, [pos] * rows, steps=steps).tokens()
            tokens, pos, made = [t[-1] for t in toks], pos + steps, made + steps
            first.extend(toks[0])
        sync()
    if row0 is not None:
        row0[:] = first
    return round(rows * made / (time.perf_counter() - t0), 1)


def agreeing(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def other_rows(plain: Any, questions: list[str], prompt: list[int], new: int,
               out: dict[str, Any], log: Any, save: Any) -> None:
    """The engine on the PyTorch kernels at batch 1 and N (`*_torch` keys); the default
    engine at N waiting for each chunk's tokens before the next launch
    (`gpu_256_tok_s_no_run_ahead`)."""
    import torch

    from benchmarks import backend as bb

    model = plain.model
    gpu = model.device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    n = len(questions)
    with bb.min_new_tokens(model, new):
        for batch, qs, key in ((1, questions[:1], "gpu_bs1_tok_s_torch"),
                               (n, questions, "gpu_256_tok_s_torch")):
            eng = engine_for(plain, batch, decode_kernels="torch",
                             kv_cache_mb=1024 if batch == 1 else None)
            lat, secs, _ = warm_and_time(eng, qs, new, sync)
            out[key] = round(len(qs) * new / secs, 1)
            if batch > 1:
                out["gpu_256_latency_p50_s_torch"] = round(statistics.median(lat), 3)
            eng.close()
            log(f"{key}: {out[key]}")
            save()
        eng = engine_for(plain, n)
        _, secs, _ = warm_and_time(eng, questions, new, sync, after_warm_up=lambda e: setattr(
            e._runner, "run_ahead", False))  # the warm-up built the runner
        out["gpu_256_tok_s_no_run_ahead"] = round(n * new / secs, 1)
        eng.close()
        log(f"gpu_256_tok_s_no_run_ahead: {out['gpu_256_tok_s_no_run_ahead']}")
        save()


def tiles_name(tiles: dict[str, int]) -> str:
    """A sweep entry's key: its tile settings, as --tiles takes them ("default": none)."""
    return ",".join(f"{k}={v}" for k, v in sorted(tiles.items())) or "default"


def tile_sweep(model: Any, prompt: list[int], new: int, out: dict[str, Any],
               log: Any, save: Any) -> None:
    """The Triton decoder alone for a few tile settings at batch 1, same process (each
    compiles anew: seconds): the layer kernels' and the persistent one-row step's. (The
    256-row target is met; its sweeps are in results/gpu_diag/.)"""
    import torch
    from contextwise.backends.static_decode import StaticDecoder

    variants = (
        {}, {"persistent": 1}, {"persistent": 1, "p_ahead": 1}, {"persistent": 1, "p_ahead": 2},
        {"persistent": 1, "p_fuse_mlp": 1}, {"persistent": 1, "p_fuse_mlp": 1, "p_ahead": 2},
        # a kernel a stage, chained with PDL, weights loaded while a launch waits
        {"persistent": 1, "p_staged": 1, "p_ahead": 2},
        {"persistent": 1, "p_staged": 1, "p_ahead": 2, "p_fuse_mlp": 1},
        {"persistent": 1, "p_staged": 1, "p_ahead": 2, "p_fuse_mlp": 1, "p_bv": 32},
        {"persistent": 1, "p_staged": 1, "p_ahead": 2, "p_fuse_mlp": 1, "p_warps": 4},
        {"persistent": 1, "p_staged": 1},
        {"persistent": 1, "p_fuse_mlp": 1, "p_bn_mlp": 16},
        {"persistent": 1, "p_bv": 32}, {"persistent": 1, "p_warps": 4},
        {"persistent": 1, "p_bn": 16, "p_bn_mlp": 16},
        {"stages_small": 4}, {"attend_o": 256}, {"attend_o": 256, "early": 2, "stages_small": 4})
    sweep: dict[str, float] = {}
    agree: dict[str, int] = {}  # leading tokens equal to the default's (bf16: near-ties part)
    reference: list[int] = []
    for tiles in variants:
        dec = StaticDecoder(model, slots=1, max_len=1024, kernels="triton")
        if dec.triton is None:
            out["triton_note"] = dec.stats.get("kernels_note")
            return
        dec.triton.tiles.update(tiles)
        name = tiles_name(tiles)
        made: list[int] = []
        try:
            sweep[name] = decoder_tok_s(dec, prompt, 1, new, 8, torch.cuda.synchronize, made)
        except Exception as e:  # noqa: BLE001  (e.g. a barrier that timed out: a figure lost)
            out.setdefault("decoder_bs1_triton_sweep_errors", {})[name] = (
                f"{type(e).__name__}: {str(e)[:300]}")
            log(f"triton decoder x1 {name}: {type(e).__name__}: {str(e)[:300]}")
            del dec
            continue
        reference = reference or made  # the first variant's: the default tiles
        agree[name] = agreeing(made, reference)
        log(f"triton decoder x1 {name}: {sweep[name]} tok/s, {agree[name]}/{len(made)} "
            "tokens as the default's")
        if tiles.get("persistent") and "persistent_note" in dec.stats:
            # it fell back: the figure is the layer kernels', say so
            out.setdefault("decoder_bs1_triton_sweep_notes", {})[name] = (
                dec.stats["persistent_note"])
            log(f"  {dec.stats['persistent_note']}")
        del dec
        out["decoder_bs1_triton_sweep"] = sweep  # saved as it goes: a timeout keeps the rest
        out["decoder_bs1_triton_sweep_agree"] = agree
        save()
    # where the persistent step's time goes: each program's clocks at each grid barrier
    traces: dict[str, Any] = {}
    for fuse in (0, 1):  # five stages a layer; gate/up and down as one
        tiles = {"persistent": 1, "p_trace": 1, "p_fuse_mlp": fuse}
        name = tiles_name(tiles)
        try:
            dec = StaticDecoder(model, slots=1, max_len=1024, kernels="triton")
            assert dec.triton is not None
            dec.triton.tiles.update(tiles)
            speed = decoder_tok_s(dec, prompt, 1, new, 8, torch.cuda.synchronize)
            trace = dec.one_row_trace() or {"note": dec.stats.get("persistent_note")}
            del dec
        except Exception as e:  # noqa: BLE001  (a diagnosis lost, not the run)
            traces[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        traces[name] = {"tok_s": speed, **trace}
        log(f"traced {name}: {speed} tok/s, " + (
            f"step {trace['step_us']} us = barriers {trace['barrier_us']} + work "
            f"{trace['work_us']}" if "step_us" in trace else f"fell back: {trace['note']}"))
        out["decoder_bs1_persistent_trace"] = traces
        save()


def fastest_one_row(out: dict[str, Any]) -> str | None:
    """The sweep's fastest one-row variant ("k=v,..." as --tiles takes it) among those
    that ran as themselves (no fallback to the layer kernels, no error), or None."""
    sweep = out.get("decoder_bs1_triton_sweep", {})
    lost = {**out.get("decoder_bs1_triton_sweep_notes", {}),
            **out.get("decoder_bs1_triton_sweep_errors", {})}
    ran = {name: speed for name, speed in sweep.items()
           if "persistent=1" in name.split(",") and name not in lost}
    return max(ran, key=ran.__getitem__) if ran else None


def one_row_engine(plain: Any, question: str, new: int, out: dict[str, Any], log: Any,
                   save: Any) -> None:
    """The engine at batch 1 on the sweep's fastest one-row variant, in the process that
    measured the default engine (`gpu_bs1_tok_s`): the figure that decides whether the
    one-row step becomes the default. The median of 3 rounds, as the default's."""
    import torch
    from contextwise.backends.triton_decode import DEFAULT_TILES

    from benchmarks import backend as bb

    best = fastest_one_row(out)
    if best is None:
        log("no one-row variant ran as itself: engine not rerun")
        return
    saved = dict(DEFAULT_TILES)
    DEFAULT_TILES.update(tile_settings(best))  # the engine's decoder reads them when made
    try:
        with bb.min_new_tokens(plain.model, new):
            tok_s, rounds, stats = bs1_engine(plain, question, new, torch.cuda.synchronize)
    except Exception as e:  # noqa: BLE001  (a figure lost, not the run)
        out["gpu_bs1_one_row_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"engine on {best}: {out['gpu_bs1_one_row_error']}")
        return
    finally:
        DEFAULT_TILES.clear()
        DEFAULT_TILES.update(saved)
    out["gpu_bs1_one_row_tiles"] = best
    out["gpu_bs1_tok_s_one_row"], out["gpu_bs1_one_row_rounds_tok_s"] = tok_s, rounds
    note = (stats or {}).get("persistent_note")
    if note:  # it fell back during the rounds: not the step's figure
        out["gpu_bs1_one_row_note"] = note
    if out.get("gpu_bs1_tok_s"):
        out["gpu_bs1_one_row_ratio"] = round(tok_s / out["gpu_bs1_tok_s"], 3)
    log(f"static engine bs1 on {best}: {tok_s} tok/s "
        f"(x{out.get('gpu_bs1_one_row_ratio')} the default's)" + (f"; {note}" if note else ""))
    save()


def warm_and_time(eng: Any, qs: list[str], new: int, sync: Any, after_warm_up: Any = None,
                  rounds: int = 1, times: list[float] | None = None,
                  compiles: list[int] | None = None) -> tuple[list[float], float, float]:
    """(latencies, seconds, warm-up seconds) of `qs` through `eng`, timed after one
    warm-up round (it compiles and captures the graphs; `after_warm_up(eng)` runs then):
    the median of `rounds` timed rounds (each round's seconds appended to `times`, the
    kernel variants it compiled to `compiles`; runs of the same code vary by several
    percent on a lent GPU host)."""
    from contextwise.backends.triton_decode import compiled_variants

    from benchmarks import backend as bb

    t0 = time.perf_counter()
    bb.concurrent(eng, qs, new)
    warm_s = time.perf_counter() - t0
    if after_warm_up is not None:
        after_warm_up(eng)
    runs = []
    for _ in range(rounds):
        sync()
        before = compiled_variants()
        _, lat, secs = bb.concurrent(eng, qs, new)
        runs.append((secs, lat))
        if compiles is not None:
            compiles.append(compiled_variants() - before)
    if times is not None:
        times.extend(secs for secs, _ in runs)
    secs, lat = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    return lat, secs, warm_s


def bs1_engine(plain: Any, question: str, new: int, sync: Any,
               **engine_kw: Any) -> tuple[float, list[float], dict[str, Any] | None]:
    """The engine at batch 1 (`engine_kw` to its BatchingEngine; the caller sets
    min_new_tokens): tokens/s, the median of 3 timed rounds; each round's; its static
    decoder's stats."""
    eng = engine_for(plain, 1, kv_cache_mb=1024, **engine_kw)
    times: list[float] = []
    _, secs, _ = warm_and_time(eng, [question], new, sync, rounds=3, times=times)
    stats = eng.stats().get("static")
    eng.close()
    return round(new / secs, 1), [round(new / t, 1) for t in times], stats


def engine_for(backend: Any, batch: int, **kw: Any) -> Any:
    """A batching engine with static decoding on, room for 1,024 waiting requests."""
    from contextwise.backends.engine import BatchingEngine

    return BatchingEngine(backend, max_batch=batch, max_wait_ms=20, max_queue=1024,
                          static_decode="on", **kw)


def decode_speed(plain: Any, questions: list[str], new: int, out: dict[str, Any], log: Any,
                 save: Any, **engine_kw: Any) -> list[list[int]]:
    """Baselines (plain generate at batch 1 and one padded generate of all requests) and
    the static engine (one request; all of them concurrently; `engine_kw` go to its
    BatchingEngine) into `out`; returns the requests' prompt ids."""
    import torch
    from contextwise.backends.local import left_padded

    from benchmarks import backend as bb

    model, tok = plain.model, plain.tokenizer
    n = len(questions)
    gpu = model.device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    # 1. baselines: plain generate at batch 1 (few tokens: it is slow)
    bb.plain_generate(plain, questions[:1], 4, check=False)
    base_new = min(new, 32)
    with bb.min_new_tokens(model, base_new):
        _, _, secs = bb.plain_generate(plain, questions[:1], base_new)
    out["plain_bs1_tok_s"] = round(base_new / secs, 1)
    log(f"plain generate bs1: {out['plain_bs1_tok_s']} tok/s")
    save()

    # 2. the static engine: batch 1, then n concurrent callers
    with bb.min_new_tokens(model, new):
        out["gpu_bs1_tok_s"], out["gpu_bs1_rounds_tok_s"], out["gpu_bs1_stats"] = bs1_engine(
            plain, questions[0], new, sync, **engine_kw)
        log(f"static engine bs1: {out['gpu_bs1_tok_s']} tok/s")
        save()
        eng = engine_for(plain, n, **engine_kw)
        times, compiles = [], []
        lat, secs, _ = warm_and_time(eng, questions, new, sync, rounds=5, times=times,
                                     compiles=compiles)
        out.update({
            "gpu_256_tok_s": round(n * new / secs, 1),  # the median of 5 rounds
            "gpu_256_rounds_tok_s": [round(n * new / t, 1) for t in times],
            "gpu_256_rounds_compiled_kernels": compiles,
            "gpu_256_latency_p50_s": round(statistics.median(lat), 3),
            "gpu_256_latency_p95_s": round(bb.percentile(lat, 95), 3),
            "gpu_256_latency_max_s": round(max(lat), 3),
            "gpu_256_stats": eng.stats().get("static"),
        })
        eng.close()
        del eng
        log(f"static engine {n} concurrent: {out['gpu_256_tok_s']} tok/s")
        save()

        # the baseline for n: one left-padded generate of all n prompts
        enc = [tok(plain.render(bb.chat(q)), add_special_tokens=False)["input_ids"]
               for q in questions]
        pad = tok.pad_token_id
        ids, mask = (t.to(model.device) for t in left_padded(enc, pad))
        width = ids.shape[1]
        with torch.inference_mode():
            model.generate(input_ids=ids[:8], attention_mask=mask[:8], max_new_tokens=4,
                           do_sample=False, pad_token_id=pad)
            sync()
            t0 = time.perf_counter()
            res = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                 do_sample=False, pad_token_id=pad)
            sync()
        secs = time.perf_counter() - t0
        assert res.shape[1] - width == new
    out["plain_256_tok_s"] = round(n * new / secs, 1)
    out["gpu_256_speedup"] = round(out["gpu_256_tok_s"] / out["plain_256_tok_s"], 2)
    out["gpu_bs1_speedup"] = round(out["gpu_bs1_tok_s"] / out["plain_bs1_tok_s"], 2)
    log(f"plain padded generate x{n}: {out['plain_256_tok_s']} tok/s")
    save()
    return enc


def profile_steps(out: dict[str, Any], folder: Path, model: Any, prompt: list[int], n: int,
                  log: Any, compiled: bool = False, kernels: str = "torch",
                  tiles: dict[str, int] | None = None) -> None:
    """Kernels of three eager decode steps (no graph) at batch 1 and n: the top 12 by GPU
    time (`tiles`: Triton tile settings, {"pdl": 0} tagged `_nopdl`)."""
    import torch
    from contextwise.backends.static_decode import StaticDecoder
    from torch.profiler import ProfilerActivity, profile

    for rows in (1, n):
        dec = StaticDecoder(model, slots=rows, max_len=1024, cuda_graphs=False,
                            compile=compiled, kernels=kernels)
        if tiles and dec.triton is not None:
            dec.triton.tiles.update(tiles)
        dec.warm_up()
        dec.prefill(list(range(rows)), [prompt] * rows)
        args_ = (rows, [1] * rows, [len(prompt)] * rows)
        dec.decode(*args_)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                dec.decode(*args_)
            torch.cuda.synchronize()
        events = prof.key_averages()
        tag = (f"profile{'_compiled' if compiled else ''}"
               f"{'_triton' if kernels == 'triton' else ''}"
               f"{'_nopdl' if tiles == {'pdl': 0} else ''}_n{rows}")
        (folder / f"{tag}.txt").write_text(
            events.table(sort_by="self_device_time_total", row_limit=12))
        total = sum(e.self_device_time_total for e in events) / 3
        out[f"{tag}_step_gpu_ms"] = round(total / 1e3, 3)
        out[f"{tag}_kernels_per_step"] = round(
            sum(e.count for e in events if e.self_device_time_total > 0) / 3)
        log(f"{tag}: {out[f'{tag}_step_gpu_ms']} ms GPU per step, "
            f"{out[f'{tag}_kernels_per_step']} kernels")
        del dec


if __name__ == "__main__":
    main()
