"""Flags of main_segmentation.py (UPerNet segmentation finetuning), torch-free so `--help` prints instantly.

The mmsegmentation configs of DeblurringMAE / ConvMAE are presets here (`--config NAME`): a preset fills the
flags the user did not type, so `--config ..._tn3k --max_iters 200 --input_size 64` is the TN3K recipe
shrunk, and the log lists every value the preset applied. mmseg's own command-line spellings are accepted
(`--work-dir`, `--options model.pretrained=CKPT`, `--eval mIoU`, `--launcher`), so tools/dist_train.sh and
tools/dist_test.sh only forward their arguments to torchrun.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any

from util.cli import AMP_CHOICES, HelpFormatter, RangeRule, UserError, add_common_args, add_performance_args, check_ranges

# ---------------------------------------------------------------------------------------------- recipe
# The UPerNet recipe of the mmseg configs (ConvMAE SEG / DeblurringMAE TN3K): AdamW lr 1e-4 at a global batch
# of 16 (2 images x 8 GPUs), betas (0.9, 0.999), weight decay 0.05, layer decay 0.75 (mmseg's LayerDecayOptimizerConstructor
# for ConvMAE: 13 layer ids, conv stages and embeddings at id 0), a linear warm-up of 1500
# iterations from 1e-6 x lr, then poly decay (power 1.0, min lr 0) per iteration over 160k iterations; UPerNet
# channels 768 (BEiT/MAE/ConvMAE UPerNet configs), auxiliary FCN head weighted 0.4, cross-entropy on both,
# drop path 0.1, crops of 512.
# These are the defaults of the plain flag form too; a preset adds the backbone, the deblurring input, the
# dataset folder and the selection metric.
MMSEG_RECIPE: dict[str, Any] = {
    "input_size": 512, "lr": 1e-4, "weight_decay": 0.05, "layer_decay": 0.75, "warmup_iters": 1500,
    "warmup_ratio": 1e-6, "power": 1.0, "min_lr": 0.0, "max_iters": 160000, "global_batch": 16, "drop_path": 0.1,
    "aux_weight": 0.4, "loss": "ce", "channels": 768,
}
CLASS_NAMES_US = ("background", "nodule")  # mmseg's ultrasound dataset classes (masks 0/1)


def _preset(model: str, deblur: bool, dataset: str) -> dict[str, Any]:
    # data_path: mmseg configs hard-code their data_root; ours is data/<dataset> under the working folder
    # (pass --data_path). eval mDice: the configs' EvalHook(save_best='mDice').
    return {"model": model, "deblur": deblur, "data_path": os.path.join("data", dataset), "eval": ["mDice"],
            "num_classes": 2, "class_names": list(CLASS_NAMES_US)}


# Config name (its file stem) -> flag values. The folder (`configs/de_convmae/`) and `.py` are optional.
PRESETS: dict[str, dict[str, Any]] = {
    "upernet_de_convmae_us280k_base_gaussian_800_512_tn3k": _preset("convvit_base_patch16", True, "tn3k"),
    "upernet_de_convmae_us280k_base_gaussian_800_512_tnui": _preset("convvit_base_patch16", True, "tnui"),
    "upernet_convmae_us280k_base_800_512_tn3k": _preset("convvit_base_patch16", False, "tn3k"),
    "upernet_convmae_us280k_base_800_512_tnui": _preset("convvit_base_patch16", False, "tnui"),
}
EVAL_METRICS = ("mIoU", "mDice")
LAYOUTS = ("auto", "mmseg", "seg_unet", "vfm")
BLURS = ("gaussian", "mean", "median", "motion", "defocus", "none")
LOSSES = ("ce", "dice_ce", "dice_focal")
COMPAT = ("mmseg_convmae",)
# mmseg `--options/--cfg-options KEY=VALUE` keys we map onto flags (dest, type).
MMSEG_OPTIONS: dict[str, tuple[str, type]] = {
    "model.pretrained": ("finetune", str), "optimizer.lr": ("lr", float),
    "optimizer.weight_decay": ("weight_decay", float), "runner.max_iters": ("max_iters", int),
    "data.samples_per_gpu": ("batch_size", int), "evaluation.interval": ("eval_freq", int),
    "model.backbone.drop_path_rate": ("drop_path", float), "data_root": ("data_path", str),
}


def preset_name(config: str) -> str:
    """`configs/de_convmae/NAME.py`, `NAME.py` or `NAME` -> NAME; one line listing the presets otherwise."""
    name = os.path.basename(config.rstrip("/\\"))
    name = name[:-3] if name.endswith(".py") else name
    if name not in PRESETS:
        import difflib
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        raise UserError(f"--config {config}: not a known preset ({'did you mean ' + close[0] + '? ' if close else ''}"
                        f"known: {', '.join(PRESETS)})")
    return name


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """mmseg `--options KEY=VALUE ...` -> {dest: value}; an unsupported key or a bad value is one line."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--options {item}: expected KEY=VALUE, e.g. model.pretrained=/path/to/ckpt.pth")
        if key not in MMSEG_OPTIONS:
            raise UserError(f"--options {key}: not supported; supported keys: {', '.join(MMSEG_OPTIONS)} (or pass "
                            f"the matching flag of main_segmentation.py)")
        dest, kind = MMSEG_OPTIONS[key]
        try:
            out[dest] = kind(value)
        except ValueError:
            raise UserError(f"--options {item}: {value!r} is not a {kind.__name__}") from None
    return out


