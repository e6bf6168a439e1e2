"""The native block engine under any mask (attnkit_mask_fwd / attnkit_mask_bwd): each SIMD body against the float64
reference, forward and the three gradients; odd lengths, L != S, one query, GQA, low precision; NaN never leaks from
keys the mask hides; rows that see nothing give zeros; routing and the dense fallback (float64 gradcheck)."""

from __future__ import annotations

import pytest
import torch

from attnkit.functional import (
    BlockedWindowMask,
    BlockSparseMask,
    CausalMask,
    DocumentMask,
    MaskMod,
    PaddingMask,
    SinkMask,
    SlidingWindowMask,
    _native,
    attention_reference,
    attention_weights,
    scaled_dot_product_attention,
    which_backend,
)
from attnkit.functional.masked import masked_attention, masked_weights
from attnkit.testing import assert_close_to_reference

LIB = _native.load()
NEEDS_LIB = pytest.mark.skipif(LIB is None, reason=f"native kernel unavailable: {_native.status()}")
ISAS = [2, 1]  # the AVX-512 body (where the CPU has it) and the build's own target


def _skip_unless_isa(isa: int) -> None:
    if LIB is None:
        pytest.skip("no native library")
    if isa == 2 and LIB.attnkit_band_isa() != 2:
        pytest.skip("no AVX-512 on this CPU")


def _masks() -> dict[str, object]:
    ids = torch.tensor([0] * 50 + [1] * 80 + [2] * 73)
    return {
        "swa": SlidingWindowMask(37),
        "swa|sink": SlidingWindowMask(70) | SinkMask(4),
        "docs&causal": DocumentMask(ids) & CausalMask(),
        "dilated_mod": MaskMod(lambda b, h, q, kv: (q - kv) % 3 == 0),
        "blocked": BlockedWindowMask(16, look_backward=2),
        "swa_bidir": SlidingWindowMask(5, causal=False),
        "per_head_mod&pad": MaskMod(lambda b, h, q, kv: (q >= kv) & ((h == 1) | (b == 0)))
        & PaddingMask(torch.tensor([150, 203])),
        "sparse": BlockSparseMask(torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) > 0.4, 64),
    }


def _inputs(b, h, hkv, q_len, k_len, e, ev, dtype):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(q_len * 1000 + k_len)
    q = torch.randn(b, h, q_len, e, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, k_len, e, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, k_len, ev, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(b, h, q_len, ev, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v, g


def _check(mask, q, k, v, g, isa=2, softcap=None):  # type: ignore[no-untyped-def]
    """Native forward and gradients, each against the float64 reference of the same (rounded) inputs."""
    b, h, q_len, e = q.shape
    k_len = k.shape[2]
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = masked_attention(*xs, mask, e**-0.5, isa=isa, softcap=softcap)
    out.backward(g)
    rs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = attention_reference(*rs, None if mask is None else mask._bind(b, h), softcap=softcap)
    ref.backward(g.double())
    assert out.dtype == q.dtype
    assert_close_to_reference(out, ref, reduction=k_len, msg="out")
    for name, x, r in zip("qkv", xs, rs, strict=True):
        assert r.grad is not None and x.grad is not None
        assert_close_to_reference(x.grad, r.grad, reduction=max(q_len, k_len), grad=True, msg=f"d{name}")
    return out


@NEEDS_LIB
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(_masks()))
def test_native_mask_matches_reference(name, isa):  # type: ignore[no-untyped-def]
    _skip_unless_isa(isa)
    q, k, v, g = _inputs(2, 4, 2, 203, 203, 24, 40, torch.float32)
    _check(_masks()[name], q, k, v, g, isa)


@NEEDS_LIB
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("q_len", "k_len"), [(1, 203), (77, 203), (130, 70), (64, 64), (65, 129)])
def test_native_mask_lengths(q_len, k_len, isa):  # type: ignore[no-untyped-def]
    _skip_unless_isa(isa)
    q, k, v, g = _inputs(1, 3, 1, q_len, k_len, 16, 16, torch.float32)
    for mask in (SlidingWindowMask(40), SlidingWindowMask(9) | SinkMask(3), MaskMod(lambda b, h, q, kv: q <= kv)):
        _check(mask, q, k, v, g, isa)


