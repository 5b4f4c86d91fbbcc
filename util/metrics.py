"""The project's single metrics module (sklearn underneath).

Conventions
-----------
* ``y_true``: int array (N,) of class indices for single-label tasks (a one-hot
  (N, C) array is accepted too), or a (N, C) 0/1 array for multi-label tasks
  (pass ``multilabel=True``).
* ``probs``: float array (N, C) of probabilities. Softmax outputs for
  multi-class (including the 2-way softmax binary head); for a single-sigmoid
  binary head C == 1 and the column means P(class 1).
* ``num_classes`` can be given explicitly so that a class absent from a split is
  still accounted for (its per-class AUROC/AUPRC is ``None`` and it is listed in
  ``auroc_excluded_classes`` / ``auprc_excluded_classes``).

All public functions return plain Python floats / ints / lists / ``None`` so the
result is JSON-serialisable as is. Undefined quantities are ``None`` (never NaN)
and sklearn's ``UndefinedMetricWarning`` never leaks to the caller.

Contents: :func:`classification_metrics`, reference variants
(:data:`METRIC_VARIANTS`), checkpoint-selection helpers (:func:`select_metric`,
:func:`metric_direction`, :func:`is_improvement`), :func:`bootstrap_ci`,
:func:`regression_metrics`, :func:`segmentation_metrics` and output helpers
(:func:`write_metrics`, :func:`log_to_tensorboard`; the pictures :func:`plot_roc` with its bootstrap
band :func:`roc_band` and :func:`plot_confusion_matrix` live in ``util.metric_plots``).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import auc as _sk_auc
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from sklearn.metrics import confusion_matrix as _sk_confusion_matrix

__all__ = [
    "classification_metrics",
    "retfound_score",
    "uspec_aupr_trapz",
    "macro_excl0",
    "legacy_excl0",
    "malignant_pr",
    "METRIC_VARIANTS",
    "metric_direction",
    "select_metric",
    "is_improvement",
    "bootstrap_ci",
    "regression_metrics",
    "segmentation_metrics",
    "write_metrics",
    "plot_roc",
    "plot_confusion_matrix",
    "roc_band",
    "log_to_tensorboard",
]

# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """Accept numpy arrays, lists and (CPU or GPU) torch tensors without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach()
        if hasattr(x, "float") and str(getattr(x, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            x = x.float()  # numpy has no bfloat16
        x = x.cpu().numpy()
    return np.asarray(x)


def _safe_div(num: Any, den: Any) -> np.ndarray:
    """num/den with 0 where den == 0 (sklearn's zero_division=0 semantics)."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64))
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _masked_mean(values: np.ndarray, mask: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean of ``values`` over ``mask`` along ``axis``; NaN where the mask is empty (no warnings)."""
    mask = np.asarray(mask, dtype=bool)
    vals = np.where(mask, values, 0.0)
    cnt = mask.sum(axis=axis)
    tot = vals.sum(axis=axis)
    out = np.full(np.shape(tot), np.nan)
    np.divide(tot, cnt, out=out, where=cnt > 0)
    return out


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Row-wise mean over finite entries (NaN = undefined and excluded); NaN if none."""
    return _masked_mean(np.nan_to_num(values), np.isfinite(values), axis=-1)


def _py(x: Any) -> Any:
    """Convert numpy scalars to Python scalars and NaN/inf to None (JSON-safe)."""
    if x is None:
        return None
    if isinstance(x, np.ndarray) and x.ndim == 0:
        x = x.item()  # 0-d results of vectorised reductions
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _pylist(a: Any) -> list:
    return [_py(v) for v in np.asarray(a).tolist()]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


# --------------------------------------------------------------------------------------
# input preparation
# --------------------------------------------------------------------------------------


def _prepare_single_label(y_true: Any, probs: Any, num_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate inputs; return (y (N,) int64, P (N, C) float64, C) with a sigmoid column expanded to 2."""
    P = _to_numpy(probs).astype(np.float64, copy=False)
    if P.ndim == 1:
        P = P[:, None]
    if P.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {P.shape}")
    if not np.all(np.isfinite(P)):
        raise ValueError("probs contains NaN or inf")
    if P.shape[1] == 1:
        # single-sigmoid binary head: the column is P(class 1); expand so every code path
        # sees the same (N, 2) layout as a 2-way softmax
        if num_classes not in (None, 1, 2):
            raise ValueError(f"single-column probs imply a binary task, got num_classes={num_classes}")
        P = np.hstack([1.0 - P, P])
    C = P.shape[1] if num_classes is None else int(num_classes)
    if P.shape[1] != C:
        raise ValueError(f"probs has {P.shape[1]} columns but num_classes={num_classes}")
    if C < 2:
        raise ValueError("need at least 2 classes")

    y = _to_numpy(y_true)
    if y.ndim == 2:
        if y.shape[1] == 1:
            y = y[:, 0]
        elif y.shape[1] == C and np.all((y == 0) | (y == 1)) and np.all(y.sum(1) == 1):
            y = y.argmax(1)  # one-hot single-label targets
        else:
            raise ValueError("2-D y_true that is not one-hot: pass multilabel=True for multi-label tasks")
    if y.ndim != 1:
        raise ValueError(f"y_true must be (N,), got shape {y.shape}")
    if y.shape[0] != P.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} samples but probs has {P.shape[0]}")
    if y.shape[0] == 0:
        raise ValueError("empty input")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError("y_true must contain integer class indices")
    elif y.dtype.kind not in "iub":
        raise ValueError(f"y_true must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= C:
        raise ValueError(f"y_true values must lie in [0, {C - 1}]")
    return y, P, C


def _prepare_multilabel(y_true: Any, probs: Any, num_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate multi-label inputs; return (Y (N, L) int64 0/1, P (N, L) float64, L)."""
    P = _to_numpy(probs).astype(np.float64, copy=False)
    Y = _to_numpy(y_true)
    if P.ndim == 1:
        P = P[:, None]
    if Y.ndim == 1:
        Y = Y[:, None]
    if P.ndim != 2 or Y.shape != P.shape:
        raise ValueError(f"multi-label y_true and probs must both be (N, L); got {Y.shape} and {P.shape}")
    if num_classes is not None and P.shape[1] != int(num_classes):
        raise ValueError(f"probs has {P.shape[1]} labels but num_classes={num_classes}")
    if P.shape[0] == 0:
        raise ValueError("empty input")
    if not np.all(np.isfinite(P)):
        raise ValueError("probs contains NaN or inf")
    if not np.all((Y == 0) | (Y == 1)):
        raise ValueError("multi-label y_true must be 0/1")
    return Y.astype(np.int64), P, P.shape[1]


def _predict(P: np.ndarray, positive_class: int, threshold: float) -> np.ndarray:
    """Hard predictions: threshold on P(positive) for binary, argmax otherwise."""
    if P.shape[1] == 2:
        if positive_class not in (0, 1):
            raise ValueError("positive_class must be 0 or 1 for a binary task")
        return np.where(P[:, positive_class] >= threshold, positive_class, 1 - positive_class).astype(np.int64)
    return P.argmax(1).astype(np.int64)


def _class_names(class_names: Sequence[str] | None, C: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(C)]
    names = [str(c) for c in class_names]
    if len(names) != C:
        raise ValueError(f"{len(names)} class_names for {C} classes")
    return names


# --------------------------------------------------------------------------------------
# confusion-matrix based metrics (vectorised over a leading batch axis, shared with bootstrap)
# --------------------------------------------------------------------------------------


def _kappa_from_cm(cm: np.ndarray, quadratic: bool) -> np.ndarray:
    """Cohen's kappa from (..., C, C) confusion matrices; NaN where undefined (chance agreement 1).

    Weights use the full 0..C-1 grade range so quadratic distances stay correct even when
    a grade is missing from the split (sklearn's default label set would compress them).
    """
    C = cm.shape[-1]
    i, j = np.indices((C, C))
    W = ((i - j) / (C - 1)) ** 2 if quadratic else (i != j).astype(np.float64)
    n = cm.sum(axis=(-2, -1))
    expected = cm.sum(-1)[..., :, None] * cm.sum(-2)[..., None, :] / np.where(n == 0, 1, n)[..., None, None]
    num = (W * cm).sum(axis=(-2, -1))
    den = (W * expected).sum(axis=(-2, -1))
    out = np.full(np.shape(num), np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return 1.0 - out


def _cm_scalars(cm: np.ndarray, positive_class: int | None = None) -> dict[str, np.ndarray]:
    """All confusion-matrix metrics for (B, C, C) matrices (rows = true). Returns (B,) / (B, C) arrays.

    Macro averages use sklearn's default label set: classes present in y_true or y_pred
    (a class absent from both carries no information and would only drag the mean down).
    Balanced accuracy averages recall over classes present in y_true (sklearn definition).
    """
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum(axis=(-2, -1))
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(-1)
    predicted = cm.sum(-2)
    fp = predicted - tp
    fn = support - tp
    tn = n[..., None] - tp - fp - fn
    recall = _safe_div(tp, support)
    precision = _safe_div(tp, predicted)
    specificity = _safe_div(tn, tn + fp)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    active = (support > 0) | (predicted > 0)

    # multi-class MCC (sklearn's formulation); 0 when undefined, as sklearn does
    c = tp.sum(-1)
    cov_tp = c * n - (support * predicted).sum(-1)
    cov_pp = n**2 - (predicted**2).sum(-1)
    cov_tt = n**2 - (support**2).sum(-1)
    den = np.sqrt(cov_tt * cov_pp)
    mcc = _safe_div(cov_tp, den)

    out = {
        "accuracy": _safe_div(c, n),
        "balanced_accuracy": _masked_mean(recall, support > 0),
        "f1": _masked_mean(f1, active),
        "precision": _masked_mean(precision, active),
        "recall": _masked_mean(recall, active),
        "specificity": _masked_mean(specificity, active),
        "kappa": _kappa_from_cm(cm, quadratic=False),
        "kappa_quadratic": _kappa_from_cm(cm, quadratic=True),
        "mcc": mcc,
        "f1_per_class": f1,
        "precision_per_class": precision,
        "recall_per_class": recall,
        "specificity_per_class": specificity,
    }
    out["sensitivity"] = out["recall"]
    if positive_class is not None:
        out["sensitivity_positive"] = recall[..., positive_class]
        out["specificity_positive"] = specificity[..., positive_class]
        out["precision_positive"] = precision[..., positive_class]
        out["f1_positive"] = f1[..., positive_class]
    return out


def _binary_count_scalars(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> dict[str, np.ndarray]:
    """Per-label binary metrics from (..., L) counts (multi-label tasks); macro over all labels (sklearn)."""
    tp, fp, fn, tn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn, tn))
    n = tp + fp + fn + tn
    pos, neg = tp + fn, tn + fp
    recall = _safe_div(tp, pos)
    precision = _safe_div(tp, tp + fp)
    specificity = _safe_div(tn, neg)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    # balanced accuracy of each label column = mean recall over the classes present in it
    bal = _safe_div(recall * (pos > 0) + specificity * (neg > 0), (pos > 0).astype(float) + (neg > 0))
    po = _safe_div(tp + tn, n)
    pe = _safe_div(pos * (tp + fp) + neg * (tn + fn), n**2)
    kappa = np.full(np.shape(po), np.nan)
    np.divide(po - pe, 1.0 - pe, out=kappa, where=(1.0 - pe) > 1e-12)
    return {
        "f1_per_class": f1,
        "precision_per_class": precision,
        "recall_per_class": recall,
        "specificity_per_class": specificity,
        "balanced_accuracy_per_class": bal,
        "kappa_per_class": kappa,
        "f1": f1.mean(-1),
        "precision": precision.mean(-1),
        "recall": recall.mean(-1),
        "sensitivity": recall.mean(-1),
        "specificity": specificity.mean(-1),
        "balanced_accuracy": bal.mean(-1),
        "kappa": _nanmean_rows(kappa),
    }


# --------------------------------------------------------------------------------------
# ranking metrics (sklearn for point estimates)
# --------------------------------------------------------------------------------------


def _binary_auroc(y_bin: np.ndarray, score: np.ndarray) -> float | None:
    """AUROC or None when only one class is present (undefined)."""
    npos = int(y_bin.sum())
    if npos == 0 or npos == y_bin.shape[0]:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return float(roc_auc_score(y_bin, score))


def _binary_ap(y_bin: np.ndarray, score: np.ndarray) -> float | None:
    """Average precision (sklearn's default AUPR) or None when there are no positives."""
    if int(y_bin.sum()) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return float(average_precision_score(y_bin, score))


def _macro_of(values: list[float | None]) -> tuple[float | None, list[int]]:
    defined = [v for v in values if v is not None]
    excluded = [k for k, v in enumerate(values) if v is None]
    return (float(np.mean(defined)) if defined else None), excluded


# --------------------------------------------------------------------------------------
# classification metrics
# --------------------------------------------------------------------------------------


def classification_metrics(
    y_true: Any,
    probs: Any,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    ordinal: bool = False,
    positive_class: int = 1,
    threshold: float = 0.5,
    multilabel: bool = False,
) -> dict[str, Any]:
    """Full metric dict for a classification task (JSON-serialisable).

    Hard predictions: binary -> ``P(positive_class) >= threshold``; multi-class -> argmax;
    multi-label -> ``P >= threshold`` per label.

    Keys (single-label): task, n, num_classes, class_names, accuracy, balanced_accuracy,
    auroc, auroc_per_class, auroc_excluded_classes, auprc, auprc_per_class,
    auprc_excluded_classes, f1, f1_per_class, precision, precision_per_class, recall,
    sensitivity, recall_per_class, specificity, specificity_per_class, kappa,
    [kappa_quadratic if ordinal], mcc, confusion_matrix, support; binary tasks add
    positive_class, threshold, sensitivity_positive, specificity_positive,
    precision_positive, f1_positive. For binary tasks ``auroc``/``auprc`` are those of the
    positive column. Multi-label: see :func:`_multilabel_metrics`.
    """
    if multilabel:
        return _multilabel_metrics(y_true, probs, num_classes, class_names, threshold)
    y, P, C = _prepare_single_label(y_true, probs, num_classes)
    names = _class_names(class_names, C)
    binary = C == 2
    pred = _predict(P, positive_class, threshold)
    cm = _sk_confusion_matrix(y, pred, labels=np.arange(C))
    s = _cm_scalars(cm[None], positive_class if binary else None)

    auroc_pc = [_binary_auroc((y == k).astype(np.int64), P[:, k]) for k in range(C)]
    auprc_pc = [_binary_ap((y == k).astype(np.int64), P[:, k]) for k in range(C)]
    if binary:
        # binary convention: AUROC/AUPRC of the positive column, not a 2-class macro
        auroc, auprc = auroc_pc[positive_class], auprc_pc[positive_class]
        auroc_ex = [k for k, v in enumerate(auroc_pc) if v is None]
        auprc_ex = [k for k, v in enumerate(auprc_pc) if v is None]
    else:
        auroc, auroc_ex = _macro_of(auroc_pc)
        auprc, auprc_ex = _macro_of(auprc_pc)

    m: dict[str, Any] = {
        "task": "binary" if binary else "multiclass",
        "n": int(y.shape[0]),
        "num_classes": C,
        "class_names": names,
        "accuracy": _py(s["accuracy"][0]),
        "balanced_accuracy": _py(s["balanced_accuracy"][0]),
        "auroc": auroc,
        "auroc_per_class": auroc_pc,
        "auroc_excluded_classes": auroc_ex,
        "auprc": auprc,
        "auprc_per_class": auprc_pc,
        "auprc_excluded_classes": auprc_ex,
        "f1": _py(s["f1"][0]),
        "f1_per_class": _pylist(s["f1_per_class"][0]),
        "precision": _py(s["precision"][0]),
        "precision_per_class": _pylist(s["precision_per_class"][0]),
        "recall": _py(s["recall"][0]),
        "sensitivity": _py(s["sensitivity"][0]),
        "recall_per_class": _pylist(s["recall_per_class"][0]),
        "specificity": _py(s["specificity"][0]),
        "specificity_per_class": _pylist(s["specificity_per_class"][0]),
        "kappa": _py(s["kappa"][0]),
    }
    if ordinal:
        m["kappa_quadratic"] = _py(s["kappa_quadratic"][0])
    m["mcc"] = _py(s["mcc"][0])
    m["confusion_matrix"] = cm.astype(int).tolist()
    m["support"] = cm.sum(1).astype(int).tolist()
    if binary:
        m["positive_class"] = int(positive_class)
        m["threshold"] = float(threshold)
        for k in ("sensitivity_positive", "specificity_positive", "precision_positive", "f1_positive"):
            m[k] = _py(s[k][0])
    return m


def _multilabel_metrics(
    y_true: Any, probs: Any, num_classes: int | None, class_names: Sequence[str] | None, threshold: float
) -> dict[str, Any]:
    """Multi-label metrics.

    Keys: task ('multilabel'), n, num_classes, class_names, threshold, accuracy (= subset
    accuracy), subset_accuracy, hamming_loss, auroc(+_per_class, _excluded_classes),
    auprc(+...), f1/precision/recall/sensitivity/specificity/balanced_accuracy/kappa macro
    over labels with *_per_class lists, confusion_matrix (per label [[TN, FP], [FN, TP]]),
    support (positives per label).
    """
    Y, P, L = _prepare_multilabel(y_true, probs, num_classes)
    names = _class_names(class_names, L)
    pred = (P >= threshold).astype(np.int64)
    tp = ((Y == 1) & (pred == 1)).sum(0)
    fp = ((Y == 0) & (pred == 1)).sum(0)
    fn = ((Y == 1) & (pred == 0)).sum(0)
    tn = ((Y == 0) & (pred == 0)).sum(0)
    s = _binary_count_scalars(tp, fp, fn, tn)
    auroc_pc = [_binary_auroc(Y[:, k], P[:, k]) for k in range(L)]
    auprc_pc = [_binary_ap(Y[:, k], P[:, k]) for k in range(L)]
    auroc, auroc_ex = _macro_of(auroc_pc)
    auprc, auprc_ex = _macro_of(auprc_pc)
    subset = float(np.mean(np.all(pred == Y, axis=1)))
    return {
        "task": "multilabel",
        "n": int(Y.shape[0]),
        "num_classes": L,
        "class_names": names,
        "threshold": float(threshold),
        "accuracy": subset,
        "subset_accuracy": subset,
        "hamming_loss": float(np.mean(pred != Y)),
        "balanced_accuracy": _py(s["balanced_accuracy"]),
        "auroc": auroc,
        "auroc_per_class": auroc_pc,
        "auroc_excluded_classes": auroc_ex,
        "auprc": auprc,
        "auprc_per_class": auprc_pc,
        "auprc_excluded_classes": auprc_ex,
        "f1": _py(s["f1"]),
        "f1_per_class": _pylist(s["f1_per_class"]),
        "precision": _py(s["precision"]),
        "precision_per_class": _pylist(s["precision_per_class"]),
        "recall": _py(s["recall"]),
        "sensitivity": _py(s["sensitivity"]),
        "recall_per_class": _pylist(s["recall_per_class"]),
        "specificity": _py(s["specificity"]),
        "specificity_per_class": _pylist(s["specificity_per_class"]),
        "kappa": _py(s["kappa"]),
        "kappa_per_class": _pylist(s["kappa_per_class"]),
        "confusion_matrix": [[[int(tn[k]), int(fp[k])], [int(fn[k]), int(tp[k])]] for k in range(L)],
        "support": Y.sum(0).astype(int).tolist(),
    }


# --------------------------------------------------------------------------------------
# named reference variants (compatibility with published code bases)
# --------------------------------------------------------------------------------------


def retfound_score(m: Mapping[str, Any]) -> float | None:
    """RETFound v2 model-selection score: (F1_macro + AUROC_macro + kappa) / 3; None if any is undefined."""
    parts = [m.get("f1"), m.get("auroc"), m.get("kappa")]
    if any(p is None or not math.isfinite(float(p)) for p in parts):
        return None
    return float(sum(float(p) for p in parts) / 3.0)


def uspec_aupr_trapz(
    y_true: Any, probs: Any, num_classes: int | None = None, positive_class: int = 1
) -> float | None:
    """USPEC-style AUPR: trapezoidal ``auc(recall, precision)`` per class, macro mean.

    Binary: positive class only. Classes absent from ``y_true`` are skipped (None if all).
    Differs from average precision because the trapezoid linearly interpolates precision.
    """
    y, P, C = _prepare_single_label(y_true, probs, num_classes)
    classes = [positive_class] if C == 2 else list(range(C))
    vals = []
    for k in classes:
        yk = (y == k).astype(np.int64)
        if yk.sum() == 0:
            continue
        prec, rec, _ = precision_recall_curve(yk, P[:, k])
        vals.append(float(_sk_auc(rec, prec)))
    return float(np.mean(vals)) if vals else None


def macro_excl0(
    y_true: Any, probs: Any, num_classes: int | None = None, positive_class: int = 1, threshold: float = 0.5
) -> dict[str, float]:
    """VisionFM validation: precision/recall/F1 macro over classes 1..C-1 (class 0 = normal), zero_division=0.

    Like sklearn with ``labels=range(1, C)``, every listed class counts, present or not.
    """
    y, P, C = _prepare_single_label(y_true, probs, num_classes)
    cm = _sk_confusion_matrix(y, _predict(P, positive_class, threshold), labels=np.arange(C))
    s = _cm_scalars(cm[None])
    return {k: float(s[f"{k}_per_class"][0, 1:].mean()) for k in ("precision", "recall", "f1")}


def legacy_excl0(
    y_true: Any, probs: Any, num_classes: int | None = None, positive_class: int = 1, threshold: float = 0.5
) -> dict[str, float]:
    """RETFound v1 ``misc_measures``: one-vs-rest metrics of classes 1..C-1 averaged.

    Keys: accuracy, sensitivity, specificity, precision, g_mean (sqrt(sens*spec)), f1, mcc.
    Undefined ratios are 0 here (the original produced NaN).
    """
    y, P, C = _prepare_single_label(y_true, probs, num_classes)
    pred = _predict(P, positive_class, threshold)
    acc, sens, spec, prec, g, f1, mcc = ([] for _ in range(7))
    for i in range(1, C):
        t, p = y == i, pred == i
        tp, fn, fp, tn = (float(np.sum(a & b)) for a, b in ((t, p), (t, ~p), (~t, p), (~t, ~p)))
        se, sp, pr = _safe_div(tp, tp + fn), _safe_div(tn, tn + fp), _safe_div(tp, tp + fp)
        acc.append((tp + tn) / (tp + tn + fp + fn))
        sens.append(se)
        spec.append(sp)
        prec.append(pr)
        g.append(np.sqrt(se * sp))
        f1.append(_safe_div(2 * pr * se, pr + se))
        mcc.append(_safe_div(tn * tp - fp * fn, np.sqrt((tn + fp) * (tn + fn) * (tp + fn) * (tp + fp))))
    keys = ("accuracy", "sensitivity", "specificity", "precision", "g_mean", "f1", "mcc")
    return {k: float(np.mean(v)) for k, v in zip(keys, (acc, sens, spec, prec, g, f1, mcc))}


def malignant_pr(cm: Any, cls: int = 0) -> dict[str, float]:
    """Precision and recall of one class (USPEC: malignant = class 0) from a confusion matrix (rows = true)."""
    cm = np.asarray(cm, dtype=np.float64)
    return {
        "precision": float(_safe_div(cm[cls, cls], cm[:, cls].sum())),
        "recall": float(_safe_div(cm[cls, cls], cm[cls, :].sum())),
    }


#: Registry of named reference variants. Signatures differ: ``retfound_score(metrics_dict)``,
#: ``malignant_pr(cm, cls)``; the others take ``(y_true, probs, num_classes=None, ...)``.
METRIC_VARIANTS: dict[str, Callable[..., Any]] = {
    "retfound_score": retfound_score,
    "uspec_aupr_trapz": uspec_aupr_trapz,
    "macro_excl0": macro_excl0,
    "legacy_excl0": legacy_excl0,
    "malignant_pr": malignant_pr,
}

# --------------------------------------------------------------------------------------
# best-checkpoint selection
# --------------------------------------------------------------------------------------

_ALIASES = {
    "auc": "auroc",
    "roc_auc": "auroc",
    "auc_roc": "auroc",
    "aupr": "auprc",
    "auc_pr": "auprc",
    "ap": "auprc",
    "acc": "accuracy",
    "bacc": "balanced_accuracy",
    "f1_macro": "f1",
    "f1_score": "f1",
    "sens": "sensitivity",
    "spec": "specificity",
    "qwk": "kappa_quadratic",
    "retfound": "retfound_score",
}
_LOWER_IS_BETTER = {"loss", "hamming_loss", "mae", "rmse", "relative_error"}


def _canonical(name: str) -> str:
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def metric_direction(name: str) -> bool:
    """True when higher is better (losses/errors are lower-is-better)."""
    key = _canonical(name)
    return not (key in _LOWER_IS_BETTER or key.endswith("loss") or key.endswith("error"))


def select_metric(metrics: Mapping[str, Any], name: str) -> float:
    """Value of ``name`` used for best-checkpoint selection.

    'retfound_score' is computed from the dict when absent. A missing/undefined value returns
    the worst possible value (-inf, or +inf for lower-is-better) so it never wins.
    """
    key = _canonical(name)
    value = metrics.get(key)
    if value is None and key == "retfound_score":
        value = retfound_score(metrics)
    if value is None or not _is_number(value) or not math.isfinite(float(value)):
        return -math.inf if metric_direction(key) else math.inf
    return float(value)


def is_improvement(value: float, best: float | None, name: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` for metric ``name`` (``best is None`` -> True)."""
    if best is None:
        return math.isfinite(value)
    if metric_direction(name):
        return value > best + min_delta
    return value < best - min_delta


def is_better_epoch(value: float, loss: float | None, best: float | None, best_loss: float | None, name: str) -> bool:
    """Model selection: a better ``name`` wins; on a tie (e.g. val AUROC 1.0 at several epochs) the
    lower validation loss wins, so the first of tied epochs is not kept by default."""
    if is_improvement(value, best, name):
        return True
    if best is None or value != best or _canonical(name) == "loss" or loss is None or not math.isfinite(loss):
        return False
    return best_loss is None or not math.isfinite(best_loss) or loss < best_loss


# --------------------------------------------------------------------------------------
# bootstrap confidence intervals
# --------------------------------------------------------------------------------------


def _weighted_auroc(score: np.ndarray, pos: np.ndarray, W: np.ndarray) -> np.ndarray:
    """AUROC of each resample given multiplicity weights W (B, N); NaN where undefined.

    A bootstrap resample is the original sample with integer weights, so the Mann-Whitney
    statistic can be computed from one sort of the original scores (ties count 1/2).
    """
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    Wo = W[:, order]
    po = pos[order]
    pw = np.add.reduceat(Wo * po, starts, axis=1)
    nw = np.add.reduceat(Wo * ~po, starts, axis=1)
    below = np.cumsum(nw, axis=1) - nw
    num = (pw * (below + 0.5 * nw)).sum(1)
    den = pw.sum(1) * nw.sum(1)
    out = np.full(W.shape[0], np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _weighted_ap(score: np.ndarray, pos: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Average precision (sklearn's step definition, tied scores grouped) under weights W (B, N)."""
    order = np.argsort(-score, kind="mergesort")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    Wo = W[:, order]
    po = pos[order]
    pw = np.add.reduceat(Wo * po, starts, axis=1)
    nw = np.add.reduceat(Wo * ~po, starts, axis=1)
    tp = np.cumsum(pw, axis=1)
    prec = _safe_div(tp, tp + np.cumsum(nw, axis=1))
    npos = pw.sum(1)
    out = np.full(W.shape[0], np.nan)
    np.divide((pw * prec).sum(1), npos, out=out, where=npos > 0)
    return out


_SINGLE_VECTORISED = {
    "accuracy", "balanced_accuracy", "f1", "precision", "recall", "sensitivity", "specificity",
    "kappa", "kappa_quadratic", "mcc", "auroc", "auprc", "retfound_score",
    "sensitivity_positive", "specificity_positive", "precision_positive", "f1_positive",
}  # fmt: skip
_MULTI_VECTORISED = {
    "accuracy", "subset_accuracy", "hamming_loss", "balanced_accuracy", "f1", "precision", "recall",
    "sensitivity", "specificity", "kappa", "auroc", "auprc", "retfound_score",
}  # fmt: skip


def _weighted_single_label(
    y: np.ndarray, P: np.ndarray, pred: np.ndarray, W: np.ndarray, positive_class: int | None, names: set[str]
) -> dict[str, np.ndarray]:
    """Vectorised single-label metrics for each row of weights W (B, N)."""
    C = P.shape[1]
    pair = y * C + pred
    order = np.argsort(pair, kind="mergesort")
    sp = pair[order]
    starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]])
    cm = np.zeros((W.shape[0], C * C))
    cm[:, sp[starts]] = np.add.reduceat(W[:, order], starts, axis=1)
    out = dict(_cm_scalars(cm.reshape(-1, C, C), positive_class))
    binary = positive_class is not None
    classes = [positive_class] if binary else range(C)
    if names & {"auroc", "retfound_score"}:
        per = np.stack([_weighted_auroc(P[:, k], y == k, W) for k in classes], axis=1)
        out["auroc"] = _nanmean_rows(per)
    if "auprc" in names:
        per = np.stack([_weighted_ap(P[:, k], y == k, W) for k in classes], axis=1)
        out["auprc"] = _nanmean_rows(per)
    if "retfound_score" in names:
        out["retfound_score"] = (out["f1"] + out["auroc"] + out["kappa"]) / 3.0
    return out


def _weighted_multilabel(Y: np.ndarray, P: np.ndarray, pred: np.ndarray, W: np.ndarray, names: set[str]) -> dict[str, np.ndarray]:
    """Vectorised multi-label metrics for each row of weights W (B, N)."""
    Yb, Pb = Y.astype(bool), pred.astype(bool)
    tp = W @ (Yb & Pb).astype(np.float64)
    fp = W @ (~Yb & Pb).astype(np.float64)
    fn = W @ (Yb & ~Pb).astype(np.float64)
    tn = W @ (~Yb & ~Pb).astype(np.float64)
    out = dict(_binary_count_scalars(tp, fp, fn, tn))
    n = W.sum(1)
    out["subset_accuracy"] = out["accuracy"] = (W @ np.all(Yb == Pb, axis=1).astype(np.float64)) / n
    out["hamming_loss"] = (W @ np.mean(Yb != Pb, axis=1)) / n
    L = Y.shape[1]
    if names & {"auroc", "retfound_score"}:
        out["auroc"] = _nanmean_rows(np.stack([_weighted_auroc(P[:, k], Yb[:, k], W) for k in range(L)], axis=1))
    if "auprc" in names:
        out["auprc"] = _nanmean_rows(np.stack([_weighted_ap(P[:, k], Yb[:, k], W) for k in range(L)], axis=1))
    if "retfound_score" in names:
        out["retfound_score"] = (out["f1"] + out["auroc"] + out["kappa"]) / 3.0
    return out


def bootstrap_weights(strata: Sequence[np.ndarray], n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks (b, n) of multiplicity weights: each stratum (index array) resampled to its own size.
    bootstrap_ci and the ROC band both draw through this, so with the same seed they see the same resamples."""
    rng = np.random.default_rng(seed)
    chunk = int(max(1, min(n_boot, 2_000_000 // max(n, 1))))  # bound (B, N) memory
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        W = np.zeros((b, n))
        for idx in strata:
            W[:, idx] = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size), size=b)
        yield W
        done += b


def bootstrap_ci(
    y_true: Any,
    probs: Any,
    metric_names: Sequence[str] = ("auroc", "accuracy", "f1"),
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    *,
    stratified: bool = True,
    num_classes: int | None = None,
    ordinal: bool = False,
    positive_class: int = 1,
    threshold: float = 0.5,
    multilabel: bool = False,
) -> dict[str, tuple[float | None, float | None]]:
    """Percentile bootstrap CI ``{name: (low, high)}`` for scalar metrics of :func:`classification_metrics`.

    Single-label resampling is stratified by true class (class counts are kept, so every class
    present in the original stays present and AUROC stays defined); multi-label resampling is
    plain. Resamples are drawn as multiplicity weights and the common metrics are computed
    for all resamples at once; other scalar keys fall back to a per-resample loop.
    Resamples where a metric is undefined are dropped; (None, None) if it is never defined.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    requested = [_canonical(n) for n in metric_names]
    kw = dict(num_classes=num_classes, ordinal=ordinal, positive_class=positive_class,
              threshold=threshold, multilabel=multilabel)  # fmt: skip
    point = classification_metrics(y_true, probs, **kw)
    for name in requested:
        if name != "retfound_score" and not (name in point and (point[name] is None or _is_number(point[name]))):
            raise KeyError(f"{name!r} is not a scalar metric of classification_metrics")

    if multilabel:
        Y, P, _ = _prepare_multilabel(y_true, probs, num_classes)
        pred = (P >= threshold).astype(np.int64)
        N = Y.shape[0]
        vec_names = _MULTI_VECTORISED
        strata = [np.arange(N)]
    else:
        Y, P, C = _prepare_single_label(y_true, probs, num_classes)
        pred = _predict(P, positive_class, threshold)
        N = Y.shape[0]
        vec_names = _SINGLE_VECTORISED
        strata = [np.flatnonzero(Y == k) for k in range(C)] if stratified else [np.arange(N)]
        strata = [s for s in strata if s.size]
    vec = {n for n in requested if n in vec_names}
    loop = [n for n in requested if n not in vec_names]

    values: dict[str, list[np.ndarray]] = {n: [] for n in requested}
    for W in bootstrap_weights(strata, N, n_boot, seed):
        b = W.shape[0]
        if vec:
            with np.errstate(divide="ignore", invalid="ignore"):
                if multilabel:
                    res = _weighted_multilabel(Y, P, pred, W, vec)
                else:
                    res = _weighted_single_label(Y, P, pred, W, positive_class if P.shape[1] == 2 else None, vec)
            for n in vec:
                values[n].append(np.asarray(res[n], dtype=np.float64))
        if loop:
            counts = W.astype(np.int64)
            rows = {n: np.full(b, np.nan) for n in loop}
            for r in range(b):
                idx = np.repeat(np.arange(N), counts[r])
                m = classification_metrics(Y[idx], P[idx], **kw)
                for n in loop:
                    v = m.get(n)
                    rows[n][r] = np.nan if v is None else float(v)
            for n in loop:
                values[n].append(rows[n])

    out: dict[str, tuple[float | None, float | None]] = {}
    for n in requested:
        v = np.concatenate(values[n])
        v = v[np.isfinite(v)]
        if v.size == 0:
            out[n] = (None, None)
        else:
            lo, hi = np.percentile(v, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
            out[n] = (float(lo), float(hi))
    return out


# --------------------------------------------------------------------------------------
# regression / segmentation
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# output helpers
# --------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """Recursively convert numpy types/arrays, tuples and NaN into strict-JSON values."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, float, int)) or x is None:
        return _py(x.item() if isinstance(x, np.generic) else x)
    return x if isinstance(x, (str, bool)) else str(x)


def _flatten(x: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested dicts/lists into ('a.b.0', value) rows for the CSV."""
    if isinstance(x, Mapping):
        rows: list[tuple[str, Any]] = []
        for k, v in x.items():
            rows.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return rows
    if isinstance(x, list):
        rows = []
        for i, v in enumerate(x):
            rows.extend(_flatten(v, f"{prefix}.{i}"))
        return rows
    return [(prefix, x)]


def _atomic_write(path: str | os.PathLike, data: bytes) -> str:
    """Write via temp file + os.replace in the same directory so readers never see a partial file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_metrics(metrics: Mapping[str, Any], out_dir: str | os.PathLike, prefix: str = "test") -> tuple[str, str]:
    """Write ``<prefix>_metrics.json`` and a flat two-column ``<prefix>_metrics.csv`` (metric,value) atomically.

    Nested values are flattened as ``key.index`` (e.g. ``auroc_per_class.2``); None is an empty cell.
    Returns (json_path, csv_path).
    """
    clean = _jsonable(dict(metrics))
    json_path = os.path.join(os.fspath(out_dir), f"{prefix}_metrics.json")
    csv_path = os.path.join(os.fspath(out_dir), f"{prefix}_metrics.csv")
    _atomic_write(json_path, (json.dumps(clean, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "value"])
    for k, v in _flatten(clean):
        w.writerow([k, "" if v is None else v])
    _atomic_write(csv_path, buf.getvalue().encode("utf-8"))
    return json_path, csv_path


_META_KEYS = {"n", "num_classes", "positive_class", "threshold"}


def log_to_tensorboard(writer: Any, metrics: Mapping[str, Any], step: int, prefix: str = "") -> int:
    """Log the finite numeric scalar entries as ``<prefix>/<key>`` (lists/None/meta keys skipped).

    ``writer`` is anything with ``add_scalar(tag, value, step)`` (e.g. a SummaryWriter) or None.
    Returns the number of scalars logged.
    """
    if writer is None:
        return 0
    count = 0
    for key, value in metrics.items():
        if key in _META_KEYS or not _is_number(value) or not math.isfinite(float(value)):
            continue
        writer.add_scalar(f"{prefix}/{key}" if prefix else str(key), float(value), step)
        count += 1
    return count


# The pictures live in util/metric_plots.py (imported last: it uses the helpers above).
from util.metric_plots import plot_confusion_matrix, plot_roc, roc_band  # noqa: E402
