"""Flags of main_finetune.py and main_few_shot.py, torch-free so that their `--help` prints instantly.

main_finetune.get_args_parser / main_few_shot.get_args_parser wrap these; main_few_shot extends the
finetuning parser, so both live here where neither needs the training code (and torch) to describe them.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from util.cli import (AMP_CHOICES, HelpFormatter, RangeRule, add_bool_flag, add_common_args, add_performance_args,
                      check_patch_multiple, check_ranges)

SMALL_DATA_IMAGES = 1000  # --recipe auto: fewer training images than this get the small_data recipe
# Flag values per recipe, applied only to flags the user did not type (a value may be a function of the
# other settings). "mae" is the reference recipe (MAE / RETFound / USPEC, tuned for ImageNet-sized data):
# nothing changes. "small_data" fixes what fails on hundreds of images: linear lr scaling at batch 16 gives
# lr 6e-5, too little for the few hundred steps such a run has, and layer decay 0.75 leaves the first
# blocks almost frozen; 0.08-area crops and random erasing cut out
# a small finding while keeping its label; a 5-epoch warm-up is a quarter of a short run; batch 64 on 120
# images is one step an epoch (`train_images` is set by main_finetune before the recipe applies).
SMALL_DATA_LR = 1e-3  # small_data: the lr of any batch up to 256 (MAE's ViT-L finetuning peaks at 4e-3)


def small_data_blr(args: argparse.Namespace) -> float:
    """The base lr that gives SMALL_DATA_LR at this run's effective batch (linear scaling only above 256)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return SMALL_DATA_LR * 256 / min(256, args.batch_size * args.accum_iter * world)


