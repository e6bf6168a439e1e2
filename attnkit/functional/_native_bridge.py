"""The bridge from tensors to the native block kernel (``csrc/band.c``): float32 rows, the pattern of keys each
group of query rows reads (:class:`NativePattern`), the autograd function that runs the C forward and backward on
the thread pool (:class:`NativeBandFn`), and :func:`native_attention` for ``(B, H, L, E)`` inputs.

The sliding window (:mod:`attnkit.functional.local`), block-sparse attention (:mod:`attnkit.functional.sparse`) and
the mask engine (:mod:`attnkit.functional.masked`) each give it their own pattern.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _native
from ._memory import fresh_buffer
from ._threads import run_tasks, worker_count

__all__ = [
    "NativeBandFn", "NativePattern", "bucket_tasks", "native_attention", "native_call", "native_unsupported",
    "right_padding", "rows_f32", "run_pattern",
]


_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # computed in float32; float64 stays in PyTorch


def native_unsupported(q: Tensor, impl: str) -> str:
    """Why the native kernel (sliding window, block-sparse) cannot serve ``q`` (``""`` when it can)."""
    if impl == "torch":
        return "impl='torch'"
    if q.device.type != "cpu":
        return f"a {q.device.type} tensor (the native kernel is for CPU)"
    if q.dtype not in _NATIVE_DTYPES:
        return f"{q.dtype} inputs (the native kernel takes float32, bfloat16 and float16, computed in float32)"
    if _native.load() is None:
        return f"no native library ({_native.status()})"
    return ""


def rows_f32(x: Tensor, width: int) -> Tensor:
    """``(B, H, N, X) -> (B*H, N, width)`` float32, contiguous, zero columns after ``X`` (a view when it can be)."""
    b, h, n, d = x.shape
    x = x.to(torch.float32).reshape(b * h, n, d)
    return (F.pad(x, (0, width - d)) if width > d else x).contiguous()


def bucket_tasks(rows: int, nb: int, workers: int, per_worker: int = 2, least: int = 1) -> list[tuple[int, int, int]]:
    """``(row, b0, b1)`` tasks covering every bucket of every row once: whole rows, or rows cut into bucket ranges
    of at least ``least`` buckets when there are fewer rows than ``per_worker * workers`` (so that every thread keeps
    busy to the end)."""
    parts = 1 if workers <= 1 else max(1, min(nb // least, -(-per_worker * workers // rows)))
    cuts = [nb * i // parts for i in range(parts + 1)]
    return [(row, b0, b1) for row in range(rows) for b0, b1 in itertools.pairwise(cuts) if b1 > b0]


class NativePattern(Protocol):
    """Which keys each group of query rows reads, for the native kernel (``csrc/band.c``): the C entry points and
    their pattern arguments. The window pattern of :mod:`attnkit.functional.local` (buckets), the block-sparse
    pattern of :mod:`attnkit.functional.sparse` (query blocks over a layout) and the mask pattern of
    :mod:`attnkit.functional.masked` provide it."""

    @property
    def groups(self) -> int:
        """Query groups per row."""
        ...

    @property
    def fwd(self) -> str:
        """Name of the library's forward function."""
        ...

    @property
    def bwd(self) -> str:
        """Name of the library's backward function."""
        ...

    def args(self, row: int, kv_len: int, e: int, ev: int) -> tuple[object, ...]:
        """The C arguments between the tensor pointers and ``scale`` for ``row`` of ``B*H``."""
        ...

    def keys(self, row: int, g0: int, g1: int) -> tuple[int, int]:
        """The keys ``[key0, key1)`` the groups ``[g0, g1)`` of ``row`` may read (as the C code computes them)."""
        ...


#: run a whole forward's tasks on PyTorch's OpenMP threads where the pattern has a batched entry point (the mask
#: engine's ``attnkit_mask_fwd_tasks``); ``False``: on :func:`run_tasks`' threads (the tests compare both)
OPENMP_TASKS = True


def native_call(fn: Callable[..., int], *args: object) -> None:
    if fn(*args) != 0:  # -1: a tile buffer could not be allocated
        raise MemoryError("attnkit's native attention kernel could not allocate its tile buffers")


