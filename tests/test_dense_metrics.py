"""Dense-prediction metrics (util.metric_dense: segmentation_report, seg_table_markdown, landmark_metrics)
checked against values computed by hand, and the overlay pictures (util.dense_vis)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from util.metric_dense import landmark_metrics, landmark_table_markdown, seg_table_markdown, segmentation_report

NAMES = ["background", "nodule"]


def test_segmentation_report_hand_values() -> None:
    # image 0 (2x3): truth 1 1 0 / 0 0 0, prediction 1 0 0 / 0 0 1 -> TP 1, FN 1, FP 1 for the nodule
    t0 = np.array([[1, 1, 0], [0, 0, 0]])
    p0 = np.array([[1, 0, 0], [0, 0, 1]])
    # image 1: nodule in neither (empty both), all background right
    t1 = np.zeros((2, 3), int)
    p1 = np.zeros((2, 3), int)
    r = segmentation_report(np.stack([p0, p1]), np.stack([t0, t1]), NAMES, n_boot=200)
    # pooled nodule: TP 1, FP 1, FN 1 -> IoU 1/3, Dice 2/4, Acc 1/2
    assert r["iou_per_class"][1] == pytest.approx(1 / 3)
    assert r["dice_per_class"][1] == pytest.approx(0.5)
    assert r["acc_per_class"][1] == pytest.approx(0.5)
    # pooled background: true 10 px, predicted 10 px, TP 9 -> IoU 9/11, Dice 18/20, Acc 9/10
    assert r["iou_per_class"][0] == pytest.approx(9 / 11)
    assert r["dice_per_class"][0] == pytest.approx(0.9)
    assert r["acc_per_class"][0] == pytest.approx(0.9)
    assert r["mIoU"] == pytest.approx((9 / 11 + 1 / 3) / 2)
    assert r["mDice"] == pytest.approx(0.7)
    assert r["mAcc"] == pytest.approx(0.7)
    assert r["aAcc"] == pytest.approx(10 / 12)
    assert r["pixels_per_class"] == [10, 2]
    # per image: image 0 nodule Dice 0.5, image 1 nodule empty in both -> 1 by definition
    assert r["image_mean_dice_fg"] == pytest.approx((0.5 + 1.0) / 2)
    assert r["image_mean_iou_fg"] == pytest.approx((1 / 3 + 1.0) / 2)
    # background Dice per image: image 0: 2*3/(4+4)... truth bg 4, pred bg 4, TP 3 -> 0.75; image 1: 1
    assert r["image_mean_dice"] == pytest.approx((0.75 + 1.0 + 0.5 + 1.0) / 4)


def test_class_absent_from_the_split_is_not_measured() -> None:
    """A class in neither truth nor prediction of the whole split has no IoU/Dice/Acc (mmseg's nan-mean), so
    naming more classes than the data holds cannot lift mIoU; per image, such a class still scores 1."""
    z = np.zeros((2, 4, 4), int)
    r = segmentation_report(z, z, NAMES, n_boot=50)
    assert r["iou_per_class"] == [1.0, None] and r["dice_per_class"] == [1.0, None]
    assert r["acc_per_class"] == [1.0, None] and r["absent_classes"] == ["nodule"]
    assert r["mIoU"] == 1.0 and r["mDice"] == 1.0 and r["mAcc"] == 1.0 and r["aAcc"] == 1.0
    assert r["image_mean_iou"] == 1.0
    assert "| nodule | n/a | n/a | n/a |" in seg_table_markdown(r)
    # a third, never-seen class leaves mIoU where two classes put it
    rng = np.random.default_rng(1)
    true = (rng.random((4, 8, 8)) > 0.7).astype(int)
    pred = np.where(rng.random((4, 8, 8)) > 0.9, 1 - true, true)
    two = segmentation_report(pred, true, NAMES, n_boot=100)
    three = segmentation_report(pred, true, [*NAMES, "cyst"], n_boot=100)
    assert three["mIoU"] == pytest.approx(two["mIoU"]) and three["mDice"] == pytest.approx(two["mDice"])
    assert three["mIoU_ci"] == pytest.approx(two["mIoU_ci"]) and three["absent_classes"] == ["cyst"]


def test_bootstrap_ci_contains_point_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    true = np.zeros((30, 16, 16), int)
    for i in range(30):
        r0, c0 = rng.integers(2, 8, 2)
        true[i, r0:r0 + 6, c0:c0 + 6] = 1
    pred = true.copy()
    noise = rng.random(true.shape) < rng.uniform(0.02, 0.2, (30, 1, 1))  # images differ in quality
    pred[noise] = 1 - pred[noise]
    r = segmentation_report(pred, true, NAMES, n_boot=300, seed=3)
    for key, ci in (("mIoU", r["mIoU_ci"]), ("mDice", r["mDice_ci"])):
        assert ci[0] < r[key] < ci[1], (key, ci, r[key])
        assert ci[1] - ci[0] > 1e-3
    assert segmentation_report(pred, true, NAMES, n_boot=300, seed=3)["mIoU_ci"] == r["mIoU_ci"]
    assert r["n_boot"] == 300 and r["ci_level"] == 0.95


def test_seg_table_format() -> None:
    t = np.array([[[0, 1], [1, 1]]])
    p = np.array([[[0, 1], [0, 1]]])
    r = segmentation_report(p, t, NAMES, n_boot=20)
    table = seg_table_markdown(r)
    lines = table.splitlines()
    assert lines[0] == "| Class | IoU | Acc | Dice |"
    # background: TP 1, FP 1, FN 0 -> IoU 50, Acc 100, Dice 66.67; nodule: TP 2, FN 1 -> IoU 66.67, Acc 66.67, Dice 80
    assert lines[2] == "| background | 50.00 | 100.00 | 66.67 |"
    assert lines[3] == "| nodule | 66.67 | 66.67 | 80.00 |"
    assert lines[4].startswith("| mean | 58.33 | 83.33 | 73.33 |")
    assert "aAcc 75.00" in table and "mIoU 95% CI [" in table


def test_segmentation_report_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same|shape"):
        segmentation_report(np.zeros((1, 2, 2), int), np.zeros((1, 2, 3), int), NAMES)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        segmentation_report(np.full((1, 2, 2), 2), np.zeros((1, 2, 2), int), NAMES)


def test_landmark_metrics_hand_values() -> None:
    true = np.array([[[0.0, 0.0], [10.0, 10.0]],
                     [[5.0, 5.0], [np.nan, np.nan]]])
    pred = np.array([[[3.0, 4.0], [10.0, 11.0]],   # errors 5, 1
                     [[5.0, 5.0], [50.0, 50.0]]])  # error 0, absent (skipped)
    m = landmark_metrics(pred, true, pixel_spacing=0.5, radii=(1.0, 4.0), names=["a", "b"])
    assert m["n_points"] == 3 and m["n_absent"] == 1
    assert m["mre_px"] == pytest.approx(2.0)
    assert m["sd_px"] == pytest.approx(math.sqrt(((5 - 2) ** 2 + (1 - 2) ** 2 + (0 - 2) ** 2) / 3))
    assert m["median_px"] == pytest.approx(1.0)
    assert m["sdr"] == {"1": pytest.approx(2 / 3), "4": pytest.approx(2 / 3)}
    assert m["mre_mm"] == pytest.approx(1.0)
    a, b = m["per_landmark"]
    assert (a["name"], a["n"], a["mre_px"], a["sdr"]["4"]) == ("a", 2, pytest.approx(2.5), 0.5)
    assert (b["name"], b["n"], b["mre_px"], b["sdr"]["1"]) == ("b", 1, pytest.approx(1.0), 1.0)
    assert b["mre_mm"] == pytest.approx(0.5)
    table = landmark_table_markdown(m)
    assert table.splitlines()[0] == "| Landmark | n | MRE (px) | SD (px) | SDR@1px (%) | SDR@4px (%) | MRE (mm) |"
    assert "| all | 3 | 2.00 |" in table


def test_landmark_metrics_never_present_and_errors() -> None:
    true = np.full((2, 1, 2), np.nan)
    m = landmark_metrics(np.zeros((2, 1, 2)), true)
    assert m["n_points"] == 0 and m["mre_px"] is None and m["per_landmark"][0]["n"] == 0
    with pytest.raises(ValueError, match="NaN"):
        landmark_metrics(np.full((1, 1, 2), np.nan), np.zeros((1, 1, 2)))
    with pytest.raises(ValueError, match="pixel_spacing"):
        landmark_metrics(np.zeros((1, 1, 2)), np.zeros((1, 1, 2)), pixel_spacing=0)


def test_overlay_pictures(tmp_path) -> None:
    from util.dense_vis import landmark_overlay_png, seg_overlay_png
    imgs = np.full((3, 32, 32, 3), 60, np.uint8)
    true = np.zeros((3, 32, 32), int)
    true[:, 8:20, 8:20] = 1
    pred = np.roll(true, 4, axis=2)
    seg_overlay_png(imgs, pred, true, str(tmp_path / "seg.png"), NAMES, cols=2)
    a = np.asarray(Image.open(tmp_path / "seg.png").convert("RGB"))
    green = np.all(a == (0, 230, 0), -1).sum()
    red = np.all(a == (255, 40, 40), -1).sum()
    assert green > 100 and red > 100  # both outlines drawn
    pts = np.array([[[10.0, 10.0], [20.0, 25.0]]] * 3)
    landmark_overlay_png(imgs, pts + 2, pts, str(tmp_path / "lm.png"), names=["x", "y"])
    b = np.asarray(Image.open(tmp_path / "lm.png").convert("RGB"))
    assert np.all(b == (0, 230, 0), -1).sum() > 20 and np.all(b == (255, 40, 40), -1).sum() > 20
    with pytest.raises(ValueError):
        seg_overlay_png(imgs, pred[:2], true, str(tmp_path / "bad.png"), NAMES)
