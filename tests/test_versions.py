"""requirements.txt's lower bounds are the versions CI's lower-bound leg installs (.ci/constraints-min.txt).

If someone raises a bound without updating the pins (or the other way round), CI would quietly test
versions nobody promised; these checks make that a test failure instead.
"""
from __future__ import annotations

import re
import sys
import types
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _lines(path: Path) -> list[str]:
    return [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines() if ln.split("#", 1)[0].strip()]


def _requirements() -> dict[str, Requirement]:
    reqs = [Requirement(ln) for ln in _lines(REPO / "requirements.txt")]
    return {canonicalize_name(r.name): r for r in reqs}


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for ln in _lines(REPO / ".ci" / "constraints-min.txt"):
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][0-9A-Za-z.]*)", ln)
        assert m, f".ci/constraints-min.txt: not a 'name==version' pin: {ln!r}"
        pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def _lower_bound(req: Requirement) -> Version:
    lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(lows) == 1, f"requirements.txt: {req} needs exactly one '>=' lower bound"
    return lows[0]


def _is_lower_bound(low: Version, pin: Version) -> bool:
    """The pin is the bound itself or its first release (timm>=1.0 -> 1.0.3, the first 1.0.x on PyPI)."""
    return pin >= low and pin.release[:len(low.release)] == low.release


def test_every_requirement_has_exactly_one_pin() -> None:
    assert set(_requirements()) == set(_pins())


def test_pins_are_the_lower_bounds() -> None:
    pins = _pins()
    for name, req in _requirements().items():
        low, pin = _lower_bound(req), pins[name]
        assert req.specifier.contains(pin, prereleases=False), f"{name}=={pin} is outside {req}"
        assert _is_lower_bound(low, pin), f"{name}=={pin} is not the lower bound of {req}"


def test_lower_bound_check_rejects_a_newer_pin() -> None:
    assert _is_lower_bound(Version("1.26"), Version("1.26.0"))
    assert _is_lower_bound(Version("1.0"), Version("1.0.3"))
    assert not _is_lower_bound(Version("1.26"), Version("1.27.0"))
    assert not _is_lower_bound(Version("2.11"), Version("2.10.0"))


def test_ci_runs_the_lower_bound_leg() -> None:
    run = (REPO / ".ci" / "run").read_text()
    assert ".ci/constraints-min.txt" in run and "python -m pytest -q" in run


# ------------------------------------------------- checkpoints written under the other NumPy major --

def _checkpoint_naming(tmp_path: Path, module: str) -> Path:
    """A torch checkpoint holding numpy scalars whose pickle names `module`.scalar, whatever NumPy wrote it
    (NumPy 1.x writes numpy.core.multiarray, NumPy 2 numpy._core.multiarray)."""
    import numpy as np
    import torch
    src, dst = tmp_path / "written.pth", tmp_path / f"{module}.pth"
    torch.save({"acc": np.float64(0.75), "epoch": np.int64(3)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):  # protocol-2 GLOBAL opcodes: "module\nname\n", no lengths
                data = re.sub(rb"numpy\._?core\.multiarray\n", module.encode() + b"\n", data)
                assert module.encode() in data
            zout.writestr(info, data)
    return dst


@pytest.mark.parametrize("module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_checkpoints_with_numpy_scalars_load_under_either_numpy(tmp_path: Path, module: str) -> None:
    from util.checkpoint import load_file
    loaded = load_file(str(_checkpoint_naming(tmp_path, module)))
    assert float(loaded["acc"]) == 0.75 and int(loaded["epoch"]) == 3


def test_allow_list_ignores_the_numpy_1_26_core_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    # NumPy 1.26.1-1.26.4 ship a `numpy._core` package without `multiarray`; once anything imports it,
    # `np._core` exists, and the allow-list must still come from numpy.core.
    import numpy as np
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        pytest.skip("NumPy 2 has the real numpy._core")
    monkeypatch.setattr(np, "_core", types.ModuleType("numpy._core"), raising=False)
    from util.checkpoint import _safe_globals
    names = {entry[1] for entry in _safe_globals() if isinstance(entry, tuple)}
    assert {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"} <= names
