"""MultiHeadAttention: parity with torch.nn.MultiheadAttention, GQA/MQA, masks, capture hook, gradients."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from attnkit import create_attention
from attnkit.functional import (
    BlockedWindowMask,
    BlockSparseMask,
    CausalMask,
    DocumentMask,
    MaskMod,
    SinkMask,
    SlidingWindowMask,
    as_mask,
    attention_reference,
    scaled_dot_product_attention,
    strided_layout,
    which_backend,
)
from attnkit.functional.dispatch import ALIASES
from attnkit.layers import MultiHeadAttention
from attnkit.testing import assert_close_to_reference

D, H = 16, 4


def _torch_pair(kdim=None, vdim=None, bias=True):
    torch.manual_seed(1)
    ref = nn.MultiheadAttention(D, H, batch_first=True, kdim=kdim, vdim=vdim, bias=bias, dtype=torch.float64)
    with torch.no_grad():  # non-zero biases so the copy of every tensor is tested
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref, MultiHeadAttention.from_torch(ref)


B, L, S = 3, 5, 7
CASES = ["none", "key_padding", "bool_mask", "float_mask", "bool_and_padding"]


def _masks(case: str, q_len: int, k_len: int):
    """(kwargs for nn.MultiheadAttention, kwargs for attnkit) with the same meaning."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([k_len, 4, 1])
    pad = torch.arange(k_len).view(1, k_len) >= lengths.view(B, 1)  # torch meaning: True = ignore
    allowed = torch.rand(q_len, k_len, generator=g) > 0.4
    allowed[:, 0] = True  # no fully masked row: nn.MultiheadAttention gives NaN there, attnkit zeros
    floatm = torch.randn(q_len, k_len, generator=g, dtype=torch.float64)
    floatm[1, 3] = float("-inf")
    return {
        "none": ({}, {}),
        "key_padding": ({"key_padding_mask": pad}, {"key_mask": ~pad}),
        "bool_mask": ({"attn_mask": ~allowed}, {"attn_mask": allowed}),
        "float_mask": ({"attn_mask": floatm}, {"attn_mask": floatm}),
        "bool_and_padding": ({"attn_mask": ~allowed, "key_padding_mask": pad},
                             {"attn_mask": allowed, "key_mask": ~pad}),
    }[case]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_parity_with_torch(case, cross):
    ref, ours = _torch_pair(6, 6) if cross else _torch_pair()
    x = torch.randn(B, L if cross else S, D, dtype=torch.float64)  # (B, L, D)
    theirs_kw, ours_kw = _masks(case, x.shape[1], S)
    if cross:
        mem = torch.randn(B, S, 6, dtype=torch.float64)  # (B, S, kdim)
        out_t, w_t = ref(x, mem, mem, need_weights=True, **theirs_kw)
        out_o, w_o = ours(x, mem, need_weights=True, **ours_kw)
    else:
        out_t, w_t = ref(x, x, x, need_weights=True, **theirs_kw)
        out_o, w_o = ours(x, need_weights=True, **ours_kw)
    # float64 on both sides: torch.nn.MultiheadAttention is the reference (reduction: S keys or D features)
    assert_close_to_reference(out_o, out_t, reduction=max(S, D))
    assert_close_to_reference(w_o.mean(1), w_t, reduction=max(S, D))


