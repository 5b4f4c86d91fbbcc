"""Masked-autoencoder pretraining (MAE, deblurring MAE) on a folder of images, single GPU to multi-node.

Examples:
  python main_pretrain.py --demo                                  # tiny MAE on built-in demo data (CPU, ~1 min)
  torchrun --nproc_per_node=8 main_pretrain.py --model mae_vit_base_patch16 --data_path DATA \\
      --batch_size 64 --norm_pix_loss --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --output_dir out/
  torchrun --nproc_per_node=8 main_pretrain.py --model dmae_vit_base_patch16 --output out/ \\
      --data_path_blurred DATA_BLURRED --data_path_orig DATA --batch_size 32

iBOT / VisionFM self-distillation: a command line with iBOT's flags (e.g. --modality, --batch_size_per_gpu,
--out_dim, --pred_ratio, --load_pretrain) or an ibot_* --model runs main_ibot.py instead (its flags:
`main_pretrain.py --model ibot_vit_base_patch16 --help`), so VisionFM's README command works verbatim.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import crossmae_args
import ibot_args
from util.cli import (AMP_CHOICES, HelpFormatter, RangeRule, UserError, add_bool_flag, add_common_args,
                      add_performance_args, args_to_dict, check_output_path, check_patch_multiple, check_ranges,
                      exit_if_help, run_main)

logger = logging.getLogger("medfound")

# Flag hooks of the pretraining families (PRETRAIN_FAMILIES below: a family's `add_args`), kept in torch-free
# modules so that --help needs no torch.
PRETRAIN_FAMILY_FLAGS = [crossmae_args.add_args]

DEMO = dict(model="mae_vit_tiny_patch8", input_size=64, batch_size=16, epochs=40, warmup_epochs=4, blr=1e-2,
            mask_ratio=0.75, print_freq=10, save_freq=0, vis_freq=10, vis_images=6)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("main_pretrain.py", description=__doc__, formatter_class=HelpFormatter)
    # Shown first (argparse lists groups in creation order): what a new user needs; the rest is detail.
    c = p.add_argument_group("common options")
    g = p.add_argument_group("model")
    c.add_argument("--model", default="mae_vit_large_patch16", help="registered name, e.g. mae_vit_base_patch16, "
                   "dmae_vit_base_patch16 (deblurring), mae_vit_tiny_patch8 (tests/demo)")
    c.add_argument("--input_size", default=224, type=int, help="image side in pixels (multiple of the patch size)")
    c.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    add_bool_flag(g, "--norm_pix_loss", default=False, help="per-patch normalised pixels as targets")
    g.add_argument("--mask_noise", default="per_sample", choices=("per_sample", "global"),
                   help="per_sample: masks seeded by (seed, epoch, image index), identical for any world size and "
                        "on resume; global: torch.rand(N, L) from the global stream, as the reference")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing (less memory, ~30%% slower)")

    g = p.add_argument_group("optimisation")
    c.add_argument("--batch_size", default=64, type=int, help="per-process batch size")
    c.add_argument("--epochs", "--epoch", dest="epochs", default=400, type=int, help="training epochs")
    g.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps (effective batch = batch_size x accum_iter x processes)")
    g.add_argument("--weight_decay", default=0.05, type=float, help="AdamW weight decay")
    g.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * effective batch / 256)")
    g.add_argument("--blr", default=1.5e-4, type=float, help="base lr per 256 images")
    g.add_argument("--min_lr", default=0.0, type=float, help="lr at the end of the cosine schedule")
    g.add_argument("--warmup_epochs", default=40, type=float, help="epochs of linear lr warm-up (fractions allowed)")
    g.add_argument("--clip_grad", default=None, type=float, help="clip the total gradient norm (None: no clipping)")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="mixed precision: auto = bf16 on capable GPUs, else fp32")
    g.add_argument("--max_nonfinite", default=5, type=int, help="stop after this many non-finite steps in a row")

    g = p.add_argument_group("data")
    c.add_argument("--data_path", default=None, help="image folder: data_path/train if present, else all images")
    g.add_argument("--data_path_blurred", default=None, help="blurred tree (DeblurringMAE); ids come from here")
    g.add_argument("--data_path_orig", default=None, help="sharp tree with the same relative paths (DeblurringMAE)")
    g.add_argument("--blur", default=None, choices=("gaussian", "mean", "median", "motion", "defocus"),
                   help="blur on the fly instead of reading --data_path_blurred")
    g.add_argument("--blur_sigma", "--sigma", dest="blur_sigma", default=1.1, type=float,
                   help="gaussian blur sigma in pixels (--sigma: DeblurringMAE's name)")
    g.add_argument("--blur_ksize", default=5, type=int,
                   help="blur size in pixels: mean/median window, motion length, defocus radius (not gaussian)")
    g.add_argument("--num_train", default=-1, type=int, help="use a seeded random subset of N images (-1: all)")
    g.add_argument("--norm_preset", default="imagenet", help="normalisation statistics: imagenet, uwf, fundus, "
                   "oct, ffa, external, slitlamp, ultrasound, ubm, mri")
    g.add_argument("--bad_image", default="error", choices=("error", "skip"),
                   help="unreadable image: stop with its path, or skip it (listed in the log)")
    add_bool_flag(g, "--jpeg_draft", default=True,
                  help="decode large JPEGs at 1/2 or 1/4 scale when the random crop still has >= input_size pixels "
                       "(several times faster on 2-4k px fundus photos; --no_jpeg_draft decodes at full size)")
    g.add_argument("--decoder", default="auto", choices=("auto", "pil", "torchvision"),
                   help="JPEG decoding at full size: torchvision.io (auto: when this torchvision has it; ~1.6x "
                        "faster, the same pixels) or Pillow; reduced-scale decodes (--jpeg_draft) always use Pillow")
    c.add_argument("--demo", action="store_true",
                   help="pretrain a tiny MAE on built-in synthetic fundus images + scikit-image's retina photo")

    g = p.add_argument_group("output and resume")
    c.add_argument("--output_dir", "--output", dest="output_dir", default="./output_dir",
                   help="folder for checkpoints, log.txt and reconstructions")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir/tensorboard)")
    c.add_argument("--resume", default="", help="checkpoint to resume from, or 'auto'")
    add_bool_flag(g, "--auto_resume", default=True, help="resume from the newest checkpoint in output_dir")
    g.add_argument("--start_epoch", default=0, type=int, help="first epoch (a resumed checkpoint sets it)")
    g.add_argument("--save_freq", default=20, type=int, help="keep checkpoint-{epoch}.pth every N epochs")
    g.add_argument("--keep_last", default=0, type=int, help="periodic checkpoints to keep (0: all)")
    g.add_argument("--save_every_steps", default=0, type=int,
                   help="also checkpoint every N optimizer steps (mid-epoch resume for long epochs)")
    g.add_argument("--save_safetensors", action="store_true", help="also write model.safetensors (weights + config)")
    g.add_argument("--inject_nonfinite", default="", help=argparse.SUPPRESS)  # test hook: poison these update steps
    g.add_argument("--print_freq", default=20, type=int, help="progress line every N steps")
    g.add_argument("--vis_freq", default=20, type=int, help="log reconstructions to TensorBoard every N epochs")
    g.add_argument("--vis_images", default=4, type=int, help="images in the reconstruction figure")
    g.add_argument("--dry_run", action="store_true", help="validate flags and data, print the plan, exit")
    for add_args in PRETRAIN_FAMILY_FLAGS:
        add_args(p)
    add_performance_args(p, fsdp=True)
    add_common_args(p)
    return p


# Value ranges (util.cli.check_ranges), checked before any work: out of range, a value trains something else
# than asked (--mask_ratio 1.5 masks 50%, --accum_iter 0 trains at lr 0) or fails later in a traceback.
RULES: list[RangeRule] = [
    ("mask_ratio", ">0 <1", "the fraction of patches hidden, e.g. 0.75"), ("epochs", ">=1"), ("batch_size", ">=1"),
    ("accum_iter", ">=1"), ("blr", ">0"), ("lr", ">0"), ("weight_decay", ">=0"), ("input_size", ">=1"),
    ("warmup_epochs", ">=0"), ("num_workers", ">=0"), *crossmae_args.RULES,
]


def check_args(args: argparse.Namespace) -> None:
    """One-line UserError for the first flag out of range; --demo's model unless --model was typed."""
    check_ranges(args, RULES)
    demo, typed = DEMO if getattr(args, "demo", False) else {}, getattr(args, "explicit_flags", None) or ()
    pick = lambda k: demo[k] if k in demo and k not in typed else getattr(args, k)  # noqa: E731
    from util.registry import is_registered  # called from main() only, where torch is loaded anyway
    if is_registered(pick("model")):  # an unknown name gets the unknown-model error (with suggestions)
        check_patch_multiple(pick("input_size"), pick("model"))


