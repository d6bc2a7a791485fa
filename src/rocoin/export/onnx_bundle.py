"""students.pt + its plan -> an ONNX bundle the runtime serves (SPEC.md §1–2, §6).

The bundle folder holds

- ``group-{k}.onnx`` for every plan group ``k``: what each device of the group runs, the student's
  backbone, its 1×1 bridge and the spatial mean, i.e. :meth:`DeviceStudent.pooled`:
  ``input`` (B, C, H, W) float32, already normalised -> ``features`` (B, |P_k|);
- ``head.onnx``: the shared FC the source runs, ``features`` (B, F) **in filter order** (group
  ``k``'s values at ``plan.groups[k].filters``, zeros for a missing group) -> ``logits`` (B, classes);
- ``manifest.json`` (:class:`rocoin.contracts.manifest.Manifest`) with the plan, the data set's
  normalisation and class names, and the size and SHA-256 of every file.

The batch axis is dynamic everywhere. Before the bundle is moved into place every file is run with
onnxruntime and compared with PyTorch (each group's features, and the whole pipeline: the
F-vector assembled from the ONNX groups' outputs through ``head.onnx`` against ``network(x)``).
The bundle is built in a temporary folder beside the output and renamed into place only when it
is complete and checked; on any failure nothing is left behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from rocoin import __version__
from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import format_validation_error, write_json_atomic
from rocoin.contracts.manifest import (
    MANIFEST_NAME,
    GroupModel,
    Manifest,
    ModelFile,
    Normalization,
    TensorSpec,
    file_sha256,
    load_manifest,
    verify_file,
)
from rocoin.contracts.plan import Plan, load_plan
from rocoin.data import DatasetInfo
from rocoin.distillation.distill import Students
from rocoin.distillation.students import DeviceStudent, StudentNetwork

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
FEATURES_NAME = "features"
LOGITS_NAME = "logits"
HEAD_FILE = "head.onnx"
BATCH_AXIS = "batch"

#: ONNX opsets the legacy (TorchScript) exporter of torch 2.13 writes and onnxruntime runs; below
#: 13 some of its symbolic functions (ReduceMean with axes, Clip for ReLU6) take other paths.
MIN_OPSET, MAX_OPSET = 13, 20

#: Parity between onnxruntime and PyTorch, ``|onnx - torch| <= atol + rtol·|torch|`` elementwise
#: (numpy's allclose). Both run the same float32 graph on the CPU; they differ only in the order of
#: the floating-point sums (MLAS vs oneDNN kernels, folded BatchNorm), ~1e-7 relative.
PARITY_RTOL = 1e-4
PARITY_ATOL = 1e-5
PARITY_SEED = 0
#: Batch sizes of the seeded random images compared at export (distinct from the export's example
#: batch, so a batch size baked into the graph would show).
PARITY_BATCHES = (1, 4)
EXAMPLE_BATCH = 2


INT8_REPORT = "int8-report.json"


def group_file(k: int) -> str:
    return f"group-{k}.onnx"


class PooledStudent(nn.Module):
    """The device model: ``DeviceStudent.pooled`` as a module's forward, (B, C, H, W) -> (B, |P_k|)."""

    def __init__(self, student: DeviceStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student.pooled(x)


# --------------------------------------------------------------------------------------------
# The entry point


def export_bundle(
    students_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    plan_path: str | os.PathLike[str] | None = None,
    opset: int = 17,
    parity_images: Any = None,
    overwrite: bool = False,
    int8_calibration: np.ndarray | None = None,
    int8_eval: tuple[np.ndarray, np.ndarray] | None = None,
) -> Manifest:
    """Export the students at ``students_path`` to an ONNX bundle at ``output_dir``; return its manifest.

    ``plan_path``, when given, must hold the plan the students were distilled for.
    ``parity_images`` (N, C, H, W), normalised like the training data, replaces the seeded random
    images of the parity check. An existing non-empty ``output_dir`` is refused unless
    ``overwrite`` is set and it is a bundle (holds a ``manifest.json``); it is then replaced only
    once the new bundle is complete and checked.

    ``int8_calibration`` (normalised images) quantises the group models to int8 after the fp32
    parity check; ``int8_eval`` (normalised images, labels) then writes ``int8-report.json``
    comparing size, model time and pipeline accuracy with fp32.
    """
    started = time.perf_counter()
    _require_exporters()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise RocoinError(f"opset = {opset!r}: expected an integer in {MIN_OPSET}..{MAX_OPSET}")
    students_path = Path(students_path)
    output_dir = Path(os.path.abspath(output_dir))
    inputs = [students_path] + ([Path(plan_path)] if plan_path is not None else [])
    _check_output(output_dir, overwrite, inputs)

    students = Students(students_path)
    if plan_path is not None:
        check_same_plan(load_plan(plan_path), students.plan, Path(plan_path), students_path)
    images = parity_inputs(students.info, parity_images)

    tmp = temporary_folder(output_dir)
    try:
        manifest = _write_models(tmp, students, opset)
        differences = check_parity(tmp, manifest, students.network, images)
        if int8_calibration is not None:
            manifest = _quantize(tmp, manifest, int8_calibration, int8_eval)
        write_json_atomic(tmp / MANIFEST_NAME, manifest.model_dump(mode="json"))
        shutil.copymode(tmp / HEAD_FILE, tmp / MANIFEST_NAME)  # the atomic write's temp file is 0600
        _check_written(tmp, manifest)
        _move_into_place(tmp, output_dir, overwrite, inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(m.size_bytes for m in [*manifest.groups, manifest.head])
    logger.info(
        "bundle %s: %d groups + head, %.1f kB of ONNX (opset %d), parity max |diff| %.2g, in %.1f s",
        output_dir,
        len(manifest.groups),
        total / 1e3,
        opset,
        max(differences.values()),
        time.perf_counter() - started,
    )
    return manifest


def _quantize(folder: Path, manifest: Manifest, calibration: np.ndarray, evaluation: tuple[np.ndarray, np.ndarray] | None) -> Manifest:
    from rocoin.export.quantize import compare_pipelines, quantize_model

    originals = folder / ".fp32"
    originals.mkdir()
    for model in manifest.groups:
        shutil.copyfile(folder / model.file, originals / model.file)
        quantize_model(originals / model.file, folder / model.file, model.input.name, calibration)
        logger.info("%s: int8, %.1f kB (fp32 %.1f kB)", model.file, (folder / model.file).stat().st_size / 1e3, model.size_bytes / 1e3)
    groups = [m.model_copy(update=_file_fields(folder / m.file)) for m in manifest.groups]
    quantized = manifest.model_copy(update={"groups": groups, "quantization": "int8"})
    if evaluation is not None:
        images, labels = evaluation
        report = compare_pipelines(
            [originals / m.file for m in groups], [folder / m.file for m in groups], folder / HEAD_FILE, quantized, images, labels
        )
        write_json_atomic(folder / INT8_REPORT, report)
        logger.info(
            "int8: accuracy %.4f (fp32 %.4f), %.0f %% of the fp32 size",
            report["int8"]["accuracy"],
            report["fp32"]["accuracy"],
            100 * report["int8"]["size_bytes"] / report["fp32"]["size_bytes"],
        )
    shutil.rmtree(originals)
    return quantized


def _require_exporters() -> None:
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise RocoinError(f"rocoin export needs {' and '.join(missing)} (pip install {' '.join(missing)})")


# --------------------------------------------------------------------------------------------
# The plan


def check_same_plan(given: Plan, stored: Plan, plan_path: Path, students_path: Path) -> None:
    """Raise, naming the first difference, unless ``given`` is the plan the students were distilled for.

    ``rocoin_version`` (which release wrote the file) is not compared.
    """
    a, b = given.model_dump(mode="json"), stored.model_dump(mode="json")
    for data in (a, b):
        data.pop("rocoin_version", None)
    first = ["num_filters", "groups"]
    keys = first + [k for k in a if k not in first] + [k for k in b if k not in a and k not in first]
    for key in keys:
        found = _first_difference(a.get(key), b.get(key), key)
        if found is not None:
            where, mine, theirs = found
            raise RocoinError(
                f"{plan_path}: {where} = {mine} but {students_path} was distilled for {where} = {theirs};"
                " export with the plan the students were trained for"
            )


def _first_difference(a: Any, b: Any, where: str) -> tuple[str, str, str] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            found = _first_difference(a.get(key), b.get(key), f"{where}.{key}")
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and any(isinstance(v, dict) for v in a + b):
        if len(a) != len(b):
            return f"len({where})", str(len(a)), str(len(b))
        for index, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}[{index}]")
            if found is not None:
                return found
        return None
    if a != b:
        return where, _short(a), _short(b)
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------------------------
# Writing the models


def _write_models(folder: Path, students: Students, opset: int) -> Manifest:
    plan, info, network = students.plan, students.info, students.network
    network.eval()
    example = torch.zeros((EXAMPLE_BATCH, *info.input_shape))
    input_spec = TensorSpec(name=INPUT_NAME, shape=list(info.input_shape))
    groups = []
    for k, (group, student) in enumerate(zip(plan.groups, network.students)):
        path = folder / group_file(k)
        _export_onnx(PooledStudent(student).eval(), example, path, INPUT_NAME, FEATURES_NAME, opset)
        groups.append(
            GroupModel(
                **_file_fields(path),
                input=input_spec,
                output=TensorSpec(name=FEATURES_NAME, shape=[len(group.filters)]),
                group=k,
                student=group.student,
                devices=list(group.devices),
                filters=list(group.filters),
            )
        )
        logger.info(
            "%s: %s for %d filters (devices %s), %.1f kB",
            path.name,
            group.student,
            len(group.filters),
            ", ".join(group.devices),
            groups[-1].size_bytes / 1e3,
        )
    path = folder / HEAD_FILE
    _export_onnx(network.fc.eval(), torch.zeros((EXAMPLE_BATCH, plan.num_filters)), path, FEATURES_NAME, LOGITS_NAME, opset)
    head = ModelFile(
        **_file_fields(path),
        input=TensorSpec(name=FEATURES_NAME, shape=[plan.num_filters]),
        output=TensorSpec(name=LOGITS_NAME, shape=[info.num_classes]),
    )
    logger.info("%s: FC %d -> %d, %.1f kB", path.name, plan.num_filters, info.num_classes, head.size_bytes / 1e3)
    try:
        return Manifest(
            plan=plan,
            dataset=info.name,
            class_names=list(info.class_names),
            normalization=Normalization(mean=list(info.mean), std=list(info.std)),
            groups=groups,
            head=head,
            rocoin_version=__version__,
        )
    except ValidationError as exc:
        raise RocoinError(format_validation_error(exc, "bundle manifest")) from None


def _file_fields(path: Path) -> dict[str, Any]:
    return {"file": path.name, "sha256": file_sha256(path), "size_bytes": path.stat().st_size}


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str | list[str], opset: int) -> None:
    """The legacy TorchScript exporter (the dynamo one needs onnxscript), batch axis dynamic;
    ``output_name`` a list for a module with several outputs (a detector's heatmap and box map)."""
    import onnx

    outputs = [output_name] if isinstance(output_name, str) else list(output_name)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # "legacy TorchScript-based ONNX export" and "The feature will be removed": chosen on purpose.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                input_names=[input_name],
                output_names=outputs,
                dynamic_axes={name: {0: BATCH_AXIS} for name in [input_name, *outputs]},
                opset_version=opset,
                do_constant_folding=True,
            )
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; one line is what the user needs
        raise RocoinError(f"{path.name}: ONNX export at opset {opset} failed ({' '.join(str(exc).split())[:200]})") from None


