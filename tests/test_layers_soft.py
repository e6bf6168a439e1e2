"""SoftAttention, AdditiveAttention, LuongAttention, LocationAwareAttention, CoverageAttention.

Each module is checked against its paper's equations written out by hand (loops over keys, no attnkit code),
with padding masks, fully masked rows, float64 gradcheck, the tap that lets capture see the weights, and the
tutorial's SoftAttention code path.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnkit
from attnkit.layers import (
    AdditiveAttention,
    CoverageAttention,
    LocationAwareAttention,
    LuongAttention,
    SoftAttention,
)
from attnkit.testing import assert_close_to_reference

D64 = torch.float64


def _key_mask(lengths: list[int], s: int) -> torch.Tensor:
    return torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]  # (B, S), True = real token


def _softmax_over(scores: list[torch.Tensor], allowed: list[bool]) -> list[torch.Tensor]:
    """Softmax over the allowed keys written out: exp(e_j) / sum_k exp(e_k); zeros if no key is allowed."""
    if not any(allowed):
        return [torch.zeros((), dtype=D64) for _ in scores]
    m = max(float(e.detach()) for e, ok in zip(scores, allowed, strict=True) if ok)
    exps = [torch.exp(e - m) if ok else torch.zeros((), dtype=D64) for e, ok in zip(scores, allowed, strict=True)]
    total = sum(exps)
    return [x / total for x in exps]


# ----------------------------------------------------------------------------------------------------- tutorial


class TutorialSoftAttention(nn.Module):
    """The tutorial's module, as the tutorial writes it (its own scaled_dot_product_attention, mask == 0 masked)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.query_proj = nn.Linear(d_model, d_model)
        self.key_proj = nn.Linear(d_model, d_model)
        self.value_proj = nn.Linear(d_model, d_model)

    @staticmethod
    def sdpa(q, k, v, mask=None):
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        if mask is not None:
            scores = scores.masked_fill(mask == 0, -1e9)
        return torch.matmul(F.softmax(scores, dim=-1), v)

    def forward(self, x, mask=None):
        return self.sdpa(self.query_proj(x), self.key_proj(x), self.value_proj(x), mask)


def test_soft_attention_matches_the_tutorial_module() -> None:
    tut = TutorialSoftAttention(16).double()
    ours = SoftAttention(16, dtype=D64)
    ours.load_state_dict(tut.state_dict())  # same parameter names
    x = torch.randn(3, 7, 16, dtype=D64)
    assert_close_to_reference(ours(x), tut(x), reduction=16)
    mask = torch.ones(3, 7, 7, dtype=torch.long)  # the tutorial's mask: 0 = masked
    mask[1, :, 4:] = 0
    mask[2] = torch.tril(torch.ones(7, 7, dtype=torch.long))
    assert_close_to_reference(ours(x, mask=mask), tut(x, mask), reduction=16)
    assert_close_to_reference(ours(x, mask=mask.bool()), tut(x, mask), reduction=16)


def test_soft_attention_key_mask_and_causal_and_registry() -> None:
    attn = attnkit.create_attention("soft", 8, dtype=D64)
    assert isinstance(attn, SoftAttention) and attnkit.create_attention("soft_attention", 8).d_model == 8
    x = torch.randn(2, 5, 8, dtype=D64)
    km = _key_mask([5, 2], 5)
    out = attn(x, key_mask=km, is_causal=True)
    q, k, v = attn.query_proj(x), attn.key_proj(x), attn.value_proj(x)
    allowed = km[:, None, :] & torch.tril(torch.ones(5, 5, dtype=torch.bool))  # (B, L, S)
    s = (q @ k.transpose(1, 2) / math.sqrt(8)).masked_fill(~allowed, float("-inf"))
    assert_close_to_reference(out, torch.softmax(s, -1) @ v, reduction=8)
    # a float mask combines with key_mask by adding -inf
    bias = torch.randn(5, 5, dtype=D64)
    out_f = attn(x, mask=bias, key_mask=km)
    s2 = (q @ k.transpose(1, 2) / math.sqrt(8) + bias).masked_fill(~km[:, None, :], float("-inf"))
    assert_close_to_reference(out_f, torch.softmax(s2, -1) @ v, reduction=8)


