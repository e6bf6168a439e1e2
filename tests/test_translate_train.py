"""Training never loses work: atomic checkpoints, keep-last-N, corrupt/mismatch errors, exact resume after a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnkit.cli import main
from attnkit.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from attnkit.train.loop import BatchPlan

ROOT = Path(__file__).resolve().parents[1]

# a tiny run: ~200 short verse pairs, 16-wide GRUs, dropout on (so the RNG state matters for an exact resume)
TINY = [
    "--model", "bahdanau", "--max-train", "200", "--max-chars", "80", "--max-tokens", "40", "--vocab-size", "300",
    "--embed-dim", "16", "--hidden-dim", "16", "--batch-size", "8", "--dropout", "0.1", "--save-every", "4",
    "--eval-every", "8", "--eval-limit", "4", "--keep", "2", "--threads", "1", "--no-progress",
]  # fmt: skip
STEPS = 16


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = list_checkpoints(run / "checkpoints")[-1]
    assert last.name == f"step-{STEPS:08d}"
    return load_file(last / "model.safetensors")


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _start(out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "attnkit",
        "translate",
        "train",
        *TINY,
        "--steps",
        str(STEPS),
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen[str], needle: str) -> list[str]:
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError("the run ended before printing " + repr(needle) + ":\n" + "".join(lines))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, in this process."""
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("uninterrupted")
    try:
        assert main(["translate", "train", *TINY, "--steps", str(STEPS), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    results = json.loads((out / "results-test-beam1.json").read_text())
    assert results["n"] == 4 and 0.0 <= results["bleu"] <= 100.0
    return out


@pytest.fixture(scope="module")
def reference(reference_run: Path) -> dict[str, torch.Tensor]:
    return _final_weights(reference_run)


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_gives_the_uninterrupted_weights(
    reference, tmp_path: Path, one_thread
) -> None:
    # 1. SIGTERM: the run finishes its step, writes a checkpoint there and exits with 143
    proc = _start(tmp_path)
    _wait_for(proc, f"step-{4:08d}")
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout is not None
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 143, rest
    assert "stopped by signal at step" in rest
    stopped_at = int(rest.split("stopped by signal at step ")[1].split(";")[0])
    assert 4 <= stopped_at < STEPS
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == f"step-{stopped_at:08d}"
    # 2. resume, then SIGKILL after its next periodic checkpoint: the steps since then are lost, nothing else
    proc = _start(tmp_path, "--resume")
    _wait_for(proc, f"step-{(stopped_at // 4 + 1) * 4:08d}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    done = list_checkpoints(tmp_path / "checkpoints")
    assert int(done[-1].name[5:]) < STEPS and len(done) <= 2  # killed part-way; keep=2
    # 3. resume to the end: the same weights, bit for bit, as the run that was never interrupted
    assert main(["translate", "train", *TINY, "--steps", str(STEPS), "--out", str(tmp_path), "--resume"]) == 0
    _assert_same_weights(_final_weights(tmp_path), reference)


def _model_and_optim() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return model, opt, sched


def _train_steps(model, opt, sched, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()


def test_checkpoint_round_trip_restores_optimizer_scheduler_and_rng(tmp_path: Path) -> None:
    model, opt, sched = _model_and_optim()
    _train_steps(model, opt, sched, 3)
    save_checkpoint(tmp_path, step=3, model=model, optimizer=opt, scheduler=sched, config={"d": 4}, files={"a": b"x"})
    _train_steps(model, opt, sched, 3)
    model2, opt2, sched2 = _model_and_optim()
    torch.rand(11)  # move the RNG on: restore must put it back
    ckpt = load_checkpoint(tmp_path, expect_config={"d": 4})
    assert ckpt.step == 3 and ckpt.files == {"a": b"x"}
    restore(ckpt, model2, opt2, sched2)
    _train_steps(model2, opt2, sched2, 3)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert sched.get_last_lr() == sched2.get_last_lr()
    # only safetensors and JSON on disk: nothing to unpickle
    names = sorted(p.name for p in ckpt.path.iterdir())
    assert names == ["a", "model.safetensors", "state.json", "trainer.safetensors"]


def test_keep_last_n_and_temporary_folders_are_ignored(tmp_path: Path) -> None:
    model, opt, _ = _model_and_optim()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step=step, model=model, optimizer=opt, keep=2)
    (tmp_path / ".step-00000009.tmp-123").mkdir()  # what a crash in the middle of a save leaves behind
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert load_checkpoint(tmp_path).step == 5


def test_corrupt_checkpoint_raises_and_leaves_files_intact(tmp_path: Path) -> None:
    model, opt, _ = _model_and_optim()
    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the last tensor
    weights.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    (path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)
    (path / "state.json").write_bytes(before["state.json"])
    assert {p.name: p.read_bytes() for p in path.iterdir()} == {**before, "model.safetensors": bytes(data)}


def test_mismatched_checkpoint_raises_clearly(tmp_path: Path) -> None:
    model, opt, _ = _model_and_optim()
    save_checkpoint(tmp_path, step=1, model=model, config={"hidden_dim": 8})
    with pytest.raises(CheckpointError, match=r"hidden_dim: checkpoint 8 vs this run 16"):
        load_checkpoint(tmp_path, expect_config={"hidden_dim": 16})
    other = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Dropout(0.3), torch.nn.Linear(9, 2))
    with pytest.raises(CheckpointError, match="mismatch"):
        restore(load_checkpoint(tmp_path), other)
    assert len(list_checkpoints(tmp_path)) == 1


def test_cli_resume_with_other_settings_is_refused(tmp_path: Path, one_thread, capsys) -> None:
    args = ["translate", "train", *TINY, "--steps", "2", "--eval-limit", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 2  # existing checkpoints without --resume
    assert "--resume to continue" in capsys.readouterr().err
    assert main([*args[:-2], "--hidden-dim", "32", "--out", str(tmp_path), "--resume"]) == 2
    assert "hidden-dim: checkpoint 16 vs this run 32" in capsys.readouterr().err
    weights = list_checkpoints(tmp_path / "checkpoints")[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert main([*args, "--resume"]) == 2
    assert "corrupt" in capsys.readouterr().err
    # longer training continues from the checkpoint it can read: here none, so the error stands
    assert weights.exists()


def test_batch_plan_is_stateless_and_shards_the_global_batch() -> None:
    lengths = list(range(1, 41))
    one = BatchPlan(lengths, 8, seed=1)
    shards = [BatchPlan(lengths, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in (0, 3, 5, 11):  # epochs 0, 0, 1, 2
        assert sorted(shards[0].batch(step) + shards[1].batch(step)) == sorted(one.batch(step))
        assert not set(shards[0].batch(step)) & set(shards[1].batch(step))
    epoch = sorted(i for s in range(len(one)) for i in one.batch(s))
    assert epoch == list(range(40))
    assert one.batch(6) != one.batch(1)  # a new order each epoch
    with pytest.raises(ValueError, match="divisible"):
        BatchPlan(lengths, 7, world_size=2)


def test_cli_evaluate_and_translate_with_alignment(reference_run: Path, tmp_path: Path, capsys, one_thread) -> None:
    run = ["--model", "bahdanau", "--out", str(reference_run), "--threads", "1"]
    assert main(["translate", "evaluate", *run, "--limit", "3", "--beam", "2"]) == 0
    res = json.loads((reference_run / "results-test-beam2.json").read_text())
    assert res["n"] == 3 and res["beam"] == 2 and set(res) >= {"bleu", "chrf", "parameters", "train_seconds"}
    assert "BLEU" in capsys.readouterr().out
    plot = tmp_path / "align.png"
    assert main(["translate", "translate", "In the beginning God created", *run, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "source (most attended)" in out and f"alignment plot: {plot}" in out
    assert plot.stat().st_size > 1000
    # the printed alignment is the argmax of the weights the model returns
    from attnkit.tasks.translate import load_run, translate_text

    model, _cfg, tok_src, tok_tgt, _ = load_run(reference_run, device="cpu")
    tr = translate_text(model, tok_src, tok_tgt, "In the beginning God created", beam=4)
    assert tr.weights is not None and tr.weights.shape == (len(tr.target_pieces), len(tr.source_pieces))
    for (_target, source, weight), row in zip(tr.alignment_rows(), tr.weights, strict=True):
        assert source == tr.source_pieces[int(row.argmax())] and float(weight) == pytest.approx(
            float(row.max()), abs=0.01
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["translate", "translate", "  "], "non-empty text"),
        (["translate", "translate", "word " * 300], "at most 1000 characters"),
        (["translate", "train", "--src", "xx", "--steps", "1"], "expected a language code"),
        (["translate", "train", "--src", "4", "--tgt", "en", "--steps", "1"], "two different versions"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(reference_run: Path, tmp_path: Path, argv, message, capsys) -> None:
    out = reference_run if argv[1] == "translate" else tmp_path
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_missing_run_folder(tmp_path: Path, capsys) -> None:
    assert main(["translate", "evaluate", "--out", str(tmp_path / "nothing")]) == 2
    assert "attnkit translate train --out" in capsys.readouterr().err
