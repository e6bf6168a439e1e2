"""Seeing attention: capture exact maps from any model, plot them, roll them out, view them in a browser.

* :func:`capture` / :func:`from_hf_attentions` -> :class:`Recording` of :class:`AttentionRecord` objects.
* :mod:`attnkit.viz.plot` (matplotlib, the ``viz`` extra): heatmaps, head grids, alignments, image overlays,
  glimpse paths, channel-gate bars; every function returns a Figure and can ``save=`` PNG / SVG.
* :func:`attention_rollout` (Abnar & Zuidema 2020).
* :func:`to_html`: one self-contained, offline, interactive HTML viewer.

The plotting names are imported lazily so that ``import attnkit.viz`` does not need matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

from .capture import AttentionRecord, Recording, capture, from_hf_attentions
from .rollout import attention_rollout

_LAZY = {
    "heatmap": "plot",
    "head_grid": "plot",
    "alignment": "plot",
    "image_overlay": "plot",
    "glimpse_path": "plot",
    "channel_gate_bars": "plot",
    "token_bars": "plot",
    "to_html": "html",
    "AttentionView": "html",
}

__all__ = [
    "AttentionRecord",
    "AttentionView",
    "Recording",
    "alignment",
    "attention_rollout",
    "capture",
    "channel_gate_bars",
    "from_hf_attentions",
    "glimpse_path",
    "head_grid",
    "heatmap",
    "image_overlay",
    "to_html",
    "token_bars",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
