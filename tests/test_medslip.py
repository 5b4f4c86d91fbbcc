"""MedSLIP's own model (models_medclip.py): MedCLIP's towers under SLIP's objective.

Everything is built locally from tiny configurations (no download): a Hugging Face SwinModel from a tiny
SwinConfig (its keys converted to timm's must give the same pooled output), a 2-layer BERT from a tiny
BertConfig with a word-level vocab.txt written here, and MedSLIP/MedCLIP checkpoint files written by plain
torch with the reference key names. A short main_slip run with the tiny towers on the synthetic
colour/shape captions lowers the loss and writes MedSLIP's image_encoder.pth / text_encoder.pth."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import models_medclip as mm  # noqa: E402
from util.cli import UserError, parse_args  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("a an of on the photo image grey background red green blue circle square triangle ct x-ray chest "
         "showing nodule").split()


def _hf_swin(depths=(2, 2), image=32, seed=0):
    """A Hugging Face SwinModel from a tiny config, every parameter perturbed (no trivial LN / bias)."""
    torch.manual_seed(seed)
    cfg = transformers.SwinConfig(image_size=image, patch_size=4, num_channels=3, embed_dim=16, depths=list(depths),
                                  num_heads=[2 * 2 ** i for i in range(len(depths))], window_size=4)
    model = transformers.SwinModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _swin_kw(depths=(2, 2), image=32):
    return dict(img_size=image, embed_dim=16, depths=tuple(depths), num_heads=tuple(2 * 2 ** i for i in range(len(depths))),
                window_size=4)


def _as_v4_names(sd):
    """transformers 5 renamed Swin's attention keys; MedCLIP's files carry the 4.x names (and index buffers)."""
    out = {}
    for k, v in sd.items():
        for new, old in ((".attention.q_proj.", ".attention.self.query."), (".attention.k_proj.", ".attention.self.key."),
                         (".attention.v_proj.", ".attention.self.value."), (".attention.o_proj.", ".attention.output.dense."),
                         (".attention.relative_position_bias.relative_position_bias_table",
                          ".attention.self.relative_position_bias_table"),
                         (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense.")):
            k = k.replace(new, old)
        out[k] = v
        if k.endswith("attention.self.relative_position_bias_table"):
            out[k.replace("bias_table", "index")] = torch.zeros(49, dtype=torch.long)
    return out


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A local Hugging Face folder: tiny BertConfig (2 layers, width 32) + a word-level vocab.txt, no weights."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "-", "x", "ray"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64).save_pretrained(str(folder))
    return str(folder)


def _tiny_medslip(bert_dir, **kw):
    torch.manual_seed(0)
    return mm.MedSLIP_SWIN_MICRO(text_model=bert_dir, **kw)


# ------------------------------------------------------------------------------------------ vision
@pytest.mark.parametrize("v4_names", [False, True])
def test_hf_swin_keys_map_to_timm_with_equal_outputs(v4_names):
    """Three stages: two patch mergings move from the end of stage i to the start of stage i+1."""
    hf = _hf_swin(depths=(2, 2, 2), image=64)
    sd = {k: v for k, v in hf.state_dict().items()}
    if v4_names:
        sd = _as_v4_names(sd)
    tower = mm.build_medclip_vision("vit", **_swin_kw((2, 2, 2), 64)).eval()
    head = torch.randn(512, 64)
    tower.load_state_dict({**{"model." + k: v for k, v in sd.items()}, "projection_head.weight": head})
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = hf(pixel_values=x).pooler_output
        assert torch.allclose(tower(x, project=False), ref, atol=1e-5)
        assert torch.allclose(tower(x), ref @ head.T, atol=1e-4)
        assert torch.allclose(tower(x[:, :1]), tower(x[:, :1].expand(-1, 3, -1, -1)))  # grey input repeated


def test_patch_merging_channel_order_matters():
    """The conversion's channel permutation is needed: merging weights loaded unpermuted change the output."""
    hf = _hf_swin()
    sd = mm.hf_swin_to_timm(hf.state_dict())
    order = mm._merge_order(16)
    assert sorted(order.tolist()) == list(range(64))
    wrong = dict(sd)
    wrong["layers.1.downsample.reduction.weight"] = hf.state_dict()["encoder.layers.0.downsample.reduction.weight"][:, torch.randperm(64)]
    tower = mm.MedCLIPVisionSwin(**_swin_kw()).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        tower.model.load_state_dict(sd)
        good = tower(x, project=False)
        tower.model.load_state_dict(wrong)
        assert not torch.allclose(tower(x, project=False), good, atol=1e-3)
        assert torch.allclose(good, hf(pixel_values=x).pooler_output, atol=1e-5)


