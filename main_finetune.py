"""Finetune, linear-probe, evaluate and predict with a ViT classifier on a pretrained encoder.

Examples:
  # USPEC / RETFound recipe (seed command)
  torchrun --nproc_per_node=1 main_finetune.py --batch_size 16 --model RETFound_mae --savemodel --epochs 100 \\
      --blr 5e-3 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.2 --nb_classes 5 --data_path DATA \\
      --input_size 224 --finetune USPEC.pt --output_dir ./finetune_models --task USPEC --global_pool
  # evaluate a finetuned checkpoint on DATA/test (preprocessing comes from the checkpoint)
  python main_finetune.py --eval --resume out/checkpoint-best.pth --data_path DATA
  # per-class probabilities for a folder of images
  python main_finetune.py --predict FOLDER --resume out/checkpoint-best.pth --output_dir preds/
  # linear probe (frozen encoder, BatchNorm + linear head, LARS)
  python main_finetune.py --linprobe --model vit_base_patch16 --cls_token --finetune mae.pth --data_path DATA

Data: DATA/{train,val,test}/<class>/<image> (val optional: a seeded stratified carve of train is used and
recorded), or VisionFM label files ({training,test}_labels.txt with `path;label` or multi-hot lines).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import time
from typing import Any

import finetune_args
from util.cli import UserError, args_to_dict, check_output_path, exit_if_help, run_main

logger = logging.getLogger("medfound")

RECIPES, SMALL_DATA_IMAGES = finetune_args.RECIPES, finetune_args.SMALL_DATA_IMAGES


def get_args_parser() -> argparse.ArgumentParser:
    return finetune_args.get_args_parser("main_finetune.py", __doc__, SMALL_DATA_IMAGES)


exit_if_help(get_args_parser)
# The imports below pull in torch and the models; --help has already exited above without them.
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from engine_finetune import evaluate, predict, train_one_epoch  # noqa: E402
from finetune_setup import (_blur_spec, add_cbis_report, apply_beit_flags, apply_preprocessing,  # noqa: E402,F401
                            build_classifier, build_criterion, build_optimizer, compat_flags, eval_loader,
                            load_encoder_weights, load_finetuned, load_splits, preprocessing_record, resolve_model_name,
                            restart_lr, split_transform, summarise, task_type, trainable_parameters,
                            write_eval_outputs)
from util.checkpoint import atomic_save, load_file, load_pretrained_encoder, rank0_write  # noqa: E402
from util.dist import broadcast_object, cleanup, get_rank, get_world_size, is_main_process  # noqa: E402
from util.logger import RunClock, RunLogger, files_in, print_summary, warn_if  # noqa: E402
from util.loop import Optimization  # noqa: E402
from util.lr_sched import adjust_learning_rate, effective_lr  # noqa: E402
from util.diagnostics import (chance_auroc_warning, plateau_warning, plateau_window, single_class_warning,  # noqa: E402
                              warmup_warning)
from util.recipes import apply_recipe, explicit_flags  # noqa: E402
from util.data import EpochIndexSampler  # noqa: E402
from util.skipping import gather_skipped  # noqa: E402
from util.loop import STOP, Preempted  # noqa: E402
from util.runtime import (RunCheckpointer, check_output_dir, make_loader, maybe_resume, prepare_model, resume_position,  # noqa: E402
                          setup, start_guard, training_started)
from util.atomic import write_atomic  # noqa: E402
from util.label_layouts import CBIS_CLASSES  # noqa: E402

# Finetuning flags whose change makes a resumed run a different experiment (besides util.runtime's
# run-level fields and the classifier family's own `resume_fields`).
FINETUNE_RESUME_FIELDS = ("layer_decay", "nb_classes", "finetune", "linprobe")


# ------------------------------------------------------------------------------------------------ modes
def run_predict(args: argparse.Namespace, device: torch.device) -> str:
    """Folder of images -> predictions.csv (path, per-class probabilities, predicted class)."""
    from util.data import list_images
    from util.datasets import LabelledImageDataset
    from util.finetune_transforms import decode_min_side
    ckpt = load_finetuned(args, "--predict", explicit_flags(args, get_args_parser()))
    model = build_classifier(args)
    load_pretrained_encoder(model, args.resume, reset_head=False, ckpt=ckpt, flag="--resume")
    del ckpt
    model.to(device)
    files = list_images(args.predict) if os.path.isdir(args.predict) else []
    if not files:
        raise UserError(f"--predict {args.predict}: no images found")
    transform = split_transform(False, args)
    ds = LabelledImageDataset([(f, 0) for f in files], transform, list(args.class_names), blur=_blur_spec(args),
                              blur_root=args.predict, bad_image=args.bad_image,
                              decode_min_side=decode_min_side(False, args.input_size) if args.jpeg_draft else 0)
    loader = eval_loader(ds, args, device)
    out = predict(model, loader, device, args.amp, args.task_type)
    skipped = gather_skipped(loader)  # --bad_image skip: left out of predictions.csv, listed beside it
    n_read = len(out["indices"])
    if n_read == 0:
        raise UserError(f"--predict {args.predict}: none of the {len(files)} images could be read")
    path = os.path.join(args.output_dir, "predictions.csv")
    if is_main_process():
        check_output_dir(args.output_dir)
        probs = out["probs"]
        names = list(args.class_names)
        if args.task_type == "binary_sigmoid":
            probs = np.concatenate([1 - probs, probs], axis=1)
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(["path", *[f"prob_{n}" for n in names], "prediction"])
        for i, idx in enumerate(out["indices"]):
            row = probs[i]
            pred = ";".join(n for n, p in zip(names, row) if p >= 0.5) if args.task_type == "multilabel" \
                else names[int(np.argmax(row))]
            w.writerow([files[int(idx)], *[f"{p:.6f}" for p in row], pred])
        write_atomic(path, buf.getvalue().encode("utf-8"))  # a full disk: one line, the previous file intact
        listed = os.path.join(args.output_dir, "skipped_images.txt")
        if skipped:
            write_atomic(listed, "".join(p + "\n" for p in skipped).encode("utf-8"))
        elif os.path.isfile(listed):  # from an earlier run into this folder: it no longer describes predictions.csv
            os.remove(listed)
        logger.info("wrote %s (%d images%s)", path, n_read, f"; {len(skipped)} unreadable, listed in {listed}"
                    if skipped else "")
    print_summary("prediction", [("checkpoint", args.resume), ("model", args.model),
                                 ("images", f"{n_read} from {args.predict}" + (
                                     f" ({len(skipped)} unreadable skipped: skipped_images.txt)" if skipped else "")),
                                 ("predictions", path)],
                  next_cmd=f"python explain.py --checkpoint {args.resume} --method chefer --output_dir "
                           f"{os.path.join(args.output_dir, 'explain')} {files[int(out['indices'][0])]}")
    return path


def run_knn(model: nn.Module, datasets: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict:
    """k-NN evaluation of frozen features (no training): train split as the memory bank, test split
    (else val) as queries; metrics through the same metrics module as finetuning."""
    from util.inference import knn_classify
    from util.inference import extract_features
    from util.finetune_transforms import decode_min_side
    from util.metrics import classification_metrics
    if args.task_type != "multiclass":
        raise UserError("--knn supports single-label classification (nb_classes >= 2)")
    eval_tf = split_transform(False, args)
    train = datasets["train"]
    train.transform = eval_tf  # features of un-augmented images
    train.decode_min_side = decode_min_side(False, args.input_size) if args.jpeg_draft else 0
    query = datasets.get("test") or datasets.get("val")
    if query is None:
        raise UserError("--knn needs a test or val split to query")
    bank, bank_y, _ = extract_features(model, eval_loader(train, args, device), device, args.amp)
    feats, y, _ = extract_features(model, eval_loader(query, args, device), device, args.amp)
    results = {}
    for k in args.knn_k:
        probs = knn_classify(bank, bank_y, feats, args.nb_classes, k=k)
        results[f"k{k}"] = classification_metrics(y.numpy(), probs.numpy(), num_classes=args.nb_classes,
                                                  class_names=list(args.class_names))
        logger.info("k-NN (k=%d, %d bank images): %s", k, len(bank), summarise(results[f"k{k}"]))
    if is_main_process():
        write_atomic(os.path.join(args.output_dir, "knn_metrics.json"), json.dumps(results, indent=1).encode("utf-8"))
    return {"knn": results}


def run_eval(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Test metrics of a finetuned checkpoint on data_path's test split; nothing is written on failure."""
    from util.datasets import build_dataset
    ckpt = load_finetuned(args, "--eval", explicit_flags(args, get_args_parser()))
    test_set = build_dataset("test", args)
    test_set.transform = split_transform(False, args)
    if list(test_set.classes) != list(args.class_names) and args.task_type != "binary_sigmoid":
        raise UserError(f"--data_path {args.data_path}: test classes {list(test_set.classes)} differ from the "
                        f"checkpoint's {list(args.class_names)}")
    model = build_classifier(args)
    load_pretrained_encoder(model, args.resume, reset_head=False, ckpt=ckpt, flag="--resume")
    del ckpt
    model.to(device)
    metrics, out = evaluate(model, eval_loader(test_set, args, device), device, args, bootstrap=args.bootstrap)
    if list(args.class_names) == list(CBIS_CLASSES):
        add_cbis_report(metrics, out, args)
    check_output_dir(args.output_dir)
    run_logger = RunLogger(args.output_dir, args.log_dir or os.path.join(args.output_dir, "tensorboard"))
    write_eval_outputs(metrics, out, args, "eval_test", run_logger, checkpoint=os.path.basename(args.resume))
    run_logger.close()
    warn_if(chance_auroc_warning(metrics, "test"))
    print_summary("evaluation", [("checkpoint", args.resume), ("model", args.model),
                                 ("test", summarise(metrics, ci=True)), ("outputs", files_in(args.output_dir, "eval_test"))],
                  next_cmd=f"python main_finetune.py --predict FOLDER --resume {args.resume} --output_dir {args.output_dir}")
    return {"test": metrics}


