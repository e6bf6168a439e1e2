"""Channel and spatial attention for CNNs: Squeeze-and-Excitation, ECA and CBAM.

Papers:

* Hu, Shen, Albanie, Sun, Wu. "Squeeze-and-Excitation Networks". CVPR 2018. https://arxiv.org/abs/1709.01507
* Wang, Wu, Zhu, Li, Zuo, Hu. "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks".
  CVPR 2020. https://arxiv.org/abs/1910.03151
* Woo, Park, Lee, Kweon. "CBAM: Convolutional Block Attention Module". ECCV 2018. https://arxiv.org/abs/1807.06521

Every block takes ``(B, C, H, W)`` and returns the same shape: ``x * gate`` with the gate in ``[0, 1]``.
Constructors share one vocabulary: ``channels`` first, then keyword-only ``rd_ratio`` / ``rd_divisor`` (the
bottleneck width), ``act_layer`` (the activation inside the bottleneck), ``gate_layer`` (the activation that makes the
gate, sigmoid by default), ``device`` and ``dtype``. The gate is made by a :class:`~attnkit.layers.attend.GateTap`
submodule, so ``attnkit.viz.capture`` sees each gate as it is computed; no block stores a gate on ``self``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from attnkit._errors import fail

from .attend import GateTap
from .registry import register_attention

LayerSpec = str | Callable[[], nn.Module] | None

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "hard_sigmoid": nn.Hardsigmoid,
    "identity": nn.Identity,
}


def resolve_layer(spec: LayerSpec, default: str) -> Callable[[], nn.Module]:
    """An activation factory from a name (``"relu"``, ``"silu"``, ``"sigmoid"``, ``"hard_sigmoid"``, ...),
    a class / zero-argument callable, or ``None`` (the ``default`` name)."""
    if spec is None:
        spec = default
    if isinstance(spec, str):
        key = spec.lower()
        if key not in _ACTIVATIONS:
            raise fail(f"an activation name in {sorted(_ACTIVATIONS)}", repr(spec), f"{default!r} or a nn.Module class")
        return _ACTIVATIONS[key]
    if callable(spec):
        return spec
    raise fail("an activation name, a nn.Module class or None", type(spec).__name__, f"{default!r}")


def make_divisible(value: float, divisor: int = 1, *, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``, by default ``divisor``),
    going one step up when rounding would lose more than ``1 - round_limit`` of it.

    Examples:
        >>> make_divisible(64 / 16), make_divisible(64 / 16, 8), make_divisible(100 / 16, 8)
        (4, 8, 8)
    """
    min_value = divisor if min_value is None else min_value
    out = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if out < round_limit * value:
        out += divisor
    return out


def reduced_channels(channels: int, rd_ratio: float, rd_divisor: int, rd_channels: int | None) -> int:
    """The bottleneck width: ``rd_channels`` if given, else ``channels * rd_ratio`` rounded by ``rd_divisor``."""
    if rd_channels is not None:
        if rd_channels < 1:
            raise fail("rd_channels >= 1", str(rd_channels), "rd_channels=max(1, channels // 16)")
        return int(rd_channels)
    if not 0 < rd_ratio <= 1:
        raise fail("0 < rd_ratio <= 1", str(rd_ratio), "rd_ratio=1/16 (the paper's reduction r=16)")
    if rd_divisor < 1:
        raise fail("rd_divisor >= 1", str(rd_divisor), "rd_divisor=1 (exact channels * rd_ratio) or 8")
    return make_divisible(channels * rd_ratio, rd_divisor)


def check_channels(channels: int) -> int:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise fail("`channels` a positive int", repr(channels), "the number of input channels C, e.g. 64")
    return channels


