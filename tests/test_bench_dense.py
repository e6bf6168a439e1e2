"""The dense benchmark runs end to end on tiny sizes and saves its table (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from attnkit.bench import dense


def test_contenders_agree() -> None:
    """Every timed call computes the same attention (causal ones the same causal attention)."""
    with torch.no_grad():
        results = {name: fn() for name, fn in dense.contenders(24).items()}
    full = results["torch SDPA"]
    for name in ("attnkit auto", "naive math"):
        torch.testing.assert_close(results[name], full)
    torch.testing.assert_close(results["attnkit return_weights"][0], full)
    torch.testing.assert_close(results["attnkit return_weights, kept"][0], full)
    for name in ("attnkit CausalMask()", "attnkit bool causal tensor"):
        torch.testing.assert_close(results[name], results["torch is_causal"])


def test_table_is_saved(tmp_path: Path) -> None:
    table = dense.run([16], {16: 2})
    assert [row[1] for row in table.rows] == list(dense.BASELINE)
    table.save(tmp_path, "dense")
    saved = json.loads((tmp_path / "dense.json").read_text())
    assert saved["rows"] == table.rows
    assert "| N | kernel |" in (tmp_path / "dense.md").read_text()
