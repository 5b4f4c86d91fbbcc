"""Shared fixtures for the test suite: small synthetic image trees and one tiny pretraining run.

Expensive artefacts are session-scoped so every test file can reuse them (pretraining CLI tests
today, finetuning / evaluation tests later). Tests must treat them as read-only: copy a file into a
fresh `tmp_path` before running anything that writes next to it.

Everything lives under pytest's temporary directories; nothing here reads outside the repository
or touches the network.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Per-process threads: the CI box has 2 cores; subprocesses must not oversubscribe them.
# PYTHONFAULTHANDLER: a child that run_cmd stops with SIGABRT after its timeout prints every thread's stack
# first, so a hang in a subprocess shows where it is.
_CHILD_ENV_DEFAULTS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                       "PYTHONFAULTHANDLER": "1"}
# Launcher variables that would turn a plain subprocess into a (broken) distributed rank.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK",
                  "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "CUDA_VISIBLE_DEVICES")

# The smallest registered MAE, on 32-px input: 16 patches of 8 px.
TINY_MODEL = "mae_vit_micro_patch8"
TINY_DEBLUR_MODEL = "dmae_vit_micro_patch8"
TINY_INPUT = 32
# Images per class in each split of `synthetic_fundus_tree` (2 classes).
TREE_SPLITS = {"train": 8, "val": 2, "test": 2}
TINY_TRAIN_IMAGES = 2 * TREE_SPLITS["train"]  # 16 images in data_path/train


def free_port() -> int:
    """A free TCP port on localhost for a torchrun master."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_key_bias(sd: dict) -> dict:
    """Drop the key part of every attention input bias (`qkv.bias`: its middle third; CrossMAE's
    `.kv.bias`: its first half). Softmax is invariant to a per-query constant, so the key bias has an
    exactly-zero gradient; in float arithmetic it gets ~1e-10 noise, which Adam's normalisation turns
    into lr-sized random steps. It is the one parameter whose value depends on the order of
    floating-point reductions (1 vs 2 processes, DDP vs FSDP) rather than on the data."""
    import torch
    out = {}
    for k, v in sd.items():
        if k.endswith("qkv.bias"):
            d = v.numel() // 3
            v = torch.cat([v[:d], v[2 * d:]])
        elif k.endswith(".kv.bias"):
            v = v[v.numel() // 2:]
        out[k] = v
    return out


def fixed_batch_losses(model, steps: int = 40, lr: float = 3e-3) -> tuple[float, float]:
    """(first, last) loss of an MAE-style model (32-px input, 16 patches) trained with AdamW on one fixed
    batch of 4 synthetic fundus images and fixed mask noise: a model that can learn overfits it."""
    import torch
    from util.synthetic import fundus_sample
    imgs = torch.stack([torch.from_numpy(fundus_sample(i, size=32, n_lesions=i % 3).image).permute(2, 0, 1)
                        for i in range(4)]).float().div(255).sub(0.4).div(0.25)
    noise = torch.rand(4, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        loss = model(imgs, noise=noise)[0]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, loss.item()


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def child_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: no launcher variables, CPU only, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.update(_CHILD_ENV_DEFAULTS)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU everywhere, so numbers compare across machines
    env.update(extra)
    return env


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first), read from /proc. torchrun starts its workers in
    sessions of their own, so killing torchrun's process group would leave them running, holding the
    output pipes open."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop_tree(proc: subprocess.Popen) -> tuple[str, str]:
    """Stop a timed-out command and everything it started; return what it printed.

    SIGABRT first, so every Python process in the tree dumps its threads' stacks (PYTHONFAULTHANDLER),
    then SIGKILL to the whole tree and the group. Reading the pipes is bounded too: a process this could
    not see must not turn a timeout into a hang."""
    tree = [proc.pid, *_descendants(proc.pid)]
    _signal_all(tree, signal.SIGABRT)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(1)  # workers that outlive torchrun finish writing their stacks
    _signal_all(_descendants(proc.pid) + tree, signal.SIGKILL)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return "(output not readable: a process outside the tree holds the pipe)", ""


def run_cmd(cmd: Sequence[str], timeout: float = 120, env: dict[str, str] | None = None,
            cwd: str | os.PathLike = REPO) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout stop it and everything it started (torchrun's
    workers included) and fail with the stacks they printed."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env if env is not None else child_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _stop_tree(proc)
        raise AssertionError(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n--- stdout\n{out[-4000:]}"
                             f"\n--- stderr\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# A test still running after this long ends the whole run (exit status 3) instead of holding CI until
# its own time limit; pytest.ini's faulthandler_timeout has printed every thread's stack by then.
TEST_HARD_LIMIT_S = 900


def _abandon_run(item: pytest.Item) -> None:
    import faulthandler
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # give fd 2 back to the terminal so the reason reaches the CI log
        capture.suspend_global_capture(in_=False)
    _signal_all(_descendants(os.getpid()), signal.SIGKILL)
    os.write(2, f"\n{item.nodeid} still running after {TEST_HARD_LIMIT_S} s: the test run stops here\n".encode())
    faulthandler.dump_traceback(file=2, all_threads=True)
    os._exit(3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import threading
    watchdog = threading.Timer(TEST_HARD_LIMIT_S, _abandon_run, args=(item,))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()


def run_pretrain(args: Sequence[str], timeout: float = 120, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
    """`python main_pretrain.py ARGS` from the repository root."""
    return run_cmd([sys.executable, "main_pretrain.py", *map(str, args)], timeout=timeout, env=env)


def run_inprocess(script: str, args: Sequence[object]) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` run in this process through the script's own `run_main`, with its stdout, stderr
    and exit status captured as a CompletedProcess. A subprocess pays ~7 s of torch/timm/torchvision imports
    before its first line; single-process commands need none of its isolation. One intra-op thread, as
    run_cmd's children have, so results equal a subprocess's bit for bit. An exception other than SystemExit
    propagates (a subprocess would print it as a traceback)."""
    import contextlib
    import importlib
    import importlib.util
    import io

    import torch
    path = REPO / script
    if path.parent == REPO:
        mod = importlib.import_module(path.stem)
    else:  # evaluation/*.py, linear_probing_on_CBIS/*.py: not importable packages
        spec = importlib.util.spec_from_file_location(f"inprocess_{path.parent.name}_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    code = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            mod.run_main(mod.main, mod.get_args_parser(), argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def describe(proc: subprocess.CompletedProcess) -> str:
    """Failure message with the tail of both streams."""
    return (f"exit {proc.returncode}: {' '.join(map(str, proc.args))}\n--- stdout (tail)\n{proc.stdout[-3000:]}"
            f"\n--- stderr (tail)\n{proc.stderr[-3000:]}")


def tiny_pretrain_flags(data_path: str | os.PathLike, **overrides: object) -> list[str]:
    """Flags of the tiny pretraining run (without --output_dir). `overrides` replace or add flags,
    e.g. `epochs=1`, `batch_size=2`, `norm_pix_loss='true'`; a None value drops the flag.

    The learning rate is deliberately large (lr = 0.05 * 4 / 256 ~ 8e-4, one warm-up epoch) so the
    weights move by ~1e-3 per epoch: equality checks at atol 1e-5 then mean something.
    """
    flags: dict[str, object] = {
        "model": TINY_MODEL, "input_size": TINY_INPUT, "data_path": data_path, "batch_size": 4, "epochs": 3,
        "warmup_epochs": 1, "blr": 0.05, "save_freq": 1, "print_freq": 1, "vis_images": 2, "device": "cpu",
        "num_workers": 0, "seed": 0,
    }
    flags.update(overrides)
    out: list[str] = []
    for k, v in flags.items():
        if v is not None:  # None drops the flag (e.g. data_path=None)
            out += [f"--{k}", str(v)]
    return out


@dataclass(frozen=True)
class PretrainRun:
    """A finished `main_pretrain.py` run. Read-only: copy files out before writing near them."""
    output_dir: Path
    flags: list[str]  # every flag except --output_dir
    data_path: Path
    proc: subprocess.CompletedProcess = field(repr=False)

    @property
    def checkpoint(self) -> Path:
        return self.output_dir / "checkpoint-last.pth"

    def periodic(self, epoch: int) -> Path:
        return self.output_dir / f"checkpoint-{epoch}.pth"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def synthetic_fundus_tree(tmp_path_factory) -> Path:
    """ImageFolder tree of 32-px RGB synthetic fundus PNGs (2 classes):
    `root/{train,val,test}/class_{0,1}/NNNNN.png` with 8 / 2 / 2 images per class.

    Pretraining with `--data_path root` reads the 16 images of `root/train` (MAE layout); finetuning
    tests can use the same tree as an ImageFolder dataset. Read-only.
    """
    from util.synthetic import write_dataset
    root = tmp_path_factory.mktemp("synthetic_fundus")
    write_dataset(root, kind="fundus", layout="imagefolder", num_classes=2, n_per_class=None, size=TINY_INPUT,
                  seed=0, splits=dict(TREE_SPLITS))
    return root


@pytest.fixture(scope="session")
def tiny_pretrain_run(synthetic_fundus_tree, tmp_path_factory) -> PretrainRun:
    """One tiny MAE pretraining run on `synthetic_fundus_tree` (CPU, 3 epochs, batch 4, 4 steps per
    epoch, `--save_freq 1`): output_dir holds checkpoint-{0,1,2}.pth, checkpoint-last.pth, config.json,
    log.txt, tensorboard/ and reconstructions.png. Read-only."""
    out = tmp_path_factory.mktemp("tiny_pretrain_run")
    flags = tiny_pretrain_flags(synthetic_fundus_tree)
    proc = run_pretrain([*flags, "--output_dir", out], timeout=180)
    assert proc.returncode == 0, describe(proc)
    return PretrainRun(output_dir=out, flags=flags, data_path=synthetic_fundus_tree, proc=proc)


@pytest.fixture
def medfound_log(caplog):
    """caplog for the 'medfound' logger, which does not propagate to the root logger."""
    import logging
    log = logging.getLogger("medfound")
    log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="medfound")
    yield caplog
    log.removeHandler(caplog.handler)


# Runs main_pretrain.py as __main__ under torchrun and, at exit, saves the parameters of the module each
# rank wrapped in DistributedDataParallel as RANK_DUMP_DIR/rank{RANK}.pt (only rank 0 writes checkpoints),
# so tests can check that DDP kept the ranks identical. It hooks DDP itself, not main_pretrain's internals.
_RANK_DUMP_WRAPPER = """
import atexit, os, runpy, sys
sys.path.insert(0, {repo!r})
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
wrapped = []
_init = DDP.__init__
def init_and_record(self, module, *args, **kwargs):
    _init(self, module, *args, **kwargs)
    wrapped.append(module)
DDP.__init__ = init_and_record
@atexit.register
def dump():
    if wrapped:
        state = {{k: v.detach().cpu().clone() for k, v in wrapped[-1].state_dict().items()}}
        torch.save(state, os.path.join(os.environ["RANK_DUMP_DIR"], "rank%s.pt" % os.environ["RANK"]))
sys.argv = [os.path.join({repo!r}, "main_pretrain.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_rank_dump_wrapper(directory: Path) -> Path:
    """The wrapper script above, written into `directory`; run it in place of main_pretrain.py."""
    path = Path(directory) / "rank_dump.py"
    path.write_text(_RANK_DUMP_WRAPPER.format(repo=str(REPO)))
    return path


@pytest.fixture(scope="session")
def bad_us_tree(tmp_path_factory) -> Path:
    """A small synthetic ultrasound ImageFolder tree (2 classes, 32 px) for the bad-input/output tests."""
    from util.synthetic import write_dataset
    root = tmp_path_factory.mktemp("bad_us")
    write_dataset(root, kind="ultrasound", layout="imagefolder", num_classes=2, n_per_class=12, size=32, seed=5)
    return root


@pytest.fixture(scope="session")
def bad_finetuned(bad_us_tree, tmp_path_factory) -> Path:
    """A one-epoch micro ViT classifier (from scratch): enough to predict and evaluate with."""
    out = tmp_path_factory.mktemp("bad_ft")
    import main_finetune
    from bad_input_helpers import VIT, run_cli
    run_cli(main_finetune, ["--model", VIT, "--data_path", str(bad_us_tree), "--output_dir", str(out), "--epochs", "1",
                            "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--bootstrap", "0",
                            "--print_freq", "100", "--aa", "none", "--reprob", "0"])
    return out / "checkpoint-best.pth"
