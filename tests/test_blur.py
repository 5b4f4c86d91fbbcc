"""Tests for util/blur.py and the blurred_images.py tool (DeblurringMAE degradations)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # let the file run without an installed package or a conftest
    sys.path.insert(0, str(ROOT))

from util.blur import (  # noqa: E402
    METHODS,
    BlurSpec,
    blur_array,
    blur_pil,
    derive_seed,
    gaussian_kernel1d,
    gaussian_ksize,
    make_kernel,
    motion_angle,
    to_grayscale,
)
from util.blur_transform import RandomBlur  # noqa: E402

TOOL = ROOT / "blurred_images.py"


def _noise(shape=(64, 72), dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hi = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, int(hi) + 1, shape, dtype=dtype)
    return rng.random(shape).astype(dtype)


def _read(path: Path) -> tuple[np.ndarray, str, str]:
    """(pixels, mode, format) with the file closed again. Pillow < 10.3 opens a 16-bit grayscale PNG as
    'I' (int32); PNG has no 32-bit grey, so that is reported as the 'I;16' it is on newer Pillow."""
    with Image.open(path) as im:
        if im.mode == "I" and im.format == "PNG":
            return np.array(im).astype(np.uint16), "I;16", im.format
        return np.array(im), im.mode, im.format


def _laplacian_var(a: np.ndarray) -> float:
    a = a.astype(np.float64)
    lap = a[1:-1, :-2] + a[1:-1, 2:] + a[:-2, 1:-1] + a[2:, 1:-1] - 4 * a[1:-1, 1:-1]
    return float(lap.var())


# ---------------------------------------------------------------------------------------- spec --

def test_spec_roundtrip_is_plain_json():
    spec = BlurSpec(method="motion", sigma=2, ksize=7, grayscale=False, seed=np.int64(3))
    d = spec.to_dict()
    assert d == {"method": "motion", "sigma": 2.0, "ksize": 7, "grayscale": False, "seed": 3}
    assert all(type(v) in (str, int, float, bool) for v in d.values())
    assert BlurSpec.from_dict(json.loads(json.dumps(d))) == spec
    assert BlurSpec.from_dict({"method": "mean", "ksize": 5.0}).ksize == 5  # JSON may widen ints


def test_spec_survives_weights_only_checkpoint():
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({"blur": BlurSpec(method="defocus").to_dict()}, buf)
    buf.seek(0)
    assert BlurSpec.from_dict(torch.load(buf, weights_only=True)["blur"]) == BlurSpec(method="defocus")


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "box"}, "unknown blur method 'box'"),
    ({"sigma": 0}, "sigma must be a finite number > 0"),
    ({"sigma": -1.0}, "sigma must be a finite number > 0"),
    ({"sigma": float("nan")}, "sigma must be a finite number > 0"),
    ({"method": "median", "ksize": 4}, "ksize must be odd"),
    ({"method": "mean", "ksize": 6}, "ksize must be odd"),
    ({"method": "motion", "ksize": 0}, "ksize must be >= 1"),
    ({"ksize": 2.5}, "ksize must be an int"),
    ({"grayscale": "yes"}, "grayscale must be a bool"),
])
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlurSpec(**kwargs)


def test_spec_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown BlurSpec field"):
        BlurSpec.from_dict({"method": "gaussian", "simga": 2.0})


def test_defocus_radius_may_be_even():
    assert make_kernel(BlurSpec(method="defocus", ksize=4)).shape == (9, 9)


# ------------------------------------------------------------------------------------- kernels --

def test_gaussian_kernel_closed_form_and_opencv_size():
    # OpenCV: round(sigma*6+1)|1 taps on 8-bit images, round(sigma*8+1)|1 on other depths.
    assert gaussian_ksize(1.1, np.uint8) == 9
    assert gaussian_ksize(1.1, np.float32) == 11
    assert gaussian_ksize(1.1, np.uint16) == 11
    assert gaussian_ksize(2.0, np.uint8) == 13
    k = gaussian_kernel1d(1.1)
    assert k.shape == (9,) and k.sum() == pytest.approx(1.0, abs=1e-12)
    x = np.arange(9) - 4
    expected = np.exp(-x ** 2 / (2 * 1.1 ** 2))
    np.testing.assert_allclose(k, expected / expected.sum(), rtol=1e-12)
    k2 = make_kernel(BlurSpec())
    np.testing.assert_allclose(k2, np.outer(k, k))


@pytest.mark.parametrize("method", ["gaussian", "mean", "motion", "defocus"])
def test_linear_kernels_are_normalised_and_centred(method):
    k = make_kernel(BlurSpec(method=method), key="a/b.png")
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    assert k.shape[0] % 2 == 1 and k.shape[1] % 2 == 1
    assert (k >= 0).all()
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-12)  # point symmetric: correlation == convolution


def test_motion_kernel_is_a_line_of_ksize_pixels():
    spec = BlurSpec(method="motion", ksize=5)
    for key in range(20):
        k = make_kernel(spec, key)
        # Total line length along its direction is ksize: the second moment along the line
        # matches a uniform 5-pixel segment (variance 2) give or take anti-aliasing.
        t = np.radians(motion_angle(spec, key))
        r = k.shape[0] // 2
        y, x = np.mgrid[-r:r + 1, -r:r + 1]
        u = x * np.cos(t) + y * np.sin(t)
        v = -x * np.sin(t) + y * np.cos(t)
        assert 1.6 < (k * u * u).sum() < 2.6
        assert (k * v * v).sum() < 0.35
    from util.blur import _motion_kernel
    box = np.zeros((5, 5))
    box[2] = 0.2
    np.testing.assert_allclose(_motion_kernel(5, 0.0), box, atol=1e-12)  # axis-aligned: exact 5-pixel line
    np.testing.assert_allclose(_motion_kernel(5, 90.0), box.T, atol=1e-12)


def test_defocus_kernel_is_a_round_disc():
    k = make_kernel(BlurSpec(method="defocus", ksize=5))
    assert k.shape == (11, 11)
    assert k[5, 0] > 0 and k[0, 0] == 0  # radius 5 reaches the edge midpoints, not the corners
    np.testing.assert_allclose(k, k.T)
    inner = k[5, 5]
    assert np.isclose(k[5, 2], inner) and k[5, 0] == pytest.approx(inner / 2)  # anti-aliased rim


# ------------------------------------------------------------------------------------ blurring --

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_constant_image_stays_constant(method, dtype):
    img = np.full((23, 31), 100, dtype=dtype)
    out = blur_array(img, BlurSpec(method=method), key="k")
    assert out.dtype == dtype and out.shape == img.shape
    np.testing.assert_allclose(out, img, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_blur_reduces_high_frequency_energy(method):
    img = _noise((96, 96))
    out = blur_array(img, BlurSpec(method=method), key="x.png")
    assert _laplacian_var(out) < 0.3 * _laplacian_var(img)
    # Mean brightness is kept (normalised kernels; the median of uniform noise is unbiased too).
    assert abs(out.mean() - img.mean()) < 2.0


def test_gaussian_matches_scipy():
    nd = pytest.importorskip("scipy.ndimage")
    img = _noise((70, 53))
    out = blur_array(img, BlurSpec(method="gaussian", sigma=1.1))
    # truncate chosen so scipy's radius int(truncate*sigma+0.5) equals ours (4 for 9 taps).
    ref = nd.gaussian_filter(img.astype(np.float64), 1.1, mode="mirror", truncate=4 / 1.1)
    assert np.abs(out.astype(np.float64) - ref).max() <= 1.0
    img16 = _noise((40, 41), np.uint16)
    out16 = blur_array(img16, BlurSpec(method="gaussian", sigma=1.1))
    ref16 = nd.gaussian_filter(img16.astype(np.float64), 1.1, mode="mirror", truncate=5 / 1.1)
    assert np.abs(out16.astype(np.float64) - ref16).max() <= 1.0


@pytest.mark.parametrize("method", ["mean", "motion", "defocus"])
def test_linear_methods_match_scipy_correlate(method):
    nd = pytest.importorskip("scipy.ndimage")
    img = _noise((45, 38), seed=2)
    spec = BlurSpec(method=method)
    ref = nd.correlate(img.astype(np.float64), make_kernel(spec, "k"), mode="mirror")
    assert np.abs(blur_array(img, spec, "k").astype(np.float64) - ref).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("shape", [(64, 57), (3, 4), (1, 7), (2, 2)])
def test_median_matches_scipy_exactly(shape):
    nd = pytest.importorskip("scipy.ndimage")
    for dtype in (np.uint8, np.uint16, np.float32):
        img = _noise(shape, dtype, seed=3)
        out = blur_array(img, BlurSpec(method="median", ksize=5))
        np.testing.assert_array_equal(out, nd.median_filter(img, size=5, mode="mirror"))


def test_median_removes_salt_and_pepper():
    rng = np.random.default_rng(4)
    clean = np.full((80, 80), 120, np.uint8)
    clean[:, 40:] = 60  # an edge the median must keep sharp
    noisy = clean.copy()
    m = rng.random(clean.shape)
    noisy[m < 0.05] = 0
    noisy[m > 0.95] = 255
    med = blur_array(noisy, BlurSpec(method="median"))
    gau = blur_array(noisy, BlurSpec(method="gaussian"))
    err = lambda a: np.abs(a.astype(int) - clean).mean()  # noqa: E731
    assert err(med) < 0.05 * err(noisy)
    assert err(med) < 0.2 * err(gau)
    assert (med == clean).mean() > 0.99


def test_color_and_grayscale_paths():
    rgb = _noise((20, 24, 3))
    gray = blur_array(rgb, BlurSpec(grayscale=True))
    assert gray.shape == (20, 24)
    np.testing.assert_array_equal(gray, blur_array(to_grayscale(rgb), BlurSpec()))
    color = blur_array(rgb, BlurSpec(grayscale=False))
    assert color.shape == rgb.shape
    for c in range(3):  # per-channel blur
        np.testing.assert_array_equal(color[..., c], blur_array(rgb[..., c], BlurSpec()))


def test_pil_rgba_and_16bit():
    rgba = Image.fromarray(_noise((16, 18, 4)))
    assert blur_pil(rgba, BlurSpec()).mode == "L"
    kept = blur_pil(rgba, BlurSpec(grayscale=False))
    assert kept.mode == "RGB" and kept.size == (18, 16)
    img16 = _noise((16, 18), np.uint16)
    out = blur_pil(Image.fromarray(img16), BlurSpec())
    assert out.mode == "I;16"
    arr = np.asarray(out)
    assert arr.dtype == np.uint16 and arr.max() > 255  # no silent drop to 8 bits


@pytest.mark.parametrize("method", METHODS)
def test_512_image_is_fast(method):
    img = _noise((512, 512))
    spec = BlurSpec(method=method)
    blur_array(img, spec)
    t = time.perf_counter()
    blur_array(img, spec)
    assert time.perf_counter() - t < 1.0


# ------------------------------------------------------------------------------- determinism --

def test_motion_is_deterministic_per_seed_and_key():
    spec = BlurSpec(method="motion")
    assert derive_seed(0, "train/a/1.png") == derive_seed(0, "train/a/1.png")
    angles = {motion_angle(spec, f"train/a/{i}.png") for i in range(20)}
    assert len(angles) == 20  # different paths, different kernels
    assert motion_angle(spec, "x") != motion_angle(BlurSpec(method="motion", seed=1), "x")
    img = _noise((40, 40))
    keys = [f"train/c{i % 3}/{i}.png" for i in range(12)]
    forward = {k: blur_array(img, spec, k) for k in keys}
    backward = {k: blur_array(img, spec, k) for k in reversed(keys)}
    for k in keys:  # traversal order does not matter
        np.testing.assert_array_equal(forward[k], backward[k])


def test_derive_seed_is_stable_across_processes():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from util.blur import derive_seed; "
            "print(derive_seed(7, 'val/b/x.png'))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, check=True)
    assert int(out.stdout) == derive_seed(7, "val/b/x.png")


def test_random_blur_transform():
    img = Image.fromarray(_noise((30, 30)))
    t = RandomBlur({"method": "motion"})
    a, b = np.asarray(t(img)), np.asarray(t(img.copy()))
    np.testing.assert_array_equal(a, b)  # content-keyed: same image, same blur
    np.testing.assert_array_equal(np.asarray(t(img, key="p.png")),
                                  np.asarray(blur_pil(img, BlurSpec(method="motion"), "p.png")))
    assert "motion" in repr(t)
    tv = pytest.importorskip("torchvision.transforms")
    out = tv.Compose([RandomBlur(BlurSpec()), tv.ToTensor()])(img)
    assert tuple(out.shape) == (1, 30, 30)


def test_tensor_path_matches_numpy():
    torch = pytest.importorskip("torch")
    from util.blur_transform import blur_tensor
    rgb = _noise((3, 33, 29))
    for method in METHODS:
        spec = BlurSpec(method=method, grayscale=False)
        ref = np.stack([blur_array(c, spec, "k") for c in rgb])
        out = blur_tensor(torch.from_numpy(rgb), spec, "k").numpy()
        assert out.dtype == np.uint8
        assert np.abs(ref.astype(int) - out).max() <= 1
    batch = torch.rand(3, 1, 20, 20)
    spec = BlurSpec(method="motion")
    out = blur_tensor(batch, spec, ["a", "b", "c"])
    for i, k in enumerate("abc"):  # one angle per sample
        np.testing.assert_allclose(out[i, 0].numpy(), blur_array(batch[i, 0].numpy(), spec, k), atol=1e-5)


# ------------------------------------------------------------------------------------------ CLI --

def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    rng = np.random.default_rng(5)
    for rel in ["train/class_a/a1.png", "train/class_a/a2.png", "val/class_b/b1.png"]:
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(p)
    Image.fromarray(rng.integers(0, 65536, (20, 20), dtype=np.uint16)).save(src / "val/class_b/b16.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)).save(src / "val/class_b/rgba.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(src / "train/class_a/c.jpg")
    (src / "train/class_a/notes.txt").write_text("not an image")
    return src


def _outputs(root: Path) -> list[str]:
    """Images written under root (blur_spec.json, the recorded degradation, is checked separately)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "blur_spec.json")


