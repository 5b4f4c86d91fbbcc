"""Metrics of dense and continuous outputs: regression (MAE, RMSE, R², Pearson r, relative error),
segmentation (per-class Dice and IoU; the mmsegmentation-style report with bootstrap CIs and its table)
and landmarks (radial errors, success rates). The first two are also exported by ``util.metrics``.
"""
from __future__ import annotations

from typing import Any, Sequence

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


# --------------------------------------------------------------------------------------------------
# Segmentation report (the mmsegmentation table plus Dice and bootstrap CIs over images)
# --------------------------------------------------------------------------------------------------

def _image_confusions(pred: np.ndarray, true: np.ndarray, C: int) -> np.ndarray:
    """(N, C*C) per-image confusion counts, row = true class, column = predicted class."""
    n = pred.shape[0]
    out = np.empty((n, C * C), np.int64)
    for i in range(n):
        out[i] = np.bincount(true[i].ravel().astype(np.int64) * C + pred[i].ravel().astype(np.int64),
                             minlength=C * C)
    return out


def _class_scores(cm: np.ndarray, empty_value: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU, Dice, Acc per class of confusion matrices (..., C, C). IoU/Dice of a class absent from both
    prediction and truth are `empty_value` (1: perfect agreement, for one image; NaN: not measured, for a
    pooled split); Acc (= TP / true pixels, mmsegmentation's per-class accuracy) is NaN for a class without
    true pixels."""
    cm = cm.astype(np.float64)
    inter = np.diagonal(cm, axis1=-2, axis2=-1)
    psum, tsum = cm.sum(-2), cm.sum(-1)
    empty = (psum + tsum) == 0
    iou = np.where(empty, empty_value, _safe_div(inter, psum + tsum - inter))
    dice = np.where(empty, empty_value, _safe_div(2 * inter, psum + tsum))
    acc = np.full(inter.shape, np.nan)
    np.divide(inter, tsum, out=acc, where=tsum > 0)
    return iou, dice, acc


def segmentation_report(pred: Any, true: Any, class_names: Sequence[str], n_boot: int = 1000,
                        seed: int = 0) -> dict[str, Any]:
    """Per-class IoU, Dice and Acc and their means, as mmsegmentation reports them, with 95% bootstrap CIs.

    `pred`, `true`: (N, H, W) (or one (H, W)) integer class maps; classes = len(class_names) (a one-logit
    binary model gives 0/1 maps: name two classes). Counts are pooled over all images (mmsegmentation's
    way): IoU = TP/(TP+FP+FN), Dice = 2TP/(2TP+FP+FN), Acc = TP/(TP+FN); a class absent from both
    prediction and truth in the whole split is not measured: its IoU/Dice/Acc are None and left out of the
    means (mmsegmentation's nan-mean), so naming more classes than the data has cannot lift mIoU; its name is
    listed in `absent_classes`. mIoU / mDice / mAcc: class means (background included, as mmsegmentation
    prints); aAcc: pixel accuracy. Per image (image_mean_*), a class absent from both scores 1.
    mIoU_ci / mDice_ci: percentile bootstrap (n_boot resamples of the images, seeded). image_mean_dice(_fg):
    Dice per image then averaged over images and classes (all classes / foreground only, VisionFM's Dice).
    """
    p, t = _to_numpy(pred), _to_numpy(true)
    if p.ndim == 2:
        p, t = p[None], t[None]
    if p.shape != t.shape or p.ndim != 3 or p.shape[0] == 0:
        raise ValueError(f"pred and true must be (N, H, W) maps of one shape, got {p.shape} and {t.shape}")
    C = len(class_names)
    if C < 2:
        raise ValueError("name at least two classes (background and foreground)")
    for name, a in (("pred", p), ("true", t)):
        if a.size and (a.min() < 0 or a.max() >= C):
            raise ValueError(f"{name} mask values must lie in [0, {C - 1}] for {C} classes")
    cms = _image_confusions(p, t, C)
    cm = cms.sum(0).reshape(C, C)
    iou, dice, acc = _class_scores(cm, empty_value=np.nan)
    per_iou, per_dice, _ = _class_scores(cms.reshape(-1, C, C))
    absent = [str(class_names[c]) for c in range(C) if not np.isfinite(iou[c])]

    out: dict[str, Any] = {
        "num_images": int(p.shape[0]), "num_classes": C, "class_names": [str(c) for c in class_names],
        "iou_per_class": _pylist(iou), "dice_per_class": _pylist(dice), "acc_per_class": _pylist(acc),
        "pixels_per_class": [int(v) for v in cm.sum(1)],
        "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else None,
        "mDice": float(np.nanmean(dice)) if np.isfinite(dice).any() else None, "absent_classes": absent,
        "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else None,
        "aAcc": float(np.trace(cm) / cm.sum()) if cm.sum() else None,
        "image_mean_iou": float(per_iou.mean()), "image_mean_dice": float(per_dice.mean()),
        "image_mean_iou_fg": float(per_iou[:, 1:].mean()), "image_mean_dice_fg": float(per_dice[:, 1:].mean()),
        "n_boot": int(n_boot), "ci_level": 0.95,
    }
    if n_boot > 0:
        from util.metric_bootstrap import bootstrap_weights
        m_iou, m_dice = [], []
        for W in bootstrap_weights([np.arange(p.shape[0])], p.shape[0], int(n_boot), seed):
            b_iou, b_dice, _ = _class_scores((W @ cms).reshape(-1, C, C), empty_value=np.nan)
            m_iou.append(np.nanmean(b_iou, axis=-1))
            m_dice.append(np.nanmean(b_dice, axis=-1))
        for key, vals in (("mIoU_ci", m_iou), ("mDice_ci", m_dice)):
            lo, hi = np.percentile(np.concatenate(vals), [2.5, 97.5])
            out[key] = [float(lo), float(hi)]
    else:
        out["mIoU_ci"] = out["mDice_ci"] = None
    return out


def _pct(v: Any, digits: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{100.0 * v:.{digits}f}"


def seg_table_markdown(report: dict[str, Any], digits: int = 2) -> str:
    """The per-class table in DeblurringMAE's (mmsegmentation's) format `| Class | IoU | Acc |` in percent,
    with a Dice column, a mean row, and a line giving aAcc and the bootstrap CIs of mIoU and mDice."""
    lines = ["| Class | IoU | Acc | Dice |", "|---|---|---|---|"]
    for name, i, a, d in zip(report["class_names"], report["iou_per_class"], report["acc_per_class"],
                             report["dice_per_class"]):
        lines.append(f"| {name} | {_pct(i, digits)} | {_pct(a, digits)} | {_pct(d, digits)} |")
    lines.append(f"| mean | {_pct(report['mIoU'], digits)} | {_pct(report['mAcc'], digits)} | "
                 f"{_pct(report['mDice'], digits)} |")
    tail = f"aAcc {_pct(report['aAcc'], digits)}"
    for key, label in (("mIoU_ci", "mIoU"), ("mDice_ci", "mDice")):
        ci = report.get(key)
        if ci:
            tail += f"; {label} 95% CI [{_pct(ci[0], digits)}, {_pct(ci[1], digits)}]"
    n = report.get("num_images")
    if report.get("mIoU_ci"):
        tail += f" (bootstrap over {n} images, {report['n_boot']} resamples)"
    return "\n".join(lines) + "\n\n" + tail + "\n"


# --------------------------------------------------------------------------------------------------
# Landmarks
# --------------------------------------------------------------------------------------------------

def landmark_metrics(pred: Any, true: Any, pixel_spacing: float | None = None,
                     radii: Sequence[float] = (2.0, 4.0, 8.0), names: Sequence[str] | None = None) -> dict[str, Any]:
    """Radial errors of predicted landmarks (N, K, 2) (x, y) against the truth, in pixels of the input.

    A true point with a NaN coordinate (absent landmark) is skipped. Keys: n_points, n_absent, mre_px and
    sd_px (mean and population standard deviation of the Euclidean distance over all points, VisionFM's
    MRE), median_px, sdr (success rate: fraction of points within r px, keyed by f'{r:g}'), per_landmark
    (name, n, mre_px, sd_px, sdr); with `pixel_spacing` (mm per pixel of the input) also mre_mm, sd_mm and
    each landmark's mre_mm. A landmark never present has n 0 and None values.
    """
    p = _to_numpy(pred).astype(np.float64)
    t = _to_numpy(true).astype(np.float64)
    if p.ndim == 2:
        p, t = p[None], t[None]
    if p.shape != t.shape or p.ndim != 3 or p.shape[-1] != 2:
        raise ValueError(f"pred and true must be (N, K, 2) of one shape, got {p.shape} and {t.shape}")
    K = p.shape[1]
    names = [str(n) for n in names] if names is not None else [f"landmark_{k}" for k in range(K)]
    if len(names) != K:
        raise ValueError(f"{len(names)} names for {K} landmarks")
    if pixel_spacing is not None and not (np.isfinite(pixel_spacing) and pixel_spacing > 0):
        raise ValueError(f"pixel_spacing must be a positive number of mm per pixel, got {pixel_spacing}")
    valid = np.isfinite(t).all(-1)
    if not np.isfinite(p[valid]).all():
        raise ValueError("a prediction is NaN or infinite where the true landmark is present")
    dist = np.where(valid, np.linalg.norm(np.where(valid[..., None], p - t, 0.0), axis=-1), np.nan)

    def summary(d: np.ndarray) -> dict[str, Any]:
        d = d[np.isfinite(d)]
        if d.size == 0:
            return {"n": 0, "mre_px": None, "sd_px": None, "sdr": {f"{r:g}": None for r in radii}}
        s = {"n": int(d.size), "mre_px": float(d.mean()), "sd_px": float(d.std()),
             "sdr": {f"{r:g}": float((d <= r).mean()) for r in radii}}
        if pixel_spacing is not None:
            s["mre_mm"] = float(d.mean() * pixel_spacing)
            s["sd_mm"] = float(d.std() * pixel_spacing)
        return s

    overall = summary(dist.ravel())
    out: dict[str, Any] = {"n_points": overall.pop("n"), "n_absent": int((~valid).sum()), **overall,
                           "median_px": float(np.nanmedian(dist)) if valid.any() else None,
                           "radii_px": [float(r) for r in radii], "pixel_spacing": pixel_spacing,
                           "per_landmark": [{"name": names[k], **summary(dist[:, k])} for k in range(K)]}
    return out


def landmark_table_markdown(metrics: dict[str, Any], digits: int = 2) -> str:
    """`| Landmark | n | MRE (px) | SD (px) | SDR@r ... | [MRE (mm)] |` per landmark and an 'all' row."""
    radii = [f"{r:g}" for r in metrics["radii_px"]]
    mm = metrics.get("pixel_spacing") is not None
    head = ["Landmark", "n", "MRE (px)", "SD (px)"] + [f"SDR@{r}px (%)" for r in radii] + (["MRE (mm)"] if mm else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v: Any, scale: float = 1.0) -> str:
        return "n/a" if v is None else f"{scale * v:.{digits}f}"

    rows = [dict(m) for m in metrics["per_landmark"]]
    rows.append({"name": "all", "n": metrics["n_points"], "mre_px": metrics["mre_px"], "sd_px": metrics["sd_px"],
                 "sdr": metrics["sdr"], "mre_mm": metrics.get("mre_mm")})
    for m in rows:
        cells = [m["name"], str(m["n"]), fmt(m["mre_px"]), fmt(m["sd_px"])]
        cells += [fmt(m["sdr"][r], 100.0) for r in radii] + ([fmt(m.get("mre_mm"))] if mm else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
