"""Labelled-data layouts on disk: which layout a folder holds and how each is read into samples.

Four layouts, each parsed in one place with one-line `UserError`s naming the file:

* ImageFolder ``root/{train,val,test}/<class>/<image>`` (MAE, RETFound, USPEC, DeblurringMAE);
* VisionFM label files ``root/<dataset_X>/{training,test}_labels.txt`` (or directly under root; the
  forecasting names ``training.txt``/``test.txt`` too), lines ``relative/path;k`` or ``path;0,1,0``;
* flat class folders ``root/<class>/<image>`` (USPEC's few-shot data);
* CBIS-DDSM CSVs ``train_<abnormality>.csv`` / ``test_<abnormality>.csv`` (image_path, pathology; MedSLIP).

Every reader returns `(samples, classes)`: samples are `(path, target)` pairs, a target being a class
index or a tuple of floats (multi-hot / multi-value rows). Only image files count (by extension) and
only directories are classes, where USPEC and VisionFM counted every directory entry.
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import NamedTuple, Sequence, Union

from util.cli import UserError
from util.data import list_images
from util.image_io import IMG_EXTENSIONS

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
VFM_MARKERS = ("training_labels.txt", "training.txt", "test_labels.txt", "test.txt")


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
    README, to the working directory, or absolute). A relative path may not climb out of the label
    file's folder (`../..`): that is an error naming the line. Absolute paths are accepted as they are,
    since VisionFM's forecasting lists use them; they are the user's explicit choice. Blank lines and `#` comments are skipped, spaces are
    tolerated around separators. Every line must have the same arity; with `num_labels`, single-label
    indices must lie in [0, num_labels) ({0, 1} when num_labels is 1, VisionFM's binary convention) and
    rows must have num_labels values. Errors name the file and line."""
    base = os.path.dirname(os.path.abspath(path))
    records: list[LabelRecord] = []
    arity: tuple[int, int] | None = None  # (arity, first line with it)
    for lineno, line in label_lines(path):
        where = f"{path}:{lineno}"
        days = None
        if ";" in line:
            rel, rest = line.rsplit(";", 1)
            fields = [v for v in re.split(r"[,\s]+", rest.strip()) if v]
        else:  # forecasting form: path, label[, days]
            parts = [p.strip() for p in line.split(",")]
            if len(parts) not in (2, 3):
                raise UserError(f"{where}: malformed line {line!r}; {_LINE_HELP}")
            rel, fields = parts[0], parts[1:2]
            if len(parts) == 3:
                try:
                    days = float(parts[2])
                except ValueError:
                    raise UserError(f"{where}: time interval {parts[2]!r} is not a number; {_LINE_HELP}") from None
        rel = rel.strip()
        if not rel or not fields:
            raise UserError(f"{where}: malformed line {line!r}; {_LINE_HELP}")
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
        if not os.path.isabs(rel) and _escapes(rel, base):
            raise UserError(f"{where}: listed image {rel!r} points outside the data root {base} (relative paths "
                            "must stay under the label file's folder); move the image there or list an absolute path")
        image = _resolve_listed(rel, base)
        if image is None:
            raise UserError(f"{where}: listed image {os.path.join(base, rel)} does not exist; fix the path "
                            f"(relative to {base}) or remove the line")
        records.append(LabelRecord(image, values, path, lineno, days))
    if not records:
        raise UserError(f"{path}: no labelled images (only blank or comment lines); {_LINE_HELP}")
    return records


def _escapes(rel: str, base: str) -> bool:
    """Whether a relative listed path climbs out of `base` (`../..`), judged on the path's text."""
    target = os.path.normpath(os.path.join(base, rel))
    return os.path.commonpath([target, os.path.normpath(base)]) != os.path.normpath(base)


def _resolve_listed(rel: str, base: str) -> str | None:
    if os.path.isabs(rel):
        return rel if os.path.isfile(rel) else None
    cand = os.path.normpath(os.path.join(base, rel))
    if os.path.isfile(cand):
        return cand
    return rel if os.path.isfile(rel) else None  # forecasting README lists paths relative to the cwd


def vfm_datasets(root: str) -> list[str]:
    """VisionFM dataset folders: root itself when it holds label files, else every sub-folder that does."""
    if any(os.path.isfile(os.path.join(root, n)) for n in VFM_MARKERS):
        return [root]
    return [os.path.join(root, d) for d in _class_dirs(root)
            if any(os.path.isfile(os.path.join(root, d, n)) for n in VFM_MARKERS)]


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
        raise UserError(f"{root}: no VisionFM label files ({' / '.join(VFM_MARKERS)}) in it or its sub-folders")
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
    samples, classes, _ = records_to_samples(read_vfm_records(root, normalize_split(split), num_labels), num_labels)
    return samples, classes


# CBIS-DDSM as MedSLIP's probe reads it: `train_<abnormality>.csv` / `test_<abnormality>.csv` with columns
# image_path and pathology; the class index is the pathology's position here.
CBIS_CLASSES = ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK")


