"""Run set-up shared by every entry point: distributed init, device, precision, seeding, resume, loaders."""
from __future__ import annotations

import argparse
import logging
import os
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from util.checkpoint import config_differences, find_resume_checkpoint, load_file, load_training_state
from util.cli import UserError, setup_logging
from util.dist import get_rank, init_distributed_mode
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
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {path}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"--output_dir {path} is not writable")


def maybe_resume(args: argparse.Namespace, config: dict[str, Any], model: torch.nn.Module,
                 opt: Optimization | None) -> dict[str, Any] | None:
    """`--resume PATH`, `--resume auto`, or auto-resume from output_dir when the saved config matches."""
    resume = args.resume
    if resume == "auto" or (not resume and getattr(args, "auto_resume", False)):
        resume = find_resume_checkpoint(args.output_dir) or ""
        if resume:
            diffs = config_differences(load_file(resume).get("args", {}), config)
            if diffs:
                raise UserError(f"{resume} was written by a different run ({'; '.join(diffs)}); use a new "
                                f"--output_dir, or --no_auto_resume to start over here")
    if not resume:
        return None
    ckpt = load_training_state(resume, model, opt.optimizer if opt else None, opt.scaler if opt else None,
                               restore_rng=False)
    args.start_epoch = int(ckpt.get("epoch", -1)) + 1
    if opt is not None:
        opt.skipped_steps = int(ckpt.get("skipped_steps", 0))
    logger.info("resumed from %s (epoch %s done)", resume, ckpt.get("epoch"))
    return ckpt


def default_workers(args: argparse.Namespace) -> int:
    if args.num_workers is not None:
        return args.num_workers
    per_process = (os.cpu_count() or 2) // max(torch.cuda.device_count(), 1)
    return min(8, max(per_process, 1))


def make_loader(dataset: Dataset, sampler: Sampler, args: argparse.Namespace, device: torch.device,
                batch_size: int, drop_last: bool) -> DataLoader:
    workers = default_workers(args)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=bool(getattr(args, "pin_mem", True)) and device.type == "cuda", drop_last=drop_last,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
