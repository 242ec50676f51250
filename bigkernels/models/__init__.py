"""Models people train, built on the fused layers."""

from .dnn import DNN
from .transformer import Transformer

__all__ = ["DNN", "Transformer"]