RECIPES: dict[str, dict[str, Any]] = {
    "mae": {},
    "small_data": {
        "batch_size": lambda a: max(8, min(a.batch_size, a.train_images // 16)),  # >= ~16 steps an epoch
        "blr": small_data_blr,
        "layer_decay": 0.9,
        "warmup_epochs": lambda a: max(1, round(a.epochs / 10)),
        "crop_scale": (0.5, 1.0),
        "aa": "rand-m5-mstd0.5-inc1",
        "reprob": 0.0,
    },
    # MedSLIP's CBIS-DDSM probe (a frozen image encoder and a linear head, 3 pathology classes) done properly:
    # a stratified val carve from train, shuffled batches, warm-up + cosine per iteration, the frozen encoder
    # kept in eval mode, the best val epoch tested; its optimiser values (AdamW defaults: lr 1e-3, wd 0.01,
    # batch 16, 15 epochs) and its transform (resize to a square, flips with p 0.3) are the reference's.
    "medslip_cbis": {
        "batch_size": 16, "epochs": 15, "lr": 1e-3, "weight_decay": 0.01, "min_lr": 0.0, "warmup_epochs": 1,
        "freeze_encoder": True, "layer_decay": 1.0, "drop_path": 0.0, "smoothing": 0.0, "mixup": 0.0,
        "cutmix": 0.0, "aa": "none", "reprob": 0.0, "transform": "resize_flip", "pool": "cls",
    },
}
# The reference's settings: validation on the test CSV, batches in file order, CosineAnnealingWarmRestarts
# (T_0 = 5) stepped every batch, BatchNorm statistics of the frozen encoder updated, last epoch tested.
RECIPES["medslip_cbis_compat"] = {**RECIPES["medslip_cbis"], "warmup_epochs": 0, "compat": "medslip_cbis"}
RECIPE_HELP = ("flag defaults: mae = the reference recipe (large datasets); small_data = settings that learn on "
               "hundreds of images; auto = small_data below {n} training images, else mae; medslip_cbis = MedSLIP's "
               "CBIS probe done properly (frozen encoder in eval mode + linear head, AdamW lr 1e-3 wd 0.01, batch 16, "
               "15 epochs, stratified val carve from train, shuffled, 1 warm-up epoch + cosine, best val epoch "
               "tested, resize + flips); medslip_cbis_compat = the reference's settings (val = the test CSV, no "
               "shuffle, CosineAnnealingWarmRestarts T_0=5 stepped per batch, encoder BatchNorm in train mode, last "
               "epoch; --compat medslip_cbis). Flags you pass always win; the log lists what the recipe changed")


# Value ranges of the flags below (util.cli.check_ranges), checked before any work: out of range, a value
# trains something else than asked (lr 0, an untrained head's test metrics) or fails later in a traceback.
RULES: list[RangeRule] = [
    ("epochs", ">=1"), ("batch_size", ">=1"), ("accum_iter", ">=1"), ("blr", ">0"), ("lr", ">0"),
    ("weight_decay", ">=0"), ("input_size", ">=1"), ("warmup_epochs", ">=0"), ("num_workers", ">=0"),
    ("knn_k", ">=1", "neighbour counts"), ("smoothing", ">=0 <1"), ("val_fraction", ">=0 <1"),
    ("train_percent", ">0 <=1", "the fraction of each class used"), ("layer_decay", ">0 <=1", "1 = no decay"),
    ("drop_path", ">=0 <1"), ("crop_scale", ">0 <=1 ascending", "MIN MAX area fractions, e.g. 0.08 1.0"),
    ("few_shot", ">0", "shots per class, or the fraction of each class below 1"),
    ("layer_scale_init_value", ">=0", "0 = no LayerScale"),
]


def check_args(args: argparse.Namespace) -> None:
    """One-line UserError for the first flag out of range (flags `args` lacks are skipped)."""
    check_ranges(args, RULES)
    from util.registry import is_registered  # called by the training code only, where torch is loaded anyway
    model = getattr(args, "model", None)
    if model and is_registered(model):  # an unknown name gets the unknown-model error (with suggestions)
        check_patch_multiple(getattr(args, "input_size", None), model)


def get_args_parser(prog: str = "main_finetune.py", description: str | None = None,
                    small_data_images: int = SMALL_DATA_IMAGES) -> argparse.ArgumentParser:
    """The finetuning parser; `small_data_images` is the --recipe auto threshold quoted in the help."""
    p = argparse.ArgumentParser(prog, description=description, formatter_class=HelpFormatter)
    # Shown first (argparse lists groups in creation order): what a new user needs; the rest is detail.
    c = p.add_argument_group("common options")
    g = p.add_argument_group("model")
    c.add_argument("--model", default="vit_large_patch16", help="vit_base_patch16, vit_large_patch16, "
                   "RETFound_mae, vit_huge_patch14, vit_tiny_patch16, vit_micro_patch8 (tests), ...")
    g.add_argument("--input_size", default=None, type=int,
                   help="image side (default: the pretraining checkpoint's, else 224)")
    g.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate of the encoder blocks")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing (less memory, ~30%% slower)")
    g.add_argument("--global_pool", dest="global_pool", action="store_true", default=True,
                   help="average-pool patch tokens + fc_norm (MAE/RETFound/USPEC default)")
    g.add_argument("--cls_token", dest="global_pool", action="store_false", help="use the cls token + norm")
    g.add_argument("--pool", default=None, choices=("cls", "mae_avg", "retfound_v2_avg"),
                   help="explicit pooling; retfound_v2_avg reproduces RETFound v2/v3's double fc_norm (compat only)")
    c.add_argument("--finetune", default="", help="pretrained checkpoint (MAE, RETFound, USPEC, DeblurringMAE, ours)")
    g.add_argument("--checkpoint_key", "--model_key", dest="checkpoint_key", default=None,
                   help="key(s) holding the weights, e.g. model, teacher or state_dict (--model_key: BEiT's name)")
    g.add_argument("--model_prefix", default=None,
                   help="keep only the weights whose keys start with this prefix, without it (BEiT's flag; e.g. "
                        "module.visual. for the vision tower of a SLIP/CLIP checkpoint)")
    g.add_argument("--nb_classes", "--num_labels", dest="nb_classes", default=None, type=int,
                   help="classes (2 = two-way softmax as USPEC/RETFound; 1 = one sigmoid logit); default: from data")

    c.add_argument("--recipe", default="auto", choices=("auto", *RECIPES),
                   help=RECIPE_HELP.format(n=small_data_images))

    g = p.add_argument_group("optimisation")
    c.add_argument("--batch_size", default=64, type=int, help="per-process batch size")
    c.add_argument("--epochs", "--epoch", dest="epochs", default=50, type=int, help="training epochs")
    g.add_argument("--accum_iter", default=1, type=int,
                   help="gradient accumulation steps (effective batch = batch_size x accum_iter x processes)")
    g.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * effective batch / 256)")
    g.add_argument("--blr", default=1e-3, type=float, help="base lr per 256 images")
    g.add_argument("--layer_decay", default=0.75, type=float,
                   help="layer-wise lr decay: each block below the head gets this factor once more")
    g.add_argument("--weight_decay", default=0.05, type=float, help="AdamW weight decay")
    g.add_argument("--min_lr", default=1e-6, type=float, help="lr at the end of the cosine schedule")
    g.add_argument("--warmup_epochs", default=5, type=float, help="epochs of linear lr warm-up (fractions allowed)")
    g.add_argument("--clip_grad", default=None, type=float, help="clip the total gradient norm (None: no clipping)")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="mixed precision: auto = bf16 on capable GPUs, else fp32")
    g.add_argument("--max_nonfinite", default=5, type=int, help="stop after this many non-finite steps in a row")
    g.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    g.add_argument("--mixup", default=0.0, type=float, help="mixup alpha (0: off; multiclass only)")
    g.add_argument("--cutmix", default=0.0, type=float, help="cutmix alpha (0: off; multiclass only)")
    g.add_argument("--cutmix_minmax", default=None, type=float, nargs="+",
                   help="cutmix box size range MIN MAX as fractions of the image (replaces --cutmix alpha; timm)")
    g.add_argument("--mixup_prob", default=1.0, type=float, help="probability a batch gets mixup or cutmix")
    g.add_argument("--mixup_switch_prob", default=0.5, type=float,
                   help="probability of cutmix instead of mixup when both are on")
    g.add_argument("--mixup_mode", default="batch", choices=("batch", "pair", "elem"),
                   help="mix parameters drawn per batch, per pair or per element (timm Mixup)")
    g.add_argument("--class_weights", action="store_true", help="inverse-frequency class weights in the loss")
    g.add_argument("--balanced_sampler", action="store_true", help="sample classes equally (single process)")
    g.add_argument("--linprobe", action="store_true", help="frozen encoder, BatchNorm + linear head, LARS")
    g.add_argument("--adaptation", default="finetune", choices=("finetune", "lp"), help="RETFound v3 form of --linprobe")
    g.add_argument("--freeze_encoder", action="store_true", help="train the head (and fc_norm) only, AdamW")
    g.add_argument("--early_stops", default=0, type=int,
                   help="stop after N epochs without validation improvement (0: never)")

    g = p.add_argument_group("augmentation")
    g.add_argument("--color_jitter", default=None, type=float,
                   help="colour-jitter strength (timm; used only when --aa is none)")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy ('none' to disable)")
    g.add_argument("--crop_scale", default=(0.08, 1.0), type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="RandomResizedCrop area range (MAE: 0.08 1.0); keep MIN high when a small finding decides "
                        "the label, or crops cut it out")
    g.add_argument("--reprob", default=0.25, type=float, help="random erasing probability")
    g.add_argument("--remode", default="pixel",
                   help="random erasing fill: pixel (per-pixel noise), rand (per-channel) or const (timm)")
    g.add_argument("--recount", default=1, type=int, help="random erasing: boxes erased per image")
    g.add_argument("--resplit", action="store_true", help="accepted for compatibility; no effect (as in MAE)")
    g.add_argument("--norm_preset", default=None, help="normalisation (default: the pretraining checkpoint's, "
                   "else imagenet); uwf for USPEC")
    g.add_argument("--no_blur", action="store_true",
                   help="do not apply the pretraining checkpoint's input blur (data already blurred)")
    g.add_argument("--compat", default="", help="comma list of reference behaviours: uspec_eval_aug; medslip_cbis "
                   "(MedSLIP's CBIS probe: val = test split, unshuffled batches, warm restarts every 5 batches, encoder "
                   "BatchNorm in train mode, last epoch tested)")
    g.add_argument("--transform", default="mae", choices=("mae", "resize_flip"),
                   help="mae = RandomResizedCrop + RandAugment (train) / resize + centre crop (eval); resize_flip = "
                        "resize to input_size x input_size (aspect not kept) with vertical and horizontal flips "
                        "(p 0.3) for training, resize only for evaluation (MedSLIP's CBIS probe)")

    g = p.add_argument_group("data and evaluation")
    c.add_argument("--data_path", default=None,
                   help="dataset root: DATA/{train,val,test}/<class>/<image> or VisionFM label files (see above)")
    g.add_argument("--multilabel", action="store_true", help="multi-hot labels (VisionFM label files)")
    g.add_argument("--val_fraction", default=0.1, type=float, help="carved from train when there is no val split")
    g.add_argument("--train_percent", default=1.0, type=float, help="USPEC: use this fraction of each class")
    g.add_argument("--metric", default="auroc", help="validation metric for the best checkpoint "
                   "(auroc, accuracy, balanced_accuracy, f1, kappa, retfound_score, loss)")
    g.add_argument("--ordinal", action="store_true", help="graded labels (e.g. DR): also quadratic kappa")
    g.add_argument("--positive_class", default=1, type=int, help="class index that counts as positive in binary metrics")
    g.add_argument("--bootstrap", default=1000, type=int, help="bootstrap resamples for test 95%% CIs (0: off)")
    g.add_argument("--bad_image", default="error", choices=("error", "skip"),
                   help="unreadable image: stop with its path, or skip it (listed in the log)")
    add_bool_flag(g, "--jpeg_draft", default=False,
                  help="decode large JPEGs at 1/2 or 1/4 scale when the transform still only shrinks them (evaluation: "
                       "shorter side >= input_size/crop_pct; training: >= 4.1 x input_size for RandomResizedCrop): "
                       "several times faster on 2-4k px photos, pixels within ~45 dB of a full decode, so off by "
                       "default to keep evaluation identical to the reference")
    c.add_argument("--eval", action="store_true", help="evaluate --resume on the test split and exit")
    g.add_argument("--dist_eval", action="store_true", help="accepted; evaluation is always sharded without padding")
    g.add_argument("--knn", action="store_true", help="k-NN evaluation of frozen features (train = memory bank)")
    g.add_argument("--knn_k", default=[10, 20], type=int, nargs="+", help="neighbour counts for --knn")
    c.add_argument("--predict", default="", help="folder of images -> predictions.csv with per-class probabilities")

    g = p.add_argument_group("output")
    c.add_argument("--output_dir", "--output", dest="output_dir", default="./output_dir",
                   help="folder for checkpoints, log.txt and results")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir/tensorboard)")
    g.add_argument("--task", default="", help="run name: outputs go to output_dir/<task>")
    add_bool_flag(g, "--savemodel", default=True, help="save checkpoint-best.pth")
    c.add_argument("--resume", default="", help="checkpoint to resume training from, 'auto', or to --eval/--predict")
    add_bool_flag(g, "--auto_resume", default=True, help="resume from output_dir/checkpoint-last.pth if present")
    g.add_argument("--save_every_steps", default=0, type=int, help="also checkpoint every N optimizer steps")
    g.add_argument("--inject_nonfinite", default="", help=argparse.SUPPRESS)  # test hook: poison these update steps
    g.add_argument("--start_epoch", default=0, type=int, help="first epoch (a resumed checkpoint sets it)")
    g.add_argument("--print_freq", default=20, type=int, help="progress line every N steps")
    add_beit_args(p)
    add_performance_args(p)
    add_common_args(p)
    return p


