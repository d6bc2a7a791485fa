"""Object detection data sets as uint8 arrays with boxes: synthetic Fashion-MNIST scenes, VisDrone-DET and COCO.

Everything here is numpy only (no torch); Pillow is imported lazily by the functions that read or
write JPEG/PNG files. A :class:`DetectionDataset` holds

* ``images``: uint8 ``(N, C, H, W)``, raw pixel values 0-255 (not normalised; every image of one
  data set has the same size, so the real-format readers letterbox each image to the requested
  ``image_size`` and scale its boxes accordingly, see :func:`letterbox`);
* ``boxes``: per image a float32 ``(n_i, 4)`` array of ``x1, y1, x2, y2`` in absolute pixels of the
  stored image. Coordinates are continuous: pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``,
  so a box that hugs pixels ``x0..x1`` (inclusive) is ``[x0, x1 + 1)``; ``0 <= x1 < x2 <= W`` and
  ``0 <= y1 < y2 <= H``;
* ``labels``: per image an int64 ``(n_i,)`` array of class indices in ``[0, num_classes)``;
* ``ignored``: per image a float32 ``(k_i, 4)`` array of regions (xyxy pixels) whose detections are
  neither rewarded nor punished (VisDrone's ignored regions and ``score 0`` boxes, COCO's crowds);
  empty for the synthetic scenes.

Data sets (:func:`load_detection_dataset`):

* ``fashion-scenes`` — synthetic scenes (:func:`generate_scenes`): Fashion-MNIST garments pasted at
  random positions and scales on a dark, slightly noisy canvas, 1 channel, 10 classes. Train scenes
  use train-split garments, validation scenes a held-out part of them, test scenes the test split's
  garments: no garment image appears in two splits.
* ``visdrone`` — VisDrone2019-DET (10 classes, 3 channels): ``data_dir`` holds
  ``VisDrone2019-DET-{train,val,test-dev}/{images,annotations}`` (or is a single such folder, or a flat
  ``images/`` + ``annotations/`` folder). See :func:`read_visdrone_annotations` for the label mapping.
* ``coco`` — COCO-style JSON (3 channels): ``data_dir`` holds ``annotations/instances_{train,val}.json``
  with the images in ``{train,val}/`` (``instances_train2017.json`` with ``train2017/`` … are accepted too).
  See :func:`read_coco`.

Every problem (missing files, a malformed annotation line, an inconsistent array) raises a
:class:`~rocoin.contracts.errors.RocoinError` with one line that names the file or field and what is wrong.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rocoin.contracts.errors import RocoinError
from rocoin.data.datasets import FASHION_MNIST_CLASSES, default_data_dir, load_dataset, split_validation
from rocoin.data.records import _brief, _describe

log = logging.getLogger(__name__)

DETECTION_DATASET_NAMES = ("fashion-scenes", "visdrone", "coco")

VISDRONE_CLASSES = ("pedestrian", "people", "bicycle", "car", "van", "truck", "tricycle", "awning-tricycle", "bus", "motor")
"""VisDrone-DET categories 1..10 in label order 0..9 (category 0 "ignored region" and 11 "others" have no label)."""

VISDRONE_SPLIT_DIRS = {"train": "VisDrone2019-DET-train", "val": "VisDrone2019-DET-val", "test": "VisDrone2019-DET-test-dev"}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
LETTERBOX_FILL = 114
"""Grey level (0-255) of the padding that :func:`letterbox` adds around a resized image."""

OBJECT_THRESHOLD = 20
"""A pasted object's pixels brighter than this (0-255) define its box in :func:`generate_scenes`."""
BACKGROUND_MEAN = 8.0
BACKGROUND_STD = 3.0
BACKGROUND_MAX = 16
"""The synthetic canvas: Gaussian noise ``N(8, 3)`` clipped to ``[0, 16]`` (always below :data:`OBJECT_THRESHOLD`)."""

DEFAULT_SCENES = {"train": 6000, "val": 1000, "test": 1000}
"""Scene counts of ``fashion-scenes`` when ``num_train`` / ``num_val`` / ``num_test`` are ``None``."""
FASHION_VAL_FRACTION = 0.1
"""Part of Fashion-MNIST's train garments kept for the validation scenes."""
DEFAULT_VAL_FRACTION = 0.1
"""Part of the train images held out for validation when a real data set has no validation split of its own."""


# --------------------------------------------------------------------------------------------
# Containers


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


