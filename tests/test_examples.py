"""The LangChain agent example runs offline on the embedded model and reports savings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.model
def test_langchain_agent_example(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {"CONTEXTWISE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "OMP_WAIT_POLICY": "PASSIVE", "HOME": str(Path.home())}
    out = subprocess.run([sys.executable, str(root / "examples" / "langchain_agent.py")],
                         capture_output=True, text=True, timeout=900, env=env, check=True).stdout
    for name in ("get_weather", "convert_currency", "find_restaurants"):
        assert f"['{name}']" in out
    assert "prompt tokens saved" in out and "tools" in out
