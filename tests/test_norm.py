"""bigkernels.layer_norm / rms_norm (an optional residual added first)
against F.layer_norm / F.rms_norm of the sum: forward and backward, the 2x
rule against float64, random data, odd widths (vector tails), edge cases,
bad input, opcheck and compile."""

import pytest
import torch
import torch.nn.functional as F

import bigkernels
from conftest import HAS_CUDA, assert_close

from bigkernels._info import BUILD_INFO
from bigkernels.ops.norm import residual_layer_norm_output

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def ours(rms):
    def fn(x, residual, weight, bias, eps):
        if rms:
            return bigkernels.rms_norm(x, weight, eps, residual=residual)
        return bigkernels.layer_norm(x, weight, bias, eps, residual=residual)
    return fn


def torch_unfused(rms):
    def fn(x, residual, weight, bias, eps):
        total = x if residual is None else x + residual
        out = (F.rms_norm(total, (x.shape[-1],), weight, eps) if rms
               else F.layer_norm(total, (x.shape[-1],), weight, bias, eps))
        return out if residual is None else (out, total)
    return fn


def run(fn, tensors, grads, dtype, eps, device="cpu"):
    """fn's outputs and the gradients of its tensor inputs (on the CPU), for
    float64 data cast to dtype on device."""
    leaves = [None if t is None else t.to(device, dtype).requires_grad_() for t in tensors]
    outs = fn(*leaves, eps)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(device, dtype) for g in grads[:len(outs)]])
    return [t.cpu() for t in [o.detach() for o in outs] + [t.grad for t in leaves if t is not None]]


def check(dtype, rms, residual, affine, shape, seed=0, offset=0.0, eps=1e-5, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    N = shape[-1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + offset
    r = torch.randn(shape, generator=gen, dtype=torch.float64) if residual else None
    w = torch.randn(N, generator=gen, dtype=torch.float64) if affine else None
    b = torch.randn(N, generator=gen, dtype=torch.float64) if affine and not rms else None
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)]
    tensors = (x, r, w, b)
    got = run(ours(rms), tensors, grads, dtype, eps, device)
    theirs = run(torch_unfused(rms), tensors, grads, dtype, eps, device)
    truth = run(torch_unfused(rms), tensors, grads, torch.float64, eps)
    names = ["output"] + (["sum"] if residual else []) + [n for n, t in zip(("grad_input", "grad_residual",
                                                                             "grad_weight", "grad_bias"), tensors)
                                                          if t is not None]
    assert len(got) == len(names)
    for name, a, t, ref in zip(names, got, theirs, truth):
        assert_close(name, a, t, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 384), (7, 1000), (4, 1), (1, 64)], ids=str)
