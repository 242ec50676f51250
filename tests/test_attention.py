"""bigkernels' scaled_dot_product_attention against a float64 reference:
forward, lse and every gradient, with F.scaled_dot_product_attention's
semantics (and flash-attention's extras), on the CPU kernels; the CUDA ones
are held to the same checks by test_attention_cuda.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bigkernels import reference
from bigkernels.ops.attention import scaled_dot_product_attention as attention
from conftest import assert_close

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def make_inputs(B, Hq, Hkv, L, S, E, Ev, seed, logit_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=gen, dtype=torch.float64) * logit_scale
    k = torch.randn(B, Hkv, S, E, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, Ev, generator=gen, dtype=torch.float64)
    grad = torch.randn(B, Hq, L, Ev, generator=gen, dtype=torch.float64)
    return q, k, v, grad


def feature_kwargs(feature, B, L, S, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    if feature == "causal":
        return dict(is_causal=True)
    if feature == "causal_bottom_right":
        return dict(is_causal=True, causal_align="bottom_right")
    if feature == "window":
        return dict(window=(7, 3))
    if feature == "softcap":  # Gemma 2's: small enough to bend the scores
        return dict(softcap=1.5)
    if feature == "alibi":  # per head
        return dict(alibi_slopes=torch.rand(2, generator=gen, dtype=torch.float64))
    if feature == "softcap_alibi_causal":  # per batch, bottom-right (flash-attention's position)
        return dict(softcap=2.0, alibi_slopes=torch.rand(B, 2, generator=gen, dtype=torch.float64), is_causal=True,
                    causal_align="bottom_right")
    if feature == "key_padding":  # [B, 1, 1, S], never expanded
        return dict(attn_mask=torch.rand(B, 1, 1, S, generator=gen) > 0.3)
    if feature == "float_mask":
        return dict(attn_mask=torch.randn(L, S, generator=gen, dtype=torch.float64))
    if feature == "window_padding_rows":  # the shared mask row and a window in one block
        return dict(feature_kwargs("padding_rows", B, L, S, seed), window=(7, 3))
    if feature in ("padding_rows", "float_padding_rows"):
        # a padding mask as Hugging Face hands it over: [B, 1, L, S] with equal rows,
        # but for one row of the first sequence (the kernel compares rows per task)
        if feature == "padding_rows":
            mask = torch.rand(B, 1, 1, S, generator=gen) > 0.3
        else:
            mask = torch.randn(B, 1, 1, S, generator=gen, dtype=torch.float64)
        mask = mask.expand(B, 1, L, S).contiguous()
        mask[0, 0, L // 2, 0] = True if feature == "padding_rows" else 5.0
        return dict(attn_mask=mask)
    return {}


def run(fn, tensors, grad, dtype, kwargs, device="cpu"):
    """fn's output and input gradients (on the CPU) for float64 tensors cast to dtype on device."""
    leaves = [t.to(device, dtype).detach().requires_grad_() for t in tensors]
    # ALiBi's slopes stay float32 (float64 for float64), as flash-attention takes them
    cast = {"alibi_slopes": torch.float64 if dtype == torch.float64 else torch.float32}
    kwargs = {k: (v.to(device, cast.get(k, dtype) if v.is_floating_point() else v.dtype)
                  if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    out = fn(*leaves, **kwargs)
    out.backward(grad.to(device, dtype))
    return [t.cpu() for t in [out.detach()] + [t.grad for t in leaves]]


def ours(q, k, v, **kw):
    return attention(q, k, v, enable_gqa=True, **kw)


def torch_same_dtype(q, k, v, **kw):
    # what PyTorch users run: SDPA where it has the feature, else the reference in this dtype
    if "softcap" in kw or "alibi_slopes" in kw:
        return reference.scaled_dot_product_attention(q, k, v, kw.pop("attn_mask", None), enable_gqa=True, **kw)[0]
    if "window" in kw or kw.get("causal_align") == "bottom_right":
        mask = reference.attention_allowed(q.shape[-2], k.shape[-2], kw.pop("is_causal", False),
                                           kw.pop("causal_align", "top_left"), kw.pop("window", None))
        if "attn_mask" in kw:
            mask = mask & kw.pop("attn_mask")
        return reference.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)[0]
    try:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    except RuntimeError as e:
        # torch's CPU flash kernel packs bf16 for AMX/AVX-512 VNNI even when ATEN_CPU_CAPABILITY
        # lowers the ISA, and refuses ("pack_vnni2 is only supported when avx512 is supported") on
        # hosts that have AMX; its math kernel is what such a torch can run
        if "pack_vnni2" not in str(e):
            raise
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)


def exact(q, k, v, **kw):
    return reference.scaled_dot_product_attention(q, k, v, kw.pop("attn_mask", None), enable_gqa=True, **kw)[0]


