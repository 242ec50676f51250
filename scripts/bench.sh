#!/usr/bin/env bash
# Installs bigkernels (scripts/install.sh) and runs the benchmark suite on
# whatever device is present. Extra arguments go to `python -m benchmarks`
# (--full, --only dense, --device cpu|cuda, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# matplotlib draws the report's speed-up plot; the benchmark runs without it
.venv/bin/python -m pip install -q matplotlib || echo "matplotlib could not be installed: no plot this time"
.venv/bin/python -m benchmarks "$@"
