"""Frozen-encoder feature extraction for VisionFM's decoders (main_vfm_features.py, models_vfm.py,
util/feature_store.py): pooling modes, loading an iBOT/VisionFM teacher, sharded files with labels, 2 ranks
equal 1 rank, kill/resume loses and duplicates nothing, VisionFM's command path, one-line flag errors."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import main_vfm_features
import models_ibot  # noqa: F401  (registers the iBOT factories)
from conftest import REPO, child_env, describe, free_port, run_cmd
from models_vfm import FrozenEncoder, build_frozen_encoder
from util.cli import UserError, run_main
from util.feature_store import (FeatureWriter, claim_split, completed_stems, list_shards, read_features,
                                write_manifest)
from util.modalities import modality_stats
from util.registry import create_model
from util.synthetic import write_dataset


def encoder_flags(weights: Path, n_last_blocks: int = 2, pool: int = 0) -> list[str]:
    return ["--pretrained_weights", str(weights), "--arch", "vit_micro", "--patch_size", "8", "--input_size", "32",
            "--n_last_blocks", str(n_last_blocks), "--avgpool_patchtokens", str(pool), "--device", "cpu",
            "--num_workers", "0"]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """An iBOT/VisionFM-style training checkpoint: student (DDP prefix) and teacher entries."""
    torch.manual_seed(0)
    teacher = create_model("ibot_vit_micro_patch8", teacher=True, img_size=32)
    student = create_model("ibot_vit_micro_patch8", img_size=32)
    path = tmp_path_factory.mktemp("weights") / "VFM_Fundus_weights.pth"
    torch.save({"teacher": teacher.state_dict(), "epoch": 5,
                "student": {f"module.{k}": v for k, v in student.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def vfm_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vfm") / "FundusClassificationMulti"
    write_dataset(root, layout="vfm", num_classes=3, n_per_class=4, splits={"train": 4, "test": 2}, size=32,
                  multilabel=True, dataset_name="dataset_A")
    write_dataset(root, layout="vfm", num_classes=3, n_per_class=2, splits={"train": 2, "test": 1}, size=32,
                  multilabel=True, dataset_name="dataset_B", seed=1)
    return root


def extraction_argv(data: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--dst_root", str(out), "--epochs", "2", "--shard_size", "5",
            "--batch_size_per_gpu", "4", *encoder_flags(weights), *extra]


def run_in_process(argv: list[str]) -> dict:
    args = main_vfm_features.get_args_parser().parse_args(argv)
    return main_vfm_features.main(args)


@pytest.fixture(scope="module")
def reference(vfm_data, teacher_file, tmp_path_factory) -> Path:
    """One uninterrupted single-process extraction: the set every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "FunClsFeat"
    run_in_process(extraction_argv(vfm_data, out, teacher_file))
    return out


def label_rows(data: Path, split: str) -> dict[str, list[float]]:
    """stem -> label values, read straight from the label files."""
    rows = {}
    name = "training_labels.txt" if split == "train" else "test_labels.txt"
    for ds in sorted(p for p in data.iterdir() if p.is_dir()):
        for line in (ds / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                rel, values = line.split(";")
                rows[f"{ds.name}/{os.path.splitext(rel)[0]}"] = [float(v) for v in values.split(",")]
    return rows


def assert_same_set(a, b, atol: float = 1e-5) -> None:
    assert a.stems == b.stems
    assert torch.allclose(a.features, b.features, atol=atol), (a.features - b.features).abs().max()
    assert torch.equal(a.labels, b.labels)
    assert sorted(a.extra) == sorted(b.extra) and all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra)


