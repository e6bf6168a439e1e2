"""One parity and gradient suite over every backend of the dispatcher (:mod:`attnkit.functional.dispatch`).

Axes: ``available_backends()`` x mask kind (none, ``is_causal``, bool and float tensors, causal upper-left and
lower-right, padding, exact and blocked windows, documents, sinks, block-sparse layouts, a ``mask_mod`` callable,
and combinations with ``&`` and ``|``) x dtype (float32, bfloat16, float64) x shape (odd lengths, ``L != S``, one
query, grouped-query heads). Each backend is *forced*, and a combination is collected only where the backend's own
declaration (``backend.not_supported_reasons(call)``: declared dtypes, devices, grad, head dims, and its
``supports``) says it serves it: a backend is left out exactly where its declared support rules it out, and
``test_every_backend_is_exercised`` fails if a registered backend ends up with no case (e.g. a native kernel that
did not build). Every case is compared with the float64 reference (:mod:`attnkit.testing`) at the backend's declared
tolerance (``Backend.tolerance``, a multiple of the policy), forward (twice: bit-identical) and gradients; the
backends that return weights also on the weights. Keys that no query of a batch row may attend are NaN-poisoned
for the structured backends (they must never read them). float64 backends also pass ``gradcheck`` on small shapes.

A new backend is tested by registering it: the matrix is built from ``available_backends()`` at collection time;
``test_a_registered_backend_joins_the_matrix`` shows it with a toy backend.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from attnkit.functional import (
    BlockedWindowMask,
    BlockSparseMask,
    CausalMask,
    DocumentMask,
    MaskMod,
    PaddingMask,
    SinkMask,
    SlidingWindowMask,
    _native,
    attention_reference,
    available_backends,
    scaled_dot_product_attention,
)
from attnkit.functional import dispatch as D
from attnkit.testing import assert_close_to_reference, tolerance

#: the structured backends: they must never read a key that no query of its batch row may attend
STRUCTURED = {"native_band", "flash_pieces", "window_blockwise", "native_block_sparse", "torch_block_sparse",
              "native_mask"}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f64": torch.float64}
#: (B, H, Hkv, L, S, E, Ev)
SHAPES = {
    "odd_gqa": (2, 4, 2, 13, 13, 16, 16),
    "L_lt_S": (2, 2, 2, 5, 19, 8, 8),
    "one_query": (1, 2, 1, 1, 130, 8, 8),
    "mqa_Ev": (1, 4, 1, 9, 9, 8, 4),
    "L_gt_S": (2, 2, 2, 9, 4, 8, 8),
    "one_key": (2, 2, 2, 6, 1, 8, 8),
    "one_token": (1, 1, 1, 1, 1, 4, 4),
    "E1": (1, 2, 2, 4, 5, 1, 1),
    "E3_Ev5": (1, 2, 2, 4, 5, 3, 5),
    "E256": (1, 1, 1, 5, 6, 256, 256),
}


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _lengths(b: int, s: int) -> Tensor:
    return torch.tensor([max(1, s - 3), s][:b])


def _layout(q_len: int, k_len: int, bs: int) -> Tensor:
    nq, nk = -(-q_len // bs), -(-k_len // bs)
    lay = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        lay[i, min(i, nk - 1)] = lay[i, 0] = True  # the diagonal and a global first block; other blocks unused
    return lay


def _masks(b: int, q_len: int, k_len: int, dtype: torch.dtype) -> dict[str, tuple[Any, bool]]:
    """Mask kind -> (attn_mask, is_causal) for (B, ., L, S); deterministic."""

    def bool_ls() -> Tensor:
        m = torch.rand(q_len, k_len, generator=_gen("bool")) > 0.4
        m[..., 0] = True
        m[-1] = False  # one query that sees nothing
        return m

    def float_dead_row() -> Tensor:
        bias = torch.randn(b, 1, q_len, k_len, generator=_gen("float")).to(dtype)
        bias[-1, 0, 0] = float("-inf")  # one query of the last batch row sees nothing
        return bias

    docs = torch.arange(k_len) * 3 // max(k_len, 1)  # three documents over the keys
    return {
        "none": (None, False),
        "is_causal": (None, True),
        "bool": (bool_ls(), False),
        "bool_S": (torch.rand(k_len, generator=_gen("bool_S")) > 0.3, False),
        "bool_BHLS": (torch.rand(b, 1, q_len, k_len, generator=_gen("bool_BHLS")) > 0.3, False),
        "integer_01": (bool_ls().long(), False),
        "all_masked": (torch.zeros(q_len, k_len, dtype=torch.bool), False),
        "float": (float_dead_row(), False),
        "bool+is_causal": (bool_ls(), True),
        "causal_ul": (CausalMask(), False),
        "causal_lr": (CausalMask("lower_right"), False),
        "is_causal&causal_lr": (CausalMask("lower_right"), True),
        "padding": (PaddingMask(_lengths(b, k_len)), False),
        "causal&padding": (CausalMask() & PaddingMask(_lengths(b, k_len)), False),
        "sliding": (SlidingWindowMask(4), False),
        "blocked": (BlockedWindowMask(4), False),
        "blocked_two_sided": (BlockedWindowMask(4, causal=False, look_forward=1), False),
        "blocked&padding": (BlockedWindowMask(4) & PaddingMask(_lengths(b, k_len)), False),
        "document": (DocumentMask(docs), False),
        "document&causal_lr": (DocumentMask(docs) & CausalMask("lower_right"), False),
        "sink|sliding": (SinkMask(2) | SlidingWindowMask(3), False),
        "block_sparse": (BlockSparseMask(_layout(q_len, k_len, 4), 4), False),
        "block_sparse&padding": (BlockSparseMask(_layout(q_len, k_len, 4), 4) & PaddingMask(_lengths(b, k_len)),
                                 False),
        "mask_mod": (lambda b_, h, q, kv: (q + kv) % 3 != 1, False),
        "sliding&mask_mod": (SlidingWindowMask(5) & MaskMod(lambda b_, h, q, kv: kv % 2 == 0), False),
    }


MASK_KINDS = list(_masks(1, 4, 4, torch.float32))
MAIN_SHAPE = "odd_gqa"


@dataclass(frozen=True)
class Case:
    backend: str
    mask: str
    dtype: str
    shape: str
    grad: bool  # False: the backend serves this call only without gradients (declared grad=False)

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.mask}-{self.dtype}-{self.shape}{'' if self.grad else '-nograd'}"


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, grad: bool, seed: str) -> list[Tensor]:
    b, h, hkv, q_len, k_len, e, ev = shape
    g = _gen(seed)
    xs = [torch.randn(b, h, q_len, e, generator=g, dtype=torch.float64),
          torch.randn(b, hkv, k_len, e, generator=g, dtype=torch.float64),
          torch.randn(b, hkv, k_len, ev, generator=g, dtype=torch.float64)]
    return [x.to(dtype).requires_grad_(grad) for x in xs]


def _reasons(backend: D.Backend, mask: str, dtype: str, shape: str, grad: bool) -> list[str]:
    sh = SHAPES[shape]
    q, k, v = _inputs(sh, DTYPES[dtype], grad, "reasons")
    attn_mask, causal = _masks(sh[0], sh[3], sh[4], DTYPES[dtype])[mask]
    try:
        call, _ = D.make_call(q, k, v, attn_mask, causal, 0.0, None, False)
        call.dense_mask()
    except ValueError as exc:  # a mask that does not apply to this shape (documents with L > S): not a case
        return [f"invalid input: {exc}"]
    return backend.not_supported_reasons(call)


def _cases_for(name: str) -> Iterator[Case]:
    """Every combination ``name`` declares it serves: all masks x dtypes on the main shape, all masks in float32
    on the other shapes."""
    backend = D.get_backend(name)
    combos = [(m, d, MAIN_SHAPE) for m in MASK_KINDS for d in DTYPES]
    combos += [(m, "f32", s) for s in SHAPES if s != MAIN_SHAPE for m in MASK_KINDS]
    for mask, dtype, shape in combos:
        if not _reasons(backend, mask, dtype, shape, True):
            yield Case(name, mask, dtype, shape, True)
        elif not _reasons(backend, mask, dtype, shape, False):
            yield Case(name, mask, dtype, shape, False)


CASES = [c for name in available_backends() for c in _cases_for(name)]


def _close(actual: Tensor, ref: Tensor, backend: D.Backend, reduction: int, dtype: torch.dtype, grad: bool,
           msg: str) -> None:
    """``actual`` against the float64 reference at the backend's declared tolerance (a multiple of the policy)."""
    factor = backend.tolerance
    if factor is None or factor == 1.0:
        assert_close_to_reference(actual, ref, reduction=reduction, grad=grad, dtype=dtype, msg=msg)
        return
    atol, rtol = tolerance(dtype, reduction, grad=grad)
    torch.testing.assert_close(actual.double(), ref, atol=atol * factor, rtol=rtol * factor,
                               msg=lambda m: f"{msg}: {m}")