# ---------------------------------------------------------------------------------------------- flags
RULES: list[RangeRule] = [
    ("max_iters", ">=1"), ("epochs", ">=1"), ("batch_size", ">=1"), ("accum_iter", ">=1"), ("lr", ">0"),
    ("blr", ">0"), ("weight_decay", ">=0"), ("layer_decay", ">0 <=1", "1 = no decay"), ("drop_path", ">=0 <1"),
    ("input_size", ">=16"), ("warmup_iters", ">=0"), ("warmup_ratio", ">0 <=1"), ("power", ">0"), ("min_lr", ">=0"),
    ("eval_freq", ">=1"), ("num_classes", ">=2", "background counts as a class"), ("aux_weight", ">=0"),
    ("bootstrap", ">=0"), ("vis_images", ">=0"), ("blur_sigma", ">0"), ("blur_ksize", ">=1"), ("num_workers", ">=0"),
    ("save_every_steps", ">=0"), ("print_freq", ">=1"), ("channels", ">=8"),
]


def check_args(args: argparse.Namespace) -> None:
    """One-line UserError for the first flag out of range or contradicting another (before any work)."""
    check_ranges(args, RULES)
    if getattr(args, "eval_only", False) and not args.resume:
        raise UserError("--eval_only needs --resume <finetuned checkpoint> (e.g. WORK_DIR/checkpoint-best.pth)")
    for item in (args.compat or "").split(","):
        if item.strip() and item.strip() not in COMPAT:
            raise UserError(f"--compat {item.strip()}: unknown; choose from {', '.join(COMPAT)}")
    if args.class_names is not None and args.num_classes is not None and len(args.class_names) != args.num_classes:
        raise UserError(f"--class_names gives {len(args.class_names)} names for --num_classes {args.num_classes}")


