"""Masks: one meaning everywhere.

A **boolean** mask is ``True`` where a query **may attend** to a key (PyTorch SDPA's meaning, and the classic
tutorial's ``mask == 0 -> masked``). A **float** mask is **added** to the scores (``-inf`` blocks a key).

Two kinds of mask exist:

* tensors, built by :func:`padding_mask` and :func:`causal_mask`, that work anywhere;
* mask *objects* (:class:`CausalMask`, :class:`PaddingMask`, and their ``&``) that describe the structure,
  so the dispatcher can route them to a structured fast path (``is_causal`` in the fused kernel) instead of
  materialising an ``L x S`` tensor. ``mask.materialize(L, S)`` always gives the equivalent boolean tensor.

Causal alignment, for ``L`` queries and ``S`` keys:

* ``"upper_left"``: query ``i`` sees keys ``j <= i`` (PyTorch's ``is_causal=True``);
* ``"lower_right"``: query ``i`` sees keys ``j <= i + S - L``, so the last query sees every key. This is the
  alignment of a decoding step whose queries are the newest ``L`` tokens of a ``S``-token cache.

Example:
    >>> import torch
    >>> from attnkit.functional import causal_mask, padding_mask
    >>> causal_mask(2, 3, align="lower_right").int()
    tensor([[1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    >>> padding_mask(torch.tensor([1, 3]), 3).shape  # (B, 1, 1, S)
    torch.Size([2, 1, 1, 3])
"""

from __future__ import annotations

import abc
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validate import fail
from .mask_blocks import (
    BLOCK,
    EMPTY,
    FULL,
    PARTIAL,
    MaskBlocks,
    ModFn,
    _as_bool,
    _compile,
    _interval_states,
    _nblocks,
)

_ALIGNS = ("upper_left", "lower_right")


def _check_align(align: str) -> str:
    if align not in _ALIGNS:
        raise fail(f"align in {_ALIGNS}", repr(align), 'align="lower_right" for decoding with a KV cache')
    return align


def causal_mask(
    q_len: int, k_len: int | None = None, *, align: str = "upper_left", device: torch.device | str | None = None
) -> Tensor:
    """Boolean ``(L, S)`` causal mask, ``True`` = may attend.

    Args:
        q_len: number of queries ``L``.
        k_len: number of keys ``S`` (default ``L``).
        align: ``"upper_left"`` (query ``i`` sees keys ``j <= i``) or ``"lower_right"``
            (query ``i`` sees keys ``j <= i + S - L``).
    """
    _check_align(align)
    k_len = q_len if k_len is None else k_len
    if q_len < 0 or k_len < 0:
        raise fail("non-negative lengths", f"L={q_len}, S={k_len}", "lengths >= 0")
    offset = 0 if align == "upper_left" else k_len - q_len
    i = torch.arange(q_len, device=device).unsqueeze(1)  # (L, 1)
    j = torch.arange(k_len, device=device).unsqueeze(0)  # (1, S)
    return j <= i + offset  # (L, S)


def padding_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """Boolean key-padding mask of shape ``(B, 1, 1, S)`` from per-sequence lengths; ``True`` = real token.

    Args:
        lengths: ``(B,)`` integer tensor, the number of real (non-padding) keys of each sequence.
        max_len: ``S``, the padded length (default ``lengths.max()``).
    """
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise fail("lengths as a 1-D integer tensor (B,)", f"{lengths.dtype} {tuple(lengths.shape)}", "lengths.long()")
    if max_len is None:
        max_len = int(lengths.max().item()) if lengths.numel() else 0
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > max_len):
        raise fail(
            f"lengths in [0, {max_len}]", f"min {int(lengths.min())}, max {int(lengths.max())}", "a larger max_len"
        )
    pos = torch.arange(max_len, device=lengths.device)  # (S,)
    return (pos.unsqueeze(0) < lengths.unsqueeze(1)).view(lengths.shape[0], 1, 1, max_len)  # (B, 1, 1, S)


def _query_pos(q_len: int, k_len: int, align: str = "lower_right") -> Tensor:
    """Positions of the ``L`` queries among the ``S`` keys: ``i + S - L`` (lower-right) or ``i`` (upper-left)."""
    return torch.arange(q_len) + (k_len - q_len if align == "lower_right" else 0)


