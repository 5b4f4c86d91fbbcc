"""VisionFM's dense decoders on a frozen ViT encoder: segmentation (`--task seg`, UNETR or linear head) and
landmark detection (`--task landmark`, Gaussian heatmaps), as its `evaluation/train_seg_decoder.py` and
`evaluation/train_landmark_decoder.py` run them.

  python evaluation/train_seg_decoder.py --name single_seg_debug --pretrained_weights VFM_Fundus_weights.pth \\
      --input_size 512 --modality Fundus --num_labels 1 --output_dir ./results --data_path VesselSegmentation/ \\
      --batch_size_per_gpu 5
  torchrun --nproc_per_node=2 evaluation/train_seg_decoder.py ...   (each rank trains on its share of the images)

The encoder stays frozen (eval mode, no gradients); the head reads four intermediate blocks (3, 5, 7, 11
for a 12-block ViT, 5, 11, 17, 23 for 24 blocks) at any input size the patch divides. Only the head
trains, through the shared loop (AdamW, weight decay 0.05, `--lr` as given, constant unless
`--lr_schedule cosine`). The head is saved in VisionFM's layout, `<output_dir>/<name>/
checkpoint_<checkpoint_key>_linear.pth` = {epoch, state_dict (DDP's `module.` prefix), optimizer,
best_dice | best_mre, args}; it is the last epoch's head (the test split never picks an epoch, so its
`best_*` is that head's test value). `--load_from CKPT --test` evaluates it on the full test split and
checks the metrics saved with it. Outputs: test_metrics.json/.csv, test_table.md (the per-class or
per-landmark table), test_overlays.png, log.txt (JSON lines) and TensorBoard.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from typing import Any

import vfm_args
import vfm_dense_args
from util.cli import (UserError, args_to_dict, check_output_path, check_ranges, exit_if_help, patch_size_of,
                      run_main)

logger = logging.getLogger("medfound")


def get_args_parser(prog: str = "main_vfm_dense.py", task: str | None = None) -> argparse.ArgumentParser:
    return vfm_dense_args.get_args_parser(prog, task)


exit_if_help(get_args_parser)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import engine_dense  # noqa: E402
import engine_vfm  # noqa: E402
from models_seg import DenseDecoder, build_dense_head, seg_block_indices  # noqa: E402
from util.atomic import write_atomic  # noqa: E402
from util.dist import cleanup, get_rank, get_world_size, is_main_process  # noqa: E402
from util.logger import RunLogger, print_summary  # noqa: E402
from util.loop import Optimization, train_epoch  # noqa: E402
from util.modalities import MODALITIES, canonical_modality, modality_stats  # noqa: E402
from util.runtime import prepare_model, set_aside_earlier_run, setup, start_guard, training_started  # noqa: E402


# ------------------------------------------------------------------------------------------------ flags
def resolve_args(args: argparse.Namespace) -> None:
    """Every check that needs no data read: ranges, paths, the patch grid, flag combinations."""
    explicit = set(getattr(args, "explicit_flags", []))
    if hasattr(args, "explicit_flags"):  # parsed: main_vfm_dense.py --task landmark gets the landmark script's defaults
        for key, value in vfm_dense_args.TASK_DEFAULTS[args.task].items():
            if key not in explicit:
                setattr(args, key, value)
    check_ranges(args, vfm_dense_args.RULES)
    if not args.data_path:
        raise UserError("--data_path is required: the data root (<dataset>/{training,test}/{images,labels}/) or the "
                        "folder of the --datasets feature set")
    if not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path}: no such folder")
    args.modality = canonical_modality(args.modality)
    if args.datasets:
        if args.task != "seg":
            raise UserError("--datasets: feature sets train the segmentation heads only; drop --datasets for "
                            "--task landmark")
        if len(args.datasets) != 1:
            raise UserError(f"--datasets {' '.join(args.datasets)}: give one segmentation feature set")
        if args.head_type == "unetr":
            if "head_type" in explicit:
                raise UserError("--head_type unetr needs the image itself (its last skip connection); train it on "
                                "images (--pretrained_weights), or use --head_type linear with --datasets")
            args.head_type = "linear"
    else:
        vfm_args.check_encoder_args(args)  # the patch grid of --input_size
        patch = patch_size_of(vfm_args.model_name(args)) or args.patch_size
        if args.head_type == "unetr" and patch != 16:
            raise UserError(f"--head_type unetr upsamples the patch grid 4 x 2 = 16 times: it needs --patch_size 16, "
                            f"not {patch}; use --head_type linear for this encoder")
        if not args.pretrained_weights:
            raise UserError("--pretrained_weights is required: the frozen encoder's checkpoint (or give --datasets "
                            "with features from main_vfm_features.py --mode seg)")
        if not os.path.isfile(args.pretrained_weights):
            raise UserError(f"--pretrained_weights {args.pretrained_weights}: no such file; VisionFM would train on "
                            "a randomly initialised encoder instead, medfound stops")
    if args.task == "seg" and args.num_labels is None and not args.datasets:
        raise UserError("--num_labels is required for segmentation: 1 = binary foreground (one logit), C = mask "
                        "values 0..C-1")
    if args.test and not args.load_from:
        raise UserError("--test evaluates a trained decoder: add --load_from CKPT")
    if args.load_from and not os.path.isfile(args.load_from):
        raise UserError(f"--load_from {args.load_from}: no such file")
    for split in ("train", "test") if args.labels_csv else ():
        path = args.labels_csv.replace("{split}", split)
        if not os.path.isfile(path):
            raise UserError(f"--labels_csv {args.labels_csv}: no such file {path}")
    if args.task == "landmark":
        args.flip_pairs_parsed = vfm_dense_args.parse_flip_pairs(args.flip_pairs, args.num_labels)
    if args.name:
        args.output_dir = os.path.join(args.output_dir, args.name)
    check_output_path(args.output_dir)
    warn_modality(args)


def modality_named_in(path: str) -> str | None:
    """The modality a checkpoint's file name states (`VFM_Fundus_weights.pth` -> Fundus), or None."""
    tokens = re.split(r"[^A-Za-z]+", os.path.basename(path))
    found = {m for t in tokens if t for m in MODALITIES if t.lower() == m.lower()}
    return found.pop() if len(found) == 1 else None


