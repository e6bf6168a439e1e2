"""``python -m attnkit.bench hf [--model smollm2|gemma3]``: a HuggingFace LLM with ``attn_implementation="attnkit"``
against HF's own ``sdpa`` and ``eager`` (and ``flex_attention`` when it runs), end to end.

One process, one model object, one prompt: the model is loaded once and switched between implementations with
``model.set_attn_implementation(...)`` (same weights, same inputs); the contenders of each row are timed
**interleaved** (each round calls every implementation once, the first one rotating), and every figure is shown as a
ratio to HF's ``sdpa`` measured in the same rounds (``sdpa time / time``: above 1 = faster than sdpa).

Rows (full size; ``--quick`` shrinks every size to a few dozen tokens for a smoke run):

* prefill at 512 / 2,048 / 8,192 tokens: ``model(ids, use_cache=False, logits_to_keep=1)`` under ``no_grad`` (as
  ``generate()``'s prefill: only the last position's logits), with the time spent inside the attention modules
  (forward hooks around every ``*Attention`` module: projections, RoPE, the kernel, the output projection) and its
  share of the forward;
* decode tokens/s at contexts 1,024 / 8,192: a KV cache prefilled once (HF ``DynamicCache``; Gemma's sliding
  layers keep their window), copied before each timed run (the copy is not timed), then 16 single-token steps;
* forward + backward at 1,024 / 4,096 tokens through the decoder (``model.model``: embeddings, every layer, the final
  norm; the loss is the mean square of the last hidden states). The output layer is left out: it is the same for
  every implementation, and Gemma's 262,144-word logits alone would need 4 GB (8 GB with their gradient) at 4,096;
* extra peak memory (resident, sampled; :func:`attnkit.bench._timing.measure_peak_memory`) of one call per cell;
* maps at 2,048 tokens: ``output_attentions=True`` with eager (HF's only way to get them) and with attnkit (exact
  maps, output still on the fused kernel), attnkit without maps, and the maps' memory alone (every layer's maps
  allocated fresh and written once: the floor any implementation that returns them pays).

A run estimated above the memory guard (half the memory available at start) is skipped and marked, never
attempted. The prompt is random token ids (seeded): attention's cost does not depend on the words.
"""

from __future__ import annotations

import copy
import gc
import inspect
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit._errors import fail
from attnkit._runtime import cpu_model
from attnkit.functional._memory import fresh_buffer

from ._timing import Table, machine_line, measure_peak_memory, ratio

MB = 1024**2
GB = 1024**3
BASELINE = "sdpa"
MINE = "attnkit"
MEMORY_ALONE = "the maps' memory alone"
MODELS = ("smollm2", "gemma3")


@dataclass(frozen=True)
class Sizes:
    """The token counts and repeats of one run."""

    prefill: tuple[int, ...]
    decode: tuple[int, ...]
    decode_steps: int
    train: tuple[int, ...]
    maps: int
    rounds: int
    memory: bool = True


FULL = Sizes(prefill=(512, 2048, 8192), decode=(1024, 8192), decode_steps=16, train=(1024, 4096), maps=2048, rounds=3)
QUICK = Sizes(prefill=(16, 32), decode=(16,), decode_steps=2, train=(16,), maps=16, rounds=1)


def load_line() -> str:
    """The load averages over 1, 5 and 15 minutes."""
    return "load average {:.2f} / {:.2f} / {:.2f} (1 / 5 / 15 min)".format(*os.getloadavg())


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GB


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class Subject:
    """The model under test and what the memory estimates need to know about it."""

    name: str
    model: Any
    layers: int
    heads: int
    sliding_layers: int
    vocab: int
    attention_modules: list[nn.Module] = field(default_factory=list)

    def use(self, impl: str) -> None:
        if self.model.config._attn_implementation != impl:
            self.model.set_attn_implementation(impl)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every self-attention module of a HF decoder (classes named ``*Attention`` with a ``q_proj``)."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "q_proj")]


def load_subject(name: str) -> Subject:
    from attnkit.models.llm import load_causal_lm

    model, _ = load_causal_lm(name, attn_implementation=MINE)
    cfg = model.config
    types = getattr(cfg, "layer_types", None) or []
    return Subject(
        name, model, int(cfg.num_hidden_layers), int(cfg.num_attention_heads),
        sum(t == "sliding_attention" for t in types), int(cfg.vocab_size), _attention_modules(model),
    )


