"""Supervised training epoch and full-set evaluation for classifiers (finetune, linear probe, few-shot).

The loop scaffolding is `util.loop`; this file says what a supervised step computes and how predictions
are gathered so that metrics are computed once on the whole evaluation set (each sample exactly once,
from every rank, in dataset order), never averaged over batches or ranks.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from util.data import images_to_device
from util.skipping import gather_skipped, SkippingLoader
from util.inference import gather_variable, probabilities
from util.logger import RunLogger
from util.loop import Optimization, autocast, train_epoch


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, task: str, criterion: nn.Module | None) -> torch.Tensor:
    if task == "binary_sigmoid":
        return F.binary_cross_entropy_with_logits(logits.float().squeeze(-1), target.float())
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return criterion(logits.float(), target)


def finetune_forward(model: nn.Module, batch: Any, device: torch.device, task: str, criterion: nn.Module | None,
                     mixup_fn: Callable | None = None, channels_last: bool = False) -> torch.Tensor:
    """Loss of one supervised batch `(images, targets, ...)`: images to the device (uint8 batches are
    normalised there), optional mixup/cutmix, classifier forward, the task's loss."""
    images = images_to_device(batch[0], device, channels_last=channels_last)
    target = batch[1].to(device, non_blocking=True)
    if mixup_fn is not None:
        images, target = mixup_fn(images, target)
    return supervised_loss(model(images), target, task, criterion)


def train_one_epoch(model: nn.Module, loader, opt: Optimization, device: torch.device, epoch: int, args,
                    criterion: nn.Module, lr_fn: Callable[[float], float], mixup_fn=None,
                    run_logger: RunLogger | None = None, **loop_kwargs) -> dict[str, float]:
    """`loop_kwargs` (start_step, steps_per_epoch, on_update, loop_state, clock, wd_fn) go to
    util.loop.train_epoch."""
    task = args.task_type
    channels_last = bool(getattr(args, "channels_last_applied", False))
    return train_epoch(model, loader, opt, epoch, device,
                       lambda m, b: finetune_forward(m, b, device, task, criterion, mixup_fn, channels_last),
                       lr_fn, run_logger, args.print_freq, seed=args.seed, **loop_kwargs)


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, amp: str, task: str,
            channels_last: bool = False) -> dict[str, np.ndarray]:
    """Probabilities, targets, logits-loss inputs and dataset indices for every sample exactly once,
    gathered from all ranks and ordered by dataset index (so outputs do not depend on world size).
    Under `--bad_image skip` the loader leaves unreadable samples out: `indices` says which were read."""
    model.eval()
    probs, targets, indices, logits_all = [], [], [], []
    for batch in loader:
        images = images_to_device(batch[0], device, channels_last=channels_last)
        with autocast(amp, device):
            logits = model(images)
        logits_all.append(logits.float().cpu())
        probs.append(probabilities(logits, task).cpu())
        targets.append(batch[1].cpu())
        indices.append(torch.as_tensor(batch[2]).cpu())
    cat = lambda xs: torch.cat(xs) if xs else torch.empty(0)  # noqa: E731
    idx = gather_variable(cat(indices))
    order = torch.argsort(idx)
    return {"probs": gather_variable(cat(probs))[order].numpy(), "targets": gather_variable(cat(targets))[order].numpy(),
            "logits": gather_variable(cat(logits_all))[order].numpy(), "indices": idx[order].numpy()}


def evaluate(model: nn.Module, loader, device: torch.device, args, criterion: nn.Module | None = None,
             bootstrap: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Clinical metrics on the full set (util.metrics), plus the mean loss."""
    from util.metrics import bootstrap_ci, classification_metrics
    out = predict(model, loader, device, args.amp, args.task_type, bool(getattr(args, "channels_last_applied", False)))
    logits, targets = torch.from_numpy(out["logits"]), torch.from_numpy(out["targets"])
    plain_ce = nn.CrossEntropyLoss() if args.task_type == "multiclass" else None
    loss = float(supervised_loss(logits, targets, args.task_type, plain_ce)) if len(targets) else float("nan")
    probs = out["probs"]
    num_classes = 2 if args.task_type == "binary_sigmoid" else probs.shape[1]
    kw = dict(num_classes=num_classes, ordinal=args.ordinal, positive_class=args.positive_class,
              multilabel=args.task_type == "multilabel")
    metrics = classification_metrics(targets.numpy(), probs, class_names=list(args.class_names), **kw)
    metrics["loss"] = loss
    if isinstance(loader, SkippingLoader):  # --bad_image skip: `n` and every metric count only what was read
        metrics["skipped_images"] = gather_skipped(loader)
    if bootstrap > 0 and len(targets) > 1:
        names = [n for n in ("auroc", "accuracy", "balanced_accuracy", "f1", "kappa") if metrics.get(n) is not None]
        metrics["ci95"] = {k: list(v) for k, v in bootstrap_ci(targets.numpy(), probs, names, n_boot=bootstrap,
                                                                seed=args.seed, **kw).items()}
    return metrics, out
