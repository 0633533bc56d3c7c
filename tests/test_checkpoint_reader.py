"""CheckpointReader: single tensors and row ranges of safetensors files, read into
memory of their own."""

from __future__ import annotations

import json

import pytest
import torch
from contextwise.backends.checkpoint_reader import CheckpointReader
from safetensors.torch import save_file


@pytest.fixture()
def folder(tmp_path):
    torch.manual_seed(0)
    save_file({"a.weight": torch.randn(300, 7), "b.bias": torch.randn(5).to(torch.bfloat16),
               "ids": torch.arange(4)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"c.weight": torch.randn(3, 2, 4).half(), "scalar": torch.tensor(2.5),
               "not.in.the.index": torch.zeros(2)},
              tmp_path / "model-00002-of-00002.safetensors")
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": first, "b.bias": first, "ids": first, "c.weight": second,
        "scalar": second}}))
    return tmp_path


def test_reads_every_float_tensor_of_every_shard(folder):
    from safetensors.torch import load_file

    stored = {**load_file(folder / "model-00001-of-00002.safetensors"),
              **load_file(folder / "model-00002-of-00002.safetensors")}
    reader = CheckpointReader(folder)
    # ints skipped, and names the index does not map
    assert set(reader.entries) == {"a.weight", "b.bias", "c.weight", "scalar"}
    for name in reader.entries:
        got = reader.read(name)
        assert got.dtype == stored[name].dtype and torch.equal(got, stored[name])


def test_row_ranges_and_fresh_memory(folder):
    reader = CheckpointReader(folder)
    whole = reader.read("a.weight")
    assert torch.equal(reader.read("a.weight", (10, 137)), whole[10:137])
    assert torch.equal(reader.read("c.weight", (1, 3)), reader.read("c.weight")[1:3])
    assert reader.read("a.weight", (5, 5)).shape == (0, 7)
    whole += 1  # writable, and not shared with a later read
    assert not torch.equal(reader.read("a.weight"), whole)


def test_has_checks_name_and_shape(folder):
    reader = CheckpointReader(folder)
    assert reader.has("a.weight", torch.empty(300, 7))
    assert not reader.has("a.weight", torch.empty(7, 300))
    assert not reader.has("missing", torch.empty(1))


def test_a_truncated_file_is_a_clear_error(folder):
    reader = CheckpointReader(folder)
    path = folder / "model-00001-of-00002.safetensors"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(OSError, match="ends inside tensor"):
        for name in ("a.weight", "b.bias"):
            reader.read(name)


def test_only_the_files_transformers_would_load(tmp_path):
    assert CheckpointReader(tmp_path).entries == {}
    save_file({"w": torch.ones(2, 2)}, tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(2, 2), "x": torch.zeros(1)}, tmp_path / "consolidated.safetensors")
    reader = CheckpointReader(tmp_path)
    assert set(reader.entries) == {"w"} and torch.equal(reader.read("w"), torch.ones(2, 2))
