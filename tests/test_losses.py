"""bigkernels.linear_cross_entropy against F.cross_entropy(F.linear(...)):
loss and every gradient, the 2x rule against float64, random data, odd sizes
(vector tails, several chunks), every option, edge cases, bad input, opcheck,
compile, autocast, meta, and the same bits whatever the thread count."""

import pytest
import torch
import torch.nn.functional as F

import bigkernels
from bigkernels import reference
from conftest import FLOOR, HAS_CUDA, assert_close

from bigkernels._info import BUILD_INFO

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def make(N, D, V, seed=0, bias=True, ignored=0.2, scale=1.0, lead=None):
    """float64 data: input [N, D] (or lead + [D]), weight [V, D], bias [V],
    targets with about `ignored` of them -100, and the gradient for 'none'."""
    gen = torch.Generator().manual_seed(seed)
    shape = (N,) if lead is None else lead
    x = torch.randn(*shape, D, generator=gen, dtype=torch.float64) * scale
    w = torch.randn(V, D, generator=gen, dtype=torch.float64) / max(D, 1) ** 0.5
    b = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, shape, generator=gen)
    t[torch.rand(shape, generator=gen) < ignored] = -100
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, w, b, t, g


def run(fn, x, w, b, t, g, dtype, reduction, device="cpu", **options):
    """The loss and the gradients of input, weight (and bias), for the
    float64 data in dtype on device (returned on the CPU); 'none' is reduced
    with the weights g."""
    leaves = [None if a is None else a.detach().to(device, dtype, copy=True).requires_grad_() for a in (x, w, b)]
    loss = fn(leaves[0], leaves[1], t.to(device), leaves[2], reduction=reduction, **options)
    (loss * g.to(device, dtype) if reduction == "none" else loss).sum().backward()
    return [loss.detach().cpu()] + [a.grad.cpu() for a in leaves if a is not None]


def torch_loss(x, w, t, b, reduction, softcap=None, chunk_rows=None, method=None, skip_small_gradients=None,
               **options):
    # the reference has one way (method) and exact gradients (skip_small_gradients)
    return reference.linear_cross_entropy(x, w, t, b, reduction=reduction, softcap=softcap or 0.0, **options)[0]


def check(x, w, b, t, g, dtype, reduction, device="cpu", **options):
    got = run(bigkernels.linear_cross_entropy, x, w, b, t, g, dtype, reduction, device, **options)
    theirs = run(torch_loss, x, w, b, t, g, dtype, reduction, device, **options)
    truth = run(torch_loss, x, w, b, t, g, torch.float64, reduction, **options)
    names = ["loss", "grad_input", "grad_weight", "grad_bias"][:len(got)]
    for name, a, th, ref in zip(names, got, theirs, truth):
        assert_close(name, a, th, ref)


OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "softcap": {"softcap": 2.5},
    "z_loss": {"z_loss": 1e-2},
    "all": {"label_smoothing": 0.3, "softcap": 7.0, "z_loss": 1e-3},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("size", [(37, 19, 131, 8), (300, 64, 1000, 0), (5, 3, 1, 0)], ids=str)
def test_matches_reference(dtype, reduction, options, size):
    N, D, V, chunk_rows = size
    x, w, b, t, g = make(N, D, V, bias=N != 300)
    check(x, w, b, t, g, dtype, reduction, chunk_rows=chunk_rows or None, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_chunks_sum_the_weight_gradient(dtype):
    # 1200 rows in chunks of 100: 12 additions into the weight's gradient
    x, w, b, t, g = make(1200, 96, 515, seed=1)
    check(x, w, b, t, g, dtype, "mean", chunk_rows=100)


def test_large_vocabulary_and_leading_dims():
    x, w, b, t, g = make(None, 40, 50257, seed=2, bias=False, lead=(2, 9))
    check(x, w, b, t, g, torch.float32, "mean")
    check(x, w, b, t, g, torch.float32, "none", label_smoothing=0.05)


def test_many_rows():
    x, w, b, t, g = make(20000, 16, 77, seed=3)
    check(x, w, b, t, g, torch.float32, "mean", z_loss=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_extreme_logits_do_not_overflow(dtype, softcap):
    # logits of order 1e4: exp would overflow without the max subtracted
    x, w, b, t, g = make(50, 32, 300, seed=4, scale=2e3)
    got = run(bigkernels.linear_cross_entropy, x, w, b, t, g, dtype, "sum", softcap=softcap)
    assert all(torch.isfinite(a).all() for a in got)
    check(x, w, b, t, g, dtype, "sum", softcap=softcap)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_and_all_ignored(reduction):
    for N, ignored in ((0, 0.0), (6, 1.0)):
        x, w, b, t, g = make(N, 8, 11, ignored=ignored)
        got = run(bigkernels.linear_cross_entropy, x, w, b, t, g, torch.float32, reduction)
        # mean: 0, with zero gradients (torch's F.cross_entropy gives NaN there)
        assert got[0].shape == ((N,) if reduction == "none" else ())
        assert (got[0] == 0).all()
        assert all((a == 0).all() for a in got[1:])


def test_ignored_rows_count_nowhere_and_ignore_index_is_honoured():
    x, w, b, t, g = make(40, 16, 50, seed=5, ignored=0.0)
    t[::3] = 7  # class 7 is the ignored one here
    check(x, w, b, t, g, torch.float32, "mean", ignore_index=7)
    check(x, w, b, t, g, torch.float32, "none", ignore_index=7, label_smoothing=0.2)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_return_lse(options):
    x, w, b, t, g = make(33, 12, 70, seed=6)
    loss, lse = bigkernels.linear_cross_entropy(x.float(), w.float(), t, b.float(), return_lse=True, **options)
    _, lse_ref = torch_loss(x, w, t, b, "mean", **options), reference.linear_cross_entropy(
        x, w, t, b, softcap=options.get("softcap", 0.0))[1]
    assert lse.dtype == torch.float32 and lse.shape == t.shape and not lse.requires_grad
    assert (lse[t == -100] == 0).all()
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-6, atol=1e-5)


def test_gradient_scaled_and_accumulated():
    # the gradients computed in the forward are scaled by the loss's
    # gradient; with a gradient of 1 a second backward of the same graph works
    x, w, b, t, g = make(30, 10, 20, seed=7)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = bigkernels.linear_cross_entropy(xs, ws, t, b)
    loss.backward(retain_graph=True)
    loss.backward()
    (3 * bigkernels.linear_cross_entropy(xs, ws, t, b)).backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (5 * torch_loss(xr, wr, t, b, "mean")).backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(ws.grad, wr.grad)
    # scaled in place, so a second backward of a scaled loss's graph refuses
    scaled = 2 * bigkernels.linear_cross_entropy(xs, ws, t, b)
    scaled.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        scaled.backward()


def test_forward_alone_equals_forward_with_gradients():
    x, w, b, t, g = make(300, 24, 333, seed=16)
    with torch.no_grad():
        plain = bigkernels.linear_cross_entropy(x, w, t, b, chunk_rows=64)
    with_grad = bigkernels.linear_cross_entropy(x.clone().requires_grad_(), w, t, b, chunk_rows=64)
    assert torch.equal(plain, with_grad.detach())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2, "softcap": 3.0, "z_loss": 0.1}], ids=["plain", "all"])
