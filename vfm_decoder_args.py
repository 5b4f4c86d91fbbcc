"""Flags of the VisionFM decoder command (main_vfm_decoder.py and the evaluation/ scripts), torch-free so
that `--help` is instant."""
from __future__ import annotations

import argparse

import vfm_args
from util.cli import HelpFormatter

DESCRIPTION = """VisionFM's decoders on frozen encoders: single-label / binary / multi-label classification, biomarker
regression and progression forecasting (--task). Inputs: images through a frozen encoder (--pretrained_weights
+ --data_path) or extracted feature sets (--datasets A B under --data_path, concatenated per image id)."""
TASK_CHOICES = ("cls", "multi_cls", "metric_reg", "forecasting")
DEFAULT_OUTPUTS = {"multi_cls": 13, "metric_reg": 38, "forecasting": 1}


def get_args_parser(prog: str = "main_vfm_decoder.py", task: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog, description=DESCRIPTION, formatter_class=HelpFormatter)
    g = p.add_argument_group("decoder")
    g.add_argument("--task", default=task or "cls", choices=TASK_CHOICES, help="what the decoder predicts")
    g.add_argument("--name", default="", help="run name: outputs go to output_dir/name")
    g.add_argument("--output_dir", default="./results", help="folder of the run's outputs")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: <output>/tensorboard)")
    g.add_argument("--data_path", default=None, help="image data root (VisionFM label files or ImageNet folders), "
                   "or the folder holding the feature sets named by --datasets")
    g.add_argument("--datasets", nargs="+", default=None,
                   help="feature sets under --data_path; several are concatenated per image id (multi-modal)")
    g.add_argument("--dataset_format", default="vfm", choices=("vfm", "ImageNet"),
                   help="image layout: VisionFM label files, or ImageNet folders train/ and test/ (<class>/<image>)")
    g.add_argument("--num_labels", default=None, type=int,
                   help="outputs: classes (1 = binary with one logit), labels (13), targets (38); forecasting "
                        "always has one logit and accepts any value here")
    g.add_argument("--embed_dim", default=None, type=int,
                   help="accepted for VisionFM's command lines; the head's input width is read from the features")
    g.add_argument("--epochs", default=100, type=int, help="training epochs")
    g.add_argument("--lr", default=1e-3, type=float, help="base learning rate, scaled by batch x processes / 256")
    g.add_argument("--weight_decay", default=0.05, type=float, help="AdamW weight decay")
    g.add_argument("--val_freq", default=1, type=int, help="log test metrics every this many epochs (monitoring)")
    g.add_argument("--load_from", default=None, help="a decoder checkpoint: initialise the head from it")
    g.add_argument("--test", action="store_true", help="with --load_from: evaluate on the test split only")
    g.add_argument("--head_type", default="cls_head", choices=("cls_head", "linear"),
                   help="VisionFM's ClsHead/RegHead (BatchNorm + MLP) or one linear layer")
    g.add_argument("--head_layers", default=3, type=int, choices=(1, 2, 3), help="ClsHead depth")
    g.add_argument("--max_len", default=6500, type=int, help="forecasting: interval table length in days")
    g.add_argument("--pos_weight", default=10.0, type=float, help="forecasting: BCE weight of positive samples")
    g.add_argument("--reg_loss", default="smooth_l1", choices=("smooth_l1", "mse"),
                   help="regression loss on the standardised targets")
    g.add_argument("--target_names", nargs="+", default=None, help="regression: one name per target")
    g.add_argument("--interval_buckets", nargs="+", type=float, default=[365.0, 730.0, 1095.0],
                   help="forecasting: bucket edges in days for AUROC per interval")
    g.add_argument("--n_boot", default=1000, type=int, help="bootstrap resamples of the 95%% CIs (0: none)")
    vfm_args.add_encoder_args(p)
    return p


RULES = [("epochs", ">=0"), ("lr", ">0"), ("weight_decay", ">=0"), ("val_freq", ">=1"), ("max_len", ">=1"),
         ("pos_weight", ">0"), ("n_boot", ">=0"), ("num_labels", ">=1"), ("batch_size_per_gpu", ">=1"),
         ("num_workers", ">=0")]
