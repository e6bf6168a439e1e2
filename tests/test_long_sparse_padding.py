"""Block-sparse attention with key padding (``key_mask=`` or ``BlockSparseMask & PaddingMask``) against the dense
masked reference: forward, gradients, fully masked rows, NaN in the padding, and the dispatcher's choice."""

from __future__ import annotations

import pytest
import torch

from attnkit.functional import (
    BlockedWindowMask,
    BlockSparseMask,
    PaddingMask,
    attention_reference,
    bigbird_layout,
    block_sparse_attention,
    fixed_layout,
    local_layout,
    scaled_dot_product_attention,
    strided_layout,
    which_backend,
)
from attnkit.testing import assert_close_to_reference


def _qkv(b, h, hkv, n, e=8, ev=5):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(n + 13 * h + hkv)
    return tuple(torch.randn(b, x, n, d, generator=gen, dtype=torch.float64, requires_grad=True)
                 for x, d in ((h, e), (hkv, e), (hkv, ev)))


def _reference(q, k, v, mask):  # type: ignore[no-untyped-def]
    rep = q.shape[1] // k.shape[1]
    return attention_reference(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), mask)[0]


def _reduction(mask):  # type: ignore[no-untyped-def]
    """The longest reduction under a boolean mask: most keys one query sees, or most queries that see one key."""
    return int(max(mask.sum(-1).max(), mask.sum(-2).max(), 1))


def _key_mask(n: int) -> torch.Tensor:
    """Row 0: right padding to 60%; row 1: a hole in the middle and the first 3 keys padded (left padding)."""
    real = torch.ones(2, n, dtype=torch.bool)
    real[0, int(0.6 * n) :] = False
    real[1, :3] = False
    real[1, n // 3 : n // 3 + 9] = False
    return real


LAYOUTS = {
    "local": (local_layout(5, look_backward=1, look_forward=1), False),
    "strided": (strided_layout(5, stride=2), True),
    "fixed": (fixed_layout(5, stride=2), True),
    "bigbird": (bigbird_layout(5, window=3, n_global=1, n_random=1, seed=0), False),
    "per-head": (torch.stack([local_layout(5), strided_layout(5, stride=2, causal=False)]), False),
}


@pytest.mark.parametrize("kind", list(LAYOUTS))
@pytest.mark.parametrize("n, hkv", [(40, 2), (37, 1)], ids=["even-mha", "ragged-gqa"])
def test_padded_block_sparse_matches_dense_reference(kind, n, hkv):  # type: ignore[no-untyped-def]
    layout, causal = LAYOUTS[kind]
    q, k, v = _qkv(2, 2, hkv, n)
    real = _key_mask(n)
    out = block_sparse_attention(q, k, v, layout, block_size=8, causal=causal, key_mask=real)
    mask = BlockSparseMask(layout, 8, causal=causal).materialize(n, n) & real.view(2, 1, 1, n)
    ref = _reference(q, k, v, mask)
    assert_close_to_reference(out, ref, reduction=_reduction(mask))
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert_close_to_reference(a, b, reduction=_reduction(mask), grad=True, msg=name)


def test_padding_is_never_read_and_dead_rows_are_zero() -> None:
    """NaN in every padded key and value: outputs and gradients stay finite and exact; rows with only padding in
    their blocks give zeros and zero gradients; padded keys get zero gradients."""
    n = 48
    layout = local_layout(6, look_backward=1)  # query block i sees key blocks i-1 and i
    q, k, v = _qkv(2, 2, 1, n)
    real = torch.ones(2, n, dtype=torch.bool)
    real[0, 30:] = False  # query blocks 5 (keys 32..47) see only padding in sequence 0 -> dead rows 40..47
    real[1, 5:20] = False
    kp, vp = (t.detach().clone() for t in (k, v))
    kp[~real.view(2, 1, n)] = float("nan")
    vp[~real.view(2, 1, n)] = float("nan")
    kp.requires_grad_(True)
    vp.requires_grad_(True)
    out = block_sparse_attention(q, kp, vp, layout, block_size=8, causal=True, key_mask=real)
    mask = BlockSparseMask(layout, 8, causal=True).materialize(n, n) & real.view(2, 1, 1, n)
    ref = _reference(q, k, v, mask)
    assert torch.isfinite(out).all()
    assert_close_to_reference(out, ref, reduction=_reduction(mask))
    assert (out[0, :, 40:] == 0).all()
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (q, kp, vp))
    want = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert torch.isfinite(a).all()
        assert_close_to_reference(a, b, reduction=_reduction(mask), grad=True, msg=name)
    assert (got[0][0, :, 40:] == 0).all()  # dead rows: zero query gradients
    assert (got[1][~real.view(2, 1, n)] == 0).all() and (got[2][~real.view(2, 1, n)] == 0).all()


def test_padded_block_sparse_gradcheck() -> None:
    q, k, v = _qkv(1, 2, 1, 10, e=3, ev=2)
    real = torch.tensor([[True] * 7 + [False] * 3])

    def fn(q, k, v):  # type: ignore[no-untyped-def]
        return block_sparse_attention(q, k, v, strided_layout(3, stride=2), block_size=4, causal=True, key_mask=real)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_dispatcher_routes_layout_and_padding() -> None:
    x = torch.randn(2, 2, 40, 8)
    lengths = torch.tensor([40, 23])
    both = BlockSparseMask(bigbird_layout(5, seed=1), 8) & PaddingMask(lengths)
    assert which_backend(x, x, x, both).name in ("native_block_sparse", "torch_block_sparse")
    out = scaled_dot_product_attention(x, x, x, both)
    x64 = x.double()
    assert_close_to_reference(out, attention_reference(x64, x64, x64, both)[0],
                              reduction=_reduction(both.materialize(40, 40)))
    odd = BlockSparseMask(local_layout(5), 8) & BlockedWindowMask(8)
    choice = which_backend(x, x, x, odd)
    assert choice.name not in ("native_block_sparse", "torch_block_sparse")
    assert "at most one PaddingMask" in " ".join(choice.reasons["torch_block_sparse"])
    with pytest.raises(ValueError, match="key_mask"):
        block_sparse_attention(x, x, x, local_layout(5), block_size=8, key_mask=torch.ones(2, 39, dtype=torch.bool))
