"""Tests for util/metrics.py against hand-computed values (derivations in comments)."""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util import metric_bootstrap as MB  # noqa: E402
from util import metrics as M  # noqa: E402

approx = pytest.approx


def _onehotish(pred: list[int], C: int, hi: float = 0.8) -> np.ndarray:
    """Probabilities whose argmax is ``pred`` (rows sum to 1)."""
    P = np.full((len(pred), C), (1.0 - hi) / (C - 1))
    P[np.arange(len(pred)), pred] = hi
    return P


# --------------------------------------------------------------------------------------
# binary
# --------------------------------------------------------------------------------------

# y = 0 0 0 1 1 1, P(class 1) below.
Y6 = np.array([0, 0, 0, 1, 1, 1])
P6 = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.3])


def test_binary_hand_computed():
    warnings.simplefilter("error")
    m = M.classification_metrics(Y6, P6)
    # AUROC by concordant pairs: positives {.8,.4,.3} vs negatives {.1,.4,.35}
    #   .8 beats all 3 -> 3; .4 beats .1,.35 and ties .4 -> 2.5; .3 beats .1 -> 1  => 6.5 / 9
    assert m["auroc"] == approx(6.5 / 9)
    # AP: descending .8(+) P=1 R=1/3; .4(+,-) P=2/3 R=2/3; .35(-); .3(+) P=3/5 R=1
    #   AP = 1/3*1 + 1/3*2/3 + 1/3*3/5 = 34/45
    assert m["auprc"] == approx(34 / 45)
    # threshold 0.5 -> pred 0 0 0 1 0 0 -> cm [[3,0],[2,1]]
    assert m["confusion_matrix"] == [[3, 0], [2, 1]]
    assert m["support"] == [3, 3]
    assert m["accuracy"] == approx(4 / 6)
    assert m["sensitivity_positive"] == approx(1 / 3)
    assert m["specificity_positive"] == approx(1.0)
    assert m["precision_positive"] == approx(1.0)
    assert m["f1_positive"] == approx(0.5)  # 2*1*(1/3)/(4/3)
    # class 0: TP3 FP2 FN0 -> F1 6/8; macro (0.75 + 0.5)/2
    assert m["f1_per_class"] == approx([0.75, 0.5])
    assert m["f1"] == approx(0.625)
    # kappa: po = 4/6; row sums (3,3), col sums (5,1): pe = (15+3)/36 = 1/2 -> (2/3-1/2)/(1/2) = 1/3
    assert m["kappa"] == approx(1 / 3)
    # MCC = (TP*TN - FP*FN)/sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 3/sqrt(1*3*3*5)
    assert m["mcc"] == approx(3 / math.sqrt(45))
    assert m["task"] == "binary" and m["n"] == 6
    json.dumps(m, allow_nan=False)  # plain JSON types only


def test_sigmoid_column_equals_softmax_pair():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 40)
    p = rng.random(40)
    a = M.classification_metrics(y, p[:, None])
    b = M.classification_metrics(y, np.stack([1 - p, p], axis=1))
    c = M.classification_metrics(y, p)  # 1-D also means P(class 1)
    assert a == b == c


def test_positive_class_and_threshold():
    # positive_class=0 uses column 0: P0 = 1 - P6 -> AUROC of class 0 equals that of class 1 here
    m = M.classification_metrics(Y6, P6, positive_class=0)
    assert m["auroc"] == approx(6.5 / 9)
    # threshold 0.35: pred = 0 1 1 1 1 0 -> class-1 TP2 FN1 FP2 TN1
    m = M.classification_metrics(Y6, P6, threshold=0.35)
    assert m["sensitivity_positive"] == approx(2 / 3)
    assert m["specificity_positive"] == approx(1 / 3)


def test_one_hot_targets_accepted():
    y = np.array([0, 2, 1, 2])
    P = _onehotish([0, 2, 2, 1], 3)
    assert M.classification_metrics(np.eye(3)[y], P) == M.classification_metrics(y, P)


# --------------------------------------------------------------------------------------
# multi-class
# --------------------------------------------------------------------------------------

Y3 = [0, 0, 1, 1, 2, 2]
PRED3 = [0, 1, 1, 2, 2, 2]
# cm (rows true) = [[1,1,0],[0,1,1],[0,0,2]]


