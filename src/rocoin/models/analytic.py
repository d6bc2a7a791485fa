"""Shape arithmetic for the CIFAR-style Wide-ResNet and MobileNetV2 (no torch needed).

Counts follow the layers of the standard CIFAR variants:

- WRN-d-k (Zagoruyko & Komodakis): 3×3 stem to 16 channels, three stages of ``(d-4)/6``
  pre-activation basic blocks with widths ``16k, 32k, 64k`` (strides 1, 2, 2; a 1×1 shortcut
  conv where the width changes), BN-ReLU, global average pooling, FC.
- MobileNetV2-w (Sandler et al., CIFAR variant): stride-1 stem and stride 1 in the second stage,
  inverted residuals with the standard ``(t, c, n, s)`` table scaled by ``w``, a 1×1 conv to
  ``max(1280, 1280·w)`` channels, pooling, FC.

FLOPs are ``2 × multiply-accumulates`` of convolutions and FC (BN/ReLU/add ignored), the
convention of ``torch.utils.flop_counter``. Memory is ``4 bytes × parameters`` (fp32 weights)
plus the peak of ``input + output`` activation bytes over the layers, for batch size 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rocoin.contracts.errors import RocoinError

#: Students of the built-in catalog: the paper's CIFAR-10/100 students and MobileNetV2 variants.
DEFAULT_STUDENTS = (
    "wrn-16-1",
    "wrn-16-2",
    "wrn-16-3",
    "wrn-22-1",
    "mobilenetv2-0.25",
    "mobilenetv2-0.5",
    "mobilenetv2-1.0",
)


BYTES_PER_FLOAT = 4


@dataclass(frozen=True)
class ArchStats:
    params: int
    flops: int
    peak_activation_bytes: int
    out_dim: int

    @property
    def memory_bytes(self) -> int:
        return BYTES_PER_FLOAT * self.params + self.peak_activation_bytes


class _Counter:
    """Walks a network layer by layer, tracking the current map shape."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        self.c, self.h, self.w = channels, height, width
        self.params = 0
        self.macs = 0
        self.peak = 0

    def _activation(self, c: int, h: int, w: int) -> int:
        return c * h * w * BYTES_PER_FLOAT

    def conv(self, out_c: int, kernel: int, stride: int = 1, groups: int = 1, *, apply: bool = True) -> tuple[int, int, int]:
        h = (self.h + 2 * (kernel // 2) - kernel) // stride + 1
        w = (self.w + 2 * (kernel // 2) - kernel) // stride + 1
        in_per_group = self.c // groups
        self.params += out_c * in_per_group * kernel * kernel
        self.macs += out_c * h * w * in_per_group * kernel * kernel
        self.peak = max(self.peak, self._activation(self.c, self.h, self.w) + self._activation(out_c, h, w))
        if apply:
            self.c, self.h, self.w = out_c, h, w
        return out_c, h, w

    def bn(self) -> None:
        self.params += 2 * self.c

    def fc(self, out_features: int) -> None:
        self.params += self.c * out_features + out_features
        self.macs += self.c * out_features


def wrn_stats(depth: int, widen: int, in_shape: tuple[int, int, int], num_classes: int) -> ArchStats:
    if (depth - 4) % 6 != 0 or depth < 10:
        raise RocoinError(f"WRN depth = {depth}: expected 6n+4 (10, 16, 22, 28, 40, ...)")
    n = (depth - 4) // 6
    counter = _Counter(*in_shape)
    counter.conv(16, 3)
    for width, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
        for block in range(n):
            s = stride if block == 0 else 1
            in_c = counter.c
            counter.bn()
            if in_c != width:
                counter.conv(width, 1, s, apply=False)  # shortcut from the block input
            counter.conv(width, 3, s)
            counter.bn()
            counter.conv(width, 3)
    counter.bn()
    out_dim = counter.c
    counter.fc(num_classes)
    return ArchStats(counter.params, 2 * counter.macs, counter.peak, out_dim)


def _make_divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenetv2_stats(width_mult: float, in_shape: tuple[int, int, int], num_classes: int) -> ArchStats:
    if not 0 < width_mult <= 4:
        raise RocoinError(f"MobileNetV2 width = {width_mult}: expected a multiplier in (0, 4]")
    counter = _Counter(*in_shape)
    counter.conv(_make_divisible(32 * width_mult), 3, 1)
    counter.bn()
    for t, c, n, s in MOBILENETV2_SETTINGS:
        out_c = _make_divisible(c * width_mult)
        for i in range(n):
            stride = s if i == 0 else 1
            in_c = counter.c
            hidden = in_c * t
            if t != 1:
                counter.conv(hidden, 1)
                counter.bn()
            counter.conv(hidden, 3, stride, groups=hidden)
            counter.bn()
            counter.conv(out_c, 1)
            counter.bn()
            del in_c
    counter.conv(_make_divisible(1280 * max(1.0, width_mult)), 1)
    counter.bn()
    out_dim = counter.c
    counter.fc(num_classes)
    return ArchStats(counter.params, 2 * counter.macs, counter.peak, out_dim)


_WRN = re.compile(r"^wrn-(\d+)-(\d+)$")
_MBV2 = re.compile(r"^mobilenetv2-(\d+(?:\.\d+)?)$")


def arch_stats(name: str, in_shape: tuple[int, int, int], num_classes: int) -> ArchStats:
    """Stats of a registry name such as ``wrn-16-1`` or ``mobilenetv2-0.5``."""
    if match := _WRN.match(name):
        return wrn_stats(int(match[1]), int(match[2]), in_shape, num_classes)
    if match := _MBV2.match(name):
        return mobilenetv2_stats(float(match[1]), in_shape, num_classes)
    raise RocoinError(f"architecture = {name!r}: expected wrn-D-K or mobilenetv2-W")
