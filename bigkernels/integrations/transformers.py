"""Hugging Face transformers backend: after register(), models built with
attn_implementation="bigkernels" run their attention on
bigkernels.scaled_dot_product_attention.

    import bigkernels.integrations.transformers as bk_hf
    bk_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="bigkernels")

transformers is an optional dependency: importing this module does not
import it; register() does.
"""

from ..ops.attention import scaled_dot_product_attention

NAME = "bigkernels"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      position_bias=None, **kwargs):
    """transformers' attention-function signature (that of its own SDPA
    backend): query [B, H, L, D], key/value [B, Hkv, S, D], attention_mask
    bool (True = attend) or additive float, or None; returns ([B, L, H, D],
    None). GQA runs without repeating K/V."""
    if kwargs.get("softcap") is not None:
        raise ValueError("the bigkernels attention backend does not support softcap")
    L, S = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = L > 1 and attention_mask is None and is_causal
    if is_causal and S > L:  # a prefill against a larger empty cache: as transformers' SDPA backend does
        key, value = key[:, :, :L], value[:, :, :L]
        if position_bias is not None:
            position_bias = position_bias[..., :L]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                       scale=scaling, is_causal=is_causal, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register():
    """Registers the backend (and its mask format, SDPA's) under the name
    "bigkernels" with transformers' AttentionInterface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