if __name__ == "__main__" and ibot_args.wants_ibot(sys.argv[1:]):
    ibot_args.hand_over(sys.argv[1:], "main_pretrain.py")  # iBOT / VisionFM pretraining; exits
exit_if_help(get_args_parser)
# The imports below pull in torch and the models; --help has already exited above without them.
import numpy as np  # noqa: E402
import torch  # noqa: E402

import models_convmae  # noqa: E402
import models_crossmae  # noqa: E402
import models_mae  # noqa: E402
from engine_pretrain import reconstruct, train_one_epoch  # noqa: E402
from util.checkpoint import export_safetensors  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402

from util.blur import BLUR_IN_PROGRESS  # noqa: E402
from util.data import (EpochIndexSampler, list_images, load_image, pair_files, PretrainDataset, PretrainTransform,
                       resolve_norm, resolve_pretrain_files)
from util.image_io import BadImageError, with_skip_advice
from util.dist import cleanup, get_rank, get_world_size, is_main_process  # noqa: E402
from util.logger import RunClock, RunLogger, print_summary  # noqa: E402
from util.epochs import periodic_every, run_epochs  # noqa: E402
from util.loop import STOP, Optimization  # noqa: E402
from util.runtime import (RunCheckpointer, check_output_dir, make_loader, maybe_resume, prepare_model, resume_position,  # noqa: E402
                          setup, start_guard, training_started)
