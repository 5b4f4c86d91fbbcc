"""VisionFM synthetic data (random_data.py --task ...) and the VisionFM label readers of util.label_layouts.

Each task must write VisionFM's layout, parse with our readers, be deterministic by seed and carry labels
that simple image statistics can learn on held-out samples (numpy, Pillow and scikit-learn only)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from util.cli import UserError
from util.label_layouts import read_vfm, read_vfm_records, sample_id
from util.label_measurements import read_vfm_forecasting, read_vfm_regression
from util.synthetic_vfm import MULTI_LABEL_CLASSES, TARGET_NAMES, write_vfm_task

ROOT = Path(__file__).resolve().parents[1]
SIZE = 48


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One dataset per task, written once for the module: small for layout checks, larger where a
    learnability check fits a model on the training split."""
    base = tmp_path_factory.mktemp("vfm")
    nums = {"pretrain": 3, "single_cls": 100, "multi_cls": 80, "metric_reg": 80, "forecasting": 100,
            "segmentation": 3, "landmark": 3}
    return {t: (base / t, write_vfm_task(str(base / t), t, num=n, img_size=SIZE, seed=int(os.environ.get("VFM_DATA_SEED", "3")))) for t, n in nums.items()}


def _stats(path: str) -> np.ndarray:
    """Simple image statistics: a 4x4x4 colour histogram (fractions), a 6x6 grey thumbnail and the
    fractions of yellow, dark and pale pixels, the mean colour and the blue/red tint of bright areas."""
    im = Image.open(path).convert("RGB")
    a = np.asarray(im)
    q = (a // 64).reshape(-1, 3)
    hist = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64) / q.shape[0]
    thumb = np.asarray(im.convert("L").resize((6, 6), Image.BOX), np.float64).ravel() / 255.0
    r, g, b = (a[..., c] / 255.0 for c in range(3))
    colours = [((r > 0.7) & (g > 0.6) & (b < 0.5)).mean(), ((r < 0.45) & (a.max(-1) > 5)).mean(),
               ((g > 0.7) & (b > 0.6)).mean()]
    bright = a.mean(-1) > 150
    tint = (b[bright].mean() / max(r[bright].mean(), 1e-3)) if bright.any() else 1.0  # blue/red of bright areas
    return np.concatenate([hist * 10, thumb, np.array(colours) * 50, a.reshape(-1, 3).mean(0) / 64, [tint * 5]])


def _xy(paths):
    return np.stack([_stats(p) for p in paths])


def _auc(y, s):
    from sklearn.metrics import roc_auc_score
    return roc_auc_score(y, s)


# ---------------------------------------------------------------------------------------------------
# layouts + readers
# ---------------------------------------------------------------------------------------------------


def test_pretrain_layout(data):
    root, summary = data["pretrain"]
    for m in ("Fundus", "OCT", "External", "UltraSound", "FFA", "SiltLamp"):
        files = sorted(os.listdir(root / m))
        assert files == [f"{i:08d}.png" for i in range(3)], m
        assert Image.open(root / m / files[0]).size == (SIZE, SIZE)


def test_single_cls_layout_and_reader(data):
    root, _ = data["single_cls"]
    ds = root / "FundusClassification" / "dataset_A"
    first = (ds / "training_labels.txt").read_text().splitlines()[0]
    assert first.startswith("training/00000000.png;") and first.split(";")[1] in "01234"
    samples, classes = read_vfm(str(root / "FundusClassification"), "train", num_labels=5)
    assert len(samples) == 100 and classes == ["0", "1", "2", "3", "4"]
    test, _ = read_vfm(str(root / "FundusClassification"), "test", num_labels=5)
    assert len(test) == 100 and os.path.basename(test[0][0]) == "00000100.png"  # test stems follow training


def test_multi_cls_label_rules_and_ids(data):
    root, summary = data["multi_cls"]
    assert summary["classes"] == list(MULTI_LABEL_CLASSES)
    fun = read_vfm_records(str(root / "FundusClassificationMulti"), "train", 13)
    oct_ = read_vfm_records(str(root / "OCTClassificationMulti"), "train", 13)
    rows = np.array([r.values for r in fun])
    assert rows.shape == (80, 13)
    assert (rows[:, :5].sum(1) == 1).all(), "cols 0-4 are a one-hot DR grade"
    assert (rows[:, 5] == 1 - rows[:, 0]).all(), "col 5 (DR) is set exactly when not Healthy"
    assert 0 < rows[:, 6:].mean() < 0.5 and rows[:, 6:].sum(0).min() > 0  # every disease occurs
    # the same subjects, with the same labels, in both modalities, matched by id
    ids_f = {sample_id(r.image, str(root / "FundusClassificationMulti")): r.values for r in fun}
    ids_o = {sample_id(r.image, str(root / "OCTClassificationMulti")): r.values for r in oct_}
    assert ids_f == ids_o and "dataset_A/training/00000000" in ids_f
    assert {sample_id(r.image) for r in fun} == {p.split("/")[-1] for p in ids_f}


