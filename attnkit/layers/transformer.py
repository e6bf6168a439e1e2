"""Transformer encoder and decoder layers and stacks, built on attnkit's :class:`MultiHeadAttention`.

Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762 (the post-norm layers);
Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture", https://arxiv.org/abs/2002.04745
(pre-norm, ``norm_first=True``).

Post-norm (``norm_first=False``, the paper's and BERT's layout)::

    x = norm1(x + dropout1(self_attn(x)))
    x = norm2(x + dropout2(cross_attn(x, memory)))          # decoder only
    x = norm3(x + dropout3(linear2(dropout(act(linear1(x))))))

Pre-norm (``norm_first=True``): ``x = x + dropout1(self_attn(norm1(x)))`` and so on; stacks of pre-norm layers
usually end with a final ``norm``.

The submodule and parameter names follow :class:`torch.nn.TransformerEncoderLayer` /
:class:`torch.nn.TransformerDecoderLayer` (``linear1``, ``linear2``, ``norm1``.., ``dropout1``..), and
``from_torch`` copies a PyTorch layer's weights, so the two can be compared one to one.

Masks (one meaning in attnkit): boolean ``True`` = may attend, float = added to the scores. ``key_mask`` /
``tgt_key_mask`` / ``memory_key_mask`` are ``(B, S)`` booleans with ``True`` = a real token — the inverse of
PyTorch's ``*_key_padding_mask`` (pass ``~src_key_padding_mask``), and PyTorch's boolean ``*_mask`` is ``True``
where attention is *not* allowed (pass ``~mask``). Rows with no key to attend to give zeros, never NaN.

Incremental decoding: :meth:`TransformerDecoder.new_cache` returns one :class:`DecoderLayerCache` per layer: the
self-attention keys/values (a :class:`~attnkit.layers.KVCache`) and the cross-attention keys/values of the memory
(a :class:`~attnkit.layers.CrossKVCache` that the cross-attention fills at the first step and reuses). Feed one (or a
few) new target tokens per call with ``is_causal=True``; the outputs equal those of a full recomputation. Beam search
reorders both in place with :meth:`DecoderLayerCache.reorder`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._errors import fail
from attnkit.functional._validate import check_tensor
from attnkit.functional.mask_args import MaskLike

from .cache import CrossKVCache, KVCache
from .multi_head import MultiHeadAttention
from .position import PositionEncoding

__all__ = [
    "DecoderLayerCache",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}


def _activation(activation: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if callable(activation):
        return activation
    if activation not in _ACTIVATIONS:
        raise fail(f"activation in {sorted(_ACTIVATIONS)} or a callable", repr(activation), 'activation="gelu"')
    return _ACTIVATIONS[activation]


def _check_x(name: str, x: Any, d_model: int) -> Tensor:
    check_tensor(name, x)
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise fail(f"{name} of shape (B, L, {d_model})", f"{tuple(x.shape)}", f"{name}.view(B, L, d_model)")
    return x


# ---------------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------------


class TransformerEncoderLayer(nn.Module):
    """Self-attention and a feed-forward block, each with a residual connection and LayerNorm.

    Args:
        d_model: model width ``D``.
        nhead: attention heads ``H`` (``D % H == 0``).
        dim_feedforward: hidden size of the feed-forward block.
        dropout: dropout on the attention weights, after each sub-block and inside the feed-forward block.
        activation: ``"relu"``, ``"gelu"`` (exact, erf) or a callable.
        layer_norm_eps: LayerNorm epsilon.
        norm_first: pre-norm (``True``) or post-norm (``False``, the paper's layout).
        bias: biases in the linear layers and LayerNorms.
        num_kv_heads: key/value heads for grouped-query attention (default ``nhead``).
        position: a position module for the self-attention (:mod:`attnkit.layers.position`).
        backend: kernel backend of the attention (``"auto"`` picks the fastest).

    Shape:
        src ``(B, L, D)`` -> ``(B, L, D)``. attn_mask ``(L, L)``, ``(B, L, L)`` or ``(B, 1|H, L, L)``: boolean
        ``True`` = may attend (integer 0/1 the same), float = added; or a mask object / ``mask_mod`` callable, as
        :class:`~attnkit.layers.MultiHeadAttention` takes. key_mask ``(B, L)``: ``True`` = real token.

    Example:
        >>> import torch
        >>> from attnkit.layers import TransformerEncoderLayer
        >>> layer = TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0)
        >>> x = torch.randn(2, 6, 32)                                    # (B, L, D)
        >>> layer(x, key_mask=torch.tensor([[True] * 6, [True] * 4 + [False] * 2])).shape
        torch.Size([2, 6, 32])
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        *,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = "relu",
        layer_norm_eps: float = 1e-5,
        norm_first: bool = False,
        bias: bool = True,
        num_kv_heads: int | None = None,
        position: PositionEncoding | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.d_model, self.norm_first = d_model, norm_first
        self.self_attn = MultiHeadAttention(
            d_model, nhead, num_kv_heads=num_kv_heads, bias=bias, dropout=dropout, position=position,
            backend=backend, **kw,
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **kw)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **kw)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)

    def _sa(self, x: Tensor, attn_mask: Any, key_mask: Tensor | None, is_causal: bool) -> Tensor:
        out = self.self_attn(x, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal)
        return self.dropout1(out)

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self,
        src: Tensor,
        *,
        attn_mask: MaskLike = None,
        key_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        x = _check_x("src", src, self.d_model)
        if self.norm_first:
            x = x + self._sa(self.norm1(x), attn_mask, key_mask, is_causal)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, attn_mask, key_mask, is_causal))
        return self.norm2(x + self._ff(x))

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer, *, backend: str = "auto") -> TransformerEncoderLayer:
        """A layer with the architecture and a copy of the weights of a ``torch.nn.TransformerEncoderLayer``."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise fail("a torch.nn.TransformerEncoderLayer", type(layer).__name__, "TransformerEncoderLayer(...)")
        ref = layer.linear1.weight
        new = cls(
            layer.self_attn.embed_dim, layer.self_attn.num_heads, dim_feedforward=layer.linear1.out_features,
            dropout=layer.dropout.p, activation=_torch_activation(layer.activation), layer_norm_eps=layer.norm1.eps,
            norm_first=layer.norm_first, bias=layer.linear1.bias is not None, backend=backend,
            device=ref.device, dtype=ref.dtype,
        )
        new.self_attn.load_state_dict(MultiHeadAttention.from_torch(layer.self_attn).state_dict())
        _copy_plain(new, layer, ("linear1", "linear2", "norm1", "norm2"))
        return new

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}"


def _torch_activation(act: Any) -> str | Callable[[Tensor], Tensor]:
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    return act  # type: ignore[no-any-return]


def _copy_plain(new: nn.Module, old: nn.Module, names: Sequence[str]) -> None:
    for name in names:
        getattr(new, name).load_state_dict(getattr(old, name).state_dict())


class TransformerEncoder(nn.Module):
    """A stack of ``num_layers`` copies of an encoder layer, and an optional final ``norm``.

    Args:
        encoder_layer: the layer to copy (each copy has its own parameters).
        num_layers: how many layers.
        norm: a module applied to the output (usually ``nn.LayerNorm(d_model)`` for pre-norm stacks).

    Shape:
        src ``(B, L, D)`` -> ``(B, L, D)``; masks as in :class:`TransformerEncoderLayer`.

    Example:
        >>> import torch
        >>> from attnkit.layers import TransformerEncoder, TransformerEncoderLayer
        >>> enc = TransformerEncoder(TransformerEncoderLayer(32, 4, dim_feedforward=64, norm_first=True), 2,
        ...                          norm=torch.nn.LayerNorm(32))
        >>> enc(torch.randn(2, 6, 32), is_causal=True).shape
        torch.Size([2, 6, 32])
    """

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, *, norm: nn.Module | None = None):
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise fail("num_layers >= 1", repr(num_layers), "num_layers=6")
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm

    def forward(
        self,
        src: Tensor,
        *,
        attn_mask: MaskLike = None,
        key_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, attn_mask=attn_mask, key_mask=key_mask, is_causal=is_causal)
        return self.norm(x) if self.norm is not None else x


# ---------------------------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DecoderLayerCache:
    """What one decoder layer keeps between decoding steps.

    Attributes:
        self_attn: keys/values of every target token so far (a :class:`~attnkit.layers.KVCache`).
        cross_attn: the cross-attention keys and values of the memory (a :class:`~attnkit.layers.CrossKVCache`),
            projected at the first step and reused (the memory must stay the same while the cache lives;
            :meth:`reset` forgets it).
    """

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: CrossKVCache = field(default_factory=CrossKVCache)

    def reset(self) -> None:
        """Forget the target tokens and the memory."""
        self.self_attn.reset()
        self.cross_attn.reset()

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (in that order, repeats allowed) of everything cached: beam search's step.

        The self-attention buffers are reused in place when the batch size stays the same (see
        :meth:`KVCache.reorder <attnkit.layers.KVCache.reorder>`).
        """
        self.self_attn.reorder(index)
        self.cross_attn.reorder(index)

    @property
    def length(self) -> int:
        """Target tokens decoded so far."""
        return self.self_attn.length


class TransformerDecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder memory and a feed-forward block.

    Args:
        d_model: model width ``D``.
        nhead: attention heads ``H`` (``D % H == 0``).
        dim_feedforward: hidden size of the feed-forward block.
        dropout: dropout on the attention weights, after each sub-block and inside the feed-forward block.
        activation: ``"relu"``, ``"gelu"`` (exact, erf) or a callable.
        layer_norm_eps: LayerNorm epsilon.
        norm_first: pre-norm (``True``) or post-norm (``False``, the paper's layout).
        bias: biases in the linear layers and LayerNorms.
        num_kv_heads: key/value heads for grouped-query attention, in both attentions (default ``nhead``).
        position: a position module for the self-attention (RoPE / ALiBi / ... work with the cache).
        backend: kernel backend of both attentions (``"auto"`` picks the fastest).

    Shape:
        tgt ``(B, L, D)``, memory ``(B, S, D)`` -> ``(B, L, D)``. tgt_mask ``(L, L)`` / memory_mask ``(L, S)``
        (also ``(B, L, ·)`` or ``(B, 1|H, L, ·)``): boolean ``True`` = may attend (integer 0/1 the same), float =
        added; or a mask object / ``mask_mod`` callable.
        tgt_key_mask ``(B, L)`` / memory_key_mask ``(B, S)``: ``True`` = real token. With a cache, ``tgt`` holds
        only the new tokens and ``tgt_key_mask`` covers every cached token.

    Example:
        >>> import torch
        >>> from attnkit.layers import TransformerDecoderLayer
        >>> layer = TransformerDecoderLayer(32, 4, dim_feedforward=64, dropout=0.0).eval()
        >>> tgt, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)   # (B, L, D), (B, S, D)
        >>> full = layer(tgt, memory, is_causal=True)
        >>> cache = layer.new_cache()
        >>> steps = [layer(tgt[:, t : t + 1], memory, is_causal=True, cache=cache) for t in range(5)]
        >>> torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        True
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        *,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = "relu",
        layer_norm_eps: float = 1e-5,
        norm_first: bool = False,
        bias: bool = True,
        num_kv_heads: int | None = None,
        position: PositionEncoding | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.d_model, self.norm_first = d_model, norm_first
        mha = {"num_kv_heads": num_kv_heads, "bias": bias, "dropout": dropout, "backend": backend, **kw}
        self.self_attn = MultiHeadAttention(d_model, nhead, position=position, **mha)
        self.multihead_attn = MultiHeadAttention(d_model, nhead, **mha)  # cross-attention (PyTorch's name)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **kw)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **kw)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)

    @staticmethod
    def new_cache(*, capacity: int = 256) -> DecoderLayerCache:
        """An empty cache for incremental decoding with this layer."""
        return DecoderLayerCache(KVCache(capacity=capacity))

    # ---- sub-blocks
    def _sa(self, x: Tensor, mask: Any, key_mask: Tensor | None, is_causal: bool, cache: KVCache | None) -> Tensor:
        out = self.self_attn(x, attn_mask=mask, key_mask=key_mask, is_causal=is_causal, cache=cache)
        return self.dropout1(out)

    def _cross(
        self, x: Tensor, memory: Tensor, mask: MaskLike, key_mask: Tensor | None, cache: CrossKVCache | None
    ) -> Tensor:
        # with a cache, the memory's keys/values are projected at the first step and reused; the queries every step
        out = self.multihead_attn(x, memory, attn_mask=mask, key_mask=key_mask, cache=cache)
        return self.dropout2(out)

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        tgt_mask: MaskLike = None,
        memory_mask: MaskLike = None,
        tgt_key_mask: Tensor | None = None,
        memory_key_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: DecoderLayerCache | KVCache | None = None,
    ) -> Tensor:
        x = _check_x("tgt", tgt, self.d_model)
        _check_x("memory", memory, self.d_model)
        self_cache: KVCache | None = None
        cross_cache: CrossKVCache | None = None
        if isinstance(cache, KVCache):  # a bare KVCache caches the self-attention only
            self_cache = cache
        elif isinstance(cache, DecoderLayerCache):
            self_cache, cross_cache = cache.self_attn, cache.cross_attn
        elif cache is not None:
            raise fail("cache= a DecoderLayerCache, a KVCache or None", type(cache).__name__, "layer.new_cache()")
        if self.norm_first:
            x = x + self._sa(self.norm1(x), tgt_mask, tgt_key_mask, is_causal, self_cache)
            x = x + self._cross(self.norm2(x), memory, memory_mask, memory_key_mask, cross_cache)
            return x + self._ff(self.norm3(x))
        x = self.norm1(x + self._sa(x, tgt_mask, tgt_key_mask, is_causal, self_cache))
        x = self.norm2(x + self._cross(x, memory, memory_mask, memory_key_mask, cross_cache))
        return self.norm3(x + self._ff(x))

    @classmethod
    def from_torch(cls, layer: nn.TransformerDecoderLayer, *, backend: str = "auto") -> TransformerDecoderLayer:
        """A layer with the architecture and a copy of the weights of a ``torch.nn.TransformerDecoderLayer``."""
        if not isinstance(layer, nn.TransformerDecoderLayer):
            raise fail("a torch.nn.TransformerDecoderLayer", type(layer).__name__, "TransformerDecoderLayer(...)")
        ref = layer.linear1.weight
        new = cls(
            layer.self_attn.embed_dim, layer.self_attn.num_heads, dim_feedforward=layer.linear1.out_features,
            dropout=layer.dropout.p, activation=_torch_activation(layer.activation), layer_norm_eps=layer.norm1.eps,
            norm_first=layer.norm_first, bias=layer.linear1.bias is not None, backend=backend,
            device=ref.device, dtype=ref.dtype,
        )
        new.self_attn.load_state_dict(MultiHeadAttention.from_torch(layer.self_attn).state_dict())
        new.multihead_attn.load_state_dict(MultiHeadAttention.from_torch(layer.multihead_attn).state_dict())
        _copy_plain(new, layer, ("linear1", "linear2", "norm1", "norm2", "norm3"))
        return new

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}"