def adapt_to_dataset(args: argparse.Namespace, n_train: int) -> None:
    """Resolve --recipe (auto: small_data below SMALL_DATA_IMAGES training images) and the warm-up
    length, logging every default that changes; flags the user typed are never changed."""
    given = explicit_flags(args, get_args_parser())
    recipe = args.recipe
    if recipe == "auto":
        recipe = "small_data" if n_train < SMALL_DATA_IMAGES and not args.linprobe else "mae"
    args.recipe_applied = recipe
    args.train_images = n_train
    if recipe != "mae" and not recipe.startswith("medslip"):  # the MedSLIP recipes applied before the data
        apply_recipe(args, recipe, RECIPES, given,
                     why=f"{n_train} training images < {SMALL_DATA_IMAGES}" if args.recipe == "auto" else "")
    if "warmup_epochs" not in given and args.warmup_epochs >= args.epochs / 4 and args.epochs > 1:
        warm = max(1, round(args.epochs / 10))
        if warm != args.warmup_epochs:
            logger.info("--warmup_epochs %g -> %d: a quarter or more of a %d-epoch run would be warm-up",
                        args.warmup_epochs, warm, args.epochs)
            args.warmup_epochs = warm


def run(args: argparse.Namespace, device: torch.device, datasets: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or evaluate) and return the results dict; callable from Python (few-shot runs use it)."""
    finetune_args.check_args(args)  # flag ranges, also for Python callers
    if args.adaptation == "lp":
        args.linprobe = True
    if args.linprobe and args.blr == 1e-3:
        args.blr = 0.1  # MAE linear-probe base lr
    if args.linprobe and args.weight_decay == 0.05:
        args.weight_decay = 0.0
    if args.task:
        args.output_dir = os.path.join(args.output_dir, args.task)
    if args.predict:
        return {"predictions": run_predict(args, device)}
    if args.eval:
        return run_eval(args, device)

    given = explicit_flags(args, get_args_parser())
    if args.recipe.startswith("medslip"):  # they decide the data's validation split and transform
        args.recipe_applied = args.recipe
        apply_recipe(args, args.recipe, RECIPES, given)
    apply_beit_flags(args, given)
    pretrained = load_file(args.finetune, flag="--finetune") if args.finetune else None  # read once: preprocessing, then weights
    apply_preprocessing(args, pretrained.get("preprocessing") if isinstance(pretrained, dict) else None,
                        args.finetune, override=False)
    resolve_model_name(args, pretrained)
    if datasets is None:
        datasets = load_splits(args)
    train_set, val_set, test_set = datasets["train"], datasets.get("val"), datasets.get("test")
    for name, ds in datasets.items():
        if ds is not None and name != "train" and getattr(args, "transform", "mae") != "mae":
            ds.transform = split_transform(False, args)
    if not args.knn:
        adapt_to_dataset(args, len(train_set))
        train_set.transform = split_transform(True, args)  # the recipe may change the augmentation
    classes = list(train_set.classes)
    if args.nb_classes is None:
        if len(classes) < 2 and not args.multilabel:
            raise UserError(f"--data_path {args.data_path}: the training data has {len(classes)} class "
                            f"({', '.join(map(repr, classes)) or 'none'}); a classifier needs at least two (add "
                            f"the other class's folder, or pass --nb_classes 1 for a one-logit task)")
        args.nb_classes = len(classes)
    args.class_names = classes if args.nb_classes != 1 else (classes if len(classes) == 2 else ["negative", "positive"])
    args.task_type = task_type(args)
    model = build_classifier(args)
    report = load_encoder_weights(model, args, pretrained)
    del pretrained
    trainable_parameters(model, args)
    model, model_without_ddp = prepare_model(model, args, device)
    check_output_dir(args.output_dir)
    if args.knn:
        return run_knn(model_without_ddp, datasets, args, device)

    world = get_world_size()
    if args.lr is None:
        args.lr = effective_lr(args.blr, args.batch_size, args.accum_iter, world)
    optimizer = build_optimizer(model_without_ddp, args)
    opt = Optimization(optimizer, args.amp, args.accum_iter, args.clip_grad, args.max_nonfinite)
    criterion, mixup_fn = build_criterion(args, train_set)
    config = args_to_dict(args)
    config.pop("explicit_flags", None)
    # a fresh start moves an earlier run's files aside
    ckpt = maybe_resume(args, config, model_without_ddp, opt, FINETUNE_RESUME_FIELDS)
    start_epoch, start_step, loop_state = resume_position(args, ckpt)
    run_logger = RunLogger(args.output_dir, args.log_dir or os.path.join(args.output_dir, "tensorboard"))

    if args.balanced_sampler:
        if world > 1:
            raise UserError("--balanced_sampler works in a single process; use --class_weights with several GPUs")
        from util.samplers import balanced_sampler
        sampler = balanced_sampler(train_set.samples, args.nb_classes, seed=args.seed)
    else:
        # (epoch, index) keys + a dataset seed: every sample's augmentation is a function of
        # (seed, epoch, index), so resumed and multi-process runs see the same images.
        # --compat medslip_cbis: batches in CSV order every epoch, as MedSLIP's probe (shuffle=False) drew them
        sampler = EpochIndexSampler(train_set, num_replicas=world, rank=get_rank(),
                                    shuffle="medslip_cbis" not in compat_flags(args), seed=args.seed)
        train_set.seed = args.seed
    if len(train_set) < args.batch_size * world:
        args.batch_size = max(1, len(train_set) // world)
        logger.warning("training set smaller than one batch: --batch_size lowered to %d", args.batch_size)
    train_loader = make_loader(train_set, sampler, args, device, args.batch_size, drop_last=True)
    val_loader = eval_loader(val_set, args, device) if val_set is not None and len(val_set) else None
    logger.info("%s: %d train / %d val / %d test images, classes %s, task %s, lr %.3g, %s",
                args.model, len(train_set), len(val_set) if val_set is not None else 0,
                len(test_set) if test_set is not None else 0, args.class_names, args.task_type, args.lr,
                "linear probe" if args.linprobe else "frozen encoder, head trained" if args.freeze_encoder else "finetune")
    from util.metrics import is_better_epoch, select_metric
    best_value, best_loss, best_epoch, stale = None, None, -1, 0
    if ckpt and "best_epoch" in ckpt:  # resumed: keep the selection state of the interrupted run
        best_value, best_epoch, stale = ckpt.get("best_value"), int(ckpt["best_epoch"]), int(ckpt.get("stale", 0))
        best_loss = ckpt.get("best_loss")
    best_path = os.path.join(args.output_dir, "checkpoint-best.pth")
    preprocessing = preprocessing_record(args)
    steps_per_epoch = len(sampler) // args.batch_size
    checkpointer = RunCheckpointer(args, model, opt, config, extra=lambda: {
        "preprocessing": preprocessing, "best_value": best_value, "best_loss": best_loss, "best_epoch": best_epoch,
        "stale": stale})
    checkpointer.steps_per_epoch = steps_per_epoch
    if args.inject_nonfinite:
        opt.poison_steps = {int(x) for x in args.inject_nonfinite.split(",") if x.strip()}
    STOP.install()
    training_started(args.output_dir)  # from here a failure keeps the run's files (checkpoints, log)
    start = time.time()
    clock = RunClock(start_epoch + start_step / max(steps_per_epoch, 1), args.epochs)
    train_losses: list[float] = []
    warnings: list[str] = []  # also listed in results.json

    def warn(message: str | None) -> None:
        if message and message not in warnings and warn_if(message):
            warnings.append(message)
    warn(warmup_warning(args.warmup_epochs, args.epochs))
    medslip_compat = "medslip_cbis" in compat_flags(args)
    if medslip_compat:  # warm restarts every 5 batches; the last epoch is the one tested
        logger.info("--compat medslip_cbis: val = %s, unshuffled batches, lr restarts every 5 batches, last epoch "
                    "tested", (val_set.split_info.get("val_source") if val_set is not None else None) or "none")

    def lr_fn(e: float) -> float:
        return restart_lr(optimizer, e, args, steps_per_epoch) if medslip_compat else adjust_learning_rate(optimizer, e, args)
    for epoch in range(start_epoch, args.epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        first = start_step if epoch == start_epoch else 0
        if hasattr(sampler, "set_start"):
            sampler.set_start(first * args.batch_size)
        try:
            stats = train_one_epoch(model, train_loader, opt, device, epoch, args, criterion,
                                    lr_fn, mixup_fn, run_logger,
                                    start_step=first, steps_per_epoch=steps_per_epoch,
                                    loop_state=loop_state if first else None, on_update=checkpointer.on_update(epoch),
                                    clock=clock)
        except Preempted as e:
            logger.warning("%s", e)
            run_logger.close()
            return {"preempted": True}
        record: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
        train_losses.append(stats["loss"])
        if not mixup_fn and not any("chance level" in w for w in warnings):
            warn(plateau_warning(train_losses, args.nb_classes, args.task_type, plateau_window(args.epochs)))
        improved = val_loader is None  # without validation, the last epoch is the selected one
        if val_loader is not None:
            val_metrics, val_out = evaluate(model, val_loader, device, args)
            value = select_metric(val_metrics, args.metric)
            record.update({f"val_{k}": v for k, v in val_metrics.items() if isinstance(v, (int, float))})
            run_logger.scalars({k: v for k, v in record.items() if k.startswith("val_") and v is not None}, epoch)
            logger.info("epoch %d val: %s", epoch, summarise(val_metrics))
            improved = medslip_compat or is_better_epoch(value, val_metrics.get("loss"), best_value, best_loss,
                                                         args.metric)
            if improved:
                best_value, best_loss, best_epoch, stale = value, val_metrics.get("loss"), epoch, 0
            else:
                stale += 1
            last_val_probs = val_out["probs"]
        if improved:
            best_epoch = epoch
            if args.savemodel:  # every rank: rank 0 writes, all agree on whether it worked
                rank0_write(lambda: atomic_save({"model": model_without_ddp.state_dict(), "epoch": epoch, "args": config,
                                                 "preprocessing": preprocessing,
                                                 "val_metric": {args.metric: best_value}}, best_path), best_path)
        checkpointer.end_of_epoch(epoch, periodic=False)
        run_logger.json_line(record)
        if args.early_stops and stale >= args.early_stops:
            logger.info("no improvement of val %s for %d epochs: stopping early", args.metric, stale)
            break
    train_time = time.time() - start
    logger.info("training time %.1f s; best epoch %d (val %s = %s)", train_time, best_epoch, args.metric, best_value)
    if val_loader is not None and args.epochs > start_epoch:
        warn(single_class_warning(last_val_probs, args.class_names, args.task_type, "val"))
    results: dict[str, Any] = {"best_epoch": best_epoch, "best_val": best_value, "metric": args.metric,
                               "val_split": getattr(val_set, "split_info", None), "recipe": args.recipe_applied,
                               "train_time_s": round(train_time, 1), "pretrained": report and {
                                   k: report[k] for k in ("missing", "pos_embed_resized", "dropped_head")}}
    tested = None
    if test_set is not None and len(test_set):
        # Rank 0 decides (a node-local or NFS-cached view of the folder could differ between ranks).
        use_best = args.savemodel and broadcast_object(is_main_process() and os.path.isfile(best_path))
        if use_best:
            load_pretrained_encoder(model_without_ddp, best_path, reset_head=False)
        tested = f"checkpoint-best.pth (epoch {best_epoch})" if use_best else "final weights"
        test_metrics, out = evaluate(model, eval_loader(test_set, args, device), device, args, bootstrap=args.bootstrap)
        if list(args.class_names) == list(CBIS_CLASSES):
            add_cbis_report(test_metrics, out, args)
        write_eval_outputs(test_metrics, out, args, "test", run_logger, best_epoch, checkpoint=tested)
        logger.info("test (%s): %s", tested, summarise(test_metrics))
        warn(chance_auroc_warning(test_metrics, "test"))
        results["test"] = test_metrics
    results["warnings"] = warnings
    if is_main_process():
        write_atomic(os.path.join(args.output_dir, "results.json"),
                     json.dumps(results, indent=1, default=str).encode("utf-8"))
    run_logger.close()
    best = os.path.join(args.output_dir, "checkpoint-best.pth")
    print_summary("finetuning", [
        ("run", f"{args.model}, recipe {args.recipe_applied}, {args.epochs} epochs, lr {args.lr:.3g}, "
                f"{train_time:.0f} s"),
        ("best epoch", f"{best_epoch} (val {args.metric} {best_value:.4f})" if isinstance(best_value, float)
         else str(best_epoch)),
        ("test", tested and f"{summarise(results['test'], ci=True)}  [{tested}]"),
        ("checkpoint", best if os.path.isfile(best) else os.path.join(args.output_dir, "checkpoint-last.pth")),
        ("outputs", files_in(args.output_dir, "test") + ", log.txt, results.json")],
        next_cmd=f"python main_finetune.py --eval --resume {best} --data_path {args.data_path}"
        if os.path.isfile(best) else None)
    return results


def main(args: argparse.Namespace) -> dict[str, Any]:
    finetune_args.check_args(args)  # before set-up: a bad value costs one line, not a run
    check_output_path(os.path.join(args.output_dir, args.task) if args.task else args.output_dir)
    device = setup(args)
    try:  # a failed start leaves no config, tensorboard/ or empty folder of its own behind
        with start_guard(os.path.join(args.output_dir, args.task) if args.task else args.output_dir):
            return run(args, device)
    finally:
        cleanup()


if __name__ == "__main__":
    run_main(main, get_args_parser())
