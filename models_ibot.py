"""iBOT / VisionFM self-distillation: projection head, multi-crop wrapper, loss and factories.

A student and an EMA teacher, each a `MultiCropWrapper(backbone, head)` over `models_vit.VisionTransformer`
and an `iBOTHead`, with the key names of the iBOT / VisionFM releases (`backbone.*`, `head.mlp.*`,
`head.last_layer.weight_g` / `weight_v`, `head.last_layer2.*`), so their `student` / `teacher` entries load
strictly. `iBOTLoss` is DINO's self-distillation on the class token plus masked-patch prediction, with
either an EMA centre or DINOv2's Sinkhorn-Knopp teacher normalisation; `koleo_loss` is DINOv2's spreading
regulariser.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from models_vit import Block, VisionTransformer, _vit
from util.cli import UserError
from util.family import FamilySpec, register_family
from util.registry import register

HEAD_NORMS = (None, "bn", "syncbn", "ln")
CENTERINGS = ("center", "sinkhorn_knopp")


class WeightNormLinear(nn.Module):
    """A bias-free Linear whose weight is g * v / ||v|| (per output row), stored as `weight_g` [out, 1]
    and `weight_v` [out, in]: the parameter names of torch's legacy `weight_norm`, which the published
    iBOT / DINO / VisionFM heads carry. Written out rather than through torch's parametrisation API, whose
    names differ (`parametrizations.weight.original0/1`), so files read and write without remapping."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's default, as the reference layer has
        # The reference starts the gain at 1 (not at ||v||): the first outputs are cosine similarities.
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(v)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last dimension of [B, D] or [B, N, D] inputs (the head sees both)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class _TokenSyncBatchNorm(nn.SyncBatchNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def _norm(kind: str | None, dim: int, affine: bool = True) -> nn.Module | None:
    if kind is None or kind == "none":
        return None
    if kind == "ln":
        return nn.LayerNorm(dim, elementwise_affine=affine)
    if kind == "bn":
        return _TokenBatchNorm(dim, affine=affine)
    if kind == "syncbn":
        return _TokenSyncBatchNorm(dim, affine=affine)
    raise UserError(f"unknown head norm '{kind}'; choose one of none, bn, syncbn, ln")


def _act(kind: str) -> nn.Module:
    acts = {"gelu": nn.GELU, "relu": nn.ReLU}
    if kind not in acts:
        raise UserError(f"unknown head activation '{kind}'; choose one of {', '.join(acts)}")
    return acts[kind]()


class iBOTHead(nn.Module):
    """iBOT's projection head: MLP (Linear-[norm]-act x (nlayers-1), Linear to `bottleneck_dim`), L2
    normalisation, then a weight-normed `last_layer` for the class token and `last_layer2` for the patch
    tokens (the same module when `shared_head`; its keys are still written under both names).

    `norm_last_layer` fixes every weight_g at 1 and freezes it (the outputs are then cosines scaled by
    the rows' directions only). forward([B, 1+N, D]) -> (cls [B, out_dim], patch [B, N, patch_out_dim]);
    forward([B, D]) -> cls [B, out_dim] (local crops need only their class token).
    """

    def __init__(self, in_dim: int, out_dim: int, patch_out_dim: int = 8192, norm: str | None = None,
                 act: str = "gelu", last_norm: str | None = None, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True, shared_head: bool = False) -> None:
        super().__init__()
        if bottleneck_dim <= 0 or nlayers < 1:
            raise ValueError("iBOTHead needs bottleneck_dim > 0 and nlayers >= 1")
        if shared_head and out_dim != patch_out_dim:
            raise UserError(f"--shared_head needs --out_dim ({out_dim}) == --patch_out_dim ({patch_out_dim})")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            # Index layout as the reference: Linear, [norm], act, ... so keys are mlp.0, mlp.2, mlp.4
            # without a norm and mlp.0, mlp.1, mlp.3, mlp.4, mlp.6 with one.
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for a, b in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(a, b))
                n = _norm(norm, b)
                if n is not None:
                    layers.append(n)
                layers.append(_act(act))
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_norm = _norm(last_norm, out_dim, affine=False)
        if shared_head:
            self.last_layer2 = self.last_layer
            self.last_norm2 = self.last_norm
        else:
            self.last_layer2 = WeightNormLinear(bottleneck_dim, patch_out_dim)
            self.last_norm2 = _norm(last_norm, patch_out_dim, affine=False)
        self.norm_last_layer = norm_last_layer
        if norm_last_layer:
            for layer in (self.last_layer, self.last_layer2):
                layer.weight_g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(self.mlp(x), dim=-1, p=2)
        if x.ndim == 2:
            cls = self.last_layer(z)
            return self.last_norm(cls) if self.last_norm is not None else cls
        cls, patch = self.last_layer(z[:, 0]), self.last_layer2(z[:, 1:])
        if self.last_norm is not None:
            cls, patch = self.last_norm(cls), self.last_norm2(patch)
        return cls, patch


