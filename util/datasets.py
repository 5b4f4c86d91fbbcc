"""Labelled data for finetuning, linear probing, few-shot and prediction: layouts, splits, transforms.

One factory (`build_dataset`) turns `--data_path` into a `LabelledImageDataset` for a split. It reads
three layouts (compat §10), each parsed in one place with one-line `UserError`s naming the file:

* ImageFolder ``root/{train,val,test}/<class>/<image>`` (MAE, RETFound, USPEC, DeblurringMAE);
* VisionFM label files ``root/<dataset_X>/{training,test}_labels.txt`` (or directly under root; the
  forecasting names ``training.txt``/``test.txt`` too), lines ``relative/path;k`` or ``path;0,1,0``;
* flat few-shot ``root/<class>/<image>`` (USPEC), split into shots and test by USPEC's algorithm.

When there is no validation split, one is carved from train with a seeded stratified split that is
recorded on the dataset (`split_info`) so runs can report exactly what they validated on.

Reference differences, on purpose: only image files count (by extension) and only directories are
classes, where USPEC/VisionFM count every directory entry (compat F2); USPEC's `--train_percent` sampled
from `os.listdir` order, which depends on the file system, we sample from sorted names.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sized
from typing import Any, Iterator, Mapping, NamedTuple, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from util.augment import apply_transform, make_pillow_safe
from util.cli import UserError
from util.data import (IMG_EXTENSIONS, draft_reduction, list_images, load_image, read_with_policy, resolve_norm,
                       sample_failure, sample_seed)

logger = logging.getLogger("medfound")

# A target is a class index (single-label) or a tuple of floats (multi-hot / multi-value rows).
Target = Union[int, tuple]
Sample = tuple[str, Target]

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "eval": "val", "testing": "test"}
# Label-file names per split, first match wins. The first two of train/test mark a VisionFM dataset;
# the others are tolerated extras (a val file lets users avoid the carve).
VFM_LABEL_FILES: dict[str, tuple[str, ...]] = {
    "train": ("training_labels.txt", "training.txt", "train_labels.txt"),
    "val": ("val_labels.txt", "validation_labels.txt", "val.txt", "validation.txt"),
    "test": ("test_labels.txt", "test.txt"),
}
_VFM_MARKERS = ("training_labels.txt", "training.txt", "test_labels.txt", "test.txt")


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------

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
    model is finetuned on the degradation it was pretrained on. `bad_image='skip'` logs an unreadable
    file and serves the next index instead (the returned index says which one was served).

    `seed`: when set, each sample's augmentation is drawn from RNGs seeded by (seed, epoch, index):
    keys may be `(epoch, index)` tuples (util.data.EpochIndexSampler) or plain ints (epoch 0). Leave it
    None for training with plain-int samplers, or every epoch would see the same augmentation.
    """

    def __init__(self, samples: Sequence[Sample], transform: Any, classes: Sequence[str],
                 multilabel: bool = False, blur: Any = None, blur_root: str | None = None,
                 bad_image: str = "error", seed: int | None = None, decode_min_side: int = 0) -> None:
        if bad_image not in ("error", "skip"):
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

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int | torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        tried = [index]  # the sample being read when something fails (skips move on to the next)

        def load(i: int) -> Any:
            tried[0] = i
            return self.load(i)
        try:
            index, img = read_with_policy(load, index, len(self.samples), self.bad_image)
        except UserError:  # unreadable file (policy applied) or bad settings: already one line
            raise
        except Exception as e:  # noqa: BLE001 - anything else: one line naming the file
            raise sample_failure("loading", self.samples[tried[0]][0], e, "please report it with this image") from e
        if self.transform is not None:  # failures name the transform step and the file (one line)
            path = self.samples[index][0]
            if self.seed is not None:
                with _seeded_global_rngs(sample_seed(self.seed, epoch, index)):
                    img = apply_transform(self.transform, img, path)
            else:
                img = apply_transform(self.transform, img, path)
        return img, self.target_tensor(self.samples[index][1]), index

    def class_counts(self) -> dict[str, int]:
        """Samples per class (multi-label: positives per column)."""
        return dict(zip(self.classes, _class_totals(self.targets, len(self.classes)).astype(int).tolist()))


