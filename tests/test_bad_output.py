"""Writes and wrong files never crash, never destroy: one test per class of fault.

- a full disk during any save (predictions, metrics, figures, image caches, blurred trees) ends in one line
  naming the file, with the previous output intact and no temp file left;
- a wrong checkpoint (text, a wrong-shaped safetensors, another family's run) or an --output_dir that is a
  file: one line naming the flag or file, the file untouched;
- a failed start leaves nothing behind; the malicious-pickle refusal is one clean line; non-finite weights in a
  checkpoint are named as such (not blamed on --blr).
Unreadable images and data-folder hazards are in tests/test_bad_input.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import main_finetune
import main_pretrain
from bad_input_helpers import VIT, expect_exit_2, one_error_line, run_cli, tree_files
from util.cli import run_main


# ------------------------------------------------------------------------------ full disk on every save
@pytest.mark.parametrize("victim", ["predictions.csv", "eval_test_metrics.json", "roc_eval_test.png"])
def test_full_disk_during_eval_outputs_is_one_line_and_leaves_earlier_files(victim, bad_finetuned, bad_us_tree, tmp_path,
                                                                             capsys, monkeypatch):
    out = tmp_path / "out"
    if victim == "predictions.csv":
        argv = ["--predict", str(bad_us_tree / "test" / "class_0"), "--resume", str(bad_finetuned)]
    else:
        argv = ["--eval", "--resume", str(bad_finetuned), "--data_path", str(bad_us_tree), "--bootstrap", "0"]
    argv += ["--output_dir", str(out), "--num_workers", "0", "--device", "cpu"]
    run_cli(main_finetune, argv)
    before = tree_files(out)
    capsys.readouterr()
    monkeypatch.setenv("MEDFOUND_TEST_FAIL_WRITE", victim)
    line = expect_exit_2(main_finetune, argv, capsys)
    assert "No space left on device" in line and victim in line
    after = tree_files(out)
    assert after[victim] == before[victim]  # the earlier output is intact
    assert not [p for p in after if p.endswith(".tmp") or Path(p).name.startswith(".")]


def test_full_disk_while_building_a_cache_or_blurring(bad_us_tree, tmp_path, capsys, monkeypatch):
    import blurred_images
    import build_image_cache
    monkeypatch.setenv("MEDFOUND_TEST_FAIL_WRITE", "*.png")
    out = tmp_path / "blurred"
    assert blurred_images.main(["--src_dir", str(bad_us_tree / "train"), "--dst_dir", str(out), "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and ".png" in line
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # the stopped tree is marked unfinished: pretraining refuses it instead of training on a part of the data
    assert (out / ".blur_in_progress").exists()
    line = expect_exit_2(main_pretrain, ["--model", "dmae_vit_micro_patch8", "--input_size", "32",
                                         "--data_path_blurred", str(out), "--data_path_orig", str(bad_us_tree / "train"),
                                         "--device", "cpu", "--output_dir", str(tmp_path / "pre")], capsys)
    assert "--data_path_blurred" in line and "blurred_images.py" in line
    assert not (tmp_path / "pre").exists()
    monkeypatch.delenv("MEDFOUND_TEST_FAIL_WRITE")
    assert blurred_images.main(["--src_dir", str(bad_us_tree / "train"), "--dst_dir", str(out), "--quiet"]) == 0
    assert not (out / ".blur_in_progress").exists()  # finished: the marker is gone
    capsys.readouterr()
    monkeypatch.setenv("MEDFOUND_TEST_FAIL_WRITE", "*")
    cache = tmp_path / "cache"
    line = expect_exit_2(build_image_cache, ["--data_path", str(bad_us_tree / "train"), "--output", str(cache)], capsys)
    assert "No space left on device" in line
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written is left as a cache


# ------------------------------------------------------------------------------ wrong files and paths
def test_wrong_checkpoints_are_one_line(bad_finetuned, bad_us_tree, tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    base = ["--data_path", str(bad_us_tree), "--num_workers", "0", "--device", "cpu", "--epochs", "1", "--batch_size", "8"]
    line = expect_exit_2(main_finetune, ["--model", VIT, "--finetune", str(text), "--output_dir",
                                         str(tmp_path / "a"), *base], capsys)
    assert "notes.pth" in line
    from safetensors.torch import save_file
    st = tmp_path / "wrong.safetensors"
    save_file({"pos_embed": torch.zeros(1, 3, 5), "patch_embed.proj.weight": torch.zeros(2, 2)}, str(st))
    line = expect_exit_2(main_finetune, ["--model", VIT, "--finetune", str(st), "--output_dir", str(tmp_path / "b"),
                                         *base], capsys)
    assert "wrong.safetensors" in line
    # a ConvMAE pretraining checkpoint resumed into an MAE pretraining run
    conv_run = tmp_path / "conv"
    run_cli(main_pretrain, ["--model", "convmae_convvit_micro_patch16", "--input_size", "32", "--data_path",
                            str(bad_us_tree / "train"), "--epochs", "1", "--batch_size", "8", "--num_workers", "0",
                            "--device", "cpu", "--output_dir", str(conv_run), "--print_freq", "100",
                            "--vis_images", "0"])
    capsys.readouterr()
    line = expect_exit_2(main_pretrain, ["--model", "mae_vit_micro_patch8", "--input_size", "32", "--data_path",
                                         str(bad_us_tree / "train"), "--epochs", "2", "--batch_size", "8",
                                         "--num_workers", "0", "--device", "cpu", "--output_dir",
                                         str(tmp_path / "mae"), "--resume", str(conv_run / "checkpoint-last.pth")],
                         capsys)
    assert "--resume" in line and "checkpoint-last.pth" in line


def test_output_dir_that_is_a_file_is_one_line(bad_us_tree, tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("keep me")
    line = expect_exit_2(main_finetune, ["--model", VIT, "--data_path", str(bad_us_tree), "--output_dir", str(target),
                                         "--epochs", "1", "--num_workers", "0", "--device", "cpu"], capsys)
    assert "--output_dir" in line and "results" in line
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("tool", ["main_pretrain", "explain", "visualize_mae", "embed_features", "main_few_shot",
                                  "build_image_cache"])
def test_output_dir_that_is_a_file_is_refused_by_every_entry_point(tool, bad_finetuned, bad_us_tree, tmp_path, capsys):
    import importlib
    module = importlib.import_module(tool)
    target = tmp_path / "results"
    target.write_text("keep me")
    image = str(next((bad_us_tree / "test" / "class_0").iterdir()))
    argv = {
        "main_pretrain": ["--model", "mae_vit_micro_patch8", "--input_size", "32", "--data_path", str(bad_us_tree),
                          "--device", "cpu"],
        "explain": ["--checkpoint", str(bad_finetuned), "--device", "cpu", image],
        "visualize_mae": ["--checkpoint", str(bad_finetuned), "--device", "cpu", image],
        "embed_features": ["--checkpoint", str(bad_finetuned), "--data_path", str(bad_us_tree), "--device", "cpu"],
        "main_few_shot": ["--model", VIT, "--data_path", str(bad_us_tree), "--device", "cpu", "--few_shot", "2",
                          "--seeds", "1"],
        "build_image_cache": ["--data_path", str(bad_us_tree)],
    }[tool]
    flag = "--output" if tool == "build_image_cache" else "--output_dir"
    line = expect_exit_2(module, [*argv, flag, str(target)], capsys)
    assert flag in line and "results" in line
    assert target.read_text() == "keep me"


def test_blurred_dst_dir_that_is_a_file_is_refused(bad_us_tree, tmp_path, capsys):
    import blurred_images
    target = tmp_path / "blurred"
    target.write_text("keep me")
    assert blurred_images.main(["--src_dir", str(bad_us_tree / "train"), "--dst_dir", str(target)]) == 2
    line = one_error_line(capsys)
    assert "--dst_dir" in line and "blurred" in line and target.read_text() == "keep me"


# ------------------------------------------------------------------------------ failed starts, diagnoses
def test_failed_pretraining_start_leaves_no_files(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    line = expect_exit_2(main_pretrain, ["--data_path", str(empty), "--output_dir", str(out), "--device", "cpu",
                                         "--model", "mae_vit_micro_patch8", "--input_size", "32"], capsys)
    assert "empty" in line
    assert not out.exists() or not any(out.iterdir()), sorted(os.listdir(out))


def test_malicious_pickle_message_is_clean(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": Evil()}))
    from util.checkpoint import CheckpointError, load_file
    with pytest.raises(CheckpointError) as e:
        load_file(str(path))
    msg = str(e.value)
    assert "\n" not in msg and "evil.pth" in msg and "system" in msg and "refused" in msg
    assert len(msg) < 400 and "WeightsUnpickler" not in msg and "Please file" not in msg
    assert not (tmp_path / "pwned").exists()


def test_nonfinite_checkpoint_weights_are_named(bad_finetuned, bad_us_tree, tmp_path, capsys):
    from util.checkpoint import load_file
    ckpt = load_file(str(bad_finetuned))
    first = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and "blocks" in k)
    ckpt["model"][first] = torch.full_like(ckpt["model"][first], float("nan"))
    bad = tmp_path / "nan.pth"
    torch.save(ckpt, bad)
    line = expect_exit_2(main_finetune, ["--model", VIT, "--finetune", str(bad), "--data_path", str(bad_us_tree),
                                         "--output_dir", str(tmp_path / "out"), "--epochs", "1", "--num_workers",
                                         "0", "--device", "cpu"], capsys)
    assert "nan.pth" in line and "non-finite" in line and first in line and "--blr" not in line


def test_torch_save_on_a_full_disk_is_one_line_and_keeps_the_checkpoint(tmp_path):
    """torch.save reports a failed write as RuntimeError('PytorchStreamWriter failed ...'), not OSError."""
    from util.checkpoint import CheckpointError, atomic_save, load_file
    path = tmp_path / "checkpoint-last.pth"
    atomic_save({"epoch": 1}, str(path))

    def full_disk_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    with pytest.raises(CheckpointError) as e:
        atomic_save({"epoch": 2}, str(path), writer=full_disk_save)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "previous checkpoint is intact" in msg
    assert load_file(str(path))["epoch"] == 1 and os.listdir(tmp_path) == ["checkpoint-last.pth"]


def test_log_append_and_unreported_os_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import argparse
    from util.logger import RunLogger
    run_logger = RunLogger(str(tmp_path), None)
    run_logger.json_line({"epoch": 0})
    monkeypatch.setenv("MEDFOUND_TEST_FAIL_WRITE", "log.txt")
    parser = argparse.ArgumentParser("tool.py")
    with pytest.raises(SystemExit) as e:
        run_main(lambda args: run_logger.json_line({"epoch": 1}), parser, [])
    assert e.value.code == 2
    line = one_error_line(capsys)
    assert "log.txt" in line and "No space left on device" in line and "intact" in line
    assert (tmp_path / "log.txt").read_text() == '{"epoch": 0}\n'

    def unreadable(args):  # an OSError with a file name that no handler reported: the backstop
        open(tmp_path / "missing" / "x.txt")
    with pytest.raises(SystemExit):
        run_main(unreadable, parser, [])
    assert "x.txt" in one_error_line(capsys)


def test_failed_finetune_start_leaves_nothing_and_puts_an_earlier_run_back(bad_finetuned, bad_us_tree, tmp_path, capsys):
    out = tmp_path / "ft"
    line = expect_exit_2(main_finetune, ["--model", VIT, "--data_path", str(tmp_path / "nope"), "--output_dir",
                                         str(out), "--epochs", "1", "--num_workers", "0", "--device", "cpu"], capsys)
    assert "nope" in line and not out.exists()
    # a folder holding an earlier run: a failed start into it leaves every file where and as it was
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "log.txt").write_text("earlier run\n")
    (earlier / "notes.md").write_text("mine")
    before = tree_files(earlier)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    line = expect_exit_2(main_finetune, ["--model", VIT, "--data_path", str(bad_us_tree), "--finetune", str(text),
                                         "--output_dir", str(earlier), "--no_auto_resume", "--epochs", "1",
                                         "--num_workers", "0", "--device", "cpu"], capsys)
    assert "--finetune" in line and "notes.pth" in line and "text file" in line
    assert tree_files(earlier) == before and sorted(os.listdir(earlier)) == ["log.txt", "notes.md"]


def test_start_guard_puts_set_aside_files_back(tmp_path):
    from util.runtime import set_aside_earlier_run, start_guard
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with start_guard(str(out)):
            set_aside_earlier_run(str(out))
            (out / "tensorboard").mkdir()
            (out / "log.txt").write_text("new")
            raise RuntimeError("bad start")
    assert sorted(os.listdir(out)) == ["config.json"] and (out / "config.json").read_text() == "{}"
