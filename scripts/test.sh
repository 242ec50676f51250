#!/usr/bin/env bash
# Installs bigkernels (scripts/install.sh) and runs the tests. CUDA tests are
# marked `cuda` and skip without a GPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# optional: the Hugging Face backend's test (it skips without transformers; the package never needs it)
.venv/bin/python -m pip install -q transformers || echo "transformers could not be installed: its test will skip"
.venv/bin/python -m pytest -q tests "$@"
