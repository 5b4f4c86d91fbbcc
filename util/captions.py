"""Image-caption data for contrastive image-text pretraining (SLIP, CLIP, SimCLR, MedSLIP).

Readers for every caption format the SLIP and MedSLIP seeds use, each returning `CaptionRecord`s
(image path, candidate captions, `file:line` of the record):

* `roco`: a text file, one pair per line `image_name<whitespace>caption` (split at the first
  whitespace); the image is `root/images/<image_name>.jpg` (a name with an image extension is kept).
* `coco`: COCO captions JSON (`annotations: [{image_id, caption}]`); images `root/<split>2017/<id:012d>.jpg`,
  the split taken from the file name (`captions_val2017.json` -> `val2017`, else `train2017`).
* `cc3m` / `cc12m`: a NumPy array of records (`image_id` resp. `image_name`, and `captions`), image
  `root/<image_id or image_name>`. Only arrays that load without pickle are read (structured arrays);
  SLIP's arrays of Python dicts need pickle, which is refused with a conversion hint.
* `redcaps`: the merged RedCaps JSON (`annotations: [{image_id, subreddit, caption}]`),
  image `root/<subreddit>/<image_id>.jpg`.
* `csv`: a CSV with a header (image column `image`/`image_path`/`path`/`filepath`/`file`, caption column
  `caption`/`text`/`title`/`captions`) or JSONL with the same keys (`captions` may be a list);
  relative paths are under `root`.
* `yfcc15m`: its metadata is a pickle (refused, with a conversion hint).

`CaptionDataset` reads each image through `util.data.load_image` and applies SLIP's transforms; an
unreadable image or an empty caption follows `--bad_image` (skip: a `SkippedSample` marker that the
loader drops, counts and lists; error: one line naming the file).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from typing import Any, Callable, NamedTuple, Sequence

import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision import transforms as T

from util.cli import UserError
from util.data import load_image, sample_seed
from util.skipping import read_or_skip, sample_failure, SkippedSample
from util.image_io import IMG_EXTENSIONS

logger = logging.getLogger("medfound")

CAPTION_DATASETS = ("yfcc15m", "cc3m", "cc12m", "coco", "redcaps", "roco", "csv")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_IMAGE_KEYS = ("image", "image_path", "path", "filepath", "file", "image_name", "filename")
_CAPTION_KEYS = ("caption", "text", "title", "captions")
_CONVERT_HINT = ("convert it to a CSV with columns image,caption (or JSONL with the same keys) and pass "
                 "--dataset csv --metadata FILE")


class CaptionRecord(NamedTuple):
    path: str
    captions: tuple[str, ...]
    where: str  # "file:line" (or "file:#index") of the record, for messages


def _join(root: str, name: str) -> str:
    return name if os.path.isabs(name) else os.path.join(root, name)


def _empty_caption(rec: CaptionRecord) -> bool:
    return not any(c.strip() for c in rec.captions)


# ------------------------------------------------------------------------------------------ readers
def read_roco(metadata: str, root: str) -> list[CaptionRecord]:
    """MedSLIP's ROCO lines; blank lines and `#` comments are skipped."""
    out = []
    with open(metadata, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split(None, 1)
            name, caption = parts[0], (parts[1] if len(parts) > 1 else "")
            if not name.lower().endswith(IMG_EXTENSIONS):
                name += ".jpg"
            out.append(CaptionRecord(os.path.join(root, "images", name), (caption,), f"{metadata}:{n}"))
    return out


def _load_json(metadata: str) -> Any:
    with open(metadata, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{metadata}:{e.lineno}: not valid JSON ({e.msg})") from None


def _annotations(metadata: str, data: Any, keys: Sequence[str]) -> list[dict]:
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise UserError(f"{metadata}: expected a JSON object with an 'annotations' list")
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or any(k not in a for k in keys):
            raise UserError(f"{metadata}: annotation #{i} lacks {'/'.join(keys)} (has {sorted(a) if isinstance(a, dict) else type(a).__name__})")
    return anns


def read_coco(metadata: str, root: str) -> list[CaptionRecord]:
    """COCO captions: one record per image with all its captions."""
    anns = _annotations(metadata, _load_json(metadata), ("image_id", "caption"))
    m = re.search(r"(train|val|test)(\d{4})", os.path.basename(metadata))
    folder = f"{m.group(1)}{m.group(2)}" if m else "train2017"
    by_image: dict[Any, list[str]] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(str(a["caption"]))
    return [CaptionRecord(os.path.join(root, folder, f"{int(k):012d}.jpg"), tuple(v), f"{metadata}:#image_id={k}")
            for k, v in by_image.items()]


def read_redcaps(metadata: str, root: str) -> list[CaptionRecord]:
    anns = _annotations(metadata, _load_json(metadata), ("image_id", "subreddit", "caption"))
    return [CaptionRecord(os.path.join(root, str(a["subreddit"]), f"{a['image_id']}.jpg"), (str(a["caption"]),),
                          f"{metadata}:#{i}") for i, a in enumerate(anns)]


def read_cc(metadata: str, root: str, kind: str) -> list[CaptionRecord]:
    """CC3M (`image_id`) / CC12M (`image_name`) records from a structured .npy array (no pickle)."""
    import numpy as np
    try:
        arr = np.load(metadata, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise UserError(f"{metadata}: this array holds Python objects (dicts), which only load through pickle; "
                            f"medfound does not unpickle data files; {_CONVERT_HINT}") from None
        raise UserError(f"{metadata}: not a NumPy .npy array ({e})") from None
    names = arr.dtype.names or ()
    key = "image_name" if kind == "cc12m" and "image_name" in names else "image_id"
    cap = next((k for k in ("captions", "caption") if k in names), None)
    if key not in names or cap is None:
        raise UserError(f"{metadata}: expected a structured array with fields {key} and captions, got fields "
                        f"{list(names) or arr.dtype}; {_CONVERT_HINT}")
    out = []
    for i, row in enumerate(arr.reshape(-1)):
        caps = row[cap]
        caps = tuple(str(c) for c in caps.reshape(-1)) if hasattr(caps, "reshape") and caps.ndim else (str(caps),)
        out.append(CaptionRecord(_join(root, str(row[key])), caps, f"{metadata}:#{i}"))
    return out


def _pick(row: dict, keys: Sequence[str]) -> str | None:
    return next((k for k in keys if k in row), None)


def read_table(metadata: str, root: str) -> list[CaptionRecord]:
    """CSV with a header, or JSONL (`.jsonl` / `.json` lines): image path + caption(s)."""
    out = []
    if metadata.lower().endswith((".jsonl", ".ndjson")):
        with open(metadata, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{metadata}:{n}: not a JSON object ({e.msg})") from None
                img = _pick(row, _IMAGE_KEYS) if isinstance(row, dict) else None
                cap = _pick(row, _CAPTION_KEYS) if isinstance(row, dict) else None
                if img is None or cap is None:
                    raise UserError(f"{metadata}:{n}: needs an image key ({'/'.join(_IMAGE_KEYS[:4])}) and a caption "
                                    f"key ({'/'.join(_CAPTION_KEYS)})")
                caps = row[cap] if isinstance(row[cap], list) else [row[cap]]
                out.append(CaptionRecord(_join(root, str(row[img])), tuple("" if c is None else str(c) for c in caps),
                                         f"{metadata}:{n}"))
        return out
    with open(metadata, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        img, cap = _pick(dict.fromkeys(fields), _IMAGE_KEYS), _pick(dict.fromkeys(fields), _CAPTION_KEYS)
        if img is None or cap is None:
            raise UserError(f"{metadata}:1: header {fields} needs an image column ({'/'.join(_IMAGE_KEYS[:4])}) and a "
                            f"caption column ({'/'.join(_CAPTION_KEYS)})")
        for row in reader:
            n = reader.line_num
            if row.get(img) in (None, "") or None in row:
                raise UserError(f"{metadata}:{n}: expected {len(fields)} columns ({', '.join(fields)}) with an image "
                                f"path, got {[v for v in row.values() if v is not None]}")
            out.append(CaptionRecord(_join(root, row[img]), (row.get(cap) or "",), f"{metadata}:{n}"))
    return out


def read_captions(dataset: str, root: str, metadata: str, bad_image: str = "error") -> list[CaptionRecord]:
    """The records of `--dataset` from `--metadata` under `--root`. An empty caption is an error naming its
    `file:line` under `bad_image='error'`; under 'skip' it stays in the list (the dataset skips it)."""
    if dataset not in CAPTION_DATASETS:
        raise UserError(f"--dataset {dataset}: choose one of {', '.join(CAPTION_DATASETS)}")
    if not metadata:
        raise UserError(f"--dataset {dataset} needs --metadata FILE (the captions)")
    if not os.path.isfile(metadata):
        raise UserError(f"--metadata {metadata}: no such file")
    if dataset == "yfcc15m":
        raise UserError(f"--dataset yfcc15m: its metadata {metadata} is a pickle, which medfound does not load "
                        f"(unpickling runs code); {_CONVERT_HINT}")
    readers: dict[str, Callable[[], list[CaptionRecord]]] = {
        "roco": lambda: read_roco(metadata, root), "coco": lambda: read_coco(metadata, root),
        "redcaps": lambda: read_redcaps(metadata, root), "csv": lambda: read_table(metadata, root),
        "cc3m": lambda: read_cc(metadata, root, "cc3m"), "cc12m": lambda: read_cc(metadata, root, "cc12m")}
    try:
        records = readers[dataset]()
    except UnicodeDecodeError as e:
        raise UserError(f"--metadata {metadata}: not a text file of the {dataset} format ({e.reason})") from None
    if not records:
        raise UserError(f"--metadata {metadata}: no image-caption pairs found")
    empty = [r for r in records if _empty_caption(r)]
    if empty:
        if bad_image != "skip":
            raise UserError(f"{empty[0].where}: empty caption for {empty[0].path} ({len(empty)} in all); fix the file, "
                            f"or pass --bad_image skip to leave such pairs out")
        logger.warning("%d pair(s) with an empty caption will be skipped, e.g. %s", len(empty), empty[0].where)
    logger.info("caption data: %d pairs from %s (%s)", len(records), metadata, dataset)
    return records


# --------------------------------------------------------------------------------------- transforms
class RandomGaussianBlur:
    """SLIP's blur: a Gaussian of radius drawn uniformly from `sigma` (PIL), drawn from torch's RNG."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        s = self.sigma[0] + float(torch.rand(())) * (self.sigma[1] - self.sigma[0])
        return img.filter(ImageFilter.GaussianBlur(radius=s))


def clip_transform(size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Any:
    """SLIP's image-text view: RandomResizedCrop(size, scale 0.5-1), no flip, normalised."""
    return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0)), T.ToTensor(), T.Normalize(mean, std)])


def ssl_transform(size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Any:
    """SLIP's SimCLR view: RandomResizedCrop(scale 0.08-1), colour jitter (p .8), grayscale (p .2), blur
    (p .5), horizontal flip, normalised."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Any:
    """SLIP's zero-shot view: Resize(size) -> CenterCrop(size), normalised."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(mean, std)])


# ------------------------------------------------------------------------------------------ dataset
class CaptionDataset(Dataset):
    """`{image, text, index}` (+ `aug1`, `aug2` when `ssl_views`) per record.

    `tokenize(list[str]) -> (LongTensor [n, context], number of captions cut to fit)`; each sample says
    whether its caption was cut (`cut`, 0/1) so the run can count them. A record with several captions gets one of them at
    random. All randomness (caption choice, crops, jitter) is drawn from RNGs seeded by (seed, epoch,
    index), so a sample is the same whatever the worker count, world size or resume point.
    """

    def __init__(self, records: Sequence[CaptionRecord], tokenize: Callable[[list[str]], tuple[torch.Tensor, int]],
                 size: int = 224, ssl_views: bool = True, clip_view: bool = True, seed: int = 0,
                 bad_image: str | None = "error", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, train: bool = True) -> None:
        if bad_image not in (None, "error", "skip"):
            raise UserError(f"--bad_image must be 'error' or 'skip', got {bad_image!r}")
        self.records = list(records)
        self.tokenize = tokenize
        self.seed, self.bad_image = seed, bad_image
        self.clip_view, self.ssl_views = clip_view, ssl_views
        self.clip_tf = clip_transform(size, mean, std) if train else eval_transform(size, mean, std)
        self.ssl_tf = ssl_transform(size, mean, std)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | SkippedSample:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rec = self.records[index]
        if _empty_caption(rec):  # read_captions let it through only under --bad_image skip
            return SkippedSample(index, rec.path, f"empty caption ({rec.where})")
        try:
            img = read_or_skip(lambda: load_image(rec.path), index, rec.path, self.bad_image)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - one line naming the file
            raise sample_failure("loading", rec.path, e, "please report it with this image") from e
        if isinstance(img, SkippedSample):
            return img
        captions = [c for c in rec.captions if c.strip()]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            caption = captions[int(torch.randint(len(captions), ()))] if len(captions) > 1 else captions[0]
            ids, cut = self.tokenize([caption])
            out: dict[str, Any] = {"index": index, "text": ids[0], "cut": int(cut)}
            try:
                if self.clip_view:
                    out["image"] = self.clip_tf(img)
                if self.ssl_views:
                    out["aug1"], out["aug2"] = self.ssl_tf(img), self.ssl_tf(img)
            except Exception as e:  # noqa: BLE001 - a transform failure: one line naming the file
                raise sample_failure("augmenting", rec.path, e, "please report it with this image") from e
        return out


# ------------------------------------------------------------------------------ synthetic pairs (tests)
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220)}
CAPTION_TEMPLATES = ("a {c} {s}", "a photo of a {c} {s}", "{c} {s} on a grey background", "an image of a {c} {s}")


