"""Linear probe and finetune of a SLIP/CLIP vision tower through main_finetune.py (BEiT's flag names as SLIP's
finetuning command writes them), MedSLIP's CBIS-DDSM probe (CSV layout, --recipe medslip_cbis and its compat
twin, MedCLIP's ResNet encoder, malignant precision/recall), and embed_features.py on a SLIP checkpoint.
SLIP-layout checkpoints are written by plain torch code with SLIP's key names (`module.`-prefixed
`state_dict`, `args`); tiny towers at 32 px on CPU."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from conftest import describe, run_cmd
from util.cli import UserError, parse_args
from util.label_layouts import CBIS_CLASSES, detect_layout, read_cbis
from util.registry import create_model
from util.synthetic_cbis import write_synthetic_cbis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CBIS_SCRIPT = os.path.join(REPO, "linear_probing_on_CBIS", "linear_probe_CBIS_MedSLIP.py")
QUIET = ["--device", "cpu", "--num_workers", "0", "--print_freq", "100", "--input_size", "32"]


def finetune(argv):
    import main_finetune
    return main_finetune.main(parse_args(main_finetune.get_args_parser(), list(map(str, argv))))


def save_slip(path, model_name: str, visual_only: bool = False, seed: int = 0):
    """A SLIP-layout checkpoint of a freshly initialised model (or of its vision tower's ViT alone)."""
    import models_slip
    torch.manual_seed(seed)
    if visual_only:
        tower = create_model(models_slip.vision_tower_name(model_name), num_classes=0, pool="cls")
        sd = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    else:
        sd = create_model(model_name, img_size=32).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1, "optimizer": {},
                "scaler": None, "args": {"model": model_name, "input_size": 32}}, path)
    return {k: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def cbis(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbis")
    write_synthetic_cbis(str(root), n_train=48, n_test=24, size=32)
    return root


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "checkpoint.pt"
    return path, save_slip(path, "CLIP_VIT_MICRO")


# ------------------------------------------------------------------------------------------ CBIS layout
def test_cbis_csv_layout(cbis, tmp_path):
    samples, classes = read_cbis(str(cbis), "train")
    assert classes == list(CBIS_CLASSES) and len(samples) == 48
    assert detect_layout(str(cbis)) == "cbis" and detect_layout(str(cbis / "train_calcification.csv")) == "cbis"
    assert [t for _, t in samples[:3]] == [0, 1, 2] and all(os.path.isfile(p) for p, _ in samples)
    # the test CSV beside a train CSV given as --data_path; pathology by index or in any case
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes((cbis / "images" / "train_calcification_0000.png").read_bytes())
    (tmp_path / "train_mass.csv").write_text("image_path,pathology\nimages/a.png,benign_without_callback\nimages/a.png,0\n")
    (tmp_path / "test_mass.csv").write_text("image_path,pathology\nimages/a.png,Malignant\n")
    assert [t for _, t in read_cbis(str(tmp_path / "train_mass.csv"), "train")[0]] == [2, 0]
    assert read_cbis(str(tmp_path), "test")[0][0][1] == 0
    (tmp_path / "test_mass.csv").write_text("image_path,pathology\nimages/a.png,CANCER\n")
    with pytest.raises(UserError, match=r"test_mass.csv:2: pathology 'CANCER' is not one of MALIGNANT"):
        read_cbis(str(tmp_path), "test")
    (tmp_path / "test_mass.csv").write_text("path,label\nimages/a.png,0\n")
    with pytest.raises(UserError, match="needs the columns image_path and pathology"):
        read_cbis(str(tmp_path), "test")
    (tmp_path / "train_calcification.csv").write_text("image_path,pathology\n")
    with pytest.raises(UserError, match="2 train_\\*.csv files"):
        read_cbis(str(tmp_path), "train")
    os.remove(tmp_path / "test_mass.csv")
    with pytest.raises(UserError, match="no test_mass.csv beside it"):
        read_cbis(str(tmp_path / "train_mass.csv"), "test")


def test_restart_schedule_is_per_batch_warm_restarts():
    """--compat medslip_cbis: CosineAnnealingWarmRestarts(T_0=5) stepped after every batch, as the reference."""
    from finetune_setup import restart_lr
    p = torch.nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(ref_opt, T_0=5)
    ours = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    args = type("A", (), {"lr": 1e-3})()
    steps_per_epoch = 4
    for step in range(13):
        got = restart_lr(ours, step / steps_per_epoch, args, steps_per_epoch)
        assert math.isclose(got, ref_opt.param_groups[0]["lr"], rel_tol=1e-9, abs_tol=1e-15), step
        ref_opt.step()
        sched.step()


# ------------------------------------------------------------------------------------------ SLIP tower
def test_linear_probe_of_slip_tower_loads_module_visual(clip, cbis, tmp_path):
    path, sd = clip
    out = tmp_path / "lp"
    res = finetune(["--linprobe", "--model", "vit_micro_patch8", "--cls_token", "--finetune", path, "--model_key",
                    "state_dict", "--model_prefix", "module.visual.", "--data_path", cbis, "--epochs", "1",
                    "--batch_size", "8", "--bootstrap", "0", "--output_dir", out, *QUIET])
    assert res["pretrained"]["missing"] and all(k.startswith("head") for k in res["pretrained"]["missing"])
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)["model"]
    encoder = {k: v for k, v in best.items() if not k.startswith("head")}
    assert encoder and all(torch.equal(v, sd[f"visual.{k}"]) for k, v in encoder.items())  # frozen, from the tower


def test_beit_finetune_command_runs_verbatim(cbis, tmp_path):
    """SLIP's ViT-Small finetuning command (BEiT's flags), shrunk: 1 epoch, batch 8, 3 classes, 32 px."""
    ckpt = tmp_path / "slip_vits16.pt"
    sd = save_slip(ckpt, "SLIP_VITS16", visual_only=True)
    out = tmp_path / "beit"
    res = finetune(["--batch_size", "8", "--enable_deepspeed", "--epochs", "1", "--warmup_epochs", "0",
                    "--model", "beit_small_patch16_224", "--nb_classes", "3", "--imagenet_default_mean_and_std",
                    "--model_key", "state_dict", "--model_prefix", "module.visual.", "--disable_rel_pos_bias",
                    "--abs_pos_emb", "--use_cls", "--mixup", "0.8", "--cutmix", "1", "--layer_scale_init_value", "0",
                    "--lr", "4e-3", "--drop_path", "0", "--layer_decay", "0.65", "--output_dir", out,
                    "--finetune", ckpt, "--data_path", cbis, "--bootstrap", "0", *QUIET])
    assert all(k.startswith("head") for k in res["pretrained"]["missing"]) and res["test"]["n"] == 24
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)
    pre = best["preprocessing"]
    assert pre["model"] == "vit_small_mocov3_patch16" and pre["pool"] == "cls"  # MoCo v3's ViT-S, 12 heads
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert not any("gamma" in k for k in best["model"]) and best["model"]["pos_embed"].shape[1] == 5
    assert best["model"]["blocks.0.attn.qkv.weight"].shape == sd["visual.blocks.0.attn.qkv.weight"].shape


