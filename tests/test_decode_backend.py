"""The "decode" backend: parity with the reference over dtypes (every dtype via decode_attention), GQA, masks, cache
views; routing (auto sends half-precision decoding steps to it)."""

from __future__ import annotations

import pytest
import torch

from attnkit.functional import attention_reference, scaled_dot_product_attention, which_backend
from attnkit.functional.decode import decode_attention
from attnkit.layers import KVCache, MultiHeadAttention

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _cache_views(b, hk, s, e, ev, dtype):
    """Keys/values as views of a larger preallocated buffer, as a KVCache hands them out."""
    kbuf = torch.randn(b, hk, s + 37, e, dtype=torch.float64).to(dtype)
    vbuf = torch.randn(b, hk, s + 37, ev, dtype=torch.float64).to(dtype)
    return kbuf[:, :, :s], vbuf[:, :, :s]


CASES = [(dtype, shape, "bool") for dtype in TOL for shape in ((4, 4, 1), (8, 2, 1), (4, 1, 3))]
KINDS = ("none", "float", "dead_row")
CASES += [(dtype, (8, 2, 1), kind) for dtype in (torch.float32, torch.bfloat16) for kind in KINDS]


@pytest.mark.parametrize("dtype, shape, mask_kind", CASES, ids=str)
def test_decode_matches_reference(dtype, shape, mask_kind):
    (h, hk, q_len), (b, s, e, ev) = shape, (2, 200, 16, 8)
    k, v = _cache_views(b, hk, s, e, ev, dtype)
    q = torch.randn(b, h, q_len, e, dtype=torch.float64).to(dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, q_len, s) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(b, h, q_len, s, dtype=torch.float64).to(dtype)
    elif mask_kind == "dead_row":
        mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
        mask[1] = False  # the second sequence has no key at all
    out, w = decode_attention(q, k, v, mask, block=64)  # several half-precision blocks, a ragged last one
    ref_out, ref_w = attention_reference(q.double(), k.double(), v.double(), None if mask is None else (
        mask if mask.dtype == torch.bool else mask.double()))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(w.double(), ref_w, atol=TOL[dtype], rtol=TOL[dtype])
    if mask_kind == "dead_row":
        assert (out[1] == 0).all() and (w[1] == 0).all()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_routing_and_reasons(one_thread):
    q = torch.randn(1, 8, 1, 32).bfloat16()
    k = v = torch.randn(1, 2, 512, 32).bfloat16()
    assert which_backend(q, k, v).name == "decode"
    assert which_backend(q, k, v, return_weights=True).name == "decode"
    assert which_backend(q.float(), k.float(), v.float()).name == "sdpa"  # float32 caches stay on the fused kernel
    assert which_backend(q, k[:, :, :16], v[:, :, :16]).name != "decode"  # too few keys
    assert which_backend(torch.randn(1, 8, 64, 32).bfloat16(), k, v).name != "decode"  # not a decoding step
    choice = which_backend(q.requires_grad_(), k, v)
    assert choice.name != "decode" and "grad" in "; ".join(choice.reasons["decode"])
    torch.set_num_threads(2)
    assert "intra-op threads" in "; ".join(which_backend(q.detach(), k, v).reasons["decode"])
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match="float32 cache"):
        scaled_dot_product_attention(q.detach().float(), k.float(), v.float(), backend="decode")
    out = scaled_dot_product_attention(q.detach(), k, v, backend="decode")
    want = scaled_dot_product_attention(q.detach().float(), k.float(), v.float(), backend="reference")
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_decoding_through_the_decode_backend(dtype, one_thread):
    mha = MultiHeadAttention(32, 4, num_kv_heads=2, dtype=dtype).eval()
    x = torch.randn(1, 200, 32, dtype=dtype)
    with torch.no_grad():
        cache = KVCache()
        mha(x[:, :190], cache=cache, is_causal=True)
        k = cache.keys
        q = torch.randn(1, 4, 1, 8, dtype=dtype)
        assert which_backend(q, k, k).name == ("decode" if dtype == torch.bfloat16 else "sdpa")
        steps = torch.cat([mha(x[:, i : i + 1], cache=cache, is_causal=True) for i in range(190, 200)], dim=1)
        full = mha(x, is_causal=True)[:, 190:]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(steps.float(), full.float(), atol=tol, rtol=tol)

