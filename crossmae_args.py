"""CrossMAE's command-line flags (main_pretrain.py), torch-free so that `--help` prints without torch.

models_crossmae.add_args is this function (the pretraining family hook); model_kwargs there reads the flags.
"""
from __future__ import annotations

import argparse

from util.cli import RangeRule, add_bool_flag

# Value ranges checked before any work (main_pretrain.RULES); kept <= --mask_ratio is checked with the model.
RULES: list[RangeRule] = [("kept_mask_ratio", ">0 <1", "a fraction of ALL patches, at most --mask_ratio")]


def add_args(parser: argparse.ArgumentParser) -> None:
    """CrossMAE's flags; defaults = the released recipe."""
    g = parser.add_argument_group("CrossMAE (cross-attention decoder, partial reconstruction; crossmae_* models)")
    add_bool_flag(g, "--cross_mae", default=False,
                  help="build the CrossMAE model of --model's size: mae_vit_X -> crossmae_vit_X (CrossMAE's form)")
    g.add_argument("--kept_mask_ratio", default=None, type=float,
                   help="fraction of ALL patches reconstructed, chosen among the masked ones (<= --mask_ratio; "
                        "default: = --mask_ratio). Given explicitly without --lr, the LR is scaled by "
                        "kept/mask as the reference does (see --inverse_lr, --no_lr_scale)")
    add_bool_flag(g, "--weight_fm", default=True,
                  help="each decoder block reads its own learned mix of encoder block outputs (on in every "
                       "released model; --no_weight_fm: final norm + last block, no reference weights)")
    g.add_argument("--use_fm", default=["-1"], nargs="+",
                   help="encoder blocks to mix: -1 alone (or 'all') = every block; other negatives count from the end")
    add_bool_flag(g, "--use_input", default=True, help="also mix the encoder's input tokens (released recipe)")
    add_bool_flag(g, "--self_attn", default=False, help="add self-attention among the decoder queries")
    g.add_argument("--decoder_depth", default=None, type=int,
                   help="CrossMAE decoder blocks (default: the model's; 12 for S/B/L/H = released recipe)")
    g.add_argument("--inverse_lr", action="store_true", help="LR scale mask/kept instead of kept/mask")
    g.add_argument("--no_lr_scale", action="store_true", help="no kept/mask LR scaling")
    g.add_argument("--enable_flash_attention2", action="store_true",
                   help="accepted for CrossMAE command lines: attention runs through SDPA, which picks flash "
                        "kernels by itself where the GPU supports them")
    g.add_argument("--multi_epochs_dataloader", action="store_true",
                   help="accepted for CrossMAE command lines: loader workers already persist across epochs")
    g.add_argument("--find_unused_parameters", action="store_true",
                   help="accepted for CrossMAE command lines: every parameter receives a gradient")
