"""The benchmark command refuses what it cannot honour (it runs nothing here:
argparse and the variant check stop it before any measurement), and its
outputs are written from the records."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("args,message", [
    (["--repeats", "0"], "--repeats: must be >= 1"),
    (["--max-seconds", "0"], "--max-seconds: must be > 0"),
    (["--warmup", "-1"], "--warmup: must be >= 0"),
    (["--skip", "bogus"], "--skip bogus: unknown variant; known: addmm_activation, bigkernels-padded, blocked, "
                               "blocked-skip, cce, cell_loop, chunked, compile, copy, cudnn, cudnn_graph, eager, "
                               "eager-softcap, efficient, flash, flash-attn, liger, math, matmul, mma_sync, "
                               "onednn_postop, sdpa, sdpa-blockmask, sdpa-static"),
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


def test_outputs_include_the_tflops_by_seqlen_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import harness

    records = [dict(family="attention", case=f"bf16 L{L}", params=dict(B=16384 // L, H=16, L=L, S=L, D=128,
                                                                    dtype="bf16", causal=False),
                    variant=variant, pass_=pass_, status="ok", median_ms=1.0, samples=3, tflops=tflops,
                    peak_mem_mib=None, note="", speedup=1.0)
               for L, tflops in ((1024, 100.0), (4096, 300.0)) for variant in ("bigkernels", "flash")
               for pass_ in harness.PASSES]
    harness.write_outputs(str(tmp_path), harness.machine_info("cpu"), records)
    for name in ("results.json", "report.md", "speedup.png", "attention_tflops.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_a_pass_where_every_variant_is_not_applicable_is_recorded_not_raised():
    # decoding rows have no backward: their fwd+bwd pass has nothing to time
    from benchmarks import harness

    variants = {name: harness.Variant(lambda: torch.zeros(2), backward=False, note="no backward")
                for name in ("bigkernels", "eager")}
    results = harness.measure_pass(variants, "fwd+bwd", "cpu", warmup=1, repeats=3, budget_s=1.0)
    assert {name: r[0] for name, r in results.items()} == {"bigkernels": "n/a", "eager": "n/a"}
