"""CrossMAE family (cross-attention decoder MAE): keys, masking, loss scope, decoder independence, feature
mixing, checkpoint loading, and the pretraining entry point (in-process and 2-process gloo)."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import main_pretrain
import models_crossmae  # noqa: F401  (registers crossmae_*)
import models_mae  # noqa: F401
from conftest import REPO, TINY_INPUT, child_env, describe, fixed_batch_losses, free_port, run_cmd
from models_crossmae import CrossMaskedAutoencoderViT, partial_masking, partial_masks, resolve_use_fm
from models_mae import patchify, random_masking, unpatchify
from util.checkpoint import CheckpointError, load_pretrained_encoder, load_training_state
from util.cli import UserError
from util.registry import create_model

MICRO = "crossmae_vit_micro_patch8"  # 32 px: 16 patches of 8 px, D 64, depth 2, decoder 32 wide


def tiny(name: str = MICRO, **kw) -> CrossMaskedAutoencoderViT:
    torch.manual_seed(0)
    return create_model(name, img_size=TINY_INPUT, **kw)


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, TINY_INPUT, TINY_INPUT, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- key / shape fixtures
def spec_layout(p: int, d: int, depth: int, dd_dim: int, dd: int, length: int, k: int | None,
                self_attn: bool = False) -> dict[str, tuple[int, ...]]:
    """The published CrossMAE state-dict layout, written out by hand (independently of the model code).
    `k=None`: medfound's non-mixing mode (final `norm`, no `dec_norms`/`wfm`)."""
    s: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + length, d),
                                     "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,)}

    def mlp_norms(prefix: str, w: int) -> None:
        s.update({prefix + "norm1.weight": (w,), prefix + "norm1.bias": (w,), prefix + "norm2.weight": (w,),
                  prefix + "norm2.bias": (w,), prefix + "mlp.fc1.weight": (4 * w, w), prefix + "mlp.fc1.bias": (4 * w,),
                  prefix + "mlp.fc2.weight": (w, 4 * w), prefix + "mlp.fc2.bias": (w,)})

    for i in range(depth):
        b = f"blocks.{i}."
        mlp_norms(b, d)
        s.update({b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d),
                  b + "attn.proj.bias": (d,)})
    if k is None:
        s.update({"norm.weight": (d,), "norm.bias": (d,)})
    else:
        for i in range(dd):
            s.update({f"dec_norms.{i}.weight": (d,), f"dec_norms.{i}.bias": (d,)})
        s["wfm.linear.weight"] = (dd, k)
    s.update({"mask_token": (1, 1, dd_dim), "decoder_pos_embed": (1, 1 + length, dd_dim)})
    for i in range(dd):
        b = f"decoder_blocks.{i}."
        mlp_norms(b, dd_dim)
        s.update({b + "cross_attn.q.weight": (dd_dim, dd_dim), b + "cross_attn.q.bias": (dd_dim,),
                  b + "cross_attn.kv.weight": (2 * dd_dim, d), b + "cross_attn.kv.bias": (2 * dd_dim,),
                  b + "cross_attn.proj.weight": (dd_dim, dd_dim), b + "cross_attn.proj.bias": (dd_dim,)})
        if self_attn:
            s.update({b + "norm0.weight": (dd_dim,), b + "norm0.bias": (dd_dim,),
                      b + "self_attn.qkv.weight": (3 * dd_dim, dd_dim), b + "self_attn.qkv.bias": (3 * dd_dim,),
                      b + "self_attn.proj.weight": (dd_dim, dd_dim), b + "self_attn.proj.bias": (dd_dim,)})
    s.update({"decoder_norm.weight": (dd_dim,), "decoder_norm.bias": (dd_dim,),
              "decoder_pred.weight": (p * p * 3, dd_dim), "decoder_pred.bias": (p * p * 3,)})
    return s


# size: (factory, patch, D, depth, decoder D, grid side), as in the published CrossMAE model registry
SIZES = {"S": ("crossmae_vit_small_patch16", 16, 384, 12, 256, 14),
         "B": ("crossmae_vit_base_patch16", 16, 768, 12, 512, 14),
         "L": ("crossmae_vit_large_patch16", 16, 1024, 24, 512, 14),
         "H": ("crossmae_vit_huge_patch14", 14, 1280, 32, 512, 16)}
