"""The CUDA attention kernels (fp16 and bf16 on tensor cores, float32 and
float64 on the SIMT kernels) held to the checks of
test_attention.py: forward and every gradient under flash-attention's 2x rule
against a float64 reference, over the issue's head dims and lengths, masks,
windows, GQA, dropout. Skipped without a GPU; the same kernels run on every
machine under the host emulation (test_cuda_emulation.py)."""

import pytest
import torch

import bigkernels
from bigkernels.ops import attention as attention_ops
from bigkernels.ops.attention import scaled_dot_product_attention as attention
from test_attention import MASK_SHAPES, check, kernel_dropout_mask, make_inputs, mask_gradient_check

CUDA = torch.cuda.is_available() and bigkernels.backend_info()["cuda_compiled"]
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build"),
    pytest.mark.skipif(CUDA and torch.cuda.get_device_capability()[0] < 8, reason="the kernels need sm_80+"),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", ["plain", "causal", "causal_bottom_right", "window", "key_padding",
                                     "float_mask", "gqa", "three_d", "softcap", "alibi", "softcap_alibi_causal"])
@pytest.mark.parametrize("L,S", [(1, 1), (17, 17), (113, 203), (127, 255), (1000, 33)], ids=str)
def test_matches_reference(dtype, feature, L, S):
    check(dtype, feature, L=L, S=S, E=64, Ev=64, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,Ev", [(8, 8), (16, 16), (32, 32), (40, 40), (64, 64), (80, 80), (96, 96), (128, 128),
                                  (160, 160), (192, 192), (256, 256), (64, 128), (100, 36)], ids=str)
def test_head_dims(dtype, E, Ev):
    check(dtype, "causal", L=67, S=131, E=E, Ev=Ev, seed=E, device="cuda")


@pytest.mark.parametrize("feature", ["plain", "causal"])
def test_long_sequence(feature):
    check(torch.bfloat16, feature, B=1, Hq=1, Hkv=1, L=2048, S=2048, E=128, Ev=128, device="cuda")


def test_large_logits_stay_finite():
    check(torch.bfloat16, "causal", L=40, S=40, E=64, Ev=64, logit_scale=2500.0, device="cuda")


# Decoding shapes (up to 16 rows per key head, no mask, no dropout: a generate()
# step) run on attention_with_kvcache's decoding kernel, its keys split over
# the SMs and merged; the backward is the training kernels', from out and lse.
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("feature", ["plain", "causal", "causal_bottom_right", "window", "gqa",
                                     "softcap_alibi_causal"])
@pytest.mark.parametrize("L,S,E", [(1, 4099, 128), (3, 700, 40), (1, 1, 256), (8, 333, 64)], ids=str)
def test_decoding_shapes(dtype, feature, L, S, E):
    check(dtype, feature, L=L, S=S, E=E, Ev=E, seed=L + S, device="cuda")


def test_decoding_shape_large_logits_and_strided_cache():
    check(torch.bfloat16, "gqa", L=1, S=2000, E=64, Ev=64, logit_scale=2500.0, device="cuda")
    # a [B, S, H, D] cache seen as [B, H, S, D] (flash-attention's layout, HF's transposed views): read in place
    q, k, v, _ = (t.cuda().bfloat16() for t in make_inputs(2, 8, 2, 1, 999, 128, 128, seed=13))
    kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    torch.testing.assert_close(attention(q, kt, vt, enable_gqa=True), attention(q, k, v, enable_gqa=True),
                               atol=0, rtol=0)


def test_strided_inputs_match_contiguous():
    q, k, v, grad = (t.cuda().half() for t in make_inputs(2, 3, 3, 33, 47, 64, 64, seed=5))
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    torch.testing.assert_close(attention(qt, kt, vt), attention(q, k, v), atol=0, rtol=0)
    odd = torch.randn(2, 3, 33, 65, device="cuda", dtype=torch.half)[..., 1:]  # misaligned: copied and padded
    torch.testing.assert_close(attention(odd, odd, odd), attention(odd.contiguous(), odd.contiguous(),
                                                                   odd.contiguous()), atol=0, rtol=0)


def test_rows_with_nothing_to_attend_give_zero():
    q, k, v, grad = (t.cuda().bfloat16() for t in make_inputs(1, 2, 2, 5, 6, 64, 64, seed=6))
    mask = torch.ones(1, 2, 5, 6, dtype=torch.bool, device="cuda")
    mask[0, 0, 1] = False
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, attn_mask=mask, return_lse=True)
    out.backward(grad)
    assert torch.equal(out[0, 0, 1], torch.zeros_like(out[0, 0, 1])) and torch.isneginf(lse[0, 0, 1])
    assert not any(t.grad.isnan().any() for t in leaves)