def test_gradcheck_float64(reduction, options):
    x, w, b, t, g = make(7, 3, 5, seed=8)
    fn = lambda x, w, b: bigkernels.linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_rows=3, **options)
    torch.autograd.gradcheck(fn, [a.clone().requires_grad_() for a in (x, w, b)])


def test_double_backward_raises():
    x, w, b, t, g = make(7, 3, 5, seed=9)
    xs = x.clone().requires_grad_()
    loss = bigkernels.linear_cross_entropy(xs, w, t, b)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, xs, create_graph=True)


def test_same_bits_whatever_the_thread_count():
    # (D a multiple of 16: see the distillation's test)
    x, w, b, t, g = make(700, 48, 900, seed=10)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run(bigkernels.linear_cross_entropy, x, w, b, t, g, torch.float32, "mean",
                               chunk_rows=256, label_smoothing=0.1))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


def bad_call(**changes):
    x, w, b, t, _ = make(4, 3, 5, seed=11)
    args = dict(input=x.float(), weight=w.float(), target=t, bias=b.float())
    args.update(changes)
    return lambda: bigkernels.linear_cross_entropy(args.pop("input"), args.pop("weight"), args.pop("target"),
                                                   args.pop("bias"), **args)


@pytest.mark.parametrize("call, error, match", [
    (bad_call(target=torch.tensor([0, 1, 5, 2])), ValueError, r"target\[2\] = 5 is out of range"),
    (bad_call(target=torch.tensor([0, 1, -3, 2])), ValueError, r"target\[2\] = -3"),
    (bad_call(target=torch.tensor([0, 1, 2])), ValueError, "target must have shape"),
    (bad_call(target=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), TypeError, "target must be int64"),
    (bad_call(bias=torch.zeros(4)), ValueError, "bias must be"),
    (bad_call(bias=torch.zeros(5, dtype=torch.float64)), TypeError, "bias dtype"),
    (bad_call(weight=torch.zeros(5, 4)), ValueError, "weight must be"),
    (bad_call(weight=torch.zeros(0, 3)), ValueError, "at least one row"),
    (bad_call(weight=torch.zeros(5, 3, dtype=torch.float64)), TypeError, "weight dtype"),
    (bad_call(input=torch.zeros(4, 3, dtype=torch.int64)), TypeError, "input must be float"),
    (bad_call(reduction="avg"), ValueError, "reduction must be"),
    (bad_call(softcap=-1.0), ValueError, "softcap must be"),
    (bad_call(label_smoothing=1.5), ValueError, "label_smoothing must be"),
    (bad_call(z_loss=-0.1), ValueError, "z_loss must be"),
    (bad_call(chunk_rows=0), ValueError, "chunk_rows must be"),
    (bad_call(ignore_index=1.0), TypeError, "ignore_index must be"),
    (bad_call(method="tiled"), ValueError, "method must be 'chunked' or 'blocked', got 'tiled'"),
    (bad_call(method=None), ValueError, "method must be"),
    (bad_call(skip_small_gradients=True), ValueError, "skip_small_gradients=True needs method='blocked'"),
    (bad_call(skip_small_gradients=1), TypeError, "skip_small_gradients must be a bool"),
    (bad_call(skip_small_gradients=None, method="blocked"), TypeError, "skip_small_gradients must be a bool"),
    (bad_call(method="blocked"), NotImplementedError, "method='blocked' runs on CUDA only.*on cpu use method='chunked'"),
    (bad_call(method="blocked", skip_small_gradients=True), NotImplementedError, "runs on CUDA only"),
])
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_op_called_directly_checks_too():
    x, w, b, t, _ = make(4, 3, 5)
    op = torch.ops.bigkernels.linear_cross_entropy
    with pytest.raises(ValueError, match="target must be"):
        op(x, w, t[:2], b, -100, 0.0, 0.0, 0.0, "mean", 0, "chunked", False)
    with pytest.raises(ValueError, match="reduction must be"):
        op(x, w, t, b, -100, 0.0, 0.0, 0.0, "avg", 0, "chunked", False)
    with pytest.raises(ValueError, match="need reduction 'mean' or 'sum'"):
        torch.ops.bigkernels.linear_cross_entropy_forward(x, w, t, b, -100, 0.0, 0.0, 0.0, "none", 0, "chunked",
                                                          False, [True, False, False])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    x, w, b, t, g = make(9, 6, 13, seed=12)
    x, w, b = (a.float().requires_grad_() for a in (x, w, b))
    args = (x, w, t, b, -100, 0.1, 4.0, 1e-3, reduction, 4, "chunked", False)
    torch.library.opcheck(torch.ops.bigkernels.linear_cross_entropy, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.bigkernels.linear_cross_entropy_forward,
                          (*plain[:8], "sum", 4, "chunked", False, [True, True, True]))
    lse = torch.ops.bigkernels.linear_cross_entropy(*plain)[1]
    torch.library.opcheck(torch.ops.bigkernels.linear_cross_entropy_backward,
                          (g.float(), *plain[:4], lse, -100, 0.1, 4.0, 1e-3, 4, "chunked", False, [True, True, True]))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction):
    x, w, b, t, g = make(20, 8, 30, seed=13)

    def step(x, w, b):
        loss = bigkernels.linear_cross_entropy(x, w, t, b, reduction=reduction, z_loss=1e-3)
        return loss if reduction == "mean" else (loss * g.float()).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = (fn(*(a.float().requires_grad_() for a in (x, w, b))) for fn in (compiled, step))
    torch.testing.assert_close(got, want)


