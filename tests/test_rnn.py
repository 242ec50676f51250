"""bigkernels.nn.RNN / LSTM / GRU and their cells against torch.nn with the
same weights: outputs, final states, and the gradients of the input, the
initial states and every parameter, each held to the float64 result by the
2x rule (our error at most twice torch's own in the same dtype)."""

import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import bigkernels
from bigkernels import reference
from bigkernels.ops.rnn import rnn_layer
from conftest import FLOOR, assert_close

TORCH_CLASSES = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
OUR_CLASSES = {"rnn": bigkernels.nn.RNN, "lstm": bigkernels.nn.LSTM, "gru": bigkernels.nn.GRU}


def rounded(t, dtype):
    """t's float64 values rounded to dtype. The float64 reference runs on the
    values the dtype can hold, so that its difference to a result measures the
    arithmetic only: otherwise a relu pre-activation within rounding of 0 takes
    either side by chance, in torch and in ours, and moves whole gradients."""
    return t.to(dtype).to(torch.float64)


def make_modules(cell, dtype, input_size, hidden_size, seed=0, **kwargs):
    """(ours in dtype, torch's in dtype, torch's in float64), the same weights."""
    torch.manual_seed(seed)
    ref = TORCH_CLASSES[cell](input_size, hidden_size, dtype=torch.float64, **kwargs)
    with torch.no_grad():  # weights of a size that keeps every gate away from saturation
        for p in ref.parameters():
            p.copy_(rounded(torch.randn_like(p) / math.sqrt(hidden_size), dtype))
    ours = OUR_CLASSES[cell](input_size, hidden_size, dtype=dtype, **kwargs)
    theirs = TORCH_CLASSES[cell](input_size, hidden_size, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    theirs.load_state_dict(ref.state_dict())
    return ours, theirs, ref


def states_of(hidden):
    return list(hidden) if isinstance(hidden, tuple) else [hidden]


def run(module, dtype, x, h0, grads, packed_lengths=None, batch_first=False, device="cpu"):
    """Forward and backward in dtype on device; returns [outputs..., grads of
    x, h0 (c0), parameters...], on the CPU."""
    module = module.to(device)
    x = x.to(device, dtype).detach().requires_grad_()
    states = [s.to(device, dtype).detach().requires_grad_() for s in h0]
    inp = x
    if packed_lengths is not None:
        inp = pack_padded_sequence(x, packed_lengths, batch_first=batch_first, enforce_sorted=False)
    hx = None if not states else (tuple(states) if len(states) == 2 else states[0])
    out, hidden = module(inp, hx)
    if packed_lengths is not None:
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0])
    outs = [out] + states_of(hidden)
    torch.autograd.backward(outs, [g.to(device, dtype) for g in grads[:len(outs)]])
    params = [p.grad for p in module.parameters()]
    values = [o.detach() for o in outs] + [x.grad] + [s.grad for s in states] + params
    return [None if v is None else v.cpu() for v in values]


def check_module(cell, dtype, T, B, I, H, num_layers=1, bidirectional=False, batch_first=False, bias=True,
                 proj_size=0, nonlinearity="tanh", lengths=None, unbatched=False, seed=0, device="cpu"):
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    if cell == "lstm":
        kwargs["proj_size"] = proj_size
    if cell == "rnn":
        kwargs["nonlinearity"] = nonlinearity
    ours, theirs, ref = make_modules(cell, dtype, I, H, seed, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    D = 2 if bidirectional else 1
    Hout = proj_size or H
    shape = (B, T, I) if batch_first else (T, B, I)
    if unbatched:
        shape = (T, I)
    x = rounded(torch.randn(*shape, generator=gen, dtype=torch.float64), dtype)
    state_batch = () if unbatched else (B,)
    h0 = [rounded(torch.randn(num_layers * D, *state_batch, Hout, generator=gen, dtype=torch.float64), dtype)]
    if cell == "lstm":
        h0.append(rounded(torch.randn(num_layers * D, *state_batch, H, generator=gen, dtype=torch.float64), dtype))
    out_shape = shape[:-1] + (D * Hout,)
    grads = [rounded(torch.randn(*out_shape, generator=gen, dtype=torch.float64), dtype)] + \
        [rounded(torch.randn_like(s), dtype) for s in h0]
    if lengths is not None:  # padded positions give no gradient (pad_packed_sequence fills zeros)
        t_index = torch.arange(T).unsqueeze(1 if not batch_first else 0)
        valid = (t_index < torch.tensor(lengths).unsqueeze(0 if not batch_first else 1)).unsqueeze(-1)
        grads[0] = grads[0] * valid
    names = ["output", "h_n"] + (["c_n"] if cell == "lstm" else []) + ["grad input", "grad h0"] + \
        (["grad c0"] if cell == "lstm" else []) + [f"grad {n}" for n, _ in ours.named_parameters()]
    expected = run(ref, torch.float64, x, h0, grads, lengths, batch_first)
    got = run(ours, dtype, x, h0, grads, lengths, batch_first, device)
    torch_got = run(theirs, dtype, x, h0, grads, lengths, batch_first, device)
    for name, g, t, e in zip(names, got, torch_got, expected):
        assert g is not None, name
        assert_close(name, g, t, e)


CELLS = [("rnn", "tanh"), ("rnn", "relu"), ("lstm", None), ("gru", None)]
CELL_IDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]


