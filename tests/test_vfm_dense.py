"""VisionFM's dense decoder commands (evaluation/train_seg_decoder.py, evaluation/train_landmark_decoder.py,
main_vfm_features.py --mode seg) on a tiny frozen ViT and synthetic fundus data at 64 px: they run as
VisionFM's README writes them, learn more than a trivial baseline, reproduce their metrics with
`--load_from --test`, and refuse bad flags in one line before creating anything."""
from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_inprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
ENCODER = ["--arch", "vit_tiny", "--patch_size", "16", "--input_size", str(SIZE), "--device", "cpu",
           "--num_workers", "0"]


def _script(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"vfm_dense_{name}", os.path.join(REPO, "evaluation", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, script), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="session")
def encoder_file(tmp_path_factory) -> str:
    """A frozen 12-block ViT-Ti/16 (blocks 3, 5, 7, 11 feed the heads), saved as VisionFM's Fundus weights."""
    import models_vit  # noqa: F401  (registers the factories)
    from util.registry import create_model
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("enc") / "VFM_Fundus_weights.pth")
    torch.save({"teacher": create_model("vit_tiny_patch16", img_size=SIZE, num_classes=0, pool="cls").state_dict()},
               path)
    return path


@pytest.fixture(scope="session")
def seg_root(tmp_path_factory) -> str:
    """random_data.py's segmentation task (0 background, 1 exudate, 2 haemorrhage), 48 images per split."""
    from util.synthetic_vfm import write_vfm_task
    root = str(tmp_path_factory.mktemp("seg"))
    write_vfm_task(root, "segmentation", num=48, img_size=SIZE, seed=3)
    return os.path.join(root, "VesselSegmentation")


@pytest.fixture(scope="session")
def binary_root(seg_root, tmp_path_factory) -> str:
    """The same images with one foreground class (any lesion): masks 0/1 for --num_labels 1."""
    import shutil
    root = str(tmp_path_factory.mktemp("bin"))
    shutil.copytree(seg_root, root, dirs_exist_ok=True)
    for f in glob.glob(os.path.join(root, "*", "*", "labels", "*.png")):
        Image.fromarray((np.asarray(Image.open(f)) > 0).astype(np.uint8), "L").save(f)
    return root


@pytest.fixture(scope="session")
def landmark_root(tmp_path_factory) -> str:
    from util.synthetic_vfm import write_vfm_task
    root = str(tmp_path_factory.mktemp("lm"))
    write_vfm_task(root, "landmark", num=48, img_size=SIZE, seed=5)
    return os.path.join(root, "LandmarkDetection")


def _masks(root: str, split: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(f)) for f in sorted(glob.glob(os.path.join(root, "*", split, "labels",
                                                                                      "*.png")))])


def _background_baseline(true: np.ndarray, classes: int) -> dict:
    from util.metric_dense import segmentation_report
    return segmentation_report(np.zeros_like(true), true, [str(c) for c in range(classes)], n_boot=0)


# ------------------------------------------------------------------------------------------ segmentation
def test_seg_command_multiclass_beats_background_and_test_reproduces(tmp_path, encoder_file, seg_root):
    common = ["--name", "single_seg_debug", "--pretrained_weights", encoder_file, "--input_size", str(SIZE),
              "--modality", "Fundus", "--num_labels", "3", "--output_dir", str(tmp_path / "results"),
              "--data_path", seg_root, "--batch_size_per_gpu", "8", *ENCODER, "--n_boot", "50"]
    mod = _script("train_seg_decoder")
    mod.run_main(mod.main, mod.get_args_parser(), [*common, "--epochs", "20", "--lr", "1e-2", "--lr_schedule", "cosine",
                                                   "--val_freq", "6"])
    out = tmp_path / "results" / "single_seg_debug"
    saved = json.loads((out / "test_metrics.json").read_text())
    base = _background_baseline(_masks(seg_root, "test"), 3)
    assert saved["mIoU"] > base["mIoU"] + 0.1 and saved["mDice"] > base["mDice"] + 0.1, (saved["mIoU"], base["mIoU"])
    assert saved["n"] == 48 and saved["class_names"] == ["background", "class_1", "class_2"]
    lo, hi = saved["mDice_ci"]
    assert lo <= saved["mDice"] <= hi
    table = (out / "test_table.md").read_text()
    assert table.startswith("| Class | IoU | Acc | Dice |") and "mDice 95% CI" in table
    for f in ("test_overlays.png", "log.txt", "config.json", "test_metrics.csv"):
        assert (out / f).is_file(), f
    assert glob.glob(str(out / "tensorboard" / "events.*"))
    lines = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert lines[5]["test_mDice"] is not None and "train_loss" in lines[0]
    ckpt = torch.load(out / "checkpoint_teacher_linear.pth", weights_only=True)
    assert {"epoch", "state_dict", "optimizer", "best_dice", "args"} <= set(ckpt)
    assert "module.d1.deconv.weight" in ckpt["state_dict"] and "module.cls.weight" in ckpt["state_dict"]
    assert ckpt["state_dict"]["module.cls.weight"].shape[0] == 3 and ckpt["epoch"] == 20
    r = run_inprocess("evaluation/train_seg_decoder.py", [*common, "--load_from",
                                                         str(out / "checkpoint_teacher_linear.pth"), "--test"])
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((out / "test_metrics.json").read_text())
    assert again.pop("reproduces_saved_metrics") is True
    assert again == saved