def test_autocast_matches_torchs_autocast():
    x, w, b, t, g = make(64, 32, 300, seed=14)
    x, w, b = x.float(), w.float(), b.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = bigkernels.linear_cross_entropy(x, w, t, b)
        theirs = F.cross_entropy(F.linear(x, w, b), t)
    truth = torch_loss(x.double(), w.double(), t, b.double(), "mean")
    assert ours.dtype == theirs.dtype
    assert abs(ours.double() - truth) <= 2 * abs(theirs.double() - truth) + 8e-3 * max(1.0, truth.abs())


def test_meta_tensors():
    x, w = torch.empty(6, 5, 8, device="meta"), torch.empty(100, 8, device="meta")
    t = torch.empty(6, 5, dtype=torch.int64, device="meta")
    loss, lse = bigkernels.linear_cross_entropy(x, w, t, reduction="none", return_lse=True)
    assert loss.shape == (6, 5) and lse.shape == (6, 5) and loss.device.type == "meta"
    assert bigkernels.linear_cross_entropy(x, w, t).shape == ()


def test_module():
    x, w, b, t, g = make(25, 12, 40, seed=15)
    module = bigkernels.nn.LinearCrossEntropyLoss(label_smoothing=0.1, softcap=5.0)
    assert "label_smoothing=0.1" in repr(module)
    torch.testing.assert_close(module(x, w, t, b), torch_loss(x, w, t, b, "mean", label_smoothing=0.1, softcap=5.0))
    # the module passes method and skip_small_gradients on (the op refuses them here, on the CPU)
    blocked = bigkernels.nn.LinearCrossEntropyLoss(method="blocked", skip_small_gradients=True)
    assert "method='blocked'" in repr(blocked) and "skip_small_gradients=True" in repr(blocked)
    with pytest.raises(NotImplementedError, match="method='blocked' runs on CUDA only"):
        blocked(x, w, t, b)
    with pytest.raises(ValueError, match="skip_small_gradients"):
        bigkernels.nn.LinearCrossEntropyLoss(skip_small_gradients=True)(x, w, t, b)


def test_blocked_method_on_the_cpu_raises_not_implemented(monkeypatch):
    x, w, b, t, g = make(6, 5, 9, seed=17)
    ops = (torch.ops.bigkernels.linear_cross_entropy, torch.ops.bigkernels.linear_cross_entropy_forward,
           torch.ops.bigkernels.linear_cross_entropy_backward)
    lse = ops[0](x, w, t, b, -100, 0.0, 0.0, 0.0, "none", 0, "chunked", False)[1]
    calls = [lambda method, skip: ops[0](x, w, t, b, -100, 0.0, 0.0, 0.0, "mean", 0, method, skip),
             lambda method, skip: ops[1](x, w, t, b, -100, 0.0, 0.0, 0.0, "sum", 0, method, skip, [True, True, True]),
             lambda method, skip: ops[2](g, x, w, t, b, lse, -100, 0.0, 0.0, 0.0, 0, method, skip,
                                         [True, True, True])]
    for call in calls:
        # the op itself, called directly: the CPU has no blocked kernels
        with pytest.raises(NotImplementedError, match="method='blocked' runs on CUDA only; on cpu use method='chunked'"):
            call("blocked", False)
        with pytest.raises(NotImplementedError, match="runs on CUDA only"):
            call("blocked", True)
        with pytest.raises((ValueError, RuntimeError), match="method must be 'chunked' or 'blocked', got 'nope'"):
            call("nope", False)
        with pytest.raises(ValueError, match="skip_small_gradients needs method 'blocked'"):
            call("chunked", True)
    # whatever the targets: all ignored (no row to compute) refuses too
    with pytest.raises(NotImplementedError, match="runs on CUDA only"):
        ops[0](x, w, torch.full_like(t, -100), b, -100, 0.0, 0.0, 0.0, "mean", 0, "blocked", False)
    # and the PyTorch fallback (no kernel for the device) refuses it as well: the check is the front's
    from bigkernels.ops import losses as loss_ops
    monkeypatch.setattr(loss_ops, "_has_kernel", lambda device: False)
    with pytest.raises(NotImplementedError, match="on cpu use method='chunked'"):
        bigkernels.linear_cross_entropy(x, w, t, b, method="blocked")
    torch.testing.assert_close(bigkernels.linear_cross_entropy(x, w, t, b, method="chunked"),
                               torch_loss(x, w, t, b, "mean"))


# ---------------------------------------------------------------- distillation

def make_distillation(N, Ds, Dt, V, seed=0, bias=True, ignored=0.2, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(N, Ds, generator=gen, dtype=torch.float64) * scale
    ws = torch.randn(V, Ds, generator=gen, dtype=torch.float64) / max(Ds, 1) ** 0.5
    bs = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    xt = torch.randn(N, Dt, generator=gen, dtype=torch.float64) * scale
    wt = torch.randn(V, Dt, generator=gen, dtype=torch.float64) * 2 / max(Dt, 1) ** 0.5
    bt = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,), generator=gen)
    t[torch.rand(N, generator=gen) < ignored] = -100
    g = torch.randn(N, generator=gen, dtype=torch.float64)
    return xs, ws, bs, xt, wt, bt, t, g


def run_distillation(fn, data, dtype, teacher_dtype, reduction, use_target, device="cpu", **options):
    xs, ws, bs, xt, wt, bt, t, g = data
    leaves = [None if a is None else a.detach().to(device, dtype, copy=True).requires_grad_() for a in (xs, ws, bs)]
    teacher = [None if a is None else a.to(device, teacher_dtype or dtype) for a in (xt, wt, bt)]
    loss = fn(leaves[0], leaves[1], teacher[0], teacher[1], t.to(device) if use_target else None,
              student_bias=leaves[2], teacher_bias=teacher[2], reduction=reduction, **options)
    (loss * g.to(device, loss.dtype) if reduction == "none" else loss).sum().backward()
    return [loss.detach().cpu()] + [a.grad.cpu() for a in leaves if a is not None]


def torch_distillation(xs, ws, xt, wt, t, student_bias=None, teacher_bias=None, chunk_rows=None, method=None,
                       **options):
    # the reference has one way (method)
    return reference.linear_distillation_loss(xs, ws, xt, wt, t, student_bias, teacher_bias, **options)


def check_distillation(data, dtype, reduction, use_target=True, teacher_dtype=None, device="cpu", **options):
    got = run_distillation(bigkernels.linear_distillation_loss, data, dtype, teacher_dtype, reduction, use_target,
                           device, **options)
    theirs = run_distillation(torch_distillation, data, dtype, teacher_dtype, reduction, use_target, device,
                              **options)
    truth = run_distillation(torch_distillation, data, torch.float64, torch.float64, reduction, use_target,
                             **options)
    names = ["loss", "grad_student_input", "grad_student_weight", "grad_student_bias"][:len(got)]
    for name, a, th, ref in zip(names, got, theirs, truth):
        assert_close(name, a, th, ref)


