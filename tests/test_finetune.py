"""Finetuning, evaluation, prediction, linear probe and few-shot (issue: finetuning & clinical evaluation).

Runs the entry points in-process on tiny models and a synthetic ultrasound tree (32 px), whose nodules
a micro ViT learns within seconds, so the tests check learning, not just running.
"""
from __future__ import annotations

import argparse
import csv
import json
import os

import numpy as np
import pytest
import torch

import main_few_shot
import main_finetune
import main_pretrain
from util.checkpoint import CheckpointError, load_pretrained_encoder
from util.cli import run_main
from util.registry import create_model
from util.synthetic import write_dataset


def finetune_args(data, out, *extra):
    return main_finetune.get_args_parser().parse_args([
        "--model", "vit_micro_patch8", "--data_path", str(data), "--output_dir", str(out), "--epochs", "15",
        "--warmup_epochs", "1", "--batch_size", "16", "--blr", "5e-2", "--aa", "none", "--reprob", "0",
        "--smoothing", "0", "--num_workers", "0", "--device", "cpu", "--print_freq", "100", "--bootstrap", "100",
        "--seed", "0", *map(str, extra)])


@pytest.fixture(scope="module")
def us_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("us")
    write_dataset(root, kind="ultrasound", layout="imagefolder", num_classes=2, n_per_class=150, size=32, seed=3)
    return root


