#!/usr/bin/env bash
# Sets up .venv (torch, ninja, pytest) and builds bigkernels into it.
# Fresh machine needs: Python 3.9+ with pip and venv, gcc; nvcc (CUDA 12.x/13.x)
# optional. BIGKERNELS_TORCH picks the torch release (default 2.14.1);
# BIGKERNELS_CUDA=0|1, TORCH_CUDA_ARCH_LIST and MAX_JOBS go to setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q "torch==${BIGKERNELS_TORCH:-2.14.1}" ninja pytest numpy setuptools wheel
MAX_JOBS="${MAX_JOBS:-$(nproc)}" .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import bigkernels, json; print(json.dumps(bigkernels.backend_info()))"
