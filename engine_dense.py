"""What one step of a dense decoder computes (segmentation, landmark heatmaps), and prediction on a full split.

Batches:
- segmentation: `(images [B,3,H,W] normalised, masks long [B,H,W], index long [B])`;
- landmarks: `(images, heatmaps float [B,K,H,W], points float [B,K,2] (x, y) in input pixels, NaN = absent,
  index)`.
`images` may also be a pair `(images, feature_maps)` when the encoder's features were computed beforehand;
the model is then called as `model(images, features=feature_maps)`.

`make_seg_forward` / `make_landmark_forward` return `forward(model, batch) -> (loss, scalars)` for
`util.loop.train_epoch`; scalars stay on the device (no host sync per step). Prediction collects the whole
split in sample order so that metrics are computed once on the full set.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from models_seg import SEG_LOSSES, heatmap_softmax_ce, seg_predict_mask
from util.landmarks import decode_heatmaps
from util.loop import autocast


def _inputs(x: Any, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    if isinstance(x, (tuple, list)):
        images, feats = x
        return (images.to(device, non_blocking=True),
                [f.to(device, non_blocking=True) for f in feats])
    return x.to(device, non_blocking=True), None


def _run(model: nn.Module, images: torch.Tensor, feats: list[torch.Tensor] | None) -> torch.Tensor:
    return model(images) if feats is None else model(images, features=feats)


def foreground_dice(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard Dice of the foreground classes pooled over the batch (class 1 for a binary mask, the mean over
    classes 1..C-1 present in prediction or truth otherwise); 1 when no foreground exists anywhere. A 0-dim
    device tensor."""
    classes = [1] if num_classes == 1 else list(range(1, num_classes))
    scores, valid = [], []
    for c in classes:
        p, t = pred == c, true == c
        denom = (p.sum() + t.sum()).float()
        scores.append(2.0 * (p & t).sum().float() / denom.clamp_min(1.0))
        valid.append((denom > 0).float())
    s, v = torch.stack(scores), torch.stack(valid)
    return torch.where(v.sum() > 0, (s * v).sum() / v.sum().clamp_min(1.0), torch.ones_like(v.sum()))


def make_seg_forward(num_classes: int, loss: str = "dice_focal", device: torch.device | str = "cpu"
                     ) -> Callable[[nn.Module, Sequence[Any]], tuple[torch.Tensor, dict]]:
    """Segmentation step: `loss` ('dice_focal' | 'dice_ce') on the logits; scalar `dice` = the batch's hard
    foreground Dice."""
    if loss not in SEG_LOSSES:
        raise ValueError(f"unknown segmentation loss {loss!r}; choose one of {', '.join(SEG_LOSSES)}")
    loss_fn, device = SEG_LOSSES[loss], torch.device(device)

    def seg_forward(model: nn.Module, batch: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        images, feats = _inputs(batch[0], device)
        masks = batch[1].to(device, non_blocking=True).long()
        logits = _run(model, images, feats)
        value = loss_fn(logits, masks, num_classes)
        with torch.no_grad():
            dice = foreground_dice(seg_predict_mask(logits.detach(), num_classes), masks, num_classes)
        return value, {"dice": dice.detach()}
    return seg_forward


def radial_errors(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Euclidean distance per point [B,K]; NaN where the true point is absent (NaN)."""
    return torch.linalg.vector_norm(pred.float() - true.float(), dim=-1)


def make_landmark_forward(device: torch.device | str = "cpu"
                          ) -> Callable[[nn.Module, Sequence[Any]], tuple[torch.Tensor, dict]]:
    """Landmark step: heatmap_softmax_ce between the logits and the target heatmaps; scalar `mre_px` = the
    batch's mean radial error (pixels) of the argmax points over the present landmarks."""
    device = torch.device(device)

    def landmark_forward(model: nn.Module, batch: Sequence[Any]) -> tuple[torch.Tensor, dict]:
        images, feats = _inputs(batch[0], device)
        heat = batch[1].to(device, non_blocking=True).float()
        points = batch[2].to(device, non_blocking=True).float()
        logits = _run(model, images, feats)
        value = heatmap_softmax_ce(logits, heat)
        with torch.no_grad():
            err = radial_errors(decode_heatmaps(logits.detach()), points)
            ok = torch.isfinite(err)
            mre = torch.where(ok, err, torch.zeros_like(err)).sum() / ok.sum().clamp_min(1)
        return value, {"mre_px": mre.detach()}
    return landmark_forward


def _in_order(idx: list[torch.Tensor], *parts: list[torch.Tensor]) -> list[np.ndarray]:
    index = torch.cat(idx)
    order = index.argsort()
    return [torch.cat(p)[order].numpy() for p in parts] + [index[order].numpy()]


@torch.no_grad()
def _predict(model: nn.Module, loader: Iterable[Any], device: torch.device | str, amp: str,
             decode: Callable[[torch.Tensor], torch.Tensor], target: Callable[[Sequence[Any]], torch.Tensor]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(decode(logits), target(batch), sample indices) of a whole split, in index order."""
    device = torch.device(device)
    model.eval()
    preds, trues, idx = [], [], []
    for batch in loader:
        images, feats = _inputs(batch[0], device)
        with autocast(amp, device):
            logits = _run(model, images, feats)
        preds.append(decode(logits.float()).cpu())
        trues.append(target(batch).cpu())
        idx.append(batch[-1].cpu())
    pred, true, index = _in_order(idx, preds, trues)
    return pred, true, index


def predict_segmentation(model: nn.Module, loader: Iterable[Any], device: torch.device | str, num_classes: int,
                         amp: str = "none") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted masks [N,H,W] uint8, true masks [N,H,W], sample indices) of a whole split, in index order."""
    return _predict(model, loader, device, amp, lambda z: seg_predict_mask(z, num_classes).to(torch.uint8),
                    lambda batch: batch[1])


def predict_landmarks(model: nn.Module, loader: Iterable[Any], device: torch.device | str, amp: str = "none"
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted points [N,K,2], true points [N,K,2] (NaN absent), sample indices), (x, y) in input pixels:
    the argmax of each heatmap channel."""
    return _predict(model, loader, device, amp, decode_heatmaps, lambda batch: batch[2].float())
