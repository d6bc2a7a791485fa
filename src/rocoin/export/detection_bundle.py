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
with PyTorch under onnxruntime before the bundle is moved into place (each group's maps; ``head.onnx``
on the same assembled map as the torch rest; and the whole pipeline, the ONNX students' maps
assembled with every group and with group 0 missing, through ``head.onnx``, against
:func:`~rocoin.models.detector.assemble_features` of the torch students' maps through
``detector.rest``); the bundle is built beside the output and renamed into place only when
complete; on any failure nothing is left behind.

**The plan must already be priced for what is sent** [decision]: its catalog entries must say
``output_values_per_filter = h·w`` and ``output_bits_per_value = 32`` (16 with ``wire_dtype =
"float16"``), as :func:`rocoin.distillation.detection.detection_catalog` (``wire_dtype=``) makes
them. The export does not re-price: the plan's latencies, group sizes and partitions were chosen by
the planner from those prices (and the fleet's bandwidths, which the export does not have), so
rewriting the catalog here would leave a manifest whose plan claims latencies it was not planned
for. A plan priced otherwise is refused with a message saying how to plan it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from rocoin import __version__
from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import format_validation_error, write_json_atomic
from rocoin.contracts.manifest import (
    MANIFEST_NAME,
    MAX_TENSOR_DIM,
    DetectionSpec,
    GroupModel,
    Manifest,
    ModelFile,
    Normalization,
    TensorSpec,
)
from rocoin.contracts.plan import Plan
from rocoin.export.onnx_bundle import (
    EXAMPLE_BATCH,
    FEATURES_NAME,
    HEAD_FILE,
    INPUT_NAME,
    MAX_OPSET,
    MIN_OPSET,
    PARITY_BATCHES,
    PARITY_SEED,
    _check_output,
    _check_written,
    _compare,
    _export_onnx,
    _file_fields,
    _move_into_place,
    _require_exporters,
    _session,
    group_file,
    temporary_folder,
)
from rocoin.models.detector import REST_OUTPUTS, SPLIT_POINTS, Detector, DetectorStudent, assemble_features

logger = logging.getLogger(__name__)

WIRE_DTYPES = ("float32", "float16")
#: Default absolute parity tolerance of a detection bundle [decision]: 10× the classifier's
#: :data:`~rocoin.export.onnx_bundle.PARITY_ATOL`; the maps and logits are un-pooled and go through
#: more layers (the neck's dilated convolutions), while onnxruntime and PyTorch still differ only
#: in the order of float32 sums (measured ~1e-6 on random detectors).
DETECTION_PARITY_ATOL = 1e-4


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
    parity_atol: float = DETECTION_PARITY_ATOL,
    opset: int = 17,
    overwrite: bool = False,
) -> Manifest:
    """Export ``students`` (one per plan group, in plan order) and ``detector``'s rest after
    ``point`` to a detection bundle at ``out``; return its manifest.

    ``students[k]`` must give ``len(plan.groups[k].filters)`` maps at ``point`` and know its input
    size (built with ``feature_size``); ``plan`` must already price what is sent (see the module
    doc: ``h·w`` values per filter of 32 bits, or 16 with ``wire_dtype="float16"``, the devices then
    rounding their maps to float16: half the bytes; ``rocoin experiment table5`` measures the
    accuracy cost). ``score_threshold``, ``iou_threshold`` and ``max_detections`` are how the source
    decodes boxes (:func:`rocoin.models.boxes.decode`); ``max_detections`` is also the fixed row count
    of the API's outputs. ``parity_atol`` is the absolute tolerance (with relative
    :data:`~rocoin.export.onnx_bundle.PARITY_RTOL`) of the onnxruntime-vs-PyTorch check of every
    part. An existing non-empty ``out`` is refused unless ``overwrite`` and it is a bundle; it is then
    replaced only once the new bundle is complete and checked.

    Every bad argument is one :class:`RocoinError` raised before anything is written.
    """
    _require_exporters()
    input_shape, cells = _check_arguments(
        detector,
        students,
        plan,
        point,
        class_names=class_names,
        mean=mean,
        std=std,
        wire_dtype=wire_dtype,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        parity_atol=parity_atol,
        opset=opset,
    )
    channels = detector.split_channels(point)
    output_dir = Path(os.path.abspath(out))
    _check_output(output_dir, overwrite, [])

    tmp = temporary_folder(output_dir)
    try:
        detector.eval()
        example = torch.zeros(EXAMPLE_BATCH, *input_shape)
        groups = []
        for k, (student, group) in enumerate(zip(students, plan.groups)):
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
                plan=plan.model_copy(deep=True),
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
        differences = check_detection_parity(tmp, manifest, detector, students, atol=parity_atol)
        write_json_atomic(tmp / MANIFEST_NAME, manifest.model_dump(mode="json"))
        shutil.copymode(tmp / HEAD_FILE, tmp / MANIFEST_NAME)  # the atomic write's temp file is 0600
        _check_written(tmp, manifest)
        _move_into_place(tmp, output_dir, overwrite, [])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "detection bundle %s: %d groups + the rest after %s (%s on the wire), parity max |diff| %.2g",
        output_dir,
        len(groups),
        point,
        wire_dtype,
        max(differences.values()),
    )
    return manifest