# --------------------------------------------------------------------------------------------- mask objects
class AttentionMask(abc.ABC):
    """A structured mask (``True`` = may attend). Subclasses say what they are; :meth:`materialize` gives the
    boolean tensor (the dense reference), :meth:`blocks` the block description the native engine runs.

    Masks combine with ``&`` (both allow) and ``|`` (either allows).
    """

    @abc.abstractmethod
    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        """Boolean tensor (``True`` = may attend) broadcastable to ``(B, H, L, S)``."""

    def __and__(self, other: AttentionMask) -> AttentionMask:
        if not isinstance(other, AttentionMask):
            return NotImplemented
        return AndMask((*_parts(self), *_parts(other)))

    def __or__(self, other: AttentionMask) -> AttentionMask:
        if not isinstance(other, AttentionMask):
            return NotImplemented
        own = self.parts if isinstance(self, OrMask) else (self,)
        theirs = other.parts if isinstance(other, OrMask) else (other,)
        return OrMask((*own, *theirs))

    # ---- compilation protocol (overridden by the structured masks; the defaults go through materialize)
    def _rows(self) -> tuple[int, int]:
        """``(Rb, Rh)``: how many batch rows and heads the mask distinguishes (1 = the same for all)."""
        shape = self.materialize(1, 1).shape
        return (shape[0] if len(shape) == 4 else 1), (shape[1] if len(shape) == 4 else 1)

    def _mod(self, q_len: int, k_len: int) -> ModFn:
        """The mask as an element function of broadcast index tensors (CPU), for these lengths."""
        dense = self.materialize(q_len, k_len).cpu()
        dense = dense.view(*(1,) * (4 - dense.dim()), *dense.shape)  # (Rb, Rh, L, S)
        rb, rh = dense.shape[0], dense.shape[1]
        return lambda b, h, q, kv: dense[b * (rb > 1), h * (rh > 1), q, kv]

    def _states(self, q_len: int, k_len: int) -> Tensor | None:
        """``(Rb|1, Rh|1, Nq, Nk)`` uint8 block states where known analytically (PARTIAL = maybe), else None."""
        return None

    def _bind(self, batch: int, heads: int) -> AttentionMask:
        """This mask for a call with ``batch`` rows and ``heads`` heads (a :class:`MaskMod` learns its sizes)."""
        return self

    def blocks(self, q_len: int, k_len: int) -> MaskBlocks:
        """The block description for ``L`` queries and ``S`` keys, cached per (mask, L, S) in a small LRU cache:
        equal structured masks (``SlidingWindowMask(512)`` built anew each call) share one entry; masks holding
        tensors (documents, padding, layouts, ``MaskMod``) are keyed by identity, so reuse the object (and do not
        change its tensors in place)."""
        key = (self, q_len, k_len)
        with _BLOCKS_LOCK:
            hit = _BLOCKS_CACHE.get(key)
            if hit is not None:
                _BLOCKS_CACHE.move_to_end(key)
                return hit
        blocks = _compile(self, q_len, k_len)
        with _BLOCKS_LOCK:
            _BLOCKS_CACHE[key] = blocks
            while len(_BLOCKS_CACHE) > _BLOCKS_CACHE_SIZE:
                _BLOCKS_CACHE.popitem(last=False)
        return blocks


_BLOCKS_CACHE: OrderedDict[tuple[AttentionMask, int, int], MaskBlocks] = OrderedDict()
_BLOCKS_CACHE_SIZE = 32
_BLOCKS_LOCK = threading.Lock()


def _parts(mask: AttentionMask) -> tuple[AttentionMask, ...]:
    return mask.parts if isinstance(mask, AndMask) else (mask,)


def _check_int(name: str, x: object, minimum: int, example: str) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < minimum:
        raise fail(f"{name} to be an int >= {minimum}", repr(x), example)
    return x


@dataclass(frozen=True)
class CausalMask(AttentionMask):
    """Causal structure; the dispatcher serves it with the fused kernel's ``is_causal`` where it can."""

    align: str = "upper_left"

    def __post_init__(self) -> None:
        _check_align(self.align)

    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        return causal_mask(q_len, k_len, align=self.align, device=device).view(1, 1, q_len, k_len)

    def is_upper_left(self, q_len: int, k_len: int) -> bool:
        """True when this mask equals PyTorch's ``is_causal=True`` for these lengths."""
        return self.align == "upper_left" or q_len == k_len

    def is_full(self, q_len: int, k_len: int) -> bool:
        """True when the mask lets every query see every key (a one-token decode step, lower-right)."""
        return self.align == "lower_right" and q_len == 1

    def _rows(self) -> tuple[int, int]:
        return 1, 1

    def _mod(self, q_len: int, k_len: int) -> ModFn:
        offset = 0 if self.align == "upper_left" else k_len - q_len
        return lambda b, h, q, kv: kv <= q + offset

    def _states(self, q_len: int, k_len: int) -> Tensor:
        pos = _query_pos(q_len, k_len, self.align).view(1, 1, -1)
        return _interval_states(torch.zeros_like(pos), pos, q_len, k_len)


@dataclass(frozen=True, eq=False)
class PaddingMask(AttentionMask):
    """Key padding from lengths: key ``j`` of sequence ``b`` is real when ``j < lengths[b]``."""

    lengths: Tensor

    @classmethod
    def from_bool(cls, key_mask: Tensor) -> PaddingMask:
        """From a ``(B, S)`` boolean mask whose ``True`` entries form a prefix of each row."""
        return cls(key_mask.sum(-1))

    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        lengths = self.lengths if device is None else self.lengths.to(device)
        return padding_mask(lengths, k_len)

    def _rows(self) -> tuple[int, int]:
        return max(1, self.lengths.numel()), 1

    def _mod(self, q_len: int, k_len: int) -> ModFn:
        lengths = self.lengths.cpu().long().view(-1)
        return lambda b, h, q, kv: kv < lengths[b]

    def _states(self, q_len: int, k_len: int) -> Tensor:
        lengths = self.lengths.cpu().long().view(-1, 1, 1).expand(-1, 1, q_len)  # (B, 1, L)
        return _interval_states(torch.zeros_like(lengths), lengths - 1, q_len, k_len)