def check_image(x: Tensor, channels: int, who: str) -> None:
    """``x`` must be ``(B, C, H, W)`` with ``C == channels``."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise fail(f"{who} input of shape (B, C, H, W)", str(got), "x.view(B, C, H, W) or x.unsqueeze(0)")
    if x.shape[1] != channels:
        raise fail(
            f"{who} input with C={channels} channels", f"shape {tuple(x.shape)}", f"a block built for {x.shape[1]}"
        )


@register_attention("none", "identity")
class NoAttention(nn.Module):
    """The identity, so ``attention="none"`` builds a plain network through the same factory.

    Args:
        channels: accepted for a uniform constructor; unused.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``.

    Examples:
        >>> NoAttention(8)(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self, channels: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.channels = check_channels(channels)

    def forward(self, x: Tensor) -> Tensor:
        check_image(x, self.channels, "NoAttention")
        return x


@register_attention("se", "squeeze_excite")
class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al. 2018): a channel gate from globally average-pooled features.

    ``s = gate(W2 act(W1 avgpool(x)))``, ``out = x * s``; ``W1: C -> C/r``, ``W2: C/r -> C`` (1x1 convs with
    biases, as fully connected layers on the pooled vector). With ``bias=False`` the block has exactly the paper's
    ``2 C^2 / r`` parameters; with biases ``2 C (C/r) + C/r + C``.

    Args:
        channels: input channels ``C``.
        rd_ratio: bottleneck ratio ``1/r`` (paper: ``r = 16``).
        rd_divisor: round the bottleneck width to a multiple of this (1 = exact ``C * rd_ratio``, rounded).
        rd_channels: bottleneck width, overriding ``rd_ratio``.
        act_layer: activation inside the bottleneck (paper: ReLU).
        gate_layer: gate activation (paper: sigmoid); must map into ``[0, 1]``.
        bias: biases in the two fully connected layers.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``. Observers of ``self.gate`` receive the gate ``(B, C, 1, 1)``.

    Examples:
        >>> se = SqueezeExcite(64)                   # bottleneck 64 / 16 = 4
        >>> se(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 64, 7, 7])
        >>> sum(p.numel() for p in se.parameters()) == 2 * 64 * 4 + 4 + 64
        True
    """

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 16,
        rd_divisor: int = 1,
        rd_channels: int | None = None,
        act_layer: LayerSpec = "relu",
        gate_layer: LayerSpec = "sigmoid",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels = check_channels(channels)
        rd = reduced_channels(channels, rd_ratio, rd_divisor, rd_channels)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=bias, **kw)
        self.act = resolve_layer(act_layer, "relu")()
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=bias, **kw)
        self.gate = GateTap("channel", resolve_layer(gate_layer, "sigmoid"))

    def forward(self, x: Tensor) -> Tensor:
        check_image(x, self.channels, "SqueezeExcite")
        s = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)  squeeze
        s = self.fc2(self.act(self.fc1(s)))  # (B, C, 1, 1)  excitation
        return x * self.gate(s)  # (B, C, H, W)


def eca_kernel_size(channels: int, *, gamma: float = 2, beta: float = 1) -> int:
    """ECA's adaptive kernel size ``k = |log2(C) / gamma + beta / gamma|``, made odd (even values go one up).

    Examples:
        >>> [eca_kernel_size(c) for c in (16, 64, 256, 512, 2048)]
        [3, 3, 5, 5, 7]
    """
    t = int(abs(math.log2(channels) / gamma + beta / gamma))
    return t if t % 2 else t + 1


@register_attention("eca", "efficient_channel")
class EfficientChannelAttention(nn.Module):
    """Efficient Channel Attention (Wang et al. 2020): a 1-D convolution across the pooled channel descriptor.

    ``s = gate(conv1d_k(avgpool(x)))``, ``out = x * s``: local cross-channel interaction without dimension
    reduction, ``k`` parameters in all (no bias). ``k`` adapts to the channel count (:func:`eca_kernel_size`).

    Args:
        channels: input channels ``C``.
        kernel_size: 1-D kernel size (odd); ``None`` picks ``eca_kernel_size(C, gamma=gamma, beta=beta)``.
        gamma: the mapping's slope constant (paper: 2).
        beta: the mapping's offset constant (paper: 1).
        gate_layer: gate activation (paper: sigmoid); must map into ``[0, 1]``.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``. Observers of ``self.gate`` receive the gate ``(B, C, 1, 1)``.

    Examples:
        >>> eca = EfficientChannelAttention(256)
        >>> eca(torch.randn(2, 256, 4, 4)).shape, eca.kernel_size, sum(p.numel() for p in eca.parameters())
        (torch.Size([2, 256, 4, 4]), 5, 5)
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int | None = None,
        gamma: float = 2,
        beta: float = 1,
        gate_layer: LayerSpec = "sigmoid",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = check_channels(channels)
        k = eca_kernel_size(channels, gamma=gamma, beta=beta) if kernel_size is None else int(kernel_size)
        if k < 1 or k % 2 == 0:
            raise fail("an odd kernel_size >= 1", str(kernel_size), "kernel_size=None (adaptive) or 3")
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False, device=device, dtype=dtype)
        self.gate = GateTap("channel", resolve_layer(gate_layer, "sigmoid"))

    def forward(self, x: Tensor) -> Tensor:
        check_image(x, self.channels, "EfficientChannelAttention")
        b, c = x.shape[:2]
        s = x.mean(dim=(2, 3)).view(b, 1, c)  # (B, 1, C)  channels as a 1-D signal
        s = self.conv(s).view(b, c, 1, 1)  # (B, C, 1, 1)
        return x * self.gate(s)  # (B, C, H, W)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"


