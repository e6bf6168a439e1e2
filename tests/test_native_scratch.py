"""The block engine's scratch pool (csrc/band.c: bk_scratch / bk_release, read through _native.scratch_held and
_native.release_scratch): buffers handed back are kept for the next call within the pool's bounds, results do not
depend on whether a buffer is kept or fresh, and calls from several threads at once share the pool safely."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from attnkit.functional import DocumentMask, SlidingWindowMask, _native
from attnkit.functional.masked import masked_attention

pytestmark = pytest.mark.skipif(_native.load() is None, reason=f"native kernel unavailable: {_native.status()}")

POOL_ALL = 64 << 20  # BK_POOL_ALL in band.c


def _qkv(n: int, heads: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, n, 64, generator=gen) for _ in range(3))


def test_kept_buffers_give_the_same_results_as_fresh_ones() -> None:
    q, k, v = _qkv(1000)
    mask = SlidingWindowMask(100)
    _native.release_scratch()
    assert _native.scratch_held() == 0
    fresh = masked_attention(q, k, v, mask, 0.125)
    held = _native.scratch_held()
    assert 0 < held <= POOL_ALL
    kept = masked_attention(q, k, v, mask, 0.125)  # runs on the kept buffers
    assert torch.equal(fresh, kept)
    assert _native.scratch_held() == held  # taken and handed back: nothing new allocated
    _native.release_scratch()
    assert _native.scratch_held() == 0
    assert torch.equal(masked_attention(q, k, v, mask, 0.125), fresh)


def test_the_pool_stays_within_its_bound() -> None:
    _native.release_scratch()
    for n, window in ((140_000, 32), (3000, 700), (20_000, 64)):  # transposed keys of up to ~9 MiB per task
        q, k, v = _qkv(n, heads=1, seed=n)
        masked_attention(q, k, v, SlidingWindowMask(window), 0.125)
        assert _native.scratch_held() <= POOL_ALL
    _native.release_scratch()
    assert _native.scratch_held() == 0


def test_calls_from_several_threads_share_the_pool() -> None:
    cases = [(_qkv(700 + 97 * i, seed=i), DocumentMask(torch.arange(700 + 97 * i) // 300)) for i in range(6)]
    alone = [masked_attention(*qkv, mask, 0.125) for qkv, mask in cases]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda c: masked_attention(*c[0], c[1], 0.125), cases * 3))
    for i, out in enumerate(together):
        assert torch.equal(out, alone[i % len(cases)])
    assert _native.scratch_held() <= POOL_ALL