def check(dtype, feature, B=2, Hq=2, Hkv=2, L=17, S=17, E=16, Ev=16, seed=0, logit_scale=1.0, device="cpu"):
    if feature == "gqa":
        Hq, Hkv = 4, 2
    q, k, v, grad = make_inputs(B, Hq, Hkv, L, S, E, Ev, seed, logit_scale)
    kw = feature_kwargs(feature, B, L, S, seed)
    if feature == "three_d":
        q, k, v, grad = q[:, 0], k[:, 0], v[:, 0], grad[:, 0]
    got = run(ours, (q, k, v), grad, dtype, kw, device)
    theirs = run(torch_same_dtype, (q, k, v), grad, dtype, kw, device)
    truth = run(exact, (q, k, v), grad, torch.float64, kw)
    for name, a, t, r in zip(("output", "grad_query", "grad_key", "grad_value"), got, theirs, truth):
        assert_close(name, a, t, r)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", ["plain", "causal", "causal_bottom_right", "window", "key_padding",
                                     "float_mask", "padding_rows", "float_padding_rows", "window_padding_rows", "gqa",
                                     "three_d", "softcap", "alibi", "softcap_alibi_causal"])
@pytest.mark.parametrize("L,S", [(1, 1), (17, 17), (113, 203), (127, 65), (70, 1)], ids=str)
def test_matches_reference(dtype, feature, L, S):
    check(dtype, feature, L=L, S=S)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,Ev", [(8, 8), (40, 24), (64, 64), (128, 96)], ids=str)
def test_head_dims(dtype, E, Ev):
    check(dtype, "causal", L=67, S=131, E=E, Ev=Ev, seed=E)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,Ev", [(20, 13), (40, 24), (128, 96)], ids=str)
@pytest.mark.parametrize("L", [1, 3], ids=str)
def test_decoding_head_dims(dtype, E, Ev, L):
    # fewer rows than a vector: K and V read in place (bf16/fp16 widened in
    # registers), head dims that end mid-vector included
    check(dtype, "gqa", L=L, S=150, E=E, Ev=Ev, seed=E + L)


def test_long_sequence_several_blocks_both_ways():
    check(torch.float32, "window", L=300, S=500, seed=3)
    check(torch.bfloat16, "key_padding", B=1, L=260, S=390, seed=4)
    check(torch.bfloat16, "window", L=300, S=600, seed=5)  # bf16 packs keys in blocks the window starts inside
    check(torch.bfloat16, "causal", Hq=4, Hkv=2, L=130, S=530, E=40, Ev=24, seed=6)


# Sums over many rows (issue 16 §4): dK and dV add up every query of a GQA
# group (heads x positions), the output every key. FLOOR's 1e-5 of the scale
# would hide an error several times torch's (its own is ~1e-7 of the scale):
# the floor here is one float ulp of the scale.
SUM_FLOOR = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("Hq,Hkv,L,S,causal", [(8, 2, 1024, 1024, False), (8, 1, 1024, 1024, True),
                                               (4, 2, 256, 2048, False)], ids=str)
def test_gqa_gradients_over_long_sequences(Hq, Hkv, L, S, causal):
    q, k, v, grad = make_inputs(1, Hq, Hkv, L, S, 64, 64, seed=L + S)
    kw = dict(is_causal=True) if causal else {}
    got = run(ours, (q, k, v), grad, torch.float32, kw)
    theirs = run(torch_same_dtype, (q, k, v), grad, torch.float32, kw)
    truth = run(exact, (q, k, v), grad, torch.float64, kw)
    for name, a, t, r in zip(("output", "grad_query", "grad_key", "grad_value"), got, theirs, truth):
        assert_close(name, a, t, r, floor=SUM_FLOOR)


@pytest.mark.parametrize("L", [5, 64], ids=str)
@pytest.mark.parametrize("logit_scale", [1.0, 30.0], ids=str)
def test_softmax_over_a_single_key(L, logit_scale):
    # one key: its probability is exactly 1 whatever its score, so the output
    # is v itself, dV the sum of dO over the group, and the exact dQ and dK are 0
    q, k, v, grad = make_inputs(2, 4, 2, L, 1, 32, 32, seed=9, logit_scale=logit_scale)
    got = run(ours, (q, k, v), grad, torch.float32, {})
    theirs = run(torch_same_dtype, (q, k, v), grad, torch.float32, {})
    truth = run(exact, (q, k, v), grad, torch.float64, {})
    assert torch.equal(got[0], v.float().repeat_interleave(2, dim=1).expand(-1, -1, L, -1))
    for name, a, t, r in zip(("grad_query", "grad_key", "grad_value"), got[1:], theirs[1:], truth[1:]):
        assert_close(name, a, t, r, floor=SUM_FLOOR)


