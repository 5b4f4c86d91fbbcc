"""What a model family tells the shared code, declared in the family's own `models_*` module.

The shared modules (util.checkpoint, util.fsdp, util.runtime) know no family by name: a family module
builds one `FamilySpec`, registers it with `register_family` (so that loading a pretrained encoder knows
every registered family's pretraining-only keys) and sets it as the `family_spec` class attribute of its
model classes (so that code holding a model reads its family from it). A subclass inherits its parent's
spec unless it sets its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch.nn as nn

from util.unwrap import unwrap


@dataclass(frozen=True)
class FamilySpec:
    """One family's declaration.

    name: the family's name in logs.
    states: the names under which a training checkpoint of this family stores its objects, model first
        (a run that passes a bare model saves and resumes it under `states[0]`).
    resume_fields: config keys whose change makes a continued run a different experiment (checked
        besides the run-level ones before an automatic resume).
    ignore_prefixes: key prefixes of this family's training checkpoints that an encoder for finetuning
        does not have (decoder, mask token, ...): loading drops them without a warning.
    markers: module names that appear in the keys of this family's checkpoints and of no other family's
        (a key matches when `.name.` occurs in `.key`); they identify the family of a checkpoint.
    fresh_encoder_keys: encoder keys this family's checkpoints lack by design; a classifier loading
        such a checkpoint starts those parameters freshly initialised instead of refusing the file.
    fsdp_block_types: module classes that each become their own FSDP unit under `--fsdp`.
    fsdp_forward_methods: methods besides forward() that run the whole model (they need FSDP's hooks).
    """
    name: str
    states: tuple[str, ...] = ("model",)
    resume_fields: tuple[str, ...] = ()
    ignore_prefixes: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()
    fresh_encoder_keys: tuple[str, ...] = ()
    fsdp_block_types: tuple[type, ...] = ()
    fsdp_forward_methods: tuple[str, ...] = ()

    def marks(self, keys: Iterable[str]) -> bool:
        """True when any of `keys` carries one of this family's markers."""
        if not self.markers:
            return False
        needles = tuple(f".{m}." for m in self.markers)
        return any(n in f".{k}" for k in keys for n in needles)


_FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Make `spec` known to the shared code; registering a name again replaces it (a re-imported module)."""
    _FAMILIES[spec.name] = spec
    return spec


def registered_families() -> list[FamilySpec]:
    """Every registered spec, in registration order."""
    return list(_FAMILIES.values())


def family_of(module: Any) -> FamilySpec | None:
    """The spec a module's class declares (under DDP / compile wrappers), or None."""
    if not isinstance(module, nn.Module):
        return None
    spec = getattr(type(unwrap(module)), "family_spec", None)
    return spec if isinstance(spec, FamilySpec) else None


def ignorable_prefixes() -> tuple[str, ...]:
    """Pretraining-only key prefixes of every registered family, without repeats."""
    out: list[str] = []
    for spec in _FAMILIES.values():
        out += [p for p in spec.ignore_prefixes if p not in out]
    return tuple(out)


def checkpoint_families(keys: Iterable[str]) -> list[FamilySpec]:
    """The registered families whose markers occur in a checkpoint's keys."""
    keys = list(keys)
    return [spec for spec in _FAMILIES.values() if spec.marks(keys)]
