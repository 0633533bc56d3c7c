"""Shared bits for benchmarks: the results folder and a JSON writer with machine facts."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from contextwise.types import Call

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def chat(text: str, max_tokens: int | None = None) -> Call:
    """A one-message user call (max_tokens None: the backend's default)."""
    return Call.build([{"role": "user", "content": text}], max_tokens=max_tokens)


def write_results(name: str, metrics: dict[str, Any]) -> Path:
    """Flat metric keys plus `machine` and `when`; atomic write."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**metrics, "machine": machine(),
                               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                              indent=2) + "\n")
    os.replace(tmp, path)
    return path
