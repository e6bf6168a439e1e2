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
from attnkit.testing import tolerance  # noqa: E402
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


# ------------------------------------------------------------------------------------------- causal LLMs

LLM_PROMPT = "The cat sat on the mat because it was warm."
SMOL_REDUCTION = 30 * 1536  # as tests/test_integrations_transformers.py: 30 layers x the 1536-wide MLP


@pytest.fixture(scope="module")
def smollm2_reference():
    """SmolLM2's eager maps in float64 for LLM_PROMPT: ``(layers, H, L, L)``, and the tokenizer."""
    pytest.importorskip("transformers", reason="the LLM path needs transformers")
    from attnkit.models.llm import load_causal_lm

    try:
        model, tok = load_causal_lm("smollm2", attn_implementation="eager", dtype=torch.float64)
    except (DataNotFoundError, ImportError) as err:
        pytest.skip(f"SmolLM2 is not available: {err}")
    batch = tok(LLM_PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_attentions=True, use_cache=False)
    return torch.stack(out.attentions)[:, 0], tok


def _by_hand(maps: torch.Tensor) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
    """sink, previous-token and distance per (layer, head), one Python loop per definition (the docstrings')."""
    n_layers, heads, length, _ = maps.shape
    sink, prev, dist = [], [], []
    for li in range(n_layers):
        s_row, p_row, d_row = [], [], []
        for h in range(heads):
            w = maps[li, h].tolist()
            s_row.append(sum(w[i][0] for i in range(1, length)) / (length - 1))
            p_row.append(sum(w[i][i - 1] for i in range(2, length)) / (length - 2))
            d_row.append(sum(sum(w[i][j] * (i - j) for j in range(i + 1)) for i in range(1, length)) / (length - 1))
        sink.append(s_row)
        prev.append(p_row)
        dist.append(d_row)
    return sink, prev, dist


