"""bigkernels.attention_with_kvcache against a float64 reference built from
plain per-batch attention (reference.attention_with_kvcache): the append in
place, contiguous and paged caches, GQA/MQA, causal and windows (bottom-right),
softcap, ALiBi, rotary (checked against its own complex-number reference),
decoding with one or several queries, long caches split over the threads;
and the errors."""

import pytest
import torch

import bigkernels
from bigkernels import reference
from conftest import HAS_CUDA, assert_close

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def rotary_by_complex(x, cos, sin, positions, interleaved):
    """Rotary as complex multiplication, written apart from reference.rotary:
    pairs (2i, 2i + 1) or (i, i + R / 2) as one complex number each, times
    cos + i sin at the position."""
    half = cos.shape[1]
    x = x.double()
    if interleaved:
        pairs = torch.complex(x[..., 0:2 * half:2], x[..., 1:2 * half:2])
    else:
        pairs = torch.complex(x[..., :half], x[..., half:2 * half])
    turn = torch.complex(cos.double()[positions], sin.double()[positions])[:, :, None, :]
    r = pairs * turn
    rotated = torch.stack((r.real, r.imag), -1).flatten(-2) if interleaved else torch.cat((r.real, r.imag), -1)
    return torch.cat((rotated, x[..., 2 * half:]), -1)


def rotary_tables(n, half, gen):
    theta = torch.rand(half, generator=gen, dtype=torch.float64) * 0.5
    angles = torch.arange(n, dtype=torch.float64)[:, None] * theta[None, :]
    return angles.cos(), angles.sin()


