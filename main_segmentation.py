"""Finetune a segmentation model end to end: UPerNet on a ViT or ConvViT backbone (DeblurringMAE's TN3K recipe,
our own code, no mmcv).

Examples:
  # DeblurringMAE's TN3K command (mmseg config names are presets; tools/dist_train.sh wraps this)
  torchrun --nproc_per_node=8 main_segmentation.py --config configs/de_convmae/upernet_de_convmae_us280k_base_gaussian_800_512_tn3k.py \\
      --work-dir work_dirs/tn3k --options model.pretrained=dconvmae_us280k.pth --data_path data/tn3k
  # plain flags
  python main_segmentation.py --model vit_base_patch16 --finetune dmae.pth --data_path DATA --output_dir OUT \\
      --input_size 512 --max_iters 20000 --batch_size 8 --eval mIoU
  # test a finetuned checkpoint (tools/dist_test.sh CONFIG CKPT 1 --eval mIoU)
  python main_segmentation.py --eval_only --resume OUT/checkpoint-best.pth --data_path DATA --eval mIoU

Data (detected, --layout forces): mmseg US `images[_gaussian]/{train,val,test}/*.png` + `masks_1/{split}/*.png`
(0/1); SEG_UNET `images_gaussian/{split}` + `masks/{split}` (255 = foreground); VisionFM
`<ds>/{training,test}/{images,labels}/*`. No val split: a seeded tenth of train selects the checkpoint.
Outputs: checkpoint-{last,best}.pth, log.txt (JSON lines), tensorboard/, test_metrics.json,
test_table.md (| Class | IoU | Acc | Dice |), test_overlay.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any, Iterator

import seg_args
from util.cli import UserError, args_to_dict, check_output_path, exit_if_help, run_main

logger = logging.getLogger("medfound")


def get_args_parser() -> argparse.ArgumentParser:
    return seg_args.get_args_parser("main_segmentation.py", __doc__)


exit_if_help(get_args_parser)
# torch and the models load after --help has exited.
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.data import Sampler  # noqa: E402

import models_upernet  # noqa: E402
from engine_dense import predict_segmentation  # noqa: E402
from util.atomic import write_atomic  # noqa: E402
from util.checkpoint import atomic_save, load_file, rank0_write  # noqa: E402
from util.dist import broadcast_object, cleanup, get_rank, get_world_size, is_main_process  # noqa: E402
from util.logger import RunClock, RunLogger, print_summary  # noqa: E402
from util.loop import STOP, Optimization, Preempted, train_epoch  # noqa: E402
from util.optim import build_adamw, param_groups_lrd  # noqa: E402
from util.recipes import explicit_flags  # noqa: E402
from util.runtime import (RunCheckpointer, check_output_dir, make_loader, maybe_resume, prepare_model,  # noqa: E402
                          resume_position, setup, start_guard, training_started)

# Flags whose change makes a resumed run a different experiment (besides util.runtime's run-level fields).
SEG_RESUME_FIELDS = ("finetune", "num_classes", "layer_decay", "max_iters", "eval_freq", "lr", "loss", "layout",
                     "compat", "power", "warmup_iters", "preset")


# ------------------------------------------------------------------------------------------------ data
class IterationSampler(Sampler):
    """mmseg's iteration-based sampling with exact resume: global sample p (iteration t, rank r, slot j:
    p = (t x world + r) x batch + j) is `perm(seed, pass)[p mod n]` with pass = p // n, yielded as the key
    (pass, index) so augmentation is seeded by (seed, pass, index). A round is `round_iters` iterations
    (one validation interval); the global batches do not depend on the world size."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, round_iters: int,
                 max_iters: int) -> None:
        self.n, self.batch_size, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.round_iters, self.max_iters = round_iters, max_iters
        self.round, self.start = 0, 0
        self._perms: dict[int, np.ndarray] = {}

    def rounds(self) -> int:
        return -(-self.max_iters // self.round_iters)

    def round_len(self, r: int) -> int:
        return min(self.round_iters, self.max_iters - r * self.round_iters)

    def set_epoch(self, r: int) -> None:
        self.round, self.start = r, 0

    def set_start(self, samples: int) -> None:
        """Skip this rank's first `samples` samples of the current round (mid-round resume)."""
        self.start = samples // self.batch_size

    def _perm(self, p: int) -> np.ndarray:
        if p not in self._perms:
            from util.data import sample_seed
            self._perms = {p: np.random.default_rng(sample_seed(self.seed, p, 0x5E6)).permutation(self.n)}
        return self._perms[p]

    def __len__(self) -> int:
        return (self.round_len(self.round) - self.start) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        first = self.round * self.round_iters + self.start
        for t in range(first, self.round * self.round_iters + self.round_len(self.round)):
            for j in range(self.batch_size):
                p = (t * self.world + self.rank) * self.batch_size + j
                yield p // self.n, int(self._perm(p // self.n)[p % self.n])


def list_splits(args: argparse.Namespace, deblur: bool) -> dict[str, list[tuple[str, str]]]:
    """(image, mask) pairs per split; the layout is detected unless --layout forces it. mmseg layout: a
    deblurring backbone reads images_gaussian/ when present, a vanilla one images/. Missing val: a seeded
    tenth of train (at least one image) selects the checkpoint; missing test: val is tested."""
    from util.seg_data import detect_seg_layout, list_seg_pairs
    if not args.data_path or not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path}: not a folder; pass the segmentation dataset root "
                        f"(images/ + masks_1/, images_gaussian/ + masks/, or VisionFM <ds>/training/images)")
    args.layout_used = detect_seg_layout(args.data_path) if args.layout == "auto" else args.layout
    images = None
    if args.layout_used == "mmseg":
        blurred = os.path.isdir(os.path.join(args.data_path, "images_gaussian"))
        images = "images_gaussian" if (deblur and blurred) or not os.path.isdir(os.path.join(args.data_path, "images")) \
            else "images"

    def pairs(split: str, required: bool) -> list[tuple[str, str]]:
        try:
            return list_seg_pairs(args.data_path, split, args.layout_used, images=images)
        except UserError:
            if required:
                raise
            return []
    out = {"train": pairs("train", not args.eval_only) if not args.eval_only else [],
           "val": pairs("val", False), "test": pairs("test", False)}
    if not args.eval_only and not out["train"]:
        raise UserError(f"--data_path {args.data_path}: no training images in the {args.layout_used} layout")
    if not args.eval_only and not out["val"]:
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(out["train"]))
        k = max(1, len(order) // 10) if len(order) > 1 else 0
        out["val"] = [out["train"][i] for i in sorted(order[:k])]
        out["train"] = [out["train"][i] for i in sorted(order[k:])]
        logger.info("no val split: %d of the training images (seed %d) select the checkpoint", k, args.seed)
    if not out["test"]:
        out["test"] = out["val"]
    if args.eval_only and not out["test"]:
        raise UserError(f"--data_path {args.data_path}: no test or val images to evaluate")
    # Every mask read once before any work: a value that is not a class index is one line naming the file.
    from util.seg_data import mask_class_counts
    every = sorted({p for split in out.values() for p in split})
    counts = mask_class_counts(every, args.layout_used, args.num_classes)
    logger.info("%d masks checked; pixels per class: %s", len(every),
                ", ".join(f"{n} {100 * c / max(counts.sum(), 1):.1f}%" for n, c in zip(args.class_names, counts)))
    return out


def resolve_blur(args: argparse.Namespace, pre: dict[str, Any] | None, pairs: list[tuple[str, str]]) -> str:
    """Set args.blur_spec (a BlurSpec dict or None) and return the one line saying which input the model sees."""
    from util.blur import BlurSpec
    pre = pre or {}
    already = bool(pairs) and all(f"{os.sep}images_gaussian{os.sep}" in os.path.abspath(p[0]) for p in pairs)
    recorded = pre.get("blur") if isinstance(pre.get("blur"), dict) else None
    args.blur_spec = None
    if args.blur == "none":
        return "input blur: none (--blur none: the images are used as they are)"
    if args.blur:
        try:
            args.blur_spec = BlurSpec(method=args.blur, sigma=args.blur_sigma, ksize=args.blur_ksize).to_dict()
        except ValueError as e:
            raise UserError(f"--blur {args.blur}: {e}") from None
        return f"input blur: {BlurSpec.from_dict(args.blur_spec).describe()} applied to the images (--blur)"
    if already:
        return "input blur: none added, the images come from images_gaussian/ (already blurred)"
    if recorded:
        args.blur_spec = dict(recorded)
        return (f"input blur: {BlurSpec.from_dict(recorded).describe()} from the checkpoint's preprocessing record, "
                f"applied to the images")
    if args.deblur_preset or pre.get("deblur"):
        source = f"--pretrained {args.finetune} records no blur" if args.finetune else "no --pretrained checkpoint given"
        raise UserError(f"{'--config ' + args.preset if args.preset else '--finetune'}: a deblurring backbone needs "
                        f"blurred input, but {source} and {args.data_path} has no images_gaussian/ folder; state the "
                        f"blur with --blur gaussian --blur_sigma 1.1 (DeblurringMAE's), or --blur none if the images "
                        f"are already blurred")
    return "input blur: none (vanilla encoder)"


def make_dataset(pairs: list[tuple[str, str]], args: argparse.Namespace, train: bool):
    from util.seg_data import SegmentationDataset
    return SegmentationDataset(pairs, args.input_size, args.mean, args.std, train=train, layout=args.layout_used,
                               num_classes=args.num_classes, seed=args.seed, hflip=args.hflip if train else 0.0,
                               vflip=args.vflip if train else 0.0, blur=args.blur_spec, blur_root=args.data_path)


def eval_loader(dataset, args: argparse.Namespace, device: torch.device):
    from util.samplers import SequentialShardSampler
    return make_loader(dataset, SequentialShardSampler(dataset), args, device, args.batch_size, drop_last=False)


# ------------------------------------------------------------------------------------------------ model
def make_forward(args: argparse.Namespace, device: torch.device):
    """util.loop forward: mmseg's CE(decode) + aux_weight x CE(auxiliary) (models_upernet.upernet_loss), or
    Dice + CE / focal (models_seg) on both heads; logs loss_decode and loss_aux."""
    def forward(model: nn.Module, batch: Any):
        images, masks = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True).long()
        logits, aux = model(images, with_aux=True)  # through forward(), so DDP reduces both heads' gradients
        if args.loss == "ce":
            return models_upernet.upernet_loss(logits, aux, masks, args.aux_weight)
        import models_seg
        fn = models_seg.SEG_LOSSES[args.loss]
        decode, aux_loss = fn(logits.float(), masks, args.num_classes), fn(aux.float(), masks, args.num_classes)
        return decode + args.aux_weight * aux_loss, {"loss_decode": decode.detach(), "loss_aux": aux_loss.detach()}
    return forward