DISTILLATION = {
    "forward_kl": {"beta": 0.0},
    "reverse_kl": {"beta": 1.0},
    "jsd": {"beta": 0.5},
    "jsd_t4_hard": {"beta": 0.3, "temperature": 4.0, "hard_weight": 0.5},
    "kl_t05_hard": {"beta": 0.0, "temperature": 0.5, "hard_weight": 2.0},
    "reverse_t2_hard": {"beta": 1.0, "temperature": 2.0, "hard_weight": 1.0},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", DISTILLATION.values(), ids=DISTILLATION.keys())
@pytest.mark.parametrize("size", [(37, 19, 23, 131, 8), (200, 48, 80, 1000, 0), (4, 3, 5, 1, 0)], ids=str)
def test_distillation_matches_reference(dtype, reduction, options, size):
    N, Ds, Dt, V, chunk_rows = size
    data = make_distillation(N, Ds, Dt, V, bias=N != 200)
    check_distillation(data, dtype, reduction, chunk_rows=chunk_rows or None, **options)


@pytest.mark.parametrize("options", DISTILLATION.values(), ids=DISTILLATION.keys())
def test_distillation_without_target_and_a_bf16_teacher(options):
    data = make_distillation(50, 16, 24, 300, seed=1)
    soft = {k: v for k, v in options.items() if k != "hard_weight"}
    check_distillation(data, torch.float32, "mean", use_target=False, **soft)
    check_distillation(data, torch.float32, "sum", teacher_dtype=torch.bfloat16, **options)


def test_distillation_extreme_logits_and_a_large_vocabulary():
    for beta in (0.0, 0.5, 1.0):
        data = make_distillation(30, 16, 16, 300, seed=2, scale=300.0)
        got = run_distillation(bigkernels.linear_distillation_loss, data, torch.float32, None, "mean", True,
                               beta=beta, hard_weight=1.0)
        assert all(torch.isfinite(a).all() for a in got)
        check_distillation(data, torch.float32, "mean", beta=beta, hard_weight=1.0)
    check_distillation(make_distillation(9, 12, 20, 50257, seed=3, bias=False), torch.float32, "mean",
                       beta=0.5, temperature=2.0, hard_weight=0.5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", [{"beta": 0.0}, {"beta": 1.0, "temperature": 2.0, "hard_weight": 0.5},
                                     {"beta": 0.4, "temperature": 0.7, "hard_weight": 1.0}], ids=["kl", "rkl", "jsd"])
def test_distillation_gradcheck_float64(reduction, options):
    xs, ws, bs, xt, wt, bt, t, g = make_distillation(6, 3, 4, 5, seed=4)

    def fn(xs, ws, bs):
        return bigkernels.linear_distillation_loss(xs, ws, xt, wt, t, student_bias=bs, teacher_bias=bt,
                                                   reduction=reduction, chunk_rows=4, **options)
    torch.autograd.gradcheck(fn, [a.clone().requires_grad_() for a in (xs, ws, bs)])


def test_distillation_teacher_gets_no_gradient_and_empty_cases():
    xs, ws, bs, xt, wt, bt, t, g = make_distillation(8, 4, 6, 10, seed=5)
    wt = wt.clone().requires_grad_()
    xs = xs.clone().requires_grad_()
    bigkernels.linear_distillation_loss(xs, ws, xt, wt, t, hard_weight=1.0).backward()
    assert wt.grad is None and xs.grad is not None
    t_all = torch.full_like(t, -100)
    x0 = xs.detach().clone().requires_grad_()
    loss = bigkernels.linear_distillation_loss(x0, ws, xt, wt.detach(), t_all, hard_weight=1.0)
    loss.backward()
    assert loss == 0 and (x0.grad == 0).all()
    empty = bigkernels.linear_distillation_loss(xs[:0], ws, xt[:0], wt.detach(), reduction="sum")
    assert empty == 0


def bad_distillation(**changes):
    xs, ws, bs, xt, wt, bt, t, g = make_distillation(4, 3, 5, 6, seed=6)
    args = dict(student_input=xs, student_weight=ws, teacher_input=xt, teacher_weight=wt, target=t)
    args.update(changes)
    return lambda: bigkernels.linear_distillation_loss(
        args.pop("student_input"), args.pop("student_weight"), args.pop("teacher_input"), args.pop("teacher_weight"),
        args.pop("target"), **args)


@pytest.mark.parametrize("call, error, match", [
    (bad_distillation(teacher_input=torch.zeros(3, 5, dtype=torch.float64)), ValueError, "one teacher row"),
    (bad_distillation(teacher_weight=torch.zeros(7, 5, dtype=torch.float64)), ValueError, "teacher_weight must be"),
    (bad_distillation(student_weight=torch.zeros(6, 4, dtype=torch.float64)), ValueError, "student_weight must be"),
    (bad_distillation(teacher_input=torch.zeros(4, 5, dtype=torch.int64)), TypeError, "teacher_input must be float"),
    (bad_distillation(teacher_weight=torch.zeros(6, 5)), TypeError, "teacher_weight dtype"),
    (bad_distillation(student_input=torch.zeros(4, 3)), TypeError, "student_weight dtype"),
    (bad_distillation(temperature=-1.0), ValueError, "temperature must be"),
    (bad_distillation(temperature=0), ValueError, "temperature must be"),
    (bad_distillation(beta=1.5), ValueError, "beta must be"),
    (bad_distillation(hard_weight=-1.0), ValueError, "hard_weight must be"),
    (bad_distillation(target=None, hard_weight=1.0), ValueError, "needs a target"),
    (bad_distillation(target=torch.tensor([0, 9, 1, 2])), ValueError, r"target\[1\] = 9 is out of range"),
    (bad_distillation(reduction="batchmean"), ValueError, "reduction must be"),
    (bad_distillation(method="tiled"), ValueError, "method must be 'chunked' or 'blocked', got 'tiled'"),
    (bad_distillation(method=None), ValueError, "method must be"),
    (bad_distillation(method="blocked"), NotImplementedError,
     "method='blocked' runs on CUDA only.*on cpu use method='chunked'"),
    # the dtype's error first, wherever it runs: it holds on CUDA too
    (bad_distillation(student_input=torch.zeros(4, 3, dtype=torch.bfloat16),
                      student_weight=torch.zeros(6, 3, dtype=torch.bfloat16),
                      teacher_input=torch.zeros(4, 5), teacher_weight=torch.zeros(6, 5), method="blocked"),
     TypeError, r"method 'blocked' needs the teacher in the student's dtype \(bfloat16\), got teacher_input float32"),
])
def test_distillation_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distillation_opcheck_and_compile(reduction):
    xs, ws, bs, xt, wt, bt, t, g = (a.float() if a.is_floating_point() else a
                                    for a in make_distillation(9, 6, 7, 13, seed=7))
    args = (xs.requires_grad_(), ws.requires_grad_(), xt, wt, t, bs.requires_grad_(), bt, 2.0, 0.5, 0.5, -100,
            reduction, 4, "chunked")
    torch.library.opcheck(torch.ops.bigkernels.linear_distillation_loss, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.bigkernels.linear_distillation_loss_forward,
                          (*plain[:11], "sum", 4, "chunked", None, [True, True, True]))

    def step(xs, ws, bs):
        loss = bigkernels.linear_distillation_loss(xs, ws, xt, wt, t, student_bias=bs, teacher_bias=bt, beta=0.5,
                                                   hard_weight=0.5, reduction=reduction)
        return loss if reduction == "mean" else (loss * g).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = (fn(*(a.detach().requires_grad_() for a in (xs, ws, bs))) for fn in (compiled, step))
    torch.testing.assert_close(got, want)


