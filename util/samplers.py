"""Class balance and distributed evaluation: inverse-frequency class weights, a class-balanced
training sampler, and an evaluation sampler that gives each sample to exactly one rank.
"""
from __future__ import annotations

from collections.abc import Sized
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler

from util.label_layouts import Target


def class_totals(targets: Sequence[Target], num_classes: int) -> np.ndarray:
    """Samples per class index (multi-label rows: positives per column); out-of-range indices ignored."""
    totals = np.zeros(num_classes, dtype=np.float64)
    for t in targets:
        if isinstance(t, (tuple, list)):
            totals[: len(t)] += np.asarray(t[:num_classes], dtype=np.float64) > 0
        elif 0 <= int(t) < num_classes:
            totals[int(t)] += 1
    return totals


def _targets_of(samples_or_targets: Sequence[Any]) -> list[Target]:
    return [s[1] if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str) else s
            for s in samples_or_targets]


def class_weights(samples_or_targets: Sequence[Any], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights N / (C * n_c) (mean 1 over present classes; absent classes get 0), for
    `CrossEntropyLoss(weight=...)`. Multi-label rows count positives per column."""
    targets = _targets_of(samples_or_targets)
    counts = class_totals(targets, num_classes)
    w = np.zeros(num_classes, dtype=np.float64)
    present = counts > 0
    w[present] = len(targets) / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def weighted_sampler(samples_or_targets: Sequence[Any], num_classes: int, num_samples: int | None = None,
                     replacement: bool = True, generator: torch.Generator | None = None,
                     seed: int | None = None) -> WeightedRandomSampler:
    """A `WeightedRandomSampler` drawing classes about equally often (per-sample weight = its class
    weight; multi-label: the largest weight among its positive columns, 1 when it has none). `seed`
    makes the draws reproducible when no `generator` is given. Single-process only: for DDP, shard
    its indices yourself."""
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    targets = _targets_of(samples_or_targets)
    cw = class_weights(targets, num_classes).numpy()
    per = []
    for t in targets:
        if isinstance(t, (tuple, list)):
            pos = [cw[i] for i, v in enumerate(t[:num_classes]) if v > 0]
            per.append(max(pos) if pos else 1.0)
        else:
            per.append(cw[int(t)])
    return WeightedRandomSampler(torch.tensor(per, dtype=torch.double), num_samples or len(targets),
                                 replacement=replacement, generator=generator)


balanced_sampler = weighted_sampler  # the name main_finetune.py uses


class SequentialShardSampler(Sampler[int]):
    """Evaluation sampler: each index goes to exactly one rank, with no padding or duplicates, so
    gathered predictions count every sample once (DistributedSampler pads to equal lengths).

    `contiguous` gives rank r a block (the first N % W ranks get one extra); `strided` gives r, r+W, ...
    Ranks may differ in length by one, so gather with padding-aware collectives (e.g. all_gather_object).
    """

    def __init__(self, dataset: Sized | int, num_replicas: int | None = None, rank: int | None = None,
                 mode: str = "contiguous") -> None:
        from util.dist import get_rank, get_world_size
        self.n = dataset if isinstance(dataset, int) else len(dataset)
        self.num_replicas = get_world_size() if num_replicas is None else int(num_replicas)
        self.rank = get_rank() if rank is None else int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} out of range for {self.num_replicas} replicas")
        if mode not in ("contiguous", "strided"):
            raise ValueError(f"mode must be 'contiguous' or 'strided', got {mode!r}")
        self.mode = mode

    def _indices(self) -> range:
        if self.mode == "strided":
            return range(self.rank, self.n, self.num_replicas)
        base, extra = divmod(self.n, self.num_replicas)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())

    def set_epoch(self, epoch: int) -> None:  # interface parity with DistributedSampler
        pass
