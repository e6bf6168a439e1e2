"""``attn_implementation="attnkit"``: attnkit's kernel inside HuggingFace transformers models.

Usage (two lines: import, then load as usual)::

    import attnkit.integrations.transformers  # registers "attnkit" with transformers
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="attnkit")

Every attention layer of the model then runs :func:`attnkit.functional.scaled_dot_product_attention`:

* grouped-query attention without ``repeat_kv`` (key/value keep their ``Hkv`` heads);
* the model's ``scaling`` and ``dropout``;
* ``output_attentions=True`` returns the **exact** softmax weights while the output still comes from the fused
  kernel (bit-identical with and without maps; the weights are :func:`attnkit.functional.attention_weights`, one
  more ``Q K^T``), so no eager attention is needed for maps; and :func:`attnkit.viz.capture` works
  on such a model (see :func:`install_taps`).

How HuggingFace hands masks to it (transformers 5.x). A model builds its masks once per forward with
``create_causal_mask`` / ``create_sliding_window_causal_mask`` / ``create_bidirectional_mask``; those look up
``config._attn_implementation`` in ``AttentionMaskInterface`` and, **for a name that is not registered there, return
no mask at all** (``_preprocess_mask_arguments`` exits early) - a custom kernel would silently lose causality and
padding. This module therefore registers "attnkit" in both interfaces. Our mask function (:func:`attnkit_mask`) does
not build an ``L x S`` tensor: it returns an :class:`HFMask`, the description HF has at that point (the index-based
``mask_function(b, h, q_idx, kv_idx)``, the offsets of the queries and keys, the 2-D padding mask). The attention
function turns it into attnkit's mask once per forward (all layers share it):

* causal (``q_offset - kv_offset == S - L``, i.e. prefill or a contiguous KV cache) -> :class:`CausalMask`
  (lower-right), HF's sliding window -> :class:`SlidingWindowMask` (the same exact window); with right padding
  ``& PaddingMask``, with left padding ``& DocumentMask`` (padding = document -1: a padding query sees nothing,
  as in HF, where it sees only padding keys);
* bidirectional (encoders) -> no mask, or a :class:`PaddingMask` for right padding;
* anything else (packed sequences, custom ``or``/``and`` mask functions, other padding) -> HF's own mask function,
  offsets and padding included, as a :class:`MaskMod` that attnkit's block engine runs tile by tile.

No ``L x S`` tensor is built for any of them (``HFMask.materialize()`` gives HF's own boolean tensor, for the
fallbacks and for tests). Rows with no key to attend (a left-padded batch's padding queries) give zeros, where HF's
eager gives a uniform row over the padding.

Attention sinks (gpt-oss ``s_aux``, one learned logit per head in the softmax denominator) are served exactly, as
one more key (:func:`_with_sink_key`), forward and backward, maps included.

Logit soft-capping (Gemma 2's ``softcap``: scores become ``softcap * tanh(scores / softcap)``) is served exactly by
attnkit's native block engine on the CPU (``native_mask``: the cap inside the kernel, forward, backward and maps,
with HF's mask as blocks), and elsewhere by the ``chunked`` backend (online softmax over 1,024 x 1,024 blocks with a
custom backward through the ``tanh``; ``math`` when dropout is asked for). PyTorch's SDPA cannot cap scores.

Anything the kernel cannot serve falls back, with a one-time warning naming the reason: a ``head_mask`` or
``softcap`` together with sinks to the model's own eager attention, a ``position_bias`` or an unknown keyword
argument to HF's ``sdpa``. Never silently wrong.

:func:`register` (run at import) is idempotent.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.functional import (
    AttentionMask,
    CausalMask,
    DocumentMask,
    MaskMod,
    PaddingMask,
    SlidingWindowMask,
    attention_weights,
    scaled_dot_product_attention,
)
from attnkit.layers.attend import Tap, WeightsTap

try:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers import masking_utils as _hf_masks
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
except ImportError as err:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "attnkit.integrations.transformers needs transformers >= 5 (AttentionInterface and AttentionMaskInterface); "
        f"install it with: pip install 'transformers>=5' ({err})"
    ) from err

__all__ = [
    "NAME",
    "TAP_NAME",
    "HFMask",
    "attnkit_attention_forward",
    "attnkit_mask",
    "install_taps",
    "is_registered",
    "register",
]

NAME = "attnkit"
"""The ``attn_implementation`` name."""

TAP_NAME = "attnkit_tap"
"""Name of the :class:`~attnkit.layers.WeightsTap` child that :func:`install_taps` adds to each attention module."""

# Keyword arguments HF's models pass to every attention function that do not change the attention itself: the
# cache / output bookkeeping and the inputs of other kernels (flash attention's varlen lengths; the masks carry the
# same information for us; the encoder states of cross-attention are already in key / value). Any other keyword
# with a value other than None makes the call fall back.
_IGNORED_KWARGS = frozenset({
    "output_attentions", "output_hidden_states", "output_router_logits", "use_cache", "return_dict", "position_ids",
    "cache_position", "position_embeddings", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    "layer_idx", "past_key_values", "cache", "is_causal", "sliding_window", "encoder_hidden_states",
    "encoder_attention_mask",
})

_warned: set[str] = set()


def _warn_once(reason: str, target: str) -> None:
    key = f"{reason}|{target}"
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f'attn_implementation="attnkit": {reason}; this call falls back to {target} (warned once)',
        RuntimeWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------------------------------------- masks


@dataclass(eq=False)
class HFMask:
    """The mask HuggingFace describes for one forward, as :func:`attnkit_mask` receives it (no ``L x S`` tensor).

    Attributes:
        batch_size, q_length, kv_length: ``B``, ``L``, ``S`` of the attention calls it is for.
        q_offset, kv_offset: absolute positions of the first query / key (a KV cache shifts them).
        mask_function: HF's index-based ``(b, h, q_idx, kv_idx) -> bool`` (the FlexAttention ``mask_mod`` form),
            on absolute positions, without the padding.
        attention_mask: the 2-D padding mask ``(B, kv_offset + S)`` HF passed (``True`` = real token), or ``None``.
        use_vmap: whether HF would expand ``mask_function`` with ``vmap`` (custom, not index-based functions).
        device: where the mask lives.

    ``materialize()`` gives HF's own boolean ``(B, 1, L, S)`` tensor; :meth:`to_attnkit` the structured form (a mask
    object, never a tensor). Both are computed once and reused by every layer that receives this object.
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    mask_function: Callable[..., Any]
    attention_mask: Tensor | None
    use_vmap: bool
    device: torch.device
    _dense: Tensor | None = field(default=None, repr=False)
    _resolved: tuple[Tensor | AttentionMask | None] | None = field(default=None, repr=False)

    # duck-typing for code that inspects a 4-D mask's metadata
    dtype = torch.bool
    ndim = 4

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.batch_size, 1, self.q_length, self.kv_length))

    def materialize(self) -> Tensor:
        """HF's boolean mask ``(B, 1, L, S)``, ``True`` = may attend (built by ``sdpa_mask``, cached)."""
        if self._dense is None:
            dense = _hf_masks.sdpa_mask(
                batch_size=self.batch_size,
                q_length=self.q_length,
                kv_length=self.kv_length,
                q_offset=self.q_offset,
                kv_offset=self.kv_offset,
                mask_function=self.mask_function,
                attention_mask=self.attention_mask,
                allow_is_causal_skip=False,
                allow_is_bidirectional_skip=False,
                use_vmap=self.use_vmap,
                device=self.device,
            )
            assert dense is not None  # both skips are off
            self._dense = dense
        return self._dense

    def key_padding(self) -> Tensor | None:
        """The padding of this call's ``S`` keys, ``(B, S)`` boolean, or ``None`` when every key is real."""
        if self.attention_mask is None:
            return None
        pad = _hf_masks.prepare_padding_mask(self.attention_mask, self.kv_length, self.kv_offset)
        assert pad is not None
        pad = pad[:, self.kv_offset : self.kv_offset + self.kv_length]  # (B, S)
        return None if bool(pad.all()) else pad

    def to_attnkit(self) -> Tensor | AttentionMask | None:
        """attnkit's mask object for this description (``None``: every key visible)."""
        if self._resolved is None:
            self._resolved = (self._structured(),)
        return self._resolved[0]

    def _structured(self) -> Tensor | AttentionMask | None:
        L, S = self.q_length, self.kv_length
        pad = self.key_padding()
        lower_right = self.q_offset - self.kv_offset == S - L  # prefill, or the newest L of a contiguous cache
        base: AttentionMask | None = None
        if self.mask_function is _hf_masks.bidirectional_mask_function:
            if pad is None:
                return None
            if _is_prefix(pad):
                return PaddingMask.from_bool(pad)
        elif lower_right and self.mask_function is _hf_masks.causal_mask_function:
            base = CausalMask(align="lower_right")
        elif lower_right and (window := _sliding_window_of(self.mask_function)) is not None:
            base = SlidingWindowMask(window)
        if base is not None:
            if pad is None:
                return base
            if _is_prefix(pad):  # right padding: lengths
                return base & PaddingMask.from_bool(pad)
            if _is_prefix(pad.flip(-1)):  # left padding: a padding query sees only padding keys anyway
                return base & DocumentMask(pad.long() - 1)  # ids: 0 = real, -1 = padding
        # Packed sequences, custom overlays, other padding: HF's own mask function, run by the block engine.
        return MaskMod(self.mask_mod())

    def mask_mod(self) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """The whole pattern (padding included) as a ``mask_mod(b, h, q_idx, kv_idx)`` on this call's indices."""
        fn = self.mask_function
        if self.attention_mask is not None:
            pad = _hf_masks.prepare_padding_mask(self.attention_mask, self.kv_length, self.kv_offset)
            assert pad is not None
            fn = _hf_masks.and_masks(fn, _hf_masks.padding_mask_function(pad))
        return _hf_masks.add_offsets_to_mask_function(fn, self.q_offset, self.kv_offset)  # type: ignore[no-any-return]


