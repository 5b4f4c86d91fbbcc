"""ROC and confusion-matrix pictures of the clinical metrics (import them through ``util.metrics``).

The ROC band is a percentile bootstrap of the curve itself: each resample's ROC is read at a fixed grid
of false-positive rates and the band is the 2.5-97.5 percentile of the true-positive rates at each grid
point. Resamples are drawn exactly as :func:`util.metric_bootstrap.bootstrap_ci` draws them (multiplicity weights,
stratified by true class, same chunking of the random stream), so with the same ``n_boot`` and ``seed``
the AUROC interval in the legend is the one in ``*_metrics.json`` (binary AUROC, multi-class macro AUROC).
"""
from __future__ import annotations

import io
import os
from typing import Any, MutableMapping, Sequence

import numpy as np

from util.atomic import write_atomic
from util.metric_base import _class_names, _nanmean_rows, _prepare_multilabel, _prepare_single_label, _safe_div
from util.metric_bootstrap import _weighted_auroc, bootstrap_weights
from util.metric_classification import _binary_auroc

ROC_GRID = np.linspace(0.0, 1.0, 101)


def plot_caption(kind: str, split: str | None = None, checkpoint: str | None = None) -> str:
    """'ROC | test split | checkpoint-best.pth (epoch 7)': what a picture shows and of which model."""
    parts = [kind]
    if split:
        parts.append(f"{split} split")
    if checkpoint:
        parts.append(str(checkpoint))
    return " | ".join(parts)


def weighted_roc_on_grid(score: np.ndarray, pos: np.ndarray, W: np.ndarray, grid: np.ndarray = ROC_GRID
                         ) -> np.ndarray:
    """True-positive rate at each false-positive rate of `grid` for each row of weights W (b, n); NaN
    rows where a resample has no positives or no negatives. Tied scores move together (one ROC vertex);
    at a vertical segment the upper point is taken, as a plotted ROC shows it."""
    pos = np.asarray(pos, dtype=bool)
    order = np.argsort(-score, kind="mergesort")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    Wo = W[:, order]
    tp = np.cumsum(np.add.reduceat(Wo * pos[order], starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat(Wo * ~pos[order], starts, axis=1), axis=1)
    out = np.full((W.shape[0], grid.size), np.nan)
    for r in range(W.shape[0]):
        if tp[r, -1] > 0 and fp[r, -1] > 0:
            out[r] = np.interp(grid, np.r_[0.0, fp[r] / fp[r, -1]], np.r_[0.0, tp[r] / tp[r, -1]])
    return out


def roc_bands(curves: dict[Any, tuple[np.ndarray, np.ndarray]], strata: Sequence[np.ndarray], n_boot: int = 1000,
              seed: int = 0, alpha: float = 0.05, grid: np.ndarray = ROC_GRID) -> dict[Any, dict[str, Any]]:
    """Bootstrap bands of several ROC curves `{key: (positives bool (n,), score (n,))}` from the same
    resamples. Per key: grid, tpr (the curve itself on the grid), low / high (band), auroc, auroc_ci,
    and 'auroc_boot' (the resamples' AUROCs, for macro intervals). Undefined curves are left out."""
    n = len(next(iter(curves.values()))[1]) if curves else 0
    defined = {k: (np.asarray(p, bool), np.asarray(s, np.float64)) for k, (p, s) in curves.items()
               if _binary_auroc(np.asarray(p, np.int64), np.asarray(s)) is not None}
    tprs: dict[Any, list[np.ndarray]] = {k: [] for k in defined}
    aucs: dict[Any, list[np.ndarray]] = {k: [] for k in defined}
    if n_boot > 0 and defined:
        for W in bootstrap_weights(strata, n, n_boot, seed):
            for k, (p, s) in defined.items():
                tprs[k].append(weighted_roc_on_grid(s, p, W, grid))
                aucs[k].append(_weighted_auroc(s, p, W))
    out = {}
    q = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]
    for k, (p, s) in defined.items():
        band: dict[str, Any] = {"grid": grid, "tpr": weighted_roc_on_grid(s, p, np.ones((1, n)), grid)[0],
                                "auroc": _binary_auroc(p.astype(np.int64), s), "low": None, "high": None,
                                "auroc_ci": (None, None), "auroc_boot": np.empty(0)}
        if tprs[k]:
            T = np.concatenate(tprs[k])
            T = T[np.isfinite(T).all(1)]
            A = np.concatenate(aucs[k])
            band["auroc_boot"] = A
            A = A[np.isfinite(A)]
            if T.size:
                band["low"], band["high"] = np.percentile(T, q, axis=0)
            if A.size:
                lo, hi = np.percentile(A, q)
                band["auroc_ci"] = (float(lo), float(hi))
        out[k] = band
    return out


def roc_band(y_bin: Any, score: Any, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
             strata: Any = None, grid: np.ndarray = ROC_GRID) -> dict[str, Any] | None:
    """One ROC curve's bootstrap band (see :func:`roc_bands`); resampling is stratified by `strata`
    labels (default: `y_bin`). None when the curve is undefined (one class only)."""
    y = np.asarray(y_bin).astype(bool)
    labels = y if strata is None else np.asarray(strata)
    groups = [np.flatnonzero(labels == v) for v in np.unique(labels)]
    return roc_bands({0: (y, np.asarray(score))}, groups, n_boot, seed, alpha, grid).get(0)


