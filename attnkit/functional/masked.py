"""Attention under any mask object or ``mask_mod`` on the native block engine, forward and backward.

Every mask of :mod:`attnkit.functional.masks` (exact sliding windows, documents, sinks, block-sparse layouts, user
``mask_mod`` functions, and their ``&`` / ``|``) compiles to one :class:`~attnkit.functional.mask_blocks.MaskBlocks`:
per query tile of 64 rows the key blocks of 64 it touches, each full (the kernel's unmasked path) or partial (a
64-bit mask per row). ``csrc/band.c`` (``attnkit_mask_fwd`` / ``attnkit_mask_bwd``) walks that description with
the same tiles and microkernels as the sliding-window and block-sparse kernels: cost proportional to the blocks the
mask touches. Key padding of the form ``mask & PaddingMask(lengths)`` stays right padding (``kv_len``) and is not
compiled into the blocks.

The backend ``native_mask`` serves ``scaled_dot_product_attention(q, k, v, mask)`` on the CPU for float32,
bfloat16 and float16 inputs (computed in float32); any other input falls back to the dense masked path
(``mask.materialize``), with the same values.

Example:
    >>> import torch
    >>> from attnkit.functional import SlidingWindowMask, SinkMask, scaled_dot_product_attention, which_backend
    >>> q = k = v = torch.randn(1, 2, 300, 16)
    >>> mask = SlidingWindowMask(64) | SinkMask(4)
    >>> scaled_dot_product_attention(q, k, v, mask).shape
    torch.Size([1, 2, 300, 16])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _native
from ._memory import fresh_buffer
from ._native_bridge import native_attention, native_call, rows_f32, run_pattern
from .dispatch import AttentionCall, Backend, WeightsPath, register_backend, register_weights
from .mask_blocks import MaskBlocks
from .masks import (
    AndMask,
    AttentionMask,
    BlockedWindowMask,
    BlockSparseMask,
    CausalMask,
    PaddingMask,
)

__all__ = ["masked_attention", "masked_weights", "split_padding"]


@dataclass(frozen=True)
class _MaskPattern:
    """A :class:`MaskBlocks` as the native kernel reads it (a :class:`~attnkit.functional.local.NativePattern`)."""

    blocks: MaskBlocks
    heads: int  # query heads H of the call: row r of B*H is batch r // H, head r % H
    softcap: float = 0.0  # logit soft-capping (0: none)
    fwd: str = "attnkit_mask_fwd"
    bwd: str = "attnkit_mask_bwd"
    fwd_tasks: str = "attnkit_mask_fwd_tasks"  # the whole forward on OpenMP threads (_native_bridge.NativeBandFn)

    @property
    def groups(self) -> int:
        return self.blocks.n_q_blocks

    def _row(self, row: int) -> int:
        return self.blocks.row(row // self.heads, row % self.heads)

    def args(self, row: int, kv_len: int, e: int, ev: int) -> tuple[object, ...]:
        bl = self.blocks
        ptr = bl.row_ptr.data_ptr() + self._row(row) * (self.groups + 1) * bl.row_ptr.element_size()
        return (bl.q_len, bl.k_len, kv_len, e, ev, ptr, bl.cols.data_ptr(), bl.part.data_ptr(), bl.bits.data_ptr(),
                self.softcap)

    def task_args(self, lengths: list[int], e: int, ev: int | None, rep: int
                  ) -> tuple[tuple[object, ...], list[Tensor]]:
        """The arguments of ``attnkit_mask_fwd_tasks`` from ``n_q`` to ``bits`` (every row at once; ``ev=None``:
        those of ``attnkit_mask_weights_tasks``, which take no value width), and the tensors they point into (to
        keep alive during the call)."""
        bl = self.blocks
        kv_len = torch.tensor(lengths, dtype=torch.int64)
        row_of = torch.tensor([self._row(r) for r in range(len(lengths))], dtype=torch.int64)
        widths = (e,) if ev is None else (e, ev)  # the weights' entry point takes no value width
        args = (bl.q_len, bl.k_len, kv_len.data_ptr(), *widths, rep, bl.row_ptr.data_ptr(), row_of.data_ptr(),
                self.groups, bl.cols.data_ptr(), bl.part.data_ptr(), bl.bits.data_ptr(), self.softcap)
        return args, [kv_len, row_of]

    def keys(self, row: int, g0: int, g1: int) -> tuple[int, int]:
        ptr = self.blocks.row_ptr[self._row(row)]
        cols = self.blocks.cols[int(ptr[g0]) : int(ptr[g1])]
        if not cols.numel():
            return 0, 0
        return int(cols.min()) * 64, min(self.blocks.k_len, (int(cols.max()) + 1) * 64)


def split_padding(mask: AttentionMask) -> tuple[AttentionMask | None, Tensor | None]:
    """``mask & PaddingMask(lengths)`` -> ``(mask, lengths)`` (right padding the kernel serves as ``kv_len``);
    any other mask -> ``(mask, None)``. ``(None, lengths)`` when only padding is left."""
    if isinstance(mask, PaddingMask):
        return None, mask.lengths
    if isinstance(mask, AndMask):
        pads = [p for p in mask.parts if isinstance(p, PaddingMask)]
        if len(pads) == 1:
            rest = tuple(p for p in mask.parts if not isinstance(p, PaddingMask))
            return (rest[0] if len(rest) == 1 else AndMask(rest)), pads[0].lengths
    return mask, None


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None, scale: float, *,
                     is_causal: bool = False, softcap: float | None = None, isa: int = 2) -> Tensor:
    """``(B, H, L, E)`` attention under ``mask`` on the native engine (see the module docstring): float32 /
    bfloat16 / float16 CPU tensors, the native library loaded (check ``native_unsupported`` first).
    ``mask=None``: every key. ``is_causal`` adds upper-left causal masking. ``softcap``: logit soft-capping, the
    scores become ``softcap * tanh(scores / softcap)`` before the mask (Gemma 2), forward and backward. ``isa``: 2 =
    the AVX-512 body where the CPU has it, 1 = the build's own target."""
    pattern, lengths = _compile(q, k, mask, is_causal, softcap)
    return native_attention(q, k, v, pattern, scale, isa, lengths)


