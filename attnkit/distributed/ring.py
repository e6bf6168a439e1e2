"""Ring attention: sequence-parallel exact attention over ``torch.distributed``.

Paper: "Ring Attention with Blockwise Transformers for Near-Infinite Context", Liu, Zaharia and Abbeel, 2023.
https://arxiv.org/abs/2310.01889 (zig-zag load balancing for causal masks as in Brandon et al., "Striped Attention",
2023, https://arxiv.org/abs/2311.09431, and the zig-zag split of ring-flash-attention).

Each of the ``W`` ranks holds a slice of the sequence: its queries, keys and values. Key/value blocks travel around
the ring (rank ``r`` sends to ``r + 1`` and receives from ``r - 1``, point-to-point) while every rank attends its
queries to the block it holds; the ``W`` partial results merge exactly with their log-sum-exp
(:func:`attnkit.functional.merge_attention`). The backward pass goes around the ring again: each block's key/value
gradients travel with it and arrive home after a last hop, so forward and backward are both exact.

Causal load balancing: with a contiguous split, rank 0 has almost nothing to compute and rank ``W - 1`` everything.
The zig-zag split cuts the sequence into ``2W`` chunks and gives rank ``r`` chunks ``r`` and ``2W - 1 - r``, so every
rank does the same work; :func:`split_sequence` / :func:`gather_sequence` make and undo either split.

Runs on gloo (CPU) and NCCL. Self-check: ``python -m attnkit.distributed.ring`` (spawns 2 processes) or
``torchrun --nproc-per-node 4 -m attnkit.distributed.ring``.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from attnkit.functional import _validate as V
from attnkit.functional._pieces import same_head_dim
from attnkit.functional.chunked import block_backward, block_forward

__all__ = ["gather_sequence", "ring_attention", "split_sequence"]


# --------------------------------------------------------------------------------------------- splits
def _chunk_ids(rank: int, world: int, zigzag: bool) -> list[int]:
    """Which chunks of the sequence a rank holds: ``[r]`` of ``W``, or ``[r, 2W-1-r]`` of ``2W`` with zig-zag."""
    return [rank, 2 * world - 1 - rank] if zigzag else [rank]


def split_sequence(x: Tensor, rank: int, world_size: int, *, zigzag: bool = True, dim: int = 2) -> Tensor:
    """This rank's slice of a full sequence (contiguous, or zig-zag: chunks ``r`` and ``2W-1-r`` of ``2W``).

    Example:
        >>> import torch
        >>> x = torch.arange(8).view(1, 1, 8, 1)
        >>> split_sequence(x, 0, 2).flatten().tolist(), split_sequence(x, 1, 2).flatten().tolist()
        ([0, 1, 6, 7], [2, 3, 4, 5])
    """
    parts = 2 * world_size if zigzag else world_size
    if x.shape[dim] % parts:
        raise V.fail(f"a length divisible by {parts} ({'2W' if zigzag else 'W'})", f"{x.shape[dim]}",
                     "padding the sequence to a multiple")
    chunks = x.chunk(parts, dim=dim)
    return torch.cat([chunks[i] for i in _chunk_ids(rank, world_size, zigzag)], dim=dim)


def _unsplit(pieces: list[Tensor], *, zigzag: bool, dim: int) -> Tensor:
    world = len(pieces)
    if not zigzag:
        return torch.cat(pieces, dim=dim)
    chunks: list[Tensor | None] = [None] * (2 * world)
    for rank, piece in enumerate(pieces):
        first, second = piece.chunk(2, dim=dim)
        chunks[rank], chunks[2 * world - 1 - rank] = first, second
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]


def gather_sequence(local: Tensor, *, group: Any = None, zigzag: bool = True, dim: int = 2) -> Tensor:
    """All-gather every rank's slice and undo :func:`split_sequence` (no gradient flows through the gather)."""
    world = dist.get_world_size(group)
    pieces = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    return _unsplit(pieces, zigzag=zigzag, dim=dim)


