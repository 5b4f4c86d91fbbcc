"""Command-line flags of iBOT / VisionFM self-distillation pretraining (main_ibot.py), torch-free so that
`--help` prints at once. main_pretrain.py hands its command line over here when it carries iBOT flags or an
`ibot_*` model, so VisionFM's README pretraining command runs verbatim through either script.

Defaults are VisionFM's pretraining defaults (`--recipe visionfm`); `--recipe ibot` fills the flags a user
did not type with iBOT's values instead.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from util.cli import (AMP_CHOICES, HelpFormatter, RangeRule, add_bool_flag, add_common_args, add_performance_args)

DESCRIPTION = """iBOT self-distillation pretraining (VisionFM encoders): a student ViT learns to match an EMA
teacher on the class token of other crops (DINO) and on masked patch tokens of the same crop (masked image
modelling). One encoder per imaging modality, as VisionFM trains them.

Examples:
  python main_ibot.py --data_path D --modality Fundus --name fundus_vitb --output_dir ./results
  # VisionFM's README command, verbatim (main_pretrain.py hands it over here):
  torchrun --nproc_per_node=4 main_pretrain.py --local-rank=0 --data_path D --modality Fundus \\
      --norm_last_layer true --epochs 400 --batch_size_per_gpu 12 --shared_head true --out_dim 8192 \\
      --output_dir ./results --global_crops_scale 0.32 1.0 --pred_ratio 0 0.3 --pred_ratio_var 0 0.2 \\
      --name Train_Random_Fundus --load_pretrain --pretrain_path dino_vitbase16_pretrain.pth
