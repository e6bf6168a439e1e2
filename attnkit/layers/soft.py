"""Soft attention modules for sequences: the tutorial's self-attention, Bahdanau, Luong, location-aware.

Papers:

* Bahdanau, Cho, Bengio. "Neural Machine Translation by Jointly Learning to Align and Translate", ICLR 2015.
  https://arxiv.org/abs/1409.0473
* Luong, Pham, Manning. "Effective Approaches to Attention-based Neural Machine Translation", EMNLP 2015.
  https://arxiv.org/abs/1508.04025
* Chorowski, Bahdanau, Serdyuk, Cho, Bengio. "Attention-Based Models for Speech Recognition", NeurIPS 2015.
  https://arxiv.org/abs/1506.07503
* Tu, Lu, Liu, Liu, Li. "Modeling Coverage for Neural Machine Translation", ACL 2016.
  https://arxiv.org/abs/1601.04811
* Vaswani et al. "Attention Is All You Need", NeurIPS 2017 (scaled dot-product, for :class:`SoftAttention`).
  https://arxiv.org/abs/1706.03762

Mask meaning (everywhere in attnkit): a boolean mask is ``True`` where attention **may** go; ``key_mask`` is
``(B, S)`` with ``True`` = a real (non-padding) key. Rows with no allowed key give zero context and zero weights.

The RNN-decoder modules (:class:`AdditiveAttention`, :class:`LuongAttention`, :class:`LocationAwareAttention`,
:class:`CoverageAttention`) share one calling convention::

    context, weights = attn(query, keys, values, key_mask=key_mask)
    # query (B, Dq) for one decoder step -> context (B, Dv), weights (B, S)
    # query (B, Lq, Dq) for Lq steps at once -> context (B, Lq, Dv), weights (B, Lq, S)

Their weights pass through a :class:`~attnkit.layers.WeightsTap` named ``tap``; observers (``attnkit.viz``)
receive them as ``(B, 1, Lq, S)`` — the ``(B, H, L, S)`` layout of every other attnkit map, with one head.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from attnkit._errors import fail
from attnkit.functional import scoring
from attnkit.functional._validate import check_tensor
from attnkit.functional.mask_args import MaskLike, normalize_masks

from .attend import Attend, WeightsTap
from .registry import register_attention

__all__ = [
    "AdditiveAttention",
    "CoverageAttention",
    "LocationAwareAttention",
    "LuongAttention",
    "SoftAttention",
]


# ---------------------------------------------------------------------------------------------------------------
# The tutorial's module: self-attention with Q/K/V projections of one input
# ---------------------------------------------------------------------------------------------------------------


@register_attention("soft_attention", "soft")
class SoftAttention(nn.Module):
    """Single-head self-attention: ``softmax(Q K^T / sqrt(D)) V`` with ``Q, K, V`` linear maps of one input.

    The module of the classic tutorial, with the same parameter names (``query_proj``, ``key_proj``,
    ``value_proj``), so its state dict loads unchanged. The kernel runs through an :class:`Attend` submodule
    (``self.attend``), which picks the fastest backend and lets ``attnkit.viz`` capture the weights.

    Args:
        d_model: feature size ``D`` of the input (and of Q, K, V and the output).
        bias: whether the three projections have a bias.
        dropout: dropout on the attention weights while training.
        backend: kernel backend for :class:`Attend` (``"auto"`` picks the fastest).

    Shape:
        x ``(B, L, D)`` -> ``(B, L, D)``. ``mask``: boolean (``True`` = may attend; integer 0/1 masks are read
        the same way, so the tutorial's ``mask == 0 -> masked`` works) or float (added to the scores), of shape
        ``(L, L)``, ``(B, L, L)`` or ``(B, 1, L, L)``; or a mask object
        (:class:`~attnkit.functional.SlidingWindowMask`, ...) or a ``mask_mod`` callable ``(b, h, q_idx, kv_idx)``
        (FlexAttention's signature; ``h`` is always 0). ``key_mask``: ``(B, L)``, ``True`` = real token. One rule
        for all: :func:`attnkit.functional.mask_args.normalize_masks`.

    Example:
        >>> import torch
        >>> from attnkit.layers import SoftAttention
        >>> attn = SoftAttention(16)
        >>> x = torch.randn(2, 5, 16)                        # (B, L, D)
        >>> attn(x).shape                                    # (B, L, D)
        torch.Size([2, 5, 16])
        >>> attn(x, key_mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2])).shape
        torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        d_model: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(d_model, int) or d_model <= 0:
            raise fail("d_model to be a positive int", repr(d_model), "SoftAttention(64)")
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.query_proj = nn.Linear(d_model, d_model, bias=bias, **kw)
        self.key_proj = nn.Linear(d_model, d_model, bias=bias, **kw)
        self.value_proj = nn.Linear(d_model, d_model, bias=bias, **kw)
        self.attend = Attend(dropout=dropout, backend=backend)

    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike = None,
        key_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        check_tensor("x", x)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise fail(f"x of shape (B, L, {self.d_model})", f"{tuple(x.shape)}", "x.view(B, L, d_model)")
        b, n, _ = x.shape
        q = self.query_proj(x).unsqueeze(1)  # (B, 1, L, D): one head
        k = self.key_proj(x).unsqueeze(1)  # (B, 1, L, D)
        v = self.value_proj(x).unsqueeze(1)  # (B, 1, L, D)
        args = normalize_masks(mask, key_mask, is_causal, batch=b, heads=1, q_len=n, k_len=n, dtype=q.dtype,
                               device=x.device, ndim_in=3)
        attn_mask = args.attn_mask(n, n, device=x.device)  # a tensor (B|1, 1, L|1, L), a mask object or None
        is_causal = args.is_causal
        out = self.attend(q, k, v, attn_mask, is_causal=is_causal)  # (B, 1, L, D)
        return out.squeeze(1)  # (B, L, D)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}"


