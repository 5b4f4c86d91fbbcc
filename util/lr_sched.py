"""Learning-rate schedules (compat T1): MAE's continuous per-iteration warm-up + half-cycle cosine,
and the DINO/iBOT precomputed array scheduler."""
from __future__ import annotations

import math

import numpy as np
import torch


def mae_lr(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """LR at a fractional epoch: linear from exactly 0 during warm-up, then half-cycle cosine to min_lr."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args) -> float:
    """Set every group's lr (scaled by its `lr_scale`, for layer decay) and return the base value."""
    lr = mae_lr(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """DINO/iBOT schedule, one value per iteration: linspace warm-up (both ends), then cosine."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def effective_lr(blr: float, batch_size: int, accum_iter: int, world_size: int) -> float:
    """`lr = blr * effective batch / 256` (MAE rule)."""
    return blr * batch_size * accum_iter * world_size / 256
