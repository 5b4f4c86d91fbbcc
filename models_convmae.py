"""ConvMAE (Gao et al.) and the deblurring ConvMAE of DeblurringMAE: a hybrid conv-transformer encoder.

ConvViT = two convolutional stages (stage `PatchEmbed` conv + `CBlock`s at 1/4 and 1/8 resolution) and
one transformer stage (`blocks3`, the shared `models_vit.Block`) on the 1/16 grid. Pretraining masks
the stage-3 grid with MAE's argsort-of-noise masking and carries the mask down to the conv stages:
each stage-3 token's mask value covers its block of the stage-1/2 maps, and `CBlock`
multiplies it in after `conv1`, before the depthwise conv, so masked pixels never reach a visible token.
Visible stage-3 tokens run through `blocks3`; stage-1/2 features, reduced to the stage-3 grid by the
fusion convs `stage{1,2}_output_decode`, are added at the visible ids before `norm`. The decoder is
MAE's without a cls token.

Key names, shapes and registration order are the reference's, so released ConvMAE and
DeblurringMAE checkpoints load without remapping. Unlike the reference (224-px input only), the stage grids
and mask up-sampling factors are derived from the input size; at 224 they are exactly 56/28/14.

Factories: `convmae_convvit_*` / `dconvmae_convvit_*` (pretraining; `d` = blurred in, sharp target,
loss over all patches, as `dmae_*`), `convvit_*` (finetune classifiers), and `*_micro_*` test sizes.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath, trunc_normal_
from torch.utils.checkpoint import checkpoint

from models_mae import FAMILY as MAE_FAMILY, LOSS_SCOPES, MaskedAutoencoderViT, init_linear_and_norm, patchify, random_masking, unpatchify
from models_vit import Block, run_blocks, run_blocks_collect, take_indices
from util.family import FamilySpec, register_family
from util.pos_embed import resize_pos_embed, sincos_tensor
from util.registry import register

logger = logging.getLogger("medfound")

# LayerNorm eps per component, as the reference: the conv stages use torch's default 1e-5, the transformer
# blocks, `norm`, `fc_norm` and the decoder use 1e-6.
CONV_LN_EPS = 1e-5
norm_layer = partial(nn.LayerNorm, eps=1e-6)

CONVVIT_POOLS = ("convvit_avg", "convvit_first")
# main_finetune's pooling flags -> ConvViT pooling
_POOL_ALIASES = {"mae_avg": "convvit_avg", "convvit_avg": "convvit_avg", "cls": "convvit_first",
                 "convvit_first": "convvit_first"}


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _ln_channels_last(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of an (N, C, H, W) map, as the reference (permute, LN, permute back)."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def upsample_mask(mask: torch.Tensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """(N, gh*gw) token mask -> (N, 1, gh*f, gw*f) map with element (f*i+a, f*j+b) = mask(i, j).

    At 224 this is exactly the reference's repeat/reshape/permute construction for the 56x56 (f=4) and
    28x28 (f=2) maps."""
    n = mask.shape[0]
    gh, gw = grid
    m = mask.reshape(n, gh, 1, gw, 1).expand(n, gh, factor, gw, factor)
    return m.reshape(n, 1, gh * factor, gw * factor)


class ConvPatchEmbed(nn.Module):
    """Stage patch embedding: Conv(k = s = p) with bias -> LayerNorm (eps 1e-5, channels-last) -> GELU.

    Keys `proj.*`, `norm.*` (reference registration order). Works on (N, C, H, W) maps throughout."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = _hw(img_size)
        self.patch_size = patch_size
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=CONV_LN_EPS)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"stage input {tuple(x.shape[-2:])} differs from the expected {self.img_size}")
        return self.project(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding of a map of any size the patch divides (no size check: dense prediction)."""
        return self.act(_ln_channels_last(self.norm, self.proj(x)))


class CMlp(nn.Module):
    """MLP of 1x1 convolutions: fc1 -> GELU -> fc2 (keys `fc1.*`, `fc2.*`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CBlock(nn.Module):
    """Conv block of stages 1-2:
    x + DropPath(conv2(dwconv5x5(visible * conv1(LN1(x))))), then x + DropPath(CMlp(LN2(x))).

    `visible` (N, 1, H, W; 1 = visible, None = no masking) is applied after `conv1` and before the
    depthwise conv (`attn`, the reference's name), so the 5x5 kernel never reads a masked position."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=CONV_LN_EPS)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=CONV_LN_EPS)
        self.mlp = CMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv1(_ln_channels_last(self.norm1, x))
        if visible is not None:
            y = y * visible.to(y.dtype)
        x = x + self.drop_path(self.conv2(self.attn(y)))
        return x + self.drop_path(self.mlp(_ln_channels_last(self.norm2, x)))


def run_cblocks(blocks: nn.ModuleList, x: torch.Tensor, visible: torch.Tensor | None,
                grad_checkpointing: bool) -> torch.Tensor:
    for blk in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, visible, use_reentrant=False)
        else:
            x = blk(x, visible)
    return x


# What the shared checkpoint / resume / FSDP code needs to know (see util.family): the ConvViT encoder
# (classifier) shards its conv-stage and transformer blocks; ConvMAE pretraining adds MAE's resume fields
# and its decoder, which includes the fusion convs that reduce stages 1-2 to the stage-3 grid.
CONVVIT_FAMILY = register_family(FamilySpec(name="ConvViT", fsdp_block_types=(CBlock, Block)))
FAMILY = register_family(FamilySpec(
    name="ConvMAE",
    resume_fields=MAE_FAMILY.resume_fields,
    ignore_prefixes=MAE_FAMILY.ignore_prefixes + ("stage1_output_decode", "stage2_output_decode"),
    fsdp_block_types=(CBlock, Block),
))


class ConvViTBackbone(nn.Module):
    """The three ConvViT stages shared by the pretraining model and the classifier.

    Registers, in the reference's order: `patch_embed1..3`, `patch_embed4` (Linear D->D on the stage-3
    tokens), the fusion convs when `fusion` (pretraining only), `pos_embed` (1, L, D) with no cls row,
    then `blocks1` / `blocks2` (CBlocks) and `blocks3` (ViT blocks). Drop-path is linear over all
    sum(depths) blocks, as the reference.
    """

    family_spec = CONVVIT_FAMILY

    def __init__(self, img_size: int | Sequence[int] = 224, patch_sizes: Sequence[int] = (4, 2, 2), in_chans: int = 3,
                 embed_dims: Sequence[int] = (256, 384, 768), depths: Sequence[int] = (2, 2, 11), num_heads: int = 12,
                 mlp_ratios: Sequence[float] = (4, 4, 4), drop_path_rate: float = 0.0, fusion: bool = False,
                 learnable_pos_embed: bool = True) -> None:
        super().__init__()
        if not (len(patch_sizes) == len(embed_dims) == len(depths) == len(mlp_ratios) == 3):
            raise ValueError("ConvViT needs three stages: patch_sizes, embed_dims, depths and mlp_ratios of length 3")
        img_hw = _hw(img_size)
        stride = patch_sizes[0] * patch_sizes[1] * patch_sizes[2]
        if img_hw[0] % stride or img_hw[1] % stride:
            raise ValueError(f"input size {img_hw[0]}x{img_hw[1]} is not divisible by the total stride {stride} of the "
                             f"ConvViT stages ({'x'.join(map(str, patch_sizes))}); use --input_size a multiple of "
                             f"{stride}")
        self.img_size = img_hw
        self.patch_sizes = tuple(patch_sizes)
        self.patch_size = stride  # total stride: the patch size of patchify / the loss
        self.in_chans = in_chans
        self.embed_dims = tuple(embed_dims)
        self.embed_dim = self.num_features = embed_dims[-1]
        self.grad_checkpointing = False
        grid1 = (img_hw[0] // patch_sizes[0], img_hw[1] // patch_sizes[0])
        grid2 = (grid1[0] // patch_sizes[1], grid1[1] // patch_sizes[1])
        self.patch_embed1 = ConvPatchEmbed(img_hw, patch_sizes[0], in_chans, embed_dims[0])
        self.patch_embed2 = ConvPatchEmbed(grid1, patch_sizes[1], embed_dims[0], embed_dims[1])
        self.patch_embed3 = ConvPatchEmbed(grid2, patch_sizes[2], embed_dims[1], embed_dims[2])
        self.grid_size = self.patch_embed3.grid_size
        self.stage_grids = (grid1, grid2, self.grid_size)
        # mask up-sampling factors: one stage-3 token covers f x f positions of the stage-1 / stage-2 map
        self.mask_factors = (patch_sizes[1] * patch_sizes[2], patch_sizes[2])
        self.patch_embed4 = nn.Linear(embed_dims[2], embed_dims[2])
        if fusion:
            f1, f2 = self.mask_factors
            self.stage1_output_decode = nn.Conv2d(embed_dims[0], embed_dims[2], f1, stride=f1)
            self.stage2_output_decode = nn.Conv2d(embed_dims[1], embed_dims[2], f2, stride=f2)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed3.num_patches, embed_dims[2]),
                                      requires_grad=learnable_pos_embed)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also under meta construction
        d1, d2 = depths[0], depths[0] + depths[1]
        self.blocks1 = nn.ModuleList([CBlock(embed_dims[0], mlp_ratios[0], dpr[i]) for i in range(depths[0])])
        self.blocks2 = nn.ModuleList([CBlock(embed_dims[1], mlp_ratios[1], dpr[d1 + i]) for i in range(depths[1])])
        self.blocks3 = nn.ModuleList([
            Block(embed_dims[2], num_heads, mlp_ratios[2], qkv_bias=True, drop_path=dpr[d2 + i], norm_layer=norm_layer)
            for i in range(depths[2])])

    @property
    def num_patches(self) -> int:
        """Stage-3 tokens: the length of the masking noise per image."""
        return self.patch_embed3.num_patches

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"model expects images of shape (N, {self.in_chans}, {self.img_size[0]}, "
                             f"{self.img_size[1]}), got {tuple(x.shape)}; check --input_size")

    def stage_visibility(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage-3 mask (N, L; 1 = removed) as visibility maps (1 = visible) for stages 1 and 2."""
        return (1 - upsample_mask(mask, self.grid_size, self.mask_factors[0]),
                1 - upsample_mask(mask, self.grid_size, self.mask_factors[1]))

    def forward_stages(self, x: torch.Tensor, mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Stage-3 tokens with pos_embed (N, L, D) for every position, plus the fusion features (N, L, D)
        of stages 1 and 2 (None without fusion convs). With `mask`, the conv stages are masked."""
        self.check_input(x)
        vis1, vis2 = self.stage_visibility(mask) if mask is not None else (None, None)
        fusion = hasattr(self, "stage1_output_decode")
        x = run_cblocks(self.blocks1, self.patch_embed1(x), vis1, self.grad_checkpointing)
        s1 = self.stage1_output_decode(x).flatten(2).transpose(1, 2) if fusion else None
        x = run_cblocks(self.blocks2, self.patch_embed2(x), vis2, self.grad_checkpointing)
        s2 = self.stage2_output_decode(x).flatten(2).transpose(1, 2) if fusion else None
        x = self.patch_embed4(self.patch_embed3(x).flatten(2).transpose(1, 2))
        return x + self.pos_embed, s1, s2

    # ------------------------------------------------------------------ dense prediction (any input size)
    @property
    def feature_channels(self) -> tuple[int, int, int]:
        """Channels of the three stage outputs (stride 4, 8, 16 for the 4/2/2 stages)."""
        return self.embed_dims

    @property
    def feature_strides(self) -> tuple[int, int, int]:
        """Strides of the three stage outputs relative to the input."""
        p = self.patch_sizes
        return (p[0], p[0] * p[1], p[0] * p[1] * p[2])

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's feature_info: one dict per stage output (num_chs, reduction, module)."""
        return [{"num_chs": c, "reduction": r, "module": m}
                for c, r, m in zip(self.feature_channels, self.feature_strides, ("blocks1", "blocks2", "blocks3"))]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's last LayerNorm on stage-3 tokens when the model has one (`norm`), else identity."""
        norm = getattr(self, "norm", None)
        return norm(x) if norm is not None else x

    def check_dense_input(self, x: torch.Tensor) -> None:
        """(N, C, H, W) with H and W multiples of the total stride (any size: the stage-3 position table is
        resized to the grid)."""
        s = self.patch_size
        if x.ndim != 4 or x.shape[1] != self.in_chans or not x.shape[-2] or not x.shape[-1] \
                or x.shape[-2] % s or x.shape[-1] % s:
            raise ValueError(f"model expects images of shape (N, {self.in_chans}, H, W) with H and W multiples of "
                             f"the total stride {s}, got {tuple(x.shape)}; check --input_size")

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = True) -> Any:
        """Multi-scale features for dense prediction, at any input size the total stride divides.

        `indices=None`: the three stage outputs [stage 1 (N, C1, H/4, W/4), stage 2 (N, C2, H/8, W/8),
        stage 3 after `blocks3` (N, C3, H/16, W/16)]. `indices` given (timm's meaning over `blocks3`: an int n =
        the last n blocks, a list = those blocks): the outputs of those stage-3 blocks, each (N, C3, H/16,
        W/16), as a ViT's `forward_intermediates` gives them. `norm` passes stage-3 maps through the final
        norm when the model has one. 'NLC' gives (N, h*w, C) instead of maps. Returns the intermediates alone
        when `intermediates_only`, else (final stage-3 tokens through the final norm, intermediates).
        Stage 3 equals the tokens `ConvViT.forward_features` computes at the built size (no fusion convs
        added: those belong to the pretraining objective).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self.check_dense_input(x)
        gc = self.grad_checkpointing
        s1 = run_cblocks(self.blocks1, self.patch_embed1.project(x), None, gc)
        s2 = run_cblocks(self.blocks2, self.patch_embed2.project(s1), None, gc)
        e3 = self.patch_embed3.project(s2)
        n, _, gh, gw = e3.shape
        pos = resize_pos_embed(self.pos_embed, (gh, gw), num_extra_tokens=0, old_grid=self.grid_size)
        tokens = self.patch_embed4(e3.flatten(2).transpose(1, 2)) + pos
        take = [] if indices is None else take_indices(len(self.blocks3), indices)
        last, kept = run_blocks_collect(self.blocks3, tokens, gc, take)
        if indices is None:
            stage3 = [self.final_norm(last) if norm else last]
            maps = [s1, s2]
        else:
            by_block = dict(zip(sorted(set(take)), kept))
            stage3 = [self.final_norm(by_block[i]) if norm else by_block[i] for i in take]
            maps = []
        if output_fmt == "NCHW":
            maps += [t.transpose(1, 2).reshape(n, -1, gh, gw) for t in stage3]
        else:
            maps = [m.flatten(2).transpose(1, 2) for m in maps] + stage3
        return maps if intermediates_only else (self.final_norm(last), maps)


class MaskedAutoencoderConvViT(ConvViTBackbone):
    """ConvMAE pretraining model; the contract of `models_mae.MaskedAutoencoderViT`:
    `forward(imgs, mask_ratio=0.75, noise=None, target=None) -> (loss, pred, mask)`."""

    family_spec = FAMILY

    def __init__(self, img_size: int | Sequence[int] = 224, patch_sizes: Sequence[int] = (4, 2, 2), in_chans: int = 3,
                 embed_dims: Sequence[int] = (256, 384, 768), depths: Sequence[int] = (2, 2, 11), num_heads: int = 12,
                 mlp_ratios: Sequence[float] = (4, 4, 4), decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, norm_pix_loss: bool = False, loss_scope: str = "masked",
                 deblur: bool = False, **_ignored) -> None:
        super().__init__(img_size=img_size, patch_sizes=patch_sizes, in_chans=in_chans, embed_dims=embed_dims,
                         depths=depths, num_heads=num_heads, mlp_ratios=mlp_ratios, fusion=True,
                         learnable_pos_embed=False)
        if loss_scope not in LOSS_SCOPES:
            raise ValueError(f"loss_scope must be one of {LOSS_SCOPES}, got {loss_scope!r}")
        self.norm_pix_loss = norm_pix_loss
        self.loss_scope = loss_scope
        self.deblur = deblur
        self.norm = norm_layer(embed_dims[-1])
        self.decoder_embed = nn.Linear(embed_dims[-1], decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, decoder_embed_dim), requires_grad=False)
        # the reference's decoder MLP ratio is that of stage 1 (8 for ConvMAE-L/H)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratios[0], qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * in_chans, bias=True)
        self._init_weights()

    def _init_weights(self) -> None:
        # ConvMAE's initialisation: sin-cos tables, xavier on patch_embed3.proj only (the
        # other convs keep torch's default), mask_token N(0, .02), Linear xavier / bias 0, LN 1 / 0.
        if self.pos_embed.is_meta:  # shape-only construction (tests, FLOP counting)
            return
        self.pos_embed.data.copy_(sincos_tensor(self.embed_dim, self.grid_size, cls_token=False))
        self.decoder_pos_embed.data.copy_(sincos_tensor(self.decoder_pos_embed.shape[-1], self.grid_size,
                                                        cls_token=False))
        w = self.patch_embed3.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.mask_token, std=0.02)
        init_linear_and_norm(self)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, tuple(self.grid_size), self.in_chans)

    def multiscale_masking(self, n: int, device: torch.device, mask_ratio: float,
                           noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MAE masking on the stage-3 grid, decided before any embedding.

        Returns (ids_keep, mask, ids_restore). `models_mae.random_masking` draws `torch.rand(N, L)` when
        `noise` is None, so a seed gives the reference's mask."""
        placeholder = torch.empty(n, self.num_patches, 0, device=device)  # only its shape is used
        visible, mask, ids_restore = random_masking(placeholder, mask_ratio, noise)
        ids_keep = torch.argsort(ids_restore, dim=1)[:, :visible.shape[1]]  # = ids_shuffle[:, :len_keep]
        return ids_keep, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids_keep, mask, ids_restore = self.multiscale_masking(imgs.shape[0], imgs.device, mask_ratio, noise)
        x, s1, s2 = self.forward_stages(imgs, mask)
        index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x, s1, s2 = (torch.gather(t, 1, index) for t in (x, s1, s2))
        x = run_blocks(self.blocks3, x, self.grad_checkpointing)
        return self.norm(x + s1 + s2), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length - x.shape[1], -1).to(x.dtype)
        x = torch.cat([x, mask_tokens], dim=1)  # no cls token
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2])) + self.decoder_pos_embed
        x = run_blocks(self.decoder_blocks, x, self.grad_checkpointing)
        return self.decoder_pred(self.decoder_norm(x))

    # The MAE objective and call forms (target=, DeblurringMAE's model(blurred, sharp), loss scopes, fp32
    # loss, norm-pix target) are shared with models_mae verbatim rather than re-implemented.
    forward_loss = MaskedAutoencoderViT.forward_loss
    forward = MaskedAutoencoderViT.forward


