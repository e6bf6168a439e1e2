"""The one dispatcher: every attention kernel is a :class:`Backend`, chosen from one written priority list.

A backend declares as data what it serves (dtypes, devices, mask kinds, gradients, head dims, whether it returns
the weights, a tolerance hint for the parity suite) and gives, through ``supports(call)``, the reasons it cannot
serve one call. ``backend="auto"`` runs the first backend of :data:`PRIORITY` that can serve the call; a forced
backend that cannot serve raises ``ValueError`` with the inputs and every reason. :func:`which_backend` tells which
kernel would run and why the others were passed over.

Exact weights (``return_weights=True``, :func:`~attnkit.functional.attention_weights`) come from the backend when it
returns them, else from a :class:`WeightsPath`, the first of :data:`WEIGHTS_PRIORITY` that serves the call: the
native block engine's for mask objects (``native_mask``: only the blocks the mask touches), else ``math``. With
``return_weights=True``, ``auto`` keeps the output on the backend it would pick without weights when a path other
than ``math`` serves the weights, and otherwise runs the first backend that returns weights itself.

Each implementation is its own backend: the sliding window's native C kernel (``native_band``), its PyTorch flash
pieces (``flash_pieces``) and blockwise path (``window_blockwise``); the decode kernel's native (``native_decode``)
and PyTorch (``torch_decode``) paths; block-sparse attention's native (``native_block_sparse``) and PyTorch
(``torch_block_sparse``) paths. There is no second level of choice. The old names ``"local"``, ``"decode"`` and
``"block_sparse"`` stay as deprecated aliases (:data:`ALIASES`): forcing one runs the first of its members that
serves the call, with a ``DeprecationWarning``.

Example:
    >>> import torch
    >>> from attnkit.functional import available_backends, which_backend
    >>> available_backends()[:5]
    ['native_band', 'flash_pieces', 'window_blockwise', 'native_decode', 'torch_decode']
    >>> available_backends()[5:]
    ['native_block_sparse', 'torch_block_sparse', 'native_mask', 'sdpa', 'chunked', 'math', 'reference']
    >>> q = torch.randn(1, 2, 4, 8)                                   # (B, H, L, E)
    >>> choice = which_backend(q, q, q, return_weights=True)
    >>> choice.name, choice.reasons["sdpa"]
    ('math', ['does not return the attention weights (return_weights=True)'])
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from . import _validate as V
from .mask_args import normalize_masks
from .masks import AndMask, AttentionMask, CausalMask, OrMask, causal_mask, combine_masks

__all__ = [
    "ALIASES",
    "PRIORITY",
    "WEIGHTS_PRIORITY",
    "AttentionCall",
    "Backend",
    "BackendChoice",
    "WeightsPath",
    "available_backends",
    "choose_backend",
    "clear_choices",
    "get_backend",
    "make_call",
    "mask_kinds",
    "plain_call",
    "register_backend",
    "register_weights",
    "weights_of",
    "which_backend",
]

#: ``auto``'s order over the built-in backends. Structured kernels come first (each serves only its own mask
#: objects or decoding steps, where it is faster than the dense kernels), each native C kernel ahead of its PyTorch
#: counterpart; then PyTorch's fused kernel, then the memory-lean and weight-returning dense paths. A backend
#: registered under another name goes after all of these, in the order of registration.
PRIORITY: tuple[str, ...] = (
    "native_band",  # BlockedWindowMask (& PaddingMask), L == S: the C kernel (csrc/band.c)
    "flash_pieces",  # BlockedWindowMask, L == S, no padding: PyTorch's flash kernel per block offset
    "window_blockwise",  # BlockedWindowMask (& PaddingMask), any L <= S: gathered buckets, masked SDPA, autograd
    "native_decode",  # a few queries over a long KV cache: the C kernel (csrc/decode.c)
    "torch_decode",  # the same on PyTorch operators
    "native_block_sparse",  # BlockSparseMask (& PaddingMask): the C kernel (csrc/band.c)
    "torch_block_sparse",  # the same on PyTorch's flash kernel per piece
    "native_mask",  # any other mask object or mask_mod: the C block engine
    "sdpa",
    "chunked",
    "math",
    "reference",
)

#: The order in which the exact weights of a call are computed apart from its output (:class:`WeightsPath`): the
#: native engine's for mask objects (the blocks they touch, softmax in cache, one write), then the dense math.
WEIGHTS_PRIORITY: tuple[str, ...] = ("native_mask", "math")

#: Deprecated backend names, each standing for its member backends in order: forcing an alias runs the first member
#: that serves the call (with a ``DeprecationWarning``). They were the backends that chose among their own kernels.
ALIASES: dict[str, tuple[str, ...]] = {
    "local": ("native_band", "flash_pieces", "window_blockwise"),
    "decode": ("native_decode", "torch_decode"),
    "block_sparse": ("native_block_sparse", "torch_block_sparse"),
}


@dataclass
class AttentionCall:
    """A validated call, in the 4-D layout, as every backend sees it.

    ``mask`` is an explicit tensor mask viewed as 4-D (bool, or float in the query dtype); ``structure`` is a mask
    object (causal, padding, window, ...) that a backend may serve without materialising it.
    """

    query: Tensor  # (B, H, L, E)
    key: Tensor  # (B, Hkv, S, E)
    value: Tensor  # (B, Hkv, S, Ev)
    mask: Tensor | None
    structure: AttentionMask | None
    is_causal: bool
    dropout_p: float
    scale: float
    need_weights: bool
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2)

    @property
    def batch(self) -> int:
        return self.query.shape[0]

    @property
    def heads(self) -> int:
        return self.query.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def k_len(self) -> int:
        return self.key.shape[2]

    @property
    def needs_grad(self) -> bool:
        tensors = (self.query, self.key, self.value, self.mask)
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    def dense_mask(self) -> tuple[Tensor | None, bool]:
        """The whole mask as ``(tensor or None, is_causal)`` for a dense kernel.

        Causal structure that equals PyTorch's ``is_causal`` stays a flag; anything else is materialised and
        combined (boolean ``True`` = may attend; float = added).
        """
        structure, causal = self.structure, self.is_causal
        if isinstance(structure, CausalMask):
            if structure.is_full(self.q_len, self.k_len):
                structure = None
            elif structure.is_upper_left(self.q_len, self.k_len) and self.mask is None:
                structure, causal = None, True
        if structure is None and (self.mask is None or not causal):
            return self.mask, causal
        parts = [self.mask]
        if structure is not None:
            parts.append(structure.materialize(self.q_len, self.k_len, device=self.query.device))
        if causal:
            parts.append(causal_mask(self.q_len, self.k_len, device=self.query.device))
        return combine_masks(*parts), False

    def describe(self) -> str:
        """The inputs in one line, for error messages: shapes, dtype, device and mask kinds."""
        q, k, v = self.query, self.key, self.value
        dtype = str(q.dtype).replace("torch.", "")
        cap = "" if self.softcap is None else f", softcap {self.softcap:g}"
        return (f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}, {dtype} on {q.device}, "
                f"mask: {' & '.join(mask_kinds(self)) or 'none'}{cap}")


def mask_kinds(call: AttentionCall) -> tuple[str, ...]:
    """The kinds of mask in a call: ``"tensor"`` (bool or float), ``"is_causal"``, and the mask objects' class names
    (the parts of an ``&``; an ``|`` as ``"OrMask"``)."""
    kinds = []
    if call.mask is not None:
        kinds.append(f"{'bool' if call.mask.dtype == torch.bool else 'float'} tensor")
    if call.is_causal:
        kinds.append("is_causal")
    if call.structure is not None:
        parts = call.structure.parts if isinstance(call.structure, AndMask) else (call.structure,)
        kinds += [type(p).__name__ if not isinstance(p, OrMask) else "OrMask" for p in parts]
    return tuple(kinds)


BackendFn = Callable[[AttentionCall], tuple[Tensor, Tensor | None]]


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


@dataclass
class Backend:
    """A kernel that computes attention for the calls it supports.

    What it serves is declared as data; the dispatcher checks ``dtypes``, ``devices``, ``grad`` and ``head_dims``
    itself, and ``supports(call)`` adds the reasons that the data cannot say (a mask structure it does not read,
    dropout, a library that did not load, ...).

    Args:
        name: the ``backend=`` string.
        fn: ``fn(call) -> (out, weights or None)``.
        returns_weights: whether ``fn`` returns the weights it used.
        supports: ``supports(call) -> list of reasons it cannot serve`` (empty = it can), beyond the declared data.
        auto_skip: ``auto_skip(call) -> list of reasons`` ``auto`` passes it over although it can serve (another
            kernel is faster there, e.g. by this machine's calibration); a forced backend runs anyway.
        description: one line for :func:`which_backend`.
        kernel: optional ``kernel(call) -> str``: a line on the code that would run (e.g. which SIMD body of a
            native kernel); :func:`which_backend` prints it.
        dtypes: the query dtypes it serves (``None``: every float dtype).
        devices: the device types it serves, e.g. ``("cpu",)`` (``None``: every device).
        mask_kinds: the mask kinds it reads (:func:`mask_kinds` names; ``None``: every kind). A declaration for
            readers and for the parity suite; ``supports`` states the exact rule.
        grad: whether it serves inputs that require grad (a backward pass).
        head_dims: the largest ``E`` and ``Ev`` it serves (``None``: any).
        softcap: whether it serves logit soft-capping (``softcap * tanh(scores / softcap)``, Gemma 2).
        tolerance: a hint for the parity suite, as a multiple of the dtype's tolerance of
            :mod:`attnkit.testing` (``None``: the policy as it stands).
    """

    name: str
    fn: BackendFn
    returns_weights: bool
    supports: Callable[[AttentionCall], list[str]] = field(default=lambda call: [])
    description: str = ""
    auto_skip: Callable[[AttentionCall], list[str]] | None = None
    kernel: Callable[[AttentionCall], str] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    devices: tuple[str, ...] | None = None
    mask_kinds: tuple[str, ...] | None = None
    grad: bool = True
    head_dims: int | None = None
    softcap: bool = False
    tolerance: float | None = None

    def declared_reasons(self, call: AttentionCall) -> list[str]:
        """Why the declared data rules this call out (empty when it does not)."""
        reasons = []
        if self.devices is not None and call.query.device.type not in self.devices:
            reasons.append(f"a {call.query.device.type} tensor (the {self.name} kernel takes "
                           f"{' and '.join(d.upper() if d == 'cpu' else d for d in self.devices)} tensors)")
        if self.dtypes is not None and call.query.dtype not in self.dtypes:
            reasons.append(f"{call.query.dtype} inputs (the {self.name} kernel takes {_names(self.dtypes)})")
        if not self.grad and call.needs_grad:
            reasons.append(f"inputs require grad (the {self.name} kernel is for inference)")
        if self.head_dims is not None and max(call.query.shape[-1], call.value.shape[-1]) > self.head_dims:
            reasons.append(f"head dims E={call.query.shape[-1]}, Ev={call.value.shape[-1]} above {self.head_dims}")
        if call.softcap is not None and not self.softcap:
            reasons.append(f"logit soft-capping (softcap={call.softcap:g}; the {self.name} kernel does not cap scores)")
        return reasons

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        return self.declared_reasons(call) + list(self.supports(call))


_BACKENDS: dict[str, Backend] = {}  # in auto's order
_RANKS: dict[str, tuple[float, int]] = {}  # name -> (place in PRIORITY, registration number)
_COUNTER = itertools.count()


def register_backend(backend: Backend, *, before: str | None = None) -> None:
    """Add a backend to the dispatcher (or replace the one of that name).

    A built-in name takes its place in :data:`PRIORITY`; any other name goes after the built-ins, in the order of
    registration. ``before`` (deprecated) puts a backend just ahead of a named one instead.
    """
    if before is not None:
        warnings.warn("register_backend(before=...) is deprecated: backends are ordered by "
                      "attnkit.functional.dispatch.PRIORITY, and other backends follow it in registration order",
                      DeprecationWarning, stacklevel=2)
        names = [n for n in _BACKENDS if n != backend.name]
        if before not in names:
            raise V.fail(f"`before` in {names}", repr(before), "one of the registered backend names")
        rank = _RANKS[before][0] - 0.5
    else:
        rank = float(PRIORITY.index(backend.name)) if backend.name in PRIORITY else float(len(PRIORITY))
    _RANKS[backend.name] = (rank, next(_COUNTER))
    items = {**_BACKENDS, backend.name: backend}
    clear_choices()
    _BACKENDS.clear()
    _BACKENDS.update(sorted(items.items(), key=lambda item: _RANKS[item[0]]))


def available_backends() -> list[str]:
    """Backend names in ``auto``'s priority order."""
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The registered backend of that name (a deprecated alias: its first registered member)."""
    if name not in _BACKENDS and name in ALIASES:
        members = [m for m in ALIASES[name] if m in _BACKENDS]
        if members:
            _warn_alias(name)
            return _BACKENDS[members[0]]
    if name not in _BACKENDS:
        raise V.fail(f"backend in {['auto', *_BACKENDS]}", repr(name), 'backend="auto"')
    return _BACKENDS[name]


def _warn_alias(name: str) -> None:
    warnings.warn(f"backend={name!r} is deprecated: it stands for the backends {list(ALIASES[name])} (the first that "
                  "serves the call runs); name one of them, or use backend='auto'", DeprecationWarning, stacklevel=4)


@dataclass(frozen=True)
class WeightsPath:
    """A way to compute the exact softmax weights ``(B, H, L, S)`` of a call apart from its output, for a backend
    that hides them (and for :func:`~attnkit.functional.attention_weights`).

    Args:
        name: its name in :data:`WEIGHTS_PRIORITY` (and in :attr:`BackendChoice.weights_from`).
        fn: ``fn(call) -> weights``.
        supports: ``supports(call) -> list of reasons it cannot serve`` (empty = it can).
    """

    name: str
    fn: Callable[[AttentionCall], Tensor]
    supports: Callable[[AttentionCall], list[str]] = field(default=lambda call: [])


_WEIGHTS: dict[str, WeightsPath] = {}


def register_weights(path: WeightsPath) -> None:
    """Add a weights path (or replace the one of that name); :data:`WEIGHTS_PRIORITY` orders the built-in ones,
    others follow in the order of registration."""
    items = {**_WEIGHTS, path.name: path}
    clear_choices()
    order = {name: i for i, name in enumerate(WEIGHTS_PRIORITY)}
    _WEIGHTS.clear()
    _WEIGHTS.update(sorted(items.items(), key=lambda item: order.get(item[0], len(order))))


def _weights_path(call: AttentionCall) -> str:
    for name, path in _WEIGHTS.items():
        if not path.supports(call):
            return name
    raise ValueError(f"no weights path serves these inputs ({call.describe()})")  # pragma: no cover (math serves all)


def weights_of(call: AttentionCall, path: str | None = None) -> Tensor:
    """The exact weights of ``call`` from the named path (``None``: the first of :data:`WEIGHTS_PRIORITY` that
    serves it)."""
    return _WEIGHTS[path or _weights_path(call)].fn(call)


@dataclass(frozen=True)
class BackendChoice:
    """Which backend would run, and why each one ahead of it was passed over (read-only: ``auto`` may hand the
    same choice to every call with the same plain inputs)."""

    name: str
    reasons: dict[str, list[str]]
    weights_from: str | None = None
    kernel: str | None = None  # the backend's line on the code that would run (e.g. a native kernel's SIMD body)

    def __str__(self) -> str:
        lines = [f"backend: {self.name}"]
        if self.kernel:
            lines.append(f"kernel: {self.kernel}")
        if self.weights_from:
            lines.append(f"weights: recomputed by '{self.weights_from}'")
        for name, why in self.reasons.items():
            lines.append(f"  skipped {name}: {'; '.join(why)}")
        return "\n".join(lines)


#: Functions whose results the backends' rules read besides the call (an environment variable, the loaded native
#: library): part of the key under which a plain call is kept (:func:`plain_call`). Modules append theirs.
CHOICE_INPUTS: list[Callable[[], object]] = []
_PLAIN: dict[tuple[Any, ...], tuple[AttentionMask | None, bool, float, BackendChoice, Backend]] = {}
_PLAIN_MAX = 1024


def clear_choices() -> None:
    """Forget the plain calls kept by :func:`plain_call` (registering a backend or a weights path does it too)."""
    _PLAIN.clear()


def plain_call(query: Any, key: Any, value: Any, attn_mask: Any, is_causal: Any, dropout_p: Any, scale: Any,
               return_weights: Any, softcap: Any, backend: str) -> tuple[AttentionCall, BackendChoice, Backend] | None:
    """A plain call validated and routed once per signature: the call, ``auto``'s choice and its backend.

    Plain: ``(B, H, L, E)`` tensors (exactly :class:`torch.Tensor`), no mask or a :class:`CausalMask`, a ``bool``
    ``is_causal``, no dropout, weights or soft-capping, a ``float`` or ``None`` scale, ``backend="auto"``: the decode
    steps and the causal or unmasked calls a model makes in every layer. Everything validation and the backends'
    rules read of such a call is in the key (shapes, strides, dtypes, devices, gradient mode, the mask, the scale,
    the thread count, :data:`CHOICE_INPUTS`), so the kept result is the one :func:`make_call` and
    :func:`choose_backend` would give; validating and choosing cost tens of microseconds a call, as much as a decode
    step's kernel on a short cache. ``None`` for any other call: validate it with :func:`make_call`."""
    if (backend != "auto" or return_weights is not False or softcap is not None or type(is_causal) is not bool
            or type(dropout_p) not in (int, float) or dropout_p != 0 or not (scale is None or type(scale) is float)
            or not (attn_mask is None or type(attn_mask) is CausalMask)
            or not (type(query) is Tensor and type(key) is Tensor and type(value) is Tensor) or query.dim() != 4):
        return None
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    sig = (query.shape, key.shape, value.shape, query.stride(), key.stride(), value.stride(), query.dtype,
           key.dtype, value.dtype, query.device, key.device, value.device, grad, is_causal, attn_mask, scale,
           torch.get_num_threads(), *(fn() for fn in CHOICE_INPUTS))
    kept = _PLAIN.get(sig)
    if kept is None:
        call, _ = make_call(query, key, value, attn_mask, is_causal, dropout_p, scale, False)
        if call.k_len == 0:
            return None
        choice = choose_backend(call)
        chosen = _BACKENDS[choice.name]
        if len(_PLAIN) >= _PLAIN_MAX:
            _PLAIN.clear()
        _PLAIN[sig] = (call.structure, call.is_causal, call.scale, choice, chosen)
        return call, choice, chosen
    structure, causal, scale_, choice, chosen = kept
    return AttentionCall(query, key, value, None, structure, causal, 0.0, scale_, False), choice, chosen


def choose_backend(call: AttentionCall, backend: str = "auto") -> BackendChoice:
    """The backend that serves ``call``: the forced one (raises with every reason when it cannot serve), the first
    member of a deprecated alias (:data:`ALIASES`) that can, or for ``"auto"`` the first of
    :func:`available_backends` that can."""
    if backend != "auto" and backend not in _BACKENDS and backend in ALIASES:
        _warn_alias(backend)
        reasons: dict[str, list[str]] = {}
        for name in ALIASES[backend]:
            if name not in _BACKENDS:
                continue
            try:
                return _forced(call, name)
            except ValueError as exc:
                reasons[name] = [str(exc)]
        raise V.fail(f"inputs that one of the backends {list(ALIASES[backend])} (backend={backend!r}) can serve",
                     "; ".join(f"{n}: {'; '.join(r)}" for n, r in reasons.items()), 'backend="auto"')
    if backend != "auto":
        return _forced(call, backend)
    if call.need_weights and call.dropout_p == 0 and (path := _weights_path(call)) != "math":
        # the weights have a path of their own: the output stays on the kernel chosen without them
        choice = choose_backend(replace(call, need_weights=False))
        return choice if _BACKENDS[choice.name].returns_weights else replace(choice, weights_from=path)
    reasons = {}
    for name, b in _BACKENDS.items():
        why = b.not_supported_reasons(call) + (b.auto_skip(call) if b.auto_skip is not None else [])
        if call.need_weights and not b.returns_weights and not why:
            why = ["does not return the attention weights (return_weights=True)"]
        if not why:
            return BackendChoice(name, reasons, kernel=b.kernel(call) if b.kernel else None)
        reasons[name] = why
    raise ValueError(f"no backend can serve these inputs ({call.describe()}): {reasons}")  # pragma: no cover


def _forced(call: AttentionCall, backend: str) -> BackendChoice:
    chosen = get_backend(backend)
    # A kernel that hides its weights is only asked to serve the output; the math backend adds the weights.
    hides_weights = call.need_weights and not chosen.returns_weights
    why = chosen.not_supported_reasons(replace(call, need_weights=False) if hides_weights else call)
    if why:
        raise V.fail(f"inputs that backend {backend!r} can serve", f"{'; '.join(why)} ({call.describe()})",
                     'backend="auto"')
    weights_from = _weights_path(call) if hides_weights else None
    return BackendChoice(backend, {}, weights_from, chosen.kernel(call) if chosen.kernel else None)


def make_call(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any,
    is_causal: bool,
    dropout_p: Any,
    scale: Any,
    return_weights: bool,
    softcap: Any = None,
) -> tuple[AttentionCall, bool]:
    """Validate the arguments of :func:`~attnkit.functional.scaled_dot_product_attention` into an
    :class:`AttentionCall`; also returns whether the inputs were 3-D ``(B, L, E)``. The masks go through
    :func:`~attnkit.functional.mask_args.normalize_masks`, the one normaliser every module calls too."""
    q, k, v = V.check_qkv(query, key, value)
    three_d = q.dim() == 3
    if three_d:  # the tutorial layout (B, L, E): one head
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    b, h, q_len, e = q.shape
    masks = normalize_masks(attn_mask, None, is_causal, batch=b, heads=h, q_len=q_len, k_len=k.shape[2],
                            dtype=q.dtype, device=q.device, ndim_in=3 if three_d else 4)
    call = AttentionCall(
        query=q,
        key=k,
        value=v,
        mask=masks.mask,
        structure=masks.structure,
        is_causal=masks.is_causal,
        dropout_p=V.check_dropout(dropout_p),
        scale=V.check_scale(scale, e),
        need_weights=bool(return_weights),
        softcap=V.check_softcap(softcap),
    )
    return call, three_d


def which_backend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | AttentionMask | Callable[..., Tensor] | None = None,
    *,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
    softcap: float | None = None,
    backend: str = "auto",
) -> BackendChoice:
    """Which backend :func:`~attnkit.functional.scaled_dot_product_attention` would run for these inputs, and why.

    Takes the same arguments, with the same mask meaning (boolean ``True`` = may attend, float = added), and
    runs nothing. ``str(choice)`` lists every backend passed over with its reasons.

    Example:
        >>> import torch
        >>> from attnkit.functional import which_backend, CausalMask
        >>> q = torch.randn(1, 2, 4, 8)
        >>> which_backend(q, q, q, CausalMask()).name
        'sdpa'
        >>> which_backend(q, q, q, return_weights=True).name
        'math'
    """
    kept = plain_call(query, key, value, attn_mask, is_causal, dropout_p, scale, return_weights, softcap, backend)
    if kept is not None:
        return kept[1]
    call, _ = make_call(query, key, value, attn_mask, is_causal, dropout_p, scale, return_weights, softcap)
    return choose_backend(call, backend)