RELEASED = {"S": (347, 32_186_396), "B": (347, 127_286_428), "L": (491, 347_940_908), "H": (587, 678_493_912)}
DD8_NO_INPUT = {"S": (283, 28_762_080), "B": (283, 113_622_112), "L": (427, 333_225_920), "H": (523, 662_728_268)}
ENCODER_ELEMENTS = {"S": 21_664_896, "B": 85_797_120, "L": 303_299_584, "H": 630_762_240}


def meta_state(name: str, **kw) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return create_model(name, **kw).state_dict()


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dd,use_input,self_attn", [(12, True, False), (8, False, False), (8, True, True),
                                                    (12, False, True)])
def test_key_shape_fixtures(size, dd, use_input, self_attn):
    name, p, d, depth, dd_dim, side = SIZES[size]
    kw = {} if (dd, use_input, self_attn) == (12, True, False) else dict(decoder_depth=dd, use_input=use_input,
                                                                          self_attn=self_attn)
    sd = meta_state(name, **kw)  # the default = the released recipe
    spec = spec_layout(p, d, depth, dd_dim, dd, side * side, depth + int(use_input), self_attn)
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec
    counts = (len(sd), sum(v.numel() for v in sd.values()))
    if (dd, use_input, self_attn) == (12, True, False):
        assert counts == RELEASED[size]
    if (dd, use_input, self_attn) == (8, False, False):
        assert counts == DD8_NO_INPUT[size]
    encoder = sum(v.numel() for k, v in sd.items()
                  if k.startswith(("cls_token", "pos_embed", "patch_embed", "blocks.")))
    assert encoder == ENCODER_ELEMENTS[size]


def test_large_released_example_and_encoder_equals_mae_minus_norm():
    sd = meta_state("crossmae_vit_large_patch16")
    assert tuple(sd["wfm.linear.weight"].shape) == (12, 25)
    assert tuple(sd["decoder_blocks.0.cross_attn.kv.weight"].shape) == (1024, 1024)
    mae = meta_state("mae_vit_large_patch16")
    enc = {k: v.shape for k, v in sd.items() if not k.startswith(("mask_token", "decoder_", "dec_norms.", "wfm."))}
    assert enc == {k: v.shape for k, v in mae.items() if not k.startswith(("norm.", "decoder_", "mask_token"))}
    assert not any(k.startswith(("norm.", "decoder_embed", "fc_norm")) for k in sd)
    assert not any(".attn." in k for k in sd if k.startswith("decoder_blocks"))
    # plain-MAE ViT-S (CrossMAE's models_mae): 254 tensors / 28,330,880 elements
    small = meta_state("mae_vit_small_patch16")
    assert (len(small), sum(v.numel() for v in small.values())) == (254, 28_330_880)


def test_non_mixing_mode_has_norm_and_works():
    model = tiny(weight_fm=False)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec_layout(8, 64, 2, 32, 1, 16, None)
    loss, pred, mask = model(images())
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].attn.qkv.weight.grad is not None


# --------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("mask_ratio,kept,visible,predicted", [
    (0.75, 0.75, 49, 147), (0.75, 0.5, 49, 98), (0.75, 0.25, 49, 49), (0.85, 0.85, 29, 167), (0.9, 0.3, 19, 60)])
def test_partial_masking_counts_and_order(mask_ratio, kept, visible, predicted):
    noise = torch.rand(3, 196, generator=torch.Generator().manual_seed(1))
    ids_keep, ids_pred = partial_masking(noise, mask_ratio, kept)
    assert ids_keep.shape == (3, visible) and ids_pred.shape == (3, predicted)
    assert torch.equal(ids_pred, ids_pred.sort(dim=1).values)  # raster order
    # visible = MAE's visible set; predicted = the largest noise values
    _, mae_mask, _ = random_masking(torch.zeros(3, 196, 4), mask_ratio, noise)
    masks = partial_masks(noise, mask_ratio, kept)
    assert torch.equal(masks["hidden"], mae_mask)
    pred_noise = noise.gather(1, ids_pred)
    rest = noise.masked_fill(masks["predicted"].bool(), -1.0)
    assert (pred_noise.min(1).values > rest.max(1).values).all()
    assert ((masks["predicted"] == 1) <= (masks["hidden"] == 1)).all()


