"""The batching engine's host side at 256 concurrent requests, the GPU's share simulated.

    python -m benchmarks.engine_host             # 256 requests x 128 tokens, 12 rounds a phase
    python -m benchmarks.engine_host --rounds 20

On the H100 the engine served 256 concurrent requests of 128 tokens in ~0.33-0.38 s
a round, while its decoder alone needs ~0.18 s for the decode steps and ~0.03 s for
the prefill (benchmarks/gpu_decode.py). This measures the rest, the host's part,
on any machine: the real engine, backend, tokenizer and chat template, 256 caller
threads released together (as benchmarks/backend.py's `concurrent`), with a
decoder stand-in that does no arithmetic but takes the GPU's time: each launch is
queued behind the previous one on a simulated device timeline (`--step-ms` per
decode step of the whole batch, `--prefill-ms` per 1,000 prompt tokens, from the
H100 runs) and its tokens are ready when that time has passed, as a CUDA launch's
are. The stand-in replaces `StaticDecoder` in this process only.

Two phases of `--rounds` rounds each, after one warm-up round, in this order:

- `unfrozen`: the garbage collector as Python leaves it (the engine's own
  `gc.freeze()` held back), right after start-up, as a benchmark's timed rounds are;
- `frozen`: after `gc.freeze()`, which the engine calls once its static decoder is
  built (the objects alive then, the model's among them, are skipped by
  collections).

A full collection runs when enough objects have survived since the last one, so
whether one lands in a phase's rounds is chance; what it costs is not: reported
first, a full collection's pause with the model loaded, without and with the
freeze. Then per phase the rounds' median and slowest wall time, tokens/s at the
median, the host's share (wall time less the simulated device time) and the full
collections that ran during the rounds. Writes benchmarks/results/engine_host.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.common import write_results


class _Timed:
    """A launch's tokens, ready at `end` on the simulated device timeline."""

    def __init__(self, tokens: Any, end: float):
        self.out, self.end = tokens, end

    def tokens(self) -> list[list[int]]:
        wait = self.end - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return self.out.tolist()


