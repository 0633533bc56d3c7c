"""Read single tensors (or row ranges) of a safetensors checkpoint into fresh memory.

transformers loads safetensors as views of a memory-mapped file: cheap until
the weights are read, but every page read stays resident while the mapping
lives. Quantization reads every float weight once and then drops it; read
through the mapping, the whole float file ends up resident next to the
quantized copy. `CheckpointReader` reads the bytes of one tensor, or of some
of its rows, with plain file reads into memory that is freed with the tensor,
so a quantized load holds one layer's float weights at a time.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointReader"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16}


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file


class CheckpointReader:
    """The float tensors of a model folder's weights, by name: the files its
    `model.safetensors.index.json` maps, else `model.safetensors` (the files
    transformers loads), else none (every lookup then misses)."""

    def __init__(self, folder: str | Path):
        self.entries: dict[str, _Entry] = {}
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        wanted: dict[str, set[str]] | None = None  # file -> the names it serves
        if index.is_file():
            wanted = {}
            for name, file in json.loads(index.read_text())["weight_map"].items():
                wanted.setdefault(file, set()).add(name)
        elif (folder / "model.safetensors").is_file():
            wanted = {"model.safetensors": set()}  # set(): every name in it
        for file, names in (wanted or {}).items():
            path = folder / file
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            for name, info in header.items():
                dtype = _DTYPES.get(info.get("dtype", "")) if isinstance(info, dict) else None
                if name == "__metadata__" or dtype is None or (names and name not in names):
                    continue
                self.entries[name] = _Entry(path, dtype, tuple(info["shape"]),
                                            8 + size + info["data_offsets"][0])

    def has(self, name: str, like: Any) -> bool:
        """Whether `name` is stored with the shape of tensor `like` (else the
        caller keeps using `like` itself: renamed or reshaped on load)."""
        e = self.entries.get(name)
        return e is not None and e.shape == tuple(like.shape)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` (or its rows [start, end) along the first dimension) in
        its stored dtype, in memory of its own."""
        e = self.entries[name]
        shape = list(e.shape)
        row_bytes = e.dtype.itemsize
        for n in shape[1:]:
            row_bytes *= n
        start, end = rows if rows is not None else (0, shape[0] if shape else 1)
        if shape:
            shape[0] = end - start
        buf = torch.empty(max(end - start, 0) * row_bytes, dtype=torch.uint8)
        with open(e.path, "rb", buffering=0) as f:
            f.seek(e.begin + start * row_bytes)
            view = buf.numpy().data  # uint8, one dimension: a byte view already
            got = 0
            while got < len(view):  # a raw read may return fewer bytes than asked
                n = f.readinto(view[got:])
                if not n:
                    raise OSError(f"{e.path}: file ends inside tensor {name!r}")
                got += n
        return buf.view(e.dtype).reshape(shape)
