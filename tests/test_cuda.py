"""The kernels on a CUDA device against the float64 reference computed on the CPU (skipped without a GPU).

Every backend of ``scaled_dot_product_attention`` (forward and gradients, fully masked rows), the sliding-window,
block-sparse, chunked and decode kernels, and a multi-head module decoding with a KV cache, in float32, bfloat16
and float16, at the tolerance policy of :mod:`attnkit.testing`.
"""

from __future__ import annotations

import pytest
import torch

from attnkit.functional import (
    BlockedWindowMask,
    BlockSparseMask,
    CausalMask,
    PaddingMask,
    attention_reference,
    block_sparse_attention,
    chunked_attention,
    decode_attention,
    local_layout,
    scaled_dot_product_attention,
    sliding_window_attention,
)
from attnkit.testing import assert_close_to_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
DEV = "cuda"


def _qkv(b, h, hkv, q_len, k_len, e, dtype):  # type: ignore[no-untyped-def]
    """float64 CPU tensors rounded to ``dtype`` (the reference sees the same inputs) and their CUDA copies."""
    q, k, v = (torch.randn(b, x, n, e, dtype=torch.float64).to(dtype).double()
               for x, n in ((h, q_len), (hkv, k_len), (hkv, k_len)))
    return (q, k, v), tuple(t.to(DEV, dtype).requires_grad_(True) for t in (q, k, v))


def _reference(q, k, v, mask, grad):  # type: ignore[no-untyped-def]
    rep = q.shape[1] // k.shape[1]
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = attention_reference(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), mask)[0]
    return out.detach(), torch.autograd.grad((out * grad).sum(), (q, k, v))


def _check(out, inputs, ref, grad, reduction):  # type: ignore[no-untyped-def]
    ref_out, ref_grads = ref
    grads = torch.autograd.grad((out * grad.to(out)).sum(), inputs)
    assert_close_to_reference(out.cpu(), ref_out, reduction=reduction)
    for got, want in zip(grads, ref_grads, strict=True):
        assert_close_to_reference(got.cpu(), want, reduction=reduction, grad=True)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["auto", "sdpa", "math", "reference"])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding", "bool_dead_row"])
def test_dense_backends(backend, dtype, mask_kind):  # type: ignore[no-untyped-def]
    (q, k, v), inputs = _qkv(2, 4, 2, 37, 53, 32, dtype)
    lengths = torch.tensor([53, 20])
    if mask_kind == "none":
        mask, meaning = None, None
    elif mask_kind == "causal":
        mask = CausalMask("lower_right")
        meaning = mask.materialize(37, 53)
    elif mask_kind == "padding":
        mask = PaddingMask(lengths)
        meaning = mask.materialize(37, 53)
    else:
        meaning = torch.rand(2, 1, 37, 53) > 0.3
        meaning[0, 0, 5] = False  # a row that sees nothing: zeros, never NaN
        mask = meaning
    dev_mask = mask.to(DEV) if isinstance(mask, torch.Tensor) else mask
    if isinstance(mask, PaddingMask):
        dev_mask = PaddingMask(lengths.to(DEV))
    grad = torch.randn(2, 4, 37, 32, dtype=torch.float64)
    out = scaled_dot_product_attention(*inputs, dev_mask, backend=backend)
    assert out.device.type == "cuda" and torch.isfinite(out).all()
    _check(out, inputs, _reference(q, k, v, meaning, grad), grad, 53)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_long_kernels(dtype):  # type: ignore[no-untyped-def]
    n, w = 200, 32
    (q, k, v), inputs = _qkv(1, 4, 2, n, n, 32, dtype)
    grad = torch.randn(1, 4, n, 32, dtype=torch.float64)
    out = sliding_window_attention(*inputs, window=w, causal=True)
    win = BlockedWindowMask(w, look_backward=1, causal=True)
    _check(out, inputs, _reference(q, k, v, win.materialize(n, n), grad), grad, 2 * w)
    layout = local_layout(-(-n // 32), look_backward=1)
    (q, k, v), inputs = _qkv(1, 4, 2, n, n, 32, dtype)
    out = block_sparse_attention(*inputs, layout, block_size=32, causal=True)
    _check(out, inputs, _reference(q, k, v, BlockSparseMask(layout, 32, causal=True).materialize(n, n), grad),
           grad, 64)
    (q, k, v), inputs = _qkv(1, 4, 4, n, n, 32, dtype)
    out = chunked_attention(*inputs, is_causal=True, chunk_size=64)
    _check(out, inputs, _reference(q, k, v, CausalMask().materialize(n, n), grad), grad, n)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_decode_on_a_cache(dtype):  # type: ignore[no-untyped-def]
    (q, k, v), _ = _qkv(2, 8, 2, 1, 1000, 64, dtype)
    mask = torch.rand(2, 1, 1, 1000) > 0.2
    out, w = decode_attention(q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype), mask.to(DEV))
    ref, ref_w = attention_reference(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), mask)
    assert_close_to_reference(out.cpu(), ref, reduction=1000)
    assert w is not None
    assert_close_to_reference(w.cpu(), ref_w, reduction=1000, dtype=torch.float32)


def test_multi_head_decoding_equals_full_recompute_on_cuda():  # type: ignore[no-untyped-def]
    from attnkit.layers import KVCache, MultiHeadAttention

    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 8, num_kv_heads=2, device=DEV).eval()
    ref = MultiHeadAttention(64, 8, num_kv_heads=2, dtype=torch.float64).eval()
    ref.load_state_dict({k: v.double().cpu() for k, v in mha.state_dict().items()})
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        cache = KVCache()
        mha(x[:, :30].to(DEV), cache=cache, is_causal=True)
        steps = torch.cat([mha(x[:, i : i + 1].to(DEV), cache=cache, is_causal=True) for i in range(30, 40)], 1)
        full = ref(x.double(), is_causal=True)[:, 30:]
    assert_close_to_reference(steps.cpu(), full, reduction=64)


def test_fully_masked_rows_are_zero_on_cuda():  # type: ignore[no-untyped-def]
    q = torch.randn(1, 2, 4, 16, device=DEV, requires_grad=True)
    mask = torch.zeros(4, 6, dtype=torch.bool, device=DEV)
    out = scaled_dot_product_attention(q, q[:, :, :1].expand(1, 2, 6, 16), q[:, :, :1].expand(1, 2, 6, 16), mask)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and q.grad is not None and torch.isfinite(q.grad).all()
