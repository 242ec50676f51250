"""bigkernels.dense against a float64 PyTorch reference: forward and every
gradient, every activation, on CPU and (when present) CUDA."""

import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch

import bigkernels
from bigkernels import reference
from bigkernels.ops.dense import cpu_dense_beats_linear, runs_cpu_decode_product
from bigkernels.reference import ACTIVATIONS, DERIVATIVE_FROM_OUTPUT, GATED
from conftest import FLOOR, assert_close, device_params

ALL_DTYPES = device_params(
    cpu_dtypes=[torch.float32, torch.bfloat16, torch.float16, torch.float64],
    cuda_dtypes=[torch.float16, torch.bfloat16, torch.float32],
)
# (leading dims, in_features, out_features): odd sizes, 1, and 1000+ rows
SHAPES = [((1,), 1, 1), ((7,), 33, 127), ((33,), 127, 7), ((1031,), 65, 96), ((2, 3, 5), 17, 9)]


def transposed_copy(t):
    """The same values in a non-contiguous layout."""
    return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() >= 2 else t[::1]


def run_dense(fn, tensors, grad, device, dtype, noncontiguous=False):
    """Calls fn(*tensors) on copies of the float64 tensors in dtype, runs
    backward with grad, and returns the output and the tensors' gradients."""
    leaves = []
    for t in tensors:
        if t is None:
            leaves.append(None)
            continue
        t = t.to(device, dtype)
        if noncontiguous:
            t = transposed_copy(t)
        leaves.append(t.detach().requires_grad_())
    out = fn(*leaves)
    out.backward(grad.to(device, dtype))
    return [out.detach()] + [None if t is None else t.grad for t in leaves]


