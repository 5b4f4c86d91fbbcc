#!/usr/bin/env python
"""Write a synthetic fundus / ultrasound dataset with learnable labels.

Named after VisionFM's ``random_data.py``, but the images are not noise: they
are procedural fundus photos / B-mode ultrasound frames whose class is the
number of lesions (see ``util/synthetic.py``), so a model trained on them must
actually learn something.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Dict, List, Optional, Union

from PIL import Image, ImageDraw

from util import synthetic, synthetic_seg, synthetic_vfm
from util.cli import HelpFormatter

PROG = "random_data.py"
US_SEGMENTATION = "us_segmentation"

EPILOG = f"""\
label rule: class 0 = no lesion, class k>=1 = 3k-1..3k lesions
  (k=1: 2-3, k=2: 5-6, ...); regression target = lesion area fraction.

layouts:
  imagefolder   DIR/<split>/class_<k>/<i>.png
  flat          DIR/images/<i>.png                      (unlabelled, pretraining)
  vfm           DIR/dataset_A/{{training,val,test}}/<i>.png + <split>_labels.txt
                ("training/00000.png;1", or "training/00000.png;0,1,0" with --multilabel)
  segmentation  DIR/dataset_A/<split>/{{images,labels}}/<i>.png   (labels: L-mode 0..C-1)
  landmark      DIR/dataset_A/<split>/images/<i>.png + labels/<i>.npy (H,W,2)

