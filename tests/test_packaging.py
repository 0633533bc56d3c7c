"""Wheel and editable installs import the same way (root folders -> contextwise.*)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["middleware", "retrievers", "memory", "backends"]
PROBE = (
    "import contextwise, importlib, json;"
    f"mods = ['contextwise'] + ['contextwise.' + n for n in {SUBPACKAGES!r}];"
    "print(json.dumps({m: importlib.import_module(m).__file__ for m in mods}))"
)


def _import_paths(cwd: Path, pythonpath: str | None = None) -> dict[str, str]:
    import json
    import os

    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_editable_install_maps_root_folders(tmp_path):
    paths = _import_paths(tmp_path)
    assert Path(paths["contextwise"]).parent == ROOT / "contextwise"
    for name in SUBPACKAGES:
        assert Path(paths[f"contextwise.{name}"]).parent == ROOT / name


@pytest.mark.slow
def test_wheel_contains_and_imports_every_subpackage(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = wheels.glob("contextwise-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)
    paths = _import_paths(tmp_path, pythonpath=str(site))
    for name in ["contextwise"] + [f"contextwise.{n}" for n in SUBPACKAGES]:
        assert Path(paths[name]).is_relative_to(site), (name, paths[name])
    assert (site / "contextwise" / "backends" / "local.py").is_file()
    assert not (site / "memory").exists() and not (site / "backends").exists()
