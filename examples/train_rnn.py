"""Train the seed article's RNN (h_t = g(W x_t + U h_{t-1} + b), y_t = f(V h_t + c))
with MSELoss and Adam, on bigkernels' fused recurrent layers.

    python examples/train_rnn.py [--cell rnn|lstm|gru] [--epochs 150] [--device cpu|cuda]

The task is synthetic, so it runs anywhere without downloads: the model reads
a noisy sequence and must output, at every step, the value it read DELAY
steps earlier, which it can only do by keeping it in its state.
"""

import argparse
import time

import torch
from torch import nn

import bigkernels

DELAY = 3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", choices=("rnn", "lstm", "gru"), default="lstm")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    torch.manual_seed(0)
    batch, steps = 64, 50
    x = torch.randn(batch, steps, 1, device=args.device)
    y = torch.roll(x, DELAY, dims=1)  # y_t = x_{t - DELAY}; the first DELAY steps are not scored

    model = bigkernels.models.RNNModel(1, 32, 1, cell=args.cell).to(args.device)
    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    print(model)
    print(bigkernels.backend_info())

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        optimizer.zero_grad()
        prediction, _ = model(x)
        loss = criterion(prediction[:, DELAY:], y[:, DELAY:])
        loss.backward()
        optimizer.step()
        if epoch == 1 or epoch % 15 == 0:
            print(f"epoch {epoch:4d}  loss {loss.item():.4f}")
    print(f"{args.epochs} epochs in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
