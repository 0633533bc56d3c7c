"""Weight quantization of a loaded chat model with torchao (`Local(quantization=...)`).

Modes (the policy field `Local.quantization`):

| mode | linear layers | where |
|---|---|---|
| `none` | as loaded (fp32 on CPU, bf16 on CUDA) | anywhere |
| `int8` | int8 weight-only, one scale per output row; activations stay float | CPU, CUDA |
| `int8-dynamic` | int8 weights and int8 activations quantized per token at run time | CPU, CUDA |
| `int4` | int4 weight-only, asymmetric, groups of 32 along the input (CPU: torchao's `Int4OpaqueTensor`, packed for ATen's `_weight_int4pack_mm_for_cpu`; CUDA: tinygemm tile-packed layout, bf16 only) | CPU, CUDA (bf16) |
| `fp8` | float8 (e4m3) weights and activations, one scale per row | CUDA, compute capability >= 8.9 (Ada, Hopper) only |

The embedding matrix, and the output head (lm_head) that SmolLM2 ties to it
(one [vocab, hidden] matrix, 21% of the 135M parameters), are handled apart
from the linear layers: in the int modes that one matrix is stored once, as
int8 with one scale per row (`Int8Rows`), and stays tied: `Int8Embedding`
gathers and scales only the rows a step looks up, `Int8Head` multiplies with
ATen's int8-weight kernel (see its doc for batches). torchao's `Int8Tensor`
would de-quantize the whole 49152x576 matrix on every lookup: 170 ms a decode
step on CPU. It is not put in int4: that would save another ~14 MB, but the
int4 layouts have no row lookup and the head's error lands on every logit.
Untied models get one `Int8Rows` each. In `fp8` both stay in the model's float
dtype.

Checked on an H100 (torch 2.11, torchao 0.18, SmolLM2-shaped random weights,
bf16, plain `generate`): every mode runs. There, int4's tile-packed layout pads
the input width 576 up to 1024, so int4 weights (139 MB) come out no smaller
than int8 (135 MB) for this model, though its decode is the fastest; and
int8-dynamic decodes far slower than bf16 at batch 1 (0.7 tok/s against 12):
prefer 'int8' or 'int4' on a GPU.

`weight_bytes(model)` sums the storage of every parameter and buffer, looking
inside torchao's tensor subclasses (packed data plus scales and zero points)
and counting shared storage (tied weights) once.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch

from contextwise.errors import BackendError

__all__ = [
    "INT4_GROUP_SIZE", "MODES", "Int8Embedding", "Int8Head", "Int8Rows", "check_mode",
    "import_torchao_quietly", "quantize", "return_freed_memory", "weight_bytes",
]

MODES = ("none", "int8", "int8-dynamic", "int4", "fp8")
INT4_GROUP_SIZE = 32  # 576 and 1536 (SmolLM2's widths) divide by it; 128 would skip layers
TORCHAO_REQUIREMENT = "torchao>=0.18,<0.19"


def check_mode(mode: str, device: str, dtype: Any = None) -> None:
    """Raise a BackendError when `mode` cannot run on `device` (with `dtype`)."""
    if mode not in MODES:
        raise BackendError(f"unknown quantization {mode!r}; known: {', '.join(MODES)}")
    kind = device.split(":")[0]
    if mode == "fp8":
        if kind != "cuda":
            raise BackendError(
                f"quantization 'fp8' needs a CUDA GPU with compute capability >= 8.9 "
                f"(Ada or Hopper); device is {device!r}: use 'int8' or 'int4' there"
            )
        cap = torch.cuda.get_device_capability(torch.device(device))
        if cap < (8, 9):
            raise BackendError(
                f"quantization 'fp8' needs compute capability >= 8.9 (Ada or Hopper); "
                f"{device!r} ({torch.cuda.get_device_name(torch.device(device))}) has "
                f"{cap[0]}.{cap[1]}: use 'int8' or 'int4'"
            )
    if mode == "int4" and kind == "cuda" and dtype is not None and dtype != torch.bfloat16:
        raise BackendError(
            f"quantization 'int4' on {device!r} needs dtype 'bfloat16' (got {dtype}); "
            "set Local(dtype='bfloat16') or leave dtype 'auto'"
        )
    if mode != "none" and kind not in ("cpu", "cuda"):
        raise BackendError(f"quantization {mode!r} runs on CPU or CUDA, not on {device!r}")


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """torchao logs a warning per optional CUDA extension it cannot load on import."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def import_torchao_quietly() -> None:
    """Import torchao, if installed, with its import-time warnings silenced.

    transformers imports torchao inside `from_pretrained` whenever it is
    installed, and torchao then logs a warning per CUDA extension it cannot
    load (on CPU: always); importing it here first keeps model loads quiet.
    """
    import importlib.util

    if importlib.util.find_spec("torchao") is not None:
        with _quiet_import():
            import torchao  # noqa: F401

            with contextlib.suppress(ImportError):  # what transformers' loader pulls in
                import transformers.integrations.torchao  # noqa: F401


