"""Reconstruction figures of a masked autoencoder (MAE, deblurring MAE, ConvMAE, CrossMAE checkpoints).

One figure per image: original, masked input, the reconstruction with the visible patches pasted back
(the view to judge), and the raw prediction (plus the blurred input for deblurring models). MAE's loss
covers the masked patches only, so the raw prediction of visible patches was never trained; the column
titles and the heading (model, mask ratio, the model's loss on that image) say so. The model, input
size, normalisation and norm-pix setting come from the checkpoint when it records them (main_pretrain.py's
checkpoints do); published `{'model': state_dict}` files are recognised from their keys and shapes.

Examples:
  python visualize_mae.py --checkpoint out/checkpoint-last.pth --output_dir figs/ fundus.png more_images/
  # USPEC's demo settings (mask .85, seed 11, LANCZOS resize); MAE's demo uses --mask_ratio .75 --seed 2
  python visualize_mae.py --checkpoint mae_OS_pretrain_ckpt.pth --model mae_vit_large_patch16 \\
      --mask_ratio 0.85 --seed 11 --interpolation lanczos --output_dir figs/ images/

The mask is `torch.rand(1, L)` from a CPU generator seeded with --seed for every image, i.e. the mask the
reference demos draw after `torch.manual_seed(seed)` on CPU. With norm-pix targets the model predicts
per-patch standardised pixels; the figure maps them back with the true patch's mean and variance (as
engine_pretrain.reconstruct does) and says so under the figure.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from util.cli import (HelpFormatter, UserError, add_bool_flag, check_output_path, exit_if_help, run_main,
                      setup_logging)

logger = logging.getLogger("medfound")

# Key prefixes of decoder-side weights in every MAE family (MAE, ConvMAE fusion convs, CrossMAE mixing).
DECODER_KEYS = ("mask_token", "decoder_", "stage1_output_decode", "stage2_output_decode", "dec_norms.", "wfm.")
ENCODER_ONLY_NOTE = ("checkpoint has no decoder weights (encoder-only release): no reconstruction is possible. "
                     "Use a checkpoint saved with its decoder (e.g. main_pretrain.py's checkpoint-*.pth).")
NORM_PIX_NOTE = ("norm_pix_loss model: predicted patches are de-normalised with the true patch's mean and "
                 "variance, so colours of masked patches borrow information the model did not see.")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("visualize_mae.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    p.add_argument("--checkpoint", "--resume", dest="checkpoint", required=True,
                   help="MAE / deblurring MAE / ConvMAE / CrossMAE checkpoint (ours or published {'model': sd})")
    p.add_argument("--model", default=None, help="registered model name (default: from the checkpoint or its keys)")
    p.add_argument("--input_size", default=None, type=int, help="default: the checkpoint's")
    p.add_argument("--norm_preset", default=None, help="normalisation (default: the checkpoint's, else imagenet)")
    add_bool_flag(p, "--norm_pix_loss", default=None,
                  help="the model was trained with per-patch normalised targets (default: from the checkpoint)")
    p.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed (USPEC demo: 0.85)")
    p.add_argument("--seed", default=2, type=int, help="mask seed (MAE demo: 2, USPEC demo: 11)")
    p.add_argument("--interpolation", default="bicubic", choices=("bicubic", "bilinear", "lanczos"),
                   help="resize of the whole image to the input size (USPEC: lanczos)")
    p.add_argument("--blur", default=None, choices=("gaussian", "mean", "median", "motion", "defocus"),
                   help="deblurring models: blur applied to make the input (default: the checkpoint's)")
    p.add_argument("--blur_sigma", default=1.1, type=float, help="gaussian blur sigma in pixels (deblurring models)")
    p.add_argument("--blur_ksize", default=5, type=int,
                   help="blur size in pixels: mean/median window, motion length, defocus radius (not gaussian)")
    p.add_argument("--scale", default=None, type=int, help="panel magnification (default: panels >= 160 px)")
    p.add_argument("--save_panels", action="store_true",
                   help="also write each view as its own PNG (<stem>_original/_masked/_pasted, and "
                        "_reconstruction: the raw prediction, untrained on visible patches)")
    p.add_argument("--force", action="store_true", help="load a checkpoint whose decoder only partly fits the model")
    p.add_argument("--bad_image", default="error", choices=("error", "skip"),
                   help="an unreadable input image: stop with its name, or leave it out (listed in the log)")
    p.add_argument("--output_dir", "--output", dest="output_dir", default="./mae_figures", help="folder for the PNG figures")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p


exit_if_help(get_args_parser)
# The imports below pull in torch; --help has already exited above without them.
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import models_mae  # noqa: E402,F401  (registers the MAE factories)
from engine_pretrain import reconstruct  # noqa: E402
from util.checkpoint import CheckpointError, extract_state_dict, load_file  # noqa: E402
from util.vis import ORIGINAL, add_note, collect_images, masked_title, panel_grid, reconstruction_grid, save_png  # noqa: E402


# --------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedMAE:
    model: nn.Module
    name: str
    input_size: int
    mean: list[float]
    std: list[float]
    norm_pix_loss: bool
    has_decoder: bool
    deblur: bool
    blur: dict | None = None
    notes: list[str] = field(default_factory=list)


def _config(ckpt: Any) -> dict[str, Any]:
    from util.explain import checkpoint_config
    return checkpoint_config(ckpt)


def decoder_family(sd: dict[str, torch.Tensor]) -> str:
    """'crossmae', 'mae' (MAE/ConvMAE self-attention decoder) or 'none' (encoder-only), from the keys."""
    if any(k.startswith(("wfm.", "dec_norms.")) or ".cross_attn." in k for k in sd):
        return "crossmae"
    if any(k.startswith(DECODER_KEYS) for k in sd):
        return "mae"
    return "none"


def _block_count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
    return max(idx) + 1 if idx else 0


def infer_model(sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """(registered name, constructor kwargs) of a published ViT-MAE / CrossMAE state dict, from its shapes."""
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise CheckpointError("cannot infer the model from this checkpoint's keys (not a ViT MAE layout); "
                              "pass --model (e.g. convmae_convvit_base_patch16)")
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    dim = int(sd["pos_embed"].shape[-1])
    depth = _block_count(sd, "blocks.")
    family = decoder_family(sd)
    stems = [s for s, v in models_mae._SIZES.items() if v[:3] == (patch, dim, depth)]
    if not stems:
        raise CheckpointError(f"no registered MAE has patch {patch}, width {dim}, depth {depth}; pass --model")
    stem = stems[0]
    if family == "crossmae":
        dec_depth = _block_count(sd, "decoder_blocks.")
        kw: dict[str, Any] = {"decoder_depth": dec_depth,
                              "self_attn": any(".norm0." in k for k in sd if k.startswith("decoder_blocks.")),
                              "weight_fm": "wfm.linear.weight" in sd}
        if kw["weight_fm"]:
            k = int(sd["wfm.linear.weight"].shape[1])
            if k not in (depth, depth + 1):
                raise CheckpointError(f"CrossMAE mixing weights mix {k} features of a {depth}-block encoder: cannot "
                                      f"tell which; pass --model and the checkpoint's args")
            kw.update(use_fm=["-1"], use_input=k == depth + 1)
        return f"crossmae_{stem}", kw
    if family == "mae":
        d = models_mae._SIZES[stem]
        if "decoder_embed.weight" in sd and (int(sd["decoder_embed.weight"].shape[0]) != d[4]
                                             or _block_count(sd, "decoder_blocks.") != d[5]):
            raise CheckpointError(f"decoder {tuple(sd['decoder_embed.weight'].shape)} x "
                                  f"{_block_count(sd, 'decoder_blocks.')} blocks matches no registered MAE of this "
                                  f"encoder; pass --model")
    return f"mae_{stem}", {}


def _family_kwargs(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Constructor kwargs from the checkpoint's saved flags, through main_pretrain's family hooks."""
    if not cfg:
        return {}
    import main_pretrain
    ns = main_pretrain.get_args_parser().parse_args(["--output_dir", "."])
    for k, v in cfg.items():
        setattr(ns, k, v)
    return main_pretrain.family_kwargs(ns, name)