def decode_min_side(is_train: bool, input_size: int, min_scale: float = 0.08) -> int:
    """Shorter side a decoded image needs so that the transform still only shrinks it: evaluation
    resizes the shorter side to input_size / crop_pct; training's RandomResizedCrop (scale >= 0.08,
    ratio >= 3/4) can take a crop whose shorter side is sqrt(0.08 * 3/4) of the image's."""
    if is_train:
        return math.ceil(input_size / math.sqrt(min_scale * 3 / 4))
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return int(input_size / crop_pct)


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


# --------------------------------------------------------------------------------------------------
# Layout readers: each returns (samples, classes) and raises UserError naming the file
# --------------------------------------------------------------------------------------------------

def _class_dirs(root: str) -> list[str]:
    """Sorted non-hidden sub-directories (only directories are classes; stray files are ignored)."""
    return sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))


def read_imagefolder(split_root: str, classes: Sequence[str] | None = None) -> tuple[list[Sample], list[str]]:
    """`split_root/<class>/<image>` (images found recursively, like torchvision's ImageFolder).

    With `classes` (the train split's list), folder names are mapped onto it so every split shares one
    class index even when a split lacks a class; a folder unknown to `classes` is an error.
    """
    if not os.path.isdir(split_root):
        raise UserError(f"{split_root} is not a folder; expected <split>/<class>/<image> (ImageFolder layout)")
    found = _class_dirs(split_root)
    if not found:
        raise UserError(f"{split_root}: no class folders; put images in {split_root}/<class_name>/")
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise UserError(f"{split_root}: class folder(s) {', '.join(unknown)} are not in the training classes "
                            f"({', '.join(classes)}); rename or remove them so all splits share one class list")
        missing = [c for c in classes if c not in found]
        if missing:
            logger.warning("%s has no folder for class(es) %s", split_root, ", ".join(missing))
    index = {c: i for i, c in enumerate(classes)}
    samples: list[Sample] = []
    for c in found:
        files = list_images(os.path.join(split_root, c))
        if not files:
            raise UserError(f"{os.path.join(split_root, c)}: empty class folder (no {'/'.join(IMG_EXTENSIONS)} "
                            "images); add images or remove the folder")
        samples.extend((f, index[c]) for f in files)
    return samples, list(classes)


def read_flat_classes(root: str) -> tuple[list[Sample], list[str]]:
    """USPEC few-shot layout `root/<class>/<image>`: classes are the sorted folder names and only the
    images directly inside each class folder count (USPEC listed each folder, not recursively)."""
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder; expected <root>/<class>/<image>")
    classes = _class_dirs(root)
    if not classes:
        raise UserError(f"{root}: no class folders; expected {root}/<class_name>/<image>")
    samples: list[Sample] = []
    for i, c in enumerate(classes):
        files = list_images(os.path.join(root, c), recursive=False)
        if not files:
            raise UserError(f"{os.path.join(root, c)}: empty class folder (no images directly inside); "
                            "add images or remove the folder")
        samples.extend((f, i) for f in files)
    return samples, classes


def read_image_list(root: str) -> tuple[list[Sample], list[str]]:
    """Every image under `root` with target -1, for prediction on unlabelled folders."""
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder of images")
    files = list_images(root)
    if not files:
        raise UserError(f"{root}: no images found (extensions: {', '.join(IMG_EXTENSIONS)})")
    return [(f, -1) for f in files], []


class LabelRecord(NamedTuple):
    """One parsed label-file line. `values` holds one number (a class index) or a row of numbers."""
    image: str          # resolved path
    values: tuple[float, ...]
    file: str
    line: int
    days: float | None  # forecasting lines `path, label, days` carry a time interval


