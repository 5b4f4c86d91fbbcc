"""Frozen-encoder feature extraction (VisionFM's `evaluation/extract_features.py`): every image of a
labelled dataset through a frozen ViT, pooled as its decoders take it, written as a few safetensors
shards per split with the labels, the split and the per-sample fields (e.g. forecasting intervals).

  python main_vfm_features.py --pretrained_weights VFM_Fundus_weights.pth --data_path FundusClassificationMulti/ \\
      --modality Fundus --dst_root FunClsFeat/ --batch_size_per_gpu 768
  torchrun --nproc_per_node=2 main_vfm_features.py ...   (each rank writes its own shards)

Data: VisionFM label files (`<data_path>/<dataset>/{training,test}_labels.txt`, every dataset folder
concatenated) or, with `--dataset_format ImageNet`, `<data_path>/{train,val,test}/<class>/<image>`.
Images are resized to --input_size (bilinear) and normalised with the --modality statistics. The
training split is encoded `--epochs` times: pass 0 plain, later passes with random horizontal and
vertical flips (seeded per image and pass), stored as `<stem>_e<pass>`; other splits once.
Interrupted? Rerun the same command: complete shards are kept and only the missing samples are encoded.

`--mode seg` reads a segmentation layout instead (VisionFM's `<dataset>/{training,test}/{images,labels}/`,
mmseg's or SEG_UNET's) and stores per image the four block maps the segmentation heads read, [4, D, S/p,
S/p] in float16 (unless `--feature_dtype float32` is given), with the mask resized by nearest neighbour
as its label; flipped passes flip image and mask alike. `main_vfm_dense.py --datasets` trains the linear
head on them.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, NamedTuple

import vfm_args
from util.cli import UserError, check_output_path, check_ranges, exit_if_help, run_main

logger = logging.getLogger("medfound")


def get_args_parser(prog: str = "main_vfm_features.py") -> argparse.ArgumentParser:
    return vfm_args.features_parser(prog, __doc__)


exit_if_help(get_args_parser)
# The imports below pull in torch and the models; --help has already exited above without them.
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402

import models_ibot  # noqa: E402,F401  (its head keys are known, so iBOT/VisionFM training files load quietly)
import models_mae  # noqa: E402,F401  (MAE/RETFound pretraining files drop their decoder quietly)
from engine_vfm_features import extract_split, pending_keys, sample_key  # noqa: E402
from models_vfm import build_frozen_encoder  # noqa: E402
from util.datasets import LabelledImageDataset  # noqa: E402
from util.dist import barrier, broadcast_object, cleanup, get_rank, get_world_size, is_main_process  # noqa: E402
from util.feature_store import FeatureWriter, claim_split, completed_stems, write_manifest  # noqa: E402
from util.label_layouts import (detect_layout, read_imagefolder, read_vfm_records, records_to_samples,  # noqa: E402
                                vfm_datasets, vfm_label_file)
from util.label_measurements import holds_measurements, read_vfm_regression  # noqa: E402
from util.logger import RunLogger, print_summary  # noqa: E402
from util.modalities import canonical_modality, modality_stats  # noqa: E402
from util.runtime import make_loader, setup, start_guard, training_started  # noqa: E402


class SplitData(NamedTuple):
    samples: list            # (path, target)
    stems: list[str]
    classes: list[str]
    label_kind: str          # class_index | multi_hot | values
    extra: dict[str, torch.Tensor]


def image_stem(path: str, root: str) -> str:
    """The full stem of an image: its path relative to the data root, without the extension (POSIX);
    an image listed outside the root keeps its absolute path."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel.startswith(".."):
        rel = os.path.abspath(path)
    return os.path.splitext(rel)[0].replace(os.sep, "/")


def _check_unique(stems: list[str], root: str, split: str) -> None:
    """Each image is one key: an image listed twice (or x.png beside x.jpg) would be stored twice."""
    seen: set[str] = set()
    for s in stems:
        if s in seen:
            raise UserError(f"--data_path {root}: {s!r} occurs twice in the {split} split (an image listed twice, "
                            "or two files differing only in extension); remove the duplicate")
        seen.add(s)


def _label_kind(samples: list, rows: bool) -> str:
    if not rows:
        return "class_index"
    return "multi_hot" if all(v in (0.0, 1.0) for _, t in samples for v in t) else "values"


