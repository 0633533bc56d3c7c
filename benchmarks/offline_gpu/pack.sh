#!/usr/bin/env bash
# Pack what a GPU machine without network needs to run this project's GPU tests and
# benchmarks (benchmarks/offline_gpu/run.sh there) into .gpu/ (git-ignored):
#
#   make install && bash benchmarks/offline_gpu/pack.sh
#
# - .gpu/whl: the contextwise wheel built from this tree, and wheels of the packages
#   a plain CUDA PyTorch image lacks (DEVICE_LACKS), at the versions this .venv holds,
#   for the GPU machine's Python (PYVER, default 3.12) on x86-64 Linux;
# - .gpu/model: the embedded model's config.json and tokenizer, without its weights
#   (the benchmarks build random weights of that shape: the GGUF is 94 MiB).
#
# Why: the machines lent to this project reach no registry and take at most 64 MiB
# with a call; this stays under 40 MiB. Only what the GPU paths import travels: the
# retrievers', the server's and LangChain's dependencies (faiss, gguf, fastapi,
# langchain, ...) do not.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
DEST=.gpu
LIMIT_MB=60
# Imported on the GPU paths, missing from the CUDA image (its torch, triton, numpy,
# tokenizers, huggingface_hub, accelerate, pytest, rich stay); transformers because
# the image's is older than pyproject.toml's lower bound; torchao for the quantized
# modes (benchmarks.gpu_check, gpu_decode's int8 row).
DEVICE_LACKS="transformers pydantic pydantic-core annotated-types typing-inspection
jsonschema jsonschema-specifications referencing rpds-py xgrammar apache-tvm-ffi torchao"

[ -x "$PY" ] || { echo "pack.sh: $PY not found: run 'make install' first" >&2; exit 2; }
rm -rf "$DEST/whl" "$DEST/model"
mkdir -p "$DEST/whl" "$DEST/model"

# setuptools would put a stale build/lib's leftovers (modules since removed) in the wheel
rm -rf build
"$PY" -m pip wheel -q --no-deps --no-build-isolation . -w "$DEST/whl"
rm -rf build

# shellcheck disable=SC2086  # one argument per name
pins=$("$PY" - $DEVICE_LACKS <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

pins = []
for name in sys.argv[1:]:
    try:
        pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"pack.sh: {name} is not installed in this .venv (run 'make install')")
print(" ".join(pins))
EOF
)
# shellcheck disable=SC2086  # one argument per pin
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST/whl" $pins

"$PY" - "$DEST/model" <<'EOF'
import shutil
import sys
from pathlib import Path

from contextwise.backends.loading import converted_dir, load_model, resolve

from benchmarks.gpu_check import TOKENIZER_FILES

kind, gguf = resolve("smollm2-135m-instruct")
load_model(gguf, device="cpu")  # converts the GGUF once (cached) if it never was
source = converted_dir(gguf, None)
for name in TOKENIZER_FILES:
    if (source / name).is_file():
        shutil.copy(source / name, Path(sys.argv[1]) / name)
print(f"model config and tokenizer from {source}")
EOF

size_mb=$(du -sm "$DEST" | cut -f1)
ls -l "$DEST/whl" "$DEST/model"
echo "$DEST: $size_mb MiB"
if [ "$size_mb" -gt "$LIMIT_MB" ]; then
    echo "pack.sh: $DEST is over $LIMIT_MB MiB: it would not travel" >&2
    exit 1
fi