# ---------------------------------------------------------------------------------------------------------------
# Shared plumbing of the RNN-decoder attentions
# ---------------------------------------------------------------------------------------------------------------



def _prepare_step(
    query: Tensor, keys: Tensor, values: Tensor | None, key_mask: Tensor | None, query_dim: int, key_dim: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, bool]:
    """Validate and lift a one-step query ``(B, Dq)`` to ``(B, 1, Dq)``; key_mask to ``(B, 1, S)``."""
    check_tensor("query", query)
    check_tensor("keys", keys)
    if keys.dim() != 3 or keys.shape[-1] != key_dim:
        raise fail(f"keys of shape (B, S, {key_dim})", f"{tuple(keys.shape)}", "keys.view(B, S, key_dim)")
    one_step = query.dim() == 2
    if query.dim() not in (2, 3) or query.shape[-1] != query_dim:
        raise fail(
            f"query of shape (B, {query_dim}) or (B, Lq, {query_dim})",
            f"{tuple(query.shape)}",
            "the decoder state of one step (B, Dq) or of all steps (B, Lq, Dq)",
        )
    q = query.unsqueeze(1) if one_step else query  # (B, Lq, Dq)
    b, s = keys.shape[0], keys.shape[1]
    if q.shape[0] != b:
        raise fail("one batch size for query and keys", f"{q.shape[0]} and {b}", "the same batch for both")
    v = keys if values is None else check_tensor("values", values)  # (B, S, Dv)
    if v.dim() != 3 or v.shape[:2] != (b, s):
        raise fail(f"values of shape (B, S, Dv) = ({b}, {s}, Dv)", f"{tuple(v.shape)}", "values=None (use keys)")
    mask = None
    if key_mask is not None:  # the one normaliser's key_mask rule: boolean or integer 0/1, True = real key
        args = normalize_masks(None, key_mask, batch=b, heads=1, q_len=q.shape[1], k_len=s, dtype=keys.dtype,
                               device=keys.device)
        mask = cast(Tensor, args.mask).view(b, 1, s)  # (B, 1, S)
    return q, keys, v, mask, one_step