_LINE_HELP = "expected 'relative/path;k', 'relative/path;0,1,0' or 'path, label, days'"


def parse_label_file(path: str, num_labels: int | None = None, flag: str = "--num_labels") -> list[LabelRecord]:
    """Parse a VisionFM label file; paths are relative to the file's folder (or, as in the forecasting
    README, to the working directory, or absolute). Blank lines and `#` comments are skipped, spaces are
    tolerated around separators. Every line must have the same arity; with `num_labels`, single-label
    indices must lie in [0, num_labels) ({0, 1} when num_labels is 1, VisionFM's binary convention) and
    rows must have num_labels values. Errors name the file and line."""
    base = os.path.dirname(os.path.abspath(path))
    records: list[LabelRecord] = []
    arity: tuple[int, int] | None = None  # (arity, first line with it)
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read label file ({e})") from None
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        days = None
        if ";" in line:
            rel, rest = line.rsplit(";", 1)
            fields = [v for v in re.split(r"[,\s]+", rest.strip()) if v]
        else:  # forecasting form: path, label[, days]
            parts = [p.strip() for p in line.split(",")]
            if len(parts) not in (2, 3):
                raise UserError(f"{where}: malformed line {raw!r}; {_LINE_HELP}")
            rel, fields = parts[0], parts[1:2]
            if len(parts) == 3:
                try:
                    days = float(parts[2])
                except ValueError:
                    raise UserError(f"{where}: time interval {parts[2]!r} is not a number; {_LINE_HELP}") from None
        rel = rel.strip()
        if not rel or not fields:
            raise UserError(f"{where}: malformed line {raw!r}; {_LINE_HELP}")
        try:
            values = tuple(float(v) for v in fields)
        except ValueError:
            raise UserError(f"{where}: labels {','.join(fields)!r} are not numbers; {_LINE_HELP}") from None
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"{where}: labels must be finite numbers, got {','.join(fields)!r}")
        if arity is None:
            arity = (len(values), lineno)
        elif len(values) != arity[0]:
            raise UserError(f"{where}: {len(values)} label value(s) but line {arity[1]} has {arity[0]}; "
                            "every line must have the same number of labels")
        if len(values) == 1:
            k = values[0]
            limit = 2 if num_labels == 1 else num_labels
            if k != int(k) or k < 0 or (limit is not None and k >= limit):
                rng = "0 or 1 (binary, --num_labels 1)" if num_labels == 1 else (
                    f"an integer in [0, {limit - 1}] ({flag} {num_labels})" if limit else "a non-negative integer")
                raise UserError(f"{where}: class index {fields[0]!r} must be {rng}")
        elif num_labels is not None and len(values) != num_labels:
            raise UserError(f"{where}: {len(values)} label values but {flag} is {num_labels}; "
                            f"fix the line or pass {flag} {len(values)}")
        image = _resolve_listed(rel, base)
        if image is None:
            raise UserError(f"{where}: listed image {os.path.join(base, rel)} does not exist; fix the path "
                            f"(relative to {base}) or remove the line")
        records.append(LabelRecord(image, values, path, lineno, days))
    if not records:
        raise UserError(f"{path}: no labelled images (only blank or comment lines); {_LINE_HELP}")
    return records


def _resolve_listed(rel: str, base: str) -> str | None:
    if os.path.isabs(rel):
        return rel if os.path.isfile(rel) else None
    cand = os.path.normpath(os.path.join(base, rel))
    if os.path.isfile(cand):
        return cand
    return rel if os.path.isfile(rel) else None  # forecasting README lists paths relative to the cwd


def vfm_datasets(root: str) -> list[str]:
    """VisionFM dataset folders: root itself when it holds label files, else every sub-folder that does."""
    if any(os.path.isfile(os.path.join(root, n)) for n in _VFM_MARKERS):
        return [root]
    return [os.path.join(root, d) for d in _class_dirs(root)
            if any(os.path.isfile(os.path.join(root, d, n)) for n in _VFM_MARKERS)]


