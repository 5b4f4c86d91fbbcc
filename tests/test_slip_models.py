"""SLIP / CLIP / SimCLR models, CLIP's tokenizer and the contrastive losses.

- tokenizer: ids equal CLIP's (fixed ids of the released vocabulary), SOT/EOT and zero padding, a cut
  caption keeps EOT and is counted, the SLIP compat cut loses it;
- losses: equal to the formulas written out element by element on fixed embeddings;
- gradients: 2 gloo processes x b rows give the gradients of 1 process x 2b rows (and a gather without
  gradient would not);
- checkpoints: a file written by a plain torch script with SLIP's key names (`module.visual.*`,
  `module.transformer.*`, `module.image_mlp.*`, in the releases' order) loads strictly, and the text
  embedding equals a hand computation of the text tower; the vision tower of that file loads into a
  finetuning ViT; the MoCo v3 ViT-S builds through the registry and the finetuning model builder.
"""
from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import models_slip
from conftest import free_port
# The 2-process half lives in a small module, so each spawned process imports only torch and util.
from slip_gather_worker import B_LOCAL, global_batch, objective, params, rank_worker
from util.checkpoint import load_file, load_pretrained_encoder
from util.contrastive import clamp_logit_scale, clip_loss, gather_with_grad, siglip_loss, simclr_loss
from util.registry import create_model, is_registered
from util.tokenizer import get_tokenizer, tokenize

SOT, EOT = 49406, 49407


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_ids_are_clips():
    tok = get_tokenizer()
    assert tok.vocab_size == 49408 and (tok.sot_id, tok.eot_id) == (SOT, EOT)
    # Ids of OpenAI CLIP's BPE for these captions (as open_clip's SimpleTokenizer encodes them).
    assert tok.encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]
    assert tok.encode("Chest X-ray: bilateral   pleural effusion, 5mm nodule!") == \
        [10563, 343, 268, 3077, 281, 25599, 926, 33948, 1490, 9364, 267, 276, 2848, 578, 691, 579, 256]
    assert tok.encode("Hello  World &amp; x-ray!") == [3306, 1002, 261, 343, 268, 3077, 256]
    assert tok.encode("café naïve résumé 日本") == [15304, 1097, 35689, 563, 29106, 7054, 4166, 39121, 19277, 361]
    assert tok.decode(tok.encode("Chest X-ray")) == "chest x - ray"


def test_tokenize_pads_and_keeps_eot_when_cut():
    ids, cut = tokenize(["a photo of a cat.", ""])
    assert ids.dtype == torch.long and ids.shape == (2, 77) and cut == 0
    assert ids[0, :8].tolist() == [SOT, 320, 1125, 539, 320, 2368, 269, EOT]
    assert ids[0, 8:].eq(0).all() and ids[1, :2].tolist() == [SOT, EOT] and ids[1, 2:].eq(0).all()
    long = "nodule " * 100
    ids, cut = tokenize(["a cat", long, long], context_length=16)
    assert cut == 2 and ids.shape == (3, 16)
    assert ids[1, 0] == SOT and ids[1, -1] == EOT and ids[1, 1:-1].ne(EOT).all()
    assert ids[1].argmax() == 15  # the text tower pools at EOT
    compat, cut = tokenize([long], context_length=16, compat_truncate=True)
    assert cut == 1 and EOT not in compat[0].tolist()  # SLIP's cut: EOT lost, pooling lands on a word
    with pytest.raises(ValueError):
        tokenize(["x"], context_length=1)


# ---------------------------------------------------------------- losses vs formulas

