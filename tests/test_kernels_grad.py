"""Gradients of every backend (float64 gradcheck) and hypothesis properties of the attention kernel.

Properties: weights rows sum to 1 (0 when fully masked), a causal output ignores the future, and attention is
equivariant to a permutation of the keys/values (no positions involved).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnkit.functional import CausalMask, PaddingMask, attention_reference, scaled_dot_product_attention
from attnkit.testing import assert_close_to_reference

BACKENDS = ["reference", "math", "sdpa", "auto"]


def _dead_row_mask() -> torch.Tensor:
    mask = torch.tensor(
        [[1, 0, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool
    )  # (L=3, S=4): query 1 sees nothing, no query sees key 1
    return mask


GRAD_MASKS = {
    "none": lambda: (None, False),
    "bool_with_dead_row": lambda: (_dead_row_mask(), False),
    "float_bias": lambda: (torch.randn(3, 4, dtype=torch.float64), False),
    "is_causal": lambda: (None, True),
    "causal_and_padding_obj": lambda: (CausalMask("lower_right") & PaddingMask(torch.tensor([4, 2])), False),
}


@pytest.mark.parametrize("kind", GRAD_MASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend: str, kind: str) -> None:
    """float64 gradcheck of output and weights w.r.t. query, key and value (GQA: H=2, Hkv=1)."""
    mask, causal = GRAD_MASKS[kind]()
    q = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)  # (B, H, L, E)
    k = torch.randn(2, 1, 4, 3, dtype=torch.float64, requires_grad=True)  # (B, Hkv, S, E)
    v = torch.randn(2, 1, 4, 2, dtype=torch.float64, requires_grad=True)  # (B, Hkv, S, Ev)

    def out_only(q, k, v):
        return scaled_dot_product_attention(q, k, v, mask, is_causal=causal, backend=backend)

    def with_weights(q, k, v):
        return scaled_dot_product_attention(q, k, v, mask, is_causal=causal, backend=backend, return_weights=True)

    assert torch.autograd.gradcheck(with_weights if kind == "bool_with_dead_row" else out_only, (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float_mask(backend: str) -> None:
    """The additive float mask is differentiable too (a learned bias)."""
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: scaled_dot_product_attention(q, k, v, b, backend=backend), (bias,))


@pytest.mark.parametrize("float_mask", [False, True], ids=["bool_mask", "float_mask"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_have_zero_gradients(backend: str, float_mask: bool) -> None:
    mask = _dead_row_mask()
    if float_mask:
        mask = torch.zeros(3, 4).masked_fill(~mask, float("-inf"))
    q = torch.randn(2, 2, 3, 8, requires_grad=True)
    k = torch.randn(2, 2, 4, 8, requires_grad=True)
    v = torch.randn(2, 2, 4, 8, requires_grad=True)
    out, w = scaled_dot_product_attention(q, k, v, mask, backend=backend, return_weights=True)
    assert not out[:, :, 1].any() and not w[:, :, 1].any()
    (out.square().sum() + (w * torch.randn_like(w)).sum()).backward()
    for g in (q.grad, k.grad, v.grad):
        assert g is not None and torch.isfinite(g).all()
    assert q.grad is not None and not q.grad[:, :, 1].any(), "gradient reached the query of a fully masked row"
    assert q.grad[:, :, 0].abs().sum() > 0  # and live rows do get gradient
    # key 1 is masked for every live query, so no gradient may reach it
    assert k.grad is not None and not k.grad[:, :, 1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_matches_reference(backend: str) -> None:
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.rand(5, 5) > 0.3
    g = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    out = scaled_dot_product_attention(q, k, v, mask, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref, _ = attention_reference(q, k, v, mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads, strict=True):
        assert_close_to_reference(a, b, reduction=5, grad=True)


# ------------------------------------------------------------------------------------------ properties
dims = st.integers(min_value=1, max_value=6)


@st.composite
def attention_inputs(draw: st.DrawFn) -> tuple[torch.Tensor, ...]:
    b, h, q_len, k_len, e = draw(dims), draw(st.sampled_from([1, 2])), draw(dims), draw(dims), draw(dims)
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, q_len, e, generator=g, dtype=torch.float64) * 3
    k = torch.randn(b, h, k_len, e, generator=g, dtype=torch.float64) * 3
    v = torch.randn(b, h, k_len, e, generator=g, dtype=torch.float64)
    mask = torch.rand(b, 1, q_len, k_len, generator=g) > draw(st.floats(0.0, 0.9))
    return q, k, v, mask


@given(attention_inputs(), st.sampled_from(BACKENDS))
def test_rows_sum_to_one_or_zero(inputs: tuple[torch.Tensor, ...], backend: str) -> None:
    q, k, v, mask = inputs
    out, w = scaled_dot_product_attention(q, k, v, mask, backend=backend, return_weights=True)
    sums = w.sum(-1)  # (B, H, L)
    expected = mask.any(-1).expand_as(sums).double()  # 1 where the row sees a key, else 0
    assert_close_to_reference(sums, expected, reduction=k.shape[2])
    assert (w >= 0).all() and not w.masked_select(~mask.expand_as(w)).any()
    assert torch.isfinite(out).all()


@given(attention_inputs(), st.sampled_from(BACKENDS), st.sampled_from(["is_causal", "CausalMask"]))
def test_causal_output_ignores_the_future(inputs: tuple[torch.Tensor, ...], backend: str, how: str) -> None:
    q, k, v, _ = inputs
    n = min(q.shape[2], k.shape[2])
    q, k, v = q[:, :, :n], k[:, :, :n], v[:, :, :n]
    kwargs = {"is_causal": True} if how == "is_causal" else {"attn_mask": CausalMask()}
    out = scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
    for t in range(n):  # scramble keys/values after position t: outputs up to t must not move
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t + 1 :] = torch.randn_like(k2[:, :, t + 1 :]) * 5
        v2[:, :, t + 1 :] = torch.randn_like(v2[:, :, t + 1 :]) * 5
        out2 = scaled_dot_product_attention(q, k2, v2, backend=backend, **kwargs)
        assert_close_to_reference(out2[:, :, : t + 1], out[:, :, : t + 1], reduction=n)  # float64 on both sides


@given(attention_inputs(), st.sampled_from(BACKENDS), st.integers(0, 2**16))
def test_permuting_keys_and_values_changes_nothing(inputs: tuple[torch.Tensor, ...], backend: str, seed: int) -> None:
    q, k, v, mask = inputs
    perm = torch.randperm(k.shape[2], generator=torch.Generator().manual_seed(seed))
    out, w = scaled_dot_product_attention(q, k, v, mask, backend=backend, return_weights=True)
    out_p, w_p = scaled_dot_product_attention(
        q, k[:, :, perm], v[:, :, perm], mask[..., perm], backend=backend, return_weights=True
    )
    assert_close_to_reference(out_p, out, reduction=k.shape[2])  # float64: another summation order
    assert_close_to_reference(w_p, w[..., perm], reduction=k.shape[2])


@given(attention_inputs(), st.sampled_from(BACKENDS))
def test_permuting_queries_permutes_outputs(inputs: tuple[torch.Tensor, ...], backend: str) -> None:
    q, k, v, mask = inputs
    perm = torch.arange(q.shape[2]).flip(0)
    out = scaled_dot_product_attention(q, k, v, mask, backend=backend)
    out_p = scaled_dot_product_attention(q[:, :, perm], k, v, mask[:, :, perm], backend=backend)
    assert_close_to_reference(out_p, out[:, :, perm], reduction=k.shape[2])