def build_model(args: argparse.Namespace) -> nn.Module:
    try:
        return models_upernet.build_segmentor(args.model, num_classes=args.num_classes, img_size=args.input_size,
                                              drop_path_rate=args.drop_path, channels=args.channels,
                                              aux_weight=args.aux_weight)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"--model {args.model}: {e}") from None


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Layer-decay AdamW groups (betas 0.9, 0.999 as mmseg). `--compat mmseg_convmae`: the position table
    takes weight decay, as mmseg's constructor gave it (its exemption compared unprefixed names)."""
    compat = models_upernet.MMSEG_WD_COMPAT if "mmseg_convmae" in (args.compat or "") else None
    no_wd = model.no_weight_decay(compat=compat)
    groups = param_groups_lrd(model, args.weight_decay, args.layer_decay, no_weight_decay=no_wd)
    return build_adamw(groups, lr=args.lr, betas=(0.9, 0.999))


def preprocessing_record(args: argparse.Namespace) -> dict[str, Any]:
    return {"task": "segmentation", "model": args.model, "input_size": args.input_size, "mean": list(args.mean),
            "std": list(args.std), "norm_preset": args.norm_preset, "blur": args.blur_spec,
            "deblur": bool(args.blur_spec) or bool(args.deblur_preset), "class_names": list(args.class_names),
            "num_classes": args.num_classes, "nb_classes": args.num_classes, "layout": args.layout_used,
            "channels": args.channels, "config": args.preset}