class AttentionClock:
    """Forward hooks around every attention module: the seconds spent inside them since the last ``reset()``."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.seconds = 0.0
        self._start: dict[int, float] = {}
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._start[id(module)] = time.perf_counter()

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self.seconds += time.perf_counter() - self._start.pop(id(module))

    def reset(self) -> None:
        self.seconds = 0.0

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- estimates


def estimate_bytes(s: Subject, impl: str, kind: str, n: int) -> int:
    """A rough upper estimate of the extra memory of one call (for the guard only, never reported as measured).

    eager materialises ``H x N x N`` scores and weights per layer (kept for the backward, and returned with maps);
    HF's sdpa does so on layers that pass it a mask tensor (Gemma's sliding layers), else it runs the flash kernel.
    """
    square = s.heads * n * n * 4  # one layer's H x N x N float32
    dense_layers = {"eager": s.layers, "sdpa": s.sliding_layers, "flex_attention": 0, MINE: 0}.get(impl, s.layers)
    mask = n * n * 4 if dense_layers else 0
    if kind == "prefill":
        return mask + (3 * square if dense_layers else 0)
    if kind == "train":
        return mask + 3 * square * dense_layers
    if kind == "maps":  # every layer's maps are returned, plus eager's transients
        return s.layers * square + mask + (3 * square if impl == "eager" else square)
    return 0


# ------------------------------------------------------------------------------------------------- timing


@dataclass
class Case:
    """One timed cell: ``run(setup())``; the setup is not timed."""

    impl: str
    run: Callable[[Any], Any]
    setup: Callable[[], Any] = lambda: None


def interleave(subject: Subject, cases: dict[str, Case], rounds: int, clock: AttentionClock | None = None,
               warmup: int = 1, failures: list[str] | None = None, row: str = "") -> dict[str, dict[str, float]]:
    """Median wall seconds (``"wall"``) and seconds inside the attention modules (``"attention"``) of each case,
    over ``rounds`` rounds that run every case once in turn (rotating who goes first).

    A case that raises in the warm-up round is dropped from ``cases`` and its error appended to ``failures``
    (``row``: what to call the row there); without ``failures`` the error propagates.
    """
    names = list(cases)
    wall: dict[str, list[float]] = {k: [] for k in names}
    attn: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if name not in cases:
                continue
            case = cases[name]
            subject.use(case.impl)
            holder = [case.setup()]
            if clock is not None:
                clock.reset()
            t0 = time.perf_counter()
            try:
                case.run(holder[0])
            except Exception as err:  # noqa: BLE001 - reported in the notes, the bench goes on
                if failures is None or r >= warmup:
                    raise
                text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
                failures.append(f"{row} {name}: {type(err).__name__}: {text}")
                del cases[name]
                continue
            finally:
                holder.clear()
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                wall[name].append(elapsed)
                attn[name].append(clock.seconds if clock is not None else float("nan"))
    return {k: {"wall": statistics.median(wall[k]), "attention": statistics.median(attn[k])} for k in cases}


def _peak(subject: Subject, case: Case) -> int:
    subject.use(case.impl)
    holder = [case.setup()]
    try:
        return measure_peak_memory(lambda: case.run(holder[0]))
    finally:
        holder.clear()
        gc.collect()


def _prompt(n: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randint(100, min(vocab, 30_000), (1, n), generator=g)


def flex_status(subject: Subject, quick: bool) -> str | None:
    """``None`` when HF's ``flex_attention`` runs a forward on this machine, else the reason it does not."""
    if quick:
        return "not tried with --quick (it compiles on first use, which takes minutes on a CPU)"
    try:
        subject.use("flex_attention")
        with torch.no_grad():
            subject.model(_prompt(64, subject.vocab), use_cache=False, logits_to_keep=1)
    except Exception as err:  # noqa: BLE001 - any failure is reported, the bench goes on
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    finally:
        subject.use(MINE)
    return None


# --------------------------------------------------------------------------------------------------- rows