def get_args_parser(prog: str = "main_segmentation.py", description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog, description=description, formatter_class=HelpFormatter)
    c = p.add_argument_group("common options")
    c.add_argument("config_pos", nargs="?", default=None, metavar="CONFIG",
                   help="mmseg-style positional config (same as --config)")
    c.add_argument("--config", default=None,
                   help="mmseg config name as a preset: " + ", ".join(PRESETS) +
                        " (a configs/<folder>/ prefix and .py suffix are accepted); flags you pass win")
    c.add_argument("--model", default=None, help="backbone factory: convvit_base_patch16 (ConvMAE / deblurring "
                   "ConvMAE), vit_base_patch16 (MAE / DMAE), vit_micro_patch8 / convvit_micro_patch16 (tests) "
                   "(default: the preset's, else convvit_base_patch16)")
    c.add_argument("--finetune", "--pretrained", dest="finetune", default="",
                   help="pretrained encoder checkpoint (MAE, DMAE, ConvMAE, deblurring ConvMAE); its preprocessing "
                        "record gives the normalisation and, for deblurring encoders, the input blur")
    c.add_argument("--options", "--cfg-options", dest="options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="mmseg overrides: " + ", ".join(MMSEG_OPTIONS))
    c.add_argument("--data_path", default=None,
                   help="segmentation root: mmseg US layout images[_gaussian]/{train,val,test} + masks_1/{split} "
                        "(0/1), SEG_UNET images_gaussian/{split} + masks/{split} (255 = foreground) or VisionFM "
                        "<ds>/{training,test}/{images,labels} (default: the preset's data/<dataset>)")
    c.add_argument("--output_dir", "--work-dir", "--work_dir", dest="output_dir", default=None,
                   help="folder for checkpoints, log.txt, metrics and overlays (default: ./work_dirs/<config> "
                        "as mmseg, else ./output_dir; with --eval_only: the checkpoint's folder)")
    c.add_argument("--eval", nargs="+", default=None, choices=EVAL_METRICS,
                   help="metric(s) to report; the first selects the best checkpoint on val as mmseg's save_best "
                        "(default: the preset's mDice, else mIoU)")
    c.add_argument("--eval_only", action="store_true",
                   help="test --resume on the test split (else val) and exit (tools/dist_test.sh)")
    c.add_argument("--resume", default="", help="checkpoint to continue training from, or to test with --eval_only")

    g = p.add_argument_group("model and schedule (defaults: the mmseg UPerNet recipe unless noted)")
    g.add_argument("--input_size", default=None, type=int, help="crop side (mmseg: 512)")
    g.add_argument("--num_classes", default=None, type=int, help="classes including background (default 2)")
    g.add_argument("--class_names", default=None, nargs="+", help="names for the table (default background nodule)")
    g.add_argument("--max_iters", default=None, type=int, help="training iterations (mmseg: 160000)")
    g.add_argument("--epochs", default=None, type=int,
                   help="ours: train this many passes over the training split instead of --max_iters")
    g.add_argument("--batch_size", default=None, type=int,
                   help="images per process (default: the recipe's global 16 divided over the processes)")
    g.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    g.add_argument("--lr", default=None, type=float, help="absolute peak lr (mmseg: 1e-4 at global batch 16)")
    g.add_argument("--blr", default=None, type=float, help="ours: base lr per 256 images (lr = blr x batch / 256)")
    g.add_argument("--layer_decay", default=None, type=float, help="layer-wise lr decay (recipe: 0.75)")
    g.add_argument("--weight_decay", default=None, type=float, help="AdamW weight decay (mmseg: 0.05)")
    g.add_argument("--drop_path", default=None, type=float, help="stochastic depth of the backbone (mmseg: 0.1)")
    g.add_argument("--warmup_iters", default=None, type=int,
                   help="linear warm-up iterations (mmseg: 1500; ours: a tenth of a run shorter than 6000 iterations)")
    g.add_argument("--warmup_ratio", default=None, type=float, help="warm-up starts at this fraction of lr (mmseg: 1e-6)")
    g.add_argument("--power", default=None, type=float, help="poly decay power (mmseg: 1.0)")
    g.add_argument("--min_lr", default=None, type=float, help="lr at the end of the poly decay (mmseg: 0)")
    g.add_argument("--loss", default=None, choices=LOSSES,
                   help="ce = mmseg's cross-entropy (decode + aux heads); dice_ce / dice_focal: ours")
    g.add_argument("--aux_weight", default=None, type=float, help="auxiliary FCN head loss weight (mmseg: 0.4)")
    g.add_argument("--channels", default=None, type=int, help="UPerNet decoder channels (recipe: 768)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing of the backbone blocks "
                   "(less memory at 512 px, ~30%% slower)")
    g.add_argument("--clip_grad", default=None, type=float, help="clip the total gradient norm (None: no clipping)")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="mixed precision: auto = bf16 on capable GPUs, else fp32")
    g.add_argument("--max_nonfinite", default=5, type=int, help="stop after this many non-finite steps in a row")
    g.add_argument("--compat", default="", help="reference behaviours: mmseg_convmae (pos_embed gets weight decay, "
                   "as mmseg's layer-decay constructor did; default exempts it)")

    g = p.add_argument_group("data")
    g.add_argument("--layout", default="auto", choices=LAYOUTS, help="dataset layout (auto: detected)")
    g.add_argument("--blur", default=None, choices=BLURS,
                   help="input blur for a deblurring encoder whose checkpoint does not record it (none: the images "
                        "are already blurred); default: the checkpoint's record")
    g.add_argument("--blur_sigma", "--sigma", dest="blur_sigma", default=1.1, type=float, help="gaussian sigma in px")
    g.add_argument("--blur_ksize", default=5, type=int, help="mean/median window, motion length, defocus radius")
    g.add_argument("--norm_preset", default=None, help="normalisation (default: the checkpoint's, else imagenet)")
    g.add_argument("--hflip", default=0.5, type=float, help="horizontal flip probability (image and mask together)")
    g.add_argument("--vflip", default=0.0, type=float, help="vertical flip probability (mmseg: 0)")

    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval_freq", default=None, type=int,
                   help="validate (and checkpoint) every N iterations (mmseg: 16000; default: a tenth of the run)")
    g.add_argument("--bootstrap", default=1000, type=int, help="bootstrap resamples over test images for CIs (0: off)")
    g.add_argument("--vis_images", default=8, type=int, help="test images drawn in the overlay PNG")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir/tensorboard)")
    g.add_argument("--save_every_steps", default=0, type=int, help="also checkpoint every N iterations")
    from util.cli import add_bool_flag
    add_bool_flag(g, "--auto_resume", default=True, help="resume from output_dir/checkpoint-last.pth if present")
    g.add_argument("--print_freq", default=20, type=int, help="progress line every N iterations")
    g.add_argument("--launcher", default="none", choices=("none", "pytorch", "slurm", "mpi"),
                   help="accepted for mmseg's scripts; ranks come from the environment (torchrun, SLURM, MPI)")
    g.add_argument("--deterministic", action="store_true", help="accepted for mmseg; runs are seeded anyway")
    add_performance_args(p)
    add_common_args(p)
    return p


