"""`--fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) for large-model pretraining, and the bridge between
its sharded (DTensor) parameters / optimizer state and our ordinary checkpoint layout.

Every block (a module of a class the model's family lists in `fsdp_block_types`, see util.family) is
its own FSDP unit (all-gathered just before its forward, freed after it, re-gathered for its backward;
gradients reduce-scattered per block), the root unit holds the rest (embeddings, norms, tokens, heads).
Parameters stay fp32: mixed precision comes from `torch.autocast` in util.loop exactly as without FSDP,
so `--fsdp` changes memory, not numerics.

Checkpoints written under FSDP are the same files as without it: `full_model_state_dict` gathers the
reference MAE key layout, `full_optimizer_state_dict` the standard `optimizer.state_dict()` layout
(`{"state": {int: ...}, "param_groups": [{..., "params": [int, ...]}]}`), and `load_full_state` reads
them back into a sharded model (one module at a time: a run with several named modules gathers and
loads each), so a run can switch between DDP and FSDP (or world sizes) on resume.

All functions that touch sharded tensors are collective: every rank must call them, in the same order.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from util.dist import register_gloo_exit_hook
from util.family import family_of
from util.unwrap import is_fsdp, unwrap as _unwrap  # noqa: F401  (is_fsdp re-exported for callers)

logger = logging.getLogger("medfound")


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor
    return DTensor


def block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) for every submodule whose class the model's family lists in `fsdp_block_types`
    (outermost ones only, in registration order, those with parameters). A model whose family
    declares none has no blocks: only the root becomes an FSDP unit."""
    spec = family_of(model)
    types = tuple(spec.fsdp_block_types) if spec is not None else ()
    out: list[tuple[str, nn.Module]] = []
    if not types:
        return out

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, types) and any(True for _ in child.parameters()):
                out.append((full, child))
            else:
                walk(full, child)
    walk("", _unwrap(model))
    return out


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """`fully_shard` every block, then the root, over all processes (1-D mesh on `device`'s type).

    In place: returns the same module object (its class becomes an FSDP subclass), so the optimizer
    and `state_dict()` keys are built from it as without FSDP. Blocks reshard after forward (memory);
    the root keeps FSDP's default for roots (no reshard after forward: its parameters are needed again
    at once by backward). Needs the default process group (torchrun).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (run under torchrun)")
    # The MAE forward returns `pred[:, 1:]`, a view; nothing modifies it in place, so FSDP's warning about
    # views is noise here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    register_gloo_exit_hook()
    # Ranks seed differently (util.runtime.setup), so their random initialisations differ. DDP copies rank
    # 0's parameters and buffers to every rank at construction; fully_shard would keep each rank's own
    # slice of its own initialisation instead. Broadcast first, exactly as DDP does.
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    blocks = block_modules(model)
    if not blocks:
        logger.warning("--fsdp: %s declares no FSDP block types (its family's fsdp_block_types): only the root "
                       "is sharded, so no memory is saved", type(model).__name__)
    for _, blk in blocks:
        fully_shard(blk, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)
    # FSDP gathers the root's parameters in hooks around `__call__`; methods that run the model without
    # it (a whole-image reconstruction that calls self.forward) must be registered to get the same hooks.
    spec = family_of(model)
    for method in (spec.fsdp_forward_methods if spec is not None else ()):
        if callable(getattr(model, method, None)):
            register_fsdp_forward_method(model, method)
    n = sum(p.numel() for p in model.parameters())
    logger.info("--fsdp: %d blocks + root sharded over %d processes (%.1fM parameters, ~%.2f GB of fp32 "
                "params+grads+AdamW state per process)", len(blocks), dist.get_world_size(), n / 1e6,
                16 * n / dist.get_world_size() / 1e9)
    return model


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _reshard_all(model: nn.Module) -> None:
    """Register the sharded parameters everywhere (the root keeps its unsharded ones after a no-grad
    forward, e.g. a reconstruction figure)."""
    from torch.distributed.fsdp import FSDPModule
    for m in _unwrap(model).modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _full_cpu(value: Any, keep: bool) -> Any:
    """A DTensor gathered to a full CPU tensor (collective); plain tensors copied to CPU; None where
    `keep` is False (the gather still runs)."""
    DTensor = _dtensor_type()
    if isinstance(value, DTensor):
        full = value.full_tensor()
        return full.detach().cpu() if keep else None
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone() if keep else None
    return copy.deepcopy(value) if keep else None


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Collective. Rank 0: the unwrapped model's `state_dict()` (same keys, same order) as full CPU
    tensors; other ranks: None. Works for unsharded models too (then it is a CPU copy on rank 0)."""
    keep = _rank() == 0
    if is_fsdp(model):
        _reshard_all(model)
    out = {}
    for k, v in _unwrap(model).state_dict().items():
        v = _full_cpu(v, keep)
        if keep:
            out[k] = v
    return out if keep else None


