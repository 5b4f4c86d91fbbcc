"""iBOT / VisionFM building blocks against their definitions: masks, head, loss, centring, Sinkhorn-Knopp,
KoLeo, modalities, multi-crop, and loading a checkpoint in the reference key layout."""
from __future__ import annotations

import argparse
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models_ibot as mi
from util.cli import UserError
from util.masking import MaskingGenerator, iBOTMasker, mask_generators, random_mask


# ---------------------------------------------------------------- masks

def _reference_style_masks(grids, ratios, variances, shape, seed):
    """iBOT's loader written out plainly on the global `random` / `np.random` state (lists of ratios)."""
    random.seed(seed)
    np.random.seed(seed)
    out = []
    for h, w in grids:
        drawn = [random.uniform(m - v, m + v) if v > 0 else m for m, v in zip(ratios, variances)]
        high = random.choice(drawn) * h * w
        if shape == "rand":
            flat = np.hstack([np.zeros(h * w - int(high)), np.ones(int(high))]).astype(bool)
            np.random.shuffle(flat)
            out.append(flat.reshape(h, w))
            continue
        mask = np.zeros((h, w), dtype=bool)
        count = 0
        while count < high:
            budget = high - count
            delta = 0
            for _ in range(10):
                area = random.uniform((min(h, w) // 3) ** 2, budget)
                aspect = math.exp(random.uniform(math.log(0.3), math.log(1 / 0.3)))
                bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if bw < w and bh < h:
                    top, left = random.randint(0, h - bh), random.randint(0, w - bw)
                    new = bh * bw - mask[top:top + bh, left:left + bw].sum()
                    if 0 < new <= budget:
                        for i in range(top, top + bh):
                            for j in range(left, left + bw):
                                if not mask[i, j]:
                                    mask[i, j] = True
                                    delta += 1
                if delta > 0:
                    break
            if delta == 0:
                break
            count += delta
        out.append(mask)
    return out


@pytest.mark.parametrize("shape", ["block", "rand"])
def test_masks_reproduce_reference_sequence(shape):
    masker = iBOTMasker([0.0, 0.3], [0.0, 0.2], shape)
    grids = [(14, 14), (14, 14), (6, 6), (14, 10)]
    for seed in range(5):
        ours = masker(grids, *mask_generators(seed))
        ref = _reference_style_masks(grids, [0.0, 0.3], [0.0, 0.2], shape, seed)
        for a, b in zip(ours, ref):
            assert a.dtype == bool and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


def test_block_mask_ratio_and_shape():
    gen = MaskingGenerator((14, 14), 0.3 * 196, min_num_patches=16)
    counts = [int(gen(random.Random(s)).sum()) for s in range(40)]
    assert all(c <= 0.3 * 196 for c in counts)  # never over the budget
    assert np.mean(counts) > 0.8 * 0.3 * 196  # and close to it
    m = gen(random.Random(0))
    assert m.shape == (14, 14) and m.dtype == bool
    # BEiT defaults: 4-patch minimum, budget capped by max_num_patches per block
    assert MaskingGenerator(8, 20, max_num_patches=6)(random.Random(1)).sum() <= 20


def test_random_mask_exact_count():
    m = random_mask((7, 5), 0.4 * 35, np.random.RandomState(0))
    assert m.shape == (7, 5) and m.sum() == 14


def test_ratio_draws_and_start_epoch():
    masker = iBOTMasker([0.0, 0.3], [0.0, 0.2], "rand", pred_start_epoch=2)
    rng = random.Random(0)
    draws = np.array([masker.draw_ratio(rng, epoch=5) for _ in range(2000)])
    zero = draws == 0
    assert 0.45 < zero.mean() < 0.55
    assert draws[~zero].min() >= 0.1 and draws[~zero].max() <= 0.5
    assert all(masker.draw_ratio(rng, epoch=1) == 0 for _ in range(10))
    assert all(m.sum() == 0 for m in masker([(4, 4)] * 3, *mask_generators(0), epoch=0))
    # scalar ratio: the value itself (no variance)
    assert iBOTMasker(0.3, 0.0).draw_ratio(random.Random(0)) == 0.3


def test_masks_deterministic_per_seed():
    masker = iBOTMasker([0.0, 0.3], [0.0, 0.2], "block")
    a = masker([(14, 14)] * 4, *mask_generators(123))
    b = masker([(14, 14)] * 4, *mask_generators(123))
    c = masker([(14, 14)] * 4, *mask_generators(124))
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))