@dataclass(frozen=True)
class SlidingWindowMask(AttentionMask):
    """The exact sliding window of HuggingFace (``sliding_window``), Mistral, Gemma: a query at position ``p`` may
    attend the keys at positions ``p - window + 1 ... p`` (``window`` keys, its own included), and with
    ``causal=False`` also up to ``p + look_ahead``.

    Positions are aligned lower-right, as a decoding step is: with ``L`` queries and ``S`` keys query ``i`` sits at
    position ``p = i + S - L`` (``L == S``: ``p = i``), the same rule as HuggingFace's masks for a cache.

    Args:
        window: keys back, the query's own included (``>= 1``).
        causal: ``True`` (default): no key after the query. ``False``: ``look_ahead`` keys ahead too.
        look_ahead: keys after the query it may see (only with ``causal=False``; default then ``window - 1``, the
            symmetric window ``|p - j| < window``).

    Example:
        >>> SlidingWindowMask(2).materialize(4, 4)[0, 0].int()
        tensor([[1, 0, 0, 0],
                [1, 1, 0, 0],
                [0, 1, 1, 0],
                [0, 0, 1, 1]], dtype=torch.int32)
    """

    window: int
    _: KW_ONLY
    causal: bool = True
    look_ahead: int | None = None

    def __post_init__(self) -> None:
        _check_int("window", self.window, 1, "SlidingWindowMask(512)")
        if self.look_ahead is not None:
            _check_int("look_ahead", self.look_ahead, 0, "look_ahead=0")
            if self.causal and self.look_ahead:
                raise fail("look_ahead=0 with causal=True", f"look_ahead={self.look_ahead}",
                           "SlidingWindowMask(window, causal=False, look_ahead=...)")

    @property
    def ahead(self) -> int:
        """Keys after the query's position it may see."""
        if self.causal:
            return 0
        return self.window - 1 if self.look_ahead is None else self.look_ahead

    def _bounds(self, q_len: int, k_len: int) -> tuple[Tensor, Tensor]:
        p = _query_pos(q_len, k_len)
        return p - self.window + 1, p + self.ahead

    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        """The boolean ``(1, 1, L, S)`` mask, ``True`` = may attend."""
        p = (torch.arange(q_len, device=device) + (k_len - q_len)).unsqueeze(1)  # (L, 1) query positions
        j = torch.arange(k_len, device=device).unsqueeze(0)  # (1, S) key positions
        return ((j > p - self.window) & (j <= p + self.ahead)).view(1, 1, q_len, k_len)

    def _rows(self) -> tuple[int, int]:
        return 1, 1

    def _mod(self, q_len: int, k_len: int) -> ModFn:
        offset, w, a = k_len - q_len, self.window, self.ahead
        return lambda b, h, q, kv: (kv > q + offset - w) & (kv <= q + offset + a)

    def _states(self, q_len: int, k_len: int) -> Tensor:
        lo, hi = self._bounds(q_len, k_len)
        return _interval_states(lo.view(1, 1, -1), hi.view(1, 1, -1), q_len, k_len)


@dataclass(frozen=True)
class SinkMask(AttentionMask):
    """Attention sinks (StreamingLLM, https://arxiv.org/abs/2309.17453): the first ``n`` keys are always visible.

    With ``causal=True`` (default) only those at or before the query's position (aligned lower-right like
    :class:`SlidingWindowMask`), so ``SlidingWindowMask(w) | SinkMask(4)`` is the causal sink + window pattern
    with no future key. ``causal=False``: the first ``n`` keys for every query.

    Example:
        >>> (SlidingWindowMask(2) | SinkMask(1)).materialize(4, 4)[0, 0].int()
        tensor([[1, 0, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 1, 0],
                [1, 0, 1, 1]], dtype=torch.int32)
    """

    n: int
    _: KW_ONLY
    causal: bool = True

    def __post_init__(self) -> None:
        _check_int("n", self.n, 0, "SinkMask(4)")

    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        j = torch.arange(k_len, device=device).unsqueeze(0)  # (1, S)
        allowed = (j < self.n).expand(q_len, k_len)  # (L, S)
        if self.causal:
            allowed = allowed & (j <= (torch.arange(q_len, device=device) + (k_len - q_len)).unsqueeze(1))
        return allowed.reshape(1, 1, q_len, k_len)

    def _rows(self) -> tuple[int, int]:
        return 1, 1

    def _mod(self, q_len: int, k_len: int) -> ModFn:
        offset, n, causal = k_len - q_len, self.n, self.causal
        return lambda b, h, q, kv: (kv < n) & (kv <= q + offset) if causal else (kv < n) & (q >= 0)

    def _states(self, q_len: int, k_len: int) -> Tensor:
        p = _query_pos(q_len, k_len)
        hi = torch.full_like(p, self.n - 1)
        if self.causal:
            hi = torch.minimum(hi, p)
        return _interval_states(torch.zeros_like(p).view(1, 1, -1), hi.view(1, 1, -1), q_len, k_len)


