"""The data sets: every on-disk format written small by hand, corrupt files, downloads, batches."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from rocoin.contracts.errors import RocoinError
from rocoin.data import datasets as ds
from rocoin.data import load_dataset, split_validation
from rocoin.data.datasets import ArrayDataset, DatasetInfo

try:
    import torch

    from rocoin.data.loader import batches, random_crop_flip, to_tensor
except ImportError:  # the loader needs torch (pip install -e .[train]); the data sets do not
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------
# Writers for the real formats


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 the way Python 2's cPickle wrote the CIFAR files: every string is a byte string
    (BINSTRING), arrays go through ``numpy.core.multiarray._reconstruct``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def random_images(rng, n, shape=(3, 32, 32)):
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_files(files: dict[str, bytes], target: Path, archive: bool, folder: str) -> Path:
    """Write ``files`` into ``target/folder/`` or into the tar.gz ``target`` (members under ``folder/``)."""
    if archive:
        with tarfile.open(target, "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return target
    directory = target / folder
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def cifar10_python_files(rng, n_batches=3, per_batch=6, n_test=5, dumps=py2_pickle):
    files, train_x, train_y = {}, [], []
    for i in range(1, n_batches + 1):
        x = random_images(rng, per_batch)
        y = rng.integers(0, 10, per_batch).tolist()
        files[f"data_batch_{i}"] = dumps(
            {
                "batch_label": f"training batch {i} of 5",
                "labels": y,
                "data": x.reshape(per_batch, -1),
                "filenames": [f"img{j}.png" for j in range(per_batch)],
            }
        )
        train_x.append(x)
        train_y += y
    tx = random_images(rng, n_test)
    ty = rng.integers(0, 10, n_test).tolist()
    files["test_batch"] = dumps(
        {
            "batch_label": "testing batch 1 of 1",
            "labels": ty,
            "data": tx.reshape(n_test, -1),
            "filenames": [f"t{j}.png" for j in range(n_test)],
        }
    )
    files["batches.meta"] = dumps({"num_cases_per_batch": per_batch, "label_names": CIFAR10_NAMES, "num_vis": 3072})
    return files, (np.concatenate(train_x), np.array(train_y)), (tx, np.array(ty))


def cifar100_python_files(rng, n_train=7, n_test=4):
    files = {}
    x, fine = random_images(rng, n_train), rng.integers(0, 100, n_train)
    tx, tfine = random_images(rng, n_test), rng.integers(0, 100, n_test)
    for name, images, labels in (("train", x, fine), ("test", tx, tfine)):
        files[name] = py2_pickle(
            {
                "filenames": ["a.png"] * len(labels),
                "batch_label": name,
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
                "data": images.reshape(len(labels), -1),
            }
        )
    files["meta"] = py2_pickle(
        {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]}
    )
    return files, (x, fine), (tx, tfine)


def cifar_binary_records(images, labels, coarse=None) -> bytes:
    header = [labels[:, None]] if coarse is None else [coarse[:, None], labels[:, None]]
    return np.concatenate([*[h.astype(np.uint8) for h in header], images.reshape(len(labels), -1)], axis=1).tobytes()


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    return struct.pack(">i", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_fashion(directory: Path, rng, n_train=20, n_test=10, compress=True):
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "train-images-idx3-ubyte": random_images(rng, n_train, (28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": random_images(rng, n_test, (28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for stem, array in data.items():
        raw = idx_bytes(array)
        if compress:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return data


@pytest.fixture
def no_system_fashion(monkeypatch):
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIRS", ())


# --------------------------------------------------------------------------------------------
# CIFAR


@pytest.mark.parametrize("archive", [False, True], ids=["directory", "archive"])
def test_cifar10_python(tmp_path, archive, caplog):
    files, (x, y), (tx, ty) = cifar10_python_files(np.random.default_rng(0))
    write_files(files, tmp_path / "cifar-10-python.tar.gz" if archive else tmp_path, archive, "cifar-10-batches-py")
    with caplog.at_level(logging.INFO, logger="rocoin.data.datasets"):
        splits = load_dataset("cifar10", tmp_path)
    assert "data_batch_1, data_batch_2, data_batch_3" in caplog.text
    info = splits.info
    assert (info.name, info.num_classes, info.input_shape, info.augmentation) == ("cifar10", 10, (3, 32, 32), "crop-flip")
    assert info.class_names == tuple(CIFAR10_NAMES)
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.2470, 0.2435, 0.2616)
    assert splits.train.images.dtype == np.uint8 and splits.train.labels.dtype == np.int64
    assert splits.train.images.shape == (18, 3, 32, 32) and splits.test.images.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(splits.train.images, x)  # channel-major rows -> (C, H, W)
    np.testing.assert_array_equal(splits.train.labels, y)
    np.testing.assert_array_equal(splits.test.images, tx)
    np.testing.assert_array_equal(splits.test.labels, ty)
    assert splits.train.images.flags.writeable


def test_cifar10_folder_given_directly(tmp_path):
    files, (x, _), _ = cifar10_python_files(np.random.default_rng(1), n_batches=1)
    folder = write_files(files, tmp_path, False, "cifar-10-batches-py")
    np.testing.assert_array_equal(load_dataset("CIFAR-10", folder).train.images, x)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_python_written_by_python3(tmp_path, protocol):
    dumps = lambda obj: pickle.dumps(obj, protocol=protocol)  # noqa: E731
    files, (x, y), _ = cifar10_python_files(np.random.default_rng(2), n_batches=1, dumps=dumps)
    write_files(files, tmp_path, False, "cifar-10-batches-py")
    splits = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(splits.train.images, x)
    np.testing.assert_array_equal(splits.train.labels, y)


def test_cifar100_python_archive(tmp_path):
    files, (x, fine), (tx, tfine) = cifar100_python_files(np.random.default_rng(3))
    write_files(files, tmp_path / "cifar-100-python.tar.gz", True, "cifar-100-python")
    splits = load_dataset("cifar100", tmp_path)
    assert splits.info.num_classes == 100 and splits.info.class_names[:2] == ("fine0", "fine1")
    assert splits.info.mean == (0.5071, 0.4865, 0.4409) and splits.info.std == (0.2673, 0.2564, 0.2762)
    np.testing.assert_array_equal(splits.train.images, x)
    np.testing.assert_array_equal(splits.train.labels, fine)
    np.testing.assert_array_equal(splits.test.labels, tfine)


def test_dataset_present_looks_without_reading(tmp_path, monkeypatch):
    assert not ds.dataset_present("cifar100", tmp_path)
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not read")  # present, even if a load would refuse it
    assert ds.dataset_present("CIFAR-100", tmp_path) and not ds.dataset_present("cifar10", tmp_path)
    (tmp_path / "cifar-10-batches-bin").mkdir()
    assert ds.dataset_present("cifar10", tmp_path)
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIRS", ())
    assert not ds.dataset_present("fashion-mnist", tmp_path)
    assert ds.dataset_present("digits", tmp_path)  # shipped with scikit-learn


@pytest.mark.parametrize("archive", [False, True], ids=["directory", "archive"])
def test_cifar10_binary(tmp_path, archive):
    rng = np.random.default_rng(4)
    x1, x2, tx = random_images(rng, 4), random_images(rng, 3), random_images(rng, 2)
    y1, y2, ty = rng.integers(0, 10, 4), rng.integers(0, 10, 3), rng.integers(0, 10, 2)
    files = {
        "data_batch_1.bin": cifar_binary_records(x1, y1),
        "data_batch_2.bin": cifar_binary_records(x2, y2),
        "test_batch.bin": cifar_binary_records(tx, ty),
        "batches.meta.txt": ("\n".join(CIFAR10_NAMES) + "\n\n").encode(),
    }
    write_files(files, tmp_path / "cifar-10-binary.tar.gz" if archive else tmp_path, archive, "cifar-10-batches-bin")
    splits = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(splits.train.images, np.concatenate([x1, x2]))
    np.testing.assert_array_equal(splits.train.labels, np.concatenate([y1, y2]))
    np.testing.assert_array_equal(splits.test.images, tx)
    assert splits.info.class_names == tuple(CIFAR10_NAMES)


def test_cifar100_binary(tmp_path):
    rng = np.random.default_rng(5)
    x, fine, tx, tfine = random_images(rng, 5), rng.integers(0, 100, 5), random_images(rng, 2), rng.integers(0, 100, 2)
    files = {
        "train.bin": cifar_binary_records(x, fine, coarse=fine // 5),
        "test.bin": cifar_binary_records(tx, tfine, coarse=tfine // 5),
        "fine_label_names.txt": "\n".join(f"f{i}" for i in range(100)).encode(),
    }
    write_files(files, tmp_path, False, "cifar-100-binary")
    splits = load_dataset("cifar100", tmp_path)
    np.testing.assert_array_equal(splits.train.labels, fine)  # the fine byte, not the coarse one
    np.testing.assert_array_equal(splits.test.images, tx)


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("archive", [False, True], ids=["directory", "archive"])
@pytest.mark.parametrize("func", [os.system, eval], ids=["os.system", "eval"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, archive, func):
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w').close()"
    files, _, _ = cifar10_python_files(np.random.default_rng(6), n_batches=1)
    files["data_batch_1"] = pickle.dumps({"data": _Evil(func, command), "labels": [0]}, protocol=2)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_files(files, data_dir / "cifar-10-python.tar.gz" if archive else data_dir, archive, "cifar-10-batches-py")
    with pytest.raises(RocoinError, match=r"data_batch_1: refusing to load (posix|nt|builtins|__builtin__)\.(system|eval)") as err:
        load_dataset("cifar10", data_dir)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_cifar_corrupt_files(tmp_path):
    rng = np.random.default_rng(7)
    files, _, _ = cifar10_python_files(rng, n_batches=2)

    def attempt(name, content, match):
        case = tmp_path / name
        write_files({**files, **content}, case, False, "cifar-10-batches-py")
        with pytest.raises(RocoinError, match=match) as err:
            load_dataset("cifar10", case)
        assert "\n" not in str(err.value)

    bad_labels = py2_pickle({"labels": [0, 10, 1], "data": random_images(rng, 3).reshape(3, -1)})
    attempt("labels", {"data_batch_2": bad_labels}, r"data_batch_2: label 10 is out of range \[0, 10\)")
    short = py2_pickle({"labels": [0, 1], "data": np.zeros((2, 3000), np.uint8)})
    attempt("shape", {"data_batch_1": short}, r"data_batch_1: 'data' must be a uint8 array \(N, 3072\)")
    count = py2_pickle({"labels": [0], "data": np.zeros((2, 3072), np.uint8)})
    attempt("count", {"test_batch": count}, r"test_batch: 2 images but 1 labels")
    empty = py2_pickle({"labels": [], "data": np.zeros((0, 3072), np.uint8)})
    attempt("empty", {"data_batch_1": empty}, r"data_batch_1: the batch holds no images")
    attempt("truncated", {"data_batch_1": files["data_batch_1"][:-100]}, r"data_batch_1: not a valid CIFAR python pickle")
    attempt("emptyfile", {"data_batch_1": b""}, r"data_batch_1: not a valid CIFAR python pickle")
    attempt("names", {"batches.meta": py2_pickle({"label_names": ["a", "b"]})}, r"batches.meta: 2 class names, expected 10")

    missing = tmp_path / "missing" / "cifar-10-batches-py"
    missing.mkdir(parents=True)
    (missing / "data_batch_1").write_bytes(files["data_batch_1"])
    with pytest.raises(RocoinError, match=r"missing test_batch, batches.meta"):
        load_dataset("cifar10", missing.parent)


def test_cifar_corrupt_archives(tmp_path):
    files, _, _ = cifar10_python_files(np.random.default_rng(8), n_batches=1)
    good = write_files(files, tmp_path / "good.tar.gz", True, "cifar-10-batches-py").read_bytes()
    for name, content in {"truncated": good[: len(good) // 2], "garbage": b"not a tar archive at all", "empty": b""}.items():
        (tmp_path / name).mkdir()
        archive = tmp_path / name / "cifar-10-python.tar.gz"
        archive.write_bytes(content)
        with pytest.raises(RocoinError, match=rf"{name}/cifar-10-python.tar.gz: not a readable tar archive or truncated"):
            load_dataset("cifar10", tmp_path / name)

    # A member whose header claims an absurd size is rejected before anything is read.
    (tmp_path / "huge").mkdir()
    info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    info.size = 10 * 2**30
    (tmp_path / "huge" / "cifar-10-python.tar.gz").write_bytes(gzip.compress(info.tobuf() + b"\0" * 1024))
    with pytest.raises(RocoinError, match=r"data_batch_1: member size 10737418240 bytes is absurd"):
        load_dataset("cifar10", tmp_path / "huge")

    binary = tmp_path / "binary" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    (binary / "data_batch_1.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(RocoinError, match=r"data_batch_1.bin: size 3000 bytes is not a positive multiple of the 3073-byte"):
        load_dataset("cifar10", tmp_path / "binary")


def test_cifar_missing_lists_every_place(tmp_path):
    with pytest.raises(RocoinError) as err:
        load_dataset("cifar100", tmp_path)
    message = str(err.value)
    assert "\n" not in message
    for name in ("cifar-100-python", "cifar-100-python.tar.gz", "cifar-100-binary", "cifar-100-binary.tar.gz"):
        assert str(tmp_path / name) in message
    assert "--download" in message and "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_idx(tmp_path, compress, no_system_fashion):
    data = write_fashion(tmp_path, np.random.default_rng(9), compress=compress)
    splits = load_dataset("fashion-mnist", tmp_path)
    info = splits.info
    assert (info.num_classes, info.input_shape, info.mean, info.std, info.augmentation) == (10, (1, 28, 28), (0.2860,), (0.3530,), "none")
    assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
    assert splits.train.images.shape == (20, 1, 28, 28) and splits.test.images.shape == (10, 1, 28, 28)
    assert splits.train.images.dtype == np.uint8 and splits.test.labels.dtype == np.int64
    np.testing.assert_array_equal(splits.train.images[:, 0], data["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(splits.test.labels, data["t10k-labels-idx1-ubyte"])


def test_fashion_mnist_search_order(tmp_path, monkeypatch):
    system = tmp_path / "system"
    write_fashion(system, np.random.default_rng(10), n_train=30)
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIRS", (system,))
    assert len(load_dataset("fashion-mnist", tmp_path / "empty").train) == 30  # falls back to the system folder
    write_fashion(tmp_path / "mine" / "fashion-mnist", np.random.default_rng(11), n_train=12)
    assert len(load_dataset("fashion-mnist", tmp_path / "mine").train) == 12  # data_dir comes first


def test_fashion_mnist_corrupt(tmp_path, no_system_fashion):
    rng = np.random.default_rng(12)
    images = random_images(rng, 20, (28, 28))
    cases = {
        "truncated": (
            "train-images-idx3-ubyte.gz",
            gzip.compress(idx_bytes(images)[:-5]),
            r"truncated: the header announces 20x28x28 = 15680 bytes of data, found 15675",
        ),
        "magic": ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(images, magic=2049)), r"bad magic number 2049, expected 2051"),
        "labels-magic": (
            "t10k-labels-idx1-ubyte",
            idx_bytes(np.zeros((10, 1, 1)), magic=2051)[:-10],
            r"bad magic number 2051, expected 2049",
        ),
        "range": ("train-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(np.full(20, 10))), r"label 10 is out of range \[0, 10\)"),
        "count": (
            "train-labels-idx1-ubyte.gz",
            gzip.compress(idx_bytes(np.zeros(19))),
            r"19 labels but train-images-idx3-ubyte.gz holds 20 images",
        ),
        "empty": ("train-images-idx3-ubyte.gz", b"", r"empty or truncated IDX file"),
        "empty-gz": ("train-images-idx3-ubyte.gz", gzip.compress(b""), r"empty or truncated IDX file"),
        "zero-images": ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(np.zeros((0, 28, 28)))), r"empty IDX file"),
        "size": (
            "train-images-idx3-ubyte.gz",
            gzip.compress(idx_bytes(random_images(rng, 20, (32, 32)))),
            r"images are 32x32, Fashion-MNIST's are 28x28",
        ),
        "trailing": ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(images) + b"x"), r"trailing data"),
        "bad-gzip": ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(images))[:-30], r"cannot read"),
    }
    for case, (filename, content, match) in cases.items():
        directory = tmp_path / case
        write_fashion(directory, rng)
        stem = filename.removesuffix(".gz")
        (directory / f"{stem}.gz").unlink()
        (directory / filename).write_bytes(content)
        with pytest.raises(RocoinError, match=match) as err:
            load_dataset("fashion-mnist", directory)
        message = str(err.value)
        assert str(directory / filename) in message and "\n" not in message, case


def test_fashion_mnist_missing_lists_every_place(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIRS", (system,))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(RocoinError) as err:
        load_dataset("fashion-mnist", tmp_path / "data")
    message = str(err.value)
    assert "\n" not in message
    for place in (tmp_path / "data", tmp_path / "data" / "fashion-mnist", system):
        assert str(place) in message
    assert "lacks train-labels-idx1-ubyte" in message
    assert "--download" in message and "apt-get install dataset-fashion-mnist" in message
    assert ds.FASHION_MNIST_BASE_URL in message


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(tmp_path):
    splits = load_dataset("fashion-mnist", tmp_path)
    assert splits.train.images.shape == (60000, 1, 28, 28) and splits.test.images.shape == (10000, 1, 28, 28)
    assert splits.info.num_classes == 10
    np.testing.assert_array_equal(np.bincount(splits.train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(splits.test.labels), [1000] * 10)
    scaled = splits.train.images / 255.0
    assert abs(scaled.mean() - 0.2860) < 1e-3 and abs(scaled.std() - 0.3530) < 1e-3


# --------------------------------------------------------------------------------------------
# digits


def test_digits():
    pytest.importorskip("sklearn")
    splits = load_dataset("digits")
    assert (len(splits.train), len(splits.test)) == (1438, 359)
    assert splits.info.input_shape == (1, 8, 8) and splits.info.class_names == tuple("0123456789")
    assert splits.train.images.dtype == np.uint8 and splits.train.images.max() == 255
    scaled = splits.train.images / 255.0
    assert splits.info.mean[0] == pytest.approx(scaled.mean()) and splits.info.std[0] == pytest.approx(scaled.std())
    assert set(np.unique(splits.test.labels)) == set(range(10))


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)
    with pytest.raises(RocoinError, match=r"pip install scikit-learn"):
        load_dataset("digits")


def test_unknown_name():
    with pytest.raises(RocoinError, match=r"unknown data set 'mnist'; expected one of cifar10, cifar100, fashion-mnist, digits"):
        load_dataset("mnist")


# --------------------------------------------------------------------------------------------
# Downloads (file:// URLs)


def test_download_file(tmp_path):
    source = tmp_path / "src" / "blob.bin"
    source.parent.mkdir()
    source.write_bytes(b"some bytes" * 1000)
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    dest_dir = tmp_path / "dest"

    ds.download_file(source.as_uri(), dest_dir / "blob.bin", md5)
    assert (dest_dir / "blob.bin").read_bytes() == source.read_bytes()
    assert os.listdir(dest_dir) == ["blob.bin"]

    with pytest.raises(
        RocoinError, match=r"blob.bin: md5 [0-9a-f]{32} of the 10000 bytes downloaded does not match the expected 0{32}; nothing was saved"
    ):
        ds.download_file(source.as_uri(), dest_dir / "other.bin", "0" * 32)
    assert os.listdir(dest_dir) == ["blob.bin"]

    with pytest.raises(RocoinError, match=r"cannot download file://.*absent.bin"):
        ds.download_file((tmp_path / "absent.bin").as_uri(), dest_dir / "absent.bin", md5)
    assert os.listdir(dest_dir) == ["blob.bin"]


def test_load_with_download(tmp_path, monkeypatch, no_system_fashion):
    mirror = tmp_path / "mirror"
    files, (x, _), _ = cifar10_python_files(np.random.default_rng(13), n_batches=1)
    mirror.mkdir()
    archive = write_files(files, mirror / "cifar-10-python.tar.gz", True, "cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(ds.DOWNLOADS, "cifar10", ("unused", (("cifar-10-python.tar.gz", md5),)))
    write_fashion(mirror, np.random.default_rng(14))
    fashion = tuple((name, hashlib.md5((mirror / name).read_bytes()).hexdigest()) for name, _ in ds.DOWNLOADS["fashion-mnist"][1])
    monkeypatch.setitem(ds.DOWNLOADS, "fashion-mnist", ("unused", fashion))

    data_dir = tmp_path / "data"
    with pytest.raises(RocoinError, match="data not found"):
        load_dataset("cifar10", data_dir)  # no download unless asked
    splits = load_dataset("cifar10", data_dir, download=True, base_url=mirror.as_uri())
    np.testing.assert_array_equal(splits.train.images, x)
    assert (data_dir / "cifar-10-python.tar.gz").is_file()
    assert len(load_dataset("fashion-mnist", data_dir, download=True, base_url=mirror.as_uri() + "/").train) == 20

    # A corrupted mirror: the md5 does not match, nothing is left behind.
    monkeypatch.setitem(ds.DOWNLOADS, "cifar100", ("unused", (("cifar-10-python.tar.gz", "f" * 32),)))
    fresh = tmp_path / "fresh"
    with pytest.raises(RocoinError, match="does not match the expected"):
        load_dataset("cifar100", fresh, download=True, base_url=mirror.as_uri())
    assert list(fresh.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Containers and the validation split


def test_array_dataset_checks_and_subset():
    images, labels = np.zeros((4, 1, 2, 2), np.uint8), np.arange(4, dtype=np.int64)
    with pytest.raises(RocoinError, match="uint8"):
        ArrayDataset(images.astype(np.float32), labels)
    with pytest.raises(RocoinError, match="int64"):
        ArrayDataset(images, labels.astype(np.int32))
    with pytest.raises(RocoinError, match="4 images but 3 labels"):
        ArrayDataset(images, labels[:3])
    data = ArrayDataset(images, labels)
    assert len(data) == 4
    np.testing.assert_array_equal(data.subset([3, 1]).labels, [3, 1])
    np.testing.assert_array_equal(data.subset(labels % 2 == 0).labels, [0, 2])


def test_split_validation():
    rng = np.random.default_rng(15)
    data = ArrayDataset(random_images(rng, 100, (1, 4, 4)), np.arange(100, dtype=np.int64))
    train, val = split_validation(data, 0.1, seed=3)
    assert (len(train), len(val)) == (90, 10)
    assert set(train.labels).isdisjoint(val.labels) and set(train.labels) | set(val.labels) == set(range(100))
    np.testing.assert_array_equal(train.images, data.images[train.labels])
    again = split_validation(data, 0.1, seed=3)
    np.testing.assert_array_equal(again[1].labels, val.labels)
    assert not np.array_equal(split_validation(data, 0.1, seed=4)[1].labels, val.labels)
    with pytest.raises(RocoinError, match=r"fraction must be in \(0, 1\)"):
        split_validation(data, 1.0)


# --------------------------------------------------------------------------------------------
# Batches


def cifar_info(augmentation="crop-flip"):
    return DatasetInfo("cifar10", 10, (3, 32, 32), ds.CIFAR10_MEAN, ds.CIFAR10_STD, tuple(CIFAR10_NAMES), augmentation)


@needs_torch
def test_batches_normalise():
    rng = np.random.default_rng(16)
    data = ArrayDataset(random_images(rng, 10), rng.integers(0, 10, 10))
    out = list(batches(data, cifar_info(), batch_size=4, shuffle=False, augment=False))
    assert [tuple(x.shape) for x, _ in out] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    x = torch.cat([b[0] for b in out])
    y = torch.cat([b[1] for b in out])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    mean = np.array(ds.CIFAR10_MEAN)[None, :, None, None]
    std = np.array(ds.CIFAR10_STD)[None, :, None, None]
    np.testing.assert_allclose(x.numpy(), (data.images / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y.numpy(), data.labels)
    assert len(list(batches(data, cifar_info(), batch_size=4, drop_last=True))) == 2
    np.testing.assert_allclose(to_tensor(data.images[0], cifar_info()).numpy(), x[:1].numpy())


@needs_torch
def test_batches_shuffle_is_seeded():
    rng = np.random.default_rng(17)
    data = ArrayDataset(random_images(rng, 12), np.arange(12, dtype=np.int64))
    first = torch.cat([y for _, y in batches(data, cifar_info(), batch_size=5, shuffle=True, seed=1)])
    second = torch.cat([y for _, y in batches(data, cifar_info(), batch_size=5, shuffle=True, seed=1)])
    assert torch.equal(first, second) and sorted(first.tolist()) == list(range(12))
    assert not torch.equal(first, torch.arange(12))


@needs_torch
def test_augmentation_crop_flip():
    rng = np.random.default_rng(18)
    data = ArrayDataset(random_images(rng, 16), rng.integers(0, 10, 16))
    plain = torch.cat([x for x, _ in batches(data, cifar_info(), batch_size=8, augment=False)])
    runs = [list(batches(data, cifar_info(), batch_size=8, augment=True, seed=seed)) for seed in (5, 5, 6)]
    augmented = [torch.cat([x for x, _ in run]) for run in runs]
    assert augmented[0].shape == plain.shape
    assert not torch.equal(augmented[0], plain)
    assert torch.equal(augmented[0], augmented[1]) and not torch.equal(augmented[0], augmented[2])
    labels = torch.cat([y for _, y in runs[0]])
    np.testing.assert_array_equal(labels.numpy(), data.labels)
    # Data sets without crop-flip are left alone.
    same = torch.cat([x for x, _ in batches(data, cifar_info("none"), batch_size=8, augment=True, seed=5)])
    assert torch.equal(same, plain)


@needs_torch
def test_random_crop_flip_is_a_padded_window():
    rng = np.random.default_rng(19)
    images = random_images(rng, 6, (2, 5, 7))
    out = random_crop_flip(images, np.random.default_rng(0), padding=2)
    assert out.shape == images.shape and out.dtype == np.uint8
    padded = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)))
    for i in range(len(images)):
        windows = [w for top in range(5) for left in range(5) for w in (padded[i, :, top : top + 5, left : left + 7],)]
        assert any(np.array_equal(out[i], w) or np.array_equal(out[i], w[:, :, ::-1]) for w in windows)
