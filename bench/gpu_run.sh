#!/usr/bin/env bash
# The GPU sizes of the benchmarks in one device-tool call (issue 7): about 9 minutes on an H100.
#
# The device machine's image has torch, transformers, peft, accelerate and safetensors but not diffusers (see
# /work/.library/device/KINDS.md), so carry diffusers and its one missing need as wheels. Here, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#
# then call the device tool's run with carry [".whl"] and the command `bash bench/gpu_run.sh` (timeout_s 600).
# Each result lands in $OUT/<name>.txt; paste them into bench/RESULTS.md with the device named in the reply.
set -u -o pipefail
OUT=${OUT:-/tmp/bench-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
fi
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt" || exit 1
import accelerate, diffusers, peft, torch, transformers
print("torch", torch.__version__, "| cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0),
      "| diffusers", diffusers.__version__, "| peft", peft.__version__, "| transformers", transformers.__version__,
      "| accelerate", accelerate.__version__)
PY
run() {  # name, seconds, script and arguments
    local name=$1 limit=$2
    shift 2
    echo "== $(date -u) $name: python3 $*" | tee "$OUT/$name.txt"
    timeout "$limit" python3 "$@" 2>&1 | grep -v -i "warn" | tee -a "$OUT/$name.txt"
}
run train_sd15 270 bench/train_step.py --size sd15 --repeat 2
run mix_sd15_cuda 80 bench/mix_apply.py --size sd15 --repeat 3 --dtype bf16 --device cuda
run train_sdxl 190 bench/train_step.py --size sdxl --repeat 1
