"""Metric report files and logging: ``<prefix>_metrics.json`` / ``.csv`` written atomically, and the
scalar entries of a metric dict sent to TensorBoard. Import them through ``util.metrics``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Mapping

import numpy as np

from util.atomic import write_atomic
from util.metric_base import _is_number, _py


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


def write_metrics(metrics: Mapping[str, Any], out_dir: str | os.PathLike, prefix: str = "test") -> tuple[str, str]:
    """Write ``<prefix>_metrics.json`` and a flat two-column ``<prefix>_metrics.csv`` (metric,value) atomically.

    Nested values are flattened as ``key.index`` (e.g. ``auroc_per_class.2``); None is an empty cell.
    Returns (json_path, csv_path).
    """
    clean = _jsonable(dict(metrics))
    json_path = os.path.join(os.fspath(out_dir), f"{prefix}_metrics.json")
    csv_path = os.path.join(os.fspath(out_dir), f"{prefix}_metrics.csv")
    write_atomic(json_path, (json.dumps(clean, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "value"])
    for k, v in _flatten(clean):
        w.writerow([k, "" if v is None else v])
    write_atomic(csv_path, buf.getvalue().encode("utf-8"))
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