def vfm_label_file(dataset_dir: str, split: str) -> str | None:
    for name in VFM_LABEL_FILES[split]:
        p = os.path.join(dataset_dir, name)
        if os.path.isfile(p):
            return p
    return None


def read_vfm_records(root: str, split: str, num_labels: int | None = None,
                     flag: str = "--num_labels") -> list[LabelRecord]:
    """Records of one split, concatenated over every VisionFM dataset under root (sorted by folder)."""
    dirs = vfm_datasets(root)
    if not dirs:
        raise UserError(f"{root}: no VisionFM label files ({' / '.join(_VFM_MARKERS)}) in it or its sub-folders")
    records: list[LabelRecord] = []
    arity: tuple[int, str] | None = None
    missing = []
    for d in dirs:
        lf = vfm_label_file(d, split)
        if lf is None:
            missing.append(d)
            continue
        recs = parse_label_file(lf, num_labels, flag)
        if arity is None:
            arity = (len(recs[0].values), lf)
        elif len(recs[0].values) != arity[0]:
            raise UserError(f"{lf}: {len(recs[0].values)} label value(s) per line but {arity[1]} has {arity[0]}; "
                            "concatenated datasets must share one label format")
        records.extend(recs)
    if not records:
        raise UserError(f"{root}: no {split} label file ({' or '.join(VFM_LABEL_FILES[split])}) in "
                        f"{', '.join(missing)}")
    if missing:
        logger.warning("VisionFM %s split: no label file in %s (skipped)", split, ", ".join(missing))
    return records


def records_to_samples(records: Sequence[LabelRecord], num_labels: int | None = None
                       ) -> tuple[list[Sample], list[str], bool]:
    """(samples, classes, multilabel). Classes are '0'..'C-1' (label files carry no names): C is
    num_labels (2 when it is 1, binary), else inferred from the largest index or the row width."""
    if not records:
        return [], [], False
    if len(records[0].values) > 1:
        width = len(records[0].values)
        return [(r.image, tuple(r.values)) for r in records], [str(i) for i in range(width)], True
    n = 2 if num_labels == 1 else num_labels
    if n is None:
        n = int(max(r.values[0] for r in records)) + 1
    return [(r.image, int(r.values[0])) for r in records], [str(i) for i in range(n)], False


def read_vfm(root: str, split: str, num_labels: int | None = None) -> tuple[list[Sample], list[str]]:
    """VisionFM label-file layout as (samples, classes); see `parse_label_file`."""
    samples, classes, _ = records_to_samples(read_vfm_records(root, _norm_split(split), num_labels), num_labels)
    return samples, classes


def detect_layout(root: str) -> str:
    """'imagefolder' (has train/val/test folders), 'vfm' (label files) or 'flat' (class folders)."""
    if not root or not os.path.isdir(root):
        raise UserError(f"--data_path {root!r} is not a folder; point it at your dataset (or use --demo)")
    # Root-level label files win: a VisionFM root also has a test/ folder of images.
    if any(os.path.isfile(os.path.join(root, n)) for n in _VFM_MARKERS):
        return "vfm"
    if any(os.path.isdir(os.path.join(root, s)) for s in SPLITS):
        return "imagefolder"
    if vfm_datasets(root):
        return "vfm"
    if _class_dirs(root):
        return "flat"
    raise UserError(f"--data_path {root}: no train/val/test folders, VisionFM label files or class folders; "
                    "expected <root>/{train,val,test}/<class>/<image> or <root>/<dataset>/training_labels.txt")


def _norm_split(split: str) -> str:
    s = _SPLIT_ALIASES.get(split.lower(), split.lower())
    if s not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return s


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------

def _class_key(target: Target) -> Any:
    """Stratum of a sample: its class index, or its whole row for multi-label targets."""
    return tuple(target) if isinstance(target, (tuple, list)) else int(target)