def test_parity_with_torch_causal():
    ref, ours = _torch_pair()
    x = torch.randn(B, S, D, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(S, dtype=torch.float64)
    out_t, w_t = ref(x, x, x, attn_mask=causal, is_causal=True, need_weights=True)
    out_o, w_o = ours(x, is_causal=True, need_weights=True)
    assert_close_to_reference(out_o, out_t, reduction=max(S, D))
    assert_close_to_reference(w_o.mean(1), w_t, reduction=max(S, D))
    out_m = ours(x, attn_mask=CausalMask())  # the structured mask object is the same causal mask
    assert_close_to_reference(out_m, out_t, reduction=max(S, D))


def test_no_bias_and_registry():
    ref, ours = _torch_pair(bias=False)
    x = torch.randn(2, 4, D, dtype=torch.float64)
    assert_close_to_reference(ours(x), ref(x, x, x, need_weights=False)[0], reduction=D)
    assert isinstance(create_attention("mha", 8, 2), MultiHeadAttention)
    assert isinstance(create_attention("multi_head", 8, 2), MultiHeadAttention)


def _manual(mha: MultiHeadAttention, x: torch.Tensor, mask=None, causal=False) -> torch.Tensor:
    """Multi-head attention written out with the reference kernel (K/V heads repeated for GQA)."""
    b, n, _ = x.shape
    q = mha.q_proj(x).view(b, n, mha.num_heads, mha.head_dim).transpose(1, 2)  # (B, H, L, E)
    k = mha.k_proj(x).view(b, n, mha.num_kv_heads, mha.head_dim).transpose(1, 2)  # (B, Hkv, S, E)
    v = mha.v_proj(x).view(b, n, mha.num_kv_heads, mha.head_dim).transpose(1, 2)  # (B, Hkv, S, E)
    rep = mha.num_heads // mha.num_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, H, S, E)
    out, _ = attention_reference(q, k, v, mask, is_causal=causal)
    return mha.out_proj(out.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_gqa_matches_repeated_heads(kv_heads):
    mha = MultiHeadAttention(D, H, num_kv_heads=kv_heads, dtype=torch.float64)
    assert mha.k_proj.out_features == kv_heads * D // H
    x = torch.randn(2, 6, D, dtype=torch.float64)
    key_mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    got = mha(x, key_mask=key_mask, is_causal=True)
    want = _manual(mha, x, key_mask.view(2, 1, 1, 6), causal=True)
    assert_close_to_reference(got, want, reduction=D)


def test_fully_masked_rows_are_zero_and_finite_gradients():
    mha = MultiHeadAttention(D, H, dtype=torch.float64)
    x = torch.randn(2, 4, D, dtype=torch.float64, requires_grad=True)
    key_mask = torch.tensor([[True] * 4, [False] * 4])
    out, w = mha(x, key_mask=key_mask, need_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (w[1] == 0).all()
    # with no key, the output is the output projection's bias alone
    assert torch.equal(out[1], mha.out_proj.bias.expand(4, D))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gradcheck_gqa_qknorm():
    mha = MultiHeadAttention(8, 4, num_kv_heads=2, qk_norm=True, dtype=torch.float64)
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mha(t, is_causal=True), (x,), fast_mode=True)


def test_capture_hook_sees_exact_weights():
    mha = MultiHeadAttention(D, H, num_kv_heads=2, dtype=torch.float64)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    seen = []
    remove = mha.attend.add_observer(lambda module, w: seen.append(w))
    out, w = mha(x, is_causal=True, need_weights=True)
    remove()
    assert len(seen) == 1
    assert torch.equal(seen[0], w)
    assert not any(isinstance(v, torch.Tensor) and v.shape == w.shape for v in vars(mha).values())
    assert torch.equal(mha(x, is_causal=True), out)  # bit-for-bit path without observers


def test_tutorial_call_and_devices():
    mha = MultiHeadAttention(32, 4)
    x = torch.randn(2, 7, 32)
    assert mha(x).shape == (2, 7, 32)
    tutorial_mask = torch.tril(torch.ones(7, 7, dtype=torch.long))  # the tutorial's integer mask: 0 = masked
    want = copy.deepcopy(mha).double()(x.double(), is_causal=True)  # the same weights, in float64
    assert_close_to_reference(mha(x, attn_mask=tutorial_mask), want, reduction=32, msg="integer mask")
    assert_close_to_reference(mha(x, is_causal=True), want, reduction=32, msg="is_causal")
    assert mha.q_proj.weight.dtype == torch.float32
    m64 = MultiHeadAttention(32, 4, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m64.parameters())


@pytest.mark.parametrize(
    "kwargs, call, match",
    [
        ({"embed_dim": 10, "num_heads": 3}, None, "divisible"),
        ({"embed_dim": 8, "num_heads": 4, "num_kv_heads": 3}, None, "num_kv_heads"),
        ({"embed_dim": 8, "num_heads": 2}, {"query": torch.randn(3, 8)}, "query of shape"),
        ({"embed_dim": 8, "num_heads": 2}, {"query": torch.randn(1, 3, 8), "key_mask": torch.ones(1, 3)},
         "key_mask"),
        ({"embed_dim": 8, "num_heads": 2}, {"query": torch.randn(1, 3, 8), "attn_mask": torch.ones(2, 3, 3, 3) > 0},
         "attn_mask"),
        ({"embed_dim": 8, "num_heads": 2}, {"query": torch.randn(1, 3, 8), "key": torch.randn(1, 3, 5)}, "kdim"),
    ],
)
def test_errors_say_the_fix(kwargs, call, match):
    with pytest.raises(ValueError, match=match) as err:
        mha = MultiHeadAttention(**kwargs)
        mha(**call)
    assert "; try " in str(err.value)



# --------------------------------------------------------------------------------------------- window= / layout=
def _copy(src: MultiHeadAttention, **kwargs) -> MultiHeadAttention:
    dst = MultiHeadAttention(src.embed_dim, src.num_heads, dtype=torch.float64, **kwargs)
    dst.load_state_dict(src.state_dict())
    return dst


def _kernel_backends(mha: MultiHeadAttention) -> list[str]:
    """The backend ``auto`` picks for each kernel call of ``mha`` (recorded from what reaches its Attend tap)."""
    seen: list[str] = []

    def hook(module, args, kwargs):
        seen.append(which_backend(*args[:4], is_causal=kwargs.get("is_causal", False), scale=kwargs.get("scale")).name)

    mha.attend.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("causal", [True, False])
def test_window_mask_object_runs_the_local_kernel(causal):
    dense = MultiHeadAttention(16, 2, dtype=torch.float64)
    win = BlockedWindowMask(4, causal=False)
    local = _copy(dense, window=win)
    seen = _kernel_backends(local)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    key_mask = torch.arange(13).view(1, 13) < torch.tensor([[13], [9]])  # right padding -> PaddingMask structure
    want_mask = replace(win, causal=causal).materialize(13, 13)[0, 0]  # (L, S)
    want = dense(x, attn_mask=want_mask, key_mask=key_mask)
    assert_close_to_reference(local(x, key_mask=key_mask, is_causal=causal), want, reduction=16)
    assert seen[0] in ALIASES["local"], seen  # the window's own kernels


@pytest.mark.parametrize("causal", [True, False])
def test_layout_runs_the_block_sparse_kernel(causal):
    dense = MultiHeadAttention(16, 2, dtype=torch.float64)
    layout = BlockSparseMask(strided_layout(4, stride=2, causal=False), 4)
    sparse = _copy(dense, layout=layout)
    seen = _kernel_backends(sparse)
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    want = dense(x, attn_mask=layout.materialize(16, 16)[0, 0], is_causal=causal)
    assert_close_to_reference(sparse(x, is_causal=causal), want, reduction=16)
    assert seen[0] in ALIASES["block_sparse"], seen  # the layout's own kernels
    # with a tensor mask on top, the module falls back to a dense kernel with the combined mask
    extra = torch.rand(16, 16) > 0.2
    auto = _copy(dense, layout=layout)
    assert_close_to_reference(auto(x, attn_mask=extra), dense(x, attn_mask=extra & layout.materialize(16, 16)[0, 0]),
                              reduction=16)


# --------------------------------------------------------------------------------------------- attn_mask= objects
# Every mask object and mask_mod reaches the kernel as a structure; the reference is a float64 copy of the module
# run with the same mask materialised as a boolean tensor through the reference kernel (_manual).
N_MASK = 130  # three query/key tiles of 64, the last one partial
DOCS = torch.tensor([0] * 50 + [1] * 47 + [2] * 33)  # (S,) packed documents


def _prefix_lm(b, h, q, kv):
    return (kv <= q) | (kv < 20)  # attention-gym's prefix LM: a bidirectional prefix of 20


def _per_head_window(b, h, q, kv):
    return (kv <= q) & (q - kv < 8 + 16 * h)  # each head its own window: a mask_mod that reads h


def _per_row_length(b, h, q, kv):
    return kv < 100 + 20 * b  # a mask_mod that reads b: per-sequence key lengths


MASK_OBJECTS = {
    "sliding_window": lambda: SlidingWindowMask(17),
    "window_or_sinks": lambda: SlidingWindowMask(9) | SinkMask(3),
    "documents_causal": lambda: DocumentMask(DOCS) & CausalMask(),
    "documents_window": lambda: DocumentMask(DOCS) & SlidingWindowMask(33),
    "mask_mod_prefix_lm": lambda: _prefix_lm,
    "mask_mod_per_head": lambda: _per_head_window,
    "mask_mod_per_row": lambda: _per_row_length,
    "MaskMod_dilated": lambda: MaskMod(lambda b, h, q, kv: (kv <= q) & ((q - kv) % 3 == 0)),
}


def _materialised(mask, batch: int, heads: int) -> torch.Tensor:
    return as_mask(mask)._bind(batch, heads).materialize(N_MASK, N_MASK)  # (Rb|1, Rh|1, L, S) boolean


@pytest.mark.parametrize("key_mask_kind", ["none", "right_padding", "holes"])
@pytest.mark.parametrize("name", MASK_OBJECTS)
def test_attn_mask_object_and_mask_mod_forward_backward(name, key_mask_kind):
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, H, num_kv_heads=2)  # float32: the native block engine where it is built
    ref = copy.deepcopy(mha).double()
    x = torch.randn(2, N_MASK, D, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    key_mask = {
        "none": None,
        "right_padding": torch.arange(N_MASK).view(1, -1) < torch.tensor([[N_MASK], [111]]),  # a PaddingMask
        "holes": torch.rand(2, N_MASK) > 0.1,  # not a prefix: joins the materialised mask as a tensor
    }[key_mask_kind]
    mask = MASK_OBJECTS[name]()
    want_mask = _materialised(mask, 2, H)
    if key_mask is not None:
        want_mask = want_mask & key_mask.view(2, 1, 1, N_MASK)
    out = mha(x, attn_mask=mask, key_mask=key_mask)
    want = _manual(ref, x64, want_mask)
    assert_close_to_reference(out, want, reduction=max(N_MASK, D), msg="forward")
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g.double())
    assert_close_to_reference(x.grad, x64.grad, reduction=max(N_MASK, D), grad=True, msg="dx")
    for (pname, p), p64 in zip(mha.named_parameters(), ref.parameters(), strict=True):
        assert_close_to_reference(p.grad, p64.grad, reduction=2 * N_MASK, grad=True, msg=f"d{pname}")


def test_attn_mask_object_with_is_causal_and_weights():
    mha = MultiHeadAttention(D, H, dtype=torch.float64)
    x = torch.randn(2, 40, D, dtype=torch.float64)
    docs = torch.tensor([0] * 25 + [1] * 15)
    out, w = mha(x, attn_mask=DocumentMask(docs), is_causal=True, need_weights=True)
    want_mask = DocumentMask(docs).materialize(40, 40) & CausalMask().materialize(40, 40)
    assert_close_to_reference(out, _manual(mha, x, want_mask), reduction=max(40, D))
    assert torch.equal(w > 0, want_mask.expand_as(w))  # the weights obey the same mask


def test_gradcheck_mask_mod():
    mha = MultiHeadAttention(8, 2, dtype=torch.float64)
    x = torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mha(t, attn_mask=_prefix_lm), (x,), fast_mode=True)