@register_attention("channel", "channel_attention")
class ChannelAttention(nn.Module):
    """CBAM's channel attention (Woo et al. 2018): one shared MLP over average- and max-pooled descriptors.

    ``Mc = gate(MLP(avgpool(x)) + MLP(maxpool(x)))``, ``out = x * Mc``; the MLP is ``C -> C/r -> C`` with
    biases (``2 C (C/r) + C/r + C`` parameters).

    Args:
        channels: input channels ``C``.
        rd_ratio: bottleneck ratio ``1/r`` (paper: ``r = 16``).
        rd_divisor: round the bottleneck width to a multiple of this.
        rd_channels: bottleneck width, overriding ``rd_ratio``.
        act_layer: activation inside the MLP (paper: ReLU).
        gate_layer: gate activation (paper: sigmoid).

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``. Observers of ``self.gate`` receive ``Mc`` ``(B, C, 1, 1)``.

    Examples:
        >>> ChannelAttention(32)(torch.randn(2, 32, 6, 6)).shape
        torch.Size([2, 32, 6, 6])
    """

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 16,
        rd_divisor: int = 1,
        rd_channels: int | None = None,
        act_layer: LayerSpec = "relu",
        gate_layer: LayerSpec = "sigmoid",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels = check_channels(channels)
        rd = reduced_channels(channels, rd_ratio, rd_divisor, rd_channels)
        self.fc1 = nn.Conv2d(channels, rd, 1, **kw)
        self.act = resolve_layer(act_layer, "relu")()
        self.fc2 = nn.Conv2d(rd, channels, 1, **kw)
        self.gate = GateTap("channel", resolve_layer(gate_layer, "sigmoid"))

    def mlp(self, s: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(s)))

    def forward(self, x: Tensor) -> Tensor:
        check_image(x, self.channels, "ChannelAttention")
        avg = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        mx = x.amax(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * self.gate(self.mlp(avg) + self.mlp(mx))  # (B, C, H, W)


@register_attention("spatial", "spatial_attention")
class SpatialAttention(nn.Module):
    """CBAM's spatial attention (Woo et al. 2018): a ``k x k`` convolution over channel-wise average and max.

    ``Ms = gate(norm(conv_kxk([mean_c(x); max_c(x)])))``, ``out = x * Ms``. The convolution maps 2 channels to 1
    without bias (``2 k^2`` weights, ``k = 7`` in the paper); ``norm=True`` adds the authors' code's BatchNorm
    (2 more parameters).

    Args:
        channels: input channels ``C`` (checked; the block's size does not depend on it).
        kernel_size: odd convolution size (paper: 7).
        norm: BatchNorm after the convolution, as in the authors' code.
        gate_layer: gate activation (paper: sigmoid).

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``. Observers of ``self.gate`` receive ``Ms`` ``(B, 1, H, W)``.

    Examples:
        >>> sa = SpatialAttention(32)
        >>> sa(torch.randn(2, 32, 6, 6)).shape, sum(p.numel() for p in sa.parameters())
        (torch.Size([2, 32, 6, 6]), 100)
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 7,
        norm: bool = True,
        gate_layer: LayerSpec = "sigmoid",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels = check_channels(channels)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise fail("an odd kernel_size >= 1", str(kernel_size), "kernel_size=7 (the paper) or 3")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, **kw)
        self.norm = nn.BatchNorm2d(1, **kw) if norm else nn.Identity()
        self.gate = GateTap("spatial", resolve_layer(gate_layer, "sigmoid"))

    def forward(self, x: Tensor) -> Tensor:
        check_image(x, self.channels, "SpatialAttention")
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)  # (B, 2, H, W)
        return x * self.gate(self.norm(self.conv(pooled)))  # (B, C, H, W)


@register_attention("cbam")
class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): channel attention, then spatial attention.

    ``x' = ChannelAttention(x)``, ``out = SpatialAttention(x')`` (the paper's sequential, channel-first order).

    Args:
        channels: input channels ``C``.
        rd_ratio: the channel MLP's bottleneck ratio ``1/r`` (see :class:`ChannelAttention`).
        rd_divisor: round the bottleneck width to a multiple of this.
        rd_channels: bottleneck width, overriding ``rd_ratio``.
        act_layer: activation inside the channel MLP (paper: ReLU).
        spatial_kernel_size: the spatial convolution's size (paper: 7).
        spatial_norm: BatchNorm after the spatial convolution (authors' code).
        gate_layer: gate activation for both gates (paper: sigmoid).

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``. Observers see ``channel.gate`` ``(B, C, 1, 1)`` and
        ``spatial.gate`` ``(B, 1, H, W)``.

    Examples:
        >>> CBAM(64)(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 64, 7, 7])
    """

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 16,
        rd_divisor: int = 1,
        rd_channels: int | None = None,
        act_layer: LayerSpec = "relu",
        gate_layer: LayerSpec = "sigmoid",
        spatial_kernel_size: int = 7,
        spatial_norm: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = check_channels(channels)
        self.channel = ChannelAttention(
            channels,
            rd_ratio=rd_ratio,
            rd_divisor=rd_divisor,
            rd_channels=rd_channels,
            act_layer=act_layer,
            gate_layer=gate_layer,
            device=device,
            dtype=dtype,
        )
        self.spatial = SpatialAttention(
            channels,
            kernel_size=spatial_kernel_size,
            norm=spatial_norm,
            gate_layer=gate_layer,
            device=device,
            dtype=dtype,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))  # (B, C, H, W)
