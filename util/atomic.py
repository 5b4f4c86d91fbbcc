"""THE atomic file writer: a temp file in the target's folder, fsync, then `os.replace` over the target.

A reader (or a kill at any instant) sees either the previous file or the complete new one, never part
of one; a failed write removes its temp file and leaves the previous file untouched. Standard library
(and the torch-free util.cli) only, so every module (metrics, synthetic data, checkpoints, caches) can share it.

Test hook: `MEDFOUND_TEST_FAIL_WRITE=PATTERN` makes every write whose target file name matches the
shell pattern (`fnmatch`, e.g. `*_metrics.json` or `*`) fail with ENOSPC after the temp file is written
and before the rename, as a full disk would; so each writer's out-of-space behaviour can be tested.
The same pattern makes `append_text` (log.txt lines) fail before it writes.

A failed write raises `WriteError`: an OSError (errno, strerror, the target as filename) that is also a
`util.cli.UserError`, so every entry point reports it as one line naming the file.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import tempfile
from typing import BinaryIO, Callable

from util.cli import UserError

FAIL_WRITE_ENV = "MEDFOUND_TEST_FAIL_WRITE"


class WriteError(UserError, OSError):
    """A save that failed (disk full, no permission, a folder in the way): `cannot write <path>: <reason>`
    plus what is left (`the previous <name> is intact` or `no partial file was left`). It is an OSError
    (errno, strerror, filename) for callers that handle those, and a UserError for the one-line report."""

    previous: bool | None = None  # True: the target existed and is untouched; False: none existed
    appended: bool = False  # an append to an existing file (its earlier lines are intact)

    def __str__(self) -> str:
        reason = self.strerror or (self.args[0] if self.args else "write failed")
        name = os.path.basename(str(self.filename))
        if self.appended:
            left = f"the lines already in {name} are intact"
        elif self.previous:
            left = f"the previous {name} is intact"
        elif self.previous is False:
            left = "no partial file was left"
        else:
            left = ""
        hint = "; free disk space and run again" if self.errno == errno.ENOSPC else ""
        return f"cannot write {self.filename}: {reason}" + (f"; {left}" if left else "") + hint


def write_error(e: OSError, path: str, previous: bool | None = None, appended: bool = False) -> WriteError:
    """`e` as a WriteError naming `path` (its errno and reason kept)."""
    if isinstance(e, WriteError) and e.filename == path:
        return e
    err = WriteError(e.errno or errno.EIO, e.strerror or str(e) or type(e).__name__, path)
    err.previous, err.appended = previous, appended
    return err


def _fail_write_hook(path: str) -> None:
    pattern = os.environ.get(FAIL_WRITE_ENV)
    if pattern and fnmatch.fnmatch(os.path.basename(path), pattern):
        raise OSError(errno.ENOSPC, "No space left on device")


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object], *, fsync: bool = True,
                 mode: int | None = 0o644, before_replace: Callable[[], None] | None = None,
                 tmp_tag: str = "") -> str:
    """Write `data` (bytes, or a callback that writes into the open binary file) to `path` atomically.

    `fsync` flushes the file and, after the rename, its folder to the disk (pass False for bulk data that
    can be regenerated); `mode` is applied to the temp file (`mkstemp` creates 0600; None keeps that);
    `before_replace` runs after the data is written and before the rename (a caller's own fault
    injection); `tmp_tag` goes into the temp file's name (a caller that sweeps its own temps finds them).
    Returns `path` as a string. Any OSError (also one of `data` or `before_replace`) is raised as a
    WriteError naming `path`, after the temp file is removed; other exceptions propagate as they are."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    previous = os.path.isfile(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.{tmp_tag}", suffix=".tmp")
    except OSError as e:
        raise write_error(e, path, previous) from None
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
    except OSError as e:
        _remove(tmp)
        raise write_error(e, path, previous) from None
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        fsync_dir(directory)
    return path


def _remove(tmp: str) -> None:
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    except OSError:
        pass  # the write error is what the user must see


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` to `path` (log.txt's JSON lines); an OSError becomes a WriteError naming the file
    (a failed append leaves the earlier lines as they were; at worst the last line is cut short)."""
    path = os.fspath(path)
    appended = os.path.isfile(path)
    try:
        _fail_write_hook(path)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise write_error(e, path, previous=None, appended=appended) from None


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
