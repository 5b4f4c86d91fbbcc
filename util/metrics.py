"""THE metrics entry point: import every clinical metric from here (sklearn underneath).

Conventions
-----------
* ``y_true``: int array (N,) of class indices for single-label tasks (a one-hot
  (N, C) array is accepted too), or a (N, C) 0/1 array for multi-label tasks
  (pass ``multilabel=True``).
* ``probs``: float array (N, C) of probabilities. Softmax outputs for
  multi-class (including the 2-way softmax binary head); for a single-sigmoid
  binary head C == 1 and the column means P(class 1).
* ``num_classes`` can be given explicitly so that a class absent from a split is
  still accounted for (its per-class AUROC/AUPRC is ``None`` and it is listed in
  ``auroc_excluded_classes`` / ``auprc_excluded_classes``).

All public functions return plain Python floats / ints / lists / ``None`` so the
result is JSON-serialisable as is. Undefined quantities are ``None`` (never NaN)
and sklearn's ``UndefinedMetricWarning`` never leaks to the caller.

Where each part lives (one job per module):

* ``util.metric_classification``: :func:`classification_metrics`, the reference variants
  (:data:`METRIC_VARIANTS`) and checkpoint selection (:func:`select_metric`, :func:`metric_direction`,
  :func:`is_improvement`, :func:`is_better_epoch`);
* ``util.metric_bootstrap``: :func:`bootstrap_ci` and its resampler :func:`bootstrap_weights`;
* ``util.metric_dense``: :func:`regression_metrics`, :func:`segmentation_metrics`;
* ``util.metric_reports``: :func:`write_metrics` (JSON + CSV), :func:`log_to_tensorboard`;
* ``util.metric_plots``: :func:`plot_roc` with its bootstrap band :func:`roc_band`, :func:`plot_confusion_matrix`;
* ``util.metric_base``: the shared input validation and JSON-safe conversions.
"""
from __future__ import annotations

from util.metric_bootstrap import bootstrap_ci, bootstrap_weights
from util.metric_classification import (METRIC_VARIANTS, classification_metrics, is_better_epoch, is_improvement,
                                        legacy_excl0, macro_excl0, malignant_pr, metric_direction, retfound_score,
                                        select_metric, uspec_aupr_trapz)
from util.metric_dense import regression_metrics, segmentation_metrics
from util.metric_plots import plot_confusion_matrix, plot_roc, roc_band
from util.metric_reports import log_to_tensorboard, write_metrics

__all__ = [
    "classification_metrics",
    "retfound_score",
    "uspec_aupr_trapz",
    "macro_excl0",
    "legacy_excl0",
    "malignant_pr",
    "METRIC_VARIANTS",
    "metric_direction",
    "select_metric",
    "is_improvement",
    "is_better_epoch",
    "bootstrap_ci",
    "bootstrap_weights",
    "regression_metrics",
    "segmentation_metrics",
    "write_metrics",
    "plot_roc",
    "plot_confusion_matrix",
    "roc_band",
    "log_to_tensorboard",
]
