"""Cold and warm load of the embedded model, and single-request decode speed on this machine.

    python -m benchmarks.local_model

cold: de-quantize the GGUF into a fresh cache dir (what the first ever load pays);
warm: load the converted folder from disk (every later load). Decode: one greedy
request, 128 new tokens, through the Pipeline, median of 3 runs.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from contextwise.backends.loading import ALIASES, converted_dir, load_model, packaged_path
from contextwise.memory.store import Store
from rich.console import Console
from rich.table import Table

from benchmarks.common import write_results
from contextwise import Pipeline, Policy

NEW_TOKENS = 128
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        load_model("smollm2-135m-instruct", cache_dir=cache)
        cold_s = time.perf_counter() - t0
        converted = converted_dir(str(packaged_path(ALIASES["smollm2-135m-instruct"])), cache)
        t0 = time.perf_counter()
        load_model(str(converted))
        warm_s = time.perf_counter() - t0

    pipeline = Pipeline(Policy(), store=Store(":memory:"))
    pipeline(PROMPT, max_tokens=8, cache="skip")  # warm-up
    runs = []
    for _ in range(3):
        r = pipeline(PROMPT, max_tokens=NEW_TOKENS, cache="skip")  # a hit would time nothing
        runs.append((r.usage.completion_tokens, r.latency_s, r.usage.prompt_tokens))
    tok_s = statistics.median(n / s for n, s, _ in runs)

    metrics = {
        "cold_load_s": round(cold_s, 2),
        "warm_load_s": round(warm_s, 3),
        "single_request_tok_s": round(tok_s, 1),
        "new_tokens": runs[0][0],
        "prompt_tokens": runs[0][2],
    }
    table = Table(title="embedded model on this machine")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, str(v))
    Console().print(table)
    print(f"wrote {write_results('local_model', metrics)}")


if __name__ == "__main__":
    main()