def apply_norm(args: argparse.Namespace, pre: dict[str, Any] | None) -> None:
    from util.data import resolve_norm
    pre = pre or {}
    if pre.get("mean") and args.norm_preset is None:
        args.mean, args.std, args.norm_preset = list(pre["mean"]), list(pre["std"]), pre.get("norm_preset", "checkpoint")
    else:
        args.norm_preset = args.norm_preset or "imagenet"
        args.mean, args.std = resolve_norm(args.norm_preset)


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(model: nn.Module, loader, args: argparse.Namespace, device: torch.device, n_boot: int) -> tuple[dict, Any]:
    from util.metric_dense import segmentation_report
    pred, true, index = predict_segmentation(model, loader, device, args.num_classes, args.amp)
    if get_world_size() > 1:  # each rank predicted its shard: every rank gets the whole split, in index order
        parts: list[Any] = [None] * get_world_size()
        torch.distributed.all_gather_object(parts, (pred, true, index))
        pred, true, index = (np.concatenate([p[k] for p in parts]) for k in range(3))
        order = np.argsort(index)
        pred, true, index = pred[order], true[order], index[order]
    return segmentation_report(pred, true, list(args.class_names), n_boot=n_boot, seed=args.seed), (pred, true, index)


def selection_value(report: dict[str, Any], metric: str) -> float:
    return float(report[metric])


