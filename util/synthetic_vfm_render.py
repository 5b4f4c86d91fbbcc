"""Renderers for VisionFM's modalities beyond ``util.synthetic_render``: disease marks painted onto a fundus
photo (the 13-label scheme), an OCT B-scan, an external-eye photo, an FFA and a slit-lamp look-alike.

Every mark is a visible, size-relative change a frozen encoder's features can pick up:

* fundus: DR grade = number of exudates / haemorrhages (the lesion-count rule of ``util.synthetic``);
  glaucoma = large pale cup; AMD = yellow drusen around the fovea; cataract = haze and blur;
  hypertensive retinopathy = whitish cotton-wool spots; retinal vein occlusion = dark-red streaked wedge
  from the disc; myopia = pale crescent beside the disc; retinal detachment = grey veil over the periphery;
  ``brightness`` scales the whole field of view.
* OCT: DR grade = number of dark intraretinal fluid cysts; AMD = drusen mounds under the bright RPE line;
  retinal detachment = dark gap between retina and RPE; glaucoma = thin top (nerve-fibre) layer;
  myopia = strongly curved retina; cataract = dim scan; vein occlusion = thickened retina.
* external eye: ``pallor`` lightens skin and conjunctiva, ``yellow`` tints the sclera, ``redness`` adds
  red to the sclera, ``cataract`` greys the pupil.

Images are ``(S, S, 3)`` uint8; every function is deterministic given its seed.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

from util.synthetic_base import _blob, _box_blur, _grid, _smooth_noise, _to_uint8
from util.synthetic_render import fundus_sample, ultrasound_sample

# The 13 columns of VisionFM's multi-label scheme, in its order: cols 0-4 are the one-hot DR grade
# (col 0 'Healthy' = DR grade 0), col 5 is 'any DR' (1 exactly when col 0 is 0), cols 6-12 are
# independent diseases.
MULTI_LABEL_CLASSES = ("Healthy", "DR-1", "DR-2", "DR-3", "DR-4", "DR", "Glaucoma", "AMD", "Cataract",
                       "Hypertensive Retinopathy", "Retinal Vein Occlusion", "Myopia", "Retinal Detachment")
DISEASES = MULTI_LABEL_CLASSES[6:]
DR_LESION_TYPES = ("exudate", "haemorrhage")


def dr_lesion_count(rng: np.random.Generator, grade: int) -> int:
    """Lesions drawn for DR grade g: 0 for g = 0, else 3g-1 or 3g (neighbouring grades >= 2 apart)."""
    return 0 if grade <= 0 else int(rng.integers(3 * grade - 1, 3 * grade + 1))


def _fov(img: np.ndarray) -> tuple[np.ndarray, float, float]:
    inside = img.max(axis=-1) > 0.02
    ys, xs = np.nonzero(inside)
    if xs.size == 0:
        return inside, img.shape[1] / 2, img.shape[0] / 2
    return inside, float(xs.mean()), float(ys.mean())


def fundus_image(seed: int, size: int, n_lesions: int = 0, marks: Optional[Mapping[str, float]] = None,
                 brightness: float = 1.0) -> tuple[np.ndarray, dict]:
    """Fundus photo with ``n_lesions`` DR lesions and the disease marks in ``marks`` (name -> strength in
    (0, 1]; names from :data:`DISEASES`). Returns the image and facts about it (vessel density, lesion
    area fraction, optic-disc and fovea positions, field-of-view centre and radius)."""
    s = fundus_sample(seed, size, n_lesions, lesion_types=DR_LESION_TYPES)
    marks = {k: float(v) for k, v in (marks or {}).items() if v}
    rng = np.random.default_rng([seed, 0x7A6])
    img = s.image.astype(np.float32) / 255.0
    S = s.size
    xs, ys = _grid(S)
    inside, cx, cy = _fov(img)
    R, rd = s.info["fov_radius"], s.info["disc_radius"]
    (dx, dy), (fx, fy) = s.landmarks

    def paint(cover: np.ndarray, colour, alpha: float = 1.0) -> None:
        nonlocal img
        a = np.clip(cover * alpha, 0, 1)[..., None]
        img = img * (1 - a) + np.asarray(colour, np.float32) * a

    if "Glaucoma" in marks:  # enlarged pale cup
        cup, _ = _blob(xs, ys, dx, dy, rd * (0.75 + 0.55 * marks["Glaucoma"]), rd * (0.8 + 0.6 * marks["Glaucoma"]), 0)
        paint(cup, (1.0, 0.97, 0.85), 0.9)
    if "Myopia" in marks:  # pale peripapillary crescent towards the fovea
        ux, uy = (fx - dx), (fy - dy)
        n = max(math.hypot(ux, uy), 1e-6)
        cres, _ = _blob(xs, ys, dx + ux / n * rd * 0.9, dy + uy / n * rd * 0.9, rd * 1.8, rd * 1.4, 0)
        disc, _ = _blob(xs, ys, dx, dy, rd, rd, 0)
        paint(cres * (1 - disc), (0.95, 0.82, 0.66), 0.85 * marks["Myopia"] + 0.15)
        # tessellated (tigroid) fundus: choroidal stripes show through a thinner retina
        tig = 0.5 + 0.5 * np.sin((xs * 0.8 + ys * 0.6) / max(1.0, 0.05 * R))
        img = img * (1 - 0.3 * marks["Myopia"] * tig[..., None] * np.array([0.1, 0.6, 0.6], np.float32))
    if "AMD" in marks:  # drusen cluster around the fovea
        for _ in range(int(rng.integers(6, 11))):
            a, r = rng.uniform(0, 2 * math.pi), 0.28 * R * math.sqrt(rng.random())
            dr_ = max(1.0, rng.uniform(0.04, 0.06) * R)
            c, _ = _blob(xs, ys, fx + r * math.cos(a), fy + r * math.sin(a), dr_, dr_, 0)
            paint(c, (1.0, 0.88, 0.42), 0.95)
    if "Hypertensive Retinopathy" in marks:  # whitish fluffy cotton-wool spots
        for _ in range(int(rng.integers(4, 7))):
            a, r = rng.uniform(0, 2 * math.pi), R * rng.uniform(0.25, 0.7)
            rr = max(1.5, 0.1 * R)
            c, rho = _blob(xs, ys, cx + r * math.cos(a), cy + r * math.sin(a), rr * 1.3, rr, a)
            paint(np.clip(1 - rho * rho, 0, 1) ** 0.5, (1.0, 0.98, 0.95), 0.95)
    if "Retinal Vein Occlusion" in marks:  # dark-red streaked wedge from the disc
        a0 = rng.uniform(0, 2 * math.pi)
        ang = np.arctan2(ys - dy, xs - dx)
        dist = np.hypot(xs - dx, ys - dy)
        d_ang = np.abs((ang - a0 + math.pi) % (2 * math.pi) - math.pi)
        wedge = np.clip((0.6 - d_ang) * 8, 0, 1) * (dist > rd) * (dist < 0.9 * R)
        streak = 0.75 + 0.25 * np.sin(ang * 60.0)
        img = img * (1 - (wedge * streak)[..., None] * np.array([0.6, 0.85, 0.85], np.float32))
    if "Retinal Detachment" in marks:  # grey veil over a peripheral region with a wavy edge
        a0 = rng.uniform(0, 2 * math.pi)
        proj = ((xs - cx) * math.cos(a0) + (ys - cy) * math.sin(a0)) / R
        edge = 0.3 + 0.06 * np.sin(((ys - cy) * math.cos(a0) - (xs - cx) * math.sin(a0)) / R * 9)
        paint(np.clip((proj - edge) * 10, 0, 1), (0.62, 0.62, 0.6), 0.75)
    if "Cataract" in marks:  # haze: blur, lower contrast, milky veil
        r = max(1, int(round(S / 40)))
        img = 0.45 * img + 0.55 * _box_blur(img, r, r)
        img = img * (1 - 0.45 * marks["Cataract"]) + 0.35 * marks["Cataract"]
    img = img * float(brightness)
    img = img * inside[..., None]
    facts = {"vessel_density": s.info["vessel_density"], "lesion_area": s.target, "n_lesions": s.n_lesions,
             "optic_disc": tuple(map(float, s.landmarks[0])), "fovea": tuple(map(float, s.landmarks[1])),
             "fov_centre": (cx, cy), "fov_radius": float(R), "type_mask": s.type_mask}
    return _to_uint8(img), facts


def oct_image(seed: int, size: int, dr_grade: int = 0, marks: Optional[Mapping[str, float]] = None) -> np.ndarray:
    """OCT B-scan look-alike (grey, 3 equal channels): layered retina over a bright RPE line and the choroid."""
    marks = marks or {}
    rng = np.random.default_rng([seed, 0x0C7])
    S = size
    xs, ys = _grid(S)
    u = xs[0] / max(S - 1, 1)
    curv = rng.uniform(0.05, 0.1) + (0.25 if "Myopia" in marks else 0.0)
    tilt = rng.uniform(-0.05, 0.05)
    top = S * (0.3 + curv * (2 * u - 1) ** 2 + tilt * (u - 0.5)) + S * 0.07 * np.exp(-((u - 0.5) / 0.08) ** 2)
    thick = S * rng.uniform(0.22, 0.26) * (1.3 if "Retinal Vein Occlusion" in marks else 1.0)
    rpe = S * (0.3 + curv * (2 * u - 1) ** 2 + tilt * (u - 0.5)) + thick
    if "AMD" in marks:  # drusen lift the RPE in mounds
        for _ in range(int(rng.integers(3, 6))):
            c, w = rng.uniform(0.2, 0.8), rng.uniform(0.025, 0.05)
            rpe = rpe - S * 0.09 * np.exp(-((u - c) / w) ** 2)
    d = (ys - top[None, :]) / np.maximum(rpe - top, 1.0)[None, :]
    rnfl = 0.05 if "Glaucoma" in marks else 0.16
    # depth profile of reflectivity: bright nerve-fibre layer, alternating nuclear / plexiform layers
    prof = np.where(d < rnfl, 0.85, np.where(d < 0.35, 0.45, np.where(d < 0.5, 0.62, np.where(d < 0.65, 0.3,
                    np.where(d < 0.75, 0.55, 0.25)))))
    ret = ((d >= 0) & (d < 1)).astype(np.float32)
    img = prof * ret
    band = np.exp(-((ys - rpe[None, :]) / max(1.0, 0.02 * S)) ** 2)
    img = img + 1.0 * band
    below = ys > rpe[None, :]
    img = img + below * 0.45 * np.exp(-(ys - rpe[None, :]).clip(0) / (0.15 * S))
    if "Retinal Detachment" in marks:  # retina lifted off the RPE over part of the scan: a dark gap
        c, w = rng.uniform(0.35, 0.65), rng.uniform(0.25, 0.35)
        lift = np.clip(1 - np.abs(u - c) / w, 0, 1)[None, :]
        gap = (d > 0.72) & (d < 0.97) & (lift > 0.05)
        img = np.where(gap, 0.02, img)
    for _ in range(2 * int(dr_grade)):  # intraretinal fluid cysts
        x0 = rng.uniform(0.2, 0.8) * S
        col = int(np.clip(round(x0), 0, S - 1))
        y0 = top[col] + rng.uniform(0.35, 0.7) * (rpe[col] - top[col])
        r = max(1.2, rng.uniform(0.04, 0.06) * S)
        c, _ = _blob(xs, ys, x0, y0, r * 1.4, r, 0)
        img = img * (1 - c) + 0.03 * c
    speck = np.abs(rng.standard_normal((S, S))).astype(np.float32)
    img = img * (0.55 + 0.45 * speck) + 0.03 * _smooth_noise(rng, S, 6)
    if "Cataract" in marks:
        img = img * 0.55
    g = _to_uint8(np.clip(img, 0, 1) * 0.9)
    return np.repeat(g[..., None], 3, axis=2)


def external_image(seed: int, size: int, pallor: float = 0.0, yellow: float = 0.0, redness: float = 0.0,
                   cataract: float = 0.0, slit: bool = False) -> np.ndarray:
    """External-eye photo look-alike: skin, almond eye opening, sclera, iris and pupil. ``slit`` adds the
    bright vertical beam of a slit lamp."""
    rng = np.random.default_rng([seed, 0xE7E])
    S = size
    xs, ys = _grid(S)
    cx, cy = S * rng.uniform(0.45, 0.55), S * rng.uniform(0.45, 0.55)
    w, h = S * rng.uniform(0.36, 0.44), S * rng.uniform(0.17, 0.22)
    skin = np.array([0.82, 0.6, 0.5], np.float32) * rng.uniform(0.8, 1.05)
    skin = skin + (1 - skin) * 0.45 * np.clip(pallor, -1, 1)
    img = np.broadcast_to(skin, (S, S, 3)).astype(np.float32) * (1 + 0.04 * _smooth_noise(rng, S, 5))[..., None]
    xn = (xs - cx) / w
    opening = np.clip((h * np.clip(1 - xn * xn, 0, 1) - np.abs(ys - cy)) + 0.5, 0, 1)
    sclera = np.array([0.95, 0.93, 0.9], np.float32)
    sclera = sclera * (1 - 0.45 * np.clip(yellow, 0, 2) * np.array([0.0, 0.15, 0.9], np.float32))
    sclera = sclera * (1 - 0.45 * np.clip(redness, 0, 2) * np.array([0.0, 0.5, 0.5], np.float32))
    eye = np.broadcast_to(sclera, (S, S, 3)).astype(np.float32).copy()
    iris_r = S * rng.uniform(0.15, 0.19)
    iris_col = np.array([[0.35, 0.2, 0.1], [0.25, 0.4, 0.6], [0.3, 0.45, 0.25]], np.float32)[rng.integers(0, 3)]
    ix = cx + rng.uniform(-0.1, 0.1) * w
    c_iris, rho = _blob(xs, ys, ix, cy, iris_r, iris_r, 0)
    eye = eye * (1 - c_iris[..., None]) + (iris_col * (0.8 + 0.3 * rho[..., None])) * c_iris[..., None]
    c_pup, _ = _blob(xs, ys, ix, cy, iris_r * 0.4, iris_r * 0.4, 0)
    pupil = np.full(3, 0.04 + 0.6 * np.clip(cataract, 0, 1), np.float32)
    eye = eye * (1 - c_pup[..., None]) + pupil * c_pup[..., None]
    img = img * (1 - opening[..., None]) + eye * opening[..., None]
    lid = np.exp(-((np.abs(ys - cy) - h * np.clip(1 - xn * xn, 0, 1)) ** 2) / (2 * max(0.6, 0.012 * S) ** 2))
    img = img * (1 - 0.5 * lid * (np.abs(xn) < 1))[..., None]
    if slit:
        beam = np.exp(-((xs - ix - 0.3 * iris_r) ** 2) / (2 * max(0.7, 0.015 * S) ** 2))
        img = img * 0.45 + 0.7 * beam[..., None]
    img = img + 0.01 * rng.standard_normal((S, S, 3)).astype(np.float32)
    return _to_uint8(img)


def ffa_image(seed: int, size: int, n_lesions: int = 0) -> np.ndarray:
    """Fluorescein angiogram look-alike: grey fundus with bright vessels (dye) and dark lesions."""
    img, _ = fundus_image(seed, size, n_lesions)
    f = img.astype(np.float32) / 255.0
    inside = f.max(axis=-1) > 0.02
    g = f[..., 1]  # green channel: vessels and haemorrhages are darkest there
    out = np.clip(1.2 - 2.2 * g / max(float(g[inside].mean()) if inside.any() else 1.0, 1e-3) * 0.5, 0, 1) * inside
    out = _to_uint8(out * 0.85)
    return np.repeat(out[..., None], 3, axis=2)


def ultrasound_image(seed: int, size: int, n_lesions: int = 0) -> np.ndarray:
    return ultrasound_sample(seed, size, n_lesions).image
