"""An offline, self-contained, interactive attention viewer: one HTML file with inline CSS and JavaScript.

:func:`to_html` writes a page with two views of the same maps, redrawn when a selector changes:

* **head view**: the tokens in two columns, a line from query ``i`` (left) to key ``j`` (right) whose opacity is
  the weight; hover a token to keep only its lines;
* **heatmap**: the ``L x S`` map as coloured cells (hover a cell for its value).

Selectors pick the layer, the head (or the mean of the heads) and, for a batch, the item. No CDN, no network: the
file works offline and inside Jupyter (:class:`AttentionView` has ``_repr_html_``).

Token text is never parsed as HTML: the data travel in a ``<script type="application/json">`` block with ``<``,
``>`` and ``&`` escaped, and the script writes tokens with ``textContent`` only. A token such as
``<img src=x onerror=alert(1)>`` shows as that text and runs nothing.
"""

from __future__ import annotations

import html
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnkit._errors import fail

from .capture import AttentionRecord, Recording

__all__ = ["AttentionView", "to_html"]

_CSS = """
.attnkit-view{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans","Noto Sans CJK SC",sans-serif;
  color:#1f2430;font-size:13px;max-width:100%}
.attnkit-view h3{margin:4px 0 8px;font-size:15px}
.attnkit-view .ak-controls{display:flex;gap:14px;flex-wrap:wrap;align-items:center;margin-bottom:8px}
.attnkit-view label{display:flex;gap:5px;align-items:center}
.attnkit-view select{font-size:13px;padding:1px 4px}
.attnkit-view .ak-panes{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.attnkit-view .ak-pane{border:1px solid #dde1e8;border-radius:6px;padding:6px;background:#fff}
.attnkit-view .ak-pane-title{font-weight:600;margin:0 0 4px 4px}
.attnkit-view svg text{font-size:12px;fill:#1f2430;cursor:default;white-space:pre}
.attnkit-view svg text.ak-focus{font-weight:700;fill:#c2410c}
.attnkit-view .ak-note{color:#5b6270;font-size:12px;margin-top:6px}
"""

