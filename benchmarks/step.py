"""What main_benchmark.py measures in one step: the configurations (plain baseline vs fast), the model for a
mode, reproducible batches, and the step itself, which runs the engines' own forward functions
(`engine_pretrain.pretrain_forward`, `engine_finetune.finetune_forward`) and util.loop.Optimization for
backward, gradient norm, non-finite guard and the optimizer step, the code path of training."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

import models_mae  # noqa: F401  (registers mae_* / dmae_*)
import models_vit  # noqa: F401  (registers vit_*)
from engine_finetune import finetune_forward
from engine_pretrain import pretrain_forward
from models_vit import Attention
from util import registry
from util.cli import UserError
from util.loop import Optimization, autocast
from util.optim import build_adamw, param_groups_lrd, param_groups_weight_decay


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


def _loss(out: Any) -> torch.Tensor:
    """A forward returns a loss or (loss, scalars); the step differentiates the loss."""
    return out[0] if isinstance(out, tuple) else out


_CROSS_ENTROPY = nn.CrossEntropyLoss()


def compute_loss(model: nn.Module, mode: str, batch: dict[str, torch.Tensor], mask_ratio: float = 0.75
                 ) -> torch.Tensor:
    """The scalar a step differentiates, from the engines' own forwards: MAE loss (pretrain, the batch's
    mask noise) or cross-entropy (finetune); for inference the mean logit (only keeps the output alive).
    The batch is already on its device and normalised (`to_device`)."""
    device = batch["image"].device
    if mode == "pretrain":
        return _loss(pretrain_forward(model, batch, device, mask_ratio, seeded_noise=True))
    if mode == "inference":
        return model(batch["image"]).float().mean()
    return _loss(finetune_forward(model, (batch["image"], batch["label"]), device, "multiclass", _CROSS_ENTROPY))


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