def read_splits(args: argparse.Namespace) -> dict[str, SplitData]:
    """The labelled splits of --data_path (train first), with stems, labels and per-sample fields."""
    root = args.data_path
    fmt = args.dataset_format or ("ImageNet" if detect_layout(root) == "imagefolder" else "vfm")
    out: dict[str, SplitData] = {}
    if fmt == "ImageNet":
        if not os.path.isdir(os.path.join(root, "train")):
            raise UserError(f"--data_path {root}: no train/ folder (--dataset_format ImageNet expects "
                            "{train,val,test}/<class>/<image>)")
        classes = None
        for split in ("train", "val", "test"):
            if os.path.isdir(os.path.join(root, split)):
                samples, classes = read_imagefolder(os.path.join(root, split), classes)
                out[split] = SplitData(samples, [image_stem(p, root) for p, _ in samples], list(classes),
                                       "class_index", {})
        for split, data in out.items():
            _check_unique(data.stems, root, split)
        return out
    if not vfm_datasets(root):
        raise UserError(f"--data_path {root}: no VisionFM label files (<dataset>/training_labels.txt) and no "
                        "train/ folder; pass --dataset_format ImageNet for {train,test}/<class>/ folders")
    for split in ("train", "val", "test"):
        if not any(vfm_label_file(d, split) for d in vfm_datasets(root)):
            continue
        files = [f for f in (vfm_label_file(d, split) for d in vfm_datasets(root)) if f]
        if holds_measurements(files):  # biomarker values: missing ones stay NaN in the stored labels
            paths, values, names = read_vfm_regression(root, split, args.num_labels)
            samples = [(p, tuple(float(v) for v in row)) for p, row in zip(paths, values)]
            out[split] = SplitData(samples, [image_stem(p, root) for p in paths], list(names), "values", {})
            continue
        records = read_vfm_records(root, split, args.num_labels)
        samples, classes, rows = records_to_samples(records, args.num_labels)
        extra = {}
        if any(r.days is not None for r in records):
            extra["days"] = torch.tensor([float("nan") if r.days is None else r.days for r in records])
        out[split] = SplitData(samples, [image_stem(r.image, root) for r in records], classes,
                               _label_kind(samples, rows), extra)
    for split, data in out.items():
        _check_unique(data.stems, root, split)
    if "train" not in out and "test" not in out:
        raise UserError(f"--data_path {root}: no training or test label files")
    return out