def check_against_reference(device, dtype, activation, lead, K, N, bias=True, noncontiguous=False,
                            recompute=False, seed=0, up_weight=False):
    """up_weight (gated): the weight's second half passed as its own tensor."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * N if activation in GATED else N
    x = torch.randn(*lead, K, generator=gen, dtype=torch.float64)
    w = torch.randn(rows, K, generator=gen, dtype=torch.float64) / math.sqrt(max(K, 1))
    b = torch.randn(rows, generator=gen, dtype=torch.float64) if bias else None
    grad = torch.randn(*lead, N, generator=gen, dtype=torch.float64)
    weights = w.chunk(2) if up_weight else (w,)

    def ours(x, b, *weights):
        up = weights[1] if up_weight else None
        return bigkernels.dense(x, weights[0], b, activation, recompute=recompute, up_weight=up)

    def torch_ref(x, b, *weights):
        return reference.dense(x, torch.cat(weights), b, activation)

    tensors = (x, b) + weights
    got = run_dense(ours, tensors, grad, device, dtype, noncontiguous)
    same_dtype = run_dense(torch_ref, tensors, grad, device, dtype)
    exact = run_dense(torch_ref, tensors, grad, "cpu", torch.float64)
    names = ("output", "grad_input", "grad_bias", "grad_weight", "grad_up_weight")
    for name, a, t, r in zip(names, got, same_dtype, exact):
        if r is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        assert a.device.type == device
        assert_close(name, a.cpu(), t.cpu(), r)


@pytest.mark.parametrize("device,dtype", ALL_DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead,K,N", SHAPES, ids=lambda v: str(v).replace(" ", ""))
def test_matches_reference(device, dtype, activation, bias, lead, K, N):
    check_against_reference(device, dtype, activation, lead, K, N, bias=bias)


@pytest.mark.parametrize("device,dtype", ALL_DTYPES)
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_noncontiguous_inputs(device, dtype, activation):
    check_against_reference(device, dtype, activation, (37,), 29, 23, noncontiguous=True)


@pytest.mark.parametrize("device,dtype", ALL_DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "geglu"])
def test_recompute_matches_reference(device, dtype, activation):
    check_against_reference(device, dtype, activation, (45,), 31, 19, recompute=True)


@pytest.mark.parametrize("device,dtype", ALL_DTYPES)
@pytest.mark.parametrize("activation", sorted(GATED))
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("bias,lead,K,N,noncontiguous", [
    (True, (1,), 1, 1, False), (False, (3, 1), 24, 8, False), (True, (2, 65), 33, 47, True),
    (False, (130,), 64, 70, True),
], ids=["1x1x1", "decode", "odd-transposed", "rows-transposed"])
def test_up_weight_matches_reference(device, dtype, activation, recompute, bias, lead, K, N, noncontiguous):
    check_against_reference(device, dtype, activation, lead, K, N, bias=bias, noncontiguous=noncontiguous,
                            recompute=recompute, up_weight=True)


@pytest.mark.parametrize("device,dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("activation,up_weight", [("none", False), ("gelu", False), ("swiglu", True),
                                                  ("geglu", False)])
def test_decode_sized_inputs(device, dtype, rows, activation, up_weight):
    # decoding-sized inputs: K and N odd, past one vector and not a multiple of one, with and
    # without a bias
    check_against_reference(device, dtype, activation, (rows,), 333, 45, bias=rows % 2 == 1, up_weight=up_weight)
    check_against_reference(device, dtype, activation, (1, rows), 7, 3, bias=rows % 2 == 0, up_weight=up_weight,
                            noncontiguous=True)


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 2), (torch.float32, 5), (torch.float32, 8),
                                        (torch.bfloat16, 1), (torch.bfloat16, 4), (torch.float16, 3)], ids=str)
@pytest.mark.parametrize("activation", ["none", "swiglu"])
def test_decode_product_matches_reference(dtype, rows, activation):
    # The CPU's product for a few rows (decoding), not BLAS's: weights whose rows lie further apart
    # than K (column slices), enough rows to fill several tiles and be split over threads, K past a
    # whole number of vector chunks.
    gen = torch.Generator().manual_seed(rows)
    K, N = 100, 1000
    x = torch.randn(rows, K, generator=gen, dtype=torch.float64)
    wide = torch.randn(2 * N, K + 11, generator=gen, dtype=torch.float64) / 10
    b = torch.randn(2 * N if activation == "swiglu" else N, generator=gen, dtype=torch.float64)

    def run(dtype):
        w = wide.to(dtype)[:, 3:3 + K]
        weight, up_weight = (w[:N], w[N:]) if activation == "swiglu" else (w[:N], None)
        return weight, bigkernels.dense(x.to(dtype), weight, b.to(dtype), activation, up_weight=up_weight)

    weight, got = run(dtype)
    assert runs_cpu_decode_product(x.to(dtype), weight)
    ref_w = wide[:, 3:3 + K] if activation == "swiglu" else wide[:N, 3:3 + K]
    same_dtype = reference.dense(x.to(dtype), ref_w.to(dtype), b.to(dtype), activation)
    assert_close("output", got, same_dtype, reference.dense(x, ref_w, b, activation))


def onednn_builds_product(dtype):
    """oneDNN has no bf16 product below AVX-512 (ONEDNN_MAX_CPU_ISA=AVX2 included)."""
    try:
        one = torch.ones(1, 1, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(one, one, None, "none", [], "")
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # torch.backends.mkldnn.flags() says it of Intel GPUs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["none", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("K", [70, 1536])
@pytest.mark.parametrize("mkldnn", [True, False], ids=["onednn", "blas"])
def test_many_rows_on_onednn_and_on_blas(dtype, activation, K, mkldnn):
    # 32+ rows with a contiguous weight run on oneDNN's product (the bias in its epilogue); with
    # oneDNN switched off (or where it has no product for the dtype), on BLAS. Both against
    # float64, forward and every gradient, 3-d input.
    # At K 768-3072 oneDNN's float32 sums err up to ~3x MKL's (docs/PERFORMANCE.md), still
    # within the floor of the 2x rule: K 1536 checks that.
    x = torch.randn(3, 29, K, dtype=dtype)
    weight = torch.randn(45, K, dtype=dtype)
    assert cpu_dense_beats_linear(x, weight)
    with torch.backends.mkldnn.flags(enabled=mkldnn):
        with torch.profiler.profile() as prof:
            check_against_reference("cpu", dtype, activation, (3, 29), K, 45, seed=5)
        ran_onednn = any(e.key == "mkldnn::_linear_pointwise" for e in prof.key_averages())
        assert ran_onednn == (mkldnn and onednn_builds_product(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("rows", [1, 5, 40, 300])
@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
def test_strided_bias_and_offset_weight(dtype, rows, activation):
    # A bias with a stride (b[::4]) and a weight that is a slice of rows (contiguous, at an
    # offset), on every product (decoding rows, oneDNN's, BLAS's); no_grad and with gradients.
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=gen, dtype=torch.float64)
    big_w = torch.randn(100, 64, generator=gen, dtype=torch.float64) / 8
    big_b = torch.randn(200, generator=gen, dtype=torch.float64)
    w, b = big_w[10:60], big_b[::4][:50]
    for grad in (False, True):
        xd, wd, bd = x.to(dtype).requires_grad_(grad), big_w.to(dtype)[10:60], big_b.to(dtype)[::4][:50]
        assert wd.is_contiguous() and not bd.is_contiguous()
        with torch.set_grad_enabled(grad):
            got = bigkernels.dense(xd, wd, bd, activation)
        assert_close("output", got.detach(), reference.dense(x.to(dtype), w.to(dtype), b.to(dtype), activation),
                     reference.dense(x, w, b, activation))


@pytest.mark.skipif(not onednn_builds_product(torch.bfloat16), reason="oneDNN has no bf16 product here")
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"])
def test_bf16_inference_on_onednn(activation):
    # bf16 without a pre-activation to keep (no_grad): oneDNN's product, our activation in place.
    # Against float64 with the 2x rule; K 1536 and a bias of scale 3, so that every activation's
    # curved part is reached.
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 29, 1536, generator=gen, dtype=torch.float64)
    w = torch.randn(45, 1536, generator=gen, dtype=torch.float64) / 1536 ** 0.5
    b = 3 * torch.randn(45, generator=gen, dtype=torch.float64)
    bf = [t.to(torch.bfloat16) for t in (x, w, b)]
    with torch.no_grad():
        got = bigkernels.dense(*bf, activation)
        same_dtype = reference.dense(*bf, activation)
    assert_close("output", got, same_dtype, reference.dense(x, w, b, activation))


@pytest.mark.parametrize("device,dtype", ALL_DTYPES)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=str)
def test_zero_size_batch(device, dtype, lead):
    w = torch.randn(6, 5, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(6, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(*lead, 5, device=device, dtype=dtype, requires_grad=True)
    out = bigkernels.dense(x, w, b, "swiglu")
    assert out.shape == (*lead, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("device,dtype", ALL_DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "sigmoid"])
def test_zero_in_features(device, dtype, activation):
    # act(bias) on every row; only the bias gets a nonzero gradient
    check_against_reference(device, dtype, activation, (4,), 0, 6)


@pytest.mark.parametrize("device,dtype", ALL_DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_and_extreme_values_match_torch(device, dtype, activation):
    # in_features = 0 makes the pre-activation exactly the bias: NaN must stay
    # NaN, and large finite values must saturate as torch's do
    values = [float("nan"), 0.0, -0.0, 1e-30, 1.5, -1.5, 30.0, -30.0, 100.0, -100.0]
    b = torch.tensor(values * 2, dtype=dtype, device=device)
    x = torch.empty(3, 0, dtype=dtype, device=device)
    w = torch.empty(len(b), 0, dtype=dtype, device=device)
    # and 40 rows of x = 1 against a weight column of the values: the products of many rows
    # (oneDNN's on the CPU), with and without gradients to compute
    x40, w40 = torch.ones(40, 1, dtype=dtype, device=device), b[:, None].clone()
    for args, grad in (((x, w, b), False), ((x40, w40, torch.zeros_like(b)), False),
                       ((x40, w40, torch.zeros_like(b)), True)):
        with torch.set_grad_enabled(grad):
            out = bigkernels.dense(args[0].requires_grad_(grad), *args[1:], activation).detach()
        expected = reference.dense(args[0].detach(), *args[1:], activation)
        assert torch.equal(out.isnan(), expected.isnan())
        # half precision: torch rounds act(z1) before the gate product, we round once
        rtol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
        torch.testing.assert_close(out, expected, equal_nan=True, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("device,dtype", ALL_DTYPES)
def test_one_dimensional_input(device, dtype):
    check_against_reference(device, dtype, "silu", (), 13, 11)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_gradcheck_cpu_float64(activation, bias, recompute):
    gen = torch.Generator().manual_seed(1)
    rows = 8 if activation in GATED else 4
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(rows, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(rows, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)

    def fn(x, w, b=None):
        return bigkernels.dense(x, w, b, activation, recompute=recompute)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("activation", sorted(GATED))
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_gradcheck_up_weight_cpu_float64(activation, recompute):
    gen = torch.Generator().manual_seed(8)
    x, w, up, b = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
                   for shape in ((2, 3, 5), (4, 5), (4, 5), (8,)))

    def fn(x, w, up, b):
        return bigkernels.dense(x, w, b, activation, recompute=recompute, up_weight=up)

    assert torch.autograd.gradcheck(fn, (x, w, up, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, up, b))
    # one weight alone wanting a gradient gets it (the other's half is dropped)
    (gw,) = torch.autograd.grad(fn(x, w, up.detach(), b).sum(), (w,))
    (ref,) = torch.autograd.grad(reference.dense(x, torch.cat([w, up.detach()]), b, activation).sum(), (w,))
    torch.testing.assert_close(gw, ref)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "swiglu"])
def test_double_backward_cpu_float64(activation):
    gen = torch.Generator().manual_seed(6)
    rows = 6 if activation in GATED else 3
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(rows, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(rows, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda *t: bigkernels.dense(*t, activation=activation), (x, w, b))


@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "tanh", "swiglu"])
def test_create_graph_gradients_match_the_kernels(activation):
    # Under create_graph=True the backward runs on the reference's ops;
    # gradgradcheck differentiates whatever that backward returns, so it cannot
    # see its values being wrong: compare them with the kernels' backward.
    gen = torch.Generator().manual_seed(7)
    rows = 6 if activation in GATED else 3
    x, w, b = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
               for shape in ((4, 5), (rows, 5), (rows,)))
    out = bigkernels.dense(x, w, b, activation)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    plain = torch.autograd.grad(out, (x, w, b), grad, retain_graph=True)
    again = torch.autograd.grad(out, (x, w, b), grad, create_graph=True)
    assert again[0].requires_grad and again[1].requires_grad  # the differentiable backward ran
    for name, p, a in zip(("input", "weight", "bias"), plain, again):
        torch.testing.assert_close(a, p, msg=lambda m: f"grad of {name}: {m}")


def sample_forward_args(activation, save_preactivation, requires_grad, device="cpu"):
    gen = torch.Generator().manual_seed(2)
    rows = 10 if activation in GATED else 5
    x = torch.randn(3, 4, 7, generator=gen).to(device).requires_grad_(requires_grad)
    w = torch.randn(rows, 7, generator=gen).to(device).requires_grad_(requires_grad)
    b = torch.randn(rows, generator=gen).to(device).requires_grad_(requires_grad)
    return (x, w, b, activation, save_preactivation)


OPCHECK_DEVICES = [
    pytest.param(p.values[0], id=p.values[0], marks=p.marks)
    for p in device_params([torch.float32], [torch.float32])
]


@pytest.mark.parametrize("device", OPCHECK_DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("save_preactivation", [False, True])
def test_opcheck_dense_forward(device, activation, save_preactivation):
    args = sample_forward_args(activation, save_preactivation, requires_grad=True, device=device)
    torch.library.opcheck(torch.ops.bigkernels.dense_forward.default, args)


@pytest.mark.parametrize("device", OPCHECK_DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_dense_backward(device, activation):
    x, w, b, _, _ = sample_forward_args(activation, True, requires_grad=False, device=device)
    out, preact = torch.ops.bigkernels.dense_forward(x, w, b, activation, True)
    from_output = activation in DERIVATIVE_FROM_OUTPUT
    saved = out if from_output else preact
    grad = torch.randn_like(out)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        args = (grad, x, w, b, saved, activation, from_output, mask)
        torch.library.opcheck(torch.ops.bigkernels.dense_backward.default, args)


@pytest.mark.parametrize("device", OPCHECK_DEVICES)
@pytest.mark.parametrize("save_preactivation", [False, True])
def test_opcheck_up_weight(device, save_preactivation):
    x, w, b, _, _ = sample_forward_args("swiglu", save_preactivation, requires_grad=True, device=device)
    gate, up = (t.detach().clone().requires_grad_() for t in w.chunk(2))
    torch.library.opcheck(torch.ops.bigkernels.dense_forward.default, (x, gate, b, "swiglu", save_preactivation, up))
    x, gate, up, b = (t.detach() for t in (x, gate, up, b))
    out, preact = torch.ops.bigkernels.dense_forward(x, gate, b, "swiglu", True, up)
    grad = torch.randn_like(out)
    for saved in (preact, preact.new_empty(0)):  # kept, and recomputed
        for mask in ([True, True, True], [False, True, False]):
            args = (grad, x, gate, b, saved, "swiglu", False, mask, up)
            torch.library.opcheck(torch.ops.bigkernels.dense_backward.default, args)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_compile_fullgraph_no_graph_breaks(activation):
    torch._dynamo.reset()  # one code object per activation: don't hit the recompile limit
    x, w, b, _, _ = sample_forward_args(activation, False, requires_grad=True)

    def loss(x, w, b):
        return bigkernels.dense(x, w, b, activation).square().sum()

    def value_and_grads(fn):
        for t in (x, w, b):
            t.grad = None
        value = fn(x, w, b)
        value.backward()  # through the compiled backward graph when fn is compiled
        return [value.detach()] + [t.grad for t in (x, w, b)]

    expected = value_and_grads(loss)
    got = value_and_grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("device", OPCHECK_DEVICES)
def test_compile_inductor(device):
    torch._dynamo.reset()
    layer = bigkernels.nn.Linear(16, 8, activation="gelu", device=device)
    x = torch.randn(4, 16, device=device)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


def test_compile_under_autocast():
    torch._dynamo.reset()
    layer = bigkernels.nn.Linear(16, 8, activation="silu")
    x = torch.randn(4, 16)

    def run(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    out = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, run(x))


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.ones(2, 3, dtype=torch.int32), torch.ones(4, 3, dtype=torch.int32)), {}, TypeError, "input"),
        ((torch.ones(2, 3), torch.ones(4, 3, dtype=torch.float64)), {}, TypeError, "weight dtype"),
        ((torch.ones(2, 3), torch.ones(4, 3), torch.ones(4, dtype=torch.float64)), {}, TypeError, "bias dtype"),
        ((torch.ones(2, 3), torch.ones(4, 3, device="meta")), {}, ValueError, "weight is on meta"),
        ((torch.ones(2, 3), torch.ones(4, 5)), {}, ValueError, "input's last dimension"),
        ((torch.ones(2, 3), torch.ones(3)), {}, ValueError, "weight must be 2-d"),
        ((torch.ones(2, 3), torch.ones(4, 3), torch.ones(5)), {}, ValueError, "bias must have shape"),
        ((torch.ones(2, 3), torch.ones(4, 3), torch.ones(4, 1)), {}, ValueError, "bias must have shape"),
        ((torch.ones(2, 3), torch.ones(4, 3)), {"activation": "gleu"}, ValueError, "unknown activation 'gleu'"),
        ((torch.ones(2, 3), torch.ones(5, 3)), {"activation": "swiglu"}, ValueError, "even number of weight rows"),
        ((torch.tensor(1.0), torch.ones(4, 1)), {}, ValueError, "at least 1 dimension"),
        (("x", torch.ones(4, 3)), {}, TypeError, "input must be a torch.Tensor"),
        ((torch.ones(2, 3), torch.ones(4, 3)), {"activation": 3}, TypeError, "activation must be a string"),
        ((torch.ones(2, 3), torch.ones(4, 3)), {"activation": "Gelu"}, ValueError, "did you mean 'gelu'"),
        ((torch.ones(2, 3), torch.ones(4, 3)), {"recompute": "yes"}, TypeError, "recompute must be a bool"),
        ((torch.ones(2, 3, device="meta"), torch.ones(4, 3)), {}, ValueError, "weight is on cpu but input is on meta"),
        ((torch.ones(2, 3), torch.ones(4, 3)), {"activation": "gelu", "up_weight": torch.ones(4, 3)}, ValueError,
         "up_weight is only for the gated"),
        ((torch.ones(2, 3), torch.ones(4, 3)), {"activation": "swiglu", "up_weight": torch.ones(5, 3)}, ValueError,
         "up_weight must have weight's shape"),
        ((torch.ones(2, 3), torch.ones(4, 3)), {"activation": "swiglu", "up_weight": torch.ones(4, 3).double()},
         TypeError, "up_weight dtype"),
        ((torch.ones(2, 3), torch.ones(4, 3)), {"activation": "swiglu", "up_weight": torch.ones(4, 3, device="meta")},
         ValueError, "up_weight is on meta"),
        ((torch.ones(2, 3), torch.ones(4, 3), torch.ones(4)), {"activation": "swiglu", "up_weight": torch.ones(4, 3)},
         ValueError, r"bias must have shape .8"),
        ((torch.ones(2, 3), torch.ones(4, 3)), {"activation": "swiglu", "up_weight": "up"}, TypeError,
         "up_weight must be a torch.Tensor or None"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input_raises_naming_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        bigkernels.dense(*args, **kwargs)


@pytest.mark.parametrize("activation", ["gleu", "swiglu"])
def test_op_called_directly_checks_too(activation):
    # the C++ op guards itself: a clear error, never a crash or wrong memory access
    with pytest.raises((ValueError, RuntimeError), match="activation|even number"):
        torch.ops.bigkernels.dense_forward(torch.ones(2, 3), torch.ones(5, 3), None, activation, False)


def test_autocast_cpu_bfloat16():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 24, generator=gen)
    w = torch.randn(16, 24, generator=gen) / 5
    b = torch.randn(16, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bigkernels.dense(x, w, b, "gelu")
        expected = reference.dense(x, w, b, "gelu")
    assert out.dtype == torch.bfloat16 == expected.dtype
    assert_close("output", out, expected, reference.dense(x.double(), w.double(), b.double(), "gelu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed input dtypes are cast, as for F.linear
        mixed = bigkernels.dense(x.bfloat16(), w, b, "gelu")
    assert mixed.dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_autocast_cuda():
    x = torch.randn(33, 64, device="cuda")
    w = torch.randn(48, 64, device="cuda") / 8
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            out = bigkernels.dense(x, w, None, "silu")
            expected = reference.dense(x, w, None, "silu")
        assert out.dtype == dtype
        assert_close("output", out.cpu(), expected.cpu(), reference.dense(x.double(), w.double(), None, "silu").cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_cuda_float32_with_tf32(activation, monkeypatch):
    # TF32 follows torch.backends.cuda.matmul.allow_tf32; compare with cuBLAS in TF32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    gen = torch.Generator().manual_seed(4)
    rows = 2 * 160 if activation in GATED else 160
    x = torch.randn(300, 257, generator=gen)
    w = torch.randn(rows, 257, generator=gen) / 16
    out = bigkernels.dense(x.cuda(), w.cuda(), None, activation)
    theirs = reference.dense(x.cuda(), w.cuda(), None, activation)
    assert_close("output", out.cpu(), theirs.cpu(), reference.dense(x.double(), w.double(), None, activation))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_cuda_large_tiles(dtype, activation):
    # several 128x128 tiles in both directions, K not a multiple of the k-step
    check_against_reference("cuda", dtype, activation, (515,), 1000, 390)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("K", [128, 131], ids=["K128", "K131"])
def test_cuda_misaligned_rows_take_the_scalar_path(K):
    # rows start 2 bytes past a 16-byte boundary: with K % 8 == 0 only the
    # misaligned start can turn the 16-byte copies off; K = 131 also misaligns rows
    base = torch.randn(1 + 70 * K, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(70, K)
    w = torch.randn(50, K, device="cuda", dtype=torch.bfloat16)
    out = bigkernels.dense(x, w, None, "relu")
    ref = reference.dense(x.double().cpu(), w.double().cpu(), None, "relu")
    assert_close("output", out.cpu(), reference.dense(x, w, None, "relu").cpu(), ref)


def test_floor_table_covers_every_dtype():
    assert set(FLOOR) >= {torch.float16, torch.bfloat16, torch.float32, torch.float64}


# ---------------------------------------------------------------- one list per concept

def test_activation_list_matches_the_cpp_one():
    with pytest.raises((ValueError, RuntimeError)) as info:
        torch.ops.bigkernels.dense_forward(torch.ones(2, 3), torch.ones(4, 3), None, "bogus", False)
    cpp_names = re.search(r"expected one of:([\w ]+)", str(info.value)).group(1).split()
    assert tuple(cpp_names) == ACTIVATIONS


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_derivative_from_output_list_matches_the_cpp_one(activation):
    x, w, b, _, _ = sample_forward_args(activation, True, requires_grad=False)
    out, _ = torch.ops.bigkernels.dense_forward(x, w, b, activation, True)
    args = (torch.ones_like(out), x, w, b, out, activation, True, [True, True, True])
    if activation in DERIVATIVE_FROM_OUTPUT or activation == "none":
        torch.ops.bigkernels.dense_backward(*args)
    else:
        with pytest.raises((ValueError, RuntimeError), match="needs the pre-activation"):
            torch.ops.bigkernels.dense_backward(*args)


# ---------------------------------------------------------------- edges

@pytest.mark.parametrize("device,dtype", ALL_DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_zero_width_layer(device, dtype, activation):
    # a weight with no rows: the output and the saved tensor are empty, which
    # must not be taken for "recompute"
    x = torch.randn(4, 3, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(0, 3, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(0, device=device, dtype=dtype, requires_grad=True)
    out = bigkernels.dense(x, w, b, activation)
    assert out.shape == (4, 0)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and w.grad.shape == (0, 3) and b.grad.shape == (0,)


# True limits at +-inf (torch's formulas give NaN for some: -inf * 0).
LIMITS = {  # activation: (act(-inf), act(+inf), act'(-inf), act'(+inf))
    "none": (-math.inf, math.inf, 1.0, 1.0),
    "relu": (0.0, math.inf, 0.0, 1.0),
    "gelu": (0.0, math.inf, 0.0, 1.0),
    "gelu_tanh": (0.0, math.inf, 0.0, 1.0),
    "silu": (0.0, math.inf, 0.0, 1.0),
    "sigmoid": (0.0, 1.0, 0.0, 0.0),
    "tanh": (-1.0, 1.0, 0.0, 0.0),
}


def expected_at(activation, z):
    """act(z) and act'(z) in float64: the limits at +-inf, else the reference."""
    z = z.double()
    t = z.clone().requires_grad_()
    value = reference.activation(t, activation)
    (grad,) = torch.autograd.grad(value.sum(), t)
    value, grad = value.detach(), grad.clone()
    lo, hi, dlo, dhi = LIMITS[activation]
    for where, v, d in ((z == -math.inf, lo, dlo), (z == math.inf, hi, dhi)):
        value[where], grad[where] = v, d
    return value, grad


