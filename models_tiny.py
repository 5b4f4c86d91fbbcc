"""Tiny models trained in seconds on synthetic data (util.tiny's images), saved in the checkpoint layouts of
main_pretrain.py and main_finetune.py, so that notebooks, tests and README pictures exercise the real
loaders and CLIs without downloading weights.

- `train_classifier` / `tiny_classifier_checkpoint`: a ViT that detects util.tiny's planted lesion;
  explanations of it should light up the lesion (the sanity test of util.explain).
- `train_mae` / `tiny_mae_checkpoint`: a masked autoencoder for reconstruction figures.

These build registered models, so they live beside the model families rather than in `util` (which
imports no `models_*` module).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import models_mae  # noqa: F401  (registers the MAE factories)
import models_vit  # noqa: F401  (registers the ViT factories)
from util.registry import create_model
from util.tiny import (DEMO_MEAN, DEMO_STD, demo_pretraining_images, fit, planted_lesion_images, save_classifier,
                       save_mae, to_tensor)


def train_classifier(images: np.ndarray, labels: np.ndarray, model_name: str = "vit_micro_patch8",
                     pool: str = "cls", steps: int = 300, batch_size: int = 32, lr: float = 2e-3,
                     seed: int = 0, mean: Sequence[float] = DEMO_MEAN, std: Sequence[float] = DEMO_STD,
                     max_seconds: float | None = None, device: str = "cpu") -> nn.Module:
    """A ViT classifier trained with AdamW + one-cycle schedule on the given images (eval mode on return)."""
    torch.manual_seed(seed)
    num_classes = int(labels.max()) + 1
    model = create_model(model_name, img_size=images.shape[1], num_classes=max(num_classes, 2), pool=pool).to(device)
    x, y = to_tensor(images, mean, std).to(device), torch.as_tensor(labels).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    fit(model, x, lambda xb, idx: F.cross_entropy(model(xb), y[idx]), opt, lr, steps, batch_size, seed, max_seconds,
        "train_classifier")
    return model.eval()


def train_mae(images: np.ndarray, model_name: str = "mae_vit_micro_patch8", steps: int = 200, batch_size: int = 32,
              lr: float = 2e-3, mask_ratio: float = 0.75, norm_pix_loss: bool = False, seed: int = 0,
              mean: Sequence[float] = DEMO_MEAN, std: Sequence[float] = DEMO_STD, max_seconds: float | None = None,
              device: str = "cpu") -> nn.Module:
    """A masked autoencoder trained on the images (random flips), eval mode on return."""
    torch.manual_seed(seed)
    model = create_model(model_name, img_size=images.shape[1], norm_pix_loss=norm_pix_loss).to(device)
    x = to_tensor(images, mean, std).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    fit(model, x, lambda xb, idx: model(xb, mask_ratio=mask_ratio)[0], opt, lr, steps, batch_size, seed, max_seconds,
        "train_mae")
    return model.eval()


def tiny_mae_checkpoint(path: str, size: int = 32, steps: int = 150, seed: int = 0, **kw: Any) -> str:
    """Train `mae_vit_micro_patch8` for a few seconds on demo images and save it (ours layout)."""
    model = train_mae(demo_pretraining_images(128, size, seed), steps=steps, seed=seed, **kw)
    return save_mae(model, path, "mae_vit_micro_patch8")


def tiny_classifier_checkpoint(path: str, size: int = 32, n: int = 384, steps: int = 250, pool: str = "cls",
                               seed: int = 0, background: str | np.ndarray = "noise", **kw: Any) -> str:
    """Train a `vit_micro_patch8` lesion detector for a few seconds and save it (main_finetune layout)."""
    data = planted_lesion_images(n, size, seed, background=background)
    model = train_classifier(data["images"], data["labels"], pool=pool, steps=steps, seed=seed, **kw)
    return save_classifier(model, path, "vit_micro_patch8", ["no_lesion", "lesion"])
