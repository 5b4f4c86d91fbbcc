"""Command-line plumbing shared by every entry point: seed-compatible flags, one-line errors, logging.

Seed command lines of the reference projects must run verbatim: `--local_rank`/`--local-rank`, explicit aliases for
flags the seeds abbreviate (`--output`), last-wins duplicates (argparse default), and booleans that
accept both a bare flag and `true/false`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from typing import Any, Callable, Sequence


AMP_CHOICES = ("auto", "bf16", "fp16", "none")  # --amp values (util.loop re-exports them)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description/epilog layout and appends each option's default to its help.

    Not appended where the help already states the default in words (it says more than `None`), nor to
    flags that take no value and are off unless given (store_true False, store_false, store_const)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is argparse.SUPPRESS or "%(default)" in text or re.search(r"\bdefault\b", text, re.I):
            return text
        if action.nargs == 0 and not (isinstance(action, argparse._StoreTrueAction) and action.default is True):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        shown = "%(default)r" if isinstance(action.default, str) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def help_requested(argv: Sequence[str] | None = None) -> bool:
    """True when the command line asks for -h/--help (before any `--`)."""
    for a in sys.argv[1:] if argv is None else argv:
        if a == "--":
            return False
        if a in ("-h", "--help"):
            return True
    return False


def exit_if_help(get_parser: Callable[[], argparse.ArgumentParser]) -> None:
    """When the script defining `get_parser` runs as __main__ with -h/--help: print its help, exit 0.

    Entry points call this right after their parser, before importing torch and the models, so that
    `--help` is instant; imported as a module (tests, main_few_shot) it does nothing."""
    if getattr(get_parser, "__module__", None) == "__main__" and help_requested():
        get_parser().print_help()
        sys.exit(0)


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file); reported as one line, never a traceback."""


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def add_bool_flag(parser: argparse.ArgumentParser, *names: str, default: bool, help: str, dest: str | None = None) -> None:
    """`--flag` sets True, `--flag false` / `--flag true` set explicitly; `--no_flag` sets False."""
    kw = {"dest": dest} if dest else {}
    parser.add_argument(*names, type=str2bool, nargs="?", const=True, default=default, help=help, **kw)
    first = names[0].lstrip("-")
    parser.add_argument(f"--no_{first}", dest=dest or first.replace("-", "_"), action="store_false",
                        help=argparse.SUPPRESS)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Launcher and device flags every entry point accepts."""
    g = parser.add_argument_group("distributed / device")
    g.add_argument("--device", default="cuda", help="cuda or cpu (falls back to cpu when CUDA is absent)")
    g.add_argument("--seed", default=0, type=int, help="base random seed (each rank adds its rank)")
    g.add_argument("--num_workers", default=None, type=int,
                   help="data-loader workers per process (default: min(8, cores per process))")
    add_bool_flag(g, "--pin_mem", default=True, help="pin host memory for faster host-to-GPU copies")
    g.add_argument("--world_size", default=1, type=int, help="number of processes (set by launchers)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int,
                   help="set by torch.distributed.launch; LOCAL_RANK from the environment wins")
    add_bool_flag(g, "--dist_on_itp", default=False, help="read ranks from OpenMPI variables")
    g.add_argument("--dist_url", default="env://", help="process-group init URL")


def add_performance_args(parser: argparse.ArgumentParser, fsdp: bool = False) -> None:
    """Speed flags shared by the training entry points; each fast path keeps the loss numerics (tests)."""
    g = parser.add_argument_group("speed")
    add_bool_flag(g, "--compile", default=False,
                  help="torch.compile the model (first steps are slow while it compiles; falls back to eager with "
                       "a warning if compilation fails)")
    g.add_argument("--compile_mode", default=None, choices=("default", "reduce-overhead", "max-autotune",
                                                            "max-autotune-no-cudagraphs"),
                   help="torch.compile mode (default: torch's default)")
    add_bool_flag(g, "--channels_last", default=False, help="NHWC memory format for models with convolutions "
                  "(ConvMAE/ConvViT); ignored for plain ViTs, whose only conv is the patch embedding")
    add_bool_flag(g, "--ddp_static_graph", default=True, help="DDP static_graph (the set of used parameters never "
                  "changes between steps in our models; enables bucket re-ordering and overlap); turned off with --accum_iter > 1")
    g.add_argument("--ddp_bucket_mb", default=25, type=int, help="DDP gradient bucket size in MiB")
    if fsdp:
        add_bool_flag(g, "--fsdp", default=False, help="shard parameters, gradients and optimizer state over the "
                      "processes (FSDP2) instead of replicating them (DDP): for ViT-L/H at large batch")


def check_argv(argv: Sequence[str]) -> None:
    """Catch the broken line continuation `\\ ` (backslash-space) that some seed READMEs contain."""
    for a in argv:
        if a.strip() == "" :
            raise UserError("an argument consisting only of whitespace was passed; a line in your shell "
                            "command probably ends with '\\ ' (backslash followed by a space) instead of '\\'")


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations the user actually passed (even when equal to the default)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(list(argv))
    finally:
        for a, d in saved:
            a.default = d
    return set(vars(given))


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    check_argv(argv)
    args = parser.parse_args(argv)
    args.explicit_flags = sorted(explicit_dests(parser, argv))
    env_local = os.environ.get("LOCAL_RANK")
    if env_local is not None and env_local.strip():
        args.local_rank = int(env_local)
    return args


def setup_logging(rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Log from rank 0 only (others warn and above) so multi-GPU output stays readable."""
    logger = logging.getLogger("medfound")
    for old in [h for h in logger.handlers if getattr(h, "_medfound", False)]:
        logger.removeHandler(old)  # replace our own handler only (tests may attach theirs)
    handler = logging.StreamHandler(sys.stdout)
    handler._medfound = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger


