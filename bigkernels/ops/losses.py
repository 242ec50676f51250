"""Fused LM-head losses: a linear layer and the cross-entropy of its output,
without the [tokens x vocabulary] logits in memory. Argument checks, fake
implementations, and the fallback to PyTorch where the kernels are absent.

The ops (bigkernels::linear_cross_entropy and its _forward / _backward) are
defined in csrc/losses/losses.cpp, with kernels for the CPU
(csrc/losses/cpu/) and autograd in C++ (csrc/losses/losses_autograd.cpp).
Elsewhere (CUDA for now, other devices, no extension) the same results come
from reference.py's F.linear + F.cross_entropy, which does hold the logits.
"""

import torch

from .. import _ext, reference
from ._autocast import autocast_inputs, autocast_runs_in_float32

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(input, weight, target, bias, ignore_index, label_smoothing, reduction, softcap, z_loss, chunk_rows):
    """Raises TypeError/ValueError naming the bad argument (targets out of
    range are found by the kernel, which reads them)."""
    for name, t in (("input", input), ("weight", weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() < 1:
        raise ValueError("input must have at least 1 dimension ([..., D]), got a 0-d tensor")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match input dtype {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"weight must be [V, {input.shape[-1]}] (input's last dimension), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (the vocabulary), got shape "
                         f"{tuple(weight.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 (class indices), got {target.dtype}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} (input's leading dimensions), "
                         f"got {tuple(target.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != input.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match input dtype {input.dtype}")
        if bias.device != input.device:
            raise ValueError(f"bias is on {bias.device} but input is on {input.device}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [{weight.shape[0]}] (weight's rows), got {tuple(bias.shape)}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not _is_number(label_smoothing) or not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if softcap is not None and (not _is_number(softcap) or not softcap > 0):
        raise ValueError(f"softcap must be a number > 0 or None, got {softcap!r}")
    if not _is_number(z_loss) or not z_loss >= 0:
        raise ValueError(f"z_loss must be a number >= 0, got {z_loss!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be an int >= 1 or None, got {chunk_rows!r}")


def _has_kernel(device):
    """Whether the compiled op has a kernel for device (the CPU's, for now)."""
    return _ext.LOADED and device.type == "cpu"


def linear_cross_entropy(input, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                         reduction="mean", softcap=None, z_loss=0.0, return_lse=False, chunk_rows=None):
    """F.cross_entropy(F.linear(input, weight, bias), target, ...) without the
    logits in memory: input [..., D], weight [V, D], target [...] (int64).

    softcap: the logits become softcap * tanh(logits / softcap) first (Gemma 2).
    z_loss: z_loss * lse^2 is added to each row's loss (PaLM), lse being the
    row's log-sum-exp. ignore_index rows count nowhere and cost nothing;
    'mean' divides by the rows that count, and is 0 (with zero gradients)
    when none does, where torch's gives NaN. return_lse: also the rows' lse
    (float32; float64 for double inputs; 0 for ignored rows), without a
    gradient. chunk_rows: rows whose logits are held at once (default: 8M
    logits' worth, at least 256 rows); fewer saves memory, more runs fewer
    passes over the weight's gradient.

    Gradients flow to input, weight and bias, computed in the forward pass
    when the reduction is 'mean' or 'sum' (the backward scales them)."""
    _check(input, weight, target, bias, ignore_index, label_smoothing, reduction, softcap, z_loss, chunk_rows)
    float32_loss = autocast_runs_in_float32(input)
    input, weight, bias = autocast_inputs(input, weight, bias)
    lead = input.shape[:-1]
    x, t = input.reshape(-1, input.shape[-1]), target.reshape(-1)
    if _has_kernel(x.device):
        loss, lse = torch.ops.bigkernels.linear_cross_entropy(
            x, weight, t, bias, ignore_index, float(label_smoothing), float(softcap or 0.0), float(z_loss),
            reduction, int(chunk_rows or 0))
    else:
        loss, lse = reference.linear_cross_entropy(x, weight, t, bias, ignore_index, label_smoothing,
                                                   softcap or 0.0, z_loss, reduction)
    # torch's autocast runs cross_entropy in float32: the loss stays so there
    loss = loss.float() if float32_loss else loss.to(input.dtype)
    if reduction == "none":
        loss = loss.reshape(lead)
    return (loss, lse.reshape(lead)) if return_lse else loss


def _register():
    """Fake implementations for the compiled ops (autograd is in C++)."""

    def stats_dtype(input):
        return torch.float64 if input.dtype == torch.float64 else torch.float32

    def loss_and_lse(input, reduction):
        rows = input.shape[0]
        loss = input.new_empty((rows,) if reduction == "none" else (), dtype=stats_dtype(input))
        return loss, input.new_empty((rows,), dtype=stats_dtype(input))

    @torch.library.register_fake("bigkernels::linear_cross_entropy")
    def _fake(input, weight, target, bias, ignore_index, label_smoothing, softcap, z_loss, reduction, chunk_rows):
        return loss_and_lse(input, reduction)

    def grads(input, weight, bias, grad_mask):
        def like(t, wanted):
            return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else input.new_empty((0,))
        return (like(input, grad_mask[0]), like(weight, grad_mask[1]),
                like(bias, grad_mask[2] and bias is not None) if bias is not None else input.new_empty((0,)))

    @torch.library.register_fake("bigkernels::linear_cross_entropy_forward")
    def _forward_fake(input, weight, target, bias, ignore_index, label_smoothing, softcap, z_loss, reduction,
                      chunk_rows, grad_mask):
        return (*loss_and_lse(input, reduction), *grads(input, weight, bias, grad_mask))

    @torch.library.register_fake("bigkernels::linear_cross_entropy_backward")
    def _backward_fake(grad_loss, input, weight, target, bias, lse, ignore_index, label_smoothing, softcap, z_loss,
                       chunk_rows, grad_mask):
        return grads(input, weight, bias, grad_mask)


if _ext.LOADED:
    _register()
