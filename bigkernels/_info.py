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
    }
