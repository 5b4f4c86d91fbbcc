"""Image files on disk: which files are images, and how one is decoded to 8-bit RGB.

The leaf under every image reader: `util.image_cache` (the pre-decoded cache) and its builder read
source files with `read_image_file` and list them with `list_image_files`, and `util.data.load_image` /
`list_images` add the cache lookup on top. Nothing here knows about caches, so the cache modules and
`util.data` can all import it without importing each other in a circle.
"""
from __future__ import annotations

import logging
import os
import re
import stat
from typing import BinaryIO, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from util.cli import UserError

logger = logging.getLogger("medfound")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class BadImageError(UserError):
    """An image file that cannot be read (corrupt, not an image, not a regular file, too large);
    `--bad_image skip` skips exactly these. The message names the file and says to fix or remove it;
    tools that have `--bad_image` add that advice (`with_skip_advice`), the others do not offer it."""


SKIP_ADVICE = ", or pass --bad_image skip"


def with_skip_advice(e: BadImageError) -> BadImageError:
    """The same error, advising `--bad_image skip` (for tools that have the flag)."""
    msg = str(e)
    return e if msg.endswith(SKIP_ADVICE) else BadImageError(msg + SKIP_ADVICE)


def open_image_file(path: str) -> BinaryIO:
    """A binary file object for an image path, opened without blocking and only when it is a regular
    file: a FIFO, socket or device put where an image was listed would otherwise block the reader for
    ever (or read endlessly). The check is made on the open descriptor, so a file swapped after
    listing is caught too. Raises BadImageError naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BadImageError(f"{path}: cannot read image ({e.strerror or e}); fix or remove the file") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BadImageError(f"{path}: cannot read image (not a regular file: {_file_kind(mode)}); "
                                "fix or remove the file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_image_bytes(path: str) -> bytes:
    """The whole file, through `open_image_file` (regular files only, never blocking)."""
    with open_image_file(path) as f:
        return f.read()


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def pixel_limit() -> int | None:
    """Pillow's decompression-bomb limit: it refuses to open images above twice MAX_IMAGE_PIXELS."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if not limit else 2 * int(limit)


def check_pixels(path: str, width: int, height: int) -> None:
    """BadImageError when a header announces more pixels than Pillow would open (a decompression
    bomb), so no decoder (Pillow's or torchvision's) allocates it."""
    limit = pixel_limit()
    if limit is not None and width * height > limit:
        raise BadImageError(_too_large(path, width, height))


