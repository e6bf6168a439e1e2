"""Sliding-window, block-sparse and chunked kernels against the dense masked reference (forward and gradients)."""

from __future__ import annotations

import pytest
import torch

from attnkit.functional import (
    AndMask,
    BlockedWindowMask,
    BlockSparseMask,
    PaddingMask,
    attention_reference,
    bigbird_layout,
    block_sparse_attention,
    chunked_attention,
    fixed_layout,
    local_layout,
    merge_attention,
    scaled_dot_product_attention,
    sliding_window_attention,
    strided_layout,
    which_backend,
)
from attnkit.testing import assert_close_to_reference


def _qkv(b, h, hkv, q_len, k_len, e=8, ev=8, dtype=torch.float64):  # type: ignore[no-untyped-def]
    q = torch.randn(b, h, q_len, e, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, k_len, e, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, k_len, ev, dtype=dtype, requires_grad=True)
    return q, k, v


def _reference(q, k, v, mask, **kw):  # type: ignore[no-untyped-def]
    rep = q.shape[1] // k.shape[1]
    return attention_reference(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), mask, **kw)[0]


def _reduction(mask, q_len, k_len):  # type: ignore[no-untyped-def]
    """The longest reduction under a boolean mask: most keys one query sees, or most queries that see one key."""
    if mask is None or mask.dtype != torch.bool:
        return max(q_len, k_len)
    mask = mask.expand(*mask.shape[:-2], q_len, k_len)
    return int(max(mask.sum(-1).max(), mask.sum(-2).max(), 1))


def _assert_same(out, reference, inputs, reduction):  # type: ignore[no-untyped-def]
    """Forward and all input gradients against the float64 reference at the attnkit.testing policy.

    ``reference(q, k, v)`` runs on float64 copies of ``inputs`` (the same values), with its own gradients.
    """
    assert torch.isfinite(out).all()
    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    ref = reference(*inputs64)
    assert_close_to_reference(out, ref, reduction=reduction, msg="out")
    g = torch.randn_like(ref).to(out.dtype)
    got = torch.autograd.grad((out * g).sum(), inputs)
    want = torch.autograd.grad((ref * g.double()).sum(), inputs64)
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert_close_to_reference(a, b, reduction=reduction, grad=True, msg=name)


