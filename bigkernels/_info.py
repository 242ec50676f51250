import os

import torch

from . import _ext

try:
    from ._build_info import BUILD_INFO
except ImportError:  # running from a source tree that was never built
    BUILD_INFO = {"version": "0+unbuilt", "cuda_compiled": False, "cuda_archs": [],  # setup.py owns the version
                  "torch_version": None, "cuda_version": None}

__version__ = BUILD_INFO["version"]


def backend_info():
    """What was built and what loaded, as a dict."""
    return {
        "version": __version__,
        "extension_loaded": _ext.LOADED,
        "extension_error": _ext.LOAD_ERROR,
        "cuda_compiled": BUILD_INFO["cuda_compiled"],
        "cuda_archs": list(BUILD_INFO["cuda_archs"]),
        "built_with_torch": BUILD_INFO["torch_version"],
        "built_with_cuda": BUILD_INFO["cuda_version"],
        "torch_version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        # the CPU instruction set our CPU kernels run at (ATen's; ATEN_CPU_CAPABILITY lowers it)
        "cpu_capability": torch.ops.bigkernels.cpu_capability() if _ext.LOADED else None,
        "sm90_dense": _sm90_status(),
    }


def sm90_dense_opted_in():
    """Whether the dense forward takes its sm_90a CUTLASS path on sm_90 GPUs:
    built, and asked for at run time (as csrc/dense/cuda/dense_cuda.cpp reads it)."""
    return bool(BUILD_INFO.get("sm90_cutlass")) and os.environ.get("BIGKERNELS_SM90") == "1"


def _sm90_status():
    """The dense forward's sm_90a CUTLASS path: built or not, opted in or not,
    and unverified until a GPU run has checked it against the reference."""
    if not BUILD_INFO.get("sm90_cutlass"):
        return "not built (build with BIGKERNELS_SM90=1 and CUTLASS headers)"
    switch = "on (BIGKERNELS_SM90=1)" if sm90_dense_opted_in() else "off (set BIGKERNELS_SM90=1 to use it)"
    return f"built, {switch}; unverified: it has never run on a GPU"
