"""A frozen ViT encoder that returns the pooled feature VisionFM's decoders take.

VisionFM (like DINO and iBOT) evaluates a frozen encoder through the final-normed outputs of its last
blocks. `--avgpool_patchtokens` picks what the decoder sees:

* 0: the cls tokens of the last `n_last_blocks` blocks, each through the final norm, concatenated (n*D);
* 1: the mean of the final-normed patch tokens of the last block (D; VisionFM's decoders build the
  encoder without mean pooling, so this is the mean of normed tokens, not iBOT's normed mean);
* 2: mode 0 followed by mode 1 ((n+1)*D), iBOT's definition; VisionFM accepts the value but never
  implemented it.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
import torch.nn as nn

from models_vit import VisionTransformer
from util.cli import UserError

logger = logging.getLogger("medfound")


class FrozenEncoder(nn.Module):
    """No-grad, eval-mode wrapper of a `VisionTransformer`: `forward(images) -> (N, feature_dim)`.

    The backbone's parameters never require gradients and `train()` keeps it in eval mode (no dropout or
    drop path ever), so a decoder can be trained on top without touching the encoder."""

    def __init__(self, backbone: VisionTransformer, n_last_blocks: int = 4, avgpool_patchtokens: int = 0) -> None:
        super().__init__()
        if avgpool_patchtokens not in (0, 1, 2):
            raise UserError(f"--avgpool_patchtokens {avgpool_patchtokens}: must be 0, 1 or 2")
        depth = len(backbone.blocks)
        if avgpool_patchtokens == 1:  # the last block's patch tokens only: --n_last_blocks plays no part
            n_last_blocks = 1
        elif not 1 <= n_last_blocks <= depth:
            raise UserError(f"--n_last_blocks {n_last_blocks}: the encoder has {depth} blocks; use 1 to {depth}")
        self.backbone = backbone
        self.n_last_blocks = int(n_last_blocks)
        self.avgpool_patchtokens = int(avgpool_patchtokens)
        self.embed_dim = int(backbone.embed_dim)
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    @property
    def feature_dim(self) -> int:
        n = {0: self.n_last_blocks, 1: 1, 2: self.n_last_blocks + 1}[self.avgpool_patchtokens]
        return n * self.embed_dim

    def train(self, mode: bool = True) -> "FrozenEncoder":
        super().train(mode)
        self.backbone.eval()  # frozen: never in training mode
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Mode 1 needs only the last block; the others the last n. All through the final norm.
        n = 1 if self.avgpool_patchtokens == 1 else self.n_last_blocks
        inter = self.backbone.forward_intermediates(images, indices=n, norm=True, output_fmt="NLC",
                                                    return_prefix_tokens=True, intermediates_only=True)
        parts = []
        if self.avgpool_patchtokens in (0, 2):
            parts.extend(cls[:, 0] for _, cls in inter)
        if self.avgpool_patchtokens in (1, 2):
            parts.append(inter[-1][0].mean(dim=1))
        return torch.cat(parts, dim=-1)


def _has(sd: dict[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def build_frozen_encoder(args: argparse.Namespace, pooled: bool = True) -> FrozenEncoder:
    """The encoder of `--arch/--patch_size` at `--input_size`, loaded from `--pretrained_weights` (entry
    `--checkpoint_key`, a comma list tried in order), frozen, pooling per `--n_last_blocks` and
    `--avgpool_patchtokens` (`pooled=False`: a dense decoder reads its blocks, so the log names no pooling).
    Errors are one line naming the flag and the file."""
    import os

    from util.checkpoint import extract_state_dict, load_file, load_pretrained_encoder
    from util.checkpoint_files import CheckpointError
    from util.registry import create_model, is_registered
    from vfm_args import model_name

    name = model_name(args)
    if not is_registered(name):
        raise UserError(f"--arch {args.arch} with --patch_size {args.patch_size}: no model {name}; pick a size and "
                        "patch the checkpoint was trained with (e.g. --arch vit_base --patch_size 16)")
    path = args.pretrained_weights
    if not path:
        raise UserError("--pretrained_weights is required: the encoder checkpoint to extract features with")
    if not os.path.isfile(path):
        raise UserError(f"--pretrained_weights {path}: no such file")
    ckpt = load_file(path, flag="--pretrained_weights")
    key = args.checkpoint_key or None
    try:
        sd = extract_state_dict(ckpt, checkpoint_key=key, source=f"--pretrained_weights {path}")
    except CheckpointError as e:
        have = sorted(k for k, v in ckpt.items() if isinstance(v, dict)) if isinstance(ckpt, dict) else []
        hint = f"; pass --checkpoint_key {','.join(have)}" if have else "; pass --checkpoint_key '' for a bare state dict"
        raise UserError(f"{e} (--checkpoint_key {key!r}){hint}") from None
    # An encoder saved with MAE's global pooling has fc_norm and no final norm: keep its own pooling layer
    # out of the way and use the unnormed tokens (its final norm is the identity).
    pool = "cls" if _has(sd, "norm.") or not _has(sd, "fc_norm.") else "mae_avg"
    if pool != "cls":
        logger.warning("%s has no final norm (an average-pooled classifier); features use the un-normed tokens", path)
    model = create_model(name, img_size=args.input_size, num_classes=0, pool=pool)
    report = load_pretrained_encoder(model, path, checkpoint_key=key, ckpt=ckpt, flag="--pretrained_weights")
    if pooled:
        logger.info("frozen encoder %s from %s (entry %s): %d blocks, pooling avgpool_patchtokens=%d over %d blocks",
                    name, path, key or "(whole file)", len(model.blocks), args.avgpool_patchtokens,
                    1 if args.avgpool_patchtokens == 1 else args.n_last_blocks)
    else:
        logger.info("frozen encoder %s from %s (entry %s): %d blocks", name, path, key or "(whole file)",
                    len(model.blocks))
    encoder = FrozenEncoder(model, args.n_last_blocks, args.avgpool_patchtokens)
    encoder.load_report = report
    return encoder