def test_three_class_confusion_metrics():
    warnings.simplefilter("error")
    m = M.classification_metrics(Y3, _onehotish(PRED3, 3), ordinal=True)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    # per class: c0 TP1 FN1 FP0 TN4; c1 TP1 FN1 FP1 TN3; c2 TP2 FN0 FP1 TN3
    assert m["recall_per_class"] == approx([0.5, 0.5, 1.0])
    assert m["specificity_per_class"] == approx([1.0, 0.75, 0.75])
    assert m["precision_per_class"] == approx([1.0, 0.5, 2 / 3])
    assert m["f1_per_class"] == approx([2 / 3, 0.5, 0.8])
    assert m["sensitivity"] == m["recall"] == approx(2 / 3)
    assert m["specificity"] == approx(2.5 / 3)
    assert m["precision"] == approx(13 / 18)
    assert m["f1"] == approx(59 / 90)  # (2/3 + 1/2 + 4/5) / 3
    assert m["accuracy"] == approx(4 / 6)
    assert m["balanced_accuracy"] == approx(2 / 3)
    # unweighted kappa: po = 4/6, rows (2,2,2), cols (1,2,3): pe = 12/36 -> (2/3-1/3)/(2/3) = 0.5
    assert m["kappa"] == approx(0.5)
    # quadratic: W=(i-j)^2, observed off-diagonal weight = 1 + 1 = 2;
    # expected E_ij = 2*c_j/6 -> sum W*E = 14/3 + 4/3 + 2 = 8  => 1 - 2/8
    assert m["kappa_quadratic"] == approx(0.75)
    # MCC (multi-class): c=4, s=6, sum t*p = 12 -> (24-12)/sqrt((36-12)(36-14))
    assert m["mcc"] == approx(12 / math.sqrt(24 * 22))
    assert "kappa_quadratic" not in M.classification_metrics(Y3, _onehotish(PRED3, 3))


def test_quadratic_kappa_uses_full_grade_range():
    # grades 0, 1, 4 present (2, 3 absent); y = 0 1 4, pred = 1 1 4
    # O: (0,1)=1 (1,1)=1 (4,4)=1; rows r0=r1=r4=1; cols c1=2 c4=1; W=(i-j)^2 (scale cancels)
    # sum W*O = 1; E = r_i c_j / 3 -> sum W*E = 1*2/3 + 16*1/3 + 9*1/3 + 9*2/3 = 15  => 1 - 1/15
    # (compressing the labels to positions 0,1,2 as sklearn's default label set would gives 2/3)
    m = M.classification_metrics([0, 1, 4], _onehotish([1, 1, 4], 5), num_classes=5, ordinal=True)
    assert m["kappa_quadratic"] == approx(14 / 15)


def test_absent_class_defined_and_silent():
    warnings.simplefilter("error")  # any sklearn/numpy warning fails the test
    y = [0, 0, 2, 2]
    P = np.array([[0.7, 0.1, 0.2], [0.5, 0.2, 0.3], [0.2, 0.1, 0.7], [0.6, 0.1, 0.3]])
    m = M.classification_metrics(y, P, num_classes=3)
    # class 0: pos {.7,.5} vs neg {.2,.6}: .7 -> 2, .5 -> 1 => 3/4
    # class 2: pos {.7,.3} vs neg {.2,.3}: .7 -> 2, .3 -> 1 + 0.5 tie => 3.5/4
    assert m["auroc_per_class"][0] == approx(0.75)
    assert m["auroc_per_class"][1] is None
    assert m["auroc_per_class"][2] == approx(0.875)
    assert m["auroc"] == approx(0.8125)
    assert m["auroc_excluded_classes"] == [1]
    # AP class 0: .7(+) P1 R.5; .6(-); .5(+) P2/3 R1 -> 1/2 + 1/3 = 5/6; class 2 likewise 5/6
    assert m["auprc_per_class"][1] is None and m["auprc_excluded_classes"] == [1]
    assert m["auprc"] == approx(5 / 6)
    # pred (argmax) = 0 0 2 0; class 1 neither true nor predicted -> excluded from macro
    # c0: TP2 FP1 -> F1 0.8; c2: TP1 FN1 -> F1 2/3
    assert m["f1_per_class"] == approx([0.8, 0.0, 2 / 3])
    assert m["f1"] == approx((0.8 + 2 / 3) / 2)
    assert m["balanced_accuracy"] == approx(0.75)  # recalls 1 and 0.5 over present classes
    assert m["support"] == [2, 0, 2]
    json.dumps(m, allow_nan=False)


