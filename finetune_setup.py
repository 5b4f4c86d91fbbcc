"""Model, preprocessing and output helpers shared by main_finetune.py's modes (finetune, linear probe,
--eval, --predict, --knn) and main_few_shot.py: what a finetuning run builds from its flags and a
checkpoint, and how evaluation results are written."""
from __future__ import annotations

import argparse
import logging
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
    for key in ("class_names", "task_type", "pool", "nb_classes", "linprobe"):
        if override and pre.get(key) is not None:
            setattr(args, key, pre[key])


def preprocessing_record(args: argparse.Namespace) -> dict[str, Any]:
    return {"input_size": args.input_size, "mean": list(args.mean), "std": list(args.std),
            "norm_preset": args.norm_preset, "blur": args.blur, "deblur": bool(args.blur),
            "class_names": list(args.class_names), "task_type": args.task_type, "pool": args.pool,
            "nb_classes": args.nb_classes, "model": args.model, "linprobe": bool(args.linprobe)}


def build_classifier(args: argparse.Namespace) -> nn.Module:
    if not is_registered(args.model):
        create_model(args.model)
    if args.pool is None:
        args.pool = "mae_avg" if args.global_pool else "cls"
    if args.pool == "retfound_v2_avg":
        logger.warning("--pool retfound_v2_avg applies fc_norm twice (RETFound v2/v3 under timm 0.9): meant for those "
                       "checkpoints only")
    out_dim = 1 if args.task_type == "binary_sigmoid" else args.nb_classes
    try:
        model = create_model(resolve(args.model), img_size=args.input_size, num_classes=out_dim,
                             drop_path_rate=0.0 if args.linprobe else args.drop_path, pool=args.pool)
    except (TypeError, ValueError) as e:
        raise UserError(f"--model {args.model}: {e}") from None
    if args.linprobe:
        # MAE linear probe head: BatchNorm1d(affine=False, eps 1e-6) + Linear, keys head.0.* / head.1.*
        linear = model.head
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        model.head = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)
    return model


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


