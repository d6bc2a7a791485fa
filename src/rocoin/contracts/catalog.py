"""Student catalogs: name -> ``{flops, memory_bytes, params, out_dim}`` (SPEC.md §2), and for a
student that sends a feature map (detection: the teacher's channels at a split point) the map's
values per filter and their width in bits."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_serializer

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import dumps_json, load_validated, write_json_atomic

#: Upper bounds of a student's costs [decision]: far above any network an edge device could run
#: (the built-in students need about 1e6..1e9 FLOPs and 1e5..1e7 parameters), low enough that
#: every cost converts to a float and ``flops / device flops`` stays finite.
MAX_STUDENT_FLOPS = 1e18
MAX_STUDENT_MEMORY_BYTES = 2**50  # 1 PiB
MAX_STUDENT_PARAMS = 2**50
MAX_STUDENT_OUT_DIM = 2**20  # channels of the final feature map (the built-in ones have 64..1280)
MAX_OUTPUT_VALUES_PER_FILTER = 2**20  # h·w of a feature map sent per filter (1024 x 1024)
#: What a classifier's student sends per filter of its partition: one pooled float32 value.
DEFAULT_OUTPUT_VALUES_PER_FILTER = 1
DEFAULT_OUTPUT_BITS_PER_VALUE = 32


class StudentSpec(BaseModel):
    """Cost of one student architecture for one input shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flops: float = Field(gt=0, le=MAX_STUDENT_FLOPS, allow_inf_nan=False, description="FLOPs per inference")
    memory_bytes: int = Field(gt=0, le=MAX_STUDENT_MEMORY_BYTES, description="weights + peak activations")
    params: int = Field(gt=0, le=MAX_STUDENT_PARAMS, description="number of parameters")
    out_dim: int = Field(gt=0, le=MAX_STUDENT_OUT_DIM, description="channels of the final feature map")
    output_values_per_filter: int = Field(
        default=DEFAULT_OUTPUT_VALUES_PER_FILTER,
        gt=0,
        le=MAX_OUTPUT_VALUES_PER_FILTER,
        description="values sent per filter of its partition: 1 (pooled) or h·w of the feature map at the split point",
    )
    output_bits_per_value: Literal[16, 32] = Field(
        default=DEFAULT_OUTPUT_BITS_PER_VALUE, description="width of each sent value: 32 (float32) or 16 (float16)"
    )

    @property
    def bits_per_filter(self) -> int:
        """Bits on the wire per filter of the partition (the latency model's ``32·|P_k|`` becomes
        ``bits_per_filter·|P_k|``)."""
        return self.output_values_per_filter * self.output_bits_per_value

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler):
        """A classifier's entry stays as it was (no output fields): files and content hashes of
        existing catalogs and plans do not change."""
        data = handler(self)
        if self.output_values_per_filter == DEFAULT_OUTPUT_VALUES_PER_FILTER:
            data.pop("output_values_per_filter", None)
        if self.output_bits_per_value == DEFAULT_OUTPUT_BITS_PER_VALUE:
            data.pop("output_bits_per_value", None)
        return data


class Catalog(RootModel[dict[str, StudentSpec]]):
    """A mapping of student name to its :class:`StudentSpec` (at least one student)."""

    model_config = ConfigDict(frozen=True)

    @field_validator("root")
    @classmethod
    def _not_empty(cls, value: dict[str, StudentSpec]) -> dict[str, StudentSpec]:
        if not value:
            raise ValueError("the catalog lists no student (expected at least one)")
        for name in value:
            if not name.strip():
                raise ValueError("student names must not be empty")
        _check_one_output(value)
        return value

    @property
    def bits_per_filter(self) -> int:
        """Bits each student sends per filter of its partition (the same for every student)."""
        return next(iter(self.root.values())).bits_per_filter

    @property
    def names(self) -> list[str]:
        return list(self.root)

    def __getitem__(self, name: str) -> StudentSpec:
        return self.root[name]

    def __contains__(self, name: object) -> bool:
        return name in self.root

    def __len__(self) -> int:
        return len(self.root)

    def items(self):
        return self.root.items()

    def subset(self, names: list[str]) -> Catalog:
        return Catalog({n: self.root[n] for n in names})

    def to_json(self) -> str:
        return dumps_json(self.model_dump(mode="json"), "catalog")

    def arrays(self) -> CatalogArrays:
        specs = list(self.root.values())
        return CatalogArrays(
            names=tuple(self.root),
            flops=np.array([s.flops for s in specs], dtype=float),
            memory_bytes=np.array([s.memory_bytes for s in specs], dtype=float),
            params=np.array([s.params for s in specs], dtype=float),
            out_dim=np.array([s.out_dim for s in specs], dtype=int),
            bits_per_filter=self.bits_per_filter,
        )


def _check_one_output(specs: dict[str, StudentSpec]) -> None:
    """Every student computes a partition of the same teacher output (pooled values, or the map
    at one split point, in one dtype): what they send per filter must agree."""
    kinds = {(s.output_values_per_filter, s.output_bits_per_value) for s in specs.values()}
    if len(kinds) > 1:
        shown = ", ".join(f"{n}: {s.output_values_per_filter} x {s.output_bits_per_value} bits" for n, s in specs.items())
        raise ValueError(
            f"output_values_per_filter / output_bits_per_value differ between students ({shown}); expected one value for the"
            " whole catalog (every student sends a partition of the same teacher output)"
        )


@dataclass(frozen=True)
class CatalogArrays:
    """Column view of a catalog (student ``j`` is ``names[j]``) for vectorised planning."""

    names: tuple[str, ...]
    flops: np.ndarray
    memory_bytes: np.ndarray
    params: np.ndarray
    out_dim: np.ndarray
    #: bits sent per filter of a partition (:attr:`StudentSpec.bits_per_filter`)
    bits_per_filter: int = DEFAULT_OUTPUT_BITS_PER_VALUE

    def __len__(self) -> int:
        return len(self.names)


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``"1x28x28"`` -> ``(1, 28, 28)`` (channels x height x width)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match or min(int(g) for g in match.groups()) < 1:
        raise RocoinError(f"input-shape = {text!r}: expected CxHxW with positive integers, e.g. 3x32x32")
    return int(match[1]), int(match[2]), int(match[3])


#: Bytes saved per parameter when fp32 weights become int8.
INT8_SAVED_BYTES_PER_PARAM = 3


def int8_catalog(catalog: Catalog) -> Catalog:
    """The catalog for int8 students (``rocoin export --int8``): weights take 1 byte instead of 4.

    Activations are kept at their fp32 size (onnxruntime's QDQ models dequantise between layers).
    """
    return Catalog(
        {
            name: spec.model_copy(update={"memory_bytes": max(1, spec.memory_bytes - INT8_SAVED_BYTES_PER_PARAM * spec.params)})
            for name, spec in catalog.items()
        }
    )


def load_catalog(path: str | os.PathLike[str]) -> Catalog:
    return load_validated(Catalog, path, "a mapping of student name to {flops, memory_bytes, params, out_dim}")


def save_catalog(catalog: Catalog, path: str | os.PathLike[str]) -> None:
    write_json_atomic(path, catalog.model_dump(mode="json"))  # the same text as to_json(); errors name the file
