"""One image-text contrastive step (SLIP, CLIP, SimCLR), SLIP's schedule and optimizer groups, and zero-shot
classification.

`slip_forward` is what a step computes; the loop (`util.loop`) does backward, scaling, accumulation and
logging. The learnable logit scale is clamped after every update by an `after_step` hook
(`util.contrastive.clamp_logit_scale`), and the learning rate follows SLIP's per-iteration schedule
through `lr_fn`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from util.skipping import gather_skipped, SkippingLoader
from util.loop import Optimization, autocast, train_epoch
from util.logger import RunLogger
from util.unwrap import unwrap

logger = logging.getLogger("medfound")


def model_kind(name: str) -> str:
    """'slip', 'clip' or 'simclr' from a model name (`SLIP_VITB16` -> 'slip'; MedSLIP's `MedSLIP_SWIN` trains
    SLIP's objective -> 'slip')."""
    head = name.split("_", 1)[0].lower()
    if head == "medslip":
        return "slip"
    if head not in ("slip", "clip", "simclr"):
        raise ValueError(f"{name}: not a SLIP_*, CLIP_*, SIMCLR_* or MedSLIP_* model")
    return head


# --------------------------------------------------------------------------------------- schedule
class SlipSchedule:
    """SLIP's learning rate, one value per optimizer update: linear warm-up from `lr_start` to `lr` over
    `warmup_epochs`, then cosine to `lr_end`. A fractional epoch maps to update
    `round(epoch * updates_per_epoch)`, so the loop's `lr_fn(epoch)` reads the value SLIP reads there."""

    def __init__(self, lr: float, lr_start: float, lr_end: float, warmup_epochs: int, epochs: int,
                 updates_per_epoch: int) -> None:
        from util.lr_sched import cosine_scheduler
        self.updates_per_epoch = updates_per_epoch
        self.values = cosine_scheduler(lr, lr_end, epochs, updates_per_epoch, warmup_epochs=min(warmup_epochs, epochs),
                                       start_warmup_value=lr_start)

    def at(self, epoch: float) -> float:
        return float(self.values[min(int(round(epoch * self.updates_per_epoch)), len(self.values) - 1)])

    def lr_fn(self, optimizer: torch.optim.Optimizer) -> Callable[[float], float]:
        def set_lr(epoch: float) -> float:
            lr = self.at(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            return lr
        return set_lr


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    """SLIP's two groups: weight decay on matrices, none on 1-D tensors, biases, LayerNorm/BatchNorm
    parameters (names containing `ln` or `bn`) and the logit scale; frozen parameters left out."""
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "bias" in name or "ln" in name or "bn" in name else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, wd: float, betas: Sequence[float], eps: float) -> torch.optim.AdamW:
    """AdamW over SLIP's groups; the fused kernel where every parameter allows it (it skips a non-finite
    step on the device without a host sync)."""
    groups = param_groups(model, wd)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=wd, fused=fused or None)


# ------------------------------------------------------------------------------------------ step
def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True)


def slip_forward(model: nn.Module, batch: dict[str, Any], device: torch.device, kind: str,
                 ssl_scale: float = 1.0, ssl_temp: float = 0.1, loss: str = "clip"
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """Loss of one batch and its scalars.

    CLIP: image-text InfoNCE over the global batch (`--loss siglip`: the pairwise sigmoid loss instead).
    SimCLR: NT-Xent between the two augmented views (`aug1`, `aug2`) at temperature `ssl_temp`.
    SLIP: CLIP + `ssl_scale` x SimCLR. Scalars: clip_loss, ssl_loss, clip_acc, ssl_acc (those that apply),
    logit_scale, and `captions_cut` (fraction of this batch's captions cut to fit the context)."""
    from util.contrastive import clip_loss, siglip_loss, simclr_loss
    image = _to(batch["image"], device) if "image" in batch else None
    text = _to(batch["text"], device) if "text" in batch else None
    aug1 = _to(batch["aug1"], device) if kind in ("slip", "simclr") else None
    aug2 = _to(batch["aug2"], device) if kind in ("slip", "simclr") else None
    if kind == "simclr":
        out = model(aug1, aug2)
    elif kind == "slip":
        out = model(image, text, aug1, aug2)
    else:
        out = model(image, text)
    scalars: dict[str, torch.Tensor | float] = {}
    total = None
    if kind in ("clip", "slip"):
        image_embed, text_embed = out["image_embed"].float(), out["text_embed"].float()
        if loss == "siglip":
            c_loss, c_acc = siglip_loss(image_embed, text_embed, out["logit_scale"], out["logit_bias"])
        else:
            c_loss, c_acc = clip_loss(image_embed, text_embed, out["logit_scale"])
        total = c_loss
        scalars.update(clip_loss=c_loss.detach(), clip_acc=c_acc.detach() if torch.is_tensor(c_acc) else c_acc,
                       logit_scale=out["logit_scale"].detach().float().mean())
    if kind in ("simclr", "slip"):
        s_loss, s_acc = simclr_loss(out["aug1_embed"].float(), out["aug2_embed"].float(), ssl_temp)
        total = s_loss if total is None else total + ssl_scale * s_loss
        scalars.update(ssl_loss=s_loss.detach(), ssl_acc=s_acc.detach() if torch.is_tensor(s_acc) else s_acc)
    if "cut" in batch:
        scalars["captions_cut"] = batch["cut"].float().mean()
    assert total is not None
    return total, scalars


def train_one_epoch(model: nn.Module, loader, opt: Optimization, device: torch.device, epoch: int, args,
                    schedule: SlipSchedule, kind: str, run_logger: RunLogger | None = None,
                    **loop_kwargs) -> dict[str, float]:
    """One epoch through util.loop.train_epoch; `loop_kwargs`: start_step, steps_per_epoch, on_update,
    loop_state, clock."""
    return train_epoch(model, loader, opt, epoch, device,
                       forward=lambda m, b: slip_forward(m, b, device, kind, args.ssl_scale, args.ssl_temp, args.loss),
                       lr_fn=schedule.lr_fn(opt.optimizer), run_logger=run_logger, print_freq=args.print_freq,
                       seed=args.seed, **loop_kwargs)


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, kind: str, args) -> dict[str, float]:
    """Mean loss and scalars over a validation caption loader (MedSLIP's --metadataval)."""
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        with autocast(args.amp, device):
            loss, scalars = slip_forward(model, batch, device, kind, args.ssl_scale, args.ssl_temp, args.loss)
        for k, v in {"loss": loss, **scalars}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    model.train()
    out = {k: v / max(n, 1) for k, v in sums.items()}
    from util.dist import all_reduce_mean
    return {k: all_reduce_mean(v) for k, v in out.items()}


