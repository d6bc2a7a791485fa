"""Single-stage anchor-free detectors (CenterNet style) and their RoCoIn students (the paper's Table V).

The paper distils YOLOv5-s into students that replace its backbone ("BC") or its backbone and neck
("BNC"). Here the teacher is a small CenterNet-style detector with the same three parts:

- **backbone** (:class:`DetectionBackbone`): a 3×3 stride-2 stem convolution to 16 channels (YOLO's
  stems also halve the resolution first), three stages of ``n = (D - 4) / 6`` pre-activation basic
  blocks of :mod:`rocoin.models.wrn` with widths ``16K, 32K, 64K`` and strides **2, 2, 1**, and a
  final BN-ReLU: ONE feature map of ``64K`` channels at output stride 8 (a 1×64×64 image gives
  ``64K × 8 × 8``). YOLO passes three scales (strides 8, 16, 32) from the backbone to the neck;
  here a single scale keeps the split point one tensor, so a device's partition is one
  ``|P_k| × h × w`` map and the source concatenates along channels only. The objects of the
  target data (14–32 px garments on 64×64 canvases) are 2–4 cells wide at stride 8. (The
  stride-2 stem and the stride-1 last stage keep the convolutions off the 64×64 and 32×32 grids,
  which is what makes a training step fast enough on two CPU cores.)
- **neck** (:class:`DilatedNeck`): one pre-activation bottleneck residual block per entry of
  :data:`NECK_DILATIONS` (2 and 4: a 1×1 reduction to half the channels, a dilated 3×3, a 1×1
  expansion) followed by BN-ReLU, which widens the receptive field while keeping the channel count
  and the spatial size (the role of YOLO's SPPF/PAN).
- **head** (:class:`CenterNetHead`): a shared 3×3 convolution to :data:`HEAD_CHANNELS` channels
  with bias and ReLU, then three 1×1 convolutions. For ``K`` classes and a map of ``h × w`` cells
  of ``stride`` pixels, :meth:`Detector.forward` returns a dict of float32 tensors

  - ``heatmap`` ``(N, K, h, w)``: class-centre **logits**; ``sigmoid`` gives the probability that
    an object of class ``k`` has its centre in cell ``(i, j)``;
  - ``size`` ``(N, 2, h, w)``: ``(log(w / stride), log(h / stride))`` of the box whose centre is in
    the cell, i.e. the natural log of its width and height in cells;
  - ``offset`` ``(N, 2, h, w)``: ``(dx, dy)``, the centre's position inside the cell in cells
    (the target lies in ``[0, 1)``): ``centre_x = (j + dx) · stride`` pixels, likewise ``y`` with
    ``i`` and ``dy``.

  :func:`rocoin.models.boxes.decode` turns ``heatmap`` and ``cat([size, offset], 1)`` (the
  ``box`` output of :class:`DetectorRest`) into boxes with numpy only.

Split points: ``"backbone"`` (BC: students produce the backbone's output, the source runs neck and
head) and ``"neck"`` (BNC: students produce the neck's output, the source runs the head only). At
both the map is ``64K × H/8 × W/8`` and non-negative (it follows a ReLU).

Students (:class:`DetectorStudent`) are named like the classifier students, ``wrn-D-K``: the same
stride-8 backbone at depth ``D`` and widening ``K`` (for ``"neck"`` followed by a
:class:`DilatedNeck` of the student's width) and a 1×1 bridge convolution (with bias) to
``|P_k|`` channels, the student's partition of the teacher's channels at the split point.

Every module here exports with the legacy ``torch.onnx.export`` (opset 13–20) and runs in
onnxruntime. Inputs need ``H`` and ``W`` divisible by :data:`OUTPUT_STRIDE`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rocoin.contracts.errors import RocoinError
from rocoin.models.init import init_weights
from rocoin.models.registry import parse_model_name
from rocoin.models.wrn import STAGE_WIDTHS, STEM_CHANNELS, PreActBasicBlock

#: Output stride of every backbone: three stride-2 stages.
OUTPUT_STRIDE = 8
STEM_STRIDE = 2
DETECTION_STAGE_STRIDES = (2, 2, 1)
#: Dilations of the neck's residual blocks (one 3×3 convolution each).
NECK_DILATIONS = (2, 4)
NECK_REDUCTION = 2
#: Channels of the head's shared 3×3 convolution.
HEAD_CHANNELS = 64
#: Initial heatmap bias: sigmoid(b) = 0.1, the focal-loss prior (CenterNet uses -2.19).
HEATMAP_PRIOR = 0.1
SPLIT_POINTS = ("backbone", "neck")
#: Head output names, in the order of :meth:`Detector.forward`'s dict and of :class:`DetectorRest` (``box`` = size ‖ offset).
HEAD_OUTPUTS = ("heatmap", "size", "offset")
REST_OUTPUTS = ("heatmap", "box")

#: The default teacher: 0.87 M parameters, 124 MFLOPs per 1×64×64 image (10 classes). A training step
#: (forward, backward, Adam) on a batch of 64 such images ran at 280–390 images/s on this project's 2-core
#: CPU (``torch.set_num_threads(2)``) when it had the cores to itself, 80–130 images/s while other jobs shared
#: them; ``det-wrn-10-2`` (68 MFLOPs) ran at 470–590 images/s.
DEFAULT_TEACHER = "det-wrn-16-2"
#: Student architectures of the built-in detection catalog (backbone depth/width as in ``wrn-D-K``).
DEFAULT_DETECTION_STUDENTS = ("wrn-10-1", "wrn-16-1", "wrn-10-2")

_DET_WRN = re.compile(r"det-wrn-(\d+)-(\d+)")


def _check_split_point(point: str) -> str:
    if point not in SPLIT_POINTS:
        raise RocoinError(f"split point = {point!r}: expected one of {', '.join(SPLIT_POINTS)}")
    return point


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RocoinError(f"{name} = {value!r}: expected a positive integer")
    return value


class DetectionBackbone(nn.Module):
    """Stride-8 pre-activation WRN-``depth``-``widen`` trunk: (N, C, H, W) -> (N, 64·widen, H/8, W/8), after BN-ReLU."""

    def __init__(self, depth: int, widen: int, in_channels: int) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise RocoinError(f"WRN depth = {depth}: expected 6n+4 (10, 16, 22, 28, 40, ...)")
        if widen < 1:
            raise RocoinError(f"WRN widening factor = {widen}: expected an integer >= 1")
        _check_positive("in_channels", in_channels)
        self.depth, self.widen = depth, widen
        blocks_per_stage = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, STEM_CHANNELS, 3, stride=STEM_STRIDE, padding=1, bias=False)
        stages = []
        channels = STEM_CHANNELS
        for base, stride in zip(STAGE_WIDTHS, DETECTION_STAGE_STRIDES):
            width = base * widen
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(PreActBasicBlock(channels, width, stride if index == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.stages(self.stem(x))))


class DilatedResidual(nn.Module):
    """Pre-activation bottleneck ``x + conv1×1(BR(conv3×3_d(BR(conv1×1(BR(x))))))``, ``BR`` = BN-ReLU, the
    3×3 convolution dilated by ``d`` at ``channels / NECK_REDUCTION`` channels: same channels and size,
    receptive field +2d cells."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        hidden = max(1, channels // NECK_REDUCTION)
        self.bn1 = nn.BatchNorm2d(channels)
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn3 = nn.BatchNorm2d(hidden)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.reduce(F.relu(self.bn1(x)))
        out = self.conv(F.relu(self.bn2(out)))
        return x + self.expand(F.relu(self.bn3(out)))


