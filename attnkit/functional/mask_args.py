"""One normaliser for the mask arguments of every kernel and module: ``(attn_mask, key_mask, is_causal)``.

Every entry point that takes masks (``scaled_dot_product_attention`` through the dispatcher's ``make_call``, and the
modules :class:`~attnkit.layers.MultiHeadAttention`, :class:`~attnkit.layers.SoftAttention`, the Transformer
blocks) calls :func:`normalize_masks`, so one rule and one error message holds everywhere:

* ``attn_mask`` is ``None``; a tensor — boolean (``True`` = may attend), integer 0/1 (``0`` = masked, the tutorial's
  ``mask == 0``; any other value raises) or float (added to the scores, cast to the query dtype) — of shape
  ``(S,)``, ``(L, S)``, ``(B, 1|H, 1|L, S)`` or, for the ``(B, L, E)`` layout, ``(B, L, S)``; a mask object
  (:class:`~attnkit.functional.SlidingWindowMask`, ``DocumentMask``, ``a & b``, ``a | b``, ...); or a ``mask_mod``
  callable with FlexAttention's signature ``(b, h, q_idx, kv_idx) -> bool`` (it becomes a
  :class:`~attnkit.functional.MaskMod`). Anything else raises.
* ``key_mask`` ``(B, S)``: :func:`~attnkit.functional._validate.check_key_mask` (boolean or integer 0/1,
  ``True`` = a real key). Right padding next to a mask object stays a structure (``& PaddingMask(lengths)``), so a
  structured kernel still serves the call; otherwise it joins the tensor mask as ``(B, 1, 1, S)``.
* ``is_causal``: PyTorch's flag, upper-left (query ``i`` sees keys ``j <= i``). With ``causal_align="lower_right"``
  (a block of queries after a KV cache) it becomes the flag where the two agree (``L == S``), nothing for one
  query, and a :class:`~attnkit.functional.CausalMask` ``("lower_right")`` structure otherwise.

The result, :class:`MaskArgs`, is the canonical form: a 4-D tensor view (or ``None``), a structure (or ``None``) and
the causal flag.

Example:
    >>> import torch
    >>> from attnkit.functional import SlidingWindowMask
    >>> args = normalize_masks(torch.tril(torch.ones(4, 4, dtype=torch.long)), batch=2, heads=3, q_len=4, k_len=4,
    ...                        dtype=torch.float32, device="cpu")
    >>> args.mask.shape, args.mask.dtype, args.structure, args.is_causal
    (torch.Size([1, 1, 4, 4]), torch.bool, None, False)
    >>> args = normalize_masks(lambda b, h, q, kv: q >= kv, torch.ones(2, 4, dtype=torch.bool), batch=2, heads=3,
    ...                        q_len=4, k_len=4, dtype=torch.float32, device="cpu")
    >>> type(args.structure).__name__, args.mask
    ('AndMask', None)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit._errors import fail

from . import _validate as V
from .masks import AttentionMask, CausalMask, PaddingMask, as_mask, combine_masks

__all__ = ["MaskArgs", "MaskLike", "normalize_masks"]

#: What ``attn_mask=`` takes everywhere: a tensor, a mask object, a ``mask_mod`` callable or ``None``.
MaskLike = Tensor | AttentionMask | Callable[..., Any] | None

_ALIGNS = ("upper_left", "lower_right")


@dataclass(frozen=True)
class MaskArgs:
    """The canonical form of ``(attn_mask, key_mask, is_causal)``.

    Attributes:
        mask: ``None`` or a 4-D tensor that broadcasts to ``(B, H, L, S)`` (a view where the input allowed):
            boolean ``True`` = may attend, or float in the query dtype (added to the scores).
        structure: ``None`` or a mask object (``&`` of every part; a ``mask_mod`` bound to the call's ``B, H``).
        is_causal: PyTorch's upper-left ``is_causal`` flag.
    """

    mask: Tensor | None
    structure: AttentionMask | None
    is_causal: bool

    def attn_mask(self, q_len: int, k_len: int, *, device: torch.device | str | None = None
                  ) -> Tensor | AttentionMask | None:
        """One ``attn_mask`` argument for a kernel (with :attr:`is_causal` beside it): the structure alone when
        there is no tensor (a structured kernel may serve it without materialising ``L x S``), else the tensor,
        with the structure materialised and combined into it."""
        if self.structure is None:
            return self.mask
        if self.mask is None:
            return self.structure
        return combine_masks(self.mask, self.structure.materialize(q_len, k_len, device=device))

    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor | None:
        """Everything, the causal flag included, as one tensor (boolean or float) that broadcasts to
        ``(B, H, L, S)``: the dense reference of the masks. ``None`` when nothing is masked."""
        parts: list[Tensor | None] = [self.mask]
        if self.structure is not None:
            parts.append(self.structure.materialize(q_len, k_len, device=device))
        if self.is_causal:
            parts.append(CausalMask().materialize(q_len, k_len, device=device))
        return combine_masks(*parts)


def _and(structure: AttentionMask | None, other: AttentionMask) -> AttentionMask:
    return other if structure is None else structure & other


def normalize_masks(
    attn_mask: Any = None,
    key_mask: Any = None,
    is_causal: Any = False,
    *,
    batch: int,
    heads: int,
    q_len: int,
    k_len: int,
    dtype: torch.dtype,
    device: torch.device | str,
    ndim_in: int = 4,
    structures: Sequence[AttentionMask] = (),
    causal_align: str = "upper_left",
) -> MaskArgs:
    """Validate ``(attn_mask, key_mask, is_causal)`` for a call with ``B, H, L, S`` into :class:`MaskArgs`.

    Args:
        attn_mask: ``None``, a tensor (boolean / integer 0/1 / float), a mask object or a ``mask_mod`` callable
            (see the module docstring for the shapes and the rule).
        key_mask: ``None`` or ``(B, S)`` boolean / integer 0/1, ``True`` = a real key.
        is_causal: the causal flag.
        batch, heads, q_len, k_len: the call's ``B, H, L, S``.
        dtype: the query dtype (float masks are cast to it).
        device: the query device (a tensor mask must be on it).
        ndim_in: ``3`` when the caller's inputs are ``(B, L, E)``: a 3-D tensor mask is then ``(B, L, S)``.
        structures: mask objects the caller adds itself (a module's window or block layout), ``&``-ed with a mask
            object given as ``attn_mask``.
        causal_align: ``"upper_left"`` (PyTorch's ``is_causal``, kept as the flag) or ``"lower_right"`` (queries
            are the last ``L`` of ``S`` positions, as after a KV cache).

    Returns:
        :class:`MaskArgs`. Raises ``ValueError("expected ..., got ...; try ...")`` on any bad mask.
    """
    if causal_align not in _ALIGNS:
        raise fail(f"causal_align in {list(_ALIGNS)}", repr(causal_align), 'causal_align="lower_right"')
    device = torch.device(device)
    mask: Tensor | None = None
    structure: AttentionMask | None = None
    for s in structures:
        structure = _and(structure, s)
    if isinstance(attn_mask, Tensor):
        mask = V.check_mask_tensor(attn_mask, batch, heads, q_len, k_len, ndim_in=ndim_in)
        if mask.device != device:
            raise fail("attn_mask on the query's device", f"{mask.device} vs {device}", "attn_mask.to(query.device)")
        if mask.dtype != torch.bool:
            mask = mask.to(dtype)
    elif isinstance(attn_mask, AttentionMask) or callable(attn_mask):
        structure = _and(structure, as_mask(attn_mask)._bind(batch, heads))  # a bare mask_mod becomes a MaskMod
    elif attn_mask is not None:
        raise fail("`attn_mask` to be a torch.Tensor (boolean: True = may attend; integer 0/1; float: added), a mask "
                   "object or a mask_mod(b, h, q_idx, kv_idx) callable", type(attn_mask).__name__,
                   "torch.as_tensor(attn_mask)")
    if key_mask is not None:
        real = V.check_key_mask(key_mask, batch, k_len)  # (B, S) boolean
        if real.device != device:
            raise fail("key_mask on the query's device", f"{real.device} vs {device}", "key_mask.to(query.device)")
        lengths = real.sum(-1) if structure is not None else None  # (B,): only needed to keep a structure
        if lengths is not None and torch.equal(real, torch.arange(k_len, device=device) < lengths.view(batch, 1)):
            structure = _and(structure, PaddingMask(lengths))  # right padding stays a structure the kernels read
        else:
            mask = combine_masks(mask, real.view(batch, 1, 1, k_len))
    causal = bool(is_causal)
    if causal and causal_align == "lower_right" and q_len != k_len:
        causal = False
        if q_len > 1:  # one query after a cache sees every key: nothing to mask
            structure = _and(structure, CausalMask("lower_right"))
    return MaskArgs(mask, structure, causal)
