"""Landmark geometry: point labels, coordinate transforms that follow the image, Gaussian heatmaps.

Coordinates are (x, y) in pixels with pixel centres at integers (pixel (0, 0) covers [-0.5, 0.5)^2),
so resizing maps x -> (x + 0.5) * W'/W - 0.5 and a horizontal flip maps x -> W - 1 - x. Points travel
with the image through every transform and the heatmaps are rendered at the final size, so a landmark
is never lost: resizing a one-pixel target map by nearest neighbour (VisionFM's way, 512 -> 224) drops
most points, and flipping without swapping left/right identities mislabels them.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from util.cli import UserError
from util.data import list_images, load_image, sample_generator
from util.image_io import image_size

_MISSING = {"", "nan", "na", "n/a", "none", "null", "-"}


def points_from_point_map(arr: np.ndarray) -> np.ndarray:
    """(K, 2) float64 (x, y) from a VisionFM point map (H, W, K) (or (H, W) for one landmark): the
    value-weighted centroid of each channel's positive pixels (the pixel itself for a one-hot map);
    NaN for a channel without any."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"a point map must be (H, W, K), got shape {a.shape}")
    a = np.clip(a.astype(np.float64), 0, None)
    out = np.full((a.shape[2], 2), np.nan)
    ys, xs = np.arange(a.shape[0], dtype=np.float64), np.arange(a.shape[1], dtype=np.float64)
    for k in range(a.shape[2]):
        w = a[..., k]
        total = w.sum()
        if total > 0:
            out[k, 0] = float((w.sum(0) * xs).sum() / total)
            out[k, 1] = float((w.sum(1) * ys).sum() / total)
    return out


def _float_field(text: str) -> float:
    t = text.strip()
    return math.nan if t.lower() in _MISSING else float(t)


