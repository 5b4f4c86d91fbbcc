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
    from engine_finetune import knn_classify
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
