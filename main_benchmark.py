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

Both go through util.loop.Optimization (backward, grad norm, non-finite guard, optimizer step), the same
code path as training. Step time is the median over `--steps` timed steps after `--warmup` steps, with a
device synchronisation at the end of each step; images/s = batch / median step time.

Data (`--data`): `synthetic` keeps one batch of random tensors resident on the device (model only);
`files` feeds the steps from util.data.PretrainDataset (as main_pretrain configures it: uint8 batches
normalised on the device, torchvision decode, reduced-scale JPEG decode) through a DataLoader with
`--num_workers`, from `--data_path` (an image folder or a pre-decoded cache) or from a temporary folder
of generated images (util.synthetic.write_dataset). With `files`, the data pipeline alone is measured
too: images/s of one worker (one process, one thread, as in a DataLoader worker) for a plain
PIL + torchvision loader (`Image.open().convert('RGB')`, RandomResizedCrop, flip, ToTensor, Normalize)
and our dataset with Pillow or torchvision full decodes, in its default configuration and from a cache
of the timed images (`--pipeline_cache`), and the aggregate rate of our DataLoader.

FLOP count
----------
`torch.utils.flop_counter.FlopCounterMode` counts the FLOPs of matrix multiplications, convolutions and
attention (as explicit matmuls; SDPA is swapped for an equivalent math implementation while counting so
every backend is counted the same way) in one forward + backward of the actual model (built on the meta
device, so counting costs nothing and does not depend on the machine; on the real CPU if that fails).
Elementwise ops, normalisation, softmax, GELU, the loss and the optimizer are ignored, as is usual for
MFU (they are a few per cent). One multiply-add = 2 FLOP. For `inference` only the forward is counted.

Cross-check, closed form for ViT/MAE (printed next to the count): per token per transformer layer the
forward costs 24*D^2 + 4*L*D FLOP (qkv 6D^2, proj 2D^2, MLP 16D^2 for hidden 4D, attention 4*L*D with L
tokens in the sequence; for another MLP width 8*D^2 + 4*D*H + 4*L*D), plus the patch embedding
(2*N*C*p^2*D over all N patches), for MAE the decoder embedding, the decoder layers on N+1 tokens and the
prediction head, for a classifier the head; training = 3x forward. MAE's encoder sees
1 + int(N*(1 - mask_ratio)) tokens. The count is slightly below 3x forward because the patch embedding
needs no input gradient. For the reference sizes at 224 px the published analytic counts are
58.7 GFLOP per image (MAE-B/16 training), 105.4 (ViT-B/16 finetuning) and 124.5 (MAE-L/16); the
benchmark prints its count next to them.

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

On a shared CPU (more runnable processes than cores) spinning OpenMP threads lose whole time slices per
op; run with `OMP_WAIT_POLICY=PASSIVE` or `--threads 1` there, and compare only runs of similar load.

`--json OUT.json` writes everything (arguments, device, versions, git commit, FLOP counts, per-config
metrics, ratios, data pipeline) so results compare across commits.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

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
import torch.nn.functional as F  # noqa: E402

import models_mae  # noqa: E402,F401  (registers mae_* / dmae_*)
import models_vit  # noqa: E402,F401  (registers vit_*)
from models_vit import Attention  # noqa: E402
from util import registry  # noqa: E402
from util.loop import Optimization, autocast  # noqa: E402
from util.optim import build_adamw, param_groups_lrd, param_groups_weight_decay  # noqa: E402
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

# Published analytic costs (GFLOP per image): 224 px, patch 16, mask 0.75,
# MAE decoder 8 x 512; matmul FLOPs only; training = 3 x forward; inference = forward (2 x GMACs).
REFERENCE_GFLOP: dict[tuple[str, str], tuple[float, str]] = {
    ("mae_vit_base_patch16", "pretrain"): (58.7, "published: MAE ViT-B/16 training"),
    ("mae_vit_large_patch16", "pretrain"): (124.5, "published: MAE ViT-L/16 training"),
    ("vit_base_patch16", "finetune"): (105.4, "published: ViT-B/16 finetuning"),
    ("vit_large_patch16", "finetune"): (369.3, "published: ViT-L/16 finetuning"),
    ("vit_base_patch16", "inference"): (35.12, "published: ViT-B/16 forward, 17.56 GMACs"),
    ("vit_large_patch16", "inference"): (123.1, "published: ViT-L/16 forward, 61.55 GMACs"),
}

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


