"""Suite ``long``: causal sliding-window attention on long sequences, attnkit against its peers, in one process.

For N in {4096, 16384, 65536}, H=8, E=64, fp32, a causal window of 512 that looks one bucket back (the
``local-attention`` package's parameterisation, :class:`attnkit.functional.WindowMask`), it times forward and
forward+backward and measures the extra peak memory of:

* dense masked SDPA: PyTorch's fused kernel with the materialised ``N x N`` boolean band (skipped when the estimated
  memory passes a guard, so the shared machine is never pushed out of memory);
* the ``local-attention`` package (``LocalAttention(window_size, causal=True)``);
* FlexAttention compiled with a block mask: **forward only** (no CPU backward in PyTorch);
* attnkit's :func:`~attnkit.functional.sliding_window_attention` on PyTorch's flash kernel (``impl="torch"``);
* attnkit's :func:`~attnkit.functional.sliding_window_attention` as users call it (``impl="auto"``: the native C
  kernel where it builds).

Then, at N=16384, the same kernels timed interleaved (every round calls each once, in turn) with one intra-op
thread: with one thread each, a ratio is the ratio of the work done, and it moves little when other jobs share the
cores (multithreaded kernels wait on each other there, some far more than others). Then block-sparse layouts
(BigBird, strided causal) at N=16384 on the native kernel against attnkit's PyTorch path. Then the chunked
kernel's peak memory for dense causal attention at N=32768 against PyTorch's SDPA (and the size the materialised
scores would take). Times are medians; ratios are against baselines measured in the same process.
``--out DIR`` writes ``long.md``, ``long.json`` and the log-log plot ``long.png``.
"""

from __future__ import annotations

import functools
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from attnkit._runtime import torch_threads
from attnkit.bench._timing import Table, interleaved_medians, machine_line, measure_peak_memory, median_time, ratio
from attnkit.functional import (
    WindowMask,
    _native,
    bigbird_layout,
    block_sparse_attention,
    chunked_attention,
    sliding_window_attention,
    strided_layout,
)

MINE = "attnkit sliding_window_attention"  # impl='auto': the native kernel where it builds
TORCH_PATH = "attnkit impl='torch' (flash pieces)"  # the same function on PyTorch's CPU flash kernel
GUARD_BYTES = 6 * 1024**3  # never start a run estimated above this (the machine is shared)
MB = 1024**2
PROFILE_LIMIT_S = 20.0  # calls slower than this are not run again under the memory profiler (estimate shown)


