"""The CUDA kernels' logic, tested without a GPU: for each family, the
csrc/<family>/cuda/*.cu files compiled as host C++ against a small emulation of
CUDA (tests/cuda_emulation/emu_cuda.h) and checked against a float64 reference
by tests/cuda_emulation/<family>/check_kernels.cc.

The .cu (and .cuh) sources are used as they are, except that each
`kernel<<<grid, block, smem, stream>>>(args)` launch is rewritten into a call
of the emulator (cudaLaunchKernelEx, which the cooperative launches use, is
emulated under its own name), and that tests/cuda_emulation/shim/ stands in for a few CUDA
headers and for common/ptx_sm80.cuh (the PTX wrappers).
This catches indexing, tiling, bounds, epilogue and API-alignment mistakes,
and (mode "races", under ThreadSanitizer) missing barriers; it cannot catch
what only the hardware shows (see emu_cuda.h)."""

import glob
import os
import platform
import re
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
EMULATION = os.path.join(HERE, "cuda_emulation")
FAMILIES = sorted(d for d in os.listdir(EMULATION) if os.path.exists(os.path.join(EMULATION, d, "check_kernels.cc")))
LAUNCH = re.compile(r"((?:\w+::)*\w+(?:<[^<>]*>)?)<<<([^,]+),\s*([^,]+),\s*([^,]+),\s*stream>>>\(([^;]*)\);")


def cuda_include_dir():
    """CUDA's headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h): the toolkit's, or the nvidia wheel's."""
    from torch.utils import cpp_extension

    candidates = [os.path.join(d, "include") for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if d]
    if cpp_extension.CUDA_HOME:
        candidates.append(os.path.join(cpp_extension.CUDA_HOME, "include"))
    try:
        import nvidia

        candidates += [os.path.join(p, "cu13", "include") for p in nvidia.__path__]
    except ImportError:
        pass
    return next((d for d in candidates if os.path.exists(os.path.join(d, "cuda_bf16.h"))), None)


def thread_sanitizer_works(tmp_path):
    """Whether g++ here builds and runs a ThreadSanitizer program (libtsan installed, a kernel it can map)."""
    source = tmp_path / "tsan_probe.cc"
    source.write_text("#include <thread>\nint main() { std::thread([] {}).join(); }\n")
    binary = str(tmp_path / "tsan_probe")
    build = subprocess.run(["g++", "-fsanitize=thread", "-pthread", str(source), "-o", binary], capture_output=True)
    return build.returncode == 0 and subprocess.run([binary], capture_output=True).returncode == 0


# "races": the same sources under ThreadSanitizer (g++ -fsanitize=thread), on
# each checker's --quick set. Each CUDA thread is a fiber that ThreadSanitizer
# treats as a thread, and switching between fibers orders nothing; only the
# emulation's barriers and atomics do. So a shared-memory access that no
# __syncthreads/__syncwarp orders against another thread's is reported as a
# data race, whether or not this run's order made it give a wrong value.
@pytest.mark.parametrize("mode", ["values", "races"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_kernels_under_host_emulation(family, mode, tmp_path):
    include = cuda_include_dir()
    if include is None or shutil.which("g++") is None:
        pytest.skip("needs g++ and the CUDA headers")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the emulation's fibers switch stacks in x86-64 assembly")
    if mode == "races" and not thread_sanitizer_works(tmp_path):
        pytest.skip("g++'s ThreadSanitizer does not build or run here")
    units, launches = [], 0
    for path in sorted(glob.glob(os.path.join(CSRC, family, "cuda", "*.cu*"))):
        name = os.path.basename(path)
        with open(path) as f:
            source, found = LAUNCH.subn(r"bk_emulate_launch(\1, dim3(\2), dim3(\3), \4, \5);", f.read())
        launches += found + source.count("cudaLaunchKernelEx(")  # emulated as it is (emu_cuda.h)
        if name.endswith(".cuh"):  # kernel headers: rewritten in place of the originals
            (tmp_path / family / "cuda").mkdir(parents=True, exist_ok=True)
            (tmp_path / family / "cuda" / name).write_text(source)
            continue
        (tmp_path / (name + ".cc")).write_text(source)
        unit = tmp_path / f"emulated_{name}.cc"
        unit.write_text(f'#include "emu_cuda.h"\n#define __CUDA_ARCH__ 800\n#include "{name}.cc"\n')
        units.append(str(unit))
    assert launches > 0, f"no kernel launch found in csrc/{family}/cuda"
    assert units, f"no .cu file in csrc/{family}/cuda"
    flags = ["-std=c++20", "-O1", "-w", "-pthread", f"-I{os.path.join(EMULATION, 'shim')}", f"-I{EMULATION}",
             f"-I{tmp_path}", f"-I{CSRC}", f"-I{include}"]
    if mode == "races":
        flags += ["-fsanitize=thread", "-g1"]  # -g1: line numbers in the race reports
    binary = str(tmp_path / "check_kernels")
    checker = os.path.join(EMULATION, family, "check_kernels.cc")
    build = subprocess.run(["g++", *flags, *units, checker, "-o", binary], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([binary] + (["--quick"] if mode == "races" else []), capture_output=True, text=True,
                         timeout=900, env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1"})
    assert "ThreadSanitizer" not in run.stderr, run.stderr[:6000]  # the first race, with both stacks
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "0 failures" in run.stdout.splitlines()[-1], run.stdout[-2000:]


def test_a_deadlocked_kernel_fails_instead_of_hanging(tmp_path):
    # a __syncthreads that thread 0 skips: the others wait for it forever
    include = cuda_include_dir()
    if include is None or shutil.which("g++") is None:
        pytest.skip("needs g++ and the CUDA headers")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the emulation's fibers switch stacks in x86-64 assembly")
    source = tmp_path / "deadlock.cc"
    source.write_text(
        '#include "emu_cuda.h"\n'
        "__global__ void skips_a_barrier(int* out) {\n"
        "  if (threadIdx.x != 0) __syncthreads();\n"
        "  out[threadIdx.x] = 1;\n"
        "}\n"
        "int main() {\n"
        "  int out[64] = {};\n"
        "  bk_emulate_launch(skips_a_barrier, dim3(1), dim3(64), 0, out);\n"
        "}\n")
    binary = str(tmp_path / "deadlock")
    build = subprocess.run(["g++", "-std=c++20", "-O1", "-w", f"-I{EMULATION}", f"-I{include}", str(source), "-o",
                            binary], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([binary], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "deadlock" in run.stderr, run.stderr[-2000:]
