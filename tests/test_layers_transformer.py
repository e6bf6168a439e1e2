"""Transformer layers and stacks: parity with torch.nn (copied weights, float64, the attnkit.testing policy with
torch.nn as the reference) and KV-cache decoding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit.layers import (
    KVCache,
    RotaryPosition,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from attnkit.testing import assert_close_to_reference

D64 = torch.float64
B, L, S, D, H = 3, 6, 7, 16, 4
FF = 24  # dim_feedforward: the longest reduction in these layers


def _pad(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]  # torch's meaning: True = padding


def _as_float(pad: torch.Tensor) -> torch.Tensor:
    """torch wants one mask type per call: a padding mask as -inf where padded (same meaning)."""
    return torch.zeros(pad.shape, dtype=D64).masked_fill(pad, float("-inf"))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first: bool, activation: str) -> None:
    ref = nn.TransformerEncoderLayer(
        D, H, dim_feedforward=24, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first,
        dtype=D64,
    ).train()  # train mode (dropout 0) keeps torch on its plain path, the one its docs define
    ours = TransformerEncoderLayer.from_torch(ref)
    x = torch.randn(B, L, D, dtype=D64)
    pad = _pad([6, 4, 2], L)
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)  # torch: True = not allowed
    bias = torch.randn(L, L, dtype=D64)
    cases = [
        ({}, {}),
        ({"src_key_padding_mask": pad}, {"key_mask": ~pad}),
        ({"src_mask": causal}, {"attn_mask": ~causal}),
        ({"src_mask": causal, "is_causal": True}, {"is_causal": True}),
        ({"src_mask": bias, "src_key_padding_mask": _as_float(pad)}, {"attn_mask": bias, "key_mask": ~pad}),
    ]
    for kw_ref, kw_ours in cases:
        assert_close_to_reference(ours(x, **kw_ours), ref(x, **kw_ref), reduction=FF, msg=str(kw_ours))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_decoder_layer_matches_torch(norm_first: bool) -> None:
    ref = nn.TransformerDecoderLayer(
        D, H, dim_feedforward=24, dropout=0.0, batch_first=True, norm_first=norm_first, dtype=D64
    ).train()
    ours = TransformerDecoderLayer.from_torch(ref)
    tgt, memory = torch.randn(B, L, D, dtype=D64), torch.randn(B, S, D, dtype=D64)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=D64)  # float: -inf above the diagonal
    tpad, mpad = _pad([6, 5, 3], L), _pad([7, 2, 5], S)
    mem_mask = torch.rand(L, S) < 0.3
    mem_mask[:, 0] = False  # torch: True = blocked; keep one key per row so torch has no NaN
    expect = ref(
        tgt, memory, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=_as_float(tpad),
        memory_key_padding_mask=mpad,
    )
    got = ours(tgt, memory, is_causal=True, tgt_key_mask=~tpad, memory_key_mask=~mpad)
    assert_close_to_reference(got, expect, reduction=FF)
    got_f = ours(tgt, memory, tgt_mask=causal, memory_mask=~mem_mask)
    assert_close_to_reference(got_f, ref(tgt, memory, tgt_mask=causal, memory_mask=mem_mask), reduction=FF)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_stacks_match_torch(norm_first: bool) -> None:
    kw = {"dim_feedforward": 24, "dropout": 0.0, "batch_first": True, "norm_first": norm_first, "dtype": D64}
    ref_enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(D, H, **kw), 2, norm=nn.LayerNorm(D, dtype=D64), enable_nested_tensor=False
    )
    ref_dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(D, H, **kw), 2, norm=nn.LayerNorm(D, dtype=D64))
    enc = TransformerEncoder(TransformerEncoderLayer(D, H, norm_first=norm_first, dtype=D64), 2, norm=nn.LayerNorm(D))
    dec = TransformerDecoder(TransformerDecoderLayer(D, H, norm_first=norm_first, dtype=D64), 2, norm=nn.LayerNorm(D))
    for i in range(2):
        enc.layers[i] = TransformerEncoderLayer.from_torch(ref_enc.layers[i])
        dec.layers[i] = TransformerDecoderLayer.from_torch(ref_dec.layers[i])
    enc.norm.load_state_dict(ref_enc.norm.state_dict())
    dec.norm.load_state_dict(ref_dec.norm.state_dict())
    enc, dec = enc.double(), dec.double()
    src, tgt = torch.randn(B, S, D, dtype=D64), torch.randn(B, L, D, dtype=D64)
    spad = _pad([7, 3, 5], S)
    mem = enc(src, key_mask=~spad)
    assert_close_to_reference(mem, ref_enc(src, src_key_padding_mask=spad), reduction=FF)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=D64)
    out = dec(tgt, mem, is_causal=True, memory_key_mask=~spad)
    expect = ref_dec(tgt, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=spad)
    assert_close_to_reference(out, expect, reduction=FF)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_cached_decoding_equals_full_recompute(norm_first: bool) -> None:
    layer = TransformerDecoderLayer(D, H, dim_feedforward=24, norm_first=norm_first, dtype=D64)
    dec = TransformerDecoder(layer, 3).eval()
    tgt, memory = torch.randn(2, L, D, dtype=D64), torch.randn(2, S, D, dtype=D64)
    mkm = ~_pad([7, 4], S)
    full = dec(tgt, memory, is_causal=True, memory_key_mask=mkm)
    cache = dec.new_cache(capacity=2)  # small capacity: the self-attention buffer grows while decoding
    prefix = dec(tgt[:, :2], memory, is_causal=True, memory_key_mask=mkm, cache=cache)  # a 2-token prompt
    steps = [prefix] + [dec(tgt[:, t : t + 1], memory, is_causal=True, memory_key_mask=mkm, cache=cache)
                        for t in range(2, L)]
    assert_close_to_reference(torch.cat(steps, 1), full, reduction=FF)
    assert all(c.length == L for c in cache)
    # beam-search reordering: swap the two sentences and keep decoding
    swap = torch.tensor([1, 0])
    for c in cache:
        c.reorder(swap)
    nxt = torch.randn(2, 1, D, dtype=D64)
    step = dec(nxt, memory[swap], is_causal=True, memory_key_mask=mkm[swap], cache=cache)
    again = dec(torch.cat([tgt[swap], nxt], 1), memory[swap], is_causal=True, memory_key_mask=mkm[swap])
    assert_close_to_reference(step, again[:, -1:], reduction=FF)
    for c in cache:
        c.reset()
    assert cache[0].length == 0 and not cache[0].cross_attn.filled


def test_cached_decoding_with_rotary_positions_and_bare_kv_cache() -> None:
    layer = TransformerDecoderLayer(D, H, dim_feedforward=24, position=RotaryPosition(D // H), dtype=D64).eval()
    tgt, memory = torch.randn(2, L, D, dtype=D64), torch.randn(2, S, D, dtype=D64)
    full = layer(tgt, memory, is_causal=True)
    kv = KVCache()  # self-attention only; the memory is re-projected each step
    steps = [layer(tgt[:, t : t + 1], memory, is_causal=True, cache=kv) for t in range(L)]
    assert_close_to_reference(torch.cat(steps, 1), full, reduction=FF)


def test_gradcheck_and_capture_points() -> None:
    enc = TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, dtype=D64)
    dec = TransformerDecoderLayer(4, 2, dim_feedforward=6, dropout=0.0, norm_first=True, dtype=D64)
    x = torch.randn(1, 3, 4, dtype=D64, requires_grad=True)
    m = torch.randn(1, 2, 4, dtype=D64, requires_grad=True)
    km = torch.tensor([[True, True, False]])
    assert torch.autograd.gradcheck(lambda a: enc(a, key_mask=km), (x,))
    assert torch.autograd.gradcheck(lambda a, b: dec(a, b, is_causal=True), (x, m))
    seen: list[tuple[str, torch.Size]] = []
    for name, mod in dec.named_modules():
        if name.endswith("attend"):
            mod.add_observer(lambda mod, w, name=name: seen.append((name, w.shape)))
    dec(x, m, is_causal=True, cache=dec.new_cache())
    assert seen == [("self_attn.attend", (1, 2, 3, 3)), ("multihead_attn.attend", (1, 2, 3, 2))]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="activation in"):
        TransformerEncoderLayer(8, 2, activation="swish")
    with pytest.raises(ValueError, match="expected src of shape"):
        TransformerEncoderLayer(8, 2)(torch.randn(2, 3, 4))
    dec = TransformerDecoderLayer(8, 2)
    cache = dec.new_cache()
    dec(torch.randn(2, 1, 8), torch.randn(2, 5, 8), cache=cache)
    with pytest.raises(ValueError, match="the memory this cache was filled with"):
        dec(torch.randn(2, 1, 8), torch.randn(2, 4, 8), cache=cache)
    with pytest.raises(ValueError, match="one cache per layer"):
        TransformerDecoder(dec, 2)(torch.randn(2, 1, 8), torch.randn(2, 5, 8), cache=[cache])
