"""Model, preprocessing and output helpers shared by main_finetune.py's modes (finetune, linear probe,
--eval, --predict, --knn) and main_few_shot.py: what a finetuning run builds from its flags and a
checkpoint, and how evaluation results are written."""
from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn as nn

# The model families register their factories and their checkpoint declarations (util.family): loading a
# pretrained encoder recognises every family's checkpoints (pretraining-only keys, keys lacked by design).
import models_convmae  # noqa: F401  (ConvMAE / ConvViT; imports models_mae: MAE / DMAE)
import models_crossmae  # noqa: F401  (CrossMAE)
import models_vit  # noqa: F401  (ViT)
from util.checkpoint import load_file
from util.cli import UserError
from util.dist import get_rank, get_world_size, is_main_process
from util.logger import RunLogger
from util.optim import LARS, build_adamw, param_groups_lrd
from util.registry import create_model, is_registered, resolve
from util.runtime import make_loader

logger = logging.getLogger("medfound")


def task_type(args: argparse.Namespace) -> str:
    if args.multilabel:
        return "multilabel"
    return "binary_sigmoid" if args.nb_classes == 1 else "multiclass"


def apply_preprocessing(args: argparse.Namespace, pre: dict[str, Any] | None, source: str, override: bool) -> None:
    """Take input size, normalisation and blur from a checkpoint so nobody repeats pretraining flags.

    `override` (eval/predict) makes the checkpoint win; otherwise explicit flags win.
    """
    from util.data import resolve_norm
    pre = pre or {}
    if pre:
        logger.info("preprocessing from %s: %s", source, {k: pre.get(k) for k in ("input_size", "norm_preset", "blur")})
    if override or args.input_size is None:
        args.input_size = pre.get("input_size") or args.input_size or 224
    if pre.get("mean") and (override or args.norm_preset is None):
        args.mean, args.std = list(pre["mean"]), list(pre["std"])
        args.norm_preset = pre.get("norm_preset", "checkpoint")
    else:
        args.mean, args.std = resolve_norm(args.norm_preset or "imagenet")
        args.norm_preset = args.norm_preset or "imagenet"
    args.blur = pre.get("blur") if (pre.get("deblur") or pre.get("blur")) else None
    data_path = getattr(args, "data_path", None) or ""
    if args.blur and (args.no_blur or os.path.isfile(os.path.join(data_path, "blur_spec.json"))):
        logger.info("input blur from the checkpoint not applied: %s", "--no_blur" if args.no_blur else
                    f"{data_path} is already blurred (blur_spec.json)")
        args.blur = None
    elif args.blur:
        logger.info("deblurring-pretrained encoder: inputs are blurred on the fly like in pretraining (%s); "
                    "pass --no_blur if --data_path already holds blurred images", args.blur)
    for key in ("class_names", "task_type", "pool", "nb_classes", "linprobe", "transform"):
        if override and pre.get(key) is not None:
            setattr(args, key, pre[key])


def preprocessing_record(args: argparse.Namespace) -> dict[str, Any]:
    return {"input_size": args.input_size, "mean": list(args.mean), "std": list(args.std),
            "norm_preset": args.norm_preset, "blur": args.blur, "deblur": bool(args.blur),
            "class_names": list(args.class_names), "task_type": args.task_type, "pool": args.pool,
            "nb_classes": args.nb_classes, "model": args.model, "linprobe": bool(args.linprobe),
            "transform": getattr(args, "transform", "mae")}


# BEiT's model names (SLIP's finetuning command): the plain ViT of that size. SLIP's small is MoCo v3's ViT-S
# (12 heads, as SLIP's *_VITS16 towers); a checkpoint recording its model decides between equal widths.
BEIT_MODELS = {"beit_small_patch16_224": ("vit_small_mocov3_patch16", 384),
               "beit_base_patch16_224": ("vit_base_patch16", 768), "beit_large_patch16_224": ("vit_large_patch16", 1024)}
VIT_WIDTHS = {"vit_micro_patch8": 64, "vit_tiny_patch16": 192, "vit_tiny_patch8": 192, "vit_small_patch16": 384,
              "vit_small_mocov3_patch16": 384, "vit_base_patch16": 768, "vit_large_patch16": 1024}
