"""The attention CNN, the ``attnkit classify`` task (tiny real-data runs) and the vision benchmark."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

import attnkit.data.images as images
from attnkit.cli import main as cli_main
from attnkit.layers import CBAM, NonLocalBlock, SqueezeExcite
from attnkit.models.cnn import AttentionCNN, count_parameters
from attnkit.tasks import classify
from attnkit.viz import capture


@pytest.fixture(autouse=True)
def _one_thread():  # noqa: ANN202  (small models: threads only add contention on a shared machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("attention", ["none", "se", "eca", "cbam", "spatial", "non_local"])
def test_cnn_shapes_and_added_parameters(attention: str) -> None:
    model = AttentionCNN(10, attention=attention)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    plain = count_parameters(AttentionCNN(10))
    blocks = sum(count_parameters(s.attention) for s in model.stages)
    assert count_parameters(model) == plain + blocks


def test_cnn_gates_sit_on_the_residual_branch() -> None:
    model = AttentionCNN(10, attention="se", widths=(8, 16, 32)).eval()
    for stage in model.stages:
        assert isinstance(stage.blocks[-1].attn, SqueezeExcite)
        assert isinstance(stage.post, torch.nn.Identity)
    nl = AttentionCNN(10, attention="non_local")
    assert all(isinstance(s.post, NonLocalBlock) for s in nl.stages)
    mixed = AttentionCNN(10, attention=["none", "se", "cbam"])
    assert [type(s.attention).__name__ for s in mixed.stages] == ["NoAttention", "SqueezeExcite", "CBAM"]
    x = torch.randn(2, 1, 28, 28)
    with capture(model) as rec:
        model(x)
    assert [tuple(r.tensor.shape) for r in rec.gates()] == [(2, 8, 1, 1), (2, 16, 1, 1), (2, 32, 1, 1)]
    cbam = AttentionCNN(10, attention="cbam").eval()
    with capture(cbam, kinds=["spatial"]) as rec:
        cbam(x)
    assert [tuple(r.tensor.shape) for r in rec.gates()] == [(2, 1, 14, 14), (2, 1, 7, 7), (2, 1, 4, 4)]
    assert isinstance(cbam.stages[0].attention, CBAM)


def test_cnn_bad_arguments() -> None:
    with pytest.raises(ValueError, match="expected an attention name"):
        AttentionCNN(10, attention="sqeeze")
    with pytest.raises(ValueError, match="one attention name per stage"):
        AttentionCNN(10, attention=["se", "se"])
    with pytest.raises(ValueError, match="stride"):
        AttentionCNN(10, strides=(2, 2))
    with pytest.raises(ValueError, match=r"images \(B, 1, H, W\)"):
        AttentionCNN(10)(torch.randn(2, 28, 28))
    model = AttentionCNN(10, attention="eca", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_tiny_study_through_the_tour_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tour's section, with its quick setting shrunk to a tiny study, writes consistent results."""
    config = classify.ClassifyConfig(
        dataset="mnist", attention=("none", "se", "cbam"), seeds=2, epochs=1, train_size=128, test_size=100,
        batch_size=16, widths=(8, 16, 32),
    )
    monkeypatch.setattr(classify, "quick_config", lambda dataset="mnist": config)
    section = classify.tour_section(tmp_path, True)
    assert section.images == ["classify/cbam_spatial.png", "classify/se_gates_per_class.png"]
    for _label, href in section.links:
        assert (tmp_path / href).is_file()
    assert section.table[0][:2] == ["attention", "test accuracy (%)"] and len(section.table) == 4
    out = tmp_path / "classify"
    data = json.loads((out / "classify_mnist.json").read_text())
    assert (out / "classify_mnist.md").read_text().startswith("| attention | test accuracy (%)")
    runs = data["runs"]
    assert [(r["attention"], r["seed"]) for r in runs] == [(a, s) for a in ("none", "se", "cbam") for s in (0, 1)]
    plain = count_parameters(AttentionCNN(10, widths=(8, 16, 32)))
    for row in data["summary"]:
        accs = [r["test_accuracy"] for r in runs if r["attention"] == row["attention"]]
        assert row["accuracy_mean"] == pytest.approx(statistics.fmean(accs))
        assert row["accuracy_std"] == pytest.approx(statistics.stdev(accs))
        # the t-based 95% interval of the mean over the 2 seeds: t(0.975, 1) = 12.706
        assert row["accuracy_ci95"] == pytest.approx(12.706 * statistics.stdev(accs) / 2**0.5)
        assert row["added_params"] == row["params"] - plain
        assert row["params"] == count_parameters(AttentionCNN(10, widths=(8, 16, 32), attention=row["attention"]))
    for name in section.images:
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 300_000


