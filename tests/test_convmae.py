"""ConvMAE / deblurring ConvMAE / ConvViT: reference sizes, key layout and order, initialisation, multi-scale
masking, layer-decay ids, and image sizes other than the reference's hard-coded 224.

Shape checks build the reference sizes on the meta device; behaviour checks use the micro configs
(`convmae_convvit_micro_patch16`, `convvit_micro_patch16`), which run in milliseconds on CPU; the
end-to-end checks go through the real entry points (`main_pretrain`, `main_finetune`, torchrun).
"""
from __future__ import annotations

import socket
import sys

import pytest
import torch
import torch.nn.functional as F

import main_finetune
import main_pretrain
import models_convmae  # noqa: F401  (registers the factories)
from conftest import child_env, describe, run_cmd, write_rank_dump_wrapper
from models_convmae import upsample_mask
from models_mae import patchify, unpatchify
from util.checkpoint import load_pretrained_encoder
from util.optim import param_groups_lrd, param_groups_weight_decay
from util.registry import create_model, is_registered
from util.synthetic import write_dataset

MICRO = "convmae_convvit_micro_patch16"
MICRO_CLF = "convvit_micro_patch16"


@pytest.fixture(autouse=True)
def one_thread():
    """Micro models gain nothing from intra-op threads, and on a busy 2-core box OpenMP threads that
    oversubscribe the cores make in-process runs 10-20x slower (measured: 4 s -> 90 s for the
    pretrain -> finetune test). Subprocesses get OMP_NUM_THREADS=1 from conftest.child_env."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def micro(name: str = MICRO, img_size: int = 64, **kw):
    torch.manual_seed(0)
    return create_model(name, img_size=img_size, **kw)


# ----------------------------------------------------------------------------- keys and shapes (meta)
def count_params(dims, depths, mlp, dec=(512, 8), tokens=196, in_chans=3, stride=16, head=None, fusion=True):
    """Parameter count of a ConvMAE / ConvViT written out from the reference layer shapes, independently of the
    model code; validated by the published ConvMAE-B numbers below, then used for L and H."""
    e0, e1, e2 = dims

    def cblock(d, r):
        h = int(d * r)
        return 2 * d + 2 * (d * d + d) + (25 * d + d) + 2 * d + (h * d + h) + (d * h + d)

    def vit_block(d, r):
        h = int(d * r)
        return 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (h * d + h) + (d * h + d)

    n = (e0 * in_chans * 16 + 3 * e0) + (e1 * e0 * 4 + 3 * e1) + (e2 * e1 * 4 + 3 * e2) + (e2 * e2 + e2)
    n += tokens * e2 + depths[0] * cblock(e0, mlp[0]) + depths[1] * cblock(e1, mlp[1])
    n += depths[2] * vit_block(e2, mlp[2]) + 2 * e2  # blocks3 + norm / fc_norm
    if fusion:
        n += (e2 * e0 * 16 + e2) + (e2 * e1 * 4 + e2)
    if dec is not None:
        d, depth = dec
        n += (d * e2 + d) + d + tokens * d + depth * vit_block(d, mlp[0]) + 2 * d + (stride ** 2 * in_chans * d
                                                                                      + stride ** 2 * in_chans)
    if head is not None:
        n += head * e2 + head
    return n


SIZES = {
    "base": ((256, 384, 768), (2, 2, 11), (4, 4, 4)),
    "large": ((384, 768, 1024), (2, 2, 23), (8, 8, 4)),
    "huge": ((768, 1024, 1280), (2, 2, 31), (8, 8, 4)),
}


def test_base_matches_published_counts():
    """Published ConvMAE-B sizes: 313 tensors / 115,041,408 params (pretraining), 207 / 85,374,824 (ConvViT-B,
    1000-class head); the encoder without fusion convs is about 84.6 M."""
    with torch.device("meta"):
        pre = create_model("convmae_convvit_base_patch16").state_dict()
        clf = create_model("convvit_base_patch16", num_classes=1000).state_dict()
    assert (len(pre), sum(v.numel() for v in pre.values())) == (313, 115_041_408)
    assert (len(clf), sum(v.numel() for v in clf.values())) == (207, 85_374_824)
    encoder = sum(v.numel() for k, v in pre.items() if not k.startswith(("decoder_", "mask_token", "stage")))
    assert round(encoder / 1e6, 1) == 84.6
    assert count_params(*SIZES["base"]) == 115_041_408  # the formula reproduces the published numbers
    assert count_params(*SIZES["base"], dec=None, head=1000, fusion=False) == 85_374_824
    counts: dict[str, int] = {}
    for k in pre:
        counts[k.split(".")[0]] = counts.get(k.split(".")[0], 0) + 1
    assert counts == {"pos_embed": 1, "mask_token": 1, "decoder_pos_embed": 1, "patch_embed1": 4, "patch_embed2": 4,
                      "patch_embed3": 4, "patch_embed4": 2, "stage1_output_decode": 2, "stage2_output_decode": 2,
                      "blocks1": 28, "blocks2": 28, "blocks3": 132, "norm": 2, "decoder_embed": 2,
                      "decoder_blocks": 96, "decoder_norm": 2, "decoder_pred": 2}
    expected = {
        "pos_embed": (1, 196, 768), "mask_token": (1, 1, 512), "decoder_pos_embed": (1, 196, 512),
        "patch_embed1.proj.weight": (256, 3, 4, 4), "patch_embed1.norm.weight": (256,),
        "patch_embed2.proj.weight": (384, 256, 2, 2), "patch_embed3.proj.weight": (768, 384, 2, 2),
        "patch_embed4.weight": (768, 768), "stage1_output_decode.weight": (768, 256, 4, 4),
        "stage2_output_decode.weight": (768, 384, 2, 2), "blocks1.1.conv1.weight": (256, 256, 1, 1),
        "blocks1.0.attn.weight": (256, 1, 5, 5), "blocks1.0.conv2.weight": (256, 256, 1, 1),
        "blocks1.0.mlp.fc1.weight": (1024, 256, 1, 1), "blocks1.0.mlp.fc2.weight": (256, 1024, 1, 1),
        "blocks2.1.mlp.fc1.weight": (1536, 384, 1, 1), "blocks3.10.attn.qkv.weight": (2304, 768),
        "blocks3.0.mlp.fc1.weight": (3072, 768), "norm.weight": (768,), "decoder_embed.weight": (512, 768),
        "decoder_blocks.7.mlp.fc1.weight": (2048, 512), "decoder_pred.weight": (768, 512),
    }
    assert {k: tuple(pre[k].shape) for k in expected} == expected
    # reference registration order (a reference optimizer state is keyed by parameter position)
    assert list(pre)[:7] == ["pos_embed", "mask_token", "decoder_pos_embed", "patch_embed1.proj.weight",
                             "patch_embed1.proj.bias", "patch_embed1.norm.weight", "patch_embed1.norm.bias"]
    first = list(pre).index("blocks1.0.norm1.weight")
    assert list(pre)[first - 6:first] == ["patch_embed4.weight", "patch_embed4.bias", "stage1_output_decode.weight",
                                          "stage1_output_decode.bias", "stage2_output_decode.weight",
                                          "stage2_output_decode.bias"]
    assert list(pre)[first:first + 5] == ["blocks1.0.norm1.weight", "blocks1.0.norm1.bias", "blocks1.0.conv1.weight",
                                "blocks1.0.conv1.bias", "blocks1.0.conv2.weight"]
    # classifier: encoder keys without fusion / decoder, plus head then fc_norm (global pool)
    assert set(clf) == {k for k in pre if not k.startswith(("stage", "decoder_", "mask_token", "norm."))} | {
        "head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert list(clf)[-4:] == ["head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"]


@pytest.mark.parametrize("size", ["large", "huge"])
def test_large_huge_keys_and_shapes(size):
    dims, depths, mlp = SIZES[size]
    with torch.device("meta"):
        pre = create_model(f"convmae_convvit_{size}_patch16").state_dict()
        dpre = create_model(f"dconvmae_convvit_{size}_patch16_dec512d8b").state_dict()
        clf = create_model(f"convvit_{size}_patch16", num_classes=1000).state_dict()
    assert len(pre) == 313 + 12 * (depths[2] - 11) and len(clf) == 207 + 12 * (depths[2] - 11)
    assert sum(v.numel() for v in pre.values()) == count_params(dims, depths, mlp)
    assert sum(v.numel() for v in clf.values()) == count_params(dims, depths, mlp, dec=None, head=1000, fusion=False)
    assert {k: v.shape for k, v in pre.items()} == {k: v.shape for k, v in dpre.items()}
    e0, e1, e2 = dims
    assert pre["pos_embed"].shape == (1, 196, e2) and pre["decoder_pred.weight"].shape == (768, 512)
    assert pre["stage1_output_decode.weight"].shape == (e2, e0, 4, 4)
    assert pre["blocks1.0.mlp.fc1.weight"].shape == (8 * e0, e0, 1, 1)
    assert pre["blocks3.0.mlp.fc1.weight"].shape == (4 * e2, e2)
    assert pre["decoder_blocks.0.mlp.fc1.weight"].shape == (8 * 512, 512)  # decoder MLP ratio = stage 1's


def test_deblur_variants_identical_keys_and_aliases():
    with torch.device("meta"):
        a = create_model("convmae_convvit_base_patch16_dec512d8b")
        b = create_model("dconvmae_convvit_base_patch16")
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert (a.deblur, a.loss_scope, b.deblur, b.loss_scope) == (False, "masked", True, "all")
    assert (a.patch_size, a.num_patches, a.in_chans) == (16, 196, 3)
    for name in ("convvit_base_patch16", "convvit_large_patch16", "convvit_huge_patch16",
                 "dconvmae_convvit_large_patch16_dec512d8b", "dconvmae_convvit_huge_patch16"):
        assert is_registered(name), name


def test_stage_grids_derived_and_size_error():
    with torch.device("meta"):
        m224 = create_model("convmae_convvit_base_patch16")
        m384 = create_model("convmae_convvit_base_patch16", img_size=384)
    assert m224.stage_grids == ((56, 56), (28, 28), (14, 14)) and m224.mask_factors == (4, 2)
    assert m384.stage_grids == ((96, 96), (48, 48), (24, 24)) and m384.pos_embed.shape == (1, 576, 768)
    with pytest.raises(ValueError, match="not divisible by the total stride 16"):
        create_model(MICRO, img_size=72)
    with pytest.raises(ValueError, match="not divisible by the total stride 16"):
        create_model(MICRO_CLF, img_size=40, num_classes=2)
    with pytest.raises(ValueError, match="check --input_size"):
        micro()(torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------ masking
def reference_stage_masks(mask: torch.Tensor):
    """Alpha-VL/ConvMAE models_convmae.py `forward_encoder`, verbatim (224 only)."""
    n = mask.shape[0]
    m1 = mask.reshape(-1, 14, 14).unsqueeze(-1).repeat(1, 1, 1, 16).reshape(-1, 14, 14, 4, 4).permute(
        0, 1, 3, 2, 4).reshape(n, 56, 56).unsqueeze(1)
    m2 = mask.reshape(-1, 14, 14).unsqueeze(-1).repeat(1, 1, 1, 4).reshape(-1, 14, 14, 2, 2).permute(
        0, 1, 3, 2, 4).reshape(n, 28, 28).unsqueeze(1)
    return m1, m2


def test_multiscale_mask_equals_reference_at_224():
    mask = (torch.rand(3, 196) > 0.5).float()
    ref1, ref2 = reference_stage_masks(mask)
    assert torch.equal(upsample_mask(mask, (14, 14), 4), ref1)
    assert torch.equal(upsample_mask(mask, (14, 14), 2), ref2)
    with torch.device("meta"):
        model = create_model("convmae_convvit_base_patch16")
    vis1, vis2 = model.stage_visibility(mask)  # the model's own derivation at 224
    assert torch.equal(vis1, 1 - ref1) and torch.equal(vis2, 1 - ref2)


def test_seeded_masking_equals_argsort_of_rand():
    model = micro().eval()
    imgs = torch.randn(3, 3, 64, 64)
    torch.manual_seed(7)
    loss_a, pred_a, mask_a = model(imgs, mask_ratio=0.75)
    torch.manual_seed(7)
    noise = torch.rand(3, 16)  # L = 16 stage-3 tokens at 64 px
    ids_shuffle = torch.argsort(noise, dim=1)
    expected = torch.ones(3, 16)
    expected[:, :4] = 0
    expected = torch.gather(expected, 1, torch.argsort(ids_shuffle, dim=1))
    assert torch.equal(mask_a, expected)
    loss_b, pred_b, mask_b = model(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(mask_b, mask_a) and torch.equal(pred_b, pred_a) and torch.equal(loss_b, loss_a)
    ids_keep, _, _ = model.multiscale_masking(3, imgs.device, 0.75, noise)
    assert torch.equal(ids_keep, ids_shuffle[:, :4])


def reference_forward(model, imgs, noise, mask_ratio=0.75):
    """Alpha-VL/ConvMAE's forward (models_convmae.py + vision_transformer.py) restated on the model's
    weights: hard-coded 224 mask construction, CBlock/PatchEmbed as written there, MAE loss."""
    def embed(pe, x):
        return F.gelu(pe.norm(pe.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    def cblock(b, x, m):
        x = x + b.conv2(b.attn(m * b.conv1(b.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))))
        return x + b.mlp.fc2(F.gelu(b.mlp.fc1(b.norm2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))))

    n, length = noise.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    m1, m2 = reference_stage_masks(mask)
    x = embed(model.patch_embed1, imgs)
    for b in model.blocks1:
        x = cblock(b, x, 1 - m1)
    s1 = model.stage1_output_decode(x).flatten(2).permute(0, 2, 1)
    x = embed(model.patch_embed2, x)
    for b in model.blocks2:
        x = cblock(b, x, 1 - m2)
    s2 = model.stage2_output_decode(x).flatten(2).permute(0, 2, 1)
    x = model.patch_embed4(embed(model.patch_embed3, x).flatten(2).permute(0, 2, 1)) + model.pos_embed
    gather = lambda t: torch.gather(t, 1, ids_keep.unsqueeze(-1).repeat(1, 1, t.shape[-1]))  # noqa: E731
    x, s1, s2 = gather(x), gather(s1), gather(s2)
    for b in model.blocks3:
        x = b(x)
    x = model.decoder_embed(model.norm(x + s1 + s2))
    x = torch.cat([x, model.mask_token.repeat(n, length - keep, 1)], dim=1)
    x = torch.gather(x, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2])) + model.decoder_pos_embed
    for b in model.decoder_blocks:
        x = b(x)
    pred = model.decoder_pred(model.decoder_norm(x))
    loss = ((pred - patchify(imgs, 16)) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


def test_forward_parity_with_reference_algorithm_at_224():
    model = micro(img_size=224).eval()
    imgs = torch.randn(2, 3, 224, 224)
    noise = torch.rand(2, 196)
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    ref_loss, ref_pred, ref_mask = reference_forward(model, imgs, noise)
    assert torch.equal(mask, ref_mask) and int(mask.sum()) == 2 * (196 - 49)
    torch.testing.assert_close(pred, ref_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)


def test_initialisation_follows_reference():
    """Reference initialisation: fixed sin-cos tables without a cls row, LN 1/0, Linear biases 0."""
    from util.pos_embed import get_2d_sincos_pos_embed
    model = micro()
    table = get_2d_sincos_pos_embed(64, 4, cls_token=False).astype("float32")
    assert torch.equal(model.pos_embed[0], torch.from_numpy(table))
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.all(model.patch_embed1.norm.weight == 1) and torch.all(model.patch_embed4.bias == 0)
    assert model.patch_embed1.norm.eps == 1e-5 and model.blocks1[0].norm1.eps == 1e-5
    assert model.blocks3[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6 and model.decoder_norm.eps == 1e-6
    clf = micro(MICRO_CLF, num_classes=2)
    assert clf.pos_embed.requires_grad and clf.fc_norm.eps == 1e-6


# ------------------------------------------------------------------------------------------ leak test
def test_masked_content_cannot_leak_into_visible_tokens():
    """Perturb pixels inside masked patches only: everything computed at visible stage-3 tokens (stage
    tokens, the stage-1/2 fusion features gathered at visible ids, the encoder output) and hence the
    whole prediction must stay the same. Controls: the perturbation does reach the masked positions, and
    without the CBlock mask the 5x5 depthwise convs do carry it into visible tokens."""
    model = micro(img_size=64).eval()
    n = 2
    imgs = torch.randn(n, 3, 64, 64)
    noise = torch.rand(n, 16)
    with torch.no_grad():
        ids_keep, mask, _ = model.multiscale_masking(n, imgs.device, 0.5, noise)
        pixel_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 16 * 16 * 3), 16, (4, 4))
        perturbed = imgs + 10 * torch.randn_like(imgs) * pixel_mask
        assert torch.equal(perturbed * (1 - pixel_mask), imgs * (1 - pixel_mask))  # visible pixels untouched

        def at_visible(t):
            return torch.gather(t, 1, ids_keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

        def at_masked(t):
            return t[mask.bool()]

        clean, dirty = model.forward_stages(imgs, mask), model.forward_stages(perturbed, mask)
        for a, b in zip(clean, dirty):  # stage-3 tokens, stage-1 fusion, stage-2 fusion
            torch.testing.assert_close(at_visible(b), at_visible(a), atol=1e-6, rtol=0)
            assert (at_masked(b) - at_masked(a)).abs().max() > 1e-2  # the perturbation is there
        latent_a, mask_a, _ = model.forward_encoder(imgs, 0.5, noise)
        latent_b, mask_b, _ = model.forward_encoder(perturbed, 0.5, noise)
        assert torch.equal(mask_a, mask) and torch.equal(mask_b, mask)
        torch.testing.assert_close(latent_b, latent_a, atol=1e-6, rtol=0)
        _, pred_a, _ = model(imgs, mask_ratio=0.5, noise=noise)
        _, pred_b, _ = model(perturbed, mask_ratio=0.5, noise=noise)
        torch.testing.assert_close(pred_b, pred_a, atol=1e-6, rtol=0)
        # control: the same perturbation leaks into visible tokens when the conv stages are not masked
        unmasked_a, unmasked_b = model.forward_stages(imgs), model.forward_stages(perturbed)
        for a, b in zip(unmasked_a, unmasked_b):
            assert (at_visible(b) - at_visible(a)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ training
def test_loss_decreases_on_fixed_batch_and_grad_checkpointing():
    model = micro(img_size=32)
    imgs = torch.randn(8, 3, 32, 32)
    noise = torch.rand(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss, _, _ = model(imgs, mask_ratio=0.75, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    # activation checkpointing recomputes the same values
    model.zero_grad()
    model(imgs, noise=noise)[0].backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(imgs, noise=noise)[0].backward()
    for k, p in model.named_parameters():
        if k in grads:
            torch.testing.assert_close(p.grad, grads[k], atol=1e-6, rtol=1e-5)
    # weight-decay split (MAE pretraining rule): frozen sin-cos tables excluded, mask_token decayed
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    assert any(p is model.mask_token for p in decay["params"])
    assert not any(p is model.pos_embed for g in (no_decay, decay) for p in g["params"])


def test_deblur_loss_over_all_patches():
    conv, dconv = micro(), micro("dconvmae_convvit_micro_patch16")
    dconv.load_state_dict(conv.state_dict())
    blurred, sharp = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 16)
    loss, pred, mask = dconv(blurred, target=sharp, noise=noise)
    torch.testing.assert_close(loss, ((pred - patchify(sharp, 16)) ** 2).mean())
    # a visible-patch change of the target moves the deblurring loss only
    visible = (1 - mask).unsqueeze(-1).expand(-1, -1, 16 * 16 * 3)
    sharp2 = unpatchify(patchify(sharp, 16) + 5 * visible, 16, (4, 4))
    assert not torch.allclose(dconv(blurred, target=sharp2, noise=noise)[0], loss)
    assert torch.equal(conv(blurred, target=sharp2, noise=noise)[0], conv(blurred, target=sharp, noise=noise)[0])
    # DeblurringMAE's positional call form, and the sharp image is required
    torch.testing.assert_close(dconv(blurred, sharp, noise=noise)[0], loss)
    with pytest.raises(ValueError, match="sharp image"):
        dconv(blurred, noise=noise)


# ------------------------------------------------------------------------------------------ finetune model
def test_convvit_layer_decay_groups():
    """Reference layer decay: num_layers = len(blocks3)+1 = 12; pos_embed, patch_embed1..4, blocks1, blocks2 -> 0;
    blocks3.k -> k+1; norm/fc_norm/head -> 12; groups in first-seen order."""
    with torch.device("meta"):
        model = create_model("convvit_base_patch16", num_classes=5)

    def reference_layer_id(name):  # Alpha-VL/ConvMAE util/lr_decay.py get_layer_id_for_vit
        if name in ("cls_token", "pos_embed") or name.startswith(("patch_embed", "blocks1", "blocks2")):
            return 0
        return int(name.split(".")[1]) + 1 if name.startswith("blocks3") else 12

    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.65)
    assert len(groups) == 26
    assert [g["name"] for g in groups[:2]] == ["layer_0_no_decay", "layer_0_decay"]
    for g in groups:
        layer = int(g["name"].split("_")[1])
        assert g["lr_scale"] == pytest.approx(0.65 ** (12 - layer))
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.05)
        for name in g["param_names"]:
            assert reference_layer_id(name) == layer, name
    by_name = {n: g["name"] for g in groups for n in g["param_names"]}
    assert by_name["pos_embed"] == "layer_0_no_decay" and by_name["blocks2.1.attn.weight"] == "layer_0_decay"
    assert by_name["patch_embed4.weight"] == "layer_0_decay"
    assert by_name["blocks3.10.attn.qkv.weight"] == "layer_11_decay"
    assert by_name["head.weight"] == "layer_12_decay" and by_name["fc_norm.weight"] == "layer_12_no_decay"
    assert groups[0]["lr_scale"] == pytest.approx(0.65 ** 12)  # ViT-B: .65**13; ConvViT-B has one layer less


@pytest.mark.parametrize("pool", ["mae_avg", "cls"])
def test_convvit_pooling_logits_and_warning(pool, medfound_log):
    model = micro(MICRO_CLF, img_size=32, num_classes=3, pool=pool, drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens, _, _ = model.forward_stages(x)
    for b in model.blocks3:
        tokens = b(tokens)
    feat = model.fc_norm(tokens.mean(1)) if pool == "mae_avg" else model.norm(tokens)[:, 0]
    torch.testing.assert_close(model(x), model.head(feat), atol=1e-5, rtol=1e-5)
    keys = model.state_dict().keys()
    assert ("fc_norm.weight" in keys) == (pool == "mae_avg") and ("norm.weight" in keys) == (pool == "cls")
    assert ("first *patch* token" in medfound_log.text) == (pool == "cls")
    with pytest.raises(ValueError, match="not available for ConvViT"):
        create_model(MICRO_CLF, img_size=32, num_classes=3, pool="retfound_v2_avg")


def test_encoder_loads_into_convvit_with_pos_embed_resize(tmp_path):
    """A ConvMAE checkpoint (no cls token) at 32 px into a ConvViT at 64 px: decoder and fusion convs are
    expected-unexpected, pos_embed is resized 2x2 -> 4x4 with no extra token and stays learnable."""
    mae = micro(img_size=32)
    path = tmp_path / "convmae.pth"
    torch.save({"model": mae.state_dict(), "epoch": 0}, path)
    clf = create_model(MICRO_CLF, img_size=64, num_classes=2)
    report = load_pretrained_encoder(clf, str(path))
    assert set(report["missing"]) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert report["pos_embed_resized"] == "2x2 -> 4x4" and clf.pos_embed.shape == (1, 16, 64)
    assert clf.pos_embed.requires_grad
    assert {k.split(".")[0] for k in report["unexpected"]} == {"mask_token", "decoder_pos_embed", "decoder_embed",
                                                               "decoder_blocks", "decoder_norm", "decoder_pred",
                                                               "stage1_output_decode", "stage2_output_decode", "norm"}
    assert torch.equal(clf.blocks1[0].attn.weight, mae.blocks1[0].attn.weight)
    assert torch.equal(clf.patch_embed4.weight, mae.patch_embed4.weight)



def test_vit_checkpoint_into_convvit_is_one_line_error(tmp_path):
    """A ViT file's position table (cls row + 4x4 grid = 17 tokens) cannot be resized onto a ConvViT (no cls
    token): a CheckpointError naming the file and the likely cause, not a ValueError traceback."""
    from util.checkpoint import CheckpointError
    clf = create_model(MICRO_CLF, img_size=64, num_classes=2)
    sd = {k: v.clone() for k, v in clf.state_dict().items()}
    sd["pos_embed"] = torch.zeros(1, 17, clf.pos_embed.shape[-1])
    path = tmp_path / "vit.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"vit\.pth.*position table \(17 tokens\).*another --model") as e:
        load_pretrained_encoder(clf, str(path))
    assert "\n" not in str(e.value)

# ------------------------------------------------------------------------------ entry points, end to end
@pytest.fixture(scope="module")
def us_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("us_convmae")
    write_dataset(root, kind="ultrasound", layout="imagefolder", num_classes=2, n_per_class=None,
                  splits={"train": 48, "test": 30}, size=32, seed=3)
    return root


def test_pretrain_then_finetune_through_entry_points(us_tree, tmp_path):
    pre_out = tmp_path / "pretrain"
    args = main_pretrain.get_args_parser().parse_args([
        "--model", "convmae_convvit_micro_patch16", "--input_size", "32", "--data_path", str(us_tree), "--epochs", "2",
        "--warmup_epochs", "1", "--batch_size", "16", "--blr", "1e-2", "--num_workers", "0", "--device", "cpu",
        "--output_dir", str(pre_out), "--print_freq", "100", "--vis_images", "2", "--norm_preset", "uwf"])
    stats = main_pretrain.main(args)
    assert stats["loss"] == stats["loss"] and stats["loss"] > 0  # finite
    ckpt = torch.load(pre_out / "checkpoint-last.pth", weights_only=True)
    assert "stage1_output_decode.weight" in ckpt["model"] and ckpt["preprocessing"]["input_size"] == 32
    assert (pre_out / "reconstructions.png").is_file()

    ft_out = tmp_path / "finetune"
    args = main_finetune.get_args_parser().parse_args([
        "--model", "convvit_micro_patch16", "--data_path", str(us_tree), "--output_dir", str(ft_out), "--epochs", "8",
        "--warmup_epochs", "1", "--batch_size", "16", "--blr", "5e-2", "--aa", "none", "--reprob", "0",
        "--smoothing", "0", "--num_workers", "0", "--device", "cpu", "--print_freq", "100", "--bootstrap", "0",
        "--seed", "0", "--val_fraction", "0", "--finetune", str(pre_out / "checkpoint-last.pth")])
    results = main_finetune.main(args)
    assert set(results["pretrained"]["missing"]) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert results["test"]["auroc"] > 0.6, results["test"]  # chance is 0.5
    best = torch.load(ft_out / "checkpoint-best.pth", weights_only=True)
    assert best["preprocessing"]["norm_preset"] == "uwf" and "blocks3.1.attn.qkv.weight" in best["model"]
    # --eval rebuilds the ConvViT from the checkpoint's preprocessing and reproduces the test metrics
    args = main_finetune.get_args_parser().parse_args([
        "--eval", "--resume", str(ft_out / "checkpoint-best.pth"), "--model", "convvit_micro_patch16", "--data_path",
        str(us_tree), "--output_dir", str(tmp_path / "eval"), "--num_workers", "0", "--device", "cpu",
        "--bootstrap", "0"])
    evaluated = main_finetune.main(args)["test"]
    for key in ("auroc", "accuracy", "confusion_matrix", "loss"):
        assert evaluated[key] == results["test"][key], key


def test_deblurring_convmae_pretrains_with_on_the_fly_blur(us_tree, tmp_path):
    args = main_pretrain.get_args_parser().parse_args([
        "--model", "dconvmae_convvit_micro_patch16", "--input_size", "32", "--data_path", str(us_tree),
        "--blur", "gaussian", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "16", "--num_train", "32",
        "--num_workers", "0", "--device", "cpu", "--output_dir", str(tmp_path), "--vis_images", "0"])
    stats = main_pretrain.main(args)
    assert stats["loss"] == stats["loss"]
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["preprocessing"]["deblur"] is True and ckpt["preprocessing"]["blur"]["method"] == "gaussian"




def test_torchrun_two_process_gloo(synthetic_fundus_tree, tmp_path):
    wrapper = write_rank_dump_wrapper(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(wrapper), "--model", MICRO, "--input_size", "32", "--data_path",
           str(synthetic_fundus_tree), "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--blr", "0.05",
           "--num_workers", "0", "--device", "cpu", "--vis_images", "0", "--print_freq", "1", "--output_dir", str(out)]
    proc = run_cmd(cmd, timeout=240, env=child_env(RANK_DUMP_DIR=str(tmp_path)))
    assert proc.returncode == 0, describe(proc)
    assert "effective batch 8" in proc.stdout, proc.stdout
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["world_size"] == 2
    assert rank0.keys() == rank1.keys() == ckpt["model"].keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP kept the ranks identical
    assert all(torch.equal(rank0[k], ckpt["model"][k]) for k in rank0)
    init = micro(img_size=32).state_dict()
    assert any(not torch.equal(rank0[k], init[k]) for k in ("blocks1.0.conv1.weight", "decoder_pred.weight"))
