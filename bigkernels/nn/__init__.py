"""Drop-in layers: same constructors, forward signatures and state_dict keys
as their torch.nn counterparts."""

from .attention import MultiheadAttention
from .linear import MLP, Linear
from .losses import LinearCrossEntropyLoss, LinearDistillationLoss
from .rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .transformer import TransformerEncoderLayer

__all__ = ["Linear", "MLP", "MultiheadAttention", "TransformerEncoderLayer", "RNN", "LSTM", "GRU", "RNNCell",
           "LSTMCell", "GRUCell",
           "LinearCrossEntropyLoss", "LinearDistillationLoss"]
