"""CrossMAE (Fu et al., "Rethinking Patch Dependence for Masked Autoencoders", TMLR 2025).

The encoder is MAE's (same keys, same argsort-of-noise masking) minus the final `norm`. The decoder is a
stack of blocks in which one query per *predicted* patch (`mask_token` + its decoder position embedding)
cross-attends to the encoder tokens. There is no `decoder_embed` and, by default, no self-attention among
the queries, so every query is decoded independently of the others. Each decoder block reads its own
learned, unconstrained mixture of the encoder blocks' outputs (`wfm`), normalised by its own LayerNorm
(`dec_norms[i]`). Only a fraction of the patches (`kept_mask_ratio`, a fraction of ALL patches) is
reconstructed in training, which is where the speed comes from.

Forward contract (same call as MAE): `model(imgs, mask_ratio=0.75, noise=None, target=None,
kept_mask_ratio=None) -> (loss, pred, mask)`:
- `loss`: fp32 mean squared error over the *predicted* patches only (visible and hidden-but-unpredicted
  patches never enter it); norm-pix targets as MAE.
- `pred`: (N, L, p*p*C), full length in raster order like MAE's, holding the prediction at predicted
  patches and **zeros elsewhere** (the reference's `vis=True` output).
- `mask`: (N, L), **1 = predicted** (= in the loss), 0 = visible or hidden-but-unpredicted.
  With `kept_mask_ratio == mask_ratio` (the default) this is exactly MAE's mask. `partial_masks()` also
  returns the `hidden` mask (every patch the encoder does not see).
- `reconstruct_all(imgs, mask_ratio, noise, target)` decodes every masked patch (kept = mask) and returns
  the same triple; pictures use it so that no hidden patch is left blank.

Deblurring input: `target=` takes the sharp image (the `dcrossmae_*` names require it), as in models_mae;
the loss still covers the predicted patches only.
"""
from __future__ import annotations

import argparse
import logging
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from torch.utils.checkpoint import checkpoint

from models_mae import FAMILY as MAE_FAMILY, MaskedAutoencoderViT, pixel_target, random_masking, resolve_target
from models_vit import Attention, Block, VisionTransformer, run_blocks_collect
import crossmae_args
from util.cli import UserError
from util.family import FamilySpec, register_family
from util.registry import register

logger = logging.getLogger("medfound")


