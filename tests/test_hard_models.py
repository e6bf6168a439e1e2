"""Digit scenes, the recurrent attention model and the Show-Attend-and-Tell captioner (shapes, losses, detach)."""

from __future__ import annotations

import pytest
import torch

from attnkit.data.scenes import CAPTION_VOCAB, cluttered_mnist, decode_caption, digit_scenes, translated_mnist
from attnkit.layers.hard import MovingAverageBaseline
from attnkit.models.captioner import ShowAttendTell, caption_loss
from attnkit.models.glimpse import RecurrentAttentionModel, ram_loss
from attnkit.testing import assert_close_to_reference


def _digits(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 4:24, 8:20] = torch.rand(n, 1, 20, 12, generator=g)  # a digit-like blob with a blank border
    return x, torch.arange(n) % 10


def test_translated_and_cluttered_scenes_keep_the_digit() -> None:
    x, _ = _digits()
    t = translated_mnist(x, generator=torch.Generator().manual_seed(1))
    assert t.shape == (12, 1, 60, 60)
    # pasted whole, nothing else: the float32 scene sums (3600 pixels) against the float64 sums of the digits
    assert_close_to_reference(t.sum((1, 2, 3)), x.double().sum((1, 2, 3)), reduction=60 * 60)
    c = cluttered_mnist(x, clutter=4, piece=8, generator=torch.Generator().manual_seed(1))
    assert c.shape == (12, 1, 60, 60) and bool((c.sum((1, 2, 3)) >= x.sum((1, 2, 3)) - 1e-4).all())
    again = cluttered_mnist(x, clutter=4, piece=8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c, again)
    with pytest.raises(ValueError, match="digits of shape"):
        translated_mnist(torch.rand(3, 28, 28))


def test_digit_scenes_captions_read_left_to_right() -> None:
    x, y = _digits()
    s = digit_scenes(x, y, 20, generator=torch.Generator().manual_seed(2))
    assert s.images.shape == (20, 1, 36, 128) and s.tokens.shape == (20, 5)
    for i in range(20):
        k = int(s.lengths[i]) - 1
        assert 2 <= k <= 4 and decode_caption(s.tokens[i]) == s.captions[i]
        centers = s.centers[i, :k]
        assert bool((centers[1:] > centers[:-1]).all())  # words follow the digits from left to right
        assert s.tokens[i, k] == CAPTION_VOCAB.index("<eos>")


def test_ram_loss_trains_every_part_and_respects_detach_rules() -> None:
    torch.manual_seed(0)
    model = RecurrentAttentionModel(glimpses=3, patch=8, scales=2, hidden=32, what="conv")
    x, y = torch.rand(6, 1, 60, 60), torch.randint(0, 10, (6,))
    out = model(x, generator=torch.Generator().manual_seed(0))
    assert out.locations.shape == (6, 3, 2) and out.log_prob.shape == (6, 2) and out.baseline.shape == (6, 2)
    loss = ram_loss(out, y)
    # the REINFORCE term reaches only the location policy; the baseline loss only the baseline
    g_rl = torch.autograd.grad(loss.reinforce, list(model.parameters()), allow_unused=True, retain_graph=True)
    names = [n for n, _ in model.named_parameters()]
    touched = {n for n, g in zip(names, g_rl, strict=True) if g is not None and g.abs().sum() > 0}
    assert touched and all(n.startswith("policy.") for n in touched)
    g_bl = torch.autograd.grad(loss.baseline, list(model.parameters()), allow_unused=True, retain_graph=True)
    touched = {n for n, g in zip(names, g_bl, strict=True) if g is not None and g.abs().sum() > 0}
    assert touched and all(n.startswith("baseline.") for n in touched)
    loss.total.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    a, b = model(x), model(x)
    assert torch.equal(a.locations, b.locations) and torch.equal(a.logits, b.logits)  # eval is deterministic


@pytest.mark.parametrize("attention", ["soft", "hard", "gumbel"])
def test_captioner_loss_and_generation(attention: str) -> None:
    torch.manual_seed(0)
    model = ShowAttendTell(attention, hidden=32, attn_dim=16, feature_dim=16, expected_prob=0.0)
    x, y = _digits()
    s = digit_scenes(x, y, 4, generator=torch.Generator().manual_seed(3))
    out = model(s.images, s.tokens, generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (4, 5, len(CAPTION_VOCAB)) and out.weights.shape == (4, 5, 80)
    assert_close_to_reference(out.probs.sum(-1), torch.ones(4, 5, dtype=torch.float64), reduction=80)  # 80 features
    if attention != "soft":
        assert bool((out.weights.sum(-1) == 1).all()) and bool((out.weights.max(-1).values == 1).all())
    # gumbel: trained through the straight-through weights, so no REINFORCE term (log_prob carries no gradient)
    assert out.log_prob.requires_grad == (attention == "hard")
    baseline = MovingAverageBaseline(0.9)
    loss = caption_loss(out, s.tokens, baseline=baseline, entropy_weight=0.01, normalize=True)
    assert (loss.reinforce.abs() > 0) == (attention == "hard")
    assert int(baseline.count) == (1 if attention == "hard" else 0)
    loss.total.backward()
    assert model.attend.query_proj.weight.grad is not None and model.attend.query_proj.weight.grad.abs().sum() > 0
    if attention == "hard":  # Xu et al.'s trick: steps that use the expected context get no policy gradient
        model.expected_prob = 1.0
        mixed = model(s.images, s.tokens, generator=torch.Generator().manual_seed(0))
        assert torch.equal(mixed.weights, mixed.probs)  # every step takes the expected context: the probabilities
        assert bool((mixed.log_prob == 0).all())
    model.eval()
    ids, gen = model.generate(s.images, max_len=5)
    assert ids.shape == (4, 5) and gen.probs.shape == (4, 5, 80)
