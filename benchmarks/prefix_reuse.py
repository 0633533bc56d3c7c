"""Prefix reuse in the static decoder's slots: agent traffic with a long shared system part.

    python -m benchmarks.prefix_reuse                 # CPU, the embedded model
    python -m benchmarks.prefix_reuse --device cuda   # a GPU (bf16)
    python -m benchmarks.prefix_reuse --device cuda --config-dir DIR --engines static,reuse

Every request is benchmarks/prefix_cache.py's support-assistant call: a ~1,500-token
system part (policy and four tools) and one short question. Three engines over the
one embedded model (SmolLM2-135M-Instruct), in this process:

- `single`: the engine as configured by default on a CPU (`static_decode="auto"`:
  off there) over a backend with its prefix KV cache on: these calls run one at a
  time on the single-request path, each from a copy of the cached system part;
- `static`: continuous batching on the static KV cache, prefix reuse off
  (`reuse_prefixes=False`): every prompt prefilled whole (the engine before it);
- `reuse`: the same with prefix reuse on (the default): a new request prefills only
  what its slot (in place) or another slot (copied) does not hold already; requests
  arriving together share their common prefix, prefilled once.

Workloads, each engine warmed up first (one request) and then:

- two waves of `--requests` concurrent calls (one thread each, released together),
  `--new-tokens` greedy tokens each (EOS masked until then, as
  benchmarks/backend.py does): wave 1 right after the warm-up, wave 2 after it
  (with reuse, the slots then hold wave 1's prompts);
- `--sequential` calls one after another (an agent loop), latency each.

Reported per engine: wall time and tokens/s of each wave, its median latency, the
sequential median latency, the static engines' prompt tokens prefilled and reused;
ratios `reuse` against `static` and against `single`; and whether they gave the
same greedy replies (text, tool calls, token counts). `--engines` picks some of the
three (on a GPU `single` is the single-request path at ~10 tok/s: minutes). Writes
benchmarks/results/prefix_reuse.json (prefix_reuse_gpu.json off the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.common import write_results
from benchmarks.prefix_cache import QUESTIONS, answer, call


def wave(engine: Any, questions: list[str], new: int) -> tuple[list[Any], list[float], float]:
    """(replies, latencies since the common start, wall seconds): one thread per call."""
    from benchmarks.backend import concurrent_calls

    return concurrent_calls(
        lambda i: engine.generate([call(questions[i], max_tokens=new)])[0], len(questions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=4)
    parser.add_argument("--config-dir", type=Path, default=None,
                        help="a model's config and tokenizer: random weights in its shapes "
                        "(a machine without the model file; replies then differ in kind, "
                        "not in timing)")
    parser.add_argument("--engines", default="single,static,reuse",
                        help="which of single, static, reuse to run (reuse always runs)")
    args = parser.parse_args()
    chosen = {e.strip() for e in args.engines.split(",") if e.strip()} | {"reuse"}
    if not chosen <= {"single", "static", "reuse"}:
        parser.error(f"--engines: unknown {sorted(chosen - {'single', 'static', 'reuse'})}")

    import torch
    from contextwise.backends.engine import BatchingEngine
    from contextwise.backends.loading import load_model
    from contextwise.backends.local import LocalBackend
    from transformers.utils import logging as hf_logging

    from benchmarks.backend import min_new_tokens

    hf_logging.disable_progress_bar()
    spec = "smollm2-135m-instruct"
    if args.config_dir is not None:
        from benchmarks.gpu_check import random_model_dir

        spec = str(random_model_dir(args.config_dir, Path("/tmp/cw-random-model")))
    loaded = load_model(spec, device=args.device)  # bf16 on a GPU
    n, new = args.requests, args.new_tokens
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    later = [QUESTIONS[(n + i) % len(QUESTIONS)] for i in range(n)]  # wave 2: others
    agent = [QUESTIONS[(2 * n + i) % len(QUESTIONS)] for i in range(args.sequential)]
    common = {"max_batch": n, "max_wait_ms": 50, "kv_cache_mb": 1024}

    engines = {  # built one at a time: each static engine holds its own KV cache
        "single": lambda: BatchingEngine(LocalBackend(loaded=loaded, prefix_cache_mb=256),
                                         static_decode="off", **common),
        "static": lambda: BatchingEngine(LocalBackend(loaded=loaded, prefix_cache_mb=0),
                                         static_decode="on", reuse_prefixes=False, **common),
        # prefix cache: the device's default
        "reuse": lambda: BatchingEngine(LocalBackend(loaded=loaded), static_decode="on",
                                        **common),
    }

    out: dict[str, Any] = {"device": str(loaded.device), "dtype": str(loaded.model.dtype),
                           "weights": "random" if args.config_dir else spec,
                           "threads": torch.get_num_threads(), "requests": n,
                           "new_tokens": new, "sequential_requests": args.sequential}
    probe = LocalBackend(loaded=loaded, prefix_cache_mb=0)
    out["prompt_tokens_p50"] = int(statistics.median(
        len(probe.tokenizer(probe.render(call(q)), add_special_tokens=False)["input_ids"])
        for q in questions))
    answers: dict[str, list[Any]] = {}
    with min_new_tokens(loaded.model, new):
        for name, build in engines.items():
            if name not in chosen:
                continue
            with build() as engine:
                engine.generate([call("Hello!", max_tokens=2)])  # first-use costs
                got = []
                for w, qs in (("wave1", questions), ("wave2", later)):
                    replies, lat, secs = wave(engine, qs, new)
                    assert all(r.usage.completion_tokens == new for r in replies)
                    out[f"{name}_{w}_s"] = round(secs, 2)
                    out[f"{name}_{w}_tok_s"] = round(n * new / secs, 1)
                    out[f"{name}_{w}_latency_p50_s"] = round(statistics.median(lat), 2)
                    got += [answer(r) for r in replies]
                seq = []
                for q in agent:
                    t0 = time.perf_counter()
                    r = engine.generate([call(q, max_tokens=new)])[0]
                    seq.append(time.perf_counter() - t0)
                    got.append(answer(r))
                out[f"{name}_sequential_latency_p50_s"] = round(statistics.median(seq), 2)
                answers[name] = got
                s = engine.stats()
                static = s.get("static") or {}
                for key in ("prefill_tokens", "reused_tokens", "copied_tokens", "prefill_s"):
                    if key in static:
                        out[f"{name}_{key}"] = round(static[key], 2)
                out[f"{name}_single_calls"] = s["single_calls"]
            print(f"{name}: done", flush=True)

    bases = [b for b in ("static", "single") if b in chosen]
    for base in bases:
        for w in ("wave1", "wave2"):
            out[f"reuse_{w}_speedup_vs_{base}"] = round(out[f"{base}_{w}_s"] / out[f"reuse_{w}_s"],
                                                        2)
        out[f"reuse_sequential_speedup_vs_{base}"] = round(
            out[f"{base}_sequential_latency_p50_s"] / out["reuse_sequential_latency_p50_s"], 2)
        out[f"replies_identical_reuse_{base}"] = answers["reuse"] == answers[base]

    table = Table(title=f"prefix reuse: {n} concurrent requests x 2 waves, then "
                        f"{args.sequential} sequential; ~{out['prompt_tokens_p50']}-token "
                        f"prompts, {new} new tokens ({out['device']})")
    table.add_column("engine")
    for col in ("wave 1 s", "wave 2 s", "wave 2 tok/s", "wave 2 p50 s", "sequential p50 s",
                "prefilled", "reused"):
        table.add_column(col, justify="right")
    for name in (e for e in ("single", "static", "reuse") if e in chosen):
        table.add_row(name, str(out[f"{name}_wave1_s"]), str(out[f"{name}_wave2_s"]),
                      str(out[f"{name}_wave2_tok_s"]), str(out[f"{name}_wave2_latency_p50_s"]),
                      str(out[f"{name}_sequential_latency_p50_s"]),
                      str(out.get(f"{name}_prefill_tokens", "-")),
                      str(out.get(f"{name}_reused_tokens", "-")))
    Console().print(table)
    print({k: v for k, v in out.items() if "speedup" in k or "identical" in k})
    gpu = not out["device"].startswith("cpu")
    print(f"wrote {write_results('prefix_reuse_gpu' if gpu else 'prefix_reuse', out)}")


if __name__ == "__main__":
    main()
