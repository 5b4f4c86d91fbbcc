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

from util.cli import AMP_CHOICES, UserError  # noqa: F401  (AMP_CHOICES re-exported; defined torch-free for --help)
from util.dist import all_reduce_mean, get_world_size
from util.logger import MetricLogger, RunClock, RunLogger

logger = logging.getLogger("medfound")


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


class Preempted(Exception):
    """Raised after a checkpoint was written in response to SIGTERM/SIGUSR1 (cluster pre-emption)."""


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop checks it after each optimizer step, saves and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        import signal

        def handler(signum, _frame):
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            logger.warning("%s received: will checkpoint after the current step and exit", self.signal_name)
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                try:
                    signal.signal(sig, handler)
                except ValueError:  # not the main thread (e.g. notebooks): pre-emption handling is off
                    pass


STOP = StopFlag()


def _fault_injection(update: int) -> None:
    """Test hooks for the kill-and-resume tests: deterministic faults instead of racy timers.
    MEDFOUND_TEST_KILL_AT_UPDATE=k SIGKILLs this process after update k; MEDFOUND_TEST_SIGNAL_AT_UPDATE=k
    sends it SIGTERM (as a cluster pre-emption would)."""
    import os
    import signal
    if os.environ.get("MEDFOUND_TEST_KILL_AT_UPDATE") == str(update):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("MEDFOUND_TEST_SIGNAL_AT_UPDATE") == str(update):
        os.kill(os.getpid(), signal.SIGTERM)


