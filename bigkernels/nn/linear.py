import torch.nn.functional as F
from torch import nn

from ..ops.dense import GATED, check_recompute, dense, normalize_activation, cpu_dense_beats_linear


class Linear(nn.Linear):
    """torch.nn.Linear with a fused activation: act(x @ weight.T + bias).

    Same parameters, initialisation and state_dict keys as torch.nn.Linear,
    so checkpoints load both ways. With a gated activation (swiglu, geglu)
    the weight has 2 * out_features rows, like nn.Linear(in, 2 * out).
    """

    def __init__(self, in_features, out_features, bias=True, activation=None, device=None, dtype=None,
                 recompute=False):
        activation = normalize_activation(activation)
        check_recompute(recompute)
        rows = 2 * out_features if activation in GATED else out_features
        super().__init__(in_features, rows, bias=bias, device=device, dtype=dtype)
        self.out_features = out_features
        self.activation = activation
        self.recompute = recompute

    def forward(self, input):
        if self.activation == "none" and input.device.type == "cpu" and not cpu_dense_beats_linear(input, self.weight):
            # Nothing to fuse, and our op would run the same addmm after a few
            # microseconds of dispatch, which cost greedy decoding 4-5 % (docs/PERFORMANCE.md).
            return F.linear(input, self.weight, self.bias)
        return dense(input, self.weight, self.bias, self.activation, recompute=self.recompute)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation}"


class MLP(nn.Module):
    """Linear -> activation -> dropout -> Linear, the activation fused into fc1."""

    def __init__(self, in_features, hidden_features, out_features=None, activation="gelu", dropout=0.0,
                 bias=True, device=None, dtype=None):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        self.fc1 = Linear(in_features, hidden_features, bias, activation, device, dtype)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = Linear(hidden_features, out_features, bias, None, device, dtype)

    def forward(self, input):
        return self.fc2(self.dropout(self.fc1(input)))