def _fixed(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _ce(row: list[float], target: int) -> float:
    m = max(row)
    return -(row[target] - m - math.log(sum(math.exp(x - m) for x in row)))


def test_clip_loss_formula():
    img, txt = _fixed(5, 6, 0), _fixed(5, 6, 1)
    txt[2] = img[2] * 3 + 0.01  # one clear match
    scale = 7.5
    I = [_unit(r) for r in img.tolist()]
    T = [_unit(r) for r in txt.tolist()]
    n = len(I)
    li = [_ce([scale * _dot(I[i], T[j]) for j in range(n)], i) for i in range(n)]
    lt = [_ce([scale * _dot(T[i], I[j]) for j in range(n)], i) for i in range(n)]
    want = (sum(li) / n + sum(lt) / n) / 2
    acc = 100 * sum(max(range(n), key=lambda j: _dot(I[i], T[j])) == i for i in range(n)) / n
    loss, got_acc = clip_loss(img, txt, torch.tensor(scale))
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert got_acc.item() == pytest.approx(acc)


def test_simclr_loss_formula():
    a, b = _fixed(4, 5, 2), _fixed(4, 5, 3)
    tau = 0.1
    A = [_unit(r) for r in a.tolist()]
    B = [_unit(r) for r in b.tolist()]
    n = len(A)

    def side(X, Y):  # candidates of row i: every Y row (positive i), then every other X row
        return [_ce([_dot(X[i], Y[j]) / tau for j in range(n)] +
                    [_dot(X[i], X[j]) / tau if j != i else -1e9 for j in range(n)], i) for i in range(n)]
    want = (sum(side(A, B)) / n + sum(side(B, A)) / n) / 2
    loss, _ = simclr_loss(a, b, temperature=tau)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # identical views: positives dominate once the temperature is small
    assert simclr_loss(a, a, 0.01)[1].item() == 100


def test_siglip_loss_formula():
    img, txt = _fixed(4, 6, 4), _fixed(4, 6, 5)
    scale, bias = 10.0, -10.0
    I = [_unit(r) for r in img.tolist()]
    T = [_unit(r) for r in txt.tolist()]
    n = len(I)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = (1 if i == j else -1) * (scale * _dot(I[i], T[j]) + bias)
            total += math.log(1 + math.exp(-z))  # -log sigmoid(z)
    loss, _ = siglip_loss(img, txt, torch.tensor(scale), torch.tensor(bias))
    assert loss.item() == pytest.approx(total / n, rel=1e-5)


def test_gather_is_identity_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x


# ---------------------------------------------------------------- 1 x 2b == 2 x b

def test_gradients_equal_for_one_process_and_two(tmp_path):
    mp.spawn(rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    full = {k: v.clone().requires_grad_() for k, v in global_batch().items()}
    proj, scale, bias = params()
    loss = objective(full, proj, scale, bias)
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for name, g in (("proj", proj.grad), ("scale", scale.grad), ("bias", bias.grad)):
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6)
    # each input row's gradient is the sum of both processes' loss gradients: twice the 1-process mean's
    for name, leaf in full.items():
        got = torch.cat([ranks[0]["inputs"][name], ranks[1]["inputs"][name]])
        torch.testing.assert_close(got / 2, leaf.grad, rtol=1e-4, atol=1e-7)


def test_a_gather_without_gradient_differs():
    """The comparison above can fail: treating the other half's columns as constants (SLIP's CLIP
    gather) changes the parameter gradient."""
    full = global_batch()
    proj, scale, _ = params()
    img, txt = full["img"] @ proj, full["txt"] @ proj
    clip_loss(img, txt, scale.exp())[0].backward()
    exact = proj.grad.clone()
    proj.grad = None
    img, txt = full["img"] @ proj, full["txt"] @ proj
    halves = []
    for r in range(2):
        rows = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
        i, t = F.normalize(img[rows], dim=-1), F.normalize(txt[rows], dim=-1)
        all_t, all_i = F.normalize(txt, dim=-1).detach(), F.normalize(img, dim=-1).detach()
        all_t[rows], all_i[rows] = t, i
        labels = torch.arange(B_LOCAL) + r * B_LOCAL
        halves.append((F.cross_entropy(scale.exp() * i @ all_t.t(), labels) +
                       F.cross_entropy(scale.exp() * t @ all_i.t(), labels)) / 2)
    (sum(halves) / 2).backward()
    assert not torch.allclose(proj.grad, exact, rtol=1e-3)


# ---------------------------------------------------------------- models and SLIP checkpoints

def test_factories_registered_with_slips_sizes():
    for kind in ("SLIP", "CLIP", "SIMCLR"):
        for size in ("S", "B", "L"):
            assert is_registered(f"{kind}_VIT{size}16") and callable(getattr(models_slip, f"{kind}_VIT{size}16"))
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in create_model(name).parameters())
                  for name in ("SLIP_VITB16", "CLIP_VITB16", "SIMCLR_VITB16", "SLIP_VITS16")}
    # SLIP's published parameter counts
    assert {k: round(v / 1e6, 1) for k, v in counts.items()} == \
        {"SLIP_VITB16": 170.6, "CLIP_VITB16": 149.6, "SIMCLR_VITB16": 106.8, "SLIP_VITS16": 104.7}