@pytest.fixture(scope="module")
def pretrained(us_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt")
    args = main_pretrain.get_args_parser().parse_args([
        "--model", "mae_vit_micro_patch8", "--input_size", "32", "--data_path", str(us_tree), "--epochs", "2",
        "--warmup_epochs", "1", "--batch_size", "16", "--blr", "1e-2", "--num_workers", "0", "--device", "cpu",
        "--output_dir", str(out), "--print_freq", "100", "--vis_images", "0", "--norm_preset", "uwf"])
    main_pretrain.main(args)
    return out / "checkpoint-last.pth"


@pytest.fixture(scope="module")
def finetuned(us_tree, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    results = main_finetune.main(finetune_args(us_tree, out, "--finetune", pretrained))
    return out, results


def test_finetune_learns_and_writes_outputs(finetuned):
    out, results = finetuned
    test = results["test"]
    assert test["auroc"] > 0.7, test  # chance is 0.5
    assert results["val_split"]["rule"] if isinstance(results["val_split"], dict) and "rule" in results["val_split"] \
        else True
    for name in ("checkpoint-best.pth", "checkpoint-last.pth", "test_metrics.json", "test_metrics.csv",
                 "roc_test.png", "confusion_test.png", "results.json", "log.txt"):
        assert (out / name).is_file(), name
    lines = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert len(lines) == 15 and "val_auroc" in lines[0]
    ci = test["ci95"]["auroc"]
    assert ci[0] <= test["auroc"] <= ci[1]


def test_preprocessing_travels_from_pretraining(finetuned):
    out, _ = finetuned
    ckpt = torch.load(out / "checkpoint-best.pth", weights_only=True)
    pre = ckpt["preprocessing"]
    assert pre["norm_preset"] == "uwf" and pre["input_size"] == 32
    assert pre["class_names"] == ["class_0", "class_1"] and isinstance(ckpt["args"], dict)


def test_eval_reproduces_saved_test_metrics(finetuned, us_tree, tmp_path):
    out, results = finetuned
    # no --input_size / --norm_preset: they come from the checkpoint
    args = main_finetune.get_args_parser().parse_args([
        "--eval", "--resume", str(out / "checkpoint-best.pth"), "--model", "vit_micro_patch8", "--data_path",
        str(us_tree), "--output_dir", str(tmp_path), "--num_workers", "0", "--device", "cpu", "--bootstrap", "0"])
    evaluated = main_finetune.main(args)["test"]
    for key in ("auroc", "accuracy", "f1", "kappa", "confusion_matrix", "loss"):
        assert evaluated[key] == results["test"][key], key
    assert (tmp_path / "eval_test_metrics.json").is_file()


def test_predict_writes_probabilities(finetuned, us_tree, tmp_path):
    out, _ = finetuned
    folder = us_tree / "test" / "class_1"
    args = main_finetune.get_args_parser().parse_args([
        "--predict", str(folder), "--resume", str(out / "checkpoint-best.pth"), "--model", "vit_micro_patch8",
        "--output_dir", str(tmp_path), "--num_workers", "0", "--device", "cpu"])
    main_finetune.main(args)
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert len(rows) == len(os.listdir(folder))
    probs = np.array([[float(r["prob_class_0"]), float(r["prob_class_1"])] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert np.mean([r["prediction"] == "class_1" for r in rows]) > 0.5


def test_linear_probe_runs_with_bn_head(us_tree, pretrained, tmp_path):
    results = main_finetune.main(finetune_args(us_tree, tmp_path, "--finetune", pretrained, "--linprobe",
                                               "--cls_token", "--epochs", "3", "--bootstrap", "0"))
    sd = torch.load(tmp_path / "checkpoint-best.pth", weights_only=True)["model"]
    assert "head.0.running_mean" in sd and "head.1.weight" in sd
    first = torch.load(pretrained, weights_only=True)["model"]
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], first["blocks.0.attn.qkv.weight"])  # frozen encoder
    assert "test" in results


def test_few_shot_three_seeds(us_tree, pretrained, tmp_path, medfound_log):
    flat = tmp_path / "flat"
    for cls in ("class_0", "class_1"):
        (flat / cls).mkdir(parents=True)
        for f in sorted(os.listdir(us_tree / "train" / cls))[:30]:
            os.link(us_tree / "train" / cls / f, flat / cls / f)
    parser = main_few_shot.get_args_parser()
    args = parser.parse_args(["--model", "vit_micro_patch8", "--finetune", str(pretrained), "--data_path", str(flat),
                              "--few_shot", "8", "--seeds", "1,2,3", "--epochs", "2", "--warmup_epochs", "0",
                              "--batch_size", "8", "--blr", "5e-2", "--aa", "none", "--reprob", "0",
                              "--num_workers", "0", "--device", "cpu", "--output_dir", str(tmp_path / "fs"),
                              "--bootstrap", "0", "--print_freq", "100"])
    summary = main_few_shot.main(args)
    assert summary["seeds"] == [1, 2, 3]
    assert summary["metrics"]["auroc"]["n"] == 3 and "±" in medfound_log.text
    assert (tmp_path / "fs" / "few_shot" / "few_shot_summary.csv").is_file()
    assert (tmp_path / "fs" / "few_shot" / "flat_few_shot_8_2").is_dir()  # USPEC naming


# --------------------------------------------------------------------------------- checkpoint loading
def test_retfound_style_checkpoint_loads_with_expected_missing_only(tmp_path):
    """`{model, optimizer, epoch, args: Namespace}` with encoder + decoder keys (RETFound v1 layout)."""
    mae = create_model("mae_vit_micro_patch8", img_size=32)
    path = tmp_path / "RETFound_cfp_weights.pth"
    torch.save({"model": mae.state_dict(), "epoch": 799, "args": argparse.Namespace(model="mae")}, path)
    clf = create_model("vit_micro_patch8", img_size=32, num_classes=3, pool="mae_avg")
    report = load_pretrained_encoder(clf, str(path))
    assert set(report["missing"]) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert torch.equal(clf.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
    assert clf.head.weight.std() < 1e-4  # trunc_normal std 2e-5 head init
    cls = create_model("vit_micro_patch8", img_size=32, num_classes=3, pool="cls")
    assert set(load_pretrained_encoder(cls, str(path))["missing"]) == {"head.weight", "head.bias"}


def test_prefixed_teacher_checkpoint_and_pos_embed_resize(tmp_path, medfound_log):
    mae = create_model("mae_vit_micro_patch8", img_size=32)
    sd = {f"module.backbone.{k}": v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask"))}
    path = tmp_path / "teacher.pth"
    torch.save({"teacher": sd}, path)
    clf = create_model("vit_micro_patch8", img_size=48, num_classes=2, pool="cls")
    report = load_pretrained_encoder(clf, str(path))
    assert report["pos_embed_resized"] == "4x4 -> 6x6" and "interpolated" in medfound_log.text
    assert clf.pos_embed.shape == (1, 37, 64) and clf.pos_embed.requires_grad


def test_wrong_architecture_fails_loudly(tmp_path):
    other = create_model("vit_tiny_patch16", img_size=32, num_classes=2)
    path = tmp_path / "tiny.pth"
    torch.save({"model": other.state_dict()}, path)
    clf = create_model("vit_micro_patch8", img_size=32, num_classes=2)
    with pytest.raises(CheckpointError):
        load_pretrained_encoder(clf, str(path))
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"model": {"conv.weight": torch.zeros(3)}}, unrelated)
    with pytest.raises(CheckpointError, match="encoder weights missing"):
        load_pretrained_encoder(clf, str(unrelated))


# ------------------------------------------------------------------------------------ pooling parity
@pytest.mark.parametrize("pool", ["cls", "mae_avg", "retfound_v2_avg"])
def test_pooling_logits_match_formula(pool):
    torch.manual_seed(0)
    m = create_model("vit_micro_patch8", img_size=32, num_classes=3, pool=pool).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = m.prepend_cls(m.patch_embed(x) + m.pos_embed[:, 1:])
    for blk in m.blocks:
        tokens = blk(tokens)
    if pool == "cls":
        feat = m.norm(tokens)[:, 0]
    else:
        feat = m.fc_norm(tokens[:, 1:].mean(1))
        if pool == "retfound_v2_avg":
            feat = m.fc_norm(feat)
    torch.testing.assert_close(m(x), m.head(feat), atol=1e-5, rtol=1e-5)
    keys = m.state_dict().keys()
    assert ("norm.weight" in keys) == (pool == "cls") and ("fc_norm.weight" in keys) == (pool != "cls")


# -------------------------------------------------------------------------------------- bad input
def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        run_main(main_finetune.main, main_finetune.get_args_parser(), argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_one_line(capsys, us_tree, tmp_path):
    base = ["--model", "vit_micro_patch8", "--input_size", "32", "--output_dir", str(tmp_path), "--epochs", "1",
            "--num_workers", "0", "--device", "cpu"]
    assert "nb_classes" in _cli_error(capsys, base + ["--data_path", str(us_tree), "--nb_classes", "5"])
    vfm = tmp_path / "vfm"
    (vfm / "training").mkdir(parents=True)
    (vfm / "training_labels.txt").write_text("training/a.png;0\ntraining/b.png\n")
    err = _cli_error(capsys, base + ["--data_path", str(vfm)])
    assert "training_labels.txt:" in err
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": create_model("vit_tiny_patch16", img_size=32).state_dict()}, wrong)
    assert "wrong.pth" in _cli_error(capsys, base + ["--data_path", str(us_tree), "--finetune", str(wrong)])
    assert "not found" in _cli_error(capsys, base + ["--data_path", str(us_tree), "--finetune", "/nope.pth"])


def test_knn_on_frozen_features(us_tree, pretrained, tmp_path):
    from util.inference import knn_classify
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    probs = knn_classify(bank, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.05], [0.05, 1.0]]), 2, k=1)
    assert probs.argmax(1).tolist() == [0, 1] and torch.allclose(probs.sum(1), torch.ones(2))
    results = main_finetune.main(finetune_args(us_tree, tmp_path, "--finetune", pretrained, "--knn", "--knn_k", "5"))
    assert (tmp_path / "knn_metrics.json").is_file()
    assert results["knn"]["k5"]["auroc"] > 0.5


