"""GRU encoder-decoder for translation: no attention (the baseline), Bahdanau attention, or Luong attention.

Papers:

* Cho et al. "Learning Phrase Representations using RNN Encoder-Decoder for Statistical Machine Translation",
  EMNLP 2014. https://arxiv.org/abs/1406.1078 (the fixed-context encoder-decoder: ``attention="none"``)
* Bahdanau, Cho, Bengio. "Neural Machine Translation by Jointly Learning to Align and Translate", ICLR 2015.
  https://arxiv.org/abs/1409.0473 (``attention="bahdanau"``)
* Luong, Pham, Manning. "Effective Approaches to Attention-based Neural Machine Translation", EMNLP 2015.
  https://arxiv.org/abs/1508.04025 (``attention="luong"``, global attention with input feeding)

All three share the encoder: embeddings and a bidirectional GRU whose two directions are concatenated into the
annotations ``h_j`` (``hidden_dim`` features, half per direction); the decoder's first state is
``tanh(W [h_fwd_last; h_bwd_first])``. They differ in what the decoder sees of the source:

=============  =====================================================================================
attention      decoder step ``t`` (``y`` = previous target token, ``s`` = decoder state)
=============  =====================================================================================
``none``       ``s_t = GRU([E y; c], s_{t-1})`` with one fixed summary ``c`` (mean of the annotations);
               ``o_t = tanh(W_o [s_t; c; E y])``
``bahdanau``   ``c_t = Additive(s_{t-1}, h)``; ``s_t = GRU([E y; c_t], s_{t-1})``; ``o_t = tanh(W_o [s_t; c_t; E y])``
``luong``      ``s_t = GRU([E y; o_{t-1}], s_{t-1})`` (input feeding); ``o_t = tanh(W_c [Luong(s_t, h); s_t])``
=============  =====================================================================================

and ``logits_t = W_out o_t``. The attention modules are attnkit's :class:`~attnkit.layers.AdditiveAttention` and
:class:`~attnkit.layers.LuongAttention`, so ``attnkit.viz.capture`` sees every alignment through their taps.

Example:
    >>> import torch
    >>> from attnkit.models.seq2seq import GRUSeq2Seq
    >>> model = GRUSeq2Seq(50, 60, attention="bahdanau", embed_dim=16, hidden_dim=32)
    >>> src = torch.randint(4, 50, (2, 7)); src_mask = torch.ones(2, 7, dtype=torch.bool)   # (B, S)
    >>> tgt_in = torch.randint(4, 60, (2, 5))                                                 # (B, T)
    >>> model(src, src_mask, tgt_in).shape                                                    # (B, T, V)
    torch.Size([2, 5, 60])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnkit._errors import fail
from attnkit.layers import AdditiveAttention, LuongAttention

__all__ = ["ATTENTIONS", "GRUSeq2Seq", "Seq2SeqBase"]

ATTENTIONS = ("none", "bahdanau", "luong")
State = dict[str, Tensor]


def check_tokens(name: str, x: Any, vocab: int) -> Tensor:
    """A ``(B, L)`` integer tensor of ids below ``vocab``."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise fail(f"{name} of shape (B, L) with integer token ids", f"{shape}", f"{name}.long().view(B, L)")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
        raise fail(f"{name} ids in [0, {vocab})", f"ids in [{int(x.min())}, {int(x.max())}]", "the model's tokenizer")
    return x


def check_src_mask(src_mask: Any, src: Tensor) -> Tensor:
    if not isinstance(src_mask, Tensor) or src_mask.shape != src.shape or src_mask.dtype != torch.bool:
        got = f"{tuple(src_mask.shape)} {src_mask.dtype}" if isinstance(src_mask, Tensor) else type(src_mask).__name__
        raise fail(f"a boolean src_mask of shape {tuple(src.shape)} (True = real token)", got, "src != PAD")
    if not bool(src_mask.any(dim=1).all()):
        raise fail("at least one real token in every source row", "an empty row", "dropping empty sentences")
    return src_mask