# ------------------------------------------------------------------------------------------ encoder
def by_hand(model, x: torch.Tensor, n: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Final-normed cls tokens of the last n blocks and the mean normed patch token of the last block,
    running the blocks one by one."""
    h = model.prepare_tokens(x)
    outs = []
    for blk in model.blocks:
        h = blk(h)
        outs.append(model.norm(h))
    return [o[:, 0] for o in outs[-n:]], outs[-1][:, 1:].mean(dim=1)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_pooling_modes_match_hand_computation(mode):
    torch.manual_seed(0)
    model = create_model("vit_micro_patch8", img_size=32, num_classes=0, pool="cls").eval()
    x = torch.randn(3, 3, 32, 32)
    enc = FrozenEncoder(model, n_last_blocks=2, avgpool_patchtokens=mode)
    cls, mean = by_hand(model, x, 2)
    want = {0: torch.cat(cls, -1), 1: mean, 2: torch.cat(cls + [mean], -1)}[mode]
    got = enc(x)
    assert got.shape == (3, enc.feature_dim) == want.shape
    assert enc.feature_dim == {0: 128, 1: 64, 2: 192}[mode]
    assert torch.allclose(got, want, atol=1e-5)


def test_frozen_encoder_never_trains():
    model = create_model("vit_micro_patch8", img_size=32, num_classes=0, drop_path_rate=0.5)
    enc = FrozenEncoder(model, 1, 0).train()
    assert not model.training and not any(p.requires_grad for p in enc.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(enc(x), enc(x))  # no drop path: eval mode whatever train() was asked
    with pytest.raises(UserError, match="--n_last_blocks 3: the encoder has 2 blocks"):
        FrozenEncoder(model, 3, 0)
    # mode 1 pools the last block's patch tokens: VisionFM's forecasting command passes --n_last_blocks 4
    # with it, which must not matter on a shallower encoder
    assert FrozenEncoder(model, 4, 1)(x).shape == (2, model.embed_dim)


def test_build_frozen_encoder_loads_teacher_entry(teacher_file):
    args = argparse.Namespace(arch="vit_micro", patch_size=8, input_size=32, pretrained_weights=str(teacher_file),
                              checkpoint_key="teacher", n_last_blocks=2, avgpool_patchtokens=2)
    enc = build_frozen_encoder(args)
    saved = torch.load(teacher_file, weights_only=True)["teacher"]
    for k, v in enc.backbone.state_dict().items():
        assert torch.equal(v, saved[f"backbone.{k}"]), k
    args.checkpoint_key = "model,student"  # a comma list is tried in order; DDP's module. prefix is stripped
    student = build_frozen_encoder(args)
    assert torch.equal(student.backbone.cls_token, torch.load(teacher_file, weights_only=True)["student"]
                       ["module.backbone.cls_token"])
    args.checkpoint_key = "model"
    with pytest.raises(UserError, match=r"--checkpoint_key 'model'.*pass --checkpoint_key student,teacher"):
        build_frozen_encoder(args)
    args.checkpoint_key, args.pretrained_weights = "teacher", str(teacher_file) + ".missing"
    with pytest.raises(UserError, match="--pretrained_weights .*: no such file"):
        build_frozen_encoder(args)


# ------------------------------------------------------------------------------------ feature files
def test_feature_store_round_trip_and_refusals(tmp_path):
    claim_split(str(tmp_path), "train", {"encoder": "a"})
    w = FeatureWriter(str(tmp_path), "train", rank=1, shard_size=3, dtype="float16")
    feats = torch.randn(5, 4)
    w.add(["b/2", "b/1", "a/9", "c", "d"], feats, torch.tensor([[0.0, 1], [1, float("nan")], [0, 0], [1, 1], [0, 1]]),
          {"days": torch.arange(5.0)})
    w.flush()
    assert [Path(p).name for p in w.written] == ["features-r1-0000.safetensors", "features-r1-0001.safetensors"]
    with pytest.raises(UserError, match="incomplete .*rerun the extraction"):
        read_features(str(tmp_path), "train")
    write_manifest(str(tmp_path), "train", {"label_kind": "values"})
    fs = read_features(str(tmp_path), "training")  # VisionFM's split name is accepted
    assert fs.stems == ["a/9", "b/1", "b/2", "c", "d"] and fs.meta["count"] == 5 and fs.meta["feature_dim"] == 4
    assert fs.features.dtype == torch.float16 and torch.allclose(fs.features[0].float(), feats[2], atol=1e-2)
    assert torch.isnan(fs.labels[1, 1]) and fs.extra["days"].tolist() == [2.0, 1.0, 0.0, 3.0, 4.0]
    w2 = FeatureWriter(str(tmp_path), "train", rank=1, shard_size=3)  # numbering continues after existing shards
    w2.add(["c"], torch.randn(1, 4), torch.zeros(1, 2), {"days": torch.zeros(1)})
    w2.flush()
    assert Path(w2.written[0]).name == "features-r1-0002.safetensors"
    write_manifest(str(tmp_path), "train", {})
    with pytest.raises(UserError, match="sample 'c' occurs in more than one shard"):
        read_features(str(tmp_path), "train")
    with pytest.raises(UserError, match="another extraction .*encoder: 'a' there, 'b' now"):
        claim_split(str(tmp_path), "train", {"encoder": "b"})


def test_extraction_writes_every_stem_once_with_its_labels(reference, vfm_data):
    train, test = read_features(str(reference), "train"), read_features(str(reference), "test")
    rows = label_rows(vfm_data, "train")
    assert len(rows) == 18 and len(train.stems) == 2 * 18 and len(set(train.stems)) == 36
    assert set(train.stems) == set(rows) | {f"{s}_e1" for s in rows}
    for i, stem in enumerate(train.stems):
        assert train.labels[i].tolist() == rows[stem.removesuffix("_e1")]
        assert int(train.extra["epoch"][i]) == (1 if stem.endswith("_e1") else 0)
    assert test.stems == sorted(label_rows(vfm_data, "test")) and test.features.shape == (9, 128)
    meta = train.meta
    assert meta["pooling"] == "lastn_cls" and meta["feature_dim"] == 128 and meta["label_kind"] == "multi_hot"
    assert meta["split"] == "train" and meta["passes"] == 2 and meta["suggested_task"] == "multi_cls"
    assert len(list_shards(str(reference), "train")) == 8  # 36 samples in shards of 5
    # A pass-0 feature is the frozen encoder applied to the plain transform (resize, Fundus statistics).
    args = main_vfm_features.get_args_parser().parse_args(extraction_argv(vfm_data, reference, Path(meta["checkpoint"])))
    image = Image.open(vfm_data / "dataset_B" / "training" / "00001.png").convert("RGB")
    x = main_vfm_features.extraction_transform(False, 32, *modality_stats("Fundus"))(image)
    want = build_frozen_encoder(args)(x[None])[0]
    assert torch.allclose(train.features[train.stems.index("dataset_B/training/00001")], want, atol=1e-5)
    rerun = run_in_process(extraction_argv(vfm_data, reference, Path(meta["checkpoint"])))
    assert rerun["splits"] == {"train": 36, "test": 9}  # a complete extraction reruns as a no-op
    assert_same_set(read_features(str(reference), "train"), train, atol=0)


def test_kill_mid_extraction_then_rerun_loses_and_duplicates_nothing(reference, vfm_data, teacher_file, tmp_path):
    out = tmp_path / "FunClsFeat"
    cmd = [sys.executable, "main_vfm_features.py", *extraction_argv(vfm_data, out, teacher_file)]
    proc = run_cmd(cmd, timeout=120, env=child_env(MEDFOUND_TEST_KILL_AT_SHARD="3"))
    assert proc.returncode == -9, describe(proc)
    assert len(list_shards(str(out), "train")) == 3 and len(completed_stems(str(out), "train")) == 15
    with pytest.raises(UserError, match="incomplete"):
        read_features(str(out), "train")
    run_in_process(extraction_argv(vfm_data, out, teacher_file))
    for split in ("train", "test"):
        assert_same_set(read_features(str(out), split), read_features(str(reference), split))


def test_two_processes_equal_one_via_visionfm_command(reference, vfm_data, teacher_file, tmp_path):
    """VisionFM's README command (shrunk): torch.distributed.launch, 2 gloo ranks, evaluation/ script path."""
    out = tmp_path / "FunClsFeat"
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nnodes", "1", "--node_rank", "0",
           "--nproc_per_node=2", f"--master_port={free_port()}", "evaluation/extract_features.py",
           "--pretrained_weights", str(teacher_file), "--batch_size_per_gpu", "4", "--data_path", str(vfm_data),
           "--modality", "Fundus", "--dst_root", str(out), "--epochs", "2", "--shard_size", "5",
           *encoder_flags(teacher_file)[2:]]
    proc = run_cmd(cmd, timeout=180, env=child_env(MASTER_ADDR="127.0.0.1"))
    assert proc.returncode == 0, describe(proc)
    assert "next: python main_vfm_decoder.py --task multi_cls" in proc.stdout + proc.stderr
    shards = list_shards(str(out), "train")
    assert any("-r0-" in s for s in shards) and any("-r1-" in s for s in shards)
    for split in ("train", "test"):
        assert_same_set(read_features(str(out), split), read_features(str(reference), split))