# --------------------------------------------------------------------------------------------- sliding window
@pytest.mark.parametrize(
    "n, window, back, ahead, causal",
    [(37, 8, 1, 0, True), (32, 8, 2, 0, True), (29, 4, 0, 0, True), (37, 8, 1, 1, False), (20, 8, 2, 1, False),
     (9, 16, 1, 0, True), (300, 128, 2, 0, True), (270, 256, 1, 0, True)],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("hkv", [2, 1], ids=["mha", "gqa"])
def test_window_matches_dense_reference(n, window, back, ahead, causal, hkv):  # type: ignore[no-untyped-def]
    q, k, v = _qkv(2, 2, hkv, n, n, ev=6)
    out = sliding_window_attention(q, k, v, window=window, look_backward=back, look_forward=ahead, causal=causal)
    mask = BlockedWindowMask(window, look_backward=back, look_forward=ahead, causal=causal).materialize(n, n)
    _assert_same(out, lambda *qkv: _reference(*qkv, mask), (q, k, v), _reduction(mask, n, n))


@pytest.mark.parametrize("q_len, k_len", [(5, 37), (16, 40), (37, 37)], ids=["decode", "L<S", "L=S"])
@pytest.mark.parametrize("causal", [True, False])
def test_window_padding_and_unequal_lengths(q_len, k_len, causal):  # type: ignore[no-untyped-def]
    q, k, v = _qkv(2, 2, 1, q_len, k_len)
    key_mask = torch.ones(2, k_len, dtype=torch.bool)
    key_mask[1, k_len // 2 :] = False  # right padding
    key_mask[0, :3] = False  # left padding: early rows of a causal window may see nothing at all
    out = sliding_window_attention(q, k, v, window=8, causal=causal, look_forward=0 if causal else 1,
                                   key_mask=key_mask)
    window = BlockedWindowMask(8, look_forward=0 if causal else 1, causal=causal)
    mask = window.materialize(q_len, k_len) & key_mask.view(2, 1, 1, k_len)
    _assert_same(out, lambda *qkv: _reference(*qkv, mask), (q, k, v), _reduction(mask, q_len, k_len))


def test_window_float32_and_bfloat16_long() -> None:
    q, k, v = _qkv(1, 4, 4, 300, 300, e=16, ev=16, dtype=torch.float32)
    mask = BlockedWindowMask(64).materialize(300, 300)
    reduction = _reduction(mask, 300, 300)
    _assert_same(sliding_window_attention(q, k, v, window=64), lambda *qkv: _reference(*qkv, mask), (q, k, v),
                 reduction)
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    out = sliding_window_attention(qb, kb, vb, window=64)
    assert out.dtype == torch.bfloat16
    assert_close_to_reference(out, _reference(qb.double(), kb.double(), vb.double(), mask), reduction=reduction)


@pytest.mark.parametrize("with_padding", [False, True], ids=["fast", "blockwise"])
def test_window_gradcheck(with_padding):  # type: ignore[no-untyped-def]
    q, k, v = _qkv(1, 2, 1, 10, 10, e=3, ev=2)
    key_mask = torch.ones(1, 10, dtype=torch.bool)
    if with_padding:
        key_mask[0, 8:] = False

    def fn(q, k, v):  # type: ignore[no-untyped-def]
        return sliding_window_attention(q, k, v, window=4, key_mask=key_mask if with_padding else None)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_window_never_reads_outside_the_windows() -> None:
    """Keys no query can see (before the first query's window) and padding keys are NaN: outputs stay exact."""
    q, k, v = _qkv(1, 2, 2, 6, 64)
    mask = BlockedWindowMask(8).materialize(6, 64)
    ref = _reference(q, k, v, mask).detach()  # queries at positions 58..63 see keys 48..63 only
    kp, vp = k.detach().clone(), v.detach().clone()
    kp[:, :, :48] = float("nan")
    vp[:, :, :48] = float("nan")
    key_mask = torch.ones(1, 64, dtype=torch.bool)
    key_mask[0, 62:] = False
    kp[:, :, 62:] = float("nan")  # padding filled with NaN
    vp[:, :, 62:] = float("nan")
    out = sliding_window_attention(q.detach(), kp, vp, window=8, key_mask=key_mask)
    ref = _reference(q, k, v, mask & key_mask.view(1, 1, 1, 64)).detach()
    assert torch.isfinite(out).all()
    assert_close_to_reference(out, ref, reduction=_reduction(mask & key_mask.view(1, 1, 1, 64), 6, 64))


def test_window_matches_local_attention_package() -> None:
    local_attention = pytest.importorskip("local_attention")
    q, k, v = (torch.randn(2, 3, 64, 16) for _ in range(3))
    theirs = local_attention.LocalAttention(window_size=16, causal=True, look_backward=1)(q, k, v)
    mask = BlockedWindowMask(16).materialize(64, 64)
    ref = _reference(q.double(), k.double(), v.double(), mask)
    # each against the float64 reference, never one float32 result against the other
    assert_close_to_reference(sliding_window_attention(q, k, v, window=16), ref, reduction=32, msg="attnkit")
    assert_close_to_reference(theirs, ref, reduction=32, msg="local_attention")


def test_window_dispatch_and_errors() -> None:
    q = torch.randn(2, 2, 40, 8)
    window_backends = ("native_band", "flash_pieces", "window_blockwise")
    assert which_backend(q, q, q, BlockedWindowMask(8)).name in window_backends[:2]
    lengths = torch.tensor([40, 25])
    both = BlockedWindowMask(8) & PaddingMask(lengths)
    assert isinstance(both, AndMask) and which_backend(q, q, q, both).name in ("native_band", "window_blockwise")
    out = scaled_dot_product_attention(q, q, q, both)
    assert_close_to_reference(out, attention_reference(q.double(), q.double(), q.double(), both)[0],
                              reduction=_reduction(both.materialize(40, 40), 40, 40))
    choice = which_backend(q, q, q, torch.ones(40, 40, dtype=torch.bool))
    assert choice.name not in window_backends
    assert all("no window structure" in " ".join(choice.reasons[name]) for name in window_backends)
    with pytest.raises(ValueError, match="can serve"):
        scaled_dot_product_attention(q, q, q, BlockedWindowMask(8), dropout_p=0.1, backend="window_blockwise")
    with pytest.warns(DeprecationWarning, match="'local' is deprecated"), pytest.raises(ValueError, match="dropout"):
        scaled_dot_product_attention(q, q, q, BlockedWindowMask(8), dropout_p=0.1, backend="local")
    with pytest.raises(ValueError, match="expected window"):
        sliding_window_attention(q, q, q, window=0)
    with pytest.raises(ValueError, match="key_mask"):
        sliding_window_attention(q, q, q, window=8, key_mask=torch.ones(2, 39, dtype=torch.bool))
    with pytest.raises(ValueError, match="L <= S"):
        sliding_window_attention(q, q[:, :, :10], q[:, :, :10], window=8)


# --------------------------------------------------------------------------------------------- block sparse
def _layouts(nb: int) -> dict[str, tuple[torch.Tensor, bool]]:
    return {
        "local": (local_layout(nb, look_backward=1, look_forward=1), False),
        "strided": (strided_layout(nb, stride=2), True),
        "fixed": (fixed_layout(nb, stride=2), True),
        "bigbird": (bigbird_layout(nb, window=3, n_global=1, n_random=1, seed=0), False),
        "per-head": (torch.stack([local_layout(nb), strided_layout(nb, stride=2, causal=False)]), False),
    }


@pytest.mark.parametrize("kind", ["local", "strided", "fixed", "bigbird", "per-head"])
@pytest.mark.parametrize("n", [32, 29], ids=["even", "ragged"])
def test_block_sparse_matches_dense_reference(kind, n):  # type: ignore[no-untyped-def]
    layout, causal = _layouts(4)[kind]
    q, k, v = _qkv(2, 2, 1, n, n, ev=5)
    out = block_sparse_attention(q, k, v, layout, block_size=8, causal=causal)
    mask = BlockSparseMask(layout, 8, causal=causal).materialize(n, n)
    _assert_same(out, lambda *qkv: _reference(*qkv, mask), (q, k, v), _reduction(mask, n, n))


def test_block_sparse_never_reads_unused_blocks_and_empty_rows_are_zero() -> None:
    layout = torch.zeros(4, 4, dtype=torch.bool)
    layout[1, 0] = layout[2, 2] = layout[3, 0] = layout[3, 2] = True  # key blocks 1 and 3 unused; query block 0 empty
    q, k, v = _qkv(1, 2, 2, 32, 32)
    mask = BlockSparseMask(layout, 8).materialize(32, 32)
    ref = _reference(q, k, v, mask)
    kp, vp = k.detach().clone(), v.detach().clone()
    for blk in (1, 3):
        kp[:, :, blk * 8 : blk * 8 + 8] = float("nan")
        vp[:, :, blk * 8 : blk * 8 + 8] = float("nan")
    kp.requires_grad_(True)
    vp.requires_grad_(True)
    out = block_sparse_attention(q, kp, vp, layout, block_size=8)
    assert torch.isfinite(out).all()
    assert_close_to_reference(out, ref, reduction=_reduction(mask, 32, 32))
    assert (out[:, :, :8] == 0).all()
    grads = torch.autograd.grad(out.sum(), (q, kp, vp))
    assert all(torch.isfinite(g).all() for g in grads) and (grads[0][:, :, :8] == 0).all()


def test_block_sparse_gradcheck_and_dispatch() -> None:
    q, k, v = _qkv(1, 1, 1, 10, 10, e=4, ev=4)
    layout = strided_layout(3, stride=2)
    assert torch.autograd.gradcheck(
        lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=4, causal=True), (q, k, v), fast_mode=True
    )
    x = torch.randn(1, 2, 32, 8)
    mask = BlockSparseMask(bigbird_layout(4, seed=1), 8)
    assert which_backend(x, x, x, mask).name in ("native_block_sparse", "torch_block_sparse")
    x64 = x.double()
    assert_close_to_reference(scaled_dot_product_attention(x, x, x, mask), attention_reference(x64, x64, x64, mask)[0],
                              reduction=_reduction(mask.materialize(32, 32), 32, 32))
    with pytest.raises(ValueError, match="layout of at least"):
        block_sparse_attention(x, x, x, local_layout(2), block_size=8)


def test_layout_builders() -> None:
    assert torch.equal(bigbird_layout(16, seed=3), bigbird_layout(16, seed=3))
    assert not torch.equal(bigbird_layout(16, seed=3), bigbird_layout(16, seed=4))
    big = bigbird_layout(16, window=3, n_global=2, n_random=2, seed=0)
    assert big[:2].all() and big[:, :2].all() and (big.sum(1)[2:] <= 3 + 2 + 2).all()
    for lay in (strided_layout(9, stride=3), fixed_layout(9, stride=3, n_summary=1)):
        assert torch.equal(lay, lay.tril()) and lay.diagonal().all()
    strided = strided_layout(9, stride=3)
    assert strided[8, 2] and strided[8, 6] and not strided[8, 4]  # every third block back, plus the near ones
    fixed = fixed_layout(9, stride=3)
    assert fixed[7, 2] and fixed[7, 6] and not fixed[7, 4]  # its own chunk, plus the chunks' last blocks


# --------------------------------------------------------------------------------------------- chunked
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "padding"])
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_matches_dense_reference(mask_kind, causal):  # type: ignore[no-untyped-def]
    q, k, v = _qkv(2, 2, 1, 23, 31, ev=5)
    mask = {
        "none": None,
        "bool": torch.rand(23, 31) > 0.3,
        "float": torch.randn(2, 1, 23, 31, dtype=torch.float64),
        "padding": torch.arange(31).view(1, 1, 1, 31) < torch.tensor([31, 12]).view(2, 1, 1, 1),
    }[mask_kind]
    out = chunked_attention(q, k, v, mask, is_causal=causal, chunk_size=8)
    _assert_same(out, lambda *qkv: _reference(*qkv, mask, is_causal=causal), (q, k, v), 31)