def _figure(figsize: tuple[float, float]):
    """Figure bound to an Agg canvas: no pyplot, so no global backend switch and no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, path: str | os.PathLike, dpi: int) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return write_atomic(path, buf.getvalue())


def _ci(lo: float | None, hi: float | None) -> str:
    return "" if lo is None or hi is None else f" (95% CI {lo:.3f}\u2013{hi:.3f})"


def plot_roc(
    y_true: Any,
    probs: Any,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    positive_class: int = 1,
    multilabel: bool = False,
    title: str | None = None,
    dpi: int = 150,
    *,
    split: str | None = None,
    checkpoint: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    record: MutableMapping[str, Any] | None = None,
) -> str:
    """ROC curves as a PNG: binary, the positive class; multi-class and multi-label, one-vs-rest per
    class (undefined classes skipped). Each curve has its bootstrap band (``n_boot`` resamples, 0: no
    band) and its AUROC with a 95% CI in the legend; the title names ``split`` and ``checkpoint``.
    ``record`` (a dict) receives each curve's band arrays by class name (and 'macro' intervals)."""
    if multilabel:
        Y, P, C = _prepare_multilabel(y_true, probs, num_classes)
        curves = {k: (Y[:, k].astype(bool), P[:, k]) for k in range(C)}
        strata = [np.arange(Y.shape[0])]
    else:
        y, P, C = _prepare_single_label(y_true, probs, num_classes)
        ks = [positive_class] if C == 2 else range(C)
        curves = {k: (y == k, P[:, k]) for k in ks}
        strata = [s for s in (np.flatnonzero(y == k) for k in range(C)) if s.size]
    names = _class_names(class_names, C)
    bands = roc_bands(curves, strata, n_boot, seed, alpha)
    fig = _figure((6.4, 6.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (AUROC 0.5)")
    colors = [f"C{i % 10}" for i in range(len(curves))]
    from sklearn.metrics import roc_curve
    for color, (k, band) in zip(colors, bands.items()):
        pos, score = curves[k]
        fpr, tpr, _ = roc_curve(pos.astype(np.int64), score)
        name = f"{names[k]} (positive class)" if not multilabel and C == 2 else names[k]
        ax.plot(fpr, tpr, linewidth=1.8, color=color,
                label=f"{name}: AUROC {band['auroc']:.3f}{_ci(*band['auroc_ci'])}")
        if band["low"] is not None:
            ax.fill_between(band["grid"], band["low"], band["high"], color=color, alpha=0.18, linewidth=0)
        if record is not None:
            record[names[k]] = {key: band[key] for key in ("grid", "tpr", "low", "high", "auroc", "auroc_ci")}
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    n = len(next(iter(curves.values()))[1]) if curves else 0
    lines = [title or plot_caption("ROC", split, checkpoint)]
    if len(bands) > 1:
        boots = [b["auroc_boot"] for b in bands.values()]
        macro = float(np.mean([b["auroc"] for b in bands.values()]))
        lo = hi = None
        if all(b.size for b in boots):
            per = _nanmean_rows(np.stack(boots, axis=1))
            per = per[np.isfinite(per)]
            if per.size:
                lo, hi = (float(v) for v in np.percentile(per, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
        lines.append(f"macro AUROC {macro:.3f}{_ci(lo, hi)}, one-vs-rest")
        if record is not None:
            record["macro"] = {"auroc": macro, "auroc_ci": (lo, hi)}
    count = f"n = {n}"
    if len(bands) == 1 and not multilabel:
        npos = int(curves[next(iter(bands))][0].sum())
        count += f" ({npos} positive, {n - npos} negative)"
    band_note = f"shaded: {100 * (1 - alpha):.0f}% bootstrap band, {n_boot} resamples" if n_boot > 0 else "no band"
    lines.append(f"{count}; {band_note}")
    ax.set_title("\n".join(lines), fontsize=9.5)
    ax.legend(loc="lower right", fontsize="small")
    return _save_png(fig, path, dpi)


def plot_confusion_matrix(
    cm: Any,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    normalize: bool = True,
    title: str | None = None,
    dpi: int = 150,
    *,
    split: str | None = None,
    checkpoint: str | None = None,
) -> str:
    """Confusion-matrix heat map as a PNG: rows = true class (with its count), columns = predicted.
    Each cell shows its row-normalised share in % and its count; ``normalize`` colours cells by that
    share (else by count, and cells show counts only)."""
    cm = np.asarray(cm, dtype=np.float64)
    C = cm.shape[0]
    names = _class_names(class_names, C)
    support = cm.sum(1)
    share = _safe_div(cm, support[:, None])
    shown = share if normalize else cm
    size = max(4.0, 0.7 * C + 2.0)
    fig = _figure((size + 1.2, size))
    ax = fig.add_subplot(1, 1, 1)
    vmax = 1.0 if normalize else max(float(shown.max()), 1.0)
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class" if normalize else "count", fontsize=8)
    if normalize:
        bar.set_ticks([0, 0.25, 0.5, 0.75, 1.0], labels=["0%", "25%", "50%", "75%", "100%"])
    ax.set_xticks(range(C), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(C), labels=[f"{name} (n={int(s)})" for name, s in zip(names, support)])
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    kind = "Confusion matrix (% of each true class, count)" if normalize else "Confusion matrix (counts)"
    ax.set_title(title or plot_caption(kind, split, checkpoint).replace(" | ", "\n", 1), fontsize=9.5)
    if C <= 30:  # annotations become unreadable beyond that
        for i in range(C):
            for j in range(C):
                txt = f"{100 * share[i, j]:.0f}%\n{int(cm[i, j])}" if normalize else f"{int(cm[i, j])}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=8 if C <= 10 else 6,
                        color="white" if shown[i, j] > vmax / 2.0 else "black")
    return _save_png(fig, path, dpi)
