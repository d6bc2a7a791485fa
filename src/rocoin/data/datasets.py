"""Image classification data sets as uint8 arrays: CIFAR-10/100, Fashion-MNIST and sklearn's digits.

Everything here is numpy only (no torch): :func:`load_dataset` returns the train and test splits
as :class:`ArrayDataset` (``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``) with a
:class:`DatasetInfo` that holds the class names and the normalisation constants. Turning images
into normalised float tensors and augmenting them is :mod:`rocoin.data.loader`'s job.

Sources, in the order they are looked for under ``data_dir``:

* ``cifar10`` — ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz`` (the python pickles), then
  ``cifar-10-batches-bin/`` or ``cifar-10-binary.tar.gz`` (the binary records);
* ``cifar100`` — ``cifar-100-python/``, ``cifar-100-python.tar.gz``, ``cifar-100-binary/``,
  ``cifar-100-binary.tar.gz`` (the 100 fine labels are used);
* ``fashion-mnist`` — the four IDX files (``.gz`` or not) in ``data_dir``,
  ``data_dir/fashion-mnist``, ``data_dir/FashionMNIST/raw`` and ``/usr/share/datasets/fashion-mnist``
  (Debian's ``dataset-fashion-mnist``);
* ``digits`` — scikit-learn's bundled 8×8 digits (1797 images; the last 20 % are the test split).

The CIFAR python files are pickles. They are never given to :func:`pickle.load`: a restricted
unpickler only lets through the few numpy functions that rebuild an array, so a crafted file
cannot run code. Archives are read member by member in memory, nothing is extracted to disk.

Every problem (missing data, a truncated or corrupted file, a failed download) raises a
:class:`~rocoin.contracts.errors.RocoinError` with one line that names the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rocoin.contracts.errors import RocoinError
from rocoin.data.cifar import (  # noqa: F401 - the CIFAR statistics are part of this module's API
    _CIFAR,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    _CifarSpec,
    _read_cifar_binary,
    _read_cifar_python,
)
from rocoin.data.records import (  # noqa: F401 - the array types are part of this module's API
    MAX_FILE_BYTES,
    ArrayDataset,
    DatasetInfo,
    DatasetSplits,
    _brief,
    _check_labels,
    _check_split,
    _describe,
    _iter_dir,
    _iter_tar,
    _read_file,
    _writeable,
)

log = logging.getLogger(__name__)

DATASET_NAMES = ("cifar10", "cifar100", "fashion-mnist", "digits")

DATA_DIR_ENV = "ROCOIN_DATA_DIR"
"""Environment variable naming the default data folder (else ``~/.cache/rocoin/datasets``)."""

CIFAR_BASE_URL = "https://www.cs.toronto.edu/~kriz/"
FASHION_MNIST_BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
"""Folders searched after ``data_dir`` (``apt-get install dataset-fashion-mnist`` fills the first)."""

DOWNLOADS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "cifar10": (CIFAR_BASE_URL, (("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),)),
    "cifar100": (CIFAR_BASE_URL, (("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),)),
    "fashion-mnist": (
        FASHION_MNIST_BASE_URL,
        (
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
    ),
}
"""Per data set: the default base URL and the files (name, md5) that ``download=True`` fetches."""


FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGITS_TEST_FRACTION = 0.2


# --------------------------------------------------------------------------------------------
# Public entry points


def canonical_name(name: str) -> str:
    """``"CIFAR-10"``, ``"fashion_mnist"`` … → one of :data:`DATASET_NAMES`."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    table = {"cifar10": "cifar10", "cifar100": "cifar100", "fashionmnist": "fashion-mnist", "digits": "digits"}
    if key not in table:
        raise RocoinError(f"unknown data set {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    return table[key]


def default_data_dir() -> Path:
    """``$ROCOIN_DATA_DIR``, else ``$XDG_CACHE_HOME/rocoin/datasets`` (``~/.cache/rocoin/datasets``)."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "rocoin" / "datasets"


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    base_url: str | None = None,
) -> DatasetSplits:
    """Load the train and test splits of ``name`` (see the module docstring for where it looks).

    With ``download=True`` missing files are fetched into ``data_dir`` from ``base_url`` (default:
    the official site, :data:`DOWNLOADS`) and checked against their md5 first.
    """
    key = canonical_name(name)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if key in ("cifar10", "cifar100"):
        splits = _load_cifar(_CIFAR[key], root, download, base_url)
    elif key == "fashion-mnist":
        splits = _load_fashion_mnist(root, download, base_url)
    else:
        splits = _load_digits()
    for split_name in ("train", "test"):
        _check_split(splits.info, getattr(splits, split_name), f"{key} {split_name} split")
    log.info("%s: %d train and %d test images of shape %s", key, len(splits.train), len(splits.test), splits.info.input_shape)
    return splits


def dataset_present(name: str, data_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether :func:`load_dataset` would find ``name``'s files without downloading: a look at the
    file system that reads nothing (scikit-learn's digits ship with it, so they are always present)."""
    key = canonical_name(name)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if key in ("cifar10", "cifar100"):
        return bool(_cifar_found(_CIFAR[key], root))
    if key == "fashion-mnist":
        return fashion_mnist_folder(root) is not None
    return True


def split_validation(train: ArrayDataset, fraction: float = 0.1, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Split off a random ``fraction`` of ``train`` as a validation set: ``(train, val)``.

    Deterministic for a seed; both parts keep the original order of the examples.
    """
    n = len(train)
    if not 0.0 < fraction < 1.0:
        raise RocoinError(f"validation fraction must be in (0, 1), got {fraction}")
    n_val = max(1, int(round(fraction * n)))
    if n_val >= n:
        raise RocoinError(f"cannot split {n} examples into train and validation with fraction {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    return train.subset(np.sort(order[n_val:])), train.subset(np.sort(order[:n_val]))


def download_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, *, base_url: str | None = None) -> list[Path]:
    """Fetch the files of ``name`` that ``data_dir`` lacks; returns the paths of all of them."""
    key = canonical_name(name)
    if key not in DOWNLOADS:
        log.info("%s: nothing to download (the data ships with scikit-learn)", key)
        return []
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    default_url, files = DOWNLOADS[key]
    url = base_url or default_url
    url = url if url.endswith("/") else url + "/"
    paths = []
    for filename, md5 in files:
        dest = root / filename
        if dest.is_file():
            log.info("%s already exists, not downloading it", dest)
        else:
            download_file(url + filename, dest, md5)
        paths.append(dest)
    return paths


def download_file(url: str, dest: str | os.PathLike[str], md5: str, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through a temporary file, renamed only once its md5 matches."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RocoinError(f"cannot create the data folder {dest.parent} ({_brief(exc)})") from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    log.info("downloading %s to %s", url, dest)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        if digest.hexdigest() != md5.lower():
            raise RocoinError(
                f"{url}: md5 {digest.hexdigest()} of the {size} bytes downloaded does not match the expected {md5}; "
                f"nothing was saved; try again, or fetch the file by hand into {dest.parent}"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise RocoinError(
            f"cannot download {url} ({_brief(reason)}); check the connection, or fetch it by hand into {dest.parent}"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log.info("saved %s (%d bytes, md5 ok)", dest, size)
    return dest


# --------------------------------------------------------------------------------------------
# CIFAR: finding the files (the formats are read by rocoin.data.cifar)


def _cifar_candidates(spec: _CifarSpec, root: Path) -> list[tuple[Path, str, Callable[..., Any]]]:
    """Where a CIFAR data set may be under ``root``, in order: (path, format, reader)."""
    candidates = [
        (root / spec.py_dir, "python", _iter_dir),
        (root / spec.py_archive, "python", _iter_tar),
        (root / spec.bin_dir, "binary", _iter_dir),
        (root / spec.bin_archive, "binary", _iter_tar),
    ]
    if root.name in (spec.py_dir, spec.bin_dir):  # data_dir is the extracted folder itself
        candidates.insert(0, (root, "python" if root.name == spec.py_dir else "binary", _iter_dir))
    return candidates


def _cifar_found(spec: _CifarSpec, root: Path) -> list[tuple[Path, str, Callable[..., Any]]]:
    """The candidates of :func:`_cifar_candidates` that exist (a folder, or an archive file)."""
    return [c for c in _cifar_candidates(spec, root) if (c[0].is_dir() if c[2] is _iter_dir else c[0].is_file())]


def _load_cifar(spec: _CifarSpec, root: Path, download: bool, base_url: str | None) -> DatasetSplits:
    candidates = _cifar_candidates(spec, root)
    found = _cifar_found(spec, root)
    if not found and download:
        download_dataset(spec.name, root, base_url=base_url)
        found = [(root / spec.py_archive, "python", _iter_tar)]
    if not found:
        url = (base_url or DOWNLOADS[spec.name][0]).rstrip("/") + "/" + spec.py_archive
        looked = ", ".join(str(c[0]) for c in candidates)
        raise RocoinError(
            f"{spec.name}: data not found; looked for {looked}; run with --download (load_dataset(..., download=True)) "
            f"or fetch {url} into {root}"
        )
    path, fmt, reader = found[0]
    log.info("%s: reading the %s format from %s", spec.name, fmt, path)
    if fmt == "python":
        return _read_cifar_python(spec, path, reader)
    return _read_cifar_binary(spec, path, reader)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def _find_idx(directory: Path) -> dict[str, Path]:
    found = {}
    for key, stem in _IDX_FILES.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
    return found


def fashion_mnist_dirs(root: Path) -> list[Path]:
    """The folders searched for the four Fashion-MNIST IDX files, in order (``root`` first)."""
    dirs: list[Path] = []
    for d in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw", *FASHION_MNIST_SYSTEM_DIRS):
        if d not in dirs:
            dirs.append(d)
    return dirs


def fashion_mnist_folder(root: Path) -> Path | None:
    """The first folder of :func:`fashion_mnist_dirs` that holds all four IDX files, if any."""
    return next((d for d in fashion_mnist_dirs(root) if len(_find_idx(d)) == len(_IDX_FILES)), None)


def _load_fashion_mnist(root: Path, download: bool, base_url: str | None) -> DatasetSplits:
    files = None
    partial = []
    for d in fashion_mnist_dirs(root):
        found = _find_idx(d)
        if len(found) == len(_IDX_FILES):
            files = found
            break
        if found:
            missing = [_IDX_FILES[k] for k in _IDX_FILES if k not in found]
            partial.append(f"{d} lacks {', '.join(missing)}")
    if files is None and download:
        download_dataset("fashion-mnist", root, base_url=base_url)
        files = _find_idx(root)
    if files is None:
        url = base_url or DOWNLOADS["fashion-mnist"][0]
        names = ", ".join(f"{stem}[.gz]" for stem in _IDX_FILES.values())
        detail = f" ({'; '.join(partial)})" if partial else ""
        raise RocoinError(
            f"fashion-mnist: IDX files not found; looked for {names} in {', '.join(map(str, fashion_mnist_dirs(root)))}{detail}; "
            f"run with --download (load_dataset(..., download=True)), or `apt-get install dataset-fashion-mnist`, "
            f"or fetch them from {url} into {root}"
        )
    log.info("fashion-mnist: reading %s", ", ".join(str(files[k]) for k in _IDX_FILES))
    splits = {}
    for split in ("train", "test"):
        images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
        images = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3)
        labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1).astype(np.int64)
        if images.shape[1:] != (28, 28):
            raise RocoinError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, Fashion-MNIST's are 28x28")
        if labels.shape[0] != images.shape[0]:
            raise RocoinError(f"{labels_path}: {labels.shape[0]} labels but {images_path.name} holds {images.shape[0]} images")
        _check_labels(labels, 10, str(labels_path))
        splits[split] = ArrayDataset(images[:, None], labels)
    info = DatasetInfo("fashion-mnist", 10, (1, 28, 28), FASHION_MNIST_MEAN, FASHION_MNIST_STD, FASHION_MNIST_CLASSES, "none")
    return DatasetSplits(info, splits["train"], splits["test"])


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed or not) as a writable uint8 array."""
    try:
        with open(path, "rb") as probe:
            compressed = probe.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
            if len(header) < 4:
                raise RocoinError(f"{path}: empty or truncated IDX file ({len(header)} bytes)")
            (found_magic,) = struct.unpack(">i", header[:4])
            if found_magic != magic:
                raise RocoinError(f"{path}: bad magic number {found_magic}, expected {magic} (IDX {'labels' if ndim == 1 else 'images'})")
            if len(header) < 4 + 4 * ndim:
                raise RocoinError(f"{path}: truncated IDX header")
            dims = struct.unpack(f">{ndim}I", header[4:])
            count = int(np.prod(dims, dtype=np.int64))
            if count == 0:
                raise RocoinError(f"{path}: empty IDX file (dimensions {dims})")
            if count > MAX_FILE_BYTES:
                raise RocoinError(f"{path}: dimensions {dims} announce {count} bytes, far more than Fashion-MNIST holds")
            buffer = bytearray(count)
            view = memoryview(buffer)
            got = 0
            while got < count:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            trailing = f.read(1)
    except RocoinError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise RocoinError(f"{path}: cannot read ({_brief(exc)}); delete it and download it again") from None
    if got < count:
        raise RocoinError(f"{path}: truncated: the header announces {'x'.join(map(str, dims))} = {count} bytes of data, found {got}")
    if trailing:
        raise RocoinError(f"{path}: trailing data after the {count} bytes that the header ({'x'.join(map(str, dims))}) announces")
    return np.frombuffer(buffer, dtype=np.uint8).reshape(dims)


# --------------------------------------------------------------------------------------------
# scikit-learn's digits


def _load_digits() -> DatasetSplits:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RocoinError("digits: scikit-learn is not installed; `pip install scikit-learn` (it bundles the 8x8 digits)") from None
    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    n_train = len(labels) - int(round(DIGITS_TEST_FRACTION * len(labels)))
    train = ArrayDataset(np.ascontiguousarray(images[:n_train]), labels[:n_train].copy())
    test = ArrayDataset(np.ascontiguousarray(images[n_train:]), labels[n_train:].copy())
    scaled = train.images.astype(np.float64) / 255.0
    mean, std = (float(scaled.mean()),), (float(scaled.std()),)
    info = DatasetInfo("digits", 10, (1, 8, 8), mean, std, tuple(str(d) for d in range(10)), "none")
    return DatasetSplits(info, train, test)
