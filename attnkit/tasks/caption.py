"""``attnkit caption``: Show-Attend-and-Tell on multi-digit MNIST scenes, soft vs hard attention.

Paper: Xu et al. "Show, Attend and Tell: Neural Image Caption Generation with Visual Attention", ICML 2015.
https://arxiv.org/abs/1502.03044

Scenes hold 2-4 real MNIST digits on a 36x128 canvas; the caption is the digits' words from left to right
("seven two nine"). Training scenes use MNIST's training digits, the held-out scenes its test digits. Reported:
exact-caption accuracy, token accuracy (words right at their position), corpus BLEU (sacrebleu), training time,
and the mean entropy of the attention distribution (nats; log 80 = 4.38 is uniform over the 5x16 grid).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnkit._argtypes import (
    add_checkpoint_arguments,
    choice_list,
    non_negative_float,
    non_negative_int,
    output_dir,
    positive_float,
    positive_int,
    probability,
)
from attnkit._table import format_table
from attnkit.data import load_mnist
from attnkit.data.scenes import EOS, CaptionScenes, decode_caption, digit_scenes
from attnkit.layers.hard import MovingAverageBaseline
from attnkit.models.captioner import ATTENTIONS, ShowAttendTell, caption_loss
from attnkit.tasks.report import Section
from attnkit.train.checkpoint import run_folder
from attnkit.train.loop import STOPPED, FitConfig, FitResult, fit

HELP = "Show-Attend-and-Tell on multi-digit MNIST scenes: soft vs hard (REINFORCE) attention"

# final probability that a training step uses the expected context (Xu et al. 2015 use 0.5 for hard attention)
DEFAULT_EXPECTED_PROB = {"hard": 0.5, "gumbel": 0.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--attention",
        type=choice_list(ATTENTIONS, what="names", option="--attention", example="soft,hard"),
        default="soft,hard",
        help="comma-separated: soft, hard, gumbel",
    )
    p.add_argument("--quick", action="store_true", help="small data, few epochs (CI / tour, ~1-2 min)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs (default: 4 quick, 10 full)")
    p.add_argument("--train-size", type=positive_int, default=None, help="training scenes (default: 4000 quick, 40000)")
    p.add_argument("--test-size", type=positive_int, default=None, help="held-out scenes (default: 500 quick, 5000)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="training batch (default 32)")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument(
        "--entropy-weight", type=non_negative_float, default=0.01, help="entropy bonus of hard attention (0 = none)"
    )
    p.add_argument(
        "--reinforce-weight", type=non_negative_float, default=0.1, help="weight of the REINFORCE term (lambda_r)"
    )
    p.add_argument(
        "--expected-prob",
        type=probability,
        default=None,
        help="hard/gumbel: final probability of using the expected context at a step (default: 0.5 hard, 0 gumbel)",
    )
    p.add_argument(
        "--expected-anneal",
        type=probability,
        default=1.0,
        help="fraction of the steps over which that probability falls from 1 (soft) to --expected-prob; 0 = none",
    )
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hard: divide the REINFORCE advantages by their batch standard deviation",
    )
    p.add_argument("--tau", type=positive_float, default=1.0, help="gumbel: temperature of the relaxed softmax")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=output_dir, default="runs/caption", help="folder for results.json and overlays")
    add_checkpoint_arguments(p)


def _parse_attention(text: str | list[str]) -> list[str]:
    names = [t.strip() for t in (str(text).split(",") if isinstance(text, str) else text) if t.strip()]
    if not names or any(n not in ATTENTIONS for n in names):
        raise ValueError(f"expected --attention from {ATTENTIONS}, got {text!r}; try --attention soft,hard")
    return names


def _check_counts(**counts: int | None) -> None:
    """Counts given to :func:`run_experiment` (the CLI refuses them while parsing): each at least 1."""
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            option = "--" + name.replace("_", "-")
            raise ValueError(f"expected {option} >= 1, got {value!r}; try {option} 1 or more")


def expected_schedule(step: int, total: int, *, final: float, anneal: float) -> float:
    """The curriculum of hard attention: the probability that training step ``step`` (of ``total``) uses the
    expected context; 1 (soft attention) at step 0, falling linearly to ``final`` at ``anneal * total`` steps.

    Example:
        >>> [round(expected_schedule(s, 100, final=0.5, anneal=0.5), 2) for s in (0, 25, 50, 99)]
        [1.0, 0.75, 0.5, 0.5]
    """
    if anneal <= 0:
        return final
    frac = min(step / (anneal * total), 1.0)
    return 1.0 + (final - 1.0) * frac


@dataclass
class CaptionSettings:
    """Everything that decides a captioning study's numbers (saved in results.json); ``None`` counts take the
    quick or full default (4 / 10 epochs, 4,000 / 40,000 training and 500 / 5,000 held-out scenes)."""

    attention: tuple[str, ...] = ("soft", "hard")
    quick: bool = False
    epochs: int | None = None
    train_size: int | None = None
    test_size: int | None = None
    batch_size: int = 32
    lr: float = 2e-3
    entropy_weight: float = 0.01
    reinforce_weight: float = 0.1
    expected_prob: float | None = None
    expected_anneal: float = 1.0
    normalize: bool = True
    tau: float = 1.0
    seed: int = 0
    save_every: int = 0  # checkpoint every N steps (0: at the end of each model and on a stop signal)
    resume: bool = False  # continue each model from its newest checkpoint under out/checkpoints/<attention>

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CaptionSettings:
        """The settings of ``attnkit caption`` from its parsed arguments."""
        return cls(
            attention=tuple(_parse_attention(args.attention)), quick=args.quick, epochs=args.epochs,
            train_size=args.train_size, test_size=args.test_size, batch_size=args.batch_size, lr=args.lr,
            entropy_weight=args.entropy_weight, reinforce_weight=args.reinforce_weight,
            expected_prob=args.expected_prob, expected_anneal=args.expected_anneal, normalize=args.normalize,
            tau=args.tau, seed=args.seed, save_every=getattr(args, "save_every", 0) or 0,
            resume=bool(getattr(args, "resume", False)),
        )  # fmt: skip

    def resolved(self) -> CaptionSettings:
        """The same settings with the quick / full defaults filled in (and checked)."""
        out = replace(
            self,
            epochs=(4 if self.quick else 10) if self.epochs is None else self.epochs,
            train_size=(4000 if self.quick else 40_000) if self.train_size is None else self.train_size,
            test_size=(500 if self.quick else 5000) if self.test_size is None else self.test_size,
        )
        _check_counts(epochs=out.epochs, train_size=out.train_size, test_size=out.test_size, batch_size=out.batch_size)
        return out


class _Trainee(nn.Module):
    """The captioner and its REINFORCE baseline in one module, so a checkpoint holds both (exact resume)."""

    def __init__(self, model: ShowAttendTell, baseline: MovingAverageBaseline) -> None:
        super().__init__()
        self.model, self.baseline = model, baseline


def fit_captioner(
    attention: str,
    data: CaptionScenes,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    entropy_weight: float,
    seed: int,
    reinforce_weight: float = 0.1,
    expected_prob: float | None = None,
    expected_anneal: float = 1.0,
    normalize: bool = True,
    tau: float = 1.0,
    checkpoint_dir: str | Path | None = None,
    save_every: int = 0,
    resume: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> tuple[ShowAttendTell, FitResult]:
    """Train one captioner (teacher forcing) through :func:`attnkit.train.loop.fit`; returns the model in eval mode
    and fit's result (steps, stop signal, training seconds over every resumed part).

    Hard attention uses a curriculum: the probability that a step uses the expected context starts at 1 (soft
    attention) and falls linearly to ``expected_prob`` over the first ``expected_anneal`` fraction of the steps
    (0 = no curriculum, the paper's fixed ``expected_prob`` from the start). ``expected_prob=None`` means 0.5
    for ``"hard"`` (Xu et al.) and 0 for ``"gumbel"``. ``normalize`` divides the REINFORCE advantages by their
    standard deviation over the batch. The batch order, the sampled locations and the curriculum of step ``s``
    depend only on ``(seed, s)``, and the baseline is saved with the weights, so a run resumed from a checkpoint
    in ``checkpoint_dir`` ends as an uninterrupted one does. Without ``checkpoint_dir``: a temporary folder.
    """
    if expected_prob is None:
        expected_prob = DEFAULT_EXPECTED_PROB.get(attention, 0.0)
    if not 0.0 <= expected_anneal <= 1.0:
        raise ValueError(f"expected expected_anneal in [0, 1], got {expected_anneal!r}; try expected_anneal=1.0")
    torch.manual_seed(seed)
    model = ShowAttendTell(attention, expected_prob=expected_prob, tau=tau)
    trainee = _Trainee(model, MovingAverageBaseline(0.9))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data)
    per_epoch = (n + batch_size - 1) // batch_size
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05, div_factor=5.0)
    final = float(expected_prob)
    orders: dict[int, Tensor] = {}

    def loss_fn(net: nn.Module, step: int) -> tuple[Tensor, Tensor]:
        epoch, index = divmod(step, per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed((seed + 1) * 1_000_003 + epoch))
        g = torch.Generator().manual_seed(seed * 1_000_003 + 500_009 + step)  # this step's sampled locations
        model.expected_prob = expected_schedule(step, steps, final=final, anneal=expected_anneal)
        idx = orders[epoch][index * batch_size : (index + 1) * batch_size]
        tokens = data.tokens[idx]
        out = model(data.images[idx], tokens, generator=g)
        loss = caption_loss(
            out, tokens, baseline=trainee.baseline, entropy_weight=entropy_weight,
            reinforce_weight=reinforce_weight, normalize=normalize,
        )  # fmt: skip
        return loss.total, torch.tensor(1)  # the loss is a mean already

    run_config = {
        "task": "caption", "attention": attention, "epochs": epochs, "train_size": n, "batch_size": batch_size,
        "lr": lr, "entropy_weight": entropy_weight, "seed": seed, "reinforce_weight": reinforce_weight,
        "expected_prob": final, "expected_anneal": expected_anneal, "normalize": normalize, "tau": tau,
    }  # fmt: skip
    config = FitConfig(steps=steps, lr=lr, clip=5.0, eval_every=0, save_every=save_every, log_every=0, keep=1,
                       progress_label=f"caption {attention}")  # fmt: skip
    with run_folder(checkpoint_dir, resume=resume, expect_config=run_config) as (folder, start):
        result = fit(trainee, loss_fn, config, checkpoint_dir=folder, run_config=run_config, resume=start, log=log,
                     optimizer=opt, scheduler=sched)  # fmt: skip
    model.expected_prob = expected_schedule(max(result.step - 1, 0), steps, final=final, anneal=expected_anneal)
    model.eval()
    return model, result


def train_captioner(attention: str, data: CaptionScenes, **kwargs: Any) -> tuple[ShowAttendTell, float]:
    """:func:`fit_captioner` without checkpoints to keep; returns the model in eval mode and the training seconds."""
    model, result = fit_captioner(attention, data, **kwargs)
    return model, result.seconds


@torch.no_grad()
def evaluate_captioner(model: ShowAttendTell, data: CaptionScenes, batch_size: int = 250) -> dict:
    """Greedy captions of held-out scenes vs the references: exact match, token accuracy, BLEU, entropy."""
    import sacrebleu

    model.eval()
    hyps, refs = [], []
    exact = right = total = 0
    entropy_sum, entropy_n = 0.0, 0
    max_len = data.tokens.shape[1]
    for i in range(0, len(data), batch_size):
        ids, out = model.generate(data.images[i : i + batch_size], max_len=max_len)
        ref = data.tokens[i : i + batch_size]  # (b, T)
        valid = ref != 0  # (b, T): words and <eos>
        words = valid & (ref != EOS)
        exact += int(((ids == ref) | ~valid).all(1).sum())
        right += int(((ids == ref) & words).sum())
        total += int(words.sum())
        p = out.probs  # (b, T, S): the attention distribution at each decoded word
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1)  # (b, T)
        entropy_sum += float((ent * words).sum())
        entropy_n += int(words.sum())
        hyps += [decode_caption(r) for r in ids]
        refs += [decode_caption(r) for r in ref]
    bleu = sacrebleu.corpus_bleu(hyps, [refs])
    return {
        "exact_caption_accuracy": 100.0 * exact / len(data),
        "token_accuracy": 100.0 * right / max(total, 1),
        "bleu": bleu.score,
        "attention_entropy": entropy_sum / max(entropy_n, 1),
        "examples": [{"reference": r, "generated": h} for r, h in zip(refs[:8], hyps[:8], strict=True)],
    }


def plot_overlays(model: ShowAttendTell, data: CaptionScenes, path: Path, index: int = 0) -> Path:
    """Per-word attention overlays for one held-out scene (the map used at each generated word)."""
    from attnkit.viz.plot import image_overlay

    with torch.no_grad():
        ids, out = model.generate(data.images[index : index + 1], max_len=data.tokens.shape[1])
    words = decode_caption(ids[0]).split()
    n = len(words) + 1  # the words and <eos>
    h, w = out.grid
    maps = out.probs[0, :n].view(n, h, w)  # the attention distribution (for hard: the policy it sampled from)
    titles = [*words, "<eos>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_overlay(data.images[index, 0], maps, titles=titles, ncols=3, panel=2.6, save=path)
    return path


def run_experiment(attentions: list[str], *, quick: bool, out_dir: Path, **kwargs: Any) -> dict:
    """:func:`run_study` with the settings as keyword arguments (the fields of :class:`CaptionSettings`)."""
    return run_study(CaptionSettings(attention=tuple(attentions), quick=quick, **kwargs), out_dir)


def run_study(settings: CaptionSettings, out_dir: Path) -> dict:
    """Train and evaluate one captioner per attention; write ``results.json`` and the overlays into ``out_dir``.

    Checkpoints go to ``out_dir/checkpoints/<attention>``; with ``settings.resume`` each model continues from its
    newest one. A stop signal ends the study early: the result then has ``"stopped": True`` and no results file.
    """
    s = settings.resolved()
    epochs, train_size, test_size = cast(int, s.epochs), cast(int, s.train_size), cast(int, s.test_size)
    mnist = load_mnist()
    train = digit_scenes(mnist.train_x, mnist.train_y, train_size, generator=torch.Generator().manual_seed(s.seed))
    test = digit_scenes(mnist.test_x, mnist.test_y, test_size, generator=torch.Generator().manual_seed(s.seed + 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for name in s.attention:
        model, fitted = fit_captioner(
            name, train, epochs=epochs, batch_size=s.batch_size, lr=s.lr, entropy_weight=s.entropy_weight,
            seed=s.seed, reinforce_weight=s.reinforce_weight, expected_prob=s.expected_prob,
            expected_anneal=s.expected_anneal, normalize=s.normalize, tau=s.tau,
            checkpoint_dir=out_dir / "checkpoints" / name, save_every=s.save_every, resume=s.resume,
        )  # fmt: skip
        if fitted.stopped:
            return {"stopped": True, "settings": asdict(s), "results": results}
        metrics = evaluate_captioner(model, test)
        picture = plot_overlays(model, test, out_dir / f"caption_overlay_{name}.png")
        results.append(
            {
                "attention": name,
                "seconds": fitted.seconds,
                "cpu_seconds": fitted.cpu_seconds,
                "steps": fitted.step,
                "picture": str(picture),
                "final_expected_prob": model.expected_prob,  # after the curriculum (None in settings: the default)
                **metrics,
            }
        )
    summary = {
        "settings": {k: v for k, v in asdict(s).items() if k not in ("attention", "resume", "save_every")},
        "uniform_entropy": math.log(80),  # the 5x16 feature grid of a 36x128 scene
        "results": results,
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def result_rows(summary: dict) -> list[list[str]]:
    rows = [["attention", "exact caption", "token acc.", "BLEU", "attention entropy", "train time"]]
    for r in summary["results"]:
        rows.append(
            [
                r["attention"],
                f"{r['exact_caption_accuracy']:.1f}%",
                f"{r['token_accuracy']:.1f}%",
                f"{r['bleu']:.1f}",
                f"{r['attention_entropy']:.2f} nats",
                f"{r['seconds']:.0f} s",
            ]
        )
    return rows


def run(args: argparse.Namespace) -> int:
    summary = run_study(CaptionSettings.from_args(args), Path(args.out))
    if summary.get("stopped"):
        print(f"stopped by a signal; checkpoints in {args.out}/checkpoints; continue: the same command with --resume")
        return STOPPED
    s = summary["settings"]
    print(
        f"Show-Attend-and-Tell on 2-4 digit MNIST scenes: {s['train_size']} training scenes x {s['epochs']} "
        f"epochs; {s['test_size']} held-out scenes of MNIST test digits. Uniform attention entropy = "
        f"{summary['uniform_entropy']:.2f} nats."
    )
    print(format_table(result_rows(summary)))
    for r in summary["results"]:
        ex = r["examples"][0]
        print(f"{r['attention']}: '{ex['reference']}' -> '{ex['generated']}'; overlays: {r['picture']}")
    return 0


def tour_section(out_dir: Path, quick: bool) -> Section:
    start = time.perf_counter()
    folder = out_dir / "caption"
    # The tour is the short version: its full mode stays within minutes (the full study is `attnkit caption`).
    summary = run_experiment(
        ["soft", "hard"],
        quick=quick,
        out_dir=folder,
        train_size=None if quick else 8000,
        epochs=None if quick else 5,
        test_size=None if quick else 1000,
    )
    s = summary["settings"]
    return Section(
        title="Show, Attend and Tell: soft vs hard attention on digit scenes",
        summary=(
            f"Captions of 2-4 digit MNIST scenes, {s['train_size']} training scenes x {s['epochs']} epochs, "
            f"{s['test_size']} held-out scenes. Hard attention is trained with REINFORCE (moving-average baseline, "
            "advantages normalised over the batch, entropy bonus) after a curriculum that starts as soft attention "
            "(the expected context at every step, falling to half the steps). Overlays show the attention "
            "distribution at each generated word."
        ),
        table=result_rows(summary),
        images=[str(Path(r["picture"]).relative_to(out_dir)) for r in summary["results"]],
        links=[("results (JSON)", "caption/results.json")],
        seconds=time.perf_counter() - start,
    )

