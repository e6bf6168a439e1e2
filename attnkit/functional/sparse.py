"""Block-sparse attention and its layouts: cost proportional to the number of non-zero blocks.

Papers: "Generating Long Sequences with Sparse Transformers", Child, Gray, Radford and Sutskever, 2019.
https://arxiv.org/abs/1904.10509 (strided and fixed patterns). "Big Bird: Transformers for Longer Sequences",
Zaheer et al., 2020. https://arxiv.org/abs/2007.14062 (window + global + random blocks).

A *layout* is a boolean ``(Nq, Nk)`` (or per-head ``(H, Nq, Nk)``) tensor over blocks of ``block_size`` tokens:
``layout[i, j]`` is ``True`` when query block ``i`` may attend to key block ``j`` (the one mask meaning of attnkit,
one level up). With ``causal=True`` keys after the query's position are also forbidden (upper-left, ``L == S``).

On the CPU the native kernel of :mod:`attnkit.functional.local` (``csrc/band.c``) serves float32, bfloat16 and
float16 inputs: each query block walks its own list of key blocks (adjacent ones as one range) with the same tiles
and microkernel as the sliding window, forward and backward. The PyTorch path (``impl="torch"``, and float64)
groups the non-zero blocks into *pieces* — the ``r``-th non-zero key block of every query block — and runs one
batched flash call per piece; pieces merge exactly with their log-sum-exp, and the backward pass reuses the flash
backward kernel with the merged output. Diagonal blocks of a causal layout run with ``is_causal`` and cost half.

Example:
    >>> import torch
    >>> from attnkit.functional import block_sparse_attention, bigbird_layout, BlockSparseMask
    >>> q = k = v = torch.randn(1, 2, 128, 16)                    # (B, H, N, E)
    >>> layout = bigbird_layout(8, window=3, n_global=1, n_random=1, seed=0)   # (8, 8) blocks of 16
    >>> out = block_sparse_attention(q, k, v, layout, block_size=16)
    >>> out.shape
    torch.Size([1, 2, 128, 16])
    >>> from attnkit.functional import scaled_dot_product_attention
    >>> dense = scaled_dot_product_attention(q, k, v, BlockSparseMask(layout, 16).materialize(128, 128))
    >>> torch.allclose(out, dense, atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _native
from . import _validate as V
from ._native_bridge import native_attention, native_unsupported, right_padding
from ._pieces import Piece, run_pieces, same_head_dim
from ._reference import expand_kv_heads
from .dense import dense_attention
from .dispatch import AttentionCall, Backend, register_backend
from .masks import BlockSparseMask, check_layout, fit_layout, padding_mask, split_with_padding

__all__ = [
    "BlockSparseMask",
    "bigbird_layout",
    "block_sparse_attention",
    "fixed_layout",
    "local_layout",
    "strided_layout",
]


# --------------------------------------------------------------------------------------------- layouts
def _check_blocks(n_blocks: object) -> int:
    if not isinstance(n_blocks, int) or isinstance(n_blocks, bool) or n_blocks < 1:
        raise V.fail("n_blocks to be a positive int", repr(n_blocks), "n_blocks = ceil(N / block_size)")
    return n_blocks


def _grid(n_blocks: int) -> tuple[Tensor, Tensor]:
    i = torch.arange(n_blocks).view(-1, 1)  # (Nq, 1) query block
    j = torch.arange(n_blocks).view(1, -1)  # (1, Nk) key block
    return i, j


def local_layout(n_blocks: int, *, look_backward: int = 1, look_forward: int = 0) -> Tensor:
    """Blocks ``i - look_backward <= j <= i + look_forward``: the block form of :class:`WindowMask`.

    >>> local_layout(4).int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 1, 1]], dtype=torch.int32)
    """
    i, j = _grid(_check_blocks(n_blocks))
    return (j >= i - look_backward) & (j <= i + look_forward)


def strided_layout(n_blocks: int, *, stride: int, causal: bool = True) -> Tensor:
    """Sparse Transformer's strided pattern: the last ``stride`` blocks, and every ``stride``-th block before.

    The union of the paper's two heads (``i - j < stride`` and ``(i - j) % stride == 0``), so one head sees both.
    """
    if stride < 1:
        raise V.fail("stride >= 1", repr(stride), "stride = sqrt(n_blocks)")
    i, j = _grid(_check_blocks(n_blocks))
    near = (i - j).abs() < stride
    lattice = (i - j) % stride == 0
    layout = near | lattice
    return layout & (j <= i) if causal else layout


def fixed_layout(n_blocks: int, *, stride: int, n_summary: int = 1, causal: bool = True) -> Tensor:
    """Sparse Transformer's fixed pattern: blocks of the same ``stride``-chunk, and the chunks' last ``n_summary``."""
    if stride < 1 or not 1 <= n_summary <= stride:
        raise V.fail("stride >= 1 and 1 <= n_summary <= stride", f"stride={stride}, n_summary={n_summary}",
                     "stride=4, n_summary=1")
    i, j = _grid(_check_blocks(n_blocks))
    same_chunk = torch.div(i, stride, rounding_mode="floor") == torch.div(j, stride, rounding_mode="floor")
    summary = j % stride >= stride - n_summary
    layout = same_chunk | summary
    return layout & (j <= i) if causal else layout


def bigbird_layout(n_blocks: int, *, window: int = 3, n_global: int = 1, n_random: int = 2, seed: int = 0) -> Tensor:
    """BigBird: a band of ``window`` blocks, ``n_global`` global blocks (rows and columns), ``n_random`` random keys.

    Random blocks come from a ``torch.Generator`` seeded with ``seed``, so a layout is reproducible.
    """
    n = _check_blocks(n_blocks)
    if window < 1 or window % 2 == 0:
        raise V.fail("an odd window >= 1 (blocks centred on the query block)", repr(window), "window=3")
    i, j = _grid(n)
    layout = (i - j).abs() <= window // 2  # (N, N)
    layout[:n_global, :] = True
    layout[:, :n_global] = True
    gen = torch.Generator().manual_seed(seed)
    for row in range(n_global, n):
        free = (~layout[row]).nonzero().flatten()  # blocks not yet visible to this row
        if free.numel():
            pick = free[torch.randperm(free.numel(), generator=gen)[:n_random]]
            layout[row, pick] = True
    return layout


# --------------------------------------------------------------------------------------------- mask object
# BlockSparseMask lives in attnkit.functional.masks with every other mask; it is re-exported here.
_check_layout = check_layout
_fit_layout = fit_layout


# --------------------------------------------------------------------------------------------- kernel
def _to_device(index: slice | Tensor, device: torch.device) -> slice | Tensor:
    """A piece's block index on ``device`` (index tensors move; slices stay as they are)."""
    return index.to(device) if isinstance(index, Tensor) else index