@pytest.mark.parametrize("cell,nonlinearity", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias",
                         [(1, False, False, True), (2, True, True, True), (3, False, False, False),
                          (2, True, False, False)])
def test_matches_torch(cell, nonlinearity, dtype, num_layers, bidirectional, batch_first, bias):
    if nonlinearity == "relu" and dtype == torch.bfloat16 and num_layers > 1:
        # Each layer's input is the last one's output rounded to bfloat16: a
        # relu pre-activation within that rounding of 0 lands on either side
        # by chance (in torch and in ours), and a flip moves whole gradients,
        # so no error bound holds. One layer (kept) has exact inputs.
        pytest.skip("relu behind a bfloat16-rounded layer: kinks flip by chance")
    check_module(cell, dtype, T=6, B=3, I=7, H=17, num_layers=num_layers, bidirectional=bidirectional,
                 batch_first=batch_first, bias=bias, nonlinearity=nonlinearity or "tanh")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_lstm_projection(dtype, num_layers, bidirectional):
    check_module("lstm", dtype, T=5, B=4, I=6, H=19, num_layers=num_layers, bidirectional=bidirectional,
                 proj_size=7)


@pytest.mark.parametrize("cell,nonlinearity", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_unsorted_lengths(cell, nonlinearity, bidirectional, batch_first):
    check_module(cell, torch.float32, T=7, B=5, I=4, H=9, num_layers=2, bidirectional=bidirectional,
                 batch_first=batch_first, nonlinearity=nonlinearity or "tanh", lengths=[3, 7, 1, 7, 5])


@pytest.mark.parametrize("cell,proj_size", [("lstm", 0), ("lstm", 5), ("gru", 0), ("rnn", 0)])
def test_packed_batch_wider_than_a_task(cell, proj_size):
    # 37 sequences: a step's rows span two of the CPU kernels' 32-row blocks, and in the reverse
    # direction the rows that start from h0 fall inside a block as well as at its edge.
    lengths = [9, 1, 4, 9, 2, 7, 5, 3, 8, 6] * 3 + [1, 9, 2, 8, 3, 7, 4]
    check_module(cell, torch.float32, T=9, B=37, I=6, H=70, num_layers=1, bidirectional=True,
                 proj_size=proj_size, lengths=lengths)


@pytest.mark.parametrize("cell,nonlinearity", CELLS, ids=CELL_IDS)
def test_unbatched_input(cell, nonlinearity):
    check_module(cell, torch.float32, T=5, B=1, I=3, H=8, num_layers=2, bidirectional=True,
                 nonlinearity=nonlinearity or "tanh", unbatched=True)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (1, 4, 17), (3, 1, 64), (2, 3, 256), (2, 2, 1000)])
