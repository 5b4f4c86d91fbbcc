"""Synthetic datasets in VisionFM's layouts (``random_data.py --task ...``), with learnable labels.

VisionFM's own generator writes noise; these images carry their labels visibly (marks described in
``util.synthetic_vfm_render``), so a decoder on a frozen encoder has something to learn. Every task writes
``--num`` images per split (``training`` and ``test``); file names are ``<index:08d>.png`` with the test
indices following the training ones, so a stem is unique within a dataset. Subjects of multi-modal
tasks share their file name (and labels) across the modality folders: that stem is the subject id.

Layouts under ``dst`` (``<ds>`` = ``dataset_A``):

* ``pretrain``: ``dst/<Modality>/<i>.png`` for Fundus, OCT, External, UltraSound, FFA, SiltLamp.
* ``single_cls``: ``dst/FundusClassification/<ds>/{training,test}/<i>.png`` + ``{training,test}_labels.txt``
  lines ``training/<i>.png;k``; class k = DR grade k = 3k-1..3k lesions (0: none).
* ``multi_cls``: ``dst/{FundusClassificationMulti,OCTClassificationMulti}/<ds>/...``, lines
  ``training/<i>.png;v1,...,v13`` in the order of ``MULTI_LABEL_CLASSES``: one-hot DR grade in cols 0-4,
  col 5 = 1 when the grade is not 0, cols 6-12 independent diseases (each with probability 0.25).
* ``metric_reg``: ``dst/{FundusRegression,ExternalRegression}/<ds>/...``, lines ``training/<i>.png;v1,...,v38``;
  a value left empty is missing (3 %); ``<ds>/target_names.txt`` names the 38 targets, one per line
  (VisionFM's label files carry no names and a header line would break its reader).
* ``forecasting``: ``dst/{training,test}/<i>.png`` + ``{training,test}_labels.txt`` lines
  ``training/<i>.png, label, days``: label 1 = progression within ``days``; its probability rises with the
  size of the pale optic cup and with the interval.
* ``segmentation``: ``dst/VesselSegmentation/<ds>/{training,test}/{images,labels}/<i>.png``; labels are
  L-mode lesion-type maps (0 background, 1 exudate, 2 haemorrhage).
* ``landmark``: ``dst/LandmarkDetection/<ds>/{training,test}/images/<i>.png`` + ``labels/<i>.npy``
  ``(H, W, 3)`` uint8 with one 1 per channel: optic disc, fovea, field-of-view centre.
"""
from __future__ import annotations

import io
import math
import os
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
from PIL import Image

from util.atomic import write_atomic
from util.synthetic_base import _check_seed, _check_size, image_seed
from util.synthetic_vfm_render import (DISEASES, MULTI_LABEL_CLASSES, dr_lesion_count, external_image, ffa_image,
                                       fundus_image, oct_image, ultrasound_image)

VFM_TASKS = ("pretrain", "single_cls", "multi_cls", "metric_reg", "forecasting", "segmentation", "landmark")
PRETRAIN_MODALITIES = ("Fundus", "OCT", "External", "UltraSound", "FFA", "SiltLamp")
SPLITS = ("training", "test")
DATASET = "dataset_A"
MISSING_RATE = 0.03
DISEASE_RATE = 0.25
TARGET_NAMES_FILE = "target_names.txt"

