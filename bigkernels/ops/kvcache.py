"""Decoding attention against a KV cache, flash-attention's
flash_attn_with_kvcache: the new keys and values written into the cache in
place (contiguous or paged), rotary embedding, softcap and ALiBi; the
bigkernels::attention_kvcache_forward op (csrc/attention/) attends. Forward
only (inference).
"""

import numbers

import torch

from .. import _ext, reference
from .attention import (_FLOAT_DTYPES, _check_score_options, _check_window, _describe, _kernel_refusal,
                        _warn_reference_once)

_INDEX_DTYPES = (torch.int32, torch.int64)


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, block_table=None,
                           softmax_scale=None, causal=False, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                           rotary_cos=None, rotary_sin=None, rotary_interleaved=False, return_lse=False):
    """flash_attn_with_kvcache: attention of q [B, Lq, H, D] against a cache.

    k_cache, v_cache: [B, capacity, Hkv, D] (and Dv), or, with block_table
    [B, max_pages] (int32/int64), pages [num_pages, page_size, Hkv, D] of
    which batch b's keys are pages block_table[b, 0], block_table[b, 1], ...
    cache_seqlens (int, or int32/int64 [B]): keys already in each batch's
    cache (None: the whole capacity, only without k). k, v [B, Lk, Hkv, D]:
    new keys and values, written into the caches in place at positions
    cache_seqlens[b] .. + Lk - 1 before attending; each batch then attends
    to its first cache_seqlens[b] + Lk keys.
    Query i sits at key position i + seqlens_k[b] - Lq (bottom-right): causal
    keeps keys up to it, window=(left, right) keys within that distance
    (-1: no limit). H a multiple of Hkv (GQA/MQA). softcap > 0: the scaled
    scores x become softcap * tanh(x / softcap); alibi_slopes float32 [H] or
    [B, H] add -slope * |position - j|. rotary_cos, rotary_sin
    [seqlen, R / 2]: the first R dims of k rotated at its positions, and of
    q at its own (causal or windowed) or all at cache_seqlens (otherwise),
    GPT-NeoX halves or, with rotary_interleaved, GPT-J pairs.
    Returns out [B, Lq, H, Dv] (and lse [B, H, Lq] float32, float64 for
    float64 inputs, with return_lse). A row that attends to nothing gives 0.
    """
    _check_tensors(q, k_cache, v_cache, k, v)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v)):
        raise RuntimeError("attention_with_kvcache is forward-only (inference): call it under torch.no_grad() or "
                           "torch.inference_mode(); for training use scaled_dot_product_attention")
    B, Lq, H, D = q.shape
    paged = block_table is not None
    capacity = _check_block_table(block_table, k_cache, B) if paged else k_cache.shape[1]
    if not paged and k_cache.shape[0] != B:
        raise ValueError(f"k_cache has batch {k_cache.shape[0]} but q has {B} (a paged cache needs block_table)")
    seqlens = _check_cache_seqlens(cache_seqlens, q, k, capacity)
    left, right = reference.causal_window(_check_bool(causal, "causal"), _check_window(window))
    _check_score_options(softcap, alibi_slopes, q.transpose(1, 2))  # (its [B, H, ...] view)
    if softmax_scale is not None and (isinstance(softmax_scale, bool)
                                      or not isinstance(softmax_scale, numbers.Real)):
        raise TypeError(f"softmax_scale must be a number or None, got {softmax_scale!r}")
    scale = float(softmax_scale) if softmax_scale is not None else (D ** -0.5 if D > 0 else 1.0)
    _check_bool(return_lse, "return_lse")
    _check_bool(rotary_interleaved, "rotary_interleaved")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin come together: pass both or neither")
    if rotary_cos is not None:
        q, k = _rotate(q, k, rotary_cos, rotary_sin, seqlens, rotary_interleaved,
                       positions_per_query=right >= 0 or left >= 0)
    refusal = _kernel_refusal(q, v_cache)
    if refusal is None:
        # the op writes k and v into the caches, checking cache_seqlens and the pages in use
        out, lse = torch.ops.bigkernels.attention_kvcache_forward(q, k_cache, v_cache, k, v, seqlens, block_table,
                                                                  scale, left, right, float(softcap), alibi_slopes)
    else:
        _warn_reference_once(refusal, "attention_with_kvcache", "one batch at a time")
        seqlens_k = _append_checked(q, k_cache, v_cache, k, v, seqlens, block_table, capacity)
        out, lse = reference.attention_with_kvcache(q, k_cache, v_cache, seqlens_k, block_table, scale,
                                                    window=(left, right), softcap=float(softcap),
                                                    alibi_slopes=alibi_slopes)
    return (out, lse) if return_lse else out


