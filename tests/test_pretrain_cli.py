"""End-to-end tests of the pretraining command line (`main_pretrain.py`).

Covers: seed command lines accepted verbatim (parse-only in-process, plus `--dry_run` subprocesses),
the `--demo` run and its outputs, exact auto-resume, the resume config guard, 2-process torchrun
equivalence with a 1-process run, `torch.distributed.launch`, and one-line errors for bad input.

Subprocess runs use the tiny model `mae_vit_micro_patch8` on 32-px synthetic images (conftest.py).
"""
from __future__ import annotations

import glob
import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import (free_port, max_abs_diff, without_key_bias, TINY_DEBLUR_MODEL, TINY_INPUT, TINY_MODEL, TINY_TRAIN_IMAGES, child_env, describe,
                      run_cmd, run_inprocess, run_pretrain, tiny_pretrain_flags, write_rank_dump_wrapper)

import main_pretrain  # noqa: E402
from util.cli import UserError, parse_args  # noqa: E402

PROG = "main_pretrain.py: error:"


# ------------------------------------------------------------------------------------------ helpers
def parse(argv: list[str]):
    """Parse exactly as `run_main` does (including the LOCAL_RANK environment override)."""
    return parse_args(main_pretrain.get_args_parser(), argv)


def model_state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["model"]






