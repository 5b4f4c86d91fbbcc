#!/usr/bin/env python
"""Write a blurred copy of an image tree for DeblurringMAE (blurred input, sharp target).

Same name and options as the DeblurringMAE tool. The source tree is walked recursively (the reference
expects ``src/<split>/<class>/<file>``; any depth works) and each image is written, blurred, to the
same relative path under ``--dst_dir`` with the same file name and format. Output is grayscale like
the reference unless ``--keep_color``. The blur itself lives in ``util.blur`` so on-the-fly training
and evaluation can apply exactly the same degradation.

Exit status: 0 on success, 1 if an image failed (without ``--skip_bad``), 2 for bad arguments, an
unusable source / destination directory or an output that could not be written (disk full: one line
naming the file), 128+N when stopped by signal N (Ctrl-C, SIGTERM). Outputs are written atomically,
so an interrupted run can simply be started again: finished files are skipped. Until every image is
written the tree holds ``.blur_in_progress``, and pretraining refuses such a tree.
"""
from __future__ import annotations

import argparse
import multiprocessing
import json
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from util.atomic import WriteError, write_atomic as write_file_atomic
from util.blur import BLUR_IN_PROGRESS, METHODS, BlurSpec, array_to_pil, blur_array, pil_to_array
from util.cli import HelpFormatter

PROG = "blurred_images.py"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")
# Temp outputs are hidden and end in a non-image suffix so torchvision's ImageFolder never picks up
# one left behind by a killed run.
_TMP_MARK = ".blurtmp-"
# cv2.imwrite's defaults (JPEG quality 95, lossless WebP); Pillow's own (75 / lossy 80) would add
# compression artefacts to the model input that the reference's files did not have.
_SAVE_KWARGS: dict[str, dict[str, object]] = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}

EPILOG = """\
example:
  python blurred_images.py --src_dir data/busi --dst_dir data/busi_blur --method gaussian --sigma 1.1

  data/busi/train/benign/img1.png  ->  data/busi_blur/train/benign/img1.png  (grayscale, blurred)

methods:
  gaussian  Gaussian, sigma=--sigma, kernel size from sigma as OpenCV (9 taps at 1.1 on 8-bit)
  mean      --ksize x --ksize box filter
  median    --ksize x --ksize median
  motion    line of --ksize pixels at a random angle drawn from (--seed, relative path)
  defocus   anti-aliased disc of radius --ksize

Re-running skips outputs that already exist (resume after an interruption); --overwrite redoes them.
"""


class UsageError(Exception):
    """A problem with the arguments or directories: reported in one line, exit status 2."""


@dataclass(frozen=True)
class Job:
    src: str
    dst: str
    spec: BlurSpec
    run_token: str


class OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line (plus a --help hint) instead of argparse's usage dump, so they
    read the same as the directory errors in logs and batch scripts."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Blur every image under --src_dir into a mirrored tree under --dst_dir "
                    "(DeblurringMAE input images).",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--src_dir", required=True, help="root of the sharp images (walked recursively)")
    p.add_argument("--dst_dir", required=True, help="root of the blurred copies (created; must not be inside src_dir)")
    p.add_argument("--method", default="gaussian", choices=METHODS, help="blur type (default: %(default)s)")
    p.add_argument("--sigma", type=float, default=1.1, help="Gaussian sigma in pixels (default: %(default)s)")
    p.add_argument("--ksize", type=int, default=5,
                   help="window size for mean/median, line length for motion, disc radius for defocus "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for random kernels, mixed with each file's relative path (default: %(default)s)")
    p.add_argument("--keep_color", action="store_true",
                   help="blur RGB per channel instead of converting to grayscale like the reference")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist (default: skip them)")
    p.add_argument("--skip_bad", action="store_true",
                   help="skip unreadable images and list them at the end (default: stop at the first one)")
    p.add_argument("--num_workers", type=int, default=1, help="worker processes (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="print only errors and the summary")
    return p


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------

def check_dirs(src_dir: str, dst_dir: str) -> tuple[Path, Path]:
    src = Path(src_dir).expanduser()
    if not src.exists():
        raise UsageError(f"source directory does not exist: {src}")
    if not src.is_dir():
        raise UsageError(f"source is not a directory: {src}")
    src = src.resolve()
    dst = Path(dst_dir).expanduser().resolve()
    # Writing into the source tree would make a later run blur its own outputs; the reverse nesting
    # could overwrite source images whose relative path starts with the source's own name.
    if dst == src:
        raise UsageError(f"--dst_dir must differ from --src_dir: {dst}")
    if dst.is_relative_to(src):
        raise UsageError(f"--dst_dir must not be inside --src_dir: {dst} is under {src}")
    if src.is_relative_to(dst):
        raise UsageError(f"--src_dir must not be inside --dst_dir: {src} is under {dst}")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"--dst_dir {dst}: exists and is a file, not a folder; choose another --dst_dir (the file is "
                         f"left untouched)")
    return src, dst


def find_images(src: Path) -> list[str]:
    """Relative POSIX paths of all images under ``src``, sorted, from the one image lister
    (util.image_io.list_image_files): hidden files and folders ignored, folder links followed without
    cycles or repeats, FIFOs/devices/broken links left out and named in a warning."""
    from util.cli import UserError
    from util.image_io import list_image_files
    try:
        files = list_image_files(str(src), extensions=IMAGE_EXTENSIONS, folder_errors=True)
    except UserError as e:
        raise UsageError(str(e)) from None
    return sorted(Path(f).relative_to(src).as_posix() for f in files)


# --------------------------------------------------------------------------------------------------
# Per-file work (runs in workers)
# --------------------------------------------------------------------------------------------------

class BadImage(Exception):
    """The source could not be decoded; skippable with --skip_bad."""


def load_image(path: Path, grayscale: bool) -> tuple[np.ndarray, str]:
    try:
        with Image.open(path) as im:
            im.load()  # decode now so truncated files fail here, not while saving
            fmt = im.format or ""
            # cv2.imread honours EXIF orientation, so the reference's outputs were upright.
            im = ImageOps.exif_transpose(im)
            arr = pil_to_array(im, grayscale=grayscale)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"{type(e).__name__}: {e}") from e
    return arr, fmt


