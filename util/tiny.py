"""Synthetic images and checkpoint writers for tiny models trained in seconds (models_tiny.py trains them),
in the checkpoint layouts of main_pretrain.py and main_finetune.py, so that notebooks, tests and README
pictures exercise the real loaders and CLIs without downloading weights.

- `planted_lesion_images` / `plant_lesion`: images with a bright round "lesion" planted at a random place in half of them
  (label 1 = lesion present), with the lesion masks; backgrounds are smooth noise, synthetic fundus
  photos (util.synthetic) or random crops of a given photo (e.g. scikit-image's retina).
- `demo_pretraining_images`: synthetic fundus photos and crops of scikit-image's retina.
- `fit`: the few-line training loop models_tiny.py uses.
- `save_classifier` / `save_mae`: main_finetune.py's and main_pretrain.py's checkpoint layouts.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

logger = logging.getLogger("medfound")

DEMO_MEAN = [0.5, 0.5, 0.5]
DEMO_STD = [0.25, 0.25, 0.25]


def retina_photo(size: int | None = None) -> np.ndarray:
    """scikit-image's fundus photograph (HxWx3 uint8), optionally resized to size x size (LANCZOS)."""
    from skimage import data as skdata
    img = skdata.retina()
    if size:
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS))
    return img


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    cells = rng.standard_normal((5, 5, 3)).astype(np.float32)
    up = np.stack([np.asarray(Image.fromarray(cells[..., c], "F").resize((size, size), Image.BICUBIC))
                   for c in range(3)], axis=-1)
    fine = rng.standard_normal((size, size, 1)).astype(np.float32)
    return np.clip(0.35 + 0.08 * up + 0.04 * fine, 0, 1)


def _crop_of(photo: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop (60-100% of the side), flip and brightness jitter, resized to `size`."""
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.6, 1.0))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
    arr = np.asarray(crop, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.clip(arr * rng.uniform(0.85, 1.15), 0, 1)


def planted_lesion_images(n: int, size: int = 64, seed: int = 0, background: str | np.ndarray = "noise",
                          radius: tuple[float, float] = (0.08, 0.13), positive_fraction: float = 0.5,
                          colour: Sequence[float] = (1.0, 0.95, 0.55)) -> dict[str, np.ndarray]:
    """`{'images': (N, H, W, 3) uint8, 'labels': (N,) int64, 'masks': (N, H, W) bool}`.

    Label 1 images carry one soft bright disc (radius a fraction of the side, centre kept inside the
    middle 70%); `masks` marks its pixels (all False for label 0). Deterministic by seed.
    """
    rng = np.random.default_rng(seed)
    n_pos = int(round(n * positive_fraction))
    labels = np.array([1] * n_pos + [0] * (n - n_pos), dtype=np.int64)
    rng.shuffle(labels)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        if isinstance(background, np.ndarray):
            img = _crop_of(background, rng, size)
        elif background == "fundus":
            from util.synthetic import fundus_sample
            img = fundus_sample(int(rng.integers(0, 2**31)), size=size, n_lesions=0).image.astype(np.float32) / 255
        elif background == "noise":
            img = _smooth_noise(rng, size)
        else:
            raise ValueError(f"background must be 'noise', 'fundus' or an image array, got {background!r}")
        if labels[i]:
            r = rng.uniform(*radius) * size
            cx, cy = rng.uniform(0.15, 0.85, size=2) * size
            img, masks[i] = _plant(img, cx, cy, r, colour, xs, ys)
        images[i] = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return {"images": images, "labels": labels, "masks": masks}


def _plant(img: np.ndarray, cx: float, cy: float, r: float, colour: Sequence[float], xs: np.ndarray,
           ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
    cover = np.clip(r + 0.5 - d, 0, 1)[..., None]
    return img * (1 - cover) + np.asarray(colour, np.float32) * cover, d <= r


def plant_lesion(image: np.ndarray, centre: tuple[float, float], radius: float,
                 colour: Sequence[float] = (1.0, 0.95, 0.55)) -> tuple[np.ndarray, np.ndarray]:
    """(image with one lesion like `planted_lesion_images` draws, its mask); centre (x, y) and radius are
    fractions of the image side."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    out, mask = _plant(image.astype(np.float32) / 255.0, centre[0] * w, centre[1] * h, radius * min(h, w), colour,
                       xs, ys)
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8), mask


