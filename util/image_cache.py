"""Pre-decoded image cache, the reading side: a dataset decoded once, raw pixels read from one memory map.

Large fundus photographs (1-4k px JPEG) make decoding, not the model step, the bottleneck of MAE
pretraining at 224 px. `util.image_cache_builder` (build_image_cache.py) decodes every image under a
folder once, shrinks it so its longer side is at most `max_side` (aspect kept, never enlarged) and
appends the 8-bit RGB pixels (HWC) to `images.u8`; `medfound_cache.json` indexes them by relative path.
A cache folder:

    CACHE_DIR/medfound_cache.json    index: format, version, max_side, source_root, entries (sorted by path)
    CACHE_DIR/images.u8              every image's raw uint8 HWC RGB bytes, back to back
    CACHE_DIR/train/class_0/ ...     empty copies of the source sub-folders (see below)
    CACHE_DIR/build_summary.json     written by build_image_cache.py (not read back)

Cached images are *virtual files*: `CACHE_DIR/<relpath>` names the image the source held at
`<relpath>`. `lookup(path)` maps such a path to `(ImageCache, index)` and `list_cached(folder)` lists the
virtual files under a cache folder or one of its sub-folders, so `util.data.load_image` / `list_images`
serve a cache folder exactly like the image folder it was built from. The source's sub-folders are
recreated (empty) inside the cache so that code which inspects the layout with `os.path.isdir` /
`os.listdir` (`data_path/train`, ImageFolder class folders) sees the same tree.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

from util.cli import UserError
from util.image_io import list_image_files

logger = logging.getLogger("medfound")

CACHE_INDEX = "medfound_cache.json"
DATA_FILE = "images.u8"
SUMMARY_FILE = "build_summary.json"
FORMAT = "medfound-image-cache"
VERSION = 1
_REBUILD = "rebuild it with build_image_cache.py"


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


class ImageCache:
    """An opened cache folder. `read(i)` returns a read-only (H, W, 3) uint8 view of image i.

    The data file is memory-mapped lazily, on the first read in each process; pickling drops the
    mapping (and the path -> index dict), so handing the object to DataLoader workers is cheap and
    each worker maps the file itself. Pages are shared through the OS page cache.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        index_file = os.path.join(self.path, CACHE_INDEX)
        data_file = os.path.join(self.path, DATA_FILE)
        if not os.path.isfile(index_file):
            raise UserError(f"{path}: not an image cache (no {CACHE_INDEX}); build one with build_image_cache.py")
        try:
            with open(index_file, "rb") as f:
                index = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{index_file}: corrupt cache index ({_one_line(e)}); {_REBUILD}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            got = index.get("format") if isinstance(index, dict) else type(index).__name__
            raise UserError(f"{index_file}: not a medfound image cache index (format {got!r}); {_REBUILD}")
        if index.get("version") != VERSION:
            raise UserError(f"{index_file}: cache version {index.get('version')!r} is not supported (this code reads "
                            f"version {VERSION}); {_REBUILD}")
        try:
            entries = index["entries"]
            total = int(index["total_bytes"])
            self.max_side = int(index["max_side"])
            self.source_root = str(index["source_root"])
            self.relpaths: list[str] = [str(e["path"]) for e in entries]
            self._offsets = np.array([e["offset"] for e in entries], dtype=np.int64)
            self._h = np.array([e["h"] for e in entries], dtype=np.int64)
            self._w = np.array([e["w"] for e in entries], dtype=np.int64)
            self._src_bytes = np.array([e["src_bytes"] for e in entries], dtype=np.int64)
            self._src_mtime = np.array([e["src_mtime"] for e in entries], dtype=np.float64)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise UserError(f"{index_file}: corrupt cache index (bad or missing field {_one_line(e)}); "
                            f"{_REBUILD}") from None
        self.skipped: list[str] = [str(s) for s in index.get("skipped", [])]
        self.total_bytes = total
        ends = self._offsets + self._h * self._w * 3
        if len(entries) and (self._offsets.min() < 0 or min(self._h.min(), self._w.min()) < 1 or ends.max() > total):
            raise UserError(f"{index_file}: corrupt cache index (an entry lies outside images.u8's {total} bytes); "
                            f"{_REBUILD}")
        self._pos: dict[str, int] | None = self._build_pos()
        if len(self._pos) != len(self.relpaths):
            raise UserError(f"{index_file}: corrupt cache index (duplicate paths); {_REBUILD}")
        try:
            size = os.path.getsize(data_file)
        except OSError:
            raise UserError(f"{data_file}: missing cache data file; {_REBUILD}") from None
        if size < total:
            raise UserError(f"{data_file}: truncated cache ({size} of {total} bytes); {_REBUILD}")
        if size > total:
            raise UserError(f"{data_file}: cache data file has {size} bytes but its index expects {total}; {_REBUILD}")
        self._flat: np.ndarray | None = None

    def _build_pos(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.relpaths)}

    def __len__(self) -> int:
        return len(self.relpaths)

    def __repr__(self) -> str:
        return f"ImageCache({self.path!r}, {len(self)} images, max_side={self.max_side})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_flat"] = None  # each process maps the file itself
        state["_pos"] = None  # rebuilt on demand; no need to ship a dict of every path
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _data(self) -> np.ndarray:
        if self._flat is None:
            data_file = os.path.join(self.path, DATA_FILE)
            if os.path.getsize(data_file) != self.total_bytes:  # rebuilt since this index was read
                raise UserError(f"{data_file}: the cache changed after this process read its index "
                                f"({os.path.getsize(data_file)} bytes, index says {self.total_bytes}); "
                                f"restart the run")
            mm = np.memmap(data_file, dtype=np.uint8, mode="r")
            # A plain ndarray view over the mapping: slicing it skips np.memmap's per-slice bookkeeping.
            self._flat = mm.view(np.ndarray)
        return self._flat

    def read(self, i: int) -> np.ndarray:
        """Image i as a read-only (H, W, 3) uint8 view into the mapped file (copy it to modify it)."""
        off, h, w = int(self._offsets[i]), int(self._h[i]), int(self._w[i])
        return self._data()[off:off + h * w * 3].reshape(h, w, 3)

    def image(self, i: int) -> Image.Image:
        """Image i as an 8-bit RGB PIL image (a copy), like util.data.load_image returns."""
        return Image.fromarray(self.read(i), "RGB")

    def shape(self, i: int) -> tuple[int, int]:
        """(height, width) of image i, without touching the pixels."""
        return int(self._h[i]), int(self._w[i])

    def index_of(self, relpath: str) -> int:
        if self._pos is None:
            self._pos = self._build_pos()
        try:
            return self._pos[relpath]
        except KeyError:
            raise KeyError(f"{relpath!r} is not in the image cache {self.path} ({len(self)} images, built from "
                           f"{self.source_root}); rebuild it if the source folder changed") from None

    def stale_entries(self, limit: int | None = None) -> list[str]:
        """Relative paths whose source file (under `source_root`) is gone or has a different size or
        modification time than when it was cached; at most `limit` of them."""
        out: list[str] = []
        for i, rel in enumerate(self.relpaths):
            if limit is not None and len(out) >= limit:
                break
            try:
                st = os.stat(os.path.join(self.source_root, rel))
            except OSError:
                out.append(rel)
                continue
            # 1 us: JSON keeps the float exactly; the tolerance only absorbs float64 rounding of ns stamps.
            if st.st_size != self._src_bytes[i] or abs(st.st_mtime - self._src_mtime[i]) > 1e-6:
                out.append(rel)
        return out

    def new_sources(self) -> list[str]:
        """Relative paths of images now under `source_root` that the cache neither holds nor skipped."""
        # The source is an image folder on disk (the builder refuses to build from a cache folder).
        known = set(self.relpaths) | set(self.skipped)
        rels = (os.path.relpath(p, self.source_root).replace(os.sep, "/")
                for p in list_image_files(self.source_root))
        return sorted(r for r in rels if r not in known)


