"""Memory, quality and speed of each weight-quantization mode of the local backend.

    python -m benchmarks.quantization            # CPU: none, int8, int8-dynamic, int4
    python -m benchmarks.quantization --device cuda   # adds fp8 on Ada/Hopper

Each mode runs in a fresh child process (so its memory is its own) that loads
the embedded SmolLM2-135M with `load_model(..., quantization=mode)` and reports:

- `weight_bytes`: storage of all parameters and buffers after quantization
  (packed int4/int8 data, scales and zero points; the tied embedding/head once);
- `load_peak_rss_mb` / `load_rss_mb`: peak (VmHWM, reset before the load) and
  resident memory added by the load (transformers maps the float file lazily,
  so `none` grows after the load; the quantized modes read one float layer at a
  time from the file), and `resident_mb`:
  memory added once the model has been used (perplexity and generation ran);
- `ppl`: perplexity of the model on `benchmarks/data/heldout_text/text.txt`
  (original prose written for the project), sliding 512-token windows with a
  256-token stride, each token scored once with as much left context as its
  window gives;
- `tok_s`: one greedy request of 64 new tokens (after a short warm-up).

Flat keys per mode (`-` becomes `_`): `int8_weight_bytes`, `int8_ppl`,
`int8_ppl_delta` (ppl / ppl of `none` - 1; targets: int8 <= 0.02, int4 <= 0.08),
`int8_dynamic_ppl_delta`, `int4_ppl_delta`, ... A mode the device cannot run
gets `<mode>_skipped` with the reason. Writes benchmarks/results/quantization.json.

Note: the embedded model ships as a Q4_1 GGUF, so the `none` baseline is that
file de-quantized, not the original bf16 checkpoint; deltas are against it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "heldout_text" / "text.txt"
MODEL = "smollm2-135m-instruct"
WINDOW, STRIDE = 512, 256
NEW_TOKENS = 64
PROMPT = "Write a long story about a lighthouse keeper."
TARGETS = {"int8": 0.02, "int4": 0.08}


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB; NaN if absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _rss_mb() -> float:
    """Resident memory now, after returning freed heap to the OS (glibc), so that
    allocator caching does not blur the comparison between modes."""
    import gc

    from contextwise.backends.quantize import return_freed_memory

    gc.collect()
    return_freed_memory()
    return _status_mb("VmRSS")


def _reset_peak() -> None:
    """Restart the peak-RSS count (Linux: "5" to clear_refs resets VmHWM). Without
    it the peak would include the parent's: ru_maxrss survives fork and exec."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    """Peak resident memory since `_reset_peak`."""
    return _status_mb("VmHWM")


def perplexity(model: Any, ids: Any, window: int = WINDOW, stride: int = STRIDE) -> float:
    """exp(mean NLL) over `ids` [1, n], sliding windows; each token scored once."""
    import torch

    n = ids.shape[1]
    nll, count, scored_to = 0.0, 0, 1  # token 0 has no context: never scored
    begin = 0
    while scored_to < n:
        end = min(begin + window, n)
        x = ids[:, begin:end].to(model.device)
        with torch.inference_mode():
            logits = model(x).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(1, x[0, 1:, None])[:, 0]
        first = scored_to - begin - 1  # logp[i] scores token begin + i + 1
        nll -= logp[first:].sum().item()
        count += logp[first:].numel()
        scored_to = end
        begin += stride
    return math.exp(nll / count)