def _pieces_for(layout: Tensor, causal: bool, k_pad: int, dtype: torch.dtype, bs: int) -> list[Piece]:
    """Group a ``(Nq, Nk)`` layout into pieces: the diagonal (causal), then the r-th non-zero key block of each row."""
    nk = layout.shape[1]
    pieces = []
    if causal:
        diag = layout.diagonal().nonzero().flatten()  # query blocks that see their own block
        if diag.numel():
            pieces.append(Piece(diag, diag, True))
        i, j = torch.meshgrid(torch.arange(layout.shape[0]), torch.arange(nk), indexing="ij")
        layout = layout & (j < i)  # blocks after the diagonal are fully masked: never computed
    rows, cols = layout.nonzero(as_tuple=True)  # sorted by row, then column
    if rows.numel():
        starts = torch.zeros(layout.shape[0] + 1, dtype=torch.long)
        starts[1:] = torch.cumsum(layout.sum(1), 0)
        rank = torch.arange(rows.numel()) - starts[rows]  # place of each block within its row
        for r in range(int(rank.max()) + 1):
            sel = rank == r
            q_idx, k_idx = rows[sel], cols[sel]
            mask = None
            if k_pad and bool((k_idx == nk - 1).any()):  # the last key block is part padding: hide it
                mask = torch.zeros(1, q_idx.numel(), 1, bs, dtype=dtype)
                mask[0, k_idx == nk - 1, 0, bs - k_pad :] = float("-inf")
            pieces.append(Piece(q_idx, k_idx, False, mask))
    return pieces


