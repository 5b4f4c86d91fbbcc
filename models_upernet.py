"""UPerNet semantic segmentation on ViT and ConvViT backbones (our own code; no mmcv / mmsegmentation).

The network is the one DeblurringMAE / ConvMAE / BEiT / MAE segmentation configs build with mmseg, written
with mmseg's attribute names so a state dict reads familiarly (`backbone.*`, `neck.fpn{1..4}.*`,
`decode_head.{psp_modules,bottleneck,lateral_convs,fpn_convs,fpn_bottleneck,conv_seg}.*`,
`auxiliary_head.{convs,conv_seg}.*`; a `ConvModule` is conv (no bias) -> BatchNorm -> ReLU with keys
`conv.*`, `bn.*`):

- backbone: a models_vit VisionTransformer (4 blocks taken through `forward_intermediates`, patch tokens
  only, no final norm) or a models_convmae ConvViT (its three stage outputs);
- neck (4 maps at strides p/4, p/2, p, 2p for a ViT of patch p; 4, 8, 16, 32 for ConvViT):
  ViT: fpn1 = ConvTranspose 2x2 -> BatchNorm -> GELU -> ConvTranspose 2x2, fpn2 = ConvTranspose 2x2,
  fpn3 = identity, fpn4 = max-pool 2x2 (BEiT / MAE segmentation); ConvViT: stage 1, stage 2, stage 3 and
  max-pool(stage 3) (`last_level='conv'`: Conv 3x3 stride 2 without padding -> BatchNorm -> GELU, the
  reference ConvMAE segmentation backbone's fourth map);
- decode_head: UPerHead: pyramid pooling (scales 1, 2, 3, 6) on the deepest map, FPN laterals (1x1) and
  top-down sums, fpn convs (3x3), all levels upsampled to the finest and fused by a 3x3 conv, Dropout2d,
  1x1 classifier;
- auxiliary_head: FCN head (one 3x3 ConvModule, Dropout2d, 1x1 classifier) on the stride-16 map, used in
  training only and weighted `aux_weight` (0.4) in the loss.

Every resize is bilinear with align_corners=False (mmseg's UPerHead settings); logits are returned at the
input size. BatchNorm in training needs more than one value per channel: the 1x1 pyramid-pooling branch
therefore needs batches of at least 2 images (per process; use SyncBatchNorm across processes).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models_convmae import CBlock
from models_vit import Block
from util.checkpoint import CheckpointError, load_pretrained_encoder
from util.cli import UserError
from util.family import FamilySpec, register_family
from util.optim import vit_layer_id
from util.registry import create_model

# mmseg's LayerDecayOptimizerConstructor compares the backbone's no-weight-decay names without their
# `backbone.` prefix, so `backbone.pos_embed` (and `cls_token`) do receive weight decay there. Passing this
# compat value to `UPerNet.no_weight_decay` reproduces that; the default exempts them.
MMSEG_WD_COMPAT = "mmseg_convmae"
LAST_LEVELS = ("maxpool", "conv")
# 4 blocks per ViT depth as BEiT / MAE segmentation take them (ViT-B 3,5,7,11; ViT-L 7,11,15,23)
VIT_SEG_INDICES = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23)}


def vit_seg_indices(depth: int) -> tuple[int, ...]:
    """The 4 blocks a ViT of `depth` feeds the neck: the table above, else evenly spread ending at the last
    block (a block may repeat when depth < 4, e.g. depth 2 -> 0, 0, 1, 1)."""
    if depth in VIT_SEG_INDICES:
        return VIT_SEG_INDICES[depth]
    return tuple(max(0, round(depth * (k + 1) / 4) - 1) for k in range(4))


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with align_corners=False (mmseg's `resize` as UPerHead calls it)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Module):
    """mmcv's ConvModule with BatchNorm and ReLU: conv (bias=False, since BN follows) -> bn -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class MultiLevelNeck(nn.Module):
    """Four maps in, four out: `fpn{i}` applied to map i (see the module docstring for the two layouts)."""

    def __init__(self, fpn1: nn.Module, fpn2: nn.Module, fpn3: nn.Module, fpn4: nn.Module) -> None:
        super().__init__()
        self.fpn1, self.fpn2, self.fpn3, self.fpn4 = fpn1, fpn2, fpn3, fpn4

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


