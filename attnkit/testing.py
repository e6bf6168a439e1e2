"""Test helpers: one tolerance policy for every numerical comparison (like :mod:`torch.testing`).

The policy, written once:

* Every implementation is compared with the **float64 reference** computed from the same inputs (the
  low-precision inputs cast up, so input rounding is not counted as error) - never two low-precision results with
  each other. :func:`assert_close_to_reference` refuses a reference that is not float64.
* The tolerance follows from the dtype the implementation computed in and the reduction length ``n`` (the number
  of terms summed into one output element)::

      atol = rtol = factor * eps(dtype) * sqrt(max(n, MIN_REDUCTION))

  with ``factor = FACTOR`` for forward values and ``GRAD_FACTOR`` for gradients (``grad=True``). Rounding errors of
  a sum of ``n`` terms grow like ``sqrt(n)`` (random walk); the floor keeps tiny reductions (one key, a few terms)
  from getting a tolerance below what the softmax's own ``exp``/normaliser and the ``E``-term score dot products
  already cost.

What ``reduction`` to pass:

* attention outputs and weights: ``S``, the number of keys a query attends over (the softmax normaliser and the
  ``weights @ V`` sum both have ``S`` terms);
* gradients (``grad=True``): the longest reduction any of them has, ``max(L, S)`` - ``dQ`` sums over the ``S``
  keys, ``dK``/``dV`` over the ``L`` queries;
* a layer: its longest reduction, the ``S`` keys or the widest matmul (``d_model``, the feed-forward width);
* a stack of layers: rounding errors add up along the chain of sums, so ``num_layers x`` the widest reduction of
  one layer (e.g. a 6-layer BERT with a 1536-wide feed-forward: ``6 * 1536``).

The constants come from measured errors of the existing kernels against the float64 reference (see the comment at
:data:`FACTOR`), with at least 4x headroom. A path further from the reference than this is a bug to fix, not a
tolerance to loosen.

Example:

>>> import torch
>>> from attnkit.functional import attention_reference, scaled_dot_product_attention
>>> from attnkit.testing import assert_close_to_reference, tolerance
>>> q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
>>> out = scaled_dot_product_attention(q, k, v)
>>> ref, _ = attention_reference(q.double(), k.double(), v.double())
>>> assert_close_to_reference(out, ref, reduction=8)
>>> tolerance(torch.float32, 8) == tolerance(torch.float32, MIN_REDUCTION)  # below the floor
True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["FACTOR", "GRAD_FACTOR", "MIN_REDUCTION", "assert_close_to_reference", "tolerance"]

# Measured on the development CPU (x86_64, AVX-512; seeded randn inputs rounded to the dtype; reference = float64
# math on the same rounded inputs), over the dense backends ("reference", "math", "sdpa"), chunked, decode (native
# and torch), sliding-window and block-sparse (native and torch), the layers and BERT, in the whole swept suite.
# Worst max |actual - reference| in units of eps(dtype) * sqrt(max(n, MIN_REDUCTION)):
#   forward:   float32 3.96 (block-sparse, q = k = v: outputs up to ~2; dense backends 1.5), float64 2.9,
#              bfloat16 0.45, float16 0.31;
#   gradients: float32 3.71 (native window kernel), float64 2.5, bfloat16 0.41, float16 0.37.
# Worst share of the tolerance used (|actual - reference| / (atol + rtol * |reference|)): 0.11 for every kernel
# and layer test, 0.25 for the 6-layer BERT encoder (reduction = 6 x 1536). FACTOR = 8 and GRAD_FACTOR = 16
# therefore leave >= 4x headroom (>= 9x for the kernels) on the criterion assert_close applies.
FACTOR = 8.0
"""Forward values: tolerance = ``FACTOR * eps * sqrt(max(reduction, MIN_REDUCTION))``."""
GRAD_FACTOR = 16.0
"""Gradients: ``GRAD_FACTOR`` replaces :data:`FACTOR` (a backward pass chains two more reductions)."""
MIN_REDUCTION = 16
"""The floor on the reduction length: tiny reductions are no tighter than a 16-term sum."""


def tolerance(dtype: torch.dtype, reduction: int = 1, *, grad: bool = False) -> tuple[float, float]:
    """``(atol, rtol)`` for a result computed in ``dtype`` whose elements sum ``reduction`` terms.

    ``factor * eps(dtype) * sqrt(max(reduction, MIN_REDUCTION))`` for both, with ``factor`` :data:`FACTOR`, or
    :data:`GRAD_FACTOR` for gradients. For attention outputs and weights ``reduction`` is ``S`` (keys); for
    gradients ``max(L, S)``.

    >>> atol, rtol = tolerance(torch.float32, 1024)
    >>> round(atol / torch.finfo(torch.float32).eps)  # FACTOR * sqrt(1024)
    256
    >>> tolerance(torch.float64)[0] < 1e-13
    True
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"tolerance() needs a floating dtype, got {dtype!r}")
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"reduction must be a positive int (the number of terms summed), got {reduction!r}")
    factor = GRAD_FACTOR if grad else FACTOR
    tol = factor * torch.finfo(dtype).eps * math.sqrt(max(reduction, MIN_REDUCTION))
    return tol, tol