def test_seeded_masking_matches_mae_noise_convention():
    """No noise given: the model draws torch.rand(N, L) first, as MAE; same seed -> same masks as MAE."""
    model, mae = tiny().eval(), create_model("mae_vit_micro_patch8", img_size=TINY_INPUT).eval()
    imgs = images()
    torch.manual_seed(3)
    loss_a, pred_a, mask_a = model(imgs)
    torch.manual_seed(3)
    noise = torch.rand(2, 16)
    loss_b, pred_b, mask_b = model(imgs, noise=noise)
    assert torch.equal(mask_a, mask_b) and torch.equal(pred_a, pred_b) and torch.equal(loss_a, loss_b)
    torch.manual_seed(3)
    _, _, mae_mask = mae(imgs)
    assert torch.equal(mask_a, mae_mask)  # kept = mask: the returned mask is MAE's mask
    assert torch.equal(mask_a, random_masking(torch.zeros(2, 16, 1), 0.75, noise)[1])
    # partial: the returned mask is the predicted subset of MAE's mask, chosen by the same noise
    torch.manual_seed(3)
    _, _, mask_p = model(imgs, kept_mask_ratio=0.25)
    assert mask_p.sum(1).tolist() == [4, 4] and ((mask_p == 1) <= (mae_mask == 1)).all()
    with pytest.raises(ValueError, match="kept_mask_ratio"):
        model(imgs, kept_mask_ratio=0.8)


def test_use_fm_semantics():
    assert resolve_use_fm([-1], 12) == list(range(12)) and resolve_use_fm(["all"], 4) == [0, 1, 2, 3]
    assert resolve_use_fm(["-2", "0"], 12) == [0, 10]
    with pytest.raises(ValueError, match="twice"):
        resolve_use_fm([11, -1], 12)
    with pytest.raises(ValueError, match="outside"):
        resolve_use_fm([12], 12)
    model = tiny(use_fm=[-1], use_input=False)
    assert model.wfm.linear.weight.shape == (1, 2)


