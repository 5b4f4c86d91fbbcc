"""Labelled datasets for finetuning, linear probing, few-shot and prediction: `LabelledImageDataset` and
THE factory, `build_dataset`.

`build_dataset` turns `--data_path` into the dataset of one split: it detects the layout
(`util.label_layouts`), reads the split with that layout's entry in `LAYOUT_READERS` (a new layout is
one entry there), subsets and carves it (`util.splits`) and attaches the transform
(`util.finetune_transforms`). When there is no validation split, one is carved from train with a seeded
stratified split that is recorded on the dataset (`split_info`) so runs can report exactly what they
validated on.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections import Counter
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from util.augment import apply_transform
from util.cli import UserError
from util.data import load_image, sample_seed
from util.skipping import read_or_skip, sample_failure, SkippedSample
from util.finetune_transforms import decode_min_side, transform_from_args, uses_uspec_eval_aug
from util.image_io import draft_reduction
from util.label_layouts import (SPLITS, Sample, Target, detect_layout, normalize_split, read_cbis, read_flat_classes,
                                read_imagefolder, read_imagefolder_classes, read_vfm_records, records_to_samples,
                                vfm_datasets, vfm_label_file)
from util.samplers import class_totals
from util.splits import few_shot_split, stratified_carve, train_percent_subset

logger = logging.getLogger("medfound")


@contextlib.contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python/NumPy/torch global RNGs (timm transforms draw from them) and restore them after,
    so per-sample seeding never disturbs the caller's streams (e.g. Mixup in the main process)."""
    py, npst, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npst)
        torch.set_rng_state(th)


class LabelledImageDataset(Dataset):
    """`(image_tensor, target, index)` for each `(path, target)` sample.

    `target` is returned as an int (single-label) or a float tensor (multi-label: multi-hot rows are
    kept, class indices become one-hot). With `blur` the image is degraded before the transform, keyed
    by its POSIX path relative to `blur_root`, exactly as `blurred_images.py` keys files, so a deblurring
    model is finetuned on the degradation it was pretrained on. `bad_image='skip'` returns a
    `util.data.SkippedSample` for an unreadable file (dropped from its batch by the loader, counted and
    listed; never replaced by another image); 'error' stops at it advising `--bad_image skip`; None (tools
    without that flag) stops at it without that advice.

    `seed`: when set, each sample's augmentation is drawn from RNGs seeded by (seed, epoch, index):
    keys may be `(epoch, index)` tuples (util.data.EpochIndexSampler) or plain ints (epoch 0). Leave it
    None for training with plain-int samplers, or every epoch would see the same augmentation.
    """

    def __init__(self, samples: Sequence[Sample], transform: Any, classes: Sequence[str],
                 multilabel: bool = False, blur: Any = None, blur_root: str | None = None,
                 bad_image: str | None = None, seed: int | None = None, decode_min_side: int = 0) -> None:
        if bad_image not in (None, "error", "skip"):
            raise UserError(f"--bad_image must be 'error' or 'skip', got {bad_image!r}")
        self.samples: list[Sample] = list(samples)
        self.transform = transform
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.multilabel = bool(multilabel)
        self.blur = _as_blur_spec(blur)
        self.blur_root = blur_root
        self.bad_image = bad_image
        self.seed = seed
        # > 0: JPEGs may be decoded at 1/2 or 1/4 scale as long as their shorter side keeps this many pixels
        # (see decode_min_side()); never with a blur, which is defined in pixels of the full image.
        self.decode_min_side = decode_min_side
        self.split_info: dict[str, Any] = {}  # filled by build_dataset: layout, carve, few-shot record

    @property
    def targets(self) -> list[Target]:
        return [t for _, t in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def blur_key(self, index: int) -> str:
        path = self.samples[index][0]
        return os.path.relpath(path, self.blur_root).replace(os.sep, "/") if self.blur_root else os.path.basename(path)

    def load(self, index: int) -> Any:
        """The (optionally blurred) RGB PIL image of a sample, before the transform."""
        side = self.decode_min_side if self.blur is None else 0
        img = load_image(self.samples[index][0], draft=(lambda w, h: draft_reduction(min(w, h), side)) if side else None)
        if self.blur is not None:
            from util.blur import blur_pil
            img = blur_pil(img, self.blur, key=self.blur_key(index)).convert("RGB")  # 'L' when grayscale
        return img

    def target_tensor(self, target: Target) -> int | torch.Tensor:
        if isinstance(target, tuple):
            return torch.tensor(target, dtype=torch.float32)
        if self.multilabel:
            onehot = torch.zeros(len(self.classes), dtype=torch.float32)
            onehot[int(target)] = 1.0
            return onehot
        return int(target)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int | torch.Tensor, int] | SkippedSample:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path = self.samples[index][0]
        try:
            img = read_or_skip(lambda: self.load(index), index, path, self.bad_image)
        except UserError:  # unreadable file (policy applied) or bad settings: already one line
            raise
        except Exception as e:  # noqa: BLE001 - anything else: one line naming the file
            raise sample_failure("loading", path, e, "please report it with this image") from e
        if isinstance(img, SkippedSample):
            return img
        if self.transform is not None:  # failures name the transform step and the file (one line)
            if self.seed is not None:
                with _seeded_global_rngs(sample_seed(self.seed, epoch, index)):
                    img = apply_transform(self.transform, img, path)
            else:
                img = apply_transform(self.transform, img, path)
        return img, self.target_tensor(self.samples[index][1]), index

    def class_counts(self) -> dict[str, int]:
        """Samples per class (multi-label: positives per column)."""
        return dict(zip(self.classes, class_totals(self.targets, len(self.classes)).astype(int).tolist()))


