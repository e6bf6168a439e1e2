"""Position math for attention: sinusoidal tables, rotary embeddings, ALiBi, T5 buckets, Shaw relative positions.

Papers:

* Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762 (sinusoidal table).
* Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", https://arxiv.org/abs/2104.09864.
* Press et al. 2022, "Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation",
  https://arxiv.org/abs/2108.12409 (ALiBi).
* Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer",
  https://arxiv.org/abs/1910.10683 (T5 bucketed relative bias).
* Shaw et al. 2018, "Self-Attention with Relative Position Representations", https://arxiv.org/abs/1803.02155.

Every function takes explicit integer ``positions`` (not just lengths), so the same code serves a KV-cache decoding
step, whose queries sit at positions ``offset .. offset + L - 1``, and a ring buffer whose keys are out of order.
Biases returned here are float tensors meant to be **added** to the scores (the library's float-mask meaning).

Example:
    >>> import torch
    >>> from attnkit.functional.position import alibi_slopes, rope_cos_sin, apply_rotary
    >>> alibi_slopes(4)
    tensor([0.2500, 0.0625, 0.0156, 0.0039])
    >>> x = torch.randn(1, 2, 5, 8)                        # (B, H, L, E)
    >>> cos, sin = rope_cos_sin(torch.arange(5), 8)        # (L, E/2) each
    >>> apply_rotary(x, cos, sin).shape
    torch.Size([1, 2, 5, 8])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validate import fail

__all__ = [
    "alibi_bias",
    "alibi_slopes",
    "apply_rotary",
    "relative_positions",
    "rope_cos_sin",
    "shaw_index",
    "shaw_key_bias",
    "shaw_value_term",
    "sinusoidal_table",
    "t5_bucket",
]


def _check_positions(name: str, positions: Tensor) -> Tensor:
    if not isinstance(positions, Tensor) or positions.dim() != 1 or positions.dtype.is_floating_point:
        got = f"{positions.dtype} {tuple(positions.shape)}" if isinstance(positions, Tensor) else type(positions)
        raise fail(f"`{name}` as a 1-D integer tensor of positions", str(got), f"torch.arange(L) for {name}")
    return positions


def relative_positions(q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """``(L, S)`` integer matrix ``k_pos[j] - q_pos[i]``: negative for keys in the past."""
    q_pos = _check_positions("q_pos", q_pos)
    k_pos = _check_positions("k_pos", k_pos)
    return k_pos.view(1, -1) - q_pos.view(-1, 1)  # (L, S)


# ------------------------------------------------------------------------------------------------ sinusoidal
def sinusoidal_table(positions: Tensor, dim: int, *, base: float = 10000.0, dtype: torch.dtype | None = None) -> Tensor:
    """The sinusoidal position table of Vaswani et al.: ``(L, dim)``.

    ``PE[p, 2i] = sin(p / base^(2i/dim))`` and ``PE[p, 2i+1] = cos(p / base^(2i/dim))``.
    """
    positions = _check_positions("positions", positions)
    if dim <= 0 or dim % 2:
        raise fail("an even, positive dim", str(dim), "an even model width")
    inv = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)  # (dim/2,)
    angles = positions.to(torch.float64).view(-1, 1) * inv.view(1, -1)  # (L, dim/2)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1).view(positions.shape[0], dim)  # (L, dim) interleaved
    return table.to(dtype or torch.get_default_dtype())


# ------------------------------------------------------------------------------------------------ rotary
def rope_cos_sin(
    positions: Tensor, dim: int, *, base: float = 10000.0, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Cosines and sines ``(L, dim/2)`` of the rotary angles ``p * base^(-2i/dim)`` (computed in float64)."""
    positions = _check_positions("positions", positions)
    if dim <= 0 or dim % 2:
        raise fail("an even, positive head dim for rotary embeddings", str(dim), "an even head_dim")
    inv = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)  # (dim/2,)
    angles = positions.to(torch.float64).view(-1, 1) * inv.view(1, -1)  # (L, dim/2)
    dtype = dtype or torch.get_default_dtype()
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> Tensor:
    """Rotate feature pairs of ``x (..., L, E)`` by the angles whose ``cos``/``sin`` are ``(L, E/2)``.

    With ``interleaved=False`` (GPT-NeoX / LLaMA layout) feature ``i`` pairs with ``i + E/2``; with
    ``interleaved=True`` (the RoFormer paper's layout) feature ``2i`` pairs with ``2i + 1``. Each pair
    ``(a, b)`` becomes ``(a cos - b sin, a sin + b cos)``: a rotation, so norms are preserved and
    ``<R_m q, R_n k>`` depends only on ``n - m``.
    """
    e = x.shape[-1]
    if cos.shape != sin.shape or cos.shape[-1] * 2 != e or cos.shape[0] != x.shape[-2]:
        raise fail(
            f"cos/sin of shape (L, E/2) = ({x.shape[-2]}, {e // 2})",
            f"{tuple(cos.shape)} and {tuple(sin.shape)}",
            "rope_cos_sin(positions, E) with one position per query/key",
        )
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]  # (..., L, E/2) each
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)  # (..., L, E)
    a, b = x[..., : e // 2], x[..., e // 2 :]  # (..., L, E/2) each
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)  # (..., L, E)


