"""MobileNetV2 with a width multiplier, CIFAR variant (Sandler et al., 2018).

A stride-1 3×3 stem, inverted residual blocks from the standard ``(t, c, n, s)`` table with the
second stage's stride lowered from 2 to 1 (so a 32×32 input ends in a 4×4 map, 28×28 in 4×4 as
well — 28 → 14 → 7 → 4), a 1×1 convolution to ``max(1280, 1280·w)`` channels, BN, ReLU6, global
average pooling and an FC head. Channel counts are rounded to multiples of 8 as in the reference
implementation. The table and the rounding are shared with
:func:`rocoin.models.analytic.mobilenetv2_stats`, which counts exactly these layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rocoin.contracts.errors import RocoinError
from rocoin.models.analytic import MOBILENETV2_SETTINGS
from rocoin.models.analytic import _make_divisible as make_divisible
from rocoin.models.init import init_weights

STEM_CHANNELS = 32
LAST_CHANNELS = 1280
MAX_WIDTH_MULT = 4.0


def conv_bn(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1, *, activation: bool = True
) -> nn.Sequential:
    """Conv (no bias, "same" padding) + BN (+ ReLU6)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if activation:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1×1 expansion (skipped when t = 1), 3×3 depthwise, linear 1×1 projection; identity skip
    when the stride is 1 and the width is unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn(in_channels, hidden, 1))
        layers.append(conv_bn(hidden, hidden, 3, stride, groups=hidden))
        layers.append(conv_bn(hidden, out_channels, 1, activation=False))
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2-``width_mult``; ``forward_features`` ends after the last 1×1 conv-BN-ReLU6."""

    def __init__(self, width_mult: float = 1.0, *, in_channels: int = 3, num_classes: int = 10, drop_rate: float = 0.0) -> None:
        super().__init__()
        if not 0 < width_mult <= MAX_WIDTH_MULT:
            raise RocoinError(f"MobileNetV2 width = {width_mult}: expected a multiplier in (0, {MAX_WIDTH_MULT:g}]")
        if in_channels < 1 or num_classes < 1:
            raise RocoinError(f"in_channels = {in_channels}, num_classes = {num_classes}: expected positive integers")
        if not 0.0 <= drop_rate < 1.0:
            raise RocoinError(f"drop_rate = {drop_rate}: expected a probability in [0, 1)")
        self.width_mult = width_mult
        self.drop_rate = drop_rate

        channels = make_divisible(STEM_CHANNELS * width_mult)
        layers: list[nn.Module] = [conv_bn(in_channels, channels, 3, stride=1)]
        for expand_ratio, base, repeats, stride in MOBILENETV2_SETTINGS:
            out_channels = make_divisible(base * width_mult)
            for index in range(repeats):
                layers.append(InvertedResidual(channels, out_channels, stride if index == 0 else 1, expand_ratio))
                channels = out_channels
        self.num_features = make_divisible(LAST_CHANNELS * max(1.0, width_mult))
        layers.append(conv_bn(channels, self.num_features, 1))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self, fc_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
        if self.drop_rate > 0:
            pooled = F.dropout(pooled, p=self.drop_rate, training=self.training)
        return self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
