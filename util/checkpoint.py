"""Training checkpoints and published weights: named-state layouts, auto-resume, encoder loading.

File-level reading and writing (allow-listed `weights_only` loading, safetensors, atomic saves, one-line
errors for wrong files) lives in util.checkpoint_files; its names are re-exported here, the module
callers import.

A training checkpoint holds named states, then the run's bookkeeping: `{model, epoch, args, optimizer,
scaler, rng, ...}` for a one-model run (the layout the MAE reference writes and reads, so reference
loaders read our files), `{student, teacher, <loss>, epoch, args, ...}` for a run with several objects.
`args` is a plain dict, so `torch.load(weights_only=True)` reads our files without pickle.

Family knowledge (which keys an encoder may ignore, which fields must match to resume) comes from each
family's `FamilySpec` (util.family); nothing here names a family.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn

from util.checkpoint_files import (CheckpointError, _safe_globals, _where, atomic_save,  # noqa: F401  (re-exported)
                                    check_finite, first_nonfinite, load_file, load_safetensors)
from util.dist import barrier, is_main_process
from util.family import checkpoint_families, family_of, ignorable_prefixes
from util.unwrap import is_fsdp, unwrap  # noqa: F401  (unwrap re-exported: callers import it from here)

logger = logging.getLogger("medfound")

LAST_NAME = "checkpoint-last.pth"
_EPOCH_RE = re.compile(r"checkpoint-(\d+)\.pth$")


def export_safetensors(model: nn.Module, path: str, config: dict[str, Any]) -> None:
    """Weights as safetensors (no pickle at all) with the JSON config in the file's metadata.

    Call it on every rank (it is collective: an FSDP gather, then the agreement of `rank0_write`); rank 0
    writes."""
    import json
    from safetensors.torch import save
    if is_fsdp(model):
        from util.fsdp import full_model_state_dict
        state = full_model_state_dict(model)  # collective; None off rank 0
    else:
        state = unwrap(model).state_dict() if is_main_process() else None

    def write() -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        data = save(tensors, metadata={"medfound_config": json.dumps(config, default=str)})
        atomic_save(data, path, writer=lambda d, f: f.write(d))
    rank0_write(write, path)


def rng_state() -> dict[str, Any]:
    import random
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                       for k, v in zip(("name", "keys", "pos", "has_gauss", "cached"), np.random.get_state())}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Keys a training checkpoint uses for the run's bookkeeping; no named state may take one of them.
RESERVED_KEYS = ("epoch", "args", "optimizer", "scaler", "rng")

States = nn.Module | Mapping[str, Any]


def named_states(states: States) -> dict[str, Any]:
    """`{name: object}` for a checkpoint: a mapping as given (each object has state_dict() and
    load_state_dict(); modules may be DDP/compile-wrapped or FSDP-sharded), or a bare model under its
    family's first state name (`model` unless the family declares otherwise)."""
    if isinstance(states, nn.Module):
        spec = family_of(states)
        return {spec.states[0] if spec is not None else "model": states}
    named = dict(states)
    if not named:
        raise ValueError("a checkpoint needs at least one named state")
    for name, obj in named.items():
        if name in RESERVED_KEYS:
            raise ValueError(f"state name {name!r} is reserved for the checkpoint's bookkeeping {RESERVED_KEYS}")
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"state {name!r}: {type(obj).__name__} has no state_dict()/load_state_dict()")
    return named


class DDPPrefixedState:
    """A module's checkpoint entry with DDP's `module.` key prefix, as reference runs that DDP-wrap their
    model write it (iBOT/VisionFM's student, SLIP's state_dict), whether or not this run wraps it. Loading
    accepts keys with or without the prefix and is strict (same keys, same shapes), with a one-line error
    naming the entry and `hint` (the flags that change the architecture) otherwise."""

    def __init__(self, module: nn.Module, source: str, hint: str = "") -> None:
        self.module, self.source, self.hint = module, source, hint

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"module.{k}": v for k, v in unwrap(self.module).state_dict().items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if not isinstance(sd, dict):
            raise CheckpointError(f"checkpoint entry '{self.source}' is not a dict of tensors")
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
        current = unwrap(self.module).state_dict()
        missing, unexpected = sorted(set(current) - set(sd)), sorted(set(sd) - set(current))
        shapes = [k for k in current if k in sd and tuple(sd[k].shape) != tuple(current[k].shape)]
        if missing or unexpected or shapes:
            raise CheckpointError(f"checkpoint entry '{self.source}' does not match this model ({len(missing)} "
                                  f"missing e.g. {missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]}, "
                                  f"{len(shapes)} of another shape e.g. {shapes[:2]})"
                                  + (f"; was it written for another {self.hint}?" if self.hint else ""))
        unwrap(self.module).load_state_dict(sd, strict=True)


