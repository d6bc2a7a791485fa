"""What every data set reader shares: the array types, bounded file and archive reading, and the
checks of labels and shapes (numpy only). Problems are one-line :class:`RocoinError` s."""

from __future__ import annotations

import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rocoin.contracts.errors import RocoinError

MAX_FILE_BYTES = 512 * 2**20
"""Largest file or archive member read (CIFAR-100's train pickle, the largest, is about 155 MB)."""


# --------------------------------------------------------------------------------------------
# Containers


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the loader need to know about a data set."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, on the 0-1 scale
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    augmentation: str  # "crop-flip" (random 4-pixel-padded crop + horizontal flip) or "none"


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """``images`` uint8 ``(N, C, H, W)`` and ``labels`` int64 ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise RocoinError(f"ArrayDataset.images must be a uint8 array (N, C, H, W), got {_describe(images)}")
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.ndim != 1:
            raise RocoinError(f"ArrayDataset.labels must be an int64 array (N,), got {_describe(labels)}")
        if images.shape[0] != labels.shape[0]:
            raise RocoinError(f"ArrayDataset: {images.shape[0]} images but {labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Any) -> ArrayDataset:
        """The examples at ``index`` (integer indices, a boolean mask or a slice)."""
        if not isinstance(index, slice):
            index = np.asarray(index)
            if index.dtype != bool:
                index = index.astype(np.int64, copy=False)
        return ArrayDataset(self.images[index], self.labels[index])


@dataclass(frozen=True)
class DatasetSplits:
    info: DatasetInfo
    train: ArrayDataset
    test: ArrayDataset


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Shared checks and helpers


def _brief(exc: object, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise RocoinError(f"{where}: label {int(bad[0])} is out of range [0, {num_classes}) ({bad.size} such labels)")


def _check_split(info: DatasetInfo, split: ArrayDataset, where: str) -> None:
    if len(split) == 0:
        raise RocoinError(f"{where}: the split is empty")
    if split.images.shape[1:] != info.input_shape:
        raise RocoinError(f"{where}: images have shape {split.images.shape[1:]}, expected {info.input_shape}")
    _check_labels(split.labels, info.num_classes, where)


def _writeable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable and array.flags.c_contiguous else np.ascontiguousarray(array).copy()


def _read_file(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RocoinError(f"{path}: {size} bytes is far larger than any file of this data set; it is not a genuine data file")
        return path.read_bytes()
    except OSError as exc:
        raise RocoinError(f"{path}: cannot read ({_brief(exc)})") from None


def _iter_dir(directory: Path, wanted: set[str]) -> Iterator[tuple[str, bytes, str]]:
    for base in sorted(wanted):
        path = directory / base
        if path.is_file():
            yield base, _read_file(path), str(path)


def _iter_tar(archive: Path, wanted: set[str]) -> Iterator[tuple[str, bytes, str]]:
    """Yield ``(basename, content, label)`` of the regular members named in ``wanted``, in archive order."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                base = posixpath.basename(member.name.rstrip("/"))
                if base not in wanted or not member.isfile():
                    continue
                where = f"{archive}:{member.name}"
                if member.size > MAX_FILE_BYTES:
                    raise RocoinError(
                        f"{where}: member size {member.size} bytes is absurd (limit {MAX_FILE_BYTES}); the archive is not genuine"
                    )
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if len(data) != member.size:
                    raise RocoinError(f"{where}: truncated ({len(data)} of {member.size} bytes); delete the archive and download it again")
                yield base, data, where
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise RocoinError(f"{archive}: not a readable tar archive or truncated ({_brief(exc)}); delete it and download it again") from None
