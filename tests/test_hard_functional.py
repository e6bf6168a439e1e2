"""hard_attention modes, masks, seeds, Gumbel straight-through, and REINFORCE (unbiasedness, variance, detach rules)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnkit.functional import baseline_loss, hard_attention, reinforce_loss
from attnkit.functional.hard import HARD_MODES
from attnkit.testing import assert_close_to_reference


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mode", HARD_MODES)
def test_shapes_and_values_are_the_chosen_rows(mode: str) -> None:
    scores, value = torch.randn(2, 3, 6), torch.randn(2, 6, 4)  # (B, L, S), (B, S, Ev)
    k = 2 if mode == "topk" else 1
    r = hard_attention(scores, value, mode=mode, k=k, generator=_gen(1))
    assert r.values.shape == (2, 3, 4) and r.probs.shape == (2, 3, 6) and r.weights.shape == (2, 3, 6)
    assert r.log_prob.shape == (2, 3) and r.entropy.shape == (2, 3)
    idx = r.indices if mode == "topk" else r.indices[..., None]  # (B, L, k)
    assert idx.shape == (2, 3, k)
    # float32 results against float64 references of the same inputs (the values are a 6-term weights @ value)
    gathered = torch.stack([value[b, idx[b]] for b in range(2)]).double()  # (B, L, k, Ev)
    assert_close_to_reference(r.values, gathered.mean(-2), reduction=6)
    expected_lp = torch.log_softmax(scores.double(), -1).gather(-1, idx).sum(-1)
    assert_close_to_reference(r.log_prob, expected_lp, reduction=6)
    assert_close_to_reference(r.probs.sum(-1), torch.ones(2, 3, dtype=torch.float64), reduction=6)


def test_argmax_and_topk_are_deterministic_and_pick_the_best() -> None:
    scores, value = torch.randn(4, 5, 7), torch.randn(4, 7, 3)
    a = hard_attention(scores, value, mode="argmax")
    b = hard_attention(scores, value, mode="argmax")
    assert torch.equal(a.indices, scores.argmax(-1)) and torch.equal(a.values, b.values)
    t = hard_attention(scores, value, mode="topk", k=3)
    assert torch.equal(t.indices, scores.topk(3, dim=-1).indices)


@pytest.mark.parametrize("mode", ["sample", "gumbel"])
def test_generator_makes_draws_reproducible(mode: str) -> None:
    scores, value = torch.randn(8, 4, 10), torch.randn(8, 10, 2)
    a = hard_attention(scores, value, mode=mode, generator=_gen(7))
    b = hard_attention(scores, value, mode=mode, generator=_gen(7))
    c = hard_attention(scores, value, mode=mode, generator=_gen(8))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    assert not torch.equal(a.indices, c.indices)


def test_sampling_follows_the_softmax() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    n = 20_000
    r = hard_attention(logits.expand(n, 1, 4), torch.zeros(n, 4, 1), mode="sample", generator=_gen(3))
    freq = torch.bincount(r.indices.flatten(), minlength=4).double() / n
    p = torch.softmax(logits.double(), 0)
    se = torch.sqrt(p * (1 - p) / n)
    assert bool(((freq - p).abs() < 5 * se).all()), (freq, p)


@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 9)),
    p_allow=st.floats(0.0, 1.0),
    mode=st.sampled_from(HARD_MODES),
)
def test_masked_positions_are_never_chosen(seed: int, shape: tuple[int, int, int], p_allow: float, mode: str) -> None:
    g = _gen(seed)
    b, l, s = shape
    scores = torch.randn(b, l, s, generator=g) * 5
    value = torch.randn(b, s, 2, generator=g)
    mask = torch.rand(b, l, s, generator=g) < p_allow  # True = may be chosen
    k = min(2, s) if mode == "topk" else 1
    r = hard_attention(scores, value, mode=mode, k=k, mask=mask, generator=g)
    idx = r.indices if mode == "topk" else r.indices[..., None]  # (B, L, k)
    dead = ~mask.any(-1)  # (B, L)
    assert bool((idx[dead] == -1).all())
    live = idx >= 0
    assert bool(mask.gather(-1, idx.clamp(min=0))[live].all())  # every choice is an allowed position
    assert bool((r.weights.detach()[~mask] == 0).all()) and bool((r.probs[~mask] == 0).all())
    assert torch.isfinite(r.values).all() and torch.isfinite(r.log_prob).all() and torch.isfinite(r.entropy).all()
    if mode != "topk":  # one choice per live row
        assert bool((idx[~dead] >= 0).all())


@pytest.mark.parametrize("mode", HARD_MODES)
def test_fully_masked_rows_give_zeros_and_zero_gradients(mode: str) -> None:
    scores = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[0, 1] = False  # row (0, 1) can choose nothing
    r = hard_attention(scores, value, mode=mode, k=2 if mode == "topk" else 1, mask=mask, generator=_gen(0))
    assert bool((r.values[0, 1] == 0).all()) and r.log_prob[0, 1].item() == 0.0 and r.entropy[0, 1].item() == 0.0
    assert bool((r.indices[0, 1] == -1).all())
    (r.values.sum() + r.log_prob.sum() + r.entropy.sum() + (r.weights * torch.randn(2, 3, 5)).sum()).backward()
    assert bool((scores.grad[0, 1] == 0).all()) and torch.isfinite(scores.grad).all()
    assert torch.isfinite(value.grad).all()


def test_float_mask_is_added() -> None:
    scores, value = torch.randn(1, 2, 4), torch.randn(1, 4, 3)
    bias = torch.tensor([0.0, float("-inf"), 0.0, float("-inf")])
    r = hard_attention(scores, value, mode="sample", mask=bias, generator=_gen(2))
    assert bool((r.indices % 2 == 0).all())
    assert_close_to_reference(r.probs, torch.softmax(scores.double() + bias.double(), -1), reduction=4)


def test_gumbel_straight_through_forward_one_hot_backward_relaxed() -> None:
    torch.manual_seed(0)
    scores = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    value = torch.randn(3, 6, 4, dtype=torch.float64)
    upstream = torch.randn(3, 2, 4, dtype=torch.float64)
    tau = 0.7
    r = hard_attention(scores, value, mode="gumbel", tau=tau, generator=_gen(5))
    one_hot = torch.nn.functional.one_hot(r.indices, 6).to(torch.float64)
    assert torch.equal(r.weights.detach(), one_hot)  # forward: exactly one-hot
    assert torch.equal(r.values.detach(), one_hot @ value)
    (g_st,) = torch.autograd.grad((r.values * upstream).sum(), scores)

    # the same noise, drawn again from the same seed, through the relaxed softmax
    u = torch.rand(scores.shape, generator=_gen(5), dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp(torch.finfo(torch.float64).tiny, 1.0 - 1e-16)))
    relaxed = torch.softmax((scores + gumbel) / tau, -1)  # (B, L, S)
    assert torch.equal(relaxed.argmax(-1), r.indices)
    (g_soft,) = torch.autograd.grad(((relaxed @ value) * upstream).sum(), scores)
    assert_close_to_reference(g_st, g_soft, reduction=6, grad=True)  # float64 both; S = 6 keys


def test_log_prob_gradcheck() -> None:
    scores = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 4, 2, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True])

    def f(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = hard_attention(s, value, mode="sample", mask=mask, generator=_gen(4))
        return r.log_prob, r.entropy

    assert torch.autograd.gradcheck(f, (scores,))


def test_bad_inputs_raise_value_errors() -> None:
    s, v = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="expected mode"):
        hard_attention(s, v, mode="soft")
    with pytest.raises(ValueError, match="k == 1"):
        hard_attention(s, v, mode="sample", k=2)
    with pytest.raises(ValueError, match="one S"):
        hard_attention(s, torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="mask"):
        hard_attention(s, v, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="tau > 0"):
        hard_attention(s, v, mode="gumbel", tau=0.0)
    with pytest.raises(ValueError, match="reward"):
        reinforce_loss(torch.randn(4, 3), torch.randn(4))


# ------------------------------------------------------------------------------------------------- REINFORCE


def _per_sample_gradients(logits: torch.Tensor, rewards: torch.Tensor, n: int, baseline: torch.Tensor | None):
    """n independent REINFORCE estimates of d E[r] / d logits, one per row, through reinforce_loss."""
    rep = logits.detach().repeat(n, 1).requires_grad_()  # (n, K): one copy of the parameters per sample
    r = hard_attention(rep[:, None, :], torch.zeros(n, rep.shape[1], 1, dtype=rep.dtype), generator=_gen(11))
    reward = rewards[r.indices[:, 0]][:, None]  # (n, 1)
    loss = reinforce_loss(r.log_prob, reward, baseline)  # mean over the n samples
    (grad,) = torch.autograd.grad(loss, rep)
    return -grad * n  # (n, K): the i-th row is the i-th sample's estimate


def test_reinforce_is_unbiased_and_the_baseline_lowers_the_variance(capsys: pytest.CaptureFixture[str]) -> None:
    logits = torch.tensor([0.5, -0.3, 1.2, 0.0], dtype=torch.float64)
    rewards = torch.tensor([1.0, 3.0, 2.0, 5.0], dtype=torch.float64)
    p = torch.softmax(logits, 0)
    exact = p * (rewards - (p * rewards).sum())  # d/d logits of sum_k p_k r_k
    n = 40_000
    # a baseline that does not depend on the draw: the mean reward of an independent earlier batch
    earlier = hard_attention(
        logits.expand(2000, 1, 4), torch.zeros(2000, 4, 1, dtype=torch.float64), generator=_gen(99)
    )
    b = rewards[earlier.indices[:, 0]].mean().reshape(1, 1)
    variances = {}
    for name, baseline in (("none", None), ("baseline", b)):
        est = _per_sample_gradients(logits, rewards, n, baseline)  # (n, K)
        mean, se = est.mean(0), est.std(0) / math.sqrt(n)
        assert bool(((mean - exact).abs() < 5 * se).all()), (name, mean, exact, se)
        variances[name] = est.var(0).sum().item()
    ratio = variances["none"] / variances["baseline"]
    with capsys.disabled():
        print(
            f"\nREINFORCE gradient variance: no baseline {variances['none']:.3f}, "
            f"baseline {variances['baseline']:.3f} ({ratio:.1f}x lower)"
        )
    assert ratio > 2.0


def test_detach_rules() -> None:
    logits = torch.randn(5, 3, requires_grad=True)
    base_in = torch.randn(5, 1, requires_grad=True)
    baseline = base_in * 2.0  # a learned baseline's output
    reward_src = torch.randn(5, 1, requires_grad=True)
    r = hard_attention(logits[:, None], torch.zeros(5, 3, 1), generator=_gen(0))
    loss = reinforce_loss(r.log_prob, reward_src * 1.0, baseline)
    g_logits, g_base, g_rew = torch.autograd.grad(loss, (logits, base_in, reward_src), allow_unused=True)
    assert g_logits is not None and g_logits.abs().sum() > 0
    assert g_base is None and g_rew is None  # policy gradient never reaches the baseline or the reward
    bl = baseline_loss(baseline, reward_src * 1.0)
    g_logits2, g_base2, g_rew2 = torch.autograd.grad(bl, (logits, base_in, reward_src), allow_unused=True)
    assert g_logits2 is None and g_rew2 is None  # baseline loss never reaches the policy (nor the reward)
    assert g_base2 is not None and g_base2.abs().sum() > 0


def test_entropy_bonus_and_normalize() -> None:
    logits = torch.zeros(6, 4, requires_grad=True)
    r = hard_attention(logits[:, None], torch.zeros(6, 4, 1), generator=_gen(0))
    reward = torch.zeros(6, 1)
    loss = reinforce_loss(r.log_prob, reward, entropy=r.entropy, entropy_weight=0.5)
    # the closed form in float64: -0.5 x the entropy of the uniform 4-way choice, averaged over 6 rows
    assert_close_to_reference(loss, -0.5 * torch.tensor(math.log(4.0), dtype=torch.float64), reduction=6)
    reward = torch.arange(6.0)[:, None]
    a = reinforce_loss(r.log_prob, reward, normalize=True)
    b = reinforce_loss(r.log_prob, reward * 10 + 3, normalize=True)
    # normalising makes the loss invariant to an affine change of the rewards: both against the float64 loss of
    # the unscaled rewards (never against each other); mean and std over the 6 rewards
    want = reinforce_loss(r.log_prob.double(), reward.double(), normalize=True)
    assert_close_to_reference(a, want, reduction=6, msg="rewards")
    assert_close_to_reference(b, want, reduction=6, msg="rewards x 10 + 3")


def test_integer_mask_follows_the_one_rule() -> None:
    """An integer mask reads 0 = masked, 1 = may choose (as a boolean); any other value raises one message."""
    scores = torch.randn(2, 3, 5, dtype=torch.float64)
    value = torch.randn(2, 5, 4, dtype=torch.float64)
    mask = torch.rand(2, 3, 5) > 0.4
    mask[..., 0] = True
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    as_bool = hard_attention(scores, value, mode="sample", mask=mask, generator=g1)
    as_int = hard_attention(scores, value, mode="sample", mask=mask.long(), generator=g2)
    assert torch.equal(as_bool.values, as_int.values) and torch.equal(as_bool.indices, as_int.indices)
    with pytest.raises(ValueError, match="0 and 1 only"):
        hard_attention(scores, value, mode="argmax", mask=mask.long() * 3)
