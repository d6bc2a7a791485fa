"""Detection losses: CenterNet targets, the detection loss and per-partition feature imitation.

Targets (:func:`encode_targets`) for the head of :mod:`rocoin.models.detector` on an ``h × w`` map
of ``stride``-pixel cells. For a box ``x1, y1, x2, y2`` (pixels) of class ``c``, with centre
``(cx, cy)`` and size ``bw × bh`` pixels:

- its centre cell is ``(i, j) = (⌊cy / stride⌋, ⌊cx / stride⌋)`` (clipped to the map);
- ``heatmap[c]`` gets ``exp(-((x - j)² + (y - i)²) / (2σ²))`` (elementwise maximum with what is
  already there), ``σ = (2r + 1) / 6`` and ``r = max(0, ⌊gaussian_radius(bh/stride, bw/stride, 0.7)⌋)``
  cells, CenterNet's radius rule; the centre cell holds exactly 1;
- ``size[:, i, j] = (log(bw / stride), log(bh / stride))``, ``offset[:, i, j] = (cx / stride - j, cy / stride - i)``
  (in ``[0, 1)`` inside the map), ``mask[0, i, j] = 1``.

Two boxes with the same centre cell share its size/offset slot: the smaller box (by area) wins
(FCOS's rule for ambiguous locations); both still draw their heatmap peak.

:class:`DetectionLoss` is ``w_hm · focal + w_size · L1(size) + w_off · L1(offset)``: CenterNet's
penalty-reduced pixel-wise focal loss (``α = 2, β = 4``) on the sigmoid of the heatmap logits,
summed and divided by the number of peaks (cells equal to 1), and L1 losses on the two regression
maps at the masked centre cells, averaged over objects and the two coordinates.

:class:`FeatureImitationLoss` makes each student's map imitate the teacher's channels ``P_k`` at
the split point (mean squared error, optionally weighted toward object regions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Minimum IoU of a box displaced by the radius with the true box (CenterNet's ``min_overlap``).
MIN_OVERLAP = 0.7


def gaussian_radius(height: float, width: float, min_overlap: float = MIN_OVERLAP) -> float:
    """CenterNet's radius (in the units of ``height``/``width``) within which a corner shift keeps IoU ≥ ``min_overlap``.

    The three quadratic cases of the reference implementation (CornerNet/CenterNet ``gaussian_radius``), verbatim.
    """
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(max(b1 * b1 - 4 * c1, 0.0))) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(max(b2 * b2 - 16 * c2, 0.0))) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(max(b3 * b3 - 4 * a3 * c3, 0.0))) / 2
    return min(r1, r2, r3)


def _draw_gaussian(heatmap: np.ndarray, i: int, j: int, radius: int) -> None:
    """Elementwise max of ``heatmap`` (h, w) with a Gaussian peak of 1 at cell ``(i, j)``, ``σ = (2r + 1) / 6``."""
    sigma = (2 * radius + 1) / 6.0
    h, w = heatmap.shape
    top, bottom = min(i, radius), min(h - i, radius + 1)
    left, right = min(j, radius), min(w - j, radius + 1)
    ys = np.arange(-top, bottom, dtype=np.float64)[:, None]
    xs = np.arange(-left, right, dtype=np.float64)[None, :]
    gaussian = np.exp(-(xs * xs + ys * ys) / (2 * sigma * sigma)).astype(np.float32)
    region = heatmap[i - top : i + bottom, j - left : j + right]
    np.maximum(region, gaussian, out=region)


def encode_targets(
    boxes_list: Sequence[np.ndarray | torch.Tensor],
    labels_list: Sequence[np.ndarray | torch.Tensor],
    num_classes: int,
    feature_size: tuple[int, int],
    stride: int,
    *,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """CenterNet targets of a batch (see the module doc): a dict of float32 tensors
    ``heatmap`` (N, K, h, w), ``size`` (N, 2, h, w), ``offset`` (N, 2, h, w), ``mask`` (N, 1, h, w).

    ``boxes_list[n]`` is image ``n``'s (n_i, 4) xyxy boxes in pixels, ``labels_list[n]`` its (n_i,)
    class indices in ``[0, num_classes)``; ``feature_size`` is ``(h, w)`` cells of ``stride`` pixels.
    Boxes with a non-positive width or height are skipped.
    """
    if len(boxes_list) != len(labels_list):
        raise ValueError(f"{len(boxes_list)} box arrays and {len(labels_list)} label arrays")
    h, w = int(feature_size[0]), int(feature_size[1])
    n = len(boxes_list)
    heatmap = np.zeros((n, num_classes, h, w), dtype=np.float32)
    size = np.zeros((n, 2, h, w), dtype=np.float32)
    offset = np.zeros((n, 2, h, w), dtype=np.float32)
    mask = np.zeros((n, 1, h, w), dtype=np.float32)
    for b, (boxes, labels) in enumerate(zip(boxes_list, labels_list)):
        boxes = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise ValueError(f"image {b}: {len(boxes)} boxes and {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"image {b}: labels {labels.tolist()} outside [0, {num_classes})")
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        for o in np.argsort(-(widths * heights), kind="stable"):  # largest first: smaller boxes overwrite shared cells
            bw, bh = widths[o], heights[o]
            if not (bw > 0 and bh > 0):
                continue
            cx, cy = (boxes[o, 0] + boxes[o, 2]) / 2 / stride, (boxes[o, 1] + boxes[o, 3]) / 2 / stride
            j, i = min(max(int(math.floor(cx)), 0), w - 1), min(max(int(math.floor(cy)), 0), h - 1)
            radius = max(0, int(gaussian_radius(bh / stride, bw / stride)))
            _draw_gaussian(heatmap[b, labels[o]], i, j, radius)
            size[b, :, i, j] = (math.log(bw / stride), math.log(bh / stride))
            offset[b, :, i, j] = (cx - j, cy - i)
            mask[b, 0, i, j] = 1.0
    arrays = {"heatmap": heatmap, "size": size, "offset": offset, "mask": mask}
    return {key: torch.from_numpy(value).to(device) if device is not None else torch.from_numpy(value) for key, value in arrays.items()}


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on heatmap ``logits`` against the Gaussian ``target``,
    summed over all cells and divided by ``max(1, number of cells where target == 1)``.

    ``-(1-p)^α log p`` at peaks, ``-(1-y)^β p^α log(1-p)`` elsewhere, ``p = sigmoid(logits)``
    (log-probabilities via ``logsigmoid`` for stability)."""
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    p = log_p.exp()
    positive = target.eq(1).to(logits.dtype)
    pos_loss = -((1 - p).pow(alpha) * log_p * positive).sum()
    neg_loss = -((1 - target).pow(beta) * p.pow(alpha) * log_not_p * (1 - positive)).sum()
    return (pos_loss + neg_loss) / positive.sum().clamp(min=1.0)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ |pred - target| · mask / (channels · max(1, Σ mask))``: the mean L1 per object and coordinate, (N, C, h, w) vs mask (N, 1, h, w)."""
    return ((pred - target).abs() * mask).sum() / (pred.shape[1] * mask.sum().clamp(min=1.0))


class DetectionLoss(nn.Module):
    """``heatmap_weight · focal + size_weight · L1(log size) + offset_weight · L1(offset)``.

    ``forward(outputs, targets)`` takes the head's dict (``heatmap`` logits, ``size``, ``offset``)
    and :func:`encode_targets`' dict; it returns the total (a tensor) and each term's value (floats),
    like :class:`rocoin.distillation.losses.DistillationLoss`.
    """

    def __init__(self, *, heatmap_weight: float = 1.0, size_weight: float = 1.0, offset_weight: float = 1.0) -> None:
        super().__init__()
        if min(heatmap_weight, size_weight, offset_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        self.heatmap_weight, self.size_weight, self.offset_weight = heatmap_weight, size_weight, offset_weight

    def forward(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = targets["mask"]
        heatmap = focal_loss(outputs["heatmap"], targets["heatmap"])
        size = masked_l1(outputs["size"], targets["size"], mask)
        offset = masked_l1(outputs["offset"], targets["offset"], mask)
        total = self.heatmap_weight * heatmap + self.size_weight * size + self.offset_weight * offset
        values = {"heatmap": heatmap, "size": size, "offset": offset, "total": total}
        return total, {k: float(v.detach()) for k, v in values.items()}

    def extra_repr(self) -> str:
        return f"L = {self.heatmap_weight:g}·focal + {self.size_weight:g}·L1(size) + {self.offset_weight:g}·L1(offset)"


def object_weights(
    boxes_list: Sequence[np.ndarray | torch.Tensor],
    feature_size: tuple[int, int],
    stride: int,
    background_weight: float = 0.1,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-cell weights (N, 1, h, w) float32 for :class:`FeatureImitationLoss`: 1 for cells whose
    ``stride``-pixel square overlaps a box, ``background_weight`` elsewhere."""
    h, w = int(feature_size[0]), int(feature_size[1])
    weights = np.full((len(boxes_list), 1, h, w), background_weight, dtype=np.float32)
    for b, boxes in enumerate(boxes_list):
        boxes = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64).reshape(-1, 4)
        for x1, y1, x2, y2 in boxes:
            j1, i1 = max(int(math.floor(x1 / stride)), 0), max(int(math.floor(y1 / stride)), 0)
            j2, i2 = min(int(math.ceil(x2 / stride)), w), min(int(math.ceil(y2 / stride)), h)
            weights[b, 0, i1:i2, j1:j2] = 1.0
    tensor = torch.from_numpy(weights)
    return tensor if device is None else tensor.to(device)


