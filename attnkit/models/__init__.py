"""Reference architectures built from the attention blocks."""

from .cnn import AttentionCNN, count_parameters

__all__ = ["AttentionCNN", "count_parameters"]
from .bert import BertConfig, BertEncoder, BertTokenizer, load_minilm  # noqa: E402

__all__ += ["BertConfig", "BertEncoder", "BertTokenizer", "load_minilm"]
from .decoding import Decoded, beam_search, greedy_decode  # noqa: E402
from .seq2seq import GRUSeq2Seq, Seq2SeqBase  # noqa: E402
from .transformer_mt import TransformerMT  # noqa: E402

__all__ += ["Decoded", "GRUSeq2Seq", "Seq2SeqBase", "TransformerMT", "beam_search", "greedy_decode"]
