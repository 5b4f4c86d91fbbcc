"""SLURM launch of main_slip.py through the `submitit` package (SLIP's run_with_submitit.py flags).

  python run_with_submitit.py --nodes 8 --ngpus 8 --partition P --job_dir runs/%j [main_slip.py flags]

Each SLURM task runs one training process; its rank, world size, local rank and the rendezvous address
come from submitit's job environment (the first node's host name). Without submitit installed the script
stops with one line saying how to launch the same run with torchrun.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import slip_args
from util.cli import UserError, help_requested


def get_args_parser() -> argparse.ArgumentParser:
    p = slip_args.get_args_parser("run_with_submitit.py")
    g = p.add_argument_group("SLURM (submitit)")
    g.add_argument("--ngpus", default=8, type=int, help="GPUs (= processes) per node")
    g.add_argument("--nodes", default=8, type=int, help="nodes to request")
    g.add_argument("--timeout", default=4320, type=int, help="job time limit in minutes")
    g.add_argument("--job_dir", default="", help="submitit's folder for logs (default: <--output-dir>/submitit/%%j)")
    g.add_argument("--partition", default="", help="SLURM partition")
    g.add_argument("--use_volta32", action="store_true", help="request 32 GB V100 nodes (constraint volta32gb)")
    g.add_argument("--comment", default="", help="SLURM comment")
    return p


class Trainer:
    """The callable submitit pickles and runs on every task: sets torchrun's environment from the job's and
    calls main_slip.main; on pre-emption (`checkpoint`) it requeues itself, and the run resumes from its
    newest checkpoint (`--resume auto`)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> Any:
        import submitit
        env = submitit.JobEnvironment()
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                          MASTER_ADDR=env.hostnames[0], MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
        import main_slip
        return main_slip.main(self.args)

    def checkpoint(self) -> Any:
        import submitit
        self.args.resume = "auto"
        return submitit.helpers.DelayedSubmission(type(self)(self.args))


def torchrun_command(argv: Sequence[str], nodes: int, ngpus: int) -> str:
    """The equivalent torchrun command line (without the SLURM-only flags)."""
    slurm_only = {"--ngpus", "--nodes", "--timeout", "--job_dir", "--partition", "--comment"}
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in slurm_only:
            skip = "=" not in a
            continue
        if name == "--use_volta32":
            continue
        kept.append(a)
    multi = f" --nnodes={nodes} --rdzv_backend=c10d --rdzv_endpoint=HOST:29500" if nodes > 1 else ""
    return f"torchrun --nproc_per_node={ngpus}{multi} main_slip.py " + " ".join(kept)


def submit(args: argparse.Namespace, argv: Sequence[str]) -> Any:
    try:
        import submitit
    except ImportError:
        raise UserError(f"the submitit package is not installed (pip install submitit); or launch on each node with: "
                        f"{torchrun_command(argv, args.nodes, args.ngpus)}") from None
    job_dir = args.job_dir or os.path.join(args.output_dir, "submitit", "%j")
    executor = submitit.AutoExecutor(folder=job_dir, slurm_max_num_timeout=30)
    extra: dict[str, Any] = {}
    if args.partition:
        extra["slurm_partition"] = args.partition
    if args.use_volta32:
        extra["slurm_constraint"] = "volta32gb"
    if args.comment:
        extra["slurm_comment"] = args.comment
    executor.update_parameters(mem_gb=40 * args.ngpus, gpus_per_node=args.ngpus, tasks_per_node=args.ngpus,
                               cpus_per_task=10, nodes=args.nodes, timeout_min=args.timeout,
                               slurm_signal_delay_s=120, name="slip", **extra)
    args.world_size = args.nodes * args.ngpus
    job = executor.submit(Trainer(args))
    print(f"submitted job {job.job_id}; logs in {job_dir}")
    return job


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    if help_requested(argv):
        parser.print_help()
        sys.exit(0)
    from util.cli import run_main
    run_main(lambda a: submit(a, argv), parser, argv)


if __name__ == "__main__":
    main()
