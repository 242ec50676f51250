"""Pure-PyTorch reference of every op.

The ground truth the tests compare against (run in float64), and the path
taken when the compiled extension is absent. Written for clarity, not speed.
"""

import math

import torch
import torch.nn.functional as F

# The Python list of activations (the C++ one is BK_FOR_EACH_ACTIVATION in
# csrc/common/activations.h; tests/test_dense.py checks that they agree).
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "swiglu", "geglu")
GATED = {"swiglu": "silu", "geglu": "gelu"}  # gated activation -> its inner activation
# Activations whose derivative backward computes from the output, which the
# caller keeps anyway, instead of from a saved pre-activation
# (derivative_from_output() in activations.h; "none" needs neither).
DERIVATIVE_FROM_OUTPUT = frozenset({"relu", "sigmoid", "tanh"})
# Beyond -SATURATE, gelu, gelu_tanh and silu are 0 in float and double alike.
# Clamping there gives their true limit 0 at -inf, where torch's formulas give
# NaN (-inf * 0); the kernels do the same (kSaturate in activations.h).
SATURATE = 1e4


def activation(z, name):
    """act(z) for every activation name; gated ones split z's last dim in half."""
    if name in GATED:
        first, second = z.chunk(2, dim=-1)
        return activation(first, GATED[name]) * second
    if name == "none":
        return z
    if name in ("gelu", "gelu_tanh", "silu"):
        z = torch.where(z < -SATURATE, -SATURATE, z)  # NaN stays NaN, and so does its gradient
    if name == "relu":
        return F.relu(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "tanh":
        return torch.tanh(z)
    raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


def dense(x, weight, bias=None, activation_name="none", up_weight=None):
    """act(x @ weight.T + bias), F.linear's convention; up_weight (gated
    activations): the weight's second half as its own tensor."""
    if up_weight is not None:
        weight = torch.cat([weight, up_weight])
    return activation(F.linear(x, weight, bias), activation_name)


def window_mask(L, S, left, right, offset, device=None):
    """[L, S] bool: query i may see key j when j - (i + offset) lies in
    [-left, right] (-1: no bound on that side)."""
    pos = torch.arange(L, device=device)[:, None] + offset
    j = torch.arange(S, device=device)[None, :]
    allowed = torch.ones(L, S, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= j >= pos - left
    if right >= 0:
        allowed &= j <= pos + right
    return allowed


def attention_allowed(L, S, is_causal=False, causal_align="top_left", window=None, device=None):
    """[L, S] bool: which keys each query may attend to under causality and a
    sliding window. Query i sits at key position i (top_left, SDPA's
    alignment) or i + S - L (bottom_right, flash-attention's); window = (left,
    right) keeps keys within [pos - left, pos + right], -1 = unbounded."""
    left, right = causal_window(is_causal, window)
    return window_mask(L, S, left, right, S - L if causal_align == "bottom_right" else 0, device)


def causal_window(is_causal, window):
    """(left, right) with causality folded in: a causal query sees no key after itself."""
    left, right = window if window is not None else (-1, -1)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, causal_align="top_left",
                                 window=None, softcap=0.0, alibi_slopes=None, alibi_offset=None):
    """softmax(q k^T * scale + mask) v, F.scaled_dot_product_attention's
    semantics on [..., H, L, E] inputs (3-d or 4-d), computed in the inputs'
    dtype and written for clarity: it materialises the L x S scores.

    attn_mask: bool (True = attend) or additive float, broadcastable to
    [..., H, L, S]. dropout_mask: bool keep-mask of the scores' shape, applied
    as keep / (1 - dropout_p) after the softmax. softcap > 0: the scaled
    scores x become softcap * tanh(x / softcap) (Gemma-2); then alibi_slopes
    ([H] or [B, H], 4-d inputs) adds -slope * |i + offset - j|, offset the
    causal alignment's unless alibi_offset gives it (flash-attention's
    order, before any mask). Rows whose every key is
    masked give 0 (and zero gradients). Returns (output, lse), lse the
    log-sum-exp of each row's scaled, masked scores (float32, float64 for
    float64 inputs; -inf for a fully masked row)."""
    L, S = query.shape[-2], key.shape[-2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and query.dim() == 4 and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    scores = (query @ key.transpose(-2, -1)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        offset = alibi_offset if alibi_offset is not None else (S - L if causal_align == "bottom_right" else 0)
        distance = (torch.arange(L, device=query.device)[:, None] + offset
                    - torch.arange(S, device=query.device)[None, :]).abs().to(scores.dtype)
        slopes = alibi_slopes.to(scores.dtype)
        slopes = slopes[:, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        scores = scores - slopes * distance
    allowed = attention_allowed(L, S, is_causal, causal_align, window, query.device)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores.float() if scores.dtype != torch.float64 else scores, dim=-1)
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)  # nothing to attend: output 0
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    return probs @ value, lse


def rotary(x, cos, sin, positions, interleaved=False):
    """Rotary embedding of x [B, L, H, D] at positions [B, L] (flash-
    attention's apply_rotary_emb): cos and sin [seqlen, R / 2] rotate the
    first R dims, as pairs (2i, 2i + 1) when interleaved (GPT-J), else as
    halves (i, i + R / 2) (GPT-NeoX); the rest pass through. Computed in
    float32 (float64 for float64 x), returned in x's dtype."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = cos.shape[-1]
    c = cos.to(work)[positions][:, :, None, :]  # [B, L, 1, R / 2]
    s = sin.to(work)[positions][:, :, None, :]
    y = x.to(work)
    if interleaved:
        x1, x2 = y[..., 0:2 * half:2], y[..., 1:2 * half:2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = y[..., :half], y[..., half:2 * half]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated, y[..., 2 * half:]), dim=-1).to(x.dtype)


def cache_keys(cache, b, n, block_table=None):
    """The first n rows of batch b of a KV cache, [n, Hkv, D]: cache
    [B, capacity, Hkv, D], or pages [num_pages, page_size, Hkv, D] through
    block_table [B, max_pages]."""
    if block_table is None:
        return cache[b, :n]
    page_size = cache.shape[1]
    pages = block_table[b, :(n + page_size - 1) // page_size].long()
    return cache[pages].flatten(0, 1)[:n]


def attention_with_kvcache(q, k_cache, v_cache, seqlens_k, block_table=None, scale=None, is_causal=False,
                           window=None, softcap=0.0, alibi_slopes=None):
    """flash-attention's flash_attn_with_kvcache after the append: q
    [B, Lq, H, D] against the first seqlens_k[b] keys of each batch's cache
    (cache_keys), bottom-right aligned, GQA by head counts. Returns (out
    [B, Lq, H, Dv], lse [B, H, Lq]) from scaled_dot_product_attention, one
    batch at a time."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        n = int(seqlens_k[b])
        k = cache_keys(k_cache, b, n, block_table).transpose(0, 1)[None]
        v = cache_keys(v_cache, b, n, block_table).transpose(0, 1)[None]
        slopes = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b])
        out, lse = scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), k, v, is_causal=is_causal, scale=scale,
                                                enable_gqa=True, causal_align="bottom_right", window=window,
                                                softcap=softcap, alibi_slopes=slopes)
        outs.append(out.transpose(1, 2))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None, is_causal=False, window=None, softcap=0.0,
                     alibi_slopes=None, dropout_masks=None, dropout_p=0.0):
    """flash-attention's flash_attn_varlen_func: sequences packed end to end,
    q [total_q, H, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv], sequence b
    the rows [cu_seqlens[b], cu_seqlens[b + 1]), bottom-right aligned, GQA by
    head counts, alibi_slopes [H] or [B, H]; dropout_masks: one bool keep-mask
    [H, L_b, S_b] per sequence, or None. Returns (out [total_q, H, Dv], lse
    [H, total_q]) from scaled_dot_product_attention, one sequence at a time."""
    outs, lses = [], []
    for b in range(len(cu_seqlens_q) - 1):
        q0, q1, k0, k1 = (int(x) for x in (cu_seqlens_q[b], cu_seqlens_q[b + 1], cu_seqlens_k[b], cu_seqlens_k[b + 1]))
        slopes = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b])
        out, lse = scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None], v[k0:k1].transpose(0, 1)[None],
            dropout_mask=None if dropout_masks is None else dropout_masks[b][None], dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, enable_gqa=True, causal_align="bottom_right", window=window,
            softcap=softcap, alibi_slopes=slopes)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty((0, q.shape[1], v.shape[2])), q.new_empty((q.shape[1], 0), dtype=lse_dtype)
    return torch.cat(outs), torch.cat(lses, dim=1)


