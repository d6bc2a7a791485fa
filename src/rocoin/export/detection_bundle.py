"""A distilled detector -> a detection bundle the runtime serves (issue 15).

The bundle folder holds

- ``group-{k}.onnx`` for every plan group ``k``: the group's student,
  ``input`` (B, C, H, W) float32, already normalised -> ``features`` (B, |P_k|, h, w), its
  partition of the teacher's map at the split point;
- ``head.onnx``: the rest of the detector the source runs (neck and head after ``"backbone"``, the
  head after ``"neck"``), ``features`` (B, F, h, w) **in channel order** (group ``k``'s maps at
  ``plan.groups[k].filters``, zeros for a missing group) -> ``heatmap`` (B, K, h, w) class-centre
  logits and ``box`` (B, 4, h, w) (log width and height in cells, centre offset in cells);
- ``manifest.json`` with ``task: detection`` and its :class:`~rocoin.contracts.manifest.DetectionSpec`
  (how the source decodes boxes), the plan priced for what is sent (``h·w`` values per filter, of
  32 or 16 bits), the normalisation, the class names and every file's size and SHA-256.

As for classifier bundles (:mod:`.onnx_bundle`, whose helpers this reuses): every file is compared
with PyTorch under onnxruntime before the bundle is moved into place, and the whole pipeline too
(the ONNX students' maps assembled, through ``head.onnx``, against the torch detector's rest on
the torch students' maps); the bundle is built beside the output and renamed into place only when
complete; on any failure nothing is left behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from rocoin import __version__
from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import format_validation_error, write_json_atomic
from rocoin.contracts.manifest import MANIFEST_NAME, DetectionSpec, GroupModel, Manifest, ModelFile, Normalization, TensorSpec
from rocoin.contracts.plan import Plan
from rocoin.export.onnx_bundle import (
    EXAMPLE_BATCH,
    FEATURES_NAME,
    HEAD_FILE,
    INPUT_NAME,
    PARITY_ATOL,
    PARITY_BATCHES,
    PARITY_RTOL,
    PARITY_SEED,
    _check_output,
    _check_written,
    _export_onnx,
    _file_fields,
    _move_into_place,
    _require_exporters,
    group_file,
)
from rocoin.models.detector import REST_OUTPUTS, SPLIT_POINTS, Detector, DetectorStudent

logger = logging.getLogger(__name__)

WIRE_DTYPES = ("float32", "float16")


def export_detection_bundle(
    detector: Detector,
    students: list[DetectorStudent],
    plan: Plan,
    point: str,
    out: str | os.PathLike[str],
    *,
    class_names: list[str],
    mean: list[float],
    std: list[float],
    dataset: str,
    wire_dtype: str = "float32",
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 20,
    opset: int = 17,
    overwrite: bool = False,
) -> Manifest:
    """Export ``students`` (one per plan group, in plan order) and ``detector``'s rest after
    ``point`` to a detection bundle at ``out``; return its manifest.

    ``wire_dtype`` ``"float16"``: devices send their maps rounded to float16 (half the bytes;
    ``rocoin experiment table5`` measures the accuracy cost) and the plan is re-priced for it.
    ``score_threshold``, ``iou_threshold`` and ``max_detections`` are how the source decodes boxes
    (:func:`rocoin.models.boxes.decode`); ``max_detections`` is also the fixed row count of the API's
    outputs. An existing non-empty ``out`` is refused unless ``overwrite`` and it is a bundle.
    """
    _require_exporters()
    if point not in SPLIT_POINTS:
        raise RocoinError(f"point = {point!r}: expected one of {', '.join(SPLIT_POINTS)}")
    if wire_dtype not in WIRE_DTYPES:
        raise RocoinError(f"wire_dtype = {wire_dtype!r}: expected one of {', '.join(WIRE_DTYPES)}")
    if len(students) != plan.num_groups:
        raise RocoinError(f"students: {len(students)} for a plan of {plan.num_groups} groups: expected one per group")
    channels = detector.split_channels(point)
    if plan.num_filters != channels:
        raise RocoinError(f"plan: num_filters = {plan.num_filters} but the detector has {channels} channels at {point!r}")
    for k, (student, group) in enumerate(zip(students, plan.groups)):
        if student.out_channels != len(group.filters):
            raise RocoinError(f"students[{k}]: {student.out_channels} output channels for group {k}'s {len(group.filters)} filters")
    output_dir = Path(os.path.abspath(out))
    _check_output(output_dir, overwrite, [])

    input_shape = tuple(students[0].input_shape())
    cells = detector.feature_size(input_shape[1:])
    priced = _priced(plan, cells, wire_dtype)
    tmp = output_dir.parent / f".{output_dir.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise RocoinError(f"{output_dir}: cannot create a folder beside it ({exc.strerror})") from None
    try:
        detector.eval()
        example = torch.zeros(EXAMPLE_BATCH, *input_shape)
        groups = []
        for k, (student, group) in enumerate(zip(students, priced.groups)):
            path = tmp / group_file(k)
            _export_onnx(student.eval(), example, path, INPUT_NAME, FEATURES_NAME, opset)
            groups.append(
                GroupModel(
                    **_file_fields(path),
                    input=TensorSpec(name=INPUT_NAME, shape=list(input_shape)),
                    output=TensorSpec(name=FEATURES_NAME, shape=[len(group.filters), *cells]),
                    group=k,
                    student=group.student,
                    devices=list(group.devices),
                    filters=list(group.filters),
                    wire_dtype=wire_dtype,
                )
            )
        rest = detector.rest_module(point).eval()
        _export_onnx(rest, torch.zeros(EXAMPLE_BATCH, channels, *cells), tmp / HEAD_FILE, FEATURES_NAME, list(REST_OUTPUTS), opset)
        try:
            manifest = Manifest(
                plan=priced,
                dataset=dataset,
                class_names=list(class_names),
                normalization=Normalization(mean=list(mean), std=list(std)),
                groups=groups,
                head=ModelFile(
                    **_file_fields(tmp / HEAD_FILE),
                    input=TensorSpec(name=FEATURES_NAME, shape=[channels, *cells]),
                    output=TensorSpec(name=REST_OUTPUTS[0], shape=[detector.num_classes, *cells]),
                ),
                rocoin_version=__version__,
                task="detection",
                detection=DetectionSpec(
                    split_point=point,
                    stride_px=detector.stride,
                    box_output=TensorSpec(name=REST_OUTPUTS[1], shape=[4, *cells]),
                    score_threshold=score_threshold,
                    iou_threshold=iou_threshold,
                    max_detections=max_detections,
                ),
            )
        except ValidationError as exc:
            raise RocoinError(format_validation_error(exc, "detection bundle manifest")) from None
        difference = _check_parity(tmp, manifest, detector, students, point, input_shape)
        write_json_atomic(tmp / MANIFEST_NAME, manifest.model_dump(mode="json"))
        shutil.copymode(tmp / HEAD_FILE, tmp / MANIFEST_NAME)
        _check_written(tmp, manifest)
        _move_into_place(tmp, output_dir, overwrite, [])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("detection bundle %s: %d groups + the rest after %s, parity max |diff| %.2g", output_dir, len(groups), point, difference)
    return manifest


def _priced(plan: Plan, cells: tuple[int, int], wire_dtype: str) -> Plan:
    """``plan``, after checking that its catalog prices what the bundle sends: ``h·w`` values per
    filter of 32 bits, or 16 with float16 on the wire (its latencies were computed from that)."""
    values, bits = cells[0] * cells[1], 16 if wire_dtype == "float16" else 32
    for name, spec in plan.catalog.items():
        if (spec.output_values_per_filter, spec.output_bits_per_value) != (values, bits):
            raise RocoinError(
                f"plan: its catalog entry {name!r} prices {spec.output_values_per_filter} values of {spec.output_bits_per_value} bits per"
                f" filter, but the bundle sends {values} of {bits} ({wire_dtype}); plan with"
                f" rocoin.distillation.detection.detection_catalog(..., wire_dtype={wire_dtype!r})"
            )
    return plan


def _check_parity(folder: Path, manifest: Manifest, detector: Detector, students: list[DetectorStudent], point: str, input_shape) -> float:
    """Each group's maps and the whole pipeline (every group present, and group 0 missing) under
    onnxruntime against PyTorch; the largest difference."""
    import onnxruntime as ort

    def session(name: str):
        return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])

    groups = [session(m.file) for m in manifest.groups]
    head = session(manifest.head.file)
    generator = torch.Generator().manual_seed(PARITY_SEED)
    worst = 0.0
    for batch in PARITY_BATCHES:
        x = torch.randn(batch, *input_shape, generator=generator)
        with torch.no_grad():
            maps = [s(x) for s in students]
        for k, (sess, expected) in enumerate(zip(groups, maps)):
            got = sess.run(None, {INPUT_NAME: x.numpy()})[0]
            worst = max(worst, _close(got, expected.numpy(), manifest.groups[k].file, "maps"))
        for missing in (set(), {0}):
            features = torch.zeros(batch, manifest.plan.num_filters, *manifest.head.input.shape[1:])
            assembled = np.zeros(features.shape, dtype=np.float32)
            for k, group in enumerate(manifest.plan.groups):
                if k not in missing:
                    features[:, group.filters] = maps[k]
                    assembled[:, group.filters] = groups[k].run(None, {INPUT_NAME: x.numpy()})[0]
            with torch.no_grad():
                outputs = detector.rest(features, point)
            expected = [outputs["heatmap"], torch.cat([outputs["size"], outputs["offset"]], 1)]
            for got, want, name in zip(head.run(None, {FEATURES_NAME: assembled}), expected, REST_OUTPUTS):
                worst = max(worst, _close(got, want.numpy(), manifest.head.file, f"{name} (groups missing: {sorted(missing)})"))
    return worst


def _close(got: np.ndarray, expected: np.ndarray, file: str, what: str) -> float:
    if got.shape != expected.shape:
        raise RocoinError(f"{file}: onnxruntime gives {what} of shape {got.shape}, PyTorch {expected.shape}; nothing written")
    difference = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    if not np.isfinite(got).all() or not np.allclose(got, expected, rtol=PARITY_RTOL, atol=PARITY_ATOL * 10):
        raise RocoinError(f"{file}: onnxruntime's {what} differ from PyTorch's: max |diff| = {difference:.3g}; nothing written")
    return difference