# ---------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class RunConfig:
    """One measured configuration. `optimizer`: 'fused' (build_adamw), 'foreach', or 'for-loop'."""
    name: str
    amp: str = "none"
    compile: bool = False
    sdpa: bool = True
    optimizer: str = "fused"
    grad_ckpt: bool = False
    channels_last: bool = False

    def describe(self) -> dict[str, Any]:
        return asdict(self)


BASELINE = RunConfig("baseline", amp="none", compile=False, sdpa=False, optimizer="for-loop")


def fast_config(args: argparse.Namespace, device: torch.device) -> RunConfig:
    amp = args.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp none on CPU")
    return RunConfig("fast", amp=amp, compile=args.compile, sdpa=True, optimizer="fused",
                     grad_ckpt=args.grad_ckpt, channels_last=args.channels_last)


# ------------------------------------------------------------------------------------------------ models
def _canonical(name: str) -> str:
    """Registered factory name behind an alias (`*_dec512d8b`, `RETFound_mae`) or deprecated name."""
    name = registry.resolve(name)
    fn = registry._FACTORIES.get(name)  # noqa: SLF001  (read-only look-up of the factory's own name)
    return getattr(fn, "__name__", name) if fn is not None else name


def model_for_mode(name: str, mode: str) -> str:
    """The registered model a mode needs: a pretraining model for `pretrain`, a classifier otherwise.

    mae_/dmae_/crossmae_/dcrossmae_vit_X -> vit_X and (d)convmae_convvit_X -> convvit_X for finetune /
    inference; vit_X -> mae_vit_X and convvit_X -> convmae_convvit_X for pretrain. Unknown names fail with
    the registry's suggestions."""
    if not registry.is_registered(name):
        registry.create_model(name)  # raises UnknownModelError with close matches
    canon = _canonical(name)
    pretrain_prefixes = ("mae_", "dmae_", "crossmae_", "dcrossmae_", "convmae_", "dconvmae_")
    is_pretrain = canon.startswith(pretrain_prefixes)
    if mode == "pretrain" and not is_pretrain:
        cand = ("convmae_" + canon) if canon.startswith("convvit_") else ("mae_" + canon)
    elif mode != "pretrain" and is_pretrain:
        stem = canon.split("_", 1)[1]  # vit_base_patch16 / convvit_base_patch16
        cand = stem
    else:
        return canon
    if not registry.is_registered(cand):
        raise UserError(f"--model {name} has no {mode} counterpart ({cand} is not registered)")
    return cand


def is_deblur(model: nn.Module) -> bool:
    return bool(getattr(model, "deblur", False))


def build_model(name: str, mode: str, input_size: int, nb_classes: int = 1000, drop_path: float = 0.0,
                norm_pix_loss: bool = False, device: torch.device | str = "cpu") -> nn.Module:
    """The model `name` (already resolved for `mode`), constructed directly on `device` ('meta' for FLOPs)."""
    kw: dict[str, Any] = {"img_size": input_size}
    if mode == "pretrain":
        kw["norm_pix_loss"] = norm_pix_loss
    else:
        kw.update(num_classes=nb_classes, drop_path_rate=drop_path, global_pool=True)
    with torch.device(device):
        model = registry.create_model(name, **kw)
    return model.train(mode != "inference")