def few_shot_split(root_or_samples: str | Sequence[Sample], shots: float, seed: int,
                   classes: Sequence[str] | None = None) -> tuple[list[Sample], list[Sample], list[str]]:
    """USPEC `build_few_shot_dataset`, exactly: classes in sorted order share ONE `random.Random(seed)`;
    per class the sorted file list is shuffled, k = int(n*shots) if shots < 1 else int(shots), clipped to
    [0, n], the first k go to train and the rest to test. Returns (train, test, classes).

    Given samples instead of a root, classes are taken in class-index order and files sorted by path.
    """
    if isinstance(shots, bool) or not isinstance(shots, (int, float)) or not shots > 0:
        raise UserError(f"--few_shot must be > 0 (a shot count, or a fraction below 1), got {shots!r}")
    if isinstance(root_or_samples, (str, os.PathLike)):
        samples, classes = read_flat_classes(os.fspath(root_or_samples))
    else:
        samples = list(root_or_samples)
        if classes is None:
            classes = [str(i) for i in range(max((int(t) for _, t in samples), default=-1) + 1)]
    by_class: dict[int, list[str]] = defaultdict(list)
    for path, t in samples:
        by_class[int(t)].append(path)
    rng = random.Random(seed)
    train: list[Sample] = []
    test: list[Sample] = []
    for c in sorted(by_class):
        files = sorted(by_class[c])
        n = len(files)
        k = int(n * shots) if shots < 1 else int(shots)
        k = max(0, min(k, n))
        rng.shuffle(files)
        train.extend((f, c) for f in files[:k])
        test.extend((f, c) for f in files[k:])
    return train, test, list(classes)


