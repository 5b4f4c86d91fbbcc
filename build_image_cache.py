#!/usr/bin/env python
"""Decode an image folder once into a pre-decoded image cache (raw 8-bit RGB in one memory-mapped file).

Large fundus photos make JPEG decoding the bottleneck of pretraining; a cache stores every image
already decoded and shrunk to --max_side, so training reads pixels with no decoding. See
util/image_cache.py for the format, util/image_cache_builder.py for the build. Exit status: 0 on
success, 1 when --verify finds the cache out of date, 2 for bad arguments, unreadable images (without
--bad_image skip) or an unusable cache.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from util.atomic import write_atomic
from util.cli import HelpFormatter, UserError, check_output_path, run_main, setup_logging
from util.image_cache import SUMMARY_FILE, ImageCache
from util.image_cache_builder import build_image_cache

logger = logging.getLogger("medfound")

PROG = "build_image_cache.py"
EPILOG = """\
example:
  python build_image_cache.py --data_path data/fundus --output data/fundus_cache512 --max_side 512

  data/fundus/train/class_0/img1.jpg  ->  data/fundus_cache512/train/class_0/img1.jpg  (virtual file)

using the cache:
  Pass the cache folder wherever the image folder went; it holds the same relative paths:
    python main_pretrain.py --data_path data/fundus_cache512 ...
  Choose --max_side at least as large as the largest --input_size you will train at.

checking it:
  python build_image_cache.py --output data/fundus_cache512 --verify
  lists cached images whose source changed or disappeared, and new source images; exit status 1 if any.
"""


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Decode every image under --data_path once, shrink it so its longer side is at most "
                               "--max_side and store all of them, raw, in a memory-mapped cache folder.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--data_path", default=None, help="folder of source images (walked recursively)")
    p.add_argument("--output", "--output_dir", dest="output", required=True, help="cache folder to create")
    p.add_argument("--max_side", type=int, default=512,
                   help="longer side of the cached images in px; smaller images are kept as they are "
                        "(default: %(default)s)")
    p.add_argument("--num_workers", type=int, default=None, help="decoding processes (default: CPU cores)")
    p.add_argument("--bad_image", default="error", choices=("error", "skip"),
                   help="unreadable images: stop at the first (error) or leave them out with a warning (skip)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache at --output")
    p.add_argument("--verify", action="store_true",
                   help="do not build: check an existing cache against its source folder (--data_path overrides "
                        "the folder recorded in the cache) and exit 1 if it is out of date")
    return p


get_args_parser = build_parser  # the name the other entry points use


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressLog:
    """progress(done, total) callback logging images/s and ETA every `every` seconds."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.t0 = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == 0:
            self.t0 = self.last = now
            return
        if now - self.last < self.every and done < total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        logger.info("cached %d/%d images (%.1f%%), %.1f images/s, ETA %s", done, total, 100 * done / total, rate,
                    _duration((total - done) / rate if rate else 0))


def verify(args: argparse.Namespace) -> int:
    cache = ImageCache(args.output)
    if args.data_path:
        if not os.path.isdir(args.data_path):
            raise UserError(f"--data_path {args.data_path!r} is not a folder")
        cache.source_root = os.path.abspath(args.data_path)
    logger.info("verifying %s: %d images from %s", cache.path, len(cache), cache.source_root)
    stale = cache.stale_entries()
    new = cache.new_sources() if os.path.isdir(cache.source_root) else []
    for rel in stale[:20]:
        logger.warning("stale: %s (source changed or missing)", rel)
    for rel in new[:20]:
        logger.warning("new: %s (source image not in the cache)", rel)
    if stale or new:
        logger.warning("cache out of date: %d stale, %d new source image(s); rebuild with --overwrite",
                       len(stale), len(new))
        return 1
    logger.info("cache up to date")
    return 0


def main(args: argparse.Namespace) -> int:
    setup_logging()
    if args.verify:
        return verify(args)
    if not args.data_path:
        raise UserError("--data_path is required to build a cache (only --verify works without it)")
    check_output_path(args.output, "--output")  # a file there is refused and left untouched
    if args.num_workers is not None and args.num_workers < 1:
        raise UserError(f"--num_workers {args.num_workers}: must be at least 1")
    summary = build_image_cache(args.data_path, args.output, max_side=args.max_side,
                                workers=args.num_workers or default_workers(), bad_image=args.bad_image,
                                progress=ProgressLog(), overwrite=args.overwrite)
    path = os.path.join(summary["output"], SUMMARY_FILE)
    write_atomic(path, json.dumps(summary, indent=1).encode("utf-8"))  # the cache is complete without it
    logger.info("cached %d images (%d skipped) in %.1f s, %.1f images/s: %.1f MiB raw from %.1f MiB of source files",
                summary["images"], len(summary["skipped"]), summary["seconds"], summary["images_per_s"],
                summary["total_bytes"] / 2**20, summary["source_bytes"] / 2**20)
    for rel in summary["skipped"][:20]:
        logger.warning("skipped: %s", rel)
    logger.info("cache: %s (summary: %s)", summary["output"], path)
    logger.info("use it: python main_pretrain.py --data_path %s ...", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
