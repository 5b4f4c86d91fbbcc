"""Reading and writing checkpoint FILES safely: `torch.load(weights_only=True)` with an allow-list,
safetensors, crash-safe `atomic_save`, and one-line errors for files that are not what a flag expects.

Published checkpoints that carry an `argparse.Namespace` or numpy scalars load through an explicit
allow-list; anything else is refused, never unpickled (unpickling runs arbitrary code), and the refusal
names the global the file wanted. Training-checkpoint layouts, resume and encoder loading build on this
in util.checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import warnings
from typing import Any, Mapping

import numpy as np
import torch

from util.cli import UserError

logger = logging.getLogger("medfound")

class CheckpointError(UserError):
    pass


def _safe_globals() -> list:
    """Globals that published checkpoints legitimately contain (argparse config, numpy scalars)."""
    allowed: list = [argparse.Namespace]
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        from numpy._core.multiarray import scalar
    else:  # NumPy 1.x; 1.26.1+ also has a `numpy._core` stub without `multiarray`, so never look there
        from numpy.core.multiarray import scalar
    # The allow-list is keyed by the name a pickle uses, so both names map to the installed function:
    # "numpy.core..." reads files written under NumPy 1.x, "numpy._core..." files written under NumPy 2+.
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    allowed += [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    return allowed


def _where(path: str, flag: str | None) -> str:
    return f"{flag} {path}" if flag else path


# Globals every torch checkpoint uses (tensor rebuilding, storages, ordered dicts) and those of the
# allow-list: an error message names the first global outside these, the one the file was refused for.
_EXPECTED_GLOBAL_PREFIXES = ("torch.", "collections.", "_codecs.", "numpy.", "argparse.", "builtins.set",
                             "builtins.frozenset", "builtins.slice", "builtins.bytearray", "builtins.complex")


def _pickle_globals(path: str) -> list[str]:
    """The globals (`module.name`) a pickle or torch zip checkpoint refers to, read with pickletools
    (which parses opcodes and never imports or calls anything)."""
    import pickletools
    import zipfile
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            with open(path, "rb") as f:
                data = f.read(64 << 20)
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
        return found
    except Exception:  # noqa: BLE001 - only a message is at stake; the file is refused either way
        return []


def _refused_global(path: str, error: str) -> str:
    named = re.search(r"GLOBAL ([\w.]+)", error)
    if named:
        return named.group(1)
    odd = [g for g in _pickle_globals(path) if not g.startswith(_EXPECTED_GLOBAL_PREFIXES)]
    return odd[0] if odd else "an unsupported pickle instruction"


def _looks_like_text(path: str) -> str | None:
    """The first characters of a file that is neither a zip (torch >= 1.6) nor a pickle (legacy torch)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head or head.startswith((b"PK", b"\x80")):
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.splitlines()[0][:30] if text.strip() else None


def load_file(path: str, map_location: str | torch.device = "cpu", flag: str | None = None) -> Any:
    """`torch.load(weights_only=True)` with the allow-list (or safetensors); clear one-line errors otherwise,
    naming `flag` (the option that gave `path`) when given."""
    where = _where(path, flag)
    if not os.path.isfile(path):
        raise CheckpointError(f"{where}: checkpoint not found" + ("" if flag else
                              " (check the path given to --resume/--finetune)"))
    if path.endswith(".safetensors"):
        return load_safetensors(path, flag)
    text = _looks_like_text(path)
    if text is not None:
        raise CheckpointError(f"{where}: not a checkpoint (it is a text file starting {text!r}); pass a .pth/.pt "
                              f"file written by torch.save, or a .safetensors file")
    try:
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings():
            # a plain pickle (protocol > 2) makes torch warn before the refusal below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except __import__("pickle").UnpicklingError as e:
        if "Weights only load failed" not in str(e):  # a damaged pickle, not a refused one
            raise CheckpointError(f"{where}: not a readable checkpoint (truncated or corrupt?): "
                                  f"{str(e).splitlines()[0]}") from None
        what = _refused_global(path, str(e))
        raise CheckpointError(f"{where}: refused to load: it needs the global '{what}', which is not allow-listed "
                              f"(loading it could run arbitrary code); re-save its tensors with a trusted tool, "
                              f"e.g. torch.save({{'model': state_dict}}, path)") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/EOFError/KeyError... for damaged files
        first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: not a readable checkpoint (truncated or corrupt?): {first[:200]}") from None


