from torch import nn

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

    def forward(self, x, state=None):
        if self.embedding is not None:
            x = self.embedding(x)
        h, state = self.rnn(x, state)
        return self.head(h), state
