"""What one step of a VisionFM decoder computes, and its evaluation on the full set.

Batches are `(x, target, days, index)`: x is an image batch (when the model holds a frozen encoder) or a
feature batch; `days` is the forecasting interval (zeros for other tasks). Each `<task>_forward(model,
batch)` returns `(loss, scalars)` for `util.loop.train_epoch`. Evaluation collects every output of the
split first and computes the metrics once through `util.metrics` (never per batch, which changes AUROC).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from util.loop import Optimization, autocast, train_epoch
from util.metrics import bootstrap_ci, bootstrap_weights, classification_metrics, regression_metrics

TASKS = ("cls", "multi_cls", "metric_reg", "forecasting")
# VisionFM's 13-label fundus scheme: columns 0-4 are the one-hot DR grade, column 5 (DR) is 1 when column 0
# (Healthy) is 0, columns 6-12 are independent diseases.
VFM13_CLASSES = ("Healthy", "DR-1", "DR-2", "DR-3", "DR-4", "DR", "Glaucoma", "AMD", "Cataract",
                 "Hypertensive Retinopathy", "Retinal Vein Occlusion", "Myopia", "Retinal Detachment")


class Decoder(nn.Module):
    """A head on features, optionally computed on the fly by a frozen encoder (kept in eval mode, no grad).
    Only the head is trainable, so only `head` is saved."""

    def __init__(self, head: nn.Module, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.head = head
        self.encoder = encoder
        if encoder is not None:
            encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> "Decoder":
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: dropout/BN of the encoder never switch to training behaviour
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            return x.flatten(1)
        with torch.no_grad():
            return self.encoder(x).flatten(1).float()

    def forward(self, x: torch.Tensor, days: torch.Tensor | None = None) -> torch.Tensor:
        f = self.features(x)
        return self.head(f, days) if days is not None else self.head(f)


def _to(batch: Sequence[Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y, days = batch[0], batch[1], batch[2]
    return (x.to(device, non_blocking=True), y.to(device, non_blocking=True),
            days.to(device, non_blocking=True).float())


def cls_forward(model: nn.Module, batch: Sequence[Any], device: torch.device) -> tuple[torch.Tensor, dict]:
    """Single-label: cross-entropy over C logits; `--num_labels 1` is binary with one logit and BCE."""
    x, y, _ = _to(batch, device)
    logits = model(x).float()
    if logits.shape[1] == 1:
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], y.float().reshape(-1))
        acc = ((logits[:, 0] > 0).long() == y.long().reshape(-1)).float().mean()
    else:
        loss = F.cross_entropy(logits, y.long().reshape(-1))
        acc = (logits.argmax(1) == y.long().reshape(-1)).float().mean()
    return loss, {"acc": acc.detach()}


def multi_cls_forward(model: nn.Module, batch: Sequence[Any], device: torch.device) -> tuple[torch.Tensor, dict]:
    """Multi-label: BCE per label, averaged over labels and samples."""
    x, y, _ = _to(batch, device)
    logits = model(x).float()
    return F.binary_cross_entropy_with_logits(logits, y.float()), {}


def masked_regression_loss(pred: torch.Tensor, target_z: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """Mean loss over the present (finite) standardised targets only; a missing value adds nothing and
    passes no gradient (it is replaced by the prediction itself before the loss)."""
    present = torch.isfinite(target_z)
    safe = torch.where(present, target_z, pred.detach())
    per = F.smooth_l1_loss(pred, safe, reduction="none") if kind == "smooth_l1" else (pred - safe) ** 2
    return (per * present).sum() / present.sum().clamp_min(1)


def make_reg_forward(mean: torch.Tensor, std: torch.Tensor, kind: str = "smooth_l1") -> Callable:
    """Regression on targets standardised per biomarker with the training mean/std."""
    def reg_forward(model: nn.Module, batch: Sequence[Any], device: torch.device) -> tuple[torch.Tensor, dict]:
        x, y, _ = _to(batch, device)
        pred = model(x).float()
        z = (y.float() - mean.to(device)) / std.to(device)
        return masked_regression_loss(pred, z, kind), {"present": torch.isfinite(z).float().mean()}
    return reg_forward


def make_forecast_forward(pos_weight: float) -> Callable:
    """Weighted BCE on one logit; pos_weight is a tensor on the logit's device (the reference passed an int)."""
    def forecast_forward(model: nn.Module, batch: Sequence[Any], device: torch.device) -> tuple[torch.Tensor, dict]:
        x, y, days = _to(batch, device)
        logit = model(x, days).float().reshape(-1)
        w = torch.tensor([pos_weight], dtype=torch.float32, device=logit.device)
        return F.binary_cross_entropy_with_logits(logit, y.float().reshape(-1), pos_weight=w), {}
    return forecast_forward


