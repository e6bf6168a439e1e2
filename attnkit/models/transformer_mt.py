"""Transformer encoder-decoder for translation, built from attnkit's own layers, decoding with the KV cache.

Vaswani et al. "Attention Is All You Need", NeurIPS 2017. https://arxiv.org/abs/1706.03762

Embeddings scaled by ``sqrt(D)`` plus the sinusoidal table (:class:`~attnkit.layers.SinusoidalPosition`),
pre-norm :class:`~attnkit.layers.TransformerEncoder` / :class:`~attnkit.layers.TransformerDecoder` stacks (pre-norm
trains stably without a long warm-up, Xiong et al. 2020), and an output projection tied to the target embeddings.
``step`` decodes one token per call with one :class:`~attnkit.layers.DecoderLayerCache` per layer (self-attention
keys/values cached, memory keys/values projected once into a :class:`~attnkit.layers.CrossKVCache`), and beam
search reorders those caches in place (``reorder_state``); its alignment weights are the last layer's
cross-attention averaged over heads, read through the ``Attend`` tap (no maps are stored on the model).

Example:
    >>> import torch
    >>> from attnkit.models.transformer_mt import TransformerMT
    >>> model = TransformerMT(50, 60, d_model=32, nhead=4, num_layers=2, dim_feedforward=64).eval()
    >>> src = torch.randint(4, 50, (2, 7)); src_mask = torch.ones(2, 7, dtype=torch.bool)   # (B, S)
    >>> tgt_in = torch.randint(4, 60, (2, 5))                                                 # (B, T)
    >>> full = model(src, src_mask, tgt_in)                                                   # (B, T, V)
    >>> memory = model.encode(src, src_mask); state = model.init_state(memory)
    >>> steps = [model.step(tgt_in[:, t], state, memory)[0] for t in range(5)]
    >>> full.shape, torch.allclose(torch.stack(steps, 1), full, atol=1e-4)                  # cache == recompute
    (torch.Size([2, 5, 60]), True)
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnkit._errors import fail
from attnkit.layers import (
    SinusoidalPosition,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

from .seq2seq import Seq2SeqBase, check_src_mask, check_tokens

__all__ = ["TransformerMT"]


class TransformerMT(Seq2SeqBase):
    """Pre-norm Transformer encoder-decoder with tied target embeddings.

    Args:
        src_vocab: source vocabulary size (id 0 is padding).
        tgt_vocab: target vocabulary size.
        d_model: width ``D``.
        nhead: attention heads.
        num_layers: encoder and decoder layers each.
        dim_feedforward: feed-forward hidden size.
        dropout: everywhere while training.

    Shape:
        src ``(B, S)`` ids, src_mask ``(B, S)`` boolean (``True`` = real token, ``False`` = padding that no
        attention reads), tgt_in ``(B, T)`` ids -> logits ``(B, T, tgt_vocab)``. ``step`` takes tokens ``(B,)``
        and returns logits ``(B, V)`` and weights ``(B, S)``.
    """

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        *,
        d_model: int = 256,
        nhead: int = 4,
        num_layers: int = 3,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("src_vocab", src_vocab), ("tgt_vocab", tgt_vocab), ("num_layers", num_layers)):
            if not isinstance(val, int) or val <= 0:
                raise fail(f"{name} to be a positive int", repr(val), f"{name}=3")
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.src_vocab, self.tgt_vocab, self.d_model = src_vocab, tgt_vocab, d_model
        self.nhead, self.num_layers, self.dim_feedforward, self.dropout = nhead, num_layers, dim_feedforward, dropout
        self.src_embed = nn.Embedding(src_vocab, d_model, padding_idx=0, **kw)
        self.tgt_embed = nn.Embedding(tgt_vocab, d_model, padding_idx=0, **kw)
        nn.init.normal_(self.src_embed.weight, std=d_model**-0.5)
        nn.init.normal_(self.tgt_embed.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.src_embed.weight[0].zero_()
            self.tgt_embed.weight[0].zero_()
        self.position = SinusoidalPosition(d_model, **kw)
        self.drop = nn.Dropout(dropout)
        layer = {"dim_feedforward": dim_feedforward, "dropout": dropout, "norm_first": True, **kw}
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(d_model, nhead, **layer), num_layers, norm=nn.LayerNorm(d_model, **kw)
        )
        self.decoder = TransformerDecoder(
            TransformerDecoderLayer(d_model, nhead, **layer), num_layers, norm=nn.LayerNorm(d_model, **kw)
        )

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this model (stored in checkpoints)."""
        return {
            "arch": "transformer",
            "attention": "transformer",
            "src_vocab": self.src_vocab,
            "tgt_vocab": self.tgt_vocab,
            "d_model": self.d_model,
            "nhead": self.nhead,
            "num_layers": self.num_layers,
            "dim_feedforward": self.dim_feedforward,
            "dropout": self.dropout,
        }

    def _embed(self, embed: nn.Embedding, ids: Tensor, offset: int = 0) -> Tensor:
        x = embed(ids) * math.sqrt(self.d_model)  # (B, L, D)
        return self.drop(self.position(x, offset=offset))

    def _logits(self, x: Tensor) -> Tensor:
        return x @ self.tgt_embed.weight.t()  # tied output projection: (B, L, V)

    def encode(self, src: Tensor, src_mask: Tensor) -> dict[str, Tensor]:
        """Memory ``(B, S, D)`` and its mask ``(B, S)``."""
        check_tokens("src", src, self.src_vocab)
        check_src_mask(src_mask, src)
        h = self.encoder(self._embed(self.src_embed, src), key_mask=src_mask)  # (B, S, D)
        return {"memory": h, "src_mask": src_mask}

    def forward(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: logits ``(B, T, V)`` for the next token after each of ``tgt_in`` ``(B, T)``."""
        check_tokens("tgt_in", tgt_in, self.tgt_vocab)
        mem = self.encode(src, src_mask)
        y = self._embed(self.tgt_embed, tgt_in)  # (B, T, D)
        # padded target positions only feed later padded positions, whose loss is ignored: causal mask suffices
        out = self.decoder(y, mem["memory"], memory_key_mask=mem["src_mask"], is_causal=True)
        return self._logits(out)

    def init_state(self, memory: dict[str, Tensor]) -> dict[str, Any]:
        return {"caches": self.decoder.new_cache(capacity=64)}

    def step(self, tokens: Tensor, state: dict[str, Any], memory: dict[str, Tensor]) -> tuple[Tensor, Any, Tensor]:
        """One token per sentence with the KV cache: tokens ``(B,)`` -> logits ``(B, V)``, weights ``(B, S)``."""
        caches = state["caches"]
        y = self._embed(self.tgt_embed, tokens[:, None], offset=caches[0].length)  # (B, 1, D)
        seen: list[Tensor] = []
        last = cast(TransformerDecoderLayer, self.decoder.layers[-1])
        remove = last.multihead_attn.attend.add_observer(lambda _m, w: seen.append(w))
        try:
            out = self.decoder(y, memory["memory"], memory_key_mask=memory["src_mask"], is_causal=True, cache=caches)
        finally:
            remove()
        weights = seen[-1].mean(dim=1)[:, -1]  # (B, H, 1, S) -> (B, S)
        return self._logits(out)[:, -1], state, weights

    def reorder_state(self, state: dict[str, Any], index: Tensor) -> dict[str, Any]:
        """Pick rows ``index`` of every layer's caches (beam search), in place where the batch size stays."""
        for c in state["caches"]:
            c.reorder(index)
        return state