def test_cli_writes_mirrored_grayscale_tree(tree: Path, tmp_path: Path):
    dst = tmp_path / "dst"
    r = _run_tool("--src_dir", str(tree), "--dst_dir", str(dst), "--method", "gaussian", "--sigma", "1.1")
    assert r.returncode == 0, r.stderr
    expected = [p for p in _outputs(tree) if not p.endswith(".txt")]
    assert _outputs(dst) == expected  # same relative paths, no temp files left behind
    spec = json.loads((dst / "blur_spec.json").read_text())
    assert spec["method"] == "gaussian" and spec["sigma"] == 1.1 and spec["grayscale"] is True
    for rel in expected:
        _, mode, fmt = _read(dst / rel)
        assert fmt == _read(tree / rel)[2]
        assert mode in ("L", "I;16")
    px16, mode16, _ = _read(dst / "val/class_b/b16.png")
    assert mode16 == "I;16" and px16.dtype == np.uint16 and px16.max() > 255
    # Same pixels as the library call, so on-the-fly training matches the offline files.
    with Image.open(tree / "train/class_a/a1.png") as src_img:
        expected_px = np.asarray(blur_pil(src_img, BlurSpec(), "train/class_a/a1.png"))
    np.testing.assert_array_equal(_read(dst / "train/class_a/a1.png")[0], expected_px)
    assert "wrote 6" in r.stdout

    # Second run: everything exists, nothing rewritten...
    marker = np.zeros((24, 32), np.uint8)
    Image.fromarray(marker).save(dst / "train/class_a/a1.png")
    r2 = _run_tool("--src_dir", str(tree), "--dst_dir", str(dst))
    assert r2.returncode == 0 and "wrote 0, skipped 6 existing" in r2.stdout
    assert not _read(dst / "train/class_a/a1.png")[0].any()
    # ...unless --overwrite.
    r3 = _run_tool("--src_dir", str(tree), "--dst_dir", str(dst), "--overwrite", "--quiet")
    assert r3.returncode == 0 and "wrote 6" in r3.stdout
    assert _read(dst / "train/class_a/a1.png")[0].any()


