"""The two CIFAR formats (python pickles and binary records), read from a folder or a tar archive.

The python files are pickles. They are never given to :func:`pickle.load`: a restricted unpickler
only lets through the few numpy functions that rebuild an array, so a crafted file cannot run
code. Archives are read member by member in memory, nothing is extracted to disk.
"""

from __future__ import annotations

import codecs
import io
import logging
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rocoin.contracts.errors import RocoinError
from rocoin.data.records import ArrayDataset, DatasetInfo, DatasetSplits, _brief, _check_labels, _describe, _writeable

log = logging.getLogger("rocoin.data.datasets")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# --------------------------------------------------------------------------------------------
# CIFAR


def _safe_reconstruct_factory() -> Callable[..., np.ndarray]:
    numpy_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy(._)core.multiarray._reconstruct

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not np.ndarray:
            raise RocoinError(f"refusing to rebuild an array of type {subtype!r}")
        return numpy_reconstruct(subtype, shape, dtype)

    return reconstruct


def _safe_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return np.frombuffer(buffer, dtype=_safe_dtype(dtype)).reshape(shape, order=order)


def _safe_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    dtype = np.dtype(spec, bool(align), bool(copy))
    if dtype.hasobject:
        raise RocoinError("refusing to rebuild an array of Python objects")
    return dtype


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    # How Python 3 pickles bytes at protocol 2: _codecs.encode(str, "latin1").
    if not isinstance(text, str) or str(encoding).lower().replace("-", "") != "latin1":
        raise RocoinError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct_factory(),
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct_factory(),
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python files: only the globals that rebuild a numpy array pass."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise RocoinError(
                f"refusing to load {module}.{name} (a CIFAR pickle holds only numpy arrays, lists and strings); "
                "the file is not a genuine CIFAR file"
            ) from None


def _unpickle(data: bytes, where: str) -> Any:
    try:
        return _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except RocoinError as exc:
        raise RocoinError(f"{where}: {exc}") from None
    except Exception as exc:  # a corrupt pickle can raise nearly anything
        raise RocoinError(f"{where}: not a valid CIFAR python pickle ({type(exc).__name__}: {_brief(exc)})") from None


def _get(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict):
        raise RocoinError(f"{where}: expected a pickled dict, found {type(mapping).__name__}")
    for candidate in (key.encode(), key):
        if candidate in mapping:
            return mapping[candidate]
    keys = ", ".join(sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in mapping))
    raise RocoinError(f"{where}: no {key!r} entry (found: {keys or 'nothing'})")


def _names(values: Any, expected: int, where: str) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (bytes, str)) for v in values):
        raise RocoinError(f"{where}: class names must be a list of strings, found {type(values).__name__}")
    names = tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values)
    if len(names) != expected:
        raise RocoinError(f"{where}: {len(names)} class names, expected {expected}")
    return names


@dataclass(frozen=True)
class _CifarSpec:
    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    py_dir: str
    py_archive: str
    py_train: tuple[str, ...]
    py_test: str
    py_meta: str
    py_labels_key: str
    py_names_key: str
    bin_dir: str
    bin_archive: str
    bin_train: tuple[str, ...]
    bin_test: str
    bin_names: str
    bin_header: int  # label bytes before the 3072 pixels of a record
    bin_label_index: int  # which of them is the label used


_CIFAR = {
    "cifar10": _CifarSpec(
        "cifar10", 10, CIFAR10_MEAN, CIFAR10_STD,
        "cifar-10-batches-py", "cifar-10-python.tar.gz", tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch", "batches.meta", "labels", "label_names",
        "cifar-10-batches-bin", "cifar-10-binary.tar.gz", tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        "test_batch.bin", "batches.meta.txt", 1, 0,
    ),
    "cifar100": _CifarSpec(
        "cifar100", 100, CIFAR100_MEAN, CIFAR100_STD,
        "cifar-100-python", "cifar-100-python.tar.gz", ("train",),
        "test", "meta", "fine_labels", "fine_label_names",
        "cifar-100-binary", "cifar-100-binary.tar.gz", ("train.bin",),
        "test.bin", "fine_label_names.txt", 2, 1,
    ),
}  # fmt: skip

_CIFAR_PIXELS = 3 * 32 * 32


