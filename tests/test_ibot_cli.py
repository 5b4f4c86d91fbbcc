"""iBOT / VisionFM pretraining wiring: flags (VisionFM's README command verbatim, one-line errors), the step
(teacher without gradients, masked student, loss and health scalars), the hooks around the update (EMA
teacher by name and never on a skipped step, last-layer freeze, per-parameter clipping), the schedules,
the checkpoint layout, exact resume and finetuning the teacher. Tiny networks (ibot_vit_micro_patch8:
D 64, depth 2, 32/16-px crops) on CPU."""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

from conftest import child_env, describe, run_cmd, run_inprocess

CPU = torch.device("cpu")
MICRO = "ibot_vit_micro_patch8"
OUT_DIM = 64


def networks(seed: int = 0, shared_head: bool = True):
    import models_ibot  # noqa: F401  (registers the factories)
    from main_ibot import copy_by_name
    from util.registry import create_model
    torch.manual_seed(seed)
    kw = dict(img_size=32, out_dim=OUT_DIM, patch_out_dim=OUT_DIM, shared_head=shared_head)
    student = create_model(MICRO, **kw)
    teacher = create_model(MICRO, teacher=True, **kw)
    copy_by_name(student, teacher)
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def ibot_loss(epochs: int = 10, local: int = 2):
    from models_ibot import iBOTLoss
    return iBOTLoss(OUT_DIM, OUT_DIM, 2, local, 0.04, 0.04, 0.04, 0.07, 0, epochs)


def synthetic_images(n: int = 8, size: int = 32) -> torch.Tensor:
    from util.synthetic import fundus_sample
    imgs = [torch.from_numpy(fundus_sample(i, size=size, n_lesions=i % 3).image).permute(2, 0, 1) for i in range(n)]
    return torch.stack(imgs).float().div(255).sub(0.4).div(0.25)


def crops_batch(imgs: torch.Tensor, g: torch.Generator, local: int = 2) -> dict:
    """Two global views (flips + noise) and `local` 16-px views of the same images, and a block of masked
    patches per global view."""
    def view(x: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(x.shape[0], 1, 1, 1, generator=g) < 0.5
        return torch.where(flip, x.flip(-1), x) + 0.1 * torch.randn(x.shape, generator=g)
    views = [view(imgs), view(imgs)]
    views += [torch.nn.functional.interpolate(view(imgs), size=16, mode="bilinear", antialias=True)
              for _ in range(local)]
    masks = [torch.rand(imgs.shape[0], 4, 4, generator=g) < 0.3 for _ in range(2)]
    return {"crops": views, "masks": masks}


def optimization(student, teacher, epochs: int, steps: int, lr: float = 2e-3, clip_mode: str = "global",
                 freeze: int = 0, warmup: int = 1):
    from engine_ibot import GradientHooks, Schedules, TeacherEMA
    from main_ibot import build_optimizer
    from types import SimpleNamespace
    from util.loop import Optimization
    args = SimpleNamespace(weight_decay=0.04, optimizer="adamw")
    opt = Optimization(build_optimizer(student, args), "none", 1, 3.0 if clip_mode == "global" else None, 5)
    schedules = Schedules(lr, 1e-5, warmup, 0.04, 0.4, 0.9, epochs, steps)
    opt.before_step = GradientHooks(opt, freeze, 3.0 if clip_mode == "per_param" else 0.0)
    opt.after_step = TeacherEMA(student, teacher, schedules, opt)
    return opt, schedules


# ------------------------------------------------------------------------------------------- the step
def test_forward_returns_loss_and_health_scalars():
    from engine_ibot import ibot_forward
    student, teacher = networks()
    loss_fn = ibot_loss()
    batch = crops_batch(synthetic_images(4), torch.Generator().manual_seed(0))
    loss, scalars = ibot_forward(student, batch, teacher, loss_fn, 0, CPU, 2, momentum=0.99)
    assert set(scalars) == {"cls", "patch", "teacher_entropy", "teacher_std", "momentum"}
    assert torch.isclose(loss.detach(), scalars["cls"] + scalars["patch"])
    assert 0 < float(scalars["teacher_entropy"]) <= math.log(OUT_DIM) + 1e-4 and float(scalars["teacher_std"]) > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()), "the teacher must take no gradient"
    assert student.backbone.masked_embed.grad is not None and student.backbone.masked_embed.grad.abs().sum() > 0
    assert torch.count_nonzero(loss_fn.center) > 0, "the loss centre moves after the step"