class FeatureImitationLoss(nn.Module):
    """``Σ_k Σ w·(s_k − t[:, P_k])² / (|P_k| · Σ w)``: each student's map ``s_k`` (N, |P_k|, h, w)
    against the teacher's channels ``P_k`` of the split-point map ``t`` (N, F, h, w).

    Without ``weights`` (or with all weights 1) each term is the plain mean squared error over its
    partition's elements. ``weights`` (N, 1, h, w), e.g. :func:`object_weights`, shifts the average
    toward object regions (FitNet-style hints restricted toward objects, as in fine-grained
    feature imitation). Terms are summed over the partitions, like the attention-transfer term of
    the classification loss; the teacher's map is detached.
    """

    def forward(
        self,
        student_maps: Sequence[torch.Tensor],
        teacher_features: torch.Tensor,
        partitions: Sequence[Sequence[int]],
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if len(student_maps) != len(partitions):
            raise ValueError(f"{len(student_maps)} student maps for {len(partitions)} partitions")
        teacher = teacher_features.detach()
        total = teacher.new_zeros(())
        for student, part in zip(student_maps, partitions):
            index = torch.as_tensor(list(part), dtype=torch.long, device=teacher.device)
            target = teacher.index_select(1, index)
            if student.shape != target.shape:
                raise ValueError(f"student map {tuple(student.shape)} vs teacher channels {tuple(target.shape)}")
            squared = (student - target).pow(2)
            if weights is None:
                total = total + squared.mean()
            else:
                w = weights.to(squared.dtype)
                total = total + (squared * w).sum() / (w.sum().clamp(min=1e-12) * squared.shape[1])
        return total

    def extra_repr(self) -> str:
        return "Σ_k mean_w (s_k − t[P_k])²"