class Seq2SeqBase(nn.Module):
    """What :mod:`attnkit.models.decoding` needs from a translation model.

    * ``encode(src, src_mask) -> memory``: a dict of tensors, batch first;
    * ``init_state(memory) -> state``: a dict of tensors, batch first;
    * ``step(tokens (B,), state, memory) -> (logits (B, V), state, weights (B, S) or None)``;
    * ``reorder_state(state, index)``: pick / repeat rows of the state (beam search).
    """

    src_vocab: int
    tgt_vocab: int

    def encode(self, src: Tensor, src_mask: Tensor) -> State:
        raise TypeError(f"{type(self).__name__} must define encode()")

    def init_state(self, memory: State) -> State:
        raise TypeError(f"{type(self).__name__} must define init_state()")

    def step(self, tokens: Tensor, state: State, memory: State) -> tuple[Tensor, State, Tensor | None]:
        raise TypeError(f"{type(self).__name__} must define step()")

    def reorder_state(self, state: State, index: Tensor) -> State:
        return {k: v.index_select(0, index) for k, v in state.items()}

    @staticmethod
    def reorder_memory(memory: State, index: Tensor) -> State:
        return {k: v.index_select(0, index) for k, v in memory.items()}


class GRUSeq2Seq(Seq2SeqBase):
    """Bidirectional-GRU encoder and GRU decoder with ``attention`` = ``"none"``, ``"bahdanau"`` or ``"luong"``.

    Args:
        src_vocab: source vocabulary size (id 0 is padding).
        tgt_vocab: target vocabulary size.
        attention: ``"none"`` (Cho et al. 2014 baseline), ``"bahdanau"`` (additive), ``"luong"`` (global, input
            feeding).
        embed_dim: embedding size.
        hidden_dim: decoder state size and annotation size (each encoder direction has ``hidden_dim // 2``).
        attn_dim: hidden size of Bahdanau's alignment MLP (default ``hidden_dim``).
        luong_score: ``"dot"``, ``"general"`` or ``"concat"``.
        dropout: on embeddings and decoder outputs while training.

    Shape:
        src ``(B, S)`` ids, src_mask ``(B, S)`` boolean (``True`` = real token, ``False`` = padding, which no
        attention reads), tgt_in ``(B, T)`` ids -> logits ``(B, T, tgt_vocab)``. ``step`` returns logits
        ``(B, V)`` and weights ``(B, S)`` (``None`` without attention).
    """

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        *,
        attention: str = "bahdanau",
        embed_dim: int = 256,
        hidden_dim: int = 256,
        attn_dim: int | None = None,
        luong_score: str = "general",
        dropout: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise fail(f"attention in {ATTENTIONS}", repr(attention), 'attention="bahdanau"')
        for name, val in (("src_vocab", src_vocab), ("tgt_vocab", tgt_vocab), ("embed_dim", embed_dim)):
            if not isinstance(val, int) or val <= 0:
                raise fail(f"{name} to be a positive int", repr(val), f"{name}=256")
        if not isinstance(hidden_dim, int) or hidden_dim <= 0 or hidden_dim % 2:
            raise fail("an even positive hidden_dim (half per encoder direction)", repr(hidden_dim), "hidden_dim=256")
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.src_vocab, self.tgt_vocab, self.attention = src_vocab, tgt_vocab, attention
        self.hidden_dim = hidden_dim
        self.src_embed = nn.Embedding(src_vocab, embed_dim, padding_idx=0, **kw)
        self.tgt_embed = nn.Embedding(tgt_vocab, embed_dim, padding_idx=0, **kw)
        self.encoder = nn.GRU(embed_dim, hidden_dim // 2, batch_first=True, bidirectional=True, **kw)
        self.bridge = nn.Linear(hidden_dim, hidden_dim, **kw)  # first decoder state from both final states
        self.drop = nn.Dropout(dropout)
        self.attn: nn.Module | None
        self.readout: nn.Linear | None
        if attention == "bahdanau":
            self.attn = AdditiveAttention(hidden_dim, hidden_dim, attn_dim or hidden_dim, **kw)
            self.cell = nn.GRUCell(embed_dim + hidden_dim, hidden_dim, **kw)
            self.readout = nn.Linear(hidden_dim * 2 + embed_dim, hidden_dim, **kw)
        elif attention == "luong":
            # output_dim makes LuongAttention own W_c: o_t = tanh(W_c [c_t; s_t])
            self.attn = LuongAttention(hidden_dim, hidden_dim, score=luong_score, output_dim=hidden_dim, **kw)
            self.cell = nn.GRUCell(embed_dim + hidden_dim, hidden_dim, **kw)
            self.readout = None
        else:
            self.attn = None
            self.cell = nn.GRUCell(embed_dim + hidden_dim, hidden_dim, **kw)
            self.readout = nn.Linear(hidden_dim * 2 + embed_dim, hidden_dim, **kw)
        self.out = nn.Linear(hidden_dim, tgt_vocab, **kw)

    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this model (stored in checkpoints)."""
        return {
            "arch": "gru",
            "attention": self.attention,
            "src_vocab": self.src_vocab,
            "tgt_vocab": self.tgt_vocab,
            "embed_dim": self.src_embed.embedding_dim,
            "hidden_dim": self.hidden_dim,
            "attn_dim": self.attn.attn_dim if isinstance(self.attn, AdditiveAttention) else None,
            "luong_score": self.attn.score_name if isinstance(self.attn, LuongAttention) else "general",
            "dropout": self.drop.p,
        }

    # ------------------------------------------------------------------------------------------- encoder
    def encode(self, src: Tensor, src_mask: Tensor) -> State:
        """Annotations ``(B, S, hidden_dim)``, the mask ``(B, S)`` and the first decoder state ``(B, hidden_dim)``."""
        check_tokens("src", src, self.src_vocab)
        check_src_mask(src_mask, src)
        lengths = src_mask.sum(dim=1)  # (B,)
        x = self.drop(self.src_embed(src))  # (B, S, E)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, last = self.encoder(packed)  # last: (2, B, hidden/2), forward-final and backward-final
        h, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])  # (B, S, hidden)
        s0 = torch.tanh(self.bridge(torch.cat([last[0], last[1]], dim=-1)))  # (B, hidden)
        memory = {"annotations": h, "src_mask": src_mask, "s0": s0}
        if self.attention == "none":
            m = src_mask.unsqueeze(-1).to(h.dtype)  # (B, S, 1)
            memory["summary"] = (h * m).sum(1) / m.sum(1)  # (B, hidden): the one fixed context
        return memory

    def init_state(self, memory: State) -> State:
        s0 = memory["s0"]
        return {"s": s0, "o": torch.zeros_like(s0)}  # o: Luong's previous attentional output (input feeding)

    # ------------------------------------------------------------------------------------------- decoder
    def step(self, tokens: Tensor, state: State, memory: State) -> tuple[Tensor, State, Tensor | None]:
        """One decoder step: previous tokens ``(B,)`` -> logits ``(B, V)``, new state, weights ``(B, S)``."""
        y = self.drop(self.tgt_embed(tokens))  # (B, E)
        h, mask, s = memory["annotations"], memory["src_mask"], state["s"]
        weights = None
        if self.attention == "bahdanau":
            c, weights = self.attn(s, h, key_mask=mask)  # type: ignore[misc]  # (B, hidden), (B, S)
            s = self.cell(torch.cat([y, c], dim=-1), s)  # (B, hidden)
            o = torch.tanh(self.readout(torch.cat([s, c, y], dim=-1)))  # type: ignore[misc]
        elif self.attention == "luong":
            s = self.cell(torch.cat([y, state["o"]], dim=-1), s)  # input feeding
            o, weights = self.attn(s, h, key_mask=mask)  # type: ignore[misc]  # tanh(W_c [c_t; s_t]), (B, S)
        else:
            c = memory["summary"]  # (B, hidden)
            s = self.cell(torch.cat([y, c], dim=-1), s)
            o = torch.tanh(self.readout(torch.cat([s, c, y], dim=-1)))  # type: ignore[misc]
        logits = self.out(self.drop(o))  # (B, V)
        return logits, {"s": s, "o": o}, weights

    def forward(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: logits ``(B, T, V)`` for the next token after each of ``tgt_in`` ``(B, T)``."""
        check_tokens("tgt_in", tgt_in, self.tgt_vocab)
        memory = self.encode(src, src_mask)
        state = self.init_state(memory)
        logits = []
        for t in range(tgt_in.shape[1]):
            step_logits, state, _ = self.step(tgt_in[:, t], state, memory)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)  # (B, T, V)
