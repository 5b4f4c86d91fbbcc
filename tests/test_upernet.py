"""UPerNet segmentation (models_upernet) and ConvViT's multi-scale features (models_convmae).

Tiny backbones only (vit_micro_patch8: D 64, depth 2; convvit_micro_patch16: 32/48/64 channels); the
acceptance-style test trains a small UPerNet for 100 steps on the synthetic VisionFM lesion masks
(util.synthetic_vfm) and checks the held-out foreground IoU against the all-background prediction.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import models_convmae  # noqa: F401  (registers the ConvViT factories)
import models_mae  # noqa: F401  (registers the MAE factories)
from models_upernet import MMSEG_WD_COMPAT, UPerNet, build_segmentor, load_backbone, upernet_loss, vit_seg_indices
from models_vit import VisionTransformer
from util.checkpoint import CheckpointError, save_training_checkpoint
from util.cli import UserError
from util.optim import param_groups_lrd
from util.pos_embed import resize_pos_embed
from util.registry import create_model
from util.synthetic_vfm import write_vfm_task

VIT, CONVVIT = "vit_micro_patch8", "convvit_micro_patch16"
SMALL = dict(channels=16, aux_channels=8)


# ------------------------------------------------------------------------- ConvViT multi-scale features
def test_convvit_forward_intermediates_shapes_and_stage3_is_forward_features():
    torch.manual_seed(0)
    m = create_model(CONVVIT, img_size=64, num_classes=0).eval()
    assert m.feature_channels == (32, 48, 64) and m.feature_strides == (4, 8, 16)
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        s1, s2, s3 = m.forward_intermediates(x)
        tokens = m.forward_features(x)
        blocks = m.forward_intermediates(x, indices=[0, -1])
        final, nlc = m.forward_intermediates(x, output_fmt="NLC", intermediates_only=False)
    assert s1.shape == (2, 32, 16, 16) and s2.shape == (2, 48, 8, 8) and s3.shape == (2, 64, 4, 4)
    # stage 3 is the classifier's token path, laid out as a map (row-major tokens)
    torch.testing.assert_close(s3.flatten(2).transpose(1, 2), tokens, rtol=0, atol=0)
    assert len(blocks) == 2 and all(b.shape == (2, 64, 4, 4) for b in blocks)
    torch.testing.assert_close(blocks[1], s3, rtol=0, atol=0)
    assert not torch.equal(blocks[0], blocks[1])
    assert [t.shape for t in nlc] == [(2, 256, 32), (2, 64, 48), (2, 16, 64)]
    torch.testing.assert_close(final, tokens, rtol=0, atol=0)


def test_convvit_forward_intermediates_other_sizes_resize_the_position_table():
    """At a size it was not built for (non-square too), stage 3 equals a model built at that size whose
    position table is the resized one."""
    torch.manual_seed(0)
    m = create_model(CONVVIT, img_size=64, num_classes=0).eval()
    other = create_model(CONVVIT, img_size=(48, 96), num_classes=0).eval()
    sd = m.state_dict()
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], (3, 6), num_extra_tokens=0, old_grid=(4, 4))
    other.load_state_dict(sd)
    x = torch.randn(1, 3, 48, 96)
    with torch.no_grad():
        s1, s2, s3 = m.forward_intermediates(x)
        ref = other.forward_features(x)
    assert s1.shape == (1, 32, 12, 24) and s2.shape == (1, 48, 6, 12) and s3.shape == (1, 64, 3, 6)
    torch.testing.assert_close(s3.flatten(2).transpose(1, 2), ref)
    with pytest.raises(ValueError, match="multiples of the total stride 16"):
        m.forward_intermediates(torch.randn(1, 3, 40, 64))


# ---------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("name", [VIT, CONVVIT])
@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
def test_upernet_shapes_aux_in_training_only_and_every_parameter_trains(name, hw):
    torch.manual_seed(0)
    model = build_segmentor(name, 3, 64, **SMALL)
    calls = []
    model.auxiliary_head.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 3, *hw)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3, *hw)
    assert not calls  # inference runs the decode head only
    model.train()
    logits, aux = model.forward_train(x)
    assert logits.shape == aux.shape == (2, 3, *hw) and calls == [1]
    torch.manual_seed(1)
    again = model(x, with_aux=True)  # the same pair through forward() (what a DDP-wrapped model calls)
    torch.manual_seed(1)
    ref = model.forward_train(x)
    assert all(torch.equal(a, b) for a, b in zip(again, ref)) and len(calls) == 3
    target = torch.randint(0, 3, (2, *hw))
    target[0, :4] = 255  # ignored pixels
    loss, scalars = upernet_loss(logits, aux, target, aux_weight=model.aux_weight)
    torch.testing.assert_close(loss, scalars["loss_decode"] + 0.4 * scalars["loss_aux"])
    loss.backward()
    # no parameter without a gradient: pooling norms and heads of the encoder are removed (DDP-safe)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


def test_upernet_key_layout_reads_like_mmseg():
    model = build_segmentor(VIT, 2, 64, **SMALL)
    model.set_grad_checkpointing()
    assert model.backbone.grad_checkpointing
    vit = model.state_dict()
    conv = build_segmentor(CONVVIT, 2, 64, last_level="conv", **SMALL).state_dict()
    for sd in (vit, conv):
        assert {k.split(".")[0] for k in sd} == {"backbone", "neck", "decode_head", "auxiliary_head"}
        for key in ("decode_head.psp_modules.3.1.conv.weight", "decode_head.psp_modules.0.1.bn.running_var",
                    "decode_head.bottleneck.conv.weight", "decode_head.lateral_convs.2.conv.weight",
                    "decode_head.fpn_convs.0.bn.weight", "decode_head.fpn_bottleneck.conv.weight",
                    "decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight",
                    "auxiliary_head.conv_seg.bias"):
            assert key in sd, key
        assert not [k for k in sd if k.startswith(("backbone.head", "backbone.fc_norm", "backbone.norm."))]
    assert vit["neck.fpn1.0.weight"].shape == (64, 64, 2, 2) and "neck.fpn1.1.running_mean" in vit
    assert "neck.fpn1.3.weight" in vit and "neck.fpn2.weight" in vit
    assert conv["neck.fpn4.0.weight"].shape == (64, 64, 3, 3)  # ConvViT's strided-conv fourth level
    assert conv["decode_head.lateral_convs.0.conv.weight"].shape == (16, 32, 1, 1)  # stage-1 channels
    assert vit["decode_head.bottleneck.conv.weight"].shape == (16, 64 + 4 * 16, 3, 3)  # PPM concat


def test_segmentor_builds_after_a_notebook_reloads_the_model_modules():
    """Re-running a notebook's import cell (importlib.reload) makes new ViT / ConvViT classes; UPerNet
    recognises encoders by structure, so building a segmentor still works."""
    import importlib
    import models_vit
    importlib.reload(models_vit)
    importlib.reload(models_convmae)
    for name in ("vit_micro_patch8", "convvit_micro_patch16"):
        seg = build_segmentor(name, num_classes=2, img_size=32, channels=16, aux_channels=8)
        assert seg.kind == ("vit" if name.startswith("vit") else "convvit")
        assert seg.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_bad_backbones_and_inputs_are_one_line_errors():
    with pytest.raises(UserError, match="--model mae_vit_micro_patch8: UPerNet needs a ViT or ConvViT encoder"):
        build_segmentor("mae_vit_micro_patch8", 2, 64)
    with pytest.raises(UserError, match="not_a_model"):
        build_segmentor("not_a_model", 2, 64)
    with pytest.raises(UserError, match="indices apply to ViT"):
        build_segmentor(CONVVIT, 2, 64, indices=(0, 1, 2, 3))
    with pytest.raises(UserError, match="--input_size"):
        build_segmentor(VIT, 2, 60)
    model = build_segmentor(VIT, 2, 64, **SMALL)
    with pytest.raises(ValueError, match="multiples of 8 and at least 16"):
        model(torch.randn(1, 3, 64, 60))
    assert vit_seg_indices(12) == (3, 5, 7, 11) and vit_seg_indices(24) == (7, 11, 15, 23)
    assert vit_seg_indices(2) == (0, 0, 1, 1)


# -------------------------------------------------------------------------------- optimizer groups
def _group_of(groups: list[dict]) -> dict[str, dict]:
    return {n: g for g in groups for n in g["param_names"]}


@pytest.mark.parametrize("kind", ["vit", "convvit"])
def test_layer_decay_groups_follow_depth_and_heads_get_full_lr(kind):
    if kind == "vit":
        backbone = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, pool="mae_avg")
        blocks, embed = "backbone.blocks.", "backbone.patch_embed.proj.weight"
    else:
        backbone = create_model(CONVVIT, img_size=32, num_classes=0)
        blocks, embed = "backbone.blocks3.", "backbone.blocks1.0.conv1.weight"
    model = UPerNet(backbone, 2, channels=16, aux_channels=8)
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5)
    by_name = _group_of(groups)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(by_name) == sorted(names)  # every trainable tensor in exactly one group
    depth = len(backbone.blocks if kind == "vit" else backbone.blocks3)
    assert model.num_decay_layers == depth + 1
    scales = [by_name[f"{blocks}{k}.attn.qkv.weight"]["lr_scale"] for k in range(depth)]
    assert scales == sorted(scales) and len(set(scales)) == depth  # deeper block, larger lr
    assert by_name[embed]["lr_scale"] == pytest.approx(0.5 ** (depth + 1))
    assert by_name["backbone.pos_embed"]["lr_scale"] == pytest.approx(0.5 ** (depth + 1))
    for n in names:
        if not n.startswith("backbone."):
            assert by_name[n]["lr_scale"] == 1.0, n
    assert by_name["backbone.pos_embed"]["weight_decay"] == 0.0
    assert by_name["decode_head.conv_seg.weight"]["weight_decay"] == 0.05
    assert by_name["decode_head.fpn_bottleneck.bn.weight"]["weight_decay"] == 0.0
    assert by_name[f"{blocks}0.attn.qkv.bias"]["weight_decay"] == 0.0
    # mmseg's quirk, by name only: the position table (and a cls token) receive weight decay
    quirk = _group_of(param_groups_lrd(model, 0.05, 0.5, no_weight_decay=model.no_weight_decay(MMSEG_WD_COMPAT)))
    assert quirk["backbone.pos_embed"]["weight_decay"] == 0.05
    assert quirk[f"{blocks}0.attn.qkv.bias"]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="unknown weight-decay compat"):
        model.no_weight_decay("mmseg")


# ---------------------------------------------------------------------- loading pretrained encoders
def test_load_mae_pretraining_checkpoint_into_vit_backbone(tmp_path):
    torch.manual_seed(0)
    mae = create_model("mae_vit_micro_patch8", img_size=32)
    save_training_checkpoint(str(tmp_path), 3, mae, None, None, args={"model": "mae_vit_micro_patch8"})
    seg = build_segmentor(VIT, 2, (64, 96), **SMALL)
    report = load_backbone(seg, str(tmp_path / "checkpoint-last.pth"))
    assert report["missing"] == [] and report["pos_embed_resized"] == "4x4 -> 8x12"
    assert {k.split(".")[0] for k in report["unexpected"]} == {
        "mask_token", "decoder_embed", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "norm"}
    sd = mae.state_dict()
    torch.testing.assert_close(seg.backbone.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(seg.backbone.pos_embed, resize_pos_embed(sd["pos_embed"], (8, 12), 1, (4, 4)))
    assert seg.backbone.pos_embed.requires_grad
    with torch.no_grad():
        assert seg.eval()(torch.randn(1, 3, 64, 96)).shape == (1, 2, 64, 96)


def test_load_convmae_pretraining_state_dict_into_convvit_backbone(tmp_path):
    torch.manual_seed(0)
    convmae = create_model("dconvmae_convvit_micro_patch16", img_size=32)
    torch.save(convmae.state_dict(), tmp_path / "dconvmae.pth")  # a bare state dict, as some releases are
    seg = build_segmentor(CONVVIT, 2, 64, **SMALL)
    report = load_backbone(seg, str(tmp_path / "dconvmae.pth"))
    assert report["missing"] == [] and report["pos_embed_resized"] == "2x2 -> 4x4"
    assert {k.split(".")[0] for k in report["unexpected"]} == {
        "mask_token", "decoder_pos_embed", "decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred",
        "stage1_output_decode", "stage2_output_decode", "norm"}
    torch.testing.assert_close(seg.backbone.blocks2[0].attn.weight, convmae.blocks2[0].attn.weight, rtol=0, atol=0)
    torch.testing.assert_close(seg.backbone.pos_embed, resize_pos_embed(convmae.pos_embed, (4, 4), 0, (2, 2)))
    # a ViT checkpoint does not fit a ConvViT backbone: one line naming the flag, nothing half-loaded silently
    torch.save({"model": create_model("mae_vit_micro_patch8", img_size=32).state_dict()}, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="--finetune"):
        load_backbone(seg, str(tmp_path / "vit.pth"))


def test_load_finetuned_classifier_drops_its_head(tmp_path):
    clf = create_model(CONVVIT, img_size=64, num_classes=5)
    torch.save({"model": clf.state_dict(), "epoch": 9}, tmp_path / "clf.pth")
    seg = build_segmentor(CONVVIT, 2, 64, **SMALL)
    report = load_backbone(seg, str(tmp_path / "clf.pth"))
    assert report["missing"] == [] and report["pos_embed_resized"] is None
    assert set(report["dropped_head"]) == {"head.weight", "head.bias"}
    torch.testing.assert_close(seg.backbone.pos_embed, clf.pos_embed, rtol=0, atol=0)


# ----------------------------------------------------------------------------- acceptance on held-out data
def _read_split(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(root, "VesselSegmentation", "*", split, "images", "*.png")))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float32) / 255.0
    masks = np.stack([np.asarray(Image.open(f.replace(os.sep + "images" + os.sep, os.sep + "labels" + os.sep)))
                      for f in files])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2) - 0.4) / 0.25
    return x, torch.from_numpy((masks > 0).astype(np.int64))  # lesion (exudate or haemorrhage) vs background


def test_tiny_upernet_beats_all_background_on_held_out_lesions(tmp_path):
    """100 AdamW steps of a ViT-micro UPerNet on 48 synthetic 64-px fundus images (lesions ~1 % of the
    pixels, hence mmseg's class_weight on the lesion class); the 48 test images are never seen."""
    write_vfm_task(str(tmp_path), "segmentation", num=48, img_size=64, seed=0)
    x_tr, y_tr = _read_split(str(tmp_path), "training")
    x_te, y_te = _read_split(str(tmp_path), "test")
    assert 0 < y_te.float().mean() < 0.05
    torch.manual_seed(0)
    model = build_segmentor(VIT, 2, 64, channels=32, aux_channels=16, drop_path_rate=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(100):
        idx = torch.randint(0, len(x_tr), (8,), generator=g)
        loss, _ = upernet_loss(*model.forward_train(x_tr[idx]), y_tr[idx], class_weight=(1.0, 10.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(x_te).argmax(1)
    fg_iou = ((pred == 1) & (y_te == 1)).sum().item() / ((pred == 1) | (y_te == 1)).sum().item()
    # all-background predicts no lesion pixel: foreground IoU 0
    assert fg_iou > 0.15, fg_iou
    assert (pred == y_te).float().mean() > 0.97  # and the background stays background
