"""Logit soft-capping (``softcap``, Gemma 2): ``scores -> softcap * tanh(scores / softcap)`` before the mask.

Every registered backend is forced on every case: a backend that declares ``softcap=True`` must match the float64
reference (:func:`attnkit.functional.attention_reference` with ``softcap``) at the policy tolerance, forward and
gradients; every other backend must refuse the call with the softcap reason (never run it uncapped). ``auto``
picks a backend that serves it. float64 ``gradcheck`` covers the custom backward of the chunked path (the
``1 - tanh^2`` factor) and the math path.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from attnkit.functional import (
    CausalMask,
    PaddingMask,
    SlidingWindowMask,
    attention_reference,
    attention_weights,
    available_backends,
    chunked_attention,
    scaled_dot_product_attention,
    which_backend,
)
from attnkit.functional import dispatch as D
from attnkit.testing import assert_close_to_reference

CAP = 1.5  # small against the scores below (|s| up to ~6), so the cap changes them a lot
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f64": torch.float64}


def _masks(b: int, q_len: int, k_len: int) -> dict[str, tuple[object, bool]]:
    dead = torch.ones(q_len, k_len, dtype=torch.bool)
    dead[1] = False  # a fully masked row: zeros, never NaN
    return {
        "none": (None, False),
        "is_causal": (None, True),
        "causal_lower_right": (CausalMask("lower_right"), False),
        "window": (SlidingWindowMask(3), False),
        "padding": (PaddingMask(torch.tensor([k_len - 2, k_len][:b])), False),
        "bool_dead_row": (dead, False),
        "float": (torch.randn(q_len, k_len, generator=torch.Generator().manual_seed(1)), False),
    }


def _inputs(dtype: torch.dtype, grad: bool) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g) * 2.5  # (B, H, L, E): GQA 4 / 2
    k = torch.randn(2, 2, 9, 8, generator=g) * 2.5
    v = torch.randn(2, 2, 9, 8, generator=g)
    return [x.to(dtype).requires_grad_(grad) for x in (q, k, v)]


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mask", list(_masks(2, 7, 9)))
@pytest.mark.parametrize("name", available_backends())
def test_softcap_backends_match_reference_or_refuse(name: str, mask: str, dtype: str, grad: bool) -> None:
    backend = D.get_backend(name)
    q, k, v = _inputs(DTYPES[dtype], grad)
    attn_mask, causal = _masks(2, 7, 9)[mask]
    call, _ = D.make_call(q, k, v, attn_mask, causal, 0.0, None, False, CAP)
    if not backend.softcap:
        with pytest.raises(ValueError, match="softcap"):
            scaled_dot_product_attention(q, k, v, attn_mask, is_causal=causal, softcap=CAP, backend=name)
        return
    if why := backend.not_supported_reasons(call):  # a capping backend refuses only for reasons of its own
        assert not any("soft-capping" in r for r in why)
        with pytest.raises(ValueError, match="can serve"):
            scaled_dot_product_attention(q, k, v, attn_mask, is_causal=causal, softcap=CAP, backend=name)
        return
    meaning, ref_causal = call.dense_mask()
    r = [x.detach().double().requires_grad_(grad) for x in (q, k, v)]
    ref, ref_w = attention_reference(*r, meaning.double() if meaning is not None and meaning.is_floating_point()
                                     else meaning, is_causal=ref_causal, softcap=CAP)
    uncapped_ref, _ = attention_reference(*r, meaning.double() if meaning is not None and meaning.is_floating_point()
                                          else meaning, is_causal=ref_causal)
    assert (ref - uncapped_ref).abs().max() > 1e-2  # the cap matters on these inputs
    out = scaled_dot_product_attention(q, k, v, attn_mask, is_causal=causal, softcap=CAP, backend=name)
    assert isinstance(out, Tensor) and torch.isfinite(out).all()
    assert_close_to_reference(out, ref, reduction=9, msg=f"{name} {mask} {dtype}")
    if grad:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        out.backward(g.to(out.dtype))
        ref.backward(g.double())
        for x, rx, label in zip((q, k, v), r, "qkv", strict=True):
            assert x.grad is not None and rx.grad is not None
            assert_close_to_reference(x.grad, rx.grad, reduction=9, grad=True, msg=f"{name} {mask} {dtype} d{label}")
    else:
        w = attention_weights(q, k, attn_mask, is_causal=causal, softcap=CAP)
        assert_close_to_reference(w, ref_w, reduction=9, msg=f"weights {mask} {dtype}")


def test_every_backend_is_declared() -> None:
    """The dense PyTorch-operator paths and the native block engine serve softcap; PyTorch's fused kernel and the
    window, block-sparse and decode kernels do not (they cannot cap)."""
    serving = {n for n in available_backends() if D.get_backend(n).softcap}
    assert {"chunked", "math", "reference"} <= serving
    assert serving.isdisjoint({"sdpa", "native_band", "native_block_sparse", "native_decode"})
    assert "native_mask" in serving or "native_mask" not in available_backends()


def test_auto_routes_softcap_to_a_backend_that_caps() -> None:
    """On the CPU with the native library, the block engine serves capped scores under any mask object or none
    (output and weights); without it the chunked path; dropout goes to math."""
    from attnkit.functional import _native

    q, k, v = _inputs(torch.float32, False)
    native = _native.load() is not None
    assert which_backend(q, k, v, CausalMask("lower_right"), softcap=CAP).name == ("native_mask" if native
                                                                                   else "chunked")
    assert which_backend(q, k, v, softcap=CAP).name == ("native_mask" if native else "chunked")
    weights = which_backend(q, k, v, SlidingWindowMask(3), softcap=CAP, return_weights=True)
    assert (weights.name, weights.weights_from) == (("native_mask", "native_mask") if native else ("math", None))
    assert which_backend(q, k, v, softcap=CAP, dropout_p=0.1).name == "math"
    with pytest.raises(ValueError, match="softcap"):  # PyTorch's fused kernel cannot cap: never run uncapped
        which_backend(q, k, v, SlidingWindowMask(3), softcap=CAP, backend="sdpa")


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "50"])
def test_bad_softcap_is_refused(bad: object) -> None:
    q, k, v = _inputs(torch.float32, False)
    with pytest.raises(ValueError, match="softcap to be a positive float"):
        scaled_dot_product_attention(q, k, v, softcap=bad)  # type: ignore[arg-type]


def test_gradcheck_chunked_and_math_float64() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64).mul(2).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda a, b, c: chunked_attention(a, b, c, is_causal=True, chunk_size=2, softcap=CAP), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: scaled_dot_product_attention(a, b, c, SlidingWindowMask(2), softcap=CAP, backend="math"),
        (q, k, v))


def test_chunked_blocks_merge_exactly_with_softcap() -> None:
    """Several key chunks per row (chunk 3 over 9 keys): the online-softmax merge of capped scores is exact."""
    q, k, v = _inputs(torch.float64, False)
    ref, _ = attention_reference(q, k, v, softcap=CAP)
    out = chunked_attention(q, k, v, chunk_size=3, softcap=CAP)
    assert isinstance(out, Tensor)
    assert_close_to_reference(out, ref, reduction=9)
