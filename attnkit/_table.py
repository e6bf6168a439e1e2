"""Plain-text tables for the terminal, shared by the tasks' reports and the benchmarks (on the ground floor, so that
neither wing imports the other for it)."""

from __future__ import annotations

__all__ = ["format_table"]


def format_table(rows: list[list[str]]) -> str:
    """Rows (first = header) as an aligned plain-text table for the terminal.

    >>> print(format_table([["n", "ms"], ["1024", "3.5"]]))
    n     ms
    ----  ---
    1024  3.5
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