def stratified_carve(samples: Sequence[Sample], fraction: float, seed: int
                     ) -> tuple[list[Sample], list[Sample], dict[str, Any]]:
    """Seeded stratified split of `samples` into (train, val, info) for data without a val split.

    Per stratum (class, or label row for multi-label) in sorted order, one shared `random.Random(seed)`
    shuffles the path-sorted samples and round(fraction*n) go to val, clipped so a stratum with >= 2
    samples keeps at least one on each side (a singleton stays in train). Both outputs keep the input
    order, and depend only on the sample set, fraction and seed. `info` records seed, fraction and the
    per-stratum counts, to be saved with the run.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {fraction!r}")
    strata: dict[Any, list[int]] = defaultdict(list)
    for i, (_, t) in enumerate(samples):
        strata[_class_key(t)].append(i)
    rng = random.Random(seed)
    val_idx: set[int] = set()
    counts: dict[str, dict[str, int]] = {}
    for key in sorted(strata):
        idx = sorted(strata[key], key=lambda i: samples[i][0])
        n = len(idx)
        k = int(math.floor(fraction * n + 0.5)) if fraction > 0 else 0
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        elif n < 2:
            k = 0
        rng.shuffle(idx)
        val_idx.update(idx[:k])
        counts[str(key) if not isinstance(key, tuple) else ",".join(f"{v:g}" for v in key)] = {"train": n - k, "val": k}
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    info = {"method": "stratified_carve", "seed": int(seed), "fraction": float(fraction),
            "num_train": len(train), "num_val": len(val), "counts": counts}
    return train, val, info


def train_percent_subset(samples: Sequence[Sample], percent: float, seed: int) -> list[Sample]:
    """USPEC `--train_percent`: per class, a fresh `random.Random(seed)` samples int(percent*n) of the
    class's files (here in sorted order, USPEC used `os.listdir` order). percent 1 keeps everything."""
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < percent <= 1:
        raise UserError(f"--train_percent must be in (0, 1], got {percent!r}")
    if math.isclose(percent, 1.0, rel_tol=1e-9, abs_tol=1e-12):
        return list(samples)
    by_class: dict[Any, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[_class_key(s[1])].append(s)
    out: list[Sample] = []
    for key in sorted(by_class):
        names = sorted(by_class[key], key=lambda s: s[0])
        out.extend(random.Random(seed).sample(names, int(percent * len(names))))
    return out


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------

def build_transform(is_train: bool, input_size: int, mean: Sequence[float], std: Sequence[float],
                    aa: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.25, remode: str = "pixel",
                    recount: int = 1, color_jitter: float | None = None, interpolation: str = "bicubic",
                    uspec_eval_aug: bool = False, crop_scale: Sequence[float] = (0.08, 1.0)) -> Any:
    """MAE finetuning transforms (compat §8.1).

    Train: timm `create_transform(is_training=True)` = RandomResizedCropAndInterpolation(scale
    `crop_scale` (MAE: .08-1), ratio 3/4-4/3) -> hflip .5 -> RandAugment `aa` (colour jitter off while AA is on, as in timm 0.3) ->
    ToTensor -> Normalize -> RandomErasing(reprob, remode, recount). Its posterize ops keep at least
    1 bit (`util.augment.make_pillow_safe`): timm asks for 0 at its strongest, which Pillow 13 rejects.
    Eval: Resize(int(size/crop_pct)) on the shorter side, crop_pct = 224/256 for size <= 224 else 1 ->
    CenterCrop(size) -> ToTensor -> Normalize. `uspec_eval_aug` returns the train transform for eval,
    reproducing USPEC's bug (compat Q14); use it only for comparisons.
    """
    input_size = int(input_size)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if is_train or uspec_eval_aug:
        from timm.data import create_transform
        if isinstance(aa, str) and aa.strip().lower() in ("", "none", "null"):
            aa = None
        try:
            train = create_transform(input_size=input_size, is_training=True, color_jitter=color_jitter,
                                     auto_augment=aa, interpolation=interpolation, re_prob=reprob,
                                     scale=tuple(float(c) for c in crop_scale),
                                     re_mode=remode, re_count=recount, mean=mean, std=std)
        except (AssertionError, ValueError, KeyError) as e:  # timm asserts on strings it cannot parse
            if aa is None:
                raise
            raise UserError(f"--aa {aa!r}: timm cannot build this augmentation ({str(e) or type(e).__name__}); use "
                            "e.g. rand-m9-mstd0.5-inc1, v0, original or augmix-m5-w3, or none") from None
        # Posterize with 0 bits (timm's strongest setting) is an error from Pillow 13 on: clamp to 1 bit.
        return make_pillow_safe(train)
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
              "nearest": InterpolationMode.NEAREST, "lanczos": InterpolationMode.LANCZOS}.get(
        interpolation, InterpolationMode.BICUBIC)
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_pct), interpolation=interp),  # same ratio as 224 <- 256
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def _compat_flags(args: Any) -> set[str]:
    c = getattr(args, "compat", None)
    if not c:
        return set()
    items = c.split(",") if isinstance(c, str) else list(c)
    return {str(x).strip() for x in items if str(x).strip()}


def uses_uspec_eval_aug(args: Any) -> bool:
    return bool(getattr(args, "uspec_eval_aug", False)) or "uspec_eval_aug" in _compat_flags(args)


def transform_from_args(is_train: bool, args: Any) -> Any:
    """`build_transform` with options read from an argparse namespace (missing fields get defaults)."""
    mean, std = getattr(args, "mean", None), getattr(args, "std", None)
    if mean is None or std is None:
        mean, std = resolve_norm(getattr(args, "norm_preset", None) or "imagenet", mean, std)
    return build_transform(is_train, getattr(args, "input_size", 224), mean, std,
                           aa=getattr(args, "aa", "rand-m9-mstd0.5-inc1"), reprob=getattr(args, "reprob", 0.25),
                           remode=getattr(args, "remode", "pixel"), recount=getattr(args, "recount", 1),
                           color_jitter=getattr(args, "color_jitter", None),
                           interpolation=getattr(args, "interpolation", None) or "bicubic",
                           uspec_eval_aug=uses_uspec_eval_aug(args),
                           crop_scale=getattr(args, "crop_scale", None) or (0.08, 1.0))