def simulated_decoder(step_s: float, prefill_s_per_token: float, token: int) -> type:
    """A `StaticDecoder` stand-in: the engine's calls cost only simulated device time."""
    import torch
    from contextwise.backends import static_decode

    class SimulatedDecoder:
        def __init__(self, model: Any, slots: int, max_len: int, **_: Any):
            self.slots, self.max_len = slots, max_len
            self.free_at = 0.0  # when the simulated device is done with what is queued
            self.busy_s = 0.0
            self.stats: dict[str, Any] = {"prefills": 0}
            self.fused, self.compiled, self.kernels, self.kv_bytes = True, False, "simulated", 0

        def _queue(self, seconds: float) -> float:
            start = max(time.perf_counter(), self.free_at)
            self.free_at = start + seconds
            self.busy_s += seconds
            return self.free_at

        def warm_up(self) -> None:
            pass

        def bucket(self, n: int) -> int:
            return static_decode._bucket(n, self.slots)

        def prefill(self, slots: Any, prompts: Any, starts: Any = None) -> Any:
            starts = starts or [0] * len(prompts)
            tokens = sum(len(p) - s for p, s in zip(prompts, starts, strict=True))
            wait = self._queue(tokens * prefill_s_per_token) - time.perf_counter()
            if wait > 0:  # the host reads the first tokens: it waits for the prefill
                time.sleep(wait)
            self.stats["prefills"] += 1
            logits = torch.zeros(len(slots), token + 1)
            logits[:, token] = 1.0
            return logits

        def copy_prefix(self, copies: Any) -> None:
            pass

        def launch(self, n: int, tokens: Any, pos: Any, steps: int = 1,
                   ban_eos: Any = None) -> _Timed:
            end = self._queue(step_s * steps)
            return _Timed(torch.full((n, steps), token, dtype=torch.long), end)

    return SimulatedDecoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds per phase")
    parser.add_argument("--step-ms", type=float, default=1.404,
                        help="simulated decode step of the whole batch (H100, 256 rows: "
                        "182,352 tok/s)")
    parser.add_argument("--prefill-ms", type=float, default=2.6,
                        help="simulated prefill per 1,000 prompt tokens (H100: 256 prompts, "
                        "~10,000 tokens, ~27 ms)")
    args = parser.parse_args()

    from contextwise.backends import static_decode
    from contextwise.backends.engine import BatchingEngine
    from contextwise.backends.loading import load_model
    from contextwise.backends.local import LocalBackend
    from transformers.utils import logging as hf_logging

    from benchmarks import backend as bb

    hf_logging.disable_progress_bar()
    n, new = args.requests, args.new_tokens
    loaded = load_model("smollm2-135m-instruct", device="cpu")
    backend = LocalBackend(loaded=loaded, prefix_cache_mb=0)
    token = backend.tokenizer.convert_tokens_to_ids("the") or 5  # any plain, non-EOS token
    static_decode.StaticDecoder = simulated_decoder(  # type: ignore[misc]
        args.step_ms / 1000, args.prefill_ms / 1e6, token)
    questions = [bb.QUESTIONS[i % len(bb.QUESTIONS)] + f" (request {i})" for i in range(n)]

    out: dict[str, Any] = {"requests": n, "new_tokens": new, "rounds_per_phase": args.rounds,
                           "simulated_step_ms": args.step_ms,
                           "simulated_prefill_ms_per_1k_tokens": args.prefill_ms,
                           "gc_tracked_objects": len(gc.get_objects())}
    from contextwise.backends import engine as engine_module

    collections: list[list[float]] = []

    def watch(phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                collections.append([time.perf_counter(), 0.0])
            elif collections:
                collections[-1][1] = time.perf_counter() - collections[-1][0]

    engine = BatchingEngine(backend, max_batch=n, max_wait_ms=20, max_queue=4 * n,
                            static_decode="on",  # a budget for n slots: nothing is allocated
                            kv_cache_mb=n * 4096 * 0.05)
    rounds: dict[str, list[tuple[float, float]]] = {"unfrozen": [], "frozen": []}
    full: dict[str, list[float]] = {"unfrozen": [], "frozen": []}
    freeze = engine_module._freeze_gc_heap
    engine_module._freeze_gc_heap = lambda: None  # the engine must not freeze in phase 1
    gc.callbacks.append(watch)
    try:
        with bb.min_new_tokens(loaded.model, new), engine:
            bb.concurrent(engine, questions, new)  # warm-up: builds the runner
            decoder = engine._runner.decoder
            for mode in ("unfrozen", "frozen"):
                if mode == "frozen":
                    gc.collect()
                    gc.freeze()
                for _ in range(args.rounds):
                    busy, collections[:] = decoder.busy_s, []
                    _, _, secs = bb.concurrent(engine, questions, new)
                    rounds[mode].append((secs, decoder.busy_s - busy))
                    full[mode] += [c[1] for c in collections]
    finally:
        gc.callbacks.remove(watch)
        engine_module._freeze_gc_heap = freeze
    for mode in ("unfrozen", "frozen"):  # a full collection's pause, model loaded
        if mode == "unfrozen":
            gc.unfreeze()
        else:
            gc.freeze()
        pauses = []
        for _ in range(3):
            t0 = time.perf_counter()
            gc.collect()
            pauses.append(time.perf_counter() - t0)
        out[f"{mode}_full_collection_ms"] = round(statistics.median(pauses) * 1000, 1)

    for mode, runs in rounds.items():
        walls = sorted(s for s, _ in runs)
        median = statistics.median(walls)
        device = statistics.median(d for _, d in runs)
        out.update({
            f"{mode}_round_median_s": round(median, 4),
            f"{mode}_round_max_s": round(walls[-1], 4),
            f"{mode}_tok_s": round(n * new / median, 1),
            f"{mode}_host_share": round(1 - device / median, 3),
            f"{mode}_full_collections_in_rounds": len(full[mode]),
            f"{mode}_longest_collection_ms": round(max(full[mode], default=0) * 1000, 1),
        })
    out["simulated_device_s_per_round"] = round(device, 4)

    table = Table(title=f"engine host side: {n} concurrent requests x {new} tokens, "
                        f"device time simulated ({args.rounds} rounds a phase, unfrozen first)")
    table.add_column("")
    for col in ("full collection ms", "round median s", "round max s", "tok/s (median)",
                "host share", "collections in rounds"):
        table.add_column(col, justify="right")
    for mode in ("unfrozen", "frozen"):
        table.add_row(mode, str(out[f"{mode}_full_collection_ms"]),
                      str(out[f"{mode}_round_median_s"]), str(out[f"{mode}_round_max_s"]),
                      str(out[f"{mode}_tok_s"]), str(out[f"{mode}_host_share"]),
                      f"{out[f'{mode}_full_collections_in_rounds']} "
                      f"(longest {out[f'{mode}_longest_collection_ms']} ms)")
    Console().print(table)
    print(f"wrote {write_results('engine_host', out)}")


if __name__ == "__main__":
    main()