class CropOutputs(NamedTuple):
    """What the loss needs from one wrapper call: global crops' class and patch logits, the local crops'
    class logits (None without local crops) and the global crops' class-token features before the head
    (for KoLeo)."""
    cls: torch.Tensor
    patch: torch.Tensor
    local_cls: torch.Tensor | None
    features: torch.Tensor


class MultiCropWrapper(nn.Module):
    """backbone + head over a list of crops. Consecutive crops of one resolution run through the backbone
    as one batch (local 96-px crops use the position table resized to their grid); the first group is the
    global crops. `masks[i]` ([B, h, w] bool) masks crop i; crops past the masks (local crops) run with
    masked image modelling off, as in iBOT."""

    def __init__(self, backbone: VisionTransformer, head: iBOTHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor,
                masks: Sequence[torch.Tensor | None] | None = None) -> CropOutputs:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
            masks = [masks] if isinstance(masks, torch.Tensor) else masks
        masks = list(masks or [])
        if len(masks) > len(crops):
            raise ValueError(f"{len(masks)} masks for {len(crops)} crops")
        groups: list[tuple[int, int]] = []
        for i, c in enumerate(crops):
            if groups and tuple(c.shape[-2:]) == tuple(crops[groups[-1][0]].shape[-2:]):
                groups[-1] = (groups[-1][0], i + 1)
            else:
                groups.append((i, i + 1))
        outs = []
        for gi, (a, b) in enumerate(groups):
            x = torch.cat(list(crops[a:b]))
            m = None
            if any(j < len(masks) and masks[j] is not None for j in range(a, b)):
                grid = self.backbone.feature_grid(crops[a])
                m = torch.cat([masks[j] if j < len(masks) and masks[j] is not None else
                               torch.zeros(crops[j].shape[0], *grid, dtype=torch.bool, device=x.device)
                               for j in range(a, b)]).to(x.device)
            tokens = self.backbone.forward_features(x, mask=m)
            outs.append(tokens if gi == 0 else tokens[:, 0])
        cls, patch = self.head(outs[0])
        local = self.head(torch.cat(outs[1:])) if len(outs) > 1 else None
        return CropOutputs(cls, patch, local, outs[0][:, 0])


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """DINOv2's teacher normalisation of logits [M, K] (M samples on this rank): Q = exp(logits / temp)
    alternately normalised so that, over all ranks, each prototype column receives mass 1/K and each
    sample row sums to 1/M_total; returned scaled by M_total so rows are distributions. Row and column
    sums run across ranks. The global maximum is subtracted first (it cancels in the normalisation)."""
    z = logits.float() / temp
    local_max = z.max() if z.numel() else torch.tensor(float("-inf"), device=z.device)
    z = z - _all_reduce(local_max.clone(), "max")
    q = torch.exp(z).t()  # [K, M]
    k = q.shape[0]
    m_total = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    q /= _all_reduce(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= m_total
    return (q * m_total).t()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: -mean log distance of each L2-normalised feature row to its nearest
    other row (torch's pairwise distance, which adds eps to the difference). Computed in float32."""
    with torch.autocast(device_type=x.device.type, enabled=False):  # log of small distances: float32
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-1.0)  # never pick a row itself
            nearest = dots.argmax(dim=1)
        return -torch.log(F.pairwise_distance(x, x[nearest], p=2, eps=eps) + eps).mean()


def temperature_schedule(warmup: float, final: float, warmup_epochs: int, nepochs: int,
                         hold_epochs: int = 0) -> np.ndarray:
    """Per-epoch teacher temperatures: `hold_epochs` at `warmup`, then linspace(warmup, final,
    warmup_epochs), then `final`; `nepochs` values (at least one past the warm-up)."""
    n = max(nepochs, hold_epochs + warmup_epochs)
    return np.concatenate((np.full(hold_epochs, warmup), np.linspace(warmup, final, warmup_epochs),
                           np.full(n - hold_epochs - warmup_epochs, final)))


class iBOTLoss(nn.Module):
    """iBOT's loss for 2 global (`ngcrops`) + `nlcrops` local crops.

    The teacher's global outputs become targets softmax((t - centre) / T) (or Sinkhorn-Knopp
    assignments with `centering='sinkhorn_knopp'`); student logits are divided by `student_temp`.
    `cls`: mean over pairs (teacher global q, student crop v != q) of the batch-mean cross-entropy of class
    tokens. `patch`: for v == q, per image the cross-entropy summed over masked patches / max(#masked, 1),
    averaged over the batch then the global crops. loss = lambda1 * cls + lambda2 * patch.
    Teacher temperatures follow per-epoch warm-up schedules (the patch one holds its warm-up value for
    `mim_start_epoch` epochs first). After each loss the centres move, with momentum, towards the
    cross-rank batch mean of the teacher's class logits and of its per-image mean patch logits
    (all patches, not only masked ones).
    """

    def __init__(self, out_dim: int, patch_out_dim: int, ngcrops: int, nlcrops: int, warmup_teacher_temp: float,
                 teacher_temp: float, warmup_teacher_temp2: float, teacher_temp2: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, center_momentum2: float = 0.9, lambda1: float = 1.0,
                 lambda2: float = 1.0, mim_start_epoch: int = 0, centering: str = "center") -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise UserError(f"unknown --centering '{centering}'; choose one of {', '.join(CENTERINGS)}")
        self.ngcrops, self.nlcrops, self.ncrops = ngcrops, nlcrops, ngcrops + nlcrops
        self.student_temp = student_temp
        self.center_momentum, self.center_momentum2 = center_momentum, center_momentum2
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))
        self.teacher_temp_schedule = temperature_schedule(warmup_teacher_temp, teacher_temp,
                                                          warmup_teacher_temp_epochs, nepochs)
        self.teacher_temp2_schedule = temperature_schedule(warmup_teacher_temp2, teacher_temp2,
                                                           warmup_teacher_temp_epochs, nepochs, mim_start_epoch)

    def temperatures(self, epoch: int) -> tuple[float, float]:
        """(class, patch) teacher temperatures of an epoch; past the schedule, its last values."""
        return (float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)]),
                float(self.teacher_temp2_schedule[min(epoch, len(self.teacher_temp2_schedule) - 1)]))

    @torch.no_grad()
    def teacher_targets(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor,
                        masks: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        temp, temp2 = self.temperatures(epoch)
        if self.centering == "center":
            return (F.softmax((teacher_cls.float() - self.center) / temp, dim=-1),
                    F.softmax((teacher_patch.float() - self.center2) / temp2, dim=-1))
        cls = sinkhorn_knopp(teacher_cls, temp)
        # Patches: only the masked ones are predicted, so only they take part in the assignment.
        patch = torch.zeros_like(teacher_patch, dtype=torch.float32)
        flat = masks.flatten(1)
        patch[flat] = sinkhorn_knopp(teacher_patch[flat], temp2)
        return cls, patch

    def forward(self, student_output: tuple[torch.Tensor, torch.Tensor],
                teacher_output: tuple[torch.Tensor, torch.Tensor], student_local_cls: torch.Tensor | None,
                student_mask: Sequence[torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output
        if student_local_cls is not None:
            student_cls = torch.cat([student_cls, student_local_cls])
        s_cls = (student_cls.float() / self.student_temp).chunk(self.ncrops)
        s_patch = (student_patch.float() / self.student_temp).chunk(self.ngcrops)
        masks = torch.cat([m.to(teacher_patch.device) for m in student_mask[:self.ngcrops]])
        t_cls, t_patch = self.teacher_targets(teacher_cls, teacher_patch, masks, epoch)
        t_cls, t_patch = t_cls.chunk(self.ngcrops), t_patch.chunk(self.ngcrops)
        total_cls, n_cls, total_patch, n_patch = 0.0, 0, 0.0, 0
        for q in range(self.ngcrops):
            for v in range(len(s_cls)):
                if v == q:
                    ce = torch.sum(-t_patch[q] * F.log_softmax(s_patch[v], dim=-1), dim=-1)  # [B, N]
                    m = student_mask[v].flatten(-2).to(ce.dtype).to(ce.device)
                    total_patch = total_patch + (torch.sum(ce * m, dim=-1) / m.sum(dim=-1).clamp(min=1.0)).mean()
                    n_patch += 1
                else:
                    total_cls = total_cls + torch.sum(-t_cls[q] * F.log_softmax(s_cls[v], dim=-1), dim=-1).mean()
                    n_cls += 1
        cls_loss = total_cls / max(n_cls, 1) * self.lambda1
        patch_loss = total_patch / max(n_patch, 1) * self.lambda2
        if self.centering == "center":
            self.update_center(teacher_cls, teacher_patch)
        zero = student_cls.new_zeros((), dtype=torch.float32)
        cls_loss = cls_loss if torch.is_tensor(cls_loss) else zero
        patch_loss = patch_loss if torch.is_tensor(patch_loss) else zero
        return {"cls": cls_loss, "patch": patch_loss, "loss": cls_loss + patch_loss}

    @torch.no_grad()
    def update_center(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor) -> None:
        """EMA of the cross-rank batch means (a sum all-reduce divided by the global batch)."""
        world = _world_size()
        cls_center = _all_reduce(teacher_cls.float().sum(dim=0, keepdim=True)) / (len(teacher_cls) * world)
        self.center.mul_(self.center_momentum).add_(cls_center * (1 - self.center_momentum))
        patch_center = _all_reduce(teacher_patch.float().mean(1).sum(dim=0, keepdim=True)) / (len(teacher_patch) * world)
        self.center2.mul_(self.center_momentum2).add_(patch_center * (1 - self.center_momentum2))


def _ibot(patch_size: int, embed_dim: int, depth: int, num_heads: int, out_dim: int = 8192,
          patch_out_dim: int = 8192, shared_head: bool = False, shared_head_teacher: bool = True,
          norm_last_layer: bool = True, norm_in_head: str | None = None, act_in_head: str = "gelu",
          teacher: bool = False, drop_path_rate: float = 0.0, masked_im_modeling: bool = True,
          head_hidden_dim: int = 2048, bottleneck_dim: int = 256, head_nlayers: int = 3,
          **kw) -> MultiCropWrapper:
    """A student (default) or teacher (`teacher=True`) network as the references build them: the
    teacher's backbone has no drop path and no `masked_embed`, its head shares the patch layer per
    `shared_head_teacher` and keeps the last layer normalised."""
    kw.pop("num_classes", None)
    kw.pop("global_pool", None)
    sizes = dict(hidden_dim=head_hidden_dim, bottleneck_dim=bottleneck_dim, nlayers=head_nlayers)
    if teacher:
        backbone = _vit(patch_size, embed_dim, depth, num_heads, pool="cls", num_classes=0, **kw)
        head = iBOTHead(embed_dim, out_dim, patch_out_dim=patch_out_dim, norm=norm_in_head, act=act_in_head,
                        shared_head=shared_head_teacher, **sizes)
    else:
        backbone = _vit(patch_size, embed_dim, depth, num_heads, pool="cls", num_classes=0,
                        drop_path_rate=drop_path_rate, masked_im_modeling=masked_im_modeling, **kw)
        head = iBOTHead(embed_dim, out_dim, patch_out_dim=patch_out_dim, norm=norm_in_head, act=act_in_head,
                        shared_head=shared_head, norm_last_layer=norm_last_layer, **sizes)
    return MultiCropWrapper(backbone, head)


@register()
def ibot_vit_tiny_patch16(**kw) -> MultiCropWrapper:
    """iBOT ViT-Ti/16 (D 192, depth 12, 3 heads) with its iBOTHead."""
    return _ibot(16, 192, 12, 3, **kw)


@register()
def ibot_vit_small_patch16(**kw) -> MultiCropWrapper:
    """iBOT ViT-S/16 (D 384, depth 12, 6 heads) with its iBOTHead."""
    return _ibot(16, 384, 12, 6, **kw)


@register()
def ibot_vit_base_patch16(**kw) -> MultiCropWrapper:
    """iBOT / VisionFM ViT-B/16 (D 768, depth 12, 12 heads) with its iBOTHead."""
    return _ibot(16, 768, 12, 12, **kw)


@register()
def ibot_vit_large_patch16(**kw) -> MultiCropWrapper:
    """iBOT ViT-L/16 (D 1024, depth 24, 16 heads) with its iBOTHead."""
    return _ibot(16, 1024, 24, 16, **kw)


@register()
def ibot_vit_micro_patch8(**kw) -> MultiCropWrapper:
    """Test-size iBOT network (D 64, depth 2, 4 heads, patch 8): seconds per epoch on CPU."""
    kw.setdefault("out_dim", 64)
    kw.setdefault("patch_out_dim", kw["out_dim"])
    kw.setdefault("head_hidden_dim", 128)
    kw.setdefault("bottleneck_dim", 32)
    return _ibot(8, 64, 2, 4, **kw)


# A training checkpoint holds the student, the EMA teacher and the loss centres under these names. An
# encoder loading one (after `module.` / `backbone.` are stripped) ignores the projection head and the
# student's mask token; `last_layer` occurs in no other family's keys.
FAMILY = register_family(FamilySpec(
    name="ibot", states=("student", "teacher", "ibot_loss"),
    ignore_prefixes=("head.mlp.", "head.last_layer", "head.last_norm", "masked_embed"),
    markers=("last_layer",), fsdp_block_types=(Block,)))
MultiCropWrapper.family_spec = FAMILY
