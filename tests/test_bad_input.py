"""Bad input never crashes, never misleads, never destroys.

One test per class of fault, each asserting the exit status, the single error line and, where files are
written, exactly what was written and what was left untouched:
- unreadable images under `--bad_image skip` are dropped (never replaced by another image), counted and listed;
- data-folder hazards (a FIFO, a symlink cycle, a decompression bomb) are handled by the one listing/reading path;
- tools that read images (explain.py, visualize_mae.py) have --bad_image too; a missing explanation layer
  and label-file paths that leave the data root are one line naming the flag or the file and line.
Writes, wrong checkpoints and failed starts are in tests/test_bad_output.py.
Everything runs in-process on 32-px images and a micro ViT, except the FIFO case (a subprocess with a timeout,
so a regression fails the test instead of hanging the suite).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_finetune
import main_pretrain
from bad_input_helpers import VIT, bomb_png, expect_exit_2, run_cli, truncated_png
from util.synthetic import write_dataset

from conftest import REPO, child_env

# ------------------------------------------------------------------------------ --bad_image skip drops
def test_predict_skip_drops_bad_files_and_lists_them(bad_finetuned, bad_us_tree, tmp_path, medfound_log, capsys):
    folder = tmp_path / "to_predict"
    folder.mkdir()
    good = sorted((bad_us_tree / "test" / "class_1").iterdir())[:3]
    for p in good:
        shutil.copy(p, folder / p.name)
    truncated_png(folder / "zz_truncated.png")
    (folder / "aa_text.png").write_text("not an image")
    out = tmp_path / "pred"
    argv = ["--predict", str(folder), "--resume", str(bad_finetuned), "--output_dir", str(out), "--num_workers", "0",
            "--device", "cpu"]
    line = expect_exit_2(main_finetune, argv, capsys)  # default: the first bad file is an error naming it
    assert "aa_text.png" in line and "--bad_image skip" in line
    assert not (out / "predictions.csv").exists()
    run_cli(main_finetune, argv + ["--bad_image", "skip"])
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in good)  # each once, no substitute
    skipped = (out / "skipped_images.txt").read_text().split("\n")
    assert sorted(Path(s).name for s in skipped if s) == ["aa_text.png", "zz_truncated.png"]
    assert "2 unreadable image(s) skipped" in medfound_log.text
    assert len(good) >= 2 and f"images: {len(good)} from" in capsys.readouterr().out  # only what was read


def test_eval_skip_counts_only_images_read(bad_finetuned, bad_us_tree, tmp_path, medfound_log):
    data = tmp_path / "data"
    shutil.copytree(bad_us_tree, data)
    bad = data / "test" / "class_0" / "broken.png"
    truncated_png(bad)
    n_test = sum(1 for p in (data / "test").rglob("*.png"))
    out = tmp_path / "eval"
    run_cli(main_finetune, ["--eval", "--resume", str(bad_finetuned), "--data_path", str(data), "--output_dir", str(out),
                            "--num_workers", "0", "--device", "cpu", "--bootstrap", "0", "--bad_image", "skip"])
    metrics = json.loads((out / "eval_test_metrics.json").read_text())
    assert metrics["n"] == n_test - 1
    assert metrics["skipped_images"] == [str(bad)]


def test_pretraining_skip_drops_and_counts(bad_us_tree, tmp_path, medfound_log):
    data = tmp_path / "data"
    shutil.copytree(bad_us_tree / "train", data)
    truncated_png(data / "class_0" / "broken.png")
    n = sum(1 for _ in data.rglob("*.png"))
    batch = next(b for b in range(5, 1, -1) if n % b == 0)  # drop_last leaves no sample unread
    out = tmp_path / "pt"
    run_cli(main_pretrain, ["--model", "mae_vit_micro_patch8", "--input_size", "32", "--data_path", str(data),
                            "--epochs", "1", "--batch_size", str(batch), "--num_workers", "0", "--device", "cpu",
                            "--output_dir", str(out), "--print_freq", "100", "--vis_images", str(n),
                            "--bad_image", "skip"])  # the figure's images include the bad one: left out too
    assert f"1 unreadable image(s) skipped: {data / 'class_0' / 'broken.png'}" in medfound_log.text
    assert "substitut" not in medfound_log.text
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["train_skipped_images"] == 1


# ------------------------------------------------------------------------------ data-folder hazards
def test_listing_skips_fifos_and_follows_no_symlink_cycle(bad_us_tree, tmp_path, medfound_log):
    from util.data import list_images
    root = tmp_path / "imgs"
    shutil.copytree(bad_us_tree / "train", root)
    n = sum(1 for _ in root.rglob("*.png"))
    os.mkfifo(root / "pipe.png")
    os.symlink("..", root / "class_0" / "loop")
    files = list_images(str(root))
    assert len(files) == n and len(set(map(os.path.realpath, files))) == n
    assert "pipe.png" in medfound_log.text  # the non-regular file is named in the log


def test_fifo_in_training_folder_does_not_hang(bad_us_tree, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(bad_us_tree / "train", data)
    os.mkfifo(data / "class_0" / "pipe.png")
    proc = subprocess.run([sys.executable, str(REPO / "main_pretrain.py"), "--model", "mae_vit_micro_patch8",
                           "--input_size", "32", "--data_path", str(data), "--epochs", "1", "--batch_size", "8",
                           "--num_workers", "0", "--device", "cpu", "--output_dir", str(tmp_path / "out"),
                           "--print_freq", "100", "--vis_images", "0"],
                          capture_output=True, text=True, timeout=240, env=child_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pipe.png" in proc.stdout + proc.stderr


def test_decompression_bomb_is_a_bad_image(bad_finetuned, bad_us_tree, tmp_path, capsys):
    folder = tmp_path / "to_predict"
    folder.mkdir()
    shutil.copy(next((bad_us_tree / "test" / "class_0").iterdir()), folder / "ok.png")
    bomb_png(folder / "bomb.png")
    out = tmp_path / "pred"
    argv = ["--predict", str(folder), "--resume", str(bad_finetuned), "--output_dir", str(out), "--num_workers", "0",
            "--device", "cpu"]
    line = expect_exit_2(main_finetune, argv, capsys)
    assert "bomb.png" in line
    run_cli(main_finetune, argv + ["--bad_image", "skip"])
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [Path(r["path"]).name for r in rows] == ["ok.png"]


# ------------------------------------------------------------------------------ tools and label files
def test_missing_explanation_layer_is_one_line(bad_finetuned, bad_us_tree, tmp_path, capsys):
    import explain
    img = next((bad_us_tree / "test" / "class_0").iterdir())
    line = expect_exit_2(explain, ["--checkpoint", str(bad_finetuned), "--method", "gradcam", "--target_layer",
                                   "blocks.99.norm1", "--output_dir", str(tmp_path / "x"), str(img)], capsys)
    assert "--target_layer" in line and "blocks.99.norm1" in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("tool", ["explain", "visualize_mae"])
def test_tools_that_advise_skip_have_it(tool, bad_finetuned, bad_us_tree, tmp_path, capsys, tiny_pretrain_run):
    module = __import__(tool)
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(next((bad_us_tree / "test" / "class_0").iterdir()), folder / "ok.png")
    truncated_png(folder / "bad.png")
    ckpt = str(bad_finetuned if tool == "explain" else tiny_pretrain_run.checkpoint)
    argv = ["--checkpoint", ckpt, "--output_dir", str(tmp_path / "out"), str(folder)]
    line = expect_exit_2(module, argv, capsys)
    assert "bad.png" in line and "--bad_image skip" in line
    run_cli(module, argv + ["--bad_image", "skip"])
    written = [p.name for p in (tmp_path / "out").rglob("*.png")]
    assert written and not any("bad" in name for name in written)


def test_label_paths_outside_the_data_root_are_refused(tmp_path, capsys):
    root = tmp_path / "vfm"
    write_dataset(root, kind="fundus", layout="vfm", num_classes=2, n_per_class=4, size=32, seed=1)
    label = next(root.rglob("training_labels.txt"))
    secret = tmp_path / "secret.png"
    Image.new("RGB", (32, 32)).save(secret)
    lines = label.read_text().splitlines()
    lines[0] = f"../../secret.png;{lines[0].rsplit(';', 1)[1]}"
    label.write_text("\n".join(lines) + "\n")
    line = expect_exit_2(main_finetune, ["--model", VIT, "--data_path", str(root), "--output_dir",
                                         str(tmp_path / "out"), "--epochs", "1", "--num_workers", "0",
                                         "--device", "cpu"], capsys)
    assert "training_labels.txt:1" in line and "outside" in line


# ------------------------------------------------------------------------------ one lister, one reader
def test_every_lister_counts_each_file_once(bad_us_tree, tmp_path, medfound_log):
    """util.data.list_images, the image cache builder and blurred_images.py share one listing: folder
    links are followed once, a link to a listed file is not a second image, a cycle is not followed,
    non-regular files and broken links are left out and named."""
    import blurred_images
    from util.data import list_images
    from util.image_cache_builder import build_image_cache
    root = tmp_path / "imgs"
    shutil.copytree(bad_us_tree / "train", root)
    real = sorted(str(p) for p in root.rglob("*.png"))
    (root / "extra").mkdir()
    shutil.copy(real[0], root / "extra" / "only_here.png")
    os.symlink(root / "extra", root / "class_1" / "extra_link")        # a second path to a listed folder
    os.symlink("..", root / "class_0" / "loop")                          # a cycle
    os.symlink(real[1], root / "class_1" / "dup.png")                    # a second path to a listed file
    os.symlink(tmp_path / "nowhere.png", root / "class_1" / "gone.png")  # a broken link
    os.mkfifo(root / "class_1" / "pipe.png")
    expected = sorted(real + [str(root / "extra" / "only_here.png")])
    assert list_images(str(root)) == expected
    warning = next(r.getMessage() for r in medfound_log.records if "left out" in r.getMessage())
    assert "2 entries" in warning and "gone.png (broken link)" in warning and "pipe.png" in warning
    assert blurred_images.find_images(root) == sorted(os.path.relpath(p, root).replace(os.sep, "/") for p in expected)
    summary = build_image_cache(str(root), str(tmp_path / "cache"), max_side=32)
    assert summary["images"] == len(expected)


def test_reader_refuses_non_regular_files_without_blocking(tmp_path):
    """A FIFO swapped in after listing is refused on the open descriptor (a blocking open would hang)."""
    import signal
    from util.data import load_image
    from util.image_io import BadImageError, image_size
    fifo = tmp_path / "swapped.png"
    os.mkfifo(fifo)
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("reading a FIFO blocked"))
    signal.alarm(10)
    try:
        for read in (load_image, image_size):
            with pytest.raises(BadImageError, match="swapped.png.*not a regular file: a FIFO"):
                read(str(fifo))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_tools_refuse_a_fifo_named_as_input(tmp_path):
    from util.cli import UserError
    from util.vis import collect_images
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(UserError, match="pipe.png: not a regular file"):
        collect_images([str(tmp_path / "pipe.png")])


def test_oversize_header_is_refused_before_torchvision_decodes(tmp_path, monkeypatch):
    """The torchvision JPEG path reads the header first: more pixels than Pillow's limit is a bad image
    (skipped under skip), never handed to a decoder that would allocate it."""
    from PIL import Image as PILImage
    import util.data as data_mod
    from util.data import PretrainDataset, PretrainTransform
    from util.skipping import SkippedSample
    from util.image_io import BadImageError
    path = tmp_path / "big.jpg"
    Image.new("RGB", (64, 48), (90, 20, 200)).save(path)
    decoded = []
    real = data_mod.torchvision_jpeg_decoder()
    monkeypatch.setattr(data_mod, "_TORCHVISION_DECODE", lambda p: decoded.append(p) or real(p))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses above twice this
    tf = PretrainTransform(32, [0.5] * 3, [0.5] * 3, output="uint8")
    with pytest.raises(BadImageError, match=r"image too large: 64 x 48 pixels"):
        PretrainDataset([str(path)], tf, decoder="torchvision", bad_image="error")[0]
    marker = PretrainDataset([str(path)], tf, decoder="torchvision", bad_image="skip")[0]
    assert isinstance(marker, SkippedSample) and marker.path == str(path)
    assert decoded == []


# ------------------------------------------------------------------------------ the skipping loader
def test_skipping_loader_drops_lists_and_refuses_empty_batches_when_strict(bad_us_tree, tmp_path):
    """Skipped paths come back from DataLoader workers; an all-bad batch is dropped in one process and an
    error naming the files where ranks must stay in step (strict); tools without --bad_image do not
    advise it."""
    from torch.utils.data import DataLoader
    from util.cli import UserError
    from util.skipping import SkipCollate, SkippingLoader
    from util.datasets import LabelledImageDataset
    from util.image_io import BadImageError
    good = sorted(str(p) for p in (bad_us_tree / "train").rglob("*.png"))[:4]
    bad = [tmp_path / "b0.png", tmp_path / "b1.png"]
    for p in bad:
        truncated_png(p)
    files = good[:2] + [str(p) for p in bad] + good[2:]
    ds = LabelledImageDataset([(f, 0) for f in files], None, ["a", "b"], bad_image="skip")
    to_tensor = lambda img: torch.from_numpy(np.asarray(img.resize((8, 8))).copy())  # noqa: E731
    ds.transform = to_tensor
    loader = SkippingLoader(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=SkipCollate()))
    batches = list(loader)
    assert len(loader) == 3 and len(batches) == 2  # the all-bad middle batch is dropped
    assert [i for b in batches for i in b[2].tolist()] == [0, 1, 4, 5]
    assert loader.skipped == [str(p) for p in bad] and loader.epoch_skipped == [str(p) for p in bad]
    strict = SkippingLoader(DataLoader(ds, batch_size=2, collate_fn=SkipCollate()), strict=True)
    with pytest.raises(UserError, match="every image of a batch is unreadable.*b0.png, .*b1.png"):
        list(strict)
    plain = LabelledImageDataset([(str(bad[0]), 0)], None, ["a", "b"])  # a tool without --bad_image
    with pytest.raises(BadImageError) as e:
        plain[0]
    assert "b0.png" in str(e.value) and "--bad_image" not in str(e.value)


def test_absolute_label_paths_stay_accepted(tmp_path):
    from util.label_layouts import parse_label_file
    img = tmp_path / "elsewhere" / "x.png"
    img.parent.mkdir()
    Image.new("RGB", (8, 8)).save(img)
    label = tmp_path / "data" / "training_labels.txt"
    label.parent.mkdir()
    label.write_text(f"{img};1\n")
    assert [r.image for r in parse_label_file(str(label))] == [str(img)]
