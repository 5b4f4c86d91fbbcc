"""Shared pieces of the synthetic-image generator: kinds and lesion types, the sample record, the
lesion-count label rule, seeding, and the numpy drawing helpers the renderers share.
The label rule and the image kinds are described in ``util.synthetic`` (the module to import)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

KINDS: Tuple[str, ...] = ("fundus", "ultrasound")
FUNDUS_LESION_TYPES: Tuple[str, ...] = ("exudate", "haemorrhage", "cotton_wool")
ULTRASOUND_LESION_TYPES: Tuple[str, ...] = ("cyst", "solid", "calcified")
MIN_SIZE = 16
# Class k needs up to 3k lesions; beyond ~8 classes they no longer fit at 32 px.
MAX_NUM_CLASSES = 8



@dataclass
class SyntheticSample:
    """One generated image plus everything a task head could be trained on.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB (ultrasound: three equal channels).
        mask: ``(H, W)`` uint8, 1 on lesion pixels, 0 elsewhere.
        type_mask: ``(H, W)`` uint8, 0 background, ``t + 1`` for a lesion of
            type index ``t`` in :func:`lesion_types_for` (``kind``).
        landmarks: ``(2, 2)`` float32 ``(x, y)`` pixel coordinates, pixel
            centres at integers. Fundus: optic-disc centre, fovea. Ultrasound:
            sector apex, point where the deep fascia crosses the beam axis.
        landmark_names: names of the rows of ``landmarks``.
        target: lesion area fraction of the field of view, in ``[0, 1]``.
        label: class index under the lesion-count rule (module docstring).
        n_lesions: number of lesions drawn.
        lesion_types: type name of each lesion.
        lesion_centres: ``(n_lesions, 2)`` float32 ``(x, y)`` centres.
        multi_hot: ``(n_types,)`` uint8, 1 where at least one lesion of that
            type is present (multi-label target).
        kind, seed, size: how the sample was made.
        info: extra scalars (e.g. ``vessel_density`` for fundus).
    """

    image: np.ndarray
    mask: np.ndarray
    type_mask: np.ndarray
    landmarks: np.ndarray
    landmark_names: Tuple[str, ...]
    target: float
    label: int
    n_lesions: int
    lesion_types: Tuple[str, ...]
    lesion_centres: np.ndarray
    multi_hot: np.ndarray
    kind: str
    seed: int
    size: int
    info: Dict[str, float] = field(default_factory=dict)
    # Float luminance in [0, 1]; kept so 16-bit output has real sub-8-bit detail.
    luminance: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def gray(self) -> np.ndarray:
        """Single-channel ``(H, W)`` uint8 version of the image."""
        if self.kind == "ultrasound":
            return self.image[..., 0].copy()
        return _to_uint8(self._lum())

    def gray16(self) -> np.ndarray:
        """Single-channel ``(H, W)`` uint16 version using the full 16-bit range."""
        return np.round(np.clip(self._lum(), 0.0, 1.0) * 65535.0).astype(np.uint16)

    def to_pil(self, mode: str = "RGB") -> Image.Image:
        """Pillow image in ``mode`` ``'RGB'``, ``'L'`` or ``'I;16'``."""
        if mode == "RGB":
            return Image.fromarray(self.image, "RGB")
        if mode == "L":
            return Image.fromarray(self.gray(), "L")
        if mode == "I;16":
            return _pil_from_uint16(self.gray16())
        raise ValueError(f"unsupported mode {mode!r}; use 'RGB', 'L' or 'I;16'")

    def _lum(self) -> np.ndarray:
        if self.luminance is not None:
            return self.luminance
        rgb = self.image.astype(np.float32) / 255.0
        return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


# ----------------------------------------------------------------------------
# Label rule
# ----------------------------------------------------------------------------


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, (int, np.integer)) or not 2 <= num_classes <= MAX_NUM_CLASSES:
        raise ValueError(f"num_classes must be an int in [2, {MAX_NUM_CLASSES}], got {num_classes!r}")


def lesion_count_range(label: int, num_classes: int = 2) -> Tuple[int, int]:
    """Inclusive range of lesion counts drawn for class ``label``.

    Class 0 -> ``(0, 0)``; class k >= 1 -> ``(3k - 1, 3k)``.
    """
    _check_num_classes(num_classes)
    if not isinstance(label, (int, np.integer)) or not 0 <= label < num_classes:
        raise ValueError(f"label must be in [0, {num_classes - 1}], got {label!r}")
    if label == 0:
        return (0, 0)
    return (3 * int(label) - 1, 3 * int(label))


def label_for_lesion_count(n_lesions: int, num_classes: int = 2) -> int:
    """Class of an image with ``n_lesions`` lesions: ``min(C - 1, (n + 1) // 3)``."""
    _check_num_classes(num_classes)
    if n_lesions < 0:
        raise ValueError(f"n_lesions must be >= 0, got {n_lesions}")
    return int(min(num_classes - 1, (int(n_lesions) + 1) // 3))


def class_names(num_classes: int = 2) -> List[str]:
    """Folder names ``class_0, class_1, ...``; their sorted order is the label order."""
    _check_num_classes(num_classes)
    width = len(str(num_classes - 1))
    return [f"class_{k:0{width}d}" for k in range(num_classes)]


def lesion_types_for(kind: str) -> Tuple[str, ...]:
    """Lesion type names of ``kind`` (index ``t`` is ``t + 1`` in ``type_mask``)."""
    _check_kind(kind)
    return FUNDUS_LESION_TYPES if kind == "fundus" else ULTRASOUND_LESION_TYPES


def image_seed(seed: int, split: str, index: int, label: int = 0) -> int:
    """Per-image seed from ``(seed, split, label, index)`` via ``SeedSequence``.

    Independent of generation order, so a dataset can be written in any order
    (or partially) and every file still gets the same content.
    """
    # crc32, not hash(): str hashes are salted per process.
    _check_seed(seed)
    ss = np.random.SeedSequence([int(seed), zlib.crc32(split.encode()), int(label), int(index)])
    hi, lo = ss.generate_state(2, dtype=np.uint32)
    return (int(hi) << 31) ^ int(lo)


# ----------------------------------------------------------------------------
# Small vectorised helpers
# ----------------------------------------------------------------------------


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _sub_seq(seed: int, tag: int) -> np.random.SeedSequence:
    """Child seed sequence for one decision (count, types...) of a sample."""
    return np.random.SeedSequence([int(seed), tag])


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < MIN_SIZE:
        raise ValueError(f"size must be an int >= {MIN_SIZE}, got {size!r}")
    if size > 4096:
        raise ValueError(f"size must be <= 4096, got {size}")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


def _pil_from_uint16(a: np.ndarray) -> Image.Image:
    # Explicit little-endian buffer: Image.fromarray on uint16 picks the mode
    # from the array and differs across Pillow versions.
    a = np.ascontiguousarray(a, dtype="<u2")
    return Image.frombuffer("I;16", (a.shape[1], a.shape[0]), a.tobytes(), "raw", "I;16", 0, 1)


def _soft_inside(signed_dist: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (>0 inside)."""
    return np.clip(signed_dist + 0.5, 0.0, 1.0)


def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


def _box_blur(a: np.ndarray, ry: int, rx: int) -> np.ndarray:
    """Box blur with edge padding via cumulative sums (O(N) for any radius)."""
    out = a
    for axis, r in ((0, ry), (1, rx)):
        if r <= 0:
            continue
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r + 1, r)
        c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis, dtype=np.float64)
        n = out.shape[axis]
        hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
        lo = np.take(c, np.arange(0, n), axis=axis)
        out = ((hi - lo) / (2 * r + 1)).astype(np.float32)
    return out


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise (about N(0,1)) by bicubic upsampling of a small grid."""
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    im = Image.fromarray(g, "F").resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32)


def _blob(
    xs: np.ndarray,
    ys: np.ndarray,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    angle: float,
    wobble: Sequence[float] = (0.0, 0.0, 0.0),
) -> Tuple[np.ndarray, np.ndarray]:
    """Coverage (0..1, anti-aliased) and normalised radius of a wobbly ellipse.

    ``wobble = (amplitude, lobes, phase)`` modulates the radius with angle so
    lesions are not perfect ellipses.
    """
    ca, sa = math.cos(angle), math.sin(angle)
    dx, dy = xs - cx, ys - cy
    u = (dx * ca + dy * sa) / rx
    v = (-dx * sa + dy * ca) / ry
    rho = np.sqrt(u * u + v * v)
    amp, lobes, phase = wobble
    if amp:
        rho = rho / (1.0 + amp * np.sin(lobes * np.arctan2(v, u) + phase))
    # (1 - rho) * mean radius ~ signed distance in pixels near the edge.
    cover = _soft_inside((1.0 - rho) * 0.5 * (rx + ry))
    return cover, rho


def _place_lesions(
    rng: np.random.Generator,
    radii: Sequence[float],
    propose: Callable[[np.random.Generator], Tuple[float, float]],
    ok: Callable[[float, float, float], bool],
    gap: float,
) -> List[Tuple[float, float, float]]:
    """Rejection-sample non-overlapping centres; shrink the gap if crowded."""
    placed: List[Tuple[float, float, float]] = []
    for r in radii:
        g = gap
        for attempt in range(400):
            x, y = propose(rng)
            if ok(x, y, r) and all(math.hypot(x - px, y - py) >= r + pr + g for px, py, pr in placed):
                break
            if attempt % 100 == 99:
                g -= gap  # crowded: allow touching, then slight overlap
        placed.append((x, y, r))
    return placed


def _pick_types(
    rng: np.random.Generator, n: int, all_types: Sequence[str], allowed: Optional[Sequence[str]]
) -> List[str]:
    pool = list(all_types if allowed is None else allowed)
    if not pool:
        raise ValueError("lesion_types must not be empty")
    for t in pool:
        if t not in all_types:
            raise ValueError(f"unknown lesion type {t!r}; choose from {', '.join(all_types)}")
    return [pool[int(i)] for i in rng.integers(0, len(pool), size=n)]


def _streams(seed: int) -> Tuple[np.random.Generator, np.random.Generator]:
    # Separate streams so adding lesions never changes the underlying anatomy.
    bg, les = np.random.SeedSequence(int(seed)).spawn(2)
    return np.random.default_rng(bg), np.random.default_rng(les)


def _finish(
    kind: str, seed: int, size: int, image: np.ndarray, mask: np.ndarray, type_mask: np.ndarray, lum: np.ndarray,
    landmarks: Sequence[Tuple[float, float]], landmark_names: Tuple[str, ...], types: Sequence[str],
    centres: Sequence[Tuple[float, float]], fov_px: int, num_classes: int, info: Dict[str, float],
) -> SyntheticSample:
    all_types = lesion_types_for(kind)
    multi_hot = np.zeros(len(all_types), np.uint8)
    for t in types:
        multi_hot[all_types.index(t)] = 1
    return SyntheticSample(
        image=image,
        mask=mask,
        type_mask=type_mask,
        landmarks=np.asarray(landmarks, np.float32).reshape(-1, 2),
        landmark_names=landmark_names,
        target=float(mask.sum()) / fov_px,
        label=label_for_lesion_count(len(types), num_classes),
        n_lesions=len(types),
        lesion_types=tuple(types),
        lesion_centres=np.asarray(centres, np.float32).reshape(-1, 2),
        multi_hot=multi_hot,
        kind=kind,
        seed=int(seed),
        size=int(size),
        info=info,
        luminance=lum.astype(np.float32),
    )
