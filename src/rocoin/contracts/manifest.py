"""bundle/manifest.json: what a device and the source need to serve a plan's students.

A bundle folder holds one ONNX file per group (the feature extractor every device of the group
runs: input image batch -> its partition's pooled values), one for the head (the FC the source
runs: F-vector -> logits) and this manifest with the SHA-256 of every file.

A **detection** bundle (``task: detection``, issue 15) is the same with feature maps: a group's
model gives its partition of the teacher's map at the split point, ``|P_k| × h × w``; the head is
the rest of the detector (neck and head, or the head only), ``F × h × w`` -> the class-centre
heatmap logits ``K × h × w`` (``output``) and the box map ``4 × h × w`` (``detection.box_output``:
``log`` width and height in cells, centre offset in cells), decoded with
:func:`rocoin.models.boxes.decode` and the settings of :class:`DetectionSpec`. A group may send
its map as float16 (``wire_dtype``): half the bytes on the wire, the source computes in float32.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import load_validated
from rocoin.contracts.fleet import DeviceId
from rocoin.contracts.plan import Plan

MANIFEST_NAME = "manifest.json"
BUNDLE_FORMAT = "rocoin-bundle/1"
HASH_CHUNK_BYTES = 1 << 20
#: Smallest normalisation std [decision]: the input is divided by it; real datasets have std
#: around 0.1..0.5 (on pixels scaled to [0, 1]), and below 1e-6 one pixel step becomes > 1e4.
MIN_NORMALIZATION_STD = 1e-6
#: Largest dimension of a model input or output [decision]: images up to 2**20 pixels a side,
#: partitions and class lists up to 2**20 entries, far above any rocoin student.
MAX_TENSOR_DIM = 2**20
#: Most dimensions of a tensor (without the batch) [decision]: rocoin's have 1 (features) or 3 (C×H×W).
MAX_TENSOR_RANK = 8
#: Most values of one tensor (one batch item) [decision]: 2**28 float32 take 1 GiB; a 3×4096×4096
#: image has about 5e7.
MAX_TENSOR_ELEMENTS = 2**28

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class TensorSpec(BaseModel):
    """One ONNX input or output; the leading batch dimension is dynamic and not listed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    shape: list[Annotated[int, Field(ge=1, le=MAX_TENSOR_DIM)]] = Field(
        min_length=1, max_length=MAX_TENSOR_RANK, description="shape without the batch dimension"
    )
    dtype: Literal["float32"] = "float32"

    @field_validator("shape")
    @classmethod
    def _not_too_many_values(cls, shape: list[int]) -> list[int]:
        if math.prod(shape) > MAX_TENSOR_ELEMENTS:
            raise ValueError(f"{shape} holds {math.prod(shape)} values: expected at most {MAX_TENSOR_ELEMENTS} per batch item")
        return shape


class ModelFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(min_length=1, description="file name inside the bundle folder")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0)
    input: TensorSpec
    output: TensorSpec


class GroupModel(ModelFile):
    """The student of one group, run by every device of the group."""

    group: int = Field(ge=0)
    student: str
    devices: list[DeviceId] = Field(min_length=1)
    filters: list[int] = Field(min_length=1)
    #: how a device sends the output: float32 as the model computes it, or rounded to float16
    wire_dtype: Literal["float32", "float16"] = "float32"

    @model_serializer(mode="wrap")
    def _omit_default_wire(self, handler):
        data = handler(self)
        if self.wire_dtype == "float32":
            data.pop("wire_dtype", None)  # classifier bundles (and their hashes) stay as they were
        return data