def extraction_transform(augment: bool, size: int, mean: Any, std: Any) -> T.Compose:
    """VisionFM's extraction transform: Resize((s, s)) bilinear (+ random H and V flips), normalise."""
    steps: list[Any] = [T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR)]
    if augment:
        steps += [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def suggested_task(data: SplitData) -> str:
    if data.label_kind == "multi_hot":
        return "multi_cls"
    if data.label_kind == "values":
        return "metric_reg"
    return "forecasting" if "days" in data.extra else "cls"


def _claim(root: str, split: str, signature: dict[str, Any]) -> None:
    """Rank 0 claims the split folder; its refusal is raised on every rank (none waits in a barrier)."""
    err = None
    if is_main_process():
        try:
            claim_split(root, split, signature)
        except UserError as e:
            err = str(e)
    err = broadcast_object(err)
    if err:
        raise UserError(err)


def check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--data_path", args.data_path), ("--dst_root", args.dst_root)):
        if not value:
            raise UserError(f"{flag} is required")
    vfm_args.check_encoder_args(args)
    check_ranges(args, vfm_args.FEATURE_RULES)
    args.modality = canonical_modality(args.modality)
    if not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path}: no such folder")
    check_output_path(args.dst_root, "--dst_root")


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    if args.mode == "seg":
        return extract_seg_features(args)
    device = setup(args)
    root = args.dst_root
    with start_guard(root):  # a failed start (bad weights, bad labels) leaves no empty output folder
        splits = read_splits(args)
        encoder = build_frozen_encoder(args).to(device)
        stats = modality_stats(args.modality)
        training_started(root)  # from here on, shards written are kept: a rerun resumes from them
        run_log = RunLogger(root)
        base = {"encoder": vfm_args.model_name(args), "checkpoint": os.path.abspath(args.pretrained_weights),
                "checkpoint_key": args.checkpoint_key, "input_size": args.input_size,
                "n_last_blocks": args.n_last_blocks, "avgpool_patchtokens": args.avgpool_patchtokens,
                "modality": args.modality, "data_path": os.path.abspath(args.data_path), "seed": args.seed,
                "feature_dtype": args.feature_dtype}
        results: dict[str, Any] = {}
        for split, data in splits.items():
            passes = args.epochs if split == "train" else 1
            _claim(root, split, {**base, "split": split, "passes": passes})
            barrier()
            done = completed_stems(root, split)  # every rank lists the same files: nobody writes yet
            barrier()
            writer = FeatureWriter(root, split, get_rank(), args.shard_size, args.feature_dtype)
            for e in range(passes):
                keys = pending_keys(data.stems, e, done)
                dataset = LabelledImageDataset(data.samples, extraction_transform(e > 0, args.input_size, *stats),
                                               data.classes, multilabel=data.label_kind != "class_index",
                                               seed=args.seed)
                loader = make_loader(dataset, keys, args, device, args.batch_size_per_gpu, drop_last=False)
                n = extract_split(encoder, loader, writer, device, args.amp, e, data.stems, data.extra,
                                  header=f"extract {split} pass {e + 1}/{passes}")
                run_log.json_line({"split": split, "pass": e, "encoded_by_rank0": n, "world_size": get_world_size(),
                                   "already_done": sum(sample_key(s, e) in done for s in data.stems)})
            writer.flush()
            barrier()
            expected = len(data.stems) * passes
            err = None
            if is_main_process():
                meta = {**base, "pooling": vfm_args.pooling_name(args.avgpool_patchtokens),
                        "feature_dim_expected": encoder.feature_dim, "passes": passes,
                        "label_kind": data.label_kind, "class_names": data.classes,
                        "target_names": data.classes if data.label_kind == "values" else None,
                        "extra_fields": ["epoch", *sorted(data.extra)],
                        "suggested_task": suggested_task(data)}
                record = write_manifest(root, split, meta)
                if record["count"] != expected:
                    err = (f"{root}/{split}: {record['count']} samples stored, {expected} expected; delete the "
                           "folder and extract again")
            err = broadcast_object(err)  # every rank stops, none waits in the next barrier
            if err:
                raise UserError(err)
            results[split] = expected
            barrier()
    first = splits.get("train") or next(iter(splits.values()))
    parent, name = os.path.split(os.path.normpath(os.path.abspath(root)))
    print_summary("feature extraction", [
        ("features", root), ("encoder", f"{vfm_args.model_name(args)} <- {args.pretrained_weights}"),
        ("pooling", f"{vfm_args.pooling_name(args.avgpool_patchtokens)} ({encoder.feature_dim} values)"),
        ("samples", ", ".join(f"{s} {n}" + (f" ({args.epochs} passes)" if s == "train" and args.epochs > 1 else "")
                              for s, n in results.items())),
        ("labels", f"{first.label_kind} ({len(first.classes)} columns/classes)")],
        next_cmd=f"python main_vfm_decoder.py --task {suggested_task(first)} --data_path {parent} "
                 f"--datasets {name} --output_dir ./results")
    cleanup()
    return {"splits": results, "feature_dim": encoder.feature_dim}


# ------------------------------------------------------------------------------------------ --mode seg
class BlockMaps(torch.nn.Module):
    """The frozen encoder's final-normed patch-token maps of the segmentation blocks, stacked:
    `forward(images) -> [B, 4, D, H/p, W/p]` (what main_vfm_dense.py's linear head reads)."""

    def __init__(self, backbone: torch.nn.Module, indices: tuple[int, ...]) -> None:
        super().__init__()
        self.backbone, self.indices = backbone, tuple(indices)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone.forward_intermediates(images, indices=list(self.indices), norm=True, output_fmt="NCHW",
                                                   intermediates_only=True)
        return torch.stack(list(maps), dim=1)


