#!/usr/bin/env bash
# The dense forward's opt-in sm_90a CUTLASS path on the GPU machine (device
# tool), after scripts/gpu_check.sh: build it (BIGKERNELS_SM90=1), run the
# dense CUDA tests through it, benchmark it against the mma.sync kernel and
# cuBLAS. It turns nothing on by itself: the path stays opt-in (the build
# flag and BIGKERNELS_SM90=1 at run time) until its results are read.
# The machine has no network: carry CUTLASS's headers beside the tree,
#   here:   .venv/bin/python scripts/cutlass_headers.py --copy third_party/cutlass   (~27 MB)
#   device: bash scripts/gpu_check_sm90.sh    carry ["third_party/cutlass"], timeout_s 570
# $OUT gets four files: summary_sm90.txt, build_sm90.log, tests_sm90.log, bench_sm90.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bigkernels-gpu}"
SCRATCH="$(mktemp -d)"
mkdir -p "$OUT"
SUMMARY="$OUT/summary_sm90.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export CUTLASS_PATH="${CUTLASS_PATH:-$PWD/third_party/cutlass}"
PY="${PYTHON:-python3}"
say() { echo "$*" | tee -a "$SUMMARY"; }
if [ ! -f "$CUTLASS_PATH/include/cutlass/cutlass.h" ]; then
  say "STOP: no CUTLASS headers at $CUTLASS_PATH. On the CPU machine run"
  say "  .venv/bin/python scripts/cutlass_headers.py --copy third_party/cutlass"
  say "and carry third_party/cutlass with this command."
  exit 2
fi
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
if BIGKERNELS_CUDA=1 BIGKERNELS_SM90=1 BIGKERNELS_PTXAS_VERBOSE=1 timeout 300 "$PY" -m pip install -v \
     --no-build-isolation --no-deps --no-index -e . > "$OUT/build_sm90.log" 2>&1; then
  say "build: ok at $(elapsed) s"
else
  say "build: FAILED at $(elapsed) s; the end of build_sm90.log:"; tail -40 "$OUT/build_sm90.log" | tee -a "$SUMMARY"
  exit 1
fi
grep -E "C7510" "$OUT/build_sm90.log" | head -3 | tee -a "$SUMMARY"  # wgmma serialized: the mainloop would crawl
"$PY" scripts/ptxas_report.py "$OUT/build_sm90.log" | grep -iE "sm90|UNEXPECTED|kernel builds" >> "$SUMMARY"
export BIGKERNELS_SM90=1  # the path runs only when asked at run time too
say "sm90_dense: $("$PY" -c "import bigkernels; print(bigkernels.backend_info()['sm90_dense'])" 2>&1)"
limit=$(( 480 - $(elapsed) )); (( limit > 200 )) && limit=200  # the whole call stays under 500 s
timeout -k 5 "$limit" "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_dense.py -m cuda > "$OUT/tests_sm90.log" 2>&1
say "tests (dense through sm_90a): rc $? $(tail -1 "$OUT/tests_sm90.log") at $(elapsed) s"
limit=$(( 500 - $(elapsed) )); (( limit < 20 )) && limit=20
mkdir -p "$SCRATCH/bench_sm90"
timeout -k 5 "$limit" "$PY" -m benchmarks --device cuda --only dense --full --skip compile \
  --out "$SCRATCH/bench_sm90" > "$SCRATCH/bench_sm90/bench.log" 2>&1
say "benchmark: rc $? at $(elapsed) s"
tail -30 "$SCRATCH/bench_sm90/bench.log" >> "$SUMMARY"
tar -czf "$OUT/bench_sm90.tar.gz" -C "$SCRATCH" bench_sm90
say "total $(elapsed) s"
