"""One place for the shape, dtype and device checks of every kernel.

Every check raises ``ValueError("expected ..., got ...; try ...")`` so the message names the fix.
Nothing here broadcasts silently: a mask either has one of the documented shapes or the call fails.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from attnkit._errors import fail  # re-exported: ``_validate.fail`` keeps working

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise fail(f"`{name}` to be a torch.Tensor", type(x).__name__, f"torch.as_tensor({name})")
    return x


def int_mask_as_bool(mask: Tensor, name: str) -> Tensor:
    """The one rule for integer masks (``attn_mask`` and ``key_mask`` alike): ``0`` = masked, ``1`` = may attend,
    as the tutorial's ``mask == 0 -> masked`` reads a 0/1 mask; returns the boolean mask. Any other value raises (a
    mask of lengths, token ids or 0/255 pixels is a mistake, not a mask), so every kernel and module reads an
    integer mask the same way. Booleans pass unchanged; other dtypes are the caller's to check."""
    if mask.dtype == torch.bool or mask.dtype.is_floating_point or mask.dtype.is_complex:
        return mask
    if mask.numel() and mask.device.type != "meta":
        low, high = (int(x) for x in torch.aminmax(mask))
        if low < 0 or high > 1:
            raise fail(f"an integer {name} of 0 and 1 only (0 = masked, 1 = may attend)",
                       f"{mask.dtype} values in [{low}, {high}]",
                       f"({name} != 0) for 'non-zero = may attend', or a boolean {name}")
    return mask != 0


def check_key_mask(key_mask: Any, batch: int, k_len: int) -> Tensor:
    """The one rule for a key mask ``(B, S)``, used by every kernel and module that takes ``key_mask``.

    Boolean: ``True`` = a real key that may be attended. Integer 0/1: read the same way (``0`` = masked, as in the
    tutorial's ``mask == 0``; other values raise, see :func:`int_mask_as_bool`). Float raises: a float mask is
    *added* to the scores, which is what ``attn_mask`` is for. Returns the boolean mask.
    """
    ok = isinstance(key_mask, Tensor) and tuple(key_mask.shape) == (batch, k_len)
    if not ok or key_mask.dtype.is_floating_point or key_mask.dtype.is_complex:
        got = f"{key_mask.dtype} {tuple(key_mask.shape)}" if isinstance(key_mask, Tensor) else type(key_mask).__name__
        raise fail(f"key_mask of shape (B, S) = {(batch, k_len)}: a boolean key_mask (or integer 0/1), True = real key",
                   got, "padding_mask(lengths, S).view(B, S) or key_mask.bool(); ~key_padding_mask for a mask in "
                   "nn.MultiheadAttention's meaning; an additive float mask goes in attn_mask")
    return int_mask_as_bool(key_mask, "key_mask")


def check_float(name: str, x: Tensor) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise fail(
            f"`{name}` of a floating dtype (float16, bfloat16, float32, float64)",
            str(x.dtype),
            f"{name}.float()",
        )


