"""RNN layers (Elman tanh/relu, LSTM, GRU) over whole sequences: the fused
per-layer op, its fake implementation and autograd, and the stacking of
layers and directions that torch.nn's modules do.

The op (bigkernels::rnn_layer_forward, csrc/rnn/rnn.cpp) runs one layer in one
direction over a packed time-major sequence: input [N, I], step t owning
batch_sizes[t] consecutive rows (never growing), as in a PackedSequence; a
plain [T, B, I] tensor is the same layout with batch_sizes None.
"""

import warnings

import torch
import torch.nn.functional as F

from .. import _ext, reference
from .._info import BUILD_INFO
from ._autocast import autocast_inputs
from ._grad import needs_grad

MODES = reference.RNN_MODES
_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
_WORKSPACE_WIDTH = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 5, "gru": 4}  # times hidden_size


def _kernel_refusal(input, weight_hr):
    """Why the compiled kernels cannot run this call (None when they can): no
    extension, or on CUDA a build without CUDA, float64, or an LSTM projection
    (proj_size), which have no CUDA kernel yet."""
    if not _ext.LOADED:
        return "a build without the extension"
    if input.is_cpu or input.is_meta:
        return None
    if input.device.type != "cuda" or not BUILD_INFO["cuda_compiled"]:
        return f"{input.device.type} tensors in this build"
    if input.dtype == torch.float64:
        return "float64 on CUDA"
    if weight_hr is not None:
        return "proj_size on CUDA"
    return None


_WARNED = set()


def _warn_reference_once(reason):
    """Says once per reason that a call runs on the slow reference (importing
    bigkernels already warned when the extension is missing)."""
    if _ext.LOADED and reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"bigkernels.rnn: no kernel for {reason}; this runs on the pure-PyTorch reference "
                      "(one step at a time)", stacklevel=3)


def rnn_layer(input, batch_sizes, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, hx, cx, mode, reverse=False):
    """One layer, one direction, the whole sequence. Returns (output [N, Hout],
    hy [B, Hout], cy [B, H] or None). Differentiable in every tensor."""
    if hx.shape[0] == 0:  # an empty batch: nothing to run, the states pass through
        out_width = weight_hr.shape[0] if weight_hr is not None else weight_hh.shape[1]
        return input.new_zeros((0, out_width)), hx, cx
    refusal = _kernel_refusal(input, weight_hr)
    if refusal is not None:
        _warn_reference_once(refusal)
        return reference.rnn_layer(input, batch_sizes, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, hx, cx,
                                   mode, reverse)
    tensors = (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, hx, cx)
    train = needs_grad(*tensors)
    output, hy, cy, _ = torch.ops.bigkernels.rnn_layer_forward(
        input, batch_sizes, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, hx, cx, mode, reverse, train)
    return output, hy, (cy if mode == "lstm" else None)


def rnn(input, batch_sizes, hx, cx, weights, mode, num_layers, has_bias, has_proj, bidirectional, dropout,
        training):
    """torch.nn's stacked RNN on packed time-major data (see the module
    docstring). weights: torch.nn's _flat_weights order, per layer and
    direction w_ih, w_hh[, b_ih, b_hh][, w_hr]. hx: [layers * directions, B,
    Hout]; cx likewise (lstm only). Dropout applies to the outputs of every
    layer but the last, in training. Returns (output [N, directions * Hout],
    h_n, c_n or None)."""
    if mode not in MODES:
        raise ValueError(f"unknown RNN mode {mode!r}; expected one of {', '.join(MODES)}")
    input, hx, cx, *weights = autocast_inputs(input, hx, cx, *weights)
    directions = 2 if bidirectional else 1
    per_layer = 2 + 2 * has_bias + has_proj
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w = weights[k * per_layer:(k + 1) * per_layer]
            b_ih, b_hh = (w[2], w[3]) if has_bias else (None, None)
            output, hy, cy = rnn_layer(input, batch_sizes, w[0], w[1], b_ih, b_hh, w[-1] if has_proj else None,
                                       hx[k], None if cx is None else cx[k], mode, reverse=direction == 1)
            outputs.append(output)
            h_n.append(hy)
            c_n.append(cy)
        input = outputs[0] if directions == 1 else torch.cat(outputs, dim=1)
        if dropout > 0 and training and layer < num_layers - 1:
            input = F.dropout(input, dropout, training=True)
    return input, torch.stack(h_n), (torch.stack(c_n) if mode == "lstm" else None)


def _register():
    """Fake implementations and autograd for the compiled ops."""

    @torch.library.register_fake("bigkernels::rnn_layer_forward")
    def _forward_fake(input, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, mode, reverse, train):
        # The shapes are the kernels' to check; a device or dtype mix would
        # not reach them (a meta input sends the whole call here).
        named = {"weight_ih": w_ih, "weight_hh": w_hh, "bias_ih": b_ih, "bias_hh": b_hh, "weight_hr": w_hr,
                 "hx": hx, "cx": cx}
        for name, t in named.items():
            if t is not None and t.device != input.device:
                raise ValueError(f"bigkernels.rnn: {name} is on {t.device} but input is on {input.device}")
            if t is not None and t.dtype != input.dtype:
                raise TypeError(f"bigkernels.rnn: {name} dtype {t.dtype} does not match input dtype {input.dtype}")
        hidden = w_hh.shape[0] // _GATES[mode]
        out_width = w_hh.shape[1]
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        rows = input.shape[0]
        return (input.new_empty((rows, out_width)), hx.new_empty(hx.shape),
                cx.new_empty(cx.shape) if cx is not None else input.new_empty((0,)),
                input.new_empty((rows if train else 0, _WORKSPACE_WIDTH[mode] * hidden), dtype=acc))

    @torch.library.register_fake("bigkernels::rnn_layer_backward")
    def _backward_fake(grad_output, grad_hy, grad_cy, input, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx,
                       output, workspace, mode, reverse, output_mask):
        def like(t, wanted):
            return t.new_empty(t.shape) if wanted and t is not None else input.new_empty((0,))

        return (like(input, output_mask[0]), like(w_ih, output_mask[1]), like(w_hh, output_mask[1]),
                like(b_ih, output_mask[1]), like(b_hh, output_mask[1]), like(w_hr, output_mask[1]),
                like(hx, output_mask[2]), like(cx, output_mask[2]))

    # Autograd is registered in C++ (csrc/rnn/rnn_autograd.cpp); its double
    # backward (create_graph=True) calls this, which differentiates the
    # reference's PyTorch ops, themselves differentiable.
    @torch.library.impl("bigkernels::rnn_layer_backward_reference", "CompositeImplicitAutograd")
    def _backward_reference(grad_output, grad_hy, grad_cy, input, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx,
                            mode, reverse, output_mask):
        tensors = (input, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx)
        wanted = [t for t, m in zip(tensors, output_mask) if m]
        out, hy, cy = reference.rnn_layer(input, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, mode, reverse)
        outs, grads_in = [out, hy], [grad_output, grad_hy]
        if cy is not None:
            outs.append(cy)
            grads_in.append(grad_cy)
        grads = iter(torch.autograd.grad(outs, wanted, grads_in, create_graph=True, allow_unused=True))
        result = []
        for t, m in zip(tensors, output_mask):
            g = next(grads) if m else None
            result.append(input.new_empty((0,)) if not m else (torch.zeros_like(t) if g is None else g))
        return tuple(result)


if _ext.LOADED:
    _register()
