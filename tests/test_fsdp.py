"""`--fsdp` (FSDP2, util/fsdp.py): sharded pretraining computes what DDP computes, and its checkpoints are
the ordinary ones (reference MAE keys, standard optimizer layout), interchangeable with DDP / unsharded runs.

All runs are 2-process `torchrun` on CPU (gloo) with the micro MAE on 32-px images: 16 images, batch 2 per
process, 4 updates per epoch, 2 epochs, with the reconstruction figure (a forward every rank joins under
FSDP) and the safetensors export (a collective gather) on.

Tolerances. FSDP changes where gradients are reduced, not what is computed: the forward uses the same
(all-gathered) fp32 weights, the 2-rank reduce-scatter adds the same two numbers as DDP's all-reduce and
divides by 2 (exact), and fused AdamW is elementwise. Only the global gradient norm is summed in another
order (per shard, then across ranks), which moves clipping (`--clip_grad`, on here) by float rounding.
Measured here: without clipping DDP and FSDP agree bitwise; with it, losses differ by <= 2.2e-7
relative and weights by <= 3e-8, except the key third of `qkv.bias` (see `without_key_bias`, ~1.5e-5).
An FSDP run resumed under FSDP is bitwise identical to the uninterrupted one. The checks allow 1e-5
relative on losses and 1e-5 absolute on weights (updates are ~1e-3 per step): room for other BLAS /
gloo builds without hiding a real bug (a wrong shard, a missed broadcast or an unsynchronised step moves
the loss at the 1e-2 level).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, child_env, describe, free_port, run_cmd, tiny_pretrain_flags, without_key_bias
from util.checkpoint import load_file

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5

# Runs main_pretrain.py as __main__ under torchrun and records every training loss of this rank (the
# value `pretrain_forward` returned, before any non-finite injection) in LOSS_DUMP_DIR/rank{RANK}.json.
_LOSS_WRAPPER = """
import atexit, json, os, runpy, sys
sys.path.insert(0, {repo!r})
import engine_pretrain
losses = []
_forward = engine_pretrain.pretrain_forward
def recording(*args, **kwargs):
    loss = _forward(*args, **kwargs)
    losses.append(float(loss.detach()))
    return loss
