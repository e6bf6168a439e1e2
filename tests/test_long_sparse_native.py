"""The native kernel (csrc/band.c) on block-sparse layouts against the dense float64 reference: forward and
gradients, both instruction-set bodies, per-head layouts, L != S, right padding, thread splits, and the blocks it
must never read."""

from __future__ import annotations

import pytest
import torch

from attnkit._runtime import torch_threads
from attnkit.functional import (
    BlockSparseMask,
    _native,
    attention_reference,
    bigbird_layout,
    block_sparse_attention,
    fixed_layout,
    local_layout,
    strided_layout,
)
from attnkit.functional import _threads as threads_mod
from attnkit.functional import sparse as sparse_mod
from attnkit.testing import assert_close_to_reference

LIB = _native.load()
NEEDS_LIB = pytest.mark.skipif(LIB is None, reason=f"native kernel unavailable: {_native.status()}")
ISAS = [pytest.param(2, id="avx512"), pytest.param(1, id="build-target")]


def _inputs(b, h, hkv, q_len, k_len, e, ev, seed=0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed + q_len + 7 * k_len)
    q = torch.randn(b, h, q_len, e, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, k_len, e, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, k_len, ev, generator=gen, dtype=torch.float64)
    return q, k, v


def _grads(fn, q, k, v, g, dtype):  # type: ignore[no-untyped-def]
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad((out * g.to(dtype)).sum(), (q, k, v)))


def _dense(layout, bs, causal, key_mask=None):  # type: ignore[no-untyped-def]
    def fn(q, k, v):  # type: ignore[no-untyped-def]
        mask = BlockSparseMask(layout, bs, causal=causal).materialize(q.shape[2], k.shape[2])
        if key_mask is not None:
            mask = mask & key_mask.view(key_mask.shape[0], 1, 1, -1)
        rep = q.shape[1] // k.shape[1]
        return attention_reference(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), mask)[0]

    return fn


def _native_fn(layout, bs, causal, isa, lengths=None):  # type: ignore[no-untyped-def]
    def fn(q, k, v):  # type: ignore[no-untyped-def]
        fitted = sparse_mod._fit_layout(layout, q.shape[2], k.shape[2], bs)
        return sparse_mod._sparse_native(q, k, v, fitted, bs, causal, q.shape[-1] ** -0.5, lengths, isa)

    return fn


def _rounded(dtype, *tensors):  # type: ignore[no-untyped-def]
    """The float64 values of ``tensors`` rounded to ``dtype``: the reference sees the inputs the kernel sees."""
    return tuple(t.to(dtype).double() for t in tensors)


def _reduction(layout, bs, causal, q_len, k_len):  # type: ignore[no-untyped-def]
    """The longest reduction: most keys one query reads, or most queries that read one key (for dk, dv)."""
    mask = BlockSparseMask(layout, bs, causal=causal).materialize(q_len, k_len)
    return int(max(mask.sum(-1).max(), mask.sum(-2).max(), 1))


def _check(got, want, reduction):  # type: ignore[no-untyped-def]
    """Output and its gradients (dq, dk, dv), each against the float64 reference at the attnkit.testing policy."""
    assert all(torch.isfinite(t).all() for t in got)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_to_reference(a, b, reduction=reduction, grad=name != "out", msg=name)


def _skip_unless_isa(isa: int) -> None:
    if LIB is None:
        pytest.skip(f"native kernel unavailable: {_native.status()}")
    if isa == 2 and LIB.attnkit_band_isa() != 2:
        pytest.skip("this CPU (or build) has no AVX-512 body")


def _random_heads() -> torch.Tensor:
    layout = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.6  # per head
    layout[1, 2] = False  # a query block that sees nothing: zeros
    return layout