def test_beit_flags_one_line_errors(clip, cbis, tmp_path):
    path, _ = clip
    base = ["--finetune", path, "--model_key", "state_dict", "--model_prefix", "module.visual.", "--data_path", cbis,
            "--epochs", "1", "--output_dir", tmp_path / "x", *QUIET]
    with pytest.raises(UserError, match="pass --abs_pos_emb --disable_rel_pos_bias"):
        finetune(["--model", "beit_base_patch16_224", *base])
    with pytest.raises(UserError, match=r"width 768\) but --finetune .* holds a vit_micro_patch8"):
        finetune(["--model", "beit_base_patch16_224", "--abs_pos_emb", "--disable_rel_pos_bias", *base])
    with pytest.raises(UserError, match="--use_cls asks for cls pooling but --pool is mae_avg"):
        finetune(["--model", "auto", "--use_cls", "--pool", "mae_avg", *base])


def test_layer_scale_starts_at_its_init_value(clip, cbis, tmp_path):
    """--layer_scale_init_value > 0: LayerScale gammas start at the value; the tower's weights load around them."""
    path, sd = clip
    out = tmp_path / "ls"
    finetune(["--model", "auto", "--finetune", path, "--model_key", "state_dict", "--model_prefix", "module.visual.",
              "--layer_scale_init_value", "0.1", "--freeze_encoder", "--use_cls", "--data_path", cbis, "--epochs", "1",
              "--batch_size", "8", "--bootstrap", "0", "--output_dir", out, *QUIET])
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)["model"]
    gammas = [v for k, v in best.items() if ".gamma_" in k]
    assert len(gammas) == 4 and all(torch.allclose(g, torch.full_like(g, 0.1)) for g in gammas)
    assert torch.equal(best["blocks.1.mlp.fc2.weight"], sd["visual.blocks.1.mlp.fc2.weight"])