# The viewer. It reads its data from the JSON block next to it and writes every token with textContent.
_JS = r"""
(function () {
  "use strict";
  var ID = "__ID__";
  var root = document.getElementById(ID);
  if (!root) { return; }
  var data = JSON.parse(document.getElementById(ID + "-data").textContent);
  var SVG = "http://www.w3.org/2000/svg";
  var state = {layer: 0, head: 0, batch: 0, focus: null};
  var nHeads = data.heads;

  function el(tag, attrs, parent) {
    var node = document.createElementNS(SVG, tag);
    for (var k in attrs) { node.setAttribute(k, String(attrs[k])); }
    if (parent) { parent.appendChild(node); }
    return node;
  }
  function text(parent, x, y, value, anchor, cls) {
    var t = el("text", {x: x, y: y, "text-anchor": anchor, "dominant-baseline": "middle"}, parent);
    t.textContent = value;
    if (cls) { t.setAttribute("class", cls); }
    return t;
  }
  function option(select, value, label) {
    var o = document.createElement("option");
    o.value = String(value);
    o.textContent = label;
    select.appendChild(o);
  }
  function control(parent, label, name) {
    var wrap = document.createElement("label");
    var span = document.createElement("span");
    span.textContent = label;
    var select = document.createElement("select");
    select.setAttribute("data-role", name);
    wrap.appendChild(span);
    wrap.appendChild(select);
    parent.appendChild(wrap);
    return select;
  }
  function currentMap() {
    var heads = data.weights[state.layer][state.batch];
    if (state.head >= 0) { return heads[state.head]; }
    var L = heads[0].length, S = heads[0][0].length, out = [];
    for (var i = 0; i < L; i++) {
      var row = [];
      for (var j = 0; j < S; j++) {
        var s = 0;
        for (var h = 0; h < heads.length; h++) { s += heads[h][i][j]; }
        row.push(s / heads.length);
      }
      out.push(row);
    }
    return out;
  }
  function tokens() { return data.tokens[state.batch]; }
  function keyTokens() { return data.key_tokens[state.batch]; }
  function textWidth(list) {
    var m = 0;
    for (var i = 0; i < list.length; i++) { m = Math.max(m, String(list[i]).length); }
    return Math.min(220, 14 + 7.5 * m);
  }

  var title = document.createElement("h3");
  title.textContent = data.title;
  root.appendChild(title);
  var controls = document.createElement("div");
  controls.className = "ak-controls";
  root.appendChild(controls);
  var layerSel = control(controls, "Layer", "layer");
  for (var l = 0; l < data.layer_names.length; l++) { option(layerSel, l, data.layer_names[l]); }
  var headSel = control(controls, "Head", "head");
  for (var h = 0; h < nHeads; h++) { option(headSel, h, data.head_names[h]); }
  if (nHeads > 1) { option(headSel, -1, "mean of heads"); }
  var batchSel = control(controls, "Item", "batch");
  for (var b = 0; b < data.batch; b++) { option(batchSel, b, String(b)); }
  if (data.batch < 2) { batchSel.parentNode.style.display = "none"; }
  var panes = document.createElement("div");
  panes.className = "ak-panes";
  root.appendChild(panes);
  function pane(name) {
    var div = document.createElement("div");
    div.className = "ak-pane";
    var t = document.createElement("div");
    t.className = "ak-pane-title";
    t.textContent = name;
    div.appendChild(t);
    panes.appendChild(div);
    return div;
  }
  var linesPane = pane("Head view");
  var heatPane = pane("Heatmap");
  var note = document.createElement("div");
  note.className = "ak-note";
  note.textContent = "Rows: queries (left); columns: keys (right). Hover a token to focus it.";
  root.appendChild(note);

  function drawLines() {
    while (linesPane.childNodes.length > 1) { linesPane.removeChild(linesPane.lastChild); }
    var w = currentMap(), q = tokens(), k = keyTokens();
    var left = textWidth(q), right = textWidth(k), gap = 150, row = 20;
    var height = row * Math.max(q.length, k.length) + 10;
    var svg = el("svg", {width: left + gap + right, height: height, "data-view": "lines",
      "data-layer": state.layer, "data-head": state.head, "data-batch": state.batch}, linesPane);
    var x0 = left, x1 = left + gap;
    var lines = el("g", {}, svg);
    for (var i = 0; i < q.length; i++) {
      for (var j = 0; j < k.length; j++) {
        var v = w[i][j];
        if (v < 0.01) { continue; }
        var ln = el("line", {x1: x0 + 4, y1: 10 + i * row, x2: x1 - 4, y2: 10 + j * row, stroke: "#2563eb",
          "stroke-width": 2, "stroke-opacity": v.toFixed(4), "data-q": i, "data-k": j}, lines);
        if (state.focus && !((state.focus[0] === "q" && state.focus[1] === i) ||
                             (state.focus[0] === "k" && state.focus[1] === j))) {
          ln.setAttribute("visibility", "hidden");
        }
      }
    }
    function hover(node, side, index) {
      node.addEventListener("mouseenter", function () { state.focus = [side, index]; drawLines(); });
      node.addEventListener("mouseleave", function () { state.focus = null; drawLines(); });
    }
    for (var a = 0; a < q.length; a++) {
      var on = state.focus && state.focus[0] === "q" && state.focus[1] === a;
      hover(text(svg, x0 - 4, 10 + a * row, q[a], "end", on ? "ak-focus ak-query" : "ak-query"), "q", a);
    }
    for (var c = 0; c < k.length; c++) {
      var onk = state.focus && state.focus[0] === "k" && state.focus[1] === c;
      hover(text(svg, x1 + 4, 10 + c * row, k[c], "start", onk ? "ak-focus ak-key" : "ak-key"), "k", c);
    }
  }

  function drawHeat() {
    while (heatPane.childNodes.length > 1) { heatPane.removeChild(heatPane.lastChild); }
    var w = currentMap(), q = tokens(), k = keyTokens();
    var cell = Math.max(6, Math.min(22, Math.floor(520 / Math.max(q.length, k.length))));
    var left = textWidth(q), top = textWidth(k);
    var max = 1e-12;
    for (var i = 0; i < q.length; i++) { for (var j = 0; j < k.length; j++) { max = Math.max(max, w[i][j]); } }
    var svg = el("svg", {width: left + cell * k.length + 6, height: top + cell * q.length + 6, "data-view": "heatmap",
      "data-layer": state.layer, "data-head": state.head, "data-batch": state.batch}, heatPane);
    for (var a = 0; a < q.length; a++) { text(svg, left - 4, top + a * cell + cell / 2, q[a], "end", "ak-query"); }
    for (var c = 0; c < k.length; c++) {
      var t = text(svg, 0, 0, k[c], "start", "ak-key");
      t.setAttribute("transform", "translate(" + (left + c * cell + cell / 2) + "," + (top - 4) + ") rotate(-90)");
    }
    for (var r = 0; r < q.length; r++) {
      for (var s = 0; s < k.length; s++) {
        var rect = el("rect", {x: left + s * cell, y: top + r * cell, width: cell - 1, height: cell - 1,
          fill: "#2563eb", "fill-opacity": (0.04 + 0.96 * w[r][s] / max).toFixed(4), "data-w": w[r][s].toFixed(4)},
          svg);
        var tip = el("title", {}, rect);
        tip.textContent = q[r] + " \u2192 " + k[s] + ": " + w[r][s].toFixed(3);
      }
    }
  }

  function redraw() { drawLines(); drawHeat(); }
  layerSel.addEventListener("change", function () { state.layer = +layerSel.value; redraw(); });
  headSel.addEventListener("change", function () { state.head = +headSel.value; redraw(); });
  batchSel.addEventListener("change", function () { state.batch = +batchSel.value; redraw(); });
  redraw();
  root.setAttribute("data-ready", "1");
})();
"""