# ---------------------------------------------------------------------------------------------- resolution
def resolve_args(args: argparse.Namespace, given: set[str], world_size: int = 1) -> dict[str, Any]:
    """Fill every unset flag from the preset (`--config`) and the mmseg recipe; flags the user typed win.

    Returns what the preset/recipe applied ({dest: value}), which main_segmentation logs and records. Torch-
    free, so tests and `--help` need no model. `world_size` divides the recipe's global batch."""
    if args.config_pos:
        if args.config and preset_name(args.config) != preset_name(args.config_pos):
            raise UserError(f"two configs given: {args.config_pos} and --config {args.config}")
        args.config = args.config or args.config_pos
    options = parse_options(args.options)
    for dest, value in options.items():
        if dest in given and getattr(args, dest) != value:
            raise UserError(f"--options sets {dest} = {value} but --{dest} {getattr(args, dest)} was also given; "
                            f"pass one of them")
        setattr(args, dest, value)
        given = given | {dest}
    args.preset = preset_name(args.config) if args.config else None
    table: dict[str, Any] = dict(MMSEG_RECIPE)
    table.update({"model": "convvit_base_patch16", "deblur": False, "eval": ["mIoU"], "num_classes": 2})
    if args.preset:
        table.update(PRESETS[args.preset])
    applied: dict[str, Any] = {}
    for dest, value in table.items():
        if dest in ("global_batch", "deblur"):
            continue
        if dest in given or (hasattr(args, dest) and getattr(args, dest) is not None):
            continue
        setattr(args, dest, value)
        applied[dest] = value
    args.deblur_preset = bool(table["deblur"])
    if args.class_names is None:
        args.class_names = list(CLASS_NAMES_US) if args.num_classes == 2 else \
            ["background"] + [f"class_{i}" for i in range(1, args.num_classes)]
        applied["class_names"] = args.class_names
    if args.batch_size is None:
        per = table["global_batch"] // max(world_size * args.accum_iter, 1)
        if per < 1 or per * world_size * args.accum_iter != table["global_batch"]:
            raise UserError(f"the recipe's global batch {table['global_batch']} does not divide over {world_size} "
                            f"processes x --accum_iter {args.accum_iter}; pass --batch_size")
        args.batch_size = per
        applied["batch_size"] = per
    if args.output_dir is None:
        args.output_dir = os.path.join("work_dirs", args.preset) if args.preset else "./output_dir"
        applied["output_dir"] = args.output_dir
    if args.blr is not None and "lr" not in given:
        args.lr = args.blr * args.batch_size * args.accum_iter * world_size / 256
        applied["lr"] = args.lr
    elif args.blr is not None and "lr" in given:
        raise UserError("--lr and --blr both given; pass one of them (lr = blr x effective batch / 256)")
    if "epochs" in given and "max_iters" in given:
        raise UserError("--epochs and --max_iters both given; pass one of them")
    check_args(args)
    return applied


def schedule_lengths(args: argparse.Namespace, given: set[str], iters_per_pass: int) -> dict[str, Any]:
    """Iterations, validation interval and warm-up of the run once the training split's size is known:
    `--epochs` converts to iterations; unset --eval_freq = a tenth of the run (mmseg's 16000 of 160000);
    an unset warm-up longer than a tenth of the run is cut to a tenth. Returns what changed."""
    changed: dict[str, Any] = {}
    if args.epochs is not None:
        args.max_iters = args.epochs * iters_per_pass
        changed["max_iters"] = args.max_iters
    if args.eval_freq is None:
        args.eval_freq = max(1, math.ceil(args.max_iters / 10))
        changed["eval_freq"] = args.eval_freq
    args.eval_freq = min(args.eval_freq, args.max_iters)
    if "warmup_iters" not in given and args.warmup_iters > args.max_iters / 10:
        args.warmup_iters = args.max_iters // 10
        changed["warmup_iters"] = args.warmup_iters
    return changed


def poly_lr(iteration: float, args: argparse.Namespace) -> float:
    """mmseg's poly schedule with linear warm-up (by_epoch=False): lr_t = (lr - min_lr)(1 - t/T)^power + min_lr,
    multiplied during warm-up by 1 - (1 - t/W)(1 - warmup_ratio)."""
    t = min(max(iteration, 0.0), float(args.max_iters))
    lr = (args.lr - args.min_lr) * (1.0 - t / args.max_iters) ** args.power + args.min_lr
    if args.warmup_iters and t < args.warmup_iters:
        lr *= 1.0 - (1.0 - t / args.warmup_iters) * (1.0 - args.warmup_ratio)
    return lr