def _with_key_padding(piece: Piece, pad_add: Tensor, heads: int) -> Piece:
    """``piece`` with the additive key-padding mask of its key blocks, ``(B*heads, P, 1, bs)`` (replaces the tail
    mask: the padding covers the tail). Padding gets the lowest finite value, not ``-inf``, so a row whose keys in a
    piece are all padding keeps a finite log-sum-exp that the merge weighs to zero."""
    add = pad_add[:, piece.k] if isinstance(piece.k, slice) else pad_add.index_select(1, piece.k)  # (B, P, bs)
    b, p, bs = add.shape
    mask = add.unsqueeze(1).expand(b, heads, p, bs).reshape(b * heads, p, 1, bs)
    return Piece(piece.q, piece.k, piece.causal, mask)


@dataclass(frozen=True)
class _SparsePattern:
    """A layout as the native kernel reads it (a :class:`NativePattern`): per layout head, the key blocks of every
    query block, as a CSR."""

    row_ptr: Tensor  # (Hl, Nq + 1) int64: offsets into cols, each head starting where the previous one ended
    cols: Tensor  # (nnz,) int64: key blocks, ascending within each query block
    bs: int
    causal: bool
    heads: int  # query heads H: row r of B*H uses layout head r % H when the layout has one per head
    n_q: int
    n_k: int
    fwd: str = "attnkit_sparse_fwd"
    bwd: str = "attnkit_sparse_bwd"

    @staticmethod
    def build(layout: Tensor, bs: int, causal: bool, heads: int, n_q: int, n_k: int) -> _SparsePattern:
        """From a fitted ``(Hl, Nq, Nk)`` layout; with ``causal`` the blocks after the diagonal are dropped."""
        lay = layout.cpu()
        hl, nq, nk = lay.shape
        if causal:
            i, j = torch.meshgrid(torch.arange(nq), torch.arange(nk), indexing="ij")
            lay = lay & (j <= i)
        ends = torch.cumsum(lay.sum(-1).reshape(-1), 0).view(hl, nq)  # (Hl, Nq): running count of blocks
        starts = torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1, -1]]).view(hl, 1)  # (Hl, 1)
        row_ptr = torch.cat([starts, ends], dim=1).contiguous()  # (Hl, Nq + 1)
        cols = lay.nonzero()[:, 2].contiguous()  # sorted by head, query block, key block
        return _SparsePattern(row_ptr, cols, bs, causal, heads, n_q, n_k)

    @property
    def groups(self) -> int:
        return self.row_ptr.shape[1] - 1

    def _head(self, row: int) -> int:
        return row % self.heads if self.row_ptr.shape[0] > 1 else 0

    def args(self, row: int, kv_len: int, e: int, ev: int) -> tuple[object, ...]:
        ptr = self.row_ptr.data_ptr() + self._head(row) * (self.groups + 1) * self.row_ptr.element_size()
        return self.n_q, self.n_k, kv_len, e, ev, self.bs, ptr, self.cols.data_ptr(), int(self.causal)

    def keys(self, row: int, g0: int, g1: int) -> tuple[int, int]:
        ptr = self.row_ptr[self._head(row)]
        blocks = self.cols[int(ptr[g0]) : int(ptr[g1])]
        if not blocks.numel():
            return 0, 0
        return int(blocks.min()) * self.bs, min(self.n_k, (int(blocks.max()) + 1) * self.bs)


def _sparse_native(q: Tensor, k: Tensor, v: Tensor, fitted: Tensor, bs: int, causal: bool, scale: float,
                   lengths: Tensor | None, isa: int = 2) -> Tensor:
    """The C kernel over a fitted ``(Hl, Nq, Nk)`` layout (see :func:`~attnkit.functional.local.native_attention`)."""
    pattern = _SparsePattern.build(fitted, bs, causal, q.shape[1], q.shape[2], k.shape[2])
    return native_attention(q, k, v, pattern, scale, isa, lengths)