class ConvViT(ConvViTBackbone):
    """ConvViT classifier for finetuning (keys as Alpha-VL/ConvMAE models_convvit.py).

    Pooling: `convvit_avg` = fc_norm(mean of all stage-3 tokens) (keys `fc_norm.*`, the
    reference's global pool); `convvit_first` = norm(x)[:, 0], the first *patch* token since there is
    no cls token (the reference's global_pool=False quirk; keys `norm.*`). main_finetune's `mae_avg`
    and `cls` map onto them. `pos_embed` is learnable.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_sizes: Sequence[int] = (4, 2, 2), in_chans: int = 3,
                 num_classes: int = 1000, embed_dims: Sequence[int] = (256, 384, 768),
                 depths: Sequence[int] = (2, 2, 11), num_heads: int = 12, mlp_ratios: Sequence[float] = (4, 4, 4),
                 drop_path_rate: float = 0.0, pool: str = "convvit_avg") -> None:
        if pool not in _POOL_ALIASES:
            raise ValueError(f"pooling mode '{pool}' is not available for ConvViT; choose one of "
                             f"{sorted(_POOL_ALIASES)} (mae_avg = convvit_avg, cls = convvit_first)")
        super().__init__(img_size=img_size, patch_sizes=patch_sizes, in_chans=in_chans, embed_dims=embed_dims,
                         depths=depths, num_heads=num_heads, mlp_ratios=mlp_ratios, drop_path_rate=drop_path_rate,
                         fusion=False, learnable_pos_embed=True)
        self.pool = _POOL_ALIASES[pool]
        if self.pool == "convvit_first":
            logger.warning("ConvViT pooling '%s' -> convvit_first: the first *patch* token (ConvViT has no cls "
                           "token), the reference's global_pool=False quirk; prefer the average pool", pool)
        self.num_classes = num_classes
        dim = embed_dims[-1]
        # registration order as the reference: norm (cls-style only), head, then fc_norm
        self.norm = norm_layer(dim) if self.pool == "convvit_first" else None
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.fc_norm = norm_layer(dim) if self.pool == "convvit_avg" else None
        self._init_weights()

    def _init_weights(self) -> None:
        if self.pos_embed.is_meta:
            return
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @property
    def num_decay_layers(self) -> int:
        return len(self.blocks3) + 1

    @staticmethod
    def layer_id(name: str, num_layers: int) -> int:
        """ConvViT layer-decay ids (Alpha-VL/ConvMAE util/lr_decay.py): embeddings and both conv stages
        -> 0, blocks3.k -> k+1, the rest (norm, fc_norm, head) -> num_layers."""
        if name in ("cls_token", "pos_embed") or name.startswith(("patch_embed", "blocks1.", "blocks2.")):
            return 0
        if name.startswith("blocks3."):
            return int(name.split(".")[1]) + 1
        return num_layers

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-3 tokens (N, L, D) after blocks3; `norm` applied when the pool uses it."""
        x, _, _ = self.forward_stages(x)
        x = run_blocks(self.blocks3, x, self.grad_checkpointing)
        return self.norm(x) if self.norm is not None else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(x.mean(dim=1)) if self.pool == "convvit_avg" else x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------ factories
