"""Non-local block: self-attention over the H x W positions of a feature map.

Paper: Wang, Girshick, Gupta, He. "Non-local Neural Networks". CVPR 2018. https://arxiv.org/abs/1711.07971

The embedded-Gaussian form ``y_i = sum_j softmax_j(theta(x_i) . phi(x_j)) g(x_j)`` is scaled dot-product attention
with queries ``theta(x)``, keys ``phi(x)`` and values ``g(x)`` (1x1 convolutions), so the block calls attnkit's kernel
through an :class:`~attnkit.layers.attend.Attend` submodule (capture sees the ``(B, heads, HW, HW')`` map). The
residual ``z = BN(W_z y) + x`` starts with the BatchNorm scale at zero, so a freshly built block is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._errors import fail

from .attend import Attend
from .channel import check_channels, check_image, reduced_channels
from .registry import register_attention


@register_attention("non_local", "nonlocal")
class NonLocalBlock(nn.Module):
    """Non-local block (Wang et al. 2018), embedded Gaussian, with a zero-initialised residual.

    ``theta, phi, g``: 1x1 convs ``C -> C_inner`` (``C_inner = C * rd_ratio``, paper: ``C / 2``);
    ``y = softmax(theta^T phi * scale) g`` over all ``H*W`` positions (``sub_sample=True`` max-pools ``phi`` and
    ``g`` by 2, as the paper does to cut cost); ``z = norm(W_z y) + x`` with ``W_z: C_inner -> C``.

    Equivalent to (one head, ``norm=False``, no sub-sampling)::

        q = theta(x).flatten(2).transpose(1, 2)          # (B, HW, Ci)
        k = phi(x).flatten(2).transpose(1, 2)            # (B, HW, Ci)
        v = g(x).flatten(2).transpose(1, 2)              # (B, HW, Ci)
        w = torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1)   # (B, HW, HW)
        z = W_z((w @ v).transpose(1, 2).view(B, Ci, H, W)) + x

    Args:
        channels: input channels ``C``.
        rd_ratio: ``C_inner / C`` (paper: 1/2).
        rd_divisor: round ``C_inner`` to a multiple of this.
        rd_channels: ``C_inner``, overriding ``rd_ratio``.
        num_heads: split ``C_inner`` into this many heads (paper: 1).
        scale: score scale; ``None`` = ``1/sqrt(C_inner / num_heads)`` (the library default); ``1.0`` is the
            paper's unscaled ``exp(theta^T phi)``.
        sub_sample: max-pool keys and values by 2 in each spatial dim.
        norm: BatchNorm after ``W_z`` (paper); its scale starts at zero. Without it ``W_z`` starts at zero.
        dropout: dropout on the attention weights while training.
        backend: kernel backend for :class:`Attend`.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``. Observers of ``self.attend`` receive ``(B, num_heads, H*W, S)``
        with ``S = H*W`` (or ``(H//2)*(W//2)`` with ``sub_sample``).

    Examples:
        >>> block = NonLocalBlock(16)
        >>> x = torch.randn(2, 16, 5, 5)
        >>> y = block(x)
        >>> y.shape, torch.equal(y, x)           # zero-initialised: starts as the identity
        (torch.Size([2, 16, 5, 5]), True)
    """

    is_residual = True  # z = W_z y + x: networks place it between stages, not inside a residual branch

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1 / 2,
        rd_divisor: int = 1,
        rd_channels: int | None = None,
        num_heads: int = 1,
        scale: float | None = None,
        sub_sample: bool = False,
        norm: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channels = check_channels(channels)
        inner = reduced_channels(channels, rd_ratio, rd_divisor, rd_channels)
        if num_heads < 1 or inner % num_heads:
            raise fail(f"num_heads >= 1 dividing C_inner={inner}", str(num_heads), "num_heads=1")
        self.inner = inner
        self.num_heads = num_heads
        self.scale = scale
        self.sub_sample = sub_sample
        self.theta = nn.Conv2d(channels, inner, 1, **kw)
        self.phi = nn.Conv2d(channels, inner, 1, **kw)
        self.g = nn.Conv2d(channels, inner, 1, **kw)
        self.attend = Attend(dropout=dropout, backend=backend)
        self.out = nn.Conv2d(inner, channels, 1, **kw)
        self.norm = nn.BatchNorm2d(channels, **kw) if norm else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero the residual branch's last scale, so the block starts as the identity (paper, Sec. 4.1)."""
        if isinstance(self.norm, nn.BatchNorm2d):
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)
        else:
            nn.init.zeros_(self.out.weight)
            if self.out.bias is not None:
                nn.init.zeros_(self.out.bias)

    def _heads(self, t: Tensor) -> Tensor:  # (B, Ci, h, w) -> (B, heads, h*w, Ci / heads)
        b = t.shape[0]
        return t.reshape(b, self.num_heads, self.inner // self.num_heads, -1).transpose(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        check_image(x, self.channels, "NonLocalBlock")
        b, _, h, w = x.shape
        if self.sub_sample and (h < 2 or w < 2):
            raise fail("H, W >= 2 with sub_sample=True", f"H={h}, W={w}", "sub_sample=False for tiny maps")
        q = self._heads(self.theta(x))  # (B, heads, HW, Ci/heads)
        k, v = self.phi(x), self.g(x)  # (B, Ci, H, W)
        if self.sub_sample:
            k, v = F.max_pool2d(k, 2), F.max_pool2d(v, 2)  # (B, Ci, H/2, W/2)
        k, v = self._heads(k), self._heads(v)  # (B, heads, S, Ci/heads)
        y = self.attend(q, k, v, scale=self.scale)  # (B, heads, HW, Ci/heads)
        y = y.transpose(2, 3).reshape(b, self.inner, h, w)  # (B, Ci, H, W)
        return self.norm(self.out(y)) + x  # (B, C, H, W)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, inner={self.inner}, num_heads={self.num_heads}, sub_sample={self.sub_sample}"
