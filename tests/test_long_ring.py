"""Ring attention over a local gloo group (2 and 4 spawned processes) against single-process attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from attnkit.distributed import ring, split_sequence

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world, full", [(2, True), (4, False)], ids=["2 ranks, 8 cases", "4 ranks, 2 cases"])
def test_ring_attention_equals_single_process(world: int, full: bool, tmp_path: Path) -> None:
    """Forward and gradients, causal or not, zig-zag or contiguous, MHA and GQA, in float32 within 1e-5."""
    args = (world, ring.free_port(), torch.float32, str(tmp_path), full)
    mp.spawn(ring.check_worker, args=args, nprocs=world, join=True)
    errors = [float((tmp_path / f"rank{r}.txt").read_text()) for r in range(world)]
    assert len(errors) == world and max(errors) < 1e-5


def test_zigzag_split_round_trip_and_errors() -> None:
    x = torch.arange(24).view(1, 1, 24, 1)
    for zigzag in (True, False):
        pieces = [split_sequence(x, r, 3, zigzag=zigzag) for r in range(3)]
        assert torch.equal(ring._unsplit(pieces, zigzag=zigzag, dim=2), x)
    assert split_sequence(x, 0, 3).flatten().tolist() == [0, 1, 2, 3, 20, 21, 22, 23]
    with pytest.raises(ValueError, match="divisible by 8"):
        split_sequence(x[:, :, :20], 0, 4)
    with pytest.raises(ValueError, match="process group"):
        ring.ring_attention(x.float(), x.float(), x.float())
