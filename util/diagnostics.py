"""One-line warnings for classifier runs that look healthy in the log but are not learning.

Small medical datasets fail quietly: the loss sits at ln(C) (the head outputs the class prior), the model
predicts one class for every image, or the test AUROC cannot be told apart from chance. Each check
returns the warning text (or None) so callers log it and tests can assert on it.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

PLATEAU_EPOCHS = 3        # at least this many consecutive epochs at chance loss before warning ...
PLATEAU_FRACTION = 0.3    # ... and this fraction of the run, so a slow first epoch or two is not flagged
PLATEAU_TOLERANCE = 0.02  # relative distance from ln(C) that counts as "at chance"


def warmup_warning(warmup_epochs: float, epochs: int) -> str | None:
    if epochs > 0 and warmup_epochs >= epochs:
        return (f"--warmup_epochs {warmup_epochs:g} >= --epochs {epochs}: the whole run is warm-up and the learning "
                f"rate never reaches its peak; use e.g. --warmup_epochs {max(1, epochs // 10)}")
    return None


def chance_loss(num_classes: int, task: str, smoothing: float = 0.0) -> float | None:
    """Training loss of a model that outputs the uniform prior: ln(C) for softmax tasks (label
    smoothing does not change it), ln 2 for a sigmoid logit; None for multi-label (per-label priors differ)."""
    if task == "multilabel":
        return None
    return math.log(2) if task == "binary_sigmoid" else math.log(max(num_classes, 2))


def plateau_window(total_epochs: int) -> int:
    """How many consecutive epochs at chance loss make a plateau in a run of `total_epochs`."""
    return max(PLATEAU_EPOCHS, math.ceil(PLATEAU_FRACTION * total_epochs))


def plateau_warning(train_losses: Sequence[float], num_classes: int, task: str,
                    epochs: int = PLATEAU_EPOCHS) -> str | None:
    """The training loss has stayed at chance level for the last `epochs` epochs (see `plateau_window`)."""
    ref = chance_loss(num_classes, task)
    recent = [x for x in train_losses[-epochs:] if x is not None and math.isfinite(x)]
    if ref is None or len(recent) < epochs or len(train_losses) < epochs:
        return None
    if all(abs(x - ref) <= PLATEAU_TOLERANCE * ref for x in recent):
        return (f"the training loss has stayed at chance level (ln {num_classes if task != 'binary_sigmoid' else 2} "
                f"= {ref:.3f}) for {len(recent)} epochs: the model is not learning. Small dataset? try "
                f"--recipe small_data; otherwise check the labels, --blr and --warmup_epochs")
    return None


def single_class_warning(probs: np.ndarray, class_names: Sequence[str], task: str, split: str = "val") -> str | None:
    """Every image of `split` gets the same predicted class (multi-class or one sigmoid logit)."""
    probs = np.asarray(probs)
    if task == "multilabel" or probs.size == 0 or len(probs) < 2:
        return None
    pred = (probs.reshape(len(probs), -1)[:, -1] >= 0.5).astype(int) if task == "binary_sigmoid" \
        else probs.argmax(axis=1)
    values = np.unique(pred)
    if len(values) == 1:
        name = class_names[int(values[0])] if int(values[0]) < len(class_names) else str(int(values[0]))
        return (f"the model predicts '{name}' for all {len(probs)} {split} images: it has not learned to tell the "
                f"classes apart (or the threshold 0.5 does not suit the class balance)")
    return None


def chance_auroc_warning(metrics: dict[str, Any], split: str = "test") -> str | None:
    """The 95 % bootstrap CI of the AUROC contains 0.5."""
    ci = (metrics.get("ci95") or {}).get("auroc")
    if not ci or len(ci) != 2 or any(v is None or not math.isfinite(float(v)) for v in ci):
        return None
    low, high = float(ci[0]), float(ci[1])
    if low <= 0.5 <= high:
        n = metrics.get("n")
        return (f"the {split} AUROC's 95% CI [{low:.3f}, {high:.3f}] contains 0.5: on these "
                f"{n if n is not None else 'few'} images the model cannot be told apart from chance")
    return None
