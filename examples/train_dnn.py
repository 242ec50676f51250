"""Train the seed article's DNN (Linear -> ReLU -> Linear) with MSELoss and
Adam, on bigkernels' fused layers.

    python examples/train_dnn.py [--epochs 200] [--device cpu|cuda]

The data is synthetic: y = sin(x . a) + 0.1 * noise, so the example runs
anywhere without downloads.
"""

import argparse
import time

import torch
from torch import nn

import bigkernels


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden-layers", type=int, default=1, help="the article uses 1")
    args = p.parse_args()

    torch.manual_seed(0)
    input_size, hidden_size, output_size = 32, 128, 1
    x = torch.randn(4096, input_size, device=args.device)
    a = torch.randn(input_size, output_size, device=args.device) / input_size**0.5
    y = torch.sin(x @ a) + 0.1 * torch.randn(4096, output_size, device=args.device)

    model = bigkernels.models.DNN(input_size, hidden_size, output_size,
                                  num_hidden_layers=args.hidden_layers, activation="relu").to(args.device)
    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    print(model)
    print(bigkernels.backend_info())

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        if epoch == 1 or epoch % 20 == 0:
            print(f"epoch {epoch:4d}  loss {loss.item():.4f}")
    print(f"{args.epochs} epochs in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
