"""GPU checks and figures in one run, for a lent GPU machine.

    python -m benchmarks.gpu_check --config-dir DIR [--out DIR] [--requests 256]

The embedded model's GGUF (94 MiB) cannot travel to the device machine (it takes
64 MiB per call, and nothing there reaches a model hub), so this builds the same
architecture (the converted SmolLM2-135M's config.json, its real tokenizer) with
random weights, in bf16 on CUDA. Speed figures therefore have the real model's
shapes; the equality checks compare two code paths on the same weights (random
weights give flatter logits than trained ones, so near-ties are likelier: a
mismatch here is a float-level difference, not a logic error, and is counted).

Measures, in one process:
- batch-1 greedy decode tokens/s of plain `generate` (`gpu_bs1_tok_s`) and the
  batching engine's aggregate tokens/s for N concurrent requests (`gpu_256_tok_s`),
  128 new tokens each;
- the prefix KV cache: time to first token with and without it for the
  1,544-token system part of benchmarks/prefix_cache.py, and whether greedy
  outputs are identical;
- batched (engine) against sequential greedy outputs, in bf16 and in fp32;
- each quantization mode: weight bytes and batch-1 decode speed (fp8 needs Hopper).
Writes `gpu_check.json` (flat keys, the card named) to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json", "config.json")


def random_model_dir(config_dir: Path, target: Path) -> Path:
    """A model folder with config_dir's architecture and tokenizer, random bf16 weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    config.initializer_range = 0.2  # peakier logits than the default 0.02: fewer exact ties
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (config_dir / name).is_file() and name != "config.json":
            shutil.copy(config_dir / name, target / name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", required=True, type=Path,
                        help="config.json + tokenizer files of the model to imitate")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (dry runs)")
    args = parser.parse_args()

    import torch
    import transformers
    from contextwise.backends.engine import BatchingEngine
    from contextwise.backends.loading import load_model
    from contextwise.backends.local import LocalBackend
    from transformers.utils import logging as hf_logging

    from benchmarks import backend as bb
    from benchmarks import prefix_cache as pc

    hf_logging.disable_progress_bar()
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (or --device cpu for a dry run)")
    new_tokens = 8 if args.quick else bb.NEW_TOKENS
    n_equal = 4 if args.quick else 16
    prefix_questions = pc.QUESTIONS[:3] if args.quick else pc.QUESTIONS
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    out: dict[str, Any] = {
        "gpu_card": torch.cuda.get_device_name(0) if gpu else "cpu (dry run)",
        "torch": torch.__version__,
        "transformers": transformers.__version__, "dtype": "bfloat16",
        "weights": "random (SmolLM2-135M architecture and tokenizer)",
    }
    folder = random_model_dir(args.config_dir, Path("/tmp/cw-random-model"))
    loaded = load_model(str(folder), device=args.device, dtype="bfloat16")
    plain = LocalBackend(loaded=loaded, prefix_cache_mb=0)
    cached = LocalBackend(loaded=loaded, prefix_cache_mb=1024)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # 1. decode speed: plain generate at batch 1, the engine with N concurrent callers
    questions = [bb.QUESTIONS[i % len(bb.QUESTIONS)] + f" (request {i})"
                 for i in range(args.requests)]
    engine = BatchingEngine(plain, max_batch=args.requests, max_wait_ms=5,
                            max_queue=2 * args.requests)
    bb.plain_generate(plain, questions[:1], 8, check=False)
    bb.concurrent(engine, questions[:8], 8, check=False)
    sync()
    with bb.min_new_tokens(loaded.model, new_tokens):
        _, _, bs1_s = bb.plain_generate(plain, questions[:1], new_tokens)
        _, lat, many_s = bb.concurrent(engine, questions, new_tokens)
        sync()
    out.update({
        "new_tokens_per_request": new_tokens,
        "gpu_bs1_tok_s": round(new_tokens / bs1_s, 1),
        "gpu_concurrent_requests": args.requests,
        "gpu_256_tok_s": round(args.requests * new_tokens / many_s, 1),
        "gpu_256_latency_p50_s": round(statistics.median(lat), 2),
        "gpu_256_latency_p95_s": round(bb.percentile(lat, 95), 2),
    })
    log(f"decode: bs1 {out['gpu_bs1_tok_s']} tok/s, {args.requests} concurrent "
        f"{out['gpu_256_tok_s']} tok/s")

    # 2. batched vs sequential greedy equality (16 prompts, 32 tokens)
    few = questions[:n_equal]
    seq = [plain.generate([bb.chat(q, 32)])[0].text for q in few]
    bat, _, _ = bb.concurrent(engine, few, 32, check=False)
    out["engine_greedy_identical"] = sum(a == b for a, b in zip(seq, bat, strict=True))
    out["engine_greedy_compared"] = len(few)
    engine.close()
    log(f"engine equality: {out['engine_greedy_identical']}/{len(few)}")

    # 3. prefix KV cache: ttft and greedy equality on a 1,544-token system part
    for q in prefix_questions[:2]:  # warm both paths (kernels, allocator)
        pc.timed(plain, q)
        pc.timed(cached, q)
    without, with_ = [], []
    for q in prefix_questions:
        without.append(pc.timed(plain, q))
        sync()
        with_.append(pc.timed(cached, q))
        sync()
    same = 0
    for q in prefix_questions:
        a = plain.generate([pc.call(q, max_tokens=32)])[0]
        b = cached.generate([pc.call(q, max_tokens=32)])[0]
        same += pc.answer(a) == pc.answer(b)
    prefix_tokens = len(cached.system_prefix(pc.call(pc.QUESTIONS[0]), plain.tokenizer(
        plain.render(pc.call(pc.QUESTIONS[0])), add_special_tokens=False)["input_ids"]) or ())
    out.update({
        "prefix_tokens": prefix_tokens,
        "gpu_ttft_ms_uncached_p50": round(statistics.median(without) * 1e3, 2),
        "gpu_ttft_ms_cached_p50": round(statistics.median(with_) * 1e3, 2),
        "gpu_ttft_speedup": round(statistics.median(without) / statistics.median(with_), 2),
        "gpu_prefix_outputs_identical": same,
        "gpu_prefix_outputs_compared": len(prefix_questions),
        "gpu_peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if gpu else 0,
    })
    log(f"prefix: ttft {out['gpu_ttft_ms_uncached_p50']} -> {out['gpu_ttft_ms_cached_p50']} ms, "
        f"identical {same}/{len(prefix_questions)}")
    # 4. the same two equality checks in fp32: are the bf16 differences rounding?
    if not args.quick or not gpu:
        loaded32 = load_model(str(folder), device=args.device, dtype="float32")
        plain32 = LocalBackend(loaded=loaded32, prefix_cache_mb=0)
        cached32 = LocalBackend(loaded=loaded32, prefix_cache_mb=1024)
        same32 = sum(pc.answer(plain32.generate([pc.call(q, max_tokens=32)])[0])
                     == pc.answer(cached32.generate([pc.call(q, max_tokens=32)])[0])
                     for q in prefix_questions)
        engine32 = BatchingEngine(plain32, max_batch=len(few), max_wait_ms=5)
        seq32 = [plain32.generate([bb.chat(q, 32)])[0].text for q in few]
        bat32, _, _ = bb.concurrent(engine32, few, 32, check=False)
        engine32.close()
        out["fp32_prefix_outputs_identical"] = same32
        out["fp32_engine_greedy_identical"] = sum(
            a == b for a, b in zip(seq32, bat32, strict=True))
        log(f"fp32: prefix identical {same32}/{len(prefix_questions)}, engine "
            f"{out['fp32_engine_greedy_identical']}/{len(few)}")

    # 5. quantization modes on this device: weight bytes and batch-1 decode speed
    try:
        from contextwise.backends.quantize import weight_bytes
    except ImportError as e:  # the module or torchao missing: say so, go on
        out["quantization_error"] = f"{type(e).__name__}: {e}"
    else:
        out["weight_bytes_bf16"] = weight_bytes(loaded.model)
        for mode in ("int8", "int8-dynamic", "int4", "fp8"):
            key = mode.replace("-", "_")
            try:
                q = load_model(str(folder), device=args.device, dtype="bfloat16",
                               quantization=mode)
                qb = LocalBackend(loaded=q, prefix_cache_mb=0)
                with bb.min_new_tokens(q.model, 32):
                    bb.plain_generate(qb, questions[:1], 8, check=False)
                    _, _, secs = bb.plain_generate(qb, questions[:1], 32, check=False)
                out[f"weight_bytes_{key}"] = weight_bytes(q.model)
                out[f"bs1_tok_s_{key}"] = round(32 / secs, 1)
            except Exception as e:  # noqa: BLE001  (a mode this device cannot run: record it)
                out[f"error_{key}"] = f"{type(e).__name__}: {str(e)[:200]}"
            log(f"quantization {mode}: {out.get(f'bs1_tok_s_{key}', out.get(f'error_{key}'))}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
