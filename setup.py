"""Builds bigkernels and its one extension module, bigkernels._C.

CUDA kernels are compiled when a CUDA toolkit and a CUDA build of torch are
both present; BIGKERNELS_CUDA=0 or 1 forces the choice. Architectures follow
TORCH_CUDA_ARCH_LIST, default "8.0+PTX;9.0a" (the PTX lets GPUs newer than
sm_90 JIT the kernels). MAX_JOBS bounds parallel compiles.
BIGKERNELS_PTXAS_VERBOSE=1 prints each kernel's registers, spills and shared
memory.
"""

import glob
import os
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0+PTX;9.0a"

# torch.utils.cpp_extension decides CUDA_HOME when it is imported. On our
# machines /usr/local/bin/nvcc is a wrapper, which would make it pick
# /usr/local and then fail to link -lcudart, so point it at the toolkit first.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def want_cuda():
    forced = os.environ.get("BIGKERNELS_CUDA")
    if forced not in (None, "", "0", "1"):
        sys.exit(f"BIGKERNELS_CUDA must be 0 or 1, got {forced!r}")
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if forced == "1" and not available:
        sys.exit("BIGKERNELS_CUDA=1 but there is no CUDA toolkit (CUDA_HOME) or torch is a CPU build")
    return available if forced in (None, "") else forced == "1"


def cuda_library_includes():
    """ATen's CUDA headers include cuBLAS & co., which some toolkits lack; the
    nvidia-* wheels that come with torch carry them."""
    roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            found += [p for p in glob.glob(os.path.join(root, pattern)) if p not in found]
    return found


def write_build_info(with_cuda, archs):
    """Recorded next to the package for bigkernels.backend_info()."""
    info = {
        "version": VERSION,
        "cuda_compiled": with_cuda,
        "cuda_archs": archs.split(";") if with_cuda else [],
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if with_cuda else None,
    }
    with open(os.path.join(ROOT, "bigkernels", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\nBUILD_INFO = %r\n" % (info,))


def extension():
    with_cuda = want_cuda()
    sources = ["csrc/bigkernels.cpp", "csrc/dense_common.cpp", "csrc/cpu/dense_cpu.cpp"]
    cxx_flags = ["-O3", "-fopenmp", "-fopenmp-simd"]
    args = dict(
        name="bigkernels._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    archs = None
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by cpp_extension
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = ["-O3", "-lineinfo", "-std=c++17"]
        if os.environ.get("BIGKERNELS_PTXAS_VERBOSE") == "1":
            nvcc_flags.append("-Xptxas=-v")
        args["include_dirs"] += cuda_library_includes()
        args["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": nvcc_flags}
        ext = cpp_extension.CUDAExtension(sources=sources, **args)
    else:
        args["extra_compile_args"] = {"cxx": cxx_flags}
        ext = cpp_extension.CppExtension(sources=sources, **args)
    write_build_info(with_cuda, archs or "")
    return ext


setup(
    name="bigkernels",
    version=VERSION,
    description="Fused dense + activation, attention and RNN kernels for PyTorch",
    packages=find_packages(include=["bigkernels", "bigkernels.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
