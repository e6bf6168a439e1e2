"""Seq2seq models (GRU none / Bahdanau / Luong, Transformer) and batched greedy / beam decoding."""

from __future__ import annotations

import copy

import pytest
import torch

from attnkit.data.tokenizer import EOS
from attnkit.models.decoding import beam_search, greedy_decode, length_penalty
from attnkit.models.seq2seq import GRUSeq2Seq
from attnkit.models.transformer_mt import TransformerMT
from attnkit.testing import assert_close_to_reference
from attnkit.viz import capture


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.randint(4, 30, (3, 6))  # (B, S)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    src[1, 4:] = 0
    return src, mask


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    models = {a: GRUSeq2Seq(30, 25, attention=a, embed_dim=8, hidden_dim=12, dropout=0.0) for a in ("none", "bahdanau")}
    models["luong"] = GRUSeq2Seq(30, 25, attention="luong", embed_dim=8, hidden_dim=12, dropout=0.0)
    models["transformer"] = TransformerMT(30, 25, d_model=16, nhead=2, num_layers=1, dim_feedforward=32, dropout=0.0)
    return {k: m.eval() for k, m in models.items()}


@pytest.mark.parametrize("name", ["none", "bahdanau", "luong", "transformer"])
def test_step_by_step_equals_teacher_forcing_and_padding_is_ignored(name: str) -> None:
    model = _models()[name]
    src, mask = _batch()
    tgt = torch.randint(4, 25, (3, 5))
    with torch.no_grad():
        full = model(src, mask, tgt)  # (B, T, V)
        want = copy.deepcopy(model).double()(src, mask, tgt)  # the same weights in float64: the reference
        memory = model.encode(src, mask)
        state = model.init_state(memory)
        steps = []
        for t in range(5):
            logits, state, weights = model.step(tgt[:, t], state, memory)
            steps.append(logits)
            if name != "none":
                assert weights.shape == (3, 6)
                assert_close_to_reference(weights.sum(-1), torch.ones(3, dtype=torch.float64), reduction=6)
                assert torch.all(weights[1, 4:] == 0)  # padding gets no attention
        # row 1 with its padding cut off gives the same logits
        alone = model(src[1:2, :4], mask[1:2, :4], tgt[1:2])
    # each float32 result against the float64 one, never against each other; the chain of sums: up to 6 steps
    # (source and target positions) through the widest reduction (32, the transformer's feed-forward)
    assert_close_to_reference(torch.stack(steps, 1), want, reduction=6 * 32, msg="step by step")
    assert_close_to_reference(full, want, reduction=6 * 32, msg="teacher forcing")
    assert_close_to_reference(alone, want[1:2], reduction=6 * 32, msg="padding cut off")