RNN_MODES = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def rnn_cell(mode, x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None):
    """One step of torch.nn's cells, written out (gate order LSTM i, f, g, o;
    GRU r, z, n). Returns (h_new, c_new); c_new is None except for lstm."""
    gx = x @ w_ih.T if b_ih is None else x @ w_ih.T + b_ih
    gh = h @ w_hh.T if b_hh is None else h @ w_hh.T + b_hh
    if mode == "lstm":
        i, f, g, o = (gx + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else h @ w_hr.T), c
    if mode == "gru":
        xr, xz, xn = gx.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    a = gx + gh
    return (torch.tanh(a) if mode == "rnn_tanh" else torch.relu(a)), None


def rnn_layer(input, batch_sizes, w_ih, w_hh, b_ih, b_hh, w_hr, hx, cx, mode, reverse):
    """One layer in one direction over a packed time-major sequence: input
    [N, I], step t owning batch_sizes[t] consecutive rows (non-increasing; None
    means every step has hx.shape[0] rows). Returns (output [N, Hout], hy, cy);
    cy is None except for lstm. The reverse direction starts each sequence
    from hx at its own last step."""
    B = hx.shape[0]
    sizes = [B] * (input.shape[0] // B) if batch_sizes is None else [int(b) for b in batch_sizes]
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    h, c = hx, cx
    outputs = [None] * len(sizes)
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        bs, off = sizes[t], offsets[t]
        h_new, c_new = rnn_cell(mode, input[off:off + bs], h[:bs], None if c is None else c[:bs],
                                w_ih, w_hh, b_ih, b_hh, w_hr)
        h = torch.cat([h_new, h[bs:]])
        if c is not None:
            c = torch.cat([c_new, c[bs:]])
        outputs[t] = h_new
    return torch.cat(outputs), h, c


def norm(x, weight=None, bias=None, eps=1e-5, rms=False):
    """LayerNorm (or RMSNorm) over the last dimension, in x's dtype."""
    if rms:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0, softcap=0.0,
                         z_loss=0.0, reduction="mean"):
    """(loss, lse) of F.cross_entropy on F.linear's logits, capped to
    softcap * tanh(logits / softcap) when softcap > 0, plus z_loss * lse^2
    per row that counts. 'mean' divides by the rows whose target is not
    ignore_index (0 when there are none, where torch gives NaN); ignored rows
    have loss and lse 0. lse is in float32 (float64 for double). input
    [..., D], target [...]."""
    lead = target.shape
    input, target = input.reshape(-1, input.shape[-1]), target.reshape(-1)
    logits = F.linear(input, weight, bias)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    counts = target != ignore_index
    rows = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    lse = torch.where(counts, lse, torch.zeros_like(lse))
    if z_loss:
        rows = rows + (z_loss * lse * lse).to(rows.dtype)
    if reduction == "none":
        return rows.reshape(lead), lse.reshape(lead)
    total = rows.sum()
    if reduction == "mean":
        total = total / counts.sum().clamp(min=1)
    return total, lse.reshape(lead)


def linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target=None,
                             student_bias=None, teacher_bias=None, temperature=1.0, beta=0.0, hard_weight=0.0,
                             ignore_index=-100, reduction="mean"):
    """Knowledge distillation on two linear layers' logits (bigkernels'
    linear_distillation_loss says what each argument does), in the student's
    dtype: T^2 * soft + hard_weight * cross-entropy(student logits, target)
    per row, soft being KL(P || Q) at beta 0, KL(Q || P) at beta 1, else
    beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, with
    Q = softmax(student / T) and P = softmax(teacher / T). Rows whose target
    is ignore_index count nowhere; 'mean' divides by the rows that count."""
    lead = student_input.shape[:-1]
    student_input, teacher_input = student_input.reshape(-1, student_input.shape[-1]), \
        teacher_input.reshape(-1, teacher_input.shape[-1])
    s = F.linear(student_input, student_weight, student_bias)
    t = F.linear(teacher_input, teacher_weight, teacher_bias).to(s.dtype)
    log_q, log_p = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    if beta == 0:
        soft = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif beta == 1:
        soft = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        soft = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
    rows = temperature * temperature * soft
    counts = torch.ones_like(rows, dtype=torch.bool) if target is None else target.reshape(-1) != ignore_index
    if hard_weight:
        rows = rows + hard_weight * F.cross_entropy(s, target.reshape(-1), ignore_index=ignore_index,
                                                    reduction="none")
    rows = torch.where(counts, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    return total / counts.sum().clamp(min=1) if reduction == "mean" else total
