"""Ring attention refuses mismatched calls on every rank with the same ValueError (no gloo abort)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnkit.distributed import ring

pytestmark = pytest.mark.distributed


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = 8 if rank == 0 else 12  # a different local length on each rank
        q = k = v = torch.randn(1, 2, n, 8)
        try:
            ring.ring_attention(q, k, v, zigzag=False)
            message = "no error"
        except ValueError as err:
            message = f"ValueError: {err}"
        Path(out_dir, f"rank{rank}.txt").write_text(message, encoding="utf-8")
    finally:
        dist.destroy_process_group()


def test_mismatched_local_lengths_raise_on_every_rank(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, ring.free_port(), str(tmp_path)), nprocs=2, join=True)
    messages = [(tmp_path / f"rank{r}.txt").read_text(encoding="utf-8") for r in range(2)]
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("ValueError") and "local length: rank 0 8, rank 1 12" in messages[0]
    assert os.linesep not in messages[0]