# The micro configuration: ViT D 64, depth 2, 4 heads, patch 8 at 32 px; text width 64, 2 layers, 4 heads.
D, DEPTH, W, LAYERS, HEADS, CTX, VOCAB, EMB, MLP, SSL = 64, 2, 64, 2, 4, 77, 49408, 32, 128, 32


def _slip_layout() -> list[tuple[str, tuple[int, ...]]]:
    """SLIP's keys (without `module.`) in the order its state_dict lists them, written out from the
    release layout: the model's own parameters first, then its submodules' in registration order."""
    visual = [("visual.cls_token", (1, 1, D)), ("visual.pos_embed", (1, 17, D)),
              ("visual.patch_embed.proj.weight", (D, 3, 8, 8)), ("visual.patch_embed.proj.bias", (D,))]
    for i in range(DEPTH):
        p = f"visual.blocks.{i}."
        visual += [(p + "norm1.weight", (D,)), (p + "norm1.bias", (D,)), (p + "attn.qkv.weight", (3 * D, D)),
                   (p + "attn.qkv.bias", (3 * D,)), (p + "attn.proj.weight", (D, D)), (p + "attn.proj.bias", (D,)),
                   (p + "norm2.weight", (D,)), (p + "norm2.bias", (D,)), (p + "mlp.fc1.weight", (4 * D, D)),
                   (p + "mlp.fc1.bias", (4 * D,)), (p + "mlp.fc2.weight", (D, 4 * D)), (p + "mlp.fc2.bias", (D,))]
    visual += [("visual.norm.weight", (D,)), ("visual.norm.bias", (D,))]
    text = []
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        text += [(p + "attn.in_proj_weight", (3 * W, W)), (p + "attn.in_proj_bias", (3 * W,)),
                 (p + "attn.out_proj.weight", (W, W)), (p + "attn.out_proj.bias", (W,)),
                 (p + "ln_1.weight", (W,)), (p + "ln_1.bias", (W,)), (p + "mlp.c_fc.weight", (4 * W, W)),
                 (p + "mlp.c_fc.bias", (4 * W,)), (p + "mlp.c_proj.weight", (W, 4 * W)),
                 (p + "mlp.c_proj.bias", (W,)), (p + "ln_2.weight", (W,)), (p + "ln_2.bias", (W,))]
    text += [("token_embedding.weight", (VOCAB, W)), ("ln_final.weight", (W,)), ("ln_final.bias", (W,))]
    mlp = []
    for layer, (i, o) in (("layer1", (D, MLP)), ("layer2", (MLP, MLP))):
        bn = "bn" + layer[-1]
        mlp += [(f"image_mlp.{layer}.weight", (o, i)), (f"image_mlp.{layer}.bias", (o,))]
        mlp += [(f"image_mlp.{bn}.{n}", (o,)) for n in ("weight", "bias", "running_mean", "running_var")]
        mlp += [(f"image_mlp.{bn}.num_batches_tracked", ())]
    mlp += [("image_mlp.layer3.weight", (SSL, MLP)), ("image_mlp.layer3.bias", (SSL,))]
    own = [("positional_embedding", (CTX, W)), ("image_projection", (D, EMB)), ("text_projection", (W, EMB)),
           ("logit_scale", ())]
    return own + visual + text + mlp


