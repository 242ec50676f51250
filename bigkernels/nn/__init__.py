"""Drop-in layers: same constructors, forward signatures and state_dict keys
as their torch.nn counterparts."""

from .attention import MultiheadAttention
from .linear import MLP, Linear
from .transformer import TransformerEncoderLayer

__all__ = ["Linear", "MLP", "MultiheadAttention", "TransformerEncoderLayer"]