class _PassItems(torch.utils.data.Dataset):
    """A segmentation dataset addressed by `(pass, index)` keys: pass 0 plain, later passes flipped."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        self.dataset.set_epoch(epoch)
        image, mask, _ = self.dataset[index]
        return image, mask, index


def extract_seg_features(args: argparse.Namespace) -> dict[str, Any]:
    """--mode seg: per image the four block maps [4, D, h, w] (float16 unless --feature_dtype float32 is given)
    with its resized mask as the label [S, S]; training images `--epochs` times (flips applied to image and
    mask alike). Read by main_vfm_dense.py --datasets (linear head)."""
    from models_seg import seg_block_indices
    from util.seg_data import SegmentationDataset, detect_seg_layout, list_seg_pairs, mask_class_counts
    if "feature_dtype" not in getattr(args, "explicit_flags", []):
        args.feature_dtype = "float16"  # maps are large: 4 x D x (S/p)^2 values per image
    root, data = args.dst_root, args.data_path
    with start_guard(root):
        layout = detect_seg_layout(data)
        pairs = {s: list_seg_pairs(data, s, layout) for s in ("train", "test")}
        all_pairs = pairs["train"] + pairs["test"]
        if args.num_labels is not None:
            mask_class_counts(all_pairs, layout, args.num_labels)  # one line naming a mask with another value
            num_labels = args.num_labels
        else:
            counts = mask_class_counts(all_pairs, layout, 256)
            top = int(np.flatnonzero(counts).max()) if counts.any() else 1
            num_labels = 1 if top <= 1 else top + 1
        device = setup(args)
        backbone = build_frozen_encoder(args, pooled=False).backbone
        indices = seg_block_indices(len(backbone.blocks))
        encoder = BlockMaps(backbone, indices).to(device)
        stats = modality_stats(args.modality)
        training_started(root)
        run_log = RunLogger(root)
        patch = int(backbone.patch_embed.patch_size[0]) if hasattr(backbone, "patch_embed") else args.patch_size
        base = {"mode": "seg", "encoder": vfm_args.model_name(args),
                "checkpoint": os.path.abspath(args.pretrained_weights),
                "checkpoint_key": args.checkpoint_key, "input_size": args.input_size, "modality": args.modality,
                "data_path": os.path.abspath(data), "layout": layout, "seed": args.seed,
                "feature_dtype": args.feature_dtype, "block_indices": list(indices)}
        results: dict[str, int] = {}
        for split, split_pairs in pairs.items():
            passes = args.epochs if split == "train" else 1
            _claim(root, split, {**base, "split": split, "passes": passes})
            barrier()
            done = completed_stems(root, split)
            barrier()
            stems = [image_stem(img, data) for img, _ in split_pairs]
            _check_unique(stems, data, split)
            writer = FeatureWriter(root, split, get_rank(), args.shard_size, args.feature_dtype)
            for e in range(passes):
                ds = _PassItems(SegmentationDataset(split_pairs, args.input_size, *stats, train=e > 0, layout=layout,
                                                    num_classes=num_labels, seed=args.seed))
                loader = make_loader(ds, pending_keys(stems, e, done), args, device, args.batch_size_per_gpu,
                                     drop_last=False)
                n = extract_split(encoder, loader, writer, device, args.amp, e, stems,
                                  header=f"extract {split} pass {e + 1}/{passes}")
                run_log.json_line({"split": split, "pass": e, "encoded_by_rank0": n, "world_size": get_world_size()})
            writer.flush()
            barrier()
            err = None
            if is_main_process():
                meta = {**base, "passes": passes, "num_labels": num_labels, "embed_dim": int(backbone.embed_dim),
                        "patch_size": patch, "label_kind": "mask", "suggested_task": "seg"}
                record = write_manifest(root, split, meta)
                if record["count"] != len(stems) * passes:
                    err = (f"{root}/{split}: {record['count']} samples stored, {len(stems) * passes} expected; "
                           "delete the folder and extract again")
            err = broadcast_object(err)
            if err:
                raise UserError(err)
            results[split] = len(stems) * passes
            barrier()
    parent, name = os.path.split(os.path.normpath(os.path.abspath(root)))
    grid = args.input_size // patch
    print_summary("segmentation feature extraction", [
        ("features", root), ("encoder", f"{vfm_args.model_name(args)} <- {args.pretrained_weights}"),
        ("maps", f"blocks {list(indices)}, {len(indices)} x {backbone.embed_dim} x {grid} x {grid} "
                 f"({args.feature_dtype})"),
        ("samples", ", ".join(f"{s} {n}" for s, n in results.items())), ("classes", num_labels)],
        next_cmd=f"python main_vfm_dense.py --task seg --head_type linear --data_path {parent} --datasets {name} "
                 f"--num_labels {num_labels} --output_dir ./results")
    cleanup()
    return {"splits": results, "num_labels": num_labels, "block_indices": list(indices)}


if __name__ == "__main__":
    run_main(main, get_args_parser())