def save_format(path: Path, fallback: str) -> str:
    return Image.registered_extensions().get(path.suffix.lower(), fallback)


def write_atomic(img: Image.Image, out: Path, fmt: str, run_token: str) -> None:
    # util.atomic's writer: a crash leaves either the old file or the complete new one, so resuming can
    # trust every existing output; the run token in the temp name lets an aborted run sweep its temps.
    write_file_atomic(out, lambda f: img.save(f, format=fmt, **_SAVE_KWARGS.get(fmt, {})), fsync=False,
                      tmp_tag=f"{_TMP_MARK}{run_token}-")


def process_one(job: Job, rel: str) -> tuple[str, str, str]:
    """Returns (rel, status, message) with status 'ok', 'bad' (unreadable source) or 'fatal'."""
    src = Path(job.src) / rel
    out = Path(job.dst) / rel
    try:
        arr, fmt = load_image(src, job.spec.grayscale)
    except BadImage as e:
        return rel, "bad", str(e)
    try:
        blurred = array_to_pil(blur_array(arr, job.spec, key=rel))
        write_atomic(blurred, out, save_format(out, fmt), job.run_token)
    except WriteError as e:  # a write failure (disk full, permissions) would hit every file: stop
        return rel, "fatal", str(e)
    except Exception as e:  # noqa: BLE001 - e.g. an encoder that cannot store this image
        return rel, "fatal", f"cannot write {out}: {type(e).__name__}: {e}"
    return rel, "ok", ""


_WORKER_JOB: Job | None = None


def _init_worker(job: Job) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job
    # The parent owns interruption: Ctrl-C reaches the whole process group, and a KeyboardInterrupt
    # inside a pool worker only prints tracebacks. The parent terminates the pool (SIGTERM, default
    # action) and sweeps the temp files instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _work(rel: str) -> tuple[str, str, str]:
    assert _WORKER_JOB is not None
    return process_one(_WORKER_JOB, rel)


def sweep_temps(dst: Path, rels: Sequence[str], run_token: str) -> None:
    """Remove this run's temp files after an abort (workers killed mid-write cannot clean up)."""
    for d in {(dst / r).parent for r in rels}:
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".") and f"{_TMP_MARK}{run_token}-" in p.name:
                    p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------

