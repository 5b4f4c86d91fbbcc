"""Image-text contrastive pretraining (SLIP, CLIP, SimCLR; MedSLIP's recipe): flags (slip_args.py) -> caption
data, model, AdamW, SLIP's schedule, checkpoints, and the epoch loop (engine_slip.py).

Launch with `torchrun --nproc_per_node=N main_slip.py ...` (multi-node: torchrun's --nnodes/--rdzv flags),
or on SLURM through run_with_submitit.py. Checkpoints hold SLIP's layout, `state_dict` (keys with DDP's
`module.` prefix, as SLIP writes them), `epoch`, `optimizer`, `scaler` (under fp16), `args` (the full
config), plus medfound's resume bookkeeping (`resume_point`, `rng`, `loop_state`), so a run continues
exactly where it stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import slip_args
from util.cli import UserError, args_to_dict, check_output_path, check_ranges, exit_if_help, run_main

logger = logging.getLogger("medfound")
MEDSLIP_CONTEXT = 410  # MedSLIP's tokenizer max length
DEFAULT_TEXT_MODEL = "emilyalsentzer/Bio_ClinicalBERT"  # MedCLIP's text encoder (read from the local cache only)
NORMS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "medclip": ((0.5863,) * 3, (0.2795,) * 3)}


def get_args_parser() -> argparse.ArgumentParser:
    return slip_args.get_args_parser()


exit_if_help(get_args_parser)
# The imports below pull in torch and the models; --help has already exited above without them.
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import models_medclip  # noqa: E402,F401  (registers MedSLIP_*; transformers is imported only when one is built)
import models_slip  # noqa: E402,F401  (registers the SLIP/CLIP/SimCLR factories)
from engine_slip import SlipSchedule, build_optimizer, model_kind, train_one_epoch, validate  # noqa: E402
from util.atomic import write_atomic  # noqa: E402
from util.captions import CaptionDataset, read_captions  # noqa: E402
from util.checkpoint import DDPPrefixedState  # noqa: E402
from util.data import EpochIndexSampler  # noqa: E402
from util.dist import cleanup, get_rank, get_world_size, is_main_process  # noqa: E402
from util.logger import RunClock, RunLogger, print_summary  # noqa: E402
from util.epochs import periodic_every, run_epochs  # noqa: E402
from util.loop import STOP, Optimization  # noqa: E402
from util.recipes import apply_recipe, explicit_flags  # noqa: E402
from util.registry import create_model, is_registered  # noqa: E402
from util.runtime import (RunCheckpointer, check_output_dir, make_loader, maybe_resume, prepare_model,  # noqa: E402
                          resume_position, setup, start_guard, training_started)
from util.unwrap import is_fsdp, unwrap  # noqa: E402


# ----------------------------------------------------------------------------------------------- flags
def resolve_args(args: argparse.Namespace) -> None:
    """Recipe, flag checks and derived settings, before any work: a bad value costs one line."""
    given = explicit_flags(args, slip_args.get_args_parser())
    apply_recipe(args, args.recipe, slip_args.RECIPES, given)
    check_ranges(args, slip_args.RULES)
    if args.disable_amp:
        args.amp = "none"
    if args.gpu_index is not None and "device" not in given:
        args.device = f"cuda:{args.gpu_index}"
    args.accum_iter = args.update_freq  # the loop's and prepare_model's name for it
    if not is_registered(args.model):
        create_model(args.model)  # the one-line unknown-model error with suggestions
    try:
        args.kind = model_kind(args.model)
    except ValueError as e:
        raise UserError(f"--model {args.model}: {e}; choose SLIP_VITB16, CLIP_VITB16, SIMCLR_VITB16, ...") from None
    if not args.evaluate and not args.metadata:
        raise UserError(f"--metadata FILE is required (the {args.dataset} captions); see --help for the formats")
    if args.root and not os.path.isdir(args.root):
        raise UserError(f"--root {args.root}: no such folder")
    zs = [args.zeroshot_data, args.zeroshot_labels, args.zeroshot_templates]
    if any(zs) and not all(zs):
        raise UserError("zero-shot monitoring needs all three of --zeroshot-data, --zeroshot-labels, --zeroshot-templates")
    if args.evaluate and not args.zeroshot_data:
        raise UserError("--evaluate needs --zeroshot-data/--zeroshot-labels/--zeroshot-templates (or use "
                        "main_zeroshot.py --resume CKPT --data_path FOLDER --labels L --templates T)")
    if args.kind == "simclr" and args.loss == "siglip":
        raise UserError("--loss siglip is an image-text loss; SIMCLR_* models have no text tower")
    args.medslip = args.model.startswith("MedSLIP_")
    if args.medslip:
        resolve_medslip(args, given)
    elif args.text_model or args.medclip_weights:
        raise UserError(f"--text_model / --medclip_weights belong to the MedSLIP_* models, not --model {args.model}")


def resolve_medslip(args: argparse.Namespace, given: set) -> None:
    """MedSLIP towers: transformers present, text model and tokenizer readable from local files, context
    within the text model's positions, weights file present; all before any work."""
    from util.hf_text import load_config, require_transformers
    require_transformers(f"--model {args.model}")
    if args.loss == "siglip":
        raise UserError(f"--loss siglip: --model {args.model} trains with the CLIP loss (it has no logit bias); drop --loss")
    if "context_length" not in given:
        args.context_length = MEDSLIP_CONTEXT
    args.text_model = args.text_model or DEFAULT_TEXT_MODEL
    positions = getattr(load_config(args.text_model), "max_position_embeddings", None)
    if positions and args.context_length > positions:
        raise UserError(f"--context-length {args.context_length}: the text model {args.text_model} has {positions} "
                        f"positions; pass --context-length {positions} or less")
    medslip_tokenizer(args.text_model, args.context_length)
    if args.medclip_weights and not os.path.isfile(args.medclip_weights):
        raise UserError(f"--medclip_weights {args.medclip_weights}: no such file (MedCLIP's pytorch_model.bin or a "
                        f"MedSLIP checkpoint.pt)")


