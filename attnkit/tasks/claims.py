"""The tour's opening table, "What the tutorial claims — what this run measured", computed from the run's JSON.

Every tour section writes its measured figures to JSON (``translate/<model>/results-test-beam1.json``,
``classify/classify_<dataset>.json``, ``glimpse/results_<task>.json``, ``caption/results.json``,
``long/long_times.json``). :func:`collect` reads them into one dict, :func:`build_claims` turns that dict into one
:class:`Claim` per claim of the tutorial, each with the measured figure, the paper's figure and a verdict decided
by a written rule on the measured numbers only (never by wording):

* ``✓``: the measured figures support the claim beyond the stated noise;
* ``✗``: they contradict it beyond the noise (or miss the tutorial's own threshold);
* ``inside the noise``: the difference is smaller than the stated noise (e.g. the 95% interval over seeds);
* ``cannot tell``: the run did not measure what the rule needs (one seed, no baseline, section not run).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Claim", "build_claims", "claims_rows", "collect", "t_quantile_975", "mean_interval", "wilson_interval"]

YES, NO, NOISE, UNKNOWN = "✓", "✗", "inside the noise", "cannot tell"

# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30 (standard table values).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The two-sided 95% Student t quantile for ``df`` degrees of freedom (table to 30, then a series in 1/df)."""
    if df < 1:
        raise ValueError(f"expected df >= 1, got {df}; try two or more seeds")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its t-based 95% interval (``nan`` half-width for a single value)."""
    if not values:
        raise ValueError("expected at least one value, got none; try --seeds 2 or more")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def wilson_interval(errors: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval, in percent, of an error rate ``errors`` (percent) measured on ``n`` items."""
    p, z = errors / 100.0, 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


@dataclass
class Claim:
    """One row of the claims table."""

    claim: str
    measured: str
    paper: str
    verdict: str
    rule: str
    section: str


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def collect(out_dir: Path) -> dict[str, Any]:
    """The measured figures of a tour folder, keyed by section (sections that did not run are absent)."""
    out_dir = Path(out_dir)
    found: dict[str, Any] = {}
    translate = {p.parent.name: _read(p) for p in sorted(out_dir.glob("translate/*/results-test-beam1.json"))}
    translate = {k: v for k, v in translate.items() if v}
    if translate:
        found["translate"] = translate
    for name, pattern in (("classify", "classify/classify_*.json"), ("glimpse", "glimpse/results_*.json"),
                          ("caption", "caption/results.json"), ("long", "long/long_times.json")):  # fmt: skip
        paths = sorted(out_dir.glob(pattern))
        data = _read(paths[0]) if paths else None
        if data:
            found[name] = data
    return found


# ---- the rules ---------------------------------------------------------------------------------------------------

TRANSLATE_PAPER = ("Bahdanau et al. 2015, Table 1 (WMT'14 En→Fr): RNNencdec-50 17.82 → RNNsearch-50 26.75 BLEU "
                   "(+50%); Fig. 2: RNNsearch holds past ~20 words. Tutorial: BLEU +10% or more")
TRANSLATE_RULE = ("lift = best attention BLEU / no-attention BLEU − 1: ✓ if ≥ +10% (the tutorial's figure), "
                  "✗ if below; inside the noise if both BLEU < 1; long inputs (generated data): the attention "
                  "model's exact match in the longest length bucket must beat the no-attention model's")


def _translation(found: dict[str, Any]) -> Claim:
    claim = "Attention lifts translation quality and holds on long inputs"
    runs = found.get("translate")
    base = Claim(claim, "not run", TRANSLATE_PAPER, UNKNOWN, TRANSLATE_RULE, "translate")
    if not runs:
        return base
    attn = {k: v for k, v in runs.items() if k != "none"}
    if "none" not in runs or not attn:
        have = ", ".join(f"{k} BLEU {v['bleu']:.2f}" for k, v in runs.items())
        base.measured = f"{have}; no {'no-attention baseline' if attn else 'attention model'} in this run"
        return base
    none_bleu = float(runs["none"]["bleu"])
    best_name = max(attn, key=lambda k: float(attn[k]["bleu"]))
    best = float(attn[best_name]["bleu"])
    lift = math.inf if none_bleu <= 0 else best / none_bleu - 1
    lift_text = "∞" if math.isinf(lift) else f"{100 * lift:+.0f}%"
    base.measured = f"BLEU none {none_bleu:.2f} vs {best_name} {best:.2f} ({lift_text})"
    if max(best, none_bleu) < 1.0:
        base.verdict = NOISE
    else:
        base.verdict = YES if lift >= 0.10 else NO
    by_none, by_best = runs["none"].get("by_length"), attn[best_name].get("by_length")
    if by_none and by_best:
        longest = list(by_none)[-1]
        if longest in by_best:
            e_none, e_best = float(by_none[longest]["exact"]), float(by_best[longest]["exact"])
            base.measured += f"; longest inputs ({longest} words): exact {e_none:.1f}% vs {e_best:.1f}%"
            if base.verdict == YES and e_best <= e_none:
                base.verdict = NO
    else:
        base.measured += "; length buckets not measured (Bible data)"
    return base