def test_single_class_y_true():
    warnings.simplefilter("error")
    m = M.classification_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert m["auroc"] is None
    assert m["auroc_per_class"] == [None, None]
    assert m["auroc_excluded_classes"] == [0, 1]
    assert m["auprc"] == approx(1.0)  # only positives -> precision 1 everywhere
    assert m["accuracy"] == approx(2 / 3)
    # rows (0,3), cols (1,2): pe = 6/9 = po -> kappa 0
    assert m["kappa"] == approx(0.0)
    # all predicted 1 too: chance agreement 1 -> kappa undefined
    assert M.classification_metrics([1, 1], [0.9, 0.8])["kappa"] is None
    m3 = M.classification_metrics([2, 2, 2], _onehotish([2, 0, 2], 3))
    assert m3["auroc"] is None and m3["auroc_excluded_classes"] == [0, 1, 2]
    assert M.retfound_score(m3) is None
    json.dumps(m3, allow_nan=False)


def test_input_validation():
    with pytest.raises(ValueError):
        M.classification_metrics([0, 3], _onehotish([0, 1], 3))
    with pytest.raises(ValueError):
        M.classification_metrics([0, 1], [0.2, float("nan")])
    with pytest.raises(ValueError):
        M.classification_metrics([0, 1, 2], _onehotish([0, 1, 2], 3), num_classes=4)
    with pytest.raises(ValueError):
        M.classification_metrics(np.array([[1, 1, 0]]), _onehotish([0], 3))  # not one-hot


# --------------------------------------------------------------------------------------
# multi-label
# --------------------------------------------------------------------------------------


def test_multilabel():
    warnings.simplefilter("error")
    Y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    P = np.array([[0.9, 0.2, 0.1], [0.4, 0.6, 0.2], [0.6, 0.3, 0.7], [0.2, 0.35, 0.1]])
    m = M.classification_metrics(Y, P, multilabel=True)
    # label 0: pos {.9,.6} > neg {.4,.2} -> 1; label 1: pos {.6,.3} vs neg {.2,.35}: 2 + 1 -> 3/4
    assert m["auroc_per_class"] == approx([1.0, 0.75, None])
    assert m["auroc"] == approx(0.875) and m["auroc_excluded_classes"] == [2]
    # pred@0.5 = [1,0,0],[0,1,0],[1,0,1],[0,0,0]: rows 0,1,3 exact -> 3/4; wrong cells (2,1),(2,2) -> 2/12
    assert m["subset_accuracy"] == m["accuracy"] == approx(0.75)
    assert m["hamming_loss"] == approx(2 / 12)
    # F1: label0 TP2 -> 1; label1 TP1 FN1 -> 2/3; label2 FP1 -> 0
    assert m["f1_per_class"] == approx([1.0, 2 / 3, 0.0])
    assert m["f1"] == approx((1 + 2 / 3) / 3)
    assert m["confusion_matrix"][2] == [[3, 1], [0, 0]]
    assert m["support"] == [2, 2, 0]
    json.dumps(m, allow_nan=False)


# --------------------------------------------------------------------------------------
# reference variants and selection
# --------------------------------------------------------------------------------------


def test_uspec_trapz_vs_average_precision():
    y = [1, 0, 1, 0]
    p = np.array([0.9, 0.8, 0.7, 0.1])
    # PR points (R,P): (1,.5),(1,2/3),(.5,.5),(.5,1),(0,1)
    # trapezoid: .5*(2/3+.5)/2 + .5*1 = 7/24 + 12/24 = 19/24
    assert M.uspec_aupr_trapz(y, p) == approx(19 / 24)
    # step AP: .5*1 + .5*2/3 = 5/6 -> trapezoid is lower because it interpolates linearly
    assert M.classification_metrics(y, p)["auprc"] == approx(5 / 6)
    assert M.uspec_aupr_trapz([0, 0, 2, 2], np.eye(3)[[0, 2, 2, 2]] * 0.8 + 0.2 / 3, num_classes=3) is not None


