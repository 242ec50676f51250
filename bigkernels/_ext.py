"""Loads the compiled extension once and remembers why it could not.

Importing bigkernels._C registers the ops under torch.ops.bigkernels. Set
BIGKERNELS_DISABLE_EXTENSION=1 to skip it and run everything on the
pure-PyTorch reference (the tests use this to cover that path).
"""

import os
import warnings

import torch  # noqa: F401  (the extension links against torch's libraries)

LOADED = False
LOAD_ERROR = None

if os.environ.get("BIGKERNELS_DISABLE_EXTENSION") == "1":
    LOAD_ERROR = "disabled by BIGKERNELS_DISABLE_EXTENSION=1"
else:
    try:
        from bigkernels import _C  # noqa: F401

        LOADED = True
    except Exception as exc:  # ImportError, OSError (undefined symbols), ...
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"

if not LOADED:
    warnings.warn(
        f"bigkernels: compiled extension not loaded ({LOAD_ERROR}); "
        "every op runs on the pure-PyTorch reference instead",
        RuntimeWarning,
        stacklevel=2,
    )
