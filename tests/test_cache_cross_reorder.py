"""CrossKVCache (a cross-attention memory projected once), reorder(index) on every cache, and beam search with both.

* cached cross-attention equals the uncached call (float64, the attnkit.testing policy) and projects the memory
  once;
* ``reorder`` equals a cache rebuilt from the reordered inputs, exactly, and keeps the buffers when it can;
* TransformerMT's beam search gives the same tokens and scores as rebuilding the caches every step, and as
  decoding with no cache at all.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from attnkit.layers import (
    ALiBiPosition,
    CrossKVCache,
    KVCache,
    MultiHeadAttention,
    RingKVCache,
    RotaryPosition,
    TransformerDecoder,
    TransformerDecoderLayer,
)
from attnkit.models.decoding import beam_search
from attnkit.models.seq2seq import Seq2SeqBase
from attnkit.models.transformer_mt import TransformerMT
from attnkit.testing import assert_close_to_reference

D64 = torch.float64


def _counter(module: nn.Module) -> list[int]:
    """A list whose length is how many times ``module`` ran (a forward hook appends to it)."""
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _pad(lengths: list[int], s: int) -> Tensor:
    return torch.arange(s) < torch.tensor(lengths)[:, None]  # (B, S): True = real token


# ---------------------------------------------------------------------------------------------------------------
# CrossKVCache in MultiHeadAttention and the decoder layer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kv_heads", "position"),
    [(4, None), (2, None), (1, "alibi"), (2, "rotary")],
    ids=["mha", "gqa", "mqa_alibi", "gqa_rotary"],
)
def test_cached_cross_attention_equals_uncached_and_projects_the_memory_once(kv_heads: int, position: str | None):
    torch.manual_seed(0)
    pos = {None: None, "alibi": ALiBiPosition(4), "rotary": RotaryPosition(4)}[position]
    mha = MultiHeadAttention(16, 4, num_kv_heads=kv_heads, kdim=12, vdim=10, position=pos, qk_norm=True, dtype=D64)
    mha.eval()
    mem_k, mem_v = torch.randn(3, 7, 12, dtype=D64), torch.randn(3, 7, 10, dtype=D64)  # (B, S, kdim), (B, S, vdim)
    km = _pad([7, 4, 1], 7)
    bias = torch.randn(2, 7, dtype=D64)  # float attn_mask (L, S), added to the scores
    k_calls, v_calls, q_calls = _counter(mha.k_proj), _counter(mha.v_proj), _counter(mha.q_proj)
    cache = CrossKVCache()
    queries = [torch.randn(3, n, 16, dtype=D64) for n in (2, 1, 1, 3)]
    for i, q in enumerate(queries):
        mem = (mem_k, mem_v) if i % 2 == 0 else (None, None)  # the memory may be passed again or left out
        got, got_w = mha(q, *mem, key_mask=km, cache=cache, need_weights=True)
        want, want_w = mha(q, mem_k, mem_v, key_mask=km, need_weights=True)
        assert_close_to_reference(got, want, reduction=16)  # float64 on both sides: the uncached call is the
        assert_close_to_reference(got_w, want_w, reduction=16)  # reference (longest reduction: d_model 16)
    masked = mha(queries[0], attn_mask=bias, key_mask=km, cache=cache)
    assert_close_to_reference(masked, mha(queries[0], mem_k, mem_v, attn_mask=bias, key_mask=km), reduction=16)
    # cached calls: 5, uncached: 5; the memory was projected at the first cached call only
    assert (len(k_calls), len(v_calls), len(q_calls)) == (1 + 5, 1 + 5, 5 + 5)
    assert cache.keys is not None and cache.keys.shape == (3, kv_heads, 7, 4)


def test_decoder_layers_reuse_their_cross_cache_through_the_module() -> None:
    torch.manual_seed(0)
    dec = TransformerDecoder(TransformerDecoderLayer(16, 4, dim_feedforward=24, norm_first=True, dtype=D64), 2).eval()
    tgt, memory, km = torch.randn(2, 5, 16, dtype=D64), torch.randn(2, 6, 16, dtype=D64), _pad([6, 3], 6)
    counts = [(_counter(layer.multihead_attn.k_proj), _counter(layer.multihead_attn.q_proj)) for layer in dec.layers]
    cache = dec.new_cache()
    steps = [dec(tgt[:, t : t + 1], memory, memory_key_mask=km, is_causal=True, cache=cache) for t in range(5)]
    assert [(len(k), len(q)) for k, q in counts] == [(1, 5), (1, 5)]  # memory projected once, queries every step
    assert all(isinstance(c.cross_attn, CrossKVCache) and c.cross_attn.filled for c in cache)
    full = dec(tgt, memory, memory_key_mask=km, is_causal=True)
    assert_close_to_reference(torch.cat(steps, 1), full, reduction=24)  # float64; dim_feedforward 24


def test_cached_cross_attention_gradcheck() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(4, 2, kdim=3, dtype=D64)
    q = torch.randn(1, 2, 4, dtype=D64, requires_grad=True)
    m = torch.randn(1, 3, 3, dtype=D64, requires_grad=True)
    km = torch.tensor([[True, True, False]])

    def two_steps(q: Tensor, m: Tensor) -> Tensor:
        cache = CrossKVCache()
        first = mha(q, m, key_mask=km, cache=cache)  # fills the cache: the gradient reaches m through it
        return first + mha(q.flip(1), key_mask=km, cache=cache)

    assert torch.autograd.gradcheck(two_steps, (q, m))


def test_cache_errors() -> None:
    mha = MultiHeadAttention(8, 2)
    x, mem = torch.randn(2, 1, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"key \(the memory\) at the first call with a CrossKVCache"):
        mha(x, cache=CrossKVCache())
    with pytest.raises(ValueError, match="a KVCache only with self-attention"):
        mha(x, mem, cache=KVCache())
    with pytest.raises(ValueError, match="cache= a KVCache, RingKVCache, CrossKVCache or None"):
        mha(x, cache={"k": mem})  # type: ignore[arg-type]
    cache = CrossKVCache()
    mha(x, mem, cache=cache)
    with pytest.raises(ValueError, match="the memory this cache was filled with"):
        mha(x, torch.randn(2, 4, 8), cache=cache)  # another memory length
    with pytest.raises(ValueError, match="the memory this cache was filled with"):
        mha(torch.randn(3, 1, 8), cache=cache)  # another batch
    for bad in (torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]]), torch.tensor([0, 2]), torch.tensor([-1, 0]), [0, 1]):
        with pytest.raises(ValueError, match="index: a 1-D integer tensor|batch rows in"):
            cache.reorder(bad)  # type: ignore[arg-type]
    KVCache().reorder(torch.tensor([3, 1]))  # nothing cached yet: nothing to reorder
    CrossKVCache().reorder(torch.tensor([3, 1]))


# ---------------------------------------------------------------------------------------------------------------
# reorder == a cache rebuilt from the reordered inputs
# ---------------------------------------------------------------------------------------------------------------

ORDERS = {"permute": [2, 0, 1], "repeat": [1, 1, 2], "grow": [2, 0, 1, 1, 0, 2], "shrink": [1]}


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("kind", ["full", "ring"])
def test_reorder_equals_a_cache_rebuilt_from_reordered_inputs(kind: str, order: str) -> None:
    torch.manual_seed(0)
    index = torch.tensor(ORDERS[order])
    blocks = [(torch.randn(3, 2, n, 4, dtype=D64), torch.randn(3, 2, n, 4, dtype=D64)) for n in (4, 1, 1, 1)]

    def make() -> KVCache:
        return RingKVCache(3) if kind == "ring" else KVCache(capacity=4)  # 7 tokens: a full cache grows, a ring wraps

    reordered, rebuilt = make(), make()
    for k, v in blocks:  # (B, Hkv, L_new, E) each
        reordered.update(k, v)
        rebuilt.update(k[index], v[index])
    before = reordered.keys.data_ptr() if reordered.keys is not None else None
    reordered.reorder(index)
    assert reordered.keys is not None and rebuilt.keys is not None
    assert reordered.values is not None and rebuilt.values is not None
    assert torch.equal(reordered.keys, rebuilt.keys) and torch.equal(reordered.values, rebuilt.values)
    assert reordered.length == rebuilt.length == 7
    if kind == "ring":
        assert torch.equal(reordered.slot_positions, rebuilt.slot_positions)  # type: ignore[attr-defined]
    if len(index) == 3:
        assert reordered.keys.data_ptr() == before  # same batch size: the buffers were reused in place
    # decoding continues identically from both
    window = 3 if kind == "ring" else None
    mha = MultiHeadAttention(16, 4, num_kv_heads=2, window=window, position=RotaryPosition(4), dtype=D64).eval()
    for _ in range(2):
        x = torch.randn(len(index), 1, 16, dtype=D64)
        assert torch.equal(mha(x, cache=reordered, is_causal=True), mha(x, cache=rebuilt, is_causal=True))
    assert reordered.keys is not None and rebuilt.keys is not None
    assert torch.equal(reordered.keys, rebuilt.keys)


@pytest.mark.parametrize("order", list(ORDERS))
def test_cross_cache_reorder_equals_a_cache_filled_from_the_reordered_memory(order: str) -> None:
    torch.manual_seed(0)
    index = torch.tensor(ORDERS[order])
    mha = MultiHeadAttention(16, 4, num_kv_heads=2, dtype=D64).eval()
    memory, km = torch.randn(3, 5, 16, dtype=D64), _pad([5, 2, 4], 5)
    reordered, rebuilt = CrossKVCache(), CrossKVCache()
    mha(torch.randn(3, 1, 16, dtype=D64), memory, key_mask=km, cache=reordered)
    reordered.reorder(index)
    q = torch.randn(len(index), 2, 16, dtype=D64)
    want = mha(q, memory[index], key_mask=km[index], cache=rebuilt)
    assert reordered.keys is not None and rebuilt.keys is not None
    assert torch.equal(reordered.keys, rebuilt.keys)
    assert torch.equal(mha(q, key_mask=km[index], cache=reordered), want)


# ---------------------------------------------------------------------------------------------------------------
# Beam search: unchanged by in-place reordering, and equal to decoding without a cache
# ---------------------------------------------------------------------------------------------------------------


class _RebuildEachStep(TransformerMT):
    """TransformerMT that rebuilds its caches from index-selected copies every step (the code before reorder)."""

    def reorder_state(self, state: dict, index: Tensor) -> dict:  # type: ignore[type-arg]
        for c in state["caches"]:
            k, v = c.self_attn.keys, c.self_attn.values
            if k is not None and v is not None:
                k, v = k.index_select(0, index), v.index_select(0, index)
                c.self_attn.reset()
                c.self_attn.update(k, v)
            if c.cross_attn.filled:
                c.cross_attn.fill(c.cross_attn.keys.index_select(0, index), c.cross_attn.values.index_select(0, index))
        return state


class _NoCache(Seq2SeqBase):
    """Decodes by running the whole decoder over the target history at every step (no cache to reorder)."""

    def __init__(self, mt: TransformerMT) -> None:
        super().__init__()
        self.mt, self.src_vocab, self.tgt_vocab = mt, mt.src_vocab, mt.tgt_vocab

    def encode(self, src: Tensor, src_mask: Tensor) -> dict[str, Tensor]:
        return self.mt.encode(src, src_mask)

    def init_state(self, memory: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"history": torch.empty(memory["memory"].shape[0], 0, dtype=torch.long)}

    def step(self, tokens: Tensor, state: dict[str, Tensor], memory: dict[str, Tensor]):  # type: ignore[no-untyped-def]
        history = torch.cat([state["history"], tokens[:, None]], 1)  # (B, T)
        y = self.mt._embed(self.mt.tgt_embed, history)  # (B, T, D)
        out = self.mt.decoder(y, memory["memory"], memory_key_mask=memory["src_mask"], is_causal=True)
        return self.mt._logits(out)[:, -1], {"history": history}, None


def _seeded_mt(dtype: torch.dtype, cls: type[TransformerMT] = TransformerMT) -> TransformerMT:
    torch.manual_seed(0)
    model = cls(40, 30, d_model=64, nhead=4, num_layers=3, dim_feedforward=128, dropout=0.0, dtype=dtype).eval()
    with torch.no_grad():  # a random model with varied outputs (some hypotheses end early with EOS)
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 40, (4, 9), generator=g)
    mask = _pad([9, 6, 3, 7], 9)
    return src.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("beam", [1, 3, 5])
def test_beam_search_is_unchanged_by_in_place_reordering(beam: int) -> None:
    src, mask = _batch()
    model, reference = _seeded_mt(torch.float32), _seeded_mt(torch.float32, _RebuildEachStep)
    got = beam_search(model, src, mask, beam_size=beam, max_len=12)
    want = beam_search(reference, src, mask, beam_size=beam, max_len=12)
    assert got.tokens == want.tokens and got.scores == want.scores
    assert all(torch.equal(a, b) for a, b in zip(got.weights, want.weights, strict=True))  # type: ignore[arg-type]
    if beam > 1:  # this seeded model ends some hypotheses early (EOS), so frozen, finished beams are reordered too
        assert min(map(len, got.tokens)) < 12


def test_beam_search_with_caches_equals_beam_search_without() -> None:
    src, mask = _batch()
    model = _seeded_mt(D64)
    got = beam_search(model, src, mask, beam_size=4, max_len=10)
    want = beam_search(_NoCache(model), src, mask, beam_size=4, max_len=10)
    assert got.tokens == want.tokens
    # float64 log-probabilities summed over up to 10 steps; the longest reduction inside is dim_feedforward 128
    assert_close_to_reference(torch.tensor(got.scores, dtype=D64), torch.tensor(want.scores, dtype=D64),
                              reduction=128 * 10)
