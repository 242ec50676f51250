#!/usr/bin/env bash
# Sets up .venv (torch, ninja, pytest) and builds bigkernels into it.
# Fresh machine needs: Python 3.9+ with pip and venv, gcc; nvcc (CUDA 12.x/13.x)
# optional. BIGKERNELS_TORCH picks the torch release (default 2.14.1);
# BIGKERNELS_CUDA=0|1, TORCH_CUDA_ARCH_LIST and MAX_JOBS go to setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "[install $(date +%H:%M:%S)] $*"; }
[ -x .venv/bin/python ] || { say "creating .venv"; "${PYTHON:-python3}" -m venv .venv; }
say "installing torch ${BIGKERNELS_TORCH:-2.14.1}, ninja, pytest into .venv (about 1-3 minutes the first time)"
.venv/bin/python -m pip install -q "torch==${BIGKERNELS_TORCH:-2.14.1}" ninja pytest numpy setuptools wheel
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  # CUTLASS's headers, for the dense forward's sm_90a path (built with BIGKERNELS_SM90=1; its compile test runs anyway)
  .venv/bin/python -m pip install -q nvidia-cutlass==4.2.0.0 || say "nvidia-cutlass not installed: the sm_90a path cannot be built"
  what="C++ and CUDA kernels: about 2-5 minutes on 2 cores"
else what="C++ kernels: about 1-2 minutes on 2 cores"; fi
say "building bigkernels ($what; the CPU kernels are compiled once per instruction set)"
# The build's log keeps ptxas's resource report (registers, spills) of every
# CUDA kernel it compiled: tests/test_kernel_resources.py reads it.
mkdir -p build
if ! BIGKERNELS_PTXAS_VERBOSE=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
     .venv/bin/python -m pip install -v --no-build-isolation --no-deps -e . > build/install.log 2>&1; then
  tail -60 build/install.log
  say "the build failed; its whole log is build/install.log"
  exit 1
fi
say "built:"
.venv/bin/python -c "import bigkernels, json; print(json.dumps(bigkernels.backend_info()))"