# 38 biomarkers: (name, mean, sd, weights on the standardised visible properties
# (fundus brightness, DR lesion count, sqrt lesion area, vessel density, sclera yellowness)).
# value = mean + sd * (w . f + sqrt(1 - |w|^2) * noise); names without weights are pure noise.
_VISIBLE = ("brightness", "lesion_count", "lesion_area", "vessel_density", "sclera_yellow")
BIOMARKERS: tuple[tuple[str, float, float, tuple[float, ...]], ...] = (
    ("HGB", 140, 15, (0.9, 0, 0, 0, 0)), ("HCT", 42, 4, (0.85, 0, 0, 0, 0)), ("RBC", 4.7, 0.5, (0.7, 0, 0, 0, 0)),
    ("GLU", 5.8, 1.5, (0, 0.85, 0, 0, 0)), ("HbA1c", 6.0, 1.0, (0, 0.75, 0.3, 0, 0)),
    ("TG", 1.6, 0.6, (0, 0, 0.7, 0, 0)), ("LDL", 3.0, 0.8, (0, 0.2, 0.7, 0, 0)), ("TC", 4.9, 1.0, (0, 0, 0.6, 0, 0)),
    ("AGE", 55, 12, (0, 0, 0, -0.8, 0)), ("SBP", 130, 15, (0, 0.3, 0, -0.6, 0)),
    ("TBIL", 12, 4, (0, 0, 0, 0, 0.9)), ("DBIL", 4, 1.5, (0, 0, 0, 0, 0.8)), ("DBP", 80, 10, (0, 0.2, 0, -0.4, 0)),
) + tuple((n, m, s, (0, 0, 0, 0, 0)) for n, m, s in (
    ("WBC", 6.5, 1.5), ("NEUT%", 58, 8), ("LYMPH%", 32, 7), ("MONO%", 6, 1.5), ("EOS%", 2.5, 1.2), ("BASO%", 0.5, 0.2),
    ("MCV", 90, 5), ("MCH", 30, 2), ("MCHC", 335, 10), ("RDW", 13, 1), ("PLT", 240, 50), ("MPV", 10, 1),
    ("PDW", 16, 1.5), ("ALT", 25, 10), ("AST", 24, 8), ("GGT", 30, 12), ("ALP", 75, 20), ("TP", 72, 5),
    ("ALB", 44, 3), ("UREA", 5.2, 1.3), ("CREA", 75, 15), ("UA", 330, 70), ("HDL", 1.3, 0.3), ("BMI", 24, 3.5),
    ("K", 4.1, 0.35)))
TARGET_NAMES = tuple(b[0] for b in BIOMARKERS)
assert len(BIOMARKERS) == 38


def _png(arr: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _put(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, data, fsync=False)


def _write_labels(path: str, lines: Sequence[str]) -> None:
    _put(path, ("\n".join(lines) + "\n").encode() if lines else b"")


def _subjects(num: int) -> List[tuple[str, int]]:
    """(split, global index) of every subject: training 0..num-1, test num..2num-1."""
    return [(split, j * num + i) for j, split in enumerate(SPLITS) for i in range(num)]


def _rng(seed: int, task: str, index: int) -> tuple[int, np.random.Generator]:
    s = image_seed(seed, task, index)
    return s, np.random.default_rng([s, 1])


def _name(index: int) -> str:
    return f"{index:08d}.png"


def multi_label_row(grade: int, diseases: Sequence[str]) -> List[int]:
    """13-column row of VisionFM's multi-label scheme for a DR grade (0-4) and a set of other diseases."""
    row = [0] * len(MULTI_LABEL_CLASSES)
    row[int(grade)] = 1
    row[5] = int(grade != 0)
    for d in diseases:
        row[MULTI_LABEL_CLASSES.index(d)] = 1
    return row


def _pretrain(dst: str, num: int, size: int, seed: int, summary: Dict[str, Any]) -> None:
    makers: Dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
        "Fundus": lambda s, r: fundus_image(s, size, int(r.integers(0, 7)))[0],
        "OCT": lambda s, r: oct_image(s, size, int(r.integers(0, 5))),
        "External": lambda s, r: external_image(s, size, r.normal(0, 0.5), max(0.0, r.normal(0, 0.5)),
                                                max(0.0, r.normal(0, 0.5))),
        "UltraSound": lambda s, r: ultrasound_image(s, size, int(r.integers(0, 4))),
        "FFA": lambda s, r: ffa_image(s, size, int(r.integers(0, 7))),
        "SiltLamp": lambda s, r: external_image(s, size, cataract=float(r.random() < 0.3), slit=True),
    }
    for modality, make in makers.items():
        for i in range(num):
            s, r = _rng(seed, f"pretrain/{modality}", i)
            _put(os.path.join(dst, modality, _name(i)), _png(make(s, r)))
        summary["folders"][modality] = num


def _single_cls(dst: str, num: int, size: int, seed: int, summary: Dict[str, Any], num_classes: int) -> None:
    ds = os.path.join(dst, "FundusClassification", DATASET)
    lines: Dict[str, List[str]] = {s: [] for s in SPLITS}
    for split, i in _subjects(num):
        s, r = _rng(seed, "single_cls", i)
        k = int(r.integers(0, num_classes))
        img, _ = fundus_image(s, size, dr_lesion_count(r, k))
        _put(os.path.join(ds, split, _name(i)), _png(img))
        lines[split].append(f"{split}/{_name(i)};{k}")
    for split in SPLITS:
        _write_labels(os.path.join(ds, f"{split}_labels.txt"), lines[split])
    summary["folders"]["FundusClassification"] = {s: len(v) for s, v in lines.items()}
    summary["classes"] = [f"DR-{k}" if k else "Healthy" for k in range(num_classes)]


