"""A 2-D view of frozen encoder features coloured by label (RETFound's latent-feature notebook).

Features are the pooled vectors a classification head would read (`forward_head(..., pre_logits=True)`)
of a finetuned classifier (main_finetune.py; preprocessing from the checkpoint) or of a pretrained
encoder (MAE / RETFound / USPEC weights; pick `--pool`, default `mae_avg` as RETFound; the vision tower of a
SLIP/CLIP/SimCLR checkpoint, default `cls` as SLIP pools it). Labels are class
folder names: `DATA/<split>/<class>/...` (ImageFolder, `--split`), `DATA/<class>/...`, or none (one
colour) for a plain folder.

Examples:
  python embed_features.py --checkpoint out/checkpoint-best.pth --data_path DATA --split test --method tsne
  python embed_features.py --checkpoint RETFound_cfp_weights.pth --model vit_large_patch16 \\
      --data_path DATA --split test --method pca tsne --output_dir emb/
Writes embedding_<method>.png, embedding_<method>.csv (path, label, x, y) and features.npz.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import os
from typing import Any

from util.atomic import write_atomic
from util.cli import HelpFormatter, UserError, check_output_path, exit_if_help, run_main, setup_logging

logger = logging.getLogger("medfound")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("embed_features.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", "--resume", "--finetune", dest="checkpoint", required=True,
                   help="finetuned classifier or pretrained encoder checkpoint")
    p.add_argument("--data_path", required=True, help="ImageFolder root, class folders, or a folder of images")
    p.add_argument("--split", default=None, help="split folder under --data_path (default: test, else val, else "
                   "the folder itself)")
    p.add_argument("--model", default=None, help="ViT name (default: from the checkpoint; mae_* names map to vit_*)")
    p.add_argument("--pool", default=None, choices=("cls", "mae_avg", "retfound_v2_avg"),
                   help="pooled feature (default: the classifier's; mae_avg for pretrained encoders)")
    p.add_argument("--input_size", default=None, type=int, help="default: the checkpoint's, else 224")
    p.add_argument("--norm_preset", default=None, help="default: the checkpoint's, else imagenet")
    p.add_argument("--method", nargs="+", default=["pca"], choices=("pca", "tsne"), help="one or more 2-D projections")
    p.add_argument("--perplexity", default=None, type=float, help="t-SNE perplexity (default min(30, (N-1)/3))")
    p.add_argument("--max_images", default=0, type=int, help="use a seeded random subset of N images (0: all)")
    p.add_argument("--batch_size", default=64, type=int, help="images per forward pass")
    p.add_argument("--seed", default=0, type=int, help="seed of the image subset (--max_images) and t-SNE")
    p.add_argument("--output_dir", "--output", dest="output_dir", default="./embedding",
                   help="folder for embedding_<method>.png/.csv and features.npz")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p


exit_if_help(get_args_parser)
# The imports below pull in torch; --help has already exited above without them.
import numpy as np  # noqa: E402
import torch  # noqa: E402
import models_classifier  # noqa: E402  (registers the classifier families: ViT, ConvViT)
from util.explain import embedding_view  # noqa: E402
from util.inference import extract_features  # noqa: E402


def read_labelled(data_path: str, split: str | None) -> tuple[list[tuple[str, int]], list[str], str]:
    """(samples, class names, root) from an ImageFolder split, class folders, or a plain folder."""
    from util.data import list_images
    from util.label_layouts import read_imagefolder
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path {data_path} is not a folder")
    if split is None:
        split = next((s for s in ("test", "val") if os.path.isdir(os.path.join(data_path, s))), None)
    root = os.path.join(data_path, split) if split else data_path
    if not os.path.isdir(root):
        raise UserError(f"--split {split}: {root} is not a folder")
    subdirs = [d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))]
    if subdirs:
        samples, classes = read_imagefolder(root)
        return samples, classes, root
    files = list_images(root)
    if not files:
        raise UserError(f"{root}: no images found")
    return [(f, 0) for f in files], ["images"], root


def load_encoder(path: str, model_name: str | None, pool: str | None, input_size: int | None,
                 norm_preset: str | None, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A classifier (head kept) or a pretrained encoder (no head) and its preprocessing."""
    from util.checkpoint import extract_state_dict, load_file, load_pretrained_encoder
    from util.data import resolve_norm
    from util.explain import checkpoint_config
    from util.registry import create_model, resolve
    ckpt = load_file(path)
    sd = extract_state_dict(ckpt, source=path)
    pre = dict(ckpt.get("preprocessing") or {}) if isinstance(ckpt, dict) else {}
    cfg = checkpoint_config(ckpt)
    if ("head.weight" in sd or "head.1.weight" in sd) and pre.get("class_names") and pool is None and not input_size:
        model, info = models_classifier.load_classifier(path, model_name, device)
        return model, {"input_size": info.input_size, "mean": info.mean, "std": info.std, "blur": info.blur,
                       "pool": info.pool, "model": info.model, "kind": "classifier"}
    name = model_name or pre.get("model") or cfg.get("model")
    if not name:
        raise UserError(f"{path}: the checkpoint does not name its model; pass --model (e.g. vit_large_patch16)")
    name = resolve(name)
    import models_slip
    tower = models_slip.vision_tower_name(name)
    if tower:  # a SLIP/CLIP/SimCLR checkpoint: the loader takes its `visual.` keys; SLIP pools the cls token
        logger.info("%s: the vision tower of %s (%s, cls token after the final norm)", path, name, tower)
        name, pool = tower, pool or "cls"
    for prefix in ("mae_", "dmae_", "crossmae_", "dcrossmae_"):
        if name.startswith(prefix):
            name = "vit_" + name[len(prefix):].removeprefix("vit_")
    name = name.removesuffix("_dec512d8b")
    size = input_size or pre.get("input_size") or cfg.get("input_size") or 224
    pool = pool or pre.get("pool") or "mae_avg"
    try:
        model = create_model(name, img_size=int(size), num_classes=0, pool=pool, drop_path_rate=0.0)
    except (TypeError, ValueError) as e:
        raise UserError(f"--model {name}: {e}") from None
    load_pretrained_encoder(model, path, reset_head=False, ckpt=ckpt, flag="--checkpoint")
    if pre.get("mean") and not norm_preset:
        mean, std = list(pre["mean"]), list(pre["std"])
    else:
        mean, std = resolve_norm(norm_preset or pre.get("norm_preset") or cfg.get("norm_preset") or "imagenet")
    blur = pre.get("blur") if (pre.get("deblur") or pre.get("blur")) else None
    return model.to(device).eval(), {"input_size": int(size), "mean": mean, "std": std, "blur": blur, "pool": pool,
                                     "model": name, "kind": "encoder"}


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    check_output_path(args.output_dir)  # a file there is refused and left untouched
    from util.datasets import LabelledImageDataset
    from util.explain import eval_transform
    device = torch.device(args.device if not str(args.device).startswith("cuda") or torch.cuda.is_available() else "cpu")
    model, pre = load_encoder(args.checkpoint, args.model, args.pool, args.input_size, args.norm_preset, device)
    samples, classes, root = read_labelled(args.data_path, args.split)
    if args.max_images and len(samples) > args.max_images:
        keep = sorted(np.random.default_rng(args.seed).choice(len(samples), args.max_images, replace=False))
        samples = [samples[i] for i in keep]
    if len(samples) < 3:
        raise UserError(f"{root}: {len(samples)} image(s); an embedding view needs at least 3")
    ds = LabelledImageDataset(samples, eval_transform(pre["input_size"], pre["mean"], pre["std"]), classes,
                              blur=pre["blur"], blur_root=root if pre["blur"] else None)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=0)
    feats, labels, indices = (t.numpy() for t in extract_features(model, loader, device))
    os.makedirs(args.output_dir, exist_ok=True)
    paths = [samples[int(i)][0] for i in indices]
    write_atomic(os.path.join(args.output_dir, "features.npz"), lambda f: np.savez_compressed(
        f, features=feats, labels=labels, paths=np.array(paths), classes=np.array(classes)))
    out: dict[str, Any] = {"n": len(paths), "dim": int(feats.shape[1]), "classes": classes, "pool": pre["pool"],
                           "model": pre["model"], "files": {}}
    for method in args.method:
        png = os.path.join(args.output_dir, f"embedding_{method}.png")
        title = f"{'PCA' if method == 'pca' else 't-SNE'}: {pre['model']} ({pre['pool']}) features, {len(paths)} images"
        coords = embedding_view(feats, labels, method, png, class_names=classes, seed=args.seed, title=title,
                                perplexity=args.perplexity)
        table = os.path.join(args.output_dir, f"embedding_{method}.csv")
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(["path", "label", "x", "y"])
        for p, lab, (x, y) in zip(paths, labels, coords):
            w.writerow([p, classes[int(lab)], f"{x:.6g}", f"{y:.6g}"])
        write_atomic(table, buf.getvalue().encode("utf-8"))
        out["files"][method] = {"png": png, "csv": table}
        logger.info("wrote %s", png)
    return out


if __name__ == "__main__":
    run_main(main, get_args_parser())
