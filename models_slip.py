"""SLIP's image-text models: CLIP (image-text contrastive), SIMCLR (image-image) and SLIP (both).

Parameter names, shapes and registration order are those of SLIP's releases, so their checkpoints
(`state_dict` with a `module.` prefix) load strictly into these classes (`load_slip_state_dict`):

- `visual.*`: the ViT (cls token, learned position table, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,
  mlp.fc1,mlp.fc2}`, final `norm`, no head), our `models_vit.VisionTransformer` with `pool='cls'`; its
  output is the cls token after the final LayerNorm, as timm's ViT with `num_classes=0` gives it.
- text tower: `token_embedding`, `positional_embedding`, `transformer.resblocks.N.{ln_1, attn
  (nn.MultiheadAttention: in_proj_weight|bias holding q|k|v, out_proj), ln_2, mlp.c_fc, mlp.c_proj}`,
  `ln_final`, then `image_projection`, `text_projection`, `logit_scale`.
- SimCLR head: `image_mlp.{layer1,bn1,layer2,bn2,layer3}` (Linear, BN, ReLU, Linear, BN, ReLU, Linear).

The causal attention mask is a non-persistent buffer (not in the state dict, as in the releases, but it
follows the model to its device). LayerNorms of the text tower compute in fp32; the MLP uses QuickGELU
(x * sigmoid(1.702 x)), as CLIP was trained with.

The image MLP is built with plain BatchNorm1d (its keys are SyncBatchNorm's); a multi-GPU run converts it
with `nn.SyncBatchNorm.convert_sync_batchnorm`, as SLIP trains it (SyncBN needs a GPU backend).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

import models_vit  # noqa: F401  (registers the ViT factories, vit_small_mocov3_patch16 included)
from util.family import FamilySpec, register_family
from util.registry import create_model, register

TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                     transformer_layers=12)


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (the text tower's stability under fp16/bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that CLIP's text tower was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); tokens batch-first (N, L, W)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = LayerNormFp32(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = LayerNormFp32(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        mask = attn_mask.to(h.dtype) if attn_mask is not None else None
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """The stack of text blocks (`transformer.resblocks.N` in checkpoints)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


def build_image_mlp(in_dim: int, mlp_dim: int, out_dim: int) -> nn.Sequential:
    """SimCLR's projection MLP: Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear."""
    return nn.Sequential(OrderedDict([
        ("layer1", nn.Linear(in_dim, mlp_dim)), ("bn1", nn.BatchNorm1d(mlp_dim)), ("relu1", nn.ReLU(inplace=True)),
        ("layer2", nn.Linear(mlp_dim, mlp_dim)), ("bn2", nn.BatchNorm1d(mlp_dim)), ("relu2", nn.ReLU(inplace=True)),
        ("layer3", nn.Linear(mlp_dim, out_dim))]))


def _init_vit_linears(visual: nn.Module) -> None:
    """timm's ViT initialisation of the vision tower's Linear layers (truncated normal std .02, zero bias)."""
    for m in visual.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class CLIP(nn.Module):
    """Image and text towers with projections to a shared `embed_dim` space and a learned logit scale."""

    def __init__(self, embed_dim: int, vision_width: int, vision_model: nn.Module, context_length: int = 77,
                 vocab_size: int = 49408, transformer_width: int = 512, transformer_heads: int = 8,
                 transformer_layers: int = 12, siglip: bool = False) -> None:
        super().__init__()
        # Registration order is the releases' (optimizer param groups are positional).
        self.context_length = context_length
        self.vision_width = vision_width
        self.visual = vision_model
        self.transformer = TextTransformer(transformer_width, transformer_layers, transformer_heads)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNormFp32(transformer_width)
        self.image_projection = nn.Parameter(torch.empty(vision_width, embed_dim))
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        # CLIP starts at temperature 0.07; SigLIP's sigmoid loss at scale 10 with a bias of -10 (a learned
        # `logit_bias` exists only then, so SLIP's checkpoints keep their exact key set).
        self.logit_scale = nn.Parameter(torch.ones([]) * (math.log(10) if siglip else math.log(1 / 0.07)))
        if siglip:
            self.logit_bias = nn.Parameter(torch.full([], -10.0))
        # Position i attends to positions <= i: -inf strictly above the diagonal.
        causal = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", causal, persistent=False)
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """CLIP's initialisation: embeddings N(0,.02)/N(0,.01); attention in_proj std w^-1/2; the two
        residual outputs (out_proj, c_proj) std w^-1/2 (2 layers)^-1/2; c_fc std (2w)^-1/2; each projection
        std (its input width)^-1/2."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.image_projection, std=self.vision_width ** -0.5)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image) @ self.image_projection

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids (N, L <= context_length) -> (N, embed_dim): the final-LN feature at the position of
        each row's largest id (EOT, 49407, is the largest id in CLIP's vocabulary), projected."""
        length = text.shape[-1]
        if text.ndim != 2 or length > self.context_length:
            raise ValueError(f"text must be token ids (N, L) with L <= {self.context_length}, got {tuple(text.shape)}")
        x = self.token_embedding(text) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, self.attn_mask[:length, :length]))
        pooled = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        return pooled @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"image_embed": self.encode_image(image), "text_embed": self.encode_text(text),
               "logit_scale": self.logit_scale.exp()}
        if hasattr(self, "logit_bias"):
            out["logit_bias"] = self.logit_bias
        return out