def _torchao(mode: str) -> Any:
    try:
        with _quiet_import():
            import torchao.quantization as tq
    except ImportError as e:
        raise BackendError(
            f"quantization {mode!r} needs torchao: pip install '{TORCHAO_REQUIREMENT}' ({e})"
        ) from None
    return tq


def _linear_config(mode: str, device: str) -> Any:
    tq = _torchao(mode)
    if mode == "int8":
        return tq.Int8WeightOnlyConfig()
    if mode == "int8-dynamic":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if mode == "int4":
        if device.startswith("cuda"):
            return tq.Int4WeightOnlyConfig(
                group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d"
            )
        with _quiet_import():
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        return PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP_SIZE)
    if mode == "fp8":
        from torchao.quantization.granularity import PerRow

        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    raise BackendError(f"unknown quantization {mode!r}; known: {', '.join(MODES)}")


def quantize(model: Any, mode: str, device: str, weights: Any = None) -> Any:
    """Quantize `model` (already on `device`) in place for `mode`; returns it.

    `weights` (a `CheckpointReader` of the folder the model was loaded from)
    lets a CPU model quantize one layer at a time from float weights read anew
    from the file, instead of reading them through transformers' memory map,
    which keeps every page read resident (the int8 load of SmolLM2 peaks
    ~890 MB lower this way; see benchmarks/quantization.py). Weights it does
    not hold, by name and shape, are read from the model as before.

    Raises BackendError for an unknown mode, a mode the device cannot run
    (fp8 off Hopper/Ada, int4 on CUDA without bf16), a missing torchao, or a
    model none of whose linear layers could be quantized.
    """
    dtype = next(model.parameters()).dtype
    check_mode(mode, device, dtype)
    if mode == "none":
        return model
    config = _linear_config(mode, device)
    tq = _torchao(mode)
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is not None and inp is not None and out.weight is inp.weight
    heads = {id(m) for m in (inp, out) if m is not None}

    def body(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and id(module) not in heads

    targets = [n for n, m in model.named_modules() if body(m, n)]
    modules = dict(model.named_modules())
    names: dict[int, str] = {}  # a tied matrix keeps its first name (the stored one)
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)

    def rows_of(param: Any) -> Any:
        """(start, end) -> those rows of `param` as floats of its dtype, from the
        checkpoint file when it holds them (see `weights` above) and its first
        row equals the loaded one (else transformers changed it while loading)."""
        name = names.get(id(param))
        if (weights is not None and name and param.device.type == "cpu"
                and weights.has(name, param) and param.shape[0]
                and torch.equal(weights.read(name, (0, 1)).to(param.dtype)[0],
                                param.detach()[0])):
            return lambda i, j: weights.read(name, (i, j)).to(param.dtype)
        return lambda i, j: param.detach()[i:j]

    # torchao's CPU int4 matmul is ~80x slower with fp32 activations than with bf16
    # ones (a 512-token prefill of one 576x1536 layer: 400 ms against 5 ms): int4
    # layers of a float32 model on CPU get bf16 weights and cast their input/output.
    cast = mode == "int4" and device.startswith("cpu") and dtype != torch.bfloat16
    try:
        with _quiet_import(), torch.no_grad():
            for n in targets:  # one layer at a time: one float weight in memory at once
                layer = modules[n]
                w = rows_of(layer.weight)(0, layer.weight.shape[0])
                layer.weight = torch.nn.Parameter(
                    w.to(torch.bfloat16) if cast else w, requires_grad=False
                )
                parent = modules[n.rpartition(".")[0]]
                tq.quantize_(parent, config, filter_fn=lambda m, _fqn, layer=layer: m is layer)
                if cast:
                    _compute_in(layer, torch.bfloat16, dtype)
                return_freed_memory()
            if mode != "fp8":
                _int8_embeddings(model, inp, out, tied, rows_of)
    except BackendError:
        raise
    except Exception as e:  # torchao asserts on unsupported shapes, dtypes or hardware
        raise BackendError(
            f"quantization {mode!r} failed on {device!r}: {type(e).__name__}: {e}"
        ) from e
    _own_plain_tensors(model)
    return_freed_memory()
    done = [n for n in targets if _is_quantized(modules[n].weight)]
    if targets and not done:
        raise BackendError(
            f"quantization {mode!r} left all {len(targets)} linear layers unquantized "
            "(their shapes do not fit the format)"
        )
    model.contextwise_quantization = {"mode": mode, "layers": len(done), "of": len(targets)}
    return model


