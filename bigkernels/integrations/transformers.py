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

import weakref

import torch
from torch import nn

from ..nn.linear import Linear
from ..nn.transformer import fused_activation_name
from ..ops.attention import scaled_dot_product_attention
from ..ops.dense import dense
from ..ops.losses import _linear_cross_entropy
from ..ops.norm import residual_layer_norm_output, rms_norm
from ..ops.varlen import varlen_attention

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


# The Llama-like decoder families: their RMSNorm, MLP and decoder layer are
# Llama's code (checked against transformers 5.25).
_LLAMA_FAMILIES = (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"))


def _classes(families, kind):
    return {f"transformers.models.{family}.modeling_{family}.{prefix}{kind}" for family, prefix in families}


class _Fused:
    """A fused forward for a transformers block: optimize_blocks() swaps the
    block's class for a subclass of it with one of these first, so the
    parameters, state_dict and everything but forward stay the block's own."""

    def __reduce_ex__(self, protocol):
        # pickled (and deep-copied) as the transformers class, fused again when rebuilt
        return _rebuild_fused, (self._unfused_class, self._fused_forward, self.__dict__)


class _ResidualNormBlock(_Fused):
    """RESIDUAL_NORM_BLOCKS: the residual add fused into the LayerNorm."""

    def forward(self, hidden_states, input_tensor):
        norm = self.LayerNorm
        return residual_layer_norm_output(self.dropout(self.dense(hidden_states)), input_tensor, norm.weight,
                                          norm.bias, norm.eps)


class _RMSNorm(_Fused):
    """Llama's RMSNorm on bigkernels.rms_norm (statistics in float32, as
    there); residual= adds it first and returns (output, sum)."""

    def forward(self, hidden_states, residual=None):
        if self.weight.dtype == hidden_states.dtype:
            return rms_norm(hidden_states, self.weight, self.variance_epsilon, residual=residual)
        # A weight in another dtype: torch promotes the product, our op does not.
        if residual is None:
            return super().forward(hidden_states)
        hidden_states = hidden_states + residual
        return super().forward(hidden_states), hidden_states


def _plain_linear(module):
    """A Linear whose forward is x @ weight.T + bias, nothing else (not
    wrapped since by LoRA, quantization...)."""
    return type(module) is nn.Linear or (type(module) is Linear and module.activation == "none")


_GATED = {"silu": "swiglu", "gelu": "geglu"}  # the activation of gate_proj -> the gated activation


class _GatedMLP(_Fused):
    """Llama's MLP, down(act(gate(x)) * up(x)): gate and up as one gated dense
    reading both weights in place (dense's up_weight), then down."""

    def forward(self, x):
        gate, up = self.gate_proj, self.up_proj
        activation = _GATED.get(fused_activation_name(self.act_fn))
        if activation is None or not (_plain_linear(gate) and _plain_linear(up)) \
                or (gate.bias is None) != (up.bias is None):
            return super().forward(x)
        bias = None if gate.bias is None else torch.cat([gate.bias, up.bias])
        return self.down_proj(dense(x, gate.weight, bias, activation, up_weight=up.weight))


class _DecoderLayer(_Fused):
    """Llama's decoder layer with the residual add after the attention fused
    into post_attention_layernorm (a _RMSNorm)."""

    def forward(self, hidden_states, *args, **kwargs):
        norm = self.post_attention_layernorm
        if args or not isinstance(norm, _RMSNorm):  # called positionally: transformers' own forward
            return super().forward(hidden_states, *args, **kwargs)
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states, residual = norm(hidden_states, residual=residual)
        return residual + self.mlp(hidden_states)


class _Conv1DMLP(_Fused):
    """GPT-2's MLP, c_proj(act(c_fc(x))): the activation fused into c_fc,
    whose Conv1D weight [in, out] the CPU dense reads in place, transposed.
    Elsewhere transformers' forward (our CUDA kernel would copy it)."""

    def forward(self, hidden_states):
        fc = self.c_fc
        activation = fused_activation_name(self.act)
        if hidden_states.device.type != "cpu" or activation is None or type(fc).__name__ != "Conv1D":
            return super().forward(hidden_states)
        return self.dropout(self.c_proj(dense(hidden_states, fc.weight.t(), fc.bias, activation)))


class _CausalLM(_Fused):
    """Causal LMs (Llama, Mistral, Qwen2/3, GPT-2) given labels while
    training or computing gradients: the loss from the base model's last
    hidden states and lm_head's weight through linear_cross_entropy, as
    transformers' causal-LM loss computes it (labels shifted, or
    shift_labels; the mean over the tokens that count, or the sum over
    num_items_in_batch; float32), without the [tokens x vocabulary] logits:
    the output's logits are None then, as with Liger's patch (which asks for
    training mode alone). Evaluating (eval mode without gradients), or
    without labels, runs transformers' own forward (logits, generate)."""

    def forward(self, *args, labels=None, logits_to_keep=0, **kwargs):
        head = self.lm_head
        training = self.training or torch.is_grad_enabled()
        if labels is None or not training or not _plain_linear(head):
            return super().forward(*args, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        loss_options = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index", "shift_labels")
                        if k in kwargs}
        outputs = getattr(self, self.base_model_prefix)(*args, **kwargs)
        ignore_index = loss_options.get("ignore_index", -100)
        shift_labels = loss_options.get("shift_labels")
        if shift_labels is None:  # tokens < n predict n
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        items = loss_options.get("num_items_in_batch")
        hidden = outputs.last_hidden_state
        loss, _ = _linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device), head.bias,
                                        ignore_index=ignore_index, reduction="mean" if items is None else "sum",
                                        softcap=getattr(self.config, "final_logit_softcapping", None))
        loss = loss.float()  # transformers' loss is float32 whatever the model's dtype
        if items is not None:
            loss = loss / (items.to(loss.device) if torch.is_tensor(items) else items)
        from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast

        output_class = CausalLMOutputWithCrossAttentions if hasattr(outputs, "cross_attentions") \
            else CausalLMOutputWithPast
        fields = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        return output_class(loss=loss, logits=None, **fields)