def test_distillation_module_and_meta():
    data = make_distillation(20, 8, 12, 30, seed=8)
    xs, ws, bs, xt, wt, bt, t, g = data
    module = bigkernels.nn.LinearDistillationLoss(temperature=2.0, beta=0.5, hard_weight=0.3)
    assert "beta=0.5" in repr(module)
    torch.testing.assert_close(module(xs, ws, xt, wt, t),
                               torch_distillation(xs, ws, xt, wt, t, temperature=2.0, beta=0.5, hard_weight=0.3))
    meta = [torch.empty(3, 5, 8, device="meta"), torch.empty(30, 8, device="meta"),
            torch.empty(3, 5, 12, device="meta"), torch.empty(30, 12, device="meta")]
    assert bigkernels.linear_distillation_loss(*meta, reduction="none").shape == (3, 5)
    # the module passes method on (the op refuses "blocked" here, on the CPU)
    assert "method='chunked'" in repr(module)
    blocked = bigkernels.nn.LinearDistillationLoss(beta=0.5, method="blocked")
    assert "method='blocked'" in repr(blocked)
    with pytest.raises(NotImplementedError, match="method='blocked' runs on CUDA only"):
        blocked(xs, ws, xt, wt, t)
    with pytest.raises(ValueError, match="method must be"):
        bigkernels.nn.LinearDistillationLoss(method="tiled")(xs, ws, xt, wt, t)


def test_distillation_blocked_method_on_the_cpu_raises_not_implemented(monkeypatch):
    xs, ws, bs, xt, wt, bt, t, g = make_distillation(6, 5, 7, 9, seed=17)
    ops = (torch.ops.bigkernels.linear_distillation_loss, torch.ops.bigkernels.linear_distillation_loss_forward)

    def calls(xs, ws, bs, xt, wt, bt, t):
        return [lambda method: ops[0](xs, ws, xt, wt, t, bs, bt, 2.0, 0.5, 0.5, -100, "mean", 0, method),
                lambda method: ops[1](xs, ws, xt, wt, t, bs, bt, 2.0, 0.5, 0.5, -100, "sum", 0, method, None,
                                      [True, True, True]),
                # the backward of 'none'
                lambda method: ops[1](xs, ws, xt, wt, t, bs, bt, 2.0, 0.5, 0.5, -100, "none", 0, method, g,
                                      [True, True, True])]

    for call in calls(xs, ws, bs, xt, wt, bt, t):
        # the op itself, called directly: the CPU has no blocked kernels
        with pytest.raises(NotImplementedError, match="bigkernels linear_distillation_loss: method='blocked' runs "
                                                      "on CUDA only; on cpu use method='chunked'"):
            call("blocked")
        with pytest.raises((ValueError, RuntimeError), match="method must be 'chunked' or 'blocked', got 'nope'"):
            call("nope")
        call("chunked")
    # whatever the targets: all ignored (no row to compute), or none, refuses too
    with pytest.raises(NotImplementedError, match="runs on CUDA only"):
        ops[0](xs, ws, xt, wt, torch.full_like(t, -100), bs, bt, 1.0, 0.0, 0.5, -100, "mean", 0, "blocked")
    with pytest.raises(NotImplementedError, match="runs on CUDA only"):
        ops[0](xs, ws, xt, wt, None, bs, bt, 1.0, 0.0, 0.0, -100, "sum", 0, "blocked")
    # the teacher in another dtype: the chunked method takes it, the blocked refuses it first (a TypeError)
    low = [None if a is None else a.bfloat16() for a in (xs, ws, bs)]
    high = [None if a is None else a.float() for a in (xt, wt, bt)]
    for call in calls(*low, *high, t):
        call("chunked")
        with pytest.raises(TypeError, match=r"method 'blocked' needs the teacher in the student's dtype "
                                            r"\(bfloat16\), got teacher_input float32: cast it, or use method "
                                            r"'chunked'"):
            call("blocked")
    # and the PyTorch fallback (no kernel for the device) refuses it as well: the check is the front's
    from bigkernels.ops import losses as loss_ops
    monkeypatch.setattr(loss_ops, "_has_kernel", lambda device: False)
    with pytest.raises(NotImplementedError, match="on cpu use method='chunked'"):
        bigkernels.linear_distillation_loss(xs, ws, xt, wt, t, beta=0.5, method="blocked")
    with pytest.raises(TypeError, match="needs the teacher in the student's dtype"):
        bigkernels.linear_distillation_loss(low[0], low[1], high[0], high[1], t, method="blocked")
    torch.testing.assert_close(bigkernels.linear_distillation_loss(xs, ws, xt, wt, t, beta=0.5, method="chunked"),
                               torch_distillation(xs, ws, xt, wt, t, beta=0.5))


