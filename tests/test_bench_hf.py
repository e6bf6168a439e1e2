"""``python -m attnkit.bench hf --quick``: every row of the HF bench is measured and saved (no timing asserted)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="the hf bench needs transformers")

from attnkit.bench import hf  # noqa: E402
from attnkit.bench.__main__ import add_arguments  # noqa: E402
from attnkit.bench.__main__ import run as bench_run  # noqa: E402
from attnkit.data import DataNotFoundError  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("hf")
    try:
        from attnkit.models.llm import converted_folder

        converted_folder("smollm2")  # skip cleanly when the model is not installed
    except (DataNotFoundError, ImportError) as err:
        pytest.skip(f"SmolLM2 is not available: {err}")
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback of the integration during the bench
        assert bench_run(parser.parse_args(["hf", "--quick", "--out", str(out), "--model", "smollm2"])) == 0
    return out, "hf_smollm2"


def _measured(cell: str) -> bool:
    try:
        return float(cell.rstrip("x%")) >= 0
    except ValueError:
        return False


def test_every_row_is_measured_and_saved(quick_run: tuple[Path, str]) -> None:
    out, stem = quick_run
    impls = ["attnkit", "sdpa", "eager"]
    sizes = hf.QUICK
    expected = {
        "prefill": [(str(n), i) for n in sizes.prefill for i in impls],
        "decode": [(str(c), i) for c in sizes.decode for i in impls],
        "train": [(str(n), i) for n in sizes.train for i in impls],
        "maps": [(str(sizes.maps), r) for r in
                 ("eager, output_attentions", "attnkit, output_attentions", "attnkit, no maps",
                  "the maps' memory alone")],
    }
    for part, keys in expected.items():
        data = json.loads((out / f"{stem}_{part}.json").read_text(encoding="utf-8"))
        assert [tuple(row[:2]) for row in data["rows"]] == keys, part
        for row in data["rows"]:
            numbers = [c for c in row[2:] if c != "-"]
            assert numbers and all(_measured(c) for c in numbers), (part, row)  # nothing skipped at tiny sizes
    prefill = json.loads((out / f"{stem}_prefill.json").read_text(encoding="utf-8"))
    assert [r[3] for r in prefill["rows"] if r[1] == "sdpa"] == ["1.00x"] * len(sizes.prefill)
    assert any("flex_attention" in n for n in prefill["notes"])  # said, not silently dropped
    assert any("load average" in n for n in prefill["notes"])
    maps = json.loads((out / f"{stem}_maps.json").read_text(encoding="utf-8"))
    assert maps["rows"][2][4].endswith("x")  # attnkit with maps / without
    md = (out / f"{stem}.md").read_text(encoding="utf-8")
    assert md.count("### ") == 4 and "| N | implementation |" in md


def test_attention_clock_counts_only_the_attention_modules() -> None:
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import time

            time.sleep(0.02)
            return self.q_proj(x)

    model = nn.Sequential(Attention(), nn.Linear(4, 4), Attention())
    found = hf._attention_modules(model)
    assert found == [model[0], model[2]]
    clock = hf.AttentionClock(found)
    model(torch.randn(2, 4))
    assert 0.04 <= clock.seconds < 1.0
    clock.close()
    clock.reset()
    model(torch.randn(2, 4))
    assert clock.seconds == 0.0  # hooks removed


def test_memory_guard_skips_dense_runs_only() -> None:
    s = hf.Subject("x", None, layers=30, heads=9, sliding_layers=0, vocab=100)
    assert hf.estimate_bytes(s, "attnkit", "train", 4096) == 0
    assert hf.estimate_bytes(s, "sdpa", "train", 4096) == 0  # no mask tensor: the flash kernel
    assert hf.estimate_bytes(s, "eager", "train", 4096) == 4096 * 4096 * 4 * (1 + 3 * 9 * 30)
    gemma = hf.Subject("g", None, layers=18, heads=4, sliding_layers=15, vocab=100)
    assert hf.estimate_bytes(gemma, "sdpa", "train", 1024) > 0
    skipped: list[str] = []
    assert not hf._fits(s, "eager", "train", 4096, guard=1024**3, skipped=skipped)
    assert skipped and "eager" in skipped[0] and "guard" in skipped[0]


def test_model_option_is_for_hf_only(capsys: pytest.CaptureFixture[str]) -> None:
    from attnkit.cli import main

    assert main(["bench", "dense", "--model", "gemma3"]) == 2
    assert "--model only with the hf suite" in capsys.readouterr().err