@dataclass(frozen=True, eq=False)
class DocumentMask(AttentionMask):
    """Packed sequences: a query may attend only keys of its own document.

    Args:
        doc_ids: ``(S,)`` or ``(B, S)`` integer document id of every key; a negative id marks padding (never
            attended, and a query there sees nothing).
        q_doc_ids: ``(L,)`` or ``(B, L)`` ids of the queries; default: the ids of the last ``L`` keys (queries
            aligned lower-right, as in a decoding step; ``L == S``: the same tokens).

    Combine with :class:`CausalMask` (``DocumentMask(ids) & CausalMask()``) for packed causal training.
    :meth:`from_cu_seqlens` builds it from the cumulative lengths that varlen kernels take.

    Example:
        >>> DocumentMask.from_cu_seqlens(torch.tensor([0, 2, 3])).materialize(3, 3)[0, 0].int()
        tensor([[1, 1, 0],
                [1, 1, 0],
                [0, 0, 1]], dtype=torch.int32)
    """

    doc_ids: Tensor
    q_doc_ids: Tensor | None = None

    def __post_init__(self) -> None:
        for name, ids in (("doc_ids", self.doc_ids), ("q_doc_ids", self.q_doc_ids)):
            if ids is None:
                continue
            if not isinstance(ids, Tensor) or ids.dim() not in (1, 2) or ids.dtype.is_floating_point:
                got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
                raise fail(f"{name} as an integer (S,) or (B, S) tensor", got, "DocumentMask(torch.tensor(ids))")

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor, cu_seqlens_q: Tensor | None = None,
                        total: int | None = None) -> DocumentMask:
        """From cumulative lengths ``(D + 1,)`` (``[0, len_0, len_0 + len_1, ...]``, as varlen APIs take them);
        tokens from ``cu_seqlens[-1]`` to ``total`` are padding. ``cu_seqlens_q``: other boundaries for queries."""

        def ids(cu: Tensor, n: int | None) -> Tensor:
            cu = torch.as_tensor(cu).long().view(-1)
            if cu.numel() < 1 or int(cu[0]) != 0 or bool((cu.diff() < 0).any()):
                raise fail("cu_seqlens starting at 0, non-decreasing", repr(cu.tolist()[:8]), "[0, 5, 12]")
            n = int(cu[-1]) if n is None else n
            pos = torch.arange(n)
            out = torch.searchsorted(cu[1:], pos, right=True)  # document of each token
            return torch.where(pos < cu[-1], out, -1)

        k_ids = ids(cu_seqlens, total)
        return cls(k_ids, None if cu_seqlens_q is None else ids(cu_seqlens_q, None))

    def _ids(self, q_len: int, k_len: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """``(Bd, L)`` query ids and ``(Bd, S)`` key ids."""
        kd = self.doc_ids.to(device).long()
        kd = kd.view(1, -1) if kd.dim() == 1 else kd
        if kd.shape[-1] != k_len:
            raise fail(f"doc_ids for S = {k_len} keys", f"{tuple(self.doc_ids.shape)}", "one id per key")
        if self.q_doc_ids is None:
            if q_len > k_len:
                raise fail("L <= S (queries are the last L keys)", f"L={q_len}, S={k_len}", "q_doc_ids=...")
            qd = kd[:, k_len - q_len :]
        else:
            qd = self.q_doc_ids.to(device).long()
            qd = qd.view(1, -1) if qd.dim() == 1 else qd
            if qd.shape[-1] != q_len:
                raise fail(f"q_doc_ids for L = {q_len} queries", f"{tuple(qd.shape)}", "one id per query")
        return qd, kd

    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        qd, kd = self._ids(q_len, k_len, device)
        allowed = (qd.unsqueeze(-1) == kd.unsqueeze(-2)) & (qd >= 0).unsqueeze(-1)  # (Bd, L, S)
        return allowed.unsqueeze(1)  # (Bd, 1, L, S)

    def _rows(self) -> tuple[int, int]:
        batches = [x.shape[0] for x in (self.doc_ids, self.q_doc_ids) if x is not None and x.dim() == 2]
        return max(batches, default=1), 1

    def _mod(self, q_len: int, k_len: int) -> ModFn:
        qd, kd = self._ids(q_len, k_len, "cpu")
        bq, bk = qd.shape[0] > 1, kd.shape[0] > 1
        return lambda b, h, q, kv: (qd[b * bq, q] == kd[b * bk, kv]) & (qd[b * bq, q] >= 0)

    def _states(self, q_len: int, k_len: int) -> Tensor:
        qd, kd = self._ids(q_len, k_len, "cpu")
        rows = max(qd.shape[0], kd.shape[0])
        qd, kd = qd.expand(rows, -1), kd.expand(rows, -1)
        top = int(max(int(kd.max()), int(qd.max()), 0)) + 1
        pos = torch.arange(k_len).expand(rows, -1)
        safe = kd.clamp(min=0)
        real = kd >= 0
        first = torch.full((rows, top), k_len, dtype=torch.long).scatter_reduce(
            1, safe, torch.where(real, pos, k_len), "amin")  # (rows, D): first key of each document
        last = torch.full((rows, top), -1, dtype=torch.long).scatter_reduce(
            1, safe, torch.where(real, pos, -1), "amax")  # (rows, D): its last key
        count = torch.zeros(rows, top, dtype=torch.long).scatter_add(1, safe, real.long())
        contiguous = bool(((last - first + 1 == count) | (count == 0)).all())
        qs = qd.clamp(min=0)
        lo = torch.where(qd >= 0, first.gather(1, qs), k_len)  # (rows, L)
        hi = torch.where(qd >= 0, last.gather(1, qs), -1)
        return _interval_states(lo.unsqueeze(1), hi.unsqueeze(1), q_len, k_len, exact=contiguous)


@dataclass(frozen=True)
class BlockedWindowMask(AttentionMask):
    """Blocked sliding-window structure (``True`` = may attend in :meth:`materialize`); not the exact window
    (that is :class:`SlidingWindowMask`).

    Positions are cut into buckets of ``window`` tokens. A query in bucket ``b = pos // window`` sees the keys of
    buckets ``b - look_backward`` ... ``b + look_forward``, and with ``causal`` only keys at positions ``<=`` its
    own, so it sees between ``look_backward * window + 1`` and ``(look_backward + 1) * window`` keys. Query ``i`` of
    ``L`` sits at position ``i + S - L``. This is the window of the ``local-attention`` package.

    Args:
        window: bucket size in tokens (``w``).
        look_backward: how many buckets back a query sees.
        look_forward: how many buckets ahead a query sees (use 0 with ``causal``).
        causal: also forbid keys after the query's position.

    Example:
        >>> BlockedWindowMask(2).materialize(5, 5)[0, 0].int()
        tensor([[1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0],
                [1, 1, 1, 1, 0],
                [0, 0, 1, 1, 1]], dtype=torch.int32)
    """

    window: int
    _: KW_ONLY
    look_backward: int = 1
    look_forward: int = 0
    causal: bool = True

    def __post_init__(self) -> None:
        _check_int("window", self.window, 1, "window=512")
        _check_int("look_backward", self.look_backward, 0, "look_backward=1")
        _check_int("look_forward", self.look_forward, 0, "look_forward=1")

    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        """The boolean ``(1, 1, L, S)`` mask, ``True`` = may attend (the dense reference of the structure)."""
        q_pos = torch.arange(q_len, device=device) + (k_len - q_len)  # (L,)
        k_pos = torch.arange(k_len, device=device)  # (S,)
        q_bucket = torch.div(q_pos, self.window, rounding_mode="floor").unsqueeze(1)  # (L, 1)
        k_bucket = torch.div(k_pos, self.window, rounding_mode="floor").unsqueeze(0)  # (1, S)
        allowed = (k_bucket >= q_bucket - self.look_backward) & (k_bucket <= q_bucket + self.look_forward)  # (L, S)
        if self.causal:
            allowed = allowed & (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1))
        return allowed.view(1, 1, q_len, k_len)

    def _rows(self) -> tuple[int, int]:
        return 1, 1

    def _mod(self, q_len: int, k_len: int) -> ModFn:
        offset, w, lb, lf, causal = k_len - q_len, self.window, self.look_backward, self.look_forward, self.causal

        def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            qb, kb = torch.div(q + offset, w, rounding_mode="floor"), torch.div(kv, w, rounding_mode="floor")
            allowed = (kb >= qb - lb) & (kb <= qb + lf)
            return allowed & (kv <= q + offset) if causal else allowed

        return mod

    def _states(self, q_len: int, k_len: int) -> Tensor:
        p = _query_pos(q_len, k_len)
        qb = torch.div(p, self.window, rounding_mode="floor")
        lo, hi = (qb - self.look_backward) * self.window, (qb + self.look_forward + 1) * self.window - 1
        if self.causal:
            hi = torch.minimum(hi, p)
        return _interval_states(lo.view(1, 1, -1), hi.view(1, 1, -1), q_len, k_len)