# --------------------------------------------------------------------------------- other layouts
def test_imagefolder_and_forecasting_layouts(tmp_path, teacher_file):
    folder = tmp_path / "imnet"
    write_dataset(folder, layout="imagefolder", num_classes=2, n_per_class=3, splits={"train": 2, "test": 1}, size=32)
    run_in_process(extraction_argv(folder, tmp_path / "f1", teacher_file, "--dataset_format", "ImageNet",
                                   "--epochs", "1", "--avgpool_patchtokens", "1"))
    fs = read_features(str(tmp_path / "f1"), "test")
    assert fs.stems == ["test/class_0/00000", "test/class_1/00001"] and fs.labels.tolist() == [0.0, 1.0]
    assert fs.features.shape == (2, 64) and fs.meta["class_names"] == ["class_0", "class_1"]

    fc = tmp_path / "glaucoma_forecasting"
    for split, n in (("training", 4), ("test", 2)):
        (fc / split).mkdir(parents=True)
        lines = ["# path, label, days"]
        for i in range(n):
            Image.new("RGB", (40, 40), (30 * i, 80, 120)).save(fc / split / f"{i}.jpg")
            lines.append(f"{split}/{i}.jpg, {i % 2}, {100 + 50 * i}")
        (fc / f"{split}_labels.txt").write_text("\n".join(lines) + "\n")
    run_in_process(extraction_argv(fc, tmp_path / "f2", teacher_file, "--epochs", "1"))
    fs = read_features(str(tmp_path / "f2"), "train")
    assert fs.stems == [f"training/{i}" for i in range(4)] and fs.extra["days"].tolist() == [100, 150, 200, 250]
    assert fs.meta["suggested_task"] == "forecasting" and fs.labels.tolist() == [0, 1, 0, 1]