# --------------------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------------------

def available_splits(data_path: str, few_shot: bool = False) -> set[str]:
    """Splits `build_dataset` can serve for this data (val is servable, maybe carved, once train is),
    e.g. MAE's train/val trees have no test split."""
    layout = detect_layout(data_path)
    if layout == "imagefolder":
        have = {s for s in SPLITS if os.path.isdir(os.path.join(data_path, s))}
    elif layout == "vfm":
        have = {s for s in SPLITS if any(vfm_label_file(d, s) for d in vfm_datasets(data_path))}
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


def build_dataset(split: str, args: Any) -> LabelledImageDataset:
    """The dataset of `split` ('train', 'val' or 'test'; 'training' is accepted) for `args.data_path`.

    Layouts are detected: ImageFolder (train/val/test folders), VisionFM label files, or flat class
    folders with `--few_shot` (shots -> train, rest -> test; without it only 'test' reads the whole tree;
    on an ImageFolder tree shots come from train/ and its val/ and test/ folders are used when present). Without a val split, val is a stratified
    carve of train (`args.val_fraction`, default 0.1; `args.seed`) and train excludes it; 0 disables
    the carve (val is then empty). `--train_percent` subsets train after the carve so val does not
    depend on it. `dataset.split_info` records layout, counts and any carve / few-shot split.
    """
    split = _norm_split(split)
    root = getattr(args, "data_path", None)
    layout = detect_layout(root)
    seed = int(getattr(args, "seed", 0) or 0)
    nb = getattr(args, "nb_classes", None)
    few_shot = getattr(args, "few_shot", None)
    multilabel = bool(getattr(args, "multilabel", False))
    info: dict[str, Any] = {"split": split, "layout": layout, "data_path": root}

    if few_shot:
        if layout == "vfm":
            raise UserError("--few_shot works on class folders (<root>/<class>/<image>), not VisionFM label files")
        # With train/val/test folders the shots come from train, and existing val/test folders are used
        # as they are; on a flat tree the unused images are the test set (USPEC).
        pool = os.path.join(root, "train") if layout == "imagefolder" else root
        if not os.path.isdir(pool):
            raise UserError(f"--few_shot: {root} has no train/ folder to draw shots from")
        layout = info["layout"] = "few_shot"
        shots, rest, classes = few_shot_split(pool, float(few_shot), seed)
        _check_nb_classes(nb, classes, pool)
        info["few_shot"] = {"shots": float(few_shot), "seed": seed, "pool": pool, "num_train": len(shots),
                            "num_rest": len(rest), "train_counts": dict(Counter(classes[t] for _, t in shots))}
        own = {s: pool != root and os.path.isdir(os.path.join(root, s)) for s in ("val", "test")}
        if split != "train" and own[split]:
            samples, _ = read_imagefolder(os.path.join(root, split), classes)
        elif split == "test":
            samples = rest
        else:
            samples = _carve_or_keep(split, shots, args, info, have_val=own["val"])
    elif layout == "imagefolder":
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
    elif layout == "vfm":
        num_labels = getattr(args, "num_labels", None)
        flag = "--num_labels"
        if num_labels is None:
            num_labels, flag = nb, "--nb_classes"
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
        if rows and not multilabel:
            logger.info("label files hold %d-value rows: using multi-label targets", len(classes))
        multilabel = multilabel or rows
        if src == "train":
            samples = _carve_or_keep(split, samples, args, info, have_val=have_val)
    else:  # flat class folders without --few_shot: fine to evaluate on, but training would leak into val
        if split != "test":
            raise UserError(f"--data_path {root} holds class folders but no train/val/test split; arrange it as "
                            f"{root}/{{train,val,test}}/<class>/<image>, or pass --few_shot K to split it")
        samples, classes = read_flat_classes(root)
        _check_nb_classes(nb, classes, root)
        logger.info("%s has class folders and no splits: evaluating on all of it", root)

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
        bad_image=getattr(args, "bad_image", None) or "error",
        # USPEC's stochastic eval (compat Q14) is made repeatable by seeding each sample.
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