def distinct_images(n: int = 8) -> torch.Tensor:
    """Images a micro network can tell apart: smooth random colour fields (4x4 noise upsampled)."""
    x = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    return torch.nn.functional.interpolate(x, size=32, mode="bilinear").sub(0.5).div(0.25)


def test_loss_decreases_without_collapse():
    """48 updates on 8 distinct images: the loss falls and the teacher stays informative (its outputs vary
    across images and it assigns different images to different prototypes), with no collapse warning."""
    from engine_ibot import collapse_warning, ibot_forward
    from util.loop import train_epoch
    student, teacher = networks()
    loss_fn = ibot_loss(epochs=6)
    imgs = distinct_images()
    g = torch.Generator().manual_seed(0)
    steps = 8
    batches = [crops_batch(imgs, g) for _ in range(steps)]
    opt, schedules = optimization(student, teacher, 6, steps, lr=3e-3)
    history = []
    for epoch in range(6):
        stats = train_epoch(student, batches, opt, epoch, CPU,
                            forward=lambda m, b: ibot_forward(
                                m, b, teacher, loss_fn, epoch, CPU, 2,
                                momentum=lambda: schedules.momentum_at(opt.epoch_progress)),
                            lr_fn=schedules.lr_fn(opt.optimizer), wd_fn=schedules.wd_fn, print_freq=100)
        history.append(stats)
    first, last = history[0], history[-1]
    assert last["loss"] < 0.6 * first["loss"], [h["loss"] for h in history]
    assert last["patch"] < first["patch"] and last["cls"] < first["cls"]
    assert last["teacher_entropy"] > 0.01 and last["teacher_std"] > 0.02, last
    assert collapse_warning(last["teacher_entropy"], last["teacher_std"], OUT_DIM) is None
    with torch.no_grad():
        assigned = teacher([imgs]).cls.argmax(-1)
    assert len(set(assigned.tolist())) >= 3, f"the teacher maps the 8 images to {assigned.tolist()}"
    assert opt.skipped_steps == 0
    assert first["momentum"] < last["momentum"] <= 1.0


def test_collapse_warning_names_both_kinds():
    from engine_ibot import collapse_warning
    assert "one output" in collapse_warning(0.01, 0.0, 8192)
    assert "uniform" in collapse_warning(math.log(8192) - 0.01, 1e-6, 8192)
    assert collapse_warning(4.0, 0.5, 8192) is None


# ------------------------------------------------------------------------------------------ the hooks
def test_ema_by_name_follows_the_momentum_schedule_and_skips_poisoned_steps():
    """After a good update teacher = m * teacher + (1 - m) * student (the schedule's m at that step); a
    poisoned (non-finite) update changes neither the student nor the teacher."""
    from engine_ibot import ibot_forward
    student, teacher = networks()
    loss_fn = ibot_loss()
    steps = 4
    opt, schedules = optimization(student, teacher, 2, steps, warmup=0)
    opt.poison_steps = {1}  # the second update
    imgs = synthetic_images(4)
    g = torch.Generator().manual_seed(0)
    s_names = dict(student.named_parameters())
    for step in range(3):
        opt.epoch_progress = step / steps
        schedules.lr_fn(opt.optimizer)(opt.epoch_progress)
        before_t = {k: v.detach().clone() for k, v in teacher.named_parameters()}
        before_s = {k: v.detach().clone() for k, v in student.named_parameters()}
        loss, _ = ibot_forward(student, crops_batch(imgs, g), teacher, loss_fn, 0, CPU, 2)
        opt.step(loss, student, step)
        m = schedules.momentum_at(step / steps)
        if step == 1:
            assert all(torch.equal(before_t[k], v) for k, v in teacher.named_parameters()), "EMA on a skipped step"
            assert all(torch.equal(before_s[k], v) for k, v in student.named_parameters())
        else:
            assert any(not torch.equal(before_s[k], v) for k, v in student.named_parameters())
            for k, v in teacher.named_parameters():
                want = before_t[k] * m + s_names[k].detach() * (1 - m)
                assert torch.allclose(v, want, atol=1e-6), k
    opt.check()
    assert opt.skipped_steps == 1
    assert schedules.momentum_at(0.0) == pytest.approx(0.9) and 0.9 < schedules.momentum_at(1.0) <= 1.0


