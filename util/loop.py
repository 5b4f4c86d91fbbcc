"""The training-loop scaffolding every engine shares: autocast, gradient accumulation, loss scaling,
clipping, the non-finite-step guard, per-iteration LR and weight-decay schedules and logging.

An engine supplies only `forward(model, batch) -> loss` or `-> (loss, {name: scalar})`; the loop owns
the rest, so pretraining, finetuning and later methods cannot drift apart. Methods that need to act on
the gradients or after an update (gradient surgery, an EMA teacher, a clamp) attach
`Optimization.before_step` / `Optimization.after_step` instead of re-writing the step.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Iterable, Union

import torch
import torch.nn as nn

from util.cli import AMP_CHOICES, UserError  # noqa: F401  (AMP_CHOICES re-exported; defined torch-free for --help)
from util.dist import all_reduce_mean, get_world_size
from util.logger import MetricLogger, RunClock, RunLogger

logger = logging.getLogger("medfound")

# What an engine's forward may return: the loss, or the loss and extra scalars to average and log
# (0-dim tensors stay on the device until a logging interval; floats are accepted too).
Scalars = dict[str, Union[torch.Tensor, float]]
ForwardOutput = Union[torch.Tensor, tuple[torch.Tensor, Scalars]]
# Names the loop already logs itself; an extra scalar with one of these names would overwrite them.
RESERVED_SCALARS = frozenset({"loss", "lr", "wd", "skipped_steps"})


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


def _scaler_stepped(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> torch.Tensor:
    """1.0 when `scaler.step` will apply the update, 0.0 when it will skip it: the scaler skips when any
    of its per-device `found_inf` flags (set by `unscale_`) is non-zero. Computed on the device."""
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
    found = [f.to(device, non_blocking=True).reshape(()) for f in state.get("found_inf_per_device", {}).values()]
    if not found:
        return torch.ones((), device=device)
    return (torch.stack(found).sum() == 0).float()


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
                 clip_grad: float | None = None, max_nonfinite: int = 5,
                 before_step: Callable[[nn.Module], None] | None = None,
                 after_step: Callable[[nn.Module, torch.Tensor], None] | None = None) -> None:
        self.optimizer = optimizer
        # Hooks, settable after construction (an engine attaches them); both run under no_grad and
        # receive the model as it was passed to the loop (possibly DDP/compile-wrapped).
        # before_step(model): on update steps, after the gradients are unscaled and accumulated, before
        # the global clip and the optimizer step (gradient surgery, per-parameter clipping).
        self.before_step = before_step
        # after_step(model, stepped): after every update; `stepped` is a 0-dim device tensor, 1.0 when
        # the update was applied and 0.0 when the non-finite guard or the grad scaler skipped it, so an
        # EMA can scale its step by it without a host sync.
        self.after_step = after_step
        self.epoch_progress = 0.0  # fractional epoch of the current step, set by train_epoch (for hooks)
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
        if self.before_step is not None:
            with torch.no_grad():
                self.before_step(model)
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
        stepped = finite
        if self.scaler:
            if grad_norm is not norm:  # FSDP: each rank's scaler checked only its gradient shard
                _agree_scaler_found_inf(self.scaler, self.optimizer, bad)
            stepped = _scaler_stepped(self.scaler, self.optimizer, finite.device)  # read before update() clears it
            self.scaler.step(self.optimizer)  # the scaler itself skips non-finite steps
            self.scaler.update()
        elif _supports_found_inf(self.optimizer):
            self.optimizer.grad_scale, self.optimizer.found_inf = None, bad.to(params[0].device if params else bad.device)
            self.optimizer.step()
        elif bool(finite):
            self.optimizer.step()
        if self.after_step is not None:
            with torch.no_grad():
                self.after_step(model, stepped)
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
        from util.unwrap import unwrap
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


def split_output(out: ForwardOutput) -> tuple[torch.Tensor, Scalars]:
    """(loss, scalars) from what a forward returned: a loss tensor or a (loss, dict) pair."""
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], dict):
            raise TypeError("forward must return a loss tensor or (loss, {name: scalar})")
        clash = RESERVED_SCALARS.intersection(out[1])
        if clash:
            raise ValueError(f"extra scalar name(s) {sorted(clash)} are logged by the loop itself; rename them")
        return out[0], out[1]
    return out, {}


def _mean_over_ranks(values: torch.Tensor) -> list[float]:
    """Element-wise mean of a 1-d float64 tensor across ranks: one collective, one host sync."""
    if get_world_size() > 1:
        backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        values = values.to(backend_device).clone()
        torch.distributed.all_reduce(values)
        return [v / get_world_size() for v in values.tolist()]
    return values.tolist()


class _Averages:
    """Device-side sums of the loss and the extra scalars, over the epoch and over the logging window.

    Non-finite values add 0 (but count), as they always did for the loss, so one bad step does not turn
    an epoch mean into NaN. Counts are host integers (known without a sync); sums are read at logging
    intervals only. Every rank must return the same scalar names (the means are one all-reduce).
    """

    def __init__(self, device: torch.device, state: dict[str, Any]) -> None:
        self.device = device
        self.epoch_sum: dict[str, torch.Tensor] = {}
        self.epoch_n: dict[str, int] = {}
        self.window_sum: dict[str, torch.Tensor] = {}
        self.window_n: dict[str, int] = {}
        self._new("loss", float(state.get("loss_sum", 0.0)), int(state.get("steps_done", 0)))
        counts = state.get("scalar_counts", {})
        for name, total in state.get("scalar_sums", {}).items():
            self._new(name, float(total), int(counts.get(name, 0)))

    def _new(self, name: str, total: float = 0.0, n: int = 0) -> None:
        self.epoch_sum[name] = torch.full((), total, device=self.device, dtype=torch.float64)
        self.epoch_n[name] = n
        self.window_sum[name] = torch.zeros((), device=self.device, dtype=torch.float64)
        self.window_n[name] = 0

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if name not in self.epoch_sum:
            self._new(name)
        if isinstance(value, torch.Tensor):
            v = value.detach().reshape(()).to(self.device, torch.float64)
            v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
        else:
            v = float(value) if math.isfinite(float(value)) else 0.0
        self.epoch_sum[name] += v
        self.window_sum[name] += v
        self.epoch_n[name] += 1
        self.window_n[name] += 1

    def window_means(self) -> dict[str, float]:
        """Means over the logging window (averaged over ranks), then a fresh window."""
        names = [k for k, n in self.window_n.items() if n > 0]
        if not names:
            return {}
        means = _mean_over_ranks(torch.stack([self.window_sum[k] / self.window_n[k] for k in names]))
        for k in names:
            self.window_sum[k].zero_()
            self.window_n[k] = 0
        return dict(zip(names, means))

    def epoch_means(self) -> dict[str, float]:
        names = list(self.epoch_sum)
        return dict(zip(names, _mean_over_ranks(torch.stack([self.epoch_sum[k] / max(self.epoch_n[k], 1)
                                                             for k in names]))))

    def state(self) -> dict[str, Any]:
        """What a mid-epoch checkpoint keeps so a resumed epoch reports the same means."""
        out: dict[str, Any] = {"loss_sum": float(self.epoch_sum["loss"].item()), "steps_done": self.epoch_n["loss"]}
        extra = [k for k in self.epoch_sum if k != "loss"]
        if extra:
            out["scalar_sums"] = {k: float(self.epoch_sum[k].item()) for k in extra}
            out["scalar_counts"] = {k: self.epoch_n[k] for k in extra}
        return out


def train_epoch(model: nn.Module, loader: Iterable[Any], opt: Optimization, epoch: int, device: torch.device,
                forward: Callable[[nn.Module, Any], ForwardOutput], lr_fn: Callable[[float], float],
                run_logger: RunLogger | None = None, print_freq: int = 20, header: str = "",
                start_step: int = 0, steps_per_epoch: int | None = None, seed: int = 0,
                on_update: Callable[[int, Callable[[], dict[str, Any]], bool], None] | None = None,
                loop_state: dict[str, Any] | None = None, clock: RunClock | None = None,
                wd_fn: Callable[[float], float] | None = None) -> dict[str, float]:
    """One epoch (or its remainder from `start_step`, after a mid-epoch resume); `clock` adds the whole
    run's ETA to the progress lines.

    `forward(model, batch)` returns the loss or `(loss, {name: 0-dim tensor or float})`; each extra
    scalar is averaged like the loss: over the logging window for the progress line and TensorBoard
    (`train_<name>`), over the epoch in the returned dict (which the entry points write to log.txt as
    `train_<name>`). `lr_fn(fractional epoch)` sets the learning rates and returns the base value;
    `wd_fn(fractional epoch)`, when given, returns the weight decay that every decayed parameter group
    gets on each update (groups built with weight_decay 0 stay at 0) and is logged as `wd`.

    Host syncs (`.item()`) happen only at logging intervals. `on_update(step, loop_state_fn, stop)` runs
    after every optimizer update (mid-epoch checkpoints); after a SIGTERM/SIGUSR1 it is called with
    `stop=True` (to write a checkpoint) and the loop raises `Preempted`.
    """
    import numpy as np
    from util.dist import get_rank
    from util.lr_sched import apply_weight_decay
    model.train(True)
    opt.optimizer.zero_grad(set_to_none=True)
    num_steps = steps_per_epoch or (start_step + len(loader))  # type: ignore[arg-type]
    run_eta = (lambda i: clock.eta(epoch + (start_step + i + 1) / num_steps)) if clock is not None else None
    meter = MetricLogger(header=header or f"Epoch [{epoch}]", print_freq=print_freq, run_eta=run_eta)
    sums = _Averages(device, loop_state or {})
    lr = 0.0
    wd: float | None = None
    rank = get_rank()
    step = start_step
    for i, batch in enumerate(meter.log_every(loader, num_steps - start_step)):
        step = start_step + i
        torch.manual_seed(step_seed(seed, epoch, step, rank))
        np.random.seed(step_seed(seed, epoch, step, rank) % 2**32)
        opt.epoch_progress = step / num_steps + epoch
        if step % opt.accum_iter == 0:
            lr = lr_fn(opt.epoch_progress)
            if wd_fn is not None:
                wd = float(wd_fn(opt.epoch_progress))
                apply_weight_decay(opt.optimizer, wd)
        with opt.accumulation_context(model, step):
            with autocast(opt.amp, device):
                loss, scalars = split_output(forward(model, batch))
            opt.step(loss, model, step)
        sums.add("loss", loss)
        for name, value in scalars.items():
            sums.add(name, value)
        if i % print_freq == 0 or step == num_steps - 1:
            opt.check()
            means = sums.window_means()
            rates = {"lr": lr} if wd is None else {"lr": lr, "wd": wd}
            meter.update(**means, **rates)
            if run_logger is not None:
                # x axis in units of 1000 samples, so curves from different batch sizes align (MAE)
                run_logger.scalars({**{f"train_{k}": v for k, v in means.items()}, **rates},
                                   int((step / num_steps + epoch) * 1000))
        if (step + 1) % opt.accum_iter == 0:
            updates = (step + 1) // opt.accum_iter
            # Ranks agree on pre-emption on a fixed schedule, so they all stop at the same step.
            stop = updates % max(1, print_freq // opt.accum_iter) == 0 and _agreed_stop(device)
            if on_update is not None:
                on_update(step + 1, sums.state, stop)
            if stop:
                raise Preempted(f"{STOP.signal_name}: checkpoint written at epoch {epoch} step {step + 1}; "
                                f"rerun the same command to continue")
    opt.check()
    means = sums.epoch_means()
    mean_loss = means.pop("loss")
    if not math.isfinite(mean_loss):
        logger.warning("epoch %d mean loss is not finite", epoch)
    out: dict[str, float] = {"loss": mean_loss, "lr": lr}
    if wd is not None:
        out["wd"] = wd
    if hasattr(loader, "epoch_skipped"):  # --bad_image skip: this epoch's unreadable images, all ranks
        from util.skipping import gather_skipped
        out["skipped_images"] = len(gather_skipped(loader, epoch=True))
    return {**out, "skipped_steps": opt.skipped_steps, **means}
