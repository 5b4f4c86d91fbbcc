"""The per-process half of tests/test_slip_models.py's gradient test (spawned with gloo on CPU): a
small module so that each spawned process imports only torch and util.contrastive."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from util.contrastive import clip_loss, siglip_loss, simclr_loss

B_LOCAL, DIM = 3, 8


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {name: torch.randn(2 * B_LOCAL, DIM, generator=g) for name in ("img", "txt", "aug1", "aug2")}


def objective(batch: dict[str, torch.Tensor], proj: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
              ) -> torch.Tensor:
    """All three losses through a shared projection (a stand-in for the towers' parameters)."""
    img, txt = batch["img"] @ proj, batch["txt"] @ proj
    return (clip_loss(img, txt, scale.exp())[0] + simclr_loss(batch["aug1"] @ proj, batch["aug2"] @ proj, 0.1)[0]
            + siglip_loss(img, txt, scale.exp(), bias)[0])


def params() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    proj = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(8)).requires_grad_()
    return proj, torch.tensor(2.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)


def rank_worker(rank: int, port: int, out_dir: str) -> None:
    """This process's rows of the global batch: loss, backward, parameter gradients averaged over the
    processes as data parallelism does; saved with the input rows' gradients and the mean loss."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        local = {k: v[rows].clone().requires_grad_() for k, v in global_batch().items()}
        proj, scale, bias = params()
        loss = objective(local, proj, scale, bias)
        loss.backward()
        grads = {"proj": proj.grad, "scale": scale.grad, "bias": bias.grad}
        for g in grads.values():
            dist.all_reduce(g)
            g /= 2
        losses = [torch.zeros(()) for _ in range(2)]
        dist.all_gather(losses, loss.detach())
        torch.save({"grads": grads, "inputs": {k: v.grad for k, v in local.items()},
                    "loss": torch.stack(losses).mean()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