# ------------------------------------------------------------------------------------ bad flags
@pytest.mark.parametrize("flags, message", [
    (["--mode", "seg"], "no segmentation layout found"),  # a classification tree given to --mode seg
    (["--n_last_blocks", "0"], "--n_last_blocks 0: must be >= 1"),
    (["--n_last_blocks", "5"], "--n_last_blocks 5: the encoder has 2 blocks"),
    (["--input_size", "30"], "--input_size 30: must be a multiple of vit_micro_patch8's patch size 8"),
    (["--arch", "vit_giant"], "--arch vit_giant: unknown backbone"),
    (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--modality", "Xray"], "unknown --modality 'Xray'"),
    (["--checkpoint_key", "model"], "none of the keys ['model'] found"),
    (["--pretrained_weights", "/nonexistent/w.pth"], "--pretrained_weights /nonexistent/w.pth: no such file"),
    (["--avgpool_patchtokens", "3"], "argument --avgpool_patchtokens: invalid choice"),
])
def test_bad_flags_are_one_line(flags, message, vfm_data, teacher_file, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_main(main_vfm_features.main, main_vfm_features.get_args_parser(),
                 extraction_argv(vfm_data, out, teacher_file, *flags))
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()  # a failed start leaves no output folder


def test_image_listed_twice_is_one_line(tmp_path, teacher_file, capsys):
    data = tmp_path / "dup"
    write_dataset(data, layout="vfm", num_classes=2, n_per_class=2, splits={"train": 2, "test": 1}, size=32)
    labels = data / "dataset_A" / "training_labels.txt"
    labels.write_text(labels.read_text() + labels.read_text().splitlines()[0] + "\n")
    with pytest.raises(SystemExit):
        run_main(main_vfm_features.main, main_vfm_features.get_args_parser(),
                 extraction_argv(data, tmp_path / "out", teacher_file))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'dataset_A/training/00000' occurs twice in the train split" in err[0], err
    assert not (tmp_path / "out").exists()


def test_other_extraction_in_dst_root_is_refused(reference, vfm_data, teacher_file, capsys):
    with pytest.raises(SystemExit):
        run_main(main_vfm_features.main, main_vfm_features.get_args_parser(),
                 extraction_argv(vfm_data, reference, teacher_file, "--avgpool_patchtokens", "2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds features of another extraction (avgpool_patchtokens: 0 there, 2 now" in err[0]


def test_help_is_instant_without_torch():
    proc = run_cmd([sys.executable, "-X", "importtime", "evaluation/extract_features.py", "--help"], timeout=30,
                   cwd=REPO)
    assert proc.returncode == 0 and "--dst_root" in proc.stdout and "--avgpool_patchtokens" in proc.stdout
    assert not re.search(r"\|\s+torch$", proc.stderr, re.M), "--help imported torch"


def test_regression_labels_with_missing_values_are_extracted_as_nan(teacher_file, tmp_path):
    """Biomarker label files (`random_data.py --task metric_reg`: 38 values, some fields empty) go through
    extraction with NaN where a value is missing, as the regression decoder reads them."""
    from util.label_measurements import read_vfm_regression
    from util.synthetic_vfm import write_vfm_task
    write_vfm_task(tmp_path / "data", "metric_reg", num=10, img_size=32, seed=1)
    root = tmp_path / "data" / "FundusRegression"
    out = tmp_path / "FunRegFeat"
    run_main(main_vfm_features.main, main_vfm_features.get_args_parser(),
             [*encoder_flags(teacher_file), "--data_path", str(root), "--dst_root", str(out), "--epochs", "1",
              "--modality", "Fundus", "--batch_size_per_gpu", "4"])
    fs = read_features(str(out), "train")
    paths, values, names = read_vfm_regression(str(root), "train")
    assert fs.meta["label_kind"] == "values" and fs.labels.shape == (len(paths), 38)
    assert fs.meta["target_names"] == names and names[0] == "HGB"  # the sidecar's names travel with the features
    by_stem = {main_vfm_features.image_stem(p, str(root)): row for p, row in zip(paths, values)}
    expected = torch.tensor([list(by_stem[s]) for s in fs.stems], dtype=torch.float32)
    assert torch.equal(torch.isnan(fs.labels), torch.isnan(expected)) and torch.isnan(expected).any()
    assert torch.allclose(torch.nan_to_num(fs.labels), torch.nan_to_num(expected))