# MedCLIP's vision encoders (models_medclip.build_medclip_vision kinds): [B, 512] embeddings + a linear head.
MEDCLIP_MODELS = {"medclip_vit": "vit", "medclip_swin": "swin", "medclip_resnet": "resnet"}


def compat_flags(args: argparse.Namespace) -> set[str]:
    """The reference behaviours named by --compat (a comma list)."""
    return {x.strip() for x in str(getattr(args, "compat", "") or "").split(",") if x.strip()}


def apply_beit_flags(args: argparse.Namespace, given: set[str]) -> None:
    """Map BEiT's flag names onto ours (`given`: the flags the user typed); conflicts are one line."""
    if getattr(args, "enable_deepspeed", False):
        logger.info("--enable_deepspeed: DeepSpeed is not used; training runs under DDP/FSDP (same optimisation)")
    if getattr(args, "use_cls", False):
        if args.pool not in (None, "cls") and "pool" in given:
            raise UserError(f"--use_cls asks for cls pooling but --pool is {args.pool}; drop one of them")
        args.pool = "cls"
    if getattr(args, "imagenet_default_mean_and_std", False):
        if args.norm_preset not in (None, "imagenet") and "norm_preset" in given:
            raise UserError(f"--imagenet_default_mean_and_std asks for ImageNet stats but --norm_preset is "
                            f"{args.norm_preset}; drop one of them")
        args.norm_preset = "imagenet"


def recorded_model(ckpt: Any) -> str | None:
    """The model name a checkpoint records: `args.model` (SLIP, ours; a dict or a Namespace) or its
    preprocessing record's; SLIP/CLIP/SimCLR names become their vision tower's ViT."""
    if not isinstance(ckpt, dict):
        return None
    saved = ckpt.get("args")
    name = saved.get("model") if isinstance(saved, dict) else getattr(saved, "model", None)
    name = name or (ckpt.get("preprocessing") or {}).get("model")
    if not isinstance(name, str):
        return None
    import models_slip
    return models_slip.vision_tower_name(name) or name


def resolve_model_name(args: argparse.Namespace, ckpt: Any) -> None:
    """`--model` beit_{small,base,large}_patch16_224, a SLIP/CLIP/SimCLR name or `auto` -> the registered ViT
    that is built (logged): auto and SLIP names take the vision tower the checkpoint or the name records."""
    import models_slip
    name = args.model
    if name in BEIT_MODELS:
        if not (getattr(args, "abs_pos_emb", False) and getattr(args, "disable_rel_pos_bias", False)):
            raise UserError(f"--model {name}: the ViT here has learned absolute position embeddings and no relative "
                            "position bias; pass --abs_pos_emb --disable_rel_pos_bias (as SLIP's finetuning command does)")
        vit, width = BEIT_MODELS[name]
        tower = recorded_model(ckpt)
        if tower in VIT_WIDTHS and VIT_WIDTHS[tower] != width:
            raise UserError(f"--model {name} (width {width}) but --finetune {args.finetune} holds a {tower} (width "
                            f"{VIT_WIDTHS[tower]}); pick the beit_* size of the checkpoint")
        vit = tower if tower in VIT_WIDTHS else vit
        logger.info("--model %s -> %s (plain ViT: learned absolute positions, no relative position bias, %s LayerScale)",
                    name, vit, "no" if not args.layer_scale_init_value else f"{args.layer_scale_init_value:g}")
        args.model = vit
    elif name == "auto" or models_slip.vision_tower_name(name):
        tower = models_slip.vision_tower_name(name) if name != "auto" else recorded_model(ckpt)
        if not tower or not is_registered(tower):
            raise UserError(f"--model auto: {args.finetune or 'no --finetune checkpoint'} records no model name; "
                            "pass --model (e.g. vit_base_patch16)")
        logger.info("--model %s -> %s (the vision tower%s)", name, tower, f" of {args.finetune}" if name == "auto" else "")
        args.model = tower