def _check_arguments(
    detector: Detector,
    students: list[DetectorStudent],
    plan: Plan,
    point: str,
    *,
    class_names: list[str],
    mean: list[float],
    std: list[float],
    wire_dtype: str,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    parity_atol: float,
    opset: int,
) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """One :class:`RocoinError` for the first bad argument; the input shape ``(C, H, W)`` and the map's ``(h, w)``."""
    if point not in SPLIT_POINTS:
        raise RocoinError(f"point = {point!r}: expected one of {', '.join(SPLIT_POINTS)}")
    if wire_dtype not in WIRE_DTYPES:
        raise RocoinError(f"wire_dtype = {wire_dtype!r}: expected one of {', '.join(WIRE_DTYPES)}")
    if not _is_real(score_threshold) or not 0.0 <= score_threshold < 1.0:
        raise RocoinError(f"score_threshold = {score_threshold!r}: expected a probability in [0, 1)")
    if not _is_real(iou_threshold) or not 0.0 < iou_threshold <= 1.0:
        raise RocoinError(f"iou_threshold = {iou_threshold!r}: expected an IoU in (0, 1]")
    if isinstance(max_detections, bool) or not isinstance(max_detections, int) or not 1 <= max_detections <= MAX_TENSOR_DIM:
        raise RocoinError(f"max_detections = {max_detections!r}: expected an integer in 1..{MAX_TENSOR_DIM}")
    if not _is_real(parity_atol) or not parity_atol > 0.0:
        raise RocoinError(f"parity_atol = {parity_atol!r}: expected a finite tolerance > 0")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise RocoinError(f"opset = {opset!r}: expected an integer in {MIN_OPSET}..{MAX_OPSET}")
    if len(class_names) != detector.num_classes:
        raise RocoinError(f"class_names: {len(class_names)} names for a detector of {detector.num_classes} classes")
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != detector.in_channels:
            raise RocoinError(
                f"{name}: {len(values)} values for a detector of {detector.in_channels} input channels: expected one per channel"
            )
    if len(students) != plan.num_groups:
        raise RocoinError(f"students: {len(students)} for a plan of {plan.num_groups} groups: expected one per group")
    channels = detector.split_channels(point)
    if plan.num_filters != channels:
        raise RocoinError(f"plan: num_filters = {plan.num_filters} but the detector has {channels} channels at {point!r}")
    input_shape = None
    for k, (student, group) in enumerate(zip(students, plan.groups)):
        if student.out_channels != len(group.filters):
            raise RocoinError(f"students[{k}]: {student.out_channels} output channels for group {k}'s {len(group.filters)} filters")
        if student.point != point:
            raise RocoinError(f"students[{k}]: distilled for split point {student.point!r}, but the bundle splits at {point!r}")
        if student.feature_size is None:
            raise RocoinError(
                f"students[{k}]: built without feature_size, so its input size is unknown (build_detector_student(..., feature_size))"
            )
        shape = tuple(student.input_shape())
        if input_shape is not None and shape != input_shape:
            raise RocoinError(
                f"students[{k}]: input {shape} but students[0]'s is {input_shape}: expected every group to take the same images"
            )
        input_shape = shape
    if input_shape[0] != detector.in_channels:
        raise RocoinError(f"students: {input_shape[0]} input channels but the detector has {detector.in_channels}")
    cells = detector.feature_size(input_shape[1:])
    _check_priced(plan, cells, wire_dtype)
    return input_shape, cells


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_priced(plan: Plan, cells: tuple[int, int], wire_dtype: str) -> None:
    """Refuse a plan whose catalog does not price what the bundle sends: ``h·w`` values per filter
    of 32 bits, or 16 with float16 on the wire (its latencies were computed from those prices)."""
    values, bits = cells[0] * cells[1], 16 if wire_dtype == "float16" else 32
    for name, spec in plan.catalog.items():
        if (spec.output_values_per_filter, spec.output_bits_per_value) != (values, bits):
            raise RocoinError(
                f"plan: its catalog entry {name!r} prices {spec.output_values_per_filter} values of {spec.output_bits_per_value} bits per"
                f" filter, but the bundle sends {values} of {bits} ({wire_dtype}); plan with"
                f" rocoin.distillation.detection.detection_catalog(..., wire_dtype={wire_dtype!r})"
            )


