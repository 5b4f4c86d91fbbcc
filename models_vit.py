"""Vision Transformer encoders and classifiers with the MAE / RETFound / USPEC key layout.

One ViT class serves every family: MAE pretraining subclasses it, finetuning uses it with a pooling mode
and a head. Key names and shapes are those of the MAE / RETFound releases (fused `qkv`, `blocks.{i}`,
`norm` or `fc_norm`, `head`) so published checkpoints load without remapping.

Attention is our own small layer rather than timm's because explanations need the attention
probabilities and their gradients; by default it runs through `F.scaled_dot_product_attention`.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from torch.utils.checkpoint import checkpoint

from util.family import FamilySpec, register_family
from util.pos_embed import resize_pos_embed, sincos_tensor
from util.registry import register

POOL_MODES = ("cls", "mae_avg", "retfound_v2_avg")


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (rows q|k|v, heads contiguous)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # When set, the explicit softmax path runs and keeps the probabilities (and their gradient)
        # for attention rollout / relevance propagation; SDPA never materialises them.
        self.keep_attn = False
        self.attn_probs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        drop = self.attn_drop if self.training else 0.0
        if self.keep_attn:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            if attn.requires_grad:
                attn.retain_grad()
            self.attn_probs = attn
            x = F.dropout(attn, drop, self.training) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    `init_values > 0` adds LayerScale as iBOT/CaiT define it: per-channel weights `gamma_1` / `gamma_2` [dim]
    (those key names), initialised to `init_values`, multiply each branch before the residual sum."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 act_layer: type[nn.Module] = nn.GELU, init_values: float = 0.0) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        if init_values > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


def take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's block selection: None = every block, an int n = the last n blocks, a sequence = those
    blocks (negative counts from the end). Returned as absolute indices in the order given."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n intermediates: n={indices} is outside 1..{num_blocks}")
        return list(range(num_blocks - indices, num_blocks))
    out = []
    for i in indices:
        j = num_blocks + int(i) if int(i) < 0 else int(i)
        if not 0 <= j < num_blocks:
            raise ValueError(f"block index {i} is outside the encoder's {num_blocks} blocks")
        out.append(j)
    return out


def run_blocks_collect(blocks: Sequence[nn.Module], x: torch.Tensor, grad_checkpointing: bool,
                       take: Sequence[int] = (), stop_early: bool = False
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """THE block loop: apply blocks in order (recomputing activations in backward when asked: memory
    for ViT-L/H) and keep the outputs of the blocks listed in `take`, in block order. `stop_early` skips
    the blocks after the last one taken (the returned final tokens are then that block's output)."""
    wanted = set(take)
    last = max(wanted) if (stop_early and wanted) else len(blocks) - 1
    kept = []
    for i, blk in enumerate(blocks):
        if i > last:
            break
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
        if i in wanted:
            kept.append(x)
    return x, kept


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """Apply blocks in order (`run_blocks_collect` keeping nothing)."""
    return run_blocks_collect(blocks, x, grad_checkpointing)[0]


class VisionTransformer(nn.Module):
    """ViT with a cls token; `pool` picks the features fed to `head`.

    - `cls`: norm(x)[:, 0]                         (keys `norm.*`)
    - `mae_avg`: fc_norm(mean(x[:, 1:]))            (keys `fc_norm.*`, no `norm.*`; MAE's --global_pool)
    - `retfound_v2_avg`: fc_norm(fc_norm(mean(...)))  RETFound v2/v3's double norm, kept for their weights

    Inputs of any size whose sides are multiples of the patch size run through `forward_features` and
    `forward_intermediates`: the position table is resized bicubically to the input's grid (cls row kept,
    `util.pos_embed.resize_pos_embed`, the function checkpoint loading uses too). The masked-autoencoder
    path (`embed`) keeps the built size, since its mask noise and decoder table have that grid.

    `masked_im_modeling=True` adds iBOT's `masked_embed` (1, D): `forward_features(x, mask)` replaces the
    patch embeddings where `mask` (N, h, w) is True by it before the position embeddings are added.
    """

    num_prefix_tokens = 1
    # Plain bicubic (no antialias), as MAE/RETFound use when loading a checkpoint at another size and iBOT
    # uses for its 96-px local crops: a table resized at run time equals the one a checkpoint loads with.
    # timm's runtime default is antialiased; set True on a subclass to match timm instead.
    pos_embed_antialias = False

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 0, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 pool: str = "cls", fixed_sincos_pos_embed: bool = False, masked_im_modeling: bool = False,
                 norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 init_values: float = 0.0) -> None:
        super().__init__()
        if pool not in POOL_MODES:
            raise ValueError(f"unknown pooling mode '{pool}'; choose one of {POOL_MODES}")
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_hw[0] % patch_size or img_hw[1] % patch_size:
            raise ValueError(f"input size {img_hw[0]}x{img_hw[1]} is not divisible by the patch size {patch_size}; "
                             f"use --input_size a multiple of {patch_size}")
        self.pool = pool
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self.masked_im_modeling = masked_im_modeling
        # Registration order mirrors the reference so optimizer param groups (keyed by position) built
        # from named_parameters() line up with the reference's optimizer states.
        self.patch_embed = PatchEmbed(img_hw, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.grid_size = self.patch_embed.grid_size
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim),
                                      requires_grad=not fixed_sincos_pos_embed)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, rate, depth)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i], norm_layer=norm_layer,
                  init_values=init_values)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim) if pool == "cls" else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.fc_norm = norm_layer(embed_dim) if pool != "cls" else None
        if masked_im_modeling:  # iBOT's parameter: same name, shape and zero initialisation
            self.masked_embed = nn.Parameter(torch.zeros(1, embed_dim))
        if self.pos_embed.is_meta:
            pass
        elif fixed_sincos_pos_embed:
            self.pos_embed.data.copy_(sincos_tensor(embed_dim, self.grid_size, cls_token=True))
        else:
            trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def check_input(self, x: torch.Tensor, fixed_size: bool = False) -> None:
        """(N, C, H, W) with H and W multiples of the patch size; exactly the built size when `fixed_size`."""
        expected = tuple(self.patch_embed.img_size)
        ok = x.ndim == 4 and x.shape[1] == self.in_chans
        if ok and fixed_size:
            ok = tuple(x.shape[-2:]) == expected
        elif ok:
            ok = x.shape[-2] > 0 and x.shape[-1] > 0 and not (x.shape[-2] % self.patch_size or
                                                              x.shape[-1] % self.patch_size)
        if not ok:
            sides = f"{expected[0]}, {expected[1]}" if fixed_size else \
                f"H, W) with H and W multiples of {self.patch_size} (built for {expected[0]}x{expected[1]}"
            raise ValueError(f"model expects images of shape (N, {self.in_chans}, {sides}), "
                             f"got {tuple(x.shape)}; check --input_size")

    def feature_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The token grid (h, w) of an input image batch."""
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def resized_pos_embed(self, grid: Sequence[int]) -> torch.Tensor:
        """The position table (1, 1 + h*w, D) for a token grid; the parameter itself at the built grid.
        Not cached: the table is trained, and resizing it costs little next to the blocks."""
        return resize_pos_embed(self.pos_embed, grid, num_extra_tokens=self.num_prefix_tokens,
                                old_grid=self.grid_size, antialias=self.pos_embed_antialias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embedding, no cls token: (N, L, D). Built size only: the
        masked-autoencoder path (mask noise and decoder table have the built grid)."""
        self.check_input(x, fixed_size=True)
        return self.patch_embed(x) + self.pos_embed[:, 1:, :]

    def prepend_cls(self, x: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        pos = self.pos_embed if pos_embed is None else pos_embed
        cls = (self.cls_token + pos[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def mask_tokens(self, x: torch.Tensor, mask: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """iBOT's token masking: patch embeddings (N, h*w, D) where `mask` (N, h, w) is True become
        `masked_embed` (position embeddings are added afterwards, to masked tokens too)."""
        if not self.masked_im_modeling:
            raise ValueError("a token mask needs a model built with masked_im_modeling=True (it adds masked_embed)")
        if mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], *grid):
            raise ValueError(f"token mask must be a bool tensor of shape {(x.shape[0], *tuple(grid))}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        return torch.where(mask.reshape(x.shape[0], -1, 1), self.masked_embed.to(x.dtype), x)

    def prepare_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """cls + patch tokens with position embeddings (N, 1 + h*w, D) for an image of any valid size."""
        self.check_input(x)
        grid = self.feature_grid(x)
        tokens = self.patch_embed(x)
        if mask is not None:
            tokens = self.mask_tokens(tokens, mask, grid)
        pos = self.resized_pos_embed(grid)
        return self.prepend_cls(tokens + pos[:, 1:, :], pos)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's last LayerNorm (`norm`), identity for average-pooled models (they have `fc_norm`)."""
        return self.norm(x) if self.norm is not None else x

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the blocks (N, 1+L, D); final `norm` applied when the pool uses it.
        `mask` (N, h, w) bool: iBOT's masked image modelling (see `mask_tokens`)."""
        x = run_blocks(self.blocks, self.prepare_tokens(x, mask), self.grad_checkpointing)
        return self.final_norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              output_dict: bool = False, mask: torch.Tensor | None = None) -> Any:
        """timm's `forward_intermediates`: the outputs of the blocks `indices` picks (int n = the last n,
        a list = those blocks, None = all), each through the final norm when `norm`.

        Intermediates hold the patch tokens only: (N, D, h, w) for 'NCHW', (N, h*w, D) for 'NLC'; with
        `return_prefix_tokens` each is a pair (patch tokens, cls tokens (N, 1, D)). Returns
        (final features = `forward_features(x)`, intermediates), the intermediates alone when
        `intermediates_only`, or timm's dict ('image_features', 'image_intermediates',
        'image_intermediates_prefix') when `output_dict`. `stop_early` skips the blocks after the last
        one taken (as timm, the final features are then that block's output through the final norm).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = take_indices(len(self.blocks), indices)
        n, grid = x.shape[0], self.feature_grid(x)
        tokens = self.prepare_tokens(x, mask)
        x, kept = run_blocks_collect(self.blocks, tokens, self.grad_checkpointing, take,
                                     stop_early=stop_early)
        by_block = dict(zip(sorted(set(take)), kept))
        inter = [self.final_norm(by_block[i]) if norm else by_block[i] for i in take]
        p = self.num_prefix_tokens
        prefix = [y[:, :p] for y in inter]
        inter = [y[:, p:] for y in inter]
        if output_fmt == "NCHW":
            inter = [y.reshape(n, *grid, -1).permute(0, 3, 1, 2).contiguous() for y in inter]
        if output_dict:
            out: dict[str, Any] = {"image_intermediates": inter}
            if return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.final_norm(x)
            return out
        if return_prefix_tokens:
            inter = list(zip(inter, prefix))
        return inter if intermediates_only else (self.final_norm(x), inter)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's pruning for a frozen feature extractor: drop the blocks after the last one `indices`
        takes, optionally the final norm, and the head (`fc_norm` becomes identity, no classifier)."""
        take = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max(take) + 1]
        if prune_norm and self.norm is not None:
            self.norm = nn.Identity()
        if prune_head:
            if self.fc_norm is not None:
                self.fc_norm = nn.Identity()
            self.head, self.num_classes = nn.Identity(), 0
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.pool == "cls":
            x = x[:, 0]
        else:
            x = self.fc_norm(x[:, 1:].mean(dim=1))
            if self.pool == "retfound_v2_avg":
                x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _vit(patch_size: int, embed_dim: int, depth: int, num_heads: int, global_pool: bool | None = None,
         **kwargs) -> VisionTransformer:
    # MAE's finetune flag `--global_pool` maps onto pooling modes; an explicit `pool` wins.
    if "pool" not in kwargs:
        kwargs["pool"] = "mae_avg" if global_pool in (None, True) else "cls"
    kwargs.pop("drop_rate", None)  # accepted for timm-style call sites; the reference ViT uses none
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)