class SIMCLR(nn.Module):
    """The vision tower and SimCLR's projection MLP; `forward(aug1, aug2)` embeds two views."""

    def __init__(self, vision_width: int, vision_model: nn.Module, ssl_mlp_dim: int = 4096,
                 ssl_emb_dim: int = 256) -> None:
        super().__init__()
        self.vision_width = vision_width
        self.visual = vision_model
        self.image_mlp = build_image_mlp(vision_width, ssl_mlp_dim, ssl_emb_dim)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)

    def forward(self, aug1: torch.Tensor, aug2: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"aug1_embed": self.image_mlp(self.visual(aug1)), "aug2_embed": self.image_mlp(self.visual(aug2))}


class SLIP(CLIP):
    """CLIP plus SimCLR's image MLP on two more views: the vision tower runs three times per step."""

    def __init__(self, ssl_mlp_dim: int = 4096, ssl_emb_dim: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_mlp = build_image_mlp(self.vision_width, ssl_mlp_dim, ssl_emb_dim)

    def forward(self, image: torch.Tensor, text: torch.Tensor, aug1: torch.Tensor | None = None,
                aug2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = super().forward(image, text)
        if (aug1 is None) != (aug2 is None):
            raise ValueError("SLIP needs both SimCLR views (aug1 and aug2) or neither")
        if aug1 is not None:
            out["aug1_embed"] = self.image_mlp(self.visual(aug1))
            out["aug2_embed"] = self.image_mlp(self.visual(aug2))
        return out


def _visual(vit_name: str, img_size: int = 224, drop_path_rate: float = 0.0) -> nn.Module:
    visual = create_model(vit_name, img_size=img_size, num_classes=0, pool="cls", drop_path_rate=drop_path_rate)
    _init_vit_linears(visual)
    return visual


# The vision towers: MoCo v3's ViT-S/16 (12 heads), ViT-B/16, ViT-L/16; and a test size.
_TOWERS = {"S": ("vit_small_mocov3_patch16", 384), "B": ("vit_base_patch16", 768), "L": ("vit_large_patch16", 1024),
           "MICRO": ("vit_micro_patch8", 64)}
MICRO_TEXT = dict(transformer_width=64, transformer_heads=4, transformer_layers=2)


def _build(kind: str, size: str, img_size: int = 224, drop_path_rate: float = 0.0, ssl_mlp_dim: int = 4096,
           ssl_emb_dim: int = 256, embed_dim: int = 512, **text: Any) -> nn.Module:
    """One factory body: SLIP's factories accept the SimCLR sizes for every kind (CLIP ignores them) and
    SLIP's embed_dim 512; `text` overrides the text tower (context_length, vocab_size, transformer_*) or
    sets `siglip=True` (a learned logit bias for the sigmoid loss)."""
    vit_name, width = _TOWERS[size]
    visual = _visual(vit_name, img_size, drop_path_rate)
    if kind == "SIMCLR":
        return SIMCLR(vision_width=width, vision_model=visual, ssl_mlp_dim=ssl_mlp_dim, ssl_emb_dim=ssl_emb_dim)
    tower = {**TEXT_DEFAULTS, **(MICRO_TEXT if size == "MICRO" else {}), **text}
    if kind == "CLIP":
        return CLIP(embed_dim=embed_dim, vision_width=width, vision_model=visual, **tower)
    return SLIP(embed_dim=embed_dim, vision_width=width, vision_model=visual, ssl_mlp_dim=ssl_mlp_dim,
                ssl_emb_dim=ssl_emb_dim, **tower)


@register()
def SLIP_VITS16(**kw: Any) -> SLIP:
    """SLIP (CLIP + SimCLR) with MoCo v3's ViT-S/16 (12 heads), vision width 384."""
    return _build("SLIP", "S", **kw)


@register()
def SLIP_VITB16(**kw: Any) -> SLIP:
    """SLIP (CLIP + SimCLR) with ViT-B/16, vision width 768."""
    return _build("SLIP", "B", **kw)


@register()
def SLIP_VITL16(**kw: Any) -> SLIP:
    """SLIP (CLIP + SimCLR) with ViT-L/16, vision width 1024."""
    return _build("SLIP", "L", **kw)


@register()
def CLIP_VITS16(**kw: Any) -> CLIP:
    """CLIP with MoCo v3's ViT-S/16 (12 heads); accepts and ignores the SimCLR sizes, as SLIP's does."""
    return _build("CLIP", "S", **kw)


@register()
def CLIP_VITB16(**kw: Any) -> CLIP:
    """CLIP with ViT-B/16; accepts and ignores the SimCLR sizes."""
    return _build("CLIP", "B", **kw)


@register()
def CLIP_VITL16(**kw: Any) -> CLIP:
    """CLIP with ViT-L/16; accepts and ignores the SimCLR sizes."""
    return _build("CLIP", "L", **kw)


@register()
def SIMCLR_VITS16(**kw: Any) -> SIMCLR:
    """SimCLR with MoCo v3's ViT-S/16 (12 heads) and the image MLP."""
    return _build("SIMCLR", "S", **kw)


@register()
def SIMCLR_VITB16(**kw: Any) -> SIMCLR:
    """SimCLR with ViT-B/16 and the image MLP."""
    return _build("SIMCLR", "B", **kw)


@register()
def SIMCLR_VITL16(**kw: Any) -> SIMCLR:
    """SimCLR with ViT-L/16 and the image MLP."""
    return _build("SIMCLR", "L", **kw)


@register()
def SLIP_VIT_MICRO(**kw: Any) -> SLIP:
    """Test size: ViT D 64 / depth 2 / patch 8, text width 64 / 2 layers, full vocabulary and context."""
    kw.setdefault("ssl_mlp_dim", 128)
    kw.setdefault("ssl_emb_dim", 32)
    kw.setdefault("embed_dim", 32)
    return _build("SLIP", "MICRO", **kw)


@register()
def CLIP_VIT_MICRO(**kw: Any) -> CLIP:
    """Test size CLIP: the micro towers of SLIP_VIT_MICRO, embed dim 32."""
    kw.setdefault("embed_dim", 32)
    return _build("CLIP", "MICRO", **kw)


@register()
def SIMCLR_VIT_MICRO(**kw: Any) -> SIMCLR:
    """Test size SimCLR: ViT D 64 / depth 2 / patch 8, image MLP 128 -> 32."""
    kw.setdefault("ssl_mlp_dim", 128)
    kw.setdefault("ssl_emb_dim", 32)
    return _build("SIMCLR", "MICRO", **kw)


def vision_tower_name(model_name: str) -> str | None:
    """The registered ViT that a SLIP/CLIP/SIMCLR factory uses as its vision tower (what finetuning or
    feature extraction builds for such a checkpoint), None for other names."""
    kind, _, size = model_name.partition("_VIT")
    if kind not in ("SLIP", "CLIP", "SIMCLR"):
        return None
    size = size.removesuffix("16") if size != "_MICRO" else "MICRO"
    return _TOWERS[size][0] if size in _TOWERS else None


def slip_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released SLIP/CLIP/SimCLR weight dict (keys `module.`-prefixed from DDP) with our keys."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_slip_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
    """Load a SLIP checkpoint's `state_dict` (with or without `module.`) into one of these models."""
    return model.load_state_dict(slip_state_dict(sd), strict=strict)


# The shared checkpoint / FSDP code's view of this family (util.family): one `model` state; the text
# blocks and the SimCLR MLP mark its checkpoints; each ViT block and each text block is an FSDP unit;
# encode_image / encode_text run the model outside forward().
FAMILY = register_family(FamilySpec(
    name="SLIP", states=("model",), markers=("resblocks", "image_mlp"),
    fsdp_block_types=(models_vit.Block, ResidualAttentionBlock),
    fsdp_forward_methods=("encode_image", "encode_text")))
CLIP.family_spec = FAMILY
SIMCLR.family_spec = FAMILY
