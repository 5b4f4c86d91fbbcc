"""Distributed setup for torchrun, `torch.distributed.launch`, SLURM and OpenMPI, plus rank helpers.

Everything degrades to a single process when no launcher variables are present, and uses gloo on CPU
so the same code paths are testable on a laptop or in CI.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("medfound")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return None


def init_distributed_mode(args: Any) -> None:
    """Read the launcher's environment and start the process group; sets args.rank/world_size/gpu/distributed.

    Precedence: torchrun / torch.distributed.launch (RANK, WORLD_SIZE, LOCAL_RANK) > OpenMPI with
    `--dist_on_itp` > SLURM (SLURM_PROCID with an explicit world size) > single process.
    """
    rank = _env_int("RANK")
    world = _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK")
    if rank is None and getattr(args, "dist_on_itp", False):
        rank, world, local = (_env_int("OMPI_COMM_WORLD_RANK"), _env_int("OMPI_COMM_WORLD_SIZE"),
                              _env_int("OMPI_COMM_WORLD_LOCAL_RANK"))
    elif rank is None and _env_int("SLURM_PROCID") is not None and getattr(args, "world_size", 1) > 1:
        rank, world = _env_int("SLURM_PROCID"), args.world_size
        local = rank % max(torch.cuda.device_count(), 1)
    if local is None:
        local = getattr(args, "local_rank", 0) or 0
    if rank is None or world is None or world < 1:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        return
    use_cuda = torch.cuda.is_available() and str(getattr(args, "device", "cuda")).startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist_url = getattr(args, "dist_url", "env://") or "env://"
    logger.info("distributed init (rank %d/%d, local %d, backend %s, %s)", rank, world, local, backend, dist_url)
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=world, rank=rank,
                            timeout=datetime.timedelta(minutes=30))
    args.distributed, args.rank, args.world_size, args.gpu = True, rank, world, local
    register_gloo_exit_hook()
    dist.barrier()


# Seconds the main thread sleeps (the GIL released) so that gloo's workers retire finished collectives.
_GLOO_RETIRE_S = 0.2
_EXIT_HOOK = False


def let_gloo_retire_work() -> None:
    """Give gloo's worker threads a moment, with the GIL released, to retire finished collectives.

    A gloo worker frees a finished collective (and the last reference to its tensors, which may own
    Python objects) just after waking the waiting rank, and that free needs the GIL. Two ends of a run
    can take the GIL from it for good:
    - the process group destroyed while the GIL is held: DistributedDataParallel's reducer holds the
      group and is freed with the GIL held when the model goes out of scope after `cleanup()`; the
      destructor joins the worker, which waits for the GIL (a deadlock: ~1 in 16 two-process CPU runs
      hung at exit on torch 2.11);
    - interpreter finalisation while a worker still holds such a collective (FSDP's DTensors keep their
      process group alive after `destroy_process_group()`): the process aborts with "terminate called
      without an active exception" (~1 in 6 two-process CPU FSDP runs).
    NCCL is not affected."""
    time.sleep(_GLOO_RETIRE_S)


def register_gloo_exit_hook() -> None:
    """At exit, while Python is still whole, let gloo retire its work (once per process, gloo only): a
    run that ends by an exception never reaches `cleanup()`."""
    global _EXIT_HOOK
    if not _EXIT_HOOK and is_dist() and dist.get_backend() == "gloo":
        atexit.register(let_gloo_retire_work)
        _EXIT_HOOK = True


def cleanup() -> None:
    """End of a run on every rank: wait for all, let gloo finish its work, destroy the process group."""
    if is_dist():
        dist.barrier()
        if dist.get_backend() == "gloo":
            let_gloo_retire_work()
        dist.destroy_process_group()


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Mean of a scalar across ranks (a host sync: call at logging intervals only)."""
    if not is_dist():
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64,
                        device="cuda" if dist.get_backend() == "nccl" else "cpu").clone()
    dist.all_reduce(t)
    return float(t) / get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (e.g. "my write failed"), so all ranks take the
    same branch instead of some waiting forever in the next collective."""
    if not is_dist():
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