def test_key_padding_that_masks_whole_blocks():
    # the second sequence keeps 10 of 200 keys: its later key blocks are skipped, not computed
    q, k, v, grad = make_inputs(2, 2, 2, 150, 200, 16, 16, seed=24)
    mask = torch.ones(2, 1, 1, 200, dtype=torch.bool)
    mask[1, ..., 10:] = False
    got = run(ours, (q, k, v), grad, torch.float32, dict(attn_mask=mask))
    want = run(exact, (q, k, v), grad, torch.float64, dict(attn_mask=mask))
    for a, r in zip(got, want):
        torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L", [1, 70], ids=lambda L: f"L{L}")
def test_scores_that_grow_along_the_keys(dtype, L):
    # The online softmax keeps a row's shift until a block's max exceeds it by more than
    # kLazyRescale (8): scores that climb slowly (less than that per block) and then jump
    # (more) take both branches, in the layouts by rows (L 1; bf16 packed) and transposed.
    B, H, S, E = 1, 2, 600, 32
    q, k, v, grad = make_inputs(B, H, H, L, S, E, E, seed=9)
    u = torch.zeros(E, dtype=torch.float64)
    u[0] = 1.0
    climb = torch.linspace(0, 3, S, dtype=torch.float64)
    climb[400:] += 4  # a jump of 12 in the scores below
    k = k + climb[:, None] * u
    q = q.clone()
    q[..., 0] = 3 * math.sqrt(E)  # score(i, j) ~ 3 * climb(j) + noise: up to ~21 over the keys
    got = run(ours, (q, k, v), grad, dtype, {})
    theirs = run(torch_same_dtype, (q, k, v), grad, dtype, {})
    truth = run(exact, (q, k, v), grad, torch.float64, {})
    for name, a, t, r in zip(("output", "grad_query", "grad_key", "grad_value"), got, theirs, truth):
        assert_close(name, a, t, r)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_scale_with_large_logits(dtype):
    # A negative scale reverses the scores' order: the softmax's max must be
    # taken of the scaled scores (the packed bf16 path once took scale * max,
    # the smallest, and overflowed at scores this far apart).
    q, k, v, grad = make_inputs(2, 2, 2, 40, 300, 16, 16, seed=11, logit_scale=60.0)
    kw = dict(scale=-0.25)
    got = run(ours, (q, k, v), grad, dtype, kw)
    theirs = run(torch_same_dtype, (q, k, v), grad, dtype, kw)
    truth = run(exact, (q, k, v), grad, torch.float64, kw)
    for name, a, t, r in zip(("output", "grad_query", "grad_key", "grad_value"), got, theirs, truth):
        assert_close(name, a, t, r)


def test_large_logits_stay_finite():
    # scores of order +-1e4: the online softmax must not overflow
    check(torch.float32, "causal", L=40, S=40, E=16, logit_scale=2500.0)


def test_strided_inputs():
    # Hugging Face passes [B, L, H, D] tensors transposed to [B, H, L, D]
    q, k, v, grad = make_inputs(2, 3, 3, 33, 47, 16, 8, seed=5)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    got = run(ours, (qt, kt, vt), grad, torch.float32, {})
    want = run(exact, (q, k, v), grad, torch.float64, {})
    for a, r in zip(got, want):
        torch.testing.assert_close(a.double(), r, atol=1e-5, rtol=1e-5)


# bf16 training shapes in Hugging Face's [B, L, H, D] layout: with AMX or
# AVX512-BF16 the forward and the backward run on ATen's BLAS micro-kernel
# (operands packed in pairs of rows, P and dS rounded to bf16), reading Q, K,
# V, O and dO through their strides; an odd head dim takes the float path
# (the forward's packing needs E even, the backward's E and Ev). Odd query
# and key counts pad the packed blocks.
@pytest.mark.parametrize("E,Ev", [(32, 16), (40, 13), (13, 24)], ids=str)
@pytest.mark.parametrize("feature", ["plain", "key_padding", "causal", "padding_rows"])
def test_bf16_training_shapes_in_hugging_face_layout(E, Ev, feature):
    B, Hq, Hkv, L, S = 2, 4, 2, 37, 83
    q, k, v, grad = make_inputs(B, Hq, Hkv, L, S, E, Ev, seed=E + Ev)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    kw = feature_kwargs(feature, B, L, S, seed=E)
    got = run(ours, (q, k, v), grad, torch.bfloat16, kw)
    theirs = run(torch_same_dtype, (q, k, v), grad, torch.bfloat16, kw)
    truth = run(exact, (q, k, v), grad, torch.float64, kw)
    for name, a, t, r in zip(("output", "grad_query", "grad_key", "grad_value"), got, theirs, truth):
        assert_close(name, a, t, r)


