"""Boxes from the detection head's outputs, NMS and fixed-size packing — numpy only (the source has no torch).

Box convention: ``x1, y1, x2, y2`` in absolute input pixels (continuous coordinates, pixel
``(row, col)`` covers ``[col, col + 1) × [row, row + 1)``), float32.

The head (:mod:`rocoin.models.detector`) outputs, for ``N`` images, ``K`` classes and a map of
``h × w`` cells of ``stride`` pixels:

- ``heatmap_logits`` ``(N, K, h, w)``: class-centre logits (probability = sigmoid);
- ``box_regression`` ``(N, 4, h, w)``: channels ``(log(bw / stride), log(bh / stride), dx, dy)``,
  i.e. the log of the box's width and height in cells, then the centre's offset inside its cell in
  cells. A detection at cell ``(i, j)`` (row, column) is the box of centre
  ``((j + dx)·stride, (i + dy)·stride)`` and size ``(exp(·)·stride)``.

:func:`decode` keeps local maxima of the sigmoid heatmap (a ``pool × pool`` max filter, CenterNet's
"NMS") above ``score_threshold``, the ``max_detections`` best per image, optionally followed by a
class-wise IoU NMS.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: exp() of the log-size regression is clipped here (cells): keeps a wild output from overflowing.
MAX_LOG_SIZE = 10.0

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (n, 4) float32, scores (n,) float32, labels (n,) int64


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float32."""
    x = np.asarray(x, dtype=np.float32)
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    e = np.exp(x[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def _max_filter(x: np.ndarray, size: int) -> np.ndarray:
    """``size × size`` max filter (stride 1, ``-inf`` padding) over the last two axes."""
    if size <= 1:
        return x
    pad = size // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(pad, pad), (pad, pad)], constant_values=-np.inf)
    h, w = x.shape[-2:]
    out = np.full_like(x, -np.inf)
    for di in range(size):
        for dj in range(size):
            np.maximum(out, padded[..., di : di + h, dj : dj + w], out=out)
    return out


def decode(
    heatmap_logits: np.ndarray,
    box_regression: np.ndarray,
    *,
    stride: int,
    score_threshold: float = 0.1,
    max_detections: int = 100,
    pool_size: int = 3,
    nms_iou: float | None = None,
    image_size: tuple[int, int] | None = None,
) -> list[Detections]:
    """Per image ``(boxes (n, 4) float32 xyxy pixels, scores (n,) float32, labels (n,) int64)``, by decreasing score.

    ``heatmap_logits`` (N, K, h, w) and ``box_regression`` (N, 4, h, w) as in the module doc;
    ``stride`` pixels per cell. A cell/class is a detection when its sigmoid score is the maximum
    of its ``pool_size × pool_size`` neighbourhood (same class) and ``>= score_threshold``; at most
    ``max_detections`` per image are kept (the best). ``nms_iou`` (e.g. 0.6) adds a class-wise
    IoU NMS. Boxes are clipped to ``image_size`` (H, W) pixels, by default ``(h·stride, w·stride)``.
    """
    heat = np.asarray(heatmap_logits, dtype=np.float32)
    reg = np.asarray(box_regression, dtype=np.float32)
    if heat.ndim != 4 or reg.ndim != 4 or reg.shape[1] != 4 or reg.shape[0] != heat.shape[0] or reg.shape[2:] != heat.shape[2:]:
        raise ValueError(f"heatmap {heat.shape} and box regression {reg.shape}: expected (N, K, h, w) and (N, 4, h, w)")
    if stride <= 0 or max_detections < 0:
        raise ValueError(f"stride = {stride}, max_detections = {max_detections}: expected positive / non-negative")
    n, k, h, w = heat.shape
    height, width = (h * stride, w * stride) if image_size is None else image_size
    scores = sigmoid(heat)
    peaks = (scores == _max_filter(scores, pool_size)) & (scores >= score_threshold)
    results: list[Detections] = []
    for b in range(n):
        cls, ii, jj = np.nonzero(peaks[b])
        s = scores[b, cls, ii, jj]
        order = np.argsort(-s, kind="stable")[:max_detections]
        cls, ii, jj, s = cls[order], ii[order], jj[order], s[order]
        log_w, log_h, dx, dy = (reg[b, c, ii, jj] for c in range(4))
        bw = np.exp(np.minimum(log_w, MAX_LOG_SIZE)) * stride
        bh = np.exp(np.minimum(log_h, MAX_LOG_SIZE)) * stride
        cx = (jj + dx) * stride
        cy = (ii + dy) * stride
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1).astype(np.float32).reshape(-1, 4)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
        labels = cls.astype(np.int64)
        s = s.astype(np.float32)
        if nms_iou is not None and len(s):
            keep = batched_nms(boxes, s, labels, nms_iou)
            boxes, s, labels = boxes[keep], s[keep], labels[keep]
        results.append((boxes, s, labels))
    return results


def box_area(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (m, 4), xyxy: (n, m) float64; 0 where the union is empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: indices (int64) of the kept boxes by decreasing score (ties: lower index first); a box
    is dropped when its IoU with a kept, better box is ``> iou_threshold``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes and {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[box_iou(boxes[best], boxes[rest])[0] <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-wise NMS (boxes of different labels never suppress each other): kept indices by decreasing score."""
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    boxes = np.asarray(boxes).reshape(-1, 4)
    keep = [np.nonzero(labels == c)[0][nms(boxes[labels == c], scores[labels == c], iou_threshold)] for c in np.unique(labels)]
    merged = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
    return merged[np.argsort(-scores[merged], kind="stable")].astype(np.int64)


def pack_detections(detections: Sequence[Detections], max_detections: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed-size arrays for a serving API: ``boxes`` (N, M, 4) float32, ``scores`` (N, M) float32,
    ``labels`` (N, M) int32, ``count`` (N,) int32, ``M = max_detections``.

    Image ``n``'s first ``count[n]`` rows hold its detections in the given order (truncated to
    ``M``: pass them by decreasing score, as :func:`decode` does); the padding rows have boxes
    ``0``, score ``0`` and label ``-1``.
    """
    if max_detections < 0:
        raise ValueError(f"max_detections = {max_detections}: expected >= 0")
    n, m = len(detections), max_detections
    boxes = np.zeros((n, m, 4), dtype=np.float32)
    scores = np.zeros((n, m), dtype=np.float32)
    labels = np.full((n, m), -1, dtype=np.int32)
    count = np.zeros(n, dtype=np.int32)
    for i, (b, s, lab) in enumerate(detections):
        c = min(len(s), m)
        boxes[i, :c] = np.asarray(b, dtype=np.float32).reshape(-1, 4)[:c]
        scores[i, :c] = np.asarray(s, dtype=np.float32)[:c]
        labels[i, :c] = np.asarray(lab)[:c]
        count[i] = c
    return boxes, scores, labels, count


def unpack_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, count: np.ndarray) -> list[Detections]:
    """The inverse of :func:`pack_detections`: per image the first ``count[n]`` rows (labels as int64)."""
    count = np.asarray(count).reshape(-1)
    return [
        (
            np.asarray(boxes[i, :c], dtype=np.float32),
            np.asarray(scores[i, :c], dtype=np.float32),
            np.asarray(labels[i, :c], dtype=np.int64),
        )
        for i, c in enumerate(int(v) for v in count)
    ]


def assemble_partitions(
    maps: Sequence[np.ndarray | None], partitions: Sequence[Sequence[int]], num_channels: int, *, batch: int | None = None
) -> np.ndarray:
    """The source's split-point map (N, ``num_channels``, h, w) float32: group ``k``'s map (N, |P_k|, h, w)
    goes to channels ``partitions[k]`` in order; a missing group (``None``) and channels of no group stay zero.
    Needs at least one map present (for N, h, w)."""
    present = [m for m in maps if m is not None]
    if len(maps) != len(partitions) or not present:
        raise ValueError(f"{len(maps)} maps for {len(partitions)} partitions, {len(present)} present: need one per partition, one present")
    n, _, h, w = present[0].shape
    out = np.zeros((n if batch is None else batch, num_channels, h, w), dtype=np.float32)
    for m, part in zip(maps, partitions):
        if m is not None:
            out[:, np.asarray(part, dtype=np.int64)] = m
    return out
