"""``scaled_dot_product_attention`` as users call it (``backend="auto"``), and PyTorch's SDPA, against the float64
reference; the dense backends on the API's corners (the tutorial's 3-D layout, ``scale``, no keys, dropout, the
weights buffer).

Axes of the ``auto`` matrix: dtype x mask kind, and dtype x shape (``L != S``, one-token sequences, head dims 1..256,
grouped-query and multi-query heads). Each case runs twice and must give bit-identical results (determinism).
Rows with no key to attend to must be exactly zero (outputs and weights), never NaN. Every backend *forced*, over
every mask kind, dtype and shape it declares, forward and gradients: tests/test_functional_dispatch_matrix.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.functional import (
    CausalMask,
    PaddingMask,
    attention_reference,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
)
from attnkit.functional.masks import AttentionMask
from attnkit.testing import assert_close_to_reference

BACKENDS = ["reference", "math", "sdpa", "auto"]
DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Case:
    """One mask kind: what the user passes, and the boolean/float mask it means, materialised to 4-D."""

    attn_mask: Tensor | AttentionMask | None
    is_causal: bool
    meaning: Tensor | None  # bool (True = may attend) or float (added), broadcastable to (B, H, L, S)


def _lengths(b: int, s: int) -> Tensor:
    return torch.tensor([s, max(s - 2, 1)][:b] + [1] * max(b - 2, 0))


def _mask_cases(b: int, h: int, q_len: int, k_len: int, dtype: torch.dtype) -> dict[str, Callable[[], Case]]:
    """Mask kinds for shapes (B, H, L, S); each builder is deterministic under the test's seed."""

    def rand_bool(*shape: int) -> Tensor:
        m = torch.rand(*shape) > 0.4
        m[..., 0] = True  # keep every row alive; fully masked rows have their own cases
        return m

    def dead_rows() -> Case:
        m = rand_bool(b, 1, q_len, k_len)
        m[0, 0, -1] = False  # query L-1 of batch 0 sees nothing
        return Case(m, False, m)

    def float_dead_row() -> Case:
        bias = torch.randn(b, h, q_len, k_len, dtype=dtype)
        bias[-1, -1, 0] = float("-inf")  # one query of the last head sees nothing
        return Case(bias, False, bias)

    def integer() -> Case:
        m = rand_bool(q_len, k_len)
        return Case(m.long(), False, m)

    def key_padding() -> Case:
        m = padding_mask(_lengths(b, k_len), k_len)
        return Case(m, False, m)

    def causal_and_padding() -> Case:
        lengths = _lengths(b, k_len)
        obj = CausalMask() & PaddingMask(lengths)
        return Case(obj, False, causal_mask(q_len, k_len) & padding_mask(lengths, k_len))

    def is_causal_and_bool() -> Case:
        m = rand_bool(q_len, k_len)
        return Case(m, True, m & causal_mask(q_len, k_len))

    def is_causal_and_float() -> Case:
        bias = torch.randn(1, h, q_len, k_len, dtype=dtype)
        return Case(bias, True, bias.masked_fill(~causal_mask(q_len, k_len), float("-inf")))

    def lower_right() -> Case:
        return Case(CausalMask("lower_right"), False, causal_mask(q_len, k_len, align="lower_right"))

    return {
        "none": lambda: Case(None, False, None),
        "bool_LS": lambda: (lambda m: Case(m, False, m))(rand_bool(q_len, k_len)),
        "bool_S": lambda: (lambda m: Case(m, False, m))(rand_bool(k_len)),
        "key_padding_B11S": key_padding,
        "bool_BHLS": lambda: (lambda m: Case(m, False, m))(rand_bool(b, h, q_len, k_len)),
        "float_additive_B1LS": lambda: (lambda m: Case(m, False, m))(torch.randn(b, 1, q_len, k_len, dtype=dtype)),
        "integer_01": integer,
        "fully_masked_rows_bool": dead_rows,
        "fully_masked_rows_float": float_dead_row,
        "all_masked": lambda: (lambda m: Case(m, False, m))(torch.zeros(q_len, k_len, dtype=torch.bool)),
        "is_causal": lambda: Case(None, True, causal_mask(q_len, k_len)),
        "causal_upper_left_obj": lambda: Case(CausalMask(), False, causal_mask(q_len, k_len)),
        "causal_lower_right_obj": lower_right,
        "padding_obj": lambda: Case(PaddingMask(_lengths(b, k_len)), False, padding_mask(_lengths(b, k_len), k_len)),
        "causal_and_padding_obj": causal_and_padding,
        "is_causal_and_bool": is_causal_and_bool,
        "is_causal_and_float": is_causal_and_float,
        "is_causal_and_obj": lambda: Case(
            CausalMask("lower_right"),
            True,
            causal_mask(q_len, k_len) & causal_mask(q_len, k_len, align="lower_right"),
        ),
    }


