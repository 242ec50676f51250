#!/usr/bin/env bash
# The dense forward's sm_90a CUTLASS path on the GPU machine (device tool),
# after scripts/gpu_check.sh: build it (BIGKERNELS_SM90=1), run the dense CUDA
# tests through it, and benchmark it against the mma.sync kernel and cuBLAS.
# The machine has no network: carry CUTLASS's headers beside the tree,
#   here:   .venv/bin/python scripts/cutlass_headers.py --copy third_party/cutlass
#   device: run with carry ["third_party/cutlass"]: bash scripts/gpu_check_sm90.sh   (timeout_s 570)
set -uo pipefail
OUT="${OUT:-/tmp/bigkernels-gpu}"
mkdir -p "$OUT/bench_sm90"
export PYTHONUNBUFFERED=1 MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" BIGKERNELS_SM90=1
export CUTLASS_PATH="${CUTLASS_PATH:-$PWD/third_party/cutlass}"
if [ ! -f "$CUTLASS_PATH/include/cutlass/cutlass.h" ]; then
  echo "no CUTLASS headers at $CUTLASS_PATH: on the CPU machine run"
  echo "  .venv/bin/python scripts/cutlass_headers.py --copy third_party/cutlass"
  echo "and carry third_party/cutlass with this command"
  exit 2
fi
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
if ! BIGKERNELS_PTXAS_VERBOSE=1 python3 -m pip install -v --no-build-isolation --no-deps --no-index -e . \
     > "$OUT/build_sm90.log" 2>&1; then
  tail -40 "$OUT/build_sm90.log"; exit 1
fi
echo "build done at $(elapsed) s"; grep -E "C7510" "$OUT/build_sm90.log" | head -3
python3 -c "import bigkernels; print(bigkernels.backend_info()['sm90_dense'])"
timeout 200 python3 -m pytest -q tests/test_dense.py -m cuda 2>&1 | tee "$OUT/tests_sm90.log" | tail -15
echo "tests done at $(elapsed) s"
timeout $(( 500 - $(elapsed) > 60 ? 500 - $(elapsed) : 60 )) python3 -m benchmarks --device cuda --only dense --full \
  --skip compile --out "$OUT/bench_sm90" 2>&1 | tail -30
echo "total $(elapsed) s"