def add_beit_args(p: argparse.ArgumentParser) -> None:
    """BEiT's finetuning flags, so SLIP's finetuning command runs verbatim: they describe the plain ViT built
    here (learned absolute positions, no relative position bias, cls pooling, no LayerScale, ImageNet stats)."""
    g = p.add_argument_group("BEiT flag names (SLIP's finetuning command; --model beit_{small,base,large}_patch16_224 "
                             "builds the plain ViT of that size)")
    g.add_argument("--enable_deepspeed", action="store_true", help="accepted; DDP/FSDP are used instead of DeepSpeed")
    g.add_argument("--disable_rel_pos_bias", action="store_true",
                   help="no relative position bias (the ViT here has none; required with a beit_* model)")
    g.add_argument("--abs_pos_emb", action="store_true",
                   help="learned absolute position embeddings (the ViT here always has them; required with beit_*)")
    g.add_argument("--use_cls", action="store_true", help="cls-token pooling (= --pool cls)")
    g.add_argument("--layer_scale_init_value", default=0.0, type=float,
                   help="LayerScale init (per-channel gamma_1/gamma_2 of each block); 0 = no LayerScale")
    g.add_argument("--imagenet_default_mean_and_std", action="store_true", help="ImageNet mean/std (= --norm_preset "
                   "imagenet; BEiT's default without it is 0.5/0.5)")


def add_few_shot_args(p: argparse.ArgumentParser) -> None:
    """main_few_shot.py's own flags, on top of the finetuning ones."""
    g = p.add_argument_group("few-shot")
    g.add_argument("--few_shot", required=True, type=float,
                   help="shots per class (k >= 1), or the fraction of each class when k < 1")
    g.add_argument("--seeds", default=None, help="comma list of seeds, e.g. 1,2,3 (default: --seed alone)")
    g.add_argument("--keep_last_checkpoint", action="store_true",
                   help="keep each seed's checkpoint-last.pth (optimizer state, ~3x the model) after the seed "
                        "finished; by default only checkpoint-best.pth (weights) and the results stay")
    g.add_argument("--few_shot_val", default="auto", choices=("auto", "carve", "none"),
                   help="selection split: auto = DATA/val if present else none (last epoch); carve = a stratified "
                        "fraction (--val_fraction) of the shots")


def few_shot_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The finetuning parser plus the few-shot flags (main_few_shot.py and its alias)."""
    p = get_args_parser(prog, description)
    add_few_shot_args(p)
    return p
