"""No CUDA kernel spills registers to local memory, except the few that
scripts/ptxas_report.py's ALLOWED_SPILLS lists with their reasons. Read from
the ptxas report of the build scripts/install.sh just did (build/install.log),
so it costs no compile; it skips when that build compiled no CUDA kernel."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG = os.path.join(ROOT, "build", "install.log")


def load_report():
    spec = importlib.util.spec_from_file_location("ptxas_report", os.path.join(ROOT, "scripts", "ptxas_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ptxas_report = load_report()


def test_no_kernel_spills():
    if not os.path.exists(LOG):
        pytest.skip("no build/install.log: bigkernels was not built by scripts/install.sh")
    with open(LOG, errors="replace") as f:
        kernels = ptxas_report.parse(f.read())
    if not kernels:
        pytest.skip("the last build compiled no CUDA kernel (a CPU-only build, or nothing to rebuild)")
    bad = ptxas_report.unexpected_spills(kernels)
    assert not bad, "kernels that spill registers (add a fix, or an entry with its reason to ALLOWED_SPILLS):\n" + \
        "\n".join(f"{ptxas_report.short(k['name'])} on {k['arch']}: {k['spill_stores']} bytes stored, "
                  f"{k['spill_loads']} loaded" for k in bad)


def test_the_parser_reads_ptxas_output():
    # the lines ptxas -v prints for one kernel, as they appear in the build log
    log = """ptxas info    : Compiling entry function '_Z6kernelILi256EEvPf' for 'sm_90a'
ptxas info    : Function properties for _Z6kernelILi256EEvPf
    376 bytes stack frame, 1192 bytes spill stores, 1044 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 376 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z5otherv' for 'sm_80'
ptxas info    : Function properties for _Z5otherv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, 664 bytes cmem[0]
"""
    kernels = ptxas_report.parse(log)
    assert [(k["arch"], k["registers"], k["stack"], k["spill_stores"], k["spill_loads"]) for k in kernels] == [
        ("sm_90a", 255, 376, 1192, 1044), ("sm_80", 32, 0, 0, 0)]
    spilled = [ptxas_report.short(k["name"]) for k in ptxas_report.unexpected_spills(kernels)]
    assert spilled in (["kernel<256>"], ["_Z6kernelILi256EEvPf"])  # demangled where c++filt exists
