"""attn_implementation="attnkit" inside HuggingFace models: MiniLM (bidirectional, padding), SmolLM2-135M (causal,
GQA 9/3, left padding, generation), tiny random Gemma-3 configs (sliding windows), a tiny random Gemma-2 config
(soft-capping), a tiny random gpt-oss config (attention sinks). The real Gemma-3-270m:
tests/test_integrations_transformers_gemma3.py.

Tolerance policy (attnkit.testing): every float32 result - attnkit's and, for context, HF eager's - is compared with
the float64 eager run of the same weights (``model.double()``), never with another float32 result. The reduction is
the one of a stack of layers: ``num_layers x`` the widest reduction of one layer (the feed-forward width), both for
the last hidden states / logits and for the maps (a layer's map depends on every layer below it). Rows of padding
queries are excluded (HF eager gives a fully masked row a uniform map; attnkit gives zeros, as documented).

The causal models' float64 reference runs each prompt alone, unpadded: HF eager adds ``finfo(float64).min`` to masked
scores and takes the softmax in float32, where that becomes ``-inf``, so a left-padded batch's fully masked rows
give NaN, which the ``0 x NaN`` of the next layer's masked keys spreads to every row. Unpadded, no row is fully
masked; RoPE scores depend only on relative positions, so the real rows are the same math as in the padded batch.

``MEASURED`` collects the worst share of the tolerance used (``|actual - ref| / (atol + rtol |ref|)``, 1.0 = at the
limit); run with ``-s`` to see it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import contextlib  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers", reason="the integration needs transformers")
ak = pytest.importorskip("attnkit.integrations.transformers", reason="the integration needs transformers >= 5")

from attnkit.data import DataNotFoundError  # noqa: E402
from attnkit.functional import (  # noqa: E402
    AndMask,
    CausalMask,
    MaskMod,
    PaddingMask,
    SlidingWindowMask,
    attention_weights,
)
from attnkit.testing import assert_close_to_reference, tolerance  # noqa: E402

MEASURED: dict[str, float] = {}

MINILM_REDUCTION = 6 * 1536  # 6 layers x the 1536-wide feed-forward
SMOL_REDUCTION = 30 * 1536  # 30 layers x the 1536-wide MLP

PROMPTS = [
    "The capital of France is",
    "Attention is all you need, said the paper; since then",
    "def fibonacci(n):",
    "Once upon a time, in a small village, there lived a clockmaker who",
]


def _check(name: str, actual: torch.Tensor, ref: torch.Tensor, reduction: int, *, grad: bool = False) -> None:
    """assert_close_to_reference, and record the share of the tolerance used."""
    atol, rtol = tolerance(actual.dtype, reduction, grad=grad)
    share = ((actual.double() - ref).abs() / (atol + rtol * ref.abs())).max().item()
    MEASURED[name] = max(MEASURED.get(name, 0.0), share)
    assert_close_to_reference(actual, ref, reduction=reduction, grad=grad, msg=name)


def _unpadded_reference(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple]:
    """Per row of a left-padded batch: ``(pad, logits (l, V), maps [(H, l, l) per layer])`` of the float64 model
    run on that row's real tokens alone."""
    out = []
    with torch.no_grad():
        for row, real in zip(ids, mask.bool(), strict=True):
            pad = int((~real).sum())
            assert real[pad:].all(), "left padding expected"
            res = model(input_ids=row[pad:].unsqueeze(0), output_attentions=True)
            out.append((pad, res.logits[0], [a[0] for a in res.attentions]))
    return out


def _check_padded(name: str, logits: torch.Tensor, maps: tuple | None, reference: list[tuple], reduction: int) -> None:
    """A left-padded batch's real rows against the unpadded float64 reference; padding keys get zero weight."""
    for b, (pad, ref_logits, ref_maps) in enumerate(reference):
        _check(f"{name} logits", logits[b, pad:], ref_logits, reduction)
        if maps:
            mine = torch.stack([layer[b, :, pad:] for layer in maps])  # (layers, H, l, S)
            assert (mine[..., :pad] == 0).all()  # padding keys get zero weight
            _check(f"{name} maps", mine[..., pad:], torch.stack(ref_maps), reduction)