@NEEDS_LIB
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_mask_low_precision(dtype):  # type: ignore[no-untyped-def]
    q, k, v, g = _inputs(1, 4, 2, 150, 150, 32, 32, dtype)
    for mask in (SlidingWindowMask(50) | SinkMask(2), DocumentMask(torch.arange(150) // 40) & CausalMask()):
        _check(mask, q, k, v, g)


SOFTCAP_MASKS = ["none", "causal", "swa|sink", "docs&causal", "sparse", "per_head_mod&pad"]


@NEEDS_LIB
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cap", [2.0, 30.0])
@pytest.mark.parametrize("name", SOFTCAP_MASKS)
def test_native_softcap_matches_reference(name, cap, isa):  # type: ignore[no-untyped-def]
    """Logit soft-capping (Gemma 2) in the kernel: output, the three gradients (through 1 - tanh^2) and the exact
    weights against the float64 reference with the same cap. Scores reach |s| ~ 25, so cap 2 rewrites nearly all
    of them and cap 30 bends the largest; small scores take the tanh's polynomial branch."""
    _skip_unless_isa(isa)
    q, k, v, g = _inputs(2, 4, 2, 203, 203, 24, 40, torch.float32)
    q, k = q * 3, k * 3
    mask = {"none": None, "causal": CausalMask(), **_masks()}[name]
    _check(mask, q, k, v, g, isa, softcap=cap)
    _check_weights(mask, q, k, isa, softcap=cap)


@NEEDS_LIB
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_softcap_low_precision(dtype):  # type: ignore[no-untyped-def]
    q, k, v, g = _inputs(1, 4, 2, 150, 150, 32, 32, dtype)
    _check(SlidingWindowMask(50) | SinkMask(2), q * 3, k * 3, v, g, softcap=5.0)


@NEEDS_LIB
@pytest.mark.parametrize("isa", ISAS)
def test_nan_in_hidden_keys_never_leaks(isa):  # type: ignore[no-untyped-def]
    """Keys and values no query may attend are NaN: outputs and gradients stay finite and exact, also where such
    a key shares a partial block with attended ones (the bit mask selects, and unseen keys are zeroed)."""
    _skip_unless_isa(isa)
    n = 200
    hidden = torch.zeros(n, dtype=torch.bool)
    hidden[[3, 70, 71, 130, 199]] = True  # inside partial blocks of the mask below
    keep = ~hidden
    mask = MaskMod(lambda b, h, q, kv: keep[kv] & (kv <= q))  # causal, minus the hidden keys
    q, k, v, g = _inputs(1, 2, 1, n, n, 16, 16, torch.float32)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, hidden] = float("nan")
    v_bad[:, :, hidden] = float("nan")
    xs = [t.clone().requires_grad_() for t in (q, k_bad, v_bad)]
    out = masked_attention(*xs, mask, 0.25, isa=isa)
    out.backward(g)
    assert torch.isfinite(out).all()
    for x in xs:
        assert x.grad is not None and torch.isfinite(x.grad).all()
    ref, _ = attention_reference(q.double(), k.double(), v.double(), mask.materialize(n, n), scale=0.25)
    assert_close_to_reference(out, ref, reduction=n)


@NEEDS_LIB
def test_rows_that_see_nothing_give_zeros() -> None:
    n = 130
    mask = MaskMod(lambda b, h, q, kv: (q >= kv) & (q % 7 != 0))  # every 7th row sees nothing
    q, k, v, g = _inputs(1, 2, 2, n, n, 16, 16, torch.float32)
    out = _check(mask, q, k, v, g)
    assert torch.equal(out[:, :, ::7], torch.zeros_like(out[:, :, ::7]))


@NEEDS_LIB
def test_portable_build_matches_reference(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """ATTNKIT_NATIVE_SIMD=0: the portable C body alone."""
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("ATTNKIT_NATIVE_SIMD", "0")
    lib, why = _native._build()
    assert lib is not None and lib.attnkit_band_isa() == 0, why
    monkeypatch.setattr(_native, "load", lambda: lib)
    q, k, v, g = _inputs(1, 2, 1, 150, 170, 16, 32, torch.float32)
    for mask in (SlidingWindowMask(30) | SinkMask(3), MaskMod(lambda b, h, q, kv: (q - kv) % 5 != 1)):
        _check(mask, q, k, v, g, isa=2)  # asks for AVX-512, gets the portable body
        _check_weights(mask, q, k, isa=2)
    _check(SlidingWindowMask(30), q * 3, k * 3, v, g, isa=2, softcap=2.0)  # the portable tanh
    _check_weights(None, q * 3, k * 3, isa=2, softcap=2.0)


# --------------------------------------------------------------------------------------------- routing
@NEEDS_LIB
def test_routing_and_fallback() -> None:
    q = torch.randn(1, 2, 100, 16)
    assert which_backend(q, q, q, SlidingWindowMask(16)).name == "native_mask"
    assert which_backend(q, q, q, lambda b, h, qi, kv: qi >= kv).name == "native_mask"  # a bare mask_mod
    assert which_backend(q, q, q, SlidingWindowMask(16) & PaddingMask(torch.tensor([60]))).name == "native_mask"
    assert which_backend(q, q, q, CausalMask()).name == "sdpa"  # the fused kernel's own causal path
    assert which_backend(q, q, q, BlockedWindowMask(16)).name == "native_band"  # its own kernel
    assert which_backend(q.double(), q.double(), q.double(), SlidingWindowMask(16)).name != "native_mask"
    choice = which_backend(q, q, q, SlidingWindowMask(16), return_weights=True)  # weights on a path of their own
    assert (choice.name, choice.weights_from) == ("native_mask", "native_mask")
    choice = which_backend(q, q, q, CausalMask(), return_weights=True)
    assert (choice.name, choice.weights_from) == ("sdpa", "native_mask")
    assert which_backend(q, q, q, return_weights=True).name == "math"  # no mask: output and weights in one pass
    assert which_backend(q, q, q, SlidingWindowMask(16), return_weights=True, dropout_p=0.1).name == "math"
    qg = q.clone().requires_grad_()
    assert which_backend(qg, q, q, SlidingWindowMask(16), return_weights=True).name == "math"  # weights with grad
    why = which_backend(q.double(), q.double(), q.double(), SlidingWindowMask(16)).reasons["native_mask"]
    assert any("float64" in r for r in why)
    # the public entry point, with is_causal on top and a bare callable, against the reference
    out = scaled_dot_product_attention(q, q, q, lambda b, h, qi, kv: (qi - kv) % 2 == 0, is_causal=True)
    ref, _ = attention_reference(q.double(), q.double(), q.double(), MaskMod(lambda b, h, qi, kv: (qi - kv) % 2 == 0)
                                 & CausalMask())
    assert_close_to_reference(out, ref, reduction=100)


def test_float64_gradcheck_through_the_dense_fallback() -> None:
    q, k, v, _ = _inputs(1, 2, 1, 9, 11, 4, 3, torch.float64)
    for mask in (SlidingWindowMask(3) | SinkMask(1), DocumentMask(torch.tensor([0] * 4 + [1] * 7)) & CausalMask(
            "lower_right"), MaskMod(lambda b, h, qi, kv: (qi + kv) % 3 != 0)):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        assert torch.autograd.gradcheck(lambda a, b_, c, m=mask: scaled_dot_product_attention(a, b_, c, m), xs)


def test_multi_head_window_uses_the_exact_window() -> None:
    from attnkit.layers import MultiHeadAttention

    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, window=16).double()
    x = torch.randn(2, 90, 32, dtype=torch.float64)
    got = m(x, is_causal=True)
    m2 = MultiHeadAttention(32, 4).double()
    m2.load_state_dict(m.state_dict())
    want = m2(x, attn_mask=SlidingWindowMask(16).materialize(90, 90)[0, 0])
    assert_close_to_reference(got, want, reduction=90)


@NEEDS_LIB
@pytest.mark.parametrize("isa", ISAS)
def test_openmp_tasks_equal_the_thread_pool(isa, monkeypatch):  # type: ignore[no-untyped-def]
    """A threaded forward (two workers; GQA, per-row padding, per-head masks) gives bit for bit the same output on
    PyTorch's OpenMP threads (attnkit_mask_fwd_tasks) as on the Python thread pool (the same tasks), and it matches
    the float64 reference."""
    _skip_unless_isa(isa)
    from attnkit.functional import _native_bridge

    if not LIB.attnkit_openmp():
        pytest.skip("the library was built without OpenMP")
    monkeypatch.setattr(_native_bridge, "worker_count", lambda numel, workers: 2)  # threaded at any size
    per_head = MaskMod(lambda b, h, q, kv: (kv <= q) & ((q - kv < 300) | (h == 1)))
    mask = per_head & PaddingMask(torch.tensor([2000, 1701]))
    q, k, v, _ = _inputs(2, 4, 2, 2048, 2048, 64, 64, torch.float32)  # 8 rows of 32 query tiles: 4 tasks a worker
    outs = {}
    for flag in (True, False):
        monkeypatch.setattr(_native_bridge, "OPENMP_TASKS", flag)
        with torch.no_grad():
            outs[flag] = masked_attention(q, k, v, mask, 0.125, isa=isa)
    assert torch.equal(outs[True], outs[False])
    ref, _ = attention_reference(q.double(), k.double(), v.double(), mask._bind(2, 4), scale=0.125)
    assert_close_to_reference(outs[True], ref, reduction=2048)


# --------------------------------------------------------------------------------------------- exact weights
def _check_weights(mask, q, k, isa=2, softcap=None):  # type: ignore[no-untyped-def]
    """Native weights (attnkit_mask_weights) against the float64 reference's weights of the same inputs."""
    b, h, q_len, e = q.shape
    k_len = k.shape[2]
    w = masked_weights(q, k, mask, e**-0.5, isa=isa, softcap=softcap)
    v = torch.zeros(b, k.shape[1], k_len, 1, dtype=torch.float64)
    _, ref = attention_reference(q.double(), k.double(), v, None if mask is None else mask._bind(b, h),
                                 softcap=softcap)
    assert w.dtype == q.dtype and w.shape == (b, h, q_len, k_len)
    assert_close_to_reference(w, ref, reduction=k_len, msg="weights")
    return w


@NEEDS_LIB
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(_masks()))
def test_native_weights_match_reference(name, isa):  # type: ignore[no-untyped-def]
    _skip_unless_isa(isa)
    q, k, _, _ = _inputs(2, 4, 2, 203, 203, 24, 40, torch.float32)
    _check_weights(_masks()[name], q, k, isa)


