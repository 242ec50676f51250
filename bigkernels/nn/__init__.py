"""Drop-in layers: same constructors, forward signatures and state_dict keys
as their torch.nn counterparts."""

from .linear import MLP, Linear

__all__ = ["Linear", "MLP"]
