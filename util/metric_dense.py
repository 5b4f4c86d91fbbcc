"""Metrics of dense and continuous outputs: regression (MAE, RMSE, R², Pearson r, relative error) and
segmentation (per-class Dice and IoU). Import them through ``util.metrics``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from util.metric_base import _pylist, _safe_div, _to_numpy


def regression_metrics(y_true: Any, y_pred: Any) -> dict[str, Any]:
    """MAE, RMSE, R², Pearson r and VisionFM's relative error for (N,) or (N, T) targets.

    Keys: n, mae, rmse, r2, pearson_r, relative_error (mean over targets of
    mean|pred - y| / mean(y)); multi-target adds ``*_per_target`` lists. R²/r of a target
    are None when y (or pred, for r) is constant; multi-target values average the defined ones.
    """
    y = _to_numpy(y_true).astype(np.float64)
    p = _to_numpy(y_pred).astype(np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if p.ndim == 1:
        p = p[:, None]
    if y.shape != p.shape or y.ndim != 2 or y.shape[0] == 0:
        raise ValueError(f"y_true and y_pred must have the same (N,) or (N, T) shape, got {y.shape} and {p.shape}")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(p))):
        raise ValueError("regression inputs contain NaN or inf")
    err = p - y
    mae_t = np.abs(err).mean(0)
    ss_res = (err**2).sum(0)
    yc, pc = y - y.mean(0), p - p.mean(0)
    ss_tot = (yc**2).sum(0)
    r2_t = np.full(y.shape[1], np.nan)
    np.divide(ss_res, ss_tot, out=r2_t, where=ss_tot > 0)
    r2_t = 1.0 - r2_t
    den = np.sqrt(ss_tot * (pc**2).sum(0))
    r_t = np.full(y.shape[1], np.nan)
    np.divide((yc * pc).sum(0), den, out=r_t, where=den > 0)
    ymean = y.mean(0)
    rel_t = np.full(y.shape[1], np.nan)
    np.divide(mae_t, ymean, out=rel_t, where=ymean != 0)

    def mean_defined(a: np.ndarray) -> float | None:
        a = a[np.isfinite(a)]
        return float(a.mean()) if a.size else None

    out: dict[str, Any] = {
        "n": int(y.shape[0]),
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "r2": mean_defined(r2_t),
        "pearson_r": mean_defined(r_t),
        "relative_error": mean_defined(rel_t),
    }
    if y.shape[1] > 1:
        out["mae_per_target"] = _pylist(mae_t)
        out["r2_per_target"] = _pylist(r2_t)
        out["pearson_r_per_target"] = _pylist(r_t)
        out["relative_error_per_target"] = _pylist(rel_t)
    return out


def _seg_counts(pred: np.ndarray, true: np.ndarray, C: int, ignore_index: int | None) -> np.ndarray:
    if ignore_index is not None:
        keep = true != ignore_index
        pred, true = pred[keep], true[keep]
    if pred.size and (min(pred.min(), true.min()) < 0 or max(pred.max(), true.max()) >= C):
        raise ValueError(f"mask values must lie in [0, {C - 1}]")
    return np.bincount(true.astype(np.int64) * C + pred.astype(np.int64), minlength=C * C).reshape(C, C)


def _dice_iou(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inter = np.diag(cm).astype(np.float64)
    psum, tsum = cm.sum(0).astype(np.float64), cm.sum(1).astype(np.float64)
    empty = (psum + tsum) == 0
    # both masks empty -> perfect agreement (1.0) by definition, not a forced TP count
    dice = np.where(empty, 1.0, _safe_div(2 * inter, psum + tsum))
    iou = np.where(empty, 1.0, _safe_div(inter, psum + tsum - inter))
    return dice, iou


def segmentation_metrics(
    pred_mask: Any, true_mask: Any, num_classes: int, per_image: bool = False, ignore_index: int | None = None
) -> dict[str, Any]:
    """Per-class Dice and IoU of integer label maps (any shape, e.g. (H, W) or (N, H, W)).

    Counts are pooled over all pixels unless ``per_image`` (then the first axis indexes images
    and per-class scores are averaged over images). A class empty in both masks scores 1.0.
    Keys: dice_per_class, iou_per_class, dice_mean, iou_mean (all classes), dice_mean_fg,
    iou_mean_fg (excluding class 0 = background; None if num_classes == 1), pixel_accuracy.
    """
    pred = _to_numpy(pred_mask)
    true = _to_numpy(true_mask)
    if pred.shape != true.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {true.shape}")
    C = int(num_classes)
    if per_image:
        cms = [_seg_counts(pred[i].ravel(), true[i].ravel(), C, ignore_index) for i in range(pred.shape[0])]
        di = [_dice_iou(cm) for cm in cms]
        dice = np.mean([d for d, _ in di], axis=0)
        iou = np.mean([i for _, i in di], axis=0)
        cm = np.sum(cms, axis=0)
    else:
        cm = _seg_counts(pred.ravel(), true.ravel(), C, ignore_index)
        dice, iou = _dice_iou(cm)
    total = cm.sum()
    return {
        "num_classes": C,
        "dice_per_class": _pylist(dice),
        "iou_per_class": _pylist(iou),
        "dice_mean": float(dice.mean()),
        "iou_mean": float(iou.mean()),
        "dice_mean_fg": float(dice[1:].mean()) if C > 1 else None,
        "iou_mean_fg": float(iou[1:].mean()) if C > 1 else None,
        "pixel_accuracy": float(np.trace(cm) / total) if total else None,
    }
