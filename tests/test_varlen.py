"""bigkernels.varlen_attention against a float64 reference built from plain
per-sequence attention (reference.varlen_attention): forward, lse and every
gradient under the 2x rule; empty sequences, lengths 1..2k, queries and keys
of different lengths (bottom-right), GQA/MQA, causal, windows, softcap,
ALiBi, dropout; gradcheck, compile, opcheck, and the errors."""

import pytest
import torch

import bigkernels
from bigkernels import reference
from conftest import HAS_CUDA, assert_close

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def make_case(lens_q, lens_k=None, H=4, Hkv=2, D=16, Dv=None, seed=0):
    """float64 q, k, v, the output's gradient, and cu_seqlens for these lengths."""
    gen = torch.Generator().manual_seed(seed)
    lens_k = lens_q if lens_k is None else lens_k
    Dv = Dv or D
    Tq, Tk = sum(lens_q), sum(lens_k)
    return dict(q=torch.randn(Tq, H, D, generator=gen, dtype=torch.float64),
                k=torch.randn(Tk, Hkv, D, generator=gen, dtype=torch.float64),
                v=torch.randn(Tk, Hkv, Dv, generator=gen, dtype=torch.float64),
                grad=torch.randn(Tq, H, Dv, generator=gen, dtype=torch.float64),
                cu_q=cu(lens_q), cu_k=cu(lens_k), max_q=max(lens_q, default=0), max_k=max(lens_k, default=0))


def feature_kwargs(feature, B, H, seed=0):
    gen = torch.Generator().manual_seed(seed + 1)
    return {
        "plain": {},
        "causal": dict(causal=True),
        "window": dict(window=(5, 2)),
        "causal_window": dict(causal=True, window=(9, -1)),
        "softcap": dict(softcap=1.5),
        "alibi": dict(alibi_slopes=torch.rand(H, generator=gen)),
        "causal_softcap_alibi_per_sequence": dict(causal=True, softcap=2.0,
                                                  alibi_slopes=torch.rand(B, H, generator=gen)),
    }[feature]


def run(fn, case, dtype, kw):
    """fn's output, lse and q, k, v gradients for the case's tensors in dtype."""
    leaves = [case[n].to(dtype).requires_grad_() for n in ("q", "k", "v")]
    if kw.get("alibi_slopes") is not None:  # (float32, float64 for float64, as flash-attention takes them)
        kw = dict(kw, alibi_slopes=kw["alibi_slopes"].to(torch.float64 if dtype == torch.float64 else torch.float32))
    out, lse = fn(*leaves, case, **kw)
    out.backward(case["grad"].to(dtype))
    return [out.detach(), lse] + [t.grad for t in leaves]


def ours(q, k, v, case, **kw):
    return bigkernels.varlen_attention(q, k, v, case["cu_q"], case["cu_k"], case["max_q"], case["max_k"],
                                       return_lse=True, **kw)


def per_sequence(q, k, v, case, causal=False, window=(-1, -1), **kw):
    return reference.varlen_attention(q, k, v, case["cu_q"], case["cu_k"], q.shape[-1] ** -0.5, causal, window, **kw)


def check(case, dtype, **kw):
    got = run(ours, case, dtype, kw)
    theirs = run(per_sequence, case, dtype, kw)
    exact = run(per_sequence, case, torch.float64, kw)
    for name, a, t, r in zip(("output", "lse", "grad_q", "grad_k", "grad_v"), got, theirs, exact):
        if name == "lse":  # -inf exactly where a row attends to nothing; else close
            finite = torch.isfinite(r)
            assert torch.equal(finite, torch.isfinite(a)), "lse: -inf where the reference has none, or the reverse"
            a, t, r = a[finite], t[finite], r[finite]
        assert_close(name, a, t, r)


# every kind of sequence: empty, one row, a block and a bit, several blocks
LENGTHS = {
    "mixed": ([5, 0, 70, 1, 129, 17], None),
    "keys_longer": ([3, 1, 40, 0, 20], [9, 130, 40, 6, 0]),  # bottom-right: queries are the last keys
    "queries_longer": ([12, 65], [4, 64]),  # causal rows before the first key see nothing
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", ["plain", "causal", "window", "causal_window", "softcap", "alibi",
                                     "causal_softcap_alibi_per_sequence"])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=str)