class Int8Rows(torch.nn.Module):
    """A [rows, dim] matrix stored as int8 with one float scale per row (symmetric).

    `read_rows(start, end)` (default: slices of `weight`) supplies the float rows,
    `CHUNK` at a time, so the float temporaries stay small; `weight` then only
    gives the shape, dtype and device.
    """

    CHUNK = 4096
    qdata: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: Any, read_rows: Any = None):
        super().__init__()
        rows, dim = (int(n) for n in weight.shape)
        read = read_rows or (lambda i, j: weight.detach()[i:j])
        qdata = torch.empty(rows, dim, dtype=torch.int8, device=weight.device)
        scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
        for i in range(0, rows, self.CHUNK):
            j = min(i + self.CHUNK, rows)
            w = read(i, j).to(weight.device).float()
            s = w.abs().amax(dim=1).clamp(min=1e-12) / 127
            qdata[i:j] = (w / s[:, None]).round().clamp(-127, 127).to(torch.int8)
            scale[i:j] = s
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale.to(weight.dtype))
        self.dtype = weight.dtype


class Int8Embedding(torch.nn.Module):
    """Embedding lookup on `Int8Rows`: gathers only the rows it needs (torchao's
    Int8Tensor de-quantizes the whole matrix on every lookup: 170 ms a step here)."""

    def __init__(self, rows: Int8Rows, padding_idx: int | None = None):
        super().__init__()
        self.rows = rows
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = (int(n) for n in rows.qdata.shape)

    def forward(self, ids: Any) -> Any:
        r = self.rows
        return r.qdata[ids].to(r.dtype) * r.scale[ids].unsqueeze(-1)


class Int8Head(torch.nn.Module):
    """The output head on `Int8Rows`.

    On CPU, one or two rows of input go through ATen's int8-weight matmul (no
    float copy of the matrix: 21 ms for SmolLM2's 49152x576 head against 65 ms
    for de-quantize + matmul); that kernel's time grows with the rows (190 ms
    at 16), so more rows (batched decode, prefill of all positions) de-quantize
    the matrix in slices of `CHUNK` rows and multiply (~50 ms at 16 rows), which
    keeps the float copy small.
    """

    CHUNK = 8192

    def __init__(self, rows: Int8Rows):
        super().__init__()
        self.rows = rows
        self.out_features, self.in_features = (int(n) for n in rows.qdata.shape)

    def forward(self, x: Any) -> Any:
        r = self.rows
        flat = x.reshape(-1, x.shape[-1])
        scale = r.scale.to(x.dtype)
        if flat.device.type == "cpu" and flat.shape[0] <= 2:
            y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), r.qdata, scale)
        else:
            y = flat.new_empty(flat.shape[0], self.out_features)
            for i in range(0, self.out_features, self.CHUNK):
                j = min(i + self.CHUNK, self.out_features)
                torch.mm(flat, r.qdata[i:j].t().to(x.dtype), out=y[:, i:j])
            y *= scale
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _int8_embeddings(model: Any, inp: Any, out: Any, tied: bool, rows_of: Any) -> None:
    """Store the input embedding and the output head as int8 rows (once, when tied);
    `rows_of(param)` reads a float matrix's rows (see `quantize`)."""
    rows = None
    if isinstance(inp, torch.nn.Embedding):
        rows = Int8Rows(inp.weight, rows_of(inp.weight))
        model.set_input_embeddings(Int8Embedding(rows, inp.padding_idx))
    if isinstance(out, torch.nn.Linear) and out.bias is None:
        head_rows = rows if tied and rows is not None else Int8Rows(out.weight, rows_of(out.weight))
        model.set_output_embeddings(Int8Head(head_rows))
    # transformers re-ties on some calls (resize, save): nothing left to tie
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def _own_plain_tensors(model: Any) -> None:
    """Copy the parameters and buffers left unquantized (norms, biases) into memory
    of their own: transformers loads safetensors as views of one memory-mapped file,
    and a single small view left over keeps the whole float file mapped (540 MB of
    resident pages for SmolLM2 once a forward pass has touched them)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Int8Rows):  # made here, in memory already
                continue
            for p in module.parameters(recurse=False):
                if not _is_quantized(p):
                    p.data = p.data.clone()
            for name, b in list(module.named_buffers(recurse=False)):
                if b is not None and not _is_quantized(b):
                    setattr(module, name, b.clone())


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None off glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc). torchao's per-layer temporaries
    otherwise stay in the heap, fragmented under the int8 weights allocated
    after them: ~260 MB of the int8 load's peak for SmolLM2 (~1 ms a call)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _compute_in(layer: Any, compute: Any, out: Any) -> None:
    """Run `layer` on `compute`-dtype input and hand back `out`-dtype output."""
    layer.register_forward_pre_hook(lambda _m, args: (args[0].to(compute), *args[1:]))
    layer.register_forward_hook(lambda _m, _args, y: y.to(out))


def _is_quantized(t: Any) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(t)


def _leaves(t: Any) -> Iterator[Any]:
    """The plain tensors that hold `t`'s data (inside torchao's tensor subclasses)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if inner is not None:
                yield from _leaves(inner)
    else:
        yield t


def weight_bytes(model: Any) -> int:
    """Bytes of storage held by the model's parameters and buffers, shared storage once."""
    import itertools

    seen: set[tuple[str, int]] = set()
    total = 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        for leaf in _leaves(t):
            storage = leaf.untyped_storage()
            key = (str(leaf.device), storage.data_ptr())
            if storage.data_ptr() and key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total
