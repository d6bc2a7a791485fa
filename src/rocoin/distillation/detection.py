"""RoCoIn for object detection (issue 15, the paper's Table V): the teacher detector, its students and mAP.

The teacher (:class:`rocoin.models.detector.Detector`, ``det-wrn-D-K``) is trained on a
:class:`~rocoin.data.detection.DetectionSplits` with the CenterNet loss
(:class:`~rocoin.distillation.detection_losses.DetectionLoss`): AdamW, a cosine learning-rate
schedule over all steps, and (``augment``) a random horizontal flip of half the images with their
boxes. Images are normalised as ``(pixels / 255 − mean) / std`` with the training set's
per-channel mean and standard deviation (of ``pixels / 255``), stored with the teacher.

A plan (:class:`~rocoin.contracts.plan.Plan`) made for a split point (``"backbone"``: BC,
``"neck"``: BNC) has one group per partition ``P_k`` of the teacher's ``F`` channels there;
:func:`distill_detection` trains one :class:`~rocoin.models.detector.DetectorStudent` per group
(the group's ``student`` architecture, ``|P_k|`` output channels), all jointly, with

``L = imitation_weight · Σ_k mean (s_k − t[:, P_k])² + detection_weight · L_det(rest(assemble(s, missing)), targets)
+ output_weight · L_out(rest(assemble(s, missing)), rest(t))`` (the head's outputs imitated: measured on
Table V's default size, BC students 52.85 % mAP@0.5 with it against 51.04 % without)

where ``t`` is the frozen teacher's split-point map, ``assemble`` places each student's map on its
channels (:func:`~rocoin.models.detector.assemble_features`, zeros for missing groups), ``rest`` is
the teacher's frozen remainder (neck and head, or the head) and ``L_det`` the detection loss on the
labels. With ``failure_aware`` each group of each training image is missing with the plan's group
failure probability (:func:`drop_probabilities`), as at the source's deadline.

Both trainings save a checkpoint (:mod:`rocoin.distillation.checkpoint`: tensors and JSON only,
loaded with ``weights_only=True``) at ``path`` after every epoch, with the optimiser, schedule and
random state: a rerun with the same settings continues after the last finished epoch, and a finished
file is loaded instead of retrained. A checkpoint made with other settings (configuration, plan,
split point, training data or teacher) is refused with a :class:`RocoinError`.

:func:`predict` runs the teacher alone or the students with groups missing, and decodes boxes
with :func:`rocoin.models.boxes.decode`; :func:`evaluate_detection` gives COCO mAP (percent) with
``J`` random devices failed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from rocoin.contracts.catalog import Catalog, StudentSpec
from rocoin.contracts.errors import RocoinError
from rocoin.contracts.plan import Plan
from rocoin.contracts.progress import Progress, log_progress
from rocoin.data.detection import DetectionDataset, DetectionSplits
from rocoin.data.detection_metrics import mean_average_precision
from rocoin.distillation.checkpoint import load_checkpoint, load_state, save_checkpoint
from rocoin.distillation.detection_losses import DetectionLoss, FeatureImitationLoss, encode_targets
from rocoin.distillation.evaluate import missing_slots, random_failures
from rocoin.distillation.students import sample_slot_mask
from rocoin.distillation.training import compute_device, cosine_schedule, use_all_cores
from rocoin.models.boxes import Detections, decode
from rocoin.models.detector import (
    Detector,
    DetectorStudent,
    assemble_features,
    build_detector,
    build_detector_student,
)
from rocoin.models.measure import measure_module

logger = logging.getLogger(__name__)

TEACHER_KIND = "detection-teacher"
STUDENTS_KIND = "detection-students"
#: Gradient-norm clip of both trainings (the focal loss spikes early on when few peaks are found).
MAX_GRAD_NORM = 10.0
#: Batch size of inference passes (predictions, activations).
PREDICT_BATCH_SIZE = 128
#: Configuration fields that do not change what is trained (left out when checkpoints are compared).
_RUN_ONLY_FIELDS = ("device",)


class DetectionTrainConfig(BaseModel):
    """How the teacher detector is trained (also the base of :class:`DetectionDistillConfig`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=3, ge=1, description="passes over the training images")
    batch_size: int = Field(default=64, ge=1, description="images per optimiser step")
    lr: float = Field(default=2e-3, gt=0, allow_inf_nan=False, description="AdamW's peak learning rate (cosine decay to 0)")
    weight_decay: float = Field(default=1e-4, ge=0, allow_inf_nan=False, description="AdamW's decoupled weight decay")
    seed: int = 0
    max_train_images: int | None = Field(default=None, gt=0, description="use only the first N training images")
    augment: bool = Field(default=True, description="flip half the training images horizontally (with their boxes)")
    device: str = Field(default="cpu", description="cpu, cuda, cuda:N or auto; checkpoints are the same")