def _compiling():
    """Under torch.compile the checks that read tensors' values are left to the op."""
    return torch.compiler.is_compiling()


def _check_bool(x, name):
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {x!r}")
    return x


def _check_tensors(q, k_cache, v_cache, k, v):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if (k is None) != (v is None):
        raise ValueError("k and v come together: pass both new keys and values, or neither")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    news = (("k", k), ("v", v)) if k is not None else ()
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)) + news:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)) + news:
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-d ([B, L, H, D]; caches [B, capacity, Hkv, D] or "
                             f"[num_pages, page_size, Hkv, D]), got shape {tuple(t.shape)}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree but in "
                         "the head dim")
    Hkv = k_cache.shape[2]
    if Hkv == 0 or q.shape[2] % Hkv:
        raise ValueError(f"q's {q.shape[2]} heads must be a multiple of the caches' {Hkv}")
    if k_cache.shape[3] != q.shape[3]:
        raise ValueError(f"k_cache's head dim {k_cache.shape[3]} does not match q's {q.shape[3]}")
    if k is not None:
        if k.shape[0] != q.shape[0] or k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"k must be [B, Lk, Hkv, D] = [{q.shape[0]}, Lk, {Hkv}, {k_cache.shape[3]}], got "
                             f"{tuple(k.shape)}")
        if v.shape[:2] != k.shape[:2] or v.shape[2:] != v_cache.shape[2:]:
            raise ValueError(f"v must be [B, Lk, Hkv, Dv] = [{k.shape[0]}, {k.shape[1]}, {Hkv}, {v_cache.shape[3]}], "
                             f"got {tuple(v.shape)}")


def _check_block_table(block_table, k_cache, B):
    """The paged caches' capacity per batch (its pages), after checking block_table's type and shape."""
    if not isinstance(block_table, torch.Tensor) or block_table.dtype not in _INDEX_DTYPES:
        raise TypeError(f"block_table must be an int32 or int64 tensor, got {_describe(block_table)}")
    if block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table must be [B, max_pages] with B = {B}, got shape {tuple(block_table.shape)}")
    if block_table.device != k_cache.device:
        raise ValueError(f"block_table is on {block_table.device} but the caches are on {k_cache.device}")
    if k_cache.shape[1] == 0:
        raise ValueError("the paged caches' page_size (dim 1) must be positive")
    return block_table.shape[1] * k_cache.shape[1]


def _append_checked(q, k_cache, v_cache, k, v, seqlens, block_table, capacity):
    """The op's checks of cache_seqlens and block_table and its append, in
    PyTorch (the reference path); returns each batch's keys after the append."""
    Lk = 0 if k is None else k.shape[1]
    if not _compiling() and q.shape[0] > 0:
        low, high = int(seqlens.min()), int(seqlens.max())
        if low < 0 or high + Lk > capacity:
            raise ValueError(f"cache_seqlens must lie in [0, capacity - Lk] = [0, {capacity - Lk}] (the cache "
                             f"holds {capacity} keys per batch, {Lk} new ones come), got values in [{low}, {high}]")
        if block_table is not None:
            _check_pages(block_table, seqlens + Lk, k_cache)
    if k is not None:
        _append(k_cache, k, seqlens, block_table)
        _append(v_cache, v, seqlens, block_table)
    return seqlens + Lk