def test_sizes(cell, T, B, H):
    check_module(cell, torch.float32, T=T, B=B, I=5, H=H, bidirectional=True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_long_sequence(cell):
    check_module(cell, torch.float32, T=1000, B=2, I=3, H=8)


def test_default_initial_state():
    ours, theirs, _ = make_modules("lstm", torch.float32, 4, 6, num_layers=2)
    x = torch.randn(5, 3, 4)
    for got, want in zip(ours(x)[1], theirs(x)[1]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_dropout_trains_randomly_and_evaluates_like_torch(cell):
    ours, theirs, _ = make_modules(cell, torch.float32, 4, 8, num_layers=3, dropout=0.5)
    x = torch.randn(6, 2, 4)
    torch.manual_seed(0)
    a = ours(x)[0]
    b = ours(x)[0]
    assert not torch.equal(a, b), "dropout between layers in training"
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x)[0], ours(x)[0], rtol=0, atol=0)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_empty_batch_gives_empty_outputs(cell):
    ours, theirs, _ = make_modules(cell, torch.float32, 4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(3, 0, 4)
    for got, want in zip([ours(x)[0]] + states_of(ours(x)[1]), [theirs(x)[0]] + states_of(theirs(x)[1])):
        assert got.shape == want.shape
    assert states_of(OUR_CELLS[cell](4, 6)(torch.randn(0, 4)))[0].shape == (0, 6)


def test_zero_length_sequence_raises():
    with pytest.raises(ValueError, match="no time steps"):
        bigkernels.nn.GRU(4, 6)(torch.randn(0, 2, 4))


# ---------------------------------------------------------------- cells

TORCH_CELLS = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}
OUR_CELLS = {"rnn": bigkernels.nn.RNNCell, "lstm": bigkernels.nn.LSTMCell, "gru": bigkernels.nn.GRUCell}


@pytest.mark.parametrize("cell,nonlinearity", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_cells_match_torch(cell, nonlinearity, dtype, batched, bias):
    torch.manual_seed(0)
    extra = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
    ref = TORCH_CELLS[cell](5, 11, bias=bias, dtype=torch.float64, **extra)
    ours = OUR_CELLS[cell](5, 11, bias=bias, dtype=dtype, **extra)
    theirs = TORCH_CELLS[cell](5, 11, bias=bias, dtype=dtype, **extra)
    ours.load_state_dict(ref.state_dict())
    theirs.load_state_dict(ref.state_dict())
    lead = (4,) if batched else ()
    x = torch.randn(*lead, 5, dtype=torch.float64)
    states = [torch.randn(*lead, 11, dtype=torch.float64) for _ in range(2 if cell == "lstm" else 1)]
    grads = [torch.randn(*lead, 11, dtype=torch.float64) for _ in states]

    def go(module, dt):
        xi = x.to(dt).requires_grad_()
        si = [s.to(dt).requires_grad_() for s in states]
        out = module(xi, tuple(si) if cell == "lstm" else si[0])
        outs = list(out) if cell == "lstm" else [out]
        torch.autograd.backward(outs, [g.to(dt) for g in grads])
        return [o.detach() for o in outs] + [xi.grad] + [s.grad for s in si] + [p.grad for p in module.parameters()]

    for i, (g, t, e) in enumerate(zip(go(ours, dtype), go(theirs, dtype), go(ref, torch.float64))):
        assert_close(f"value {i}", g, t, e)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_cell_without_state_starts_from_zeros(cell):
    torch.manual_seed(0)
    ours = OUR_CELLS[cell](3, 4)
    theirs = TORCH_CELLS[cell](3, 4)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3)
    for got, want in zip(states_of(ours(x)), states_of(theirs(x))):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- the op itself

