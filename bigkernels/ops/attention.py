"""Fused attention: argument checks and F.scaled_dot_product_attention's
semantics on top of the bigkernels::attention_* ops (csrc/attention/), their
fake implementations and autograd; the reference when the extension is absent.
"""

import numbers
import warnings

import torch

from .. import _ext, reference
from .._info import BUILD_INFO
from ._autocast import autocast_inputs

CAUSAL_ALIGNS = ("top_left", "bottom_right")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_align, window):
    """Raises TypeError/ValueError naming the bad argument; returns the window
    as (left, right) with -1 for unbounded."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"query must be float16, bfloat16, float32 or float64, got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match query dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if query.dim() not in (3, 4):
        raise ValueError(f"query must be 3-d [B, L, E] or 4-d [B, H, L, E], got shape {tuple(query.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            raise ValueError(f"{name} must have as many dimensions as query ({query.dim()}), got shape "
                             f"{tuple(t.shape)}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key's head dim {key.shape[-1]} does not match query's {query.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"value has {value.shape[-2]} positions but key has {key.shape[-2]}: they must match")
    if not (query.shape[0] == key.shape[0] == value.shape[0]):
        raise ValueError(f"query, key and value batch sizes differ: {query.shape[0]}, {key.shape[0]}, "
                         f"{value.shape[0]}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {enable_gqa!r}")
    if query.dim() == 4:
        hq, hk, hv = query.shape[1], key.shape[1], value.shape[1]
        if hk != hv:
            raise ValueError(f"key has {hk} heads but value has {hv}")
        if enable_gqa:
            if hk == 0 or hq % hk:
                raise ValueError(f"enable_gqa: query's {hq} heads must be a multiple of key's {hk}")
        elif hq != hk:
            raise ValueError(f"query has {hq} heads but key has {hk}; pass enable_gqa=True for grouped-query "
                             "attention")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if is_causal:
            raise ValueError("attn_mask and is_causal=True cannot be combined (as in SDPA): put the causal "
                             "structure into the mask, or use window=")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(f"attn_mask must be bool (True = attend) or query's dtype {query.dtype} (added to "
                            f"the scores), got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        full = tuple(query.shape[:-1]) + (key.shape[-2],)
        # (torch.broadcast_shapes is ~30 us a call: a third of this function's cost on small calls)
        ok = attn_mask.dim() <= len(full) and all(m == 1 or m == f for m, f in zip(reversed(attn_mask.shape),
                                                                                 reversed(full)))
        if not ok:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the scores' "
                             f"shape {full}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a number or None, got {scale!r}")
    if causal_align not in CAUSAL_ALIGNS:
        raise ValueError(f"causal_align must be one of {', '.join(CAUSAL_ALIGNS)}, got {causal_align!r}")
    return _check_window(window)


def _check_window(window):
    """window=(left, right) as a tuple, (-1, -1) for None; TypeError/ValueError naming it."""
    if window is None:
        return (-1, -1)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"window must be a pair of ints (left, right), got {window!r}")
    if min(window) < -1:
        raise ValueError(f"window sizes must be >= 0, or -1 for unbounded, got {tuple(window)}")
    return tuple(window)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, causal_align="top_left", window=None, softcap=0.0,
                                 alibi_slopes=None, return_lse=False):
    """F.scaled_dot_product_attention, with flash-attention's extras.

    query [B, H, L, E] or [B, L, E]; key [.., Hkv, S, E]; value [.., Hkv, S, Ev].
    attn_mask: bool (True = attend) or additive float, broadcastable to
    [B, H, L, S] (never expanded in memory). is_causal: query i attends keys
    j <= i (top-left, as SDPA). enable_gqa: H a multiple of Hkv. Rows that
    may attend to nothing give 0.
    Extras: causal_align="bottom_right" aligns the last query with the last
    key (flash-attention's convention); window=(left, right) keeps keys
    within left before and right after the query's position (-1: no limit);
    softcap > 0 caps the scaled scores x at softcap * tanh(x / softcap)
    (Gemma 2); alibi_slopes (float32 [H] or [B, H], 4-d inputs) adds
    -slope * |position - j| to them (ALiBi, position as causal_align puts
    query i), both before the mask, as flash-attention orders them;
    return_lse=True also returns the log-sum-exp of each row's scaled scores
    ([B, H, L] float32 (float64 for float64 inputs), -inf for a row that
    attends to nothing). Under torch.autocast the inputs are cast to the
    autocast dtype, as for F.scaled_dot_product_attention.
    """
    query, key, value, attn_mask = autocast_inputs(query, key, value, attn_mask)
    left, right = _check_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                              causal_align, window)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    _check_score_options(softcap, alibi_slopes, query)
    softcap = float(softcap)
    refusal = _kernel_refusal(query, value)
    if refusal is None:
        out, lse = _attention(query, key, value, attn_mask, is_causal, scale, causal_align, left, right, dropout_p,
                              softcap, alibi_slopes)
    else:
        _warn_reference_once(refusal)
        dropout_mask = None
        if dropout_p > 0:
            scores_shape = tuple(query.shape[:-1]) + (key.shape[-2],)
            dropout_mask = torch.rand(scores_shape, device=query.device) >= dropout_p
        out, lse = reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_mask, dropout_p, is_causal, scale, enable_gqa, causal_align,
            (left, right), softcap, alibi_slopes)
    return (out, lse) if return_lse else out


_WARNED = set()


def _warn_reference_once(reason, op="scaled_dot_product_attention", how="which materialises the L x S scores"):
    """Says once per op and reason that a call runs on the slow reference."""
    if not _ext.LOADED:
        return  # importing bigkernels already warned
    if (op, reason) not in _WARNED:
        _WARNED.add((op, reason))
        warnings.warn(f"bigkernels.{op}: no kernel for {reason}; this runs on the pure-PyTorch reference, {how}",
                      stacklevel=3)


def _check_score_options(softcap, alibi_slopes, query):
    """TypeError/ValueError naming softcap or alibi_slopes."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not 0 <= softcap < float("inf"):
        raise ValueError(f"softcap must be a number >= 0 (0: none), got {softcap!r}")
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"alibi_slopes must be a float32 tensor, got {_describe(alibi_slopes)}")
    if query.dim() != 4:
        raise ValueError("alibi_slopes needs 4-d [B, H, L, E] inputs (slopes per head)")
    B, H = query.shape[0], query.shape[1]
    if alibi_slopes.shape not in ((H,), (B, H)) or alibi_slopes.device != query.device:
        raise ValueError(f"alibi_slopes must be [H] = [{H}] or [B, H] = [{B}, {H}] on query's device, got shape "
                         f"{tuple(alibi_slopes.shape)} on {alibi_slopes.device}")


