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
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.functional._validate import fail

__all__ = ["KVCache", "RingKVCache"]


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
    written). A block of ``L > 1`` new tokens returns the ring followed by the block, so every query of the block
    finds its window, and then keeps the block's last ``window`` tokens.

    Args:
        window: tokens kept (the attention window, counting the query's own token).

    Shape:
        ``update(key (B, Hkv, L_new, E), value (B, Hkv, L_new, Ev))`` -> keys ``(B, Hkv, S, E)``, values
        ``(B, Hkv, S, Ev)``, positions ``(S,)`` with ``S = window`` (one token) or ``window + L_new`` (a block).
    """

    contiguous = False

    def __init__(self, window: int) -> None:
        if not isinstance(window, int) or window < 1:
            raise fail("window >= 1", repr(window), "window=256")
        super().__init__(capacity=window)
        self.window = window
        self._pos: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self._pos = None

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
            return ring_k, ring_v, ring_pos.clone()
        keys = torch.cat((ring_k, key), dim=2)  # (B, Hkv, w + L_new, E)
        values = torch.cat((ring_v, value), dim=2)  # (B, Hkv, w + L_new, Ev)
        positions = torch.cat((ring_pos, new_pos))  # (w + L_new,)
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
