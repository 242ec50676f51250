"""Reads ptxas's resource report (nvcc -Xptxas=-v, which setup.py adds with
BIGKERNELS_PTXAS_VERBOSE=1) out of a build log: registers, stack frame and
spills of every kernel, per architecture.

    python scripts/ptxas_report.py build/install.log            # the table
    python scripts/ptxas_report.py build/install.log --check    # exit 1 on a spill not in ALLOWED_SPILLS

A spill (ptxas moving registers to local memory) costs memory traffic on
every use; in our kernels it follows from the arithmetic (accumulators that do
not fit in 255 registers), so it is fixed by restructuring, not accepted.
tests/test_kernel_resources.py runs the check on the build CI already does;
scripts/gpu_check.sh puts the table in its summary.
"""

import argparse
import re
import shutil
import subprocess
import sys

# Kernels allowed to spill: a substring of the demangled name -> why. Keep it
# short; every entry is a kernel we know to be slower than it could be.
ALLOWED_SPILLS = {}

COMPILING = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPERTIES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")


def demangle(names):
    """The names demangled by c++filt, in order (as they are where it is missing)."""
    if not names or shutil.which("c++filt") is None:
        return list(names)
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else list(names)


def parse(text):
    """One dict per (kernel, arch) the log compiled: name, arch, registers, stack, spill_stores, spill_loads."""
    kernels, current = [], None
    for line in text.splitlines():
        if m := COMPILING.search(line):
            current = {"name": m.group(1), "arch": m.group(2), "registers": None, "stack": 0, "spill_stores": 0,
                       "spill_loads": 0}
            kernels.append(current)
        elif current is not None and (m := PROPERTIES.search(line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := USED.search(line)):
            current["registers"] = int(m.group(1))
            current = None  # the entry's last line
    for kernel, name in zip(kernels, demangle([k["name"] for k in kernels])):
        kernel["name"] = name
    return kernels


def short(name):
    """The kernel's name without namespaces and its parameter list."""
    name = re.sub(r"\bbigkernels::(cuda::)?|\(anonymous namespace\)::", "", name)
    depth, end = 0, len(name)
    for i, c in enumerate(name):  # cut at the '(' that opens the parameters, outside template brackets
        depth += c == "<"
        depth -= c == ">"
        if c == "(" and depth == 0:
            end = i
            break
    return name[:end].replace("void ", "", 1)


def spills(kernel):
    return kernel["spill_stores"] > 0 or kernel["spill_loads"] > 0


def unexpected_spills(kernels):
    return [k for k in kernels if spills(k) and not any(p in k["name"] for p in ALLOWED_SPILLS)]


def table(kernels):
    rows = ["| kernel | arch | registers | stack frame | spill stores | spill loads |", "|---|---|---:|---:|---:|---:|"]
    for k in sorted(kernels, key=lambda k: (k["arch"], short(k["name"]))):
        flag = " **spills**" if spills(k) else ""
        rows.append(f"| {short(k['name'])}{flag} | {k['arch']} | {k['registers']} | {k['stack']} | "
                    f"{k['spill_stores']} | {k['spill_loads']} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="a build log with ptxas -v output")
    parser.add_argument("--check", action="store_true", help="exit 1 when a kernel outside ALLOWED_SPILLS spills")
    args = parser.parse_args()
    with open(args.log, errors="replace") as f:
        kernels = parse(f.read())
    if not kernels:
        print(f"no ptxas report in {args.log} (built without CUDA or without BIGKERNELS_PTXAS_VERBOSE=1?)")
        return 2 if args.check else 0
    print(table(kernels))
    bad = unexpected_spills(kernels)
    allowed = [k for k in kernels if spills(k) and k not in bad]
    print(f"\n{len(kernels)} kernel builds, {len(bad)} spill unexpectedly, {len(allowed)} spill as allowed "
          f"(ALLOWED_SPILLS in scripts/ptxas_report.py)")
    for k in bad:
        print(f"UNEXPECTED SPILL: {short(k['name'])} on {k['arch']}: {k['spill_stores']} bytes stored, "
              f"{k['spill_loads']} loaded")
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