SOFT_MASKS = {
    "window": lambda: attnkit.functional.SlidingWindowMask(9),
    "documents": lambda: attnkit.functional.DocumentMask(torch.tensor([0] * 40 + [1] * 30)),
    "mask_mod_prefix_lm": lambda: (lambda b, h, q, kv: (kv <= q) | (kv < 12)),
    "mask_mod_per_row": lambda: (lambda b, h, q, kv: (kv <= q) & (kv < 50 + 20 * b)),
}


@pytest.mark.parametrize("name", SOFT_MASKS)
def test_soft_attention_mask_objects_and_mask_mods(name: str) -> None:
    """``mask=`` takes any mask object or mask_mod (the one normaliser): float32 (the native block engine where it
    is built), forward and backward, against the float64 attention written out with the mask materialised."""
    torch.manual_seed(0)
    attn = SoftAttention(8)
    ref = copy.deepcopy(attn).double()
    x = torch.randn(2, 70, 8, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    mask = SOFT_MASKS[name]()
    km = _key_mask([70, 61], 70)
    allowed = attnkit.functional.as_mask(mask)._bind(2, 1).materialize(70, 70)[:, 0] & km[:, None, :]  # (B, L, S)
    out = attn(x, mask=mask, key_mask=km)
    q, k, v = ref.query_proj(x64), ref.key_proj(x64), ref.value_proj(x64)
    scores = (q @ k.transpose(1, 2) / math.sqrt(8)).masked_fill(~allowed, float("-inf"))
    want = torch.softmax(scores, -1).nan_to_num(0.0) @ v  # a row with no key (window over padding): zeros
    assert_close_to_reference(out, want, reduction=70)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g.double())
    assert_close_to_reference(x.grad, x64.grad, reduction=70, grad=True)


def test_soft_attention_capture_sees_exact_weights_and_output_unchanged() -> None:
    attn = SoftAttention(8)
    x = torch.randn(2, 4, 8)
    plain = attn(x)
    seen = []
    remove = attn.attend.add_observer(lambda mod, w: seen.append(w))
    observed = attn(x)
    remove()
    assert torch.equal(plain, observed)
    ref, x64 = copy.deepcopy(attn).double(), x.double()  # the same weights and inputs in float64: the reference
    q, k = ref.query_proj(x64), ref.key_proj(x64)
    expect = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), -1)  # (B, L, S)
    assert seen[0].shape == (2, 1, 4, 4)
    assert_close_to_reference(seen[0][:, 0], expect.detach(), reduction=8)  # d_model = 8 (S = 4)


def test_soft_attention_gradcheck() -> None:
    attn = SoftAttention(4, dtype=D64)
    x = torch.randn(2, 3, 4, dtype=D64, requires_grad=True)
    km = _key_mask([3, 1], 3)
    assert torch.autograd.gradcheck(lambda t: attn(t, key_mask=km), (x,))


# ----------------------------------------------------------------------------------------------------- Bahdanau


def test_additive_matches_bahdanau_equations_with_padding() -> None:
    torch.manual_seed(1)
    attn = AdditiveAttention(5, 6, 7, dtype=D64)
    W, U, v = attn.query_proj.weight, attn.key_proj.weight, attn.v.weight[0]  # (A, Dq), (A, Dk), (A,)
    s = torch.randn(3, 5, dtype=D64)  # s_{i-1}
    h = torch.randn(3, 4, 6, dtype=D64)  # h_j
    lengths = [4, 2, 0]  # the last row has no real key: zeros
    ctx, w = attn(s, h, key_mask=_key_mask(lengths, 4))
    for b in range(3):
        e = [v @ torch.tanh(W @ s[b] + U @ h[b, j]) for j in range(4)]  # e_ij = v^T tanh(W s + U h_j)
        a = _softmax_over(e, [j < lengths[b] for j in range(4)])
        c = sum(a[j] * h[b, j] for j in range(4))
        assert_close_to_reference(w[b], torch.stack(a), reduction=7)
        assert_close_to_reference(ctx[b], c, reduction=7)
    assert torch.all(ctx[2] == 0) and torch.all(w[2] == 0)


