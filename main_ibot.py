"""iBOT / VisionFM self-distillation pretraining: flags (ibot_args.py) -> dataset, student, EMA teacher, loss,
optimizer, checkpoints, and the epoch loop (engine_ibot.py).

Checkpoints hold `student` (keys with DDP's `module.` prefix, as the reference writes them), `teacher`,
`ibot_loss` (its running centres), `optimizer`, `epoch`, `args`, and `fp16_scaler` under fp16, plus
medfound's resume bookkeeping; the teacher is the encoder to finetune (`--checkpoint_key teacher`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import ibot_args
from util.cli import (UserError, args_to_dict, check_output_path, check_patch_multiple, check_ranges, exit_if_help, patch_size_of,
                      run_main)

logger = logging.getLogger("medfound")


def get_args_parser() -> argparse.ArgumentParser:
    return ibot_args.get_args_parser()


exit_if_help(get_args_parser)
# The imports below pull in torch and the models; --help has already exited above without them.
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import models_ibot  # noqa: E402
import models_mae  # noqa: E402,F401  (its decoder keys are known, so --load_pretrain drops them silently)
from engine_ibot import GradientHooks, Schedules, TeacherEMA, collapse_warning, knn_accuracy, train_one_epoch  # noqa: E402
from util.checkpoint import DDPPrefixedState, load_pretrained_encoder  # noqa: E402
from util.data import EpochIndexSampler, list_images  # noqa: E402
from util.dist import cleanup, get_rank, get_world_size, is_main_process  # noqa: E402
from util.logger import RunClock, RunLogger, print_summary  # noqa: E402
from util.epochs import periodic_every, run_epochs  # noqa: E402
from util.loop import STOP, Optimization  # noqa: E402
from util.recipes import apply_recipe, explicit_flags  # noqa: E402
from util.registry import create_model, is_registered  # noqa: E402
from util.runtime import (RunCheckpointer, check_output_dir, make_loader, maybe_resume, prepare_model,  # noqa: E402
                          resume_position, setup, start_guard, training_started)
from util.atomic import write_atomic  # noqa: E402
from util.unwrap import is_fsdp, unwrap  # noqa: E402

# Flags whose change makes a continued run a different experiment (besides the run-level ones).
IBOT_RESUME_FIELDS = ("lr", "weight_decay_end", "momentum_teacher", "out_dim", "patch_out_dim", "shared_head",
                      "shared_head_teacher", "norm_last_layer", "modality", "global_crops_number",
                      "local_crops_number", "local_crop_size", "pred_ratio", "pred_ratio_var", "pred_shape",
                      "teacher_temp", "teacher_patch_temp", "warmup_teacher_temp_epochs", "freeze_last_layer")


# ----------------------------------------------------------------------------------------------- flags
def resolve_args(args: argparse.Namespace) -> None:
    """Recipe, flag checks and derived settings, before any work: a bad value costs one line."""
    given = explicit_flags(args, ibot_args.get_args_parser())
    apply_recipe(args, args.recipe, ibot_args.RECIPES, given)
    check_ranges(args, ibot_args.RULES)
    if args.use_fp16 and "amp" not in given:
        args.amp = "fp16"
    if args.modality:
        from util.modalities import canonical_modality
        args.modality = canonical_modality(args.modality)
    if args.load_pretrain:
        path = args.pretrain_path
        if not path:
            raise UserError("--load_pretrain needs --pretrain_path PATH (DINO, iBOT, VisionFM, RETFound or MAE "
                            "weights); without it the run would start from random weights")
        if not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise UserError(f"--pretrain_path {path}: no readable file there (--load_pretrain starts from it)")
    from util.masking import iBOTMasker
    iBOTMasker(args.pred_ratio, args.pred_ratio_var, args.pred_shape, args.pred_start_epoch)  # checks the pairs
    args.model = args.model or f"ibot_{args.arch}_patch{args.patch_size}"
    if not is_registered(args.model):
        create_model(args.model)  # the one-line unknown-model error with suggestions
    args.patch_size = patch_size_of(args.model) or args.patch_size  # --model names its patch size
    check_patch_multiple(args.input_size, args.model)
    if args.local_crops_number:
        check_patch_multiple(args.local_crop_size, args.model)
    if args.name:
        args.output_dir = os.path.join(args.output_dir, args.name)


# ------------------------------------------------------------------------------------------------ data
def resolve_images(args: argparse.Namespace) -> tuple[str, list[str]]:
    """VisionFM's layout (`data_path/<Modality>/*`, any of the modality's spellings) when that folder
    exists, else every image under data_path."""
    if not args.data_path or not os.path.isdir(args.data_path):
        raise UserError(f"--data_path {args.data_path!r} is not a folder; point it at your images")
    root = args.data_path
    if args.modality:
        from util.modalities import modality_folder_names
        for folder in modality_folder_names(args.modality):
            if os.path.isdir(os.path.join(args.data_path, folder)):
                root = os.path.join(args.data_path, folder)
                break
    files = list_images(root)
    if not files:
        raise UserError(f"--data_path {root}: no images found")
    logger.info("pretraining data: %d images in %s", len(files), root)
    return root, files


def normalisation(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """The modality's statistics (VisionFM), or ImageNet's without --modality (iBOT)."""
    if args.modality:
        from util.modalities import modality_stats
        stats = modality_stats(args.modality)
        return list(stats.mean), list(stats.std)
    return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ----------------------------------------------------------------------------------------------- model
def build_networks(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """(student, teacher): the student with stochastic depth and masked-token modelling, the teacher as the
    references build it (no drop path, no mask token), without gradients, starting as a copy of the
    student (by parameter name)."""
    common = dict(img_size=args.input_size, out_dim=args.out_dim, patch_out_dim=args.patch_out_dim,
                  shared_head=args.shared_head, shared_head_teacher=args.shared_head_teacher,
                  norm_last_layer=args.norm_last_layer, norm_in_head=args.norm_in_head, act_in_head=args.act_in_head)
    try:
        student = create_model(args.model, drop_path_rate=args.drop_path,
                               masked_im_modeling=args.use_masked_im_modeling, **common)
        teacher = create_model(args.model, teacher=True, **common)
    except ValueError as e:
        raise UserError(f"--model {args.model}: {e}") from None
    if args.load_pretrain:
        # Into the teacher's backbone, which has exactly the encoder keys every source has (the student's
        # extra mask token starts at zero), then the same weights into the student's backbone.
        report = load_pretrained_encoder(teacher.backbone, args.pretrain_path, reset_head=False)
        copy_by_name(teacher.backbone, student.backbone)
        logger.info("--load_pretrain: backbone initialised from %s (epoch %s)", args.pretrain_path, report.get("epoch"))
    copy_by_name(student, teacher)
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


@torch.no_grad()
def copy_by_name(source: nn.Module, target: nn.Module) -> None:
    """Target parameters and buffers = the source's of the same name and shape (a student's extra
    `masked_embed` and, with an unshared student head, `last_layer2` have no teacher counterpart)."""
    s = {**dict(source.named_parameters()), **dict(source.named_buffers())}
    for name, t in [*target.named_parameters(), *target.named_buffers()]:
        if name in s and s[name].shape == t.shape:
            t.copy_(s[name])


def build_optimizer(student: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """iBOT's groups: [weights with weight decay, biases and norms without], frozen parameters left out; the
    learning rate and weight decay are set every iteration by the schedules."""
    from util.optim import LARS, build_adamw, param_groups_weight_decay
    no_decay, decay = param_groups_weight_decay(student, args.weight_decay)
    groups = [decay, no_decay]
    if args.optimizer == "adamw":
        return build_adamw(groups, lr=0.0, betas=(0.9, 0.999))
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    return LARS(groups, lr=0.0)


def knn_loaders(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, int] | None:
    """(bank loader, query loader, classes) of --knn_data_path with evaluation transforms, or None."""
    if not args.knn_data_path:
        return None
    from util.datasets import available_splits, build_dataset
    from util.finetune_transforms import build_transform
    from util.samplers import SequentialShardSampler
    if not os.path.isdir(args.knn_data_path):
        raise UserError(f"--knn_data_path {args.knn_data_path}: no such folder")
    splits = available_splits(args.knn_data_path)
    query_split = "val" if "val" in splits else "test" if "test" in splits else None
    if "train" not in splits or query_split is None:
        raise UserError(f"--knn_data_path {args.knn_data_path}: needs a train split (the memory bank) and a val or "
                        f"test split (the queries), e.g. train/<class>/ and val/<class>/ folders")
    ns = argparse.Namespace(data_path=args.knn_data_path, input_size=args.input_size, mean=args.mean, std=args.std,
                            seed=args.seed, val_fraction=0.0, bad_image=args.bad_image)
    loaders = []
    for split in ("train", query_split):
        ds = build_dataset(split, ns)
        ds.transform = build_transform(False, args.input_size, args.mean, args.std)
        sampler = SequentialShardSampler(ds, num_replicas=get_world_size(), rank=get_rank())
        loaders.append(make_loader(ds, sampler, args, device, args.batch_size, drop_last=False))
    return loaders[0], loaders[1], len(loaders[0].dataset.classes)


# ------------------------------------------------------------------------------------------------- run
def main(args: argparse.Namespace) -> dict[str, Any]:
    resolve_args(args)
    check_output_path(args.output_dir)  # an existing file there is refused, never touched
    check_output_path(args.log_dir, "--log_dir")
    with start_guard(args.output_dir):  # a failed start leaves no config.json, tensorboard/ or empty folder
        return pretrain(args)


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """The run behind main(): set-up, data, networks, resume, epochs, summary."""
    device = setup(args)
    if args.use_wandb:
        logger.info("--use_wandb: ignored (no network); metrics go to log.txt and TensorBoard")
    root, files = resolve_images(args)
    args.mean, args.std = normalisation(args)
    from util.masking import iBOTMasker
    from util.multicrop import MultiCropDataset, multicrop_for
    transform = multicrop_for(args.recipe, args.modality, mean=args.mean, std=args.std, output="uint8",
                              global_size=args.input_size, local_size=args.local_crop_size,
                              global_crops_scale=args.global_crops_scale, local_crops_scale=args.local_crops_scale,
                              global_crops_number=args.global_crops_number, local_crops_number=args.local_crops_number)
    masker = (iBOTMasker(args.pred_ratio, args.pred_ratio_var, args.pred_shape, args.pred_start_epoch)
              if args.use_masked_im_modeling else None)
    dataset = MultiCropDataset(files, transform, masker, args.patch_size, args.seed, args.bad_image)
    world = get_world_size()
    sampler = EpochIndexSampler(dataset, num_replicas=world, rank=get_rank(), shuffle=True, seed=args.seed)
    steps_per_epoch = sampler.num_samples // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset)} images cannot fill one batch of {args.batch_size} x {world} processes; "
                        f"lower --batch_size_per_gpu")
    lr = args.lr * args.batch_size * world / 256.0  # the linear scaling rule of DINO/iBOT
    student, teacher = build_networks(args)
    n_params = sum(p.numel() for p in student.parameters() if p.requires_grad)
    logger.info("model %s (%.1fM trainable), %d images (%s), batch %d x %d, lr %.3g, amp %s, device %s",
                args.model, n_params / 1e6, len(dataset), args.modality or "no modality", args.batch_size, world,
                lr, args.amp, device)
    if args.dry_run:
        logger.info("dry run: configuration is valid; %d steps per epoch", steps_per_epoch)
        return {"dry_run": True, "steps_per_epoch": steps_per_epoch, "model": args.model}

    student, student_plain = prepare_model(student, args, device)
    teacher, teacher_plain = prepare_model(teacher, args, device)
    ibot_loss = models_ibot.iBOTLoss(
        args.out_dim, args.patch_out_dim, args.global_crops_number, args.local_crops_number,
        args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_patch_temp, args.teacher_patch_temp,
        args.warmup_teacher_temp_epochs, args.epochs, lambda1=args.lambda1, lambda2=args.lambda2,
        mim_start_epoch=args.pred_start_epoch, centering=args.centering).to(device)
    optimizer = build_optimizer(student_plain, args)
    per_param = args.clip_grad if args.clip_grad_mode == "per_param" else 0.0
    global_clip = args.clip_grad if args.clip_grad_mode == "global" and args.clip_grad > 0 else None
    opt = Optimization(optimizer, args.amp, 1, global_clip, args.max_nonfinite)
    schedules = Schedules(lr, args.min_lr, args.warmup_epochs, args.weight_decay, args.weight_decay_end,
                          args.momentum_teacher, args.epochs, steps_per_epoch)
    opt.before_step = GradientHooks(opt, args.freeze_last_layer, per_param)
    opt.after_step = TeacherEMA(student, teacher, schedules, opt)

    config = args_to_dict(args)
    config.pop("explicit_flags", None)
    student_state = student if is_fsdp(student) else DDPPrefixedState(student, "student", "--arch / --out_dim / --shared_head")
    states = {"student": student_state, "teacher": teacher, "ibot_loss": ibot_loss}
    check_output_dir(args.output_dir)
    ckpt = maybe_resume(args, config, states, opt, IBOT_RESUME_FIELDS)
    if ckpt and opt.scaler is not None and not ckpt.get("scaler") and isinstance(ckpt.get("fp16_scaler"), dict):
        opt.scaler.load_state_dict(ckpt["fp16_scaler"])  # a reference checkpoint names it fp16_scaler
    start_epoch, start_step, loop_state = resume_position(args, ckpt)

    loader = make_loader(dataset, sampler, args, device, args.batch_size, drop_last=True)
    run_logger = RunLogger(args.output_dir, args.log_dir or os.path.join(args.output_dir, "tensorboard"))
    knn = knn_loaders(args, device)
    if is_main_process():
        write_atomic(os.path.join(args.output_dir, "config.json"), json.dumps(config, indent=1).encode("utf-8"))
    preprocessing = {"input_size": args.input_size, "mean": list(args.mean), "std": list(args.std),
                     "norm_preset": (args.modality or "imagenet").lower(), "deblur": False, "blur": None,
                     "model": args.model, "modality": args.modality}

    def extra() -> dict[str, Any]:
        out: dict[str, Any] = {"preprocessing": preprocessing}
        if opt.scaler is not None:
            out["fp16_scaler"] = opt.scaler.state_dict()
        return out
    checkpointer = RunCheckpointer(args, states, opt, config, extra=extra)
    checkpointer.steps_per_epoch = steps_per_epoch
    if args.inject_nonfinite:
        opt.poison_steps = {int(x) for x in args.inject_nonfinite.split(",") if x.strip()}
    STOP.install()
    start = time.time()
    clock = RunClock(start_epoch + start_step / steps_per_epoch, args.epochs)
    training_started(args.output_dir)
    knn_stats: dict[str, float] = {}

    def train(epoch: int, first: int) -> dict[str, Any]:
        return train_one_epoch(student, teacher, ibot_loss, loader, opt, device, epoch, args, schedules,
                               run_logger=run_logger, start_step=first, steps_per_epoch=steps_per_epoch,
                               loop_state=loop_state if first else None,
                               on_update=checkpointer.on_update(epoch), clock=clock)

    def after_epoch(epoch: int, stats: dict[str, Any], last: bool) -> dict[str, Any]:
        warning = collapse_warning(stats.get("teacher_entropy", float("nan")), stats.get("teacher_std", float("nan")),
                                   args.out_dim)
        if warning:
            logger.warning("epoch %d: %s", epoch, warning)
        run_logger.scalars({"epoch_loss": stats["loss"]}, epoch)
        if knn is None or not ((epoch + 1) % args.knn_freq == 0 or last):
            return {}
        knn_now = knn_accuracy(unwrap(teacher).backbone, knn[0], knn[1], device, args.amp, knn[2],
                               args.knn_k, args.knn_temperature)
        knn_stats.update({**knn_now, "epoch": epoch})
        logger.info("epoch %d: k-NN (k=%d) on the frozen teacher: top-1 %.3f, balanced accuracy %.3f",
                    epoch, args.knn_k, knn_now["knn_top1"], knn_now["knn_balanced_acc"])
        run_logger.scalars(knn_now, epoch)
        return knn_now

    stats, preempted = run_epochs(start_epoch=start_epoch, epochs=args.epochs, start_step=start_step,
                                  batch_size=args.batch_size, sampler=sampler, train=train,
                                  checkpointer=checkpointer, periodic=periodic_every(args.save_freq),
                                  run_logger=run_logger, cleanup=cleanup, after_epoch=after_epoch,
                                  n_parameters=n_params)
    if preempted:
        return {"preempted": True}
    logger.info("training time %.1f s", time.time() - start)
    run_logger.close()
    last_ckpt = os.path.join(args.output_dir, "checkpoint-last.pth")
    print_summary("iBOT pretraining", [
        ("run", f"{args.model}, {args.epochs} epochs, {len(dataset)} images ({args.modality or root}), "
                f"{time.time() - start:.0f} s"),
        ("final loss", f"{stats['loss']:.4f} (cls {stats.get('cls', float('nan')):.4f}, patch "
                       f"{stats.get('patch', float('nan')):.4f}; epoch means)" if stats else None),
        ("k-NN (teacher)", f"top-1 {knn_stats['knn_top1']:.3f}, balanced accuracy "
                           f"{knn_stats['knn_balanced_acc']:.3f} (epoch {knn_stats['epoch']})" if knn_stats else None),
        ("checkpoint", last_ckpt), ("outputs", f"{args.output_dir}/{{log.txt,config.json,tensorboard/}}")],
        next_cmd=f"python main_finetune.py --finetune {last_ckpt} --checkpoint_key teacher --model "
                 f"{args.model.removeprefix('ibot_')} --data_path YOUR_LABELLED_DATA "
                 f"--output_dir {args.output_dir}_finetune")
    cleanup()
    return stats


if __name__ == "__main__":
    run_main(main, get_args_parser())