CHANNEL_PAPER = ("Hu et al. 2018 (SENet), ResNet-50 ImageNet top-1 error 24.80 → 23.29 (−1.51 points). "
                 "Tutorial: ~1 point")
CHANNEL_RULE = ("per seed, error(variant) − error(none) (same data order); mean and t-based 95% interval over seeds: "
                "✓ if the interval lies below 0, ✗ if above 0, inside the noise if it contains 0; "
                "one seed: cannot tell")


def _channel(found: dict[str, Any]) -> Claim:
    claim = "Channel attention (SE, ECA, CBAM) lowers classification error"
    data = found.get("classify")
    base = Claim(claim, "not run", CHANNEL_PAPER, UNKNOWN, CHANNEL_RULE, "classify")
    if not data:
        return base
    errors: dict[str, dict[int, float]] = {}
    for r in data.get("runs", []):
        errors.setdefault(r["attention"], {})[int(r["seed"])] = 100.0 * (1.0 - float(r["test_accuracy"]))
    if "none" not in errors or len(errors) < 2:
        base.measured = "no baseline without attention in this run"
        return base
    parts, verdicts = [], []
    for name, per_seed in errors.items():
        if name == "none":
            continue
        seeds = sorted(set(per_seed) & set(errors["none"]))
        diffs = [per_seed[s] - errors["none"][s] for s in seeds]
        if not diffs:
            continue
        mean, half = mean_interval(diffs)
        if math.isnan(half):
            parts.append(f"{name} {mean:+.2f} pts (one seed)")
            verdicts.append(UNKNOWN)
            continue
        parts.append(f"{name} {mean:+.2f} ± {half:.2f} pts ({len(diffs)} seeds)")
        verdicts.append(YES if mean + half < 0 else NO if mean - half > 0 else NOISE)
    none_err = statistics.fmean(errors["none"].values())
    base.measured = f"error none {none_err:.2f}%; vs none: " + ", ".join(parts)
    if all(v == UNKNOWN for v in verdicts):
        base.verdict = "one seed: cannot tell"
    else:
        known = [v for v in verdicts if v != UNKNOWN]
        base.verdict = YES if YES in known else NOISE if NOISE in known else NO
        if YES in known and NO in known:
            base.verdict = f"{YES} for some variants, {NO} for others"
    return base


HARD_RULE = ("test error and its 95% Wilson interval over the test scenes: ✓ if the interval lies below chance (90% "
             "error for RAM; caption: exact-caption rate above 0 by its interval), ✗ otherwise; the gap to the paper "
             "is shown, not judged")


def _hard(found: dict[str, Any]) -> Claim:
    claim = "Hard attention picks one region per step and trains with REINFORCE"
    data = found.get("glimpse")
    base = Claim(claim, "not run", "Mnih et al. 2014 (RAM): 1.22% error, 60×60 translated MNIST, 6 glimpses",
                 UNKNOWN, HARD_RULE, "glimpse")  # fmt: skip
    if data and data.get("results"):
        n = int(data["settings"]["test_size"])
        row = min(data["results"], key=lambda r: float(r["test_error"]))
        err = float(row["test_error"])
        lo, hi = wilson_interval(err, n)
        base.measured = (f"RAM, {row['glimpses']} glimpses: {err:.2f}% error (95% interval {lo:.2f}–{hi:.2f}%, "
                         f"{n} scenes); chance 90%")
        if row.get("paper_error") is not None:
            base.paper = f"{data.get('paper', 'Mnih et al. 2014')}; this row's paper figure {row['paper_error']}%"
        base.verdict = YES if hi < 90.0 else NO
        return base
    cap = found.get("caption")
    hard = [r for r in (cap or {}).get("results", []) if r.get("attention") == "hard"]
    if cap and hard:
        n = int(cap["settings"]["test_size"])
        exact = float(hard[0]["exact_caption_accuracy"])
        lo, _hi = wilson_interval(exact, n)
        base.section = "caption"
        base.paper = "Xu et al. 2015 (Show, Attend and Tell), hard attention: COCO BLEU-4 25.0"
        base.measured = f"captioner with hard attention: {exact:.1f}% exact captions (95% interval from {lo:.1f}%)"
        base.verdict = YES if lo > 0 else NO
    return base


