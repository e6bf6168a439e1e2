"""Batched greedy and beam-search decoding for any :class:`~attnkit.models.seq2seq.Seq2SeqBase` model.

Beam search keeps ``beam_size`` hypotheses per sentence, all sentences of the batch in one tensor
``(B * K, ...)``; finished hypotheses stay in the beam with their score frozen. The final choice divides the
log-probability by the length penalty of Wu et al. 2016 (GNMT, https://arxiv.org/abs/1609.08144):
``lp(Y) = ((5 + |Y|) / 6) ** alpha`` — ``alpha = 0`` ranks by raw log-probability (favours short outputs),
larger ``alpha`` favours longer ones.

Both return the attention weights of every output token over the source (for alignments), when the model's
``step`` returns them.

Example:
    >>> import torch
    >>> from attnkit.models.seq2seq import GRUSeq2Seq
    >>> from attnkit.models.decoding import greedy_decode, beam_search
    >>> model = GRUSeq2Seq(20, 20, attention="luong", embed_dim=8, hidden_dim=16).eval()
    >>> src = torch.randint(4, 20, (3, 6)); mask = torch.ones(3, 6, dtype=torch.bool)
    >>> out = beam_search(model, src, mask, beam_size=3, max_len=5)
    >>> len(out.tokens), out.weights[0].shape[1]          # B hypotheses; weights (T, S)
    (3, 6)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnkit._errors import fail
from attnkit.data.tokenizer import BOS, EOS, PAD

from .seq2seq import Seq2SeqBase, check_src_mask, check_tokens

__all__ = ["Decoded", "beam_search", "greedy_decode", "length_penalty"]


@dataclass
class Decoded:
    """Decoder output per sentence: token ids (without BOS/EOS), log-probability, and weights ``(T, S)``."""

    tokens: list[list[int]]
    scores: list[float]
    weights: list[Tensor | None] = field(default_factory=list)


def length_penalty(length: Tensor, alpha: float) -> Tensor:
    """GNMT's ``((5 + length) / 6) ** alpha``."""
    return ((5.0 + length.to(torch.float64)) / 6.0) ** alpha


def _default_max_len(src_mask: Tensor, max_len: int | None) -> int:
    if max_len is None:
        return int(src_mask.sum(1).max()) * 2 + 10
    if not isinstance(max_len, int) or max_len < 1:
        raise fail("max_len to be a positive int or None", repr(max_len), "max_len=100")
    return max_len


def _trim(ids: list[int]) -> list[int]:
    out = []
    for i in ids:
        if i == EOS:
            break
        if i not in (PAD, BOS):
            out.append(i)
    return out


