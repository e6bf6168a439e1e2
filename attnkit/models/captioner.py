"""Show, Attend and Tell: a CNN encoder, and an LSTM decoder that attends over the feature grid at every word,
with soft (deterministic) or hard (stochastic, REINFORCE) attention.

Paper: Xu, Ba, Kiros, Cho, Courville, Salakhutdinov, Zemel, Bengio. "Show, Attend and Tell: Neural Image Caption
Generation with Visual Attention", ICML 2015. https://arxiv.org/abs/1502.03044

* Soft attention: ``z_t = sum_i a_ti f_i`` with ``a_t = softmax(v^T tanh(W h_{t-1} + U f_i))``
  (:class:`~attnkit.layers.AdditiveAttention`), trained by backpropagation.
* Hard attention: one position ``s_t ~ Categorical(a_t)``, ``z_t = f_{s_t}``
  (:class:`~attnkit.layers.HardAttention`), trained by the paper's variational objective: the log-likelihood's
  gradient for the decoder plus REINFORCE for the attention, with reward = the caption's log-likelihood, a
  moving-average baseline and an entropy bonus (:func:`caption_loss`). At evaluation the most probable position
  is taken (argmax). What makes it train in a short run (measured in docs/hard.md): advantages normalised by
  their batch standard deviation (``normalize=True``), and a curriculum in the training loop
  (:func:`attnkit.tasks.caption.train_captioner`) that starts with the expected context at every step (soft
  attention) and lowers that probability to the paper's 0.5.
* Gumbel straight-through (``attention="gumbel"``, an addition to the paper): one sampled cell in the forward
  pass, the gradient of the relaxed softmax in the backward pass; no REINFORCE. Jang, Gu, Poole, "Categorical
  Reparameterization with Gumbel-Softmax", ICLR 2017, https://arxiv.org/abs/1611.01144

The encoder is a small CNN for the digit scenes (no pretrained network ships offline). It reads two coordinate
channels (x and y in ``[-1, 1]``, as in CoordConv, Liu et al. 2018), and each grid cell's ``(x, y)`` is appended
to its features, so the keys say *where* they are: "the next digit to the right" cannot be found by content
alone. The paper's gating scalar and doubly stochastic regularisation are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._errors import fail
from attnkit._typing import FactoryKwargs
from attnkit.data.scenes import BOS, CAPTION_VOCAB, EOS, PAD
from attnkit.functional import reinforce_loss
from attnkit.layers.hard import HardAttention, MovingAverageBaseline
from attnkit.layers.soft import AdditiveAttention

__all__ = ["CaptionLoss", "CaptionOutput", "ShowAttendTell", "caption_loss"]

ATTENTIONS = ("soft", "hard", "gumbel")


@dataclass
class CaptionOutput:
    """logits ``(B, T, V)``; weights ``(B, T, S)`` the attention used (one-hot for hard); probs ``(B, T, S)`` the
    attention distribution (equal to weights for soft); log_prob / entropy ``(B, T)`` of the attention choice
    (zeros for soft log_prob); grid ``(h, w)`` the feature-grid shape (``S = h * w``)."""

    logits: Tensor
    weights: Tensor
    probs: Tensor
    log_prob: Tensor
    entropy: Tensor
    grid: tuple[int, int]


class ShowAttendTell(nn.Module):
    """Image captioner with soft or hard attention over a CNN feature grid.

    Args:
        attention: ``"soft"``, ``"hard"`` (one sampled cell, REINFORCE) or ``"gumbel"`` (one sampled cell, trained
            by the Gumbel-softmax straight-through estimator: the forward pass uses the one-hot choice, the
            backward pass the gradient of the relaxed softmax at temperature ``tau``; no REINFORCE term).
        vocab_size: number of word ids (default: :data:`attnkit.data.scenes.CAPTION_VOCAB`).
        channels: input channels.
        feature_dim: channels of the CNN; the grid's features are those plus the cell's ``(x, y)``:
            ``D = feature_dim + 2``.
        embed_dim: word embedding size.
        hidden: LSTM size.
        attn_dim: hidden size of the additive attention score.
        expected_prob: hard attention only: while training, the probability that a caption step uses the expected
            context ``sum_i a_i f_i`` in place of the sampled one (Xu et al. 2015, section 4.2: 0.5); those steps
            are trained by backpropagation and get no REINFORCE term. The training loop may change it while
            training (:func:`attnkit.tasks.caption.train_captioner` anneals it from 1 to this value).
        tau: ``"gumbel"`` only: temperature of the relaxed softmax in the backward pass.

    Shape:
        images ``(B, C, H, W)``, tokens ``(B, T)`` (the caption, ending in ``<eos>``; teacher forcing feeds
        ``<bos>`` then ``tokens[:, :-1]``) -> :class:`CaptionOutput` with logits ``(B, T, V)``.

    Example:
        >>> import torch
        >>> model = ShowAttendTell("hard")
        >>> out = model(torch.rand(2, 1, 36, 128), torch.tensor([[3, 4, 2], [5, 2, 0]]))
        >>> out.logits.shape, out.weights.shape, out.grid                 # (B, T, V), (B, T, S), feature grid
        (torch.Size([2, 3, 13]), torch.Size([2, 3, 80]), (5, 16))
    """

    def __init__(
        self,
        attention: str = "soft",
        *,
        vocab_size: int = len(CAPTION_VOCAB),
        channels: int = 1,
        feature_dim: int = 64,
        embed_dim: int = 32,
        hidden: int = 128,
        attn_dim: int = 64,
        expected_prob: float = 0.5,
        tau: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise fail(f"attention in {ATTENTIONS}", repr(attention), "attention='soft'")
        kw: FactoryKwargs = {"device": device, "dtype": dtype}
        self.attention = attention
        if not 0.0 <= expected_prob <= 1.0:
            raise fail("expected_prob in [0, 1]", repr(expected_prob), "expected_prob=0.5")
        self.expected_prob = expected_prob
        self.vocab_size = vocab_size

        def block(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False, **kw),
                nn.BatchNorm2d(cout, **kw),
                nn.ReLU(),
            )

        # stride 8; receptive field 37 px, so one grid cell sees a whole 28 px digit (hard attention reads one cell)
        self.encoder = nn.Sequential(
            block(channels + 2, 16, 5, 2),
            block(16, 32, 5, 2),
            block(32, feature_dim, 3, 2),
            block(feature_dim, feature_dim, 3, 1),
        )
        dim = feature_dim + 2  # D: CNN features and the cell's (x, y)
        if attention == "soft":
            self.attend: nn.Module = AdditiveAttention(hidden, dim, attn_dim, bias=True, **kw)
        else:
            mode = "gumbel" if attention == "gumbel" else "sample"
            self.attend = HardAttention(hidden, dim, attn_dim, score="additive", mode=mode, tau=tau, **kw)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD, **kw)
        self.init_h = nn.Linear(dim, hidden, **kw)
        self.init_c = nn.Linear(dim, hidden, **kw)
        self.lstm = nn.LSTMCell(embed_dim + dim, hidden, **kw)
        self.out = nn.Linear(hidden + dim, vocab_size, **kw)

    def encode(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``(B, C, H, W) -> features (B, S, D)`` and the grid ``(h, w)``."""
        if images.dim() != 4:
            raise fail("images of shape (B, C, H, W)", f"{tuple(images.shape)}", "images.unsqueeze(1)")
        b, _, height, width = images.shape
        ys = torch.linspace(-1, 1, height, device=images.device, dtype=images.dtype)  # (H,)
        xs = torch.linspace(-1, 1, width, device=images.device, dtype=images.dtype)  # (W,)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b, 2, height, width)  # (B, 2, H, W)
        f = self.encoder(torch.cat([images, coords], 1))  # (B, D - 2, h, w)
        gh, gw = f.shape[2], f.shape[3]
        cy = torch.linspace(-1, 1, gh, device=f.device, dtype=f.dtype)  # (h,)
        cx = torch.linspace(-1, 1, gw, device=f.device, dtype=f.dtype)  # (w,)
        cells = torch.stack(torch.meshgrid(cx, cy, indexing="xy")).expand(b, 2, gh, gw)  # (B, 2, h, w): x, y
        f = torch.cat([f, cells], 1)  # (B, D, h, w)
        return f.flatten(2).transpose(1, 2), (gh, gw)  # (B, S, D)

    def _step(
        self, feats: Tensor, word: Tensor, state: tuple[Tensor, Tensor], generator: torch.Generator | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor, Tensor, Tensor, Tensor]:
        h, c = state  # (B, hidden) each
        if self.attention == "soft":
            ctx, w = self.attend(h, feats)  # (B, D), (B, S)
            probs, log_prob, entropy = w, h.new_zeros(h.shape[0]), -(w * w.clamp_min(1e-12).log()).sum(-1)
        else:
            ctx, res = self.attend(h, feats, generator=generator, return_result=True)  # (B, D), result over Lq=1
            w, probs = res.weights[:, 0], res.probs[:, 0]  # (B, S)
            log_prob, entropy = res.log_prob[:, 0], res.entropy[:, 0]  # (B,)
            if self.attention == "gumbel":
                log_prob = log_prob.detach()  # trained through the straight-through weights, not by REINFORCE
            if self.training and self.expected_prob > 0:
                device = h.device if generator is None else generator.device
                use_mean = torch.rand(h.shape[0], generator=generator, device=device).to(h.device) < self.expected_prob
                mean_ctx = torch.bmm(probs.unsqueeze(1), feats).squeeze(1)  # (B, D): the expected context
                ctx = torch.where(use_mean[:, None], mean_ctx, ctx)  # (B, D)
                w = torch.where(use_mean[:, None], probs, w)  # (B, S)
                log_prob = log_prob.masked_fill(use_mean, 0.0)  # (B,): no policy gradient for those steps
        h, c = self.lstm(torch.cat([self.embed(word), ctx], -1), (h, c))  # (B, hidden)
        logits = self.out(torch.cat([h, ctx], -1))  # (B, V)
        return logits, (h, c), w, probs, log_prob, entropy

    def _init_state(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        mean = feats.mean(1)  # (B, D)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def forward(self, images: Tensor, tokens: Tensor, *, generator: torch.Generator | None = None) -> CaptionOutput:
        """Teacher forcing: predict ``tokens[:, t]`` from ``<bos>, tokens[:, :t]``."""
        feats, grid = self.encode(images)  # (B, S, D)
        b, t_len = tokens.shape
        prev = torch.cat([tokens.new_full((b, 1), BOS), tokens[:, :-1]], 1)  # (B, T)
        state = self._init_state(feats)
        steps = []
        for t in range(t_len):
            logits, state, w, probs, lp, ent = self._step(feats, prev[:, t], state, generator)
            steps.append((logits, w, probs, lp, ent))
        return self._collect(steps, grid)

    @staticmethod
    def _collect(steps: Sequence[tuple[Tensor, ...]], grid: tuple[int, int]) -> CaptionOutput:
        logits, w, probs, lp, ent = (torch.stack(x, 1) for x in zip(*steps, strict=True))
        return CaptionOutput(logits, w, probs, lp, ent, grid)

    @torch.no_grad()
    def generate(self, images: Tensor, *, max_len: int = 5) -> tuple[Tensor, CaptionOutput]:
        """Greedy decoding: word ids ``(B, max_len)`` (after ``<eos>``: ``<pad>``) and the step outputs."""
        feats, grid = self.encode(images)
        b = images.shape[0]
        word = torch.full((b,), BOS, dtype=torch.long, device=images.device)
        state = self._init_state(feats)
        done = torch.zeros(b, dtype=torch.bool, device=images.device)
        ids, steps = [], []
        for _ in range(max_len):
            logits, state, w, probs, lp, ent = self._step(feats, word, state, None)
            word = logits.argmax(-1)  # (B,)
            ids.append(word.masked_fill(done, PAD))
            steps.append((logits, w, probs, lp, ent))
            done = done | (word == EOS)
        return torch.stack(ids, 1), self._collect(steps, grid)


@dataclass
class CaptionLoss:
    """Scalars: ``total`` (minimise), ``nll`` (mean per word), ``reinforce``; ``reward`` ``(B,)``."""

    total: Tensor
    nll: Tensor
    reinforce: Tensor
    reward: Tensor


def caption_loss(
    out: CaptionOutput,
    tokens: Tensor,
    *,
    baseline: MovingAverageBaseline | None = None,
    entropy_weight: float = 0.01,
    reinforce_weight: float = 0.1,
    normalize: bool = False,
) -> CaptionLoss:
    """Cross-entropy of the caption; for hard attention, plus Xu et al.'s REINFORCE term.

    The reward of a caption is its log-likelihood ``log p(y | s)`` under the sampled attention ``s``; the
    moving-average ``baseline`` is read *before* it is updated with this batch (so it never depends on the draws
    it is subtracted from); the entropy bonus keeps the attention exploring. The REINFORCE term (with its entropy
    bonus) is scaled by ``reinforce_weight`` (the paper's ``lambda_r``): at 1.0 its noise kept the policy near
    uniform in our runs, at 0.1 the attention sharpens. ``normalize=True`` divides the advantages
    ``reward - baseline`` by their standard deviation over the batch (the log-likelihood reward has no fixed
    scale). Padding positions count nowhere.
    """
    valid = tokens != PAD  # (B, T)
    nll_tok = F.cross_entropy(out.logits.transpose(1, 2), tokens, reduction="none") * valid  # (B, T)
    nll = nll_tok.sum() / valid.sum()
    reward = -nll_tok.sum(1).detach()  # (B,): log-likelihood of each caption
    if out.log_prob.requires_grad:
        b = baseline() if baseline is not None else reward.new_zeros(())
        ent = (out.entropy * valid).sum(1) / valid.sum(1)  # (B,)
        rl = reinforce_weight * reinforce_loss(
            (out.log_prob * valid).sum(1, keepdim=True),
            reward[:, None],
            b.reshape(1, 1),
            entropy=ent,
            entropy_weight=entropy_weight,
            normalize=normalize,
        )
        if baseline is not None:
            baseline.update(reward)
    else:
        rl = nll.new_zeros(())
    return CaptionLoss(nll + rl, nll, rl, reward)