def test_masker_bad_flags_are_user_errors():
    with pytest.raises(UserError, match="pred_ratio_var"):
        iBOTMasker([0.3, 0.2], [0.1, 0.1, 0.1])
    with pytest.raises(UserError, match="pred_shape"):
        iBOTMasker(0.3, 0.0, "star")
    with pytest.raises(UserError, match="var <= ratio"):
        iBOTMasker(0.1, 0.2)


# ---------------------------------------------------------------- head

def test_weight_norm_linear_matches_torch_weight_norm():
    lin = nn.Linear(8, 5, bias=False)
    torch.nn.utils.parametrizations.weight_norm(lin)
    ours = mi.WeightNormLinear(8, 5)
    with torch.no_grad():
        lin.parametrizations.weight.original0.copy_(torch.rand(5, 1) + 0.5)
        ours.load_state_dict({"weight_g": lin.parametrizations.weight.original0,
                              "weight_v": lin.parametrizations.weight.original1})
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), lin(x))
    assert list(ours.state_dict()) == ["weight_g", "weight_v"]


def test_head_keys_shapes_and_shared():
    head = mi.iBOTHead(16, 12, patch_out_dim=12, hidden_dim=20, bottleneck_dim=8, shared_head=True)
    sd = head.state_dict()
    assert sd["last_layer.weight_g"].shape == (12, 1) and sd["last_layer.weight_v"].shape == (12, 8)
    assert "last_layer2.weight_v" in sd  # the aliased module is written under both names
    assert [k for k in sd if k.startswith("mlp")] == [f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    cls, patch = head(torch.randn(2, 5, 16))
    assert cls.shape == (2, 12) and patch.shape == (2, 4, 12)
    unshared = mi.iBOTHead(16, 12, patch_out_dim=6, hidden_dim=20, bottleneck_dim=8, norm="ln")
    assert unshared.last_layer2 is not unshared.last_layer
    assert [k for k in unshared.state_dict() if k.startswith("mlp") and k.endswith("weight")] == \
        [f"mlp.{i}.weight" for i in (0, 1, 3, 4, 6)]
    assert unshared(torch.randn(2, 5, 16))[1].shape == (2, 4, 6)
    assert unshared(torch.randn(3, 16)).shape == (3, 12)  # class token only
    with pytest.raises(UserError):
        mi.iBOTHead(16, 12, patch_out_dim=6, shared_head=True)


def test_base_head_parameter_count():
    # ViT-B head with 8192 outputs: 8.40 M parameters shared, 10.51 M unshared (as released)
    def count(shared):
        h = mi.iBOTHead(768, 8192, patch_out_dim=8192, shared_head=shared)
        return sum(p.numel() for p in h.parameters()) / 1e6
    assert round(count(True), 2) == 8.40 and round(count(False), 2) == 10.51


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_last_layer_gain_fixed_when_normalised(norm_last_layer):
    head = mi.iBOTHead(8, 10, patch_out_dim=6, hidden_dim=16, bottleneck_dim=4, norm_last_layer=norm_last_layer)
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    cls, patch = head(torch.randn(4, 3, 8))
    (cls.pow(2).sum() + patch.pow(2).sum()).backward()
    opt.step()
    for layer in (head.last_layer, head.last_layer2):
        assert layer.weight_g.requires_grad is (not norm_last_layer)
        assert torch.equal(layer.weight_g, torch.ones_like(layer.weight_g)) is norm_last_layer
        # with g = 1 each output row of the weight has unit norm
    if norm_last_layer:
        torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(10))


# ---------------------------------------------------------------- loss

def _loss(**kw):
    args = dict(out_dim=5, patch_out_dim=4, ngcrops=2, nlcrops=1, warmup_teacher_temp=0.04, teacher_temp=0.07,
                warmup_teacher_temp2=0.04, teacher_temp2=0.07, warmup_teacher_temp_epochs=3, nepochs=6)
    args.update(kw)
    return mi.iBOTLoss(**args)


