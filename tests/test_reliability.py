"""Reliability: kill-and-resume exactness, pre-emption, non-finite guard, crash-safe and safe checkpoints."""
from __future__ import annotations

import errno
import json
import os
import sys

import pytest
import torch

from conftest import child_env, describe, run_cmd, run_inprocess, run_pretrain, tiny_pretrain_flags
from util.checkpoint import CheckpointError, atomic_save, export_safetensors, load_file


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b, atol=1e-6):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def test_kill_anywhere_then_auto_resume_matches_uninterrupted(tiny_pretrain_run, tmp_path):
    """SIGKILL mid-epoch, then during a checkpoint write (after the temp file, before the rename), then
    resume to the end: the final weights equal the uninterrupted run's."""
    out = tmp_path / "run"
    flags = tiny_pretrain_flags(tiny_pretrain_run.data_path) + ["--output_dir", out, "--save_every_steps", "1"]
    killed = run_pretrain(flags, env=child_env(MEDFOUND_TEST_KILL_AT_UPDATE="6"))  # epoch 1, step 2
    assert killed.returncode == -9, describe(killed)
    assert load_file(str(out / "checkpoint-last.pth"))["resume_point"] == {"epoch": 1, "step": 1, "world_size": 1,
                                                                            "batch_size": 4}
    killed = run_pretrain(flags, env=child_env(MEDFOUND_TEST_KILL_IN_SAVE="2"))
    assert killed.returncode == -9, describe(killed)
    assert [p for p in os.listdir(out) if p.endswith(".tmp")], "the kill should have left a temp file behind"
    done = run_inprocess("main_pretrain.py", flags)
    assert done.returncode == 0, describe(done)
    assert "continuing epoch 1 at step" in done.stdout
    assert_same_weights(out / "checkpoint-last.pth", tiny_pretrain_run.checkpoint)
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1, 2], "an epoch was skipped or repeated"


def test_sigterm_checkpoints_and_exits_cleanly(tiny_pretrain_run, tmp_path):
    out = tmp_path / "run"
    flags = tiny_pretrain_flags(tiny_pretrain_run.data_path) + ["--output_dir", out]
    stopped = run_pretrain(flags, env=child_env(MEDFOUND_TEST_SIGNAL_AT_UPDATE="3"))
    assert stopped.returncode == 0, describe(stopped)
    assert "SIGTERM" in stopped.stdout + stopped.stderr
    point = load_file(str(out / "checkpoint-last.pth"))["resume_point"]
    assert point["epoch"] == 0 and point["step"] == 3
    done = run_inprocess("main_pretrain.py", flags)
    assert done.returncode == 0, describe(done)
    assert_same_weights(out / "checkpoint-last.pth", tiny_pretrain_run.checkpoint)


def test_nonfinite_steps_skipped_then_repeated_poison_stops(tiny_pretrain_run, tmp_path):
    out = tmp_path / "one"
    flags = tiny_pretrain_flags(tiny_pretrain_run.data_path, epochs=2) + ["--output_dir", out]
    proc = run_inprocess("main_pretrain.py", flags + ["--inject_nonfinite", "2"])
    assert proc.returncode == 0, describe(proc)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert log[0]["train_skipped_steps"] == 1 and all(map(lambda r: r["train_loss"] == r["train_loss"], log))
    assert "step(s) skipped" in proc.stdout + proc.stderr
    out2 = tmp_path / "many"
    flags = tiny_pretrain_flags(tiny_pretrain_run.data_path, epochs=3) + ["--output_dir", out2]
    proc = run_inprocess("main_pretrain.py", flags + ["--inject_nonfinite", "5,6,7,8", "--max_nonfinite", "3"])
    assert proc.returncode == 2 and "consecutive non-finite" in proc.stderr, describe(proc)
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    ckpt = load_file(str(out2 / "checkpoint-last.pth"))
    assert ckpt["epoch"] == 0  # the last good checkpoint, loadable
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_world_size_two_to_one_resume(tiny_pretrain_run, tmp_path):
    out = tmp_path / "run"
    flags = tiny_pretrain_flags(tiny_pretrain_run.data_path, batch_size=2) + ["--output_dir", out]
    env = child_env(MEDFOUND_TEST_SIGNAL_AT_UPDATE="2")
    two = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29563",
                   "main_pretrain.py", *map(str, flags)], timeout=180, env=env)
    assert two.returncode == 0, describe(two)
    assert load_file(str(out / "checkpoint-last.pth"))["resume_point"]["world_size"] == 2
    one = run_inprocess("main_pretrain.py", flags)
    assert one.returncode == 0, describe(one)
    assert "different world size" in one.stdout + one.stderr
    assert load_file(str(out / "checkpoint-last.pth"))["epoch"] == 2