def first_nonfinite(sd: Mapping[str, Any]) -> str | None:
    """The first floating-point tensor of `sd` holding a NaN or an Inf (a diverged run's weights)."""
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def check_finite(sd: Mapping[str, Any], path: str, flag: str | None = None) -> None:
    """One-line CheckpointError naming the first non-finite tensor: training from it would diverge at once
    and the loss guard could only blame the learning rate."""
    bad = first_nonfinite(sd)
    if bad is not None:
        raise CheckpointError(f"{_where(path, flag)}: non-finite weights in {os.path.basename(path)}: {bad} holds "
                              f"NaN/Inf (the run that wrote it diverged); use an earlier checkpoint of that run")


_SAVES = 0


def _save_fault_injection() -> None:
    """Test hooks: MEDFOUND_TEST_KILL_IN_SAVE=n SIGKILLs the process during its n-th checkpoint write,
    after the temp file is written and before the rename (the worst instant); MEDFOUND_TEST_FAIL_IN_SAVE=n
    makes that write fail as a full disk would."""
    global _SAVES
    _SAVES += 1
    if os.environ.get("MEDFOUND_TEST_KILL_IN_SAVE") == str(_SAVES):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("MEDFOUND_TEST_FAIL_IN_SAVE") == str(_SAVES):
        import errno
        raise OSError(errno.ENOSPC, "No space left on device")


def _disk_full(directory: str) -> bool:
    try:
        st = os.statvfs(directory)
        return st.f_bavail * st.f_frsize < (1 << 20)
    except (OSError, AttributeError):
        return False


def atomic_save(obj: Any, path: str, writer: Any = None) -> None:
    """util.atomic.write_atomic with torch.save (or `writer(obj, f)`) as the callback, kept 0600 like
    mkstemp's file: a kill at any instant leaves either the old file or the new one, never half of one.
    A failed write (disk full, I/O error) removes the temp file, keeps the previous file and raises a
    one-line CheckpointError naming the file. torch.save reports a failed write as a RuntimeError
    ("PytorchStreamWriter failed writing file ..."), turned here into the OSError it stands for."""
    import errno
    from util.atomic import write_atomic
    directory = os.path.dirname(os.path.abspath(path))

    def write(f: Any) -> None:
        try:
            (writer or torch.save)(obj, f)
        except RuntimeError as e:
            if "write" not in str(e).lower() and "PytorchStreamWriter" not in str(e):
                raise
            full = _disk_full(directory)
            raise OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else
                          f"write failed ({str(e).splitlines()[0][:120]})") from None
    existed = os.path.isfile(path)
    try:
        write_atomic(path, write, mode=None, before_replace=_save_fault_injection)
    except OSError as e:
        left = "the previous checkpoint is intact" if existed else "no partial file was left"
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}; {left}. Free disk space or choose another "
                              f"--output_dir") from None


def load_safetensors(path: str, flag: str | None = None) -> dict[str, Any]:
    """`{'model': tensors, **config}` from a safetensors file written by export_safetensors (or any other)."""
    import json
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{_where(path, flag)}: not a readable safetensors file "
                              f"({str(e).splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    out: dict[str, Any] = {"model": tensors}
    if "medfound_config" in meta:
        config = json.loads(meta["medfound_config"])
        if "model" in config:  # a config's model *name* must not replace the weights under "model"
            config["model_name"] = config.pop("model")
        out.update(config)
    return out