def set_attention(model: nn.Module, sdpa: bool) -> int:
    """SDPA (default) or the explicit-softmax path on every models_vit.Attention; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            m.keep_attn = not sdpa
            m.attn_probs = None
            n += 1
    return n


def apply_config(model: nn.Module, cfg: RunConfig) -> nn.Module:
    set_attention(model, cfg.sdpa)
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(cfg.grad_ckpt)
    if cfg.channels_last and has_conv(model):
        model.to(memory_format=torch.channels_last)
    return model


def has_conv(model: nn.Module) -> bool:
    """Any convolution, the ViT patch embedding included: the benchmark measures NHWC wherever it
    applies (training applies it only to models with conv stages, util.runtime.has_conv_layers)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def build_optimizer(model: nn.Module, mode: str, impl: str, amp: str, lr: float = 1e-4,
                    weight_decay: float = 0.05) -> Optimization:
    """AdamW with the training entry points' parameter groups, wrapped in util.loop.Optimization.

    impl 'fused' = util.optim.build_adamw (fused where supported); 'foreach' / 'for-loop' = torch's
    multi-tensor / single-tensor implementations (fused=False)."""
    if mode == "pretrain":
        groups, betas = param_groups_weight_decay(model, weight_decay), (0.9, 0.95)
    else:
        groups, betas = param_groups_lrd(model, weight_decay, 0.75), (0.9, 0.999)
    if impl == "fused":
        optimizer = build_adamw(groups, lr=lr, betas=betas)
    elif impl in ("foreach", "for-loop"):
        groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=False, foreach=impl == "foreach")
    else:
        raise ValueError(f"unknown optimizer implementation {impl!r}")
    return Optimization(optimizer, amp, accum_iter=1, clip_grad=None, max_nonfinite=10 ** 9)


def optimizer_kind(opt: Optimization | None) -> str:
    if opt is None:
        return "-"
    d = opt.optimizer.defaults
    return "adamw fused" if d.get("fused") else ("adamw foreach" if d.get("foreach") else "adamw for-loop")


