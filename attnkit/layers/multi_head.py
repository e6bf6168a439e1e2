"""Multi-head attention with grouped-query heads, pluggable positions, KV caching and local patterns.

Vaswani et al. 2017, "Attention Is All You Need", https://arxiv.org/abs/1706.03762 (multi-head attention);
Shazeer 2019, "Fast Transformer Decoding: One Write-Head is All You Need", https://arxiv.org/abs/1911.02150 (MQA);
Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints",
https://arxiv.org/abs/2305.13245 (GQA).

.. math::

    \\mathrm{MultiHead}(Q, K, V) = [\\mathrm{head}_1; \\dots; \\mathrm{head}_H] W^O,\\quad
    \\mathrm{head}_h = \\mathrm{softmax}\\!\\left(\\frac{Q W^Q_h (K W^K_{g(h)})^\\top}{\\sqrt{E}} + M\\right)
    V W^V_{g(h)}

where ``g(h) = h // (H / Hkv)`` maps each query head to its key/value head (``Hkv = H``: MHA, ``1``: MQA).

The kernel call goes through an :class:`~attnkit.layers.Attend` submodule, so ``backend="auto"`` serves it with the
fused kernel where it can and ``attnkit.viz.capture`` sees the exact weights; the module stores no maps.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._errors import fail
from attnkit.functional import (
    AttentionMask,
    BlockedWindowMask,
    BlockSparseMask,
    SlidingWindowMask,
    attention_weights,
    combine_masks,
)
from attnkit.functional._validate import check_key_mask, check_mask_tensor
from attnkit.functional.mask_args import MaskArgs, MaskLike, normalize_masks

from .attend import Attend
from .cache import CrossKVCache, KVCache
from .position import PositionEncoding
from .registry import register_attention

__all__ = ["MultiHeadAttention"]


_UNUSED = torch.empty(0, dtype=torch.long)  # stands for positions no step of the call reads


def _window_allowed(q_pos: Tensor, k_pos: Tensor, window: int | None, causal: bool) -> Tensor:
    """Boolean ``(L, S)`` from positions: causal (``k <= q``), window (``q - k < window``), and real slots."""
    rel = q_pos.view(-1, 1) - k_pos.view(1, -1)  # (L, S): how far back each key is
    allowed = (k_pos >= 0).view(1, -1).expand_as(rel)  # (L, S): a ring's empty slots have position -1
    if causal:
        allowed = allowed & (rel >= 0)
    if window is not None:
        allowed = allowed & (rel < window) & (rel > -window)
    return allowed


@register_attention("mha", "multi_head", "multi_head_attention")
class MultiHeadAttention(nn.Module):
    """Multi-head attention for batch-first sequences: self or cross, MHA / GQA / MQA, positions, KV cache.

    Args:
        embed_dim: model width ``D`` (query input size and output size); ``D % num_heads == 0``.
        num_heads: query heads ``H``; head size ``E = D // H``.
        num_kv_heads: key/value heads ``Hkv`` dividing ``H`` (default ``H``; ``1`` is multi-query attention).
        kdim: key input size (default ``D``).
        vdim: value input size (default ``kdim``).
        bias: biases in the four projections.
        dropout: dropout on the attention weights while training.
        position: a :class:`~attnkit.layers.position.PositionEncoding` (sinusoidal, learned, rotary, ALiBi, T5,
            Shaw) or ``None``.
        qk_norm: LayerNorm over the head dim of queries and keys before the scores (Dehghani et al. 2023).
        window: local attention. An ``int`` is an exact sliding window by position: a query at position ``p`` sees
            the keys at positions ``k`` with ``|p - k| < window`` (with ``is_causal``: the last ``window`` keys, its
            own included); this is the window a :class:`~attnkit.layers.RingKVCache` serves. For self-attention with
            positions in order (no cache, a :class:`~attnkit.layers.KVCache`, or a block prefill through a
            :class:`~attnkit.layers.RingKVCache`) it is a :class:`~attnkit.functional.SlidingWindowMask`
            structure, which ``backend="auto"`` runs on the native block engine (O(L w), forward and backward), and
            with a :class:`~attnkit.layers.KVCache` the kernel reads only the keys in the window (a view of the
            cache; a one-token decode step attends over the last ``window`` keys, no mask). Otherwise (one-token
            steps through a wrapped ring buffer, where slots are out of order) a small mask by position.
            A :class:`~attnkit.functional.BlockedWindowMask` is the blocked window of
            :mod:`attnkit.functional.local`, handed to the kernel as a structure (the ``local`` kernel).
        layout: a :class:`~attnkit.functional.BlockSparseMask` (block-sparse pattern, served by the
            ``block_sparse`` kernel when nothing else is masked).
        scale: score scale (default ``1/sqrt(E)``).
        backend: kernel backend of the :class:`~attnkit.layers.Attend` submodule (default ``"auto"``).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Masks (one meaning in attnkit): ``attn_mask`` boolean ``True`` = may attend, float = added to the scores;
    ``key_mask`` ``(B, S)`` boolean ``True`` = a real key. Note that :class:`torch.nn.MultiheadAttention` reads both
    the other way round: its boolean ``attn_mask`` and ``key_padding_mask`` are ``True`` where attention is *not*
    allowed, so pass ``~key_padding_mask`` as ``key_mask``. Rows with no key to attend to give zeros, never NaN.

    Shape:
        - query ``(B, L, D)``; key ``(B, S, kdim)`` and value ``(B, S, vdim)`` for cross-attention (``None`` for
          self-attention: both default to query; value defaults to key).
        - attn_mask ``(L, S)``, ``(B, L, S)``, ``(B, 1|H, L, S)`` or an :class:`~attnkit.functional.AttentionMask`;
          key_mask ``(B, S)``. With a cache, ``S`` counts every cached key.
        - output ``(B, L, D)``; with ``need_weights=True`` also the weights ``(B, H, L, S)`` (per head, before
          dropout; ``.mean(1)`` gives ``nn.MultiheadAttention``'s default head average).

    Example:
        >>> import torch
        >>> from attnkit.layers import MultiHeadAttention, KVCache
        >>> x = torch.randn(2, 10, 64)                                     # (B, L, D)
        >>> mha = MultiHeadAttention(64, 8, num_kv_heads=2)                # GQA: 8 query heads, 2 key/value heads
        >>> mha(x, is_causal=True).shape
        torch.Size([2, 10, 64])
        >>> memory = torch.randn(2, 7, 32)                                 # (B, S, kdim)
        >>> cross = MultiHeadAttention(64, 8, kdim=32, vdim=32)
        >>> out, w = cross(x, memory, key_mask=torch.ones(2, 7, dtype=torch.bool), need_weights=True)
        >>> out.shape, w.shape
        (torch.Size([2, 10, 64]), torch.Size([2, 8, 10, 7]))
        >>> cache = KVCache()                                              # incremental decoding
        >>> _ = mha(x[:, :9], cache=cache, is_causal=True)                 # prefill 9 tokens
        >>> step = mha(x[:, 9:], cache=cache, is_causal=True)              # one new token
        >>> torch.allclose(step, mha(x, is_causal=True)[:, 9:], atol=1e-5)
        True
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        position: PositionEncoding | None = None,
        qk_norm: bool = False,
        window: int | BlockedWindowMask | None = None,
        layout: BlockSparseMask | None = None,
        scale: float | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(embed_dim, int) or not isinstance(num_heads, int) or num_heads <= 0 or embed_dim <= 0:
            raise fail("positive integers embed_dim and num_heads", f"{embed_dim!r}, {num_heads!r}",
                       "MultiHeadAttention(512, 8)")
        if embed_dim % num_heads:
            raise fail("embed_dim divisible by num_heads", f"embed_dim={embed_dim}, num_heads={num_heads}",
                       f"num_heads in {[h for h in range(1, min(embed_dim, 64) + 1) if embed_dim % h == 0]}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise fail("num_kv_heads dividing num_heads", f"num_heads={num_heads}, num_kv_heads={num_kv_heads!r}",
                       "num_kv_heads=1 (MQA) or a divisor of num_heads (GQA)")
        if window is not None and not isinstance(window, BlockedWindowMask) and (
            not isinstance(window, int) or isinstance(window, bool) or window < 1
        ):
            raise fail("window: an int >= 1, a BlockedWindowMask or None", repr(window), "window=256")
        if layout is not None and not isinstance(layout, BlockSparseMask):
            raise fail("layout: a BlockSparseMask or None", type(layout).__name__,
                       "layout=BlockSparseMask(local_layout(n_blocks), block_size)")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = self.kdim if vdim is None and kdim is not None else (embed_dim if vdim is None else vdim)
        self.window = window
        self.layout = layout
        self.scale = scale
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, kv_width, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, kv_width, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.q_norm = nn.LayerNorm(self.head_dim, **factory) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, **factory) if qk_norm else None
        self.position = self._check_position(position)
        self.attend = Attend(dropout=dropout, backend=backend)
        self._reset_parameters()

    # ------------------------------------------------------------------------------------------ set-up
    def _check_position(self, position: PositionEncoding | None) -> PositionEncoding | None:
        if position is None:
            return None
        if not isinstance(position, PositionEncoding):
            raise fail("position= a PositionEncoding module (attnkit.layers.position)", type(position).__name__,
                       "position=RotaryPosition(head_dim) or ALiBiPosition(num_heads)")
        if position.num_heads is not None and position.num_heads != self.num_heads:
            raise fail(f"a position module built for num_heads={self.num_heads}",
                       f"num_heads={position.num_heads}", f"{type(position).__name__}({self.num_heads})")
        if position.head_dim is not None and position.head_dim != self.head_dim:
            raise fail(f"a position module built for head_dim={self.head_dim}", f"head_dim={position.head_dim}",
                       f"{type(position).__name__}({self.head_dim})")
        return position

    def _reset_parameters(self) -> None:
        # the initialisation of nn.MultiheadAttention: Xavier-uniform projections, zero biases
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiHeadAttention:
        """A :class:`MultiHeadAttention` with the weights of a :class:`torch.nn.MultiheadAttention` (copied).

        Remember the mask meanings differ: pass ``~key_padding_mask`` as ``key_mask`` and ``~attn_mask`` for a
        boolean ``attn_mask``; float masks are the same.
        """
        if mha.bias_k is not None or mha.add_zero_attn:
            raise fail("nn.MultiheadAttention without add_bias_kv / add_zero_attn", "one of them set",
                       "a module built with the defaults add_bias_kv=False, add_zero_attn=False")
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, kdim=mha.kdim, vdim=mha.vdim, bias=mha.in_proj_bias is not None,
                  dropout=mha.dropout, device=ref.device, dtype=ref.dtype)
        d = mha.embed_dim
        with torch.no_grad():
            if mha.in_proj_weight is not None:
                wq, wk, wv = mha.in_proj_weight.split(d)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            new.q_proj.weight.copy_(wq)
            new.k_proj.weight.copy_(wk)
            new.v_proj.weight.copy_(wv)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                bq, bk, bv = mha.in_proj_bias.split(d)
                new.q_proj.bias.copy_(bq)
                new.k_proj.bias.copy_(bk)
                new.v_proj.bias.copy_(bv)
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    # ------------------------------------------------------------------------------------------ forward
    def _check_query(self, query: Any) -> Tensor:
        if not isinstance(query, Tensor) or query.dim() != 3 or query.shape[-1] != self.embed_dim:
            got = tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__
            raise fail(f"query of shape (B, L, D={self.embed_dim})", str(got),
                       "query.unsqueeze(0) for one sequence (batch-first layout)")
        return query

    def _check_inputs(self, query: Any, key: Any, value: Any) -> tuple[Tensor, Tensor, Tensor]:
        query = self._check_query(query)
        key = query if key is None else key
        value = key if value is None else value
        for name, x, dim in (("key", key, self.kdim), ("value", value, self.vdim)):
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != dim or x.shape[0] != query.shape[0]:
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise fail(f"{name} of shape (B={query.shape[0]}, S, {dim})", str(got),
                           f"{'kdim' if name == 'key' else 'vdim'}= at construction, or the batch-first layout")
        if key.shape[1] != value.shape[1]:
            raise fail("key and value of one length S", f"{key.shape[1]} and {value.shape[1]}",
                       "passing the same positions for both")
        return query, key, value

    def _project(self, query: Tensor, key: Tensor, value: Tensor, self_attn: bool,
                 q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections, head split: ``(B, H, L, E)``, ``(B, Hkv, S, E)``, ``(B, Hkv, S, E)``."""
        b, q_len, _ = query.shape
        k_len = key.shape[1]
        pos = self.position
        if pos is not None and pos.kind == "input":
            q_in = pos.encode_inputs(query, q_pos)  # (B, L, D)
            k_in = q_in if self_attn else pos.encode_inputs(key, k_pos)  # (B, S, kdim)
            q = self.q_proj(q_in)
            k = self.k_proj(k_in)
            v = self.v_proj(value)
        elif self_attn:
            # one GEMM for the three projections of the same input
            w = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
            bias = None
            if self.q_proj.bias is not None:
                bias = torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias))
            kv_width = self.num_kv_heads * self.head_dim
            q, k, v = F.linear(query, w, bias).split((self.embed_dim, kv_width, kv_width), dim=-1)
        else:
            q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        q = q.view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, E)
        k = k.view(b, k_len, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, E)
        v = v.view(b, k_len, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, E)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if pos is not None and pos.kind == "rotary":
            q, k = pos.rotate(q, q_pos), pos.rotate(k, k_pos)
        return q, k, v

    def _project_query(self, query: Tensor, q_pos: Tensor) -> Tensor:
        """The query projection alone, head split ``(B, H, L, E)`` (a cross-attention call with a filled cache)."""
        b, q_len, _ = query.shape
        pos = self.position
        q_in = pos.encode_inputs(query, q_pos) if pos is not None and pos.kind == "input" else query  # (B, L, D)
        q = self.q_proj(q_in).view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, E)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if pos is not None and pos.kind == "rotary":
            q = pos.rotate(q, q_pos)
        return q

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        attn_mask: MaskLike = None,
        key_mask: Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | CrossKVCache | None = None,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query`` to ``key``/``value`` (self-attention when both are ``None``).

        Args:
            query: ``(B, L, D)``.
            key: ``(B, S, kdim)`` or ``None`` (self-attention).
            value: ``(B, S, vdim)`` or ``None`` (the key input).
            attn_mask: a tensor — boolean (``True`` = may attend), integer 0/1 (``0`` = masked, as in the
                tutorial; other values raise) or float (added to the scores) — a mask object
                (:class:`~attnkit.functional.SlidingWindowMask`, ``DocumentMask``, ``a & b``, ...) or a ``mask_mod``
                callable ``(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's signature; indices over the ``L``
                queries and ``S`` keys of the call, keys counted from the start of a cache). One rule for all:
                :func:`attnkit.functional.mask_args.normalize_masks`.
            key_mask: ``(B, S)`` boolean, ``True`` = a real key (the inverse of ``nn.MultiheadAttention``'s
                ``key_padding_mask``).
            is_causal: query ``i`` sees keys ``j <= i``; with a cache, lower-right aligned by position (a query
                sees every cached key up to its own position).
            cache: a :class:`~attnkit.layers.KVCache` / :class:`~attnkit.layers.RingKVCache` for self-attention
                decoding: the new keys/values are appended and the queries sit at positions ``cache.length ..``.
                A :class:`~attnkit.layers.CrossKVCache` for cross-attention to a fixed memory: the first call
                projects ``key``/``value`` into it, later calls reuse it (``key``/``value`` may then be ``None``)
                and project only the queries; each call equals the uncached one.
            need_weights: also return the exact weights ``(B, H, L, S)`` (per head, before dropout).

        Returns:
            ``(B, L, D)``, or ``(output, weights)`` with ``need_weights=True``.
        """
        kv_cache = cache if isinstance(cache, KVCache) else None
        cross_cache = cache if isinstance(cache, CrossKVCache) else None
        if cache is not None and kv_cache is None and cross_cache is None:
            raise fail("cache= a KVCache, RingKVCache, CrossKVCache or None", type(cache).__name__,
                       "KVCache() for self-attention decoding, CrossKVCache() for a fixed cross-attention memory")
        no_kv = key is None and value is None
        self_attn = no_kv and cross_cache is None
        reuse = cross_cache is not None and cross_cache.filled  # cross-attention keys/values already projected
        if kv_cache is not None and not self_attn:
            raise fail("a KVCache only with self-attention (key=None, value=None)", "a key/value input",
                       "cache=CrossKVCache() to project a cross-attention memory once and reuse it")
        if cross_cache is not None and not reuse and key is None:
            raise fail("key (the memory) at the first call with a CrossKVCache", "key=None",
                       "mha(query, memory, cache=cross_cache); a KVCache for self-attention")
        if reuse and no_kv:
            query = self._check_query(query)
        else:
            query, key, value = self._check_inputs(query, key, value)
        b, q_len, _ = query.shape
        dev = query.device
        window = self.window if isinstance(self.window, int) else None
        if kv_cache is not None and kv_cache.window is not None and (window is None or window > kv_cache.window):
            raise fail(f"an int window <= the ring buffer's window {kv_cache.window}", f"window={self.window!r}",
                       f"MultiHeadAttention(..., window={kv_cache.window}) with a RingKVCache, or a KVCache")
        offset = kv_cache.length if kv_cache is not None else 0
        # token positions matter only to a position module, an int window or a cache; otherwise skip building them
        use_pos = self.position is not None or window is not None or kv_cache is not None
        q_pos = torch.arange(offset, offset + q_len, device=dev) if use_pos else _UNUSED  # (L,)

        if reuse and cross_cache is not None and cross_cache.keys is not None and cross_cache.values is not None:
            cross_cache.check_memory(b, None if key is None else key.shape[1])
            q = self._project_query(query, q_pos)  # (B, H, L, E); the memory is not projected again
            k, v = cross_cache.keys, cross_cache.values  # (B, Hkv, S, E) x2
            k_pos = torch.arange(k.shape[2], device=dev) if use_pos else _UNUSED  # (S,)
        else:
            key, value = cast(Tensor, key), cast(Tensor, value)  # both set by _check_inputs
            k_pos = q_pos if self_attn or not use_pos else torch.arange(key.shape[1], device=dev)  # (S_new,)
            q, k, v = self._project(query, key, value, self_attn, q_pos, k_pos)
            if cross_cache is not None:
                cross_cache.fill(k, v)
            elif kv_cache is not None:
                k, v, k_pos = kv_cache.update(k, v)  # (B, Hkv, S, E) x2, (S,)
        k_len = k.shape[2]
        ordered = kv_cache is None or kv_cache.ordered  # keys at consecutive positions, in order
        exact_window = window is not None and ordered and self_attn  # positions are i + S - L (lower-right)

        # ---- a window over a cache reads only the window: the keys the first query can see onward (a view)
        cached_len = k_len  # S of the returned weights: every cached key
        first = k_len - q_len - cast(int, window) + 1 if exact_window and kv_cache is not None else 0
        if first > 0 and (attn_mask is None or isinstance(attn_mask, Tensor)):
            if isinstance(attn_mask, Tensor):  # checked against every cached key, then cut like the keys
                attn_mask = check_mask_tensor(attn_mask, b, self.num_heads, q_len, k_len, ndim_in=3)[..., first:]
            if key_mask is not None:
                key_mask = check_key_mask(key_mask, b, k_len)[:, first:]
            k, v, k_pos = k[:, :, first:], v[:, :, first:], k_pos[first:]
            k_len -= first

        # ---- masks, one meaning (boolean True = may attend; floats are added), one normaliser
        structures: list[AttentionMask] = []  # the module's own structures (window, layout)
        causal_done = False  # is_causal already expressed by a structure or a mask by position
        if isinstance(self.window, BlockedWindowMask):
            causal_done = is_causal
            structures.append(replace(self.window, causal=True) if is_causal else self.window)
        if self.layout is not None:
            if is_causal and kv_cache is None and q_len == k_len:
                structures.append(replace(self.layout, causal=True))
                causal_done = True
            else:
                structures.append(self.layout)
        if exact_window:  # the exact window as a structure: the native block engine serves it
            causal_done = is_causal
            if not (q_len == 1 and k_len <= cast(int, window)):  # one query whose window holds every key: no mask
                structures.append(SlidingWindowMask(cast(int, window), causal=is_causal))
        position_mask = None
        if not exact_window and (window is not None or not ordered):  # positions out of order, or cross-attention
            position_mask = _window_allowed(q_pos, k_pos, window, is_causal).view(1, 1, q_len, k_len)
            causal_done = True
        args = normalize_masks(attn_mask, key_mask, is_causal and not causal_done, batch=b, heads=self.num_heads,
                               q_len=q_len, k_len=k_len, dtype=q.dtype, device=dev, ndim_in=3,
                               structures=structures, causal_align="upper_left" if kv_cache is None else "lower_right")
        kernel_causal = args.is_causal  # upper-left: the fused kernel's own causal path
        pos = self.position
        scale = self.head_dim**-0.5 if self.scale is None else self.scale
        mask = combine_masks(args.mask, position_mask, None if pos is None else pos.score_bias(q, q_pos, k_pos,
                                                                                               scale=scale))
        if mask is not None and mask.dtype == torch.bool and bool(mask.all()):
            mask = None  # e.g. a decode step whose window holds only real keys
        full = MaskArgs(mask, args.structure, kernel_causal).attn_mask(q_len, k_len, device=dev)

        # ---- the kernel (through the Attend tap)
        uses_weights = pos is not None and pos.uses_weights
        if uses_weights:
            # the kernel hands back the (dropped-out) weights it used as extra value columns: V' = [V | I]
            eye = torch.eye(k_len, dtype=v.dtype, device=dev).expand(b, self.num_kv_heads, k_len, k_len)
            out = self.attend(q, k, torch.cat((v, eye), dim=-1), full, is_causal=kernel_causal, scale=scale)
            out, used = out.split((self.head_dim, k_len), dim=-1)  # (B, H, L, E), (B, H, L, S)
            extra = pos.value_term(used, q_pos, k_pos)  # type: ignore[union-attr]
            if extra is not None:
                out = out + extra
        else:
            out = self.attend(q, k, v, full, is_causal=kernel_causal, scale=scale)  # (B, H, L, E)
        out = self.out_proj(out.transpose(1, 2).reshape(b, q_len, self.embed_dim))  # (B, L, D)
        if not need_weights:
            return out
        weights = attention_weights(q, k, full, is_causal=kernel_causal, scale=scale)  # (B, H, L, S)
        if k_len != cached_len:  # the keys before the window get no weight
            weights = F.pad(weights, (cached_len - k_len, 0))  # (B, H, L, S_cached)
        return out, weights

    def extra_repr(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if self.num_kv_heads != self.num_heads:
            parts.append(f"num_kv_heads={self.num_kv_heads}")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.layout is not None:
            parts.append(f"layout=BlockSparseMask(block_size={self.layout.block_size})")
        return ", ".join(parts)
