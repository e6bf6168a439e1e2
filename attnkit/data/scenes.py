"""Scenes built from real MNIST digits: translated and cluttered MNIST (Mnih et al. 2014) and multi-digit caption
scenes (for Show-Attend-and-Tell on digits).

Papers:
    Mnih, Heess, Graves, Kavukcuoglu 2014, "Recurrent Models of Visual Attention", https://arxiv.org/abs/1406.6247
    Xu et al. 2015, "Show, Attend and Tell", https://arxiv.org/abs/1502.03044

Every builder takes the digits it may use (e.g. ``load_mnist().test_x``), so scenes for the held-out split are
made only of held-out digits, and a ``torch.Generator`` so the scenes are reproducible. Images are float32
``(N, 1, H, W)`` in ``[0, 1]``; overlapping strokes are combined with ``max``.

Example:
    >>> import torch
    >>> digits, labels = torch.rand(5, 1, 28, 28), torch.arange(5)
    >>> translated_mnist(digits, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([5, 1, 60, 60])
    >>> s = digit_scenes(digits, labels, 3, generator=torch.Generator().manual_seed(0))
    >>> s.images.shape, s.tokens.shape                 # (N, 1, H, W), (N, max digits + 1) ending in <eos>
    (torch.Size([3, 1, 36, 128]), torch.Size([3, 5]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit._errors import fail

from .images import MNIST_CLASSES

__all__ = [
    "CAPTION_VOCAB",
    "CaptionScenes",
    "cluttered_mnist",
    "decode_caption",
    "digit_scenes",
    "translated_mnist",
]

PAD, BOS, EOS = 0, 1, 2
CAPTION_VOCAB: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", *MNIST_CLASSES)  # digit d is token 3 + d


def _check_digits(images: Tensor) -> tuple[int, int]:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 1:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise fail("digits of shape (N, 1, h, w)", f"{got}", "load_mnist().test_x")
    return int(images.shape[2]), int(images.shape[3])


def _randint(high: int, n: int, generator: torch.Generator | None) -> Tensor:
    return torch.randint(0, max(high, 1), (n,), generator=generator)


def translated_mnist(images: Tensor, *, canvas: int = 60, generator: torch.Generator | None = None) -> Tensor:
    """Each digit pasted at a uniformly random position of an empty ``canvas x canvas`` image.

    Shape:
        images ``(N, 1, h, w)`` -> ``(N, 1, canvas, canvas)``.
    """
    h, w = _check_digits(images)
    if canvas < max(h, w):
        raise fail(f"canvas >= digit size {max(h, w)}", repr(canvas), "canvas=60")
    n = images.shape[0]
    out = torch.zeros(n, 1, canvas, canvas, dtype=images.dtype)
    ys, xs = _randint(canvas - h + 1, n, generator), _randint(canvas - w + 1, n, generator)
    for i in range(n):
        y, x = int(ys[i]), int(xs[i])
        out[i, :, y : y + h, x : x + w] = images[i]
    return out


def cluttered_mnist(
    images: Tensor,
    *,
    canvas: int = 60,
    clutter: int = 4,
    piece: int = 8,
    source: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Translated MNIST plus ``clutter`` distractors: random ``piece x piece`` fragments of other digits.

    Following Mnih et al. 2014 (60x60 with 4 pieces of 8x8 clutter), the fragments are cut at random places of
    random digits of ``source`` (default: ``images``) and pasted at random places; then the digit is pasted at
    a random place (strokes combined with ``max``).

    Shape:
        images ``(N, 1, h, w)`` -> ``(N, 1, canvas, canvas)``.
    """
    h, w = _check_digits(images)
    src = images if source is None else source
    sh, sw = _check_digits(src)
    if piece > min(sh, sw) or piece > canvas:
        raise fail(f"piece <= {min(sh, sw, canvas)}", repr(piece), "piece=8")
    n = images.shape[0]
    out = torch.zeros(n, 1, canvas, canvas, dtype=images.dtype)
    m = n * clutter
    which = _randint(src.shape[0], m, generator)
    cy, cx = _randint(sh - piece + 1, m, generator), _randint(sw - piece + 1, m, generator)
    py, px = _randint(canvas - piece + 1, m, generator), _randint(canvas - piece + 1, m, generator)
    for j in range(m):
        i = j // clutter
        frag = src[int(which[j]), :, int(cy[j]) : int(cy[j]) + piece, int(cx[j]) : int(cx[j]) + piece]
        region = out[i, :, int(py[j]) : int(py[j]) + piece, int(px[j]) : int(px[j]) + piece]
        torch.maximum(region, frag, out=region)
    ys, xs = _randint(canvas - h + 1, n, generator), _randint(canvas - w + 1, n, generator)
    for i in range(n):
        region = out[i, :, int(ys[i]) : int(ys[i]) + h, int(xs[i]) : int(xs[i]) + w]
        torch.maximum(region, images[i], out=region)
    return out


