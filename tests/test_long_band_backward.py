"""The causal sliding window's tiled backward (attnkit.functional.local._band_backward) against the dense reference.

The fast path's forward runs PyTorch's flash kernel per piece; its backward recomputes the probabilities tile by tile
with batched matrix products, optionally split over threads by rows of B*H. These tests pin the gradients of every
variant (threads, tile shapes, look-backs, GQA, low precision) to the dense masked reference.
"""

from __future__ import annotations

import pytest
import torch

from attnkit._runtime import torch_threads
from attnkit.functional import BlockedWindowMask, attention_reference, sliding_window_attention
from attnkit.functional import _threads as threads_mod
from attnkit.functional import local as local_mod
from attnkit.testing import assert_close_to_reference


def _inputs(b, h, hkv, n, e, ev, dtype=torch.float64):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(n * 7 + h)
    q = torch.randn(b, h, n, e, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, n, e, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, n, ev, generator=gen, dtype=dtype)
    return q, k, v


def _grads(fn, q, k, v, g):  # type: ignore[no-untyped-def]
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad((out * g).sum(), (q, k, v)))


def _assert_close(got, want, reduction):  # type: ignore[no-untyped-def]
    """Output and its gradients (dq, dk, dv), each against the float64 reference at the attnkit.testing policy."""
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_to_reference(a, b, reduction=reduction, grad=name != "out", msg=name)


def _dense(window, back):  # type: ignore[no-untyped-def]
    def fn(q, k, v):  # type: ignore[no-untyped-def]
        rep = q.shape[1] // k.shape[1]
        mask = BlockedWindowMask(window, look_backward=back).materialize(q.shape[2], k.shape[2])
        return attention_reference(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), mask)[0]

    return fn


@pytest.mark.parametrize(
    "n, window, back, hkv, threads",
    [(300, 64, 1, 3, 2), (300, 200, 1, 1, 2), (260, 128, 2, 1, 1), (150, 32, 0, 3, 2), (77, 16, 3, 1, 3)],
    ids=lambda x: str(x),
)
def test_band_backward_matches_dense_reference(n, window, back, hkv, threads, monkeypatch):  # type: ignore[no-untyped-def]
    """Threads split B*H (threads=3 over B*H=6 gives uneven parts); windows above the 128-row tile give ragged tiles."""
    monkeypatch.setattr(threads_mod, "MIN_THREADED", 0)  # small inputs would stay in one thread
    q, k, v = _inputs(2, 3, hkv, n, 16, 8)
    g = torch.randn(2, 3, n, 8, dtype=torch.float64)
    with torch_threads(threads):
        got = _grads(lambda q, k, v: sliding_window_attention(q, k, v, window=window, look_backward=back), q, k, v, g)
        assert torch.get_num_threads() == threads  # the backward gave the thread count back
    want = _grads(_dense(window, back), q, k, v, g)
    _assert_close(got, want, min(n, window * (back + 1)))


def test_band_backward_threads_equal_one_thread() -> None:
    """The split over threads changes nothing: bit-for-bit the same gradients as one worker."""
    bh, n, w = 4, 512, 128
    plan = local_mod._band_plan(n, w, 1)
    q, k, v = (torch.randn(bh, n, 32) for _ in range(3))
    out, lse = torch.randn(bh, n, 32), torch.randn(bh, n, 1) + 5.0
    grad = torch.randn(bh, n, 32)
    one = local_mod._band_backward(grad, q, k, v, out, lse, plan, 0.2, workers=1)
    two = local_mod._band_backward(grad, q, k, v, out, lse, plan, 0.2, workers=2)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_band_backward_low_precision() -> None:
    """bfloat16 gradients (computed in float32 inside) follow the float64 reference."""
    q, k, v = _inputs(1, 2, 2, 200, 16, 16)
    g = torch.randn(1, 2, 200, 16, dtype=torch.float64)
    q, k, v, g = (t.bfloat16() for t in (q, k, v, g))
    got = _grads(lambda q, k, v: sliding_window_attention(q, k, v, window=64), q, k, v, g)
    assert all(a.dtype == torch.bfloat16 for a in got)
    want = _grads(_dense(64, 1), *(t.double() for t in (q, k, v, g)))  # the same rounded inputs, in float64
    _assert_close(got, want, 128)


@pytest.mark.parametrize("back", [1, 2])
def test_band_backward_splits_buckets_when_rows_are_few(back, monkeypatch):  # type: ignore[no-untyped-def]
    """B*H = 1 with 2 threads: each row's buckets are split between tasks, key gradients summed from their buffers."""
    monkeypatch.setattr(threads_mod, "MIN_THREADED", 0)
    q, k, v = _inputs(1, 1, 1, 333, 8, 8)
    g = torch.randn(1, 1, 333, 8, dtype=torch.float64)
    with torch_threads(2):
        got = _grads(lambda q, k, v: sliding_window_attention(q, k, v, window=32, look_backward=back), q, k, v, g)
    want = _grads(_dense(32, back), q, k, v, g)
    _assert_close(got, want, 32 * (back + 1))