def test_observe_equals_the_definitions_on_random_causal_maps() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 7, 7, generator=g, dtype=torch.float64)
    maps = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    obs = task.observe(maps, ["local 4", "global", "local 4"])
    sink, prev, dist = _by_hand(maps)
    # observe() computes in float64 and returns float32: one float32 rounding away from the loops
    assert torch.allclose(obs.sink.double(), torch.tensor(sink, dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.allclose(obs.previous.double(), torch.tensor(prev, dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.allclose(obs.distance.double(), torch.tensor(dist, dtype=torch.float64), rtol=1e-6, atol=0)
    # uniform baselines: query i sees min(i + 1, W) keys, the first one only while i < W
    want_sink = {4: sum(1 / min(i + 1, 4) for i in range(1, 4)) / 6, None: sum(1 / (i + 1) for i in range(1, 7)) / 6}
    want_dist = {4: sum((min(i + 1, 4) - 1) / 2 for i in range(1, 7)) / 6, None: sum(i / 2 for i in range(1, 7)) / 6}
    for got, want in ((obs.uniform_sink, want_sink), (obs.uniform_distance, want_dist)):
        assert got.tolist() == pytest.approx([want[4], want[None], want[4]], rel=1e-6)
    assert [r[0] for r in obs.kind_table()] == ["layers", "local 4", "global"]
    assert obs.kind_table()[1][1] == "2"
    with pytest.raises(ValueError, match="at least 3 tokens"):
        task.observe(maps[..., :2, :2])
    with pytest.raises(ValueError, match="layers, H, L, L"):
        task.observe(maps[0])


def test_llm_cli_observations_are_the_reference_maps(smollm2_reference, tmp_path, capsys) -> None:
    """`explain --model smollm2`: the observations in the JSON (from attnkit's maps) equal the definitions applied
    to float64 eager maps, within the float32 tolerance of the maps."""
    ref_maps, tok = smollm2_reference
    out = tmp_path / "lm"
    assert main(["explain", "--model", "smollm2", LLM_PROMPT, "--token", "it", "--out", str(out), "--top", "2"]) == 0
    printed = capsys.readouterr().out
    assert "attn_implementation='attnkit'" in printed and "previous-token" in printed and "sink share" in printed
    data = json.loads((out / "explain.json").read_text(encoding="utf-8"))
    length = ref_maps.shape[-1]
    assert data["model"] == "smollm2" and len(data["tokens"]) == length
    assert data["token_ids"] == tok(LLM_PROMPT)["input_ids"]
    assert data["tokens"][data["token"]["index"]] == "it"
    obs = data["observations"]
    sink, prev, dist = _by_hand(ref_maps)
    atol, _ = tolerance(torch.float32, SMOL_REDUCTION)  # the maps' tolerance (test_integrations_transformers)
    # sink and previous are means of map entries: the maps' tolerance; distance sums i <= L terms weighted by
    # (i - j) <= L: at most atol * L * L / 2 (plus the JSON's rounding to 3 decimals)
    for name, want, bound in (("sink_per_head", sink, atol + 5e-5), ("previous_per_head", prev, atol + 5e-5),
                              ("distance_per_head", dist, atol * length * length / 2 + 5e-4)):
        got = torch.tensor(obs[name], dtype=torch.float64)
        err = (got - torch.tensor(want, dtype=torch.float64)).abs().max().item()
        assert err <= bound, f"{name}: max error {err:.2e} > {bound:.2e}"
    assert [row["kind"] for row in obs["layers"]] == ["global"] * 30
    layer_sink = [sum(r) / len(r) for r in sink]
    assert [row["sink"] for row in obs["layers"]] == pytest.approx(layer_sink, abs=atol + 5e-5)
    # top tokens of the last layer: the mean of the heads' row of "it"
    row = ref_maps[-1].mean(0)[data["token"]["index"]]
    assert data["top"]["layer 29"][0]["position"] == int(row.argmax())
    for name in ("attention.html", "heads.png", "observations.png"):
        assert (out / name).stat().st_size > 5_000


def test_tour_llm_section_tables_are_the_observations(smollm2_reference, tmp_path) -> None:
    section = task.tour_llm_section(tmp_path, quick=True)
    assert section.images == ["explain_llm/observations.png", "explain_llm/heads.png"]
    assert all((tmp_path / p).stat().st_size > 5_000 for p in section.images)
    assert section.table[0][:3] == ["layer", "kind", "sink share"] and len(section.table) == 31
    data = json.loads((tmp_path / "explain_llm" / "explain.json").read_text(encoding="utf-8"))
    assert [r[2] for r in section.table[1:]] == [f"{row['sink']:.2f}" for row in data["observations"]["layers"]]
    heads = section.more_tables[0]
    prev = torch.tensor(data["observations"]["previous_per_head"])
    best = divmod(int(prev.flatten().argmax()), prev.shape[1])
    assert heads[1][:2] == [str(best[0]), str(best[1])]
    assert f"layer {best[0]} head {best[1]}" in section.summary


def test_llm_errors_are_clean(tmp_path, capsys) -> None:
    assert main(["explain", "--model", "smollm2", "hi", "--pair", "there", "--out", str(tmp_path)]) == 2
    assert "no --pair" in capsys.readouterr().err
    assert main(["explain", "x", "--file", "README.md", "--out", str(tmp_path)]) == 2
    assert "TEXT or --file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="causal LM"):
        task.explain_llm("hello there friend", model="minilm", out=tmp_path)


def test_layer_kinds_follow_the_config() -> None:
    transformers = pytest.importorskip("transformers", reason="configs come from transformers")
    gemma = transformers.Gemma3TextConfig(num_hidden_layers=7, sliding_window=512)  # five local, one global
    assert task.layer_kinds(gemma) == ["local 512"] * 5 + ["global", "local 512"]
    assert task.layer_kinds(transformers.LlamaConfig(num_hidden_layers=2)) == ["global", "global"]


@pytest.mark.slow  # ~25 s on 2 busy cores (float64 eager Gemma); the default run covers observe() and the kinds above
def test_gemma3_local_and_global_observations_are_the_reference_maps(tmp_path) -> None:
    """Gemma-3 on a prompt longer than its 512-key window: the kinds come from the config, and every observation
    (from attnkit's maps) equals the definitions applied to float64 eager maps."""
    pytest.importorskip("transformers", reason="the LLM path needs transformers")
    from attnkit.models.llm import LLMS, load_causal_lm

    if "gemma3" not in LLMS:
        pytest.skip("this attnkit has no gemma3 model")
    try:
        reference, tok = load_causal_lm("gemma3", attn_implementation="eager", dtype=torch.float64)
    except (DataNotFoundError, ImportError) as err:
        pytest.skip(f"Gemma-3-270m is not available: {err}")
    text = " ".join([LLM_PROMPT] * 50)  # about 550 tokens
    batch = tok(text, return_tensors="pt")
    length = batch["input_ids"].shape[1]
    assert length > 512 + 16  # queries beyond the window
    with torch.no_grad():
        ref_maps = torch.stack(reference(**batch, output_attentions=True, use_cache=False).attentions)[:, 0]
    del reference
    result = task.explain_llm(text, model="gemma3", out=tmp_path, top=1)
    obs = result.observations
    assert obs is not None and obs.layer_kinds == ["local 512"] * 5 + ["global"] + ["local 512"] * 5 + ["global"] + [
        "local 512"
    ] * 5 + ["global"]
    kinds = obs.kind_table()
    assert [r[0] for r in kinds[1:]] == ["local 512", "global"] and [r[1] for r in kinds[1:]] == ["15", "3"]
    ref = task.observe(ref_maps, obs.layer_kinds)  # observe() itself is checked against loops above
    atol, _ = tolerance(torch.float32, 18 * 2048)  # the maps' tolerance: 18 layers x the 2048-wide MLP
    assert (obs.sink - ref.sink).abs().max() <= atol
    assert (obs.previous - ref.previous).abs().max() <= atol
    assert (obs.distance - ref.distance).abs().max() <= atol * length * length / 2
    # a local layer's query beyond the window cannot see the first token: its uniform baseline says so
    assert obs.uniform_sink[0] < obs.uniform_sink[5]
    assert float(ref_maps[0, :, 512:, 0].abs().max()) == 0.0
    data = json.loads((tmp_path / "explain.json").read_text(encoding="utf-8"))
    assert data["model"] == "gemma3" and len(data["tokens"]) == length and "html" not in result.files