_TOKENIZERS: dict[tuple[str, int], Any] = {}


def medslip_tokenizer(text_model: str, context_length: int) -> Any:
    """The Hugging Face tokenizer of --text_model as MedSLIP calls it (truncation, padding to the context)."""
    key = (text_model, context_length)
    if key not in _TOKENIZERS:
        from util.hf_text import HFTokenize, load_tokenizer
        _TOKENIZERS[key] = HFTokenize(load_tokenizer(text_model, max_length=context_length), context_length)
    return _TOKENIZERS[key]


def caption_tokenizer(args: argparse.Namespace) -> Any:
    """`(texts, context_length) -> (ids, number cut)`: CLIP's BPE, or the text model's tokenizer for MedSLIP."""
    if getattr(args, "medslip", False):
        return medslip_tokenizer(args.text_model, args.context_length)
    from util.tokenizer import tokenize
    return lambda texts, context_length: tokenize(texts, context_length, compat_truncate=args.compat == "slip_truncate")


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Factory arguments from flags: the SimCLR MLP sizes for models that have it; MedSLIP's text tower."""
    kw: dict[str, Any] = {"img_size": args.input_size}
    if getattr(args, "medslip", False):
        return {**kw, "ssl_mlp_dim": args.ssl_mlp_dim, "ssl_emb_dim": args.ssl_emb_dim, "text_model": args.text_model,
                "text_pooling": args.text_pooling}
    if args.kind in ("slip", "simclr"):
        kw.update(ssl_mlp_dim=args.ssl_mlp_dim, ssl_emb_dim=args.ssl_emb_dim)
    if args.kind != "simclr" and args.context_length != 77:
        kw["context_length"] = args.context_length
    return kw


def build_model(args: argparse.Namespace) -> nn.Module:
    kw = model_kwargs(args)
    if args.loss == "siglip":
        kw["siglip"] = True  # a learned logit bias; scale starts at 10, bias at -10 (SigLIP's initialisation)
    try:
        model = create_model(args.model, **kw)
    except (ValueError, TypeError) as e:
        raise UserError(f"--model {args.model}: {e}") from None
    if getattr(args, "medslip", False):
        tok = medslip_tokenizer(args.text_model, args.context_length)
        if tok.pad_token_id != model.pad_token_id:
            raise UserError(f"--text_model {args.text_model}: its tokenizer pads with id {tok.pad_token_id} but the "
                            f"model's config says {model.pad_token_id}; fix pad_token_id in config.json")
        if args.medclip_weights:
            what = models_medclip.load_medclip_weights(model, args.medclip_weights)
            logger.info("--medclip_weights %s: %s weights loaded", args.medclip_weights, what)
    return model