# Decoding and short prefills against long caches: the forward packs a GQA
# group's heads into one task (dot-product scores below a vector's worth of
# rows, transposed scores above) and splits the keys across threads when
# there are few tasks (S >= 1024 here splits them in 2-4), then combines.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", ["plain", "causal_bottom_right", "window", "key_padding", "head_mask"])
@pytest.mark.parametrize("Hq,Hkv,L", [(8, 2, 1), (8, 1, 3), (4, 4, 1), (16, 2, 5)], ids=str)
def test_decoding_against_long_caches(dtype, feature, Hq, Hkv, L):
    B, S = 1, 2100  # S is not a whole number of key blocks
    q, k, v, grad = make_inputs(B, Hq, Hkv, L, S, 64, 48, seed=Hq * 10 + L)
    gen = torch.Generator().manual_seed(L)
    if feature == "head_mask":  # a different float mask per head and row, with some keys ruled out
        mask = torch.randn(B, Hq, L, S, generator=gen, dtype=torch.float64)
        kw = dict(attn_mask=mask.masked_fill(torch.rand(B, Hq, L, S, generator=gen) < 0.2, float("-inf")))
    elif feature == "window":
        kw = dict(window=(700, 0), causal_align="bottom_right", is_causal=False)
    else:
        kw = feature_kwargs(feature, B, L, S, seed=L)
    got = run(ours, (q, k, v), grad, dtype, kw)
    kw_lse = {key: val.to(dtype) if isinstance(val, torch.Tensor) and val.is_floating_point() else val
              for key, val in kw.items()}
    _, lse = attention(q.to(dtype), k.to(dtype), v.to(dtype), enable_gqa=True, return_lse=True, **kw_lse)
    theirs = run(torch_same_dtype, (q, k, v), grad, dtype, dict(kw))
    truth = run(exact, (q, k, v), grad, torch.float64, dict(kw))
    for name, a, t, r in zip(("output", "grad_query", "grad_key", "grad_value"), got, theirs, truth):
        assert_close(name, a, t, r)
    allowed = reference.attention_allowed(L, S, kw.get("is_causal", False), kw.get("causal_align", "top_left"),
                                          kw.get("window"))
    mask = kw.get("attn_mask")
    qd, kd = (t.to(dtype).double() for t in (q, k))  # the inputs as the kernel saw them
    scores = torch.einsum("bhle,bhse->bhls", qd, kd.repeat_interleave(Hq // Hkv, 1)) / math.sqrt(64)
    if mask is not None:
        mask = mask.to(dtype).double() if mask.is_floating_point() else mask
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    want_lse = scores.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-5)


def test_output_keeps_hugging_face_layout():
    # query [B, L, H, E] seen as [B, H, L, E]: the output is laid out the same
    # way, so the backend's transpose(1, 2).contiguous() copies nothing
    q, k, v, grad = make_inputs(2, 4, 2, 9, 30, 16, 8, seed=8)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2).float() for t in (q, k, v))
    out = attention(qt, kt, vt, enable_gqa=True)
    assert out.transpose(1, 2).is_contiguous()
    fake = torch.library.opcheck  # the fake implementation must agree on the strides
    fake(torch.ops.bigkernels.attention_forward.default, (qt, kt, vt, None, 0.25, -1, -1, 0, 0.0, 0))
    torch.testing.assert_close(out.double(), exact(q, k, v), atol=1e-5, rtol=1e-5)
    assert attention(q.float(), k.float(), v.float(), enable_gqa=True).is_contiguous()
    # the backward reads that output and a [B, L, H, D]-laid grad_output in place, and lays each
    # gradient out like its input, so that autograd's views back to the projections copy nothing
    backward = torch.ops.bigkernels.attention_backward.default
    _, lse = attention(qt, kt, vt, enable_gqa=True, return_lse=True)
    g = grad.float().transpose(1, 2).contiguous().transpose(1, 2)
    args = (g, qt, kt, vt, None, out, lse, 0.25, -1, -1, 0, 0.0, 0, False)
    grads = backward(*args)
    for got, like in zip(grads[:3], (qt, kt, vt)):
        assert got.stride() == like.stride()
    fake(backward, args)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    exact(*leaves).backward(grad)
    for got, want in zip(grads[:3], leaves):
        torch.testing.assert_close(got.double(), want.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("float_mask", [False, True], ids=["bool", "float"])
def test_materialised_padding_masks(dtype, float_mask):
    # Hugging Face's [B, 1, L, S] padding mask with every query row equal (bf16/fp16 prefill on
    # AMX hosts: ATen's forward, given one row of it), a batch that sees nothing, and a mask
    # equal but for its last row (which must not be taken as one row)
    B, L, S = 3, 20, 37
    q, k, v, _ = make_inputs(B, 2, 2, L, S, 16, 16, seed=21)
    keep = torch.arange(S)[None, :] < torch.tensor([30, 0, 37])[:, None]
    padding = keep[:, None, None, :].expand(B, 1, L, S).contiguous()
    last_differs = padding.clone()
    last_differs[0, 0, -1, 5:] = False
    for mask in (padding, last_differs):
        if float_mask:
            mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
        out, lse = attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask.to(dtype) if float_mask else mask,
                             return_lse=True)
        want, want_lse = reference.scaled_dot_product_attention(q, k, v, mask)
        tol = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}.get(
            dtype, dict(atol=3e-2, rtol=3e-2))
        torch.testing.assert_close(out.double(), want, **tol)
        torch.testing.assert_close(lse.double(), want_lse, **tol)
        assert torch.isneginf(lse[1]).all() and torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [5, 20], ids=str)  # 20: bf16/fp16 prefill, ATen's forward on AMX hosts
