"""Pre-decoded image cache (reader util/image_cache.py, builder util/image_cache_builder.py, build_image_cache.py):
pixels, layout, virtual paths, worker pickling, bad images, corrupt caches, crash safety, staleness and the CLI. Tiny images, max_side 64."""
from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conftest import child_env, describe, run_cmd, run_inprocess  # noqa: E402
from util import image_cache as ic  # noqa: E402
from util import image_cache_builder as icb  # noqa: E402
from util.cli import UserError  # noqa: E402
from util.data import load_image  # noqa: E402
from util.image_io import BadImageError  # noqa: E402

MAX_SIDE = 64


def _smooth(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """Smooth (low-frequency) content, like a photo, so JPEG draft decoding is comparable to a full decode."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(channels):
        fx, fy, ph = rng.uniform(1, 3, 3)
        out.append(127 + 60 * np.sin(2 * np.pi * (fx * x + ph)) * np.cos(2 * np.pi * fy * y) + 40 * (x - y))
    return np.clip(np.stack(out, -1), 0, 255).astype(np.uint8)


# relpath -> (size (w, h), kind). Larger and smaller than MAX_SIDE, portrait/landscape, every mode we convert.
SOURCES = {
    "top.png": ((100, 40), "RGB"),
    "train/class_a/a1.jpg": ((300, 200), "RGB"),
    "train/class_a/a2.png": ((50, 30), "RGBA"),
    "train/class_b/b1.jpg": ((150, 260), "L"),
    "train/class_b/sub/b2.png": ((80, 120), "I;16"),
    "train/class_b/sub/b3.jpeg": ((130, 97), "CMYK"),
    "val/v1.png": ((64, 64), "L"),
    "val/v2.bmp": ((90, 70), "P"),
}


def _write_source(path: Path, size: tuple[int, int], kind: str, seed: int) -> None:
    w, h = size
    rgb = _smooth(h, w, seed)
    if kind == "RGB":
        img = Image.fromarray(rgb)
    elif kind == "RGBA":
        img = Image.fromarray(np.dstack([rgb, np.full((h, w), 200, np.uint8)]), "RGBA")
    elif kind == "L":
        img = Image.fromarray(rgb[..., 0])
    elif kind == "I;16":
        img = Image.fromarray(rgb[..., 1].astype(np.uint16) * 257)
    elif kind == "CMYK":
        img = Image.fromarray(rgb).convert("CMYK")
    else:
        img = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=32)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95) if path.suffix in (".jpg", ".jpeg") else img.save(path)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for k, (rel, (size, kind)) in enumerate(SOURCES.items()):
        _write_source(root / rel, size, kind, k)
    return root


@pytest.fixture
def cache_dir(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    summary = icb.build_image_cache(str(source), str(out), max_side=MAX_SIDE)
    assert summary["images"] == len(SOURCES) and summary["skipped"] == []
    return out


def _expected(path: Path) -> np.ndarray:
    """load_image + the documented full-decode resize."""
    img = load_image(str(path))
    size = icb.scaled_size(*img.size, MAX_SIDE)
    return np.asarray(img if size == img.size else img.resize(size, Image.BICUBIC, reducing_gap=None))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def test_round_trip_pixels_and_sizes(source: Path, cache_dir: Path) -> None:
    cache = ic.ImageCache(str(cache_dir))
    assert cache.relpaths == sorted(SOURCES) and len(cache) == len(SOURCES)
    assert cache.max_side == MAX_SIDE and cache.source_root == str(source)
    for rel, ((w0, h0), kind) in SOURCES.items():
        arr = cache.read(cache.index_of(rel))
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and not arr.flags.writeable
        h, w = arr.shape[:2]
        assert max(w, h) == min(MAX_SIDE, max(w0, h0))
        assert (w, h) == icb.scaled_size(w0, h0, MAX_SIDE) and abs(w / h - w0 / h0) < 0.05
        want = _expected(source / rel)
        assert want.shape == arr.shape
        if rel.endswith((".jpg", ".jpeg")) and max(w0, h0) > MAX_SIDE:
            assert _psnr(arr, want) > 45, (rel, _psnr(arr, want))  # draft decoding vs full decode + resize
        else:
            np.testing.assert_array_equal(arr, want, err_msg=rel)
    np.testing.assert_array_equal(np.asarray(cache.image(0)), cache.read(0))
    with pytest.raises(KeyError, match="not in the image cache"):
        cache.index_of("nope.png")


def test_index_file_layout(source: Path, cache_dir: Path) -> None:
    index = json.loads((cache_dir / ic.CACHE_INDEX).read_text())
    assert index["format"] == "medfound-image-cache" and index["version"] == 1 and index["max_side"] == MAX_SIDE
    assert index["source_root"] == str(source) and index["created"]
    entries = index["entries"]
    assert [e["path"] for e in entries] == sorted(SOURCES)
    assert index["total_bytes"] == (cache_dir / ic.DATA_FILE).stat().st_size == sum(e["h"] * e["w"] * 3 for e in entries)
    e = entries[0]
    st = (source / e["path"]).stat()
    assert set(e) == {"path", "offset", "h", "w", "src_bytes", "src_mtime"}
    assert e["src_bytes"] == st.st_size and e["src_mtime"] == st.st_mtime
    # The source's sub-folders exist (empty) in the cache, so layout checks see the same tree.
    assert (cache_dir / "train" / "class_b" / "sub").is_dir() and (cache_dir / "val").is_dir()


def test_lookup_and_list_cached(source: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ic.clear_lookup_cache()
    virtual = [os.path.join(str(cache_dir), r) for r in sorted(SOURCES)]
    assert ic.list_cached(str(cache_dir)) == virtual
    train = os.path.join(str(cache_dir), "train")
    assert ic.list_cached(train) == [v for v in virtual if v.startswith(train + os.sep)]
    assert ic.list_cached(os.path.join(train, "class_b"), recursive=False) == [
        os.path.join(train, "class_b", "b1.jpg")]
    assert ic.list_cached(str(source)) is None and ic.list_cached(str(source / "train")) is None
    assert ic.is_image_cache(str(cache_dir)) and not ic.is_image_cache(train) and not ic.is_image_cache(str(source))

    hit = ic.lookup(os.path.join(train, "class_b", "sub", "b3.jpeg"))
    assert hit is not None
    cache, i = hit
    assert cache.relpaths[i] == "train/class_b/sub/b3.jpeg"
    assert ic.lookup(virtual[0])[0] is cache  # one ImageCache per cache folder per process
    assert ic.lookup(str(source / "top.png")) is None
    with pytest.raises(UserError, match="missing.png: not in the image cache"):
        ic.lookup(os.path.join(train, "missing.png"))

    # Relative roots give paths relative the same way util.data.list_images would.
    monkeypatch.chdir(cache_dir.parent)
    assert ic.list_cached(os.path.join("cache", "val")) == [os.path.join("cache", "val", "v1.png"),
                                                              os.path.join("cache", "val", "v2.bmp")]
    assert ic.lookup(os.path.join("cache", "val", "v2.bmp"))[1] == cache.index_of("val/v2.bmp")


class _CacheDataset:
    def __init__(self, cache: ic.ImageCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.array(self.cache.read(i))


def test_pickled_cache_in_dataloader_workers(cache_dir: Path) -> None:
    import torch
    cache = ic.ImageCache(str(cache_dir))
    want = [np.array(cache.read(i)) for i in range(len(cache))]  # maps the file in this process
    blob = pickle.dumps(cache)
    assert len(blob) < 8192  # no pixels and no memory map travel to the workers
    clone = pickle.loads(blob)
    assert clone._flat is None and clone.relpaths == cache.relpaths
    assert clone.index_of("val/v1.png") == cache.index_of("val/v1.png")
    loader = torch.utils.data.DataLoader(_CacheDataset(clone), batch_size=None, num_workers=2)
    got = [t.numpy() for t in loader]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_workers_give_identical_cache(source: Path, cache_dir: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative folders, as users type them
    summary = icb.build_image_cache("src", "cache2", max_side=MAX_SIDE, workers=2)
    out = tmp_path / "cache2"
    assert summary["workers"] == 2 and summary["images"] == len(SOURCES) and summary["output"] == str(out)
    assert (out / ic.DATA_FILE).read_bytes() == (cache_dir / ic.DATA_FILE).read_bytes()
    assert ic.ImageCache("cache2").source_root == str(source)

    subset = icb.build_image_cache("src", "subset", max_side=MAX_SIDE, files=[os.path.join("src", "val", "v1.png")])
    assert subset["images"] == 1 and ic.ImageCache("subset").relpaths == ["val/v1.png"]
    with pytest.raises(UserError, match="not inside"):
        icb.build_image_cache(os.path.join("src", "val"), "subset2", max_side=MAX_SIDE, files=["src/top.png"])


def _add_bad_images(root: Path) -> None:
    (root / "train" / "class_a" / "broken.jpg").write_bytes(b"this is not an image")
    # Valid header, missing data: fails only when decoded (pass 2), leaving a hole that is compacted.
    good = (root / "train" / "class_a" / "a1.jpg").read_bytes()
    (root / "train" / "class_a" / "a15_truncated.jpg").write_bytes(good[: len(good) // 3])


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(out.name + ".")]


def test_bad_image_error_and_skip(source: Path, tmp_path: Path, medfound_log) -> None:
    _add_bad_images(source)
    out = tmp_path / "bad"
    with pytest.raises(BadImageError, match="broken.jpg: cannot read image"):
        icb.build_image_cache(str(source), str(out), max_side=MAX_SIDE, bad_image="error")
    _no_leftovers(out)

    seen: list[tuple[int, int]] = []
    summary = icb.build_image_cache(str(source), str(out), max_side=MAX_SIDE, bad_image="skip",
                                   progress=lambda d, t: seen.append((d, t)))
    bad = ["train/class_a/a15_truncated.jpg", "train/class_a/broken.jpg"]
    assert summary["skipped"] == bad and set(summary["errors"]) == set(bad)
    assert summary["images"] == len(SOURCES) and seen[-1][0] == seen[-1][1]
    warned = {r.getMessage() for r in medfound_log.records if "skipping bad image" in r.getMessage()}
    assert len(warned) == 2 and all(any(b in w for w in warned) for b in ("broken.jpg", "a15_truncated.jpg"))
    cache = ic.ImageCache(str(out))
    assert cache.relpaths == sorted(SOURCES) and cache.skipped == bad
    for rel in SOURCES:  # every image after the compacted hole still reads back right
        want = _expected(source / rel)
        got = cache.read(cache.index_of(rel))
        assert got.shape == want.shape and _psnr(got, want) > 30, rel
    assert cache.new_sources() == []  # skipped files are not reported as new


def test_broken_caches_give_one_line_errors(cache_dir: Path) -> None:
    data = cache_dir / ic.DATA_FILE
    full = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(full - 10)
    with pytest.raises(UserError) as e:
        ic.ImageCache(str(cache_dir))
    msg = str(e.value)
    assert f"truncated cache ({full - 10} of {full} bytes)" in msg and "build_image_cache.py" in msg
    assert str(data) in msg and "\n" not in msg

    (cache_dir / ic.CACHE_INDEX).write_text('{"format": "medfound-image-cache", "version": 1, "entr')
    with pytest.raises(UserError) as e:
        ic.ImageCache(str(cache_dir))
    assert "corrupt cache index" in str(e.value) and ic.CACHE_INDEX in str(e.value) and "\n" not in str(e.value)

    (cache_dir / ic.CACHE_INDEX).write_text('{"format": "something-else"}')
    with pytest.raises(UserError, match="not a medfound image cache index"):
        ic.ImageCache(str(cache_dir))
    with pytest.raises(UserError, match="not an image cache"):
        ic.ImageCache(str(cache_dir / "train"))


def test_refuses_to_overwrite(source: Path, cache_dir: Path, tmp_path: Path) -> None:
    before = (cache_dir / ic.DATA_FILE).read_bytes()
    with pytest.raises(UserError, match="--overwrite"):
        icb.build_image_cache(str(source), str(cache_dir), max_side=MAX_SIDE)
    icb.build_image_cache(str(source), str(cache_dir), max_side=32, overwrite=True)
    assert ic.ImageCache(str(cache_dir)).max_side == 32 and (cache_dir / ic.DATA_FILE).read_bytes() != before
    _no_leftovers(tmp_path / "nothing")  # no .old-/.tmp- siblings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "src"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an image cache"):
        icb.build_image_cache(str(source), str(other), max_side=MAX_SIDE, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="is an image cache"):
        icb.build_image_cache(str(cache_dir / "train"), str(tmp_path / "again"), max_side=MAX_SIDE)


def test_crash_mid_build_leaves_nothing(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = icb._write_pixels
    calls = []

    def flaky(fd: int, offset: int, pixels: np.ndarray) -> None:
        calls.append(offset)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        real(fd, offset, pixels)

    monkeypatch.setattr(icb, "_write_pixels", flaky)
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="disk on fire"):
        icb.build_image_cache(str(source), str(out), max_side=MAX_SIDE)
    _no_leftovers(out)

    # A failed rebuild leaves the existing cache untouched.
    monkeypatch.setattr(icb, "_write_pixels", real)
    icb.build_image_cache(str(source), str(out), max_side=MAX_SIDE)
    before = (out / ic.DATA_FILE).read_bytes()
    calls.clear()
    monkeypatch.setattr(icb, "_write_pixels", flaky)
    with pytest.raises(RuntimeError):
        icb.build_image_cache(str(source), str(out), max_side=32, overwrite=True)
    assert (out / ic.DATA_FILE).read_bytes() == before and ic.ImageCache(str(out)).max_side == MAX_SIDE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crash", "src"]


def test_stale_entries(source: Path, cache_dir: Path) -> None:
    cache = ic.ImageCache(str(cache_dir))
    assert cache.stale_entries() == [] and cache.new_sources() == []
    st = (source / "top.png").stat()
    os.utime(source / "top.png", (st.st_atime, st.st_mtime + 10))  # touched
    _write_source(source / "val" / "v1.png", (20, 20), "L", 99)  # rewritten
    (source / "train" / "class_a" / "a2.png").unlink()  # gone
    _write_source(source / "val" / "v9.png", (20, 20), "L", 98)  # new
    stale = ["top.png", "train/class_a/a2.png", "val/v1.png"]
    assert cache.stale_entries() == stale
    assert cache.stale_entries(limit=1) == stale[:1]
    assert cache.new_sources() == ["val/v9.png"]


def test_cli(source: Path, tmp_path: Path) -> None:
    import build_image_cache as tool
    out = tmp_path / "cli_cache"
    proc = run_cmd([sys.executable, "build_image_cache.py", "--data_path", source, "--output", out,
                    "--max_side", MAX_SIDE, "--num_workers", 1], timeout=120, env=child_env())
    assert proc.returncode == 0, describe(proc)
    summary = json.loads((out / ic.SUMMARY_FILE).read_text())
    assert summary["images"] == len(SOURCES) and summary["skipped"] == [] and summary["images_per_s"] > 0
    assert "images/s" in proc.stdout and "main_pretrain.py --data_path" in proc.stdout
    assert ic.ImageCache(str(out)).relpaths == sorted(SOURCES)

    # --verify, in-process to save a start-up: clean, then stale after a touch.
    assert tool.run_main(tool.main, tool.build_parser(), ["--output", str(out), "--verify"]) == 0
    st = (source / "top.png").stat()
    os.utime(source / "top.png", (st.st_atime, st.st_mtime + 5))
    assert tool.run_main(tool.main, tool.build_parser(), ["--output", str(out), "--verify"]) == 1

    bad = run_inprocess("build_image_cache.py", ["--data_path", tmp_path / "missing", "--output", tmp_path / "x"])
    assert bad.returncode == 2, describe(bad)
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("build_image_cache.py: error: --data_path")
    assert "Traceback" not in bad.stderr and not (tmp_path / "x").exists()
