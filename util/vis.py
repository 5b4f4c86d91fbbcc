"""Pictures users look at: reconstruction panels (PNG and TensorBoard)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


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


def save_png(arr: np.ndarray, path: str) -> None:
    """Write atomically so a viewer never opens a half-written picture."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)
