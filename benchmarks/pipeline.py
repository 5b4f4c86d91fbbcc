"""The data-loading side of main_benchmark.py (`--data files`, `--pipeline_only`): the files to read, the
training dataset and DataLoader that feed the timed steps, and the data pipeline measured alone.

With `files`, the data pipeline alone is measured
too: images/s of one worker (one process, one thread, as in a DataLoader worker) for a plain
PIL + torchvision loader (`Image.open().convert('RGB')`, RandomResizedCrop, flip, ToTensor, Normalize)
and our dataset with Pillow or torchvision full decodes, in its default configuration and from a cache
of the timed images (`--pipeline_cache`), and the aggregate rate of our DataLoader.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from benchmarks.step import is_deblur
from util.cli import UserError


class CycleSampler(torch.utils.data.Sampler):
    """`total` indices: seeded permutations of range(n), concatenated; the same order on every iter()."""

    def __init__(self, n: int, total: int, seed: int = 0) -> None:
        self.n, self.total, self.seed = n, total, seed

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        done = 0
        while done < self.total:
            for i in torch.randperm(self.n, generator=g).tolist()[: self.total - done]:
                yield i
            done = min(self.total, done + self.n)

    def __len__(self) -> int:
        return self.total


class _LabelledPretrain(torch.utils.data.Dataset):
    """PretrainDataset samples with a label (index % classes) for finetune / inference measurements."""

    def __init__(self, ds, nb_classes: int) -> None:
        self.ds, self.nb_classes = ds, max(nb_classes, 1)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        s = self.ds[i]
        s["label"] = s["index"] % self.nb_classes
        return s


def prepare_files(args: argparse.Namespace) -> tuple[list[str], str, str | None]:
    """(files, root, temporary folder to delete or None) for `--data files`."""
    from util.data import list_images
    if args.data_path:
        if not os.path.isdir(args.data_path):
            raise UserError(f"--data_path {args.data_path!r} is not a folder")
        root = os.path.join(args.data_path, "train") if os.path.isdir(os.path.join(args.data_path, "train")) \
            else args.data_path
        files = list_images(root)
        if not files:
            raise UserError(f"--data_path {root}: no images found")
        return files, root, None
    from util.synthetic import write_dataset
    tmp = tempfile.mkdtemp(prefix="medfound_bench_")
    per_class = max(1, math.ceil(args.gen_images / 2))
    write_dataset(tmp, kind=args.gen_kind, layout="flat", num_classes=2, n_per_class=None,
                  splits={"train": per_class}, size=args.gen_size, seed=0, image_format=args.gen_format)
    files = list_images(tmp)
    return files, tmp, tmp


def make_dataset(files: Sequence[str], root: str, model: nn.Module | None, mode: str, input_size: int,
                 nb_classes: int, seed: int = 0):
    from util.blur import BlurSpec
    from util.data import PretrainDataset, PretrainTransform, resolve_norm
    mean, std = resolve_norm("imagenet")
    deblur = model is not None and mode == "pretrain" and is_deblur(model)
    # As main_pretrain: uint8 transport (normalised on the device by to_device), reduced-scale JPEG decode.
    ds = PretrainDataset(files, PretrainTransform(input_size, mean, std, output="uint8"), seed=seed,
                         num_patches=model.num_patches if (model is not None and mode == "pretrain") else 0,
                         blur=BlurSpec() if deblur else None, deblur=deblur, root=root, jpeg_draft=True,
                         decoder="auto")
    return ds if mode == "pretrain" else _LabelledPretrain(ds, nb_classes)


def make_loader(ds, batch_size: int, workers: int, device: torch.device, total: int, seed: int = 0):
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=CycleSampler(len(ds), total, seed), num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)


def pil_baseline_loader(input_size: int):
    """The plain reference pipeline: PIL open+convert, torchvision RandomResizedCrop/flip/ToTensor/Normalize."""
    from PIL import Image
    from torchvision import transforms
    from util.data import resolve_norm
    mean, std = resolve_norm("imagenet")
    t = transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(mean, std)])

    def load(path: str) -> torch.Tensor:
        return t(Image.open(path).convert("RGB"))
    return load


DEFAULT_PIPELINE = "medfound, default (--decoder auto --jpeg_draft)"


def measure_pipeline(files: Sequence[str], root: str, args: argparse.Namespace, device: torch.device,
                     model_noise: int) -> dict[str, Any]:
    """Images/s of one worker (one process, one torch thread) for the PIL baseline and our dataset in its
    variants (Pillow or torchvision full decode; the default: torchvision decode, or a reduced-scale Pillow
    decode when the crop allows it; a pre-decoded cache built here from the same files), rounds interleaved; then the aggregate rate of our DataLoader with --num_workers.
    When --data_path is itself a cache, only reading from it is measured."""
    from util.data import PretrainDataset, PretrainTransform, resolve_norm
    mean, std = resolve_norm("imagenet")

    def ours(paths: Sequence[str], draft: bool, base: str, decoder: str = "auto") -> PretrainDataset:
        return PretrainDataset(paths, PretrainTransform(args.input_size, mean, std, output="uint8"), seed=args.seed,
                               num_patches=model_noise, root=base, jpeg_draft=draft, decoder=decoder)
    from util.data import load_image
    from util.image_cache import list_cached, lookup
    from util.image_cache_builder import build_image_cache
    n_img = max(1, args.pipeline_images)
    from_cache = lookup(files[0]) is not None  # --data_path is a pre-decoded cache: no files to decode
    draft_ds = ours(files, True, root)
    loaders: dict[str, Any] = {}
    if from_cache:
        loaders["medfound, from the given cache"] = lambda i: draft_ds[(0, i)]["image"]
    else:
        pil_ds, tv_ds = ours(files, False, root, "pil"), ours(files, False, root, "torchvision")
        pil = pil_baseline_loader(args.input_size)
        loaders.update({"PIL + torchvision baseline": lambda i: pil(files[i]),
                        "medfound, Pillow full decode": lambda i: pil_ds[(0, i)]["image"],
                        "medfound, torchvision full decode": lambda i: tv_ds[(0, i)]["image"],
                        DEFAULT_PIPELINE: lambda i: draft_ds[(0, i)]["image"]})
    cache_dir, cache_build_s = None, 0.0
    try:
        if args.pipeline_cache and not from_cache:  # cache only the images timed, not the whole dataset
            cache_dir = tempfile.mkdtemp(prefix="medfound_bench_cache_")
            timed = list(files[:n_img])
            t0 = time.perf_counter()
            build_image_cache(root, os.path.join(cache_dir, "c"), max_side=args.pipeline_cache, files=timed, workers=1)
            cache_build_s = time.perf_counter() - t0
            cache_ds = ours(list_cached(os.path.join(cache_dir, "c")) or [], False, os.path.join(cache_dir, "c"))
            loaders[f"medfound, cache (max_side {args.pipeline_cache})"] = \
                lambda i: cache_ds[(0, i % len(cache_ds))]["image"]
        return _time_pipeline(loaders, files, draft_ds, n_img, args, device, from_cache,
                              {"seconds": cache_build_s, "images_per_s": min(n_img, len(files)) / cache_build_s,
                               "max_side": args.pipeline_cache} if cache_dir else None,
                              load_image(files[0]).size)
    finally:
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
            from util.image_cache import clear_lookup_cache
            clear_lookup_cache()  # forget the deleted cache (and unmap its file)


def _time_pipeline(loaders: dict[str, Any], files: Sequence[str], draft_ds, n_img: int, args: argparse.Namespace,
                   device: torch.device, from_cache: bool, cache_build: dict[str, Any] | None,
                   size: tuple[int, int]) -> dict[str, Any]:
    rounds = 3 if n_img >= 6 else 1
    per_round = max(1, n_img // rounds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    try:
        for fn in loaders.values():  # warm caches, imports
            fn(0)
        cursor = 0
        for _ in range(rounds):
            for k, fn in loaders.items():
                t0 = time.perf_counter()
                for j in range(per_round):
                    fn((cursor + j) % len(files))
                rates[k].append(per_round / (time.perf_counter() - t0))
            cursor += per_round
    finally:
        torch.set_num_threads(threads)
    per_worker = {k: statistics.median(v) for k, v in rates.items()}
    base = per_worker.get("PIL + torchvision baseline")
    out: dict[str, Any] = {
        "images_per_s_per_worker": per_worker,
        "over_pil_baseline": {k: v / base for k, v in per_worker.items() if k != "PIL + torchvision baseline"}
        if base else {},
        "ours_over_pil_baseline": per_worker[DEFAULT_PIPELINE] / base if base else None,
        "source_is_cache": from_cache,
        "images_timed_per_loader": per_round * rounds, "rounds": rounds,
        "source_image_size": list(size), "source_format": os.path.splitext(files[0])[1].lstrip(".").lower(),
        "num_files": len(files), "output_size": args.input_size,
        "note": "one process, one torch thread (a DataLoader worker); rounds interleaved, median rate",
    }
    if cache_build is not None:
        out["cache_build"] = cache_build
    workers = args.num_workers
    if workers and workers > 0:
        total = max(args.batch_size * 6, n_img)
        loader = make_loader(draft_ds, args.batch_size, workers, device, total, args.seed)
        it = iter(loader)
        next(it)  # worker start-up
        t0 = time.perf_counter()
        n = 0
        for b in it:
            n += b["image"].shape[0]
        dt = time.perf_counter() - t0
        out["dataloader"] = {"workers": workers, "batch_size": args.batch_size,
                             "images_per_s": n / dt if n else None,
                             "images_per_s_per_worker": n / dt / workers if n else None}
        del it, loader
    return out