class DetectionDistillConfig(DetectionTrainConfig):
    """How the students of a plan are distilled from a trained teacher."""

    imitation_weight: float = Field(default=1.0, ge=0, allow_inf_nan=False, description="per-partition feature imitation")
    detection_weight: float = Field(default=1.0, ge=0, allow_inf_nan=False, description="detection loss through the teacher's rest")
    output_weight: float = Field(
        default=1.0,
        ge=0,
        allow_inf_nan=False,
        description="the head's outputs imitated too: BCE to the teacher's heatmap probabilities + L1 to its box map where it sees objects",
    )
    failure_aware: bool = Field(default=False, description="drop groups with the plan's failure probabilities during training")


@dataclass
class DetectionTeacher:
    """A trained teacher detector and what using it needs: input ``(C, H, W)`` pixels and the
    normalisation ``(pixels / 255 − mean) / std`` per channel."""

    model: Detector
    arch: str
    class_names: list[str]
    input_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    history: list[dict] = field(default_factory=list)

    @property
    def feature_size(self) -> tuple[int, int]:
        """``(h, w)`` cells of the split-point map for the teacher's input size."""
        return self.model.feature_size(self.input_shape[1:])


@dataclass
class DetectionStudents:
    """The distilled students of a plan: ``modules[k]`` runs on the devices of ``plan.groups[k]``
    and produces the teacher's channels ``plan.groups[k].filters`` at split ``point``."""

    modules: list[DetectorStudent]
    plan: Plan
    point: str
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Data


def _normalisation(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of ``images / 255`` (uint8 (N, C, H, W))."""
    scaled = images.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = scaled.std(axis=(0, 2, 3))
    return [float(m) for m in mean], [float(s) if s > 1e-6 else 1.0 for s in std]


def _to_tensor(images: np.ndarray, mean: Sequence[float], std: Sequence[float], device: torch.device) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 − mean) / std`` on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device=device, dtype=torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=device)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=device)[None, :, None, None]
    return (x - m) / s


def _train_subset(splits: DetectionSplits, config: DetectionTrainConfig) -> DetectionDataset:
    train = splits.train
    if config.max_train_images is not None and config.max_train_images < len(train):
        train = train.subset(np.arange(config.max_train_images))
    if len(train) == 0 or train.num_boxes == 0:
        raise RocoinError(f"{train.name}: the training split holds {len(train)} images and {train.num_boxes} boxes; nothing to learn")
    return train


def _dataset_digest(data: DetectionDataset) -> str:
    """A short SHA-256 of the images, boxes, labels and class names (checkpoints are bound to their training data)."""
    digest = hashlib.sha256()
    digest.update(repr((data.images.shape, data.class_names)).encode())
    digest.update(np.ascontiguousarray(data.images).tobytes())
    for boxes, labels in zip(data.boxes, data.labels):
        digest.update(np.ascontiguousarray(boxes, dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def _weights_digest(module: nn.Module) -> str:
    """A short SHA-256 of a module's state dict (names and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _train_batches(
    data: DetectionDataset, batch_size: int, generator: torch.Generator, augment: bool
) -> Iterator[tuple[np.ndarray, list[np.ndarray], list[np.ndarray], np.ndarray]]:
    """Shuffled ``(images uint8, boxes, labels, flip)`` batches; ``flip[i]``: mirror image ``i`` (and its boxes)."""
    order = torch.randperm(len(data), generator=generator).numpy()
    flips = (torch.rand(len(data), generator=generator) < 0.5).numpy() if augment else np.zeros(len(data), dtype=bool)
    width = data.images.shape[3]
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        flip = flips[start : start + batch_size]
        boxes = []
        for i, f in zip(index, flip):
            b = data.boxes[i]
            boxes.append(np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], axis=1) if f else b)
        yield data.images[index], boxes, [data.labels[i] for i in index], flip


def _batch_tensor(images: np.ndarray, flip: np.ndarray, mean: Sequence[float], std: Sequence[float], device: torch.device) -> torch.Tensor:
    x = _to_tensor(images, mean, std, device)
    if flip.any():
        mirror = torch.from_numpy(flip).to(device)
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x


# --------------------------------------------------------------------------------------------
# Checkpoints


def _identity(config: DetectionTrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in _RUN_ONLY_FIELDS}


