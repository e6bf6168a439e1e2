"""Position math and modules: RoPE/ALiBi properties, T5 buckets and ALiBi against transformers, Shaw by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnkit.functional import position as P
from attnkit.layers import (
    ALiBiPosition,
    LearnedPosition,
    MultiHeadAttention,
    RotaryPosition,
    ShawRelative,
    SinusoidalPosition,
    T5RelativeBias,
)
from attnkit.testing import assert_close_to_reference


# --------------------------------------------------------------------------------------------- RoPE
@given(
    half=st.integers(1, 16),
    positions=st.lists(st.integers(0, 100_000), min_size=1, max_size=6),
    interleaved=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rope_preserves_norms(half, positions, interleaved, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, len(positions), 2 * half, generator=g, dtype=torch.float64)  # (B, H, L, E)
    cos, sin = P.rope_cos_sin(torch.tensor(positions), 2 * half, dtype=torch.float64)
    y = P.apply_rotary(x, cos, sin, interleaved=interleaved)
    # a rotation preserves norms: the input's float64 norms are the reference (each sums 2 * half squares)
    assert_close_to_reference(y.norm(dim=-1), x.norm(dim=-1), reduction=2 * half)


@given(
    half=st.integers(1, 16),
    m=st.integers(0, 5000),
    n=st.integers(0, 5000),
    shift=st.integers(0, 5000),
    interleaved=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rope_scores_depend_only_on_relative_offset(half, m, n, shift, interleaved, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 1, 2 * half, generator=g, dtype=torch.float64)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = P.rope_cos_sin(torch.tensor([pq]), 2 * half, dtype=torch.float64)
        ck, sk = P.rope_cos_sin(torch.tensor([pk]), 2 * half, dtype=torch.float64)
        rq = P.apply_rotary(q, cq, sq, interleaved=interleaved)
        rk = P.apply_rotary(k, ck, sk, interleaved=interleaved)
        return (rq * rk).sum()

    # not at the attnkit.testing policy: the float64 angles p * theta (p up to 10^4) are rounded to ~p * eps, which
    # moves the scores by up to ~160x the policy's float64 tolerance; there is no higher-precision reference here
    torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=1e-8, rtol=1e-8)


def test_rope_layouts_are_the_same_rotation_on_permuted_features():
    x = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    cos, sin = P.rope_cos_sin(torch.arange(4), 8, dtype=torch.float64)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # interleaved pairs (2i, 2i+1) -> halves (i, i + 4)
    inter = P.apply_rotary(x, cos, sin, interleaved=True)
    half = P.apply_rotary(x[..., perm], cos, sin)
    assert torch.equal(inter[..., perm], half)  # the same products and sums, in another order of features


# --------------------------------------------------------------------------------------------- ALiBi
@given(num_heads=st.integers(1, 80))
def test_alibi_slopes_follow_the_papers_geometric_sequence(num_heads):
    slopes = P.alibi_slopes(num_heads).double()
    closest = 2 ** int(math.log2(num_heads))
    head = slopes[:closest]
    # the first 2^floor(log2 H) slopes: start 2^(-8/n), ratio 2^(-8/n), ending at 2^-8
    ratio = 2.0 ** (-8.0 / closest)
    # the float32 slopes (cast up above) against the formula in float64 (no sums: reduction 1)
    want = ratio ** torch.arange(1, closest + 1, dtype=torch.float64)
    assert_close_to_reference(head, want, reduction=1, dtype=torch.float32)
    assert math.isclose(float(head[-1]), 2.0**-8, rel_tol=1e-6)
    # the rest interleave between them: odd powers of the next power of two's ratio
    rest = slopes[closest:]
    half_ratio = 2.0 ** (-8.0 / (2 * closest))
    want = half_ratio ** (2 * torch.arange(len(rest), dtype=torch.float64) + 1)
    assert_close_to_reference(rest, want, reduction=1, dtype=torch.float32)
    assert (slopes > 0).all() and len(set(slopes.tolist())) == num_heads


def test_alibi_slopes_known_values():
    assert P.alibi_slopes(8).tolist() == [2.0**-k for k in range(1, 9)]
    # 6 heads: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then every other 8-head slope: 2^-1, 2^-3
    assert P.alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


def test_alibi_module_bias():
    bias = ALiBiPosition(4).score_bias(torch.zeros(1, 4, 3, 2), torch.tensor([5, 6, 7]), torch.arange(8), scale=1.0)
    assert bias.shape == (1, 4, 3, 8)
    slopes = P.alibi_slopes(4)
    assert bias[0, 1, 2, 3].item() == pytest.approx(-slopes[1].item() * 4)
    assert bias[0, 0, 0, 5].item() == 0.0


# --------------------------------------------------------------------------------------------- T5
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 40), (8, 20)])
def test_t5_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = P.relative_positions(torch.arange(300), torch.arange(300))
    theirs = t5.T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    ours = P.t5_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(ours, theirs)


def test_t5_module_bias_uses_buckets():
    mod = T5RelativeBias(2, num_buckets=8, max_distance=16)
    bias = mod.score_bias(torch.zeros(1, 2, 4, 3), torch.arange(4), torch.arange(4), scale=1.0)
    buckets = P.t5_bucket(P.relative_positions(torch.arange(4), torch.arange(4)), num_buckets=8, max_distance=16)
    assert torch.equal(bias[0, 1], mod.embedding.weight[buckets, 1])  # a lookup: exact


# --------------------------------------------------------------------------------------------- absolute
def test_sinusoidal_table_formula():
    table = P.sinusoidal_table(torch.arange(6), 8, dtype=torch.float64)
    for p in range(6):
        for i in range(4):
            angle = p / 10000 ** (2 * i / 8)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle))
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle))


def test_learned_position_range_error():
    mod = LearnedPosition(4, 8)
    assert mod(torch.zeros(1, 4, 8)).shape == (1, 4, 8)
    with pytest.raises(ValueError, match="max_len"):
        mod(torch.zeros(1, 2, 8), offset=3)


def test_input_positions_enter_queries_and_keys_not_values():
    pos = SinusoidalPosition(16)
    mha = MultiHeadAttention(16, 2, position=pos, dtype=torch.float64)
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    q_in = pos(x)  # (B, L, D)
    b, n = 1, 5
    q = mha.q_proj(q_in).view(b, n, 2, 8).transpose(1, 2)
    k = mha.k_proj(q_in).view(b, n, 2, 8).transpose(1, 2)
    v = mha.v_proj(x).view(b, n, 2, 8).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    want = mha.out_proj((w @ v).transpose(1, 2).reshape(b, n, 16))
    assert_close_to_reference(mha(x), want, reduction=16)  # float64 both; the widest sum: d_model = 16


# --------------------------------------------------------------------------------------------- Shaw
def _shaw_by_hand(mha: MultiHeadAttention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """Shaw et al. 2018, eqs. (3)-(4) with relative keys and values, one loop per query."""
    shaw = mha.position
    b, n, _ = x.shape
    h, e = mha.num_heads, mha.head_dim
    q = mha.q_proj(x).view(b, n, h, e).transpose(1, 2)  # (B, H, L, E)
    k = mha.k_proj(x).view(b, n, h, e).transpose(1, 2)
    v = mha.v_proj(x).view(b, n, h, e).transpose(1, 2)
    out = torch.zeros_like(q)
    kk = shaw.max_distance
    for i in range(n):
        idx = torch.tensor([min(max(j - i, -kk), kk) + kk for j in range(n)])  # (S,)
        a_k, a_v = shaw.rel_key[idx], shaw.rel_value[idx]  # (S, E)
        scores = (q[:, :, i : i + 1] * (k + a_k)).sum(-1) / math.sqrt(e)  # (B, H, S)
        if causal:
            scores[..., i + 1 :] = float("-inf")
        w = torch.softmax(scores, -1)  # (B, H, S)
        out[:, :, i] = (w.unsqueeze(-1) * (v + a_v)).sum(-2)
    return mha.out_proj(out.transpose(1, 2).reshape(b, n, h * e))


@pytest.mark.parametrize("causal", [False, True])
def test_shaw_matches_the_paper_equations(causal):
    mha = MultiHeadAttention(12, 3, position=ShawRelative(4, max_distance=2), dtype=torch.float64)
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    # float64 both; the widest sum: d_model = 12 (below the floor)
    assert_close_to_reference(mha(x, is_causal=causal), _shaw_by_hand(mha, x, causal), reduction=12)


def test_shaw_gradcheck():
    mha = MultiHeadAttention(4, 2, position=ShawRelative(2, max_distance=1), dtype=torch.float64)
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mha(t, is_causal=True), (x,), fast_mode=True)


@pytest.mark.parametrize(
    "make",
    [lambda: RotaryPosition(4), lambda: ALiBiPosition(3), lambda: T5RelativeBias(3, bidirectional=False)],
    ids=["rope", "alibi", "t5"],
)
def test_position_gradcheck(make):
    mha = MultiHeadAttention(12, 3, position=make(), dtype=torch.float64)
    x = torch.randn(1, 3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mha(t, is_causal=True), (x,), fast_mode=True)


def test_position_module_mismatch_errors():
    with pytest.raises(ValueError, match="num_heads=4"):
        MultiHeadAttention(16, 4, position=ALiBiPosition(8))
    with pytest.raises(ValueError, match="head_dim=4"):
        MultiHeadAttention(16, 4, position=RotaryPosition(8))