def args_to_dict(args: argparse.Namespace | dict) -> dict[str, Any]:
    """Plain, JSON-safe copy of the config (stored in checkpoints so they load with weights_only)."""
    items = vars(args).items() if not isinstance(args, dict) else args.items()
    out: dict[str, Any] = {}
    for k, v in items:
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
        elif isinstance(v, dict):
            out[k] = json.loads(json.dumps(v, default=str))
        else:
            out[k] = str(v)
    return out


def user_message(e: UserError) -> str:
    """The one-line message of a UserError, also when a DataLoader worker (or its pin-memory thread)
    raised it: torch re-raises `type(e)(msg)` in the main process with msg = 'Caught <Type> in
    DataLoader worker process N.' + newline + 'Original Traceback ...' ending in the formatted
    exception line '<module>.<Type>: <message>'; the message is what follows the last such prefix."""
    msg = str(e)
    if msg.startswith("Caught ") and "\nOriginal Traceback" in msg:
        cls = type(e)
        for name in (f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__):  # __main__/builtins: bare name
            at = msg.rfind(f"\n{name}: ")
            if at >= 0:
                msg = msg[at + len(name) + 3:]
                break
    return one_line(msg)


def one_line(text: str) -> str:
    """`text` with its lines joined by spaces (blank lines dropped), for messages printed as one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def check_output_path(path: str | None, flag: str = "--output_dir") -> None:
    """A folder a run will write into must be creatable, without creating anything yet (a failed start
    leaves nothing behind): not an existing file, no file in the way higher up, writable."""
    if not path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: exists and is a file, not a folder; choose another {flag} (the file is left "
                        f"untouched)")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise UserError(f"{flag} {path}: cannot create it, {probe} is a file")
    if os.path.isdir(probe) and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable; choose another {flag}")


def run_main(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None = None) -> Any:
    """Parse, run, and turn user errors into one `prog: error: ...` line with exit status 2.

    Backstop: an OSError that names a file (a failed write or read the code did not report itself) is
    one line too, `cannot access <file>: <reason>`, rather than a traceback."""
    try:
        args = parse_args(parser, argv)
        return main(args)
    except UserError as e:
        print(f"{parser.prog}: error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if not e.filename or not e.strerror:
            raise
        target = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
        print(f"{parser.prog}: error: cannot access {target}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        sys.exit(130)


# ------------------------------------------------------------------------------------ range checks
# A range rule is (dest, spec) or (dest, spec, hint): spec is space-separated bounds (">0", ">=1", "<1",
# "<=1") and optionally "ascending" (a multi-value flag whose values must not decrease, e.g. MIN MAX).
# Every value must be a finite number; an unset optional flag (None) passes. Entry points check their rules
# right after parsing, before any folder is created or data read, so a wrong value costs one line, not a run.
RangeRule = tuple[str, str] | tuple[str, str, str]
_BOUND = re.compile(r"(>=|<=|>|<)(-?\d+(?:\.\d*)?(?:e-?\d+)?)$")
_OPS = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}


def _shown(value: Any) -> str:
    values = value if isinstance(value, (list, tuple)) else [value]
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def check_range(flag: str, value: Any, spec: str, hint: str = "") -> None:
    """Raise a one-line UserError naming `flag` unless `value` (a number, or a list of numbers) meets `spec`."""
    if value is None:
        return
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    bounds: list[tuple[str, float]] = []
    ascending = False
    for token in spec.split():
        if token == "ascending":
            ascending = True
            continue
        m = _BOUND.match(token)
        if not m:
            raise ValueError(f"bad range spec {spec!r} for {flag}")  # a programming error, not the user's
        bounds.append((m.group(1), float(m.group(2))))
    wanted = " and ".join(f"{op} {bound:g}" for op, bound in bounds)
    each = "each value " if len(values) > 1 or isinstance(value, (list, tuple)) else ""
    tail = f" ({hint})" if hint else ""
    for v in values:
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise UserError(f"{flag} {_shown(value)}: expected a number{tail}") from None
        if not math.isfinite(x):
            raise UserError(f"{flag} {_shown(value)}: {each}must be a finite number{' ' + wanted if wanted else ''}"
                            f"{tail}")
        if not all(_OPS[op](x, bound) for op, bound in bounds):
            raise UserError(f"{flag} {_shown(value)}: {each}must be {wanted}{tail}")
    if ascending and any(b < a for a, b in zip(values, values[1:])):
        raise UserError(f"{flag} {_shown(value)}: the values must not decrease (MIN before MAX){tail}")


def check_ranges(args: argparse.Namespace, rules: Sequence[RangeRule]) -> None:
    """Check every rule's flag (`--<dest>`) on `args`; a flag `args` lacks passes (callers of run())."""
    for dest, spec, *hint in rules:
        check_range(f"--{dest}", getattr(args, dest, None), spec, hint[0] if hint else "")


def patch_size_of(model: str | None) -> int | None:
    """The patch size a model name states (`..._patch16...` -> 16; every registered name with `patchN` has
    patch size N, ConvMAE's total stride included), or None when the name does not say (e.g. RETFound_mae)."""
    m = re.search(r"patch(\d+)", model or "")
    return int(m.group(1)) if m else None


def check_patch_multiple(input_size: int | None, model: str | None) -> None:
    """--input_size must tile into whole patches of --model (checked where the name states the patch size)."""
    patch = patch_size_of(model)
    if input_size is None or not patch or input_size % patch == 0:
        return
    below, above = max(patch, input_size // patch * patch), (input_size // patch + 1) * patch
    raise UserError(f"--input_size {input_size}: must be a multiple of {model}'s patch size {patch} "
                    f"(e.g. {below} or {above})")