@pytest.mark.parametrize("device,dtype", ALL_DTYPES)
@pytest.mark.parametrize("activation", list(LIMITS))
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_extreme_values(device, dtype, activation, recompute):
    # in_features = 0 makes the pre-activation exactly the bias, and the bias
    # gradient exactly act'(bias) for an upstream gradient of ones
    tiny = torch.finfo(dtype).tiny
    values = [-math.inf, -1e30, -100.0, -88.8, -tiny / 4, -0.0, 0.0, tiny / 4, 1.0, 88.8, 100.0, 1e30,
              math.inf, math.nan]
    b = torch.tensor(values, dtype=dtype, device=device)  # 1e30 is inf in float16, denormals too small flush
    want, want_grad = expected_at(activation, b.cpu())
    b.requires_grad_()
    x = torch.empty(1, 0, dtype=dtype, device=device)
    w = torch.zeros(len(values), 0, dtype=dtype, device=device, requires_grad=True)
    out = bigkernels.dense(x, w, b, activation, recompute=recompute)
    out.sum().backward()
    for name, got, expected in (("output", out[0], want.to(dtype)), ("gradient", b.grad, want_grad.to(dtype))):
        got = got.cpu()
        assert torch.equal(got.isnan(), expected.isnan()), f"{name}: NaN at {got.isnan() ^ expected.isnan()}"
        assert torch.equal(got.isinf(), expected.isinf()), f"{name}: {got} where {expected} was due"
        rtol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
        torch.testing.assert_close(got, expected, equal_nan=True, rtol=rtol, atol=1e-30, msg=name)


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_gated_extreme_values(activation):
    # act(z1) * z2 with z1 = -inf is 0 for any finite gate
    b = torch.tensor([-math.inf, math.inf, 2.0, 3.0], requires_grad=True)
    out = bigkernels.dense(torch.empty(1, 0), torch.zeros(4, 0), b, activation)
    assert out.tolist() == [[0.0, math.inf]]