def test_matches_per_sequence_reference(dtype, feature, lengths):
    lens_q, lens_k = LENGTHS[lengths]
    case = make_case(lens_q, lens_k, seed=len(feature))
    check(case, dtype, **feature_kwargs(feature, len(lens_q), 4))


@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2), (4, 1)], ids=str)
def test_gqa_and_mqa(H, Hkv):
    check(make_case([33, 1, 80], H=H, Hkv=Hkv, D=24, Dv=8), torch.float32, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_sequences_up_to_2k(dtype):
    lens = [2048, 1, 700, 0, 1500, 64]
    check(make_case(lens, H=2, Hkv=1, D=32, seed=3), dtype, causal=True)


def test_decoding_shaped_sequences_split_their_keys():
    """One query against thousands of keys per sequence: the keys are split over the threads and combined."""
    check(make_case([1, 1, 2, 1], [3000, 1200, 2100, 5], H=8, Hkv=2, D=32, seed=4), torch.float32, causal=True)


def test_same_as_batched_attention_for_equal_lengths():
    """Sequences of one length: the batched [B, H, L, D] call, row for row."""
    B, L, H, D = 3, 37, 4, 16
    case = make_case([L] * B, H=H, Hkv=H, D=D, seed=5)
    out = bigkernels.varlen_attention(case["q"].float(), case["k"].float(), case["v"].float(), case["cu_q"],
                                      case["cu_k"], L, L, causal=True)
    batched = bigkernels.scaled_dot_product_attention(
        *(case[n].float().view(B, L, H, D).transpose(1, 2) for n in ("q", "k", "v")), is_causal=True)
    torch.testing.assert_close(out, batched.transpose(1, 2).reshape(B * L, H, D), rtol=1e-6, atol=1e-6)


def test_strided_inputs_are_read_in_place():
    """q, k, v as views of one packed qkv projection [total, 3, H, D]."""
    case = make_case([20, 7, 41], H=4, Hkv=4, D=16, seed=6)
    qkv = torch.stack([case["q"], case["k"], case["v"]], dim=1).float()
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    out = bigkernels.varlen_attention(q, k, v, case["cu_q"], case["cu_k"], case["max_q"], case["max_k"])
    want = bigkernels.varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), case["cu_q"], case["cu_k"],
                                       case["max_q"], case["max_k"])
    assert torch.equal(out, want)


def test_gradients_are_deterministic():
    case = make_case([90, 3, 200, 17, 64], seed=7)
    grads = []
    for _ in range(2):
        got = run(ours, case, torch.float32, dict(causal=True))
        grads.append(got[2:])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_int64_cu_seqlens_and_tensor_max_seqlens():
    case = make_case([4, 9], seed=8)
    a = bigkernels.varlen_attention(case["q"], case["k"], case["v"], case["cu_q"].long(), case["cu_k"].long(),
                                    torch.tensor(9), torch.tensor(9, dtype=torch.int32))
    b = bigkernels.varlen_attention(case["q"], case["k"], case["v"], case["cu_q"], case["cu_k"], 9, 9)
    assert torch.equal(a, b)


@pytest.mark.parametrize("feature", ["plain", "causal", "causal_softcap_alibi_per_sequence"])
def test_gradcheck(feature):
    case = make_case([3, 0, 5, 1], [4, 2, 5, 0], H=2, Hkv=1, D=4, Dv=3, seed=9)
    kw = feature_kwargs(feature, 4, 2)
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = kw["alibi_slopes"].double()
    inputs = tuple(case[n].clone().requires_grad_() for n in ("q", "k", "v"))

    def fn(q, k, v):
        return bigkernels.varlen_attention(q, k, v, case["cu_q"], case["cu_k"], 5, 5, **kw)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_with_dropout():
    case = make_case([3, 6, 2], H=2, Hkv=2, D=4, seed=10)
    inputs = tuple(case[n].clone().requires_grad_() for n in ("q", "k", "v"))

    def fn(q, k, v):
        torch.manual_seed(7)  # the same mask at every evaluation
        return bigkernels.varlen_attention(q, k, v, case["cu_q"], case["cu_k"], 6, 6, dropout_p=0.3, causal=True)

    assert torch.autograd.gradcheck(fn, inputs)


