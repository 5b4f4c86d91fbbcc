"""Named checkpoint states (util.checkpoint): a run saves and resumes several objects by name (a student, an
EMA teacher, a loss module's running centres, an LR scheduler) exactly, atomically, and gathered under FSDP;
a `{student, teacher}` file resumes each from its own entry; one-model files keep the reference layout.
Also: families declare what the shared code needs (util.family), and prepare_model never DDP-wraps a module
that takes no gradients."""
from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import REPO, child_env, describe, free_port, run_cmd
from util.checkpoint import (CheckpointError, load_file, load_training_state, named_states, save_training_checkpoint)


class CenteredLoss(nn.Module):
    """An iBOT-style loss whose state is buffers: running centres of the teacher's outputs."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(1, dim))
        self.register_buffer("center2", torch.zeros(1, 2, dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
        t = torch.softmax((teacher_out - self.center) / 0.05, dim=-1)
        loss = -(t * torch.log_softmax(student_out / 0.1, dim=-1)).sum(-1).mean()
        with torch.no_grad():  # the batch centre over all ranks, as iBOT: every rank keeps the same centres
            batch = teacher_out.detach().mean(0, keepdim=True)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(batch)
                batch /= torch.distributed.get_world_size()
            self.center.mul_(0.9).add_(batch, alpha=0.1)
            self.center2.mul_(0.8).add_(batch.view(1, 1, -1), alpha=0.2)
        return loss


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Linear(16, 4))


class Run:
    """Student trained by AdamW (+ StepLR), teacher = EMA of the student, loss with centre buffers; the
    batches come from the global RNG, so a resume must also restore the RNG to continue exactly."""

    def __init__(self, seed: int) -> None:
        self.student = tiny_net(seed)
        self.teacher = tiny_net(seed + 1)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = CenteredLoss(4)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.5)

    def states(self) -> dict:
        return {"student": self.student, "teacher": self.teacher, "ibot_loss": self.loss, "lr_sched": self.sched}

    def steps(self, n: int) -> None:
        for _ in range(n):
            x = torch.randn(6, 8)
            loss = self.loss(self.student(x), self.teacher(x))
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.sched.step()
            with torch.no_grad():
                for ps, pt in zip(self.student.parameters(), self.teacher.parameters()):
                    pt.mul_(0.9).add_(ps, alpha=0.1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the run's state, flattened (modules, optimizer moments and step counts)."""
        out = {}
        for name, obj in self.states().items():
            if isinstance(obj, nn.Module):
                out.update({f"{name}.{k}": v for k, v in obj.state_dict().items()})
        for i, entry in self.opt.state_dict()["state"].items():
            out.update({f"optimizer.{i}.{k}": v for k, v in entry.items()})
        return out

    def plain_state(self) -> tuple:
        """The non-tensor state: scheduler and the optimizer's param groups (lr, betas, ...)."""
        return self.sched.state_dict(), self.opt.state_dict()["param_groups"]


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_named_states_round_trip_bit_exactly(tmp_path):
    run = Run(0)
    run.steps(3)
    save_training_checkpoint(str(tmp_path), 2, run.states(), run.opt, None, {"seed": 0}, extra={"preprocessing": {}})
    ckpt = load_file(str(tmp_path / "checkpoint-last.pth"))
    assert list(ckpt) == ["student", "teacher", "ibot_loss", "lr_sched", "epoch", "args", "optimizer", "rng",
                          "preprocessing"]
    fresh = Run(7)  # other initial weights, untouched centres and scheduler
    assert not torch.equal(fresh.student[0].weight, run.student[0].weight)
    load_training_state(str(tmp_path / "checkpoint-last.pth"), fresh.states(), fresh.opt, restore_rng=False)
    assert_bit_exact(fresh.tensors(), run.tensors())
    assert fresh.plain_state() == run.plain_state() and fresh.sched.last_epoch == 3
    assert torch.count_nonzero(fresh.loss.center) > 0  # the buffers came back, not the zero init


