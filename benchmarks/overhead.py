"""Per-call host overhead: each family's op on tensors so small that the
kernels cost nothing, against the torch calls it replaces. What is left is
Python, the dispatcher and autograd: on a GPU it is paid on every call,
and below a few GFLOP it is larger than the kernel itself."""

import torch
import torch.nn.functional as F
from torch import nn

import bigkernels

from .harness import Case, Variant

VARIANTS = ("bigkernels", "eager")
CALLS_PER_SAMPLE = 100


def _dense(device):
    def make():
        g = torch.Generator(device=device).manual_seed(0)
        x, w = (torch.randn(4, 8, generator=g, device=device).requires_grad_() for _ in range(2))
        b = torch.randn(4, generator=g, device=device).requires_grad_()
        return {"bigkernels": Variant(lambda: bigkernels.dense(x, w, b, "relu"), (x, w, b)),
                "eager": Variant(lambda: F.relu(F.linear(x, w, b)), (x, w, b), note="F.relu(F.linear(...))")}
    return make


def _attention(device):
    def make():
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 1, 8, 8, generator=g, device=device).requires_grad_() for _ in range(3))
        return {"bigkernels": Variant(lambda: bigkernels.scaled_dot_product_attention(q, k, v), (q, k, v)),
                "eager": Variant(lambda: F.scaled_dot_product_attention(q, k, v), (q, k, v),
                                 note="F.scaled_dot_product_attention")}
    return make


def _rnn(device, cell):
    """An LSTM over one step (the whole layer's call), or one LSTMCell step
    (what a hand-written loop calls per step)."""
    def make():
        torch.manual_seed(0)
        make_theirs = nn.LSTMCell if cell else nn.LSTM
        theirs = make_theirs(8, 8, device=device)
        ours = (bigkernels.nn.LSTMCell if cell else bigkernels.nn.LSTM)(8, 8, device=device)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(*((1, 8) if cell else (1, 1, 8)), device=device, requires_grad=True)
        return {"bigkernels": Variant(lambda: ours(x)[0], (x,) + tuple(ours.parameters())),
                "eager": Variant(lambda: theirs(x)[0], (x,) + tuple(theirs.parameters()),
                                 note=f"torch.nn.{make_theirs.__name__}")}
    return make


def cases(device, full, log=print):
    def case(name, flops, make, backward_flops_factor=2.0):
        return Case(family="overhead", name=name, params=dict(op=name.split()[0]), flops=flops, make=make,
                    backward_flops_factor=backward_flops_factor, calls_per_sample=CALLS_PER_SAMPLE)
    return [
        case("dense 4x8x4 relu", 2.0 * 4 * 8 * 4, _dense(device)),
        case("attention B1 H1 L8 S8 D8", 4.0 * 8 * 8 * 8, _attention(device), 2.5),
        case("lstm B1 T1 H8", 2.0 * 4 * 8 * 16, _rnn(device, cell=False)),
        case("lstm_cell B1 H8", 2.0 * 4 * 8 * 16, _rnn(device, cell=True)),
    ]