# ------------------------------------------------------------------------------------------- batches/steps
def synthetic_batch(model: nn.Module, mode: str, batch_size: int, input_size: int, nb_classes: int = 1000,
                    seed: int = 0, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A reproducible batch (CPU generator, then moved): images, MAE mask noise, deblurring target, labels."""
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randn(batch_size, 3, input_size, input_size, generator=g)}
    if mode == "pretrain":
        batch["noise"] = torch.rand(batch_size, model.num_patches, generator=g)
        if is_deblur(model):
            batch["target"] = torch.randn(batch_size, 3, input_size, input_size, generator=g)
    else:
        batch["label"] = torch.randint(0, max(nb_classes, 1), (batch_size,), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


_NORMALIZE = None


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    """Batch to the device; uint8 images (the training transport) are normalised there, as in training."""
    global _NORMALIZE
    from util.data import DeviceNormalize, images_to_device, resolve_norm
    if _NORMALIZE is None:
        _NORMALIZE = DeviceNormalize(*resolve_norm("imagenet"))
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = images_to_device(v, device, _NORMALIZE, channels_last) if v.ndim == 4 else v.to(device, non_blocking=True)
        out[k] = v
    return out


def compute_loss(model: nn.Module, mode: str, batch: dict[str, torch.Tensor], mask_ratio: float = 0.75
                 ) -> torch.Tensor:
    """The scalar a step differentiates: MAE loss (pretrain) or cross-entropy (finetune); for inference the
    mean logit (only used to keep the output alive)."""
    if mode == "pretrain":
        return model(batch["image"], mask_ratio=mask_ratio, noise=batch.get("noise"), target=batch.get("target"))[0]
    logits = model(batch["image"])
    if mode == "inference":
        return logits.float().mean()
    return F.cross_entropy(logits.float(), batch["label"])


def train_step(model: nn.Module, opt: Optimization | None, mode: str, batch: dict[str, torch.Tensor], amp: str,
               device: torch.device, mask_ratio: float = 0.75) -> torch.Tensor:
    """One step without host syncs: forward (autocast), backward + update through util.loop.Optimization;
    for inference a no-grad forward. Returns the detached loss."""
    if mode == "inference":
        with torch.inference_mode(), autocast(amp, device):
            return compute_loss(model, mode, batch, mask_ratio).detach()
    with autocast(amp, device):
        loss = compute_loss(model, mode, batch, mask_ratio)
    opt.step(loss, model, 0)
    return loss.detach()


# -------------------------------------------------------------------------------------------------- FLOPs
@contextlib.contextmanager
def math_sdpa():
    """Route F.scaled_dot_product_attention through explicit matmuls so FlopCounterMode counts attention
    whatever backend (CPU flash, meta) SDPA would dispatch to."""
    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or is_causal or kw:
            return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        s = q.shape[-1] ** -0.5 if scale is None else scale
        attn = (q @ k.transpose(-2, -1) * s).softmax(dim=-1)
        if dropout_p:
            attn = F.dropout(attn, dropout_p)
        return attn @ v

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


def count_flops(name: str, mode: str, input_size: int, mask_ratio: float = 0.75, nb_classes: int = 1000,
                norm_pix_loss: bool = False, batch_size: int = 2) -> dict[str, Any]:
    """FLOPs per image of one forward (+ backward unless inference), counted with FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    err = None
    for device in ("meta", "cpu"):
        try:
            torch.manual_seed(0)
            model = build_model(name, mode, input_size, nb_classes, 0.0, norm_pix_loss, device=device)
            set_attention(model, sdpa=True)
            batch = synthetic_batch(model, mode, batch_size, input_size, nb_classes, device=device)
            counter = FlopCounterMode(display=False)
            with counter, math_sdpa():
                if mode == "inference":
                    with torch.no_grad():
                        compute_loss(model, mode, batch, mask_ratio)
                else:
                    compute_loss(model, mode, batch, mask_ratio).backward()
            by_op = {str(k): v / batch_size for k, v in counter.get_flop_counts().get("Global", {}).items()}
            return {"flop_per_image": counter.get_total_flops() / batch_size, "by_op": by_op,
                    "counted_on": device, "counted_batch": batch_size}
        except Exception as e:  # meta construction unsupported by some module: count on the CPU
            err = e
    raise RuntimeError(f"FLOP counting failed: {err}")


def closed_form_flops(model: nn.Module, mode: str, mask_ratio: float = 0.75) -> dict[str, Any] | None:
    """Closed-form FLOPs per image for plain ViT classifiers and MAE (None for other families)."""
    from models_mae import MaskedAutoencoderViT
    from models_vit import Block, VisionTransformer

    def layers(blocks, tokens: int) -> float:
        total = 0.0
        for blk in blocks:
            if not isinstance(blk, Block):
                raise TypeError
            d = blk.attn.qkv.in_features
            h = blk.mlp.fc1.out_features
            total += tokens * (8 * d * d + 4 * d * h + 4 * tokens * d)
        return total

    try:
        if isinstance(model, MaskedAutoencoderViT) and type(model).__name__ == "MaskedAutoencoderViT":
            n, p, c, d = model.patch_embed.num_patches, model.patch_size, model.in_chans, model.embed_dim
            dd = model.decoder_embed.out_features
            le = 1 + int(n * (1 - mask_ratio))
            enc_blocks = layers(model.blocks, le)
            dec_blocks = layers(model.decoder_blocks, n + 1)
            other = 2 * n * c * p * p * d + 2 * le * d * dd + 2 * (n + 1) * dd * model.decoder_pred.out_features
            parts = {"encoder_blocks": enc_blocks, "decoder_blocks": dec_blocks, "embeddings_and_heads": other}
        elif isinstance(model, VisionTransformer) and not hasattr(model, "decoder_blocks"):
            n, p, c, d = model.patch_embed.num_patches, model.patch_size, model.in_chans, model.embed_dim
            head = 2 * d * model.head.out_features if isinstance(model.head, nn.Linear) else 0
            parts = {"blocks": layers(model.blocks, n + 1), "embeddings_and_heads": 2 * n * c * p * p * d + head}
        else:
            return None
    except TypeError:
        return None
    forward = sum(parts.values())
    factor = 1 if mode == "inference" else 3
    return {"forward_flop_per_image": forward, "flop_per_image": factor * forward,
            "blocks_only_flop_per_image": factor * sum(v for k, v in parts.items() if k != "embeddings_and_heads"),
            "parts_forward": parts, "factor": factor}


def flop_report(name: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    counted = count_flops(name, mode, args.input_size, args.mask_ratio, args.nb_classes, args.norm_pix_loss)
    shape_model = build_model(name, mode, args.input_size, args.nb_classes, 0.0, args.norm_pix_loss, "meta")
    closed = closed_form_flops(shape_model, mode, args.mask_ratio)
    key = (name[1:] if name.startswith("dmae_") else name, mode)
    ref = REFERENCE_GFLOP.get(key) if args.input_size == 224 and (mode != "pretrain" or args.mask_ratio == 0.75) \
        else None
    c = counted["flop_per_image"]
    out = {
        "method": "FlopCounterMode on one forward" + ("" if mode == "inference" else "+backward")
                  + " (matmul/conv/attention matmuls; elementwise ops ignored); 1 MAC = 2 FLOP",
        "counted_gflop_per_image": c / 1e9,
        "counted_by_op_gflop": {k: v / 1e9 for k, v in counted["by_op"].items()},
        "counted_on": counted["counted_on"],
        "closed_form_gflop_per_image": closed["flop_per_image"] / 1e9 if closed else None,
        "closed_form_blocks_only_gflop_per_image": closed["blocks_only_flop_per_image"] / 1e9 if closed else None,
        "closed_form_note": ("per token per layer 24*D^2 + 4*L*D forward (8D^2+4DH+4LD), + embeddings/heads, "
                             f"x{closed['factor']}" if closed else "no closed form for this model family"),
        "counted_over_closed_form": (c / closed["flop_per_image"]) if closed else None,
        "reference_gflop_per_image": ref[0] if ref else None,
        "reference_source": ref[1] if ref else None,
        "counted_over_reference": (c / 1e9 / ref[0]) if ref else None,
    }
    return out


# -------------------------------------------------------------------------------------- device and peaks
def _sync(device: torch.device) -> None:
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
        _sync(device)
        times = []
        start = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < 200):
            t0 = time.perf_counter()
            a @ b
            _sync(device)
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


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: on a shared machine, runs compare only at similar load."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git_commit() -> dict[str, Any]:
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


def _free_memory(device: torch.device) -> None:
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
        _free_memory(device)
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


# ---------------------------------------------------------------------------------------------------- data
class CycleSampler(torch.utils.data.Sampler):
    """`total` indices: seeded permutations of range(n), concatenated; the same order on every iter()."""

    def __init__(self, n: int, total: int, seed: int = 0) -> None:
        self.n, self.total, self.seed = n, total, seed

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        done = 0
        while done < self.total:
            for i in torch.randperm(self.n, generator=g).tolist()[: self.total - done]:
                yield i
            done = min(self.total, done + self.n)

    def __len__(self) -> int:
        return self.total


class _LabelledPretrain(torch.utils.data.Dataset):
    """PretrainDataset samples with a label (index % classes) for finetune / inference measurements."""

    def __init__(self, ds, nb_classes: int) -> None:
        self.ds, self.nb_classes = ds, max(nb_classes, 1)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        s = self.ds[i]
        s["label"] = s["index"] % self.nb_classes
        return s


def prepare_files(args: argparse.Namespace) -> tuple[list[str], str, str | None]:
    """(files, root, temporary folder to delete or None) for `--data files`."""
    from util.data import list_images
    if args.data_path:
        if not os.path.isdir(args.data_path):
            raise UserError(f"--data_path {args.data_path!r} is not a folder")
        root = os.path.join(args.data_path, "train") if os.path.isdir(os.path.join(args.data_path, "train")) \
            else args.data_path
        files = list_images(root)
        if not files:
            raise UserError(f"--data_path {root}: no images found")
        return files, root, None
    from util.synthetic import write_dataset
    tmp = tempfile.mkdtemp(prefix="medfound_bench_")
    per_class = max(1, math.ceil(args.gen_images / 2))
    write_dataset(tmp, kind=args.gen_kind, layout="flat", num_classes=2, n_per_class=None,
                  splits={"train": per_class}, size=args.gen_size, seed=0, image_format=args.gen_format)
    files = list_images(tmp)
    return files, tmp, tmp


def make_dataset(files: Sequence[str], root: str, model: nn.Module | None, mode: str, input_size: int,
                 nb_classes: int, seed: int = 0):
    from util.blur import BlurSpec
    from util.data import PretrainDataset, PretrainTransform, resolve_norm
    mean, std = resolve_norm("imagenet")
    deblur = model is not None and mode == "pretrain" and is_deblur(model)
    # As main_pretrain: uint8 transport (normalised on the device by to_device), reduced-scale JPEG decode.
    ds = PretrainDataset(files, PretrainTransform(input_size, mean, std, output="uint8"), seed=seed,
                         num_patches=model.num_patches if (model is not None and mode == "pretrain") else 0,
                         blur=BlurSpec() if deblur else None, deblur=deblur, root=root, jpeg_draft=True,
                         decoder="auto")
    return ds if mode == "pretrain" else _LabelledPretrain(ds, nb_classes)


def make_loader(ds, batch_size: int, workers: int, device: torch.device, total: int, seed: int = 0):
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=CycleSampler(len(ds), total, seed), num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)


