"""Builds bigkernels and its one extension module, bigkernels._C.

CUDA kernels are compiled when a CUDA toolkit and a CUDA build of torch are
both present; BIGKERNELS_CUDA=0 or 1 forces the choice. Architectures follow
TORCH_CUDA_ARCH_LIST, default "8.0+PTX;9.0a" (the PTX lets GPUs newer than
sm_90 JIT the kernels). MAX_JOBS bounds parallel compiles.
The CPU kernels in CPU_CAPABILITY_SOURCES are compiled once per CPU
capability (csrc/common/capability.h says how one is picked at run time).
BIGKERNELS_PTXAS_VERBOSE=1 prints each kernel's registers, spills and shared
memory. BIGKERNELS_SM90=1 also builds the dense forward's sm_90a path on
CUTLASS (csrc/dense/cuda/sm90/; 20 instantiations, about a minute each on one
core), from CUTLASS_PATH or the nvidia-cutlass package's headers; it runs only
with BIGKERNELS_SM90=1 at run time too, until a GPU has checked it.
"""

import glob
import os
import platform
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


# Compiled once per CPU capability, with that capability's flags (those ATen
# uses for its own per-capability kernels).
CPU_CAPABILITY_SOURCES = ["csrc/dense/cpu/dense_kernels.cpp", "csrc/attention/cpu/attention_kernels.cpp",
                          "csrc/rnn/cpu/rnn_kernels.cpp", "csrc/norm/cpu/norm_kernels.cpp",
                          "csrc/losses/cpu/loss_kernels.cpp"]
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
CPU_CAPABILITIES = {"DEFAULT": []}
if X86_64:
    CPU_CAPABILITIES["AVX2"] = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"]
    CPU_CAPABILITIES["AVX512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                                  "-mf16c", "-mbmi", "-mbmi2"]
# On aarch64 DEFAULT is ATen's NEON code; its SVE builds are not made here
# (no toolchain to test them on).


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus: each file of CPU_CAPABILITY_SOURCES is
    compiled once per capability, into its own folder, with its flags."""

    def build_extension(self, ext):
        compile_sources = self.compiler.compile  # torch's wrapper (ninja or not)

        def compile_with_capabilities(sources, output_dir=None, extra_postargs=None, **kwargs):
            # The ordinary sources first: their objects come first at link time, so
            # where an inline function from a header is emitted by several objects,
            # the linker keeps the copy compiled without any ISA flags.
            objects = compile_sources(sources, output_dir=output_dir, extra_postargs=extra_postargs, **kwargs)
            for name, flags in CPU_CAPABILITIES.items():
                post = dict(extra_postargs) if isinstance(extra_postargs, dict) else {"cxx": list(extra_postargs or [])}
                post["cxx"] = post["cxx"] + flags + [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}"]
                objects += compile_sources(CPU_CAPABILITY_SOURCES, output_dir=os.path.join(output_dir, name.lower()),
                                           extra_postargs=post, **kwargs)
            return objects

        self.compiler.compile = compile_with_capabilities
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_sources


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


def cutlass_includes():
    """CUTLASS's include folders (scripts/cutlass_headers.py says where it looks), or None."""
    import importlib.util
    path = os.path.join(ROOT, "scripts", "cutlass_headers.py")
    spec = importlib.util.spec_from_file_location("cutlass_headers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cutlass_includes()


def want_sm90():
    """CUTLASS's include folders when the CUDA build also builds the sm_90a
    path (BIGKERNELS_SM90=1), else None; stops with the reason when it was
    asked for and the headers are missing."""
    if os.environ.get("BIGKERNELS_SM90") != "1":
        return None
    includes = cutlass_includes()
    if includes is None:
        sys.exit("BIGKERNELS_SM90=1 but no CUTLASS headers were found: pip install nvidia-cutlass==4.2.0.0, "
                 "or set CUTLASS_PATH to a folder holding include/cutlass/cutlass.h")
    return includes


def write_build_info(with_cuda, archs, sm90=False):
    """Recorded next to the package for bigkernels.backend_info()."""
    info = {
        "version": VERSION,
        "cuda_compiled": with_cuda,
        "cuda_archs": archs.split(";") if with_cuda else [],
        "sm90_cutlass": sm90,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if with_cuda else None,
    }
    with open(os.path.join(ROOT, "bigkernels", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\nBUILD_INFO = %r\n" % (info,))


def extension():
    with_cuda = want_cuda()
    # csrc/bigkernels.cpp, csrc/common/, and per family csrc/<family>/{,cpu/,cuda/}
    sources = [f for f in sorted(glob.glob("csrc/**/*.cpp", recursive=True))
               if f not in CPU_CAPABILITY_SOURCES and "/cuda/" not in f]
    cxx_flags = ["-O3", "-fopenmp"]
    args = dict(
        name="bigkernels._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("BK_CPU_X86_CAPABILITIES", None)] if X86_64 else [],
        # rebuild when these change too (they are compiled outside `sources`)
        depends=CPU_CAPABILITY_SOURCES + glob.glob("csrc/**/*.h", recursive=True),
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    archs = None
    sm90_includes = None  # the sm_90a path is part of the CUDA build only
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by cpp_extension
        sources += sorted(glob.glob("csrc/*/cuda/*.cpp")) + sorted(glob.glob("csrc/*/cuda/*.cu"))
        nvcc_flags = ["-O3", "-lineinfo", "-std=c++17"]
        if os.environ.get("BIGKERNELS_PTXAS_VERBOSE") == "1":
            nvcc_flags.append("-Xptxas=-v")
        args["include_dirs"] += cuda_library_includes()
        sm90_includes = want_sm90()
        if sm90_includes is not None:
            sources += sorted(glob.glob("csrc/dense/cuda/sm90/*.cu"))
            args["include_dirs"] += sm90_includes
            args["define_macros"] = args["define_macros"] + [("BIGKERNELS_SM90", None)]
            nvcc_flags.append("--expt-relaxed-constexpr")
        args["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": nvcc_flags}
        ext = cpp_extension.CUDAExtension(sources=sources, **args)
    else:
        args["extra_compile_args"] = {"cxx": cxx_flags}
        ext = cpp_extension.CppExtension(sources=sources, **args)
    write_build_info(with_cuda, archs or "", sm90=sm90_includes is not None)
    return ext


setup(
    name="bigkernels",
    version=VERSION,
    description="Fused dense + activation, attention and RNN kernels for PyTorch",
    packages=find_packages(include=["bigkernels", "bigkernels.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
