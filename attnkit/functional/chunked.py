"""Memory-efficient exact attention: online softmax over chunks, returning the log-sum-exp; merging partials.

Paper: "Self-attention Does Not Need O(n^2) Memory", Rabe and Staats, 2021. https://arxiv.org/abs/2112.05682
(the recurrence is FlashAttention's: Dao et al., 2022, https://arxiv.org/abs/2205.14135).

For one query row, attention over keys split into chunks ``c = 1..C`` is recovered exactly from each chunk's partial
output ``o_c`` (softmax over that chunk only) and log-sum-exp ``l_c = log sum_j exp(s_j)``::

    lse = log(sum_c exp(l_c))                       # the row's full normaliser
    out = sum_c exp(l_c - lse) * o_c                # the exact output

:func:`merge_attention` does this merge; :func:`chunked_attention` runs it over query and key chunks so that no more
than ``chunk_size x chunk_size`` scores exist at a time, in the forward **and** in the backward pass (a custom
backward recomputes each chunk's probabilities from the saved output and log-sum-exp). A dense ``(L, S)`` mask is
read one chunk at a time; ``is_causal`` skips the chunks above the diagonal.

Example:
    >>> import torch
    >>> from attnkit.functional import chunked_attention, merge_attention, scaled_dot_product_attention
    >>> q, k, v = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    >>> out, lse = chunked_attention(q, k, v, is_causal=True, chunk_size=64, return_lse=True)
    >>> out.shape, lse.shape                                            # (B, H, L, Ev), (B, H, L)
    (torch.Size([1, 2, 300, 16]), torch.Size([1, 2, 300]))
    >>> torch.allclose(out, scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
    True
    >>> o1, l1 = chunked_attention(q, k[:, :, :100], v[:, :, :100], return_lse=True)   # two halves of the keys
    >>> o2, l2 = chunked_attention(q, k[:, :, 100:], v[:, :, 100:], return_lse=True)
    >>> merged, _ = merge_attention([o1, o2], [l1, l2])
    >>> torch.allclose(merged, scaled_dot_product_attention(q, k, v), atol=1e-5)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate as V
from ._pieces import same_head_dim
from ._reference import expand_kv_heads
from .dispatch import AttentionCall, Backend, register_backend
from .masks import AttentionMask

__all__ = [
    "block_backward",
    "block_backward_math",
    "block_forward",
    "block_forward_math",
    "chunked_attention",
    "merge_attention",
]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def merge_attention(outputs: list[Tensor], lses: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge partial attention results over disjoint key sets into the exact result.

    Args:
        outputs: partial outputs ``(..., L, Ev)``, each the softmax-weighted values over its own keys.
        lses: their log-sum-exps ``(..., L)``; ``-inf`` marks a row that saw no key (its output is ignored).

    Returns:
        ``(out, lse)``: ``out = sum_i exp(lse_i - lse) * out_i`` with ``lse = logsumexp_i lse_i``. Rows that saw no
        key in any part give zeros and ``lse = -inf`` (never NaN).

    Example:
        >>> import torch
        >>> o, l = merge_attention([torch.ones(1, 3, 2), torch.zeros(1, 3, 2)], [torch.zeros(1, 3), torch.zeros(1, 3)])
        >>> o[0, 0].tolist(), round(float(l[0, 0]), 4)                        # equal weights, log 2
        ([0.5, 0.5], 0.6931)
    """
    if len(outputs) != len(lses) or not outputs:
        raise V.fail("as many outputs as lses (at least one)", f"{len(outputs)} and {len(lses)}", "pairs (out, lse)")
    for o, lse in zip(outputs, lses, strict=True):
        if tuple(o.shape[:-1]) != tuple(lse.shape):
            raise V.fail("lse of shape out.shape[:-1]", f"out {tuple(o.shape)}, lse {tuple(lse.shape)}",
                         "the lse returned with each output")
    lse = torch.logsumexp(torch.stack(lses), dim=0)  # (..., L)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # rows that saw nothing: weights exp(-inf)
    out = sum(o * torch.exp(part - safe).unsqueeze(-1).to(o.dtype) for o, part in zip(outputs, lses, strict=True))
    return out, lse  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- one block