def test_matches_reference(dtype, rms, residual, affine, shape):
    check(dtype, rms, residual, affine, shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_rows_sum_the_weight_gradient_precisely(dtype):
    # the weight and bias gradients sum 10k rows: blocked partial sums keep the 2x rule
    check(dtype, False, True, True, (10007, 96), seed=3)
    check(dtype, True, True, True, (10007, 96), seed=4)


def test_a_large_mean_does_not_cancel():
    # var = E[(x - mean)^2] after the mean, not E[x^2] - mean^2
    check(torch.float32, False, False, True, (16, 256), offset=1e4, seed=5)


def test_strided_inputs_and_the_sum_as_the_next_residual():
    x = torch.randn(6, 40, dtype=torch.float64)[:, ::2]  # not contiguous
    h = torch.randn(6, 20, dtype=torch.float64)
    w, b = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    out, total = bigkernels.layer_norm(x, w, b, residual=h)
    torch.testing.assert_close(total, x + h)
    torch.testing.assert_close(out, F.layer_norm(x + h, (20,), w, b))
    out2, total2 = bigkernels.rms_norm(out, w, 1e-6, residual=total)
    torch.testing.assert_close(total2, out + total)
    torch.testing.assert_close(out2, F.rms_norm(out + total, (20,), w, 1e-6))


def test_rms_norm_default_eps_is_torchs():
    x, w = torch.randn(3, 8) * 1e-4, torch.randn(8)
    torch.testing.assert_close(bigkernels.rms_norm(x, w), F.rms_norm(x, (8,), w))


def test_gradcheck_and_double_backward_float64():
    gen = torch.Generator().manual_seed(6)
    x, r = (torch.randn(3, 4, 9, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for fn, args in ((lambda x, r, w, b: bigkernels.layer_norm(x, w, b, residual=r), (x, r, w, b)),
                     (lambda x, r, w: bigkernels.rms_norm(x, w, 1e-5, residual=r), (x, r, w)),
                     (lambda x, w, b: bigkernels.layer_norm(x, w, b), (x, w, b))):
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


def test_empty_inputs():
    for shape in ((0, 8), (3, 0), (2, 0, 5)):
        x = torch.randn(shape, requires_grad=True)
        w = torch.randn(shape[-1], requires_grad=True)
        out, total = bigkernels.layer_norm(x, w, None, residual=torch.zeros(shape))
        assert out.shape == total.shape == x.shape
        (out.sum() + total.sum()).backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("call,error,match", [
    (lambda: bigkernels.layer_norm(torch.randn(2, 4, dtype=torch.float64), torch.randn(4)), TypeError, "weight dtype"),
    (lambda: bigkernels.layer_norm(torch.randn(2, 4), torch.randn(5)), ValueError, "weight must have shape"),
    (lambda: bigkernels.layer_norm(torch.randn(2, 4), None, torch.randn(2, 4)), ValueError, "bias must have shape"),
    (lambda: bigkernels.layer_norm(torch.randn(2, 4), residual=torch.randn(2, 5)), ValueError, "residual has shape"),
    (lambda: bigkernels.layer_norm(torch.randn(2, 4), residual=torch.randn(2, 4).half()), TypeError, "residual dtype"),
    (lambda: bigkernels.layer_norm(torch.randn(2, 4), eps=-1.0), ValueError, "eps"),
    (lambda: bigkernels.layer_norm(torch.tensor(1.0)), ValueError, "at least 1 dimension"),
    (lambda: bigkernels.rms_norm(torch.arange(4)), TypeError, "input must be float"),
    (lambda: bigkernels.rms_norm([1.0, 2.0]), TypeError, "input must be a torch.Tensor"),
])
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_op_called_directly_checks_too():
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.bigkernels.norm_forward(torch.randn(2, 4), None, torch.randn(3), None, 1e-5, False)
    with pytest.raises(ValueError, match="takes no bias"):
        torch.ops.bigkernels.norm_forward(torch.randn(2, 4), None, None, torch.randn(4), 1e-5, True)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(rms, residual):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 12, generator=gen, requires_grad=True)
    r = torch.randn(3, 5, 12, generator=gen, requires_grad=True) if residual else None
    w = torch.randn(12, generator=gen, requires_grad=True)
    b = None if rms else torch.randn(12, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.bigkernels.norm_forward, (x, r, w, b, 1e-5, rms))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True])
def test_sum_not_kept(dtype, rms):
    # keep_sum=False (no backward to come): the same output bits, no sum returned. Widths with
    # a vector tail; the CPU kernel then runs the sum through the output's rows.
    gen = torch.Generator().manual_seed(11)
    for width in (1, 37, 384):
        x, r = (torch.randn(7, 3, width, generator=gen).to(dtype) for _ in range(2))
        w = torch.randn(width, generator=gen).to(dtype)
        b = None if rms else torch.randn(width, generator=gen).to(dtype)
        kept = torch.ops.bigkernels.norm_forward(x, r, w, b, 1e-5, rms)
        not_kept = torch.ops.bigkernels.norm_forward(x, r, w, b, 1e-5, rms, False)
        assert torch.equal(not_kept[0], kept[0]) and not_kept[1].numel() == 0
        assert torch.equal(not_kept[3], kept[3])
    if not rms:
        assert torch.equal(residual_layer_norm_output(x, r, w, b, 1e-5), kept[0])  # nothing needs grad here
    torch.library.opcheck(torch.ops.bigkernels.norm_forward, (x, r, w, b, 1e-5, rms, False))
    x.requires_grad_()
    with pytest.raises(ValueError, match="keep_sum=False keeps nothing for backward"):
        torch.ops.bigkernels.norm_forward(x, r, w, b, 1e-5, rms, False)


