"""The recurrent attention model (RAM): classify an image from a few glimpses whose places are learned by REINFORCE.

Paper: Mnih, Heess, Graves, Kavukcuoglu. "Recurrent Models of Visual Attention", NeurIPS 2014.
https://arxiv.org/abs/1406.6247

At step ``t`` the retina (:class:`~attnkit.layers.GlimpseSensor`) reads ``scales`` patches around ``l_{t-1}``;
the glimpse network mixes what it saw with where it looked, ``g_t = relu(W_g relu(W_x rho) + W_l relu(W_l0 l))``
(sizes 128 / 128 / 256 as in the paper); the core updates ``h_t`` from ``g_t``; the location policy
(:class:`~attnkit.layers.GaussianGlimpse`) picks ``l_t``; after the last glimpse a linear softmax classifies.

Training is the paper's hybrid loss (:func:`ram_loss`): cross-entropy for the classifier, core and glimpse
network; REINFORCE with a learned baseline for the location policy, the reward being 1 for a correct final
answer and 0 otherwise. Deviations, all stated: the core is an LSTM cell (the paper's classification core
is ``relu(W h + W g)``; the LSTM trains faster on a CPU budget); the first glimpse is at the image centre and the
location layer starts at zero (so untrained paths stay there); ``what="conv"`` adds a small convolutional
network with batch normalisation in front of the glimpse network's first linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._errors import fail
from attnkit._typing import FactoryKwargs
from attnkit.functional import baseline_loss, reinforce_loss
from attnkit.layers.hard import GaussianGlimpse, GlimpseSensor, ValueBaseline

__all__ = ["RAMLoss", "RAMOutput", "RecurrentAttentionModel", "ram_loss"]


@dataclass
class RAMOutput:
    """logits ``(B, classes)``; locations ``(B, T, 2)`` where each glimpse was taken (the first is the centre);
    log_prob ``(B, T - 1)`` of the chosen locations; baseline ``(B, T - 1)`` predicted reward before each choice."""

    logits: Tensor
    locations: Tensor
    log_prob: Tensor
    baseline: Tensor


class RecurrentAttentionModel(nn.Module):
    """Mnih et al. 2014's recurrent attention model for image classification.

    Args:
        glimpses: number of glimpses ``T`` (the first at the centre, ``T - 1`` chosen by the policy).
        patch: side of the finest retina patch (12 for 60x60 images in the paper).
        scales: retina patches per glimpse (3 in the paper).
        channels: image channels.
        hidden: size of the core state (256 in the paper).
        classes: number of classes.
        std: standard deviation of the Gaussian location policy.
        what: ``"linear"`` (the paper's ``relu(W_x rho)``) or ``"conv"`` (two 3x3 convolutions with 32 channels,
            each with batch normalisation, ReLU and 2x2 max-pooling, on the retina patches before that linear
            map; learns far faster on a small budget, see docs/hard.md).

    Shape:
        images ``(B, C, H, W)`` -> :class:`RAMOutput`.

    Example:
        >>> import torch
        >>> ram = RecurrentAttentionModel(glimpses=4, patch=8, scales=2)
        >>> out = ram(torch.rand(3, 1, 60, 60))
        >>> out.logits.shape, out.locations.shape, out.log_prob.shape
        (torch.Size([3, 10]), torch.Size([3, 4, 2]), torch.Size([3, 3]))
    """

    def __init__(
        self,
        *,
        glimpses: int = 6,
        patch: int = 12,
        scales: int = 3,
        channels: int = 1,
        hidden: int = 256,
        classes: int = 10,
        std: float = 0.15,
        what: str = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if glimpses < 1:
            raise fail("glimpses >= 1", repr(glimpses), "glimpses=6")
        kw: FactoryKwargs = {"device": device, "dtype": dtype}
        if what not in ("linear", "conv"):
            raise fail('what in ("linear", "conv")', repr(what), 'what="linear"')
        self.glimpses = glimpses
        self.sensor = GlimpseSensor(patch, scales)
        if what == "conv":
            self.features: nn.Module = nn.Sequential(
                nn.Conv2d(channels * scales, 32, 3, padding=1, **kw),
                nn.BatchNorm2d(32, **kw),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, padding=1, **kw),
                nn.BatchNorm2d(32, **kw),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
            )
            rho_dim = 32 * (patch // 4) ** 2
        else:
            self.features = nn.Flatten()
            rho_dim = channels * scales * patch * patch
        self.what = nn.Linear(rho_dim, 128, **kw)  # h_g
        self.where = nn.Linear(2, 128, **kw)  # h_l
        self.mix_what = nn.Linear(128, 256, **kw)
        self.mix_where = nn.Linear(128, 256, **kw)
        self.core = nn.LSTMCell(256, hidden, **kw)
        self.policy = GaussianGlimpse(hidden, std=std, **kw)
        nn.init.zeros_(self.policy.proj.weight)  # every path starts at the centre; REINFORCE moves it from there
        nn.init.zeros_(self.policy.proj.bias)
        self.baseline = ValueBaseline(hidden, **kw)
        self.classifier = nn.Linear(hidden, classes, **kw)

    def glimpse(self, images: Tensor, loc: Tensor) -> Tensor:
        """The glimpse network: ``(B, C, H, W), (B, 2) -> g (B, 256)``."""
        rho = self.features(self.sensor(images, loc))  # (B, rho_dim)
        h_g = F.relu(self.what(rho))  # (B, 128)
        h_l = F.relu(self.where(loc))  # (B, 128)
        return F.relu(self.mix_what(h_g) + self.mix_where(h_l))  # (B, 256)

    def forward(
        self, images: Tensor, *, generator: torch.Generator | None = None, sample: bool | None = None
    ) -> RAMOutput:
        """``sample``: draw the locations from the policy (default: in training mode) or take its mean (default in
        eval mode). ``sample=True`` in eval mode is Monte Carlo evaluation: batch normalisation uses its running
        statistics while the paths are sampled."""
        if images.dim() != 4:
            raise fail("images of shape (B, C, H, W)", f"{tuple(images.shape)}", "images.unsqueeze(1)")
        b = images.shape[0]
        loc = images.new_zeros(b, 2)  # (B, 2): the first glimpse at the centre
        state = None
        locs, log_probs, baselines = [loc], [], []
        for t in range(self.glimpses):
            state = self.core(self.glimpse(images, loc), state)  # (h, c), each (B, hidden)
            if t < self.glimpses - 1:
                h = state[0]
                baselines.append(self.baseline(h))  # (B,): predicted before the choice, from detached h
                policy_mode = self.policy.training
                if sample is not None:
                    self.policy.training = sample  # the policy has no other train/eval behaviour
                try:
                    choice = self.policy(h, generator=generator)
                finally:
                    self.policy.training = policy_mode
                loc = choice.loc  # (B, 2)
                locs.append(loc)
                log_probs.append(choice.log_prob)  # (B,)
        logits = self.classifier(state[0])  # type: ignore[index]  # (B, classes)
        empty = images.new_zeros(b, 0)
        return RAMOutput(
            logits,
            torch.stack(locs, 1),
            torch.stack(log_probs, 1) if log_probs else empty,
            torch.stack(baselines, 1) if baselines else empty,
        )


@dataclass
class RAMLoss:
    """The parts of the hybrid loss (scalars); ``total`` is what to minimise; ``reward`` ``(B,)``."""

    total: Tensor
    classification: Tensor
    reinforce: Tensor
    baseline: Tensor
    reward: Tensor


def ram_loss(out: RAMOutput, labels: Tensor, *, reinforce_weight: float = 1.0) -> RAMLoss:
    """Hybrid loss of Mnih et al. 2014: cross-entropy + REINFORCE on the locations (reward = correct answer)
    with the learned baseline, + the baseline's squared error. The detach rules of
    :func:`~attnkit.functional.reinforce_loss` / :func:`~attnkit.functional.baseline_loss` apply."""
    ce = F.cross_entropy(out.logits, labels)
    reward = (out.logits.argmax(-1) == labels).to(out.logits.dtype)  # (B,)
    if out.log_prob.shape[1] == 0:
        zero = ce.new_zeros(())
        return RAMLoss(ce, ce, zero, zero, reward)
    rl = reinforce_loss(out.log_prob, reward[:, None], out.baseline)
    bl = baseline_loss(out.baseline, reward[:, None])
    return RAMLoss(ce + reinforce_weight * rl + bl, ce, rl, bl, reward)