def test_additive_many_steps_equal_step_by_step_and_separate_values() -> None:
    attn = AdditiveAttention(5, 6, 7, bias=True, dtype=D64)
    s = torch.randn(2, 3, 5, dtype=D64)  # three decoder steps at once
    h = torch.randn(2, 4, 6, dtype=D64)
    vals = torch.randn(2, 4, 9, dtype=D64)
    km = _key_mask([4, 3], 4)
    ctx, w = attn(s, h, vals, key_mask=km)
    assert ctx.shape == (2, 3, 9) and w.shape == (2, 3, 4)
    for t in range(3):
        c1, w1 = attn(s[:, t], h, vals, key_mask=km)
        assert_close_to_reference(c1, ctx[:, t], reduction=7)
        assert_close_to_reference(w1, w[:, t], reduction=7)
    # the bias sits inside the tanh, next to W s
    e = torch.tanh(attn.query_proj(s)[:, :, None] + attn.key_proj(h)[:, None]) @ attn.v.weight[0]
    assert_close_to_reference(w, torch.softmax(e.masked_fill(~km[:, None], float("-inf")), -1), reduction=7)


def test_additive_gradcheck_and_tap() -> None:
    attn = AdditiveAttention(3, 4, 5, dtype=D64)
    s = torch.randn(2, 3, dtype=D64, requires_grad=True)
    h = torch.randn(2, 4, 4, dtype=D64, requires_grad=True)
    km = _key_mask([4, 2], 4)
    assert torch.autograd.gradcheck(lambda a, b: attn(a, b, key_mask=km), (s, h))
    seen = []
    remove = attn.tap.add_observer(lambda mod, w: seen.append(w))
    _, w = attn(s, h, key_mask=km)
    remove()
    assert seen[0].shape == (2, 1, 1, 4) and torch.equal(seen[0][:, 0, 0], w.detach())
    assert not seen[0].requires_grad


def test_fully_masked_rows_give_zero_gradients() -> None:
    attn = AdditiveAttention(3, 4, 5, dtype=D64)
    s = torch.randn(2, 3, dtype=D64, requires_grad=True)
    h = torch.randn(2, 4, 4, dtype=D64, requires_grad=True)
    ctx, w = attn(s, h, key_mask=_key_mask([3, 0], 4))
    (ctx.sum() + w.sum()).backward()
    assert torch.isfinite(s.grad).all() and torch.all(s.grad[1] == 0) and torch.all(h.grad[1] == 0)


# ----------------------------------------------------------------------------------------------------- Luong


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_luong_matches_paper_scores(score: str) -> None:
    torch.manual_seed(2)
    attn = LuongAttention(6, 6, score=score, attn_dim=5, output_dim=4, dtype=D64)
    ht = torch.randn(2, 3, 6, dtype=D64)  # current decoder states h_t
    hs = torch.randn(2, 5, 6, dtype=D64)  # encoder states h_s
    lengths = [5, 3]
    out, w = attn(ht, hs, key_mask=_key_mask(lengths, 5))
    Wc = attn.out_proj.weight
    for b in range(2):
        for t in range(3):
            if score == "dot":
                e = [ht[b, t] @ hs[b, j] for j in range(5)]
            elif score == "general":
                e = [ht[b, t] @ (attn.weight.weight @ hs[b, j]) for j in range(5)]
            else:
                Wa, va = attn.weight.weight, attn.v.weight[0]
                e = [va @ torch.tanh(Wa @ torch.cat([ht[b, t], hs[b, j]])) for j in range(5)]
            a = _softmax_over(e, [j < lengths[b] for j in range(5)])
            c = sum(a[j] * hs[b, j] for j in range(5))
            h_tilde = torch.tanh(Wc @ torch.cat([c, ht[b, t]]))  # eq. 5
            assert_close_to_reference(w[b, t], torch.stack(a), reduction=12)
            assert_close_to_reference(out[b, t], h_tilde, reduction=12)


def test_luong_context_without_output_layer_and_gradcheck() -> None:
    attn = LuongAttention(3, 4, score="general", dtype=D64)
    ht = torch.randn(2, 3, dtype=D64, requires_grad=True)  # one step
    hs = torch.randn(2, 5, 4, dtype=D64, requires_grad=True)
    km = _key_mask([5, 2], 5)
    ctx, w = attn(ht, hs, key_mask=km)
    assert ctx.shape == (2, 4) and w.shape == (2, 5)
    assert_close_to_reference(ctx, (w[:, :, None] * hs).sum(1), reduction=5)
    assert torch.autograd.gradcheck(lambda a, b: attn(a, b, key_mask=km), (ht, hs))
    concat = LuongAttention(3, 4, score="concat", output_dim=3, dtype=D64)
    assert torch.autograd.gradcheck(lambda a, b: concat(a, b, key_mask=km), (ht, hs))


# --------------------------------------------------------------------------------------- Chorowski and Tu