def test_embed_features_builds_the_slip_vision_tower(clip, tmp_path):
    import embed_features
    from util.captions import write_synthetic_zeroshot
    path, _ = clip
    write_synthetic_zeroshot(str(tmp_path / "zs"), n_per_class=1, size=32, seed=1)
    args = embed_features.get_args_parser().parse_args(["--checkpoint", str(path), "--data_path",
                                                        str(tmp_path / "zs"), "--output_dir", str(tmp_path / "emb")])
    out = embed_features.main(args)
    assert out["model"] == "vit_micro_patch8" and out["pool"] == "cls" and out["dim"] == 64 and out["n"] == 9


# ------------------------------------------------------------------------------------------ CBIS probe
def _medclip_available() -> bool:
    try:
        import models_medclip  # noqa: F401
        return hasattr(models_medclip, "build_medclip_vision")
    except ImportError:
        return False


@pytest.mark.skipif(not _medclip_available(), reason="models_medclip (MedCLIP's vision towers) not present")
def test_cbis_probe_proper_and_compat(cbis, tmp_path):
    """MedSLIP's command on MedCLIP's ResNet-50 image encoder: the proper recipe keeps the frozen encoder's
    BatchNorm statistics and validates on a carve of train; the compat recipe reproduces the reference
    (val = the test CSV, BN statistics updated, last epoch tested). Both report malignant precision/recall."""
    import linear_probing_on_CBIS.linear_probe_CBIS_MedSLIP as probe  # noqa: F401  (import path check)
    import models_medclip
    enc = tmp_path / "image_encoder.pth"
    torch.manual_seed(0)
    initial = models_medclip.build_medclip_vision("resnet").state_dict()
    torch.save(initial, enc)
    runs = {}
    for recipe in ("medslip_cbis", "medslip_cbis_compat"):
        argv = ["--seed", "77", "--batchsize", "16", "--pretrain_epoch", "25", "--path", tmp_path / recipe,
                "--modeltype", "resnet", "--ipath", enc, "--epochs", "2", "--data_path", cbis, "--recipe", recipe,
                "--bootstrap", "50", *QUIET]
        runs[recipe] = probe.main(parse_args(probe.get_args_parser(), list(map(str, argv))))
        run_dir = tmp_path / recipe / "cbis_resnet_ep25_seed77"
        for name in ("confusion_test.png", "roc_test.png", "test_metrics.json", "checkpoint-best.pth"):
            assert (run_dir / name).is_file(), name
        metrics = json.loads((run_dir / "test_metrics.json").read_text())
        cm = np.array(metrics["confusion_matrix"], dtype=float)
        assert metrics["malignant_pr"]["recall"] == pytest.approx(cm[0, 0] / cm[0].sum())
        assert len(metrics["ci95"]["precision_per_class"]) == 3 and "recall" in metrics["ci95"]
        best = torch.load(run_dir / "checkpoint-best.pth", weights_only=True)["model"]
        moved = not torch.equal(best["encoder.model.bn1.running_mean"], initial["model.bn1.running_mean"])
        assert moved == (recipe == "medslip_cbis_compat"), recipe
        assert torch.equal(best["encoder.model.conv1.weight"], initial["model.conv1.weight"])  # frozen either way
        runs[recipe]["val_n"] = runs[recipe]["val_split"]["num_samples"]
    assert runs["medslip_cbis"]["val_n"] == 6 and runs["medslip_cbis_compat"]["val_n"] == 24
    assert runs["medslip_cbis_compat"]["best_epoch"] == 1


def test_cbis_script_help_is_instant():
    proc = run_cmd([sys.executable, CBIS_SCRIPT, "--help"], timeout=30)
    assert proc.returncode == 0, describe(proc)
    for flag in ("--modeltype", "--ipath", "--pretrain_epoch", "--batchsize", "medslip_cbis_compat"):
        assert flag in proc.stdout
