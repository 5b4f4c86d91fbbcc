"""Tests for util/synthetic.py and the random_data.py CLI (numpy + Pillow only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from util import synthetic as syn  # noqa: E402
from util import synthetic_base  # noqa: E402
from util.synthetic import (  # noqa: E402
    KINDS,
    class_names,
    fundus_sample,
    image_seed,
    label_for_lesion_count,
    lesion_count_range,
    multilabel_sample,
    sample,
    ultrasound_sample,
    write_dataset,
)

RENDER = {"fundus": fundus_sample, "ultrasound": ultrasound_sample}


def _box(a: np.ndarray, r: int) -> np.ndarray:
    return synthetic_base._box_blur(a.astype(np.float32), r, r)


# ---------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_determinism(kind):
    a, b = RENDER[kind](7, 48, 3), RENDER[kind](7, 48, 3)
    for f in ("image", "mask", "type_mask", "landmarks", "lesion_centres", "multi_hot"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert a.target == b.target and a.lesion_types == b.lesion_types
    c = RENDER[kind](8, 48, 3)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.landmarks, c.landmarks)
    np.testing.assert_array_equal(sample(kind, 5, 1).image, sample(kind, 5, 1).image)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [16, 33, 64])
def test_shapes_masks_landmarks(kind, size):
    for seed in range(4):
        for n in (0, 1, 3):
            s = RENDER[kind](seed, size, n)
            assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
            assert s.mask.shape == (size, size) and s.mask.dtype == np.uint8
            assert set(np.unique(s.mask)) <= {0, 1}
            assert s.mask.any() == (n > 0)
            assert s.type_mask.dtype == np.uint8 and ((s.type_mask > 0) == (s.mask > 0)).all()
            assert s.landmarks.shape == (2, 2) and s.landmarks.dtype == np.float32
            assert ((s.landmarks >= 0) & (s.landmarks <= size - 1)).all()
            assert s.lesion_centres.shape == (n, 2) and len(s.lesion_types) == n
            assert (s.target > 0) == (n > 0) and 0.0 <= s.target < 1.0
            assert s.gray().shape == (size, size) and s.gray().dtype == np.uint8
            g16 = s.gray16()
            assert g16.dtype == np.uint16 and g16.shape == (size, size)
    # black outside the field of view: the corners
    assert (s.image[0, 0] == 0).all() and (s.image[-1, -1] == 0).all()


def test_ultrasound_is_grayscale():
    s = ultrasound_sample(3, 64, 2)
    assert (s.image[..., 0] == s.image[..., 1]).all() and (s.image[..., 1] == s.image[..., 2]).all()
    np.testing.assert_array_equal(s.gray(), s.image[..., 0])
    assert s.to_pil("L").mode == "L" and s.to_pil("I;16").mode == "I;16"


def test_fundus_looks_like_fundus():
    s = fundus_sample(0, 64, 0)
    fov = s.image.sum(-1) > 30
    r, g, b = (s.image[fov][:, c].astype(float).mean() for c in range(3))
    assert r > g > b  # orange-red retina
    # optic disc is bright, fovea darker than the disc
    (dx, dy), (fx, fy) = np.round(s.landmarks).astype(int)
    assert s.image[dy, dx].astype(int).sum() > s.image[fy, fx].astype(int).sum() + 150
    assert 0.02 < s.info["vessel_density"] < 0.4


def test_label_rule():
    assert lesion_count_range(0, 2) == (0, 0)
    assert lesion_count_range(1, 2) == (2, 3)
    for C in range(2, syn.MAX_NUM_CLASSES + 1):
        for k in range(C):
            lo, hi = lesion_count_range(k, C)
            assert all(label_for_lesion_count(n, C) == k for n in range(lo, hi + 1))
        # the label of any count is monotone and saturates at C-1
        labels = [label_for_lesion_count(n, C) for n in range(40)]
        assert labels == sorted(labels) and labels[-1] == C - 1
    for kind in KINDS:
        for k in range(3):
            s = sample(kind, 100 + k, k, 32, num_classes=3)
            lo, hi = lesion_count_range(k, 3)
            assert s.label == k and lo <= s.n_lesions <= hi
    assert class_names(2) == ["class_0", "class_1"] and sorted(class_names(8)) == class_names(8)
    with pytest.raises(ValueError):
        lesion_count_range(2, 2)
    with pytest.raises(ValueError):
        sample("fundus", 0, 0, 64, num_classes=1)


def test_lesions_only_change_lesion_pixels():
    # Background and lesions use separate streams: same eye, lesions added.
    for seed in range(5):
        a, b = fundus_sample(seed, 64, 0), fundus_sample(seed, 64, 3)
        changed = np.abs(a.image.astype(int) - b.image.astype(int)).max(-1) > 0
        near = _box(b.mask, 2) > 0
        assert changed.any() and not (changed & ~near).any()
        np.testing.assert_array_equal(a.landmarks, b.landmarks)
    u0, u3 = ultrasound_sample(1, 64, 0), ultrasound_sample(1, 64, 3)
    np.testing.assert_array_equal(u0.landmarks, u3.landmarks)
    assert np.abs(u0.image.astype(int) - u3.image.astype(int))[u3.mask > 0].mean() > 30


def test_multilabel_sample():
    for kind in KINDS:
        for bits in ([0, 0, 0], [1, 0, 1], [0, 1, 0], [1, 1, 1]):
            s = multilabel_sample(kind, 11, bits, 48)
            assert s.multi_hot.tolist() == bits
            assert (s.n_lesions > 0) == any(bits)
            present = {int(t) - 1 for t in np.unique(s.type_mask) if t}
            assert present <= {i for i, v in enumerate(bits) if v}
    with pytest.raises(ValueError):
        multilabel_sample("fundus", 0, [2, 0])


def test_bad_arguments():
    with pytest.raises(ValueError):
        fundus_sample(0, size=8)
    with pytest.raises(ValueError):
        fundus_sample(-1)
    with pytest.raises(ValueError):
        sample("mri", 0, 0)
    with pytest.raises(ValueError):
        fundus_sample(0, lesion_types=["drusen"], n_lesions=1)


# ---------------------------------------------------------------------------
# Learnable signal: trivial classifiers on hand-crafted features
# ---------------------------------------------------------------------------


def _fundus_features(img: np.ndarray) -> np.ndarray:
    """Counts of dark-red, yellow and whitish blob pixels away from the optic disc."""
    x = img.astype(np.float32) / 255
    R, G, B = x[..., 0], x[..., 1], x[..., 2]
    S = R.shape[0]
    fov = _box(R > 0.08, 3) > 0.999
    lum = _box(R + G + B, 3)  # the disc is the brightest large blob
    dy, dx = np.unravel_index(np.argmax(lum), lum.shape)
    yy, xx = np.mgrid[0:S, 0:S]
    keep = fov & ((yy - dy) ** 2 + (xx - dx) ** 2 > (0.1 * S) ** 2)
    dark = keep & (R < 0.45 * _box(R, 5))
    yellow = keep & (G > 0.7 * R) & (B < 0.6 * G)
    white = keep & (B > 0.4)
    return np.array([dark.sum(), yellow.sum(), white.sum()], np.float32)


def _ultrasound_features(img: np.ndarray) -> np.ndarray:
    """Count of pixels much darker than their neighbourhood (speckle averaged out)."""
    g = img[..., 0].astype(np.float32) / 255
    inside = _box(g > 0, 3) > 0.97
    dark = inside & (_box(g, 1) < 0.45 * _box(g, 6))
    return np.array([dark.sum(), g[inside].mean()], np.float32)


FEATURES = {"fundus": _fundus_features, "ultrasound": _ultrasound_features}


def _logreg(X: np.ndarray, y: np.ndarray, steps: int = 400, lr: float = 0.5):
    X = np.log1p(np.maximum(X, 0))
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Xn = (X - mu) / sd
    w, b = np.zeros(X.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(Xn @ w + b)))
        w -= lr * (Xn.T @ (p - y) / len(y) + 1e-3 * w)
        b -= lr * float((p - y).mean())
    return lambda Z: ((((np.log1p(np.maximum(Z, 0)) - mu) / sd) @ w + b) > 0).astype(int)


@pytest.mark.parametrize("kind", KINDS)
def test_learnable_signal(kind):
    def data(split: str, n: int):
        X, y = [], []
        for i in range(n):
            label = i % 2
            X.append(FEATURES[kind](sample(kind, image_seed(123, split, i, label), label, 64).image))
            y.append(label)
        return np.array(X), np.array(y)

    Xtr, ytr = data("train", 160)
    Xte, yte = data("test", 160)
    clf = _logreg(Xtr, ytr)
    acc = float((clf(Xte) == yte).mean())
    assert acc > 0.9, f"{kind}: held-out accuracy {acc:.3f}"
    # An even more trivial rule: threshold on one count, fitted on train.
    # (fundus: total lesion-coloured pixels; ultrasound: dark-blob pixels)
    f_tr = Xtr[:, :3].sum(1) if kind == "fundus" else Xtr[:, 0]
    f_te = Xte[:, :3].sum(1) if kind == "fundus" else Xte[:, 0]
    thr = max(range(0, 60), key=lambda t: ((f_tr > t) == ytr).mean())
    assert ((f_te > thr) == yte).mean() > 0.9


def test_generation_speed():
    t = time.perf_counter()
    for i in range(100):
        sample("fundus", i, i % 2, 64)
        sample("ultrasound", i, i % 2, 64)
    # ~0.4 s on one core when written; the bound leaves room for slow CI.
    assert time.perf_counter() - t < 2.0


# ---------------------------------------------------------------------------
# write_dataset
# ---------------------------------------------------------------------------


def _all_files(root: Path):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_write_imagefolder(tmp_path):
    summ = write_dataset(tmp_path, kind="fundus", layout="imagefolder", n_per_class=5, size=32, seed=3)
    assert summ["counts"] == {"train": {"class_0": 3, "class_1": 3}, "val": {"class_0": 1, "class_1": 1}, "test": {"class_0": 1, "class_1": 1}}
    assert summ["num_images"] == 10
    assert sorted(os.listdir(tmp_path / "train")) == class_names(2)
    files = _all_files(tmp_path)
    assert len(files) == 10 and not [f for f in files if ".tmp" in f]
    for k, cname in enumerate(class_names(2)):
        for f in sorted((tmp_path / "train" / cname).iterdir()):
            im = Image.open(f)
            assert im.mode == "RGB" and im.size == (32, 32)
    # file content is exactly sample(kind, image_seed(seed, split, j, label), label)
    first = sorted((tmp_path / "train" / "class_1").iterdir())[0]
    expect = sample("fundus", image_seed(3, "train", 0, 1), 1, 32).image
    np.testing.assert_array_equal(np.asarray(Image.open(first)), expect)


def test_write_is_deterministic_and_order_independent(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    kw = dict(kind="ultrasound", layout="vfm", n_per_class=None, size=24, seed=9)
    write_dataset(a, splits={"train": 3, "test": 2}, **kw)
    write_dataset(b, splits={"train": 3, "test": 2}, **kw)
    write_dataset(c, splits={"test": 2}, **kw)  # test split alone: same files
    fa = _all_files(a)
    assert fa == _all_files(b)
    for f in fa:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for f in _all_files(c):
        assert (a / f).read_bytes() == (c / f).read_bytes(), f
    d = tmp_path / "d"
    write_dataset(d, splits={"train": 3, "test": 2}, **{**kw, "seed": 10})
    assert any((a / f).read_bytes() != (d / f).read_bytes() for f in fa if f.endswith(".png"))


def test_write_flat(tmp_path):
    summ = write_dataset(tmp_path, layout="flat", n_per_class=4, size=24)
    files = _all_files(tmp_path)
    assert len(files) == 8 == summ["num_images"]
    assert all(f.startswith("images/") and f.endswith(".png") for f in files)


@pytest.mark.parametrize("multilabel", [False, True])
def test_write_vfm(tmp_path, multilabel):
    C = 3
    summ = write_dataset(tmp_path, kind="fundus", layout="vfm", num_classes=C, n_per_class=None,
                         splits={"train": 4, "test": 2}, size=24, multilabel=multilabel)
    ds = tmp_path / "dataset_A"
    for split, txt, n in (("training", "training_labels.txt", 12), ("test", "test_labels.txt", 6)):
        lines = (ds / txt).read_text().splitlines()
        assert len(lines) == n
        for line in lines:
            rel, labels = line.split(";")
            assert rel.startswith(split + "/") and (ds / rel).is_file()
            vals = [int(float(v)) for v in labels.split(",")]
            if multilabel:
                assert len(vals) == C and set(vals) <= {0, 1}
            else:
                assert len(vals) == 1 and 0 <= vals[0] < C
        if not multilabel:
            assert sorted(int(l.split(";")[1]) for l in lines) == sorted(list(range(C)) * (n // C))
    assert summ["label_files"] == {"train": "dataset_A/training_labels.txt", "test": "dataset_A/test_labels.txt"}


@pytest.mark.parametrize("C", [2, 3])
def test_write_segmentation(tmp_path, C):
    write_dataset(tmp_path, kind="ultrasound", layout="segmentation", num_classes=C, n_per_class=None,
                  splits={"train": 3, "test": 1}, size=32, dataset_name="nodules")
    img_dir = tmp_path / "nodules" / "training" / "images"
    lab_dir = tmp_path / "nodules" / "training" / "labels"
    names = sorted(os.listdir(img_dir))
    assert names == sorted(os.listdir(lab_dir)) and len(names) == 3 * C
    seen = set()
    for n in names:
        lab = Image.open(lab_dir / n)
        assert lab.mode == "L" and lab.size == (32, 32)
        v = np.asarray(lab)
        assert v.max() <= C - 1
        seen |= set(np.unique(v).tolist())
    assert seen == set(range(C))
    assert (tmp_path / "nodules" / "test" / "labels").is_dir()


def test_write_landmark_16bit_and_gray(tmp_path):
    write_dataset(tmp_path / "lm", layout="landmark", n_per_class=None, splits={"test": 2}, size=32)
    heat = np.load(tmp_path / "lm" / "dataset_A" / "test" / "labels" / "00000.npy")
    assert heat.shape == (32, 32, 2) and heat.sum(axis=(0, 1)).tolist() == [1, 1]

    write_dataset(tmp_path / "b16", kind="ultrasound", bit_depth=16, n_per_class=None, splits={"train": 1}, size=32)
    im = Image.open(tmp_path / "b16" / "train" / "class_1" / "00001.png")
    a = np.asarray(im)
    assert im.mode.startswith("I") and a.max() > 255  # real 16-bit range
    expect = sample("ultrasound", image_seed(0, "train", 0, 1), 1, 32).gray16()
    np.testing.assert_array_equal(a.astype(np.uint16), expect)

    write_dataset(tmp_path / "g", channels=1, image_format="jpg", n_per_class=None, splits={"train": 1}, size=32)
    im = Image.open(tmp_path / "g" / "train" / "class_0" / "00000.jpg")
    assert im.mode == "L" and im.format == "JPEG"


def test_write_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_dataset(tmp_path, layout="coco")
    with pytest.raises(ValueError):
        write_dataset(tmp_path, multilabel=True)  # imagefolder
    with pytest.raises(ValueError):
        write_dataset(tmp_path, layout="vfm", multilabel=True, num_classes=4)
    with pytest.raises(ValueError):
        write_dataset(tmp_path, bit_depth=16, image_format="jpg")
    with pytest.raises(ValueError):
        write_dataset(tmp_path, splits={"train": 0.9, "test": 0.5})


def test_split_counts():
    assert syn._split_counts(10, {"train": 0.6, "val": 0.2, "test": 0.2}) == {"train": 6, "val": 2, "test": 2}
    c = syn._split_counts(7, {"train": 0.6, "val": 0.2, "test": 0.2})
    assert sum(c.values()) == 7
    assert syn._split_counts(None, {"train": 5, "test": 1}) == {"train": 5, "test": 1}


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _cli(*args: str):
    return subprocess.run([sys.executable, str(ROOT / "random_data.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "vfm"
    r = _cli("--output_dir", str(out), "--kind", "ultrasound", "--layout", "vfm", "--n_per_class", "5",
             "--size", "32", "--multilabel", "--num_classes", "3", "--seed", "4")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["num_images"] == 15 and summary["multilabel"] is True
    line = (out / "dataset_A" / "training_labels.txt").read_text().splitlines()[0]
    assert line.startswith("training/") and len(line.split(";")[1].split(",")) == 3
    assert "--output_dir" in _cli("--help").stdout


@pytest.mark.parametrize("args", [
    ["--size", "8"],
    ["--kind", "mri"],
    ["--num_classes", "1"],
    ["--layout", "imagefolder", "--multilabel"],
])
def test_cli_bad_input(tmp_path, args):
    r = _cli("--output_dir", str(tmp_path / "x"), *args)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert err.startswith("random_data.py: error:") and "\n" not in err, err


def test_cli_unwritable_output(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    r = _cli("--output_dir", str(f / "sub"))
    assert r.returncode != 0 and r.stderr.strip().startswith("random_data.py: error:")
    assert "\n" not in r.stderr.strip()