def test_chunked_lse_fully_masked_rows_and_gradcheck() -> None:
    q, k, v = _qkv(1, 2, 2, 12, 12, e=4, ev=4)
    mask = torch.rand(1, 2, 12, 12) > 0.4
    mask[0, 1, 5] = False  # a row with nothing to attend to
    out, lse = chunked_attention(q, k, v, mask, chunk_size=5, return_lse=True)
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
    assert_close_to_reference(lse, torch.logsumexp(scores, -1).detach(), reduction=12)
    assert torch.isneginf(lse[0, 1, 5]) and (out[0, 1, 5] == 0).all()
    assert torch.autograd.gradcheck(lambda q, k, v: chunked_attention(q, k, v, mask, chunk_size=5), (q, k, v),
                                      fast_mode=True)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert (grads[0][0, 1, 5] == 0).all() and all(torch.isfinite(g).all() for g in grads)


def test_merge_attention_is_exact_over_key_splits() -> None:
    q, k, v = _qkv(1, 2, 2, 10, 30)
    parts = [chunked_attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True) for a, b in ((0, 7), (7, 30))]
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    assert_close_to_reference(out, _reference(q, k, v, None), reduction=30)
    dead = torch.full((1, 2, 10), float("-inf"), dtype=torch.float64)
    out2, lse2 = merge_attention([out, torch.zeros_like(out)], [lse, dead])  # a part that saw nothing changes nothing
    assert torch.equal(out2, out)
    with pytest.raises(ValueError, match="lse of shape"):
        merge_attention([out], [lse[..., :3]])


