"""One pretraining epoch for masked-image-modelling models (MAE, deblurring MAE).

The loop itself lives in `util.loop`; this file says what a pretraining step computes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from util.data import DeviceNormalize, images_to_device
from util.loop import Optimization, train_epoch
from util.logger import RunLogger


def pretrain_forward(model: nn.Module, batch: dict[str, Any], device: torch.device, mask_ratio: float,
                     seeded_noise: bool = True, normalize: DeviceNormalize | None = None,
                     channels_last: bool = False) -> torch.Tensor:
    """Loss of one batch. With `seeded_noise` the mask comes from the per-sample noise the dataset
    drew from (seed, epoch, index); otherwise the model draws `torch.rand(N, L)` as the reference does.
    uint8 batches (the default transport) are normalised here, on the device."""
    def images(x: torch.Tensor) -> torch.Tensor:
        return images_to_device(x, device, normalize, channels_last)
    imgs = images(batch["image"])
    target = images(batch["target"]) if "target" in batch else None
    noise = batch["noise"].to(device, non_blocking=True) if seeded_noise and "noise" in batch else None
    loss, _, _ = model(imgs, mask_ratio=mask_ratio, noise=noise, target=target)
    return loss


def train_one_epoch(model: nn.Module, loader, opt: Optimization, device: torch.device, epoch: int, args,
                    lr_fn, run_logger: RunLogger | None = None, **loop_kwargs) -> dict[str, float]:
    """`loop_kwargs` (start_step, steps_per_epoch, on_update, loop_state, clock, wd_fn) go to
    util.loop.train_epoch."""
    seeded = getattr(args, "mask_noise", "per_sample") == "per_sample"
    normalize = DeviceNormalize(args.mean, args.std)
    channels_last = bool(getattr(args, "channels_last_applied", False))
    return train_epoch(model, loader, opt, epoch, device,
                       forward=lambda m, b: pretrain_forward(m, b, device, args.mask_ratio, seeded, normalize,
                                                             channels_last),
                       lr_fn=lr_fn, run_logger=run_logger, print_freq=args.print_freq, seed=args.seed, **loop_kwargs)


@torch.no_grad()
def reconstruct(model: nn.Module, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Images for a reconstruction figure, in the model's normalised input space.

    With norm-pix targets the prediction is per-patch standardised; it is mapped back with the target
    patches' own mean and variance, so the picture shows pixels rather than z-scores. `loss` is the
    model's loss on these images and masks.
    """
    from models_mae import patchify
    was_training = model.training
    model.eval()
    ref = imgs if target is None else target
    # Partial-reconstruction models (CrossMAE) decode every masked patch for pictures.
    loss, pred, mask = getattr(model, "reconstruct_all", model)(imgs, mask_ratio=mask_ratio, noise=noise, target=target)
    pred = pred.float()
    if getattr(model, "norm_pix_loss", False):
        t = patchify(ref, model.patch_size).float()
        pred = pred * (t.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
    recon = model.unpatchify(pred)
    m = mask.unsqueeze(-1).expand(-1, -1, model.patch_size ** 2 * model.in_chans)
    m = model.unpatchify(m)
    model.train(was_training)
    return {"input": imgs, "target": ref, "masked": imgs * (1 - m), "recon": recon,
            "pasted": ref * (1 - m) + recon * m, "mask": m, "loss": loss.detach().float()}