def _compile(q: Tensor, k: Tensor, mask: AttentionMask | None, is_causal: bool, softcap: float | None = None
             ) -> tuple[_MaskPattern, Tensor | None]:
    """The native pattern of ``mask`` (``None``: every key) for ``(B, H, L, E)`` queries and ``(B, Hkv, S, E)``
    keys, and the right padding's lengths ``(B,)`` (``None``: every key is real)."""
    b, h, q_len, _ = q.shape
    k_len = k.shape[2]
    mask = (_Everything() if mask is None else mask)._bind(b, h)
    if is_causal:
        mask = mask & CausalMask()
    rest, lengths = split_padding(mask)
    if rest is None:
        rest = _Everything()
    blocks = rest.blocks(q_len, k_len)
    if blocks.batch not in (1, b) or blocks.heads not in (1, h):
        raise ValueError(f"expected a mask of 1 or B={b} batch rows and 1 or H={h} heads, got "
                         f"{blocks.batch} and {blocks.heads}; try MaskMod(fn, B=None, H=None)")
    if lengths is not None:
        lengths = lengths.cpu().long().view(-1).clamp(0, k_len).expand(b)
    return _MaskPattern(blocks, h, float(softcap or 0.0)), lengths


def masked_weights(q: Tensor, k: Tensor, mask: AttentionMask | None, scale: float, *, is_causal: bool = False,
                   softcap: float | None = None, isa: int = 2) -> Tensor:
    """The exact softmax weights ``(B, H, L, S)`` of :func:`masked_attention` (same inputs, no values), from the
    native engine (``attnkit_mask_weights``): per tile of 64 queries the scores of the blocks the mask touches go
    straight into the output rows, then the softmax runs over them while they are in cache; everything outside
    those blocks is written as zero. Cost: the blocks the mask touches plus one write of ``B*H*L*S`` floats (the
    math backend writes the full ``L x S`` scores and reads them back three times). No gradient (the ``math``
    backend serves weights that need one). Rows with no key to attend give zeros."""
    b, h, q_len, e = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    pattern, lengths = _compile(q, k, mask, is_causal, softcap)
    e16 = -(-e // 16) * 16
    qr, kr = rows_f32(q, e16), rows_f32(k, e16)
    bh, rep = b * h, h // hkv
    per_row = [k_len] * bh if lengths is None else [int(x) for x in lengths.repeat_interleave(h)]
    w = fresh_buffer((bh, q_len, k_len), torch.float32, q.device)  # huge pages: the weights are written once
    lib = _native.load()
    if lib is None:
        raise RuntimeError(f"masked_weights needs the native library ({_native.status()})")
    fl = 4  # bytes per float32

    def task(row: int, g0: int, g1: int) -> None:
        n_q, n_k, kv_len, ee, _, *rest = pattern.args(row, per_row[row], e16, 0)
        native_call(lib.attnkit_mask_weights, qr.data_ptr() + row * q_len * e16 * fl,
                    kr.data_ptr() + row // rep * k_len * e16 * fl, w.data_ptr() + row * q_len * k_len * fl,
                    n_q, n_k, kv_len, ee, *rest, scale, g0, g1, isa)

    run_pattern(lib, pattern, "attnkit_mask_weights_tasks", (qr.data_ptr(), kr.data_ptr(), w.data_ptr()),
                (per_row, e16, None, rep), scale, isa, bh * q_len * k_len, task)
    return w.view(b, h, q_len, k_len).to(q.dtype)


@dataclass(frozen=True)
class _Everything(AttentionMask):
    """Every key (what is left of ``PaddingMask`` alone once its lengths become ``kv_len``)."""

    def materialize(self, q_len: int, k_len: int, *, device: torch.device | str | None = None) -> Tensor:
        return torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)

    def _rows(self) -> tuple[int, int]:
        return 1, 1

    def _states(self, q_len: int, k_len: int) -> Tensor:
        return torch.full((1, 1, -(-q_len // 64), -(-k_len // 64)), 2, dtype=torch.uint8)


# --------------------------------------------------------------------------------------------- dispatcher
def _fused_serves(structure: AttentionMask) -> bool:
    """Causal and padding structures alone: PyTorch's fused kernel serves them (is_causal / a key mask)."""
    parts = structure.parts if isinstance(structure, AndMask) else (structure,)
    return all(isinstance(p, CausalMask | PaddingMask) for p in parts)


def _own_backend(structure: AttentionMask) -> str | None:
    """The structured backend that serves this structure with its own kernel, if one does."""
    parts = structure.parts if isinstance(structure, AndMask) else (structure,)
    main = [p for p in parts if not isinstance(p, PaddingMask)]
    if len(main) == 1 and len(parts) - len(main) <= 1:
        if isinstance(main[0], BlockedWindowMask):
            return "window (native_band, flash_pieces, window_blockwise)"
        if isinstance(main[0], BlockSparseMask):
            return "block-sparse (native_block_sparse, torch_block_sparse)"
    return None


def _served_elsewhere(structure: AttentionMask | None) -> str | None:
    """Why another kernel serves this structure (when the scores are not capped), or ``None``."""
    if structure is None:
        return "no mask object (a tensor mask or none: the dense kernels serve it)"
    if _fused_serves(structure):
        return "causal / padding structure only (PyTorch's fused kernel serves it)"
    if (own := _own_backend(structure)) is not None:
        return f"the {own} backends serve this structure"
    return None


def _supports(call: AttentionCall) -> list[str]:
    reasons = []
    # soft-capped scores: no kernel before the chunked path caps them, so this one serves any structure, none too
    if call.softcap is None and (elsewhere := _served_elsewhere(call.structure)) is not None:
        reasons.append(elsewhere)
    if call.mask is not None:
        reasons.append("an explicit tensor mask on top of the mask object")
    if call.dropout_p > 0:
        reasons.append("dropout on the weights")
    if call.query.device.type == "cpu" and _native.load() is None:  # dtypes and device: declared on the backend
        reasons.append(f"no native library ({_native.status()})")
    return reasons


def _fn(call: AttentionCall) -> tuple[Tensor, None]:
    out = masked_attention(call.query, call.key, call.value, call.structure, call.scale, is_causal=call.is_causal,
                           softcap=call.softcap)
    return out, None


def _kernel(call: AttentionCall) -> str:
    lib = _native.load()
    body = _native.band_body(lib) if lib is not None else "none"
    return f"native block engine (mask blocks of 64, full and partial: {body})"


def _weights_supports(call: AttentionCall) -> list[str]:
    """Why :func:`masked_weights` cannot give the weights of ``call``: it serves mask objects and ``is_causal``
    (no mask at all: the math backend computes output and weights in one pass, as fast, unless the scores are
    soft-capped), without gradients, for CPU float32 / bfloat16 / float16."""
    reasons = []
    if call.structure is None and not call.is_causal and call.softcap is None:
        reasons.append("no mask object")
    if call.mask is not None:
        reasons.append("an explicit tensor mask")
    if call.needs_grad:
        reasons.append("weights that need a gradient")
    if call.query.device.type != "cpu" or call.query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        reasons.append(f"{call.query.dtype} inputs on {call.query.device.type}")
    elif _native.load() is None:
        reasons.append(f"no native library ({_native.status()})")
    return reasons


def _weights_fn(call: AttentionCall) -> Tensor:
    return masked_weights(call.query, call.key, call.structure, call.scale, is_causal=call.is_causal,
                          softcap=call.softcap)


register_weights(WeightsPath("native_mask", _weights_fn, _weights_supports))
register_backend(
    Backend("native_mask", _fn, False, _supports,
            "any mask object or mask_mod compiled to blocks of 64 (full / partial with a bit mask per row), "
            "the native C kernel forward and backward", kernel=_kernel,
            dtypes=(torch.float32, torch.bfloat16, torch.float16), devices=("cpu",), softcap=True),
)
