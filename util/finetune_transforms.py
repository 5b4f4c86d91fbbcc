"""Image transforms of the labelled datasets (finetuning, linear probing, evaluation, prediction):
MAE's finetuning train/eval transforms, built from flags, and the decode size they need.

Pretraining's crop is `util.data.PretrainTransform`, which draws its parameters from a per-sample
generator instead.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from torchvision import transforms
from torchvision.transforms import InterpolationMode

from util.augment import make_pillow_safe
from util.cli import UserError
from util.data import resolve_norm


def build_transform(is_train: bool, input_size: int, mean: Sequence[float], std: Sequence[float],
                    aa: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.25, remode: str = "pixel",
                    recount: int = 1, color_jitter: float | None = None, interpolation: str = "bicubic",
                    uspec_eval_aug: bool = False, crop_scale: Sequence[float] = (0.08, 1.0)) -> Any:
    """MAE finetuning transforms, as MAE's main_finetune.py builds them.

    Train: timm `create_transform(is_training=True)` = RandomResizedCropAndInterpolation(scale
    `crop_scale` (MAE: .08-1), ratio 3/4-4/3) -> hflip .5 -> RandAugment `aa` (colour jitter off while AA is on, as in timm 0.3) ->
    ToTensor -> Normalize -> RandomErasing(reprob, remode, recount). Its posterize ops keep at least
    1 bit (`util.augment.make_pillow_safe`): timm asks for 0 at its strongest, which Pillow 13 rejects.
    Eval: Resize(int(size/crop_pct)) on the shorter side, crop_pct = 224/256 for size <= 224 else 1 ->
    CenterCrop(size) -> ToTensor -> Normalize. `uspec_eval_aug` returns the train transform for eval,
    reproducing USPEC, which evaluated with random crops and augmentation; use it only for comparisons.
    """
    input_size = int(input_size)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if is_train or uspec_eval_aug:
        from timm.data import create_transform
        if isinstance(aa, str) and aa.strip().lower() in ("", "none", "null"):
            aa = None
        try:
            train = create_transform(input_size=input_size, is_training=True, color_jitter=color_jitter,
                                     auto_augment=aa, interpolation=interpolation, re_prob=reprob,
                                     scale=tuple(float(c) for c in crop_scale),
                                     re_mode=remode, re_count=recount, mean=mean, std=std)
        except (AssertionError, ValueError, KeyError) as e:  # timm asserts on strings it cannot parse
            if aa is None:
                raise
            raise UserError(f"--aa {aa!r}: timm cannot build this augmentation ({str(e) or type(e).__name__}); use "
                            "e.g. rand-m9-mstd0.5-inc1, v0, original or augmix-m5-w3, or none") from None
        # Posterize with 0 bits (timm's strongest setting) is an error from Pillow 13 on: clamp to 1 bit.
        return make_pillow_safe(train)
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
              "nearest": InterpolationMode.NEAREST, "lanczos": InterpolationMode.LANCZOS}.get(
        interpolation, InterpolationMode.BICUBIC)
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_pct), interpolation=interp),  # same ratio as 224 <- 256
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def _compat_flags(args: Any) -> set[str]:
    c = getattr(args, "compat", None)
    if not c:
        return set()
    items = c.split(",") if isinstance(c, str) else list(c)
    return {str(x).strip() for x in items if str(x).strip()}


def uses_uspec_eval_aug(args: Any) -> bool:
    return bool(getattr(args, "uspec_eval_aug", False)) or "uspec_eval_aug" in _compat_flags(args)


def transform_from_args(is_train: bool, args: Any) -> Any:
    """`build_transform` with options read from an argparse namespace (missing fields get defaults)."""
    mean, std = getattr(args, "mean", None), getattr(args, "std", None)
    if mean is None or std is None:
        mean, std = resolve_norm(getattr(args, "norm_preset", None) or "imagenet", mean, std)
    return build_transform(is_train, getattr(args, "input_size", 224), mean, std,
                           aa=getattr(args, "aa", "rand-m9-mstd0.5-inc1"), reprob=getattr(args, "reprob", 0.25),
                           remode=getattr(args, "remode", "pixel"), recount=getattr(args, "recount", 1),
                           color_jitter=getattr(args, "color_jitter", None),
                           interpolation=getattr(args, "interpolation", None) or "bicubic",
                           uspec_eval_aug=uses_uspec_eval_aug(args),
                           crop_scale=getattr(args, "crop_scale", None) or (0.08, 1.0))


def decode_min_side(is_train: bool, input_size: int, min_scale: float = 0.08) -> int:
    """Shorter side a decoded image needs so that the transform still only shrinks it: evaluation
    resizes the shorter side to input_size / crop_pct; training's RandomResizedCrop (scale >= 0.08,
    ratio >= 3/4) can take a crop whose shorter side is sqrt(0.08 * 3/4) of the image's."""
    if is_train:
        return math.ceil(input_size / math.sqrt(min_scale * 3 / 4))
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return int(input_size / crop_pct)
