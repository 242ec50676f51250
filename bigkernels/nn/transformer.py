import torch.nn.functional as F
from torch import nn

from ..ops.dense import dense
from .attention import MultiheadAttention

# torch.nn.TransformerEncoderLayer's activations that the dense kernel fuses
_FUSED = {F.relu: "relu", F.gelu: "gelu", F.silu: "silu", F.sigmoid: "sigmoid", F.tanh: "tanh"}


# transformers' activation modules (transformers.activations) by class name, so
# that they are recognised without importing transformers. Each computes the
# function named, whichever of its implementations it was built with.
_HF_ACTIVATIONS = {"GELUActivation": "gelu", "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
                   "FastGELUActivation": "gelu_tanh", "SiLUActivation": "silu"}


def fused_activation_name(activation):
    """Our name for a torch or transformers activation (function or module), or None."""
    if type(activation).__module__ == "transformers.activations":
        return _HF_ACTIVATIONS.get(type(activation).__name__)
    if isinstance(activation, nn.GELU):
        return "gelu" if activation.approximate == "none" else "gelu_tanh"
    for module, name in ((nn.ReLU, "relu"), (nn.SiLU, "silu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh")):
        if isinstance(activation, module):
            return name
    return _FUSED.get(activation)


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer on bigkernels: the self-attention is
    bigkernels.nn.MultiheadAttention and the first feed-forward layer fuses
    its activation (relu, gelu, silu, sigmoid, tanh; other callables run
    after it). Same constructor, parameters, initialisation and state_dict
    keys as torch's; norm_first either way."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        adopt(self)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        # torch's own (non-fast-path) order of operations, on our blocks
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(src_mask), other_name="src_mask",
                                                 target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _ff_block(self, x):
        name = fused_activation_name(self.activation)
        if name is None:
            hidden = self.activation(self.linear1(x))
        else:
            hidden = dense(x, self.linear1.weight, self.linear1.bias, name)
        return self.dropout2(self.linear2(self.dropout(hidden)))


def adopt(module):
    """Turns a torch.nn.MultiheadAttention or TransformerEncoderLayer into
    ours in place: the classes add behaviour, no state, so the parameters,
    buffers and hooks stay exactly as they are."""
    if type(module) is nn.MultiheadAttention:
        module.__class__ = MultiheadAttention
    elif type(module) in (nn.TransformerEncoderLayer, TransformerEncoderLayer):
        module.__class__ = TransformerEncoderLayer
        adopt(module.self_attn)
    return module