@dataclass
class CaptionScenes:
    """Multi-digit scenes and their captions.

    Attributes:
        images: ``(N, 1, H, W)`` float32 in ``[0, 1]``.
        tokens: ``(N, max_digits + 1)`` int64: the digits' word ids from left to right, then ``<eos>``, then
            ``<pad>`` (ids index :data:`CAPTION_VOCAB`; digit ``d`` is ``3 + d``).
        lengths: ``(N,)`` number of tokens including ``<eos>``.
        centers: ``(N, max_digits)`` column of each digit's centre (``-1`` for padding), for checking attention.
        captions: the captions as text, e.g. ``"seven two nine"``.
    """

    images: Tensor
    tokens: Tensor
    lengths: Tensor
    centers: Tensor
    captions: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def digit_scenes(
    images: Tensor,
    labels: Tensor,
    n: int,
    *,
    min_digits: int = 2,
    max_digits: int = 4,
    height: int = 36,
    width: int = 128,
    min_gap: int = 24,
    generator: torch.Generator | None = None,
) -> CaptionScenes:
    """``n`` scenes of ``min_digits`` to ``max_digits`` real digits placed left to right on a ``height x width``
    canvas, captioned with the digits' words from left to right.

    Digits are drawn at random from ``images`` / ``labels``; their left edges are at least ``min_gap`` pixels
    apart (MNIST digits have a blank border, so 24 keeps them readable), and each gets a random vertical offset.

    Shape:
        images ``(M, 1, h, w)``, labels ``(M,)`` -> :class:`CaptionScenes` with images ``(n, 1, height, width)``.
    """
    h, w = _check_digits(images)
    if not 1 <= min_digits <= max_digits:
        raise fail("1 <= min_digits <= max_digits", f"{min_digits}, {max_digits}", "min_digits=2, max_digits=4")
    if w + min_gap * (max_digits - 1) > width or h > height:
        raise fail(
            f"a canvas of at least {h} x {w + min_gap * (max_digits - 1)} for {max_digits} digits",
            f"{height} x {width}",
            "a wider canvas or fewer digits",
        )
    out = torch.zeros(n, 1, height, width, dtype=images.dtype)
    tokens = torch.full((n, max_digits + 1), PAD, dtype=torch.long)
    centers = torch.full((n, max_digits), -1, dtype=torch.long)
    lengths = torch.zeros(n, dtype=torch.long)
    captions = []
    counts = torch.randint(min_digits, max_digits + 1, (n,), generator=generator)
    for i in range(n):
        k = int(counts[i])
        pick = torch.randint(0, images.shape[0], (k,), generator=generator)
        slack = width - w - min_gap * (k - 1)
        lefts = torch.sort(torch.randint(0, slack + 1, (k,), generator=generator)).values + torch.arange(k) * min_gap
        tops = torch.randint(0, height - h + 1, (k,), generator=generator)
        for j in range(k):
            x, y = int(lefts[j]), int(tops[j])
            region = out[i, :, y : y + h, x : x + w]
            torch.maximum(region, images[int(pick[j])], out=region)
            tokens[i, j] = 3 + int(labels[pick[j]])
            centers[i, j] = x + w // 2
        tokens[i, k] = EOS
        lengths[i] = k + 1
        captions.append(" ".join(MNIST_CLASSES[int(labels[p])] for p in pick))
    return CaptionScenes(out, tokens, lengths, centers, captions)


def decode_caption(ids: Tensor | list[int]) -> str:
    """Word ids -> text, stopping at ``<eos>`` and skipping ``<pad>`` / ``<bos>``."""
    words = []
    for t in ids.tolist() if isinstance(ids, Tensor) else ids:
        if t == EOS:
            break
        if t > EOS:
            words.append(CAPTION_VOCAB[t])
    return " ".join(words)
