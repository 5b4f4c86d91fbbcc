"""What feature extraction computes: frozen-encoder features of one pass over a split, appended to this
rank's shards of a `util.feature_store.FeatureWriter`, and which samples a (resumed) pass still owes.

A sample is keyed by its full image stem (path relative to the data root, without extension); the
augmented repeats of a training image (pass `epoch` >= 1) add `_e<epoch>`, so every (image, pass) pair
has one key and a resumed extraction knows exactly what is missing.
"""
from __future__ import annotations

import logging
import time
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from util.dist import get_rank, get_world_size
from util.feature_store import FeatureWriter
from util.logger import MetricLogger
from util.loop import autocast
from util.samplers import SequentialShardSampler

logger = logging.getLogger("medfound")


def sample_key(stem: str, epoch: int) -> str:
    """The stored key of image `stem` in pass `epoch` (pass 0, the plain transform, keeps the stem)."""
    return stem if epoch == 0 else f"{stem}_e{epoch}"


def pending_keys(stems: Sequence[str], epoch: int, done: set[str]) -> list[tuple[int, int]]:
    """This rank's `(epoch, index)` items of one pass that no complete shard holds yet: the missing items
    are split into contiguous blocks, one per rank, so no sample goes to two ranks. Every rank must
    compute `done` from the same files (list them before any rank writes)."""
    todo = [(epoch, i) for i, s in enumerate(stems) if sample_key(s, epoch) not in done]
    mine = SequentialShardSampler(len(todo), num_replicas=get_world_size(), rank=get_rank())
    return [todo[j] for j in mine]


@torch.no_grad()
def extract_split(encoder: nn.Module, loader, writer: FeatureWriter, device: torch.device | str,
                  amp: str = "none", epoch: int = 0, stems: Sequence[str] = (),
                  extra: Mapping[str, torch.Tensor] | None = None, header: str = "") -> int:
    """Encode every batch `(images, targets, indices)` of `loader` and append it to `writer`.

    `stems[index]` names a sample (`_e<epoch>` is added for augmented passes); `extra` holds per-sample
    fields indexed by dataset index (e.g. `days`), stored beside the pass number `epoch`. Returns the
    number of samples written (this rank). Shards are flushed by the caller at the end of the split."""
    device = torch.device(device)
    encoder.eval()
    fields = dict(extra or {})
    count, start = 0, time.time()
    metric_logger = MetricLogger(header=header or f"extract pass {epoch}", print_freq=20)
    total = len(loader) if hasattr(loader, "__len__") else None
    for images, targets, indices in metric_logger.log_every(loader, total):
        with autocast(amp, device):
            feats = encoder(images.to(device, non_blocking=True))
        idx = torch.as_tensor(indices).long().cpu()
        labels = torch.as_tensor(targets).float().cpu()
        per_sample = {"epoch": torch.full((len(idx),), int(epoch), dtype=torch.long)}
        per_sample.update({k: torch.as_tensor(v)[idx] for k, v in fields.items()})
        writer.add([sample_key(stems[i], epoch) for i in idx.tolist()], feats.float(), labels, per_sample)
        count += len(idx)
        metric_logger.update(images_per_s=len(idx) / max(time.time() - start, 1e-9))
        start = time.time()
    return count
