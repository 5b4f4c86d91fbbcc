"""util/atomic.py: the one atomic writer (bytes or a callback), its permissions and its full-disk hook."""
from __future__ import annotations

import errno
import os
import stat
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.atomic import FAIL_WRITE_ENV, write_atomic  # noqa: E402


def test_bytes_and_callback_replace_the_file(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    assert write_atomic(target, b"first") == str(target)  # creates the folder
    write_atomic(target, lambda f: f.write(b"second"), fsync=False)
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644  # not mkstemp's 0600
    assert os.listdir(tmp_path / "sub") == ["a.bin"]  # no temp file left


def test_full_disk_hook_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "val_metrics.json"
    target.write_bytes(b"old")
    monkeypatch.setenv(FAIL_WRITE_ENV, "*_metrics.json")
    with pytest.raises(OSError) as e:
        write_atomic(target, b"new")
    assert e.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["val_metrics.json"]
    write_atomic(tmp_path / "other.txt", b"x")  # a name the pattern does not match is written
    assert (tmp_path / "other.txt").read_bytes() == b"x"


def test_a_failing_callback_removes_its_temp_file(tmp_path):
    def boom(f):
        f.write(b"partial")
        raise ValueError("writer failed")
    with pytest.raises(ValueError):
        write_atomic(tmp_path / "x.bin", boom)
    assert os.listdir(tmp_path) == []


def test_metric_reports_go_through_it(tmp_path, monkeypatch):
    """write_metrics uses the shared writer, so the hook reaches it (a full disk is an OSError, no file)."""
    from util.metrics import write_metrics
    monkeypatch.setenv(FAIL_WRITE_ENV, "*.csv")
    with pytest.raises(OSError):
        write_metrics({"auroc": 0.5}, tmp_path, prefix="test")
    assert os.listdir(tmp_path) == ["test_metrics.json"]  # the JSON was written before the CSV failed