def test_tensor_mask_one_rule():
    """Integer 0/1 masks read as boolean (the tutorial's mask == 0); other integers raise the message every
    kernel gives (one normaliser)."""
    mha = MultiHeadAttention(D, H, dtype=torch.float64)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    allowed = torch.rand(2, 5, 5) > 0.3
    allowed[..., 0] = True
    assert torch.equal(mha(x, attn_mask=allowed.to(torch.uint8)), mha(x, attn_mask=allowed))
    bad = allowed.long() * 2
    with pytest.raises(ValueError) as mod_err:
        mha(x, attn_mask=bad)
    with pytest.raises(ValueError) as fn_err:
        scaled_dot_product_attention(x, x, x, bad)
    assert str(mod_err.value) == str(fn_err.value)
    assert "integer attn_mask of 0 and 1 only" in str(mod_err.value) and "values in [0, 2]" in str(mod_err.value)
    with pytest.raises(ValueError, match="mask_mod"):
        mha(x, attn_mask="causal")


@pytest.mark.parametrize("causal", [True, False])
def test_int_window_trains_on_the_native_block_engine(causal):
    """window=int is a SlidingWindowMask structure: auto runs it on the native block engine (where it is built),
    forward and backward, and both equal the float64 reference on the window materialised."""
    from attnkit.functional import _native

    torch.manual_seed(0)
    mha = MultiHeadAttention(D, H, num_kv_heads=2, window=16)
    ref = copy.deepcopy(mha).double()
    seen = _kernel_backends(mha)
    x = torch.randn(2, 150, D, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out = mha(x, is_causal=causal)
    want = _manual(ref, x64, SlidingWindowMask(16, causal=causal).materialize(150, 150))
    assert_close_to_reference(out, want, reduction=max(150, D))
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g.double())
    assert_close_to_reference(x.grad, x64.grad, reduction=150, grad=True, msg="dx")
    assert_close_to_reference(mha.q_proj.weight.grad, ref.q_proj.weight.grad, reduction=2 * 150, grad=True)
    if _native.load() is not None:
        assert seen == ["native_mask"]
