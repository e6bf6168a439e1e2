"""The native sliding-window kernel (csrc/band.c) against the dense float64 reference: forward, log-sum-exp free
gradients, every instruction-set body, the thread splits, low precision, and the keys it must never read."""

from __future__ import annotations

import pytest
import torch

from attnkit._runtime import torch_threads
from attnkit.functional import BlockedWindowMask, _native, attention_reference, sliding_window_attention
from attnkit.functional import _native_bridge as bridge_mod
from attnkit.functional import _threads as threads_mod
from attnkit.functional import local as local_mod
from attnkit.testing import assert_close_to_reference

LIB = _native.load()
NEEDS_LIB = pytest.mark.skipif(LIB is None, reason=f"native kernel unavailable: {_native.status()}")
ISAS = [pytest.param(2, id="avx512"), pytest.param(1, id="build-target")]


def _inputs(b, h, hkv, n, e, ev, seed=0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed + 31 * n + e)
    q = torch.randn(b, h, n, e, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, n, e, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, n, ev, generator=gen, dtype=torch.float64)
    return q, k, v


def _dense(win):  # type: ignore[no-untyped-def]
    def fn(q, k, v):  # type: ignore[no-untyped-def]
        rep = q.shape[1] // k.shape[1]
        mask = win.materialize(q.shape[2], k.shape[2])
        return attention_reference(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), mask)[0]

    return fn


def _grads(fn, q, k, v, g, dtype):  # type: ignore[no-untyped-def]
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad((out * g.to(dtype)).sum(), (q, k, v)))


def _rounded(dtype, *tensors):  # type: ignore[no-untyped-def]
    """The float64 values of ``tensors`` rounded to ``dtype``: the reference sees the inputs the kernel sees."""
    return tuple(t.to(dtype).double() for t in tensors)


def _span(n: int, window: int, back: int = 1, ahead: int = 0) -> int:
    """Keys one query sees (and queries one key is seen by): the reduction length of the windowed attention."""
    return min(n, window * (back + 1 + ahead))


def _assert_close(got, want, reduction):  # type: ignore[no-untyped-def]
    """Output and its gradients (dq, dk, dv), each against the float64 reference at the attnkit.testing policy."""
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_to_reference(a, b, reduction=reduction, grad=name != "out", msg=name)


def _native_fn(win, isa):  # type: ignore[no-untyped-def]
    return lambda q, k, v: local_mod.window_native(q, k, v, win, q.shape[-1] ** -0.5, isa)


def _skip_unless_isa(isa: int) -> None:
    if LIB is None:
        pytest.skip(f"native kernel unavailable: {_native.status()}")
    if isa == 2 and LIB.attnkit_band_isa() != 2:
        pytest.skip("this CPU (or build) has no AVX-512 body")


