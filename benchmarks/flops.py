"""FLOP counts of one benchmark step, counted and in closed form.

`torch.utils.flop_counter.FlopCounterMode` counts the FLOPs of matrix multiplications, convolutions and
attention (as explicit matmuls; SDPA is swapped for an equivalent math implementation while counting so
every backend is counted the same way) in one forward + backward of the actual model (built on the meta
device, so counting costs nothing and does not depend on the machine; on the real CPU if that fails).
Elementwise ops, normalisation, softmax, GELU, the loss and the optimizer are ignored, as is usual for
MFU (they are a few per cent). One multiply-add = 2 FLOP. For `inference` only the forward is counted.

Cross-check, closed form for ViT/MAE (printed next to the count): per token per transformer layer the
forward costs 24*D^2 + 4*L*D FLOP (qkv 6D^2, proj 2D^2, MLP 16D^2 for hidden 4D, attention 4*L*D with L
tokens in the sequence; for another MLP width 8*D^2 + 4*D*H + 4*L*D), plus the patch embedding
(2*N*C*p^2*D over all N patches), for MAE the decoder embedding, the decoder layers on N+1 tokens and the
prediction head, for a classifier the head; training = 3x forward. MAE's encoder sees
1 + int(N*(1 - mask_ratio)) tokens. The count is slightly below 3x forward because the patch embedding
needs no input gradient. For the reference sizes at 224 px the published analytic counts are
58.7 GFLOP per image (MAE-B/16 training), 105.4 (ViT-B/16 finetuning) and 124.5 (MAE-L/16); the
benchmark prints its count next to them.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.step import build_model, compute_loss, set_attention, synthetic_batch


# Published analytic costs (GFLOP per image): 224 px, patch 16, mask 0.75,
# MAE decoder 8 x 512; matmul FLOPs only; training = 3 x forward; inference = forward (2 x GMACs).
REFERENCE_GFLOP: dict[tuple[str, str], tuple[float, str]] = {
    ("mae_vit_base_patch16", "pretrain"): (58.7, "published: MAE ViT-B/16 training"),
    ("mae_vit_large_patch16", "pretrain"): (124.5, "published: MAE ViT-L/16 training"),
    ("vit_base_patch16", "finetune"): (105.4, "published: ViT-B/16 finetuning"),
    ("vit_large_patch16", "finetune"): (369.3, "published: ViT-L/16 finetuning"),
    ("vit_base_patch16", "inference"): (35.12, "published: ViT-B/16 forward, 17.56 GMACs"),
    ("vit_large_patch16", "inference"): (123.1, "published: ViT-L/16 forward, 61.55 GMACs"),
}


@contextlib.contextmanager
def math_sdpa():
    """Route F.scaled_dot_product_attention through explicit matmuls so FlopCounterMode counts attention
    whatever backend (CPU flash, meta) SDPA would dispatch to."""
    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or is_causal or kw:
            return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        s = q.shape[-1] ** -0.5 if scale is None else scale
        attn = (q @ k.transpose(-2, -1) * s).softmax(dim=-1)
        if dropout_p:
            attn = F.dropout(attn, dropout_p)
        return attn @ v

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


def count_flops(name: str, mode: str, input_size: int, mask_ratio: float = 0.75, nb_classes: int = 1000,
                norm_pix_loss: bool = False, batch_size: int = 2) -> dict[str, Any]:
    """FLOPs per image of one forward (+ backward unless inference), counted with FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    err = None
    for device in ("meta", "cpu"):
        try:
            torch.manual_seed(0)
            model = build_model(name, mode, input_size, nb_classes, 0.0, norm_pix_loss, device=device)
            set_attention(model, sdpa=True)
            batch = synthetic_batch(model, mode, batch_size, input_size, nb_classes, device=device)
            counter = FlopCounterMode(display=False)
            with counter, math_sdpa():
                if mode == "inference":
                    with torch.no_grad():
                        compute_loss(model, mode, batch, mask_ratio)
                else:
                    compute_loss(model, mode, batch, mask_ratio).backward()
            by_op = {str(k): v / batch_size for k, v in counter.get_flop_counts().get("Global", {}).items()}
            return {"flop_per_image": counter.get_total_flops() / batch_size, "by_op": by_op,
                    "counted_on": device, "counted_batch": batch_size}
        except Exception as e:  # meta construction unsupported by some module: count on the CPU
            err = e
    raise RuntimeError(f"FLOP counting failed: {err}")


