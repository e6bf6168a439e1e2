"""attnkit.viz.capture: exact maps from the taps, outputs unchanged, selection, reductions, HF attentions."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from attnkit.functional import CausalMask, padding_mask
from attnkit.functional._reference import attention_reference
from attnkit.layers import Attend, GateTap, WeightsTap
from attnkit.testing import assert_close_to_reference
from attnkit.viz import capture, from_hf_attentions


class SelfAttention(nn.Module):
    """A small multi-head self-attention that computes through an Attend tap (the attnkit pattern)."""

    def __init__(self, dim: int = 16, heads: int = 4, backend: str = "auto") -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.attend = Attend(backend=backend)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, E) each
        return q, k, v

    def forward(self, x: torch.Tensor, mask=None, causal: bool = False) -> torch.Tensor:
        q, k, v = self.project(x)
        o = self.attend(q, k, v, mask, is_causal=causal)  # (B, H, L, E)
        return self.out(o.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.self_attn = SelfAttention(backend=backend)
        self.ff = nn.Linear(16, 16)

    def forward(self, x, mask=None, causal=False):
        x = x + self.self_attn(x, mask, causal)
        return x + self.ff(x)


class Stack(nn.Module):
    def __init__(self, n: int = 3, backend: str = "auto") -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(backend) for _ in range(n))

    def forward(self, x, mask=None, causal=False):
        for layer in self.layers:
            x = layer(x, mask, causal)
        return x


class Gated(nn.Module):
    """Squeeze-excite style channel gate plus a WeightsTap, to check non-Attend taps."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.gate = GateTap("channel")
        self.tap = WeightsTap()

    def forward(self, x):  # x (B, C, H, W)
        g = self.gate(self.fc(x.mean((2, 3))))[:, :, None, None]  # (B, C, 1, 1)
        w = self.tap(torch.softmax(x.flatten(2), -1)[:, None])  # (B, 1, C, HW)
        return x * g + w.sum() * 0


def _layer_inputs(model: Stack, x, mask, causal):
    """The (q, k) each layer's Attend receives, recomputed by running the blocks one by one."""
    pairs = []
    for block in model.layers:
        q, k, v = block.self_attn.project(x)
        pairs.append((q, k, v))
        x = block(x, mask, causal)
    return pairs


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("masking", ["none", "padding", "causal"])
def test_capture_equals_reference_weights_and_keeps_outputs(backend, masking):
    model = Stack(3, backend).eval()
    x = torch.randn(2, 7, 16)
    mask, causal = None, False
    if masking == "padding":
        mask = padding_mask(torch.tensor([7, 4]), 7)
    elif masking == "causal":
        causal = True
    with torch.no_grad():
        plain = model(x, mask, causal)
        with capture(model) as rec:
            captured = model(x, mask, causal)
        assert torch.equal(plain, captured)  # bit-identical, not just close
        assert [r.name for r in rec] == ["layers.0.self_attn", "layers.1.self_attn", "layers.2.self_attn"]
        stack = rec.stack()
        assert stack.shape == (3, 2, 4, 7, 7)
        for layer, (q, k, v) in enumerate(_layer_inputs(model, x, mask, causal)):
            # the float64 reference of the same (float32) inputs the layer's Attend received
            _, ref = attention_reference(q.double(), k.double(), v.double(), mask, is_causal=causal)
            assert_close_to_reference(stack[layer], ref, reduction=7, msg=f"layer {layer}")  # S = 7 keys
        assert_close_to_reference(stack.sum(-1), torch.ones(3, 2, 4, 7, dtype=torch.float64), reduction=7)
    # after the block no observer is left: the model runs as before
    assert not any(m.observed for m in model.modules() if hasattr(m, "observed"))


def test_capture_with_gradients_and_training_outputs_identical():
    model = Stack(2)
    x = torch.randn(2, 5, 16, requires_grad=True)
    plain = model(x, None, True)
    with capture(model) as rec:
        captured = model(x, None, True)
    assert torch.equal(plain, captured)
    captured.sum().backward()  # capture does not break autograd
    assert x.grad is not None and not rec.stack().requires_grad


def test_selection_by_glob_regex_list_layers_heads():
    model = Stack(3).eval()
    x = torch.randn(1, 6, 16)
    with torch.no_grad(), capture(model) as full:
        model(x)
    all_maps = full.stack()
    with torch.no_grad(), capture(model, "layers.*.self_attn", layers=[-1]) as rec:
        model(x)
    assert [(r.name, r.layer) for r in rec] == [("layers.2.self_attn", 0)]
    assert torch.equal(rec.stack()[0], all_maps[2])  # the same run, only selected: exact
    with torch.no_grad(), capture(model, re.compile(r"layers\.[01]\.")) as rec:
        model(x)
    assert rec.names() == ["layers.0.self_attn", "layers.1.self_attn"]
    with torch.no_grad(), capture(model, ["layers.1.self_attn"], heads=[3, 1]) as rec:
        model(x)
    assert rec[0].heads == (3, 1)
    assert torch.equal(rec[0].tensor, all_maps[1][:, [3, 1]])