# -------------------------------------------------------------------------------------- zero-shot
@torch.no_grad()
def zeroshot_classifier(model: nn.Module, classnames: Sequence[str | Sequence[str]], templates: Sequence[str],
                        tokenize: Callable[[list[str]], tuple[torch.Tensor, int]], device: torch.device,
                        context_length: int = 77) -> torch.Tensor:
    """[C, D] unit text embeddings, one per class: the mean of the unit embeddings of every synonym of the
    class filled into every template (SLIP's and CLIP's prompt ensemble), normalised again. The text tower
    runs in eval mode (a Hugging Face text encoder has dropout) and gets its previous mode back."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    rows = []
    for names in classnames:
        names = [names] if isinstance(names, str) else list(names)
        texts = [t.format(n) for n in names for t in templates]
        ids, _ = tokenize(texts, context_length)
        emb = F.normalize(net.encode_text(ids.to(device)).float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    net.train(was_training)
    return torch.stack(rows)


@torch.no_grad()
def zeroshot_predict(model: nn.Module, loader, classifier: torch.Tensor, device: torch.device, amp: str = "none"
                     ) -> dict[str, Any]:
    """{probs [N, C] (softmax of the logit-scaled cosine similarities), targets [N], indices [N], skipped}
    over `loader` (each rank its shard; gathered and put back in index order)."""
    from util.inference import gather_variable
    net = unwrap(model)
    net.eval()
    scale = float(net.logit_scale.exp()) if hasattr(net, "logit_scale") else 100.0
    probs, targets, indices = [], [], []
    for images, y, idx in loader:
        with autocast(amp, device):
            feats = net.encode_image(images.to(device, non_blocking=True))
        feats = F.normalize(feats.float(), dim=-1)
        probs.append((scale * feats @ classifier.T).softmax(-1).cpu())
        targets.append(torch.as_tensor(y))
        indices.append(torch.as_tensor(idx))
    cat = lambda xs, shape: torch.cat(xs) if xs else torch.zeros(shape)  # noqa: E731
    idx = gather_variable(cat(indices, (0,)).long())
    order = torch.argsort(idx)
    return {"probs": gather_variable(cat(probs, (0, classifier.shape[0])))[order].numpy(),
            "targets": gather_variable(cat(targets, (0,)).long())[order].numpy(), "indices": idx[order].numpy(),
            "skipped": gather_skipped(loader) if isinstance(loader, SkippingLoader) else []}


def per_class_pr_ci(y: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
                    ) -> dict[str, list[list[float | None]]]:
    """Bootstrap intervals of each class's precision and recall (argmax predictions), drawn with the same
    stratified resampler as `util.metrics.bootstrap_ci`: {precision_per_class: [[lo, hi], ...], recall_per_class: ...}."""
    from util.metrics import bootstrap_weights
    C = probs.shape[1]
    pred = probs.argmax(1)
    strata = [s for s in (np.flatnonzero(y == k) for k in range(C)) if s.size]
    prec: list[list[np.ndarray]] = [[] for _ in range(C)]
    rec: list[list[np.ndarray]] = [[] for _ in range(C)]
    for W in bootstrap_weights(strata, len(y), n_boot, seed):
        for k in range(C):
            tp = W @ ((pred == k) & (y == k)).astype(np.float64)
            pp, pos = W @ (pred == k).astype(np.float64), W @ (y == k).astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                prec[k].append(tp / pp)
                rec[k].append(tp / pos)

    def interval(chunks: list[np.ndarray]) -> list[float | None]:
        v = np.concatenate(chunks)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return [None, None]
        lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        return [float(lo), float(hi)]
    return {"precision_per_class": [interval(c) for c in prec], "recall_per_class": [interval(c) for c in rec]}