def vit_neck(dim: int) -> MultiLevelNeck:
    """BEiT / MAE segmentation's ViT pyramid: x4 (two transposed convs), x2, x1, /2 (max-pool)."""
    return MultiLevelNeck(
        nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                      nn.ConvTranspose2d(dim, dim, 2, stride=2)),
        nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.Identity(), nn.MaxPool2d(2, stride=2))


def convvit_neck(dim: int, last_level: str = "maxpool") -> MultiLevelNeck:
    """ConvViT's stages as they are, plus the stride-32 map from stage 3 (max-pool or strided conv)."""
    if last_level not in LAST_LEVELS:
        raise ValueError(f"last_level must be one of {LAST_LEVELS}, got {last_level!r}")
    fourth = nn.MaxPool2d(2, stride=2) if last_level == "maxpool" else \
        nn.Sequential(nn.Conv2d(dim, dim, 3, stride=2), nn.BatchNorm2d(dim), nn.GELU())
    return MultiLevelNeck(nn.Identity(), nn.Identity(), nn.Identity(), fourth)


class UPerHead(nn.Module):
    """mmseg's UPerHead (PPM + FPN) with its attribute names; forward(4 maps) -> logits at the finest map."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(top, channels, 1))
                                          for s in self.pool_scales])
        self.bottleneck = ConvModule(top + len(self.pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [resize(m(x), x.shape[-2:]) for m in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(feats[i]) for i, conv in enumerate(self.lateral_convs)] + [self.psp_forward(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add the coarser level, upsampled
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
        outs = [outs[0]] + [resize(o, outs[0].shape[-2:]) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """mmseg's FCNHead as the auxiliary head (num_convs=1, no input concat): ConvModule 3x3, Dropout2d, 1x1."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, padding=1))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


# Segmentation checkpoints hold one model (`model`, keys backbone.* / neck.* / decode_head.* /
# auxiliary_head.*); the backbone's blocks are the FSDP units.
FAMILY = register_family(FamilySpec(name="UPerNet", states=("model",), fsdp_block_types=(Block, CBlock),
                                    fsdp_forward_methods=("forward_train",)))