# ------------------------------------------------------------------------------------------------ loss
def test_only_predicted_patches_enter_the_loss_in_fp32():
    model = tiny()
    imgs, noise = images(), torch.rand(2, 16, generator=torch.Generator().manual_seed(4))
    loss, pred, mask = model(imgs, noise=noise, kept_mask_ratio=0.5)
    masks = partial_masks(noise, 0.75, 0.5)
    assert torch.equal(mask, masks["predicted"]) and mask.sum(1).tolist() == [8, 8]
    assert (masks["hidden"] - mask).sum() == 2 * 4  # 4 hidden-but-unpredicted patches per image
    assert (pred[mask == 0] == 0).all()  # full-length pred: zeros outside the predicted set
    # MAE's masked-mean formula on (full pred, predicted mask) gives the same loss
    t = patchify(imgs, 8)
    torch.testing.assert_close(loss, (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum())
    # perturbing the target at visible and hidden-but-unpredicted patches leaves the loss unchanged
    outside = (1 - mask)[:, :, None].expand(-1, -1, 192)
    target2 = unpatchify(t + 7 * outside, 8)
    assert torch.equal(model(imgs, noise=noise, target=target2, kept_mask_ratio=0.5)[0], loss)
    inside = torch.zeros_like(mask)
    inside[0, int(mask[0].nonzero()[0])] = 1
    target3 = unpatchify(t + 7 * inside[:, :, None].expand(-1, -1, 192), 8)
    assert model(imgs, noise=noise, target=target3, kept_mask_ratio=0.5)[0] > loss + 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16, pred_bf16, _ = model(imgs, noise=noise, kept_mask_ratio=0.5)
    assert loss_bf16.dtype == torch.float32 and pred_bf16.dtype == torch.bfloat16


def test_deblurring_input_uses_sharp_target():
    model = tiny("dcrossmae_vit_micro_patch8")
    assert model.deblur
    blurred, sharp, noise = images(seed=1), images(seed=2), torch.rand(2, 16)
    with pytest.raises(ValueError, match="sharp image"):
        model(blurred)
    loss, pred, mask = model(blurred, target=sharp, noise=noise)
    t = patchify(sharp, 8)
    torch.testing.assert_close(loss, (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum())
    torch.manual_seed(1)
    a = model(blurred, sharp)[0]  # DeblurringMAE's positional call form
    torch.manual_seed(1)
    assert torch.equal(a, model(blurred, target=sharp)[0])


# ----------------------------------------------------------------------------------------- decoder
def reference_forward(model, imgs, noise, mask_ratio, kept):
    """An independent re-statement of CrossMAE's forward (decoder, partial reconstruction, feature mixing, loss)
    on the model's weights: masked_select queries in raster order, stacked features with a Linear over the last
    axis, explicit softmax attention."""
    p, n = model.patch_size, imgs.shape[0]
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    length, d = x.shape[1:]
    keep, skip = int(length * (1 - mask_ratio)), int(length * (mask_ratio - kept))
    ids_shuffle = noise.argsort(1)
    mask = torch.ones(n, length)
    mask[:, :keep + skip] = 0
    mask = mask.gather(1, ids_shuffle.argsort(1))
    x = torch.cat([model.cls_token.expand(n, -1, -1), x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))], 1)
    feats = [x] if model.use_input else []
    for blk in model.blocks:
        x = blk(x)
        feats.append(x)
    mixed = torch.stack(feats, dim=-1) @ model.wfm.linear.weight.t()  # (N, T, D, dd): no softmax
    dd_dim = model.mask_token.shape[-1]
    q_in = model.decoder_pos_embed[:, 1:].expand(n, -1, -1).masked_select(mask.bool()[..., None])
    x = q_in.reshape(n, -1, dd_dim) + model.mask_token
    for i, blk in enumerate(model.decoder_blocks):
        y = model.dec_norms[i](mixed[..., i])
        ca, h = blk.cross_attn, blk.cross_attn.num_heads
        q = ca.q(blk.norm1(x)).reshape(n, -1, h, dd_dim // h).transpose(1, 2)
        kv = ca.kv(y)
        k = kv[..., :dd_dim].reshape(n, -1, h, dd_dim // h).transpose(1, 2)
        v = kv[..., dd_dim:].reshape(n, -1, h, dd_dim // h).transpose(1, 2)
        a = (q @ k.transpose(-2, -1) * (dd_dim // h) ** -0.5).softmax(-1)
        x = x + ca.proj((a @ v).transpose(1, 2).reshape(n, -1, dd_dim))
        x = x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
    pred = model.decoder_pred(model.decoder_norm(x))
    t = patchify(imgs, p).masked_select(mask.bool()[..., None]).reshape(n, -1, p * p * 3)
    return ((pred - t) ** 2).mean(), pred, mask


@pytest.mark.parametrize("kept", [0.75, 0.25])
def test_forward_parity_with_reference_algorithm(kept):
    model = tiny(decoder_depth=3).eval()
    with torch.no_grad():  # unconstrained mixing weights: arbitrary, negative, rows not summing to 1
        model.wfm.linear.weight.copy_(torch.tensor([[1.5, -0.7, 0.2], [-2.0, 0.1, 3.0], [0.0, 0.5, -0.5]]))
    imgs, noise = images(), torch.rand(2, 16)
    loss, pred, mask = model(imgs, noise=noise, kept_mask_ratio=kept)
    ref_loss, ref_pred, ref_mask = reference_forward(model, imgs, noise, 0.75, kept)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(pred[mask.bool()].view(2, -1, 192), ref_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)


def test_feature_mixing_unconstrained_one_layernorm_per_block():
    model = tiny(decoder_depth=3)
    assert isinstance(model.wfm.linear, nn.Linear) and model.wfm.linear.bias is None
    assert model.wfm.linear.weight.shape == (3, 3)  # input + 2 encoder blocks
    assert len(model.dec_norms) == 3 and all(isinstance(m, nn.LayerNorm) and m.normalized_shape == (64,)
                                             for m in model.dec_norms)
    assert model.norm is None
    feats = [torch.randn(2, 5, 64) for _ in range(3)]
    w = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, -3.0], [1.0, 1.0, 1.0]])
    with torch.no_grad():
        model.wfm.linear.weight.copy_(w)
    mixed = model.wfm(feats)
    torch.testing.assert_close(mixed, torch.einsum("ik,kntd->intd", w, torch.stack(feats)))
    with torch.no_grad():
        model.wfm.linear.weight.mul_(2)  # no softmax: doubling the weights doubles the mixture
    torch.testing.assert_close(model.wfm(feats), 2 * mixed)
    loss = model(images())[0]
    loss.backward()
    assert model.wfm.linear.weight.grad.abs().sum() > 0 and all(m.weight.grad is not None for m in model.dec_norms)


@pytest.mark.parametrize("self_attn", [False, True])
def test_perturbed_query_leaves_other_queries_unchanged_without_self_attn(self_attn):
    model = tiny(decoder_depth=2, self_attn=self_attn).eval()
    imgs, noise = images(), torch.rand(2, 16)
    _, ids_pred = partial_masking(noise, 0.75, 0.75)
    with torch.no_grad():
        feats = model.forward_encoder(imgs, 0.75, noise)
        queries = model.decoder_queries(ids_pred)
        out = model.forward_decoder(feats, queries)
        q2 = queries.clone()
        q2[:, 3] += torch.randn(32)
        out2 = model.forward_decoder(feats, q2)
    assert not torch.allclose(out2[:, 3], out[:, 3])
    others = torch.cat([out[:, :3], out[:, 4:]], 1), torch.cat([out2[:, :3], out2[:, 4:]], 1)
    if self_attn:
        assert not torch.allclose(*others, atol=1e-6)
    else:
        torch.testing.assert_close(*others, atol=1e-6, rtol=1e-6)


def test_reconstruct_all_decodes_every_masked_patch():
    model = tiny(kept_mask_ratio=0.25).eval()
    imgs, noise = images(), torch.rand(2, 16)
    _, pred_p, mask_p = model(imgs, noise=noise)  # the model's training setting: 4 of 12 masked patches
    assert mask_p.sum(1).tolist() == [4, 4]
    _, pred_all, mask_all = model.reconstruct_all(imgs, 0.75, noise=noise)
    assert torch.equal(mask_all, partial_masks(noise, 0.75)["hidden"]) and mask_all.sum(1).tolist() == [12, 12]
    assert (pred_all[mask_all.bool()].abs().sum(-1) > 0).all() and (pred_all[~mask_all.bool()] == 0).all()
    # independent queries: the training-time predictions are unchanged when every masked patch is decoded
    torch.testing.assert_close(pred_all[mask_p.bool()], pred_p[mask_p.bool()], atol=1e-6, rtol=1e-6)
    from engine_pretrain import reconstruct
    out = reconstruct(model, imgs, 0.75, noise=noise)
    assert torch.equal(out["mask"][:, 0], model.unpatchify(mask_all[..., None].expand(-1, -1, 192))[:, 0])


def test_loss_decreases_on_fixed_batch():
    first, last = fixed_batch_losses(tiny(kept_mask_ratio=0.5))
    assert last < 0.5 * first


def test_grad_checkpointing_same_loss_and_grads():
    a, b = tiny(decoder_depth=2), tiny(decoder_depth=2)
    b.set_grad_checkpointing(True)
    imgs, noise = images(), torch.rand(2, 16)
    la, lb = a(imgs, noise=noise)[0], b(imgs, noise=noise)[0]
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.wfm.linear.weight.grad, b.wfm.linear.weight.grad)


# ---------------------------------------------------------------------------------------- checkpoints
def test_published_layout_loads_strictly(tmp_path):
    """A state dict built from the published key layout alone (and a reference-style wrapper) loads strictly."""
    g = torch.Generator().manual_seed(0)
    for dd, use_input, self_attn in [(3, True, False), (2, False, True)]:
        spec = spec_layout(8, 64, 2, 32, dd, 16, 2 + int(use_input), self_attn)
        sd = {k: torch.randn(shape, generator=g) for k, shape in spec.items()}
        model = tiny(decoder_depth=dd, use_input=use_input, self_attn=self_attn)
        model.load_state_dict(sd, strict=True)
        assert torch.equal(model.decoder_blocks[1].cross_attn.kv.weight, sd["decoder_blocks.1.cross_attn.kv.weight"])
    path = tmp_path / "checkpoint-799.pth"
    model = tiny()
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 799, "scaler": {},
                "args": argparse.Namespace(model="mae_vit_micro_patch8", cross_mae=True, weight_fm=True),
                "best": np.float64(0.5)}, path)
    fresh = tiny()
    for p in fresh.parameters():
        p.data.zero_()
    ckpt = load_training_state(str(path), fresh, restore_rng=False)
    assert ckpt["epoch"] == 799 and ckpt["args"].cross_mae
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    mae = create_model("mae_vit_micro_patch8", img_size=TINY_INPUT)  # the other family: refused, not half-loaded
    with pytest.raises(CheckpointError, match="does not match"):
        load_training_state(str(path), mae, restore_rng=False)


