"""VisionFM's measurement label files: biomarker regression rows (`path;v1,...,v38`, empty or `nan` fields
missing) and progression-forecasting lines (`path, label, days`, in `{training,test}_labels.txt` or
`training.txt` / `test.txt`), read with the same line reader, image resolution and one-line errors as the
classification layouts of `util.label_layouts`.
"""
from __future__ import annotations

import math
import os
import re
from typing import NamedTuple, Sequence

from util.cli import UserError
from util.label_layouts import (VFM_LABEL_FILES, VFM_MARKERS, label_lines, listed_image, normalize_split,
                                vfm_datasets, vfm_label_file)

TARGET_NAMES_FILE = "target_names.txt"  # optional sidecar: one biomarker name per line
_MISSING = {"", "nan", "na", "n/a", "none", "null"}
_FORECAST_HELP = "expected 'path, label, days' (e.g. 'training/1.jpg, 0, 309')"


class ForecastRecord(NamedTuple):
    """One forecasting line: the image, progression within the interval (0/1) and the interval in days."""
    path: str
    label: int
    days: int


def _label_file_for(root: str, split: str, what: str) -> list[str]:
    split = normalize_split(split)
    dirs = vfm_datasets(root) if os.path.isdir(root) else []
    if not dirs:
        raise UserError(f"{root}: no VisionFM {what} label files ({' / '.join(VFM_MARKERS)}) in it or its sub-folders")
    files = [f for f in (vfm_label_file(d, split) for d in dirs) if f]
    if not files:
        raise UserError(f"{root}: no {split} label file ({' or '.join(VFM_LABEL_FILES[split])})")
    return files


def _header_names(path: str) -> list[str] | None:
    """Target names from a `# targets: a, b, ...` comment line, if the file has one."""
    with open(path, encoding="utf-8-sig") as f:
        for raw in f:
            m = re.match(r"\s*#\s*targets?\s*:\s*(.+)", raw)
            if m:
                return [n.strip() for n in m.group(1).split(",")]
    return None


def holds_measurements(label_files: Sequence[str]) -> bool:
    """True when VisionFM label lines hold measurements rather than class labels: a missing value (an empty
    field, nan/NA) or a non-integer number (biomarker files, read by `read_vfm_regression`)."""
    for lf in label_files:
        for _, line in label_lines(lf):
            if ";" not in line:
                continue
            for v in (x.strip().lower() for x in line.rsplit(";", 1)[1].split(",")):
                if v in _MISSING:
                    return True
                try:
                    if not float(v).is_integer():
                        return True
                except ValueError:
                    return False  # not numbers: the class-label reader names the line
    return False


def read_vfm_regression(root: str, split: str, num_targets: int | None = None,
                        target_names: Sequence[str] | None = None):
    """VisionFM regression label files (`relative/path;v1,...,vT`) of one split, over every dataset under root.

    Returns `(paths, targets, names)`: absolute image paths, a float64 array [N, T] with NaN where a value
    is missing (an empty field or nan/NA), and T target names: `target_names` if given, else a
    `# targets: a, b, ...` header line, else a `target_names.txt` sidecar (one name per line) in the
    dataset folder, else `target_1..target_T`. Errors name the file and line (arity, non-numbers,
    infinities, missing images, paths leaving the data root)."""
    import numpy as np  # only this reader needs numpy; keep the module import light
    paths: list[str] = []
    rows: list[list[float]] = []
    names: list[str] | None = list(target_names) if target_names else None
    width: tuple[int, str] | None = None
    for lf in _label_file_for(root, split, "regression"):
        base = os.path.dirname(os.path.abspath(lf))
        for lineno, line in label_lines(lf):
            where = f"{lf}:{lineno}"
            if ";" not in line:
                raise UserError(f"{where}: malformed line {line!r}; expected 'relative/path;v1,v2,...'")
            rel, rest = line.rsplit(";", 1)
            fields = [v.strip() for v in rest.split(",")] if "," in rest else rest.split()
            values = []
            for v in fields:
                if v.lower() in _MISSING:
                    values.append(float("nan"))
                    continue
                try:
                    x = float(v)
                except ValueError:
                    raise UserError(f"{where}: value {v!r} is not a number (leave a field empty for a missing "
                                    "value)") from None
                if math.isinf(x):
                    raise UserError(f"{where}: value {v!r} is infinite")
                values.append(x)
            expect = num_targets if num_targets is not None else (width[0] if width else None)
            if expect is not None and len(values) != expect:
                src = "--num_labels" if num_targets is not None else f"{width[1]}"
                raise UserError(f"{where}: {len(values)} target value(s) but {src} has {expect}; every line "
                                "needs the same number of comma-separated values")
            width = width or (len(values), f"{lf}:{lineno}")
            paths.append(listed_image(rel.strip(), base, where))
            rows.append(values)
        if names is None:
            names = _header_names(lf)
            side = os.path.join(os.path.dirname(lf), TARGET_NAMES_FILE)
            if names is None and os.path.isfile(side):
                with open(side, encoding="utf-8-sig") as f:
                    names = [n.strip() for n in f if n.strip()]
    if not rows:
        raise UserError(f"{root}: no labelled images in the {split} label file(s)")
    t = len(rows[0])
    if names is None:
        names = [f"target_{i + 1}" for i in range(t)]
    if len(names) != t:
        raise UserError(f"{root}: {len(names)} target names but the label lines have {t} values; "
                        "give one name per value")
    return paths, np.asarray(rows, dtype=np.float64).reshape(len(rows), t), names


def read_vfm_forecasting(root: str, split: str, num_labels: int | None = None) -> list[ForecastRecord]:
    """VisionFM forecasting labels of one split: `{training,test}_labels.txt` (README) or
    `training.txt`/`test.txt` (what its code reads), lines `path, label, days` with `, ` or `,`.

    Labels are 0/1 (`num_labels` 1 or 2) or below `num_labels`; days are non-negative numbers, returned
    rounded to whole days. Errors name the file and line."""
    limit = 2 if num_labels in (None, 1) else int(num_labels)
    out: list[ForecastRecord] = []
    for lf in _label_file_for(root, split, "forecasting"):
        base = os.path.dirname(os.path.abspath(lf))
        for lineno, line in label_lines(lf):
            where = f"{lf}:{lineno}"
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3 or ";" in line:
                raise UserError(f"{where}: {len(parts)} field(s) in {line!r}; {_FORECAST_HELP}")
            rel, lab, days = parts
            try:
                k, d = float(lab), float(days)
            except ValueError:
                raise UserError(f"{where}: label {lab!r} and days {days!r} must be numbers; {_FORECAST_HELP}") from None
            if k != int(k) or not 0 <= k < limit:
                raise UserError(f"{where}: label {lab!r} must be an integer in [0, {limit - 1}]")
            if not math.isfinite(d) or d < 0:
                raise UserError(f"{where}: days {days!r} must be a non-negative number of days")
            out.append(ForecastRecord(listed_image(rel, base, where), int(k), int(round(d))))
    if not out:
        raise UserError(f"{root}: no labelled images in the {split} forecasting label file(s)")
    return out