# --------------------------------------------------------------------------------------------- ring
class _Ring:
    """Point-to-point neighbours of this rank in ``group``."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next = to_global((self.rank + 1) % self.world)
        self.prev = to_global((self.rank - 1) % self.world)

    def pass_on(self, tensors: list[Tensor]) -> list[Tensor]:
        """Send ``tensors`` to the next rank and return the previous rank's (one batched exchange)."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in received]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return received


def _pairs(q_ids: list[int], k_ids: list[int], causal: bool) -> list[tuple[int, int, bool]]:
    """(local query chunk, local key chunk, is_causal) to compute; chunks after the query chunk are skipped."""
    out = []
    for i, qc in enumerate(q_ids):
        for j, kc in enumerate(k_ids):
            if not causal or kc < qc:
                out.append((i, j, False))
            elif kc == qc:
                out.append((i, j, True))
    return out


def _expand(x: Tensor, heads: int) -> Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def _fold(grad: Tensor, kv_heads: int) -> Tensor:
    """Sum the gradient of expanded key/value heads back onto the ``Hkv`` heads."""
    b, h, n, e = grad.shape
    return grad if h == kv_heads else grad.view(b, kv_heads, h // kv_heads, n, e).sum(2)


class _RingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, zigzag, scale):  # type: ignore[no-untyped-def, override]
        ring = _Ring(group)
        heads = q.shape[1]
        n_chunks = 2 if zigzag else 1
        q_ids = _chunk_ids(ring.rank, ring.world, zigzag)
        q_parts = q.chunk(n_chunks, dim=2)
        outs: list[Tensor | None] = [None] * n_chunks
        lses: list[Tensor | None] = [None] * n_chunks
        k_cur, v_cur = k.contiguous(), v.contiguous()
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            k_parts = _expand(k_cur, heads).chunk(n_chunks, dim=2)
            v_parts = _expand(v_cur, heads).chunk(n_chunks, dim=2)
            for i, j, is_causal in _pairs(q_ids, _chunk_ids(src, ring.world, zigzag), causal):
                o, lse = block_forward(q_parts[i], k_parts[j], v_parts[j], None, is_causal, scale)
                if outs[i] is None:
                    outs[i], lses[i] = o, lse
                else:
                    outs[i], lses[i] = _merge2(outs[i], lses[i], o, lse)  # type: ignore[arg-type]
            if step < ring.world - 1:
                k_cur, v_cur = ring.pass_on([k_cur, v_cur])
        for i in range(n_chunks):  # a chunk that saw no key at all (never with a causal split): zeros
            if outs[i] is None:
                outs[i] = q_parts[i].new_zeros(*q_parts[i].shape[:3], v.shape[-1])
                lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
                lses[i] = torch.full(q_parts[i].shape[:3], float("-inf"), dtype=lse_dtype, device=q.device)
        out = torch.cat(outs, dim=2)  # type: ignore[arg-type]
        lse = torch.cat(lses, dim=2)  # type: ignore[arg-type]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.zigzag, ctx.scale = group, causal, zigzag, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_lse):  # type: ignore[no-untyped-def, override]
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        heads, kv_heads = q.shape[1], k.shape[1]
        n_chunks = 2 if ctx.zigzag else 1
        q_ids = _chunk_ids(ring.rank, ring.world, ctx.zigzag)
        q_parts = q.chunk(n_chunks, dim=2)
        g_parts = grad_out.contiguous().chunk(n_chunks, dim=2)
        o_parts = [o.contiguous() for o in out.chunk(n_chunks, dim=2)]
        l_parts = [x.contiguous() for x in lse.chunk(n_chunks, dim=2)]
        dq = torch.zeros_like(q)
        dq_parts = dq.chunk(n_chunks, dim=2)
        k_cur, v_cur = k.contiguous(), v.contiguous()
        dk_cur, dv_cur = torch.zeros_like(k_cur), torch.zeros_like(v_cur)
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            k_parts = _expand(k_cur, heads).chunk(n_chunks, dim=2)
            v_parts = _expand(v_cur, heads).chunk(n_chunks, dim=2)
            dk_parts, dv_parts = dk_cur.chunk(n_chunks, dim=2), dv_cur.chunk(n_chunks, dim=2)
            for i, j, is_causal in _pairs(q_ids, _chunk_ids(src, ring.world, ctx.zigzag), ctx.causal):
                g_q, g_k, g_v = block_backward(
                    g_parts[i], q_parts[i], k_parts[j], v_parts[j], o_parts[i], l_parts[i], None, is_causal, ctx.scale
                )
                dq_parts[i].add_(g_q)
                dk_parts[j].add_(_fold(g_k, kv_heads))
                dv_parts[j].add_(_fold(g_v, kv_heads))
            if step < ring.world - 1:
                k_cur, v_cur, dk_cur, dv_cur = ring.pass_on([k_cur, v_cur, dk_cur, dv_cur])
        dk, dv = ring.pass_on([dk_cur, dv_cur]) if ring.world > 1 else (dk_cur, dv_cur)  # the last hop home
        return dq, dk, dv, None, None, None, None


