"""Token masks for iBOT's masked image modelling: block-wise (BEiT) and random shapes, per-crop ratios.

Masks are [h, w] bool NumPy arrays on the patch grid of a crop (True = the student sees `masked_embed`
there). The random draws come from explicit generators: a `random.Random` for ratios and blocks, a
`np.random.RandomState` for the random shape, so the same (seed, epoch, index) always gives the same
masks, whatever the worker count or resume point. Seeding `random.Random(s)` and `RandomState(s)` gives
the sequence iBOT's loader produces after `random.seed(s)` and `np.random.seed(s)`.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np

from util.cli import UserError

PRED_SHAPES = ("block", "rand")


class MaskingGenerator:
    """BEiT's block-wise masking: rectangles of random area and aspect are added until
    `num_masking_patches` patches are masked (or ten attempts in a row add none).

    Each attempt draws an area ~ U(min_num_patches, budget left) and a log-uniform aspect in
    [min_aspect, max_aspect] (max_aspect defaults to 1/min_aspect); the rectangle must be smaller than the
    grid on both sides and is accepted when it adds between 1 and `budget` new patches.
    `num_masking_patches` may be fractional (iBOT uses ratio * h * w as is).
    """

    def __init__(self, input_size: int | Sequence[int], num_masking_patches: float, min_num_patches: float = 4,
                 max_num_patches: float | None = None, min_aspect: float = 0.3,
                 max_aspect: float | None = None) -> None:
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, budget: float, rng: random.Random) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                window = mask[top:top + h, left:left + w]
                new = h * w - int(window.sum())
                if 0 < new <= budget:
                    window[...] = True
                    return new
        return 0

    def __call__(self, rng: random.Random | None = None) -> np.ndarray:
        rng = rng if rng is not None else random.Random()
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask


def random_mask(grid: Sequence[int], num_masking_patches: float, np_rng: np.random.RandomState) -> np.ndarray:
    """Exactly int(num_masking_patches) True values at shuffled positions of the grid."""
    h, w = grid
    n = int(num_masking_patches)
    flat = np.hstack([np.zeros(h * w - n), np.ones(n)]).astype(bool)
    np_rng.shuffle(flat)
    return flat.reshape(h, w)


def _as_list(x: float | Sequence[float]) -> list[float]:
    return [float(v) for v in x] if isinstance(x, (list, tuple)) else [float(x)]


class iBOTMasker:
    """iBOT's per-crop mask draw.

    For every crop a ratio is drawn: with lists `pred_ratio` [m...] and `pred_ratio_var` [v...], each pair
    gives U(m - v, m + v) (m itself when v = 0) and one of these values is picked uniformly; 0 before
    `pred_start_epoch`. Then `ratio * h * w` patches are masked in the `pred_shape` ('block': BEiT's
    rectangles with a minimum area of (min(h, w) // 3)^2 and aspect in [0.3, 1/0.3]; 'rand': uniform).
    Example: pred_ratio (0, 0.3), pred_ratio_var (0, 0.2) leaves a crop unmasked with probability 1/2 and
    otherwise masks a ratio ~ U(0.1, 0.5).
    """

    def __init__(self, pred_ratio: float | Sequence[float] = 0.3, pred_ratio_var: float | Sequence[float] = 0.0,
                 pred_shape: str = "block", pred_start_epoch: int = 0, min_aspect: float = 0.3,
                 max_aspect: float | None = None) -> None:
        ratios, variances = _as_list(pred_ratio), _as_list(pred_ratio_var)
        if len(variances) == 1 and len(ratios) > 1:
            variances = variances * len(ratios)
        if len(ratios) != len(variances):
            raise UserError(f"--pred_ratio has {len(ratios)} values but --pred_ratio_var has {len(variances)}; "
                            "give one variance per ratio")
        for m, v in zip(ratios, variances):
            if not (0 <= v <= m and m + v <= 1):
                raise UserError(f"--pred_ratio {m} with --pred_ratio_var {v}: need 0 <= var <= ratio and "
                                "ratio + var <= 1")
        if pred_shape not in PRED_SHAPES:
            raise UserError(f"unknown --pred_shape '{pred_shape}'; choose one of {', '.join(PRED_SHAPES)}")
        self.ratios, self.variances = ratios, variances
        # iBOT picks among the drawn ratios (one Python `random` call) whenever the flag was a list, even of
        # one value; a scalar is used directly. Keeping this keeps the random sequence identical.
        self.pick = isinstance(pred_ratio, (list, tuple))
        self.pred_shape = pred_shape
        self.pred_start_epoch = pred_start_epoch
        self.min_aspect, self.max_aspect = min_aspect, max_aspect

    def draw_ratio(self, rng: random.Random, epoch: int = 0) -> float:
        if epoch < self.pred_start_epoch:
            return 0.0
        drawn = [rng.uniform(m - v, m + v) if v > 0 else m for m, v in zip(self.ratios, self.variances)]
        return rng.choice(drawn) if self.pick else drawn[0]

    def mask(self, grid: Sequence[int], ratio: float, rng: random.Random,
             np_rng: np.random.RandomState) -> np.ndarray:
        h, w = grid
        high = ratio * h * w
        if self.pred_shape == "rand":
            return random_mask(grid, high, np_rng)
        gen = MaskingGenerator((h, w), high, min_num_patches=(min(h, w) // 3) ** 2,
                               min_aspect=self.min_aspect, max_aspect=self.max_aspect)
        return gen(rng)

    def __call__(self, grids: Sequence[Sequence[int]], rng: random.Random, np_rng: np.random.RandomState,
                 epoch: int = 0) -> list[np.ndarray]:
        """One mask per crop grid, drawn in order from the two generators."""
        out = []
        for grid in grids:
            out.append(self.mask(grid, self.draw_ratio(rng, epoch), rng, np_rng))
        return out


def mask_generators(seed: int) -> tuple[random.Random, np.random.RandomState]:
    """The pair of generators iBOTMasker draws from, both seeded by `seed` (e.g. `sample_seed(seed,
    epoch, index)`); RandomState takes 32 bits."""
    return random.Random(seed), np.random.RandomState(seed % (2 ** 32))