def _chunk_mask(
    mask: Tensor | None, is_causal: bool, q0: int, q1: int, k0: int, k1: int, dtype: torch.dtype,
    device: torch.device | None = None,
) -> tuple[Tensor | None, bool, bool]:
    """The additive mask of one (query chunk, key chunk) block: ``(mask or None, is_causal, skip)``."""
    part = None
    if mask is not None:
        part = mask[..., q0:q1, k0:k1] if mask.shape[-2] > 1 else mask[..., k0:k1]  # (B|1, H|1, l|1, c)
        if part.dtype == torch.bool:
            part = torch.zeros(part.shape, dtype=dtype, device=part.device).masked_fill_(~part, float("-inf"))
        else:
            part = part.to(dtype)
    if not is_causal:
        return part, False, False
    if k0 > q1 - 1:  # every key after every query
        return None, False, True
    if k1 - 1 <= q0:  # every key at or before every query
        return part, False, False
    if part is None and q0 == k0 and q1 - q0 == k1 - k0:  # an aligned diagonal block: the kernel's is_causal
        return None, True, False
    i = torch.arange(q0, q1, device=device).view(-1, 1)
    j = torch.arange(k0, k1, device=device).view(1, -1)
    causal = torch.zeros(q1 - q0, k1 - k0, dtype=dtype, device=device).masked_fill_(j > i, float("-inf"))  # (l, c)
    return (causal if part is None else part + causal), False, False


def _block_scores(
    q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool, scale: float, softcap: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(scores, tanh)`` of one block: the scaled (and capped) scores with the mask applied, and with ``softcap``
    the ``tanh(raw / softcap)`` the backward pass needs (``d capped / d raw = 1 - tanh^2``)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, l, c)
    t = None
    if softcap is not None:
        t = torch.tanh(scores / softcap)  # (B, H, l, c)
        scores = softcap * t
    if mask is not None:
        scores = scores + mask
    if is_causal:
        i = torch.arange(q.shape[-2], device=q.device).view(-1, 1)
        j = torch.arange(k.shape[-2], device=q.device).view(1, -1)
        scores = scores.masked_fill(j > i, float("-inf"))
    return scores, t


# --------------------------------------------------------------------------------------------- one block
# The internal API of one block of online-softmax attention, shared with ring attention (attnkit.distributed.ring):
# block_forward gives (out, lse) of queries against one block of keys; partial results merge with their lse; and
# block_backward takes the *merged* out and lse, so every block's gradients are exact. *_math is the same on any
# device, in readable PyTorch.
def block_forward_math(q, k, v, mask, is_causal, scale, softcap=None):  # type: ignore[no-untyped-def]
    """The readable math of :func:`block_forward` (any device): ``out = softmax(s) v``, ``lse = logsumexp(s)``;
    with ``softcap`` the scores are ``softcap * tanh(s / softcap)`` (Gemma 2)."""
    scores, _ = _block_scores(q, k, mask, is_causal, scale, softcap)  # (B, H, l, c)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, l); -inf where a row sees nothing
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe.unsqueeze(-1))  # (B, H, l, c): zero where masked
    out = torch.matmul(probs, v)  # (B, H, l, Ev)
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def block_backward_math(grad, q, k, v, out, lse, mask, is_causal, scale, softcap=None):  # type: ignore[no-untyped-def]
    """The readable math of :func:`block_backward`: gradients from the merged ``out`` and ``lse``."""
    scores, t = _block_scores(q, k, mask, is_causal, scale, softcap)  # (B, H, l, c)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).to(scores.dtype)
    probs = torch.exp(scores - lse.unsqueeze(-1))  # (B, H, l, c): the global softmax restricted to this block
    d_v = torch.matmul(probs.transpose(-2, -1), grad)  # (B, H, c, Ev)
    d_probs = torch.matmul(grad, v.transpose(-2, -1))  # (B, H, l, c)
    delta = (grad * out).sum(-1, keepdim=True)  # (B, H, l, 1): rowsum(dO * O)
    d_scores = probs * (d_probs - delta)  # (B, H, l, c)
    if t is not None:
        d_scores = d_scores * (1 - t * t)  # through the cap: d(softcap * tanh(s / softcap)) / ds
    d_q = torch.matmul(d_scores, k) * scale  # (B, H, l, E)
    d_k = torch.matmul(d_scores.transpose(-2, -1), q) * scale  # (B, H, c, E)
    return d_q, d_k, d_v