@NEEDS_LIB
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("q_len", "k_len"), [(1, 203), (77, 203), (130, 70), (64, 64), (65, 129)])
def test_native_weights_lengths(q_len, k_len, isa):  # type: ignore[no-untyped-def]
    """Odd lengths, L != S, one query; masks with gaps between their key ranges (a sink before the window) and
    causal alignments; every entry outside the mask is exactly zero."""
    _skip_unless_isa(isa)
    q, k, _, _ = _inputs(1, 3, 1, q_len, k_len, 16, 16, torch.float32)
    for mask in (SlidingWindowMask(40), SlidingWindowMask(9) | SinkMask(3), MaskMod(lambda b, h, q, kv: q <= kv),
                 CausalMask("lower_right"), CausalMask() & PaddingMask(torch.tensor([k_len // 2 + 1]))):
        w = _check_weights(mask, q, k, isa)
        assert torch.equal(w.masked_fill(mask.materialize(q_len, k_len), 0.0), torch.zeros_like(w))


@NEEDS_LIB
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_weights_low_precision(dtype):  # type: ignore[no-untyped-def]
    q, k, _, _ = _inputs(1, 4, 2, 150, 150, 32, 32, dtype)
    for mask in (SlidingWindowMask(50) | SinkMask(2), DocumentMask(torch.arange(150) // 40) & CausalMask()):
        _check_weights(mask, q, k)


@NEEDS_LIB
@pytest.mark.parametrize("isa", ISAS)
def test_native_weights_hidden_nan_and_dead_rows(isa):  # type: ignore[no-untyped-def]
    """NaN keys the mask hides never reach a weight; rows that see nothing are all zero."""
    _skip_unless_isa(isa)
    n = 200
    hidden = torch.zeros(n, dtype=torch.bool)
    hidden[[3, 70, 71, 130, 199]] = True
    keep = ~hidden
    mask = MaskMod(lambda b, h, q, kv: keep[kv] & (kv <= q) & (q % 7 != 0))  # every 7th row sees nothing
    q, k, _, _ = _inputs(1, 2, 1, n, n, 16, 16, torch.float32)
    k_bad = k.clone()
    k_bad[:, :, hidden] = float("nan")
    w = masked_weights(q, k_bad, mask, 0.25, isa=isa)
    assert torch.isfinite(w).all()
    assert torch.equal(w[:, :, ::7], torch.zeros_like(w[:, :, ::7]))
    _, ref = attention_reference(q.double(), k.double(), torch.zeros(1, 1, n, 1, dtype=torch.float64),
                                 mask.materialize(n, n), scale=0.25)
    assert_close_to_reference(w, ref, reduction=n)


@NEEDS_LIB
@pytest.mark.parametrize("isa", ISAS)
def test_native_weights_openmp_tasks_equal_the_thread_pool(isa, monkeypatch):  # type: ignore[no-untyped-def]
    """Threaded weights (GQA, per-row padding, per-head masks) are bit for bit the same on PyTorch's OpenMP threads
    (attnkit_mask_weights_tasks) as on the Python thread pool, and match the float64 reference."""
    _skip_unless_isa(isa)
    from attnkit.functional import _native_bridge

    if not LIB.attnkit_openmp():
        pytest.skip("the library was built without OpenMP")
    monkeypatch.setattr(_native_bridge, "worker_count", lambda numel, workers: 2)  # threaded at any size
    per_head = MaskMod(lambda b, h, q, kv: (kv <= q) & ((q - kv < 300) | (h == 1)))
    mask = per_head & PaddingMask(torch.tensor([700, 501]))
    q, k, _, _ = _inputs(2, 4, 2, 700, 700, 64, 64, torch.float32)
    ws = {}
    for flag in (True, False):
        monkeypatch.setattr(_native_bridge, "OPENMP_TASKS", flag)
        ws[flag] = masked_weights(q, k, mask, 0.125, isa=isa)
    assert torch.equal(ws[True], ws[False])
    _, ref = attention_reference(q.double(), k.double(), torch.zeros(2, 2, 700, 1, dtype=torch.float64),
                                 mask._bind(2, 4), scale=0.125)
    assert_close_to_reference(ws[True], ref, reduction=700)


@NEEDS_LIB
def test_public_weights_use_the_native_path_and_keep_the_output() -> None:
    """return_weights=True with a mask object: the output is the one computed without weights (same kernel), the
    weights equal attention_weights' and the reference; with grad, the math path gives differentiable weights."""
    q, k, v, _ = _inputs(1, 4, 2, 150, 150, 32, 32, torch.float32)
    mask = SlidingWindowMask(40) | SinkMask(2)
    out, w = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
    assert torch.equal(out, scaled_dot_product_attention(q, k, v, mask))
    assert torch.equal(w, attention_weights(q, k, mask))
    ref, ref_w = attention_reference(q.double(), k.double(), v.double(), mask)
    assert_close_to_reference(w, ref_w, reduction=150)
    assert_close_to_reference(out, ref, reduction=150)
    qg = q.clone().requires_grad_()
    wg = attention_weights(qg, k, mask)
    (wg * torch.arange(150.0)).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
