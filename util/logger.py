"""Progress logging with ETA, TensorBoard scalars/images and a machine-readable `log.txt` (JSON lines)."""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections import defaultdict, deque
from typing import Any, Callable, Iterable, Iterator

import torch

from util.dist import is_main_process

logger = logging.getLogger("medfound")


class SmoothedValue:
    """Windowed and global averages of a scalar stream (values are host floats: no device syncs here)."""

    def __init__(self, window: int = 20) -> None:
        self.window: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return sum(self.window) / max(len(self.window), 1)

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.window[-1] if self.window else float("nan")


class RunClock:
    """The whole run's ETA, extrapolated from the wall time of the epochs done so far in this process
    (so validation and checkpoint time count once an epoch has ended)."""

    def __init__(self, start_epoch: float, end_epoch: float) -> None:
        self.start, self.start_epoch, self.end_epoch = time.time(), float(start_epoch), float(end_epoch)

    def eta(self, progress: float) -> datetime.timedelta | None:
        """`progress` in epochs (e.g. 3.5 = half-way through epoch 3); None before any progress."""
        done = progress - self.start_epoch
        if done <= 0:
            return None
        left = max(self.end_epoch - progress, 0.0)
        return datetime.timedelta(seconds=int((time.time() - self.start) / done * left))


class MetricLogger:
    """Iterates a loader, printing `[i/n] eta ... metrics` every `print_freq` steps; with `run_eta`
    (step index -> the whole run's ETA) the line also says when the run will end."""

    def __init__(self, header: str = "", print_freq: int = 20,
                 run_eta: Callable[[int], datetime.timedelta | None] | None = None) -> None:
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.header = header
        self.print_freq = print_freq
        self.run_eta = run_eta

    def update(self, **kwargs: float) -> None:
        for k, v in kwargs.items():
            self.meters[k].update(float(v))

    def summary(self) -> dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}

    def __str__(self) -> str:
        return "  ".join(f"{k} {m.value:.4g} ({m.global_avg:.4g})" for k, m in self.meters.items())

    def log_every(self, iterable: Iterable[Any], total: int | None = None) -> Iterator[Any]:
        total = total if total is not None else len(iterable)  # type: ignore[arg-type]
        start = time.time()
        data_time, iter_time = SmoothedValue(), SmoothedValue()
        end = time.time()
        i = 0
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % self.print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                run = self.run_eta(i) if self.run_eta is not None else None
                eta_text = f"{eta} (run {run})" if run is not None else str(eta)
                mem = f"  mem {torch.cuda.max_memory_allocated() / 2**20:.0f}MB" if torch.cuda.is_available() else ""
                logger.info("%s [%d/%d] eta %s  %s  time %.3fs data %.3fs%s", self.header, i, total, eta_text, self,
                            iter_time.avg, data_time.avg, mem)
            end = time.time()
        elapsed = time.time() - start
        logger.info("%s done in %s (%.3f s/it)", self.header, datetime.timedelta(seconds=int(elapsed)),
                    elapsed / max(i + 1, 1))


class RunLogger:
    """Rank-0 sinks: TensorBoard (when installed) and `log.txt` with one JSON object per line."""

    def __init__(self, output_dir: str | None, log_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self.writer = None
        if not is_main_process() or not output_dir:
            return
        os.makedirs(output_dir, exist_ok=True)
        if log_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                os.makedirs(log_dir, exist_ok=True)
                self.writer = SummaryWriter(log_dir=log_dir)
            except ImportError:
                logger.warning("tensorboard is not installed; scalars go to log.txt only")

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}{k}", v, step)

    def image(self, tag: str, chw: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, chw, step)

    def json_line(self, record: dict[str, Any], name: str = "log.txt") -> None:
        if not is_main_process() or not self.output_dir:
            return
        from util.atomic import append_text  # a full disk: one line naming log.txt, not a traceback
        append_text(os.path.join(self.output_dir, name), json.dumps(record) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def warn_if(message: str | None) -> bool:
    """Log `message` as a warning when there is one (checks return None when all is well)."""
    if message:
        logger.warning("%s", message)
    return bool(message)


def files_in(folder: str, tag: str) -> str:
    """`folder/{a,b}` for the files of `folder` whose names contain `tag` (for summaries)."""
    names = sorted(f for f in os.listdir(folder) if tag in f) if os.path.isdir(folder) else []
    return f"{folder}/{{{','.join(names)}}}" if names else folder


def print_summary(title: str, rows: list[tuple[str, Any]], next_cmd: str | None = None) -> None:
    """The block a user reads at the end of a run: what was reached, where the files are, what to run
    next (rank 0; rows whose value is None or empty are left out)."""
    if not is_main_process():
        return
    rows = [(k, v) for k, v in rows if v not in (None, "")]
    width = max([len(k) for k, _ in rows] + [4])
    lines = [f"==== {title} summary ===="] + [f"{k:>{width}}: {v}" for k, v in rows]
    if next_cmd:
        lines.append(f"{'next':>{width}}: {next_cmd}")
    logger.info("\n%s", "\n".join(lines))