def test_temperature_schedules():
    loss = _loss(warmup_teacher_temp_epochs=3, nepochs=5)
    np.testing.assert_allclose(loss.teacher_temp_schedule, [0.04, 0.055, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(loss.teacher_temp2_schedule, [0.04, 0.055, 0.07, 0.07, 0.07])
    held = _loss(warmup_teacher_temp_epochs=3, nepochs=6, mim_start_epoch=2)
    np.testing.assert_allclose(held.teacher_temp2_schedule, [0.04, 0.04, 0.04, 0.055, 0.07, 0.07])
    np.testing.assert_allclose(held.teacher_temp_schedule, [0.04, 0.055, 0.07, 0.07, 0.07, 0.07])
    assert held.temperatures(100) == (0.07, 0.07)  # past the end: the final values
    assert held.temperatures(1) == pytest.approx((0.055, 0.04))


def test_centre_update_hand_example():
    loss = _loss(out_dim=2, patch_out_dim=2)
    t_cls = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t_patch = torch.tensor([[[0.0, 2.0], [2.0, 4.0]], [[4.0, 6.0], [6.0, 8.0]]])  # per-image means (1,3), (5,7)
    loss.update_center(t_cls, t_patch)
    torch.testing.assert_close(loss.center, torch.tensor([[0.2, 0.3]]))  # 0.9 * 0 + 0.1 * (2, 3)
    torch.testing.assert_close(loss.center2, torch.tensor([[[0.3, 0.5]]]))  # 0.1 * (3, 5)
    loss.update_center(t_cls, t_patch)
    torch.testing.assert_close(loss.center, torch.tensor([[0.38, 0.57]]))
    assert sorted(loss.state_dict()) == ["center", "center2"]


def _direct_loss(s_cls, s_local, s_patch, t_cls, t_patch, masks, center, center2, temp, temp2, ngcrops):
    """iBOT's definition computed element by element in float64."""
    s_all = torch.cat([s_cls, s_local]).double() / 0.1
    b = t_cls.shape[0] // ngcrops
    tq = [F.softmax((t_cls.double()[q * b:(q + 1) * b] - center) / temp, -1) for q in range(ngcrops)]
    tp = [F.softmax((t_patch.double()[q * b:(q + 1) * b] - center2) / temp2, -1) for q in range(ngcrops)]
    nviews = s_all.shape[0] // b
    cls_terms, patch_terms = [], []
    for q in range(ngcrops):
        for v in range(nviews):
            sv = s_all[v * b:(v + 1) * b]
            if v == q:
                per_image = []
                for i in range(b):
                    logp = F.log_softmax(s_patch.double()[v * b + i] / 0.1, -1)
                    m = masks[v][i].flatten()
                    ce = sum(float(-(tp[q][i, n] * logp[n]).sum()) for n in range(len(m)) if m[n])
                    per_image.append(ce / max(int(m.sum()), 1))
                patch_terms.append(np.mean(per_image))
            else:
                cls_terms.append(float((-(tq[q] * F.log_softmax(sv, -1)).sum(-1)).mean()))
    return np.mean(cls_terms), np.mean(patch_terms)


def test_loss_equals_definition_on_hand_made_logits():
    g = torch.Generator().manual_seed(0)
    b, n = 3, 4
    s_cls, s_local = torch.randn(2 * b, 5, generator=g), torch.randn(b, 5, generator=g)
    s_patch, t_patch = torch.randn(2 * b, n, 4, generator=g), torch.randn(2 * b, n, 4, generator=g)
    t_cls = torch.randn(2 * b, 5, generator=g)
    masks = [torch.tensor([[[1, 0], [0, 1]], [[0, 0], [0, 0]], [[1, 1], [1, 0]]], dtype=torch.bool),
             torch.tensor([[[0, 1], [0, 0]], [[1, 1], [1, 1]], [[0, 0], [1, 0]]], dtype=torch.bool)]
    loss = _loss(lambda2=0.5)
    loss.center.copy_(torch.randn(1, 5, generator=g))
    loss.center2.copy_(torch.randn(1, 1, 4, generator=g))
    c, c2 = loss.center.clone().double(), loss.center2.clone().double()
    out = loss((s_cls, s_patch), (t_cls, t_patch), s_local, masks, epoch=1)
    want_cls, want_patch = _direct_loss(s_cls, s_local, s_patch, t_cls, t_patch, masks, c, c2, 0.055, 0.055, 2)
    assert out["cls"].item() == pytest.approx(want_cls, rel=1e-5)
    assert out["patch"].item() == pytest.approx(0.5 * want_patch, rel=1e-5)
    assert out["loss"].item() == pytest.approx(want_cls + 0.5 * want_patch, rel=1e-5)
    # the centres moved after the loss, from the teacher outputs
    torch.testing.assert_close(loss.center, (0.9 * c + 0.1 * t_cls.double().mean(0, keepdim=True)).float())


def test_loss_gradient_reaches_student_only():
    s_cls = torch.randn(4, 5, requires_grad=True)
    s_patch = torch.randn(4, 4, 4, requires_grad=True)
    t_cls, t_patch = torch.randn(4, 5, requires_grad=True), torch.randn(4, 4, 4, requires_grad=True)
    masks = [torch.ones(2, 2, 2, dtype=torch.bool)] * 2
    out = _loss(nlcrops=0)((s_cls, s_patch), (t_cls, t_patch), None, masks, epoch=0)
    out["loss"].backward()
    assert s_cls.grad.abs().sum() > 0 and s_patch.grad.abs().sum() > 0
    assert t_cls.grad is None and t_patch.grad is None


def test_sinkhorn_knopp_marginals():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 6, generator=g) * 0.05
    q = mi.sinkhorn_knopp(logits, temp=0.1, n_iterations=3)
    torch.testing.assert_close(q.sum(1), torch.ones(12))  # each sample's target is a distribution
    torch.testing.assert_close(q.sum(0), torch.full((6,), 12 / 6), atol=2e-2, rtol=0)  # prototypes balanced
    many = mi.sinkhorn_knopp(torch.randn(12, 6, generator=g), temp=1.0, n_iterations=200)
    torch.testing.assert_close(many.sum(0), torch.full((6,), 2.0), atol=1e-4, rtol=0)
    # a constant shift of the logits changes nothing (the maximum subtraction is exact)
    torch.testing.assert_close(mi.sinkhorn_knopp(logits + 50, 0.1), q)


def test_sinkhorn_loss_leaves_centres_and_uses_masked_patches():
    loss = _loss(nlcrops=0, centering="sinkhorn_knopp")
    masks = [torch.tensor([[[True, False], [False, False]]]), torch.tensor([[[False, True], [True, False]]])]
    t_patch = torch.randn(2, 4, 4)
    _, tp = loss.teacher_targets(torch.randn(2, 5), t_patch, torch.cat(masks), epoch=0)
    flat = torch.cat(masks).flatten(1)
    torch.testing.assert_close(tp[flat].sum(-1), torch.ones(3))
    assert (tp[~flat] == 0).all()
    loss((torch.randn(2, 5), torch.randn(2, 4, 4)), (torch.randn(2, 5), t_patch), None, masks, epoch=0)
    assert (loss.center == 0).all() and (loss.center2 == 0).all()
    with pytest.raises(UserError, match="centering"):
        _loss(centering="mean")


def test_koleo_small_example():
    # three unit vectors at 0, 90 and 180 degrees: every nearest neighbour is sqrt(2) away
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert mi.koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-5)
    # four points: 0, 10, 90, 180 degrees -> nearest distances d(10deg), d(10deg), d(80deg), d(90deg)
    ang = torch.tensor([0.0, 10.0, 90.0, 180.0]) * math.pi / 180
    y = torch.stack([ang.cos(), ang.sin()], 1) * 5
    chord = lambda deg: 2 * math.sin(math.radians(deg) / 2)  # noqa: E731
    want = -np.mean([math.log(chord(10)), math.log(chord(10)), math.log(chord(80)), math.log(chord(90))])
    assert mi.koleo_loss(y).item() == pytest.approx(want, abs=1e-5)
    # spreading points out lowers it
    assert mi.koleo_loss(torch.eye(4)).item() < mi.koleo_loss(y).item()