LOCAL_PAPER = "Beltagy et al. 2020 (Longformer): sliding-window attention costs O(N·w), linear in N; dense O(N²)"
LOCAL_RULE = ("forward ms / N of the sliding-window kernel, largest N against smallest N, with each time's ±0.5 ms "
              "rounding: ✓ if even the upper bound of the growth is ≤ 2× (flat per token), ✗ if the lower bound is "
              "> 2×, otherwise inside the noise")


def _local(found: dict[str, Any]) -> Claim:
    claim = "Local attention serves real time: latency per token stays flat, O(N·w)"
    data = found.get("long")
    base = Claim(claim, "not run", LOCAL_PAPER, UNKNOWN, LOCAL_RULE, "long")
    if not data:
        return base
    cols = data["columns"]
    i_n, i_k, i_t = cols.index("N"), cols.index("kernel"), cols.index("fwd ms")
    times: dict[str, dict[int, float]] = {}
    for r in data["rows"]:
        try:
            times.setdefault(r[i_k], {})[int(r[i_n])] = float(r[i_t])
        except ValueError:
            continue
    local = times.get("attnkit sliding_window_attention", {})
    if len(local) < 2:
        base.measured = "fewer than two sequence lengths measured"
        return base
    n0, n1 = min(local), max(local)
    t0, t1 = local[n0], local[n1]
    grow = (t1 / n1) / (t0 / n0) if t0 > 0 else math.inf
    hi = ((t1 + 0.5) / n1) / (max(t0 - 0.5, 0.0) / n0) if t0 > 0.5 else math.inf
    lo = ((max(t1 - 0.5, 0.0)) / n1) / ((t0 + 0.5) / n0)
    per_tok = f"{1000 * t0 / n0:.2f} → {1000 * t1 / n1:.2f} µs/token"
    base.measured = f"sliding window, N {n0} → {n1}: {per_tok} (×{grow:.2f})"
    dense = times.get("dense masked SDPA", {})
    if n0 in dense and n1 in dense and dense[n0] > 0:
        base.measured += f"; dense SDPA ×{(dense[n1] / n1) / (dense[n0] / n0):.2f}"
    base.verdict = YES if hi <= 2.0 else NO if lo > 2.0 else NOISE
    return base


VIS_PAPER = "Bahdanau et al. 2015 Fig. 3 and Xu et al. 2015 Fig. 3: alignments / attended regions shown as pictures"
VIS_RULE = ("mean entropy of the soft captioner's attention over its 80 regions against uniform attention (ln 80 = "
            "4.38 nats): ✓ if below 90% of uniform (the weights pick places, so the overlay shows something), ✗ if not")


def _visual(found: dict[str, Any]) -> Claim:
    claim = "Attention weights can be visualised (they show where the model looks)"
    cap = found.get("caption")
    base = Claim(claim, "not run", VIS_PAPER, UNKNOWN, VIS_RULE, "caption")
    soft = [r for r in (cap or {}).get("results", []) if r.get("attention") == "soft"]
    if not cap or not soft:
        return base
    uniform = float(cap.get("uniform_entropy", math.log(80)))
    ent = float(soft[0]["attention_entropy"])
    base.measured = f"soft attention entropy {ent:.2f} nats vs uniform {uniform:.2f} ({100 * ent / uniform:.0f}%)"
    base.verdict = YES if ent < 0.9 * uniform else NO
    return base


def build_claims(found: dict[str, Any]) -> list[Claim]:
    """One :class:`Claim` per claim of the tutorial, from :func:`collect`'s dict."""
    return [_translation(found), _channel(found), _hard(found), _local(found), _visual(found)]


def claims_rows(claims: list[Claim]) -> list[list[str]]:
    """The claims as table rows (header first)."""
    rows = [["the tutorial claims", "this run measured", "the paper", "verdict", "rule"]]
    rows += [[c.claim, c.measured, c.paper, c.verdict, c.rule] for c in claims]
    return rows


def write_claims(out_dir: Path) -> list[Claim]:
    """Collect the tour folder's JSON, write ``claims.json`` beside it and return the claims."""
    claims = build_claims(collect(out_dir))
    (Path(out_dir) / "claims.json").write_text(
        json.dumps([asdict(c) for c in claims], ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return claims
