"""Score functions: how well each query matches each key.

Every function takes ``query (..., L, E)`` and ``key (..., S, Ek)`` with the same leading dims (usually
``(B, H)``) and returns scores ``(..., L, S)``; :func:`attend` turns scores into a weighted sum of values.

==================  =====================================================  ===================================
name                score(q, k)                                            paper
==================  =====================================================  ===================================
``dot``             ``q . k``                                              Luong et al. 2015 ("dot")
``scaled_dot``      ``q . k / sqrt(E)``                                    Vaswani et al. 2017
``general``         ``q W k`` (bilinear)                                   Luong et al. 2015 ("general")
``additive``        ``v^T tanh(W_q q + W_k k)``                            Bahdanau et al. 2015
``concat``          ``v^T tanh(W [q; k])``                                 Luong et al. 2015 ("concat")
``cosine``          ``cos(q, k) / temperature``                            Graves et al. 2014; Liu et al. 2022
==================  =====================================================  ===================================

Papers:

* Luong, Pham, Manning 2015, "Effective Approaches to Attention-based Neural Machine Translation",
  https://arxiv.org/abs/1508.04025
* Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762
* Bahdanau, Cho, Bengio 2015, "Neural Machine Translation by Jointly Learning to Align and Translate",
  https://arxiv.org/abs/1409.0473
* Graves, Wayne, Danihelka 2014, "Neural Turing Machines", https://arxiv.org/abs/1410.5401
* Liu et al. 2022, "Swin Transformer V2: Scaling Up Capacity and Resolution", https://arxiv.org/abs/2111.09883

Example:
    >>> import torch
    >>> from attnkit.functional import scoring
    >>> q, k, v = torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 4)   # (B, L, E), (B, S, E)
    >>> s = scoring.additive_scores(q, k, torch.randn(8, 16), torch.randn(8, 16), torch.randn(16))
    >>> s.shape                                                                        # (B, L, S)
    torch.Size([2, 3, 5])
    >>> out, w = scoring.attend(s, v, return_weights=True)
    >>> out.shape, bool(torch.allclose(w.sum(-1), torch.ones(2, 3)))
    (torch.Size([2, 3, 4]), True)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validate as V
from ._reference import masked_softmax

__all__ = [
    "additive_scores",
    "attend",
    "concat_scores",
    "cosine_scores",
    "dot_scores",
    "general_scores",
    "scaled_dot_scores",
    "SCORE_FUNCTIONS",
]


def _check_pair(query: Tensor, key: Tensor, *, same_dim: bool = True) -> None:
    V.check_tensor("query", query)
    V.check_tensor("key", key)
    if query.dim() < 2 or key.dim() != query.dim():
        raise V.fail(
            "query (..., L, E) and key (..., S, E) with the same dims",
            f"{tuple(query.shape)} and {tuple(key.shape)}",
            "query.view(B, L, E) and key.view(B, S, E)",
        )
    if query.shape[:-2] != key.shape[:-2]:
        raise V.fail(
            "the same leading dims for query and key",
            f"{tuple(query.shape[:-2])} and {tuple(key.shape[:-2])}",
            "expanding the smaller one",
        )
    if same_dim and query.shape[-1] != key.shape[-1]:
        raise V.fail(
            "query and key with the same feature dim",
            f"{query.shape[-1]} and {key.shape[-1]}",
            "general_scores or additive_scores, which project between sizes",
        )


def dot_scores(query: Tensor, key: Tensor) -> Tensor:
    """``q . k``: ``(..., L, E) x (..., S, E) -> (..., L, S)``."""
    _check_pair(query, key)
    return torch.matmul(query, key.transpose(-2, -1))  # (..., L, S)


def scaled_dot_scores(query: Tensor, key: Tensor, *, scale: float | None = None) -> Tensor:
    """``q . k * scale`` with ``scale = 1/sqrt(E)`` by default."""
    _check_pair(query, key)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return torch.matmul(query, key.transpose(-2, -1)) * scale  # (..., L, S)


def general_scores(query: Tensor, key: Tensor, weight: Tensor) -> Tensor:
    """Bilinear ``q W k``; ``weight`` is ``(E, Ek)`` so query and key may differ in size."""
    _check_pair(query, key, same_dim=False)
    if weight.shape != (query.shape[-1], key.shape[-1]):
        raise V.fail(
            f"weight of shape (E, Ek) = {(query.shape[-1], key.shape[-1])}",
            f"{tuple(weight.shape)}",
            "torch.empty(E, Ek)",
        )
    return torch.matmul(torch.matmul(query, weight), key.transpose(-2, -1))  # (..., L, S)


def additive_scores(
    query: Tensor, key: Tensor, w_query: Tensor, w_key: Tensor, v: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Bahdanau's ``v^T tanh(W_q q + W_k k + b)``.

    Args:
        query: ``(..., L, E)``; key: ``(..., S, Ek)``.
        w_query: ``(E, A)``; w_key: ``(Ek, A)``; v: ``(A,)``; bias: ``(A,)`` or None.

    Memory is ``O(L * S * A)`` (the tanh is taken for every pair), which is why this scorer suits RNN decoders
    that score one query step at a time.
    """
    _check_pair(query, key, same_dim=False)
    a = v.shape[-1]
    if w_query.shape != (query.shape[-1], a) or w_key.shape != (key.shape[-1], a) or v.dim() != 1:
        raise V.fail(
            f"w_query (E, A), w_key (Ek, A), v (A,) with E={query.shape[-1]}, Ek={key.shape[-1]}, A={a}",
            f"{tuple(w_query.shape)}, {tuple(w_key.shape)}, {tuple(v.shape)}",
            "matching attention sizes",
        )
    pq = torch.matmul(query, w_query)  # (..., L, A)
    pk = torch.matmul(key, w_key)  # (..., S, A)
    if bias is not None:
        pq = pq + bias
    hidden = torch.tanh(pq.unsqueeze(-2) + pk.unsqueeze(-3))  # (..., L, S, A)
    return torch.matmul(hidden, v)  # (..., L, S)