def test_seg_binary_one_logit_and_cosine_schedule(tmp_path, encoder_file, binary_root):
    mod = _script("train_seg_decoder")
    m = mod.run_main(mod.main, mod.get_args_parser(), [
        "--name", "bin", "--pretrained_weights", encoder_file, "--num_labels", "1", "--output_dir", str(tmp_path),
        "--data_path", binary_root, "--batch_size_per_gpu", "8", *ENCODER, "--epochs", "20", "--lr", "1e-2",
        "--lr_schedule", "cosine", "--loss", "dice_ce", "--n_boot", "0", "--class_names", "lesion"])
    base = _background_baseline(_masks(binary_root, "test"), 2)
    assert m["class_names"] == ["background", "lesion"] and m["num_labels"] == 1
    assert m["vfm_dice"] == m["image_mean_dice_fg"] and m["dice_per_class"][1] > 0.2, m["dice_per_class"]
    assert m["mIoU"] > base["mIoU"] + 0.1
    ckpt = torch.load(tmp_path / "bin" / "checkpoint_teacher_linear.pth", weights_only=True)
    assert ckpt["state_dict"]["module.cls.weight"].shape[0] == 1 and ckpt["args"]["lr_schedule"] == "cosine"
    lrs = [json.loads(x)["train_lr"] for x in (tmp_path / "bin" / "log.txt").read_text().splitlines()
           if "train_lr" in x]
    assert lrs[-1] < 0.2 * lrs[0]  # cosine decays; VisionFM's constant default would not


# ------------------------------------------------------------------------------------------ landmarks
def test_landmark_command_beats_mean_position_and_warns_of_modality(tmp_path, encoder_file, landmark_root,
                                                                    medfound_log):
    """VisionFM's README passes Fundus weights with the landmark script's default --modality UBM: one warning."""
    mod = _script("train_landmark_decoder")
    common = ["--name", "train_landmark", "--pretrained_weights", encoder_file, "--output_dir", str(tmp_path),
              "--data_path", landmark_root, "--batch_size_per_gpu", "8", *ENCODER, "--n_boot", "0",
              "--pixel_spacing", "0.05", "--class_names", "disc", "fovea", "centre"]
    m = mod.run_main(mod.main, mod.get_args_parser(), [*common, "--epochs", "12", "--lr", "1e-2"])
    warned = [r.getMessage() for r in medfound_log.records if r.levelno == logging.WARNING]
    assert any("--modality UBM" in w and "Fundus encoder" in w for w in warned), warned
    from util.landmarks import list_landmark_items
    train = np.stack([p for _, p in list_landmark_items(landmark_root, "train")])  # images are SIZE px already
    test = np.stack([p for _, p in list_landmark_items(landmark_root, "test")])
    baseline = float(np.linalg.norm(test - train.mean(0), axis=-1).mean())
    assert m["mre_px"] < 0.8 * baseline, (m["mre_px"], baseline)
    assert m["original"]["mre_mm"] == pytest.approx(0.05 * m["original"]["mre_px"])
    out = tmp_path / "train_landmark"
    assert "| Landmark |" in (out / "test_table.md").read_text() and (out / "test_overlays.png").is_file()
    ckpt = torch.load(out / "checkpoint_teacher_linear.pth", weights_only=True)
    assert {"best_mre", "state_dict"} <= set(ckpt) and ckpt["state_dict"]["module.cls.weight"].shape[0] == 3
    saved = json.loads((out / "test_metrics.json").read_text())
    again = mod.run_main(mod.main, mod.get_args_parser(),
                         [*common, "--load_from", str(out / "checkpoint_teacher_linear.pth"), "--test"])
    assert again.pop("reproduces_saved_metrics") is True
    assert json.loads(json.dumps(again)) == saved