def _merge2(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w1 = torch.exp(l1 - safe).unsqueeze(-1).to(o1.dtype)
    w2 = torch.exp(l2 - safe).unsqueeze(-1).to(o2.dtype)
    return o1 * w1 + o2 * w2, lse


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_AGREED = ("batch", "heads", "kv heads", "local length", "head dim", "value dim", "dtype", "is_causal", "zigzag",
           "scale")


def _check_agreement(q: Tensor, k: Tensor, v: Tensor, group: Any, causal: bool, zigzag: bool, scale: float) -> None:
    """Every rank must call with the same shapes and options; otherwise the ring's point-to-point exchanges would
    mismatch (gloo aborts the process). One small all-gather lets every rank raise the same ValueError instead."""
    code = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1
    mine = [q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3], v.shape[3], code, int(causal), int(zigzag),
            round(scale * 2**40)]
    world = dist.get_world_size(group)
    gathered = [torch.empty(len(mine), dtype=torch.int64, device=q.device) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor(mine, dtype=torch.int64, device=q.device), group=group)
    table = torch.stack(gathered)  # (W, fields)
    differ = [name for i, name in enumerate(_AGREED) if bool((table[:, i] != table[0, i]).any())]
    if differ:
        cols = {name: [_field(name, int(x)) for x in table[:, _AGREED.index(name)]] for name in differ}
        per_rank = "; ".join(f"{name}: " + ", ".join(f"rank {r} {x}" for r, x in enumerate(xs))
                             for name, xs in cols.items())
        raise V.fail("the same shapes and options on every rank", per_rank,
                     "split the full sequence with split_sequence on every rank (equal local lengths)")


def _field(name: str, value: int) -> str:
    if name == "dtype":
        return str(_DTYPES[value]) if value >= 0 else "other"
    if name == "scale":
        return f"{value / 2**40:.6g}"
    return str(value)


