"""Local backend throughput: the batching engine against plain `model.generate`.

    python -m benchmarks.backend                  # CPU: 16 concurrent requests
    python -m benchmarks.backend --quantization   # also benchmarks/quantization.py's keys
    python -m benchmarks.backend --gpu            # also the GPU figures (CUDA only)
    python -m benchmarks.backend --no-cpu --gpu   # the GPU figures alone
    python -m benchmarks.backend --no-cpu --gpu --decode-kernels triton

CPU (the embedded SmolLM2-135M-Instruct, fp32, on the CPU even where a GPU
exists): 16 chat requests, each a different short question, greedy, 128 new
tokens each.

- EOS is ignored so that every request really generates 128 tokens: the
  benchmark sets `model.generation_config.min_new_tokens = 128` for its
  duration (transformers then masks EOS until 128 new tokens), which both
  paths read; `max_tokens` / `max_new_tokens` = 128 caps them. Every reply's
  token count is checked.
- baseline: the 16 requests one after another through plain
  `model.generate` at batch 1 (the prompt rendered as the backend renders it);
- contender: a `BatchingEngine` (max_batch=16, max_wait_ms=5) over a
  `LocalBackend`, 16 threads calling `engine.generate` at once; and the same
  with `static_decode="on"` (continuous batching on a static KV cache, off by
  default on CPU), `static_engine_*` keys.

Both run in this process, contender first, after a warm-up of each. Tokens/s
is all new tokens over the wall time from the first request to the last reply.
A request's latency is the time from the common start until its reply: for the
baseline, as if the 16 had arrived together and were served in turn. The
greedy texts of both paths are compared row by row (`greedy_identical_rows`).

Writes benchmarks/results/backend.json (flat keys; `--quantization` merges in
the keys of `benchmarks.quantization.run_quantization()`, another module) and,
with `--gpu`, benchmarks/results/backend_gpu.json naming the card: batch-1
greedy decode tokens/s of the engine's static decoding in bf16 (`gpu_bs1_tok_s`)
and its aggregate tokens/s for 256 concurrent requests (`gpu_256_tok_s`), each
next to plain `generate` measured in the same process (`plain_bs1_tok_s`, and
`plain_256_tok_s` for one padded generate of all 256) and the ratios. The GPU
part never runs without `--gpu`; benchmarks/gpu_decode.py runs the same with
random weights where the model file can't travel.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from contextwise.backends.engine import BatchingEngine
from contextwise.backends.loading import load_model
from contextwise.backends.local import LocalBackend
from rich.console import Console
from rich.table import Table

from benchmarks.common import RESULTS, chat, write_results
from contextwise.types import Reply

REQUESTS = 16
STATIC_KV_MB = 768  # 16 slots of 1,024 tokens in fp32 (the prompts are ~40 tokens)
NEW_TOKENS = 128
GPU_REQUESTS = 256

QUESTIONS = [
    "What is the capital of France?", "Name three colors.", "Write a haiku about rain.",
    "How do I boil an egg?", "What is 2+2?", "Tell me a joke about cats.",
    "Why is the sky blue?", "Give me a tip for learning Python.",
    "Summarize Romeo and Juliet in one sentence.", "What's a good name for a goldfish?",
    "List two benefits of exercise.", "Translate 'good morning' into Spanish.",
    "Explain photosynthesis simply.", "At what temperature does water boil?",
    "Suggest a weekend hobby.", "Describe a sunset in three words.",
]


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


@contextmanager
def min_new_tokens(model: Any, n: int) -> Any:
    """Mask EOS until `n` new tokens, on every generate of `model` (both paths)."""
    old = model.generation_config.min_new_tokens
    model.generation_config.min_new_tokens = n
    try:
        yield
    finally:
        model.generation_config.min_new_tokens = old


def plain_generate(backend: LocalBackend, questions: list[str], new_tokens: int,
                   check: bool = True) -> tuple[list[str], list[float], float]:
    """(texts, latencies since the common start, wall time): batch 1, one after another."""
    import torch

    tok, model = backend.tokenizer, backend.model
    texts, latencies = [], []
    t0 = time.perf_counter()
    for q in questions:
        enc = tok(backend.render(chat(q)), return_tensors="pt", add_special_tokens=False)
        enc = enc.to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        assert not check or len(new) == new_tokens, f"baseline generated {len(new)} tokens, not {new_tokens}"
        texts.append(tok.decode(new, skip_special_tokens=True))
        latencies.append(time.perf_counter() - t0)
    return texts, latencies, time.perf_counter() - t0


def concurrent(engine: BatchingEngine, questions: list[str], new_tokens: int,
               check: bool = True) -> tuple[list[str], list[float], float]:
    """(texts, latencies since the common start, wall time): one thread per request."""

    def ask(i: int) -> Reply:
        reply = engine.generate([chat(questions[i], new_tokens)])[0]
        assert not check or reply.usage.completion_tokens == new_tokens, (
            f"engine generated {reply.usage.completion_tokens} tokens, not {new_tokens}")
        return reply

    replies, latencies, secs = concurrent_calls(ask, len(questions))
    return [r.text for r in replies], latencies, secs


def concurrent_calls(ask: Callable[[int], Reply], n: int) -> tuple[list[Reply], list[float],
                                                                  float]:
    """(replies, latencies since the common start, wall time) of `ask(i)` for i < n, one
    thread each, all released together; the first error is raised here."""
    replies: list[Any] = [None] * n
    latencies = [0.0] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n + 1)
    start: list[float] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            replies[i] = ask(i)
            latencies[i] = time.perf_counter() - start[0]
        except BaseException as e:  # noqa: BLE001  (re-raised below, in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.append(time.perf_counter())
    barrier.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return replies, latencies, time.perf_counter() - start[0]


def cpu_benchmark() -> dict[str, Any]:
    import torch

    loaded = load_model("smollm2-135m-instruct", device="cpu")
    backend = LocalBackend(loaded=loaded)
    engine = BatchingEngine(backend, max_batch=REQUESTS, max_wait_ms=5, max_queue=256)
    questions = QUESTIONS[:REQUESTS]
    # warm-up: first-use costs out of the way, and the engine has seen a full batch
    plain_generate(backend, questions[:1], 4, check=False)
    concurrent(engine, questions, 4, check=False)
    # the same engine with static decoding (continuous batching; off by default on CPU)
    static = BatchingEngine(backend, max_batch=REQUESTS, max_wait_ms=5, max_queue=256,
                            static_decode="on", kv_cache_mb=STATIC_KV_MB)
    concurrent(static, questions, 4, check=False)
    with min_new_tokens(loaded.model, NEW_TOKENS):
        engine_texts, engine_lat, engine_s = concurrent(engine, questions, NEW_TOKENS)
        static_texts, static_lat, static_s = concurrent(static, questions, NEW_TOKENS)
        base_texts, base_lat, base_s = plain_generate(backend, questions, NEW_TOKENS)
    stats = engine.stats()
    static_stats = static.stats()["static"]
    engine.close()
    static.close()
    total = REQUESTS * NEW_TOKENS
    return {
        "static_engine_tok_s": round(total / static_s, 1),
        "static_engine_speedup": round(base_s / static_s, 2),
        "static_engine_latency_p50_s": round(statistics.median(static_lat), 2),
        "static_engine_latency_p95_s": round(percentile(static_lat, 95), 2),
        "static_engine_slots": static_stats["slots"],
        "static_engine_slot_tokens": static_stats["max_len"],
        "static_greedy_identical_rows": sum(a == b for a, b in zip(base_texts, static_texts,
                                                                   strict=True)),
        "requests": REQUESTS,
        "new_tokens_per_request": NEW_TOKENS,
        "ignore_eos": f"generation_config.min_new_tokens={NEW_TOKENS}",
        "baseline_tok_s": round(total / base_s, 1),
        "engine_tok_s": round(total / engine_s, 1),
        "cpu_concurrency_speedup": round(base_s / engine_s, 2),
        "baseline_wall_s": round(base_s, 2),
        "engine_wall_s": round(engine_s, 2),
        "baseline_latency_p50_s": round(statistics.median(base_lat), 2),
        "baseline_latency_p95_s": round(percentile(base_lat, 95), 2),
        "engine_latency_p50_s": round(statistics.median(engine_lat), 2),
        "engine_latency_p95_s": round(percentile(engine_lat, 95), 2),
        "engine_batches": stats["batches"] - 1,  # less the warm-up's
        "engine_largest_batch": stats["largest_batch"],
        "greedy_identical_rows": sum(a == b for a, b in zip(base_texts, engine_texts,
                                                            strict=True)),
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }


def gpu_benchmark(decode_kernels: str = "auto") -> dict[str, Any]:
    """Batch-1 decode and 256 concurrent requests on CUDA, bf16: plain `generate` (batch 1,
    and one padded generate of all 256) against the engine's static decoding (CUDA
    graphs, continuous batching, `decode_kernels`); the shared code is
    benchmarks/gpu_decode.py's."""
    import torch

    from benchmarks.gpu_decode import decode_speed

    if not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device; none is available here")
    loaded = load_model("smollm2-135m-instruct", device="cuda", dtype="bfloat16")
    backend = LocalBackend(loaded=loaded, prefix_cache_mb=0)
    questions = [QUESTIONS[i % len(QUESTIONS)] + f" (request {i})" for i in range(GPU_REQUESTS)]

    out: dict[str, Any] = {"gpu_card": torch.cuda.get_device_name(0), "gpu_dtype": "bfloat16",
                           "new_tokens_per_request": NEW_TOKENS,
                           "concurrent_requests": GPU_REQUESTS,
                           "gpu_decode_kernels": decode_kernels}
    decode_speed(backend, questions, NEW_TOKENS, out, print, lambda: None,
                 decode_kernels=decode_kernels)
    out["gpu_peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def quantization_metrics() -> dict[str, Any]:
    """The keys of benchmarks/quantization.py's `run_quantization()`, if that module exists."""
    if importlib.util.find_spec("benchmarks.quantization") is None:
        print("--quantization: benchmarks/quantization.py does not exist yet; skipped")
        return {}
    module = importlib.import_module("benchmarks.quantization")
    run = getattr(module, "run_quantization", None)
    if run is None:
        print("--quantization: benchmarks/quantization.py has no run_quantization(); skipped")
        return {}
    return dict(run())


def show(title: str, metrics: dict[str, Any]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, str(v))
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backend", description=__doc__
                                     and __doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true",
                        help="also measure on CUDA: batch-1 decode, 256 concurrent requests")
    parser.add_argument("--quantization", action="store_true",
                        help="also run benchmarks/quantization.py and merge its keys")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU benchmark")
    parser.add_argument("--decode-kernels", choices=("auto", "torch", "triton"), default="auto",
                        help="with --gpu: what computes the static decode layer")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    metrics: dict[str, Any] = {}
    if not args.no_cpu:
        metrics.update(cpu_benchmark())
    if args.quantization:
        metrics.update(quantization_metrics())
    if metrics:
        path = RESULTS / "backend.json"
        if args.no_cpu and path.is_file():  # keep the CPU figures already there
            old = json.loads(path.read_text())
            metrics = {**{k: v for k, v in old.items() if k not in ("machine", "when")},
                       **metrics}
        show("local backend: batching engine vs plain generate (CPU)", metrics)
        print(f"wrote {write_results('backend', metrics)}")
    if args.gpu:
        gpu = gpu_benchmark(args.decode_kernels)
        show(f"local backend on {gpu['gpu_card']}", gpu)
        print(f"wrote {write_results('backend_gpu', gpu)}")


if __name__ == "__main__":
    main()
