"""The dense benchmark runs end to end on tiny sizes and saves its table (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from attnkit.bench import dense
from attnkit.functional import attention_reference
from attnkit.testing import assert_close_to_reference


def test_contenders_agree() -> None:
    """Every timed call computes the same attention (causal ones the same causal attention): each against the
    float64 reference of the bench's inputs, never one float32 contender against another."""
    n = 24
    with torch.no_grad():
        results = {name: fn() for name, fn in dense.contenders(n).items()}
    g = torch.Generator().manual_seed(n)  # the bench's inputs, drawn the same way, in float64
    q, k, v = (torch.randn(dense.B, dense.H, n, dense.E, generator=g).double() for _ in range(3))
    full, _ = attention_reference(q, k, v)
    causal, _ = attention_reference(q, k, v, is_causal=True)
    for name, want in (("torch SDPA", full), ("attnkit auto", full), ("naive math", full),
                       ("attnkit return_weights", full), ("attnkit return_weights, kept", full),
                       ("torch is_causal", causal), ("attnkit CausalMask()", causal),
                       ("attnkit bool causal tensor", causal)):
        got = results[name][0] if isinstance(results[name], tuple) else results[name]
        assert_close_to_reference(got, want, reduction=n, msg=name)


def test_table_is_saved(tmp_path: Path) -> None:
    table = dense.run([16], {16: 2})
    assert [row[1] for row in table.rows] == list(dense.BASELINE)
    table.save(tmp_path, "dense")
    saved = json.loads((tmp_path / "dense.json").read_text())
    assert saved["rows"] == table.rows
    assert "| N | kernel |" in (tmp_path / "dense.md").read_text()