def _full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: under FSDP (DTensor gradients) `clip_grad_norm_` returns a replicated DTensor, which
    `isfinite` / `all_reduce` must not see. Plain tensors pass through untouched."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _agree_scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                            bad: torch.Tensor) -> None:
    """With sharded gradients (FSDP) `GradScaler.unscale_` sees one shard per rank, so ranks could disagree
    on skipping the step and on the next scale (FSDP1 had ShardedGradScaler for this). Overwrite its
    per-device verdicts with the all-reduced one (`bad` covers every rank's gradients through the global
    norm), so every rank skips, or not, and rescales alike."""
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
    for found in state.get("found_inf_per_device", {}).values():
        found.copy_(bad.to(found.device).reshape(found.shape))


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module):
    """FSDP2's counterpart of DDP's no_sync: gradients of these micro-batches stay unsharded on each
    rank (memory: one full fp32 gradient) and are reduce-scattered with the last one."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Fused Adam/AdamW skip a step on device when `found_inf` is set: no host sync is needed."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))


class Optimization:
    """Optimizer + scaler + accumulation + clipping + non-finite guard for one model.

    The guard keeps its counters on the device: a non-finite loss or gradient norm (agreed across
    ranks by an all-reduce) turns the update into a no-op through the fused optimizer's `found_inf`,
    exactly as a grad scaler skips a step, and the counters are read only at logging intervals
    (`check()`). Optimizers without that hook (LARS, non-fused) fall back to one host sync per update.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, amp: str, accum_iter: int = 1,
                 clip_grad: float | None = None, max_nonfinite: int = 5) -> None:
        self.optimizer = optimizer
        self.amp = amp
        self.accum_iter = max(1, accum_iter)
        self.clip_grad = clip_grad
        self.max_nonfinite = max_nonfinite
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        self.skipped_steps = 0          # host copy, refreshed by check()
        self._consecutive: torch.Tensor | None = None
        self._skipped: torch.Tensor | None = None
        self.poison_steps: set[int] = set()  # test hook: optimizer steps whose loss is replaced by NaN
        self.update_count = 0

    def _counters(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._consecutive is None:
            self._consecutive = torch.zeros((), device=device)
            self._skipped = torch.full((), float(self.skipped_steps), device=device)
        return self._consecutive, self._skipped

    def step(self, loss: torch.Tensor, model: nn.Module, micro_step: int) -> torch.Tensor | None:
        """Backward for one micro-batch; on the last micro-batch of a group, clip and update.

        Returns the total gradient norm (a device tensor) on update steps, else None.
        """
        update = (micro_step + 1) % self.accum_iter == 0
        if self.update_count in self.poison_steps:
            loss = loss * float("nan")
        loss = loss / self.accum_iter
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if not update:
            return None
        self.update_count += 1
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.clip_grad if self.clip_grad else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = _full_value(norm)
        finite = (torch.isfinite(grad_norm) & torch.isfinite(loss.detach())).float()
        if get_world_size() > 1:  # every rank must take the same decision
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        consecutive, skipped = self._counters(finite.device)
        bad = 1.0 - finite
        consecutive.add_(bad).mul_(bad)  # +1 on a bad step, reset to 0 on a good one
        skipped.add_(bad)
        if self.scaler:
            if grad_norm is not norm:  # FSDP: each rank's scaler checked only its gradient shard
                _agree_scaler_found_inf(self.scaler, self.optimizer, bad)
            self.scaler.step(self.optimizer)  # the scaler itself skips non-finite steps
            self.scaler.update()
        elif _supports_found_inf(self.optimizer):
            self.optimizer.grad_scale, self.optimizer.found_inf = None, bad.to(params[0].device if params else bad.device)
            self.optimizer.step()
        elif bool(finite):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _fault_injection(self.update_count)
        return grad_norm

    def accumulation_context(self, model: nn.Module, micro_step: int) -> contextlib.AbstractContextManager:
        """DDP `no_sync()` for micro-batches that do not end an accumulation group: gradients are reduced
        once per update. It must cover the forward too (DDP decides at forward time whether the
        backward reduces), so the loop enters it around forward and `step`."""
        last = (micro_step + 1) % self.accum_iter == 0
        if last:
            return contextlib.nullcontext()
        if hasattr(model, "no_sync"):
            return model.no_sync()
        from util.checkpoint import unwrap
        inner = unwrap(model)
        if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2: accumulate unsharded, reduce-scatter once
            return _fsdp_no_sync(inner)
        return contextlib.nullcontext()

    def check(self) -> None:
        """Read the device counters (a host sync: call at logging intervals); stop after too many
        consecutive non-finite steps."""
        if self._consecutive is None:
            return
        consecutive, skipped = int(self._consecutive.item()), int(self._skipped.item())
        if skipped > self.skipped_steps:
            logger.warning("non-finite loss or gradient: %d step(s) skipped (%d in a row, %d in total)",
                           skipped - self.skipped_steps, consecutive, skipped)
        self.skipped_steps = skipped
        if consecutive >= self.max_nonfinite:
            raise NonFiniteError(f"{consecutive} consecutive non-finite steps: stopping. The last saved checkpoint is "
                                 f"intact; lower --blr, use --amp bf16, or set --clip_grad")


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Per-step seed for the global RNGs (drop path, mixup, reference-style mask noise): a resumed run
    draws the same numbers at the same step, whatever happened before."""
    from util.data import sample_seed
    return sample_seed(seed, epoch, step, rank, 0x5EED)


def _agreed_stop(device: torch.device) -> bool:
    stop = STOP.requested
    if get_world_size() > 1:
        flag = torch.tensor([float(stop)], device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stop = bool(flag.item())
    return stop


def train_epoch(model: nn.Module, loader: Iterable[Any], opt: Optimization, epoch: int, device: torch.device,
                forward: Callable[[nn.Module, Any], torch.Tensor], lr_fn: Callable[[float], float],
                run_logger: RunLogger | None = None, print_freq: int = 20, header: str = "",
                start_step: int = 0, steps_per_epoch: int | None = None, seed: int = 0,
                on_update: Callable[[int, Callable[[], dict[str, Any]], bool], None] | None = None,
                loop_state: dict[str, Any] | None = None, clock: RunClock | None = None) -> dict[str, float]:
    """One epoch (or its remainder from `start_step`, after a mid-epoch resume); `clock` adds the whole
    run's ETA to the progress lines.

    Host syncs (`.item()`) happen only at logging intervals. `on_update(step, loop_state_fn, stop)` runs
    after every optimizer update (mid-epoch checkpoints); after a SIGTERM/SIGUSR1 it is called with
    `stop=True` (to write a checkpoint) and the loop raises `Preempted`.
    """
    import numpy as np
    from util.dist import get_rank
    model.train(True)
    opt.optimizer.zero_grad(set_to_none=True)
    num_steps = steps_per_epoch or (start_step + len(loader))  # type: ignore[arg-type]
    run_eta = (lambda i: clock.eta(epoch + (start_step + i + 1) / num_steps)) if clock is not None else None
    meter = MetricLogger(header=header or f"Epoch [{epoch}]", print_freq=print_freq, run_eta=run_eta)
    state = loop_state or {}
    loss_sum = torch.full((), float(state.get("loss_sum", 0.0)), device=device, dtype=torch.float64)
    done = int(state.get("steps_done", 0))
    window_sum = torch.zeros((), device=device, dtype=torch.float64)
    window_n = 0
    lr = 0.0
    rank = get_rank()
    step = start_step
    for i, batch in enumerate(meter.log_every(loader, num_steps - start_step)):
        step = start_step + i
        torch.manual_seed(step_seed(seed, epoch, step, rank))
        np.random.seed(step_seed(seed, epoch, step, rank) % 2**32)
        if step % opt.accum_iter == 0:
            lr = lr_fn(step / num_steps + epoch)
        with opt.accumulation_context(model, step):
            with autocast(opt.amp, device):
                loss = forward(model, batch)
            opt.step(loss, model, step)
        detached = loss.detach().double()
        finite = torch.isfinite(detached)
        loss_sum += torch.where(finite, detached, torch.zeros_like(detached))
        window_sum += torch.where(finite, detached, torch.zeros_like(detached))
        window_n += 1
        done += 1
        if i % print_freq == 0 or step == num_steps - 1:
            opt.check()
            loss_value = all_reduce_mean(window_sum.item() / window_n)
            meter.update(loss=loss_value, lr=lr)
            if run_logger is not None:
                # x axis in units of 1000 samples, so curves from different batch sizes align (MAE)
                run_logger.scalars({"train_loss": loss_value, "lr": lr}, int((step / num_steps + epoch) * 1000))
            window_sum.zero_()
            window_n = 0
        if (step + 1) % opt.accum_iter == 0:
            updates = (step + 1) // opt.accum_iter
            # Ranks agree on pre-emption on a fixed schedule, so they all stop at the same step.
            stop = updates % max(1, print_freq // opt.accum_iter) == 0 and _agreed_stop(device)
            if on_update is not None:
                on_update(step + 1, lambda: {"loss_sum": float(loss_sum.item()), "steps_done": done}, stop)
            if stop:
                raise Preempted(f"{STOP.signal_name}: checkpoint written at epoch {epoch} step {step + 1}; "
                                f"rerun the same command to continue")
    opt.check()
    mean_loss = all_reduce_mean(loss_sum.item() / max(done, 1))
    if not math.isfinite(mean_loss):
        logger.warning("epoch %d mean loss is not finite", epoch)
    return {"loss": mean_loss, "lr": lr, "skipped_steps": opt.skipped_steps}