def concat_scores(query: Tensor, key: Tensor, weight: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """Luong's ``v^T tanh(W [q; k])`` with ``weight`` of shape ``(E + Ek, A)``.

    Equal to :func:`additive_scores` with ``W`` split into its query and key halves, which is how it is computed
    (no ``L x S`` concatenation is built).
    """
    e = query.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != e + key.shape[-1]:
        raise V.fail(
            f"weight of shape (E + Ek, A) = ({e + key.shape[-1]}, A)",
            f"{tuple(weight.shape)}",
            "torch.empty(E + Ek, A)",
        )
    return additive_scores(query, key, weight[:e], weight[e:], v, bias)


def cosine_scores(query: Tensor, key: Tensor, *, temperature: float = 0.1, eps: float = 1e-6) -> Tensor:
    """``cos(q, k) / temperature``, bounded in ``[-1/t, 1/t]`` whatever the vectors' norms."""
    _check_pair(query, key)
    if temperature <= 0:
        raise V.fail("temperature > 0", repr(temperature), "temperature=0.1")
    qn = F.normalize(query, dim=-1, eps=eps)  # (..., L, E)
    kn = F.normalize(key, dim=-1, eps=eps)  # (..., S, E)
    return torch.matmul(qn, kn.transpose(-2, -1)) / temperature  # (..., L, S)


SCORE_FUNCTIONS = {
    "dot": dot_scores,
    "scaled_dot": scaled_dot_scores,
    "general": general_scores,
    "additive": additive_scores,
    "concat": concat_scores,
    "cosine": cosine_scores,
}


def attend(
    scores: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax over keys and weighted sum of values: ``softmax(scores + mask) @ value``.

    Args:
        scores: ``(..., L, S)``.
        value: ``(..., S, Ev)``.
        mask: boolean (``True`` = may attend) or float (added), broadcastable to ``(..., L, S)``.

    Returns:
        ``(..., L, Ev)``, or ``(out, weights)``. Fully masked rows give zeros, never NaN.
    """
    V.check_tensor("scores", scores)
    V.check_tensor("value", value)
    if scores.shape[-1] != value.shape[-2]:
        raise V.fail(
            "scores (..., L, S) and value (..., S, Ev) with one S",
            f"{scores.shape[-1]} and {value.shape[-2]}",
            "scores and values over the same keys",
        )
    allowed = None
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = mask
        elif mask.dtype.is_floating_point:
            scores = scores + mask.to(scores.dtype)
        else:
            allowed = V.int_mask_as_bool(mask, "mask")
    weights = masked_softmax(scores, allowed)  # (..., L, S)
    probs = F.dropout(weights, p=V.check_dropout(dropout_p), training=True) if dropout_p > 0 else weights
    out = torch.matmul(probs, value)  # (..., L, Ev)
    return (out, weights) if return_weights else out
