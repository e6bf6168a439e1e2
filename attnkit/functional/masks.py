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
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from ._validate import fail

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


class AttentionMask(abc.ABC):
    """A structured mask. Subclasses say what they are; :meth:`materialize` gives the boolean tensor."""

    @abc.abstractmethod
    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        """Boolean tensor (``True`` = may attend) broadcastable to ``(B, H, L, S)``."""

    def __and__(self, other: AttentionMask) -> AttentionMask:
        if not isinstance(other, AttentionMask):
            return NotImplemented
        return AndMask((*_parts(self), *_parts(other)))


def _parts(mask: AttentionMask) -> tuple[AttentionMask, ...]:
    return mask.parts if isinstance(mask, AndMask) else (mask,)


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


@dataclass(frozen=True)
class AndMask(AttentionMask):
    """A key may be attended only where every part allows it."""

    parts: tuple[AttentionMask, ...]

    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        out = self.parts[0].materialize(q_len, k_len, device=device)
        for part in self.parts[1:]:
            out = out & part.materialize(q_len, k_len, device=device)
        return out


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