def test_rows_with_nothing_to_attend_give_zero(dtype, L):
    q, k, v, grad = make_inputs(1, 2, 2, L, 6, 8, 8, seed=6)
    mask = torch.ones(1, 2, L, 6, dtype=torch.bool)
    mask[0, 0, 1] = False  # row 1 of head 0 sees nothing
    mask[0, 1, :, :] = False  # head 1 sees nothing at all
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, attn_mask=mask, return_lse=True)
    out.backward(grad.to(dtype))
    assert torch.equal(out[0, 0, 1], torch.zeros_like(out[0, 0, 1])) and not out.isnan().any()
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    assert torch.isneginf(lse[0, 0, 1]) and torch.isneginf(lse[0, 1]).all() and lse[0, 0, 0].isfinite()
    assert torch.equal(leaves[0].grad[0, 1], torch.zeros_like(leaves[0].grad[0, 1]))
    assert not any(t.grad.isnan().any() for t in leaves)
    empty_window = attention(*leaves, window=(0, 0), causal_align="bottom_right")  # S > L: all rows see a key
    assert empty_window.isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decoding_row_with_nothing_to_attend(dtype):
    # one token, no GQA: a head whose keys are all masked
    q, k, v, _ = make_inputs(2, 3, 3, 1, 40, 16, 16, seed=12)
    mask = torch.ones(2, 3, 1, 40, dtype=torch.bool)
    mask[1, 2] = False
    out, lse = attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, return_lse=True)
    assert torch.equal(out[1, 2], torch.zeros_like(out[1, 2])) and torch.isneginf(lse[1, 2]).all()
    want = exact(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out[0].double(), want[0], atol=2e-2, rtol=2e-2)
    assert lse[0].isfinite().all()


def test_return_lse_matches_reference():
    q, k, v, _ = make_inputs(2, 2, 2, 30, 50, 16, 16, seed=7)
    mask = torch.rand(30, 50) > 0.2
    _, lse = attention(q, k, v, attn_mask=mask, return_lse=True)
    _, want = reference.scaled_dot_product_attention(q, k, v, mask)
    assert lse.dtype == torch.float64
    torch.testing.assert_close(lse, want)
    _, lse32 = attention(q.float(), k.float(), v.float(), attn_mask=mask, return_lse=True)
    assert lse32.dtype == torch.float32 and lse32.shape == (2, 2, 30)


MASK_SHAPES = {"full": (2, 2, 17, 23), "key_padding": (2, 1, 1, 23), "shared": (17, 23)}


def mask_gradient_check(dtype, shape, device="cpu"):
    """The gradient of a float mask that requires grad (a learned bias), with
    every other gradient, against float64 under the 2x rule."""
    q, k, v, grad = make_inputs(2, 2, 2, 17, 23, 16, 16, seed=21)
    bias = torch.randn(MASK_SHAPES[shape], generator=torch.Generator().manual_seed(22), dtype=torch.float64)

    def run_with_bias(fn, dtype, device):
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v, bias)]
        out = fn(*leaves)
        out.backward(grad.to(device, dtype))
        return [t.cpu() for t in [out.detach()] + [t.grad for t in leaves]]

    got = run_with_bias(lambda q, k, v, b: ours(q, k, v, attn_mask=b, window=(5, 2)), dtype, device)
    mask = lambda b: b.masked_fill(~reference.window_mask(17, 23, 5, 2, 0, b.device), float("-inf"))  # noqa: E731
    theirs = run_with_bias(lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=mask(b)), dtype,
                           device)
    truth = run_with_bias(lambda q, k, v, b: exact(q, k, v, attn_mask=mask(b)), torch.float64, "cpu")
    for name, a, t, r in zip(("output", "grad_query", "grad_key", "grad_value", "grad_attn_mask"), got, theirs,
                             truth):
        assert_close(name, a, t, r)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
def test_float_mask_gradient(dtype, shape):
    mask_gradient_check(dtype, shape)


@pytest.mark.parametrize("feature", ["plain", "causal_bottom_right", "window", "float_mask", "gqa", "softcap",
                                     "softcap_alibi_causal"])