def kernel_dropout_masks(lens_q, lens_k, H, p, seed):
    """The kept-and-scaled masks the kernel draws, one [H, L_b, S_b] per
    sequence, read back through the kernel: with q = k = 0 every probability
    is 1 / S_b, and with V's rows the identity's, output row i is mask[i] / S_b."""
    S_max = max(lens_k)
    q = torch.zeros(sum(lens_q), H, 4, dtype=torch.float64)
    k = torch.zeros(sum(lens_k), H, 4, dtype=torch.float64)
    v = torch.cat([torch.eye(S, S_max, dtype=torch.float64) for S in lens_k])[:, None, :].expand(-1, H, -1)
    out, _ = torch.ops.bigkernels.varlen_attention_forward(q, k, v.contiguous(), cu(lens_q), cu(lens_k), max(lens_q),
                                                            S_max, 1.0, -1, -1, p, seed, 0.0, None)
    starts = cu(lens_q).tolist()
    return [out[starts[b]:starts[b + 1], :, :S].transpose(0, 1) * S for b, S in enumerate(lens_k)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_matches_reference_with_the_same_masks(dtype):
    lens_q, lens_k, H, p, seed = [9, 30, 1], [12, 30, 70], 2, 0.3, 99
    masks = kernel_dropout_masks(lens_q, lens_k, H, p, seed)
    keep = [m > 0 for m in masks]
    kept = torch.cat([k.flatten() for k in keep]).double().mean().item()
    assert abs(kept - (1 - p)) < 0.03
    assert all(torch.allclose(m[k], torch.tensor(1 / (1 - p), dtype=torch.float64)) for m, k in zip(masks, keep))
    # the sequences' masks differ (each has its own counters)
    assert not torch.equal(keep[1][:, :9, :12], keep[0])
    case = make_case(lens_q, lens_k, H=H, Hkv=H, seed=11)

    def ours_with_seed(q, k, v, case):
        return torch.ops.bigkernels.varlen_attention_forward(q, k, v, case["cu_q"], case["cu_k"], case["max_q"],
                                                             case["max_k"], 16 ** -0.5, -1, 0, p, seed, 0.0, None)

    def with_masks(q, k, v, case):
        return per_sequence(q, k, v, case, causal=True, dropout_masks=keep, dropout_p=p)

    got = run(ours_with_seed, case, dtype, {})
    theirs = run(with_masks, case, dtype, {})
    exact = run(with_masks, case, torch.float64, {})
    for name, a, t, r in zip(("output", "lse", "grad_q", "grad_k", "grad_v"), got, theirs, exact):
        if name != "lse":
            assert_close(name, a, t, r)


def test_dropout_same_seed_same_result():
    case = make_case([16, 5], seed=12)
    args = (case["q"].float(), case["k"].float(), case["v"].float(), case["cu_q"], case["cu_k"], 16, 16)
    torch.manual_seed(3)
    a = bigkernels.varlen_attention(*args, dropout_p=0.3)
    torch.manual_seed(3)
    b = bigkernels.varlen_attention(*args, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, bigkernels.varlen_attention(*args))


def test_compile_fullgraph_and_opcheck():
    torch._dynamo.reset()
    case = make_case([5, 0, 19], seed=13)
    q, k, v = (case[n].float().requires_grad_() for n in ("q", "k", "v"))

    def fn(q, k, v, cu_q, cu_k):
        return bigkernels.varlen_attention(q, k, v, cu_q, cu_k, 19, 19, causal=True, softcap=3.0)

    want = fn(q, k, v, case["cu_q"], case["cu_k"])
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, case["cu_q"], case["cu_k"])
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g))
    args = (q.detach(), k.detach(), v.detach(), case["cu_q"], case["cu_k"], 19, 19, 0.25, -1, 0)
    torch.library.opcheck(torch.ops.bigkernels.varlen_attention_forward,
                          args + (0.0, 0, 2.0, torch.rand(4)))
    out, lse = torch.ops.bigkernels.varlen_attention_forward(*args, 0.0, 0, 0.0, None)
    torch.library.opcheck(torch.ops.bigkernels.varlen_attention_backward,
                          (torch.randn_like(out),) + args[:7] + (out, lse) + args[7:] + (0.0, 0, 0.0, None))