def pil_baseline_loader(input_size: int):
    """The plain reference pipeline: PIL open+convert, torchvision RandomResizedCrop/flip/ToTensor/Normalize."""
    from PIL import Image
    from torchvision import transforms
    from util.data import resolve_norm
    mean, std = resolve_norm("imagenet")
    t = transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(mean, std)])

    def load(path: str) -> torch.Tensor:
        return t(Image.open(path).convert("RGB"))
    return load


DEFAULT_PIPELINE = "medfound, default (--decoder auto --jpeg_draft)"


def measure_pipeline(files: Sequence[str], root: str, args: argparse.Namespace, device: torch.device,
                     model_noise: int) -> dict[str, Any]:
    """Images/s of one worker (one process, one torch thread) for the PIL baseline and our dataset in its
    variants (Pillow or torchvision full decode; the default: torchvision decode, or a reduced-scale Pillow
    decode when the crop allows it; a pre-decoded cache built here from the same files), rounds interleaved; then the aggregate rate of our DataLoader with --num_workers.
    When --data_path is itself a cache, only reading from it is measured."""
    from util.data import PretrainDataset, PretrainTransform, resolve_norm
    mean, std = resolve_norm("imagenet")

    def ours(paths: Sequence[str], draft: bool, base: str, decoder: str = "auto") -> PretrainDataset:
        return PretrainDataset(paths, PretrainTransform(args.input_size, mean, std, output="uint8"), seed=args.seed,
                               num_patches=model_noise, root=base, jpeg_draft=draft, decoder=decoder)
    from util.data import load_image
    from util.image_cache import list_cached, lookup
    from util.image_cache_builder import build_image_cache
    n_img = max(1, args.pipeline_images)
    from_cache = lookup(files[0]) is not None  # --data_path is a pre-decoded cache: no files to decode
    draft_ds = ours(files, True, root)
    loaders: dict[str, Any] = {}
    if from_cache:
        loaders["medfound, from the given cache"] = lambda i: draft_ds[(0, i)]["image"]
    else:
        pil_ds, tv_ds = ours(files, False, root, "pil"), ours(files, False, root, "torchvision")
        pil = pil_baseline_loader(args.input_size)
        loaders.update({"PIL + torchvision baseline": lambda i: pil(files[i]),
                        "medfound, Pillow full decode": lambda i: pil_ds[(0, i)]["image"],
                        "medfound, torchvision full decode": lambda i: tv_ds[(0, i)]["image"],
                        DEFAULT_PIPELINE: lambda i: draft_ds[(0, i)]["image"]})
    cache_dir, cache_build_s = None, 0.0
    try:
        if args.pipeline_cache and not from_cache:  # cache only the images timed, not the whole dataset
            cache_dir = tempfile.mkdtemp(prefix="medfound_bench_cache_")
            timed = list(files[:n_img])
            t0 = time.perf_counter()
            build_image_cache(root, os.path.join(cache_dir, "c"), max_side=args.pipeline_cache, files=timed, workers=1)
            cache_build_s = time.perf_counter() - t0
            cache_ds = ours(list_cached(os.path.join(cache_dir, "c")) or [], False, os.path.join(cache_dir, "c"))
            loaders[f"medfound, cache (max_side {args.pipeline_cache})"] = \
                lambda i: cache_ds[(0, i % len(cache_ds))]["image"]
        return _time_pipeline(loaders, files, draft_ds, n_img, args, device, from_cache,
                              {"seconds": cache_build_s, "images_per_s": min(n_img, len(files)) / cache_build_s,
                               "max_side": args.pipeline_cache} if cache_dir else None,
                              load_image(files[0]).size)
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
            from util.image_cache import clear_lookup_cache
            clear_lookup_cache()  # forget the deleted cache (and unmap its file)