# ------------------------------------------------------------------------------------------------ ALiBi
def alibi_slopes(num_heads: int) -> Tensor:
    """The head-specific ALiBi slopes of Press et al. 2022 (float32, ``(H,)``).

    For ``H`` a power of two the slopes are the geometric sequence ``2^(-8/H), 2^(-16/H), ..., 2^(-8)``. Otherwise
    take the ``2^floor(log2 H)`` slopes of the nearest smaller power of two and fill up with every other slope
    of the next power of two (the rule of the paper's reference code).
    """
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise fail("a positive number of heads", repr(num_heads), "num_heads=8")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(closest)
    if closest != num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """ALiBi bias ``-slope_h * |k_pos[j] - q_pos[i]|`` of shape ``(H, L, S)`` (added to the scores).

    For causal attention this is the paper's ``-m (i - j)`` on every key a query may see; for keys in the future
    (bidirectional use) the distance is symmetric.
    """
    dist = relative_positions(q_pos, k_pos).abs()  # (L, S)
    return -slopes.view(-1, 1, 1) * dist.to(slopes.dtype)  # (H, L, S)


# ------------------------------------------------------------------------------------------------ T5
def t5_bucket(
    relative: Tensor, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> Tensor:
    """Bucket index of each relative position ``k_pos - q_pos`` as in T5 (Raffel et al. 2020).

    Half of the buckets (all of them when ``bidirectional=False``, where future keys share bucket 0) cover one
    direction. Within a direction, the first half of its buckets hold the exact distances ``0 .. n/2 - 1``; the
    rest cover distances up to ``max_distance`` on a log scale, and anything farther shares the last bucket.
    """
    if relative.dtype.is_floating_point:
        raise fail("integer relative positions", str(relative.dtype), "relative_positions(q_pos, k_pos)")
    n = num_buckets
    bucket = torch.zeros_like(relative)
    if bidirectional:
        n //= 2
        bucket = bucket + (relative > 0).to(relative.dtype) * n  # future keys use the upper half
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)  # only the past counts; future keys share bucket 0
    exact = n // 2
    is_small = distance < exact
    # log-spaced buckets for exact <= distance < max_distance; float32 like the original, so bucket edges match
    far = distance.clamp(min=exact).to(torch.float32)
    log_bucket = exact + (torch.log(far / exact) / math.log(max_distance / exact) * (n - exact)).to(relative.dtype)
    log_bucket = log_bucket.clamp(max=n - 1)
    return bucket + torch.where(is_small, distance, log_bucket)


# ------------------------------------------------------------------------------------------------ Shaw
def shaw_index(q_pos: Tensor, k_pos: Tensor, max_distance: int) -> Tensor:
    """``(L, S)`` index into Shaw's ``2k + 1`` relative embeddings: ``clip(k_pos - q_pos, -k, k) + k``."""
    return relative_positions(q_pos, k_pos).clamp(-max_distance, max_distance) + max_distance  # (L, S)


def shaw_key_bias(query: Tensor, rel_key: Tensor, index: Tensor, *, scale: float) -> Tensor:
    """Shaw et al.'s key term ``scale * q_i . a^K_{ij}`` as an additive bias ``(B, H, L, S)``.

    Args:
        query: ``(B, H, L, E)`` (already projected, before scaling).
        rel_key: ``(2k + 1, E)`` relative key embeddings.
        index: ``(L, S)`` from :func:`shaw_index`.
    """
    per_bucket = torch.matmul(query, rel_key.t().to(query.dtype)) * scale  # (B, H, L, 2k+1)
    b, h, q_len, _ = per_bucket.shape
    return per_bucket.gather(-1, index.expand(b, h, *index.shape))  # (B, H, L, S)


def shaw_value_term(weights: Tensor, rel_value: Tensor, index: Tensor) -> Tensor:
    """Shaw et al.'s value term ``sum_j w_ij a^V_{ij}`` of shape ``(B, H, L, Ev)``.

    The weights that fall in the same relative bucket are summed first (``scatter_add``), so the cost is
    ``O(L S + L (2k+1) Ev)`` rather than ``O(L S Ev)``.
    """
    b, h, q_len, _ = weights.shape
    buckets = rel_value.shape[0]
    per_bucket = weights.new_zeros(b, h, q_len, buckets)  # (B, H, L, 2k+1)
    per_bucket.scatter_add_(-1, index.expand(b, h, *index.shape), weights)
    return torch.matmul(per_bucket, rel_value.to(weights.dtype))  # (B, H, L, Ev)
