"""The renderers: procedural fundus photographs and B-mode ultrasound images with lesions, the public
samplers over them (one image of a class, of a lesion count, of a multi-hot label) and a preview grid.
Import them through ``util.synthetic``."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from util.synthetic_base import (FUNDUS_LESION_TYPES, KINDS, ULTRASOUND_LESION_TYPES, SyntheticSample, _blob,
                                  _box_blur, _check_kind, _check_num_classes, _check_seed, _check_size, _finish, _grid,
                                  _pick_types, _place_lesions, _smooth_noise, _soft_inside, _streams, _sub_seq,
                                  _to_uint8, image_seed, lesion_count_range, lesion_types_for)


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
