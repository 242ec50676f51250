"""Dense + bias + activation: argument checks, fake implementations, autograd,
autocast, and the fallback to the reference when the extension is absent.

The ops themselves (bigkernels::dense_forward, bigkernels::dense_backward)
are defined in csrc/bigkernels.cpp.
"""

import torch

from .. import _ext, reference
from ._autocast import autocast_inputs

from ..reference import ACTIVATIONS, DERIVATIVE_FROM_OUTPUT, GATED

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def normalize_activation(activation):
    """None -> "none"; checks the name. Names are exact (lower case), as
    torch's own string options are: "Gelu" is refused, not guessed."""
    if activation is None:
        return "none"
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a string or None, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        hint = f" (did you mean {activation.lower()!r}?)" if activation.lower() in ACTIVATIONS else ""
        raise ValueError(f"unknown activation {activation!r}{hint}; expected one of {', '.join(ACTIVATIONS)}")
    return activation


def check_recompute(recompute):
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {recompute!r}")


def out_features(weight_rows, activation):
    """Width of the output for a weight with weight_rows rows."""
    return weight_rows // 2 if activation in GATED else weight_rows


def check_dense_args(input, weight, bias, activation):
    """Raises TypeError/ValueError naming the bad argument."""
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match input dtype {input.dtype}")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if input.dim() < 1:
        raise ValueError("input must have at least 1 dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-d [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"weight has {weight.shape[1]} input features but input's last dimension is {input.shape[-1]}"
        )
    if activation in GATED and weight.shape[0] % 2:
        raise ValueError(
            f"activation {activation!r} needs an even number of weight rows (2 * out_features), "
            f"got {weight.shape[0]}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def dense(input, weight, bias=None, activation="none", *, recompute=False):
    """act(input @ weight.T + bias), with bias and activation fused into the GEMM.

    input: (..., in_features); weight: (out_features, in_features), or
    (2 * out_features, in_features) for the gated activations swiglu/geglu,
    whose output is act(first half) * second half; bias: (weight rows,) or None.
    activation: one of none, relu, gelu (exact), gelu_tanh, silu, sigmoid,
    tanh, swiglu, geglu (or None), spelt exactly so. recompute=True keeps
    nothing but the inputs for backward and recomputes the pre-activation
    there instead. At +-inf every activation and gradient gives its true
    limit where that is finite (silu(-inf) = 0, where torch gives NaN).
    """
    activation = normalize_activation(activation)
    check_recompute(recompute)
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    input, weight, bias = autocast_inputs(input, weight, bias)
    if not _ext.LOADED:
        check_dense_args(input, weight, bias, activation)
        return reference.dense(input, weight, bias, activation)
    # The op checks the rest itself (in C++, or in its fake implementation):
    # checking here as well cost a few microseconds per call.
    needs_grad = torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    save_preactivation = (
        needs_grad and not recompute and activation != "none" and activation not in DERIVATIVE_FROM_OUTPUT
    )
    output, _ = torch.ops.bigkernels.dense_forward(input, weight, bias, activation, save_preactivation)
    return output


def _register():
    """Fake implementations and autograd for the compiled ops."""

    @torch.library.register_fake("bigkernels::dense_forward")
    def _dense_forward_fake(input, weight, bias, activation, save_preactivation):
        check_dense_args(input, weight, bias, activation)
        lead = tuple(input.shape[:-1])
        output = input.new_empty(lead + (out_features(weight.shape[0], activation),))
        preact = input.new_empty(lead + (weight.shape[0],) if save_preactivation else (0,))
        return output, preact

    @torch.library.register_fake("bigkernels::dense_backward")
    def _dense_backward_fake(grad_output, input, weight, bias, saved, activation, saved_is_output, output_mask):
        def grad_like(t, wanted):
            return t.new_empty(t.shape) if wanted and t is not None else input.new_empty((0,))

        return grad_like(input, output_mask[0]), grad_like(weight, output_mask[1]), grad_like(bias, output_mask[2])

    # Autograd is registered in C++ (csrc/dense/dense_autograd.cpp); its
    # double backward (create_graph=True) calls this, which differentiates
    # the reference's PyTorch ops, themselves differentiable.
    @torch.library.impl("bigkernels::dense_backward_reference", "CompositeImplicitAutograd")
    def _dense_backward_reference(grad_output, input, weight, bias, activation, output_mask):
        wanted = [t for t, m in zip((input, weight, bias), output_mask) if m]
        grads = iter(torch.autograd.grad(reference.dense(input, weight, bias, activation), wanted, grad_output,
                                         create_graph=True))
        return tuple(next(grads) if m else input.new_empty((0,)) for m in output_mask)


if _ext.LOADED:
    _register()