def run_pattern(lib: Any, pattern: NativePattern, batched: str | None, pointers: tuple[int, ...],
                shape: tuple[list[int], int, int | None, int], scale: float, isa: int, size: int,
                row_task: Callable[[int, int, int], None]) -> None:
    """Run one call of the native kernel over every row of ``pattern``: ``(row, g0, g1)`` tasks from
    :func:`bucket_tasks`, on PyTorch's own OpenMP threads through the batched entry point ``batched`` (threads of
    ours would share the cores with them while they spin after the operator before this one) where the pattern
    and the library have it and there is more than one worker, else ``row_task`` per task on :func:`run_tasks`'
    threads. ``pointers``: the tensor pointers the batched entry point takes first; ``shape``: the per-row key
    lengths, ``E``, ``Ev`` (``None``: the entry point takes no value width) and the heads per key/value head;
    ``size``: the elements of the work, for :func:`worker_count`."""
    lengths, e, ev, rep = shape
    workers = worker_count(size, None)
    if batched is not None and workers > 1 and OPENMP_TASKS and lib.attnkit_openmp():
        # many small tasks, pulled one at a time: a thread the VM stalls holds up less at the end (at N = 16384, 8
        # heads, 2 threads: 2-9 % faster than one task per row; docs/long.md). A task transposes the keys its
        # queries read, so ranges of a row cost a little more where their keys overlap (a window's look-back).
        tasks = bucket_tasks(len(lengths), pattern.groups, workers, per_worker=32, least=8)
        args, keep = cast(Any, pattern).task_args(lengths, e, ev, rep)
        spec = torch.tensor(tasks, dtype=torch.int64)
        native_call(getattr(lib, batched), *pointers, *args, scale, spec.data_ptr(), len(tasks), workers, isa)
        del keep, spec
    else:
        tasks = bucket_tasks(len(lengths), pattern.groups, workers)
        run_tasks([functools.partial(row_task, *t) for t in tasks], workers, torch_ops=False)