def test_last_layer_frozen_in_first_epochs_and_per_param_clip():
    from engine_ibot import GradientHooks
    from util.loop import Optimization
    student, _ = networks(shared_head=False)
    opt = Optimization(torch.optim.SGD(student.parameters(), lr=0.1), "none")
    for p in student.parameters():
        p.grad = torch.full_like(p, 10.0) if p.requires_grad else None
    hooks = GradientHooks(opt, freeze_last_layer=1, per_param_clip=3.0)
    opt.epoch_progress = 0.5
    hooks(student)
    named = dict(student.named_parameters())
    assert named["head.last_layer.weight_v"].grad is None and named["head.last_layer2.weight_v"].grad is None
    kept = [p for n, p in named.items() if p.grad is not None]
    assert kept and all(p.grad.norm() <= 3.0 + 1e-4 for p in kept)
    for p in student.parameters():
        p.grad = torch.full_like(p, 1e-3) if p.requires_grad else None
    opt.epoch_progress = 1.0
    hooks(student)
    assert named["head.last_layer.weight_v"].grad is not None, "frozen past --freeze_last_layer"
    assert torch.equal(named["head.mlp.0.weight"].grad, torch.full_like(named["head.mlp.0.weight"], 1e-3)), \
        "small gradients are not clipped"


def test_schedules_match_the_reference_arrays():
    from engine_ibot import Schedules
    from util.lr_sched import cosine_scheduler
    s = Schedules(1e-3, 1e-6, 2, 0.04, 0.4, 0.996, 10, 5)
    lr = cosine_scheduler(1e-3, 1e-6, 10, 5, warmup_epochs=2)
    assert [s.lr_fn(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0))(i / 5) for i in range(50)] == \
        pytest.approx(list(lr))
    assert s.wd_fn(0.0) == pytest.approx(0.04) and s.wd_fn(49 / 5) == pytest.approx(0.4, rel=1e-3)
    assert s.momentum_at(0.0) == pytest.approx(0.996) and s.momentum_at(49 / 5) == pytest.approx(1.0, abs=1e-5)


