"""float32 against bfloat16 weights and compute for the embedded model on CPU.

    python -m benchmarks.cpu_dtype

`Local(dtype="auto")` picks float32 on CPU: exact, so the lossless modes
(prefix cache, prompt lookup, draft decoding) and batching give exactly plain
greedy output. CPUs with native bf16 instructions (AVX512-BF16, AMX) run
`Local(dtype="bfloat16")` much faster. Both load in this one process and run
the same work, float32 first:

- `*_weight_bytes`: parameters and buffers;
- `*_ppl`: perplexity on benchmarks/data/heldout_text (as benchmarks/quantization.py);
- `*_bs1_tok_s`: one greedy request of 128 new tokens (EOS masked), median of 3;
- `*_concurrent_tok_s`: 16 requests of 128 new tokens submitted together to a
  BatchingEngine (padded batches, the CPU default);
- `*_batched_identical`: of those 16 replies (EOS allowed), how many equal the
  same call run alone (float32: all; bfloat16: rounding depends on the batch);
- `bf16_speedup_bs1`, `bf16_speedup_concurrent`, `bf16_ppl_delta` (ppl / ppl of
  float32 - 1).

Writes benchmarks/results/cpu_dtype.json. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from contextwise.backends.engine import BatchingEngine
from contextwise.backends.loading import cpu_has_native_bf16, load_model
from contextwise.backends.local import LocalBackend
from contextwise.backends.quantize import weight_bytes
from rich.console import Console
from rich.table import Table

from benchmarks.common import chat, write_results
from benchmarks.quantization import TEXT, perplexity

MODEL = "smollm2-135m-instruct"
NEW_TOKENS = 128
PROMPT = "Write a long story about a lighthouse keeper."
QUESTIONS = [f"Write a short story about a lighthouse keeper named {n}." for n in (
    "Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena",
    "Milo", "Nina", "Omar", "Pia")]


def _measure(dtype: str) -> dict[str, Any]:
    loaded = load_model(MODEL, device="cpu", dtype=dtype)
    model, tok = loaded.model, loaded.tokenizer
    out: dict[str, Any] = {"weight_bytes": weight_bytes(model)}
    ids = tok(TEXT.read_text(), return_tensors="pt")["input_ids"]
    out["ppl"] = round(perplexity(model, ids), 4)

    backend = LocalBackend(MODEL, loaded=loaded, prefix_cache_mb=0)
    backend.generate([chat(PROMPT, 8)])  # warm-up
    config = model.generation_config
    config.min_new_tokens = NEW_TOKENS  # every request makes all its tokens
    speeds = []
    for _ in range(3):
        t0 = time.perf_counter()
        reply = backend.generate([chat(PROMPT, NEW_TOKENS)])[0]
        speeds.append(reply.usage.completion_tokens / (time.perf_counter() - t0))
    out["bs1_tok_s"] = round(statistics.median(speeds), 1)

    with BatchingEngine(backend, max_batch=16, max_wait_ms=50) as engine:
        t0 = time.perf_counter()
        replies = [f.result() for f in engine.submit([chat(q, NEW_TOKENS) for q in QUESTIONS])]
        secs = time.perf_counter() - t0
        out["concurrent_tok_s"] = round(sum(r.usage.completion_tokens for r in replies) / secs, 1)
        config.min_new_tokens = None
        batched = [f.result().text for f in engine.submit([chat(q, 64) for q in QUESTIONS])]
    alone = [backend.generate([chat(q, 64)])[0].text for q in QUESTIONS]
    out["batched_identical"] = sum(a == b for a, b in zip(alone, batched, strict=True))
    return out


def main() -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    metrics: dict[str, Any] = {"model": MODEL, "native_bf16": cpu_has_native_bf16(),
                               "new_tokens": NEW_TOKENS, "concurrent_requests": len(QUESTIONS)}
    for dtype, key in (("float32", "fp32"), ("bfloat16", "bf16")):
        metrics.update({f"{key}_{k}": v for k, v in _measure(dtype).items()})
    metrics["bf16_speedup_bs1"] = round(metrics["bf16_bs1_tok_s"] / metrics["fp32_bs1_tok_s"], 2)
    metrics["bf16_speedup_concurrent"] = round(
        metrics["bf16_concurrent_tok_s"] / metrics["fp32_concurrent_tok_s"], 2)
    metrics["bf16_ppl_delta"] = round(metrics["bf16_ppl"] / metrics["fp32_ppl"] - 1, 5)
    path = write_results("cpu_dtype", metrics)

    table = Table(title=f"{MODEL} on CPU: float32 vs bfloat16 "
                        f"(native bf16: {metrics['native_bf16']})")
    for col in ("dtype", "weights MB", "ppl", "batch 1 tok/s", "16 concurrent tok/s",
                "batched = alone"):
        table.add_column(col, justify="left" if col == "dtype" else "right")
    for key, name in (("fp32", "float32"), ("bf16", "bfloat16")):
        table.add_row(name, f"{metrics[f'{key}_weight_bytes'] / 1e6:.0f}",
                      f"{metrics[f'{key}_ppl']:.3f}", f"{metrics[f'{key}_bs1_tok_s']}",
                      f"{metrics[f'{key}_concurrent_tok_s']}",
                      f"{metrics[f'{key}_batched_identical']}/{len(QUESTIONS)}")
    console = Console()
    console.print(table)
    console.print(f"bfloat16: {metrics['bf16_speedup_bs1']}x at batch 1, "
                  f"{metrics['bf16_speedup_concurrent']}x at {len(QUESTIONS)} concurrent, "
                  f"perplexity {metrics['bf16_ppl_delta']:+.2%}")
    console.print(f"wrote {path}")
    return metrics


if __name__ == "__main__":
    main()