# ------------------------------------------------------------------------------------------------- data
def build_datasets(args: argparse.Namespace) -> tuple[CaptionDataset, CaptionDataset | None]:
    tokenize = caption_tokenizer(args)

    def tok(texts: list[str]) -> tuple[torch.Tensor, int]:
        return tokenize(texts, args.context_length)
    mean, std = NORMS[args.norm]
    common = dict(size=args.input_size, ssl_views=args.kind in ("slip", "simclr"), clip_view=args.kind != "simclr",
                  seed=args.seed, bad_image=args.bad_image, mean=mean, std=std)
    train = CaptionDataset(read_captions(args.dataset, args.root, args.metadata, args.bad_image), tok, **common)
    val = None
    if args.metadataval:
        root_val = args.root_val or args.root.replace("/train", "/validation")
        val = CaptionDataset(read_captions(args.dataset, root_val, args.metadataval, args.bad_image), tok, **common)
    return train, val


def zeroshot_setup(args: argparse.Namespace, device: torch.device) -> Any:
    """(loader, class names, templates) of the zero-shot monitor, or None."""
    if not args.zeroshot_data:
        return None
    from main_zeroshot import build_eval_loader, read_prompts
    classnames, templates = read_prompts(args.zeroshot_labels, args.zeroshot_templates, args.zeroshot_name or None)
    loader, classes = build_eval_loader(args.zeroshot_data, args, device, len(classnames))
    if args.norm != "imagenet" and hasattr(getattr(loader, "dataset", None), "transform"):
        from util.captions import eval_transform
        loader.dataset.transform = eval_transform(args.input_size, *NORMS[args.norm])
    return loader, classnames, templates, classes


