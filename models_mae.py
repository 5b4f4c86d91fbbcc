"""Masked autoencoders: MAE (He et al.) and the deblurring MAE of DeblurringMAE.

`model(imgs, mask_ratio=0.75)` returns `(loss, pred, mask)` with the reference's semantics:
the encoder sees the visible patches, a light decoder predicts every patch, and the loss covers the
masked patches. A deblurring model (`dmae_*`) has the same keys and forward, but takes the blurred image
as input, the sharp image as target (`target=`), and averages the loss over all patches
(DeblurringMAE's loss: the whole image is to be restored, not only the masked part).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from models_vit import Block, VisionTransformer, run_blocks
from util.family import FamilySpec, register_family
from util.pos_embed import sincos_tensor
from util.registry import register, register_deprecated

LOSS_SCOPES = ("masked", "all")


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, h*p, w*p) -> (N, h*w, p*p*C), each patch ordered (row, col, channel) as in MAE."""
    n, c, hh, ww = imgs.shape
    if hh % p or ww % p:
        raise ValueError(f"image size {hh}x{ww} is not divisible by the patch size {p}")
    h, w = hh // p, ww // p
    x = imgs.reshape(n, c, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * w, p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int] | None = None, in_chans: int = 3) -> torch.Tensor:
    """Exact inverse of `patchify`; `grid` (h, w) defaults to a square grid."""
    n, num, _ = x.shape
    if grid is None:
        side = int(num ** 0.5)
        if side * side != num:
            raise ValueError(f"{num} patches do not form a square grid; pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    x = x.reshape(n, h, w, p, p, in_chans)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, in_chans, h * p, w * p)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (small noise = kept).

    Returns the visible tokens, the binary mask (N, L; 1 = removed) and ids_restore. When `noise` is
    None it is drawn here as `torch.rand(N, L)`, the only RNG draw of the pretraining forward, so the
    same seed gives the reference's mask.
    """
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    elif noise.shape != (n, length):
        raise ValueError(f"mask noise must have shape {(n, length)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore


def resolve_target(imgs: torch.Tensor, target: torch.Tensor | None, deblur: bool) -> torch.Tensor:
    """The reconstruction target: the input itself (MAE) or the sharp image (deblurring models)."""
    if target is None:
        if deblur:
            raise ValueError("a deblurring model needs the sharp image: model(blurred, target=sharp)")
        return imgs
    if target.shape != imgs.shape:
        raise ValueError(f"target shape {tuple(target.shape)} differs from input {tuple(imgs.shape)}")
    return target


def init_linear_and_norm(model: nn.Module) -> None:
    """MAE's module init: xavier-uniform Linear weights with zero bias, unit LayerNorms."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def pixel_target(imgs: torch.Tensor, p: int, norm_pix_loss: bool) -> torch.Tensor:
    """Patchified target; with norm-pix, each patch is standardised by its own mean and unbiased
    variance with 1e-6 inside the square root (as the MAE reference)."""
    target = patchify(imgs, p).float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


# What the shared checkpoint / resume / FSDP code needs to know about MAE (see util.family).
FAMILY = register_family(FamilySpec(
    name="MAE",
    resume_fields=("mask_ratio", "norm_pix_loss"),
    ignore_prefixes=("mask_token", "decoder_"),  # the decoder: a finetuned encoder has none
    fsdp_block_types=(Block,),                   # encoder and decoder blocks
))


class MaskedAutoencoderViT(VisionTransformer):
    """MAE with a ViT encoder (keys as the ViT's) and a narrow transformer decoder; key names
    are the reference's, so its released checkpoints load unchanged."""

    family_spec = FAMILY

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 loss_scope: str = "masked", deblur: bool = False, **_ignored) -> None:
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         pool="cls", fixed_sincos_pos_embed=True, norm_layer=norm_layer)
        if loss_scope not in LOSS_SCOPES:
            raise ValueError(f"loss_scope must be one of {LOSS_SCOPES}, got {loss_scope!r}")
        self.norm_pix_loss = norm_pix_loss
        self.loss_scope = loss_scope
        self.deblur = deblur
        num_patches = self.patch_embed.num_patches
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's initialisation (sin-cos tables, xavier Linear, N(0, .02) tokens); only matters for from-scratch parity.
        if self.pos_embed.is_meta:  # shape-only construction (tests, FLOP counting)
            return
        self.pos_embed.data.copy_(sincos_tensor(self.embed_dim, self.grid_size, cls_token=True))
        self.decoder_pos_embed.data.copy_(
            sincos_tensor(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        init_linear_and_norm(self)

    @property
    def num_patches(self) -> int:
        """Length of the masking noise per image (the pretraining data pipeline draws it)."""
        return self.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, tuple(self.grid_size), self.in_chans)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, mask, ids_restore = random_masking(self.embed(imgs), mask_ratio, noise)
        x = run_blocks(self.blocks, self.prepend_cls(x), self.grad_checkpointing)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1).to(x.dtype)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        x = run_blocks(self.decoder_blocks, x, self.grad_checkpointing)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, target_imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE in fp32, averaged over masked patches ('masked') or all patches ('all')."""
        target = pixel_target(target_imgs, self.patch_size, self.norm_pix_loss)
        loss = (pred.float() - target) ** 2
        if self.loss_scope == "all":
            return loss.mean()
        loss = loss.mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | torch.Tensor = 0.75,
                noise: torch.Tensor | None = None, target: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(mask_ratio, torch.Tensor):  # DeblurringMAE's call form: model(blurred, sharp, mask_ratio=r)
            target, mask_ratio = mask_ratio, 0.75
        target = resolve_target(imgs, target, self.deblur)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(target, pred, mask), pred, mask


# ------------------------------------------------------------------------------------------ factories
_DEBLUR = dict(deblur=True, loss_scope="all")


def _mae(patch_size: int, embed_dim: int, depth: int, num_heads: int, dec_dim: int = 512, dec_depth: int = 8,
         dec_heads: int = 16, **kw) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                decoder_embed_dim=dec_dim, decoder_depth=dec_depth, decoder_num_heads=dec_heads,
                                **kw)


_SIZES = {
    # name stem: (patch, D, depth, heads, decoder D, decoder depth, decoder heads)
    "vit_micro_patch8": (8, 64, 2, 4, 32, 1, 4),
    "vit_tiny_patch16": (16, 192, 12, 3, 128, 2, 4),
    "vit_tiny_patch8": (8, 192, 12, 3, 128, 2, 4),
    "vit_small_patch16": (16, 384, 12, 6, 256, 8, 8),  # the size CrossMAE's reference adds to models_mae
    "vit_base_patch16": (16, 768, 12, 12, 512, 8, 16),
    "vit_base_patch8": (8, 768, 12, 12, 512, 8, 16),
    "vit_base_patch28": (28, 768, 12, 12, 512, 8, 16),
    "vit_large_patch16": (16, 1024, 24, 16, 512, 8, 16),
    "vit_huge_patch14": (14, 1280, 32, 16, 512, 8, 16),
}


def _make_factory(name: str, size: tuple[int, ...], extra: dict):
    def factory(**kw) -> MaskedAutoencoderViT:
        return _mae(*size, **{**extra, **kw})
    factory.__name__ = name
    factory.__doc__ = f"{name}: patch {size[0]}, encoder {size[1]}/{size[2]}/{size[3]}, decoder {size[4]}/{size[5]}/{size[6]}"
    return factory


for _stem, _size in _SIZES.items():
    _reference_size = _size[4:] == (512, 8, 16)
    for _prefix, _extra in (("mae_", {}), ("dmae_", _DEBLUR)):
        _name = _prefix + _stem
        # The references name the full models `<stem>_dec512d8b`; the short name is their alias.
        _aliases = (_name + "_dec512d8b",) if _reference_size else ()
        register(*_aliases)(_make_factory(_name, _size, _extra))

register_deprecated(
    "mae_vit_large_patch16_cross_attention", "mae_vit_large_patch16",
    "USPEC's README names this model but its repository never defines it; the released USPEC weights are a "
    "plain MAE ViT-L/16. For a real cross-attention decoder use --model crossmae_vit_large_patch16 (or "
    "--model mae_vit_large_patch16 --cross_mae).", module=__name__)