# ---------------------------------------------------------------- modalities

def test_modality_aliases_and_stats():
    from util.data import resolve_norm
    from util.modalities import MODALITIES, STATS, canonical_modality, modality_folder_names, modality_stats
    cases = {"Silt-Lamp": "SlitLamp", "SiltLamp": "SlitLamp", "Slit Lamp": "SlitLamp", "silt lamp": "SlitLamp",
             "UltraSound": "Ultrasound", "B-Ultrasound": "Ultrasound", "External Eye": "External",
             "external eye": "External", "fundus": "Fundus", "oct": "OCT", "Ffa": "FFA", "mri": "MRI",
             "ubm": "UBM", "  Fundus ": "Fundus"}
    for alias, canon in cases.items():
        assert canonical_modality(alias) == canon
    assert len(MODALITIES) == 8 and set(STATS) == set(MODALITIES)
    assert modality_stats("Fundus").mean == (0.42374, 0.26095, 0.12840)
    assert modality_stats("UBM").std == (0.20977867,) * 3
    for m in MODALITIES:  # the same numbers as the normalisation presets of the data pipeline
        assert tuple(resolve_norm(m)[0]) == pytest.approx(STATS[m].mean)
        assert tuple(resolve_norm(m)[1]) == pytest.approx(STATS[m].std)
    assert "Silt-Lamp" in modality_folder_names("slit lamp")
    with pytest.raises(UserError) as e:
        canonical_modality("Retina")
    assert "Retina" in str(e.value) and "Fundus" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- multi-crop