def ring_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    group: Any = None,
    is_causal: bool = False,
    zigzag: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention over a sequence split across the ranks of ``group``; call it on every rank.

    Equivalent to gathering the full sequence, running
    ``scaled_dot_product_attention(q, k, v, is_causal=is_causal)`` and keeping this rank's rows, forward and
    backward, but no rank ever holds more than two key/value slices.

    Args:
        query: this rank's queries ``(B, H, L/W, E)``, split by :func:`split_sequence` with the same ``zigzag``.
        key: this rank's keys ``(B, Hkv, L/W, E)``, ``Hkv`` dividing ``H``.
        value: this rank's values ``(B, Hkv, L/W, Ev)``.
        group: the process group (default: the world).
        is_causal: causal masking over *global* positions (query ``i`` sees keys ``j <= i``).
        zigzag: the slices are zig-zag splits (chunks ``r`` and ``2W-1-r`` of ``2W``); ``False``: contiguous.
        scale: score scale, ``1/sqrt(E)`` when ``None``.
        return_lse: also return the log-sum-exp ``(B, H, L/W)`` of this rank's rows.

    Returns:
        this rank's output ``(B, H, L/W, Ev)`` (and its log-sum-exp).

    Shape:
        query ``(B, H, Lr, E)``, key ``(B, Hkv, Lr, E)``, value ``(B, Hkv, Lr, Ev)`` -> ``(B, H, Lr, Ev)``, with the
        same ``Lr`` on every rank.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise V.fail("an initialised torch.distributed process group", "none",
                     "dist.init_process_group('gloo') (or run under torchrun)")
    q, k, v = V.check_qkv(query, key, value, allow_3d=False)
    if q.shape[2] != k.shape[2]:
        raise V.fail("local query and key slices of one length", f"{q.shape[2]} and {k.shape[2]}",
                     "split q, k and v with split_sequence")
    if zigzag and q.shape[2] % 2:
        raise V.fail("an even local length with zigzag=True (two chunks)", f"{q.shape[2]}", "zigzag=False")
    scale_f = V.check_scale(scale, q.shape[-1])
    _check_agreement(q, k, v, group, bool(is_causal), bool(zigzag), scale_f)
    ev = v.shape[-1]
    q, k, v = same_head_dim(q, k, v)  # the flash kernel wants E == Ev
    out, lse = _RingFn.apply(q, k, v, group, bool(is_causal), bool(zigzag), scale_f)
    out = out[..., :ev]
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------- self-check
def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a local process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_check(
    rank: int, world: int, *, n: int = 64, dtype: torch.dtype = torch.float64, seed: int = 0, full: bool = True
) -> float:
    """Ring attention against the single-process float64 reference on this group; returns the largest error
    (forward and gradients).

    Covers causal and not, zig-zag and contiguous splits, multi-head and grouped-query (4 query, 2 key/value heads);
    ``full=False`` runs two of those eight cases (causal zig-zag GQA, and non-causal contiguous MHA).
    """
    from attnkit.functional import scaled_dot_product_attention

    torch.manual_seed(seed)
    worst = 0.0
    for kv_heads in (4, 2):
        q = torch.randn(2, 4, n, 16, dtype=dtype)
        k, v = (torch.randn(2, kv_heads, n, 16, dtype=dtype) for _ in range(2))
        for causal in (False, True):
            for zigzag in (True, False):
                if not full and (causal != zigzag or causal != (kv_heads == 2)):
                    continue
                ref_in = [t.to(torch.float64, copy=True).requires_grad_(True) for t in (q, k, v)]  # float64 reference
                ref = cast(Tensor, scaled_dot_product_attention(*ref_in, is_causal=causal, backend="reference"))
                grad = torch.randn_like(ref)
                ref.backward(grad)
                local = [split_sequence(t, rank, world, zigzag=zigzag).requires_grad_(True) for t in (q, k, v)]
                out = cast(Tensor, ring_attention(*local, is_causal=causal, zigzag=zigzag))
                out.backward(split_sequence(grad, rank, world, zigzag=zigzag).to(dtype))
                grads = [(cast(Tensor, a.grad), cast(Tensor, b.grad)) for a, b in zip(local, ref_in, strict=True)]
                pairs = [(out, ref)] + grads  # after backward every leaf holds a gradient
                for got, want in pairs:
                    err = (got.double() - split_sequence(want, rank, world, zigzag=zigzag)).abs().max()
                    worst = max(worst, float(err.detach()))
    return worst


def check_worker(
    rank: int, world: int, port: int, dtype: torch.dtype, out_dir: str | None, full: bool = True
) -> None:
    """One process of a local gloo group: run :func:`self_check`, print and (optionally) write the error."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        err = self_check(rank, world, dtype=dtype, full=full)
        print(f"rank {rank}/{world}: max |ring - single process| = {err:.2e} (forward and gradients, {dtype})")
        if out_dir is not None:
            with open(os.path.join(out_dir, f"rank{rank}.txt"), "w", encoding="utf-8") as f:
                f.write(repr(err))
    finally:
        dist.destroy_process_group()


def main() -> int:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        err = self_check(rank, world)
        print(f"rank {rank}/{world}: max |ring - single process| = {err:.2e} (forward and gradients)")
        dist.destroy_process_group()
        return 0 if err <= 1e-10 else 1
    world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    import torch.multiprocessing as mp

    mp.spawn(check_worker, args=(world, free_port(), torch.float64, None), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
