"""Pure-PyTorch reference of every op.

The ground truth the tests compare against (run in float64), and the path
taken when the compiled extension is absent. Written for clarity, not speed.
"""

import torch
import torch.nn.functional as F

# The Python list of activations (the C++ one is BK_FOR_EACH_ACTIVATION in
# csrc/common/activations.h; tests/test_dense.py checks that they agree).
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "swiglu", "geglu")
GATED = {"swiglu": "silu", "geglu": "gelu"}  # gated activation -> its inner activation
# Activations whose derivative backward computes from the output, which the
# caller keeps anyway, instead of from a saved pre-activation
# (derivative_from_output() in activations.h; "none" needs neither).
DERIVATIVE_FROM_OUTPUT = frozenset({"relu", "sigmoid", "tanh"})
# Beyond -SATURATE, gelu, gelu_tanh and silu are 0 in float and double alike.
# Clamping there gives their true limit 0 at -inf, where torch's formulas give
# NaN (-inf * 0); the kernels do the same (kSaturate in activations.h).
SATURATE = 1e4


def activation(z, name):
    """act(z) for every activation name; gated ones split z's last dim in half."""
    if name in GATED:
        first, second = z.chunk(2, dim=-1)
        return activation(first, GATED[name]) * second
    if name == "none":
        return z
    if name in ("gelu", "gelu_tanh", "silu"):
        z = torch.where(z < -SATURATE, -SATURATE, z)  # NaN stays NaN, and so does its gradient
    if name == "relu":
        return F.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "tanh":
        return torch.tanh(z)
    raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


def dense(x, weight, bias=None, activation_name="none"):
    """act(x @ weight.T + bias), F.linear's convention."""
    return activation(F.linear(x, weight, bias), activation_name)