def test_kill_and_resume_named_states_continues_bit_exactly(tmp_path):
    torch.manual_seed(123)
    whole = Run(0)
    whole.steps(5)
    torch.manual_seed(123)
    first = Run(0)
    first.steps(2)
    save_training_checkpoint(str(tmp_path), 0, first.states(), first.opt, None, {})
    del first  # the process dies here
    torch.manual_seed(999)  # a new process: other RNG state, other initial weights
    resumed = Run(5)
    load_training_state(str(tmp_path / "checkpoint-last.pth"), resumed.states(), resumed.opt, restore_rng=True)
    resumed.steps(3)
    assert_bit_exact(resumed.tensors(), whole.tensors())
    assert resumed.plain_state() == whole.plain_state()


def test_student_teacher_file_resumes_each_by_name(tmp_path):
    """A reference file lists the teacher first and saved the DDP-wrapped student (`module.` keys): each
    state still comes from its own entry; a one-model run is refused, not given the teacher."""
    student, teacher = tiny_net(1), tiny_net(2)
    path = tmp_path / "ref.pth"
    torch.save({"teacher": teacher.state_dict(), "epoch": 4,
                "student": {"module." + k: v for k, v in student.state_dict().items()}}, path)
    s, t = tiny_net(3), tiny_net(4)
    ckpt = load_training_state(str(path), {"student": s, "teacher": t}, restore_rng=False)
    assert ckpt["epoch"] == 4
    assert_bit_exact(s.state_dict(), student.state_dict())
    assert_bit_exact(t.state_dict(), teacher.state_dict())
    with pytest.raises(CheckpointError, match=r"has no 'model' state .*\['student', 'teacher'\]"):
        load_training_state(str(path), tiny_net(5), restore_rng=False)
    with pytest.raises(CheckpointError, match="has no 'ibot_loss' state"):
        load_training_state(str(path), {"student": s, "teacher": t, "ibot_loss": CenteredLoss(4)}, restore_rng=False)
    with pytest.raises(CheckpointError, match="does not match the state 'teacher'"):
        load_training_state(str(path), {"student": s, "teacher": nn.Linear(8, 4)}, restore_rng=False)


def test_one_model_files_keep_the_reference_layout(tmp_path):
    model, opt = tiny_net(0), None
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    save_training_checkpoint(str(tmp_path), 3, model, opt, None, {"model": "tiny"}, extra={"resume_point": {}})
    ckpt = load_file(str(tmp_path / "checkpoint-last.pth"))
    assert list(ckpt) == ["model", "epoch", "args", "optimizer", "rng", "resume_point"]
    assert named_states(model) == {"model": model}
    # files written by the reference (or by older versions) resume: {model, optimizer, epoch} and a
    # `state_dict` wrapper
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, tmp_path / "ref.pth")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "sd.pth")
    for name in ("ref.pth", "sd.pth"):
        fresh = tiny_net(9)
        load_training_state(str(tmp_path / name), fresh, restore_rng=False)
        assert_bit_exact(fresh.state_dict(), model.state_dict())


