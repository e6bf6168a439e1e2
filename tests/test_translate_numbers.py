"""``attnkit translate --data numbers``: train, evaluate and translate end to end on generated text, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("num2words")

from attnkit.cli import main  # noqa: E402
from attnkit.data import generated  # noqa: E402
from attnkit.tasks import translate as T  # noqa: E402

TINY = [
    "--steps", "8", "--batch-size", "8", "--max-train", "200", "--eval-limit", "10", "--embed-dim", "16",
    "--hidden-dim", "32", "--eval-every", "0", "--save-every", "0", "--no-progress", "--threads", "1",
]  # fmt: skip


@pytest.fixture
def one_thread():  # noqa: ANN201
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_train_quick_numbers_writes_by_length_then_evaluate_and_translate(
    tmp_path: Path, one_thread, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["translate", "train", "--data", "numbers", "--quick", "--model", "bahdanau", "--out", str(out),
                 *TINY]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "source words" in printed and "41-50" in printed  # the per-bucket table
    res = json.loads((out / "results-test-beam1.json").read_text())
    assert res["data"] == "numbers" and (res["src"], res["tgt"]) == ("en", "de")
    labels = [generated.bucket_label(lo, hi) for lo, hi in generated.BUCKETS]
    assert list(res["by_length"]) == labels  # --eval-limit 10 is spread over every bucket
    assert sum(b["n"] for b in res["by_length"].values()) == res["n"] == 10
    for b in res["by_length"].values():
        assert set(b) == {"n", "bleu", "chrf", "exact"} and 0 <= b["exact"] <= 100
    # evaluate and translate read --data and the morpheme tokenizers back from the checkpoint
    model, cfg, tok_src, tok_tgt, _ = T.load_run(out, device="cpu")
    assert cfg.data == "numbers" and cfg.max_tokens == 160
    assert isinstance(tok_tgt, generated.MorphemeTokenizer)
    assert tok_src.decode(tok_src.encode("twenty-one; four")) == "twenty-one; four"
    assert main(["translate", "evaluate", "--out", str(out), "--limit", "5", "--beam", "1", "--threads", "1"]) == 0
    assert "source words" in capsys.readouterr().out
    assert "by_length" in json.loads((out / "results-test-beam1.json").read_text())
    assert main(["translate", "translate", "--out", str(out), "forty-one", "--beam", "1", "--threads", "1"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--src", "4"], "--src: expected a language numbers are written in (en, de, fr), got '4'"),
        (["--tgt", "zh"], "--tgt: expected a language numbers are written in"),
        (["--src", "de"], "--src / --tgt: expected two different languages"),
        (["--data", "bogus"], "--data"),
    ],
)
def test_bad_generated_options_exit_2_at_parse_time(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = [] if "--data" in argv else ["--data", "numbers"]
    assert main(["translate", "train", *data, *argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_old_checkpoint_settings_default_to_the_bible() -> None:
    import argparse

    ns = argparse.Namespace(model="bahdanau", quick=False, **{k: None for k in T.DEFAULTS})
    stored = {k: full for k, (full, _q) in T.DEFAULTS.items() if k != "data"} | {"model": "bahdanau"}
    cfg = T.resolve_settings(ns, stored)
    assert cfg.data == "bible" and (cfg.src, cfg.tgt) == ("4", "e") and cfg.max_tokens == 64
    assert T.tokenizer_class(cfg) is not generated.MorphemeTokenizer
    ns.data = "numbers"
    fresh = T.resolve_settings(ns)
    assert (fresh.src, fresh.tgt, fresh.max_tokens) == ("en", "de", 160)


def test_settings_dataclass_matches_the_defaults_and_round_trips() -> None:
    """TranslateSettings' defaults are DEFAULTS' full column; what a checkpoint stores reads back equal."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(T.TranslateSettings)}
    assert {k: v for k, v in defaults.items() if k in T.DEFAULTS} == {k: f for k, (f, _q) in T.DEFAULTS.items()}
    s = T.TranslateSettings(model="luong", data="numbers", src="en", tgt="de", steps=7)
    stored = {**s.to_dict(), "model_config": {"ignored": True}}
    assert T.TranslateSettings.from_stored(stored) == s
    assert T.TranslateSettings.from_stored({"model": "none"}).data == "bible"  # checkpoints from before --data


def test_full_tour_section_compares_attention_with_none_by_length(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The full tour's translation section (shrunk to a few steps): no attention and Luong on numbers, one row each,
    exact match per length bucket, and JSON the claims table reads."""
    from attnkit.tasks.claims import build_claims, collect

    monkeypatch.setitem(T.TOUR_NUMBERS, "steps", 12)
    monkeypatch.setitem(T.TOUR_NUMBERS, "save_every", 0)
    monkeypatch.setitem(T.TOUR_NUMBERS, "eval_limit", 10)
    section = T.tour_section(tmp_path, False)
    assert [r[0] for r in section.table[1:]] == ["none", "luong"] and section.table[0][3] == "exact %"
    assert section.more_tables[0][0] == ["exact % by source words", "1-10", "11-20", "21-30", "31-40", "41-50"]
    assert all(str(tmp_path / img).endswith(".png") and (tmp_path / img).exists() for img in section.images)
    claim = build_claims(collect(tmp_path))[0]
    assert claim.measured.startswith("BLEU none ") and "longest inputs (41-50 words)" in claim.measured
