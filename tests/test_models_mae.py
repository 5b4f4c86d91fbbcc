"""MAE / deblurring-MAE model contract: reference key names and shapes, patchify and the sin-cos tables, masking
and the per-patch loss, weight-decay and layer-decay groups, learning-rate schedules."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

import models_mae  # noqa: F401
import models_vit  # noqa: F401
from conftest import fixed_batch_losses
from models_mae import patchify, pixel_target, random_masking, unpatchify
from util.checkpoint import load_file, load_training_state
from util.lr_sched import cosine_scheduler, mae_lr
from util.optim import param_groups_lrd, param_groups_weight_decay
from util.pos_embed import get_2d_sincos_pos_embed, resize_pos_embed
from util.registry import UnknownModelError, create_model


def tiny(name: str = "mae_vit_micro_patch8", **kw):
    torch.manual_seed(0)
    return create_model(name, img_size=32, **kw)


@pytest.mark.parametrize("name,tensors,params,pos,pred", [
    ("mae_vit_base_patch16", 254, 111_907_840, (1, 197, 768), (768, 512)),
    ("mae_vit_large_patch16", 398, 329_541_888, (1, 197, 1024), (768, 512)),
    ("mae_vit_huge_patch14", 494, 657_074_508, (1, 257, 1280), (588, 512)),
])
def test_reference_key_counts_and_shapes(name, tensors, params, pos, pred):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_model(name)
    sd = model.state_dict()
    assert len(sd) == tensors
    assert sum(v.numel() for v in sd.values()) == params
    assert tuple(sd["pos_embed"].shape) == pos
    assert tuple(sd["decoder_pred.weight"].shape) == pred
    assert "norm.weight" in sd and "fc_norm.weight" not in sd
    assert tuple(sd["blocks.0.attn.qkv.weight"].shape) == (3 * pos[2], pos[2])


def test_dmae_keys_identical_and_aliases():
    with torch.device("meta"):
        a = create_model("mae_vit_base_patch16").state_dict()
        b = create_model("dmae_vit_base_patch16_dec512d8b").state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_uspec_alias_logs(medfound_log):
    with torch.device("meta"):
        m = create_model("mae_vit_large_patch16_cross_attention")
    assert m.embed_dim == 1024 and len(m.blocks) == 24
    assert "deprecated alias of mae_vit_large_patch16" in medfound_log.text


def test_unknown_model_suggests():
    with pytest.raises(UnknownModelError, match="mae_vit_base_patch16"):
        create_model("mae_vit_bse_patch16")


def test_input_size_not_divisible():
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        create_model("mae_vit_micro_patch8", img_size=30)


@pytest.mark.parametrize("hw", [(32, 32), (32, 48)])
def test_patchify_roundtrip_and_order(hw):
    x = torch.randn(2, 3, *hw)
    p = patchify(x, 8)
    assert p.shape == (2, hw[0] // 8 * hw[1] // 8, 8 * 8 * 3)
    # patch (0, 1), pixel (row 2, col 3), channel 1 -> index (2*8 + 3)*3 + 1
    assert p[0, 1, (2 * 8 + 3) * 3 + 1] == x[0, 1, 2, 8 + 3]
    assert torch.equal(unpatchify(p, 8, (hw[0] // 8, hw[1] // 8)), x)


def test_sincos_closed_form():
    d, g = 16, 4
    pe = get_2d_sincos_pos_embed(d, g, cls_token=True)
    assert pe.shape == (1 + g * g, d) and np.all(pe[0] == 0)
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
    for r in range(g):
        for c in range(g):
            row = pe[1 + r * g + c]
            np.testing.assert_allclose(row[: d // 4], np.sin(c * omega))
            np.testing.assert_allclose(row[d // 4: d // 2], np.cos(c * omega))
            np.testing.assert_allclose(row[d // 2: 3 * d // 4], np.sin(r * omega))
    model = tiny()
    table = get_2d_sincos_pos_embed(model.embed_dim, 4, cls_token=True)  # float64 reference
    np.testing.assert_array_equal(model.pos_embed.detach().numpy()[0], table.astype(np.float32))
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_masking_matches_reference_rng_and_ratio():
    x = torch.randn(3, 196, 8)
    torch.manual_seed(5)
    _, mask, ids_restore = random_masking(x, 0.75)
    torch.manual_seed(5)
    noise = torch.rand(3, 196)
    assert torch.equal(ids_restore, torch.argsort(torch.argsort(noise, dim=1), dim=1))
    assert (mask.sum(1) == 196 - 49).all()  # int(196 * 0.25) = 49 kept
    _, mask85, _ = random_masking(x, 0.85)
    assert (mask85.sum(1) == 196 - 29).all()
    # masked = the largest noise values
    kept = mask == 0
    assert (noise[kept].view(3, -1).max(1).values < noise[~kept].view(3, -1).min(1).values).all()


def test_explicit_noise_equals_seeded_draw():
    model = tiny().eval()
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    loss_a, pred_a, mask_a = model(imgs, mask_ratio=0.75)
    torch.manual_seed(3)
    noise = torch.rand(2, 16)
    loss_b, pred_b, mask_b = model(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(mask_a, mask_b) and torch.allclose(pred_a, pred_b) and torch.allclose(loss_a, loss_b)


def reference_forward(model, imgs, noise, target=None, scope="masked", norm_pix=False):
    """An independent re-statement of the reference MAE algorithm (argsort-of-noise masking, forward, loss) on the
    model's weights."""
    p = model.patch_size
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    n, length, d = x.shape
    keep = int(length * 0.25)
    ids_shuffle = noise.argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(n, -1, -1), x], 1)
    for blk in model.blocks:
        x = blk(x)
    x = model.decoder_embed(model.norm(x))
    tokens = torch.cat([x[:, 1:], model.mask_token.repeat(n, length - keep, 1)], 1)
    tokens = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([x[:, :1], tokens], 1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk(x)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:]
    t = patchify(imgs if target is None else target, p)
    if norm_pix:
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    e = (pred - t) ** 2
    loss = e.mean() if scope == "all" else (e.mean(-1) * mask).sum() / mask.sum()
    return loss, pred, mask


