"""The unreadable-image policy shared by every dataset and loader (`--bad_image {error,skip}`).

A dataset reads through `read_or_skip`: under 'skip' an unreadable file becomes a small `SkippedSample`
marker (never a substitute sample); `SkipCollate` drops the markers from each batch and sends their paths
back from the DataLoader workers; `SkippingLoader` counts, lists and logs them; `gather_skipped` merges
them across ranks for the run's summary. Other failures of one sample become a one-line `SampleError`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from util.cli import UserError, one_line
from util.image_io import BadImageError, with_skip_advice

logger = logging.getLogger("medfound")


class SampleError(UserError):
    """An unexpected failure while loading or augmenting one sample, e.g. an augmentation op that
    hands Pillow an argument it rejects. One line naming the step and the file, also when raised in
    a DataLoader worker (`util.cli.run_main` strips the worker's re-raise preamble and traceback)."""


def sample_failure(step: str, path: str, exc: BaseException, hint: str) -> SampleError:
    """`SampleError('<step> failed on <path>: <Type>: <message> (<hint>)')`, on one line."""
    detail = one_line(str(exc))
    detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return SampleError(f"{step} failed on {path}: {detail} ({hint})")


class SkippedSample(NamedTuple):
    """What a dataset returns under `--bad_image skip` for an unreadable file: a small picklable marker
    (never a substitute sample). `skip_collate` drops it from the batch and hands its path back to the
    main process, where `SkippingLoader` counts and lists it."""
    index: int
    path: str
    reason: str


def read_or_skip(read: Callable[[], Any], index: int, path: str, bad_image: str | None) -> Any:
    """`read()`, applying the unreadable-image policy shared by every dataset: `'skip'` turns a
    BadImageError into a `SkippedSample`; `'error'` raises it advising `--bad_image skip` (the tool has
    the flag); None (a tool without the flag) raises it as it is. Other errors always propagate."""
    try:
        return read()
    except BadImageError as e:
        if bad_image == "skip":
            logger.warning("skipping bad image: %s", e)
            return SkippedSample(int(index), path, str(e))
        raise (with_skip_advice(e) if bad_image == "error" else e) from None


class SkipCollate:
    """Collate that drops `SkippedSample` markers: returns `(batch or None, [skipped paths])`, so the
    paths travel back from DataLoader workers with the batch they were dropped from."""

    def __init__(self, collate: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate = collate

    def __call__(self, samples: list[Any]) -> tuple[Any, list[str]]:
        from torch.utils.data import default_collate
        kept = [s for s in samples if not isinstance(s, SkippedSample)]
        skipped = [s.path for s in samples if isinstance(s, SkippedSample)]
        return ((self.collate or default_collate)(kept) if kept else None), skipped


class SkippingLoader:
    """A DataLoader built with `SkipCollate`, iterated like the DataLoader itself (same `len()`,
    `sampler`, `dataset`, `batch_size`). Yields the batches without their skipped samples, accumulates
    the skipped paths (`skipped`: every distinct one, in order; `epoch_skipped`: those of the latest
    pass) and logs them once per pass. A batch whose every sample was unreadable is dropped; with
    `strict` (training under several processes, where every rank must run the same number of steps)
    it is an error naming the files instead."""

    def __init__(self, loader: Any, strict: bool = False) -> None:
        self.loader = loader
        self.strict = strict
        self.skipped: list[str] = []
        self.epoch_skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # sampler, dataset, batch_size, num_workers, ...
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        self.epoch_skipped = []
        seen = set(self.skipped)
        for batch, skipped in self.loader:
            if skipped:
                self.epoch_skipped.extend(skipped)
                for p in skipped:
                    if p not in seen:
                        seen.add(p)
                        self.skipped.append(p)
            if batch is None:
                if self.strict:
                    raise UserError(f"every image of a batch is unreadable ({', '.join(skipped)}); with several "
                                    "processes each must run the same steps: remove or fix these files")
                continue
            yield batch
        if self.epoch_skipped:
            logger.warning("%s", skipped_message(self.epoch_skipped))


def skipped_message(paths: Sequence[str], limit: int = 20) -> str:
    """'N unreadable image(s) skipped: a, b, ...' (the first `limit` names)."""
    shown = ", ".join(paths[:limit]) + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")
    return f"{len(paths)} unreadable image(s) skipped: {shown}"


def skipping_loader(make: Callable[[Callable | None], Any], dataset: Any, strict: bool = False) -> Any:
    """`make(collate_fn)` -> DataLoader; wrapped in a `SkippingLoader` when `dataset.bad_image` is
    'skip' (the plain DataLoader otherwise, built with its default collate)."""
    if getattr(dataset, "bad_image", None) != "skip":
        return make(None)
    return SkippingLoader(make(SkipCollate()), strict=strict)


def gather_skipped(loader: Any, epoch: bool = False) -> list[str]:
    """The skipped paths of `loader` (all of them, or the latest pass's), from every rank (a collective
    when several processes run and the loader skips: every rank must call it); [] for a loader that
    does not skip."""
    if not isinstance(loader, SkippingLoader):
        return []
    paths = list(getattr(loader, "epoch_skipped" if epoch else "skipped", []) or [])
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, paths)
        merged: dict[str, None] = {}
        for part in parts:
            merged.update(dict.fromkeys(part or []))
        paths = list(merged)
    return paths
