"""Hard (stochastic) attention: pick positions instead of averaging them, and the REINFORCE estimator that trains it.

Papers:
    Mnih, Heess, Graves, Kavukcuoglu 2014, "Recurrent Models of Visual Attention", https://arxiv.org/abs/1406.6247
    Xu et al. 2015, "Show, Attend and Tell: Neural Image Caption Generation with Visual Attention",
    https://arxiv.org/abs/1502.03044
    Williams 1992, "Simple statistical gradient-following algorithms for connectionist reinforcement learning",
    https://doi.org/10.1007/BF00992696
    Jang, Gu, Poole 2017, "Categorical Reparameterization with Gumbel-Softmax", https://arxiv.org/abs/1611.01144

Soft attention returns ``softmax(scores) @ value``. Hard attention draws one position ``i`` from the policy
``p = softmax(scores)`` and returns ``value[i]``. The draw has no gradient, so the scores are trained either

* by REINFORCE: ``grad E[R] = E[(R - b) grad log p(i)]`` (:func:`reinforce_loss`, with a baseline ``b`` that
  lowers the variance and keeps the estimate unbiased as long as ``b`` does not depend on the draw), or
* by the Gumbel-softmax straight-through estimator (``mode="gumbel"``): the forward pass uses the one-hot choice,
  the backward pass the gradient of the relaxed ``softmax((scores + g) / tau)`` with the same Gumbel noise ``g``.

Modes of :func:`hard_attention`:

===========  =================================================  ============================================
mode         choice                                             gradient to ``scores``
===========  =================================================  ============================================
``sample``   one draw from ``softmax(scores)`` (Gumbel-max)     none through the choice; use ``log_prob``
``argmax``   the most probable position (deterministic)         none through the choice
``topk``     the ``k`` most probable positions, averaged        none through the choice
``gumbel``   one draw, as ``sample``                            straight-through: the relaxed softmax's
===========  =================================================  ============================================

Mask meaning (as everywhere in attnkit): a boolean mask is ``True`` where a position **may be chosen**; a float
mask is **added** to the scores (``-inf`` forbids a position). Masked positions are never chosen. A row with no
allowed position (fully masked) chooses nothing: its ``indices`` are ``-1``, and its ``values``, ``weights``,
``probs``, ``log_prob`` and ``entropy`` are zero, with zero gradients.

Detach rules of the REINFORCE helpers (tested):

* :func:`reinforce_loss` detaches ``reward`` and ``baseline``: the policy gradient never flows into the baseline
  or into whatever produced the reward.
* :func:`baseline_loss` detaches ``reward``; its gradient reaches only the baseline's own inputs. Learned
  baselines (:class:`attnkit.layers.hard.ValueBaseline`) detach their input features so that the baseline loss
  never trains the policy.

Example:
    >>> import torch
    >>> from attnkit.functional import hard_attention
    >>> scores, value = torch.randn(2, 3, 5), torch.randn(2, 5, 4)           # (B, L, S), (B, S, Ev)
    >>> r = hard_attention(scores, value, mode="sample", generator=torch.Generator().manual_seed(0))
    >>> r.values.shape, r.indices.shape, r.log_prob.shape, r.probs.shape      # (B, L, Ev), (B, L), (B, L), (B, L, S)
    (torch.Size([2, 3, 4]), torch.Size([2, 3]), torch.Size([2, 3]), torch.Size([2, 3, 5]))
    >>> bool((r.values == value.gather(1, r.indices[..., None].expand(-1, -1, 4))).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _validate as V
from ._reference import masked_softmax

__all__ = ["HARD_MODES", "HardAttentionResult", "baseline_loss", "hard_attention", "reinforce_loss"]

HARD_MODES = ("sample", "argmax", "topk", "gumbel")


@dataclass
class HardAttentionResult:
    """What :func:`hard_attention` returns.

    Attributes:
        values: ``(..., L, Ev)`` the chosen values (the mean of the ``k`` chosen ones for ``topk``).
        indices: ``(..., L)`` chosen positions (``(..., L, k)`` for ``topk``); ``-1`` in fully masked rows.
        log_prob: ``(..., L)`` log-probability of the choice under ``probs`` (for ``topk``, the sum over the
            chosen positions); differentiable with respect to the scores. Zero in fully masked rows.
        probs: ``(..., L, S)`` the policy ``softmax(scores)`` after the mask (zero rows where fully masked).
        weights: ``(..., L, S)`` the selection that produced ``values``: one-hot (``1/k`` on each of the ``k``
            for ``topk``). In ``gumbel`` mode the forward value is exactly one-hot and its gradient is the
            relaxed softmax's (straight-through).
        entropy: ``(..., L)`` entropy of ``probs`` in nats (differentiable; for an entropy bonus).
    """

    values: Tensor
    indices: Tensor
    log_prob: Tensor
    probs: Tensor
    weights: Tensor
    entropy: Tensor


def _allowed_and_logits(scores: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Boolean ``allowed`` (True = may choose) and the scores with forbidden positions at ``-inf``."""
    if mask is None:
        allowed = torch.ones_like(scores, dtype=torch.bool)
    else:
        V.check_tensor("mask", mask)
        try:
            shape = torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError:
            shape = None
        if shape != scores.shape:
            raise V.fail(
                f"a mask that broadcasts to the scores' shape {tuple(scores.shape)}",
                f"{tuple(mask.shape)}",
                "a boolean mask (..., L, S) or (..., 1, S) with True = may choose",
            )
        if mask.dtype == torch.bool:
            allowed = mask.expand_as(scores)
        elif mask.dtype.is_floating_point:
            scores = scores + mask.to(scores.dtype)
            allowed = torch.ones_like(scores, dtype=torch.bool)
        else:
            allowed = V.int_mask_as_bool(mask, "mask").expand_as(scores)
    allowed = allowed & ~torch.isneginf(scores) & ~torch.isnan(scores)
    return allowed, scores.masked_fill(~allowed, float("-inf"))


