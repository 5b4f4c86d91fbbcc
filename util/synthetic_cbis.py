"""Synthetic CBIS-DDSM-like data for tests and the README: grey "mammogram" patches in MedSLIP's CSV layout.

`write_synthetic_cbis(dst)` writes `dst/train_<abnormality>.csv` and `dst/test_<abnormality>.csv` (columns
image_path, pathology; paths relative to dst) and the PNGs under `dst/images/`. Each image is smooth tissue
texture plus noise with one finding whose look carries the class, so a linear probe on any reasonable
encoder learns it: MALIGNANT = a bright cluster of small specks, BENIGN = one round smooth mass,
BENIGN_WITHOUT_CALLBACK = one faint small dot. Positions and sizes vary per image; everything depends only
on (seed, split, index).
"""
from __future__ import annotations

import csv
import io
import os

import numpy as np
from PIL import Image

from util.atomic import write_atomic
from util.label_layouts import CBIS_CLASSES


def _render(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """One (size, size) uint8 grey image of class `label`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cells = rng.normal(0, 1, (5, 5))  # smooth tissue: bilinear upsampling of a coarse random grid
    coarse = np.kron(cells, np.ones((size // 5 + 1, size // 5 + 1)))[:size, :size]
    img = 90 + 18 * coarse + rng.normal(0, 10, (size, size))
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    if label == 0:  # cluster of bright specks
        for _ in range(int(rng.integers(5, 9))):
            py, px = cy + rng.normal(0, size * 0.08), cx + rng.normal(0, size * 0.08)
            img += 120 * np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * (size * 0.02) ** 2))
    elif label == 1:  # one round smooth mass
        r = size * rng.uniform(0.12, 0.18)
        img += 80 * (1 / (1 + np.exp((np.hypot(yy - cy, xx - cx) - r) / (size * 0.015))))
    else:  # one faint small dot
        img += 45 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size * 0.04) ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_cbis(dst: str, n_train: int = 90, n_test: int = 45, size: int = 64, seed: int = 0,
                         abnormality: str = "calcification") -> tuple[str, str]:
    """Write the two CSVs and their images (classes balanced, cycling MALIGNANT, BENIGN,
    BENIGN_WITHOUT_CALLBACK); returns (train CSV, test CSV)."""
    os.makedirs(os.path.join(dst, "images"), exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(["image_path", "pathology"])
        for i in range(n):
            label = i % len(CBIS_CLASSES)
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
            rel = f"images/{split}_{abnormality}_{i:04d}.png"
            png = io.BytesIO()
            Image.fromarray(_render(rng, label, size), mode="L").save(png, format="PNG")
            write_atomic(os.path.join(dst, rel), png.getvalue(), fsync=False)
            w.writerow([rel, CBIS_CLASSES[label]])
        path = os.path.join(dst, f"{split}_{abnormality}.csv")
        write_atomic(path, buf.getvalue().encode("utf-8"))
        out.append(path)
    return out[0], out[1]


if __name__ == "__main__":  # python -m util.synthetic_cbis DST: data for trying the CBIS probe commands out
    import argparse
    ap = argparse.ArgumentParser("python -m util.synthetic_cbis", description="Write synthetic CBIS-DDSM-like CSVs "
                                 "(DST/train_<abnormality>.csv, DST/test_<abnormality>.csv) and images (DST/images/).")
    ap.add_argument("dst", help="output folder")
    ap.add_argument("--n_train", default=90, type=int, help="training images")
    ap.add_argument("--n_test", default=45, type=int, help="test images")
    ap.add_argument("--size", default=64, type=int, help="image side in pixels")
    ap.add_argument("--abnormality", default="calcification", choices=("calcification", "mass"))
    a = ap.parse_args()
    train, test = write_synthetic_cbis(a.dst, a.n_train, a.n_test, a.size, abnormality=a.abnormality)
    print(f"wrote {train} ({a.n_train} images), {test} ({a.n_test} images)")
