"""Procedural fundus / ultrasound images with real, learnable structure.

The images are cheap stand-ins for medical data so that tests and smoke runs
can check that a model *learns* (not only that it runs), without shipping any
real patient data. Everything is numpy + Pillow, vectorised, and deterministic
by seed.

Two image kinds:

* ``fundus``: colour retina photo look-alike: circular field of view on black,
  orange/red retina with radial falloff, bright optic disc, darker macula and
  fovea, a seeded branching vessel tree, and optional lesions (yellow hard
  exudates, dark red haemorrhages, whitish cotton-wool spots).
* ``ultrasound``: B-mode look-alike: sector field of view, correlated
  Rayleigh speckle, wavy tissue layers with bright fascia lines, and optional
  hypo-/anechoic nodules with posterior enhancement or acoustic shadowing.

Label rule (single-label classification, ``num_classes`` = C, see
:func:`lesion_count_range` / :func:`label_for_lesion_count`):

* class 0 <=> no lesion;
* class k >= 1 is *drawn* with ``3k-1`` or ``3k`` lesions (k=1: 2-3, k=2: 5-6,
  k=3: 8-9, ...), so neighbouring classes are at least two lesions apart;
* any count is *labelled* ``min(C-1, (n+1)//3)`` (so 1 lesion -> class 0 and
  with C=2 every count >= 2 is class 1).

The background (anatomy, vessels, speckle, noise) and the lesions come from two
independent random streams of one seed, so ``fundus_sample(s, n_lesions=0)``
and ``fundus_sample(s, n_lesions=3)`` show the same eye, differing only by the
lesions: handy for counterfactual checks.

Regression ``target`` (both kinds): lesion area fraction, i.e. the number of
lesion-mask pixels divided by the number of field-of-view pixels (0.0 when
there is no lesion).

This module is the one to import. It writes datasets in every supported
folder layout (:func:`write_dataset`); the renderers live in
``util.synthetic_render`` and the shared record, label rule and drawing
helpers in ``util.synthetic_base``.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
from PIL import Image

from util.atomic import write_atomic
from util.synthetic_base import (FUNDUS_LESION_TYPES, KINDS, MAX_NUM_CLASSES, MIN_SIZE, ULTRASOUND_LESION_TYPES,
                                  SyntheticSample, _check_kind, _check_num_classes, _check_seed, _check_size,
                                  class_names, image_seed, label_for_lesion_count, lesion_count_range,
                                  lesion_types_for)
from util.synthetic_render import _sample_n, fundus_sample, multilabel_sample, preview_grid, sample, ultrasound_sample

__all__ = [
    "KINDS",
    "LAYOUTS",
    "FUNDUS_LESION_TYPES",
    "ULTRASOUND_LESION_TYPES",
    "MIN_SIZE",
    "MAX_NUM_CLASSES",
    "SyntheticSample",
    "lesion_types_for",
    "lesion_count_range",
    "label_for_lesion_count",
    "class_names",
    "image_seed",
    "fundus_sample",
    "ultrasound_sample",
    "sample",
    "multilabel_sample",
    "write_dataset",
    "preview_grid",
]

LAYOUTS: Tuple[str, ...] = ("imagefolder", "flat", "vfm", "segmentation", "landmark")


# ----------------------------------------------------------------------------
# Writing datasets
# ----------------------------------------------------------------------------

_DEFAULT_SPLITS: Dict[str, float] = {"train": 0.6, "val": 0.2, "test": 0.2}
_VFM_SPLIT_NAMES = {"train": "training", "training": "training"}


def _split_counts(n_per_class: Optional[int], splits: Mapping[str, Union[int, float]]) -> Dict[str, int]:
    """Per-class image count of each split.

    int values are absolute per-class counts; float values are fractions of
    ``n_per_class`` (largest-remainder rounding, so the fractions of one
    ``n_per_class`` never lose or gain an image).
    """
    if not splits:
        raise ValueError("splits must name at least one split")
    counts: Dict[str, int] = {}
    fracs: Dict[str, float] = {}
    for name, v in splits.items():
        if not isinstance(name, str) or not name or os.sep in name or name in (".", ".."):
            raise ValueError(f"bad split name {name!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or v < 0:
            raise ValueError(f"split {name!r}: value must be a non-negative int (count) or float (fraction), got {v!r}")
        if isinstance(v, (int, np.integer)):
            counts[name] = int(v)
        else:
            fracs[name] = float(v)
    if fracs:
        if n_per_class is None or isinstance(n_per_class, bool) or not isinstance(n_per_class, (int, np.integer)) or n_per_class < 0:
            raise ValueError(f"n_per_class must be a non-negative int when splits use fractions, got {n_per_class!r}")
        total = sum(fracs.values())
        if total <= 0 or total > 1.0 + 1e-9:
            raise ValueError(f"split fractions must sum to a value in (0, 1], got {total}")
        exact = {k: f * n_per_class for k, f in fracs.items()}
        floor = {k: int(math.floor(e)) for k, e in exact.items()}
        left = int(round(total * n_per_class)) - sum(floor.values())
        for k in sorted(exact, key=lambda k: (floor[k] - exact[k], list(fracs).index(k)))[: max(0, left)]:
            floor[k] += 1
        counts.update(floor)
    return {k: counts[k] for k in splits}


def _encode(im: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        # Fixed settings so the bytes only depend on the pixels.
        im.save(buf, format="PNG", compress_level=6)
    else:
        im.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _image_pil(s: SyntheticSample, bit_depth: int, channels: int) -> Image.Image:
    if bit_depth == 16:
        return s.to_pil("I;16")
    return s.to_pil("L" if channels == 1 else "RGB")


def write_dataset(
    root: Union[str, os.PathLike],
    kind: str = "fundus",
    layout: str = "imagefolder",
    num_classes: int = 2,
    n_per_class: Optional[int] = 20,
    splits: Optional[Mapping[str, Union[int, float]]] = None,
    size: int = 64,
    seed: int = 0,
    image_format: str = "png",
    multilabel: bool = False,
    bit_depth: int = 8,
    channels: int = 3,
    dataset_name: Optional[str] = None,
) -> Dict[str, Any]:
    """Write a synthetic dataset under ``root`` and return a summary dict.

    Layouts (``<i>`` is a zero-padded index, e.g. ``00007``):

    * ``imagefolder``: ``root/<split>/class_<k>/<i>.png``; sorted class folder
      order equals the label index (torchvision ``ImageFolder``).
    * ``flat``: ``root/<dataset_name or 'images'>/<i>.png``: unlabelled
      pretraining tree; every split's images go into the one folder.
    * ``vfm`` (VisionFM classification): ``root/<dataset_name>/<split>/<i>.png``
      and ``root/<dataset_name>/<split>_labels.txt`` with lines
      ``<split>/<i>.png;k`` or, with ``multilabel=True``, multi-hot
      ``<split>/<i>.png;0,1,0`` (one column per lesion type, ``num_classes``
      columns, at most 3). Split ``train`` is written as ``training``.
    * ``segmentation`` (VisionFM): ``root/<dataset_name>/<split>/images/<i>.png``
      and ``.../labels/<i>.png`` (L-mode, values ``0..C-1``): with C=2 the
      binary lesion mask; with C>2 only the first C-1 lesion types are drawn and
      type ``t`` is value ``t + 1`` (so C <= 4).
    * ``landmark`` (VisionFM): ``.../images/<i>.png`` and ``.../labels/<i>.npy``
      holding an ``(H, W, 2)`` uint8 array with a single 1 at each landmark.

    Images per split: ``num_classes * per_class_count``; for ``imagefolder``,
    ``flat`` and single-label ``vfm`` that is ``per_class_count`` images of each
    class. ``splits`` maps split name to a per-class count (int) or a fraction of
    ``n_per_class`` (float); default ``{'train': .6, 'val': .2, 'test': .2}``.

    Each image's seed is :func:`image_seed` ``(seed, split, index, label)``, so
    the same arguments give byte-identical files regardless of write order.
    Files are written to a temporary name in the target folder and moved into
    place with ``os.replace``; files of the same name are overwritten, other
    files are left alone.

    Args:
        bit_depth: 8, or 16 for 16-bit grayscale PNG images (``I;16``).
        channels: 3 (RGB) or 1 (8-bit grayscale ``L``); ignored for 16-bit.
        dataset_name: sub-folder for ``vfm``/``segmentation``/``landmark``
            (default ``dataset_A``) and ``flat`` (default ``images``).
    """
    _check_kind(kind)
    _check_size(size)
    _check_num_classes(num_classes)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    image_format = str(image_format).lower().lstrip(".")
    if image_format == "jpeg":
        image_format = "jpg"
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    if bit_depth == 16 and image_format != "png":
        raise ValueError("bit_depth=16 needs image_format='png'")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    _check_seed(seed)
    n_types = len(lesion_types_for(kind))
    if multilabel and layout != "vfm":
        raise ValueError("multilabel=True is only meaningful with layout='vfm'")
    if multilabel and num_classes > n_types:
        raise ValueError(f"multilabel {kind} has {n_types} lesion types, so num_classes must be <= {n_types}")
    if layout == "segmentation" and num_classes > n_types + 1:
        raise ValueError(f"segmentation of {kind} supports num_classes <= {n_types + 1} (background + lesion types)")
    if dataset_name is not None and (not dataset_name or os.sep in dataset_name or dataset_name in (".", "..")):
        raise ValueError(f"bad dataset_name {dataset_name!r}")

    counts = _split_counts(n_per_class, _DEFAULT_SPLITS if splits is None else splits)
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    ext = image_format
    names = class_names(num_classes)
    all_types = lesion_types_for(kind)
    ds = dataset_name or ("images" if layout == "flat" else "dataset_A")
    total = sum(counts.values()) * num_classes
    width = max(5, len(str(max(total - 1, 0))))

    summary: Dict[str, Any] = {
        "root": root, "kind": kind, "layout": layout, "num_classes": num_classes, "size": size, "seed": int(seed),
        "image_format": ext, "bit_depth": bit_depth, "channels": 1 if bit_depth == 16 else channels,
        "multilabel": bool(multilabel), "class_names": names if not multilabel else list(all_types[:num_classes]),
        "label_rule": "class 0: no lesion; class k>=1: 3k-1..3k lesions; label(n) = min(C-1, (n+1)//3)",
        "counts": {}, "files": {}, "label_files": {}, "num_images": 0,
    }
    flat_index = 0
    for split, per_class in counts.items():
        split_dir_name = _VFM_SPLIT_NAMES.get(split, split) if layout in ("vfm", "segmentation", "landmark") else split
        files: List[str] = []
        label_lines: List[str] = []
        class_count = {n: 0 for n in summary["class_names"]}
        for k in range(num_classes):
            for j in range(per_class):
                idx = k * per_class + j  # index within the split
                s_seed = image_seed(seed, split, j, k)
                if multilabel:
                    bits = np.random.default_rng(s_seed ^ 0x5EED).integers(0, 2, size=num_classes)
                    s = multilabel_sample(kind, s_seed, bits.tolist(), size)
                elif layout == "segmentation" and num_classes > 2:
                    lo, hi = lesion_count_range(k, num_classes)
                    n = int(np.random.default_rng(s_seed ^ 0x5EED).integers(max(lo, 1) if k else 0, max(hi, 1) + 1))
                    s = _sample_n(kind, s_seed, size, n, num_classes, all_types[: num_classes - 1])
                else:
                    s = sample(kind, s_seed, k, size, num_classes)
                im = _image_pil(s, bit_depth, channels)
                fname = f"{idx:0{width}d}.{ext}"
                if layout == "imagefolder":
                    rel = os.path.join(split, names[k], fname)
                elif layout == "flat":
                    rel = os.path.join(ds, f"{flat_index:0{width}d}.{ext}")
                    flat_index += 1
                elif layout == "vfm":
                    rel = os.path.join(ds, split_dir_name, fname)
                else:
                    rel = os.path.join(ds, split_dir_name, "images", fname)
                path = os.path.join(root, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_atomic(path, _encode(im, ext), fsync=False)
                files.append(rel)
                if layout == "vfm":
                    lab = ",".join(str(int(b)) for b in s.multi_hot[:num_classes]) if multilabel else str(s.label)
                    label_lines.append(f"{split_dir_name}/{fname};{lab}")
                    if multilabel:
                        for t in range(num_classes):
                            class_count[all_types[t]] += int(s.multi_hot[t])
                    else:
                        class_count[names[s.label]] += 1
                else:
                    class_count[names[s.label]] += 1
                if layout == "segmentation":
                    lab_map = s.mask if num_classes == 2 else s.type_mask
                    lpath = os.path.join(root, ds, split_dir_name, "labels", f"{idx:0{width}d}.png")
                    os.makedirs(os.path.dirname(lpath), exist_ok=True)
                    write_atomic(lpath, _encode(Image.fromarray(lab_map.astype(np.uint8), "L"), "png"), fsync=False)
                elif layout == "landmark":
                    heat = np.zeros((size, size, len(s.landmarks)), np.uint8)
                    for c, (lx, ly) in enumerate(s.landmarks):
                        heat[int(round(min(max(ly, 0), size - 1))), int(round(min(max(lx, 0), size - 1))), c] = 1
                    lpath = os.path.join(root, ds, split_dir_name, "labels", f"{idx:0{width}d}.npy")
                    os.makedirs(os.path.dirname(lpath), exist_ok=True)
                    buf = io.BytesIO()
                    np.save(buf, heat)
                    write_atomic(lpath, buf.getvalue(), fsync=False)
        if layout == "vfm":
            lf = os.path.join(root, ds, f"{split_dir_name}_labels.txt")
            os.makedirs(os.path.dirname(lf), exist_ok=True)
            write_atomic(lf, ("\n".join(label_lines) + "\n").encode() if label_lines else b"", fsync=False)
            summary["label_files"][split] = os.path.relpath(lf, root)
        summary["counts"][split] = class_count
        summary["files"][split] = files
        summary["num_images"] += len(files)
    return summary
