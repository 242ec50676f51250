import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import scaled_dot_product_attention


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention on bigkernels' fused attention.

    Same constructor, parameters, initialisation, state_dict keys and forward
    signature as torch's, so checkpoints load both ways. With
    need_weights=False (what transformers use) the attention runs on
    bigkernels.scaled_dot_product_attention; need_weights=True, add_bias_kv,
    add_zero_attn and nested tensors take torch's own path, which also
    returns the weights.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights or self.bias_k is not None or self.add_zero_attn or query.is_nested:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention)")
        batched = query.dim() == 3
        # Everything below works on [B, L, E].
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, S, H = query.shape[0], query.shape[1], key.shape[1], self.num_heads

        # torch's mask conventions: bool True = NOT allowed; float = added.
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        use_causal = is_causal and key_padding_mask is None
        mask = None
        if not use_causal and attn_mask is not None:
            mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                     target_type=query.dtype, check_other=False)
            if mask.dim() == 3:  # torch's [B * H, L, S]
                mask = mask.view(B, H, L, S)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(B, 1, 1, S)  # read through a broadcast view, never expanded
            mask = padding if mask is None else mask + padding

        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)

        def heads(x, w, b):  # [B, n, E] -> [B, H, n, D], a strided view
            return F.linear(x, w, b).unflatten(-1, (H, self.head_dim)).transpose(1, 2)

        out = scaled_dot_product_attention(heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v),
                                           attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=use_causal)
        out = F.linear(out.transpose(1, 2).flatten(2), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None
