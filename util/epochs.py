"""The epoch driver shared by the pretraining commands (MAE family, iBOT, SLIP).

Each command supplies what one epoch trains and what it adds to the epoch's log line; the driver owns what
they all do the same way: the sampler's epoch and mid-epoch start point after a resume, a preemption
(``util.loop.Preempted``) closing the run cleanly, the end-of-epoch checkpoint with the command's periodic
rule, and one JSON line per epoch with the epoch time.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol

from util.loop import Preempted

logger = logging.getLogger(__name__)


class _Sampler(Protocol):
    def set_epoch(self, epoch: int) -> None: ...

    def set_start(self, start: int) -> None: ...


def periodic_every(freq: int, one_based: bool = False) -> Callable[[int, bool], bool]:
    """The rule that marks an epoch's checkpoint as one to keep: every `freq` epochs and the last one;
    0 keeps none. MAE and iBOT count from epoch 0 (0, freq, 2*freq, ...); SLIP keeps epochs whose
    one-based number divides by `freq` (`one_based=True`: freq-1, 2*freq-1, ...)."""
    def rule(epoch: int, last: bool) -> bool:
        return freq > 0 and (last or (epoch + int(one_based)) % freq == 0)
    return rule


def run_epochs(*, start_epoch: int, epochs: int, start_step: int, batch_size: int, sampler: _Sampler,
               train: Callable[[int, int], dict[str, Any]], checkpointer: Any,
               periodic: Callable[[int, bool], bool], run_logger: Any, cleanup: Callable[[], None],
               after_epoch: Callable[[int, dict[str, Any], bool], dict[str, Any] | None] | None = None,
               n_parameters: int | None = None) -> tuple[dict[str, Any], bool]:
    """Train epochs `start_epoch` .. `epochs`-1 and return (the last epoch's stats, whether the run was
    preempted). `train(epoch, first_step)` runs one epoch from `first_step` (non-zero only for the epoch a
    mid-epoch resume lands in); `after_epoch(epoch, stats, last)` runs after the checkpoint and returns
    extra fields for the epoch's log line (validation, k-NN, zero-shot). A preempted run has its logger
    closed and the process group cleaned up before returning."""
    stats: dict[str, Any] = {}
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        first = start_step if epoch == start_epoch else 0
        sampler.set_start(first * batch_size)
        t0 = time.time()
        try:
            stats = train(epoch, first)
        except Preempted as e:
            logger.warning("%s", e)
            run_logger.close()
            cleanup()
            return stats, True
        last = epoch + 1 == epochs
        checkpointer.end_of_epoch(epoch, periodic(epoch, last))
        record: dict[str, Any] = {f"train_{k}": v for k, v in stats.items()}
        record.update((after_epoch(epoch, stats, last) if after_epoch else None) or {})
        record["epoch"] = epoch
        if n_parameters is not None:
            record["n_parameters"] = n_parameters
        record["epoch_time_s"] = round(time.time() - t0, 2)
        run_logger.json_line(record)
    return stats, False