def test_depth_gives_a_resnet_14() -> None:
    """--depth 2: stem + 3 stages x 2 blocks x 2 convs + the classifier = 14 weight layers (1x1 shortcuts aside)."""
    from attnkit.cli import build_parser

    args = build_parser().parse_args(["classify", "--depth", "2", "--seeds", "5", "--attention", "none,se"])
    config = classify.ClassifyConfig.from_args(args)
    assert (config.depth, config.seeds, config.attention) == (2, 5, ("none", "se"))
    model = AttentionCNN(10, widths=config.widths, depth=config.depth, attention="se")
    from attnkit.models.cnn import BasicBlock

    stem = [m for m in model.stem.modules() if isinstance(m, torch.nn.Conv2d)]
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    layers = [*stem, *(c for b in blocks for c in (b.conv1, b.conv2)), model.head]
    assert len(layers) == 14
    assert "(14 weight layers)" in classify.describe(config)


def test_training_is_deterministic_per_seed() -> None:
    data = images.load_mnist().subset(train=128, test=64)
    x, _, _, _ = classify._normalise(data)
    config = classify.ClassifyConfig(dataset="mnist", epochs=1, batch_size=16, widths=(4, 8, 8))
    a, loss_a, _ = classify.train_model(config, "eca", 3, x, data.train_y)
    b, loss_b, _ = classify.train_model(config, "eca", 3, x, data.train_y)
    c, _, _ = classify.train_model(config, "eca", 4, x, data.train_y)
    assert loss_a == loss_b
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.head.weight, c.head.weight)


def test_stopped_and_resumed_study_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM in the middle of training writes a checkpoint and stops the study; ``resume`` ends with the same
    weights, loss and test accuracy, bit for bit, as a run that was never interrupted."""
    import dataclasses
    import os
    import signal

    from attnkit.train.checkpoint import list_checkpoints, load_checkpoint

    config = classify.ClassifyConfig(
        dataset="mnist", attention=("se",), seeds=1, epochs=2, train_size=96, test_size=64, batch_size=16,
        widths=(4, 8, 8), plots=False,
    )  # fmt: skip  # 6 steps per epoch, 12 in all
    whole = classify.run_study(config, tmp_path / "whole", log=lambda _m: None)
    assert not whole.stopped

    calls = {"n": 0}
    real = classify.F.cross_entropy

    def interrupting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5 (of epoch 1): a stop signal, as from Ctrl-C or a scheduler
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(classify.F, "cross_entropy", interrupting)
    part = classify.run_study(config, tmp_path / "parts", log=lambda _m: None)
    monkeypatch.setattr(classify.F, "cross_entropy", real)
    assert part.stopped and not part.runs
    ckpt_dir = tmp_path / "parts" / "checkpoints" / "se-seed0"
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step-00000005"]
    resumed = classify.run_study(dataclasses.replace(config, resume=True), tmp_path / "parts", log=lambda _m: None)
    assert not resumed.stopped
    a, b = whole.runs[0], resumed.runs[0]
    assert (a.test_accuracy, a.final_loss) == (b.test_accuracy, b.final_loss)
    wa = load_checkpoint(tmp_path / "whole" / "checkpoints" / "se-seed0").model_state
    wb = load_checkpoint(ckpt_dir).model_state
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # a checkpoint written with other settings is refused, not silently continued
    other = dataclasses.replace(config, resume=True, lr=0.02)
    with pytest.raises(ValueError, match="lr"):
        classify.run_study(other, tmp_path / "parts", log=lambda _m: None)


def test_cli_missing_data_and_bad_names_are_clean_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(images, "FASHION_DIR", tmp_path / "no-such-folder")
    assert cli_main(["classify", "--dataset", "fashion-mnist", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err
    assert cli_main(["classify", "--attention", "none,squeeze", "--out", str(tmp_path)]) == 2
    assert "expected comma-separated attention names" in capsys.readouterr().err


def test_bench_vision_quick_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:  # noqa: ANN001
    from attnkit.bench import vision

    monkeypatch.setattr(vision, "BLOCKS", ("none", "se", "cbam"))
    assert vision.main(quick=True, out=str(tmp_path)) == 0
    table = json.loads((tmp_path / "vision.json").read_text())
    assert [r[0] for r in table["rows"]] == ["none", "se", "cbam"]
    assert table["rows"][0][4] == "1.00x" and table["rows"][0][6] == "1.00x"
    assert "vs the plain CNN" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_mnist_run_reaches_sanity_accuracy() -> None:
    """The tour's quick setting (10,000 MNIST images, one epoch): every variant must learn (>= 95% test accuracy).
    An honest check that training works, not a tuned threshold."""
    config = classify.quick_config("mnist")
    config.plots = False
    result = classify.run_study(config, None, log=lambda _m: None)
    accuracies = {s["attention"]: s["accuracy_mean"] for s in result.summary}
    assert set(accuracies) == {"none", "se", "eca", "cbam"}
    assert min(accuracies.values()) >= 0.95, accuracies
