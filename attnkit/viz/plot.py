"""Static pictures of attention with matplotlib (the ``viz`` extra): every function returns a Figure.

* :func:`heatmap`: one ``(L, S)`` map with token labels (CJK text renders when a CJK font is installed).
* :func:`head_grid`: layers x heads of a stack ``(layers, B, H, L, S)``.
* :func:`alignment`: a seq2seq alignment (target rows, source columns), as in Bahdanau et al. (2015).
* :func:`image_overlay`: spatial attention over an image, one panel per map (e.g. one per caption word).
* :func:`glimpse_path`: where a hard-attention model looked, in order, with its glimpse patches.
* :func:`channel_gate_bars`: the channel gates of SE / ECA / CBAM blocks.
* :func:`token_bars`: one value per token (e.g. a rollout row).

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot, no global state, no window), so
they work headless; pass ``save="x.png"`` (or ``.svg`` / ``.pdf``) to write a file. Token labels use a font list
that ends with an installed CJK font (Noto Sans CJK from Debian ``fonts-noto-cjk``) when there is one; without it
missing glyphs show as boxes and nothing fails.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import font_manager, rc_context
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from attnkit._errors import fail

from .capture import AttentionRecord, Recording

__all__ = [
    "alignment",
    "channel_gate_bars",
    "font_families",
    "glimpse_path",
    "head_grid",
    "heatmap",
    "image_overlay",
    "save_figure",
    "token_bars",
]

# Fonts with CJK glyphs, most preferred first; the first installed one is appended to the family list.
_CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans CJK TC",
    "Noto Sans CJK KR",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
)
_SAVE_FORMATS = (".png", ".svg", ".pdf")


@functools.cache
def font_families() -> tuple[str, ...]:
    """The font family list used for labels: DejaVu Sans, then the first installed CJK font (if any).

    matplotlib (>= 3.6) falls back glyph by glyph along this list, so Latin text keeps DejaVu Sans and Chinese,
    Japanese or Korean tokens take the CJK font.
    """
    installed = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [name for name in _CJK_FONTS if name in installed]
    return ("DejaVu Sans", *cjk[:1])


@contextmanager
def _style() -> Iterator[None]:
    with rc_context({"font.family": list(font_families()), "axes.unicode_minus": False}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
        yield


def save_figure(fig: Figure, save: str | Path | None, *, dpi: int = 110) -> Figure:
    """Write ``fig`` to ``save`` (``.png``, ``.svg`` or ``.pdf``; folders are created) and return it."""
    if save is None:
        return fig
    path = Path(save)
    if path.suffix.lower() not in _SAVE_FORMATS:
        raise fail(f"a file name ending in one of {_SAVE_FORMATS}", repr(str(save)), f"save={path.stem + '.png'!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _style():
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return fig


def _array(x: Any, what: str) -> np.ndarray:
    """A float numpy array from a tensor, array, list or record."""
    if isinstance(x, AttentionRecord):
        return x.numpy()
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise fail(f"`{what}` as a tensor or array of numbers", type(x).__name__, f"torch.as_tensor({what})") from None


def _check_tokens(tokens: Sequence[str] | None, n: int, what: str) -> list[str] | None:
    if tokens is None:
        return None
    tokens = [str(t) for t in tokens]
    if len(tokens) != n:
        raise fail(f"{n} {what} (one per position)", f"{len(tokens)}", f"{what}=None or a list of {n} strings")
    return tokens


def _label_size(n: int) -> float:
    return float(np.clip(150 / max(n, 1), 5, 10))


def _draw_map(
    ax: Any,
    w: np.ndarray,
    x_tokens: list[str] | None,
    y_tokens: list[str] | None,
    *,
    cmap: str,
    vmin: float | None,
    vmax: float | None,
    top: bool = False,
    fontsize: float | None = None,
) -> Any:
    im = ax.imshow(w, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    if x_tokens is not None:
        ax.set_xticks(range(len(x_tokens)), x_tokens, rotation=90, fontsize=fontsize or _label_size(len(x_tokens)))
        if top:
            ax.xaxis.tick_top()
    else:
        ax.set_xticks([])
    if y_tokens is not None:
        ax.set_yticks(range(len(y_tokens)), y_tokens, fontsize=fontsize or _label_size(len(y_tokens)))
    else:
        ax.set_yticks([])
    return im


def heatmap(
    weights: Any,
    x_tokens: Sequence[str] | None = None,
    y_tokens: Sequence[str] | None = None,
    *,
    title: str | None = None,
    cmap: str = "viridis",
    vmin: float | None = 0.0,
    vmax: float | None = None,
    colorbar: bool = True,
    annotate: bool = False,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
) -> Figure:
    """One attention map with token labels: rows are queries, columns keys.

    Args:
        weights: ``(L, S)`` tensor or array (e.g. ``rec[0].numpy()[0, 0]`` for batch 0, head 0).
        x_tokens: ``S`` key labels (columns); ``y_tokens``: ``L`` query labels (rows; default ``x_tokens`` when
            the map is square).
        annotate: write each value in its cell (small maps).
        save: write the figure to this ``.png`` / ``.svg`` / ``.pdf`` path.

    Shape:
        ``weights (L, S)``.

    Examples:
        >>> import torch
        >>> from attnkit.viz.plot import heatmap
        >>> fig = heatmap(torch.softmax(torch.randn(3, 3), -1), ["猫", "sat", "down"])
        >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
        ['猫', 'sat', 'down']
    """
    w = _array(weights, "weights")
    if w.ndim != 2:
        raise fail("weights of shape (L, S)", f"{w.shape}", "weights[b, h] to pick one batch item and head")
    x = _check_tokens(x_tokens, w.shape[1], "x_tokens")
    if y_tokens is None and x is not None and w.shape[0] == w.shape[1]:
        y_tokens = x
    y = _check_tokens(y_tokens, w.shape[0], "y_tokens")
    with _style():
        size = figsize or (max(3.5, 0.32 * w.shape[1] + 2), max(3.0, 0.3 * w.shape[0] + 1.5))
        fig = Figure(figsize=size, layout="constrained")
        ax = fig.add_subplot()
        im = _draw_map(ax, w, x, y, cmap=cmap, vmin=vmin, vmax=vmax)
        if annotate:
            cut = (np.nanmax(w) + np.nanmin(w)) / 2
            for i in range(w.shape[0]):
                for j in range(w.shape[1]):
                    ax.text(
                        j,
                        i,
                        f"{w[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if w[i, j] > cut else "white",
                    )
        if title:
            ax.set_title(title)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        if colorbar:
            fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, save)


def _stack_array(stack: Any) -> np.ndarray:
    if isinstance(stack, Recording):
        stack = stack.stack()
    s = _array(stack, "stack")
    if s.ndim == 4:  # (layers, H, L, S): no batch
        s = s[:, None]
    if s.ndim != 5:
        raise fail("a stack of shape (layers, B, H, L, S) or (layers, H, L, S)", f"{s.shape}", "Recording.stack()")
    return s


def head_grid(
    stack: Any,
    tokens: Sequence[str] | None = None,
    *,
    key_tokens: Sequence[str] | None = None,
    batch: int = 0,
    layer_names: Sequence[str] | None = None,
    cmap: str = "viridis",
    cell: float = 1.5,
    save: str | Path | None = None,
) -> Figure:
    """A grid of attention maps: one row per layer, one column per head (drawn as tiles of one image: fast).

    Args:
        stack: ``(layers, B, H, L, S)`` (``Recording.stack()``), ``(layers, H, L, S)`` or a Recording.
        tokens: ``L`` query labels (and key labels when ``key_tokens`` is not given and ``L == S``); shown left of
            every row of maps and under the bottom row when they fit the cell (at least 3.5 pt each).
        batch: which batch item to draw.
        layer_names: row titles (default ``"layer 0"``, ...), written right of each row.
        cell: size of one map in inches.

    Shape:
        ``stack (layers, B, H, L, S)``.

    Examples:
        >>> import torch
        >>> from attnkit.viz.plot import head_grid
        >>> fig = head_grid(torch.softmax(torch.randn(2, 1, 3, 4, 4), -1), ["a", "b", "c", "d"])
        >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]          # tokens beside each of 2 layers
        ['a', 'b', 'c', 'd', 'a', 'b', 'c', 'd']
        >>> [t.get_text() for t in fig.axes[0].texts]                       # 3 head titles, 2 layer names
        ['head 0', 'head 1', 'head 2', 'layer 0', 'layer 1']
    """
    s = _stack_array(stack)
    n_layers, n_batch, n_heads, length, keys = s.shape
    if not -n_batch <= batch < n_batch:
        raise fail(f"batch in [0, {n_batch})", str(batch), "batch=0")
    q_tok = _check_tokens(tokens, length, "tokens")
    if key_tokens is None and q_tok is not None and length == keys:
        key_tokens = q_tok
    k_tok = _check_tokens(key_tokens, keys, "key_tokens")
    names = list(layer_names) if layer_names is not None else [f"layer {i}" for i in range(n_layers)]
    if len(names) != n_layers:
        raise fail(f"{n_layers} layer_names", f"{len(names)}", "layer_names=None")
    fontsize = min(9.0, 0.85 * 72 * cell / max(length, keys, 1))  # points per label that fit one cell
    show = fontsize >= 3.5
    gap = max(1, round(0.15 * max(length, keys)))
    tiles = np.full((n_layers * (length + gap) - gap, n_heads * (keys + gap) - gap), np.nan)
    for li in range(n_layers):
        for hi in range(n_heads):
            r, c = li * (length + gap), hi * (keys + gap)
            tiles[r : r + length, c : c + keys] = s[li, batch, hi]
    with _style():
        fig = Figure(figsize=(cell * n_heads * (1 + gap / keys) + 1.5, cell * n_layers * (1 + gap / length) + 1.0))
        ax = fig.add_subplot()
        colormap = matplotlib.colormaps[cmap].with_extremes(bad="white")
        vmax = float(s[:, batch].max()) if s.size else 1.0
        ax.imshow(tiles, cmap=colormap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        for spine in ax.spines.values():
            spine.set_visible(False)
        if show and q_tok is not None:
            pos = [li * (length + gap) + i for li in range(n_layers) for i in range(length)]
            ax.set_yticks(pos, q_tok * n_layers, fontsize=fontsize)
        else:
            ax.set_yticks([])
        if show and k_tok is not None:
            pos = [hi * (keys + gap) + j for hi in range(n_heads) for j in range(keys)]
            ax.set_xticks(pos, k_tok * n_heads, rotation=90, fontsize=fontsize)
        else:
            ax.set_xticks([])
        ax.tick_params(length=0, pad=1)
        for hi in range(n_heads):
            ax.text(hi * (keys + gap) + (keys - 1) / 2, -1.0, f"head {hi}", ha="center", va="bottom", fontsize=9)
        for li in range(n_layers):
            ax.text(
                tiles.shape[1] - 0.5 + gap / 2,
                li * (length + gap) + (length - 1) / 2,
                names[li],
                ha="left",
                va="center",
                rotation=270,
                fontsize=9,
            )
    return save_figure(fig, save)


def alignment(
    weights: Any,
    source_tokens: Sequence[str],
    target_tokens: Sequence[str],
    *,
    title: str | None = None,
    cmap: str = "gray",
    save: str | Path | None = None,
) -> Figure:
    """A seq2seq alignment: one row per target (output) token, one column per source token, source on top.

    Args:
        weights: ``(T, S)`` attention of each generated token over the source (rows sum to 1).
        source_tokens: ``S`` labels; target_tokens: ``T`` labels.

    Shape:
        ``weights (T, S)``.

    Examples:
        >>> import torch
        >>> from attnkit.viz.plot import alignment
        >>> fig = alignment(torch.eye(3), ["la", "maison", "bleue"], ["the", "blue", "house"])
        >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
        ['the', 'blue', 'house']
    """
    w = _array(weights, "weights")
    if w.ndim != 2:
        raise fail("weights of shape (T, S)", f"{w.shape}", "weights[b] or weights[b, h]")
    src = _check_tokens(source_tokens, w.shape[1], "source_tokens")
    tgt = _check_tokens(target_tokens, w.shape[0], "target_tokens")
    with _style():
        fig = Figure(
            figsize=(max(3.5, 0.35 * w.shape[1] + 1.5), max(3.0, 0.35 * w.shape[0] + 1.5)), layout="constrained"
        )
        ax = fig.add_subplot()
        _draw_map(ax, w, src, tgt, cmap=cmap, vmin=0.0, vmax=max(float(w.max()), 1e-12), top=True)
        ax.set_xlabel("source")
        ax.xaxis.set_label_position("top")
        ax.set_ylabel("target")
        if title:
            ax.set_title(title, pad=12)
    return save_figure(fig, save)


def _image_array(image: Any) -> np.ndarray:
    """``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with C in 1, 3, 4 -> ``(H, W)`` or ``(H, W, 3|4)`` in [0, 1]."""
    img = _array(image, "image")
    if img.ndim == 3 and img.shape[0] in (1, 3, 4) and img.shape[-1] not in (1, 3, 4):
        img = np.moveaxis(img, 0, -1)  # (C, H, W) -> (H, W, C)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (3, 4)):
        raise fail("an image (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4", f"{img.shape}", "image[0] for a batch")
    lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    if lo < 0.0 or hi > 1.0:  # uint8 or normalised input: stretch to [0, 1] for display
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return img


def _maps_array(maps: Any) -> np.ndarray:
    if isinstance(maps, (list, tuple)):
        maps = np.stack([_array(m, "maps").squeeze() for m in maps])
    m = _array(maps, "maps")
    if m.ndim == 4 and m.shape[1] == 1:  # (N, 1, h, w): spatial gates of a batch
        m = m[:, 0]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise fail("attention maps (h, w), (N, h, w) or (N, 1, h, w)", f"{m.shape}", "maps.view(N, h, w)")
    return m


def image_overlay(
    image: Any,
    maps: Any,
    *,
    titles: Sequence[str] | None = None,
    alpha: float = 0.55,
    cmap: str = "jet",
    show_image: bool = True,
    ncols: int | None = None,
    panel: float = 2.4,
    save: str | Path | None = None,
) -> Figure:
    """Attention maps over an image: spatial attention, CBAM spatial gates, or one map per caption word.

    Each map (any resolution ``h x w``, e.g. a 7x7 feature grid) is stretched over the whole image with bilinear
    interpolation and drawn in ``cmap`` with transparency ``alpha`` on top of the image.

    Args:
        image: ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` (C = 1, 3 or 4), floats in [0, 1] or any range
            (stretched), tensor or array.
        maps: ``(h, w)``, ``(N, h, w)``, ``(N, 1, h, w)`` or a list of ``(h, w)`` maps.
        titles: one title per map (e.g. the caption's words).
        show_image: add a first panel with the plain image.
        ncols: panels per row (default: up to 6).

    Shape:
        ``image (H, W[, C])``, ``maps (N, h, w)`` -> ``N (+1)`` panels.

    Examples:
        >>> import torch
        >>> from attnkit.viz.plot import image_overlay
        >>> fig = image_overlay(torch.rand(28, 28), torch.softmax(torch.randn(2, 49), -1).view(2, 7, 7),
        ...                     titles=["a", "seven"])
        >>> [ax.get_title() for ax in fig.axes]
        ['image', 'a', 'seven']
    """
    img = _image_array(image)
    m = _maps_array(maps)
    n = m.shape[0]
    if titles is not None and len(titles) != n:
        raise fail(f"{n} titles (one per map)", f"{len(titles)}", "titles=None")
    if not 0.0 <= alpha <= 1.0:
        raise fail("alpha in [0, 1]", repr(alpha), "alpha=0.55")
    panels = n + int(show_image)
    cols = ncols or min(panels, 6)
    rows = -(-panels // cols)
    height, width = img.shape[:2]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    with _style():
        fig = Figure(figsize=(panel * cols, panel * rows * height / width + 0.3 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        gray = "gray" if img.ndim == 2 else None
        k = 0
        if show_image:
            axes[0].imshow(img, cmap=gray, vmin=0, vmax=1)
            axes[0].set_title("image", fontsize=9)
            k = 1
        for i in range(n):
            ax = axes[k + i]
            ax.imshow(img, cmap=gray, vmin=0, vmax=1)
            ax.imshow(
                m[i],
                cmap=cmap,
                alpha=alpha,
                extent=extent,
                interpolation="bilinear",
                vmin=float(m[i].min()),
                vmax=float(m[i].max()) if m[i].max() > m[i].min() else None,
            )
            ax.set_title(titles[i] if titles is not None else f"map {i}", fontsize=9)
        for ax in axes:
            ax.set_axis_off()
    return save_figure(fig, save)


def glimpse_path(
    image: Any,
    locations: Any,
    *,
    size: int | Sequence[int] | None = None,
    scales: int = 1,
    coords: str = "normalized",
    title: str | None = None,
    color: str = "tab:red",
    save: str | Path | None = None,
) -> Figure:
    """Where a hard-attention (glimpse) model looked, in order: a numbered path with the glimpse patches.

    Args:
        image: ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``.
        locations: ``(T, 2)`` glimpse centres as ``(x, y)``. With ``coords="normalized"`` (the usual glimpse-network
            convention, as in ``torch.nn.functional.grid_sample`` with ``align_corners=False``) ``-1`` is the
            left / top edge and ``+1`` the right / bottom edge; with ``coords="pixels"`` they are column and row.
        size: side of the smallest glimpse patch in pixels (int, or one per step); ``None`` draws no patches.
        scales: number of nested patches per glimpse, each twice the side of the previous (the retina).

    Shape:
        ``locations (T, 2)``.

    Examples:
        >>> import torch
        >>> from attnkit.viz.plot import glimpse_path
        >>> fig = glimpse_path(torch.rand(28, 28), torch.tensor([[0.0, 0.0], [0.5, -0.5]]), size=8, scales=2)
        >>> len(fig.axes[0].patches)                          # 2 glimpses x 2 scales
        4
    """
    img = _image_array(image)
    loc = _array(locations, "locations")
    if loc.ndim != 2 or loc.shape[1] != 2:
        raise fail("locations of shape (T, 2) as (x, y)", f"{loc.shape}", "locations[b] for one batch item")
    if coords not in ("normalized", "pixels"):
        raise fail('coords "normalized" or "pixels"', repr(coords), 'coords="normalized"')
    if not (isinstance(scales, int) and scales >= 1):
        raise fail("scales as an int >= 1", repr(scales), "scales=1")
    height, width = img.shape[:2]
    if coords == "normalized":
        xs = (loc[:, 0] + 1) / 2 * width - 0.5
        ys = (loc[:, 1] + 1) / 2 * height - 0.5
    else:
        xs, ys = loc[:, 0], loc[:, 1]
    steps = loc.shape[0]
    sizes: list[int] | None
    if size is None:
        sizes = None
    elif isinstance(size, int):
        sizes = [size] * steps
    else:
        sizes = [int(s) for s in size]
        if len(sizes) != steps:
            raise fail(f"{steps} sizes (one per glimpse)", f"{len(sizes)}", "size=8")
    with _style():
        fig = Figure(figsize=(4.2, 4.2 * height / width + 0.4), layout="constrained")
        ax = fig.add_subplot()
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        fade = np.linspace(0.35, 1.0, steps) if steps > 1 else np.ones(1)
        if sizes is not None:
            for t in range(steps):
                for s in range(scales):
                    side = sizes[t] * 2**s
                    ax.add_patch(
                        Rectangle(
                            (xs[t] - side / 2, ys[t] - side / 2),
                            side,
                            side,
                            fill=False,
                            edgecolor=color,
                            linewidth=1.2,
                            alpha=float(fade[t]) / (1 + s),
                        )
                    )
        ax.plot(xs, ys, "-", color=color, linewidth=1.5, alpha=0.8)
        for t in range(steps - 1):
            ax.annotate(
                "",
                xy=(xs[t + 1], ys[t + 1]),
                xytext=(xs[t], ys[t]),
                arrowprops={"arrowstyle": "->", "color": color, "lw": 1.5},
            )
        ax.scatter(xs, ys, s=70, c=color, edgecolors="white", zorder=3)
        for t in range(steps):
            ax.text(xs[t], ys[t], str(t + 1), color="white", fontsize=7, ha="center", va="center", zorder=4)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_axis_off()
        if title:
            ax.set_title(title)
    return save_figure(fig, save)


def _gate_vector(gates: Any, batch: int) -> np.ndarray:
    g = _array(gates, "gates")
    if g.ndim == 4:
        if g.shape[2:] != (1, 1):
            raise fail("channel gates (B, C, 1, 1)", f"{g.shape}", "image_overlay(image, gate[:, 0]) for spatial gates")
        g = g[:, :, 0, 0]
    if g.ndim == 2:
        if not -g.shape[0] <= batch < g.shape[0]:
            raise fail(f"batch in [0, {g.shape[0]})", str(batch), "batch=0")
        g = g[batch]
    if g.ndim != 1:
        raise fail("gates of shape (C,), (B, C) or (B, C, 1, 1)", f"{g.shape}", "gates.view(B, C)")
    return g


def channel_gate_bars(
    gates: Any,
    *,
    batch: int = 0,
    sort: bool = False,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Channel gates (SE / ECA / CBAM channel attention) as bars in [0, 1], one panel per block.

    Args:
        gates: one block's gates ``(C,)``, ``(B, C)`` or ``(B, C, 1, 1)`` (tensor, array or channel
            :class:`AttentionRecord`), or several blocks as a ``{name: gates}`` mapping, a list of records, or a
            :class:`Recording` (its channel gates are used).
        batch: which batch item to draw.
        sort: sort channels by gate value (largest first).
        labels: channel names for one block (default: channel indices).

    Shape:
        ``(B, C, 1, 1)`` per block.

    Examples:
        >>> import torch
        >>> from attnkit.viz.plot import channel_gate_bars
        >>> fig = channel_gate_bars({"se1": torch.rand(2, 8, 1, 1), "se2": torch.rand(2, 16, 1, 1)})
        >>> [ax.get_title() for ax in fig.axes], len(fig.axes[1].patches)
        (['se1', 'se2'], 16)
    """
    blocks: list[tuple[str, np.ndarray]]
    if isinstance(gates, Recording):
        gates = [r for r in gates.gates() if r.kind == "channel"]
        if not gates:
            raise fail("a recording with channel gates", "none", "capture(model) around a model with SE / CBAM blocks")
    if isinstance(gates, Mapping):
        blocks = [(str(k), _gate_vector(v, batch)) for k, v in gates.items()]
    elif isinstance(gates, (list, tuple)) and gates and all(isinstance(r, AttentionRecord) for r in gates):
        blocks = [(f"{r.name} #{r.call}" if r.call else r.name, _gate_vector(r.tensor, batch)) for r in gates]
    else:
        blocks = [(title or "channel gates", _gate_vector(gates, batch))]
    if labels is not None and (len(blocks) != 1 or len(labels) != len(blocks[0][1])):
        raise fail(
            "labels for one block, one per channel", f"{len(labels)} labels for {len(blocks)} block(s)", "labels=None"
        )
    with _style():
        widest = max(len(v) for _, v in blocks)
        fig = Figure(figsize=(max(4.0, min(14.0, 0.12 * widest + 2)), 1.9 * len(blocks) + 0.4), layout="constrained")
        axes = fig.subplots(len(blocks), 1, squeeze=False)[:, 0]
        for ax, (name, g) in zip(axes, blocks, strict=True):
            order = np.argsort(-g, kind="stable") if sort else np.arange(len(g))
            ax.bar(range(len(g)), g[order], color="tab:blue", width=0.85)
            ax.axhline(float(g.mean()), color="tab:orange", linewidth=1, label=f"mean {g.mean():.2f}")
            ax.set_ylim(0, 1)
            ax.set_xlim(-0.6, len(g) - 0.4)
            ax.set_title(name, fontsize=9)
            ax.set_ylabel("gate")
            ax.legend(loc="upper right", fontsize=7, frameon=False)
            if labels is not None:
                ax.set_xticks(range(len(g)), [labels[i] for i in order], rotation=90, fontsize=7)
            elif len(g) <= 32:
                ax.set_xticks(range(len(g)), [str(i) for i in order], fontsize=7)
            elif sort:
                ax.set_xticks([])  # positions are ranks, not channel indices: no misleading numbers
        axes[-1].set_xlabel("channel (sorted by gate)" if sort else "channel")
        if title and len(blocks) > 1:
            fig.suptitle(title)
    return save_figure(fig, save)


def token_bars(
    values: Any,
    tokens: Sequence[str],
    *,
    highlight: int | None = None,
    title: str | None = None,
    ylabel: str = "attention",
    save: str | Path | None = None,
) -> Figure:
    """One value per token as bars (e.g. a rollout row: how much each input token feeds one position).

    Shape:
        ``values (L,)``.

    Examples:
        >>> from attnkit.viz.plot import token_bars
        >>> fig = token_bars([0.1, 0.7, 0.2], ["我", "爱", "你"], highlight=1)
        >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
        ['我', '爱', '你']
    """
    v = _array(values, "values")
    if v.ndim != 1:
        raise fail("values of shape (L,)", f"{v.shape}", "values[b, i] for one row")
    tok = _check_tokens(tokens, len(v), "tokens") or []
    with _style():
        fig = Figure(figsize=(max(4.0, 0.35 * len(v) + 1.5), 2.8), layout="constrained")
        ax = fig.add_subplot()
        colors = ["tab:orange" if i == highlight else "tab:blue" for i in range(len(v))]
        ax.bar(range(len(v)), v, color=colors)
        ax.set_xticks(range(len(v)), tok, rotation=90, fontsize=_label_size(len(v)))
        ax.set_xlim(-0.6, len(v) - 0.4)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
    return save_figure(fig, save)