# ------------------------------------------------------------------------------------ feature sets (seg)
def test_seg_feature_set_trains_the_linear_head(tmp_path, encoder_file, binary_root):
    from util.cli import run_main
    import main_vfm_dense
    import main_vfm_features
    feats = tmp_path / "feats" / "FunSegFeat"
    run_main(main_vfm_features.main, main_vfm_features.get_args_parser(), [
        "--mode", "seg", "--pretrained_weights", encoder_file, "--data_path", binary_root, "--dst_root", str(feats),
        "--epochs", "2", "--batch_size_per_gpu", "16", *ENCODER])
    from util.feature_store import read_features
    tr = read_features(str(feats), "train")
    assert tuple(tr.features.shape) == (96, 4, 192, 4, 4) and tr.features.dtype == torch.float16
    assert tuple(tr.labels.shape) == (96, SIZE, SIZE) and tr.meta["num_labels"] == 1
    assert tr.meta["block_indices"] == [3, 5, 7, 11]
    m = run_main(main_vfm_dense.main, main_vfm_dense.get_args_parser(), [
        "--data_path", str(tmp_path / "feats"), "--datasets", "FunSegFeat", "--output_dir", str(tmp_path / "lin"),
        "--epochs", "20", "--lr", "1e-2", "--batch_size_per_gpu", "32", "--device", "cpu", "--n_boot", "0"])
    ckpt = torch.load(tmp_path / "lin" / "checkpoint_teacher_linear.pth", weights_only=True)
    assert set(ckpt["state_dict"]) == {"module.cls.weight", "module.cls.bias"}
    assert ckpt["state_dict"]["module.cls.weight"].shape == (1, 4 * 192, 1, 1)
    assert m["n"] == 48 and m["num_labels"] == 1 and 0.0 <= m["mIoU"] <= 1.0


# ------------------------------------------------------------------------------------------- bad flags
@pytest.mark.parametrize("case", ["missing_weights", "whitespace", "patch_grid", "labels", "test_alone", "unetr_p8",
                                  "flip_pairs"])
def test_bad_flags_are_one_line_and_leave_nothing(case, tmp_path, encoder_file, seg_root, capsys):
    import main_vfm_dense
    from util.cli import run_main
    out = tmp_path / "o"
    argv = ["--pretrained_weights", encoder_file, "--data_path", seg_root, "--num_labels", "3", *ENCODER,
            "--output_dir", str(out), "--name", "run", "--epochs", "1"]
    extra, needle = {
        "missing_weights": (["--pretrained_weights", str(tmp_path / "nope.pth")], "--pretrained_weights"),
        "whitespace": (["--modality", "Fundus", " "], "whitespace"),
        "patch_grid": (["--input_size", "72"], "--input_size 72"),
        "labels": (["--num_labels", "1"], "outside 0..1"),  # masks hold 0, 1, 2
        "test_alone": (["--test"], "--load_from"),
        "unetr_p8": (["--patch_size", "8", "--arch", "vit_tiny"], "--patch_size 16"),
        "flip_pairs": (["--task", "landmark", "--flip_pairs", "0:7"], "--flip_pairs 0:7"),
    }[case]
    with pytest.raises(SystemExit) as e:
        run_main(main_vfm_dense.main, main_vfm_dense.get_args_parser(), [*argv, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()  # a refused start leaves no folder behind


def test_help_is_instant_and_torch_free():
    code = ("import runpy, sys; sys.argv = ['x', '--help']\n"
            "try:\n    runpy.run_path(sys.argv_path, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH')")
    for script in ("evaluation/train_seg_decoder.py", "evaluation/train_landmark_decoder.py", "main_vfm_dense.py"):
        r = subprocess.run([sys.executable, "-c", code.replace("sys.argv_path", repr(os.path.join(REPO, script)))],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "--lr_schedule" in r.stdout and r.stdout.strip().endswith("NO_TORCH"), r.stderr
    r = _run("evaluation/train_landmark_decoder.py", "--help")
    text = " ".join(r.stdout.split())
    assert "(default: 'UBM')" in text and "(default: 224)" in text


def test_main_takes_the_landmark_script_defaults(tmp_path, encoder_file):
    import main_vfm_dense
    from util.cli import parse_args
    argv = ["--task", "landmark", "--data_path", str(tmp_path), "--pretrained_weights", encoder_file, "--arch",
            "vit_tiny", "--output_dir", str(tmp_path / "o")]
    args = parse_args(main_vfm_dense.get_args_parser(), argv)
    main_vfm_dense.resolve_args(args)
    assert (args.input_size, args.modality, args.num_labels, args.batch_size_per_gpu) == (224, "UBM", 3, 32)
    args = parse_args(main_vfm_dense.get_args_parser(), [*argv, "--input_size", "64", "--modality", "Fundus"])
    main_vfm_dense.resolve_args(args)
    assert (args.input_size, args.modality) == (64, "Fundus")