def warn_modality(args: argparse.Namespace) -> None:
    """VisionFM's landmark README passes Fundus weights to a UBM task: say so (one line), do not refuse."""
    named = modality_named_in(args.pretrained_weights or "")
    if named and named != args.modality:
        logger.warning("--modality %s, but %s names a %s encoder: the images are normalised with the %s statistics "
                       "and encoded by a %s model; check both flags", args.modality,
                       os.path.basename(args.pretrained_weights), named, args.modality, named)


# ------------------------------------------------------------------------------------------------ data
def seg_class_names(args: argparse.Namespace, k: int, layout: str = "vfm") -> list[str]:
    """Names of the table rows: background first; binary runs have two rows (background, foreground)."""
    from util.seg_data import seg_class_names as default_names
    n = max(k, 2)
    given = list(args.class_names or [])
    if k == 1 and len(given) == 1:
        given = ["background", *given]
    if given and len(given) != n:
        raise UserError(f"--class_names: {len(given)} names for {n} classes (background first)")
    return given or default_names(k, layout)


def seg_datasets(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    from util.seg_data import SegmentationDataset, detect_seg_layout, list_seg_pairs, mask_class_counts
    layout = detect_seg_layout(args.data_path)
    train_pairs, test_pairs = (list_seg_pairs(args.data_path, s, layout) for s in ("train", "test"))
    # Every mask is read once before training: a value that is not a class of --num_labels is one line.
    counts = mask_class_counts(train_pairs + test_pairs, layout, args.num_labels)
    names = seg_class_names(args, args.num_labels, layout)
    absent = [n for n, c in zip(names, counts.tolist()) if c == 0]
    if absent:
        logger.warning("--num_labels %d: no mask holds %s; a class never predicted either is left out of "
                       "mIoU/mDice (reported as n/a)", args.num_labels, ", ".join(absent))
    mean, std = modality_stats(args.modality)
    mk = lambda pairs, train: SegmentationDataset(pairs, args.input_size, mean, std, train=train,  # noqa: E731
                                                  layout=layout, num_classes=args.num_labels, seed=args.seed)
    logger.info("segmentation data %s (%s layout): %d train / %d test images; pixels per class %s", args.data_path,
                layout, len(train_pairs), len(test_pairs), dict(zip(names, counts.tolist())))
    return mk(train_pairs, True), mk(test_pairs, False), names


def landmark_datasets(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    from util.landmarks import LandmarkDataset, list_landmark_items
    k = args.num_labels
    items = {}
    for split in ("train", "test"):
        items[split] = list_landmark_items(args.data_path, split, args.labels_csv)
        if not items[split]:
            raise UserError(f"--data_path {args.data_path}: no {split} images with landmarks")
        have = int(np.asarray(items[split][0][1]).shape[0])
        if have != k:
            raise UserError(f"--num_labels {k}: the {split} labels hold {have} landmarks per image; pass "
                            f"--num_labels {have}")
    mean, std = modality_stats(args.modality)
    mk = lambda its, train: LandmarkDataset(its, args.input_size, mean, std, train=train, seed=args.seed,  # noqa: E731
                                            sigma=args.sigma, flip_pairs=args.flip_pairs_parsed)
    names = list(args.class_names or [f"landmark_{i}" for i in range(k)])
    if len(names) != k:
        raise UserError(f"--class_names: {len(names)} names for {k} landmarks")
    return mk(items["train"], True), mk(items["test"], False), names


class FeatureMapDataset(torch.utils.data.Dataset):
    """Stored block maps [L, D, h, w] of main_vfm_features.py --mode seg with their masks [H, W]."""

    def __init__(self, features: torch.Tensor, masks: torch.Tensor) -> None:
        self.features, self.masks = features, masks

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.features[i].float(), self.masks[i].long(), i


class FeatureInput(torch.nn.Module):
    """Runs a dense head on stored block maps: `forward(maps [B, L, D, h, w]) -> logits [B, C, H, W]`."""

    def __init__(self, decoder: torch.nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.decoder, self.size = decoder, tuple(size)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        shape = (maps.shape[0], 3, *self.size)  # the heads read only the image's size here (no memory used)
        return self.decoder(maps.new_zeros(()).expand(shape), features=list(maps.float().unbind(1)))


def feature_datasets(args: argparse.Namespace) -> tuple[Any, Any, list[str], dict[str, Any]]:
    from util.feature_store import read_features
    root = os.path.join(args.data_path, args.datasets[0])
    if not os.path.isdir(root):
        raise UserError(f"--datasets {args.datasets[0]}: no folder {root}; extract it first with "
                        "main_vfm_features.py --mode seg --dst_root")
    sets = [read_features(root, s) for s in ("train", "test")]
    meta = sets[0].meta
    if meta.get("mode") != "seg" or sets[0].features.ndim != 5:
        raise UserError(f"--datasets {args.datasets[0]}: not a segmentation feature set (extract it with "
                        "main_vfm_features.py --mode seg)")
    stored_k = int(meta.get("num_labels") or 0)
    if args.num_labels is None:
        args.num_labels = stored_k or None
    if args.num_labels is None:
        raise UserError("--num_labels is required: the feature set does not record its number of classes")
    top = int(max(float(s.labels.max()) for s in sets))
    if top >= max(args.num_labels, 2):
        raise UserError(f"--num_labels {args.num_labels}: the masks of {root} hold value {top}; pass --num_labels "
                        f"{top + 1}")
    ds = [FeatureMapDataset(s.features, s.labels) for s in sets]
    return ds[0], ds[1], seg_class_names(args, args.num_labels), meta


# ----------------------------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace, outputs: int, meta: dict[str, Any] | None) -> tuple[Any, Any, dict]:
    """(model to run, head, description): the frozen encoder + head, or the head on stored block maps."""
    if meta is not None:
        head = build_dense_head(args.head_type, int(meta["embed_dim"]), outputs, int(meta.get("patch_size", 16)))
        model = FeatureInput(DenseDecoder(head), (int(meta["input_size"]),) * 2)
        return model, head, {"embed_dim": int(meta["embed_dim"]), "blocks": list(meta.get("block_indices", [])),
                             "encoder": meta.get("encoder")}
    from models_vfm import build_frozen_encoder
    encoder = build_frozen_encoder(args, pooled=False).backbone  # loading, freezing, one-line errors live there
    depth = len(encoder.blocks)
    try:
        indices = seg_block_indices(depth)
    except ValueError as e:
        raise UserError(f"--arch {args.arch}: {e}") from None
    patch = patch_size_of(vfm_args.model_name(args)) or args.patch_size
    head = build_dense_head(args.head_type, int(encoder.embed_dim), outputs, patch)
    model = DenseDecoder(head, encoder, indices)
    logger.info("frozen %s (%d blocks, D %d), blocks %s -> %s head (%d outputs)", vfm_args.model_name(args), depth,
                encoder.embed_dim, list(indices), type(head).__name__, outputs)
    return model, head, {"embed_dim": int(encoder.embed_dim), "blocks": list(indices),
                         "encoder": vfm_args.model_name(args)}


def load_head(head: torch.nn.Module, path: str) -> dict[str, Any]:
    """A decoder checkpoint of ours or VisionFM's (`state_dict`, `module.`-prefixed) into `head`, strictly."""
    from util.checkpoint import load_file
    ckpt = load_file(path, flag="--load_from")
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"--load_from {path}: no decoder state dict in it (expected a 'state_dict' entry)")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"--load_from {path}: does not fit this {type(head).__name__}: "
                        f"{str(e).splitlines()[0]}; check --task, --head_type, --num_labels and the encoder") from None
    return ckpt if "state_dict" in ckpt else {}


def save_head(path: str, head: torch.nn.Module, optimizer: Any, epoch: int, args: argparse.Namespace,
              extra: dict[str, Any]) -> None:
    """VisionFM's decoder layout plus what --test needs to check itself (the test metrics as JSON)."""
    import io
    blob = {"epoch": epoch, "state_dict": {f"module.{k}": v.detach().cpu() for k, v in head.state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer else {}, "args": args_to_dict(args), **extra}
    buf = io.BytesIO()
    torch.save(blob, buf)
    write_atomic(path, buf.getvalue())


def make_lr_fn(optimizer: torch.optim.Optimizer, lr: float, schedule: str, epochs: int) -> Any:
    if schedule == "cosine":
        return engine_vfm.cosine_lr(optimizer, lr, epochs)

    def constant(progress: float) -> float:
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr
    return constant


# ------------------------------------------------------------------------------------------ evaluation
def evaluate(args: argparse.Namespace, model: Any, loader: Any, device: torch.device, names: list[str],
             test_ds: Any, n_boot: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of the full test split, and the arrays the figures need."""
    from util.metric_dense import landmark_metrics, segmentation_report
    boot = args.n_boot if n_boot is None else n_boot
    if args.task == "seg":
        pred, true, index = engine_dense.predict_segmentation(model, loader, device, args.num_labels, args.amp)
        metrics = segmentation_report(pred, true, names, n_boot=boot, seed=args.seed)
        # VisionFM's Dice: per image, then averaged; binary = the foreground's, multi-class = every class's
        vfm = metrics["image_mean_dice_fg"] if args.num_labels == 1 else metrics["image_mean_dice"]
        metrics.update(task="seg", num_labels=args.num_labels, n=int(len(index)), vfm_dice=vfm)
        return metrics, {"pred": pred, "true": true, "index": index}
    pred, true, index = engine_dense.predict_landmarks(model, loader, device, args.amp)
    metrics = landmark_metrics(pred, true, None, radii=tuple(args.radii), names=names)
    metrics.update(task="landmark", n=int(len(index)), resolution="input pixels")
    orig = original_points(test_ds, index, pred, true, args.input_size)
    if orig is not None:  # the same errors in pixels (and mm) of the original images
        metrics["original"] = landmark_metrics(orig[0], orig[1], args.pixel_spacing, radii=tuple(args.radii),
                                               names=names)
    return metrics, {"pred": pred, "true": true, "index": index}


def original_points(ds: Any, index: np.ndarray, pred: np.ndarray, true: np.ndarray, size: int
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """Predictions mapped back to each image's original pixels, with the original labelled points."""
    from PIL import Image

    from util.landmarks import resize_points
    items = getattr(ds, "items", None)
    if items is None:
        return None
    p_out, t_out = [], []
    for j, i in enumerate(index.tolist()):
        path, pts = items[i]
        with Image.open(path) as im:
            w, h = im.size
        p_out.append(resize_points(pred[j], (size, size), (h, w)))
        t_out.append(np.asarray(pts, dtype=np.float64))
    return np.stack(p_out), np.stack(t_out)


def headline(m: dict[str, Any]) -> str:
    def f(key: str, src: dict[str, Any] | None = None, label: str | None = None) -> str:
        v = (src or m).get(key)
        return f"{label or key} {v:.4f}" if isinstance(v, (int, float)) else ""
    if m.get("task") == "seg":
        return ", ".join(x for x in (f("vfm_dice", label="Dice (VisionFM)"), f("mDice"), f("mIoU"), f("aAcc")) if x)
    parts = [f("mre_px", label="MRE px (input)")]
    if isinstance(m.get("original"), dict):
        parts += [f("mre_px", m["original"], "MRE px (original)"), f("mre_mm", m["original"], "MRE mm")]
    return ", ".join(x for x in parts if x)


def table_markdown(args: argparse.Namespace, m: dict[str, Any]) -> str:
    """The seed's per-class table (seg), or the per-landmark radial errors at the input resolution and,
    when the originals were measured, in their pixels (and mm)."""
    from util.metric_dense import landmark_table_markdown, seg_table_markdown
    if args.task == "seg":
        return seg_table_markdown(m)
    orig = m.get("original")
    if not isinstance(orig, dict) or (orig.get("mre_px") == m.get("mre_px") and orig.get("mre_mm") is None):
        return landmark_table_markdown(m)  # the images are already at the input size
    return (f"Input resolution ({args.input_size} px):\n\n" + landmark_table_markdown(m)
            + "\nOriginal image pixels:\n\n" + landmark_table_markdown(orig))


def overlay_images(ds: Any, index: np.ndarray, n: int, mean: Any, std: Any) -> np.ndarray | None:
    """The first n test images as the model saw them (resized), back in uint8 RGB."""
    if n <= 0 or isinstance(ds, FeatureMapDataset):
        return None
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    out = [((ds[int(i)][0] * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy() for i in index[:n]]
    return np.stack(out)


def write_outputs(args: argparse.Namespace, metrics: dict[str, Any], arrays: dict[str, Any], names: list[str],
                  test_ds: Any) -> list[str]:
    from util.dense_vis import landmark_overlay_png, seg_overlay_png
    from util.metrics import write_metrics
    out = args.output_dir
    files = list(write_metrics(metrics, out, "test"))
    table = os.path.join(out, "test_table.md")
    write_atomic(table, table_markdown(args, metrics).encode("utf-8"))
    files.append(table)
    images = overlay_images(test_ds, arrays["index"], args.n_overlays, *modality_stats(args.modality))
    if images is not None:
        k = len(images)
        path = os.path.join(out, "test_overlays.png")
        if args.task == "seg":
            seg_overlay_png(images, arrays["pred"][:k], arrays["true"][:k], path, names)
        else:
            landmark_overlay_png(images, arrays["pred"][:k], arrays["true"][:k], path, names)
        files.append(path)
    return files


# ----------------------------------------------------------------------------------------------- run
def main(args: argparse.Namespace) -> dict[str, Any]:
    resolve_args(args)
    with start_guard(args.output_dir):  # a failed start (bad data, weights, labels) leaves nothing behind
        return run(args)


def loaders(args: argparse.Namespace, train_ds: Any, test_ds: Any, device: torch.device) -> tuple[Any, Any, Any]:
    from torch.utils.data import DataLoader, DistributedSampler

    from util.runtime import default_workers
    workers = 0 if isinstance(train_ds, FeatureMapDataset) else default_workers(device, args.num_workers)
    sampler = DistributedSampler(train_ds, get_world_size(), get_rank(), shuffle=True, seed=args.seed)
    bs = args.batch_size_per_gpu
    drop = len(sampler) > 1 and len(sampler) % bs == 1  # BatchNorm cannot train on a batch of one
    train_loader = DataLoader(train_ds, batch_size=bs, sampler=sampler, num_workers=workers, drop_last=drop)
    # Every rank evaluates the whole test split, so the metrics are computed once on all of it.
    test_loader = DataLoader(test_ds, batch_size=bs, shuffle=False, num_workers=workers)
    return train_loader, test_loader, sampler


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = setup(args)
    meta = None
    if args.datasets:
        train_ds, test_ds, names, meta = feature_datasets(args)
    elif args.task == "seg":
        train_ds, test_ds, names = seg_datasets(args)
    else:
        train_ds, test_ds, names = landmark_datasets(args)
    outputs = args.num_labels
    model, head, desc = build_model(args, outputs, meta)
    saved = load_head(head, args.load_from) if args.load_from else {}
    train_loader, test_loader, sampler = loaders(args, train_ds, test_ds, device)
    out = args.output_dir
    ckpt_path = os.path.join(out, f"checkpoint_{(args.checkpoint_key or 'decoder').split(',')[0]}_linear.pth")
    if args.test:
        model.to(device)
        metrics, arrays = evaluate(args, model, test_loader, device, names, test_ds)
        return finish(args, metrics, arrays, names, test_ds, saved, ckpt_path, 0.0)

    model, plain = prepare_model(model, args, device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    opt = Optimization(optimizer, args.amp)
    if args.task == "seg":
        forward = engine_dense.make_seg_forward(args.num_labels, args.loss, device)
    else:
        forward = engine_dense.make_landmark_forward(device)
    lr_fn = make_lr_fn(optimizer, args.lr, args.lr_schedule, args.epochs)
    if is_main_process() and os.path.isdir(out):
        set_aside_earlier_run(out)  # an earlier run's log.txt/metrics are moved aside, never appended to
    run_logger = RunLogger(out, args.log_dir or os.path.join(out, "tensorboard"))
    if is_main_process():
        write_atomic(os.path.join(out, "config.json"), json.dumps(args_to_dict(args), indent=1).encode("utf-8"))
    training_started(out)
    start = time.time()
    key = "mDice" if args.task == "seg" else "mre_px"
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)  # flips/affines drawn from (seed, epoch, index)
        stats = train_epoch(model, train_loader, opt, epoch, device, forward, lr_fn, run_logger=run_logger,
                            header=f"Epoch [{epoch}]", seed=args.seed)
        record: dict[str, Any] = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}
        if (epoch + 1) % args.val_freq == 0 and epoch + 1 < args.epochs:
            m, _ = evaluate(args, plain, test_loader, device, names, test_ds, n_boot=0)  # monitoring: no CIs
            record[f"test_{key}"] = m.get(key)
            if isinstance(m.get(key), float):
                run_logger.scalars({key: m[key]}, epoch, prefix="test/")
            logger.info("epoch %d test (monitoring): %s", epoch, headline(m))
        run_logger.json_line(record)
    metrics, arrays = evaluate(args, plain, test_loader, device, names, test_ds)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    run_logger.scalars(scalars, args.epochs, prefix="test/")
    run_logger.json_line({**{f"test_{k}": v for k, v in scalars.items()}, "epoch": args.epochs - 1})
    run_logger.close()
    best = {"best_dice": metrics.get("vfm_dice")} if args.task == "seg" else {"best_mre": metrics.get("mre_px")}
    extra = {**best, "task": args.task, "test_metrics": json.dumps(metrics, allow_nan=False), "class_names": names,
             "head": {"type": type(head).__name__, "outputs": outputs, "head_type": args.head_type, **desc}}
    if is_main_process():
        save_head(ckpt_path, head, optimizer, args.epochs, args, extra)
    return finish(args, metrics, arrays, names, test_ds, {}, ckpt_path, time.time() - start)


def finish(args: argparse.Namespace, metrics: dict[str, Any], arrays: dict[str, Any], names: list[str],
           test_ds: Any, saved: dict[str, Any], ckpt_path: str, seconds: float) -> dict[str, Any]:
    tested = bool(args.test)
    reproduced = None
    if tested and saved.get("test_metrics"):
        before = json.loads(saved["test_metrics"])
        now = json.loads(json.dumps(metrics, allow_nan=False))
        diffs = [k for k in set(before) | set(now) if before.get(k) != now.get(k)]
        reproduced = not diffs
        if diffs:
            logger.warning("--test: metrics differ from those saved with %s in %s", args.load_from,
                           ", ".join(sorted(diffs)[:8]))
        metrics = {**metrics, "reproduces_saved_metrics": reproduced}
    files: list[str] = []
    if is_main_process():
        files = write_outputs(args, metrics, arrays, names, test_ds)
    title = "segmentation" if args.task == "seg" else "landmark"
    cmd = (f"python evaluation/train_{'seg' if args.task == 'seg' else 'landmark'}_decoder.py <same flags> "
           f"--load_from {ckpt_path} --test")
    print_summary(f"VisionFM {title} decoder{' (--test)' if tested else ''}", [
        ("test", headline(metrics)),
        ("95% CI", ", ".join(f"{k[:-3]} {v[0]:.3f}-{v[1]:.3f}" for k, v in metrics.items()
                             if k.endswith("_ci") and isinstance(v, (list, tuple)) and v[0] is not None)),
        ("saved metrics", None if reproduced is None else ("reproduced exactly" if reproduced else "DIFFERENT")),
        ("checkpoint", None if tested else ckpt_path), ("time", None if tested else f"{seconds:.0f} s"),
        ("outputs", ", ".join(os.path.basename(f) for f in files) + f" in {args.output_dir}" if files else None)],
        next_cmd=None if tested else cmd)
    cleanup()
    return metrics


if __name__ == "__main__":
    run_main(main, get_args_parser())
