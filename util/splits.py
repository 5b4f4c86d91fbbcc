"""Splitting labelled samples: USPEC's few-shot shots, the seeded stratified validation carve for data
without a val split, and USPEC's `--train_percent` subset. Each depends only on the sample set, its
parameters and a seed (never on file-system order), and the carve returns a record to save with the run.
"""
from __future__ import annotations

import math
import os
import random
from collections import defaultdict
from typing import Any, Sequence

from util.cli import UserError
from util.label_layouts import Sample, Target, read_flat_classes


def _class_key(target: Target) -> Any:
    """Stratum of a sample: its class index, or its whole row for multi-label targets."""
    return tuple(target) if isinstance(target, (tuple, list)) else int(target)


def few_shot_split(root_or_samples: str | Sequence[Sample], shots: float, seed: int,
                   classes: Sequence[str] | None = None) -> tuple[list[Sample], list[Sample], list[str]]:
    """USPEC `build_few_shot_dataset`, exactly: classes in sorted order share ONE `random.Random(seed)`;
    per class the sorted file list is shuffled, k = int(n*shots) if shots < 1 else int(shots), clipped to
    [0, n], the first k go to train and the rest to test. Returns (train, test, classes).

    Given samples instead of a root, classes are taken in class-index order and files sorted by path.
    """
    if isinstance(shots, bool) or not isinstance(shots, (int, float)) or not shots > 0:
        raise UserError(f"--few_shot must be > 0 (a shot count, or a fraction below 1), got {shots!r}")
    if isinstance(root_or_samples, (str, os.PathLike)):
        samples, classes = read_flat_classes(os.fspath(root_or_samples))
    else:
        samples = list(root_or_samples)
        if classes is None:
            classes = [str(i) for i in range(max((int(t) for _, t in samples), default=-1) + 1)]
    by_class: dict[int, list[str]] = defaultdict(list)
    for path, t in samples:
        by_class[int(t)].append(path)
    rng = random.Random(seed)
    train: list[Sample] = []
    test: list[Sample] = []
    for c in sorted(by_class):
        files = sorted(by_class[c])
        n = len(files)
        k = int(n * shots) if shots < 1 else int(shots)
        k = max(0, min(k, n))
        rng.shuffle(files)
        train.extend((f, c) for f in files[:k])
        test.extend((f, c) for f in files[k:])
    return train, test, list(classes)


def stratified_carve(samples: Sequence[Sample], fraction: float, seed: int
                     ) -> tuple[list[Sample], list[Sample], dict[str, Any]]:
    """Seeded stratified split of `samples` into (train, val, info) for data without a val split.

    Per stratum (class, or label row for multi-label) in sorted order, one shared `random.Random(seed)`
    shuffles the path-sorted samples and round(fraction*n) go to val, clipped so a stratum with >= 2
    samples keeps at least one on each side (a singleton stays in train). Both outputs keep the input
    order, and depend only on the sample set, fraction and seed. `info` records seed, fraction and the
    per-stratum counts, to be saved with the run.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {fraction!r}")
    strata: dict[Any, list[int]] = defaultdict(list)
    for i, (_, t) in enumerate(samples):
        strata[_class_key(t)].append(i)
    rng = random.Random(seed)
    val_idx: set[int] = set()
    counts: dict[str, dict[str, int]] = {}
    for key in sorted(strata):
        idx = sorted(strata[key], key=lambda i: samples[i][0])
        n = len(idx)
        k = int(math.floor(fraction * n + 0.5)) if fraction > 0 else 0
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        elif n < 2:
            k = 0
        rng.shuffle(idx)
        val_idx.update(idx[:k])
        counts[str(key) if not isinstance(key, tuple) else ",".join(f"{v:g}" for v in key)] = {"train": n - k, "val": k}
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    info = {"method": "stratified_carve", "seed": int(seed), "fraction": float(fraction),
            "num_train": len(train), "num_val": len(val), "counts": counts}
    return train, val, info


def train_percent_subset(samples: Sequence[Sample], percent: float, seed: int) -> list[Sample]:
    """USPEC `--train_percent`: per class, a fresh `random.Random(seed)` samples int(percent*n) of the
    class's files (here in sorted order, USPEC used `os.listdir` order). percent 1 keeps everything."""
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < percent <= 1:
        raise UserError(f"--train_percent must be in (0, 1], got {percent!r}")
    if math.isclose(percent, 1.0, rel_tol=1e-9, abs_tol=1e-12):
        return list(samples)
    by_class: dict[Any, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[_class_key(s[1])].append(s)
    out: list[Sample] = []
    for key in sorted(by_class):
        names = sorted(by_class[key], key=lambda s: s[0])
        out.extend(random.Random(seed).sample(names, int(percent * len(names))))
    return out
