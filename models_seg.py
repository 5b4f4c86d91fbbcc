"""Dense-prediction decoders on a frozen ViT: VisionFM's `Unetr_Head`, a linear head, and their losses.

`Unetr_Head` keeps VisionFM's module names (`d1.deconv.*`, `s1.0.deconv.*`, `s1.1.layers.{0,1}.*`,
`c1.{0,1}.layers.*`, ..., `cls.*`: 134 tensors, 1.99 M parameters for D=768, C=1), so its decoder
checkpoints load strictly. It reads four intermediate token maps of the encoder (shallow -> deep, stride
16) and the input image, and returns logits at the image's resolution. `DenseDecoder` wraps a head and a
frozen encoder (features from `forward_intermediates`), or takes precomputed feature maps.

Losses follow MONAI's DiceFocalLoss / DiceCELoss with VisionFM's settings: one output channel is binary
(sigmoid), more channels are classes (softmax, target one-hot), Dice per image and channel (background
included, smooth 1e-5 on numerator and denominator) averaged, plus the focal term (MONAI's FocalLoss:
sigmoid focal on every channel of the one-hot target, mean over elements) or cross-entropy.
Landmark heatmaps use a softmax over the pixels of each channel against a normalised Gaussian target.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_TYPES = ("unetr", "linear")
# Blocks VisionFM feeds its segmentation decoders: ViT-B (12 blocks) and ViT-L (24 blocks).
SEG_BLOCK_INDICES: dict[int, tuple[int, ...]] = {12: (3, 5, 7, 11), 24: (5, 11, 17, 23)}
# Unetr_Head upsamples its deepest map four times by 2, so its features must have stride 16.
UNETR_STRIDE = 16


def seg_block_indices(depth: int) -> tuple[int, ...]:
    """The four encoder blocks a dense decoder reads: VisionFM's table for depth 12 and 24, otherwise four
    blocks spread evenly over the depth ending at the last one (depth 8 -> 1, 3, 5, 7)."""
    if depth in SEG_BLOCK_INDICES:
        return SEG_BLOCK_INDICES[depth]
    if depth < 4:
        raise ValueError(f"a dense decoder reads 4 distinct encoder blocks; this encoder has only {depth}")
    return tuple(round((i + 1) * depth / 4) - 1 for i in range(4))


class ConvBlock(nn.Module):
    """Conv 3x3 (padding 1) -> BatchNorm -> ReLU, under VisionFM's attribute name `layers`."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.BatchNorm2d(out_ch),
                                    nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DeconvBlock(nn.Module):
    """ConvTranspose 2x2, stride 2 (doubles the sides), under VisionFM's attribute name `deconv`."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deconv(x)


def _up_path(in_ch: int, width: int, times: int) -> nn.Sequential:
    """`times` x (DeconvBlock, ConvBlock): a stride-16 map brought up by 2**times at `width` channels."""
    layers: list[nn.Module] = []
    for i in range(times):
        layers += [DeconvBlock(in_ch if i == 0 else width, width), ConvBlock(width, width)]
    return nn.Sequential(*layers)


def _check_features(features: Sequence[torch.Tensor], image: torch.Tensor, embed_dim: int, levels: int,
                    stride: int | None) -> None:
    if len(features) != levels:
        raise ValueError(f"the decoder reads {levels} feature maps, got {len(features)}")
    for f in features:
        if f.ndim != 4 or f.shape[1] != embed_dim or f.shape[0] != image.shape[0]:
            raise ValueError(f"feature maps must be [B={image.shape[0]}, D={embed_dim}, h, w], got {tuple(f.shape)}")
        if stride is not None and (f.shape[-2] * stride, f.shape[-1] * stride) != tuple(image.shape[-2:]):
            raise ValueError(f"feature map {tuple(f.shape[-2:])} is not the image {tuple(image.shape[-2:])} / "
                             f"{stride}: Unetr_Head needs an encoder with patch size {stride} and an input "
                             f"size divisible by {stride}")


class Unetr_Head(nn.Module):  # noqa: N801  (VisionFM's class name)
    """UNETR-style 2-D decoder (VisionFM's Unetr_Head).

    features z3, z6, z9, z12 ([B, D, H/16, W/16], shallow -> deep) and the image [B, in_chans, H, W]:
    d1(z12) (H/8, 128) ++ s1(z9) -> c1; d2 (H/4, 64) ++ s2(z6) -> c2; d3 (H/2, 32) ++ s3(z3) -> c3;
    d4 (H, 16) ++ s4(image) -> c4 -> Dropout2d -> cls (1x1 conv to C). Output [B, C, H, W].
    """

    def __init__(self, embed_dim: int = 768, num_classes: int = 1, in_chans: int = 3, dropout: float = 0.3) -> None:
        super().__init__()
        self.embed_dim, self.num_classes, self.in_chans = embed_dim, num_classes, in_chans
        D = embed_dim
        self.d1 = DeconvBlock(D, 128)
        self.s1 = _up_path(D, 128, 1)
        self.c1 = nn.Sequential(ConvBlock(256, 128), ConvBlock(128, 128))
        self.d2 = DeconvBlock(128, 64)
        self.s2 = _up_path(D, 64, 2)
        self.c2 = nn.Sequential(ConvBlock(128, 64), ConvBlock(64, 64))
        self.d3 = DeconvBlock(64, 32)
        self.s3 = _up_path(D, 32, 3)
        self.c3 = nn.Sequential(ConvBlock(64, 32), ConvBlock(32, 32))
        self.d4 = DeconvBlock(32, 16)
        self.s4 = nn.Sequential(ConvBlock(in_chans, 16), ConvBlock(16, 16))
        self.c4 = nn.Sequential(ConvBlock(32, 16), ConvBlock(16, 16))
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(16, num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        _check_features(features, image, self.embed_dim, 4, UNETR_STRIDE)
        z3, z6, z9, z12 = features
        x = self.c1(torch.cat([self.d1(z12), self.s1(z9)], dim=1))
        x = self.c2(torch.cat([self.d2(x), self.s2(z6)], dim=1))
        x = self.c3(torch.cat([self.d3(x), self.s3(z3)], dim=1))
        s4 = self.s4(image)
        x = self.c4(torch.cat([self.d4(x).to(s4.dtype), s4], dim=1))
        return self.cls(self.dropout(x))


class LinearSegHead(nn.Module):
    """VisionFM's linear segmentation head: the levels concatenated on channels -> Conv 1x1 (levels*D -> C)
    -> bilinear upsampling to the image size."""

    def __init__(self, embed_dim: int, num_classes: int, num_levels: int = 4, patch_size: int = 16) -> None:
        super().__init__()
        self.embed_dim, self.num_classes, self.num_levels, self.patch_size = (embed_dim, num_classes, num_levels,
                                                                               patch_size)
        self.cls = nn.Conv2d(num_levels * embed_dim, num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        _check_features(features, image, self.embed_dim, self.num_levels, None)
        x = self.cls(torch.cat(list(features), dim=1))
        return F.interpolate(x, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)


def build_dense_head(head_type: str, embed_dim: int, num_outputs: int, patch_size: int = 16) -> nn.Module:
    """'unetr' -> Unetr_Head (needs patch size 16), 'linear' -> LinearSegHead over 4 levels."""
    if head_type == "unetr":
        if patch_size != UNETR_STRIDE:
            raise ValueError(f"--head_type unetr needs an encoder with patch size {UNETR_STRIDE} (it upsamples "
                             f"4 x 2); this one has {patch_size}: use --head_type linear")
        return Unetr_Head(embed_dim, num_outputs)
    if head_type == "linear":
        return LinearSegHead(embed_dim, num_outputs, 4, patch_size)
    raise ValueError(f"unknown --head_type {head_type!r}; choose one of {', '.join(HEAD_TYPES)}")


class DenseDecoder(nn.Module):
    """A dense head on the intermediate blocks of a frozen encoder (eval mode, no gradient, never trained),
    or on precomputed feature maps. Only `head` is trainable and saved."""

    def __init__(self, head: nn.Module, encoder: nn.Module | None = None,
                 indices: Sequence[int] | None = None) -> None:
        super().__init__()
        self.head = head
        self.encoder = encoder
        if encoder is not None:
            encoder.requires_grad_(False)
            encoder.eval()
            if indices is None:
                indices = seg_block_indices(len(encoder.blocks))
        self.indices = tuple(int(i) for i in indices) if indices is not None else None

    def train(self, mode: bool = True) -> "DenseDecoder":
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: its dropout/norm statistics never switch to training behaviour
        return self

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's normalised patch-token maps [B, D, H/p, W/p] of the chosen blocks, shallow -> deep."""
        if self.encoder is None:
            raise ValueError("this decoder has no encoder: pass the feature maps (features=...)")
        with torch.no_grad():
            return list(self.encoder.forward_intermediates(images, indices=list(self.indices), norm=True,
                                                           output_fmt="NCHW", intermediates_only=True))

    def forward(self, images: torch.Tensor, features: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        feats = self.features(images) if features is None else list(features)
        return self.head(feats, images)


def _probs_and_onehot(logits: torch.Tensor, target: torch.Tensor, num_classes: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 logits [B,C,H,W], probabilities (sigmoid for C=1, softmax otherwise), target [B,C,H,W]."""
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be [B, {num_classes}, H, W], got {tuple(logits.shape)}")
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"target must be [B, H, W] = {(logits.shape[0], *logits.shape[2:])}, got {tuple(target.shape)}")
    x = logits.float()
    if num_classes == 1:
        return x, torch.sigmoid(x), target[:, None].float()
    onehot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).float()
    return x, torch.softmax(x, dim=1), onehot


def _soft_dice_loss(p: torch.Tensor, t: torch.Tensor, smooth: float) -> torch.Tensor:
    """MONAI DiceLoss (batch=False, background included): mean over (b, c) of
    1 - (2 sum(p t) + smooth) / (sum p + sum t + smooth), sums over pixels."""
    inter = (p * t).sum(dim=(2, 3))
    denom = p.sum(dim=(2, 3)) + t.sum(dim=(2, 3))
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def sigmoid_focal_loss(logits: torch.Tensor, t: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """MONAI FocalLoss (sigmoid, no alpha): mean over elements of sigmoid(-x (2t-1))**gamma * BCE(x, t)."""
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    weight = torch.exp(gamma * F.logsigmoid(-logits * (2.0 * t - 1.0)))
    return (weight * bce).mean()


def dice_focal_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int, gamma: float = 2.0,
                    smooth: float = 1e-5) -> torch.Tensor:
    """Dice + focal (MONAI DiceFocalLoss as VisionFM sets it): logits [B,C,H,W]; target [B,H,W] 0/1 for C=1,
    class ids for C>1. Computed in float32."""
    x, p, t = _probs_and_onehot(logits, target, num_classes)
    return _soft_dice_loss(p, t, smooth) + sigmoid_focal_loss(x, t, gamma)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int, gamma: float = 2.0,
                 smooth: float = 1e-5) -> torch.Tensor:
    """Dice + cross-entropy (MONAI DiceCELoss): BCE with logits for C=1, softmax cross-entropy for C>1.
    `gamma` is accepted for a signature shared with dice_focal_loss and unused."""
    x, p, t = _probs_and_onehot(logits, target, num_classes)
    ce = F.binary_cross_entropy_with_logits(x, t) if num_classes == 1 else F.cross_entropy(x, target.long())
    return _soft_dice_loss(p, t, smooth) + ce


SEG_LOSSES = {"dice_focal": dice_focal_loss, "dice_ce": dice_ce_loss}


def heatmap_softmax_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a softmax over the pixels of each channel against the target heatmap (each channel
    sums to 1): mean over (b, k) of sum_hw -target * log_softmax(logits). An all-zero target channel (an
    absent landmark) is left out of the mean. float32."""
    if logits.shape != target.shape or logits.ndim != 4:
        raise ValueError(f"logits and heatmaps must both be [B, K, H, W], got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    t = target.float().flatten(2)
    per = -(t * torch.log_softmax(logits.float().flatten(2), dim=-1)).sum(-1)
    present = (t.sum(-1) > 0).float()
    return (per * present).sum() / present.sum().clamp_min(1.0)


def seg_predict_mask(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard mask [B,H,W] (long): sigmoid > 0.5 (logit > 0) for one channel, argmax over classes otherwise."""
    if num_classes == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)
