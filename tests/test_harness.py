"""The test harness itself: a hung command or test must end the run quickly and say where it hung,
never hold CI until its time limit."""
from __future__ import annotations

import sys
import time

import pytest

from conftest import REPO, child_env, free_port, run_cmd


def test_a_hung_torchrun_is_stopped_with_its_workers_stacks(tmp_path):
    """torchrun puts its workers in sessions of their own: stopping only torchrun's process group would
    leave them holding the output pipes, and the harness would wait for ever."""
    script = tmp_path / "hang.py"
    script.write_text("import time\nprint('worker up', flush=True)\ntime.sleep(600)\n")
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                 script], timeout=15)
    assert time.monotonic() - start < 60
    message = str(info.value)
    assert "timed out after 15s" in message and "worker up" in message
    assert "hang.py" in message and "line 3" in message, "the workers' stacks are missing:\n" + message[-3000:]


def test_a_test_over_the_hard_limit_ends_the_run(tmp_path):
    (tmp_path / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('harness', {str(REPO / 'tests' / 'conftest.py')!r})\n"
        "import sys\nharness = sys.modules['harness'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(harness)\n"
        "harness.TEST_HARD_LIMIT_S = 2\npytest_runtest_protocol = harness.pytest_runtest_protocol\n")
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_slow():\n    time.sleep(120)\n")
    start = time.monotonic()
    proc = run_cmd([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tmp_path / "test_slow.py"],
                   timeout=90, cwd=tmp_path, env=child_env())
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert time.monotonic() - start < 60
    assert "test_slow.py::test_slow still running after 2 s" in proc.stderr
    assert 'test_slow.py", line 4 in test_slow' in proc.stderr, proc.stderr
