#!/usr/bin/env bash
# Optional, after scripts/gpu_check.sh: the GPU benchmark's torch.compile
# comparison, whose compile time does not fit in the check's budget.
#   device run: bash scripts/gpu_bench_compile.sh     timeout_s 570
# $OUT gets two files: bench_compile.log and bench_compile.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bigkernels-gpu}"
SCRATCH="$(mktemp -d)"
mkdir -p "$OUT" "$SCRATCH/bench_compile"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
PY="${PYTHON:-python3}"
start=$(date +%s)
if ! BIGKERNELS_CUDA=1 timeout 300 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . \
     > "$OUT/bench_compile.log" 2>&1; then
  echo "build failed:"; tail -40 "$OUT/bench_compile.log"; exit 1
fi
limit=$(( 540 - ($(date +%s) - start) ))  # the whole call stays under 540 s
timeout -k 5 "$limit" "$PY" -m benchmarks --device cuda --skip addmm_activation --skip matmul \
  --out "$SCRATCH/bench_compile" >> "$OUT/bench_compile.log" 2>&1
echo "benchmark rc $?"; tail -20 "$OUT/bench_compile.log"
tar -czf "$OUT/bench_compile.tar.gz" -C "$SCRATCH" bench_compile
