"""Dense + bias + activation: argument checks, fake implementations, autograd,
autocast, and the fallback to the reference when the extension is absent.

The ops themselves (bigkernels::dense_forward, bigkernels::dense_backward)
are defined in csrc/bigkernels.cpp.
"""

import torch

from .. import _ext, reference
from ._autocast import autocast_inputs
from ._grad import needs_grad

from ..reference import ACTIVATIONS, DERIVATIVE_FROM_OUTPUT, GATED

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# The rows of input for which the CPU op runs its decoding product (each weight
# row read once for all rows, at the memory's bandwidth) rather than BLAS: the
# same table as decode_min_rows/decode_max_rows in csrc/dense/cpu/dense_kernels.h.
_CPU_DECODE_ROWS = {torch.float32: (2, 8), torch.bfloat16: (1, 4), torch.float16: (1, 4)}


def runs_cpu_decode_product(input, weight):
    """Whether dense() on the CPU takes its decoding product for these inputs,
    which beats BLAS (docs/PERFORMANCE.md)."""
    low, high = _CPU_DECODE_ROWS.get(input.dtype, (1, 0))
    features = input.shape[-1] if input.dim() else 0
    return features > 0 and low <= input.numel() // features <= high and weight.dim() == 2 and weight.stride(1) == 1


# The rows from which the CPU op runs oneDNN's product for float32/bf16 with a
# contiguous weight: kOneDnnMinRows in csrc/dense/cpu/dense_cpu.cpp.
_CPU_ONEDNN_MIN_ROWS = 32


def cpu_dense_beats_linear(input, weight):
    """Whether dense() without an activation beats F.linear on the CPU: its
    decoding product for a few rows, or oneDNN's with the bias added in its
    epilogue for many rows (docs/PERFORMANCE.md). Elsewhere both run ATen's
    addmm, ours after a few microseconds more of dispatch."""
    if runs_cpu_decode_product(input, weight):
        return True
    features = input.shape[-1] if input.dim() else 0
    return (features > 0 and input.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()
            and input.numel() // features >= _CPU_ONEDNN_MIN_ROWS and torch.backends.mkldnn.is_available())


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


def check_dense_args(input, weight, bias, activation, up_weight=None):
    """Raises TypeError/ValueError naming the bad argument."""
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("up_weight", up_weight)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("up_weight", up_weight)):
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
    rows = weight.shape[0]
    if up_weight is not None:
        if activation not in GATED:
            raise ValueError(f"up_weight is only for the gated activations ({', '.join(GATED)}), "
                             f"got activation {activation!r}")
        if up_weight.shape != weight.shape:
            raise ValueError(f"up_weight must have weight's shape {tuple(weight.shape)}, "
                             f"got {tuple(up_weight.shape)}")
        rows *= 2
    elif activation in GATED and rows % 2:
        raise ValueError(
            f"activation {activation!r} needs an even number of weight rows (2 * out_features), "
            f"got {rows}"
        )
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ValueError(f"bias must have shape ({rows},), got {tuple(bias.shape)}")


def dense(input, weight, bias=None, activation="none", *, recompute=False, up_weight=None):
    """act(input @ weight.T + bias), with bias and activation fused into the GEMM.

    input: (..., in_features); weight: (out_features, in_features), or
    (2 * out_features, in_features) for the gated activations swiglu/geglu,
    whose output is act(first half) * second half; bias: (weight rows,) or None.
    up_weight (gated activations only): the second half as its own tensor,
    weight's shape, e.g. a Llama MLP's up_proj.weight next to gate_proj.weight.
    The result is that of torch.cat([weight, up_weight]) without the copy, and
    bias, when given, covers both halves (2 * out_features,).
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
    for name, t in (("bias", bias), ("up_weight", up_weight)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    input, weight, bias, up_weight = autocast_inputs(input, weight, bias, up_weight)
    if not _ext.LOADED:
        check_dense_args(input, weight, bias, activation, up_weight)
        return reference.dense(input, weight, bias, activation, up_weight)
    # The op checks the rest itself (in C++, or in its fake implementation):
    # checking here as well cost a few microseconds per call.
    wants_grad = needs_grad(input, weight, bias, up_weight)
    save_preactivation = (
        wants_grad and not recompute and activation != "none" and activation not in DERIVATIVE_FROM_OUTPUT
    )
    output, _ = torch.ops.bigkernels.dense_forward(input, weight, bias, activation, save_preactivation, up_weight)
    return output


def _empty_grads(input, weight, bias, output_mask, up_weight):
    """dense_backward's outputs' shapes: grad_weight is [weight; up_weight]'s."""
    rows = weight.shape[0] * (1 if up_weight is None else 2)
    shapes = (input.shape, (rows, weight.shape[1]), None if bias is None else bias.shape)
    return tuple(input.new_empty(shape) if wanted and shape is not None else input.new_empty((0,))
                 for shape, wanted in zip(shapes, output_mask))


def _register():
    """Fake implementations and autograd for the compiled ops."""

    @torch.library.register_fake("bigkernels::dense_forward")
    def _dense_forward_fake(input, weight, bias, activation, save_preactivation, up_weight=None):
        check_dense_args(input, weight, bias, activation, up_weight)
        lead = tuple(input.shape[:-1])
        rows = weight.shape[0] * (1 if up_weight is None else 2)
        output = input.new_empty(lead + (out_features(rows, activation),))
        preact = input.new_empty(lead + (rows,) if save_preactivation else (0,))
        return output, preact

    @torch.library.register_fake("bigkernels::dense_backward")
    def _dense_backward_fake(grad_output, input, weight, bias, saved, activation, saved_is_output, output_mask,
                             up_weight=None):
        return _empty_grads(input, weight, bias, output_mask, up_weight)

    # Autograd is registered in C++ (csrc/dense/dense_autograd.cpp); its
    # double backward (create_graph=True) calls this, which differentiates
    # the reference's PyTorch ops, themselves differentiable.
    @torch.library.impl("bigkernels::dense_backward_reference", "CompositeImplicitAutograd")
    def _dense_backward_reference(grad_output, input, weight, bias, activation, output_mask, up_weight=None):
        # With an up_weight, the gradient of [weight; up_weight], as dense_backward's.
        weight = weight if up_weight is None else torch.cat([weight, up_weight])
        wanted = [t for t, m in zip((input, weight, bias), output_mask) if m]
        grads = iter(torch.autograd.grad(reference.dense(input, weight, bias, activation), wanted, grad_output,
                                         create_graph=True))
        return tuple(next(grads) if m else input.new_empty((0,)) for m in output_mask)


if _ext.LOADED:
    _register()
