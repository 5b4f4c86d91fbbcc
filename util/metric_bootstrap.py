"""Percentile bootstrap confidence intervals of the classification metrics.

A bootstrap resample is the original sample with integer multiplicity weights, so the common metrics
are computed for a whole chunk of resamples at once from one sort of the scores; other scalar metrics
fall back to recomputing :func:`classification_metrics` per resample. ``bootstrap_weights`` is the one
resampler: the ROC band of ``util.metric_plots`` draws through it too.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from util.metric_base import _is_number, _nanmean_rows, _predict, _prepare_multilabel, _prepare_single_label, _safe_div
from util.metric_classification import _binary_count_scalars, _canonical, _cm_scalars, classification_metrics


def _tied_group_weights(score: np.ndarray, pos: np.ndarray, W: np.ndarray, descending: bool
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight (B, G) of each group of tied scores, groups in score order: the one
    sort both weighted AUROC and AP are computed from."""
    order = np.argsort(-score if descending else score, kind="mergesort")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    Wo, po = W[:, order], pos[order]
    return np.add.reduceat(Wo * po, starts, axis=1), np.add.reduceat(Wo * ~po, starts, axis=1)


def _weighted_auroc(score: np.ndarray, pos: np.ndarray, W: np.ndarray) -> np.ndarray:
    """AUROC of each resample given multiplicity weights W (B, N); NaN where undefined.

    A bootstrap resample is the original sample with integer weights, so the Mann-Whitney
    statistic can be computed from one sort of the original scores (ties count 1/2).
    """
    pw, nw = _tied_group_weights(score, pos, W, descending=False)
    below = np.cumsum(nw, axis=1) - nw
    num = (pw * (below + 0.5 * nw)).sum(1)
    den = pw.sum(1) * nw.sum(1)
    out = np.full(W.shape[0], np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _weighted_ap(score: np.ndarray, pos: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Average precision (sklearn's step definition, tied scores grouped) under weights W (B, N)."""
    pw, nw = _tied_group_weights(score, pos, W, descending=True)
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