def _image(seed=0, size=(48, 40)):
    from PIL import Image
    rs = np.random.RandomState(seed)
    return Image.fromarray(rs.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_multicrop_shapes_and_determinism():
    from util.multicrop import multicrop_for
    t = multicrop_for("visionfm", "OCT", global_size=32, local_size=16, local_crops_number=3)
    crops = t(_image(), torch.Generator().manual_seed(5))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    again = t(_image(), torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    other = t(_image(), torch.Generator().manual_seed(6))
    assert any(not torch.equal(a, b) for a, b in zip(crops, other))
    assert t.mean == (0.21092,) * 3 and t.ratio == (0.8, 1.2) and t.global_crops_scale == (0.32, 1.0)
    ibot = multicrop_for("ibot", None, global_crops_scale=[0.2, 1.0])
    assert ibot.mean == (0.485, 0.456, 0.406) and ibot.ratio == (3 / 4, 4 / 3)
    assert ibot.global_crops_scale == (0.2, 1.0)


def test_multicrop_uint8_then_device_normalise_equals_float():
    from util.data import DeviceNormalize
    from util.multicrop import MultiCropTransform
    kw = dict(global_size=24, local_size=8, local_crops_number=2, mean=(0.4, 0.3, 0.2), std=(0.2, 0.25, 0.3))
    floats = MultiCropTransform(**kw)(_image(1), torch.Generator().manual_seed(0))
    raw = MultiCropTransform(output="uint8", **kw)(_image(1), torch.Generator().manual_seed(0))
    norm = DeviceNormalize(kw["mean"], kw["std"])
    assert all(r.dtype == torch.uint8 for r in raw)
    for f, r in zip(floats, raw):
        torch.testing.assert_close(norm(r[None])[0], f)


def test_multicrop_probabilities(monkeypatch):
    """Blur p 1 / .1 / .5 and solarize p 0 / .2 / 0 for global crop 1 / global crop 2 / local crops."""
    import util.multicrop as mc
    seen = {"blur": [], "solar": []}
    current = {"i": 0}
    real_blur, real_solarize = mc.ImageFilter.GaussianBlur, mc.ImageOps.solarize

    def blur(radius):
        assert 0.1 <= radius <= 2.0
        seen["blur"].append(current["i"])
        return real_blur(radius)

    def solarize(im, threshold):
        assert threshold == 128
        seen["solar"].append(current["i"])
        return real_solarize(im, threshold)
    monkeypatch.setattr(mc.ImageFilter, "GaussianBlur", blur)
    monkeypatch.setattr(mc.ImageOps, "solarize", solarize)
    t = mc.MultiCropTransform(global_size=8, local_size=8, local_crops_number=1)
    real_crop = t.crop

    def counting_crop(im, recipe, g):
        out = real_crop(im, recipe, g)
        current["i"] = (current["i"] + 1) % 3
        return out
    t.crop = counting_crop
    n = 400
    image, g = _image(size=(16, 16)), torch.Generator().manual_seed(0)
    for _ in range(n):
        t(image, g)
    blur_rate = [seen["blur"].count(i) / n for i in range(3)]
    solar_rate = [seen["solar"].count(i) / n for i in range(3)]
    assert blur_rate[0] == 1.0 and abs(blur_rate[1] - 0.1) < 0.05 and abs(blur_rate[2] - 0.5) < 0.08
    assert solar_rate[0] == 0 and abs(solar_rate[1] - 0.2) < 0.06 and solar_rate[2] == 0
    with pytest.raises(UserError, match="global_crops_scale"):
        mc.MultiCropTransform(global_crops_scale=(0.5, 0.2))


def test_multicrop_dataset_masks_and_skip(tmp_path):
    from util.multicrop import MultiCropDataset, MultiCropTransform
    from util.skipping import SkippedSample
    files = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        _image(i).save(p)
        files.append(str(p))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    files.append(str(bad))
    t = MultiCropTransform(global_size=32, local_size=16, local_crops_number=2)
    ds = MultiCropDataset(files, t, iBOTMasker(0.5, 0.0, "rand"), patch_size=8, seed=3, bad_image="skip")
    s = ds[(2, 1)]
    assert [tuple(c.shape) for c in s["crops"]] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert [tuple(m.shape) for m in s["masks"]] == [(4, 4)] * 2 and all(m.sum() == 8 for m in s["masks"])
    again = ds[(2, 1)]
    assert all(torch.equal(a, b) for a, b in zip(s["crops"] + s["masks"], again["crops"] + again["masks"]))
    assert not torch.equal(ds[(3, 1)]["crops"][0], s["crops"][0])  # a new epoch, new crops
    assert isinstance(ds[(0, 3)], SkippedSample)
    batch = torch.utils.data.default_collate([ds[(0, 0)], ds[(0, 1)]])
    assert batch["crops"][0].shape == (2, 3, 32, 32) and batch["masks"][1].shape == (2, 4, 4)


# ---------------------------------------------------------------- networks and reference checkpoints

def _tiny(teacher=False, **kw):
    return mi.ibot_vit_micro_patch8(img_size=32, out_dim=24, patch_out_dim=24, shared_head=True,
                                    teacher=teacher, **kw)


def test_wrapper_groups_resolutions_and_masks():
    torch.manual_seed(0)
    student = _tiny().eval()
    g = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    loc = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    masks = [torch.rand(2, 4, 4) > 0.5 for _ in range(2)]
    out = student(g + loc, masks)
    assert out.cls.shape == (4, 24) and out.patch.shape == (4, 16, 24)
    assert out.local_cls.shape == (6, 24) and out.features.shape == (4, 64)
    # the same as running each crop alone (the batching changes nothing)
    alone = student([g[1]], [masks[1]])
    torch.testing.assert_close(alone.cls, out.cls[2:], atol=1e-5, rtol=1e-5)
    local_alone = student.head(student.backbone.forward_features(loc[2])[:, 0])
    torch.testing.assert_close(local_alone, out.local_cls[4:], atol=1e-5, rtol=1e-5)
    # masking changes the masked crops' outputs; no masks = plain forward
    plain = student(g)
    assert plain.local_cls is None and not torch.allclose(plain.patch, out.patch)
    teacher = _tiny(teacher=True)
    assert not hasattr(teacher.backbone, "masked_embed") and teacher.head.last_layer.weight_g.requires_grad is False


def test_factories_and_family():
    from util.family import family_of
    from util.registry import create_model
    m = create_model("ibot_vit_tiny_patch16", out_dim=32, patch_out_dim=16)
    assert m.backbone.embed_dim == 192 and len(m.backbone.blocks) == 12 and m.head.last_layer2.weight_v.shape == (16, 256)
    spec = family_of(m)
    assert spec.name == "ibot" and spec.states == ("student", "teacher", "ibot_loss")
    assert spec.marks(["head.last_layer.weight_g"]) and not spec.marks(["blocks.0.attn.qkv.weight"])
    assert mi.ibot_vit_base_patch16 is not None and mi.ibot_vit_large_patch16 is not None


def test_reference_layout_checkpoint_loads_strictly(tmp_path):
    from util.checkpoint import load_file
    torch.manual_seed(0)
    student, teacher = _tiny(drop_path_rate=0.1), _tiny(teacher=True)
    teacher.load_state_dict(student.state_dict(), strict=False)  # the reference's teacher start
    with torch.no_grad():
        student.backbone.masked_embed.normal_()
        student.head.last_layer.weight_v.mul_(3.0)
    loss = _loss(out_dim=24, patch_out_dim=24)
    loss.center.normal_()
    loss.center2.normal_()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad])
    # What the reference scripts write (plain torch, reference key names): a DDP student, a bare teacher.
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": {f"module.{k}": v for k, v in student.state_dict().items()},
                "teacher": dict(teacher.state_dict()), "optimizer": opt.state_dict(), "epoch": 7,
                "args": argparse.Namespace(arch="vit_micro", out_dim=24), "ibot_loss": dict(loss.state_dict()),
                "fp16_scaler": None}, path)
    ckpt = load_file(str(path))
    assert "head.last_layer.weight_g" in ckpt["teacher"] and "head.last_layer2.weight_v" in ckpt["teacher"]
    assert "module.backbone.masked_embed" in ckpt["student"] and "backbone.masked_embed" not in ckpt["teacher"]
    torch.manual_seed(1)
    s2, t2 = _tiny(drop_path_rate=0.1), _tiny(teacher=True)
    s2.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["student"].items()}, strict=True)
    t2.load_state_dict(ckpt["teacher"], strict=True)
    l2 = _loss(out_dim=24, patch_out_dim=24)
    l2.load_state_dict(ckpt["ibot_loss"], strict=True)
    assert torch.equal(l2.center2, loss.center2)
    x, masks = [torch.randn(2, 3, 32, 32)] * 2, [torch.rand(2, 4, 4) > 0.5] * 2
    for a, b, m in ((student, s2, masks), (teacher, t2, None)):
        a.eval(), b.eval()
        oa, ob = a(x, m), b(x, m)
        assert torch.equal(oa.cls, ob.cls) and torch.equal(oa.patch, ob.patch)


