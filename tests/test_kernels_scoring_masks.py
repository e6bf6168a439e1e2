"""Score functions against hand-written math, and the mask helpers against explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.functional import (
    AndMask,
    CausalMask,
    PaddingMask,
    causal_mask,
    combine_masks,
    mask_to_bias,
    padding_mask,
    scoring,
)
from attnkit.testing import assert_close_to_reference

# ------------------------------------------------------------------------------------------ scoring
B, L, S, E, EK, A = 2, 3, 4, 5, 6, 7


def _loop(fn) -> torch.Tensor:
    """Scores (B, L, S) built one (b, i, j) entry at a time from ``fn(q_vec, k_vec)``."""
    out = torch.empty(B, L, S, dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            for j in range(S):
                out[b, i, j] = fn(b, i, j)
    return out


@pytest.fixture
def qk() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(B, L, E, dtype=torch.float64)
    k = torch.randn(B, S, E, dtype=torch.float64)
    k_other = torch.randn(B, S, EK, dtype=torch.float64)
    return q, k, k_other


def test_dot_and_scaled_dot(qk) -> None:
    q, k, _ = qk
    # float64 scores against the float64 loops at the attnkit.testing policy: E-term dot products
    assert_close_to_reference(scoring.dot_scores(q, k), _loop(lambda b, i, j: q[b, i] @ k[b, j]), reduction=E)
    scaled = _loop(lambda b, i, j: q[b, i] @ k[b, j] / math.sqrt(E))
    assert_close_to_reference(scoring.scaled_dot_scores(q, k), scaled, reduction=E)
    half = _loop(lambda b, i, j: q[b, i] @ k[b, j] * 0.5)
    assert_close_to_reference(scoring.scaled_dot_scores(q, k, scale=0.5), half, reduction=E)


def test_general(qk) -> None:
    q, _, k = qk
    w = torch.randn(E, EK, dtype=torch.float64)
    expected = _loop(lambda b, i, j: q[b, i] @ w @ k[b, j])
    assert_close_to_reference(scoring.general_scores(q, k, w), expected, reduction=EK)  # E- then EK-term sums


def test_additive_bahdanau(qk) -> None:
    q, _, k = qk
    wq, wk = torch.randn(E, A, dtype=torch.float64), torch.randn(EK, A, dtype=torch.float64)
    v, bias = torch.randn(A, dtype=torch.float64), torch.randn(A, dtype=torch.float64)
    expected = _loop(lambda b, i, j: v @ torch.tanh(q[b, i] @ wq + k[b, j] @ wk + bias))
    assert_close_to_reference(scoring.additive_scores(q, k, wq, wk, v, bias), expected, reduction=A)
    no_bias = _loop(lambda b, i, j: v @ torch.tanh(q[b, i] @ wq + k[b, j] @ wk))
    assert_close_to_reference(scoring.additive_scores(q, k, wq, wk, v), no_bias, reduction=A)


def test_concat_is_additive_with_split_weights(qk) -> None:
    q, _, k = qk
    w, v = torch.randn(E + EK, A, dtype=torch.float64), torch.randn(A, dtype=torch.float64)
    by_concat = _loop(lambda b, i, j: v @ torch.tanh(torch.cat([q[b, i], k[b, j]]) @ w))  # v^T tanh(W [q; k])
    assert_close_to_reference(scoring.concat_scores(q, k, w, v), by_concat, reduction=E + EK)
    split = scoring.additive_scores(q, k, w[:E], w[E:], v)
    assert_close_to_reference(scoring.concat_scores(q, k, w, v), split, reduction=E + EK)


def test_cosine(qk) -> None:
    q, k, _ = qk
    expected = _loop(lambda b, i, j: torch.dot(q[b, i], k[b, j]) / (q[b, i].norm() * k[b, j].norm()) / 0.2)
    got = scoring.cosine_scores(q, k, temperature=0.2)
    assert_close_to_reference(got, expected, reduction=E)
    assert got.abs().max() <= 1 / 0.2 + 1e-9


def test_score_function_table() -> None:
    assert set(scoring.SCORE_FUNCTIONS) == {"dot", "scaled_dot", "general", "additive", "concat", "cosine"}


def test_attend_matches_hand_softmax(qk) -> None:
    q, k, _ = qk
    value = torch.randn(B, S, 3, dtype=torch.float64)
    scores = scoring.dot_scores(q, k)
    mask = torch.rand(B, L, S) > 0.3
    mask[0, 1] = False  # fully masked row
    out, w = scoring.attend(scores, value, mask, return_weights=True)
    for b in range(B):
        for i in range(L):
            allowed = mask[b, i]
            expect_w = torch.zeros(S, dtype=torch.float64)
            if allowed.any():
                e = torch.exp(scores[b, i][allowed] - scores[b, i][allowed].max())
                expect_w[allowed] = e / e.sum()
            assert_close_to_reference(w[b, i], expect_w, reduction=S)
            assert_close_to_reference(out[b, i], expect_w @ value[b], reduction=S)
    # integer (0 = masked) and float (added) masks mean the same thing; the integer mask becomes the same boolean
    assert torch.equal(scoring.attend(scores, value, mask.long()), out)
    with pytest.raises(ValueError, match="0 and 1 only"):  # the one integer rule: anything but 0/1 is a mistake
        scoring.attend(scores, value, mask.long() * 2)
    bias = torch.zeros(B, L, S, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    assert_close_to_reference(scoring.attend(scores, value, bias), out, reduction=S)  # float64 both


@pytest.mark.parametrize("name", ["dot", "scaled_dot", "general", "additive", "concat", "cosine"])
def test_scoring_gradcheck(name: str) -> None:
    q = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    value = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    params = {
        "general": [torch.randn(3, 3, dtype=torch.float64, requires_grad=True)],
        "additive": [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        + [torch.randn(4, dtype=torch.float64, requires_grad=True)],
        "concat": [
            torch.randn(6, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(4, dtype=torch.float64, requires_grad=True),
        ],
    }.get(name, [])
    fn = scoring.SCORE_FUNCTIONS[name]

    def run(q, k, value, *p):
        return scoring.attend(fn(q, k, *p), value, torch.tensor([True, False, True]))

    assert torch.autograd.gradcheck(run, (q, k, value, *params))


SCORING_ERRORS = {
    "dot_dim_mismatch": (lambda: scoring.dot_scores(torch.randn(2, 3, 4), torch.randn(2, 5, 6)), "general_scores"),
    "dot_batch_mismatch": (lambda: scoring.dot_scores(torch.randn(2, 3, 4), torch.randn(3, 5, 4)), "leading dims"),
    "general_bad_weight": (
        lambda: scoring.general_scores(torch.randn(2, 3, 4), torch.randn(2, 5, 6), torch.randn(6, 4)),
        "(4, 6)",
    ),
    "additive_bad_sizes": (
        lambda: scoring.additive_scores(
            torch.randn(2, 3, 4), torch.randn(2, 5, 6), torch.randn(4, 7), torch.randn(4, 7), torch.randn(7)
        ),
        "Ek=6",
    ),
    "concat_bad_weight": (
        lambda: scoring.concat_scores(torch.randn(2, 3, 4), torch.randn(2, 5, 6), torch.randn(9, 7), torch.randn(7)),
        "(10, A)",
    ),
    "cosine_temperature": (
        lambda: scoring.cosine_scores(torch.randn(2, 3, 4), torch.randn(2, 5, 4), temperature=0.0),
        "temperature > 0",
    ),
    "attend_length_mismatch": (lambda: scoring.attend(torch.randn(2, 3, 5), torch.randn(2, 4, 6)), "one S"),
    "attend_dropout": (lambda: scoring.attend(torch.randn(2, 3, 5), torch.randn(2, 5, 6), dropout_p=1.5), "[0, 1)"),
    "non_tensor": (lambda: scoring.dot_scores([1.0], torch.randn(2, 5, 4)), "torch.Tensor"),
}


@pytest.mark.parametrize("case", SCORING_ERRORS.values(), ids=SCORING_ERRORS.keys())
def test_scoring_errors(case) -> None:
    call, word = case
    with pytest.raises(ValueError, match=r"^expected .*, got .*; try ") as info:
        call()
    assert word in str(info.value)


# ------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("q_len,k_len", [(3, 3), (2, 5), (5, 2), (1, 4), (4, 1)])
def test_causal_mask_both_alignments(q_len: int, k_len: int) -> None:
    upper = causal_mask(q_len, k_len)
    lower = causal_mask(q_len, k_len, align="lower_right")
    for i in range(q_len):
        for j in range(k_len):
            assert bool(upper[i, j]) == (j <= i)
            assert bool(lower[i, j]) == (j <= i + k_len - q_len)
    assert torch.equal(CausalMask().materialize(q_len, k_len)[0, 0], upper)
    assert torch.equal(CausalMask("lower_right").materialize(q_len, k_len)[0, 0], lower)
    assert CausalMask("lower_right").is_full(1, k_len)
    assert CausalMask("lower_right").is_upper_left(k_len, k_len)


def test_padding_mask_and_object() -> None:
    lengths = torch.tensor([2, 0, 4])
    m = padding_mask(lengths, 4)
    assert m.shape == (3, 1, 1, 4) and m.dtype == torch.bool
    assert m[:, 0, 0].tolist() == [[True, True, False, False], [False] * 4, [True] * 4]
    assert padding_mask(lengths).shape == (3, 1, 1, 4)  # max_len defaults to the longest
    assert padding_mask([1, 2], 3).shape == (2, 1, 1, 3)  # lists are accepted
    assert torch.equal(PaddingMask(lengths).materialize(5, 4), m)
    key_mask = torch.tensor([[True, True, False], [True, False, False]])
    assert PaddingMask.from_bool(key_mask).lengths.tolist() == [2, 1]


def test_and_mask_flattens_and_materialises() -> None:
    both = CausalMask() & PaddingMask(torch.tensor([3, 1]))
    assert isinstance(both, AndMask) and len(both.parts) == 2
    three = both & CausalMask("lower_right")
    assert len(three.parts) == 3
    expected = causal_mask(4, 3) & padding_mask(torch.tensor([3, 1]), 3) & causal_mask(4, 3, align="lower_right")
    assert torch.equal(three.materialize(4, 3), expected)


def test_combine_masks_and_bias() -> None:
    a = torch.tensor([[True, False], [True, True]])
    b = torch.tensor([[True, True], [False, True]])
    assert combine_masks() is None and combine_masks(None) is None
    assert torch.equal(combine_masks(a, None, b), a & b)
    f = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    combined = combine_masks(a, f)
    expected = torch.tensor([[0.5, float("-inf")], [2.0, 0.0]])
    assert torch.equal(combined, expected)
    assert torch.equal(combine_masks(f, f), 2 * f)
    bias = mask_to_bias(a, torch.float64)
    assert bias.dtype == torch.float64 and bias.tolist() == [[0.0, float("-inf")], [0.0, 0.0]]
    assert mask_to_bias(f, torch.float64).dtype == torch.float64