def check_detection_parity(
    folder: Path, manifest: Manifest, detector: Detector, students: list[DetectorStudent], *, atol: float = DETECTION_PARITY_ATOL
) -> dict[str, float]:
    """Run every file of the detection bundle in ``folder`` with onnxruntime and compare with PyTorch
    on seeded random images (batches :data:`~rocoin.export.onnx_bundle.PARITY_BATCHES`).

    Each group's maps against ``students[k](x)``; ``head.onnx`` against ``detector.rest`` on the
    same assembled map; and the whole pipeline, with every group and with group 0 missing: the ONNX
    maps assembled in channel order (zeros for the missing group) through ``head.onnx``, against
    :func:`~rocoin.models.detector.assemble_features` of the torch maps through ``detector.rest``.
    Returns the largest absolute difference per file (``head.onnx``: over both checks); raises a
    :class:`RocoinError` naming the file on a mismatch.
    """
    detection = manifest.detection
    if detection is None:
        raise RocoinError(f"{folder / MANIFEST_NAME}: not a detection bundle")
    point = detection.split_point
    detector.eval()
    head_outputs = [manifest.head.output, detection.box_output]
    sessions = {model.file: _session(folder, model) for model in manifest.groups}
    sessions[manifest.head.file] = _session(folder, manifest.head, head_outputs)
    worst = dict.fromkeys(sessions, 0.0)
    partitions = [group.filters for group in manifest.plan.groups]
    generator = torch.Generator().manual_seed(PARITY_SEED)

    def rest(features: torch.Tensor) -> list[np.ndarray]:
        with torch.inference_mode():
            out = detector.rest(features, point)
        return [out["heatmap"].numpy(), torch.cat([out["size"], out["offset"]], 1).numpy()]

    def compare(file: str, got: list[np.ndarray], expected: list[np.ndarray], labels: list[str]) -> None:
        for g, e, label in zip(got, expected, labels, strict=True):
            worst[file] = max(worst[file], _compare(g, e, file, label, atol=atol))

    head, head_file, head_input = sessions[manifest.head.file], manifest.head.file, manifest.head.input.name
    names = [spec.name for spec in head_outputs]
    for batch in PARITY_BATCHES:
        x = torch.randn(batch, *manifest.input.shape, generator=generator)
        with torch.inference_mode():
            expected_maps = [student.eval()(x) for student in students]
        got_maps = [sessions[model.file].run([model.output.name], {model.input.name: x.numpy()})[0] for model in manifest.groups]
        for model, got, expected in zip(manifest.groups, got_maps, expected_maps):
            compare(model.file, [got], [expected.numpy()], ["maps"])
        for missing in ((), (0,)):
            mask = torch.tensor([[k in missing for k in range(len(partitions))]] * batch)
            features = assemble_features(expected_maps, partitions, manifest.plan.num_filters, mask)
            expected = rest(features)
            labels = [f"{name} (head alone, groups missing {list(missing)})" for name in names]
            compare(head_file, head.run(names, {head_input: features.numpy()}), expected, labels)
            assembled = np.zeros(features.shape, dtype=np.float32)
            for k, (model, maps) in enumerate(zip(manifest.groups, got_maps)):
                if k not in missing:
                    assembled[:, model.filters] = maps
            labels = [f"{name} (whole pipeline, groups missing {list(missing)})" for name in names]
            compare(head_file, head.run(names, {head_input: assembled}), expected, labels)
    for name, difference in worst.items():
        logger.info("parity %s: max |onnxruntime - torch| = %.3g over batches of %s", name, difference, ", ".join(map(str, PARITY_BATCHES)))
    return worst
