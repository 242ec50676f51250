from torch import nn

from .nn import Linear
from .nn.rnn import FUSED_RNN_CLASSES
from .nn.transformer import adopt, fused_activation_name


def _to_fused(linear, activation):
    """Our Linear sharing linear's parameters (so optimizers keep working)."""
    fused = Linear(linear.in_features, linear.out_features, linear.bias is not None, activation,
                   device="meta")
    fused.weight = linear.weight
    fused.bias = linear.bias
    fused.train(linear.training)
    return fused


def optimize(model):
    """Swaps torch.nn layers for bigkernels' in place, keeping their
    parameters: nn.MultiheadAttention and nn.TransformerEncoderLayer become
    ours (same parameters, the fused attention inside). In Hugging Face
    models, the blocks of the families we know fuse their activations and
    residual norms, and the attention moves from SDPA to our backend
    (optimize_blocks in integrations/transformers.py). nn.Linear becomes
    bigkernels.nn.Linear, and inside nn.Sequential a Linear followed by ReLU,
    GELU, SiLU, Sigmoid or Tanh becomes one fused Linear (the activation
    module is replaced by nn.Identity). nn.RNN, LSTM, GRU and their cells
    become ours: the same module with its class changed (ours replace forward
    only). Returns the model."""
    if type(model) is nn.Linear:
        return _to_fused(model, None)
    if any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        from .integrations.transformers import optimize_blocks

        optimize_blocks(model, _to_fused)
    for module in model.modules():
        if type(module) in FUSED_RNN_CLASSES:
            module.__class__ = FUSED_RNN_CLASSES[type(module)]
    for module in model.modules():
        if type(module) in (nn.MultiheadAttention, nn.TransformerEncoderLayer):
            adopt(module)
    for parent in model.modules():
        if isinstance(parent, (nn.MultiheadAttention, nn.TransformerEncoderLayer)):
            continue  # their Linears are read as weights by the attention code
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if type(child) is not nn.Linear:
                continue
            activation = None
            if isinstance(parent, nn.Sequential) and i + 1 < len(children):
                activation = fused_activation_name(children[i + 1][1])
            setattr(parent, name, _to_fused(child, activation))
            if activation is not None:
                setattr(parent, children[i + 1][0], nn.Identity())
    return model
