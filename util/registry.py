"""One registry of named model factories for every family (MAE, ViT, ConvMAE, ...).

Names follow the reference repositories (`mae_vit_base_patch16`, `vit_large_patch16`, ...) so seed command lines work verbatim. We keep our
own small registry rather than timm's so reference names never collide with timm's own models.
"""
from __future__ import annotations

import difflib
import logging
import sys
from typing import Callable

import torch.nn as nn

from util.cli import UserError

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_DEPRECATED: dict[str, tuple[str, str]] = {}
logger = logging.getLogger("medfound")


def _same_definition(a: Callable, b: Callable) -> bool:
    """The same factory, or its new definition after `importlib.reload` (a notebook re-running imports)."""
    return a is b or (getattr(a, "__module__", None), getattr(a, "__qualname__", None), getattr(a, "__name__", None)) \
        == (getattr(b, "__module__", None), getattr(b, "__qualname__", None), getattr(b, "__name__", None))


def _export(module_name: str, name: str, fn: Callable[..., nn.Module]) -> None:
    """Make `name` an attribute of the defining module, so `getattr(models_mae, name)()` and
    `models_vit.__dict__[name](...)` work as in the reference notebooks and READMEs."""
    module = sys.modules.get(module_name)
    if module is None:
        return
    existing = getattr(module, name, None)
    if existing is not None and not _same_definition(existing, fn):
        raise KeyError(f"{module_name}.{name} already exists and is not the registered factory")
    setattr(module, name, fn)


def register(*aliases: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a factory under its function name and any aliases; each name is also a module-level
    function of the module that defines the factory."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        for name in (fn.__name__, *aliases):
            if name in _FACTORIES and not _same_definition(_FACTORIES[name], fn):
                raise KeyError(f"model name registered twice: {name}")
            _FACTORIES[name] = fn
            _export(fn.__module__, name, fn)
        return fn
    return wrap


def register_deprecated(name: str, target: str, reason: str, module: str | None = None) -> None:
    """An old name that builds `target` and logs why (e.g. USPEC's undefined model name); with `module`,
    also a module-level function there that does the same."""
    _DEPRECATED[name] = (target, reason)
    if module is not None:
        def factory(**kw) -> nn.Module:
            return create_model(name, **kw)
        factory.__name__ = factory.__qualname__ = name
        factory.__module__ = module
        factory.__doc__ = f"Deprecated: builds {target}. {reason}"
        _export(module, name, factory)


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