def _cifar_python_batch(obj: Any, spec: _CifarSpec, where: str) -> tuple[np.ndarray, np.ndarray]:
    data = _get(obj, "data", where)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise RocoinError(f"{where}: 'data' must be a uint8 array (N, {_CIFAR_PIXELS}), found {_describe(data)}")
    if data.shape[0] == 0:
        raise RocoinError(f"{where}: the batch holds no images")
    raw_labels = _get(obj, spec.py_labels_key, where)
    try:
        labels = np.asarray(raw_labels)
        if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
            raise ValueError
        labels = labels.astype(np.int64)
    except (ValueError, TypeError):
        raise RocoinError(f"{where}: {spec.py_labels_key!r} must be a list of integers") from None
    if labels.shape[0] != data.shape[0]:
        raise RocoinError(f"{where}: {data.shape[0]} images but {labels.shape[0]} labels")
    _check_labels(labels, spec.num_classes, where)
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar_python(spec: _CifarSpec, path: Path, reader: Callable[..., Iterator[tuple[str, bytes, str]]]) -> DatasetSplits:
    wanted = {*spec.py_train, spec.py_test, spec.py_meta}
    parsed: dict[str, Any] = {}
    for base, data, where in reader(path, wanted):
        obj = _unpickle(data, where)
        del data
        if base == spec.py_meta:
            parsed[base] = _names(_get(obj, spec.py_names_key, where), spec.num_classes, where)
        else:
            parsed[base] = _cifar_python_batch(obj, spec, where)
    return _complete(spec, path, parsed, spec.py_train, spec.py_test, spec.py_meta)


def _cifar_binary_records(spec: _CifarSpec, data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    record = spec.bin_header + _CIFAR_PIXELS
    if len(data) == 0 or len(data) % record:
        raise RocoinError(f"{where}: size {len(data)} bytes is not a positive multiple of the {record}-byte {spec.name} record")
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    labels = rows[:, spec.bin_label_index].astype(np.int64)
    _check_labels(labels, spec.num_classes, where)
    return rows[:, spec.bin_header :].reshape(-1, 3, 32, 32), labels


def _read_cifar_binary(spec: _CifarSpec, path: Path, reader: Callable[..., Iterator[tuple[str, bytes, str]]]) -> DatasetSplits:
    wanted = {*spec.bin_train, spec.bin_test, spec.bin_names}
    parsed: dict[str, Any] = {}
    for base, data, where in reader(path, wanted):
        if base == spec.bin_names:
            lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines()]
            parsed[base] = _names([line for line in lines if line], spec.num_classes, where)
        else:
            parsed[base] = _cifar_binary_records(spec, data, where)
    return _complete(spec, path, parsed, spec.bin_train, spec.bin_test, spec.bin_names)


def _complete(spec: _CifarSpec, path: Path, parsed: dict[str, Any], train: tuple[str, ...], test: str, names: str) -> DatasetSplits:
    """Check that the members read from ``path`` make a whole data set, then assemble it."""
    train_found = [b for b in train if b in parsed]
    missing = [b for b in (test, names) if b not in parsed]
    if not train_found:
        missing.insert(0, " or ".join(train) if len(train) < 3 else f"{train[0]}..{train[-1]}")
    if missing:
        raise RocoinError(f"{path}: incomplete {spec.name} data, missing {', '.join(missing)}; delete it and download it again")
    log_fn = log.info if len(train_found) == len(train) else log.warning
    log_fn("%s: training batches found in %s: %s", spec.name, path, ", ".join(train_found))
    return _assemble(spec, path, [parsed[b] for b in train_found], parsed[test], parsed[names])


def _assemble(
    spec: _CifarSpec,
    path: Path,
    train_parts: list[tuple[np.ndarray, np.ndarray]],
    test: tuple[np.ndarray, np.ndarray],
    class_names: tuple[str, ...],
) -> DatasetSplits:
    if len(train_parts) == 1:
        train_images, train_labels = train_parts[0]
    else:
        train_images = np.concatenate([p[0] for p in train_parts])
        train_labels = np.concatenate([p[1] for p in train_parts])
    info = DatasetInfo(spec.name, spec.num_classes, (3, 32, 32), spec.mean, spec.std, class_names, "crop-flip")
    return DatasetSplits(
        info,
        ArrayDataset(_writeable(train_images), train_labels),
        ArrayDataset(_writeable(test[0]), test[1]),
    )