def test_location_aware_matches_chorowski_equations() -> None:
    torch.manual_seed(3)
    attn = LocationAwareAttention(4, 5, 6, num_filters=3, kernel_size=3, dtype=D64)
    s = torch.randn(2, 4, dtype=D64)
    h = torch.randn(2, 6, 5, dtype=D64)
    prev = torch.softmax(torch.randn(2, 6, dtype=D64), -1)
    lengths = [6, 4]
    ctx, w = attn(s, h, prev_weights=prev, key_mask=_key_mask(lengths, 6))
    Fk = attn.location_conv.weight[:, 0]  # (k filters, r=3)
    W, b_ = attn.query_proj.weight, attn.query_proj.bias
    V, U, wv = attn.key_proj.weight, attn.location_proj.weight, attn.v.weight[0]
    for b in range(2):
        padded = torch.cat([torch.zeros(1, dtype=D64), prev[b], torch.zeros(1, dtype=D64)])
        e = []
        for j in range(6):
            f_j = Fk @ padded[j : j + 3]  # f_i = F * a_{i-1}, centred at j
            e.append(wv @ torch.tanh(W @ s[b] + V @ h[b, j] + U @ f_j + b_))  # eq. (9)
        a = _softmax_over(e, [j < lengths[b] for j in range(6)])
        assert_close_to_reference(w[b], torch.stack(a), reduction=6)
        assert_close_to_reference(ctx[b], sum(a[j] * h[b, j] for j in range(6)), reduction=6)
    # two channels (previous and cumulative weights), gradcheck through the previous weights
    attn2 = LocationAwareAttention(4, 5, 6, num_filters=2, kernel_size=3, in_channels=2, dtype=D64)
    two = torch.stack([prev, prev.cumsum(-1)], 1).requires_grad_(True)
    sq = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, p: attn2(a, h, prev_weights=p), (sq, two))


def test_coverage_matches_tu_equations_and_accumulates() -> None:
    torch.manual_seed(4)
    attn = CoverageAttention(4, 5, 6, fertility=2, dtype=D64)
    h = torch.randn(2, 5, 5, dtype=D64)
    W, U, Vc, v = attn.query_proj.weight, attn.key_proj.weight, attn.coverage_proj.weight[:, 0], attn.v.weight[0]
    Uf = attn.fertility_proj.weight[0]
    cov = attn.init_coverage(h)
    for _step in range(3):
        s = torch.randn(2, 4, dtype=D64)
        ctx, w = attn(s, h, coverage=cov)
        for b in range(2):
            e = [v @ torch.tanh(W @ s[b] + U @ h[b, j] + Vc * cov[b, j]) for j in range(5)]  # eq. 5
            assert_close_to_reference(w[b], torch.stack(_softmax_over(e, [True] * 5)), reduction=6)
        new = attn.update_coverage(cov, w, h)
        phi = 2 * torch.sigmoid(h @ Uf)  # fertility, eq. 7
        assert_close_to_reference(new, cov + w / phi, reduction=6)
        cov = new
    plain = CoverageAttention(4, 5, 6)
    summed = plain.update_coverage(torch.zeros(1, 3), torch.ones(1, 3), torch.randn(1, 3, 5))  # Phi = 1
    assert torch.equal(summed, torch.ones(1, 3))
    hs = h.clone().requires_grad_(True)
    c0 = torch.rand(2, 5, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k, c: attn(torch.ones(2, 4, dtype=D64), k, coverage=c), (hs, c0))


# ----------------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_value_errors_with_fixes() -> None:
    add = AdditiveAttention(4, 5, 6)
    with pytest.raises(ValueError, match="expected keys of shape"):
        add(torch.randn(2, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected query of shape"):
        add(torch.randn(2, 3), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="key_mask of shape"):
        add(torch.randn(2, 4), torch.randn(2, 3, 5), key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean key_mask"):
        add(torch.randn(2, 4), torch.randn(2, 3, 5), key_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="one batch size"):
        add(torch.randn(3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="score in"):
        LuongAttention(4, 4, score="location")
    with pytest.raises(ValueError, match="query_dim == key_dim"):
        LuongAttention(4, 5, score="dot")
    with pytest.raises(ValueError, match="one decoder step"):
        LocationAwareAttention(4, 5, 6)(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="odd positive kernel_size"):
        LocationAwareAttention(4, 5, 6, kernel_size=4)
    with pytest.raises(ValueError, match="expected x of shape"):
        SoftAttention(8)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="expected an attention name"):
        attnkit.create_attention("nope", 3)
