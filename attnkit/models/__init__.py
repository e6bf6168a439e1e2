"""Reference architectures built from the attention blocks."""

from .cnn import AttentionCNN, count_parameters

__all__ = ["AttentionCNN", "count_parameters"]
