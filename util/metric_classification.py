"""Classification metrics (binary, multi-class, multi-label), the named reference variants of published
code bases and best-checkpoint selection. Import them through ``util.metrics``.

Macro averages follow sklearn; undefined quantities are ``None`` and sklearn's ``UndefinedMetricWarning``
never leaks to the caller. The confusion-matrix metrics are vectorised over a leading batch axis so
that ``util.metric_bootstrap`` computes every resample with the same code.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import auc as _sk_auc
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from sklearn.metrics import confusion_matrix as _sk_confusion_matrix

from util.metric_base import (_class_names, _is_number, _masked_mean, _nanmean_rows,
                              _predict, _prepare_multilabel, _prepare_single_label, _py, _pylist, _safe_div)


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