@pytest.fixture(scope="module")
def slip_file(tmp_path_factory) -> str:
    """A SLIP training checkpoint as the releases store it, written with plain torch."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in _slip_layout():
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(5)
        elif name.endswith("running_var"):
            sd[name] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[name] = torch.randn(shape, generator=g) * 0.2
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    path = str(tmp_path_factory.mktemp("slip") / "checkpoint_best.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {}, "scaler": {}, "args": {"model": "SLIP_VIT_MICRO"}}, path)
    return path


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _text_by_hand(sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """CLIP's text tower written out: causal multi-head attention from in_proj (rows q|k|v), QuickGELU,
    final LN, the feature at EOT (the largest id) times text_projection."""
    n, length = ids.shape
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:length]
    hd = W // HEADS
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        h = _ln(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        qkv = h @ sd[p + "attn.in_proj_weight"].t() + sd[p + "attn.in_proj_bias"]
        q, k, v = (t.reshape(n, length, HEADS, hd).transpose(1, 2) for t in qkv.split(W, dim=-1))
        att = q @ k.transpose(-1, -2) / math.sqrt(hd)
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        att = att.masked_fill(future, float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(n, length, W)
        x = x + o @ sd[p + "attn.out_proj.weight"].t() + sd[p + "attn.out_proj.bias"]
        h = _ln(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = h @ sd[p + "mlp.c_fc.weight"].t() + sd[p + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ sd[p + "mlp.c_proj.weight"].t() + sd[p + "mlp.c_proj.bias"]
    x = _ln(x, sd["ln_final.weight"], sd["ln_final.bias"])
    eot = [row.tolist().index(EOT) for row in ids]
    return torch.stack([x[r, e] for r, e in enumerate(eot)]) @ sd["text_projection"]


def test_slip_checkpoint_loads_strictly_and_text_matches_hand_computation(slip_file):
    ckpt = load_file(slip_file)
    model = create_model("SLIP_VIT_MICRO", img_size=32).eval()
    models_slip.load_slip_state_dict(model, ckpt["state_dict"])  # strict
    sd = models_slip.slip_state_dict(ckpt["state_dict"])
    assert list(model.state_dict()) == [k for k, _ in _slip_layout()]  # same order: positional optimizer states
    assert "attn_mask" not in model.state_dict() and "attn_mask" in dict(model.named_buffers())
    ids, _ = tokenize(["a mass in the left breast", "no finding", "calcification " * 3])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), _text_by_hand(sd, ids), rtol=1e-4, atol=1e-5)
        img = torch.randn(2, 3, 32, 32)
        out = model(img, ids[:2], img, img.flip(-1))
    assert set(out) == {"image_embed", "text_embed", "logit_scale", "aug1_embed", "aug2_embed"}
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    torch.testing.assert_close(out["image_embed"], model.visual(img) @ sd["image_projection"])
    assert out["aug1_embed"].shape == (2, SSL)
    # a CLIP model takes the same file minus the SimCLR head
    clip = create_model("CLIP_VIT_MICRO", img_size=32)
    missing, unexpected = models_slip.load_slip_state_dict(clip, ckpt["state_dict"], strict=False)
    assert not missing and unexpected and all(k.startswith("image_mlp.") for k in unexpected)


def test_text_layernorm_runs_in_fp32():
    ln = models_slip.LayerNormFp32(8)
    x = (torch.randn(2, 8) * 300).to(torch.bfloat16)
    y = ln(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.layer_norm(x.float(), (8,)).to(torch.bfloat16).float())


def test_slip_visual_tower_loads_into_a_finetuning_vit(slip_file):
    vit = create_model("vit_micro_patch8", img_size=32, num_classes=3, pool="cls")
    report = load_pretrained_encoder(vit, slip_file, flag="--finetune")
    assert sorted(report["missing"]) == ["head.bias", "head.weight"] and not report["unexpected"]
    slip = create_model("SLIP_VIT_MICRO", img_size=32).eval()
    models_slip.load_slip_state_dict(slip, load_file(slip_file)["state_dict"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_head(vit.forward_features(x), pre_logits=True), slip.visual(x))


def test_mocov3_vit_small_builds_for_finetuning():
    import finetune_setup
    vit = create_model("vit_small_mocov3_patch16", img_size=32, num_classes=0, pool="cls")
    assert vit.embed_dim == 384 and len(vit.blocks) == 12 and vit.blocks[0].attn.num_heads == 12
    assert models_slip.vision_tower_name("SLIP_VITS16") == "vit_small_mocov3_patch16"
    assert models_slip.vision_tower_name("CLIP_VITL16") == "vit_large_patch16"
    assert models_slip.vision_tower_name("SIMCLR_VIT_MICRO") == "vit_micro_patch8"
    assert models_slip.vision_tower_name("vit_base_patch16") is None
    args = argparse.Namespace(model="vit_small_mocov3_patch16", pool=None, global_pool=False, task_type="multiclass",
                              nb_classes=2, input_size=32, linprobe=False, drop_path=0.1)
    model = finetune_setup.build_classifier(args)
    assert model.head.out_features == 2 and model(torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_clamp_logit_scale_as_after_step_hook():
    model = create_model("CLIP_VIT_MICRO", img_size=32)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)

    class Wrapper(torch.nn.Module):  # a DDP-style wrapper: the hook finds the parameter under `.module`
        def __init__(self, m):
            super().__init__()
            self.module = m
    clamp_logit_scale(Wrapper(model), torch.tensor(1.0))
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    clamp_logit_scale(model, torch.tensor(0.0))
    assert model.logit_scale.item() == 0.0
    with pytest.raises(ValueError, match="logit_scale"):
        clamp_logit_scale(create_model("SIMCLR_VIT_MICRO", img_size=32))


def test_siglip_option_adds_a_bias_and_simclr_embeds_two_views():
    clip = create_model("CLIP_VIT_MICRO", img_size=32, siglip=True)
    ids, _ = tokenize(["a", "b"])
    img = torch.randn(2, 3, 32, 32)
    out = clip(img, ids)
    assert out["logit_bias"].item() == -10.0 and out["logit_scale"].item() == pytest.approx(10.0)
    assert "logit_bias" not in create_model("CLIP_VIT_MICRO", img_size=32).state_dict()
    simclr = create_model("SIMCLR_VIT_MICRO", img_size=32)
    assert set(simclr(img, img)) == {"aug1_embed", "aug2_embed"}
    with pytest.raises(ValueError, match="aug1 and aug2"):
        create_model("SLIP_VIT_MICRO", img_size=32)(img, ids, img)


def test_beit_flag_names_finetune_the_slip_visual_tower(slip_file, tmp_path, capsys):
    """`main_finetune.py --model_key state_dict --model_prefix module.visual.` (BEiT's names, as MedSLIP's
    finetuning commands write them) takes exactly the vision tower of a SLIP file; a prefix no key has is
    one line naming the flag."""
    import main_finetune
    from util.cli import run_main
    from util.synthetic import write_dataset
    data = tmp_path / "data"
    write_dataset(data, kind="ultrasound", layout="imagefolder", num_classes=2, n_per_class=8, size=32, seed=4)
    argv = ["--model", "vit_micro_patch8", "--finetune", str(slip_file), "--model_key", "state_dict",
            "--data_path", str(data), "--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--device", "cpu",
            "--bootstrap", "0", "--print_freq", "100", "--aa", "none", "--reprob", "0"]
    vit = create_model("vit_micro_patch8", img_size=32, num_classes=2, pool="cls")
    report = load_pretrained_encoder(vit, slip_file, checkpoint_key="state_dict", key_prefix="module.visual.")
    assert sorted(report["missing"]) == ["head.bias", "head.weight"] and not report["unexpected"]
    run_main(main_finetune.main, main_finetune.get_args_parser(),
             argv + ["--model_prefix", "module.visual.", "--output_dir", str(tmp_path / "ft")])
    assert (tmp_path / "ft" / "checkpoint-last.pth").is_file()
    with pytest.raises(SystemExit) as e:
        run_main(main_finetune.main, main_finetune.get_args_parser(),
                 argv + ["--model_prefix", "module.vision.", "--output_dir", str(tmp_path / "bad")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and "--model_prefix 'module.vision.'" in err[0], err
    assert not (tmp_path / "bad").exists()
