"""Models people train, built on the fused layers."""

from .dnn import DNN

__all__ = ["DNN"]