def test_eval_of_linear_probe_checkpoint_uses_its_head(us_tree, pretrained, tmp_path):
    out = tmp_path / "lp"
    trained = main_finetune.main(finetune_args(us_tree, out, "--finetune", pretrained, "--linprobe", "--cls_token",
                                               "--epochs", "2", "--bootstrap", "0"))
    args = main_finetune.get_args_parser().parse_args([
        "--eval", "--resume", str(out / "checkpoint-best.pth"), "--model", "vit_micro_patch8", "--data_path",
        str(us_tree), "--output_dir", str(tmp_path / "ev"), "--num_workers", "0", "--device", "cpu", "--bootstrap", "0"])
    assert main_finetune.main(args)["test"]["auroc"] == trained["test"]["auroc"]


# ---------------------------------------------------------------- a new user's path: checkpoint-driven modes
def test_eval_and_predict_need_only_the_checkpoint(finetuned, us_tree, tmp_path, medfound_log):
    """--eval / --predict as the README writes them: no --model, no preprocessing flags."""
    out, results = finetuned
    ckpt = str(out / "checkpoint-best.pth")
    evaluated = run_main(main_finetune.main, main_finetune.get_args_parser(), [
        "--eval", "--resume", ckpt, "--data_path", str(us_tree), "--output_dir", str(tmp_path / "eval"),
        "--num_workers", "0", "--device", "cpu", "--bootstrap", "0"])["test"]
    for key in ("auroc", "accuracy", "confusion_matrix", "loss"):
        assert evaluated[key] == results["test"][key], key
    assert "==== evaluation summary ====" in medfound_log.text
    folder = us_tree / "test" / "class_0"
    run_main(main_finetune.main, main_finetune.get_args_parser(), [
        "--predict", str(folder), "--resume", ckpt, "--output_dir", str(tmp_path / "pred"), "--num_workers", "0",
        "--device", "cpu"])
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert len(rows) == len(os.listdir(folder))
    assert np.mean([r["prediction"] == "class_0" for r in rows]) > 0.5


