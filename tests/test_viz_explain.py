"""``attnkit explain``: MiniLM-L6 through attnkit's encoder, files written, top tokens, Chinese, clean errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from attnkit.cli import main  # noqa: E402
from attnkit.data import DataNotFoundError  # noqa: E402
from attnkit.tasks import explain as task  # noqa: E402
from attnkit.viz import capture  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    try:
        return task._minilm()
    except DataNotFoundError as err:
        pytest.skip(f"MiniLM package not installed: {err}")


def test_explain_chinese_pair_through_the_cli(minilm, tmp_path, capsys):
    out = tmp_path / "ex"
    rc = main(["explain", "我爱北京。", "--pair", "猫坐在垫子上", "--token", "北", "--out", str(out), "--top", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "where '北'" in printed and "layer 5" in printed and "rollout" in printed
    data = json.loads((out / "explain.json").read_text(encoding="utf-8"))
    tokens = data["tokens"]
    assert tokens[0] == "[CLS]" and tokens[data["token"]["index"]] == "北" and tokens.count("[SEP]") == 2
    assert "[UNK:爱]" in tokens and "[UNK:猫]" in tokens  # pieces outside the vocabulary keep their text
    assert list(data["top"]) == [f"layer {i}" for i in range(6)] + ["rollout"]
    assert all(len(v) == 2 for v in data["top"].values())
    page = (out / "attention.html").read_text(encoding="utf-8")
    assert "北" in page and "猫" in page
    for name in ("heads.png", "rollout.png", "token.png"):
        assert (out / name).stat().st_size > 5_000


def test_tour_section_top_tokens_are_the_captured_maps(minilm, tmp_path):
    section = task.tour_section(tmp_path, quick=True)
    assert section.images == ["explain/heads.png", "explain/rollout.png", "explain/token.png"]
    assert all((tmp_path / p).stat().st_size > 5_000 for p in section.images)
    assert ("interactive attention viewer (offline HTML)", "explain/attention.html") in section.links
    assert "'it'" in section.summary
    rows = section.table
    assert rows[0] == ["layer", "top 1", "top 2"] and [r[0] for r in rows[1:]] == [f"layer {i}" for i in range(6)] + [
        "rollout"
    ]
    assert all("[CLS]" not in cell and "[SEP]" not in cell for row in rows[1:] for cell in row)
    # the table's layer-5 winner is the argmax of an independent capture of the last layer
    model, tokenizer = minilm
    batch = tokenizer(task.EXAMPLE)
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    with torch.no_grad(), capture(model, layers=-1) as rec:
        model(**batch)
    row = rec[0].tensor[0].mean(0)[tokens.index("it")]  # (L,) mean of the heads, the row of "it"
    row[[0, len(tokens) - 1]] = -1  # [CLS] / [SEP] left out
    best = int(row.argmax())
    assert rows[6][1].startswith(f"{tokens[best]} ({best}) ")
    data = json.loads((tmp_path / "explain" / "explain.json").read_text(encoding="utf-8"))
    assert data["top"]["layer 5"][0]["weight"] == pytest.approx(float(row[best]), abs=1e-4)


def test_errors_are_clean(minilm, tmp_path, capsys):
    assert main(["explain", "   ", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "attnkit explain: error: expected a non-empty TEXT" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="word pieces"):
        task.explain("A short sentence.", token="zebra", out=tmp_path)
    with pytest.raises(ValueError, match="token index"):
        task.explain("A short sentence.", token="99", out=tmp_path)
    assert task.resolve_token("-1", ["[CLS]", "a", "[SEP]"]) == 2
    assert task.resolve_token(None, ["[CLS]", "a", "[SEP]"]) == 1
