"""The tour's claims table is computed from the run's JSON: given JSON in, the verdicts its written rules give out."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from attnkit.tasks.claims import (
    NO,
    NOISE,
    YES,
    build_claims,
    claims_rows,
    collect,
    mean_interval,
    t_quantile_975,
    wilson_interval,
    write_claims,
)
from attnkit.tasks.tour import write_index


def _classify(errors: dict[str, list[float]]) -> dict:
    runs = [{"attention": name, "seed": s, "test_accuracy": 1 - e / 100} for name, es in errors.items()
            for s, e in enumerate(es)]  # fmt: skip
    return {"config": {"dataset": "mnist"}, "runs": runs, "summary": []}


def _long(local: tuple[str, str], dense: tuple[str, str] = ("1", "20")) -> dict:
    rows = [["512", "dense masked SDPA", dense[0], "4"], ["512", "attnkit sliding_window_attention", local[0], "3"],
            ["2048", "dense masked SDPA", dense[1], "58"], ["2048", "attnkit sliding_window_attention", local[1], "10"]]
    return {"columns": ["N", "kernel", "fwd ms", "fwd+bwd ms"], "rows": rows}


def _translate(none: float, attn: float, exact_long: tuple[float, float] | None = None) -> dict:
    def res(bleu: float, exact: float | None) -> dict:
        r: dict = {"bleu": bleu, "chrf": 10.0}
        if exact is not None:
            r["by_length"] = {"1-10": {"n": 5, "exact": 50.0}, "41-50": {"n": 5, "exact": exact}}
        return r

    e = exact_long or (None, None)
    return {"none": res(none, e[0]), "bahdanau": res(attn, e[1])}


def _verdicts(found: dict) -> dict[str, str]:
    return {c.section: c.verdict for c in build_claims(found)}


def test_t_quantile_and_intervals() -> None:
    assert t_quantile_975(1) == 12.706 and t_quantile_975(4) == 2.776
    assert t_quantile_975(31) == pytest.approx(2.040, abs=2e-3)  # the series past the table
    assert t_quantile_975(1000) == pytest.approx(1.962, abs=2e-3)
    values = [1.0, 2.0, 4.0]
    mean, half = mean_interval(values)
    assert mean == pytest.approx(7 / 3)
    assert half == pytest.approx(4.303 * statistics.stdev(values) / math.sqrt(3))
    assert math.isnan(mean_interval([1.0])[1])
    lo, hi = wilson_interval(10.0, 1000)  # 100 errors in 1000: about 8.3% to 12.0%
    assert 8.2 < lo < 8.4 and 11.9 < hi < 12.1
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile_975(0)


def test_channel_attention_verdicts() -> None:
    # SE lowers the error by 1 point on every seed: the interval lies below 0.
    assert _verdicts({"classify": _classify({"none": [2.0, 2.1, 1.9], "se": [1.0, 1.1, 0.9]})})["classify"] == YES
    # CBAM raises it on every seed: the interval lies above 0.
    assert _verdicts({"classify": _classify({"none": [2.0, 2.1, 1.9], "cbam": [3.0, 3.2, 2.9]})})["classify"] == NO
    # ECA: differences of both signs, the interval contains 0.
    noisy = _classify({"none": [2.0, 2.1, 1.9], "eca": [1.8, 2.4, 1.7]})
    claim = build_claims({"classify": noisy})[1]
    assert claim.verdict == NOISE and "3 seeds" in claim.measured
    # One seed: no interval, no verdict.
    assert _verdicts({"classify": _classify({"none": [2.0], "se": [1.0]})})["classify"] == "one seed: cannot tell"


def test_translation_verdicts() -> None:
    assert _verdicts({"translate": _translate(10.0, 12.0)})["translate"] == YES  # +20%
    assert _verdicts({"translate": _translate(10.0, 10.5)})["translate"] == NO  # +5%: below the tutorial's +10%
    assert _verdicts({"translate": _translate(0.3, 0.8)})["translate"] == NOISE  # both below 1 BLEU
    # Long inputs: a lift overall that collapses on the longest bucket is a miss.
    assert _verdicts({"translate": _translate(10.0, 15.0, (5.0, 40.0))})["translate"] == YES
    assert _verdicts({"translate": _translate(10.0, 15.0, (5.0, 5.0))})["translate"] == NO
    only = build_claims({"translate": {"bahdanau": {"bleu": 3.0}}})[0]
    assert only.verdict == "cannot tell" and "no-attention baseline" in only.measured


def test_local_hard_and_visual_verdicts() -> None:
    assert _verdicts({"long": _long(("10", "40"))})["long"] == YES  # flat per token
    assert _verdicts({"long": _long(("10", "160"))})["long"] == NO  # 4x per token: quadratic
    assert _verdicts({"long": _long(("1", "8"))})["long"] == NOISE  # 2x, but 1 ms is all rounding
    glimpse = {"settings": {"test_size": 1000}, "results": [{"glimpses": 6, "test_error": 12.0, "paper_error": 1.22}]}
    hard = build_claims({"glimpse": glimpse})[2]
    assert hard.verdict == YES and "1.22%" in hard.paper
    glimpse["results"][0]["test_error"] = 89.5  # at chance: the interval reaches 90%
    assert _verdicts({"glimpse": glimpse})["glimpse"] == NO
    cap = {"uniform_entropy": math.log(80), "settings": {"test_size": 100},
           "results": [{"attention": "soft", "attention_entropy": 2.0}]}  # fmt: skip
    assert _verdicts({"caption": cap})["caption"] == YES
    cap["results"][0]["attention_entropy"] = 4.3
    assert _verdicts({"caption": cap})["caption"] == NO


def test_tour_folder_to_page(tmp_path: Path) -> None:
    """The tour reads each section's JSON from its folder and opens the page with the computed table."""
    (tmp_path / "classify").mkdir()
    (tmp_path / "classify" / "classify_mnist.json").write_text(
        json.dumps(_classify({"none": [2.0, 2.1, 1.9], "se": [1.0, 1.1, 0.9]}))
    )
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "long_times.json").write_text(json.dumps(_long(("10", "160"))))
    for name, bleu in (("none", 10.0), ("luong", 10.2)):
        (tmp_path / "translate" / name).mkdir(parents=True)
        (tmp_path / "translate" / name / "results-test-beam1.json").write_text(json.dumps({"bleu": bleu}))
    found = collect(tmp_path)
    assert set(found) == {"classify", "long", "translate"}
    claims = write_claims(tmp_path)
    assert [c.verdict for c in claims] == [NO, YES, "cannot tell", NO, "cannot tell"]
    assert json.loads((tmp_path / "claims.json").read_text(encoding="utf-8"))[1]["verdict"] == YES
    page = write_index(tmp_path, [], quick=True, total=1.0, claims=claims).read_text(encoding="utf-8")
    assert page.index("What the tutorial claims — what this run measured") < page.index("</table>")
    for row in claims_rows(claims)[1:]:
        assert f'<td class="verdict">{row[3]}</td>' in page