class EncoderClassifier(nn.Module):
    """An image encoder giving [B, out_dim] embeddings (MedCLIP's vision models) and a linear `head`.

    With `frozen` the encoder runs without gradients and stays in eval mode when the model is put in training
    mode (a frozen backbone's BatchNorm statistics do not drift), unless `encoder_bn_train` (MedSLIP's probe
    left them updating). One layer id for the optimiser's layer-decay groups: every parameter at scale 1."""

    num_decay_layers = 1

    def __init__(self, encoder: nn.Module, num_outputs: int, frozen: bool = True, encoder_bn_train: bool = False):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.out_dim), num_outputs)
        self.frozen, self.encoder_bn_train = frozen, encoder_bn_train

    def layer_id(self, name: str, num_layers: int) -> int:
        return num_layers

    def train(self, mode: bool = True) -> "EncoderClassifier":
        super().train(mode)
        if self.frozen and not self.encoder_bn_train:
            self.encoder.eval()
        return self

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def build_medclip_classifier(args: argparse.Namespace, out_dim: int) -> nn.Module:
    """MedCLIP's vision model of `--model medclip_*`, with the weights of --finetune (image_encoder.pth,
    MedCLIP pytorch_model.bin, MedSLIP checkpoint.pt), and a linear head."""
    try:
        import models_medclip
    except ImportError as e:
        raise UserError(f"--model {args.model}: MedCLIP's vision models are not available ({e})") from None
    kind = MEDCLIP_MODELS[args.model]
    size = {"img_size": int(args.input_size)} if kind != "resnet" else {}  # Swin's patch grid is built for one size
    encoder = models_medclip.build_medclip_vision(kind, weights=args.finetune or None, flag="--finetune", **size)
    frozen = bool(args.freeze_encoder or args.linprobe)
    return EncoderClassifier(encoder, out_dim, frozen=frozen, encoder_bn_train="medslip_cbis" in compat_flags(args))


def build_classifier(args: argparse.Namespace) -> nn.Module:
    out_dim = 1 if args.task_type == "binary_sigmoid" else args.nb_classes
    if args.model in MEDCLIP_MODELS:
        return build_medclip_classifier(args, out_dim)
    if not is_registered(args.model):
        create_model(args.model)
    if args.pool is None:
        args.pool = "mae_avg" if args.global_pool else "cls"
    if args.pool == "retfound_v2_avg":
        logger.warning("--pool retfound_v2_avg applies fc_norm twice (RETFound v2/v3 under timm 0.9): meant for those "
                       "checkpoints only")
    extra = {"init_values": args.layer_scale_init_value} if getattr(args, "layer_scale_init_value", 0) else {}
    try:
        model = create_model(resolve(args.model), img_size=args.input_size, num_classes=out_dim,
                             drop_path_rate=0.0 if args.linprobe else args.drop_path, pool=args.pool, **extra)
    except (TypeError, ValueError) as e:
        raise UserError(f"--model {args.model}: {e}") from None
    if args.linprobe:
        # MAE linear probe head: BatchNorm1d(affine=False, eps 1e-6) + Linear, keys head.0.* / head.1.*
        linear = model.head
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        model.head = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)
    return model


def load_encoder_weights(model: nn.Module, args: argparse.Namespace, pretrained: Any) -> dict[str, Any] | None:
    """Load --finetune (already read: `pretrained`) into the classifier's encoder; returns the loader's report.
    MedCLIP encoders were loaded when built. LayerScale weights (--layer_scale_init_value) are new parameters
    that start at their init value, as BEiT starts them: the checkpoint loads into a twin without them."""
    from util.checkpoint import load_pretrained_encoder
    if not args.finetune or args.model in MEDCLIP_MODELS:
        return None
    kw = dict(checkpoint_key=args.checkpoint_key, ckpt=pretrained, flag="--finetune", key_prefix=args.model_prefix)
    if not getattr(args, "layer_scale_init_value", 0):
        return load_pretrained_encoder(model, args.finetune, **kw)
    plain = create_model(resolve(args.model), img_size=args.input_size, num_classes=model.head.out_features
                         if isinstance(model.head, nn.Linear) else model.head[1].out_features, pool=args.pool)
    report = load_pretrained_encoder(plain, args.finetune, **kw)
    weights = {k: v for k, v in plain.state_dict().items() if not k.startswith("head")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    left = [k for k in missing if not k.startswith("head") and ".gamma_" not in k]
    if left or unexpected:
        raise UserError(f"--layer_scale_init_value: the encoder does not match --model {args.model} "
                        f"({len(left)} missing, {len(unexpected)} unexpected keys)")
    logger.info("LayerScale gamma_1/gamma_2 start at %g in every block (not in the checkpoint)",
                args.layer_scale_init_value)
    return report


def resize_flip_transform(is_train: bool, input_size: int, mean: Any, std: Any, flip_p: float = 0.3) -> Any:
    """MedSLIP's CBIS transform: Resize((s, s)) (aspect not kept), then for training RandomVerticalFlip and
    RandomHorizontalFlip with `flip_p`; ToTensor, Normalize."""
    from torchvision import transforms
    steps = [transforms.Resize((int(input_size), int(input_size)))]
    if is_train:
        steps += [transforms.RandomVerticalFlip(flip_p), transforms.RandomHorizontalFlip(flip_p)]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(list(mean), list(std))])