def test_metric_reg_reader_names_and_missing(data):
    root, _ = data["metric_reg"]
    paths, y, names = read_vfm_regression(str(root / "FundusRegression"), "train", num_targets=38)
    assert y.shape == (80, 38) and names == list(TARGET_NAMES)
    miss = np.isnan(y).mean()
    assert 0.005 < miss < 0.08, miss  # about 3 % left empty
    text = (root / "FundusRegression" / "dataset_A" / "training_labels.txt").read_text()
    assert ",," in text or ";," in text or text.rstrip().endswith(",")
    p2, y2, _ = read_vfm_regression(str(root / "ExternalRegression"), "train")
    assert [sample_id(p) for p in p2] == [sample_id(p) for p in paths]
    np.testing.assert_array_equal(np.isnan(y2), np.isnan(y))
    np.testing.assert_allclose(np.nan_to_num(y2), np.nan_to_num(y))


def test_forecasting_layout_and_reader(data):
    root, _ = data["forecasting"]
    line = (root / "training_labels.txt").read_text().splitlines()[0]
    path, label, days = line.split(", ")
    assert path == "training/00000000.png" and label in "01" and int(days) >= 30
    recs = read_vfm_forecasting(str(root), "train", num_labels=2)
    assert len(recs) == 100 and all(isinstance(r.days, int) and r.label in (0, 1) for r in recs)
    assert 0.15 < np.mean([r.label for r in recs]) < 0.85


def test_segmentation_and_landmark_layouts(data):
    seg, _ = data["segmentation"]
    d = seg / "VesselSegmentation" / "dataset_A" / "training"
    lab = np.asarray(Image.open(d / "labels" / "00000000.png"))
    assert Image.open(d / "labels" / "00000000.png").mode == "L" and lab.max() <= 2
    assert sorted(os.listdir(d / "images")) == sorted(os.listdir(d / "labels"))
    lm, _ = data["landmark"]
    heat = np.load(lm / "LandmarkDetection" / "dataset_A" / "test" / "labels" / "00000003.npy")
    assert heat.shape == (SIZE, SIZE, 3) and heat.dtype == np.uint8 and (heat.sum((0, 1)) == 1).all()


def test_deterministic_by_seed(tmp_path):
    def digest(d):
        h = hashlib.sha256()
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(d)).encode() + p.read_bytes())
        return h.hexdigest()
    for task in ("multi_cls", "metric_reg", "forecasting"):
        write_vfm_task(str(tmp_path / "a" / task), task, num=3, img_size=32, seed=1)
        write_vfm_task(str(tmp_path / "b" / task), task, num=3, img_size=32, seed=1)
        write_vfm_task(str(tmp_path / "c" / task), task, num=3, img_size=32, seed=2)
        assert digest(tmp_path / "a" / task) == digest(tmp_path / "b" / task), task
        assert digest(tmp_path / "a" / task) != digest(tmp_path / "c" / task), task


# ---------------------------------------------------------------------------------------------------
# learnable signal: simple statistics + a linear model beat chance / the mean on held-out samples
# ---------------------------------------------------------------------------------------------------


def test_single_cls_is_learnable(data):
    from sklearn.linear_model import LogisticRegression
    root = str(data["single_cls"][0] / "FundusClassification")
    tr, _ = read_vfm(root, "train", 5)
    te, _ = read_vfm(root, "test", 5)
    clf = LogisticRegression(C=3.0, max_iter=3000).fit(_xy([p for p, _ in tr]), [k for _, k in tr])
    yte = np.array([k for _, k in te])
    acc = (clf.predict(_xy([p for p, _ in te])) == yte).mean()
    assert acc > 0.2 + 0.2, acc  # chance is 0.2


