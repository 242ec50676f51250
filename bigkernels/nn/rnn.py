"""torch.nn.RNN, LSTM, GRU and their cells on the fused RNN kernels.

RNN, LSTM and GRU are built on torch.nn.RNNBase, as torch's are, and take
torch's methods for everything but forward: the constructor, parameters,
initialisation and state_dict keys are torch's own, so checkpoints load both
ways, and bigkernels.optimize() can turn a torch module into ours by changing
its class. They are not subclasses of torch.nn.LSTM & co. on purpose:
torch.compile refuses to trace any instance of those (it has no support for
their cuDNN path), and ours compile with fullgraph=True. The cells subclass
torch's cells, which torch.compile traces.
"""

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..ops.rnn import rnn, rnn_layer


class _FusedRNNMixin:
    """The forward of torch.nn.RNNBase's subclasses (same arguments, checks and
    outputs), with the layers run by bigkernels.ops.rnn."""

    def forward(self, input, hx=None):
        if hasattr(self, "_update_flat_weights"):
            self._update_flat_weights()
        lstm = self.mode == "LSTM"
        name = type(self).__name__
        directions = 2 if self.bidirectional else 1
        out_width = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch, is_batched = int(batch_sizes[0]), True
            checked = data
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batch_sizes = sorted_indices = unsorted_indices = None
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            checked = input
            batch = input.size(batch_dim)
            if input.size(1 - batch_dim) == 0:
                raise ValueError(f"{name}: input has no time steps (sequence length 0)")
        if hx is None:
            zeros = torch.zeros(self.num_layers * directions, batch, out_width, dtype=checked.dtype,
                                device=checked.device)
            hx = (zeros, torch.zeros(self.num_layers * directions, batch, self.hidden_size, dtype=checked.dtype,
                                     device=checked.device)) if lstm else zeros
        else:
            states = hx if lstm else (hx,)
            if lstm and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
                raise TypeError(f"{name}: hx must be a tuple (h_0, c_0)")
            wanted = 3 if is_batched else 2
            for i, state in enumerate(states):
                if not isinstance(state, torch.Tensor):
                    raise TypeError(f"{name}: hx must hold Tensors, got {type(state).__name__}")
                if state.dim() != wanted:
                    raise RuntimeError(f"{name}: for {'batched 3-D' if is_batched else 'unbatched 2-D'} input, "
                                       f"hx{f'[{i}]' if lstm else ''} should be {wanted}-D, got {state.dim()}-D")
            if not is_batched:
                hx = tuple(s.unsqueeze(1) for s in hx) if lstm else hx.unsqueeze(1)
        self.check_forward_args(checked, hx, batch_sizes)  # torch's own shape and dtype checks
        if packed:
            hx = self.permute_hidden(hx, sorted_indices)
        else:
            time_major = input.transpose(0, 1) if self.batch_first else input
            steps = time_major.size(0)
            data = time_major.reshape(steps * batch, time_major.size(2))
        h0, c0 = hx if lstm else (hx, None)
        output, h_n, c_n = rnn(data, batch_sizes, h0, c0, self._flat_weights, self.mode.lower(), self.num_layers,
                               self.bias, self.proj_size > 0, self.bidirectional, self.dropout, self.training)
        hidden = (h_n, c_n) if lstm else h_n
        if packed:
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), \
                self.permute_hidden(hidden, unsorted_indices)
        output = output.view(steps, batch, output.shape[-1])
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (h_n.squeeze(1), c_n.squeeze(1)) if lstm else h_n.squeeze(1)
        return output, hidden


class RNN(_FusedRNNMixin, nn.RNNBase):
    """torch.nn.RNN (tanh or relu) on the fused kernels."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None):
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(modes[nonlinearity], input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity


class LSTM(_FusedRNNMixin, nn.RNNBase):
    """torch.nn.LSTM (with proj_size) on the fused kernels."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device=device, dtype=dtype)

    # torch.nn.LSTM's: (h_0, c_0) checked and permuted together
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden


class GRU(_FusedRNNMixin, nn.RNNBase):
    """torch.nn.GRU on the fused kernels."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)


class _FusedCellMixin:
    """The forward of torch.nn's cells: one fused op per step."""

    def forward(self, input, hx=None):
        name = type(self).__name__
        lstm = isinstance(self, nn.LSTMCell)
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        states = () if hx is None else (tuple(hx) if lstm else (hx,))
        if lstm and hx is not None and len(states) != 2:
            raise TypeError(f"{name}: hx must be a tuple (h, c)")
        for i, state in enumerate(states):
            if not isinstance(state, torch.Tensor) or state.dim() not in (1, 2):
                raise ValueError(f"{name}: Expected hx{f'[{i}]' if lstm else ''} to be a 1D or 2D Tensor")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
            states = tuple(s.unsqueeze(0) for s in states)
        if input.shape[1] != self.input_size:
            raise ValueError(f"{name}: input has {input.shape[1]} features, expected input_size={self.input_size}")
        if not states:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            states = (zeros, zeros) if lstm else (zeros,)
        for i, state in enumerate(states):
            if state.shape != (input.shape[0], self.hidden_size):
                raise ValueError(f"{name}: hx{f'[{i}]' if lstm else ''} must have shape "
                                 f"{(input.size(0), self.hidden_size)} to match input, got {tuple(state.shape)}")
        mode = "lstm" if lstm else "gru" if isinstance(self, nn.GRUCell) else f"rnn_{self.nonlinearity}"
        _, h, c = rnn_layer(input, None, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, None,
                            states[0], states[1] if lstm else None, mode)
        if not is_batched:
            h, c = h.squeeze(0), (None if c is None else c.squeeze(0))
        return (h, c) if lstm else h


class RNNCell(_FusedCellMixin, nn.RNNCell):
    """torch.nn.RNNCell on the fused kernel."""


class LSTMCell(_FusedCellMixin, nn.LSTMCell):
    """torch.nn.LSTMCell on the fused kernel."""


class GRUCell(_FusedCellMixin, nn.GRUCell):
    """torch.nn.GRUCell on the fused kernel."""


# torch.nn class -> ours, for bigkernels.optimize()
FUSED_RNN_CLASSES = {nn.RNN: RNN, nn.LSTM: LSTM, nn.GRU: GRU, nn.RNNCell: RNNCell, nn.LSTMCell: LSTMCell,
                     nn.GRUCell: GRUCell}