LAYOUTS = [  # name, layout, block size, causal, L, S
    ("strided-causal", strided_layout(8, stride=3), 64, True, 500, 500),
    ("fixed-causal", fixed_layout(10, stride=4), 32, True, 300, 300),
    ("bigbird", bigbird_layout(8, window=3, n_global=1, n_random=2, seed=0), 64, False, 512, 512),
    ("local-block-100", local_layout(4, look_backward=1), 100, True, 333, 333),  # blocks of 100: ragged tiles
    ("per-head-random", _random_heads(), 16, False, 90, 90),
    ("L<S", bigbird_layout(7, seed=1), 16, False, 70, 100),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name, layout, bs, causal, q_len, k_len", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_native_sparse_matches_dense_reference(isa, name, layout, bs, causal, q_len, k_len):  # type: ignore[no-untyped-def]
    _skip_unless_isa(isa)
    q, k, v = _inputs(2, 2, 1, q_len, k_len, 24, 8)
    g = torch.randn(2, 2, q_len, 8, dtype=torch.float64)
    got = _grads(_native_fn(layout, bs, causal, isa), q, k, v, g, torch.float32)
    want = _grads(_dense(layout, bs, causal), *_rounded(torch.float32, q, k, v, g), torch.float64)
    _check(got, want, _reduction(layout, bs, causal, q_len, k_len))
    if name == "per-head-random":  # head 1, query block 2 reads nothing: zero outputs and query gradients
        assert (got[0][:, 1, 32:48] == 0).all() and (got[1][:, 1, 32:48] == 0).all()


@NEEDS_LIB
@pytest.mark.parametrize("causal", [True, False])
def test_native_sparse_right_padding_never_reads_padding_or_unused_blocks(causal):  # type: ignore[no-untyped-def]
    n, bs = 256, 32
    layout = strided_layout(8, stride=4, causal=causal)
    lengths = torch.tensor([256, 150])
    key_mask = torch.arange(n) < lengths.view(2, 1)
    q, k, v = _inputs(2, 2, 2, n, n, 16, 16)
    kp, vp = k.clone(), v.clone()
    kp.masked_fill_(~key_mask.view(2, 1, n, 1), float("nan"))  # padding
    vp.masked_fill_(~key_mask.view(2, 1, n, 1), float("nan"))
    used = BlockSparseMask(layout, bs, causal=causal).materialize(n, n)[0, 0].any(0)  # keys some query reads
    kp[:, :, ~used] = float("nan")  # (none here for strided, but the check stays honest if the layout changes)
    g = torch.randn(2, 2, n, 16, dtype=torch.float64)
    got = _grads(lambda a, b, c: block_sparse_attention(a, b, c, layout, block_size=bs, causal=causal,
                                                        key_mask=key_mask, impl="native"), q, kp, vp, g,
                 torch.float32)
    clean = (t.masked_fill(~key_mask.view(2, 1, n, 1), 0.0) for t in (k, v))
    want = _grads(_dense(layout, bs, causal, key_mask), *_rounded(torch.float32, q, *clean, g), torch.float64)
    _check(got, want, _reduction(layout, bs, causal, n, n))


@NEEDS_LIB
@pytest.mark.parametrize("b, h, threads", [(1, 1, 2), (1, 2, 3), (2, 2, 2)], ids=str)
def test_native_sparse_thread_splits(b, h, threads, monkeypatch):  # type: ignore[no-untyped-def]
    """Rows cut into ranges of query blocks with their own key-gradient buffers equal the reference, run to run."""
    monkeypatch.setattr(threads_mod, "MIN_THREADED", 0)
    layout = bigbird_layout(12, window=3, n_global=1, n_random=2, seed=4)
    q, k, v = _inputs(b, h, h, 384, 384, 16, 16)
    g = torch.randn(b, h, 384, 16, dtype=torch.float64)

    def fn(a, b_, c):  # type: ignore[no-untyped-def]
        return block_sparse_attention(a, b_, c, layout, block_size=32)

    with torch_threads(threads):
        got = _grads(fn, q, k, v, g, torch.float32)
        again = _grads(fn, q, k, v, g, torch.float32)
    for a, a2 in zip(got, again, strict=True):
        assert torch.equal(a, a2)
    want = _grads(_dense(layout, 32, False), *_rounded(torch.float32, q, k, v, g), torch.float64)
    _check(got, want, _reduction(layout, 32, False, 384, 384))


@NEEDS_LIB
def test_native_sparse_routing_and_errors() -> None:
    q, k, v = (torch.randn(2, 2, 128, 16) for _ in range(3))
    layout = local_layout(4)
    native = block_sparse_attention(q, k, v, layout, block_size=32, impl="native")
    flash = block_sparse_attention(q, k, v, layout, block_size=32, impl="torch")
    ref = _dense(layout, 32, False)(q.double(), k.double(), v.double())
    n = _reduction(layout, 32, False, 128, 128)
    assert_close_to_reference(native, ref, reduction=n, msg="native")  # each against the reference,
    assert_close_to_reference(flash, ref, reduction=n, msg="torch")  # never one against the other
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout, block_size=32), native, atol=0, rtol=0)
    for name, same in (("native_block_sparse", native), ("torch_block_sparse", flash)):  # impl= by backend name
        torch.testing.assert_close(block_sparse_attention(q, k, v, layout, block_size=32, impl=name), same, atol=0,
                                   rtol=0)
    left = torch.ones(2, 128, dtype=torch.bool)
    left[0, :5] = False  # not right padding: the PyTorch path serves it
    ref = _dense(layout, 32, False, left)(q.double(), k.double(), v.double())
    out = block_sparse_attention(q, k, v, layout, block_size=32, key_mask=left)
    assert_close_to_reference(out, ref, reduction=n)
    with pytest.raises(ValueError, match="right padding"):
        block_sparse_attention(q, k, v, layout, block_size=32, key_mask=left, impl="native")
    with pytest.raises(ValueError, match="float64"):
        block_sparse_attention(q.double(), k.double(), v.double(), layout, block_size=32, impl="native")
    with pytest.raises(ValueError, match="impl"):
        block_sparse_attention(q, k, v, layout, block_size=32, impl="fast")


@NEEDS_LIB
def test_native_sparse_low_precision() -> None:
    layout = bigbird_layout(4, seed=0)
    q, k, v = (t.to(torch.bfloat16) for t in _inputs(1, 2, 2, 128, 128, 16, 16))
    out = block_sparse_attention(q, k, v, layout, block_size=32)
    assert out.dtype == torch.bfloat16
    ref = _dense(layout, 32, False)(q.double(), k.double(), v.double())
    assert_close_to_reference(out, ref, reduction=_reduction(layout, 32, False, 128, 128))
