"""``python -m attnkit.bench vision``: what each CNN attention block costs inside the classification CNN.

For every block (none = the plain CNN, the baseline; SE, ECA, CBAM, CBAM's channel and spatial halves, non-local)
the same :class:`~attnkit.models.cnn.AttentionCNN` (28x28 grey input) is built with that block after each stage,
and in one process we measure:

* parameters and those the blocks add (exact counts);
* a training step (forward + backward) and an inference forward (eval mode, no grad) on one batch, in wall and
  process CPU time.

The models are timed **interleaved** (each round runs every model once, rotating who goes first), so a machine
shared with other jobs slows all of them alike; the table gives medians and ratios ``plain time / time`` on CPU
time (below 1 means the block costs time). Nothing here asserts a timing.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from attnkit._runtime import torch_threads
from attnkit.models.cnn import AttentionCNN, count_parameters

from ._timing import Table, interleaved_medians, machine_line, ratio

BLOCKS = ("none", "se", "eca", "cbam", "channel", "spatial", "non_local")


def main(quick: bool = False, out: str | None = None) -> int:
    batch, rounds = (16, 3) if quick else (128, 10)
    with torch_threads(1 if quick else None):  # tiny batches: one thread avoids contention on a shared CI machine
        return _run(batch, rounds, out)


def _run(batch: int, rounds: int, out: str | None) -> int:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=g)  # (B, 1, 28, 28)
    y = torch.randint(0, 10, (batch,), generator=g)
    models = {}
    for name in BLOCKS:
        torch.manual_seed(0)
        models[name] = AttentionCNN(10, attention=name)

    def train_step(model: AttentionCNN) -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    @torch.no_grad()
    def infer(model: AttentionCNN) -> None:
        model.eval()
        model(x)

    train = interleaved_medians({n: functools.partial(train_step, m) for n, m in models.items()}, rounds=rounds)
    test = interleaved_medians({n: functools.partial(infer, m) for n, m in models.items()}, rounds=rounds)
    plain = count_parameters(models["none"])
    table = Table(
        f"CNN attention blocks: overhead vs the plain CNN (batch {batch}, 1x28x28, float32, CPU)",
        ["block", "params", "added params", "train ms (wall / CPU)", "train vs plain (CPU)",
         "infer ms (wall / CPU)", "infer vs plain (CPU)"],
    )
    for name, model in models.items():
        params = count_parameters(model)
        table.add(
            name,
            f"{params:,}",
            "—" if name == "none" else f"+{params - plain:,} ({100 * (params - plain) / plain:.2f}%)",
            f"{train[name][0] * 1e3:.1f} / {train[name][1] * 1e3:.1f}",
            ratio(train[name][1], train["none"][1]),
            f"{test[name][0] * 1e3:.1f} / {test[name][1] * 1e3:.1f}",
            ratio(test[name][1], test["none"][1]),
        )
    table.notes = [
        f"medians of {rounds} interleaved rounds after one warm-up; ratio = plain time / time (above 1 = faster), "
        "on process CPU time, which a machine shared with other jobs disturbs less than wall time",
        "one attention block per stage (3 stages: 14x14, 7x7, 4x4); widths 16, 32, 64",
        machine_line(),
    ]
    print(table.text())
    table.save(out, "vision")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(quick="--quick" in sys.argv))