def _timed(fn: Callable[[], Any], slow: float) -> float:
    """Median time; calls that take longer than ``slow`` seconds are repeated less."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > slow:  # one more run, then the median of two is their mean; a very slow call is timed once
        return first if first > 10 * slow else (first + median_time(fn, repeats=1, warmup=0)) / 2
    return median_time(fn, repeats=5 if first < 0.2 else 3, warmup=0)


def _fwd_bwd(forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], q, k, v):  # type: ignore[no-untyped-def]
    def run() -> None:
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        forward(qq, kk, vv).sum().backward()

    return run


def _bind(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: fn(*args)


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


def _kernels(n: int, window: int, with_flex: bool) -> dict[str, dict[str, Any]]:
    """Each kernel: forward fn, whether it trains, and a memory estimate (bytes) for fwd and fwd+bwd."""
    kernels: dict[str, dict[str, Any]] = {}

    def dense(q, k, v):  # type: ignore[no-untyped-def]
        mask = WindowMask(window).materialize(n, n)[0, 0]  # (N, N) bool, built inside: it is part of the cost
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    kernels["dense masked SDPA"] = {"fn": dense, "trains": True, "est": lambda h: (n * n * 5, n * n * 9), "power": 2}
    try:
        from local_attention import LocalAttention

        local = LocalAttention(window_size=window, causal=True, look_backward=1, autopad=True)
        kernels["local-attention"] = {"fn": lambda q, k, v: local(q, k, v), "trains": True,
                                      "est": lambda h: (h * n * 2 * window * 4 * 3, h * n * 2 * window * 4 * 6)}
    except ImportError:  # pragma: no cover - benchmark extra not installed
        pass
    flex_name = "FlexAttention compiled (fwd only)"
    if with_flex and n * n * 8 > GUARD_BYTES:  # create_block_mask evaluates the mask on the whole N x N grid
        kernels[flex_name] = {"fn": None, "trains": False, "est": lambda h: (n * n * 8, 0)}
    elif with_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def band(b, h, i, j):  # type: ignore[no-untyped-def]
                return (i // window - j // window <= 1) & (j <= i)

            block_mask = create_block_mask(band, None, None, n, n, device="cpu")
            compiled = torch.compile(flex_attention, dynamic=False)
            kernels[flex_name] = {
                "fn": lambda q, k, v: compiled(q, k, v, block_mask=block_mask), "trains": False,
                "est": lambda h: (h * n * 64 * 4 * 8, 0)}
        except Exception as exc:  # noqa: BLE001 - report any compile failure as a note, do not stop the suite
            print(f"FlexAttention unavailable: {type(exc).__name__}: {exc}")
    kernels[TORCH_PATH] = {
        "fn": lambda q, k, v: sliding_window_attention(q, k, v, window=window, impl="torch"), "trains": True,
        "est": lambda h: (h * n * 64 * 4 * 8, h * n * 64 * 4 * 16)}
    kernels[MINE] = {
        "fn": lambda q, k, v: sliding_window_attention(q, k, v, window=window), "trains": True,
        "est": lambda h: (h * n * 64 * 4 * 8, h * n * 64 * 4 * 16)}
    return kernels


def _layouts(n_blocks: int) -> list[tuple[str, torch.Tensor, bool]]:
    """The block-sparse layouts the suite times: BigBird (window 3, 2 global, 3 random) and strided causal."""
    return [("BigBird", bigbird_layout(n_blocks, window=3, n_global=2, n_random=3, seed=0), False),
            ("strided, causal", strided_layout(n_blocks, stride=8), True)]


def _plot(results: dict[str, dict[int, dict[str, float]]], out: Path, title: str) -> None:
    """Log-log time (solid: forward, dashed: forward+backward) and forward memory (hollow: estimated, not run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for index, (name, by_n) in enumerate(results.items()):
        color = f"C{index}"
        ns = sorted(by_n)
        for key, style in (("fwd", "-o"), ("fwd+bwd", "--s")):
            pts = [(n, by_n[n][key]) for n in ns if by_n[n].get(key) is not None]
            if pts:
                ax_t.plot(*zip(*pts, strict=True), style, color=color, label=f"{name} {key}")
        measured = [(n, by_n[n]["mem"] / MB) for n in ns if "mem" in by_n[n] and not by_n[n].get("mem_est")]
        guessed = [(n, by_n[n]["mem"] / MB) for n in ns if "mem" in by_n[n] and by_n[n].get("mem_est")]
        if measured:
            ax_m.plot(*zip(*measured, strict=True), "-o", color=color, label=name)
        if guessed:
            ax_m.plot(*zip(*guessed, strict=True), "o", color=color, markerfacecolor="none")
    for ax, label in ((ax_t, "time (s)"), (ax_m, "extra peak memory, forward (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=6)
    ax_m.legend(fontsize=6)
    fig.suptitle(title + " (hollow: estimated, not run)", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "long.png", dpi=80)
    plt.close(fig)


def main(quick: bool = False, out: str | None = None) -> int:
    torch.manual_seed(0)
    sizes = [512, 2048] if quick else [4096, 16384, 65536]
    heads, dim, window = (2, 64, 128) if quick else (8, 64, 512)
    with_flex = not quick  # its compile takes minutes on this CPU; --quick leaves it out (said in the notes)
    print(machine_line())
    load_before = os.getloadavg()[0]
    table = Table(
        f"causal sliding window {window}, look_backward 1, B=1, H={heads}, E={dim}, fp32",
        ["N", "kernel", "fwd ms", "fwd+bwd ms", "fwd peak MB", "fwd+bwd peak MB"],
    )
    results: dict[str, dict[int, dict[str, float]]] = {}
    for n in sizes:
        q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))
        for name, spec in _kernels(n, window, with_flex).items():
            row: dict[str, float] = {}
            est_fwd, est_train = spec["est"](heads)
            seen = [(m, r) for m, r in results.get(name, {}).items() if "mem" in r]
            if seen:  # extrapolate what was measured at the previous size (linear, or quadratic for dense)
                m_prev, r_prev = seen[-1]
                grow = (n / m_prev) ** spec.get("power", 1)
                est_fwd = max(est_fwd, int(r_prev["mem"] * grow))
                est_train = max(est_train, int(r_prev.get("mem_train", 0) * grow))
            if est_fwd > GUARD_BYTES:
                table.add(str(n), name, "skipped", "skipped", f"~{est_fwd / MB:.0f} est.", "-")
                results.setdefault(name, {})[n] = {"mem": float(est_fwd), "mem_est": 1.0}
                continue
            fwd = spec["fn"]
            with torch.no_grad():
                if name.startswith("FlexAttention"):
                    t0 = time.perf_counter()
                    fwd(q, k, v)
                    print(f"  FlexAttention compile + first call at N={n}: {time.perf_counter() - t0:.1f} s")
                call = _bind(fwd, q, k, v)
                row["fwd"] = _timed(call, slow=2.0)
                profile = row["fwd"] < PROFILE_LIMIT_S  # the profiler run repeats the call: skip it when very slow
                row["mem"] = float(measure_peak_memory(call)) if profile else float(est_fwd)
                row["mem_est"] = float(not profile)
            train_cells = ["n/a (no backward)", "-"]
            if spec["trains"] and est_train <= GUARD_BYTES:
                step = _fwd_bwd(fwd, q, k, v)
                row["fwd+bwd"] = _timed(step, slow=2.0)
                measured = row["fwd+bwd"] < PROFILE_LIMIT_S
                row["mem_train"] = float(measure_peak_memory(step)) if measured else float(est_train)
                train_cells = [f"{row['fwd+bwd'] * 1e3:.0f}",
                               f"{row['mem_train'] / MB:.0f}" + ("" if measured else " est.")]
            elif spec["trains"]:
                train_cells = ["skipped", f"~{est_train / MB:.0f} est."]
            mem_cell = f"{row['mem'] / MB:.0f}" + ("" if profile else " est.")
            table.add(str(n), name, f"{row['fwd'] * 1e3:.0f}", train_cells[0], mem_cell, train_cells[1])
            results.setdefault(name, {})[n] = row
            print(f"  N={n:6d} {name:34s} fwd {row['fwd'] * 1e3:8.0f} ms  fwd+bwd {train_cells[0]:>8s} ms", flush=True)
            gc.collect()
    ours = results[MINE]
    ratios = Table("attnkit speed-up (baseline time / attnkit time; > 1 = attnkit faster)",
                   ["N", "against", "fwd", "fwd+bwd"])
    for name, by_n in results.items():
        if name == MINE:
            continue
        for n in sizes:
            base, mine = by_n.get(n, {}), ours.get(n, {})
            f = ratio(mine["fwd"], base["fwd"]) if "fwd" in base and "fwd" in mine else "-"
            if "fwd+bwd" in base and "fwd+bwd" in mine:
                b = ratio(mine["fwd+bwd"], base["fwd+bwd"])
            elif "fwd" in base and "fwd+bwd" in mine:
                b = ratio(mine["fwd+bwd"], base["fwd"]) + " (our fwd+bwd vs its fwd)"
            else:
                b = "-"
            ratios.add(str(n), name, f, b)
    table.notes.append(machine_line())
    table.notes.append(f"native library: {_native.status()}")
    table.notes.append(f"'{MINE}' runs impl='auto' (the native kernel when it builds); '{TORCH_PATH}' is the "
                       "same function on PyTorch's CPU flash kernel, merged by log-sum-exp, with its tiled backward")
    table.notes.append(f"load average (1 min) at start {load_before:.1f}, at end {os.getloadavg()[0]:.1f}: "
                       "the machine is shared, so wall times carry that noise; ratios come from one process")
    table.notes.append("peak MB: extra resident memory at peak (RSS sampled every 2 ms), inputs excluded; "
                       "'est.': calls slower than 20 s are not profiled, the size is extrapolated from the last one")
    table.notes.append(f"runs estimated above {GUARD_BYTES / 1024**3:.0f} GB are skipped, not attempted")
    if with_flex:
        table.notes.append("FlexAttention: compiled forward only; PyTorch has no FlexAttention backward on CPU")
        table.notes.append("FlexAttention's create_block_mask evaluates the mask on the full N x N grid (8 bytes each)")
    else:
        table.notes.append("--quick: FlexAttention left out (its compile takes minutes on this CPU)")

    # one thread, interleaved: the work ratio, which moves little with the machine's load
    n_one = sizes[1]
    q, k, v = (torch.randn(1, heads, n_one, dim) for _ in range(3))
    one = Table(f"one intra-op thread, interleaved medians (3 rounds), N={n_one}, H={heads}, causal window {window}",
                ["kernel", "fwd ms", "fwd+bwd ms", "attnkit speed-up fwd", "attnkit speed-up fwd+bwd"])
    picked = {name: spec for name, spec in _kernels(n_one, window, with_flex).items()
              if spec["fn"] is not None and not name.startswith("dense")}
    calls: dict[str, Callable[[], Any]] = {}
    for name, spec in picked.items():
        calls[name + " fwd"] = _no_grad(_bind(spec["fn"], q, k, v))
        if spec["trains"]:
            calls[name + " fwd+bwd"] = _fwd_bwd(spec["fn"], q, k, v)
    with torch_threads(1):
        medians = interleaved_medians(calls, rounds=3)
    mine_name = MINE
    for name in picked:
        fwd_ms = medians[name + " fwd"][0]
        train = medians.get(name + " fwd+bwd")
        up_f = ratio(medians[mine_name + " fwd"][0], fwd_ms) if name != mine_name else "-"
        up_b = "-"
        if name != mine_name and train is not None:
            up_b = ratio(medians[mine_name + " fwd+bwd"][0], train[0])
        one.add(name, f"{fwd_ms * 1e3:.0f}", "n/a" if train is None else f"{train[0] * 1e3:.0f}", up_f, up_b)
        print(f"  one thread N={n_one} {name:34s} fwd {fwd_ms * 1e3:8.0f} ms", flush=True)
    one.notes.append("wall-time medians; each kernel got one thread, so other jobs on the machine slow all alike")

    # block-sparse layouts: the native kernel against attnkit's PyTorch path (flash pieces), same inputs
    n_sp, bs = (2048, 64) if quick else (16384, 64)
    q, k, v = (torch.randn(1, heads, n_sp, dim) for _ in range(3))
    sparse = Table(f"block-sparse layouts, N={n_sp}, blocks of {bs}, H={heads}, E={dim}, fp32",
                   ["layout", "blocks used", "impl", "fwd ms", "fwd+bwd ms", "native speed-up fwd",
                    "native speed-up fwd+bwd"])
    for lay_name, lay, causal in _layouts(n_sp // bs):
        timed: dict[str, tuple[float, float]] = {}
        for impl in ("torch", "native"):
            run_sparse = functools.partial(block_sparse_attention, layout=lay, block_size=bs, causal=causal,
                                           impl=impl)
            with torch.no_grad():
                t_fwd = _timed(_bind(run_sparse, q, k, v), slow=2.0)
            timed[impl] = (t_fwd, _timed(_fwd_bwd(run_sparse, q, k, v), slow=2.0))
        used = f"{int(lay.sum())} of {lay.numel()}"
        for impl, (t_f, t_b) in timed.items():
            up = ("-", "-") if impl == "torch" else (ratio(t_f, timed["torch"][0]), ratio(t_b, timed["torch"][1]))
            sparse.add(lay_name, used, impl, f"{t_f * 1e3:.0f}", f"{t_b * 1e3:.0f}", *up)
        print(f"  block-sparse {lay_name}: native {timed['native'][1] * 1e3:.0f} ms fwd+bwd, "
              f"PyTorch path {timed['torch'][1] * 1e3:.0f} ms", flush=True)
    sparse.notes.append("impl='native': csrc/band.c; impl='torch': one flash call per piece, merged by log-sum-exp")

    # chunked kernel: dense causal attention, peak memory against PyTorch's SDPA
    n_dense, h_dense = (2048, 1) if quick else (32768, 1)
    q, k, v = (torch.randn(1, h_dense, n_dense, dim) for _ in range(3))
    mem = Table(f"dense causal attention at N={n_dense}, H={h_dense}, E={dim}, fp32: extra peak memory",
                ["kernel", "fwd+bwd MB", "fwd+bwd ms (one call)"])
    dense_kernels: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "PyTorch SDPA (is_causal)": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
        "attnkit chunked_attention": lambda a, b, c: cast(torch.Tensor, chunked_attention(a, b, c, is_causal=True)),
    }
    for name, fn in dense_kernels.items():
        step = _fwd_bwd(fn, q, k, v)
        t0 = time.perf_counter()
        m_b = measure_peak_memory(step)
        mem.add(name, f"{m_b / MB:.0f}", f"{(time.perf_counter() - t0) * 1e3:.0f}")
        print(f"  dense causal N={n_dense} {name}: fwd+bwd peak {m_b / MB:.0f} MB", flush=True)
    mem.notes.append(f"materialised scores would need {h_dense * n_dense * n_dense * 4 / MB:.0f} MB each "
                     "(scores and weights) in fp32")
    mem.notes.append("one forward+backward call each, first call in the process for its kernel (not a median)")

    for t in (table, ratios, one, sparse, mem):
        print()
        print(t.text())
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        md = "\n\n".join(t.markdown() for t in (table, ratios, one, sparse, mem))
        (folder / "long.md").write_text(md + "\n", encoding="utf-8")
        table.save(folder, "long_times")
        ratios.save(folder, "long_ratios")
        one.save(folder, "long_one_thread")
        sparse.save(folder, "long_block_sparse")
        mem.save(folder, "long_chunked_memory")
        _plot(results, folder, table.title)
        print(f"\nwrote {folder / 'long.md'} and {folder / 'long.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