def check_layout(layout: object, block_size: object) -> None:
    """A block-sparse layout: boolean ``(Nq, Nk)`` or ``(H, Nq, Nk)``, and a positive ``block_size``."""
    if not isinstance(layout, Tensor) or layout.dtype != torch.bool or layout.dim() not in (2, 3):
        got = f"{layout.dtype} {tuple(layout.shape)}" if isinstance(layout, Tensor) else type(layout).__name__
        raise fail("layout as a boolean (Nq, Nk) or (H, Nq, Nk) tensor", got, "local_layout(n_blocks)")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise fail("block_size to be a positive int", repr(block_size), "block_size=64")


def fit_layout(layout: Tensor, q_len: int, k_len: int, block_size: int) -> Tensor:
    """The layout as ``(H|1, Nq, Nk)`` for these lengths (extra blocks are cut; too few is an error)."""
    nq, nk = -(-q_len // block_size), -(-k_len // block_size)
    if layout.shape[-2] < nq or layout.shape[-1] < nk:
        raise fail(
            f"a layout of at least ({nq}, {nk}) blocks for L={q_len}, S={k_len}, block_size={block_size}",
            f"{tuple(layout.shape)}",
            f"a layout builder with n_blocks={max(nq, nk)}",
        )
    layout = layout[..., :nq, :nk]
    return layout if layout.dim() == 3 else layout.unsqueeze(0)


@dataclass(frozen=True, eq=False)
class BlockSparseMask(AttentionMask):
    """Block-sparse structure: ``layout[(h,) i, j]`` lets query block ``i`` attend to key block ``j``.

    Args:
        layout: boolean ``(Nq, Nk)`` or per-head ``(H, Nq, Nk)``, ``True`` = may attend.
        block_size: tokens per block.
        causal: also forbid keys after the query's position (upper-left).

    Example:
        >>> from attnkit.functional import local_layout
        >>> BlockSparseMask(local_layout(2), 2).materialize(4, 4)[0, 0].int()
        tensor([[1, 1, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 1, 1],
                [1, 1, 1, 1]], dtype=torch.int32)
    """

    layout: Tensor
    block_size: int
    _: KW_ONLY
    causal: bool = False

    def __post_init__(self) -> None:
        check_layout(self.layout, self.block_size)

    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        """The boolean ``(1, 1|H, L, S)`` mask, ``True`` = may attend (the dense reference)."""
        layout = fit_layout(self.layout, q_len, k_len, self.block_size).to(device)
        bs = self.block_size
        dense = layout.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :q_len, :k_len]  # (H|1, L, S)
        if self.causal:
            dense = dense & causal_mask(q_len, k_len, device=device)
        return dense.view(1, -1, q_len, k_len)

    def _rows(self) -> tuple[int, int]:
        return 1, (self.layout.shape[0] if self.layout.dim() == 3 else 1)

    def _mod(self, q_len: int, k_len: int) -> ModFn:
        lay = fit_layout(self.layout, q_len, k_len, self.block_size).cpu()
        bs, per_head, causal = self.block_size, lay.shape[0] > 1, self.causal

        def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            qb, kb = torch.div(q, bs, rounding_mode="floor"), torch.div(kv, bs, rounding_mode="floor")
            allowed = lay[h * per_head, qb, kb]
            return allowed & (kv <= q) if causal else allowed

        return mod

    def _states(self, q_len: int, k_len: int) -> Tensor | None:
        bs = self.block_size
        lay = fit_layout(self.layout, q_len, k_len, bs).cpu()  # (Hl, nq', nk')
        nq, nk = _nblocks(q_len), _nblocks(k_len)
        if bs % BLOCK == 0:  # each 64-block lies in one layout block
            r = bs // BLOCK
            st = lay.repeat_interleave(r, 1).repeat_interleave(r, 2)[:, :nq, :nk].to(torch.uint8) * FULL
        elif BLOCK % bs == 0:  # each 64-block holds (64 / bs)^2 layout blocks
            r = BLOCK // bs
            padded = F.pad(lay, (0, nk * r - lay.shape[2], 0, nq * r - lay.shape[1]))
            grid = padded.view(-1, nq, r, nk, r)
            some, every = grid.any(4).any(2), grid.all(4).all(2)
            st = torch.where(every, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.uint8)
        else:
            return None
        st = st.unsqueeze(0)  # (1, Hl, Nq, Nk)
        if self.causal:
            st = torch.minimum(st, CausalMask()._states(q_len, k_len))
        return st