MASK_KINDS = list(_mask_cases(1, 1, 1, 1, torch.float32))


def _qkv(b, h, hkv, q_len, k_len, e, ev, dtype) -> tuple[Tensor, Tensor, Tensor]:
    q = torch.randn(b, h, q_len, e, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, k_len, e, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, k_len, ev, dtype=torch.float64).to(dtype)
    return q, k, v


def _truth(q: Tensor, k: Tensor, v: Tensor, meaning: Tensor | None) -> tuple[Tensor, Tensor]:
    """The float64 reference on the same (already rounded) inputs."""
    m = meaning if meaning is None or meaning.dtype == torch.bool else meaning.double()
    return attention_reference(q.double(), k.double(), v.double(), m)


def _alive(meaning: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """(B, H, L, 1) boolean: rows that have a key to attend to."""
    if meaning is None:
        return torch.ones(*shape[:3], 1, dtype=torch.bool)
    allowed = meaning if meaning.dtype == torch.bool else ~torch.isneginf(meaning)
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    return allowed.any(-1, keepdim=True).expand(*shape[:3], 1)


def _torch_sdpa(q: Tensor, k: Tensor, v: Tensor, meaning: Tensor | None) -> Tensor:
    """PyTorch's own SDPA on the materialised mask, in the inputs' dtype (dead rows are NaN there)."""
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    m = meaning if meaning is None or meaning.dtype == torch.bool else meaning.to(q.dtype)
    while m is not None and m.dim() < 4:
        m = m.unsqueeze(0)
    with torch.no_grad():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, **gqa)


def _check(backend: str, dtype: torch.dtype, shape: tuple[int, ...], kind: str) -> None:
    b, h, hkv, q_len, k_len, e, ev = shape
    case = _mask_cases(b, h, q_len, k_len, dtype)[kind]()
    q, k, v = _qkv(b, h, hkv, q_len, k_len, e, ev, dtype)
    runs = [
        scaled_dot_product_attention(
            q, k, v, case.attn_mask, is_causal=case.is_causal, return_weights=True, backend=backend
        )
        for _ in range(2)
    ]
    (out, w), (out2, w2) = runs
    assert torch.equal(out, out2) and torch.equal(w, w2), "two identical calls differ (not deterministic)"
    assert out.shape == (b, h, q_len, ev) and out.dtype == dtype
    assert w.shape == (b, h, q_len, k_len)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()

    # every result against the float64 truth of the same (rounded) inputs, at the attnkit.testing policy
    ref_out, ref_w = _truth(q, k, v, case.meaning)
    assert_close_to_reference(out, ref_out, reduction=k_len, msg="output")
    assert_close_to_reference(w, ref_w, reduction=k_len, msg="weights")
    # The output alone (no weights requested) takes the fast path of each backend: same answer.
    alone = scaled_dot_product_attention(q, k, v, case.attn_mask, is_causal=case.is_causal, backend=backend)
    assert_close_to_reference(alone, ref_out, reduction=k_len, msg="output alone")

    alive = _alive(case.meaning, (b, h, q_len, k_len))
    assert not out.masked_select(~alive).any(), "a fully masked row gave a non-zero output"
    assert not w.masked_select(~alive).any(), "a fully masked row gave non-zero weights"
    live_w = w.double().sum(-1, keepdim=True).masked_fill(~alive, 1.0)  # rows sum to 1 (dead rows checked above)
    assert_close_to_reference(live_w, torch.ones_like(live_w), reduction=k_len, dtype=dtype, msg="weight sums")

    # PyTorch's own SDPA against the same reference (never against ours): rows it can answer, every live row
    theirs = _torch_sdpa(q, k, v, case.meaning)
    assert_close_to_reference(theirs.masked_select(alive), ref_out.masked_select(alive), reduction=k_len,
                              msg="torch SDPA")


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["auto"])  # each backend forced: tests/test_functional_dispatch_matrix.py
def test_mask_kinds(backend: str, dtype: torch.dtype, kind: str) -> None:
    _check(backend, dtype, (2, 4, 2, 5, 7, 16, 8), kind)  # B=2, H=4, Hkv=2, L=5, S=7, E=16, Ev=8