def split_transform(is_train: bool, args: argparse.Namespace) -> Any:
    """The transform of a training or evaluation split under --transform (mae or resize_flip)."""
    from util.finetune_transforms import transform_from_args
    if getattr(args, "transform", "mae") == "resize_flip":
        return resize_flip_transform(is_train, args.input_size, args.mean, args.std)
    return transform_from_args(is_train, args)


def add_cbis_report(metrics: dict[str, Any], out: dict[str, np.ndarray], args: argparse.Namespace) -> None:
    """What MedSLIP's CBIS tables report besides the macro metrics: precision and recall of MALIGNANT (class 0)
    from the confusion matrix (`malignant_pr`) and bootstrap CIs of every class's precision and recall."""
    from util.metrics import malignant_pr
    if args.task_type != "multiclass" or "confusion_matrix" not in metrics:
        return
    metrics["malignant_pr"] = malignant_pr(metrics["confusion_matrix"], 0)
    if args.bootstrap > 0 and len(out["targets"]) > 1:
        from engine_slip import per_class_pr_ci
        from util.metrics import bootstrap_ci
        y, probs = np.asarray(out["targets"]), np.asarray(out["probs"])
        ci = metrics.setdefault("ci95", {})
        ci.update({k: list(v) for k, v in bootstrap_ci(y, probs, ("precision", "recall"), n_boot=args.bootstrap,
                                                         seed=args.seed, num_classes=probs.shape[1]).items()})
        ci.update(per_class_pr_ci(y, probs, n_boot=args.bootstrap, seed=args.seed))


def restart_lr(optimizer: torch.optim.Optimizer, epoch: float, args: argparse.Namespace, steps_per_epoch: int,
               period: int = 5) -> float:
    """MedSLIP's CBIS schedule: CosineAnnealingWarmRestarts(T_0=period, eta_min 0) stepped after every batch,
    so batch k runs at lr * (1 + cos(pi * (k mod period) / period)) / 2."""
    step = int(round(epoch * steps_per_epoch))
    lr = args.lr * 0.5 * (1.0 + math.cos(math.pi * (step % period) / period))
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def trainable_parameters(model: nn.Module, args: argparse.Namespace) -> None:
    """Linear probe / frozen encoder: only the head (and fc_norm, which would otherwise stay at its init,
    MAE issue #186) trains."""
    if not (args.linprobe or args.freeze_encoder):
        return
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("head", "fc_norm"))


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    if args.linprobe:
        return LARS([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    groups = param_groups_lrd(model, args.weight_decay, args.layer_decay)
    return build_adamw(groups, lr=args.lr, betas=(0.9, 0.999))


def build_criterion(args: argparse.Namespace, train_set) -> tuple[nn.Module | None, Any]:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    weight = None
    if args.class_weights and args.task_type == "multiclass":
        from util.samplers import class_weights
        weight = class_weights(train_set.samples, args.nb_classes)
        logger.info("class weights: %s", [round(float(w), 3) for w in weight])
    mixup_active = args.task_type == "multiclass" and (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax)
    if mixup_active:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=args.nb_classes)
        return SoftTargetCrossEntropy(), mixup
    smoothing = 0.0 if args.linprobe else args.smoothing
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing), None


def eval_loader(dataset, args, device):
    from util.samplers import SequentialShardSampler
    sampler = SequentialShardSampler(dataset, num_replicas=get_world_size(), rank=get_rank())
    return make_loader(dataset, sampler, args, device, args.batch_size, drop_last=False)


