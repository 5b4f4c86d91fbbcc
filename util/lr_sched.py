"""Per-iteration schedules: MAE's continuous learning-rate warm-up + half-cycle cosine, the cosine
weight-decay schedule of DINO/iBOT, and the DINO/iBOT precomputed array scheduler."""
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


def cosine_wd(epoch: float, wd: float, wd_end: float, epochs: float) -> float:
    """Weight decay at a fractional epoch: cosine from `wd` (epoch 0) to `wd_end` (end of the run), no
    warm-up; equals `cosine_scheduler(wd, wd_end, epochs, n)[it]` at iteration `it = epoch * n`."""
    progress = min(max(epoch / max(epochs, 1e-12), 0.0), 1.0)
    return wd_end + 0.5 * (wd - wd_end) * (1.0 + math.cos(math.pi * progress))


def apply_weight_decay(optimizer: torch.optim.Optimizer, wd: float) -> None:
    """Set `wd` on every decayed parameter group. A group built with weight_decay 0 (biases, norms,
    tokens) stays at 0: each group's construction-time value is remembered in the group itself
    (`initial_weight_decay`, saved with the optimizer state, so a resumed run keeps the split)."""
    for group in optimizer.param_groups:
        initial = group.setdefault("initial_weight_decay", group["weight_decay"])
        group["weight_decay"] = wd if initial != 0 else 0.0


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