@pytest.mark.parametrize("name", ["bahdanau", "luong"])
def test_gru_attention_gradcheck_float64(name: str) -> None:
    torch.manual_seed(0)
    model = GRUSeq2Seq(12, 10, attention=name, embed_dim=3, hidden_dim=4, dropout=0.0, dtype=torch.float64)
    src = torch.randint(4, 12, (2, 3))
    mask = torch.tensor([[True, True, True], [True, True, False]])
    memory = model.encode(src, mask)
    annotations = memory["annotations"].detach().requires_grad_(True)  # (B, S, hidden)
    s = memory["s0"].detach().requires_grad_(True)  # (B, hidden)
    tokens = torch.tensor([5, 6])

    def one_step(h: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
        mem = {**memory, "annotations": h}
        logits, _, weights = model.step(tokens, {"s": s0, "o": torch.zeros_like(s0)}, mem)
        return torch.cat([logits, weights], dim=-1)

    assert torch.autograd.gradcheck(one_step, (annotations, s))


def test_capture_sees_the_decoder_alignments() -> None:
    model = _models()["bahdanau"]
    src, mask = _batch()
    with capture(model) as rec:
        out = greedy_decode(model, src, mask, max_len=4)
    assert {r.name for r in rec} == {"attn"} and len(rec) == 4  # one map per decoder step
    seen = torch.stack([r.tensor[:, 0, 0] for r in rec], dim=1)  # (B, T, S) from (B, 1, 1, S) per step
    for b in range(3):
        w = out.weights[b]  # (T', S_b): trimmed at the end token and to the real source tokens
        assert torch.equal(seen[b, : w.shape[0], : w.shape[1]], w)  # the same maps, recorded and returned


@pytest.mark.parametrize("name", ["none", "bahdanau", "luong", "transformer"])
def test_beam_of_one_is_greedy_and_wider_beams_score_no_worse(name: str) -> None:
    model = _models()[name]
    src, mask = _batch()
    greedy = greedy_decode(model, src, mask, max_len=7)
    one = beam_search(model, src, mask, beam_size=1, max_len=7, alpha=0.0)
    assert one.tokens == greedy.tokens
    assert one.scores == pytest.approx(greedy.scores, abs=1e-4)
    wide = beam_search(model, src, mask, beam_size=4, max_len=7, alpha=0.0)
    for i in range(3):
        g_done = len(greedy.tokens[i]) < 7
        w_done = len(wide.tokens[i]) < 7
        if g_done == w_done:  # same kind of hypothesis (finished or not): the beam finds one at least as likely
            assert wide.scores[i] >= greedy.scores[i] - 1e-6


@pytest.mark.parametrize("name", ["bahdanau", "transformer"])
def test_batched_decoding_equals_one_sentence_at_a_time(name: str) -> None:
    model = _models()[name]
    src, mask = _batch()
    batch = beam_search(model, src, mask, beam_size=3, max_len=6)
    model64 = copy.deepcopy(model).double()  # the same weights in float64: the reference
    for i in range(3):
        n = int(mask[i].sum())
        single = beam_search(model, src[i : i + 1, :n], mask[i : i + 1, :n], beam_size=3, max_len=6)
        want = beam_search(model64, src[i : i + 1, :n], mask[i : i + 1, :n], beam_size=3, max_len=6)
        assert single.tokens[0] == batch.tokens[i] == want.tokens[0]
        assert single.scores[0] == pytest.approx(batch.scores[i], abs=1e-4)
        # each float32 alignment against the float64 model's, never against each other (beam_search hands its
        # weights back as float32, so the reference carries one float32 rounding: <= eps / 2, far inside the
        # tolerance); the chain of sums as in the step-by-step test: 6 steps x the widest reduction (32)
        ref = want.weights[0].double()
        assert_close_to_reference(single.weights[0], ref, reduction=6 * 32, msg=f"sentence {i} alone")
        assert_close_to_reference(batch.weights[i], ref, reduction=6 * 32, msg=f"sentence {i} in the batch")


def test_length_penalty_prefers_longer_finished_hypotheses() -> None:
    lp = length_penalty(torch.tensor([1, 5, 10]), 0.6)
    assert torch.all(lp[1:] > lp[:-1]) and float(lp[0]) == pytest.approx(1.0)
    assert torch.equal(length_penalty(torch.tensor([3, 9]), 0.0), torch.ones(2, dtype=torch.float64))


def test_decoding_stops_at_end_token() -> None:
    model = _models()["luong"]
    with torch.no_grad():
        model.out.bias.fill_(-100.0)
        model.out.bias[EOS] = 100.0  # the model always ends at once
    src, mask = _batch()
    assert greedy_decode(model, src, mask).tokens == [[], [], []]
    assert beam_search(model, src, mask, beam_size=2).tokens == [[], [], []]


def test_bad_inputs_raise_clear_errors() -> None:
    model = _models()["bahdanau"]
    src, mask = _batch()
    with pytest.raises(ValueError, match="attention in"):
        GRUSeq2Seq(10, 10, attention="dot")
    tgt = torch.randint(4, 25, (3, 2))
    with pytest.raises(ValueError, match=r"src ids in \[0, 30\)"):
        model(src + 100, mask, tgt)
    with pytest.raises(ValueError, match=r"tgt_in ids in \[0, 25\)"):
        model(src, mask, tgt + 30)
    with pytest.raises(ValueError, match="boolean src_mask"):
        model(src, mask.long(), tgt)
    empty = mask.clone()
    empty[0] = False
    with pytest.raises(ValueError, match="at least one real token"):
        greedy_decode(model, src, empty)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, src, mask, beam_size=0)