@pytest.mark.parametrize("mode", ["--eval", "--predict"])
def test_checkpoint_modes_fail_cleanly_and_write_nothing(finetuned, us_tree, tmp_path, capsys, mode):
    out, _ = finetuned
    target = tmp_path / "never"
    where = ["--data_path", str(us_tree)] if mode == "--eval" else [str(us_tree / "test" / "class_0")]
    common = ["--resume", str(out / "checkpoint-best.pth"), "--output_dir", str(target), "--num_workers", "0",
              "--device", "cpu"]
    cases = [
        [mode, *where, *common, "--model", "vit_base_patch16"],                    # --model contradicts the checkpoint
        [mode, *([] if mode == "--eval" else where), *common[2:]] + (["--data_path", str(us_tree)] if mode == "--eval" else []),  # no --resume
        [mode, *(["--data_path", str(tmp_path / "missing")] if mode == "--eval" else [str(tmp_path / "missing")]), *common],
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as e:
            run_main(main_finetune.main, main_finetune.get_args_parser(), argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        assert not target.exists(), argv  # a failed start leaves nothing behind
    assert "does not match" in run_err(main_finetune, [mode, *where, *common, "--model", "vit_base_patch16"], capsys)


def run_err(module, argv, capsys) -> str:
    with pytest.raises(SystemExit):
        run_main(module.main, module.get_args_parser(), argv)
    return capsys.readouterr().err


def test_healthy_run_has_no_warnings_and_a_summary(finetuned):
    out, results = finetuned
    assert results["warnings"] == [], results["warnings"]
    assert json.loads((out / "results.json").read_text())["warnings"] == []


def test_run_that_does_not_learn_is_flagged(us_tree, tmp_path, medfound_log):
    """Labels shuffled at random: nothing to learn, so the loss sits at ln 2 and the test AUROC at chance."""
    import random
    import shutil
    rng = random.Random(0)
    data = tmp_path / "random_labels"
    for split in ("train", "val", "test"):
        for i, src in enumerate(sorted((us_tree / split).glob("*/*.png"))):
            dst = data / split / f"class_{rng.randint(0, 1)}" / f"{i:04d}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    results = main_finetune.main(finetune_args(data, tmp_path / "out", "--epochs", "4", "--warmup_epochs", "4",
                                               "--blr", "1e-3", "--bootstrap", "200", "--recipe", "mae",
                                               "--input_size", "32"))
    text = " | ".join(results["warnings"])
    assert "whole run is warm-up" in text
    assert "chance level" in text
    assert "contains 0.5" in text
    assert all(w in medfound_log.text for w in results["warnings"])
    assert "==== finetuning summary ====" in medfound_log.text and "next: python main_finetune.py --eval" in \
        medfound_log.text