def test_state_names_must_not_take_bookkeeping_keys(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_training_checkpoint(str(tmp_path), 0, {"optimizer": tiny_net(0)}, None, None, {})
    with pytest.raises(ValueError, match="extra"):
        save_training_checkpoint(str(tmp_path), 0, {"preprocessing": tiny_net(0)}, None, None, {},
                                 extra={"preprocessing": {}})
    with pytest.raises(TypeError, match="state_dict"):
        named_states({"x": object()})
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------- families
FAMILY_WORDS = ("decoder_", "wfm", "blocks1", "blocks2", "blocks3", "crossmae", "convmae", "stage1", "dec_norms",
                "mask_token", "mae_", "masked_embed", "reconstruct_all", "cross_attn")


@pytest.mark.parametrize("path", ["util/checkpoint.py", "util/fsdp.py", "util/runtime.py", "util/family.py",
                                  "util/unwrap.py"])
def test_shared_modules_name_no_family(path):
    text = (REPO / path).read_text().lower()
    assert not [w for w in FAMILY_WORDS if w in text], path


def test_checkpoint_fsdp_import_cycle_is_broken():
    def imports(path: str) -> set[str]:
        tree = ast.parse((REPO / path).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
               {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "util.checkpoint" not in imports("util/fsdp.py")
    assert not {"util.checkpoint", "util.fsdp"} & (imports("util/unwrap.py") | imports("util/family.py"))
    from util.checkpoint import unwrap  # re-exported for older import sites
    from util.unwrap import unwrap as leaf
    assert unwrap is leaf


def _blocks_by_list_name(model: nn.Module) -> list[str]:
    """The rule util.fsdp used before families declared their block classes: elements of the ModuleLists
    named blocks / decoder_blocks / blocks1..3."""
    out = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.ModuleList) and (leaf.endswith("blocks") or leaf in ("blocks1", "blocks2", "blocks3")):
            out += [f"{name}.{i}" for i, blk in enumerate(module) if any(True for _ in blk.parameters())]
    return out


@pytest.mark.parametrize("name", ["mae_vit_micro_patch8", "convmae_convvit_micro_patch16", "crossmae_vit_micro_patch8",
                                  "vit_micro_patch8", "convvit_micro_patch16"])
def test_declared_fsdp_blocks_are_the_block_lists(name):
    import models_convmae  # noqa: F401
    import models_crossmae  # noqa: F401
    import models_mae  # noqa: F401
    from util.fsdp import block_modules
    from util.registry import create_model
    model = create_model(name, img_size=32)
    found = [n for n, _ in block_modules(model)]
    assert found == _blocks_by_list_name(model) and found


def test_resume_fields_come_from_the_families():
    import models_crossmae
    import models_vit  # noqa: F401
    from main_pretrain import PRETRAIN_RESUME_FIELDS
    from util.registry import create_model
    from util.runtime import resume_fields
    cross = resume_fields(create_model("crossmae_vit_micro_patch8", img_size=32), PRETRAIN_RESUME_FIELDS)
    for f in ("model", "seed", "mask_ratio", "norm_pix_loss", "kept_mask_ratio", "weight_fm", "decoder_depth", "blur"):
        assert f in cross, f
    mae = resume_fields(create_model("mae_vit_micro_patch8", img_size=32), PRETRAIN_RESUME_FIELDS)
    assert "mask_ratio" in mae and "kept_mask_ratio" not in mae  # CrossMAE's flags do not change an MAE run
    assert models_crossmae.FAMILY.fresh_encoder_keys == ("norm.weight", "norm.bias")
    both = resume_fields({"student": create_model("vit_micro_patch8", img_size=32),
                          "teacher": create_model("mae_vit_micro_patch8", img_size=32)})
    assert "mask_ratio" in both


# ----------------------------------------------------------------------------------------- DDP rule
def test_prepare_model_never_ddp_wraps_a_module_without_gradients(tmp_path, medfound_log):
    import torch.distributed as dist

    from util.runtime import prepare_model
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        args = argparse.Namespace(distributed=True, gpu=None, fsdp=False, compile=False, accum_iter=1)
        teacher = tiny_net(0).requires_grad_(False)
        wrapped, plain = prepare_model(teacher, args, torch.device("cpu"))
        assert wrapped is teacher and plain is teacher
        assert "takes no gradients: not wrapped in DDP" in medfound_log.text
        probe = tiny_net(1)
        probe[0].requires_grad_(False)  # a frozen encoder with a trainable head is still trained: DDP
        wrapped, plain = prepare_model(probe, args, torch.device("cpu"))
        assert isinstance(wrapped, nn.parallel.DistributedDataParallel) and plain is probe
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- FSDP
_FSDP_WORKER = """
import copy, json, os, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist
import models_mae
from test_named_states import CenteredLoss
from util.checkpoint import load_file, load_training_state, save_training_checkpoint
from util.fsdp import full_model_state_dict, full_optimizer_state_dict, is_fsdp, shard_model
from util.registry import create_model

dist.init_process_group("gloo")
rank = dist.get_rank()
out = sys.argv[1]
cpu = torch.device("cpu")


def pair(seed):
    torch.manual_seed(seed + rank)  # ranks initialise differently: sharding must take rank 0's
    student = create_model("mae_vit_micro_patch8", img_size=32)
    teacher = create_model("mae_vit_micro_patch8", img_size=32).requires_grad_(False)
    shard_model(student, cpu)
    shard_model(teacher, cpu)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    return student, teacher, CenteredLoss(4), opt


def step(student, teacher, loss_mod, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 32, 32, generator=g)[2 * rank:2 * rank + 2]
    noise = torch.rand(4, 16, generator=g)[2 * rank:2 * rank + 2]
    loss, pred, _ = student(x, mask_ratio=0.75, noise=noise)
    with torch.no_grad():
        _, tpred, _ = teacher(x, mask_ratio=0.75, noise=noise)
    teacher.reshard()  # a no-grad root forward leaves its unsharded parameters registered
    loss = loss + loss_mod(pred.mean(1)[:, :4], tpred.mean(1)[:, :4])
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():  # EMA on the shards: student and teacher are sharded alike
        for ps, pt in zip(student.parameters(), teacher.parameters()):
            pt.mul_(0.9).add_(ps, alpha=0.1)


def full(student, teacher, loss_mod, opt):
    return (full_model_state_dict(student), full_model_state_dict(teacher), copy.deepcopy(loss_mod.state_dict()),
            full_optimizer_state_dict(None, opt))


def same(a, b):
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


report = {{}}
s, t, l, o = pair(1)
report["sharded"] = is_fsdp(s) and is_fsdp(t)
step(s, t, l, o, 10)
before = full(s, t, l, o)
save_training_checkpoint(out, 0, {{"student": s, "teacher": t, "ibot_loss": l}}, o, None, {{}})
s2, t2, l2, o2 = pair(50)
load_training_state(os.path.join(out, "checkpoint-last.pth"), {{"student": s2, "teacher": t2, "ibot_loss": l2}}, o2,
                    restore_rng=False)
after = full(s2, t2, l2, o2)
step(s, t, l, o, 11)
step(s2, t2, l2, o2, 11)
cont, cont2 = full(s, t, l, o), full(s2, t2, l2, o2)
if rank == 0:
    ckpt = load_file(os.path.join(out, "checkpoint-last.pth"))
    report["keys"] = list(ckpt)
    report["file_parts"] = [same(ckpt[k], v) for k, v in zip(("student", "teacher", "ibot_loss", "optimizer"), before)]
    report["file_is_gathered"] = same([ckpt["student"], ckpt["teacher"], ckpt["ibot_loss"], ckpt["optimizer"]],
                                      list(before))
    report["teacher_differs"] = not torch.equal(ckpt["student"]["blocks.0.attn.qkv.weight"],
                                                ckpt["teacher"]["blocks.0.attn.qkv.weight"])
    report["resumed_exactly"] = same(list(after), list(before))
    report["continues_exactly"] = same(list(cont2), list(cont))
dist.barrier()
with open(os.path.join(out, "report%d.json" % rank), "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
"""


def test_fsdp_two_processes_save_and_resume_two_named_modules_exactly(tmp_path):
    script = tmp_path / "named_worker.py"
    script.write_text(_FSDP_WORKER.format(repo=str(REPO), tests=str(Path(__file__).parent)))
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                    str(script), str(tmp_path)], timeout=180, env=child_env())
    assert proc.returncode == 0, describe(proc)
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(2)]
    assert all(r["sharded"] for r in reports)
    r0 = reports[0]
    assert r0["keys"][:3] == ["student", "teacher", "ibot_loss"] and "optimizer" in r0["keys"]
    assert r0["file_is_gathered"] and r0["teacher_differs"], r0
    assert r0["resumed_exactly"] and r0["continues_exactly"]