class NativeBandFn(torch.autograd.Function):
    """Attention over a :class:`NativePattern` on float32 rows with the C kernel (``csrc/band.c``), forward and
    backward: ``out (BH, Lq, Ev)`` and the log-sum-exp ``(BH, Lq)`` (no gradient).

    ``q (BH, Lq, E)``, ``k (BHkv, Lk, E)``, ``v (BHkv, Lk, Ev)`` (``E``, ``Ev`` multiples of 16; query row ``r``
    reads key/value row ``r // rep`` and its first ``lengths[r]`` keys only: right padding). The rows, or ranges of
    query groups of a row, run as tasks on :func:`run_tasks`' threads (the C calls release the GIL). The backward
    gives every query head its own key/value gradient rows (summed over the ``rep`` heads of a group at the end)
    and, when a row is cut into ranges, every range its own buffer.
    """

    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, rep, isa, lengths):  # type: ignore[no-untyped-def, override]
        lib = _native.load()
        fwd = getattr(lib, pattern.fwd)
        bh, n_q, e = q.shape
        n_k, ev = k.shape[1], v.shape[-1]
        out = fresh_buffer((bh, n_q, ev), q.dtype, q.device)  # huge pages: no 4 KiB page faults on the first write
        lse = q.new_empty(bh, n_q)
        fl = 4  # bytes per float32

        def task(row: int, g0: int, g1: int) -> None:
            kv = row // rep
            native_call(fwd, q.data_ptr() + row * n_q * e * fl, k.data_ptr() + kv * n_k * e * fl,
                         v.data_ptr() + kv * n_k * ev * fl, out.data_ptr() + row * n_q * ev * fl,
                         lse.data_ptr() + row * n_q * fl, *pattern.args(row, lengths[row], e, ev), scale, g0, g1,
                         isa)

        run_pattern(lib, pattern, getattr(pattern, "fwd_tasks", None),
                    (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr()), (lengths, e, ev, rep),
                    scale, isa, q.numel(), task)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern, ctx.scale, ctx.rep, ctx.isa, ctx.lengths = pattern, scale, rep, isa, lengths
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_lse):  # type: ignore[no-untyped-def, override]
        q, k, v, out, lse = ctx.saved_tensors
        pattern, scale, rep, isa, lengths = ctx.pattern, ctx.scale, ctx.rep, ctx.isa, ctx.lengths
        bwd = getattr(_native.load(), pattern.bwd)
        grad = grad_out.contiguous()
        bh, n_q, e = q.shape
        n_k, ev = k.shape[1], v.shape[-1]
        fl = 4
        dq = fresh_buffer(tuple(q.shape), q.dtype, q.device)
        workers = worker_count(q.numel(), None)
        tasks = bucket_tasks(bh, pattern.groups, workers)
        whole = len(tasks) == bh  # one task per row: it owns (and zeroes) the keys of that row it reads
        dk = fresh_buffer((bh, n_k, e), q.dtype, q.device) if whole else None
        dv = fresh_buffer((bh, n_k, ev), q.dtype, q.device) if whole else None

        def task(row: int, g0: int, g1: int) -> tuple[int, int, int, Tensor, Tensor]:
            kv = row // rep
            key0, key1 = pattern.keys(row, g0, g1)
            if dk is not None and dv is not None:
                dk_t, dv_t = dk[row, key0:key1], dv[row, key0:key1]
            else:
                dk_t, dv_t = q.new_empty(key1 - key0, e), q.new_empty(key1 - key0, ev)
            native_call(bwd, q.data_ptr() + row * n_q * e * fl, k.data_ptr() + kv * n_k * e * fl,
                         v.data_ptr() + kv * n_k * ev * fl, out.data_ptr() + row * n_q * ev * fl,
                         grad.data_ptr() + row * n_q * ev * fl, lse.data_ptr() + row * n_q * fl,
                         dq.data_ptr() + row * n_q * e * fl, dk_t.data_ptr(), dv_t.data_ptr(),
                         *pattern.args(row, lengths[row], e, ev), scale, g0, g1, isa)
            return row, key0, key1, dk_t, dv_t

        parts = run_tasks([functools.partial(task, *t) for t in tasks], workers, torch_ops=False)
        if dk is not None and dv is not None:  # whole rows: keys no query reads get zero gradients
            for row, key0, key1, _, _ in parts:
                for grads in (dk, dv):
                    grads[row, :key0] = 0.0
                    grads[row, key1:] = 0.0
        else:  # ranges of groups: sum the overlapping key rows of their buffers
            dk, dv = q.new_zeros(bh, n_k, e), q.new_zeros(bh, n_k, ev)
            for row, key0, key1, dk_t, dv_t in parts:
                dk[row, key0:key1] += dk_t
                dv[row, key0:key1] += dv_t
        if rep > 1:  # the query heads of a group share one key/value head
            dk = dk.view(bh // rep, rep, n_k, e).sum(1)
            dv = dv.view(bh // rep, rep, n_k, ev).sum(1)
        return dq, dk, dv, None, None, None, None, None


def native_attention(q: Tensor, k: Tensor, v: Tensor, pattern: NativePattern, scale: float, isa: int,
                     lengths: Tensor | None) -> Tensor:
    """``(B, H, L, E)`` inputs through :class:`NativeBandFn`: float32 rows, feature dims zero-padded to multiples of
    16, the output back in the input dtype. ``lengths (B,)``: real keys of each sequence (right padding), ``None``
    for all of them."""
    b, h, q_len, e = q.shape
    hkv, k_len, ev = k.shape[1], k.shape[2], v.shape[-1]
    e16, ev16 = -(-e // 16) * 16, -(-ev // 16) * 16
    per_row = [k_len] * (b * h) if lengths is None else [int(x) for x in lengths.repeat_interleave(h)]
    out, _ = NativeBandFn.apply(rows_f32(q, e16), rows_f32(k, e16), rows_f32(v, ev16), pattern, scale, h // hkv,
                                isa, per_row)
    return out.view(b, h, q_len, ev16)[..., :ev].to(q.dtype)  # (B, H, L, Ev)


def right_padding(key_mask: Tensor) -> Tensor | None:
    """The lengths ``(B,)`` when ``key_mask (B, S)`` is right padding (``True`` then ``False``), else ``None``."""
    lengths = key_mask.sum(-1)
    positions = torch.arange(key_mask.shape[-1], device=key_mask.device)
    return lengths if torch.equal(key_mask, positions < lengths.unsqueeze(-1)) else None