@dataclass(frozen=True)
class AndMask(AttentionMask):
    """A key may be attended only where every part allows it."""

    parts: tuple[AttentionMask, ...]

    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        out = self.parts[0].materialize(q_len, k_len, device=device)
        for part in self.parts[1:]:
            out = out & part.materialize(q_len, k_len, device=device)
        return out

    def _rows(self) -> tuple[int, int]:
        return _joint_rows(self.parts)

    def _mod(self, q_len: int, k_len: int) -> ModFn:
        return _joint_mod(self.parts, q_len, k_len, torch.logical_and)

    def _states(self, q_len: int, k_len: int) -> Tensor | None:
        return _joint_states(self.parts, q_len, k_len, torch.minimum)

    def _bind(self, batch: int, heads: int) -> AttentionMask:
        parts = tuple(p._bind(batch, heads) for p in self.parts)
        return self if all(a is b for a, b in zip(parts, self.parts, strict=True)) else AndMask(parts)


@dataclass(frozen=True)
class OrMask(AttentionMask):
    """A key may be attended where any part allows it (``mask_a | mask_b``)."""

    parts: tuple[AttentionMask, ...]

    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        out = self.parts[0].materialize(q_len, k_len, device=device)
        for part in self.parts[1:]:
            out = out | part.materialize(q_len, k_len, device=device)
        return out

    def _rows(self) -> tuple[int, int]:
        return _joint_rows(self.parts)

    def _mod(self, q_len: int, k_len: int) -> ModFn:
        return _joint_mod(self.parts, q_len, k_len, torch.logical_or)

    def _states(self, q_len: int, k_len: int) -> Tensor | None:
        return _joint_states(self.parts, q_len, k_len, torch.maximum)

    def _bind(self, batch: int, heads: int) -> AttentionMask:
        parts = tuple(p._bind(batch, heads) for p in self.parts)
        return self if all(a is b for a, b in zip(parts, self.parts, strict=True)) else OrMask(parts)


def _joint_rows(parts: Sequence[AttentionMask]) -> tuple[int, int]:
    out = []
    for dim in (0, 1):
        sizes = {p._rows()[dim] for p in parts} - {1}
        if len(sizes) > 1:
            raise fail("parts with the same batch / head count (or 1)", f"{sorted(sizes)}", "masks of one shape")
        out.append(sizes.pop() if sizes else 1)
    return out[0], out[1]


def _joint_mod(parts: Sequence[AttentionMask], q_len: int, k_len: int, op: Callable[[Tensor, Tensor], Tensor]
               ) -> ModFn:
    rows = [p._rows() for p in parts]
    mods = [p._mod(q_len, k_len) for p in parts]

    def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out: Tensor | None = None
        for (rb, rh), m in zip(rows, mods, strict=True):
            x = _as_bool(m(b if rb > 1 else torch.zeros_like(b), h if rh > 1 else torch.zeros_like(h), q, kv))
            out = x if out is None else op(out, x)
        assert out is not None
        return out

    return mod


