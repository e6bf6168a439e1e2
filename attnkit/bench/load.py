"""Training throughput on a shared machine: a quick captioner training alone, then beside one busy process.

``python -m attnkit.bench load`` runs the same workload (the soft-attention captioner of ``attnkit caption``, real
MNIST digit scenes, batches of 32, forward + backward + Adam) in fresh child processes under several thread
settings, each once on a quiet machine and once beside one competing process (a plain Python loop, normal
priority), and prints steps per second and the loaded/quiet ratio. A fair share of two cores with one competitor
costs at most 2x (ratio >= 0.5); PyTorch's defaults collapse far below that (see docs/performance.md).

The settings compared:

* ``torch default``: what a plain ``import torch`` does: one intra-op thread per core and OpenMP's default
  waiting (threads spin at every barrier before they sleep);
* ``attnkit``: what the ``attnkit`` command sets up (:func:`attnkit._runtime.configure_process`): threads from the
  cores the process may use (affinity and cgroup quota) and passive waiting at OpenMP barriers;
* ``1 thread``: a single intra-op thread.

Each child builds its data first and times only the training steps (after warm-up steps), so start-up is not
counted. Read the ratios, not the absolute figures: they are measured in this run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HELP = "training throughput alone and beside one busy process, under several thread settings"

# name -> environment overrides of the child (None: leave the variable unset).
SETTINGS: dict[str, dict[str, str | None]] = {
    "torch default": {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": None, "ATTNKIT_CONFIGURE": "0"},
    "attnkit": {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": None, "ATTNKIT_CONFIGURE": "1"},
    "1 thread": {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": "1", "ATTNKIT_CONFIGURE": "0"},
    "passive wait": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": None, "ATTNKIT_CONFIGURE": "0"},
}


def _busy(seconds: float) -> None:  # the competitor: a plain Python loop
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1


def _child(steps: int, warmup: int) -> dict[str, float]:
    """Train the captioner for ``warmup + steps`` steps; returns steps/s of the timed part and the thread count."""
    import torch

    from attnkit._runtime import configure_process, governor_tick

    if os.environ.get("ATTNKIT_CONFIGURE") == "1":
        configure_process()

    from attnkit.data import load_mnist
    from attnkit.data.scenes import digit_scenes
    from attnkit.layers.hard import MovingAverageBaseline
    from attnkit.models.captioner import ShowAttendTell, caption_loss

    torch.manual_seed(0)
    split = load_mnist()
    g = torch.Generator().manual_seed(1)
    data = digit_scenes(split.train_x[:5000], split.train_y[:5000], 32 * (steps + warmup), generator=g)
    model = ShowAttendTell("soft")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    baseline = MovingAverageBaseline(0.9)
    start = 0.0
    for step in range(steps + warmup):
        if step == warmup:
            start = time.perf_counter()
        idx = slice(32 * step, 32 * (step + 1))
        out = model(data.images[idx], data.tokens[idx], generator=g)
        loss = caption_loss(out, data.tokens[idx], baseline=baseline, entropy_weight=0.01)
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        opt.step()
        governor_tick()
    return {"steps_per_s": steps / (time.perf_counter() - start), "threads": float(torch.get_num_threads())}


def _measure(setting: str, steps: int, warmup: int, competitor: bool) -> dict[str, float]:
    env = dict(os.environ)
    for name, value in SETTINGS[setting].items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    busy = None
    if competitor:
        busy = subprocess.Popen([sys.executable, "-c", f"from attnkit.bench.load import _busy; _busy({3600})"])
        time.sleep(0.5)
    try:
        proc = subprocess.run([sys.executable, "-m", "attnkit.bench.load", "--child", "--steps", str(steps),
                               "--warmup", str(warmup)], env=env, capture_output=True, text=True, timeout=1800)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"bench child failed: {proc.stderr.strip()[-500:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(quick: bool = False, out: str | None = None) -> int:
    from attnkit._runtime import available_cores, cpu_model

    steps, warmup = (30, 5) if quick else (120, 10)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"bench load: {cpu_model()}, {os.cpu_count()} CPUs, {available_cores()} available to this process, "
          f"load average {load:.2f} at the start; {steps} timed steps (batch 32) per figure")
    rows: list[tuple[str, dict[str, float], dict[str, float]]] = []
    for setting in SETTINGS:
        quiet = _measure(setting, steps, warmup, competitor=False)
        loaded = _measure(setting, steps, warmup, competitor=True)
        rows.append((setting, quiet, loaded))
        print(f"  {setting:<14} quiet {quiet['steps_per_s']:6.1f} steps/s ({quiet['threads']:.0f} threads), beside "
              f"one busy process {loaded['steps_per_s']:6.1f} steps/s ({loaded['threads']:.0f} threads): "
              f"{loaded['steps_per_s'] / quiet['steps_per_s']:.0%} of quiet", flush=True)
    best = max(quiet["steps_per_s"] for _, quiet, _ in rows)
    lines = ["| setting | quiet: steps/s (threads) | beside one busy process: steps/s (threads) | loaded / quiet | "
             "loaded / best quiet |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {q['steps_per_s']:.1f} ({q['threads']:.0f}) | {ld['steps_per_s']:.1f} "
              f"({ld['threads']:.0f}) | {ld['steps_per_s'] / q['steps_per_s']:.0%} | {ld['steps_per_s'] / best:.0%} |"
              for name, q, ld in rows]
    table = "\n".join(lines)
    print(table)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "load.md").write_text(table + "\n", encoding="utf-8")
        Path(out, "load.json").write_text(json.dumps({"cpu": cpu_model(), "load_average": load, "steps": steps,
                                                      "rows": [{"setting": n, "quiet": q, "loaded": ld}
                                                               for n, q, ld in rows]}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.load", description=HELP)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.steps, args.warmup)))
        sys.exit(0)
    sys.exit(main(quick=args.quick, out=args.out))
