"""The ViT's seams for later methods: timm-style intermediates, position embeddings resized to the input,
iBOT's token masking, and one resize function shared with checkpoint loading."""
from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from models_vit import VisionTransformer
from util.pos_embed import resize_pos_embed


def tiny_vit(img_size=32, patch_size=8, depth=3, pool="cls", **kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=32, depth=depth, num_heads=4,
                             num_classes=3, pool=pool, **kw).eval()


def by_hand(model: VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output (N, 1+L, D), computed without the model's own loop."""
    t = model.patch_embed.proj(x).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
    t = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1), t], dim=1)
    outs = []
    for blk in model.blocks:
        t = t + blk.attn(blk.norm1(t))
        t = t + blk.mlp(blk.norm2(t))
        outs.append(t)
    return outs


# ------------------------------------------------------------------------------ forward_intermediates
@pytest.mark.parametrize("indices,expect", [(None, [0, 1, 2]), (2, [1, 2]), ([0, 2], [0, 2]), ([-1], [2])])
@pytest.mark.parametrize("norm", [False, True])
def test_forward_intermediates_equal_the_blocks_outputs(indices, expect, norm):
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = by_hand(model, x)
        final, nchw = model.forward_intermediates(x, indices, norm=norm)
        nlc = model.forward_intermediates(x, indices, norm=norm, output_fmt="NLC", intermediates_only=True)
        feats = model.forward_features(x)
    assert torch.allclose(final, model.norm(ref[-1]), atol=1e-6) and torch.equal(final, feats)
    assert len(nchw) == len(nlc) == len(expect)
    for i, a, b in zip(expect, nchw, nlc):
        want = model.norm(ref[i]) if norm else ref[i]
        assert b.shape == (2, 16, 32) and torch.allclose(b, want[:, 1:], atol=1e-6)
        # NCHW: patch tokens in raster order on the 4x4 grid, channels first
        assert a.shape == (2, 32, 4, 4) and torch.equal(a, b.transpose(1, 2).reshape(2, 32, 4, 4))


