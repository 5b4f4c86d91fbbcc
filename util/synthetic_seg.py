"""Synthetic thyroid-nodule ultrasound segmentation data (TN3K-like) in DeblurringMAE's two layouts.

Each image is a B-mode sector scan (``util.synthetic_render.ultrasound_sample`` without lesions) with one
nodule (two in about 15% of images): a wider-than-tall hypoechoic oval (speckle kept, darkened) with
a thin echogenic rim, 10-18% of the side in radius, inside the sector. The mask is exactly the oval
(normalised radius <= 1), so it outlines a visible structure and a segmentation model has something
to learn. Layouts (``num`` images per split, names ``<index:05d>.png``, split indices consecutive):

* ``mmseg``: ``images/{train,val,test}/*.png`` (grey) and ``masks_1/{split}/*.png`` (L-mode 0/1);
  with ``gaussian`` also ``images_gaussian/{split}`` (the Gaussian-blurred copy, sigma 1.1, as
  ``blurred_images.py`` writes it, for deblurring backbones).
* ``seg_unet``: ``images_gaussian/{split}/*.png`` (blurred) and ``masks/{split}/*.png`` with 255 = nodule.

The same arguments give byte-identical files.
"""
from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from util.atomic import write_atomic
from util.synthetic_base import _check_seed, _check_size, _blob, image_seed
from util.synthetic_render import ultrasound_sample

US_SEG_LAYOUTS = ("mmseg", "seg_unet")
US_SEG_SPLITS = ("train", "val", "test")
US_SEG_CLASSES = ("background", "nodule")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _put(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, data, fsync=False)


def nodule_sample(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(grey image (S, S) uint8, mask (S, S) uint8 0/1) of one synthetic nodule scan."""
    base = ultrasound_sample(seed, size, n_lesions=0)
    S = size
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 2])
    ax, ay = (float(v) for v in base.landmarks[0])
    half, r1 = base.info["half_angle"], base.info["sector_radius"]
    ys, xs = np.mgrid[0:S, 0:S].astype(np.float32)
    lum = base.image[..., 0].astype(np.float32) / 255.0
    mask = np.zeros((S, S), np.uint8)
    n = 2 if rng.random() < 0.15 else 1
    placed: list[tuple[float, float, float]] = []
    for _ in range(n):
        for attempt in range(40):
            shrink = 1.0 - 0.015 * attempt  # smaller ovals fit where big ones did not
            rl = rng.uniform(0.10, 0.18) * S * (0.8 if n == 2 else 1.0) * shrink
            asp = rng.uniform(1.0, 1.35)
            depth, ang = rng.uniform(0.35, 0.72) * r1, rng.uniform(-0.5, 0.5) * half
            cx, cy = ax + depth * math.sin(ang), ay + depth * math.cos(ang)
            fits = depth + rl * asp * 1.15 < r1 - 1 and (half - abs(ang)) * depth > rl * asp * 1.15 + 1
            apart = all(math.hypot(cx - x, cy - y) > (rl + r) * asp * 1.2 for x, y, r in placed)
            if fits and apart and depth - rl * 1.2 > 0.12 * r1:
                break
        else:
            continue  # no room left for another nodule
        placed.append((cx, cy, rl))
        wobble = (rng.uniform(0.0, 0.08), int(rng.integers(3, 7)), rng.uniform(0, 2 * math.pi))
        cover, rho = _blob(xs, ys, cx, cy, rl * asp, rl / asp, rng.uniform(-0.3, 0.3), wobble)
        level = rng.uniform(0.25, 0.45)  # hypoechoic: the speckle stays, darker
        rim = 0.22 * np.exp(-((rho - 1.0) * rl) ** 2 / 0.8) * (rho > 0.85)
        lum = lum * (1 - cover) + level * lum * cover + rim * (lum > 0)
        mask[rho <= 1.0] = 1
    return np.clip(np.round(lum * 255.0), 0, 255).astype(np.uint8), mask


def write_us_segmentation(dst: str, layout: str = "mmseg", num: int = 20, size: int = 64, seed: int = 0,
                          gaussian: bool = False) -> dict[str, Any]:
    """Write `num` scans per split (train, val, test) in `layout` ('mmseg' | 'seg_unet', module docstring)
    under `dst`; `gaussian` (mmseg) also writes the blurred copies in images_gaussian/. Byte-identical
    for the same arguments. Returns a summary (root, layout, counts, classes, nodule pixel fraction)."""
    if layout not in US_SEG_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} for ultrasound segmentation; choose from {', '.join(US_SEG_LAYOUTS)}")
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num <= 0:
        raise ValueError(f"--num must be a positive number of images per split, got {num!r}")
    _check_size(size)
    _check_seed(seed)
    from util.blur import BlurSpec, blur_array
    spec = BlurSpec("gaussian", sigma=1.1, grayscale=True)
    dst = os.fspath(dst)
    fg = []
    for j, split in enumerate(US_SEG_SPLITS):
        for i in range(num):
            index = j * num + i
            name = f"{index:05d}.png"
            img, mask = nodule_sample(image_seed(seed, "us_segmentation", index), size)
            fg.append(float(mask.mean()))
            if layout == "mmseg":
                _put(os.path.join(dst, "images", split, name), _png(img))
                _put(os.path.join(dst, "masks_1", split, name), _png(mask))
            else:
                _put(os.path.join(dst, "masks", split, name), _png(mask * np.uint8(255)))
            if layout == "seg_unet" or gaussian:
                _put(os.path.join(dst, "images_gaussian", split, name), _png(blur_array(img, spec, f"{split}/{name}")))
    folders = (["images", "masks_1"] + (["images_gaussian"] if gaussian else [])) if layout == "mmseg" \
        else ["images_gaussian", "masks"]
    return {"root": dst, "task": "us_segmentation", "layout": layout, "num": int(num), "img_size": int(size),
            "seed": int(seed), "folders": folders, "splits": {s: int(num) for s in US_SEG_SPLITS},
            "classes": list(US_SEG_CLASSES), "nodule_fraction": round(float(np.mean(fg)), 4),
            "blur": spec.to_dict() if (layout == "seg_unet" or gaussian) else None}
