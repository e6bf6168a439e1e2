"""attnkit.functional.mask_args.normalize_masks: one normaliser for (attn_mask, key_mask, is_causal) — one rule for
boolean, integer and float masks, mask objects and mask_mod callables, and one error message per mistake in every
kernel and module that takes masks."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

from attnkit.functional import (
    AndMask,
    CausalMask,
    MaskMod,
    PaddingMask,
    SlidingWindowMask,
    attention_reference,
    chunked_attention,
    scaled_dot_product_attention,
)
from attnkit.functional.dispatch import make_call
from attnkit.functional.mask_args import MaskArgs, normalize_masks
from attnkit.layers import MultiHeadAttention, SoftAttention, TransformerEncoderLayer
from attnkit.testing import assert_close_to_reference

B, H, L, S = 2, 3, 5, 7
SIZES: dict[str, Any] = {"batch": B, "heads": H, "q_len": L, "k_len": S, "dtype": torch.float32, "device": "cpu"}


def _norm(attn_mask: Any = None, key_mask: Any = None, is_causal: Any = False, **kw: Any) -> MaskArgs:
    return normalize_masks(attn_mask, key_mask, is_causal, **{**SIZES, **kw})


def test_tensor_masks_become_one_4d_view():
    allowed = torch.rand(L, S) > 0.5
    args = _norm(allowed)
    assert args.mask is not None and args.mask.shape == (1, 1, L, S) and args.mask.dtype == torch.bool
    assert args.mask.data_ptr() == allowed.data_ptr()  # a view, no copy
    assert args.structure is None and args.is_causal is False
    assert torch.equal(_norm(allowed.long()).mask, args.mask)  # integer 0/1 = boolean (0 = masked)
    assert torch.equal(_norm(allowed.to(torch.uint8)).mask, args.mask)
    f = _norm(torch.randn(B, 1, L, S, dtype=torch.float64)).mask  # float: added, in the query dtype
    assert f is not None and f.dtype == torch.float32
    assert _norm(torch.ones(B, L, S, dtype=torch.bool), ndim_in=3).mask.shape == (B, 1, L, S)  # (B, L, S)
    assert _norm(torch.ones(S, dtype=torch.bool)).mask.shape == (1, 1, 1, S)


def test_mask_objects_and_mask_mods_become_the_structure():
    win = SlidingWindowMask(3)
    assert _norm(win).structure is win
    fn = lambda b, h, q, kv: q >= kv  # noqa: E731
    st = _norm(fn).structure
    assert isinstance(st, MaskMod) and st.fn is fn
    assert _norm(fn).structure is st  # one MaskMod per function: its blocks compile once
    per_head = _norm(lambda b, h, q, kv: kv <= q + h).structure  # reads h: bound to the call's H heads
    assert isinstance(per_head, MaskMod) and (per_head.B, per_head.H) == (1, H)
    both = _norm(win, structures=[CausalMask()]).structure  # a module's own structures are &-ed
    assert isinstance(both, AndMask) and set(map(type, both.parts)) == {CausalMask, SlidingWindowMask}


def test_key_mask_right_padding_stays_a_structure_next_to_a_mask_object():
    right = torch.arange(S).view(1, S) < torch.tensor([[S], [4]])
    args = _norm(SlidingWindowMask(3), right)
    assert args.mask is None and isinstance(args.structure, AndMask)
    pad = [p for p in args.structure.parts if isinstance(p, PaddingMask)]
    assert len(pad) == 1 and pad[0].lengths.tolist() == [S, 4]
    holes = right.clone()
    holes[0, 2] = False  # not a prefix: a tensor
    args = _norm(SlidingWindowMask(3), holes)
    assert args.structure == SlidingWindowMask(3) and torch.equal(args.mask, holes.view(B, 1, 1, S))
    args = _norm(None, right.long())  # no structure: a (B, 1, 1, S) boolean tensor
    assert args.structure is None and torch.equal(args.mask, right.view(B, 1, 1, S))


def test_key_mask_joins_a_float_mask_as_minus_inf():
    bias = torch.randn(L, S)
    real = torch.ones(B, S, dtype=torch.bool)
    real[1, -2:] = False
    m = _norm(bias, real).mask
    assert m is not None and m.shape == (B, 1, L, S)
    assert torch.isinf(m[1, 0, :, -2:]).all() and torch.equal(m[0, 0], bias)


@pytest.mark.parametrize("q_len, want", [(S, "flag"), (1, "nothing"), (4, "structure")])
def test_lower_right_causal(q_len, want):
    args = _norm(None, None, True, q_len=q_len, causal_align="lower_right")
    assert args.is_causal == (want == "flag")
    assert (args.structure == CausalMask("lower_right")) == (want == "structure")
    assert (args.structure is None) == (want != "structure")
    assert _norm(None, None, True, q_len=4).is_causal  # upper-left (PyTorch's flag) stays the flag


def test_materialize_is_the_dense_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, L, 8), torch.randn(B, H, S, 8), torch.randn(B, H, S, 8)
    real = torch.arange(S).view(1, S) < torch.tensor([[S], [5]])
    args = _norm(lambda b, h, q_, kv: (kv - q_ <= 2) | (kv == 0), real, True)
    dense = args.materialize(L, S)
    assert dense is not None and dense.dtype == torch.bool
    got = scaled_dot_product_attention(q, k, v, args.attn_mask(L, S), is_causal=args.is_causal)
    want, _ = attention_reference(q.double(), k.double(), v.double(), dense)
    assert_close_to_reference(got, want, reduction=S)


# --------------------------------------------------------------------------------------------- one message
def _callers() -> dict[str, Callable[[Any], Any]]:
    torch.manual_seed(0)
    x3 = torch.randn(B, L, 8)  # (B, L, E): the tutorial layout, S = L
    x4 = x3.unsqueeze(1)  # (B, 1, L, E)
    mha, soft = MultiHeadAttention(8, 2).eval(), SoftAttention(8).eval()
    layer = TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0).eval()
    return {
        "scaled_dot_product_attention": lambda m: scaled_dot_product_attention(x3, x3, x3, m),
        "chunked_attention": lambda m: chunked_attention(x4, x4, x4, m),
        "MultiHeadAttention": lambda m: mha(x3, attn_mask=m),
        "SoftAttention": lambda m: soft(x3, mask=m),
        "TransformerEncoderLayer": lambda m: layer(x3, attn_mask=m),
    }


CALLERS = _callers()
BAD = {
    "integer_2": (torch.tril(torch.ones(L, L, dtype=torch.long)) * 2, "integer attn_mask of 0 and 1 only"),
    "complex": (torch.ones(L, L, dtype=torch.complex64), "boolean or floating attn_mask"),
    "wrong_S": (torch.ones(L, L + 1, dtype=torch.bool), "broadcasts to (B, H, L, S)"),
    "5_dims": (torch.ones(1, 1, 1, L, L, dtype=torch.bool), "with 1 to 4 dims"),
}


@pytest.mark.parametrize("bad", BAD)
def test_one_error_message_everywhere(bad):
    mask, words = BAD[bad]
    messages = {}
    for name, call in CALLERS.items():
        if name == "chunked_attention" and bad == "wrong_S":
            continue  # the same message, with H = 1 of its 4-D inputs instead of the module's heads
        with pytest.raises(ValueError) as info:
            call(mask)
        messages[name] = str(info.value)
    assert words in next(iter(messages.values()))
    if bad == "wrong_S":  # the message names the (B, H, L, S) of the call: one per head count
        assert len({m.replace("(2, 2, 5, 5)", "(2, 1, 5, 5)") for m in messages.values()}) == 1, messages
    else:
        assert len(set(messages.values())) == 1, messages


@pytest.mark.parametrize("name", [n for n in CALLERS if n != "chunked_attention"])  # chunked takes tensors only
def test_not_a_mask(name):
    with pytest.raises(ValueError) as info:
        CALLERS[name]([[True]])
    assert re.match(r"expected `attn_mask` to be a torch.Tensor .* a mask object or a mask_mod", str(info.value))


DROP_IN = {
    "none": lambda: None,
    "bool_2d": lambda: torch.rand(L, S) > 0.5,
    "int_4d": lambda: (torch.rand(B, 1, L, S) > 0.5).long(),
    "float64_3d": lambda: torch.randn(B, L, S, dtype=torch.float64),
    "window": lambda: SlidingWindowMask(3),
    "mask_mod": lambda: (lambda b, h, q, kv: kv <= q + h),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", DROP_IN)
def test_make_call_agrees_with_normalize_masks(kind, causal):
    """The dispatcher's make_call and normalize_masks give the same canonical form (the normaliser is a drop-in
    for make_call's mask lines)."""
    attn_mask = DROP_IN[kind]()
    three_d = kind == "float64_3d"
    q = torch.randn(B, L, 8) if three_d else torch.randn(B, H, L, 8)
    k = torch.randn(B, S, 8) if three_d else torch.randn(B, H, S, 8)
    call, _ = make_call(q, k, k, attn_mask, causal, 0.0, None, False)
    args = _norm(attn_mask, None, causal, heads=1 if three_d else H, ndim_in=3 if three_d else 4)
    assert call.is_causal == args.is_causal
    assert (call.mask is None) == (args.mask is None)
    if args.mask is not None:
        assert call.mask.dtype == args.mask.dtype and torch.equal(call.mask, args.mask)
    if args.structure is None:
        assert call.structure is None
    else:
        assert torch.equal(call.structure.materialize(L, S), args.structure.materialize(L, S))


def test_integer_mask_equals_boolean_everywhere():
    allowed = torch.rand(L, L) > 0.4
    allowed[:, 0] = True
    with torch.no_grad():
        for name, call in CALLERS.items():
            assert torch.equal(call(allowed.long()), call(allowed)), name