@pytest.mark.parametrize("norm_pix", [False, True])
def test_forward_parity_with_reference_algorithm(norm_pix):
    model = tiny(norm_pix_loss=norm_pix).eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    ref_loss, ref_pred, ref_mask = reference_forward(model, imgs, noise, norm_pix=norm_pix)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(pred, ref_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)


def test_norm_pix_target_uses_unbiased_variance():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(1, 6, 8, 8)[:, :3]
    t = pixel_target(x, 8, True)[0, 0]
    raw = patchify(x, 8)[0, 0]
    expected = (raw - raw.mean()) / math.sqrt(float(raw.var(unbiased=True)) + 1e-6)
    torch.testing.assert_close(t, expected)


def test_loss_scopes_masked_vs_all():
    mae, dmae = tiny(), tiny("dmae_vit_micro_patch8")
    dmae.load_state_dict(mae.state_dict())
    blurred, sharp = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    loss, pred, mask = dmae(blurred, target=sharp, noise=noise)
    ref, _, _ = reference_forward(dmae, blurred, noise, target=sharp, scope="all")
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # changing the target only at visible patches moves the deblurring loss but not the MAE loss
    vis = (1 - mask)[:, :, None].expand(-1, -1, 192)
    sharp2 = unpatchify(patchify(sharp, 8) + vis * 5, 8)
    assert not torch.allclose(dmae(blurred, target=sharp2, noise=noise)[0], loss)
    assert torch.allclose(mae(blurred, target=sharp2, noise=noise)[0], mae(blurred, target=sharp, noise=noise)[0])
    # DeblurringMAE's positional call form model(blurred, sharp)
    torch.manual_seed(1)
    a = dmae(blurred, sharp)[0]
    torch.manual_seed(1)
    assert torch.equal(a, dmae(blurred, target=sharp)[0])
    with pytest.raises(ValueError, match="sharp image"):
        dmae(blurred)


def test_loss_decreases_on_fixed_batch():
    first, last = fixed_batch_losses(tiny())
    assert last < 0.5 * first


def test_weight_decay_groups_match_reference():
    with torch.device("meta"):
        model = create_model("mae_vit_base_patch16")
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    assert len(no_decay["params"]) == 167 and len(decay["params"]) == 85
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    ids = {id(p) for p in decay["params"]}
    assert id(model.cls_token) in ids and id(model.mask_token) in ids  # 3-D tokens DO decay (reference)


def test_layer_decay_groups_vit_b():
    with torch.device("meta"):
        model = create_model("vit_base_patch16", num_classes=5)
    groups = param_groups_lrd(model, 0.05, 0.65)
    assert len(groups) == 28
    assert groups[0]["name"].startswith("layer_0")
    assert math.isclose(min(g["lr_scale"] for g in groups), 0.65 ** 13)
    head = [g for g in groups if "head.weight" in g["param_names"]][0]
    assert head["lr_scale"] == 1.0 and head["weight_decay"] == 0.05
    assert [g["name"] for g in groups[:3]] == ["layer_0_no_decay", "layer_0_decay", "layer_1_no_decay"]
    assert groups[0]["param_names"] == ["cls_token", "pos_embed", "patch_embed.proj.bias"]


def test_lr_schedules_reference_values():
    v = [mae_lr(e, 1.0, 0.0, 40, 800) for e in (0, 20, 40, 420, 800)]
    assert v[0] == 0 and math.isclose(v[1], 0.5) and math.isclose(v[2], 1.0)
    assert math.isclose(v[3], 0.5, abs_tol=1e-12) and abs(v[4]) < 1e-12
    s = cosine_scheduler(1.0, 0.1, epochs=5, niter_per_ep=10, warmup_epochs=1)
    assert len(s) == 50 and s[0] == 0.0 and s[9] == 1.0 and s[10] == 1.0 and math.isclose(s[-1], 0.1, rel_tol=0.1)


def test_resize_pos_embed_keeps_cls_and_is_identity_at_same_size():
    pe = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pe, 4) is pe
    out = resize_pos_embed(pe, 6)
    assert out.shape == (1, 37, 8) and torch.equal(out[:, :1], pe[:, :1])


def test_published_checkpoint_loads_strictly_with_namespace_args(tmp_path):
    """A checkpoint written the way the reference writes it (args = argparse.Namespace)."""
    model = tiny()
    path = tmp_path / "checkpoint-799.pth"
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 799, "scaler": {},
                "args": argparse.Namespace(model="mae_vit_micro_patch8", blr=1.5e-4),
                "best": np.float64(0.5)}, path)
    fresh = tiny()
    for p in fresh.parameters():
        p.data.zero_()
    ckpt = load_training_state(str(path), fresh, restore_rng=False)
    assert ckpt["epoch"] == 799 and ckpt["args"].blr == 1.5e-4
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/medfound_pwned_marker",))


def test_malicious_pickle_refused(tmp_path):
    import os
    marker = "/tmp/medfound_pwned_marker"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Evil()}, path)
    from util.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="refused to load"):
        load_file(str(path))
    assert not os.path.exists(marker)