def _too_large(path: str, width: int | None, height: int | None) -> str:
    size = f"{width} x {height} pixels" if width and height else "more pixels than allowed"
    return (f"{path}: image too large: {size}, over Pillow's decompression-bomb limit of {pixel_limit()} pixels; "
            "fix or remove the file (or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it)")


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the header only; BadImageError for unreadable files and decompression bombs."""
    with open_image_file(path) as f:
        try:
            with Image.open(f) as im:
                w, h = im.size
        except Image.DecompressionBombError:
            raise BadImageError(_too_large(path, *_announced_size(path))) from None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise BadImageError(f"{path}: cannot read image ({_detail(e)}); fix or remove the file") from None
    check_pixels(path, w, h)
    return w, h


def _announced_size(path: str) -> tuple[int | None, int | None]:
    """The size a header announces, read with the bomb check off (for the error message only)."""
    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        with open_image_file(path) as f, Image.open(f) as im:
            return im.size
    except Exception:  # noqa: BLE001 - the message then gives no size
        return None, None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _detail(e: BaseException) -> str:
    # Pillow names an open file object by its repr ("<_io.BufferedReader name=12>"): the path says it better
    text = re.sub(r"\s*<_io\.\w+ name=[^>]*>", "", str(e))
    return " ".join(text.split()) or type(e).__name__


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
    with open_image_file(path) as f:
        return _decode(path, f, draft)


def _decode(path: str, f: BinaryIO, draft: Callable[[int, int], int] | None) -> Image.Image:
    try:
        with Image.open(f) as im:
            check_pixels(path, *im.size)
            if draft is not None:
                r = int(draft(*im.size))
                w, h = im.size
                if r > 1 and im.format == "JPEG" and min(w, h) >= r:
                    # Pillow picks the scale as size // requested: asking for the floor gets exactly r
                    # (ceil would fall back to r/2 whenever the side is not a multiple of r).
                    im.draft("RGB" if im.mode in ("RGB", "CMYK", "YCbCr") else im.mode, (w // r, h // r))
            im.load()
            return _to_rgb(im)
    except Image.DecompressionBombError:
        raise BadImageError(_too_large(path, *_announced_size(path))) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise BadImageError(f"{path}: cannot read image ({_detail(e)}); fix or remove the file") from None


def list_image_files(root: str, recursive: bool = True, extensions: tuple[str, ...] = IMG_EXTENSIONS,
                     folder_errors: bool = False) -> list[str]:
    """THE listing of image files under root on disk: sorted, by extension, hidden files and folders
    skipped. Folder symlinks are followed, but no folder is listed twice (a `loop -> ..` link or two
    links to one folder) and a file reached through several paths counts once: real paths win over
    paths through links. FIFOs, sockets, devices and broken links with an image name are left out and
    named in one warning, as are folders that cannot be read (`folder_errors`: a UserError naming the
    first instead, for tools that must not silently leave part of a tree out). `extensions`: lower-case
    file-name endings that count as images."""
    listing = _Listing(tuple(e.lower() for e in extensions), folder_errors)
    listing.walk(root, recursive)
    listing.report(root)
    return sorted(listing.files)


class _Listing:
    """One walk: visited folders and files by (st_dev, st_ino), what was left out and why."""

    def __init__(self, extensions: tuple[str, ...], folder_errors: bool) -> None:
        self.extensions, self.folder_errors = extensions, folder_errors
        self.seen_dirs: set[tuple[int, int]] = set()
        self.files: list[str] = []  # regular files reached through real folders or folder links
        self.linked_files: list[tuple[str, tuple[int, int]]] = []  # resolved after every real file is seen
        self.left_out: list[str] = []
        self.duplicates = 0

    def walk(self, root: str, recursive: bool) -> None:
        try:
            st = os.stat(root)
        except OSError:
            return
        self.seen_dirs.add((st.st_dev, st.st_ino))
        root_real = os.path.realpath(root)
        pending_links: list[str] = []  # folder symlinks: walked after the real tree, so real paths win
        self._walk_dir(root, recursive, pending_links)
        while pending_links:
            link = pending_links.pop(0)
            try:
                st = os.stat(link)
            except OSError:
                self.left_out.append(f"{link} (broken link)")
                continue
            key = (st.st_dev, st.st_ino)
            target = os.path.realpath(link)
            if key in self.seen_dirs or root_real == target or root_real.startswith(target.rstrip(os.sep) + os.sep):
                self.duplicates += 1  # a cycle (a link to the root or above it) or a second path to a listed folder
                continue
            self.seen_dirs.add(key)
            self._walk_dir(link, recursive, pending_links)
        if self.linked_files:  # stat the listed files only when some link might repeat one of them
            keys = set()
            for path in self.files:
                try:
                    st = os.stat(path)
                    keys.add((st.st_dev, st.st_ino))
                except OSError:
                    pass
            for path, key in sorted(self.linked_files):
                if key in keys:
                    self.duplicates += 1
                else:
                    keys.add(key)
                    self.files.append(path)

    def _walk_dir(self, top: str, recursive: bool, pending_links: list[str]) -> None:
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as e:
                if self.folder_errors:
                    raise UserError(f"cannot list {folder}: {e.strerror or e}") from None
                self.left_out.append(f"{folder} (folder not readable: {e.strerror or e})")
                continue
            subdirs = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_symlink():
                        self._symlink(entry, recursive, pending_links)
                    elif entry.is_dir(follow_symlinks=False):
                        if recursive:
                            st = entry.stat(follow_symlinks=False)
                            key = (st.st_dev, st.st_ino)
                            if key not in self.seen_dirs:  # bind mounts can repeat a folder too
                                self.seen_dirs.add(key)
                                subdirs.append(entry.path)
                    elif entry.name.lower().endswith(self.extensions):
                        if entry.is_file(follow_symlinks=False):  # the entry's type: no stat per file
                            self.files.append(entry.path)
                        else:
                            self.left_out.append(f"{entry.path} (not a regular file)")
                except OSError as e:
                    self.left_out.append(f"{entry.path} ({e.strerror or e})")
            stack.extend(reversed(subdirs))

    def _symlink(self, entry: os.DirEntry, recursive: bool, pending_links: list[str]) -> None:
        try:
            st = entry.stat()  # the target
        except OSError:
            if entry.name.lower().endswith(self.extensions):
                self.left_out.append(f"{entry.path} (broken link)")
            return
        if stat.S_ISDIR(st.st_mode):
            if recursive:
                pending_links.append(entry.path)
        elif entry.name.lower().endswith(self.extensions):
            if stat.S_ISREG(st.st_mode):
                self.linked_files.append((entry.path, (st.st_dev, st.st_ino)))
            else:
                self.left_out.append(f"{entry.path} (link to {_file_kind(st.st_mode)})")

    def report(self, root: str) -> None:
        if self.left_out:
            shown = ", ".join(self.left_out[:10]) + (f", ... ({len(self.left_out) - 10} more)"
                                                    if len(self.left_out) > 10 else "")
            logger.warning("%s: %d entr%s left out of the image list (not regular image files): %s", root,
                           len(self.left_out), "y" if len(self.left_out) == 1 else "ies", shown)
        if self.duplicates:
            logger.info("%s: %d symlinked file(s) or folder(s) already listed through another path (each image "
                        "counts once)", root, self.duplicates)