def test_optimizer_groups_are_ibots():
    """[decayed weights, biases and norms without decay], frozen weight_g left out."""
    from types import SimpleNamespace
    from main_ibot import build_optimizer
    student, _ = networks()
    opt = build_optimizer(student, SimpleNamespace(weight_decay=0.04, optimizer="adamw"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    frozen = student.head.last_layer.weight_g
    assert not any(p is frozen for g in opt.param_groups for p in g["params"])
    assert opt.defaults["betas"] == (0.9, 0.999)


# --------------------------------------------------------------------------------------- command line
def run_ibot(flags: list, timeout: float = 240, env: dict | None = None, script: str = "main_pretrain.py"):
    return run_cmd([sys.executable, script, *map(str, flags)], timeout=timeout, env=env)


@pytest.mark.parametrize("flags, words", [
    (["--load_pretrain"], "--pretrain_path"),
    (["--load_pretrain", "--pretrain_path", "/no/such/file.pth"], "/no/such/file.pth"),
    (["--momentum_teacher", "1.5"], "--momentum_teacher"),
    (["--pred_ratio", "0", "0.3", "--pred_ratio_var", "0.2"], "--pred_ratio"),
    (["--global_crops_scale", "0.9", "0.3"], "--global_crops_scale"),
    (["--modality", "Retina"], "--modality"),
    (["--arch", "vit_tiny", "--input_size", "100"], "--input_size"),
])
def test_bad_flags_are_one_line(flags, words, tmp_path):
    # main_ibot.py in this process: main_pretrain.py's hand-over to it is tested through VisionFM's command
    proc = run_inprocess("main_ibot.py", ["--data_path", tmp_path, "--output_dir", tmp_path / "out", "--device", "cpu",
                                          *flags])
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists(), "a bad flag must stop before any folder is made"


def test_recipe_ibot_fills_only_untyped_flags():
    import ibot_args
    from main_ibot import resolve_args
    from util.cli import parse_args
    args = parse_args(ibot_args.get_args_parser(), ["--recipe", "ibot", "--lr", "1e-3", "--model", MICRO,
                                                    "--input_size", "32"])
    resolve_args(args)
    assert args.lr == 1e-3 and args.warmup_teacher_temp == 0.04 and args.freeze_last_layer == 1
    assert args.global_crops_scale == [0.14, 1.0] and args.min_lr == 1e-6 and args.warmup_epochs == 10
    vfm = parse_args(ibot_args.get_args_parser(), ["--model", MICRO, "--input_size", "32", "--name", "r"])
    resolve_args(vfm)
    assert (vfm.lr, vfm.warmup_teacher_temp, vfm.freeze_last_layer, vfm.global_crops_scale) == (7.5e-5, 0.07, 3,
                                                                                               [0.32, 1.0])
    assert vfm.output_dir.endswith(os.path.join("output_dir", "r")) and vfm.patch_size == 8


# ------------------------------------------------------------------------------- end to end (CPU, tiny)
def write_modality_tree(root) -> None:
    """VisionFM's layout: root/Fundus/*.png (16 distinct 40-px images) plus one unreadable file."""
    from PIL import Image
    folder = root / "Fundus"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(16):
        cells = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(cells).resize((40, 40), Image.BILINEAR).save(folder / f"{i:02d}.png")
    (folder / "broken.png").write_bytes(b"not an image")


def readme_flags(data, out, pretrained) -> list:
    """VisionFM's README pretraining command, shrunk (tiny model, 32/16-px crops, 3 epochs, CPU)."""
    return ["--local-rank=0", "--data_path", data, "--modality", "Fundus", "--norm_last_layer", "true",
            "--epochs", "3", "--batch_size_per_gpu", "4", "--shared_head", "true", "--out_dim", OUT_DIM,
            "--output_dir", out, "--global_crops_scale", "0.32", "1.0", "--pred_ratio", "0", "0.3",
            "--pred_ratio_var", "0", "0.2", "--name", "Train_Random_Fundus", "--load_pretrain",
            "--pretrain_path", pretrained,
            # shrunk sizes and a learning rate that moves the weights in 12 steps
            "--model", MICRO, "--patch_out_dim", OUT_DIM, "--input_size", "32", "--local_crops_number", "2",
            "--local_crop_size", "16", "--lr", "0.05", "--warmup_epochs", "1", "--device", "cpu",
            "--num_workers", "0", "--print_freq", "2", "--saveckp_freq", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    import models_ibot  # noqa: F401
    from util.registry import create_model
    root = tmp_path_factory.mktemp("ibot")
    write_modality_tree(root / "data")
    torch.manual_seed(1)
    dino = create_model(MICRO, teacher=True, img_size=32, out_dim=OUT_DIM, patch_out_dim=OUT_DIM)
    torch.save({"teacher": dino.state_dict(), "epoch": 99}, root / "dino.pth")  # a DINO/iBOT-style release file
    flags = readme_flags(root / "data", root / "results", root / "dino.pth")
    proc = run_ibot(flags)
    assert proc.returncode == 0, describe(proc)
    return root, flags, proc, root / "results" / "Train_Random_Fundus"


def test_readme_command_writes_the_reference_layout(readme_run):
    from util.checkpoint import load_file
    root, _, proc, run = readme_run
    assert "broken.png" in proc.stdout and "skipped" in proc.stdout
    assert "loaded" in proc.stdout and "--load_pretrain: backbone initialised" in proc.stdout
    assert "--checkpoint_key teacher" in proc.stdout
    ckpt = load_file(str(run / "checkpoint-last.pth"))
    assert {"student", "teacher", "ibot_loss", "optimizer", "epoch", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and (run / "checkpoint-0.pth").is_file() and (run / "log.txt").is_file()
    assert all(k.startswith("module.") for k in ckpt["student"]) and "module.backbone.masked_embed" in ckpt["student"]
    teacher = ckpt["teacher"]
    assert {"head.last_layer.weight_g", "head.last_layer.weight_v", "head.last_layer2.weight_g"} <= set(teacher)
    assert "backbone.masked_embed" not in teacher and "backbone.blocks.0.attn.qkv.weight" in teacher
    assert tuple(ckpt["ibot_loss"]["center"].shape) == (1, OUT_DIM)
    assert tuple(ckpt["ibot_loss"]["center2"].shape) == (1, 1, OUT_DIM)
    assert ckpt["args"]["modality"] == "Fundus" and ckpt["args"]["batch_size"] == 4
    # The pretrained backbone was the starting point: after 12 small EMA steps the teacher is still close to it.
    dino = torch.load(root / "dino.pth", weights_only=True)["teacher"]
    assert (teacher["backbone.pos_embed"] - dino["backbone.pos_embed"]).abs().max() < 0.05
    lines = [__import__("json").loads(x) for x in (run / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]
    assert all({"train_cls", "train_patch", "train_teacher_entropy", "train_teacher_std", "train_momentum"} <= set(x)
               for x in lines)


def test_kill_and_resume_is_exact(readme_run, tmp_path):
    """SIGKILL after update 6 (epoch 1, step 2) with --save_every_steps 1, then the same command again:
    student, teacher, loss centres and optimizer equal the uninterrupted run's."""
    from util.checkpoint import load_file
    root, flags, _, run = readme_run
    out = tmp_path / "results"
    cut = [str(out) if str(f) == str(root / "results") else f for f in flags] + ["--save_every_steps", "1"]
    killed = run_ibot(cut, env=child_env(MEDFOUND_TEST_KILL_AT_UPDATE="6"))
    assert killed.returncode == -9, describe(killed)
    done = run_inprocess("main_ibot.py", cut)
    assert done.returncode == 0, describe(done)
    assert "continuing epoch 1 at step" in done.stdout, done.stdout[-2000:]
    a, b = load_file(str(run / "checkpoint-last.pth")), load_file(str(out / "Train_Random_Fundus" / "checkpoint-last.pth"))
    for name in ("student", "teacher", "ibot_loss"):
        for k, v in a[name].items():
            assert torch.equal(v, b[name][k]), f"{name}.{k} differs after resume"
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
    epochs = [__import__("json").loads(x)["epoch"] for x in (out / "Train_Random_Fundus" / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_reference_layout_file_resumes(readme_run, tmp_path):
    """A checkpoint as iBOT/VisionFM write it (plain torch.save: student with `module.`, teacher, optimizer,
    epoch, args as a Namespace, ibot_loss, fp16_scaler) continues with --resume / --load_from."""
    import argparse
    from util.checkpoint import load_file
    _, flags, _, run = readme_run
    ours = load_file(str(run / "checkpoint-0.pth"))
    ref = {"student": ours["student"], "teacher": ours["teacher"], "optimizer": ours["optimizer"], "epoch": 1,
           "args": argparse.Namespace(**ours["args"]), "ibot_loss": ours["ibot_loss"], "fp16_scaler": None}
    torch.save(ref, tmp_path / "checkpoint.pth")
    out = tmp_path / "results"
    again = [str(out) if str(f).endswith("results") else f for f in flags] + ["--load_from", tmp_path / "checkpoint.pth"]
    proc = run_inprocess("main_ibot.py", again)
    assert proc.returncode == 0, describe(proc)
    assert "resumed from" in proc.stdout
    epochs = [__import__("json").loads(x)["epoch"] for x in (out / "Train_Random_Fundus" / "log.txt").read_text().splitlines()]
    assert epochs == [2]
    broken = dict(ref, teacher={k: v for k, v in ref["teacher"].items() if "blocks.0." not in k})
    torch.save(broken, tmp_path / "broken.pth")
    proc = run_inprocess("main_ibot.py", again[:-1] + [tmp_path / "broken.pth"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "teacher" in proc.stderr, describe(proc)


def test_teacher_finetunes_through_main_finetune(readme_run, tmp_path):
    """The teacher entry is the encoder: --checkpoint_key teacher loads it (backbone. stripped, head
    dropped) and a finetuning run starts from it with the pretraining preprocessing."""
    import models_vit  # noqa: F401
    from util.checkpoint import load_pretrained_encoder
    from util.registry import create_model
    from util.synthetic import write_dataset
    _, _, proc, run = readme_run
    ckpt = run / "checkpoint-last.pth"
    vit = create_model("vit_micro_patch8", img_size=32, num_classes=2)
    load_pretrained_encoder(vit, str(ckpt), checkpoint_key="teacher")
    teacher = torch.load(ckpt, weights_only=True)["teacher"]
    assert torch.equal(vit.state_dict()["blocks.1.mlp.fc2.weight"], teacher["backbone.blocks.1.mlp.fc2.weight"])
    write_dataset(tmp_path / "lab", kind="fundus", layout="imagefolder", num_classes=2, n_per_class=None, size=32,
                  seed=0, splits={"train": 8, "val": 2, "test": 2})
    ft = run_inprocess("main_finetune.py", [
        "--finetune", ckpt, "--checkpoint_key", "teacher", "--model", "vit_micro_patch8", "--data_path",
        tmp_path / "lab", "--output_dir", tmp_path / "ft", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "4",
        "--device", "cpu", "--num_workers", "0", "--aa", "none", "--reprob", "0", "--bootstrap", "10"])
    assert ft.returncode == 0, describe(ft)
    assert "'norm_preset': 'fundus'" in ft.stdout and (tmp_path / "ft" / "checkpoint-best.pth").is_file()


def test_two_processes_equal_one_with_twice_the_batch(readme_run, tmp_path):
    """2-process gloo run (batch 4 each) = 1 process with batch 8: same crops and masks (seeded per image),
    the loss centres all-reduced, gradients averaged. No stochastic depth (its draws are per rank) and no
    unreadable file (a rank whose batch lost an image would weigh its images differently)."""
    import shutil
    from conftest import free_port, without_key_bias
    from util.checkpoint import load_file
    root, flags, _, _ = readme_run
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    (data / "Fundus" / "broken.png").unlink()

    def flags_for(out, batch: int) -> list:
        swap = {str(root / "data"): data, str(root / "results"): out}
        f = [swap.get(str(x), x) for x in flags]
        f[f.index("--batch_size_per_gpu") + 1] = batch
        f[f.index("--epochs") + 1] = 2
        return f + ["--drop_path", "0"]
    one = run_inprocess("main_ibot.py", flags_for(tmp_path / "one", 8))
    assert one.returncode == 0, describe(one)
    two = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   "main_pretrain.py", *map(str, flags_for(tmp_path / "two", 4))], timeout=300)
    assert two.returncode == 0, describe(two)
    a = load_file(str(tmp_path / "one" / "Train_Random_Fundus" / "checkpoint-last.pth"))
    b = load_file(str(tmp_path / "two" / "Train_Random_Fundus" / "checkpoint-last.pth"))
    for name in ("teacher", "student", "ibot_loss"):
        sa, sb = without_key_bias(a[name]), without_key_bias(b[name])
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=1e-5, rtol=0, msg=f"{name}.{k}")


def test_ibot_recipe_with_dinov2_options_and_per_param_clip_runs(readme_run, tmp_path):
    """`main_ibot.py --recipe ibot` on a plain folder, with per-parameter clipping, Sinkhorn-Knopp targets,
    KoLeo, a local crop and the k-NN monitor: trains, logs the KoLeo term and the k-NN accuracy, uses
    ImageNet statistics without --modality."""
    import json
    from util.checkpoint import load_file
    from util.synthetic import write_dataset
    root = readme_run[0]
    labelled = tmp_path / "labelled"  # train/ and val/ class folders: the k-NN monitor's bank and queries
    write_dataset(labelled, kind="ultrasound", layout="imagefolder", num_classes=2, n_per_class=6, size=32, seed=2)
    proc = run_inprocess("main_ibot.py", [
        "--recipe", "ibot", "--model", MICRO, "--input_size", "32", "--data_path", root / "data", "--output_dir",
        tmp_path, "--name", "s", "--epochs", "1", "--out_dim", OUT_DIM, "--patch_out_dim", OUT_DIM, "--batch_size", "4",
        "--clip_grad_mode", "per_param", "--centering", "sinkhorn_knopp", "--koleo_loss_weight", "0.1",
        "--local_crops_number", "1", "--local_crop_size", "16", "--device", "cpu", "--num_workers", "0",
        "--knn_data_path", labelled, "--knn_freq", "1", "--knn_k", "3"])
    assert proc.returncode == 0, describe(proc)
    record = json.loads((tmp_path / "s" / "log.txt").read_text().splitlines()[-1])
    assert math.isfinite(record["train_koleo"]) and math.isfinite(record["train_loss"])
    assert 0.0 <= record["knn_top1"] <= 1.0 and 0.0 <= record["knn_balanced_acc"] <= 1.0
    assert "k-NN (teacher)" in proc.stdout
    ckpt = load_file(str(tmp_path / "s" / "checkpoint-last.pth"))
    assert ckpt["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert ckpt["args"]["freeze_last_layer"] == 1 and ckpt["args"]["clip_grad_mode"] == "per_param"


def test_help_is_instant_and_main_pretrain_hands_over():
    probe = ("import runpy, sys\nsys.argv = [{s!r}, *{a!r}]\ntry:\n    runpy.run_path({s!r}, run_name='__main__')\n"
             "except SystemExit as e:\n    print('PROBE', 'torch' in sys.modules, e.code)\n")
    for script, argv in (("main_ibot.py", ["--help"]), ("main_pretrain.py", ["--model", MICRO, "--help"]),
                         ("main_pretrain.py", ["--modality", "OCT", "-h"])):
        out = run_cmd([sys.executable, "-c", probe.format(s=script, a=argv)], timeout=60)
        assert out.stdout.strip().splitlines()[-1] == "PROBE False 0", out.stdout[-500:] + out.stderr[-500:]
        assert "--pred_ratio_var" in out.stdout and "--batch_size_per_gpu" in out.stdout


def test_load_pretrain_takes_mae_weights_into_student_and_teacher(tmp_path):
    """Our MAE checkpoint as --pretrain_path: the encoder goes into both backbones (decoder and mask token
    dropped), the student's mask token starts at zero, the heads start equal."""
    from types import SimpleNamespace
    import models_mae  # noqa: F401
    from main_ibot import build_networks
    from util.registry import create_model
    mae = create_model("mae_vit_micro_patch8", img_size=32)
    torch.save({"model": mae.state_dict()}, tmp_path / "mae.pth")
    args = SimpleNamespace(model=MICRO, input_size=32, out_dim=OUT_DIM, patch_out_dim=OUT_DIM, shared_head=False,
                           shared_head_teacher=True, norm_last_layer=True, norm_in_head=None, act_in_head="gelu",
                           drop_path=0.1, use_masked_im_modeling=True, load_pretrain=True,
                           pretrain_path=str(tmp_path / "mae.pth"))
    student, teacher = build_networks(args)
    for net in (student, teacher):
        assert torch.equal(net.backbone.blocks[1].attn.qkv.weight, mae.blocks[1].attn.qkv.weight)
    assert torch.count_nonzero(student.backbone.masked_embed) == 0
    assert torch.equal(student.head.mlp[0].weight, teacher.head.mlp[0].weight)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_knn_accuracy_monitor_on_separable_features():
    """The monitor's figures on features that separate the classes perfectly (1.0) and on shuffled labels."""
    from engine_ibot import knn_accuracy

    class Identity(torch.nn.Module):
        def forward_features(self, x):
            return x.flatten(1)

        def forward_head(self, t, pre_logits=False):
            return t
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 5

    def loader(n):
        y = torch.arange(n) % 3
        x = centres[y] + 0.1 * torch.randn(n, 3, generator=g)
        return [(x[i:i + 4], y[i:i + 4], torch.arange(i, min(i + 4, n))) for i in range(0, n, 4)]
    got = knn_accuracy(Identity(), loader(30), loader(12), CPU, "none", 3, k=5)
    assert got == {"knn_top1": 1.0, "knn_balanced_acc": 1.0}
    bank = loader(30)
    bank = [(x, (y + 1) % 3, i) for x, y, i in bank]  # every bank label shifted: every query is wrong
    assert knn_accuracy(Identity(), bank, loader(12), CPU, "none", 3, k=5)["knn_top1"] == 0.0
