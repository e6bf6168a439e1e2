"""Capture the exact attention maps and gates of any model, without the model storing them.

Every attnkit attention module computes attention through a *tap* submodule (:class:`~attnkit.layers.Attend`,
:class:`~attnkit.layers.WeightsTap`, :class:`~attnkit.layers.GateTap`). :func:`capture` attaches an observer to
each selected tap for the duration of a ``with`` block and files every map it hands over as an
:class:`AttentionRecord`. The model's outputs still come from its fast backend: they are bit-identical with and
without capture (the weights are an exact recomputation, see :func:`attnkit.functional.attention_weights`).

HuggingFace models loaded with ``attn_implementation="attnkit"`` (:mod:`attnkit.integrations.transformers`) are
captured the same way (their attention modules get a tap on first capture). Otherwise HF models hide their maps
behind ``output_attentions=True``; :func:`from_hf_attentions` turns what they return into the same records.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from attnkit.layers import Attend
    >>> from attnkit.viz import capture
    >>> class Tiny(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = Attend()
    ...     def forward(self, x):                              # x (B, H, L, E)
    ...         return self.attn(x, x, x)
    >>> model = nn.Sequential(Tiny(), Tiny())
    >>> x = torch.randn(2, 4, 5, 8)
    >>> with capture(model) as rec:
    ...     _ = model(x)
    >>> [r.name for r in rec], rec.stack().shape               # (layers, B, H, L, S)
    (['0', '1'], torch.Size([2, 2, 4, 5, 5]))
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.functional._validate import fail
from attnkit.layers.attend import Tap

__all__ = ["AttentionRecord", "Recording", "capture", "from_hf_attentions"]

NameFilter = str | re.Pattern[str] | Iterable[str] | None
Reduce = str | tuple[str, int] | None


@dataclass
class AttentionRecord:
    """One map handed over by one tap on one call.

    Attributes:
        name: qualified name of the module that owns the tap (``"encoder.layers.0.self_attn"``); ``""`` for the
            root module.
        kind: ``"attention"`` (weights ``(B, H, L, S)``), ``"channel"`` or ``"spatial"`` (gates as the tap
            produced them, e.g. ``(B, C, 1, 1)`` or ``(B, 1, H, W)``).
        tensor: the map, detached. For attention after head selection and reduction: ``(B, H', L, S)`` where
            ``H'`` is the number of kept heads, 1 with ``reduce="mean"``, and ``(B, H', L, k)`` values with
            ``reduce=("topk", k)`` (their key positions are in ``indices``).
        call: how many times this tap had already been called inside the capture (0 = first call).
        layer: index of the tap among the selected taps, in module order.
        heads: the head indices kept (``None`` = all heads; ``reduce="mean"`` averages the kept heads).
        reduce: the reduction applied (``None``, ``"mean"`` or ``"topk"``).
        indices: with ``reduce=("topk", k)``: key positions ``(B, H', L, k)`` of the values; else ``None``.
        key_len: ``S``, the number of keys (needed to rebuild a dense map from top-k).
    """

    name: str
    kind: str
    tensor: Tensor
    call: int = 0
    layer: int = 0
    heads: tuple[int, ...] | None = None
    reduce: str | None = None
    indices: Tensor | None = None
    key_len: int | None = None

    def dense(self) -> Tensor:
        """The map as a dense tensor: top-k records are scattered back into zeros ``(B, H', L, S)``."""
        if self.indices is None:
            return self.tensor
        size = self.key_len if self.key_len is not None else int(self.indices.max()) + 1
        out = self.tensor.new_zeros(*self.tensor.shape[:-1], size)
        return out.scatter_(-1, self.indices, self.tensor)

    def numpy(self) -> Any:
        """The dense map as a float32 numpy array (on the CPU)."""
        return self.dense().detach().float().cpu().numpy()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.dense().shape) if self.indices is not None else tuple(self.tensor.shape)

    def nbytes(self) -> int:
        """Bytes this record holds (values plus top-k indices)."""
        n = self.tensor.numel() * self.tensor.element_size()
        if self.indices is not None:
            n += self.indices.numel() * self.indices.element_size()
        return n


class Recording:
    """The records of one capture, in the order they were made (a list you can also query).

    Iterating gives :class:`AttentionRecord` objects; ``len(rec)`` counts them.
    """

    def __init__(self, records: Iterable[AttentionRecord] = ()) -> None:
        self.records: list[AttentionRecord] = list(records)

    def __iter__(self) -> Iterator[AttentionRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> AttentionRecord:
        return self.records[index]

    def __repr__(self) -> str:
        kinds = sorted({r.kind for r in self.records})
        return f"Recording({len(self.records)} records, kinds={kinds}, names={self.names()})"

    def names(self) -> list[str]:
        """The distinct owner names, in first-seen order."""
        return list(dict.fromkeys(r.name for r in self.records))

    def attention(self) -> list[AttentionRecord]:
        """Records of attention weights (not gates)."""
        return [r for r in self.records if r.kind == "attention"]

    def gates(self) -> list[AttentionRecord]:
        """Records of channel / spatial gates."""
        return [r for r in self.records if r.kind != "attention"]

    def by_name(self, name: str) -> list[AttentionRecord]:
        """All records of the module ``name`` (one per call)."""
        return [r for r in self.records if r.name == name]

    def nbytes(self) -> int:
        """Total bytes held by the records."""
        return sum(r.nbytes() for r in self.records)

    def clear(self) -> None:
        self.records.clear()

    def stack(self, *, call: int | None = None) -> Tensor:
        """Attention maps of all selected layers as one tensor ``(layers, B, H, L, S)``.

        Args:
            call: which call of each tap to take. ``None`` requires exactly one call per tap (a single forward);
                use ``call=0`` / ``call=-1`` for the first / last forward of a model run several times.
        """
        by_layer: dict[int, list[AttentionRecord]] = {}
        for r in self.attention():
            by_layer.setdefault(r.layer, []).append(r)
        if not by_layer:
            raise fail("a recording with attention records", "none", "running the model inside `with capture(...)`")
        picked = []
        for layer in sorted(by_layer):
            calls = by_layer[layer]
            if call is None:
                if len(calls) != 1:
                    raise fail(
                        "one call per layer for stack()",
                        f"{len(calls)} calls of {calls[0].name!r}",
                        "rec.stack(call=0) for the first forward or rec.stack(call=-1) for the last",
                    )
                picked.append(calls[0])
            else:
                try:
                    picked.append(calls[call])
                except IndexError:
                    raise fail(
                        f"call index within the {len(calls)} calls of {calls[0].name!r}", str(call), "call=0"
                    ) from None
        maps = [r.dense() for r in picked]
        shapes = {tuple(m.shape) for m in maps}
        if len(shapes) != 1:
            listing = ", ".join(f"{r.name}: {tuple(m.shape)}" for r, m in zip(picked, maps, strict=True))
            raise fail(
                "attention maps of one shape to stack",
                listing,
                "capture(model, names=...) to select layers of one kind (e.g. only self-attention)",
            )
        return torch.stack(maps)


def _owner_name(tap_name: str) -> str:
    """The qualified name of the module that owns a tap: ``"a.b.attend"`` -> ``"a.b"``."""
    return tap_name.rpartition(".")[0]


def _name_matches(name: str, names: NameFilter) -> bool:
    if names is None:
        return True
    if isinstance(names, re.Pattern):
        return names.search(name) is not None
    if isinstance(names, str):
        return fnmatch.fnmatchcase(name, names)
    return name in set(names)


def _check_reduce(reduce: Reduce) -> tuple[str | None, int]:
    if reduce is None:
        return None, 0
    if reduce == "mean":
        return "mean", 0
    if (
        isinstance(reduce, tuple)
        and len(reduce) == 2
        and reduce[0] == "topk"
        and isinstance(reduce[1], int)
        and not isinstance(reduce[1], bool)
        and reduce[1] > 0
    ):
        return "topk", reduce[1]
    raise fail('reduce to be None, "mean" or ("topk", k) with k > 0', repr(reduce), 'reduce=("topk", 4)')


def _as_index_list(value: int | Sequence[int] | None, what: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    items = list(value) if isinstance(value, Iterable) else []
    if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise fail(f"`{what}` as an int or a non-empty list of ints", repr(value), f"{what}=[0, 1]")
    return items


class _Reducer:
    """Head selection and reduction shared by :func:`capture` and :func:`from_hf_attentions`."""

    def __init__(self, heads: int | Sequence[int] | None, reduce: Reduce) -> None:
        self.heads = _as_index_list(heads, "heads")
        self.mode, self.k = _check_reduce(reduce)

    def __call__(self, weights: Tensor) -> tuple[Tensor, Tensor | None, tuple[int, ...] | None]:
        w = weights.detach()
        if self.heads is None and self.mode is None:
            w = w.clone()  # the record must not change if the model later reuses the buffer
        kept: tuple[int, ...] | None = None
        if self.heads is not None:
            if w.dim() != 4:
                raise fail("attention weights (B, H, L, S) to select heads", f"{tuple(w.shape)}", "heads=None")
            n = w.shape[1]
            bad = [h for h in self.heads if not -n <= h < n]
            if bad:
                raise fail(f"head indices in [-{n}, {n})", str(bad), f"heads within the model's {n} heads")
            kept = tuple(h % n for h in self.heads)
            w = w[:, list(kept)]
        indices = None
        if self.mode == "mean":
            w = w.mean(dim=1, keepdim=True)
        elif self.mode == "topk":
            k = min(self.k, w.shape[-1])
            w, indices = w.topk(k, dim=-1)
        return w, indices, kept


@contextmanager
def capture(
    model: nn.Module,
    names: NameFilter = None,
    *,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    reduce: Reduce = None,
    kinds: Iterable[str] | None = None,
) -> Iterator[Recording]:
    """Record the attention weights and gates of every tap inside ``model`` while the ``with`` block runs.

    Args:
        model: any ``nn.Module`` that contains attnkit attention modules or attention blocks.
        names: which modules to record, matched against the owner's qualified name: a glob pattern
            (``"encoder.layers.*.self_attn"``), a compiled regular expression (searched), or a list of exact names.
            ``None`` records all.
        layers: indices among the selected taps (module order; negative counts from the end), e.g. ``[-1]``.
        heads: head indices to keep (attention maps only).
        reduce: ``None`` (full maps), ``"mean"`` (average the kept heads: memory / H) or ``("topk", k)``
            (keep the ``k`` largest weights of each row with their key positions: memory ``k / S`` of the full map).
        kinds: which tap kinds to record (``"attention"``, ``"channel"``, ``"spatial"``); ``None`` = all.

    Yields:
        a :class:`Recording` that fills up as the model runs; the observers are removed on exit, even on error.

    Raises:
        ValueError: ``model`` has no taps, or the selection matches none (the message lists the names).

    The model computes its outputs exactly as without capture (same backend, same bits); capture only adds the
    recomputation of the weights in the selected taps, under ``torch.no_grad()``.
    """
    if not isinstance(model, nn.Module):
        raise fail("an nn.Module", type(model).__name__, "capture(model) with a torch.nn.Module")
    reducer = _Reducer(heads, reduce)
    wanted_kinds = None if kinds is None else set(kinds)
    taps = [(n, m) for n, m in model.named_modules() if isinstance(m, Tap)]
    if not taps and getattr(getattr(model, "config", None), "_attn_implementation", None) == "attnkit":
        from attnkit.integrations.transformers import install_taps  # a HF model: tap its attention modules

        install_taps(model)
        taps = [(n, m) for n, m in model.named_modules() if isinstance(m, Tap)]
    if not taps:
        raise fail(
            "a model with attnkit attention modules (Attend / WeightsTap / GateTap taps)",
            f"none in {type(model).__name__}",
            'attn_implementation="attnkit" (import attnkit.integrations.transformers) for HuggingFace models, or '
            "from_hf_attentions(outputs.attentions) with output_attentions=True",
        )
    owners = [(_owner_name(n), m) for n, m in taps]
    selected = [
        (name, m)
        for name, m in owners
        if _name_matches(name, names) and (wanted_kinds is None or m.kind in wanted_kinds)
    ]
    if not selected:
        listing = ", ".join(repr(n) for n, _ in owners[:12]) + (" ..." if len(owners) > 12 else "")
        raise fail("names / kinds that select at least one module", f"none among {listing}", "names=None")
    layer_list = _as_index_list(layers, "layers")
    if layer_list is not None:
        n = len(selected)
        bad = [i for i in layer_list if not -n <= i < n]
        if bad:
            raise fail(f"layer indices in [-{n}, {n})", str(bad), f"layers within the {n} selected modules")
        selected = [selected[i % n] for i in sorted({i % n for i in layer_list})]

    rec = Recording()
    removers = []
    for layer, (name, tap) in enumerate(selected):
        counter = [0]

        def observe(module: nn.Module, value: Tensor, *, _name=name, _layer=layer, _counter=counter) -> None:
            call = _counter[0]
            _counter[0] += 1
            kind = str(getattr(module, "kind", "attention"))
            if kind == "attention":
                tensor, indices, kept = reducer(value)
                record = AttentionRecord(
                    _name, "attention", tensor, call, _layer, kept, reducer.mode, indices, value.shape[-1]
                )
            else:
                record = AttentionRecord(_name, kind, value.detach().clone(), call, _layer)
            rec.records.append(record)

        removers.append(tap.add_observer(observe))
    try:
        yield rec
    finally:
        for remove in removers:
            remove()


def from_hf_attentions(
    attentions: Sequence[Tensor],
    *,
    names: Sequence[str] | None = None,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    reduce: Reduce = None,
) -> Recording:
    """The same :class:`Recording` from a HuggingFace model's ``outputs.attentions``.

    Args:
        attentions: one ``(B, H, L, S)`` tensor per layer, as returned with ``output_attentions=True`` (load the
            model with ``attn_implementation="eager"``: fused kernels return no maps).
        names: one name per layer (default ``"layer.0"``, ``"layer.1"``, ...).
        layers: as in :func:`capture`.
        heads: as in :func:`capture`.
        reduce: as in :func:`capture`.

    Example:
        >>> import torch
        >>> from attnkit.viz import from_hf_attentions
        >>> atts = tuple(torch.softmax(torch.randn(1, 12, 7, 7), -1) for _ in range(6))
        >>> rec = from_hf_attentions(atts, reduce="mean")
        >>> rec.stack().shape                                  # (layers, B, 1, L, S)
        torch.Size([6, 1, 1, 7, 7])
    """
    if attentions is None or isinstance(attentions, Tensor) or len(attentions) == 0:
        raise fail(
            "a non-empty tuple of (B, H, L, S) tensors (outputs.attentions)",
            "None" if attentions is None else type(attentions).__name__,
            'loading the model with attn_implementation="eager" and calling it with output_attentions=True',
        )
    n = len(attentions)
    if names is None:
        names = [f"layer.{i}" for i in range(n)]
    elif len(names) != n:
        raise fail(f"{n} names (one per layer)", f"{len(names)}", "names=None")
    for i, a in enumerate(attentions):
        if not isinstance(a, Tensor) or a.dim() != 4:
            got = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise fail("each attention as a (B, H, L, S) tensor", f"layer {i}: {got}", "outputs.attentions")
    index = list(range(n))
    layer_list = _as_index_list(layers, "layers")
    if layer_list is not None:
        bad = [i for i in layer_list if not -n <= i < n]
        if bad:
            raise fail(f"layer indices in [-{n}, {n})", str(bad), f"layers within the model's {n} layers")
        index = sorted({i % n for i in layer_list})
    reducer = _Reducer(heads, reduce)
    rec = Recording()
    for layer, i in enumerate(index):
        tensor, indices, kept = reducer(attentions[i])
        size = attentions[i].shape[-1]
        rec.records.append(AttentionRecord(names[i], "attention", tensor, 0, layer, kept, reducer.mode, indices, size))
    return rec