def test_residual_layer_norm_output_keeps_the_sum_for_backward():
    # With gradients to compute, the sum is kept (backward reads it): gradients as layer_norm's.
    gen = torch.Generator().manual_seed(12)
    x, r = (torch.randn(5, 33, generator=gen, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(33, generator=gen, requires_grad=True) for _ in range(2))
    got = torch.autograd.grad(residual_layer_norm_output(x, r, w, b, 1e-5).pow(2).sum(), (x, r, w, b))
    expected = torch.autograd.grad(bigkernels.layer_norm(x, w, b, 1e-5, residual=r)[0].pow(2).sum(), (x, r, w, b))
    for a, e in zip(got, expected):
        assert torch.equal(a, e)


def test_compile_fullgraph():
    def block(x, h, w, b):
        out, h = bigkernels.layer_norm(x, w, b, residual=h)
        return bigkernels.rms_norm(out, w, 1e-6, residual=h)

    gen = torch.Generator().manual_seed(8)
    x, h = torch.randn(4, 32, generator=gen), torch.randn(4, 32, generator=gen)
    w, b = torch.randn(32, generator=gen), torch.randn(32, generator=gen)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for a, e in zip(compiled(x, h, w, b), block(x, h, w, b)):
        torch.testing.assert_close(a, e)


def test_meta_tensors():
    x = torch.empty(2, 3, 16, device="meta")
    out, total = bigkernels.layer_norm(x, torch.empty(16, device="meta"), None, residual=torch.empty_like(x))
    assert out.shape == total.shape == x.shape and out.device.type == "meta"


# CUDA: the kernels of csrc/norm/cuda/ (in a build compiled with CUDA; else
# PyTorch's add and norm), against float64 by the same 2x rule. Widths on both
# sides of the warp-per-row / block-per-row switch (1024).


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("shape", [(3, 5, 37), (7, 1000), (4, 1), (5, 1024), (6, 1025), (3, 4097), (2, 8192)],
                         ids=str)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_matches_reference(dtype, rms, residual, affine, shape):
    check(dtype, rms, residual, affine, shape, device="cuda")


@pytest.mark.parametrize("shape", [(10007, 96), (300001, 5), (70001, 1100)], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_many_rows(shape, rms):
    # more row groups than the kernels' grid (65535 blocks: they grid-stride),
    # and the weight/bias gradients summed over thousands of partial rows
    check(torch.float32, rms, True, True, shape, seed=9, device="cuda")
    check(torch.bfloat16, rms, True, True, shape[:1] + (min(shape[1], 96),), seed=10, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_large_mean_and_eps():
    check(torch.float32, False, False, True, (16, 256), offset=1e4, seed=5, device="cuda")
    check(torch.float32, False, True, True, (16, 2048), offset=1e4, seed=5, device="cuda")
    check(torch.float32, False, False, True, (8, 300), eps=0.5, seed=11, device="cuda")
    check(torch.float32, True, False, True, (8, 3000), eps=0.5, seed=12, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_runs_the_kernel_and_is_deterministic():
    if not BUILD_INFO["cuda_compiled"]:
        pytest.skip("this build has no CUDA kernels")
    gen = torch.Generator().manual_seed(13)
    x, h = (torch.randn(4096, 768, generator=gen).cuda().requires_grad_() for _ in range(2))
    w, b = (torch.randn(768, generator=gen).cuda().requires_grad_() for _ in range(2))
    out, total, mean, rstd = torch.ops.bigkernels.norm_forward(x, h, w, b, 1e-5, False)
    assert mean.shape == rstd.shape == (4096,) and mean.dtype == torch.float32
    grads = []
    for _ in range(2):
        o, t = bigkernels.layer_norm(x, w, b, residual=h)
        grads.append(torch.autograd.grad((o * o).sum() + t.sum(), (x, w, b)))
    for a, e in zip(*grads):
        assert torch.equal(a, e)  # the same bits: no atomics in the reductions


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_strided_and_empty():
    x = torch.randn(6, 40, dtype=torch.float64, device="cuda")[:, ::2]
    h = torch.randn(6, 20, dtype=torch.float64, device="cuda")
    w, b = torch.randn(20, dtype=torch.float64, device="cuda"), torch.randn(20, dtype=torch.float64, device="cuda")
    out, total = bigkernels.layer_norm(x, w, b, residual=h)
    torch.testing.assert_close(total, x + h)
    torch.testing.assert_close(out, F.layer_norm(x + h, (20,), w, b))
    for shape in ((0, 8), (3, 0), (2, 0, 5)):
        x = torch.randn(shape, device="cuda", requires_grad=True)
        w = torch.randn(shape[-1], device="cuda", requires_grad=True)
        out, total = bigkernels.layer_norm(x, w, None, residual=torch.zeros(shape, device="cuda"))
        assert out.shape == total.shape == x.shape
        (out.sum() + total.sum()).backward()
        assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_opcheck(rms, residual):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 1100, generator=gen).cuda().requires_grad_()
    r = torch.randn(3, 5, 1100, generator=gen).cuda().requires_grad_() if residual else None
    w = torch.randn(1100, generator=gen).cuda().requires_grad_()
    b = None if rms else torch.randn(1100, generator=gen).cuda().requires_grad_()
    torch.library.opcheck(torch.ops.bigkernels.norm_forward, (x, r, w, b, 1e-5, rms))