def test_transformer_returns_its_loss_through_the_fused_path():
    torch.manual_seed(0)
    model = bigkernels.models.Transformer(50, d_model=16, nhead=2, num_layers=1, max_len=12)
    tokens = torch.randint(0, 50, (3, 12))
    labels = torch.randint(0, 50, (3, 12))
    padding = torch.zeros(3, 12, dtype=torch.bool)
    padding[0, 9:] = True
    loss, logits = model(tokens, padding, labels=labels, return_logits=True)
    expected = F.cross_entropy(logits.reshape(-1, 50), labels.masked_fill(padding, -100).reshape(-1))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits, model(tokens, padding))
    loss.backward()
    assert model.tokens.weight.grad is not None  # the tied head's gradient reaches the embedding
    with pytest.raises(ValueError, match="labels must have shape"):
        model(tokens, labels=labels[:, :5])
    classifier = bigkernels.models.Transformer(50, d_model=16, nhead=2, num_layers=1, num_classes=4)
    y = torch.randint(0, 4, (3,))
    torch.testing.assert_close(classifier(tokens, labels=y), F.cross_entropy(classifier(tokens), y))


def test_distillation_same_bits_whatever_the_thread_count():
    # widths that are multiples of 16: at D 24 and 40, MKL's product for the
    # input's gradient splits its sum over V by thread count (1e-9 apart at 3)
    data = make_distillation(600, 32, 48, 700, seed=9)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run_distillation(bigkernels.linear_distillation_loss, data, torch.float32, None, "mean",
                                            True, beta=0.5, temperature=2.0, hard_weight=0.5, chunk_rows=256))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


def test_distillation_example_runs():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "distill.py"), "--steps", "6"],
                         capture_output=True, text=True, timeout=300, cwd=root,
                         env=dict(os.environ, PYTHONPATH=root))
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "loss" in line]
    assert len(lines) == 4 and "distilled" in lines[-1], out.stdout