def run_zeroshot(model: nn.Module, zs: Any, device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    from engine_slip import zeroshot_classifier, zeroshot_predict
    from util.metrics import classification_metrics
    loader, classnames, templates, _ = zs
    from util.tokenizer import tokenize
    tok = medslip_tokenizer(args.text_model, args.context_length) if getattr(args, "medslip", False) else tokenize
    clf = zeroshot_classifier(model, classnames, templates, tok, device, args.context_length)
    out = zeroshot_predict(model, loader, clf, device, args.amp)
    m = classification_metrics(out["targets"], out["probs"], num_classes=len(classnames))
    unwrap(model).train()
    return {"zeroshot_top1": m["accuracy"], "zeroshot_auroc": m["auroc"] if m["auroc"] is not None else float("nan")}


# ------------------------------------------------------------------------------------------------- run
def main(args: argparse.Namespace) -> dict[str, Any]:
    resolve_args(args)
    check_output_path(args.output_dir, "--output-dir")  # an existing file there is refused, never touched
    with start_guard(args.output_dir):  # a failed start leaves no config.json, tensorboard/ or empty folder
        return pretrain(args)


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    device = setup(args)
    if args.wandb:
        logger.info("--wandb: ignored (no network); metrics go to log.txt and TensorBoard")
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.evaluate:
        return evaluate_only(model, args, device)
    dataset, val_dataset = build_datasets(args)
    world = get_world_size()
    sampler = EpochIndexSampler(dataset, num_replicas=world, rank=get_rank(), shuffle=True, seed=args.seed)
    steps_per_epoch = sampler.num_samples // args.batch_size
    updates_per_epoch = steps_per_epoch // args.update_freq
    if updates_per_epoch == 0:
        raise UserError(f"{len(dataset)} pairs cannot fill one update of {args.batch_size} x {world} processes x "
                        f"--update-freq {args.update_freq}; lower --batch-size")
    steps_per_epoch = updates_per_epoch * args.update_freq  # whole updates only, as SLIP's schedule counts them
    if args.kind in ("slip", "simclr") and args.batch_size < 32:
        logger.warning("--batch-size %d per process: the SimCLR MLP's BatchNorm statistics are noisy below 32",
                       args.batch_size)
    logger.info("model %s (%.1fM trainable), %d pairs (%s), batch %d x %d x update-freq %d, lr %.3g, amp %s, "
                "device %s", args.model, n_params / 1e6, len(dataset), args.dataset, args.batch_size, world,
                args.update_freq, args.lr, args.amp, device)
    if args.dry_run:
        logger.info("dry run: configuration is valid; %d steps per epoch", steps_per_epoch)
        return {"dry_run": True, "steps_per_epoch": steps_per_epoch, "model": args.model}

    if world > 1 and args.kind in ("slip", "simclr"):
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SLIP's MLP normalises over all ranks' batches
        else:
            logger.info("several CPU processes: the SimCLR MLP's BatchNorm uses per-process statistics (SyncBatchNorm "
                        "needs GPUs)")
    model, plain = prepare_model(model, args, device)
    optimizer = build_optimizer(plain, args.lr, args.wd, args.betas, args.eps)
    opt = Optimization(optimizer, args.amp, args.update_freq, None, args.max_nonfinite)
    from util.contrastive import clamp_logit_scale
    if args.kind != "simclr":
        opt.after_step = clamp_logit_scale
    schedule = SlipSchedule(args.lr, args.lr_start, args.lr_end, args.warmup_epochs, args.epochs, updates_per_epoch)

    config = args_to_dict(args)
    config.pop("explicit_flags", None)
    states = {"state_dict": model if is_fsdp(model) else DDPPrefixedState(model, "state_dict", "--model / --ssl-mlp-dim / --ssl-emb-dim")}
    check_output_dir(args.output_dir)
    ckpt = maybe_resume(args, config, states, opt, slip_args.SLIP_RESUME_FIELDS)
    start_epoch, start_step, loop_state = resume_position(args, ckpt)

    loader = make_loader(dataset, sampler, args, device, args.batch_size, drop_last=True)
    val_loader = None
    if val_dataset is not None:
        from util.samplers import SequentialShardSampler
        val_loader = make_loader(val_dataset, SequentialShardSampler(val_dataset, num_replicas=world, rank=get_rank()),
                                 args, device, args.batch_size, drop_last=False)
    zs = zeroshot_setup(args, device)
    run_logger = RunLogger(args.output_dir, os.path.join(args.output_dir, "tensorboard"))
    if is_main_process():
        write_atomic(os.path.join(args.output_dir, "config.json"), json.dumps(config, indent=1).encode("utf-8"))
    preprocessing = {"input_size": args.input_size, "mean": list(NORMS[args.norm][0]), "std": list(NORMS[args.norm][1]),
                     "norm_preset": args.norm, "deblur": False, "blur": None, "model": args.model}

    def extra() -> dict[str, Any]:
        # SLIP's files always carry `scaler` (a disabled GradScaler's state is {}); fp16 runs store the real one.
        return {"preprocessing": preprocessing, **({"scaler": {}} if opt.scaler is None else {})}
    checkpointer = RunCheckpointer(args, states, opt, config, extra=extra)
    checkpointer.steps_per_epoch = steps_per_epoch
    if args.inject_nonfinite:
        opt.poison_steps = {int(x) for x in args.inject_nonfinite.split(",") if x.strip()}
    STOP.install()
    zs_stats: dict[str, float] = {}
    best_val = [resumed_best_val_loss(args.output_dir) if ckpt else float("inf")]
    start = time.time()
    clock = RunClock(start_epoch + start_step / steps_per_epoch, args.epochs)
    training_started(args.output_dir)

    def train(epoch: int, first: int) -> dict[str, Any]:
        return train_one_epoch(model, loader, opt, device, epoch, args, schedule, args.kind, run_logger=run_logger,
                               start_step=first, steps_per_epoch=steps_per_epoch,
                               loop_state=loop_state if first else None, on_update=checkpointer.on_update(epoch),
                               clock=clock)

    def after_epoch(epoch: int, stats: dict[str, Any], last: bool) -> dict[str, Any]:
        record: dict[str, Any] = {}
        if val_loader is not None:
            record.update({f"val_{k}": v for k, v in validate(model, val_loader, device, args.kind, args).items()})
        if args.medslip:
            save_encoders(model, args.output_dir)
            if val_loader is not None and record["val_loss"] < best_val[0]:
                best_val[0] = record["val_loss"]
                save_encoders(model, args.output_dir, "best_")
                if is_main_process():  # a resumed run compares against it, not against +inf
                    write_atomic(os.path.join(args.output_dir, BEST_RECORD),
                                 json.dumps({"epoch": epoch, "val_loss": best_val[0]}).encode("utf-8"))
        if zs is not None and ((epoch + 1) % args.eval_freq == 0 or last):
            zs_stats.update(run_zeroshot(model, zs, device, args))
            logger.info("epoch %d: zero-shot top-1 %.3f, macro AUROC %.3f", epoch, zs_stats["zeroshot_top1"],
                        zs_stats["zeroshot_auroc"])
            record.update(zs_stats)
            run_logger.scalars(zs_stats, epoch)
        return record

    # SLIP keeps the checkpoints of epochs whose one-based number divides by --save-freq
    stats, preempted = run_epochs(start_epoch=start_epoch, epochs=args.epochs, start_step=start_step,
                                  batch_size=args.batch_size, sampler=sampler, train=train,
                                  checkpointer=checkpointer, periodic=periodic_every(args.save_freq, one_based=True),
                                  run_logger=run_logger, cleanup=cleanup, after_epoch=after_epoch,
                                  n_parameters=n_params)
    if preempted:
        return {"preempted": True}
    elapsed = time.time() - start
    run_logger.close()
    last_ckpt = os.path.join(args.output_dir, "checkpoint-last.pth")
    print_summary(f"{args.kind.upper()} pretraining", [
        ("run", f"{args.model}, {args.epochs} epochs, {len(dataset)} pairs ({args.dataset}), {elapsed:.0f} s"),
        ("final loss", f"{stats['loss']:.4f} (epoch mean)" if stats else None),
        ("zero-shot", f"top-1 {zs_stats['zeroshot_top1']:.3f}" if zs_stats else None),
        ("checkpoint", last_ckpt), ("outputs", f"{args.output_dir}/{{log.txt,config.json,tensorboard/}}"),
        ("encoders", f"{args.output_dir}/{{image,text}}_encoder.pth (MedSLIP's files)" if args.medslip else None)],
        next_cmd=(f"python main_slip.py --evaluate --model {args.model} --text_model {args.text_model} --context-length "
                  f"{args.context_length} --input-size {args.input_size} --norm {args.norm} --resume {last_ckpt} "
                  f"--zeroshot-data FOLDER --zeroshot-labels labels.json --zeroshot-templates templates.json"
                  if args.medslip else
                  f"python main_zeroshot.py --resume {last_ckpt} --data_path FOLDER --labels labels.json "
                  f"--templates templates.json --output-dir {os.path.join(args.output_dir, 'zeroshot')}"))
    cleanup()
    return {**stats, **zs_stats, "elapsed_s": elapsed}


BEST_RECORD = "best_encoders.json"  # epoch and validation loss of the best_*_encoder.pth files


def resumed_best_val_loss(output_dir: str) -> float:
    """The validation loss of the best_* encoders an interrupted run wrote (+inf when it wrote none)."""
    path = os.path.join(output_dir, BEST_RECORD)
    if not os.path.isfile(path):
        return float("inf")
    try:
        with open(path, encoding="utf-8") as f:
            return float(json.load(f)["val_loss"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: unreadable ({e}); delete it to let the resumed run choose its best encoders "
                        "afresh") from None


def save_encoders(model: nn.Module, output_dir: str, prefix: str = "") -> None:
    """MedSLIP's extra outputs: `{prefix}image_encoder.pth` / `{prefix}text_encoder.pth`, the state dicts of
    MedCLIP_model.vision_model and .text_model (rank 0; atomic writes)."""
    if not is_main_process():
        return
    if is_fsdp(model):
        logger.warning("image_encoder.pth / text_encoder.pth are not written under FSDP; take the towers from "
                       "checkpoint-last.pth (module.MedCLIP_model.*)")
        return
    from util.checkpoint_files import atomic_save
    medclip = unwrap(model).MedCLIP_model
    atomic_save(medclip.vision_model.state_dict(), os.path.join(output_dir, f"{prefix}image_encoder.pth"))
    atomic_save(medclip.text_model.state_dict(), os.path.join(output_dir, f"{prefix}text_encoder.pth"))


def evaluate_only(model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """--evaluate: zero-shot accuracy of --resume's weights on --zeroshot-data."""
    from main_zeroshot import load_weights
    if not args.resume or args.resume == "auto":
        raise UserError("--evaluate needs --resume CHECKPOINT (the weights to evaluate)")
    if args.medslip:  # ours or MedSLIP's checkpoint.pt (unused SLIP towers ignored)
        models_medclip.load_medclip_weights(model, args.resume, "--resume")
    else:
        load_weights(model, args.resume)
    model.to(device)
    stats = run_zeroshot(model, zeroshot_setup(args, device), device, args)
    logger.info("zero-shot top-1 %.3f, macro AUROC %.3f", stats["zeroshot_top1"], stats["zeroshot_auroc"])
    cleanup()
    return stats


if __name__ == "__main__":
    run_main(main, get_args_parser())