@torch.no_grad()
def greedy_decode(
    model: Seq2SeqBase, src: Tensor, src_mask: Tensor, *, max_len: int | None = None, bos: int = BOS
) -> Decoded:
    """Pick the most likely token at every step, for the whole batch at once.

    Args:
        src: ``(B, S)`` ids; src_mask: ``(B, S)`` boolean, ``True`` = real token.
        max_len: most output tokens (default ``2 * longest source + 10``).
    """
    check_tokens("src", src, model.src_vocab)
    check_src_mask(src_mask, src)
    max_len = _default_max_len(src_mask, max_len)
    memory = model.encode(src, src_mask)
    state = model.init_state(memory)
    b = src.shape[0]
    tokens = torch.full((b,), bos, dtype=torch.long, device=src.device)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    out_tokens, out_logp, out_weights = [], [], []
    score = torch.zeros(b, dtype=torch.float64, device=src.device)
    for _ in range(max_len):
        logits, state, weights = model.step(tokens, state, memory)  # (B, V), (B, S)
        logp = torch.log_softmax(logits.float(), dim=-1)
        nxt = logp.argmax(-1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        score = score + torch.where(done, 0.0, logp.gather(1, nxt.clamp_min(0)[:, None])[:, 0].double())
        out_tokens.append(nxt)
        out_logp.append(score)
        if weights is not None:
            out_weights.append(weights.float())
        done = done | (nxt == EOS)
        tokens = nxt
        if bool(done.all()):
            break
    seq = torch.stack(out_tokens, 1).tolist()  # (B, T)
    result = Decoded(tokens=[_trim(s) for s in seq], scores=score.tolist())
    w = torch.stack(out_weights, 1) if out_weights else None  # (B, T, S)
    for i, ids in enumerate(result.tokens):
        n = len(ids) + 1 if len(ids) < len(seq[i]) else len(ids)  # include the EOS step when there is one
        result.weights.append(None if w is None else w[i, :n, : int(src_mask[i].sum())].clone())
    return result


@torch.no_grad()
def beam_search(
    model: Seq2SeqBase,
    src: Tensor,
    src_mask: Tensor,
    *,
    beam_size: int = 4,
    max_len: int | None = None,
    alpha: float = 0.6,
    bos: int = BOS,
) -> Decoded:
    """Beam search with GNMT length penalty ``alpha``, all sentences and beams in one batch ``(B * K)``.

    Args:
        src: ``(B, S)`` ids; src_mask: ``(B, S)`` boolean, ``True`` = real token.
        beam_size: hypotheses kept per sentence (``1`` is greedy decoding).
        max_len: most output tokens (default ``2 * longest source + 10``).
        alpha: length-penalty exponent (0 = none).
    """
    check_tokens("src", src, model.src_vocab)
    check_src_mask(src_mask, src)
    if not isinstance(beam_size, int) or beam_size < 1:
        raise fail("beam_size to be a positive int", repr(beam_size), "beam_size=4")
    max_len = _default_max_len(src_mask, max_len)
    b, k, dev = src.shape[0], beam_size, src.device
    memory = model.encode(src, src_mask)
    expand = torch.arange(b, device=dev).repeat_interleave(k)  # (B*K,): row of each hypothesis
    memory = model.reorder_memory(memory, expand)
    state = model.init_state(memory)
    scores = torch.full((b, k), float("-inf"), dtype=torch.float64, device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first top-k does not pick duplicates
    tokens = torch.full((b * k,), bos, dtype=torch.long, device=dev)
    finished = torch.zeros(b * k, dtype=torch.bool, device=dev)
    lengths = torch.zeros(b * k, dtype=torch.long, device=dev)
    history = torch.empty(b * k, 0, dtype=torch.long, device=dev)
    weight_hist: Tensor | None = None
    for _ in range(max_len):
        logits, state, weights = model.step(tokens, state, memory)  # (B*K, V), (B*K, S)
        logp = torch.log_softmax(logits.double(), dim=-1)  # (B*K, V)
        v = logp.shape[-1]
        # a finished hypothesis continues only with PAD, at no cost, so its score stays frozen
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, PAD] = 0.0
        logp = torch.where(finished[:, None], frozen, logp)
        cand = (scores.view(b * k, 1) + logp).view(b, k * v)  # (B, K*V)
        top, idx = cand.topk(k, dim=1)  # (B, K)
        origin = (idx // v) + torch.arange(b, device=dev)[:, None] * k  # (B, K): flat index of the parent
        origin, nxt = origin.view(-1), (idx % v).view(-1)  # (B*K,)
        scores = top
        state = model.reorder_state(state, origin)
        finished = finished.index_select(0, origin)
        lengths = lengths.index_select(0, origin) + (~finished).long()  # EOS counts as one token
        history = torch.cat([history.index_select(0, origin), nxt[:, None]], dim=1)  # (B*K, T)
        if weights is not None:
            w = weights.float().index_select(0, origin)[:, None]  # (B*K, 1, S)
            weight_hist = w if weight_hist is None else torch.cat([weight_hist.index_select(0, origin), w], dim=1)
        finished = finished | (nxt == EOS)
        tokens = nxt
        if bool(finished.all()):
            break
    norm = scores.view(-1) / length_penalty(lengths, alpha)  # (B*K,)
    norm = torch.where(finished, norm, norm - 1e9)  # prefer finished hypotheses
    best = norm.view(b, k).argmax(1) + torch.arange(b, device=dev) * k  # (B,)
    result = Decoded(tokens=[], scores=[])
    for i, row in enumerate(best.tolist()):
        ids = _trim(history[row].tolist())
        result.tokens.append(ids)
        result.scores.append(float(scores.view(-1)[row]))
        if weight_hist is None:
            result.weights.append(None)
        else:
            n = min(int(lengths[row]), weight_hist.shape[1])
            result.weights.append(weight_hist[row, :n, : int(src_mask[i].sum())].clone())
    return result