def check_qkv(query: Any, key: Any, value: Any, *, allow_3d: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Validate ``query (B, H, L, E)``, ``key (B, Hkv, S, E)``, ``value (B, Hkv, S, Ev)``.

    With ``allow_3d`` the tutorial layout ``(B, L, E)`` is accepted for all three.
    """
    q = check_tensor("query", query)
    k = check_tensor("key", key)
    v = check_tensor("value", value)
    dims = (3, 4) if allow_3d else (4,)
    if q.dim() not in dims:
        shape = "(B, H, L, E) or (B, L, E)" if allow_3d else "(B, H, L, E)"
        raise fail(f"query of shape {shape}", f"{tuple(q.shape)}", "query.view(B, H, L, E)")
    if k.dim() != q.dim() or v.dim() != q.dim():
        raise fail(
            f"query, key and value with the same number of dims ({q.dim()})",
            f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}",
            "giving all three the (B, H, L, E) layout",
        )
    for name, x in (("query", q), ("key", k), ("value", v)):
        check_float(name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise fail(
            "query, key and value of one dtype",
            f"{q.dtype}, {k.dtype}, {v.dtype}",
            "casting them with .to(query.dtype)",
        )
    if not (q.device == k.device == v.device):
        raise fail(
            "query, key and value on one device",
            f"{q.device}, {k.device}, {v.device}",
            "moving them with .to(query.device)",
        )
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
        raise fail(
            "one batch size B for query, key and value",
            f"{q.shape[0]}, {k.shape[0]}, {v.shape[0]}",
            "repeating or slicing the batch so they match",
        )
    if q.shape[-1] != k.shape[-1]:
        raise fail(
            "query and key with the same head dim E",
            f"query E={q.shape[-1]}, key E={k.shape[-1]}",
            "projecting both to the same size",
        )
    if k.shape[-2] != v.shape[-2]:
        raise fail(
            "key and value with the same length S",
            f"key S={k.shape[-2]}, value S={v.shape[-2]}",
            "passing the same positions for both",
        )
    if q.dim() == 4:
        h, hk, hv = q.shape[1], k.shape[1], v.shape[1]
        if hk != hv:
            raise fail("key and value with the same heads Hkv", f"{hk} and {hv}", "using one Hkv for both")
        if hk == 0 or h % hk != 0:
            raise fail(
                "query heads H divisible by key/value heads Hkv (grouped-query attention)",
                f"H={h}, Hkv={hk}",
                "a Hkv that divides H (Hkv=1 is multi-query attention)",
            )
    return q, k, v


def check_dropout(dropout_p: Any) -> float:
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise fail("dropout_p in [0, 1)", repr(dropout_p), "dropout_p=0.1")
    return float(dropout_p)


def check_scale(scale: Any, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise fail("scale to be a float or None", type(scale).__name__, "scale=None (1/sqrt(E))")
    return float(scale)


def check_softcap(softcap: Any) -> float | None:
    """``None`` (no capping) or a positive finite float: scores become ``softcap * tanh(scores / softcap)``."""
    if softcap is None:
        return None
    if (not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not math.isfinite(softcap)
            or softcap <= 0):
        raise fail("softcap to be a positive float or None", repr(softcap), "softcap=50.0 (Gemma 2's attention cap)")
    return float(softcap)


def check_mask_tensor(mask: Tensor, batch: int, heads: int, q_len: int, k_len: int, *, ndim_in: int) -> Tensor:
    """Check an explicit mask tensor and return it as a 4-D view that broadcasts to ``(B, H, L, S)``.

    Accepted shapes: ``(S,)``, ``(L, S)``, ``(B, 1|H, 1|L, S)``; with the tutorial's 3-D inputs also ``(B, L, S)``.
    Integer 0/1 masks are read as boolean (``0`` = masked, as in the tutorial's ``mask == 0 -> masked``; other values
    raise, :func:`int_mask_as_bool`). Float masks are added to the scores (the caller casts them to the query dtype).
    """
    if mask.dtype.is_complex:
        raise fail("a boolean or floating attn_mask (or integer 0/1, 0 = masked)", str(mask.dtype),
                   "mask.bool() (True = may attend)")
    mask = int_mask_as_bool(mask, "attn_mask")
    shape = tuple(mask.shape)
    if mask.dim() == 1:
        mask4 = mask.view(1, 1, 1, -1)
    elif mask.dim() == 2:
        mask4 = mask.view(1, 1, *shape)
    elif mask.dim() == 3:
        if ndim_in != 3:
            raise fail(
                "an attn_mask of shape (S,), (L, S) or (B, H|1, L|1, S) for 4-D inputs",
                f"a 3-D mask {shape}",
                "mask[:, None] to make a (B, 1, L, S) mask (3-D masks are only read as (B, L, S) with 3-D inputs)",
            )
        mask4 = mask.unsqueeze(1)
    elif mask.dim() == 4:
        mask4 = mask
    else:
        raise fail("an attn_mask with 1 to 4 dims", f"{mask.dim()} dims {shape}", "mask.view(B, 1, L, S)")
    want = (batch, heads, q_len, k_len)
    names = ("B", "H", "L", "S")
    for i, (got, exp) in enumerate(zip(mask4.shape, want, strict=True)):
        if got != exp and got != 1:
            raise fail(
                f"an attn_mask that broadcasts to (B, H, L, S) = {want} (dim {names[i]} = {exp} or 1)",
                f"{shape}",
                "a key-padding mask of shape (B, 1, 1, S) or attnkit.functional.padding_mask(lengths, S)",
            )
    if mask4.shape[-1] != k_len:
        raise fail(f"the attn_mask's last dim to be S = {k_len}", f"{shape}", "one entry per key position")
    return mask4
