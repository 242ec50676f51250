#!/usr/bin/env bash
# One call on the GPU machine (device tool), a complete verdict: build with
# CUDA on every core, then the CUDA tests by risk (RNN first, under its own
# timeout: a wrong grid barrier hangs rather than fails; then dense, then
# attention, then the rest), a memcheck pass, the GPU benchmark. Each step
# has its own timeout and writes its result to summary.txt as soon as it
# ends, so a step that hangs still leaves the earlier verdicts. About 7
# minutes in all; torch.compile's comparison is scripts/gpu_bench_compile.sh.
#
#   device run: bash scripts/gpu_check.sh      timeout_s 540, no carry
#
# $OUT gets exactly these files (the device tool returns at most 8):
#   summary.txt     the verdict: GPU, build, kernel resources (spills),
#                   per-family test counts, observed tensor-core errors,
#                   memcheck, the benchmark table
#   build.log       the build with ptxas's resource report
#   tests.log       every pytest step, verbose (a hang shows as the last test named)
#   memcheck.log    compute-sanitizer's memcheck pass
#   bench.log       the benchmark's output
#   bench.tar.gz    the benchmark's results folder (json, plots)
# The image there has torch, ninja, pytest and compute-sanitizer but no
# network, so nothing is installed from an index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bigkernels-gpu}"
SCRATCH="$(mktemp -d)"  # whatever a step writes beyond the six files
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"; : > "$OUT/tests.log"
export PYTHONUNBUFFERED=1 BIGKERNELS_PRINT_ERRORS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
PY="${PYTHON:-python3}"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( ${BUDGET_S:-420} - $(elapsed) )); }  # seconds left of the script's budget (build included)

say "# bigkernels GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
say "gpu: ${gpu:-none visible (nvidia-smi missing or failed)}"

# ---- build (forced to include CUDA) ----
# BUILD_TIMEOUT_S: 300 s is ample on the GPU machine's 16 cores; a 2-core machine needs ~1200.
BIGKERNELS_CUDA=1 BIGKERNELS_PTXAS_VERBOSE=1 timeout "${BUILD_TIMEOUT_S:-300}" "$PY" -m pip install -v \
  --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1
rc=$?
if (( rc == 0 )); then
  say "build: ok at $(elapsed) s (archs $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
else
  (( rc == 124 )) && why="timed out after ${BUILD_TIMEOUT_S:-300} s" || why="failed (rc $rc)"
  say "build: $why at $(elapsed) s; the end of build.log:"; tail -40 "$OUT/build.log" | tee -a "$SUMMARY"
  exit 1
fi
if ! "$PY" -c "import bigkernels, sys; sys.exit(0 if bigkernels.backend_info()['cuda_compiled'] else 1)" \
     >> "$SUMMARY" 2>&1; then
  say "STOP: bigkernels.backend_info()['cuda_compiled'] is false: the build left the CUDA kernels out, so every"
  say "CUDA test would skip. Check that nvcc is on PATH and torch is a CUDA build (build.log)."
  exit 3
fi
say "backend: $("$PY" -c "import bigkernels, json; print(json.dumps(bigkernels.backend_info()))" 2>&1)"

# ---- kernel resources: the whole build's ptxas report ----
{ echo; echo "## kernel resources (ptxas, from build.log)"; "$PY" scripts/ptxas_report.py "$OUT/build.log" --check
  echo "spill check rc=$? (0: no spill outside ALLOWED_SPILLS)"; echo; } >> "$SUMMARY" 2>&1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "STOP: no GPU: torch.cuda.is_available() is false. The build above is all this machine can check;"
  say "run this script on the GPU machine (device tool), as docs/PERFORMANCE.md says."
  exit 4
fi

# ---- CUDA tests by risk, each with its own timeout ----
# run_tests NAME SECONDS PYTEST-ARGS...: one pytest step, its counts in the summary.
run_tests() {
  local name=$1 limit=$2; shift 2
  if (( $(left) < 20 )); then say "tests $name: NOT RUN (the budget is spent)"; return; fi
  (( limit > $(left) )) && limit=$(left)
  echo "===== $name: pytest $* (timeout $limit s)" >> "$OUT/tests.log"
  timeout -k 5 "$limit" "$PY" -m pytest -v -s -rfE -p no:cacheprovider "$@" > "$SCRATCH/step.log" 2>&1
  local rc=$?
  cat "$SCRATCH/step.log" >> "$OUT/tests.log"
  local counts; counts=$(grep -E "^=+ .*(passed|failed|error|skipped|deselected).* in [0-9.]+s" "$SCRATCH/step.log" | tail -1)
  if (( rc == 124 || rc == 137 )); then
    say "tests $name: TIMED OUT after $limit s (a hang?); last test started: $(grep -E '::' "$SCRATCH/step.log" | tail -1 | cut -c1-160)"
  else
    say "tests $name: rc $rc ${counts:-no summary line} at $(elapsed) s"
  fi
  grep -E "^(FAILED|ERROR) " "$SCRATCH/step.log" | head -15 | sed 's/^/    /' | tee -a "$SUMMARY"
  grep -hE "^observed-error" "$SCRATCH/step.log" | sort -k2 -gr | head -12 | sed "s/^/    /" >> "$SUMMARY"  # the closest to their bounds
}
run_tests rnn 120 -m cuda tests/test_rnn_cuda.py
run_tests dense 75 -m cuda tests/test_dense.py
run_tests attention 110 -m cuda tests/test_attention_cuda.py
run_tests losses 75 -m cuda tests/test_losses.py
run_tests others 60 -m cuda tests --ignore=tests/test_rnn_cuda.py --ignore=tests/test_dense.py \
  --ignore=tests/test_attention_cuda.py --ignore=tests/test_losses.py --ignore=tests/test_cuda_emulation.py

# ---- memcheck on a few small cases of each family ----
if (( $(left) > 60 )); then
  timeout -k 5 60 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" -m pytest -q -x -p no:cacheprovider -m cuda tests/test_rnn_cuda.py tests/test_dense.py tests/test_attention_cuda.py \
    tests/test_losses.py \
    -k "large_tiles or misaligned or zero_size or strided_inputs or empty_ranges and causal-67-131 or sizes_on_cuda and 1-1-1 or blocked_ignore_index_and_empty" \
    > "$OUT/memcheck.log" 2>&1
  rc=$?
  say "memcheck: rc $rc (0 clean, 9 errors found, 124 timed out) at $(elapsed) s: $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/memcheck.log" | tail -2 | tr '\n' ' ')"
else
  say "memcheck: NOT RUN (the budget is spent)" | tee "$OUT/memcheck.log"
fi

# ---- the GPU benchmark (no torch.compile: scripts/gpu_bench_compile.sh) ----
mkdir -p "$SCRATCH/bench"
limit=$(left); (( limit < 30 )) && limit=30
timeout -k 5 "$limit" "$PY" -m benchmarks --device cuda --skip compile --out "$SCRATCH/bench" > "$OUT/bench.log" 2>&1
say "benchmark: rc $? (124: cut at the budget) at $(elapsed) s"
{ echo; echo "## benchmark (the end of bench.log)"; tail -40 "$OUT/bench.log"; } >> "$SUMMARY"
tar -czf "$OUT/bench.tar.gz" -C "$SCRATCH" bench
say "total $(elapsed) s"
