"""Mean average precision of detections, computed by pycocotools' ``COCOeval`` (numpy only, no torch).

:func:`mean_average_precision` scores per-image predictions against a
:class:`~rocoin.data.detection.DetectionDataset`: the ground truth and the detections are turned into
COCO objects in memory (no files; pycocotools' prints are silenced) and evaluated with the COCO
protocol (101-point interpolated precision, IoU thresholds 0.50:0.05:0.95, area "all"). Ignored
regions of the data set are crowd annotations: a detection mostly inside one is neither a true nor a
false positive. All mAP values are **percent** (0-100), as in the paper's Table V.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from rocoin.contracts.errors import RocoinError
from rocoin.data.detection import DetectionDataset, coco_dict
from rocoin.data.records import _describe

Prediction = tuple[np.ndarray, np.ndarray, np.ndarray]
"""One image's detections: boxes ``(m, 4)`` xyxy pixels of the stored image, scores ``(m,)``, labels ``(m,)`` in ``[0, num_classes)``."""


def check_predictions(ground_truth: DetectionDataset, predictions: Sequence[Prediction]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Validate ``predictions`` (one ``(boxes, scores, labels)`` per image of ``ground_truth``) and return
    them as ``(float64 (m, 4), float64 (m,), int64 (m,))`` arrays; a :class:`RocoinError` names the image and field."""
    if isinstance(predictions, (str, bytes)) or not isinstance(predictions, Sequence):
        raise RocoinError(f"predictions must be a list with one (boxes, scores, labels) per image, got {type(predictions).__name__}")
    if len(predictions) != len(ground_truth):
        raise RocoinError(
            f"predictions: {len(predictions)} entries for {len(ground_truth)} images; expected one (boxes, scores, labels) per image"
        )
    out = []
    for i, entry in enumerate(predictions):
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise RocoinError(f"predictions[{i}] must be a (boxes, scores, labels) triple, got {type(entry).__name__}")
        boxes, scores, labels = (np.asarray(v) for v in entry)
        if boxes.size == 0 and scores.size == 0 and labels.size == 0:
            out.append((np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)))
            continue
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.issubdtype(boxes.dtype, np.number):
            raise RocoinError(f"predictions[{i}] boxes must be a numeric array (m, 4) of x1, y1, x2, y2 pixels, got {_describe(boxes)}")
        m = boxes.shape[0]
        if scores.shape != (m,) or not np.issubdtype(scores.dtype, np.number):
            raise RocoinError(f"predictions[{i}] scores must be a numeric array of shape ({m},), got {_describe(scores)}")
        if labels.shape != (m,) or not np.issubdtype(labels.dtype, np.integer):
            raise RocoinError(f"predictions[{i}] labels must be an integer array of shape ({m},), got {_describe(labels)}")
        boxes, scores = boxes.astype(np.float64), scores.astype(np.float64)
        if not np.isfinite(boxes).all() or not np.isfinite(scores).all():
            raise RocoinError(f"predictions[{i}]: boxes and scores must be finite")
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise RocoinError(f"predictions[{i}] box {j} = {boxes[j].tolist()}: expected x1 <= x2 and y1 <= y2 (xyxy, not xywh)")
        if m and (labels.min() < 0 or labels.max() >= ground_truth.num_classes):
            bad_label = labels[(labels < 0) | (labels >= ground_truth.num_classes)][0]
            raise RocoinError(f"predictions[{i}]: label {int(bad_label)} is out of range [0, {ground_truth.num_classes})")
        out.append((boxes, scores, labels.astype(np.int64)))
    return out


def mean_average_precision(
    ground_truth: DetectionDataset,
    predictions: Sequence[Prediction],
    *,
    max_detections: int = 100,
) -> dict[str, Any]:
    """COCO-style mAP of ``predictions`` (one ``(boxes xyxy (m, 4), scores (m,), labels (m,))`` per image,
    in the pixel coordinates of ``ground_truth.images``) against ``ground_truth``.

    Returns a dict:

    * ``map_50_pct``: AP at IoU 0.5 averaged over the classes that have ground truth, percent;
    * ``map_75_pct``: the same at IoU 0.75;
    * ``map_50_95_pct``: AP averaged over IoU 0.50:0.05:0.95 and the classes (COCO's "mAP"), percent;
    * ``mar_pct``: recall with at most ``max_detections`` detections per image, averaged likewise, percent;
    * ``ap_50_per_class_pct``: ``{class name: AP@0.5 in percent}`` for the classes with ground truth;
    * ``images``, ``detections`` (all predicted boxes), ``ground_truth_boxes`` (not ignored).

    Only the ``max_detections`` highest-scoring detections of an image count. Images without
    predictions or without ground truth are fine; no prediction at all gives 0. A data set without a
    single ground-truth box raises :class:`RocoinError` (mAP is undefined there).
    """
    checked = check_predictions(ground_truth, predictions)
    if int(max_detections) < 1:
        raise RocoinError(f"max_detections must be >= 1, got {max_detections}")
    num_gt = ground_truth.num_boxes
    if num_gt == 0:
        raise RocoinError(f"{ground_truth.name}: the ground truth holds no boxes in its {len(ground_truth)} images; mAP is undefined")
    num_det = int(sum(p[0].shape[0] for p in checked))
    result: dict[str, Any] = {
        "map_50_pct": 0.0,
        "map_75_pct": 0.0,
        "map_50_95_pct": 0.0,
        "mar_pct": 0.0,
        "ap_50_per_class_pct": {},
        "images": len(ground_truth),
        "detections": num_det,
        "ground_truth_boxes": num_gt,
    }
    present = sorted({int(c) for labels in ground_truth.labels for c in labels.tolist()})
    if num_det == 0:
        result["ap_50_per_class_pct"] = {ground_truth.class_names[c]: 0.0 for c in present}
        return result

    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise RocoinError("mAP needs pycocotools; `pip install pycocotools` (it is in rocoin's train extra)") from None

    detections = []
    for i, (boxes, scores, labels) in enumerate(checked):
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            detections.append({"image_id": i + 1, "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = coco_dict(ground_truth)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.maxDets = [1, 10, int(max_detections)]
        evaluator.evaluate()
        evaluator.accumulate()

    # precision: [IoU threshold T, recall R, category K, area A, max dets M]; -1 where a category has no ground truth.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    recall = evaluator.eval["recall"][:, :, 0, -1]
    iou_thresholds = evaluator.params.iouThrs

    def mean_valid(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean()) * 100.0 if valid.size else 0.0

    t50 = int(np.argmin(np.abs(iou_thresholds - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thresholds - 0.75)))
    result["map_50_pct"] = mean_valid(precision[t50])
    result["map_75_pct"] = mean_valid(precision[t75])
    result["map_50_95_pct"] = mean_valid(precision)
    result["mar_pct"] = mean_valid(recall)
    result["ap_50_per_class_pct"] = {ground_truth.class_names[c]: mean_valid(precision[t50, :, c]) for c in present}
    return result