def test_excl0_variants_and_malignant_pr():
    P = _onehotish(PRED3, 3)
    m = M.macro_excl0(Y3, P)
    # classes 1,2: precision (.5, 2/3), recall (.5, 1), F1 (.5, .8)
    assert m == approx({"precision": 7 / 12, "recall": 0.75, "f1": 0.65})
    leg = M.legacy_excl0(Y3, P)
    # class1: acc 4/6 sens .5 spec .75 prec .5 F1 .5 MCC (3-1)/sqrt(4*4*2*2)=.25
    # class2: acc 5/6 sens 1 spec .75 prec 2/3 F1 .8 MCC 6/sqrt(4*3*2*3)
    assert leg["accuracy"] == approx(0.75)
    assert leg["sensitivity"] == approx(0.75)
    assert leg["specificity"] == approx(0.75)
    assert leg["precision"] == approx(7 / 12)
    assert leg["g_mean"] == approx((math.sqrt(0.375) + math.sqrt(0.75)) / 2)
    assert leg["f1"] == approx(0.65)
    assert leg["mcc"] == approx((0.25 + 6 / math.sqrt(72)) / 2)
    cm = [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert M.malignant_pr(cm) == approx({"precision": 1.0, "recall": 0.5})
    assert M.malignant_pr(cm, cls=2) == approx({"precision": 2 / 3, "recall": 1.0})
    assert set(M.METRIC_VARIANTS) == {"retfound_score", "uspec_aupr_trapz", "macro_excl0", "legacy_excl0", "malignant_pr"}


def test_retfound_score_and_selection():
    m = {"f1": 0.6, "auroc": 0.9, "kappa": 0.3, "loss": 0.42, "accuracy": 0.8}
    assert M.retfound_score(m) == approx(0.6)
    assert M.select_metric(m, "retfound_score") == approx(0.6)
    assert M.select_metric(m, "auc") == approx(0.9)
    assert M.select_metric(m, "loss") == approx(0.42)
    assert M.metric_direction("loss") is False
    assert M.metric_direction("hamming_loss") is False
    assert all(M.metric_direction(n) for n in ("auroc", "accuracy", "balanced_accuracy", "f1", "kappa", "retfound_score"))
    assert M.select_metric({"auroc": None}, "auroc") == -math.inf  # undefined never wins
    assert M.select_metric({}, "loss") == math.inf
    assert M.is_improvement(0.5, None, "auroc")
    assert M.is_improvement(0.4, 0.5, "loss") and not M.is_improvement(0.6, 0.5, "loss")
    assert M.is_improvement(0.6, 0.5, "auroc") and not M.is_improvement(0.5, 0.5, "auroc")


# --------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------


def _synthetic(N: int, C: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, N)
    logits = rng.normal(size=(N, C))
    logits[np.arange(N), y] += 1.0
    P = np.exp(logits)
    return y, P / P.sum(1, keepdims=True)


def test_bootstrap_contains_point_reproducible_and_fast():
    y, P = _synthetic(500, 3)
    names = ("auroc", "auprc", "accuracy", "f1", "kappa", "balanced_accuracy", "retfound_score")
    t0 = time.perf_counter()
    ci = M.bootstrap_ci(y, P, names, n_boot=1000, seed=0)
    assert time.perf_counter() - t0 < 5.0
    point = M.classification_metrics(y, P)
    point["retfound_score"] = M.retfound_score(point)
    for n in names:
        lo, hi = ci[n]
        assert lo < point[n] < hi, n
        assert hi - lo < 0.2
    assert M.bootstrap_ci(y, P, names, n_boot=1000, seed=0) == ci
    assert M.bootstrap_ci(y, P, names, n_boot=1000, seed=1) != ci
    lo99, hi99 = M.bootstrap_ci(y, P, ["auroc"], n_boot=1000, alpha=0.01)["auroc"]
    assert lo99 <= ci["auroc"][0] and hi99 >= ci["auroc"][1]


def test_weighted_engine_matches_explicit_resample():
    # the vectorised path must agree with classification_metrics on the materialised resample
    y, P = _synthetic(80, 4, seed=5)
    P = np.round(P, 2)  # create ties
    pred = P.argmax(1)
    rng = np.random.default_rng(0)
    W = rng.multinomial(80, np.full(80, 1 / 80), size=3).astype(float)
    names = {"auroc", "auprc", "accuracy", "balanced_accuracy", "f1", "precision", "recall",
             "specificity", "kappa", "kappa_quadratic", "mcc"}  # fmt: skip
    res = MB._weighted_single_label(y, P, pred, W, None, names)
    for b in range(3):
        idx = np.repeat(np.arange(80), W[b].astype(int))
        ref = M.classification_metrics(y[idx], P[idx], num_classes=4, ordinal=True)
        for n in names:
            assert res[n][b] == approx(ref[n], abs=1e-10), n


def test_bootstrap_loop_fallback_equals_vectorised(monkeypatch):
    y, P = _synthetic(60, 2, seed=2)
    names = ["auroc", "auprc", "f1", "kappa", "sensitivity_positive"]
    fast = M.bootstrap_ci(y, P, names, n_boot=100, seed=4)
    monkeypatch.setattr(MB, "_SINGLE_VECTORISED", set())
    slow = M.bootstrap_ci(y, P, names, n_boot=100, seed=4)
    for n in names:
        assert fast[n] == approx(slow[n], abs=1e-10)


def test_bootstrap_multilabel_loop_equals_vectorised(monkeypatch):
    rng = np.random.default_rng(7)
    Y = (rng.random((60, 3)) < 0.4).astype(int)
    P = np.clip(Y * 0.3 + rng.random((60, 3)) * 0.7, 0, 1)
    names = ["auroc", "f1", "hamming_loss", "subset_accuracy"]
    fast = M.bootstrap_ci(Y, P, names, n_boot=100, seed=1, multilabel=True)
    monkeypatch.setattr(MB, "_MULTI_VECTORISED", set())
    slow = M.bootstrap_ci(Y, P, names, n_boot=100, seed=1, multilabel=True)
    for n in names:
        assert fast[n] == approx(slow[n], abs=1e-10)


def test_bootstrap_stratified_keeps_classes_and_is_silent():
    warnings.simplefilter("error")
    # only 2 positives out of 30: plain resampling would often lose them; stratified never does
    y = np.array([1, 1] + [0] * 28)
    p = np.linspace(0.05, 0.95, 30)[::-1]
    ci = M.bootstrap_ci(y, p, ["auroc"], n_boot=300)
    assert ci["auroc"] == (approx(1.0), approx(1.0))  # the two positives have the top scores
    with pytest.raises(KeyError):
        M.bootstrap_ci(y, p, ["confusion_matrix"], n_boot=10)


# --------------------------------------------------------------------------------------
# regression / segmentation
# --------------------------------------------------------------------------------------


def test_regression_metrics():
    r = M.regression_metrics([1, 2, 3, 4], [1, 3, 3, 5])
    # err = 0 1 0 1
    assert r["mae"] == approx(0.5)
    assert r["rmse"] == approx(math.sqrt(0.5))
    # SS_res = 2, SS_tot = 2.25+.25+.25+2.25 = 5
    assert r["r2"] == approx(0.6)
    # yc = (-1.5,-.5,.5,1.5), pc = (-2,0,0,2): cov 6 / sqrt(5*8)
    assert r["pearson_r"] == approx(6 / math.sqrt(40))
    assert r["relative_error"] == approx(0.5 / 2.5)
    # second target constant at 2, pred (1,2,3,2): R²/r undefined, rel = 0.5/2
    y2 = np.array([[1, 2], [2, 2], [3, 2], [4, 2]])
    p2 = np.array([[1, 1], [3, 2], [3, 3], [5, 2]])
    r2 = M.regression_metrics(y2, p2)
    assert r2["r2_per_target"] == [approx(0.6), None]
    assert r2["r2"] == approx(0.6)
    assert r2["relative_error"] == approx((0.2 + 0.25) / 2)
    json.dumps(r2, allow_nan=False)


def test_segmentation_metrics():
    true = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    s = M.segmentation_metrics(pred, true, num_classes=4)
    # c0: |T|=2 |P|=2 I=1 -> dice .5 iou 1/3; c1: |T|=2 |P|=3 I=2 -> .8, 2/3
    # c2: |T|=2 |P|=1 I=1 -> 2/3, 1/2; c3 empty in both -> 1, 1
    assert s["dice_per_class"] == approx([0.5, 0.8, 2 / 3, 1.0])
    assert s["iou_per_class"] == approx([1 / 3, 2 / 3, 0.5, 1.0])
    assert s["dice_mean"] == approx((0.5 + 0.8 + 2 / 3 + 1) / 4)
    assert s["dice_mean_fg"] == approx((0.8 + 2 / 3 + 1) / 3)
    assert s["iou_mean"] == approx(0.625)
    assert s["iou_mean_fg"] == approx((2 / 3 + 0.5 + 1) / 3)
    assert s["pixel_accuracy"] == approx(4 / 6)
    # per-image: image 2 alone has an empty class 0 in truth but one predicted pixel -> dice 0
    pi = M.segmentation_metrics(pred, true, num_classes=4, per_image=True)
    # image0 (row 0): c0 T{0,1} P{0} -> 2/3; image1 (row 1): c0 T{} P{2} -> 0  => mean 1/3
    assert pi["dice_per_class"][0] == approx(1 / 3)
    ign = M.segmentation_metrics(np.array([1, 1]), np.array([1, 255]), num_classes=2, ignore_index=255)
    assert ign["dice_per_class"] == approx([1.0, 1.0])


# --------------------------------------------------------------------------------------
# output helpers
# --------------------------------------------------------------------------------------


def test_write_metrics_json_csv_roundtrip(tmp_path):
    m = M.classification_metrics(Y3, _onehotish(PRED3, 3), class_names=["a", "b", "c"], ordinal=True)
    m["extra_nan"] = float("nan")
    m["np_value"] = np.float32(0.25)
    jp, cp = M.write_metrics(m, tmp_path / "out", prefix="val")
    assert os.path.basename(jp) == "val_metrics.json" and os.path.basename(cp) == "val_metrics.csv"
    with open(jp) as f:
        back = json.load(f)
    assert back["extra_nan"] is None and back["np_value"] == 0.25
    assert back["confusion_matrix"] == m["confusion_matrix"]
    assert back["kappa_quadratic"] == approx(0.75)
    with open(cp, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["metric", "value"]
    flat = dict(rows[1:])
    assert float(flat["kappa"]) == approx(0.5)
    assert flat["confusion_matrix.0.1"] == "1"
    assert flat["extra_nan"] == ""
    assert sorted(os.listdir(tmp_path / "out")) == ["val_metrics.csv", "val_metrics.json"]  # no temp leftovers


def test_plots_write_png(tmp_path):
    y, P = _synthetic(50, 3)
    roc = M.plot_roc(y, P, tmp_path / "roc.png", class_names=["x", "y", "z"])
    roc_b = M.plot_roc(Y6, P6, tmp_path / "roc_bin.png")
    cm = M.classification_metrics(y, P)["confusion_matrix"]
    cmp = M.plot_confusion_matrix(cm, tmp_path / "cm.png", class_names=["x", "y", "z"])
    cmr = M.plot_confusion_matrix([[0, 0], [1, 2]], tmp_path / "cm_raw.png", normalize=False)
    for p in (roc, roc_b, cmp, cmr):
        with open(p, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 1000


def test_log_to_tensorboard():
    class FakeWriter:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float, int]] = []

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.calls.append((tag, value, step))

    m = M.classification_metrics(Y6, P6)
    w = FakeWriter()
    n = M.log_to_tensorboard(w, m, step=3, prefix="val")
    tags = {t for t, _, _ in w.calls}
    assert n == len(w.calls) and "val/auroc" in tags and "val/kappa" in tags
    assert "val/auroc_per_class" not in tags and "val/n" not in tags
    assert all(s == 3 and isinstance(v, float) for _, v, s in w.calls)
    assert M.log_to_tensorboard(None, m, 0, "val") == 0
