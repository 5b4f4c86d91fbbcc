"""Flags of VisionFM's dense decoders (main_vfm_dense.py, evaluation/train_seg_decoder.py and
evaluation/train_landmark_decoder.py), torch-free so that `--help` is instant.

VisionFM's own flags keep their names and defaults (segmentation: `--input_size 512 --modality Fundus`;
landmarks: `--modality UBM --num_labels 3 --input_size 224`). Its segmentation and landmark scripts use
AdamW (weight decay 0.05) at the `--lr` given, not scaled by the batch, and a constant learning rate (the
StepLR they create is never stepped): `--lr_schedule constant` is that behaviour and the default.
"""
from __future__ import annotations

import argparse

import vfm_args
from util.cli import HelpFormatter, RangeRule, UserError

DESCRIPTION = """VisionFM's dense decoders on a frozen ViT encoder (--task): seg = UNETR (Unetr_Head, VisionFM's module
names) or linear head on four intermediate blocks, Dice + focal/CE loss, binary (--num_labels 1) or multi-class
masks; landmark = Gaussian heatmaps decoded by argmax, mean radial error. Inputs: images through the frozen encoder
(--pretrained_weights + --data_path), or, for seg with the linear head, feature maps written by
main_vfm_features.py --mode seg (--datasets NAME under --data_path)."""
TASKS = ("seg", "landmark")
# Per-task defaults that differ from the shared encoder flags (VisionFM's scripts and README).
TASK_DEFAULTS: dict[str, dict[str, object]] = {
    "seg": {"input_size": 512, "modality": "Fundus", "batch_size_per_gpu": 5, "num_labels": None},
    "landmark": {"input_size": 224, "modality": "UBM", "batch_size_per_gpu": 32, "num_labels": 3},
}


def get_args_parser(prog: str = "main_vfm_dense.py", task: str | None = None) -> argparse.ArgumentParser:
    """The parser; `task` fixes the defaults of VisionFM's script of that task (the evaluation/ entry points)."""
    task = task or "seg"
    p = argparse.ArgumentParser(prog, description=DESCRIPTION, formatter_class=HelpFormatter)
    g = p.add_argument_group("decoder")
    g.add_argument("--task", default=task, choices=TASKS, help="segmentation or landmark detection")
    g.add_argument("--name", default="", help="run name: outputs go to output_dir/name")
    g.add_argument("--output_dir", default="./results", help="folder of the run's outputs")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: <output>/tensorboard)")
    g.add_argument("--data_path", default=None,
                   help="data root: <dataset>/{training,test}/{images,labels}/ (VisionFM; segmentation also reads "
                        "the mmseg images/{split} + masks_1/{split} and SEG_UNET layouts), or the folder of the "
                        "--datasets feature set")
    g.add_argument("--datasets", nargs="+", default=None,
                   help="seg with --head_type linear: a feature set under --data_path written by "
                        "main_vfm_features.py --mode seg (the four block maps per image)")
    g.add_argument("--num_labels", default=None, type=int,
                   help="seg: classes (1 = binary foreground with one logit; C = mask values 0..C-1); landmark: "
                        "landmarks per image (3 = VisionFM's anterior-chamber-angle points)")
    g.add_argument("--head_type", default="unetr", choices=("unetr", "linear"),
                   help="seg: VisionFM's Unetr_Head (blocks + image skip) or a 1x1 conv on the 4 concatenated levels")
    g.add_argument("--class_names", nargs="+", default=None,
                   help="names of the classes (seg, background first; binary: the foreground only or both) or of "
                        "the landmarks, for the tables and figures")
    g.add_argument("--epochs", default=100, type=int, help="training epochs")
    g.add_argument("--lr", default=1e-3, type=float, help="AdamW learning rate (as given: VisionFM does not scale it "
                                                          "by the batch here)")
    g.add_argument("--lr_schedule", default="constant", choices=("constant", "cosine"),
                   help="constant = VisionFM's behaviour; cosine = from --lr to 0 over the epochs, per iteration")
    g.add_argument("--weight_decay", default=0.05, type=float, help="AdamW weight decay")
    g.add_argument("--loss", default="dice_focal", choices=("dice_focal", "dice_ce"),
                   help="seg loss: Dice + focal (VisionFM's MONAI DiceFocalLoss) or Dice + cross-entropy")
    g.add_argument("--val_freq", default=10, type=int, help="log test metrics every this many epochs (monitoring "
                                                           "only: the saved head is the last epoch's)")
    g.add_argument("--load_from", default=None, help="a decoder checkpoint: initialise the head from it")
    g.add_argument("--test", action="store_true", help="with --load_from: evaluate on the test split only")
    g.add_argument("--n_boot", default=1000, type=int, help="bootstrap resamples over images of the 95%% CIs (0: none)")
    g.add_argument("--n_overlays", default=8, type=int, help="test images drawn in the overlay figure")
    lm = p.add_argument_group("landmarks")
    lm.add_argument("--labels_csv", default=None,
                    help="landmark coordinates instead of .npy point maps: a CSV with a header, columns "
                         "image,x1,y1,x2,y2,... (original pixels; image relative to --data_path, a split column "
                         "'split' = train/test optional)")
    lm.add_argument("--flip_pairs", nargs="+", default=[], metavar="I:J",
                    help="left/right landmark identities swapped by a horizontal flip, e.g. 0:2")
    lm.add_argument("--sigma", default=2.0, type=float, help="Gaussian heatmap sigma in input pixels")
    lm.add_argument("--radii", nargs="+", type=float, default=[2.0, 4.0, 8.0],
                    help="success-detection radii in pixels of the input (SDR within r px)")
    lm.add_argument("--pixel_spacing", default=None, type=float,
                    help="mm per pixel of the original images: adds the radial error in mm")
    vfm_args.add_encoder_args(p)
    defaults = TASK_DEFAULTS[task]
    for action in p._actions:  # on the actions, not set_defaults: the flags a user typed stay tellable apart
        if action.dest in defaults:
            action.default = defaults[action.dest]
    return p


RULES: list[RangeRule] = [
    ("epochs", ">=0"), ("lr", ">0"), ("weight_decay", ">=0"), ("val_freq", ">=1"), ("n_boot", ">=0"),
    ("num_labels", ">=1"), ("n_overlays", ">=0"), ("sigma", ">0"), ("radii", ">0 ascending"),
    ("pixel_spacing", ">0"), ("batch_size_per_gpu", ">=1"), ("num_workers", ">=0"),
]


def parse_flip_pairs(values: list[str], num_landmarks: int) -> list[tuple[int, int]]:
    """`['0:2', '3:4']` -> [(0, 2), (3, 4)]; each index a landmark, none paired twice (one-line errors)."""
    pairs: list[tuple[int, int]] = []
    seen: set[int] = set()
    for v in values:
        parts = str(v).split(":")
        try:
            a, b = (int(x) for x in parts)
        except ValueError:
            raise UserError(f"--flip_pairs {v}: expected I:J, two landmark indices such as 0:2") from None
        if not (0 <= a < num_landmarks and 0 <= b < num_landmarks) or a == b:
            raise UserError(f"--flip_pairs {v}: indices must be two different landmarks in 0..{num_landmarks - 1}")
        if a in seen or b in seen:
            raise UserError(f"--flip_pairs {v}: landmark {a if a in seen else b} is already in another pair")
        seen.update((a, b))
        pairs.append((a, b))
    return pairs
