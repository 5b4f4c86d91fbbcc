"""Benchmark one training / inference step: images/s, step time, TFLOP/s, MFU, peak memory, and the
speed-up of the fast configuration over a plain baseline measured in the same run.

    python main_benchmark.py --model mae_vit_base_patch16                     # MAE-B/16 pretrain step
    python main_benchmark.py --model vit_base_patch16 --mode finetune         # ViT-B/16 finetune step
    python main_benchmark.py --model mae_vit_large_patch16 --device cuda --batch_size 128 --compile \\
        --json results/maeL_h100.json                                          # GPU, JSON for comparisons
    python main_benchmark.py --model mae_vit_base_patch16 --data files --data_path DATA --num_workers 8
    python main_benchmark.py --model mae_vit_base_patch16 --data files         # temporary JPEG folder
    python main_benchmark.py --model mae_vit_base_patch16 --data files --pipeline_only   # loader only

What is measured
----------------
For `--mode pretrain` (any MAE-style model: mae_*, dmae_*, crossmae_*, convmae_*), `--mode finetune`
(ViT / ConvViT classifier, cross-entropy) and `--mode inference` (classifier forward, no grad), two
configurations are run one after the other on the same weights (same seed) and the same batch:

  baseline  fp32, eager, explicit-softmax attention (`Attention.keep_attn = True` on every
            models_vit.Attention), AdamW with `fused=False, foreach=False` (a plain per-tensor loop).
  fast      `--amp` (default bf16) autocast, SDPA attention, fused AdamW (util.optim.build_adamw),
            plus `--compile` (torch.compile of the model; if compilation fails the run continues eager
            and says so), `--grad_ckpt` (activation checkpointing) and `--channels_last` (input and
            conv weights in NHWC) when asked.

`--ablation` adds `fast_fp32` (the fast configuration without autocast) to split the speed-up into the
fp32 fast paths and mixed precision; `--skip_baseline` measures the fast configuration alone. TF32 is
off on CUDA, so fp32 means fp32.

A step runs the engines' own forward (`engine_pretrain.pretrain_forward`, `engine_finetune.finetune_forward`)
and util.loop.Optimization (backward, grad norm, non-finite guard, optimizer step), the code path of
training (benchmarks/step.py). Step time is the median over `--steps` timed steps after `--warmup` steps, with a
device synchronisation at the end of each step; images/s = batch / median step time.

Data (`--data`): `synthetic` keeps one batch of random tensors resident on the device (model only);
`files` feeds the steps from util.data.PretrainDataset (as main_pretrain configures it: uint8 batches
normalised on the device, torchvision decode, reduced-scale JPEG decode) through a DataLoader with
`--num_workers`, from `--data_path` (an image folder or a pre-decoded cache) or from a temporary folder
of generated images (util.synthetic.write_dataset). With `files` the data pipeline alone is measured too
(`--pipeline_only`: nothing else): one worker's images/s for a plain PIL + torchvision loader and for our
dataset's variants, and our DataLoader's aggregate rate (benchmarks/pipeline.py).

FLOPs, MFU, memory
------------------
FLOPs of one forward + backward are counted with FlopCounterMode and cross-checked against a closed
form for ViT/MAE (benchmarks/flops.py). MFU divides the achieved FLOP/s by the nominal peak and by the
measured matmul peak; peak memory is CUDA's allocator peak or the CPU peak-RSS growth
(benchmarks/hardware.py).

On a shared CPU (more runnable processes than cores) spinning OpenMP threads lose whole time slices per
op; run with `OMP_WAIT_POLICY=PASSIVE` or `--threads 1` there, and compare only runs of similar load.

`--json OUT.json` writes everything (arguments, device, versions, git commit, FLOP counts, per-config
metrics, ratios, data pipeline) so results compare across commits.
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import shutil
import statistics
import sys
import time
from typing import Any, Sequence

from util.cli import HelpFormatter, UserError, exit_if_help

MODES = ("pretrain", "finetune", "inference")


# ---------------------------------------------------------------------------------------------------- CLI
def get_parser() -> argparse.ArgumentParser:
    examples = """examples:
  python main_benchmark.py                                             # MAE-B/16 pretrain step, synthetic data
  python main_benchmark.py --model vit_base_patch16 --mode finetune
  python main_benchmark.py --model mae_vit_micro_patch8 --input_size 32 --steps 2 --warmup 1   # smoke test
  python main_benchmark.py --model mae_vit_large_patch16 --device cuda --batch_size 128 --compile \\
      --grad_ckpt --json results/maeL.json
  python main_benchmark.py --data files --data_path DATA --num_workers 8        # end-to-end from files
  python main_benchmark.py --data files --gen_size 1024 --pipeline_only        # loader alone, 1k px JPEGs
  python main_benchmark.py --model convmae_convvit_base_patch16 --channels_last