# --------------------------------------------------------------------------------------------
# Parity with PyTorch


def parity_inputs(info: DatasetInfo, images: Any = None) -> list[torch.Tensor]:
    """The batches compared at export: seeded random normalised images, batches of 1 and 4; or
    ``images`` (N, C, H, W), already normalised, as one batch plus its first image alone."""
    shape = tuple(info.input_shape)
    if images is None:
        generator = torch.Generator().manual_seed(PARITY_SEED)
        pixels = torch.rand((sum(PARITY_BATCHES), *shape), generator=generator)
        mean = torch.tensor(info.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(info.std, dtype=torch.float32)[:, None, None]
        return list(torch.split((pixels - mean) / std, list(PARITY_BATCHES)))
    if isinstance(images, torch.Tensor):
        x = images.detach().to("cpu", torch.float32)
    else:
        try:
            x = torch.from_numpy(np.array(images, dtype=np.float32))
        except (TypeError, ValueError) as exc:
            raise RocoinError(f"parity images: not a float array ({exc})") from None
    if x.ndim != 4 or tuple(x.shape[1:]) != shape or x.shape[0] < 1:
        raise RocoinError(f"parity images: shape {tuple(x.shape)}: expected (N, {', '.join(map(str, shape))}) with N >= 1")
    if not bool(torch.isfinite(x).all()):
        raise RocoinError("parity images: hold NaN or infinite values")
    x = x.contiguous()
    return [x[:1], x] if len(x) > 1 else [x]


def check_parity(folder: Path, manifest: Manifest, network: StudentNetwork, batches: list[torch.Tensor]) -> dict[str, float]:
    """Run every file of the bundle in ``folder`` with onnxruntime and compare with PyTorch.

    Each group's ``features`` against ``DeviceStudent.pooled``; the whole pipeline (the F-vector
    assembled in filter order from the ONNX groups' outputs, through ``head.onnx``) against
    ``network(x)``. Returns the largest absolute difference per file; raises on a mismatch.
    """
    network.eval()
    sessions = {model.file: _session(folder, model) for model in [*manifest.groups, manifest.head]}
    worst = dict.fromkeys(sessions, 0.0)
    for x in batches:
        with torch.inference_mode():
            expected_features = [student.pooled(x).numpy() for student in network.students]
            expected_logits = network(x).numpy()
        x_np = x.numpy()
        assembled = np.zeros((len(x), manifest.plan.num_filters), dtype=np.float32)
        for model, expected in zip(manifest.groups, expected_features):
            (got,) = sessions[model.file].run([model.output.name], {model.input.name: x_np})
            worst[model.file] = max(worst[model.file], _compare(got, expected, model.file, "features"))
            assembled[:, model.filters] = got
        (logits,) = sessions[manifest.head.file].run([manifest.head.output.name], {manifest.head.input.name: assembled})
        what = "logits of the whole pipeline (groups' ONNX features through the head)"
        worst[manifest.head.file] = max(worst[manifest.head.file], _compare(logits, expected_logits, manifest.head.file, what))
    for name, difference in worst.items():
        logger.info(
            "parity %s: max |onnxruntime - torch| = %.3g over batches of %s", name, difference, ", ".join(str(len(x)) for x in batches)
        )
    return worst


def _session(folder: Path, model: ModelFile, outputs: list[TensorSpec] | None = None):
    """An onnxruntime CPU session, after checking the file's input/output names and shapes.

    ``outputs``: the outputs expected, in order, when not the single ``model.output`` (a detector's
    rest has two, the heatmap and the box map).
    """
    import onnxruntime as ort

    path = folder / model.file
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise RocoinError(f"{model.file}: onnxruntime cannot load it ({' '.join(str(exc).split())[:200]})") from None
    wanted = [model.output] if outputs is None else list(outputs)
    for role, found, specs in (("input", session.get_inputs(), [model.input]), ("output", session.get_outputs(), wanted)):
        names = [spec.name for spec in specs]
        if [t.name for t in found] != names or any(t.type != "tensor(float)" for t in found):
            got = ", ".join(f"{t.name} {t.type}" for t in found)
            expected = f"one float32 tensor named {names[0]!r}" if len(names) == 1 else f"float32 tensors named {names!r}"
            raise RocoinError(f"{model.file}: {role} is {got}: expected {expected}")
        for tensor, spec in zip(found, specs):
            dims = list(tensor.shape)
            if len(dims) != len(spec.shape) + 1 or isinstance(dims[0], int) or dims[1:] != spec.shape:
                expected = ", ".join([BATCH_AXIS, *map(str, spec.shape)])
                where = role if len(specs) == 1 else f"{role} {spec.name!r}"
                raise RocoinError(f"{model.file}: {where} shape {dims}: expected [{expected}] with a dynamic batch axis")
    return session


def _compare(got: np.ndarray, expected: np.ndarray, file: str, what: str, atol: float | None = None) -> float:
    """``max |got - expected|``, after checking ``allclose(got, expected, PARITY_RTOL, atol)`` (``atol`` default
    :data:`PARITY_ATOL`, read at call time); raises naming ``file`` otherwise."""
    atol = PARITY_ATOL if atol is None else atol
    if got.shape != expected.shape:
        raise RocoinError(f"{file}: onnxruntime gives {what} of shape {got.shape}, PyTorch {expected.shape}; nothing written")
    if not np.isfinite(expected).all():
        raise RocoinError(f"{file}: PyTorch's {what} hold NaN or infinite values (broken weights?); nothing written")
    difference = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    if not np.isfinite(got).all() or not np.allclose(got, expected, rtol=PARITY_RTOL, atol=atol):
        raise RocoinError(
            f"{file}: onnxruntime's {what} differ from PyTorch's at batch {len(got)}: max |diff| = {difference:.3g}"
            f" (tolerance rtol {PARITY_RTOL:g}, atol {atol:g}); nothing written"
        )
    return difference


# --------------------------------------------------------------------------------------------
# The output folder


def _check_output(output_dir: Path, overwrite: bool, inputs: list[Path]) -> None:
    if not output_dir.name:
        raise RocoinError(f"{output_dir}: not a folder a bundle can be written to")
    if not output_dir.parent.is_dir():
        raise RocoinError(f"{output_dir}: output folder {output_dir.parent} does not exist")
    if not (output_dir.exists() or output_dir.is_symlink()):
        return
    if not output_dir.is_dir():
        raise RocoinError(f"{output_dir}: exists and is not a folder; refusing to replace it")
    if not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise RocoinError(f"{output_dir}: folder exists and is not empty; refusing to replace it without overwrite")
    if not (output_dir / MANIFEST_NAME).is_file():
        raise RocoinError(f"{output_dir}: holds no {MANIFEST_NAME}, so it is not a rocoin bundle; refusing to replace it")
    resolved = output_dir.resolve()
    for path in inputs:
        if resolved in Path(os.path.abspath(path)).resolve().parents:
            raise RocoinError(f"{output_dir}: holds the input {path}; refusing to replace it")


def temporary_folder(output_dir: Path) -> Path:
    """A new folder beside ``output_dir`` to build a bundle in (renamed into place when complete).
    Not mkdtemp: its 0700 would become the bundle's mode; mkdir honours the umask."""
    tmp = output_dir.parent / f".{output_dir.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise RocoinError(f"{output_dir}: cannot create a folder beside it ({exc.strerror})") from None
    return tmp


def _check_written(folder: Path, manifest: Manifest) -> None:
    """The manifest as written loads back, equal, and every file matches its hash."""
    if load_manifest(folder) != manifest:
        raise RocoinError(f"{folder / MANIFEST_NAME}: does not read back as written")
    for model in [*manifest.groups, manifest.head]:
        verify_file(folder, model)


def _move_into_place(tmp: Path, output_dir: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Rename the finished bundle to ``output_dir``; an old bundle there goes only after that succeeds."""
    _check_output(output_dir, overwrite, inputs)  # again: the folder may have changed during the export
    exists = output_dir.exists() or output_dir.is_symlink()
    if exists and output_dir.is_dir() and not output_dir.is_symlink() and not any(output_dir.iterdir()):
        output_dir.rmdir()
        exists = False
    if not exists:
        try:
            os.rename(tmp, output_dir)
        except OSError as exc:
            raise RocoinError(f"{output_dir}: cannot move the bundle into place ({exc.strerror}); nothing written") from None
        return
    backup = output_dir.parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(output_dir, backup)
    try:
        os.rename(tmp, output_dir)
    except OSError as exc:
        os.rename(backup, output_dir)
        raise RocoinError(f"{output_dir}: cannot move the bundle into place ({exc.strerror}); the old bundle is kept") from None
    with contextlib.suppress(OSError):
        if backup.is_symlink():
            backup.unlink()
        else:
            shutil.rmtree(backup)
    logger.info("%s: replaced the previous bundle", output_dir)
