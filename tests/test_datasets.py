"""Tests for the labelled datasets: layout readers and label files (util/label_layouts.py), splits
(util/splits.py), transforms (util/finetune_transforms.py), blur and the factory (util/datasets.py),
samplers (util/samplers.py)."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from util.blur import BlurSpec, blur_pil  # noqa: E402
from util.cli import UserError  # noqa: E402
from util.data import load_image  # noqa: E402
from util.skipping import SkippedSample  # noqa: E402
from util.datasets import LabelledImageDataset, available_splits, build_dataset  # noqa: E402
from util.finetune_transforms import build_transform  # noqa: E402
from util.label_layouts import (detect_layout, parse_label_file, read_flat_classes, read_imagefolder,  # noqa: E402
                                read_vfm)
from util.samplers import SequentialShardSampler, class_weights, weighted_sampler  # noqa: E402
from util.splits import few_shot_split, stratified_carve, train_percent_subset  # noqa: E402
from util.synthetic import write_dataset  # noqa: E402

SIZE = 32
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _png(path: Path, value: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _args(data_path, **kw) -> SimpleNamespace:
    base = dict(data_path=str(data_path), input_size=SIZE, nb_classes=None, seed=0, norm_preset="imagenet",
                aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1, color_jitter=None,
                multilabel=False, blur=None, bad_image="error", val_fraction=0.1, train_percent=None,
                few_shot=None)
    base.update(kw)
    return SimpleNamespace(**base)


def _eval_tf():
    return build_transform(False, SIZE, MEAN, STD)


@pytest.fixture(scope="module")
def folder_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    write_dataset(root, kind="fundus", layout="imagefolder", num_classes=3, n_per_class=None, size=SIZE, seed=1,
                  splits={"train": 6, "val": 2, "test": 2})
    return root


@pytest.fixture(scope="module")
def vfm_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vfm")
    for name, seed in (("dataset_A", 0), ("dataset_B", 1)):
        write_dataset(root, kind="fundus", layout="vfm", num_classes=3, n_per_class=None, size=SIZE, seed=seed,
                      splits={"train": 4, "test": 2}, dataset_name=name)
    return root


# ------------------------------------------------------------------------------------------------
# ImageFolder
# ------------------------------------------------------------------------------------------------

def test_imagefolder_reader_and_factory(folder_tree):
    (folder_tree / "train" / "notes.txt").write_text("stray file: not a class")
    (folder_tree / "train" / "class_0" / "readme.md").write_text("not an image")
    samples, classes = read_imagefolder(str(folder_tree / "train"))
    assert classes == ["class_0", "class_1", "class_2"]
    assert len(samples) == 18 and {t for _, t in samples} == {0, 1, 2}
    assert all(p.endswith(".png") for p, _ in samples)

    assert detect_layout(str(folder_tree)) == "imagefolder"
    assert available_splits(str(folder_tree)) == {"train", "val", "test"}
    args = _args(folder_tree, nb_classes=3)
    for split, n in (("train", 18), ("val", 6), ("test", 6)):
        ds = build_dataset(split, args)
        assert len(ds) == n and ds.classes == classes and "val_carve" not in ds.split_info
    x, y, i = build_dataset("test", args)[4]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32 and isinstance(y, int) and i == 4


def test_nb_classes_mismatch_names_both_numbers_and_classes(folder_tree):
    with pytest.raises(UserError) as e:
        build_dataset("train", _args(folder_tree, nb_classes=5))
    msg = str(e.value)
    assert "--nb_classes 5" in msg and "3 classes" in msg and "class_0, class_1, class_2" in msg
    assert "\n" not in msg


def test_binary_one_logit_accepts_two_classes(tmp_path):
    for c in ("neg", "pos"):
        for j in range(3):
            _png(tmp_path / "train" / c / f"{j}.png", j)
    ds = build_dataset("train", _args(tmp_path, nb_classes=1, val_fraction=0))
    assert ds.classes == ["neg", "pos"] and len(ds) == 6


def test_empty_class_folder_and_empty_split(tmp_path):
    _png(tmp_path / "train" / "a" / "0.png")
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "thumbs.db").write_text("x")
    with pytest.raises(UserError, match=r"train[/\\]b: empty class folder"):
        build_dataset("train", _args(tmp_path))
    (tmp_path / "test").mkdir()
    with pytest.raises(UserError, match=r"test: no class folders"):
        read_imagefolder(str(tmp_path / "test"))


def test_splits_share_train_class_index(tmp_path):
    for c in ("a", "b", "c"):
        _png(tmp_path / "train" / c / "0.png")
        _png(tmp_path / "train" / c / "1.png")
    _png(tmp_path / "test" / "c" / "0.png")  # test lacks a and b: c must still be index 2
    ds = build_dataset("test", _args(tmp_path))
    assert ds.samples[0][1] == 2 and ds.classes == ["a", "b", "c"]
    _png(tmp_path / "test" / "zzz" / "0.png")
    with pytest.raises(UserError, match="zzz"):
        build_dataset("test", _args(tmp_path))


def test_val_carved_from_train_when_missing(tmp_path):
    write_dataset(tmp_path, kind="fundus", layout="imagefolder", num_classes=2, n_per_class=None, size=SIZE,
                  seed=0, splits={"train": 10, "test": 1})
    args = _args(tmp_path, val_fraction=0.2, seed=3)
    full, _ = read_imagefolder(str(tmp_path / "train"))
    train, val = build_dataset("train", args), build_dataset("val", args)
    assert len(val) == 4 and len(train) == 16
    assert set(train.samples).isdisjoint(val.samples) and set(train.samples) | set(val.samples) == set(full)
    info = val.split_info["val_carve"]
    assert info["seed"] == 3 and info["fraction"] == 0.2 and info["counts"] == {
        "0": {"train": 8, "val": 2}, "1": {"train": 8, "val": 2}}
    assert build_dataset("val", args).samples == val.samples  # reproducible
    assert build_dataset("val", _args(tmp_path, val_fraction=0.2, seed=4)).samples != val.samples
    # train_percent applies after the carve, so val does not depend on it
    sub = build_dataset("train", _args(tmp_path, val_fraction=0.2, seed=3, train_percent=0.5))
    assert len(sub) == 8 and set(sub.samples) <= set(train.samples)
    assert sub.split_info["train_percent"]["after"] == 8


# ------------------------------------------------------------------------------------------------
# VisionFM label files
# ------------------------------------------------------------------------------------------------

def test_vfm_layout_concatenates_sub_datasets(vfm_tree):
    assert detect_layout(str(vfm_tree)) == "vfm"
    samples, classes = read_vfm(str(vfm_tree), "training")
    assert len(samples) == 2 * 12 and classes == ["0", "1", "2"]
    assert any("dataset_A" in p for p, _ in samples) and any("dataset_B" in p for p, _ in samples)
    args = _args(vfm_tree, nb_classes=3)
    test = build_dataset("test", args)
    assert len(test) == 12 and test.classes == ["0", "1", "2"]
    train, val = build_dataset("train", args), build_dataset("val", args)
    assert len(train) + len(val) == 24 and len(val) >= 3 and "val_carve" in val.split_info
    x, y, _ = train[0]
    assert x.shape == (3, SIZE, SIZE) and isinstance(y, int)
    with pytest.raises(UserError, match="class index '2' must be an integer in \\[0, 1\\]"):
        build_dataset("train", _args(vfm_tree, nb_classes=2))


def test_vfm_multilabel_rows_and_arity(tmp_path):
    write_dataset(tmp_path, kind="fundus", layout="vfm", num_classes=3, n_per_class=None, size=SIZE, seed=0,
                  splits={"train": 3, "test": 1}, multilabel=True)
    ds = build_dataset("test", _args(tmp_path, num_labels=3))
    x, y, _ = ds[0]
    assert ds.multilabel and y.dtype == torch.float32 and y.shape == (3,) and set(y.tolist()) <= {0.0, 1.0}
    with pytest.raises(UserError) as e:
        build_dataset("train", _args(tmp_path, num_labels=5))
    assert "training_labels.txt:1:" in str(e.value) and "3 label values but --num_labels is 5" in str(e.value)


def test_label_file_parsing_tolerance_and_errors(tmp_path):
    for i in range(3):
        _png(tmp_path / "training" / f"{i}.png", i)
    lf = tmp_path / "training_labels.txt"
    lf.write_text("# class list: [a, b]\n\ntraining/0.png ; 1\n  training/1.png;0  \n# comment\ntraining/2.png;1\n")
    recs = parse_label_file(str(lf), num_labels=2)
    assert [r.values for r in recs] == [(1.0,), (0.0,), (1.0,)] and [r.line for r in recs] == [3, 4, 6]
    assert recs[0].image == str(tmp_path / "training" / "0.png")
    # root-level label files (no sub-datasets)
    assert read_vfm(str(tmp_path), "train")[1] == ["0", "1"]

    rows = tmp_path / "rows.txt"
    rows.write_text("training/0.png;0, 0, 1\ntraining/1.png;1,0,1\n")
    assert [r.values for r in parse_label_file(str(rows), 3)] == [(0, 0, 1), (1, 0, 1)]
    cases = {
        "training/0.png;1\ntraining/1.png\n": r"bad\.txt:2: malformed line",
        "training/0.png;1\n\ntraining/1.png;x\n": r"bad\.txt:3: labels 'x' are not numbers",
        "training/0.png;1\ntraining/9.png;0\n": r"bad\.txt:2: listed image .*9\.png does not exist",
        "training/0.png;1\ntraining/1.png;0,1\n": r"bad\.txt:2: 2 label value\(s\) but line 1 has 1",
        "training/0.png;2\n": r"bad\.txt:1: class index '2' must be 0 or 1 \(binary, --num_labels 1\)",
        "training/0.png;1.5\n": r"bad\.txt:1: class index",
        "# only comments\n\n": r"bad\.txt: no labelled images",
    }
    bad = tmp_path / "bad.txt"
    for text, pattern in cases.items():
        bad.write_text(text)
        with pytest.raises(UserError, match=pattern):
            parse_label_file(str(bad), num_labels=1)
    bad.write_text("training/0.png;0\ntraining/1.png;1\n")
    assert len(parse_label_file(str(bad), num_labels=1)) == 2  # binary 0/1 with --num_labels 1


def test_forecasting_file_names_and_comma_lines(tmp_path):
    root = tmp_path / "glaucoma_forecasting"
    for split in ("training", "test"):
        for i in range(4):
            _png(root / split / f"{i}.png", i)
        (root / f"{split}.txt").write_text(
            f"# in {split}.txt\n" + "".join(f"{split}/{i}.png, {i % 2}, {100 + i}\n" for i in range(4)))
    assert detect_layout(str(root)) == "vfm"
    recs = parse_label_file(str(root / "training.txt"), 2)
    assert [r.days for r in recs] == [100.0, 101.0, 102.0, 103.0] and [r.values[0] for r in recs] == [0, 1, 0, 1]
    assert len(build_dataset("test", _args(root, nb_classes=2))) == 4


# ------------------------------------------------------------------------------------------------
# Few-shot, carve, train_percent
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flat_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flat")
    for c, n in (("b_cat", 7), ("a_dog", 5), ("c_one", 1), ("d_big", 12)):
        for j in range(n):
            _png(root / c / f"img_{(j * 7919) % 97:03d}.png", j)
    (root / "labels.csv").write_text("not a class")
    return root


def _uspec_reference(root: str, f: float, seed: int):
    """USPEC utils/datasets.py build_few_shot_dataset, re-implemented independently."""
    rnd, tr, te = random.Random(seed), [], []
    for i, c in enumerate(d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))):
        files = [os.path.join(root, c, x) for x in sorted(os.listdir(os.path.join(root, c)))]
        k = max(0, min(int(len(files) * f) if f < 1 else int(f), len(files)))
        rnd.shuffle(files)
        tr += [(p, i) for p in files[:k]]
        te += [(p, i) for p in files[k:]]
    return tr, te


@pytest.mark.parametrize("shots", [1, 3, 0.5, 0.15, 100])
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_few_shot_split_matches_uspec_exactly(flat_tree, shots, seed):
    train, test, classes = few_shot_split(str(flat_tree), shots, seed)
    assert classes == ["a_dog", "b_cat", "c_one", "d_big"]
    assert (train, test) == _uspec_reference(str(flat_tree), shots, seed)
    assert few_shot_split(str(flat_tree), shots, seed)[:2] == (train, test)  # deterministic


def test_few_shot_counts_and_clipping(flat_tree):
    sizes = {0: 5, 1: 7, 2: 1, 3: 12}
    count = lambda s: {c: sum(t == c for _, t in s) for c in sizes}  # noqa: E731
    train, test, _ = few_shot_split(str(flat_tree), 3, 0)
    assert count(train) == {0: 3, 1: 3, 2: 1, 3: 3}  # k >= 1 is a count, clipped to n
    train, test, _ = few_shot_split(str(flat_tree), 0.5, 0)
    assert count(train) == {0: 2, 1: 3, 2: 0, 3: 6}  # k < 1 is a fraction, int(n * f)
    train, test, _ = few_shot_split(str(flat_tree), 50, 0)
    assert count(train) == sizes and test == []
    assert few_shot_split(str(flat_tree), 3, 0)[0] != few_shot_split(str(flat_tree), 3, 1)[0]
    samples, _ = read_flat_classes(str(flat_tree))
    assert few_shot_split(samples, 3, 0)[:2] == few_shot_split(str(flat_tree), 3, 0)[:2]
    with pytest.raises(UserError, match="--few_shot must be > 0"):
        few_shot_split(str(flat_tree), 0, 0)


def test_few_shot_through_factory(flat_tree):
    args = _args(flat_tree, few_shot=4, seed=1, val_fraction=0.25, nb_classes=4)
    shots, test, _ = few_shot_split(str(flat_tree), 4, 1)
    train, val, tst = (build_dataset(s, args) for s in ("train", "val", "test"))
    assert tst.samples == test
    assert sorted(train.samples + val.samples) == sorted(shots) and set(train.samples).isdisjoint(val.samples)
    assert train.split_info["few_shot"]["shots"] == 4.0
    one = _args(flat_tree, few_shot=1, seed=1)
    assert len(build_dataset("val", one)) == 0 and len(build_dataset("train", one)) == 4  # 1 shot: nothing to carve
    assert len(build_dataset("test", _args(flat_tree))) == 25  # no --few_shot: evaluate on the whole tree
    assert available_splits(str(flat_tree)) == {"test"}
    assert available_splits(str(flat_tree), few_shot=True) == {"train", "val", "test"}
    with pytest.raises(UserError, match="--few_shot K"):
        build_dataset("train", _args(flat_tree))


def test_few_shot_on_imagefolder_tree_uses_train_pool(folder_tree):
    args = _args(folder_tree, few_shot=2, seed=0, val_fraction=0.1)
    shots, _, _ = few_shot_split(str(folder_tree / "train"), 2, 0)
    assert build_dataset("train", args).samples == shots  # val/ exists: nothing carved from the shots
    assert build_dataset("test", args).samples == read_imagefolder(str(folder_tree / "test"))[0]
    assert len(build_dataset("val", args)) == 6


def test_stratified_carve_properties():
    samples = [(f"c{c}/{i:02d}.png", c) for c, n in enumerate((10, 2, 1, 37, 3)) for i in range(n)]
    random.Random(0).shuffle(samples)
    train, val, info = stratified_carve(samples, 0.1, seed=5)
    assert len(train) + len(val) == len(samples) and set(train).isdisjoint(val)
    per = {c: (sum(t == c for _, t in train), sum(t == c for _, t in val)) for c in range(5)}
    assert per == {0: (9, 1), 1: (1, 1), 2: (1, 0), 3: (33, 4), 4: (2, 1)}
    assert [s for s in samples if s in set(val)] == val  # input order kept
    assert info["counts"]["3"] == {"train": 33, "val": 4} and info["seed"] == 5 and info["num_val"] == 7
    assert stratified_carve(samples, 0.1, 5)[:2] == (train, val)
    assert stratified_carve(list(reversed(samples)), 0.1, 5)[1] == list(reversed(val))  # order-independent sets
    assert stratified_carve(samples, 0.1, 6)[1] != val
    assert stratified_carve(samples, 0.0, 5)[1] == []
    rows = [(f"{i}.png", (float(i % 2), float(i % 3 == 0))) for i in range(30)]
    tr, va, _ = stratified_carve(rows, 0.2, 0)
    assert len(va) == 6 and {r for _, r in va} == {r for _, r in rows}
    with pytest.raises(UserError):
        stratified_carve(samples, 1.0, 0)


def test_train_percent_matches_uspec():
    samples = [(f"/d/c{c}/{i:03d}.png", c) for c in range(3) for i in range(10 + 7 * c)]
    got = train_percent_subset(samples, 0.3, seed=7)
    ref = []
    for c in range(3):
        names = sorted(p for p, t in samples if t == c)
        ref += [(p, c) for p in random.Random(7).sample(names, int(0.3 * len(names)))]
    assert got == ref and len(got) == 3 + 5 + 7
    assert train_percent_subset(samples, 1.0, 7) == samples
    with pytest.raises(UserError):
        train_percent_subset(samples, 1.5, 7)


# ------------------------------------------------------------------------------------------------
# Transforms and blur
# ------------------------------------------------------------------------------------------------

def test_eval_transform_rule_shape_and_determinism():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    tf = _eval_tf()
    a, b = tf(img), tf(img)
    assert a.shape == (3, SIZE, SIZE) and torch.equal(a, b)
    resize = tf.transforms[0]
    assert resize.size == int(SIZE / (224 / 256)) and resize.interpolation.value == "bicubic"
    assert build_transform(False, 224, MEAN, STD).transforms[0].size == 256
    assert build_transform(False, 384, MEAN, STD).transforms[0].size == 384  # crop_pct 1 above 224
    assert build_transform(False, 48, MEAN, STD)(img).shape == (3, 48, 48)


def test_train_transform_matches_mae_recipe():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    tf = build_transform(True, SIZE, MEAN, STD)
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    assert "ColorJitter" not in names and names[-1] == "RandomErasing"
    rrc, erase = tf.transforms[0], tf.transforms[-1]
    assert rrc.scale == (0.08, 1.0) and "bicubic" in str(rrc.interpolation).lower()
    assert erase.probability == 0.25 and erase.mode == "pixel" and erase.max_count == 1
    torch.manual_seed(0)
    random.seed(0)
    outs = [tf(img) for _ in range(3)]
    assert all(o.shape == (3, SIZE, SIZE) for o in outs) and not torch.equal(outs[0], outs[1])
    none_aa = build_transform(True, SIZE, MEAN, STD, aa="none", reprob=0)
    assert "RandAugment" not in [type(t).__name__ for t in none_aa.transforms]


def test_uspec_eval_aug_compat_is_stochastic_transform_but_seeded(folder_tree):
    assert type(build_transform(False, SIZE, MEAN, STD, uspec_eval_aug=True).transforms[0]).__name__ == \
        "RandomResizedCropAndInterpolation"
    ds = build_dataset("test", _args(folder_tree, compat="uspec_eval_aug", seed=3))
    assert ds.seed == 3
    state = torch.get_rng_state()
    a, b = ds[1][0], ds[1][0]
    assert torch.equal(a, b) and not torch.equal(a, ds[2][0])
    assert torch.equal(state, torch.get_rng_state())  # caller's RNG streams untouched
    assert not torch.equal(ds[(0, 1)][0], ds[(1, 1)][0])  # (epoch, index) keys vary by epoch
    assert not torch.equal(a, build_dataset("test", _args(folder_tree, compat=["uspec_eval_aug"], seed=4))[1][0])
    assert build_dataset("test", _args(folder_tree)).seed is None


def test_blur_applied_only_when_configured(folder_tree):
    samples, classes = read_imagefolder(str(folder_tree / "test"))
    spec = BlurSpec(method="motion", ksize=5, seed=2)
    plain = LabelledImageDataset(samples, None, classes)
    blurred = LabelledImageDataset(samples, None, classes, blur=spec.to_dict(), blur_root=str(folder_tree))
    key = os.path.relpath(samples[0][0], folder_tree).replace(os.sep, "/")
    assert blurred.blur_key(0) == key and key.startswith("test/")
    expect = blur_pil(load_image(samples[0][0]), spec, key=key).convert("RGB")
    img = blurred[0][0]
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), np.asarray(expect))
    assert np.array_equal(np.asarray(plain[0][0]), np.asarray(load_image(samples[0][0])))
    assert not np.array_equal(np.asarray(img), np.asarray(plain[0][0]))
    ds = build_dataset("test", _args(folder_tree, blur=spec.to_dict()))
    assert ds.blur == spec and ds.split_info["blur"] == spec.to_dict() and ds.blur_root == str(folder_tree)
    assert build_dataset("test", _args(folder_tree)).blur is None
    with pytest.raises(UserError, match="bad blur"):
        LabelledImageDataset(samples, None, classes, blur={"method": "nope"})


def test_bad_image_skip_and_error(tmp_path):
    a, b = _png(tmp_path / "a.png", 1), tmp_path / "b.png"
    b.write_bytes(b"not a png")
    samples = [(str(b), 1), (str(a), 0)]
    with pytest.raises(UserError, match="b.png"):
        LabelledImageDataset(samples, _eval_tf(), ["x", "y"])[0]
    skip = LabelledImageDataset(samples, _eval_tf(), ["x", "y"], bad_image="skip")
    marker = skip[0]  # dropped by the loader, never replaced by the next image
    assert isinstance(marker, SkippedSample) and (marker.index, marker.path) == (0, str(b))
    x, y, i = skip[1]
    assert (y, i) == (0, 1) and x.shape == (3, SIZE, SIZE)


def test_multilabel_index_targets_become_one_hot(folder_tree):
    ds = build_dataset("test", _args(folder_tree, multilabel=True))
    _, y, i = ds[len(ds) - 1]
    assert y.tolist() == [0.0, 0.0, 1.0]


# ------------------------------------------------------------------------------------------------
# Imbalance helpers and the evaluation sampler
# ------------------------------------------------------------------------------------------------

def test_class_weights_and_sampler():
    samples = [("a", 0)] * 8 + [("b", 1)] * 2
    w = class_weights(samples, 3)
    assert torch.allclose(w, torch.tensor([10 / 16, 10 / 4, 0.0]))
    sampler = weighted_sampler(samples, 3, num_samples=4000, generator=torch.Generator().manual_seed(0))
    drawn = np.bincount([samples[i][1] for i in sampler], minlength=2)
    assert len(sampler) == 4000 and abs(drawn[0] / 4000 - 0.5) < 0.05
    assert list(weighted_sampler(samples, 3, seed=1)) == list(weighted_sampler(samples, 3, seed=1))
    rows = class_weights([(1.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.0, 0.0)], 2)
    assert torch.allclose(rows, torch.tensor([4 / 6, 4 / 2]))


@pytest.mark.parametrize("mode", ["contiguous", "strided"])
def test_sequential_shard_sampler_covers_each_index_once(mode):
    for n in (0, 1, 5, 7, 10, 13, 101):
        for world in (1, 2, 3, 4, 8):
            parts = [list(SequentialShardSampler(n, world, r, mode=mode)) for r in range(world)]
            flat = [i for p in parts for i in p]
            assert sorted(flat) == list(range(n)) and len(set(flat)) == n
            assert [len(SequentialShardSampler(n, world, r, mode=mode)) for r in range(world)] == list(map(len, parts))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            if mode == "contiguous":
                assert flat == list(range(n))
    assert len(SequentialShardSampler(list(range(9)))) == 9  # single process by default


def test_detect_layout_errors(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        detect_layout(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no train/val/test folders"):
        detect_layout(str(tmp_path))
