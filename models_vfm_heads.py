"""VisionFM's decoders on frozen-encoder features: `ClsHead`, `RegHead`, `ForecastHead` and a plain linear head.

Module and parameter names are VisionFM's (`channel_bn`, `classifier.N`, `fc_1`, `pe`), so its decoder
checkpoints load strictly. `ClsHead`/`RegHead` normalise the feature with a BatchNorm2d over the
feature viewed as [B, in_dim, 1, 1] (eps 1e-6, PyTorch momentum 0.99: the running statistics follow the
latest batch almost entirely, as the reference has it) before an MLP with GELU and dropout 0.1, whose
Linear weights start at N(0, 0.01) with zero biases.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

HEAD_TYPES = ("cls_head", "linear")


def _channel_bn(in_dim: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(in_dim, eps=1e-6, momentum=0.99)


def _mlp(widths: list[int]) -> nn.Sequential:
    """Linear -> GELU -> Dropout(0.1) between consecutive widths; Linear indices 0, 3, 6, ... as in VisionFM."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers += [nn.GELU(), nn.Dropout(p=0.1)]
    seq = nn.Sequential(*layers)
    for m in seq:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            nn.init.zeros_(m.bias)
    return seq


def _bn_flat(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        x = x[:, :, None, None]
    return bn(x).flatten(1)


class ClsHead(nn.Module):
    """channel_bn -> classifier. layers=3: in -> in/2 -> in/4 -> C (classifier.{0,3,6}); layers=2:
    in -> in/4 -> C (classifier.{0,3}); layers=1: in -> C (classifier.0)."""

    def __init__(self, in_dim: int, num_labels: int, layers: int = 3) -> None:
        super().__init__()
        widths = {3: [in_dim, in_dim // 2, in_dim // 4, num_labels], 2: [in_dim, in_dim // 4, num_labels],
                  1: [in_dim, num_labels]}.get(layers)
        if widths is None:
            raise ValueError(f"ClsHead layers must be 1, 2 or 3, got {layers}")
        self.in_dim, self.num_labels, self.layers = in_dim, num_labels, layers
        self.classifier = _mlp(widths)
        self.channel_bn = _channel_bn(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(_bn_flat(self.channel_bn, x))


class LinearHead(nn.Module):
    """One Linear layer on the raw feature (DINO's linear-probe name `linear`), weights N(0, 0.01)."""

    def __init__(self, in_dim: int, num_labels: int) -> None:
        super().__init__()
        self.in_dim, self.num_labels = in_dim, num_labels
        self.linear = nn.Linear(in_dim, num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class RegHead(nn.Module):
    """channel_bn -> Linear(in, in/4) -> GELU -> Dropout -> Linear(in/4, T) (classifier.{0,3}); VisionFM's
    biomarker decoder has in = 4 x D and T = 38."""

    def __init__(self, in_dim: int, num_targets: int = 38) -> None:
        super().__init__()
        self.in_dim, self.num_targets = in_dim, num_targets
        self.classifier = _mlp([in_dim, in_dim // 4, num_targets])
        self.channel_bn = _channel_bn(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(_bn_flat(self.channel_bn, x))


def sinusoid_table(max_len: int, dim: int) -> torch.Tensor:
    """[max_len, 1, dim]: sin on even channels, cos on odd ones, frequencies 10000^(-2i/dim) (Transformer PE)."""
    position = torch.arange(max_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(max_len, 1, dim)
    pe[:, 0, 0::2] = torch.sin(position * div)
    pe[:, 0, 1::2] = torch.cos(position * div)[:, : dim // 2]
    return pe


class ForecastHead(nn.Module):
    """Progression forecasting: feature + sinusoidal encoding of the interval in days (row `days` of a fixed
    table `pe` [max_len, 1, dim], days rounded and clamped to [0, max_len - 1]) -> fc_1 = Linear(dim, 1)."""

    def __init__(self, dim: int, max_len: int = 6500) -> None:
        super().__init__()
        self.in_dim, self.max_len = dim, max_len
        self.fc_1 = nn.Linear(dim, 1)
        self.register_buffer("pe", sinusoid_table(max_len, dim))

    def interval_index(self, days: torch.Tensor) -> torch.Tensor:
        return days.round().long().clamp(0, self.max_len - 1)

    def forward(self, x: torch.Tensor, days: torch.Tensor) -> torch.Tensor:
        return self.fc_1(x.flatten(1) + self.pe[self.interval_index(days.reshape(-1)), 0])


def build_head(task: str, in_dim: int, num_outputs: int, head_type: str = "cls_head", layers: int = 3,
               max_len: int = 6500) -> nn.Module:
    """The decoder of a task: 'cls'/'multi_cls' -> ClsHead (or LinearHead), 'metric_reg' -> RegHead (or
    LinearHead), 'forecasting' -> ForecastHead."""
    if task == "forecasting":
        return ForecastHead(in_dim, max_len)
    if head_type == "linear":
        return LinearHead(in_dim, num_outputs)
    if task == "metric_reg":
        return RegHead(in_dim, num_outputs)
    return ClsHead(in_dim, num_outputs, layers)
