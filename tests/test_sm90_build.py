"""The dense forward's sm_90a path on CUTLASS (csrc/dense/cuda/sm90/) compiles.

The default build leaves it out (its 20 instantiations cost about 20 minutes
on this 2-core machine), and no GPU here can run it, so this compiles one
instantiation and the dispatcher with nvcc, as setup.py does with
BIGKERNELS_SM90=1, and fails on any compile error."""

import importlib.util
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SM90 = os.path.join(ROOT, "csrc", "dense", "cuda", "sm90")


def _cutlass_includes():
    spec = importlib.util.spec_from_file_location("cutlass_headers", os.path.join(ROOT, "scripts", "cutlass_headers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cutlass_includes()


def _nvcc():
    return "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else shutil.which("nvcc")


@pytest.mark.parametrize("source", ["dense_forward_sm90_bf16_gelu_preact.cu", "dispatch_sm90.cu"])
def test_sm90_path_compiles(source, tmp_path):
    nvcc, includes = _nvcc(), _cutlass_includes()
    if nvcc is None or includes is None:
        pytest.skip("needs nvcc and CUTLASS's headers (pip install nvidia-cutlass==4.2.0.0)")
    flags = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-DBIGKERNELS_SM90", "-gencode=arch=compute_90a,code=sm_90a",
             "-Xptxas=-v", f"-I{os.path.join(ROOT, 'csrc')}"] + [f"-I{d}" for d in includes]
    run = subprocess.run([nvcc, *flags, "-c", os.path.join(SM90, source), "-o", str(tmp_path / "out.o")],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    # ptxas serializes wgmma across a function call (a device assert, say): a slow kernel, not a wrong one
    assert "C7510" not in run.stderr, run.stderr[-3000:]


def test_instantiation_files_match_the_generator(tmp_path):
    # the committed .cu files and instantiations.inc are what generate_instantiations.py writes
    spec = importlib.util.spec_from_file_location("gen", os.path.join(SM90, "generate_instantiations.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    want = {f"dense_forward_sm90_{d}_{a}{'_preact' if p else ''}.cu" for d, a, p in gen.instances()}
    have = {f for f in os.listdir(SM90) if f.startswith("dense_forward_sm90_") and f.endswith(".cu")}
    assert have == want
    with open(os.path.join(SM90, "instantiations.inc")) as f:
        assert sum(line.startswith("BK_SM90_INSTANCE(") for line in f) == len(want)