def _multi_cls(dst: str, num: int, size: int, seed: int, summary: Dict[str, Any]) -> None:
    roots = {m: os.path.join(dst, f"{m}ClassificationMulti", DATASET) for m in ("Fundus", "OCT")}
    lines: Dict[str, List[str]] = {s: [] for s in SPLITS}
    for split, i in _subjects(num):
        s, r = _rng(seed, "multi_cls", i)
        grade = int(r.integers(0, 5))
        diseases = [d for d in DISEASES if r.random() < DISEASE_RATE]
        marks = {d: float(r.uniform(0.6, 1.0)) for d in diseases}
        fundus, _ = fundus_image(s, size, dr_lesion_count(r, grade), marks)
        _put(os.path.join(roots["Fundus"], split, _name(i)), _png(fundus))
        _put(os.path.join(roots["OCT"], split, _name(i)), _png(oct_image(s, size, grade, marks)))
        lines[split].append(f"{split}/{_name(i)};{','.join(map(str, multi_label_row(grade, diseases)))}")
    for root in roots.values():
        for split in SPLITS:
            _write_labels(os.path.join(root, f"{split}_labels.txt"), lines[split])
    summary["folders"].update({f"{m}ClassificationMulti": {s: len(v) for s, v in lines.items()} for m in roots})
    summary["classes"] = list(MULTI_LABEL_CLASSES)


def _biomarkers(rng: np.random.Generator, f: np.ndarray) -> List[str]:
    fields = []
    for name, mean, sd, w in BIOMARKERS:
        w_ = np.asarray(w, np.float64)
        v = mean + sd * (float(w_ @ f) + math.sqrt(max(0.0, 1.0 - float(w_ @ w_))) * rng.standard_normal())
        v = max(v, 0.05 * mean)  # lab values are positive
        fields.append("" if rng.random() < MISSING_RATE else f"{v:.4g}")
    return fields


def _metric_reg(dst: str, num: int, size: int, seed: int, summary: Dict[str, Any]) -> None:
    roots = {m: os.path.join(dst, f"{m}Regression", DATASET) for m in ("Fundus", "External")}
    lines: Dict[str, List[str]] = {s: [] for s in SPLITS}
    for split, i in _subjects(num):
        s, r = _rng(seed, "metric_reg", i)
        z_b, z_y = float(np.clip(r.standard_normal(), -2.5, 2.5)), float(np.clip(r.standard_normal(), -2.5, 2.5))
        n = int(np.clip(r.poisson(2.5), 0, 9))
        fundus, facts = fundus_image(s, size, n, brightness=1.0 + 0.15 * z_b)
        external = external_image(s, size, pallor=0.35 * z_b, yellow=(z_y + 2.5) / 2.5,
                                  redness=float(r.uniform(0, 0.5)))
        # standardised visible properties (means and spreads measured on the generator)
        f = np.array([z_b, (n - 2.5) / 1.6, (math.sqrt(facts["lesion_area"]) - 0.075) / 0.05,
                      (facts["vessel_density"] - 0.082) / 0.0066, z_y])
        _put(os.path.join(roots["Fundus"], split, _name(i)), _png(fundus))
        _put(os.path.join(roots["External"], split, _name(i)), _png(external))
        lines[split].append(f"{split}/{_name(i)};{','.join(_biomarkers(r, np.clip(f, -3, 3)))}")
    for root in roots.values():
        for split in SPLITS:
            _write_labels(os.path.join(root, f"{split}_labels.txt"), lines[split])
        _put(os.path.join(root, TARGET_NAMES_FILE), ("\n".join(TARGET_NAMES) + "\n").encode())
    summary["folders"].update({f"{m}Regression": {s: len(v) for s, v in lines.items()} for m in roots})
    summary["target_names"] = list(TARGET_NAMES)
    summary["missing_rate"] = MISSING_RATE


