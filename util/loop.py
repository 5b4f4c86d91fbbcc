"""The training-loop scaffolding every engine shares: autocast, gradient accumulation, loss scaling,
clipping, the non-finite-step guard, per-iteration LR schedule and logging.

An engine supplies only `forward(model, batch) -> loss` (plus optional extra scalars); the loop owns
the rest, so pretraining, finetuning and later methods cannot drift apart.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from util.cli import UserError
from util.dist import all_reduce_mean, get_world_size
from util.logger import MetricLogger, RunLogger

logger = logging.getLogger("medfound")

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def resolve_amp(flag: str, device: torch.device) -> str:
    """`auto` = bf16 on GPUs that support it (no loss scaling, no fp16 overflow NaNs), else fp32."""
    if flag == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if flag == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp none on CPU")
    return flag


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class NonFiniteError(UserError):
    pass


class Optimization:
    """Optimizer + scaler + accumulation + clipping + non-finite guard for one model."""

    def __init__(self, optimizer: torch.optim.Optimizer, amp: str, accum_iter: int = 1,
                 clip_grad: float | None = None, max_nonfinite: int = 5) -> None:
        self.optimizer = optimizer
        self.amp = amp
        self.accum_iter = max(1, accum_iter)
        self.clip_grad = clip_grad
        self.max_nonfinite = max_nonfinite
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        self.consecutive_nonfinite = 0
        self.skipped_steps = 0

    def step(self, loss: torch.Tensor, model: nn.Module, micro_step: int) -> torch.Tensor | None:
        """Backward for one micro-batch; on the last micro-batch of a group, clip and update.

        Returns the total gradient norm (a device tensor) on update steps, else None. A step whose
        loss or gradient norm is not finite is skipped (no update) and counted; too many in a row
        stop the run with the last checkpoint intact.
        """
        update = (micro_step + 1) % self.accum_iter == 0
        loss = loss / self.accum_iter
        sync_ctx = model.no_sync() if (not update and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync_ctx:
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        if not update:
            return None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.clip_grad if self.clip_grad else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss.detach())
        if get_world_size() > 1:  # every rank must take the same decision
            flag = finite.float()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool()
        if bool(finite):
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.consecutive_nonfinite = 0
        else:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
            if self.scaler:
                self.scaler.update()  # lowers the scale, as a scaler-skipped step would
            logger.warning("non-finite loss or gradient: step skipped (%d in a row, %d total)",
                           self.consecutive_nonfinite, self.skipped_steps)
            if self.consecutive_nonfinite >= self.max_nonfinite:
                raise NonFiniteError(f"{self.consecutive_nonfinite} consecutive non-finite steps: stopping. The last "
                                     "saved checkpoint is intact; lower --blr, use --amp bf16, or set --clip_grad")
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}


def train_epoch(model: nn.Module, loader: Iterable[Any], opt: Optimization, epoch: int, device: torch.device,
                forward: Callable[[nn.Module, Any], torch.Tensor], lr_fn: Callable[[float], float],
                run_logger: RunLogger | None = None, print_freq: int = 20, header: str = "") -> dict[str, float]:
    """One epoch; host syncs (`.item()`) happen only at logging intervals, not per step."""
    model.train(True)
    opt.optimizer.zero_grad(set_to_none=True)
    num_steps = len(loader)  # type: ignore[arg-type]
    meter = MetricLogger(header=header or f"Epoch [{epoch}]", print_freq=print_freq)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    window_sum = torch.zeros((), device=device, dtype=torch.float64)
    window_n = 0
    lr = 0.0
    for step, batch in enumerate(meter.log_every(loader, num_steps)):
        if step % opt.accum_iter == 0:
            lr = lr_fn(step / num_steps + epoch)
        with autocast(opt.amp, device):
            loss = forward(model, batch)
        opt.step(loss, model, step)
        detached = loss.detach().double()
        loss_sum += detached
        window_sum += detached
        window_n += 1
        if step % print_freq == 0 or step == num_steps - 1:
            loss_value = all_reduce_mean(window_sum.item() / window_n)
            meter.update(loss=loss_value, lr=lr)
            if run_logger is not None:
                # x axis in units of 1000 samples, so curves from different batch sizes align (MAE)
                x = int((step / num_steps + epoch) * 1000)
                run_logger.scalars({"train_loss": loss_value, "lr": lr}, x)
            window_sum.zero_()
            window_n = 0
    mean_loss = all_reduce_mean(loss_sum.item() / max(num_steps, 1))
    if not math.isfinite(mean_loss):
        logger.warning("epoch %d mean loss is not finite (skipped steps are included in the mean)", epoch)
    return {"loss": mean_loss, "lr": lr, "skipped_steps": opt.skipped_steps}