def is_image_cache(path: str) -> bool:
    """Whether `path` is a cache folder (holds CACHE_INDEX); a cheap check that does not validate it."""
    return os.path.isfile(os.path.join(path, CACHE_INDEX))


# Per-process memo: directory -> the cache folder containing it, or None. Image readers ask about every
# file, so after the first file of a folder the answer is a dict lookup (negative answers included).
_MISSING = object()
_dir_memo: dict[str, str | None] = {}
_open_caches: dict[str, ImageCache] = {}
_open_lock = threading.Lock()


def enclosing_cache(directory: str) -> str | None:
    """The cache folder that is or contains `directory` (walked up, not memoised), or None."""
    d = directory
    while True:
        if is_image_cache(d):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def _cache_dir_of(directory: str) -> str | None:
    """The cache folder that is or contains the absolute `directory`, memoised for every folder walked."""
    hit = _dir_memo.get(directory, _MISSING)
    if hit is not _MISSING:
        return hit  # type: ignore[return-value]
    visited = []
    d, found = directory, None
    while True:
        hit = _dir_memo.get(d, _MISSING)
        if hit is not _MISSING:
            found = hit  # type: ignore[assignment]
            break
        visited.append(d)
        if is_image_cache(d):
            found = d
            break
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for v in visited:
        _dir_memo[v] = found
    return found