def read_imagefolder_classes(split_root: str) -> list[str]:
    """Class folder names of an ImageFolder split (sorted), without listing images."""
    if not os.path.isdir(split_root):
        raise UserError(f"{split_root} is not a folder")
    return _class_dirs(split_root)


# --------------------------------------------------------------------------------------------------
# Imbalance and distributed evaluation
# --------------------------------------------------------------------------------------------------

def _class_totals(targets: Sequence[Target], num_classes: int) -> np.ndarray:
    totals = np.zeros(num_classes, dtype=np.float64)
    for t in targets:
        if isinstance(t, (tuple, list)):
            totals[: len(t)] += np.asarray(t[:num_classes], dtype=np.float64) > 0
        elif 0 <= int(t) < num_classes:
            totals[int(t)] += 1
    return totals


def _targets_of(samples_or_targets: Sequence[Any]) -> list[Target]:
    return [s[1] if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str) else s
            for s in samples_or_targets]


def class_weights(samples_or_targets: Sequence[Any], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights N / (C * n_c) (mean 1 over present classes; absent classes get 0), for
    `CrossEntropyLoss(weight=...)`. Multi-label rows count positives per column."""
    targets = _targets_of(samples_or_targets)
    counts = _class_totals(targets, num_classes)
    w = np.zeros(num_classes, dtype=np.float64)
    present = counts > 0
    w[present] = len(targets) / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def weighted_sampler(samples_or_targets: Sequence[Any], num_classes: int, num_samples: int | None = None,
                     replacement: bool = True, generator: torch.Generator | None = None,
                     seed: int | None = None) -> WeightedRandomSampler:
    """A `WeightedRandomSampler` drawing classes about equally often (per-sample weight = its class
    weight; multi-label: the largest weight among its positive columns, 1 when it has none). `seed`
    makes the draws reproducible when no `generator` is given. Single-process only: for DDP, shard
    its indices yourself."""
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    targets = _targets_of(samples_or_targets)
    cw = class_weights(targets, num_classes).numpy()
    per = []
    for t in targets:
        if isinstance(t, (tuple, list)):
            pos = [cw[i] for i, v in enumerate(t[:num_classes]) if v > 0]
            per.append(max(pos) if pos else 1.0)
        else:
            per.append(cw[int(t)])
    return WeightedRandomSampler(torch.tensor(per, dtype=torch.double), num_samples or len(targets),
                                 replacement=replacement, generator=generator)


balanced_sampler = weighted_sampler  # the name main_finetune.py uses
read_image_folder = read_imagefolder


class SequentialShardSampler(Sampler[int]):
    """Evaluation sampler: each index goes to exactly one rank, with no padding or duplicates, so
    gathered predictions count every sample once (DistributedSampler pads to equal lengths).

    `contiguous` gives rank r a block (the first N % W ranks get one extra); `strided` gives r, r+W, ...
    Ranks may differ in length by one, so gather with padding-aware collectives (e.g. all_gather_object).
    """

    def __init__(self, dataset: Sized | int, num_replicas: int | None = None, rank: int | None = None,
                 mode: str = "contiguous") -> None:
        from util.dist import get_rank, get_world_size
        self.n = dataset if isinstance(dataset, int) else len(dataset)
        self.num_replicas = get_world_size() if num_replicas is None else int(num_replicas)
        self.rank = get_rank() if rank is None else int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} out of range for {self.num_replicas} replicas")
        if mode not in ("contiguous", "strided"):
            raise ValueError(f"mode must be 'contiguous' or 'strided', got {mode!r}")
        self.mode = mode

    def _indices(self) -> range:
        if self.mode == "strided":
            return range(self.rank, self.n, self.num_replicas)
        base, extra = divmod(self.n, self.num_replicas)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())

    def set_epoch(self, epoch: int) -> None:  # interface parity with DistributedSampler
        pass
