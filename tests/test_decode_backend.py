"""The decode backends ("native_decode", "torch_decode"): parity with the reference over dtypes (every dtype via
decode_attention), both implementations (the native C kernel and the PyTorch path), GQA, masks, cache views; the
native library's build and fallbacks; routing (auto sends decoding steps to them)."""

from __future__ import annotations

import copy

import pytest
import torch

from attnkit.functional import (
    _decode_calibration,
    _native,
    attention_reference,
    scaled_dot_product_attention,
    which_backend,
)
from attnkit.functional.decode import decode_attention, native_unsupported
from attnkit.layers import KVCache, MultiHeadAttention
from attnkit.testing import assert_close_to_reference

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _cache_views(b, hk, s, e, ev, dtype):
    """Keys/values as views of a larger preallocated buffer, as a KVCache hands them out."""
    kbuf = torch.randn(b, hk, s + 37, e, dtype=torch.float64).to(dtype)
    vbuf = torch.randn(b, hk, s + 37, ev, dtype=torch.float64).to(dtype)
    return kbuf[:, :, :s], vbuf[:, :, :s]


NATIVE = pytest.param("native", marks=pytest.mark.skipif(
    _native.load() is None, reason=f"native kernel unavailable: {_native.status()}"))
IMPLS = ["torch", NATIVE]
CASES = [(dtype, shape, "bool") for dtype in DTYPES for shape in ((4, 4, 1), (8, 2, 1), (4, 1, 3))]
KINDS = ("none", "float", "dead_row")
CASES += [(dtype, (8, 2, 1), kind) for dtype in (torch.float32, torch.bfloat16, torch.float16) for kind in KINDS]


# float64 always takes the PyTorch path (the native kernel accumulates in float32): no native float64 cases
NO_NATIVE = pytest.mark.skipif(_native.load() is None, reason=f"native kernel unavailable: {_native.status()}")
PARITY = [(*case, "torch") for case in CASES] + [
    pytest.param(*case, "native", marks=NO_NATIVE) for case in CASES if case[0] != torch.float64]


@pytest.mark.parametrize("dtype, shape, mask_kind, impl", PARITY, ids=str)
def test_decode_matches_reference(dtype, shape, mask_kind, impl):
    (h, hk, q_len), (b, s, e, ev) = shape, (2, 203, 16, 8)  # S = 203: a ragged last block, rows not a multiple of 4
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
    out, w = decode_attention(q, k, v, mask, block=64, impl=impl)  # several half-precision blocks, a ragged last one
    ref_out, ref_w = attention_reference(q.double(), k.double(), v.double(), None if mask is None else (
        mask if mask.dtype == torch.bool else mask.double()))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close_to_reference(out, ref_out, reduction=s)
    assert_close_to_reference(w, ref_w, reduction=s)
    if mask_kind == "dead_row":
        assert (out[1] == 0).all() and (w[1] == 0).all()


