from torch import nn

from ..nn import Linear


class DNN(nn.Module):
    """A feed-forward network: [Linear -> activation] x N -> Linear.

    The seed article's DNN (Linear -> ReLU -> Linear) is DNN(input_size,
    hidden_size, output_size). hidden_size is one width, repeated
    num_hidden_layers times, or a list of widths. Each activation is fused
    into the Linear before it.
    """

    def __init__(self, input_size, hidden_size, output_size, num_hidden_layers=1, activation="relu",
                 bias=True, device=None, dtype=None):
        super().__init__()
        widths = [hidden_size] * num_hidden_layers if isinstance(hidden_size, int) else list(hidden_size)
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"hidden_size must give at least one positive width, got {hidden_size!r}")
        sizes = [input_size] + widths
        self.hidden = nn.ModuleList(
            Linear(i, o, bias, activation, device, dtype) for i, o in zip(sizes[:-1], sizes[1:])
        )
        self.output = Linear(sizes[-1], output_size, bias, None, device, dtype)

    def forward(self, x):
        for layer in self.hidden:
            x = layer(x)
        return self.output(x)