@dataclass(frozen=True, eq=False)
class DetectionDataset:
    """Images with their boxes and labels (the layout is in the module docstring).

    ``images`` uint8 ``(N, C, H, W)``; ``boxes[i]`` float32 ``(n_i, 4)`` xyxy in pixels;
    ``labels[i]`` int64 ``(n_i,)`` in ``[0, len(class_names))``; ``ignored`` ``None`` (no ignored
    regions) or per image a float32 ``(k_i, 4)`` xyxy array. Lists are accepted and stored as tuples.
    """

    images: np.ndarray
    boxes: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    class_names: tuple[str, ...]
    name: str = "detection"
    ignored: tuple[np.ndarray, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for attr in ("boxes", "labels", "class_names", "ignored"):
            value = getattr(self, attr)
            if isinstance(value, list):
                object.__setattr__(self, attr, tuple(value))
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise RocoinError(f"DetectionDataset.images must be a uint8 array (N, C, H, W), got {_describe(images)}")
        n, _, height, width = images.shape
        if height < 1 or width < 1:
            raise RocoinError(f"DetectionDataset.images: images of {height}x{width} pixels, expected at least 1x1")
        if not isinstance(self.class_names, tuple) or not self.class_names or not all(isinstance(c, str) for c in self.class_names):
            raise RocoinError(f"DetectionDataset.class_names must be a non-empty tuple of str, got {self.class_names!r}")
        if not isinstance(self.name, str):
            raise RocoinError(f"DetectionDataset.name must be a str, got {type(self.name).__name__}")
        num_classes = len(self.class_names)
        for attr in ("boxes", "labels") + (("ignored",) if self.ignored is not None else ()):
            value = getattr(self, attr)
            if not isinstance(value, tuple) or len(value) != n:
                got = f"{len(value)} entries" if isinstance(value, tuple) else type(value).__name__
                raise RocoinError(f"DetectionDataset.{attr} must be a tuple with one array per image ({n}), got {got}")
        for i in range(n):
            boxes, labels = self.boxes[i], self.labels[i]
            _check_boxes(boxes, f"DetectionDataset.boxes[{i}]", width, height)
            if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != (boxes.shape[0],):
                raise RocoinError(
                    f"DetectionDataset.labels[{i}] must be an int64 array of shape ({boxes.shape[0]},), got {_describe(labels)}"
                )
            if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
                bad = labels[(labels < 0) | (labels >= num_classes)]
                raise RocoinError(f"DetectionDataset.labels[{i}]: label {int(bad[0])} is out of range [0, {num_classes})")
            if self.ignored is not None:
                _check_boxes(self.ignored[i], f"DetectionDataset.ignored[{i}]", width, height)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    @property
    def num_boxes(self) -> int:
        """Number of (not ignored) boxes over all images."""
        return int(sum(b.shape[0] for b in self.boxes))

    def ignored_regions(self, i: int) -> np.ndarray:
        """Image ``i``'s ignored regions, float32 ``(k, 4)`` xyxy (empty when there are none)."""
        return self.ignored[i] if self.ignored is not None else _empty_boxes()

    def subset(self, index: Any) -> DetectionDataset:
        """The images at ``index`` (integer indices, a boolean mask or a slice), with their boxes."""
        if isinstance(index, slice):
            picked = range(len(self))[index]
        else:
            arr = np.asarray(index)
            if arr.dtype == bool:
                if arr.shape != (len(self),):
                    raise RocoinError(f"DetectionDataset.subset: boolean mask of shape {arr.shape}, expected ({len(self)},)")
                picked = np.flatnonzero(arr).tolist()
            else:
                arr = arr.astype(np.int64, copy=False).reshape(-1)
                if arr.size and (arr.min() < -len(self) or arr.max() >= len(self)):
                    raise RocoinError(f"DetectionDataset.subset: index out of range for {len(self)} images")
                picked = [int(j) % len(self) for j in arr]
        picked = list(picked)
        ignored = tuple(self.ignored[j] for j in picked) if self.ignored is not None else None
        return DetectionDataset(
            images=np.ascontiguousarray(self.images[picked]),
            boxes=tuple(self.boxes[j] for j in picked),
            labels=tuple(self.labels[j] for j in picked),
            class_names=self.class_names,
            name=self.name,
            ignored=ignored,
        )


@dataclass(frozen=True)
class DetectionSplits:
    """The train, validation and test sets of one detection data set (same classes and image size)."""

    train: DetectionDataset
    val: DetectionDataset
    test: DetectionDataset

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def _check_boxes(boxes: Any, where: str, width: int, height: int) -> None:
    if not isinstance(boxes, np.ndarray) or boxes.dtype != np.float32 or boxes.ndim != 2 or boxes.shape[1] != 4:
        raise RocoinError(f"{where} must be a float32 array (n, 4) of x1, y1, x2, y2 pixels, got {_describe(boxes)}")
    if not boxes.size:
        return
    if not np.isfinite(boxes).all():
        row = int(np.flatnonzero(~np.isfinite(boxes).all(axis=1))[0])
        raise RocoinError(f"{where}: box {row} = {boxes[row].tolist()} is not finite")
    x1, y1, x2, y2 = boxes.T
    bad = (x1 >= x2) | (y1 >= y2)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise RocoinError(f"{where}: box {row} = {boxes[row].tolist()} is empty; expected x1 < x2 and y1 < y2")
    bad = (x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise RocoinError(
            f"{where}: box {row} = {boxes[row].tolist()} leaves the {width}x{height} image; expected 0 <= x1 < x2 <= {width}, 0 <= y1 < y2 <= {height}"
        )


# --------------------------------------------------------------------------------------------
# Geometry helpers


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` ``(n, 4)`` with every box of ``b`` ``(m, 4)`` (xyxy): float64 ``(n, m)``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resampling of a 2-D array to ``(height, width)`` (pixel centres aligned, edges clamped): float64."""
    src = np.asarray(image, dtype=np.float64)
    if src.ndim != 2 or src.shape[0] < 1 or src.shape[1] < 1:
        raise RocoinError(f"resize_bilinear: expected a non-empty 2-D image, got {_describe(src)}")
    if height < 1 or width < 1:
        raise RocoinError(f"resize_bilinear: output size {height}x{width}, expected at least 1x1")

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    y0, y1, wy = axis(src.shape[0], height)
    x0, x1, wx = axis(src.shape[1], width)
    top = src[y0][:, x0] * (1 - wx) + src[y0][:, x1] * wx
    bottom = src[y1][:, x0] * (1 - wx) + src[y1][:, x1] * wx
    return top * (1 - wy[:, None]) + bottom * wy[:, None]


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x1, y1, x2, y2)`` (exclusive ends) of the ``True`` pixels of a 2-D mask, or ``None``."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def letterbox(image: Any, image_size: tuple[int, int]) -> tuple[np.ndarray, float, float, int, int]:
    """Resize a PIL image to fit ``image_size`` = ``(H, W)`` keeping its aspect ratio and pad it
    centred with :data:`LETTERBOX_FILL`: returns ``(uint8 (3, H, W), sx, sy, left, top)``.

    A point ``(x, y)`` of the original maps to ``(x * sx + left, y * sy + top)`` (``sx`` and ``sy``
    differ only by the rounding of the resized size). Images are upscaled as well as downscaled
    (bilinear).
    """
    from PIL import Image

    out_h, out_w = int(image_size[0]), int(image_size[1])
    w, h = image.size
    scale = min(out_w / w, out_h / h)
    new_w, new_h = max(1, min(out_w, round(w * scale))), max(1, min(out_h, round(h * scale)))
    image = image.convert("RGB")
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (out_w - new_w) // 2, (out_h - new_h) // 2
    canvas = np.full((out_h, out_w, 3), LETTERBOX_FILL, dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)), new_w / w, new_h / h, left, top


def _transform_boxes(
    boxes: np.ndarray, original: tuple[int, int], sx: float, sy: float, left: int, top: int, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy boxes to the ``original`` = ``(w, h)`` image, scale and shift them as :func:`letterbox` did,
    clip them to the ``width`` x ``height`` result (rounding), and return ``(boxes float32, kept mask)``:
    boxes that end up empty (zero width or height) are dropped."""
    out = np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), 0.0, np.array([original[0], original[1]] * 2, dtype=np.float64))
    out = out * np.array([sx, sy, sx, sy]) + np.array([left, top, left, top])
    out = np.clip(out, 0.0, np.array([width, height, width, height], dtype=np.float64)).astype(np.float32)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep], keep


def _open_image(path: Path) -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise RocoinError("reading detection images needs Pillow; `pip install pillow`") from None
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RocoinError(f"{path}: cannot read the image ({_brief(exc)})") from None


# --------------------------------------------------------------------------------------------
# Synthetic scenes


def generate_scenes(
    objects_images: np.ndarray,
    objects_labels: np.ndarray,
    class_names: Sequence[str],
    *,
    num_images: int,
    image_size: tuple[int, int] = (64, 64),
    objects_per_image: tuple[int, int] = (1, 4),
    object_size: tuple[int, int] = (14, 32),
    max_iou: float = 0.2,
    seed: int,
    name: str = "fashion-scenes",
) -> DetectionDataset:
    """Paste object crops (e.g. Fashion-MNIST's 28x28 garments) into ``num_images`` dark scenes.

    ``objects_images`` uint8 ``(M, h, w)`` or ``(M, 1, h, w)`` (bright object on black), ``objects_labels``
    int ``(M,)`` in ``[0, len(class_names))``. Each scene of ``image_size`` = ``(H, W)`` pixels gets a
    background of Gaussian noise (:data:`BACKGROUND_MEAN`, :data:`BACKGROUND_STD`, clipped to
    ``[0, BACKGROUND_MAX]``) and a number of objects drawn uniformly from ``objects_per_image``
    (inclusive). Each object is a random crop of the pool (with replacement), resized bilinearly
    to a square side drawn uniformly from ``object_size`` (inclusive, pixels) and placed uniformly at
    random wholly inside the image, composited with ``max``. Its box is the tight box of its
    resized pixels brighter than :data:`OBJECT_THRESHOLD` (it hugs the garment, not the crop's
    frame). A placement whose box has an IoU above ``max_iou`` with a box already in the scene is
    redrawn (up to 50 times; then the object is skipped, so crowded scenes may hold fewer objects
    than drawn, never fewer than one). Deterministic for a ``seed`` (a numpy ``Generator``).
    Returns one-channel images ``(num_images, 1, H, W)``.
    """
    images = np.asarray(objects_images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[0] == 0:
        raise RocoinError(f"generate_scenes: objects_images must be a non-empty uint8 array (M, h, w), got {_describe(images)}")
    labels = np.asarray(objects_labels)
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise RocoinError(
            f"generate_scenes: objects_labels must be an integer array of shape ({images.shape[0]},), got {_describe(labels)}"
        )
    class_names = tuple(str(c) for c in class_names)
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise RocoinError(
            f"generate_scenes: objects_labels hold {int(labels.min())}..{int(labels.max())}, expected [0, {len(class_names)})"
        )
    if int(num_images) < 0:
        raise RocoinError(f"generate_scenes: num_images must be >= 0, got {num_images}")
    height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise RocoinError(f"generate_scenes: image_size must be (H, W) >= (1, 1), got {image_size}")
    lo_n, hi_n = (int(v) for v in objects_per_image)
    if not 1 <= lo_n <= hi_n:
        raise RocoinError(f"generate_scenes: objects_per_image must be (min, max) with 1 <= min <= max, got {objects_per_image}")
    lo_s, hi_s = (int(v) for v in object_size)
    if not 1 <= lo_s <= hi_s <= min(height, width):
        raise RocoinError(
            f"generate_scenes: object_size must be (min, max) pixels with 1 <= min <= max <= {min(height, width)}, got {object_size}"
        )
    if not 0.0 <= float(max_iou) <= 1.0:
        raise RocoinError(f"generate_scenes: max_iou must be in [0, 1], got {max_iou}")

    # The objects whose resized crop would have no pixel above the threshold cannot be used.
    usable = np.flatnonzero(images.reshape(images.shape[0], -1).max(axis=1) > OBJECT_THRESHOLD)
    if not usable.size:
        raise RocoinError(f"generate_scenes: no object image has a pixel brighter than {OBJECT_THRESHOLD}")

    rng = np.random.default_rng(seed)
    n = int(num_images)
    out = np.empty((n, 1, height, width), dtype=np.uint8)
    all_boxes, all_labels = [], []
    for i in range(n):
        canvas = np.clip(np.rint(rng.normal(BACKGROUND_MEAN, BACKGROUND_STD, size=(height, width))), 0, BACKGROUND_MAX).astype(np.uint8)
        boxes: list[tuple[int, int, int, int]] = []
        box_labels: list[int] = []
        for _ in range(int(rng.integers(lo_n, hi_n + 1))):
            for _attempt in range(50):
                k = int(usable[rng.integers(usable.size)])
                side = int(rng.integers(lo_s, hi_s + 1))
                crop = np.clip(np.rint(resize_bilinear(images[k], side, side)), 0, 255).astype(np.uint8)
                tight = _tight_box(crop > OBJECT_THRESHOLD)
                if tight is None:  # a faint object shrunk below the threshold: draw another
                    continue
                x0 = int(rng.integers(0, width - side + 1))
                y0 = int(rng.integers(0, height - side + 1))
                box = (x0 + tight[0], y0 + tight[1], x0 + tight[2], y0 + tight[3])
                if boxes and box_iou(np.array([box]), np.array(boxes)).max() > max_iou:
                    continue
                np.maximum(canvas[y0 : y0 + side, x0 : x0 + side], crop, out=canvas[y0 : y0 + side, x0 : x0 + side])
                boxes.append(box)
                box_labels.append(int(labels[k]))
                break
        out[i, 0] = canvas
        all_boxes.append(np.array(boxes, dtype=np.float32).reshape(-1, 4))
        all_labels.append(np.array(box_labels, dtype=np.int64))
    return DetectionDataset(out, tuple(all_boxes), tuple(all_labels), class_names, name)


# --------------------------------------------------------------------------------------------
# VisDrone-DET text annotations


def read_visdrone_annotations(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read one VisDrone-DET annotation file: ``(boxes float32 (n, 4) xyxy pixels, labels int64 (n,), ignore bool (n,))``.

    Each non-blank line is ``left,top,width,height,score,category,truncation,occlusion`` (integers,
    a trailing comma and surrounding spaces allowed; 6 or more fields, the first 6 are used). The box
    is ``[left, left + width) x [top, top + height)`` in the original image's pixels.

    Mapping: categories 1..10 (pedestrian … motor) become labels 0..9 (:data:`VISDRONE_CLASSES`).
    A line is *ignored* (``ignore[j]`` is ``True``) when its category is 0 (ignored region) or 11
    (others) or its score is 0 (the ground truth's "not evaluated" flag); its label is then -1 for
    categories 0 and 11 and the mapped class otherwise. Width or height 0 is allowed (such boxes
    are dropped by the loaders); a negative one, a category outside 0..11, a negative score, a
    non-integer field or fewer than 6 fields raise a :class:`RocoinError` naming the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise RocoinError(f"{path}: cannot read the VisDrone annotations ({_brief(exc)})") from None
    rows: list[list[int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        fields = line.split(",")
        if fields[-1].strip() == "":
            fields = fields[:-1]
        if len(fields) < 6:
            raise RocoinError(
                f"{path}: line {number} has {len(fields)} fields ({line!r}); expected left,top,width,height,score,category,truncation,occlusion"
            )
        try:
            values = [int(f.strip()) for f in fields]
        except ValueError:
            raise RocoinError(f"{path}: line {number}: {line!r} has a field that is not an integer") from None
        left, top, w, h, score, category = values[:6]
        if w < 0 or h < 0:
            raise RocoinError(f"{path}: line {number}: negative box size {w}x{h}; expected width, height >= 0")
        if not 0 <= category <= 11:
            raise RocoinError(f"{path}: line {number}: category {category} is not a VisDrone-DET category (0..11)")
        if score < 0:
            raise RocoinError(f"{path}: line {number}: score {score} is negative; expected 0 or 1 in ground truth")
        rows.append([left, top, w, h, score, category])
    table = np.array(rows, dtype=np.int64).reshape(-1, 6)
    boxes = np.stack([table[:, 0], table[:, 1], table[:, 0] + table[:, 2], table[:, 1] + table[:, 3]], axis=1).astype(np.float32)
    category = table[:, 5]
    has_class = (category >= 1) & (category <= 10)
    labels = np.where(has_class, category - 1, -1).astype(np.int64)
    ignore = ~has_class | (table[:, 4] == 0)
    return boxes.reshape(-1, 4), labels, ignore


def write_visdrone_annotations(
    path: str | os.PathLike[str],
    boxes: np.ndarray,
    labels: np.ndarray,
    *,
    ignored_regions: np.ndarray | None = None,
) -> Path:
    """Write boxes (xyxy pixels, rounded to integers) and labels 0..9 as a VisDrone-DET annotation file.

    Each box becomes ``left,top,width,height,1,label+1,0,0``; each of ``ignored_regions`` (xyxy)
    becomes ``left,top,width,height,0,0,0,0`` (an ignored region). Returns the path.
    """
    path = Path(path)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != boxes.shape[0]:
        raise RocoinError(f"write_visdrone_annotations: {boxes.shape[0]} boxes but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(VISDRONE_CLASSES)):
        raise RocoinError(
            f"write_visdrone_annotations: labels hold {int(labels.min())}..{int(labels.max())}, expected [0, {len(VISDRONE_CLASSES)})"
        )
    lines = []
    for entries, score, fixed in ((boxes, 1, labels + 1), (ignored_regions, 0, None)):
        if entries is None:
            continue
        values = np.asarray(entries, dtype=np.float64).reshape(-1, 4)
        if not np.isfinite(values).all():
            raise RocoinError("write_visdrone_annotations: boxes must be finite")
        rounded = np.rint(values).astype(np.int64)
        if (rounded[:, 2] < rounded[:, 0]).any() or (rounded[:, 3] < rounded[:, 1]).any():
            raise RocoinError("write_visdrone_annotations: boxes must be finite with x1 <= x2 and y1 <= y2")
        for j, (x1, y1, x2, y2) in enumerate(rounded):
            category = int(fixed[j]) if fixed is not None else 0
            lines.append(f"{x1},{y1},{x2 - x1},{y2 - y1},{score},{category},0,0")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    except OSError as exc:
        raise RocoinError(f"{path}: cannot write the VisDrone annotations ({_brief(exc)})") from None
    return path


def read_visdrone_folder(
    folder: str | os.PathLike[str],
    image_size: tuple[int, int],
    *,
    max_images: int | None = None,
    seed: int = 0,
    name: str = "visdrone",
) -> DetectionDataset:
    """Read a VisDrone-DET folder with ``images/*.jpg`` and ``annotations/<image stem>.txt``.

    Every image is letterboxed to ``image_size`` = ``(H, W)`` (:func:`letterbox`, 3 channels RGB) and
    its boxes scaled, shifted and clipped to it; boxes that become empty are dropped. Ignored lines
    (see :func:`read_visdrone_annotations`) become the data set's ``ignored`` regions. With
    ``max_images``, a random subset (by ``seed``, kept in file-name order) is read. An image without
    an annotation file is an error.
    """
    folder = Path(folder)
    images_dir, annotations_dir = folder / "images", folder / "annotations"
    if not images_dir.is_dir() or not annotations_dir.is_dir():
        raise RocoinError(f"{folder}: not a VisDrone-DET folder; expected {images_dir} and {annotations_dir}")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise RocoinError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    files = [files[j] for j in _pick(len(files), max_images, seed)]
    height, width = _check_image_size(image_size)
    images = np.empty((len(files), 3, height, width), dtype=np.uint8)
    all_boxes, all_labels, all_ignored = [], [], []
    dropped = 0
    for i, image_path in enumerate(files):
        annotation = annotations_dir / f"{image_path.stem}.txt"
        if not annotation.is_file():
            raise RocoinError(f"{image_path}: no annotation file {annotation}")
        boxes, labels, ignore = read_visdrone_annotations(annotation)
        image = _open_image(image_path)
        images[i], sx, sy, left, top = letterbox(image, (height, width))
        kept_boxes, keep = _transform_boxes(boxes[~ignore], image.size, sx, sy, left, top, width, height)
        dropped += int((~keep).sum())
        all_boxes.append(kept_boxes)
        all_labels.append(labels[~ignore][keep])
        all_ignored.append(_transform_boxes(boxes[ignore], image.size, sx, sy, left, top, width, height)[0])
    if dropped:
        log.info("%s: %d boxes dropped (empty after resizing to %dx%d)", folder, dropped, height, width)
    return DetectionDataset(images, tuple(all_boxes), tuple(all_labels), VISDRONE_CLASSES, name, tuple(all_ignored))


# --------------------------------------------------------------------------------------------
# COCO JSON


def coco_dict(dataset: DetectionDataset, *, file_names: Sequence[str] | None = None, crowd_per_category: bool = True) -> dict[str, Any]:
    """``dataset``'s ground truth as a COCO ``instances`` dict (what ``json.dump`` would write).

    Image ``i`` has id ``i + 1`` (``file_name`` ``f"{i:06d}.png"`` unless given), label ``c`` has
    category id ``c + 1``; boxes are ``[x, y, w, h]`` pixels of the stored (letterboxed) image,
    ``area = w * h``. An ignored region becomes an ``iscrowd: 1`` annotation, one per category when
    ``crowd_per_category`` (COCO matches crowds within a category; VisDrone's regions hold for all).
    """
    _, _, height, width = dataset.images.shape
    names = list(file_names) if file_names is not None else [f"{i:06d}.png" for i in range(len(dataset))]
    if len(names) != len(dataset):
        raise RocoinError(f"coco_dict: {len(names)} file names for {len(dataset)} images")
    images = [{"id": i + 1, "file_name": names[i], "width": int(width), "height": int(height)} for i in range(len(dataset))]
    categories = [{"id": c + 1, "name": name, "supercategory": ""} for c, name in enumerate(dataset.class_names)]
    annotations: list[dict[str, Any]] = []
    for i in range(len(dataset)):
        for box, label in zip(dataset.boxes[i].tolist(), dataset.labels[i].tolist()):
            annotations.append(_coco_annotation(len(annotations) + 1, i + 1, label + 1, box, 0))
        crowd_categories = range(1, dataset.num_classes + 1) if crowd_per_category else (1,)
        for box in dataset.ignored_regions(i).tolist():
            for category in crowd_categories:
                annotations.append(_coco_annotation(len(annotations) + 1, i + 1, category, box, 1))
    return {"images": images, "annotations": annotations, "categories": categories}


def _coco_annotation(ann_id: int, image_id: int, category_id: int, box: list[float], iscrowd: int) -> dict[str, Any]:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": iscrowd}


def write_coco(dataset: DetectionDataset, json_path: str | os.PathLike[str], images_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``dataset`` as a COCO JSON file (:func:`coco_dict`, one crowd annotation per category
    and ignored region) and, with ``images_dir``, its images as ``{i:06d}.png`` (grey or RGB)."""
    json_path = Path(json_path)
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(coco_dict(dataset)), encoding="utf-8")
    except OSError as exc:
        raise RocoinError(f"{json_path}: cannot write the COCO annotations ({_brief(exc)})") from None
    if images_dir is not None:
        from PIL import Image

        images_dir = Path(images_dir)
        channels = dataset.images.shape[1]
        if channels not in (1, 3):
            raise RocoinError(f"write_coco: images with {channels} channels cannot be saved as PNG; expected 1 or 3")
        try:
            images_dir.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(dataset.images):
                pixels = image[0] if channels == 1 else image.transpose(1, 2, 0)
                Image.fromarray(np.ascontiguousarray(pixels)).save(images_dir / f"{i:06d}.png")
        except OSError as exc:
            raise RocoinError(f"{images_dir}: cannot write the images ({_brief(exc)})") from None
    return json_path


def read_coco(
    json_path: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    image_size: tuple[int, int],
    *,
    max_images: int | None = None,
    seed: int = 0,
    name: str = "coco",
) -> DetectionDataset:
    """Read a COCO ``instances`` JSON file and its images (``images_dir / file_name``).

    Categories become labels ``0..K-1`` in increasing category-id order (``class_names`` are their
    ``name`` s); ``bbox`` is ``[x, y, w, h]`` pixels; ``iscrowd`` annotations become ignored regions
    (class-agnostic, duplicates merged), the others boxes. Images are taken in increasing id
    order (with ``max_images``, a random subset by ``seed``), letterboxed to ``image_size`` = ``(H, W)``
    (:func:`letterbox`, 3 channels RGB) with their boxes scaled, shifted and clipped; boxes that
    become empty are dropped. An image's ``width``/``height`` in the JSON must match the file.
    """
    json_path, images_dir = Path(json_path), Path(images_dir)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RocoinError(f"{json_path}: cannot read the COCO annotations ({_brief(exc)})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise RocoinError(f"{json_path}: not a COCO instances file; expected an object with lists 'images', 'annotations', 'categories'")
    try:
        categories = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
        image_entries = sorted(data["images"], key=lambda im: int(im["id"]))
        image_ids = [int(im["id"]) for im in image_entries]
    except (KeyError, TypeError, ValueError) as exc:
        raise RocoinError(
            f"{json_path}: malformed 'categories' or 'images' entry ({_brief(exc)}); expected 'id' and 'name' / 'file_name'"
        ) from None
    if not categories:
        raise RocoinError(f"{json_path}: no categories")
    label_of = {cid: label for label, (cid, _) in enumerate(categories)}
    per_image: dict[int, list[tuple[list[float], int, bool]]] = {i: [] for i in image_ids}
    for j, ann in enumerate(data["annotations"]):
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            image_id, category = int(ann["image_id"]), int(ann["category_id"])
            crowd = bool(ann.get("iscrowd", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise RocoinError(
                f"{json_path}: annotation {j} is malformed ({_brief(exc)}); expected 'bbox' [x, y, w, h], 'image_id', 'category_id'"
            ) from None
        if image_id not in per_image:
            raise RocoinError(f"{json_path}: annotation {j} refers to image id {image_id}, which is not in 'images'")
        if category not in label_of:
            raise RocoinError(f"{json_path}: annotation {j} has category id {category}, which is not in 'categories'")
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
            raise RocoinError(f"{json_path}: annotation {j} has bbox {ann['bbox']}; expected finite [x, y, w, h] with w, h >= 0")
        per_image[image_id].append(([x, y, x + w, y + h], label_of[category], crowd))
    picked = _pick(len(image_entries), max_images, seed)
    height, width = _check_image_size(image_size)
    images = np.empty((len(picked), 3, height, width), dtype=np.uint8)
    all_boxes, all_labels, all_ignored = [], [], []
    for i, j in enumerate(picked):
        entry = image_entries[j]
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise RocoinError(f"{json_path}: image id {entry['id']} has no 'file_name'")
        image = _open_image(images_dir / file_name)
        expected = (entry.get("width"), entry.get("height"))
        if None not in expected and tuple(int(v) for v in expected) != tuple(image.size):
            raise RocoinError(
                f"{images_dir / file_name}: the image is {image.size[0]}x{image.size[1]}, the JSON says {expected[0]}x{expected[1]}"
            )
        images[i], sx, sy, left, top = letterbox(image, (height, width))
        anns = per_image[int(entry["id"])]
        boxes = np.array([a[0] for a in anns], dtype=np.float64).reshape(-1, 4)
        labels = np.array([a[1] for a in anns], dtype=np.int64)
        crowd = np.array([a[2] for a in anns], dtype=bool)
        kept, keep = _transform_boxes(boxes[~crowd], image.size, sx, sy, left, top, width, height)
        all_boxes.append(kept)
        all_labels.append(labels[~crowd][keep])
        regions = _transform_boxes(boxes[crowd], image.size, sx, sy, left, top, width, height)[0]
        all_ignored.append(np.unique(regions, axis=0) if regions.shape[0] else regions)
    class_names = tuple(n for _, n in categories)
    return DetectionDataset(images, tuple(all_boxes), tuple(all_labels), class_names, name, tuple(all_ignored))


# --------------------------------------------------------------------------------------------
# Loading by name


def canonical_detection_name(name: str) -> str:
    """``"Fashion_Scenes"``, ``"VisDrone2019"``, ``"COCO"`` … → one of :data:`DETECTION_DATASET_NAMES`."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    table = {
        "fashionscenes": "fashion-scenes",
        "visdrone": "visdrone",
        "visdrone2019": "visdrone",
        "visdronedet": "visdrone",
        "coco": "coco",
    }
    if key not in table:
        raise RocoinError(f"unknown detection data set {name!r}; expected one of {', '.join(DETECTION_DATASET_NAMES)}")
    return table[key]


def load_detection_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    image_size: tuple[int, int] = (64, 64),
    num_train: int | None = None,
    num_val: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
) -> DetectionSplits:
    """Load (or, for ``fashion-scenes``, generate) the train, validation and test sets of ``name``.

    ``data_dir`` defaults to :func:`~rocoin.data.datasets.default_data_dir`; images are ``image_size`` =
    ``(H, W)``, uint8, not normalised. Deterministic for a ``seed``.

    * ``fashion-scenes``: ``num_train``/``num_val``/``num_test`` scenes (default :data:`DEFAULT_SCENES`)
      from Fashion-MNIST found as :func:`~rocoin.data.load_dataset` finds it (in ``data_dir``, else
      ``/usr/share/datasets/fashion-mnist``); the other :func:`generate_scenes` settings are its defaults.
    * ``visdrone``: under ``data_dir``, ``data_dir/visdrone`` or ``data_dir/VisDrone``, the folders of
      :data:`VISDRONE_SPLIT_DIRS`: train from ``-train``, val from ``-val``, test from ``-test-dev``; without
      ``-test-dev`` the test set is ``-val`` and the validation set a held-out part of ``-train``. A flat
      folder (``images/`` + ``annotations/``) is split at random into the three.
    * ``coco``: under ``data_dir`` or ``data_dir/coco``, ``annotations/instances_train.json`` with
      ``train/`` and ``annotations/instances_val.json`` with ``val/`` (or the ``…2017`` names): train and
      val are a random split of the train file, test is the val file.

    For the real data sets the counts cap the number of images read (a random subset by ``seed``;
    ``None``: all of them; a held-out validation set then takes :data:`DEFAULT_VAL_FRACTION` of train).
    """
    key = canonical_detection_name(name)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for split, count in counts.items():
        if count is not None and int(count) < 1:
            raise RocoinError(f"load_detection_dataset: num_{split} must be >= 1 or None, got {count}")
    height, width = _check_image_size(image_size)
    if key == "fashion-scenes":
        splits = _load_fashion_scenes(root, (height, width), counts, seed)
    elif key == "visdrone":
        splits = _load_visdrone(root, (height, width), counts, seed)
    else:
        splits = _load_coco(root, (height, width), counts, seed)
    for split in ("train", "val", "test"):
        data = getattr(splits, split)
        if len(data) == 0:
            raise RocoinError(f"{key} {split} split: the split is empty")
    log.info("%s: %d train, %d val and %d test images of %dx%d", key, len(splits.train), len(splits.val), len(splits.test), height, width)
    return splits


def _check_image_size(image_size: Any) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise RocoinError(f"image_size must be (H, W) pixels, got {image_size!r}") from None
    if height < 1 or width < 1:
        raise RocoinError(f"image_size must be (H, W) >= (1, 1) pixels, got {image_size!r}")
    return height, width


def _pick(n: int, count: int | None, seed: int) -> list[int]:
    """``count`` of ``range(n)`` chosen at random by ``seed`` (all when ``None`` or ``>= n``), sorted."""
    if count is None or count >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=int(count), replace=False).tolist())


def _seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1)[0])


def _fashion_object_pools(root: Path, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST's garments per scene split: ``{"train"|"val"|"test": (images (M, 1, 28, 28), labels (M,))}``;
    ``val`` is a held-out :data:`FASHION_VAL_FRACTION` of the train split (disjoint from ``train``)."""
    splits = load_dataset("fashion-mnist", root)
    train, val = split_validation(splits.train, FASHION_VAL_FRACTION, seed)
    return {"train": (train.images, train.labels), "val": (val.images, val.labels), "test": (splits.test.images, splits.test.labels)}


def _load_fashion_scenes(root: Path, image_size: tuple[int, int], counts: dict[str, int | None], seed: int) -> DetectionSplits:
    pools = _fashion_object_pools(root, seed)
    made = {}
    for stream, split in enumerate(("train", "val", "test")):
        images, labels = pools[split]
        n = counts[split] if counts[split] is not None else DEFAULT_SCENES[split]
        made[split] = generate_scenes(
            images, labels, FASHION_MNIST_CLASSES, num_images=int(n), image_size=image_size, seed=_seed(seed, stream), name="fashion-scenes"
        )
    return DetectionSplits(made["train"], made["val"], made["test"])


def _held_out(data: DetectionDataset, n_val: int | None, seed: int) -> tuple[DetectionDataset, DetectionDataset]:
    """Split ``data`` into (rest, held-out validation of ``n_val`` images, default :data:`DEFAULT_VAL_FRACTION` of them)."""
    n = len(data)
    n_val = int(n_val) if n_val is not None else max(1, int(round(DEFAULT_VAL_FRACTION * n)))
    if n_val >= n:
        raise RocoinError(f"{data.name}: cannot hold out {n_val} validation images from {n} train images")
    order = np.random.default_rng(_seed(seed, 7)).permutation(n)
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))


def _held_out_counts(counts: dict[str, int | None]) -> tuple[int | None, int | None]:
    """(images to read from the train files, validation images to hold out of them) so that
    ``num_train`` train images remain; ``None`` for all / the default fraction."""
    n_train, n_val = counts["train"], counts["val"]
    if n_val is None and n_train is not None:
        n_val = max(1, int(round(int(n_train) * DEFAULT_VAL_FRACTION / (1 - DEFAULT_VAL_FRACTION))))
    return (int(n_train) + int(n_val) if n_train is not None else None), n_val  # type: ignore[arg-type]


def _load_visdrone(root: Path, image_size: tuple[int, int], counts: dict[str, int | None], seed: int) -> DetectionSplits:
    candidates = [root, root / "visdrone", root / "VisDrone"]
    for base in candidates:
        dirs = {split: base / folder for split, folder in VISDRONE_SPLIT_DIRS.items() if (base / folder / "images").is_dir()}
        if "train" in dirs and ("val" in dirs or "test" in dirs):

            def read(folder: Path, count: int | None, stream: int) -> DetectionDataset:
                return read_visdrone_folder(folder, image_size, max_images=count, seed=_seed(seed, stream))

            if "val" in dirs and "test" in dirs:
                return DetectionSplits(
                    read(dirs["train"], counts["train"], 10), read(dirs["val"], counts["val"], 11), read(dirs["test"], counts["test"], 12)
                )
            test_dir = dirs.get("test", dirs.get("val"))
            log.info("visdrone: testing on %s and holding out validation images from %s", test_dir, dirs["train"])
            n_read, n_val = _held_out_counts(counts)
            train, val = _held_out(read(dirs["train"], n_read, 10), n_val, seed)
            return DetectionSplits(train, val, read(test_dir, counts["test"], 12))
        if (base / "images").is_dir() and (base / "annotations").is_dir():
            return _split_flat(read_visdrone_folder(base, image_size, max_images=_flat_count(counts), seed=_seed(seed, 10)), counts, seed)
    looked = ", ".join(str(c) for c in candidates)
    raise RocoinError(
        f"visdrone: data not found; looked in {looked} for {', '.join(VISDRONE_SPLIT_DIRS.values())} (each with images/ and annotations/) "
        f"or a flat images/ + annotations/ folder; download VisDrone2019-DET from https://github.com/VisDrone/VisDrone-Dataset and extract it there"
    )


def _flat_count(counts: dict[str, int | None]) -> int | None:
    if any(c is None for c in counts.values()):
        return None
    return int(sum(int(c) for c in counts.values()))  # type: ignore[arg-type]


def _split_flat(data: DetectionDataset, counts: dict[str, int | None], seed: int) -> DetectionSplits:
    """Split one pool at random into train/val/test: the given counts, ``None`` ones share the rest
    (val and test default to :data:`DEFAULT_VAL_FRACTION` each, train takes what is left)."""
    n = len(data)
    default = max(1, int(round(DEFAULT_VAL_FRACTION * n)))
    n_val = int(counts["val"]) if counts["val"] is not None else default
    n_test = int(counts["test"]) if counts["test"] is not None else default
    n_train = int(counts["train"]) if counts["train"] is not None else n - n_val - n_test
    if n_train < 1 or n_train + n_val + n_test > n:
        raise RocoinError(f"{data.name}: cannot split {n} images into {n_train} train, {n_val} val and {n_test} test images")
    order = np.random.default_rng(_seed(seed, 8)).permutation(n)
    parts = np.split(order[: n_train + n_val + n_test], [n_train, n_train + n_val])
    train, val, test = (data.subset(np.sort(p)) for p in parts)
    return DetectionSplits(train, val, test)


def _coco_files(base: Path, split: str) -> tuple[Path, Path] | None:
    for suffix in ("", "2017", "2014"):
        json_path = base / "annotations" / f"instances_{split}{suffix}.json"
        images_dir = base / f"{split}{suffix}"
        if json_path.is_file() and images_dir.is_dir():
            return json_path, images_dir
    return None


def _load_coco(root: Path, image_size: tuple[int, int], counts: dict[str, int | None], seed: int) -> DetectionSplits:
    candidates = [root, root / "coco"]
    for base in candidates:
        train_files, val_files = _coco_files(base, "train"), _coco_files(base, "val")
        if train_files and val_files:
            n_read, n_val = _held_out_counts(counts)
            train, val = _held_out(read_coco(*train_files, image_size, max_images=n_read, seed=_seed(seed, 20)), n_val, seed)
            test = read_coco(*val_files, image_size, max_images=counts["test"], seed=_seed(seed, 21))
            if test.class_names != train.class_names:
                raise RocoinError(f"coco: {val_files[0]} and {train_files[0]} list different categories")
            return DetectionSplits(train, val, test)
    looked = ", ".join(str(c) for c in candidates)
    raise RocoinError(
        f"coco: data not found; looked in {looked} for annotations/instances_train.json with train/ and annotations/instances_val.json with val/ "
        f"(or the train2017/val2017 names)"
    )
