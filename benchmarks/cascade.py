"""Confidence cascade: how often a compressed model's reply is kept, and what it costs.

    python -m benchmarks.cascade

Two `LocalBackend`s of the embedded model (SmolLM2-135M-Instruct): small = int8
weights (`quantization="int8"`, the compressed one), large = unquantized. The
prefix KV cache is off on both. The backends are called directly (the
pipeline's stages would only add noise).

- workload: 20 short chat prompts written for this benchmark (facts,
  definitions, small rewrites, lists), greedy, max_tokens=32;
- baseline: the large model alone on every prompt;
- cascade: `CascadeBackend(small, large, threshold=t, confidence="mean_prob")`
  at three thresholds (the policy default among them): each prompt runs on the
  small model; a reply whose geometric-mean token probability is >= t is kept,
  the rest run again on the large model;
- `*_acceptance_rate` / `*_escalation_rate`: kept / re-run share of the prompts;
  `*_agreement`: share of the kept replies whose text equals the large model's
  reply to the same prompt (exact match); `*_answer_agreement`: the same over all
  replies (escalated ones are the large model's own); `*_time_ratio`: cascade
  wall time / baseline wall time (below 1: the cascade is cheaper);
- a warm-up call on each model first; one pass per setting;
- concurrent (`concurrent_*`): all prompts as one group at the default
  threshold, `cascade.generate(group)` (the small model's batch, then the
  escalated calls' batch on the large one) against the same cascade called
  once per prompt, in the same process; plus the large model alone on the
  group as one padded batch (`concurrent_group_vs_large_batch`: below 1, the
  cascade is cheaper than batching the large model).

The flat keys `cascade_acceptance_rate`, `cascade_escalation_rate`,
`cascade_agreement` and `cascade_time_ratio` are the default threshold's.
Writes benchmarks/results/cascade.json. Takes about 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from contextwise.backends.cascade import CascadeBackend
from contextwise.backends.local import LocalBackend
from rich.console import Console
from rich.table import Table

from benchmarks.common import chat, write_results
from contextwise.policy import Cascade
from contextwise.types import Reply

MAX_TOKENS = 32
DEFAULT_THRESHOLD = Cascade().threshold
THRESHOLDS = sorted({0.5, DEFAULT_THRESHOLD, 0.7})

PROMPTS = [
    "What is the capital of France?",
    "How many days are there in a week?",
    "What is the boiling point of water in Celsius?",
    "Name the largest planet in the solar system.",
    "What color do you get when you mix blue and yellow?",
    "Translate 'thank you' into Spanish.",
    "What is 12 times 12?",
    "Who wrote the play Romeo and Juliet?",
    "What is the chemical symbol for gold?",
    "Give me a synonym for the word 'happy'.",
    "What is the opposite of 'cold'?",
    "How many legs does a spider have?",
    "What language is spoken in Brazil?",
    "Name three primary colors.",
    "What is the freezing point of water in Fahrenheit?",
    "Which ocean is the largest?",
    "Write one sentence about the moon.",
    "What do bees make?",
    "Rewrite in the past tense: I walk to school.",
    "What is the square root of 81?",
]


def _run(backend: Any) -> tuple[list[Reply], float]:
    t0 = time.perf_counter()
    replies = [backend.generate([chat(p, MAX_TOKENS)])[0] for p in PROMPTS]
    return replies, time.perf_counter() - t0


def _concurrent(small: Any, large: Any) -> dict[str, Any]:
    """The prompts arriving together (one group, as the BatchingEngine hands it),
    default threshold: the cascade's batched group against the same cascade
    called once per prompt, and the large model alone as one padded batch."""
    def cascade() -> CascadeBackend:
        return CascadeBackend(small, large, threshold=DEFAULT_THRESHOLD, confidence="mean_prob")

    t0 = time.perf_counter()
    alone = [cascade().generate([chat(p, MAX_TOKENS)])[0] for p in PROMPTS]
    alone_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    group = cascade().generate([chat(p, MAX_TOKENS) for p in PROMPTS])
    group_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    large.generate_scored_batch([chat(p, MAX_TOKENS) for p in PROMPTS])
    large_s = time.perf_counter() - t0

    def decision(r: Reply) -> str:
        return str(r.trace.of("cascade")[-1]["decision"])

    return {
        "concurrent_one_by_one_seconds": round(alone_s, 2),
        "concurrent_group_seconds": round(group_s, 2),
        "concurrent_group_speedup": round(alone_s / group_s, 2),
        "concurrent_large_batch_seconds": round(large_s, 2),
        "concurrent_group_vs_large_batch": round(group_s / large_s, 3),
        "concurrent_identical_replies": sum(a.text == g.text for a, g in zip(alone, group,
                                                                              strict=True)),
        "concurrent_same_decisions": sum(decision(a) == decision(g) for a, g in zip(
            alone, group, strict=True)),
        "concurrent_escalated": sum(decision(g) == "escalated" for g in group),
    }


def _key(t: float) -> str:
    return f"t{round(t * 100):02d}"  # 0.6 -> t60


def main() -> dict[str, Any]:
    large = LocalBackend(prefix_cache_mb=0)
    small = LocalBackend(prefix_cache_mb=0, quantization="int8")
    for b in (large, small):  # warm-up
        b.generate([chat("Hi", 4)])
    baseline, base_s = _run(large)
    base_text = [r.text for r in baseline]
    metrics: dict[str, Any] = {
        "model": large.model_name, "small_quantization": "int8", "large_quantization": "none",
        "confidence": "mean_prob", "prompts": len(PROMPTS), "max_tokens": MAX_TOKENS,
        "default_threshold": DEFAULT_THRESHOLD, "thresholds": THRESHOLDS,
        "baseline_seconds": round(base_s, 2),
        "baseline_completion_tokens": sum(r.usage.completion_tokens for r in baseline),
    }
    rows = []
    confidences: list[float] = []
    for t in THRESHOLDS:
        cascade = CascadeBackend(small, large, threshold=t, confidence="mean_prob")
        replies, secs = _run(cascade)
        records = [r.trace.of("cascade")[-1] for r in replies]
        if not confidences:
            confidences = [rec["confidence"] for rec in records]
        kept = [i for i, rec in enumerate(records) if rec["decision"] == "accepted"]
        stats = cascade.stats()
        agree = sum(replies[i].text == base_text[i] for i in kept)
        m = {
            "acceptance_rate": round(stats["acceptance_rate"], 3),
            "escalation_rate": round(stats["escalation_rate"], 3),
            "agreement": round(agree / len(kept), 3) if kept else None,
            "answer_agreement": round(sum(r.text == b for r, b in zip(replies, base_text,
                                                                      strict=True))
                                      / len(PROMPTS), 3),
            "seconds": round(secs, 2),
            "time_ratio": round(secs / base_s, 3),
            "small_tokens_wasted": stats["small_tokens_wasted"],
        }
        metrics.update({f"{_key(t)}_{k}": v for k, v in m.items()})
        rows.append((t, m, len(kept)))
    metrics.update({  # the small model's reply confidence over the prompts
        "small_confidence_min": round(min(confidences), 3),
        "small_confidence_median": round(statistics.median(confidences), 3),
        "small_confidence_max": round(max(confidences), 3),
    })
    d = _key(DEFAULT_THRESHOLD)
    for k in ("acceptance_rate", "escalation_rate", "agreement", "time_ratio"):
        metrics[f"cascade_{k}"] = metrics[f"{d}_{k}"]
    metrics.update(_concurrent(small, large))
    path = write_results("cascade", metrics)

    table = Table(title=f"Confidence cascade: int8 -> unquantized {large.model_name}, "
                        f"{len(PROMPTS)} prompts, max_tokens={MAX_TOKENS}, CPU")
    for col in ("setting", "kept", "escalated", "kept = large", "all = large", "seconds",
                "vs large"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    table.add_row("large alone", "-", "-", "-", "100%", f"{base_s:.1f}", "1.00x")
    for t, m, n in rows:
        label = f"mean_prob >= {t}" + (" (default)" if t == DEFAULT_THRESHOLD else "")
        agreement = "-" if m["agreement"] is None else f"{m['agreement']:.0%}"
        table.add_row(label, f"{n} ({m['acceptance_rate']:.0%})",
                      f"{m['escalation_rate']:.0%}", agreement,
                      f"{m['answer_agreement']:.0%}", f"{m['seconds']:.1f}",
                      f"{m['time_ratio']:.2f}x")
    console = Console()
    console.print(table)
    console.print(f"small-model confidence over the prompts: min "
                  f"{metrics['small_confidence_min']}, median "
                  f"{metrics['small_confidence_median']}, max {metrics['small_confidence_max']}")
    console.print(
        f"all {len(PROMPTS)} prompts at once (default threshold): the group "
        f"{metrics['concurrent_group_seconds']} s against one by one "
        f"{metrics['concurrent_one_by_one_seconds']} s "
        f"({metrics['concurrent_group_speedup']}x; identical replies "
        f"{metrics['concurrent_identical_replies']}/{len(PROMPTS)}, same decisions "
        f"{metrics['concurrent_same_decisions']}/{len(PROMPTS)}); the large model alone as "
        f"one batch {metrics['concurrent_large_batch_seconds']} s")
    console.print(f"wrote {path}")
    return metrics


if __name__ == "__main__":
    main()
