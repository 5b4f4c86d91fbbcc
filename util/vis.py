"""Pictures users look at: reconstruction panels (PNG and TensorBoard), notes under figures, image tiles."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def panel_grid(columns: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float],
               scale: int = 1) -> np.ndarray:
    """Rows = images, columns = named views; returns an HxWx3 uint8 grid with a title row."""
    names = list(columns)
    views = [denormalize(columns[n].detach().float().cpu(), mean, std) for n in names]
    n, _, h, w = views[0].shape
    h, w = h * scale, w * scale
    pad, title = 2, 12
    grid = np.full((title + n * (h + pad), len(names) * (w + pad), 3), 255, np.uint8)
    for j, v in enumerate(views):
        if scale > 1:
            v = torch.nn.functional.interpolate(v, scale_factor=scale, mode="nearest")
        arr = (v.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        for i in range(n):
            y, x = title + i * (h + pad), j * (w + pad)
            grid[y:y + h, x:x + w] = arr[i]
    img = Image.fromarray(grid)
    draw = ImageDraw.Draw(img)
    for j, name in enumerate(names):
        draw.text((j * (w + pad) + 2, 0), name, fill=(0, 0, 0))
    return np.array(img)  # writable copy (torch.from_numpy warns on read-only arrays)


def add_note(grid: np.ndarray, text: str, color: tuple[int, int, int] = (170, 0, 0)) -> np.ndarray:
    """`grid` with a white band underneath holding `text`, wrapped to the picture's width (HxWx3 uint8).
    Used for caveats that must travel with the figure (e.g. an encoder-only checkpoint)."""
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: bitmap font only
        font = ImageFont.load_default()
    width = grid.shape[1]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split():
            trial = f"{line} {word}".strip()
            if line and measure.textlength(trial, font=font) > width - 4:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    line_h = 13
    band = Image.new("RGB", (width, len(lines) * line_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((2, 2 + i * line_h), line, fill=color, font=font)
    return np.concatenate([np.asarray(grid, dtype=np.uint8), np.array(band)], axis=0)


def hstack(images: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
    """Tiles of equal height side by side on white (HxWx3 uint8)."""
    h = max(im.shape[0] for im in images)
    out = np.full((h, sum(im.shape[1] for im in images) + pad * (len(images) - 1), 3), 255, np.uint8)
    x = 0
    for im in images:
        out[:im.shape[0], x:x + im.shape[1]] = im
        x += im.shape[1] + pad
    return out


def collect_images(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """(path, stem) for image files and every image under folders; stems are unique output-name bases:
    the file name without extension, or for images found in a folder the path relative to it with '/'
    turned into '__' (class_0/001.png -> class_0__001), numbered when two inputs still collide."""
    from util.cli import UserError
    from util.data import IMG_EXTENSIONS, list_images
    found: list[tuple[str, str]] = []
    for item in inputs:
        if os.path.isdir(item):
            files = list_images(item)
            if not files:
                raise UserError(f"{item}: no images found (extensions: {', '.join(IMG_EXTENSIONS)})")
            for f in files:
                rel = os.path.splitext(os.path.relpath(f, item))[0]
                found.append((f, rel.replace(os.sep, "__")))
        elif os.path.isfile(item):
            found.append((item, os.path.splitext(os.path.basename(item))[0]))
        else:
            raise UserError(f"{item}: no such image file or folder")
    seen: dict[str, int] = {}
    out = []
    for path, stem in found:
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append((path, stem if n == 0 else f"{stem}_{n}"))
    return out


def save_png(arr: np.ndarray, path: str) -> None:
    """Write atomically so a viewer never opens a half-written picture."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)