_DEBLUR = dict(deblur=True, loss_scope="all")

_SIZES = {
    # size: (embed dims, depths, heads, mlp ratios); stage patches 4/2/2 (total stride 16) throughout
    "micro": ((32, 48, 64), (1, 1, 2), 4, (4, 4, 4)),
    "base": ((256, 384, 768), (2, 2, 11), 12, (4, 4, 4)),
    "large": ((384, 768, 1024), (2, 2, 23), 16, (8, 8, 4)),
    "huge": ((768, 1024, 1280), (2, 2, 31), 16, (8, 8, 4)),
}
_DECODERS = {"micro": (32, 1, 4)}  # others: the reference's 512 / 8 / 16


def _make_pretrain(name: str, size: str, extra: dict):
    dims, depths, heads, mlp = _SIZES[size]
    dec = _DECODERS.get(size, (512, 8, 16))

    def factory(**kw) -> MaskedAutoencoderConvViT:
        return MaskedAutoencoderConvViT(embed_dims=dims, depths=depths, num_heads=heads, mlp_ratios=mlp,
                                        decoder_embed_dim=dec[0], decoder_depth=dec[1], decoder_num_heads=dec[2],
                                        **{**extra, **kw})
    factory.__name__ = name
    factory.__doc__ = f"{name}: ConvViT stages {dims} x {depths}, {heads} heads, decoder {dec[0]}/{dec[1]}/{dec[2]}"
    return factory


def _make_classifier(name: str, size: str):
    dims, depths, heads, mlp = _SIZES[size]

    def factory(global_pool: bool | None = None, **kw) -> ConvViT:
        # ConvMAE's finetune flag `--global_pool` maps onto pooling modes; an explicit `pool` wins.
        if "pool" not in kw:
            kw["pool"] = "convvit_avg" if global_pool in (None, True) else "convvit_first"
        kw.pop("drop_rate", None)  # accepted for timm-style call sites; the reference uses none
        return ConvViT(embed_dims=dims, depths=depths, num_heads=heads, mlp_ratios=mlp, **kw)
    factory.__name__ = name
    factory.__doc__ = f"{name}: ConvViT classifier, stages {dims} x {depths}, {heads} heads"
    return factory


for _size in _SIZES:
    for _prefix, _extra in (("convmae_", {}), ("dconvmae_", _DEBLUR)):
        _name = f"{_prefix}convvit_{_size}_patch16"
        # The references name the full models `<name>_dec512d8b`; the short name is their alias.
        register(*((_name + "_dec512d8b",) if _size != "micro" else ()))(_make_pretrain(_name, _size, _extra))
    register()(_make_classifier(f"convvit_{_size}_patch16", _size))
