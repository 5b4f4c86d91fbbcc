"""Run set-up shared by every entry point: distributed init, device, precision, seeding, resume, loaders."""
from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import random
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from util.checkpoint import (States, config_differences, find_resume_checkpoint, load_file, load_training_state,
                              named_states)
from util.cli import UserError, check_output_path, setup_logging
from util.dist import get_rank, init_distributed_mode, is_main_process
from util.family import family_of
from util.loop import Optimization, resolve_amp

logger = logging.getLogger("medfound")


def setup(args: argparse.Namespace) -> torch.device:
    """Process group, rank-0 logging, device (CPU fallback), precision and per-rank seeds."""
    init_distributed_mode(args)
    setup_logging(get_rank())
    want_cuda = str(args.device).startswith("cuda")
    device = torch.device(args.device if (not want_cuda or torch.cuda.is_available()) else "cpu")
    if want_cuda and device.type == "cpu":
        logger.info("CUDA not available: running on CPU")
    if device.type == "cuda" and getattr(args, "distributed", False):
        device = torch.device("cuda", args.gpu)
    args.amp = resolve_amp(args.amp, device)
    seed_everything(args.seed + get_rank())
    return device


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def check_output_dir(path: str) -> None:
    """Create --output_dir (checked first by util.cli.check_output_path: a file there is never touched)."""
    check_output_path(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {path}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"--output_dir {path} is not writable")


class StartGuard:
    """Undo what a run created in its output folder when it fails before its first epoch: a bad data path,
    no images, a wrong checkpoint must leave no config.json, tensorboard/ or empty folder behind.

    Snapshot the folder before the run writes anything; `started()` when training begins (from then on a
    failure keeps the run's files: checkpoints to resume from, its log). `undo()` removes only entries that
    were not there before, moves an earlier run's files that this run set aside (EARLIER_RUN_PREFIX) back
    where they were, then removes the folder itself when this run created it and left it empty. Rank 0
    only (it alone writes there)."""

    def __init__(self, output_dir: str | None) -> None:
        self.path = output_dir
        self.existed = bool(output_dir) and os.path.isdir(output_dir)
        self.before = set(os.listdir(output_dir)) if self.existed else set()
        self.armed = bool(output_dir) and is_main_process()

    def started(self) -> None:
        self.armed = False

    def undo(self) -> None:
        if not self.armed or not self.path or not os.path.isdir(self.path):
            return
        self.armed = False
        import shutil
        new = sorted(set(os.listdir(self.path)) - self.before)
        for name in [n for n in new if not n.startswith(EARLIER_RUN_PREFIX)] + \
                [n for n in new if n.startswith(EARLIER_RUN_PREFIX)]:
            target = os.path.join(self.path, name)
            if name.startswith(EARLIER_RUN_PREFIX):  # another run's files, set aside by this one: put back
                self._put_back(target)
                continue
            try:
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                else:
                    os.unlink(target)
            except OSError as e:
                logger.warning("could not remove %s after the failed start: %s", target, e.strerror)
        if not self.existed:
            try:
                os.rmdir(self.path)  # only when empty
            except OSError:
                pass

    def _put_back(self, aside: str) -> None:
        for name in os.listdir(aside):
            back = os.path.join(self.path, name)
            if not os.path.lexists(back):
                os.replace(os.path.join(aside, name), back)
        try:
            os.rmdir(aside)
        except OSError:
            logger.warning("%s keeps files that could not be put back", aside)


_GUARDS: dict[str, StartGuard] = {}


@contextlib.contextmanager
def start_guard(output_dir: str | None):
    """`with start_guard(args.output_dir): ...` around a run: a failure before `training_started(...)`
    (for runs that never train, such as eval and predict: any failure) undoes what the run created."""
    guard = StartGuard(output_dir)
    key = os.path.abspath(output_dir) if output_dir else ""
    _GUARDS[key] = guard
    try:
        yield guard
    except BaseException:
        guard.undo()
        raise
    finally:
        _GUARDS.pop(key, None)


def training_started(output_dir: str | None) -> None:
    """Called when the first epoch begins: from then on a failed run keeps what it wrote."""
    guard = _GUARDS.get(os.path.abspath(output_dir) if output_dir else "")
    if guard is not None:
        guard.started()


# What our runs write into --output_dir. A run that starts afresh moves another run's copies of these aside
# instead of overwriting or appending to them; anything else in the folder (e.g. demo_data/) stays.
RUN_FILES = ("checkpoint-*.pth", "log.txt", "config.json", "results.json", "tensorboard", "*_metrics.json",
             "*_metrics.csv", "roc_*.png", "confusion_*.png", "reconstructions.png", "model.safetensors")
