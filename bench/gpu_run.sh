#!/usr/bin/env bash
# bench/cuda_check.py and the GPU sizes of the benchmarks in one device-tool call (issue 7): under 10 minutes.
#
# The device machine's image has torch, transformers, accelerate and safetensors but not diffusers (see
# /work/.library/device/KINDS.md), so carry diffusers, its missing needs and the peft this project tests with as
# wheels. Here, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata lazy-importer peft==0.21.2
#
# then call the device tool's run with carry [".whl"] and the command `bash bench/gpu_run.sh` (timeout_s 600).
# A short CUDA smoke run of both training variants goes first and stops the script if it fails, so a broken
# setup costs seconds, not the lease. Each result lands in $OUT/<name>.txt (8 files: the most the device tool
# returns; runs of one name append to one file); paste them into bench/RESULTS.md
# with the device named in the reply. SMOKE=1 swaps every size for tiny (to check the script on a CPU).
set -u -o pipefail
OUT=${OUT:-/tmp/bench-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
fi
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt" || exit 1
import accelerate, diffusers, peft, torch, transformers
import lora_studio  # noqa: F401  (fails here, not in the first worker, if the package cannot import)
print("torch", torch.__version__, "| cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0),
      "| diffusers", diffusers.__version__, "| peft", peft.__version__, "| transformers", transformers.__version__,
      "| accelerate", accelerate.__version__)
PY
size() { [ "${SMOKE:-0}" = 1 ] && echo tiny || echo "$1"; }
DEADLINE=${DEADLINE:-575}  # seconds after START by which every run has ended (the device call's limit is 600)
run() {  # name, seconds, script and arguments; the limit shrinks to what is left before DEADLINE
    local name=$1 limit=$2 left=$(( DEADLINE - ($(date +%s) - START) ))
    shift 2
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -lt 20 ] && { echo "== $name skipped: ${left} s left" | tee -a "$OUT/$name.txt"; return 1; }
    echo "== $(date -u) (+$(( $(date +%s) - START )) s) $name: python3 $*" | tee -a "$OUT/$name.txt"
    timeout "$limit" python3 "$@" 2>&1 | grep -v -i "warn" | tee -a "$OUT/$name.txt"
}
# In priority order: what this session's changes need checked first. The DEADLINE cuts the tail if the machine is
# slow; RUNS="smoke mix_sd15_cuda" (names below) runs only those.
want() { [ -z "${RUNS:-}" ] || [[ " $RUNS " == *" $1 "* ]]; }
dev=$([ "${SMOKE:-0}" = 1 ] && echo cpu || echo cuda)
if want smoke; then
    run smoke 90 bench/train_step.py --size tiny --batches 1 --warmup 1 --steps 2 --repeat 1 --precision bf16 || exit 1
    grep -q "^RATIO" "$OUT/smoke.txt" || { echo "smoke run printed no ratio line: stopping"; exit 1; }
fi
want mix_sd15_cuda && run mix_sd15_cuda 70 bench/mix_apply.py --size "$(size sd15)" --repeat 3 --dtype bf16 --device "$dev"
want cuda_check && run cuda_check 150 bench/cuda_check.py $([ "${SMOKE:-0}" = 1 ] && echo --dry-run) ${CHECKS:-}
want train_sd15 && run train_sd15 150 bench/train_step.py --size "$(size sd15)" --repeat 1
want compile_sd15_b1 && run compile_sd15_b1 220 bench/train_step.py --size "$(size sd15)" --repeat 1 --batches 1 \
    --compile --compile-mode reduce-overhead
want profile_sd15 && run profile_sd15 90 bench/train_step.py --size "$(size sd15)" --repeat 1 --batches 1 --profile 3
# what lean_backward costs on the GPU: ours with and without it at batch 4, each against the baseline, profiled
want lean_ab && run lean_ab 110 bench/train_step.py --size "$(size sd15)" --repeat 1 --batches 4 --profile 2
want lean_ab && run lean_ab 110 bench/train_step.py --size "$(size sd15)" --repeat 1 --batches 4 --profile 2 --no-lean
# one file for both batch sizes (the device tool returns at most 8 files); separate runs, so one can fail alone
want train_sdxl && run train_sdxl 110 bench/train_step.py --size "$(size sdxl)" --repeat 1 --batches 1
want train_sdxl && run train_sdxl 110 bench/train_step.py --size "$(size sdxl)" --repeat 1 --batches 2
echo "== done after $(( $(date +%s) - START )) s"
