"""Visualisation and explainability: util/explain.py, visualize_mae.py, explain.py,
embed_features.py and the two notebooks, on tiny models and scikit-image's real fundus photograph.

Everything runs in-process on CPU with one thread (the CI box has two cores and runs other suites).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import explain as explain_cli
import embed_features
import models_mae  # noqa: F401
import models_vit  # noqa: F401
import visualize_mae
from util.cli import run_main
from util.explain import (attention_rollout, chefer_relevance, embedding_view, explain, gradcam, keep_attention,
                          mask_scores, normalize_maps, overlay, upsample)
from util.registry import create_model
from models_tiny import train_classifier
from util.tiny import planted_lesion_images, save_classifier, save_mae, to_tensor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def retina_png(tmp_path_factory) -> Path:
    skdata = pytest.importorskip("skimage.data")
    path = tmp_path_factory.mktemp("retina") / "retina.png"
    Image.fromarray(skdata.retina()).resize((256, 256), Image.LANCZOS).save(path)
    return path


def retina_tensor(path: Path, size: int = 32) -> torch.Tensor:
    img = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC))
    return to_tensor(img[None])


def vit(pool: str = "cls", seed: int = 0, size: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("vit_micro_patch8", img_size=size, num_classes=2, pool=pool).eval()


@pytest.fixture(scope="module")
def lesion_model():
    """A micro ViT (cls pool, 32 px) trained for a few seconds to detect a planted bright disc."""
    data = planted_lesion_images(384, 32, seed=0)
    return train_classifier(data["images"], data["labels"], pool="cls", steps=200, seed=0)


# ------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("pool", ["cls", "mae_avg"])
def test_maps_shape_range_determinism(pool, retina_png):
    m = vit(pool)
    x = torch.cat([retina_tensor(retina_png), retina_tensor(retina_png).flip(-1)])
    for method in ("rollout", "chefer", "gradcam"):
        a, logits, targets = explain(m, x, method)
        b, _, _ = explain(m, x, method)
        maps = a[-1]
        assert maps.shape == (2, 4, 4) and maps.dtype == torch.float32
        assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
        assert torch.allclose(maps.amax(dim=(1, 2)), torch.ones(2))  # min-max normalised per image
        assert torch.equal(maps, b[-1]), method
        assert torch.equal(targets, logits.argmax(1))
    # per-class maps from one forward; the model is left as it was
    per_class, _, _ = chefer_relevance(m, x, classes=[0, 1])
    assert set(per_class) == {0, 1} and not torch.equal(per_class[0], per_class[1])
    assert all(not blk.attn.keep_attn and blk.attn.attn_probs is None for blk in m.blocks)
    assert all(p.grad is None for p in m.parameters()) and not m.training


def test_rollout_and_chefer_follow_their_definitions():
    """Recompute both maps from the probabilities (and retained gradients) `Attention.keep_attn` keeps."""
    m = vit("cls", seed=1)
    x = torch.randn(3, 3, 32, 32)
    with keep_attention(m) as layers:
        logits = m(x.requires_grad_(True))
        logits[:, 1].sum().backward()
        A = [layer.attn_probs.detach() for layer in layers]
        G = [layer.attn_probs.grad for layer in layers]
    eye = torch.eye(17).expand(3, 17, 17)
    roll, grad_rel = eye.clone(), eye.clone()
    for a, g in zip(A, G):
        a_hat = 0.5 * a.mean(1) + 0.5 * eye
        roll = (a_hat / a_hat.sum(-1, keepdim=True)) @ roll
        grad_rel = grad_rel + (g * a).clamp(min=0).mean(1) @ grad_rel
    ours_roll, _ = attention_rollout(m, x.detach())
    ours_chefer, _, _ = chefer_relevance(m, x.detach(), class_index=1)
    torch.testing.assert_close(ours_roll, normalize_maps(roll[:, 0, 1:].reshape(3, 4, 4)))
    torch.testing.assert_close(ours_chefer[-1], normalize_maps(grad_rel[:, 0, 1:].reshape(3, 4, 4)))
    # average-pooled models read the mean of the patch rows (no cls read-out)
    raw, _ = attention_rollout(m, x.detach(), readout="mean", normalize=False)
    torch.testing.assert_close(raw, roll[:, 1:, 1:].mean(1).reshape(3, 4, 4))
    # discarding weak attention keeps valid maps; a one-logit (sigmoid) head explains +-logit
    dropped, _ = attention_rollout(m, x.detach(), discard_ratio=0.9, head_fusion="max")
    assert dropped.shape == (3, 4, 4) and 0 <= float(dropped.min()) <= float(dropped.max()) <= 1
    one = create_model("vit_micro_patch8", img_size=32, num_classes=1, pool="cls").eval()
    pos, _, _ = chefer_relevance(one, x.detach(), class_index=1)
    assert pos[-1].shape == (3, 4, 4)


class BrightDetector(nn.Module):
    """A hand-set CNN: feature 0 fires on bright pixels, feature 1 on dark ones; logit c = mean of
    feature 1 - c. Grad-CAM of class 1 must equal the bright region exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([[1.0, 1, 1], [-1, -1, -1]]).view(2, 3, 1, 1))
            self.features[0].bias.copy_(torch.tensor([-1.5, 1.5]))
            self.head.weight.copy_(torch.tensor([[0.0, 1], [1, 0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_gradcam_on_conv_feature_maps():
    x = torch.full((1, 3, 16, 16), 0.2)
    x[:, :, 4:8, 9:13] = 0.9
    bright = torch.zeros(1, 16, 16)
    bright[:, 4:8, 9:13] = 1
    maps, _, targets = gradcam(BrightDetector(), x, classes=[0, 1])
    torch.testing.assert_close(maps[1], bright)
    torch.testing.assert_close(maps[0], 1 - bright)
    assert int(targets[0]) == 0  # the dark background dominates the means: predicted class 0


def test_convvit_maps_when_available(tmp_path):
    models_convmae = pytest.importorskip("models_convmae")  # noqa: F841
    from util.registry import is_registered
    if not is_registered("convvit_micro_patch16"):
        pytest.skip("models_convmae has no convvit_micro_patch16")
    torch.manual_seed(0)
    m = create_model("convvit_micro_patch16", img_size=64, num_classes=2).eval()
    x = torch.randn(2, 3, 64, 64)
    for method in ("gradcam", "rollout", "chefer"):
        maps = explain(m, x, method)[0][-1]
        assert maps.shape == (2, 4, 4) and 0 <= float(maps.min()) <= float(maps.max()) <= 1
    # explain.py on a ConvViT checkpoint in main_finetune's layout
    ckpt = save_classifier(m, str(tmp_path / "convvit.pth"), "convvit_micro_patch16", ["a", "b"])
    image = tmp_path / "x.png"
    Image.fromarray(planted_lesion_images(1, 64, seed=0)["images"][0]).save(image)
    res = run_main(explain_cli.main, explain_cli.get_args_parser(),
                   ["--checkpoint", ckpt, "--method", "gradcam", "--output_dir", str(tmp_path / "out"), str(image)])
    assert res["model"] == "convvit_micro_patch16" and (tmp_path / "out" / res["images"][0]["maps"]["gradcam:" + res[
        "images"][0]["predicted"]]).is_file()


def test_overlay_blends_over_denormalised_input(retina_png):
    x = retina_tensor(retina_png, 32)[0]
    heat = torch.linspace(0, 1, 16).view(4, 4)
    out = overlay(x, heat, alpha=0.5, mean=[0.5] * 3, std=[0.25] * 3)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    plain = overlay(x, heat, alpha=0.0, mean=[0.5] * 3, std=[0.25] * 3)
    expected = ((x * 0.25 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    np.testing.assert_allclose(plain, expected, atol=1)
    assert not np.array_equal(out, plain)
    up = upsample(heat[None], 32)
    assert up.shape == (1, 32, 32) and float(up.min()) >= 0 and float(up.max()) <= 1


# -------------------------------------------------------------------------------------- sanity check
def test_relevance_concentrates_on_planted_lesion(lesion_model):
    test = planted_lesion_images(48, 32, seed=123)
    x = to_tensor(test["images"])
    with torch.no_grad():
        accuracy = (lesion_model(x).argmax(1).numpy() == test["labels"]).mean()
    assert accuracy >= 0.9, accuracy
    pos = test["labels"] == 1
    xm, masks = x[pos], torch.from_numpy(test["masks"][pos])
    assert len(xm) >= 15
    for name, maps in (("chefer", chefer_relevance(lesion_model, xm, class_index=1)[0][-1]),
                       ("rollout", attention_rollout(lesion_model, xm)[0])):
        inside, outside = mask_scores(maps, masks)
        # seeds 0-5 give ratios 2.3-7.7 and 88-100% of images; the bounds leave room for other BLAS builds
        assert inside.mean() > 1.5 * outside.mean(), (name, inside.mean(), outside.mean())
        assert (inside > outside).float().mean() >= 0.75, (name, inside, outside)


# ---------------------------------------------------------------------------------------- explain.py
def test_explain_cli_writes_overlays_and_probabilities(lesion_model, retina_png, tmp_path, capsys):
    ckpt = save_classifier(lesion_model, str(tmp_path / "best.pth"), "vit_micro_patch8", ["no_lesion", "lesion"])
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    data = planted_lesion_images(2, 32, seed=7, positive_fraction=1.0)
    for i, img in enumerate(data["images"]):
        Image.fromarray(img).save(folder / "a" / f"{i}.png")
    out = tmp_path / "out"
    argv = ["--checkpoint", ckpt, "--method", "rollout", "chefer", "--all_classes", "--output_dir", str(out),
            str(folder), str(retina_png)]
    summary = run_main(explain_cli.main, explain_cli.get_args_parser(), argv)
    stems = ["a__0", "a__1", "retina"]
    for stem in stems:
        for name in (f"{stem}_rollout", f"{stem}_chefer_no_lesion", f"{stem}_chefer_lesion"):
            with Image.open(out / f"{name}.png") as im:  # input | overlay | colour bar, 32 px shown at 256
                assert 2 * 256 < im.size[0] < 2 * 256 + 200 and 256 < im.size[1] < 256 + 120 and im.mode == "RGB"
    report = json.loads((out / "explanations.json").read_text())
    assert report == json.loads(json.dumps(summary)) and [r["stem"] for r in report["images"]] == stems
    for rec in report["images"]:
        assert abs(sum(rec["probabilities"].values()) - 1) < 1e-4 and rec["predicted"] in ("no_lesion", "lesion")
    assert report["images"][0]["predicted"] == "lesion"
    # a named class, Grad-CAM, raw maps; then a one-line error for a bad class
    out2 = tmp_path / "out2"
    run_main(explain_cli.main, explain_cli.get_args_parser(),
             ["--checkpoint", ckpt, "--method", "gradcam", "--class_index", "lesion", "--save_npy", "--output_dir",
              str(out2), str(retina_png)])
    with Image.open(out2 / "retina_gradcam_lesion.png") as im:
        assert im.size[0] > 2 * 256
    run_main(explain_cli.main, explain_cli.get_args_parser(),
             ["--checkpoint", ckpt, "--method", "gradcam", "--bare", "--output_dir", str(tmp_path / "bare"),
              str(retina_png)])
    assert Image.open(next((tmp_path / "bare").glob("retina_gradcam_*.png"))).size == (32, 32)  # overlay alone
    raw = np.load(out2 / "retina_gradcam_lesion.npy")
    assert raw.shape == (32, 32) and raw.min() >= 0 and raw.max() <= 1
    with pytest.raises(SystemExit):
        run_main(explain_cli.main, explain_cli.get_args_parser(),
                 ["--checkpoint", ckpt, "--class_index", "7", "--output_dir", str(out2), str(retina_png)])
    assert "out of range" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- visualize_mae.py
@pytest.fixture(scope="module")
def mae_checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("mae")
    torch.manual_seed(0)
    m = create_model("mae_vit_micro_patch8", img_size=32)
    torch.manual_seed(0)
    npl = create_model("mae_vit_micro_patch8", img_size=32, norm_pix_loss=True)
    return {"ours": save_mae(m, str(d / "ours.pth"), "mae_vit_micro_patch8"),
            "published": save_mae(m, str(d / "published.pth"), "mae_vit_micro_patch8", layout="published"),
            "encoder_only": save_mae(m, str(d / "encoder.pth"), "mae_vit_micro_patch8", encoder_only=True,
                                     layout="published"),
            "norm_pix": save_mae(npl, str(d / "npl.pth"), "mae_vit_micro_patch8")}


def _visualize(ckpt: str, image: Path, out: Path, *extra: str) -> dict:
    argv = ["--checkpoint", ckpt, "--output_dir", str(out), *extra, str(image)]
    return run_main(visualize_mae.main, visualize_mae.get_args_parser(), argv)


def test_visualize_mae_figure_and_determinism(mae_checkpoints, retina_png, tmp_path):
    res = _visualize(mae_checkpoints["ours"], retina_png, tmp_path / "a", "--save_panels")
    fig = np.asarray(Image.open(tmp_path / "a" / "retina_mae.png"))
    scale = 5  # 32-px panels magnified to >= 160 px
    assert res["has_decoder"] and res["input_size"] == 32 and not res["notes"]
    assert fig.shape[1] == 4 * (32 * scale + 2) and 32 * scale + 2 < fig.shape[0] < 32 * scale + 2 + 120
    for view in ("original", "masked", "reconstruction", "pasted"):
        assert np.asarray(Image.open(tmp_path / "a" / f"retina_{view}.png")).shape == (32, 32, 3)
    # the published {'model': sd} layout is recognised from its keys and gives the same figure
    res2 = _visualize(mae_checkpoints["published"], retina_png, tmp_path / "b", "--norm_preset", "imagenet")
    assert res2["model"] == "mae_vit_micro_patch8"
    same = _visualize(mae_checkpoints["ours"], retina_png, tmp_path / "c")
    assert (tmp_path / "c" / "retina_mae.png").read_bytes() == (tmp_path / "a" / "retina_mae.png").read_bytes()
    _visualize(mae_checkpoints["ours"], retina_png, tmp_path / "d", "--seed", "11", "--mask_ratio", "0.85")
    assert (tmp_path / "d" / "retina_mae.png").read_bytes() != (tmp_path / "a" / "retina_mae.png").read_bytes()
    assert same["figures"] == [str(tmp_path / "c" / "retina_mae.png")]
    # the mask is the reference demos' `torch.manual_seed(seed); torch.rand(1, L)`, so a seed gives the same panel
    # as the MAE demo notebook, without touching the global RNG
    state = torch.get_rng_state()
    torch.manual_seed(11)
    assert torch.equal(visualize_mae.mask_noise(16, 11), torch.rand(1, 16))
    torch.set_rng_state(state)


def test_visualize_mae_encoder_only_checkpoint_draws_note(mae_checkpoints, retina_png, tmp_path, medfound_log):
    res = _visualize(mae_checkpoints["encoder_only"], retina_png, tmp_path)
    assert not res["has_decoder"] and "encoder-only" in res["notes"][0]
    assert "no decoder weights" in medfound_log.text
    fig = np.asarray(Image.open(tmp_path / "retina_mae.png"))
    assert fig.shape[1] == 2 * (32 * 5 + 2) and fig.shape[0] > 32 * 5 + 2 + 40  # original + masked, then the note
    note = fig[-30:]
    red = (note[..., 0] > 120) & (note[..., 1] < 80) & (note[..., 2] < 80)
    assert red.sum() > 50  # the note's text is drawn in the figure


def test_norm_pix_reconstruction_is_denormalised_per_patch(mae_checkpoints, retina_png):
    loaded = visualize_mae.load_mae(mae_checkpoints["norm_pix"])
    assert loaded.norm_pix_loss and any("norm_pix_loss" in n for n in loaded.notes)
    x, _ = visualize_mae.load_input(str(retina_png), 32, loaded.mean, loaded.std)
    _, views = visualize_mae.reconstruction_figure(loaded, x, mask_ratio=0.75, seed=2)
    noise = visualize_mae.mask_noise(16, 2)
    with torch.no_grad():
        _, z, mask = loaded.model(x, mask_ratio=0.75, noise=noise)  # per-patch z-scores
    target = models_mae.patchify(x, 8)
    expected = z * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    torch.testing.assert_close(models_mae.patchify(views["reconstruction"], 8), expected)
    mask = mask.bool()
    torch.testing.assert_close(models_mae.patchify(views["pasted"], 8)[~mask], target[~mask])
    torch.testing.assert_close(models_mae.patchify(views["pasted"], 8)[mask], expected[mask])
    assert int(mask.sum()) == 12


# --------------------------------------------------------------------------------------- embeddings
def test_embedding_view_and_cli(lesion_model, tmp_path):
    feats = np.random.default_rng(0).normal(size=(30, 64)) + np.repeat([[0.0], [3.0]], 15, axis=0)
    labels = np.repeat([0, 1], 15)
    for method in ("pca", "tsne"):
        coords = embedding_view(feats, labels, method, str(tmp_path / f"{method}.png"), class_names=["a", "b"])
        assert coords.shape == (30, 2) and np.isfinite(coords).all()
        assert Image.open(tmp_path / f"{method}.png").format == "PNG"
    np.testing.assert_allclose(embedding_view(feats, labels, "tsne"), embedding_view(feats, labels, "tsne"))
    # the CLI on an ImageFolder split, preprocessing from the classifier checkpoint
    ckpt = save_classifier(lesion_model, str(tmp_path / "best.pth"), "vit_micro_patch8", ["no_lesion", "lesion"])
    data = planted_lesion_images(16, 32, seed=9)
    for i, (img, lab) in enumerate(zip(data["images"], data["labels"])):
        (tmp_path / "data" / "test" / f"c{lab}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "data" / "test" / f"c{lab}" / f"{i}.png")
    res = run_main(embed_features.main, embed_features.get_args_parser(),
                   ["--checkpoint", ckpt, "--data_path", str(tmp_path / "data"), "--method", "pca", "--output_dir",
                    str(tmp_path / "emb")])
    assert res["n"] == 16 and res["dim"] == 64 and res["classes"] == ["c0", "c1"]
    assert (tmp_path / "emb" / "embedding_pca.png").is_file()
    rows = (tmp_path / "emb" / "embedding_pca.csv").read_text().splitlines()
    assert rows[0] == "path,label,x,y" and len(rows) == 17


# ---------------------------------------------------------------------------------------- notebooks
def test_notebooks_run_headless(tmp_path, monkeypatch, retina_png):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from concurrent.futures import ThreadPoolExecutor
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MEDFOUND_TRAIN_STEPS", "40")
    monkeypatch.setenv("MEDFOUND_IMAGES", str(retina_png))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    def run(name: str) -> Path:
        out = tmp_path / name
        out.mkdir()
        nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
        env = {**os.environ, "MEDFOUND_OUTPUT_DIR": str(out)}
        client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                         resources={"metadata": {"path": str(REPO / "notebooks")}})
        client.execute(env=env)
        return out

    with ThreadPoolExecutor(2) as pool:
        mae_out, expl_out = pool.map(run, ["mae_visualize", "explainability"])
    assert np.asarray(Image.open(mae_out / "retina_mae.png")).ndim == 3
    assert (expl_out / "retina_explained.png").is_file() and (expl_out / "embedding_pca.png").is_file()