class DilatedNeck(nn.Module):
    """Residual dilated blocks then BN-ReLU: (N, C, h, w) -> (N, C, h, w), non-negative."""

    def __init__(self, channels: int, dilations: Sequence[int] = NECK_DILATIONS) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(DilatedResidual(channels, d) for d in dilations))
        self.bn = nn.BatchNorm2d(channels)
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.blocks(x)))


class CenterNetHead(nn.Module):
    """Shared conv3×3 (bias) + ReLU, then 1×1 convolutions to ``heatmap`` (K), ``size`` (2) and ``offset`` (2)."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = HEAD_CHANNELS) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1, bias=True)
        self.heatmap = nn.Conv2d(hidden, num_classes, 1)
        self.size = nn.Conv2d(hidden, 2, 1)
        self.offset = nn.Conv2d(hidden, 2, 1)

    def reset_output_biases(self) -> None:
        """Output convolutions start small (weights N(0, 0.01)): every heatmap score near the focal-loss prior
        :data:`HEATMAP_PRIOR`, boxes near one cell wide and centred in their cell."""
        for conv in (self.heatmap, self.size, self.offset):
            nn.init.normal_(conv.weight, 0.0, 0.01)
        nn.init.constant_(self.heatmap.bias, -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
        nn.init.zeros_(self.size.bias)
        nn.init.constant_(self.offset.bias, 0.5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = F.relu(self.conv(x))
        return {"heatmap": self.heatmap(hidden), "size": self.size(hidden), "offset": self.offset(hidden)}


class Detector(nn.Module):
    """The teacher: ``backbone`` -> ``neck`` -> ``head``; ``forward(x)`` returns the head's dict (see the module doc)."""

    stride = OUTPUT_STRIDE

    def __init__(self, depth: int, widen: int, *, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        _check_positive("num_classes", num_classes)
        self.backbone = DetectionBackbone(depth, widen, in_channels)
        channels = self.backbone.num_features
        self.neck = DilatedNeck(channels)
        self.head = CenterNetHead(channels, num_classes)
        self.in_channels, self.num_classes, self.num_features = in_channels, num_classes, channels
        init_weights(self)
        self.head.reset_output_biases()

    def split_channels(self, point: str) -> int:
        """Channels of the map at ``point`` (the same at both points)."""
        _check_split_point(point)
        return self.num_features

    def feature_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` of the split-point map for an input of ``image_size`` (H, W) pixels, both divisible by the stride."""
        height, width = image_size
        if height % self.stride or width % self.stride:
            raise RocoinError(f"image size {height}×{width}: expected both divisible by the output stride {self.stride}")
        return height // self.stride, width // self.stride

    def features(self, x: torch.Tensor, point: str) -> torch.Tensor:
        """The split-point map ``(N, 64K, H/8, W/8)``: the backbone's output, or the neck's for ``"neck"``."""
        features = self.backbone(x)
        return self.neck(features) if _check_split_point(point) == "neck" else features

    def rest(self, features: torch.Tensor, point: str) -> dict[str, torch.Tensor]:
        """What the source runs on the (assembled) split-point map: neck and head after ``"backbone"``, the head after ``"neck"``."""
        if _check_split_point(point) == "backbone":
            features = self.neck(features)
        return self.head(features)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.neck(self.backbone(x)))

    def front(self, point: str) -> nn.Module:
        """The teacher's part before the split (a module, for counting FLOPs/parameters or exporting)."""
        return DetectorFront(self, point)

    def rest_module(self, point: str) -> DetectorRest:
        """The part after the split as a module returning ``(heatmap, box)``, what the source exports."""
        return DetectorRest(self, point)


class DetectorFront(nn.Module):
    """``detector.features(x, point)`` as a module; shares the detector's parameters."""

    def __init__(self, detector: Detector, point: str) -> None:
        super().__init__()
        self.point = _check_split_point(point)
        self.backbone = detector.backbone
        self.neck = detector.neck if point == "neck" else None
        self.num_features = detector.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        return features if self.neck is None else self.neck(features)


class DetectorRest(nn.Module):
    """``detector.rest(features, point)`` as a module for export: (N, 64K, h, w) ->
    ``heatmap`` (N, K, h, w) logits and ``box`` (N, 4, h, w) = ``size ‖ offset`` along channels
    (``log w, log h`` in cells, then ``dx, dy`` in cells), the two inputs of :func:`rocoin.models.boxes.decode`."""

    def __init__(self, detector: Detector, point: str) -> None:
        super().__init__()
        self.point = _check_split_point(point)
        self.neck = detector.neck if point == "backbone" else None
        self.head = detector.head
        self.num_features = detector.num_classes + 4

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.neck is not None:
            features = self.neck(features)
        out = self.head(features)
        return out["heatmap"], torch.cat([out["size"], out["offset"]], dim=1)


def parse_detector_name(name: str) -> tuple[int, int]:
    """``"det-wrn-16-2"`` -> ``(16, 2)`` (backbone depth and widening)."""
    match = _DET_WRN.fullmatch(str(name))
    if match is not None:
        depth, widen = int(match[1]), int(match[2])
        if depth >= 10 and (depth - 4) % 6 == 0 and widen >= 1:
            return depth, widen
    raise RocoinError(f"detector = {name!r}: expected det-wrn-D-K (D = 6n+4 >= 10, K >= 1, e.g. {DEFAULT_TEACHER})")


def build_detector(name: str = DEFAULT_TEACHER, in_channels: int = 1, num_classes: int = 10) -> Detector:
    """A freshly initialised teacher detector ``det-wrn-D-K``."""
    depth, widen = parse_detector_name(name)
    _check_positive("in_channels", in_channels)
    _check_positive("num_classes", num_classes)
    return Detector(depth, widen, in_channels=in_channels, num_classes=num_classes)


def detector_names() -> tuple[str, ...]:
    """The named teachers: ``det-wrn-10-2`` (one block per stage) and the default ``det-wrn-16-2``."""
    return ("det-wrn-10-2", "det-wrn-16-2")


class DetectorStudent(nn.Module):
    """A device's model at a detection split point: compressed backbone (``"backbone"``, BC) or backbone
    and neck (``"neck"``, BNC), then a 1×1 bridge (with bias): (N, C, H, W) -> (N, |P_k|, H/8, W/8).

    The output approximates the teacher's channels ``P_k`` at the split point (trained with
    :class:`rocoin.distillation.detection_losses.FeatureImitationLoss` and the detection loss
    through the teacher's frozen rest); it is not passed through a ReLU.
    """

    stride = OUTPUT_STRIDE

    def __init__(self, arch: str, point: str, out_channels: int, in_channels: int = 1, feature_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        prefix, args = parse_model_name(arch)
        if prefix != "wrn":
            raise RocoinError(f"detection student = {arch!r}: expected wrn-D-K (the backbone's depth and widening, e.g. wrn-16-1)")
        _check_positive("out_channels", out_channels)
        _check_positive("in_channels", in_channels)
        self.arch, self.point = arch, _check_split_point(point)
        self.backbone = DetectionBackbone(*args, in_channels=in_channels)
        self.neck = DilatedNeck(self.backbone.num_features) if point == "neck" else None
        self.bridge = nn.Conv2d(self.backbone.num_features, out_channels, kernel_size=1, bias=True)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_features = out_channels  # what rocoin.models.measure reads as out_dim
        self.feature_size = None if feature_size is None else (int(feature_size[0]), int(feature_size[1]))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        if self.neck is not None:
            features = self.neck(features)
        return self.bridge(features)

    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images whose split-point map is ``feature_size`` (for counting FLOPs)."""
        if self.feature_size is None:
            raise RocoinError("this student was built without feature_size: pass the input shape explicitly")
        return self.in_channels, self.feature_size[0] * self.stride, self.feature_size[1] * self.stride


def build_detector_student(
    arch: str, point: str, out_channels: int, in_channels: int = 1, feature_size: tuple[int, int] | None = None
) -> DetectorStudent:
    """A student ``arch`` (``wrn-D-K``) for split ``point`` producing ``out_channels`` = |P_k| maps.

    ``feature_size`` is the teacher's split-point ``(h, w)`` for the training images; when given the
    student is checked to produce exactly that size for ``(h·8) × (w·8)`` inputs and remembers it.
    """
    student = DetectorStudent(arch, point, out_channels, in_channels, feature_size)
    if student.feature_size is not None:
        h, w = student.feature_size
        _check_positive("feature height", h)
        _check_positive("feature width", w)
        was_training = student.training
        student.eval()
        with torch.no_grad():
            shape = tuple(student(torch.zeros(1, in_channels, h * OUTPUT_STRIDE, w * OUTPUT_STRIDE)).shape)
        student.train(was_training)
        if shape != (1, out_channels, h, w):
            raise RocoinError(f"student {arch}: output {shape[1:]} for the split point, expected {(out_channels, h, w)}")
    return student


def assemble_features(
    maps: Sequence[torch.Tensor], partitions: Sequence[Sequence[int]], num_channels: int, missing: torch.Tensor | None = None
) -> torch.Tensor:
    """The source's split-point map from the students' outputs: ``maps[k]`` (N, |P_k|, h, w) goes to
    channels ``partitions[k]`` (in that order) of an (N, ``num_channels``, h, w) map; channels of no
    partition and of missing groups are zero. ``missing`` (N, K) bool marks group ``k`` missing for
    sample ``n`` (the deadline's zero-filling); differentiable w.r.t. the maps."""
    if len(maps) != len(partitions):
        raise RocoinError(f"{len(maps)} maps for {len(partitions)} partitions")
    if not maps:
        raise RocoinError("no student maps to assemble")
    n, _, h, w = maps[0].shape
    order = [int(c) for part in partitions for c in part]
    if len(set(order)) != len(order) or any(not 0 <= c < num_channels for c in order):
        raise RocoinError(f"partitions must be disjoint channel indices in [0, {num_channels})")
    stacked = torch.cat(list(maps), dim=1)
    if missing is not None:
        keep = torch.cat([(~missing[:, k : k + 1]).to(stacked.dtype).expand(n, len(part)) for k, part in enumerate(partitions)], dim=1)
        stacked = stacked * keep[:, :, None, None]
    out = stacked.new_zeros((n, num_channels, h, w))
    index = torch.tensor(order, dtype=torch.long, device=stacked.device)
    return out.index_copy(1, index, stacked)


def count_flops_params(module: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int, int]:
    """``(FLOPs, parameters)`` of one batch-1 forward of ``module`` on a ``(C, H, W)`` input.

    FLOPs are ``2 × multiply-accumulates`` of convolutions (and matrix products), counted by
    :func:`rocoin.models.measure.count_flops` (``torch.utils.flop_counter``); BN, activations,
    additions and biases are not counted. Parameters are all of the module's parameters (shared
    ones once). The module is put in eval mode.
    """
    from rocoin.models.measure import count_flops

    module.eval()
    return count_flops(module, tuple(int(v) for v in input_shape)), sum(p.numel() for p in module.parameters())