def _run_case(case: Case) -> None:
    backend = D.get_backend(case.backend)
    sh = SHAPES[case.shape]
    b, h, _, q_len, k_len, _, ev = sh
    dtype = DTYPES[case.dtype]
    attn_mask, causal = _masks(b, q_len, k_len, dtype)[case.mask]
    q, k, v = _inputs(sh, dtype, case.grad, case.id)
    call, _ = D.make_call(q, k, v, attn_mask, causal, 0.0, None, False)
    meaning, ref_causal = call.dense_mask()  # the whole mask, as the dense reference reads it
    if meaning is not None and meaning.dtype != torch.bool:
        meaning = meaning.double()

    # the float64 reference on the same (rounded) inputs
    r = [x.detach().double().requires_grad_(case.grad) for x in (q, k, v)]
    ref, ref_w = attention_reference(*r, meaning, is_causal=ref_causal)

    # keys that no query of a batch row may attend: NaN for the structured kernels, which must never read them
    kk, vv = k, v
    if case.backend in STRUCTURED:
        allowed = torch.ones(b, 1, q_len, k_len, dtype=torch.bool) if meaning is None else (
            meaning if meaning.dtype == torch.bool else ~torch.isneginf(meaning)).expand(b, -1, q_len, k_len)
        if ref_causal:
            allowed = allowed & torch.ones(q_len, k_len, dtype=torch.bool).tril()
        hidden = ~allowed.any(dim=(1, 2))  # (B, S)
        if hidden.any():
            kk = k.detach().masked_fill(hidden.view(b, 1, k_len, 1), float("nan")).requires_grad_(case.grad)
            vv = v.detach().masked_fill(hidden.view(b, 1, k_len, 1), float("nan")).requires_grad_(case.grad)

    outs = [scaled_dot_product_attention(q, kk, vv, attn_mask, is_causal=causal, backend=case.backend)
            for _ in range(2)]
    assert torch.equal(outs[0], outs[1]), "two identical calls differ (not deterministic)"
    out = outs[0]
    assert out.shape == (b, h, q_len, ev) and out.dtype == dtype
    assert torch.isfinite(out).all(), "a NaN or inf in the output"
    _close(out, ref.detach(), backend, k_len, dtype, False, f"{case.id} output")

    if backend.returns_weights:
        _, w = scaled_dot_product_attention(q, kk, vv, attn_mask, is_causal=causal, backend=case.backend,
                                            return_weights=True)
        _close(w, ref_w.detach(), backend, k_len, dtype, False, f"{case.id} weights")

    if case.grad:
        g = torch.randn(out.shape, generator=_gen("grad"), dtype=torch.float64)
        out.backward(g.to(dtype))
        ref.backward(g)
        for name, mine, theirs in zip("qkv", (q, kk, vv), r, strict=True):
            assert mine.grad is not None and torch.isfinite(mine.grad).all(), f"d{name} not finite"
            _close(mine.grad, theirs.grad, backend, max(q_len, k_len), dtype, True, f"{case.id} d{name}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_backend_matches_reference(case: Case) -> None:
    _run_case(case)


def test_every_backend_is_exercised() -> None:
    """Each registered backend serves some case of the matrix, with gradients where it declares them. Without the
    native library (no compiler, ``ATTNKIT_NATIVE=0``) the native backends have none: a skip, which CI=true fails."""
    unbuilt = []
    for name in available_backends():
        mine = [c for c in CASES if c.backend == name]
        if not mine and name.startswith("native_") and _native.load() is None:
            unbuilt.append(name)
            continue
        why = _reasons(D.get_backend(name), "none", "f32", MAIN_SHAPE, False)
        assert mine, f"backend {name!r} serves no case of the matrix (e.g. no mask, float32: {why})"
        if D.get_backend(name).grad:
            assert any(c.grad for c in mine), f"backend {name!r} declares gradients but serves no case with them"
    if unbuilt:
        pytest.skip(f"no native library ({_native.status()}): backends {unbuilt} untested")


def test_declared_rules_are_the_skips() -> None:
    """A combination left out of the matrix is one the backend refuses when forced (the declaration is the rule)."""
    checked = 0
    for name in available_backends():
        kept = {(c.mask, c.dtype, c.shape) for c in CASES if c.backend == name}
        for mask, dtype in [(m, d) for m in MASK_KINDS for d in DTYPES][::7]:
            if (mask, dtype, MAIN_SHAPE) in kept:
                continue
            sh = SHAPES[MAIN_SHAPE]
            q, k, v = _inputs(sh, DTYPES[dtype], False, "skips")
            attn_mask, causal = _masks(sh[0], sh[3], sh[4], DTYPES[dtype])[mask]
            with pytest.raises(ValueError, match="can serve"):
                scaled_dot_product_attention(q, k, v, attn_mask, is_causal=causal, backend=name)
            checked += 1
    assert checked


# --------------------------------------------------------------------------------------------- gradcheck
GRADCHECK_MASKS = ["none", "is_causal", "float", "padding", "blocked", "blocked&padding", "block_sparse", "document"]


def _gradcheck_cases() -> Iterator[tuple[str, str]]:
    for name in available_backends():
        backend = D.get_backend(name)
        if not backend.grad:
            continue
        for mask in GRADCHECK_MASKS:
            if not _reasons(backend, mask, "f64", "mqa_Ev", True):
                yield name, mask


GRADCHECKS = list(_gradcheck_cases())


@pytest.mark.parametrize("name, mask", GRADCHECKS, ids=[f"{n}-{m}" for n, m in GRADCHECKS])
def test_gradcheck_float64(name: str, mask: str) -> None:
    sh = (1, 2, 1, 6, 6, 4, 3)
    attn_mask, causal = _masks(1, 6, 6, torch.float64)[mask]
    q, k, v = _inputs(sh, torch.float64, True, f"gradcheck-{name}-{mask}")
    fn: Callable[..., Tensor] = lambda a, b_, c: scaled_dot_product_attention(  # noqa: E731
        a, b_, c, attn_mask, is_causal=causal, backend=name)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


# --------------------------------------------------------------------------------------------- a new backend
def test_a_registered_backend_joins_the_matrix() -> None:
    """Register a toy backend (float64 only, the readable reference math, a declared tolerance): the same case
    builder collects it exactly where its declaration allows, and every case passes; unregistered afterwards."""

    def toy_fn(call: D.AttentionCall) -> tuple[Tensor, Tensor | None]:
        mask, causal = call.dense_mask()
        return attention_reference(call.query, call.key, call.value, mask, is_causal=causal, scale=call.scale)

    def toy_supports(call: D.AttentionCall) -> list[str]:
        return ["dropout"] if call.dropout_p > 0 else []

    toy = D.Backend("toy_reference64", toy_fn, True, toy_supports, "a toy: float64 reference math",
                    dtypes=(torch.float64,), tolerance=2.0)
    D.register_backend(toy)
    try:
        assert available_backends()[-1] == "toy_reference64"  # after the written priority list
        cases = list(_cases_for("toy_reference64"))
        assert cases and {c.dtype for c in cases} == {"f64"}  # its declared dtypes, nothing else
        assert {c.mask for c in cases} == set(MASK_KINDS)
        for case in cases:
            _run_case(case)
    finally:
        D._BACKENDS.pop("toy_reference64", None)
        D._RANKS.pop("toy_reference64", None)
    assert "toy_reference64" not in available_backends()


# --------------------------------------------------------------------------------------------- kept choices
def test_auto_keeps_its_choice_for_plain_calls_and_forgets_it_when_the_inputs_change(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """auto's choice for a plain call (no mask object or tensor) is kept per call signature: the same object comes
    back, equal to a fresh choice; another shape, thread count, grad mode or native library gives a fresh one,
    and registering a backend forgets every kept choice. Calls with a mask are never kept."""
    from attnkit.functional import _native, which_backend
    from attnkit.functional.masks import CausalMask, SlidingWindowMask

    D.clear_choices()
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 300, 16)
    first = which_backend(q, k, k)
    assert which_backend(q, k, k) is first
    call, _ = D.make_call(q, k, k, None, False, 0.0, None, False)
    assert D.choose_backend(call) == first
    assert which_backend(q, k[:, :, :200], k[:, :, :200]) is not first  # another shape
    qg = q.clone().requires_grad_()
    grad_call, _ = D.make_call(qg, k, k, None, False, 0.0, None, False)
    assert which_backend(qg, k, k).name == D.choose_backend(grad_call).name
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert which_backend(q, k, k) is not first
    finally:
        torch.set_num_threads(threads)
    if _native.load() is not None:  # the native library gone: the native decode kernel can no longer be chosen
        monkeypatch.setattr(_native, "load", lambda: None)
        assert which_backend(q, k, k).name != "native_decode"
        monkeypatch.undo()
    assert which_backend(q, k, k) is first
    D.register_backend(D.get_backend("reference"))  # any registration
    assert which_backend(q, k, k) is not first and which_backend(q, k, k) == first
    causal = which_backend(q, k, k, CausalMask("lower_right"))  # the mask HF models pass: kept, apart from None
    assert which_backend(q, k, k, CausalMask("lower_right")) is causal and causal is not which_backend(q, k, k)
    masked = SlidingWindowMask(8)
    assert which_backend(q, k, k, masked) is not which_backend(q, k, k, masked)  # other mask objects: chosen anew


def test_a_kept_plain_call_is_the_call_make_call_validates() -> None:
    """plain_call keeps the validated call's mask, causality and scale per signature: the kept call equals
    make_call's and gives the same output; calls outside its definition (3-D inputs, a tensor mask, weights,
    dropout, an int scale, a Parameter, a forced backend) are not kept and go through make_call."""
    from attnkit.functional import scaled_dot_product_attention
    from attnkit.functional.masks import CausalMask

    D.clear_choices()
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 8)
    for mask, causal, scale in ((None, False, None), (CausalMask("lower_right"), False, 0.3), (None, True, 0.5)):
        first = D.plain_call(q, k, v, mask, causal, 0.0, scale, False, None, "auto")
        kept = D.plain_call(q, k, v, mask, causal, 0.0, scale, False, None, "auto")
        assert first is not None and kept is not None and kept[1] is first[1]
        call, _ = D.make_call(q, k, v, mask, causal, 0.0, scale, False)
        assert (kept[0].structure, kept[0].is_causal, kept[0].scale) == (call.structure, call.is_causal, call.scale)
        assert kept[0].mask is None and not kept[0].need_weights and kept[0].softcap is None
        out = scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale)
        assert torch.equal(out, D.get_backend(D.choose_backend(call).name).fn(call)[0])
    for args in ((q[:, 0], k[:, 0], v[:, 0], None, False, 0.0, None, False, None, "auto"),
                 (q, k, v, torch.ones(3, 9, dtype=torch.bool), False, 0.0, None, False, None, "auto"),
                 (q, k, v, None, False, 0.0, None, True, None, "auto"),
                 (q, k, v, None, False, 0.1, None, False, None, "auto"),
                 (q, k, v, None, False, 0.0, 1, False, None, "auto"),
                 (torch.nn.Parameter(q), k, v, None, False, 0.0, None, False, None, "auto"),
                 (q, k, v, None, False, 0.0, None, False, None, "sdpa")):
        assert D.plain_call(*args) is None
    with pytest.raises(ValueError, match="head dim"):  # bad input is validated, never kept
        scaled_dot_product_attention(q, k[..., :8], v)