def to_tensor(images: np.ndarray, mean: Sequence[float] = DEMO_MEAN, std: Sequence[float] = DEMO_STD) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised (N, 3, H, W) float."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def _batches(n: int, batch_size: int, g: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def fit(model: nn.Module, x: torch.Tensor, loss_of: Any, opt: torch.optim.Optimizer, lr: float, steps: int,
         batch_size: int, seed: int, max_seconds: float | None, name: str) -> None:
    """The small training loop of models_tiny's helpers: one-cycle lr, seeded batches with random flips,
    optional time budget. `loss_of(images, batch_indices)` gives the loss of a batch."""
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    start = time.time()
    for step, idx in zip(range(steps), _batches(len(x), min(batch_size, len(x)), g)):
        idx = idx.to(x.device)
        xb = x[idx]
        if torch.rand(1, generator=g).item() < 0.5:
            xb = xb.flip(-1)
        loss = loss_of(xb, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if max_seconds is not None and time.time() - start > max_seconds:
            logger.info("%s: stopped after %d steps (%.1f s budget)", name, step + 1, max_seconds)
            break


def _atomic(obj: dict, path: str) -> str:
    from util.checkpoint import atomic_save
    atomic_save(obj, str(path))
    return str(path)


def save_classifier(model: nn.Module, path: str, model_name: str, class_names: Sequence[str],
                    mean: Sequence[float] = DEMO_MEAN, std: Sequence[float] = DEMO_STD,
                    norm_preset: str = "demo") -> str:
    """main_finetune.py's best-checkpoint layout: `{model, epoch, args, preprocessing}`."""
    size = int(model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else model.img_size[0])
    pre = {"input_size": size, "mean": list(mean), "std": list(std), "norm_preset": norm_preset, "blur": None,
           "deblur": False, "class_names": list(class_names), "task_type": "multiclass", "pool": model.pool,
           "nb_classes": len(class_names), "model": model_name}
    args = {"model": model_name, "input_size": size, "pool": model.pool, "nb_classes": len(class_names)}
    return _atomic({"model": model.state_dict(), "epoch": 0, "args": args, "preprocessing": pre}, path)


def demo_pretraining_images(n: int = 256, size: int = 32, seed: int = 0, retina_fraction: float = 0.5) -> np.ndarray:
    """Synthetic fundus photos plus random crops of scikit-image's retina (when installed)."""
    from util.synthetic import fundus_sample
    rng = np.random.default_rng(seed)
    try:
        photo = retina_photo(256)
    except ImportError:
        photo, retina_fraction = None, 0.0
    n_ret = int(n * retina_fraction)
    out = [fundus_sample(int(rng.integers(0, 2**31)), size=size, n_lesions=int(rng.integers(0, 4))).image
           for _ in range(n - n_ret)]
    out += [np.round(_crop_of(photo, rng, size) * 255).astype(np.uint8) for _ in range(n_ret)]
    return np.stack(out)


def save_mae(model: nn.Module, path: str, model_name: str, mean: Sequence[float] = DEMO_MEAN,
             std: Sequence[float] = DEMO_STD, norm_preset: str = "demo", encoder_only: bool = False,
             layout: str = "ours") -> str:
    """main_pretrain.py's layout (`{model, epoch, args, preprocessing}`), or the published `{model: sd}`
    (`layout='published'`); `encoder_only` drops the decoder as encoder-only releases do (the key
    prefixes the model's family declares as pretraining-only, util.family)."""
    from util.family import family_of
    sd = model.state_dict()
    if encoder_only:
        spec = family_of(model)
        prefixes = spec.ignore_prefixes if spec is not None else ()
        sd = {k: v for k, v in sd.items() if not k.startswith(prefixes)}
    if layout == "published":
        return _atomic({"model": sd}, path)
    size = int(model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else model.img_size[0])
    npl = bool(getattr(model, "norm_pix_loss", False))
    pre = {"input_size": size, "mean": list(mean), "std": list(std), "norm_preset": norm_preset,
           "deblur": bool(getattr(model, "deblur", False)), "blur": None, "norm_pix_loss": npl, "model": model_name}
    args = {"model": model_name, "input_size": size, "norm_pix_loss": npl, "norm_preset": norm_preset}
    return _atomic({"model": sd, "epoch": 0, "args": args, "preprocessing": pre}, path)