engine_pretrain.pretrain_forward = recording
@atexit.register
def dump():
    with open(os.path.join(os.environ["LOSS_DUMP_DIR"], "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(losses, f)
sys.argv = [os.path.join({repo!r}, "main_pretrain.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""




def torchrun(script: Path, args: list, env: dict | None = None, timeout: float = 120):
    return run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={free_port()}", script, *map(str, args)], timeout=timeout,
                   env=env or child_env())


class Runner:
    """2-process main_pretrain runs through the loss-recording wrapper."""

    def __init__(self, root: Path, data: Path) -> None:
        self.root, self.data = root, data
        self.script = root / "loss_wrapper.py"
        self.script.write_text(_LOSS_WRAPPER.format(repo=str(REPO)))

    def flags(self, **overrides) -> list[str]:
        base = dict(batch_size=2, epochs=2, vis_images=2, clip_grad=0.5, inject_nonfinite=5)
        base.update(overrides)
        return tiny_pretrain_flags(self.data, **base)

    def run(self, name: str, extra: list | None = None, env_extra: dict | None = None, expect_ok: bool = True,
            **overrides):
        out = self.root / name
        dumps = self.root / f"{name}_losses"
        dumps.mkdir(exist_ok=True)
        env = child_env(LOSS_DUMP_DIR=str(dumps), **(env_extra or {}))
        proc = torchrun(self.script, [*self.flags(**overrides), "--output_dir", out, *(extra or [])], env=env)
        if expect_ok:
            assert proc.returncode == 0, describe(proc)
        return out, proc

    def losses(self, name: str) -> list[list[float]]:
        """Per rank, the losses of every step that process ran."""
        return [json.loads((self.root / f"{name}_losses" / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def runs(synthetic_fundus_tree, tmp_path_factory):
    """The same 2-epoch run with DDP and with --fsdp (clipping on; update 6 poisoned with NaN, so the
    non-finite guard skips one step in each)."""
    runner = Runner(tmp_path_factory.mktemp("fsdp"), synthetic_fundus_tree)
    runner.run("ddp", extra=["--save_safetensors"])
    runner.run("fsdp", extra=["--fsdp", "--save_safetensors"])
    return runner


def model_sd(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))["model"]




def max_weight_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    a, b = without_key_bias(a), without_key_bias(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def assert_losses_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=LOSS_RTOL, atol=0)


# ------------------------------------------------------------------------------- (a) same numbers as DDP
def test_fsdp_losses_and_weights_match_ddp(runs):
    ddp, fsdp = runs.losses("ddp"), runs.losses("fsdp")
    for rank in range(2):
        assert len(fsdp[rank]) == 8
        assert_losses_close(fsdp[rank], ddp[rank])
    log = [json.loads(line) for line in (runs.root / "fsdp" / "log.txt").read_text().splitlines()]
    ref = [json.loads(line) for line in (runs.root / "ddp" / "log.txt").read_text().splitlines()]
    assert [r["train_skipped_steps"] for r in log] == [r["train_skipped_steps"] for r in ref] == [0, 1]
    assert max_weight_diff(model_sd(runs.root / "fsdp" / "checkpoint-last.pth"),
                           model_sd(runs.root / "ddp" / "checkpoint-last.pth")) <= WEIGHT_ATOL
    # the figure (a forward all ranks join) and the safetensors export (a collective gather) match DDP's
    import numpy as np
    from PIL import Image
    pics = [np.asarray(Image.open(runs.root / name / "reconstructions.png")).astype(int) for name in ("fsdp", "ddp")]
    assert pics[0].shape == pics[1].shape and np.abs(pics[0] - pics[1]).max() <= 1
    exported, saved = load_file(str(runs.root / "fsdp" / "model.safetensors"))["model"], \
        model_sd(runs.root / "fsdp" / "checkpoint-last.pth")
    assert sorted(exported) == sorted(saved) and all(torch.equal(exported[k], v) for k, v in saved.items())
    # the weights did move: equality above is not two untouched initialisations
    assert max_weight_diff(model_sd(runs.root / "fsdp" / "checkpoint-0.pth"),
                           model_sd(runs.root / "fsdp" / "checkpoint-last.pth")) > 1e-3


# ------------------------------------------------------------- (b) the checkpoint is an ordinary one
def test_fsdp_checkpoint_is_the_unsharded_layout(runs):
    import models_mae  # noqa: F401
    from util.optim import build_adamw, param_groups_weight_decay
    from util.registry import create_model
    sharded = load_file(str(runs.root / "fsdp" / "checkpoint-last.pth"))
    plain = load_file(str(runs.root / "ddp" / "checkpoint-last.pth"))
    assert list(sharded) == list(plain)
    assert {k: v.shape for k, v in sharded["model"].items()} == {k: v.shape for k, v in plain["model"].items()}
    assert sharded["resume_point"] == plain["resume_point"]
    model = create_model("mae_vit_micro_patch8", img_size=32)
    model.load_state_dict(sharded["model"], strict=True)
    assert list(model.state_dict()) == list(sharded["model"])  # the reference key order, too
    so, po = sharded["optimizer"], plain["optimizer"]
    assert so["param_groups"] == po["param_groups"]
    assert list(so["state"]) == list(po["state"]) == list(range(sum(len(g["params"]) for g in po["param_groups"])))
    for i, entry in po["state"].items():
        assert list(so["state"][i]) == list(entry)
        for k, v in entry.items():
            assert type(so["state"][i][k]) is type(v) and so["state"][i][k].shape == v.shape
            assert so["state"][i][k].dtype == v.dtype
            torch.testing.assert_close(so["state"][i][k], v, atol=WEIGHT_ATOL, rtol=0)
    optimizer = build_adamw(param_groups_weight_decay(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    optimizer.load_state_dict(so)  # loads into an unsharded optimizer as is
    assert optimizer.state_dict()["param_groups"] == so["param_groups"]


# ------------------------------------------------ (c) killed mid-epoch under FSDP, resumed under FSDP
def test_fsdp_kill_and_resume_matches_uninterrupted(runs):
    env = {"MEDFOUND_TEST_KILL_AT_UPDATE": "7"}  # after update 7 (epoch 1, step 3), before its checkpoint
    out, killed = runs.run("cut", extra=["--fsdp", "--save_every_steps", "1"], env_extra=env, expect_ok=False)
    assert killed.returncode != 0, describe(killed)
    assert load_file(str(out / "checkpoint-last.pth"))["resume_point"] == {"epoch": 1, "step": 2, "world_size": 2,
                                                                            "batch_size": 2}
    _, done = runs.run("cut", extra=["--fsdp", "--save_every_steps", "1"])
    assert "continuing epoch 1 at step 2" in done.stdout + done.stderr, describe(done)
    # the resumed process ran the last two steps, with the uninterrupted run's losses
    resumed, full = runs.losses("cut"), runs.losses("fsdp")
    for rank in range(2):
        assert_losses_close(resumed[rank], full[rank][-2:])
    assert max_weight_diff(model_sd(out / "checkpoint-last.pth"),
                           model_sd(runs.root / "fsdp" / "checkpoint-last.pth")) <= WEIGHT_ATOL
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[-1]["train_skipped_steps"] == 1


# ------------------------------------------------------------------ (d) a DDP checkpoint resumes under FSDP
def test_ddp_checkpoint_resumes_under_fsdp(runs):
    # The NaN hook counts this process's updates: global update 6 is the 2nd one after resuming at epoch 1.
    out, done = runs.run("from_ddp", extra=["--fsdp", "--resume", runs.root / "ddp" / "checkpoint-0.pth"],
                         inject_nonfinite=1)
    assert "resumed from" in done.stdout + done.stderr, describe(done)
    resumed, full = runs.losses("from_ddp"), runs.losses("fsdp")
    for rank in range(2):
        assert_losses_close(resumed[rank], full[rank][4:])
    assert max_weight_diff(model_sd(out / "checkpoint-last.pth"),
                           model_sd(runs.root / "fsdp" / "checkpoint-last.pth")) <= WEIGHT_ATOL


# ------------------------------------------- (e) gradient accumulation: one reduce-scatter per update
def test_fsdp_accumulation_matches_ddp(runs):
    """batch 1 x --accum_iter 2 under FSDP covers the same 4 samples per update as the DDP run's batch 2:
    micro-batch gradients stay unsharded (set_requires_gradient_sync(False)) and are reduce-scattered
    with the last one, so the run ends at DDP's weights (same tolerance, NaN step and clipping included).
    A micro-batch whose gradients were never reduced would leave the ranks' shards inconsistent and
    move the weights far beyond it."""
    out, proc = runs.run("fsdp_accum", extra=["--fsdp"], batch_size=1, accum_iter=2)
    assert "effective batch 4" in proc.stdout, describe(proc)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["train_skipped_steps"] for r in log] == [0, 1]
    assert max_weight_diff(model_sd(out / "checkpoint-last.pth"),
                           model_sd(runs.root / "ddp" / "checkpoint-last.pth")) <= WEIGHT_ATOL


# ------------------------------------------------------------------------------- the util.fsdp API itself
_API_WORKER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
import models_convmae, models_crossmae, models_mae
from engine_pretrain import reconstruct
from util.checkpoint import (CheckpointError, export_safetensors, load_file, load_training_state,
                             save_training_checkpoint)
from util.fsdp import full_model_state_dict, full_optimizer_state_dict, is_fsdp, load_full_state, shard_model
from util.loop import Optimization
from util.optim import build_adamw, param_groups_weight_decay
from util.registry import create_model

dist.init_process_group("gloo")
rank = dist.get_rank()
out = sys.argv[1]
report = {{}}
cpu = torch.device("cpu")


def sans_key_bias(sd):  # see without_key_bias() in the test file: the one float-noise-driven parameter part
    out = {{}}
    for k, v in sd.items():
        if k.endswith("qkv.bias"):
            d = v.numel() // 3
            v = torch.cat([v[:d], v[2 * d:]])
        elif k.endswith(".kv.bias"):  # CrossMAE cross-attention: rows k | v
            v = v[v.numel() // 2:]
        out[k] = v
    return out


def diff(a, b, ordered=True):
    assert (list(a) == list(b)) if ordered else (sorted(a) == sorted(b)), (list(a)[:5], list(b)[:5])
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def optimization(model):
    opt = build_adamw(param_groups_weight_decay(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    return Optimization(opt, "none", clip_grad=0.5)


def sharded_pair(name, seed):
    torch.manual_seed(seed + rank)  # ranks initialise differently, as in main_pretrain: rank 0's must win
    model = create_model(name, img_size=32)
    torch.manual_seed(seed)
    ref = create_model(name, img_size=32)  # rank 0's initialisation, unsharded, on every rank
    shard_model(model, cpu)
    return model, ref


g = torch.Generator().manual_seed(1)
x = torch.randn(4, 3, 32, 32, generator=g)
trained = {{}}
for name in ("mae_vit_micro_patch8", "convmae_convvit_micro_patch16", "crossmae_vit_micro_patch8"):
    model, ref = sharded_pair(name, 5)
    noise = torch.rand(4, model.num_patches, generator=g)
    opt, ref_opt = optimization(model), optimization(ref)
    losses = []
    for step in range(3):
        if step == 2:  # a figure between updates (every rank joins the forward), then training goes on
            fig = reconstruct(model, x, 0.75, noise=noise)["recon"]
            ref_fig = reconstruct(ref, x, 0.75, noise=noise)["recon"]
            report[name + ".recon_diff"] = (fig - ref_fig).abs().max().item()
        half = slice(2 * rank, 2 * rank + 2)
        loss, _, _ = model(x[half], mask_ratio=0.75, noise=noise[half])
        opt.step(loss, model, step)
        ref_losses = [ref(x[s], mask_ratio=0.75, noise=noise[s])[0] for s in (slice(0, 2), slice(2, 4))]
        ref_opt.step(sum(ref_losses) / 2, ref, step)  # = DDP's averaged gradient
        losses.append((loss.item(), ref_losses[rank].item()))
    report[name + ".losses"] = losses
    trained[name] = (model, ref, opt, noise)
    report[name + ".blocks_sharded"] = sum(is_fsdp(m) for m in model.modules())
    sd, osd = full_model_state_dict(model), full_optimizer_state_dict(model, opt.optimizer)
    if rank == 0:
        report[name + ".weight_diff"] = diff(sans_key_bias(sd), sans_key_bias(ref.state_dict()))
        ref_osd = ref_opt.optimizer.state_dict()
        report[name + ".optim_layout"] = (osd["param_groups"] == ref_osd["param_groups"]
                                          and list(osd["state"]) == list(ref_osd["state"]))
        report[name + ".optim_diff"] = max(diff(osd["state"][i], ref_osd["state"][i]) for i in ref_osd["state"])
    else:
        report[name + ".others_get_none"] = sd is None and osd is None

# checkpoint files, safetensors export and loading, with the micro MAE trained above
name = "mae_vit_micro_patch8"
model, ref, opt, noise = trained[name]
ckpt_dir = os.path.join(out, "ckpt")
save_training_checkpoint(ckpt_dir, 0, model, opt.optimizer, None, {{"model": name}})
export_safetensors(model, os.path.join(out, "model.safetensors"), {{"epoch": 0}})  # on every rank
dist.barrier()
if rank == 0:
    saved = load_file(os.path.join(ckpt_dir, "checkpoint-last.pth"))
    report["file_weight_diff"] = diff(sans_key_bias(saved["model"]), sans_key_bias(ref.state_dict()))
    report["safetensors_diff"] = diff(sans_key_bias(load_file(os.path.join(out, "model.safetensors"))["model"]),
                                   sans_key_bias(ref.state_dict()), ordered=False)  # safetensors sorts its keys
path = os.path.join(ckpt_dir, "checkpoint-last.pth")
fresh, _ = sharded_pair(name, 9)
fresh_opt = optimization(fresh)
load_training_state(path, fresh, fresh_opt.optimizer, restore_rng=False)  # every rank read the file
sd2, osd2 = full_model_state_dict(fresh), full_optimizer_state_dict(fresh, fresh_opt.optimizer)
ckpt = load_file(path)
if rank == 0:
    report["reload_weight_diff"] = diff(sd2, ckpt["model"])
    saved_state = ckpt["optimizer"]["state"]
    report["reload_optim_diff"] = max(diff(osd2["state"][i], saved_state[i]) for i in saved_state)
    report["reload_groups_equal"] = osd2["param_groups"] == ckpt["optimizer"]["param_groups"]
third, _ = sharded_pair(name, 11)
third_opt = optimization(third)
load_full_state(third, third_opt.optimizer, ckpt["model"] if rank == 0 else None,
                ckpt["optimizer"] if rank == 0 else None)  # only rank 0 read it: scattered from there
sd3, osd3 = full_model_state_dict(third), full_optimizer_state_dict(third, third_opt.optimizer)
if rank == 0:
    report["rank0_load_weight_diff"] = diff(sd3, ckpt["model"])
    report["rank0_load_optim_diff"] = max(diff(osd3["state"][i], saved_state[i]) for i in saved_state)
# both loaded copies train on identically
for m, o in ((fresh, fresh_opt), (third, third_opt)):
    loss, _, _ = m(x[2 * rank:2 * rank + 2], mask_ratio=0.75, noise=noise[2 * rank:2 * rank + 2])
    o.step(loss, m, 0)
a, b = full_model_state_dict(fresh), full_model_state_dict(third)
if rank == 0:
    report["after_step_diff"] = diff(a, b)
# a checkpoint of another model: the same one-line error on every rank, no rank left waiting
if rank == 0:
    bad = dict(ckpt["model"])
    bad.pop("decoder_pred.bias")
    torch.save({{"model": bad, "epoch": 0}}, os.path.join(out, "bad.pth"))
dist.barrier()
try:
    load_training_state(os.path.join(out, "bad.pth"), fresh, fresh_opt.optimizer)
    report["mismatch"] = "no error"
except CheckpointError as e:
    report["mismatch"] = str(e)
dist.barrier()
with open(os.path.join(out, "report%d.json" % rank), "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
"""


def test_fsdp_api_models_checkpoints_and_reconstructions(tmp_path):
    script = tmp_path / "api_worker.py"
    script.write_text(_API_WORKER.format(repo=str(REPO)))
    proc = torchrun(script, [tmp_path])
    assert proc.returncode == 0, describe(proc)
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(2)]
    r0 = reports[0]
    for name, blocks in (("mae_vit_micro_patch8", 2 + 1 + 1), ("convmae_convvit_micro_patch16", 1 + 1 + 2 + 1 + 1),
                         ("crossmae_vit_micro_patch8", 2 + 1 + 1)):
        for rep in reports:  # every block list found (encoder, decoder, ConvViT stages) + the root
            assert rep[name + ".blocks_sharded"] == blocks, name
            assert rep[name + ".recon_diff"] <= 1e-5, name
            for got, want in rep[name + ".losses"]:
                assert got == pytest.approx(want, rel=LOSS_RTOL), name
        assert r0[name + ".weight_diff"] <= WEIGHT_ATOL, name
        assert r0[name + ".optim_layout"], name
        assert r0[name + ".optim_diff"] <= WEIGHT_ATOL, name
        assert reports[1][name + ".others_get_none"], name
    assert r0["file_weight_diff"] <= WEIGHT_ATOL and r0["safetensors_diff"] <= WEIGHT_ATOL
    assert r0["reload_weight_diff"] == 0 and r0["reload_optim_diff"] == 0 and r0["reload_groups_equal"]
    assert r0["rank0_load_weight_diff"] == 0 and r0["rank0_load_optim_diff"] == 0
    assert r0["after_step_diff"] == 0
    for rep in reports:
        assert "does not match the model" in rep["mismatch"] and "decoder_pred.bias" in rep["mismatch"]
