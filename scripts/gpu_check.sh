#!/usr/bin/env bash
# One call on the GPU machine (device tool): build with every core, run the
# CUDA tests, run the GPU benchmark, then a memcheck pass and the
# torch.compile comparison while time remains; everything lands in $OUT.
# The image there has torch, ninja, pytest and compute-sanitizer but no
# network, so nothing is installed from an index.
#   device run: bash scripts/gpu_check.sh      (timeout_s 570; about 8 minutes)
set -uo pipefail
OUT="${OUT:-/tmp/bigkernels-gpu}"
mkdir -p "$OUT/bench" "$OUT/bench_compile"
export PYTHONUNBUFFERED=1 MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader  # printed, not saved: at most 8 files come back
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

if ! BIGKERNELS_PTXAS_VERBOSE=1 python3 -m pip install -v --no-build-isolation --no-deps --no-index -e . \
     > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
echo "build done at $(elapsed) s"; grep -E "ptxas info +: Used" "$OUT/build.log" | sort | uniq -c

timeout 240 python3 -m pytest -q -m cuda tests 2>&1 | tee "$OUT/tests_cuda.log" | tail -15
echo "tests done at $(elapsed) s"
# torch.compile's compile time would not fit here: it gets its own step below.
timeout 180 python3 -m benchmarks --device cuda --skip compile --out "$OUT/bench" 2>&1 \
  | tee "$OUT/bench.log" | tail -20
echo "benchmark done at $(elapsed) s"
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 -m pytest -q -x tests/test_dense.py tests/test_attention_cuda.py tests/test_rnn_cuda.py \
  -k "cuda and (large_tiles or misaligned or zero_size) or attention_cuda and (256 or nothing or empty or strided) or rnn_cuda and sizes and (1-1-1 or 3000)" \
  > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$? (0 = clean) at $(elapsed) s"; tail -3 "$OUT/memcheck.log"
timeout $(( 480 - $(elapsed) > 30 ? 480 - $(elapsed) : 30 )) python3 -m benchmarks --device cuda \
  --skip addmm_activation --skip matmul --out "$OUT/bench_compile" 2>&1 | tail -12
echo "total $(elapsed) s"
