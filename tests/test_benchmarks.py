"""The benchmark command refuses what it cannot honour (it runs nothing here:
argparse and the variant check stop it before any measurement)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("args,message", [
    (["--repeats", "0"], "--repeats: must be >= 1"),
    (["--max-seconds", "0"], "--max-seconds: must be > 0"),
    (["--warmup", "-1"], "--warmup: must be >= 0"),
    (["--skip", "bogus"], "--skip bogus: unknown variant; known: addmm_activation, compile, eager, math, matmul"),
    (["--skip", "bigkernels"], "--skip bigkernels: the subject"),
    (["--only", "nope"], "invalid choice: 'nope'"),
])
def test_benchmark_cli_refuses_bad_arguments(args, message):
    run = subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_benchmark_cli_help_shows_the_device_default():
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "--device" in run.stdout and "default here:" in run.stdout
