"""timm augmentation made safe for every Pillow >= 10, and one-line reports of failing transform steps.

timm's RandAugment / AutoAugment / AugMix ops (timm 1.0.x, `timm.data.auto_augment`) pass Pillow
arguments it no longer accepts in one case: posterize with 0 bits (and, with `mmax` above 10,
negative bits). `PosterizeIncreasing` keeps `4 - int(m * 0.4)` bits, 0 at magnitude 10, which the
default `rand-m9-mstd0.5-inc1` reaches whenever its Gaussian magnitude draw clips at 10 (about one
image in 650); `Posterize` keeps `int(m * 0.4)`, 0 below magnitude 2.5 (AutoAugment `v0` applies it
at magnitude 2 in one sub-policy). Pillow < 13 turned 0 bits into an all-black image; Pillow 13
raises `ValueError: bits must be between or equal to 1 and 8`. Every other op's arguments are valid
for RGB images on every magnitude, with and without `mmax` (checked in tests/test_augment_safety.py);
the datasets hand transforms RGB images only (on 'L' images the geometric ops' RGB fill colour is
rejected).
"""
from __future__ import annotations

import traceback
from typing import Any, Iterator

from PIL import Image, ImageOps
from torchvision import transforms as T

from util.cli import UserError
from util.skipping import sample_failure

# Training steps a flag turns off, and that flag (named in the hint of a failure's one-line error).
_AUGMENT_STEPS = {"RandAugment": "--aa none", "AutoAugment": "--aa none", "AugMixAugment": "--aa none",
                  "RandomErasing": "--reprob 0"}


def safe_posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's `posterize` with the kept bits clamped to [1, 8]: identical for 1..8 bits.

    0 bits (or fewer) becomes 1 bit, the strongest posterize Pillow accepts, instead of the
    all-black image older Pillow made of it: a black image under a class label teaches nothing,
    and 1 bit is the same direction of change at the end of the magnitude scale.
    """
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    return ImageOps.posterize(img, max(1, bits))


def augment_ops(transform: Any) -> Iterator[Any]:
    """Every timm `AugmentOp` inside a transform: RandAugment/AugMix `.ops`, AutoAugment `.policy`
    (a list of sub-policies), looked for in a torchvision `Compose` or the transform itself."""
    steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
    for step in steps:
        ops: list[Any] = list(getattr(step, "ops", None) or [])
        for sub in getattr(step, "policy", None) or []:
            ops.extend(sub if isinstance(sub, (list, tuple)) else [sub])
        for op in ops:
            if hasattr(op, "aug_fn") and hasattr(op, "name"):
                yield op


def make_pillow_safe(transform: Any) -> Any:
    """Replace the posterize function of every timm op in `transform` by `safe_posterize` (in place;
    idempotent). Random draws are untouched, so every image timm produced without error is unchanged."""
    for op in augment_ops(transform):
        if str(op.name).startswith("Posterize"):  # Posterize, PosterizeIncreasing, PosterizeOriginal
            op.aug_fn = safe_posterize
    return transform


def _failing_op(exc: BaseException) -> str | None:
    """Name of the innermost timm AugmentOp on the exception's traceback, if any."""
    name = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if type(obj).__name__ == "AugmentOp":
            name = getattr(obj, "name", None)
    return name


def apply_transform(transform: Any, img: Any, path: str) -> Any:
    """`transform(img)`, one step at a time for a `Compose` (the same calls in the same order), so a
    failure names the step and the image: a `SampleError` the command line prints as one line."""
    steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
    for step in steps:
        try:
            img = step(img)
        except UserError:  # already one line (bad settings, paired images of different sizes)
            raise
        except Exception as e:  # noqa: BLE001 - re-raised as one line naming the step and the file
            kind = type(step).__name__
            op = _failing_op(e)
            off = _AUGMENT_STEPS.get(kind)
            hint = "please report it with this image"
            if off:
                hint += f"; {off} turns {kind} off"
            raise sample_failure(f"transform {kind}" + (f" ({op})" if op else ""), path, e, hint) from e
    return img
