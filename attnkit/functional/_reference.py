"""Slow, line-by-line readable references: the test oracle for every fast kernel.

Nothing here is tuned. Each function is the math of its docstring, one step per line, with the shape of every
tensor in a comment. Fast paths elsewhere are proven equal to these in ``tests/``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .masks import AttentionMask, causal_mask


def expand_kv_heads(x: Tensor, heads: int) -> Tensor:
    """Repeat ``(B, Hkv, S, E)`` key/value heads to ``(B, H, S, E)`` for grouped-query attention."""
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def masked_softmax(scores: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Softmax over the last dim where rows with no allowed entry give all zeros (never NaN).

    ``allowed`` is a boolean tensor broadcastable to ``scores`` (``True`` = may attend). Scores that are ``-inf``
    (from a float mask) count as not allowed.
    """
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))  # (..., L, S)
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (..., L, 1): rows with nothing to attend to
    scores = scores.masked_fill(dead, 0.0)  # finite, so softmax and its gradient stay finite
    weights = torch.softmax(scores, dim=-1)  # (..., L, S)
    return weights.masked_fill(dead, 0.0)  # (..., L, S): dead rows are exactly zero


def attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | AttentionMask | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention, written out.

    ``softmax(Q K^T * scale + mask) V`` with ``scale = 1/sqrt(E)`` by default. A boolean mask is ``True`` where a
    query may attend; a float mask is added to the scores. Fully masked rows give zero output and weights. With
    ``softcap`` the scores are capped first, ``softcap * tanh(scores / softcap)`` (Gemma 2's logit soft-capping).

    Shape:
        query ``(B, H, L, E)``, key ``(B, Hkv, S, E)``, value ``(B, Hkv, S, Ev)``, mask broadcastable to
        ``(B, H, L, S)``. Returns output ``(B, H, L, Ev)`` and weights ``(B, H, L, S)``.
    """
    b, h, q_len, e = query.shape
    k_len = key.shape[-2]
    scale = 1.0 / math.sqrt(e) if scale is None else scale
    key = expand_kv_heads(key, h)  # (B, H, S, E)
    value = expand_kv_heads(value, h)  # (B, H, S, Ev)

    scores = torch.matmul(query, key.transpose(-2, -1)) * scale  # (B, H, L, S)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)  # (B, H, L, S): inside (-softcap, softcap)

    allowed = None  # boolean (B|1, H|1, L, S) or None
    if isinstance(attn_mask, AttentionMask):
        attn_mask = attn_mask.materialize(q_len, k_len, device=query.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask
        else:
            scores = scores + attn_mask.to(scores.dtype)  # (B, H, L, S): additive bias
    if is_causal:
        upper_left = causal_mask(q_len, k_len, device=query.device)  # (L, S)
        allowed = upper_left if allowed is None else allowed & upper_left

    weights = masked_softmax(scores, allowed)  # (B, H, L, S)
    out = torch.matmul(weights, value)  # (B, H, L, Ev)
    return out, weights
