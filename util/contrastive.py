"""Contrastive losses over the global batch: CLIP's InfoNCE, SimCLR's NT-Xent, SigLIP's sigmoid loss,
and the one differentiable all-gather they share.

Every loss here is computed by each process on its own rows against every process's columns, and is the
mean over its own rows. Gathered tensors keep their gradient (the backward pass sums every process's
gradient for a slice and hands it to the slice's owner), so after data parallelism averages the
parameter gradients over the processes, one step is the same as one process with the whole batch: the
gradients of 1 process x 2b rows equal those of 2 processes x b rows. (SLIP gathers CLIP's embeddings
without gradient, which drops the gradient through the other processes' rows; not reproduced.)

All processes must hold the same number of rows (data loaders drop the last incomplete batch).
Losses are computed in fp32 whatever the autocast dtype.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from util.unwrap import unwrap


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over processes and returns this process's
    slice: the gradient of the sum of every process's loss with respect to this process's rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every process's `x` concatenated along dim 0 in rank order (gradients flow back to the owner);
    `x` itself in a single process."""
    if _world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def _local_labels(rows: int, device: torch.device) -> torch.Tensor:
    """The column of each local row's positive in the gathered batch: rank * rows + i."""
    rank, _ = _world()
    return torch.arange(rows, device=device) + rank * rows


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent (SLIP's `clip_acc` / `ssl_acc` unit), no gradient."""
    return (logits.detach().argmax(dim=-1) == labels).float().mean() * 100


def clip_loss(image_embed: torch.Tensor, text_embed: torch.Tensor,
              logit_scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's symmetric InfoNCE over the global batch -> (loss, image-to-text accuracy in %).

    Embeddings are L2-normalised; `logit_scale` is the multiplier (the exp of the learned parameter, as
    the models' forward returns it). Loss = mean of CE(local images x all texts) and CE(local texts x
    all images), the positive of local row i being global column rank * B + i.
    """
    image = F.normalize(image_embed.float(), dim=-1)
    text = F.normalize(text_embed.float(), dim=-1)
    scale = logit_scale.float() if isinstance(logit_scale, torch.Tensor) else logit_scale
    labels = _local_labels(image.shape[0], image.device)
    logits_image = scale * image @ gather_with_grad(text).t()
    logits_text = scale * text @ gather_with_grad(image).t()
    loss = (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2
    return loss, _accuracy(logits_image, labels)


def simclr_loss(q_a: torch.Tensor, q_b: torch.Tensor, temperature: float = 0.1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's NT-Xent over the global batch -> (loss, accuracy in %).

    Two views (B, d) per process, L2-normalised. For view a, row i's candidates are every view-b row
    (positive: its own pair) and every other view-a row (its own row excluded); symmetric for view b;
    logits divided by `temperature`; the loss is the mean of the two cross-entropies.
    """
    a = F.normalize(q_a.float(), dim=-1)
    b = F.normalize(q_b.float(), dim=-1)
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    labels = _local_labels(a.shape[0], a.device)
    self_mask = F.one_hot(labels, all_a.shape[0]).bool()
    neg_inf = torch.finfo(torch.float32).min  # exp() of it is 0: a row never competes with itself
    logits_aa = (a @ all_a.t() / temperature).masked_fill(self_mask, neg_inf)
    logits_bb = (b @ all_b.t() / temperature).masked_fill(self_mask, neg_inf)
    logits_ab = a @ all_b.t() / temperature
    logits_ba = b @ all_a.t() / temperature
    logits_a = torch.cat([logits_ab, logits_aa], dim=1)
    logits_b = torch.cat([logits_ba, logits_bb], dim=1)
    loss = (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2
    return loss, _accuracy(logits_a, labels)


def siglip_loss(image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP's pairwise sigmoid loss over the global batch -> (loss, image-to-text accuracy in %).

    logits = logit_scale * image_i . text_j + logit_bias for local images against every text; each pair
    is a binary problem (+1 for its own caption, -1 otherwise): loss = -sum(log sigmoid(label * logit)),
    divided by the local batch size (so the mean over processes is the whole batch's loss).
    """
    image = F.normalize(image_embed.float(), dim=-1)
    text = F.normalize(text_embed.float(), dim=-1)
    scale = logit_scale.float() if isinstance(logit_scale, torch.Tensor) else logit_scale
    bias = logit_bias.float() if isinstance(logit_bias, torch.Tensor) else logit_bias
    labels = _local_labels(image.shape[0], image.device)
    logits = scale * image @ gather_with_grad(text).t() + bias
    signs = F.one_hot(labels, logits.shape[1]).float() * 2 - 1
    loss = -F.logsigmoid(signs * logits).sum() / image.shape[0]
    return loss, _accuracy(logits, labels)


def clamp_logit_scale(model: nn.Module, stepped: torch.Tensor | None = None, max: float = math.log(100)) -> None:
    """Clamp every `logit_scale` parameter into [0, max] (CLIP's temperature never goes below 1/100).

    Usable as `util.loop.Optimization(after_step=clamp_logit_scale)`: `stepped` (0 when the update was
    skipped) is not needed, since a skipped update leaves an already clamped value unchanged.
    """
    found = False
    with torch.no_grad():
        for name, p in unwrap(model).named_parameters():
            if name == "logit_scale" or name.endswith(".logit_scale"):
                p.clamp_(0, max)
                found = True
    if not found:
        raise ValueError(f"{type(unwrap(model)).__name__} has no logit_scale parameter to clamp")
