"""THE atomic file writer: a temp file in the target's folder, fsync, then `os.replace` over the target.

A reader (or a kill at any instant) sees either the previous file or the complete new one, never part
of one; a failed write removes its temp file and leaves the previous file untouched. Standard library
only, so every module (metrics, synthetic data, checkpoints, caches) can share it.

Test hook: `MEDFOUND_TEST_FAIL_WRITE=PATTERN` makes every write whose target file name matches the
shell pattern (`fnmatch`, e.g. `*_metrics.json` or `*`) fail with ENOSPC after the temp file is written
and before the rename, as a full disk would; so each writer's out-of-space behaviour can be tested.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import tempfile
from typing import BinaryIO, Callable

FAIL_WRITE_ENV = "MEDFOUND_TEST_FAIL_WRITE"


def _fail_write_hook(path: str) -> None:
    pattern = os.environ.get(FAIL_WRITE_ENV)
    if pattern and fnmatch.fnmatch(os.path.basename(path), pattern):
        raise OSError(errno.ENOSPC, "No space left on device")


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object], *, fsync: bool = True,
                 mode: int | None = 0o644, before_replace: Callable[[], None] | None = None) -> str:
    """Write `data` (bytes, or a callback that writes into the open binary file) to `path` atomically.

    `fsync` flushes the file and, after the rename, its folder to the disk (pass False for bulk data that
    can be regenerated); `mode` is applied to the temp file (`mkstemp` creates 0600; None keeps that);
    `before_replace` runs after the data is written and before the rename (a caller's own fault
    injection). Returns `path` as a string; an OSError propagates after the temp file is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        _fail_write_hook(path)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(directory)
    return path


def fsync_dir(directory: str) -> None:
    """Persist a rename in `directory` (best effort: some file systems refuse to open a folder)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