def test_bias_gradient_is_accurate_at_many_rows():
    # the bias gradient sums 100k rows: blocked, not naively (issue 5)
    check_against_reference("cpu", torch.float32, "tanh", (100_000,), 0, 8, seed=5)
    check_against_reference("cpu", torch.float32, "gelu", (64_007,), 3, 5, seed=6)


# Sums over many rows (issue 16 §4): the weight and bias gradients add up
# 12k rows of act'(z) * grad, so an error in act' that leans one way, or a
# summation that rounds worse than torch's, grows there while each row looks
# fine. FLOOR's 1e-5 of the scale would hide it (torch's own error is ~1e-7 of
# the scale), so the floor is one float ulp of the scale; 128 columns, so that
# the largest error reflects how the errors spread, not one lucky column of torch's.
SUM_FLOOR = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("upstream", ["randn", "ones"])
def test_gradient_sums_over_many_rows(activation, recompute, upstream):
    gen = torch.Generator().manual_seed(11)
    M, K, N = 12_000, 16, 128
    rows = 2 * N if activation in GATED else N
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    w = torch.randn(rows, K, generator=gen, dtype=torch.float64) / math.sqrt(K)
    b = torch.randn(rows, generator=gen, dtype=torch.float64)
    # "ones" is out.sum().backward(): every row's act' adds up with the same sign
    grad = torch.randn(M, N, generator=gen, dtype=torch.float64) if upstream == "randn" else torch.ones(M, N)

    def ours(x, w, b):
        return bigkernels.dense(x, w, b, activation, recompute=recompute)

    def torch_ref(x, w, b):
        return reference.dense(x, w, b, activation)

    got = run_dense(ours, (x, w, b), grad, "cpu", torch.float32)
    same_dtype = run_dense(torch_ref, (x, w, b), grad, "cpu", torch.float32)
    exact = run_dense(torch_ref, (x, w, b), grad, "cpu", torch.float64)
    for i, name in ((2, "grad_weight"), (3, "grad_bias")):
        assert_close(name, got[i], same_dtype[i], exact[i], floor=SUM_FLOOR)


