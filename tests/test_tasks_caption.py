"""attnkit caption through the one training loop: settings from the parsed arguments, exact resume after a stop."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from attnkit.cli import build_parser
from attnkit.data import load_mnist
from attnkit.data.scenes import digit_scenes
from attnkit.tasks import caption
from attnkit.train.checkpoint import list_checkpoints, load_checkpoint


def test_settings_from_args() -> None:
    args = build_parser().parse_args(
        ["caption", "--attention", "hard", "--quick", "--epochs", "2", "--seed", "5", "--resume", "--save-every", "7"]
    )
    s = caption.CaptionSettings.from_args(args)
    assert (s.attention, s.quick, s.epochs, s.seed, s.resume, s.save_every) == (("hard",), True, 2, 5, True, 7)
    r = s.resolved()
    assert (r.epochs, r.train_size, r.test_size) == (2, 4000, 500)  # the quick defaults fill what was not given
    with pytest.raises(ValueError, match="--train-size >= 1"):
        caption.CaptionSettings(train_size=0).resolved()


def test_hard_captioner_stopped_and_resumed_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hard attention samples locations and keeps a moving-average baseline: both come back on resume, so a run
    stopped by SIGTERM at step 5 and resumed ends with the weights and baseline of the uninterrupted run."""
    mnist = load_mnist()
    data = digit_scenes(mnist.train_x, mnist.train_y, 48, generator=torch.Generator().manual_seed(0))
    kw = dict(epochs=2, batch_size=8, lr=2e-3, entropy_weight=0.01, seed=3)  # 6 steps per epoch, 12 in all
    whole, res_whole = caption.fit_captioner("hard", data, checkpoint_dir=tmp_path / "a", **kw)
    assert not res_whole.stopped and res_whole.step == 12

    calls = {"n": 0}
    real = caption.caption_loss

    def interrupting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(caption, "caption_loss", interrupting)
    _, part = caption.fit_captioner("hard", data, checkpoint_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(caption, "caption_loss", real)
    assert part.stopped and part.step == 5
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000005"]
    resumed, res = caption.fit_captioner("hard", data, checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert res.step == 12 and not res.stopped
    a = load_checkpoint(tmp_path / "a").model_state
    b = load_checkpoint(tmp_path / "b").model_state
    assert any(k.startswith("baseline.") for k in a)  # the REINFORCE baseline travels with the weights
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert resumed.expected_prob == whole.expected_prob
    with pytest.raises(ValueError, match="lr"):  # another recipe does not continue this one's checkpoint
        caption.fit_captioner("hard", data, checkpoint_dir=tmp_path / "b", resume=True, **{**kw, "lr": 1e-3})


def test_a_fresh_run_removes_an_older_runs_checkpoints(tmp_path: Path) -> None:
    """Without resume, checkpoints an older (longer) run left in the folder go, so --resume later continues this
    run and not the older one's newer steps."""
    mnist = load_mnist()
    data = digit_scenes(mnist.train_x, mnist.train_y, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(batch_size=8, lr=2e-3, entropy_weight=0.01, seed=0, checkpoint_dir=tmp_path)
    caption.fit_captioner("soft", data, epochs=5, **kw)  # 10 steps
    caption.fit_captioner("soft", data, epochs=4, **kw)  # 8 steps, fresh
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000008"]