# class -> the fused forward its blocks take
FUSED_FORWARDS = {
    **{name: _ResidualNormBlock for name in RESIDUAL_NORM_BLOCKS},
    **{name: _RMSNorm for name in _classes(_LLAMA_FAMILIES, "RMSNorm")},
    **{name: _GatedMLP for name in _classes(_LLAMA_FAMILIES, "MLP")},
    **{name: _DecoderLayer for name in _classes(_LLAMA_FAMILIES, "DecoderLayer")},
    **{name: _CausalLM for name in _classes(_LLAMA_FAMILIES, "ForCausalLM")},
    "transformers.models.gpt2.modeling_gpt2.GPT2MLP": _Conv1DMLP,
    "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel": _CausalLM,
}

_FUSED_CLASSES = {}


def _fused_class(cls, fused_forward):
    key = (cls, fused_forward)
    if key not in _FUSED_CLASSES:
        _FUSED_CLASSES[key] = type(cls.__name__, (fused_forward, cls),
                                   {"__module__": __name__, "_unfused_class": cls, "_fused_forward": fused_forward})
    return _FUSED_CLASSES[key]


def _rebuild_fused(cls, fused_forward, state):
    module = cls.__new__(cls)
    module.__dict__.update(state)
    module.__class__ = _fused_class(cls, fused_forward)
    return module