def block_sparse_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: Tensor,
    *,
    block_size: int,
    causal: bool = False,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """Exact attention over the non-zero blocks of ``layout``; time and memory proportional to their number.

    Equivalent to ``scaled_dot_product_attention(query, key, value, BlockSparseMask(layout, block_size,
    causal=causal).materialize(L, S) & key_mask)`` (boolean masks, ``True`` = may attend) without the dense mask or
    scores.

    Args:
        query: ``(B, H, L, E)``.
        key: ``(B, Hkv, S, E)``, ``Hkv`` dividing ``H``.
        value: ``(B, Hkv, S, Ev)``.
        layout: boolean ``(Nq, Nk)`` or ``(H, Nq, Nk)`` over blocks, ``True`` = may attend; at least
            ``ceil(L / block_size)`` by ``ceil(S / block_size)`` (extra blocks are ignored).
        block_size: tokens per block.
        causal: also forbid keys after the query's position (upper-left; needs ``L == S``).
        key_mask: optional boolean ``(B, S)``, ``True`` = real key that may be attended (key padding). Padding keys
            are never read: NaN there stays out of the outputs and gradients.
        scale: score scale, ``1/sqrt(E)`` when ``None``.
        impl: a backend to force, by name: ``"native_block_sparse"`` (the C kernel, ``csrc/band.c``, in float32
            for float32 / bfloat16 / float16 CPU inputs with no ``key_mask`` or a right-padding one; raises when it
            cannot run) or ``"torch_block_sparse"`` (PyTorch's flash kernel per piece, merged by log-sum-exp; any
            dtype and key mask); ``"auto"`` runs the first that serves, as ``backend="auto"`` does. ``"native"`` and
            ``"torch"`` are short for the two names.

    Returns:
        ``(B, H, L, Ev)``; queries whose blocks see no (real) key give zeros, with zero gradients. On devices other
        than the CPU the result comes from dense masked SDPA (same values, quadratic cost).

    Shape:
        query ``(B, H, L, E)``, key ``(B, Hkv, S, E)``, value ``(B, Hkv, S, Ev)`` -> ``(B, H, L, Ev)``.

    Example:
        >>> import torch
        >>> q = torch.randn(2, 4, 50, 8)
        >>> block_sparse_attention(q, q, q, strided_layout(7, stride=2), block_size=8, causal=True).shape
        torch.Size([2, 4, 50, 8])
        >>> real = torch.arange(50) < torch.tensor([[50], [31]])                    # (B, S): second sequence padded
        >>> block_sparse_attention(q, q, q, local_layout(7), block_size=8, key_mask=real).shape
        torch.Size([2, 4, 50, 8])
    """
    q, k, v = V.check_qkv(query, key, value, allow_3d=False)
    _check_layout(layout, block_size)
    b, h, q_len, _ = q.shape
    k_len, ev = k.shape[2], v.shape[-1]
    if causal and q_len != k_len:
        raise V.fail("L == S for a causal block-sparse layout", f"L={q_len}, S={k_len}", "causal=False")
    fitted = _fit_layout(layout, q_len, k_len, block_size)  # (H|1, Nq, Nk)
    if fitted.shape[0] not in (1, h):
        raise V.fail(f"a layout with 1 or H={h} heads", f"{tuple(layout.shape)}", "a (Nq, Nk) layout for all heads")
    if key_mask is not None:
        key_mask = V.check_key_mask(key_mask, b, k_len)
        key_mask = key_mask.to(q.device)
    if impl not in _IMPLS:
        raise V.fail(f"impl in {list(_IMPLS)}", repr(impl), "impl='auto'")
    scale_f = V.check_scale(scale, q.shape[-1])
    if q_len == 0 or k_len == 0:
        return q.new_zeros(b, h, q_len, ev) + 0.0 * (q.sum() + k.sum() + v.sum())
    if "native_block_sparse" in _IMPLS[impl]:
        why = native_unsupported(q, "auto")
        lengths = None if key_mask is None or why else right_padding(key_mask)
        if key_mask is not None and lengths is None:
            why = why or "a key_mask that is not right padding"
        if not why:
            return _sparse_native(q, k, v, fitted, block_size, causal, scale_f, lengths)
        if impl != "auto":
            raise V.fail("an input the native block-sparse kernel serves", why, "impl='auto'")
    return _sparse_torch(q, k, v, layout, fitted, block_size, causal, key_mask, scale_f)


