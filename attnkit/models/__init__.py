"""Reference architectures built from the attention blocks."""

from .cnn import AttentionCNN, count_parameters

__all__ = ["AttentionCNN", "count_parameters"]
from .bert import BertConfig, BertEncoder, BertTokenizer, load_minilm  # noqa: E402

__all__ += ["BertConfig", "BertEncoder", "BertTokenizer", "load_minilm"]