def draw_shape(shape: str, colour: str, size: int, rng: Any) -> Image.Image:
    """A `colour` `shape` at a random place and size on a noisy grey background."""
    import numpy as np
    from PIL import ImageDraw
    bg = rng.integers(100, 160)
    arr = np.clip(bg + rng.normal(0, 12, (size, size, 3)), 0, 255).astype("uint8")
    im = Image.fromarray(arr)
    d = ImageDraw.Draw(im)
    r = int(size * rng.uniform(0.22, 0.38))
    cx, cy = (int(rng.integers(r, size - r + 1)) for _ in range(2))
    fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[colour])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return im


def synthetic_classes() -> list[str]:
    """Class names `'<colour> <shape>'` in a fixed order (9 classes)."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def write_synthetic_captions(root: str, n: int = 180, size: int = 32, seed: int = 0) -> str:
    """ROCO-format pairs under `root`: `root/images/syn_XXXXX.jpg` + `root/train.txt` (lines
    `syn_XXXXX <caption describing colour and shape>`); returns the caption file's path."""
    import numpy as np
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    classes = synthetic_classes()
    lines = []
    for i in range(n):
        colour, shape = classes[i % len(classes)].split()
        name = f"syn_{i:05d}"
        draw_shape(shape, colour, size, rng).save(os.path.join(root, "images", name + ".jpg"), quality=95)
        lines.append(f"{name} {CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(c=colour, s=shape)}")
    path = os.path.join(root, "train.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_synthetic_zeroshot(root: str, n_per_class: int = 8, size: int = 32, seed: int = 1) -> tuple[str, str]:
    """Held-out ImageFolder `root/test/<class>/` (classes sorted by folder name) with its `labels.json`
    and `templates.json` (one entry, `synthetic`); returns (labels path, templates path)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    classes = synthetic_classes()
    folders = sorted(c.replace(" ", "_") for c in classes)
    for folder in folders:
        colour, shape = folder.split("_")
        os.makedirs(os.path.join(root, "test", folder), exist_ok=True)
        for i in range(n_per_class):
            draw_shape(shape, colour, size, rng).save(os.path.join(root, "test", folder, f"{i:03d}.png"))
    labels, templates = os.path.join(root, "labels.json"), os.path.join(root, "templates.json")
    with open(labels, "w", encoding="utf-8") as f:
        json.dump({"synthetic": [f.replace("_", " ") for f in folders]}, f)
    with open(templates, "w", encoding="utf-8") as f:
        json.dump({"synthetic": ["a {}", "a photo of a {}"]}, f)
    return labels, templates


if __name__ == "__main__":  # python -m util.captions DST: synthetic pairs for trying the commands out
    import argparse
    ap = argparse.ArgumentParser("python -m util.captions", description="Write synthetic image-caption pairs "
                                 "(ROCO format: DST/train.txt + DST/images/) and a held-out zero-shot ImageFolder "
                                 "(DST/zeroshot/test/<class>/ with labels.json and templates.json).")
    ap.add_argument("dst", help="output folder")
    ap.add_argument("--num", default=180, type=int, help="training pairs")
    ap.add_argument("--per_class", default=12, type=int, help="held-out images per class (9 classes)")
    ap.add_argument("--size", default=32, type=int, help="image side in pixels")
    a = ap.parse_args()
    meta = write_synthetic_captions(a.dst, a.num, a.size, seed=0)
    labels, templates = write_synthetic_zeroshot(os.path.join(a.dst, "zeroshot"), a.per_class, a.size, seed=1)
    print(f"wrote {meta} ({a.num} pairs), {os.path.dirname(labels)}/test/ ({9 * a.per_class} images), {labels}, {templates}")