def _as_blur_spec(blur: Any) -> Any:
    if blur is None or blur is False:
        return None
    from util.blur import BlurSpec
    if isinstance(blur, BlurSpec):
        return blur
    if isinstance(blur, Mapping):
        try:
            return BlurSpec.from_dict(blur)
        except ValueError as e:
            raise UserError(f"bad blur settings: {e}") from None
    raise UserError(f"blur must be a BlurSpec or a dict from BlurSpec.to_dict(), got {type(blur).__name__}")


def available_splits(data_path: str, few_shot: bool = False) -> set[str]:
    """Splits `build_dataset` can serve for this data (val is servable, maybe carved, once train is),
    e.g. MAE's train/val trees have no test split."""
    layout = detect_layout(data_path)
    if layout == "imagefolder":
        have = {s for s in SPLITS if os.path.isdir(os.path.join(data_path, s))}
    elif layout == "vfm":
        have = {s for s in SPLITS if any(vfm_label_file(d, s) for d in vfm_datasets(data_path))}
    elif layout == "cbis":  # train/test CSVs (checked when read)
        have = {"train", "test"}
    else:  # flat class folders: train/val exist only through --few_shot
        have = {"train", "test"} if few_shot else {"test"}
    if few_shot and "train" in have:
        have.add("test")  # the images left over from the shots
    return have | ({"val"} if "train" in have else set())


def _check_nb_classes(nb: int | None, classes: Sequence[str], where: str) -> None:
    # nb_classes 1 with two classes is the binary one-logit convention (VisionFM --num_labels 1).
    if nb is None or nb == len(classes) or (nb == 1 and len(classes) == 2):
        return
    shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
    raise UserError(f"--nb_classes {nb} but {where} has {len(classes)} classes ({shown}); "
                    f"pass --nb_classes {len(classes)}")


def _carve_or_keep(split: str, train: list[Sample], args: Any, info: dict[str, Any],
                   have_val: bool) -> list[Sample]:
    """Train split after removing the carved val (no val split on disk), or the carved val itself."""
    if have_val:
        return train
    fraction = getattr(args, "val_fraction", None)
    fraction = 0.1 if fraction is None else float(fraction)
    rest, val, carve = stratified_carve(train, fraction, int(getattr(args, "seed", 0)))
    info["val_carve"] = carve
    if split == "val":
        if not val:
            logger.warning("no validation split and nothing to carve (val_fraction %g, %d training samples); "
                           "validation set is empty", fraction, len(train))
        else:
            logger.info("no validation split: carved %d of %d training samples (val_fraction %g, seed %d)",
                        len(val), len(train), fraction, carve["seed"])
        return val
    return rest

class SplitSamples(NamedTuple):
    """What a layout reader returns for one split."""
    samples: list[Sample]
    classes: list[str]
    multilabel: bool  # the labels themselves are multi-value rows (VisionFM label files)


