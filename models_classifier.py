"""Finetuned classifiers from their checkpoints, with the preprocessing they were trained with.

Every classifier family is imported here (registering its factories: ViT, ConvViT), so a tool that
loads a classifier (explain.py, embed_features.py, notebooks) needs no other model import; `util`
imports no `models_*` module, so this lives beside the families.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

import models_convmae  # noqa: F401  (registers the ConvViT classifiers)
import models_crossmae  # noqa: F401  (its FamilySpec: pretrained CrossMAE encoders load with a fresh norm)
import models_vit  # noqa: F401  (registers the ViT factories)
from util.checkpoint import CheckpointError, extract_state_dict, load_file
from util.data import resolve_norm
from util.explain import checkpoint_config
from util.registry import create_model, resolve


@dataclass
class ClassifierInfo:
    """What a finetuned checkpoint says about its inputs and outputs (main_finetune's `preprocessing`)."""
    model: str
    input_size: int
    mean: list[float]
    std: list[float]
    class_names: list[str]
    task_type: str = "multiclass"
    pool: str = "mae_avg"
    blur: dict | None = None
    extra: dict = field(default_factory=dict)


def load_classifier(path: str, model_name: str | None = None, device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, ClassifierInfo]:
    """A finetuned ViT classifier (main_finetune.py's `{model, preprocessing, args}`) in eval mode, with
    the preprocessing it was trained with, so nobody repeats flags."""
    ckpt = load_file(path)
    sd = extract_state_dict(ckpt, source=path)
    pre = dict(ckpt.get("preprocessing") or {}) if isinstance(ckpt, dict) else {}
    cfg = checkpoint_config(ckpt)
    name = model_name or pre.get("model") or cfg.get("model")
    if not name:
        raise CheckpointError(f"{path}: the checkpoint does not name its model; pass --model (e.g. vit_base_patch16)")
    linprobe = "head.1.weight" in sd
    head_key = "head.1.weight" if linprobe else "head.weight"
    if head_key not in sd:
        raise CheckpointError(f"{path}: no classification head ({head_key}); explanations need a finetuned "
                              f"classifier (main_finetune.py's checkpoint-best.pth), not a pretrained encoder")
    out_dim = int(sd[head_key].shape[0])
    pool = pre.get("pool") or cfg.get("pool") or ("mae_avg" if "fc_norm.weight" in sd else "cls")
    size = pre.get("input_size") or cfg.get("input_size")
    if not size:
        tokens = sd["pos_embed"].shape[1] - 1
        size = int(round(tokens ** 0.5)) * int(sd["patch_embed.proj.weight"].shape[-1])
    model = create_model(resolve(name), img_size=int(size), num_classes=out_dim, pool=pool, drop_path_rate=0.0)
    if linprobe:
        linear = model.head
        model.head = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit --model {name} (pool {pool}, input {size}): {len(missing)} "
                              f"missing keys e.g. {list(missing)[:3]}, {len(unexpected)} unexpected e.g. "
                              f"{list(unexpected)[:3]}")
    if pre.get("mean") and pre.get("std"):
        mean, std = list(pre["mean"]), list(pre["std"])
    else:
        mean, std = resolve_norm(pre.get("norm_preset") or cfg.get("norm_preset") or "imagenet")
    task = pre.get("task_type") or cfg.get("task_type") or ("binary_sigmoid" if out_dim == 1 else "multiclass")
    names = pre.get("class_names") or cfg.get("class_names")
    if not names:
        names = [f"class_{i}" for i in range(max(out_dim, 2))]
    blur = pre.get("blur") if (pre.get("deblur") or pre.get("blur")) else None
    info = ClassifierInfo(model=name, input_size=int(size), mean=mean, std=std, class_names=list(names),
                          task_type=task, pool=pool, blur=blur, extra={"norm_preset": pre.get("norm_preset")})
    return model.to(device).eval(), info
