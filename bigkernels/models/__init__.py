"""Models people train, built on the fused layers."""

from .dnn import DNN
from .rnn import RNNModel
from .transformer import Transformer

__all__ = ["DNN", "RNNModel", "Transformer"]