def test_random_shapes_fuzz():
    # random sizes, leading dims up to ~120k rows, every activation and dtype
    rng = random.Random(2026)
    for case in range(24):
        M = int(10 ** rng.uniform(0, 5.08))
        K, N = rng.randint(0, 40), rng.randint(1, 40)
        lead = (M,) if rng.random() < 0.7 else (max(1, M // 7), 7)
        check_against_reference("cpu", rng.choice([torch.float32, torch.bfloat16, torch.float64]),
                                rng.choice(ACTIVATIONS), lead, K, N, bias=rng.random() < 0.8,
                                recompute=rng.random() < 0.3, seed=case)


def test_bias_gradient_does_not_depend_on_the_thread_count():
    # our reduction alone (the GEMMs are BLAS's, whose sums follow its threads)
    gen = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(20_000, 16, generator=gen), torch.randn(24, 16, generator=gen), torch.randn(24)
    preact, grad = torch.randn(20_000, 24, generator=gen), torch.randn(20_000, 24, generator=gen)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            grads.append(torch.ops.bigkernels.dense_backward(grad, x, w, b, preact, "gelu", False,
                                                             [False, False, True])[2])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g, grads[0]) for g in grads)


@pytest.mark.parametrize("device", OPCHECK_DEVICES)
def test_deterministic_mode_gives_identical_gradients(device):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3000, 32, generator=gen).to(device)
    w = torch.randn(40, 32, generator=gen).to(device).requires_grad_()
    b = torch.randn(40, generator=gen).to(device).requires_grad_()
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(bigkernels.dense(x, w, b, "silu").sum(), (w, b)) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(old)
    assert all(torch.equal(a, c) for run in runs for a, c in zip(run, runs[0]))