def _read_few_shot(split: str, root: str, args: Any, info: dict[str, Any]) -> SplitSamples:
    """`--few_shot K` on class folders: shots -> train, the rest -> test. `info["layout"]` holds the
    detected layout on entry and 'few_shot' on return."""
    if info["layout"] == "vfm":
        raise UserError("--few_shot works on class folders (<root>/<class>/<image>), not VisionFM label files")
    # With train/val/test folders the shots come from train, and existing val/test folders are used
    # as they are; on a flat tree the unused images are the test set (USPEC).
    pool = os.path.join(root, "train") if info["layout"] == "imagefolder" else root
    if not os.path.isdir(pool):
        raise UserError(f"--few_shot: {root} has no train/ folder to draw shots from")
    info["layout"] = "few_shot"
    few_shot, seed = args.few_shot, int(getattr(args, "seed", 0) or 0)
    shots, rest, classes = few_shot_split(pool, float(few_shot), seed)
    _check_nb_classes(getattr(args, "nb_classes", None), classes, pool)
    info["few_shot"] = {"shots": float(few_shot), "seed": seed, "pool": pool, "num_train": len(shots),
                        "num_rest": len(rest), "train_counts": dict(Counter(classes[t] for _, t in shots))}
    own = {s: pool != root and os.path.isdir(os.path.join(root, s)) for s in ("val", "test")}
    if split != "train" and own[split]:
        samples, _ = read_imagefolder(os.path.join(root, split), classes)
    elif split == "test":
        samples = rest
    else:
        samples = _carve_or_keep(split, shots, args, info, have_val=own["val"])
    return SplitSamples(samples, classes, False)


def _read_imagefolder_split(split: str, root: str, args: Any, info: dict[str, Any]) -> SplitSamples:
    """`root/{train,val,test}/<class>/<image>`; val is carved from train when there is no val/ folder."""
    nb = getattr(args, "nb_classes", None)
    split_dir = {s: os.path.join(root, s) for s in SPLITS}
    have = {s: os.path.isdir(p) for s, p in split_dir.items()}
    if split == "train" or (split == "val" and not have["val"]):
        if not have["train"]:
            raise UserError(f"--data_path {root}: no train/ folder (found "
                            f"{', '.join(s for s in SPLITS if have[s])}); expected {root}/train/<class>/<image>")
        samples, classes = read_imagefolder(split_dir["train"])
        _check_nb_classes(nb, classes, split_dir["train"])
        samples = _carve_or_keep(split, samples, args, info, have_val=have["val"])
    else:
        if not have[split]:
            raise UserError(f"--data_path {root}: no {split}/ folder; expected {root}/{split}/<class>/<image>")
        train_classes = read_imagefolder_classes(split_dir["train"]) if have["train"] else None
        samples, classes = read_imagefolder(split_dir[split], train_classes)
        _check_nb_classes(nb, classes, split_dir["train"] if have["train"] else split_dir[split])
    return SplitSamples(samples, classes, False)


def _read_vfm_split(split: str, root: str, args: Any, info: dict[str, Any]) -> SplitSamples:
    """VisionFM label files; val is carved from train when no dataset has a val label file."""
    num_labels = getattr(args, "num_labels", None)
    flag = "--num_labels"
    if num_labels is None:
        num_labels, flag = getattr(args, "nb_classes", None), "--nb_classes"
    have_val = any(vfm_label_file(d, "val") for d in vfm_datasets(root))
    src = split if (split != "val" or have_val) else "train"
    records = read_vfm_records(root, src, num_labels, flag)
    samples, classes, rows = records_to_samples(records, num_labels)
    if num_labels is None and not rows and src != "train":
        # Infer the class count from training labels so every split agrees on it.
        try:
            _, train_classes, _ = records_to_samples(read_vfm_records(root, "train"), None)
            classes = max(classes, train_classes, key=len)
        except UserError:
            pass
    if rows and not getattr(args, "multilabel", False):
        logger.info("label files hold %d-value rows: using multi-label targets", len(classes))
    if src == "train":
        samples = _carve_or_keep(split, samples, args, info, have_val=have_val)
    return SplitSamples(samples, classes, rows)


def _read_flat_split(split: str, root: str, args: Any, info: dict[str, Any]) -> SplitSamples:
    """Class folders without splits: fine to evaluate on, but training would leak into val."""
    if split != "test":
        raise UserError(f"--data_path {root} holds class folders but no train/val/test split; arrange it as "
                        f"{root}/{{train,val,test}}/<class>/<image>, or pass --few_shot K to split it")
    samples, classes = read_flat_classes(root)
    _check_nb_classes(getattr(args, "nb_classes", None), classes, root)
    logger.info("%s has class folders and no splits: evaluating on all of it", root)
    return SplitSamples(samples, classes, False)


