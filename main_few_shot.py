"""Few-shot finetuning over several seeds: k images per class for training, mean ± sd of test metrics.

Shots are drawn with USPEC's split algorithm (classes in sorted order, one random.Random(seed) shared
across classes, sorted file list shuffled, first k to train) so shot sets match USPEC's for the same seed.

Examples:
  python main_few_shot.py --model RETFound_mae --finetune USPEC.pt --data_path DATA --few_shot 10 \\
      --seeds 1,2,3 --epochs 50 --blr 1e-3 --layer_decay 0.65 --drop_path 0.2 --output_dir ./few_shot_models
  # USPEC's script name and single-seed form also work:
  python main_few_shot_finetuning.py ... --task ori_vit --seed 1 --few_shot 5

Data: DATA/<class>/<image> (shots from it, the rest is the test set), or DATA/{train,test}/<class>/...
(shots from train, test on test). Selection: DATA/val if present, or --few_shot_val carve (a stratified
part of the shots), else the last epoch; never the test set.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import logging
import os
from typing import Any

import finetune_args
from util.atomic import write_atomic
from util.cli import UserError, check_output_path, exit_if_help, run_main

logger = logging.getLogger("medfound")

SUMMARY_KEYS = ("auroc", "auprc", "accuracy", "balanced_accuracy", "f1", "precision", "recall", "specificity",
                "kappa", "kappa_quadratic", "loss")


def get_args_parser() -> argparse.ArgumentParser:
    return finetune_args.few_shot_parser("main_few_shot.py", __doc__)


exit_if_help(get_args_parser)
# The imports below pull in torch and the training code; --help has already exited above without them.
import numpy as np  # noqa: E402

import main_finetune  # noqa: E402
from util.dist import cleanup, is_main_process  # noqa: E402
from util.runtime import setup  # noqa: E402


def parse_seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds is None:
        return [args.seed]
    try:
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:  # e.g. "--seeds ," would run nothing and report an empty table as success
        raise UserError(f"--seeds {args.seeds!r}: expected a comma list of integers, e.g. 1,2,3")
    return seeds


def check_args(args: argparse.Namespace) -> list[int]:
    """Flag ranges, --few_shot and --seeds before any work; returns the seeds."""
    finetune_args.check_args(args)
    if args.few_shot >= 1 and args.few_shot != int(args.few_shot):
        raise UserError(f"--few_shot {args.few_shot:g}: a shot count is a whole number (below 1 it is the "
                        "fraction of each class)")
    return parse_seeds(args)


def check_shots(args: argparse.Namespace, train: list, classes: list[str], shot_root: str) -> None:
    """k shots need k images in every class: fewer would train on all of a class's images (and test on
    none of them) while the results still say k."""
    if args.few_shot < 1:
        return
    counts = {c: 0 for c in range(len(classes))}
    for _, t in train:
        counts[int(t)] = counts.get(int(t), 0) + 1
    c, n = min(counts.items(), key=lambda item: (item[1], item[0]))
    if n < args.few_shot:
        name = classes[c] if c < len(classes) else str(c)
        raise UserError(f"--few_shot {args.few_shot:g}: class {name!r} has only {n} images in {shot_root}; "
                        f"use --few_shot {n} or less (or a fraction of each class below 1)")


def build_split(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from util.datasets import LabelledImageDataset
    from util.finetune_transforms import build_transform, transform_from_args
    from util.label_layouts import read_image_folder
    from util.splits import few_shot_split, stratified_carve
    root = args.data_path
    if not root or not os.path.isdir(root):
        raise UserError(f"--data_path {root!r} is not a folder")
    has_splits = os.path.isdir(os.path.join(root, "train"))
    shot_root = os.path.join(root, "train") if has_splits else root
    train, rest, classes = few_shot_split(shot_root, args.few_shot, seed)
    check_shots(args, train, classes, shot_root)
    test = read_image_folder(os.path.join(root, "test"), classes)[0] if has_splits and os.path.isdir(
        os.path.join(root, "test")) else rest
    val, split_info = None, {"rule": "none (last epoch)"}
    if has_splits and os.path.isdir(os.path.join(root, "val")) and args.few_shot_val != "none":
        val, split_info = read_image_folder(os.path.join(root, "val"), classes)[0], {"rule": "data_path/val"}
    elif args.few_shot_val == "carve":
        train, val, split_info = stratified_carve(train, args.val_fraction, seed)
        split_info["rule"] = "carved from the shots"
    blur = main_finetune._blur_spec(args)
    train_tf = transform_from_args(True, args)  # run() rebuilds it once the recipe is resolved
    eval_tf = build_transform(False, args.input_size, args.mean, args.std)
    mk = lambda s, tf: LabelledImageDataset(s, tf, classes, blur=blur, blur_root=root, bad_image=args.bad_image)  # noqa: E731
    out = {"train": mk(train, train_tf), "val": mk(val, eval_tf) if val else None, "test": mk(test, eval_tf)}
    out["train"].split_info = split_info
    if out["val"] is not None:
        out["val"].split_info = split_info
    logger.info("seed %d: %d shots (%s per class), %d val, %d test", seed, len(train), args.few_shot,
                len(val or []), len(test))
    return out


def finished_seed(output_dir: str) -> dict[str, Any] | None:
    """The results of a seed that ran to the end (results.json written, resume state dropped)."""
    results = os.path.join(output_dir, "results.json")
    if not os.path.isfile(results) or os.path.isfile(os.path.join(output_dir, "checkpoint-last.pth")):
        return None
    with open(results) as f:
        return json.load(f)


def drop_resume_state(output_dir: str) -> None:
    """A finished seed needs no resume point: its checkpoint-last.pth (weights + optimizer state) is
    removed, checkpoint-best.pth (weights) and the metrics stay."""
    path = os.path.join(output_dir, "checkpoint-last.pth")
    if is_main_process() and os.path.isfile(os.path.join(output_dir, "results.json")) and os.path.isfile(path):
        os.unlink(path)


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    table = {}
    for key in SUMMARY_KEYS:
        values = [r["test"].get(key) for r in per_seed if isinstance(r.get("test", {}).get(key), (int, float))]
        if values:
            table[key] = {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                          "n": len(values), "values": values}
    return table


def main(args: argparse.Namespace) -> dict[str, Any]:
    seeds = check_args(args)  # before set-up: a bad value costs one line, not a run
    check_output_path(args.output_dir)  # a file there is refused and left untouched
    device = setup(args)
    try:
        base = copy.deepcopy(args)
        main_finetune.apply_preprocessing(base, main_finetune.load_file(args.finetune, flag="--finetune").get("preprocessing")
                                          if args.finetune else None, args.finetune, override=False)
        root_name = os.path.basename(os.path.normpath(args.data_path or "data"))
        task = args.task or "few_shot"
        out_root = os.path.join(args.output_dir, task)
        per_seed = []
        for seed in seeds:
            run_args = copy.deepcopy(base)
            run_args.seed, run_args.task = seed, ""
            # USPEC naming: output_dir/<task>/<data>_<task>_<k>_<seed>
            run_args.output_dir = os.path.join(out_root, f"{root_name}_{task}_{args.few_shot:g}_{seed}")
            done = finished_seed(run_args.output_dir)
            if done is not None:
                logger.info("seed %d already finished in %s (results.json): reusing it; delete the folder to "
                            "redo it", seed, run_args.output_dir)
                result = done
            else:
                datasets = build_split(run_args, seed)
                result = main_finetune.run(run_args, device, datasets)
                if result.get("preempted"):
                    logger.warning("pre-empted during seed %d: rerun the same command to continue", seed)
                    return {"preempted": True, "seeds_done": [r["seed"] for r in per_seed]}
                if not args.keep_last_checkpoint:
                    drop_resume_state(run_args.output_dir)
            result["seed"] = seed
            per_seed.append(result)
        summary = {"few_shot": args.few_shot, "seeds": seeds, "metrics": summarise(per_seed)}
        if is_main_process():
            os.makedirs(out_root, exist_ok=True)
            write_atomic(os.path.join(out_root, "few_shot_summary.json"), json.dumps(summary, indent=1).encode("utf-8"))
            buf = io.StringIO(newline="")
            w = csv.writer(buf)
            w.writerow(["metric", "mean", "sd", "n", *[f"seed_{s}" for s in seeds]])
            for k, v in summary["metrics"].items():
                w.writerow([k, f"{v['mean']:.4f}", f"{v['sd']:.4f}", v["n"], *[f"{x:.4f}" for x in v["values"]]])
            write_atomic(os.path.join(out_root, "few_shot_summary.csv"), buf.getvalue().encode("utf-8"))
            lines = [f"{k:>18}: {v['mean']:.4f} ± {v['sd']:.4f}  (n={v['n']})" for k, v in summary["metrics"].items()]
            logger.info("few-shot k=%g over seeds %s (test set):\n%s", args.few_shot, seeds, "\n".join(lines))
        return summary
    finally:
        cleanup()


if __name__ == "__main__":
    run_main(main, get_args_parser())