def load_mae(path: str, model_name: str | None = None, input_size: int | None = None,
             norm_pix_loss: bool | None = None, norm_preset: str | None = None, force: bool = False,
             device: str | torch.device = "cpu") -> LoadedMAE:
    """Build the pretraining model a checkpoint was written for and load it (decoder family taken from its keys)."""
    import main_pretrain  # noqa: F401  (registers every pretraining family: MAE, ConvMAE, CrossMAE, ...)
    from util.data import resolve_norm
    from util.registry import create_model, is_registered, resolve
    ckpt = load_file(path)
    sd = extract_state_dict(ckpt, source=path)
    cfg = _config(ckpt)
    pre = dict(ckpt.get("preprocessing") or {}) if isinstance(ckpt, dict) else {}
    family = decoder_family(sd)
    name = model_name or cfg.get("model") or pre.get("model")
    kwargs: dict[str, Any] = {}
    if name:
        name = resolve(name)
        if not is_registered(name):
            create_model(name)  # one-line unknown-model error with suggestions
        kwargs = _family_kwargs(name, cfg)
    else:
        name, kwargs = infer_model(sd)
        logger.info("model inferred from the checkpoint's keys: %s %s", name, kwargs or "")
    ckpt_size = None
    if "pos_embed" in sd and "patch_embed.proj.weight" in sd:  # ViT: cls row + grid
        tokens = int(sd["pos_embed"].shape[1]) - 1
        ckpt_size = int(round(math.sqrt(tokens))) * int(sd["patch_embed.proj.weight"].shape[-1])
    elif "pos_embed" in sd and all(f"patch_embed{i}.proj.weight" in sd for i in (1, 2, 3)):  # ConvViT: no cls
        stride = math.prod(int(sd[f"patch_embed{i}.proj.weight"].shape[-1]) for i in (1, 2, 3))
        ckpt_size = int(round(math.sqrt(int(sd["pos_embed"].shape[1])))) * stride
    size = int(input_size or pre.get("input_size") or cfg.get("input_size") or ckpt_size or 224)
    npl = norm_pix_loss
    if npl is None:
        npl = pre.get("norm_pix_loss", cfg.get("norm_pix_loss"))
        if npl is None:
            logger.warning("%s does not record norm_pix_loss: assuming False (pass --norm_pix_loss if the model "
                           "was trained with normalised-pixel targets, or the colours will be off)", path)
            npl = False
    try:
        model = create_model(name, img_size=size, norm_pix_loss=bool(npl), **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--model {name} --input_size {size}: {e}") from None
    target = model.state_dict()
    model_family = decoder_family(target)
    if family != "none" and family != model_family and not force:
        raise CheckpointError(f"{path} holds a {family.upper()} decoder but --model {name} has a "
                              f"{model_family.upper()} decoder; pass the matching --model (or omit it)")
    for key in ("pos_embed", "decoder_pos_embed"):  # fixed sin-cos tables: the model's own fit any size
        if key in sd and key in target and sd[key].shape != target[key].shape:
            logger.info("%s %s -> %s: using the sin-cos table of --input_size %d", key, tuple(sd[key].shape),
                        tuple(target[key].shape), size)
            del sd[key]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in ("pos_embed", "decoder_pos_embed")]
    dec_missing = [k for k in missing if k.startswith(DECODER_KEYS)]
    enc_missing = [k for k in missing if k not in dec_missing]
    if enc_missing:
        raise CheckpointError(f"{path}: {len(enc_missing)} encoder weights missing for --model {name} (e.g. "
                              f"{enc_missing[:3]}); pick the model the checkpoint was trained with")
    dec_keys = [k for k in target if k.startswith(DECODER_KEYS)]
    has_decoder = family != "none" and len(dec_missing) < len(dec_keys)
    if unexpected and not force:
        raise CheckpointError(f"{path}: {len(unexpected)} weights do not belong to --model {name} (e.g. "
                              f"{list(unexpected)[:3]}; decoder family in the file: {family}); pass the right --model "
                              f"or --force")
    if has_decoder and dec_missing and not force:
        raise CheckpointError(f"{path}: the decoder only partly fits --model {name} ({len(dec_missing)} decoder "
                              f"weights missing, e.g. {dec_missing[:3]}); refusing a half-random decoder (--force "
                              f"to load anyway)")
    notes = []
    if not has_decoder:
        logger.warning("%s: %s", path, ENCODER_ONLY_NOTE)
        notes.append(ENCODER_ONLY_NOTE)
    if pre.get("mean") and pre.get("std") and not norm_preset:
        mean, std = list(pre["mean"]), list(pre["std"])
    else:
        mean, std = resolve_norm(norm_preset or pre.get("norm_preset") or cfg.get("norm_preset") or "imagenet")
    if npl and has_decoder:
        notes.append(NORM_PIX_NOTE)
    deblur = bool(getattr(model, "deblur", False))
    blur = pre.get("blur") or cfg.get("blur_recorded")
    return LoadedMAE(model=model.to(device).eval(), name=name, input_size=size, mean=mean, std=std,
                     norm_pix_loss=bool(npl), has_decoder=has_decoder, deblur=deblur,
                     blur=blur if isinstance(blur, dict) else None, notes=notes)


