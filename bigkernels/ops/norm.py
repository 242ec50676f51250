"""LayerNorm and RMSNorm over the last dimension, with an optional residual
added first: argument checks, fake implementations, autograd, and the
fallback to PyTorch where the kernels are absent.

The ops (bigkernels::norm_forward, bigkernels::norm_backward) are defined in
csrc/norm/norm.cpp, with kernels for the CPU (csrc/norm/cpu/) and CUDA
(csrc/norm/cuda/, in builds compiled with CUDA). Elsewhere (other devices, a
CPU-only build on a CUDA tensor, no extension) the same results come from
PyTorch's own add and norm.
"""

import torch

from .. import _ext, reference
from .._info import BUILD_INFO
from ._grad import needs_grad

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(input, residual, weight, bias, eps):
    """Raises TypeError/ValueError naming the bad argument."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() < 1:
        raise ValueError("input must have at least 1 dimension, got a 0-d tensor")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype != input.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match input dtype {input.dtype}")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if residual is not None and residual.shape != input.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)} but input has shape {tuple(input.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (input.shape[-1],):
            raise ValueError(f"{name} must have shape ({input.shape[-1]},) (input's last dimension), "
                             f"got {tuple(t.shape)}")


def _has_kernel(device):
    """Whether the compiled op has a kernel for device: the CPU's, or CUDA's
    when this build compiled the CUDA kernels."""
    if not _ext.LOADED:
        return False
    return device.type == "cpu" or (device.type == "cuda" and BUILD_INFO["cuda_compiled"])


def _norm(input, residual, weight, bias, eps, rms, keep_sum=True):
    _check(input, residual, weight, bias, eps)
    if not _has_kernel(input.device):
        x = input if residual is None else input + residual
        return reference.norm(x, weight, bias, eps, rms), x
    out, x, _, _ = torch.ops.bigkernels.norm_forward(input, residual, weight, bias, float(eps), rms, keep_sum)
    return out, x


def residual_layer_norm_output(input, residual, weight, bias, eps):
    """layer_norm(input, weight, bias, eps, residual=residual)[0]: the output
    alone, for callers that drop the sum (BERT's blocks). Without gradients
    to compute, the sum is then never written (a pass over memory saved)."""
    return _norm(input, residual, weight, bias, eps, rms=False,
                 keep_sum=needs_grad(input, residual, weight, bias))[0]


def layer_norm(input, weight=None, bias=None, eps=1e-5, *, residual=None):
    """F.layer_norm over the last dimension: (x - mean) / sqrt(var + eps) *
    weight + bias, with x = input. With residual, x = input + residual (in
    input's dtype, as the unfused add) and the result is the pair (output, x):
    the sum is the next block's residual, as flash-attention's and apex's
    fused norms return it."""
    out, x = _norm(input, residual, weight, bias, eps, rms=False)
    return out if residual is None else (out, x)


def rms_norm(input, weight=None, eps=None, *, residual=None):
    """F.rms_norm over the last dimension: x / sqrt(mean(x^2) + eps) * weight;
    eps=None is torch.finfo(input.dtype).eps, as in torch. residual as in
    layer_norm: (output, input + residual) is returned."""
    if eps is None and isinstance(input, torch.Tensor) and input.is_floating_point():
        eps = torch.finfo(input.dtype).eps
    out, x = _norm(input, residual, weight, None, eps, rms=True)
    return out if residual is None else (out, x)


def _register():
    """Fake implementations and autograd for the compiled ops."""

    @torch.library.register_fake("bigkernels::norm_forward")
    def _norm_forward_fake(input, residual, weight, bias, eps, rms, keep_sum=True):
        _check(input, residual, weight, bias, eps)
        rows = input.numel() // input.shape[-1] if input.shape[-1] else 0
        stats = torch.float64 if input.dtype == torch.float64 else torch.float32
        return (torch.empty_like(input, memory_format=torch.contiguous_format),
                torch.empty_like(input, memory_format=torch.contiguous_format) if residual is not None and keep_sum
                else input.new_empty((0,)),
                input.new_empty((0 if rms else rows,), dtype=stats), input.new_empty((rows,), dtype=stats))

    @torch.library.register_fake("bigkernels::norm_backward")
    def _norm_backward_fake(grad_output, grad_sum, x, weight, mean, rstd, rms, output_mask):
        def grad_like(t, wanted):
            return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else x.new_empty((0,))
        bias_like = x.new_empty((x.shape[-1],))
        return (grad_like(x, output_mask[0]), grad_like(weight, output_mask[1] and weight is not None),
                grad_like(bias_like, output_mask[2]))

    def setup_context(ctx, inputs, output):
        input, residual, weight, bias, eps, rms, *keep_sum = inputs
        if residual is not None and keep_sum and not keep_sum[0]:
            raise ValueError("bigkernels norm_forward: keep_sum=False keeps nothing for backward; "
                             "pass keep_sum=True when a gradient is needed")
        _, total, mean, rstd = output
        # what was normalised, and the inputs themselves (for a double backward)
        x = total if residual is not None else input
        ctx.save_for_backward(x, input, residual, weight, bias, mean, rstd)
        ctx.eps, ctx.rms = eps, rms

    def backward(ctx, grad_out, grad_sum, _grad_mean, _grad_rstd):
        x, input, residual, weight, bias, mean, rstd = ctx.saved_tensors
        wants = ctx.needs_input_grad[:4]  # input, residual, weight, bias
        if residual is None:
            grad_sum = None
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference, itself differentiable
            total = input if residual is None else input + residual
            leaves = [t for t, w in zip((input, residual, weight, bias), wants) if w]
            grads = iter(torch.autograd.grad(reference.norm(total, weight, bias, ctx.eps, ctx.rms), leaves,
                                             grad_out, create_graph=True))
            dinput, dresidual, dw, db = (next(grads) if w else None for w in wants)
            if grad_sum is not None:
                dinput = None if dinput is None else dinput + grad_sum
                dresidual = None if dresidual is None else dresidual + grad_sum
            return dinput, dresidual, dw, db, None, None, None
        dx, dw, db = torch.ops.bigkernels.norm_backward(
            grad_out, grad_sum, x, weight, mean, rstd, ctx.rms,
            [wants[0] or wants[1], wants[2], wants[3]])
        return (dx if wants[0] else None, dx if wants[1] else None, dw if wants[2] else None,
                db if wants[3] else None, None, None, None)

    torch.library.register_autograd("bigkernels::norm_forward", backward, setup_context=setup_context)


if _ext.LOADED:
    _register()
