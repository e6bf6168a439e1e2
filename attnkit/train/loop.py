"""A training loop that never loses work: exact resume, stop signals, periodic validation, DDP.

* **Data position is the step.** :class:`BatchPlan` derives the batch of step ``s`` from ``(seed, s)`` alone
  (a fresh permutation per epoch), so resuming at step ``s`` reads exactly the batches an uninterrupted run reads.
* **RNG, optimiser and scheduler** are saved and restored with the weights (:mod:`attnkit.train.checkpoint`):
  an interrupted-and-resumed run ends with the same weights as an uninterrupted one.
* **SIGTERM / SIGINT** finish the current step, write a checkpoint and return :data:`STOPPED`; ``SIGKILL``
  loses at most the steps since the last periodic checkpoint.
* **DDP**: every rank reads its shard of the same global batch; the loss is the sum over all target tokens of
  the global batch divided by their count, so the gradient equals the one-process gradient of that batch.

Example:
    >>> from attnkit.train.loop import BatchPlan
    >>> plan = BatchPlan(lengths=[3, 5, 2, 8, 4, 6, 7, 1], batch_size=4, seed=0)
    >>> len(plan), sorted(plan.batch(0) + plan.batch(1)) == list(range(8))     # one epoch covers every item
    (2, True)
    >>> plan.batch(5) == BatchPlan([3, 5, 2, 8, 4, 6, 7, 1], batch_size=4, seed=0).batch(5)   # stateless
    True
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnkit._errors import fail

from . import distributed as D
from .checkpoint import Checkpoint, restore, save_checkpoint

__all__ = ["STOPPED", "BatchPlan", "FitConfig", "FitResult", "fit", "inverse_sqrt_schedule", "stop_signals"]

STOPPED = 143  # exit status after a stop signal (128 + SIGTERM), with a checkpoint written


class BatchPlan:
    """Deterministic, stateless batches: ``batch(step)`` depends only on ``(seed, step)``.

    Each epoch draws a permutation from ``seed + epoch``; within pools of ``pool`` batches the items are sorted by
    length so a batch holds similar lengths (less padding), then the batches of the epoch are shuffled.
    With ``world_size > 1`` each rank gets every ``world_size``-th item of the *global* batch (its shard).

    Args:
        lengths: one length per item (used only for bucketing).
        batch_size: global batch size (items per step over all ranks).
        seed: the data order's seed.
        rank: this process's rank.
        world_size: how many processes share each batch.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, pool: int = 50
    ) -> None:
        if not lengths:
            raise fail("at least one training item", "none", "a looser length filter or more data")
        if not isinstance(batch_size, int) or batch_size < world_size:
            raise fail(f"batch_size >= world size ({world_size})", repr(batch_size), f"--batch-size {world_size * 16}")
        if batch_size % world_size:
            raise fail(
                f"a global batch_size divisible by the number of processes ({world_size})",
                str(batch_size),
                f"--batch-size {batch_size - batch_size % world_size}",
            )
        self.lengths = torch.as_tensor(lengths)
        self.batch_size, self.seed, self.rank, self.world_size, self.pool = batch_size, seed, rank, world_size, pool
        self._epoch: int | None = None
        self._batches: list[list[int]] = []

    def __len__(self) -> int:
        """Batches per epoch (the last partial batch is dropped)."""
        return max(1, len(self.lengths) // self.batch_size)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.lengths), generator=g)
        n = len(self) * self.batch_size
        perm = perm[:n] if n <= len(perm) else perm
        chunk = self.batch_size * self.pool
        batches = []
        for i in range(0, len(perm), chunk):
            part = perm[i : i + chunk]
            part = part[torch.argsort(self.lengths[part], stable=True)]
            batches += [part[j : j + self.batch_size].tolist() for j in range(0, len(part), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def global_batch(self, step: int) -> list[int]:
        epoch, index = divmod(step, len(self))
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[index]

    def batch(self, step: int) -> list[int]:
        """This rank's items for ``step``."""
        return self.global_batch(step)[self.rank :: self.world_size]


def inverse_sqrt_schedule(warmup: int) -> Callable[[int], float]:
    """Linear warm-up to 1 over ``warmup`` steps, then ``sqrt(warmup / step)`` (Vaswani et al. 2017)."""
    warmup = max(1, warmup)

    def factor(step: int) -> float:
        s = step + 1
        return min(s / warmup, math.sqrt(warmup / s))

    return factor


@contextmanager
def stop_signals() -> Iterator[dict[str, int]]:
    """While inside, SIGTERM and SIGINT only set ``flag["signal"]``: the loop finishes its step and stops."""
    flag = {"signal": 0}

    def handler(signum: int, frame: Any) -> None:
        flag["signal"] = signum

    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread: leave the defaults
            old[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@dataclass
class FitConfig:
    """Settings of :func:`fit`.

    Args:
        steps: the last step (resumed runs continue up to it).
        lr: peak learning rate of the inverse-sqrt schedule.
        warmup: its warm-up steps.
        clip: gradient-norm clipping (``0`` disables).
        weight_decay: AdamW's decoupled weight decay.
        eval_every: validation interval in steps (``0``: only at the end).
        save_every: checkpoint interval in steps (``0``: only at the end and on a stop signal).
        log_every: progress-line interval in steps.
        keep: checkpoints kept.
        progress: show progress on stderr (rank 0 only): a live bar on a terminal, else a plain line every 5 % or
            30 s (:mod:`attnkit._progress`).
        progress_label: the progress line's label (e.g. ``"se seed 2"`` when one command trains many models).
    """

    steps: int
    lr: float = 1e-3
    warmup: int = 100
    clip: float = 1.0
    weight_decay: float = 0.0
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    keep: int = 3
    progress: bool = True
    progress_label: str = "train"


@dataclass
class FitResult:
    """Where :func:`fit` ended; ``seconds`` counts training time over every resumed part."""

    step: int
    loss: float
    history: list[dict[str, float]]
    stopped: bool
    seconds: float
    cpu_seconds: float = 0.0


LossFn = Callable[[nn.Module, int], tuple[Tensor, Tensor]]


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    config: FitConfig,
    *,
    checkpoint_dir: str | Path,
    run_config: dict[str, Any],
    files: dict[str, bytes] | None = None,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
    resume: Checkpoint | None = None,
    log: Callable[[str], None] = print,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> FitResult:
    """Train ``model`` for ``config.steps`` steps with AdamW, checkpointing so no work is lost.

    Args:
        model: on its device already.
        loss_fn: ``loss_fn(model, step) -> (loss_sum, count)`` for this rank's shard of step ``step``'s batch:
            the summed loss and the number of items (tokens) it sums over.
        checkpoint_dir: where checkpoints go (rank 0 writes them).
        run_config: JSON settings stored in every checkpoint (model and data options).
        files: extra files stored in every checkpoint (tokenizers).
        validate: ``validate(model) -> metrics`` run every ``eval_every`` steps and at the end (model in eval
            mode, no gradients).
        resume: a loaded checkpoint to continue from (weights, optimiser, scheduler, RNG and step).
        log: where one-line progress messages go.
        optimizer: the optimiser to step (default AdamW with ``config.lr`` and ``config.weight_decay``).
        scheduler: its learning-rate scheduler, stepped once per step (default: with the default optimiser, the
            inverse-sqrt schedule with ``config.warmup``; with a given optimiser, none). Both are saved in every
            checkpoint and restored on resume.
    """
    w = D.world()
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        if scheduler is None:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, inverse_sqrt_schedule(config.warmup))
    start = 0
    history: list[dict[str, float]] = []
    before = 0.0  # training seconds of earlier runs of this training (resumed runs add theirs)
    before_cpu = 0.0  # the same in process CPU time (less sensitive to a busy machine)
    if resume is not None:
        restore(resume, model, optimizer, scheduler)
        start = resume.step
        history = list(resume.extra.get("history", []))
        before = float(resume.extra.get("seconds", 0.0))
        before_cpu = float(resume.extra.get("cpu_seconds", 0.0))
        log(f"resumed from {resume.path} at step {start}")
    net: nn.Module = model
    if w.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[w.device.index] if w.device.type == "cuda" else None
        )

    def save(step: int) -> None:
        if w.is_main:
            path = save_checkpoint(
                checkpoint_dir,
                step=step,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                config=run_config,
                extra={
                    "history": history,
                    "seconds": before + time.perf_counter() - t0,
                    "cpu_seconds": before_cpu + time.process_time() - c0,
                },
                files=files,
                keep=config.keep,
            )
            log(f"checkpoint {path}")
        D.barrier()

    def run_validation(step: int) -> None:
        if validate is None:
            return
        model.eval()
        with torch.no_grad():
            metrics = validate(model)
        model.train()
        history.append({"step": step, **metrics})
        log(f"step {step} validation " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    bar = None
    if config.progress and w.is_main and start < config.steps:
        from attnkit._progress import progress

        bar = progress(config.steps, config.progress_label, unit="step", initial=start, file=sys.stderr)
    t0, c0 = time.perf_counter(), time.process_time()
    loss_value = float("nan")
    stopped = False
    step = start
    model.train()
    with stop_signals() as flag:
        while step < config.steps:
            loss_sum, count = loss_fn(net, step)
            total = D.all_reduce_sum(count.detach().to(torch.float64).reshape(1))  # tokens of the global batch
            # DDP averages gradients over ranks: scale so the result is d(global sum) / (global count)
            (loss_sum * (w.size / total.to(loss_sum.dtype))).backward()
            if config.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(D.all_reduce_sum(loss_sum.detach().to(torch.float64).reshape(1)) / total)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if config.log_every and (step % config.log_every == 0 or step == config.steps):
                log(f"step {step}/{config.steps} loss {loss_value:.4f} lr {optimizer.param_groups[0]['lr']:.2e}")
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                run_validation(step)
            if D.any_flag(bool(flag["signal"])):
                stopped = True
                save(step)
                log(f"stopped by signal at step {step}; continue with --resume")
                break
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                save(step)
    if bar is not None:
        bar.close()
    if not stopped:
        run_validation(step)
        save(step)
    seconds = before + time.perf_counter() - t0
    cpu = before_cpu + time.process_time() - c0
    return FitResult(step, loss_value, history, stopped, seconds, cpu)
