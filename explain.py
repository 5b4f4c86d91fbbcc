"""Explain a finetuned classifier: heatmaps over the input images and predicted probabilities.

Methods (util/explain.py has the definitions):
  rollout   attention rollout (Abnar & Zuidema), class-agnostic
  chefer    gradient-weighted attention relevance (Chefer et al.), per class
  gradcam   Grad-CAM on the last conv feature map (ConvViT and other CNN-like models) or on the last
            block's token grid (ViT; shown for comparison, transformer maps are more faithful)

Input size, normalisation, blur, pooling and class names come from the checkpoint written by
main_finetune.py, so no preprocessing flag is repeated.

Examples:
  python explain.py --checkpoint out/checkpoint-best.pth --method chefer --output_dir expl/ image.png
  python explain.py --checkpoint out/checkpoint-best.pth --method rollout chefer --all_classes \\
      --output_dir expl/ DATA/test/
Writes <stem>_<method>_<class>.png (rollout: <stem>_rollout.png): the input next to the heatmap overlay,
a colour bar, and a title with the method, the class explained and its probability (and the prediction
when it differs); panels are at least 256 px (--bare: the overlay alone). explanations.json holds every
image's per-class probabilities and predicted class.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
from typing import Any

from util.atomic import write_atomic
from util.cli import HelpFormatter, UserError, check_output_path, exit_if_help, run_main, setup_logging

logger = logging.getLogger("medfound")

METHODS = ("rollout", "chefer", "gradcam")  # util.explain.METHODS, repeated torch-free for --help (a test keeps them equal)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("explain.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files and/or folders (folders are searched recursively)")
    p.add_argument("--checkpoint", "--resume", dest="checkpoint", required=True,
                   help="finetuned classifier written by main_finetune.py (checkpoint-best.pth)")
    p.add_argument("--model", default=None, help="override the model name stored in the checkpoint")
    p.add_argument("--method", nargs="+", default=["chefer"], choices=METHODS, help="one or more methods")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--class_index", default=None,
                   help="class to explain, as an index or a class name (default: each image's predicted class)")
    g.add_argument("--all_classes", action="store_true", help="one map per class")
    p.add_argument("--discard_ratio", default=0.0, type=float, help="rollout: drop the weakest attention weights")
    p.add_argument("--head_fusion", default="mean", choices=("mean", "max", "min"), help="rollout head fusion")
    p.add_argument("--start_layer", default=0, type=int, help="chefer: first block included")
    p.add_argument("--readout", default=None, choices=("cls", "mean"),
                   help="rollout/chefer read-out (default: cls for cls-pooled models, mean of patch rows otherwise)")
    p.add_argument("--target_layer", default=None, help="gradcam layer, e.g. blocks.-1.norm1 (default: automatic)")
    p.add_argument("--alpha", default=0.5, type=float, help="heatmap opacity in the overlay")
    p.add_argument("--cmap", default="jet", help="matplotlib colormap")
    p.add_argument("--overlay_size", default=None, type=int,
                   help="side of each picture panel in pixels (default: the model's input size, at least 256 px in "
                        "figures so small inputs stay legible)")
    p.add_argument("--bare", action="store_true",
                   help="write only the overlay image (no input panel, title or colour bar), --overlay_size px "
                        "(default: the input size)")
    p.add_argument("--save_npy", action="store_true", help="also save each map (input resolution, [0, 1]) as .npy")
    p.add_argument("--batch_size", default=16, type=int, help="images per forward pass")
    p.add_argument("--bad_image", default="error", choices=("error", "skip"),
                   help="an unreadable input image: stop with its name, or leave it out (listed in the log and in "
                        "explanations.json as skipped_images)")
    p.add_argument("--output_dir", "--output", dest="output_dir", default="./explanations",
                   help="folder for the overlay figures (and .npy maps)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p


exit_if_help(get_args_parser)
# The imports below pull in torch; --help has already exited above without them.
import numpy as np  # noqa: E402
import torch  # noqa: E402
from models_classifier import load_classifier  # noqa: E402  (registers the classifier families)
from util.explain import explain, overlay, upsample  # noqa: E402
from util.inference import probabilities  # noqa: E402
from util.skipping import skipped_message, SkippedSample  # noqa: E402
from util.vis import collect_images, explanation_figure, explanation_title, save_png  # noqa: E402


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "class"


def _name(names: list[str], index: int) -> str:
    return names[index] if index < len(names) else str(index)


def predicted_index(row: list[float], task_type: str, explained: int) -> int:
    """The predicted class: the most probable one (multi-label: the label explained by default, the
    highest-scoring one)."""
    return int(np.argmax(row)) if task_type != "multilabel" else explained


def resolve_class(value: str | None, class_names: list[str]) -> int | None:
    if value is None:
        return None
    if value in class_names:
        return class_names.index(value)
    try:
        idx = int(value)
    except ValueError:
        raise UserError(f"--class_index {value!r}: not a class index or one of {class_names}") from None
    if not 0 <= idx < len(class_names):
        raise UserError(f"--class_index {idx}: out of range for {len(class_names)} classes {class_names}")
    return idx


def check_target_layer(model: torch.nn.Module, name: str) -> None:
    """A one-line error naming --target_layer and some valid layer names when the model has no such layer
    (checked before any output is written)."""
    from util.explain import _module
    try:
        _module(model, name)
        return
    except (ValueError, IndexError, KeyError, TypeError, AttributeError):
        pass
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    blocks = getattr(model, "blocks", None)
    examples = ([f"blocks.{len(blocks) - 1}.norm1", "blocks.-1.norm1"] if blocks is not None and len(blocks) else [])
    examples += [n for n in leaves[:2] + leaves[-3:] if n not in examples]
    raise UserError(f"--target_layer {name}: {type(model).__name__} has no such layer; valid names include "
                    f"{', '.join(examples[:6])} (dotted module names, negative indices count from the end)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from util.datasets import LabelledImageDataset
    from util.explain import eval_transform
    device = torch.device(args.device if not str(args.device).startswith("cuda") or torch.cuda.is_available() else "cpu")
    model, info = load_classifier(args.checkpoint, args.model, device)
    names = list(info.class_names)
    class_index = resolve_class(args.class_index, names)
    if info.task_type == "multilabel" and class_index is None and not args.all_classes:
        logger.info("multi-label model: explaining the highest-scoring label of each image (--all_classes for all)")
    if "gradcam" in args.method and hasattr(model, "blocks") and args.target_layer is None:
        logger.warning("gradcam on a ViT reads the last block's token grid; attention-based maps (chefer, rollout) "
                       "are more faithful for transformers")
    if args.target_layer is not None:
        check_target_layer(model, args.target_layer)
    images = collect_images(args.inputs)
    ds = LabelledImageDataset([(p, 0) for p, _ in images], eval_transform(info.input_size, info.mean, info.std), names,
                              blur=info.blur, blur_root=os.path.commonpath([os.path.abspath(p) for p, _ in images])
                              if info.blur else None, bad_image=args.bad_image)
    skipped: list[str] = []
    classes = list(range(len(names))) if args.all_classes else None
    options = dict(discard_ratio=args.discard_ratio, head_fusion=args.head_fusion, start_layer=args.start_layer,
                   readout=args.readout, target_layer=args.target_layer)
    records: list[dict[str, Any]] = []
    for start in range(0, len(ds), args.batch_size):
        idx, tensors = [], []
        for i in range(start, min(start + args.batch_size, len(ds))):
            item = ds[i]
            if isinstance(item, SkippedSample):  # --bad_image skip: left out, listed below
                skipped.append(item.path)
            else:
                idx.append(i)
                tensors.append(item[0])
        if not idx:
            continue
        os.makedirs(args.output_dir, exist_ok=True)
        x = torch.stack(tensors).to(device)
        probs = None
        per_image: list[dict[str, str]] = [{} for _ in idx]
        for method in args.method:
            maps, logits, targets = explain(model, x, method, class_index=class_index,
                                            classes=None if method == "rollout" else classes, **options)
            if probs is None:
                probs = probabilities(logits, info.task_type, two_columns=True).cpu()
                pred_targets = targets.cpu()
            for key, m in maps.items():
                full = upsample(m.detach().cpu(), info.input_size)
                for j, i in enumerate(idx):
                    stem = images[i][1]
                    c = None
                    if method == "rollout":  # class-agnostic: one map per image
                        label, out_name = "all", f"{stem}_rollout"
                    else:
                        c = key if key >= 0 else int(targets[j])
                        label = names[c] if c < len(names) else str(c)
                        out_name = f"{stem}_{method}_{_safe(label)}"
                    path = os.path.join(args.output_dir, out_name + ".png")
                    if args.bare:
                        pic = overlay(x[j], full[j], alpha=args.alpha, cmap=args.cmap, mean=info.mean, std=info.std,
                                      size=args.overlay_size)
                    else:
                        row = probs[j].tolist()
                        pred = predicted_index(row, info.task_type, int(pred_targets[j]))
                        title = explanation_title(method, None if c is None else label,
                                                  None if c is None or c >= len(row) else row[c], _name(names, pred),
                                                  row[pred], image_name=os.path.basename(images[i][0]))
                        pic = explanation_figure(x[j], full[j], title, info.mean, info.std, alpha=args.alpha,
                                                 cmap=args.cmap, panel=args.overlay_size, method=method)
                    save_png(pic, path)
                    if args.save_npy:
                        arr = full[j].numpy().astype(np.float32)
                        write_atomic(os.path.join(args.output_dir, out_name + ".npy"), lambda f: np.save(f, arr))
                    per_image[j][f"{method}:{label}"] = os.path.basename(path)
        for j, i in enumerate(idx):
            row = probs[j].tolist()
            pred = predicted_index(row, info.task_type, int(pred_targets[j]))
            records.append({"path": images[i][0], "stem": images[i][1],
                            "probabilities": {n: round(float(p), 6) for n, p in zip(names, row)},
                            "predicted": _name(names, pred), "maps": per_image[j]})
    if skipped:
        logger.warning("%s", skipped_message(skipped))
    if not records:
        raise UserError(f"no readable image among {', '.join(args.inputs)} ({len(skipped)} unreadable)")
    summary = {"checkpoint": os.path.abspath(args.checkpoint), "model": info.model, "pool": info.pool,
               "input_size": info.input_size, "class_names": names, "task_type": info.task_type,
               "methods": list(args.method), "class_index": class_index, "all_classes": bool(args.all_classes),
               "images": records, "skipped_images": skipped}
    out = os.path.join(args.output_dir, "explanations.json")
    write_atomic(out, json.dumps(summary, indent=1).encode("utf-8"))  # a full disk: one line, the old file intact
    logger.info("explained %d image(s) with %s: %s", len(records), ", ".join(args.method), args.output_dir)
    return summary


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    check_output_path(args.output_dir)  # a file there is refused and left untouched
    if args.batch_size < 1:
        raise UserError("--batch_size must be >= 1")
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {args.alpha}")
    try:
        return run(args)
    except ValueError as e:  # e.g. rollout on a model without attention layers, bad --target_layer
        raise UserError(str(e)) from None


if __name__ == "__main__":
    run_main(main, get_args_parser())