def _describe(x):
    """A wrong argument's kind, for an error message: its dtype if a tensor, else its type."""
    return f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__


def _kernel_refusal(query, value):
    """None when the compiled kernels run this call, else why not: no
    extension; on CUDA, head dims over 256, float16/bfloat16 (tensor cores)
    on GPUs older than sm_80, or a build without CUDA."""
    if not _ext.LOADED:
        return "a build without the extension"
    if query.device.type in ("cpu", "meta"):
        return None
    if query.device.type != "cuda" or not BUILD_INFO["cuda_compiled"]:
        return f"{query.device.type} tensors in this build"
    if max(query.shape[-1], value.shape[-1]) > 256:
        return "CUDA head dims over 256"
    if query.dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(query.device)[0] < 8:
        return f"{query.dtype} on GPUs older than compute capability 8.0 (tensor cores)"
    return None


def _dropout_seed(device):
    """A seed for the kernels' counter-based dropout, drawn from torch's
    generator of the device: the same torch.manual_seed gives the same masks."""
    return int(torch.randint(-2**63, 2**63 - 1, (), device=device if device.type != "meta" else "cpu"))


def _attention(query, key, value, attn_mask, is_causal, scale, causal_align, left, right, dropout_p, softcap=0.0,
               alibi_slopes=None):
    """The op on 4-d views of 3- or 4-d inputs; returns (out, lse) shaped like the inputs."""
    three_d = query.dim() == 3
    if three_d:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    L, S = query.shape[-2], key.shape[-2]
    left, right = reference.causal_window(is_causal, (left, right))
    if scale is None:  # (a head dim of 0: every score is 0 whatever the scale, as in SDPA)
        scale = query.shape[-1] ** -0.5 if query.shape[-1] > 0 else 1.0
    scale = float(scale)
    offset = S - L if causal_align == "bottom_right" else 0
    seed = _dropout_seed(query.device) if dropout_p > 0 else 0
    out, lse = torch.ops.bigkernels.attention_forward(query, key, value, attn_mask, scale, left, right, offset,
                                                      float(dropout_p), seed, softcap, alibi_slopes)
    return (out.squeeze(1), lse.squeeze(1)) if three_d else (out, lse)