def test_meta_tensors():
    q = torch.empty(30, 4, 16, device="meta", requires_grad=True)
    k, v = torch.empty(40, 2, 16, device="meta"), torch.empty(40, 2, 8, device="meta")
    cu_q = torch.empty(4, dtype=torch.int32, device="meta")
    out, lse = bigkernels.varlen_attention(q, k, v, cu_q, cu_q, 10, 20, return_lse=True)
    assert out.shape == (30, 4, 8) and lse.shape == (4, 30) and out.device.type == "meta"
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_no_sequences_or_no_rows():
    q, k = torch.randn(0, 4, 8, requires_grad=True), torch.randn(0, 2, 8, requires_grad=True)
    out = bigkernels.varlen_attention(q, k, k, cu([]), cu([]), 0, 0)
    assert out.shape == (0, 4, 8)
    # keys but no queries: the keys' gradients are zeros
    k = torch.randn(6, 2, 8, requires_grad=True)
    out = bigkernels.varlen_attention(q, k, k, cu([0, 0]), cu([2, 4]), 0, 4)
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))


def errors_case():
    case = make_case([3, 5], H=4, Hkv=2, D=8)
    return [case["q"].float(), case["k"].float(), case["v"].float(), case["cu_q"], case["cu_k"], 5, 5]


@pytest.mark.parametrize("change,match", [
    (lambda a, kw: (a.__setitem__(3, torch.tensor([0, 5, 3, 8], dtype=torch.int32)),
                    a.__setitem__(4, torch.tensor([0, 3, 5, 8], dtype=torch.int32))), "must not decrease"),
    (lambda a, kw: a.__setitem__(3, torch.tensor([0, 3, 7], dtype=torch.int32)), r"cu_seqlens_q must run from 0 "
                                                                                 r"to the packed rows \(8\)"),
    (lambda a, kw: a.__setitem__(4, torch.tensor([1, 3, 8], dtype=torch.int32)), "cu_seqlens_k must run from 0"),
    (lambda a, kw: a.__setitem__(3, torch.tensor([0.0, 3.0, 8.0])), "cu_seqlens_q must be an int32"),
    (lambda a, kw: a.__setitem__(4, torch.tensor([0, 8], dtype=torch.int32)), "one entry per sequence"),
    (lambda a, kw: a.__setitem__(3, torch.zeros(1, 3, dtype=torch.int32)), r"must be 1-d \[sequences \+ 1\]"),
    (lambda a, kw: a.__setitem__(5, 4), "sequence 1 has 5 rows but max_seqlen_q is 4"),
    (lambda a, kw: a.__setitem__(6, 2), "max_seqlen_k is 2"),
    (lambda a, kw: a.__setitem__(5, -1), "max_seqlen_q must be an int >= 0"),
    (lambda a, kw: a.__setitem__(6, 2.5), "max_seqlen_k must be an int"),
    (lambda a, kw: a.__setitem__(1, a[1].double()), "k dtype"),
    (lambda a, kw: a.__setitem__(0, a[0][None]), "q must be 3-d"),
    (lambda a, kw: a.__setitem__(0, torch.randn(8, 3, 8)), "multiple of k's 2"),
    (lambda a, kw: a.__setitem__(0, torch.randn(8, 4, 6)), "head dim 8 does not match q's 6"),
    (lambda a, kw: a.__setitem__(2, torch.randn(7, 2, 8)), "must have k's"),
    (lambda a, kw: kw.update(dropout_p=1.0), r"dropout_p must be a number in \[0, 1\)"),
    (lambda a, kw: kw.update(softcap=-1.0), "softcap must be"),
    (lambda a, kw: kw.update(alibi_slopes=torch.rand(3, 4)), r"alibi_slopes must be \[H\] = \[4\] or \[B, H\] = "
                                                             r"\[2, 4\]"),
    (lambda a, kw: kw.update(window=(1,)), "window must be a pair"),
    (lambda a, kw: kw.update(causal=1), "causal must be a bool"),
    (lambda a, kw: kw.update(softmax_scale="x"), "softmax_scale must be a number"),
])
def test_bad_input_names_the_argument(change, match):
    args, kw = errors_case(), {}
    change(args, kw)
    with pytest.raises((TypeError, ValueError), match=match):
        bigkernels.varlen_attention(*args, **kw)