def write_report(report: dict[str, Any], outputs: Any, dataset, args: argparse.Namespace, prefix: str,
                 checkpoint: str) -> None:
    """`{prefix}_metrics.json`, `{prefix}_table.md` (the seed's table + Dice) and `{prefix}_overlay.png` (rank 0)."""
    if not is_main_process():
        return
    from util.dense_vis import seg_overlay_png
    from util.metric_dense import seg_table_markdown
    record = {"checkpoint": checkpoint, "split": prefix, **report}
    write_atomic(os.path.join(args.output_dir, f"{prefix}_metrics.json"),
                 json.dumps(record, indent=1, default=_plain).encode("utf-8"))
    write_atomic(os.path.join(args.output_dir, f"{prefix}_table.md"), seg_table_markdown(report).encode("utf-8"))
    pred, true, index = outputs
    n = min(args.vis_images, len(index))
    if n:
        mean, std = np.asarray(args.mean).reshape(3, 1, 1), np.asarray(args.std).reshape(3, 1, 1)
        rows = [int(i) for i in np.argsort(index)[:n]]
        images = np.stack([np.clip((dataset[int(index[r])][0].numpy() * std + mean) * 255, 0, 255).round()
                           .astype(np.uint8).transpose(1, 2, 0) for r in rows])
        seg_overlay_png(images, pred[rows], true[rows], os.path.join(args.output_dir, f"{prefix}_overlay.png"),
                        list(args.class_names))


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def summary_line(report: dict[str, Any]) -> str:
    """mIoU / mDice (95% CI) / aAcc in percent, as the seed prints them."""
    def one(k: str) -> str:
        band = report.get(f"{k}_ci")
        text = f"{k} {100 * float(report[k]):.2f}"
        return text + (f" [{100 * band[0]:.2f}, {100 * band[1]:.2f}]" if band else "")
    return "  ".join(one(k) for k in ("mIoU", "mDice", "aAcc") if report.get(k) is not None)


