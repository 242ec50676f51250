#!/usr/bin/env bash
# Installs bigkernels (scripts/install.sh) and runs the tests. CUDA tests are
# marked `cuda` and skip without a GPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m pytest -q tests "$@"