def test_the_op_checks_values_itself():
    """Called directly (no Python front), the op refuses bad cu_seqlens too."""
    q, k, v, cu_q, cu_k, _, _ = errors_case()
    op = torch.ops.bigkernels.varlen_attention_forward
    with pytest.raises(ValueError, match=r"cu_seqlens_k must not decrease, but cu_seqlens_k\[2\] = 8 < "
                                         r"cu_seqlens_k\[1\] = 9"):
        op(q, k, v, cu_q, torch.tensor([0, 9, 8]), 5, 9, 1.0, -1, -1, 0.0, 0, 0.0, None)
    with pytest.raises(ValueError, match="one entry per sequence"):
        op(q, k, v, cu_q, torch.tensor([0, 8]), 5, 8, 1.0, -1, -1, 0.0, 0, 0.0, None)
    with pytest.raises(ValueError, match="max_seqlen_q is 4"):
        op(q, k, v, cu_q, cu_k, 4, 5, 1.0, -1, -1, 0.0, 0, 0.0, None)


def test_double_backward_is_refused():
    case = make_case([3, 4], seed=14)
    q = case["q"].requires_grad_()
    out = bigkernels.varlen_attention(q, case["k"], case["v"], case["cu_q"], case["cu_k"], 4, 4)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_pytorch_path_without_the_kernel(monkeypatch):
    """The path CUDA tensors take until a CUDA kernel exists (the checks in
    PyTorch, then reference.varlen_attention), run here."""
    monkeypatch.setattr(bigkernels._ext, "LOADED", False)
    case = make_case([5, 0, 20], [7, 3, 20], seed=15)
    check(case, torch.float32, causal=True, softcap=2.0)
    args = errors_case()
    args[3], args[4] = torch.tensor([0, 5, 3, 8], dtype=torch.int32), torch.tensor([0, 3, 5, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="must not decrease"):
        bigkernels.varlen_attention(*args)
    args = errors_case()
    args[5] = 4
    with pytest.raises(ValueError, match="max_seqlen_q is 4"):
        bigkernels.varlen_attention(*args)


CUDA_KERNELS = HAS_CUDA and bigkernels.backend_info()["cuda_compiled"]


def on_cuda(case):
    return {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in case.items()}


def cpu_of(results):
    return [t.cpu() for t in results]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_KERNELS, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("feature", ["plain", "causal", "causal_window", "causal_softcap_alibi_per_sequence"])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=str)
def test_cuda_matches_per_sequence_reference(dtype, feature, lengths):
    """The CUDA kernels, a sequence per batch index, under the same checks (fp16/bf16 need sm_80+)."""
    if dtype != torch.float32 and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("fp16/bf16 run on tensor cores (sm_80+)")
    lens_q, lens_k = LENGTHS[lengths]
    case = make_case(lens_q, lens_k, D=64, seed=len(feature))
    kw = feature_kwargs(feature, len(lens_q), 4)
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = kw["alibi_slopes"].cuda()
    got = cpu_of(run(ours, on_cuda(case), dtype, kw))
    theirs = run(per_sequence, case, dtype, {n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in kw.items()})
    exact = run(per_sequence, case, torch.float64, {n: v.cpu() if isinstance(v, torch.Tensor) else v
                                                    for n, v in kw.items()})
    for name, a, t, r in zip(("output", "lse", "grad_q", "grad_k", "grad_v"), got, theirs, exact):
        if name == "lse":
            finite = torch.isfinite(r)
            assert torch.equal(finite, torch.isfinite(a))
            a, t, r = a[finite], t[finite], r[finite]
        assert_close(name, a, t, r)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_KERNELS, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_dropout_matches_the_cpu_masks():
    """The same seed drops the same elements on both devices (the counters of each sequence)."""
    lens_q, lens_k, H, p, seed = [9, 30, 1], [12, 30, 70], 2, 0.3, 99
    cpu = kernel_dropout_masks(lens_q, lens_k, H, p, seed)
    S_max = max(lens_k)
    q = torch.zeros(sum(lens_q), H, 8, dtype=torch.float32, device="cuda")
    k = torch.zeros(sum(lens_k), H, 8, dtype=torch.float32, device="cuda")
    v = torch.cat([torch.eye(S, S_max) for S in lens_k])[:, None, :].expand(-1, H, -1).contiguous().cuda()
    out, _ = torch.ops.bigkernels.varlen_attention_forward(q, k, v, cu(lens_q).cuda(), cu(lens_k).cuda(),
                                                            max(lens_q), S_max, 1.0, -1, -1, p, seed, 0.0, None)
    starts = cu(lens_q).tolist()
    for b, S in enumerate(lens_k):
        got = out[starts[b]:starts[b + 1], :, :S].transpose(0, 1).cpu().double() * S
        torch.testing.assert_close(got > 0, cpu[b] > 0)