# CUDA: the row passes of csrc/losses/cuda/ on cuBLAS's products (in a build
# compiled with CUDA; else the PyTorch fallback). Never run on a GPU yet.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("size", [(37, 19, 131, 8), (300, 64, 50257, 0)], ids=str)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_matches_reference(dtype, reduction, options, size):
    N, D, V, chunk_rows = size
    x, w, b, t, g = make(N, D, V)
    check(x, w, b, t, g, dtype, reduction, "cuda", chunk_rows=chunk_rows or None, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", DISTILLATION.values(), ids=DISTILLATION.keys())
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_distillation_matches_reference(dtype, options):
    data = make_distillation(70, 32, 48, 3001, seed=11)
    check_distillation(data, dtype, "mean", device="cuda", chunk_rows=32, **options)
    check_distillation(data, dtype, "none", device="cuda", **options)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_runs_the_kernel_and_is_deterministic():
    if not BUILD_INFO["cuda_compiled"]:
        pytest.skip("this build has no CUDA kernels")
    x, w, b, t, g = make(500, 64, 7000, seed=12)
    runs = [run(bigkernels.linear_cross_entropy, x, w, b, t, g, torch.float32, "mean", "cuda", label_smoothing=0.1)
            for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    op = torch.ops.bigkernels.linear_cross_entropy.default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
    with pytest.raises(ValueError, match="out of range"):
        bigkernels.linear_cross_entropy(x.float().cuda(), w.float().cuda(), torch.full_like(t, 7000).cuda())


# CUDA, method="blocked": Cut Cross-Entropy's tiles (csrc/losses/cuda/), the
# logits a tile of rows x a block of the vocabulary at a time. The same 2x
# rule against float64 as the chunked loop, on sizes off every tile boundary
# (each N, D and V at least once, V 1 and 7 narrower than any block), with
# and without bias, some rows ignored (make's 20 %). In a build without the
# CUDA kernels the PyTorch fallback runs (it ignores method): they pass too.
BLOCKED_SIZES = [(1, 40, 1000, True), (1, 130, 7, False), (37, 72, 129, True), (37, 130, 1, True),
                 (300, 40, 1000, False), (300, 72, 7, True), (300, 130, 129, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("size", BLOCKED_SIZES, ids=str)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_blocked_matches_reference(dtype, reduction, options, size):
    N, D, V, bias = size
    x, w, b, t, g = make(N, D, V, seed=N + D + V, bias=bias)
    check(x, w, b, t, g, dtype, reduction, "cuda", method="blocked", **options)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_blocked_ignore_index_and_empty():
    x, w, b, t, g = make(40, 16, 50, seed=5, ignored=0.0)
    t[::3] = 7  # class 7 is the ignored one here
    check(x, w, b, t, g, torch.float32, "mean", "cuda", method="blocked", ignore_index=7)
    check(x, w, b, t, g, torch.bfloat16, "none", "cuda", method="blocked", ignore_index=7, label_smoothing=0.2)
    for reduction in ("mean", "sum", "none"):
        for N, ignored in ((0, 0.0), (6, 1.0)):
            x, w, b, t, g = make(N, 8, 11, ignored=ignored)
            got = run(bigkernels.linear_cross_entropy, x, w, b, t, g, torch.float32, reduction, "cuda",
                      method="blocked")
            assert got[0].shape == ((N,) if reduction == "none" else ())
            assert all((a == 0).all() for a in got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_blocked_return_lse(dtype, options):
    x, w, b, t, g = make(300, 72, 1000, seed=6)
    rounded = [a.to(dtype) for a in (x, w, b)]  # the reference on the very inputs the kernel reads
    loss, lse = bigkernels.linear_cross_entropy(*(a.cuda() for a in rounded[:2]), t.cuda(), rounded[2].cuda(),
                                                return_lse=True, method="blocked", **options)
    lse_ref = reference.linear_cross_entropy(*(a.double() for a in rounded[:2]), t, rounded[2].double(),
                                             softcap=options.get("softcap", 0.0))[1]
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == t.shape and not lse.requires_grad
    assert (lse.cpu()[t == -100] == 0).all()
    # accumulated in float32 (float64): a few of its ulps of the lse's size
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(lse.cpu().double(), lse_ref, rtol=tol, atol=tol)
    if dtype in (torch.float32, torch.float64):  # (the chunked loop's logits are rounded to float16/bfloat16)
        chunked = bigkernels.linear_cross_entropy(*(a.cuda() for a in rounded[:2]), t.cuda(), rounded[2].cuda(),
                                                  return_lse=True, **options)[1]
        torch.testing.assert_close(lse, chunked, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("size", [(300, 72, 1000), (37, 130, 129)], ids=str)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_blocked_equals_chunked(dtype, reduction, options, size):
    # The same sums in another order (tiles, atomics): apart by rounding
    # alone, relative to each result's largest element (dW's atomics add
    # 300 rows' terms: far below 1e-4 of its size in float32).
    x, w, b, t, g = make(*size, seed=18)
    chunked = run(bigkernels.linear_cross_entropy, x, w, b, t, g, dtype, reduction, "cuda", **options)
    blocked = run(bigkernels.linear_cross_entropy, x, w, b, t, g, dtype, reduction, "cuda", method="blocked",
                  **options)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    for name, a, c in zip(["loss", "grad_input", "grad_weight", "grad_bias"], blocked, chunked):
        error = (a.double() - c.double()).abs().max().item()
        assert error <= tol * max(1.0, c.double().abs().max().item()), f"{name}: blocked and chunked {error:.3g} apart"


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_blocked_opcheck(reduction):
    if not BUILD_INFO["cuda_compiled"]:
        pytest.skip("this build has no CUDA kernels")
    x, w, b, t, g = make(9, 6, 13, seed=12)
    x, w, b = (a.float().cuda().requires_grad_() for a in (x, w, b))
    t, g = t.cuda(), g.float().cuda()
    for skip in (False, True):
        args = (x, w, t, b, -100, 0.0, 4.0, 1e-3, reduction, 0, "blocked", skip)
        torch.library.opcheck(torch.ops.bigkernels.linear_cross_entropy, args)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.bigkernels.linear_cross_entropy_forward,
                              (*plain[:8], "sum", 0, "blocked", skip, [True, True, True]))
        lse = torch.ops.bigkernels.linear_cross_entropy(*plain)[1]
        torch.library.opcheck(torch.ops.bigkernels.linear_cross_entropy_backward,
                              (g, *plain[:4], lse, -100, 0.0, 4.0, 1e-3, 0, "blocked", skip, [True, True, True]))


# skip_small_gradients: the backward leaves out a tile's gradient products
# when every probability in it is below the dtype's unit roundoff / 16.
SKIP_THRESHOLD = {torch.bfloat16: 2.0 ** -12, torch.float16: 2.0 ** -15, torch.float32: 2.0 ** -28,
                  torch.float64: 2.0 ** -57}


def make_peaked(N, D, V, seed=0, bias=True):
    """make's data with a softmax as peaked as a trained LM's: input's column 0
    is 1 and weight's lowers class j's logit by 48 j / V, so the far classes'
    probabilities fall below every dtype's threshold (e^-48 < 2^-57) and their
    tiles can be skipped, with a band of classes near the threshold between.
    The targets stay uniform: many a row's target lies in a skippable tile
    (its -1 in the gradient must not be skipped with it)."""
    x, w, b, t, g = make(N, D, V, seed=seed, bias=bias)
    x[:, 0] = 1.0
    w[:, 0] = -48.0 * torch.arange(V, dtype=torch.float64) / V
    return x, w, b, t, g


def skip_slack(x, w, b, t, g, dtype, reduction, softcap=None, z_loss=0.0, ignore_index=-100, **_):
    """What skipping may change in (grad_input, grad_weight[, grad_bias]),
    elementwise. The gradient over the logits is G[i, j] = s_i cap'(z_ij)
    (p_ij (1 + 2 z_loss lse_i) - [j == t_i]) with label_smoothing 0 (s_i: the
    row's weight, cap' <= 1), so a skipped (i, j), whose p_ij is below the
    threshold, takes at most s_i |1 + 2 z_loss lse_i| p_ij out of G, and
    with it at most that times |W[j]| out of dX[i], times |x[i]| out of
    dW[j], and itself out of db[j]. Summed over every (i, j) below twice the
    threshold (a margin for the kernel's float32 logits against these float64
    ones): a bound that is V x threshold at worst and, on make_peaked's data,
    the mass of the band near the threshold: 0.1-0.2 % of the largest
    gradient for bfloat16 (0.01-0.05 % float16, 1e-7 float32), no more than
    the dtype's own rounding there, checked against an emulation of the
    skipping in float64. Dropping a target's -1 with its tile (the same
    emulation) is caught in every case that skips a tile: all but float64
    with softcap 30, whose capped logits (>= -30) stay above 2^-57."""
    xr, wr = x.to(dtype).double(), w.to(dtype).double()
    z = F.linear(xr, wr, None if b is None else b.to(dtype).double())
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse[:, None])
    counts = t != ignore_index
    if reduction == "none":
        s = g.to(dtype).double().abs()
    else:
        s = torch.full_like(lse, 1.0 / max(int(counts.sum()), 1) if reduction == "mean" else 1.0)
    s = s * counts * (1 + 2 * z_loss * lse).abs()
    small = torch.where(p < 2 * SKIP_THRESHOLD[dtype], p, 0.0) * s[:, None]
    return [small @ wr.abs(), small.t() @ xr.abs()] + ([small.sum(0)] if b is not None else [])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"softcap": 30.0}, {"z_loss": 1e-3}], ids=["plain", "softcap", "z_loss"])
@pytest.mark.parametrize("size", [(300, 72, 1000, True), (37, 130, 2053, False)], ids=str)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_blocked_skip_small_gradients_within_its_bound(dtype, reduction, options, size):
    # Not exact: each gradient within the 2x rule once skip_slack's bound is
    # taken off its error, element by element. The loss is the forward's: exact.
    N, D, V, bias = size
    x, w, b, t, g = make_peaked(N, D, V, seed=19, bias=bias)
    got = run(bigkernels.linear_cross_entropy, x, w, b, t, g, dtype, reduction, "cuda", method="blocked",
              skip_small_gradients=True, **options)
    theirs = run(torch_loss, x, w, b, t, g, dtype, reduction, "cuda", **options)
    truth = run(torch_loss, x, w, b, t, g, torch.float64, reduction, **options)
    assert_close("loss", got[0], theirs[0], truth[0])
    slack = skip_slack(x, w, b, t, g, dtype, reduction, **options)
    for name, a, th, ref, allowed in zip(["grad_input", "grad_weight", "grad_bias"], got[1:], theirs[1:], truth[1:],
                                         slack):
        assert a.shape == ref.shape and a.dtype == th.dtype, name
        ours = ((a.double() - ref).abs() - allowed).clamp(min=0).max().item()
        bound = 2 * (th.double() - ref).abs().max().item() + FLOOR[dtype] * max(1.0, ref.abs().max().item())
        assert ours <= bound, f"{name}: error beyond the skipped terms' bound {ours:.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_blocked_skip_small_gradients_is_exact_with_label_smoothing(dtype, reduction):
    # label_smoothing puts ls / V into every class's gradient: no tile is
    # small, none is skipped, and the plain 2x rule holds (as without it)
    x, w, b, t, g = make_peaked(300, 72, 1000, seed=20)
    check(x, w, b, t, g, dtype, reduction, "cuda", method="blocked", skip_small_gradients=True, label_smoothing=0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_blocked_module():
    x, w, b, t, g = make(50, 24, 300, seed=21)
    x, w, b, t = x.float().cuda(), w.float().cuda(), b.float().cuda(), t.cuda()
    blocked = bigkernels.nn.LinearCrossEntropyLoss(label_smoothing=0.1, method="blocked")
    torch.testing.assert_close(blocked(x, w, t, b), bigkernels.nn.LinearCrossEntropyLoss(label_smoothing=0.1)(x, w, t, b),
                               rtol=1e-5, atol=1e-5)


# CUDA, distillation with method="blocked": both logits a tile at a time
# (csrc/losses/cuda/), three passes over the vocabulary's tiles. The 2x rule
# against float64, every dtype (the teacher in the student's, as the method
# needs), each beta, temperature, hard term (make_distillation's 20 % of the
# rows ignored), reduction and bias pairing at least once, on sizes off the
# tile boundaries (V 1 and 7 narrower than any block). In a build without the
# CUDA kernels the PyTorch fallback runs (it ignores method): they pass too.
BLOCKED_DISTILLATION = [
    # (N, Ds, Dt, V, student bias, teacher bias, options)
    (1, 40, 72, 1000, True, True, {"beta": 0.0}),
    (65, 130, 24, 7, False, True, {"beta": 1.0, "temperature": 2.0, "hard_weight": 0.5}),
    (200, 40, 72, 129, True, False, {"beta": 0.5, "temperature": 0.5}),
    (65, 40, 72, 1, False, False, {"beta": 0.5, "hard_weight": 0.5}),
    (200, 130, 24, 1000, True, True, {"beta": 1.0, "temperature": 0.5}),
    (1, 130, 24, 129, False, True, {"beta": 0.0, "temperature": 2.0, "hard_weight": 0.5}),
]


def make_blocked_distillation(N, Ds, Dt, V, student_bias, teacher_bias, seed):
    xs, ws, bs, xt, wt, bt, t, g = make_distillation(N, Ds, Dt, V, seed=seed)
    return xs, ws, bs if student_bias else None, xt, wt, bt if teacher_bias else None, t, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", BLOCKED_DISTILLATION, ids=str)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_distillation_blocked_matches_reference(dtype, reduction, case):
    *size, options = case
    data = make_blocked_distillation(*size, seed=sum(size[:4]))
    check_distillation(data, dtype, reduction, device="cuda", method="blocked", **options)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", [BLOCKED_DISTILLATION[i] for i in (1, 2, 4)], ids=str)
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_distillation_blocked_equals_chunked(reduction, case):
    # float64: the same sums in another order (tiles, atomics), apart by
    # rounding alone, relative to each result's largest element.
    *size, options = case
    data = make_blocked_distillation(*size, seed=18)
    chunked = run_distillation(bigkernels.linear_distillation_loss, data, torch.float64, None, reduction, True, "cuda",
                               **options)
    blocked = run_distillation(bigkernels.linear_distillation_loss, data, torch.float64, None, reduction, True, "cuda",
                               method="blocked", **options)
    names = ["loss", "grad_student_input", "grad_student_weight", "grad_student_bias"]
    for name, a, c in zip(names, blocked, chunked):
        error = (a - c).abs().max().item() if a.numel() else 0.0
        assert error <= 1e-12 * max(1.0, c.abs().max().item() if c.numel() else 0.0), \
            f"{name}: blocked and chunked {error:.3g} apart"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_distillation_blocked_empty_and_all_ignored():
    for reduction in ("mean", "sum", "none"):
        for N, ignored, use_target in ((0, 0.0, True), (0, 0.0, False), (6, 1.0, True)):
            data = make_distillation(N, 8, 12, 11, ignored=ignored)
            got = run_distillation(bigkernels.linear_distillation_loss, data, torch.float32, None, reduction,
                                   use_target, "cuda", method="blocked", beta=0.5, hard_weight=0.5 * use_target)
            assert got[0].shape == ((N,) if reduction == "none" else ())
            assert all((a == 0).all() for a in got)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_distillation_blocked_dtypes_module_and_opcheck():
    xs, ws, bs, xt, wt, bt, t, g = (a.cuda() for a in make_distillation(50, 24, 40, 300, seed=21))
    # the teacher in another dtype: refused, by the front and by the op
    with pytest.raises(TypeError, match=r"needs the teacher in the student's dtype \(bfloat16\), got teacher_input "
                                        r"float32"):
        bigkernels.linear_distillation_loss(xs.bfloat16(), ws.bfloat16(), xt.float(), wt.float(), t, method="blocked")
    if BUILD_INFO["cuda_compiled"]:
        with pytest.raises(TypeError, match="needs the teacher in the student's dtype"):
            torch.ops.bigkernels.linear_distillation_loss(xs.bfloat16(), ws.bfloat16(), xt.float(), wt.float(), t,
                                                          None, None, 1.0, 0.0, 0.0, -100, "mean", 0, "blocked")
    # under autocast both sides are cast alike: accepted
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = bigkernels.linear_distillation_loss(xs.float(), ws.float(), xt.float(), wt.float(), t,
                                                   method="blocked")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    xs, ws, bs, xt, wt, bt = (a.float() for a in (xs, ws, bs, xt, wt, bt))
    options = dict(temperature=2.0, beta=0.5, hard_weight=0.3)
    blocked = bigkernels.nn.LinearDistillationLoss(method="blocked", **options)
    torch.testing.assert_close(blocked(xs, ws, xt, wt, t, bs, bt),
                               bigkernels.nn.LinearDistillationLoss(**options)(xs, ws, xt, wt, t, bs, bt),
                               rtol=1e-5, atol=1e-5)
    if not BUILD_INFO["cuda_compiled"]:
        return
    for reduction in ("mean", "none"):
        args = (xs.detach().requires_grad_(), ws.detach().requires_grad_(), xt, wt, t, bs.detach().requires_grad_(),
                bt, 2.0, 0.5, 0.5, -100, reduction, 0, "blocked")
        torch.library.opcheck(torch.ops.bigkernels.linear_distillation_loss, args)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.bigkernels.linear_distillation_loss_forward,
                              (*plain[:11], "sum", 0, "blocked", None, [True, True, True]))
        torch.library.opcheck(torch.ops.bigkernels.linear_distillation_loss_forward,
                              (*plain[:11], "none", 0, "blocked", g.float(), [True, True, True]))
