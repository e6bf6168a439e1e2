"""Position modules that plug into ``MultiHeadAttention(position=...)``.

Papers:

* Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762 (sinusoidal, learned).
* Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", https://arxiv.org/abs/2104.09864.
* Press et al. 2022, "Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation",
  https://arxiv.org/abs/2108.12409.
* Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer",
  https://arxiv.org/abs/1910.10683.
* Shaw et al. 2018, "Self-Attention with Relative Position Representations", https://arxiv.org/abs/1803.02155.

A position module enters attention at one of three places, named by its ``kind``:

* ``"input"`` (:class:`SinusoidalPosition`, :class:`LearnedPosition`): added to the query and key *inputs* before
  the projections (values stay position-free). Called on its own, ``module(x)`` returns ``x + PE``.
* ``"rotary"`` (:class:`RotaryPosition`): rotates the projected queries and keys before the kernel, so the fused
  backend still serves and cached keys are stored already rotated.
* ``"bias"`` (:class:`ALiBiPosition`, :class:`T5RelativeBias`, :class:`ShawRelative`): a float bias
  ``(1|B, H, L, S)`` added to the scores (the library's float-mask meaning); Shaw's value term is added to the
  output from the weights the kernel used.

Every hook takes explicit integer positions, so KV-cache offsets and ring buffers work unchanged.

Example:
    >>> import torch
    >>> from attnkit.layers import MultiHeadAttention, RotaryPosition, ALiBiPosition
    >>> x = torch.randn(2, 6, 32)                                  # (B, L, D)
    >>> MultiHeadAttention(32, 4, position=RotaryPosition(8))(x, is_causal=True).shape
    torch.Size([2, 6, 32])
    >>> MultiHeadAttention(32, 4, position=ALiBiPosition(4))(x, is_causal=True).shape
    torch.Size([2, 6, 32])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit._errors import fail
from attnkit.functional import position as P

__all__ = [
    "ALiBiPosition",
    "LearnedPosition",
    "PositionEncoding",
    "RotaryPosition",
    "ShawRelative",
    "SinusoidalPosition",
    "T5RelativeBias",
]


class PositionEncoding(nn.Module):
    """Base of the position modules: every hook is the identity / no bias unless a subclass overrides it.

    Attributes:
        kind: ``"input"``, ``"rotary"`` or ``"bias"`` (where the module enters attention).
        num_heads: heads the module was built for (``None`` = any).
        head_dim: head size the module was built for (``None`` = any).
        uses_weights: whether :meth:`value_term` needs the attention weights.
    """

    kind = "input"
    num_heads: int | None = None
    head_dim: int | None = None
    uses_weights = False

    def encode_inputs(self, x: Tensor, positions: Tensor) -> Tensor:
        """``(B, L, D)`` inputs at ``positions (L,)`` -> inputs with positions mixed in (for ``kind="input"``)."""
        return x

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """``(B, H, L, E)`` projected queries or keys at ``positions (L,)`` -> rotated (for ``kind="rotary"``)."""
        return x

    def score_bias(self, query: Tensor, q_pos: Tensor, k_pos: Tensor, *, scale: float) -> Tensor | None:
        """Float bias broadcastable to ``(B, H, L, S)``, added to the scores; ``None`` for no bias."""
        return None

    def value_term(self, weights: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        """``(B, H, L, Ev)`` added to the attention output, from the weights ``(B, H, L, S)``; ``None`` if unused."""
        return None


class SinusoidalPosition(PositionEncoding):
    """The fixed sinusoidal table of Vaswani et al. 2017, added to the inputs.

    Args:
        dim: model width ``D`` (even).
        base: wavelength base (10000 in the paper).

    Shape:
        ``forward``: ``(B, L, D)`` -> ``(B, L, D)``; ``offset`` shifts the positions (KV-cache decoding).

    Example:
        >>> import torch
        >>> SinusoidalPosition(16)(torch.zeros(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    kind = "input"

    def __init__(self, dim: int, *, base: float = 10000.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dim <= 0 or dim % 2:
            raise fail("an even, positive dim", repr(dim), "an even model width")
        self.dim, self.base = dim, base
        self._device, self._dtype = device, dtype

    def encode_inputs(self, x: Tensor, positions: Tensor) -> Tensor:
        table = P.sinusoidal_table(positions.to(x.device), self.dim, base=self.base, dtype=x.dtype)  # (L, D)
        return x + table

    def forward(self, x: Tensor, *, offset: int = 0) -> Tensor:
        return self.encode_inputs(x, torch.arange(offset, offset + x.shape[-2], device=x.device))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


class LearnedPosition(PositionEncoding):
    """A learned table of ``max_len`` position vectors, added to the inputs (BERT / GPT-2 style).

    Args:
        max_len: number of positions; a position at or beyond it raises ``ValueError``.
        dim: model width ``D``.

    Shape:
        ``forward``: ``(B, L, D)`` -> ``(B, L, D)``.
    """

    kind = "input"

    def __init__(self, max_len: int, dim: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.max_len = max_len
        self.embedding = nn.Embedding(max_len, dim, device=device, dtype=dtype)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def encode_inputs(self, x: Tensor, positions: Tensor) -> Tensor:
        if positions.numel() and int(positions.max()) >= self.max_len:
            raise fail(f"positions < max_len = {self.max_len}", f"position {int(positions.max())}",
                       "a larger max_len or a relative position module (RotaryPosition, ALiBiPosition)")
        return x + self.embedding(positions.to(x.device))  # (B, L, D)

    def forward(self, x: Tensor, *, offset: int = 0) -> Tensor:
        return self.encode_inputs(x, torch.arange(offset, offset + x.shape[-2], device=x.device))


class RotaryPosition(PositionEncoding):
    """Rotary position embedding (RoPE, Su et al. 2021): rotates queries and keys by position-dependent angles.

    ``<rotate(q, m), rotate(k, n)>`` depends only on ``n - m``; the rotation keeps norms. Applied to the projected
    queries and keys before the kernel, so ``backend="auto"`` still picks the fused kernel, and keys enter the
    KV cache already rotated.

    Args:
        head_dim: ``E`` (even); ``rotary_dim`` features (default all) are rotated, the rest pass through.
        base: angle base (10000 in the paper).
        interleaved: pair features ``(2i, 2i+1)`` as the paper does; default pairs ``(i, i + E/2)`` (GPT-NeoX).

    Shape:
        ``rotate``: ``(B, H, L, E)`` with positions ``(L,)`` -> ``(B, H, L, E)``.
    """

    kind = "rotary"

    def __init__(self, head_dim: int, *, rotary_dim: int | None = None, base: float = 10000.0,
                 interleaved: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
            raise fail("an even rotary_dim in (0, head_dim]", f"rotary_dim={rotary_dim}, head_dim={head_dim}",
                       "rotary_dim=head_dim")
        self.head_dim, self.rotary_dim, self.base, self.interleaved = head_dim, rotary_dim, base, interleaved

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        cos, sin = P.rope_cos_sin(positions.to(x.device), self.rotary_dim, base=self.base, dtype=x.dtype)
        if self.rotary_dim == x.shape[-1]:
            return P.apply_rotary(x, cos, sin, interleaved=self.interleaved)
        head, tail = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((P.apply_rotary(head, cos, sin, interleaved=self.interleaved), tail), dim=-1)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, " \
               f"interleaved={self.interleaved}"


class ALiBiPosition(PositionEncoding):
    """Attention with linear biases (Press et al. 2022): ``-m_h |j - i|`` added to the scores of head ``h``.

    The slopes ``m_h`` are the paper's geometric sequence (:func:`attnkit.functional.position.alibi_slopes`),
    including its rule for a number of heads that is not a power of two.

    Args:
        num_heads: ``H``.

    Shape:
        ``score_bias``: positions ``(L,)``, ``(S,)`` -> ``(1, H, L, S)``.
    """

    kind = "bias"

    def __init__(self, num_heads: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.slopes: Tensor
        self.register_buffer("slopes", P.alibi_slopes(num_heads).to(device=device), persistent=False)

    def score_bias(self, query: Tensor, q_pos: Tensor, k_pos: Tensor, *, scale: float) -> Tensor:
        slopes = self.slopes.to(device=query.device, dtype=query.dtype)
        return P.alibi_bias(slopes, q_pos.to(query.device), k_pos.to(query.device)).unsqueeze(0)  # (1, H, L, S)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


class T5RelativeBias(PositionEncoding):
    """T5's learned relative position bias (Raffel et al. 2020): one scalar per (bucket, head).

    Relative positions ``j - i`` fall into ``num_buckets`` buckets (exact for small distances, log-spaced up to
    ``max_distance``); each bucket holds a learned bias per head. T5 does not scale its scores: pass
    ``scale=1.0`` to the attention module to reproduce it exactly.

    Args:
        num_heads: ``H``.
        bidirectional: encoder (``True``) or decoder (``False``, future keys share one bucket) bucketing.
        num_buckets: 32 in T5.
        max_distance: 128 in T5.

    Shape:
        ``score_bias``: positions ``(L,)``, ``(S,)`` -> ``(1, H, L, S)``.
    """

    kind = "bias"

    def __init__(self, num_heads: int, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_heads, self.bidirectional = num_heads, bidirectional
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads, device=device, dtype=dtype)

    def score_bias(self, query: Tensor, q_pos: Tensor, k_pos: Tensor, *, scale: float) -> Tensor:
        rel = P.relative_positions(q_pos.to(query.device), k_pos.to(query.device))  # (L, S)
        buckets = P.t5_bucket(rel, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                              max_distance=self.max_distance)  # (L, S)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0).to(query.dtype)  # (1, H, L, S)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, bidirectional={self.bidirectional}, " \
               f"num_buckets={self.num_buckets}, max_distance={self.max_distance}"


class ShawRelative(PositionEncoding):
    """Relative position representations of Shaw et al. 2018, shared across heads.

    ``e_ij = q_i . (k_j + a^K_ij) * scale`` and ``z_i = sum_j w_ij (v_j + a^V_ij)`` with
    ``a_ij = a[clip(j - i, -k, k)]``. The key term becomes a query-dependent score bias (so any backend serves
    it); the value term is added to the output from the weights the kernel used.

    Args:
        head_dim: ``E`` (size of ``a^K``).
        max_distance: ``k``, the clipping distance (the paper found 2..16 enough).
        values: also learn the value term ``a^V`` (of size ``value_dim``, default ``head_dim``).

    Shape:
        ``score_bias``: query ``(B, H, L, E)`` -> ``(B, H, L, S)``; ``value_term``: weights ``(B, H, L, S)`` ->
        ``(B, H, L, Ev)``.
    """

    kind = "bias"

    def __init__(self, head_dim: int, *, max_distance: int = 16, values: bool = True, value_dim: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if max_distance < 0:
            raise fail("max_distance >= 0", repr(max_distance), "max_distance=16")
        self.head_dim, self.max_distance = head_dim, max_distance
        n = 2 * max_distance + 1
        self.rel_key = nn.Parameter(torch.randn(n, head_dim, device=device, dtype=dtype) * head_dim**-0.5)
        self.rel_value = (
            nn.Parameter(torch.randn(n, value_dim or head_dim, device=device, dtype=dtype) * head_dim**-0.5)
            if values else None
        )
        self.uses_weights = values

    def score_bias(self, query: Tensor, q_pos: Tensor, k_pos: Tensor, *, scale: float) -> Tensor:
        index = P.shaw_index(q_pos.to(query.device), k_pos.to(query.device), self.max_distance)  # (L, S)
        return P.shaw_key_bias(query, self.rel_key, index, scale=scale)  # (B, H, L, S)

    def value_term(self, weights: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        if self.rel_value is None:
            return None
        index = P.shaw_index(q_pos.to(weights.device), k_pos.to(weights.device), self.max_distance)  # (L, S)
        return P.shaw_value_term(weights, self.rel_value, index)  # (B, H, L, Ev)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_distance={self.max_distance}, values={self.rel_value is not None}"