#: ``impl=`` of :func:`block_sparse_attention` -> the backends it may run, in order ("native" and "torch" are
#: shorthands kept from before the backends were split)
_IMPLS = {"auto": ("native_block_sparse", "torch_block_sparse"), "native": ("native_block_sparse",),
          "torch": ("torch_block_sparse",), "native_block_sparse": ("native_block_sparse",),
          "torch_block_sparse": ("torch_block_sparse",)}


def _sparse_torch(q: Tensor, k: Tensor, v: Tensor, layout: Tensor, fitted: Tensor, block_size: int, causal: bool,
                  key_mask: Tensor | None, scale_f: float) -> Tensor:
    """The PyTorch path: flash pieces merged by log-sum-exp on the CPU, dense masked SDPA elsewhere."""
    b, h, q_len, _ = q.shape
    k_len, ev = k.shape[2], v.shape[-1]
    if q.device.type != "cpu":  # the piece engine drives PyTorch's CPU flash kernel; elsewhere: dense masked SDPA
        dense_mask = BlockSparseMask(layout, block_size, causal=causal).materialize(q_len, k_len, device=q.device)
        if key_mask is not None:
            dense_mask = dense_mask & key_mask.view(b, 1, 1, k_len)
        return dense_attention(q, k, v, dense_mask, scale=scale_f)
    bs = block_size
    nq, nk = fitted.shape[-2:]
    k_pad = nk * bs - k_len
    pad_add = None  # (B, Nk, bs) additive: 0 for a real key, the dtype's lowest finite value for padding
    if key_mask is not None:
        hidden = ~key_mask.view(b, 1, k_len, 1)  # padding keys are zeroed: even NaN padding never leaks in
        k, v = k.masked_fill(hidden, 0.0), v.masked_fill(hidden, 0.0)
        real = F.pad(key_mask, (0, k_pad), value=False).view(b, nk, bs)
        pad_add = torch.zeros(b, nk, bs, dtype=q.dtype, device=q.device).masked_fill_(~real, torch.finfo(q.dtype).min)
    k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)  # (B, H, S, E|Ev)
    q, k, v = same_head_dim(q, k, v)  # flash wants E == Ev
    e = q.shape[-1]
    q = F.pad(q, (0, 0, 0, nq * bs - q_len)).view(b, h, nq, bs, e)  # (B, H, Nq, bs, E)
    k = F.pad(k, (0, 0, 0, k_pad)).view(b, h, nk, bs, e)  # (B, H, Nk, bs, E)
    v = F.pad(v, (0, 0, 0, k_pad)).view(b, h, nk, bs, e)  # (B, H, Nk, bs, E)
    heads = [slice(None)] if fitted.shape[0] == 1 else [slice(i, i + 1) for i in range(h)]
    outs = []
    for hs, lay in zip(heads, fitted, strict=True):
        pieces = _pieces_for(lay.cpu(), causal, k_pad, q.dtype, bs)
        pieces = [Piece(_to_device(p.q, q.device), _to_device(p.k, q.device), p.causal,
                         None if p.mask is None else p.mask.to(q.device)) for p in pieces]
        qh, kh, vh = (t[:, hs] for t in (q, k, v))  # (B, Hh, N*, bs, E)
        hh = qh.shape[1]
        if not pieces:  # nothing to attend to anywhere
            outs.append(qh.new_zeros(b, hh, nq, bs, e) + 0.0 * (qh.sum() + kh.sum() + vh.sum()))
            continue
        if pad_add is not None:
            pieces = [_with_key_padding(p, pad_add, hh) for p in pieces]
        out, lse = run_pieces(
            qh.reshape(b * hh, nq, bs, e), kh.reshape(b * hh, nk, bs, e), vh.reshape(b * hh, nk, bs, e), pieces,
            scale_f,
        )  # (B*Hh, Nq, bs, E), (B*Hh, Nq, bs)
        if pad_add is not None:  # rows that saw only padding averaged zeroed values: make them (and their grads) 0
            alive = lse > torch.finfo(q.dtype).min / 2  # a real key scores far above the padding's lowest value
            out = out * alive.unsqueeze(-1).to(out.dtype)
        outs.append(out.view(b, hh, nq, bs, e))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (B, H, Nq, bs, E)
    return out.reshape(b, h, nq * bs, e)[:, :, :q_len, :ev]  # (B, H, L, Ev)


