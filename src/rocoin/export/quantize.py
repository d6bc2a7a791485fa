"""int8 students: static quantisation of a bundle's group models with onnxruntime's tools.

Each group model is quantised (QDQ format, per-channel int8 weights, uint8 activations)
with calibration images from the training split; the head stays fp32 (it is tiny and runs at
the source). :func:`compare_pipelines` measures what a user trades: file size, model time and
accuracy of the whole pipeline, int8 against fp32, on the same images.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.manifest import Manifest

logger = logging.getLogger(__name__)

#: Images per calibration batch.
CALIBRATION_BATCH = 16
#: Batch-1 runs per model for the time comparison.
TIMING_RUNS = 30


class _Batches(CalibrationDataReader):
    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self._batches = iter([{input_name: images[i : i + CALIBRATION_BATCH]} for i in range(0, len(images), CALIBRATION_BATCH)])

    def get_next(self):
        return next(self._batches, None)


def quantize_model(source: Path, target: Path, input_name: str, calibration: np.ndarray) -> None:
    """Static int8 quantisation of one ONNX model, calibrated on ``calibration`` (normalised float32)."""
    quantize_static(
        str(source),
        str(target),
        _Batches(input_name, np.ascontiguousarray(calibration, dtype=np.float32)),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def pipeline_logits(group_paths: list[Path], head_path: Path, manifest: Manifest, images: np.ndarray) -> np.ndarray:
    """The full pipeline (every group present) on normalised ``images``."""
    features = np.zeros((len(images), manifest.plan.num_filters), dtype=np.float32)
    for model, path in zip(manifest.groups, group_paths):
        features[:, model.filters] = _session(path).run(None, {model.input.name: images})[0]
    return _session(head_path).run(None, {manifest.head.input.name: features})[0]


def median_run_s(path: Path, input_name: str, image: np.ndarray) -> float:
    session = _session(path)
    session.run(None, {input_name: image})
    times = []
    for _ in range(TIMING_RUNS):
        started = time.perf_counter()
        session.run(None, {input_name: image})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def compare_pipelines(fp32: list[Path], int8: list[Path], head: Path, manifest: Manifest, images: np.ndarray, labels: np.ndarray) -> dict:
    """Size, batch-1 model time (slowest group) and pipeline accuracy, fp32 against int8."""
    one = images[:1]
    report = {"images": len(images)}
    for name, paths in (("fp32", fp32), ("int8", int8)):
        logits = pipeline_logits(paths, head, manifest, images)
        report[name] = {
            "size_bytes": sum(p.stat().st_size for p in paths),
            "slowest_group_s": max(median_run_s(p, m.input.name, one) for p, m in zip(paths, manifest.groups)),
            "accuracy": float((logits.argmax(axis=1) == labels).mean()),
        }
    report["agreement"] = float(
        (
            pipeline_logits(fp32, head, manifest, images).argmax(axis=1) == pipeline_logits(int8, head, manifest, images).argmax(axis=1)
        ).mean()
    )
    return report


def int8_data(students_path: Path, data_dir: str | None = None, calibration_images: int = 256, eval_images: int = 1000):
    """Normalised calibration (training) and evaluation (test) images of the students' dataset."""
    from rocoin.data import load_dataset
    from rocoin.distillation.checkpoint import load_checkpoint
    from rocoin.distillation.teacher import info_from_json

    if calibration_images < 1 or eval_images < 1:
        raise RocoinError(f"calibration-images = {calibration_images}, eval-images = {eval_images}: expected at least 1 each")
    metadata, _, _ = load_checkpoint(students_path, "students")
    info = info_from_json(metadata["dataset"])
    data_dir = data_dir or (metadata.get("data") or {}).get("data_dir")
    splits = load_dataset(info.name, Path(data_dir) if data_dir else None)
    mean = np.asarray(info.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(info.std, dtype=np.float32).reshape(1, -1, 1, 1)

    def normalise(images):
        return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)

    return normalise(splits.train.images[:calibration_images]), (
        normalise(splits.test.images[:eval_images]),
        splits.test.labels[:eval_images],
    )