def _sliding_window_of(fn: Callable[..., Any]) -> int | None:
    """``w`` when ``fn`` is HF's own ``sliding_window_causal_mask_function(w)`` (nothing added to it), else None."""
    if getattr(fn, "__qualname__", "") != "and_masks.<locals>.and_mask" or fn.__closure__ is None:
        return None
    cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__), strict=True))
    parts = cells.get("mask_functions")
    if not (isinstance(parts, tuple) and len(parts) == 2 and parts[1] is _hf_masks.causal_mask_function):
        return None
    overlay = parts[0]
    if getattr(overlay, "__qualname__", "") != "sliding_window_overlay.<locals>.inner_mask" or not overlay.__closure__:
        return None
    window = dict(zip(overlay.__code__.co_freevars, (c.cell_contents for c in overlay.__closure__), strict=True))
    w = window.get("sliding_window")
    return w if isinstance(w, int) and not isinstance(w, bool) and w >= 1 else None


def _is_prefix(pad: Tensor) -> bool:
    """True when every row of the ``(B, S)`` boolean mask is ``True...True False...False`` (right padding)."""
    return not bool((~pad[:, :-1] & pad[:, 1:]).any())


def attnkit_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = _hf_masks.causal_mask_function,
    attention_mask: Tensor | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> HFMask:
    """The mask function registered in ``AttentionMaskInterface``: HF's description, kept as an :class:`HFMask`."""
    if isinstance(q_offset, Tensor):  # static caches pass a tensor offset
        q_offset = int(q_offset)
    return HFMask(
        batch_size, q_length, kv_length, q_offset, int(kv_offset), mask_function, attention_mask, bool(use_vmap),
        torch.device(device),
    )