def test_rank0_write_failure_stops_every_rank(tiny_pretrain_run, tmp_path):
    """Under torchrun, rank 0 failing to write (full disk on its node) must stop all ranks with the
    one-line error, not leave rank 1 waiting in the next collective until the 30-minute timeout."""
    from conftest import free_port
    out = tmp_path / "run"
    flags = tiny_pretrain_flags(tiny_pretrain_run.data_path, batch_size=2, epochs=2) + ["--output_dir", out]
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={free_port()}", "main_pretrain.py", *map(str, flags)], timeout=120,
                   env=child_env(MEDFOUND_TEST_FAIL_IN_SAVE="2"))  # epoch 1's file (periodic ones are links)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "No space left on device" in log and "rank 0 failed to write in" in log, describe(proc)
    assert load_file(str(out / "checkpoint-last.pth"))["epoch"] == 0  # the previous checkpoint is intact


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    atomic_save({"model": {"w": torch.ones(2)}, "epoch": 1}, str(path))

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(CheckpointError, match="previous checkpoint is intact"):
        atomic_save({"model": {"w": torch.zeros(2)}, "epoch": 2}, str(path))
    monkeypatch.undo()
    assert load_file(str(path))["epoch"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pth"
    atomic_save({"model": {"w": torch.ones(1000)}}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_file(str(path))


def test_safetensors_export_roundtrip(tmp_path):
    from util.registry import create_model
    import models_mae  # noqa: F401
    model = create_model("mae_vit_micro_patch8", img_size=32)
    path = tmp_path / "model.safetensors"
    # main_pretrain's metadata names the model; that name must not shadow the weights under "model"
    export_safetensors(model, str(path), {"preprocessing": {"input_size": 32}, "model": "mae_vit_micro_patch8"})
    back = load_file(str(path))
    assert back["preprocessing"]["input_size"] == 32 and back["model_name"] == "mae_vit_micro_patch8"
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)


def test_finetune_kill_and_resume_matches(tmp_path):
    """Finetuning resumes exactly too (augmentation, drop path and dropout are seeded per step/sample)."""
    from util.synthetic import write_dataset
    data = tmp_path / "data"
    write_dataset(data, kind="ultrasound", layout="imagefolder", num_classes=2, n_per_class=10, size=32, seed=1)
    base = [sys.executable, "main_finetune.py", "--model", "vit_micro_patch8", "--input_size", "32", "--data_path",
            data, "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "4", "--blr", "5e-2", "--drop_path", "0.1",
            "--num_workers", "0", "--device", "cpu", "--bootstrap", "0", "--print_freq", "1", "--seed", "0",
            "--save_every_steps", "1"]
    full = run_inprocess("main_finetune.py", base[2:] + ["--output_dir", tmp_path / "full"])
    assert full.returncode == 0, describe(full)
    killed = run_cmd(base + ["--output_dir", tmp_path / "cut"], env=child_env(MEDFOUND_TEST_KILL_AT_UPDATE="4"))
    assert killed.returncode == -9, describe(killed)
    done = run_inprocess("main_finetune.py", base[2:] + ["--output_dir", tmp_path / "cut"])
    assert done.returncode == 0, describe(done)
    assert_same_weights(tmp_path / "cut" / "checkpoint-last.pth", tmp_path / "full" / "checkpoint-last.pth")
    a = json.loads((tmp_path / "full" / "test_metrics.json").read_text())
    b = json.loads((tmp_path / "cut" / "test_metrics.json").read_text())
    assert a["auroc"] == b["auroc"] and a["confusion_matrix"] == b["confusion_matrix"]


def test_periodic_checkpoint_is_a_link_not_a_second_copy(tmp_path):
    """A periodic checkpoint holds the same bytes as checkpoint-last.pth: written once, linked, and left
    alone when checkpoint-last.pth is replaced by the next epoch's."""
    from util.checkpoint import save_training_checkpoint
    model = torch.nn.Linear(4, 2)
    save_training_checkpoint(str(tmp_path), 0, model, None, None, {"x": 1}, periodic=True)
    last, periodic = tmp_path / "checkpoint-last.pth", tmp_path / "checkpoint-0.pth"
    assert os.stat(last).st_ino == os.stat(periodic).st_ino  # one file on disk, two names
    with torch.no_grad():
        model.weight.add_(1.0)
    save_training_checkpoint(str(tmp_path), 1, model, None, None, {"x": 1}, periodic=False)
    assert os.stat(last).st_ino != os.stat(periodic).st_ino
    assert load_file(str(periodic))["epoch"] == 0 and load_file(str(last))["epoch"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp files left


def test_starting_over_moves_another_runs_files_aside(tiny_pretrain_run, tmp_path, medfound_log, capsys):
    """Finetuning into a pretraining run's folder is refused; --no_auto_resume, which the message suggests,
    must not overwrite the pretraining checkpoint (the very file --finetune reads) or append to its log."""
    import shutil

    import main_finetune
    from util.cli import run_main
    run = tmp_path / "run"
    shutil.copytree(tiny_pretrain_run.output_dir, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    argv = ["--model", "vit_micro_patch8", "--finetune", str(run / "checkpoint-last.pth"), "--data_path",
            str(tiny_pretrain_run.data_path), "--output_dir", str(run), "--epochs", "1", "--batch_size", "4",
            "--num_workers", "0", "--device", "cpu", "--bootstrap", "0", "--print_freq", "100"]
    with pytest.raises(SystemExit) as e:
        run_main(main_finetune.main, main_finetune.get_args_parser(), argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--no_auto_resume" in err[0] and "moved to" in err[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # refused: nothing touched
    run_main(main_finetune.main, main_finetune.get_args_parser(), argv + ["--no_auto_resume"])
    aside = [p for p in run.iterdir() if p.name.startswith("earlier_run-")]
    assert len(aside) == 1 and "moved them to" in medfound_log.text
    for name, data in before.items():  # every pretraining file survives, byte for byte
        assert (aside[0] / name).read_bytes() == data, name
    assert (aside[0] / "tensorboard").is_dir()
    log = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    assert log and all("val_auroc" in r or "train_loss" in r for r in log) and len(log) == 1  # a new log, not appended
    assert load_file(str(run / "checkpoint-last.pth"))["preprocessing"]["class_names"] == ["class_0", "class_1"]


def test_gloo_runs_let_workers_retire_their_work_before_the_group_dies(monkeypatch):
    """A gloo worker frees a finished collective just after waking the waiting rank, and needs the GIL
    for it; a process group destroyed meanwhile with the GIL held (DDP's reducer, after cleanup())
    deadlocks. cleanup() therefore sleeps (GIL released) between the last barrier and the destruction,
    and init registers the same pause at exit, once."""
    import types
    import torch.distributed as dist
    import util.dist as udist
    from conftest import free_port
    events = []
    monkeypatch.setattr(udist.time, "sleep", lambda s: events.append(("sleep", s, udist.is_dist())))
    monkeypatch.setattr(udist.atexit, "register", lambda f: events.append(("atexit", f)))
    monkeypatch.setattr(udist, "_EXIT_HOOK", False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    args = types.SimpleNamespace(device="cpu", dist_url="env://")
    udist.init_distributed_mode(args)
    try:
        assert args.distributed and dist.get_backend() == "gloo"
        udist.register_gloo_exit_hook()  # FSDP calls it again: still one hook
        assert events == [("atexit", udist.let_gloo_retire_work)]
        udist.cleanup()
        assert events[1:] == [("sleep", udist._GLOO_RETIRE_S, True)], "the pause must come before the group dies"
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