@dataclass
class Report:
    """All tables of one run."""

    prefill: Table
    decode: Table
    train: Table
    maps: Table
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def tables(self) -> list[Table]:
        return [self.prefill, self.decode, self.train, self.maps]


def _gb(nbytes: int) -> str:
    return f"{nbytes / GB:.1f} GB"


def _ms(t: float) -> str:
    return f"{t * 1e3:.1f}" if t < 1 else f"{t * 1e3:.0f}"


def _mem(b: int | None) -> str:
    return "-" if b is None else f"{b / MB:.0f}"


def _missing(report: Report, key: str) -> str:
    """``"failed"`` when that cell raised (see the notes), else ``"skipped"`` (the memory guard)."""
    return "failed" if any(f.startswith(key + ":") for f in report.failed) else "skipped"


def _fits(s: Subject, impl: str, kind: str, n: int, guard: int, skipped: list[str]) -> bool:
    est = estimate_bytes(s, impl, kind, n)
    if est > guard:
        skipped.append(f"{kind} N={n} {impl}: estimated {est / GB:.1f} GB > guard {guard / GB:.1f} GB")
        return False
    return True


def prefill_rows(s: Subject, impls: list[str], sizes: Sizes, guard: int, report: Report) -> None:
    clock = AttentionClock(s.attention_modules)
    try:
        for n in sizes.prefill:
            ids = _prompt(n, s.vocab)

            def forward(_: Any, ids: torch.Tensor = ids) -> Any:
                with torch.no_grad():
                    return s.model(ids, use_cache=False, logits_to_keep=1)

            cases = {i: Case(i, forward) for i in impls if _fits(s, i, "prefill", n, guard, report.skipped)}
            res = interleave(s, cases, sizes.rounds, clock, failures=report.failed, row=f"prefill N={n}")
            clock.reset()
            base = res.get(BASELINE)
            for impl, r in res.items():
                peak = _peak(s, cases[impl]) if sizes.memory else None
                share = r["attention"] / r["wall"]
                report.prefill.add(
                    n, impl, _ms(r["wall"]), ratio(r["wall"], base["wall"]) if base else "-",
                    _ms(r["attention"]), f"{share:.0%}", ratio(r["attention"], base["attention"]) if base else "-",
                    _mem(peak),
                )
            for impl in impls:
                if impl not in res:
                    report.prefill.add(n, impl, _missing(report, f"prefill N={n} {impl}"), "-", "-", "-", "-", "-")
            print(f"  prefill N={n}: " + ", ".join(f"{k} {_ms(v['wall'])} ms" for k, v in res.items()), flush=True)
    finally:
        clock.close()


