"""Sliding-window (local) attention, blockwise: O(N·w) time and memory, forward and backward.

Paper: "Longformer: The Long-Document Transformer", Beltagy, Peters and Cohan, 2020.
https://arxiv.org/abs/2004.05150 (the windowed pattern; the blocked "look backward / look forward" parameterisation
is the one of the ``local-attention`` package, so the two can be compared one to one).

The window structure. Positions are cut into buckets of ``window`` tokens (bucket ``p // window``). A query in
bucket ``b`` may attend to the keys of buckets ``b - look_backward`` to ``b + look_forward``; with ``causal=True``
also only to keys at positions ``<=`` its own. With ``L`` queries and ``S`` keys, query ``i`` sits at position
``i + S - L`` (aligned to the end, as the newest queries of a decoding step).

How it is fast. The band is cut into *pieces*: for every block offset ``d`` one batched call of PyTorch's CPU flash
kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``) over all blocks at once, using views of the inputs
and no copies; the diagonal piece runs with ``is_causal`` so it costs half. The pieces' outputs are merged exactly
with their log-sum-exp. The causal band's backward recomputes the probabilities from the *merged* log-sum-exp
tile by tile (128 query rows against their contiguous key range) with batched matrix products, split over threads by
rows of ``B*H``; the other windows drive the flash backward kernel of every piece with the merged output and
log-sum-exp (the recurrence of ring attention). Training costs O(N·w) either way. Inputs the fast path does not
cover (a key-padding mask, ``L != S``) go through a readable blockwise path with autograd that is O(N·w) as well.

Example:
    >>> import torch
    >>> from attnkit.functional import sliding_window_attention, BlockedWindowMask, scaled_dot_product_attention
    >>> q = k = v = torch.randn(1, 2, 100, 16)                      # (B, H, N, E)
    >>> out = sliding_window_attention(q, k, v, window=32)         # causal, one window back
    >>> out.shape
    torch.Size([1, 2, 100, 16])
    >>> dense = scaled_dot_product_attention(q, k, v, BlockedWindowMask(32).materialize(100, 100))
    >>> torch.allclose(out, dense, atol=1e-5)
    True
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _native
from . import _validate as V
from ._native_bridge import NativeBandFn, NativePattern, native_attention, native_unsupported, right_padding
from ._pieces import Piece, run_pieces, same_head_dim
from ._reference import expand_kv_heads
from ._threads import over_rows, run_tasks, worker_count
from .dispatch import AttentionCall, Backend, register_backend
from .masks import BlockedWindowMask, padding_mask, split_with_padding

__all__ = [
    "BlockedWindowMask", "NativeBandFn", "NativePattern", "WindowMask", "native_attention", "native_unsupported",
    "sliding_window_attention", "window_native",
]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


# --------------------------------------------------------------------------------------------- the mask object
@dataclass(frozen=True)
class WindowMask(BlockedWindowMask):
    """Deprecated name of :class:`~attnkit.functional.masks.BlockedWindowMask` (the *blocked* window; the exact
    window of HuggingFace models is :class:`~attnkit.functional.masks.SlidingWindowMask`)."""

    def __post_init__(self) -> None:
        warnings.warn("WindowMask is deprecated: use BlockedWindowMask (the same blocked window), or "
                      "SlidingWindowMask for the exact window of HuggingFace models", DeprecationWarning, stacklevel=3)
        super().__post_init__()


# --------------------------------------------------------------------------------------------- piece engine
# --------------------------------------------------------------------------------------------- causal band
@dataclass(frozen=True)
class _BandPiece:
    """One flash call of the causal band: ``diag`` (sub-blocks, is_causal), ``band`` (sub-block ``r`` of every
    bucket from ``look_backward`` on, against its whole contiguous key range) or ``early`` (bucket ``b`` < lb)."""

    kind: str
    r: int = 0
    b: int = 0


@dataclass(frozen=True)
class _BandPlan:
    n: int  # padded length, a multiple of w
    w: int
    lb: int
    sub: int  # sub-blocks per bucket
    pieces: tuple[_BandPiece, ...]

    @property
    def s(self) -> int:
        return self.w // self.sub

    @property
    def nb(self) -> int:
        return self.n // self.w

    def key_len(self, p: _BandPiece) -> int:
        start = self.lb * self.w if p.kind == "band" else p.b * self.w
        return self.s if p.kind == "diag" else start + p.r * self.s

    def q_view(self, x: Tensor, p: _BandPiece) -> Tensor:
        """Rows of piece ``p`` from ``x (BH, N, X)``: a view ``(BH, P, rows, X)``."""
        bh, _, xd = x.shape
        if p.kind == "diag":
            return x.view(bh, self.n // self.s, self.s, xd)
        blocks = x.view(bh, self.nb, self.sub, self.s, xd)  # (BH, nb, sub, s, X)
        return blocks[:, self.lb :, p.r] if p.kind == "band" else blocks[:, p.b : p.b + 1, p.r]

    def k_view(self, x: Tensor, p: _BandPiece) -> Tensor:
        """Keys of piece ``p`` from ``x (BH, N, X)``: a view ``(BH, P, keys, X)`` (band windows overlap)."""
        bh, _, xd = x.shape
        if p.kind == "diag":
            return x.view(bh, self.n // self.s, self.s, xd)
        if p.kind == "band":  # bucket b >= lb reads keys [(b - lb) w, b w + r s): overlapping windows, no copy
            size = (bh, self.nb - self.lb, self.key_len(p), xd)
            return x.as_strided(size, (self.n * xd, self.w * xd, xd, 1), x.storage_offset())
        return x[:, : self.key_len(p)].unsqueeze(1)

    def k_add(self, acc: Tensor, grad: Tensor, p: _BandPiece) -> None:
        """Add a piece's key gradient ``(BH, P, keys, X)`` into ``acc (BH, N, X)`` (overlaps split apart)."""
        bh, _, xd = acc.shape
        if p.kind == "diag":
            acc.view(bh, self.n // self.s, self.s, xd).add_(grad)
        elif p.kind == "band":
            blocks = acc.view(bh, self.nb, self.w, xd)  # (BH, nb, w, X)
            count = self.nb - self.lb
            for m in range(self.lb):  # the lb whole buckets behind
                blocks[:, m : m + count].add_(grad[:, :, m * self.w : (m + 1) * self.w])
            if p.r:  # the first r sub-blocks of the query's own bucket
                blocks[:, self.lb :, : p.r * self.s].add_(grad[:, :, self.lb * self.w :])
        else:
            acc[:, : self.key_len(p)].add_(grad[:, 0])


def _band_plan(n: int, w: int, lb: int) -> _BandPlan:
    sub = next((r for r in (4, 2) if w % r == 0 and w // r >= 64), 1)  # smaller causal blocks cost less
    nb = n // w
    pieces = [_BandPiece("diag")]
    if nb > lb:
        pieces += [_BandPiece("band", r) for r in range(sub) if lb * w + r * (w // sub) > 0]
    pieces += [_BandPiece("early", r, b) for b in range(min(lb, nb)) for r in range(sub) if b * w + r * (w // sub)]
    return _BandPlan(n, w, lb, sub, tuple(pieces))


_BWD_ROWS = 128  # query rows per backward tile: small causal diagonals, matrix products that stay in cache
_BWD_TILE_BYTES = 1024**2  # score buffer per backward tile (per thread): two of them stay in a core's L2 cache
def _band_forward_rows(q: Tensor, k: Tensor, v: Tensor, plan: _BandPlan, scale: float, out: Tensor, lse: Tensor
                       ) -> None:
    """The causal band's forward for some rows of ``(BH, N, X)``: one flash call per piece, merged exactly in place
    into ``out (BH, N, Ev)`` and ``lse (BH, N, 1)``."""
    for i, p in enumerate(plan.pieces):
        o_p, l_p = _flash(plan.q_view(q, p), plan.k_view(k, p), plan.k_view(v, p), 0.0, p.kind == "diag",
                          scale=scale)  # (BH, P, rows, Ev), (BH, P, rows)
        o_view, l_view = plan.q_view(out, p), plan.q_view(lse, p).squeeze(-1)
        if i == 0:  # the diagonal covers every row
            o_view.copy_(o_p)
            l_view.copy_(l_p)
            continue
        l_new = torch.logaddexp(l_view, l_p)
        o_view.lerp_(o_p, torch.exp(l_p - l_new).to(o_p.dtype).unsqueeze(-1))  # exact merge, in place
        l_view.copy_(l_new)


class _CausalBandFn(torch.autograd.Function):
    """Causal window attention on ``(BH, N, E)`` (N a multiple of w): exact; forward one flash call per piece,
    backward tiles of batched matrix products (:func:`_band_backward`)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):  # type: ignore[no-untyped-def, override]
        bh, n, e = q.shape
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = q.new_empty(bh, n, v.shape[-1])  # (BH, N, Ev)
        lse = torch.empty(bh, n, 1, dtype=lse_dtype, device=q.device)  # (BH, N, 1)
        over_rows(lambda lo, hi: _band_forward_rows(q[lo:hi], k[lo:hi], v[lo:hi], plan, scale, out[lo:hi],
                                                     lse[lo:hi]), bh, q.numel())
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def, override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _band_backward(grad_out.contiguous(), q, k, v, out, lse, ctx.plan, ctx.scale)
        return dq, dk, dv, None, None


@torch.no_grad()
def _band_grads_rows(
    grad: Tensor, qs: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, plan: _BandPlan,
    dq: Tensor, dk: Tensor, dv: Tensor, buckets: tuple[int, int] | None = None, key0: int = 0,
) -> None:
    """The causal band's gradients for some rows of ``(BH, N, X)``, tile by tile, with batched matrix products.

    ``qs`` is the query already multiplied by the scale, ``lse (BH, N, 1)`` the merged log-sum-exp of the forward,
    ``delta (BH, N, 1) = rowsum(dO * O)``. For a tile of ``t`` query rows ``[r0, r1)`` of bucket ``b`` the keys are
    the contiguous range ``[k0, r1)`` from the first bucket it looks back to, so per tile (``c = r1 - k0`` keys)::

        P  = exp(Qs K^T - lse)      (t, c), future keys of the last t columns set to 0
        dV += P^T dO,   dP = dO V^T,   dS = P * (dP - delta)
        dQ  = dS K (times scale at the end),   dK += dS^T Qs

    Memory stays O(tile): two ``(G, t, c)`` score buffers are reused for every tile. Writes ``dq`` (unscaled, every
    row) and adds into ``dk`` and ``dv`` (zeros on entry). ``buckets = (b0, b1)`` limits the work to those query
    buckets; ``dk`` and ``dv`` then start at key position ``key0``. Like PyTorch's causal flash kernel, a tile
    multiplies the keys after its rows inside its diagonal block by zero weights, so a NaN there is not kept out.
    """
    bh = qs.shape[0]
    w, lb = plan.w, plan.lb
    t_max = min(w, _BWD_ROWS)
    c_max = lb * w + w
    g = max(1, min(bh, _BWD_TILE_BYTES // (t_max * c_max * qs.element_size())))  # rows of BH per tile
    future = torch.ones(t_max, t_max, dtype=torch.bool, device=qs.device).triu_(1)  # (t, t): key after the query
    s_buf, p_buf = qs.new_empty(g * t_max * c_max), qs.new_empty(g * t_max * c_max)
    for b in range(*(buckets or (0, plan.nb))):
        k0 = max(0, b - lb) * w  # first key this bucket sees
        for r0 in range(b * w, (b + 1) * w, t_max):
            r1 = min(r0 + t_max, (b + 1) * w)
            t, c = r1 - r0, r1 - k0
            for h0 in range(0, bh, g):
                hs, m = slice(h0, min(bh, h0 + g)), min(bh, h0 + g) - h0
                q_t, k_t, v_t, do_t = qs[hs, r0:r1], k[hs, k0:r1], v[hs, k0:r1], grad[hs, r0:r1]
                p = torch.bmm(q_t, k_t.transpose(1, 2), out=s_buf[: m * t * c].view(m, t, c))  # (G, t, c) scores
                p.sub_(lse[hs, r0:r1]).exp_()  # the probabilities of the forward
                p[:, :, c - t :].masked_fill_(future[:t, :t], 0.0)  # causal diagonal: keys after the row
                dv[hs, k0 - key0 : r1 - key0].baddbmm_(p.transpose(1, 2), do_t)  # dV += P^T dO
                ds = torch.bmm(do_t, v_t.transpose(1, 2), out=p_buf[: m * t * c].view(m, t, c))  # (G, t, c) dP
                ds.sub_(delta[hs, r0:r1]).mul_(p)  # dS = P * (dP - delta)
                torch.bmm(ds, k_t, out=dq[hs, r0:r1])  # every row belongs to exactly one tile
                dk[hs, k0 - key0 : r1 - key0].baddbmm_(ds.transpose(1, 2), q_t)  # dK += dS^T Qs


def _band_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, plan: _BandPlan, scale: float,
    *, workers: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the causal band from the merged output and log-sum-exp (see :func:`_band_grads_rows`).

    Low-precision inputs are computed in float32. The rows of ``BH`` are shared between ``workers`` threads
    (:func:`over_rows`; ``None``: the intra-op thread count, one for small inputs).
    """
    dtype = q.dtype
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    grad, q, k, v, out = (t.to(work) for t in (grad, q, k, v, out))
    lse = lse.to(work)
    qs = q * scale
    delta = (grad * out).sum(-1, keepdim=True)  # (BH, N, 1): rowsum(dO * O)
    dq, dk, dv = torch.empty_like(qs), torch.zeros_like(k), torch.zeros_like(v)
    bh, threads = q.shape[0], worker_count(q.numel(), workers)
    if bh >= threads or plan.nb < 2:
        over_rows(lambda lo, hi: _band_grads_rows(grad[lo:hi], qs[lo:hi], k[lo:hi], v[lo:hi], lse[lo:hi],
                                                   delta[lo:hi], plan, dq[lo:hi], dk[lo:hi], dv[lo:hi]),
                   bh, q.numel(), threads)
    else:  # fewer rows than threads: each row's buckets are split too; a split's key gradients get their own buffer
        parts = min(plan.nb, 2 * threads)
        cuts = [plan.nb * i // parts for i in range(parts + 1)]

        def split(row: int, b0: int, b1: int) -> tuple[int, int, Tensor, Tensor]:
            key0, key1 = max(0, b0 - plan.lb) * plan.w, b1 * plan.w
            r = slice(row, row + 1)
            dk_part, dv_part = k.new_zeros(1, key1 - key0, k.shape[-1]), v.new_zeros(1, key1 - key0, v.shape[-1])
            _band_grads_rows(grad[r], qs[r], k[r], v[r], lse[r], delta[r], plan, dq[r], dk_part, dv_part,
                             buckets=(b0, b1), key0=key0)
            return row, key0, dk_part, dv_part

        tasks = [functools.partial(split, row, b0, b1) for row in range(bh) for b0, b1 in itertools.pairwise(cuts)]
        for row, key0, dk_part, dv_part in run_tasks(tasks, threads):
            dk[row : row + 1, key0 : key0 + dk_part.shape[1]] += dk_part
            dv[row : row + 1, key0 : key0 + dv_part.shape[1]] += dv_part
    dq.mul_(scale)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


# --------------------------------------------------------------------------------------------- native kernel
@dataclass(frozen=True)
class _WindowPattern:
    win: BlockedWindowMask
    n: int  # queries = keys
    fwd: str = "attnkit_band_fwd"
    bwd: str = "attnkit_band_bwd"

    @property
    def groups(self) -> int:
        return -(-self.n // self.win.window)

    def args(self, row: int, kv_len: int, e: int, ev: int) -> tuple[object, ...]:
        w = self.win
        return self.n, kv_len, e, ev, w.window, w.look_backward, w.look_forward, int(w.causal)

    def keys(self, row: int, g0: int, g1: int) -> tuple[int, int]:
        w = self.win
        return max(0, g0 - w.look_backward) * w.window, min(self.n, (g1 + w.look_forward) * w.window)


def window_native(q: Tensor, k: Tensor, v: Tensor, win: BlockedWindowMask, scale: float, isa: int = 2,
                   lengths: Tensor | None = None) -> Tensor:
    """``L == S`` on the C kernel (see :func:`native_attention`)."""
    return native_attention(q, k, v, _WindowPattern(win, q.shape[2]), scale, isa, lengths)


# --------------------------------------------------------------------------------------------- sliding window
def _window_fast(q: Tensor, k: Tensor, v: Tensor, win: BlockedWindowMask, scale: float) -> Tensor:
    """``L == S``, no key mask, in PyTorch: one flash call per block offset, merged with the log-sum-exp."""
    b, h, n, e = q.shape
    w = win.window
    nb = -(-n // w)
    pad = nb * w - n
    k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)  # (B, H, N, E|Ev)
    ev = v.shape[-1]
    q, k, v = same_head_dim(q, k, v)  # the flash kernel wants E == Ev: zero columns change nothing
    e = q.shape[-1]
    if pad:  # zero rows at the end; padded keys are masked below (or unreachable when causal)
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    if win.causal:  # the band as diagonal sub-blocks plus one contiguous key range per sub-block row
        plan = _band_plan(nb * w, w, win.look_backward)
        flat = [t.reshape(b * h, nb * w, e).contiguous() for t in (q, k, v)]  # (BH, N, E)
        out = _CausalBandFn.apply(*flat, plan, scale)  # (BH, N, E)
        return out.view(b, h, nb * w, e)[:, :, :n, :ev]  # (B, H, N, Ev)
    q4 = q.reshape(b * h, nb, w, e)  # (BH, nb, w, E): a view when q is contiguous
    k4 = k.reshape(b * h, nb, w, e)  # (BH, nb, w, E)
    v4 = v.reshape(b * h, nb, w, e)  # (BH, nb, w, E)
    back = min(win.look_backward, nb - 1)
    ahead = 0 if win.causal else min(win.look_forward, nb - 1)
    offsets = [0, *range(-1, -back - 1, -1), *range(1, ahead + 1)]
    pieces = []
    for d in offsets:  # query block i sees key block i + d (with causal, blocks ahead are all masked: skipped)
        q_idx = slice(max(0, -d), nb - max(0, d))
        k_idx = slice(max(0, d), nb - max(0, -d))
        mask = None
        reads_last = k_idx.stop == nb and not (win.causal and d == 0)
        if pad and reads_last:  # the last key block is part padding: hide those keys from the row that reads it
            count = k_idx.stop - k_idx.start
            mask = q4.new_zeros(1, count, 1, w)  # (1, P, 1, w), additive
            mask[0, -1, 0, w - pad :] = float("-inf")
        pieces.append(Piece(q_idx, k_idx, win.causal and d == 0, mask))
    out, _ = run_pieces(q4, k4, v4, pieces, scale)  # (BH, nb, w, Ev)
    return out.view(b, h, nb * w, e)[:, :, :n, :ev]  # (B, H, N, Ev)


def _window_blockwise(
    q: Tensor, k: Tensor, v: Tensor, win: BlockedWindowMask, key_mask: Tensor | None, scale: float
) -> Tensor:
    """Readable blockwise path (autograd): gather each query block's key buckets, then one masked SDPA call."""
    b, h, q_len, e = q.shape
    k_len, w = k.shape[2], win.window
    lb, lf = win.look_backward, win.look_forward
    k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)  # (B, H, S, E|Ev)
    offset = k_len - q_len  # query i sits at position i + offset
    first = offset // w  # bucket of the first query
    front = offset % w  # its place inside that bucket
    nq = -(-(front + q_len) // w)  # query blocks
    nk = -(-k_len // w)  # key buckets
    q5 = F.pad(q, (0, 0, front, nq * w - front - q_len)).view(b, h, nq, w, e)  # (B, H, nq, w, E)

    def buckets(x: Tensor) -> Tensor:  # (B, H, S, X) -> (B, H, nq, (lb+1+lf)*w, X): each query block's keys
        x = F.pad(x, (0, 0, lb * w, (nk * w - k_len) + lf * w))  # zero buckets around; masked below
        x = x.view(*x.shape[:2], nk + lb + lf, w, x.shape[-1])  # (B, H, nk+lb+lf, w, X)
        parts = [x[:, :, first + d : first + d + nq] for d in range(lb + lf + 1)]
        return torch.cat(parts, dim=3)  # (B, H, nq, ctx, X)

    dev = q.device
    q_pos = (first * w + torch.arange(nq * w, device=dev)).view(nq, w, 1)  # (nq, w, 1)
    k_pos = ((first - lb) * w + torch.arange(nq, device=dev).view(nq, 1, 1) * w
             + torch.arange((lb + 1 + lf) * w, device=dev).view(1, 1, -1))  # (nq, 1, ctx)
    allowed = (k_pos >= 0) & (k_pos < k_len)  # (nq, 1, ctx): real keys only
    allowed = allowed & (k_pos <= q_pos) if win.causal else allowed.expand(nq, w, -1)  # (nq, w, ctx)
    allowed = allowed.view(1, 1, nq, w, -1)  # (1, 1, nq, w, ctx)
    if key_mask is not None:
        hidden = ~key_mask.view(b, 1, k_len, 1)  # padding keys: zeroed, so even NaN padding never leaks in
        k, v = k.masked_fill(hidden, 0.0), v.masked_fill(hidden, 0.0)
        km = buckets(key_mask.view(b, 1, k_len, 1).to(q.dtype))  # (B, 1, nq, ctx, 1)
        allowed = allowed & (km.transpose(-1, -2) > 0)  # (B, 1, nq, w, ctx)
    k5, v5 = buckets(k), buckets(v)  # (B, H, nq, ctx, E|Ev)
    alive = allowed.any(-1, keepdim=True)  # (B|1, 1, nq, w, 1)
    allowed = allowed | ~alive  # dead rows see everything (finite), zeroed below
    allowed = allowed.expand(b, h, nq, w, allowed.shape[-1]).reshape(b, h * nq, w, -1)  # (B, H*nq, w, ctx)
    out = F.scaled_dot_product_attention(
        q5.reshape(b, h * nq, w, e), k5.reshape(b, h * nq, -1, e), v5.reshape(b, h * nq, -1, v.shape[-1]),
        attn_mask=allowed, scale=scale,
    ).view(b, h, nq, w, -1)  # (B, H, nq, w, Ev)
    out = out * alive  # fully masked rows -> zeros (and zero gradients)
    return out.reshape(b, h, nq * w, -1)[:, :, front : front + q_len]  # (B, H, L, Ev)


def sliding_window_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    window: int,
    causal: bool = True,
    look_backward: int = 1,
    look_forward: int = 0,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """Exact attention restricted to a blocked sliding window (:class:`BlockedWindowMask`), in O(N·w) time and memory.

    Equivalent to ``scaled_dot_product_attention(query, key, value, mask)`` with
    ``mask = BlockedWindowMask(window, look_backward=..., look_forward=..., causal=...).materialize(L, S) & key_mask``,
    without ever building the ``L x S`` mask or scores.

    Args:
        query: ``(B, H, L, E)``.
        key: ``(B, Hkv, S, E)``, ``Hkv`` dividing ``H`` (grouped-query attention).
        value: ``(B, Hkv, S, Ev)``.
        window: bucket size ``w`` in tokens.
        causal: also forbid keys after the query's position.
        look_backward: buckets back a query sees (``1``: its own and the previous one).
        look_forward: buckets ahead a query sees.
        key_mask: optional boolean ``(B, S)``, ``True`` = real key that may be attended (key padding).
        scale: score scale, ``1/sqrt(E)`` when ``None``.
        impl: a backend to force, by name: ``"native_band"`` (the C kernel, ``csrc/band.c``, in float32 for
            float32 / bfloat16 / float16 CPU inputs with ``L == S`` and no ``key_mask`` or a right-padding one),
            ``"flash_pieces"`` (PyTorch's flash kernel per block offset, merged with the log-sum-exp; ``L == S`` on
            the CPU, any float dtype, no ``key_mask``) or ``"window_blockwise"`` (the readable blockwise path:
            any input); ``"auto"`` runs the first of these that serves the input, as ``backend="auto"`` does.
            ``"native"`` is short for ``"native_band"``, ``"torch"`` for the first of ``"flash_pieces"`` and
            ``"window_blockwise"`` that serves. A forced backend that cannot serve raises with its reasons.

    Returns:
        ``(B, H, L, Ev)``; query ``i`` sits at position ``i + S - L``. Rows with no key to attend to give zeros.

    Shape:
        query ``(B, H, L, E)``, key ``(B, Hkv, S, E)``, value ``(B, Hkv, S, Ev)`` with ``L <= S`` ->
        ``(B, H, L, Ev)``.

    Example:
        >>> import torch
        >>> q = torch.randn(2, 4, 70, 8); kv = torch.randn(2, 1, 70, 8)       # GQA: 4 query heads, 1 kv head
        >>> sliding_window_attention(q, kv, kv, window=16, look_backward=2).shape
        torch.Size([2, 4, 70, 8])
    """
    q, k, v = V.check_qkv(query, key, value, allow_3d=False)
    win = BlockedWindowMask(window, look_backward=look_backward, look_forward=look_forward, causal=bool(causal))
    b, _, q_len, e = q.shape
    k_len = k.shape[2]
    if q_len > k_len:
        raise V.fail("L <= S (queries are the newest positions of the keys)", f"L={q_len}, S={k_len}", "L <= S")
    if key_mask is not None:
        key_mask = V.check_key_mask(key_mask, b, k_len)
    if impl not in _IMPLS:
        raise V.fail(f"impl in {list(_IMPLS)}", repr(impl), "impl='auto'")
    scale_f = V.check_scale(scale, e)
    if q_len == 0 or k_len == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]) + 0.0 * (q.sum() + k.sum() + v.sum())
    padding = _padding_form(q, k_len, key_mask)
    reasons = {}
    for name in _IMPLS[impl]:
        why = _WINDOW_REASONS[name](q, k_len, padding)
        if not why:
            lengths = right_padding(key_mask) if key_mask is not None and name == "native_band" else None
            return _run_window(name, q, k, v, win, key_mask, lengths, scale_f)
        reasons[name] = why
    raise V.fail(f"an input that impl={impl!r} serves",
                 "; ".join(f"{n}: {'; '.join(r)}" for n, r in reasons.items()), "impl='auto'")


# --------------------------------------------------------------------------------------------- its three backends
def _padding_form(q: Tensor, k_len: int, key_mask: Tensor | None) -> str:
    """``"none"``, ``"right"`` (the native kernel's ``kv_len``) or ``"other"`` key padding."""
    if key_mask is None:
        return "none"
    if q.shape[2] != k_len or q.device.type != "cpu":  # only the native kernel reads the form; spare the check
        return "other"
    return "right" if right_padding(key_mask) is not None else "other"


def _band_reasons(q: Tensor, k_len: int, padding: str, declared: bool = True) -> list[str]:
    """Why the native band kernel cannot serve; ``declared=False`` leaves out the dtype and device (the dispatcher
    checks what a backend declares; the public function asks for everything)."""
    reasons = []
    if q.shape[2] != k_len:
        reasons.append(f"L={q.shape[2]} != S={k_len} (the native kernel serves L == S)")
    lib_why = "" if _native.load() is not None else f"no native library ({_native.status()})"
    why = native_unsupported(q, "auto") if declared else lib_why
    if why:
        reasons.append(why)
    if padding == "other":
        reasons.append("a key_mask that is not right padding (the native kernel reads lengths)")
    return reasons


def _pieces_reasons(q: Tensor, k_len: int, padding: str, declared: bool = True) -> list[str]:
    reasons = []
    if q.shape[2] != k_len:
        reasons.append(f"L={q.shape[2]} != S={k_len} (the flash pieces serve L == S)")
    if declared and q.device.type != "cpu":
        reasons.append(f"a {q.device.type} tensor (PyTorch's CPU flash kernel)")
    if padding != "none":
        reasons.append("key padding (the flash pieces read no key mask)")
    return reasons


def _blockwise_reasons(q: Tensor, k_len: int, padding: str, declared: bool = True) -> list[str]:
    return []


_WINDOW_REASONS = {"native_band": _band_reasons, "flash_pieces": _pieces_reasons,
                   "window_blockwise": _blockwise_reasons}
#: ``impl=`` of :func:`sliding_window_attention` -> the backends it may run, in order ("native" and "torch" are
#: shorthands kept from before the backends were split)
_IMPLS = {"auto": ("native_band", "flash_pieces", "window_blockwise"), "native": ("native_band",),
          "torch": ("flash_pieces", "window_blockwise"), "native_band": ("native_band",),
          "flash_pieces": ("flash_pieces",), "window_blockwise": ("window_blockwise",)}


def _run_window(name: str, q: Tensor, k: Tensor, v: Tensor, win: BlockedWindowMask, key_mask: Tensor | None,
                lengths: Tensor | None, scale: float) -> Tensor:
    if name == "native_band":
        return window_native(q, k, v, win, scale, lengths=lengths)
    if name == "flash_pieces":
        return _window_fast(q, k, v, win, scale)
    return _window_blockwise(q, k, v, win, key_mask, scale)


# --------------------------------------------------------------------------------------------- dispatcher
def _window_call(call: AttentionCall) -> tuple[list[str], BlockedWindowMask | None, Tensor | None]:
    """What every window backend asks of a call: reasons it is not a window call, the window, the key lengths."""
    reasons = []
    win, pad, why = split_with_padding(call.structure, BlockedWindowMask, "window")
    if win is None:
        reasons.append(why)
    if call.mask is not None:
        reasons.append("an explicit tensor mask (the window kernels read only BlockedWindowMask & PaddingMask)")
    if call.is_causal:
        reasons.append("is_causal=True on top of a window (use BlockedWindowMask(causal=True))")
    if call.dropout_p > 0:
        reasons.append("dropout on the weights")
    if call.q_len > call.k_len:
        reasons.append("more queries than keys")
    if call.need_weights:
        reasons.append("it does not return the attention weights")
    return reasons, win, None if pad is None else pad.lengths


def _window_supports(name: str) -> Callable[[AttentionCall], list[str]]:
    def supports(call: AttentionCall) -> list[str]:
        reasons, _, lengths = _window_call(call)
        padding = "none" if lengths is None else "right"  # a PaddingMask is right padding
        return reasons + _WINDOW_REASONS[name](call.query, call.k_len, padding, False)
    return supports


def _window_fn(name: str) -> Callable[[AttentionCall], tuple[Tensor, None]]:
    def fn(call: AttentionCall) -> tuple[Tensor, None]:
        _, win, pad_lengths = _window_call(call)
        if win is None:
            raise V.fail("a BlockedWindowMask structure", repr(call.structure), "backend='auto'")
        key_mask = lengths = None
        if pad_lengths is not None:
            key_mask = padding_mask(pad_lengths.to(call.query.device), call.k_len).view(call.batch, call.k_len)
            lengths = key_mask.sum(-1)
        if call.q_len == 0:
            q = call.query
            return q.new_zeros(*q.shape[:3], call.value.shape[-1]) + 0.0 * (q.sum() + call.key.sum()
                                                                            + call.value.sum()), None
        return _run_window(name, call.query, call.key, call.value, win, key_mask, lengths, call.scale), None
    return fn


def _band_kernel(call: AttentionCall) -> str:
    lib = _native.load()
    return f"native C kernel (sliding window: {_native.band_body(lib) if lib is not None else 'not loaded'})"


register_backend(Backend(
    "native_band", _window_fn("native_band"), False, _window_supports("native_band"),
    "blocked sliding window (and right key padding), L == S, O(N*w): the native C kernel (csrc/band.c), forward "
    "and backward in float32", kernel=_band_kernel, dtypes=(torch.float32, torch.bfloat16, torch.float16),
    devices=("cpu",), mask_kinds=("BlockedWindowMask", "PaddingMask"),
))
register_backend(Backend(
    "flash_pieces", _window_fn("flash_pieces"), False, _window_supports("flash_pieces"),
    "blocked sliding window, L == S, no key padding, O(N*w): PyTorch's CPU flash kernel once per block offset, "
    "merged with the log-sum-exp", devices=("cpu",), mask_kinds=("BlockedWindowMask",),
))
register_backend(Backend(
    "window_blockwise", _window_fn("window_blockwise"), False, _window_supports("window_blockwise"),
    "blocked sliding window (and key padding), any L <= S, O(N*w): each query block's key buckets gathered, one "
    "masked SDPA call, autograd", mask_kinds=("BlockedWindowMask", "PaddingMask"),
))
