"""Zero-shot classification with an image-text model (SLIP/CLIP checkpoints, ours or SLIP's published ones).

Each class is embedded as the mean text embedding of its names (a `labels.json` entry may list synonyms per
class) filled into every prompt template of `templates.json`; each image goes to the class of highest
cosine similarity. Class i of the dataset (sorted folder names of an ImageFolder, as SLIP's catalogs
order them) is entry i of the labels list. Metrics come from util.metrics: top-1, balanced accuracy, macro
AUROC, F1, precision, recall, per-class precision/recall, bootstrap CIs, confusion-matrix and ROC PNGs.

  python main_zeroshot.py --resume CKPT --data_path FOLDER --labels labels.json --templates templates.json \\
      --output-dir OUT [--dataset NAME when the files hold several entries]
  python eval_zeroshot.py --resume CKPT      # SLIP's: every entry of ./dataset_catalog.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Sequence

import slip_args
from util.cli import UserError, check_output_path, check_ranges, exit_if_help, run_main

logger = logging.getLogger("medfound")


def get_args_parser() -> argparse.ArgumentParser:
    return slip_args.get_zeroshot_parser("main_zeroshot.py", __doc__)


exit_if_help(get_args_parser)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402


# ------------------------------------------------------------------------------------------- prompts
def _read_json(path: str, flag: str) -> dict:
    if not path or not os.path.isfile(path):
        raise UserError(f"{flag} {path!r}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{flag} {path}: expected a JSON object name -> list")
    return data


def _entry(data: dict, name: str | None, path: str, flag: str) -> list:
    if name is None:
        if len(data) != 1:
            raise UserError(f"{flag} {path} holds {len(data)} entries ({', '.join(list(data)[:6])}); pick one with --dataset")
        name = next(iter(data))
    if name not in data:
        raise UserError(f"{flag} {path}: no entry '{name}' (has {', '.join(list(data)[:8])})")
    value = data[name]
    if not isinstance(value, list) or not value:
        raise UserError(f"{flag} {path}: entry '{name}' must be a non-empty list")
    return value


def read_prompts(labels: str, templates: str, name: str | None) -> tuple[list[str | list[str]], list[str]]:
    """(class names, each a name or a synonym list; templates) of the entry `name` (or the only one)."""
    classes = _entry(_read_json(labels, "--labels"), name, labels, "--labels")
    temps = _entry(_read_json(templates, "--templates"), name, templates, "--templates")
    for i, c in enumerate(classes):
        if not (isinstance(c, str) and c.strip()) and not (isinstance(c, list) and c and all(isinstance(s, str) for s in c)):
            raise UserError(f"--labels {labels}: class #{i} must be a name or a list of names, got {c!r}")
    for t in temps:
        if not isinstance(t, str) or "{}" not in t:
            raise UserError(f"--templates {templates}: every template needs a '{{}}' for the class name, got {t!r}")
    return classes, temps


# ----------------------------------------------------------------------------------------------- data
def _split_folder(path: str) -> str:
    for split in ("test", "val"):
        if os.path.isdir(os.path.join(path, split)):
            return os.path.join(path, split)
    return path


def build_eval_loader(path: str, args: Any, device: torch.device, n_classes: int, filelist: tuple[str, str] | None = None
                      ) -> tuple[Any, list[str]]:
    """(loader of `(image, class index, sample index)` with SLIP's zero-shot view, class list) for an
    ImageFolder (or SLIP's filelist pair of .npy files); the class count must match the labels."""
    from util.captions import eval_transform
    from util.datasets import LabelledImageDataset
    from util.label_layouts import read_imagefolder
    from util.runtime import make_loader
    from util.samplers import SequentialShardSampler
    if filelist is not None:
        images = np.load(filelist[0], allow_pickle=False)
        targets = np.load(filelist[1], allow_pickle=False)
        if len(images) != len(targets):
            raise UserError(f"{filelist[0]} and {filelist[1]} differ in length ({len(images)} vs {len(targets)})")
        samples = [(os.path.join(path, str(f)), int(t)) for f, t in zip(images, targets)]
        classes = [str(i) for i in range(n_classes)]
    else:
        if not path or not os.path.isdir(path):
            raise UserError(f"--data_path {path!r}: not a folder of class folders")
        samples, classes = read_imagefolder(_split_folder(path))
        if len(classes) != n_classes:
            raise UserError(f"{_split_folder(path)} has {len(classes)} class folders but --labels lists {n_classes} "
                            f"classes (class i of the sorted folders is label i); make them match")
    size = getattr(args, "input_size", None) or 224
    # the normalisation the checkpoint trained with (MedSLIP may use MedCLIP's grey statistics); else ImageNet's
    norm = [v for v in (getattr(args, "eval_mean", None), getattr(args, "eval_std", None)) if v]
    tf = eval_transform(size, *norm) if len(norm) == 2 else eval_transform(size)
    ds = LabelledImageDataset(samples, tf, classes, bad_image=args.bad_image)
    return make_loader(ds, SequentialShardSampler(ds), args, device, args.batch_size, drop_last=False), classes


# ---------------------------------------------------------------------------------------------- model
def load_weights(model: nn.Module, path: str) -> dict:
    """Strictly load `state_dict` (or `model`) of an image-text checkpoint, `module.` prefix or not."""
    from util.checkpoint import CheckpointError
    from util.checkpoint_files import load_file
    ckpt = load_file(path, flag="--resume")
    sd = ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"--resume {path}: no 'state_dict' of tensors in it")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"--resume {path}: does not match the model ({len(result.missing_keys)} missing e.g. "
                              f"{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected e.g. "
                              f"{result.unexpected_keys[:3]})")
    return ckpt