# --------------------------------------------------------------------------------------------- dispatcher
def _sparse_supports(call: AttentionCall) -> list[str]:
    """Why a call is not a block-sparse call (both block-sparse backends ask this)."""
    reasons = []
    sparse, _, why = split_with_padding(call.structure, BlockSparseMask, "block-sparse")
    if sparse is None:
        reasons.append(why)
    elif sparse.causal and call.q_len != call.k_len:
        reasons.append("a causal block-sparse layout needs L == S")
    if call.mask is not None:
        reasons.append("an explicit tensor mask (the block-sparse kernels read only a layout and a PaddingMask)")
    if call.is_causal:
        reasons.append("is_causal=True on top of a layout (use BlockSparseMask(causal=True))")
    if call.dropout_p > 0:
        reasons.append("dropout on the weights")
    if call.need_weights:
        reasons.append("it does not return the attention weights")
    return reasons


def _native_supports(call: AttentionCall) -> list[str]:
    reasons = _sparse_supports(call)
    if _native.load() is None:  # dtype and device: declared on the backend
        reasons.append(f"no native library ({_native.status()})")
    return reasons  # a PaddingMask is right padding, which the kernel reads as lengths


def _sparse_fn(impl: str) -> Callable[[AttentionCall], tuple[Tensor, None]]:
    def fn(call: AttentionCall) -> tuple[Tensor, None]:
        mask, pad, _ = split_with_padding(call.structure, BlockSparseMask, "block-sparse")
        if mask is None:
            raise V.fail("a BlockSparseMask structure", repr(call.structure), "backend='auto'")
        key_mask = None
        if pad is not None:
            key_mask = padding_mask(pad.lengths.to(call.query.device), call.k_len).view(call.batch, call.k_len)
        out = block_sparse_attention(
            call.query, call.key, call.value, mask.layout, block_size=mask.block_size, causal=mask.causal,
            key_mask=key_mask, scale=call.scale, impl=impl,
        )
        return out, None
    return fn


def _native_kernel(call: AttentionCall) -> str:
    lib = _native.load()
    return f"native C kernel (block-sparse: {_native.band_body(lib) if lib is not None else 'not loaded'})"


register_backend(Backend(
    "native_block_sparse", _sparse_fn("native_block_sparse"), False, _native_supports,
    "block-sparse attention over a layout (and right key padding), O(non-zero blocks): the native C kernel "
    "(csrc/band.c), forward and backward in float32", kernel=_native_kernel,
    dtypes=(torch.float32, torch.bfloat16, torch.float16), devices=("cpu",),
    mask_kinds=("BlockSparseMask", "PaddingMask"),
))
register_backend(Backend(
    "torch_block_sparse", _sparse_fn("torch_block_sparse"), False, _sparse_supports,
    "block-sparse attention over a layout (and key padding), O(non-zero blocks): PyTorch's CPU flash kernel per "
    "piece, merged by log-sum-exp (dense masked SDPA on other devices)",
    mask_kinds=("BlockSparseMask", "PaddingMask"),
))
