"""In-process tests of util/data.py: image decoding, folder resolution, paired transforms, per-sample
determinism (the property that makes 1-process and N-process runs, and resumed runs, identical) and
the epoch-keyed distributed sampler."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import TINY_TRAIN_IMAGES

from util.blur import BlurSpec  # noqa: E402
from util.cli import UserError  # noqa: E402
from util.data import (EpochIndexSampler, load_image, PretrainDataset, PretrainTransform, resolve_pretrain_files,
                       rrc_params, sample_generator)
from util.image_io import BadImageError
from util.skipping import SkipCollate, SkippedSample

IDENTITY_NORM = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])  # to_tensor values, so channels can be compared


def identity_transform(size: int = 32) -> PretrainTransform:
    return PretrainTransform(size, *IDENTITY_NORM)


def colour_image(w: int = 48, h: int = 40, seed: int = 0) -> Image.Image:
    """An RGB image whose three channels all differ (random texture, no symmetry)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def swap_rb(im: Image.Image) -> Image.Image:
    r, g, b = im.split()
    return Image.merge("RGB", (b, g, r))


@pytest.fixture(scope="module")
def train_files(synthetic_fundus_tree) -> list[str]:
    _, files = resolve_pretrain_files(str(synthetic_fundus_tree))
    return files


# ----------------------------------------------------------------------------------------- load_image
def test_load_image_16bit_grayscale_png(tmp_path):
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    im = load_image(str(path))
    arr = np.asarray(im)
    assert im.mode == "RGB" and arr.dtype == np.uint8 and arr.shape == (1, 4, 3)
    expected = np.round(values[0] / 65535 * 255).astype(np.uint8)  # range-scaled, not clipped or truncated
    assert expected.tolist() == [0, 1, 128, 255]
    for c in range(3):
        assert arr[0, :, c].tolist() == expected.tolist()


def test_load_image_8bit_grayscale(tmp_path):
    values = np.array([[0, 1, 127, 128, 254, 255]], dtype=np.uint8)
    path = tmp_path / "g8.png"
    Image.fromarray(values, "L").save(path)
    arr = np.asarray(load_image(str(path)))
    assert arr.shape == (1, 6, 3) and arr.dtype == np.uint8
    assert (arr == values[..., None]).all()


def test_load_image_rgba_drops_alpha(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 100, 30
    rgba[..., 3] = [[0, 128, 255], [255, 10, 0]]
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    im = load_image(str(path))
    assert im.mode == "RGB"
    assert (np.asarray(im) == rgba[..., :3]).all()


def test_load_image_palette(tmp_path):
    pal = Image.new("P", (4, 2))
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 12)
    pal.putpalette(palette)
    idx = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    pal.putdata(idx.ravel().tolist())
    path = tmp_path / "pal.png"
    pal.save(path)
    with Image.open(path) as raw:
        assert raw.mode == "P"
    arr = np.asarray(load_image(str(path)))
    lut = np.array(palette[:12], np.uint8).reshape(4, 3)
    assert (arr == lut[idx]).all()


def test_load_image_palette_with_transparency(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * (254 * 3))
    pal.putdata([0, 1])
    path = tmp_path / "palt.png"
    pal.save(path, transparency=0)
    arr = np.asarray(load_image(str(path)))
    assert arr.tolist() == [[[10, 20, 30], [40, 50, 60]]]


def test_load_image_cmyk_jpeg(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:8] = (200, 100, 30)
    rgb[8:] = (20, 160, 240)
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb, "RGB").convert("CMYK").save(path, quality=100)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    im = load_image(str(path))
    arr = np.asarray(im).astype(int)
    assert im.mode == "RGB"
    # flat blocks away from the boundary (JPEG ringing), a few levels of JPEG error at most
    assert np.abs(arr[:6] - rgb[:6]).max() <= 3 and np.abs(arr[10:] - rgb[10:]).max() <= 3


def test_load_image_float_tiff(tmp_path):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    path = tmp_path / "f.tif"
    Image.fromarray(values).save(path)
    arr = np.asarray(load_image(str(path)))
    assert arr[0, :, 0].tolist() == [0, 64, 128, 255]


def test_load_image_unreadable_names_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG garbage" * 5)
    with pytest.raises(BadImageError, match="broken.png") as e:
        load_image(str(path))
    assert isinstance(e.value, UserError)  # reported as one line by the CLI


# ------------------------------------------------------------------------------ resolve_pretrain_files
def test_resolve_prefers_train_subfolder(synthetic_fundus_tree):
    root, files = resolve_pretrain_files(str(synthetic_fundus_tree))
    assert Path(root) == synthetic_fundus_tree / "train"
    assert len(files) == TINY_TRAIN_IMAGES
    assert all(Path(f).is_relative_to(synthetic_fundus_tree / "train") for f in files)
    assert files == sorted(files)