def build_model(path: str, text_model: str | None = None) -> tuple[nn.Module, dict]:
    """The model a checkpoint's `args` names (model, SimCLR MLP sizes; for MedSLIP also its text model, which
    `text_model` replaces when the recorded folder is elsewhere on this machine), with its weights."""
    import models_medclip  # noqa: F401  (registers MedSLIP_*; transformers is imported only when one is built)
    import models_slip  # noqa: F401  (registers the factories)
    from util.checkpoint_files import load_file
    from util.registry import create_model
    ckpt = load_file(path, flag="--resume")
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else (saved or {})
    name = saved.get("model")
    if not isinstance(name, str):
        raise UserError(f"--resume {path}: its 'args' name no model; is it a SLIP/CLIP checkpoint?")
    kw = {k: saved[k] for k in ("ssl_mlp_dim", "ssl_emb_dim") if k in saved and not name.upper().startswith("CLIP")}
    if isinstance(saved.get("input_size"), int):
        kw["img_size"] = saved["input_size"]
    if isinstance(saved.get("context_length"), int) and saved["context_length"] != 77:
        kw["context_length"] = saved["context_length"]
    if name.upper().startswith("SIMCLR"):
        raise UserError(f"--resume {path}: {name} has no text tower; zero-shot classification needs a SLIP or CLIP model")
    if saved.get("loss") == "siglip":
        kw["siglip"] = True  # the run trained a logit bias: the checkpoint holds it
    if name.startswith("MedSLIP_"):
        from util.hf_text import require_transformers
        require_transformers(f"--resume {path} ({name})")
        kw.pop("context_length", None)
        kw["text_model"] = text_model or saved.get("text_model")
        kw["text_pooling"] = saved.get("text_pooling", "medclip")
        if not kw["text_model"]:
            raise UserError(f"--resume {path}: a {name} checkpoint without a recorded text model; pass --text_model")
    elif text_model:
        raise UserError(f"--text_model belongs to MedSLIP checkpoints; {path} holds {name}")
    model = create_model(name, **kw)
    ckpt = load_weights(model, path)
    prep = ckpt.get("preprocessing") if isinstance(ckpt.get("preprocessing"), dict) else {}
    saved = {**saved, "text_model": kw.get("text_model"), "eval_mean": prep.get("mean"), "eval_std": prep.get("std")}
    return model, saved


def prompt_tokenizer(saved: dict, args: Any) -> Any:
    """CLIP's BPE, or for a MedSLIP checkpoint its text model's tokenizer at the context it trained with."""
    if str(saved.get("model", "")).startswith("MedSLIP_"):
        from util.hf_text import HFTokenize, load_tokenizer
        args.context_length = int(saved.get("context_length") or args.context_length)
        return HFTokenize(load_tokenizer(saved["text_model"], max_length=args.context_length), args.context_length)
    from util.tokenizer import tokenize
    return tokenize