def test_finetune_crossmae_encoder_expected_missing_depends_on_source(tmp_path, medfound_log):
    cross = tiny()
    path = tmp_path / "crossmae.pth"
    torch.save({"model": cross.state_dict(), "epoch": 799, "args": argparse.Namespace(model="crossmae")}, path)
    avg = create_model("vit_micro_patch8", img_size=TINY_INPUT, num_classes=3, pool="mae_avg")
    report = load_pretrained_encoder(avg, str(path))
    assert set(report["missing"]) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert any(k.startswith("wfm.") for k in report["unexpected"])
    assert "UNEXPECTED" not in medfound_log.text  # decoder keys are the expected leftovers
    assert torch.equal(avg.blocks[1].mlp.fc2.weight, cross.blocks[1].mlp.fc2.weight)
    cls = create_model("vit_micro_patch8", img_size=TINY_INPUT, num_classes=3, pool="cls")
    with torch.no_grad():
        cls.norm.weight.fill_(3.0)
    report = load_pretrained_encoder(cls, str(path))
    assert set(report["missing"]) == {"head.weight", "head.bias", "norm.weight", "norm.bias"}
    assert torch.equal(cls.norm.weight, torch.ones(64)) and "fresh LayerNorm" in medfound_log.text
    # the allowance depends on the source: an MAE checkpoint without norm.* still fails for a cls model
    mae_sd = {k: v for k, v in create_model("mae_vit_micro_patch8", img_size=TINY_INPUT).state_dict().items()
              if not k.startswith("norm.")}
    torch.save({"model": mae_sd}, tmp_path / "mae_no_norm.pth")
    with pytest.raises(CheckpointError, match="norm"):
        load_pretrained_encoder(create_model("vit_micro_patch8", img_size=TINY_INPUT, num_classes=3, pool="cls"),
                                str(tmp_path / "mae_no_norm.pth"))