def _sharded(named: dict[str, Any]) -> bool:
    return any(isinstance(obj, nn.Module) and is_fsdp(obj) for obj in named.values())


def _gather_state(obj: Any) -> Any:
    """Rank 0: the object's state (a module's under its wrappers, gathered to full CPU tensors when it is
    FSDP-sharded: collective); other ranks: None."""
    if isinstance(obj, nn.Module) and is_fsdp(obj):
        from util.fsdp import full_model_state_dict
        return full_model_state_dict(obj)
    if not is_main_process():
        return None
    return unwrap(obj).state_dict() if isinstance(obj, nn.Module) else obj.state_dict()


def save_training_checkpoint(output_dir: str, epoch: int, states: States, optimizer: torch.optim.Optimizer | None,
                             scaler: Any, args: dict, extra: dict | None = None, periodic: bool = False,
                             keep_last: int = 0) -> str | None:
    """Write `checkpoint-last.pth` (and `checkpoint-{epoch}.pth` when `periodic`) from rank 0:
    `{<each named state>, epoch, args, optimizer, scaler, rng, <extra>}` (see `named_states`).

    Call it on every rank. FSDP-sharded modules and the optimizer are gathered first (collective), so
    the file is the same as without FSDP: full tensors, reference keys, standard optimizer layout.
    Old periodic checkpoints are pruned (keep the newest `keep_last`; 0 keeps all) only after the new
    file is complete. Other ranks wait at a barrier so no rank races ahead of a half-written file.
    """
    named = named_states(states)
    clash = sorted(set(named) & set(extra or {}))
    if clash:
        raise ValueError(f"state names {clash} are also keys of the checkpoint's extra entries")
    gathered = {name: _gather_state(obj) for name, obj in named.items()}  # same order on every rank
    optim_state = None
    if optimizer is not None:
        if _sharded(named):  # collective gather of the optimizer's full tensors to rank 0
            from util.fsdp import full_optimizer_state_dict
            optim_state = full_optimizer_state_dict(None, optimizer)
        elif is_main_process():
            optim_state = optimizer.state_dict()
    return rank0_write(lambda: _write_training_checkpoint(output_dir, epoch, gathered, optim_state, scaler, args,
                                                          extra, periodic, keep_last), output_dir)


def rank0_write(write: Any, where: str) -> Any:
    """Run `write()` on rank 0 and agree on its outcome: every rank must call this. When rank 0 fails
    (disk full...) every rank raises, instead of the others waiting in their next collective until the
    timeout; then all ranks meet at a barrier so none races ahead of a half-written file. Returns what
    `write()` returned on rank 0 (None elsewhere)."""
    from util.dist import any_rank
    result, failure = None, None
    try:
        if is_main_process():
            result = write()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks heard about it
        failure = e
    if any_rank(failure is not None):
        if failure is not None:
            raise failure
        raise CheckpointError(f"rank 0 failed to write in {where} (its error is in rank 0's log)")
    barrier()
    return result


def _write_training_checkpoint(output_dir: str, epoch: int, gathered: dict[str, Any], optim_state: Any,
                               scaler: Any, args: dict, extra: dict | None, periodic: bool, keep_last: int) -> str:
    """Rank 0's part of save_training_checkpoint: build the state and write it atomically."""
    state = {**gathered, "epoch": epoch, "args": args}
    if optim_state is not None:
        state["optimizer"] = optim_state
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    state["rng"] = rng_state()
    state.update(extra or {})
    path = os.path.join(output_dir, LAST_NAME)
    atomic_save(state, path)
    if periodic:
        periodic_path = os.path.join(output_dir, f"checkpoint-{epoch}.pth")
        # The periodic file holds the same bytes as checkpoint-last.pth: a hard link costs no disk, and
        # the next atomic rename over checkpoint-last.pth leaves it untouched.
        if not _atomic_link(path, periodic_path):
            atomic_save(state, periodic_path)
        logger.info("saved %s", periodic_path)
        if keep_last > 0:
            for old in list_periodic(output_dir)[:-keep_last]:
                os.unlink(old)
    return path


