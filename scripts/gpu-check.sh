#!/usr/bin/env bash
# gpu-check.sh: the checks of the GPU tier that need a real NVIDIA GPU, in one short run (< 5 min).
#
#   bash scripts/gpu-check.sh [OUT_DIR]      # after `make setup` (the lock has cuda-bindings, NVML)
#
# STATUS: WRITTEN, NEVER RUN. Every session so far ran without a GPU; the CUDA backend
# (tierd/gpu/cuda.py, client/gpu_cuda.py) is reviewed but unverified until this script has run
# on a GPU machine and its output is in the issue's note.
#
# What it runs, each step's output also saved under OUT_DIR (default: gpu-check-out/):
#   1. the machine: nvidia-smi, torch's CUDA build, the cuda-bindings version
#   2. the CUDA half of tests/test_gpu_tier.py (pytest -m gpu), then the simulated half as a control
#   3. scripts/gpu_check.py: a 1 GiB slab imported and mapped in a second process (bf16 checksum
#      compared); a write through its read-only mapping fails; pinned vs pageable H2D at 2 MiB,
#      64 MiB and 1 GiB; promotion on the copy stream beside a matmul loop (step time with and
#      without); a killed client's device memory comes back (NVML) once the daemon drops the entry
#   4. bench/bench_gpu.py --backend cuda --quick (promotion throughput against memcpy)
# Exit status: the number of failed steps (0 = all passed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-gpu-check-out}
mkdir -p "$OUT"
failed=0
step() {  # step NAME COMMAND...: run, tee to OUT/NAME.log, count a failure
  local name=$1
  shift
  echo "== $name: $*"
  if timeout 240 "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "== $name: ok"
  else
    echo "== $name: FAILED"
    failed=$((failed + 1))
  fi
}
step machine bash -c "nvidia-smi && $PY -c 'import torch, cuda.bindings as cb; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), \"cuda-bindings\", cb.__version__)'"
step tests-cuda "$PY" -m pytest -q -rs -m gpu tests/test_gpu_tier.py
step tests-simulated "$PY" -m pytest -q -rs -m "not gpu" tests/test_gpu_tier.py
step device-checks "$PY" scripts/gpu_check.py --json "$OUT/device-checks.json"
step bench "$PY" bench/bench_gpu.py --backend cuda --quick --json "$OUT/bench.json"
echo "gpu-check: $failed step(s) failed; logs in $OUT/"
exit "$failed"