"""
    p = argparse.ArgumentParser(
        "main_benchmark.py", formatter_class=HelpFormatter, epilog=examples,
        description="Images/s, step time, TFLOP/s, MFU and peak memory of a pretraining, finetuning or inference "
                    "step, for a plain baseline (fp32, eager, explicit attention, for-loop AdamW) and the fast "
                    "configuration, measured in the same run. See the module docstring for the FLOP count.")
    g = p.add_argument_group("what to measure")
    g.add_argument("--model", default="mae_vit_base_patch16",
                   help="any registered name (mae_*, dmae_*, crossmae_*, convmae_*, vit_*, convvit_*); the mode's "
                        "counterpart is used when needed (mae_vit_X <-> vit_X)")
    g.add_argument("--mode", default="pretrain", choices=MODES, help="which step is timed")
    g.add_argument("--batch_size", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    g.add_argument("--input_size", type=int, default=224, help="image side in pixels")
    g.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on CPU, 20 on CUDA)")
    g.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 5 on CUDA)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of patches masked (pretrain mode)")
    g.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalised targets (pretrain mode)")
    g.add_argument("--nb_classes", type=int, default=1000, help="classifier head size (finetune / inference)")
    g.add_argument("--drop_path", type=float, default=0.0, help="finetune drop-path rate")
    g.add_argument("--lr", type=float, default=1e-4, help="optimizer learning rate (affects the loss, not the speed)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model weights and synthetic data")
    g = p.add_argument_group("fast configuration")
    g.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "none", "auto"),
                   help="autocast dtype of the fast configuration (auto: bf16 where supported, else fp16)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager on failure)")
    g.add_argument("--compile_mode", default=None, help="torch.compile mode, e.g. max-autotune")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing")
    g.add_argument("--channels_last", action="store_true", help="NHWC input and conv weights (models with convs)")
    g.add_argument("--skip_baseline", action="store_true", help="measure the fast configuration only")
    g.add_argument("--ablation", action="store_true",
                   help="also measure 'fast_fp32' (the fast configuration without autocast) in the same run, to "
                        "split the speed-up into fp32 fast paths (SDPA, fused AdamW, ...) and mixed precision")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", choices=("synthetic", "files"),
                   help="synthetic: device-resident random tensors (model only); files: PretrainDataset + DataLoader")
    g.add_argument("--data_path", default=None,
                   help="image folder for --data files (default: generate a temporary one)")
    g.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default min(8, cores per GPU))")
    g.add_argument("--gen_images", type=int, default=32, help="images to generate when --data_path is not given")
    g.add_argument("--gen_size", type=int, default=512, help="side of generated images")
    g.add_argument("--gen_format", default="jpg", choices=("jpg", "png"), help="file format of generated images")
    g.add_argument("--gen_kind", default="fundus", choices=("fundus", "ultrasound"), help="kind of generated images")
    g.add_argument("--pipeline_images", type=int, default=48,
                   help="images per loader in the data-pipeline measurement (0: skip it)")
    g.add_argument("--pipeline_only", action="store_true", help="with --data files: measure the data pipeline only")
    g.add_argument("--pipeline_cache", type=int, default=512, metavar="MAX_SIDE",
                   help="also measure reading from a pre-decoded cache built (untimed) from the same files with this "
                        "max_side (0: skip)")
    g = p.add_argument_group("peaks and output")
    g.add_argument("--peak_tflops", type=float, default=None,
                   help="nominal peak for MFU (default: the GPU's dense bf16 spec, e.g. 989.4 for H100 SXM, when the "
                        "fast configuration runs bf16/fp16 on CUDA; else the measured matmul peak)")
    g.add_argument("--matmul_size", type=int, default=None,
                   help="n of the n x n x n matmul timed for the measured peak (default 8192 CUDA, 1024 CPU; 0: skip)")
    g.add_argument("--json", default=None, metavar="OUT.json", help="write all results as JSON")
    return p


exit_if_help(get_parser)
# The imports below pull in torch and the models; --help has already exited above without them.
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from benchmarks.flops import flop_report  # noqa: E402
from benchmarks.hardware import (MemoryMeter, add_mfu, device_info, free_memory, git_commit, loadavg,  # noqa: E402
                                 measure_matmul_tflops, peaks_record, sync)
from benchmarks.pipeline import make_dataset, make_loader, measure_pipeline, prepare_files  # noqa: E402
from benchmarks.report import print_pipeline, print_report, write_json  # noqa: E402
from benchmarks.step import (BASELINE, RunConfig, apply_config, build_model, build_optimizer, fast_config,  # noqa: E402
                             has_conv, is_deblur, model_for_mode, optimizer_kind, set_attention, synthetic_batch,
                             to_device, train_step)
from util.runtime import default_workers  # noqa: E402

try:  # optional families: benchmark them when their modules import
    import models_convmae  # noqa: F401
except ImportError:  # pragma: no cover
    models_convmae = None
try:
    import models_crossmae  # noqa: F401
except ImportError:  # pragma: no cover
    models_crossmae = None

SCHEMA = "medfound-benchmark/1"


# --------------------------------------------------------------------------------------------- measuring
def run_config(cfg: RunConfig, name: str, args: argparse.Namespace, device: torch.device,
               flop_per_image: float, data: dict[str, Any] | None) -> dict[str, Any]:
    """Build, warm up and time one configuration (its memory is released by the next MemoryMeter)."""
    mode = args.mode
    meter = MemoryMeter(device)
    torch.manual_seed(args.seed)
    model = build_model(name, mode, args.input_size, args.nb_classes, args.drop_path, args.norm_pix_loss,
                        device=device)
    n_attn = set_attention(model, cfg.sdpa)
    apply_config(model, cfg)
    opt = None if mode == "inference" else build_optimizer(model, mode, cfg.optimizer, cfg.amp, lr=args.lr)
    channels_last = cfg.channels_last and has_conv(model)
    runner: nn.Module = model
    compile_status = "off"
    if cfg.compile:
        try:
            runner = torch.compile(model, mode=args.compile_mode)
            compile_status = "on"
        except Exception as e:  # noqa: BLE001
            compile_status = f"failed: {type(e).__name__}: {e}"
            print(f"[benchmark] torch.compile unavailable ({compile_status}); continuing eager", file=sys.stderr)
    loader_iter = None
    if data is None:
        fixed = to_device(synthetic_batch(model, mode, args.batch_size, args.input_size, args.nb_classes,
                                          seed=args.seed + 1), device, channels_last)
    else:
        if data.get("loader") is None:  # one DataLoader (persistent workers) for every configuration
            ds = make_dataset(data["files"], data["root"], model, mode, args.input_size, args.nb_classes, args.seed)
            data["loader"] = make_loader(ds, args.batch_size, data["workers"], device,
                                         (args.warmup + args.steps) * args.batch_size, args.seed)
        loader_iter = iter(data["loader"])  # same sampler order for every configuration

    def next_batch() -> dict[str, Any]:
        if loader_iter is None:
            return fixed
        return to_device(next(loader_iter), device, channels_last)

    def one_step() -> tuple[torch.Tensor, float, float]:
        t0 = time.perf_counter()
        batch = next_batch()
        t1 = time.perf_counter()
        loss = train_step(runner, opt, mode, batch, cfg.amp, device, args.mask_ratio)
        sync(device)
        return loss, time.perf_counter() - t0, t1 - t0

    losses = []
    t_warm = time.perf_counter()
    for i in range(args.warmup):
        try:
            losses.append(one_step()[0])
        except Exception as e:  # compile failures surface at the first call
            if runner is model or i > 0:
                raise
            compile_status = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"[benchmark] torch.compile failed on this machine ({compile_status}); continuing eager",
                  file=sys.stderr)
            runner = model
            if opt is not None:
                opt.optimizer.zero_grad(set_to_none=True)
            losses.append(one_step()[0])
    warmup_s = time.perf_counter() - t_warm
    times, waits = [], []
    for _ in range(args.steps):
        loss, dt, wait = one_step()
        losses.append(loss)
        times.append(dt)
        waits.append(wait)
    loss_values = [float(x) for x in losses]
    median = statistics.median(times)
    ips = args.batch_size / median
    achieved = flop_per_image * ips / 1e12
    result = {
        "settings": {**cfg.describe(), "compile": compile_status,
                     "attention": "sdpa" if cfg.sdpa else "explicit softmax",
                     "attention_modules": n_attn, "optimizer_impl": optimizer_kind(opt),
                     "channels_last_applied": channels_last},
        "step_time_s_median": median, "step_times_s": times,
        "step_time_s_mean": statistics.fmean(times), "step_time_s_min": min(times),
        "images_per_s": ips, "achieved_tflops": achieved,
        "mfu": None, "mfu_measured": None,  # filled in by add_mfu() once the peaks are final
        "mfu_measured_dtype": {"bf16": "bf16", "fp16": "fp16"}.get(cfg.amp, "fp32"),
        "peak_memory_bytes": meter.peak_bytes(), "peak_memory_kind": meter.kind,
        "warmup_s": warmup_s, "loss_first": loss_values[0] if loss_values else None,
        "loss_last": loss_values[-1] if loss_values else None,
        "losses_finite": all(math.isfinite(v) for v in loss_values),
    }
    if loader_iter is not None:
        result["data_wait_s_median"] = statistics.median(waits)
        result["data_wait_fraction"] = sum(waits) / sum(times)
    return result  # the model, optimizer and batch die with this frame; the next MemoryMeter collects them


def resolve_args(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available; use --device cpu")
    gpu = device.type == "cuda"
    if args.batch_size is None:
        args.batch_size = 64 if gpu else 8
    if args.steps is None:
        args.steps = 20 if gpu else 3
    if args.warmup is None:
        args.warmup = 5 if gpu else 1
    if args.matmul_size is None:
        args.matmul_size = 8192 if gpu else 1024
    if args.num_workers is None:
        args.num_workers = default_workers(device)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise UserError("--batch_size and --steps must be >= 1 and --warmup >= 0")
    if args.pipeline_only and args.data != "files":
        raise UserError("--pipeline_only needs --data files")
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the results dict (also written to --json)."""
    import timm
    import torchvision
    args = get_parser().parse_args(argv)
    device = resolve_args(args)
    name = model_for_mode(args.model, args.mode)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the baseline is true fp32
        torch.backends.cudnn.allow_tf32 = False
    fast = fast_config(args, device)

    res: dict[str, Any] = {
        "schema": SCHEMA, "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv), "git": git_commit(),
        "config": {k: v for k, v in vars(args).items()},
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "torchvision": torchvision.__version__,
                     "python": platform.python_version()},
        "device": device_info(device),
        "loadavg_start": loadavg(),
    }
    files, root, tmp = ([], "", None)
    try:
        if args.data == "files":
            files, root, tmp = prepare_files(args)
            res["data"] = {"root": None if tmp else root, "generated": tmp is not None, "num_files": len(files),
                           "workers": args.num_workers}
        shape_model = build_model(name, args.mode, args.input_size, args.nb_classes, 0.0, args.norm_pix_loss, "meta")
        noise_len = shape_model.num_patches if args.mode == "pretrain" else 0
        res["model"] = {"requested": args.model, "name": name, "mode": args.mode, "class": type(shape_model).__name__,
                        "params_m": sum(p.numel() for p in shape_model.parameters()) / 1e6,
                        "input_size": args.input_size,
                        "mask_ratio": args.mask_ratio if args.mode == "pretrain" else None,
                        "deblur": is_deblur(shape_model)}
        if files and args.pipeline_images > 0:
            res["pipeline"] = measure_pipeline(files, root, args, device, noise_len)
        if args.pipeline_only:
            if "pipeline" in res:
                print_pipeline(res["pipeline"])
            write_json(args.json, res)
            return res
        res["flops"] = flop_report(name, args.mode, args)
        dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
        if fast.amp == "fp16":
            dtypes["fp16"] = torch.float16
        before = {k: measure_matmul_tflops(device, dt, args.matmul_size) for k, dt in dtypes.items()}
        flop = res["flops"]["counted_gflop_per_image"] * 1e9
        data = None if args.data == "synthetic" else {"files": files, "root": root, "workers": args.num_workers}
        configs = ([] if args.skip_baseline else [BASELINE]) + [fast]
        if args.ablation and fast.amp != "none":
            configs.insert(-1, RunConfig("fast_fp32", amp="none", compile=fast.compile, sdpa=True, optimizer="fused",
                                         grad_ckpt=fast.grad_ckpt, channels_last=fast.channels_last))
        res["results"] = {}
        for cfg in configs:
            try:
                res["results"][cfg.name] = run_config(cfg, name, args, device, flop, data)
            except torch.OutOfMemoryError as e:  # e.g. the fp32 baseline at a batch only the fast path fits
                print(f"[benchmark] {cfg.name}: out of memory at batch {args.batch_size} ({str(e).splitlines()[0]})",
                      file=sys.stderr)
                res["results"][cfg.name] = {"settings": cfg.describe(), "error": "out of memory"}
                free_memory(device)
        if data is not None:
            data.pop("loader", None)
        after = {k: measure_matmul_tflops(device, dt, args.matmul_size) for k, dt in dtypes.items()}
        res["peaks"] = peaks_record(args, device, fast, before, after)
        for r in res["results"].values():
            add_mfu(r, res["peaks"])
        ratios: dict[str, Any] = {}
        ok = {k for k, v in res["results"].items() if "error" not in v}
        if {"baseline", "fast"} <= ok:
            b, f = res["results"]["baseline"], res["results"]["fast"]
            ratios["speedup_fast_over_baseline"] = f["images_per_s"] / b["images_per_s"]
            ratios["step_time_baseline_over_fast"] = b["step_time_s_median"] / f["step_time_s_median"]
            ratios["memory_fast_over_baseline"] = (f["peak_memory_bytes"] / b["peak_memory_bytes"]
                                                   if b["peak_memory_bytes"] else None)
            if "fast_fp32" in ok:
                ratios["speedup_fast_fp32_over_baseline"] = (res["results"]["fast_fp32"]["images_per_s"]
                                                             / b["images_per_s"])
            if b["loss_first"] is not None and f["loss_first"] is not None:
                ratios["first_loss_rel_diff"] = abs(f["loss_first"] - b["loss_first"]) / max(abs(b["loss_first"]),
                                                                                             1e-12)
        res["ratios"] = ratios
        res["loadavg_end"] = loadavg()
        print_report(res)
        write_json(args.json, res)
        return res
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"main_benchmark.py: error: {e}", file=sys.stderr)