def _atomic_link(src: str, dst: str) -> bool:
    """Hard-link `src` as `dst` (replacing it atomically); False where the file system has no hard links."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.{os.getpid()}.link")
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(src, tmp)
        os.replace(tmp, dst)
        return True
    except OSError:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        return False


def list_periodic(output_dir: str) -> list[str]:
    """`checkpoint-{epoch}.pth` files sorted by epoch."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*.pth"))
             if (m := _EPOCH_RE.search(os.path.basename(p)))]
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(output_dir: str) -> str | None:
    """Newest complete checkpoint in `output_dir`: `checkpoint-last.pth`, else the newest periodic one
    that loads. Temp files of interrupted writes are never candidates."""
    candidates = [os.path.join(output_dir, LAST_NAME)] + list_periodic(output_dir)[::-1]
    for path in candidates:
        if os.path.isfile(path):
            try:
                load_file(path)
                return path
            except CheckpointError as e:
                logger.warning("skipping unusable checkpoint: %s", e)
    return None


def config_differences(saved: dict, current: dict, fields: Iterable[str]) -> list[str]:
    """`field: checkpoint=... now=...` for each of `fields` that both configs have and that differs."""
    diffs = []
    for k in fields:
        if k in saved and k in current and saved[k] != current[k]:
            diffs.append(f"{k}: checkpoint={saved[k]!r} now={current[k]!r}")
    return diffs


def extract_state_dict(ckpt: Any, keys: Iterable[str] = ("model", "teacher", "state_dict", "module"),
                       checkpoint_key: str | None = None, source: str = "checkpoint",
                       encoder: bool = True, key_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The weight dict of a published or training checkpoint, for loading an encoder or a figure: the
    first of `keys` (or `checkpoint_key`, comma-separated) that holds a dict, else the file itself; keys
    lose a leading `module.` (saved from a DDP-wrapped model) and then `backbone.` (DINO-style wrappers).
    With `encoder`, an image-text model's file (SLIP/CLIP: the ViT under `visual.`, no ViT keys at the
    top level) gives its vision tower's keys without the `visual.` prefix. `key_prefix` (BEiT's
    `--model_prefix`, e.g. `module.visual.`) keeps only the keys that start with it, without it.
    Resuming a run never uses this order: `load_training_state` reads each state by its name."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors or a training wrapper, got {type(ckpt).__name__}")
    order = [k.strip() for k in checkpoint_key.split(",")] if checkpoint_key else list(keys)
    sd = None
    for k in order:
        if k in ckpt and isinstance(ckpt[k], dict):
            sd = ckpt[k]
            break
    if sd is None:
        if checkpoint_key:
            raise CheckpointError(f"{source}: none of the keys {order} found (has: {sorted(ckpt)[:8]})")
        sd = ckpt
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source}: no tensor dictionary found (top-level keys: {sorted(ckpt)[:8]})")
    if key_prefix:
        kept = {k[len(key_prefix):]: v for k, v in sd.items() if k.startswith(key_prefix)}
        if not kept:
            raise CheckpointError(f"{source}: no key starts with --model_prefix {key_prefix!r} "
                                  f"(keys look like {sorted(sd)[:3]})")
        sd = kept
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    if encoder and "visual.cls_token" in out and "cls_token" not in out:
        out = {k[len("visual."):]: v for k, v in out.items() if k.startswith("visual.")}
    return out


def _state_entry(ckpt: Any, name: str, only: bool, path: str) -> Any:
    """The checkpoint's entry for the state `name`. A run with one state called `model` also reads the
    older layouts (`state_dict` / `module` wrappers, a bare weight dict); nothing is ever taken from an
    entry of another name (a `{student, teacher}` file never resumes a student from `teacher`)."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a training checkpoint (a dict), got {type(ckpt).__name__}")
    if name in ckpt:
        return ckpt[name]
    states = sorted(k for k, v in ckpt.items() if isinstance(v, dict) and k not in RESERVED_KEYS)
    tensors_at_top = bool(ckpt) and all(isinstance(v, torch.Tensor) for v in ckpt.values())
    if only and name == "model" and (tensors_at_top or any(k in ckpt for k in ("state_dict", "module"))):
        return extract_state_dict(ckpt, keys=("state_dict", "module"), source=path, encoder=False)
    raise CheckpointError(f"{path}: has no '{name}' state (it holds {states or 'no named states'}); was it "
                          f"written by another kind of run?")


def _strip_ddp_prefix(sd: dict[str, Any]) -> dict[str, Any]:
    """Keys without the `module.` a DDP-wrapped module's state_dict() carries (reference runs save those)."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def _recorded_model(ckpt: Any) -> str | None:
    """The model name a training checkpoint's config records (None when it records none)."""
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    if isinstance(saved, argparse.Namespace):
        saved = vars(saved)
    model = saved.get("model") if isinstance(saved, dict) else None
    return model if isinstance(model, str) else None