@pytest.fixture(autouse=True)
def _no_calibration(monkeypatch):
    """Routing as declared, not as this machine's timings say (those: tests/test_functional_decode_calibration.py)."""
    monkeypatch.setenv(_decode_calibration.ENV, "0")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("e, ev", [(64, 64), (64, 128), (40, 24), (13, 7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decode_head_dims_and_layouts(dtype, e, ev, impl):
    """SIMD and portable C paths (E a multiple of 8 or not), 64-wide output tiles and their tails, batch > 1, GQA
    with several queries, keys as strided views and as a transposed (non-contiguous rows) tensor."""
    b, h, hk, q_len, s = 2, 6, 2, 2, 1001
    k, v = _cache_views(b, hk, s, e, ev, dtype)
    q = torch.randn(b, h, q_len, e, dtype=torch.float64).to(dtype)
    ref_out, ref_w = attention_reference(q.double(), k.double(), v.double())
    for key in (k, k.transpose(-1, -2).contiguous().transpose(-1, -2)):  # the second has stride(-1) != 1
        out, w = decode_attention(q, key, v, impl=impl)
        assert_close_to_reference(out, ref_out, reduction=s)
        assert_close_to_reference(w, ref_w, reduction=s)
        out, w = decode_attention(q, key, v, impl=impl, need_weights=False)  # native: the one-pass kernel
        assert w is None
        assert_close_to_reference(out, ref_out, reduction=s)


@pytest.mark.skipif(_native.load() is None, reason=f"native kernel unavailable: {_native.status()}")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hk", [8, 1])
def test_native_equals_torch_path_on_a_long_cache(threads, hk):
    """Many work units and partial outputs (several threads; one kv head splits its keys into chunks that merge with
    their running max and sum): the native kernels (two-pass and one-pass) and the PyTorch path are each as close
    to the float64 reference as float32 allows (never compared with each other: their rounding differs)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        k, v = _cache_views(1, hk, 5000, 64, 64, torch.float32)
        q = torch.randn(1, 8, 1, 64) * 3  # sharper softmax: the running max moves across chunks
        out_n, w_n = decode_attention(q, k, v, impl="native")
        out_f, _ = decode_attention(q, k, v, impl="native", need_weights=False)
        out_t, w_t = decode_attention(q, k, v, impl="torch")
        assert torch.equal(decode_attention(q, k, v, impl="native_decode")[0], out_n)  # impl= by backend name
        assert torch.equal(decode_attention(q, k, v, impl="torch_decode")[0], out_t)
    finally:
        torch.set_num_threads(saved)
    ref_out, ref_w = attention_reference(q.double(), k.double(), v.double())
    for name, out in (("native two-pass", out_n), ("native one-pass", out_f), ("torch", out_t)):
        assert_close_to_reference(out, ref_out, reduction=5000, msg=name)
    for name, w in (("native", w_n), ("torch", w_t)):
        assert_close_to_reference(w, ref_w, reduction=5000, msg=name)


def test_bad_impl_and_native_refusals():
    q, k = torch.randn(1, 2, 1, 8, dtype=torch.float64), torch.randn(1, 2, 300, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="impl"):
        decode_attention(q, k, k, impl="fast")
    with pytest.raises(ValueError, match="impl='native'.*float64"):
        decode_attention(q, k, k, impl="native")
    assert "float64" in native_unsupported(q, k, k)
    wide = torch.randn(1, 2, 300, 600)
    assert "head dim" in native_unsupported(wide[:, :, :1], wide, wide)


def test_native_build_fallbacks(tmp_path, monkeypatch):
    """The library builds into the cache folder; no compiler or ATTNKIT_NATIVE=0 give None and a reason."""
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("ATTNKIT_NATIVE", "0")
    lib, why = _native._build()
    assert lib is None and "ATTNKIT_NATIVE=0" in why
    monkeypatch.setenv("ATTNKIT_NATIVE", "1")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    lib, why = _native._build()
    assert lib is None and "failed to run" in why and not list(tmp_path.glob("*.so"))
    if _native.load() is None:
        pytest.skip(f"no working compiler here: {_native.status()}")
    monkeypatch.delenv("CC")
    lib, why = _native._build()  # a fresh build into the empty folder, then a load of the cached file
    assert lib is not None and why.startswith("loaded") and len(list(tmp_path.glob("attnkit_native_*.so"))) == 1
    assert not list(tmp_path.glob("tmp*")), "the temporary file was renamed into place"
    assert _native._build()[0] is not None


@pytest.mark.skipif(_native.load() is None, reason=f"native kernel unavailable: {_native.status()}")
def test_portable_c_path_matches_reference(tmp_path, monkeypatch):
    """The C code without AVX2 (what a CPU without it, or another architecture, runs): both kernels, all dtypes."""
    from attnkit.functional.decode import _decode_fused, _decode_native

    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("ATTNKIT_NATIVE_SIMD", "0")
    lib, why = _native._build()
    assert lib is not None and "portable C" in why and not lib.attnkit_simd()
    for dtype in (torch.float32, torch.bfloat16) + ((torch.float16,) if lib.attnkit_has_f16() else ()):
        k, v = _cache_views(2, 2, 301, 24, 16, dtype)
        q = torch.randn(2, 4, 2, 24, dtype=torch.float64).to(dtype)
        qg = (q.float() * 24**-0.5).reshape(2, 2, 4, 24).contiguous()
        mask = torch.rand(2, 1, 2, 301) > 0.2
        ref, ref_w = attention_reference(q.double(), k.double(), v.double(), mask)
        out, w = _decode_native(lib, qg, k, v, mask, (2, 4, 2, 16), dtype)
        assert_close_to_reference(out, ref, reduction=301)
        assert_close_to_reference(w, ref_w, reduction=301)
        ref, _ = attention_reference(q.double(), k.double(), v.double())
        out = _decode_fused(lib, qg, k, v, (2, 4, 2, 16), dtype)
        assert_close_to_reference(out, ref, reduction=301)


def test_routing_and_reasons(one_thread, monkeypatch):
    q = torch.randn(1, 8, 1, 32).bfloat16()
    k = v = torch.randn(1, 2, 512, 32).bfloat16()
    decoders = ("native_decode", "torch_decode")
    assert which_backend(q, k, v).name in decoders
    assert which_backend(q, k, v, return_weights=True).name in decoders
    assert which_backend(q, k[:, :, :16], v[:, :, :16]).name not in decoders  # too few keys
    assert which_backend(torch.randn(1, 8, 64, 32).bfloat16(), k, v).name not in decoders  # not a decoding step
    choice = which_backend(q.requires_grad_(), k, v)
    assert choice.name not in decoders and all("grad" in "; ".join(choice.reasons[d]) for d in decoders)
    q = q.detach()
    if _native.load() is not None:  # the native kernel takes float32 caches and any thread count
        assert which_backend(q.float(), k.float(), v.float()).name == "native_decode"
        torch.set_num_threads(2)
        assert which_backend(q, k, v).name == "native_decode"
        torch.set_num_threads(1)
    monkeypatch.setitem(_native._STATE, "lib", None)  # as on a machine without a C compiler
    monkeypatch.setitem(_native._STATE, "status", "no C compiler found")
    assert which_backend(q.float(), k.float(), v.float()).name == "sdpa"  # float32 caches stay on the fused kernel
    reasons = which_backend(q.float(), k.float(), v.float()).reasons
    assert "no native library" in "; ".join(reasons["native_decode"])
    assert "float32 cache" in "; ".join(reasons["torch_decode"])
    assert which_backend(q, k, v).name == "torch_decode"  # the PyTorch path, half precision at one thread
    torch.set_num_threads(2)
    assert "intra-op threads" in "; ".join(which_backend(q, k, v).reasons["torch_decode"])
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match="no native library"):
        scaled_dot_product_attention(q, k, v, backend="native_decode")
    out = scaled_dot_product_attention(q.float(), k.float(), v.float(), backend="torch_decode")  # forced: it serves
    want, _ = attention_reference(q.double(), k.double(), v.double())
    assert_close_to_reference(out, want, reduction=512)
    with pytest.warns(DeprecationWarning, match="'decode' is deprecated"):  # the old name: its first member that serves
        out = scaled_dot_product_attention(q, k, v, backend="decode")
    want, _ = attention_reference(q.double(), k.double(), v.double())
    assert_close_to_reference(out, want, reduction=512)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_decoding_through_the_decode_backend(dtype, one_thread):
    mha = MultiHeadAttention(32, 4, num_kv_heads=2, dtype=dtype).eval()
    x = torch.randn(1, 200, 32, dtype=dtype)
    with torch.no_grad():
        cache = KVCache()
        mha(x[:, :190], cache=cache, is_causal=True)
        k = cache.keys
        q = torch.randn(1, 4, 1, 8, dtype=dtype)
        native = _native.load() is not None
        want_backend = "native_decode" if native else "torch_decode" if dtype == torch.bfloat16 else "sdpa"
        assert which_backend(q, k, k).name == want_backend
        steps = torch.cat([mha(x[:, i : i + 1], cache=cache, is_causal=True) for i in range(190, 200)], dim=1)
        full = mha(x, is_causal=True)[:, 190:]
        want = copy.deepcopy(mha).double()(x.double(), is_causal=True)[:, 190:]  # the same weights, in float64
    assert_close_to_reference(steps, want, reduction=200, msg="cached decoding steps")
    assert_close_to_reference(full, want, reduction=200, msg="full sequence")