def _json_for_script(value: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: no ``<``, ``>`` or ``&`` can end or open a tag."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class AttentionView:
    """An interactive attention viewer: ``save(path)`` writes the HTML file; shows inline in Jupyter.

    Build it with :func:`to_html`. ``html()`` is the whole page, ``fragment()`` the embeddable part.
    """

    def __init__(self, data: dict[str, Any], path: Path | None = None) -> None:
        self.data = data
        self.path = path

    def fragment(self, view_id: str | None = None) -> str:
        """The viewer as an HTML fragment (its own ``<style>``, data block and script)."""
        vid = view_id or f"attnkit-{uuid.uuid4().hex[:12]}"
        return (
            f"<style>{_CSS}</style>\n"
            f'<div class="attnkit-view" id="{vid}"></div>\n'
            f'<script type="application/json" id="{vid}-data">{_json_for_script(self.data)}</script>\n'
            f"<script>{_JS.replace('__ID__', vid)}</script>"
        )

    def html(self) -> str:
        """A complete, self-contained HTML page (no external resources)."""
        title = html.escape(self.data["title"])
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title}</title>\n</head>\n<body>\n{self.fragment('attnkit-view')}\n</body>\n</html>\n"
        )

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (folders are created) and return the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.html(), encoding="utf-8")
        self.path = p
        return p

    def _repr_html_(self) -> str:
        return self.fragment()

    def __repr__(self) -> str:
        d = self.data
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"AttentionView(layers={len(d['layer_names'])}, batch={d['batch']}, heads={d['heads']}{where})"


def _head_names(record: AttentionRecord, heads: int) -> list[str] | None:
    if record.reduce == "mean":
        return ["mean of heads"] if heads == 1 else None
    if record.heads is not None and len(record.heads) == heads:
        return [f"head {h}" for h in record.heads]
    return None


def _as_stack(attentions: Any) -> tuple[Tensor, list[str] | None, list[str] | None]:
    """-> (layers, B, H, L, S) float tensor, default layer names, default head names."""
    if isinstance(attentions, Recording):
        stack = attentions.stack()  # one call per layer (its error says how to pick a call otherwise)
        recs = attentions.attention()
        names = list(dict.fromkeys(r.name for r in recs))
        return stack.float(), names if len(names) == stack.shape[0] else None, _head_names(recs[0], stack.shape[2])
    if isinstance(attentions, AttentionRecord):
        if attentions.kind != "attention":
            raise fail("an attention record", f"a {attentions.kind} gate", "plot.channel_gate_bars for gates")
        stack = attentions.dense()[None].float()
        return stack, [attentions.name or "attention"], _head_names(attentions, stack.shape[2])
    if hasattr(attentions, "__array__") and not isinstance(attentions, Tensor):
        attentions = torch.as_tensor(attentions)
    if not isinstance(attentions, Tensor):
        raise fail(
            "a Recording, an AttentionRecord, or a tensor / array of weights",
            type(attentions).__name__,
            "to_html(rec, tokens) inside or after `with capture(model) as rec`",
        )
    t = attentions.detach().float().cpu()
    while t.dim() < 5:
        t = t.unsqueeze(0)  # (L, S) -> (1, 1, 1, L, S), (H, L, S) -> (1, 1, H, L, S), (B, H, L, S) -> (1, B, ...)
    if t.dim() != 5:
        raise fail(
            "weights (layers, B, H, L, S), (B, H, L, S), (H, L, S) or (L, S)",
            f"{tuple(attentions.shape)}",
            "Recording.stack()",
        )
    return t, None, None