@contextlib.contextmanager
def _no_fallback() -> Iterator[None]:
    """Within the block, a fallback warning from the integration is an error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message='attn_implementation="attnkit"')
        yield


# ------------------------------------------------------------------------------------------------- registration


def test_register_is_idempotent() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    ak.register()
    ak.register()
    assert ak.is_registered()
    assert AttentionInterface()["attnkit"] is ak.attnkit_attention_forward
    assert AttentionMaskInterface()["attnkit"] is ak.attnkit_mask
    assert list(AttentionInterface().keys()).count("attnkit") == 1


def _tiny_llama(impl: str) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.set_attn_implementation(impl)
    return model.eval()


def test_without_a_mask_function_hf_passes_no_mask() -> None:
    """Why the integration registers in AttentionMaskInterface too: transformers 5.x hands an implementation that is
    only in AttentionInterface no mask at all (causality and padding would be lost)."""
    from transformers import AttentionInterface

    seen: list[object] = []

    def probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(attention_mask)
        return ak.attnkit_attention_forward(module, query, key, value, attention_mask, scaling, dropout)

    AttentionInterface.register("attnkit_probe", probe)
    try:
        model = _tiny_llama("attnkit_probe")
        ids = torch.randint(0, 64, (2, 6))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]))
    finally:
        del AttentionInterface._global_mapping["attnkit_probe"]
    assert seen and all(m is None for m in seen)


# ------------------------------------------------------------------------------------------- masks, structured


def _hf_mask(**kw: object) -> ak.HFMask:
    return ak.attnkit_mask(device="cpu", **kw)  # type: ignore[arg-type]


def test_masks_become_structured_where_they_can() -> None:
    from transformers import masking_utils as mu

    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    holes = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    packed = mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(torch.tensor([[0, 0, 1, 1]] * 2)))
    bidi = mu.bidirectional_mask_function
    cases = {
        "bidirectional, no padding": (dict(mask_function=bidi), type(None)),
        "bidirectional, right padding": (dict(mask_function=bidi, attention_mask=right), PaddingMask),
        "bidirectional, left padding": (dict(mask_function=bidi, attention_mask=left), MaskMod),
        "causal prefill": (dict(), CausalMask),
        "causal decode": (dict(q_length=1, q_offset=3), CausalMask),
        "causal decode, left padding": (dict(q_length=1, q_offset=3, attention_mask=left), AndMask),
        "causal, right padding": (dict(attention_mask=right), AndMask),
        "causal, left padding": (dict(attention_mask=left), AndMask),
        "causal, padding holes": (dict(attention_mask=holes), MaskMod),
        "sliding window": (dict(mask_function=mu.sliding_window_causal_mask_function(2)), SlidingWindowMask),
        "sliding window decode, left padding": (dict(mask_function=mu.sliding_window_causal_mask_function(2),
                                                     q_length=1, q_offset=3, attention_mask=left), AndMask),
        "packed sequences": (dict(mask_function=packed), MaskMod),
    }
    for name, (kw, kind) in cases.items():
        mask = _hf_mask(**{"batch_size": 2, "q_length": 4, "kv_length": 4, **kw})
        got = mask.to_attnkit()
        assert isinstance(got, kind), (name, got)
        dense = mask.materialize()  # HF's own sdpa_mask, the pattern eager / sdpa use
        assert dense.shape == (2, 1, mask.q_length, 4)
        q, k = torch.randn(2, 2, mask.q_length, 8, dtype=torch.float64), torch.randn(2, 1, 4, 8, dtype=torch.float64)
        mine, theirs = attention_weights(q, k, got), attention_weights(q, k, dense)
        assert torch.equal(mine > 0, theirs > 0), name  # the same keys, exactly
        assert_close_to_reference(mine, theirs, reduction=4, msg=name)
        # the mask_mod form describes the same pattern
        b, q_idx, kv = torch.arange(2).view(2, 1, 1, 1), torch.arange(mask.q_length).view(1, 1, -1, 1), torch.arange(4)
        zero = torch.zeros(1, 1, 1, 1, dtype=torch.long)
        assert torch.equal(mask.mask_mod()(b, zero, q_idx, kv.view(1, 1, 1, -1)).expand_as(dense), dense), name
    assert _hf_mask(batch_size=2, q_length=1, kv_length=4, q_offset=3).to_attnkit() == CausalMask("lower_right")


# ---------------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="session")
def minilm():
    from attnkit.models.bert import load_minilm

    try:
        _, tok = load_minilm()
    except DataNotFoundError as err:
        pytest.skip(f"MiniLM weights are not installed: {err}")
    folder = str(tok.path.parent)

    def load(impl: str) -> torch.nn.Module:
        return transformers.BertModel.from_pretrained(
            folder, attn_implementation=impl, add_pooling_layer=False, local_files_only=True
        ).eval()

    reference = load("eager").double()
    hf_tok = transformers.BertTokenizerFast.from_pretrained(folder, local_files_only=True)
    return {"attnkit": load("attnkit"), "eager": load("eager"), "reference": reference, "tok": hf_tok}


@pytest.mark.parametrize("side", ["right", "left"])
def test_minilm_hidden_states_and_maps_match_eager(minilm, side: str) -> None:
    tok = minilm["tok"]
    tok.padding_side = side
    batch = tok(["A man is playing a guitar.", "Hi", "The animal didn't cross the street because it was too tired.",
                 "Die Straße ist nass, weil es geregnet hat."], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()  # (B, L)
    with torch.no_grad(), _no_fallback():
        ref = minilm["reference"](**batch, output_attentions=True)
        ours = minilm["attnkit"](**batch).last_hidden_state
        ours_maps = minilm["attnkit"](**batch, output_attentions=True)
        eager = minilm["eager"](**batch, output_attentions=True)
    assert torch.equal(ours_maps.last_hidden_state, ours)  # the output stays on the fused kernel with maps on
    _check(f"minilm {side}: attnkit hidden", ours[real], ref.last_hidden_state[real], MINILM_REDUCTION)
    _check(f"minilm {side}: eager hidden", eager.last_hidden_state[real], ref.last_hidden_state[real],
           MINILM_REDUCTION)
    assert len(ours_maps.attentions) == 6
    for i, (mine, theirs) in enumerate(zip(ours_maps.attentions, ref.attentions, strict=True)):
        rows = real[:, None, :, None].expand_as(mine)
        _check(f"minilm {side}: attnkit maps", mine[rows], theirs[rows], MINILM_REDUCTION)
        assert (mine[~real[:, None, None, :].expand_as(mine)] == 0).all(), i  # padding keys get zero weight


# --------------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="session")
def smollm2():
    from attnkit.models.llm import load_causal_lm

    try:
        attnkit_model, tok = load_causal_lm("smollm2", attn_implementation="attnkit")
    except (DataNotFoundError, ImportError) as err:
        pytest.skip(f"SmolLM2 is not available: {err}")
    eager, _ = load_causal_lm("smollm2", attn_implementation="eager")
    sdpa, _ = load_causal_lm("smollm2", attn_implementation="sdpa")
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert batch["attention_mask"][:, 0].sum() < len(PROMPTS)  # left padding, mixed lengths
    reference, _ = load_causal_lm("smollm2", attn_implementation="eager", dtype=torch.float64)
    ref = _unpadded_reference(reference, batch["input_ids"], batch["attention_mask"])
    del reference
    return {"attnkit": attnkit_model, "eager": eager, "sdpa": sdpa, "tok": tok, "batch": batch, "ref": ref}


def test_smollm2_logits_and_maps_match_eager(smollm2) -> None:
    batch, ref = smollm2["batch"], smollm2["ref"]
    with torch.no_grad(), _no_fallback():
        ours = smollm2["attnkit"](**batch).logits
        with_maps = smollm2["attnkit"](**batch, output_attentions=True)
        eager = smollm2["eager"](**batch, output_attentions=True)
    assert torch.equal(with_maps.logits, ours)  # the output stays on the fused kernel with maps on
    assert len(with_maps.attentions) == 30 and with_maps.attentions[0].shape[1] == 9
    _check_padded("smollm2: attnkit", ours, with_maps.attentions, ref, SMOL_REDUCTION)
    _check_padded("smollm2: eager", eager.logits, eager.attentions, ref, SMOL_REDUCTION)


def test_smollm2_greedy_generation_equals_eager_and_sdpa(smollm2) -> None:
    tok, batch = smollm2["tok"], smollm2["batch"]
    texts = {}
    for impl in ("attnkit", "eager", "sdpa"):
        cache = transformers.DynamicCache(config=smollm2[impl].config)
        with torch.no_grad(), _no_fallback():
            out = smollm2[impl].generate(**batch, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                         cache=cache, pad_token_id=tok.pad_token_id)
        assert isinstance(cache, transformers.DynamicCache) and cache.get_seq_length() >= out.shape[1] - 1
        texts[impl] = out[:, batch["input_ids"].shape[1]:]
        assert texts[impl].shape[1] == 40
    assert torch.equal(texts["attnkit"], texts["eager"]), tok.batch_decode(texts["attnkit"])
    assert torch.equal(texts["attnkit"], texts["sdpa"])


def test_capture_works_on_an_attnkit_hf_model(smollm2) -> None:
    from attnkit.viz import capture

    model, batch, ref = smollm2["attnkit"], smollm2["batch"], smollm2["ref"]
    with torch.no_grad():
        plain = model(**batch).logits
        with capture(model, layers=[0, -1]) as rec:
            captured = model(**batch).logits
    assert torch.equal(captured, plain)  # capture does not touch the output
    assert [r.name for r in rec] == ["model.layers.0.self_attn", "model.layers.29.self_attn"]
    maps = rec.stack()  # (2 layers, B, H, L, S)
    assert maps.shape[:3] == (2, len(PROMPTS), 9)
    first_last = [(pad, logits, [m[0], m[-1]]) for pad, logits, m in ref]
    _check_padded("smollm2: captured", captured, tuple(maps), first_last, SMOL_REDUCTION)
    assert not [k for k in model.state_dict() if ak.TAP_NAME in k]  # the taps hold no state


# ------------------------------------------------------------------------------- Gemma-3 configs, random weights


def _tiny_gemma3(impl: str, **overrides: object) -> torch.nn.Module:
    cfg = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=5, max_position_embeddings=128,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], **overrides,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg)
    model.set_attn_implementation(impl)
    return model.eval()


def test_sliding_window_layers_match_eager() -> None:
    """Gemma-3's sliding (window 5) and global layers, left padding, 16 tokens: the window matters."""
    ours = _tiny_gemma3("attnkit")
    reference = _tiny_gemma3("eager").double()
    ids = torch.randint(1, 96, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad(), _no_fallback():
        out = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
    ref = _unpadded_reference(reference, ids, mask)
    _check_padded("gemma3 tiny: attnkit", out.logits, out.attentions, ref, 4 * 128)
    assert (out.attentions[0][1, :, 10, :6] == 0).all()  # sliding layer: query 10 cannot see key 5 or before
    assert (out.attentions[1][1, :, 10, :6] > 0).all()  # global layer: it can


def test_sliding_window_gradients_match_eager() -> None:
    """A training step's gradients through the sliding and global layers (forward + backward, 24 tokens)."""
    ours = _tiny_gemma3("attnkit").train()
    reference = _tiny_gemma3("eager").double().train()
    ids = torch.randint(1, 96, (2, 24))
    with _no_fallback():
        ours(input_ids=ids, labels=ids).loss.backward()
    reference(input_ids=ids, labels=ids).loss.backward()
    theirs = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and theirs[name].grad is not None, name
        _check("gemma3 tiny: attnkit gradients", p.grad, theirs[name].grad, 4 * 128, grad=True)


def _tiny_gemma2(impl: str) -> torch.nn.Module:
    cfg = transformers.Gemma2Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=5, max_position_embeddings=128, query_pre_attn_scalar=16,
        attn_logit_softcapping=2.0,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg)
    model.set_attn_implementation(impl)
    return model.eval()