def _joint_states(parts: Sequence[AttentionMask], q_len: int, k_len: int,
                  op: Callable[[Tensor, Tensor], Tensor]) -> Tensor | None:
    known = [st for st in (p._states(q_len, k_len) for p in parts) if st is not None]
    if not known:
        return None
    out = known[0]
    for st in known[1:]:
        out = op(out, st)
    if len(known) < len(parts):  # a part with unknown states is PARTIAL everywhere
        out = op(out, torch.full((1, 1, _nblocks(q_len), _nblocks(k_len)), PARTIAL, dtype=torch.uint8))
    return out


# --------------------------------------------------------------------------------------------- user mask functions
@dataclass(frozen=True, eq=False)
class MaskMod(AttentionMask):
    """A user mask function with FlexAttention's signature, ``fn(b, h, q_idx, kv_idx) -> bool`` (``True`` = may
    attend), written with tensor operations: it is called on broadcast index tensors (no ``torch.compile``, no
    ``vmap``), so ``q_idx >= kv_idx`` or ``doc[b, q_idx] == doc[b, kv_idx]`` work as written, and Python ``if`` on
    the indices does not (use ``torch.where``). Indices are absolute positions, ``0 <= q_idx < L``,
    ``0 <= kv_idx < S``.

    Args:
        fn: the mask function.
        B: batch rows it distinguishes; ``None``: learnt from the call (the function is probed with ``b`` of the
            call's batch size, and a result that does not vary with ``b`` is compiled once for all rows).
        H: heads it distinguishes, the same way.

    It compiles (:meth:`blocks`) to the block description by evaluating the function tile by tile (bounded
    memory); blocks that other parts of an ``&`` rule out are not evaluated.

    Example:
        >>> causal = MaskMod(lambda b, h, q, kv: q >= kv)
        >>> causal.materialize(3, 3)[0, 0].int()
        tensor([[1, 0, 0],
                [1, 1, 0],
                [1, 1, 1]], dtype=torch.int32)
    """

    fn: ModFn
    B: int | None = None
    H: int | None = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise fail("a callable fn(b, h, q_idx, kv_idx)", type(self.fn).__name__,
                       "MaskMod(lambda b, h, q, kv: q >= kv)")

    def _rows(self) -> tuple[int, int]:
        return self.B or 1, self.H or 1

    def _mod(self, q_len: int, k_len: int) -> ModFn:
        return self.fn

    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        rb, rh = self._rows()
        b = torch.arange(rb, device=device).view(-1, 1, 1, 1)
        h = torch.arange(rh, device=device).view(1, -1, 1, 1)
        q = torch.arange(q_len, device=device).view(1, 1, -1, 1)
        kv = torch.arange(k_len, device=device).view(1, 1, 1, -1)
        return _as_bool(self.fn(b, h, q, kv)).expand(rb, rh, q_len, k_len)

    def _bind(self, batch: int, heads: int) -> AttentionMask:
        if self.B is not None and self.H is not None:
            return self
        cache = self.__dict__.setdefault("_bound", {})
        if (batch, heads) not in cache:
            b = torch.arange(batch).view(-1, 1, 1, 1)
            h = torch.arange(heads).view(1, -1, 1, 1)
            zero = torch.zeros(1, 1, 1, 1, dtype=torch.long)
            got = tuple(_as_bool(self.fn(b, h, zero, zero)).shape)
            shape = (1,) * (4 - len(got)) + got
            rb = self.B if self.B is not None else (batch if shape[0] == batch else 1)
            rh = self.H if self.H is not None else (heads if shape[1] == heads else 1)
            cache[(batch, heads)] = MaskMod(self.fn, rb, rh)
        return cache[(batch, heads)]  # type: ignore[no-any-return]


_MOD_CACHE: weakref.WeakKeyDictionary[Callable[..., Any], MaskMod] = weakref.WeakKeyDictionary()


def as_mask(mask: AttentionMask | ModFn) -> AttentionMask:
    """A mask object from a mask object or a bare ``mask_mod`` callable (one :class:`MaskMod` per function, kept
    while the function lives, so its block descriptions are compiled once)."""
    if isinstance(mask, AttentionMask):
        return mask
    if not callable(mask):
        raise fail("a mask object or a mask_mod callable", type(mask).__name__, "MaskMod(fn)")
    try:
        if mask not in _MOD_CACHE:
            _MOD_CACHE[mask] = MaskMod(mask)
        return _MOD_CACHE[mask]
    except TypeError:  # not weak-referenceable
        return MaskMod(mask)