def _check_same(path: Path, stored: dict[str, Any], wanted: dict[str, Any], what: str) -> None:
    """Refuse a checkpoint whose settings differ from this run's, naming the first differences."""
    differing = [key for key in wanted if stored.get(key) != wanted[key]]
    if differing:
        details = []
        for key in differing[:3]:
            old, new = stored.get(key), wanted[key]
            if isinstance(old, dict) and isinstance(new, dict):
                inner = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                details.append(f"{key}: {', '.join(f'{k} {_short(old.get(k))} vs {_short(new.get(k))}' for k in inner[:4])}")
            else:
                details.append(f"{key}: {_short(old)} vs {_short(new)}")
        raise RocoinError(
            f"{path}: holds {what} made with other settings ({'; '.join(details)}: the file's vs this run's);"
            " delete it or choose another path"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _training_state(
    path: Path, kind: str, wanted: dict[str, Any], what: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict] | None:
    """The checkpoint at ``path`` when it was made with ``wanted`` settings; ``None`` when there is none."""
    if not path.exists():
        return None
    metadata, state_dict, payload = load_checkpoint(path, kind)
    _check_same(path, metadata, wanted, what)
    return metadata, state_dict, payload


# --------------------------------------------------------------------------------------------
# The teacher


def train_detection_teacher(
    arch: str,
    splits: DetectionSplits,
    config: DetectionTrainConfig,
    *,
    path: Path | None = None,
    progress: Progress | None = None,
) -> DetectionTeacher:
    """Train the detector ``arch`` (``det-wrn-D-K``) on ``splits.train``; with ``path``, save it there after every epoch.

    A finished checkpoint at ``path`` made with the same arch, configuration (``device`` aside) and
    training data is loaded instead of retrained; an unfinished one is continued after its last
    epoch; one made with other settings raises :class:`RocoinError`. ``progress`` is told of every
    training step (one task per epoch). The history holds per epoch the mean loss terms, the
    training speed (images/s) and the mAP@0.5 (percent) on ``splits.val``.
    """
    progress = progress or log_progress
    path = Path(path) if path is not None else None
    train = _train_subset(splits, config)
    in_channels, height, width = train.image_shape
    mean, std = _normalisation(train.images)
    wanted = {"arch": arch, "config": _identity(config), "data": _dataset_digest(train)}
    saved = _training_state(path, TEACHER_KIND, wanted, "a detection teacher") if path is not None else None
    if saved is not None and saved[0].get("finished"):
        logger.info("detection teacher %s: loading the finished run at %s", arch, path)
        return _teacher_from_checkpoint(path, *saved[:2])
    use_all_cores()
    on = compute_device(config.device)
    torch.manual_seed(config.seed)
    model = build_detector(arch, in_channels=in_channels, num_classes=train.num_classes).to(on)
    feature_size = model.feature_size((height, width))
    run = _Optimisation.start(model, config, len(train), saved, path, f"detection teacher {arch}")
    generator, history, steps_per_epoch = run.generator, run.history, run.steps_per_epoch
    teacher = DetectionTeacher(model, arch, list(train.class_names), (in_channels, height, width), mean, std, history)
    loss_fn = DetectionLoss()
    for epoch in range(len(history), config.epochs):
        model.train()
        started, seen, totals = time.perf_counter(), 0, {"total": 0.0, "heatmap": 0.0, "size": 0.0, "offset": 0.0}
        with progress(f"detection teacher epoch {epoch + 1}/{config.epochs}", steps_per_epoch) as advance:
            for images, boxes, labels, flip in _train_batches(train, config.batch_size, generator, config.augment):
                x = _batch_tensor(images, flip, mean, std, on)
                targets = encode_targets(boxes, labels, train.num_classes, feature_size, model.stride, device=on)
                loss, terms = loss_fn(model(x), targets)
                run.step(loss, model)
                seen += len(images)
                for key in totals:
                    totals[key] += terms[key] * len(images)
                advance(loss=terms["total"])
        record = _epoch_record(epoch, totals, seen, time.perf_counter() - started)
        model.eval()
        record["val_map_50_pct"] = _val_map(teacher, None, splits.val)
        history.append(record)
        logger.info("detection teacher epoch %d: %s", epoch + 1, _describe_record(record))
        metadata = {**wanted, "class_names": teacher.class_names, "input_shape": list(teacher.input_shape), "mean": mean, "std": std}
        run.save(path, TEACHER_KIND, metadata, model, epoch + 1, config.epochs)
    model.eval()
    return teacher


def _output_imitation(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's outputs imitated: binary cross-entropy of the heatmap logits to the teacher's
    probabilities, and L1 of size and offset to the teacher's, weighted by where the teacher sees
    an object (its highest class probability per cell)."""
    soft = torch.sigmoid(teacher["heatmap"])
    heat = F.binary_cross_entropy_with_logits(student["heatmap"], soft)
    weight = soft.amax(dim=1, keepdim=True)
    boxes = sum(((student[k] - teacher[k]).abs() * weight).sum() for k in ("size", "offset")) / weight.sum().clamp_min(1.0)
    return heat + boxes


@dataclass
class _Optimisation:
    """AdamW with a cosine schedule, the batch-order generator and the epochs' history of one
    training run; resumed from a checkpoint's payload, saved after every epoch."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    history: list[dict]
    steps_per_epoch: int

    @classmethod
    def start(
        cls, module: nn.Module, config: DetectionTrainConfig, num_images: int, saved: Any, path: Path | None, what: str
    ) -> _Optimisation:
        optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = -(-num_images // config.batch_size)
        scheduler = cosine_schedule(optimizer, config.epochs * steps_per_epoch)
        run = cls(optimizer, scheduler, torch.Generator().manual_seed(config.seed), [], steps_per_epoch)
        if saved is not None:
            metadata, state_dict, payload = saved
            load_state(module, state_dict, path, what)
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
            run.generator.set_state(payload["generator"])
            run.history = list(metadata["history"])
            logger.info("%s: resuming %s after epoch %d/%d", what, path, len(run.history), config.epochs)
        return run

    def step(self, loss: torch.Tensor, module: nn.Module) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(module.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()

    def save(self, path: Path | None, kind: str, metadata: dict[str, Any], module: nn.Module, epoch: int, epochs: int) -> None:
        """The checkpoint after ``epoch`` (the optimiser's state only while epochs remain)."""
        if path is None:
            return
        finished = epoch == epochs
        metadata = {**metadata, "epoch": epoch, "finished": finished, "history": self.history}
        extra = (
            {}
            if finished
            else {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(),
            }
        )
        save_checkpoint(path, kind, metadata, module.state_dict(), **extra)


def _epoch_record(epoch: int, totals: dict[str, float], seen: int, seconds: float) -> dict[str, Any]:
    return {
        "epoch": epoch + 1,
        **{("loss" if k == "total" else f"loss_{k}"): v / max(seen, 1) for k, v in totals.items()},
        "images_per_s": seen / max(seconds, 1e-9),
        "seconds": seconds,
    }


def _describe_record(record: dict[str, Any]) -> str:
    val = record.get("val_map_50_pct")
    shown = "n/a" if val is None else f"{val:.1f}%"
    return f"loss {record['loss']:.4f}, val mAP@0.5 {shown}, {record['images_per_s']:.0f} images/s"


def _val_map(teacher: DetectionTeacher, students: DetectionStudents | None, val: DetectionDataset) -> float | None:
    """mAP@0.5 (percent) on the validation split; ``None`` when it holds no box."""
    if len(val) == 0 or val.num_boxes == 0:
        return None
    return float(mean_average_precision(val, predict(teacher, students, val.images))["map_50_pct"])


def _teacher_from_checkpoint(path: Path, metadata: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> DetectionTeacher:
    if not metadata.get("finished"):
        raise RocoinError(
            f"{path}: the teacher's training stopped after epoch {metadata.get('epoch')};"
            " rerun train_detection_teacher with the same settings to finish it"
        )
    try:
        arch = str(metadata["arch"])
        class_names = [str(c) for c in metadata["class_names"]]
        input_shape = tuple(int(v) for v in metadata["input_shape"])
        mean, std = [float(v) for v in metadata["mean"]], [float(v) for v in metadata["std"]]
        history = list(metadata["history"])
    except (KeyError, TypeError, ValueError):
        raise RocoinError(
            f"{path}: detection teacher metadata is incomplete (expected arch, class_names, input_shape, mean, std)"
        ) from None
    if len(input_shape) != 3 or len(mean) != input_shape[0] or len(std) != input_shape[0]:
        raise RocoinError(f"{path}: input_shape {input_shape} does not fit mean {mean} / std {std}")
    model = build_detector(arch, in_channels=input_shape[0], num_classes=len(class_names))
    load_state(model, state_dict, path, f"detection teacher {arch}")
    model.eval()
    return DetectionTeacher(model, arch, class_names, input_shape, mean, std, history)  # type: ignore[arg-type]


def load_detection_teacher(path: str | Path) -> DetectionTeacher:
    """The finished teacher saved by :func:`train_detection_teacher` (on the CPU, in eval mode)."""
    metadata, state_dict, _ = load_checkpoint(path, TEACHER_KIND)
    return _teacher_from_checkpoint(Path(path), metadata, state_dict)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.inference_mode()
def split_activations(teacher: DetectionTeacher, images: np.ndarray, point: str, batch_size: int = PREDICT_BATCH_SIZE) -> np.ndarray:
    """(N, F) float64: the teacher's split-point map of every image averaged over its ``h × w`` cells,
    non-negative (it follows a ReLU): the filter activity :func:`rocoin.planning.filter_graph` needs."""
    model = teacher.model.eval()
    on = _device_of(model)
    out = [
        model.features(_to_tensor(images[start : start + batch_size], teacher.mean, teacher.std, on), point).mean(dim=(2, 3)).cpu()
        for start in range(0, len(images), batch_size)
    ]
    if not out:
        raise RocoinError("split_activations: no images")
    return torch.cat(out).double().numpy()


def detection_catalog(archs: list[str], point: str, teacher: DetectionTeacher, *, wire_dtype: str = "float32") -> Catalog:
    """The measured catalog of the students ``archs`` (``wrn-D-K``) at split ``point`` for the teacher's input shape.

    Each entry is :func:`rocoin.models.measure.measure_module` of a student whose 1×1 bridge goes to
    all ``F`` channels of the split point: its FLOPs, parameters and memory (bytes) are an **upper
    bound** of the real student's, whose bridge has only ``|P_k| ≤ F`` outputs (the partition is
    not known when the planner reads the catalog). ``out_dim = F``; a device sends
    ``output_values_per_filter = h·w`` float32 values (``output_bits_per_value = 32``) per channel
    of its partition (16-bit ones with ``wire_dtype="float16"``: devices round their maps before sending).
    """
    if wire_dtype not in ("float32", "float16"):
        raise RocoinError(f"wire_dtype = {wire_dtype!r}: expected float32 or float16")
    if not archs:
        raise RocoinError("detection_catalog: no student architecture given")
    channels = teacher.model.split_channels(point)
    h, w = teacher.feature_size
    entries: dict[str, StudentSpec] = {}
    for arch in archs:
        student = build_detector_student(arch, point, channels, teacher.input_shape[0], (h, w))
        measured = measure_module(student, teacher.input_shape)
        entries[arch] = StudentSpec(
            flops=float(measured.flops),
            memory_bytes=measured.memory_bytes,
            params=measured.params,
            out_dim=channels,
            output_values_per_filter=h * w,
            output_bits_per_value=16 if wire_dtype == "float16" else 32,
        )
        logger.debug("detection student %s at %s: %s", arch, point, entries[arch])
    return Catalog(entries)


# --------------------------------------------------------------------------------------------
# The students


def drop_probabilities(plan: Plan, config: DetectionDistillConfig) -> np.ndarray:
    """(K,) probability that group ``k`` is missing for a training image: the plan's group failure
    probability with ``failure_aware``, else 0."""
    if not config.failure_aware:
        return np.zeros(plan.num_groups)
    return np.array([g.failure_prob for g in plan.groups], dtype=np.float64)


def _check_plan(plan: Plan, teacher: DetectionTeacher, point: str) -> None:
    channels = teacher.model.split_channels(point)
    if plan.num_filters != channels:
        raise RocoinError(
            f"plan: num_filters = {plan.num_filters} but the teacher {teacher.arch} has {channels} channels at the {point!r}"
            " split point; plan with this teacher's split_activations"
        )


def _build_students(plan: Plan, point: str, in_channels: int, feature_size: tuple[int, int]) -> list[DetectorStudent]:
    return [build_detector_student(g.student, point, len(g.filters), in_channels, feature_size) for g in plan.groups]


def distill_detection(
    teacher: DetectionTeacher,
    plan: Plan,
    point: str,
    splits: DetectionSplits,
    config: DetectionDistillConfig,
    *,
    path: Path | None = None,
    progress: Progress | None = None,
) -> DetectionStudents:
    """Distil one student per group of ``plan`` at split ``point`` from the frozen ``teacher`` (see the module doc).

    With ``path`` the students are saved there after every epoch: a finished checkpoint of the same
    teacher (weights), plan, split point, configuration (``device`` aside) and training data is
    loaded instead of retrained, an unfinished one continued, any other refused (:class:`RocoinError`).
    The history holds per epoch the mean loss terms (``loss``, ``loss_imitation``, ``loss_detection``
    and the detection terms), images/s and the students' mAP@0.5 (percent, all groups present) on
    ``splits.val``. The teacher's parameters are left as they were (frozen only during training).
    """
    progress = progress or log_progress
    path = Path(path) if path is not None else None
    _check_plan(plan, teacher, point)
    train = _train_subset(splits, config)
    if train.image_shape != tuple(teacher.input_shape) or list(train.class_names) != teacher.class_names:
        raise RocoinError(
            f"{train.name}: images {train.image_shape} with {len(train.class_names)} classes, but the teacher {teacher.arch}"
            f" was trained on {tuple(teacher.input_shape)} with {len(teacher.class_names)} classes"
        )
    feature_size = teacher.feature_size
    channels = plan.num_filters
    wanted = {
        "point": point,
        "plan": plan.model_dump(mode="json"),
        "config": _identity(config),
        "teacher": {"arch": teacher.arch, "weights": _weights_digest(teacher.model)},
        "data": _dataset_digest(train),
    }
    saved = _training_state(path, STUDENTS_KIND, wanted, "detection students") if path is not None else None
    if saved is not None and saved[0].get("finished"):
        logger.info("detection students: loading the finished run at %s", path)
        return _students_from_checkpoint(path, *saved[:2])
    use_all_cores()
    on = compute_device(config.device)
    torch.manual_seed(config.seed)
    modules = nn.ModuleList(_build_students(plan, point, teacher.input_shape[0], feature_size)).to(on)
    run = _Optimisation.start(
        modules, config, len(train), saved, path, f"the students of its plan ({', '.join(g.student for g in plan.groups)})"
    )
    generator, history, steps_per_epoch = run.generator, run.history, run.steps_per_epoch
    students = DetectionStudents(list(modules), plan, point, history)
    partitions = [list(g.filters) for g in plan.groups]
    drop = torch.from_numpy(drop_probabilities(plan, config)).float()
    detection_loss, imitation_loss = DetectionLoss(), FeatureImitationLoss()
    model = teacher.model.to(on).eval()
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for epoch in range(len(history), config.epochs):
            modules.train()
            started, seen = time.perf_counter(), 0
            totals = {"total": 0.0, "imitation": 0.0, "detection": 0.0, "heatmap": 0.0, "size": 0.0, "offset": 0.0}
            with progress(f"detection students epoch {epoch + 1}/{config.epochs}", steps_per_epoch) as advance:
                for images, boxes, labels, flip in _train_batches(train, config.batch_size, generator, config.augment):
                    x = _batch_tensor(images, flip, teacher.mean, teacher.std, on)
                    with torch.no_grad():
                        teacher_map = model.features(x, point)
                        teacher_out = model.rest(teacher_map, point) if config.output_weight else None
                    maps = [m(x) for m in modules]
                    missing = sample_slot_mask(len(images), drop, generator).to(on) if config.failure_aware else None
                    outputs = model.rest(assemble_features(maps, partitions, channels, missing), point)
                    targets = encode_targets(boxes, labels, train.num_classes, feature_size, model.stride, device=on)
                    det, terms = detection_loss(outputs, targets)
                    imitation = imitation_loss(maps, teacher_map, partitions)
                    loss = config.imitation_weight * imitation + config.detection_weight * det
                    if teacher_out is not None:
                        loss = loss + config.output_weight * _output_imitation(outputs, teacher_out)
                    run.step(loss, modules)
                    seen += len(images)
                    values = {**terms, "total": float(loss.detach()), "imitation": float(imitation.detach()), "detection": terms["total"]}
                    for key in totals:
                        totals[key] += values[key] * len(images)
                    advance(loss=values["total"])
            record = _epoch_record(epoch, totals, seen, time.perf_counter() - started)
            modules.eval()
            record["val_map_50_pct"] = _val_map(teacher, students, splits.val)
            history.append(record)
            logger.info("detection students epoch %d: %s", epoch + 1, _describe_record(record))
            metadata = {
                **wanted,
                "input_shape": list(teacher.input_shape),
                "feature_size": list(feature_size),
                "mean": teacher.mean,
                "std": teacher.std,
                "drop_probabilities": drop.tolist(),
            }
            run.save(path, STUDENTS_KIND, metadata, modules, epoch + 1, config.epochs)
    finally:
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
    modules.eval()
    return students


def _students_from_checkpoint(path: Path, metadata: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> DetectionStudents:
    if not metadata.get("finished"):
        raise RocoinError(
            f"{path}: the students' training stopped after epoch {metadata.get('epoch')};"
            " rerun distill_detection with the same settings to finish it"
        )
    try:
        plan = Plan.model_validate(metadata["plan"])
        point = str(metadata["point"])
        in_channels = int(metadata["input_shape"][0])
        feature_size = (int(metadata["feature_size"][0]), int(metadata["feature_size"][1]))
        history = list(metadata["history"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise RocoinError(f"{path}: detection students metadata is incomplete or invalid ({' '.join(str(exc).split())[:160]})") from None
    modules = nn.ModuleList(_build_students(plan, point, in_channels, feature_size))
    load_state(modules, state_dict, path, f"the students of its plan ({', '.join(g.student for g in plan.groups)})")
    modules.eval()
    return DetectionStudents(list(modules), plan, point, history)


def load_detection_students(path: str | Path) -> DetectionStudents:
    """The finished students saved by :func:`distill_detection` (on the CPU, in eval mode)."""
    metadata, state_dict, _ = load_checkpoint(path, STUDENTS_KIND)
    return _students_from_checkpoint(Path(path), metadata, state_dict)


# --------------------------------------------------------------------------------------------
# Inference and mAP


def _missing_mask(missing: np.ndarray | None, num_images: int, num_groups: int) -> np.ndarray:
    """``missing`` as (N, K) booleans (``None``: nothing missing; (K,): the same for every image)."""
    if missing is None:
        return np.zeros((num_images, num_groups), dtype=bool)
    mask = np.asarray(missing)
    if mask.dtype != bool:
        raise RocoinError(f"missing: dtype {mask.dtype}: expected booleans (True = the group's map is zero-filled)")
    if mask.shape == (num_groups,):
        return np.repeat(mask[None, :], num_images, axis=0)
    if mask.shape != (num_images, num_groups):
        raise RocoinError(f"missing: shape {mask.shape}: expected ({num_groups},) or ({num_images}, {num_groups}) for {num_groups} groups")
    return mask


def _decode(teacher: DetectionTeacher, outputs: dict[str, torch.Tensor], options: dict[str, Any]) -> list[Detections]:
    box = torch.cat([outputs["size"], outputs["offset"]], dim=1)
    return decode(
        outputs["heatmap"].float().cpu().numpy(),
        box.float().cpu().numpy(),
        stride=teacher.model.stride,
        score_threshold=options["score_threshold"],
        max_detections=options["max_detections"],
        nms_iou=options["iou_threshold"],
        image_size=tuple(teacher.input_shape[1:]),
    )


def _check_students(teacher: DetectionTeacher, students: DetectionStudents) -> None:
    _check_plan(students.plan, teacher, students.point)
    if len(students.modules) != students.plan.num_groups:
        raise RocoinError(f"{len(students.modules)} student modules for the plan's {students.plan.num_groups} groups")


def _check_images(teacher: DetectionTeacher, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != tuple(teacher.input_shape):
        raise RocoinError(
            f"images: {images.dtype} {images.shape}: expected uint8 (N, {', '.join(str(v) for v in teacher.input_shape)}), the teacher's input"
        )
    return images


@torch.inference_mode()
def predict(
    teacher: DetectionTeacher,
    students: DetectionStudents | None,
    images: np.ndarray,
    *,
    missing: np.ndarray | None = None,
    score_threshold: float = 0.05,
    iou_threshold: float | None = 0.5,
    max_detections: int = 100,
    batch_size: int = PREDICT_BATCH_SIZE,
) -> list[Detections]:
    """Per image ``(boxes (n, 4) float32 xyxy pixels, scores (n,) float32, labels (n,) int64)``, by decreasing score.

    ``images`` uint8 (N, C, H, W) of the teacher's input shape. ``students`` ``None``: the teacher
    alone; else each group's student map, the groups of ``missing`` ((N, K) or (K,) booleans)
    zero-filled, assembled and passed through the teacher's rest, as the source does. Boxes come
    from :func:`rocoin.models.boxes.decode` (peaks ``>= score_threshold``, at most ``max_detections``
    per image, class-wise NMS at IoU ``iou_threshold``; ``None``: none).
    """
    images = _check_images(teacher, images)
    options = {"score_threshold": score_threshold, "iou_threshold": iou_threshold, "max_detections": max_detections}
    model = teacher.model.eval()
    on = _device_of(model)
    if students is not None:
        _check_students(teacher, students)
        mask = _missing_mask(missing, len(images), students.plan.num_groups)
        partitions = [list(g.filters) for g in students.plan.groups]
        for module in students.modules:
            module.to(on).eval()
    elif missing is not None:
        raise RocoinError("missing groups need students: the teacher alone has no groups")
    results: list[Detections] = []
    for start in range(0, len(images), batch_size):
        x = _to_tensor(images[start : start + batch_size], teacher.mean, teacher.std, on)
        if students is None:
            outputs = model(x)
        else:
            batch_missing = torch.from_numpy(np.ascontiguousarray(mask[start : start + len(x)])).to(on)
            features = _assembled(students, x, partitions, model.split_channels(students.point), batch_missing)
            outputs = model.rest(features, students.point)
        results.extend(_decode(teacher, outputs, options))
    return results


def _assembled(
    students: DetectionStudents, x: torch.Tensor, partitions: list[list[int]], channels: int, missing: torch.Tensor
) -> torch.Tensor:
    """The source's split-point map for a batch; a group missing for every image of it is not run."""
    maps = []
    for k, module in enumerate(students.modules):
        if bool(missing[:, k].all()):
            h, w = _cells(x, module)
            maps.append(x.new_zeros((x.shape[0], len(partitions[k]), h, w)))
        else:
            maps.append(module(x))
    return assemble_features(maps, partitions, channels, missing)


def _cells(x: torch.Tensor, module: DetectorStudent) -> tuple[int, int]:
    return x.shape[2] // module.stride, x.shape[3] // module.stride


@torch.inference_mode()
def student_features(
    teacher: DetectionTeacher, students: DetectionStudents, images: np.ndarray, batch_size: int = PREDICT_BATCH_SIZE
) -> torch.Tensor:
    """The assembled split-point maps of every image with all groups present, (N, F, h, w) on the
    teacher's device (``images`` uint8 (N, C, H, W)): what :func:`evaluate_detection` and
    :func:`predict_from_features` take, so that several evaluations run the students once."""
    images = _check_images(teacher, images)
    _check_students(teacher, students)
    model = teacher.model.eval()
    on = _device_of(model)
    partitions = [list(g.filters) for g in students.plan.groups]
    channels = model.split_channels(students.point)
    for module in students.modules:
        module.to(on).eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = _to_tensor(images[start : start + batch_size], teacher.mean, teacher.std, on)
        out.append(assemble_features([m(x) for m in students.modules], partitions, channels))
    return torch.cat(out)


def predict_from_features(
    teacher: DetectionTeacher,
    students: DetectionStudents,
    features: torch.Tensor,
    *,
    score_threshold: float = 0.05,
    iou_threshold: float | None = 0.5,
    max_detections: int = 100,
    batch_size: int = PREDICT_BATCH_SIZE,
) -> list[Detections]:
    """:func:`predict` with every group present, from :func:`student_features` (the same detections)."""
    options = {"score_threshold": score_threshold, "iou_threshold": iou_threshold, "max_detections": max_detections}
    keep = torch.ones(features.shape[1], device=features.device)
    return _predict_from_features(teacher, students.point, features, keep, batch_size, options)


@torch.inference_mode()
def _predict_from_features(
    teacher: DetectionTeacher, point: str, features: torch.Tensor, keep: torch.Tensor, batch_size: int, options: dict[str, Any]
) -> list[Detections]:
    """Decode the teacher's rest on ``features`` whose channels are multiplied by ``keep`` (F,) (0: a missing group's)."""
    results: list[Detections] = []
    for start in range(0, len(features), batch_size):
        batch = features[start : start + batch_size] * keep[None, :, None, None]
        results.extend(_decode(teacher, teacher.model.rest(batch, point), options))
    return results


def evaluate_detection(
    teacher: DetectionTeacher,
    students: DetectionStudents | None,
    dataset: DetectionDataset,
    *,
    fail_devices: Sequence[int] = (0,),
    trials: int = 10,
    seed: int = 0,
    score_threshold: float = 0.05,
    iou_threshold: float | None = 0.5,
    max_detections: int = 100,
    batch_size: int = PREDICT_BATCH_SIZE,
    wire_dtype: str = "float32",
    features: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """COCO mAP (percent) on ``dataset`` with ``J`` random devices failed, one row per ``J`` of ``fail_devices``.

    ``wire_dtype`` ``"float16"``: the students' maps are rounded to float16 first, as devices of a
    bundle exported with ``wire_dtype="float16"`` send them (the accuracy cost of half the bytes).

    Each row: ``failed_devices`` (J), ``trials``, ``map_50_pct`` and ``map_50_95_pct`` (means over the
    trials), ``map_50_std_pct`` (their standard deviation) and ``missing_groups_mean``. A trial fails
    ``J`` of the plan's devices uniformly at random
    (:func:`rocoin.distillation.evaluate.random_failures`); a group is missing, zero-filled for every
    image, when all its devices failed (:func:`~rocoin.distillation.evaluate.missing_slots`). ``J = 0``
    is one trial. ``students`` ``None`` evaluates the teacher alone (``fail_devices`` must be ``[0]``).
    The other options are :func:`predict`'s; the students run once per image (or not at all when
    ``features`` holds :func:`student_features` of ``dataset``'s images), the rest once per
    distinct set of missing groups.
    """
    images = _check_images(teacher, dataset.images)
    if trials < 1:
        raise RocoinError(f"trials = {trials}: expected at least 1")
    options = {"score_threshold": score_threshold, "iou_threshold": iou_threshold, "max_detections": max_detections}
    fail_devices = [int(j) for j in fail_devices]
    if students is None:
        if any(j != 0 for j in fail_devices):
            raise RocoinError(f"fail_devices = {fail_devices}: the teacher alone has no devices to fail; expected [0]")
        scores = _scores(dataset, predict(teacher, None, images, batch_size=batch_size, **options), max_detections)
        return [_row(0, [scores], np.zeros((1, 0), dtype=bool)) for _ in fail_devices]
    _check_students(teacher, students)
    plan = students.plan
    num_devices = len(plan.device_ids)
    for j in fail_devices:
        if not 0 <= j <= num_devices:
            raise RocoinError(f"fail_devices: {j}: expected 0..{num_devices} (the plan's devices)")
    if wire_dtype not in ("float32", "float16"):
        raise RocoinError(f"wire_dtype = {wire_dtype!r}: expected float32 or float16")
    if features is None:
        features = student_features(teacher, students, images, batch_size)
    elif tuple(features.shape[:2]) != (len(images), plan.num_filters):
        raise RocoinError(
            f"features: shape {tuple(features.shape)}: expected ({len(images)}, {plan.num_filters}, h, w), the students' maps of the images"
        )
    if wire_dtype == "float16":
        features = features.half().float()
    slot_of_channel = np.empty(plan.num_filters, dtype=np.int64)
    for k, group in enumerate(plan.groups):
        slot_of_channel[group.filters] = k
    cache: dict[tuple[bool, ...], dict[str, float]] = {}
    rng = np.random.default_rng(seed)
    rows = []
    for j in fail_devices:
        missing = missing_slots(plan, random_failures(num_devices, j, 1 if j == 0 else trials, rng))
        results = []
        for pattern in missing:
            key = tuple(bool(v) for v in pattern)
            if key not in cache:
                keep = torch.from_numpy((~pattern[slot_of_channel]).astype(np.float32)).to(features.device)
                cache[key] = _scores(
                    dataset, _predict_from_features(teacher, students.point, features, keep, batch_size, options), max_detections
                )
            results.append(cache[key])
        rows.append(_row(j, results, missing))
    return rows


def _scores(dataset: DetectionDataset, predictions: list[Detections], max_detections: int) -> dict[str, float]:
    result = mean_average_precision(dataset, predictions, max_detections=max(1, max_detections))
    return {"map_50_pct": float(result["map_50_pct"]), "map_50_95_pct": float(result["map_50_95_pct"])}


def _row(failed: int, results: list[dict[str, float]], missing: np.ndarray) -> dict[str, Any]:
    map_50 = np.array([r["map_50_pct"] for r in results])
    return {
        "failed_devices": failed,
        "trials": len(results),
        "map_50_pct": float(map_50.mean()),
        "map_50_95_pct": float(np.mean([r["map_50_95_pct"] for r in results])),
        "map_50_std_pct": float(map_50.std()),
        "missing_groups_mean": float(missing.sum(axis=1).mean()) if missing.size else 0.0,
    }
