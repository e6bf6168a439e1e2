"""Sequence-parallel attention over ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Example:
    >>> import torch
    >>> from attnkit.distributed import split_sequence
    >>> split_sequence(torch.arange(8).view(1, 1, 8, 1), 1, 2, zigzag=False).flatten().tolist()
    [4, 5, 6, 7]
"""

from .ring import gather_sequence, ring_attention, split_sequence

__all__ = ["gather_sequence", "ring_attention", "split_sequence"]
