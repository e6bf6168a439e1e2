"""Attention rollout: how much each input token flows into each position after a stack of layers.

Paper: Samira Abnar, Willem Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020.
https://arxiv.org/abs/2005.00928

A single layer's attention map says where a position looks *in the layer below*, not in the input. Rollout
composes the layers. Each layer's heads are averaged into ``A_l`` ``(L, L)``; the residual connection is modelled
by mixing in the identity and renormalising the rows::

    A_l' = rownorm(0.5 * A_l + 0.5 * I)
    rollout = A_n' @ ... @ A_2' @ A_1'        # row i: share of each input token in the top-layer position i

Every ``A_l'`` is row-stochastic, so every row of the rollout sums to 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._errors import fail

from .capture import Recording

__all__ = ["attention_rollout"]

_HEAD_REDUCE = ("mean", "max", "min")


def attention_rollout(
    attentions: Tensor | Recording,
    *,
    residual: bool = True,
    head_reduce: str = "mean",
    start_layer: int = 0,
) -> Tensor:
    """Roll attention out over a stack of self-attention layers (Abnar & Zuidema 2020).

    Args:
        attentions: a stack ``(layers, B, H, L, L)`` (as from ``Recording.stack()``), a stack ``(layers, H, L, L)``
            without batch, or a :class:`~attnkit.viz.Recording` (its ``stack()`` is used).
        residual: model the residual connection: ``0.5 * A + 0.5 * I``, rows renormalised (the paper's
            correction). Without it, raw head-averaged maps are multiplied (rows with no weight stay zero).
        head_reduce: how heads are fused per layer: ``"mean"`` (the paper), ``"max"`` or ``"min"``.
        start_layer: first layer to include (later layers are composed on top of it).

    Returns:
        ``(B, L, L)`` (or ``(L, L)`` for an input without batch): row ``i`` gives the share of every input token
        in the top layer's position ``i``.

    Shape:
        ``(layers, B, H, L, L)`` -> ``(B, L, L)``; ``(layers, H, L, L)`` -> ``(L, L)``.

    Example:
        >>> import torch
        >>> from attnkit.viz import attention_rollout
        >>> maps = torch.softmax(torch.randn(6, 2, 12, 7, 7), dim=-1)   # (layers, B, H, L, L)
        >>> r = attention_rollout(maps)
        >>> r.shape, torch.allclose(r.sum(-1), torch.ones(2, 7))
        (torch.Size([2, 7, 7]), True)
    """
    stack = attentions.stack() if isinstance(attentions, Recording) else attentions
    if not isinstance(stack, Tensor):
        raise fail("a tensor (layers, B, H, L, L) or a Recording", type(stack).__name__, "rec.stack()")
    if stack.dim() not in (4, 5):
        raise fail(
            "attention maps of shape (layers, B, H, L, L) or (layers, H, L, L)",
            f"{tuple(stack.shape)}",
            "Recording.stack() or torch.stack(list_of_layer_maps)",
        )
    no_batch = stack.dim() == 4
    if no_batch:
        stack = stack.unsqueeze(1)
    if stack.shape[-1] != stack.shape[-2]:
        raise fail(
            "square self-attention maps (L == S) for rollout",
            f"{tuple(stack.shape)}",
            "capture(model, names=...) selecting only self-attention layers",
        )
    if head_reduce not in _HEAD_REDUCE:
        raise fail(f"head_reduce in {_HEAD_REDUCE}", repr(head_reduce), 'head_reduce="mean"')
    n = stack.shape[0]
    if not (isinstance(start_layer, int) and 0 <= start_layer < n):
        raise fail(f"start_layer in [0, {n})", repr(start_layer), "start_layer=0")
    dtype = stack.dtype if stack.dtype.is_floating_point else torch.float32
    stack = stack[start_layer:].double()  # products of many layers: accumulate in float64
    if head_reduce == "mean":
        fused = stack.mean(dim=2)  # (layers, B, L, L)
    elif head_reduce == "max":
        fused = stack.amax(dim=2)
    else:
        fused = stack.amin(dim=2)
    length = fused.shape[-1]
    if residual:
        eye = torch.eye(length, dtype=fused.dtype, device=fused.device)
        fused = 0.5 * fused + 0.5 * eye
        fused = fused / fused.sum(dim=-1, keepdim=True)  # every row sums to >= 0.5: no division by zero
    result = fused[0]  # (B, L, L)
    for layer in fused[1:]:
        result = layer @ result  # (B, L, L): the upper layer reads the lower layer's mixture
    result = result.to(dtype)
    return result[0] if no_batch else result