def test_softcap_is_served_exactly() -> None:
    """Gemma-2's logit soft-capping (cap 2.0, small enough to change every score) on a sliding (window 5) and a
    global layer, left padding, 16 tokens: no fallback; logits and maps against the float64 eager model, and a
    training step's gradients."""
    ours = _tiny_gemma2("attnkit")
    reference = _tiny_gemma2("eager").double()
    ids = torch.randint(1, 96, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad(), _no_fallback():
        out = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
        plain = ours(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out.logits, plain)  # maps do not change the output
    ref = _unpadded_reference(reference, ids, mask)
    _check_padded("gemma2 softcap: attnkit", out.logits, out.attentions, ref, 2 * 128)
    ours.train()
    reference.train()
    with _no_fallback():
        ours(input_ids=ids[1:], labels=ids[1:]).loss.backward()
    reference(input_ids=ids[1:], labels=ids[1:]).loss.backward()
    theirs = dict(reference.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and theirs[name].grad is not None, name
        _check("gemma2 softcap: gradients", p.grad, theirs[name].grad, 2 * 128, grad=True)


def test_softcap_with_sinks_goes_to_eager() -> None:
    """The sink key's score would be capped too: softcap with s_aux is left to the model's eager attention."""
    assert ak._unsupported({"softcap": 2.0, "s_aux": torch.zeros(4)}) is not None
    assert ak._unsupported({"softcap": 2.0}) is None


def _tiny_gpt_oss(impl: str) -> torch.nn.Module:
    cfg = transformers.GptOssConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=5, max_position_embeddings=128, num_local_experts=4,
        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:  # learned sinks, away from zero: some heads lean on them, some do not
            layer.self_attn.sinks.copy_(torch.tensor([-2.0, 0.0, 1.5, 3.0]))
    model.set_attn_implementation(impl)
    model.set_experts_implementation("eager")  # the grouped matmul has no float64
    return model.eval()


def test_attention_sinks_are_served_exactly() -> None:
    """gpt-oss sinks (s_aux): one learned logit per head in the softmax denominator, served by attnkit's kernel as
    one more key (no fallback). Left-padded batch, a sliding (window 5) and a global layer, 16 tokens: logits and
    maps against HF's eager in float64 (gpt-oss's eager takes the softmax in the model's dtype: a float64
    reference), and a training step's gradients, the sinks' own included."""
    ours = _tiny_gpt_oss("attnkit")
    reference = _tiny_gpt_oss("eager").double()
    ids = torch.randint(1, 96, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :3] = 0
    real = mask.bool()
    with torch.no_grad():
        with _no_fallback():
            out = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
            plain = ours(input_ids=ids, attention_mask=mask).logits
        ref = reference(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert torch.equal(out.logits, plain)
    _check("gpt-oss sinks: logits", out.logits[real], ref.logits[real], 2 * 64)
    for mine, theirs in zip(out.attentions, ref.attentions, strict=True):
        assert mine.shape == theirs.shape == (2, 4, 16, 16)
        rows = real[:, None, :, None].expand_as(mine)
        _check("gpt-oss sinks: maps", mine[rows], theirs[rows], 2 * 64)
    assert (out.attentions[1][1, 0].sum(-1) < 1).all()  # the sink takes its share: rows sum below one
    ours.train()
    reference.train()
    with _no_fallback():
        ours(input_ids=ids, labels=ids).loss.backward()
    reference(input_ids=ids, labels=ids).loss.backward()
    theirs = dict(reference.named_parameters())
    assert ours.model.layers[0].self_attn.sinks.grad.abs().min() > 0
    for name, p in ours.named_parameters():
        if p.grad is None:  # experts no token was routed to
            assert theirs[name].grad is None or not theirs[name].grad.any(), name
            continue
        _check("gpt-oss sinks: gradients", p.grad, theirs[name].grad, 2 * 64, grad=True)


def test_attention_sinks_in_decode_steps() -> None:
    """Decode steps with a KV cache (one query against the cache: the sliding layer's cache rolls past its window of
    5), sinks included: each step's logits against the float64 eager model run on the same cache steps."""
    ours = _tiny_gpt_oss("attnkit")
    reference = _tiny_gpt_oss("eager").double()
    ids = torch.randint(1, 96, (2, 12))
    caches = {m: transformers.DynamicCache(config=m.config) for m in (ours, reference)}
    with torch.no_grad(), _no_fallback():
        steps = [ids[:, :6]] + [ids[:, i : i + 1] for i in range(6, 12)]
        for step in steps:
            mine = ours(input_ids=step, cache=caches[ours], use_cache=True).logits
            theirs = reference(input_ids=step, cache=caches[reference], use_cache=True).logits
            _check("gpt-oss sinks: decode logits", mine, theirs, 2 * 64)
    assert caches[ours].get_seq_length() == 12


def test_unknown_keyword_falls_back_to_sdpa_with_one_warning() -> None:
    ak._warned.clear()
    module = torch.nn.Module()
    module.is_causal = True  # type: ignore[assignment]
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, weights = ak.attnkit_attention_forward(module, q, k, v, None, some_new_bias=1)
        ak.attnkit_attention_forward(module, q, k, v, None, some_new_bias=1)
    mine = [w for w in caught if "attnkit" in str(w.message)]
    assert len(mine) == 1 and "some_new_bias" in str(mine[0].message) and "sdpa" in str(mine[0].message)
    assert out.shape == (1, 5, 4, 8) and weights is None
    plain, _ = ak.attnkit_attention_forward(module, q, k, v, None)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True).transpose(1, 2)
    assert_close_to_reference(out, reference, reduction=5)
    assert_close_to_reference(plain, reference, reduction=5)


def teardown_module() -> None:
    if MEASURED:
        print("\nworst share of the tolerance used:", {k: round(v, 3) for k, v in MEASURED.items()})