def _check_pages(block_table, seqlens_k, k_cache):
    """Every page a batch uses (those holding its first seqlens_k[b] keys) must be one of k_cache's."""
    page_size, pages = k_cache.shape[1], k_cache.shape[0]
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < (
        (seqlens_k + page_size - 1) // page_size)[:, None]
    bad = used & ((block_table < 0) | (block_table >= pages))
    if bad.any():
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] is {int(block_table[b, j])}, not a page of the caches' {pages}")


def _check_cache_seqlens(cache_seqlens, q, k, capacity):
    """cache_seqlens as an int tensor [B] on q's device (an int checked to leave room for k's Lk new keys)."""
    B, Lk = q.shape[0], 0 if k is None else k.shape[1]
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required with new keys k, v: it says where they go")
        return torch.full((B,), capacity, dtype=torch.int32, device=q.device)
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= capacity - Lk:
            raise ValueError(f"cache_seqlens {cache_seqlens} with {Lk} new keys does not fit the cache's capacity "
                             f"{capacity}")
        return torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in _INDEX_DTYPES:
        raise TypeError(f"cache_seqlens must be an int or an int32/int64 tensor, got {_describe(cache_seqlens)}")
    if cache_seqlens.shape != (B,) or cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be [B] = [{B}] on q's device, got shape "
                         f"{tuple(cache_seqlens.shape)} on {cache_seqlens.device}")
    return cache_seqlens  # (its values: checked by the op, or by _append_checked)


def _rotate(q, k, cos, sin, seqlens, interleaved, positions_per_query):
    """q and k rotated (reference.rotary) at their positions in the cache."""
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_describe(t)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if cos.dim() != 2 or cos.shape != sin.shape or not 0 < 2 * cos.shape[1] <= q.shape[3]:
        raise ValueError(f"rotary_cos and rotary_sin must both be [seqlen, R / 2] with 0 < R <= the head dim "
                         f"{q.shape[3]}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    Lq, Lk = q.shape[1], 0 if k is None else k.shape[1]
    steps = torch.arange(max(Lq, Lk), device=q.device)
    if not _compiling() and q.device.type != "meta" and q.shape[0] > 0:
        last = int(seqlens.max()) + max(Lq if positions_per_query else 1, Lk) - 1
        if last >= cos.shape[0]:
            raise ValueError(f"rotary_cos and rotary_sin have {cos.shape[0]} positions; position {last} is needed")
    base = seqlens.long()[:, None]
    q_positions = base + steps[None, :Lq] if positions_per_query else base.expand(-1, Lq)
    q = reference.rotary(q, cos, sin, q_positions, interleaved)
    if k is not None:
        k = reference.rotary(k, cos, sin, base + steps[None, :Lk], interleaved)
    return q, k


def _append(cache, new, seqlens, block_table):
    """Writes new [B, Lk, Hkv, D] into cache at positions seqlens[b] + 0 .. Lk - 1, in place."""
    B, Lk = new.shape[:2]
    positions = seqlens.long()[:, None] + torch.arange(Lk, device=new.device)[None, :]
    if block_table is None:
        cache[torch.arange(B, device=new.device)[:, None], positions] = new
    else:
        page_size = cache.shape[1]
        pages = block_table.long().gather(1, positions // page_size)
        cache[pages, positions % page_size] = new


def _register():
    @torch.library.register_fake("bigkernels::attention_kvcache_forward")
    def _kvcache_fake(query, k_cache, v_cache, k, v, cache_seqlens, block_table, scale, window_left, window_right,
                      softcap, alibi_slopes):
        B, L, H, _ = query.shape
        lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        return query.new_empty((B, L, H, v_cache.shape[-1])), query.new_empty((B, H, L), dtype=lse_dtype)


if _ext.LOADED and hasattr(torch.ops.bigkernels, "attention_kvcache_forward"):
    _register()