def _check_symmetric(structure: Any) -> None:
    """Every rank must walk the same tensors in the same order, or the gathers deadlock: compare a
    small description of the structure across ranks first and fail loudly instead."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    gathered = _gather(structure)
    if any(g != gathered[0] for g in gathered):
        raise RuntimeError("optimizer state differs in structure between ranks; cannot gather it")


def full_optimizer_state_dict(model: nn.Module | None, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Collective. Rank 0: `optimizer.state_dict()` in the standard layout with full CPU tensors,
    i.e. exactly what the same optimizer over the unsharded model would return (state keyed by the
    parameter's position over all param groups; `step` as saved by the optimizer); other ranks: None."""
    del model  # the positions come from the optimizer itself; kept in the signature for symmetry
    keep = _rank() == 0
    sd = optimizer.state_dict()
    order = sorted(sd["state"])
    _check_symmetric([(i, list(sd["state"][i])) for i in order])
    state: dict[int, dict[str, Any]] = {}
    for i in order:
        entry = {k: _full_cpu(v, keep) for k, v in sd["state"][i].items()}
        if keep:
            state[i] = entry
    if not keep:
        return None
    return {"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}


def _sharded_like(full: torch.Tensor | None, like: torch.Tensor, src: int | None) -> torch.Tensor:
    """A DTensor with `like`'s mesh and placements holding `full` (a global tensor; with `src=0` only
    rank 0's copy is read and scattered, the others may pass None). Own storage: no view of `full`."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(like, DTensor):  # not sharded: rank `src`'s copy (or each rank's own)
        out = (full if full is not None else torch.empty_like(like)).to(device=like.device, dtype=like.dtype)
        out = out.clone().contiguous()
        if src is not None:
            dist.broadcast(out, src=src)
        return out
    local_device = like.to_local().device
    if full is None:
        full = torch.empty(like.shape, dtype=like.dtype, device=local_device)
    full = full.to(device=local_device, dtype=like.dtype)
    out = torch.zeros_like(like)
    out.copy_(distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=src))
    return out


def _skeleton(optim_sd: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """The optimizer state dict with every parameter-shaped tensor replaced by a placeholder (broadcast
    from rank 0 when only it read the checkpoint)."""
    state = {}
    for i, entry in optim_sd["state"].items():
        p = params[i] if 0 <= i < len(params) else None
        state[i] = {k: ("__sharded__" if _is_param_shaped(k, v, p) else v) for k, v in entry.items()}
    return {"state": state, "param_groups": optim_sd["param_groups"]}


def _is_param_shaped(key: str, value: Any, param: torch.Tensor | None) -> bool:
    return (param is not None and key != "step" and isinstance(value, torch.Tensor) and value.ndim > 0
            and tuple(value.shape) == tuple(param.shape))


def _check_optimizer_layout(optim_sd: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """The checks `Optimizer.load_state_dict` makes, before any collective (so all ranks fail together)."""
    saved, groups = optim_sd.get("param_groups"), optimizer.param_groups
    if not isinstance(saved, list) or len(saved) != len(groups):
        raise ValueError(f"loaded state dict has {len(saved) if isinstance(saved, list) else '?'} parameter groups, "
                         f"the optimizer has {len(groups)}")
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in groups]:
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                         "optimizer's group")
    params = [p for g in groups for p in g["params"]]
    for i, entry in optim_sd.get("state", {}).items():
        if not 0 <= int(i) < len(params):
            raise ValueError(f"optimizer state for parameter {i}, which the optimizer does not have")
        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and v.ndim > 0 and k != "step" and tuple(v.shape) != tuple(params[i].shape):
                raise ValueError(f"optimizer state {k} of parameter {i} has shape {tuple(v.shape)}, the parameter "
                                 f"{tuple(params[i].shape)}")


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict[str, torch.Tensor] | None,
                    optim_sd: dict[str, Any] | None) -> None:
    """Collective. Load a standard-layout (unsharded) model state dict and optimizer state dict into the
    sharded model / optimizer: `load_full_model_state`, then `load_full_optimizer_state`."""
    load_full_model_state(model, model_sd)
    if optimizer is not None:
        load_full_optimizer_state(optimizer, optim_sd)


def load_full_model_state(model: nn.Module, model_sd: dict[str, torch.Tensor] | None) -> None:
    """Collective. Load a standard-layout (unsharded) state dict into a sharded (or plain) module.
    Either every rank passes the dict it read (no tensor communication) or only rank 0 does and the
    others pass None (rank 0's tensors are scattered). The dict must match the module's keys and shapes
    exactly (else KeyError, on every rank alike)."""
    DTensor = _dtensor_type()
    target = _unwrap(model)
    _reshard_all(model)
    current = target.state_dict()
    problem = None
    if model_sd is not None:
        missing = [k for k in current if k not in model_sd]
        unexpected = [k for k in model_sd if k not in current]
        shapes = [f"{k} {tuple(model_sd[k].shape)} vs {tuple(v.shape)}" for k, v in current.items()
                  if k in model_sd and tuple(model_sd[k].shape) != tuple(v.shape)]
        if missing or unexpected or shapes:
            problem = (f"state dict does not match the model ({len(missing)} missing keys e.g. {missing[:3]}, "
                       f"{len(unexpected)} unexpected e.g. {unexpected[:3]}, {len(shapes)} of another shape "
                       f"e.g. {shapes[:2]})")
    reports = _gather((model_sd is not None, problem))  # every rank decides alike: no half-entered collectives
    if not reports[0][0]:
        raise ValueError("load_full_model_state: rank 0 must pass the model state dict")
    problems = [p for _, p in reports if p]
    if problems:
        raise KeyError(problems[0])
    everyone = all(has for has, _ in reports)
    src = None if everyone else 0
    sharded = {}
    for k, v in current.items():
        full = model_sd[k] if model_sd is not None else None
        sharded[k] = _sharded_like(full, v, src) if (isinstance(v, DTensor) or not everyone) else full
    target.load_state_dict(sharded, strict=True)
    del sharded


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, optim_sd: dict[str, Any] | None) -> None:
    """Collective. Load a standard-layout optimizer state dict into an optimizer over sharded (or plain)
    parameters; every rank passes the dict it read, or only rank 0 does (then it is scattered). It must
    fit the optimizer's groups and parameter shapes (else ValueError, on every rank alike);
    `optim_sd=None` on every rank leaves the optimizer as it is."""
    flags = _gather(optim_sd is not None)
    if not any(flags):
        return
    if not all(flags) and not flags[0]:
        raise ValueError("load_full_optimizer_state: rank 0 must pass the optimizer state dict")
    src = None if all(flags) else 0
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if src is None:
        skeleton = optim_sd
    else:  # rank 0 sends the small parts (groups, steps) and scatters the parameter-shaped tensors
        box = [_skeleton(optim_sd, params) if _rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        skeleton = box[0]
    _check_optimizer_layout(skeleton, optimizer)
    state: dict[int, dict[str, Any]] = {}
    for i in sorted(skeleton["state"]):
        p = params[int(i)]
        entry = {}
        for k, v in skeleton["state"][i].items():
            if isinstance(v, str) and v == "__sharded__":  # broadcast mode: rank 0 holds the tensor
                full = optim_sd["state"][i][k] if _rank() == 0 else None
                entry[k] = _sharded_like(full, p, 0)
            elif _is_param_shaped(k, v, p):
                entry[k] = _sharded_like(v, p, None)
            else:
                entry[k] = v
        state[int(i)] = entry
    optimizer.load_state_dict({"state": state, "param_groups": copy.deepcopy(skeleton["param_groups"])})


def _gather(obj: Any) -> list[Any]:
    """`obj` from every rank (a small picklable value), in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
