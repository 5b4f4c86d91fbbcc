"""Data: THE image reader and lister (files or a pre-decoded cache), pretraining datasets (plain and
deblurring), uint8 transport to the device, normalisation presets.

Augmentation randomness is drawn from a generator seeded by (seed, epoch, sample index), never from a
shared stream, so a sample is augmented identically whatever the worker count, world size or resume
point: 1-process and N-process runs see the same batches, and resumed runs continue exactly. The same
key seeds the MAE masking noise, which the dataset returns with each sample.
"""
from __future__ import annotations

import logging
import math
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler
from torchvision.transforms import InterpolationMode

from util import image_cache
from util.cli import UserError
from util.image_io import (IMG_EXTENSIONS, decode_scale, draft_reduction, image_size, list_image_files,
                           read_image_bytes, read_image_file)
from util.skipping import SkippedSample, read_or_skip, sample_failure

logger = logging.getLogger("medfound")

# name -> (mean, std) in [0, 1] units.
NORM_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # USPEC overrides every split with ultra-widefield fundus statistics.
    "uwf": ((0.5723625, 0.34657937, 0.2374997), (0.21822436, 0.19240488, 0.17723322)),
    "uspec_explain": ((0.50351185, 0.30116007, 0.20442231), (0.2821921, 0.22173707, 0.17406568)),
    # VisionFM per-modality statistics.
    "fundus": ((0.42374, 0.26095, 0.12840), (0.29483, 0.20167, 0.13668)),
    "oct": ((0.21092, 0.21092, 0.21092), (0.17599, 0.17599, 0.17599)),
    "ffa": ((0.20205, 0.20205, 0.20201), (0.17406, 0.17404, 0.17401)),
    "external": ((0.49363, 0.36325, 0.25957), (0.32001, 0.27109, 0.21992)),
    "slitlamp": ((0.55567, 0.40289, 0.38858), (0.26517, 0.23312, 0.23904)),
    "ultrasound": ((0.05989, 0.05979, 0.05669), (0.15428, 0.15505, 0.14465)),
    "ubm": ((0.096110865,) * 3, (0.20977867,) * 3),
    "mri": ((0.17368862,) * 3, (0.16198656,) * 3),
}


def resolve_norm(preset: str = "imagenet", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> tuple[list[float], list[float]]:
    key = preset.lower().replace("-", "").replace(" ", "").replace("_", "")
    aliases = {"siltlamp": "slitlamp", "uspecexplain": "uspec_explain"}
    key = aliases.get(key, key)
    if key not in NORM_PRESETS:
        raise UserError(f"unknown --norm_preset '{preset}'; choose one of {', '.join(NORM_PRESETS)}")
    m, s = NORM_PRESETS[key]
    return list(mean or m), list(std or s)


def load_image(path: str, draft: Callable[[int, int], int] | None = None) -> Image.Image:
    """THE image reader: 8-bit RGB from an image file (`util.image_io.read_image_file`: conversions,
    BadImageError naming the file, reduced-scale JPEG decoding through `draft(width, height) -> r`) or
    from a virtual file of a pre-decoded cache folder (`draft` is told the cached size; nothing to decode).
    """
    hit = image_cache.lookup(path)
    if hit is not None:  # a virtual file of a pre-decoded cache: already small, no decoding
        cache, i = hit
        if draft is not None:
            h, w = cache.shape(i)[:2]
            draft(w, h)
        return cache.image(i)
    return read_image_file(path, draft)


_TORCHVISION_DECODE: Any = None


def torchvision_jpeg_decoder() -> Callable[[str], torch.Tensor] | None:
    """`path -> uint8 (3, H, W)` with torchvision.io (libjpeg-turbo; the same pixels as Pillow's decode,
    ~1.6x faster per image here), or None where this torchvision no longer ships it (its decoders are
    deprecated from 0.29 in favour of torchcodec): callers then decode with Pillow."""
    global _TORCHVISION_DECODE
    if _TORCHVISION_DECODE is None:
        _TORCHVISION_DECODE = False
        try:
            import io
            import warnings
            from torchvision.io import ImageReadMode, decode_image, decode_jpeg
            # One narrow filter (a catch_warnings block per image would reset every warning's
            # once-per-location memory and is not thread-safe).
            warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision",
                                    category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision",
                                    category=UserWarning)
            probe = io.BytesIO()
            Image.new("RGB", (8, 8), (200, 100, 50)).save(probe, "JPEG")
            decode_jpeg(torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8))  # its C++ ops load

            def decode(path: str) -> torch.Tensor:  # the bytes through the one reader: regular files only
                data = torch.frombuffer(bytearray(read_image_bytes(path)), dtype=torch.uint8)
                return decode_image(data, mode=ImageReadMode.RGB)
            _TORCHVISION_DECODE = decode
        except (ImportError, RuntimeError, OSError) as e:
            logger.info("torchvision.io cannot decode JPEGs here (%s): decoding them with Pillow", e)
    return _TORCHVISION_DECODE or None


