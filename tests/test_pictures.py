"""Pictures a user reads without a manual: reconstruction figure titles, explanation figures (size,
title, colour bar) and ROC / confusion-matrix plots (bootstrap band, CIs, split and checkpoint)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import util.metrics as M
from util.metric_plots import plot_caption, roc_band, weighted_roc_on_grid
from util.vis import (PASTED, RAW_ALL_TRAINED, RAW_UNTRAINED, explanation_figure, explanation_title, format_prob,
                      masked_title, panel_grid, reconstruction_columns, reconstruction_grid, reconstruction_title)


def _views(n: int = 1, size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(n, 3, size, size, generator=g) for k in ("input", "target", "masked", "recon", "pasted")}


# ------------------------------------------------------------------------------------- reconstructions
def test_reconstruction_columns_say_what_each_column_is():
    out = _views()
    cols = reconstruction_columns(out, 0.75)
    assert list(cols) == ["original", "masked input (75% hidden)", "reconstruction + visible",
                          "raw prediction (visible patches not trained)"]
    assert cols[PASTED] is out["pasted"] and cols[RAW_UNTRAINED] is out["recon"] and cols["original"] is out["target"]
    deblur = reconstruction_columns(out, 0.5, loss_scope="all", blurred=True)
    assert list(deblur) == ["blurred input", "sharp original (target)", masked_title(0.5),
                            "reconstruction + sharp visible", RAW_ALL_TRAINED]
    assert deblur["blurred input"] is out["input"] and masked_title(0.85) == "masked input (85% hidden)"


def test_reconstruction_title_has_mask_ratio_loss_and_caveat():
    t = reconstruction_title(0.75, loss=0.01234, model="mae_vit_tiny_patch8", loss_label="loss on this image")
    assert "mae_vit_tiny_patch8" in t and "mask ratio 0.75" in t and "loss on this image 0.0123" in t
    assert "not trained" in t and PASTED in t
    deblur = reconstruction_title(0.75, loss=0.5, loss_scope="all")
    assert "not trained" not in deblur and "MSE on all patches" in deblur
    assert "loss" not in reconstruction_title(0.6).split("\n")[0]  # no loss given: none shown


def test_reconstruction_grid_layout_and_highlight():
    out = _views(n=2)
    grid = reconstruction_grid(out, [0.5] * 3, [0.25] * 3, 0.75, loss=0.2)
    assert grid.dtype == np.uint8 and grid.shape[1] == 4 * (32 * 5 + 2)  # 32 px panels magnified to >= 160
    assert 2 * (32 * 5 + 2) < grid.shape[0] < 2 * (32 * 5 + 2) + 140  # two image rows under the titles
    titles = grid[:grid.shape[0] - 2 * 162]  # heading and column titles, above the image rows
    blue = (titles[..., 2] > 140) & (titles[..., 0] < 40) & (titles[..., 1] < 100)
    cols = np.flatnonzero(blue.any(0))
    assert cols.size and cols.min() >= 2 * 162 and cols.max() < 3 * 162  # only the pasted column is blue
    plain = panel_grid({"a": out["target"]}, [0.5] * 3, [0.25] * 3, scale=1)
    assert plain.shape[1] == 34 and plain.shape[0] < 2 * 34 + 60


# ------------------------------------------------------------------------------------------ explanations
def test_explanation_title_names_method_class_and_probability():
    t = explanation_title("chefer", "lesion", 0.934, predicted="lesion", predicted_prob=0.934, image_name="a.png")
    assert t == "a.png: Chefer relevance for class 'lesion' (p = 0.93)"
    t = explanation_title("gradcam", "no_lesion", 0.2, predicted="lesion", predicted_prob=0.8)
    assert "Grad-CAM" in t and "'no_lesion' (p = 0.20)" in t and "predicted 'lesion' (p = 0.80)" in t
    t = explanation_title("rollout", None, None, predicted="lesion", predicted_prob=0.999)
    assert "attention rollout (class-agnostic)" in t and "predicted 'lesion' (p > 0.99)" in t
    assert format_prob(0.001) == "p < 0.01" and format_prob(0.5) == "p = 0.50"


def test_explanation_figure_is_readable_size_with_colour_bar():
    img = torch.zeros(3, 32, 32)
    heat = torch.linspace(0, 1, 16).view(4, 4)
    fig = explanation_figure(img, heat, "Chefer relevance for class 'x' (p = 0.90)", [0.5] * 3, [0.25] * 3,
                             method="chefer")
    h, w, _ = fig.shape
    assert fig.dtype == np.uint8 and 256 < h < 256 + 120 and 2 * 256 < w < 2 * 256 + 200
    right = fig[:, 2 * 256 + 20:]  # the colour bar: jet's dark red (top) and dark blue (bottom) ends
    assert ((right[..., 0] > 100) & (right[..., 1] < 40) & (right[..., 2] < 40)).any()
    assert ((right[..., 2] > 100) & (right[..., 0] < 40) & (right[..., 1] < 40)).any()
    big = explanation_figure(np.zeros((300, 300, 3), np.uint8), heat, "t", panel=300)
    assert big.shape[0] > 300 and big.shape[1] > 600  # inputs above 256 px keep their size


# -------------------------------------------------------------------------------------------- ROC / CM
def _binary(n: int = 160, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    s = np.clip(0.3 * y + rng.normal(0.4, 0.2, n), 0, 1)
    return y, np.stack([1 - s, s], 1)


def test_roc_band_brackets_the_curve_and_matches_bootstrap_ci():
    y, P = _binary()
    band = roc_band(y, P[:, 1], n_boot=300, seed=3)
    grid, tpr, low, high = band["grid"], band["tpr"], band["low"], band["high"]
    assert grid.shape == tpr.shape == low.shape == high.shape == (101,)
    assert np.all(low <= high) and np.mean((low <= tpr + 1e-9) & (tpr <= high + 1e-9)) > 0.95
    assert np.mean(high - low) > 0.02 and high[-1] == low[-1] == 1.0
    lo, hi = band["auroc_ci"]
    assert lo < band["auroc"] < hi and band["auroc"] == pytest.approx(M.classification_metrics(y, P)["auroc"])
    # the legend's interval is the metrics file's: same resamples as bootstrap_ci
    assert (lo, hi) == pytest.approx(M.bootstrap_ci(y, P, ["auroc"], n_boot=300, seed=3)["auroc"])
    assert roc_band(np.zeros(5), np.arange(5.0)) is None  # one class: undefined


def test_weighted_roc_on_grid_follows_the_step_curve():
    score = np.array([0.9, 0.8, 0.7, 0.6])
    pos = np.array([True, False, True, False])
    tpr = weighted_roc_on_grid(score, pos, np.ones((1, 4)), np.array([0.0, 0.5, 1.0]))[0]
    np.testing.assert_allclose(tpr, [0.5, 1.0, 1.0])  # upper point of each vertical segment
    W = np.array([[0.0, 1.0, 1.0, 1.0]])  # the top positive left out of the resample
    np.testing.assert_allclose(weighted_roc_on_grid(score, pos, W, np.array([0.0, 0.5]))[0], [0.0, 1.0])


def test_plot_roc_records_bands_titles_split_and_checkpoint(tmp_path):
    y, P = _binary()
    rec: dict = {}
    path = M.plot_roc(y, P, tmp_path / "roc.png", class_names=["neg", "pos"], split="test",
                      checkpoint="checkpoint-best.pth (epoch 3)", n_boot=200, record=rec)
    assert list(rec) == ["pos"] and rec["pos"]["low"] is not None
    with Image.open(path) as im:
        assert im.format == "PNG" and 600 < im.size[0] < 1400 and 600 < im.size[1] < 1400
    caption = plot_caption("ROC", "test", "checkpoint-best.pth (epoch 3)")
    assert caption == "ROC | test split | checkpoint-best.pth (epoch 3)"
    rng = np.random.default_rng(1)
    y3 = rng.integers(0, 3, 150)
    L = rng.normal(size=(150, 3))
    L[np.arange(150), y3] += 1.0
    P3 = np.exp(L) / np.exp(L).sum(1, keepdims=True)
    rec3: dict = {}
    M.plot_roc(y3, P3, tmp_path / "roc3.png", class_names=["a", "b", "c"], n_boot=200, seed=5, record=rec3)
    assert sorted(rec3) == ["a", "b", "c", "macro"]  # one-vs-rest per class, plus the macro interval
    assert rec3["macro"]["auroc_ci"] == pytest.approx(M.bootstrap_ci(y3, P3, ["auroc"], n_boot=200, seed=5)["auroc"])
    rec0: dict = {}
    M.plot_roc(y, P, tmp_path / "roc0.png", n_boot=0, record=rec0)
    assert rec0["1"]["low"] is None and rec0["1"]["auroc_ci"] == (None, None)


def test_confusion_matrix_png(tmp_path):
    for normalize in (True, False):
        p = M.plot_confusion_matrix([[8, 2], [1, 9]], tmp_path / f"cm{normalize}.png", class_names=["a", "b"],
                                    normalize=normalize, split="val", checkpoint="checkpoint-best.pth")
        with Image.open(p) as im:
            assert im.format == "PNG" and 400 < im.size[0] < 1400 and 400 < im.size[1] < 1400