def test_resolve_recurses_and_filters(tmp_path):
    src = colour_image(8, 8)
    wanted = ["a.png", "b.JPG", "c.jpeg", "sub/d.png", "sub/deeper/e.tif", "f.bmp", "g.webp"]
    unwanted = ["notes.txt", "h.png.bak", ".hidden.png", ".cache/i.png", "sub/.j.png", "k.npy"]
    for rel in wanted + unwanted:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith((".png", ".JPG", ".jpeg", ".tif", ".bmp", ".webp")):
            src.save(p, format={"JPG": "JPEG", "JPEG": "JPEG", "TIF": "TIFF"}.get(p.suffix[1:].upper(),
                                                                               p.suffix[1:].upper()))
        else:
            p.write_bytes(b"x")
    (tmp_path / "train.txt").write_text("a file named like the split folder is not a split folder")
    root, files = resolve_pretrain_files(str(tmp_path))
    assert Path(root) == tmp_path
    assert sorted(str(Path(f).relative_to(tmp_path)) for f in files) == sorted(wanted)


def test_resolve_errors(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        resolve_pretrain_files(str(tmp_path / "missing"))
    (tmp_path / "train").mkdir()
    (tmp_path / "x.png").write_bytes(b"")  # images outside train/ are ignored once train/ exists
    with pytest.raises(UserError, match="no images found"):
        resolve_pretrain_files(str(tmp_path), "--data_path_blurred")


# ---------------------------------------------------------------------------------- PretrainTransform
def test_transform_same_image_twice_identical():
    t = PretrainTransform(32, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    im = colour_image()
    a, b = t([im, im.copy()], sample_generator(0, 0, 7))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)


def test_transform_pairs_share_crop_and_flip():
    """Second image = first with R and B swapped: an identical crop+flip gives exactly the swapped
    output (resampling is per channel); any difference in geometry would break equality."""
    t = identity_transform()
    im = colour_image()
    flips = set()
    for k in range(12):
        a, b = t([im, swap_rb(im)], sample_generator(0, 0, k))
        assert torch.equal(b, a[[2, 1, 0]]), k
        assert torch.equal(t([im], sample_generator(0, 0, k))[0], a)  # pairing does not change the draw
        g = sample_generator(0, 0, k)  # replay the draws to know whether this key flipped
        rrc_params(im.width, im.height, t.scale, t.ratio, g)
        flips.add(torch.rand(1, generator=g).item() < 0.5)
    assert flips == {True, False}  # both the flipped and the unflipped path were exercised
    # the draws are really random: different keys give different crops
    outs = [t([im], sample_generator(0, 0, k))[0] for k in range(4)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_transform_rejects_pairs_of_different_size():
    t = identity_transform()
    with pytest.raises(UserError, match="differ in size"):
        t([colour_image(48, 40), colour_image(40, 48)], sample_generator(0))


def test_transform_normalises():
    mean, std = [0.5, 0.25, 0.125], [0.5, 0.25, 0.5]
    im = colour_image()
    g1, g2 = sample_generator(3, 1, 4), sample_generator(3, 1, 4)
    raw = identity_transform()([im], g1)[0]
    norm = PretrainTransform(32, mean, std)([im], g2)[0]
    expected = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(norm, expected, atol=1e-6)


# ------------------------------------------------------------------------- PretrainDataset determinism
def make_dataset(files, **kw) -> PretrainDataset:
    return PretrainDataset(files, kw.pop("transform", identity_transform()), seed=kw.pop("seed", 0),
                           num_patches=kw.pop("num_patches", 16), **kw)


def test_dataset_is_deterministic_per_epoch_and_index(train_files):
    d1, d2 = make_dataset(train_files), make_dataset(train_files)
    for key in [(0, 0), (0, 5), (3, 5), (7, 15)]:
        s1, s2 = d1[key], d2[key]
        assert torch.equal(s1["image"], s2["image"]) and torch.equal(s1["noise"], s2["noise"])
        assert s1["index"] == key[1]
    # reading in another order does not change a sample (no shared RNG stream)
    later = d2[(0, 5)]
    assert torch.equal(later["image"], d1[(0, 5)]["image"])
    # an int key means epoch 0
    assert torch.equal(d1[5]["image"], d1[(0, 5)]["image"])
    # a new epoch draws a new crop and a new mask; another seed too
    e0, e1 = d1[(0, 5)], d1[(1, 5)]
    assert not torch.equal(e0["image"], e1["image"]) and not torch.equal(e0["noise"], e1["noise"])
    other_seed = make_dataset(train_files, seed=1)[(0, 5)]
    assert not torch.equal(other_seed["image"], e0["image"])
    # the global torch RNG is neither used nor disturbed
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    d1[(2, 3)]
    assert torch.equal(torch.rand(3), expected)


def test_dataset_noise_length_is_num_patches(train_files):
    s = make_dataset(train_files, num_patches=16)[(0, 1)]
    assert s["noise"].shape == (16,) and s["noise"].dtype == torch.float32
    assert ((s["noise"] >= 0) & (s["noise"] < 1)).all()
    assert "noise" not in make_dataset(train_files, num_patches=0)[(0, 1)]
    assert "target" not in s and s["image"].shape == (3, 32, 32)


def test_dataset_on_the_fly_blur(train_files):
    ds = make_dataset(train_files, blur=BlurSpec(method="gaussian", sigma=2.0), deblur=True)
    s = ds[(0, 2)]
    img, target = s["image"], s["target"]
    assert img.shape == target.shape == (3, 32, 32)
    assert not torch.equal(img, target)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])  # grayscale-as-RGB input
    assert not torch.equal(target[0], target[1])  # sharp colour target
    # the blurred input is a smoothed grey version of the target: lower high-frequency energy
    grey = (0.299 * target[0] + 0.587 * target[1] + 0.114 * target[2])

    def hf(x: torch.Tensor) -> float:
        return float((x[1:, :] - x[:-1, :]).abs().mean() + (x[:, 1:] - x[:, :-1]).abs().mean())
    assert hf(img[0]) < hf(grey)
    # deterministic like everything else
    assert torch.equal(make_dataset(train_files, blur=BlurSpec(method="gaussian", sigma=2.0), deblur=True)[(0, 2)]
                       ["image"], img)