def cbis_csv(root: str, split: str) -> str:
    """The CSV of `split` ('train' or 'test') for `--data_path` = a train_<abnormality>.csv file or a folder
    holding exactly one train_*.csv (calcification or mass); its test CSV is the same name with test_."""
    split = normalize_split(split)
    if os.path.isfile(root):
        folder, name = os.path.split(os.path.abspath(root))
        if not (name.startswith(("train_", "test_")) and name.endswith(".csv")):
            raise UserError(f"--data_path {root}: a CSV must be named train_<abnormality>.csv (CBIS-DDSM layout)")
    else:
        folder = root
        found = sorted(n for n in os.listdir(root) if n.startswith("train_") and n.endswith(".csv"))
        if len(found) != 1:
            raise UserError(f"--data_path {root}: {len(found)} train_*.csv files ({', '.join(found) or 'none'}); "
                            "point --data_path at the one to use, e.g. " + os.path.join(root, "train_mass.csv"))
        name = found[0]
    abnormality = name.split("_", 1)[1]
    path = os.path.join(folder, f"{'test' if split == 'test' else 'train'}_{abnormality}")
    if not os.path.isfile(path):
        raise UserError(f"--data_path {root}: no {os.path.basename(path)} beside it (CBIS-DDSM layout: "
                        f"train_{abnormality} and test_{abnormality})")
    return path


def read_cbis(root: str, split: str) -> tuple[list[Sample], list[str]]:
    """(samples, CBIS_CLASSES) of one CBIS-DDSM CSV (see `cbis_csv`): `pathology` is MALIGNANT, BENIGN or
    BENIGN_WITHOUT_CALLBACK (any case) or its index 0/1/2; `image_path` is absolute or relative to the CSV's
    folder. Errors name the file and row."""
    import csv
    path = cbis_csv(root, split)
    base = os.path.dirname(os.path.abspath(path))
    index = {c: i for i, c in enumerate(CBIS_CLASSES)} | {str(i): i for i in range(len(CBIS_CLASSES))}
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read the CSV ({e})") from None
    if not {"image_path", "pathology"} <= set(header):
        raise UserError(f"{path}: needs the columns image_path and pathology (found {', '.join(header) or 'none'})")
    samples: list[Sample] = []
    for lineno, row in enumerate(rows, 2):
        label = (row["pathology"] or "").strip().upper().replace(" ", "_")
        if label not in index:
            raise UserError(f"{path}:{lineno}: pathology {row['pathology']!r} is not one of {', '.join(CBIS_CLASSES)}")
        samples.append((listed_image((row["image_path"] or "").strip(), base, f"{path}:{lineno}"), index[label]))
    return samples, list(CBIS_CLASSES)


def detect_layout(root: str) -> str:
    """'imagefolder' (has train/val/test folders), 'vfm' (label files), 'cbis' (train_*.csv / test_*.csv,
    or one such file) or 'flat' (class folders)."""
    if root and os.path.isfile(root) and root.endswith(".csv"):
        return "cbis"
    if not root or not os.path.isdir(root):
        raise UserError(f"--data_path {root!r} is not a folder; point it at your dataset (or use --demo)")
    # Root-level label files win: a VisionFM root also has a test/ folder of images.
    if any(os.path.isfile(os.path.join(root, n)) for n in VFM_MARKERS):
        return "vfm"
    if any(os.path.isdir(os.path.join(root, s)) for s in SPLITS):
        return "imagefolder"
    if vfm_datasets(root):
        return "vfm"
    if any(n.startswith("train_") and n.endswith(".csv") for n in os.listdir(root)):
        return "cbis"
    if _class_dirs(root):
        return "flat"
    raise UserError(f"--data_path {root}: no train/val/test folders, VisionFM label files, CBIS CSVs or class folders; "
                    "expected <root>/{train,val,test}/<class>/<image> or <root>/<dataset>/training_labels.txt")


def read_imagefolder_classes(split_root: str) -> list[str]:
    """Class folder names of an ImageFolder split (sorted), without listing images."""
    if not os.path.isdir(split_root):
        raise UserError(f"{split_root} is not a folder")
    return _class_dirs(split_root)


def normalize_split(split: str) -> str:
    """'train', 'val' or 'test' for a split name or an alias ('training', 'validation', ...)."""
    s = _SPLIT_ALIASES.get(split.lower(), split.lower())
    if s not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return s


read_image_folder = read_imagefolder  # the name main_few_shot.py uses


# ----------------------------------------------------------------------------------------------------
# Label-file lines, listed images, and the subject id that matches modalities
# ----------------------------------------------------------------------------------------------------

def sample_id(path: str, root: str | None = None) -> str:
    """The id that matches one subject's images across modality folders.

    Without `root`: the file stem (`.../training/00000012.png` -> `00000012`). With `root` (a modality
    folder such as `FundusClassificationMulti/`): the path below it without the extension, with `/`
    separators (`dataset_A/training/00000012`), which stays unique when several datasets reuse a stem."""
    if root is None:
        return os.path.splitext(os.path.basename(path))[0]
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return os.path.splitext(rel)[0].replace(os.sep, "/")


def label_lines(path: str):
    """(line number, stripped text) of the non-blank, non-`#` lines of a label file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read label file ({e})") from None
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield lineno, line


def listed_image(rel: str, base: str, where: str) -> str:
    """Resolve a listed image: absolute, relative to the label file's folder, or (VisionFM's forecasting
    README) relative to the working directory; a relative path that leaves the data root is refused."""
    if not rel:
        raise UserError(f"{where}: empty image path")
    if not os.path.isabs(rel):
        inside = os.path.normpath(os.path.join(base, rel))
        via_cwd = os.path.abspath(rel)
        if _escapes(rel, base) or (not os.path.isfile(inside) and os.path.isfile(via_cwd)
                                   and os.path.commonpath([via_cwd, os.path.normpath(base)]) != os.path.normpath(base)):
            raise UserError(f"{where}: listed image {rel!r} points outside the data root {base}; relative paths "
                            "must stay under the label file's folder")
    image = _resolve_listed(rel, base)
    if image is None:
        raise UserError(f"{where}: listed image {os.path.join(base, rel)} does not exist; fix the path "
                        f"(relative to {base}) or remove the line")
    return os.path.abspath(image)