def test_chunked_backend_when_forced() -> None:
    q = torch.randn(1, 2, 40, 8)
    mask = torch.rand(40, 40) > 0.5
    assert which_backend(q, q, q, mask).name != "chunked"  # the fused kernel wins on CPU
    out = scaled_dot_product_attention(q, q, q, mask, backend="chunked")
    q64 = q.double()
    assert_close_to_reference(out, attention_reference(q64, q64, q64, mask)[0], reduction=40)


def test_block_math_equals_flash_block() -> None:
    """The readable per-block math (used off the CPU, e.g. by ring attention on GPUs) equals the flash block."""
    from attnkit.functional.chunked import (
        block_backward,
        block_backward_math,
        block_forward,
        block_forward_math,
    )

    q, k, v = (torch.randn(2, 3, 12, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(1, 1, 12, 12, dtype=torch.float64).masked_fill_(torch.rand(12, 12) > 0.6, float("-inf"))
    mask[..., 4, :] = float("-inf")  # a dead row
    for m, causal in ((None, True), (mask, False)):
        o1, l1 = block_forward(q, k, v, m, causal, 0.3)
        o2, l2 = block_forward_math(q, k, v, m, causal, 0.3)  # float64: the readable math is the reference
        assert_close_to_reference(o1, o2, reduction=12)
        assert_close_to_reference(l1, l2, reduction=12)
        g = torch.randn_like(o1)
        for a, b in zip(block_backward(g, q, k, v, o1, l1, m, causal, 0.3),
                        block_backward_math(g, q, k, v, o1, l1, m, causal, 0.3), strict=True):
            assert torch.isfinite(a).all()
            assert_close_to_reference(a, b, reduction=12, grad=True)
