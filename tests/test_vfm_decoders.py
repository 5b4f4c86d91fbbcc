"""VisionFM's frozen-encoder decoders: head key layouts, losses with missing targets, full-set metrics,
learning on planted signal, multi-modal fusion by image id, `--load_from --test`, the evaluation/ scripts."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import engine_vfm
from conftest import run_inprocess
import main_vfm_decoder
from models_vfm_heads import ClsHead, ForecastHead, LinearHead, RegHead, build_head
from util.cli import UserError
from util.loop import Optimization

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------- heads
def _linear(i: int, o: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.randn(o, i), "bias": torch.randn(o)}


def _bn(c: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.rand(c), "bias": torch.randn(c), "running_mean": torch.randn(c),
            "running_var": torch.rand(c) + 0.5, "num_batches_tracked": torch.tensor(7)}


def _reference_sd(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v for m, d in parts.items() for k, v in d.items()}


@pytest.mark.parametrize("layers,linears", [(3, [(64, 32), (32, 16), (16, 5)]), (2, [(64, 16), (16, 5)]),
                                            (1, [(64, 5)])])
def test_cls_head_loads_a_reference_state_dict(layers, linears):
    sd = _reference_sd({"channel_bn": _bn(64), **{f"classifier.{3 * i}": _linear(a, b)
                                                  for i, (a, b) in enumerate(linears)}})
    head = ClsHead(64, 5, layers=layers)
    assert set(head.state_dict()) == set(sd)
    head.load_state_dict(sd, strict=True)
    bn = head.channel_bn
    assert (bn.eps, bn.momentum) == (1e-6, 0.99)
    head.eval()
    x = torch.randn(3, 64)
    z = (x - sd["channel_bn.running_mean"]) / torch.sqrt(sd["channel_bn.running_var"] + 1e-6)
    z = z * sd["channel_bn.weight"] + sd["channel_bn.bias"]
    for i, _ in enumerate(linears):
        z = z @ sd[f"classifier.{3 * i}.weight"].T + sd[f"classifier.{3 * i}.bias"]
        if i < len(linears) - 1:
            z = torch.nn.functional.gelu(z)
    torch.testing.assert_close(head(x), z, rtol=1e-4, atol=1e-4)


def test_head_initialisation_and_reg_head_layout():
    torch.manual_seed(0)
    head = ClsHead(256, 5)
    w = head.classifier[0].weight.detach()
    assert abs(float(w.std()) - 0.01) < 0.001 and float(head.classifier[0].bias.detach().abs().max()) == 0.0
    reg = RegHead(4 * 32, 38)
    sd = _reference_sd({"channel_bn": _bn(128), "classifier.0": _linear(128, 32), "classifier.3": _linear(32, 38)})
    assert set(reg.state_dict()) == set(sd)
    reg.load_state_dict(sd, strict=True)
    assert reg(torch.randn(4, 128)).shape == (4, 38)
    assert set(LinearHead(8, 3).state_dict()) == {"linear.weight", "linear.bias"}


def test_forecast_head_table_clamp_and_keys():
    head = ForecastHead(8, max_len=100)
    assert set(head.state_dict()) == {"pe", "fc_1.weight", "fc_1.bias"}
    assert head.pe.shape == (100, 1, 8)
    # row d: sin(d * 10000^(-2i/D)) on even channels, cos on odd ones
    d, i = 37, 1
    freq = 10000.0 ** (-2 * i / 8)
    assert math.isclose(float(head.pe[d, 0, 2 * i]), math.sin(d * freq), abs_tol=1e-5)
    assert math.isclose(float(head.pe[d, 0, 2 * i + 1]), math.cos(d * freq), abs_tol=1e-5)
    sd = {"pe": head.pe.clone(), "fc_1.weight": torch.randn(1, 8), "fc_1.bias": torch.randn(1)}
    ref = ForecastHead(8, max_len=100)
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(3, 8)
    days = torch.tensor([5.0, 99.0, 5000.0])  # the last one is beyond the table: clamped to row 99
    expect = (x + head.pe[[5, 99, 99], 0]) @ sd["fc_1.weight"].T + sd["fc_1.bias"]
    torch.testing.assert_close(ref(x, days), expect)
    assert isinstance(build_head("forecasting", 8, 1), ForecastHead)
    assert isinstance(build_head("metric_reg", 8, 38, "linear"), LinearHead)


# ---------------------------------------------------------------------------- losses and metrics
def test_missing_regression_targets_are_out_of_loss_and_metrics():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[1.5, float("nan")], [2.0, 10.0]])
    loss = engine_vfm.masked_regression_loss(pred, target, "mse")
    assert math.isclose(float(loss.detach()), (0.25 + 1.0 + 36.0) / 3, rel_tol=1e-6)
    loss.backward()
    assert float(pred.grad[0, 1]) == 0.0 and float(pred.grad[0, 0]) != 0.0
    # metrics: target 1 has one missing value; its MAE/RMSE use the two present ones only
    y = np.array([[1.0, np.nan], [2.0, 4.0], [3.0, 6.0]])
    p = np.array([[1.5, 100.0], [2.0, 5.0], [2.0, 6.0]])
    m = engine_vfm.regression_report(y, p, ["a", "b"], n_boot=20, seed=0)
    assert m["n_per_target"] == [3, 2] and m["missing"] == 1
    assert math.isclose(m["mae_per_target"][0], 0.5) and math.isclose(m["mae_per_target"][1], 0.5)
    assert math.isclose(m["rmse_per_target"][1], math.sqrt(0.5))
    assert math.isclose(m["r2_per_target"][0], 1 - 1.25 / 2.0)
    assert math.isclose(m["mae"], 0.5)
    lo, hi = m["ci95"]["mae"]
    assert lo <= m["mae"] <= hi


def test_forecasting_metrics_by_hand():
    y = np.array([0, 1, 0, 1, 0, 1])
    p = np.array([0.1, 0.9, 0.6, 0.4, 0.2, 0.8])
    days = np.array([10, 20, 30, 400, 500, 600])
    m = engine_vfm.forecasting_report(y, p, days, [365], n_boot=0, seed=0)
    # pairs (pos, neg): 9; correctly ordered: 0.9 > all 3, 0.8 > all 3, 0.4 > 0.1, 0.2 -> 8/9
    assert math.isclose(m["auroc"], 8 / 9)
    # F1 at 0.5: TP 2 (0.9, 0.8), FP 1 (0.6), FN 1 (0.4) -> 2*2 / (2*2 + 1 + 1)
    assert math.isclose(m["f1"], 4 / 6)
    first, second = m["auroc_per_interval"]
    assert first["n"] == 3 and math.isclose(first["auroc"], 1.0)   # 0.9 vs 0.1, 0.6
    assert second["n"] == 3 and math.isclose(second["auroc"], 1.0)  # 0.4 and 0.8 vs 0.2


def test_multi_label_metrics_use_the_13_label_names_and_the_full_set():
    rng = np.random.default_rng(0)
    y = (rng.random((40, 13)) < 0.4).astype(np.float32)
    y[:2] = 1 - y[:2]
    logits = (2 * y - 1) * 2 + rng.normal(0, 1, y.shape)
    m, probs = engine_vfm.evaluate("multi_cls", logits, y, np.zeros(40), class_names=engine_vfm.VFM13_CLASSES,
                                   n_boot=20)
    assert m["class_names"][9] == "Hypertensive Retinopathy" and len(m["auroc_per_class"]) == 13
    assert math.isclose(m["auroc"], float(np.mean(m["auroc_per_class"])))
    assert m["auroc"] > 0.85 and "auroc" in m["ci95"]


# ------------------------------------------------------------------------- learning on planted signal
def _planted(task: str, n: int, d: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, d)).astype(np.float32)
    w = np.random.default_rng(99).normal(0, 1, (d, 38)).astype(np.float32)
    days = rng.integers(0, 2000, n).astype(np.float32)
    if task == "binary":
        y = (x[:, 0] - x[:, 1] + rng.normal(0, 0.3, n) > 0).astype(np.int64)
    elif task == "cls":
        y = np.argmax(x[:, :3] @ np.eye(3) * 2 + rng.normal(0, 0.3, (n, 3)), 1)
    elif task == "multi_cls":
        y = (x[:, :4] @ w[:4, :13] + rng.normal(0, 0.3, (n, 13)) > 0).astype(np.float32)  # a 4-d latent
    elif task == "metric_reg":
        y = ((x[:, :4] @ w[:4, :5] + rng.normal(0, 0.3, (n, 5))) * np.array([1, 10, 100, 0.1, 3]) + 50).astype(np.float32)
        y[rng.random(y.shape) < 0.2] = np.nan
    else:  # forecasting: the feature and a long interval both raise the risk
        y = ((x[:, 0] + (days > 1000) * 1.5 + rng.normal(0, 0.3, n)) > 0.75).astype(np.int64)
    return main_vfm_decoder.Split([str(i) for i in range(n)], x, y, days)


@pytest.mark.parametrize("task", ["cls", "binary", "multi_cls", "metric_reg", "forecasting"])
def test_each_decoder_beats_a_trivial_baseline(task):
    """binary = --num_labels 1: one logit trained with BCE, its sigmoid is P(class 1)."""
    torch.manual_seed(0)
    train, test = _planted(task, 384), _planted(task, 200, seed=1)
    k = {"cls": 3, "binary": 1, "multi_cls": 13, "metric_reg": 5, "forecasting": 1}[task]
    task = "cls" if task == "binary" else task
    head = build_head(task, 64, k, max_len=2000)
    model = engine_vfm.Decoder(head)
    args = SimpleNamespace(batch_size_per_gpu=64, seed=0, num_workers=0)
    train_loader, test_loader, sampler = main_vfm_decoder.loaders(args, train, test, None, torch.device("cpu"))
    mean = np.nanmean(train.y, 0) if task == "metric_reg" else np.zeros(1)
    std = np.nanstd(train.y, 0) if task == "metric_reg" else np.ones(1)
    fwd = engine_vfm.forward_for(task, torch.device("cpu"), target_mean=torch.tensor(mean, dtype=torch.float32),
                                 target_std=torch.tensor(std, dtype=torch.float32), pos_weight=1.0)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
    opt = Optimization(optimizer, "none")
    lr_fn = engine_vfm.cosine_lr(optimizer, 1e-2, 30)
    for epoch in range(30):
        sampler.set_epoch(epoch)
        engine_vfm.train_one_epoch(model, train_loader, opt, epoch, torch.device("cpu"), fwd, lr_fn, print_freq=1000)
    out, y, days, _ = engine_vfm.predict(model, test_loader, torch.device("cpu"))
    m, pred = engine_vfm.evaluate(task, out, y, days, target_mean=mean, target_std=std, n_boot=0)
    if k == 1 and task == "cls":
        assert out.shape[1] == 1 and m["task"] == "binary" and m["num_classes"] == 2
    if task == "metric_reg":
        ok = np.isfinite(y)
        base = np.nanmean(np.abs(np.where(ok, y - mean, np.nan)) / std, 0)  # training mean, in std units
        mine = np.nanmean(np.abs(np.where(ok, y - pred, np.nan)) / std, 0)
        assert (mine < 0.6 * base).all(), (mine, base)
        assert m["r2"] > 0.6 and m["missing"] == int((~ok).sum())
    else:  # chance is 0.5; forecasting's sinusoidal interval code is added onto the feature itself
        assert m["auroc"] > (0.75 if task == "forecasting" else 0.85), m["auroc"]


# ------------------------------------------------------------------------------------------- fusion
def _fs(stems, feats, labels):
    return SimpleNamespace(stems=list(stems), features=np.asarray(feats, np.float32), labels=np.asarray(labels),
                           extra={}, meta={})


def test_fusion_matches_ids_and_names_unmatched_ones():
    a = _fs(["p1", "p2", "p3"], [[1], [2], [3]], [0, 1, 0])
    b = _fs(["p3", "p1", "p2"], [[30, 31], [10, 11], [20, 21]], [0, 0, 1])
    s = main_vfm_decoder.fuse([("Fun", a), ("OCT", b)], "cls", "train")
    assert s.ids == ["p1", "p2", "p3"]
    np.testing.assert_array_equal(s.x, [[1, 10, 11], [2, 20, 21], [3, 30, 31]])
    np.testing.assert_array_equal(s.y, [0, 1, 0])
    c = _fs(["p1", "p2", "p9"], [[0]] * 3, [0, 0, 0])
    with pytest.raises(UserError) as e:
        main_vfm_decoder.fuse([("Fun", a), ("OCT", c)], "cls", "test")
    msg = str(e.value)
    assert "\n" not in msg and "p3" in msg and "p9" in msg and "OCT" in msg


# ---------------------------------------------------------------------------- command lines (images)
def _write_cls_images(root: str, n_train: int = 48, n_test: int = 30, forecasting: bool = False) -> str:
    from PIL import Image
    rng = np.random.default_rng(0)
    ds = os.path.join(root, "data", "dsA")
    for split, n in (("training", n_train), ("test", n_test)):
        os.makedirs(os.path.join(ds, split), exist_ok=True)
        lines = []
        for i in range(n):
            k = int(rng.integers(0, 2 if forecasting else 3))
            arr = np.clip(rng.normal(60 + 70 * k, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(ds, split, f"{i}.png"))
            lines.append(f"{split}/{i}.png, {k}, {int(rng.integers(30, 2000))}" if forecasting else f"{split}/{i}.png;{k}")
        name = f"{split}.txt" if forecasting else f"{split}_labels.txt"
        with open(os.path.join(ds, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return os.path.join(root, "data")


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    from util.registry import create_model
    import models_vit  # noqa: F401  (registers vit_micro_patch8)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("enc") / "VFM_Fundus_weights.pth")
    torch.save({"teacher": create_model("vit_micro_patch8", img_size=32, num_classes=0, pool="cls").state_dict()}, path)
    return path


def _run(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, script), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_readme_single_cls_command_then_load_from_test_reproduces(tmp_path, encoder_file):
    data = _write_cls_images(str(tmp_path))
    common = ["--name", "single_cls_debug", "--pretrained_weights", encoder_file, "--output_dir", str(tmp_path / "results"),
              "--data_path", data, "--num_labels", "3", "--batch_size_per_gpu", "16", "--arch", "vit_micro",
              "--patch_size", "8", "--input_size", "32", "--n_last_blocks", "2", "--device", "cpu",
              "--num_workers", "0", "--n_boot", "50"]
    mod = _evaluation_script("train_cls_decoder")  # training in this process; the --test run as a command line
    mod.run_main(mod.main, mod.get_args_parser(), [*common, "--epochs", "6", "--lr", "0.05"])
    out = tmp_path / "results" / "single_cls_debug"
    saved = json.loads((out / "test_metrics.json").read_text())
    assert saved["auroc"] > 0.8
    for f in ("test_roc.png", "test_pr.png", "log.txt", "checkpoint_teacher_linear.pth"):
        assert (out / f).is_file(), f
    ckpt = torch.load(out / "checkpoint_teacher_linear.pth", weights_only=True)
    assert set(ckpt["state_dict"]) >= {"module.channel_bn.weight", "module.classifier.6.bias"}
    r = run_inprocess("evaluation/train_cls_decoder.py", [*common, "--load_from",
                                                         str(out / "checkpoint_teacher_linear.pth"), "--test"])
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((out / "test_metrics.json").read_text())
    assert again.pop("reproduces_saved_metrics") is True
    assert again == saved


def test_readme_forecasting_command(tmp_path, encoder_file):
    data = os.path.join(_write_cls_images(str(tmp_path), 40, 30, forecasting=True), "dsA")
    mod = _evaluation_script("train_forecasting_decoder")
    mod.run_main(mod.main, mod.get_args_parser(), ["--data_path", data, "--pretrained_weights", encoder_file,
             "--n_last_blocks", "2", "--avgpool_patchtokens", "1", "--input_size", "32",
             "--checkpoint_key", "teacher", "--output_dir", str(tmp_path / "fc"), "--num_labels", "2", "--lr", "0.05",
             "--batch_size_per_gpu", "16", "--epochs", "6", "--arch", "vit_micro", "--patch_size", "8",
             "--device", "cpu", "--num_workers", "0", "--n_boot", "20"])
    m = json.loads((tmp_path / "fc" / "test_metrics.json").read_text())
    assert m["task"] == "forecasting" and m["auroc"] > 0.8 and len(m["auroc_per_interval"]) == 4


@pytest.mark.parametrize("argv,needle", [
    (["--task", "cls", "--data_path", "."], "--num_labels is required"),
    (["--task", "multi_cls", "--data_path", ".", "--datasets", "A", "--test"], "--load_from"),
    (["--task", "metric_reg", "--data_path", ".", "--lr", "-1"], "--lr -1"),
    (["--task", "cls", "--num_labels", "3", "--data_path", "."], "--pretrained_weights"),
    (["--task", "multi_cls", "--data_path", "/nonexistent/x", "--datasets", "A"], "--data_path"),
])
def test_bad_flags_are_one_line(argv, needle, capsys, tmp_path):
    from util.cli import run_main
    with pytest.raises(SystemExit) as e:
        run_main(main_vfm_decoder.main, main_vfm_decoder.get_args_parser(),
                 [*argv, "--output_dir", str(tmp_path / "o"), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


# ------------------------------------------------------------------------ command lines (feature sets)
def _write_store(root: str, split: str, stems, feats, labels, extra=None) -> None:
    from util.feature_store import FeatureWriter, write_manifest
    w = FeatureWriter(root, split, shard_size=64)
    w.add(list(stems), torch.as_tensor(feats), torch.as_tensor(labels), extra)
    w.flush()
    write_manifest(root, split, {"class_names": None, "target_names": None})


def _evaluation_script(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"vfm_eval_{name}", os.path.join(REPO, "evaluation", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _modalities(task: str, root: str, n_train: int = 240, n_test: int = 120) -> None:
    """Two feature sets of the same subjects, stored in different orders; the labels need both of them."""
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        rng = np.random.default_rng(seed)
        a, b = rng.normal(0, 1, (n, 16)), rng.normal(0, 1, (n, 16))
        if task == "multi_cls":  # labels 0-6 from modality A, 7-12 from modality B
            w = np.random.default_rng(5).normal(0, 1, (3, 13))
            logits = np.concatenate([a[:, :3] @ w[:, :7], b[:, :3] @ w[:, 7:]], 1)
            y = (logits + rng.normal(0, 0.2, logits.shape) > 0).astype(np.float32)
        else:  # 6 biomarkers in different units, a fifth of the values missing
            y = np.concatenate([a[:, :3] * [1, 10, 100], b[:, :3] * [0.1, 1, 5]], 1) + 20
            y[rng.random(y.shape) < 0.2] = np.nan
        stems = [f"dataset_A/{'training' if split == 'train' else 'test'}/{i:05d}" for i in range(n)]
        rev = list(range(n))[::-1]
        _write_store(os.path.join(root, "FunFeat"), split, stems, a, y)
        _write_store(os.path.join(root, "ExtFeat"), split, [stems[i] for i in rev], b[rev], y[rev])


@pytest.mark.parametrize("script,task", [("train_cls_multi_decoder", "multi_cls"),
                                         ("train_metric_reg_multi_decoder", "metric_reg")])
def test_readme_multi_modal_commands(script, task, tmp_path):
    data = str(tmp_path / "feats")
    _modalities(task, data)
    mod = _evaluation_script(script)
    argv = ["--name", "train_debug", "--output_dir", str(tmp_path / "results"), "--datasets", "FunFeat", "ExtFeat",
            "--data_path", data, "--batch_size_per_gpu", "64", "--epochs", "40", "--lr", "0.1", "--device", "cpu",
            "--n_boot", "50"]
    if task == "metric_reg":
        argv += ["--num_labels", "6", "--target_names", "a", "b", "c", "d", "e", "f"]
    metrics = mod.run_main(mod.main, mod.get_args_parser(), argv)
    out = tmp_path / "results" / "train_debug"
    saved = json.loads((out / "test_metrics.json").read_text())
    if task == "multi_cls":
        assert saved["num_classes"] == 13 and saved["class_names"][0] == "Healthy"
        assert saved["auroc"] > 0.85 and min(saved["auroc_per_class"]) > 0.7  # labels of both modalities learnt
        assert (out / "test_pr.png").is_file()
    else:
        assert saved["target_names"] == list("abcdef") and saved["missing"] > 0
        assert saved["r2"] > 0.6 and min(saved["r2_per_target"]) > 0.4  # the training mean has R² <= 0
        assert saved["mae_per_target"][2] > 5 * saved["mae_per_target"][0]  # reported in original units
        assert (out / "test_scatter.png").is_file()
    ckpt = torch.load(out / "checkpoint_teacher_linear.pth", weights_only=True)
    assert ckpt["state_dict"]["module.channel_bn.weight"].shape == (32,)  # 16 + 16 fused features
    assert metrics["n"] == 120


def test_imagenet_format_and_a_checkpoint_of_another_head(tmp_path, encoder_file, capsys):
    from PIL import Image
    for split, n in (("train", 12), ("test", 8)):
        for k, cls in enumerate(("healthy", "dr")):
            os.makedirs(tmp_path / "inet" / split / cls)
            for i in range(n // 2):
                Image.new("RGB", (32, 32), (60 + 120 * k,) * 3).save(tmp_path / "inet" / split / cls / f"{i}.png")
    from util.cli import run_main
    common = ["--dataset_format", "ImageNet", "--pretrained_weights", encoder_file, "--data_path", str(tmp_path / "inet"),
              "--arch", "vit_micro", "--patch_size", "8", "--input_size", "32", "--n_last_blocks", "2",
              "--device", "cpu", "--num_workers", "0", "--n_boot", "0", "--batch_size_per_gpu", "4"]
    m = run_main(main_vfm_decoder.main, main_vfm_decoder.get_args_parser(),
                 [*common, "--num_labels", "2", "--epochs", "1", "--output_dir", str(tmp_path / "a")])
    assert m["class_names"] == ["dr", "healthy"] and m["n"] == 8
    capsys.readouterr()
    for argv, needle in ((["--num_labels", "3", "--epochs", "1"], "2 classes"),
                         (["--num_labels", "1", "--test", "--load_from",  # a 2-logit head for a one-logit run
                           str(tmp_path / "a" / "checkpoint_teacher_linear.pth")], "--load_from")):
        with pytest.raises(SystemExit):
            run_main(main_vfm_decoder.main, main_vfm_decoder.get_args_parser(),
                     [*common, *argv, "--output_dir", str(tmp_path / "b")])
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
