"""iBOT loss across two gloo processes equals one process with the whole batch: EMA centres (cross-rank
mean), Sinkhorn-Knopp assignments (cross-rank row/column sums) and the loss terms."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from conftest import REPO, child_env, describe, free_port, run_cmd

_WORKER = """
import sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist
from test_ibot_dist import batch, make_loss
import models_ibot as mi

dist.init_process_group("gloo")
rank = dist.get_rank()
s, t, local, masks = batch()
half = lambda x: torch.cat([c[2 * rank:2 * rank + 2] for c in x.chunk(2)])  # this rank's images of each crop
out = {{}}
for centering in ("center", "sinkhorn_knopp"):
    loss = make_loss(centering)
    terms = loss((half(s[0]), half(s[1])), (half(t[0]), half(t[1])), local[2 * rank:2 * rank + 2],
                 [m[2 * rank:2 * rank + 2] for m in masks], epoch=1)
    out[centering] = {{k: float(v) for k, v in terms.items()}}
    out[centering + "_state"] = {{k: v.clone() for k, v in loss.state_dict().items()}}
out["sk"] = mi.sinkhorn_knopp(half(t[0]), 0.07)
torch.save(out, {out!r} + f"/rank{{rank}}.pt")
dist.destroy_process_group()
"""


def batch():
    g = torch.Generator().manual_seed(0)
    b = 4  # images per crop, over both ranks
    s = (torch.randn(2 * b, 6, generator=g), torch.randn(2 * b, 4, 5, generator=g))
    t = (torch.randn(2 * b, 6, generator=g), torch.randn(2 * b, 4, 5, generator=g))
    local = torch.randn(b, 6, generator=g)
    masks = [torch.rand(b, 2, 2, generator=g) > 0.4 for _ in range(2)]
    return s, t, local, masks


def make_loss(centering: str):
    loss = __import__("models_ibot").iBOTLoss(6, 5, 2, 1, 0.04, 0.07, 0.04, 0.07, 3, 10, centering=centering)
    loss.center.fill_(0.5)
    return loss


def test_two_processes_equal_one_with_the_whole_batch(tmp_path):
    import models_ibot as mi
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(repo=str(REPO), tests=str(Path(__file__).parent), out=str(tmp_path)))
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={free_port()}", str(script)], timeout=180, env=child_env())
    assert proc.returncode == 0, describe(proc)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    s, t, local, masks = batch()
    for centering in ("center", "sinkhorn_knopp"):
        loss = make_loss(centering)
        whole = loss(s, t, local, masks, epoch=1)
        for k in ("cls", "patch", "loss"):  # equal per-rank batches: the whole-batch mean is their mean
            assert abs(whole[k].item() - sum(r[centering][k] for r in ranks) / 2) < 1e-5, (centering, k)
        for r in ranks:  # every rank holds the centres of the whole batch
            for k, v in loss.state_dict().items():
                torch.testing.assert_close(r[centering + "_state"][k], v)
    sk = mi.sinkhorn_knopp(t[0], 0.07)
    halves = [torch.cat([c[2 * r:2 * r + 2] for c in sk.chunk(2)]) for r in range(2)]
    for r in range(2):
        torch.testing.assert_close(ranks[r]["sk"], halves[r])