def test_build_medclip_vision_reads_every_file_layout(tmp_path):
    hf = _hf_swin()
    vision = {**{"model." + k: v for k, v in _as_v4_names(hf.state_dict()).items()}, "projection_head.weight": torch.randn(512, 32)}
    x = torch.rand(2, 3, 32, 32)
    ref = hf(pixel_values=x).pooler_output @ vision["projection_head.weight"].T
    files = {"image_encoder.pth": vision,
             "pytorch_model.bin": {**{"vision_model." + k: v for k, v in vision.items()}, "logit_scale": torch.tensor(2.6)},
             "checkpoint.pt": {"state_dict": {"module.MedCLIP_model.vision_model." + k: v for k, v in vision.items()},
                               "epoch": 3, "args": argparse.Namespace(model="SLIP_VITB16")}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        tower = mm.build_medclip_vision("swin", str(tmp_path / name), **_swin_kw()).eval()
        assert tower.out_dim == 512
        with torch.no_grad():
            assert torch.allclose(tower(x), ref, atol=1e-4), name
    with pytest.raises(UserError, match="resnet weights"):
        mm.build_medclip_vision("swin", str(tmp_path / "image_encoder.pth"))  # Swin-T sizes, not the tiny ones
    res = mm.build_medclip_vision("resnet", arch="resnet18")
    torch.save({"vision_model." + k: v for k, v in res.state_dict().items()}, tmp_path / "res.bin")
    loaded = mm.build_medclip_vision("resnet", str(tmp_path / "res.bin"), arch="resnet18").eval()
    assert loaded(torch.rand(2, 1, 32, 32)).shape == (2, 512) and not loaded.model.fc.bias
    with pytest.raises(UserError, match="choose vit"):
        mm.build_medclip_vision("convnext")


# -------------------------------------------------------------------------------------------- text
def test_text_pooling_and_projection_by_hand(bert_dir):
    torch.manual_seed(0)
    text = mm.MedCLIPTextBert(bert_dir).eval()
    masked = mm.MedCLIPTextBert(bert_dir, pooling="masked").eval()
    masked.load_state_dict(text.state_dict())
    ids = torch.tensor([[2, 5, 10, 11, 3, 0, 0, 0], [2, 7, 3, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        hs = text.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(hs) == 3  # embeddings + 2 layers: [1], [2] and [-1] = layer 1, layer 2, layer 2
        layers = (hs[1] + hs[2] + hs[-1]) / 3
        w = text.projection_head.weight
        assert text.projection_head.bias is None and w.shape == (512, 32)
        assert torch.allclose(text(ids), layers.mean(1) @ w.T, atol=1e-5)  # padding positions included
        by_mask = torch.stack([layers[i, :int(mask[i].sum())].mean(0) for i in range(2)])
        assert torch.allclose(masked(ids), by_mask @ w.T, atol=1e-5)
        assert not torch.allclose(text(ids), masked(ids), atol=1e-3)
    assert not any(p.requires_grad for p in text.model.pooler.parameters())


def test_text_model_from_folder_weights_or_config_file(bert_dir, tmp_path):
    """A folder with weights loads them; a config.json alone gives random weights (tokenizer next to it)."""
    import shutil
    torch.manual_seed(1)
    bert = transformers.BertModel(transformers.BertConfig.from_pretrained(bert_dir))
    folder = tmp_path / "with_weights"
    bert.save_pretrained(str(folder))
    shutil.copy(os.path.join(bert_dir, "vocab.txt"), folder / "vocab.txt")
    loaded = mm.MedCLIPTextBert(str(folder))
    assert torch.equal(loaded.model.encoder.layer[1].output.dense.weight, bert.encoder.layer[1].output.dense.weight)
    fresh = mm.MedCLIPTextBert(os.path.join(str(folder), "config.json"))
    assert not torch.equal(fresh.model.encoder.layer[1].output.dense.weight, bert.encoder.layer[1].output.dense.weight)
    with pytest.raises(UserError, match="no config.json"):
        mm.MedCLIPTextBert(str(tmp_path))


def test_tokenize_matches_the_tokenizer_and_counts_cuts(bert_dir):
    from util.hf_text import HFTokenize, load_tokenizer
    tok = load_tokenizer(bert_dir)
    hf = HFTokenize(tok, 8)
    texts = ["a red circle", "a photo of a green square on a grey background"]
    ids, cut = hf(texts)
    ref = tok(texts, max_length=8, truncation=True, padding="max_length", return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ref) and cut == 1
    assert ids[1, -1] == tok.sep_token_id and ids[0, 0] == tok.cls_token_id and ids[0, -1] == tok.pad_token_id


def test_medclip_model_embeds_are_unit_vectors(bert_dir):
    torch.manual_seed(0)
    model = mm.MedCLIPModel(mm.build_medclip_vision("swin", **_swin_kw()), mm.MedCLIPTextBert(bert_dir))
    out = model(torch.rand(2, 3, 32, 32), torch.tensor([[2, 5, 3, 0], [2, 6, 7, 3]]))
    assert torch.allclose(out["image_embed"].norm(dim=-1), torch.ones(2)) and out["text_embed"].shape == (2, 512)
    assert torch.allclose(out["logit_scale"], torch.tensor(1 / 0.07))


# ------------------------------------------------------------------------------ MedSLIP checkpoints
def _reference_medslip_file(model, hf_swin, path):
    """A MedSLIP checkpoint.pt as the reference writes it (plain torch, its key names): SLIP's unused towers
    (vision_width 512), MedCLIP_model with a Hugging Face Swin (4.x names) and BERT's position_ids, under
    DDP's `module.`; plus epoch/optimizer/args."""
    ours = model.state_dict()
    sd = {"visual.cls_token": torch.zeros(1, 1, 768), "visual.blocks.0.attn.qkv.weight": torch.zeros(2304, 768),
          "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1536, 512), "token_embedding.weight": torch.zeros(49408, 512),
          "positional_embedding": torch.zeros(77, 512), "ln_final.weight": torch.ones(512), "ln_final.bias": torch.zeros(512),
          "image_projection": torch.zeros(512, 512), "text_projection": torch.zeros(512, 512)}
    sd.update({k: v.clone() + 0.01 for k, v in ours.items() if not k.startswith("MedCLIP_model.vision_model.model.")})
    sd.update({"MedCLIP_model.vision_model.model." + k: v for k, v in _as_v4_names(hf_swin.state_dict()).items()})
    sd["MedCLIP_model.text_model.model.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 1, "optimizer": {},
                "args": argparse.Namespace(model="SLIP_VITB16")}, path)
    return sd


def test_medslip_checkpoint_loads_strictly_ignoring_unused_towers(bert_dir, tmp_path):
    model = _tiny_medslip(bert_dir)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"logit_scale", "MedCLIP_model", "image_mlp"}  # no visual / transformer / token_embedding
    assert model.image_mlp.layer1.weight.shape == (128, 512)
    hf = _hf_swin()
    sd = _reference_medslip_file(model, hf, tmp_path / "checkpoint.pt")
    assert mm.load_medclip_weights(model, str(tmp_path / "checkpoint.pt")) == "medslip"
    assert torch.equal(model.image_mlp.layer1.weight, sd["image_mlp.layer1.weight"])
    assert torch.equal(model.MedCLIP_model.text_model.projection_head.weight, sd["MedCLIP_model.text_model.projection_head.weight"])
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = hf(pixel_values=x).pooler_output @ sd["MedCLIP_model.vision_model.projection_head.weight"].T
        assert torch.allclose(model.MedCLIP_model.vision_model(x), want, atol=1e-4)
        out = model(x, torch.tensor([[2, 9, 3, 0], [2, 8, 3, 0]]), x, x)
    assert set(out) == {"image_embed", "text_embed", "logit_scale", "aug1_embed", "aug2_embed"}
    assert out["aug1_embed"].shape == (2, 32) and torch.allclose(out["logit_scale"], sd["logit_scale"].exp())
    cleaned = mm.medslip_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state_dict"])
    assert not any(k.endswith("position_ids") or k.startswith(("visual.", "transformer.")) for k in cleaned)


def test_medclip_bin_loads_with_position_ids_dropped(bert_dir, tmp_path):
    model = _tiny_medslip(bert_dir)
    medclip = {k: v + 0.5 for k, v in model.MedCLIP_model.state_dict().items()}
    medclip["text_model.model.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save(medclip, tmp_path / "pytorch_model.bin")
    assert mm.load_medclip_weights(model, str(tmp_path / "pytorch_model.bin")) == "medclip"
    assert torch.equal(model.MedCLIP_model.logit_scale, medclip["logit_scale"])
    medclip["text_model.projection_head.bias"] = torch.zeros(512)
    torch.save(medclip, tmp_path / "odd.bin")
    with pytest.raises(UserError, match=r"odd.bin: does not fit MedCLIPModel .*projection_head.bias"):
        mm.load_medclip_weights(model, str(tmp_path / "odd.bin"))


def test_missing_transformers_is_one_line(bert_dir, monkeypatch):
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import models_medclip as mm, main_slip\n"
            "assert mm.build_medclip_vision('swin', img_size=32, **mm.SWIN_MICRO)(__import__('torch').rand(1, 3, 32, 32)).shape == (1, 512)\n"
            "from util.cli import UserError\n"
            "try:\n    mm.MedSLIP_SWIN_MICRO(text_model=sys.argv[1])\nexcept UserError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code, bert_dir], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip()
    assert line.startswith("ERR") and "transformers" in line and "pip install" in line and "\n" not in line


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    from util.captions import write_synthetic_captions, write_synthetic_zeroshot
    root = tmp_path_factory.mktemp("medslip_syn")
    meta = write_synthetic_captions(str(root), n=72, size=32, seed=0)
    val = root / "val.txt"
    with open(meta) as f:
        val.write_text("".join(f.readlines()[:20]))
    labels, templates = write_synthetic_zeroshot(str(root / "zs"), n_per_class=2, size=32, seed=1)
    return {"root": str(root), "meta": meta, "val": str(val), "zs": ["--zeroshot-data", str(root / "zs"),
            "--zeroshot-labels", labels, "--zeroshot-templates", templates]}


def run_slip(argv):
    import main_slip
    return main_slip.main(parse_args(main_slip.get_args_parser(), list(map(str, argv))))


def medslip_flags(syn, bert_dir, out, *extra):
    return ["--dataset", "roco", "--root", syn["root"], "--metadata", syn["meta"], "--model", "MedSLIP_SWIN_MICRO",
            "--text_model", bert_dir, "--context-length", 16, "--input-size", 32, "--batch-size", 24, "--lr", 2e-3,
            "--wd", 0.0, "--warmup-epochs", 0, "--lr-end", 2e-3, "--device", "cpu", "-j", 0, "--print-freq", 50,
            "--output-dir", out, *extra]


def test_medslip_run_lowers_loss_and_writes_encoders(syn, bert_dir, tmp_path):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stats = run_slip(medslip_flags(syn, bert_dir, out, "--epochs", 4, "--metadataval", syn["val"], "--root-val",
                                       syn["root"], "--norm", "medclip", "--eval-freq", 4, *syn["zs"]))
        # --evaluate reads the checkpoint back (strictly) and classifies the held-out images zero-shot again
        again = run_slip(["--evaluate", "--model", "MedSLIP_SWIN_MICRO", "--text_model", bert_dir, "--context-length", 16,
                          "--input-size", 32, "--norm", "medclip", "--device", "cpu", "-j", 0, "--resume",
                          out / "checkpoint-last.pth", "--output-dir", tmp_path / "eval", *syn["zs"]])
    finally:
        torch.set_num_threads(threads)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines() if line.startswith("{")]
    losses = [r["train_loss"] for r in log]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses
    assert "train_clip_loss" in log[0] and "train_ssl_loss" in log[0] and "val_loss" in log[0]
    assert 0 <= stats["zeroshot_top1"] <= 1 and "zeroshot_top1" in log[-1]
    assert again["zeroshot_top1"] == pytest.approx(stats["zeroshot_top1"])
    assert again["zeroshot_auroc"] == pytest.approx(stats["zeroshot_auroc"], abs=1e-6)
    # main_zeroshot.py takes the MedSLIP checkpoint too: its text model's tokenizer, context and normalisation
    import main_zeroshot
    zs = syn["zs"]
    res = main_zeroshot.main(parse_args(main_zeroshot.get_args_parser(), list(map(str, [
        "--resume", out / "checkpoint-last.pth", "--data_path", zs[1], "--labels", zs[3], "--templates", zs[5],
        "--output-dir", tmp_path / "zs", "--device", "cpu", "-j", 0, "--n_boot", 0]))))
    assert next(iter(res.values()))["top1"] == pytest.approx(stats["zeroshot_top1"])
    for name in ("image_encoder.pth", "text_encoder.pth", "best_image_encoder.pth", "best_text_encoder.pth"):
        assert (out / name).is_file(), name
    tower = mm.build_medclip_vision("swin", str(out / "image_encoder.pth"), **_swin_kw())
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=False)
    assert torch.equal(tower.projection_head.weight,
                       ckpt["state_dict"]["module.MedCLIP_model.vision_model.projection_head.weight"])
    assert ckpt["preprocessing"]["mean"] == [0.5863] * 3 and ckpt["args"]["context_length"] == 16
    assert not any(".visual." in k or "token_embedding" in k for k in ckpt["state_dict"])
    text = mm.MedCLIPTextBert(bert_dir)
    text.load_state_dict(torch.load(out / "text_encoder.pth", weights_only=True))
    best = json.loads((out / "best_encoders.json").read_text())
    assert best["val_loss"] == pytest.approx(min(r["val_loss"] for r in log))
    assert log[best["epoch"]]["val_loss"] == pytest.approx(best["val_loss"])
    # a resumed run keeps the best encoders unless it beats the interrupted run's best validation loss
    (out / "best_encoders.json").write_text(json.dumps({"epoch": best["epoch"], "val_loss": -1.0}))
    kept = (out / "best_image_encoder.pth").read_bytes()
    torch.set_num_threads(1)
    try:
        run_slip(medslip_flags(syn, bert_dir, out, "--epochs", 5, "--metadataval", syn["val"], "--root-val",
                               syn["root"], "--norm", "medclip", "--resume", out / "checkpoint-last.pth"))
    finally:
        torch.set_num_threads(threads)
    assert (out / "best_image_encoder.pth").read_bytes() == kept
    assert json.loads((out / "best_encoders.json").read_text())["val_loss"] == -1.0
    assert (out / "image_encoder.pth").read_bytes() != kept  # the latest encoders are still written


@pytest.mark.parametrize("extra, needle", [
    (["--text_model", "/no/such/folder"], "--text_model /no/such/folder: no such file or folder"),
    (["--text_model", "someone/not-cached-model"], "not in the Hugging Face cache"),
    (["--context-length", "100"], "--context-length 100: the text model"),
    (["--loss", "siglip"], "--loss siglip"),
    (["--medclip_weights", "/no/weights.bin"], "--medclip_weights /no/weights.bin: no such file"),
])
def test_bad_medslip_flags_are_one_line(syn, bert_dir, tmp_path, extra, needle, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = medslip_flags(syn, bert_dir, tmp_path / "o", "--epochs", 1)
    if extra[0] == "--text_model":
        argv[argv.index("--text_model") + 1] = extra[1]
        extra = []
    with pytest.raises(UserError) as e:
        run_slip([*argv, *extra])
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_text_flags_refused_for_slip_models(syn, tmp_path):
    with pytest.raises(UserError, match="belong to the MedSLIP_"):
        run_slip(["--dataset", "roco", "--root", syn["root"], "--metadata", syn["meta"], "--model", "SLIP_VIT_MICRO",
                  "--text_model", "x", "--device", "cpu", "--output-dir", tmp_path / "o", "--dry-run"])


def test_resnet_tower_keys_are_medclips(bert_dir, tmp_path):
    model = mm.MedSLIP_RESNET50(text_model=bert_dir, img_size=224, ssl_mlp_dim=16, ssl_emb_dim=8)
    sd = model.MedCLIP_model.state_dict()
    assert sd["vision_model.model.fc.weight"].shape == (512, 2048) and "vision_model.model.fc.bias" not in sd
    assert "vision_model.projection_head.weight" not in sd and sd["text_model.projection_head.weight"].shape == (512, 32)
    torch.save({k: v for k, v in sd.items()}, tmp_path / "medclip_resnet.bin")
    tower = mm.build_medclip_vision("resnet", str(tmp_path / "medclip_resnet.bin"))
    assert torch.equal(tower.model.fc.weight, sd["vision_model.model.fc.weight"])


def test_no_module_imports_transformers_at_import_time():
    """transformers is optional: only functions import it (util.hf_text), never a module's top level."""
    import ast
    offenders = []
    for folder, _, files in os.walk(REPO):
        if any(part.startswith(".") for part in os.path.relpath(folder, REPO).split(os.sep)) or "tests" in folder:
            continue
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                for node in tree.body:
                    mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                    offenders += [os.path.relpath(path, REPO) for m in mods if m.split(".")[0] == "transformers"]
    assert not offenders


def test_two_gloo_processes_train_medslip(syn, bert_dir, tmp_path):
    """DDP over 2 CPU processes with gradient accumulation (DDP's static graph is off then, so a parameter
    without a gradient would stop the run): the frozen BERT pooler and MedCLIP's unused logit scale take no
    part in the reduction, and rank 0 writes the checkpoint and the encoder files."""
    from conftest import describe, free_port, run_cmd
    out = tmp_path / "two"
    argv = medslip_flags(syn, bert_dir, out, "--epochs", 1, "--update-freq", 2)
    argv[argv.index("--batch-size") + 1] = 12
    two = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   "main_slip.py", *map(str, argv)], timeout=180)
    assert two.returncode == 0, describe(two)
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["resume_point"]["world_size"] == 2 and "module.MedCLIP_model.logit_scale" in ckpt["state_dict"]
    assert (out / "image_encoder.pth").is_file() and (out / "text_encoder.pth").is_file()