# --------------------------------------------------------------------------------------------- figures
def load_input(path_or_image: Any, size: int, mean: Sequence[float], std: Sequence[float],
               interpolation: str = "bicubic", blur: dict | None = None, blur_key: str | int = 0
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(model input, target or None) as normalised (1, 3, size, size) tensors: the whole image resized
    (the demos' preprocessing); with `blur` the input is the blurred image and the target the sharp one."""
    from PIL import Image
    import torchvision.transforms.functional as TF
    from util.data import load_image
    if isinstance(path_or_image, np.ndarray):
        img = Image.fromarray(path_or_image).convert("RGB")
    elif isinstance(path_or_image, Image.Image):
        img = path_or_image.convert("RGB")
    else:
        img = load_image(path_or_image)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}[interpolation]
    img = img.resize((size, size), resample)

    def tensor(im: Image.Image) -> torch.Tensor:
        return TF.normalize(TF.to_tensor(im.convert("RGB")), mean, std)[None]

    if blur is None:
        return tensor(img), None
    from util.blur import BlurSpec, blur_pil
    return tensor(blur_pil(img, BlurSpec.from_dict(blur), key=blur_key)), tensor(img)


def mask_noise(num_patches: int, seed: int) -> torch.Tensor:
    """The demos' mask: `torch.rand(1, L)` after seeding (a CPU generator, so it does not depend on device)."""
    return torch.rand(1, num_patches, generator=torch.Generator().manual_seed(seed))


def reconstruction_figure(loaded: LoadedMAE, x: torch.Tensor, target: torch.Tensor | None = None,
                          mask_ratio: float = 0.75, seed: int = 2, scale: int | None = None
                          ) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """(HxWx3 uint8 figure, the views) for one normalised image (1, 3, H, W). The heading gives the
    model, the mask ratio and the model's own loss on this image and mask."""
    model = loaded.model
    device = next(model.parameters()).device
    x = x.to(device)
    target = target.to(device) if target is not None else None
    noise = mask_noise(model.num_patches, seed).to(device)
    size = x.shape[-1]
    scale = scale or max(1, math.ceil(160 / size))
    if loaded.has_decoder:
        out = reconstruct(model, x, mask_ratio, noise=noise, target=target)
        with torch.no_grad():  # the number the model was trained to lower, for this image and mask
            loss = float(model(x, mask_ratio=mask_ratio, noise=noise, target=target)[0])
        grid = reconstruction_grid(out, loaded.mean, loaded.std, mask_ratio, loss=loss,
                                   loss_scope=getattr(model, "loss_scope", "masked"), model=loaded.name,
                                   blurred=target is not None, scale=scale, loss_label="loss on this image",
                                   notes=loaded.notes)
        views = {"original": out["target"], "masked": out["masked"], "reconstruction": out["recon"],
                 "pasted": out["pasted"]}
        return grid, views
    from models_mae import random_masking
    p, c = model.patch_size, model.in_chans
    _, mask, _ = random_masking(torch.zeros(1, model.num_patches, 1, device=device), mask_ratio, noise)
    m = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * c))
    ref = x if target is None else target
    views = {"original": ref, "masked": x * (1 - m)}
    grid = panel_grid({ORIGINAL: ref, masked_title(mask_ratio): x * (1 - m)}, loaded.mean, loaded.std,
                      scale=scale, title=f"{loaded.name} | mask ratio {mask_ratio:.2f} | no decoder: no reconstruction")
    for note in loaded.notes:
        grid = add_note(grid, note)
    return grid, views


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup_logging()
    check_output_path(args.output_dir)  # a file there is refused and left untouched
    if not 0.0 <= args.mask_ratio < 1.0:
        raise UserError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    device = torch.device(args.device if not str(args.device).startswith("cuda") or torch.cuda.is_available() else "cpu")
    loaded = load_mae(args.checkpoint, args.model, args.input_size, args.norm_pix_loss, args.norm_preset, args.force,
                      device)
    blur = None
    if loaded.deblur:
        if args.blur:
            from util.blur import BlurSpec
            blur = BlurSpec(method=args.blur, sigma=args.blur_sigma, ksize=args.blur_ksize, seed=args.seed).to_dict()
        elif loaded.blur:
            blur = loaded.blur
        else:
            logger.warning("deblurring model without a recorded blur: the images are taken as already blurred "
                           "(pass --blur to blur sharp images first)")
    from util.image_io import BadImageError, with_skip_advice
    from util.skipping import skipped_message
    inputs, skipped = [], []
    for path, stem in collect_images(args.inputs):  # every input is read before the first figure is written
        try:
            inputs.append((stem, *load_input(path, loaded.input_size, loaded.mean, loaded.std, args.interpolation,
                                             blur, stem)))
        except BadImageError as e:
            if args.bad_image != "skip":
                raise with_skip_advice(e) from None
            logger.warning("skipping unreadable image: %s", e)
            skipped.append(path)
    if skipped:
        logger.warning("%s", skipped_message(skipped))
    if not inputs:
        raise UserError(f"no readable image among {', '.join(args.inputs)} ({len(skipped)} unreadable)")
    os.makedirs(args.output_dir, exist_ok=True)
    written = []
    for stem, x, target in inputs:
        grid, views = reconstruction_figure(loaded, x, target, args.mask_ratio, args.seed, args.scale)
        out = os.path.join(args.output_dir, f"{stem}_mae.png")
        save_png(grid, out)
        written.append(out)
        if args.save_panels:
            from util.vis import denormalize
            for view, t in views.items():
                arr = (denormalize(t.detach().float().cpu(), loaded.mean, loaded.std)[0].permute(1, 2, 0).numpy()
                       * 255).round().astype(np.uint8)
                save_png(arr, os.path.join(args.output_dir, f"{stem}_{view}.png"))
    logger.info("wrote %d figure(s) to %s (model %s, input %d, mask %.2f, seed %d%s)", len(written), args.output_dir,
                loaded.name, loaded.input_size, args.mask_ratio, args.seed,
                "" if loaded.has_decoder else "; ENCODER-ONLY checkpoint: no reconstructions")
    return {"figures": written, "skipped_images": skipped, "has_decoder": loaded.has_decoder, "model": loaded.name,
            "input_size": loaded.input_size, "notes": loaded.notes}


if __name__ == "__main__":
    run_main(main, get_args_parser())