def _read_cbis_split(split: str, root: str, args: Any, info: dict[str, Any]) -> SplitSamples:
    """CBIS-DDSM CSVs: val is a stratified carve of the train CSV, or the test CSV itself under
    `--compat medslip_cbis` (MedSLIP's probe validated on its test set)."""
    from_test = "medslip_cbis" in str(getattr(args, "compat", "") or "").split(",")
    if split == "test" or (split == "val" and from_test):
        if split == "val":
            info["val_source"] = "the test CSV (--compat medslip_cbis)"
        return SplitSamples(*read_cbis(root, "test"), False)
    samples, classes = read_cbis(root, "train")
    return SplitSamples(_carve_or_keep(split, samples, args, info, have_val=from_test), classes, False)


# Layout name (util.label_layouts.detect_layout, or 'few_shot' under --few_shot) -> the reader of one
# split: (split, data_path, args, split_info) -> SplitSamples. Readers record carves in split_info.
LAYOUT_READERS: dict[str, Callable[[str, str, Any, dict[str, Any]], SplitSamples]] = {
    "few_shot": _read_few_shot,
    "imagefolder": _read_imagefolder_split,
    "vfm": _read_vfm_split,
    "flat": _read_flat_split,
    "cbis": _read_cbis_split,
}


def build_dataset(split: str, args: Any) -> LabelledImageDataset:
    """The dataset of `split` ('train', 'val' or 'test'; 'training' is accepted) for `args.data_path`.

    Layouts are detected: ImageFolder (train/val/test folders), VisionFM label files, or flat class
    folders with `--few_shot` (shots -> train, rest -> test; without it only 'test' reads the whole
    tree; on an ImageFolder tree shots come from train/ and its val/ and test/ folders are used when
    present); `LAYOUT_READERS` reads the split. Without a val split, val is a stratified carve of
    train (`args.val_fraction`, default 0.1; `args.seed`) and train excludes it; 0 disables the carve
    (val is then empty). `--train_percent` subsets train after the carve so val does not depend on it. `dataset.split_info` records layout, counts and any carve / few-shot split.
    """
    split = normalize_split(split)
    root = getattr(args, "data_path", None)
    info: dict[str, Any] = {"split": split, "layout": detect_layout(root), "data_path": root}
    reader = LAYOUT_READERS["few_shot" if getattr(args, "few_shot", None) else info["layout"]]
    found = reader(split, root, args, info)
    samples, classes, layout = found.samples, found.classes, info["layout"]
    multilabel = bool(getattr(args, "multilabel", False)) or found.multilabel
    seed = int(getattr(args, "seed", 0) or 0)

    percent = getattr(args, "train_percent", None)
    if split == "train" and percent is not None and not math.isclose(float(percent), 1.0):
        if layout == "few_shot":
            logger.warning("--train_percent is ignored with --few_shot")
        else:
            before = len(samples)
            samples = train_percent_subset(samples, float(percent), seed)
            info["train_percent"] = {"percent": float(percent), "seed": seed, "before": before, "after": len(samples)}
            logger.info("--train_percent %g: kept %d of %d training samples", float(percent), len(samples), before)

    is_train = split == "train"
    eval_aug = uses_uspec_eval_aug(args) and not is_train
    ds = LabelledImageDataset(
        samples, transform_from_args(is_train, args), classes, multilabel=multilabel,
        blur=getattr(args, "blur", None), blur_root=root,
        bad_image=getattr(args, "bad_image", None),  # None: the tool has no --bad_image flag
        # USPEC evaluated with the random training transform: seeding each sample makes that repeatable.
        seed=seed if eval_aug else None,
        decode_min_side=decode_min_side(is_train or eval_aug, args.input_size)
        if getattr(args, "jpeg_draft", False) else 0)
    info.update(num_samples=len(ds), classes=list(classes), multilabel=multilabel, class_counts=ds.class_counts())
    if ds.blur is not None:
        info["blur"] = ds.blur.to_dict()
    ds.split_info = info
    logger.info("%s: %d samples, %d classes (%s) [%s layout%s]", split, len(ds), len(classes),
                ", ".join(f"{k}: {v}" for k, v in list(info["class_counts"].items())[:10]), layout,
                f", blur {ds.blur.describe()}" if ds.blur is not None else "")
    return ds