def measure(mode: str, device: str) -> dict[str, Any]:
    """One mode, in this process (the child side)."""
    import torch
    from contextwise.backends.loading import load_model
    from contextwise.backends.local import LocalBackend
    from contextwise.backends.quantize import weight_bytes
    from transformers.utils import logging as hf_logging

    from contextwise.types import Call, Message, Params

    hf_logging.disable_progress_bar()
    rss0 = _rss_mb()
    _reset_peak()
    t0 = time.perf_counter()
    loaded = load_model(MODEL, device=device, quantization=mode)
    load_s = time.perf_counter() - t0
    peak = _peak_mb()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    model = loaded.model
    out: dict[str, Any] = {
        "weight_bytes": weight_bytes(model),
        "load_s": round(load_s, 2),
        "load_peak_rss_mb": round(peak - rss0, 1),
        "load_rss_mb": round(_rss_mb() - rss0, 1),
    }
    if device.startswith("cuda"):
        out["gpu_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
    ids = loaded.tokenizer(TEXT.read_text(), return_tensors="pt")["input_ids"]
    t0 = time.perf_counter()
    out["ppl"] = perplexity(model, ids)
    out["ppl_s"] = round(time.perf_counter() - t0, 1)
    out["ppl_tokens"] = int(ids.shape[1])

    backend = LocalBackend(MODEL, loaded=loaded, prefix_cache_mb=0)

    def ask(n: int) -> Any:
        call = Call(messages=[Message(role="user", content=PROMPT)], params=Params(max_tokens=n))
        return backend.generate([call])[0]

    ask(4)  # warm-up
    reply = ask(NEW_TOKENS)
    out["new_tokens"] = reply.usage.completion_tokens
    out["tok_s"] = round(reply.usage.completion_tokens / reply.latency_s, 2)
    out["sample"] = reply.text[:120]
    out["resident_mb"] = round(_rss_mb() - rss0, 1)  # after use: every weight page touched
    return out


def _child(mode: str, device: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quantization", "--child", mode, "--device", device],
        capture_output=True, text=True, env=env, cwd=HERE.parent, check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def run_quantization(device: str = "cpu", modes: list[str] | None = None) -> dict[str, Any]:
    """Measure every mode that `device` can run; flat metric keys (see module doc)."""
    import torch
    from contextwise.backends.loading import load_tokenizer
    from contextwise.backends.quantize import MODES, check_mode

    from contextwise.errors import BackendError

    load_tokenizer(MODEL)  # converts the GGUF once, before the children race to
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    metrics: dict[str, Any] = {"device": device, "model": MODEL, "window": WINDOW,
                               "stride": STRIDE, "new_tokens_requested": NEW_TOKENS}
    results: dict[str, dict[str, Any]] = {}
    for mode in modes or list(MODES):
        key = mode.replace("-", "_")
        try:
            check_mode(mode, device, dtype)
        except BackendError as e:
            metrics[f"{key}_skipped"] = str(e)
            continue
        r = _child(mode, device)
        if "error" in r:
            metrics[f"{key}_error"] = r["error"]
            continue
        results[mode] = r
        for k, v in r.items():
            metrics[f"{key}_{k}"] = round(v, 4) if isinstance(v, float) else v
    base = results.get("none")
    for mode, r in results.items():
        if base is None or mode == "none":
            continue
        key = mode.replace("-", "_")
        metrics[f"{key}_ppl_delta"] = round(r["ppl"] / base["ppl"] - 1, 5)
        metrics[f"{key}_bytes_ratio"] = round(r["weight_bytes"] / base["weight_bytes"], 4)
        metrics[f"{key}_speed_ratio"] = round(r["tok_s"] / base["tok_s"], 3)
    for mode, target in TARGETS.items():
        if f"{mode}_ppl_delta" in metrics:
            metrics[f"{mode}_ppl_target"] = target
            metrics[f"{mode}_ppl_ok"] = metrics[f"{mode}_ppl_delta"] <= target
    return metrics


def _table(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"quantization of {metrics['model']} on {metrics['device']}")
    for col in ("mode", "weights MB", "x none", "load peak MB", "RSS in use MB", "ppl",
                "ppl delta", "tok/s"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    notes: list[str] = []
    for mode in ("none", "int8", "int8-dynamic", "int4", "fp8"):
        k = mode.replace("-", "_")
        if f"{k}_skipped" in metrics or f"{k}_error" in metrics:
            why = metrics.get(f"{k}_skipped") or metrics.get(f"{k}_error")
            notes.append(f"{mode}: skipped: {why}")
            continue
        if f"{k}_ppl" not in metrics:
            continue
        delta = metrics.get(f"{k}_ppl_delta")
        table.add_row(
            mode, f"{metrics[f'{k}_weight_bytes'] / 1e6:.1f}",
            f"{metrics.get(f'{k}_bytes_ratio', 1):.3f}",
            f"{metrics[f'{k}_load_peak_rss_mb']:.0f}", f"{metrics[f'{k}_resident_mb']:.0f}",
            f"{metrics[f'{k}_ppl']:.3f}", "" if delta is None else f"{delta:+.2%}",
            f"{metrics[f'{k}_tok_s']:.1f}",
        )
    console = Console()
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--modes", help="comma-separated subset of the modes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.device)))
        return
    from benchmarks.common import write_results

    t0 = time.perf_counter()
    metrics = run_quantization(args.device, args.modes.split(",") if args.modes else None)
    metrics["bench_s"] = round(time.perf_counter() - t0, 1)
    _table(metrics)
    name = "quantization" if args.device == "cpu" else "quantization_gpu"
    print(f"wrote {write_results(name, metrics)}")


if __name__ == "__main__":
    main()
