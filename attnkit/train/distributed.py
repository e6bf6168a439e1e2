"""Helpers for DistributedDataParallel training started by ``torchrun`` (gloo on CPU, NCCL on GPUs).

``torchrun --nproc-per-node N -m attnkit translate train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`setup` reads them, joins the process group and picks the device. Without them everything runs in one
process and every helper here is a no-op.

Example:
    >>> from attnkit.train.distributed import world
    >>> world().size, world().rank, world().is_main                  # one process, no torchrun
    (1, 0, True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "all_reduce_sum", "any_flag", "barrier", "cleanup", "setup", "world"]


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank, how many processes, and its device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_WORLD = World()


def world() -> World:
    """The :class:`World` set by :func:`setup` (one CPU process before it)."""
    return _WORLD


def setup(device: str = "auto") -> World:
    """Join the process group when started by ``torchrun`` and choose the device.

    Args:
        device: ``"auto"`` (a GPU per rank if there are GPUs, else CPU), ``"cpu"`` or ``"cuda"``.
    """
    global _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("expected a CUDA device for --device cuda, got none; try --device cpu")
    dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=size)
    _WORLD = World(rank=rank, size=size, local_rank=local, device=dev)
    return _WORLD


def cleanup() -> None:
    """Leave the process group (if any) and go back to one process."""
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all processes (``x`` itself in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def any_flag(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks stop at the same step)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_WORLD.device)
    return bool(all_reduce_sum(t).item() > 0)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
