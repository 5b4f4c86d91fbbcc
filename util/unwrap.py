"""The module under the wrappers a run adds (DDP, torch.compile, CompiledOrEager) and whether it is
FSDP-sharded. A leaf module: util.checkpoint, util.fsdp and util.loop all need these two questions
answered and must not import each other for it."""
from __future__ import annotations

import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / torch.compile wrappers (whose keys carry `module.` / `_orig_mod.` prefixes)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_fsdp(model: nn.Module) -> bool:
    """True when the module (under DDP-style / torch.compile wrappers) was sharded with `fully_shard`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(unwrap(model), FSDPModule)
