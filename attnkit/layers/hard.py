"""Hard attention modules: a categorical choice over positions, a Gaussian glimpse policy, a multi-resolution retina,
and the baselines that make REINFORCE train.

Papers:

* Mnih, Heess, Graves, Kavukcuoglu. "Recurrent Models of Visual Attention", NeurIPS 2014.
  https://arxiv.org/abs/1406.6247 (glimpse sensor, Gaussian location policy, learned baseline)
* Xu et al. "Show, Attend and Tell: Neural Image Caption Generation with Visual Attention", ICML 2015.
  https://arxiv.org/abs/1502.03044 (stochastic "hard" attention over a feature grid, moving-average baseline,
  entropy bonus)

:class:`HardAttention` has the calling convention of the soft RNN-decoder attentions in
:mod:`attnkit.layers.soft` (``context, weights = attn(query, keys, values, key_mask=...)``); its weights are the
one-hot choice, handed to a :class:`~attnkit.layers.WeightsTap` named ``tap`` as ``(B, 1, Lq, S)`` so
``attnkit.viz.capture`` sees where the module looked. ``return_result=True`` also returns the
:class:`~attnkit.functional.hard.HardAttentionResult` (log-probabilities and entropy for REINFORCE).

Mask meaning (everywhere in attnkit): ``key_mask`` is ``(B, S)`` boolean with ``True`` = a real position that may
be chosen. Masked positions are never chosen; rows with none give zero context, zero weights and ``log_prob 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._errors import fail
from attnkit._typing import FactoryKwargs
from attnkit.functional import scoring
from attnkit.functional._validate import check_tensor
from attnkit.functional.hard import HARD_MODES, HardAttentionResult, hard_attention
from attnkit.functional.mask_args import normalize_masks

from .attend import WeightsTap
from .registry import register_attention

__all__ = [
    "GaussianGlimpse",
    "GlimpseLocation",
    "GlimpseSensor",
    "HardAttention",
    "MovingAverageBaseline",
    "ValueBaseline",
]

_SCORES = ("additive", "dot", "general")


@register_attention("hard", "hard_attention")
class HardAttention(nn.Module):
    """Stochastic (hard) attention: choose one position (or the top ``k``) of the keys and return its value.

    Scores are computed as in soft attention (``"additive"``: ``v^T tanh(W q + U k)``, ``"dot"``: ``q . k``,
    ``"general"``: ``q W k``); the choice is then made by :func:`attnkit.functional.hard_attention`. In training
    mode the module samples (``mode="sample"``, or ``"gumbel"`` for the straight-through estimator); in eval mode
    it takes the ``eval_mode`` choice (``"argmax"`` by default), so ``model.eval()`` makes it deterministic.

    Args:
        query_dim: size ``Dq`` of the query (decoder state).
        key_dim: size ``Dk`` of the keys.
        attn_dim: hidden size of the ``"additive"`` score (default ``key_dim``).
        score: ``"additive"``, ``"dot"`` or ``"general"``.
        mode: choice in training mode (``"sample"``, ``"gumbel"``, ``"argmax"`` or ``"topk"``).
        eval_mode: choice in eval mode (default ``"argmax"``).
        k: positions for ``"topk"``.
        tau: Gumbel-softmax temperature for ``"gumbel"``.

    Shape:
        query ``(B, Dq)`` or ``(B, Lq, Dq)``; keys ``(B, S, Dk)``; values ``(B, S, Dv)`` (default: the keys);
        key_mask ``(B, S)`` boolean, ``True`` = may be chosen. Returns context ``(B, Dv)`` / ``(B, Lq, Dv)`` and
        weights (the one-hot choice) ``(B, S)`` / ``(B, Lq, S)``; with ``return_result=True`` the second item is
        the :class:`~attnkit.functional.hard.HardAttentionResult` (fields over ``(B, Lq, ...)``).

    Example:
        >>> import torch
        >>> from attnkit.layers import HardAttention
        >>> attn = HardAttention(query_dim=32, key_dim=16)
        >>> s, h = torch.randn(2, 32), torch.randn(2, 9, 16)          # decoder state (B, Dq), features (B, S, Dk)
        >>> ctx, w = attn(s, h)
        >>> ctx.shape, w.shape, w.sum(-1).tolist()                     # one position chosen per row
        (torch.Size([2, 16]), torch.Size([2, 9]), [1.0, 1.0])
        >>> ctx, res = attn(s, h, return_result=True)
        >>> res.log_prob.shape                                         # (B, Lq) for REINFORCE
        torch.Size([2, 1])
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        attn_dim: int | None = None,
        *,
        score: str = "additive",
        mode: str = "sample",
        eval_mode: str = "argmax",
        k: int = 1,
        tau: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        attn_dim = key_dim if attn_dim is None else attn_dim
        for name, val in (("query_dim", query_dim), ("key_dim", key_dim), ("attn_dim", attn_dim)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise fail(f"{name} to be a positive int", repr(val), f"{name}=128")
        if score not in _SCORES:
            raise fail(f"score in {_SCORES}", repr(score), "score='additive'")
        for name, m in (("mode", mode), ("eval_mode", eval_mode)):
            if m not in HARD_MODES:
                raise fail(f"{name} in {HARD_MODES}", repr(m), f"{name}='sample' or 'argmax'")
        if score == "dot" and query_dim != key_dim:
            raise fail("query_dim == key_dim for score='dot'", f"{query_dim} and {key_dim}", "score='general'")
        kw: FactoryKwargs = {"device": device, "dtype": dtype}
        self.query_dim, self.key_dim, self.attn_dim = query_dim, key_dim, attn_dim
        self.score, self.mode, self.eval_mode, self.k, self.tau = score, mode, eval_mode, k, tau
        if score == "additive":
            self.query_proj = nn.Linear(query_dim, attn_dim, **kw)
            self.key_proj = nn.Linear(key_dim, attn_dim, bias=False, **kw)
            self.v = nn.Linear(attn_dim, 1, bias=False, **kw)
        elif score == "general":
            self.weight = nn.Parameter(torch.empty(query_dim, key_dim, **kw))
            nn.init.normal_(self.weight, std=query_dim**-0.5)
        self.tap = WeightsTap()

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """Unnormalised scores: ``(B, Lq, Dq), (B, S, Dk) -> (B, Lq, S)``."""
        if self.score == "additive":
            return scoring.additive_scores(
                query,
                keys,
                self.query_proj.weight.t(),
                self.key_proj.weight.t(),
                self.v.weight[0],
                self.query_proj.bias,
            )
        if self.score == "dot":
            return scoring.dot_scores(query, keys)
        return scoring.general_scores(query, keys, self.weight)

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        return_result: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, HardAttentionResult]:
        check_tensor("query", query)
        check_tensor("keys", keys)
        if keys.dim() != 3 or keys.shape[-1] != self.key_dim:
            raise fail(f"keys of shape (B, S, {self.key_dim})", f"{tuple(keys.shape)}", "keys.view(B, S, key_dim)")
        if query.dim() not in (2, 3) or query.shape[-1] != self.query_dim or query.shape[0] != keys.shape[0]:
            raise fail(
                f"query of shape (B, {self.query_dim}) or (B, Lq, {self.query_dim}) with B = {keys.shape[0]}",
                f"{tuple(query.shape)}",
                "the decoder state of one step (B, Dq) or of all steps (B, Lq, Dq)",
            )
        one_step = query.dim() == 2
        q = query.unsqueeze(1) if one_step else query  # (B, Lq, Dq)
        b, s = keys.shape[:2]
        v = keys if values is None else check_tensor("values", values)  # (B, S, Dv)
        if v.dim() != 3 or v.shape[:2] != (b, s):
            raise fail(f"values of shape (B, S, Dv) = ({b}, {s}, Dv)", f"{tuple(v.shape)}", "values=None (use keys)")
        mask = None
        if key_mask is not None:  # the one normaliser's key_mask rule: boolean or integer 0/1, True = real key
            args = normalize_masks(None, key_mask, batch=b, heads=1, q_len=q.shape[1], k_len=s, dtype=keys.dtype,
                                   device=keys.device)
            mask = cast(Tensor, args.mask).view(b, 1, s)  # (B, 1, S)
        mode = self.mode if self.training else self.eval_mode
        res = hard_attention(
            self.scores(q, keys),
            v,
            mode=mode,
            k=self.k if mode == "topk" else 1,
            tau=self.tau,
            mask=mask,
            generator=generator,
        )
        self.tap(res.weights.unsqueeze(1))  # observers see (B, 1, Lq, S)
        context, weights = res.values, res.weights  # (B, Lq, Dv), (B, Lq, S)
        if one_step:
            context, weights = context.squeeze(1), weights.squeeze(1)
        return (context, res) if return_result else (context, weights)

    def extra_repr(self) -> str:
        return (
            f"query_dim={self.query_dim}, key_dim={self.key_dim}, score={self.score!r}, mode={self.mode!r}, "
            f"eval_mode={self.eval_mode!r}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Baselines for REINFORCE
# ---------------------------------------------------------------------------------------------------------------


class MovingAverageBaseline(nn.Module):
    """An exponential moving average of the reward: ``b <- momentum * b + (1 - momentum) * mean(reward)``.

    Use ``baseline()`` *before* ``update(reward)`` in a step, so the baseline never depends on the draws it is
    subtracted from (the estimate stays unbiased). The value is a buffer, so it is saved in the state dict.

    Example:
        >>> import torch
        >>> b = MovingAverageBaseline(momentum=0.5)
        >>> b.update(torch.tensor([1.0, 3.0])); float(b())           # the first update sets the average
        2.0
        >>> b.update(torch.tensor([4.0])); float(b())
        3.0
    """

    value: Tensor  # buffers (registered in __init__)
    count: Tensor

    def __init__(
        self, momentum: float = 0.9, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise fail("momentum in [0, 1)", repr(momentum), "momentum=0.9")
        self.momentum = momentum
        self.register_buffer("value", torch.zeros((), device=device, dtype=dtype or torch.float32))
        self.register_buffer("count", torch.zeros((), device=device, dtype=torch.long))

    def forward(self) -> Tensor:
        """The current baseline (a detached scalar)."""
        return self.value.detach().clone()

    @torch.no_grad()
    def update(self, reward: Tensor) -> None:
        m = reward.detach().to(self.value.dtype).mean()
        self.value.copy_(m if int(self.count) == 0 else self.momentum * self.value + (1 - self.momentum) * m)
        self.count += 1

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


class ValueBaseline(nn.Module):
    """A learned baseline ``b = Linear(h)``: the expected reward predicted from features ``h``.

    The features are **detached** by default, so training the baseline (with
    :func:`attnkit.functional.baseline_loss`) never changes the network that produced them (the policy).

    Shape:
        h ``(..., D)`` -> ``(...)``.

    Example:
        >>> import torch
        >>> ValueBaseline(8)(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5])
    """

    def __init__(
        self,
        in_dim: int,
        *,
        detach_input: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.detach_input = detach_input
        self.proj = nn.Linear(in_dim, 1, device=device, dtype=dtype)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(h.detach() if self.detach_input else h).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Mnih et al. 2014: retina and Gaussian location policy
# ---------------------------------------------------------------------------------------------------------------


class GlimpseSensor(nn.Module):
    """The multi-resolution retina ``rho(x, l)`` of Mnih et al. 2014.

    Extracts ``scales`` square patches centred at ``l``: the first ``patch x patch`` pixels wide, each next one
    twice as wide, every one average-pooled back to ``patch x patch``; they are stacked on the channel axis.
    Locations are ``(x, y)`` in ``[-1, 1]``: ``(0, 0)`` is the image centre, ``(-1, -1)`` its top-left corner.
    Pixels outside the image read as zero. Crops are exact (integer pixel offsets), so the sensor is a
    readable gather with no interpolation; it has no parameters and no gradient with respect to ``l``.

    Args:
        patch: side of the finest patch (the paper's ``g_w``; 12 for 60x60 images).
        scales: number of patches (3 in the paper's translated-MNIST runs).

    Shape:
        images ``(B, C, H, W)``, loc ``(B, 2)`` -> ``(B, scales * C, patch, patch)``.

    Example:
        >>> import torch
        >>> sensor = GlimpseSensor(patch=8, scales=3)
        >>> sensor(torch.rand(2, 1, 60, 60), torch.zeros(2, 2)).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(self, patch: int = 12, scales: int = 3) -> None:
        super().__init__()
        if patch < 1 or scales < 1:
            raise fail("patch >= 1 and scales >= 1", f"patch={patch}, scales={scales}", "patch=12, scales=3")
        self.patch, self.scales = patch, scales

    def centers(self, loc: Tensor, height: int, width: int) -> Tensor:
        """Pixel coordinates ``(row, col)`` of locations ``(B, 2)`` as ``(x, y)`` in ``[-1, 1]``: ``(B, 2)``."""
        col = (loc[:, 0].clamp(-1, 1) + 1) * 0.5 * width  # (B,)
        row = (loc[:, 1].clamp(-1, 1) + 1) * 0.5 * height  # (B,)
        return torch.stack([row, col], dim=-1)

    def forward(self, images: Tensor, loc: Tensor) -> Tensor:
        check_tensor("images", images)
        check_tensor("loc", loc)
        if images.dim() != 4 or loc.shape != (images.shape[0], 2):
            raise fail(
                "images (B, C, H, W) and loc (B, 2)", f"{tuple(images.shape)} and {tuple(loc.shape)}", "loc.view(B, 2)"
            )
        b, c, h, w = images.shape
        big = self.patch * 2 ** (self.scales - 1)
        pad = big // 2 + 1
        padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, Hp, Wp) with Hp = H + 2p
        wp = w + 2 * pad
        flat = padded.flatten(2)  # (B, C, Hp * Wp)
        centre = self.centers(loc.detach(), h, w)  # (B, 2) in pixels
        out = []
        for i in range(self.scales):
            size = self.patch * 2**i
            top = torch.floor(centre - size / 2).long() + pad  # (B, 2): top-left corner in the padded image
            limit = torch.tensor([h + 2 * pad - size, w + 2 * pad - size], device=images.device)
            top = torch.minimum(top.clamp(min=0), limit)  # (B, 2): never outside the padded image
            offs = torch.arange(size, device=images.device)  # (size,)
            rows = top[:, 0, None] + offs  # (B, size)
            cols = top[:, 1, None] + offs  # (B, size)
            index = (rows[:, :, None] * wp + cols[:, None, :]).flatten(1)  # (B, size * size) into Hp * Wp
            crop = flat.gather(2, index[:, None, :].expand(b, c, -1)).view(b, c, size, size)  # (B, C, size, size)
            out.append(F.avg_pool2d(crop, 2**i) if i else crop)  # (B, C, patch, patch)
        return torch.cat(out, dim=1)  # (B, scales * C, patch, patch)

    def extra_repr(self) -> str:
        return f"patch={self.patch}, scales={self.scales}"


@dataclass
class GlimpseLocation:
    """A location chosen by :class:`GaussianGlimpse`: ``loc`` ``(B, 2)`` (no gradient), ``log_prob`` ``(B,)``
    (differentiable with respect to the policy), ``mean`` ``(B, 2)``."""

    loc: Tensor
    log_prob: Tensor
    mean: Tensor


class GaussianGlimpse(nn.Module):
    """The location policy of Mnih et al. 2014: ``l ~ N(tanh(Linear(h)), std^2 I)``, clipped to ``[-1, 1]``.

    In training mode the location is sampled (the mean plus Gaussian noise of fixed ``std``); in eval mode it is
    the mean. ``log_prob`` is the Gaussian log-density of the location actually taken, a function of the mean
    only (the sample itself is detached), which is what REINFORCE needs. With ``detach_input=True`` (default,
    as in most RAM implementations) the policy's gradient trains only this module's weights, not the core.

    Args:
        in_dim: size of the recurrent state ``h``.
        std: standard deviation of the location noise (in units of half the image side).
        loc_dim: 2 for images.

    Shape:
        h ``(B, D)`` -> :class:`GlimpseLocation` with loc ``(B, 2)``, log_prob ``(B,)``, mean ``(B, 2)``.

    Example:
        >>> import torch
        >>> policy = GaussianGlimpse(32, std=0.1)
        >>> g = policy(torch.randn(4, 32), generator=torch.Generator().manual_seed(0))
        >>> g.loc.shape, g.log_prob.shape, bool(g.loc.abs().max() <= 1)
        (torch.Size([4, 2]), torch.Size([4]), True)
    """

    def __init__(
        self,
        in_dim: int,
        *,
        std: float = 0.15,
        loc_dim: int = 2,
        detach_input: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if std <= 0:
            raise fail("std > 0", repr(std), "std=0.15")
        self.std, self.detach_input = std, detach_input
        self.proj = nn.Linear(in_dim, loc_dim, device=device, dtype=dtype)

    def forward(self, h: Tensor, *, generator: torch.Generator | None = None) -> GlimpseLocation:
        mean = torch.tanh(self.proj(h.detach() if self.detach_input else h))  # (B, 2)
        if self.training:
            device = mean.device if generator is None else generator.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
            loc = (mean.detach() + self.std * noise).clamp(-1.0, 1.0)  # (B, 2)
        else:
            loc = mean.detach()
        log_prob = (-((loc - mean) ** 2) / (2 * self.std**2) - math.log(self.std) - 0.5 * math.log(2 * math.pi)).sum(
            -1
        )  # (B,)
        return GlimpseLocation(loc, log_prob, mean)

    def extra_repr(self) -> str:
        return f"std={self.std}, detach_input={self.detach_input}"