def assert_close_to_reference(
    actual: Tensor,
    reference: Tensor,
    *,
    reduction: int,
    grad: bool = False,
    dtype: torch.dtype | None = None,
    msg: str | None = None,
) -> None:
    """Assert that ``actual`` matches the float64 ``reference`` at the policy :func:`tolerance`.

    Args:
        actual: the implementation's result, in the dtype it computed in (it is cast to float64 here).
        reference: the float64 reference computed from the same inputs (cast up). Any other dtype is refused with
            ``TypeError``: two low-precision results are never compared with each other.
        reduction: the number of terms summed into one element (``S`` for attention outputs and weights,
            ``max(L, S)`` for gradients).
        grad: ``True`` for gradients (uses :data:`GRAD_FACTOR`).
        dtype: the dtype the result was computed in, when ``actual`` has already been cast (default:
            ``actual.dtype``).
        msg: a prefix for the failure message (e.g. which case).

    Raises:
        TypeError: ``reference`` is not a float64 tensor, or ``actual`` is not a floating tensor.
        AssertionError: a value is outside the tolerance; the message names the dtype, reduction and tolerance.

    >>> ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> assert_close_to_reference(torch.tensor([1.0, 2.0]), ref, reduction=4)
    >>> assert_close_to_reference(torch.tensor([1.0, 2.0]), ref.float(), reduction=4)
    Traceback (most recent call last):
    ...
    TypeError: the reference must be float64 (compare every path with the float64 reference, never two ...
    """
    if not isinstance(reference, Tensor) or reference.dtype != torch.float64:
        got = reference.dtype if isinstance(reference, Tensor) else type(reference).__name__
        raise TypeError(
            "the reference must be float64 (compare every path with the float64 reference, never two "
            f"low-precision results with each other), got {got}")
    if not isinstance(actual, Tensor) or not actual.dtype.is_floating_point:
        got = actual.dtype if isinstance(actual, Tensor) else type(actual).__name__
        raise TypeError(f"actual must be a floating tensor, got {got}")
    dtype = actual.dtype if dtype is None else dtype
    atol, rtol = tolerance(dtype, reduction, grad=grad)
    what = "gradient" if grad else "value"
    where = f"{msg}: " if msg else ""
    torch.testing.assert_close(
        actual.detach().to(torch.float64), reference.detach(), atol=atol, rtol=rtol, equal_nan=False,
        msg=lambda detail: (f"{where}{dtype} {what} vs the float64 reference (reduction {reduction}, "
                            f"atol = rtol = {atol:.3g}):\n{detail}"))
