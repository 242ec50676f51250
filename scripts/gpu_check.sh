#!/usr/bin/env bash
# One call on the GPU machine (device tool): build with every core, run the
# CUDA tests (then a memcheck pass over a few), run the GPU benchmark, and
# leave everything under $OUT. The image there has torch, ninja, pytest and
# compute-sanitizer but no network, so nothing is installed from an index.
#   run: bash scripts/gpu_check.sh            (timeout_s ~ 540)
set -uo pipefail
OUT="${OUT:-/tmp/bigkernels-gpu}"
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1 MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1

start=$(date +%s)
if ! BIGKERNELS_PTXAS_VERBOSE=1 python3 -m pip install -v --no-build-isolation --no-deps --no-index -e . \
     > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"; grep -E "ptxas info +: Used" "$OUT/build.log" | sort | uniq -c

timeout 240 python3 -m pytest -q -m cuda tests 2>&1 | tee "$OUT/tests_cuda.log" | tail -15
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 -m pytest -q -x tests/test_dense.py -k "cuda and (large_tiles or misaligned or zero_size)" \
  > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$? (0 = clean)"; tail -3 "$OUT/memcheck.log"
timeout 240 python3 -m benchmarks --device cuda --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -30
echo "total: $(( $(date +%s) - start )) s"
