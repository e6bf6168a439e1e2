"""The block description of a mask, and its compiler: what the native block engine reads.

Queries are cut into tiles of :data:`BLOCK` (64) rows and keys into blocks of 64; every (tile, key block) pair is
*empty* (never read), *full* (the kernel's unmasked path) or *partial* (a 64-bit word per row says which keys it may
attend). :class:`MaskBlocks` holds the description as a CSR per description row; ``_compile`` builds it from a mask
object of :mod:`attnkit.functional.masks`: the block states the mask knows analytically (``_interval_states`` for
masks whose rows attend one interval of keys), then every still-partial block evaluated element by element with the
mask's ``mask_mod`` (``_evaluate_partial``), which also finds the blocks that turn out empty or full.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ._threads import run_tasks
from ._validate import fail

if TYPE_CHECKING:
    from .masks import AttentionMask

__all__ = ["BLOCK", "EMPTY", "FULL", "PARTIAL", "MaskBlocks", "ModFn"]

BLOCK = 64
"""Rows of a query tile and keys of a key block in the block description (the native kernel's tile)."""
EMPTY, PARTIAL, FULL = 0, 1, 2
"""Block states: no pair may attend / some may (a bit mask per row) / every pair may."""

ModFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``: FlexAttention's signature, ``True`` = may attend."""

_CHUNK_BLOCKS = 128  # partial blocks evaluated at once: 128 x 64 x 64 elements (int64 temporaries of 4 MiB)
_BIT_WEIGHTS = (1 << torch.arange(8)).to(torch.uint8)


def _nblocks(n: int) -> int:
    return -(-n // BLOCK)


def _pack_bits(allowed: Tensor) -> Tensor:
    """``(P, 64, 64)`` bool -> ``(P, 64)`` int64 words: bit ``j`` of word ``i`` = row ``i`` may attend key ``j``."""
    p = allowed.shape[0]
    bytes_ = (allowed.reshape(p * BLOCK, 8, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(-1, dtype=torch.uint8)
    return bytes_.contiguous().view(torch.int64).view(p, BLOCK)  # little-endian: byte m holds keys 8m .. 8m + 7


def _unpack_bits(words: Tensor) -> Tensor:
    """The inverse of :func:`_pack_bits`: ``(P, 64)`` int64 -> ``(P, 64, 64)`` bool."""
    p = words.shape[0]
    bytes_ = words.contiguous().view(torch.uint8).view(p, BLOCK, 8, 1)  # (P, 64, 8, 1)
    return ((bytes_ >> torch.arange(8, dtype=torch.uint8)) & 1).bool().view(p, BLOCK, BLOCK)


@dataclass(frozen=True, eq=False)
class MaskBlocks:
    """One block description of a mask for ``L`` queries and ``S`` keys: what the native engine reads.

    Queries are cut into tiles of :data:`BLOCK` (64) rows and keys into blocks of 64. For every description row
    (``batch x heads`` of them; ``batch`` is 1 or ``B``, ``heads`` 1 or ``H``: 1 = shared by every batch row / head)
    and query tile, a CSR lists the key blocks the tile touches, in ascending order; each is *full* (every pair may
    attend: the kernel's unmasked path) or *partial* (``part >= 0``: 64 words of 64 bits, bit ``j`` of word ``i`` =
    row ``i`` of the tile may attend key ``j`` of the block). Key blocks not listed are empty and never read.

    Attributes:
        row_ptr: ``(batch * heads, Nq + 1)`` int64, offsets into ``cols``; row ``r`` starts where ``r - 1`` ended.
        cols: ``(nnz,)`` int64 key blocks.
        part: ``(nnz,)`` int64: ``-1`` for a full block, else the block's row in ``bits``.
        bits: ``(P, 64)`` int64 (the words as unsigned 64-bit integers in memory).
    """

    q_len: int
    k_len: int
    batch: int
    heads: int
    row_ptr: Tensor
    cols: Tensor
    part: Tensor
    bits: Tensor

    @property
    def n_q_blocks(self) -> int:
        return _nblocks(self.q_len)

    @property
    def n_k_blocks(self) -> int:
        return _nblocks(self.k_len)

    def row(self, b: int, h: int) -> int:
        """The description row that batch row ``b`` and head ``h`` read."""
        return (b if self.batch > 1 else 0) * self.heads + (h if self.heads > 1 else 0)

    def states(self) -> Tensor:
        """``(batch, heads, Nq, Nk)`` uint8 block states (:data:`EMPTY`, :data:`PARTIAL`, :data:`FULL`)."""
        nq, nk = self.n_q_blocks, self.n_k_blocks
        rows = self.batch * self.heads
        counts = self.row_ptr.diff(dim=1).reshape(-1)  # (R * Nq,)
        tile = torch.repeat_interleave(torch.arange(rows * nq), counts)  # (nnz,) flat (row, q block)
        out = torch.zeros(rows * nq, nk, dtype=torch.uint8)
        out[tile, self.cols] = torch.where(self.part < 0, FULL, PARTIAL).to(torch.uint8)
        return out.view(self.batch, self.heads, nq, nk)

    def to_dense(self) -> Tensor:
        """The mask it describes, ``(batch, heads, L, S)`` bool (expanded back, for tests)."""
        nq, nk = self.n_q_blocks, self.n_k_blocks
        st = self.states().view(-1, nq, nk)
        blocks = torch.zeros(*st.shape, BLOCK, BLOCK, dtype=torch.bool)  # (R, Nq, Nk, 64, 64)
        blocks[st == FULL] = True
        blocks[st == PARTIAL] = _unpack_bits(self.bits[self.part[self.part >= 0]])  # row-major = CSR order
        dense = blocks.permute(0, 1, 3, 2, 4).reshape(-1, nq * BLOCK, nk * BLOCK)
        return dense[:, : self.q_len, : self.k_len].reshape(self.batch, self.heads, self.q_len, self.k_len)

    def density(self) -> float:
        """Share of the ``L x S`` pairs the kernel computes (full and partial blocks)."""
        total = self.batch * self.heads * self.n_q_blocks * self.n_k_blocks
        return self.cols.numel() / max(1, total)


def _compile(mask: AttentionMask, q_len: int, k_len: int) -> MaskBlocks:
    """Build the :class:`MaskBlocks` of ``mask``: analytic block states where the mask knows them, then the
    element mask of every block still *partial*, evaluated by ``mask._mod`` (:func:`_evaluate_partial`), which also
    reclassifies blocks that turn out empty or full."""
    rb, rh = mask._rows()
    nq, nk = _nblocks(q_len), _nblocks(k_len)
    states = mask._states(q_len, k_len)
    if states is None:
        states = torch.full((1, 1, nq, nk), PARTIAL, dtype=torch.uint8)
    st = states.expand(rb, rh, nq, nk).reshape(rb * rh, nq, nk).clone()  # (R, Nq, Nk)
    partial = (st == PARTIAL).nonzero()  # (P, 3): row, q block, k block (lexicographic)
    bits = torch.zeros(0, BLOCK, dtype=torch.int64)
    if partial.shape[0]:
        new_states, bits = _evaluate_partial(mask._mod(q_len, k_len), rh, partial, q_len, k_len)
        st[partial[:, 0], partial[:, 1], partial[:, 2]] = new_states
    nz = st.nonzero()  # (nnz, 3), sorted by row, q block, k block
    kind = st[nz[:, 0], nz[:, 1], nz[:, 2]]
    is_part = kind == PARTIAL
    part = torch.where(is_part, torch.cumsum(is_part, 0) - 1, -1).to(torch.int64)
    counts = (st > 0).sum(-1).reshape(-1)  # (R * Nq,)
    row_ptr = torch.zeros(rb * rh * nq + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(counts, 0)
    ends = row_ptr[1:].view(rb * rh, nq)
    starts = torch.cat([row_ptr[:1], ends[:-1, -1]]).view(rb * rh, 1)
    return MaskBlocks(q_len, k_len, rb, rh, torch.cat([starts, ends], 1).contiguous(), nz[:, 2].contiguous(),
                      part.contiguous(), bits.contiguous())


def _evaluate_partial(mod: ModFn, rh: int, partial: Tensor, q_len: int, k_len: int) -> tuple[Tensor, Tensor]:
    """Evaluate ``mod`` on every element of the blocks ``partial`` (``(P, 3)``: description row, q block, k block,
    lexicographic): ``(P,)`` uint8 states (empty / partial / full) and the ``(P', 64)`` bit words of the blocks
    that stay partial, in ``partial``'s order.

    Exact: every pair is evaluated (nothing is probed). The function is called on chunks of ``_CHUNK_BLOCKS`` blocks
    with broadcast int64 indices ``b, h (n, 1, 1)``, ``q_idx (n, 64, 1)``, ``kv_idx (n, 1, 64)``, so its
    temporaries stay small (one pass over ``L x S`` int64 temporaries at once streams gigabytes through memory).
    Each ``(n, 64, 64)`` bool result is read as ``(n, 512)`` int64 words of 8 flags for the any / all reductions,
    and only the blocks that stay partial are packed to bits. The chunks are pulled from one queue by the intra-op
    thread count of workers, each running single-threaded ops (:func:`~attnkit.functional._threads.run_tasks`):
    hundreds of small multithreaded calls would each wait on a barrier, for long where other work shares the
    cores."""
    p = partial.shape[0]
    ar = torch.arange(BLOCK)
    out = torch.empty(p, dtype=torch.uint8)
    edges = bool(q_len % BLOCK or k_len % BLOCK)
    ones = 0x0101010101010101  # eight True flags in one int64 word
    r_all, qb_all, kb_all = partial.unbind(1)
    b_all, h_all = r_all // rh, r_all % rh

    def chunk(start: int) -> Tensor | None:
        sl = slice(start, start + _CHUNK_BLOCKS)
        qb, kb = qb_all[sl], kb_all[sl]
        n = qb.shape[0]
        q = qb.view(-1, 1, 1) * BLOCK + ar.view(1, BLOCK, 1)  # (n, 64, 1)
        kv = kb.view(-1, 1, 1) * BLOCK + ar.view(1, 1, BLOCK)  # (n, 1, 64)
        got = _as_bool(mod(b_all[sl].view(-1, 1, 1), h_all[sl].view(-1, 1, 1),
                           q.clamp(max=q_len - 1) if edges else q, kv.clamp(max=k_len - 1) if edges else kv))
        if got.shape != (n, BLOCK, BLOCK) or not got.is_contiguous():
            got = got.expand(n, BLOCK, BLOCK).contiguous()
        if edges:  # padding rows / keys past the lengths: never allowed, and do not stop a block being full
            real = (q < q_len) & (kv < k_len)  # (n, 64, 64)
            flags = (got & real).view(torch.uint8).view(torch.int64).view(n, -1)  # (n, 512): 8 flags per word
            full = (flags == real.view(torch.uint8).view(torch.int64).view(n, -1)).all(1)
        else:
            flags = got.view(torch.uint8).view(torch.int64).view(n, -1)
            full = (flags == ones).all(1)
        some = flags.any(1)
        out[sl] = torch.where(some, torch.where(full, FULL, PARTIAL), EMPTY)
        keep = some & ~full
        if not bool(keep.any()):
            return None
        return _pack_bits(flags.view(torch.uint8).view(torch.bool).view(n, BLOCK, BLOCK)[keep])

    tasks = [functools.partial(chunk, start) for start in range(0, p, _CHUNK_BLOCKS)]
    words = [w for w in run_tasks(tasks, min(len(tasks), torch.get_num_threads())) if w is not None]
    bits = torch.cat(words) if words else torch.zeros(0, BLOCK, dtype=torch.int64)
    return out, bits


def _as_bool(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise fail("a mask_mod that returns a tensor", type(x).__name__, "tensor ops on b, h, q_idx, kv_idx")
    return x if x.dtype == torch.bool else x != 0


def _interval_states(lo: Tensor, hi: Tensor, q_len: int, k_len: int, exact: bool = True) -> Tensor:
    """Block states of a mask whose query ``i`` (of row ``r``) may attend exactly the keys ``lo[r, i] ..
    hi[r, i]`` (inclusive; ``hi < lo``: none): ``lo, hi (Rb, Rh, L)`` -> ``(Rb, Rh, Nq, Nk)`` uint8.

    Full: every row of the tile covers the block (max lo <= first key, min hi >= last key). Empty: no row meets it.
    ``exact=False``: the rows' intervals are only bounds (holes inside), so nothing is called full.
    """
    nq, nk = _nblocks(q_len), _nblocks(k_len)
    pad = nq * BLOCK - q_len
    lo, hi = lo.clamp(min=0), hi.clamp(max=k_len - 1)
    dead = hi < lo
    lo, hi = lo.masked_fill(dead, k_len), hi.masked_fill(dead, -1)
    c0 = torch.arange(nk) * BLOCK  # (Nk,) first key of each block
    c1 = (c0 + BLOCK - 1).clamp(max=k_len - 1)  # (Nk,) last key
    lo_any = F.pad(lo, (0, pad), value=k_len)  # padding rows meet nothing
    hi_any = F.pad(hi, (0, pad), value=-1)
    meets = (lo_any.unsqueeze(-1) <= c1) & (hi_any.unsqueeze(-1) >= c0)  # (Rb, Rh, Nq*64, Nk)
    some = meets.view(*lo.shape[:2], nq, BLOCK, nk).any(-2)  # (Rb, Rh, Nq, Nk)
    out = some.to(torch.uint8)  # PARTIAL where some
    if exact:
        max_lo = F.pad(lo, (0, pad), value=-1).view(*lo.shape[:2], nq, BLOCK).amax(-1, keepdim=True)  # (.., Nq, 1)
        min_hi = F.pad(hi, (0, pad), value=k_len).view(*lo.shape[:2], nq, BLOCK).amin(-1, keepdim=True)
        full = (max_lo <= c0) & (min_hi >= c1)  # (Rb, Rh, Nq, Nk)
        out = torch.where(full, FULL, out).to(torch.uint8)
    return out
