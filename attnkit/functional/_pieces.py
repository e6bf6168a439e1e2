"""The flash-piece engine: blocked attention as a few batched calls of PyTorch's CPU flash kernel, merged exactly.

A *piece* is one batched call of ``aten::_scaled_dot_product_flash_attention_for_cpu``: query blocks against key
blocks (slices or index tensors of the blocked inputs, no copies). The pieces' outputs are merged exactly with
their log-sum-exp, and the backward pass drives the flash backward kernel of every piece with the *merged* output
and log-sum-exp (the recurrence of ring attention). Used by the sliding window's PyTorch path
(:mod:`attnkit.functional.local`), by block-sparse attention (:mod:`attnkit.functional.sparse`) and, through
:func:`same_head_dim`, by chunked and ring attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Piece", "pieces_backward", "pieces_forward", "run_pieces", "same_head_dim"]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class Piece:
    """One batched flash call: query blocks ``q`` against key blocks ``k`` (slices, or index tensors).

    Within one piece a query block appears at most once, so merging a piece into the running result is a plain
    per-row update. ``mask`` is an optional additive float mask broadcastable to ``(BH, P, w, w)``.
    """

    q: slice | Tensor
    k: slice | Tensor
    causal: bool
    mask: Tensor | None = None


def _take(x: Tensor, index: slice | Tensor) -> Tensor:
    return x[:, index] if isinstance(index, slice) else x.index_select(1, index)


def _add_into(acc: Tensor, index: slice | Tensor, x: Tensor) -> None:
    if isinstance(index, slice):
        acc[:, index] += x
    else:
        acc.index_add_(1, index, x)


def pieces_forward(q4: Tensor, k4: Tensor, v4: Tensor, pieces: list[Piece], scale: float) -> tuple[Tensor, Tensor]:
    """Run every piece and merge them exactly with the log-sum-exp.

    ``q4 (BH, Nq, w, E)``, ``k4 (BH, Nk, w, E)``, ``v4 (BH, Nk, w, Ev)`` -> ``out (BH, Nq, w, Ev)``,
    ``lse (BH, Nq, w)``. Query blocks no piece touches give zeros and ``lse = -inf``. The first piece must touch
    every query block that any later piece touches.
    """
    bh, nq, w, _ = q4.shape
    lse_dtype = torch.float64 if q4.dtype == torch.float64 else torch.float32
    out = q4.new_zeros(bh, nq, w, v4.shape[-1])  # (BH, Nq, w, Ev)
    lse = torch.full((bh, nq, w), float("-inf"), dtype=lse_dtype, device=q4.device)  # (BH, Nq, w)
    for n, p in enumerate(pieces):
        o_p, l_p = _flash(_take(q4, p.q), _take(k4, p.k), _take(v4, p.k), 0.0, p.causal, attn_mask=p.mask, scale=scale)
        if n == 0:
            if isinstance(p.q, slice):
                out[:, p.q] = o_p
                lse[:, p.q] = l_p
            else:
                out.index_copy_(1, p.q, o_p)
                lse.index_copy_(1, p.q, l_p)
            continue
        l_old = _take(lse, p.q)  # (BH, P, w)
        l_new = torch.logaddexp(l_old, l_p)  # (BH, P, w)
        weight = torch.exp(l_p - l_new).to(o_p.dtype).unsqueeze(-1)  # (BH, P, w, 1): share of the new piece
        if isinstance(p.q, slice):
            out[:, p.q].lerp_(o_p, weight)  # one fused pass: o + weight * (o_p - o), in place
            lse[:, p.q] = l_new
        else:
            out.index_copy_(1, p.q, out.index_select(1, p.q).lerp_(o_p, weight))
            lse.index_copy_(1, p.q, l_new)
    return out, lse


def pieces_backward(
    grad: Tensor, q4: Tensor, k4: Tensor, v4: Tensor, out: Tensor, lse: Tensor, pieces: list[Piece], scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`pieces_forward`: each piece's flash backward, fed the merged output and log-sum-exp."""
    dq, dk, dv = torch.zeros_like(q4), torch.zeros_like(k4), torch.zeros_like(v4)
    for p in pieces:
        g_q, g_k, g_v = _flash_backward(
            _take(grad, p.q).contiguous(),
            _take(q4, p.q),
            _take(k4, p.k),
            _take(v4, p.k),
            _take(out, p.q).contiguous(),
            _take(lse, p.q).contiguous(),
            0.0,
            p.causal,
            attn_mask=p.mask,
            scale=scale,
        )
        _add_into(dq, p.q, g_q)
        _add_into(dk, p.k, g_k)
        _add_into(dv, p.k, g_v)
    return dq, dk, dv


class _PiecesFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q4, k4, v4, pieces, scale):  # type: ignore[no-untyped-def, override]
        out, lse = pieces_forward(q4, k4, v4, pieces, scale)
        ctx.save_for_backward(q4, k4, v4, out, lse)
        ctx.pieces, ctx.scale = pieces, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_lse):  # type: ignore[no-untyped-def, override]
        q4, k4, v4, out, lse = ctx.saved_tensors
        dq, dk, dv = pieces_backward(grad_out, q4, k4, v4, out, lse, ctx.pieces, ctx.scale)
        return dq, dk, dv, None, None


def run_pieces(q4: Tensor, k4: Tensor, v4: Tensor, pieces: list[Piece], scale: float) -> tuple[Tensor, Tensor]:
    """Blocked attention over ``pieces`` with an exact flash backward: ``(out, lse)`` (``lse`` has no gradient)."""
    return _PiecesFn.apply(q4, k4, v4, pieces, scale)  # type: ignore[no-any-return]


def same_head_dim(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Zero-pad ``q, k`` or ``v`` on the last dim so that ``E == Ev`` (scores and outputs are unchanged)."""
    e, ev = q.shape[-1], v.shape[-1]
    if e < ev:
        q, k = F.pad(q, (0, ev - e)), F.pad(k, (0, ev - e))
    elif ev < e:
        v = F.pad(v, (0, e - ev))
    return q, k, v