def closed_form_flops(model: nn.Module, mode: str, mask_ratio: float = 0.75) -> dict[str, Any] | None:
    """Closed-form FLOPs per image for plain ViT classifiers and MAE (None for other families)."""
    from models_mae import MaskedAutoencoderViT
    from models_vit import Block, VisionTransformer

    def layers(blocks, tokens: int) -> float:
        total = 0.0
        for blk in blocks:
            if not isinstance(blk, Block):
                raise TypeError
            d = blk.attn.qkv.in_features
            h = blk.mlp.fc1.out_features
            total += tokens * (8 * d * d + 4 * d * h + 4 * tokens * d)
        return total

    try:
        if isinstance(model, MaskedAutoencoderViT) and type(model).__name__ == "MaskedAutoencoderViT":
            n, p, c, d = model.patch_embed.num_patches, model.patch_size, model.in_chans, model.embed_dim
            dd = model.decoder_embed.out_features
            le = 1 + int(n * (1 - mask_ratio))
            enc_blocks = layers(model.blocks, le)
            dec_blocks = layers(model.decoder_blocks, n + 1)
            other = 2 * n * c * p * p * d + 2 * le * d * dd + 2 * (n + 1) * dd * model.decoder_pred.out_features
            parts = {"encoder_blocks": enc_blocks, "decoder_blocks": dec_blocks, "embeddings_and_heads": other}
        elif isinstance(model, VisionTransformer) and not hasattr(model, "decoder_blocks"):
            n, p, c, d = model.patch_embed.num_patches, model.patch_size, model.in_chans, model.embed_dim
            head = 2 * d * model.head.out_features if isinstance(model.head, nn.Linear) else 0
            parts = {"blocks": layers(model.blocks, n + 1), "embeddings_and_heads": 2 * n * c * p * p * d + head}
        else:
            return None
    except TypeError:
        return None
    forward = sum(parts.values())
    factor = 1 if mode == "inference" else 3
    return {"forward_flop_per_image": forward, "flop_per_image": factor * forward,
            "blocks_only_flop_per_image": factor * sum(v for k, v in parts.items() if k != "embeddings_and_heads"),
            "parts_forward": parts, "factor": factor}


def flop_report(name: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    counted = count_flops(name, mode, args.input_size, args.mask_ratio, args.nb_classes, args.norm_pix_loss)
    shape_model = build_model(name, mode, args.input_size, args.nb_classes, 0.0, args.norm_pix_loss, "meta")
    closed = closed_form_flops(shape_model, mode, args.mask_ratio)
    key = (name[1:] if name.startswith("dmae_") else name, mode)
    ref = REFERENCE_GFLOP.get(key) if args.input_size == 224 and (mode != "pretrain" or args.mask_ratio == 0.75) \
        else None
    c = counted["flop_per_image"]
    out = {
        "method": "FlopCounterMode on one forward" + ("" if mode == "inference" else "+backward")
                  + " (matmul/conv/attention matmuls; elementwise ops ignored); 1 MAC = 2 FLOP",
        "counted_gflop_per_image": c / 1e9,
        "counted_by_op_gflop": {k: v / 1e9 for k, v in counted["by_op"].items()},
        "counted_on": counted["counted_on"],
        "closed_form_gflop_per_image": closed["flop_per_image"] / 1e9 if closed else None,
        "closed_form_blocks_only_gflop_per_image": closed["blocks_only_flop_per_image"] / 1e9 if closed else None,
        "closed_form_note": ("per token per layer 24*D^2 + 4*L*D forward (8D^2+4DH+4LD), + embeddings/heads, "
                             f"x{closed['factor']}" if closed else "no closed form for this model family"),
        "counted_over_closed_form": (c / closed["flop_per_image"]) if closed else None,
        "reference_gflop_per_image": ref[0] if ref else None,
        "reference_source": ref[1] if ref else None,
        "counted_over_reference": (c / 1e9 / ref[0]) if ref else None,
    }
    return out
