"""One registry of named model factories for every family (MAE, ViT, ConvMAE, ...).

Names follow the reference repositories (compat §1) so seed command lines work verbatim. We keep our
own small registry rather than timm's so reference names never collide with timm's own models.
"""
from __future__ import annotations

import difflib
import logging
from typing import Callable

import torch.nn as nn

from util.cli import UserError

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_DEPRECATED: dict[str, tuple[str, str]] = {}
logger = logging.getLogger("medfound")


def register(*aliases: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a factory under its function name and any aliases."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        for name in (fn.__name__, *aliases):
            if name in _FACTORIES and _FACTORIES[name] is not fn:
                raise KeyError(f"model name registered twice: {name}")
            _FACTORIES[name] = fn
        return fn
    return wrap


def register_deprecated(name: str, target: str, reason: str) -> None:
    """An old name that builds `target` and logs why (e.g. USPEC's undefined model name)."""
    _DEPRECATED[name] = (target, reason)


class UnknownModelError(UserError, ValueError):
    pass


def resolve(name: str) -> str:
    if name in _DEPRECATED:
        target, reason = _DEPRECATED[name]
        logger.warning("--model %s is a deprecated alias of %s: %s", name, target, reason)
        return target
    return name


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; unknown names fail with the closest registered names."""
    name = resolve(name)
    if name not in _FACTORIES:
        close = difflib.get_close_matches(name, list(_FACTORIES) + list(_DEPRECATED), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown --model '{name}'.{hint} See README 'Models' for the list.")
    return _FACTORIES[name](**kwargs)


def list_models(prefix: str = "") -> list[str]:
    return sorted(n for n in (*_FACTORIES, *_DEPRECATED) if n.startswith(prefix))


def is_registered(name: str) -> bool:
    return name in _FACTORIES or name in _DEPRECATED
