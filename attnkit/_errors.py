"""The library's one error shape: ``ValueError("expected ..., got ...; try ...")``, so every message names the fix.

On the ground floor: every part of attnkit (kernels, modules, data, tasks) raises through :func:`fail`.
"""

from __future__ import annotations

__all__ = ["fail"]


def fail(expected: str, got: str, fix: str) -> ValueError:
    """Build the library's standard error: what was expected, what was got, and how to fix it.

    >>> fail("a positive int", "-1", "n=1")
    ValueError('expected a positive int, got -1; try n=1')
    """
    return ValueError(f"expected {expected}, got {got}; try {fix}")