"""

# Where iBOT's released defaults differ from VisionFM's (the parser's defaults); flags a user types win.
RECIPES: dict[str, dict[str, object]] = {
    "visionfm": {},
    "ibot": {"warmup_teacher_temp": 0.04, "freeze_last_layer": 1, "lr": 5e-4, "warmup_epochs": 10,
             "min_lr": 1e-6, "global_crops_scale": [0.14, 1.0]},
}

# Flags that only iBOT pretraining has: one of them on a main_pretrain.py command line hands it over.
IBOT_ONLY_FLAGS = ("--batch_size_per_gpu", "--modality", "--out_dim", "--patch_out_dim", "--shared_head",
                   "--shared_head_teacher", "--norm_last_layer", "--momentum_teacher", "--global_crops_scale",
                   "--local_crops_scale", "--global_crops_number", "--local_crops_number", "--pred_ratio",
                   "--pred_ratio_var", "--pred_shape", "--pred_start_epoch", "--teacher_temp",
                   "--warmup_teacher_temp", "--teacher_patch_temp", "--warmup_teacher_patch_temp",
                   "--warmup_teacher_temp_epochs", "--freeze_last_layer", "--load_pretrain", "--pretrain_path",
                   "--name", "--lambda1", "--lambda2", "--weight_decay_end", "--arch", "--use_masked_im_modeling",
                   "--saveckp_freq", "--recipe", "--clip_grad_mode", "--centering",
                   "--koleo_loss_weight", "--local_crop_size")


def _flag_name(token: str) -> str:
    return token.split("=", 1)[0]


def wants_ibot(argv: Sequence[str]) -> bool:
    """True when a command line is an iBOT pretraining command: an iBOT-only flag, or `--model ibot_*`."""
    argv = list(argv)
    for i, token in enumerate(argv):
        if token == "--":
            break
        name = _flag_name(token)
        if name in IBOT_ONLY_FLAGS:
            return True
        if name == "--model":
            value = token.split("=", 1)[1] if "=" in token else (argv[i + 1] if i + 1 < len(argv) else "")
            if value.startswith("ibot_"):
                return True
    return False


def get_args_parser(prog: str = "main_ibot.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog, description=DESCRIPTION, formatter_class=HelpFormatter)
    c = p.add_argument_group("common options")
    c.add_argument("--data_path", default=None,
                   help="images: data_path/<Modality>/* (VisionFM layout, with --modality) or a plain folder")
    c.add_argument("--modality", default=None,
                   help="imaging modality: picks data_path/<Modality>/ and its normalisation statistics (Fundus, "
                        "OCT, FFA, External, SlitLamp, Ultrasound, UBM, MRI; VisionFM's spellings accepted)")
    c.add_argument("--output_dir", "--output", dest="output_dir", default="./output_dir",
                   help="results go to output_dir/name (output_dir itself without --name)")
    c.add_argument("--name", default=None, help="run name: the sub-folder of --output_dir for this run")
    c.add_argument("--recipe", default="visionfm", choices=sorted(RECIPES),
                   help="defaults for the flags you do not type: VisionFM's or iBOT's released values")
    c.add_argument("--epochs", "--epoch", dest="epochs", default=100, type=int, help="training epochs")
    c.add_argument("--batch_size_per_gpu", "--batch_size", dest="batch_size", default=128, type=int,
                   help="images per process")
    add_bool_flag(c, "--load_pretrain", default=False,
                  help="initialise the student and teacher from --pretrain_path (DINO, iBOT, VisionFM, RETFound or "
                       "medfound MAE weights)")
    c.add_argument("--pretrain_path", default=None, help="weights for --load_pretrain")
    c.add_argument("--resume", "--load_from", dest="resume", default="",
                   help="training checkpoint to continue from, or 'auto'")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="registered name, e.g. ibot_vit_base_patch16 (default: ibot_<--arch>_patch<--patch_size>)")
    g.add_argument("--arch", default="vit_base", choices=("vit_tiny", "vit_small", "vit_base", "vit_large"),
                   help="backbone size (VisionFM and iBOT's name)")
    g.add_argument("--patch_size", default=16, type=int, help="patch side in pixels")
    g.add_argument("--input_size", default=224, type=int, help="global crop side in pixels")
    g.add_argument("--local_crop_size", default=96, type=int, help="local crop side in pixels")
    g.add_argument("--out_dim", default=8192, type=int, help="class-token head outputs")
    g.add_argument("--patch_out_dim", default=8192, type=int, help="patch-token head outputs")
    add_bool_flag(g, "--shared_head", default=False, help="the student's patch tokens use the class-token head")
    add_bool_flag(g, "--shared_head_teacher", default=True, help="the same for the teacher")
    add_bool_flag(g, "--norm_last_layer", default=True,
                  help="freeze the weight-norm gain of the heads' last layer (more stable)")
    g.add_argument("--norm_in_head", default=None, help="normalisation inside the head (None, bn, ln, ...)")
    g.add_argument("--act_in_head", default="gelu", help="activation inside the head")
    g.add_argument("--drop_path", default=0.1, type=float, help="student stochastic depth")
    add_bool_flag(g, "--use_flash", default=False,
                  help="accepted for VisionFM command lines: attention runs through SDPA, which picks flash "
                       "kernels by itself where the GPU supports them")

    g = p.add_argument_group("self-distillation")
    g.add_argument("--momentum_teacher", default=0.996, type=float,
                   help="teacher EMA momentum at the start; a cosine schedule raises it to 1")
    g.add_argument("--teacher_temp", default=0.04, type=float, help="teacher class-token temperature")
    g.add_argument("--warmup_teacher_temp", default=0.07, type=float, help="its value at epoch 0 (iBOT: 0.04)")
    g.add_argument("--teacher_patch_temp", default=0.07, type=float, help="teacher patch-token temperature")
    g.add_argument("--warmup_teacher_patch_temp", default=0.04, type=float, help="its value at epoch 0")
    g.add_argument("--warmup_teacher_temp_epochs", default=30, type=int, help="epochs of temperature warm-up")
    g.add_argument("--lambda1", default=1.0, type=float, help="weight of the class-token loss")
    g.add_argument("--lambda2", default=1.0, type=float, help="weight of the masked patch-token loss")
    g.add_argument("--centering", default="center", choices=("center", "sinkhorn_knopp"),
                   help="teacher normalisation: iBOT's EMA centre, or DINOv2's Sinkhorn-Knopp assignment")
    g.add_argument("--koleo_loss_weight", default=0.0, type=float,
                   help="weight of DINOv2's KoLeo term spreading the student's class-token features (0: off)")
    g.add_argument("--freeze_last_layer", default=3, type=int,
                   help="epochs during which the heads' last layer gets no update (iBOT: 1)")

    g = p.add_argument_group("masked image modelling")
    add_bool_flag(g, "--use_masked_im_modeling", default=True, help="mask global crops for the student")
    g.add_argument("--pred_ratio", default=[0.3], type=float, nargs="+",
                   help="fraction of patches masked; several values: one is picked per image")
    g.add_argument("--pred_ratio_var", default=[0.0], type=float, nargs="+",
                   help="+- spread of each --pred_ratio value (uniform)")
    g.add_argument("--pred_shape", default="block", choices=("block", "rand"), help="masks of blocks or of patches")
    g.add_argument("--pred_start_epoch", default=0, type=int, help="no masking before this epoch")

    g = p.add_argument_group("multi-crop")
    g.add_argument("--global_crops_number", default=2, type=int, help="global crops per image")
    g.add_argument("--global_crops_scale", default=[0.32, 1.0], type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="area range of the global crops (iBOT: 0.14 1.0)")
    g.add_argument("--local_crops_number", default=0, type=int, help="local crops per image")
    g.add_argument("--local_crops_scale", default=[0.05, 0.4], type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="area range of the local crops")
    g.add_argument("--scheme", default="single", choices=("single",), help="VisionFM's data scheme (single only)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", default=7.5e-5, type=float,
                   help="peak learning rate per 256 images (scaled by batch x processes / 256; iBOT: 5e-4)")
    g.add_argument("--min_lr", default=2e-6, type=float, help="lr at the end of the cosine (iBOT: 1e-6)")
    g.add_argument("--warmup_epochs", default=50, type=int, help="epochs of linear lr warm-up (iBOT: 10)")
    g.add_argument("--weight_decay", default=0.04, type=float, help="weight decay at the start")
    g.add_argument("--weight_decay_end", default=0.4, type=float, help="weight decay at the end (cosine)")
    g.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd", "lars"), help="optimizer")
    g.add_argument("--clip_grad", default=3.0, type=float, help="gradient clipping threshold (0: none)")
    g.add_argument("--clip_grad_mode", default="global", choices=("global", "per_param"),
                   help="global: clip the total gradient norm; per_param: clip each parameter's gradient norm "
                        "separately (the iBOT/DINO/VisionFM code)")
    add_bool_flag(g, "--use_fp16", default=False,
                  help="fp16 mixed precision with loss scaling (same as --amp fp16); the default --amp auto uses "
                       "bf16 where the GPU supports it, which needs no loss scaling")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="mixed precision: auto = bf16 on capable GPUs, else fp32")
    g.add_argument("--max_nonfinite", default=5, type=int, help="stop after this many non-finite steps in a row")

    g = p.add_argument_group("output and resume")
    add_bool_flag(g, "--auto_resume", default=True, help="resume from the newest checkpoint in the run folder")
    g.add_argument("--start_epoch", default=0, type=int, help="first epoch (a resumed checkpoint sets it)")
    g.add_argument("--saveckp_freq", "--save_freq", dest="save_freq", default=40, type=int,
                   help="keep checkpoint-{epoch}.pth every N epochs")
    g.add_argument("--keep_last", default=0, type=int, help="periodic checkpoints to keep (0: all)")
    g.add_argument("--save_every_steps", default=0, type=int,
                   help="also checkpoint every N optimizer steps (mid-epoch resume for long epochs)")
    g.add_argument("--print_freq", default=10, type=int, help="progress line every N steps")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: <run folder>/tensorboard)")
    g.add_argument("--bad_image", default="skip", choices=("error", "skip"),
                   help="unreadable image: skip it (listed in the log, the same every epoch) or stop with its path")
    m = p.add_argument_group("monitoring (optional k-NN accuracy of the frozen teacher)")
    m.add_argument("--knn_data_path", default=None,
                   help="labelled folder (train/ and val/ class folders, or any layout main_finetune.py reads): "
                        "its train split is the k-NN memory bank, val (else test) the queries")
    m.add_argument("--knn_freq", default=10, type=int, help="k-NN accuracy every N epochs and after the last one")
    m.add_argument("--knn_k", default=20, type=int, help="neighbours that vote")
    m.add_argument("--knn_temperature", default=0.07, type=float, help="vote weight exp(cosine / T)")
    add_bool_flag(g, "--use_wandb", default=False, help="accepted for VisionFM command lines; ignored (no network)")
    g.add_argument("--dry_run", action="store_true", help="validate flags and data, print the plan, exit")
    g.add_argument("--inject_nonfinite", default="", help=argparse.SUPPRESS)  # test hook: poison these update steps
    add_performance_args(p)
    add_common_args(p)
    return p


# Value ranges checked before any work (util.cli.check_ranges).
RULES: list[RangeRule] = [
    ("epochs", ">=1"), ("batch_size", ">=1"), ("lr", ">0"), ("min_lr", ">=0"), ("warmup_epochs", ">=0"),
    ("weight_decay", ">=0"), ("weight_decay_end", ">=0"), ("clip_grad", ">=0", "0 turns clipping off"),
    ("momentum_teacher", ">=0 <=1", "e.g. 0.996"), ("teacher_temp", ">0"), ("warmup_teacher_temp", ">0"),
    ("teacher_patch_temp", ">0"), ("warmup_teacher_patch_temp", ">0"), ("warmup_teacher_temp_epochs", ">=0"),
    ("out_dim", ">=1"), ("patch_out_dim", ">=1"), ("drop_path", ">=0 <1"), ("freeze_last_layer", ">=0"),
    ("pred_ratio", ">=0 <1", "a fraction of the patches"), ("pred_ratio_var", ">=0 <1"),
    ("pred_start_epoch", ">=0"), ("global_crops_number", ">=1"), ("local_crops_number", ">=0"),
    ("global_crops_scale", ">0 <=1 ascending"), ("local_crops_scale", ">0 <=1 ascending"),
    ("input_size", ">=1"), ("local_crop_size", ">=1"), ("patch_size", ">=1"), ("lambda1", ">=0"),
    ("lambda2", ">=0"), ("koleo_loss_weight", ">=0"), ("num_workers", ">=0"), ("save_freq", ">=0"), ("max_nonfinite", ">=1"),
    ("knn_freq", ">=1"), ("knn_k", ">=1"), ("knn_temperature", ">0"),
]


def hand_over(argv: Sequence[str], prog: str) -> None:
    """Run an iBOT command line given to another script (main_pretrain.py): `--help` without torch, else
    main_ibot.main; exits with its status."""
    from util.cli import help_requested, run_main
    parser = get_args_parser(prog)
    if help_requested(argv):
        parser.print_help()
        sys.exit(0)
    import main_ibot
    run_main(main_ibot.main, parser, list(argv))
    sys.exit(0)