def test_progress_lines_carry_the_whole_runs_eta(us_tree, tmp_path, medfound_log):
    main_finetune.main(finetune_args(us_tree, tmp_path, "--epochs", "2", "--print_freq", "1", "--bootstrap", "0",
                                     "--input_size", "32"))
    lines = [r.getMessage() for r in medfound_log.records if "Epoch [1]" in r.getMessage() and " eta " in r.getMessage()]
    assert lines and all("(run " in line for line in lines), lines[:2]


def test_few_shot_keeps_best_weights_only_and_reuses_finished_seeds(us_tree, pretrained, tmp_path, medfound_log):
    argv = ["--model", "vit_micro_patch8", "--finetune", str(pretrained), "--data_path", str(us_tree),
            "--few_shot", "10", "--seeds", "1,2", "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "8",
            "--num_workers", "0", "--device", "cpu", "--bootstrap", "0", "--output_dir", str(tmp_path),
            "--print_freq", "100"]
    first = run_main(main_few_shot.main, main_few_shot.get_args_parser(), argv)
    runs = sorted(p for p in (tmp_path / "few_shot").iterdir() if p.is_dir())
    assert len(runs) == 2
    for run in runs:
        names = set(os.listdir(run))
        assert "checkpoint-best.pth" in names and "checkpoint-last.pth" not in names, names
        assert set(torch.load(run / "checkpoint-best.pth", weights_only=True)) >= {"model", "preprocessing"}
        assert "optimizer" not in torch.load(run / "checkpoint-best.pth", weights_only=True)
    again = run_main(main_few_shot.main, main_few_shot.get_args_parser(), argv)
    assert "already finished" in medfound_log.text
    assert again["metrics"]["auroc"]["values"] == first["metrics"]["auroc"]["values"]


# ---------------------------------------------------------------- selection, diagnostics, recipes (units)
def test_ties_are_broken_by_validation_loss():
    from util.metrics import is_better_epoch
    assert is_better_epoch(1.0, 0.2, None, None, "auroc")
    assert is_better_epoch(1.0, 0.1, 1.0, 0.5, "auroc")          # tie, lower loss: the later epoch wins
    assert not is_better_epoch(1.0, 0.6, 1.0, 0.5, "auroc")      # tie, higher loss
    assert not is_better_epoch(0.9, 0.01, 1.0, 0.5, "auroc")     # worse metric, whatever the loss
    assert is_better_epoch(0.3, None, 0.4, None, "loss") and not is_better_epoch(0.4, 0.4, 0.4, 0.5, "loss")


