"""HardAttention, baselines, the glimpse sensor and the Gaussian location policy."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit import create_attention
from attnkit.functional import baseline_loss, reinforce_loss
from attnkit.layers import (
    GaussianGlimpse,
    GlimpseSensor,
    HardAttention,
    MovingAverageBaseline,
    ValueBaseline,
)
from attnkit.testing import assert_close_to_reference


@pytest.mark.parametrize("score", ["additive", "dot", "general"])
def test_hard_attention_train_samples_eval_argmax(score: str) -> None:
    attn = HardAttention(16, 16, score=score)
    q, keys, vals = torch.randn(3, 4, 16), torch.randn(3, 7, 16), torch.randn(3, 7, 5)
    ctx, res = attn(q, keys, vals, generator=torch.Generator().manual_seed(0), return_result=True)
    assert ctx.shape == (3, 4, 5) and res.weights.shape == (3, 4, 7) and res.log_prob.shape == (3, 4)
    attn.eval()
    ctx1, w1 = attn(q, keys, vals)
    ctx2, w2 = attn(q, keys, vals)
    assert torch.equal(ctx1, ctx2) and torch.equal(w1, w2)
    assert torch.equal(w1.argmax(-1), attn.scores(q, keys).argmax(-1))


def test_hard_attention_key_mask_and_capture() -> None:
    attn = create_attention("hard", 8, 8)
    assert isinstance(attn, HardAttention)
    q, keys = torch.randn(4, 8), torch.randn(4, 6, 8)
    key_mask = torch.ones(4, 6, dtype=torch.bool)
    key_mask[:, 3:] = False
    key_mask[2] = False  # nothing to choose in row 2
    seen: list[torch.Tensor] = []
    remove = attn.tap.add_observer(lambda _m, weights: seen.append(weights))  # what viz.capture attaches
    ctx, w = attn(q, keys, key_mask=key_mask)
    remove()
    assert bool((w[:, 3:] == 0).all()) and bool((w[2] == 0).all()) and bool((ctx[2] == 0).all())
    assert len(seen) == 1 and torch.equal(seen[0][:, 0, 0], w.detach())  # capture sees the choice
    with pytest.raises(ValueError, match="key_mask"):
        attn(q, keys, key_mask=torch.ones(4, 5, dtype=torch.bool))


def test_hard_attention_reinforce_learns_to_pick_the_rewarded_position() -> None:
    """Policy gradient alone (no gradient through the choice) teaches the module where the reward is."""
    torch.manual_seed(0)
    attn = HardAttention(4, 4, score="general")
    keys = torch.randn(1, 5, 4).expand(64, 5, 4)
    q = torch.randn(1, 4).expand(64, 4)
    opt = torch.optim.Adam(attn.parameters(), lr=0.1)
    base = MovingAverageBaseline(0.8)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        _, res = attn(q, keys, generator=g, return_result=True)
        reward = (res.indices[:, 0] == 3).float()[:, None]  # (B, 1)
        loss = reinforce_loss(res.log_prob, reward, base().expand(64, 1))
        base.update(reward)
        opt.zero_grad()
        loss.backward()
        opt.step()
    attn.eval()
    _, w = attn(q[:1], keys[:1])
    assert int(w.argmax()) == 3


def test_moving_average_and_value_baselines() -> None:
    b = MovingAverageBaseline(0.9)
    for r in (1.0, 1.0, 0.0):
        b.update(torch.tensor([r]))
    assert math.isclose(float(b()), 0.9, rel_tol=1e-6)
    assert "value" in b.state_dict()
    h = torch.randn(5, 8, requires_grad=True)
    vb = ValueBaseline(8)
    baseline_loss(vb(h), torch.ones(5)).backward()
    assert h.grad is None and vb.proj.weight.grad is not None  # detached input: the baseline never trains h


def test_glimpse_sensor_crops_exact_patches() -> None:
    img = torch.arange(60 * 60, dtype=torch.float32).view(1, 1, 60, 60)
    sensor = GlimpseSensor(patch=4, scales=2)
    out = sensor(img, torch.zeros(1, 2))  # centre (30, 30)
    assert torch.equal(out[0, 0], img[0, 0, 28:32, 28:32])  # a crop: exact
    assert torch.equal(out[0, 1], torch.nn.functional.avg_pool2d(img[:, :, 26:34, 26:34], 2)[0, 0])  # the same pool
    corner = sensor(torch.ones(1, 1, 60, 60), torch.tensor([[-1.0, -1.0]]))  # top-left: 3/4 of the patch is outside
    assert float(corner[0, 0].sum()) == 4.0  # only the 2x2 inside the image reads ones
    with pytest.raises(ValueError, match="loc"):
        sensor(img, torch.zeros(2))


def test_gaussian_glimpse_log_prob_and_modes() -> None:
    policy = GaussianGlimpse(6, std=0.2)
    h = torch.randn(5, 6, requires_grad=True)
    g = policy(h, generator=torch.Generator().manual_seed(0))
    dist = torch.distributions.Normal(g.mean.double(), 0.2)  # float64 of the same mean and location
    assert_close_to_reference(g.log_prob, dist.log_prob(g.loc.double()).sum(-1), reduction=2)  # 2 coordinates
    assert not g.loc.requires_grad and bool((g.loc.abs() <= 1).all())
    g.log_prob.sum().backward()
    assert h.grad is None and policy.proj.weight.grad is not None  # detach_input: REINFORCE trains only the policy
    policy.eval()
    g2 = policy(h)
    assert torch.equal(g2.loc, g2.mean.detach())