from util.atomic import write_atomic  # noqa: E402
from util.lr_sched import adjust_learning_rate, effective_lr  # noqa: E402
from util.optim import build_adamw, param_groups_weight_decay  # noqa: E402
from util.registry import create_model, is_registered, resolve  # noqa: E402
from util.unwrap import is_fsdp, unwrap  # noqa: E402
from util.vis import reconstruction_grid, save_png  # noqa: E402

# Pretraining model families. Each module registers its factories and may define
# `add_args(parser)` (its own flags; listed in PRETRAIN_FAMILY_FLAGS, torch-free) and `model_kwargs(args, model_name) -> dict` (flags -> constructor),
# `model_name(args, name) -> name` (flag-driven re-routing, e.g. `--cross_mae`) and
# `lr_scale(args, model_name) -> float` (a factor on the default lr, e.g. CrossMAE's kept/mask).
PRETRAIN_FAMILIES = [models_mae, models_convmae, models_crossmae]
# Pretraining data flags whose change makes a resumed run a different experiment (besides the run-level
# fields of util.runtime and the model family's own `resume_fields`).
PRETRAIN_RESUME_FIELDS = ("data_path_orig", "data_path_blurred", "blur", "mask_noise")


def family_kwargs(args: argparse.Namespace, model_name: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for family in PRETRAIN_FAMILIES:
        if hasattr(family, "model_kwargs"):
            kwargs.update(family.model_kwargs(args, model_name))
    return kwargs


def family_model_name(args: argparse.Namespace, model_name: str) -> str:
    for family in PRETRAIN_FAMILIES:
        if hasattr(family, "model_name"):
            model_name = family.model_name(args, model_name)
    return model_name


def family_lr_scale(args: argparse.Namespace, model_name: str) -> float:
    scale = 1.0
    for family in PRETRAIN_FAMILIES:
        if hasattr(family, "lr_scale"):
            scale *= family.lr_scale(args, model_name)
    return scale


def prepare_demo(args: argparse.Namespace) -> None:
    """Synthetic fundus images plus the real fundus photo scikit-image ships, in output_dir/demo_data."""
    from util.synthetic import write_dataset
    given = getattr(args, "explicit_flags", None)
    if given is None:  # built in-process without util.cli.parse_args: infer from argv
        from util.cli import explicit_dests
        given = explicit_dests(get_args_parser(), sys.argv[1:])
    for k, v in DEMO.items():  # demo settings, unless the user set the flag explicitly
        if k not in given:
            setattr(args, k, v)
    root = os.path.join(args.output_dir, "demo_data")
    if is_main_process():
        write_dataset(root, kind="fundus", layout="flat", num_classes=2, n_per_class=120, size=args.input_size,
                      seed=args.seed, splits={"images": 1.0})
        try:
            from skimage import data as skdata
            from PIL import Image
            Image.fromarray(skdata.retina()).resize((256, 256), Image.BICUBIC).save(os.path.join(root, "images",
                                                                                                "retina_skimage.png"))
        except ImportError:
            logger.warning("scikit-image not installed: demo uses synthetic images only")
    from util.dist import barrier
    barrier()
    args.data_path = root
    args.num_workers = 0 if args.num_workers is None else args.num_workers


def build_dataset(args: argparse.Namespace, num_patches: int, deblur: bool) -> PretrainDataset:
    mean, std = resolve_norm(args.norm_preset)
    args.mean, args.std = mean, std
    transform = PretrainTransform(args.input_size, mean, std, output="uint8")  # normalised on the device
    blur_spec = None
    if args.blur:
        from util.blur import BlurSpec
        blur_spec = BlurSpec(method=args.blur, sigma=args.blur_sigma, ksize=args.blur_ksize, seed=args.seed)
    blurred_files = None
    if deblur and args.data_path_blurred and not args.blur:
        if not args.data_path_orig:
            raise UserError("--data_path_blurred needs --data_path_orig (the sharp images) for a deblurring model")
        if os.path.exists(os.path.join(args.data_path_blurred, BLUR_IN_PROGRESS)):
            raise UserError(f"--data_path_blurred {args.data_path_blurred}: blurred_images.py has not finished this "
                            f"tree ({BLUR_IN_PROGRESS} is there); run it again with the same flags to complete it")
        blurred_root, blurred = resolve_pretrain_files(args.data_path_blurred, "--data_path_blurred")
        sharp_root = os.path.normpath(os.path.join(args.data_path_orig,
                                                   os.path.relpath(blurred_root, args.data_path_blurred)))
        files = pair_files(blurred_root, blurred, sharp_root, "--data_path_orig")
        blurred_files, root = blurred, sharp_root
        spec_file = os.path.join(args.data_path_blurred, "blur_spec.json")
        if os.path.isfile(spec_file):  # written by blurred_images.py: finetuning must blur the same way
            with open(spec_file) as f:
                args.blur_recorded = json.load(f)
    else:
        # Vanilla models in the DeblurringMAE commands read --data_path_blurred (pointed at sharp images).
        data_path = args.data_path or args.data_path_orig if deblur else (args.data_path or args.data_path_blurred)
        if not data_path:
            raise UserError("no data: pass --data_path (or --demo to try the built-in demo data)")
        root, files = resolve_pretrain_files(data_path)
    if args.num_train > 0 and args.num_train < len(files):
        keep = sorted(np.random.default_rng(args.seed).choice(len(files), args.num_train, replace=False))
        files = [files[i] for i in keep]
        blurred_files = [blurred_files[i] for i in keep] if blurred_files else None
        logger.info("--num_train %d: using a seeded subset", args.num_train)
    noise_len = num_patches if args.mask_noise == "per_sample" else 0
    return PretrainDataset(files, transform, seed=args.seed, num_patches=noise_len, blurred_files=blurred_files,
                           blur=blur_spec, deblur=deblur, bad_image=args.bad_image, root=root,
                           jpeg_draft=args.jpeg_draft, decoder=args.decoder)


def preprocessing_record(args: argparse.Namespace, deblur: bool) -> dict[str, Any]:
    """What finetuning / eval / visualisation must reuse so nobody repeats flags."""
    blur = None
    if args.blur:
        from util.blur import BlurSpec
        blur = BlurSpec(method=args.blur, sigma=args.blur_sigma, ksize=args.blur_ksize, seed=args.seed).to_dict()
    elif getattr(args, "blur_recorded", None):
        blur = args.blur_recorded
    return {"input_size": args.input_size, "mean": list(args.mean), "std": list(args.std),
            "norm_preset": args.norm_preset, "deblur": deblur, "blur": blur, "norm_pix_loss": args.norm_pix_loss,
            "model": args.model}


@torch.no_grad()
def save_reconstructions(model: torch.nn.Module, dataset: PretrainDataset, args: argparse.Namespace,
                         device: torch.device, epoch: int, run_logger: RunLogger, to_png: bool) -> None:
    """The same images, whole (resize + centre crop, no augmentation) and with the same masks at every
    call, so figures across epochs are comparable: `data_path/val` when it exists (held out from
    pretraining), else images spread over the training set."""
    sharded = is_fsdp(model)  # FSDP: every rank joins the forward (its all-gathers); rank 0 draws
    if args.vis_images <= 0 or not (is_main_process() or sharded):
        return
    val_dir = os.path.join(args.data_path or "", "val")
    if not dataset.deblur and args.data_path and os.path.isdir(val_dir) and list_images(val_dir):
        files = list_images(val_dir)
    else:
        files = dataset.files
    n = min(args.vis_images, len(files))
    picks = [i * max(len(files) // n, 1) for i in range(n)]
    imgs, targets = [], []
    for i in picks:
        try:
            sharp = load_image(files[i])
            views = dataset._read(i) if dataset.deblur else [sharp]  # deblurring: (blurred, sharp) pair
        except BadImageError as e:  # the figure leaves an unreadable image out, as training does
            if args.bad_image != "skip":
                raise with_skip_advice(e) from None
            continue
        tensors = [TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(
            v, args.input_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), args.input_size)),
            args.mean, args.std) for v in views]
        imgs.append(tensors[0])
        targets.append(tensors[-1])
    if not imgs:
        return
    imgs = torch.stack(imgs).to(device)
    target = torch.stack(targets).to(device) if dataset.deblur else None
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.rand(len(imgs), unwrap(model).num_patches, generator=g).to(device)
    out = reconstruct(unwrap(model), imgs, args.mask_ratio, noise=noise, target=target)  # collective under FSDP
    if not is_main_process():
        return
    grid = reconstruction_grid(out, args.mean, args.std, args.mask_ratio, model=args.model, blurred=target is not None,
                               loss_scope=getattr(unwrap(model), "loss_scope", "masked"),
                               scale=max(1, 128 // args.input_size), loss=float(out["loss"]),
                               loss_label=f"loss on these {n} images")
    run_logger.image("reconstructions", torch.from_numpy(grid).permute(2, 0, 1), epoch)
    if to_png:
        path = os.path.join(args.output_dir, "reconstructions.png")
        save_png(grid, path)
        logger.info("wrote %s", path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)  # before set-up: a bad value costs one line, not a run
    check_output_path(args.output_dir)  # an existing file there is refused, never touched
    check_output_path(args.log_dir, "--log_dir")
    if not is_registered(args.model):
        create_model(args.model)  # raises the one-line unknown-model error with suggestions
    with start_guard(args.output_dir):  # a failed start leaves no config.json, tensorboard/ or empty folder
        return pretrain(args)


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """The run behind main(): set-up, data, model, resume, epochs, summary."""
    device = setup(args)
    if args.demo:
        prepare_demo(args)
    model_name = resolve(args.model)
    model_name = family_model_name(args, model_name)
    try:
        model = create_model(model_name, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                             **family_kwargs(args, model_name))
    except ValueError as e:
        raise UserError(f"--model {args.model} --input_size {args.input_size}: {e}") from None
    deblur = bool(getattr(model, "deblur", False))
    dataset = build_dataset(args, model.num_patches, deblur)
    world = get_world_size()
    eff_batch = args.batch_size * args.accum_iter * world
    if args.lr is None:
        args.lr = effective_lr(args.blr, args.batch_size, args.accum_iter, world) * family_lr_scale(args, model_name)
    sampler = EpochIndexSampler(dataset, num_replicas=world, rank=get_rank(), shuffle=True, seed=args.seed)
    steps_per_epoch = sampler.num_samples // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset)} images cannot fill one batch of {args.batch_size} x {world} processes; "
                        f"lower --batch_size")
    logger.info("model %s (%.1fM params, deblur=%s), %d images, effective batch %d, lr %.3g, amp %s, device %s",
                model_name, sum(p.numel() for p in model.parameters()) / 1e6, deblur, len(dataset), eff_batch,
                args.lr, args.amp, device)
    if args.dry_run:
        logger.info("dry run: configuration is valid; %d steps per epoch", steps_per_epoch)
        return {"dry_run": True, "steps_per_epoch": steps_per_epoch, "model": model_name}

    model, model_without_ddp = prepare_model(model, args, device)
    optimizer = build_adamw(param_groups_weight_decay(model_without_ddp, args.weight_decay), lr=args.lr,
                            betas=(0.9, 0.95))
    opt = Optimization(optimizer, args.amp, args.accum_iter, args.clip_grad, args.max_nonfinite)

    config = args_to_dict(args)
    config["model"] = model_name
    config.pop("explicit_flags", None)
    ckpt = maybe_resume(args, config, model_without_ddp, opt, PRETRAIN_RESUME_FIELDS)
    start_epoch, start_step, loop_state = resume_position(args, ckpt)
    check_output_dir(args.output_dir)

    loader = make_loader(dataset, sampler, args, device, args.batch_size, drop_last=True)
    log_dir = args.log_dir or os.path.join(args.output_dir, "tensorboard")
    run_logger = RunLogger(args.output_dir, log_dir)
    if is_main_process():
        write_atomic(os.path.join(args.output_dir, "config.json"), json.dumps(config, indent=1).encode("utf-8"))
    preprocessing = preprocessing_record(args, deblur)
    n_params = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    checkpointer = RunCheckpointer(args, model, opt, config, extra=lambda: {"preprocessing": preprocessing})
    checkpointer.steps_per_epoch = steps_per_epoch
    if args.inject_nonfinite:
        opt.poison_steps = {int(x) for x in args.inject_nonfinite.split(",") if x.strip()}
    STOP.install()
    start = time.time()
    clock = RunClock(start_epoch + start_step / max(steps_per_epoch, 1), args.epochs)
    training_started(args.output_dir)

    def train(epoch: int, first: int) -> dict[str, Any]:
        return train_one_epoch(model, loader, opt, device, epoch, args,
                               lr_fn=lambda e: adjust_learning_rate(optimizer, e, args), run_logger=run_logger,
                               start_step=first, steps_per_epoch=steps_per_epoch,
                               loop_state=loop_state if first else None, on_update=checkpointer.on_update(epoch),
                               clock=clock)

    def after_epoch(epoch: int, stats: dict[str, Any], last: bool) -> None:
        if args.save_safetensors:  # every rank: a collective gather under --fsdp; rank 0 writes
            export_safetensors(model_without_ddp, os.path.join(args.output_dir, "model.safetensors"),
                               {"preprocessing": preprocessing, "model": model_name, "epoch": epoch})
        run_logger.scalars({"epoch_loss": stats["loss"]}, epoch)
        if last or (args.vis_freq > 0 and epoch % args.vis_freq == 0):
            save_reconstructions(model, dataset, args, device, epoch, run_logger, to_png=last)

    stats, preempted = run_epochs(start_epoch=start_epoch, epochs=args.epochs, start_step=start_step,
                                  batch_size=args.batch_size, sampler=sampler, train=train,
                                  checkpointer=checkpointer, periodic=periodic_every(args.save_freq),
                                  run_logger=run_logger, cleanup=cleanup, after_epoch=after_epoch,
                                  n_parameters=n_params)
    if preempted:
        return {"preempted": True}
    logger.info("training time %.1f s", time.time() - start)
    run_logger.close()
    last = os.path.join(args.output_dir, "checkpoint-last.pth")
    figure = os.path.join(args.output_dir, "reconstructions.png")
    print_summary("pretraining", [
        ("run", f"{model_name}, {args.epochs} epochs, {len(dataset)} images at {args.input_size} px, "
                f"{time.time() - start:.0f} s"),
        ("final loss", f"{stats['loss']:.4f} (epoch mean)" if stats else None),
        ("checkpoint", last), ("figure", figure if os.path.isfile(figure) else None),
        ("outputs", f"{args.output_dir}/{{log.txt,config.json,tensorboard/}}")],
        next_cmd=f"python main_finetune.py --finetune {last} --model {finetune_model_hint(model_name)} "
                 f"--data_path YOUR_LABELLED_DATA --output_dir {args.output_dir}_finetune")
    cleanup()
    return stats


def finetune_model_hint(pretrain_name: str) -> str:
    """The classifier that takes this pretraining model's encoder (mae_vit_base_patch16 -> vit_base_patch16)."""
    stem = pretrain_name.removesuffix("_dec512d8b")
    for prefix in ("dcrossmae_", "crossmae_", "dconvmae_", "convmae_", "dmae_", "mae_"):
        if stem.startswith(prefix):
            return stem[len(prefix):]
    return stem


if __name__ == "__main__":
    run_main(main, get_args_parser())