SHAPES = {
    "L_lt_S": (2, 3, 3, 3, 9, 8, 8),
    "L_gt_S": (2, 3, 3, 9, 4, 8, 8),
    "one_query": (2, 2, 2, 1, 6, 8, 8),
    "one_key": (2, 2, 2, 6, 1, 8, 8),
    "one_token": (1, 1, 1, 1, 1, 4, 4),
    "E1": (1, 2, 2, 4, 5, 1, 1),
    "E3_Ev5": (1, 2, 2, 4, 5, 3, 5),
    "E64": (1, 2, 2, 6, 6, 64, 64),
    "E128": (1, 1, 1, 6, 7, 128, 128),
    "E256": (1, 1, 1, 5, 6, 256, 256),
    "gqa_H6_Hkv2": (2, 6, 2, 4, 5, 8, 8),
    "gqa_H8_Hkv4": (1, 8, 4, 3, 5, 8, 4),
    "mqa_H4_Hkv1": (2, 4, 1, 4, 5, 8, 8),
}
SHAPE_MASKS = ["none", "is_causal", "causal_lower_right_obj", "fully_masked_rows_bool"]


@pytest.mark.parametrize("kind", SHAPE_MASKS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["auto"])  # each backend forced: tests/test_functional_dispatch_matrix.py
def test_shapes(backend: str, dtype: torch.dtype, shape: tuple[int, ...], kind: str) -> None:
    _check(backend, dtype, shape, kind)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tutorial_3d_api(backend: str) -> None:
    """The classic ``attention(Q, K, V, mask)`` with (B, L, E) tensors and an integer (B, L, S) mask, 0 = masked."""
    Q, K, V = torch.randn(2, 5, 8), torch.randn(2, 7, 8), torch.randn(2, 7, 6)
    mask = (torch.rand(2, 5, 7) > 0.3).long()
    mask[1, 2] = 0  # one fully masked row
    out = scaled_dot_product_attention(Q, K, V, mask, backend=backend)
    out_w, w = scaled_dot_product_attention(Q, K, V, mask, backend=backend, return_weights=True)
    assert out.shape == (2, 5, 6) and w.shape == (2, 5, 7)
    q4, k4, v4 = Q[:, None].double(), K[:, None].double(), V[:, None].double()  # (B, 1, L, E): one head
    ref_out, ref_w = attention_reference(q4, k4, v4, mask[:, None] != 0)
    assert_close_to_reference(out, ref_out[:, 0], reduction=7)
    assert_close_to_reference(out_w, ref_out[:, 0], reduction=7)
    assert_close_to_reference(w, ref_w[:, 0], reduction=7)
    assert not out[1, 2].any() and not w[1, 2].any()
    # The tutorial's own formula, written out in float64: softmax(QK^T/sqrt(d), mask==0 -> -1e9) V on live rows.
    Q64, K64, V64 = Q.double(), K.double(), V.double()
    scores = (Q64 @ K64.transpose(1, 2) / 8**0.5).masked_fill(mask == 0, -1e9)
    tutorial = scores.softmax(-1) @ V64
    alive = mask.any(-1)
    assert_close_to_reference(out[alive], tutorial[alive], reduction=7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_argument(backend: str) -> None:
    q, k, v = _qkv(1, 2, 2, 4, 5, 8, 8, torch.float64)
    out = scaled_dot_product_attention(q, k, v, scale=0.3, backend=backend)
    ref, _ = attention_reference(q, k, v, scale=0.3)
    assert_close_to_reference(out, ref, reduction=5)
    theirs = F.scaled_dot_product_attention(q, k, v, scale=0.3)  # float64: PyTorch's SDPA as a second reference
    assert_close_to_reference(out, theirs, reduction=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys_gives_zeros(backend: str) -> None:
    q = torch.randn(2, 3, 4, 8, requires_grad=True)
    k, v = torch.randn(2, 3, 0, 8, requires_grad=True), torch.randn(2, 3, 0, 5, requires_grad=True)
    out, w = scaled_dot_product_attention(q, k, v, return_weights=True, backend=backend)
    assert out.shape == (2, 3, 4, 5) and w.shape == (2, 3, 4, 0)
    assert not out.any()
    out.sum().backward()
    assert q.grad is not None and not q.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout(backend: str) -> None:
    """Dropout is applied after the weights are returned: weights stay exact, the output changes, same seed = same."""
    q, k, v = _qkv(1, 2, 2, 6, 6, 8, 8, torch.float32)
    torch.manual_seed(3)
    out1, w1 = scaled_dot_product_attention(q, k, v, dropout_p=0.5, return_weights=True, backend=backend)
    torch.manual_seed(3)
    out2, w2 = scaled_dot_product_attention(q, k, v, dropout_p=0.5, return_weights=True, backend=backend)
    plain, w0 = scaled_dot_product_attention(q, k, v, return_weights=True, backend=backend)
    assert torch.equal(out1, out2) and torch.equal(w1, w2)
    assert torch.equal(w1, w0)  # the same computation: the same bits
    assert not torch.allclose(out1, plain)
    assert torch.isfinite(out1).all()


@pytest.mark.parametrize("backend", ["math", "auto"])
def test_large_weights_buffer(backend: str) -> None:
    """Weights big enough (9 MB) for the math backend's huge-page buffer: same values as the small-buffer path."""
    q, k, v = _qkv(1, 2, 1, 1024, 1100, 4, 4, torch.float32)
    mask = torch.rand(1024, 1100) > 0.5
    mask[3] = False
    with torch.no_grad():
        out, w = scaled_dot_product_attention(q, k, v, mask, backend=backend, return_weights=True)
    ref_out, ref_w = _truth(q, k, v, mask)
    assert_close_to_reference(out, ref_out, reduction=1100)
    assert_close_to_reference(w, ref_w, reduction=1100)
    assert not w[0, :, 3].any()


def test_weights_buffer_reused_only_when_nobody_holds_it() -> None:
    """The math backend reuses the last weights' memory only after the caller dropped every reference to it."""
    from attnkit.functional.dense import release_buffers

    q, k, v = _qkv(1, 2, 2, 16, 16, 4, 4, torch.float32)
    with torch.no_grad():
        _, w1 = scaled_dot_product_attention(q, k, v, return_weights=True)
        kept = w1.clone()
        view = w1[0, 1]  # a view keeps the storage alive
        ptr = w1.data_ptr()
        del w1
        _, w2 = scaled_dot_product_attention(q * 2, k, v, return_weights=True)
        assert w2.data_ptr() != ptr and torch.equal(view, kept[0, 1])  # held: not reused, not overwritten
        del view, kept
        ptr2 = w2.data_ptr()
        del w2
        _, w3 = scaled_dot_product_attention(q, k, v, return_weights=True)
        assert w3.data_ptr() == ptr2  # dropped: reused
        with torch.inference_mode():
            _, w4 = scaled_dot_product_attention(q, k, v, return_weights=True)
        assert torch.equal(w4, w3)  # the same computation: the same bits
        release_buffers()


@pytest.mark.parametrize("kind", ["none", "fully_masked_rows_bool", "is_causal_and_float", "causal_and_padding_obj"])
def test_attention_weights_alone(kind: str) -> None:
    """``attention_weights(q, k, mask)`` equals the reference's weights; 3-D inputs give 3-D weights."""
    from attnkit.functional import attention_weights

    case = _mask_cases(2, 4, 5, 7, torch.float64)[kind]()
    q, k, v = _qkv(2, 4, 2, 5, 7, 16, 8, torch.float64)
    w = attention_weights(q, k, case.attn_mask, is_causal=case.is_causal)
    assert_close_to_reference(w, _truth(q, k, v, case.meaning)[1], reduction=7)
    q3, k3 = q[:, 0], k[:, 0]  # (B, L, E), (B, S, E)
    w3 = attention_weights(q3, k3, torch.ones(2, 5, 7, dtype=torch.long), scale=0.5)
    assert_close_to_reference(w3, (q3 @ k3.transpose(1, 2) * 0.5).softmax(-1), reduction=7)
