import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..nn import GRU, LSTM, RNN, Linear

_CELLS = {"rnn": RNN, "lstm": LSTM, "gru": GRU}


class RNNModel(nn.Module):
    """The seed article's recurrent network as a sequence model:

        h_t = g(W x_t + U h_{t-1} + b)      (the stacked RNN, LSTM or GRU)
        y_t = f(V h_t + c)                  (a dense head, f fused into it)

    Input: token ids [batch, time] when vocab_size is given (an embedding of
    width input_size comes first), else features [batch, time, input_size]
    (batch_first; batch_first=False takes [time, batch, ...]). Returns the
    outputs y [batch, time, output_size] and the final state (h_n, or
    (h_n, c_n) for an LSTM), which forward(x, state) continues from.
    forward(x, lengths=...) takes padded sequences of the given lengths: the
    recurrence stops at each one's end (its state is the one after its last
    real step; a reverse direction starts there), and y is 0 past the end.
    cell: "rnn" (nonlinearity g = "tanh" or "relu"), "lstm" or "gru";
    output_activation: f, any bigkernels.dense activation or None.
    """

    def __init__(self, input_size, hidden_size, output_size, num_layers=1, cell="lstm", nonlinearity="tanh",
                 vocab_size=None, output_activation=None, dropout=0.0, bidirectional=False, batch_first=True,
                 bias=True, device=None, dtype=None):
        super().__init__()
        if cell not in _CELLS:
            raise ValueError(f"cell must be one of {', '.join(_CELLS)}, got {cell!r}")
        factory = dict(device=device, dtype=dtype)
        self.embedding = nn.Embedding(vocab_size, input_size, **factory) if vocab_size is not None else None
        extra = dict(nonlinearity=nonlinearity) if cell == "rnn" else {}
        self.rnn = _CELLS[cell](input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
                                dropout=dropout, bidirectional=bidirectional, **extra, **factory)
        directions = 2 if bidirectional else 1
        self.head = Linear(directions * hidden_size, output_size, bias, output_activation, **factory)

    def forward(self, x, state=None, lengths=None):
        if self.embedding is not None:
            x = self.embedding(x)
        if lengths is None:
            h, state = self.rnn(x, state)
            return self.head(h), state
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
        batch_first = self.rnn.batch_first
        if lengths.dim() != 1 or lengths.numel() != x.shape[0 if batch_first else 1]:
            raise ValueError(f"lengths must hold one length per sequence ({x.shape[0 if batch_first else 1]}), "
                             f"got shape {tuple(lengths.shape)}")
        steps = x.shape[1 if batch_first else 0]
        if lengths.numel() and (lengths.min() < 1 or lengths.max() > steps):
            raise ValueError(f"lengths must lie in [1, {steps}] (the padded length), got {lengths.tolist()}")
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        h, state = self.rnn(packed, state)
        h, _ = pad_packed_sequence(h, batch_first=batch_first, total_length=steps)
        y = self.head(h)
        mask = torch.arange(steps).unsqueeze(0 if batch_first else 1) < lengths.unsqueeze(1 if batch_first else 0)
        return y * mask.unsqueeze(-1).to(y.device, y.dtype), state