# ---------------------------------------------------------------- meta tensors

@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_meta_tensors(activation):
    rows = 16 if activation in GATED else 8
    x = torch.empty(5, 3, 12, device="meta", requires_grad=True)
    w = torch.empty(rows, 12, device="meta", requires_grad=True)
    b = torch.empty(rows, device="meta", requires_grad=True)
    out = bigkernels.dense(x, w, b, activation)
    assert out.device.type == "meta" and out.shape == (5, 3, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
    with torch.no_grad():
        assert bigkernels.dense(x, w, b, activation).shape == (5, 3, 8)


def test_deferred_initialisation_on_meta():
    # how accelerate's init_empty_weights and FSDP build big models: shapes on
    # meta, then to_empty() and load_state_dict()
    layer = bigkernels.nn.Linear(12, 7, activation="gelu", device="meta")
    assert layer(torch.empty(2, 12, device="meta")).shape == (2, 7)
    theirs = torch.nn.Linear(12, 7)
    layer = layer.to_empty(device="cpu")
    layer.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 12)
    torch.testing.assert_close(layer(x), reference.activation(theirs(x), "gelu"))


# ---------------------------------------------------------------- CPU capabilities

CAPABILITIES = ["DEFAULT", "AVX2", "AVX512"]


def host_capabilities():
    """The capabilities ATen can run at here, lowest first."""
    top = torch.backends.cpu.get_cpu_capability()
    return CAPABILITIES[: CAPABILITIES.index(top) + 1] if top in CAPABILITIES else ["DEFAULT"]


