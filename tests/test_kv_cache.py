"""KV-cache decoding equals full recomputation; cache growth; the sliding-window ring buffer stays bounded."""

from __future__ import annotations

import copy

import pytest
import torch

from attnkit.layers import (
    ALiBiPosition,
    KVCache,
    LearnedPosition,
    MultiHeadAttention,
    RingKVCache,
    RotaryPosition,
    ShawRelative,
    SinusoidalPosition,
    T5RelativeBias,
)
from attnkit.testing import assert_close_to_reference

D, H = 32, 4

POSITIONS = {
    "none": lambda: None,
    "rope": lambda: RotaryPosition(D // H),
    "alibi": lambda: ALiBiPosition(H),
    "t5": lambda: T5RelativeBias(H, bidirectional=False, num_buckets=8, max_distance=16),
    "shaw": lambda: ShawRelative(D // H, max_distance=3),
    "sinusoidal": lambda: SinusoidalPosition(D),
    "learned": lambda: LearnedPosition(64, D),
}


def _float64(mha: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The full causal recompute by a float64 copy of ``mha`` (the same weights): the reference."""
    with torch.no_grad():
        return copy.deepcopy(mha).double()(x.double(), is_causal=True)


def _decode(mha: MultiHeadAttention, x: torch.Tensor, cache: KVCache, blocks: list[int]) -> torch.Tensor:
    """Feed ``x`` through the cache in blocks of the given sizes; return the outputs side by side."""
    outs, start = [], 0
    for size in blocks:
        outs.append(mha(x[:, start : start + size], cache=cache, is_causal=True))
        start += size
    assert start == x.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kv_heads", [H, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("position", list(POSITIONS))
def test_cached_decoding_equals_full_recompute(position, kv_heads):
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, H, num_kv_heads=kv_heads, position=POSITIONS[position]()).eval()
    x = torch.randn(2, 12, D)  # (B, L, D)
    full = mha(x, is_causal=True)
    cache = KVCache(capacity=2)  # grows by doubling during the run
    step = _decode(mha, x, cache, [5, 1, 1, 3, 1, 1])  # a prefill, single tokens and a block (lower-right)
    assert cache.length == 12
    want = _float64(mha, x)  # both float32 results against it, never one against the other
    assert_close_to_reference(step, want, reduction=D, msg="cached decoding")
    assert_close_to_reference(full, want, reduction=D, msg="full recompute")


@pytest.mark.parametrize("position", ["none", "rope", "alibi"])
def test_gqa_cached_decoding(position):
    mha = MultiHeadAttention(D, H, num_kv_heads=2, position=POSITIONS[position]()).eval()
    x = torch.randn(3, 9, D)
    cache = KVCache()
    want = _float64(mha, x)
    assert_close_to_reference(_decode(mha, x, cache, [1] * 9), want, reduction=D, msg="cached decoding")
    assert_close_to_reference(mha(x, is_causal=True), want, reduction=D, msg="full recompute")
    assert cache.keys is not None and cache.keys.shape == (3, 2, 9, D // H)  # only Hkv heads are stored


@pytest.mark.parametrize("position", ["none", "rope", "alibi"])
@pytest.mark.parametrize("blocks", [[1] * 14, [6, 1, 4, 1, 1, 1]], ids=["tokens", "blocks"])
def test_ring_buffer_sliding_window_equals_full_recompute(position, blocks):
    window = 4
    mha = MultiHeadAttention(D, H, num_kv_heads=2, window=window, position=POSITIONS[position]()).eval()
    x = torch.randn(2, 14, D)
    full = mha(x, is_causal=True)  # the window mask on the whole sequence
    ring = RingKVCache(window)
    want = _float64(mha, x)
    assert_close_to_reference(_decode(mha, x, ring, blocks), want, reduction=D, msg="ring-buffer decoding")
    assert_close_to_reference(full, want, reduction=D, msg="full recompute")
    assert ring.keys is not None and ring.keys.shape[2] == window  # memory bounded by the window
    assert sorted(ring.slot_positions.tolist()) == list(range(14 - window, 14))


def test_window_mask_semantics():
    mha = MultiHeadAttention(8, 2, window=3, dtype=torch.float64)
    _, w = mha(torch.randn(1, 6, 8, dtype=torch.float64), is_causal=True, need_weights=True)
    allowed = w[0, 0] > 0  # (L, S)
    i, j = torch.arange(6).view(-1, 1), torch.arange(6).view(1, -1)
    assert torch.equal(allowed, (j <= i) & (i - j < 3))


def test_kv_cache_growth_and_views():
    cache = KVCache(capacity=2)
    ks = [torch.randn(1, 2, n, 4) for n in (1, 2, 3)]
    for k in ks:
        keys, values, pos = cache.update(k, k * 2)
    assert cache._k.shape[2] == 8  # 2 -> 4 -> 8
    assert torch.equal(keys, torch.cat(ks, dim=2))  # copies: the same bits
    assert torch.equal(values, 2 * keys)
    assert pos.tolist() == list(range(6))
    with pytest.raises(ValueError, match="cache.reset"):
        cache.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    cache.reset()
    assert cache.length == 0 and cache.keys is None


def test_cache_errors():
    mha = MultiHeadAttention(D, H)
    with pytest.raises(ValueError, match="self-attention"):
        mha(torch.randn(1, 2, D), torch.randn(1, 3, D), cache=KVCache())
    with pytest.raises(ValueError, match="window"):
        mha(torch.randn(1, 2, D), cache=RingKVCache(4))  # a ring drops keys: the module must use the window
    with pytest.raises(ValueError, match="window"):
        RingKVCache(0)



# --------------------------------------------------------------------------------------------- windows on caches
def _record_kernel_inputs(mha: MultiHeadAttention) -> list[tuple]:
    """What reaches the kernel on each call: (query, key, value, attn_mask) as the Attend tap receives them."""
    seen: list[tuple] = []
    mha.attend.register_forward_pre_hook(lambda module, args: seen.append(args[:4]))
    return seen


@pytest.mark.parametrize("position", ["none", "rope", "alibi", "shaw"])
def test_kv_cache_window_reads_only_the_window(position):
    window = 5
    mha = MultiHeadAttention(D, H, num_kv_heads=2, window=window, position=POSITIONS[position]()).eval()
    x = torch.randn(2, 16, D)
    want = _float64(mha, x)
    seen = _record_kernel_inputs(mha)
    cache = KVCache(capacity=4)
    blocks = [7, 1, 1, 4, 1, 1, 1]
    assert_close_to_reference(_decode(mha, x, cache, blocks), want, reduction=D, msg="windowed KVCache")
    assert cache.length == 16 and cache.keys is not None and cache.keys.shape[2] == 16  # the cache keeps all
    start = 0
    for size, (_q, k, _, mask) in zip(blocks, seen, strict=True):
        stop = start + size
        assert k.shape[2] == min(stop, window + size - 1)  # only the keys the block's first query can see
        if size == 1 and position in ("none", "rope"):
            assert mask is None  # one query whose window holds every key it reads: nothing to mask
        elif isinstance(mask, torch.Tensor):  # a position bias (and the window, for a block): never L x S_cache
            assert mask.shape[-1] == k.shape[2]
        start = stop


def test_kv_cache_window_weights_cover_every_cached_key():
    mha = MultiHeadAttention(8, 2, window=3, dtype=torch.float64).eval()
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    _, full = mha(x, is_causal=True, need_weights=True)
    cache = KVCache()
    mha(x[:, :6], cache=cache, is_causal=True)
    out, w = mha(x[:, 6:7], cache=cache, is_causal=True, need_weights=True)
    assert w.shape == (1, 2, 1, 7)  # S counts every cached key; the ones before the window weigh 0
    assert torch.equal(w[..., :4], torch.zeros(1, 2, 1, 4))
    assert_close_to_reference(w, full[:, :, 6:7, :7], reduction=8)


@pytest.mark.parametrize("cache_kind", ["ring", "kv"])
def test_window_prefill_reaches_the_native_block_engine(cache_kind):
    """A prefill through a RingKVCache (and a KVCache) hands the kernel a SlidingWindowMask over keys in position
    order, which backend="auto" runs on the native block engine (forward; the training path is the same kernel)."""
    from attnkit.functional import SlidingWindowMask, _native, which_backend

    window = 8
    mha = MultiHeadAttention(D, H, window=window).eval()
    x = torch.randn(2, 150, D)
    want = _float64(mha, x)
    seen = _record_kernel_inputs(mha)
    cache = RingKVCache(window) if cache_kind == "ring" else KVCache()
    got = _decode(mha, x, cache, [70, 1, 79])  # a prefill, a token, a second prefill over a wrapped ring
    assert_close_to_reference(got, want, reduction=D, msg=f"{cache_kind} prefill")
    for i in (0, 2):
        q, k, v, mask = seen[i]
        assert mask == SlidingWindowMask(window), mask  # a structure, no L x S tensor
        if _native.load() is not None:
            assert which_backend(q, k, v, mask).name == "native_mask"
    assert seen[2][1].shape[2] == 79 + window - 1  # the second prefill reads the ring's keys its block can see


def test_ring_block_update_returns_positions_in_order():
    ring = RingKVCache(4)
    k = torch.arange(10.0).view(1, 1, 10, 1)
    ring.update(k[:, :, :3], k[:, :, :3])
    ring.update(k[:, :, 3:4], k[:, :, 3:4])
    ring.update(k[:, :, 4:6], k[:, :, 4:6])  # wraps the ring
    assert not ring.ordered or ring.length == 6
    keys, _, pos = ring.update(k[:, :, 6:9], k[:, :, 6:9])
    assert ring.ordered
    assert pos.tolist() == list(range(2, 9))  # the 4 held tokens, oldest first, then the block
    assert keys.flatten().tolist() == [float(p) for p in range(2, 9)]
    keys, _, pos = ring.update(k[:, :, 9:], k[:, :, 9:])  # one token: the ring in slot order
    assert not ring.ordered and sorted(pos.tolist()) == [6, 7, 8, 9]
