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

Two implementations, each its own backend of the dispatcher, forced with ``impl=``:

* ``"native"`` (backend ``native_decode``): C (``csrc/decode.c``, built on first use by
  :mod:`attnkit.functional._native`). Pass 1 reads each key row once and computes its dot products with every query
  row of its head (four rows at a time, AVX2/FMA where the CPU has them); pass 3 reads each value row once and
  accumulates it into registers. Half-precision rows (``bfloat16``, ``float16``) are widened to float32 in registers,
  so main memory is read once, in half precision. Threads split the keys (OpenMP, PyTorch's thread count); the partial
  outputs of pass 3 are summed here.
* ``"torch"`` (backend ``torch_decode``): PyTorch operators only, the path when no C compiler is present. A float32
  cache goes through two batched matrix-vector products on the cache views; a half-precision cache is converted block
  by block into a small float32 buffer (PyTorch's CPU kernels would otherwise convert the whole tensor, several times
  the read).

Both equal the reference (:func:`attention_reference`) within float32 rounding, and the weights they return are
exact; ``tests/test_decode_backend.py`` checks each over dtypes, GQA, masks, cache views and dead rows.

Both come ahead of ``"sdpa"`` in the priority list: ``backend="auto"`` routes inference calls with at most
``MAX_QUERIES`` queries and at least ``MIN_KEYS`` keys to ``native_decode`` where the native kernel can run them
(float32, bfloat16 or float16 caches, any thread count) and this machine's one-time calibration
(:mod:`attnkit.functional._decode_calibration`, ``ATTNKIT_DECODE_CALIBRATION``) found it at least as fast as the
kernel ``auto`` would run instead. PyTorch's fused kernel reaches about half the
memory-bandwidth bound on a float32 cache and a tenth on a bfloat16 one (``python -m attnkit.bench modules``).
Without the native kernel, the dispatcher sends only half-precision caches at one intra-op thread to
``torch_decode``: the PyTorch path is a chain of parallel regions, and on a shared, oversubscribed machine each
region can wait for a descheduled thread. :func:`~attnkit.functional.which_backend` says why the dispatcher passes
over it.

Example:
    >>> import torch
    >>> from attnkit.functional import decode_attention, scaled_dot_product_attention, which_backend
    >>> q = torch.randn(1, 8, 1, 64).bfloat16()                      # (B, H, 1, E): one new token
    >>> k = v = torch.randn(1, 2, 4096, 64).bfloat16()               # (B, Hkv, S, E): a bfloat16 cache
    >>> out, weights = decode_attention(q, k, v)
    >>> out.shape, weights.shape
    (torch.Size([1, 8, 1, 64]), torch.Size([1, 8, 1, 4096]))
    >>> out = scaled_dot_product_attention(q, k, v, backend="torch_decode")   # a decode backend, forced
    >>> out.shape, which_backend(q, k, v, backend="torch_decode").name
    (torch.Size([1, 8, 1, 64]), 'torch_decode')
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _decode_calibration, _native
from . import _validate as V
from .dispatch import CHOICE_INPUTS, AttentionCall, Backend, get_backend, register_backend
from .masks import causal_mask

__all__ = ["MAX_QUERIES", "decode_attention", "native_unsupported"]

#: calls with more queries than this are left to the other backends (they are no longer bound by the read)
MAX_QUERIES = 8
#: calls with fewer keys than this are left to the other backends (nothing to gain)
MIN_KEYS = 128
_HALF = (torch.bfloat16, torch.float16)
#: keys per converted block for half-precision caches (block * E * 4 bytes should stay in the L2 cache)
BLOCK = 1024
#: keys per work unit of the native kernel
NATIVE_BLOCK = 512
#: the native kernel's largest head dim (its row buffer)
MAX_NATIVE_DIM = 512
#: the one-pass kernel keeps G*L rows of FB scores on each thread's stack
MAX_FUSED_ROWS = 1024
_NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


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
    impl: str = "auto",
    need_weights: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Attention of a few queries over a long cache; returns ``(out, weights)``. Inference only (no autograd).

    Args:
        query: ``(B, H, L, E)`` with small ``L``.
        key: ``(B, Hkv, S, E)``, any float dtype; a view of a larger cache buffer is fine.
        value: ``(B, Hkv, S, Ev)``, the key's dtype.
        attn_mask: boolean (``True`` = may attend) or float (added) tensor broadcastable to ``(B, H, L, S)``.
        scale: score scale, ``1/sqrt(E)`` when ``None``.
        block: keys per converted block for half-precision caches (PyTorch path).
        impl: a backend to force, by name: ``"native_decode"`` (the C kernel; raises if it cannot run this input)
            or ``"torch_decode"`` (PyTorch operators only); ``"auto"``: native where it can run, else PyTorch (this
            function runs what it is asked; the per-machine calibration is ``backend="auto"``'s choice).
            ``"native"`` and ``"torch"`` are short for the two names.
        need_weights: return the weights; with ``False`` and no mask the native kernel runs in one pass (online
            softmax per chunk of keys, merged with the log-sum-exp) and the weights are ``None``.

    Returns:
        ``out (B, H, L, Ev)`` in the query dtype and ``weights (B, H, L, S)`` in the accumulation dtype (float32,
        or float64 for float64 inputs), or ``None``; rows with no allowed key give zeros.
    """
    if impl not in _IMPLS:
        raise V.fail(f"impl in {list(_IMPLS)}", repr(impl), "impl='auto'")
    impl = _IMPLS[impl]
    b, h, q_len, e = query.shape
    hk, ev = key.shape[1], value.shape[-1]
    g = h // hk
    scale = e**-0.5 if scale is None else scale
    acc = torch.promote_types(query.dtype, torch.float32)  # float32 accumulation (float64 stays float64)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(acc)
    qg = (query.to(acc) * scale).reshape(b, hk, g * q_len, e)  # (B, Hkv, G*L, E)
    lib = None
    if impl != "torch":
        why = native_unsupported(query, key, value)
        if why and impl == "native":
            raise V.fail(f"a CPU float32/bfloat16/float16 cache with E, Ev <= {MAX_NATIVE_DIM} and a loadable "
                         "native library for impl='native'", why, "impl='auto'")
        lib = None if why else _native.load()
    if lib is not None and attn_mask is None and not need_weights and qg.shape[2] <= MAX_FUSED_ROWS:
        return _decode_fused(lib, qg.contiguous(), key, value, (b, h, q_len, ev), query.dtype), None
    if lib is not None:
        out, weights = _decode_native(lib, qg.contiguous(), key, value, attn_mask, (b, h, q_len, ev), query.dtype)
    else:
        out, weights = _decode_torch(qg, key, value, attn_mask, block, (b, h, q_len, ev), query.dtype)
    return out, weights if need_weights else None


#: ``impl=`` of :func:`decode_attention` -> the implementation it runs
_IMPLS = {"auto": "auto", "native": "native", "torch": "torch", "native_decode": "native", "torch_decode": "torch"}


def native_unsupported(query: Tensor, key: Tensor, value: Tensor) -> str:
    """Why the native kernel cannot run these tensors ('' when it can); builds the library on first call."""
    if query.device.type != "cpu" or key.device.type != "cpu" or value.device.type != "cpu":
        return "not CPU tensors"
    if key.dtype not in _NATIVE_DTYPES or value.dtype != key.dtype:
        return f"a {str(key.dtype).replace('torch.', '')} cache with {str(value.dtype).replace('torch.', '')} " \
            "values (the native kernel reads float32, bfloat16 or float16 caches of one dtype)"
    if max(key.shape[-1], value.shape[-1]) > MAX_NATIVE_DIM:
        return f"head dim above {MAX_NATIVE_DIM}"
    lib = _native.load()
    if lib is None:
        return f"no native library ({_native.status()})"
    if key.dtype == torch.float16 and not (lib.attnkit_simd() or lib.attnkit_has_f16()):
        return "this compiler has no float16 type"
    return ""


def _rows_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()  # rows must be contiguous; heads/keys may be strided


def _chunks(k_len: int, units: int) -> int:
    """Chunks of keys per (batch, kv head): at least 4 work units per thread, at least NATIVE_BLOCK keys each."""
    return max(1, min(-(-k_len // NATIVE_BLOCK), -(-4 * torch.get_num_threads() // units)))


def _decode_fused(lib: object, qg: Tensor, key: Tensor, value: Tensor, out_shape: tuple[int, int, int, int],
                  out_dtype: torch.dtype) -> Tensor:
    """The C kernel in one pass: each (batch, head, chunk) unit returns an unnormalised output, its running max and
    sum; they merge here exactly (the log-sum-exp recurrence), in small tensors."""
    b, h, q_len, ev = out_shape
    key, value = _rows_contiguous(key), _rows_contiguous(value)
    hk, k_len, e, rows = key.shape[1], key.shape[2], key.shape[3], qg.shape[2]
    chunks = _chunks(k_len, b * hk)
    acc = qg.new_empty(b * hk, chunks, rows, ev)
    run_max, run_sum = qg.new_empty(b * hk, chunks, rows), qg.new_empty(b * hk, chunks, rows)
    lib.attnkit_decode_fused(key.data_ptr(), value.data_ptr(), _NATIVE_DTYPES[key.dtype], b, hk, k_len, e,  # type: ignore
                             ev, *key.stride()[:3], *value.stride()[:3], qg.data_ptr(), rows, acc.data_ptr(),
                             run_max.data_ptr(), run_sum.data_ptr(), chunks, torch.get_num_threads())
    if chunks == 1:
        out = acc[:, 0] / run_sum[:, 0, :, None]
    else:
        w = torch.exp(run_max - run_max.amax(dim=1, keepdim=True))  # (B*Hkv, C, G*L)
        out = (acc * w[..., None]).sum(dim=1) / (run_sum * w).sum(dim=1)[..., None]
    return out.view(b, h, q_len, ev).to(out_dtype)


def _decode_native(lib: object, qg: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                   out_shape: tuple[int, int, int, int], out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The C kernel: one streaming pass over K for the scores, the softmax here, one streaming pass over V."""
    b, h, q_len, ev = out_shape
    hk, k_len, e, rows = key.shape[1], key.shape[2], key.shape[3], qg.shape[2]
    key, value = _rows_contiguous(key), _rows_contiguous(value)
    threads = torch.get_num_threads()
    dt = _NATIVE_DTYPES[key.dtype]
    scores = qg.new_empty(b, hk, rows, k_len)  # (B, Hkv, G*L, S) == (B, H, L, S) as a view
    lib.attnkit_decode_scores(key.data_ptr(), dt, b, hk, k_len, e, key.stride(0), key.stride(1),  # type: ignore
                              key.stride(2), qg.data_ptr(), rows, scores.data_ptr(), NATIVE_BLOCK, threads)
    weights = _masked_softmax_(scores.view(b, h, q_len, k_len), mask).contiguous()  # (B, H, L, S) float32
    chunks = _chunks(k_len, b * hk)
    part = qg.new_empty(b * hk, chunks, rows, ev)
    lib.attnkit_decode_pv(weights.data_ptr(), value.data_ptr(), dt, b, hk, k_len, ev, value.stride(0),  # type: ignore
                          value.stride(1), value.stride(2), rows, part.data_ptr(), chunks, threads)
    out = part[:, 0] if chunks == 1 else part.sum(dim=1)  # (B*Hkv, G*L, Ev)
    return out.view(b, h, q_len, ev).to(out_dtype), weights


def _decode_torch(qg: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, block: int,
                  out_shape: tuple[int, int, int, int], out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """PyTorch operators only: matrix-vector products, half-precision caches converted block by block."""
    b, h, q_len, ev = out_shape
    hk, k_len, e = key.shape[1], key.shape[2], key.shape[3]
    wide = key.dtype == qg.dtype and value.dtype == qg.dtype
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
    weights = _masked_softmax_(scores.view(b, h, q_len, k_len), mask)  # (B, H, L, S) in acc
    pg = weights.view(b, hk, -1, k_len)  # (B, Hkv, G*L, S)
    if wide:
        out = torch.matmul(pg, value)  # (B, Hkv, G*L, Ev): one read of V
    else:
        out = qg.new_zeros(b, hk, pg.shape[2], ev)
        for start in range(0, k_len, block):
            stop = min(start + block, k_len)
            vb = buf[:, :, : stop - start, :ev]
            vb.copy_(value[:, :, start:stop])
            out += torch.matmul(pg[..., start:stop], vb)  # (B, Hkv, G*L, Ev)
    return out.view(b, h, q_len, ev).to(out_dtype), weights


def _decode_fn(impl: str) -> Callable[[AttentionCall], tuple[Tensor, Tensor | None]]:
    def fn(call: AttentionCall) -> tuple[Tensor, Tensor | None]:
        mask, causal = call.dense_mask()
        if causal:  # upper-left causal as a tensor (rarely used with a cache; the module passes lower-right masks)
            c = causal_mask(call.q_len, call.k_len, device=call.query.device)
            mask = c if mask is None else (mask & c if mask.dtype == torch.bool
                                           else mask.masked_fill(~c, float("-inf")))
        out, weights = decode_attention(call.query, call.key, call.value, mask, scale=call.scale, impl=impl,
                                        need_weights=call.need_weights)
        return out, None if weights is None else weights.to(call.query.dtype)
    return fn


def _step_reasons(call: AttentionCall) -> list[str]:
    """Why ``auto`` leaves a call to other kernels: it is not a decoding step (both decode backends ask this; forced,
    they serve any number of queries and keys)."""
    reasons = []
    if call.q_len > MAX_QUERIES:
        reasons.append(f"more than {MAX_QUERIES} queries (not a decoding step)")
    if call.k_len < MIN_KEYS:
        reasons.append(f"fewer than {MIN_KEYS} keys (nothing to gain over the fused kernel)")
    return reasons


def _supports(call: AttentionCall) -> list[str]:
    return ["dropout > 0"] if call.dropout_p > 0 else []


def _native_supports(call: AttentionCall) -> list[str]:
    reasons = _supports(call)
    if call.key.dtype != call.value.dtype:
        reasons.append("keys and values of different dtypes")
    lib = _native.load()
    if lib is None:
        reasons.append(f"no native library ({_native.status()})")
    elif call.key.dtype == torch.float16 and not (lib.attnkit_simd() or lib.attnkit_has_f16()):
        reasons.append("this compiler has no float16 type")
    return reasons


def _torch_rules(call: AttentionCall) -> list[str]:
    """Where ``auto`` never takes the PyTorch decode path (it is not faster than the fused kernel there)."""
    reasons = []
    if call.key.dtype not in _HALF:
        reasons.append(f"a {str(call.key.dtype).replace('torch.', '')} cache: the fused kernel streams it as fast as "
                       "the PyTorch path would")
    threads = torch.get_num_threads()
    if threads > 1:
        reasons.append(f"{threads} intra-op threads: the PyTorch path is a chain of parallel regions, and on a busy "
                       "machine each one can wait for a descheduled thread, where the fused kernel waits once (use "
                       "one thread, or call decode_attention)")
    return reasons


def _calibration(call: AttentionCall, run: bool = True) -> dict[str, float] | None:
    """This machine's timings for a step like ``call`` (measured once, see :mod:`._decode_calibration`; ``run=False``:
    only if this process measured or read them already)."""
    return _decode_calibration.timings(call.key.dtype, call.k_len, group=call.heads // call.kv_heads, run=run)


def _plain_step(call: AttentionCall) -> bool:
    """The step the calibration timed: no mask (after normalising: e.g. a lower-right causal mask with one query
    sees every key) and no weights; there SDPA is ``auto``'s alternative. Elsewhere the rule stays as declared."""
    if call.need_weights:
        return False
    mask, causal = call.dense_mask()
    return mask is None and not causal


def _native_auto_skip(call: AttentionCall) -> list[str]:
    """``auto`` takes the native kernel for decoding steps where this machine's calibration found it at least as
    fast as the kernel ``auto`` would run instead (SDPA, or the PyTorch decode path where that one is taken)."""
    reasons = _step_reasons(call)
    if reasons or get_backend("native_decode").not_supported_reasons(call) or not _plain_step(call):
        return reasons  # not served anyway, or not the step the calibration timed
    row = _calibration(call)
    if row is None:
        return reasons
    rival = "torch_decode" if not _torch_rules(call) and row["torch_decode"] < row["sdpa"] else "sdpa"
    if row["native_decode"] > row[rival]:
        reasons.append(f"slower than {rival} on this machine ({_decode_calibration.describe(row, call.key.dtype)}; "
                       f"{_decode_calibration.ENV}=0 turns the calibration off)")
    return reasons


def _torch_auto_skip(call: AttentionCall) -> list[str]:
    """The PyTorch path serves any call without dropout; ``auto`` reaches it only where the native kernel is not
    taken, and takes it only where it beats the fused kernel (by its rules, and by the calibration where there is
    one)."""
    reasons = _step_reasons(call)
    if reasons or call.needs_grad or call.query.device.type != "cpu":  # grad and device: declared on the backend
        return reasons
    reasons += _torch_rules(call)
    why = native_unsupported(call.query, call.key, call.value)
    if why and reasons:
        reasons.append(f"(no native kernel: {why})")
    if not reasons and not why:
        row = _calibration(call) if _plain_step(call) else None
        if row is not None and row["torch_decode"] > row["sdpa"]:
            reasons.append(f"slower than sdpa on this machine ({_decode_calibration.describe(row, call.key.dtype)})")
    return reasons


def _native_kernel(call: AttentionCall) -> str:
    row = _calibration(call, run=False) if not _step_reasons(call) and _plain_step(call) else None
    return "native C kernel (csrc/decode.c)" + (
        f"; {_decode_calibration.describe(row, call.key.dtype)}" if row is not None else "")


# what the decode rules read besides the call: the calibration, and which native library is loaded
CHOICE_INPUTS.append(_decode_calibration.fingerprint)
CHOICE_INPUTS.append(lambda: id(_native.load()))
register_backend(Backend(
    "native_decode", _decode_fn("native"), True, _native_supports,
    "a few queries over a long KV cache, bandwidth-bound: the native C kernel (csrc/decode.c) streams the cache "
    "once", auto_skip=_native_auto_skip, kernel=_native_kernel, dtypes=(torch.float32, torch.bfloat16, torch.float16),
    devices=("cpu",), grad=False, head_dims=MAX_NATIVE_DIM,
))
register_backend(Backend(
    "torch_decode", _decode_fn("torch"), True, _supports,
    "a few queries over a long KV cache: PyTorch matrix-vector products, half-precision caches converted block by "
    "block", auto_skip=_torch_auto_skip, devices=("cpu",), grad=False,
))