def block_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float,  # type: ignore[no-untyped-def]
                  softcap: float | None = None):
    """Flash on one block: ``(out, lse)`` with ``lse = -inf`` (and zero output) for rows that see no key.

    Off the CPU (the flash op here is PyTorch's CPU kernel), and with ``softcap`` (which the flash kernel does not
    do), the same result comes from :func:`block_forward_math`.
    """
    if q.device.type != "cpu" or softcap is not None:
        return block_forward_math(q, k, v, mask, is_causal, scale, softcap)
    out, lse = _flash(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
    if mask is not None:
        dead = torch.isneginf(mask).all(-1)  # (B|1, H|1, l|1)
        if bool(dead.any()):
            dead = dead.expand(lse.shape)
            lse = lse.masked_fill(dead, float("-inf"))
            out = out.masked_fill(dead.unsqueeze(-1), 0.0)
    return out, lse


def block_backward(grad, q, k, v, out, lse, mask, is_causal, scale, softcap=None):  # type: ignore[no-untyped-def]
    """Flash backward on one block with the *merged* output and lse; rows that saw no key get zero gradients."""
    if q.device.type != "cpu" or softcap is not None:
        return block_backward_math(grad, q, k, v, out, lse, mask, is_causal, scale, softcap)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)  # exp(s - inf) = 0
    return _flash_backward(grad, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale)


def _bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


class _ChunkedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, chunk, scale, softcap):  # type: ignore[no-untyped-def, override]
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        b, h, q_len, _ = q.shape
        out = q.new_zeros(b, h, q_len, v.shape[-1])  # (B, H, L, Ev)
        lse = torch.full((b, h, q_len), float("-inf"), dtype=lse_dtype, device=q.device)  # (B, H, L)
        for q0, q1 in _bounds(q_len, chunk):
            parts, lses = [], []
            for k0, k1 in _bounds(k.shape[2], chunk):
                m, causal, skip = _chunk_mask(mask, is_causal, q0, q1, k0, k1, q.dtype, q.device)
                if skip:
                    continue
                o_c, l_c = block_forward(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], m, causal, scale, softcap)
                parts.append(o_c)
                lses.append(l_c)
                if len(parts) == 2:  # keep one running partial: memory O(chunk) per query chunk
                    o_m, l_m = merge_attention(parts, lses)
                    parts, lses = [o_m], [l_m]
            if parts:
                out[:, :, q0:q1] = parts[0]
                lse[:, :, q0:q1] = lses[0]
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.is_causal, ctx.chunk, ctx.scale, ctx.softcap = is_causal, chunk, scale, softcap
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_lse):  # type: ignore[no-untyped-def, override]
        q, k, v, out, lse, mask = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for q0, q1 in _bounds(q.shape[2], ctx.chunk):
            g_c, o_c, l_c = grad_out[:, :, q0:q1], out[:, :, q0:q1].contiguous(), lse[:, :, q0:q1].contiguous()
            for k0, k1 in _bounds(k.shape[2], ctx.chunk):
                m, causal, skip = _chunk_mask(mask, ctx.is_causal, q0, q1, k0, k1, q.dtype, q.device)
                if skip:
                    continue
                g_q, g_k, g_v = block_backward(
                    g_c, q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], o_c, l_c, m, causal, ctx.scale, ctx.softcap
                )
                dq[:, :, q0:q1] += g_q
                dk[:, :, k0:k1] += g_k
                dv[:, :, k0:k1] += g_v
        return dq, dk, dv, None, None, None, None, None


