"""The benchmark's printed report and its JSON file."""
from __future__ import annotations

import json
from typing import Any

from util.atomic import write_atomic


def _fmt(v: Any, spec: str = ".3g", none: str = "-") -> str:
    if v is None:
        return none
    return format(v, spec)


def _mem(b: int | None) -> str:
    if b is None:
        return "-"
    return f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.0f} MiB"


def print_report(res: dict[str, Any]) -> None:
    m, fl, pk, dev = res["model"], res["flops"], res["peaks"], res["device"]
    print(f"\nmedfound benchmark: {m['name']} ({m['params_m']:.1f}M params), mode {m['mode']}, batch "
          f"{res['config']['batch_size']}, {res['config']['input_size']} px, data {res['config']['data']}, "
          f"{res['config']['steps']} timed steps after {res['config']['warmup']} warm-up")
    print(f"device: {dev['name']}; torch {res['versions']['torch']}, timm {res['versions']['timm']}; load average "
          f"{res.get('loadavg_start')} -> {res.get('loadavg_end')}")
    what = "forward" if m["mode"] == "inference" else "forward+backward"
    line = f"FLOPs per image ({what}): counted {fl['counted_gflop_per_image']:.2f} GFLOP (FlopCounterMode)"
    if fl["closed_form_gflop_per_image"] is not None:
        line += (f"; closed form {fl['closed_form_gflop_per_image']:.2f} "
                 f"(counted/closed {fl['counted_over_closed_form']:.3f})")
    else:
        line += "; closed form: n/a for this family"
    if fl["reference_gflop_per_image"] is not None:
        line += (f"; cited {fl['reference_gflop_per_image']} ({fl['reference_source']}; "
                 f"counted/cited {fl['counted_over_reference']:.3f})")
    print(line)
    meas = ", ".join(f"{k} {_fmt(v, '.3g')}" for k, v in pk["measured_tflops"].items())
    print(f"peak TFLOP/s: nominal {_fmt(pk['nominal_tflops'], '.4g')} ({pk['nominal_source']}); measured matmul "
          f"{pk['matmul_size']}^3: {meas}")
    header = (f"{'config':<10} {'amp':<5} {'compile':<8} {'attention':<9} {'optimizer':<15} {'ckpt':<4} {'NHWC':<4} "
              f"{'step ms':>9} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>7} {'MFU(meas)':>9} {'peak mem':>10}")
    print(header)
    print("-" * len(header))
    for name, r in res["results"].items():
        s = r["settings"]
        if "error" in r:
            print(f"{name:<10} {r['error']}")
            continue
        comp = "on" if s["compile"] == "on" else ("FAILED" if s["compile"].startswith("failed") else "off")
        print(f"{name:<10} {('fp32' if s['amp'] == 'none' else s['amp']):<5} {comp:<8} "
              f"{('sdpa' if s['sdpa'] else 'explicit'):<9} {s['optimizer_impl']:<15} "
              f"{('yes' if s['grad_ckpt'] else 'no'):<4} {('yes' if s['channels_last_applied'] else 'no'):<4} "
              f"{r['step_time_s_median'] * 1e3:>9.1f} {r['images_per_s']:>9.2f} {r['achieved_tflops']:>8.3g} "
              f"{_fmt(r['mfu'] and 100 * r['mfu'], '.2f'):>6}% "
              f"{_fmt(r['mfu_measured'] and 100 * r['mfu_measured'], '.1f'):>7}%"
              f"({r['mfu_measured_dtype']}) {_mem(r['peak_memory_bytes']):>10}")
    kinds = {r["peak_memory_kind"] for r in res["results"].values() if "peak_memory_kind" in r}
    print(f"peak memory: {'; '.join(sorted(kinds))}")
    for name, r in res["results"].items():
        if "data_wait_fraction" in r:
            print(f"{name}: waiting for data {100 * r['data_wait_fraction']:.1f}% of step time")
        if str(r["settings"]["compile"]).startswith("failed"):
            print(f"{name}: torch.compile {r['settings']['compile']}")
    ra = res["ratios"]
    if ra.get("speedup_fast_fp32_over_baseline") is not None:
        print(f"speed-up fast_fp32/baseline: {ra['speedup_fast_fp32_over_baseline']:.2f}x images/s (fp32 fast paths "
              f"without autocast)")
    if ra.get("speedup_fast_over_baseline") is not None:
        print(f"speed-up fast/baseline: {ra['speedup_fast_over_baseline']:.2f}x images/s; peak memory "
              f"fast/baseline {_fmt(ra.get('memory_fast_over_baseline'), '.2f')}x; first-step loss "
              f"baseline {res['results']['baseline']['loss_first']:.5g} vs fast "
              f"{res['results']['fast']['loss_first']:.5g}")
    if res.get("pipeline"):
        print()
        print_pipeline(res["pipeline"])


def print_pipeline(p: dict[str, Any]) -> None:
    print(f"data pipeline, images/s per worker ({p['note']}); {p['num_files']} {p['source_format']} files "
          f"of {p['source_image_size'][0]}x{p['source_image_size'][1]} -> {p['output_size']} px:")
    for k, v in p["images_per_s_per_worker"].items():
        print(f"  {k:<34} {v:8.1f}")
    for k, v in p.get("over_pil_baseline", {}).items():
        print(f"  {k} / PIL baseline: {v:.2f}x")
    if p.get("cache_build"):
        print(f"  cache build (1 process, not counted above): {p['cache_build']['images_per_s']:.1f} images/s")
    if p.get("dataloader"):
        d = p["dataloader"]
        print(f"  our DataLoader, {d['workers']} workers: {_fmt(d['images_per_s'], '.1f')} images/s "
              f"({_fmt(d['images_per_s_per_worker'], '.1f')} per worker)")


def write_json(path: str | None, res: dict[str, Any]) -> None:
    """All results as one JSON file, written atomically (a comparison script never reads half of one)."""
    if not path:
        return
    write_atomic(path, json.dumps(res, indent=1, default=str).encode("utf-8"))
    print(f"results written to {path}")
