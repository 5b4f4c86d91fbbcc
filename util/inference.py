"""What a trained classifier's outputs mean, shared by finetuning, evaluation and the explanation tools:
logits -> class probabilities, the frozen pooled features of every sample of a loader, and the weighted
k-NN classifier on such features (k-NN evaluation, pretraining monitors)."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from util.dist import get_world_size, is_dist
from util.loop import autocast


def probabilities(logits: torch.Tensor, task: str, two_columns: bool = False) -> torch.Tensor:
    """Softmax for multi-class (a 2-way softmax binary head included), sigmoid for one logit or multi-label.

    A one-logit binary head gives one column P(class 1) (what the metrics take), or with `two_columns`
    the pair [1 - p, p], one column per class name (what per-class maps and tables show)."""
    logits = logits.float()
    if two_columns and (task == "binary_sigmoid" or logits.shape[1] == 1):
        p = torch.sigmoid(logits[:, :1])
        return torch.cat([1 - p, p], dim=1)
    if task in ("multilabel", "binary_sigmoid"):
        return torch.sigmoid(logits)
    return logits.softmax(dim=-1)


def gather_variable(t: torch.Tensor) -> torch.Tensor:
    """Concatenate per-rank tensors of different lengths (evaluation shards are not padded)."""
    if not is_dist():
        return t
    parts: list[Any] = [None] * get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts)


@torch.no_grad()
def extract_features(model: nn.Module, loader, device: torch.device | str = "cpu", amp: str = "none"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled encoder features (the head's input, `forward_head(..., pre_logits=True)`), targets and
    dataset indices of every batch `(images, targets, indices)` of `loader`, gathered from all ranks and
    ordered by dataset index (so they do not depend on world size)."""
    device = torch.device(device)
    model.eval()
    feats, targets, indices = [], [], []
    for batch in loader:
        with autocast(amp, device):
            tokens = model.forward_features(batch[0].to(device, non_blocking=True))
            f = model.forward_head(tokens, pre_logits=True)
        feats.append(f.float().cpu())
        targets.append(torch.as_tensor(batch[1]).cpu())
        indices.append(torch.as_tensor(batch[2]).cpu())
    idx = gather_variable(torch.cat(indices))
    order = torch.argsort(idx)
    return gather_variable(torch.cat(feats))[order], gather_variable(torch.cat(targets))[order], idx[order]


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN on L2-normalised features (DINO/iBOT): the top-k cosine neighbours vote with
    weight exp(sim / T); returns class probabilities (N_test, C)."""
    train = F.normalize(train_feats, dim=1)
    test = F.normalize(test_feats, dim=1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test.shape[0], chunk):
        sim, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx].long(), (sim / temperature).exp())
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out)