# ---------------------------------------------------------------------------------------------- run
def evaluate(model: nn.Module, loader: Any, classnames: Sequence[Any], templates: Sequence[str], args: Any,
             device: torch.device, name: str, tokenize: Any = None) -> dict[str, Any]:
    from engine_slip import per_class_pr_ci, zeroshot_classifier, zeroshot_predict
    from util.metrics import bootstrap_ci, classification_metrics, plot_confusion_matrix, plot_roc, write_metrics
    if tokenize is None:
        from util.tokenizer import tokenize
    clf = zeroshot_classifier(model, classnames, templates, tokenize, device, args.context_length)
    out = zeroshot_predict(model, loader, clf, device, args.amp)
    names = [c if isinstance(c, str) else c[0] for c in classnames]
    y, probs = out["targets"], out["probs"]
    if len(y) == 0:
        raise UserError(f"{name}: no readable images to classify")
    m = classification_metrics(y, probs, num_classes=len(names), class_names=names)
    if len(names) == 2:  # the binary convention thresholds P(class 1); zero-shot predicts the argmax
        pred = probs.argmax(1)
        m["accuracy_argmax"] = float((pred == y).mean())
    m["top1"] = float((probs.argmax(1) == y).mean())
    m["skipped_images"] = out["skipped"]
    if args.n_boot > 0 and len(y) > 1:
        wanted = [k for k in ("auroc", "accuracy", "f1", "precision", "recall") if m.get(k) is not None]
        m["ci95"] = {k: list(v) for k, v in bootstrap_ci(y, probs, wanted, n_boot=args.n_boot, seed=args.seed,
                                                          num_classes=len(names)).items()}
        m["ci95"].update(per_class_pr_ci(y, probs, n_boot=args.n_boot, seed=args.seed))
    if args.output_dir:
        write_metrics(m, args.output_dir, prefix=name)
        plot_confusion_matrix(m["confusion_matrix"], os.path.join(args.output_dir, f"confusion_{name}.png"), names,
                              title=f"zero-shot {name}", split=name, checkpoint=args.resume)
        plot_roc(y, probs, os.path.join(args.output_dir, f"roc_{name}.png"), names, num_classes=len(names),
                 title=f"zero-shot {name}", split=name, checkpoint=args.resume, n_boot=min(args.n_boot, 200))
    logger.info("%s: top-1 %.4f, macro AUROC %s, F1 %.4f, precision %.4f, recall %.4f (n=%d)", name, m["top1"],
                f"{m['auroc']:.4f}" if m["auroc"] is not None else "n/a", m["f1"], m["precision"], m["recall"], m["n"])
    return m


def datasets_to_run(args: Any) -> list[tuple[str, str, tuple[str, str] | None, str | None]]:
    """[(metrics name, folder, filelist pair or None, json entry name or None)]."""
    if args.data_path:
        return [(args.dataset or "zeroshot", args.data_path, None, args.dataset or None)]  # one-entry files need no name
    if not args.catalog:
        raise UserError("give --data_path FOLDER (an ImageFolder) or --catalog dataset_catalog.json")
    catalog = _read_json(args.catalog, "--catalog")
    names = [args.dataset] if args.dataset else list(catalog)
    out = []
    for n in names:
        entry = catalog.get(n)
        if not isinstance(entry, dict) or "path" not in entry:
            raise UserError(f"--catalog {args.catalog}: no entry '{n}' with a path (has {', '.join(list(catalog)[:8])})")
        kind, split = entry.get("type", "imagefolder"), entry.get("test", "test")
        if kind == "imagefolder":
            out.append((n, os.path.join(entry["path"], split), None, n))
        elif kind == "filelist":
            out.append((n, entry["path"], (os.path.join(entry["path"], f"{split}_images.npy"),
                                           os.path.join(entry["path"], f"{split}_labels.npy")), n))
        else:
            logger.warning("%s: catalog type %r needs a torchvision download; skipped (no network). Save it as an "
                           "ImageFolder and give its path with type imagefolder", n, kind)
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_ranges(args, slip_args.ZEROSHOT_RULES)
    check_output_path(args.output_dir, "--output-dir")
    from util.runtime import setup, start_guard
    runs = datasets_to_run(args)
    with start_guard(args.output_dir or None):
        device = setup(args)
        model, saved = build_model(args.resume, args.text_model)
        tokenize = prompt_tokenizer(saved, args)
        model.to(device).eval()
        if args.input_size is None:
            args.input_size = int(saved.get("input_size", 224) or 224)
        args.eval_mean, args.eval_std = saved.get("eval_mean"), saved.get("eval_std")
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
        results: dict[str, Any] = {}
        for name, folder, filelist, entry in runs:
            classnames, templates = read_prompts(args.labels, args.templates, entry)
            loader, _ = build_eval_loader(folder, args, device, len(classnames), filelist)
            m = evaluate(model, loader, classnames, templates, args, device, name, tokenize)
            results[name] = {k: m.get(k) for k in ("top1", "auroc", "f1", "precision", "recall", "n")}
        if args.output_dir:
            from util.atomic import write_atomic
            write_atomic(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=1).encode("utf-8"))
    from util.logger import print_summary
    print_summary("zero-shot classification", [(n, f"top-1 {r['top1']:.4f}, macro AUROC "
                                                    f"{r['auroc'] if r['auroc'] is None else round(r['auroc'], 4)} "
                                                    f"(n={r['n']})") for n, r in results.items()]
                  + [("outputs", args.output_dir or None)])
    return results


if __name__ == "__main__":
    run_main(main, get_args_parser())