class TransformerDecoder(nn.Module):
    """A stack of ``num_layers`` copies of a decoder layer, and an optional final ``norm``.

    Args:
        decoder_layer: the layer to copy (each copy has its own parameters).
        num_layers: how many layers.
        norm: a module applied to the output (usually ``nn.LayerNorm(d_model)`` for pre-norm stacks).

    Shape:
        tgt ``(B, L, D)``, memory ``(B, S, D)`` -> ``(B, L, D)``; masks as in :class:`TransformerDecoderLayer`.
        ``cache`` is the list returned by :meth:`new_cache` (one :class:`DecoderLayerCache` per layer).

    Example:
        >>> import torch
        >>> from attnkit.layers import TransformerDecoder, TransformerDecoderLayer
        >>> dec = TransformerDecoder(TransformerDecoderLayer(32, 4, dim_feedforward=64, dropout=0.0), 2).eval()
        >>> tgt, memory = torch.randn(1, 4, 32), torch.randn(1, 6, 32)
        >>> cache = dec.new_cache()
        >>> for t in range(4):                                            # one token per step
        ...     last = dec(tgt[:, t : t + 1], memory, is_causal=True, cache=cache)
        >>> last.shape, cache[0].length                                   # (B, 1, D), tokens decoded
        (torch.Size([1, 1, 32]), 4)
    """

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int, *, norm: nn.Module | None = None):
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise fail("num_layers >= 1", repr(num_layers), "num_layers=6")
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm

    def new_cache(self, *, capacity: int = 256) -> list[DecoderLayerCache]:
        """One empty :class:`DecoderLayerCache` per layer."""
        return [TransformerDecoderLayer.new_cache(capacity=capacity) for _ in self.layers]

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        tgt_mask: MaskLike = None,
        memory_mask: MaskLike = None,
        tgt_key_mask: Tensor | None = None,
        memory_key_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: Sequence[DecoderLayerCache] | None = None,
    ) -> Tensor:
        if cache is not None and len(cache) != self.num_layers:
            raise fail(f"one cache per layer ({self.num_layers})", f"{len(cache)}", "decoder.new_cache()")
        x = tgt
        for i, layer in enumerate(self.layers):
            x = layer(
                x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_mask=tgt_key_mask,
                memory_key_mask=memory_key_mask, is_causal=is_causal, cache=None if cache is None else cache[i],
            )
        return self.norm(x) if self.norm is not None else x
