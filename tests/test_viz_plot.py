"""attnkit.viz.plot and attnkit.viz.rollout: pictures checked for content, rollout against hand-computed values."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torch import nn

from attnkit.layers import GateTap
from attnkit.viz import attention_rollout, capture
from attnkit.viz.plot import (
    alignment,
    channel_gate_bars,
    font_families,
    glimpse_path,
    head_grid,
    heatmap,
    image_overlay,
    token_bars,
)


def _labels(ticks) -> list[str]:
    return [t.get_text() for t in ticks]


def _png(path) -> np.ndarray:
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    colours = np.unique(img.reshape(-1, img.shape[-1]).round(3), axis=0)
    assert len(colours) > 20  # drawn content, not a blank canvas
    return img


# ---- rollout -------------------------------------------------------------------------------------------------


def test_rollout_hand_computed():
    a1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    a2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    stack = torch.stack([a1, a2])[:, None]  # (layers=2, H=1, L=2, L=2)
    # residual: A1' = [[1, 0], [.25, .75]], A2' = [[.5, .5], [.5, .5]]; rollout = A2' @ A1'
    expected = torch.tensor([[0.625, 0.375], [0.625, 0.375]])
    torch.testing.assert_close(attention_rollout(stack), expected)
    # without the residual correction: A2 @ A1
    torch.testing.assert_close(attention_rollout(stack, residual=False), torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    # start_layer=1: only A2'
    torch.testing.assert_close(attention_rollout(stack, start_layer=1), torch.full((2, 2), 0.5))


def test_rollout_head_fusion_and_masked_rows():
    heads = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.3, 0.7], [0.6, 0.4]]])[None, None]  # (1, B=1, H=2, 2, 2)
    got = attention_rollout(heads, head_reduce="max")[0]
    fused = torch.tensor([[0.95, 0.35], [0.3, 0.9]])  # 0.5 * max + 0.5 * I
    torch.testing.assert_close(got, fused / fused.sum(-1, keepdim=True))
    torch.testing.assert_close(attention_rollout(heads)[0], torch.tensor([[0.8, 0.2], [0.2, 0.8]]))  # mean
    masked = torch.tensor([[[0.0, 0.0], [0.5, 0.5]]])[None]  # a fully masked row (zeros) in layer 0
    torch.testing.assert_close(attention_rollout(masked), torch.tensor([[1.0, 0.0], [0.25, 0.75]]))
    maps = torch.softmax(torch.randn(4, 3, 2, 5, 5), -1)
    r = attention_rollout(maps)
    assert r.shape == (3, 5, 5) and r.dtype == torch.float32
    torch.testing.assert_close(r.sum(-1), torch.ones(3, 5))
    with pytest.raises(ValueError, match="square"):
        attention_rollout(torch.rand(2, 1, 1, 3, 4))
    with pytest.raises(ValueError, match="head_reduce"):
        attention_rollout(maps, head_reduce="median")


# ---- plots ---------------------------------------------------------------------------------------------------


def test_heatmap_labels_values_and_files(tmp_path):
    w = torch.softmax(torch.randn(4, 4), -1)
    tokens = ["[CLS]", "我", "爱", "猫"]
    fig = heatmap(w, tokens, title="layer 0 head 3", save=tmp_path / "h.png")
    ax = fig.axes[0]
    assert _labels(ax.get_xticklabels()) == tokens and _labels(ax.get_yticklabels()) == tokens
    np.testing.assert_allclose(ax.images[0].get_array(), w.numpy(), rtol=1e-6)
    assert ax.get_title() == "layer 0 head 3"
    _png(tmp_path / "h.png")
    heatmap(w, tokens, save=tmp_path / "h.svg")
    assert "<svg" in (tmp_path / "h.svg").read_text()[:2000]
    with pytest.raises(ValueError, match="expected 4 x_tokens"):
        heatmap(w, tokens[:3])
    with pytest.raises(ValueError, match="ending in one of"):
        heatmap(w, tokens, save=tmp_path / "h.bmp")


def test_cjk_tokens_render_with_an_installed_font(tmp_path):
    families = font_families()
    assert families[0] == "DejaVu Sans"
    if len(families) == 1:
        pytest.skip("no CJK font installed (Debian: fonts-noto-cjk): CJK glyphs fall back to boxes")
    fig = heatmap(torch.eye(3), ["北京", "天安门", "猫"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph would warn
        fig.savefig(tmp_path / "cjk.png")
    _png(tmp_path / "cjk.png")


def test_head_grid_tiles_and_labels(tmp_path):
    stack = torch.softmax(torch.randn(2, 2, 3, 4, 5), -1)  # (layers, B, H, L, S)
    q, k = ["a", "b", "c", "d"], ["v", "w", "x", "y", "z"]
    fig = head_grid(stack, q, key_tokens=k, batch=1, layer_names=["enc 0", "enc 1"], save=tmp_path / "g.png")
    ax = fig.axes[0]
    assert _labels(ax.get_yticklabels()) == q * 2 and _labels(ax.get_xticklabels()) == k * 3
    assert [t.get_text() for t in ax.texts] == ["head 0", "head 1", "head 2", "enc 0", "enc 1"]
    tiles = np.ma.getdata(ax.images[0].get_array())
    gap = 1
    np.testing.assert_allclose(tiles[:4, :5], stack[0, 1, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(tiles[4 + gap :, 2 * (5 + gap) :], stack[1, 1, 2].numpy(), rtol=1e-6)
    _png(tmp_path / "g.png")
    small = head_grid(torch.softmax(torch.randn(1, 1, 2, 80, 80), -1), [str(i) for i in range(80)])
    assert _labels(small.axes[0].get_yticklabels()) == []  # labels that would not fit are left out


def test_alignment_source_on_top():
    fig = alignment(torch.eye(3)[[0, 2, 1]], ["la", "maison", "bleue"], ["the", "blue", "house"], title="fr-en")
    ax = fig.axes[0]
    assert _labels(ax.get_xticklabels()) == ["la", "maison", "bleue"]
    assert _labels(ax.get_yticklabels()) == ["the", "blue", "house"]
    assert ax.xaxis.get_ticks_position() == "top"


def test_image_overlay_panels_and_extent(tmp_path):
    image = torch.rand(3, 32, 48)  # (C, H, W)
    maps = torch.softmax(torch.randn(3, 12), -1).view(3, 3, 4)
    fig = image_overlay(image, maps, titles=["a", "dog", "runs"], save=tmp_path / "o.png")
    assert [ax.get_title() for ax in fig.axes] == ["image", "a", "dog", "runs"]
    assert fig.axes[0].images[0].get_array().shape == (32, 48, 3)
    overlay = fig.axes[2].images[1]
    assert overlay.get_array().shape == (3, 4) and overlay.get_extent() == [-0.5, 47.5, 31.5, -0.5]
    np.testing.assert_allclose(overlay.get_array(), maps[1].numpy(), rtol=1e-6)
    _png(tmp_path / "o.png")
    one = image_overlay(np.random.rand(28, 28) * 255, torch.rand(1, 1, 7, 7), show_image=False)
    assert len(one.axes) == 1 and one.axes[0].images[0].get_array().max() <= 1.0
    with pytest.raises(ValueError, match="expected 3 titles"):
        image_overlay(image, maps, titles=["a"])


def test_glimpse_path_coordinates(tmp_path):
    loc = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]])  # normalised (x, y)
    fig = glimpse_path(torch.rand(28, 40), loc, size=6, scales=2, save=tmp_path / "p.png")
    ax = fig.axes[0]
    xs, ys = ax.lines[0].get_data()
    np.testing.assert_allclose(xs, [-0.5, 19.5, 39.5])
    np.testing.assert_allclose(ys, [-0.5, 13.5, 27.5])
    assert len(ax.patches) == 6 and {p.get_width() for p in ax.patches} == {6, 12}
    assert [t.get_text() for t in ax.texts if t.get_text()] == ["1", "2", "3"]  # arrows are empty annotations
    _png(tmp_path / "p.png")
    px = glimpse_path(torch.rand(10, 10), [[2, 3], [7, 8]], coords="pixels")
    np.testing.assert_allclose(px.axes[0].lines[0].get_xydata(), [[2, 3], [7, 8]])


def test_channel_gate_bars_from_a_capture(tmp_path):
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.gate = GateTap("channel")

        def forward(self, x):
            return x * self.gate(self.fc(x.mean((2, 3))))[:, :, None, None]

    model = nn.Sequential(SE(), SE())
    x = torch.randn(2, 8, 4, 4)
    with capture(model) as rec:
        model(x)
    fig = channel_gate_bars(rec, batch=1, sort=True, save=tmp_path / "c.png")
    assert [ax.get_title() for ax in fig.axes] == ["0", "1"]
    heights = [p.get_height() for p in fig.axes[0].patches]
    gate = rec.gates()[0].tensor[1]
    np.testing.assert_allclose(heights, np.sort(gate.numpy())[::-1], rtol=1e-6)
    assert _labels(fig.axes[0].get_xticklabels()) == [str(i) for i in torch.argsort(-gate).tolist()]
    _png(tmp_path / "c.png")
    with pytest.raises(ValueError, match="spatial gates"):
        channel_gate_bars(torch.rand(1, 1, 4, 4))


def test_token_bars():
    fig = token_bars(torch.tensor([0.1, 0.7, 0.2]), ["我", "爱", "你"], highlight=1, title="rollout")
    ax = fig.axes[0]
    assert _labels(ax.get_xticklabels()) == ["我", "爱", "你"]
    np.testing.assert_allclose([p.get_height() for p in ax.patches], [0.1, 0.7, 0.2], rtol=1e-6)
