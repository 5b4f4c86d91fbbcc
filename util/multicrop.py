"""iBOT / VisionFM multi-crop augmentation and the pretraining dataset that pairs crops with token masks.

Per image: global crop 1 (RandomResizedCrop at `global_size`, bicubic, then horizontal flip p .5, colour
jitter (brightness .4, contrast .4, saturation .2, hue .1) p .8, grayscale p .2, Gaussian blur with a
radius ~ U(.1, 2) always), further global crops (same, but blur p .1 and solarize (threshold 128) p .2),
and `local_crops_number` local crops at 96 px (`local_crops_scale`, blur p .5). VisionFM draws crop aspect
ratios in (0.8, 1.2) and global scales in (0.32, 1); iBOT in (3/4, 4/3) and (0.14, 1). Crops are
normalised with the modality's statistics (VisionFM) or ImageNet's (iBOT).

Every draw comes from one `torch.Generator` seeded by (seed, epoch, index) (torchvision's transforms draw
from the global RNG, so they are re-implemented here with the same distributions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from util.cli import UserError
from util.data import load_image, rrc_params, sample_generator, sample_seed
from util.skipping import read_or_skip, sample_failure, SkippedSample
from util.masking import iBOTMasker, mask_generators

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _u(g: torch.Generator) -> float:
    return torch.rand(1, generator=g).item()


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * _u(g)


def color_jitter(im: Image.Image, g: torch.Generator, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1) -> Image.Image:
    """torchvision's ColorJitter: the four adjustments in a random order, factors uniform around 1
    (hue: around 0)."""
    order = torch.randperm(4, generator=g).tolist()
    b = _uniform(g, 1 - brightness, 1 + brightness)
    c = _uniform(g, 1 - contrast, 1 + contrast)
    s = _uniform(g, 1 - saturation, 1 + saturation)
    h = _uniform(g, -hue, hue)
    for i in order:
        if i == 0:
            im = TF.adjust_brightness(im, b)
        elif i == 1:
            im = TF.adjust_contrast(im, c)
        elif i == 2:
            im = TF.adjust_saturation(im, s)
        else:
            im = TF.adjust_hue(im, h)
    return im


@dataclass
class CropRecipe:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0


@dataclass
class MultiCropTransform:
    """PIL image + generator -> [global crops..., local crops...] as (3, S, S) tensors: float normalised
    with `mean`/`std`, or uint8 with `output='uint8'` (normalise on the device with
    `util.data.DeviceNormalize(mean, std)`: identical values)."""
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    global_crops_number: int = 2
    local_crops_number: int = 0
    global_size: int = 224
    local_size: int = 96
    ratio: tuple[float, float] = (0.8, 1.2)
    output: str = "float"

    def __post_init__(self) -> None:
        for flag, (lo, hi) in (("--global_crops_scale", self.global_crops_scale),
                               ("--local_crops_scale", self.local_crops_scale)):
            if not 0 < lo <= hi <= 1:
                raise UserError(f"{flag} {lo} {hi}: need 0 < min <= max <= 1")
        if self.global_crops_number < 1 or self.local_crops_number < 0:
            raise UserError("--global_crops_number must be >= 1 and --local_crops_number >= 0")
        if self.output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {self.output!r}")

    def recipes(self) -> list[CropRecipe]:
        first = CropRecipe(self.global_size, self.global_crops_scale, blur_p=1.0)
        rest = CropRecipe(self.global_size, self.global_crops_scale, blur_p=0.1, solarize_p=0.2)
        local = CropRecipe(self.local_size, self.local_crops_scale, blur_p=0.5)
        return [first] + [rest] * (self.global_crops_number - 1) + [local] * self.local_crops_number

    def crop(self, im: Image.Image, recipe: CropRecipe, g: torch.Generator) -> torch.Tensor:
        top, left, h, w = rrc_params(im.width, im.height, recipe.scale, self.ratio, g)
        out = TF.resized_crop(im, top, left, h, w, [recipe.size, recipe.size], InterpolationMode.BICUBIC,
                              antialias=True)
        if _u(g) < 0.5:
            out = TF.hflip(out)
        if _u(g) < 0.8:
            out = color_jitter(out, g)
        if _u(g) < 0.2:
            out = TF.rgb_to_grayscale(out, num_output_channels=3)
        if _u(g) < recipe.blur_p:
            out = out.filter(ImageFilter.GaussianBlur(radius=_uniform(g, 0.1, 2.0)))
        if recipe.solarize_p > 0 and _u(g) < recipe.solarize_p:
            out = ImageOps.solarize(out, 128)
        t = TF.pil_to_tensor(out)
        return t if self.output == "uint8" else TF.normalize(t.float().div(255), list(self.mean), list(self.std))

    def __call__(self, image: Image.Image, g: torch.Generator) -> list[torch.Tensor]:
        image = image.convert("RGB")
        return [self.crop(image, r, g) for r in self.recipes()]


def multicrop_for(recipe: str = "visionfm", modality: str | None = "Fundus", **overrides: Any) -> MultiCropTransform:
    """The reference recipe's transform: `visionfm` (aspect (0.8, 1.2), global scale (0.32, 1), the
    modality's statistics) or `ibot` (aspect (3/4, 4/3), global scale (0.14, 1), ImageNet statistics);
    `overrides` set any field (crop numbers and scales from the command line)."""
    if recipe == "visionfm":
        from util.modalities import modality_stats
        stats = modality_stats(modality or "Fundus")
        base: dict[str, Any] = dict(mean=stats.mean, std=stats.std, global_crops_scale=(0.32, 1.0), ratio=(0.8, 1.2))
    elif recipe == "ibot":
        base = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, global_crops_scale=(0.14, 1.0), ratio=(3 / 4, 4 / 3))
    else:
        raise UserError(f"unknown --recipe '{recipe}'; choose visionfm or ibot")
    base.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None})
    return MultiCropTransform(**base)


class MultiCropDataset(Dataset):
    """iBOT pretraining samples `{'crops': [tensors], 'masks': [bool (h, w) per global crop], 'index'}`.

    Keys are `(epoch, index)` (from `util.data.EpochIndexSampler`) or a bare index (epoch 0). Crops draw
    from a generator seeded by (seed, epoch, index), masks from generators seeded by (seed, epoch,
    index, 1): the same sample whatever the worker count, world size or resume point. Under
    `bad_image='skip'` an unreadable file yields a `SkippedSample` (dropped by the collate and logged),
    never another image in its place.
    """

    def __init__(self, files: Sequence[str], transform: MultiCropTransform, masker: iBOTMasker | None,
                 patch_size: int = 16, seed: int = 0, bad_image: str | None = None) -> None:
        if bad_image not in (None, "error", "skip"):
            raise UserError(f"--bad_image must be 'error' or 'skip', got {bad_image!r}")
        self.files = list(files)
        self.transform = transform
        self.masker = masker
        self.patch_size = patch_size
        self.seed = seed
        self.bad_image = bad_image

    def __len__(self) -> int:
        return len(self.files)

    def masks(self, epoch: int, index: int) -> list[torch.Tensor]:
        grid = (self.transform.global_size // self.patch_size,) * 2
        n = self.transform.global_crops_number
        if self.masker is None:
            return [torch.zeros(grid, dtype=torch.bool) for _ in range(n)]
        drawn = self.masker([grid] * n, *mask_generators(sample_seed(self.seed, epoch, index, 1)), epoch=epoch)
        return [torch.from_numpy(m) for m in drawn]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | SkippedSample:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path = self.files[index]
        try:
            image = read_or_skip(lambda: load_image(path), index, path, self.bad_image)
            if isinstance(image, SkippedSample):
                return image
            crops = self.transform(image, sample_generator(self.seed, epoch, index))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - one line naming the file and the step
            raise sample_failure("multi-crop augmentation", path, e, "please report it with this image") from e
        return {"crops": crops, "masks": self.masks(epoch, index), "index": index}
