"""Image files on disk: which files are images, and how one is decoded to 8-bit RGB.

The leaf under every image reader: `util.image_cache` (the pre-decoded cache) and its builder read
source files with `read_image_file` and list them with `list_image_files`, and `util.data.load_image` /
`list_images` add the cache lookup on top. Nothing here knows about caches, so the cache modules and
`util.data` can all import it without importing each other in a circle.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from util.cli import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class BadImageError(UserError):
    """An image file that cannot be read; `--bad_image skip` skips exactly these."""


def draft_reduction(short_side: int, min_side: int) -> int:
    """Largest JPEG decode reduction (4, 2, 1) that leaves `short_side` at least `min_side` pixels, so
    the resize after it still only shrinks. Not 8: libjpeg's 1/8 scale keeps only each block's
    average, a box filter that aliases fine detail (measured 30 dB against a full decode where 1/4
    gives 50+)."""
    return next((r for r in (4, 2) if short_side // r >= min_side), 1)


def decode_scale(full_size: tuple[int, int], decoded_size: tuple[int, int]) -> int:
    """The JPEG reduction (1, 2, 4, 8) that turned `full_size` into `decoded_size` (= ceil(full / s))."""
    ratio = full_size[0] / decoded_size[0]
    return min((1, 2, 4, 8), key=lambda s: abs(s - ratio))


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale integer images by their type's range (16-bit -> 8-bit), floats assumed in [0, 1]."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        if arr.dtype in (np.int32, np.uint32) and arr.max(initial=0) <= 65535:
            info = np.iinfo(np.uint16)  # PIL's 'I' mode for 16-bit PNGs holds uint16 values
        scaled = (arr.astype(np.float64) - max(info.min, 0)) / (info.max - max(info.min, 0))
        return np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)
    return np.clip(np.round(arr.astype(np.float64) * 255), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im))).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def read_image_file(path: str, draft: Callable[[int, int], int] | None = None) -> Image.Image:
    """Decode an image file as 8-bit RGB: 16-bit and float scaled by range, grey/palette expanded,
    CMYK converted, alpha dropped. Unreadable files raise BadImageError naming the file.

    `draft(width, height) -> r` is called with the full image size before decoding; for a JPEG, r > 1
    lets libjpeg decode at 1/2 or 1/4 scale (no larger reduction than r) in the DCT domain, which
    is several times faster for multi-megapixel photos. The caller compares the returned size with
    the size it was told to learn the scale actually used (`decode_scale`).
    """
    try:
        with Image.open(path) as im:
            if draft is not None:
                r = int(draft(*im.size))
                w, h = im.size
                if r > 1 and im.format == "JPEG" and min(w, h) >= r:
                    # Pillow picks the scale as size // requested: asking for the floor gets exactly r
                    # (ceil would fall back to r/2 whenever the side is not a multiple of r).
                    im.draft("RGB" if im.mode in ("RGB", "CMYK", "YCbCr") else im.mode, (w // r, h // r))
            im.load()
            return _to_rgb(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise BadImageError(f"{path}: cannot read image ({e}); fix or remove the file, or pass --bad_image skip") from None


def list_image_files(root: str, recursive: bool = True) -> list[str]:
    """Image files under root on disk (sorted, by extension; hidden files and folders skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in filenames
                   if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."))
        if not recursive:
            break
    return sorted(out)
