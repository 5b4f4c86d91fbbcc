"""Named presets of flag values ("recipes") applied under the flags a user typed.

A recipe fills only the flags that were not given on the command line, so a seed command with its own
`--blr` keeps it. Entry points declare their recipe tables; this module only applies them and says
what changed, so the log states every default that was adapted.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Mapping

logger = logging.getLogger("medfound")

Value = Any | Callable[[argparse.Namespace], Any]  # a value, or a function of the other settings


def explicit_flags(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None,
                   argv: list[str] | None = None) -> set[str]:
    """Destinations the user set: recorded by `util.cli.parse_args`; for a namespace built in Python
    without it, the flags whose value differs from the parser's default."""
    given = getattr(args, "explicit_flags", None)
    if given is not None:
        return set(given)
    if parser is None:
        return set()
    defaults = {a.dest: a.default for a in parser._actions}
    return {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}


def apply_recipe(args: argparse.Namespace, name: str, table: Mapping[str, Mapping[str, Value]],
                 given: set[str], why: str = "") -> dict[str, Any]:
    """Set the recipe's values for every flag not in `given`; log and return what changed."""
    changed: dict[str, Any] = {}
    for dest, value in table[name].items():
        if dest in given:
            continue
        new = value(args) if callable(value) else value
        if getattr(args, dest, None) != new:
            changed[dest] = new
            setattr(args, dest, new)
    if changed:
        text = ", ".join(f"--{k} {_fmt(v)}" for k, v in changed.items())
        logger.info("recipe %s%s: %s (flags you pass win)", name, f" ({why})" if why else "", text)
    return changed


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_fmt(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
