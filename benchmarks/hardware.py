"""The machine side of a benchmark: device description, matmul and spec peaks, MFU, peak memory.

MFU = achieved FLOP/s / peak. Two peaks are reported: the nominal one (`--peak_tflops`; default the
dense bf16/fp16 spec of a known GPU, e.g. 989.4 TFLOP/s for H100 SXM / H200, when the fast configuration
runs in bf16/fp16 on CUDA; otherwise the measured peak) and the measured matmul peak of the same device
in the same run (a large square bf16 and fp32 matmul, `--matmul_size`, timed before and after the
configurations; the fastest repetition counts). `mfu` divides by the nominal peak
(the same for both configurations), `mfu_measured` by the measured peak of the configuration's own
compute dtype (fp32 for the baseline).

Peak memory: CUDA `torch.cuda.max_memory_allocated` (weights + optimizer state + activations); CPU the
growth of the process's peak resident set (getrusage ru_maxrss, after resetting the high-water mark
through /proc/self/clear_refs where Linux allows) over the RSS at the start of the configuration. The
JSON says which (`peak_memory_kind`).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import platform
import resource
import subprocess
import time
from typing import Any

import torch

from benchmarks.step import RunConfig


# Dense tensor-core spec peaks (bf16 = fp16), TFLOP/s, by device-name substring (first match wins).
SPEC_PEAKS: tuple[tuple[str, float, str], ...] = (
    ("H100 PCIe", 756.0, "H100 PCIe bf16 dense"),
    ("H100", 989.4, "H100 SXM bf16 dense"),
    ("H200", 989.4, "H200 bf16 dense"),
    ("GH200", 989.4, "GH200 bf16 dense"),
    ("A100", 312.0, "A100 bf16 dense"),
    ("L40S", 362.1, "L40S bf16 dense"),
    ("A40", 149.7, "A40 bf16 dense"),
    ("V100", 125.0, "V100 fp16 dense"),
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, min_time: float | None = None
                          ) -> float | None:
    """Best achieved TFLOP/s of an n x n x n matmul (fastest of repeated timings, at least 3, for `min_time` s):
    a peak, so the fastest repetition counts (a shared CPU slows some repetitions down)."""
    if n <= 0:
        return None
    if min_time is None:
        min_time = 0.25 if n >= 1024 else 0.02
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        sync(device)
        times = []
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < 200):
            t0 = time.perf_counter()
            a @ b
            sync(device)
            times.append(time.perf_counter() - t0)
        return 2 * n ** 3 / min(times) / 1e12
    except Exception:  # dtype unsupported on this device
        return None


def spec_peak(device: torch.device, amp: str) -> tuple[float | None, str]:
    if device.type != "cuda" or amp not in ("bf16", "fp16"):
        return None, ""
    name = torch.cuda.get_device_name(device)
    for key, value, label in SPEC_PEAKS:
        if key in name:
            return value, label
    return None, ""


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "torch_threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "cpu": _cpu_name()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                    bf16_supported=torch.cuda.is_bf16_supported())
    else:
        info["name"] = f"CPU: {info['cpu']} ({torch.get_num_threads()} threads)"
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages: on a shared machine, runs compare only at similar load."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> dict[str, Any]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": sha or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


# ------------------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so RSS deltas mean something


class MemoryMeter:
    """Peak memory of one configuration: CUDA max_memory_allocated, or CPU peak-RSS growth."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.kind = "cuda max_memory_allocated"
            return
        self.reset = False
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS high-water mark (Linux)
            self.reset = True
        self.start_rss = _rss_bytes()
        self.start_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.kind = ("cpu max RSS delta (getrusage ru_maxrss after clear_refs reset, minus RSS at start)"
                     if self.reset else "cpu max RSS delta (getrusage ru_maxrss, monotone: 0 = below an earlier peak)")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, now - (self.start_rss if self.reset else self.start_max))


def peaks_record(args: argparse.Namespace, device: torch.device, fast: RunConfig, before: dict[str, float | None],
                 after: dict[str, float | None]) -> dict[str, Any]:
    """Nominal and measured peaks; the matmul is timed before and after the configurations and the better
    of the two counts (a shared machine can be busy during one of them)."""
    measured = {k: max((v for v in (before[k], after.get(k)) if v), default=None) for k in before}
    spec, spec_label = spec_peak(device, fast.amp)
    fast_dtype = {"none": "fp32"}.get(fast.amp, fast.amp)
    if args.peak_tflops:
        nominal, source = args.peak_tflops, "--peak_tflops"
    elif spec:
        nominal, source = spec, f"spec: {spec_label}"
    else:
        nominal, source = measured.get(fast_dtype), f"measured {fast_dtype} matmul (no spec peak known)"
    return {"nominal_tflops": nominal, "nominal_source": source, "spec_tflops": spec, "spec_source": spec_label or None,
            "measured_tflops": measured, "measured_tflops_before": before, "measured_tflops_after": after,
            "matmul_size": args.matmul_size}


def add_mfu(result: dict[str, Any], peaks: dict[str, Any]) -> None:
    """mfu = achieved / nominal peak; mfu_measured = achieved / measured matmul peak of the config's dtype."""
    if "achieved_tflops" not in result:
        return
    nominal = peaks.get("nominal_tflops")
    measured = peaks["measured_tflops"].get(result["mfu_measured_dtype"])
    result["mfu"] = result["achieved_tflops"] / nominal if nominal else None
    result["mfu_measured"] = result["achieved_tflops"] / measured if measured else None