def list_images(root: str, recursive: bool = True) -> list[str]:
    """THE image lister: image files under root (sorted, by extension; hidden files and folders skipped,
    `util.image_io.list_image_files`), or under a pre-decoded cache folder (build_image_cache.py) its
    virtual files."""
    cached = image_cache.list_cached(root, recursive)
    if cached is not None:
        return cached
    return list_image_files(root, recursive)


def resolve_pretrain_files(data_path: str, flag: str = "--data_path") -> tuple[str, list[str]]:
    """`data_path/train` when it exists (MAE layout), else every image under data_path (USPEC layout)."""
    if not data_path or not os.path.isdir(data_path):
        raise UserError(f"{flag} {data_path!r} is not a folder; point it at your images (or use --demo)")
    train = os.path.join(data_path, "train")
    root, rule = (train, "data_path/train exists: using it") if os.path.isdir(train) else (
        data_path, "no data_path/train: using every image under data_path")
    files = list_images(root)
    if not files:
        raise UserError(f"{flag} {root}: no images found (extensions: {', '.join(IMG_EXTENSIONS)})")
    logger.info("pretraining data: %s -> %d images in %s", rule, len(files), root)
    return root, files


def sample_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys; SeedSequence mixes them so nearby keys give unrelated streams."""
    # Shift a Python int: NumPy 1.x promotes `np.uint64 >> int` to float64 and raises TypeError.
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0]) >> 1


def sample_generator(*keys: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(sample_seed(*keys))
    return g


def rrc_params(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
               g: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, h, w), torchvision's algorithm with an explicit generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=g).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=g).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class PretrainTransform:
    """RandomResizedCrop(scale (0.2, 1), bicubic) + horizontal flip (MAE pretraining), applied with the
    same parameters to every image of a sample (blurred input and sharp target).

    `output="float"` returns normalised float tensors; `output="uint8"` returns the resized uint8
    pixels, which are 4x smaller to pass between processes and to copy to the GPU: the training step
    normalises them on the device with `DeviceNormalize`, giving bit-identical values.
    """
    input_size: int
    mean: Sequence[float]
    std: Sequence[float]
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    output: str = "float"

    def sample_params(self, width: int, height: int, g: torch.Generator) -> tuple[tuple[int, int, int, int], bool]:
        box = rrc_params(width, height, self.scale, self.ratio, g)
        return box, torch.rand(1, generator=g).item() < 0.5

    def max_reduction(self, box: tuple[int, int, int, int]) -> int:
        """JPEG decode reduction allowed for this crop: its shorter side keeps >= input_size pixels."""
        return draft_reduction(min(box[2], box[3]), self.input_size)

    def apply(self, images: Sequence[Image.Image], box: tuple[int, int, int, int], flip: bool,
              size: tuple[int, int]) -> list[torch.Tensor]:
        """Crop `box` (in the coordinates of an image of `size`) from each image, resize, flip."""
        top, left, ch, cw = box
        out = []
        for im in images:
            if im.size == tuple(size):
                im = TF.resized_crop(im, top, left, ch, cw, [self.input_size, self.input_size],
                                     InterpolationMode.BICUBIC, antialias=True)
            else:  # decoded at 1/s scale: libjpeg maps full-size x to x / s exactly (the decoded image
                # is ceil(W / s) wide, so the ratio of the two widths would shift boxes near the edges)
                s = decode_scale(size, im.size)
                im = im.resize((self.input_size, self.input_size), Image.BICUBIC,
                               box=(left / s, top / s, (left + cw) / s, (top + ch) / s))
            if flip:
                im = TF.hflip(im)
            t = TF.pil_to_tensor(im)
            out.append(t if self.output == "uint8" else TF.normalize(t.float().div(255), self.mean, self.std))
        return out

    def apply_tensor(self, image: torch.Tensor, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
        """`apply` for a decoded uint8 (3, H, W) tensor: torch's antialiased bicubic (PIL's kernel,
        a = -0.5), so pixels match the PIL path to rounding (within 1-2 levels)."""
        from torchvision.transforms.v2 import functional as F2  # its uint8 bicubic kernel is ~7x faster than v1's
        top, left, ch, cw = box
        t = F2.resized_crop(image, top, left, ch, cw, [self.input_size, self.input_size],
                            interpolation=InterpolationMode.BICUBIC, antialias=True)
        if flip:
            t = t.flip(-1)
        return t if self.output == "uint8" else TF.normalize(t.float().div(255), self.mean, self.std)

    def __call__(self, images: Sequence[Image.Image], g: torch.Generator) -> list[torch.Tensor]:
        w, h = images[0].size
        for other in images[1:]:
            if other.size != (w, h):
                raise UserError(f"paired images differ in size ({other.size} vs {(w, h)}); blurred and sharp "
                                "trees must hold the same images at the same resolution")
        box, flip = self.sample_params(w, h, g)
        return self.apply(images, box, flip, (w, h))


class DeviceNormalize:
    """uint8 batches -> normalised float on the device (the second half of `PretrainTransform(output="uint8")`);
    float batches pass through, so the step accepts either."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = list(mean), list(std)
        self._cache: dict[Any, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        key = (x.device, x.ndim)
        if key not in self._cache:
            shape = (1,) * (x.ndim - 3) + (-1, 1, 1)
            # 255 as a device tensor: CUDA turns division by a Python scalar into multiplication by its
            # reciprocal (1 ulp off for half the uint8 values); by a tensor it divides, like to_tensor on CPU.
            self._cache[key] = (torch.tensor(self.mean, device=x.device).view(shape),
                                torch.tensor(self.std, device=x.device).view(shape),
                                torch.full((), 255.0, device=x.device))
        mean, std, scale = self._cache[key]
        return x.float().div_(scale).sub_(mean).div_(std)


def images_to_device(x: torch.Tensor, device: torch.device, normalize: DeviceNormalize | None = None,
                     channels_last: bool = False) -> torch.Tensor:
    """Host image batch -> device (NHWC for channels_last models), normalised there if it is uint8."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return normalize(x) if normalize is not None else x


class EpochIndexSampler(DistributedSampler):
    """DistributedSampler that yields `(epoch, index)` keys so datasets can seed per sample even in
    persistent workers (which never see `set_epoch` on their own copy of the dataset).

    `set_start(k)` skips this rank's first k samples of the epoch (mid-epoch resume); it applies to
    the next epoch started with `set_epoch` only, then resets.
    """

    start_index = 0

    def set_start(self, index: int) -> None:
        self.start_index = max(0, int(index))

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.start_index:]
        return ((self.epoch, i) for i in indices)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.start_index)


class PretrainDataset(Dataset):
    """Pretraining samples: `{'image', 'noise', 'index'}` plus `'target'` for deblurring.

    Deblurring input comes from a mirrored blurred tree (`blurred_files[i]` pairs with `files[i]`,
    matched by relative path) or from blurring the sharp image on the fly with `blur` (a BlurSpec).
    """

    def __init__(self, files: Sequence[str], transform: PretrainTransform, seed: int = 0,
                 num_patches: int = 0, blurred_files: Sequence[str] | None = None, blur: Any = None,
                 deblur: bool = False, bad_image: str | None = None, root: str | None = None,
                 jpeg_draft: bool = False, decoder: str = "pil") -> None:
        self.files = list(files)
        # Reduced-scale JPEG decoding for single-image samples only: a blur defined in pixels of the
        # full image, or a blurred/sharp pair of possibly different formats, must see full resolution.
        self.jpeg_draft = jpeg_draft and not deblur and blur is None
        if decoder not in ("pil", "torchvision", "auto"):
            raise UserError(f"unknown --decoder {decoder!r}; choose auto, pil or torchvision")
        self.decoder = decoder
        # On-the-fly blur is keyed by the relative path, as blurred_images.py keys its files, so the
        # random parts (motion angle) match an offline-blurred tree.
        self.blur_keys = [os.path.relpath(f, root).replace(os.sep, "/") if root else str(i)
                          for i, f in enumerate(self.files)]
        self.transform = transform
        self.seed = seed
        self.num_patches = num_patches
        self.blurred_files = list(blurred_files) if blurred_files is not None else None
        self.blur = blur
        self.deblur = deblur
        if bad_image not in (None, "error", "skip"):
            raise UserError(f"--bad_image must be 'error' or 'skip', got {bad_image!r}")
        self.bad_image = bad_image  # None: the tool has no --bad_image flag (its errors do not advise it)
        if deblur and self.blurred_files is None and blur is None:
            raise UserError("a deblurring model needs --data_path_blurred (paired tree) or --blur (on-the-fly blur)")

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, index: int) -> list[Image.Image]:
        sharp = load_image(self.files[index])
        if not self.deblur:
            if self.blur is not None:  # vanilla model asked to train on blurred input
                return [self._blurred(sharp, index)]
            return [sharp]
        if self.blurred_files is not None:
            return [load_image(self.blurred_files[index]), sharp]
        return [self._blurred(sharp, index), sharp]

    def _blurred(self, sharp: Image.Image, index: int) -> Image.Image:
        from util.blur import blur_pil
        return blur_pil(sharp, self.blur, key=self.blur_keys[index]).convert("RGB")

    def _load(self, index: int, epoch: int) -> tuple[list[torch.Tensor], torch.Generator]:
        g = sample_generator(self.seed, epoch, index)
        if self.deblur or self.blur is not None:
            return self.transform(self._read(index), g), g
        # Crop parameters come from the header size, before decoding, so the JPEG decoder can be told
        # how much it may reduce; the random draws are the same as without the draft.
        path = self.files[index]
        drawn: dict[str, Any] = {}

        def draft(w: int, h: int) -> int:
            if "params" not in drawn:
                drawn["size"] = (w, h)
                drawn["params"] = self.transform.sample_params(w, h, g)
            return self.transform.max_reduction(drawn["params"][0]) if self.jpeg_draft else 1
        hit = image_cache.lookup(path)
        if hit is not None:  # pre-decoded: crop the mapped pixels, copy only the crop, resize with torch
            cache, i = hit
            h, w = cache.shape(i)
            draft(w, h)
            (top, left, ch, cw), flip = drawn["params"]
            crop = torch.from_numpy(np.array(cache.read(i)[top:top + ch, left:left + cw])).permute(2, 0, 1)
            return [self.transform.apply_tensor(crop, (0, 0, ch, cw), flip)], g
        if self.decoder != "pil" and path.lower().endswith((".jpg", ".jpeg")):
            decoded = self._torchvision_full_decode(path, draft)
            if decoded is not None:
                return [self.transform.apply_tensor(decoded, *drawn["params"])], g
        image = load_image(path, draft=draft)
        return self.transform.apply([image], *drawn["params"], drawn["size"]), g

    def _torchvision_full_decode(self, path: str, draft: Callable[[int, int], int]) -> torch.Tensor | None:
        """The full-size decode with torchvision.io when no reduced-scale decode applies; None to leave
        the image to Pillow (a reduced decode is faster still, a cache needs no decode, a file torchvision
        cannot read gets Pillow's error message)."""
        decode = torchvision_jpeg_decoder()
        if decode is None:
            return None
        # Header only: the size fixes the crop before decoding. An unreadable file, a non-regular one
        # or a decompression bomb (more pixels than Pillow opens) is a BadImageError here, before
        # torchvision allocates anything.
        w, h = image_size(path)
        if draft(w, h) > 1:
            return None
        try:
            t = decode(path)
        except (RuntimeError, ValueError):
            return None
        return t if t.dtype == torch.uint8 and tuple(t.shape) == (3, h, w) else None

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | SkippedSample:
        """A sample, or under `bad_image='skip'` a `SkippedSample` for an unreadable file (never another
        image in its place)."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        try:
            loaded = read_or_skip(lambda: self._load(index, epoch), index, self.files[index], self.bad_image)
        except UserError:  # unreadable file (policy applied) or bad settings: already one line
            raise
        except Exception as e:  # noqa: BLE001 - anything else: one line naming the file and the step
            raise sample_failure(_pretrain_step(e), self.files[index], e, "please report it with this image") from e
        if isinstance(loaded, SkippedSample):
            return loaded
        tensors, g = loaded
        sample = {"image": tensors[0], "index": index}
        if self.deblur:
            sample["target"] = tensors[1]
        if self.num_patches:
            sample["noise"] = torch.rand(self.num_patches, generator=g)
        return sample


def _pretrain_step(exc: BaseException) -> str:
    """What a pretraining sample was doing when `exc` was raised, from its traceback."""
    step = "loading"
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if isinstance(obj, PretrainTransform):
            return f"transform {type(obj).__name__}"
        if frame.f_code.co_name == "_blurred":
            step = "blur"
    return step


def pair_files(id_root: str, id_files: Sequence[str], other_root: str, other_flag: str) -> list[str]:
    """The file at the same relative path under `other_root` for each id file (DeblurringMAE pairs
    blurred and sharp images this way); a missing counterpart is an error naming both files."""
    out = []
    for f in id_files:
        other = os.path.join(other_root, os.path.relpath(f, id_root))
        if not os.path.isfile(other):
            raise UserError(f"{f} has no counterpart {other} under {other_flag}; both trees must hold the same "
                            f"relative paths (regenerate the blurred tree with blurred_images.py)")
        out.append(other)
    # The other direction too: an image present only in the other tree (e.g. an interrupted blur run)
    # would otherwise be dropped silently.
    listed = {os.path.normpath(o) for o in out}
    orphans = [f for f in list_images(other_root) if os.path.normpath(f) not in listed]
    if orphans:
        raise UserError(f"{orphans[0]} has no counterpart under {id_root} ({len(orphans)} such images); both trees "
                        f"must hold the same relative paths (regenerate the blurred tree with blurred_images.py)")
    return out
