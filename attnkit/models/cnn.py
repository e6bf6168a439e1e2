"""A small ResNet-style CNN with a pluggable attention block after each stage (SE, ECA, CBAM, non-local, none).

Papers:

* He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition". CVPR 2016. https://arxiv.org/abs/1512.03385
  (the basic residual block).
* The attention blocks come from :mod:`attnkit.layers.channel` and :mod:`attnkit.layers.non_local`, built by name
  with :func:`attnkit.create_attention`: Hu et al. 2018 (SE), Wang et al. 2020 (ECA), Woo et al. 2018 (CBAM),
  Wang et al. 2018 (non-local).

Sized for 28x28 grey images (MNIST, Fashion-MNIST): three stages at 14x14, 7x7 and 4x4 (cheap enough to train
several variants and seeds on two CPU cores).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnkit._errors import fail
from attnkit.layers.registry import create_attention


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity (or 1x1 projection) shortcut, then ReLU.

    With ``attn``, the attention block rescales the residual branch before the shortcut is added (the placement of
    SE-ResNet, Hu et al. 2018, Fig. 3, and of CBAM, Woo et al. 2018, Fig. 3), so the identity path stays ungated.

    Shape:
        ``(B, C_in, H, W)`` -> ``(B, C_out, H / stride, W / stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        attn: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.attn = attn if attn is not None else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, **kw)
        self.bn1 = nn.BatchNorm2d(out_channels, **kw)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False, **kw)
        self.bn2 = nn.BatchNorm2d(out_channels, **kw)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, **kw),
                nn.BatchNorm2d(out_channels, **kw),
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.bn1(self.conv1(x)))  # (B, C_out, H', W')
        y = self.attn(self.bn2(self.conv2(y)))  # (B, C_out, H', W')  attention on the residual branch
        return self.act(y + self.shortcut(x))


class Stage(nn.Module):
    """``depth`` residual blocks (the first may downsample), then ``post`` (a residual attention block such as
    the non-local block, or the identity)."""

    def __init__(self, blocks: nn.Sequential, post: nn.Module | None = None) -> None:
        super().__init__()
        self.blocks = blocks
        self.post = post if post is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.blocks(x))

    @property
    def attention(self) -> nn.Module:
        """The stage's attention block (wherever it sits)."""
        if not isinstance(self.post, nn.Identity):
            return self.post
        return cast(BasicBlock, self.blocks[-1]).attn


class AttentionCNN(nn.Module):
    """Small ResNet-style classifier with a pluggable attention block after each stage.

    ``stem (3x3 conv, BN, ReLU) -> [stage_i: residual blocks + one attention block] x len(widths) -> global
    average pool -> linear``. By default every stage halves the resolution. The attention block is built with
    ``create_attention(attention, width, **attention_kwargs)``, so any registered CNN block name works
    (``"none"``, ``"se"``, ``"eca"``, ``"cbam"``, ``"channel"``, ``"spatial"``, ``"non_local"``). Gates (SE, ECA,
    CBAM, ...) rescale the residual branch of the stage's last block, as in the papers; a block that is itself
    residual (``is_residual = True``, e.g. the non-local block) goes after the stage, as in Wang et al. 2018.

    Args:
        num_classes: output classes.
        in_channels: image channels (1 for MNIST).
        widths: channels of each stage.
        strides: each stage's first-block stride (default: every stage halves the resolution, 28 -> 14 -> 7 -> 4).
        depth: residual blocks per stage.
        attention: registered attention-block name, or one name per stage.
        attention_kwargs: keyword arguments for every attention block (e.g. ``{"rd_ratio": 1/8}``).

    Shape:
        ``(B, in_channels, H, W)`` -> logits ``(B, num_classes)``.

    Examples:
        >>> model = AttentionCNN(10, attention="cbam")
        >>> model(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> [type(s.attention).__name__ for s in model.stages]
        ['CBAM', 'CBAM', 'CBAM']
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        strides: Sequence[int] = (2, 2, 2),
        depth: int = 1,
        attention: str | Sequence[str] = "none",
        attention_kwargs: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise fail("widths: a non-empty sequence of positive ints", repr(widths), "widths=(16, 32, 64)")
        strides = tuple(int(s) for s in strides)
        if len(strides) != len(widths) or min(strides) < 1:
            raise fail(f"one positive stride per stage ({len(widths)})", repr(strides), "strides=(2, 2, 2)")
        if depth < 1:
            raise fail("depth >= 1", repr(depth), "depth=1")
        names = [attention] * len(widths) if isinstance(attention, str) else list(attention)
        if len(names) != len(widths):
            raise fail(f"one attention name per stage ({len(widths)})", repr(attention), "attention='se'")
        self.attention = attention if isinstance(attention, str) else tuple(names)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False, **kw),
            nn.BatchNorm2d(widths[0], **kw),
            nn.ReLU(inplace=True),
        )
        stages = []
        prev = widths[0]
        for i, (width, name) in enumerate(zip(widths, names, strict=True)):
            attn = create_attention(name, width, **dict(attention_kwargs or {}), **kw)
            residual = getattr(attn, "is_residual", False)
            blocks = [
                BasicBlock(
                    prev if j == 0 else width,
                    width,
                    stride=strides[i] if j == 0 else 1,
                    attn=attn if (j == depth - 1 and not residual) else None,
                    **kw,
                )
                for j in range(depth)
            ]
            stages.append(Stage(nn.Sequential(*blocks), attn if residual else None))
            prev = width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(prev, num_classes, **kw)
        self.in_channels = in_channels

    def features(self, x: Tensor) -> Tensor:
        """Feature map after the last stage ``(B, widths[-1], H / 2^(n-1), W / 2^(n-1))``."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise fail(f"images (B, {self.in_channels}, H, W)", str(got), "x.unsqueeze(1) for (B, H, W) images")
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))  # (B, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