def test_multi_cls_is_learnable_in_both_modalities(data):
    from sklearn.linear_model import LogisticRegression
    root = data["multi_cls"][0]
    for modality, cols in (("Fundus", (5, 6, 7, 8, 9, 11, 12)), ("OCT", (5, 6, 8, 11, 12))):
        tr = read_vfm_records(str(root / f"{modality}ClassificationMulti"), "train", 13)
        te = read_vfm_records(str(root / f"{modality}ClassificationMulti"), "test", 13)
        xtr, xte = _xy([r.image for r in tr]), _xy([r.image for r in te])
        ytr, yte = np.array([r.values for r in tr]), np.array([r.values for r in te])
        aucs = {MULTI_LABEL_CLASSES[c]: _auc(yte[:, c], LogisticRegression(C=3.0, max_iter=3000)
                                             .fit(xtr, ytr[:, c]).decision_function(xte)) for c in cols}
        assert np.mean(list(aucs.values())) > 0.75 and min(aucs.values()) > 0.6, (modality, aucs)


def test_metric_reg_is_learnable(data):
    from sklearn.linear_model import Ridge
    root = data["metric_reg"][0]
    # brightness- and tint-linked targets; lesion-linked ones (GLU, HbA1c) need more than linear colour statistics
    checks = {"Fundus": ("HGB", "HCT", "RBC"), "External": ("TBIL", "HGB")}
    for modality, targets in checks.items():
        ptr, ytr, names = read_vfm_regression(str(root / f"{modality}Regression"), "train")
        pte, yte, _ = read_vfm_regression(str(root / f"{modality}Regression"), "test")
        xtr, xte = _xy(ptr), _xy(pte)
        for t in targets:
            j = names.index(t)
            m, n = ~np.isnan(ytr[:, j]), ~np.isnan(yte[:, j])
            pred = Ridge(alpha=1.0).fit(xtr[m], ytr[m, j]).predict(xte[n])
            mse, base = np.mean((pred - yte[n, j]) ** 2), np.mean((ytr[m, j].mean() - yte[n, j]) ** 2)
            assert mse < 0.75 * base, (modality, t, mse / base)


def test_forecasting_is_learnable_from_image_and_days(data):
    from sklearn.linear_model import LogisticRegression
    root = str(data["forecasting"][0])
    tr, te = read_vfm_forecasting(root, "train"), read_vfm_forecasting(root, "test")

    def feats(recs):
        return np.column_stack([_xy([r.path for r in recs]), [r.days / 1800 for r in recs]])
    clf = LogisticRegression(C=3.0, max_iter=3000).fit(feats(tr), [r.label for r in tr])
    auc = _auc([r.label for r in te], clf.decision_function(feats(te)))
    assert auc > 0.7, auc


# ---------------------------------------------------------------------------------------------------
# label-file reading: both forecasting names and separators, one-line file:line errors
# ---------------------------------------------------------------------------------------------------


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


@pytest.mark.parametrize("name", ["training_labels.txt", "training.txt"])
@pytest.mark.parametrize("sep", [", ", ","])
def test_forecasting_file_names_and_separators(tmp_path, name, sep):
    _img(tmp_path / "training" / "1.jpg")
    _img(tmp_path / "training" / "2.jpg")
    (tmp_path / name).write_text(f"# in {name}\n\ntraining/1.jpg{sep}0{sep}309\n  training/2.jpg{sep}1{sep}12.0 \n")
    recs = read_vfm_forecasting(str(tmp_path), "training", num_labels=2)
    assert [(os.path.basename(r.path), r.label, r.days) for r in recs] == [("1.jpg", 0, 309), ("2.jpg", 1, 12)]


def test_forecasting_readme_paths_relative_to_cwd(tmp_path, monkeypatch):
    root = tmp_path / "dataset" / "glaucoma_forecasting"
    _img(root / "test" / "1.jpg")
    (root / "test_labels.txt").write_text("./dataset/glaucoma_forecasting/test/1.jpg, 0, 690\n")
    monkeypatch.chdir(tmp_path)
    assert read_vfm_forecasting("./dataset/glaucoma_forecasting/", "test")[0].days == 690


