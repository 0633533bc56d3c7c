#!/usr/bin/env bash
# Run the GPU tests and benchmarks on a GPU machine without network, from the repo
# root, with .gpu/ from benchmarks/offline_gpu/pack.sh beside it:
#
#   OUT=DIR bash benchmarks/offline_gpu/run.sh [STEP[:SECONDS] ...]
#
# Steps, in the order given (default: persistent decode layer):
#   persistent  the one-row persistent step's tests (tests/test_triton_persistent.py)
#   decode      python -m benchmarks.gpu_decode $DECODE_ARGS (the batch-1 and
#               256-request figures, the tile sweep, the engine on the fastest
#               one-row variant)
#   layer       tests/test_triton_decode.py -k "$LAYER_K" (all of it when empty)
#   gpu-tests   the Triton kernels' and the static decoder's tests, all of them but
#               those on the embedded model (its GGUF does not travel)
#   check       python -m benchmarks.gpu_check $CHECK_ARGS (quantization modes,
#               the prefix cache)
# Each step runs under `timeout` (its default, or SECONDS) and writes DIR/STEP.log;
# DIR/steps.tsv gets a line per step (name, exit status, seconds), DIR/env.txt the
# card and versions, and the benchmarks their JSON into DIR.
#
# The installed wheels run, not the source tree: tests and benchmarks run from a
# copy in /tmp, so the tree's contextwise/ folder (not a whole package: backends/
# and the others sit beside it) can't shadow the installed package.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
REPO=$PWD
: "${OUT:?set OUT to the folder for logs and results}"
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/cw-site}
RUN=/tmp/cw-run
DECODE_ARGS=${DECODE_ARGS:---no-int8 --no-torch --no-profile --greedy-checks 2}
LAYER_K=${LAYER_K-no_traffic or reuses_prefixes}
CHECK_ARGS=${CHECK_ARGS:-}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)  # absolute: the steps run elsewhere

STEPS="persistent decode layer gpu-tests check"
[ $# -gt 0 ] || set -- persistent decode layer
for step in "$@"; do  # all checked before any runs: a typo costs no GPU time
    [[ " $STEPS " == *" ${step%%:*} "* ]] ||
        { echo "run.sh: unknown step '$step' (steps: $STEPS)" >&2; exit 2; }
    [[ $step != *:* || ${step#*:} =~ ^[0-9]+$ ]] ||
        { echo "run.sh: '$step': the limit after ':' must be whole seconds" >&2; exit 2; }
done

if [ ! -d .gpu/whl ] || [ ! -f .gpu/model/config.json ]; then
    echo "run.sh: .gpu/ is missing or incomplete: run pack.sh where pip works" >&2
    exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .gpu/whl/*.whl || { echo "run.sh: installing .gpu/whl failed" >&2; exit 2; }
rm -rf "$RUN" && mkdir -p "$RUN" && cp -r benchmarks tests pyproject.toml "$RUN"/
export PYTHONPATH="$SITE:$RUN" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

(  # from the copy, as the steps run
    nvidia-smi -L 2>&1
    cd "$RUN" && "$PYTHON" -c 'import sys, torch, triton, transformers, contextwise
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("contextwise from", contextwise.__file__)' 2>&1
) | tee "$OUT/env.txt"

# pytest with the project's settings (warnings are errors), less pytest-asyncio's
# options, which these tests don't use and the image lacks
PYTEST=("$PYTHON" -m pytest -q -rs -p no:cacheprovider -W "ignore::pytest.PytestConfigWarning")

run_step() {  # name limit folder command...
    local name=$1 limit=$2 folder=$3 start rc
    shift 3
    start=$(date +%s)
    echo "== $name (at most $limit s)"
    (cd "$folder" && timeout -k 10 "$limit" "$@") >"$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" | tee -a "$OUT/steps.tsv"
    tail -n 15 "$OUT/$name.log"
}

for step in "$@"; do
    name=${step%%:*}
    limit=${step#"$name"}  # ":SECONDS" or empty
    limit=${limit#:}
    case $name in
        persistent)
            run_step "$name" "${limit:-170}" "$RUN/tests" "${PYTEST[@]}" test_triton_persistent.py ;;
        decode)
            # shellcheck disable=SC2086  # DECODE_ARGS is a list of options
            run_step "$name" "${limit:-330}" "$RUN" "$PYTHON" -m benchmarks.gpu_decode \
                --config-dir "$REPO/.gpu/model" --out "$OUT" $DECODE_ARGS ;;
        layer)
            run_step "$name" "${limit:-50}" "$RUN/tests" "${PYTEST[@]}" test_triton_decode.py \
                ${LAYER_K:+-k "$LAYER_K"} ;;
        gpu-tests)
            run_step "$name" "${limit:-300}" "$RUN/tests" "${PYTEST[@]}" -m "not model" \
                test_triton_decode.py test_triton_persistent.py test_static_decode.py ;;
        check)
            # shellcheck disable=SC2086  # CHECK_ARGS is a list of options
            run_step "$name" "${limit:-300}" "$RUN" "$PYTHON" -m benchmarks.gpu_check \
                --config-dir "$REPO/.gpu/model" --out "$OUT" $CHECK_ARGS ;;
    esac
done
