"""The RNN family: bigkernels.nn.RNN / LSTM / GRU against torch.nn's own
modules with the same weights (cuDNN on the GPU, after flatten_parameters;
on the CPU oneDNN's LSTM and ATen's per-step RNN and GRU), a loop over
torch.nn's cell (what a hand-written model does), and on the GPU cuDNN
replayed from a CUDA graph, the best a torch user gets today."""

import torch
from torch import nn

import bigkernels

from .harness import Case, Variant

TORCH_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
OUR_CLASSES = {"lstm": bigkernels.nn.LSTM, "gru": bigkernels.nn.GRU, "rnn": bigkernels.nn.RNN}
TORCH_CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}
VARIANTS = ("bigkernels", "eager", "cell_loop", "cudnn_graph")
# (cell, B, T, H): input size = H. The first CPU shapes are the issue's.
CPU_SHAPES = [("lstm", 16, 256, 256), ("gru", 16, 256, 256), ("rnn", 16, 256, 256), ("lstm", 64, 128, 512)]
GPU_SHAPES = [(cell, B, 512, H) for cell in ("lstm", "gru", "rnn") for H in (256, 512, 1024) for B in (1, 8, 64, 256)]
GPU_SHAPES.append(("lstm", 16, 1024, 768))  # FlashRNN's published H100 configuration


def _cell_loop(cell_module, x, lstm):
    def run():
        h = torch.zeros(x.shape[1], cell_module.hidden_size, device=x.device, dtype=x.dtype)
        state = (h, h) if lstm else h
        outputs = []
        for x_t in x:
            state = cell_module(x_t, state)
            outputs.append(state[0] if lstm else state)
        return torch.stack(outputs)
    return run


def _graphed(module, x):
    """torch.nn's module replayed from CUDA graphs, forward and backward."""
    graphed = torch.cuda.make_graphed_callables(module, (x,))
    return lambda: graphed(x)[0]


def _make(device, cell, B, T, H, dtype):
    def make():
        torch.manual_seed(0)
        theirs = TORCH_CLASSES[cell](H, H, device=device, dtype=dtype)
        ours = OUR_CLASSES[cell](H, H, device=device, dtype=dtype)
        ours.load_state_dict(theirs.state_dict())
        cell_module = TORCH_CELLS[cell](H, H, device=device, dtype=dtype)
        x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=True)
        wrt = (x,) + tuple(theirs.parameters())
        variants = {
            "bigkernels": Variant(lambda: ours(x)[0], (x,) + tuple(ours.parameters())),
            "eager": Variant(lambda: theirs(x)[0], wrt, note="torch.nn" + (" (cuDNN)" if device == "cuda" else "")),
            "cell_loop": Variant(_cell_loop(cell_module, x, cell == "lstm"), (x,) + tuple(cell_module.parameters()),
                                 note=f"a Python loop over torch.nn.{TORCH_CELLS[cell].__name__}"),
        }
        if device == "cuda":
            theirs.flatten_parameters()
            graph_module = TORCH_CLASSES[cell](H, H, device=device, dtype=dtype)
            graph_module.load_state_dict(theirs.state_dict())
            variants["cudnn_graph"] = Variant(_graphed(graph_module, x), (x,) + tuple(graph_module.parameters()),
                                              note="torch.nn (cuDNN) replayed from CUDA graphs")
        return variants
    return make


def _case(device, cell, B, T, H, dtype):
    return Case(family="rnn", name=f"{cell} {DTYPE_NAMES[dtype]} B{B} T{T} H{H}",
                params=dict(cell=cell, B=B, T=T, H=H, dtype=DTYPE_NAMES[dtype]),
                # 2 * T * B * gates * H * (input size + H): the input and recurrent GEMMs
                flops=2.0 * T * B * GATES[cell] * H * (H + H), backward_flops_factor=2.0,
                make=_make(device, cell, B, T, H, dtype))


def cases(device, full, log=print):
    if device == "cuda":
        shapes = GPU_SHAPES if full else [s for s in GPU_SHAPES if s[1] in (8, 64) and s[3] == 1024]
        return [_case(device, *s, dtype) for dtype in (torch.bfloat16, torch.float32) for s in shapes]
    shapes = CPU_SHAPES if full else CPU_SHAPES[:3]
    return [_case(device, *s, torch.float32) for s in shapes]
