"""Scaled dot-product attention with pluggable backends and exact weights from any of them.

Paper: Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762

.. math::

    \\mathrm{Attention}(Q, K, V) = \\mathrm{softmax}\\!\\left(\\frac{Q K^\\top}{\\sqrt{d_k}} + M\\right) V

Why ``1/sqrt(d_k)``: for query and key entries of unit variance, ``q . k`` has variance ``d_k``; without the scale the
softmax saturates as ``d_k`` grows and its gradient vanishes.

Backends (``backend=``):

* ``"reference"``: the readable float math of :mod:`attnkit.functional._reference`; returns weights.
* ``"math"``: the same math done in place with one ``L x S`` buffer; the fast path for exact weights.
* ``"sdpa"``: PyTorch's fused :func:`torch.nn.functional.scaled_dot_product_attention` (flash kernel on CPU).
* ``"auto"`` (default): the first registered backend that can serve the inputs, in priority order; with
  ``return_weights=True``, the first that returns weights itself.

The dispatcher itself (:class:`AttentionCall`, :class:`Backend`, the priority list, :func:`which_backend`) lives in
:mod:`attnkit.functional.dispatch`; this module registers the three dense backends on it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._memory import fresh_buffer as _fresh_buffer
from ._reference import attention_reference, expand_kv_heads
from .dispatch import (
    AttentionCall,
    Backend,
    BackendChoice,
    WeightsPath,
    available_backends,
    choose_backend,
    get_backend,
    make_call,
    plain_call,
    register_backend,
    register_weights,
    weights_of,
    which_backend,
)
from .masks import AttentionMask, causal_mask

__all__ = [
    "AttentionCall",
    "Backend",
    "BackendChoice",
    "attention_weights",
    "available_backends",
    "register_backend",
    "dense_attention",
    "release_buffers",
    "scaled_dot_product_attention",
    "which_backend",
]


# --------------------------------------------------------------------------------------------- helpers
def _alive_rows(mask: Tensor) -> Tensor:
    """``(B|1, H|1, L|1, 1)`` boolean: rows that have at least one key to attend to."""
    if mask.dtype == torch.bool:
        return mask.any(dim=-1, keepdim=True)
    return ~torch.isneginf(mask).all(dim=-1, keepdim=True)


def _revive(mask: Tensor, alive: Tensor) -> Tensor:
    """Open dead rows so the kernel stays finite; the caller zeroes their output."""
    if mask.dtype == torch.bool:
        return mask | ~alive
    return mask.masked_fill(~alive, 0.0)


def _dropout(weights: Tensor, p: float) -> Tensor:
    return F.dropout(weights, p=p, training=True) if p > 0 else weights


# --------------------------------------------------------------------------------------------- backends
def _reference_fn(call: AttentionCall) -> tuple[Tensor, Tensor]:
    mask, causal = call.dense_mask()
    out, weights = attention_reference(call.query, call.key, call.value, mask, is_causal=causal, scale=call.scale,
                                       softcap=call.softcap)
    if call.dropout_p > 0:
        out = torch.matmul(_dropout(weights, call.dropout_p), expand_kv_heads(call.value, call.heads))
    return out, weights


def _grouped(x: Tensor, kv_heads: int) -> Tensor:
    """``(B, H, L, X) -> (B, Hkv, G*L, X)``: queries of one key/value head side by side (no K/V copies)."""
    b, h, n, d = x.shape
    return x.reshape(b, kv_heads, (h // kv_heads) * n, d)


_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _WeightsBuffer:
    """Keeps the storage of the last weights the math backend returned, to reuse it once nobody holds it.

    Reuse happens only when the storage has no other owner (no tensor, view, autograd node or array refers to
    it), so a caller can never see its weights overwritten. One CPU buffer of at most ``max_bytes`` is kept;
    :func:`release_buffers` frees it.
    """

    max_bytes = 64 << 20

    def __init__(self) -> None:
        self._storage: torch.UntypedStorage | None = None
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if device.type != "cpu" or _use_count is None or nbytes > self.max_bytes:
            return _fresh_buffer(shape, dtype, device)
        with self._lock:
            storage, self._storage = self._storage, None
        if storage is not None and storage.nbytes() >= nbytes and _use_count(storage._cdata) == 1:
            out = torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape)  # type: ignore[call-overload]
        else:
            out = _fresh_buffer(shape, dtype, device)
        with self._lock:
            self._storage = out.untyped_storage()
        return out

    def release(self) -> None:
        with self._lock:
            self._storage = None


_WEIGHTS_BUFFER = _WeightsBuffer()


def release_buffers() -> None:
    """Free the weights buffer the ``math`` backend keeps for reuse (at most 64 MiB; only after its weights died)."""
    _WEIGHTS_BUFFER.release()


def _math_fn(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """The reference's math with one ``L x S`` buffer, computed in place when no gradient is needed.

    Without autograd the scores are written by one ``baddbmm`` (scale folded in) into one buffer that becomes the
    returned weights: mask, softmax and the dead-row fill all happen in that buffer, so a call touches one
    ``L x S`` tensor instead of the three or four of the plain formula. The buffer is the memory of the previous
    call's weights when nothing refers to them any more (:class:`_WeightsBuffer`), else fresh huge-page memory.
    """
    q, k, v = call.query, call.key, call.value
    b, h, q_len, e = q.shape
    hk, k_len, ev = call.kv_heads, call.k_len, v.shape[-1]
    mask, causal = call.dense_mask()
    if causal:
        mask = causal_mask(q_len, k_len, device=q.device)
    alive = None
    if mask is not None:
        alive = _alive_rows(mask)
        if bool(alive.all()):
            alive = None
        else:
            mask = _revive(mask, alive)
    if call.needs_grad:
        qg = _grouped(q * call.scale, hk)  # (B, Hkv, G*L, E)
        scores = torch.matmul(qg, k.transpose(-2, -1)).view(b, h, q_len, k_len)  # (B, H, L, S)
        if call.softcap is not None:
            scores = call.softcap * torch.tanh(scores / call.softcap)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores, dim=-1)  # (B, H, L, S)
        if alive is not None:
            weights = weights.masked_fill(~alive, 0.0)
    else:
        weights = _WEIGHTS_BUFFER.take((b, h, q_len, k_len), q.dtype, q.device)  # (B, H, L, S)
        groups = (h // hk) * q_len
        torch.baddbmm(
            weights.view(b * hk, groups, k_len),
            q.reshape(b * hk, groups, e),  # (B*Hkv, G*L, E)
            k.reshape(b * hk, k_len, e).transpose(1, 2),  # (B*Hkv, E, S)
            beta=0.0,
            alpha=call.scale,
            out=weights.view(b * hk, groups, k_len),
        )
        if call.softcap is not None:
            weights.div_(call.softcap).tanh_().mul_(call.softcap)
        if mask is not None:
            if mask.dtype == torch.bool:
                weights.masked_fill_(mask.logical_not(), float("-inf"))
            else:
                weights.add_(mask)
        torch.softmax(weights, dim=-1, out=weights)
        if alive is not None:
            weights.masked_fill_(~alive, 0.0)
    probs = _dropout(weights, call.dropout_p)
    out = torch.matmul(_grouped(probs, hk), v).view(b, h, q_len, ev)  # (B, H, L, Ev)
    return out, weights


_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _sdpa_fn(call: AttentionCall) -> tuple[Tensor, None]:
    q, k, v = call.query, call.key, call.value
    mask, causal = call.dense_mask()
    alive = None
    if mask is not None:
        alive = _alive_rows(mask)
        if bool(alive.all()):
            alive = None
        else:
            mask = _revive(mask, alive)
    kwargs: dict[str, Any] = {}
    if call.kv_heads != call.heads:
        if _HAS_GQA:
            kwargs["enable_gqa"] = True
        else:  # pragma: no cover - torch < 2.5
            k, v = expand_kv_heads(k, call.heads), expand_kv_heads(v, call.heads)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=call.dropout_p, is_causal=causal, scale=call.scale, **kwargs
    )
    if alive is not None:
        out = out * alive
    return out, None


def dense_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, *, scale: float) -> Tensor:
    """PyTorch's fused kernel on an already validated 4-D call (the ``sdpa`` backend, no dispatch): for kernels that
    fall back to dense masked attention. ``mask``: boolean ``True`` = may attend, or float added; broadcastable to
    ``(B, H, L, S)``. Fully masked rows give zeros."""
    call = AttentionCall(query, key, value, mask, None, False, 0.0, scale, False)
    return _sdpa_fn(call)[0]


register_backend(Backend("sdpa", _sdpa_fn, False, description="PyTorch fused scaled_dot_product_attention"))
register_backend(Backend("math", _math_fn, True, description="in-place float math that returns exact weights",
                         softcap=True))
register_backend(Backend("reference", _reference_fn, True, description="readable reference math (test oracle)",
                         softcap=True))


def _empty_keys(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """No keys at all: every row is fully masked, so output and weights are zeros (gradients too)."""
    q, v = call.query, call.value
    out = q.new_zeros(*q.shape[:3], v.shape[-1]) + 0.0 * q.sum() + 0.0 * v.sum()
    return out, q.new_zeros(*q.shape[:3], 0)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | AttentionMask | Callable[..., Tensor] | None = None,
    *,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
    softcap: float | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention ``softmax(Q K^T * scale + M) V``.

    Equivalent to::

        scores = query @ key.transpose(-2, -1) * scale        # (B, H, L, S)
        scores = scores.masked_fill(~bool_mask, -inf)          # or scores + float_mask
        weights = scores.softmax(-1)                           # fully masked rows -> 0
        out = weights @ value                                  # (B, H, L, Ev)

    Args:
        query: ``(B, H, L, E)``, or ``(B, L, E)`` (the classic single-head layout).
        key: ``(B, Hkv, S, E)`` with ``Hkv`` dividing ``H`` (grouped-query attention), or ``(B, S, E)``.
        value: ``(B, Hkv, S, Ev)``, or ``(B, S, Ev)``.
        attn_mask: boolean (``True`` = may attend; integer masks are read the same way, so the tutorial's
            ``mask == 0 -> masked`` works), float (added to the scores), a mask object
            (:class:`~attnkit.functional.CausalMask`, :class:`~attnkit.functional.PaddingMask`,
            :class:`~attnkit.functional.SlidingWindowMask`, :class:`~attnkit.functional.DocumentMask`,
            :class:`~attnkit.functional.SinkMask`, ... and their ``&`` / ``|``), or a FlexAttention-style
            ``mask_mod(b, h, q_idx, kv_idx) -> bool`` callable. Mask objects other than causal / padding run on
            the native block engine on the CPU (``which_backend`` says ``native_mask``), else materialised.
            Tensor shapes: ``(S,)``, ``(L, S)``, ``(B, 1|H, 1|L, S)``; with 3-D inputs also ``(B, L, S)``.
        is_causal: upper-left causal masking (query ``i`` sees keys ``j <= i``), combined with ``attn_mask``.
        dropout_p: dropout on the weights (always applied when > 0, as in PyTorch's functional SDPA).
        scale: score scale, ``1/sqrt(E)`` when ``None``.
        return_weights: also return the exact softmax weights ``(B, H, L, S)`` (before dropout), from any backend.
        softcap: logit soft-capping (Gemma 2): the scores become ``softcap * tanh(scores / softcap)`` before the
            mask. Served by the ``native_mask`` (CPU), ``chunked``, ``math`` and ``reference`` backends (PyTorch's
            fused kernel and the window, block-sparse and decode kernels do not cap scores).
        backend: ``"auto"`` or a backend name of :func:`available_backends` (``"sdpa"``, ``"math"``,
            ``"reference"``, ``"native_band"``, ...); the old names ``"local"``, ``"decode"`` and ``"block_sparse"``
            are deprecated aliases (:data:`~attnkit.functional.dispatch.ALIASES`).

    Returns:
        ``out`` of shape ``(B, H, L, Ev)`` (``(B, L, Ev)`` for 3-D inputs), or ``(out, weights)``.
        Rows with no key to attend to give zeros in ``out``, ``weights`` and gradients, never NaN.

    Example:
        >>> import torch
        >>> from attnkit.functional import scaled_dot_product_attention
        >>> q = k = v = torch.randn(2, 4, 5, 8)              # (B, H, L, E)
        >>> out, w = scaled_dot_product_attention(q, k, v, is_causal=True, return_weights=True)
        >>> out.shape, w.shape
        (torch.Size([2, 4, 5, 8]), torch.Size([2, 4, 5, 5]))
        >>> Q = K = V = torch.randn(2, 5, 8)                 # the tutorial's (B, L, E)
        >>> mask = torch.ones(2, 5, 5, dtype=torch.long)     # 0 = masked, as in the tutorial
        >>> scaled_dot_product_attention(Q, K, V, mask).shape
        torch.Size([2, 5, 8])
    """
    kept = plain_call(query, key, value, attn_mask, is_causal, dropout_p, scale, return_weights, softcap, backend)
    if kept is not None:  # validated and routed before: a decode step or a model's causal / unmasked layer
        return kept[2].fn(kept[0])[0]
    call, three_d = make_call(query, key, value, attn_mask, is_causal, dropout_p, scale, return_weights, softcap)
    weights: Tensor | None
    if call.k_len == 0:
        out, weights = _empty_keys(call)
    else:
        choice = choose_backend(call, backend)
        out, w = get_backend(choice.name).fn(call)
        weights = w if w is not None or not call.need_weights else weights_of(call, choice.weights_from)
    if three_d:
        out = out.squeeze(1)
        weights = weights.squeeze(1) if weights is not None else None
    return (out, weights) if return_weights else out  # type: ignore[return-value]