def read_landmark_csv(path: str, num_landmarks: int | None = None) -> dict[str, np.ndarray]:
    """`{image: (K, 2) float64 (x, y)}` from a CSV with a header row and columns image, x1, y1, ..., xK, yK
    (names free; an empty or 'nan' field is an absent landmark: both coordinates or neither). K comes
    from the header unless `num_landmarks` is given, which must then match. Errors name file:line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read landmark CSV ({getattr(e, 'strerror', None) or e})") from None
    rows = [(i + 1, r) for i, r in enumerate(rows) if r and any(c.strip() for c in r)
            and not r[0].lstrip().startswith("#")]
    if not rows:
        raise UserError(f"{path}: empty landmark CSV; expected a header image,x1,y1,... and one row per image")
    line, header = rows[0]
    try:
        [float(c) for c in header[1:] if c.strip()]
        numeric = len(header) > 1
    except ValueError:
        numeric = False
    if numeric or len(header) < 3 or (len(header) - 1) % 2:
        raise UserError(f"{path}:{line}: expected a header row image,x1,y1,...,xK,yK (an image column and an x,y "
                        f"pair per landmark), got {','.join(header)!r}")
    k = (len(header) - 1) // 2
    if num_landmarks is not None and k != int(num_landmarks):
        raise UserError(f"{path}:{line}: the header has {k} landmark(s) but {num_landmarks} are expected")
    out: dict[str, np.ndarray] = {}
    for line, r in rows[1:]:
        if len(r) != len(header):
            raise UserError(f"{path}:{line}: {len(r)} fields, the header has {len(header)}")
        name = r[0].strip()
        if not name:
            raise UserError(f"{path}:{line}: empty image field")
        if name in out:
            raise UserError(f"{path}:{line}: image {name} is listed twice")
        try:
            vals = np.array([_float_field(c) for c in r[1:]], np.float64).reshape(k, 2)
        except ValueError:
            raise UserError(f"{path}:{line}: coordinates must be numbers (empty or nan = absent landmark)") from None
        if np.any(np.isnan(vals).sum(1) == 1):
            raise UserError(f"{path}:{line}: a landmark has only one of x, y; give both or leave both empty")
        if np.any(np.isinf(vals)):
            raise UserError(f"{path}:{line}: infinite coordinate")
        out[name] = vals
    return out


def resize_points(p: np.ndarray, src_hw: Sequence[int], dst_hw: Sequence[int]) -> np.ndarray:
    """Points of an image of size src (H, W) in the pixels of the same image resized to dst (H, W)."""
    p = np.asarray(p, np.float64)
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    return np.stack([(p[..., 0] + 0.5) * sx - 0.5, (p[..., 1] + 0.5) * sy - 0.5], -1)


def affine_matrix(angle_deg: float, translate_xy: Sequence[float] = (0.0, 0.0), scale: float = 1.0,
                  center: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """3x3 matrix mapping input (x, y, 1) to output pixels: rotate by `angle_deg` counter-clockwise as
    seen on screen (torchvision's RandomAffine sign) and scale about `center`, then translate."""
    a = math.radians(angle_deg)
    c, s = math.cos(a) * scale, math.sin(a) * scale
    cx, cy = center
    tx, ty = translate_xy
    # y points down, so a visually counter-clockwise turn is [[c, s], [-s, c]] in (x, y)
    return np.array([[c, s, cx + tx - c * cx - s * cy],
                     [-s, c, cy + ty + s * cx - c * cy],
                     [0.0, 0.0, 1.0]])


def apply_affine(p: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Points (..., 2) mapped by a 3x3 affine matrix (NaN stays NaN)."""
    p = np.asarray(p, np.float64)
    return p @ M[:2, :2].T + M[:2, 2]


def affine_image(img: Image.Image, M: np.ndarray, resample: int = Image.BILINEAR, fill: int = 0) -> Image.Image:
    """The image warped by M (the same map `apply_affine` applies to its points), same size, `fill` outside."""
    inv = np.linalg.inv(M)
    # Pillow samples in continuous coordinates where pixel i spans [i, i+1): shift by half a pixel each way
    shift, unshift = np.eye(3), np.eye(3)
    shift[:2, 2], unshift[:2, 2] = 0.5, -0.5
    a = shift @ inv @ unshift
    fillcolor = (fill,) * len(img.getbands()) if len(img.getbands()) > 1 else fill
    return img.transform(img.size, Image.AFFINE, data=tuple(a[:2].ravel()), resample=resample, fillcolor=fillcolor)


def hflip_points(p: np.ndarray, width: int, flip_pairs: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """Points of the horizontally flipped image: x -> width - 1 - x, and the rows of each (left, right)
    pair of `flip_pairs` swapped so a landmark keeps its anatomical identity."""
    q = np.array(p, np.float64, copy=True)
    q[..., 0] = width - 1 - q[..., 0]
    for i, j in flip_pairs:
        q[..., [i, j], :] = q[..., [j, i], :]
    return q


def inside_image(p: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """(K,) bool: the point lies on a pixel of an image of size (H, W) (NaN points are not inside)."""
    p = np.asarray(p, np.float64)
    h, w = size_hw
    with np.errstate(invalid="ignore"):
        return (p[..., 0] >= -0.5) & (p[..., 0] < w - 0.5) & (p[..., 1] >= -0.5) & (p[..., 1] < h - 0.5)


def render_heatmaps(points: np.ndarray, size_hw: Sequence[int], sigma: float = 2.0) -> np.ndarray:
    """(K, H, W) float32 Gaussian heatmaps (std `sigma` px) centred on the (sub-pixel) points, each channel
    summing to 1; an absent (NaN) or out-of-image point gives an all-zero channel (skipped by the loss
    and the metrics)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    p = np.asarray(points, np.float64).reshape(-1, 2)
    h, w = int(size_hw[0]), int(size_hw[1])
    out = np.zeros((p.shape[0], h, w), np.float32)
    ok = inside_image(p, (h, w))
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    for k in np.flatnonzero(ok):
        gx = np.exp(-((xs - p[k, 0]) ** 2) / (2 * sigma * sigma))
        gy = np.exp(-((ys - p[k, 1]) ** 2) / (2 * sigma * sigma))
        g = np.outer(gy, gx)
        out[k] = (g / g.sum()).astype(np.float32)
    return out


def decode_heatmaps(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, 2) float (x, y) of the argmax of each channel of (B, K, H, W) heatmap logits."""
    b, k, h, w = logits.shape
    idx = logits.reshape(b, k, h * w).argmax(-1)
    return torch.stack([(idx % w).float(), torch.div(idx, w, rounding_mode="floor").float()], -1)


def _size_hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, (int, np.integer)):
        return int(input_size), int(input_size)
    h, w = (int(v) for v in input_size)
    return h, w


class LandmarkDataset(Dataset):
    """(image float [3, H, W] normalised, heatmaps float [K, H, W], points float [K, 2] (x, y) in input
    pixels with NaN for absent landmarks, index) of (image path, points in the image's pixels) items.

    Image resized bilinearly to `input_size` and its points with it. In training, with probability
    `affine_p` a rotation of up to +-`max_rotate` degrees about the centre and a translation of up to
    `max_translate` of the side (VisionFM's RandomAffine), kept only when every present point stays in
    the image, then a horizontal flip with probability `hflip` (left/right identities swapped by
    `flip_pairs`); image and points always take the same transform. Draws come from a generator seeded
    by (seed, epoch, index). Heatmaps: `render_heatmaps` at the input size.
    """

    def __init__(self, items: Sequence[tuple[str, np.ndarray]], input_size: int | Sequence[int],
                 mean: Sequence[float], std: Sequence[float], train: bool, seed: int = 0, sigma: float = 2.0,
                 flip_pairs: Sequence[tuple[int, int]] = (), affine_p: float = 0.5, max_rotate: float = 5.0,
                 max_translate: float = 0.05, hflip: float = 0.5) -> None:
        self.items = [(p, np.asarray(pts, np.float64).reshape(-1, 2)) for p, pts in items]
        ks = {pts.shape[0] for _, pts in self.items}
        if len(ks) > 1:
            raise UserError(f"landmark items disagree on the number of landmarks: {sorted(ks)}")
        self.num_landmarks = ks.pop() if ks else 0
        for i, j in flip_pairs:
            if not (0 <= i < self.num_landmarks and 0 <= j < self.num_landmarks):
                raise UserError(f"flip pair ({i}, {j}) names a landmark outside 0..{self.num_landmarks - 1}")
        self.size_hw = _size_hw(input_size)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.train, self.seed, self.epoch, self.sigma = bool(train), int(seed), 0, float(sigma)
        self.flip_pairs = [tuple(map(int, pr)) for pr in flip_pairs]
        self.affine_p, self.max_rotate, self.max_translate = float(affine_p), float(max_rotate), float(max_translate)
        self.hflip = float(hflip)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def transformed(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The resized (and in training augmented) RGB image and its points in its pixels."""
        path, pts = self.items[index]
        img = load_image(path)
        h, w = self.size_hw
        src_hw = (img.height, img.width)
        img = img.resize((w, h), Image.BILINEAR)
        p = resize_points(pts, src_hw, (h, w))
        if self.train:
            u = torch.rand(5, generator=sample_generator(self.seed, self.epoch, index), dtype=torch.float64).tolist()
            if u[0] < self.affine_p:
                M = affine_matrix((2 * u[1] - 1) * self.max_rotate,
                                  ((2 * u[2] - 1) * self.max_translate * w, (2 * u[3] - 1) * self.max_translate * h),
                                  1.0, ((w - 1) / 2, (h - 1) / 2))
                q = apply_affine(p, M)
                present = ~np.isnan(p[:, 0])
                if inside_image(q[present], (h, w)).all():  # a transform that pushes a point out is not used
                    img, p = affine_image(img, M), q
            if u[4] < self.hflip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
                p = hflip_points(p, w, self.flip_pairs)
        return img, p

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        img, p = self.transformed(index)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1).div_(255.0)
        x = (x - self.mean) / self.std
        heat = torch.from_numpy(render_heatmaps(p, self.size_hw, self.sigma))
        p = np.where(inside_image(p, self.size_hw)[:, None], p, np.nan)
        return x.contiguous(), heat, torch.from_numpy(p.astype(np.float32)), index


def _load_point_map(path: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: cannot read landmark point map ({' '.join(str(e).split())}); expected a .npy "
                        "(H, W, K) array with one marked pixel per landmark channel") from None
    if arr.ndim not in (2, 3) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise UserError(f"{path}: point map has shape {arr.shape} ({arr.dtype}); expected a numeric (H, W, K) array")
    return arr if arr.ndim == 3 else arr[..., None]


def _split_image_dirs(root: str, split: str) -> list[str]:
    from util.seg_data import vfm_seg_datasets
    d = {"train": "training", "training": "training", "test": "test", "val": "val", "validation": "val"}.get(split)
    if d is None:
        raise UserError(f"unknown split {split!r}; use train, val or test")
    dirs = [os.path.join(ds, d, "images") for ds in vfm_seg_datasets(root)]
    dirs = [x for x in dirs if os.path.isdir(x)]
    if not dirs:
        dirs = [x for x in (os.path.join(root, d), os.path.join(root, split)) if os.path.isdir(x)][:1]
    return dirs


def list_landmark_items(root: str, split: str, labels_csv: str | None = None) -> list[tuple[str, np.ndarray]]:
    """(image path, (K, 2) points in the image's pixels) of one split.

    Without `labels_csv`: VisionFM's layout, `root/<ds>/{training,test}/images/*` with
    `labels/<stem>.npy` (H, W, K) point maps (a map of another size than its image is rescaled to it).
    With `labels_csv` (`{split}` in the path is replaced by the split): the split's images
    (`root/<ds>/<split>/images`, else `root/<split>`), each looked up in the CSV by its path relative to
    root, to its folder, or its file name; when no such folder exists every CSV row is an item, its image
    path relative to root. One-line UserErrors name the file that is missing or wrong.
    """
    dirs = _split_image_dirs(root, split)
    items: list[tuple[str, np.ndarray]] = []
    if labels_csv is None:
        if not dirs:
            raise UserError(f"--data_path {root}: no {split} images (expected <ds>/{{training,test}}/images and "
                            "labels/<stem>.npy point maps, or pass a labels CSV)")
        for d in dirs:
            label_dir = os.path.join(os.path.dirname(d), "labels")
            for img in list_images(d):
                rel = os.path.splitext(os.path.relpath(img, d))[0]
                npy = os.path.join(label_dir, rel + ".npy")
                if not os.path.isfile(npy):
                    raise UserError(f"{img}: no point map {npy}; add it or remove the image")
                arr = _load_point_map(npy)
                pts = points_from_point_map(arr)
                w, h = image_size(img)
                if arr.shape[:2] != (h, w):
                    pts = resize_points(pts, arr.shape[:2], (h, w))
                items.append((img, pts))
    else:
        csv_path = labels_csv.replace("{split}", _split_dir_name(split))
        table = read_landmark_csv(csv_path)
        norm = {k.replace("\\", "/").removeprefix("./"): v for k, v in table.items()}
        if dirs:
            for d in dirs:
                for img in list_images(d):
                    keys = (os.path.relpath(img, root), os.path.relpath(img, d), os.path.basename(img))
                    hit = next((norm[k.replace(os.sep, "/")] for k in keys if k.replace(os.sep, "/") in norm), None)
                    if hit is None:
                        raise UserError(f"{img}: no row in {csv_path}; add one (empty fields = absent landmark)")
                    items.append((img, hit))
        else:
            for key, pts in sorted(norm.items()):
                img = os.path.join(root, key)
                if not os.path.isfile(img):
                    raise UserError(f"{csv_path}: image {key} not found under {root}")
                items.append((img, pts))
    if not items:
        raise UserError(f"--data_path {root}: no {split} images with landmarks")
    ks = {p.shape[0] for _, p in items}
    if len(ks) > 1:
        raise UserError(f"--data_path {root}: point maps disagree on the number of landmarks ({sorted(ks)})")
    return items


def _split_dir_name(split: str) -> str:
    return {"training": "train", "validation": "val"}.get(split, split)
