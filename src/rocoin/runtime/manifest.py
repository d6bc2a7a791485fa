"""bundle/manifest.json: what a device and the source need to serve a plan's students.

A bundle folder holds one ONNX file per group (the feature extractor every device of the group
runs: input image batch -> its partition's pooled values), one for the head (the FC the source
runs: F-vector -> logits) and this manifest with the SHA-256 of every file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rocoin.errors import RocoinError
from rocoin.fileio import load_validated
from rocoin.planning.plan import Plan

MANIFEST_NAME = "manifest.json"
BUNDLE_FORMAT = "rocoin-bundle/1"
HASH_CHUNK_BYTES = 1 << 20


class TensorSpec(BaseModel):
    """One ONNX input or output; the leading batch dimension is dynamic and not listed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    shape: list[int] = Field(description="shape without the batch dimension")
    dtype: Literal["float32"] = "float32"


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
    devices: list[str] = Field(min_length=1)
    filters: list[int] = Field(min_length=1)


class Normalization(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: list[float]
    std: list[float]


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

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        if [g.group for g in self.groups] != list(range(len(self.plan.groups))):
            raise ValueError("groups must list one model per plan group, in plan order")
        for model, group in zip(self.groups, self.plan.groups):
            if model.devices != group.devices or model.filters != group.filters or model.student != group.student:
                raise ValueError(f"group {model.group} does not match the plan's group")
            if model.output.shape != [len(group.filters)]:
                raise ValueError(f"group {model.group}: output shape {model.output.shape} != [{len(group.filters)}] (its filters)")
        if self.head.input.shape != [self.plan.num_filters]:
            raise ValueError(f"head input shape {self.head.input.shape} != [{self.plan.num_filters}]")
        if self.head.output.shape != [len(self.class_names)]:
            raise ValueError(f"head output shape {self.head.output.shape} != [{len(self.class_names)}] (the classes)")
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