def test_gradcheck_float64(feature):
    q, k, v, _ = make_inputs(1, 4 if feature == "gqa" else 2, 2, 6, 9, 4, 3, seed=8)
    kw = feature_kwargs(feature, 1, 6, 9, seed=8)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda *t: ours(*t, **kw), inputs)


def test_gradcheck_float_mask_float64():
    q, k, v, _ = make_inputs(1, 2, 2, 6, 9, 4, 3, seed=23)
    bias = torch.randn(1, 1, 6, 9, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, bias))
    assert torch.autograd.gradcheck(lambda q, k, v, b: ours(q, k, v, attn_mask=b, is_causal=False), inputs)
    assert torch.autograd.gradgradcheck(lambda q, k, v, b: ours(q, k, v, attn_mask=b), inputs)


def test_double_backward_float64():
    q, k, v, _ = make_inputs(1, 2, 2, 5, 7, 4, 3, seed=9)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradgradcheck(lambda *t: ours(*t, is_causal=True), inputs)


def test_create_graph_gradients_match_the_kernels():
    # Under create_graph=True the backward runs on the reference's ops;
    # gradgradcheck differentiates whatever that backward returns, so it cannot
    # see its values being wrong: compare them with the kernels' backward.
    q, k, v, _ = make_inputs(2, 4, 2, 6, 9, 5, 3, seed=31)
    bias = torch.randn(1, 1, 6, 9, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, bias))
    out = attention(*inputs[:3], attn_mask=inputs[3], enable_gqa=True, window=(3, 1))
    grad = torch.randn_like(out)
    plain = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    again = torch.autograd.grad(out, inputs, grad, create_graph=True)
    assert all(a.requires_grad for a in again)  # the differentiable backward ran
    for p, a in zip(plain, again):
        torch.testing.assert_close(a, p)


def test_softcap_and_alibi_under_create_graph_match_the_kernels():
    q, k, v, _ = make_inputs(2, 4, 2, 6, 9, 5, 3, seed=32)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    kw = dict(enable_gqa=True, is_causal=True, causal_align="bottom_right", softcap=1.5,
              alibi_slopes=torch.rand(2, 4, dtype=torch.float64))
    out = attention(*inputs, **kw)
    grad = torch.randn_like(out)
    plain = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    again = torch.autograd.grad(out, inputs, grad, create_graph=True)
    for p, a in zip(plain, again):
        torch.testing.assert_close(a, p)


def test_softcap_and_alibi_opcheck():
    q, k, v, grad = (t.float() for t in make_inputs(2, 4, 2, 9, 11, 8, 6, seed=12))
    slopes = torch.rand(4)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, 0.35, -1, 0, 2, 0.0, 0, 3.0, slopes)
    torch.library.opcheck(torch.ops.bigkernels.attention_forward.default, args)
    out, lse = torch.ops.bigkernels.attention_forward(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                        for a in args])
    torch.library.opcheck(torch.ops.bigkernels.attention_backward.default,
                          (grad, q.detach(), k.detach(), v.detach(), None, out, lse, 0.35, -1, 0, 2, 0.0, 0, False,
                           3.0, slopes))


@pytest.mark.parametrize("kw,match", [
    (dict(softcap=-1.0), "softcap must be"),
    (dict(softcap=float("inf")), "softcap must be"),
    (dict(alibi_slopes=torch.rand(3)), r"alibi_slopes must be \[H\]"),
    (dict(alibi_slopes=torch.rand(2, dtype=torch.bfloat16)), "alibi_slopes must be a float32"),
    (dict(alibi_slopes=[0.5, 0.25]), "alibi_slopes must be a float32"),
])
def test_softcap_and_alibi_bad_input(kw, match):
    q, k, v, _ = (t.float() for t in make_inputs(1, 2, 2, 3, 4, 8, 8, seed=13))
    with pytest.raises((TypeError, ValueError), match=match):
        attention(q, k, v, **kw)
    with pytest.raises(ValueError, match="4-d"):
        attention(q[:, 0], k[:, 0], v[:, 0], alibi_slopes=torch.rand(1))


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_opcheck(mask):
    q, k, v, grad = (t.float() for t in make_inputs(2, 4, 2, 9, 11, 8, 6, seed=10))
    m = None if mask is None else (torch.rand(2, 1, 1, 11) > 0.3 if mask == "bool" else torch.randn(9, 11))
    for dropout in ((0.0, 0), (0.25, 1234)):
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), m, 0.35, 3, 0, 2) + dropout
        torch.library.opcheck(torch.ops.bigkernels.attention_forward.default, args)
        out, lse = torch.ops.bigkernels.attention_forward(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                            for a in args])
        torch.library.opcheck(torch.ops.bigkernels.attention_backward.default,
                              (grad, q.detach(), k.detach(), v.detach(), m, out, lse, 0.35, 3, 0, 2) + dropout
                              + (mask == "float",))  # grad_mask


