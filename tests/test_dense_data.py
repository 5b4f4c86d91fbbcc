"""Segmentation and landmark data: the three segmentation layouts (util.seg_data), landmark geometry and
datasets (util.landmarks), the synthetic ultrasound nodule writer (util.synthetic_seg) and its
random_data.py task."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from util import landmarks as lm
from util import seg_data as sd
from util.cli import UserError
from util.synthetic_seg import nodule_sample, write_us_segmentation
from util.synthetic_vfm import write_vfm_task

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------------------

def test_layouts_detected_and_read(tmp_path: Path) -> None:
    write_us_segmentation(tmp_path / "mm", "mmseg", num=2, size=32, seed=0, gaussian=True)
    write_us_segmentation(tmp_path / "su", "seg_unet", num=2, size=32, seed=0)
    write_vfm_task(tmp_path / "vfm", "segmentation", num=2, img_size=32)
    vfm_root = str(tmp_path / "vfm" / "VesselSegmentation")
    assert sd.detect_seg_layout(str(tmp_path / "mm")) == "mmseg"
    assert sd.detect_seg_layout(str(tmp_path / "su")) == "seg_unet"
    assert sd.detect_seg_layout(vfm_root) == "vfm"

    mm = sd.list_seg_pairs(str(tmp_path / "mm"), "val")
    assert [Path(i).parent.parent.name for i, _ in mm] == ["images", "images"]
    assert [Path(m).parent.parent.name for _, m in mm] == ["masks_1", "masks_1"]
    blurred = sd.list_seg_pairs(str(tmp_path / "mm"), "train", images="images_gaussian")
    assert all("images_gaussian" in i for i, _ in blurred)
    vfm = sd.list_seg_pairs(vfm_root, "train")  # VisionFM's folder is 'training'
    assert len(vfm) == 2 and all("/training/images/" in i and "/training/labels/" in m for i, m in vfm)
    assert len(sd.list_seg_pairs(vfm_root, "test")) == 2

    # seg_unet stores 255 for the nodule; read as class 1, identical to the mmseg masks of the same scans
    su = sd.list_seg_pairs(str(tmp_path / "su"), "train")
    raw = np.asarray(Image.open(su[0][1]))
    assert set(np.unique(raw)) == {0, 255}
    m = sd.read_mask(su[0][1], "seg_unet")
    assert set(np.unique(m)) == {0, 1}
    np.testing.assert_array_equal(m, sd.read_mask(sd.list_seg_pairs(str(tmp_path / "mm"), "train")[0][1], "mmseg"))
    counts = sd.mask_class_counts(su, "seg_unet", 2)
    assert counts.sum() == 2 * 32 * 32 and counts[1] > 0
    assert sd.mask_mapping("mmseg")(raw) is raw

    ds = sd.SegmentationDataset(vfm, 16, MEAN, STD, train=False, layout="vfm", num_classes=3)
    x, y, i = ds[1]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.shape == (16, 16) and y.dtype == torch.int64
    assert i == 1


def test_bad_trees_and_masks_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        sd.detect_seg_layout(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in _one_line(e) and "masks_1" in str(e.value)

    root = tmp_path / "mm"
    write_us_segmentation(root, "mmseg", num=2, size=32, seed=1)
    (root / "masks_1" / "train" / "00001.png").unlink()
    with pytest.raises(UserError) as e:
        sd.list_seg_pairs(str(root), "train")
    assert "00001.png" in _one_line(e) and "no mask" in str(e.value)
    with pytest.raises(UserError, match="split"):
        sd.list_seg_pairs(str(root), "holdout")

    # a 0/255 mask in the mmseg layout: the error names the file and points at the seg_unet layout
    mpath = root / "masks_1" / "val" / "00002.png"
    Image.fromarray((np.asarray(Image.open(mpath)) * 255).astype(np.uint8), "L").save(mpath)
    pairs = sd.list_seg_pairs(str(root), "val")
    with pytest.raises(UserError) as e:
        sd.SegmentationDataset(pairs, 32, MEAN, STD, False, "mmseg", 2)[0]
    assert str(mpath) in _one_line(e) and "seg_unet" in str(e.value)
    with pytest.raises(UserError, match="00002.png"):
        sd.mask_class_counts(pairs, "mmseg", 2)

    # a colour mask and a mask of another size than its image
    mpath = root / "masks_1" / "val" / "00003.png"
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[0, 0] = (1, 0, 0)
    Image.fromarray(rgb).save(mpath)
    with pytest.raises(UserError) as e:
        sd.read_mask(str(mpath))
    assert str(mpath) in _one_line(e) and "colour" in str(e.value)
    Image.fromarray(np.zeros((16, 32), np.uint8), "L").save(mpath)
    with pytest.raises(UserError) as e:
        sd.SegmentationDataset(pairs, 32, MEAN, STD, False, "mmseg", 2)[1]
    assert str(mpath) in _one_line(e) and "match" in str(e.value)
    mpath.write_bytes(b"not a png")
    with pytest.raises(UserError) as e:
        sd.read_mask(str(mpath))
    assert str(mpath) in _one_line(e)


def _asymmetric_tree(root: Path, n: int = 4, size: int = 24) -> list[tuple[str, str]]:
    """mmseg tree whose image is its mask (x 200), each with an L-shaped, asymmetric object."""
    for i in range(n):
        m = np.zeros((size, size), np.uint8)
        m[3 + i:12 + i, 4:7] = 1
        m[9 + i:12 + i, 4:15] = 1
        for sub, arr in (("images", m * 200), ("masks_1", m)):
            (root / sub / "train").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr, "L").save(root / sub / "train" / f"{i}.png")
    return sd.list_seg_pairs(str(root), "train")


def test_joint_flips_keep_image_and_mask_aligned(tmp_path: Path) -> None:
    pairs = _asymmetric_tree(tmp_path)
    ds = sd.SegmentationDataset(pairs, 24, MEAN, STD, train=True, layout="mmseg", num_classes=2, seed=5)
    plain = sd.SegmentationDataset(pairs, 24, MEAN, STD, train=False, layout="mmseg", num_classes=2)
    flipped = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x, y, _ = ds[i]
            np.testing.assert_array_equal((x[0] > 0.5).long().numpy(), y.numpy())  # image and mask agree
            if not torch.equal(y, plain[i][1]):
                flipped.add(ds.flips(i))
            x2, y2, _ = ds[i]
            assert torch.equal(x, x2) and torch.equal(y, y2)  # seeded by (seed, epoch, index)
            fresh = sd.SegmentationDataset(pairs, 24, MEAN, STD, train=True, layout="mmseg", num_classes=2, seed=5)
            x3, y3, i3 = fresh[(epoch, i)]  # an epoch-keyed sampler's key: the same draw without set_epoch
            assert torch.equal(x, x3) and torch.equal(y, y3) and i3 == i
    assert any(h for h, _ in flipped) and any(v for _, v in flipped)  # both flips were drawn
    # resizing: image bilinear (grey levels at edges), mask nearest (class values only)
    small = sd.SegmentationDataset(pairs, 16, MEAN, STD, train=False, layout="mmseg", num_classes=2)
    x, y, _ = small[0]
    assert set(y.unique().tolist()) == {0, 1}
    assert ((x[0] > 0.05) & (x[0] < 0.7)).any()


def test_blur_record_applied_to_image(tmp_path: Path) -> None:
    from util.blur import BlurSpec, blur_pil
    write_us_segmentation(tmp_path, "mmseg", num=1, size=32, seed=2)
    pairs = sd.list_seg_pairs(str(tmp_path), "train")
    spec = BlurSpec("gaussian", sigma=1.5)
    sharp = sd.SegmentationDataset(pairs, 32, MEAN, STD, False, "mmseg", 2)[0][0]
    blurred = sd.SegmentationDataset(pairs, 32, MEAN, STD, False, "mmseg", 2, blur=spec.to_dict())[0][0]
    expect = np.asarray(blur_pil(Image.open(pairs[0][0]).convert("RGB"), spec, key="00000.png").convert("RGB"))
    np.testing.assert_allclose(blurred.permute(1, 2, 0).numpy() * 255, expect, atol=1e-3)
    assert not torch.equal(sharp, blurred)
    with pytest.raises(UserError, match="blur"):
        sd.SegmentationDataset(pairs, 32, MEAN, STD, False, "mmseg", 2, blur={"method": "nope"})


# ---------------------------------------------------------------------------------------------------------
# landmark geometry
# ---------------------------------------------------------------------------------------------------------

def test_point_transforms_round_trip() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 500, (20, 2))
    back = lm.resize_points(lm.resize_points(p, (512, 512), (224, 224)), (224, 224), (512, 512))
    np.testing.assert_allclose(back, p, atol=1e-9)
    # pixel centres: the centre pixel of a 512 image is the centre pixel of its 224 resize
    np.testing.assert_allclose(lm.resize_points(np.array([[255.5, 255.5]]), (512, 512), (224, 224)), [[111.5, 111.5]])
    M = lm.affine_matrix(4.0, (7.0, -3.0), 1.1, (111.5, 111.5))
    np.testing.assert_allclose(lm.apply_affine(lm.apply_affine(p, M), np.linalg.inv(M)), p, atol=1e-9)
    # counter-clockwise as seen on screen: a point right of the centre moves up (smaller y)
    q = lm.apply_affine(np.array([[20.0, 10.0]]), lm.affine_matrix(90.0, center=(10.0, 10.0)))
    np.testing.assert_allclose(q, [[10.0, 0.0]], atol=1e-9)
    pairs = [(0, 1), (2, 3)]
    f = lm.hflip_points(p[:5], 512, pairs)
    np.testing.assert_allclose(f[1], [511 - p[0, 0], p[0, 1]])  # landmark 0 now sits where 1's identity is
    np.testing.assert_allclose(lm.hflip_points(f, 512, pairs), p[:5], atol=1e-9)
    assert np.isnan(lm.apply_affine(np.array([[np.nan, np.nan]]), M)).all()


def test_affine_image_moves_with_points() -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    pts = np.array([[20.0, 15.0], [45.0, 40.0]])
    for x, y in pts.astype(int):
        img[y - 1:y + 2, x - 1:x + 2] = 255
    M = lm.affine_matrix(-5.0, (3.0, -2.0), 1.0, (31.5, 31.5))
    out = np.asarray(lm.affine_image(Image.fromarray(img), M))[..., 0].astype(float)
    q = lm.apply_affine(pts, M)
    for x, y in q:  # the bright spot's centroid is where the point went
        yy, xx = np.mgrid[int(y) - 4:int(y) + 5, int(x) - 4:int(x) + 5]
        w = out[yy, xx]
        assert abs((w * xx).sum() / w.sum() - x) < 0.5 and abs((w * yy).sum() / w.sum() - y) < 0.5


def test_single_pixel_landmark_survives_512_to_224() -> None:
    # VisionFM resizes the one-pixel point map by nearest neighbour: column/row 100 is never sampled at 224
    point_map = np.zeros((512, 512, 1), np.uint8)
    point_map[100, 100, 0] = 1
    ref = np.asarray(Image.fromarray(point_map[..., 0]).resize((224, 224), Image.NEAREST))
    assert ref.sum() == 0  # the reference loses this landmark
    p = lm.points_from_point_map(point_map)
    np.testing.assert_array_equal(p, [[100.0, 100.0]])
    q = lm.resize_points(p, (512, 512), (224, 224))
    heat = lm.render_heatmaps(q, (224, 224), sigma=2.0)
    assert heat.shape == (1, 224, 224) and heat.sum() == pytest.approx(1.0, abs=1e-4)
    dec = lm.decode_heatmaps(torch.from_numpy(heat)[None])[0].numpy()
    assert np.abs(dec - q).max() <= 1.0


def test_heatmaps_decode_within_one_pixel_and_absent_points() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 47, (6, 2))
    p[4] = np.nan
    p[5] = (60.0, 10.0)  # outside a 48-px image
    heat = lm.render_heatmaps(p, (48, 48), sigma=1.5)
    assert heat.dtype == np.float32
    np.testing.assert_allclose(heat[:4].sum((1, 2)), 1.0, atol=1e-5)
    assert heat[4].sum() == 0 and heat[5].sum() == 0
    dec = lm.decode_heatmaps(torch.from_numpy(np.log(heat[:4] + 1e-12))[None])[0].numpy()
    assert np.abs(dec - p[:4]).max() <= 1.0
    assert np.isnan(lm.points_from_point_map(np.zeros((8, 8, 2)))).all()


def _dot_items(tmp_path: Path, n: int = 3, size: int = 80) -> list[tuple[str, np.ndarray]]:
    """Images with a bright 5x5 dot at each of 2 landmarks (one dot brighter), points in image pixels."""
    rng = np.random.default_rng(2)
    items = []
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        pts = rng.uniform(12, size - 12, (2, 2)).round()
        for k, (x, y) in enumerate(pts.astype(int)):
            img[y - 2:y + 3, x - 2:x + 3] = 255 if k == 0 else 120
        path = tmp_path / f"{i}.png"
        Image.fromarray(img).save(path)
        items.append((str(path), pts))
    return items


def test_landmark_dataset_moves_points_with_the_image(tmp_path: Path) -> None:
    items = _dot_items(tmp_path)
    ds = lm.LandmarkDataset(items, 40, MEAN, STD, train=True, seed=0, sigma=1.0, flip_pairs=[(0, 1)],
                            affine_p=1.0, max_rotate=5.0, max_translate=0.05, hflip=1.0)
    for i in range(len(ds)):
        x, heat, pts, idx = ds[i]
        assert x.shape == (3, 40, 40) and heat.shape == (2, 40, 40) and pts.shape == (2, 2) and idx == i
        assert not torch.isnan(pts).any()  # no landmark lost
        # with the flip pair swapped, landmark 1 is now the brighter dot (originally landmark 0)
        img = x[0].numpy()
        yy, xx = np.mgrid[0:40, 0:40]
        peak = [img[(np.abs(xx - px) <= 1) & (np.abs(yy - py) <= 1)].max() for px, py in pts.numpy()]
        assert peak[1] > 0.7 and 0.3 < peak[0] < 0.6, (i, peak)  # each point sits on its own dot
        dec = lm.decode_heatmaps(heat[None])[0]
        assert (dec - pts).abs().max() <= 1.0
        assert torch.equal(ds[i][2], pts)  # seeded
    ev = lm.LandmarkDataset(items, 40, MEAN, STD, train=False)
    np.testing.assert_allclose(ev[0][2].numpy(), lm.resize_points(items[0][1], (80, 80), (40, 40)), atol=1e-5)
    with pytest.raises(UserError, match="flip pair"):
        lm.LandmarkDataset(items, 40, MEAN, STD, train=True, flip_pairs=[(0, 5)])


def test_landmark_items_from_vfm_point_maps(tmp_path: Path) -> None:
    write_vfm_task(tmp_path, "landmark", num=2, img_size=48)
    root = str(tmp_path / "LandmarkDetection")
    items = lm.list_landmark_items(root, "train")
    assert len(items) == 2 and items[0][1].shape == (3, 2)
    heat = np.load(Path(items[0][0]).parent.parent / "labels" / (Path(items[0][0]).stem + ".npy"))
    for k, (x, y) in enumerate(items[0][1]):
        assert heat[int(y), int(x), k] == 1
    assert len(lm.list_landmark_items(root, "test")) == 2
    npy = Path(items[1][0]).parent.parent / "labels" / (Path(items[1][0]).stem + ".npy")
    npy.unlink()
    with pytest.raises(UserError) as e:
        lm.list_landmark_items(root, "train")
    assert str(npy) in _one_line(e)


def test_landmark_csv(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    items = _dot_items(tmp_path / "train", n=2)
    csv_path = tmp_path / "train.csv"
    rows = ["image,disc_x,disc_y,fovea_x,fovea_y"]
    rows += [f"{Path(p).name},{q[0, 0]},{q[0, 1]},," for p, q in items]  # fovea absent
    csv_path.write_text("\n".join(rows) + "\n")
    got = lm.list_landmark_items(str(tmp_path), "train", labels_csv=str(tmp_path / "{split}.csv"))
    assert [Path(p).name for p, _ in got] == ["0.png", "1.png"]
    np.testing.assert_allclose(got[0][1][0], items[0][1][0])
    assert np.isnan(got[0][1][1]).all()
    table = lm.read_landmark_csv(str(csv_path), 2)
    assert set(table) == {"0.png", "1.png"}
    for text, where in (("0.png,1,2,3,4\n", ":1:"),  # no header
                        ("image,x1,y1\n0.png,1\n", ":2:"),  # wrong field count
                        ("image,x1,y1\n0.png,1,\n", ":2:"),  # half a point
                        ("image,x1,y1\n0.png,a,b\n", ":2:"),
                        ("image,x1,y1\n0.png,1,2\n0.png,3,4\n", ":3:")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(UserError) as e:
            lm.read_landmark_csv(str(bad))
        assert f"{bad}{where}" in _one_line(e)
    with pytest.raises(UserError, match="3 are expected"):
        lm.read_landmark_csv(str(csv_path), 3)
    (tmp_path / "train" / "extra.png").write_bytes((tmp_path / "train" / "0.png").read_bytes())
    with pytest.raises(UserError) as e:
        lm.list_landmark_items(str(tmp_path), "train", labels_csv=str(csv_path))
    assert "extra.png" in _one_line(e) and "no row" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# synthetic ultrasound nodules
# ---------------------------------------------------------------------------------------------------------

def test_us_segmentation_writer_deterministic_and_learnable(tmp_path: Path) -> None:
    a = write_us_segmentation(tmp_path / "a", "mmseg", num=2, size=48, seed=4, gaussian=True)
    write_us_segmentation(tmp_path / "b", "mmseg", num=2, size=48, seed=4, gaussian=True)
    write_us_segmentation(tmp_path / "c", "mmseg", num=2, size=48, seed=5, gaussian=True)
    ha, hb, hc = (_tree_hashes(tmp_path / d) for d in "abc")
    assert ha == hb and len(ha) == 3 * 3 * 2  # images, masks_1, images_gaussian x 3 splits x 2
    assert ha != hc
    assert a["classes"] == ["background", "nodule"] and a["splits"] == {"train": 2, "val": 2, "test": 2}
    # the mask outlines a visible structure: nodules are darker than the tissue around them
    for s in range(6):
        img, mask = nodule_sample(s, 64)
        ring = np.zeros_like(mask, bool)
        ys, xs = np.nonzero(mask)
        ring[max(ys.min() - 4, 0):ys.max() + 5, max(xs.min() - 4, 0):xs.max() + 5] = True
        ring &= (mask == 0) & (img > 0)
        assert mask.any() and img[mask == 1].mean() < 0.7 * img[ring].mean()
    with pytest.raises(ValueError, match="layout"):
        write_us_segmentation(tmp_path / "d", "vfm", num=1, size=32)


def test_random_data_us_segmentation_cli(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "random_data.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    r = run("--task", "us_segmentation", "--layout", "seg_unet", "--dst_dir", "su", "--num", "1", "--img_size", "32")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "su").iterdir()) == ["images_gaussian", "masks"]
    assert sd.detect_seg_layout(str(tmp_path / "su")) == "seg_unet"
    r = run("--task", "us_segmentation", "--layout", "landmark", "--dst_dir", "x")
    err = r.stderr.strip()
    assert r.returncode != 0 and err.startswith("random_data.py: error:") and "\n" not in err and "mmseg" in err
