"""DistributedDataParallel: 2 CPU processes (gloo) train like one process on the same global batch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnkit.cli import main
from attnkit.train.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
ARGS = [
    "translate", "train", "--model", "luong", "--max-train", "200", "--max-chars", "80", "--max-tokens", "40",
    "--vocab-size", "300", "--embed-dim", "16", "--hidden-dim", "16", "--batch-size", "8", "--dropout", "0",
    "--steps", str(STEPS), "--save-every", "0", "--eval-every", "0", "--eval-limit", "2", "--threads", "1",
    "--no-progress",
]  # fmt: skip


def _losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(rf"step {STEPS}/{STEPS} loss ([0-9.]+)", text)]


@pytest.mark.distributed
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path, capsys) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "attnkit"]
    proc = subprocess.run(
        [*cmd, *ARGS, "--out", str(tmp_path / "ddp")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es) on cpu" in proc.stdout
    ddp_loss = _losses(proc.stdout)
    assert len(ddp_loss) == 1  # only rank 0 logs

    n = torch.get_num_threads()
    try:
        assert main([*ARGS, "--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(n)
    single_loss = _losses(capsys.readouterr().out)
    assert single_loss == pytest.approx(ddp_loss, rel=1e-4)  # the loss after two updates: same gradients

    # rank 0 wrote the only checkpoint; its weights match the single-process run's
    a = load_file(list_checkpoints(tmp_path / "ddp" / "checkpoints")[-1] / "model.safetensors")
    b = load_file(list_checkpoints(tmp_path / "single" / "checkpoints")[-1] / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