def test_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v, _ = (t.float().requires_grad_() for t in make_inputs(1, 2, 2, 9, 9, 8, 8, seed=11))

    def loss(q, k, v):
        return ours(q, k, v, is_causal=True, window=(4, -1)).square().sum()

    def value_and_grads(fn):
        value = fn(q, k, v)
        return [value.detach()] + list(torch.autograd.grad(value, (q, k, v)))

    for g, e in zip(value_and_grads(torch.compile(loss, fullgraph=True, backend="aot_eager")),
                    value_and_grads(loss)):
        torch.testing.assert_close(g, e)


def test_meta_tensors():
    q = torch.empty(2, 4, 10, 8, device="meta", requires_grad=True)
    k = torch.empty(2, 2, 12, 8, device="meta", requires_grad=True)
    v = torch.empty(2, 2, 12, 6, device="meta", requires_grad=True)
    out = attention(q, k, v, enable_gqa=True, is_causal=True)
    assert out.shape == (2, 4, 10, 6) and out.device.type == "meta"
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_dropout_same_seed_same_result():
    q, k, v, _ = make_inputs(1, 2, 2, 16, 16, 8, 8, seed=12)
    torch.manual_seed(3)
    a = attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    b = attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, attention(q, k, v)) and not torch.equal(a, attention(q, k, v, dropout_p=0.3))


def kernel_dropout_mask(B, H, L, S, p, seed):
    """The kept-and-scaled mask the kernel draws, read back through the kernel
    itself: with q = k = 0 every probability is 1/S, and with V = identity
    row i of the output is mask[i] / S."""
    q, k = torch.zeros(B, H, L, 4, dtype=torch.float64), torch.zeros(B, H, S, 4, dtype=torch.float64)
    v = torch.eye(S, dtype=torch.float64).expand(B, H, S, S)
    out, _ = torch.ops.bigkernels.attention_forward(q, k, v, None, 1.0, -1, -1, 0, p, seed)
    return out * S


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", ["plain", "causal", "key_padding", "gqa"])
def test_dropout_matches_reference_with_the_same_mask(dtype, feature):
    B, L, S, p, seed = 2, 37, 70, 0.3, 99
    Hq, Hkv = (4, 2) if feature == "gqa" else (2, 2)
    q, k, v, grad = make_inputs(B, Hq, Hkv, L, S, 16, 8, seed=13)
    mask = kernel_dropout_mask(B, Hq, L, S, p, seed)
    keep = mask > 0
    assert torch.allclose(mask[keep], torch.tensor(1 / (1 - p), dtype=torch.float64))
    assert abs(keep.double().mean().item() - (1 - p)) < 0.02
    kw = feature_kwargs(feature, B, L, S, seed=13)

    def ours_with_seed(q, k, v, **kw):
        left, right = (-1, 0) if kw.get("is_causal") else (-1, -1)
        return torch.ops.bigkernels.attention_forward(q, k, v, kw.get("attn_mask"), 16 ** -0.5, left, right, 0,
                                                      p, seed)[0]

    def with_mask(q, k, v, **kw):
        return reference.scaled_dot_product_attention(q, k, v, kw.pop("attn_mask", None), keep, p,
                                                      enable_gqa=True, **kw)[0]

    got = run(ours_with_seed, (q, k, v), grad, dtype, kw)
    theirs = run(with_mask, (q, k, v), grad, dtype, kw)
    truth = run(with_mask, (q, k, v), grad, torch.float64, kw)
    for name, a, t, r in zip(("output", "grad_query", "grad_key", "grad_value"), got, theirs, truth):
        assert_close(name, a, t, r)


def test_dropout_is_unbiased():
    # the mean over many seeds approaches the output without dropout
    q, k, v, _ = make_inputs(1, 2, 2, 8, 24, 8, 8, seed=14)
    torch.manual_seed(0)
    mean = sum(attention(q, k, v, dropout_p=0.4) for _ in range(400)) / 400
    torch.testing.assert_close(mean, attention(q, k, v), atol=0.06, rtol=0)


def test_gradcheck_with_dropout():
    q, k, v, _ = make_inputs(1, 2, 2, 6, 9, 4, 3, seed=15)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))

    def fn(*t):
        torch.manual_seed(7)  # the same mask at every evaluation
        return attention(*t, dropout_p=0.3, is_causal=True)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [1, 4, 20], ids=str)  # decoding, short, and bf16/fp16's packed prefill
