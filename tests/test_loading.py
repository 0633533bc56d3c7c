"""The converted-weights cache: named by content, pruned on request (no model loaded)."""

from __future__ import annotations

import json
import os
import time

from contextwise.backends.loading import ALIASES, converted_dir, packaged_path, prune_converted

from contextwise.cli import main


def _gguf(path, payload: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + payload)
    return path


def _converted(folder, size: int = 1000):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    return folder


def test_the_same_file_in_two_environments_shares_one_converted_copy(tmp_path):
    a = _gguf(tmp_path / "venv-a" / "m.gguf", b"weights")
    b = _gguf(tmp_path / "venv-b" / "m.gguf", b"weights")
    os.utime(b, ns=(1, 1))  # reinstalled: another mtime
    assert converted_dir(str(a), str(tmp_path)) == converted_dir(str(b), str(tmp_path))
    other = _gguf(tmp_path / "venv-c" / "m.gguf", b"weightz")
    assert converted_dir(str(other), str(tmp_path)) != converted_dir(str(a), str(tmp_path))
    assert converted_dir(str(a), str(tmp_path)).parent == tmp_path / "converted"


def test_an_edited_file_gets_a_new_copy(tmp_path):
    f = _gguf(tmp_path / "m.gguf", b"one")
    before = converted_dir(str(f), str(tmp_path))
    f.write_bytes(b"GGUFtwo")
    os.utime(f, ns=(10**18, 10**18))
    assert converted_dir(str(f), str(tmp_path)) != before


def test_prune_keeps_the_copies_in_use_and_removes_the_rest(tmp_path):
    cache = str(tmp_path / "cache")
    mine = _gguf(tmp_path / "mine.gguf", b"mine")
    kept = _converted(converted_dir(str(mine), cache))
    stale = _converted(tmp_path / "cache" / "converted" / "m-0123456789ab", size=5000)
    crashed_long_ago = _converted(tmp_path / "cache" / "converted" / "m-x.tmp-abc")
    os.utime(crashed_long_ago, (time.time() - 7200, time.time() - 7200))
    running = _converted(tmp_path / "cache" / "converted" / "m-y.tmp-def")

    listed = prune_converted(cache, keep=[str(mine)], dry_run=True)
    assert {f for f, _ in listed} == {stale, crashed_long_ago}
    assert dict(listed)[stale] == 5000 + 2
    assert stale.is_dir()  # a dry run removes nothing

    removed = prune_converted(cache, keep=[str(mine)])
    assert {f for f, _ in removed} == {stale, crashed_long_ago}
    assert not stale.exists() and not crashed_long_ago.exists()
    assert kept.is_dir() and running.is_dir()
    assert prune_converted(cache, keep=[str(mine)]) == []


def test_prune_keeps_the_installed_default_model(tmp_path):
    gguf = packaged_path(ALIASES["smollm2-135m-instruct"])
    cache = str(tmp_path)
    default = _converted(converted_dir(str(gguf), cache))
    assert prune_converted(cache) == []
    assert default.is_dir()
    assert prune_converted(str(tmp_path / "nothing-here")) == []


def test_models_prune_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONTEXTWISE_CACHE", str(tmp_path))
    stale = _converted(tmp_path / "converted" / "m-0123456789ab", size=2_000_000)
    assert main(["models", "prune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {stale} (2 MB)" in out and stale.is_dir()
    assert main(["models", "prune"]) == 0
    assert "removed 1 converted copy, 2 MB" in capsys.readouterr().out
    assert not stale.exists()
    assert main(["models", "prune", "--keep", str(tmp_path / "missing.gguf")]) == 2
    assert "no such GGUF file" in capsys.readouterr().err


def test_a_warm_load_takes_the_digest_from_the_memo(tmp_path):
    from contextwise.backends.loading import _content_digest

    f = _gguf(tmp_path / "m.gguf", b"first")
    st = f.stat()
    first = converted_dir(str(f), str(tmp_path))
    memo = tmp_path / "converted" / "digests.json"
    assert first.name.endswith(json.loads(memo.read_text())[f"{f}:{st.st_size}:{st.st_mtime_ns}"])
    # same size and mtime, other bytes: a new process trusts the memo (no re-hash)
    f.write_bytes(b"GGUFsecon")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    _content_digest.cache_clear()
    assert converted_dir(str(f), str(tmp_path)) == first
    # a memo that can't be read is rebuilt
    memo.write_text("{not json")
    _content_digest.cache_clear()
    assert converted_dir(str(f), str(tmp_path)) != first
    assert len(json.loads(memo.read_text())) == 1
    assert [p.name for p in memo.parent.iterdir() if p.suffix == ".tmp"] == []


def test_auto_dtype_on_cpu_is_float32_and_emulated_bf16_is_flagged(monkeypatch, caplog):
    import torch
    from contextwise.backends import loading

    assert loading.pick_device("cpu", "auto") == ("cpu", torch.float32)  # exact by default
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="contextwise.backends.loading"):
        assert loading.pick_device("cpu", "bfloat16") == ("cpu", torch.bfloat16)
    assert "emulated, slower than 'float32'" in caplog.text
    caplog.clear()
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="contextwise.backends.loading"):
        loading.pick_device("cpu", "bfloat16")
    assert caplog.text == ""
    assert isinstance(loading.cpu_has_native_bf16(), bool)
