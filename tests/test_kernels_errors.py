"""Bad input raises ``ValueError("expected ..., got ...; try ...")`` naming the fix; the dispatcher explains itself."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from attnkit.functional import (
    Backend,
    CausalMask,
    SlidingWindowMask,
    attention_reference,
    available_backends,
    causal_mask,
    dispatch,
    padding_mask,
    register_backend,
    scaled_dot_product_attention,
    which_backend,
)
from attnkit.functional import dense as dense_mod
from attnkit.functional.dense import AttentionCall
from attnkit.testing import assert_close_to_reference

sdpa = scaled_dot_product_attention


def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


Q4, K4, V4 = t(2, 4, 5, 8), t(2, 2, 7, 8), t(2, 2, 7, 6)  # (B, H, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)
Q3 = t(2, 5, 8)

# id -> (call, words the message must contain besides expected/got/try)
ERRORS: dict[str, tuple[Callable[[], Any], list[str]]] = {
    "batch_mismatch": (lambda: sdpa(Q4, t(3, 2, 7, 8), t(3, 2, 7, 6)), ["batch size", "2, 3, 3"]),
    "heads_not_divisible": (lambda: sdpa(t(2, 3, 5, 8), K4, V4), ["divisible", "H=3, Hkv=2"]),
    "key_value_heads_differ": (lambda: sdpa(Q4, K4, t(2, 1, 7, 6)), ["same heads", "Hkv"]),
    "head_dim_mismatch": (lambda: sdpa(Q4, t(2, 2, 7, 4), V4), ["head dim", "E=8", "E=4", "projecting"]),
    "key_value_length_mismatch": (lambda: sdpa(Q4, K4, t(2, 2, 6, 6)), ["same length S", "S=7", "S=6"]),
    "integer_query": (lambda: sdpa(t(2, 4, 5, 8, dtype=torch.long), K4, V4), ["floating dtype", "query.float()"]),
    "mixed_dtypes": (lambda: sdpa(Q4, K4.double(), V4), ["one dtype", "float64", ".to(query.dtype)"]),
    "query_2d": (lambda: sdpa(t(5, 8), t(7, 8), t(7, 6)), ["(B, H, L, E)", "(5, 8)"]),
    "mixed_ndim": (lambda: sdpa(Q4, t(2, 7, 8), t(2, 7, 6)), ["same number of dims"]),
    "non_tensor_query": (lambda: sdpa([[1.0]], K4, V4), ["torch.Tensor", "list", "torch.as_tensor"]),
    "non_tensor_mask": (lambda: sdpa(Q4, K4, V4, [[True]]), ["torch.Tensor", "attn_mask"]),
    "mask_wrong_L": (lambda: sdpa(Q4, K4, V4, t(6, 7, dtype=torch.bool)), ["broadcasts to (B, H, L, S)", "(6, 7)"]),
    "mask_wrong_S": (lambda: sdpa(Q4, K4, V4, t(2, 1, 1, 8, dtype=torch.bool)), ["(2, 1, 1, 8)", "padding_mask"]),
    "mask_wrong_B": (lambda: sdpa(Q4, K4, V4, t(3, 1, 1, 7, dtype=torch.bool)), ["dim B = 2 or 1"]),
    "mask_wrong_H": (lambda: sdpa(Q4, K4, V4, t(2, 2, 5, 7, dtype=torch.bool)), ["dim H = 4 or 1"]),
    "mask_5d": (lambda: sdpa(Q4, K4, V4, t(1, 2, 4, 5, 7, dtype=torch.bool)), ["1 to 4 dims", "5 dims"]),
    "mask_complex": (lambda: sdpa(Q4, K4, V4, t(5, 7, dtype=torch.complex64)), ["boolean or floating", "mask.bool()"]),
    "mask_3d_with_4d_inputs": (lambda: sdpa(Q4, K4, V4, t(2, 5, 7, dtype=torch.bool)), ["3-D mask", "mask[:, None]"]),
    "mask_3d_wrong_shape_3d_inputs": (lambda: sdpa(Q3, t(2, 7, 8), t(2, 7, 6), t(2, 7, 5)), ["(2, 7, 5)"]),
    "mask_on_other_device": (lambda: sdpa(Q4, K4, V4, torch.ones(5, 7, dtype=torch.bool, device="meta")), ["device"]),
    "dropout_negative": (lambda: sdpa(Q4, K4, V4, dropout_p=-0.1), ["dropout_p in [0, 1)", "-0.1"]),
    "dropout_one": (lambda: sdpa(Q4, K4, V4, dropout_p=1.0), ["dropout_p in [0, 1)", "1.0"]),
    "dropout_string": (lambda: sdpa(Q4, K4, V4, dropout_p="0.1"), ["dropout_p in [0, 1)", "'0.1'"]),
    "dropout_bool": (lambda: sdpa(Q4, K4, V4, dropout_p=True), ["dropout_p in [0, 1)"]),
    "scale_string": (lambda: sdpa(Q4, K4, V4, scale="0.1"), ["scale", "str"]),
    "unknown_backend": (lambda: sdpa(Q4, K4, V4, backend="flash9"), ["'flash9'", 'backend="auto"', "sdpa"]),
    "causal_mask_bad_align": (lambda: causal_mask(3, align="bottom"), ["align", "'bottom'", "lower_right"]),
    "causal_mask_object_bad_align": (lambda: CausalMask("top"), ["align", "'top'"]),
    "padding_mask_float_lengths": (lambda: padding_mask(torch.tensor([1.5, 2.0])), ["integer", "lengths.long()"]),
    "padding_mask_too_long": (lambda: padding_mask(torch.tensor([2, 5]), 4), ["lengths in [0, 4]", "max 5"]),
    "register_before_unknown": (
        lambda: register_backend(Backend("x", lambda c: (c.query, None), False), before="nope"),
        ["registered backend names", "'nope'"],
    ),
}


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_error_names_the_fix(case: tuple[Callable[[], Any], list[str]]) -> None:
    call, words = case
    with pytest.raises(ValueError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # register_backend(before=...) warns before it raises
        call()
    msg = str(info.value)
    assert msg.startswith("expected ") and ", got " in msg and "; try " in msg, msg
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"


def test_which_backend_choices() -> None:
    q = torch.randn(1, 2, 4, 8)
    assert which_backend(q, q, q).name == "sdpa"
    assert which_backend(q, q, q, CausalMask()).name == "sdpa"
    assert which_backend(q, q, q, torch.ones(4, 4, dtype=torch.bool), is_causal=True).name == "sdpa"
    choice = which_backend(q, q, q, return_weights=True)
    assert choice.name == "math" and "sdpa" in choice.reasons and choice.weights_from is None
    assert "return_weights" in choice.reasons["sdpa"][0]
    text = str(choice)
    assert "backend: math" in text and "skipped sdpa" in text
    forced = which_backend(q, q, q, return_weights=True, backend="sdpa")
    assert forced.name == "sdpa" and forced.weights_from == "math"
    assert "weights: recomputed by 'math'" in str(forced)
    assert which_backend(q, q, q, backend="reference").name == "reference"
    names = available_backends()  # other modules may register structured backends ahead of these
    assert names.index("sdpa") < names.index("math") < names.index("reference")


@pytest.fixture
def picky_backend(monkeypatch: pytest.MonkeyPatch) -> Backend:
    """A backend registered first that cannot serve masks; the registry is restored afterwards."""
    monkeypatch.setattr(dispatch, "_BACKENDS", dict(dispatch._BACKENDS))
    monkeypatch.setattr(dispatch, "_RANKS", dict(dispatch._RANKS))
    served: list[AttentionCall] = []

    def fn(call: AttentionCall) -> tuple[torch.Tensor, None]:
        served.append(call)
        return torch.full((*call.query.shape[:3], call.value.shape[-1]), 7.0), None

    def supports(call: AttentionCall) -> list[str]:
        return ["cannot take a mask"] if call.mask is not None or call.structure is not None else []

    backend = Backend("picky", fn, False, supports, "test backend")
    with pytest.warns(DeprecationWarning, match="PRIORITY"):
        register_backend(backend, before=available_backends()[0])
    backend.served = served  # type: ignore[attr-defined]
    return backend


def test_registered_backend_is_dispatched_and_explains(picky_backend: Backend) -> None:
    q = torch.randn(1, 2, 3, 4)
    assert available_backends()[0] == "picky"
    assert bool((sdpa(q, q, q) == 7.0).all())  # auto picks it first
    choice = which_backend(q, q, q, CausalMask())
    assert choice.name == "sdpa" and choice.reasons["picky"] == ["cannot take a mask"]
    with pytest.raises(ValueError, match=r"expected inputs that backend 'picky' can serve, got cannot take a mask"):
        sdpa(q, q, q, CausalMask(), backend="picky")
    # forced with weights: its output, exact weights recomputed by the math backend
    out, w = sdpa(q, q, q, backend="picky", return_weights=True)
    assert bool((out == 7.0).all())
    q64 = q.double()
    assert_close_to_reference(w, attention_reference(q64, q64, q64)[1], reduction=3)
    assert len(picky_backend.served) == 2  # type: ignore[attr-defined]


def test_registry_restored_after_fixture() -> None:
    assert "picky" not in available_backends()


def test_priority_list_orders_the_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-ins follow dispatch.PRIORITY; a backend with no place there goes after them, in registration order."""
    assert available_backends() == [n for n in dispatch.PRIORITY if n in available_backends()]
    monkeypatch.setattr(dispatch, "_BACKENDS", dict(dispatch._BACKENDS))
    monkeypatch.setattr(dispatch, "_RANKS", dict(dispatch._RANKS))
    register_backend(Backend("mine", dense_mod._sdpa_fn, False))
    register_backend(Backend("mine2", dense_mod._sdpa_fn, False))
    assert available_backends()[-2:] == ["mine", "mine2"]
    q = torch.randn(1, 2, 3, 4)
    assert which_backend(q, q, q).name == "sdpa"  # never ahead of a built-in that serves the call