def _cache_arg(model: nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_rows(s: Subject, impls: list[str], sizes: Sizes, report: Report) -> None:
    from transformers import DynamicCache

    steps = sizes.decode_steps
    for ctx in sizes.decode:
        ids = _prompt(ctx, s.vocab)
        s.use(MINE)
        cache = DynamicCache(config=s.model.config)
        with torch.no_grad():
            s.model(ids, **{_cache_arg(s.model): cache}, use_cache=True, logits_to_keep=1)
        new = _prompt(steps + 7, s.vocab)[:, -steps:]  # fixed next tokens: every implementation does the same work

        def decode(state: Any, new: torch.Tensor = new) -> None:
            with torch.no_grad():
                for t in range(new.shape[1]):
                    s.model(new[:, t : t + 1], **{_cache_arg(s.model): state}, use_cache=True, logits_to_keep=1)

        def fresh(cache: Any = cache) -> Any:
            return copy.deepcopy(cache)

        cases = {i: Case(i, decode, setup=fresh) for i in impls}
        res = interleave(s, cases, sizes.rounds, failures=report.failed, row=f"decode context={ctx}")
        base = res.get(BASELINE)
        for impl, r in res.items():
            peak = _peak(s, cases[impl]) if sizes.memory else None
            report.decode.add(ctx, impl, f"{steps / r['wall']:.1f}", _ms(r["wall"] / steps),
                              ratio(r["wall"], base["wall"]) if base else "-", _mem(peak))
        for impl in impls:
            if impl not in res:
                report.decode.add(ctx, impl, _missing(report, f"decode context={ctx} {impl}"), "-", "-", "-")
        print(f"  decode ctx={ctx}: " + ", ".join(f"{k} {steps / v['wall']:.1f} tok/s" for k, v in res.items()),
              flush=True)
        del cache
        gc.collect()


def train_rows(s: Subject, impls: list[str], sizes: Sizes, guard: int, report: Report) -> None:
    decoder = s.model.model
    params = [p for p in decoder.parameters() if p.requires_grad]
    for n in sizes.train:
        ids = _prompt(n, s.vocab)

        def step(_: Any, ids: torch.Tensor = ids) -> None:
            for p in params:
                p.grad = None
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            hidden.float().pow(2).mean().backward()

        cases = {i: Case(i, step) for i in impls if _fits(s, i, "train", n, guard, report.skipped)}
        s.model.train()
        try:
            res = interleave(s, cases, sizes.rounds, failures=report.failed, row=f"forward+backward N={n}")
            base = res.get(BASELINE)
            for impl, r in res.items():
                peak = _peak(s, cases[impl]) if sizes.memory else None
                report.train.add(n, impl, _ms(r["wall"]), ratio(r["wall"], base["wall"]) if base else "-", _mem(peak))
            for impl in impls:
                if impl not in res:
                    report.train.add(n, impl, _missing(report, f"forward+backward N={n} {impl}"), "-", "-")
        finally:
            s.model.eval()
            for p in params:
                p.grad = None
        print(f"  forward+backward N={n}: " + ", ".join(f"{k} {_ms(v['wall'])} ms" for k, v in res.items()),
              flush=True)


def maps_rows(s: Subject, sizes: Sizes, guard: int, report: Report) -> None:
    n = sizes.maps
    ids = _prompt(n, s.vocab)

    def forward(with_maps: bool) -> Callable[[Any], Any]:
        def run(_: Any) -> Any:
            with torch.no_grad():
                out = s.model(ids, use_cache=False, logits_to_keep=1, output_attentions=with_maps)
            if with_maps:
                assert out.attentions is not None and len(out.attentions) == s.layers
            return None  # the maps are dropped before the next call

        return run

    def memory_alone(_: Any) -> None:
        """Fresh memory for every layer's maps, written once and kept to the end, as a forward with maps keeps
        them: what returning the maps costs any implementation before a score is computed."""
        maps = []
        for _ in range(s.layers):
            m = fresh_buffer((1, s.heads, n, n), torch.float32, torch.device("cpu"))
            maps.append(m.fill_(0.0))
        del maps

    wanted = {"eager, output_attentions": ("eager", True), "attnkit, output_attentions": (MINE, True),
              "attnkit, no maps": (MINE, False)}
    cases = {
        label: Case(impl, forward(maps)) for label, (impl, maps) in wanted.items()
        if _fits(s, impl, "maps" if maps else "prefill", n, guard, report.skipped)
    }
    if "attnkit, output_attentions" in cases:  # the same bytes as its maps
        cases[MEMORY_ALONE] = Case(MINE, memory_alone)
    res = interleave(s, cases, sizes.rounds, failures=report.failed, row=f"maps N={n}")
    mine = res.get("attnkit, output_attentions")
    for label, r in res.items():
        peak = _peak(s, cases[label]) if sizes.memory else None
        eager = res.get("eager, output_attentions")
        against_eager = ratio(r["wall"], eager["wall"]) if eager and label != MEMORY_ALONE else "-"
        own = f"{mine['wall'] / r['wall']:.2f}x" if mine and label == "attnkit, no maps" else "-"
        report.maps.add(n, label, _ms(r["wall"]), against_eager, own, _mem(peak))
    for label in wanted:
        if label not in res:
            report.maps.add(n, label, _missing(report, f"maps N={n} {label}"), "-", "-", "-")
    bare, alone = res.get("attnkit, no maps"), res.get(MEMORY_ALONE)
    if bare and alone:
        floor = (bare["wall"] + alone["wall"]) / bare["wall"]
        report.maps.notes.append(
            f"N={n}: '{MEMORY_ALONE}' is the {s.layers} layers' maps ({_gb(s.layers * s.heads * n * n * 4)}) "
            f"allocated fresh and written once; no maps + that = {floor:.2f}x attnkit's own time, the least any "
            "implementation that returns the maps can take here")
    print(f"  maps N={n}: " + ", ".join(f"{k} {_ms(v['wall'])} ms" for k, v in res.items()), flush=True)


def run(model: str = "smollm2", quick: bool = False) -> Report:
    """Measure every row for ``model`` (a name of :data:`MODELS`) and return the tables."""
    if model not in MODELS:
        raise fail(f"--model in {MODELS}", repr(model), "--model smollm2")
    sizes = QUICK if quick else FULL
    torch.manual_seed(0)
    guard = _available_bytes() // 2
    s = load_subject(model)
    title = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270m"}[model]
    load_start = os.getloadavg()[0]
    print(machine_line())
    print(f"{cpu_model()}, {load_line()}")
    print(f"{title}: {s.layers} layers ({s.sliding_layers} sliding-window), {s.heads} query heads, float32")
    flex = flex_status(s, quick)
    impls = [MINE, BASELINE, "eager"] + (["flex_attention"] if flex is None else [])
    speed = "(sdpa time / time; > 1 = faster than sdpa)"
    report = Report(
        prefill=Table(f"{title}: prefill, B=1, float32, no grad, logits of the last position {speed}",
                      ["N", "implementation", "ms", "vs sdpa", "attention ms", "attention share", "attention vs sdpa",
                       "peak MB"]),
        decode=Table(f"{title}: decode, B=1, {sizes.decode_steps} single-token steps after a prefilled cache {speed}",
                     ["context", "implementation", "tokens/s", "ms/token", "vs sdpa", "peak MB"]),
        train=Table(f"{title}: forward + backward through the decoder, B=1, float32 {speed}",
                    ["N", "implementation", "ms", "vs sdpa", "peak MB"]),
        maps=Table(f"{title}: attention maps of every layer (output_attentions=True), B=1, no grad",
                   ["N", "run", "ms", "vs eager with maps", "attnkit with maps / without", "peak MB"]),
    )
    prefill_rows(s, impls, sizes, guard, report)
    decode_rows(s, impls, sizes, report)
    train_rows(s, impls, sizes, guard, report)
    maps_rows(s, sizes, guard, report)
    notes = [
        f"measured on {machine_line()}",
        f"load average (1 min) at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f}: the machine may be "
        "shared, so wall times carry that noise; every ratio comes from the same interleaved rounds",
        f"{sizes.rounds} timed rounds after one warm-up round; medians"
        + ("" if sizes.rounds % len(impls) == 0 else
           f" (fewer rounds than a multiple of the {len(impls)} implementations: the rotation leaves each one "
           "after the same neighbour in most rounds, which on a VM with slow fresh memory moves whole-model rows "
           "by a few %; compare two implementations alone for a closer reading)"),
        "one model object switched with set_attn_implementation; the same random prompt for every implementation",
        "peak MB: extra resident memory at peak during one more call (sampled every 2 ms)",
    ]
    if flex is not None:
        notes.append(f"flex_attention left out: {flex}")
    notes += [f"skipped: {x}" for x in report.skipped]
    notes += [f"failed: {x}" for x in report.failed]
    report.prefill.notes += notes
    report.prefill.notes.append("attention ms: time inside the attention modules (projections, RoPE, kernel, "
                                "output projection), forward hooks; share = attention ms / ms")
    report.train.notes.append("the output layer is left out (the same for every implementation); loss = mean "
                              "square of the last hidden states")
    report.maps.notes.append("eager is HF's only implementation that returns maps; attnkit returns the exact "
                             "maps while the output stays on its fused kernel")
    return report


def main(quick: bool = False, out: str | None = None, model: str = "smollm2") -> int:
    report = run(model, quick)
    for t in report.tables():
        print()
        print(t.text())
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"hf_{model}"
        (folder / f"{stem}.md").write_text("\n\n".join(t.markdown() for t in report.tables()) + "\n",
                                           encoding="utf-8")
        for part, table in zip(("prefill", "decode", "train", "maps"), report.tables(), strict=True):
            table.save(folder, f"{stem}_{part}")
        print(f"\nwrote {folder / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
