"""A decode kernel: attention of a few new queries over a long KV cache, at the speed of reading the cache.

Pope et al. 2022, "Efficiently Scaling Transformer Inference", https://arxiv.org/abs/2211.05102 (why a decoding step
is bound by memory bandwidth: every cached key and value is read once per step for very little arithmetic).

A decoding step has ``L`` = 1 (or a few) queries and ``S`` in the thousands of keys. The work is two matrix-vector
products per head (``K q`` and ``V^T p``); the time is the time to read ``K`` and ``V``. This kernel does exactly
that, in two passes with float32 accumulation:

1. scores ``s = K (q * scale)`` for all keys (``(B, Hkv, G*L, S)``: the ``G = H / Hkv`` query heads that share a
   key/value head are stacked, so grouped-query attention reads each cached head once);
2. the masked softmax of the scores (small: ``H * L * S`` numbers);
3. ``out = p V``.

For a float32 cache both products run on the cache views directly. For a half-precision cache (``bfloat16`` /
``float16``), PyTorch's CPU kernels convert the whole tensor, which costs several times the read; here the cache is
streamed in blocks of ``block`` keys that are converted into a small float32 buffer that stays in the CPU cache,
so main memory is read once, in half precision. The result equals the reference (:func:`attention_reference`)
within float32 rounding; the weights it returns are exact.

Registered as backend ``"decode"`` ahead of ``"sdpa"``: ``backend="auto"`` routes inference calls on a
half-precision cache with at most ``MAX_QUERIES`` queries and at least ``MIN_KEYS`` keys to it when torch runs one
intra-op thread (the usual setting of a serving worker). It leaves float32 caches to the fused kernel, which streams
them as fast, and it stands aside with several threads: this kernel is a chain of parallel regions, and on a shared,
oversubscribed machine each region can wait for a descheduled thread (measured: several times slower than the fused
kernel at 2 threads under load, 1.6-1.8x faster at 1 thread). :func:`decode_attention` runs it directly, for any
dtype and thread count. :func:`~attnkit.functional.which_backend` says why the dispatcher passes over it.

Example:
    >>> import torch
    >>> from attnkit.functional import decode_attention, scaled_dot_product_attention, which_backend
    >>> q = torch.randn(1, 8, 1, 64).bfloat16()                      # (B, H, 1, E): one new token
    >>> k = v = torch.randn(1, 2, 4096, 64).bfloat16()               # (B, Hkv, S, E): a bfloat16 cache
    >>> out, weights = decode_attention(q, k, v)
    >>> out.shape, weights.shape
    (torch.Size([1, 8, 1, 64]), torch.Size([1, 8, 1, 4096]))
    >>> threads = torch.get_num_threads()
    >>> torch.set_num_threads(1)
    >>> which_backend(q, k, v).name
    'decode'
    >>> scaled_dot_product_attention(q, k, v).shape
    torch.Size([1, 8, 1, 64])
    >>> torch.set_num_threads(threads)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dense import AttentionCall, Backend, register_backend
from .masks import causal_mask

__all__ = ["MAX_QUERIES", "decode_attention"]

#: calls with more queries than this are left to the other backends (they are no longer bound by the read)
MAX_QUERIES = 8
#: calls with fewer keys than this are left to the other backends (nothing to gain)
MIN_KEYS = 128
_HALF = (torch.bfloat16, torch.float16)
#: keys per converted block for half-precision caches (block * E * 4 bytes should stay in the L2 cache)
BLOCK = 1024


def _masked_softmax_(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the last dim, in place where it can; rows with no allowed key become zeros (never NaN).

    Few passes over the scores on purpose: each pass over a long row is a parallel region, and on a shared machine
    every region can wait for a descheduled thread.
    """
    if mask is None:
        return torch.softmax(scores, dim=-1)
    if mask.dtype == torch.bool:
        scores.masked_fill_(~mask, float("-inf"))
        alive = mask.any(dim=-1, keepdim=True)  # (B|1, H|1, L|1, 1), from the (usually small) mask
    else:
        scores.add_(mask)
        alive = ~torch.isneginf(mask).all(dim=-1, keepdim=True)
    if bool(alive.all()):
        return torch.softmax(scores, dim=-1)
    weights = torch.softmax(scores.masked_fill_(~alive, 0.0), dim=-1)
    return weights.masked_fill_(~alive, 0.0)


