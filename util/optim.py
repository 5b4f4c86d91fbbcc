"""The one place that builds parameter groups and optimizers: weight-decay split, layer-wise lr decay, AdamW and LARS.

Group construction order and membership follow the references exactly, because optimizer state is
keyed by position: resuming from a reference optimizer state only works if the groups line up, group for group.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn


def param_groups_weight_decay(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> list[dict]:
    """MAE pretraining rule (timm 0.3.2 `add_weight_decay`): two groups, [no-decay, decay].

    No decay for 1-D tensors and biases; frozen tensors (sin-cos tables) are left out. Note that
    `cls_token` and `mask_token` (3-D) *do* get weight decay, as in the reference.
    """
    skip = set(skip)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def vit_layer_id(name: str, num_layers: int) -> int:
    """MAE's layer ids: embeddings -> 0, blocks.k -> k+1, everything after the blocks -> num_layers."""
    if name in ("cls_token", "pos_embed", "mask_token", "dist_token") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75,
                     num_layers: int | None = None, no_weight_decay: Iterable[str] | None = None,
                     layer_id_fn: Callable[[str, int], int] | None = None) -> list[dict]:
    """Layer-wise lr decay groups named `layer_{id}_{decay|no_decay}`, in first-seen order.

    lr_scale = layer_decay ** (num_layers - id) with num_layers = depth + 1 (MAE `param_groups_lrd`).
    A model family with other layer ids (e.g. ConvViT) provides `layer_id(name, num_layers)` and
    `num_decay_layers`.
    """
    if layer_id_fn is None:
        layer_id_fn = getattr(model, "layer_id", vit_layer_id)
    if num_layers is None:
        num_layers = getattr(model, "num_decay_layers", None) or len(model.blocks) + 1
    if no_weight_decay is None:
        no_weight_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    no_weight_decay = set(no_weight_decay)
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in no_weight_decay
        layer = layer_id_fn(name, num_layers)
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"name": key, "lr_scale": scales[layer], "weight_decay": 0.0 if no_decay else weight_decay,
                           "params": [], "param_names": []}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def build_adamw(param_groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the given groups; the fused kernel (CUDA and CPU) is the default: it is the fastest
    and it skips a non-finite step on the device (`found_inf`) without a host sync.

    `param_names` entries are kept in the groups only for logging; torch ignores unknown keys but
    saves them in the state dict, so they are stripped to keep checkpoints reference-compatible.
    """
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in param_groups]
    params = [p for g in groups for p in g["params"]]
    supported = bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    use_fused = supported if fused is None else (fused and supported)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=use_fused or None)


class LARS(torch.optim.Optimizer):
    """LARS as in MAE's linear probe: layer-wise trust ratio for >1-D tensors, then SGD momentum.

    For ndim > 1: dp += wd * p; q = trust * |p| / |dp| (1 when either norm is 0); dp *= q;
    mu = m * mu + dp; p -= lr * mu.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, d_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0, torch.where(d_norm > 0, g["trust_coefficient"] * p_norm / d_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