@register()
def vit_micro_patch8(**kw) -> VisionTransformer:
    """Test-size ViT (D 64, depth 2): seconds per epoch on CPU."""
    return _vit(8, 64, 2, 4, **kw)


@register()
def vit_tiny_patch16(**kw) -> VisionTransformer:
    """ViT-Ti/16 (D 192, depth 12, 3 heads)."""
    return _vit(16, 192, 12, 3, **kw)


@register()
def vit_tiny_patch8(**kw) -> VisionTransformer:
    """ViT-Ti/8 (D 192, depth 12, 3 heads): the demo's encoder."""
    return _vit(8, 192, 12, 3, **kw)


@register()
def vit_small_patch16(**kw) -> VisionTransformer:
    """ViT-S/16 (D 384, depth 12, 6 heads)."""
    return _vit(16, 384, 12, 6, **kw)


@register("vit_small_mocov3_patch16_224")
def vit_small_mocov3_patch16(**kw) -> VisionTransformer:
    """MoCo v3's ViT-S/16 (D 384, depth 12, 12 heads instead of 6): the visual tower of SLIP's *_VITS16."""
    return _vit(16, 384, 12, 12, **kw)


@register()
def vit_base_patch16(**kw) -> VisionTransformer:
    """ViT-B/16 (D 768, depth 12, 12 heads)."""
    return _vit(16, 768, 12, 12, **kw)


