"""Pictures of dense predictions: segmentation contours and landmark points over the images, in a grid.

Truth is drawn in green hues and predictions in red hues, so agreement shows as two coinciding outlines
(or a dot inside a ring) and errors as the gap between them. Small images are enlarged by an integer
factor first (nearest neighbour) so one-pixel outlines stay visible. PNGs go through `util.vis.save_png`
(an atomic write).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from util.vis import _font, save_png

TRUTH_COLOURS = ((0, 230, 0), (0, 220, 220), (60, 120, 255), (170, 255, 120), (0, 140, 90))
PRED_COLOURS = ((255, 40, 40), (255, 0, 220), (255, 150, 0), (255, 240, 0), (170, 60, 255))
_MIN_TILE = 192  # display side at least this many pixels
_CAPTION = 16


def _as_rgb_uint8(images: Any) -> np.ndarray:
    a = np.asarray(images)
    if a.ndim == 3:  # (N, H, W) grey
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, 3) or (N, H, W) uint8, got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float64) * (255.0 if a.max(initial=0) <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
    return a


def _scale_for(h: int, w: int) -> int:
    return max(1, -(-_MIN_TILE // max(h, w)))


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it (the image border counts as outside)."""
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~inner


def _grid(tiles: Sequence[np.ndarray], cols: int, legend: str, pad: int = 4) -> np.ndarray:
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    cols = max(1, min(cols, len(tiles)))
    rows = -(-len(tiles) // cols)
    font = _font(12)
    width = cols * w + (cols + 1) * pad
    canvas = Image.new("RGB", (width, rows * h + (rows + 1) * pad + 2 * _CAPTION), (255, 255, 255))
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas.paste(Image.fromarray(t), (pad + c * (w + pad), pad + r * (h + pad)))
    ImageDraw.Draw(canvas).text((pad, rows * (h + pad) + pad + 2), legend, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _caption(tile: np.ndarray, text: str) -> np.ndarray:
    im = Image.new("RGB", (tile.shape[1], tile.shape[0] + _CAPTION), (255, 255, 255))
    im.paste(Image.fromarray(tile), (0, _CAPTION))
    ImageDraw.Draw(im).text((2, 1), text, fill=(0, 0, 0), font=_font(11))
    return np.asarray(im)


def seg_overlay_png(images: Any, pred: Any, true: Any, path: str, class_names: Sequence[str],
                    max_images: int = 8, cols: int = 4, titles: Sequence[str] | None = None) -> None:
    """A grid of the first `max_images` images with the outline of each foreground class: truth in green
    hues, prediction in red hues; each tile captioned with its foreground Dice (mean over the classes
    present in truth or prediction; 1.0 when both are empty). `images` (N, H, W, 3) or (N, H, W) uint8,
    `pred` / `true` (N, H, W) class maps of the same size, `class_names` index 0 = background."""
    imgs = _as_rgb_uint8(images)
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape or pred.shape != imgs.shape[:3]:
        raise ValueError(f"images {imgs.shape[:3]}, pred {pred.shape} and true {true.shape} must share (N, H, W)")
    n = min(len(imgs), int(max_images))
    if n == 0:
        raise ValueError("no images to draw")
    C = max(len(class_names), int(max(pred.max(initial=0), true.max(initial=0))) + 1, 2)
    s = _scale_for(*imgs.shape[1:3])
    tiles = []
    for i in range(n):
        tile = imgs[i].repeat(s, 0).repeat(s, 1).copy()
        t_up, p_up = true[i].repeat(s, 0).repeat(s, 1), pred[i].repeat(s, 0).repeat(s, 1)
        dices = []
        for c in range(1, C):
            tc, pc = true[i] == c, pred[i] == c
            tot = int(tc.sum() + pc.sum())
            if tot:
                dices.append(2.0 * float((tc & pc).sum()) / tot)
            tile[_boundary(t_up == c)] = TRUTH_COLOURS[(c - 1) % len(TRUTH_COLOURS)]
            tile[_boundary(p_up == c)] = PRED_COLOURS[(c - 1) % len(PRED_COLOURS)]
        dice = float(np.mean(dices)) if dices else 1.0
        label = titles[i] if titles is not None and i < len(titles) else f"#{i}"
        tiles.append(_caption(tile, f"{label}  Dice {dice:.2f}"))
    names = [str(c) for c in class_names][1:C] or ["foreground"]
    if len(names) == 1:
        legend = f"{names[0]}: green = truth, red = prediction"
    else:
        legend = "truth green/cyan/blue..., prediction red/magenta/orange... in class order: " + ", ".join(names)
    save_png(_grid(tiles, cols, legend), path)


def landmark_overlay_png(images: Any, pred_points: Any, true_points: Any, path: str,
                         names: Sequence[str] | None = None, max_images: int = 8, cols: int = 4,
                         titles: Sequence[str] | None = None) -> None:
    """A grid of the first `max_images` images with each true landmark (green ring) and its prediction
    (red cross) joined by a yellow line and numbered by landmark index; each tile captioned with its mean
    radial error in pixels. Points (N, K, 2) (x, y) in the images' pixels; NaN truths are not drawn."""
    imgs = _as_rgb_uint8(images)
    pp, tp = np.asarray(pred_points, np.float64), np.asarray(true_points, np.float64)
    if pp.shape != tp.shape or pp.ndim != 3 or pp.shape[0] != imgs.shape[0] or pp.shape[-1] != 2:
        raise ValueError(f"points must be (N, K, 2) for the N images, got {pp.shape} and {tp.shape}")
    n = min(len(imgs), int(max_images))
    if n == 0:
        raise ValueError("no images to draw")
    s = _scale_for(*imgs.shape[1:3])
    r = max(3, s + 2)
    font = _font(11)
    tiles = []
    for i in range(n):
        im = Image.fromarray(imgs[i].repeat(s, 0).repeat(s, 1))
        d = ImageDraw.Draw(im)
        errs = []
        for k in range(pp.shape[1]):
            t, p = (tp[i, k] + 0.5) * s, (pp[i, k] + 0.5) * s  # pixel centres on the enlarged tile
            if not np.isfinite(tp[i, k]).all():
                continue
            if np.isfinite(pp[i, k]).all():
                errs.append(float(np.hypot(*(pp[i, k] - tp[i, k]))))
                d.line([tuple(t), tuple(p)], fill=(255, 230, 0), width=1)
                d.line([(p[0] - r, p[1] - r), (p[0] + r, p[1] + r)], fill=PRED_COLOURS[0], width=2)
                d.line([(p[0] - r, p[1] + r), (p[0] + r, p[1] - r)], fill=PRED_COLOURS[0], width=2)
            d.ellipse([t[0] - r, t[1] - r, t[0] + r, t[1] + r], outline=TRUTH_COLOURS[0], width=2)
            d.text((t[0] + r + 1, t[1] - r - 1), str(k), fill=TRUTH_COLOURS[0], font=font)
        label = titles[i] if titles is not None and i < len(titles) else f"#{i}"
        err = f"MRE {np.mean(errs):.1f} px" if errs else "no landmark"
        tiles.append(_caption(np.asarray(im), f"{label}  {err}"))
    legend = "green ring = truth, red cross = prediction"
    if names:
        legend += "; " + ", ".join(f"{k} {n_}" for k, n_ in enumerate(names))
    save_png(_grid(tiles, cols, legend), path)