def test_diagnostics_fire_only_when_they_should():
    import math

    from util import diagnostics as d
    assert d.warmup_warning(5, 5) and d.warmup_warning(10, 5) and d.warmup_warning(2, 20) is None
    ln2 = math.log(2)
    assert d.plateau_warning([ln2 + 0.001, ln2 - 0.002, ln2], 2, "multiclass")
    assert d.plateau_warning([ln2, ln2], 2, "multiclass") is None            # too few epochs to tell
    assert d.plateau_warning([0.69, 0.5, 0.3], 2, "multiclass") is None      # learning
    assert d.plateau_warning([math.log(5)] * 3, 5, "multiclass")
    assert d.plateau_warning([ln2] * 3, 3, "multiclass") is None             # 3 classes: chance is ln 3
    assert d.plateau_window(4) == 3 and d.plateau_window(15) == 5 and d.plateau_window(100) == 30
    slow_start = [0.704, 0.705, 0.687, 0.629, 0.639]  # a healthy 15-epoch run's first epochs
    assert d.plateau_warning(slow_start, 2, "multiclass", d.plateau_window(15)) is None
    one = np.array([[0.6, 0.4], [0.7, 0.3], [0.55, 0.45]])
    assert "'a'" in d.single_class_warning(one, ["a", "b"], "multiclass")
    assert d.single_class_warning(np.array([[0.6, 0.4], [0.3, 0.7]]), ["a", "b"], "multiclass") is None
    assert d.single_class_warning(np.array([[0.9], [0.8]]), ["neg", "pos"], "binary_sigmoid")
    assert d.chance_auroc_warning({"ci95": {"auroc": [0.42, 0.71]}, "n": 40})
    assert d.chance_auroc_warning({"ci95": {"auroc": [0.62, 0.91]}}) is None
    assert d.chance_auroc_warning({"auroc": 0.5}) is None                     # no CI computed


def test_recipe_fills_only_flags_the_user_did_not_pass():
    from util.recipes import apply_recipe
    table = {"r": {"blr": 5e-3, "crop_scale": (0.5, 1.0), "warmup_epochs": lambda a: a.epochs // 10}}
    args = argparse.Namespace(blr=1e-3, crop_scale=(0.08, 1.0), warmup_epochs=5, epochs=50)
    changed = apply_recipe(args, "r", table, given={"blr"})
    assert args.blr == 1e-3 and args.crop_scale == (0.5, 1.0) and args.warmup_epochs == 5
    assert changed == {"crop_scale": (0.5, 1.0)}


def test_run_clock_extrapolates_the_whole_run():
    import time

    from util.logger import RunClock
    clock = RunClock(start_epoch=2, end_epoch=12)
    assert clock.eta(2) is None
    clock.start -= 10.0  # 10 s for the first epoch done
    assert abs(clock.eta(3.0).total_seconds() - 90) <= 1
    assert clock.eta(12).total_seconds() == 0
    assert time.time() - clock.start >= 10


def test_small_data_recipe_learns_the_synthetic_lesion_task(us_tree, pretrained, tmp_path, medfound_log):
    """300 images of synthetic ultrasound lesions (< 1000: --recipe auto picks small_data) and only the flags
    a new user types: the model learns (the reference recipe stays at ln 2 here, test AUROC ~0.65)."""
    args = main_finetune.get_args_parser().parse_args([
        "--model", "vit_micro_patch8", "--finetune", str(pretrained), "--data_path", str(us_tree),
        "--output_dir", str(tmp_path), "--epochs", "40", "--num_workers", "0", "--device", "cpu", "--batch_size", "16",
        "--print_freq", "100", "--bootstrap", "200", "--seed", "0"])
    results = main_finetune.main(args)
    assert results["recipe"] == "small_data"
    assert "recipe small_data (180 training images < 1000)" in medfound_log.text
    assert results["test"]["auroc"] >= 0.9, results["test"]["auroc"]
    assert results["warnings"] == []


def test_one_class_folder_is_an_error_not_a_sigmoid_task(us_tree, tmp_path, capsys):
    import shutil
    data = tmp_path / "one"
    for split in ("train", "val", "test"):
        shutil.copytree(us_tree / split / "class_0", data / split / "class_0")
    with pytest.raises(SystemExit) as e:
        run_main(main_finetune.main, main_finetune.get_args_parser(), [
            "--model", "vit_micro_patch8", "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
            "--epochs", "1", "--num_workers", "0", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "at least two" in err[0] and "'class_0'" in err[0], err
    assert not (tmp_path / "out").exists()
