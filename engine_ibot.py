"""One iBOT self-distillation step and the hooks around the optimizer update.

`ibot_forward` is what a step computes (teacher without gradients, student on masked global crops and on
the local crops, the loss); the loop itself (`util.loop`) does backward, scaling, clipping and logging.
The EMA teacher update is an `after_step` hook, the last-layer freeze and per-parameter clipping are a
`before_step` hook, and the weight-decay schedule goes through `wd_fn`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from util.data import DeviceNormalize, images_to_device
from util.loop import Optimization, train_epoch
from util.logger import RunLogger
from util.unwrap import unwrap

logger = logging.getLogger("medfound")


class Schedules:
    """Per-iteration values of the run (DINO/iBOT's precomputed arrays: linear warm-up, then cosine): the
    learning rate, the weight decay and the teacher momentum. A fractional epoch maps to iteration
    `round(epoch * steps_per_epoch)`, so the loop's `lr_fn(epoch)` reads the same value the reference
    reads at that iteration."""

    def __init__(self, lr: float, min_lr: float, warmup_epochs: int, wd: float, wd_end: float,
                 momentum: float, epochs: int, steps_per_epoch: int) -> None:
        from util.lr_sched import cosine_scheduler
        self.steps_per_epoch = steps_per_epoch
        self.lr = cosine_scheduler(lr, min_lr, epochs, steps_per_epoch, warmup_epochs=min(warmup_epochs, epochs))
        self.wd = cosine_scheduler(wd, wd_end, epochs, steps_per_epoch)
        self.momentum = cosine_scheduler(momentum, 1.0, epochs, steps_per_epoch)

    def iteration(self, epoch: float) -> int:
        return min(int(round(epoch * self.steps_per_epoch)), len(self.lr) - 1)

    def lr_fn(self, optimizer: torch.optim.Optimizer) -> Callable[[float], float]:
        def set_lr(epoch: float) -> float:
            lr = float(self.lr[self.iteration(epoch)])
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            return lr
        return set_lr

    def wd_fn(self, epoch: float) -> float:
        return float(self.wd[self.iteration(epoch)])

    def momentum_at(self, epoch: float) -> float:
        return float(self.momentum[self.iteration(epoch)])


def ema_pairs(student: nn.Module, teacher: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(student params, teacher params) paired by parameter NAME, over the names both have (the student's
    `masked_embed` and an unshared patch head have no teacher counterpart). Pairing by name, not by order,
    keeps the EMA right when the two modules differ in which parameters they hold."""
    s = dict(unwrap(student).named_parameters())
    t = dict(unwrap(teacher).named_parameters())
    names = [n for n in t if n in s]
    if not names:
        raise ValueError("student and teacher share no parameter names: the teacher cannot follow the student")
    return [s[n].detach() for n in names], [t[n].detach() for n in names]


class TeacherEMA:
    """after_step hook: teacher <- m * teacher + (1 - m) * student, m from the cosine momentum schedule at
    the current step. On a skipped update (`stepped` 0: non-finite loss or gradient, or the grad scaler
    skipped) m is 1, i.e. the teacher stays as it was; the choice is made with device ops, no host sync."""

    def __init__(self, student: nn.Module, teacher: nn.Module, schedules: Schedules, opt: Optimization) -> None:
        student_params, teacher_params = ema_pairs(student, teacher)
        self.schedules, self.opt = schedules, opt
        # Grouped by device once: one fused multiply and one fused add per device and step.
        self.groups: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for ps, pt in zip(student_params, teacher_params):
            s_list, t_list = self.groups.setdefault(pt.device, ([], []))
            s_list.append(ps)
            t_list.append(pt)

    @torch.no_grad()
    def __call__(self, model: nn.Module, stepped: torch.Tensor) -> None:
        m = self.schedules.momentum_at(self.opt.epoch_progress)
        one = torch.ones((), device=stepped.device, dtype=torch.float32)
        m_eff = torch.where(stepped > 0, torch.full_like(one, m), one)
        for dev, (s_list, t_list) in self.groups.items():
            w = m_eff.to(dev)
            torch._foreach_mul_(t_list, w)
            torch._foreach_add_(t_list, torch._foreach_mul(s_list, 1.0 - w))


class GradientHooks:
    """before_step hook: per-parameter gradient clipping (DINO/iBOT/VisionFM: each parameter's gradient
    scaled by clip / (norm + 1e-6) when that is below 1) when `per_param_clip` > 0, and during the first
    `freeze_last_layer` epochs no update for the heads' last layers (every parameter whose name contains
    `last_layer`, the patch head's `last_layer2` included): their gradients are dropped."""

    def __init__(self, opt: Optimization, freeze_last_layer: int, per_param_clip: float = 0.0) -> None:
        self.opt, self.freeze_last_layer, self.per_param_clip = opt, freeze_last_layer, per_param_clip

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        named = list(unwrap(model).named_parameters())
        if self.per_param_clip > 0:
            for _, p in named:
                if p.grad is not None:
                    coef = self.per_param_clip / (p.grad.detach().norm(2) + 1e-6)
                    p.grad.mul_(coef.clamp(max=1.0))
        if int(self.opt.epoch_progress) < self.freeze_last_layer:
            for name, p in named:
                if "last_layer" in name:
                    p.grad = None


def teacher_health(teacher_cls: torch.Tensor, center: torch.Tensor | None, temp: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean entropy of the teacher's class-token distribution, mean over output dimensions of the std of
    its logits across the batch). A collapsed teacher either puts all mass on one output for every image
    (entropy near 0) or outputs the uniform distribution (entropy near log(out_dim)); either way its
    outputs no longer depend on the image (std near 0)."""
    t = teacher_cls.detach().float()
    logits = (t - center.float()) / temp if center is not None else t / temp
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    std = t.std(dim=0).mean() if t.shape[0] > 1 else torch.zeros((), device=t.device)
    return entropy, std


def collapse_warning(entropy: float, std: float, out_dim: int, std_floor: float = 1e-4) -> str | None:
    """A message when the epoch means say the teacher collapsed, else None."""
    if not (math.isfinite(entropy) and math.isfinite(std)):
        return None
    top = math.log(out_dim)
    if std < std_floor and (entropy < 0.05 * top or entropy > 0.95 * top):
        kind = "one output for every image" if entropy < 0.05 * top else "a uniform distribution"
        return (f"the teacher has collapsed to {kind} (entropy {entropy:.3g} of max {top:.3g}, std {std:.2g}); "
                f"lower --lr, raise --momentum_teacher, or lower --teacher_temp")
    return None


def ibot_forward(student: nn.Module, batch: dict[str, Any], teacher: nn.Module, ibot_loss: nn.Module,
                 epoch: int, device: torch.device, global_crops: int = 2,
                 normalize: DeviceNormalize | None = None, momentum: float | Callable[[], float] = 0.0,
                 koleo_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """Loss of one multi-crop batch and its health scalars.

    `batch["crops"]`: the crops, global ones first (uint8 or float [B, 3, S, S]); `batch["masks"]`: one bool
    [B, h, w] patch mask per global crop. The teacher sees the global crops (no gradients); the student sees
    the masked global crops and the local crops unmasked, in one call; the loss compares the student's
    class tokens of every crop with the teacher's of the other global crops, and its patch tokens under the
    mask with the teacher's. `koleo_weight` > 0 adds DINOv2's KoLeo term on the student's class-token
    features of each global crop. Returns (loss, {cls, patch, teacher_entropy, teacher_std, momentum}, plus
    koleo when it is on)."""
    from models_ibot import koleo_loss
    crops = [images_to_device(x, device, normalize) for x in batch["crops"]]
    masks = [m.to(device, non_blocking=True).bool() for m in batch["masks"][:global_crops]]
    with torch.no_grad():
        t = teacher(crops[:global_crops])
    s = student(crops, masks)
    # Health before the loss moves its centre: the distribution the loss is about to use.
    entropy, std = teacher_health(t.cls, getattr(ibot_loss, "center", None), ibot_loss.temperatures(epoch)[0])
    out = ibot_loss((s.cls, s.patch), (t.cls, t.patch), s.local_cls, masks, epoch)
    loss = out["loss"]
    m = momentum() if callable(momentum) else momentum
    scalars: dict[str, torch.Tensor | float] = {"cls": out["cls"].detach(), "patch": out["patch"].detach(),
                                                "teacher_entropy": entropy, "teacher_std": std, "momentum": float(m)}
    if koleo_weight > 0:
        koleo = sum(koleo_loss(f) for f in s.features.chunk(global_crops))
        loss = loss + koleo_weight * koleo
        scalars["koleo"] = koleo.detach()
    return loss, scalars


def train_one_epoch(student: nn.Module, teacher: nn.Module, ibot_loss: nn.Module, loader, opt: Optimization,
                    device: torch.device, epoch: int, args, schedules: Schedules,
                    run_logger: RunLogger | None = None, **loop_kwargs) -> dict[str, float]:
    """One epoch through util.loop.train_epoch; `loop_kwargs`: start_step, steps_per_epoch, on_update,
    loop_state, clock."""
    normalize = DeviceNormalize(args.mean, args.std)
    teacher.train()  # as iBOT: the teacher is in train mode (drop path is 0 in the teacher anyway)
    momentum = lambda: schedules.momentum_at(opt.epoch_progress)  # noqa: E731  (this step's EMA momentum)
    return train_epoch(student, loader, opt, epoch, device,
                       forward=lambda m, b: ibot_forward(m, b, teacher, ibot_loss, epoch, device,
                                                         args.global_crops_number, normalize, momentum,
                                                         args.koleo_loss_weight),
                       lr_fn=schedules.lr_fn(opt.optimizer), wd_fn=schedules.wd_fn, run_logger=run_logger,
                       print_freq=args.print_freq, seed=args.seed, **loop_kwargs)



@torch.no_grad()
def knn_accuracy(backbone: nn.Module, bank_loader, query_loader, device: torch.device, amp: str, num_classes: int,
                 k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """Top-1 accuracy (and balanced accuracy) of a weighted k-NN on the frozen backbone's pooled features:
    the bank loader's images vote for the query loader's (DINO/iBOT's monitor of representation quality).
    Features are gathered from every rank, so every rank returns the same figures."""
    from util.inference import extract_features, knn_classify
    was_training = backbone.training
    bank, bank_y, _ = extract_features(backbone, bank_loader, device, amp)
    feats, y, _ = extract_features(backbone, query_loader, device, amp)
    backbone.train(was_training)
    pred = knn_classify(bank, bank_y, feats, num_classes, k=k, temperature=temperature).argmax(1)
    y = y.long()
    recalls = [float((pred[y == c] == c).float().mean()) for c in range(num_classes) if (y == c).any()]
    return {"knn_top1": float((pred == y).float().mean()), "knn_balanced_acc": sum(recalls) / max(len(recalls), 1)}