def decode_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    *,
    scale: float | None = None,
    block: int = BLOCK,
) -> tuple[Tensor, Tensor]:
    """Attention of a few queries over a long cache; returns ``(out, weights)``. Inference only (no autograd).

    Args:
        query: ``(B, H, L, E)`` with small ``L``.
        key: ``(B, Hkv, S, E)``, any float dtype; a view of a larger cache buffer is fine.
        value: ``(B, Hkv, S, Ev)``, the key's dtype.
        attn_mask: boolean (``True`` = may attend) or float (added) tensor broadcastable to ``(B, H, L, S)``.
        scale: score scale, ``1/sqrt(E)`` when ``None``.
        block: keys per converted block for half-precision caches.

    Returns:
        ``out (B, H, L, Ev)`` in the query dtype and ``weights (B, H, L, S)`` in the accumulation dtype (float32,
        or float64 for float64 inputs); rows with no allowed key give zeros.
    """
    b, h, q_len, e = query.shape
    hk, k_len, ev = key.shape[1], key.shape[2], value.shape[-1]
    g = h // hk
    scale = e**-0.5 if scale is None else scale
    acc = torch.promote_types(query.dtype, torch.float32)  # float32 accumulation (float64 stays float64)
    qg = (query.to(acc) * scale).reshape(b, hk, g * q_len, e)  # (B, Hkv, G*L, E)
    wide = key.dtype == acc and value.dtype == acc
    qt = qg.transpose(-2, -1)  # (B, Hkv, E, G*L)
    # scores as K q (rows of K read in order: a matrix-vector product in BLAS's fast layout), then transposed
    if wide:
        scores_t = torch.matmul(key, qt)  # (B, Hkv, S, G*L): one read of K
    else:
        buf = qg.new_empty(b, hk, min(block, k_len), max(e, ev))  # float32 block, stays in the CPU cache
        parts = []
        for start in range(0, k_len, block):
            stop = min(start + block, k_len)
            kb = buf[:, :, : stop - start, :e]
            kb.copy_(key[:, :, start:stop])  # half -> float32, one block
            parts.append(torch.matmul(kb, qt))  # (B, Hkv, block, G*L)
        scores_t = torch.cat(parts, dim=-2)  # (B, Hkv, S, G*L)
    scores = scores_t.transpose(-2, -1).contiguous()  # (B, Hkv, G*L, S); a free view when G*L == 1
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(acc)
    weights = _masked_softmax_(scores.view(b, h, q_len, k_len), attn_mask)  # (B, H, L, S) in acc
    pg = weights.view(b, hk, g * q_len, k_len)  # (B, Hkv, G*L, S)
    if wide:
        out = torch.matmul(pg, value)  # (B, Hkv, G*L, Ev): one read of V
    else:
        out = qg.new_zeros(b, hk, g * q_len, ev)
        for start in range(0, k_len, block):
            stop = min(start + block, k_len)
            vb = buf[:, :, : stop - start, :ev]
            vb.copy_(value[:, :, start:stop])
            out += torch.matmul(pg[..., start:stop], vb)  # (B, Hkv, G*L, Ev)
    return out.view(b, h, q_len, ev).to(query.dtype), weights


def _decode_fn(call: AttentionCall) -> tuple[Tensor, Tensor]:
    mask, causal = call.dense_mask()
    if causal:  # upper-left causal as a tensor (rarely used with a cache; the module passes lower-right masks)
        c = causal_mask(call.q_len, call.k_len, device=call.query.device)
        mask = c if mask is None else (mask & c if mask.dtype == torch.bool else mask.masked_fill(~c, float("-inf")))
    out, weights = decode_attention(call.query, call.key, call.value, mask, scale=call.scale)
    return out, weights.to(call.query.dtype)


def _decode_supports(call: AttentionCall) -> list[str]:
    reasons = []
    if call.q_len > MAX_QUERIES:
        reasons.append(f"more than {MAX_QUERIES} queries (not a decoding step)")
    if call.k_len < MIN_KEYS:
        reasons.append(f"fewer than {MIN_KEYS} keys (nothing to gain over the fused kernel)")
    if call.needs_grad:
        reasons.append("inputs require grad (the decode kernel is for inference)")
    if call.dropout_p > 0:
        reasons.append("dropout > 0")
    if call.query.device.type != "cpu":
        reasons.append("not a CPU tensor (the fused kernel decodes well on accelerators)")
    if call.key.dtype not in _HALF:
        reasons.append(f"a {str(call.key.dtype).replace('torch.', '')} cache (the fused kernel already streams it; "
                       "this kernel wins on half-precision caches)")
    threads = torch.get_num_threads()
    if threads > 1:
        reasons.append(f"{threads} intra-op threads: this kernel is a chain of parallel regions, and on a busy machine "
                       "each one can wait for a descheduled thread, where the fused kernel waits once "
                       "(use one thread, or call decode_attention)")
    return reasons


register_backend(
    Backend("decode", _decode_fn, True, _decode_supports, "a few queries over a long KV cache, bandwidth-bound"),
    before="sdpa",
)