def chunked_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    chunk_size: int = 1024,
    scale: float | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention computed ``chunk_size x chunk_size`` scores at a time, forward and backward.

    Equivalent to :func:`~attnkit.functional.scaled_dot_product_attention` with the same arguments; memory is
    O(N·chunk) instead of O(N²) (the mask tensor, if you pass one, is read one chunk at a time).

    Args:
        query: ``(B, H, L, E)``.
        key: ``(B, Hkv, S, E)``, ``Hkv`` dividing ``H``.
        value: ``(B, Hkv, S, Ev)``.
        attn_mask: boolean (``True`` = may attend) or float (added to the scores), broadcastable to
            ``(B, H, L, S)`` with shapes ``(S,)``, ``(L, S)`` or ``(B, 1|H, 1|L, S)``.
        is_causal: upper-left causal masking (query ``i`` sees keys ``j <= i``); chunks above the diagonal are
            skipped.
        chunk_size: query and key chunk length.
        scale: score scale, ``1/sqrt(E)`` when ``None``.
        softcap: logit soft-capping, ``softcap * tanh(scores / softcap)`` before the mask (Gemma 2); the blocks
            then run the readable PyTorch math instead of PyTorch's flash kernel, forward and backward.
        return_lse: also return the log-sum-exp ``(B, H, L)`` of every row (``-inf`` where no key is visible).

    Returns:
        ``out (B, H, L, Ev)``, or ``(out, lse)``. Fully masked rows give zeros (and zero gradients).

    Shape:
        query ``(B, H, L, E)``, key ``(B, Hkv, S, E)``, value ``(B, Hkv, S, Ev)`` -> ``(B, H, L, Ev)``.
    """
    q, k, v = V.check_qkv(query, key, value, allow_3d=False)
    if isinstance(attn_mask, AttentionMask):
        raise V.fail("a mask tensor", type(attn_mask).__name__, "mask.materialize(L, S), or the structured kernels")
    b, h, q_len, e = q.shape
    k_len, ev = k.shape[2], v.shape[-1]
    mask = None
    if attn_mask is not None:
        mask = V.check_mask_tensor(V.check_tensor("attn_mask", attn_mask), b, h, q_len, k_len, ndim_in=4)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise V.fail("chunk_size to be a positive int", repr(chunk_size), "chunk_size=1024")
    scale_f = V.check_scale(scale, e)
    cap = V.check_softcap(softcap)
    if q_len == 0 or k_len == 0:
        out = q.new_zeros(b, h, q_len, ev) + 0.0 * (q.sum() + k.sum() + v.sum())
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = torch.full((b, h, q_len), float("-inf"), dtype=lse_dtype, device=q.device)
        return (out, lse) if return_lse else out
    k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)  # (B, H, S, E|Ev)
    q, k, v = same_head_dim(q, k, v)  # the flash kernel wants E == Ev
    out, lse = _ChunkedFn.apply(q, k, v, mask, bool(is_causal), chunk_size, scale_f, cap)
    out = out[..., :ev]  # (B, H, L, Ev)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------- dispatcher
def _chunked_supports(call: AttentionCall) -> list[str]:
    reasons = []
    if call.dropout_p > 0:
        reasons.append("dropout on the weights")
    if call.need_weights:
        reasons.append("it does not return the attention weights")
    return reasons


def _chunked_fn(call: AttentionCall) -> tuple[Tensor, None]:
    mask, causal = call.dense_mask()
    out = chunked_attention(call.query, call.key, call.value, mask, is_causal=causal, scale=call.scale,
                            softcap=call.softcap)
    return out, None  # type: ignore[return-value]


# Only when asked for (backend="chunked"): on CPU PyTorch's fused SDPA is already a flash kernel with O(N) memory
# and is faster, so "auto" keeps choosing it (measured by `python -m attnkit.bench long`).
register_backend(
    Backend("chunked", _chunked_fn, False, _chunked_supports, "chunked online-softmax attention, O(N*chunk) memory",
            softcap=True),
)
