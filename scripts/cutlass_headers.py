"""Where CUTLASS's headers are, for the dense forward's sm_90a path
(csrc/dense/cuda/sm90/): setup.py and tests/test_sm90_build.py ask here.

    python scripts/cutlass_headers.py --copy third_party/cutlass

copies them (include/ and tools/util/include/, ~27 MB) out of the installed
nvidia-cutlass package, to carry to a machine without a network (the GPU
machine); there CUTLASS_PATH=third_party/cutlass points the build at them.
"""

import argparse
import importlib.util
import os
import shutil
import sys


def cutlass_root():
    """CUTLASS_PATH, else the nvidia-cutlass package's copy; None when neither
    holds include/cutlass/cutlass.h."""
    roots = [os.environ["CUTLASS_PATH"]] if os.environ.get("CUTLASS_PATH") else []
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        roots.append(os.path.join(list(spec.submodule_search_locations)[0], "source"))
    return next((r for r in roots if os.path.exists(os.path.join(r, "include", "cutlass", "cutlass.h"))), None)


def cutlass_includes():
    """The include folders (CUTLASS and CuTe; its utilities), or None."""
    root = cutlass_root()
    return None if root is None else [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copy", metavar="DIR", help="copy the headers to DIR")
    args = p.parse_args()
    root = cutlass_root()
    if root is None:
        sys.exit("no CUTLASS headers: pip install nvidia-cutlass==4.2.0.0, or set CUTLASS_PATH")
    if not args.copy:
        print(root)
        return
    for sub in ("include", os.path.join("tools", "util", "include")):
        shutil.copytree(os.path.join(root, sub), os.path.join(args.copy, sub), dirs_exist_ok=True)
    print(f"copied CUTLASS's headers from {root} to {args.copy}")


if __name__ == "__main__":
    main()