# ------------------------------------------------------------------------------------------ masking
def partial_masking(noise: torch.Tensor, mask_ratio: float, kept_mask_ratio: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Visible and predicted patch indices from MAE's masking noise.

    In noise-sorted order (small = kept, as MAE) the first `int(L*(1-mask_ratio))` patches are visible,
    the next `int(L*(mask_ratio-kept_mask_ratio))` are hidden but not predicted, and the rest are
    predicted. Returns (ids_keep in noise order, ids_pred in raster order).
    """
    _, length = noise.shape
    check_ratios(mask_ratio, kept_mask_ratio)
    visible = int(length * (1 - mask_ratio))
    skipped = int(length * (mask_ratio - kept_mask_ratio))
    if visible + skipped >= length:
        raise ValueError(f"kept_mask_ratio {kept_mask_ratio} leaves no patch to predict out of {length}")
    ids_shuffle = torch.argsort(noise, dim=1)
    return ids_shuffle[:, :visible], ids_shuffle[:, visible + skipped:].sort(dim=1).values


def partial_masks(noise: torch.Tensor, mask_ratio: float, kept_mask_ratio: float | None = None
                  ) -> dict[str, torch.Tensor]:
    """Binary (N, L) masks of one draw: `predicted` (the returned `mask`, in the loss), `hidden` (every
    patch the encoder does not see, = MAE's mask) and `visible`."""
    kept = mask_ratio if kept_mask_ratio is None else kept_mask_ratio
    ids_keep, ids_pred = partial_masking(noise, mask_ratio, kept)
    visible = torch.zeros_like(noise).scatter_(1, ids_keep, 1.0)
    predicted = torch.zeros_like(noise).scatter_(1, ids_pred, 1.0)
    return {"predicted": predicted, "hidden": 1.0 - visible, "visible": visible}


def check_ratios(mask_ratio: float, kept_mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if not 0.0 < kept_mask_ratio <= mask_ratio + 1e-9:
        raise ValueError(f"kept_mask_ratio ({kept_mask_ratio}) must be in (0, mask_ratio={mask_ratio}]: it is the "
                         f"fraction of ALL patches reconstructed, chosen among the masked ones")


def resolve_use_fm(use_fm: Sequence[int | str] | str, depth: int) -> list[int]:
    """CrossMAE's `--use_fm`: exactly [-1] (or 'all') = every encoder block; other negatives count from
    the end. Returned sorted (features are collected in block order); duplicates are an error
    (the reference asserts on them)."""
    items = [use_fm] if isinstance(use_fm, (str, int)) else list(use_fm)
    if [str(i).strip().lower() for i in items] in (["-1"], ["all"]):
        return list(range(depth))
    out = []
    for i in items:
        try:
            j = int(i)
        except ValueError:
            raise ValueError(f"use_fm entries must be block indices or 'all', got {i!r}") from None
        j = j + depth if j < 0 else j
        if not 0 <= j < depth:
            raise ValueError(f"use_fm index {i} is outside the encoder's {depth} blocks")
        out.append(j)
    if len(set(out)) != len(out):
        raise ValueError(f"use_fm lists an encoder block twice: {list(items)} (resolved {out}, depth {depth})")
    if not out:
        raise ValueError("use_fm selects no encoder block")
    return sorted(out)


# ------------------------------------------------------------------------------------------ modules
class CrossAttention(nn.Module):
    """Queries (decoder width Dd) attend to keys/values projected from encoder tokens (width D).

    Keys `q` [Dd, Dd], `kv` [2Dd, D] (rows k | v, heads contiguous in each) and `proj`."""

    def __init__(self, encoder_dim: int, decoder_dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        if decoder_dim % num_heads:
            raise ValueError(f"decoder dim {decoder_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = decoder_dim // num_heads
        self.q = nn.Linear(decoder_dim, decoder_dim, bias=qkv_bias)
        self.kv = nn.Linear(encoder_dim, 2 * decoder_dim, bias=qkv_bias)
        self.proj = nn.Linear(decoder_dim, decoder_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(y).reshape(b, y.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class CrossAttentionBlock(nn.Module):
    """Pre-norm decoder block: [x + self_attn(norm0(x))], x + cross_attn(norm1(x), y), x + mlp(norm2(x)).

    `y` arrives already normalised (by `dec_norms[i]` or the encoder's `norm`)."""

    def __init__(self, encoder_dim: int, decoder_dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, self_attn: bool = False,
                 norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6)) -> None:
        super().__init__()
        # Registration order as the reference (norm0, self_attn, norm1, cross_attn, norm2, mlp).
        self.norm0 = norm_layer(decoder_dim) if self_attn else None
        self.self_attn = Attention(decoder_dim, num_heads=num_heads, qkv_bias=qkv_bias) if self_attn else None
        self.norm1 = norm_layer(decoder_dim)
        self.cross_attn = CrossAttention(encoder_dim, decoder_dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(decoder_dim)
        self.mlp = Mlp(in_features=decoder_dim, hidden_features=int(decoder_dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.self_attn is not None:
            x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class WeightedFeatureMaps(nn.Module):
    """`linear` (k -> decoder depth, no bias): decoder block i reads sum_j W[i, j] * feature_j.

    Unconstrained weights: no softmax, no normalisation, negatives allowed."""

    def __init__(self, k: int, decoder_depth: int) -> None:
        super().__init__()
        self.linear = nn.Linear(k, decoder_depth, bias=False)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """k tensors (N, T, D) -> (decoder_depth, N, T, D): one mixture per decoder block."""
        if len(features) != self.linear.in_features:
            raise ValueError(f"{len(features)} feature maps for {self.linear.in_features} mixing weights")
        stacked = torch.stack(list(features), dim=0)
        w = self.linear.weight.to(stacked.dtype)
        return (w @ stacked.flatten(1)).view(w.shape[0], *stacked.shape[1:])


# ------------------------------------------------------------------------------------------ model
class CrossMaskedAutoencoderViT(VisionTransformer):
    """MAE encoder (keys as the ViT's, no final `norm` when mixing) + CrossMAE decoder.

    `weight_fm=False` is medfound's non-mixing mode (the reference crashes there: it never builds `norm`):
    final `norm` on the last block's output feeds every decoder block; it adds `norm.*` keys and has no
    reference weights.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 12,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 kept_mask_ratio: float | None = None, weight_fm: bool = True,
                 use_fm: Sequence[int | str] | str = (-1,), use_input: bool = True, self_attn: bool = False,
                 deblur: bool = False) -> None:
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         pool="cls", fixed_sincos_pos_embed=True, norm_layer=norm_layer)
        if decoder_depth < 1:
            raise ValueError(f"decoder_depth must be >= 1, got {decoder_depth}")
        self.norm_pix_loss = norm_pix_loss
        self.kept_mask_ratio = kept_mask_ratio
        self.deblur = deblur
        self.weight_fm = weight_fm
        self.decoder_self_attn = self_attn
        self.decoder_depth = decoder_depth
        if weight_fm:
            self.norm = None  # the mixing encoder has no final LayerNorm (no `norm.*` keys)
            self.use_fm = resolve_use_fm(use_fm, depth)
            self.use_input = use_input
            self.dec_norms = nn.ModuleList([norm_layer(embed_dim) for _ in range(decoder_depth)])
            self.wfm = WeightedFeatureMaps(len(self.use_fm) + int(use_input), decoder_depth)
        else:
            self.use_fm, self.use_input = [depth - 1], False
            self.dec_norms, self.wfm = None, None
        num_patches = self.patch_embed.num_patches
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            CrossAttentionBlock(embed_dim, decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                                self_attn=self_attn, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        # MAE's initialisation (sin-cos tables, xavier Linear incl. `wfm.linear`, normal(0.02) tokens);
        # skipped on meta tensors. The reference's N(0, 1/sqrt(k)) for `wfm` is overwritten the same way.
        MaskedAutoencoderViT._init_weights(self)

    # MAE's helpers, shared rather than re-written.
    num_patches = MaskedAutoencoderViT.num_patches
    patchify = MaskedAutoencoderViT.patchify
    unpatchify = MaskedAutoencoderViT.unpatchify

    def resolve_kept(self, mask_ratio: float, kept_mask_ratio: float | None) -> float:
        """Call argument, else the model's setting, else `mask_ratio` (reconstruct every masked patch)."""
        kept = kept_mask_ratio if kept_mask_ratio is not None else self.kept_mask_ratio
        kept = mask_ratio if kept is None else kept
        check_ratios(mask_ratio, kept)
        return kept

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor
                        ) -> list[torch.Tensor]:
        """Visible tokens (with cls) through the blocks; returns the features the decoder reads:
        [input?] + outputs of the `use_fm` blocks (mixing mode), or [norm(last output)]."""
        x, _, _ = random_masking(self.embed(imgs), mask_ratio, noise)  # MAE's visible set, exactly
        x = self.prepend_cls(x)
        feats = [x] if self.weight_fm and self.use_input else []
        # The ViT's one block loop, keeping the `use_fm` blocks' outputs (in block order, cls included).
        x, kept = run_blocks_collect(self.blocks, x, self.grad_checkpointing, self.use_fm if self.weight_fm else ())
        return feats + kept if self.weight_fm else [self.norm(x)]

    def decoder_queries(self, ids_pred: torch.Tensor) -> torch.Tensor:
        """One query per predicted patch, raster order: mask_token + decoder_pos_embed[1 + patch]."""
        return self.mask_token + self.decoder_pos_embed[0, 1:][ids_pred]

    def forward_decoder(self, feats: Sequence[torch.Tensor], queries: torch.Tensor) -> torch.Tensor:
        """(N, P, Dd) queries -> (N, P, p*p*C) predictions."""
        mixed = self.wfm(feats) if self.weight_fm else None
        x = queries
        for i, blk in enumerate(self.decoder_blocks):
            y = self.dec_norms[i](mixed[i]) if self.weight_fm else feats[0]
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, y, use_reentrant=False)
            else:
                x = blk(x, y)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, target_imgs: torch.Tensor, pred: torch.Tensor, ids_pred: torch.Tensor) -> torch.Tensor:
        """fp32 MSE over the predicted patches only."""
        target = pixel_target(target_imgs, self.patch_size, self.norm_pix_loss)
        target = torch.gather(target, 1, ids_pred.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        return ((pred.float() - target) ** 2).mean()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | torch.Tensor = 0.75, noise: torch.Tensor | None = None,
                target: torch.Tensor | None = None, kept_mask_ratio: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(mask_ratio, torch.Tensor):  # DeblurringMAE's call form: model(blurred, sharp, mask_ratio=r)
            target, mask_ratio = mask_ratio, 0.75
        n, length = imgs.shape[0], self.num_patches
        if noise is None:  # the only RNG draw of the forward, as MAE: same seed, same visible set
            noise = torch.rand(n, length, device=imgs.device)
        elif noise.shape != (n, length):
            raise ValueError(f"mask noise must have shape {(n, length)}, got {tuple(noise.shape)}")
        noise = noise.to(imgs.device)
        target = resolve_target(imgs, target, self.deblur)
        kept = self.resolve_kept(mask_ratio, kept_mask_ratio)
        _, ids_pred = partial_masking(noise, mask_ratio, kept)
        feats = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(feats, self.decoder_queries(ids_pred))
        loss = self.forward_loss(target, pred, ids_pred)
        index = ids_pred.unsqueeze(-1).expand(-1, -1, pred.shape[-1])
        full = pred.new_zeros(n, length, pred.shape[-1]).scatter(1, index, pred)
        mask = torch.zeros(n, length, device=imgs.device).scatter_(1, ids_pred, 1.0)
        return loss, full, mask

    def reconstruct_all(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                        target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode every masked patch (kept = mask), whatever ratio was used in training: for pictures.
        Without decoder self-attention this decodes the training-time predicted patches identically."""
        return self.forward(imgs, mask_ratio=mask_ratio, noise=noise, target=target, kept_mask_ratio=mask_ratio)


# ------------------------------------------------------------------------------------------ factories
_SIZES = {
    # name stem: (patch, D, depth, heads, decoder D, decoder depth, decoder heads); depth 12 = released recipe
    "vit_micro_patch8": (8, 64, 2, 4, 32, 1, 4),
    "vit_tiny_patch16": (16, 192, 12, 3, 128, 2, 4),
    "vit_tiny_patch8": (8, 192, 12, 3, 128, 2, 4),
    "vit_small_patch16": (16, 384, 12, 6, 256, 12, 8),
    "vit_base_patch16": (16, 768, 12, 12, 512, 12, 16),
    "vit_base_patch8": (8, 768, 12, 12, 512, 12, 16),
    "vit_base_patch28": (28, 768, 12, 12, 512, 12, 16),
    "vit_large_patch16": (16, 1024, 24, 16, 512, 12, 16),
    "vit_huge_patch14": (14, 1280, 32, 16, 512, 12, 16),
}
PREFIXES = {"crossmae_": {}, "dcrossmae_": {"deblur": True}}  # CrossMAE name prefix -> constructor extras
_MAE_PREFIX = {"mae_": "crossmae_", "dmae_": "dcrossmae_"}   # `--model mae_vit_X --cross_mae`


def _make_factory(name: str, size: tuple[int, ...], extra: dict):
    def factory(**kw) -> CrossMaskedAutoencoderViT:
        p, d, depth, heads, dd_dim, dd, dd_heads = size
        kw = {"decoder_depth": dd, **extra, **kw}
        return CrossMaskedAutoencoderViT(patch_size=p, embed_dim=d, depth=depth, num_heads=heads,
                                         decoder_embed_dim=dd_dim, decoder_num_heads=dd_heads, **kw)
    factory.__name__ = name
    factory.__doc__ = (f"{name}: patch {size[0]}, encoder {size[1]}/{size[2]}/{size[3]}, cross decoder "
                       f"{size[4]}/{size[5]}/{size[6]} (released recipe: mixing all blocks + input)")
    return factory


for _stem, _size in _SIZES.items():
    for _prefix, _extra in PREFIXES.items():
        register()(_make_factory(_prefix + _stem, _size, _extra))


_REGISTERED = {p + s for s in _SIZES for p in PREFIXES}


def is_crossmae(model_name: str) -> bool:
    return model_name.startswith(tuple(PREFIXES))


# ------------------------------------------------------------------------------------------ checkpoints
def decoder_family(state_dict: dict[str, Any]) -> str | None:
    """'crossmae', 'mae' or None (encoder only) from a checkpoint's keys."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict]
    if any(k.startswith(("decoder_blocks.0.cross_attn.", "wfm.")) for k in keys):
        return "crossmae"
    if any(k in ("decoder_blocks.0.attn.qkv.weight", "decoder_embed.weight") for k in keys):
        return "mae"
    return None


def kwargs_from_state_dict(state_dict: dict[str, Any], args: dict | argparse.Namespace | None = None
                           ) -> dict[str, Any]:
    """Constructor switches of a CrossMAE checkpoint: decoder depth from the block indices, decoder
    self-attention from `norm0` keys, `use_input`/`use_fm` from the stored args when present, else from
    k = wfm.linear.weight.shape[1] (depth + 1: all blocks + input; depth: all blocks). Raises ValueError
    when that is ambiguous, so a tool asks for explicit flags instead of guessing."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if decoder_family(sd) != "crossmae":
        raise ValueError("not a CrossMAE checkpoint (no decoder_blocks.*.cross_attn / wfm keys)")
    index = lambda prefix: {int(k.split(".")[1]) for k in sd if k.startswith(prefix)}  # noqa: E731
    depth, dd = len(index("blocks.")), max(index("decoder_blocks.")) + 1
    kw: dict[str, Any] = {"decoder_depth": dd, "self_attn": any(".norm0." in k for k in sd),
                          "weight_fm": "wfm.linear.weight" in sd}
    if not kw["weight_fm"]:
        return kw
    a = vars(args) if isinstance(args, argparse.Namespace) else (args or {})
    k = sd["wfm.linear.weight"].shape[1]
    if "use_input" in a and "use_fm" in a:
        kw.update(use_input=bool(a["use_input"]), use_fm=list(a["use_fm"]))
    elif k == depth + 1:
        kw.update(use_input=True, use_fm=[-1])
    elif k == depth:
        kw.update(use_input=False, use_fm=[-1])
    else:
        raise ValueError(f"wfm mixes {k} features of a {depth}-block encoder and the checkpoint stores no "
                         f"use_input/use_fm: pass them explicitly")
    return kw


# ------------------------------------------------------------------------------------------ CLI hooks
# add_args (CrossMAE's flags) lives in crossmae_args.py, torch-free so that `main_pretrain.py --help` needs no torch.
add_args = crossmae_args.add_args


_CROSS_ONLY = {"kept_mask_ratio": None, "decoder_depth": None, "self_attn": False, "weight_fm": True,
               "use_input": True, "use_fm": ["-1"], "inverse_lr": False, "no_lr_scale": False}


def model_name(args: argparse.Namespace, name: str) -> str:
    """`--cross_mae` routes an MAE name (`mae_vit_base_patch16[_dec512d8b]`, `dmae_...`) to CrossMAE."""
    if not getattr(args, "cross_mae", False) or is_crossmae(name):
        return name
    stem = name[:-len("_dec512d8b")] if name.endswith("_dec512d8b") else name
    for mae_prefix, cross_prefix in _MAE_PREFIX.items():
        if stem.startswith(mae_prefix) and cross_prefix + stem[len(mae_prefix):] in _REGISTERED:
            logger.info("--cross_mae: --model %s -> %s", name, cross_prefix + stem[len(mae_prefix):])
            return cross_prefix + stem[len(mae_prefix):]
    known = ", ".join(sorted(n for n in _REGISTERED if n.startswith("crossmae_")))
    raise UserError(f"--cross_mae needs an MAE model name with a CrossMAE counterpart (e.g. mae_vit_base_patch16), "
                    f"got --model {name}; CrossMAE models: {known}")


def _kept(args: argparse.Namespace) -> float:
    return args.mask_ratio if getattr(args, "kept_mask_ratio", None) is None else args.kept_mask_ratio


def model_kwargs(args: argparse.Namespace, model_name: str) -> dict[str, Any]:
    """Constructor kwargs for CrossMAE models; {} for every other family (whose flags are not ours)."""
    if not is_crossmae(model_name):
        stray = [f"--{k}" for k, v in _CROSS_ONLY.items() if getattr(args, k, v) != v]
        if "--decoder_depth" in stray:
            raise UserError(f"--decoder_depth applies to CrossMAE models (add --cross_mae); {model_name} has a "
                            f"fixed decoder")
        if stray:
            logger.warning("%s: ignored by %s, which is not a CrossMAE model (add --cross_mae)",
                           ", ".join(stray), model_name)
        return {}
    kept = _kept(args)
    try:
        check_ratios(args.mask_ratio, kept)
    except ValueError as e:
        raise UserError(f"--kept_mask_ratio: {e}") from None
    kw: dict[str, Any] = {"kept_mask_ratio": kept, "weight_fm": args.weight_fm, "use_fm": list(args.use_fm),
                          "use_input": args.use_input, "self_attn": args.self_attn}
    if args.decoder_depth is not None:
        kw["decoder_depth"] = args.decoder_depth
    if not args.weight_fm:
        logger.warning("--no_weight_fm: medfound's non-mixing CrossMAE (final norm + last block); no released "
                       "weights use it")
    return kw


def lr_scale(args: argparse.Namespace, model_name: str) -> float:
    """CrossMAE's LR coupling when --lr is not given: kept/mask (mask/kept with
    --inverse_lr, 1 with --no_lr_scale), applied only when --kept_mask_ratio is given explicitly."""
    if not is_crossmae(model_name) or getattr(args, "kept_mask_ratio", None) is None or args.no_lr_scale:
        return 1.0
    kept, mask = args.kept_mask_ratio, args.mask_ratio
    scale = mask / kept if args.inverse_lr else kept / mask
    if scale != 1.0:
        logger.info("CrossMAE LR coupling: lr x %.4g (%s, kept %.3g / mask %.3g; --no_lr_scale to disable)", scale,
                    "mask/kept" if args.inverse_lr else "kept/mask", kept, mask)
    return scale


# What the shared checkpoint / resume / FSDP code needs to know about CrossMAE (see util.family). Its
# checkpoints are recognised by the feature mixing (`wfm`) and cross-attention modules; the mixing encoder
# has no final `norm`, so a cls-pooling classifier starts a fresh one instead of refusing the file.
FAMILY = register_family(FamilySpec(
    name="CrossMAE",
    resume_fields=MAE_FAMILY.resume_fields + ("kept_mask_ratio", "cross_mae", "weight_fm", "use_fm", "use_input",
                                              "self_attn", "decoder_depth"),
    ignore_prefixes=MAE_FAMILY.ignore_prefixes + ("dec_norms.", "wfm."),
    markers=("wfm", "cross_attn"),
    fresh_encoder_keys=("norm.weight", "norm.bias"),
    fsdp_block_types=(Block, CrossAttentionBlock),
    fsdp_forward_methods=("reconstruct_all",),  # runs self.forward: needs FSDP's root hooks
))
CrossMaskedAutoencoderViT.family_spec = FAMILY