EARLIER_RUN_PREFIX = "earlier_run-"


def set_aside_earlier_run(output_dir: str) -> str | None:
    """Move an earlier run's files (RUN_FILES) into `output_dir/earlier_run-<time>/`; returns that folder."""
    found = sorted({p for pattern in RUN_FILES for p in glob.glob(os.path.join(output_dir, pattern))})
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(output_dir, EARLIER_RUN_PREFIX + stamp)
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(output_dir, f"{EARLIER_RUN_PREFIX}{stamp}-{n}")
    os.makedirs(dest)
    for path in found:
        os.replace(path, os.path.join(dest, os.path.basename(path)))
    logger.warning("%s held another run's files (%s): moved them to %s; this run starts afresh and overwrites "
                   "nothing", output_dir, ", ".join(sorted(os.path.basename(p) for p in found)[:4]) +
                   (", ..." if len(found) > 4 else ""), dest)
    return dest


# Run-level config fields whose change makes a continued run a different experiment; entry points add
# their own (`fields`) and each module's family its own (`FamilySpec.resume_fields`).
RUN_RESUME_FIELDS = ("model", "input_size", "accum_iter", "blr", "min_lr", "epochs", "warmup_epochs", "weight_decay",
                     "data_path", "seed")


def resume_fields(states: States, fields: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The config fields that must match to resume: run-level, the entry point's, each module's family's."""
    out = list(RUN_RESUME_FIELDS) + [f for f in fields if f not in RUN_RESUME_FIELDS]
    for obj in named_states(states).values():
        spec = family_of(obj)
        out += [f for f in (spec.resume_fields if spec else ()) if f not in out]
    return tuple(out)


def maybe_resume(args: argparse.Namespace, config: dict[str, Any], model: States,
                 opt: Optimization | None, fields: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """`--resume PATH`, `--resume auto`, or auto-resume from output_dir when the saved config matches (in
    `resume_fields(model, fields)`). `model`: the module, or the run's named states (see
    util.checkpoint.named_states), each resumed from the checkpoint entry of its own name."""
    resume = args.resume
    if resume == "auto" or (not resume and getattr(args, "auto_resume", False)):
        flag = None
        resume = find_resume_checkpoint(args.output_dir) or ""
        if resume:
            diffs = config_differences(load_file(resume).get("args", {}), config, resume_fields(model, fields))
            if diffs:
                raise UserError(f"{resume} was written by a different run ({'; '.join(diffs)}); use a new "
                                f"--output_dir, or --no_auto_resume to start over here (the earlier run's files "
                                f"are then moved to {args.output_dir}/{EARLIER_RUN_PREFIX}<time>/, not overwritten)")
    else:
        flag = "--resume"
    if not resume:
        if is_main_process():
            set_aside_earlier_run(args.output_dir)
        return None
    ckpt = load_training_state(resume, model, opt.optimizer if opt else None, opt.scaler if opt else None,
                               restore_rng=False, flag=flag)
    if opt is not None:
        opt.skipped_steps = int(ckpt.get("skipped_steps", 0))
    point = ckpt.get("resume_point") or {}
    logger.info("resumed from %s (epoch %s done%s)", resume, ckpt.get("epoch"),
                f"; continuing epoch {point['epoch']} at step {point['step']}" if point.get("step") else "")
    return ckpt


def has_conv_layers(model: torch.nn.Module) -> bool:
    """Convolutions beyond a ViT's patch embedding (convolutional stages): where channels_last helps."""
    return any(isinstance(m, torch.nn.Conv2d) and not name.endswith("patch_embed.proj")
               for name, m in model.named_modules())


def _is_compiler_error(e: BaseException) -> bool:
    """Errors raised by Dynamo / AOTAutograd / Inductor themselves (not by the model's own code)."""
    exc = getattr(getattr(torch, "_dynamo", None), "exc", None)
    kinds = tuple(k for k in (getattr(exc, "TorchDynamoException", None), getattr(exc, "BackendCompilerFailed", None))
                  if isinstance(k, type))
    return (bool(kinds) and isinstance(e, kinds)) or "Inductor" in type(e).__name__


def _eager_backward_lowering() -> contextlib.AbstractContextManager:
    """Compile the backward together with the forward (inside the guarded call) rather than lazily in
    loss.backward(), where a lowering failure could not fall back; scoped to our calls only."""
    functorch_config = getattr(getattr(torch, "_functorch", None), "config", None)
    if hasattr(functorch_config, "force_non_lazy_backward_lowering") and hasattr(functorch_config, "patch"):
        return functorch_config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


class CompiledOrEager(torch.nn.Module):
    """`torch.compile(module)` that falls back to eager, with a warning, if compilation fails (no C++
    compiler, an unsupported op): a missing speed-up must not kill a week-long run. The first call
    falls back on any error but running out of memory (eager would fail the same way if the model
    itself were wrong, and then the error surfaces from the eager call); later calls, which may
    recompile (eval mode, a new batch size), fall back only on errors of the compiler itself."""

    def __init__(self, module: torch.nn.Module, mode: str | None = None) -> None:
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module, mode=mode)
        self.state = "pending"

    def no_sync(self) -> Any:
        """DDP's gradient-accumulation context, when the compiled module is DDP."""
        return self.module.no_sync() if hasattr(self.module, "no_sync") else contextlib.nullcontext()

    def forward(self, *a: Any, **kw: Any) -> Any:
        if self.state == "eager":
            return self.module(*a, **kw)
        try:
            with _eager_backward_lowering():
                out = self.compiled(*a, **kw)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - see the class docstring for which errors fall back
            if self.state == "ok" and not _is_compiler_error(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            logger.warning("--compile: torch.compile failed (%s: %s); continuing eager", type(e).__name__, first[:200])
            self.state = "eager"
            return self.module(*a, **kw)
        self.state = "ok"
        return out


def prepare_model(model: torch.nn.Module, args: argparse.Namespace, device: torch.device
                  ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Move to device and apply the speed flags: activation checkpointing, channels_last, DDP or FSDP,
    torch.compile. Returns (model to train, the plain module whose state_dict keys are the reference's).

    Call it once per module a run holds (a student and its teacher each). A module that takes no
    gradients (every parameter requires_grad=False: an EMA teacher, a frozen encoder) is never DDP-wrapped:
    DDP has nothing to reduce for it (and refuses such a module); instead rank 0's parameters and buffers
    are broadcast once, the copy DDP would have made, so every rank starts from the same weights. Set
    requires_grad before calling (finetune_setup.trainable_parameters does)."""
    plain = model
    if getattr(args, "grad_ckpt", False):
        if not hasattr(model, "set_grad_checkpointing"):
            raise UserError(f"--grad_ckpt: {type(model).__name__} does not support activation checkpointing")
        model.set_grad_checkpointing(True)
    model.to(device)
    args.channels_last_applied = bool(getattr(args, "channels_last", False)) and has_conv_layers(model)
    if args.channels_last_applied:
        model.to(memory_format=torch.channels_last)
    elif getattr(args, "channels_last", False):
        logger.info("--channels_last: %s has no convolutional stages; ignored", type(model).__name__)
    if getattr(args, "fsdp", False):
        if args.channels_last_applied and getattr(args, "distributed", False):
            raise UserError("--channels_last cannot be combined with --fsdp (FSDP2 shards only contiguous "
                            "parameters); drop one of them")
        if not getattr(args, "distributed", False):
            logger.info("--fsdp: single process, nothing to shard; training unsharded")
        else:
            from util.fsdp import shard_model
            model = shard_model(model, device)
    elif getattr(args, "distributed", False) and not takes_gradients(model):
        logger.info("%s takes no gradients: not wrapped in DDP (rank 0's weights copied to every rank)",
                    type(model).__name__)
        broadcast_from_rank0(model)
    elif getattr(args, "distributed", False):
        static = bool(getattr(args, "ddp_static_graph", True))
        if static and getattr(args, "accum_iter", 1) > 1:
            # static_graph and no_sync() (gradient accumulation) together hit a DDP bug (pytorch#143580):
            # an internal assert, or gradients silently not reduced once that assert is removed.
            logger.info("--accum_iter %d: DDP static_graph off (not valid with no_sync accumulation)", args.accum_iter)
            static = False
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None,
            bucket_cap_mb=getattr(args, "ddp_bucket_mb", 25), gradient_as_bucket_view=True, static_graph=static)
    if getattr(args, "compile", False):
        model = CompiledOrEager(model, getattr(args, "compile_mode", None))
    return model, plain


def takes_gradients(model: torch.nn.Module) -> bool:
    """True when any parameter of the module requires a gradient (what DDP needs to wrap it)."""
    return any(p.requires_grad for p in model.parameters())


def broadcast_from_rank0(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does at construction). Collective."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def default_workers(device: torch.device, requested: int | None = None) -> int:
    """`requested`, else min(8, CPU cores per process), with one process per GPU on CUDA."""
    if requested is not None:
        return requested
    per_process = (os.cpu_count() or 2) // max(torch.cuda.device_count() if device.type == "cuda" else 1, 1)
    return min(8, max(per_process, 1))


def make_loader(dataset: Dataset, sampler: Sampler, args: argparse.Namespace, device: torch.device,
                batch_size: int, drop_last: bool) -> DataLoader:
    """The DataLoader of a run; under `--bad_image skip` a `util.data.SkippingLoader` (iterated alike)
    that drops unreadable samples and lists them. Training loaders (`drop_last`) of a multi-process run
    refuse a batch with no readable image, which would leave the ranks at different step counts."""
    from util.skipping import skipping_loader
    from util.dist import get_world_size
    workers = default_workers(device, args.num_workers)
    return skipping_loader(lambda collate: DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=bool(getattr(args, "pin_mem", True)) and device.type == "cuda", drop_last=drop_last,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None),
        dataset, strict=drop_last and get_world_size() > 1)


class RunCheckpointer:
    """Writes the training checkpoints of one run: end of epoch (and periodic), every
    `--save_every_steps` updates, and on pre-emption. A checkpoint names the next step to run
    (`resume_point`), so a resumed run neither skips nor repeats work. `model`: the module, or the run's
    named states (`{"student": ..., "teacher": ..., "<loss>": ...}`, see util.checkpoint.named_states);
    `extra()`: further plain entries (preprocessing, selection state)."""

    def __init__(self, args: argparse.Namespace, model: States, opt: Optimization, config: dict[str, Any],
                 extra: Any = None) -> None:
        self.args, self.model, self.opt, self.config = args, model, opt, config
        self.extra = extra or (lambda: {})
        self.steps_per_epoch = 0

    def _save(self, completed_epoch: int, resume_point: dict[str, int], loop_state: dict[str, Any] | None,
              periodic: bool = False) -> None:
        from util.checkpoint import save_training_checkpoint
        from util.dist import get_world_size
        extra = {**self.extra(), "skipped_steps": self.opt.skipped_steps,
                 "resume_point": {**resume_point, "world_size": get_world_size(),
                                  "batch_size": self.args.batch_size}}
        if loop_state is not None:
            extra["loop_state"] = loop_state
        save_training_checkpoint(self.args.output_dir, completed_epoch, self.model, self.opt.optimizer, self.opt.scaler,
                                 self.config, extra=extra, periodic=periodic,
                                 keep_last=getattr(self.args, "keep_last", 0))

    def end_of_epoch(self, epoch: int, periodic: bool) -> None:
        self._save(epoch, {"epoch": epoch + 1, "step": 0}, None, periodic)

    def on_update(self, epoch: int):
        every = getattr(self.args, "save_every_steps", 0) or 0

        def callback(step: int, state_fn, stop: bool) -> None:
            if step >= self.steps_per_epoch:
                if stop:  # the epoch is complete: an end-of-epoch checkpoint says it all
                    self.end_of_epoch(epoch, periodic=False)
                return
            if stop or (every and step % every == 0):
                self._save(epoch - 1, {"epoch": epoch, "step": step}, state_fn())
        return callback


def resume_position(args: argparse.Namespace, ckpt: dict[str, Any] | None) -> tuple[int, int, dict | None]:
    """(epoch, step within it, loop state) to continue from; a different world size continues at the same
    number of samples, with a logged note that bitwise exactness is lost."""
    from util.dist import get_world_size
    if not ckpt:
        return args.start_epoch, 0, None
    point = ckpt.get("resume_point")
    if not isinstance(point, dict):  # reference / older checkpoints: epoch granularity
        return int(ckpt.get("epoch", -1)) + 1, 0, None
    epoch, step = int(point["epoch"]), int(point.get("step", 0))
    world = get_world_size()
    if point.get("world_size", world) != world or point.get("batch_size", args.batch_size) != args.batch_size:
        samples = step * int(point.get("batch_size", args.batch_size)) * int(point.get("world_size", world))
        step = samples // (args.batch_size * world)
        logger.warning("resuming with a different world size / batch size (%s x %s -> %s x %s): the run continues "
                       "at the same sample count, but is no longer bitwise identical to an uninterrupted run",
                       point.get("world_size"), point.get("batch_size"), world, args.batch_size)
    return epoch, step, ckpt.get("loop_state") if step else None