def progression_probability(severity: float, days: float) -> float:
    """P(progression within `days`) for a cup severity in [0, 1]: logistic in severity and interval."""
    return 1.0 / (1.0 + math.exp(-(-4.0 + 5.0 * severity + 2.5 * days / 1800.0)))


def _forecasting(dst: str, num: int, size: int, seed: int, summary: Dict[str, Any]) -> None:
    lines: Dict[str, List[str]] = {s: [] for s in SPLITS}
    for split, i in _subjects(num):
        s, r = _rng(seed, "forecasting", i)
        sev = float(r.random())
        days = int(r.integers(30, 1801))
        label = int(r.random() < progression_probability(sev, days))
        img, _ = fundus_image(s, size, 0, {"Glaucoma": sev} if sev > 0.05 else None)
        _put(os.path.join(dst, split, _name(i)), _png(img))
        lines[split].append(f"{split}/{_name(i)}, {label}, {days}")
    for split in SPLITS:
        _write_labels(os.path.join(dst, f"{split}_labels.txt"), lines[split])
    summary["folders"]["."] = {s: len(v) for s, v in lines.items()}
    summary["positives"] = {s: sum(int(l.split(", ")[1]) for l in v) for s, v in lines.items()}


def _segmentation(dst: str, num: int, size: int, seed: int, summary: Dict[str, Any]) -> None:
    ds = os.path.join(dst, "VesselSegmentation", DATASET)
    for split, i in _subjects(num):
        s, r = _rng(seed, "segmentation", i)
        img, facts = fundus_image(s, size, int(r.integers(0, 7)))
        _put(os.path.join(ds, split, "images", _name(i)), _png(img))
        _put(os.path.join(ds, split, "labels", _name(i)), _png(facts["type_mask"].astype(np.uint8), "L"))
    summary["folders"]["VesselSegmentation"] = {s: num for s in SPLITS}
    summary["classes"] = ["background", "exudate", "haemorrhage"]


def _landmark(dst: str, num: int, size: int, seed: int, summary: Dict[str, Any]) -> None:
    ds = os.path.join(dst, "LandmarkDetection", DATASET)
    for split, i in _subjects(num):
        s, r = _rng(seed, "landmark", i)
        img, facts = fundus_image(s, size, int(r.integers(0, 4)))
        heat = np.zeros((size, size, 3), np.uint8)
        for c, (x, y) in enumerate((facts["optic_disc"], facts["fovea"], facts["fov_centre"])):
            heat[int(np.clip(round(y), 0, size - 1)), int(np.clip(round(x), 0, size - 1)), c] = 1
        buf = io.BytesIO()
        np.save(buf, heat)
        _put(os.path.join(ds, split, "images", _name(i)), _png(img))
        _put(os.path.join(ds, split, "labels", _name(i)[:-4] + ".npy"), buf.getvalue())
    summary["folders"]["LandmarkDetection"] = {s: num for s in SPLITS}
    summary["landmarks"] = ["optic_disc", "fovea", "fov_centre"]


def write_vfm_task(dst: str, task: str, num: int = 500, img_size: int = 512, seed: int = 0,
                   num_classes: int = 5) -> Dict[str, Any]:
    """Write the synthetic dataset of one VisionFM task under ``dst`` (layouts in the module docstring);
    the same arguments give byte-identical files. Returns a summary (folders, counts, class names)."""
    if task not in VFM_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(VFM_TASKS)}")
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num <= 0:
        raise ValueError(f"--num must be a positive number of images per split, got {num!r}")
    _check_size(img_size)
    _check_seed(seed)
    if task == "single_cls" and not 2 <= num_classes <= 8:
        raise ValueError(f"--num_classes must be in [2, 8] for single_cls, got {num_classes}")
    dst = os.fspath(dst)
    os.makedirs(dst, exist_ok=True)
    summary: Dict[str, Any] = {"root": dst, "task": task, "num": int(num), "img_size": int(img_size),
                               "seed": int(seed), "folders": {}}
    if task == "single_cls":
        _single_cls(dst, num, img_size, seed, summary, num_classes)
    else:
        {"pretrain": _pretrain, "multi_cls": _multi_cls, "metric_reg": _metric_reg, "forecasting": _forecasting,
         "segmentation": _segmentation, "landmark": _landmark}[task](dst, num, img_size, seed, summary)
    return summary