def test_dataset_paired_trees_use_identical_crops(train_files, tmp_path):
    """blurred_files[i] pairs with files[i]; with the blurred tree = channel-swapped sharp images, input
    and target must be exact channel swaps of each other (same crop, same flip)."""
    blurred = []
    for i, f in enumerate(train_files[:4]):
        p = tmp_path / f"b{i}.png"
        swap_rb(load_image(f)).save(p)
        blurred.append(str(p))
    ds = make_dataset(train_files[:4], blurred_files=blurred, deblur=True)
    for key in [(0, 0), (1, 1), (2, 3), (5, 2)]:
        s = ds[key]
        assert torch.equal(s["image"], s["target"][[2, 1, 0]]), key


def test_dataset_deblur_needs_a_blur_source(train_files):
    with pytest.raises(UserError, match="--data_path_blurred"):
        make_dataset(train_files, deblur=True)


def test_dataset_bad_image_error_and_skip(train_files, tmp_path):
    files = []
    for i, f in enumerate(train_files[:3]):
        files.append(str(tmp_path / f"{i}.png"))
        shutil.copyfile(f, files[-1])
    Path(files[1]).write_bytes(b"garbage")
    with pytest.raises(BadImageError, match="1.png"):
        make_dataset(files)[(0, 1)]
    skip = make_dataset(files, bad_image="skip")
    s = skip[(0, 1)]  # a marker, never another image in its place
    assert isinstance(s, SkippedSample) and (s.index, s.path) == (1, files[1]) and "1.png" in s.reason
    batches = list(DataLoader(skip, batch_size=3, collate_fn=SkipCollate()))  # the collate drops it, names it
    assert len(batches) == 1 and batches[0][1] == [files[1]]
    assert batches[0][0]["index"].tolist() == [0, 2]


def test_dataset_same_batches_with_workers(train_files):
    """Per-sample seeding: 0 and 2 loader workers give identical batches."""
    ds = make_dataset(train_files)

    def batches(workers):
        sampler = EpochIndexSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
        sampler.set_epoch(1)
        return list(DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers))
    a, b = batches(0), batches(2)
    assert len(a) == len(b) == TINY_TRAIN_IMAGES // 4
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["noise"], y["noise"])
        assert torch.equal(x["index"], y["index"])


# ------------------------------------------------------------------------------------- EpochIndexSampler
class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def test_sampler_yields_epoch_index_tuples():
    s = EpochIndexSampler(_Sized(10), num_replicas=1, rank=0, shuffle=True, seed=0)
    s.set_epoch(3)
    keys = list(s)
    assert all(isinstance(k, tuple) and len(k) == 2 and k[0] == 3 for k in keys)
    assert sorted(i for _, i in keys) == list(range(10))
    s.set_epoch(4)
    assert [i for _, i in s] != [i for _, i in keys]  # reshuffled per epoch
    s2 = EpochIndexSampler(_Sized(10), num_replicas=1, rank=0, shuffle=True, seed=0)
    s2.set_epoch(4)
    assert list(s2) == list(s)  # and reproducibly so


@pytest.mark.parametrize("n", [16, 15])
def test_sampler_two_replicas_cover_one_replica(n):
    one = EpochIndexSampler(_Sized(n), num_replicas=1, rank=0, shuffle=True, seed=5)
    two = [EpochIndexSampler(_Sized(n), num_replicas=2, rank=r, shuffle=True, seed=5) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(2)
    single = list(one)
    parts = [list(s) for s in two]
    assert len(parts[0]) == len(parts[1]) == (n + 1) // 2
    assert set(parts[0]) | set(parts[1]) == set(single)
    if n % 2 == 0:
        assert not set(parts[0]) & set(parts[1])
        # batch k of 2 ranks x b == batch k of 1 rank x 2b (what makes DDP match one process)
        b = 2
        for k in range(n // (2 * b)):
            assert set(parts[0][k * b:(k + 1) * b]) | set(parts[1][k * b:(k + 1) * b]) == \
                set(single[2 * k * b:2 * (k + 1) * b])