def _gumbel_noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise ``-log(-log U)`` of ``like``'s shape, drawn on the CPU generator if one is given."""
    device = like.device if generator is None else generator.device
    u = torch.rand(like.shape, generator=generator, device=device, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    g = -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-16)))
    return g.to(device=like.device, dtype=like.dtype)


def hard_attention(
    scores: Tensor,
    value: Tensor,
    *,
    mode: str = "sample",
    k: int = 1,
    tau: float = 1.0,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> HardAttentionResult:
    """Choose positions from ``softmax(scores)`` and return their values, indices and log-probabilities.

    Args:
        scores: ``(..., L, S)`` unnormalised scores of ``L`` queries over ``S`` positions.
        value: ``(..., S, Ev)`` (same leading dims as ``scores``).
        mode: ``"sample"`` (one draw per query), ``"argmax"`` (deterministic), ``"topk"`` (the ``k`` most
            probable, averaged) or ``"gumbel"`` (one draw with the straight-through Gumbel-softmax gradient).
        k: number of positions for ``topk`` (must be 1 for the other modes).
        tau: temperature of the Gumbel-softmax relaxation (``gumbel`` mode only), > 0.
        mask: boolean (``True`` = may be chosen) or float (added to the scores), broadcastable to ``(..., L, S)``.
            Masked positions are never chosen; rows with no allowed position give ``indices == -1`` and zeros.
        generator: a ``torch.Generator`` that makes ``sample`` / ``gumbel`` draws reproducible.

    Returns:
        :class:`HardAttentionResult` (values, indices, log_prob, probs, weights, entropy).

    Shape:
        scores ``(..., L, S)``, value ``(..., S, Ev)`` -> values ``(..., L, Ev)``, indices/log_prob/entropy
        ``(..., L)``, probs/weights ``(..., L, S)``.

    Equivalent to (``sample`` mode, no mask)::

        probs = softmax(scores, -1); i = Categorical(probs).sample()
        values = value[..., i, :]; log_prob = log(probs[..., i])
    """
    V.check_tensor("scores", scores)
    V.check_tensor("value", value)
    V.check_float("scores", scores)
    if mode not in HARD_MODES:
        raise V.fail(f"mode in {HARD_MODES}", repr(mode), "mode='sample' while training, 'argmax' at evaluation")
    if scores.dim() < 2 or value.dim() != scores.dim():
        raise V.fail(
            "scores (..., L, S) and value (..., S, Ev) with the same number of dims",
            f"{tuple(scores.shape)} and {tuple(value.shape)}",
            "value.unsqueeze(1) for per-head values",
        )
    if scores.shape[:-2] != value.shape[:-2] or scores.shape[-1] != value.shape[-2]:
        raise V.fail(
            "scores (..., L, S) and value (..., S, Ev) with the same leading dims and one S",
            f"{tuple(scores.shape)} and {tuple(value.shape)}",
            "scores and values over the same positions",
        )
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or (mode != "topk" and k != 1):
        raise V.fail("k >= 1 (and k == 1 unless mode='topk')", repr(k), "mode='topk' for several positions")
    if mode == "topk" and k > scores.shape[-1]:
        raise V.fail(f"k <= S = {scores.shape[-1]}", repr(k), f"k={scores.shape[-1]}")
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or tau <= 0:
        raise V.fail("tau > 0", repr(tau), "tau=1.0")

    allowed, logits = _allowed_and_logits(scores, mask)  # (..., L, S) bool, (..., L, S) with -inf
    dead = ~allowed.any(dim=-1)  # (..., L): rows with nothing to choose
    probs = masked_softmax(logits)  # (..., L, S); dead rows are zero
    log_probs_all = torch.log_softmax(logits.masked_fill(dead[..., None], 0.0), dim=-1)  # (..., L, S)
    log_probs_all = log_probs_all.masked_fill(~allowed, 0.0)  # (..., L, S); forbidden entries unused
    entropy = -(probs * log_probs_all).sum(-1)  # (..., L)

    if mode in ("sample", "gumbel"):
        noisy = logits + _gumbel_noise(logits, generator)  # (..., L, S): Gumbel-max draws from softmax(logits)
        idx = noisy.argmax(dim=-1, keepdim=True)  # (..., L, 1)
    elif mode == "argmax":
        idx = logits.argmax(dim=-1, keepdim=True)  # (..., L, 1)
    else:
        idx = logits.topk(k, dim=-1).indices  # (..., L, k)

    chosen_ok = allowed.gather(-1, idx)  # (..., L, k): False only in dead rows
    weights = torch.zeros_like(probs).scatter(-1, idx, chosen_ok.to(probs.dtype) / idx.shape[-1])  # (..., L, S)
    log_prob = (log_probs_all.gather(-1, idx) * chosen_ok).sum(-1)  # (..., L)

    if mode == "gumbel":
        relaxed = masked_softmax(noisy.masked_fill(~allowed, float("-inf")) / tau)  # (..., L, S)
        weights = weights + (relaxed - relaxed.detach())  # forward: exactly one-hot; backward: relaxed softmax

    values = torch.matmul(weights.to(value.dtype), value)  # (..., L, Ev)
    indices = idx.masked_fill(~chosen_ok, -1)  # (..., L, k)
    if mode != "topk":
        indices = indices.squeeze(-1)  # (..., L)
    return HardAttentionResult(values, indices, log_prob, probs, weights, entropy)


def _check_broadcast(name: str, x: Tensor, shape: torch.Size) -> None:
    V.check_tensor(name, x)
    try:
        out = torch.broadcast_shapes(x.shape, shape)
    except RuntimeError:
        out = None
    if out != shape:
        raise V.fail(
            f"`{name}` broadcastable to log_prob's shape {tuple(shape)}",
            f"{tuple(x.shape)}",
            f"{name}[:, None] for one {name} per sequence of choices (B, 1)",
        )


def reinforce_loss(
    log_prob: Tensor,
    reward: Tensor,
    baseline: Tensor | None = None,
    *,
    entropy: Tensor | None = None,
    entropy_weight: float = 0.0,
    normalize: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """The REINFORCE surrogate loss: minimising it follows an unbiased estimate of ``grad E[reward]``.

    ``loss = -mean((reward - baseline) * log_prob) - entropy_weight * mean(entropy)``, where ``reward`` and
    ``baseline`` are **detached**: the policy gradient never flows into the baseline or the reward. Train a
    learned baseline separately with :func:`baseline_loss`.

    Args:
        log_prob: ``(B, ...)`` log-probabilities of the choices that were made (differentiable).
        reward: broadcastable to ``log_prob`` (``(B, 1)`` gives one reward to all of a sequence's choices).
        baseline: broadcastable to ``log_prob``, or None. It must not depend on the choice it is subtracted
            from (e.g. a moving average, or a value predicted before the choice), or the estimate is biased.
        entropy: entropy of the policy, added as a bonus ``entropy_weight * mean(entropy)`` (it is *not*
            detached: its gradient is the point).
        entropy_weight: weight of the entropy bonus (>= 0).
        normalize: divide the advantages ``reward - baseline`` by their standard deviation over the batch and
            centre them (reward normalisation; scale-free, slightly biased for small batches).

    Returns:
        a scalar loss.

    Example:
        >>> import torch
        >>> logits = torch.zeros(4, 3, requires_grad=True)
        >>> log_prob = torch.log_softmax(logits, -1)[:, 0]                  # the policy chose position 0
        >>> loss = reinforce_loss(log_prob, torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.full((4,), 0.75))
        >>> loss.backward(); logits.grad.shape
        torch.Size([4, 3])
    """
    V.check_tensor("log_prob", log_prob)
    _check_broadcast("reward", reward, log_prob.shape)
    advantage = reward.detach().to(log_prob.dtype)
    if baseline is not None:
        _check_broadcast("baseline", baseline, log_prob.shape)
        advantage = advantage - baseline.detach().to(log_prob.dtype)
    advantage = advantage.expand_as(log_prob)
    if normalize:
        advantage = (advantage - advantage.mean()) / (advantage.std(unbiased=False) + eps)
    loss = -(advantage * log_prob).mean()
    if entropy is not None and entropy_weight:
        if entropy_weight < 0:
            raise V.fail("entropy_weight >= 0", repr(entropy_weight), "entropy_weight=0.01")
        loss = loss - entropy_weight * entropy.mean()
    return loss


def baseline_loss(baseline: Tensor, reward: Tensor) -> Tensor:
    """Mean squared error of a learned baseline against the (detached) reward.

    Its gradient reaches only ``baseline`` and what produced it; give a learned baseline detached features
    (as :class:`attnkit.layers.hard.ValueBaseline` does) so this loss never trains the policy.

    Shape:
        baseline ``(B, ...)``; reward broadcastable to it.
    """
    V.check_tensor("baseline", baseline)
    _check_broadcast("reward", reward, baseline.shape)
    target = reward.detach().to(baseline.dtype).expand_as(baseline)
    return torch.mean((baseline - target) ** 2)