VisionFM tasks (--task, --dst_dir, --num per split, --img_size; names <i:08d>.png, test after training):
  pretrain      DST/<Modality>/<i>.png  (Fundus, OCT, External, UltraSound, FFA, SiltLamp)
  single_cls    DST/FundusClassification/dataset_A/{{training,test}}/ + {{training,test}}_labels.txt  ("training/x.png;k",
                k = DR grade = lesion-count band)
  multi_cls     DST/{{Fundus,OCT}}ClassificationMulti/dataset_A/... 13 values: one-hot DR grade (cols 0-4),
                DR (col 5 = grade != 0), Glaucoma, AMD, Cataract, Hypertensive Retinopathy, RVO, Myopia, RD;
                the same subject (file name, labels) in both modalities
  metric_reg    DST/{{Fundus,External}}Regression/dataset_A/... 38 biomarkers, empty field = missing (3%),
                names in dataset_A/target_names.txt
  forecasting   DST/{{training,test}}/ + {{training,test}}_labels.txt  ("training/x.png, label, days")
  segmentation  DST/VesselSegmentation/dataset_A/<split>/{{images,labels}}/  (labels 0 bg, 1 exudate, 2 haemorrhage)
  landmark      DST/LandmarkDetection/dataset_A/<split>/{{images/*.png,labels/*.npy}}  (H,W,3: disc, fovea, FOV centre)

ultrasound nodule segmentation (--task us_segmentation, TN3K-like, --num per split train/val/test):
  --layout mmseg     DST/images/<split>/*.png + DST/masks_1/<split>/*.png (0/1); --gaussian adds images_gaussian/
  --layout seg_unet  DST/images_gaussian/<split>/*.png (blurred) + DST/masks/<split>/*.png (255 = nodule)

examples:
  python {PROG} --output_dir /tmp/fundus_cls --kind fundus --n_per_class 50
  python {PROG} --output_dir /tmp/us --kind ultrasound --layout vfm --multilabel --num_classes 3
  python {PROG} --output_dir /tmp/x --preview docs/synthetic_examples.png
  python {PROG} --task multi_cls --dst_dir ./dataset/multi_cls_random --num 50 --img_size 224
  python {PROG} --task us_segmentation --layout mmseg --gaussian --dst_dir ./dataset/tn3k_random --num 40 --img_size 128
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        sys.exit(f"{PROG}: error: {message}")


def _parse_splits(text: str) -> Dict[str, Union[int, float]]:
    """``train=0.6,val=0.2,test=0.2`` (fractions) or ``train=30,test=10`` (counts)."""
    out: Dict[str, Union[int, float]] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ValueError(f"bad --splits entry {part!r}; expected NAME=VALUE")
        try:
            out[name] = int(value) if value.isdigit() else float(value)
        except ValueError:
            raise ValueError(f"bad --splits value {value!r} for {name!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Generate a deterministic synthetic medical-imaging dataset (fundus or ultrasound) "
        "whose labels are learnable: class = lesion count band.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--output_dir", "--dst_dir", dest="output_dir", default=None,
                   help="root folder to write into (created if missing); --dst_dir is VisionFM's name")
    p.add_argument("--task", default=None, choices=synthetic_vfm.VFM_TASKS + (US_SEGMENTATION,),
                   help="write VisionFM's layout of this task instead (see 'VisionFM tasks' below), or "
                   "us_segmentation: ultrasound nodule masks in DeblurringMAE's mmseg / seg_unet layouts")
    p.add_argument("--num", type=int, default=500, help="--task: images per split (default: 500)")
    p.add_argument("--img_size", type=int, default=512, help="--task: image side in pixels (default: 512)")
    p.add_argument("--kind", default="fundus", choices=synthetic.KINDS, help="image kind (default: fundus)")
    p.add_argument("--layout", default=None, choices=synthetic.LAYOUTS + synthetic_seg.US_SEG_LAYOUTS,
                   help="folder layout (default: imagefolder; --task us_segmentation: mmseg or seg_unet, default mmseg)")
    p.add_argument("--gaussian", action="store_true",
                   help="--task us_segmentation --layout mmseg: also write the blurred images_gaussian/ copies")
    p.add_argument("--num_classes", type=int, default=None,
                   help=f"classes, 2..{synthetic.MAX_NUM_CLASSES} (default: 2; --task single_cls: 5 DR grades)")
    p.add_argument("--n_per_class", type=int, default=20, help="images per class over all splits (default: 20)")
    p.add_argument("--splits", default="train=0.6,val=0.2,test=0.2",
                   help="NAME=FRACTION of n_per_class, or NAME=COUNT per class (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help=f"image side in pixels, >= {synthetic.MIN_SIZE} (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="base seed; same arguments give identical files (default: 0)")
    p.add_argument("--multilabel", action="store_true", help="vfm layout: multi-hot lesion-type labels")
    p.add_argument("--image_format", default="png", choices=("png", "jpg"), help="image file format (default: png)")
    p.add_argument("--bit_depth", type=int, default=8, choices=(8, 16), help="16: 16-bit grayscale PNG (default: 8)")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="1: 8-bit grayscale images (default: 3)")
    p.add_argument("--dataset_name", default=None, help="sub-folder for vfm/segmentation/landmark/flat layouts")
    p.add_argument("--preview", metavar="PNG", default=None,
                   help="also save a grid of samples (each kind x class) to this PNG")
    return p


def save_preview(path: str, num_classes: int = 2, size: int = 112, per_row: int = 6, seed: int = 0) -> None:
    """Grid of samples with row captions, palette-quantised to stay small."""
    grid = synthetic.preview_grid(size=size, per_row=per_row, num_classes=num_classes, seed=seed)
    gutter = 96
    canvas = Image.new("RGB", (grid.shape[1] + gutter, grid.shape[0]), (0, 0, 0))
    canvas.paste(Image.fromarray(grid), (gutter, 0))
    draw = ImageDraw.Draw(canvas)
    row = 0
    for kind in synthetic.KINDS:
        for k in range(num_classes):
            lo, hi = synthetic.lesion_count_range(k, num_classes)
            lesions = "no lesion" if hi == 0 else f"{lo}-{hi} lesions"
            draw.text((6, row * size + size // 2 - 14), f"{kind}\nclass {k}\n{lesions}", fill=(230, 230, 230))
            row += 1
    q = canvas.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    q.save(path, format="PNG", optimize=True)


def _check_writable(path: str) -> Optional[str]:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test."):
            pass
    except OSError as e:
        return f"output dir {path!r} is not writable: {e.strerror or e}"
    return None


def _main_task(args: argparse.Namespace) -> int:
    """VisionFM's `random_data.py --task T --dst_dir D [--num N --img_size S]`."""
    if args.num <= 0:
        sys.exit(f"{PROG}: error: --num must be > 0 images per split, got {args.num}")
    if args.task == US_SEGMENTATION and args.layout not in (None,) + synthetic_seg.US_SEG_LAYOUTS:
        sys.exit(f"{PROG}: error: --task {US_SEGMENTATION} writes --layout "
                 f"{' or '.join(synthetic_seg.US_SEG_LAYOUTS)}, got --layout {args.layout}")
    if args.gaussian and not (args.task == US_SEGMENTATION and (args.layout or "mmseg") == "mmseg"):
        sys.exit(f"{PROG}: error: --gaussian is for --task {US_SEGMENTATION} --layout mmseg "
                 "(seg_unet images are always the blurred images_gaussian/)")
    if args.img_size < synthetic.MIN_SIZE:
        sys.exit(f"{PROG}: error: --img_size must be >= {synthetic.MIN_SIZE}, got {args.img_size}")
    if args.seed < 0:
        sys.exit(f"{PROG}: error: --seed must be >= 0, got {args.seed}")
    err = _check_writable(args.output_dir)
    if err:
        sys.exit(f"{PROG}: error: {err}")
    try:
        if args.task == US_SEGMENTATION:
            summary = synthetic_seg.write_us_segmentation(args.output_dir, args.layout or "mmseg", num=args.num,
                                                          size=args.img_size, seed=args.seed, gaussian=args.gaussian)
        else:
            summary = synthetic_vfm.write_vfm_task(args.output_dir, args.task, num=args.num, img_size=args.img_size,
                                                   seed=args.seed, num_classes=args.num_classes or 5)
    except ValueError as e:
        sys.exit(f"{PROG}: error: {e}")
    except OSError as e:
        sys.exit(f"{PROG}: error: cannot write: {e}")
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.output_dir is None:
        sys.exit(f"{PROG}: error: --output_dir (or --dst_dir) is required")
    if args.task is not None:
        return _main_task(args)
    if args.num_classes is None:
        args.num_classes = 2
    if args.layout in synthetic_seg.US_SEG_LAYOUTS:
        sys.exit(f"{PROG}: error: --layout {args.layout} is written by --task {US_SEGMENTATION}")
    if args.gaussian:
        sys.exit(f"{PROG}: error: --gaussian is for --task {US_SEGMENTATION} --layout mmseg")
    args.layout = args.layout or "imagefolder"
    if args.size < synthetic.MIN_SIZE:
        sys.exit(f"{PROG}: error: --size must be >= {synthetic.MIN_SIZE}, got {args.size}")
    if not 2 <= args.num_classes <= synthetic.MAX_NUM_CLASSES:
        sys.exit(f"{PROG}: error: --num_classes must be in [2, {synthetic.MAX_NUM_CLASSES}], got {args.num_classes}")
    if args.n_per_class < 0:
        sys.exit(f"{PROG}: error: --n_per_class must be >= 0, got {args.n_per_class}")
    if args.seed < 0:
        sys.exit(f"{PROG}: error: --seed must be >= 0, got {args.seed}")
    try:
        splits = _parse_splits(args.splits)
    except ValueError as e:
        sys.exit(f"{PROG}: error: {e}")
    err = _check_writable(args.output_dir)
    if err:
        sys.exit(f"{PROG}: error: {err}")
    try:
        summary = synthetic.write_dataset(
            args.output_dir, kind=args.kind, layout=args.layout, num_classes=args.num_classes,
            n_per_class=args.n_per_class, splits=splits, size=args.size, seed=args.seed,
            image_format=args.image_format, multilabel=args.multilabel, bit_depth=args.bit_depth,
            channels=args.channels, dataset_name=args.dataset_name,
        )
        if args.preview:
            save_preview(args.preview, num_classes=min(args.num_classes, 3), seed=args.seed)
    except ValueError as e:
        sys.exit(f"{PROG}: error: {e}")
    except OSError as e:
        sys.exit(f"{PROG}: error: cannot write: {e}")
    # File lists can be long; the counts say what was written.
    short = {k: v for k, v in summary.items() if k != "files"}
    if args.preview:
        short["preview"] = args.preview
    print(json.dumps(short, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