def test_command(args: argparse.Namespace, ckpt: str) -> str:
    metric = " ".join(args.eval)
    if args.preset:
        return f"tools/dist_test.sh {args.config} {ckpt} 1 --eval {metric} --data_path {args.data_path}"
    return f"python main_segmentation.py --eval_only --resume {ckpt} --data_path {args.data_path} --eval {metric}"


def run_eval_only(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Test a finetuned checkpoint: model, size, classes, normalisation and blur come from its record."""
    ckpt = load_file(args.resume, flag="--resume")
    pre = ckpt.get("preprocessing") if isinstance(ckpt, dict) else None
    if not pre or pre.get("task") != "segmentation":
        raise UserError(f"--resume {args.resume}: not a segmentation checkpoint written by main_segmentation.py "
                        f"(checkpoint-best.pth or checkpoint-last.pth)")
    for key in ("model", "input_size", "num_classes", "class_names", "channels"):
        setattr(args, key, pre[key])
    args.mean, args.std, args.norm_preset = list(pre["mean"]), list(pre["std"]), pre.get("norm_preset")
    args.blur_spec, args.deblur_preset = pre.get("blur"), bool(pre.get("deblur"))
    splits = list_splits(args, args.deblur_preset)
    if args.layout != "auto" and pre.get("layout") and args.layout_used != pre["layout"]:
        logger.info("--layout %s (the checkpoint was trained on %s)", args.layout_used, pre["layout"])
    already = all(f"{os.sep}images_gaussian{os.sep}" in os.path.abspath(p[0]) for p in splits["test"])
    if already and args.blur_spec:
        args.blur_spec = None
    logger.info("input blur: %s", "images_gaussian/ (already blurred)" if already else (args.blur_spec or "none"))
    model = build_model(args)
    model.load_state_dict(ckpt["model"])
    model.to(device)
    del ckpt
    test_set = make_dataset(splits["test"], args, train=False)
    report, out = evaluate(model, eval_loader(test_set, args, device), args, device, args.bootstrap)
    check_output_dir(args.output_dir)
    write_report(report, out, test_set, args, "eval_test", os.path.basename(args.resume))
    print_summary("segmentation test", [("checkpoint", args.resume), ("model", args.model),
                                        ("test", f"{len(test_set)} images: {summary_line(report)}"),
                                        ("outputs", f"{args.output_dir}/eval_test_{{metrics.json,table.md,overlay.png}}")])
    if is_main_process():
        from util.metric_dense import seg_table_markdown
        logger.info("\n%s", seg_table_markdown(report))
    return {"test": report}


# ------------------------------------------------------------------------------------------------ training
def train(args: argparse.Namespace, device: torch.device, given: set[str]) -> dict[str, Any]:
    pretrained = load_file(args.finetune, flag="--pretrained") if args.finetune else None
    pre = pretrained.get("preprocessing") if isinstance(pretrained, dict) else None
    apply_norm(args, pre)
    deblur = args.deblur_preset or bool((pre or {}).get("deblur")) or args.blur not in (None, "none")
    splits = list_splits(args, deblur)
    blur_line = resolve_blur(args, pre, splits["train"])
    world = get_world_size()
    iters_per_pass = max(1, len(splits["train"]) // (args.batch_size * world * args.accum_iter))
    changed = seg_args.schedule_lengths(args, given, iters_per_pass)
    model = build_model(args)
    report = None
    if args.finetune:
        report = models_upernet.load_backbone(model, args.finetune, ckpt=pretrained, flag="--pretrained")
    del pretrained
    view, _ = prepare_model(model, args, device)
    optimizer = build_optimizer(model, args)
    opt = Optimization(optimizer, args.amp, args.accum_iter, args.clip_grad, args.max_nonfinite)
    config = args_to_dict(args)
    config.pop("explicit_flags", None)
    check_output_dir(args.output_dir)
    ckpt = maybe_resume(args, config, model, opt, SEG_RESUME_FIELDS)
    args.start_epoch = 0  # util.runtime.resume_position's fresh-start round
    start_round, start_step, loop_state = resume_position(args, ckpt)
    run_logger = RunLogger(args.output_dir, args.log_dir or os.path.join(args.output_dir, "tensorboard"))
    logger.info("%s", blur_line)
    applied = {**args.preset_applied, **changed}
    logger.info("%s: %s (flags you pass win)", f"preset {args.preset}" if args.preset else "mmseg UPerNet recipe",
                ", ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in applied.items())
                or "nothing to fill")
    if ckpt is None:
        run_logger.json_line({"preset": args.preset, "applied": applied, "input_blur": blur_line,
                              "layout": args.layout_used, "pretrained": report and {
                                  k: report[k] for k in ("missing", "pos_embed_resized")}})
    train_set = make_dataset(splits["train"], args, train=True)  # read with (pass, index) keys
    val_set = make_dataset(splits["val"], args, train=False)
    test_set = make_dataset(splits["test"], args, train=False)
    # The sampler counts loader batches (micro-steps); an iteration (one update) is accum_iter of them.
    accum = args.accum_iter
    sampler = IterationSampler(len(train_set), args.batch_size, world, get_rank(), args.seed, args.eval_freq * accum,
                               args.max_iters * accum)
    train_loader = make_loader(train_set, sampler, args, device, args.batch_size, drop_last=True)
    val_loader = eval_loader(val_set, args, device)
    metric = args.eval[0]
    best = {"value": None, "round": -1, "iter": 0}
    if ckpt and isinstance(ckpt.get("best"), dict):
        best = dict(ckpt["best"])
    best_path = os.path.join(args.output_dir, "checkpoint-best.pth")
    preprocessing = preprocessing_record(args)
    checkpointer = RunCheckpointer(args, model, opt, config, extra=lambda: {"preprocessing": preprocessing,
                                                                             "best": dict(best)})

    def lr_fn(progress: float) -> float:
        r = int(progress)
        micro = round(r * sampler.round_iters + (progress - r) * sampler.round_len(r))
        lr = seg_args.poly_lr(micro / accum, args)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
    forward = make_forward(args, device)
    logger.info("%s UPerNet: %d train / %d val / %d test images (%s layout), %d iterations at %d x %d images, "
                "lr %.3g, validation every %d", args.model, len(train_set), len(val_set), len(test_set),
                args.layout_used, args.max_iters, args.batch_size * args.accum_iter, world, args.lr, args.eval_freq)
    STOP.install()
    training_started(args.output_dir)
    start = time.time()
    rounds = sampler.rounds()
    clock = RunClock(start_round + start_step / max(sampler.round_len(start_round), 1), rounds)
    for r in range(start_round, rounds):
        sampler.set_epoch(r)
        first = start_step if r == start_round else 0
        sampler.set_start(first * args.batch_size)
        steps = sampler.round_len(r)
        checkpointer.steps_per_epoch = steps
        try:
            stats = train_epoch(view, train_loader, opt, r, device, forward, lr_fn, run_logger=run_logger,
                                print_freq=args.print_freq, header=f"Iter [{r * args.eval_freq}+]", start_step=first,
                                steps_per_epoch=steps, seed=args.seed, on_update=checkpointer.on_update(r),
                                loop_state=loop_state if first else None, clock=clock)
        except Preempted as e:
            logger.warning("%s", e)
            run_logger.close()
            return {"preempted": True}
        done = (r * sampler.round_iters + sampler.round_len(r)) // accum
        val_report, _ = evaluate(model, val_loader, args, device, 0)
        value = selection_value(val_report, metric)
        record = {"round": r, "iter": done, **{f"train_{k}": v for k, v in stats.items()},
                  **{f"val_{k}": float(val_report[k]) for k in ("mIoU", "mDice", "mAcc", "aAcc") if k in val_report}}
        # x axis as the loop's train curves: 1000 per validation interval
        run_logger.scalars({k: v for k, v in record.items() if k.startswith("val_")}, (r + 1) * 1000)
        logger.info("iter %d val: %s", done, summary_line(val_report))
        if best["value"] is None or value > best["value"]:
            best = {"value": value, "round": r, "iter": done}
            state = {"model": model.state_dict(), "iter": done, "args": config, "preprocessing": preprocessing,
                     "best": dict(best), "val": {metric: value}}
            rank0_write(lambda: atomic_save(state, best_path), best_path)
        record["best_iter"] = best["iter"]
        checkpointer.end_of_epoch(r, periodic=False)
        run_logger.json_line(record)
    train_time = time.time() - start
    use_best = broadcast_object(is_main_process() and os.path.isfile(best_path))
    if use_best:
        model.load_state_dict(load_file(best_path, flag="checkpoint-best.pth")["model"])
    tested = f"checkpoint-best.pth (iter {best['iter']}, val {metric} {100 * best['value']:.2f})" if use_best \
        else "final weights"
    test_report, out = evaluate(model, eval_loader(test_set, args, device), args, device, args.bootstrap)
    write_report(test_report, out, test_set, args, "test", tested)
    run_logger.json_line({"test": {k: test_report[k] for k in ("mIoU", "mDice", "mAcc", "aAcc") if k in test_report},
                          "checkpoint": tested})
    run_logger.scalars({f"test_{k}": float(test_report[k]) for k in ("mIoU", "mDice", "aAcc") if k in test_report},
                       rounds * 1000)
    run_logger.close()
    if is_main_process():
        from util.metric_dense import seg_table_markdown
        logger.info("test (%s):\n%s", tested, seg_table_markdown(test_report))
    print_summary("segmentation finetuning", [
        ("run", f"{args.preset or args.model}: {args.max_iters} iterations, lr {args.lr:.3g}, {train_time:.0f} s"),
        ("input", blur_line),
        ("best", f"iter {best['iter']} (val {metric} {100 * best['value']:.2f})" if best["value"] is not None else None),
        ("test", f"{summary_line(test_report)}  [{tested}]"),
        ("outputs", f"{args.output_dir}/{{checkpoint-best.pth,test_metrics.json,test_table.md,test_overlay.png,"
                    f"log.txt}}")],
        next_cmd=test_command(args, best_path if use_best else os.path.join(args.output_dir, "checkpoint-last.pth")))
    return {"best": best, "test": test_report, "train_time_s": round(train_time, 1)}


def main(args: argparse.Namespace) -> dict[str, Any]:
    given = explicit_flags(args, get_args_parser())
    if args.eval_only and args.output_dir is None:
        args.output_dir = os.path.dirname(os.path.abspath(args.resume)) if args.resume else None
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    args.preset_applied = seg_args.resolve_args(args, given, world)
    from util.registry import is_registered
    import models_convmae  # noqa: F401  (registers the ConvViT factories)
    import models_vit  # noqa: F401
    if not args.eval_only and not is_registered(args.model):
        raise UserError(f"--model {args.model}: unknown backbone; use vit_base_patch16, convvit_base_patch16, "
                        f"vit_micro_patch8 or convvit_micro_patch16")
    if not args.eval_only:
        from util.cli import check_patch_multiple, patch_size_of
        check_patch_multiple(args.input_size, args.model)
        stride = patch_size_of(args.model) or 16
        if args.input_size < 2 * stride:
            raise UserError(f"--input_size {args.input_size}: UPerNet on {args.model} needs at least {2 * stride} "
                            f"(two patches of {stride})")
    for flag, path in (("--pretrained", args.finetune), ("--resume", args.resume)):
        if path and not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such file")
    check_output_path(args.output_dir)
    device = setup(args)
    try:
        with start_guard(args.output_dir):
            return run_eval_only(args, device) if args.eval_only else train(args, device, given)
    finally:
        cleanup()


if __name__ == "__main__":
    run_main(main, get_args_parser())