def _check_module_state(path: str, name: str, only: bool, module: nn.Module, sd: Any,
                        recorded: str | None = None) -> dict[str, torch.Tensor]:
    """The module's entry with keys and shapes checked (one-line CheckpointError, before any tensor moves,
    so that under FSDP every rank fails alike); `recorded`: the model the checkpoint says it holds."""
    what = "the model" if only else f"the state '{name}'"
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: entry '{name}' is not a dict of tensors; cannot load it into {what}")
    sd = _strip_ddp_prefix(sd)
    current = unwrap(module).state_dict()
    missing, unexpected = [k for k in current if k not in sd], [k for k in sd if k not in current]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in current.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        why = (f"it was written by a {recorded} run; resume with that --model, or start a new run with "
               f"--finetune to reuse its encoder" if recorded else "was it written for another --model?")
        raise CheckpointError(f"{path}: does not match {what} ({len(missing)} missing keys e.g. {missing[:3]}, "
                              f"{len(unexpected)} unexpected e.g. {unexpected[:3]}"
                              + (f", {len(shapes)} of another shape e.g. {shapes[:2]}" if shapes else "")
                              + f"); {why}")
    return sd


def load_training_state(path: str, states: States, optimizer: torch.optim.Optimizer | None = None,
                        scaler: Any = None, restore_rng: bool = True, flag: str | None = None) -> dict:
    """Restore a training checkpoint strictly: each named state (see `named_states`) from the entry of
    its own name, same architecture, then optimizer, scaler and (optionally) the RNG; returns the
    checkpoint dict. Collective when a module is FSDP-sharded: every rank reads the file, checks it
    alike, and keeps its shards. `flag` (e.g. `--resume`) is named in the one-line errors."""
    ckpt = load_file(path, flag=flag)
    named = named_states(states)
    only = len(named) == 1
    where = _where(path, flag)
    entries = {name: _state_entry(ckpt, name, only, where) for name, obj in named.items()}
    checked = {name: _check_module_state(where, name, only, obj, entries[name], _recorded_model(ckpt))
               if isinstance(obj, nn.Module) else entries[name] for name, obj in named.items()}
    for name, sd in checked.items():
        if isinstance(named[name], nn.Module):
            check_finite(sd, path, flag)
    sharded = _sharded(named)
    for name, obj in named.items():
        if isinstance(obj, nn.Module) and is_fsdp(obj):
            from util.fsdp import load_full_model_state
            try:
                load_full_model_state(obj, checked[name])
            except KeyError as e:
                raise CheckpointError(f"{path}: does not match the state '{name}' ({e.args[0] if e.args else e})"
                                      ) from None
        elif isinstance(obj, nn.Module):
            unwrap(obj).load_state_dict(checked[name], strict=True)
        else:
            obj.load_state_dict(checked[name])
    if optimizer is not None:
        _load_optimizer(path, ckpt.get("optimizer"), optimizer, sharded)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng and isinstance(ckpt.get("rng"), dict):
        set_rng_state(ckpt["rng"])
    return ckpt


def _load_optimizer(path: str, optim_sd: Any, optimizer: torch.optim.Optimizer, sharded: bool) -> None:
    try:
        if sharded:  # collective: every rank read the file; each keeps its shards of the moments
            from util.fsdp import load_full_optimizer_state
            load_full_optimizer_state(optimizer, optim_sd)
        elif optim_sd is not None:
            optimizer.load_state_dict(optim_sd)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: optimizer state does not match this model's parameter groups ({e})") from None


# --------------------------------------------------------------------------- pretrained-encoder loading
# RETFound's DINOv2-style checkpoints name the MLP layers w12 / w3; our encoders call them fc1 / fc2.
_REMAPS = (("mlp.w12.", "mlp.fc1."), ("mlp.w3.", "mlp.fc2."))


def _group_by_prefix(keys: Iterable[str]) -> str:
    groups: dict[str, int] = {}
    for k in keys:
        head = k.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{h}.* x{n}" if n > 1 else h for h, n in sorted(groups.items()))


