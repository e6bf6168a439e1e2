"""Large fresh CPU buffers on transparent huge pages: the outputs, weights and gradients the kernels allocate.

A fresh buffer is touched once per 4 KiB page on its first write, and on a small CPU those page faults cost a
visible share of a kernel (about as much as the softmax for an ``L x S`` weights buffer, 5 % of the native window
kernel's forward at N=16384 for its output). Asking Linux for 2 MiB pages before the first write (what PyTorch's
allocator does itself under ``THP_MEM_ALLOC_ENABLE=1``) removes most of them. The hint changes no value, and is
skipped where the kernel does not leave huge pages to the program (``transparent_hugepage`` not ``madvise``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["fresh_buffer"]

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _thp_madvise() -> Callable[[int, int], Any] | None:
    """``madvise(addr, len, MADV_HUGEPAGE)`` where Linux leaves transparent huge pages to the program, else None."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            if "[madvise]" not in f.read():
                return None
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return lambda addr, length: libc.madvise(addr, length, _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        return None


_MADVISE = _thp_madvise()


def fresh_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty(shape)``, backed by huge pages when it is a CPU buffer of 8 MiB or more on Linux."""
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if _MADVISE is not None and out.device.type == "cpu" and nbytes >= 4 * _HUGE_PAGE:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # first 2 MiB boundary inside the buffer
        stop = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if stop > start:
            _MADVISE(start, stop - start)
    return out