class DetectionSpec(BaseModel):
    """How the source turns the head's maps into detections (:func:`rocoin.models.boxes.decode`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split_point: Literal["backbone", "neck"] = Field(
        description="where the teacher was split: students give the backbone's map (BC) or the neck's (BNC)"
    )
    stride_px: int = Field(ge=1, le=MAX_TENSOR_DIM, description="pixels per cell of the feature map")
    box_output: TensorSpec = Field(description="the head's second output: [4, h, w] (log w, log h in cells; dx, dy in cells)")
    score_threshold: float = Field(ge=0.0, lt=1.0, description="smallest class-centre probability kept")
    iou_threshold: float = Field(gt=0.0, le=1.0, description="class-wise non-maximum suppression above this IoU")
    max_detections: int = Field(ge=1, le=MAX_TENSOR_DIM, description="detections per image at most (the API's fixed size)")


class Normalization(BaseModel):
    """Per-channel ``(x - mean) / std`` of the input; one mean and one std per input channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: list[FiniteFloat] = Field(min_length=1)
    std: list[Annotated[float, Field(gt=MIN_NORMALIZATION_STD, allow_inf_nan=False)]] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_length(self) -> Normalization:
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"len(mean) = {len(self.mean)} but len(std) = {len(self.std)}: expected one mean and one std per input channel"
            )
        return self


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["rocoin-bundle/1"] = BUNDLE_FORMAT
    plan: Plan
    dataset: str
    class_names: list[str] = Field(min_length=1)
    normalization: Normalization
    groups: list[GroupModel] = Field(min_length=1)
    head: ModelFile
    rocoin_version: str
    #: "int8" when the group models were statically quantised (the head stays fp32)
    quantization: Literal["none", "int8"] = "none"
    #: what the bundle answers: class logits, or boxes (then ``detection`` says how they are decoded)
    task: Literal["classification", "detection"] = "classification"
    detection: DetectionSpec | None = None

    @model_serializer(mode="wrap")
    def _omit_classification(self, handler):
        data = handler(self)
        if self.task == "classification":  # classifier manifests stay as they were
            data.pop("task", None)
            data.pop("detection", None)
        return data

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        if [g.group for g in self.groups] != list(range(len(self.plan.groups))):
            raise ValueError("groups must list one model per plan group, in plan order")
        first = self.groups[0].input
        for k, model in enumerate(self.groups[1:], start=1):
            if model.input != first:
                raise ValueError(
                    f"groups[{k}].input = {_spec_text(model.input)} differs from groups[0].input = {_spec_text(first)}:"
                    " expected every group model to take the same input"
                )
        channels = first.shape[0]
        for name in ("mean", "std"):
            values = getattr(self.normalization, name)
            if len(values) != channels:
                raise ValueError(
                    f"normalization.{name} = {_short(values)}: {len(values)} values for an input of {channels} channel{'s' if channels != 1 else ''}"
                    f" (groups[0].input.shape = {first.shape}): expected one per channel"
                )
        if (self.task == "detection") != (self.detection is not None):
            raise ValueError(
                f"task = {self.task!r} with detection = {'set' if self.detection else 'null'}: a detection bundle needs its detection settings, and only it"
            )
        # a classifier's partitions are pooled values ([|P_k|]); a detector's are maps ([|P_k|, h, w])
        cells = [] if self.detection is None else self.head.input.shape[1:]
        if self.detection is not None and len(self.head.input.shape) != 3:
            raise ValueError(f"head input shape {self.head.input.shape}: expected [F, h, w] (the feature map at the split point)")
        for model, group in zip(self.groups, self.plan.groups):
            if model.devices != group.devices or model.filters != group.filters or model.student != group.student:
                raise ValueError(f"group {model.group} does not match the plan's group")
            if model.output.shape != [len(group.filters), *cells]:
                raise ValueError(f"group {model.group}: output shape {model.output.shape} != {[len(group.filters), *cells]} (its filters)")
            if model.wire_dtype != "float32" and self.detection is None:
                raise ValueError(f"group {model.group}: wire_dtype = {model.wire_dtype!r}: float16 is for feature maps (detection bundles)")
            spec, sent = self.plan.catalog[group.student], (math.prod(cells), 16 if model.wire_dtype == "float16" else 32)
            if (spec.output_values_per_filter, spec.output_bits_per_value) != sent:
                raise ValueError(
                    f"group {model.group}: the plan's catalog entry {group.student!r} sends {spec.output_values_per_filter} values of"
                    f" {spec.output_bits_per_value} bits per filter but the model sends {sent[0]} of {sent[1]} ({model.wire_dtype}):"
                    " expected the plan to price what is sent"
                )
        if self.head.input.shape != [self.plan.num_filters, *cells]:
            raise ValueError(f"head input shape {self.head.input.shape} != {[self.plan.num_filters, *cells]}")
        if self.head.output.shape != [len(self.class_names), *cells]:
            raise ValueError(f"head output shape {self.head.output.shape} != {[len(self.class_names), *cells]} (the classes)")
        if self.detection is not None and self.detection.box_output.shape != [4, *cells]:
            raise ValueError(f"detection.box_output shape {self.detection.box_output.shape} != {[4, *cells]}")
        return self

    @property
    def input(self) -> TensorSpec:
        return self.groups[0].input

    def group_of(self, device_id: str) -> GroupModel:
        for model in self.groups:
            if device_id in model.devices:
                return model
        known = ", ".join(d for g in self.groups for d in g.devices)
        raise RocoinError(f"device-id = {device_id!r}: not a device of this bundle's plan (expected one of {known})")


def _spec_text(spec: TensorSpec) -> str:
    return f"{spec.name!r} {spec.dtype} {_short(spec.shape)}"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(bundle: Path, model: ModelFile) -> Path:
    """The model's path, after checking its size and SHA-256 against the manifest."""
    path = bundle / model.file
    if Path(model.file).name != model.file:
        raise RocoinError(f"{bundle / MANIFEST_NAME}: file = {model.file!r}: expected a plain file name inside the bundle")
    if not path.is_file():
        raise RocoinError(f"{path}: model file is missing from the bundle")
    size = path.stat().st_size
    if size != model.size_bytes:
        raise RocoinError(f"{path}: {size} bytes but the manifest says {model.size_bytes} (truncated or replaced); refusing to serve it")
    if file_sha256(path) != model.sha256:
        raise RocoinError(f"{path}: SHA-256 does not match the manifest (tampered or corrupt); refusing to serve it")
    return path


def load_manifest(bundle: str | os.PathLike[str]) -> Manifest:
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise RocoinError(f"{bundle}: bundle folder not found (make one with rocoin export)")
    return load_validated(Manifest, bundle / MANIFEST_NAME, "a rocoin bundle manifest")
