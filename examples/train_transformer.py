"""Train bigkernels.models.Transformer as a causal language model with
cross-entropy and Adam (the seed article's loop: loss, backward, step), on
bigkernels' fused attention and fused MLP.

    python examples/train_transformer.py [--steps 200] [--device cpu|cuda]

The data is synthetic: sequences that count up from a random start modulo
the vocabulary, with a random stride per sequence, so the next token is
learnable from the context and the example runs anywhere without downloads.
"""

import argparse
import time

import torch
from torch import nn

import bigkernels


def batch(size, length, vocab, device):
    start = torch.randint(vocab, (size, 1), device=device)
    stride = torch.randint(1, 4, (size, 1), device=device)
    return (start + stride * torch.arange(length + 1, device=device)) % vocab


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    torch.manual_seed(0)
    vocab, length = 32, 48
    model = bigkernels.models.Transformer(vocab, d_model=64, nhead=4, num_layers=2, max_len=length,
                                          device=args.device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        seq = batch(32, length, vocab, args.device)
        logits = model(seq[:, :-1])
        loss = loss_fn(logits.reshape(-1, vocab), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
