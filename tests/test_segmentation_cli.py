"""main_segmentation.py (UPerNet finetuning, DeblurringMAE's TN3K recipe) end to end on synthetic ultrasound.

Session fixtures: synthetic nodule scans in the mmseg layout (sharp images only, so a deblurring backbone has
to blur them itself) and in the SEG_UNET layout (images_gaussian/ + 255 masks); a tiny deblurring ConvViT
"pretraining" checkpoint carrying a blur record; one shrunk TN3K run through tools/dist_train.sh; one plain-
flag run of a tiny ViT on the SEG_UNET layout (the reference for the kill-and-resume test).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env, describe, free_port, run_cmd, run_inprocess

REPO = Path(__file__).resolve().parents[1]
TN3K = "configs/de_convmae/upernet_de_convmae_us280k_base_gaussian_800_512_tn3k.py"
BLUR = {"method": "gaussian", "sigma": 1.1, "ksize": 5, "grayscale": True, "seed": 0}
# The TN3K command shrunk by explicit flags: tiny ConvViT, 64 px, 40 iterations of 8 images.
SHRINK = ["--model", "convvit_micro_patch16", "--input_size", "64", "--max_iters", "40", "--batch_size", "8",
          "--lr", "1e-3", "--channels", "32", "--device", "cpu", "--num_workers", "0", "--bootstrap", "200",
          "--print_freq", "100"]
# Plain flags: tiny ViT on 32 px SEG_UNET data, 12 iterations, validation every 6, checkpoints every 2.
PLAIN = ["--model", "vit_micro_patch8", "--input_size", "32", "--max_iters", "12", "--eval_freq", "6",
         "--batch_size", "4", "--lr", "1e-3", "--channels", "16", "--layout", "seg_unet", "--eval", "mIoU",
         "--save_every_steps", "2", "--device", "cpu", "--num_workers", "0", "--bootstrap", "50",
         "--print_freq", "100"]


@pytest.fixture(scope="session")
def us_mmseg(tmp_path_factory) -> Path:
    from util.synthetic_seg import write_us_segmentation
    root = tmp_path_factory.mktemp("us_mmseg")
    write_us_segmentation(str(root), "mmseg", num=16, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def us_seg_unet(tmp_path_factory) -> Path:
    from util.synthetic_seg import write_us_segmentation
    root = tmp_path_factory.mktemp("us_seg_unet")
    write_us_segmentation(str(root), "seg_unet", num=8, size=32, seed=1)
    return root


@pytest.fixture(scope="session")
def deblur_ckpt(tmp_path_factory) -> Path:
    """A tiny ConvViT encoder saved as a deblurring pretraining checkpoint with its preprocessing record."""
    import torch
    import models_convmae  # noqa: F401
    from util.registry import create_model
    torch.manual_seed(0)
    sd = {k: v for k, v in create_model("convvit_micro_patch16", img_size=64, num_classes=0).state_dict().items()
          if not k.startswith(("head", "fc_norm", "norm."))}
    path = tmp_path_factory.mktemp("deblur_ckpt") / "dconvmae_micro.pth"
    torch.save({"model": sd, "epoch": 0, "preprocessing": {
        "input_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "norm_preset": "imagenet",
        "deblur": True, "blur": dict(BLUR), "model": "dconvmae_convvit_micro_patch16"}}, path)
    return path


@pytest.fixture(scope="session")
def tn3k_run(us_mmseg, deblur_ckpt, tmp_path_factory):
    """DeblurringMAE's README command, `tools/dist_train.sh CONFIG 1 --work-dir --options model.pretrained=`,
    shrunk by explicit flags."""
    work = tmp_path_factory.mktemp("tn3k") / "work"
    proc = run_cmd(["bash", REPO / "tools" / "dist_train.sh", TN3K, "1", "--work-dir", work, "--options",
                    f"model.pretrained={deblur_ckpt}", "--data_path", us_mmseg, *SHRINK], timeout=240,
                   env=child_env(PORT=str(free_port())))
    assert proc.returncode == 0, describe(proc)
    return work, proc


def _python(args, **env) -> subprocess.CompletedProcess:
    """main_segmentation.py ARGS: in this process, or in a child when it needs test hooks in its environment."""
    if not env:
        return run_inprocess("main_segmentation.py", args)
    return run_cmd([sys.executable, "main_segmentation.py", *map(str, args)], timeout=180, env=child_env(**env))


@pytest.fixture(scope="session")
def plain_run(us_seg_unet, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "out"
    proc = _python([*PLAIN, "--data_path", us_seg_unet, "--output_dir", out])
    assert proc.returncode == 0, describe(proc)
    return out, proc


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ tests
def test_tn3k_preset_runs_as_written_and_beats_background(tn3k_run):
    work, proc = tn3k_run
    for name in ("checkpoint-best.pth", "checkpoint-last.pth", "log.txt", "test_metrics.json", "test_table.md",
                 "test_overlay.png", "tensorboard"):
        assert (work / name).exists(), name
    # the deblurring backbone's blur comes from the checkpoint record and is applied (the data holds sharp images)
    assert "input blur: gaussian(sigma=1.1) from the checkpoint's preprocessing record, applied to the images" \
        in proc.stdout
    first = json.loads((work / "log.txt").read_text().splitlines()[0])
    assert first["preset"] == "upernet_de_convmae_us280k_base_gaussian_800_512_tn3k"
    assert first["layout"] == "mmseg"
    applied = first["applied"]
    assert applied["layer_decay"] == 0.75 and applied["weight_decay"] == 0.05 and applied["power"] == 1.0
    assert applied["eval"] == ["mDice"]  # the configs' save_best
    for typed in ("model", "input_size", "max_iters", "batch_size", "lr"):  # explicit flags win
        assert typed not in applied
    table = (work / "test_table.md").read_text()
    assert table.startswith("| Class | IoU | Acc | Dice |") and "| nodule |" in table
    report = _metrics(work / "test_metrics.json")
    nodule_iou = report["iou_per_class"][1]
    # all-background predicts no nodule pixel: nodule IoU 0; all-foreground: IoU = the nodule fraction
    fraction = report["pixels_per_class"][1] / sum(report["pixels_per_class"])
    assert nodule_iou > max(0.2, 2 * fraction), report
    assert report["mIoU_ci"][0] <= report["mIoU"] <= report["mIoU_ci"][1]
    assert "tools/dist_test.sh " + TN3K in proc.stdout  # the summary's next command is the test command
    import torch
    best = torch.load(work / "checkpoint-best.pth", weights_only=True)
    assert best["preprocessing"]["blur"] == BLUR and best["preprocessing"]["task"] == "segmentation"


def test_dist_test_reproduces_saved_metrics(tn3k_run, us_mmseg, tmp_path):
    work, _ = tn3k_run
    proc = run_cmd(["bash", REPO / "tools" / "dist_test.sh", TN3K, work / "checkpoint-best.pth", "1", "--eval",
                    "mIoU", "--data_path", us_mmseg, "--work-dir", tmp_path, "--device", "cpu", "--num_workers", "0",
                    "--bootstrap", "200"], timeout=180, env=child_env(PORT=str(free_port())))
    assert proc.returncode == 0, describe(proc)
    saved, again = _metrics(work / "test_metrics.json"), _metrics(tmp_path / "eval_test_metrics.json")
    for key in ("mIoU", "mDice", "aAcc", "iou_per_class", "acc_per_class", "mIoU_ci", "mDice_ci"):
        assert again[key] == pytest.approx(saved[key], abs=1e-9), key
    assert (tmp_path / "eval_test_table.md").read_text() == (work / "test_table.md").read_text()


def test_resume_after_kill_gives_the_same_result(plain_run, us_seg_unet, tmp_path):
    import torch
    ref, _ = plain_run
    out = tmp_path / "out"
    args = [*PLAIN, "--data_path", us_seg_unet, "--output_dir", out]
    killed = _python(args, MEDFOUND_TEST_KILL_AT_UPDATE="9")  # mid-way through the second validation round
    assert killed.returncode != 0 and (out / "checkpoint-last.pth").is_file()
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["resume_point"]["step"] == 2
    resumed = _python(args)
    assert resumed.returncode == 0, describe(resumed)
    assert "resumed from" in resumed.stdout
    a = torch.load(ref / "checkpoint-last.pth", weights_only=True)["model"]
    b = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert _metrics(out / "test_metrics.json")["iou_per_class"] == _metrics(ref / "test_metrics.json")["iou_per_class"]


def test_plain_flags_read_the_seg_unet_layout(plain_run):
    out, proc = plain_run
    first = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert first["layout"] == "seg_unet" and first["preset"] is None
    assert "images come from images_gaussian/ (already blurred)" in proc.stdout
    rounds = [json.loads(x) for x in (out / "log.txt").read_text().splitlines() if '"round"' in x]
    assert [r["iter"] for r in rounds] == [6, 12] and all("val_mIoU" in r for r in rounds)
    assert "python main_segmentation.py --eval_only --resume" in proc.stdout


def test_preset_filled_under_explicit_flags():
    import seg_args
    from util.cli import parse_args
    from util.cli import UserError
    forms = ["upernet_convmae_us280k_base_800_512_tnui", "configs/convmae/upernet_convmae_us280k_base_800_512_tnui.py",
             "upernet_convmae_us280k_base_800_512_tnui.py"]
    assert {seg_args.preset_name(f) for f in forms} == {"upernet_convmae_us280k_base_800_512_tnui"}
    p = seg_args.get_args_parser()
    a = parse_args(p, ["--config", TN3K, "--layer_decay", "0.9", "--input_size", "64",
                       "--options", "model.pretrained=x.pth", "runner.max_iters=300"])
    applied = seg_args.resolve_args(a, set(a.explicit_flags), world_size=2)
    assert (a.layer_decay, a.input_size, a.finetune, a.max_iters) == (0.9, 64, "x.pth", 300)
    assert (a.lr, a.weight_decay, a.power, a.warmup_iters, a.batch_size) == (1e-4, 0.05, 1.0, 1500, 8)
    assert a.model == "convvit_base_patch16" and a.deblur_preset and a.eval == ["mDice"]
    assert "layer_decay" not in applied and applied["batch_size"] == 8
    assert seg_args.schedule_lengths(a, set(a.explicit_flags), 10)["warmup_iters"] == 30  # a tenth of 300
    assert seg_args.poly_lr(0, a) == pytest.approx(1e-10)
    assert seg_args.poly_lr(30, a) == pytest.approx(1e-4 * 0.9)
    assert seg_args.poly_lr(150, a) == pytest.approx(0.5e-4) and seg_args.poly_lr(300, a) == 0.0
    a = parse_args(p, ["--model", "vit_base_patch16", "--blr", "1e-3", "--batch_size", "4"])
    seg_args.resolve_args(a, set(a.explicit_flags), world_size=2)
    assert a.lr == pytest.approx(1e-3 * 8 / 256) and a.preset is None and not a.deblur_preset
    with pytest.raises(UserError, match="does not divide"):
        b = parse_args(p, ["--config", TN3K])
        seg_args.resolve_args(b, set(b.explicit_flags), world_size=3)


def test_preset_on_seg_unet_uses_blurred_images(us_seg_unet, deblur_ckpt, tmp_path, capsys):
    import main_segmentation
    from bad_input_helpers import run_cli
    out = tmp_path / "w"
    run_cli(main_segmentation, ["--config", TN3K, "--pretrained", str(deblur_ckpt), "--data_path", str(us_seg_unet),
                                "--work-dir", str(out), "--input_size", "32", "--max_iters", "2", "--batch_size",
                                "4", "--model", "convvit_micro_patch16", "--channels", "16", "--device", "cpu",
                                "--num_workers", "0", "--bootstrap", "0", "--vis_images", "0", "--grad_ckpt"])
    assert "images come from images_gaussian/ (already blurred)" in capsys.readouterr().out
    assert json.loads((out / "log.txt").read_text().splitlines()[0])["layout"] == "seg_unet"


def test_bad_flags_one_line_and_nothing_left(us_mmseg, deblur_ckpt, tmp_path, capsys):
    import torch
    import main_segmentation
    from bad_input_helpers import expect_exit_2
    out = tmp_path / "never"
    bare = tmp_path / "bare.pth"
    torch.save({"model": torch.load(deblur_ckpt, weights_only=True)["model"]}, bare)  # no preprocessing record
    base = ["--model", "convvit_micro_patch16", "--input_size", "64", "--max_iters", "2", "--device", "cpu",
            "--num_workers", "0", "--output_dir", str(out)]
    cases = [
        (["--config", "upernet_de_convmae_tn3k", *base], "not a known preset"),
        (["--config", TN3K, "--options", "model.backbone.depth=3", *base], "--options model.backbone.depth"),
        (["--config", TN3K, "--data_path", str(tmp_path / "nope"), *base], "not a folder"),
        (["--config", TN3K, "--data_path", str(us_mmseg), "--pretrained", str(tmp_path / "x.pth"), *base],
         "no such file"),
        (["--config", TN3K, "--data_path", str(us_mmseg), "--pretrained", str(bare), *base], "--blur gaussian"),
        (["--config", TN3K, "--data_path", str(us_mmseg), "--model", "vit_nonexistent", *base[2:]], "--model"),
        (["--data_path", str(us_mmseg), "--lr", "1e-4", "--blr", "1e-3", *base], "--lr and --blr"),
        (["--data_path", str(us_mmseg), "--layer_decay", "1.5", *base], "--layer_decay"),
        (["--data_path", str(us_mmseg), "--eval_only", *base], "--eval_only needs --resume"),
        (["--data_path", str(us_mmseg), "--compat", "mmseg", *base], "--compat mmseg"),
        (["--data_path", str(us_mmseg), "--input_size", "40", *base[:2], *base[4:]], "multiple"),
    ]
    for argv, expected in cases:
        line = expect_exit_2(main_segmentation, argv, capsys)
        assert expected in line, (argv, line)
        assert not out.exists(), (argv, "left files behind")


def test_compat_mmseg_convmae_decays_the_position_table():
    """Default: backbone.pos_embed has no weight decay; --compat mmseg_convmae gives it decay (mmseg's quirk).
    Layer decay: ConvViT blocks3.k at 0.65^(L - k - 1), the decode head at full lr."""
    import argparse
    import main_segmentation
    args = argparse.Namespace(model="convvit_micro_patch16", num_classes=2, input_size=32, drop_path=0.0,
                              channels=16, aux_weight=0.4, weight_decay=0.05, layer_decay=0.65, lr=1e-4, compat="")
    model = main_segmentation.build_model(args)

    def decay_of(opt, name):
        param = dict(model.named_parameters())[name]
        return next(g for g in opt.param_groups if any(p is param for p in g["params"]))
    default = decay_of(main_segmentation.build_optimizer(model, args), "backbone.pos_embed")
    args.compat = "mmseg_convmae"
    quirk = main_segmentation.build_optimizer(model, args)
    assert default["weight_decay"] == 0.0 and decay_of(quirk, "backbone.pos_embed")["weight_decay"] == 0.05
    layers = model.num_decay_layers
    assert decay_of(quirk, "backbone.blocks3.0.attn.qkv.weight")["lr_scale"] == pytest.approx(0.65 ** (layers - 1))
    assert decay_of(quirk, next(n for n, _ in model.named_parameters() if n.startswith("decode_head")))["lr_scale"] == 1.0


def test_visionfm_layout_detected_and_masks_checked_first(tmp_path, capsys):
    import main_segmentation
    from bad_input_helpers import expect_exit_2, run_cli
    from util.synthetic_vfm import write_vfm_task
    write_vfm_task(str(tmp_path / "vfm"), "segmentation", num=6, img_size=32, seed=0)
    root = next(p for p in (tmp_path / "vfm").rglob("training")).parent.parent  # the folder holding <ds>/
    base = ["--model", "vit_micro_patch8", "--data_path", str(root), "--input_size", "32", "--max_iters", "2",
            "--batch_size", "2", "--channels", "16", "--device", "cpu", "--num_workers", "0", "--bootstrap", "0",
            "--vis_images", "0"]
    out = tmp_path / "two"
    line = expect_exit_2(main_segmentation, [*base, "--output_dir", str(out)], capsys)  # 3 classes, 2 declared
    assert "mask value" in line and not out.exists()
    run_cli(main_segmentation, [*base, "--num_classes", "3", "--output_dir", str(tmp_path / "three")])
    first = json.loads((tmp_path / "three" / "log.txt").read_text().splitlines()[0])
    assert first["layout"] == "vfm"
    report = _metrics(tmp_path / "three" / "test_metrics.json")
    assert report["class_names"] == ["background", "class_1", "class_2"]


def test_help_is_instant_and_states_the_recipe():
    probe = ("import runpy, sys\nsys.argv = ['main_segmentation.py', '--help']\ncode = None\ntry:\n"
             "    runpy.run_path('main_segmentation.py', run_name='__main__')\nexcept SystemExit as e:\n"
             "    code = e.code\nprint('PROBE', 'torch' in sys.modules, code)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "PROBE False 0", out.stderr
    for words in ("upernet_de_convmae_us280k_base_gaussian_800_512_tn3k", "--work-dir", "mmseg: 160000", "ours:",
                  "mmseg_convmae"):
        assert words in out.stdout, words
    for script in ("dist_train.sh", "dist_test.sh"):
        bad = subprocess.run(["bash", str(REPO / "tools" / script)], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and bad.stderr.startswith("usage:")


def test_two_processes_train_and_test_every_image(us_seg_unet, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank reads its half of every global batch and its shard of
    val/test; the gathered test set counts every image once."""
    out = tmp_path / "ddp"
    args = [a for a in PLAIN]
    args[args.index("--batch_size") + 1] = "2"
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), "main_segmentation.py", *args, "--data_path", us_seg_unet, "--output_dir", out],
                   timeout=180)
    assert proc.returncode == 0, describe(proc)
    report = _metrics(out / "test_metrics.json")
    assert report["num_images"] == 8 and sum(report["pixels_per_class"]) == 8 * 32 * 32
    assert "12 iterations at 2 x 2 images" in proc.stdout