def _open_cache(cache_dir: str) -> ImageCache:
    cache = _open_caches.get(cache_dir)
    if cache is None:
        with _open_lock:
            cache = _open_caches.get(cache_dir)
            if cache is None:
                cache = _open_caches[cache_dir] = ImageCache(cache_dir)
    return cache


def clear_lookup_cache() -> None:
    """Forget this process's memo of cache folders (after building, replacing or deleting a cache)."""
    with _open_lock:
        _dir_memo.clear()
        _open_caches.clear()


def _relative_to(path: str, cache_dir: str) -> str:
    prefix = cache_dir if cache_dir.endswith(os.sep) else cache_dir + os.sep
    return path[len(prefix):].replace(os.sep, "/") if path.startswith(prefix) else ""


def lookup(path: str) -> tuple[ImageCache, int] | None:
    """`(cache, index)` when `path` is a virtual file `CACHE_DIR/<relpath>` of a cache, None when it
    lies in no cache folder. A path inside a cache folder that the cache does not hold is a UserError
    (a silent fallback to the file system would only fail later with a vaguer message)."""
    ap = os.path.abspath(path)
    cache_dir = _cache_dir_of(os.path.dirname(ap))
    if cache_dir is None:
        return None
    cache = _open_cache(cache_dir)
    rel = _relative_to(ap, cache_dir)
    try:
        return cache, cache.index_of(rel)
    except KeyError:
        raise UserError(f"{path}: not in the image cache {cache_dir} ({len(cache)} images); use paths listed from "
                        f"the cache folder, or rebuild the cache if the source images changed") from None


def list_cached(root: str, recursive: bool = True) -> list[str] | None:
    """Sorted virtual paths `os.path.join(root, ...)` of the cached images under `root` when `root` is a
    cache folder or one of its sub-folders (like util.data.list_images lists an image folder; with
    `recursive=False` only those directly in `root`); None when `root` lies in no cache folder."""
    ar = os.path.abspath(root)
    cache_dir = _cache_dir_of(ar)
    if cache_dir is None:
        return None
    cache = _open_cache(cache_dir)
    sub = _relative_to(ar, cache_dir)
    prefix = sub + "/" if sub else ""
    names = [r[len(prefix):] for r in cache.relpaths if r.startswith(prefix)]
    if not recursive:
        names = [n for n in names if "/" not in n]
    return sorted(os.path.join(root, n.replace("/", os.sep)) for n in names)
