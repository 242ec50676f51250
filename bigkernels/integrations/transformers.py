"""Hugging Face transformers backend: after register(), models built with
attn_implementation="bigkernels" run their attention on
bigkernels.scaled_dot_product_attention.

    import bigkernels.integrations.transformers as bk_hf
    bk_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="bigkernels")

bigkernels.optimize(model) also uses optimize_blocks() below: the blocks of
the model families it knows, and this backend where the model takes it.

transformers is an optional dependency: importing this module does not
import it; register() does.
"""

from torch import nn

from ..nn.transformer import fused_activation_name
from ..ops.attention import scaled_dot_product_attention
from ..ops.norm import layer_norm

NAME = "bigkernels"

# The BERT-like encoder families, as (module, class prefix): their blocks
# below are recognised by module and class name, so transformers need not be
# imported to look. Checked against transformers 5.25's code.
_BERT_FAMILIES = (("bert", "Bert"), ("roberta", "Roberta"), ("xlm_roberta", "XLMRoberta"), ("camembert", "Camembert"),
                  ("electra", "Electra"), ("mpnet", "MPNet"), ("data2vec", "Data2VecText"), ("ernie", "Ernie"))

# Blocks whose forward is activation(linear(x)) through two attributes:
# class -> (linear, activation).
DENSE_ACTIVATION_BLOCKS = {
    f"transformers.models.{family}.modeling_{family}.{prefix}Intermediate": ("dense", "intermediate_act_fn")
    for family, prefix in _BERT_FAMILIES
}
DENSE_ACTIVATION_BLOCKS["transformers.models.distilbert.modeling_distilbert.FFN"] = ("lin1", "activation")

# Blocks whose forward is LayerNorm(dropout(dense(hidden_states)) + input_tensor)
# (attributes dense, dropout, LayerNorm): their class becomes a subclass
# whose forward fuses the residual add into the norm.
RESIDUAL_NORM_BLOCKS = {
    f"transformers.models.{family}.modeling_{family}.{prefix}{kind}"
    for family, prefix in _BERT_FAMILIES for kind in ("SelfOutput", "Output")
} - {"transformers.models.mpnet.modeling_mpnet.MPNetSelfOutput"}  # not this pattern (no such class)


class _ResidualNormBlock:
    """The forward of RESIDUAL_NORM_BLOCKS with the add fused into the norm;
    the parameters and state_dict are the block's own."""

    def forward(self, hidden_states, input_tensor):
        norm = self.LayerNorm
        return layer_norm(self.dropout(self.dense(hidden_states)), norm.weight, norm.bias, norm.eps,
                          residual=input_tensor)[0]

    def __reduce_ex__(self, protocol):
        # pickled (and deep-copied) as the transformers class, fused again when rebuilt
        return _rebuild_fused, (self._unfused_class, self.__dict__)


_FUSED_CLASSES = {}


def _fused_class(cls):
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(cls.__name__, (_ResidualNormBlock, cls),
                                   {"__module__": __name__, "_unfused_class": cls})
    return _FUSED_CLASSES[cls]


def _rebuild_fused(cls, state):
    module = cls.__new__(cls)
    module.__dict__.update(state)
    module.__class__ = _fused_class(cls)
    return module


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


def _class_path(module):
    return f"{type(module).__module__}.{type(module).__qualname__}"


def optimize_blocks(model, to_fused):
    """The Hugging Face part of bigkernels.optimize(): in the blocks of
    DENSE_ACTIVATION_BLOCKS, the activation is fused into the linear
    (to_fused(linear, activation) shares its parameters) and replaced by
    nn.Identity; those of RESIDUAL_NORM_BLOCKS add their residual inside the
    LayerNorm (bigkernels.layer_norm). Models on torch's SDPA backend move to
    this one (register() is called); those on another (eager, flash...) keep
    it, as do models that cannot change theirs. Already optimized blocks and
    models are left alone."""
    for module in model.modules():
        names = DENSE_ACTIVATION_BLOCKS.get(_class_path(module))
        if names is None:
            continue
        linear, activation = (getattr(module, name, None) for name in names)
        activation = fused_activation_name(activation)
        if type(linear) is nn.Linear and activation is not None:
            setattr(module, names[0], to_fused(linear, activation))
            setattr(module, names[1], nn.Identity())
    for module in model.modules():
        norm = getattr(module, "LayerNorm", None)
        if _class_path(module) in RESIDUAL_NORM_BLOCKS and type(norm) is nn.LayerNorm \
                and len(norm.normalized_shape) == 1:
            module.__class__ = _fused_class(type(module))
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(module, "set_attn_implementation"):
            continue
        if not module._can_set_attn_implementation():
            continue
        register()
        try:
            module.set_attn_implementation(NAME)
        except ValueError:  # the model refuses attention backends (_supports_attention_backend is False)
            pass


def register():
    """Registers the backend (and its mask format, SDPA's) under the name
    "bigkernels" with transformers' AttentionInterface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