@pytest.mark.parametrize("line, needle", [
    ("training/1.jpg, 0", "field(s)"),
    ("training/1.jpg, 0, 10, 4", "field(s)"),
    ("training/1.jpg;0", "field(s)"),
    ("training/1.jpg, yes, 10", "must be numbers"),
    ("training/1.jpg, 2, 10", "integer in [0, 1]"),
    ("training/1.jpg, 1, -5", "non-negative"),
    ("training/9.jpg, 1, 5", "does not exist"),
    ("../outside.jpg, 1, 5", "outside the data root"),
])
def test_forecasting_bad_lines(tmp_path, line, needle):
    _img(tmp_path / "root" / "training" / "1.jpg")
    _img(tmp_path / "outside.jpg")
    lf = tmp_path / "root" / "training.txt"
    lf.write_text("training/1.jpg, 0, 30\n" + line + "\n")
    with pytest.raises(UserError) as e:
        read_vfm_forecasting(str(tmp_path / "root"), "train")
    msg = str(e.value)
    assert msg.startswith(f"{lf}:2:") and needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize("line, kw, needle", [
    ("training/1.jpg;1,2", {}, "2 target value(s) but"),
    ("training/1.jpg;1,x,3", {}, "is not a number"),
    ("training/1.jpg;1,inf,3", {}, "infinite"),
    ("training/1.jpg 1,2,3", {}, "malformed line"),
    ("training/nope.jpg;1,2,3", {}, "does not exist"),
    ("../../x.jpg;1,2,3", {}, "outside the data root"),
])
def test_regression_bad_lines(tmp_path, line, kw, needle):
    ds = tmp_path / "Reg" / "dataset_A"
    _img(ds / "training" / "1.jpg")
    lf = ds / "training_labels.txt"
    lf.write_text("training/1.jpg;1,,3\n" + line + "\n")
    with pytest.raises(UserError) as e:
        read_vfm_regression(str(tmp_path / "Reg"), "train", **kw)
    msg = str(e.value)
    assert msg.startswith(f"{lf}:2:") and needle in msg and "\n" not in msg, msg


def test_regression_arity_against_num_targets_and_names(tmp_path):
    ds = tmp_path / "dataset_A"
    _img(ds / "training" / "1.jpg")
    (ds / "training_labels.txt").write_text("# targets: a, b, c\ntraining/1.jpg; 1, nan , 3\n")
    paths, y, names = read_vfm_regression(str(tmp_path), "train")
    assert names == ["a", "b", "c"] and np.isnan(y[0, 1]) and y[0, 2] == 3
    assert read_vfm_regression(str(tmp_path), "train", target_names=["x", "y", "z"])[2] == ["x", "y", "z"]
    with pytest.raises(UserError, match=r"training_labels.txt:2: 3 target value\(s\) but --num_labels has 38"):
        read_vfm_regression(str(tmp_path), "train", num_targets=38)
    with pytest.raises(UserError, match="2 target names"):
        read_vfm_regression(str(tmp_path), "train", target_names=["x", "y"])


# ---------------------------------------------------------------------------------------------------
# VisionFM's command lines
# ---------------------------------------------------------------------------------------------------


def test_visionfm_command_runs_as_written(tmp_path):
    """`python evaluation/random_data.py --task multi_cls --dst_dir ./dataset/multi_cls_random` (shrunk),
    from the project root and, as VisionFM's pretraining section does, from inside evaluation/."""
    work = tmp_path / "w"
    work.mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "evaluation" / "random_data.py"), "--task", "multi_cls",
                        "--dst_dir", "./dataset/multi_cls_random", "--num", "2", "--img_size", "32"],
                       cwd=work, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (work / "dataset/multi_cls_random/OCTClassificationMulti/dataset_A/test_labels.txt").is_file()
    r = subprocess.run([sys.executable, "random_data.py", "--task", "pretrain", "--dst_dir", str(tmp_path / "pre"),
                        "--num", "1", "--img_size", "32"], cwd=ROOT / "evaluation", capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "pre" / "SiltLamp" / "00000000.png").is_file()


@pytest.mark.parametrize("args", [["--task", "multi_cls"], ["--task", "ct", "--dst_dir", "x"],
                                  ["--task", "single_cls", "--dst_dir", "{d}", "--num", "0"],
                                  ["--task", "pretrain", "--dst_dir", "{d}", "--img_size", "8"]])
def test_task_cli_bad_input_is_one_line(tmp_path, args):
    args = [a.replace("{d}", str(tmp_path / "d")) for a in args]
    r = subprocess.run([sys.executable, str(ROOT / "random_data.py"), *args], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    err = r.stderr.strip()
    assert r.returncode != 0 and err.startswith("random_data.py: error:") and "\n" not in err, err