def test_forward_intermediates_prefix_tokens_dict_stop_early_and_avg_pool():
    model = tiny_vit(pool="mae_avg")  # no final `norm`: norm=True is the identity, as timm's avg-pool ViT
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = by_hand(model, x)
        pairs = model.forward_intermediates(x, [1], norm=True, return_prefix_tokens=True, intermediates_only=True)
        (patches, prefix), = pairs
        assert torch.allclose(prefix, ref[1][:, :1], atol=1e-6) and patches.shape == (2, 32, 4, 4)
        out = model.forward_intermediates(x, 1, output_fmt="NLC", output_dict=True, return_prefix_tokens=True)
        assert torch.allclose(out["image_features"], ref[-1], atol=1e-6)
        assert torch.allclose(out["image_intermediates"][0], ref[2][:, 1:], atol=1e-6)
        assert torch.allclose(out["image_intermediates_prefix"][0], ref[2][:, :1], atol=1e-6)
        final, _ = model.forward_intermediates(x, [0], stop_early=True)  # later blocks skipped, as timm
        assert torch.allclose(final, ref[0], atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        model.forward_intermediates(x, [3])
    with pytest.raises(ValueError, match="1..3"):
        model.forward_intermediates(x, 4)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers_keeps_the_taken_blocks_identical():
    model = tiny_vit(depth=4)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model.forward_intermediates(x, [0, 1], intermediates_only=True)
        assert model.prune_intermediate_layers([0, 1], prune_norm=True) == [0, 1]
        got = model.forward_intermediates(x, [0, 1], intermediates_only=True)
    assert len(model.blocks) == 2 and isinstance(model.head, torch.nn.Identity) and model.num_classes == 0
    assert all(torch.equal(a, b) for a, b in zip(want, got))


# ------------------------------------------------------------------------------ position embeddings
def test_resize_pos_embed_matches_timm_at_two_sizes_and_is_the_identity_at_its_size():
    torch.manual_seed(1)
    pe = torch.randn(1, 1 + 4 * 4, 16)
    assert resize_pos_embed(pe, (4, 4), antialias=True) is pe
    for new in [(6, 6), (3, 5)]:  # up-sampling, and a non-square down/up-sampling
        for aa in (True, False):
            ours = resize_pos_embed(pe, new, num_extra_tokens=1, antialias=aa)
            ref = resample_abs_pos_embed(pe, list(new), num_prefix_tokens=1, antialias=aa)
            assert ours.shape == (1, 1 + new[0] * new[1], 16) and torch.equal(ours[:, :1], pe[:, :1])
            assert torch.allclose(ours, ref, atol=1e-6), (new, aa)
    # non-square source grid, given explicitly
    rect = torch.randn(1, 1 + 2 * 3, 8)
    assert torch.allclose(resize_pos_embed(rect, (4, 6), old_grid=(2, 3), antialias=True),
                          resample_abs_pos_embed(rect, [4, 6], old_size=[2, 3]), atol=1e-6)
    with pytest.raises(ValueError, match="2x2 grid"):
        resize_pos_embed(rect, (4, 4), old_grid=(2, 2))


def test_model_runs_at_other_sizes_with_the_resized_table():
    model = tiny_vit()
    with torch.no_grad():
        for hw in [(48, 48), (16, 24), (32, 32)]:
            x = torch.randn(2, 3, *hw)
            grid = (hw[0] // 8, hw[1] // 8)
            pe = resample_abs_pos_embed(model.pos_embed, list(grid), old_size=[4, 4], antialias=False)  # MAE/iBOT resize
            t = model.patch_embed.proj(x).flatten(2).transpose(1, 2) + pe[:, 1:]
            t = torch.cat([(model.cls_token + pe[:, :1]).expand(2, -1, -1), t], dim=1)
            for blk in model.blocks:
                t = blk(t)
            assert torch.allclose(model.forward_features(x), model.norm(t), atol=1e-5), hw
            _, inter = model.forward_intermediates(x, 1)
            assert inter[0].shape == (2, 32, *grid)
            assert model(x).shape == (2, 3)
    for bad in [(30, 32), (32, 20)]:
        with pytest.raises(ValueError, match="multiples of 8.*check --input_size"):
            model(torch.randn(1, 3, *bad))
    with pytest.raises(ValueError, match="check --input_size"):
        model.embed(torch.randn(1, 3, 48, 48))  # the masked-autoencoder path keeps the built size


def test_large_and_small_inputs_for_a_224_model():
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=16, depth=1, num_heads=2)
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 96, 96)).shape == (1, 1 + 36, 16)  # DINO/iBOT local crop
        assert model.forward_features(torch.randn(1, 3, 512, 512)).shape == (1, 1 + 32 * 32, 16)  # segmentation


def test_checkpoint_loading_resizes_with_the_same_function(tmp_path, monkeypatch):
    import util.pos_embed
    from util.checkpoint import load_pretrained_encoder
    src = tiny_vit(img_size=32)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict()}, path)
    calls = []
    real = util.pos_embed.resize_pos_embed
    monkeypatch.setattr(util.pos_embed, "resize_pos_embed", lambda *a, **k: calls.append(k) or real(*a, **k))
    dst = tiny_vit(img_size=48)
    load_pretrained_encoder(dst, str(path), reset_head=False)
    assert len(calls) == 1
    # the MAE finetuning interpolation (no antialias) of the 4x4 table to the 6x6 grid
    assert torch.allclose(dst.pos_embed, resample_abs_pos_embed(src.pos_embed, [6, 6], antialias=False), atol=1e-6)


