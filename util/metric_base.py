"""Shared pieces of the metrics modules: numpy conversions that keep results JSON-safe (None, never NaN)
and the validation of (y_true, probs) inputs for single-label and multi-label tasks.

Conventions (every metrics module): ``y_true`` is an int array (N,) of class indices (a one-hot (N, C)
array is accepted too), or a (N, C) 0/1 array for multi-label tasks; ``probs`` is a float array (N, C)
of probabilities (softmax for multi-class, including a 2-way softmax binary head; for a single-sigmoid
binary head C == 1 and the column is P(class 1)). Torch tensors are accepted without importing torch.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


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
