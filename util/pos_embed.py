"""Fixed 2-D sin-cos position embeddings and position-embedding resizing.

The layout follows the MAE release exactly: the first half of the channels encodes the
*column* (x) coordinate and the second half the *row* (y) coordinate, sines before cosines, tokens in
row-major order, a zero row for the cls token, computed in float64. Swapping the halves would break
every released checkpoint, so it stays as is even though the reference names the halves confusingly.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _as_hw(grid_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(grid_size, int):
        return grid_size, grid_size
    h, w = grid_size
    return int(h), int(w)


def get_1d_sincos_pos_embed(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) table: sin(pos*w_k) for all k, then cos(pos*w_k)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | Sequence[int], cls_token: bool = False) -> np.ndarray:
    """(1+H*W or H*W, embed_dim) float64 table for an H x W token grid (row-major)."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    h, w = _as_hw(grid_size)
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    emb = np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, cols),
                          get_1d_sincos_pos_embed(embed_dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb


def sincos_tensor(embed_dim: int, grid_size: int | Sequence[int], cls_token: bool) -> torch.Tensor:
    """The table as a (1, tokens, D) float32 tensor, ready to copy into a parameter."""
    return torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token)).float().unsqueeze(0)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int | Sequence[int], num_extra_tokens: int = 1,
                     old_grid: Sequence[int] | None = None, antialias: bool = False) -> torch.Tensor:
    """Bicubic resize of a (1, extra + H*W, D) table to a new (h, w) grid; THE resize of the code base.

    Extra (cls) rows are kept unchanged; the grid is resized in float32 with `align_corners=False` and
    returned in the input dtype. A table already of the requested size is returned as is (same object).
    `old_grid` defaults to the square grid the token count implies. `antialias=False` is the MAE /
    RETFound finetuning interpolation (checkpoint loading keeps their numbers); `antialias=True` is timm's
    `resample_abs_pos_embed` default, which the ViT uses for inputs of another size than it was built for.
    """
    new_h, new_w = _as_hw(new_grid)
    extra = pos_embed[:, :num_extra_tokens]
    grid = pos_embed[:, num_extra_tokens:]
    n_old = grid.shape[1]
    if old_grid is None:
        side = int(math.isqrt(n_old))
        if side * side != n_old:
            raise ValueError(f"cannot infer a square grid from {n_old} position tokens; pass old_grid")
        old_grid = (side, side)
    old_h, old_w = _as_hw(old_grid)
    if old_h * old_w != n_old:
        raise ValueError(f"{n_old} position tokens do not form a {old_h}x{old_w} grid")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)
