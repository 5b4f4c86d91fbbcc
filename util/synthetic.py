"""Procedural fundus / ultrasound images with real, learnable structure.

The images are cheap stand-ins for medical data so that tests and smoke runs
can check that a model *learns* (not only that it runs), without shipping any
real patient data. Everything is numpy + Pillow, vectorised, and deterministic
by seed.

Two image kinds:

* ``fundus``: colour retina photo look-alike: circular field of view on black,
  orange/red retina with radial falloff, bright optic disc, darker macula and
  fovea, a seeded branching vessel tree, and optional lesions (yellow hard
  exudates, dark red haemorrhages, whitish cotton-wool spots).
* ``ultrasound``: B-mode look-alike: sector field of view, correlated
  Rayleigh speckle, wavy tissue layers with bright fascia lines, and optional
  hypo-/anechoic nodules with posterior enhancement or acoustic shadowing.

Label rule (single-label classification, ``num_classes`` = C, see
:func:`lesion_count_range` / :func:`label_for_lesion_count`):

* class 0 <=> no lesion;
* class k >= 1 is *drawn* with ``3k-1`` or ``3k`` lesions (k=1: 2-3, k=2: 5-6,
  k=3: 8-9, ...), so neighbouring classes are at least two lesions apart;
* any count is *labelled* ``min(C-1, (n+1)//3)`` (so 1 lesion -> class 0 and
  with C=2 every count >= 2 is class 1).

The background (anatomy, vessels, speckle, noise) and the lesions come from two
independent random streams of one seed, so ``fundus_sample(s, n_lesions=0)``
and ``fundus_sample(s, n_lesions=3)`` show the same eye, differing only by the
lesions: handy for counterfactual checks.

Regression ``target`` (both kinds): lesion area fraction, i.e. the number of
lesion-mask pixels divided by the number of field-of-view pixels (0.0 when
there is no lesion).
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "KINDS",
    "LAYOUTS",
    "FUNDUS_LESION_TYPES",
    "ULTRASOUND_LESION_TYPES",
    "MIN_SIZE",
    "MAX_NUM_CLASSES",
    "SyntheticSample",
    "lesion_types_for",
    "lesion_count_range",
    "label_for_lesion_count",
    "class_names",
    "image_seed",
    "fundus_sample",
    "ultrasound_sample",
    "sample",
    "multilabel_sample",
    "write_dataset",
    "preview_grid",
]

KINDS: Tuple[str, ...] = ("fundus", "ultrasound")
LAYOUTS: Tuple[str, ...] = ("imagefolder", "flat", "vfm", "segmentation", "landmark")
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


# ----------------------------------------------------------------------------
# Fundus
# ----------------------------------------------------------------------------


_Branch = Tuple[List[Tuple[float, float]], List[float]]


def _vessel_tree(
    rng: np.random.Generator, cx: float, cy: float, R: float, disc: Tuple[float, float], sx: float
) -> Dict[str, List[_Branch]]:
    """Random-walk vessel branches: ``(points, widths)`` in units of R.

    Coordinates are relative to the FOV centre and scaled by R so the same seed
    gives the same tree at every image size.
    """
    # One pre-drawn pool instead of thousands of scalar rng calls (speed).
    pool = rng.random(6000)
    k = [0]

    def u() -> float:
        k[0] = (k[0] + 1) % pool.size
        return float(pool[k[0]])

    dx0, dy0 = (disc[0] - cx) / R, (disc[1] - cy) / R
    step = 0.045
    # (initial heading, curvature per step, length) of the main trunks. The
    # temporal arcades (first two) bend around the macula towards the fovea.
    trunks = [
        (-math.pi / 2 + sx * 0.35, sx * 0.045, 1.5),
        (math.pi / 2 - sx * 0.35, -sx * 0.045, 1.5),
        (-math.pi / 2 - sx * 0.55, -sx * 0.012, 0.9),
        (math.pi / 2 + sx * 0.55, sx * 0.012, 0.9),
        ((0.0 if sx < 0 else math.pi), 0.0, 0.6),
    ]
    out: Dict[str, List[_Branch]] = {"artery": [], "vein": []}
    for kind, w0, dth in (("vein", 0.038, -0.13), ("artery", 0.028, 0.13)):
        stack = []
        for th, kap, length in trunks:
            th0 = th + dth + (u() - 0.5) * 0.3
            start = (dx0 + 0.03 * math.cos(th0), dy0 + 0.03 * math.sin(th0))
            wid = w0 * (1.0 if length > 1 else 0.8)
            stack.append((start[0], start[1], th0, kap * (0.8 + 0.4 * u()), wid, length * (0.8 + 0.4 * u()), 0))
        branches = out[kind]
        n_steps = 0
        while stack and n_steps < 700:
            x, y, th, kap, w, length, depth = stack.pop()
            pts, wids = [(x, y)], [w]
            travelled = 0.0
            turn = 0.0
            while travelled < length:
                # low-pass filtered turning: gently meandering, not zig-zag
                turn = 0.7 * turn + (u() - 0.5) * 0.16
                th += kap + turn
                x, y = x + step * math.cos(th), y + step * math.sin(th)
                travelled += step
                w *= 0.985
                pts.append((x, y))
                wids.append(w)
                n_steps += 1
                if x * x + y * y > 0.97 or w < 0.006:
                    break
                if depth < 3 and travelled > 3 * step and u() < 0.09:
                    side = 1.0 if u() < 0.5 else -1.0
                    stack.append(
                        (x, y, th + side * (0.45 + 0.6 * u()), (u() - 0.5) * 0.06, w * 0.7, (length - travelled) * (0.4 + 0.5 * u()) + 0.15, depth + 1)
                    )
                    w *= 0.88
            branches.append((pts, wids))
    return out


def _rasterise_vessels(branches: Sequence[_Branch], size: int, cx: float, cy: float, R: float) -> np.ndarray:
    """Anti-aliased vessel coverage via supersampled Pillow drawing + box downsample."""
    ss = max(2, int(math.ceil(256 / size))) if size <= 1024 else 1
    big = size * ss
    im = Image.new("L", (big, big), 0)
    dr = ImageDraw.Draw(im)
    for pts, wids in branches:
        # +0.5: output pixel centres sit at integer coordinates.
        P = [((cx + x * R + 0.5) * ss, (cy + y * R + 0.5) * ss) for x, y in pts]
        W = [max(1, int(round(w * R * ss))) for w in wids]
        # Pillow lines have one width: draw runs of equal (rounded) width as
        # polylines with round joints, so the taper has no beads or gaps.
        i = 0
        while i < len(P) - 1:
            j = i + 1
            while j < len(P) - 1 and W[j] == W[i]:
                j += 1
            dr.line(P[i : j + 1], fill=255, width=W[i], joint="curve")
            i = j
    if ss > 1:
        im = im.resize((size, size), Image.BOX)
    return np.asarray(im, dtype=np.float32) / 255.0


def _render_fundus(seed: int, size: int, types: Sequence[str], num_classes: int) -> SyntheticSample:
    rng, lrng = _streams(seed)
    S = size
    xs, ys = _grid(S)

    # --- geometry (all drawn before any size-dependent array, so the layout
    # of a seed is the same at every resolution) ---
    cx = (S - 1) / 2 + rng.uniform(-0.015, 0.015) * S
    cy = (S - 1) / 2 + rng.uniform(-0.015, 0.015) * S
    R = rng.uniform(0.44, 0.48) * S
    side = 1.0 if rng.random() < 0.5 else -1.0  # +1: right eye layout, disc on the right
    sx = -side  # direction from disc towards the fovea
    rd = rng.uniform(0.12, 0.15) * R
    disc = (cx + side * rng.uniform(0.45, 0.58) * R, cy + rng.uniform(-0.12, 0.12) * R)
    fovea = (disc[0] + sx * rng.uniform(0.72, 0.85) * R, disc[1] + rng.uniform(0.0, 0.1) * R)
    base = np.array([rng.uniform(0.78, 0.92), rng.uniform(0.30, 0.40), rng.uniform(0.09, 0.15)], np.float32)
    falloff = rng.uniform(0.35, 0.5)
    disc_col = np.array([1.0, rng.uniform(0.80, 0.88), rng.uniform(0.48, 0.60)], np.float32)
    cup_frac = rng.uniform(0.35, 0.55)
    trees = _vessel_tree(rng, cx, cy, R, disc, sx)
    texture = _smooth_noise(rng, S, 9)
    noise = rng.standard_normal((S, S, 3)).astype(np.float32)

    # --- background retina ---
    r = np.hypot(xs - cx, ys - cy) / R
    fov = _soft_inside((1.0 - r) * R)
    shade = (1.0 - falloff * r * r) * (1.0 + 0.05 * texture)
    img = base[None, None, :] * shade[..., None]

    df2 = ((xs - fovea[0]) ** 2 + (ys - fovea[1]) ** 2) / (R * R)
    mac = np.exp(-df2 / (2 * 0.17**2))
    fov_pit = np.exp(-df2 / (2 * 0.045**2))
    img *= (1.0 - 0.22 * mac - 0.18 * fov_pit)[..., None]
    img[..., 1:] *= (1.0 - 0.12 * mac)[..., None]  # macular pigment: browner, not just darker

    # --- optic disc (slightly taller than wide) with a paler cup ---
    d_disc, _ = _blob(xs, ys, disc[0], disc[1], rd, rd * 1.08, 0.0)
    halo = np.exp(-(((xs - disc[0]) ** 2 + (ys - disc[1]) ** 2) / (2 * (1.4 * rd) ** 2)))
    img = img * (1 + 0.25 * halo)[..., None]
    img = img * (1 - d_disc[..., None]) + disc_col * d_disc[..., None]
    cup = np.exp(-(((xs - disc[0]) ** 2 + (ys - disc[1]) ** 2) / (2 * (cup_frac * rd) ** 2)))
    img = img + (np.array([1.0, 0.98, 0.9], np.float32) - img) * (0.75 * cup)[..., None]

    # --- vessels: veins darker and wider than arteries ---
    a_vein = _rasterise_vessels(trees["vein"], S, cx, cy, R)
    a_art = _rasterise_vessels(trees["artery"], S, cx, cy, R)
    img *= 1.0 - a_vein[..., None] * np.array([0.45, 0.72, 0.72], np.float32)
    img *= 1.0 - a_art[..., None] * np.array([0.28, 0.55, 0.55], np.float32)

    # --- lesions (own stream) ---
    mask = np.zeros((S, S), np.uint8)
    type_mask = np.zeros((S, S), np.uint8)
    radii = []
    for t in types:
        lo, hi = {"exudate": (0.045, 0.07), "haemorrhage": (0.06, 0.09), "cotton_wool": (0.07, 0.1)}[t]
        radii.append(max(1.6, lrng.uniform(lo, hi) * R))
    shapes = [(lrng.uniform(0.8, 1.25), lrng.uniform(0, math.pi), lrng.uniform(0.03, 0.09), int(lrng.integers(2, 5)), lrng.uniform(0, 6.28)) for _ in types]

    def propose(g: np.random.Generator) -> Tuple[float, float]:
        a, rr = g.uniform(0, 2 * math.pi), 0.8 * R * math.sqrt(g.random())
        return cx + rr * math.cos(a), cy + rr * math.sin(a)

    def ok(x: float, y: float, rl: float) -> bool:
        return math.hypot(x - disc[0], y - disc[1]) > rd * 1.15 + rl + 1.0

    placed = _place_lesions(lrng, radii, propose, ok, gap=1.5)
    colours = {
        "exudate": np.array([1.0, 0.92, 0.30], np.float32),
        # blood absorbs: multiplicative, so a blot is dark relative to its
        # surroundings everywhere (an absolute colour vanishes in the dark rim)
        "haemorrhage": np.array([0.3, 0.12, 0.12], np.float32),
        "cotton_wool": np.array([0.96, 0.93, 0.84], np.float32),
    }
    for t, (x, y, rl), (asp, ang, wob, lobes, ph) in zip(types, placed, shapes):
        cover, rho = _blob(xs, ys, x, y, rl * asp, rl / asp, ang, (wob, lobes, ph))
        if t == "cotton_wool":
            # fluffy: feathered edge and translucent, vessels show through
            alpha = np.clip(1.0 - rho * rho, 0, 1) ** 0.6 * 0.8 + 0.1 * cover * (rho > 0.9)
        elif t == "haemorrhage":
            alpha = _soft_inside((1.0 - rho) * rl * 0.8) * np.clip(1.6 - 0.7 * rho, 0, 0.95)
        else:
            alpha = cover * 0.95
        if t == "haemorrhage":
            img = img * (1 - alpha[..., None] * (1 - colours[t]))
        else:
            img = img * (1 - alpha[..., None]) + colours[t] * alpha[..., None]
        inside = rho <= 1.0
        mask[inside] = 1
        type_mask[inside] = FUNDUS_LESION_TYPES.index(t) + 1

    img = (img + 0.012 * noise) * fov[..., None]
    image = _to_uint8(img)
    lum = np.clip(img, 0, 1) @ np.array([0.299, 0.587, 0.114], np.float32)
    fov_px = max(1, int((fov >= 0.5).sum()))
    vessel_density = float(((np.maximum(a_vein, a_art) >= 0.5) & (fov >= 0.5)).sum()) / fov_px
    return _finish(
        "fundus", seed, S, image, mask, type_mask, lum,
        landmarks=[disc, fovea], landmark_names=("optic_disc", "fovea"),
        types=types, centres=[(x, y) for x, y, _ in placed], fov_px=fov_px, num_classes=num_classes,
        info={"vessel_density": vessel_density, "disc_radius": float(rd), "fov_radius": float(R), "right_eye": float(side > 0)},
    )


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


# ----------------------------------------------------------------------------
# Ultrasound
# ----------------------------------------------------------------------------


def _render_ultrasound(seed: int, size: int, types: Sequence[str], num_classes: int) -> SyntheticSample:
    rng, lrng = _streams(seed)
    S = size
    xs, ys = _grid(S)

    # --- sector geometry (phased-array look: apex inside the image) ---
    ax = (S - 1) / 2 + rng.uniform(-0.02, 0.02) * S
    ay = rng.uniform(0.03, 0.06) * S
    half = rng.uniform(0.5, 0.62)  # half opening angle (rad)
    r1 = min(S - 1.5 - ay, (min(ax, S - 1 - ax) - 1.0) / math.sin(half))
    r0 = rng.uniform(0.06, 0.1) * r1
    # Layer boundaries as fractions of depth, each a wavy function of angle.
    n_layers = 4
    bounds = np.sort(rng.uniform(0.12, 0.85, n_layers - 1))
    bounds[0] = rng.uniform(0.1, 0.18)  # thin skin / subcutaneous layer on top
    bounds = np.sort(bounds)
    waves = [(rng.uniform(0.01, 0.04), rng.uniform(1.5, 5.0), rng.uniform(0, 6.28)) for _ in range(n_layers - 1)]
    echo_levels = np.concatenate([[rng.uniform(0.6, 0.75)], rng.uniform(0.25, 0.6, n_layers - 1)])
    interface_gain = rng.uniform(0.4, 0.9, n_layers - 1)
    striation = rng.uniform(0.0, 0.25, n_layers)  # muscle-like fibres in some layers
    atten = rng.uniform(0.2, 0.45)
    tex = _smooth_noise(rng, S, 7)
    grain = max(0, int(round(S / 160)))
    speck = rng.standard_normal((2, S, S)).astype(np.float32)
    noise = rng.standard_normal((S, S)).astype(np.float32)

    dx, dy = xs - ax, ys - ay
    rho = np.hypot(dx, dy)
    phi = np.arctan2(dx, dy)  # angle from the beam axis (straight down)
    t = rho / r1
    sector = _soft_inside(np.minimum.reduce([r1 - rho, rho - r0, (half - np.abs(phi)) * rho]))

    # --- tissue echogenicity by depth ---
    layer = np.zeros((S, S), np.int64)
    b_eff = []
    for b, (amp, freq, ph) in zip(bounds, waves):
        be = b + amp * np.sin(freq * phi + ph)
        b_eff.append(be)
        layer += (t > be).astype(np.int64)
    echo = echo_levels[layer]
    echo = echo * (1.0 + striation[layer] * np.sin(2 * math.pi * t * 14 + 2.0 * tex))
    for be, g in zip(b_eff, interface_gain):
        echo = echo + g * np.exp(-(((t - be) * r1) ** 2) / (2 * max(0.6, 0.006 * S) ** 2))
    echo = echo * (1.0 + 0.15 * tex)

    # deep fascia landmark: deepest interface where it crosses the beam axis
    amp, freq, ph = waves[-1]
    fascia = (ax, ay + (bounds[-1] + amp * math.sin(ph)) * r1)

    # --- nodules (own stream) ---
    mask = np.zeros((S, S), np.uint8)
    type_mask = np.zeros((S, S), np.uint8)
    radii = [max(1.8, lrng.uniform(0.05, 0.08) * S) for _ in types]
    shapes = [(lrng.uniform(1.0, 1.4), lrng.uniform(-0.3, 0.3), lrng.uniform(0.0, 0.12), int(lrng.integers(3, 7)), lrng.uniform(0, 6.28)) for _ in types]

    def propose(g: np.random.Generator) -> Tuple[float, float]:
        tt, pp = g.uniform(0.3, 0.88), g.uniform(-0.8, 0.8) * half
        return ax + tt * r1 * math.sin(pp), ay + tt * r1 * math.cos(pp)

    def ok(x: float, y: float, rl: float) -> bool:
        rr, pp = math.hypot(x - ax, y - ay), math.atan2(x - ax, y - ay)
        return rr + rl * 1.4 < r1 - 1 and (half - abs(pp)) * rr > rl * 1.4 + 1

    placed = _place_lesions(lrng, radii, propose, ok, gap=1.5)
    post = np.ones((S, S), np.float32)
    for tp, (x, y, rl), (asp, ang, wob, lobes, ph2) in zip(types, placed, shapes):
        # wider-than-tall ovals, like most benign nodules
        cover, nr = _blob(xs, ys, x, y, rl * asp, rl / asp, ang, (wob if tp == "solid" else 0.0, lobes, ph2))
        level = {"cyst": 0.03, "solid": 0.1, "calcified": 0.08}[tp]
        echo = echo * (1 - cover) + level * echo_levels.mean() * cover
        if tp != "cyst":  # thin echogenic rim/halo on solid nodules
            echo = echo + 0.15 * np.exp(-((nr - 1.0) * rl) ** 2 / 0.5) * (nr > 0.9)
        if tp == "calcified":  # small bright focus, off-centre, that casts the shadow
            echo = echo + 1.2 * np.exp(-((xs - x) ** 2 + (ys - y - 0.3 * rl) ** 2) / (2 * max(0.5, 0.15 * rl) ** 2))
        # posterior effect: beam-aligned band behind the nodule
        rn, pn = math.hypot(x - ax, y - ay), math.atan2(x - ax, y - ay)
        width = rl * asp * 0.9 / max(rn, 1.0)
        # soft lateral edge (a few px) and slow fade with depth, as in real images
        band = np.clip(((width - np.abs(phi - pn)) * rho) / max(1.0, 0.35 * rl) + 0.5, 0, 1)
        behind = np.clip((rho - rn) / max(rl, 1.0), 0, 1) * np.exp(-np.clip(rho - rn, 0, None) / (0.6 * r1)) * (1 - cover)
        strength = {"cyst": 0.6, "solid": -0.45, "calcified": -0.8}[tp]
        post = post * (1 + strength * band * behind)
        inside = nr <= 1.0
        mask[inside] = 1
        type_mask[inside] = ULTRASOUND_LESION_TYPES.index(tp) + 1
    echo = echo * post * (1.0 - atten * t)

    # --- speckle: correlated complex Gaussian -> Rayleigh amplitude, mean 1 ---
    re, im = speck[0], speck[1]
    if grain:
        re, im = _box_blur(re, grain, 2 * grain), _box_blur(im, grain, 2 * grain)
    amp_ = np.hypot(re, im)
    amp_ /= max(float(amp_.mean()), 1e-6)
    env = np.clip(echo, 0, None) * (0.35 + 0.65 * amp_)
    # log-like display compression, as on a scanner
    disp = np.log1p(6.0 * env) / math.log1p(6.0 * 1.2)
    disp = (disp + 0.01 * noise) * sector
    lum = np.clip(disp, 0, 1).astype(np.float32)
    g8 = _to_uint8(lum)
    image = np.repeat(g8[..., None], 3, axis=2)
    fov_px = max(1, int((sector >= 0.5).sum()))
    return _finish(
        "ultrasound", seed, S, image, mask, type_mask, lum,
        landmarks=[(ax, ay), fascia], landmark_names=("sector_apex", "deep_fascia"),
        types=types, centres=[(x, y) for x, y, _ in placed], fov_px=fov_px, num_classes=num_classes,
        info={"half_angle": float(half), "sector_radius": float(r1)},
    )


# ----------------------------------------------------------------------------
# Public samplers
# ----------------------------------------------------------------------------


def _sample_n(
    kind: str, seed: int, size: int, n_lesions: int, num_classes: int, lesion_types: Optional[Sequence[str]]
) -> SyntheticSample:
    _check_kind(kind)
    _check_seed(seed)
    _check_size(size)
    _check_num_classes(num_classes)
    if not isinstance(n_lesions, (int, np.integer)) or n_lesions < 0 or n_lesions > 64:
        raise ValueError(f"n_lesions must be an int in [0, 64], got {n_lesions!r}")
    # The lesion-type draw uses its own child stream so it never shifts geometry.
    trng = np.random.default_rng(_sub_seq(seed, 7))
    types = _pick_types(trng, int(n_lesions), lesion_types_for(kind), lesion_types)
    render = _render_fundus if kind == "fundus" else _render_ultrasound
    return render(int(seed), int(size), types, num_classes)


def fundus_sample(
    seed: int,
    size: int = 64,
    n_lesions: int = 0,
    num_classes: int = 2,
    lesion_types: Optional[Sequence[str]] = None,
) -> SyntheticSample:
    """Fundus-photo-like RGB image with ``n_lesions`` lesions.

    Lesion types are drawn uniformly from ``lesion_types`` (default: all of
    :data:`FUNDUS_LESION_TYPES`). ``label`` follows the lesion-count rule for
    ``num_classes``; ``target`` is the lesion area fraction of the FOV.
    Landmarks: optic-disc centre, fovea.
    """
    return _sample_n("fundus", seed, size, n_lesions, num_classes, lesion_types)


def ultrasound_sample(
    seed: int,
    size: int = 64,
    n_lesions: int = 0,
    num_classes: int = 2,
    lesion_types: Optional[Sequence[str]] = None,
) -> SyntheticSample:
    """B-mode-ultrasound-like image (3 equal channels; ``.gray()`` for 1 channel).

    Lesions are hypo-/anechoic nodules of :data:`ULTRASOUND_LESION_TYPES`
    (``cyst``: anechoic, posterior enhancement; ``solid``: hypoechoic, mild
    shadow; ``calcified``: hypoechoic with a bright focus and dense shadow).
    Landmarks: sector apex, deep fascia on the beam axis.
    """
    return _sample_n("ultrasound", seed, size, n_lesions, num_classes, lesion_types)


def sample(kind: str, seed: int, label: int, size: int = 64, num_classes: int = 2) -> SyntheticSample:
    """Image of class ``label``: lesion count drawn from :func:`lesion_count_range`."""
    _check_seed(seed)
    lo, hi = lesion_count_range(label, num_classes)
    n = int(np.random.default_rng(_sub_seq(seed, 11)).integers(lo, hi + 1))
    return _sample_n(kind, seed, size, n, num_classes, None)


def multilabel_sample(kind: str, seed: int, labels: Sequence[int], size: int = 64) -> SyntheticSample:
    """Image whose lesion types are exactly those flagged in multi-hot ``labels``.

    ``labels[t] == 1`` puts one or two lesions of type ``t`` (see
    :func:`lesion_types_for`) in the image; ``len(labels)`` may be shorter than
    the number of types (the missing types are absent). ``label`` of the
    result follows the count rule with 2 classes.
    """
    _check_kind(kind)
    _check_seed(seed)
    _check_size(size)
    all_types = lesion_types_for(kind)
    labels = [int(v) for v in labels]
    if not 1 <= len(labels) <= len(all_types) or any(v not in (0, 1) for v in labels):
        raise ValueError(f"labels must be 1..{len(all_types)} values in {{0, 1}}, got {labels}")
    rng = np.random.default_rng(_sub_seq(seed, 13))
    types: List[str] = []
    for t, on in enumerate(labels):
        if on:
            types += [all_types[t]] * int(rng.integers(1, 3))
    order = rng.permutation(len(types))
    types = [types[i] for i in order]
    render = _render_fundus if kind == "fundus" else _render_ultrasound
    return render(int(seed), int(size), types, 2)


# ----------------------------------------------------------------------------
# Writing datasets
# ----------------------------------------------------------------------------

_DEFAULT_SPLITS: Dict[str, float] = {"train": 0.6, "val": 0.2, "test": 0.2}
_VFM_SPLIT_NAMES = {"train": "training", "training": "training"}


def _split_counts(n_per_class: Optional[int], splits: Mapping[str, Union[int, float]]) -> Dict[str, int]:
    """Per-class image count of each split.

    int values are absolute per-class counts; float values are fractions of
    ``n_per_class`` (largest-remainder rounding, so the fractions of one
    ``n_per_class`` never lose or gain an image).
    """
    if not splits:
        raise ValueError("splits must name at least one split")
    counts: Dict[str, int] = {}
    fracs: Dict[str, float] = {}
    for name, v in splits.items():
        if not isinstance(name, str) or not name or os.sep in name or name in (".", ".."):
            raise ValueError(f"bad split name {name!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or v < 0:
            raise ValueError(f"split {name!r}: value must be a non-negative int (count) or float (fraction), got {v!r}")
        if isinstance(v, (int, np.integer)):
            counts[name] = int(v)
        else:
            fracs[name] = float(v)
    if fracs:
        if n_per_class is None or isinstance(n_per_class, bool) or not isinstance(n_per_class, (int, np.integer)) or n_per_class < 0:
            raise ValueError(f"n_per_class must be a non-negative int when splits use fractions, got {n_per_class!r}")
        total = sum(fracs.values())
        if total <= 0 or total > 1.0 + 1e-9:
            raise ValueError(f"split fractions must sum to a value in (0, 1], got {total}")
        exact = {k: f * n_per_class for k, f in fracs.items()}
        floor = {k: int(math.floor(e)) for k, e in exact.items()}
        left = int(round(total * n_per_class)) - sum(floor.values())
        for k in sorted(exact, key=lambda k: (floor[k] - exact[k], list(fracs).index(k)))[: max(0, left)]:
            floor[k] += 1
        counts.update(floor)
    return {k: counts[k] for k in splits}


def _atomic_write_bytes(path: str, data: bytes) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _encode(im: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        # Fixed settings so the bytes only depend on the pixels.
        im.save(buf, format="PNG", compress_level=6)
    else:
        im.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _image_pil(s: SyntheticSample, bit_depth: int, channels: int) -> Image.Image:
    if bit_depth == 16:
        return s.to_pil("I;16")
    return s.to_pil("L" if channels == 1 else "RGB")


def write_dataset(
    root: Union[str, os.PathLike],
    kind: str = "fundus",
    layout: str = "imagefolder",
    num_classes: int = 2,
    n_per_class: Optional[int] = 20,
    splits: Optional[Mapping[str, Union[int, float]]] = None,
    size: int = 64,
    seed: int = 0,
    image_format: str = "png",
    multilabel: bool = False,
    bit_depth: int = 8,
    channels: int = 3,
    dataset_name: Optional[str] = None,
) -> Dict[str, Any]:
    """Write a synthetic dataset under ``root`` and return a summary dict.

    Layouts (``<i>`` is a zero-padded index, e.g. ``00007``):

    * ``imagefolder``: ``root/<split>/class_<k>/<i>.png``; sorted class folder
      order equals the label index (torchvision ``ImageFolder``).
    * ``flat``: ``root/<dataset_name or 'images'>/<i>.png``: unlabelled
      pretraining tree; every split's images go into the one folder.
    * ``vfm`` (VisionFM classification): ``root/<dataset_name>/<split>/<i>.png``
      and ``root/<dataset_name>/<split>_labels.txt`` with lines
      ``<split>/<i>.png;k`` or, with ``multilabel=True``, multi-hot
      ``<split>/<i>.png;0,1,0`` (one column per lesion type, ``num_classes``
      columns, at most 3). Split ``train`` is written as ``training``.
    * ``segmentation`` (VisionFM): ``root/<dataset_name>/<split>/images/<i>.png``
      and ``.../labels/<i>.png`` (L-mode, values ``0..C-1``): with C=2 the
      binary lesion mask; with C>2 only the first C-1 lesion types are drawn and
      type ``t`` is value ``t + 1`` (so C <= 4).
    * ``landmark`` (VisionFM): ``.../images/<i>.png`` and ``.../labels/<i>.npy``
      holding an ``(H, W, 2)`` uint8 array with a single 1 at each landmark.

    Images per split: ``num_classes * per_class_count``; for ``imagefolder``,
    ``flat`` and single-label ``vfm`` that is ``per_class_count`` images of each
    class. ``splits`` maps split name to a per-class count (int) or a fraction of
    ``n_per_class`` (float); default ``{'train': .6, 'val': .2, 'test': .2}``.

    Each image's seed is :func:`image_seed` ``(seed, split, index, label)``, so
    the same arguments give byte-identical files regardless of write order.
    Files are written to a temporary name in the target folder and moved into
    place with ``os.replace``; files of the same name are overwritten, other
    files are left alone.

    Args:
        bit_depth: 8, or 16 for 16-bit grayscale PNG images (``I;16``).
        channels: 3 (RGB) or 1 (8-bit grayscale ``L``); ignored for 16-bit.
        dataset_name: sub-folder for ``vfm``/``segmentation``/``landmark``
            (default ``dataset_A``) and ``flat`` (default ``images``).
    """
    _check_kind(kind)
    _check_size(size)
    _check_num_classes(num_classes)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    image_format = str(image_format).lower().lstrip(".")
    if image_format == "jpeg":
        image_format = "jpg"
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    if bit_depth == 16 and image_format != "png":
        raise ValueError("bit_depth=16 needs image_format='png'")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    _check_seed(seed)
    n_types = len(lesion_types_for(kind))
    if multilabel and layout != "vfm":
        raise ValueError("multilabel=True is only meaningful with layout='vfm'")
    if multilabel and num_classes > n_types:
        raise ValueError(f"multilabel {kind} has {n_types} lesion types, so num_classes must be <= {n_types}")
    if layout == "segmentation" and num_classes > n_types + 1:
        raise ValueError(f"segmentation of {kind} supports num_classes <= {n_types + 1} (background + lesion types)")
    if dataset_name is not None and (not dataset_name or os.sep in dataset_name or dataset_name in (".", "..")):
        raise ValueError(f"bad dataset_name {dataset_name!r}")

    counts = _split_counts(n_per_class, _DEFAULT_SPLITS if splits is None else splits)
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    ext = image_format
    names = class_names(num_classes)
    all_types = lesion_types_for(kind)
    ds = dataset_name or ("images" if layout == "flat" else "dataset_A")
    total = sum(counts.values()) * num_classes
    width = max(5, len(str(max(total - 1, 0))))

    summary: Dict[str, Any] = {
        "root": root, "kind": kind, "layout": layout, "num_classes": num_classes, "size": size, "seed": int(seed),
        "image_format": ext, "bit_depth": bit_depth, "channels": 1 if bit_depth == 16 else channels,
        "multilabel": bool(multilabel), "class_names": names if not multilabel else list(all_types[:num_classes]),
        "label_rule": "class 0: no lesion; class k>=1: 3k-1..3k lesions; label(n) = min(C-1, (n+1)//3)",
        "counts": {}, "files": {}, "label_files": {}, "num_images": 0,
    }
    flat_index = 0
    for split, per_class in counts.items():
        split_dir_name = _VFM_SPLIT_NAMES.get(split, split) if layout in ("vfm", "segmentation", "landmark") else split
        files: List[str] = []
        label_lines: List[str] = []
        class_count = {n: 0 for n in summary["class_names"]}
        for k in range(num_classes):
            for j in range(per_class):
                idx = k * per_class + j  # index within the split
                s_seed = image_seed(seed, split, j, k)
                if multilabel:
                    bits = np.random.default_rng(s_seed ^ 0x5EED).integers(0, 2, size=num_classes)
                    s = multilabel_sample(kind, s_seed, bits.tolist(), size)
                elif layout == "segmentation" and num_classes > 2:
                    lo, hi = lesion_count_range(k, num_classes)
                    n = int(np.random.default_rng(s_seed ^ 0x5EED).integers(max(lo, 1) if k else 0, max(hi, 1) + 1))
                    s = _sample_n(kind, s_seed, size, n, num_classes, all_types[: num_classes - 1])
                else:
                    s = sample(kind, s_seed, k, size, num_classes)
                im = _image_pil(s, bit_depth, channels)
                fname = f"{idx:0{width}d}.{ext}"
                if layout == "imagefolder":
                    rel = os.path.join(split, names[k], fname)
                elif layout == "flat":
                    rel = os.path.join(ds, f"{flat_index:0{width}d}.{ext}")
                    flat_index += 1
                elif layout == "vfm":
                    rel = os.path.join(ds, split_dir_name, fname)
                else:
                    rel = os.path.join(ds, split_dir_name, "images", fname)
                path = os.path.join(root, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                _atomic_write_bytes(path, _encode(im, ext))
                files.append(rel)
                if layout == "vfm":
                    lab = ",".join(str(int(b)) for b in s.multi_hot[:num_classes]) if multilabel else str(s.label)
                    label_lines.append(f"{split_dir_name}/{fname};{lab}")
                    if multilabel:
                        for t in range(num_classes):
                            class_count[all_types[t]] += int(s.multi_hot[t])
                    else:
                        class_count[names[s.label]] += 1
                else:
                    class_count[names[s.label]] += 1
                if layout == "segmentation":
                    lab_map = s.mask if num_classes == 2 else s.type_mask
                    lpath = os.path.join(root, ds, split_dir_name, "labels", f"{idx:0{width}d}.png")
                    os.makedirs(os.path.dirname(lpath), exist_ok=True)
                    _atomic_write_bytes(lpath, _encode(Image.fromarray(lab_map.astype(np.uint8), "L"), "png"))
                elif layout == "landmark":
                    heat = np.zeros((size, size, len(s.landmarks)), np.uint8)
                    for c, (lx, ly) in enumerate(s.landmarks):
                        heat[int(round(min(max(ly, 0), size - 1))), int(round(min(max(lx, 0), size - 1))), c] = 1
                    lpath = os.path.join(root, ds, split_dir_name, "labels", f"{idx:0{width}d}.npy")
                    os.makedirs(os.path.dirname(lpath), exist_ok=True)
                    buf = io.BytesIO()
                    np.save(buf, heat)
                    _atomic_write_bytes(lpath, buf.getvalue())
        if layout == "vfm":
            lf = os.path.join(root, ds, f"{split_dir_name}_labels.txt")
            os.makedirs(os.path.dirname(lf), exist_ok=True)
            _atomic_write_bytes(lf, ("\n".join(label_lines) + "\n").encode() if label_lines else b"")
            summary["label_files"][split] = os.path.relpath(lf, root)
        summary["counts"][split] = class_count
        summary["files"][split] = files
        summary["num_images"] += len(files)
    return summary


def preview_grid(
    size: int = 96, per_row: int = 6, num_classes: int = 2, seed: int = 0, kinds: Sequence[str] = KINDS
) -> np.ndarray:
    """``(rows * size, per_row * size, 3)`` uint8 grid: one row per (kind, class).

    For eyeballing the renderers (``random_data.py --preview``).
    """
    rows = []
    for kind in kinds:
        for k in range(num_classes):
            tiles = [sample(kind, image_seed(seed, "preview", i, k), k, size, num_classes).image for i in range(per_row)]
            rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)