def _math_weights(call: AttentionCall) -> Tensor:
    """Exact weights for a call whose output came from a kernel that hides them (one extra ``Q K^T``)."""
    no_values = torch.zeros(*call.value.shape[:-1], 0, dtype=call.value.dtype, device=call.value.device)
    _, weights = _math_fn(
        AttentionCall(call.query, call.key, no_values, call.mask, call.structure, call.is_causal, 0.0, call.scale, True,
                      call.softcap)
    )
    return weights


register_weights(WeightsPath("math", _math_weights))


def attention_weights(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | AttentionMask | Callable[..., Tensor] | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Only the softmax weights ``(B, H, L, S)`` of :func:`scaled_dot_product_attention`, exact, never NaN.

    ``attn_mask``: boolean (``True`` = may attend; integer masks read the same way), float (added to the scores),
    or a mask object; same shapes as :func:`scaled_dot_product_attention`. Fully masked rows give zeros.
    ``softcap``: the scores become ``softcap * tanh(scores / softcap)`` first (Gemma 2's logit soft-capping).

    Example:
        >>> import torch
        >>> from attnkit.functional import attention_weights, CausalMask
        >>> q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)   # (B, H, L, E), (B, Hkv, S, E)
        >>> w = attention_weights(q, k, CausalMask("lower_right"))
        >>> w.shape, bool(w[0, 0, 0, 4] == 0)                        # query 0 may not see key 4
        (torch.Size([1, 2, 3, 5]), True)
    """
    value = torch.zeros(*key.shape[:-1], 0, dtype=key.dtype, device=key.device) if isinstance(key, Tensor) else key
    call, three_d = make_call(query, key, value, attn_mask, is_causal, 0.0, scale, True, softcap)
    weights = _empty_keys(call)[1] if call.k_len == 0 else weights_of(call)
    return weights.squeeze(1) if three_d else weights