def assert_one_line_error(proc, *needles: str) -> str:
    """Non-zero exit, stderr is exactly one `main_pretrain.py: error: ...` line, no traceback."""
    assert proc.returncode != 0, describe(proc)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, describe(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(PROG), describe(proc)
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in error line: {lines[0]}"
    return lines[0]




def train_images(tree: Path) -> list[Path]:
    return sorted((tree / "train").rglob("*.png"))


@pytest.fixture
def clean_launcher_env(monkeypatch):
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------- 1. seed command lines (parse-only)
USPEC_ARGV = ["--batch_size", "256", "--model", "mae_vit_large_patch16_cross_attention", "--output_dir", "X",
              "--log_dir", "LOG_DIR", "--mask_ratio", "0.75", "--norm_pix_loss", "--epochs", "800",
              "--warmup_epochs", "40", "--blr", "1.5e-4", "--weight_decay", "0.05", "--data_path", "DIR"]


def test_uspec_seed_command_parses(clean_launcher_env):
    a = parse(USPEC_ARGV)
    assert (a.batch_size, a.model, a.output_dir, a.log_dir) == (256, "mae_vit_large_patch16_cross_attention", "X",
                                                                "LOG_DIR")
    assert (a.mask_ratio, a.norm_pix_loss, a.epochs, a.warmup_epochs) == (0.75, True, 800, 40)
    assert (a.blr, a.weight_decay, a.data_path) == (1.5e-4, 0.05, "DIR")


def test_deblurring_seed_commands_parse(clean_launcher_env):
    a = parse(["--model", "dmae_vit_base_patch16", "--output", "OUT", "--data_path_blurred", "B",
               "--data_path_orig", "O", "--batch_size", "32"])
    assert (a.model, a.output_dir, a.data_path_blurred, a.data_path_orig, a.batch_size) == (
        "dmae_vit_base_patch16", "OUT", "B", "O", 32)
    a = parse(["--model", "mae_vit_base_patch16", "--output", "OUT", "--data_path_blurred", "O",
               "--data_path_orig", "O"])
    assert (a.model, a.output_dir, a.data_path_blurred, a.data_path_orig) == ("mae_vit_base_patch16", "OUT", "O", "O")


@pytest.mark.parametrize("argv,expected", [
    (["--local-rank=0"], 0), (["--local_rank", "0"], 0), (["--local-rank", "3"], 3), (["--local_rank=2"], 2),
    ([], -1),
])
def test_local_rank_both_spellings(clean_launcher_env, argv, expected):
    assert parse(argv).local_rank == expected


def test_local_rank_environment_wins(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert parse(["--local-rank=0"]).local_rank == 1


def test_duplicate_flag_last_wins(clean_launcher_env):
    assert parse(["--batch_size", "16", "--batch_size", "8"]).batch_size == 8


@pytest.mark.parametrize("argv,expected", [
    ([], False), (["--norm_pix_loss"], True), (["--norm_pix_loss", "true"], True),
    (["--norm_pix_loss", "false"], False), (["--norm_pix_loss", "True"], True), (["--norm_pix_loss", "False"], False),
    (["--norm_pix_loss=1"], True), (["--norm_pix_loss", "0"], False), (["--norm_pix_loss", "--no_norm_pix_loss"], False),
    (["--norm_pix_loss", "--epochs", "5"], True),
])
def test_boolean_flag_styles(clean_launcher_env, argv, expected):
    assert parse(argv).norm_pix_loss is expected


def test_boolean_flag_rejects_garbage(clean_launcher_env, capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--norm_pix_loss", "maybe"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert PROG in err and "norm_pix_loss" in err and "maybe" in err


def test_auto_resume_bool_and_negation(clean_launcher_env):
    assert parse([]).auto_resume is True
    assert parse(["--auto_resume", "false"]).auto_resume is False
    assert parse(["--no_auto_resume"]).auto_resume is False


def test_epoch_alias(clean_launcher_env):
    assert parse(["--epoch", "3"]).epochs == 3
    assert parse(["--epochs", "5", "--epoch", "3"]).epochs == 3


def test_whitespace_argument_from_broken_line_continuation(clean_launcher_env):
    # `... --norm_pix_loss \ ` (backslash-space) leaves a lone " " argument.
    with pytest.raises(UserError, match="backslash"):
        parse(["--norm_pix_loss", " ", "--epochs", "800"])


# -------------------------------------------------------------------- 1. seed command lines (dry run)
@pytest.fixture(scope="module")
def seed_size_trees(synthetic_fundus_tree, tmp_path_factory) -> dict[str, Path]:
    """Trees big enough for the seeds' batch sizes (256): the tiny tree's train images copied 16x.
    `orig/train/...` (sharp) and `blurred/train/...` (grayscale, same relative paths). Dry runs
    never decode them."""
    root = tmp_path_factory.mktemp("seed_size")
    sources = train_images(synthetic_fundus_tree)
    for i in range(256):
        src = sources[i % len(sources)]
        rel = Path("train") / f"class_{i % 2}" / f"{i:05d}.png"
        for tree in ("orig", "blurred"):
            dst = root / tree / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return {"orig": root / "orig", "blurred": root / "blurred"}


def test_uspec_seed_command_dry_run(seed_size_trees, tmp_path, monkeypatch):
    """Verbatim USPEC line (with the literal LOG_DIR): accepted, the alias builds ViT-L/16 and says it is
    a deprecated alias; a dry run writes nothing (not the output dir, not LOG_DIR)."""
    argv = [a if a != "DIR" else str(seed_size_trees["orig"]) for a in USPEC_ARGV]
    monkeypatch.chdir(tmp_path)  # the seed's relative paths (LOG_DIR) land here, if anywhere
    proc = run_inprocess("main_pretrain.py", [*argv, "--dry_run"])
    assert proc.returncode == 0, describe(proc)
    log = proc.stdout + proc.stderr
    assert "mae_vit_large_patch16_cross_attention is a deprecated alias of mae_vit_large_patch16" in log, log
    assert "model mae_vit_large_patch16 " in log, log
    assert "dry run" in log and re.search(r"\b1 steps? per epoch", log), log
    assert "Traceback" not in log
    assert not (tmp_path / "X").exists() and not (tmp_path / "LOG_DIR").exists(), sorted(tmp_path.iterdir())


@pytest.mark.parametrize("model,extra,deblur", [
    ("dmae_vit_base_patch16", ["--batch_size", "32"], True),
    ("mae_vit_base_patch16", [], False),
])
def test_deblurring_seed_commands_dry_run(seed_size_trees, tmp_path, model, extra, deblur):
    blurred = seed_size_trees["blurred"] if deblur else seed_size_trees["orig"]  # vanilla: both point at sharp
    out = tmp_path / "out"
    proc = run_inprocess("main_pretrain.py", ["--model", model, "--output", out, "--data_path_blurred", blurred,
                                              "--data_path_orig", seed_size_trees["orig"], *extra, "--dry_run"])
    assert proc.returncode == 0, describe(proc)
    log = proc.stdout
    assert f"model {model} " in log and f"deblur={deblur}" in log and "256 images" in log, log
    steps = 256 // (32 if deblur else 64)
    assert re.search(rf"\b{steps} steps? per epoch", log), log
    assert not out.exists()


# ----------------------------------------------------------------------------------------- 2. demo
def test_demo_command(tmp_path):
    out = tmp_path / "tmp"
    proc = run_pretrain(["--demo", "--epochs", "2", "--output_dir", out], timeout=300)
    assert proc.returncode == 0, describe(proc)

    ckpt = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "args"} <= set(ckpt)
    assert ckpt["args"]["epochs"] == 2  # an explicit --epochs beats the demo's default

    lines = (out / "log.txt").read_text().splitlines()
    records = [json.loads(ln) for ln in lines]  # one JSON object per line
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(isinstance(r["train_loss"], float) and math.isfinite(r["train_loss"]) for r in records)

    events = glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    assert len(events) == 1 and Path(events[0]).stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(events[0], size_guidance={"images": 0})
    acc.Reload()
    assert {"train_loss", "epoch_loss"} <= set(acc.Tags()["scalars"])
    assert "reconstructions" in acc.Tags()["images"]

    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "mae_vit_tiny_patch8" and config["epochs"] == 2 and config["demo"] is True

    png = out / "reconstructions.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.mode == "RGB" and min(im.size) > 64


def test_demo_respects_explicit_default_values(tmp_path, clean_launcher_env):
    """`--demo` replaces only flags the user did not set; an explicit value that happens to equal the
    parser default (here --epochs 400) must win too."""
    args = parse(["--demo", "--epochs", "400", "--input_size", "224", "--output_dir", str(tmp_path)])
    main_pretrain.prepare_demo(args)
    assert (args.epochs, args.input_size) == (400, 224)


# ------------------------------------------------------------------------ tiny run (shared fixture)
def test_tiny_run_outputs(tiny_pretrain_run):
    out = tiny_pretrain_run.output_dir
    for name in ("checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-last.pth", "config.json",
                 "log.txt", "reconstructions.png"):
        assert (out / name).is_file(), name
    assert glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    records = [json.loads(ln) for ln in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    ckpt = torch.load(tiny_pretrain_run.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["model"] == TINY_MODEL
    assert ckpt["preprocessing"]["input_size"] == TINY_INPUT
    assert f"{TINY_TRAIN_IMAGES} images" in tiny_pretrain_run.proc.stdout  # data_path/train only


def test_successful_run_stderr_is_clean(tiny_pretrain_run):
    assert "Warning" not in tiny_pretrain_run.proc.stderr, tiny_pretrain_run.proc.stderr


# ----------------------------------------------------------------------------------------- 4. resume
def test_auto_resume_continues_exactly(tiny_pretrain_run, tmp_path):
    """Run A: 3 epochs straight. Run B: the same command in a dir holding only A's checkpoint-1.pth
    (as if killed after epoch 1): auto-resume must pick it and finish with A's weights."""
    run_a = tiny_pretrain_run
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copyfile(run_a.periodic(1), out / "checkpoint-1.pth")
    proc = run_inprocess("main_pretrain.py", [*run_a.flags, "--output_dir", out])
    assert proc.returncode == 0, describe(proc)
    assert "resumed from" in proc.stdout and "checkpoint-1.pth" in proc.stdout, proc.stdout
    records = [json.loads(ln) for ln in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [2]

    final_a, final_b = model_state(run_a.checkpoint), model_state(out / "checkpoint-last.pth")
    # The comparison is meaningful: the last epoch moved the weights far more than the tolerance.
    assert max_abs_diff(final_a, model_state(run_a.periodic(1))) > 1e-4
    assert max_abs_diff(final_a, final_b) <= 1e-6
    ckpt_b = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ckpt_b["epoch"] == 2


def test_resume_refuses_changed_mask_ratio(tiny_pretrain_run, tmp_path):
    out = tmp_path / "changed"
    out.mkdir()
    shutil.copyfile(tiny_pretrain_run.checkpoint, out / "checkpoint-last.pth")
    before = (out / "checkpoint-last.pth").read_bytes()
    proc = run_inprocess("main_pretrain.py", [*tiny_pretrain_run.flags, "--mask_ratio", "0.5", "--output_dir", out])
    line = assert_one_line_error(proc, "mask_ratio", "0.75", "0.5")
    assert "checkpoint-last.pth" in line
    assert (out / "checkpoint-last.pth").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-last.pth"]  # nothing else written


# ------------------------------------------------------------------------------------ 3. distributed


def test_torchrun_two_processes_match_one_process(tiny_pretrain_run, tmp_path):
    """2 gloo processes x batch 2 == 1 process x batch 4 (same seed): per-sample seeded augmentation and
    mask noise + DistributedSampler's shared permutation make the optimisation identical."""
    wrapper = write_rank_dump_wrapper(tmp_path)
    out = tmp_path / "ddp"
    flags = tiny_pretrain_flags(tiny_pretrain_run.data_path, batch_size=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(wrapper), *flags, "--output_dir", str(out)]
    proc = run_cmd(cmd, timeout=240, env=child_env(RANK_DUMP_DIR=str(tmp_path)))
    assert proc.returncode == 0, describe(proc)
    assert "effective batch 4" in proc.stdout, proc.stdout
    dumps = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    assert all(p.is_file() for p in dumps), "a rank never wrapped its model in DistributedDataParallel"

    ckpt = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["world_size"] == 2
    rank0, rank1 = (torch.load(p, weights_only=True) for p in dumps)
    assert max_abs_diff(rank0, rank1) == 0.0  # DDP: both ranks hold the same parameters
    assert max_abs_diff(rank0, ckpt["model"]) == 0.0

    single = model_state(tiny_pretrain_run.checkpoint)
    assert max_abs_diff(single, model_state(tiny_pretrain_run.periodic(0))) > 1e-4  # the weights did move
    assert max_abs_diff(without_key_bias(ckpt["model"]), without_key_bias(single)) <= 1e-5
    assert max_abs_diff(ckpt["model"], single) <= 1e-3  # key bias: bounded drift (a few lr-sized steps)
    records = [json.loads(ln) for ln in (out / "log.txt").read_text().splitlines()]  # rank 0 only
    single_records = [json.loads(ln) for ln in (tiny_pretrain_run.output_dir / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    # Same samples, same masks: the per-epoch mean losses agree to float precision.
    for r, s in zip(records, single_records):
        assert r["train_loss"] == pytest.approx(s["train_loss"], rel=1e-6, abs=1e-7)
        assert r["train_lr"] == pytest.approx(s["train_lr"], rel=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("torch.distributed.launch") is None,
                    reason="this torch no longer ships torch.distributed.launch")
def test_torch_distributed_launch(tiny_pretrain_run, tmp_path):
    """The seeds' launcher passes `--local-rank=0` to the script."""
    out = tmp_path / "launch"
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=1", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "main_pretrain.py",
           *tiny_pretrain_flags(tiny_pretrain_run.data_path, epochs=1), "--output_dir", str(out)]
    proc = run_cmd(cmd, timeout=180)
    assert proc.returncode == 0, describe(proc)
    assert "unrecognized arguments" not in proc.stderr
    ckpt = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["args"]["local_rank"] == 0


# ----------------------------------------------------------------------------------- 5. bad input
def small_flags(data_path, **overrides) -> list[str]:
    return tiny_pretrain_flags(data_path, **{"epochs": 1, "save_freq": 0, "vis_images": 0, **overrides})


@pytest.fixture
def copied_train(synthetic_fundus_tree, tmp_path) -> Path:
    """A writable copy of the tiny tree's train split: `tmp/data/class_k/NNNNN.png` (no train/ folder)."""
    dst = tmp_path / "data"
    shutil.copytree(synthetic_fundus_tree / "train", dst)
    return dst


def test_error_empty_data_folder(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    proc = run_inprocess("main_pretrain.py", [*small_flags(empty), "--output_dir", tmp_path / "out"])
    assert_one_line_error(proc, str(empty), "no images")


def test_error_unreadable_image_then_skip(copied_train, tmp_path):
    bad = copied_train / "class_0" / "00001.png"
    bad.write_bytes(b"this is not a PNG file \x00\x01\x02" * 10)
    proc = run_inprocess("main_pretrain.py", [*small_flags(copied_train), "--output_dir", tmp_path / "out_error"])
    assert_one_line_error(proc, str(bad))

    out = tmp_path / "out_skip"
    proc = run_inprocess("main_pretrain.py", [*small_flags(copied_train), "--bad_image", "skip", "--output_dir", out])
    assert proc.returncode == 0, describe(proc)
    assert "skipping bad image" in proc.stdout and str(bad) in proc.stdout, proc.stdout
    assert (out / "checkpoint-last.pth").is_file()


def test_error_unknown_model(copied_train, tmp_path):
    proc = run_inprocess("main_pretrain.py", [*small_flags(copied_train, model="mae_vit_micro_patch9"),
                                              "--output_dir", tmp_path / "o"])
    line = assert_one_line_error(proc, "unknown --model", "mae_vit_micro_patch9")
    assert TINY_MODEL in line  # closest registered names are suggested


def test_error_input_size_not_multiple_of_patch(copied_train, tmp_path):
    proc = run_inprocess("main_pretrain.py", [*small_flags(copied_train, input_size=30), "--output_dir",
                                              tmp_path / "o"])
    assert_one_line_error(proc, "30", "8", "--input_size")


def test_error_deblurring_missing_sharp_counterpart(copied_train, synthetic_fundus_tree, tmp_path):
    """Ids come from the blurred tree; a blurred image whose sharp twin is missing is named."""
    sharp = tmp_path / "sharp"
    shutil.copytree(synthetic_fundus_tree / "train", sharp)
    orphan = sharp / "class_1" / "00012.png"
    orphan.unlink()
    proc = run_inprocess("main_pretrain.py", [*small_flags(None, model=TINY_DEBLUR_MODEL), "--data_path_blurred",
                                              copied_train, "--data_path_orig", sharp, "--output_dir", tmp_path / "o"])
    assert_one_line_error(proc, str(copied_train / "class_1" / "00012.png"), "--data_path_orig")


def test_error_deblurring_blurred_tree_missing_an_image(copied_train, synthetic_fundus_tree, tmp_path):
    """The other direction: the blurred tree lacks the counterpart of one sharp image (e.g. an
    interrupted blurred_images.py run). The run must stop and name the image, not shrink the data."""
    sharp = tmp_path / "sharp"
    shutil.copytree(synthetic_fundus_tree / "train", sharp)
    (copied_train / "class_0" / "00003.png").unlink()  # copied_train plays the blurred tree
    proc = run_inprocess("main_pretrain.py", [*small_flags(None, model=TINY_DEBLUR_MODEL), "--data_path_blurred",
                                              copied_train, "--data_path_orig", sharp, "--dry_run", "--output_dir",
                                              tmp_path / "o"])
    assert_one_line_error(proc, "00003.png")


def test_error_resume_missing_checkpoint(copied_train, tmp_path):
    missing = tmp_path / "nonexistent.pth"
    proc = run_inprocess("main_pretrain.py", [*small_flags(copied_train), "--resume", missing, "--output_dir",
                                              tmp_path / "o"])
    assert_one_line_error(proc, str(missing))


def test_error_deblurring_without_blurred_source(copied_train, tmp_path):
    proc = run_inprocess("main_pretrain.py", [*small_flags(copied_train, model=TINY_DEBLUR_MODEL), "--output_dir",
                                              tmp_path / "o"])
    assert_one_line_error(proc, "--data_path_blurred", "--blur")
