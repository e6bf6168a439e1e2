"""A short walk through the dense kernels: the tutorial API, every mask kind, the dispatcher and its bench table.

Used by the tour (``tour_section``); ``python -m attnkit.tasks.kernels --out DIR`` runs it alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict, cast

import torch
from torch import Tensor

from attnkit._table import format_table
from attnkit.functional import AttentionMask, CausalMask, PaddingMask, scaled_dot_product_attention, which_backend
from attnkit.tasks.report import Section


def mask_gallery() -> dict[str, torch.Tensor]:
    """Weights ``(L, S)`` of one head under each mask kind, on fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 6, 16, generator=g)  # (B, H, L, E)
    k = torch.randn(1, 1, 8, 16, generator=g)  # (B, H, S, E)
    v = torch.randn(1, 1, 8, 16, generator=g)
    masks = {
        "no mask": None,
        "key padding (5 real keys)": PaddingMask(torch.tensor([5])),
        "causal, upper-left": CausalMask("upper_left"),
        "causal, lower-right": CausalMask("lower_right"),
        "arbitrary boolean": torch.rand(6, 8, generator=g) > 0.4,
        "fully masked row 0": torch.ones(6, 8, dtype=torch.bool).index_fill_(0, torch.tensor([0]), False),
    }
    out = {}
    for name, mask in masks.items():
        _, w = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
        out[name] = w[0, 0]  # (L, S)
    return out


def plot_gallery(weights: dict[str, torch.Tensor], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(weights), figsize=(3 * len(weights), 3), constrained_layout=True)
    for ax, (name, w) in zip(axes, weights.items(), strict=True):
        ax.imshow(w.numpy(), cmap="viridis", vmin=0.0, vmax=max(float(w.max()), 1e-6))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    fig.suptitle("attention weights under each mask kind (True = may attend; dead rows are zero)")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


class _DispatchKwargs(TypedDict, total=False):
    """The keyword arguments of :func:`which_backend` that :func:`backend_table` varies."""

    attn_mask: Tensor | AttentionMask
    return_weights: bool


def backend_table() -> list[list[str]]:
    """Which backend ``auto`` picks for typical inputs."""
    q = torch.randn(1, 8, 256, 64)
    kv = torch.randn(1, 2, 256, 64)
    cases: dict[str, tuple[tuple[Tensor, Tensor, Tensor], _DispatchKwargs]] = {
        "no mask": ((q, q, q), {}),
        "CausalMask()": ((q, q, q), {"attn_mask": CausalMask()}),
        "boolean tensor mask": ((q, q, q), {"attn_mask": torch.ones(256, 256, dtype=torch.bool)}),
        "return_weights=True": ((q, q, q), {"return_weights": True}),
        "GQA (H=8, Hkv=2)": ((q, kv, kv), {}),
    }
    rows = [["inputs", "backend"]]
    for name, (tensors, kw) in cases.items():
        rows.append([name, which_backend(*tensors, **kw).name])
    return rows


def tour_section(out_dir: Path, quick: bool) -> Section:
    folder = out_dir / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    # The tutorial's API, unchanged: 3-D tensors and a 0/1 mask whose zeros are masked.
    Q = K = V = torch.randn(2, 5, 8)  # (B, L, E)
    tutorial_mask = torch.ones(2, 5, 5, dtype=torch.long).tril()  # 0 = masked
    tutorial_out = cast(Tensor, scaled_dot_product_attention(Q, K, V, tutorial_mask))  # (B, L, E)
    gallery = plot_gallery(mask_gallery(), folder / "masks.png")
    rows = backend_table()
    print(format_table(rows))
    images = [str(gallery.relative_to(out_dir))]
    links: list[tuple[str, str]] = []
    more: list[list[list[str]]] = []
    summary = (f"The tutorial call scaled_dot_product_attention(Q, K, V, mask) on (B, L, E) = {tuple(Q.shape)} "
               f"returns {tuple(tutorial_out.shape)}. The picture shows the exact weights under each mask kind; "
               "the table shows which backend the dispatcher picks.")
    from attnkit.bench import dense as bench_dense

    bench_dense.main(quick=quick, out=str(folder))
    bench_json = folder / "dense.json"
    if bench_json.exists():
        table = json.loads(bench_json.read_text(encoding="utf-8"))
        more.append([table["columns"], *table["rows"]])
        links.append(("dense bench table (markdown)", str((folder / "dense.md").relative_to(out_dir))))
    return Section("Kernels: scaled dot-product attention", summary, table=rows, images=images, links=links,
                   more_tables=more)


def main(argv: list[str] | None = None) -> int:
    from attnkit._argtypes import ArgumentParser, output_dir

    p = ArgumentParser(prog="python -m attnkit.tasks.kernels", description=__doc__)
    p.add_argument("--out", type=output_dir, default="runs/kernels", help="output folder (default runs/kernels)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    section = tour_section(Path(args.out), args.quick)
    print(section.summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