def _finish(
    tap: WeightsTap, scores: Tensor, values: Tensor, mask: Tensor | None, one_step: bool
) -> tuple[Tensor, Tensor]:
    """Masked softmax over the keys, weighted sum of values, weights handed to the tap."""
    context, weights = scoring.attend(scores, values, mask, return_weights=True)  # (B, Lq, Dv), (B, Lq, S)
    tap(weights.unsqueeze(1))  # observers see (B, 1, Lq, S)
    if one_step:
        return context.squeeze(1), weights.squeeze(1)  # (B, Dv), (B, S)
    return context, weights


def _attn_dims(query_dim: int, key_dim: int, attn_dim: int) -> None:
    for name, val in (("query_dim", query_dim), ("key_dim", key_dim), ("attn_dim", attn_dim)):
        if not isinstance(val, int) or val <= 0:
            raise fail(f"{name} to be a positive int", repr(val), f"{name}=128")


# ---------------------------------------------------------------------------------------------------------------
# Bahdanau et al. 2015
# ---------------------------------------------------------------------------------------------------------------


@register_attention("additive", "bahdanau")
class AdditiveAttention(nn.Module):
    """Additive attention of Bahdanau et al. 2015, eq. (6) and appendix A.1.2.

    ``e_j = v^T tanh(W s + U h_j)``, ``a = softmax(e)`` over the real keys, ``context = sum_j a_j h_j``,
    where ``s`` is the decoder state (the query; in the paper the *previous* state ``s_{i-1}``) and ``h_j`` the
    encoder annotations. ``W`` is ``query_proj``, ``U`` is ``key_proj``, ``v`` is ``v``. The paper's alignment
    model has no bias; ``bias=True`` adds one inside the tanh.

    Args:
        query_dim: size ``Dq`` of the decoder state.
        key_dim: size ``Dk`` of the annotations.
        attn_dim: hidden size ``A`` of the alignment MLP (the paper's ``n'``).
        bias: add a bias inside the tanh (not in the paper).

    Shape:
        query ``(B, Dq)`` or ``(B, Lq, Dq)``; keys ``(B, S, Dk)``; values ``(B, S, Dv)`` (default: the keys);
        key_mask ``(B, S)`` boolean, ``True`` = real token. Returns context ``(B, Dv)`` / ``(B, Lq, Dv)`` and
        weights ``(B, S)`` / ``(B, Lq, S)``.

    Example:
        >>> import torch
        >>> from attnkit.layers import AdditiveAttention
        >>> attn = AdditiveAttention(query_dim=32, key_dim=64, attn_dim=48)
        >>> s, h = torch.randn(2, 32), torch.randn(2, 7, 64)      # decoder state (B, Dq), annotations (B, S, Dk)
        >>> ctx, w = attn(s, h, key_mask=torch.tensor([[True] * 7, [True] * 4 + [False] * 3]))
        >>> ctx.shape, w.shape                                     # (B, Dk), (B, S)
        (torch.Size([2, 64]), torch.Size([2, 7]))
        >>> bool((w[1, 4:] == 0).all())                            # padding gets no weight
        True
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        attn_dim: int,
        *,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _attn_dims(query_dim, key_dim, attn_dim)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.query_dim, self.key_dim, self.attn_dim = query_dim, key_dim, attn_dim
        self.query_proj = nn.Linear(query_dim, attn_dim, bias=bias, **kw)  # W
        self.key_proj = nn.Linear(key_dim, attn_dim, bias=False, **kw)  # U
        self.v = nn.Linear(attn_dim, 1, bias=False, **kw)  # v
        self.tap = WeightsTap()

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """Unnormalised scores ``v^T tanh(W s + U h)``: ``(B, Lq, Dq), (B, S, Dk) -> (B, Lq, S)``."""
        return scoring.additive_scores(
            query, keys, self.query_proj.weight.t(), self.key_proj.weight.t(), self.v.weight[0], self.query_proj.bias
        )

    def forward(
        self, query: Tensor, keys: Tensor, values: Tensor | None = None, *, key_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        q, k, v, mask, one_step = _prepare_step(query, keys, values, key_mask, self.query_dim, self.key_dim)
        return _finish(self.tap, self.scores(q, k), v, mask, one_step)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, attn_dim={self.attn_dim}"


# ---------------------------------------------------------------------------------------------------------------
# Luong et al. 2015
# ---------------------------------------------------------------------------------------------------------------

_LUONG_SCORES = ("dot", "general", "concat")


@register_attention("luong")
class LuongAttention(nn.Module):
    """Global attention of Luong et al. 2015, section 3.1, with its three content scores.

    * ``"dot"``: ``score(h_t, h_s) = h_t^T h_s`` (needs ``query_dim == key_dim``; no parameters);
    * ``"general"``: ``h_t^T W_a h_s`` (``W_a`` is ``weight``, a bias-free ``Linear(key_dim, query_dim)``);
    * ``"concat"``: ``v_a^T tanh(W_a [h_t; h_s])`` (``W_a`` is ``weight``, ``v_a`` is ``v``).

    ``a_t = softmax(score)`` over the real keys and ``c_t = sum_s a_t(s) h_s``. With ``output_dim`` the module
    also owns the paper's attentional layer ``W_c`` (eq. 5) and returns ``tanh(W_c [c_t; h_t])`` in place of
    ``c_t``; without it the decoder combines ``c_t`` and ``h_t`` itself. The query is the *current* decoder state
    ``h_t`` (Luong's order), unlike Bahdanau's previous state.

    Args:
        query_dim: size ``Dq`` of the decoder state ``h_t``.
        key_dim: size ``Dk`` of the encoder states ``h_s``.
        score: ``"dot"``, ``"general"`` or ``"concat"``.
        attn_dim: hidden size of the ``"concat"`` score (default ``query_dim``).
        output_dim: size of ``h~_t = tanh(W_c [c_t; h_t])``; ``None`` returns the context ``c_t`` itself.

    Shape:
        query ``(B, Dq)`` or ``(B, Lq, Dq)``; keys ``(B, S, Dk)``; values ``(B, S, Dv)`` (default: the keys);
        key_mask ``(B, S)`` boolean, ``True`` = real token. Returns context ``(B, Dv)`` / ``(B, Lq, Dv)``
        (or ``output_dim`` features) and weights ``(B, S)`` / ``(B, Lq, S)``.

    Example:
        >>> import torch
        >>> from attnkit.layers import LuongAttention
        >>> attn = LuongAttention(32, 32, score="general", output_dim=32)
        >>> h_t, h_s = torch.randn(2, 6, 32), torch.randn(2, 9, 32)   # all decoder steps, encoder states
        >>> h_tilde, a = attn(h_t, h_s)
        >>> h_tilde.shape, a.shape                                     # (B, Lq, output_dim), (B, Lq, S)
        (torch.Size([2, 6, 32]), torch.Size([2, 6, 9]))
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        *,
        score: str = "general",
        attn_dim: int | None = None,
        output_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if score not in _LUONG_SCORES:
            raise fail(f"score in {_LUONG_SCORES}", repr(score), 'score="general"')
        attn_dim = query_dim if attn_dim is None else attn_dim
        _attn_dims(query_dim, key_dim, attn_dim)
        if score == "dot" and query_dim != key_dim:
            raise fail(
                'query_dim == key_dim for score="dot"', f"{query_dim} and {key_dim}", 'score="general" to project'
            )
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.query_dim, self.key_dim, self.score_name = query_dim, key_dim, score
        self.attn_dim = attn_dim if score == "concat" else None
        self.weight: nn.Linear | None = None
        self.v: nn.Linear | None = None
        if score == "general":
            self.weight = nn.Linear(key_dim, query_dim, bias=False, **kw)  # W_a h_s
        elif score == "concat":
            self.weight = nn.Linear(query_dim + key_dim, attn_dim, bias=False, **kw)  # W_a [h_t; h_s]
            self.v = nn.Linear(attn_dim, 1, bias=False, **kw)  # v_a
        self.output_dim = output_dim
        self.out_proj: nn.Linear | None = None
        self.tap = WeightsTap()
        if output_dim is not None:
            if not isinstance(output_dim, int) or output_dim <= 0:
                raise fail("output_dim to be a positive int or None", repr(output_dim), "output_dim=query_dim")
            # W_c [c_t; h_t]: values are the keys unless the caller passes others of the same size
            self.out_proj = nn.Linear(key_dim + query_dim, output_dim, bias=False, **kw)

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """Unnormalised scores ``(B, Lq, Dq), (B, S, Dk) -> (B, Lq, S)``."""
        if self.score_name == "dot":
            return scoring.dot_scores(query, keys)
        weight = cast(nn.Linear, self.weight)
        if self.score_name == "general":
            return scoring.general_scores(query, keys, weight.weight)
        return scoring.concat_scores(query, keys, weight.weight.t(), cast(nn.Linear, self.v).weight[0])

    def forward(
        self, query: Tensor, keys: Tensor, values: Tensor | None = None, *, key_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        q, k, v, mask, one_step = _prepare_step(query, keys, values, key_mask, self.query_dim, self.key_dim)
        if self.out_proj is not None and v.shape[-1] != self.key_dim:
            raise fail(
                f"values with key_dim = {self.key_dim} features when output_dim is set",
                f"{v.shape[-1]}",
                "values=None, or output_dim=None and combine the context yourself",
            )
        context, weights = _finish(self.tap, self.scores(q, k), v, mask, False)  # (B, Lq, Dv), (B, Lq, S)
        if self.out_proj is not None:
            context = torch.tanh(self.out_proj(torch.cat([context, q], dim=-1)))  # (B, Lq, output_dim)
        if one_step:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights

    def extra_repr(self) -> str:
        extra = f", attn_dim={self.attn_dim}" if self.attn_dim is not None else ""
        out = f", output_dim={self.output_dim}" if self.output_dim is not None else ""
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, score={self.score_name!r}{extra}{out}"


# ---------------------------------------------------------------------------------------------------------------
# Chorowski et al. 2015 (location-aware) and Tu et al. 2016 (coverage)
# ---------------------------------------------------------------------------------------------------------------


def _one_step_query(query: Tensor, query_dim: int) -> Tensor:
    check_tensor("query", query)
    if query.dim() == 3 and query.shape[1] == 1:
        query = query[:, 0]
    if query.dim() != 2 or query.shape[-1] != query_dim:
        raise fail(
            f"one decoder step: query of shape (B, {query_dim}) or (B, 1, {query_dim})",
            f"{tuple(query.shape)}",
            "a loop over decoder steps (these weights depend on the previous step's weights)",
        )
    return query


@register_attention("location_aware", "chorowski")
class LocationAwareAttention(nn.Module):
    """Location-aware attention of Chorowski et al. 2015, eqs. (8)-(9): scores see the previous alignment.

    ``f = F * a_prev`` (a 1-D convolution of the previous weights with ``num_filters`` filters of width
    ``kernel_size``), ``e_j = w^T tanh(W s + V h_j + U f_j + b)``, ``a = softmax(e)`` over the real keys,
    ``context = sum_j a_j h_j``. This helps long inputs: the model can learn to move forward from where it
    attended last. Pass ``a_prev`` as ``(B, S)``, or several channels ``(B, in_channels, S)``, e.g. the previous
    and the cumulative weights (as Tacotron 2 does); at the first step pass zeros (or ``None``).

    Args:
        query_dim: size of the decoder state ``s``.
        key_dim: size of the annotations ``h_j``.
        attn_dim: hidden size of the alignment MLP.
        num_filters: number of location filters ``k``.
        kernel_size: filter width ``r`` (odd, so the features stay centred).
        in_channels: number of weight channels in ``prev_weights``.

    Shape:
        query ``(B, Dq)`` (one decoder step); keys ``(B, S, Dk)``; values ``(B, S, Dv)`` (default: keys);
        prev_weights ``(B, S)`` or ``(B, in_channels, S)``; key_mask ``(B, S)`` (``True`` = real token).
        Returns context ``(B, Dv)`` and weights ``(B, S)``.

    Example:
        >>> import torch
        >>> from attnkit.layers import LocationAwareAttention
        >>> attn = LocationAwareAttention(16, 24, 32, num_filters=4, kernel_size=5)
        >>> h, w = torch.randn(2, 10, 24), torch.zeros(2, 10)          # annotations, no previous alignment
        >>> for step in range(3):
        ...     ctx, w = attn(torch.randn(2, 16), h, prev_weights=w)
        >>> ctx.shape, w.shape                                           # (B, Dk), (B, S)
        (torch.Size([2, 24]), torch.Size([2, 10]))
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        attn_dim: int,
        *,
        num_filters: int = 32,
        kernel_size: int = 31,
        in_channels: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _attn_dims(query_dim, key_dim, attn_dim)
        if not isinstance(kernel_size, int) or kernel_size <= 0 or kernel_size % 2 == 0:
            raise fail("an odd positive kernel_size", repr(kernel_size), "kernel_size=31")
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.query_dim, self.key_dim, self.attn_dim = query_dim, key_dim, attn_dim
        self.in_channels = in_channels
        self.location_conv = nn.Conv1d(
            in_channels, num_filters, kernel_size, padding=kernel_size // 2, bias=False, **kw
        )  # F
        self.query_proj = nn.Linear(query_dim, attn_dim, bias=True, **kw)  # W (and the bias b)
        self.key_proj = nn.Linear(key_dim, attn_dim, bias=False, **kw)  # V
        self.location_proj = nn.Linear(num_filters, attn_dim, bias=False, **kw)  # U
        self.v = nn.Linear(attn_dim, 1, bias=False, **kw)  # w
        self.tap = WeightsTap()

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        *,
        prev_weights: Tensor | None = None,
        key_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        query = _one_step_query(query, self.query_dim)
        q, k, v, mask, _ = _prepare_step(query, keys, values, key_mask, self.query_dim, self.key_dim)
        b, s = k.shape[0], k.shape[1]
        if prev_weights is None:
            prev = k.new_zeros(b, self.in_channels, s)
        else:
            check_tensor("prev_weights", prev_weights)
            prev = prev_weights.unsqueeze(1) if prev_weights.dim() == 2 else prev_weights
            if prev.shape != (b, self.in_channels, s):
                raise fail(
                    f"prev_weights of shape (B, S) or (B, in_channels, S) = ({b}, {self.in_channels}, {s})",
                    f"{tuple(prev_weights.shape)}",
                    "the weights returned by the previous step (zeros at the first)",
                )
        feats = self.location_conv(prev.to(k.dtype)).transpose(1, 2)  # (B, S, num_filters): f_j
        # V h_j + U f_j = [V U] [h_j; f_j]: one additive score over the keys extended with location features
        ext_keys = torch.cat([k, feats], dim=-1)  # (B, S, Dk + num_filters)
        w_key = torch.cat([self.key_proj.weight, self.location_proj.weight], dim=1).t()  # (Dk + k, A)
        scores = scoring.additive_scores(
            q, ext_keys, self.query_proj.weight.t(), w_key, self.v.weight[0], self.query_proj.bias
        )  # (B, 1, S)
        context, weights = _finish(self.tap, scores, v, mask, True)
        return context, weights

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, attn_dim={self.attn_dim}"


@register_attention("coverage", "tu")
class CoverageAttention(nn.Module):
    """Additive attention with linguistic coverage (Tu et al. 2016, section 3.1.1, eqs. 5-7).

    ``e_j = v^T tanh(W s + U h_j + V C_j)`` where ``C_j`` is how much source word ``j`` has been attended so
    far. After each step the caller updates the coverage with :meth:`update_coverage`:
    ``C_j <- C_j + a_j / Phi_j``. With ``fertility=N`` the module learns the paper's fertility
    ``Phi_j = N * sigmoid(U_f h_j)`` (how many target words source word ``j`` produces); without it ``Phi_j = 1``
    and the coverage is the sum of past weights. Coverage discourages attending the same words again (fewer
    repeated and dropped words on long inputs).

    Args:
        query_dim: size of the decoder state ``s``.
        key_dim: size of the annotations ``h_j``.
        attn_dim: hidden size of the alignment MLP.
        fertility: the maximum fertility ``N`` (paper: 2), or ``None`` for ``Phi = 1``.

    Shape:
        query ``(B, Dq)`` (one decoder step); keys ``(B, S, Dk)``; values ``(B, S, Dv)`` (default: keys);
        coverage ``(B, S)``; key_mask ``(B, S)`` (``True`` = real token). Returns context ``(B, Dv)`` and
        weights ``(B, S)``.

    Example:
        >>> import torch
        >>> from attnkit.layers import CoverageAttention
        >>> attn = CoverageAttention(16, 24, 32, fertility=2)
        >>> h = torch.randn(2, 10, 24)                                # annotations (B, S, Dk)
        >>> cov = attn.init_coverage(h)                               # zeros (B, S)
        >>> ctx, w = attn(torch.randn(2, 16), h, coverage=cov)
        >>> cov = attn.update_coverage(cov, w, h)
        >>> ctx.shape, cov.shape
        (torch.Size([2, 24]), torch.Size([2, 10]))
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        attn_dim: int,
        *,
        fertility: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _attn_dims(query_dim, key_dim, attn_dim)
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.query_dim, self.key_dim, self.attn_dim = query_dim, key_dim, attn_dim
        self.query_proj = nn.Linear(query_dim, attn_dim, bias=False, **kw)  # W
        self.key_proj = nn.Linear(key_dim, attn_dim, bias=False, **kw)  # U
        self.coverage_proj = nn.Linear(1, attn_dim, bias=False, **kw)  # V
        self.v = nn.Linear(attn_dim, 1, bias=False, **kw)  # v
        self.fertility = fertility
        self.fertility_proj = nn.Linear(key_dim, 1, bias=False, **kw) if fertility is not None else None  # U_f
        self.tap = WeightsTap()

    @staticmethod
    def init_coverage(keys: Tensor) -> Tensor:
        """Zero coverage ``(B, S)`` for annotations ``(B, S, Dk)``."""
        return keys.new_zeros(keys.shape[0], keys.shape[1])

    def update_coverage(self, coverage: Tensor, weights: Tensor, keys: Tensor) -> Tensor:
        """``C + a / Phi`` (eq. 7), ``Phi = N * sigmoid(U_f h)`` with fertility else 1: ``(B, S)``."""
        if self.fertility_proj is None or self.fertility is None:
            return coverage + weights
        phi = self.fertility * torch.sigmoid(self.fertility_proj(keys)).squeeze(-1)  # (B, S)
        return coverage + weights / phi

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        *,
        coverage: Tensor | None = None,
        key_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        query = _one_step_query(query, self.query_dim)
        q, k, v, mask, _ = _prepare_step(query, keys, values, key_mask, self.query_dim, self.key_dim)
        b, s = k.shape[0], k.shape[1]
        cov = self.init_coverage(k) if coverage is None else check_tensor("coverage", coverage)
        if cov.shape != (b, s):
            raise fail(f"coverage of shape (B, S) = ({b}, {s})", f"{tuple(cov.shape)}", "attn.init_coverage(keys)")
        ext_keys = torch.cat([k, cov.to(k.dtype).unsqueeze(-1)], dim=-1)  # (B, S, Dk + 1): [h_j; C_j]
        w_key = torch.cat([self.key_proj.weight, self.coverage_proj.weight], dim=1).t()  # (Dk + 1, A)
        scores = scoring.additive_scores(q, ext_keys, self.query_proj.weight.t(), w_key, self.v.weight[0])
        return _finish(self.tap, scores, v, mask, True)

    def extra_repr(self) -> str:
        return (
            f"query_dim={self.query_dim}, key_dim={self.key_dim}, attn_dim={self.attn_dim}, "
            f"fertility={self.fertility}"
        )