def test_kernels_run_at_atens_capability():
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    expected = torch.backends.cpu.get_cpu_capability()
    assert torch.ops.bigkernels.cpu_capability() == (expected if expected in CAPABILITIES else "DEFAULT")
    if forced:
        assert expected == forced.upper()


@pytest.mark.skipif(bool(os.environ.get("ATEN_CPU_CAPABILITY")), reason="already inside a forced run")
@pytest.mark.parametrize("capability", host_capabilities())
def test_every_capability_matches_the_reference(capability):
    # the kernels of each capability (dense, attention, RNN, norms), forced as ATen's are, against the reference
    dense = ("(cpu and (matches_reference or extreme or zero or noncontiguous or recompute or fuzz or capability))"
             " or gradient_sums")
    attention = ("test_attention and (matches_reference or head_dims or long_sequence or nothing_to_attend"
                 " or float_mask_gradient or masks_whole_blocks or decoding_against_long_caches or hugging_face_layout"
                 " or single_key)")
    rnn = "test_rnn and (matches_torch or packed or gradcheck or sizes)"
    norm = "test_norm and (matches_reference or many_rows or large_mean)"
    here = os.path.dirname(__file__)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
         os.path.join(here, "test_attention.py"), os.path.join(here, "test_rnn.py"),
         os.path.join(here, "test_norm.py"), "-k", f"({dense}) or ({attention}) or ({rnn}) or ({norm})"],
        env={**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}, capture_output=True, text=True,
        timeout=900, cwd=os.path.dirname(__file__))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                    reason="x86-64 Linux only")
def test_wide_vector_code_only_in_its_capability_build():
    # Every function of the extension that uses AVX2 (ymm) or AVX-512 (zmm)
    # registers must belong to that capability's build: code that an AVX2-only
    # CPU would run must never carry AVX-512 instructions, which would kill it
    # with SIGILL (capability.h: how the builds are kept apart).
    import shutil

    from bigkernels import _C

    if shutil.which("objdump") is None:
        pytest.skip("needs objdump")
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True,
                          text=True, timeout=600).stdout
    function, offenders = None, set()
    for line in dump.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif "%zmm" in line and "AVX512" not in function:
            offenders.add(("zmm", function))
        elif "%ymm" in line and "AVX2" not in function and "AVX512" not in function:
            offenders.add(("ymm", function))
    assert not offenders, sorted(offenders)[:10]
