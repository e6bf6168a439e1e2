"""Tour section for long sequences: the sliding-window, block-sparse and chunked kernels against their peers.

It runs the ``long`` benchmark's quick sizes (the full one, ``python -m attnkit.bench long``, takes many minutes
and is reported in docs/long.md), with its exact-mask rows (sliding window, packed documents, a user ``mask_mod``),
and shows which backend the dispatcher picks for each structured mask.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from attnkit.functional import (
    AttentionMask,
    BlockedWindowMask,
    CausalMask,
    DocumentMask,
    SinkMask,
    SlidingWindowMask,
    which_backend,
)
from attnkit.tasks.report import Section


def _dispatch_rows() -> list[list[str]]:
    q = torch.randn(1, 2, 1024, 64)
    rows = [["mask", "backend chosen by auto"]]
    masks: dict[str, AttentionMask | Callable[..., torch.Tensor]] = {
        "CausalMask()": CausalMask(),
        "BlockedWindowMask(128)": BlockedWindowMask(128),
        "SlidingWindowMask(128)": SlidingWindowMask(128),
        "SlidingWindowMask(128) | SinkMask(4)": SlidingWindowMask(128) | SinkMask(4),
        "DocumentMask(ids) & CausalMask()": DocumentMask(torch.arange(1024) // 256) & CausalMask(),
        "mask_mod: lambda b, h, q, kv: q >= kv": lambda b, h, q, kv: q >= kv,
    }
    for name, mask in masks.items():
        rows.append([name, which_backend(q, q, q, mask).name])
    return rows


def tour_section(out_dir: Path, quick: bool) -> Section:
    from attnkit.bench import long as bench_long

    folder = out_dir / "long"
    bench_long.main(quick=True, out=str(folder))
    tables = []
    for stem in ("long_times", "long_ratios", "long_block_sparse", "long_chunked_memory", "long_masks",
                 "long_masks_ratios", "long_masks_compile"):
        path = folder / f"{stem}.json"
        if path.exists():
            t = json.loads(path.read_text(encoding="utf-8"))
            tables.append([t["columns"], *t["rows"]])
    images = [str((folder / "long.png").relative_to(out_dir))] if (folder / "long.png").exists() else []
    summary = ("Exact local attention costs O(N·w): the sliding-window kernel against dense masked SDPA and the "
               "local-attention package, then exact masks (sliding window, packed documents, a user mask_mod) on "
               "the native block engine, at the benchmark's quick sizes (the full sizes are in docs/long.md).")
    return Section("Long sequences: local, block-sparse and chunked kernels", summary, table=_dispatch_rows(),
                   more_tables=tables, images=images,
                   links=[("long-sequence bench (markdown)", str((folder / "long.md").relative_to(out_dir)))])