def _output_like(query, Ev):
    """The forward op's output, [B, H, L, Ev], laid out as the CPU kernel lays
    it out (attention_output_cpu in csrc/attention/cpu/attention_cpu.cpp):
    like query when query is a [B, L, H, E] tensor seen as [B, H, L, E]
    (Hugging Face's layout), so that transposing it back copies nothing."""
    B, H, L, _ = query.shape
    if query.device.type == "cpu" and not query.is_contiguous() and query.transpose(1, 2).is_contiguous():
        return query.new_empty((B, L, H, Ev)).transpose(1, 2)
    return query.new_empty((B, H, L, Ev))


def _grad_like(t):
    """The backward op's gradient for input t, laid out as the CPU kernel lays
    it out (attention_grad_like in attention_cpu.cpp): like t when t is dense
    (Hugging Face's [B, L, H, D] views included); contiguous on CUDA."""
    return torch.empty_like(t) if t.device.type == "cpu" else t.new_empty(t.shape)


def _register():
    """Fake implementations and autograd for the compiled ops."""

    @torch.library.register_fake("bigkernels::attention_forward")
    def _forward_fake(query, key, value, attn_mask, scale, window_left, window_right, diagonal_offset, dropout_p,
                      dropout_seed, softcap=0.0, alibi_slopes=None):
        B, H, L, _ = query.shape
        lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        return _output_like(query, value.shape[-1]), query.new_empty((B, H, L), dtype=lse_dtype)

    @torch.library.register_fake("bigkernels::attention_backward")
    def _backward_fake(grad_output, query, key, value, attn_mask, output, lse, scale, window_left, window_right,
                       diagonal_offset, dropout_p, dropout_seed, grad_mask=False, softcap=0.0, alibi_slopes=None):
        grad_attn_mask = attn_mask.new_empty(attn_mask.shape) if grad_mask else query.new_empty((0,))
        return _grad_like(query), _grad_like(key), _grad_like(value), grad_attn_mask

    # Autograd is registered in C++ (csrc/attention/attention_autograd.cpp);
    # its double backward (create_graph=True) calls this, which differentiates
    # the reference's PyTorch ops, themselves differentiable.
    @torch.library.impl("bigkernels::attention_backward_reference", "CompositeImplicitAutograd")
    def _backward_reference(grad_out, query, key, value, attn_mask, scale, left, right, offset, output_mask,
                            softcap=0.0, alibi_slopes=None):
        wanted = [t for t, m in zip((query, key, value, attn_mask), output_mask) if m]
        L, S = query.shape[-2], key.shape[-2]
        allowed = reference.window_mask(L, S, left, right, offset, query.device)
        mask = allowed if attn_mask is None else (
            allowed & attn_mask if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~allowed, float("-inf")))
        again, _ = reference.scaled_dot_product_attention(query, key, value, mask, scale=scale, enable_gqa=True,
                                                          softcap=softcap, alibi_slopes=alibi_slopes,
                                                          alibi_offset=offset)
        grads = iter(torch.autograd.grad(again, wanted, grad_out, create_graph=True))
        return tuple(next(grads) if m else query.new_empty((0,)) for m in output_mask)


if _ext.LOADED and hasattr(torch.ops.bigkernels, "attention_forward"):
    _register()