# ------------------------------------------------------------------------------ masked image modelling
def test_masked_forward_equals_ibot_definition():
    model = tiny_vit(masked_im_modeling=True)
    assert tuple(model.masked_embed.shape) == (1, 32) and not model.masked_embed.any()  # iBOT: zeros (1, D)
    with torch.no_grad():
        model.masked_embed.normal_()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = mask[0, 3, 0] = mask[1, 0, 0] = True
    # iBOT's prepare_tokens: conv patch map (N, D, h, w); masked positions set to masked_embed in place;
    # flatten; cls token prepended; position embeddings added to every token (masked ones too).
    with torch.no_grad():
        pm = model.patch_embed.proj(x)
        pm.permute(0, 2, 3, 1)[mask, :] = model.masked_embed.to(pm.dtype)
        t = torch.cat([model.cls_token.expand(2, -1, -1), pm.flatten(2).transpose(1, 2)], dim=1) + model.pos_embed
        for blk in model.blocks:
            t = blk(t)
        want = model.norm(t)
        got = model.forward_features(x, mask=mask)
        assert torch.allclose(got, want, atol=1e-5)
        plain = model.forward_features(x)
        assert torch.equal(model.forward_features(x, mask=torch.zeros_like(mask)), plain)
        assert not torch.allclose(got, plain, atol=1e-3)
        _, inter = model.forward_intermediates(x, 1, mask=mask, output_fmt="NLC")
        assert torch.allclose(inter[0], t[:, 1:], atol=1e-5)
    # the gradient reaches masked_embed only through masked positions
    model.forward_features(x, mask=mask).sum().backward()
    assert model.masked_embed.grad is not None and model.masked_embed.grad.abs().sum() > 0


def test_masking_flag_off_keeps_keys_and_refuses_a_mask():
    plain = tiny_vit()
    assert "masked_embed" not in plain.state_dict()
    assert set(tiny_vit(masked_im_modeling=True).state_dict()) == set(plain.state_dict()) | {"masked_embed"}
    with pytest.raises(ValueError, match="masked_im_modeling"):
        plain.forward_features(torch.randn(1, 3, 32, 32), mask=torch.zeros(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        tiny_vit(masked_im_modeling=True).forward_features(torch.randn(1, 3, 32, 32), mask=torch.zeros(1, 4, 4))


# ------------------------------------------------------------------------------ users of the seams
def test_attention_maps_follow_the_input_grid():
    from util.explain import attention_rollout, chefer_relevance
    model = tiny_vit()  # built for 32 px (4x4 tokens)
    x = torch.randn(2, 3, 48, 40)
    maps, logits = attention_rollout(model, x)
    assert maps.shape == (2, 6, 5) and logits.shape == (2, 3)
    rel, _, _ = chefer_relevance(model, x, class_index=1)
    assert rel[-1].shape == (2, 6, 5)


def test_util_modules_of_the_vit_seams_import_no_model_family():
    import subprocess
    import sys
    code = ("import sys, util.explain, util.tiny, util.pos_embed; "
            "bad = [m for m in sys.modules if m.split('.')[0].startswith(('models_', 'engine_', 'main_'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def test_layerscale_keys_and_numerics():
    """init_values > 0: blocks carry gamma_1 / gamma_2 [D] (iBOT's key names) scaling each residual branch;
    the default has no such keys, so existing checkpoints keep loading strictly."""
    torch.manual_seed(0)
    plain = tiny_vit()
    assert not [k for k in plain.state_dict() if "gamma" in k]
    scaled = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3,
                               init_values=0.1)
    keys = [k for k in scaled.state_dict() if "gamma" in k]
    assert keys == ["blocks.0.gamma_1", "blocks.0.gamma_2", "blocks.1.gamma_1", "blocks.1.gamma_2"]
    assert torch.equal(scaled.blocks[0].gamma_1, torch.full((32,), 0.1))
    blk, x = scaled.blocks[0].eval(), torch.randn(2, 5, 32)
    with torch.no_grad():
        blk.gamma_1.uniform_()
        blk.gamma_2.uniform_()
        h = x + blk.gamma_1 * blk.attn(blk.norm1(x))
        assert torch.allclose(blk(x), h + blk.gamma_2 * blk.mlp(blk.norm2(h)), atol=1e-6)
    twin = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3,
                             init_values=1e-5)
    twin.load_state_dict(scaled.state_dict(), strict=True)
