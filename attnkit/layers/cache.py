"""Key/value caches for incremental (token-by-token) decoding.

Pope et al. 2022, "Efficiently Scaling Transformer Inference", https://arxiv.org/abs/2211.05102 (the KV cache and
why decoding is bound by reading it); Beltagy et al. 2020, "Longformer: The Long-Document Transformer",
https://arxiv.org/abs/2004.05150 (sliding-window attention, whose cache a ring buffer bounds).

A cache keeps the projected (and, with rotary positions, already rotated) keys and values of every token seen so
far, so a decoding step projects only the new token and attends over the stored keys. ``cache.length`` is the
position of the next token: :class:`~attnkit.layers.MultiHeadAttention` uses it as the offset of the query
positions, and causal alignment for a query block shorter than the keys is lower-right (query ``i`` of a block of
``L`` sees the keys at positions ``<= length_before + i``).

* :class:`KVCache` keeps everything in one preallocated buffer that doubles when full (amortised O(1) appends,
  and the stored keys are a view: no copy per step).
* :class:`RingKVCache` keeps only the last ``window`` tokens, for sliding-window attention: memory stays
  ``O(window)`` however long the decode runs. Its slots are out of order after the ring wraps; the cache returns
  each slot's position, and the module masks by position.
* :class:`CrossKVCache` keeps the projected keys/values of a fixed cross-attention memory (an encoder's output):
  :class:`~attnkit.layers.MultiHeadAttention` fills it at the first call and reuses it afterwards, so each decoding
  step projects only its queries (the role of the cross-attention half of an encoder-decoder cache).

Every cache has ``reorder(index)``: keep batch rows ``index`` in that order (beam search's reordering step, also
for repeating rows or dropping finished sentences). It equals a cache rebuilt from the reordered inputs, and reuses
the buffers in place when the batch size stays the same.

Example:
    >>> import torch
    >>> cache = KVCache()
    >>> k = v = torch.randn(2, 4, 3, 8)                       # (B, Hkv, L_new, E)
    >>> keys, values, positions = cache.update(k, v)
    >>> keys.shape, positions.tolist(), cache.length
    (torch.Size([2, 4, 3, 8]), [0, 1, 2], 3)
    >>> keys, values, positions = cache.update(k[:, :, :1], v[:, :, :1])
    >>> keys.shape, cache.length
    (torch.Size([2, 4, 4, 8]), 4)
    >>> cache.reorder(torch.tensor([1, 1]))                   # beam search: both rows continue from row 1
    >>> torch.equal(cache.keys[0], cache.keys[1]), cache.length
    (True, 4)
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._errors import fail

__all__ = ["CrossKVCache", "KVCache", "RingKVCache"]


def _check_index(index: object, batch: int | None) -> Tensor:
    """A 1-D integer tensor of batch rows, each in ``[0, batch)`` (any rows while nothing is cached)."""
    if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        got = f"{index.dtype} {tuple(index.shape)}" if isinstance(index, Tensor) else type(index).__name__
        raise fail("index: a 1-D integer tensor of batch rows", got, "torch.tensor([1, 0]) (beam search's parent rows)")
    if batch is not None and index.numel():
        low, high = (int(x) for x in torch.aminmax(index))
        if low < 0 or high >= batch:
            raise fail(f"batch rows in [0, {batch}) (the batch this cache holds)", f"rows in [{low}, {high}]",
                       "the parent rows of the current batch")
    return index


class KVCache:
    """A growing key/value cache: one preallocated buffer per tensor, doubled when full.

    Args:
        capacity: tokens to preallocate at the first :meth:`update` (grows by doubling beyond it).

    Shape:
        ``update(key (B, Hkv, L_new, E), value (B, Hkv, L_new, Ev))`` -> keys ``(B, Hkv, S, E)``, values
        ``(B, Hkv, S, Ev)`` and positions ``(S,)`` of every cached token, ``S = length`` after the update.
    """

    window: int | None = None
    #: whether the cached keys sit at positions ``0 .. S-1`` in order (lets the module use a structured mask)
    contiguous = True
    #: whether the keys the last :meth:`update` returned sit at consecutive positions in order (no empty slot), so
    #: the queries are their last ``L`` and a structured mask (lower-right) describes them
    ordered = True

    def __init__(self, *, capacity: int = 256) -> None:
        if capacity < 1:
            raise fail("capacity >= 1", repr(capacity), "capacity=256")
        self.capacity = capacity
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self.length = 0

    def reset(self) -> None:
        """Forget every token (keeps nothing allocated)."""
        self._k = self._v = None
        self.length = 0

    def _check(self, key: Tensor, value: Tensor) -> None:
        if key.dim() != 4 or value.dim() != 4 or key.shape[:3] != value.shape[:3]:
            raise fail("key (B, Hkv, L, E) and value (B, Hkv, L, Ev)", f"{tuple(key.shape)} and {tuple(value.shape)}",
                       "the projected, head-split keys and values")
        if self._k is not None and self._v is not None:
            want_k = (self._k.shape[0], self._k.shape[1], self._k.shape[3])
            got_k = (key.shape[0], key.shape[1], key.shape[3])
            if want_k != got_k or value.shape[3] != self._v.shape[3] or key.dtype != self._k.dtype:
                raise fail(f"(B, Hkv, E) = {want_k} in {self._k.dtype}, as cached so far",
                           f"{got_k} in {key.dtype}", "cache.reset() before decoding another batch")

    def positions(self, n: int, *, device: torch.device | str | None = None) -> Tensor:
        """Positions ``(n,)`` of the next ``n`` tokens."""
        return torch.arange(self.length, self.length + n, device=device)

    def _grow(self, need: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if self._k is None or self._v is None:
            cap = max(self.capacity, need)
            b, h, _, e = key.shape
            self._k = key.new_empty(b, h, cap, e)
            self._v = value.new_empty(b, h, cap, value.shape[3])
            return self._k, self._v
        cap = self._k.shape[2]
        if need <= cap:
            return self._k, self._v
        while cap < need:
            cap *= 2
        k = self._k.new_empty(*self._k.shape[:2], cap, self._k.shape[3])
        v = self._v.new_empty(*self._v.shape[:2], cap, self._v.shape[3])
        k[:, :, : self.length] = self._k[:, :, : self.length]
        v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v
        return k, v

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Append the new keys/values and return all cached keys, values and their positions."""
        self._check(key, value)
        n = key.shape[2]
        start, stop = self.length, self.length + n
        k, v = self._grow(stop, key, value)
        k[:, :, start:stop] = key
        v[:, :, start:stop] = value
        self.length = stop
        positions = torch.arange(stop, device=key.device)  # (S,)
        return k[:, :, :stop], v[:, :, :stop], positions

    def _slots_in_use(self) -> int:
        return self.length

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (in that order, repeats allowed) of every cached token.

        Beam search calls it after each step with the parent row of every surviving hypothesis. The result equals
        a cache filled with the reordered keys/values; with ``len(index)`` equal to the cached batch the buffers are
        reused in place (only the used slots are copied, the capacity is kept), otherwise new buffers of the same
        capacity hold the new batch.

        Shape:
            index ``(B_new,)`` integers in ``[0, B)``; afterwards the cache holds ``B_new`` rows.
        """
        if self._k is None or self._v is None:
            _check_index(index, None)  # nothing cached yet: nothing to reorder
            return
        index = _check_index(index, self._k.shape[0]).to(self._k.device)
        n = self._slots_in_use()
        k_rows, v_rows = (t[:, :, :n].index_select(0, index) for t in (self._k, self._v))  # gather the used slots
        if index.numel() != self._k.shape[0]:  # a new batch size: new buffers (B_new, Hkv, capacity, E|Ev)
            self._k, self._v = (t.new_empty(index.numel(), *t.shape[1:]) for t in (self._k, self._v))
        self._k[:, :, :n], self._v[:, :, :n] = k_rows, v_rows  # in place when the batch size stays

    @property
    def keys(self) -> Tensor | None:
        """The cached keys ``(B, Hkv, S, E)`` (a view), or ``None`` before the first update."""
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def values(self) -> Tensor | None:
        """The cached values ``(B, Hkv, S, Ev)`` (a view), or ``None`` before the first update."""
        return None if self._v is None else self._v[:, :, : self.length]

    def __repr__(self) -> str:
        cap = 0 if self._k is None else self._k.shape[2]
        return f"{type(self).__name__}(length={self.length}, allocated={cap})"


class RingKVCache(KVCache):
    """A ring buffer of the last ``window`` tokens' keys and values, for causal sliding-window attention.

    A token at position ``p`` may attend to positions ``p - window + 1 .. p``; once that token is stored, position
    ``p - window`` is never needed again, so its slot ``(p - window) % window = p % window`` is reused. Memory is
    ``O(window)`` for any decode length.

    A one-token step returns the whole ring (slot order, with each slot's position; ``-1`` marks a slot never
    written; :attr:`ordered` is then ``False``). A block of ``L > 1`` new tokens (a prefill) returns the ring's tokens
    in position order followed by the block — consecutive positions, so a module describes the window with a
    :class:`~attnkit.functional.SlidingWindowMask` and runs it on the native block engine — and then keeps the
    block's last ``window`` tokens.

    Args:
        window: tokens kept (the attention window, counting the query's own token).

    Shape:
        ``update(key (B, Hkv, L_new, E), value (B, Hkv, L_new, Ev))`` -> keys ``(B, Hkv, S, E)``, values
        ``(B, Hkv, S, Ev)``, positions ``(S,)`` with ``S = window`` (one token) or ``min(length, window) + L_new``
        (a block).
    """

    contiguous = False
    ordered = False

    def __init__(self, window: int) -> None:
        if not isinstance(window, int) or window < 1:
            raise fail("window >= 1", repr(window), "window=256")
        super().__init__(capacity=window)
        self.window = window
        self._pos: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self._pos = None
        self.ordered = False

    def _slots_in_use(self) -> int:
        return self.capacity  # the whole ring (slots never written hold zeros at position -1)

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._check(key, value)
        w, n = self.capacity, key.shape[2]
        if self._k is None or self._v is None or self._pos is None:
            b, h, _, e = key.shape
            self._k = key.new_zeros(b, h, w, e)
            self._v = value.new_zeros(b, h, w, value.shape[3])
            self._pos = torch.full((w,), -1, dtype=torch.long, device=key.device)
        ring_k, ring_v, ring_pos = self._k, self._v, self._pos
        new_pos = torch.arange(self.length, self.length + n, device=key.device)  # (L_new,)
        if n == 1:
            slot = self.length % w
            ring_k[:, :, slot] = key[:, :, 0]
            ring_v[:, :, slot] = value[:, :, 0]
            ring_pos[slot] = self.length
            self.length += 1
            self.ordered = False
            return ring_k, ring_v, ring_pos.clone()
        held = min(self.length, w)  # tokens in the ring: positions length - held .. length - 1
        old_pos = torch.arange(self.length - held, self.length, device=key.device)  # (held,)
        slots = old_pos % w  # their slots, oldest first
        keys = torch.cat((ring_k[:, :, slots], key), dim=2)  # (B, Hkv, held + L_new, E), positions in order
        values = torch.cat((ring_v[:, :, slots], value), dim=2)  # (B, Hkv, held + L_new, Ev)
        positions = torch.cat((old_pos, new_pos))  # (held + L_new,): consecutive
        self.ordered = True
        keep = min(n, w)
        slots = new_pos[-keep:] % w  # (keep,)
        ring_k[:, :, slots] = key[:, :, -keep:]
        ring_v[:, :, slots] = value[:, :, -keep:]
        ring_pos[slots] = new_pos[-keep:]
        self.length += n
        return keys, values, positions

    @property
    def keys(self) -> Tensor | None:
        """The ring's keys ``(B, Hkv, window, E)`` in slot order (see :attr:`slot_positions`)."""
        return self._k

    @property
    def values(self) -> Tensor | None:
        return self._v

    @property
    def slot_positions(self) -> Tensor | None:
        """Position of the token in each slot ``(window,)``; ``-1`` for an empty slot."""
        return self._pos


class CrossKVCache:
    """The projected keys and values of a fixed cross-attention memory, computed once and reused.

    Pass it as ``cache=`` to a cross-attention :class:`~attnkit.layers.MultiHeadAttention` call: the first call
    projects ``key``/``value`` (the encoder memory) and stores them here; later calls reuse them and project only the
    queries, so ``key``/``value`` may then be ``None`` (if given, they must have the batch and length the cache was
    filled with; they are not projected again). Every call equals the uncached call with the same memory. The memory
    must stay the same while the cache lives: :meth:`reset` before a new one.

    Shape:
        :attr:`keys` ``(B, Hkv, S, E)`` and :attr:`values` ``(B, Hkv, S, Ev)`` once filled.

    Example:
        >>> import torch
        >>> from attnkit.layers import MultiHeadAttention
        >>> cross = MultiHeadAttention(16, 4, kdim=12, vdim=12)
        >>> memory = torch.randn(2, 5, 12)                        # (B, S, kdim)
        >>> cache = CrossKVCache()
        >>> first = cross(torch.randn(2, 1, 16), memory, cache=cache)   # projects the memory once
        >>> later = cross(torch.randn(2, 1, 16), cache=cache)           # queries only
        >>> cache.keys.shape, later.shape
        (torch.Size([2, 4, 5, 4]), torch.Size([2, 1, 16]))
    """

    def __init__(self) -> None:
        self._k: Tensor | None = None
        self._v: Tensor | None = None

    @property
    def filled(self) -> bool:
        """Whether the memory's keys and values are stored."""
        return self._k is not None

    @property
    def keys(self) -> Tensor | None:
        """The memory's keys ``(B, Hkv, S, E)``, or ``None`` before the first call."""
        return self._k

    @property
    def values(self) -> Tensor | None:
        """The memory's values ``(B, Hkv, S, Ev)``, or ``None`` before the first call."""
        return self._v

    def fill(self, key: Tensor, value: Tensor) -> None:
        """Store the projected, head-split keys ``(B, Hkv, S, E)`` and values ``(B, Hkv, S, Ev)``."""
        if key.dim() != 4 or value.dim() != 4 or key.shape[:3] != value.shape[:3]:
            raise fail("key (B, Hkv, S, E) and value (B, Hkv, S, Ev)", f"{tuple(key.shape)} and {tuple(value.shape)}",
                       "the projected, head-split keys and values of the memory")
        self._k, self._v = key, value

    def check_memory(self, batch: int, length: int | None) -> None:
        """Raise unless the stored memory has ``batch`` rows and ``length`` tokens (``None``: any length)."""
        if self._k is None:
            return
        b, s = self._k.shape[0], self._k.shape[2]
        if b != batch or (length is not None and length != s):
            got = f"({batch}, {'?' if length is None else length})"
            raise fail(f"the memory this cache was filled with: (B, S) = ({b}, {s})", got,
                       "cache.reset() (or a new cache) for a new batch or memory")

    def reset(self) -> None:
        """Forget the memory."""
        self._k = self._v = None

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (in that order, repeats allowed) of the memory's keys and values.

        The stored tensors are exactly the memory's size, so the gathered copies replace them (one pass, no spare
        capacity to keep). Equals a cache filled from ``memory[index]``.

        Shape:
            index ``(B_new,)`` integers in ``[0, B)``.
        """
        if self._k is None or self._v is None:
            _check_index(index, None)
            return
        index = _check_index(index, self._k.shape[0]).to(self._k.device)
        self._k, self._v = self._k.index_select(0, index), self._v.index_select(0, index)

    def __repr__(self) -> str:
        shape = None if self._k is None else tuple(self._k.shape)
        return f"{type(self).__name__}(keys={shape})"
