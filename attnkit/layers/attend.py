"""The kernel call inside every attention module, and the hook point that lets maps out without storing them.

Every attnkit module computes attention through an :class:`Attend` submodule (sequence attention) or a
:class:`GateTap` submodule (CNN gates). Both are *taps*: they keep no maps, but while an observer is attached
(``attnkit.viz.capture`` attaches one) they hand each map to it as it is computed.

* :class:`Attend` computes its output with the fast backend exactly as without observers, so outputs are
  bit-identical under capture; the exact weights come from :func:`attnkit.functional.attention_weights`, a
  recomputation that agrees with the reference kernel.
* :class:`GateTap` applies a gate function (sigmoid by default) and hands the gate to the observers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.functional import attention_weights, scaled_dot_product_attention
from attnkit.functional.mask_args import MaskLike

Observer = Callable[[nn.Module, Tensor], None]


class Tap(nn.Module):
    """Base for modules that can hand intermediate maps to observers (no maps are ever stored on ``self``)."""

    kind = "attention"

    def __init__(self) -> None:
        super().__init__()
        self._observers: dict[int, Observer] = {}
        self._next_handle = 0

    def add_observer(self, fn: Observer) -> Callable[[], None]:
        """Call ``fn(module, map)`` on every forward until the returned ``remove()`` is called."""
        handle = self._next_handle
        self._next_handle += 1
        self._observers[handle] = fn

        def remove() -> None:
            self._observers.pop(handle, None)

        return remove

    @property
    def observed(self) -> bool:
        return bool(self._observers)

    def _notify(self, value: Tensor) -> None:
        for fn in list(self._observers.values()):
            fn(self, value)

    def __getstate__(self) -> dict[str, Any]:  # observers are session-local: never pickled or deep-copied
        state = self.__dict__.copy()
        state["_observers"] = {}
        return state


class Attend(Tap):
    """``scaled_dot_product_attention`` as a submodule: dropout follows ``self.training``.

    Args:
        dropout: dropout on the attention weights while training.
        backend: kernel backend (``"auto"`` picks the fastest that serves the inputs).

    Shape:
        query ``(B, H, L, E)``, key ``(B, Hkv, S, E)``, value ``(B, Hkv, S, Ev)`` -> ``(B, H, L, Ev)``.
        Observers receive the weights ``(B, H, L, S)``.
    """

    kind = "attention"

    def __init__(self, *, dropout: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        self.dropout = dropout
        self.backend = backend

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: MaskLike = None,
        *,
        is_causal: bool = False,
        scale: float | None = None,
    ) -> Tensor:
        p = self.dropout if self.training else 0.0
        out = scaled_dot_product_attention(
            query, key, value, attn_mask, is_causal=is_causal, dropout_p=p, scale=scale, backend=self.backend
        )
        if self._observers:
            with torch.no_grad():
                weights = attention_weights(query, key, attn_mask, is_causal=is_causal, scale=scale)
            self._notify(weights)
        return out  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, backend={self.backend!r}"


class WeightsTap(Tap):
    """Hands already-computed weights to observers (for modules whose kernel returns weights itself,
    e.g. additive attention): ``weights = self.tap(weights)`` is the identity."""

    def forward(self, weights: Tensor) -> Tensor:
        if self._observers:
            self._notify(weights.detach())
        return weights


class GateTap(Tap):
    """A gate ``g = gate_layer(x)`` in ``[0, 1]`` that observers can see (channel or spatial attention).

    Args:
        kind: ``"channel"`` or ``"spatial"`` (how viewers should draw it).
        gate_layer: the activation that makes the gate (default ``nn.Sigmoid``).
    """

    def __init__(self, kind: str = "channel", gate_layer: Callable[[], nn.Module] | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.gate = (gate_layer or nn.Sigmoid)()

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate(x)
        if self._observers:
            self._notify(g.detach())
        return g

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