def _time_pipeline(loaders: dict[str, Any], files: Sequence[str], draft_ds, n_img: int, args: argparse.Namespace,
                   device: torch.device, from_cache: bool, cache_build: dict[str, Any] | None,
                   size: tuple[int, int]) -> dict[str, Any]:
    rounds = 3 if n_img >= 6 else 1
    per_round = max(1, n_img // rounds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    try:
        for fn in loaders.values():  # warm caches, imports
            fn(0)
        cursor = 0
        for _ in range(rounds):
            for k, fn in loaders.items():
                t0 = time.perf_counter()
                for j in range(per_round):
                    fn((cursor + j) % len(files))
                rates[k].append(per_round / (time.perf_counter() - t0))
            cursor += per_round
    finally:
        torch.set_num_threads(threads)
    per_worker = {k: statistics.median(v) for k, v in rates.items()}
    base = per_worker.get("PIL + torchvision baseline")
    out: dict[str, Any] = {
        "images_per_s_per_worker": per_worker,
        "over_pil_baseline": {k: v / base for k, v in per_worker.items() if k != "PIL + torchvision baseline"}
        if base else {},
        "ours_over_pil_baseline": per_worker[DEFAULT_PIPELINE] / base if base else None,
        "source_is_cache": from_cache,
        "images_timed_per_loader": per_round * rounds, "rounds": rounds,
        "source_image_size": list(size), "source_format": os.path.splitext(files[0])[1].lstrip(".").lower(),
        "num_files": len(files), "output_size": args.input_size,
        "note": "one process, one torch thread (a DataLoader worker); rounds interleaved, median rate",
    }
    if cache_build is not None:
        out["cache_build"] = cache_build
    workers = args.num_workers
    if workers and workers > 0:
        total = max(args.batch_size * 6, n_img)
        loader = make_loader(draft_ds, args.batch_size, workers, device, total, args.seed)
        it = iter(loader)
        next(it)  # worker start-up
        t0 = time.perf_counter()
        n = 0
        for b in it:
            n += b["image"].shape[0]
        dt = time.perf_counter() - t0
        out["dataloader"] = {"workers": workers, "batch_size": args.batch_size,
                             "images_per_s": n / dt if n else None,
                             "images_per_s_per_worker": n / dt / workers if n else None}
        del it, loader
    return out


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
        _sync(device)
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


# ---------------------------------------------------------------------------------------------- printing
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
        "argv": list(sys.argv[1:] if argv is None else argv), "git": _git_commit(),
        "config": {k: v for k, v in vars(args).items()},
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "torchvision": torchvision.__version__,
                     "python": platform.python_version()},
        "device": device_info(device),
        "loadavg_start": _loadavg(),
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
            _write_json(args.json, res)
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
                _free_memory(device)
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
        res["loadavg_end"] = _loadavg()
        print_report(res)
        _write_json(args.json, res)
        return res
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


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


def _write_json(path: str | None, res: dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(tmp, path)
    print(f"results written to {path}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"main_benchmark.py: error: {e}", file=sys.stderr)
        sys.exit(2)
