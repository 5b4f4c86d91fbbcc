"""util/inference.py: the one `probabilities` and the one `extract_features` (finetuning, k-NN, explanations)."""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.inference import extract_features, probabilities  # noqa: E402


def test_probabilities_per_task():
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    torch.testing.assert_close(probabilities(logits, "multiclass"), logits.softmax(-1))
    torch.testing.assert_close(probabilities(logits, "multilabel"), torch.sigmoid(logits))
    one = torch.tensor([[0.0], [2.0]])
    p = torch.sigmoid(one)
    torch.testing.assert_close(probabilities(one, "binary_sigmoid"), p)  # one column for the metrics
    torch.testing.assert_close(probabilities(one, "binary_sigmoid", two_columns=True), torch.cat([1 - p, p], 1))
    torch.testing.assert_close(probabilities(logits, "multiclass", two_columns=True), logits.softmax(-1))
    assert probabilities(logits.half(), "multiclass").dtype == torch.float32


class _Pool(nn.Module):
    """forward_features keeps the image, forward_head(pre_logits=True) averages it per channel."""

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        assert pre_logits
        return x.mean(dim=(2, 3))


def test_extract_features_orders_by_dataset_index():
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 2, 2, 2)
    order = [3, 0, 4, 1, 2]  # a shuffled loader: two batches
    batches = [(images[order[:3]], torch.tensor(order[:3]) * 10, torch.tensor(order[:3])),
               (images[order[3:]], torch.tensor(order[3:]) * 10, order[3:])]
    feats, targets, indices = extract_features(_Pool(), batches, "cpu")
    assert indices.tolist() == [0, 1, 2, 3, 4] and targets.tolist() == [0, 10, 20, 30, 40]
    torch.testing.assert_close(feats, torch.arange(5.0).view(5, 1).expand(5, 2))