class UPerNet(nn.Module):
    """Backbone + neck + UPerHead (+ auxiliary FCN head in training); see the module docstring.

    `indices`: the 4 ViT blocks fed to the neck (default `vit_seg_indices(depth)`); the ViT's blocks after
    the last one, its final norm and its head are removed. A ConvViT always gives its 3 stages (no indices);
    its pooling norm and head are removed. `aux_weight` is only recorded here: `upernet_loss` applies it.
    """

    family_spec = FAMILY

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), aux_weight: float = 0.4, dropout: float = 0.1,
                 indices: Sequence[int] | None = None, aux_channels: int = 256, last_level: str = "maxpool") -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.aux_weight = float(aux_weight)
        kind = backbone_kind(backbone)
        if kind == "vit":
            self.kind = "vit"
            self.indices = tuple(indices) if indices is not None else vit_seg_indices(len(backbone.blocks))
            if len(self.indices) != 4:
                raise ValueError(f"UPerNet takes 4 ViT blocks, got indices {self.indices}")
            self.indices = tuple(backbone.prune_intermediate_layers(list(self.indices), prune_norm=True))
            dim = backbone.embed_dim
            in_channels = [dim] * 4
            self.stride = backbone.patch_size
            neck = vit_neck(dim)
        elif kind == "convvit":
            if indices is not None:
                raise ValueError("a ConvViT backbone gives its three stage outputs; indices apply to ViT backbones")
            self.kind, self.indices = "convvit", None
            for attr in ("norm", "fc_norm"):  # pooling norms: not used for dense features
                if getattr(backbone, attr, None) is not None:
                    setattr(backbone, attr, None)
            if isinstance(getattr(backbone, "head", None), nn.Linear):
                backbone.head = nn.Identity()
            c = backbone.feature_channels
            in_channels = [c[0], c[1], c[2], c[2]]
            self.stride = backbone.patch_size
            neck = convvit_neck(c[2], last_level)
        else:
            raise ValueError(f"UPerNet needs a ViT or ConvViT backbone, got {type(backbone).__name__}")
        self.backbone = backbone
        self.neck = neck
        self.decode_head = UPerHead(in_channels, channels, num_classes, pool_scales, dropout)
        self.auxiliary_head = FCNHead(in_channels[2], aux_channels, num_classes, dropout)

    # ---------------------------------------------------------------------------------------- forward
    def check_input(self, images: torch.Tensor) -> None:
        """(N, C, H, W), H and W multiples of the backbone stride and at least twice it (the stride-2x
        level of the pyramid must keep one position)."""
        s = self.stride
        if images.ndim != 4 or images.shape[-2] % s or images.shape[-1] % s \
                or images.shape[-2] < 2 * s or images.shape[-1] < 2 * s:
            raise ValueError(f"UPerNet expects images (N, C, H, W) with H and W multiples of {s} and at least "
                             f"{2 * s}, got {tuple(images.shape)}; check --input_size / --crop_size")

    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The 4 neck outputs (finest first)."""
        self.check_input(images)
        if self.kind == "vit":
            feats = self.backbone.forward_intermediates(images, indices=list(self.indices), norm=False,
                                                        output_fmt="NCHW", intermediates_only=True)
        else:
            feats = self.backbone.forward_intermediates(images)
            feats = [*feats, feats[-1]]
        return self.neck(feats)

    def forward(self, images: torch.Tensor, with_aux: bool = False) -> Any:
        """Logits (N, num_classes, H, W) at the input size (decode head only); `with_aux=True` gives
        `forward_train`'s pair, through forward() so DDP's gradient hooks see the call."""
        if with_aux:
            return self.forward_train(images)
        return resize(self.decode_head(self.extract_features(images)), images.shape[-2:])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's blocks in backward (memory at 512 px)."""
        self.backbone.set_grad_checkpointing(enable)

    def forward_train(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(decode-head logits, auxiliary-head logits), both (N, num_classes, H, W) at the input size."""
        feats = self.extract_features(images)
        size = images.shape[-2:]
        return resize(self.decode_head(feats), size), resize(self.auxiliary_head(feats[2]), size)

    # -------------------------------------------------------------------------- optimizer grouping
    @property
    def num_decay_layers(self) -> int:
        """Layer-decay depth as util.optim.param_groups_lrd reads it: backbone blocks + 1 (ConvViT: blocks3 + 1)."""
        n = getattr(self.backbone, "num_decay_layers", None)
        return n if isinstance(n, int) else len(self.backbone.blocks) + 1

    def layer_id(self, name: str, num_layers: int) -> int:
        """Layer-decay id of a parameter of this model: backbone parameters as their backbone
        (embeddings 0, block k -> k + 1; ConvViT's conv stages 0), neck and heads `num_layers` (full lr)."""
        if not name.startswith("backbone."):
            return num_layers
        inner = name[len("backbone."):]
        fn = getattr(self.backbone, "layer_id", None)
        return fn(inner, num_layers) if fn is not None else vit_layer_id(inner, num_layers)

    def no_weight_decay(self, compat: str | None = None) -> set[str]:
        """Full names exempt from weight decay besides 1-D tensors (biases, norms): the backbone's position
        table and cls token. `compat=MMSEG_WD_COMPAT` gives mmseg's set (empty: its prefix mismatch decays them)."""
        if compat == MMSEG_WD_COMPAT:
            return set()
        if compat is not None:
            raise ValueError(f"unknown weight-decay compat {compat!r}; the only one is {MMSEG_WD_COMPAT!r}")
        names = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        own = {n for n, _ in self.backbone.named_parameters()}
        return {f"backbone.{n}" for n in names if n in own}


def upernet_loss(logits: torch.Tensor, aux_logits: torch.Tensor | None, target: torch.Tensor,
                 aux_weight: float = 0.4, ignore_index: int = 255, class_weight: Sequence[float] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mmseg's UPerNet objective: CE(decode logits) + aux_weight * CE(auxiliary logits), in float32, averaged
    over the pixels whose label is not `ignore_index` (weighted by `class_weight` per class when given, as
    mmseg's CrossEntropyLoss(class_weight=...)). Returns (loss, {"loss_decode", "loss_aux"} detached)."""
    weight = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32, device=logits.device)
    decode = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index)
    scalars = {"loss_decode": decode.detach()}
    if aux_logits is None:
        return decode, scalars
    aux = F.cross_entropy(aux_logits.float(), target, weight=weight, ignore_index=ignore_index)
    scalars["loss_aux"] = aux.detach()
    return decode + aux_weight * aux, scalars


def backbone_kind(backbone: nn.Module) -> str | None:
    """'vit', 'convvit' or None (not an encoder UPerNet takes). Decided by structure rather than class, so a
    notebook that reloads models_vit / models_convmae (new class objects) still builds segmentors."""
    if not hasattr(backbone, "forward_intermediates") or hasattr(backbone, "decoder_embed"):
        return None
    if hasattr(backbone, "blocks3") and hasattr(backbone, "feature_channels"):
        return "convvit"
    if hasattr(backbone, "blocks") and hasattr(backbone, "prune_intermediate_layers") and hasattr(backbone, "embed_dim"):
        return "vit"
    return None


def build_segmentor(backbone_name: str, num_classes: int, img_size: int | Sequence[int],
                    drop_path_rate: float = 0.1, in_chans: int = 3, **kw: Any) -> UPerNet:
    """UPerNet on the registered backbone `backbone_name` (vit_base_patch16, vit_large_patch16,
    convvit_base_patch16, vit_micro_patch8 / convvit_micro_patch16 for tests), built at `img_size` (the
    position table's grid, so a loaded checkpoint's table is resized to it) with stochastic depth
    `drop_path_rate`; `kw` go to `UPerNet` (channels, pool_scales, aux_weight, dropout, indices,
    aux_channels, last_level). A name that is not a ViT / ConvViT encoder is a one-line UserError."""
    try:
        backbone = create_model(backbone_name, img_size=img_size, num_classes=0, drop_path_rate=drop_path_rate,
                                in_chans=in_chans)
    except TypeError as e:
        raise UserError(f"--model {backbone_name}: not a ViT / ConvViT encoder factory ({e}); use e.g. "
                        f"vit_base_patch16, vit_large_patch16 or convvit_base_patch16") from None
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"--model {backbone_name}: {e}") from None
    if backbone_kind(backbone) is None:
        raise UserError(f"--model {backbone_name}: UPerNet needs a ViT or ConvViT encoder (e.g. vit_base_patch16, "
                        f"convvit_base_patch16), not {type(backbone).__name__}; pretraining weights load into it "
                        f"with --finetune")
    try:
        return UPerNet(backbone, num_classes, **kw)
    except ValueError as e:
        raise UserError(f"--model {backbone_name}: {e}") from None


def load_backbone(segmentor: UPerNet, path: str, checkpoint_key: str | None = None, flag: str = "--finetune",
                  key_prefix: str | None = None, ckpt: Any = None) -> dict[str, Any]:
    """Load a pretraining (MAE / DMAE / ConvMAE / DConvMAE), finetuned-classifier or segmentation checkpoint
    into `segmentor.backbone` through util.checkpoint.load_pretrained_encoder: `module.` / `backbone.`
    prefixes stripped, decoder and other pretraining-only keys dropped, the position table resized to the
    backbone's grid, a checkpoint that does not fit the backbone refused with a one-line error naming
    `flag`. Returns its report (missing, unexpected, pos_embed_resized, preprocessing, ...)."""
    try:
        return load_pretrained_encoder(segmentor.backbone, path, checkpoint_key=checkpoint_key, ckpt=ckpt, flag=flag,
                                       key_prefix=key_prefix)
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        # e.g. a ViT table (cls row + square grid) offered to a ConvViT: the resize cannot read its grid
        raise CheckpointError(f"{flag} {path}: does not fit the {type(segmentor.backbone).__name__} backbone ({e}); "
                              f"pick the --model the checkpoint was trained with") from None