def test_cli_keep_color(tree: Path, tmp_path: Path):
    dst = tmp_path / "dst"
    r = _run_tool("--src_dir", str(tree), "--dst_dir", str(dst), "--method", "mean", "--keep_color", "--quiet")
    assert r.returncode == 0, r.stderr
    assert _read(dst / "train/class_a/a1.png")[1] == "RGB"
    assert _read(dst / "val/class_b/rgba.png")[1] == "RGB"  # alpha dropped


def test_cli_motion_independent_of_worker_count(tree: Path, tmp_path: Path):
    runs = []
    for workers in ("1", "2"):
        dst = tmp_path / f"dst{workers}"
        r = _run_tool("--src_dir", str(tree), "--dst_dir", str(dst), "--method", "motion",
                      "--seed", "3", "--num_workers", workers, "--quiet")
        assert r.returncode == 0, r.stderr
        runs.append({p: _read(dst / p)[0] for p in _outputs(dst)})
    assert runs[0].keys() == runs[1].keys()
    for p in runs[0]:
        np.testing.assert_array_equal(runs[0][p], runs[1][p])


@pytest.mark.parametrize("case", ["bad_method", "missing_src", "empty_src", "dst_in_src", "bad_ksize"])
def test_cli_usage_errors_are_one_line(case: str, tmp_path: Path):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    args = {
        "bad_method": ["--src_dir", str(empty), "--dst_dir", str(tmp_path / "o"), "--method", "box"],
        "missing_src": ["--src_dir", str(tmp_path / "nope"), "--dst_dir", str(tmp_path / "o")],
        "empty_src": ["--src_dir", str(empty), "--dst_dir", str(tmp_path / "o")],
        "dst_in_src": ["--src_dir", str(empty), "--dst_dir", str(empty / "out")],
        "bad_ksize": ["--src_dir", str(empty), "--dst_dir", str(tmp_path / "o"), "--method", "median",
                      "--ksize", "4"],
    }[case]
    r = _run_tool(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_bad_image_fails_or_is_skipped(tree: Path, tmp_path: Path):
    (tree / "train/class_a/broken.png").write_bytes(b"\x89PNG not really")
    dst = tmp_path / "dst"
    r = _run_tool("--src_dir", str(tree), "--dst_dir", str(dst), "--quiet")
    assert r.returncode == 1 and "broken.png" in r.stderr
    r2 = _run_tool("--src_dir", str(tree), "--dst_dir", str(dst), "--skip_bad", "--quiet")
    assert r2.returncode == 0, r2.stderr
    assert "skipped 1 unreadable image(s)" in r2.stderr and "broken.png" in r2.stderr
    assert not (dst / "train/class_a/broken.png").exists()
    assert (dst / "val/class_b/b1.png").exists()
    assert not [p for p in dst.rglob(".*")]  # no temp files


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import blurred_images as tool

    out = tmp_path / "split" / "img.png"
    img = Image.fromarray(_noise((16, 16)))
    tool.write_atomic(img, out, "PNG", "tok")
    before = out.read_bytes()

    def half_write(self, fp, *args, **kwargs):  # fp: the writer's open temp file (or a path)
        fp.write(b"\x89PNG half") if hasattr(fp, "write") else Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        tool.write_atomic(Image.fromarray(_noise((16, 16), seed=9)), out, "PNG", "tok")
    assert out.read_bytes() == before  # the old complete file survives
    assert sorted(p.name for p in out.parent.iterdir()) == ["img.png"]  # temp removed


def test_cli_rerun_with_other_settings_keeps_spec_true(tree: Path, tmp_path: Path):
    """A rerun with another --sigma must not skip the existing images yet record the new sigma: it is
    refused (one line, nothing changed); --overwrite re-blurs everything and then records it."""
    dst = tmp_path / "dst"
    assert _run_tool("--src_dir", str(tree), "--dst_dir", str(dst), "--sigma", "1.1").returncode == 0
    spec_before = (dst / "blur_spec.json").read_text()
    images_before = {p: (dst / p).read_bytes() for p in _outputs(dst)}
    r = _run_tool("--src_dir", str(tree), "--dst_dir", str(dst), "--sigma", "2.0")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--overwrite" in r.stderr and "sigma" in r.stderr
    assert (dst / "blur_spec.json").read_text() == spec_before
    assert {p: (dst / p).read_bytes() for p in _outputs(dst)} == images_before
    assert _run_tool("--src_dir", str(tree), "--dst_dir", str(dst), "--sigma", "1.1").returncode == 0  # same: resumes
    r = _run_tool("--src_dir", str(tree), "--dst_dir", str(dst), "--sigma", "2.0", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads((dst / "blur_spec.json").read_text())["sigma"] == 2.0
    assert any((dst / p).read_bytes() != data for p, data in images_before.items())