def write_eval_outputs(metrics: dict[str, Any], out: dict[str, np.ndarray], args: argparse.Namespace, prefix: str,
                       run_logger: RunLogger | None, step: int = 0, checkpoint: str | None = None) -> None:
    """JSON + CSV of metrics, ROC and confusion-matrix PNGs (titled with the split and `checkpoint`),
    TensorBoard scalars (rank 0)."""
    if not is_main_process():
        return
    from util.metrics import log_to_tensorboard, plot_confusion_matrix, plot_roc, write_metrics
    write_metrics(metrics, args.output_dir, prefix=prefix)
    if len(out["targets"]):
        names = list(args.class_names)
        multilabel = args.task_type == "multilabel"
        nc = 2 if args.task_type == "binary_sigmoid" else out["probs"].shape[1]
        split = prefix.removeprefix("eval_")
        # The same resamples as the metrics' bootstrap, so the plotted CI equals the one in the JSON.
        plot_roc(out["targets"], out["probs"], os.path.join(args.output_dir, f"roc_{prefix}.png"), class_names=names,
                 num_classes=nc, positive_class=args.positive_class, multilabel=multilabel, split=split,
                 checkpoint=checkpoint, n_boot=args.bootstrap, seed=args.seed)
        if not multilabel:
            plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]),
                                  os.path.join(args.output_dir, f"confusion_{prefix}.png"), class_names=names,
                                  split=split, checkpoint=checkpoint)
    if run_logger is not None:
        log_to_tensorboard(run_logger.writer, metrics, step, prefix=prefix)


def summarise(metrics: dict[str, Any], ci: bool = False) -> str:
    """One line of the main metrics; with `ci`, each one's bootstrap 95% CI where computed."""
    keys = ("auroc", "auprc", "accuracy", "balanced_accuracy", "f1", "kappa", "loss")
    intervals = metrics.get("ci95") or {} if ci else {}

    def one(k: str) -> str:
        low_high = intervals.get(k)
        band = f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high and None not in low_high else ""
        return f"{k} {metrics[k]:.4f}{band}"
    return "  ".join(one(k) for k in keys if isinstance(metrics.get(k), (int, float)))


def _blur_spec(args: argparse.Namespace):
    if not args.blur:
        return None
    from util.blur import BlurSpec
    return BlurSpec.from_dict(args.blur)


def load_splits(args: argparse.Namespace) -> dict[str, Any]:
    from util.datasets import available_splits, build_dataset
    splits = available_splits(args.data_path, bool(getattr(args, "few_shot", None)))
    out = {split: build_dataset(split, args) for split in ("train", "val", "test") if split in splits}
    if "train" not in out and not args.eval:
        raise UserError(f"--data_path {args.data_path}: no training split found (expected train/<class>/ folders "
                        f"or a training_labels.txt file)")
    return out


def model_from_checkpoint(args: argparse.Namespace, pre: dict[str, Any], source: str, given: set[str]) -> None:
    """Evaluation and prediction build the model the checkpoint was trained as; `--model` (in `given`,
    the flags the user typed) may only repeat it: finetuned checkpoints record model, pooling and classes."""
    saved = pre.get("model")
    if not saved:
        return
    if "model" in given and resolve(args.model) != resolve(saved):
        raise UserError(f"--model {args.model} does not match {source}, which holds a finetuned {saved}; drop "
                        f"--model (the checkpoint names its model)")
    args.model = saved


def load_finetuned(args: argparse.Namespace, flag: str, given: set[str]) -> dict[str, Any]:
    """Checkpoint of `--resume` for --eval/--predict: model name, classes, pooling and preprocessing."""
    if not args.resume:
        raise UserError(f"{flag} needs --resume <finetuned checkpoint> (e.g. output_dir/checkpoint-best.pth)")
    ckpt = load_file(args.resume, flag="--resume")
    if not isinstance(ckpt, dict):
        raise UserError(f"--resume {args.resume}: holds a {type(ckpt).__name__}, not a finetuned checkpoint")
    pre = ckpt.get("preprocessing") or {}
    if not pre.get("class_names"):
        raise UserError(f"{args.resume}: no class names stored; {flag} needs a checkpoint written by main_finetune.py "
                        f"(checkpoint-best.pth or checkpoint-last.pth)")
    apply_preprocessing(args, pre, args.resume, override=True)
    model_from_checkpoint(args, pre, args.resume, given)
    return ckpt