def test_reductions_bound_memory_and_keep_the_values():
    model = Stack(3).eval()
    x = torch.randn(2, 32, 16)
    with torch.no_grad(), capture(model) as full:
        model(x)
    with torch.no_grad(), capture(model, reduce="mean") as mean:
        model(x)
    with torch.no_grad(), capture(model, reduce=("topk", 4)) as top:
        model(x)
    maps = full.stack()  # (3, 2, 4, 32, 32)
    # the float32 mean of 4 heads against the float64 mean of the same maps
    assert_close_to_reference(mean.stack(), maps.double().mean(2, keepdim=True), reduction=4)
    assert mean.nbytes() * 4 == full.nbytes()  # one map instead of four heads
    values, _ = maps.topk(4, dim=-1)
    assert torch.equal(torch.stack([r.tensor for r in top]), values)  # a selection: exact
    dense = top.stack()  # scattered back into zeros
    assert dense.shape == maps.shape
    assert ((dense == 0) | (dense == maps)).all() and (dense > 0).sum(-1).eq(4).all()
    assert top.nbytes() <= full.nbytes() * (4 * (4 + 8)) / (32 * 4)  # k values + int64 positions per row
    assert top[0].numpy().shape == (2, 4, 32, 32)


def test_gates_weights_taps_and_call_indices():
    model = Gated()
    x = torch.randn(2, 6, 3, 3)
    with capture(model) as rec:
        model(x)
        model(x)
    assert [(r.name, r.kind, r.call) for r in rec] == [("", "channel", 0), ("", "attention", 0)] + [
        ("", "channel", 1),
        ("", "attention", 1),
    ]
    gate = rec.gates()[0]
    fc64 = copy.deepcopy(model.fc).double()  # the gate's formula in float64, from the same weights and inputs
    want = torch.sigmoid(fc64(x.double().mean((2, 3)))).detach()
    assert_close_to_reference(gate.tensor, want, reduction=9)  # the widest sum: the 3 x 3 pixels of the mean
    assert gate.numpy().dtype.name == "float32"
    with pytest.raises(ValueError, match="one call per layer"):
        rec.stack()
    assert rec.stack(call=-1).shape == (1, 2, 1, 6, 9)
    with capture(model, kinds=["channel"]) as only_gates:
        model(x)
    assert [r.kind for r in only_gates] == ["channel"]


def test_observers_removed_on_error_and_bad_input():
    model = Stack(1)
    with pytest.raises(RuntimeError), capture(model):
        raise RuntimeError("boom")
    assert not model.layers[0].self_attn.attend.observed
    with pytest.raises(ValueError, match="expected a model with attnkit attention modules"), capture(nn.Linear(2, 2)):
        pass
    with pytest.raises(ValueError, match="select at least one module.*layers.0.self_attn"), capture(model, "dec.*"):
        pass
    with pytest.raises(ValueError, match=r"expected reduce"), capture(model, reduce="max"):
        pass
    with pytest.raises(ValueError, match=r"layer indices"), capture(model, layers=5):
        pass


def test_cross_attention_shapes_must_match_to_stack():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = SelfAttention(), SelfAttention()

        def forward(self, x, y):
            q, _, _ = self.a.project(x)
            _, k, v = self.a.project(y)
            return self.a.attend(q, k, v, CausalMask()), self.b(x)

    model = Mixed()
    with capture(model) as rec:
        model(torch.randn(1, 3, 16), torch.randn(1, 5, 16))
    assert [r.shape for r in rec] == [(1, 4, 3, 5), (1, 4, 3, 3)]
    assert rec[0].tensor[0, :, 0, 1:].abs().sum() == 0  # upper-left causal: query 0 sees key 0 only
    with pytest.raises(ValueError, match="one shape to stack.*names="):
        rec.stack()


def test_from_hf_attentions_matches_a_bert_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    model.set_attn_implementation("eager") if hasattr(model, "set_attn_implementation") else None
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    rec = from_hf_attentions(out.attentions, heads=[0, 2])
    assert rec.names() == ["layer.0", "layer.1"]
    stack = rec.stack()
    assert stack.shape == (2, 1, 2, 5, 5)
    assert torch.equal(stack, torch.stack(out.attentions)[:, :, [0, 2]])  # copied and selected: exact
    top = from_hf_attentions(out.attentions, layers=-1, reduce=("topk", 2))
    assert top[0].tensor.shape == (1, 4, 5, 2) and top[0].dense().shape == (1, 4, 5, 5)
    with pytest.raises(ValueError, match="output_attentions=True"):
        from_hf_attentions(None)


def test_capture_real_attnkit_modules():
    """The library's own modules: a Transformer encoder, CBAM gates and Bahdanau attention, in one model."""
    from attnkit.layers import CBAM, AdditiveAttention, MultiHeadAttention, TransformerEncoder, TransformerEncoderLayer

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = TransformerEncoder(TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0), 2)
            self.cbam = CBAM(8, rd_ratio=0.25)
            self.bahdanau = AdditiveAttention(16, 16, 8)

        def forward(self, tokens, image):
            memory = self.encoder(tokens)  # (B, L, D)
            context, _ = self.bahdanau(memory[:, 0], memory)  # one decoder step over the memory
            return memory, self.cbam(image), context

    model = Net().eval()
    tokens, image = torch.randn(2, 5, 16), torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        plain = model(tokens, image)
        with capture(model) as rec:
            captured = model(tokens, image)
    assert all(torch.equal(a, b) for a, b in zip(plain, captured, strict=True))
    kinds = {(r.name, r.kind) for r in rec}
    assert ("encoder.layers.0.self_attn", "attention") in kinds and ("encoder.layers.1.self_attn", "attention") in kinds
    assert {k for _, k in kinds} == {"attention", "channel", "spatial"}
    assert any(name.startswith("cbam") and kind == "spatial" for name, kind in kinds)
    with torch.no_grad(), capture(model, "encoder.layers.*") as enc:
        model(tokens, image)
    assert enc.stack().shape == (2, 2, 4, 5, 5)
    mha = MultiHeadAttention(16, 4).eval()  # need_weights=True and capture agree
    with torch.no_grad(), capture(mha) as one:
        _, weights = mha(tokens, need_weights=True)
    assert torch.equal(one[0].tensor, weights)
