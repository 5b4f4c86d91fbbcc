"""The encoder flags shared by VisionFM's evaluation scripts (feature extraction and the decoders), torch-free
so that `--help` is instant.

VisionFM names a backbone by `--arch vit_base` plus `--patch_size 16`; medfound's registered factory is
`vit_base_patch16`. The pooled feature a decoder takes comes from `--n_last_blocks` and
`--avgpool_patchtokens`: 0 = the final-normed cls tokens of the last n blocks concatenated (n*D),
1 = the mean of the final-normed patch tokens of the last block (D), 2 = both concatenated ((n+1)*D).
"""
from __future__ import annotations

import argparse
import re

from util.cli import AMP_CHOICES, HelpFormatter, RangeRule, UserError, add_common_args, check_patch_multiple

# VisionFM's and iBOT's --arch names; `vit_micro` is the test-size backbone.
ARCHES: tuple[str, ...] = ("vit_micro", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge")
POOLING_NAMES: dict[int, str] = {0: "lastn_cls", 1: "vfm_mean_normed", 2: "lastn_cls+mean"}


def add_encoder_args(parser: argparse.ArgumentParser) -> None:
    """The frozen-encoder flags, with VisionFM's names and defaults (plus launcher/device flags)."""
    g = parser.add_argument_group("frozen encoder")
    g.add_argument("--pretrained_weights", default="",
                   help="encoder weights: a VisionFM/iBOT/DINO training checkpoint, a RETFound or MAE checkpoint, "
                        "a medfound checkpoint or a bare state dict")
    g.add_argument("--checkpoint_key", default="teacher",
                   help="entry of the checkpoint holding the encoder; a comma list is tried in order "
                        "(e.g. 'teacher,model'; RETFound and MAE files keep it under 'model')")
    g.add_argument("--arch", default="vit_base",
                   help=f"backbone size ({', '.join(ARCHES)}) or a registered ViT name such as vit_base_patch16")
    g.add_argument("--patch_size", default=16, type=int, help="patch side in pixels")
    g.add_argument("--input_size", default=224, type=int, help="images are resized to input_size x input_size")
    g.add_argument("--n_last_blocks", default=4, type=int,
                   help="cls tokens of this many last blocks are concatenated (avgpool_patchtokens 0 and 2)")
    g.add_argument("--avgpool_patchtokens", default=0, type=int, choices=(0, 1, 2),
                   help="0: last-n cls tokens; 1: mean of the last block's normed patch tokens; 2: both")
    g.add_argument("--modality", default="Fundus",
                   help="imaging modality: its normalisation statistics (Fundus, OCT, FFA, External, SlitLamp, "
                        "Ultrasound, UBM, MRI; VisionFM's spellings accepted)")
    g.add_argument("--batch_size_per_gpu", "--batch_size", dest="batch_size_per_gpu", default=64, type=int,
                   help="images per process and step")
    g.add_argument("--amp", default="none", choices=AMP_CHOICES,
                   help="autocast precision of the encoder (none keeps float32 features)")
    add_common_args(parser)


# Value ranges checked right after parsing (util.cli.check_ranges).
RULES: list[RangeRule] = [
    ("patch_size", ">=1"), ("input_size", ">=1"), ("n_last_blocks", ">=1"),
    ("batch_size_per_gpu", ">=1"), ("num_workers", ">=0"),
]


def model_name(args: argparse.Namespace) -> str:
    """The registered factory for --arch/--patch_size (`vit_base` + 16 -> `vit_base_patch16`); a full
    registered name given to --arch is taken as it is. The check that it exists is the builder's."""
    arch = str(args.arch).strip()
    if re.search(r"_patch\d+", arch):
        return arch
    if arch not in ARCHES:
        raise UserError(f"--arch {arch}: unknown backbone; use one of {', '.join(ARCHES)} (with --patch_size) or a "
                        "registered name such as vit_base_patch16")
    return f"{arch}_patch{args.patch_size}"


def check_encoder_args(args: argparse.Namespace) -> None:
    """Ranges and the patch grid, before any file is read or folder created."""
    from util.cli import check_ranges
    check_ranges(args, RULES)
    name = model_name(args)
    check_patch_multiple(args.input_size, name)


def pooling_name(avgpool_patchtokens: int) -> str:
    return POOLING_NAMES[int(avgpool_patchtokens)]


# ------------------------------------------------------------------------------- feature extraction
FEATURE_RULES: list[RangeRule] = [("epochs", ">=1", "passes over the training images; 1 = no augmented repeats"),
                                  ("shard_size", ">=1")]


def features_parser(prog: str = "main_vfm_features.py", description: str | None = None) -> argparse.ArgumentParser:
    """Flags of the feature extraction (main_vfm_features.py and VisionFM's evaluation/extract_features.py)."""
    p = argparse.ArgumentParser(prog, description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data_path", default=None, help="labelled dataset (VisionFM label files or ImageNet layout)")
    g.add_argument("--dataset_format", default=None, choices=("vfm", "ImageNet"),
                   help="vfm: <dataset>/{training,test}_labels.txt; ImageNet: {train,val,test}/<class>/ "
                        "(default: detected from the folder)")
    g.add_argument("--dst_root", default=None, help="output folder of the features (<dst_root>/<split>/...)")
    g.add_argument("--mode", default="cls", choices=("cls", "seg"),
                   help="cls: pooled features for classification/regression decoders; seg: the four block maps per "
                        "image (+ its mask) for the linear segmentation head of main_vfm_dense.py")
    g.add_argument("--epochs", default=10, type=int,
                   help="passes over the training images: pass 0 plain, the others with random flips")
    g.add_argument("--num_labels", default=None, type=int,
                   help="labels per line expected in the label files (checked when given; 1 = binary 0/1)")
    g.add_argument("--shard_size", default=4096, type=int, help="samples per shard file")
    g.add_argument("--feature_dtype", default="float32", choices=("float32", "float16"),
                   help="stored precision of the features")
    add_encoder_args(p)
    return p