CASES = [  # n, window, look_backward, look_forward, causal
    (37, 8, 1, 0, True),  # n and the window below one key block, rows not a multiple of 4
    (300, 64, 1, 0, True),
    (1000, 128, 2, 0, True),  # several key blocks per tile, ragged last tile
    (131, 20, 3, 0, True),  # a window that is no multiple of 4 or 16
    (150, 32, 0, 0, True),  # only its own bucket
    (77, 16, 1, 1, False),  # two-sided window
    (200, 50, 2, 2, False),
    (90, 100, 1, 0, True),  # one bucket, longer than the sequence
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n, window, back, ahead, causal", CASES, ids=lambda x: str(x))
def test_native_window_matches_dense_reference(isa, n, window, back, ahead, causal):  # type: ignore[no-untyped-def]
    _skip_unless_isa(isa)
    win = BlockedWindowMask(window, look_backward=back, look_forward=ahead, causal=causal)
    q, k, v = _inputs(2, 4, 2, n, 24, 8)  # GQA, E and Ev padded to 32 and 16 inside
    g = torch.randn(2, 4, n, 8, dtype=torch.float64)
    got = _grads(_native_fn(win, isa), q, k, v, g, torch.float32)
    want = _grads(_dense(win), *_rounded(torch.float32, q, k, v, g), torch.float64)
    assert all(t.dtype == torch.float32 for t in got)
    _assert_close(got, want, _span(n, window, back, ahead))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("e, ev, hkv", [(64, 64, 8), (16, 48, 1), (13, 40, 2), (128, 16, 4)], ids=str)
def test_native_window_head_dims_and_groups(isa, e, ev, hkv):  # type: ignore[no-untyped-def]
    """Head dims that fill one to several microkernel widths (and odd ones, zero-padded), MHA / GQA / MQA."""
    _skip_unless_isa(isa)
    win = BlockedWindowMask(64)
    q, k, v = _inputs(1, 8, hkv, 200, e, ev)
    g = torch.randn(1, 8, 200, ev, dtype=torch.float64)
    got = _grads(_native_fn(win, isa), q, k, v, g, torch.float32)
    want = _grads(_dense(win), *_rounded(torch.float32, q, k, v, g), torch.float64)
    _assert_close(got, want, _span(200, 64))


@NEEDS_LIB
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_native_window_low_precision(dtype):  # type: ignore[no-untyped-def]
    """bfloat16 / float16 inputs: computed in float32, results and gradients in the input dtype."""
    win = BlockedWindowMask(32)
    q, k, v = _inputs(1, 2, 2, 130, 16, 16)
    g = torch.randn(1, 2, 130, 16, dtype=torch.float64)
    got = _grads(lambda a, b, c: sliding_window_attention(a, b, c, window=32, impl="native"), q, k, v, g, dtype)
    assert all(t.dtype == dtype for t in got)
    # the reference sees the same rounded inputs, so only the kernel's own rounding is compared
    want = _grads(_dense(win), *_rounded(dtype, q, k, v, g), torch.float64)
    _assert_close(got, want, _span(130, 32))


@NEEDS_LIB
@pytest.mark.parametrize("b, h, threads", [(1, 1, 2), (1, 2, 2), (2, 3, 3), (1, 8, 2)], ids=str)
def test_native_window_thread_splits(b, h, threads, monkeypatch):  # type: ignore[no-untyped-def]
    """Fewer rows than twice the threads: rows are cut into bucket ranges with their own key-gradient buffers.
    Whatever the split, the result equals the reference, and each configuration is deterministic run to run."""
    monkeypatch.setattr(threads_mod, "MIN_THREADED", 0)
    win = BlockedWindowMask(32, look_backward=2)
    q, k, v = _inputs(b, h, h, 333, 16, 16)
    g = torch.randn(b, h, 333, 16, dtype=torch.float64)
    with torch_threads(threads):
        got = _grads(lambda a, b_, c: sliding_window_attention(a, b_, c, window=32, look_backward=2), q, k, v, g,
                     torch.float32)
        again = _grads(lambda a, b_, c: sliding_window_attention(a, b_, c, window=32, look_backward=2), q, k, v, g,
                       torch.float32)
        assert torch.get_num_threads() == threads
    want = _grads(_dense(win), *_rounded(torch.float32, q, k, v, g), torch.float64)
    for a, a2 in zip(got, again, strict=True):
        assert torch.equal(a, a2), "two runs of the same split differ"
    _assert_close(got, want, _span(333, 32, back=2))


@NEEDS_LIB
def test_native_bucket_tasks_cover_every_bucket_once() -> None:
    for rows, nb, workers in [(1, 1, 2), (1, 7, 2), (3, 5, 4), (8, 32, 2), (2, 3, 1)]:
        tasks = bridge_mod.bucket_tasks(rows, nb, workers)
        seen = sorted((row, b) for row, b0, b1 in tasks for b in range(b0, b1))
        assert seen == [(row, b) for row in range(rows) for b in range(nb)]
        assert len(tasks) >= min(rows * nb, 2 * workers) or workers == 1


@NEEDS_LIB
@pytest.mark.parametrize("causal", [True, False])
def test_native_window_never_reads_outside_the_windows(causal):  # type: ignore[no-untyped-def]
    """Keys and values of bucket 1 are NaN: only the queries whose window holds bucket 1 may see it."""
    n, w = 200, 32
    win = BlockedWindowMask(w, causal=causal, look_forward=0 if causal else 1)
    q, k, v = (t.float() for t in _inputs(1, 2, 2, n, 16, 16))
    ref = _dense(win)(q.double(), k.double(), v.double())
    kp, vp = k.clone(), v.clone()
    kp[:, :, w : 2 * w] = float("nan")
    vp[:, :, w : 2 * w] = float("nan")
    out = sliding_window_attention(q, kp, vp, window=w, causal=causal, look_forward=0 if causal else 1,
                                   impl="native")
    clean = slice(3 * w, n)  # buckets 3.. look back one bucket at most (bucket 2): never bucket 1
    assert torch.isfinite(out[:, :, clean]).all()
    assert_close_to_reference(out[:, :, clean], ref[:, :, clean], reduction=_span(n, w, ahead=0 if causal else 1))
    if not causal:  # bucket 0 looks forward to bucket 1 only; bucket 0 rows are poisoned, bucket 3 is not
        assert torch.isnan(out[:, :, :w]).all()


@NEEDS_LIB
def test_native_equals_torch_path_and_impl_errors() -> None:
    q, k, v = (torch.randn(1, 2, 257, 32) for _ in range(3))
    native = sliding_window_attention(q, k, v, window=64, impl="native")
    flash = sliding_window_attention(q, k, v, window=64, impl="torch")
    ref = _dense(BlockedWindowMask(64))(q.double(), k.double(), v.double())
    assert_close_to_reference(native, ref, reduction=_span(257, 64), msg="native")  # each against the reference,
    assert_close_to_reference(flash, ref, reduction=_span(257, 64), msg="torch")  # never one against the other
    torch.testing.assert_close(sliding_window_attention(q, k, v, window=64), native, atol=0, rtol=0)  # auto
    for name, same in (("native_band", native), ("flash_pieces", flash)):  # impl= by backend name
        torch.testing.assert_close(sliding_window_attention(q, k, v, window=64, impl=name), same, atol=0, rtol=0)
    blockwise = sliding_window_attention(q, k, v, window=64, impl="window_blockwise")
    assert_close_to_reference(blockwise, ref, reduction=_span(257, 64), msg="window_blockwise")
    with pytest.raises(ValueError, match="key padding"):
        sliding_window_attention(q, k, v, window=64, impl="flash_pieces", key_mask=torch.ones(1, 257, dtype=torch.bool))
    with pytest.raises(ValueError, match="native"):
        sliding_window_attention(q.double(), k.double(), v.double(), window=64, impl="native")
    with pytest.raises(ValueError, match="L == S"):
        sliding_window_attention(q[:, :, :100], k, v, window=64, impl="native")
    with pytest.raises(ValueError, match="impl"):
        sliding_window_attention(q, k, v, window=64, impl="fast")
    assert local_mod.native_unsupported(q.double(), "auto").startswith("torch.float64")
    assert local_mod.native_unsupported(q, "torch") == "impl='torch'"


@NEEDS_LIB
def test_native_window_at_benchmark_scale() -> None:
    """The benchmark's shape (window 512, E=64) on a shorter sequence, against the float64 reference."""
    win = BlockedWindowMask(512)
    q, k, v = _inputs(1, 2, 2, 1536, 64, 64)
    g = torch.randn(1, 2, 1536, 64, dtype=torch.float64)
    got = _grads(lambda a, b, c: sliding_window_attention(a, b, c, window=512), q, k, v, g, torch.float32)
    want = _grads(_dense(win), *_rounded(torch.float32, q, k, v, g), torch.float64)
    _assert_close(got, want, _span(1536, 512))


@NEEDS_LIB
def test_native_portable_build_matches_reference(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """ATTNKIT_NATIVE_SIMD=0: the portable C body alone (what a CPU without AVX2 or another architecture runs)."""
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("ATTNKIT_NATIVE_SIMD", "0")
    lib, why = _native._build()
    assert lib is not None and lib.attnkit_band_isa() == 0 and "sliding window: portable C" in why
    monkeypatch.setattr(_native, "load", lambda: lib)
    win = BlockedWindowMask(40, look_backward=2)
    q, k, v = _inputs(1, 2, 1, 170, 16, 32)
    g = torch.randn(1, 2, 170, 32, dtype=torch.float64)
    got = _grads(_native_fn(win, 2), q, k, v, g, torch.float32)  # asks for AVX-512, gets the portable body
    want = _grads(_dense(win), *_rounded(torch.float32, q, k, v, g), torch.float64)
    _assert_close(got, want, _span(170, 40, back=2))


def test_without_native_library_auto_runs_the_torch_path(monkeypatch):  # type: ignore[no-untyped-def]
    """No compiler (or ATTNKIT_NATIVE=0): 'auto' takes PyTorch's flash pieces, 'native' says why it cannot run."""
    monkeypatch.setattr(_native, "load", lambda: None)
    q, k, v = (torch.randn(1, 2, 100, 16) for _ in range(3))
    assert local_mod.native_unsupported(q, "auto").startswith("no native library")
    out = sliding_window_attention(q, k, v, window=16)
    torch.testing.assert_close(out, sliding_window_attention(q, k, v, window=16, impl="torch"), atol=0, rtol=0)
    with pytest.raises(ValueError, match="no native library"):
        sliding_window_attention(q, k, v, window=16, impl="native")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("causal", [True, False])
def test_native_window_right_padding(isa, causal):  # type: ignore[no-untyped-def]
    """Right padding (a PaddingMask, or a key_mask of that form) runs natively: padded keys are never read (they are
    NaN here), and queries whose window holds only padding give zeros with zero gradients."""
    _skip_unless_isa(isa)
    n, w = 230, 32
    lengths = torch.tensor([230, 97, 0])  # full, padded mid-bucket, all padding
    win = BlockedWindowMask(w, causal=causal, look_forward=0 if causal else 1)
    key_mask = torch.arange(n) < lengths.view(-1, 1)  # (B, S)
    q, k, v = _inputs(3, 2, 1, n, 16, 16)
    kp, vp = k.clone(), v.clone()
    kp.masked_fill_(~key_mask.view(3, 1, n, 1), float("nan"))
    vp.masked_fill_(~key_mask.view(3, 1, n, 1), float("nan"))
    g = torch.randn(3, 2, n, 16, dtype=torch.float64)

    def native(a, b, c):  # type: ignore[no-untyped-def]
        return local_mod.window_native(a, b, c, win, 16**-0.5, isa, lengths=lengths)

    def dense(a, b, c):  # type: ignore[no-untyped-def]
        mask = win.materialize(n, n) & key_mask.view(3, 1, 1, n)
        b, c = (t.masked_fill(~key_mask.view(3, 1, n, 1), 0.0) for t in (b, c))
        return attention_reference(a, b.repeat_interleave(2, 1), c.repeat_interleave(2, 1), mask)[0]

    got = _grads(native, q, kp, vp, g, torch.float32)
    want = _grads(dense, *_rounded(torch.float32, q, k, v, g), torch.float64)
    assert all(torch.isfinite(t).all() for t in got)
    dead = (win.materialize(n, n)[0, 0] & key_mask.view(3, 1, n)).sum(-1) == 0  # (B, L): rows that see nothing
    assert dead[2].all() and dead.sum() > n
    assert (got[0].transpose(1, 2)[dead] == 0).all() and (got[1].transpose(1, 2)[dead] == 0).all()
    # key and value gradients: padded keys get none (the reference's are zeros there too)
    want = (*want[:2], *(b.masked_fill(~key_mask.view(3, 1, n, 1), 0.0) for b in want[2:]))
    _assert_close(got, want, _span(n, w, ahead=0 if causal else 1))


@NEEDS_LIB
def test_padding_routes_natively_and_left_padding_stays_blockwise(monkeypatch):  # type: ignore[no-untyped-def]
    from attnkit.functional import PaddingMask, scaled_dot_product_attention

    calls = []
    real = local_mod.window_native
    monkeypatch.setattr(local_mod, "window_native", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = (torch.randn(2, 2, 150, 16) for _ in range(3))
    mask = BlockedWindowMask(32) & PaddingMask(torch.tensor([150, 60]))
    out = scaled_dot_product_attention(q, k, v, mask)  # the dispatcher's local backend
    assert len(calls) == 1 and calls[0]["lengths"].tolist() == [150, 60]
    ref = attention_reference(q.double(), k.double(), v.double(), mask)[0]
    assert_close_to_reference(out, ref, reduction=_span(150, 32))
    left = torch.ones(2, 150, dtype=torch.bool)
    left[1, :10] = False  # left padding: not of the native kernel's form
    out = sliding_window_attention(q, k, v, window=32, key_mask=left)
    assert len(calls) == 1
    ref = attention_reference(q.double(), k.double(), v.double(), BlockedWindowMask(32).materialize(150, 150)
                              & left.view(2, 1, 1, 150))[0]
    assert_close_to_reference(out, ref, reduction=_span(150, 32))
    with pytest.raises(ValueError, match="right padding"):
        sliding_window_attention(q, k, v, window=32, key_mask=left, impl="native")


def test_which_backend_names_each_window_backend(monkeypatch):  # type: ignore[no-untyped-def]
    from attnkit.functional import PaddingMask, which_backend

    q = torch.randn(1, 2, 256, 32)
    choice = which_backend(q, q, q, BlockedWindowMask(64) & PaddingMask(torch.tensor([200])))
    if LIB is not None:
        assert choice.name == "native_band" and "kernel: native C kernel" in str(choice)
    double = which_backend(q.double(), q.double(), q.double(), BlockedWindowMask(64))
    assert double.name == "flash_pieces" and "float64" in " ".join(double.reasons["native_band"])
    padded = which_backend(q.double(), q.double(), q.double(), BlockedWindowMask(64) & PaddingMask(torch.tensor([200])))
    assert padded.name == "window_blockwise" and "key padding" in " ".join(padded.reasons["flash_pieces"])
    monkeypatch.setattr(_native, "load", lambda: None)
    choice = which_backend(q, q, q, BlockedWindowMask(64))
    assert choice.name == "flash_pieces" and "no native library" in " ".join(choice.reasons["native_band"])