def test_empty_inputs(dtype, L):
    q, k, v = torch.randn(2, 3, 0, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 4)
    assert attention(q.to(dtype), k.to(dtype), v.to(dtype)).shape == (2, 3, 0, 4)
    q = torch.randn(2, 3, L, 8, dtype=dtype, requires_grad=True)
    out = attention(q, torch.randn(2, 3, 0, 8, dtype=dtype), torch.randn(2, 3, 0, 4, dtype=dtype))
    assert torch.equal(out, torch.zeros(2, 3, L, 4, dtype=dtype))  # no keys: nothing to attend to
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    # a head dim of 0: every score is 0, so each row averages V (as SDPA)
    q0, k0, v0 = torch.randn(2, 3, L, 0), torch.randn(2, 3, 5, 0), torch.randn(2, 3, 5, 4)
    out = attention(q0.to(dtype), k0.to(dtype), v0.to(dtype))
    torch.testing.assert_close(out.double(), v0.to(dtype).double().mean(-2, keepdim=True).expand(2, 3, L, 4),
                               atol=1e-2, rtol=1e-2)


OK_Q, OK_K, OK_V = torch.ones(1, 2, 3, 4), torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 6)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((OK_Q.int(), OK_K.int(), OK_V.int()), {}, TypeError, "query must be float16"),
    ((OK_Q, OK_K.double(), OK_V), {}, TypeError, "key dtype"),
    ((OK_Q, OK_K, torch.ones(1, 2, 5, 6, device="meta")), {}, ValueError, "value is on meta"),
    ((OK_Q[0, 0], OK_K[0, 0], OK_V[0, 0]), {}, ValueError, "3-d .* or 4-d"),
    ((OK_Q, torch.ones(1, 2, 5, 3), OK_V), {}, ValueError, "key's head dim 3"),
    ((OK_Q, OK_K, torch.ones(1, 2, 4, 6)), {}, ValueError, "value has 4 positions but key has 5"),
    ((OK_Q, torch.ones(1, 1, 5, 4), torch.ones(1, 1, 5, 6)), {}, ValueError, "enable_gqa=True"),
    ((torch.ones(1, 3, 3, 4), OK_K, OK_V), {"enable_gqa": True}, ValueError, "multiple of key's 2"),
    ((OK_Q, OK_K, OK_V), {"attn_mask": torch.ones(3, 4, dtype=torch.bool)}, ValueError, "does not broadcast"),
    ((OK_Q, OK_K, OK_V), {"attn_mask": torch.ones(3, 5, dtype=torch.int32)}, TypeError, "attn_mask must be bool"),
    ((OK_Q, OK_K, OK_V), {"attn_mask": torch.ones(3, 5, dtype=torch.bool), "is_causal": True}, ValueError,
     "cannot be combined"),
    ((OK_Q, OK_K, OK_V), {"dropout_p": 1.0}, ValueError, "dropout_p"),
    ((OK_Q, OK_K, OK_V), {"dropout_p": -0.1}, ValueError, "dropout_p"),
    ((OK_Q, OK_K, OK_V), {"causal_align": "top-left"}, ValueError, "causal_align"),
    ((OK_Q, OK_K, OK_V), {"window": (3, -2)}, ValueError, "window"),
    ((OK_Q, OK_K, OK_V), {"window": 3}, TypeError, "window"),
    ((OK_Q, OK_K, OK_V), {"scale": "big"}, TypeError, "scale"),
    ((OK_Q, OK_K, OK_V), {"is_causal": 1}, TypeError, "is_causal"),
    (("q", OK_K, OK_V), {}, TypeError, "query must be a torch.Tensor"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_naming_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        attention(*args, **kwargs)


def test_op_called_directly_checks_too():
    with pytest.raises((ValueError, RuntimeError), match="value has 4 positions"):
        torch.ops.bigkernels.attention_forward(OK_Q, OK_K, torch.ones(1, 2, 4, 6), None, 1.0, -1, -1, 0, 0.0, 0)
    with pytest.raises((ValueError, RuntimeError), match="dropout_p"):
        torch.ops.bigkernels.attention_forward(OK_Q, OK_K, OK_V, None, 1.0, -1, -1, 0, 1.5, 0)


def test_forward_memory_stays_far_below_the_scores():
    # L = S = 4096: one fp32 score matrix per head would be 64 MiB; the
    # kernel's extra memory is the lse, a float copy of K and V, and block
    # buffers. Peak resident memory, measured in a fresh process.
    script = """
import resource, torch, bigkernels
q, k, v = (torch.randn(1, 1, 4096, 64) for _ in range(3))
bigkernels.scaled_dot_product_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64])  # load everything once
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = bigkernels.scaled_dot_product_attention(q, k, v)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    extra_mib = float(run.stdout.split()[-1])
    assert extra_mib < 16, f"the forward grew the peak memory by {extra_mib:.1f} MiB (one score matrix: 64 MiB)"


def test_autocast_casts_like_sdpa():
    q, k, v, _ = (t.float() for t in make_inputs(2, 2, 2, 9, 13, 8, 8, seed=16))
    mask = torch.randn(9, 13)  # a float mask is cast too; a bool one is left alone
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, attn_mask=mask)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(out, attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention(q, k, v, attn_mask=mask > 0).dtype == torch.bfloat16
