"""Attention over sequences packed end to end, flash-attention's
flash_attn_varlen_func: nothing padded, nothing attends across sequences.
The bigkernels::varlen_attention_* ops (csrc/attention/) run each sequence
through the attention family's kernels, forward and backward (on the CPU
its block loops; on CUDA its tiles, a sequence per batch index).
"""

import numbers

import torch

from .. import _ext, reference
from .attention import (_FLOAT_DTYPES, _check_score_options, _check_window, _describe, _dropout_seed, _kernel_refusal,
                        _warn_reference_once)

_INDEX_DTYPES = (torch.int32, torch.int64)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p=0.0,
                     softmax_scale=None, causal=False, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                     return_lse=False):
    """flash_attn_varlen_func: q [total_q, H, D], k [total_k, Hkv, D], v
    [total_k, Hkv, Dv], sequences packed end to end.

    cu_seqlens_q, cu_seqlens_k (int32/int64 [sequences + 1], from 0 to the
    totals, non-decreasing): sequence b's query rows are
    q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]], its keys likewise; empty
    sequences are allowed. max_seqlen_q, max_seqlen_k: at least the longest
    sequence's lengths (ints, or 0-d tensors as Hugging Face passes them).
    Each sequence attends only to its own keys, query i of L_b at key position
    i + S_b - L_b (bottom-right, flash-attention's): causal keeps the keys up
    to it, window=(left, right) those within that distance (-1: no limit).
    H a multiple of Hkv (GQA/MQA). dropout_p drops probabilities (training);
    softcap > 0 caps the scaled scores x at softcap * tanh(x / softcap);
    alibi_slopes float32 [H] or [sequences, H] adds -slope * |position - j|.
    Differentiable in q, k and v (deterministic gradients).
    Returns out [total_q, H, Dv] (and lse [H, total_q] float32, float64 for
    float64 inputs, with return_lse). A row that attends to nothing gives 0.
    CPU and CUDA kernels (the CUDA ones as scaled_dot_product_attention's:
    head dims up to 256, fp16/bf16 on sm_80+); elsewhere the reference.
    """
    _check_tensors(q, k, v)
    B = _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q)
    max_seqlen_q = _check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    max_seqlen_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    left, right = reference.causal_window(causal, _check_window(window))
    # (alibi_slopes' [B, H] form counts sequences: checked on a [B, H, ...] stand-in)
    _check_score_options(softcap, alibi_slopes, q.new_empty((B, q.shape[1], 0, 0)))
    if softmax_scale is not None and (isinstance(softmax_scale, bool)
                                      or not isinstance(softmax_scale, numbers.Real)):
        raise TypeError(f"softmax_scale must be a number or None, got {softmax_scale!r}")
    D = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else (D ** -0.5 if D > 0 else 1.0)
    refusal = _kernel_refusal(q, v)
    if refusal is None:
        seed = _dropout_seed(q.device) if dropout_p > 0 else 0
        out, lse = torch.ops.bigkernels.varlen_attention_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, float(dropout_p),
            seed, float(softcap), alibi_slopes)
    else:
        _warn_reference_once(refusal, "varlen_attention", "one sequence at a time")
        _check_sequences(cu_seqlens_q, q.shape[0], max_seqlen_q, "q")
        _check_sequences(cu_seqlens_k, k.shape[0], max_seqlen_k, "k")
        masks = None
        if dropout_p > 0:
            lengths = [(int(cu_seqlens_q[b + 1] - cu_seqlens_q[b]), int(cu_seqlens_k[b + 1] - cu_seqlens_k[b]))
                       for b in range(B)]
            masks = [torch.rand(q.shape[1], L, S, device=q.device) >= dropout_p for L, S in lengths]
        out, lse = reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window=(left, right),
                                              softcap=float(softcap), alibi_slopes=alibi_slopes,
                                              dropout_masks=masks, dropout_p=dropout_p)
    return (out, lse) if return_lse else out


def _check_tensors(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-d [total, heads, head_dim] (sequences packed end to end), got shape "
                             f"{tuple(t.shape)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v {tuple(v.shape)} must have k's {tuple(k.shape)} rows and heads")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q's {q.shape[1]} heads must be a multiple of k's {k.shape[1]}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k's head dim {k.shape[2]} does not match q's {q.shape[2]}")


def _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q):
    """The number of sequences, after checking both tensors' types and shapes."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be an int32 or int64 tensor, got {_describe(cu)}")
        if cu.dim() != 1 or cu.numel() == 0:
            raise ValueError(f"{name} must be 1-d [sequences + 1], got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q ({cu_seqlens_q.numel()}) and cu_seqlens_k ({cu_seqlens_k.numel()}) must have "
                         "one entry per sequence, plus one")
    return cu_seqlens_q.numel() - 1


def _check_max_seqlen(x, name):
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point() and x.dtype != torch.bool:
        x = int(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0:
        raise ValueError(f"{name} must be an int >= 0, got {x!r}")
    return int(x)


def _check_sequences(cu, total, max_len, side):
    """The op's checks of cu_seqlens_{side}'s values, in PyTorch (the reference path)."""
    name = f"cu_seqlens_{side}"
    if int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"{name} must run from 0 to the packed rows ({total}), got {int(cu[0])} to {int(cu[-1])}")
    lengths = cu.diff()
    if (lengths < 0).any():
        raise ValueError(f"{name} must not decrease")
    if lengths.numel() and int(lengths.max()) > max_len:
        raise ValueError(f"a sequence has {int(lengths.max())} rows but max_seqlen_{side} is {max_len}")


def _register():
    @torch.library.register_fake("bigkernels::varlen_attention_forward")
    def _forward_fake(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                      window_right, dropout_p, dropout_seed, softcap, alibi_slopes):
        total, H, _ = query.shape
        lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        return query.new_empty((total, H, value.shape[-1])), query.new_empty((H, total), dtype=lse_dtype)

    @torch.library.register_fake("bigkernels::varlen_attention_backward")
    def _backward_fake(grad_output, query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, output,
                       lse, scale, window_left, window_right, dropout_p, dropout_seed, softcap, alibi_slopes):
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


if _ext.LOADED and hasattr(torch.ops.bigkernels, "varlen_attention_forward"):
    _register()