def _can_fuse(module, fused_forward):
    """Whether the block has what its fused forward reads."""
    if fused_forward is _ResidualNormBlock:
        norm = getattr(module, "LayerNorm", None)
        return type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1
    if fused_forward is _RMSNorm:
        return isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1
    return True  # the others check at each call, and fall back to transformers' forward


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      position_bias=None, **kwargs):
    """transformers' attention-function signature (that of its own SDPA
    backend): query [B, H, L, D], key/value [B, Hkv, S, D], attention_mask
    bool (True = attend) or additive float, or None; returns ([B, L, H, D],
    None). GQA runs without repeating K/V; softcap (Gemma 2's) is applied
    inside the kernels. Sequences packed in one row (padding-free training)
    run on varlen_attention: no work across sequences (_packed_sequences)."""
    softcap = kwargs.get("softcap") or 0.0
    L, S = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    packed = None if position_bias is not None else _packed_sequences(query, key, attention_mask, is_causal, kwargs)
    if packed is not None:  # padding-free training: the sequences packed in one row, none padded
        cu_seqlens, max_length = packed
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D] views
        out = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, dropout_p=dropout,
                               softmax_scale=scaling, causal=is_causal, softcap=softcap)
        return out[None], None
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
                                       scale=scaling, is_causal=is_causal, enable_gqa=key.shape[1] != query.shape[1],
                                       softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


# The last mask checked against the packed sequences it stands for: (the
# mask, is_causal, the sequences) (_packed_sequences); a model's layers share
# one mask per forward.
_packed_mask = (lambda: None, None, None)


def _packed_sequences(query, key, attention_mask, is_causal, kwargs):
    """(cu_seqlens, max_length) when the batch is several sequences packed in
    one row (transformers' padding-free training, DataCollatorWithFlattening),
    else None. The sequences come from flash-attention's kwargs (cu_seq_lens_q
    and _k, equal) or from where position_ids restart, as transformers' flash
    backends find them. Since transformers hands this backend its SDPA mask,
    they are used only when that mask is none or exactly the sequences'
    block-diagonal one (causal for causal models): padding or a sliding
    window it also carries keeps the mask's path."""
    global _packed_mask
    T = query.shape[2]
    if query.shape[0] != 1 or key.shape[2] != T or T == 0 or torch.compiler.is_compiling():
        return None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool or attention_mask.shape != (1, 1, T, T):
            return None
        if _packed_mask[0]() is attention_mask and _packed_mask[1] == is_causal:
            return _packed_mask[2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        if not torch.equal(cu_q, cu_k):
            return None
        cu_seqlens = cu_q.to(device=query.device, dtype=torch.int32)
    else:
        position_ids = kwargs.get("position_ids")
        if position_ids is None or position_ids.numel() != T:
            return None
        position_ids = position_ids.reshape(-1)
        starts = (position_ids == position_ids.min()).nonzero().view(-1)
        if starts.numel() < 2:  # one sequence: nothing is packed
            return None
        cu_seqlens = torch.cat([starts, starts.new_tensor([T])]).to(device=query.device, dtype=torch.int32)
    lengths = cu_seqlens.diff()
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T or bool((lengths < 0).any()):
        return None
    packed = (cu_seqlens, int(lengths.max()))
    if attention_mask is not None:
        sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=query.device), lengths.long())
        expected = sequence[:, None] == sequence[None, :]
        if is_causal:
            expected = expected.tril()
        if not torch.equal(attention_mask[0, 0], expected):
            return None
        _packed_mask = (weakref.ref(attention_mask), is_causal, packed)
    return packed


def _class_path(module):
    return f"{type(module).__module__}.{type(module).__qualname__}"


def optimize_blocks(model, to_fused):
    """The Hugging Face part of bigkernels.optimize(): in the blocks of
    DENSE_ACTIVATION_BLOCKS, the activation is fused into the linear
    (to_fused(linear, activation) shares its parameters) and replaced by
    nn.Identity. The blocks of FUSED_FORWARDS take a fused forward (a class
    swap): BERT-like output blocks add their residual inside the LayerNorm;
    Llama-like models run RMSNorm on bigkernels.rms_norm with the residual add
    after the attention fused in, and gate/up as one gated dense over both
    weights; GPT-2's MLP fuses gelu_new into c_fc; and these causal LMs
    compute a training loss through linear_cross_entropy. Models on torch's SDPA backend move to
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
        fused_forward = FUSED_FORWARDS.get(_class_path(module))
        if fused_forward is not None and _can_fuse(module, fused_forward):
            module.__class__ = _fused_class(type(module), fused_forward)
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
