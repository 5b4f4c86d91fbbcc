"""Segmentation data: the three folder layouts, mask reading and checking, and the (image, mask) dataset.

Layouts (``SEG_LAYOUTS``):

* ``vfm`` (VisionFM): ``root/<ds>/{training,test}/images/*`` with the label at the image path with
  ``images`` -> ``labels`` (same stem, ``.png`` preferred, any image suffix); every sub-folder ``<ds>`` of
  root is a sub-dataset and they are concatenated (``root/{training,test}/images`` is one dataset too).
  Labels are L-mode maps with values 0..C-1 (VisionFM's ``--num_labels 1``: 0/1).
* ``mmseg`` (DeblurringMAE, mmsegmentation's ultrasound configs): ``images/{split}/*.png`` (or the blurred
  copies in ``images_gaussian/{split}``) with ``masks_1/{split}/<stem>.png`` holding 0 (background) / 1 (nodule).
* ``seg_unet`` (DeblurringMAE's SEG_UNET): ``images_gaussian/{split}/*.png`` with ``masks/{split}/<stem>.png``
  where 255 is the foreground (read as 1).

Masks are read as integer arrays without colour conversion (a palette PNG gives its indices, as
mmsegmentation reads them). The dataset resizes the image bilinearly and the mask by nearest neighbour
and flips both with the same draws from a generator seeded by (seed, epoch, index).
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from util.cli import UserError
from util.data import list_images, load_image, sample_generator
from util.image_io import IMG_EXTENSIONS, open_image_file

SEG_LAYOUTS: tuple[str, ...] = ("vfm", "mmseg", "seg_unet")

# Split names each layout uses on disk; callers may say either form.
_VFM_SPLITS = {"train": "training", "training": "training", "test": "test", "val": "val", "validation": "val"}
_MM_SPLITS = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test"}

_EXPECTED = ("expected one of: VisionFM's <ds>/{training,test}/images + labels; mmseg's images[_gaussian]/{split} "
             "+ masks_1/{split} (0/1); SEG_UNET's images_gaussian/{split} + masks/{split} (255 = foreground)")


def _isdir(*parts: str) -> bool:
    return os.path.isdir(os.path.join(*parts))


def vfm_seg_datasets(root: str) -> list[str]:
    """The VisionFM sub-dataset folders of root (root itself when it holds training/ or test/ directly)."""
    if any(_isdir(root, s, "images") for s in ("training", "test", "val")):
        return [root]
    try:
        names = sorted(n for n in os.listdir(root) if not n.startswith("."))
    except OSError:
        return []
    return [os.path.join(root, n) for n in names
            if any(_isdir(root, n, s, "images") for s in ("training", "test", "val"))]


def detect_seg_layout(root: str) -> str:
    """'mmseg' (a masks_1 folder), 'seg_unet' (a masks folder next to images_gaussian) or 'vfm'
    (<ds>/{training,test}/images); a one-line UserError naming root and the expected trees otherwise."""
    if not root or not os.path.isdir(root):
        raise UserError(f"--data_path {root!r} is not a folder; point it at a segmentation dataset ({_EXPECTED})")
    has_images = _isdir(root, "images") or _isdir(root, "images_gaussian")
    if _isdir(root, "masks_1") and has_images:
        return "mmseg"
    if _isdir(root, "masks") and has_images:
        return "seg_unet"
    if vfm_seg_datasets(root):
        return "vfm"
    raise UserError(f"--data_path {root}: no segmentation layout found; {_EXPECTED}")


def _split_dir(layout: str, split: str) -> str:
    table = _VFM_SPLITS if layout == "vfm" else _MM_SPLITS
    if split not in table:
        raise UserError(f"unknown split {split!r}; use train, val or test")
    return table[split]


def _label_for(image_path: str, label_dir: str, suffixes: Sequence[str] = IMG_EXTENSIONS) -> str | None:
    """The label file in label_dir for an image: same stem, .png first, then the image's own name, then
    the other suffixes."""
    name = os.path.basename(image_path)
    stem = os.path.splitext(name)[0]
    candidates = [stem + ".png", name] + [stem + s for s in suffixes if s != ".png"]
    for c in candidates:
        p = os.path.join(label_dir, c)
        if os.path.isfile(p):
            return p
    return None


def _mm_image_dir(root: str, layout: str, split: str, images: str | None) -> str:
    if images is not None:
        return os.path.join(root, images, split)
    order = ("images", "images_gaussian") if layout == "mmseg" else ("images_gaussian", "images")
    for name in order:
        if _isdir(root, name, split):
            return os.path.join(root, name, split)
    return os.path.join(root, order[0], split)


def list_seg_pairs(root: str, split: str, layout: str | None = None, images: str | None = None
                   ) -> list[tuple[str, str]]:
    """(image, mask) paths of one split, sorted by image path. `split`: train|val|test (training is an
    alias of train; VisionFM folders are named training/test). `images` names the image folder of the
    mmseg / seg_unet layouts (default: images, else images_gaussian for mmseg; images_gaussian for
    seg_unet). An image without a mask, or a split with no images, is a one-line UserError."""
    layout = layout or detect_seg_layout(root)
    if layout not in SEG_LAYOUTS:
        raise UserError(f"unknown segmentation layout {layout!r}; choose one of {', '.join(SEG_LAYOUTS)}")
    d = _split_dir(layout, split)
    pairs: list[tuple[str, str]] = []
    if layout == "vfm":
        folders = [(os.path.join(ds, d, "images"), os.path.join(ds, d, "labels")) for ds in vfm_seg_datasets(root)]
        folders = [(i, l) for i, l in folders if os.path.isdir(i)]
        where = f"{root}/<ds>/{d}/images"
    else:
        img_dir = _mm_image_dir(root, layout, d, images)
        mask_dir = os.path.join(root, "masks_1" if layout == "mmseg" else "masks", d)
        folders = [(img_dir, mask_dir)] if os.path.isdir(img_dir) else []
        where = img_dir
    for img_dir, label_dir in folders:
        for img in list_images(img_dir):
            # VisionFM's rule: the label is the image path with images -> labels (sub-folders kept)
            rel = os.path.relpath(os.path.dirname(img), img_dir)
            mask = _label_for(img, os.path.normpath(os.path.join(label_dir, rel)))
            if mask is None:
                stem = os.path.splitext(os.path.relpath(img, img_dir))[0]
                raise UserError(f"{img}: no mask {os.path.join(label_dir, stem)}.png; add it or remove the image")
            pairs.append((img, mask))
    if not pairs:
        raise UserError(f"--data_path {root}: no images for split '{split}' in {where} ({layout} layout)")
    return pairs


def mask_mapping(layout: str) -> Callable[[np.ndarray], np.ndarray]:
    """What turns a mask file's values into class indices: seg_unet maps 255 -> 1 (other values are kept,
    so a stray grey level is caught by the class check); the other layouts store class indices."""
    if layout == "seg_unet":
        return _seg_unet_map
    if layout not in SEG_LAYOUTS:
        raise UserError(f"unknown segmentation layout {layout!r}; choose one of {', '.join(SEG_LAYOUTS)}")
    return _identity


def _identity(m: np.ndarray) -> np.ndarray:
    return m


def _seg_unet_map(m: np.ndarray) -> np.ndarray:
    return np.where(m == 255, 1, m).astype(m.dtype)


def read_mask(path: str, layout: str = "vfm") -> np.ndarray:
    """A mask file as an (H, W) int64 array of class indices: grey, 16-bit, bi-level or palette PNGs give
    their stored values (palette: indices); an RGB mask must be grey (equal channels). One-line
    UserError naming the file otherwise."""
    with open_image_file(path) as f:
        try:
            with Image.open(f) as im:
                im.load()
                if im.mode in ("RGB", "RGBA"):
                    arr = np.asarray(im)[..., :3]
                    if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
                        raise UserError(f"{path}: colour mask; masks must be grey or palette images holding "
                                        "class indices")
                    arr = arr[..., 0]
                elif im.mode in ("LA", "PA"):
                    arr = np.asarray(im)[..., 0]
                else:  # L, P, 1, I, I;16: the stored values
                    arr = np.asarray(im)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise UserError(f"{path}: cannot read mask ({' '.join(str(e).split()) or type(e).__name__}); "
                            "fix or remove the file") from None
    if arr.ndim != 2:
        raise UserError(f"{path}: mask has shape {arr.shape}; expected a single-channel image")
    return mask_mapping(layout)(arr.astype(np.int64))


def check_mask_values(mask: np.ndarray, path: str, num_classes: int, layout: str = "vfm") -> None:
    """One-line UserError naming the file when a mask value is not a class index. `num_classes` 1 (one
    sigmoid output) allows 0/1."""
    limit = max(int(num_classes), 2)
    if mask.size and (mask.min() < 0 or mask.max() >= limit):
        bad = sorted(int(v) for v in np.unique(mask) if v < 0 or v >= limit)[:5]
        hint = ("; SEG_UNET masks hold 0 and 255" if layout == "seg_unet"
                else "; 0/255 masks are the seg_unet layout" if 255 in bad else "")
        raise UserError(f"{path}: mask value(s) {bad} outside 0..{limit - 1} for {num_classes} class(es)"
                        f"{hint}; fix the mask or the number of classes (--num_labels)")


def mask_class_counts(pairs: Sequence[tuple[str, str]], layout: str, num_classes: int) -> np.ndarray:
    """Pixels of each class over every mask of `pairs`, checking every mask first (a value that is not a
    class index is one line naming the file). Reads every mask once: call it before training starts."""
    limit = max(int(num_classes), 2)
    counts = np.zeros(limit, np.int64)
    for _, mpath in pairs:
        m = read_mask(mpath, layout)
        check_mask_values(m, mpath, num_classes, layout)
        counts += np.bincount(m.ravel(), minlength=limit)[:limit]
    return counts


def seg_class_names(num_classes: int, layout: str = "vfm") -> list[str]:
    """Display names: mmseg/seg_unet binary data is (background, nodule) as DeblurringMAE names it;
    otherwise background + class_k. `num_classes` 1 (one sigmoid output) names two classes."""
    n = max(int(num_classes), 2)
    if n == 2:
        return ["background", "nodule" if layout in ("mmseg", "seg_unet") else "foreground"]
    return ["background"] + [f"class_{k}" for k in range(1, n)]


def _size_hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, (int, np.integer)):
        return int(input_size), int(input_size)
    h, w = (int(v) for v in input_size)
    return h, w


def _as_blur(blur: Mapping | None):  # -> BlurSpec | None
    if blur is None:
        return None
    from util.blur import BlurSpec
    if isinstance(blur, BlurSpec):
        return blur
    try:
        return BlurSpec.from_dict(blur)
    except (ValueError, TypeError) as e:
        raise UserError(f"bad blur record in the checkpoint's preprocessing: {e}") from None


class SegmentationDataset(Dataset):
    """(image float [3, H, W] normalised, mask long [H, W], index) of (image, mask) pairs.

    Image resized bilinearly, mask by nearest neighbour, to `input_size`; in training both are flipped
    horizontally (probability `hflip`) and vertically (`vflip`) with the same draws, from a generator
    seeded by (seed, epoch, index). `blur` (a BlurSpec or its dict, e.g. a deblurring checkpoint's
    preprocessing record) degrades the full-size image first, keyed by its path relative to `blur_root`
    as blurred_images.py keys files. Masks are checked on read: a value that is not a class index or a
    size other than the image's is a one-line UserError naming the file.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], input_size: int | Sequence[int], mean: Sequence[float],
                 std: Sequence[float], train: bool, layout: str, num_classes: int, seed: int = 0,
                 hflip: float = 0.5, vflip: float = 0.5, blur: Mapping | None = None,
                 blur_root: str | None = None) -> None:
        if layout not in SEG_LAYOUTS:
            raise UserError(f"unknown segmentation layout {layout!r}; choose one of {', '.join(SEG_LAYOUTS)}")
        self.pairs = list(pairs)
        self.size_hw = _size_hw(input_size)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.train, self.layout, self.num_classes = bool(train), layout, int(num_classes)
        self.seed, self.epoch = int(seed), 0
        self.hflip, self.vflip = float(hflip), float(vflip)
        self.blur = _as_blur(blur)
        self.blur_root = blur_root

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """New flips each epoch (the generator key includes it)."""
        self.epoch = int(epoch)

    def flips(self, index: int, epoch: int | None = None) -> tuple[bool, bool]:
        """(horizontal, vertical) flip of a sample in `epoch` (default: the one set_epoch set); never in
        evaluation."""
        if not self.train:
            return False, False
        g = sample_generator(self.seed, self.epoch if epoch is None else int(epoch), index)
        u = torch.rand(2, generator=g).tolist()
        return u[0] < self.hflip, u[1] < self.vflip

    def read(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The (optionally blurred) RGB image and its checked class-index mask, at full size."""
        img_path, mask_path = self.pairs[index]
        img = load_image(img_path)
        if self.blur is not None:
            from util.blur import blur_pil
            key = (os.path.relpath(img_path, self.blur_root).replace(os.sep, "/") if self.blur_root
                   else os.path.basename(img_path))
            img = blur_pil(img, self.blur, key=key).convert("RGB")
        mask = read_mask(mask_path, self.layout)
        check_mask_values(mask, mask_path, self.num_classes, self.layout)
        if mask.shape != (img.height, img.width):
            raise UserError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {img_path} is "
                            f"{img.width}x{img.height}; masks must match their images")
        return img, mask

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(image, mask, index). `key` is an index, or (epoch, index) as the epoch-keyed samplers yield it, so
        flips follow (seed, epoch, index) in any loader worker without set_epoch reaching the worker's copy."""
        epoch, index = key if isinstance(key, tuple) else (None, key)
        img, mask = self.read(index)
        h, w = self.size_hw
        img = img.resize((w, h), Image.BILINEAR)
        m = Image.fromarray(mask.astype(np.int32), "I").resize((w, h), Image.NEAREST)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1).div_(255.0)
        y = torch.from_numpy(np.asarray(m, dtype=np.int64).copy())
        fh, fv = self.flips(index, epoch)
        if fh:
            x, y = x.flip(-1), y.flip(-1)
        if fv:
            x, y = x.flip(-2), y.flip(-2)
        x = (x - self.mean) / self.std
        return x.contiguous(), y.contiguous(), index