def layer_inputs(mode, B=3, T=4, I=5, H=6, proj=0, bias=True, packed=False, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = {"lstm": 4, "gru": 3}.get(mode, 1)
    Hout = proj or H
    batch_sizes = torch.tensor([B, B, B - 1, 1][:T], dtype=torch.int64) if packed else None
    N = int(batch_sizes.sum()) if packed else T * B

    def r(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(H)).to(dtype)

    return dict(input=r(N, I) * math.sqrt(H), batch_sizes=batch_sizes, weight_ih=r(G * H, I),
                weight_hh=r(G * H, Hout), bias_ih=r(G * H) if bias else None, bias_hh=r(G * H) if bias else None,
                weight_hr=r(Hout, H) if proj else None, hx=r(B, Hout) * math.sqrt(H),
                cx=r(B, H) * math.sqrt(H) if mode == "lstm" else None)


LAYER_CASES = [("rnn_tanh", {}), ("rnn_relu", {}), ("lstm", {}), ("gru", {}), ("lstm", {"proj": 3}),
               ("gru", {"packed": True}), ("lstm", {"packed": True, "proj": 2}), ("rnn_tanh", {"bias": False})]


@pytest.mark.parametrize("mode,options", LAYER_CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_cpu_float64(mode, options, reverse):
    args = layer_inputs(mode, **options)
    names = [n for n, t in args.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    for n in names:
        args[n].requires_grad_()

    def fn(*tensors):
        a = dict(args, **dict(zip(names, tensors)))
        out, hy, cy = rnn_layer(a["input"], a["batch_sizes"], a["weight_ih"], a["weight_hh"], a["bias_ih"],
                                a["bias_hh"], a["weight_hr"], a["hx"], a["cx"], mode, reverse)
        return (out, hy) if cy is None else (out, hy, cy)

    assert torch.autograd.gradcheck(fn, [args[n] for n in names])
    assert torch.autograd.gradgradcheck(fn, [args[n] for n in names])


@pytest.mark.parametrize("mode,options", [("lstm", {"packed": True, "proj": 2}), ("gru", {}), ("rnn_relu", {})])
def test_create_graph_gradients_match_the_kernels(mode, options):
    # Under create_graph=True the backward runs on the reference's ops;
    # gradgradcheck differentiates whatever that backward returns, so it cannot
    # see its values being wrong: compare them with the kernels' backward.
    args = layer_inputs(mode, **options)
    tensors = [t.requires_grad_() for n, t in args.items() if n != "batch_sizes" and t is not None]
    outs = [t for t in rnn_layer(*args.values(), mode) if t is not None]
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in outs]
    plain = torch.autograd.grad(outs, tensors, grads, retain_graph=True)
    again = torch.autograd.grad(outs, tensors, grads, create_graph=True)
    assert all(a.requires_grad for a in again)  # the differentiable backward ran
    for p, a in zip(plain, again):
        torch.testing.assert_close(a, p)


@pytest.mark.parametrize("mode,options", LAYER_CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_matches_reference(mode, options, reverse):
    args = layer_inputs(mode, **options)
    want = reference.rnn_layer(*args.values(), mode, reverse)
    got = rnn_layer(*args.values(), mode, reverse)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode,options", [("lstm", {"proj": 3}), ("gru", {"packed": True}), ("rnn_tanh", {})])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_strided_weights_give_the_contiguous_results(mode, options, dtype):
    # The kernels pack the weights themselves, reading any strides and dtype:
    # column-major views (a transposed module weight) must give exactly what
    # contiguous ones give, forward and backward; the forward matches the reference.
    args = layer_inputs(mode, dtype=dtype, **options)
    gen = torch.Generator()  # the same output gradients for both runs

    def run(strided):
        weights = {n: t.detach().clone().requires_grad_() for n, t in args.items()
                   if n.startswith("weight") and t is not None}
        passed = {n: t.t().contiguous().t() if strided else t for n, t in weights.items()}
        assert passed["weight_hh"].is_contiguous() != strided
        outs = [t for t in rnn_layer(*dict(args, **passed).values(), mode) if t is not None]
        grads = [torch.randn(o.shape, generator=gen).to(dtype) for o in outs]
        return [o.detach() for o in outs] + list(torch.autograd.grad(outs, list(weights.values()), grads))

    gen.manual_seed(1)
    contiguous = run(False)
    gen.manual_seed(1)
    for s, c in zip(run(True), contiguous):
        torch.testing.assert_close(s, c, rtol=0, atol=0)
    exact = {n: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for n, t in args.items()}
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    for got, want in zip(contiguous, [t for t in reference.rnn_layer(*exact.values(), mode, False) if t is not None]):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_reference_matches_torch_nn():
    # the reference itself against torch's LSTM, for one layer and direction
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 6, dtype=torch.float64)
    x, h0, c0 = torch.randn(5, 2, 4, dtype=torch.float64), torch.randn(1, 2, 6, dtype=torch.float64), \
        torch.randn(1, 2, 6, dtype=torch.float64)
    out, (h, c) = lstm(x, (h0, c0))
    ref = reference.rnn_layer(x.reshape(10, 4), None, *[p for p in lstm.parameters()], None, h0[0], c0[0], "lstm",
                              False)
    torch.testing.assert_close(ref[0], out.reshape(10, 6))
    torch.testing.assert_close(ref[1], h[0])
    torch.testing.assert_close(ref[2], c[0])


@pytest.mark.parametrize("mode,options", LAYER_CASES[:6])
def test_opcheck(mode, options):
    args = layer_inputs(mode, dtype=torch.float32, **options)
    for n in ("input", "weight_ih", "hx"):
        args[n].requires_grad_()
    torch.library.opcheck(torch.ops.bigkernels.rnn_layer_forward, (*args.values(), mode, False, True))


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_compile_fullgraph(cell):
    torch._dynamo.reset()
    ours, _, _ = make_modules(cell, torch.float32, 4, 8, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 4, requires_grad=True)

    def loss(x):
        out, hidden = ours(x)
        return out.square().sum() + sum(h.sum() for h in states_of(hidden))

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_value = loss(x)
    (eager_grad,) = torch.autograd.grad(eager_value, x)
    value = compiled(x)
    (grad,) = torch.autograd.grad(value, x)
    torch.testing.assert_close(value, eager_value)
    torch.testing.assert_close(grad, eager_grad)


# ---------------------------------------------------------------- modules, state_dict, optimize

@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_state_dict_loads_both_ways(cell):
    ours, theirs, _ = make_modules(cell, torch.float32, 3, 5, num_layers=2, bidirectional=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    fresh = OUR_CLASSES[cell](3, 5, num_layers=2, bidirectional=True)
    fresh.load_state_dict(theirs.state_dict())
    back = TORCH_CLASSES[cell](3, 5, num_layers=2, bidirectional=True)
    back.load_state_dict(fresh.state_dict())
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(fresh(x)[0], back(x)[0])


def test_optimize_swaps_rnns_and_cells_keeping_parameters():
    model = nn.ModuleDict({"lstm": nn.LSTM(3, 4), "gru": nn.GRU(3, 4), "rnn": nn.RNN(3, 4, nonlinearity="relu"),
                           "cells": nn.ModuleList([nn.LSTMCell(3, 4), nn.GRUCell(3, 4), nn.RNNCell(3, 4)])})
    params = [id(p) for p in model.parameters()]
    x = torch.randn(5, 2, 3)
    before = model["lstm"](x)[0]
    bigkernels.optimize(model)
    assert type(model["lstm"]) is bigkernels.nn.LSTM and type(model["gru"]) is bigkernels.nn.GRU
    assert type(model["rnn"]) is bigkernels.nn.RNN and model["rnn"].nonlinearity == "relu"
    assert [type(c) for c in model["cells"]] == [bigkernels.nn.LSTMCell, bigkernels.nn.GRUCell,
                                                 bigkernels.nn.RNNCell]
    assert [id(p) for p in model.parameters()] == params
    torch.testing.assert_close(model["lstm"](x)[0], before)


# ---------------------------------------------------------------- bad input

def bad_calls():
    lstm = bigkernels.nn.LSTM(4, 6)
    gru = bigkernels.nn.GRU(4, 6, batch_first=True)
    cell = bigkernels.nn.LSTMCell(4, 6)
    x = torch.randn(5, 2, 4)
    return [
        ("input_size mismatch", lambda: lstm(torch.randn(5, 2, 3)), RuntimeError, "input.size\\(-1\\) must be equal"),
        ("4-d input", lambda: lstm(torch.randn(5, 2, 4, 1)), ValueError, "Expected input to be 2D or 3D"),
        ("int input", lambda: lstm(torch.ones(5, 2, 4, dtype=torch.int64)), ValueError, "input dtype \\(torch.int64\\)"),
        ("dtype mix", lambda: lstm(x.double()), ValueError, "input dtype \\(torch.float64\\)"),
        ("h0 shape", lambda: lstm(x, (torch.zeros(1, 3, 6), torch.zeros(1, 2, 6))), RuntimeError,
         "Expected hidden\\[0\\] size"),
        ("c0 shape", lambda: lstm(x, (torch.zeros(1, 2, 6), torch.zeros(1, 2, 5))), RuntimeError,
         "Expected hidden\\[1\\] size"),
        ("h0 dims", lambda: gru(x, torch.zeros(2, 6)), RuntimeError, "hx should be 3-D"),
        ("hx not a tuple", lambda: lstm(x, torch.zeros(1, 2, 6)), TypeError, "tuple"),
        ("device mix", lambda: lstm(x.to("meta")), ValueError, "is on cpu but input is on meta"),
        ("cell batch mismatch", lambda: cell(torch.randn(6, 4), (torch.zeros(3, 6), torch.zeros(3, 6))), ValueError,
         "hx\\[0\\] must have shape \\(6, 6\\)"),
        ("cell input size", lambda: cell(torch.randn(3, 5)), ValueError, "input_size=4"),
        ("cell 3-d", lambda: cell(torch.randn(3, 4, 1)), ValueError, "1D or 2D"),
    ]


@pytest.mark.parametrize("name,call,error,match", bad_calls(), ids=[c[0] for c in bad_calls()])
def test_bad_input_raises_naming_the_argument(name, call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("change,match", [
    (dict(batch_sizes=torch.tensor([3, 4, 2, 1])), "never grow"),
    (dict(batch_sizes=torch.tensor([3, 3, 2])), "sum to 8 but input has 9"),
    (dict(batch_sizes=torch.tensor([2, 2, 2, 2, 1])), "batch_sizes\\[0\\] = 2 but hx has batch 3"),
    (dict(batch_sizes=torch.tensor([3.0, 3.0, 2.0, 1.0])), "int64 CPU tensor"),
    (dict(hx=torch.zeros(3, 5, dtype=torch.float64)), "hx must have shape \\[3, 6\\]"),
    (dict(cx=None), "lstm needs cx"),
    (dict(bias_hh=None), "both be given"),
    (dict(weight_hr=torch.zeros(7, 6, dtype=torch.float64)), "proj_size < hidden_size"),
    (dict(input=torch.zeros(10, 5, dtype=torch.float64), batch_sizes=None), "not a positive multiple"),
])
def test_op_checks_its_arguments(change, match):
    args = dict(layer_inputs("lstm", packed=True), **change)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.bigkernels.rnn_layer_forward(*args.values(), "lstm", False, False)


def test_op_refuses_an_unknown_mode():
    args = layer_inputs("gru")
    with pytest.raises(ValueError, match="unknown mode 'GRU'"):
        torch.ops.bigkernels.rnn_layer_forward(*args.values(), "GRU", False, False)


# ---------------------------------------------------------------- the model

def test_rnn_model_learns_a_delay_task():
    torch.manual_seed(0)
    model = bigkernels.models.RNNModel(1, 16, 1, cell="lstm")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(16, 20, 1)
    y = torch.roll(x, 2, dims=1)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x)[0][:, 2:], y[:, 2:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_rnn_model_with_lengths_ignores_the_padding():
    torch.manual_seed(0)
    model = bigkernels.models.RNNModel(3, 8, 2, num_layers=2, cell="gru", bidirectional=True)
    x = torch.randn(3, 6, 3)
    lengths = [4, 6, 1]
    y, h_n = model(x, lengths=lengths)
    assert (y[0, 4:] == 0).all() and (y[2, 1:] == 0).all()
    for b, n in enumerate(lengths):  # each sequence alone, unpadded, gives the same outputs and state
        y_b, h_b = model(x[b:b + 1, :n])
        torch.testing.assert_close(y[b:b + 1, :n], y_b)
        torch.testing.assert_close(h_n[:, b:b + 1], h_b)
    x[0, 4:] = 1e6  # what lies under sequence 0's padding changes nothing
    torch.testing.assert_close(model(x, lengths=lengths)[0][0], y[0])
    with pytest.raises(ValueError, match="one length per sequence"):
        model(x, lengths=[4, 6])
    with pytest.raises(ValueError, match=r"lie in \[1, 6\]"):
        model(x, lengths=[4, 7, 1])


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_rnn_model_with_embedding_and_state(cell):
    model = bigkernels.models.RNNModel(8, 12, 5, num_layers=2, cell=cell, vocab_size=20, bidirectional=True,
                                       output_activation="tanh")
    tokens = torch.randint(20, (3, 7))
    y, state = model(tokens)
    assert y.shape == (3, 7, 5) and (y.abs() <= 1).all()
    y2, _ = model(tokens, state)
    assert y2.shape == y.shape
    with pytest.raises(ValueError, match="cell must be one of"):
        bigkernels.models.RNNModel(8, 12, 5, cell="LSTM")
