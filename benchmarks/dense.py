"""The dense family: bigkernels.dense(x, w, b, act) = act(x @ w.T + b) against
what plain PyTorch offers for the same layer."""

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

import bigkernels
from bigkernels import reference
from bigkernels._info import sm90_dense_opted_in

from . import harness
from .harness import Case, Variant

# (M, K, N) with N = the weight's row count, i.e. the GEMM's N. A gated
# activation (swiglu, geglu) then outputs N/2 features: every activation of a
# shape runs the same GEMM, so its matmul floor and FLOP count are shared.
GPU_SHAPES = [(512, 1024, 4096), (4096, 1024, 4096), (4096, 4096, 4096),
              (16384, 4096, 16384), (16384, 16384, 4096)]
# sized for a few cores; the last is an MLP layer over 8192 tokens (issue 5's shape)
CPU_SHAPES = [(256, 1024, 1024), (1024, 1024, 4096), (4096, 1024, 1024), (8192, 256, 512)]
DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}
VARIANTS = ("bigkernels", "eager", "addmm_activation", "onednn_postop", "mma_sync", "matmul", "compile")

# Our activations as oneDNN post-ops of mkldnn::_linear_pointwise: (attr, algorithm).
_ONEDNN_POSTOPS = {"none": ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"),
                   "silu": ("swish", ""), "sigmoid": ("sigmoid", ""), "tanh": ("tanh", "")}


def _onednn_postop(x, w, b, act):
    """oneDNN's linear with the activation as a post-op: what torch.compile's
    CPU inference passes (freezing) run for Linear + activation."""
    attr, algorithm = _ONEDNN_POSTOPS[act]
    return torch.ops.mkldnn._linear_pointwise(x, w, b, attr, [], algorithm)


def _grid(device, full, log):
    if device == "cuda":
        shapes = GPU_SHAPES if full else GPU_SHAPES[:3]
        acts = ("gelu", "relu", "swiglu") if full else ("gelu",)
        dtypes = (torch.bfloat16, torch.float32)
    else:
        shapes = CPU_SHAPES if full else CPU_SHAPES[:2]
        acts = ("none", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "swiglu") if full else ("gelu", "relu")
        dtypes = (torch.float32, torch.bfloat16)
        if not full and not harness.cpu_has_native_bf16():
            # ATen's bf16 GEMM is 10-100x slower than fp32 on such CPUs: the
            # short run would take many minutes for numbers nobody should use
            dtypes = (torch.float32,)
            log("this CPU has no native bf16 (AVX512-BF16/AMX/ARM BF16): the short run leaves bf16 out "
                "(--full includes it)")
    return [(shape, dtype, act) for dtype in dtypes for shape in shapes for act in acts]


@contextlib.contextmanager
def _sm90_off():
    """The dense forward without its sm_90a CUTLASS path (the mma.sync kernel)."""
    old = os.environ.pop("BIGKERNELS_SM90", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["BIGKERNELS_SM90"] = old


def _sm90_on():
    """Whether bigkernels.dense takes the sm_90a path here (built, opted in, an sm_90 GPU)."""
    return (sm90_dense_opted_in() and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] == 9)


@functools.cache
def _addmm_activation_has_backward():
    """torch._addmm_activation has had no autograd formula; ask rather than assume."""
    x = torch.randn(2, 2, requires_grad=True)
    try:
        torch._addmm_activation(torch.zeros(2), x, x.t()).sum().backward()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _make(device, M, K, N, dtype, act):
    def make():
        if device == "cuda":
            # Fresh compile caches per case: otherwise dynamo's recompile limit
            # (shapes x dtypes x grad modes) silently falls back to eager.
            torch._dynamo.reset()
        g = torch.Generator(device=device).manual_seed(0)
        rand = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
        x = rand(M, K).requires_grad_()
        w = rand(N, K).mul_(K ** -0.5).requires_grad_()  # keeps outputs O(1), bf16-safe
        b = rand(N).mul_(0.1).requires_grad_()

        def eager():
            return reference.activation(F.linear(x, w, b), act)

        variants = {
            "bigkernels": Variant(lambda: bigkernels.dense(x, w, b, act), (x, w, b)),
            "eager": Variant(eager, (x, w, b)),
        }
        if act in ("relu", "gelu"):
            variants["addmm_activation"] = Variant(
                lambda: torch._addmm_activation(b, x, w.t(), use_gelu=act == "gelu"), (x, w, b),
                backward=_addmm_activation_has_backward(),
                # cuBLASLt's GELU epilogue (and its CUDA fallback) is the tanh approximation
                note=("GELU is the tanh approximation on CUDA; " if device == "cuda" and act == "gelu" else "")
                + ("" if _addmm_activation_has_backward() else "no autograd formula, forward only"),
            )
        if device == "cpu" and act in _ONEDNN_POSTOPS and torch.backends.mkldnn.is_available():
            variants["onednn_postop"] = Variant(lambda: _onednn_postop(x, w, b, act), (x, w, b), backward=False,
                                                note="no autograd formula, forward only")
        if device == "cuda" and _sm90_on() and dtype != torch.float32:
            def mma_sync():
                with _sm90_off():
                    return bigkernels.dense(x, w, b, act)
            variants["mma_sync"] = Variant(mma_sync, (x, w, b), note="bigkernels' sm_80 mma.sync kernel")
        variants["matmul"] = Variant(lambda: x @ w.t(), (x, w))  # the GEMM alone: the floor
        if device == "cuda":
            variants["compile"] = Variant(torch.compile(eager), (x, w, b))  # warmed up by the harness
        return variants
    return make


def cases(device, full, log=print):
    return [
        Case(family="dense", name=f"{DTYPE_NAMES[dtype]} {M}x{K}x{N} {act}",
             params=dict(M=M, K=K, N=N, dtype=DTYPE_NAMES[dtype], activation=act, bias=True),
             flops=2.0 * M * K * N, make=_make(device, M, K, N, dtype, act))
        for (M, K, N), dtype, act in _grid(device, full, log)
    ]
