"""Wide-ResNet WRN-d-k, CIFAR variant (Zagoruyko & Komodakis, 2016).

A 3×3 stem convolution to 16 channels, three stages of ``n = (d - 4) / 6`` pre-activation basic
blocks of widths ``16k, 32k, 64k`` (strides 1, 2, 2), a final BN-ReLU, global average pooling
and an FC head. Convolutions have no bias; a block whose width (or stride) changes gets a 1×1
shortcut convolution applied to its pre-activated input. This is exactly the layer structure
that :func:`rocoin.models.analytic.wrn_stats` counts, so parameter and FLOP counts agree.

Any number of input channels and any input size work: a 32×32 input ends in an 8×8 map, 28×28
in 7×7, 8×8 in 2×2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rocoin.contracts.errors import RocoinError
from rocoin.models.init import init_weights

STEM_CHANNELS = 16
STAGE_WIDTHS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3 plus an identity or 1×1-conv shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        needs_projection = in_channels != out_channels or stride != 1
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x), inplace=True)
        # With a projection the shortcut starts from the pre-activated input (as in the reference
        # implementation); an identity shortcut carries the raw input.
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = F.relu(self.bn2(self.conv1(activated)), inplace=True)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``; ``forward_features`` ends after the final BN-ReLU."""

    def __init__(self, depth: int, widen: int, *, in_channels: int = 3, num_classes: int = 10, drop_rate: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise RocoinError(f"WRN depth = {depth}: expected 6n+4 (10, 16, 22, 28, 40, ...)")
        if widen < 1:
            raise RocoinError(f"WRN widening factor = {widen}: expected an integer >= 1")
        if in_channels < 1 or num_classes < 1:
            raise RocoinError(f"in_channels = {in_channels}, num_classes = {num_classes}: expected positive integers")
        if not 0.0 <= drop_rate < 1.0:
            raise RocoinError(f"drop_rate = {drop_rate}: expected a probability in [0, 1)")
        blocks_per_stage = (depth - 4) // 6
        self.depth, self.widen = depth, widen

        self.stem = nn.Conv2d(in_channels, STEM_CHANNELS, 3, stride=1, padding=1, bias=False)
        stages = []
        channels = STEM_CHANNELS
        for base, stride in zip(STAGE_WIDTHS, STAGE_STRIDES):
            width = base * widen
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(PreActBasicBlock(channels, width, stride if index == 0 else 1, drop_rate))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.num_features = channels
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.stages(self.stem(x))), inplace=True)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