@register()
def vit_base_patch8(**kw) -> VisionTransformer:
    """ViT-B/8 (D 768, depth 12, 12 heads)."""
    return _vit(8, 768, 12, 12, **kw)


@register()
def vit_base_patch28(**kw) -> VisionTransformer:
    """ViT-B/28 (D 768, depth 12, 12 heads)."""
    return _vit(28, 768, 12, 12, **kw)


@register("RETFound_mae")
def vit_large_patch16(**kw) -> VisionTransformer:
    """ViT-L/16 (D 1024, depth 24, 16 heads); RETFound_mae is its RETFound name."""
    return _vit(16, 1024, 24, 16, **kw)


@register()
def vit_huge_patch14(**kw) -> VisionTransformer:
    """ViT-H/14 (D 1280, depth 32, 16 heads)."""
    return _vit(14, 1280, 32, 16, **kw)


# What the shared checkpoint / FSDP code needs to know about the ViT (see util.family): a classifier
# loading another ViT's weights ignores a final `norm` it replaces by `fc_norm` (average pooling) and the
# masked-image-modelling token `masked_embed`; every transformer block is an FSDP unit.
FAMILY = register_family(FamilySpec(name="ViT", ignore_prefixes=("norm.", "masked_embed"), fsdp_block_types=(Block,)))
VisionTransformer.family_spec = FAMILY
