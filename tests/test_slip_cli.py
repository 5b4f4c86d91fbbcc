"""Image-text pretraining wiring (main_slip.py, main_zeroshot.py, eval_zeroshot.py, run_with_submitit.py) and
the caption readers (util.captions): every caption format, bad lines and empty captions / unreadable images
under both --bad_image policies, a short CLIP run on synthetic pairs whose captions name the colour and shape
of the drawn object (zero-shot accuracy well above chance on held-out images), SLIP's checkpoint layout,
exact kill/resume, zero-shot metrics files, SLIP's catalog entry point, one-line flag errors, instant --help.
Tiny towers (`*_VIT_MICRO`: ViT D 64 depth 2 patch 8, text width 64, 2 layers) at 32 px on CPU."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import child_env, describe, run_cmd, run_inprocess
from util.cli import UserError, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_tokenize(texts, context_length=77):
    """Tokenizer stand-in for reader tests: ids = word lengths (cut flagged beyond the context)."""
    ids = torch.zeros(len(texts), context_length, dtype=torch.long)
    cut = 0
    for i, t in enumerate(texts):
        row = [len(w) for w in t.split()][:context_length]
        cut += len(t.split()) > context_length
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, cut


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """180 ROCO-format training pairs and a held-out ImageFolder (9 colour x shape classes, 12 each)."""
    from util.captions import write_synthetic_captions, write_synthetic_zeroshot
    root = tmp_path_factory.mktemp("slip_syn")
    meta = write_synthetic_captions(str(root), n=180, size=32, seed=0)
    labels, templates = write_synthetic_zeroshot(str(root / "zs"), n_per_class=12, size=32, seed=1)
    return {"root": str(root), "meta": meta, "zs": str(root / "zs"), "labels": labels, "templates": templates}


def slip_flags(syn, out, *extra):
    return ["--dataset", "roco", "--root", syn["root"], "--metadata", syn["meta"], "--model", "CLIP_VIT_MICRO",
            "--input-size", "32", "--batch-size", "20", "--lr", "1e-3", "--wd", "0.05", "--warmup-epochs", "1",
            "--device", "cpu", "-j", "0", "--print-freq", "50", "--output-dir", str(out), *map(str, extra)]


def run_slip(argv):
    import main_slip
    return main_slip.main(parse_args(main_slip.get_args_parser(), list(map(str, argv))))


@pytest.fixture(scope="module")
def trained(syn, tmp_path_factory):
    """A 3-epoch CLIP run (27 steps) with the zero-shot monitor on the held-out images."""
    out = tmp_path_factory.mktemp("slip_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI subprocesses run: two threads on a shared 2-core box only contend
    try:
        stats = run_slip(slip_flags(syn, out, "--epochs", 3, "--zeroshot-data", syn["zs"], "--zeroshot-labels",
                                syn["labels"], "--zeroshot-templates", syn["templates"], "--eval-freq", 3))
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "stats": stats}


# ------------------------------------------------------------------------------------------ readers
def test_roco_lines(tmp_path):
    from util.captions import read_captions
    meta = tmp_path / "train.txt"
    meta.write_text("# comment\nROCO_001 CT of the chest  showing a nodule\n\nROCO_002.png\tX-ray, left hand\n")
    recs = read_captions("roco", str(tmp_path), str(meta))
    assert [r.path for r in recs] == [str(tmp_path / "images" / "ROCO_001.jpg"), str(tmp_path / "images" / "ROCO_002.png")]
    assert recs[0].captions == ("CT of the chest  showing a nodule",) and recs[1].captions == ("X-ray, left hand",)
    assert recs[1].where == f"{meta}:4"


def test_coco_json_groups_captions_and_picks_split_folder(tmp_path):
    from util.captions import read_captions
    meta = tmp_path / "captions_val2017.json"
    meta.write_text(json.dumps({"annotations": [{"image_id": 7, "caption": "a dog"}, {"image_id": 7, "caption": "a pet"},
                                                {"image_id": 12, "caption": "a cat"}]}))
    recs = read_captions("coco", str(tmp_path), str(meta))
    assert recs[0].path == str(tmp_path / "val2017" / "000000000007.jpg") and recs[0].captions == ("a dog", "a pet")
    assert len(recs) == 2


def test_csv_and_jsonl(tmp_path):
    from util.captions import read_captions
    (tmp_path / "a.csv").write_text('image,caption\nimg/1.jpg,"a red circle, small"\n/abs/2.png,a blue square\n')
    recs = read_captions("csv", str(tmp_path), str(tmp_path / "a.csv"))
    assert recs[0].path == str(tmp_path / "img" / "1.jpg") and recs[0].captions == ("a red circle, small",)
    assert recs[1].path == "/abs/2.png"
    (tmp_path / "a.jsonl").write_text('{"image_path": "1.jpg", "captions": ["x y", "z"]}\n\n{"file": "2.jpg", "text": "w"}\n')
    recs = read_captions("csv", str(tmp_path), str(tmp_path / "a.jsonl"))
    assert recs[0].captions == ("x y", "z") and recs[1].path == str(tmp_path / "2.jpg") and recs[1].where.endswith(":3")


def test_cc_arrays_structured_read_pickled_refused(tmp_path):
    from util.captions import read_captions
    arr = np.array([("0.jpg", "a tulip field"), ("1.jpg", "a car")], dtype=[("image_name", "U16"), ("captions", "U64")])
    np.save(tmp_path / "cc12m.npy", arr)
    recs = read_captions("cc12m", str(tmp_path), str(tmp_path / "cc12m.npy"))
    assert recs[1].path == str(tmp_path / "1.jpg") and recs[1].captions == ("a car",)
    np.save(tmp_path / "cc3m.npy", np.array([{"image_id": 1, "captions": ["x"]}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="only load through pickle.*--dataset csv"):
        read_captions("cc3m", str(tmp_path), str(tmp_path / "cc3m.npy"))
    (tmp_path / "yfcc15m.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(UserError, match="yfcc15m.*pickle"):
        read_captions("yfcc15m", str(tmp_path), str(tmp_path / "yfcc15m.pkl"))


@pytest.mark.parametrize("name,text,where", [
    ("a.csv", "image,caption\n1.jpg,ok\n2.jpg\n", "a.csv:3"),
    ("b.csv", "filename_x,words\n1.jpg,ok\n", "b.csv:1"),
    ("c.jsonl", '{"image": "1.jpg", "caption": "ok"}\n{"image": "2.jpg", "caption": \n', "c.jsonl:2"),
    ("d.jsonl", '{"image": "1.jpg"}\n', "d.jsonl:1"),
])
def test_bad_lines_are_one_line_errors_with_file_and_line(tmp_path, name, text, where):
    from util.captions import read_captions
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as e:
        read_captions("csv", str(tmp_path), str(tmp_path / name))
    assert where in str(e.value) and "\n" not in str(e.value)


def test_empty_caption_and_unreadable_image_under_both_policies(tmp_path):
    from util.captions import CaptionDataset, read_captions, write_synthetic_captions
    from util.skipping import SkippedSample
    meta = write_synthetic_captions(str(tmp_path), n=4, size=32)
    lines = Path(meta).read_text().splitlines()
    lines[1] = lines[1].split()[0] + "   "  # empty caption on line 2
    Path(meta).write_text("\n".join(lines) + "\n")
    (tmp_path / "images" / "syn_00002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=r"train.txt:2: empty caption.*--bad_image skip"):
        read_captions("roco", str(tmp_path), meta, "error")
    recs = read_captions("roco", str(tmp_path), meta, "skip")
    ds = CaptionDataset(recs, _fake_tokenize, size=32, bad_image="skip")
    assert isinstance(ds[1], SkippedSample) and "empty caption" in ds[1].reason
    assert isinstance(ds[2], SkippedSample) and ds[2].path.endswith("syn_00002.jpg")
    assert set(ds[0]) == {"index", "text", "cut", "image", "aug1", "aug2"} and ds[0]["image"].shape == (3, 32, 32)
    strict = CaptionDataset(recs, _fake_tokenize, size=32, bad_image="error")
    with pytest.raises(UserError, match="syn_00002.jpg.*--bad_image skip"):
        strict[2]


def test_samples_are_keyed_by_seed_epoch_index(syn):
    from util.captions import CaptionDataset, read_captions
    ds = CaptionDataset(read_captions("roco", syn["root"], syn["meta"])[:3], _fake_tokenize, size=32)
    a, b, c = ds[(1, 2)], ds[(1, 2)], ds[(2, 2)]
    assert torch.equal(a["aug1"], b["aug1"]) and not torch.equal(a["aug1"], c["aug1"])
    assert not torch.equal(a["aug1"], a["aug2"])


def test_overlong_caption_keeps_eot_unless_compat(tmp_path):
    from util.tokenizer import tokenize
    long = "a " * 100
    ids, cut = tokenize([long, "a red circle"])
    assert cut == 1 and ids[0, -1] == 49407 and ids[1].argmax() == 4
    ids, cut = tokenize([long], compat_truncate=True)
    assert cut == 1 and ids[0, -1] != 49407


def test_slip_schedule_warms_up_from_lr_start_then_cosine_to_lr_end():
    from engine_slip import SlipSchedule
    s = SlipSchedule(lr=1e-3, lr_start=1e-6, lr_end=1e-5, warmup_epochs=1, epochs=3, updates_per_epoch=10)
    assert s.at(0) == pytest.approx(1e-6) and s.at(0.9) == pytest.approx(1e-3)
    assert s.at(1.0) == pytest.approx(1e-3) and 1e-5 <= s.at(2.95) < 2e-5 and len(s.values) == 30
    assert all(a >= b for a, b in zip(s.values[10:], s.values[11:]))


# ------------------------------------------------------------------------------------------ training
def test_clip_training_raises_zero_shot_accuracy_well_above_chance(trained):
    chance = 1 / 9
    # 27 steps on 180 pairs: about 0.38 top-1 on the 108 held-out images (chance 0.11), macro AUROC about 0.9
    assert trained["stats"]["zeroshot_top1"] > 2.25 * chance and trained["stats"]["zeroshot_auroc"] > 0.8, trained["stats"]
    log = [json.loads(line) for line in (trained["out"] / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert log[-1]["train_loss"] < log[0]["train_loss"] and "train_clip_acc" in log[-1]


def test_checkpoint_has_slips_layout(trained):
    ckpt = torch.load(trained["out"] / "checkpoint-last.pth", weights_only=True)
    assert {"state_dict", "epoch", "optimizer", "scaler", "args", "resume_point"} <= set(ckpt)
    assert all(k.startswith("module.") for k in ckpt["state_dict"]) and "module.logit_scale" in ckpt["state_dict"]
    assert ckpt["epoch"] == 2 and ckpt["args"]["model"] == "CLIP_VIT_MICRO" and ckpt["args"]["ssl_scale"] == 1.0
    assert float(ckpt["state_dict"]["module.logit_scale"]) <= np.log(100) + 1e-6


def test_zeroshot_cli_writes_metrics_and_figures(trained, syn, tmp_path):
    import main_zeroshot
    out = tmp_path / "zs"
    argv = ["--resume", trained["out"] / "checkpoint-last.pth", "--data_path", syn["zs"], "--labels", syn["labels"],
            "--templates", syn["templates"], "--output-dir", out, "--device", "cpu", "-j", "0", "--n_boot", "50"]
    res = main_zeroshot.main(parse_args(main_zeroshot.get_args_parser(), list(map(str, argv))))
    m = json.loads((out / "zeroshot_metrics.json").read_text())
    assert res["zeroshot"]["top1"] == pytest.approx(trained["stats"]["zeroshot_top1"])
    for k in ("auroc", "f1", "precision", "recall", "precision_per_class", "recall_per_class"):
        assert m[k] is not None, k
    assert len(m["ci95"]["precision_per_class"]) == 9 and m["n"] == 108 and m["ci95"]["auroc"][0] <= m["auroc"] <= m["ci95"]["auroc"][1]
    assert (out / "confusion_zeroshot.png").stat().st_size > 0 and (out / "roc_zeroshot.png").stat().st_size > 0


def test_eval_zeroshot_reads_slips_catalog_from_cwd(trained, syn, tmp_path, monkeypatch):
    import eval_zeroshot
    import main_zeroshot
    (tmp_path / "dataset_catalog.json").write_text(json.dumps(
        {"shapes": {"path": syn["zs"], "type": "imagefolder", "train": "train", "test": "test"},
         "cifar10": {"path": "/nowhere", "type": "special"}}))
    labels = json.loads(Path(syn["labels"]).read_text())["synthetic"]
    (tmp_path / "labels.json").write_text(json.dumps({"shapes": [[c, c.replace(" ", " coloured ")] for c in labels],
                                                      "cifar10": ["x"]}))
    (tmp_path / "templates.json").write_text(json.dumps({"shapes": ["a {}"], "cifar10": ["{}"]}))
    monkeypatch.chdir(tmp_path)
    argv = ["--resume", str(trained["out"] / "checkpoint-last.pth"), "--device", "cpu", "-j", "0", "--n_boot", "0"]
    res = main_zeroshot.main(parse_args(eval_zeroshot.get_args_parser(), argv))
    assert list(res) == ["shapes"] and res["shapes"]["n"] == 108 and (tmp_path / "shapes_metrics.json").exists()


def test_slip_step_has_both_losses_and_bad_pairs_are_skipped(syn, tmp_path):
    from util.captions import write_synthetic_captions
    root = tmp_path / "data"
    meta = write_synthetic_captions(str(root), n=24, size=32, seed=3)
    (root / "images" / "syn_00005.jpg").write_bytes(b"broken")
    lines = Path(meta).read_text().splitlines()
    lines[7] = lines[7].split()[0]
    Path(meta).write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    flags = slip_flags(syn, out, "--epochs", 1, "--ssl-mlp-dim", 32, "--ssl-emb-dim", 16)
    flags[flags.index("--root") + 1], flags[flags.index("--metadata") + 1] = str(root), meta
    flags[flags.index("--model") + 1], flags[flags.index("--batch-size") + 1] = "SLIP_VIT_MICRO", "12"
    stats = run_slip(flags)
    assert stats["ssl_loss"] > 0 and stats["clip_loss"] > 0 and stats["skipped_images"] == 2
    assert stats["loss"] == pytest.approx(stats["clip_loss"] + stats["ssl_loss"], rel=1e-4)


def test_kill_then_auto_resume_matches_uninterrupted(syn, tmp_path):
    from util.captions import write_synthetic_captions
    meta = write_synthetic_captions(str(tmp_path / "d"), n=40, size=32, seed=5)

    def flags(out):
        f = slip_flags(syn, out, "--epochs", 2, "--save-every-steps", 1)
        f[f.index("--root") + 1], f[f.index("--metadata") + 1], f[f.index("--batch-size") + 1] = str(tmp_path / "d"), meta, "8"
        return [sys.executable, "main_slip.py", *f]
    full = run_inprocess("main_slip.py", flags(tmp_path / "full")[2:])
    assert full.returncode == 0, describe(full)
    killed = run_cmd(flags(tmp_path / "cut"), env=child_env(MEDFOUND_TEST_KILL_AT_UPDATE="7"))  # dies in update 7 (epoch 1, step 2)
    assert killed.returncode == -9, describe(killed)
    done = run_inprocess("main_slip.py", flags(tmp_path / "cut")[2:])
    assert done.returncode == 0 and "continuing epoch 1 at step 1" in done.stdout, describe(done)
    a = torch.load(tmp_path / "full" / "checkpoint-last.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "checkpoint-last.pth", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


# -------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("extra,needle", [
    (["--lr", "-1"], "--lr"), (["--betas", "0.9", "1.5"], "--betas"), (["--model", "NOPE_VITB16"], "NOPE_VITB16"),
    (["--dataset", "yfcc15m"], "pickle"), (["--metadata", "/no/such.txt"], "/no/such.txt"),
    (["--model", "SIMCLR_VIT_MICRO", "--loss", "siglip"], "siglip"),
    (["--zeroshot-data", "/x"], "--zeroshot-labels"),
])
def test_bad_flags_are_one_line(syn, tmp_path, capsys, extra, needle):
    import main_slip
    from util.cli import run_main
    with pytest.raises(SystemExit) as e:
        run_main(main_slip.main, main_slip.get_args_parser(), list(map(str, slip_flags(syn, tmp_path / "o") + extra)))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists(), "a failed start must leave nothing behind"


def test_zeroshot_class_count_mismatch_is_one_line(trained, syn, tmp_path, capsys):
    import main_zeroshot
    from util.cli import run_main
    (tmp_path / "l.json").write_text(json.dumps({"x": ["a", "b"]}))
    argv = ["--resume", str(trained["out"] / "checkpoint-last.pth"), "--data_path", syn["zs"], "--labels",
            str(tmp_path / "l.json"), "--templates", syn["templates"], "--dataset", "x", "--device", "cpu"]
    (tmp_path / "t.json").write_text(json.dumps({"x": ["a {}"]}))
    argv[argv.index(syn["templates"])] = str(tmp_path / "t.json")
    with pytest.raises(SystemExit):
        run_main(main_zeroshot.main, main_zeroshot.get_args_parser(), argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "9 class folders" in err and "2 classes" in err, err


def test_submitit_missing_says_how_to_use_torchrun(capsys, monkeypatch):
    import run_with_submitit
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        run_with_submitit.main(["--nodes", "2", "--ngpus", "4", "--partition", "p", "--model", "SLIP_VITB16",
                                "--lr", "3e-3"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "pip install submitit" in err and "torchrun --nproc_per_node=4 --nnodes=2" in err
    assert "main_slip.py --model SLIP_VITB16 --lr 3e-3" in err and "--partition" not in err


@pytest.mark.parametrize("script", ["main_slip.py", "main_zeroshot.py", "eval_zeroshot.py", "run_with_submitit.py"])
def test_help_is_instant_without_torch(script):
    code = ("import runpy, sys\nsys.argv = [%r, '--help']\ntry:\n    runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None)\nprint('TORCH' if 'torch' in sys.modules else 'NO_TORCH')"
            % (script, script))
    proc = run_cmd([sys.executable, "-c", code])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("NO_TORCH"), describe(proc)
    assert "usage:" in proc.stdout


def test_two_gloo_processes_equal_one_with_the_whole_batch(syn, tmp_path):
    """torchrun with 2 CPU processes x 4 pairs trains the same weights as 1 process x 8 pairs: each step sees
    the same pairs (rank-strided shards of one permutation, augmentations keyed by sample index) and the CLIP
    loss is over the gathered global batch."""
    from conftest import free_port
    from util.captions import write_synthetic_captions
    meta = write_synthetic_captions(str(tmp_path / "d"), n=32, size=32, seed=7)

    def flags(out, batch):
        f = slip_flags(syn, out, "--epochs", 1, "--warmup-epochs", 0)
        f[f.index("--root") + 1], f[f.index("--metadata") + 1], f[f.index("--batch-size") + 1] = str(tmp_path / "d"), meta, batch
        return ["main_slip.py", *f]
    one = run_inprocess("main_slip.py", flags(tmp_path / "one", "8")[1:])
    assert one.returncode == 0, describe(one)
    two = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   *flags(tmp_path / "two", "4")], timeout=180)
    assert two.returncode == 0, describe(two)
    a = torch.load(tmp_path / "one" / "checkpoint-last.pth", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint-last.pth", weights_only=True)
    assert b["resume_point"]["world_size"] == 2
    assert abs(json.loads((tmp_path / "one" / "log.txt").read_text())["train_loss"]
               - json.loads((tmp_path / "two" / "log.txt").read_text())["train_loss"]) < 1e-5
    for k, x in a["state_dict"].items():
        y = b["state_dict"][k]
        if k.endswith(("qkv.bias", "in_proj_bias")):
            # The key bias adds the same number to every logit of a softmax row: its exact gradient is 0, and
            # Adam scales the rounding noise left in its place up to lr-sized steps. Compare query and value.
            x, y = x.view(3, -1)[[0, 2]], y.view(3, -1)[[0, 2]]
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4, msg=k)


def test_siglip_loss_and_medslip_recipe(syn, tmp_path):
    """--loss siglip trains a learnable bias (starting at -10) and zero-shot loads it back; --recipe medslip
    fills MedSLIP's --dataset roco --lr 1e-4 --wd 1e-6 where the flags are not typed."""
    import main_zeroshot
    out = tmp_path / "sig"
    flags = [f for f in slip_flags(syn, out, "--epochs", 1, "--loss", "siglip", "--recipe", "medslip")]
    i = flags.index("--dataset")
    del flags[i:i + 2]
    i = flags.index("--wd")
    del flags[i:i + 2]
    stats = run_slip(flags)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["dataset"], cfg["lr"], cfg["wd"], cfg["loss"]) == ("roco", 1e-3, 1e-6, "siglip")  # --lr was typed
    sd = torch.load(out / "checkpoint-last.pth", weights_only=True)["state_dict"]
    assert "module.logit_bias" in sd and float(sd["module.logit_bias"]) != -10.0 and stats["clip_loss"] > 0
    model, _ = main_zeroshot.build_model(str(out / "checkpoint-last.pth"))
    assert model.logit_bias.item() == sd["module.logit_bias"].item()


def test_synthetic_caption_generator_command(tmp_path):
    proc = run_cmd([sys.executable, "-m", "util.captions", tmp_path / "demo", "--num", "9", "--per_class", "1"])
    assert proc.returncode == 0, describe(proc)
    lines = (tmp_path / "demo" / "train.txt").read_text().splitlines()
    assert len(lines) == 9 and all((tmp_path / "demo" / "images" / f"{l.split()[0]}.jpg").is_file() for l in lines)
    assert any(c in lines[0] for c in ("red", "green", "blue")) and len(list((tmp_path / "demo" / "zeroshot" / "test").iterdir())) == 9