# ------------------------------------------------------------------------------------------------ attention


_KNOWN_KWARGS = _IGNORED_KWARGS | {"softcap", "s_aux", "sinks", "head_mask", "position_bias"}


def _unsupported(kwargs: dict[str, Any]) -> tuple[str, str] | None:
    """``(reason, fallback)`` when this call needs something attnkit's kernel does not do, else ``None``."""
    if kwargs.get("softcap") is not None and kwargs.get("s_aux") is not None:
        return "logit soft-capping (softcap) together with attention sinks (s_aux) is not supported", "eager"
    if kwargs.get("sinks") is not None:  # s_aux is served (_attend_with_sinks); "sinks" is no HF model's name
        return "attention sinks passed as sinks= are not supported (s_aux= is)", "eager"
    if kwargs.get("head_mask") is not None:
        return "a head_mask is not supported", "eager"
    if kwargs.get("position_bias") is not None:
        return "a position_bias (additive relative-position scores) is not supported", "sdpa"
    unknown = sorted(k for k in kwargs.keys() - _KNOWN_KWARGS if kwargs[k] is not None)  # None: not in use
    if unknown:
        return f"unknown keyword argument(s) {unknown}", "sdpa"
    return None


def _fallback(
    target: str, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
    scaling: float | None, dropout: float, kwargs: dict[str, Any],
) -> tuple[Tensor, Tensor | None]:
    mask = attention_mask.materialize() if isinstance(attention_mask, HFMask) else attention_mask
    if target == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            if mask is not None and mask.dtype == torch.bool:  # eager adds a float mask (0 / dtype min)
                mask = torch.where(mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
            out, weights = eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
            return out, weights
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and getattr(module, "num_key_value_groups", 1) != groups:  # HF's sdpa repeats by the module's count
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


try:
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - other transformers versions
    _active_collector = None  # type: ignore[assignment]


def _hf_records_attentions() -> bool:
    """True while a HF ``capture_outputs`` forward collects ``attentions`` (``output_attentions`` via the config)."""
    collected = None if _active_collector is None else _active_collector.get()
    return isinstance(collected, dict) and "attentions" in collected


def _causal_default(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)


def attnkit_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: HFMask | Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The attention function registered in ``AttentionInterface`` under ``"attnkit"``.

    Shape:
        query ``(B, H, L, E)``, key ``(B, Hkv, S, E)``, value ``(B, Hkv, S, Ev)`` (HF's layout, ``Hkv`` dividing
        ``H``: no ``repeat_kv``) -> ``(attn_output (B, L, H, Ev), weights (B, H, L, S) or None)``; the weights are
        returned only when ``output_attentions`` is requested.

    ``attention_mask`` is what :func:`attnkit_mask` built (an :class:`HFMask`), a tensor a caller prepared itself
    (boolean ``True`` = may attend, or float added to the scores, as HF's 4-D masks), or ``None``: then the module's
    ``is_causal`` (or the ``is_causal`` keyword) gives lower-right causal masking (the newest ``L`` of ``S`` keys),
    and a ``sliding_window`` keyword HF's window (:class:`~attnkit.functional.SlidingWindowMask`).
    """
    problem = _unsupported(kwargs)
    if problem is not None:
        reason, target = problem
        _warn_once(reason, "the model's eager attention" if target == "eager" else "HuggingFace's sdpa")
        return _fallback(target, module, query, key, value, attention_mask, scaling, dropout, kwargs)

    mask: Tensor | AttentionMask | None
    if isinstance(attention_mask, HFMask):
        mask = attention_mask.to_attnkit()
    elif attention_mask is None:
        window = kwargs.get("sliding_window")
        causal = _causal_default(module, kwargs)
        if window is not None and not causal:
            _warn_once("a sliding_window on a non-causal module without a mask is ambiguous", "HuggingFace's sdpa")
            return _fallback("sdpa", module, query, key, value, None, scaling, dropout, kwargs)
        if window is not None:
            mask = SlidingWindowMask(int(window))  # HF's window, lower-right (the newest L of S keys)
        else:
            mask = CausalMask(align="lower_right") if causal else None
    else:
        mask = attention_mask

    sinks = kwargs.get("s_aux")
    if sinks is not None:
        if attention_mask is None and kwargs.get("sliding_window") is not None:
            _warn_once("attention sinks with a sliding_window but no mask", "the model's eager attention")
            return _fallback("eager", module, query, key, value, None, scaling, dropout, kwargs)
        query, key, value, mask = _with_sink_key(query, key, value, mask, attention_mask, sinks, scaling)

    # The output always comes from the fused kernel (bit-identical with and without maps); the maps are the exact
    # recomputation attnkit's taps use (one more Q K^T), as HF's eager would return them.
    softcap = kwargs.get("softcap")
    out = scaled_dot_product_attention(query, key, value, mask, dropout_p=dropout, scale=scaling, softcap=softcap)
    assert isinstance(out, Tensor)
    weights: Tensor | None = None
    if bool(kwargs.get("output_attentions")) or _hf_records_attentions():
        weights = attention_weights(query, key, mask, scale=scaling, softcap=softcap)
        if sinks is not None:
            weights = weights[..., 1:]  # the sink key's weight is not a key's: HF's eager drops it too
    tap = module._modules.get(TAP_NAME)  # the submodule install_taps adds (a plain getattr raises inside)
    if isinstance(tap, Tap) and tap.observed:
        if weights is None:
            with torch.no_grad():
                tapped = attention_weights(query, key, mask, scale=scaling, softcap=softcap)
                tap(tapped if sinks is None else tapped[..., 1:])
        else:
            tap(weights)
    return out.transpose(1, 2).contiguous(), weights  # (B, L, H, Ev), (B, H, L, S) or None


def _with_sink_key(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | AttentionMask | None, hf_mask: Any, sinks: Tensor,
    scaling: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | AttentionMask | None]:
    """Attention sinks (gpt-oss ``s_aux``: one learned logit per query head added to the softmax denominator) as one
    more key, exactly: key 0 has score ``sink_h`` for every query of head ``h`` and value zero, so
    ``out = sum_j e^{s_j} v_j / (sum_j e^{s_j} + e^{sink_h})``, which is ``out_without_sink * sigmoid(lse - sink_h)``.

    The score comes from one extra feature: queries get ``sink_h / scale`` (per query head: no ``repeat_kv``), the
    sink key ``1`` and every real key ``0``, so real scores do not change. Gradients reach ``sinks`` through that
    feature. The mask gains key 0, visible to every query: lower-right causal masks stay lower-right over ``S + 1``
    keys; anything else becomes HF's own mask function shifted by one key (a :class:`MaskMod`, no ``L x S``
    tensor), or a caller's tensor gains one visible column.
    """
    b, h, length, e = query.shape
    hkv = key.shape[1]
    scale = e**-0.5 if scaling is None else scaling
    column = (sinks.to(query.dtype) / scale).view(1, h, 1, 1).expand(b, h, length, 1)
    query = torch.cat([query, column], dim=-1)  # (B, H, L, E + 1)
    key = torch.cat([key.new_zeros(b, hkv, 1, e), key], dim=2)  # (B, Hkv, 1 + S, E)
    flag = torch.zeros(b, hkv, key.shape[2], 1, dtype=key.dtype, device=key.device)
    flag[:, :, 0] = 1.0
    key = torch.cat([key, flag], dim=-1)  # (B, Hkv, 1 + S, E + 1)
    value = torch.cat([value.new_zeros(b, hkv, 1, value.shape[-1]), value], dim=2)  # (B, Hkv, 1 + S, Ev)
    shifted: Tensor | AttentionMask | None
    if isinstance(mask, Tensor):
        visible = True if mask.dtype == torch.bool else 0.0
        first = torch.full((*mask.shape[:-1], 1), visible, dtype=mask.dtype, device=mask.device)
        shifted = torch.cat([first, mask], dim=-1)
    elif mask is None or mask == CausalMask(align="lower_right"):
        shifted = mask  # None, or causal lower-right over S + 1 keys: key 0 is before every query's diagonal
    elif isinstance(hf_mask, HFMask):
        inner = hf_mask.mask_mod()
        shifted = MaskMod(lambda b_, h_, q_, kv_: (kv_ == 0) | inner(b_, h_, q_, (kv_ - 1).clamp_min(0)))
    else:  # pragma: no cover - every mask the attention function builds is handled above
        raise TypeError(f"attention sinks with a {type(mask).__name__} mask")
    return query, key, value, shifted


# ------------------------------------------------------------------------------------------ registration, taps


def register() -> None:
    """Register ``"attnkit"`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    AttentionInterface.register(NAME, attnkit_attention_forward)
    AttentionMaskInterface.register(NAME, attnkit_mask)


def is_registered() -> bool:
    """True when both interfaces map ``"attnkit"`` to this module's functions."""
    return (
        AttentionInterface._global_mapping.get(NAME) is attnkit_attention_forward
        and AttentionMaskInterface._global_mapping.get(NAME) is attnkit_mask
    )


def _attention_classes(model: nn.Module) -> Iterator[tuple[type, str | None]]:
    """``(class, layer_name filter)`` of the modules whose output HF records as ``attentions``."""
    for sub in model.modules():
        spec = getattr(sub, "_can_record_outputs", None)
        if not isinstance(spec, dict) or spec.get("attentions") is None:
            continue
        entries = spec["attentions"]
        for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
            if isinstance(entry, type):
                yield entry, None
            elif isinstance(getattr(entry, "target_class", None), type):
                yield entry.target_class, getattr(entry, "layer_name", None)


def install_taps(model: nn.Module) -> int:
    """Give each attention module of a HF model a :class:`~attnkit.layers.WeightsTap` child named ``attnkit_tap``.

    The attention function hands the exact weights to that tap while an observer is attached, so
    :func:`attnkit.viz.capture` records HF models run with ``attn_implementation="attnkit"`` (it calls this itself).
    The tap has no parameters: the state dict does not change. Returns the number of attention modules tapped.
    """
    classes = list(dict.fromkeys(_attention_classes(model)))
    count = 0
    sub: nn.Module
    for name, sub in model.named_modules():
        for cls, layer_name in classes:
            if isinstance(sub, cls) and (layer_name is None or layer_name in name):
                if not isinstance(getattr(sub, TAP_NAME, None), Tap):
                    sub.add_module(TAP_NAME, WeightsTap())
                count += 1
                break
    return count


register()