def test_decoder_family_and_switches_from_checkpoint_keys():
    from models_crossmae import decoder_family, kwargs_from_state_dict
    cross = tiny(decoder_depth=3, self_attn=True).state_dict()
    assert decoder_family(cross) == "crossmae"
    assert decoder_family({f"module.{k}": v for k, v in cross.items()}) == "crossmae"
    assert decoder_family(create_model("mae_vit_micro_patch8", img_size=TINY_INPUT).state_dict()) == "mae"
    assert decoder_family({k: v for k, v in cross.items() if k.startswith(("blocks.", "patch_embed"))}) is None
    kw = kwargs_from_state_dict(cross)
    assert kw == {"decoder_depth": 3, "self_attn": True, "weight_fm": True, "use_input": True, "use_fm": [-1]}
    rebuilt = tiny(**kw)
    rebuilt.load_state_dict(cross, strict=True)
    assert kwargs_from_state_dict(tiny(use_input=False).state_dict())["use_input"] is False
    odd = tiny(use_fm=[1], use_input=False).state_dict()  # k = 1 of a 2-block encoder: ambiguous
    with pytest.raises(ValueError, match="explicitly"):
        kwargs_from_state_dict(odd)
    assert kwargs_from_state_dict(odd, {"use_input": False, "use_fm": ["1"]})["use_fm"] == ["1"]


def test_cross_mae_name_routing():
    from models_crossmae import model_name
    from util.registry import resolve
    on, off = argparse.Namespace(cross_mae=True), argparse.Namespace(cross_mae=False)
    assert model_name(on, "mae_vit_base_patch16_dec512d8b") == "crossmae_vit_base_patch16"
    assert model_name(on, "dmae_vit_base_patch16") == "dcrossmae_vit_base_patch16"
    assert model_name(on, "mae_vit_small_patch16") == "crossmae_vit_small_patch16"
    assert model_name(on, resolve("mae_vit_large_patch16_cross_attention")) == "crossmae_vit_large_patch16"
    assert model_name(off, "mae_vit_base_patch16") == "mae_vit_base_patch16"
    assert model_name(on, MICRO) == MICRO


# ------------------------------------------------------------------------------------- entry point
def pretrain_argv(data, out, *extra) -> list[str]:
    return ["--input_size", str(TINY_INPUT), "--data_path", str(data), "--output_dir", str(out), "--epochs", "1",
            "--warmup_epochs", "1", "--batch_size", "4", "--blr", "0.05", "--num_workers", "0", "--device", "cpu",
            "--print_freq", "100", "--seed", "0", *map(str, extra)]