def load_pretrained_encoder(model: nn.Module, path: str, checkpoint_key: str | None = None,
                            reset_head: bool = True, ckpt: Any = None, flag: str | None = None,
                            key_prefix: str | None = None) -> dict[str, Any]:
    """Load a pretrained or finetuned checkpoint into a classifier (`ckpt`: the file at `path`, when the
    caller has already read it for its preprocessing record, so a large checkpoint is read once).

    Reads `model`/`teacher`/`state_dict`/raw layouts, strips `module.`/`backbone.`, remaps RETFound-DINOv2
    MLP names, drops a head of the wrong shape, resizes position embeddings to the model's grid (bicubic,
    as MAE), then asserts that only the expected keys are missing: a wrong checkpoint never trains
    silently from scratch. Returns a report (missing, unexpected, resized, the checkpoint's preprocessing).
    Every error is one line naming `flag` (the option that gave `path`, e.g. --finetune) and the file.
    """
    from util.pos_embed import resize_pos_embed
    where = _where(path, flag)
    if ckpt is None:
        ckpt = load_file(path, flag=flag)
    sd = extract_state_dict(ckpt, checkpoint_key=checkpoint_key, source=where, key_prefix=key_prefix)
    for old, new in _REMAPS:
        sd = {k.replace(old, new): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("relative_position_index")}
    target = model.state_dict()
    dropped = []
    for k in [k for k in sd if k.startswith("head.")]:
        if k not in target or target[k].shape != sd[k].shape:
            dropped.append(k)
            del sd[k]
    resized = None
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape:
        extra = 1 if getattr(model, "cls_token", None) is not None else 0
        old_tokens = sd["pos_embed"].shape[1] - extra
        grid = tuple(model.grid_size)
        if sd["pos_embed"].ndim != 3 or sd["pos_embed"].shape[-1] != target["pos_embed"].shape[-1]:
            raise CheckpointError(f"{where}: embedding width {sd['pos_embed'].shape[-1]} does not match the model's "
                                  f"{target['pos_embed'].shape[-1]}; was it trained with another --model?")
        try:
            sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], grid, num_extra_tokens=extra)
        except ValueError as e:  # e.g. a ViT file (cls row + square grid) given to a ConvViT (no cls token)
            raise CheckpointError(f"{where}: its position table ({sd['pos_embed'].shape[1]} tokens) does not fit "
                                  f"this --model ({extra} extra token(s), {grid[0]}x{grid[1]} grid): {e}; was it "
                                  f"trained with another --model?") from None
        resized = f"{int(old_tokens ** 0.5)}x{int(old_tokens ** 0.5)} -> {grid[0]}x{grid[1]}"
        logger.warning("position embeddings interpolated %s (bicubic) to fit --input_size", resized)
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in sd.items()
              if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if shapes:
        raise CheckpointError(f"{where}: {len(shapes)} weights of another shape than this --model's (e.g. "
                              f"{'; '.join(shapes[:2])}); pick the model the checkpoint was trained with")
    check_finite(sd, path, flag)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias", "head.0.running_mean",
                       "head.0.running_var", "head.0.num_batches_tracked", "head.1.weight", "head.1.bias"}
    for spec in checkpoint_families(sd):  # encoder keys the source family's checkpoints lack by design
        allowed_missing |= set(spec.fresh_encoder_keys)
        _start_fresh(model, [k for k in missing if k in spec.fresh_encoder_keys], spec.name)
    bad = [k for k in missing if k not in allowed_missing or (not reset_head and k.startswith(("head", "fc_norm")))]
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} encoder weights missing ({_group_by_prefix(bad)}); it does not fit "
                              f"this --model (found {len(sd)} tensors). Pick the model the checkpoint was trained with")
    expected_unexpected = [k for k in unexpected if k.startswith(ignorable_prefixes())]
    other = [k for k in unexpected if k not in expected_unexpected]
    logger.info("loaded %s: missing %s; ignored %s%s", path, _group_by_prefix(missing) or "none",
                _group_by_prefix(expected_unexpected) or "none",
                f"; UNEXPECTED {_group_by_prefix(other)}" if other else "")
    if other:
        logger.warning("checkpoint keys not used by the model: %s", ", ".join(other[:10]))
    if reset_head and any(k.startswith("head") for k in missing) and isinstance(getattr(model, "head", None), nn.Linear):
        from timm.layers import trunc_normal_
        trunc_normal_(model.head.weight, std=2e-5)  # the MAE/RETFound finetuning head initialisation
        nn.init.zeros_(model.head.bias)
    return {"missing": list(missing), "unexpected": list(unexpected), "dropped_head": dropped,
            "pos_embed_resized": resized, "preprocessing": ckpt.get("preprocessing") if isinstance(ckpt, dict) else None,
            "epoch": ckpt.get("epoch") if isinstance(ckpt, dict) else None}


def _start_fresh(model: nn.Module, keys: list[str], family: str) -> None:
    """Re-initialise the submodules that own `keys` (parameters a checkpoint lacks by design), so they
    start as a freshly built model's would, whatever the model was before loading."""
    owners = sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})
    for owner in owners:
        module = model.get_submodule(owner)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        logger.warning("%s checkpoint without %s.*: a fresh %s takes its place", family, owner, type(module).__name__)