def test_forced_backend_names_the_inputs_and_every_reason() -> None:
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        sdpa(q, q, q, SlidingWindowMask(2), backend="native_mask", dropout_p=0.1)
    msg = str(info.value)
    for word in ("float64 inputs", "dropout on the weights", "query (1, 2, 4, 8)", "mask: SlidingWindowMask"):
        assert word in msg, f"{word!r} not in {msg!r}"


def test_forced_kernel_that_hides_weights_is_asked_only_for_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that declines ``need_weights`` still serves a forced call: weights come from the math backend."""
    monkeypatch.setattr(dispatch, "_BACKENDS", dict(dispatch._BACKENDS))
    monkeypatch.setattr(dispatch, "_RANKS", dict(dispatch._RANKS))
    asked: list[bool] = []

    def supports(call: AttentionCall) -> list[str]:
        asked.append(call.need_weights)
        return ["it does not return the attention weights"] if call.need_weights else []

    with pytest.warns(DeprecationWarning):
        register_backend(Backend("hider", dense_mod._sdpa_fn, False, supports), before=available_backends()[0])
    q = torch.randn(1, 2, 3, 4)
    out, w = sdpa(q, q, q, return_weights=True, backend="hider")
    q64 = q.double()
    ref_out, ref_w = attention_reference(q64, q64, q64)  # float64: never float32 against float32
    assert_close_to_reference(out, ref_out, reduction=3)
    assert_close_to_reference(w, ref_w, reduction=3)
    assert asked == [False]
    assert which_backend(q, q, q, return_weights=True).reasons["hider"] == ["it does not return the attention weights"]