class Interrupted(BaseException):
    """Raised from the SIGINT/SIGTERM handler; a BaseException, like KeyboardInterrupt, so per-file
    ``except Exception`` handlers do not mistake it for a write error."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


class Progress:
    """Time-throttled progress lines: readable in logs whether a run has 10 files or 100k."""

    def __init__(self, total: int, quiet: bool, interval_s: float = 2.0) -> None:
        self.total, self.quiet, self.interval_s = total, quiet, interval_s
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.quiet or now - self.last < self.interval_s or self.done == self.total:
            return  # the summary line covers the end
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate
        print(f"[{self.done}/{self.total}] {100.0 * self.done / self.total:5.1f}%  "
              f"{rate:.1f} img/s  eta {eta:.0f}s", flush=True)


def check_existing_spec(dst: Path, spec: BlurSpec, overwrite: bool) -> None:
    """blur_spec.json must describe the files beside it: a rerun with other settings would skip the
    existing images yet record the new settings, which pretraining stores and finetuning applies."""
    path = dst / "blur_spec.json"
    if overwrite or not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is unreadable ({e}); use --overwrite to re-blur every image and rewrite it") from None
    if old != spec.to_dict():
        try:
            before = BlurSpec.from_dict(old).describe()
        except (TypeError, ValueError, KeyError):
            before = json.dumps(old)
        raise UsageError(f"{dst} holds images made with {before} (blur_spec.json), not {spec.describe()}: use "
                         f"another --dst_dir, or --overwrite to re-blur every image with the new settings")


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        spec = BlurSpec(method=args.method, sigma=args.sigma, ksize=args.ksize,
                        grayscale=not args.keep_color, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.num_workers < 1:
        raise UsageError(f"--num_workers must be >= 1, got {args.num_workers}")
    src, dst = check_dirs(args.src_dir, args.dst_dir)
    rels = find_images(src)
    if not rels:
        raise UsageError(f"no images found under {src} (looked for {', '.join(IMAGE_EXTENSIONS)})")

    check_existing_spec(dst, spec, args.overwrite)
    todo = rels if args.overwrite else [r for r in rels if not (dst / r).exists()]
    n_existing = len(rels) - len(todo)
    if not args.quiet:
        print(f"{PROG}: {spec.describe()} {'color' if args.keep_color else 'grayscale'}: {len(rels)} images "
              f"under {src} -> {dst}" + (f" ({n_existing} already done, skipping)" if n_existing else ""),
              flush=True)

    # Record the degradation beside the tree: main_pretrain.py stores it in the checkpoint so that
    # finetuning and evaluation of a deblurring model blur their inputs the same way.
    # The in-progress marker goes first: a tree stopped half-way (full disk, Ctrl-C) is never taken as whole.
    try:
        write_file_atomic(dst / BLUR_IN_PROGRESS, b"")
        write_file_atomic(dst / "blur_spec.json", json.dumps(spec.to_dict(), indent=1).encode("utf-8"))
    except WriteError as e:
        raise UsageError(str(e)) from None
    job = Job(str(src), str(dst), spec, uuid.uuid4().hex[:8])
    progress = Progress(len(todo), args.quiet)
    exit_code = 1
    written = 0
    bad: list[tuple[str, str]] = []
    failure: str | None = None

    def handle(result: tuple[str, str, str]) -> bool:
        nonlocal written, failure, exit_code
        rel, status, msg = result
        progress.step()
        if status == "ok":
            written += 1
            return True
        if status == "bad":
            print(f"{PROG}: {'skipping' if args.skip_bad else 'error:'} unreadable image {src / rel} ({msg})",
                  file=sys.stderr, flush=True)
            if args.skip_bad:
                bad.append((rel, msg))
                return True
            failure = f"stopped at unreadable image {src / rel} (use --skip_bad to skip such files)"
            return False
        failure, exit_code = msg, 2
        return False

    workers = min(args.num_workers, max(1, len(todo)))
    aborted = False
    # SIGTERM (kill, job schedulers) gets the same clean stop as Ctrl-C: finish no half file, remove
    # temps, report what was done.
    # A signal ignored on entry (nohup, background jobs) stays ignored.
    old_handlers = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)
                    if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        if workers == 1:
            for rel in todo:
                if not handle(process_one(job, rel)):
                    break
        else:
            # Small chunks: results (and progress) arrive per chunk, and one image costs far more
            # than the IPC round trip anyway.
            chunk = max(1, min(4, len(todo) // (workers * 8)))
            pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(job,))
            try:
                for result in pool.imap_unordered(_work, todo, chunksize=chunk):
                    if not handle(result):
                        aborted = True
                        break
            except BaseException:
                aborted = True
                raise
            finally:
                if aborted:
                    pool.terminate()  # kills workers mid-write; their temps are swept below
                else:
                    pool.close()
                pool.join()
    except (Interrupted, KeyboardInterrupt) as e:
        aborted = True
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        exit_code = 128 + int(signum)
        failure = (f"interrupted by {signal.Signals(signum).name}; completed outputs are kept, "
                   "re-run to resume")
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if aborted:
            sweep_temps(dst, todo, job.run_token)

    dt = time.monotonic() - t0
    print(f"{PROG}: wrote {written}, skipped {n_existing} existing, {len(bad)} unreadable, "
          f"{dt:.2f}s ({written / max(dt, 1e-9):.1f} img/s)", flush=True)
    if bad:
        print(f"{PROG}: skipped {len(bad)} unreadable image(s):", file=sys.stderr)
        for rel, msg in bad:
            print(f"  {src / rel}: {msg}", file=sys.stderr)
    if failure:
        print(f"{PROG}: error: {failure}", file=sys.stderr, flush=True)
        return exit_code
    (dst / BLUR_IN_PROGRESS).unlink(missing_ok=True)  # every image is written (or listed as unreadable)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