def run_in_process(argv: list[str]):
    from util.cli import parse_args
    return main_pretrain.main(parse_args(main_pretrain.get_args_parser(), argv))


def test_pretrain_crossmae_and_cross_mae_flag_are_equivalent(synthetic_fundus_tree, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--kept_mask_ratio", "0.5", "--vis_images", "2")
    run_in_process(["--model", MICRO, *pretrain_argv(synthetic_fundus_tree, a, *common)])
    run_in_process(["--model", "mae_vit_micro_patch8", "--cross_mae",
                    *pretrain_argv(synthetic_fundus_tree, b, *common)])
    ca, cb = (torch.load(d / "checkpoint-last.pth", map_location="cpu", weights_only=True) for d in (a, b))
    assert ca["args"]["model"] == cb["args"]["model"] == MICRO
    assert cb["args"]["cross_mae"] and cb["args"]["kept_mask_ratio"] == 0.5 and cb["args"]["weight_fm"]
    assert ca["model"].keys() == cb["model"].keys() and "wfm.linear.weight" in ca["model"]
    for k in ca["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k], atol=1e-6, rtol=0)
    # LR coupling (kept given explicitly): lr = blr * 4 / 256 * kept / mask
    assert ca["args"]["lr"] == pytest.approx(0.05 * 4 / 256 * 0.5 / 0.75)
    assert (a / "reconstructions.png").is_file()
    loss = json.loads((a / "log.txt").read_text().splitlines()[-1])["train_loss"]
    assert np.isfinite(loss)


def test_pretrain_flag_errors(synthetic_fundus_tree, tmp_path):
    with pytest.raises(UserError, match="--decoder_depth applies to CrossMAE"):
        run_in_process(["--model", "mae_vit_micro_patch8", "--decoder_depth", "4", "--dry_run",
                        *pretrain_argv(synthetic_fundus_tree, tmp_path / "x")])
    with pytest.raises(UserError, match="kept_mask_ratio"):
        run_in_process(["--model", MICRO, "--kept_mask_ratio", "0.9", "--dry_run",
                        *pretrain_argv(synthetic_fundus_tree, tmp_path / "y")])
    with pytest.raises(UserError, match="--cross_mae needs an MAE model name"):
        run_in_process(["--model", "vit_micro_patch8", "--cross_mae", "--dry_run",
                        *pretrain_argv(synthetic_fundus_tree, tmp_path / "z")])
    # CrossMAE's README flags parse verbatim; the reference's model name resolves with --cross_mae
    out = run_in_process(["--model", "mae_vit_micro_patch8", "--cross_mae", "--weight_fm", "--use_input",
                          "--use_fm", "-1", "--decoder_depth", "2", "--enable_flash_attention2",
                          "--multi_epochs_dataloader", "--find_unused_parameters", "--dry_run",
                          *pretrain_argv(synthetic_fundus_tree, tmp_path / "w")])
    assert out["model"] == MICRO




def test_torchrun_two_processes_gloo(synthetic_fundus_tree, tmp_path):
    """2 gloo processes x batch 2 == 1 process x batch 4: same losses (per-sample seeded masks)."""
    out, single = tmp_path / "ddp", tmp_path / "single"
    flags = pretrain_argv(synthetic_fundus_tree, out, "--kept_mask_ratio", "0.25", "--vis_images", "0")
    flags[flags.index("--batch_size") + 1] = "2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(REPO / "main_pretrain.py"), "--model", "mae_vit_micro_patch8",
           "--cross_mae", *flags]
    proc = run_cmd(cmd, timeout=120, env=child_env())
    assert proc.returncode == 0, describe(proc)
    assert "effective batch 4" in proc.stdout, proc.stdout
    ckpt = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["world_size"] == 2 and ckpt["args"]["model"] == MICRO
    assert "decoder_blocks.0.cross_attn.kv.weight" in ckpt["model"]
    run_in_process(["--model", MICRO, *pretrain_argv(synthetic_fundus_tree, single, "--kept_mask_ratio", "0.25",
                                                     "--vis_images", "0")])
    ddp_loss, one_loss = (json.loads((d / "log.txt").read_text().splitlines()[-1])["train_loss"] for d in (out, single))
    assert ddp_loss == pytest.approx(one_loss, rel=1e-5)