def forward_for(task: str, device: torch.device, *, target_mean: torch.Tensor | None = None,
                target_std: torch.Tensor | None = None, reg_loss: str = "smooth_l1",
                pos_weight: float = 10.0) -> Callable[[nn.Module, Any], Any]:
    fn = {"cls": cls_forward, "multi_cls": multi_cls_forward}.get(task)
    if task == "metric_reg":
        fn = make_reg_forward(target_mean, target_std, reg_loss)
    elif task == "forecasting":
        fn = make_forecast_forward(pos_weight)
    return lambda model, batch: fn(model, batch, device)


def cosine_lr(optimizer: torch.optim.Optimizer, base_lr: float, epochs: int) -> Callable[[float], float]:
    """Cosine from base_lr to 0 over `epochs` (VisionFM's CosineAnnealingLR, evaluated per iteration)."""
    def lr_fn(progress: float) -> float:
        lr = 0.5 * base_lr * (1.0 + math.cos(math.pi * min(progress, epochs) / max(epochs, 1)))
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr
    return lr_fn


def train_one_epoch(model: nn.Module, loader: Iterable[Any], opt: Optimization, epoch: int, device: torch.device,
                    forward: Callable, lr_fn: Callable[[float], float], **kw: Any) -> dict[str, float]:
    return train_epoch(model, loader, opt, epoch, device, forward, lr_fn, header=f"Epoch [{epoch}]", **kw)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[Any], device: torch.device, amp: str = "none"
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(raw outputs [N, K], targets, days, sample indices) of the whole split, in sample order."""
    model.eval()
    outs, ys, ds, idx = [], [], [], []
    forecasting = isinstance(getattr(model, "head", None), nn.Module) and hasattr(model.head, "pe")
    for batch in loader:
        x, y, days = _to(batch, device)
        with autocast(amp, device):
            out = model(x, days) if forecasting else model(x)
        outs.append(out.float().cpu())
        ys.append(batch[1].cpu())
        ds.append(batch[2].cpu())
        idx.append(batch[3].cpu())
    order = torch.cat(idx).argsort()
    return (torch.cat(outs)[order].numpy(), torch.cat(ys)[order].numpy(), torch.cat(ds)[order].numpy(),
            torch.cat(idx)[order].numpy())


def probabilities(task: str, outputs: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(outputs).double()
    if task == "cls" and t.shape[1] > 1:
        return t.softmax(1).numpy()
    return t.sigmoid().numpy()


def _ci_dict(ci: dict[str, tuple]) -> dict[str, list]:
    return {k: [lo, hi] for k, (lo, hi) in ci.items()}


def classification_report(task: str, y: np.ndarray, probs: np.ndarray, class_names: Sequence[str] | None,
                          n_boot: int, seed: int) -> dict[str, Any]:
    """Single-label (C logits or one binary logit) or multi-label metrics with bootstrap CIs."""
    multilabel = task == "multi_cls"
    y = y.astype(np.int64) if multilabel else y.reshape(-1).astype(np.int64)
    num_classes = 2 if probs.shape[1] == 1 else probs.shape[1]
    names = list(class_names) if class_names else None
    m = classification_metrics(y, probs, num_classes=num_classes, class_names=names, multilabel=multilabel)
    if n_boot > 0:
        wanted = ("auroc", "auprc", "f1") if multilabel else ("auroc", "accuracy", "f1")
        m["ci95"] = _ci_dict(bootstrap_ci(y, probs, wanted, n_boot=n_boot, seed=seed, num_classes=num_classes,
                                          multilabel=multilabel))
    return m


def regression_report(y: np.ndarray, pred: np.ndarray, names: Sequence[str], n_boot: int, seed: int
                      ) -> dict[str, Any]:
    """Per-target MAE, RMSE, R², Pearson r (original units) over each target's present values; macro means
    over the targets where defined; bootstrap CIs of the macro MAE and R² (rows resampled)."""
    y = y.astype(np.float64)
    per: dict[str, list] = {"n": [], "mae": [], "rmse": [], "r2": [], "pearson_r": []}
    for t in range(y.shape[1]):
        ok = np.isfinite(y[:, t])
        if ok.sum() == 0:
            for k in per:
                per[k].append(0 if k == "n" else None)
            continue
        r = regression_metrics(y[ok, t], pred[ok, t])
        for k in per:
            per[k].append(r[k])

    def macro(vals: list) -> float | None:
        v = [x for x in vals if x is not None]
        return float(np.mean(v)) if v else None

    out: dict[str, Any] = {"task": "regression", "n": int(y.shape[0]), "num_targets": int(y.shape[1]),
                           "target_names": list(names), "missing": int((~np.isfinite(y)).sum())}
    out.update({k: macro(per[k]) for k in ("mae", "rmse", "r2", "pearson_r")})
    out.update({f"{k}_per_target": v for k, v in per.items()})
    if n_boot > 0:
        out["ci95"] = _ci_dict(_regression_ci(y, pred, n_boot, seed))
    return out


def _regression_ci(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> dict[str, tuple]:
    present = np.isfinite(y)
    yz, err = np.where(present, y, 0.0), np.where(present, p - np.where(present, y, 0.0), 0.0)
    maes, r2s = [], []
    for W in bootstrap_weights([np.arange(y.shape[0])], y.shape[0], n_boot, seed):
        w = W[:, :, None] * present[None]                     # (B, N, T) weights of present values
        cnt = w.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mae = (w * np.abs(err)[None]).sum(1) / cnt
            ym = (w * yz[None]).sum(1) / cnt
            ss_tot = (w * (yz[None] - ym[:, None]) ** 2).sum(1)
            r2 = 1 - (w * err[None] ** 2).sum(1) / ss_tot
            r2[~(ss_tot > 0)] = np.nan
            maes.append(_nanmean_rows(mae))
            r2s.append(_nanmean_rows(r2))
    ci = {}
    for name, vals in (("mae", maes), ("r2", r2s)):
        v = np.concatenate(vals)
        v = v[np.isfinite(v)]
        ci[name] = (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if v.size else (None, None)
    return ci


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    """Row means over the finite entries; NaN for a row without any (no warning)."""
    ok = np.isfinite(a)
    return np.where(ok.any(1), np.where(ok, a, 0.0).sum(1) / np.maximum(ok.sum(1), 1), np.nan)


def forecasting_report(y: np.ndarray, prob: np.ndarray, days: np.ndarray, buckets: Sequence[float],
                       n_boot: int, seed: int) -> dict[str, Any]:
    """AUROC, AP and F1 of P(progression) >= 0.5 on the full set, plus AUROC per interval bucket
    (edges in days; a bucket with one class only has AUROC None)."""
    y = y.reshape(-1).astype(np.int64)
    p = prob.reshape(-1, 1)
    m = classification_metrics(y, p, num_classes=2)
    out: dict[str, Any] = {k: m[k] for k in ("n", "auroc", "auprc", "accuracy", "balanced_accuracy",
                                             "sensitivity_positive", "specificity_positive", "confusion_matrix")}
    out["task"] = "forecasting"
    out["f1"] = m["f1_positive"]
    edges = [0.0, *sorted(float(b) for b in buckets), math.inf]
    per = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (days >= lo) & (days < hi)
        auc = None
        if sel.any() and len(np.unique(y[sel])) == 2:
            auc = classification_metrics(y[sel], p[sel], num_classes=2)["auroc"]
        per.append({"days": [lo, None if math.isinf(hi) else hi], "n": int(sel.sum()),
                    "positives": int(y[sel].sum()), "auroc": auc})
    out["auroc_per_interval"] = per
    if n_boot > 0:
        ci = bootstrap_ci(y, p, ("auroc", "auprc"), n_boot=n_boot, seed=seed, num_classes=2)
        out["ci95"] = _ci_dict(ci)
    return out


def evaluate(task: str, outputs: np.ndarray, y: np.ndarray, days: np.ndarray, *,
             class_names: Sequence[str] | None = None, target_mean: np.ndarray | None = None,
             target_std: np.ndarray | None = None, buckets: Sequence[float] = (365, 730, 1095),
             n_boot: int = 1000, seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    """(metrics, predictions): probabilities for classification/forecasting, values in original units for
    regression (outputs are standardised; mean/std of the training targets undo it)."""
    if task == "metric_reg":
        pred = outputs.astype(np.float64) * target_std + target_mean
        names = list(class_names) if class_names else [f"target_{i}" for i in range(y.shape[1])]
        return regression_report(y, pred, names, n_boot, seed), pred
    probs = probabilities(task, outputs)
    if task == "forecasting":
        return forecasting_report(y, probs, days, buckets, n_boot, seed), probs
    return classification_report(task, y, probs, class_names, n_boot, seed), probs


def headline(task: str, m: dict[str, Any]) -> str:
    """One line for logs and the summary."""
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"
    if task == "metric_reg":
        return f"MAE {f(m['mae'])}, RMSE {f(m['rmse'])}, R² {f(m['r2'])}, r {f(m['pearson_r'])} (macro over targets)"
    if task == "forecasting":
        return f"AUROC {f(m['auroc'])}, AP {f(m['auprc'])}, F1 {f(m['f1'])}"
    return f"AUROC {f(m['auroc'])}, AP {f(m['auprc'])}, F1 {f(m['f1'])}, accuracy {f(m['accuracy'])}"