def _batch_tokens(tokens: Any, batch: int, length: int, what: str) -> list[list[str]]:
    if tokens is None or isinstance(tokens, str):
        raise fail(f"`{what}` as a list of strings (or one list per batch item)", repr(tokens), f"{what}=['a', 'b']")
    items = list(tokens)
    per_item = bool(items) and all(isinstance(t, (list, tuple)) for t in items)
    lists = [list(map(str, t)) for t in items] if per_item else [list(map(str, items))] * batch
    if len(lists) != batch:
        raise fail(f"one token list per batch item ({batch})", f"{len(lists)}", f"a list of {batch} lists")
    for b, lst in enumerate(lists):
        if len(lst) != length:
            raise fail(
                f"{length} {what} (one per position)",
                f"{len(lst)} for item {b}",
                "padding tokens such as '[PAD]' for padded positions",
            )
    return lists


def to_html(
    attentions: Any,
    tokens: Sequence[str] | Sequence[Sequence[str]],
    path: str | Path | None = None,
    *,
    key_tokens: Sequence[str] | Sequence[Sequence[str]] | None = None,
    layer_names: Sequence[str] | None = None,
    title: str = "attnkit attention viewer",
    decimals: int = 4,
) -> AttentionView:
    """Build (and with ``path``, write) an offline interactive viewer of attention maps.

    Args:
        attentions: a :class:`~attnkit.viz.Recording` (its attention records, stacked), one
            :class:`~attnkit.viz.AttentionRecord`, or weights ``(layers, B, H, L, S)``, ``(B, H, L, S)``,
            ``(H, L, S)`` or ``(L, S)`` (tensor or array).
        tokens: ``L`` query tokens, or one list per batch item.
        path: where to write the ``.html`` file (optional; ``view.save(path)`` later works too).
        key_tokens: ``S`` key tokens for cross-attention (default: ``tokens``).
        layer_names: one name per layer for the selector (default: the recorded module names or ``"layer i"``).
        title: heading of the page (escaped).
        decimals: weights are rounded to this many decimals in the file (size).

    Returns:
        an :class:`AttentionView` (``.path`` is set when written).

    Shape:
        ``(layers, B, H, L, S)``; tokens ``L`` (or ``B`` lists of ``L``).

    Example:
        >>> import torch
        >>> from attnkit.viz import to_html
        >>> maps = torch.softmax(torch.randn(2, 1, 4, 3, 3), -1)       # (layers, B, H, L, S)
        >>> view = to_html(maps, ["<b>", "cat", "猫"])
        >>> view
        AttentionView(layers=2, batch=1, heads=4)
        >>> "<b>" in view.html(), r"\\u003cb\\u003e" in view.html()   # the token is escaped, not markup
        (False, True)
    """
    stack, default_names, head_names = _as_stack(attentions)
    n_layers, batch, heads, length, keys = stack.shape
    if n_layers == 0 or batch == 0 or heads == 0:
        raise fail("at least one layer, batch item and head", f"{tuple(stack.shape)}", "a non-empty capture")
    q_tokens = _batch_tokens(tokens, batch, length, "tokens")
    if key_tokens is None:
        if keys != length:
            raise fail(f"key_tokens for the {keys} keys (cross-attention)", "none", "key_tokens=source_tokens")
        k_tokens = q_tokens
    else:
        k_tokens = _batch_tokens(key_tokens, batch, keys, "key_tokens")
    names = list(layer_names) if layer_names is not None else default_names or [f"layer {i}" for i in range(n_layers)]
    if len(names) != n_layers:
        raise fail(f"{n_layers} layer_names", f"{len(names)}", "layer_names=None")
    if not torch.isfinite(stack).all():
        raise fail("finite attention weights", "NaN or inf", "checking the model's masks (fully masked rows give 0)")
    if not (isinstance(decimals, int) and 1 <= decimals <= 8):
        raise fail("decimals in [1, 8]", repr(decimals), "decimals=4")
    data = {
        "title": str(title),
        "layer_names": [str(n) for n in names],
        "head_names": head_names or [f"head {h}" for h in range(heads)],
        "heads": heads,
        "batch": batch,
        "tokens": q_tokens,
        "key_tokens": k_tokens,
        "weights": stack.double().round(decimals=decimals).tolist(),  # float64: short reprs in the JSON
    }
    view = AttentionView(data)
    if path is not None:
        view.save(path)
    return view