def test_legacy_weight_norm_head_file_loads():
    # A head saved with torch's legacy weight_norm (what the released files were written with).
    legacy = nn.Linear(8, 6, bias=False)
    with pytest.warns(FutureWarning):
        legacy = torch.nn.utils.weight_norm(legacy)
    with torch.no_grad():
        legacy.weight_g.uniform_(0.5, 2.0)
    ours = mi.WeightNormLinear(8, 6)
    ours.load_state_dict(legacy.state_dict(), strict=True)
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), legacy(x))


def test_teacher_checkpoint_loads_into_a_classifier(tmp_path):
    import models_vit
    from util.checkpoint import load_pretrained_encoder
    student, teacher = _tiny(), _tiny(teacher=True)
    path = tmp_path / "ibot.pth"
    torch.save({"student": {f"module.{k}": v for k, v in student.state_dict().items()},
                "teacher": teacher.state_dict(), "epoch": 3}, path)
    for key, src in (("teacher", teacher), ("student", student)):
        clf = models_vit.vit_micro_patch8(img_size=32, num_classes=3, global_pool=False)
        report = load_pretrained_encoder(clf, str(path), checkpoint_key=key)
        assert sorted(report["missing"]) == ["head.bias", "head.weight"]
        assert torch.equal(clf.blocks[1].mlp.fc2.weight, src.backbone.blocks[1].mlp.fc2.weight)
        assert all(k.startswith(("head.", "masked_embed")) for k in report["unexpected"] + report["dropped_head"])