# --------------------------------------------------------------------------------------------- FlexAttention
@dataclass(frozen=True, eq=False)
class _FlexMask(MaskMod):
    """A FlexAttention ``BlockMask`` as an attnkit mask: its ``mask_mod`` for the elements, its block lists for the
    states (blocks it lists as full are full, blocks it leaves out are empty)."""

    flex_states: Tensor | None = None  # (Bf, Hf, nq_f, nk_f) uint8 at the BlockMask's block size
    flex_block: tuple[int, int] = (128, 128)
    flex_lengths: tuple[int, int] = (0, 0)

    def _bind(self, batch: int, heads: int) -> AttentionMask:
        return self

    def _states(self, q_len: int, k_len: int) -> Tensor | None:
        if self.flex_states is None or (q_len, k_len) != self.flex_lengths:
            return None
        bq, bk = self.flex_block
        if bq % BLOCK or bk % BLOCK:
            return None
        st = self.flex_states.repeat_interleave(bq // BLOCK, 2).repeat_interleave(bk // BLOCK, 3)
        return st[:, :, : _nblocks(q_len), : _nblocks(k_len)].contiguous()


def from_flex_block_mask(block_mask: Any) -> AttentionMask:
    """An attnkit mask from a ``torch.nn.attention.flex_attention.BlockMask`` (its ``mask_mod``, lengths, and
    block lists); it runs on the native engine like any mask (``L, S`` must be the BlockMask's lengths)."""
    q_len, k_len = (int(x) for x in block_mask.seq_lengths)
    bq, bk = (int(x) for x in block_mask.BLOCK_SIZE)
    kv_num, kv_idx = block_mask.kv_num_blocks, block_mask.kv_indices  # (Bf, Hf, nq), (Bf, Hf, nq, nk)
    bf, hf, nq, nk = kv_idx.shape
    st = torch.zeros(bf, hf, nq, nk + 1, dtype=torch.uint8)

    def mark(num: Tensor | None, idx: Tensor | None, value: int) -> None:
        if num is None or idx is None:
            return
        n = idx.shape[-1]
        valid = torch.arange(n).view(1, 1, 1, -1) < num.cpu().unsqueeze(-1)  # (Bf, Hf, nq, n)
        target = torch.where(valid, idx.cpu().long(), nk)  # invalid entries to the spare column
        st.scatter_(3, target, torch.full(target.shape, value, dtype=torch.uint8))

    mark(kv_num, kv_idx, PARTIAL)
    mark(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, FULL)
    st = st[..., :nk]
    return _FlexMask(block_mask.mask_mod, bf, hf, st, (bq, bk), (q_len, k_len))


def to_flex_block_mask(mask: AttentionMask | ModFn, B: int, H: int, q_len: int, k_len: int, *,
                       block_size: int = 128, device: torch.device | str = "cpu") -> Any:
    """A ``torch.nn.attention.flex_attention.BlockMask`` for ``mask`` (attnkit's block states, pooled to
    ``block_size``, and the mask as its ``mask_mod``), to hand it to FlexAttention where Flex is the faster
    kernel. ``block_size`` must be a multiple of 64."""
    from torch.nn.attention.flex_attention import BlockMask

    if block_size % BLOCK:
        raise fail("block_size a multiple of 64", repr(block_size), "block_size=128")
    m = as_mask(mask)._bind(B, H)
    blocks = m.blocks(q_len, k_len)
    st = blocks.states()  # (Rb, Rh, Nq, Nk)
    r = block_size // BLOCK
    nq, nk = -(-q_len // block_size), -(-k_len // block_size)
    grid = F.pad(st, (0, nk * r - st.shape[3], 0, nq * r - st.shape[2])).view(*st.shape[:2], nq, r, nk, r)
    valid = F.pad(torch.ones(st.shape[2:], dtype=torch.bool), (0, nk * r - st.shape[3], 0, nq * r - st.shape[2]))
    valid = valid.view(nq, r, nk, r)
    full = ((grid == FULL) | ~valid).all(5).all(3)
    some = (grid > 0).any(5).any(3)
    partial = some & ~full

    def lists(sel: Tensor) -> tuple[Tensor, Tensor]:
        num = sel.sum(-1).to(torch.int32)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num.to(device), order.to(device)

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    mod = m._mod(q_len, k_len)
    rb, rh = m._rows()

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return mod(b if rb > 1 else torch.zeros_like(b), h if rh > 1 else torch.zeros_like(h), q, kv)

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(q_len, k_len))


_M = TypeVar("_M", bound=AttentionMask)


def split_with_padding(
    structure: AttentionMask | None, kind: type[_M], what: str
) -> tuple[_M | None, PaddingMask | None, str]:
    """Split ``structure`` into one ``kind`` mask and at most one :class:`PaddingMask` (``kind & padding``).

    Returns ``(kind part, padding part or None, "")``, or ``(None, None, reason)`` when the structure is not of that
    shape; a structured kernel's ``supports`` function reports the reason (``what`` names the structure in it).
    """
    parts = _parts(structure) if structure is not None else ()
    mains = [p for p in parts if isinstance(p, kind)]
    pads = [p for p in parts if isinstance(p, PaddingMask)]
    if not mains:
        return None, None, f"no {what} structure (pass a {kind.__name__})"
    if len(mains) > 1 or len(pads) > 1 or len(mains) + len(pads) != len(parts):
        return None, None, f"the structure is more than one {kind.__name__} and at most one PaddingMask"
    return mains[0], (pads[0] if pads else None), ""


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """Combine boolean and/or float masks into one with the same meaning.

    Booleans are and-ed; if any mask is float, the result is float (``-inf`` where a boolean forbids).
    """
    present = [m for m in masks if m is not None]
    if not present:
        return None
    floats = [m for m in present if m.dtype != torch.bool]
    bools = [m for m in present if m.dtype == torch.bool]
    allowed = None
    for m in bools:
        allowed = m if allowed is None else allowed & m
    if not floats:
        return allowed
    total = floats[0]
    for m in floats[1:]:
        total = total + m
    if allowed is not None:
        total = total.masked_fill(~allowed, float("-inf"))
    return total


def mask_to_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask as an additive float bias: booleans become ``0`` / ``-inf``, floats are cast."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)
