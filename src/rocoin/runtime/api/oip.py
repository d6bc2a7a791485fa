"""What the Open Inference Protocol (KServe v2) front ends share: names, metadata, input checks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rocoin import __version__
from rocoin.contracts.text import short_repr

MODEL_NAME = "rocoin"
MODEL_VERSION = "1"
INPUT_NAME = "input"
#: Datatypes accepted for the image batch.
DATATYPES = {"UINT8": np.uint8, "FP32": np.float32}
#: An input is an image batch (B, C, H, W) or one image (C, H, W).
MAX_INPUT_RANK = 4
#: Largest dimension accepted before the values are counted (the message size bounds the rest).
MAX_DIMENSION = 2**31 - 1
#: The largest finite FP32 value: larger JSON numbers would become infinite.
FP32_MAX = float(np.finfo(np.float32).max)
#: Most values one input may carry, checked before any copy (64 images of 3x224x224 are 9.6 M).
MAX_INPUT_VALUES = 2**26


class ProtocolError(Exception):
    """A bad request; ``status`` is the HTTP status (the gRPC front end maps it to a code)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_model(name: str, version: str | None) -> None:
    if name != MODEL_NAME:
        raise ProtocolError(404, f"unknown model {name!r}; this server serves {MODEL_NAME!r}")
    if version and version != MODEL_VERSION:
        raise ProtocolError(404, f"unknown version {version!r} of {MODEL_NAME!r}; expected {MODEL_VERSION!r}")


#: The protocol extensions the server speaks (the REST API's binary tensors; see ``binary_tensors``).
EXTENSIONS = ["binary_tensor_data"]


def server_metadata() -> dict[str, Any]:
    return {"name": "rocoin", "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(input_shape: tuple[int, ...], num_classes: int, max_detections: int | None = None) -> dict[str, Any]:
    """The model's KServe v2 metadata; ``max_detections`` for a detection bundle (see :func:`result_tensors`)."""
    if max_detections is None:
        outputs = [{"name": "logits", "datatype": "FP32", "shape": [-1, num_classes]}]
    else:
        outputs = [
            {"name": "boxes", "datatype": "FP32", "shape": [-1, max_detections, 4]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, max_detections]},
            {"name": "labels", "datatype": "INT32", "shape": [-1, max_detections]},
            {"name": "count", "datatype": "INT32", "shape": [-1]},
        ]
    return {
        "name": MODEL_NAME,
        "versions": [MODEL_VERSION],
        "platform": "rocoin",
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, *input_shape]}],
        "outputs": [*outputs, {"name": "missing_groups", "datatype": "INT32", "shape": [-1]}],
    }


def source_metadata(source) -> dict[str, Any]:
    """:func:`model_metadata` of what ``source`` (a :class:`~rocoin.runtime.source.source.Source`) serves."""
    detection = source.manifest.detection
    return model_metadata(source.input_shape, len(source.manifest.class_names), detection.max_detections if detection else None)


def result_tensors(result) -> list[tuple[str, str, np.ndarray]]:
    """An answer's output tensors as ``(name, KServe datatype, little-endian array)``, in order.

    A classifier: ``logits`` FP32 (B, K). A detector, a fixed number ``M`` of rows per image
    (``max_detections`` of the manifest): ``boxes`` FP32 (B, M, 4) as x1, y1, x2, y2 in pixels of
    the input image, ``scores`` FP32 (B, M), ``labels`` INT32 (B, M) (class indices of the
    manifest's ``class_names``), ``count`` INT32 (B,): image ``b``'s detections are its first
    ``count[b]`` rows, by decreasing score; the other rows are zeros with label -1. Then
    ``missing_groups`` INT32: the groups that did not answer by the deadline (their channels were
    zero-filled)."""
    tensors: list[tuple[str, str, np.ndarray]]
    if result.detections is None:
        tensors = [("logits", "FP32", np.ascontiguousarray(result.logits, dtype="<f4"))]
    else:
        boxes, scores, labels, count = result.detections
        tensors = [
            ("boxes", "FP32", np.ascontiguousarray(boxes, dtype="<f4")),
            ("scores", "FP32", np.ascontiguousarray(scores, dtype="<f4")),
            ("labels", "INT32", np.ascontiguousarray(labels, dtype="<i4")),
            ("count", "INT32", np.ascontiguousarray(count, dtype="<i4")),
        ]
    return [*tensors, ("missing_groups", "INT32", np.asarray(result.missing_groups, dtype="<i4"))]


def check_shape(shape: Any, where: str = "inputs[0]") -> list[int]:
    """A tensor shape from a request: 1..:data:`MAX_INPUT_RANK` integers in 0..:data:`MAX_DIMENSION`."""
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIMENSION for d in shape
    ):
        raise ProtocolError(400, f"{where}.shape = {short_repr(shape)}: expected a list of integers in 0..{MAX_DIMENSION}")
    if not 1 <= len(shape) <= MAX_INPUT_RANK:
        raise ProtocolError(400, f"{where}.shape: {len(shape)} dimensions: expected 1..{MAX_INPUT_RANK} ((B, C, H, W) or (C, H, W))")
    return list(shape)


def check_datatype(datatype: Any, where: str = "inputs[0]") -> str:
    """An input's datatype from a request: one of :data:`DATATYPES` (BYTES and the rest are refused)."""
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ProtocolError(400, f"{where}.datatype = {short_repr(datatype)}: expected one of {', '.join(sorted(DATATYPES))}")
    return datatype


def images_from(name: Any, datatype: Any, shape: Any, values: np.ndarray, where: str = "inputs[0]") -> np.ndarray:
    """Check one input tensor of the request and return it as an image batch."""
    if not isinstance(name, str) or name != INPUT_NAME:
        raise ProtocolError(400, f"{where}.name = {short_repr(name)}: expected {INPUT_NAME!r}")
    check_datatype(datatype, where)
    shape = check_shape(shape, where)
    if values.size != math.prod(shape):
        raise ProtocolError(400, f"{where}.data: {values.size} values but shape {list(shape)} needs {math.prod(shape)}")
    if values.size == 0:
        raise ProtocolError(400, f"{where}.data: empty tensor")
    if not np.isfinite(values).all():
        raise ProtocolError(400, f"{where}.data: contains NaN or Inf")
    if datatype == "FP32" and np.abs(values).max() > FP32_MAX:
        raise ProtocolError(400, f"{where}.data: values beyond FP32's range (+-{FP32_MAX:.4g})")
    if datatype == "UINT8" and (values.min() < 0 or values.max() > 255 or not np.array_equal(values, np.round(values))):
        raise ProtocolError(400, f"{where}.data: UINT8 values must be integers in 0..255")
    return np.asarray(values).reshape(shape).astype(DATATYPES[datatype])