def make_case(B=3, Lq=1, Lk=1, H=4, Hkv=2, D=32, Dv=None, capacity=200, page_size=None, seqlens=None, seed=0):
    """float64 inputs: q, caches (contiguous or paged with a shuffled table), new k/v, cache_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    if seqlens is None:  # every kind of position: empty, middle, the last slot the new keys fit
        seqlens = [(0, capacity // 2, capacity - Lk)[b % 3] for b in range(B)]
    case = dict(q=torch.randn(B, Lq, H, D, generator=gen, dtype=torch.float64),
                k=torch.randn(B, Lk, Hkv, D, generator=gen, dtype=torch.float64) if Lk else None,
                v=torch.randn(B, Lk, Hkv, Dv, generator=gen, dtype=torch.float64) if Lk else None,
                cache_seqlens=torch.tensor(seqlens, dtype=torch.int32))
    if page_size is None:
        case["k_cache"] = torch.randn(B, capacity, Hkv, D, generator=gen, dtype=torch.float64)
        case["v_cache"] = torch.randn(B, capacity, Hkv, Dv, generator=gen, dtype=torch.float64)
    else:
        per_batch = -(-capacity // page_size)
        pages = B * per_batch + 3  # some pages nobody uses
        case["k_cache"] = torch.randn(pages, page_size, Hkv, D, generator=gen, dtype=torch.float64)
        case["v_cache"] = torch.randn(pages, page_size, Hkv, Dv, generator=gen, dtype=torch.float64)
        case["block_table"] = torch.randperm(pages, generator=gen)[:B * per_batch].view(B, per_batch).int()
    return case


def cast(case, dtype):
    return {name: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else
                   t.clone() if isinstance(t, torch.Tensor) else t) for name, t in case.items()}


def truth(case, causal=False, window=None, softcap=0.0, alibi_slopes=None, rotary=None, dtype=torch.float64):
    """The reference in dtype: rotary (complex-number version in float64), the
    append by plain indexing one batch at a time, then per-batch attention."""
    c = cast(case, dtype)
    q, k, seqlens = c["q"], c["k"], c["cache_seqlens"].long()
    Lq, Lk = q.shape[1], 0 if k is None else k.shape[1]
    if rotary is not None:
        cos, sin, interleaved = rotary
        steps = torch.arange(max(Lq, Lk))
        local = causal or (window is not None and window != (-1, -1))
        q_pos = seqlens[:, None] + steps[None, :Lq] if local else seqlens[:, None].expand(-1, Lq)
        q = rotary_by_complex(q, cos, sin, q_pos, interleaved).to(dtype)
        if k is not None:
            k = rotary_by_complex(k, cos, sin, seqlens[:, None] + steps[None, :Lk], interleaved).to(dtype)
    table = c.get("block_table")
    for cache, new in ((c["k_cache"], k), (c["v_cache"], c["v"])):
        for b in range(q.shape[0]):
            for i in range(Lk):
                pos = int(seqlens[b]) + i
                if table is None:
                    cache[b, pos] = new[b, i]
                else:
                    cache[int(table[b, pos // cache.shape[1]]), pos % cache.shape[1]] = new[b, i]
    left, right = reference.causal_window(causal, window)
    out, lse = reference.attention_with_kvcache(q, c["k_cache"], c["v_cache"], seqlens + Lk, table,
                                                window=(left, right), softcap=softcap,
                                                alibi_slopes=alibi_slopes)
    return out, lse, c["k_cache"], c["v_cache"]


def ours(case, dtype, rotary=None, device="cpu", **kw):
    c = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in cast(case, dtype).items()}
    if rotary is not None:
        cos, sin, interleaved = rotary
        kw.update(rotary_cos=cos.float().to(device), rotary_sin=sin.float().to(device), rotary_interleaved=interleaved)
    if kw.get("alibi_slopes") is not None:
        kw["alibi_slopes"] = kw["alibi_slopes"].to(device)
    with torch.no_grad():
        out, lse = bigkernels.attention_with_kvcache(
            c["q"], c["k_cache"], c["v_cache"], c["k"], c["v"], cache_seqlens=c["cache_seqlens"],
            block_table=c.get("block_table"), return_lse=True, **kw)
    return out.cpu(), lse.cpu(), c["k_cache"].cpu(), c["v_cache"].cpu()


def check(case, dtype, rotary=None, device="cpu", **kw):
    got = ours(case, dtype, rotary, device, **kw)
    theirs = truth(case, dtype=dtype, rotary=rotary, **kw)
    exact = truth(case, rotary=rotary, **kw)
    assert_close("output", got[0], theirs[0], exact[0])
    lse_floor = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    finite = torch.isfinite(exact[1])
    assert torch.equal(finite, torch.isfinite(got[1])), "lse: -inf where the reference has none, or the reverse"
    assert (got[1][finite].double() - exact[1][finite]).abs().max().item() <= lse_floor * max(
        1.0, exact[1][finite].abs().max().item()) if finite.any() else True
    # the append wrote exactly the reference's rows (rotated in the same dtype: close, not bit-equal)
    for name, a, t in (("k_cache", got[2], theirs[2]), ("v_cache", got[3], theirs[3])):
        tol = 0 if rotary is None else (1e-6 if dtype in (torch.float32, torch.float64) else 1e-2)
        assert (a.double() - t.double()).abs().max().item() <= tol, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", ["plain", "causal", "window", "softcap", "alibi", "alibi_per_batch",
                                     "causal_softcap_alibi"])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 0), (4, 4), (17, 3)], ids=str)
def test_matches_reference(dtype, feature, Lq, Lk):
    H = 4
    gen = torch.Generator().manual_seed(7)
    kw = {"plain": {}, "causal": dict(causal=True), "window": dict(window=(40, 2)), "softcap": dict(softcap=2.0),
          "alibi": dict(alibi_slopes=torch.rand(H, generator=gen)),
          "alibi_per_batch": dict(alibi_slopes=torch.rand(3, H, generator=gen)),
          "causal_softcap_alibi": dict(causal=True, softcap=1.5, alibi_slopes=torch.rand(H, generator=gen))}[feature]
    check(make_case(Lq=Lq, Lk=Lk, H=H), dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("page_size", [16, 48, 64, 256])
@pytest.mark.parametrize("Lq", [1, 5])
def test_paged_caches(dtype, page_size, Lq):
    check(make_case(B=4, Lq=Lq, Lk=Lq, capacity=300, page_size=page_size, seed=page_size), dtype, causal=True)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2), (6, 1)], ids=str)
@pytest.mark.parametrize("paged", [False, True])
def test_gqa_and_mqa(H, Hkv, paged):
    check(make_case(H=H, Hkv=Hkv, Lq=2, Lk=2, page_size=32 if paged else None), torch.float32, causal=True)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary(interleaved, causal, dtype):
    case = make_case(Lq=3, Lk=3, D=32, capacity=100)
    cos, sin = rotary_tables(100, 12, torch.Generator().manual_seed(3))  # R = 24 of 32 dims
    check(case, dtype, rotary=(cos, sin, interleaved), causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("paged", [False, True])
def test_long_caches_split_over_threads(dtype, paged):
    """Caches long enough that the keys are split (flash-decoding), with batches
    of very different lengths: some splits of a short batch see no key."""
    case = make_case(B=3, Lq=1, Lk=1, H=8, Hkv=2, D=64, Dv=48, capacity=3000, page_size=128 if paged else None,
                     seqlens=[2999, 37, 1500])
    check(case, dtype, causal=True, softcap=3.0)


def test_every_append_position_including_the_last_slot():
    capacity = 20
    for pos in range(capacity):
        check(make_case(B=1, Lq=1, Lk=1, capacity=capacity, seqlens=[pos], seed=pos), torch.float32, causal=True)


def test_rows_with_nothing_to_attend_give_zero():
    # more queries than keys, causal: the first queries see no key (position < 0)
    case = make_case(B=2, Lq=6, Lk=0, capacity=10, seqlens=[3, 0])
    out, lse = ours(case, torch.float32, causal=True)[:2]
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3])) and torch.isneginf(lse[0, :, :3]).all()
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    check(case, torch.float32, causal=True)


def test_whole_cache_without_seqlens():
    case = make_case(B=2, Lq=1, Lk=0, capacity=50)
    c = cast(case, torch.float32)
    with torch.no_grad():
        got = bigkernels.attention_with_kvcache(c["q"], c["k_cache"], c["v_cache"])
    want = reference.attention_with_kvcache(case["q"], case["k_cache"], case["v_cache"], torch.tensor([50, 50]))[0]
    assert (got.double() - want).abs().max() < 1e-5


def test_int_cache_seqlens_and_int64_tensors():
    case = make_case(B=2, Lq=1, Lk=1, capacity=40, page_size=16, seqlens=[11, 11])
    case["block_table"] = case["block_table"].long()
    c = cast(case, torch.float32)
    with torch.no_grad():
        got = bigkernels.attention_with_kvcache(c["q"], c["k_cache"], c["v_cache"], c["k"], c["v"], cache_seqlens=11,
                                                block_table=c["block_table"], causal=True)
    assert_close("output", got, truth(case, causal=True, dtype=torch.float32)[0], truth(case, causal=True)[0])


def test_compile_fullgraph_and_opcheck():
    torch._dynamo.reset()
    case = cast(make_case(B=2, Lq=1, Lk=1, capacity=64, page_size=16), torch.float32)

    def step(q, k_cache, v_cache, k, v, seqlens, table):
        return bigkernels.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                                 block_table=table, causal=True, softcap=4.0)

    args = [case[n] for n in ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "block_table")]
    eager_args = [a.clone() for a in args]
    with torch.no_grad():
        want = step(*eager_args)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(args[1], eager_args[1])  # the compiled call appended in place too
    for new in ((case["k"], case["v"]), (None, None)):
        torch.library.opcheck(torch.ops.bigkernels.attention_kvcache_forward,
                              (case["q"], case["k_cache"], case["v_cache"], *new, case["cache_seqlens"],
                               case["block_table"], 0.3, -1, 0, 2.0, torch.rand(4)))


def test_meta_tensors():
    q = torch.empty(2, 3, 8, 16, device="meta")
    kc, vc = torch.empty(2, 40, 2, 16, device="meta"), torch.empty(2, 40, 2, 24, device="meta")
    out, lse = bigkernels.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.zeros(2, dtype=torch.int32,
                                                                                      device="meta"),
                                                 return_lse=True)
    assert out.shape == (2, 3, 8, 24) and lse.shape == (2, 8, 3) and out.device.type == "meta"


def test_empty_batch_and_no_queries():
    for B, Lq in ((0, 1), (2, 0)):
        q = torch.randn(B, Lq, 4, 16)
        out = bigkernels.attention_with_kvcache(q, torch.randn(B, 10, 2, 16), torch.randn(B, 10, 2, 16),
                                                cache_seqlens=torch.full((B,), 5, dtype=torch.int32))
        assert out.shape == (B, Lq, 4, 16)


OUT_OF_RANGE = r"must lie in \[0, capacity - Lk\]"


def errors_case():
    c = cast(make_case(B=2, Lq=1, Lk=1, H=4, Hkv=2, D=8, capacity=16), torch.float32)
    return c["q"], c["k_cache"], c["v_cache"], c["k"], c["v"]


@pytest.mark.parametrize("change,match", [
    (lambda a, kw: kw.update(cache_seqlens=torch.tensor([3, 16], dtype=torch.int32)), OUT_OF_RANGE),
    (lambda a, kw: kw.update(cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32)), OUT_OF_RANGE),
    (lambda a, kw: kw.update(cache_seqlens=16), "cache_seqlens 16 with 1 new keys"),
    (lambda a, kw: kw.update(cache_seqlens=torch.tensor([1.0, 2.0])), "cache_seqlens must be an int"),
    (lambda a, kw: kw.update(cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)), r"cache_seqlens must be \[B\]"),
    (lambda a, kw: kw.pop("cache_seqlens"), "cache_seqlens is required"),
    (lambda a, kw: a.__setitem__(4, None), "k and v come together"),
    (lambda a, kw: a.__setitem__(3, a[3].double()), "k dtype"),
    (lambda a, kw: a.__setitem__(1, a[1].bfloat16()), "k_cache dtype"),
    (lambda a, kw: a.__setitem__(0, torch.randn(2, 1, 3, 8)), "multiple of the caches' 2"),
    (lambda a, kw: a.__setitem__(0, torch.randn(2, 1, 4, 9)), "head dim 8 does not match q's 9"),
    (lambda a, kw: a.__setitem__(0, torch.randn(2, 4, 8)), "q must be 4-d"),
    (lambda a, kw: a.__setitem__(2, torch.randn(2, 15, 2, 8)), "must agree"),
    (lambda a, kw: a.__setitem__(3, torch.randn(2, 1, 3, 8)), "k must be"),
    (lambda a, kw: (a.__setitem__(0, torch.randn(3, 1, 4, 8)), a.__setitem__(3, None), a.__setitem__(4, None),
                    kw.update(cache_seqlens=3)), "k_cache has batch 2 but q has 3"),
    (lambda a, kw: kw.update(softcap=-1.0), "softcap must be"),
    (lambda a, kw: kw.update(alibi_slopes=torch.rand(3)), r"alibi_slopes must be \[H\]"),
    (lambda a, kw: kw.update(alibi_slopes=torch.rand(4, dtype=torch.bfloat16)), "alibi_slopes must be a float32"),
    (lambda a, kw: kw.update(window=(1,)), "window must be a pair"),
    (lambda a, kw: kw.update(causal=1), "causal must be a bool"),
    (lambda a, kw: kw.update(rotary_cos=torch.rand(20, 2)), "rotary_cos and rotary_sin come together"),
    (lambda a, kw: kw.update(rotary_cos=torch.rand(20, 5), rotary_sin=torch.rand(20, 5)), "R <= the head dim"),
    (lambda a, kw: kw.update(rotary_cos=torch.rand(5, 2), rotary_sin=torch.rand(5, 2)), "position 5 is needed"),
    (lambda a, kw: kw.update(block_table=torch.zeros(2, 2)), "block_table must be an int32"),
    (lambda a, kw: kw.update(block_table=torch.zeros(3, 2, dtype=torch.int32)), r"block_table must be \[B"),
])
def test_bad_input_names_the_argument(change, match):
    args = list(errors_case())
    kw = dict(cache_seqlens=torch.tensor([3, 5], dtype=torch.int32))
    change(args, kw)
    with pytest.raises((TypeError, ValueError), match=match), torch.no_grad():
        bigkernels.attention_with_kvcache(*args, **kw)


def test_paged_errors():
    q = torch.randn(2, 1, 4, 8)
    kc, vc = torch.randn(5, 16, 2, 8), torch.randn(5, 16, 2, 8)
    table = torch.tensor([[0, 1], [2, 7]], dtype=torch.int32)  # page 7 does not exist
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] is 7"), torch.no_grad():
        bigkernels.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([20, 20], dtype=torch.int32),
                                          block_table=table)
    # only the pages in use are checked: 16 keys use page [1, 0] alone
    with torch.no_grad():
        bigkernels.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([20, 16], dtype=torch.int32),
                                          block_table=table)
    with pytest.raises(ValueError, match=OUT_OF_RANGE), torch.no_grad():  # capacity 2 pages = 32
        bigkernels.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([33, 0], dtype=torch.int32),
                                          block_table=table)


def test_the_op_checks_values_itself():
    """Called directly (no Python front), the op refuses out-of-range lengths and pages too."""
    q, kc, vc = torch.randn(2, 1, 4, 8), torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
    op = torch.ops.bigkernels.attention_kvcache_forward
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] is 17"):
        op(q, kc, vc, None, None, torch.tensor([3, 17]), None, 1.0, -1, -1, 0.0, None)
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] is 16"):  # no room for the new key
        op(q, kc, vc, kc[:, :1], vc[:, :1], torch.tensor([16, 0]), None, 1.0, -1, -1, 0.0, None)
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] is -1"):
        op(q, kc, vc, None, None, torch.tensor([3, 0]), torch.tensor([[-1], [0]]), 1.0, -1, -1, 0.0, None)
    with pytest.raises(ValueError, match="contiguous last dim"):
        op(q, kc.transpose(2, 3).contiguous().transpose(2, 3), vc, None, None, torch.tensor([3, 0]), None, 1.0, -1,
           -1, 0.0, None)


@pytest.mark.parametrize("paged", [False, True])
def test_pytorch_path_without_the_kernel(monkeypatch, paged):
    """The path CUDA tensors take until a CUDA kernel exists (the append and
    the checks in PyTorch, then reference.attention_with_kvcache), run here."""
    monkeypatch.setattr(bigkernels._ext, "LOADED", False)
    gen = torch.Generator().manual_seed(5)
    check(make_case(B=3, Lq=2, Lk=2, page_size=32 if paged else None), torch.float32, causal=True, softcap=2.0,
          alibi_slopes=torch.rand(4, generator=gen))
    q, kc, vc = torch.randn(2, 1, 4, 8), torch.randn(5, 16, 2, 8), torch.randn(5, 16, 2, 8)
    table = torch.tensor([[0, 1], [2, 7]], dtype=torch.int32)  # page 7 does not exist
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] is 7"), torch.no_grad():
        bigkernels.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([20, 20], dtype=torch.int32),
                                          block_table=table)
    with pytest.raises(ValueError, match=OUT_OF_RANGE), torch.no_grad():
        bigkernels.attention_with_kvcache(q, kc[:2], vc[:2], kc[:2, :1], vc[:2, :1],
                                          cache_seqlens=torch.tensor([3, 16], dtype=torch.int32))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("paged", [False, True])
def test_cuda_matches_reference(dtype, paged):
    check(make_case(B=3, Lq=3, Lk=3, H=8, Hkv=2, D=64, capacity=700, page_size=64 if paged else None), dtype,
          device="cuda", causal=True, softcap=3.0)


def test_grad_is_refused():
    q, kc, vc, k, v = errors_case()
    with pytest.raises(RuntimeError, match="forward-only"):
        bigkernels.attention_with_kvcache(q.requires_grad_(), kc, vc, k, v, cache_seqlens=3)
