"""Prefix KV cache on a GPU: where its time goes, at two prefix lengths.

    python -m benchmarks.gpu_check --config-dir DIR   # first: builds /tmp/cw-random-model
    python -m benchmarks.gpu_prefix_probe             # then this, on the same machine

Times a greedy max_tokens=1 request (time to first token) with and without the
prefix cache for the 1,544-token system part of benchmarks/prefix_cache.py and
for four copies of it, plus the cached path's own steps (finding the system
prefix, the lookup with its copy). Writes prefix_probe.json to $OUT (or ./).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

from contextwise.backends.loading import load_model
from contextwise.backends.local import LocalBackend

from benchmarks import prefix_cache as pc
from contextwise.types import Call

MODEL = "/tmp/cw-random-model"


def main() -> None:
    import torch

    loaded = load_model(MODEL, device="cuda", dtype="bfloat16")
    plain = LocalBackend(loaded=loaded, prefix_cache_mb=0)
    cached = LocalBackend(loaded=loaded, prefix_cache_mb=4096)
    out: dict[str, Any] = {}
    for copies in (1, 4):
        system = "\n\n".join([pc.SYSTEM] * copies)

        def call(q: str, system: str = system) -> Call:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": q}]
            return Call.build(messages, tools=pc.TOOLS, max_tokens=1)

        def timed(backend: LocalBackend, q: str) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            backend.generate([call(q)])
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        for q in pc.QUESTIONS[:2]:  # warm-up
            timed(plain, q)
            timed(cached, q)
        without = [timed(plain, q) for q in pc.QUESTIONS]
        with_ = [timed(cached, q) for q in pc.QUESTIONS]
        c = call(pc.QUESTIONS[0])
        ids = cached.tokenizer(cached.render(c), add_special_tokens=False)["input_ids"]
        t0 = time.perf_counter()
        prefix = cached.system_prefix(c, ids) or ()
        t1 = time.perf_counter()
        assert cached.prefix_cache is not None
        cached.prefix_cache.lookup(ids)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        out[f"prefix_{len(prefix)}"] = {
            "uncached_ms": round(statistics.median(without) * 1e3, 2),
            "cached_ms": round(statistics.median(with_) * 1e3, 2),
            "system_prefix_ms": round((t1 - t0) * 1e3, 3),
            "lookup_copy_ms": round((t2 - t1) * 1e3, 3),
        }
        print(out, flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "prefix_probe.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