def test_backward_is_deterministic():
    q, k, v, grad = (t.cuda().bfloat16() for t in make_inputs(2, 4, 2, 300, 300, 64, 64, seed=7))
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, is_causal=True, enable_gqa=True).backward(grad)
        runs.append([t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_dropout_mask_is_the_cpus():
    # the same counter-based generator on both devices: the same seed drops the same elements
    B, H, L, S, p, seed = 1, 2, 37, 64, 0.5, 1234
    q, k = torch.zeros(B, H, L, 64, dtype=torch.half, device="cuda"), torch.zeros(B, H, S, 64, device="cuda",
                                                                                   dtype=torch.half)
    v = torch.eye(S, 64, dtype=torch.half, device="cuda").expand(B, H, S, 64)
    out, _ = torch.ops.bigkernels.attention_forward(q, k, v, None, 1.0, -1, -1, 0, p, seed)
    want = kernel_dropout_mask(B, H, L, S, p, seed)
    assert torch.equal(out.cpu().double() * S > 0, want > 0)


def test_dropout_same_seed_same_result_and_unbiased():
    q, k, v, _ = (t.cuda().bfloat16() for t in make_inputs(1, 2, 2, 8, 24, 64, 64, seed=14))
    torch.manual_seed(3)
    a = attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(3)
    assert torch.equal(a, attention(q, k, v, dropout_p=0.4))
    mean = sum(attention(q, k, v, dropout_p=0.4).float() for _ in range(400)) / 400
    torch.testing.assert_close(mean, attention(q, k, v).float(), atol=0.06, rtol=0)


def test_empty_inputs():
    q, k, v = (torch.randn(2, 3, n, 64, device="cuda", dtype=torch.half) for n in (0, 5, 5))
    assert attention(q, k, v).shape == (2, 3, 0, 64)
    out = attention(torch.randn(2, 3, 4, 64, device="cuda", dtype=torch.half), k[:, :, :0], v[:, :, :0])
    assert torch.equal(out, torch.zeros_like(out))


def test_opcheck():
    q, k, v, grad = (t.cuda().half() for t in make_inputs(2, 4, 2, 9, 11, 64, 64, seed=10))
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None, 0.125, 3, 0, 2, 0.25, 1234)
    torch.library.opcheck(torch.ops.bigkernels.attention_forward.default, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
def test_float_mask_gradient(dtype, shape):
    mask_gradient_check(dtype, shape, device="cuda")


def test_gradcheck_float64_on_the_simt_kernels():
    q, k, v, _ = make_inputs(1, 4, 2, 6, 9, 4, 3, seed=8)
    inputs = tuple(t.cuda().requires_grad_() for t in (q, k, v))
    mask = (torch.rand(6, 9) > 0.3).cuda()
    assert torch.autograd.gradcheck(lambda *t: attention(*t, attn_mask=mask, enable_gqa=True), inputs)


def test_head_dims_over_256_run_on_the_reference_with_a_warning():
    q = torch.randn(1, 1, 5, 300, device="cuda", dtype=torch.half)
    attention_ops._WARNED.clear()  # it warns once per reason and process
    with pytest.warns(UserWarning, match="head dims over 256"):
        out = attention(q, q, q)
    torch.testing.assert_close(out.float().cpu(), attention(q.float().cpu(), q.float().cpu(), q.float().cpu()),
                               atol=2e-3, rtol=2e-3)


# Ranges a block finds empty: key tiles no query reaches (top-left causal with
# S > L, a narrow window), query tiles that reach no key, a single query.
# The kernels must drain their copies and write zeros there.
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("E", [64, 256])
@pytest.mark.parametrize("feature,L,S", [("causal", 67, 131), ("causal", 1, 131), ("plain", 1, 100),
                                         ("window", 40, 200), ("window", 200, 40)], ids=str)
def test_empty_ranges(dtype, E, feature, L, S):
    check(dtype, feature, B=1, L=L, S=S, E=E, Ev=E, seed=L + S, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_grad_output(dtype):
    # a contiguous view one element into its storage: the kernels' 16-byte copies cannot read it in place
    q, k, v, grad = (t.cuda().to(dtype) for t in make_inputs(2, 2, 2, 33, 47, 64, 64, seed=11))
    storage = torch.empty(grad.numel() + 1, device="cuda", dtype=dtype)
    odd = storage[1:].view_as(grad).copy_(grad)
    assert odd.is_contiguous() and odd.data_ptr() % 16 != 0
    grads = []
    for g in (grad, odd):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, is_causal=True).backward(g)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,E", [(torch.bfloat16, 64), (torch.bfloat16, 256), (torch.float32, 128),
                                     (torch.float64, 64)], ids=str)
def test_backward_is_bit_identical_when_repeated(dtype, E):
    # no atomics: the same inputs give the same bits, every head dim's dK/dV split included
    q, k, v, grad = (t.cuda().to(dtype) for t in make_inputs(2, 4, 2, 200, 333, E, E, seed=12))
    runs = []
    for _ in range(3):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, is_causal=True, enable_gqa=True).backward(grad)
        runs.append([t.grad for t in leaves])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,E,rows", [(torch.float16, 64, 64), (torch.float32, 64, 64), (torch.float32, 256, 16),
                                          (torch.float64, 256, 8)], ids=str)
def test_too_long_for_the_grid_is_a_clear_error(dtype, E, rows):
    # one block per `rows` queries, at most 65535 blocks; an expanded q allocates nothing
    L = 65535 * rows + 1
    q = torch.randn(1, 1, 1, E, device="cuda", dtype=dtype).expand(1, 1, L, E)
    k = torch.randn(1, 1, 8, E, device="cuda", dtype=dtype)
    with pytest.raises(ValueError, match=f"at most {65535 * rows} queries"):
        attention(q, k, k)
