"""Shared helpers for the tests: small fleets and catalogs built by hand."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from rocoin.contracts.catalog import Catalog, StudentSpec
from rocoin.contracts.fleet import DeviceProfile, Fleet

#: CI (``.ci/run`` sets ``CI``) draws the same examples on every run, seeded by each test: a red CI is
#: then a change's doing, not the luck of the draw; elsewhere every run draws new ones and fuzzes on.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """Give every test the logging levels and handlers it started with: a command that sets up a
    server's logging (the root logger at INFO) would otherwise change what later tests capture and
    how long they take (10,000 registry joins went from 0.7 to 5.6 s, logging each)."""
    loggers = [logging.getLogger(), logging.getLogger("rocoin")]
    saved = [(lg, lg.level, list(lg.handlers)) for lg in loggers]
    yield
    for lg, level, handlers in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers


def device(id: str, mflops: float, memory_mib: float, rate_kbps: float, outage: float, **extra) -> DeviceProfile:
    return DeviceProfile(id=id, flops=mflops * 1e6, memory_bytes=int(memory_mib * MIB), rate_bps=rate_kbps * 1e3, outage=outage, **extra)


def small_catalog() -> Catalog:
    """Three students: small/fast, medium, large/slow (FLOPs, bytes, parameters)."""
    return Catalog(
        {
            "small": StudentSpec(flops=10e6, memory_bytes=int(0.5 * MIB), params=100_000, out_dim=64),
            "medium": StudentSpec(flops=30e6, memory_bytes=int(2 * MIB), params=300_000, out_dim=64),
            "large": StudentSpec(flops=90e6, memory_bytes=int(6 * MIB), params=1_000_000, out_dim=128),
        }
    )


def block_graph(sizes: list[int], inside: float = 1.0, across: float = 0.01) -> np.ndarray:
    """A filter graph with dense blocks of the given sizes and weak edges between them."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    weights = np.where(labels[:, None] == labels[None, :], inside, across)
    np.fill_diagonal(weights, 0.0)
    return weights


@pytest.fixture
def two_tier_fleet() -> Fleet:
    """Two strong and two weak devices, every device failing with probability 0.2."""
    return Fleet(
        devices=[
            device("strong-a", 30, 8, 400, 0.2),
            device("weak-a", 10, 1, 200, 0.2),
            device("strong-b", 30, 8, 400, 0.2),
            device("weak-b", 10, 1, 200, 0.2),
        ]
    )


def write_idx(path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format of MNIST/Fashion-MNIST, gzipped."""
    import gzip
    import struct

    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(directory, n_train: int = 300, n_test: int = 100, seed: int = 0) -> None:
    """Tiny Fashion-MNIST-format files whose 10 classes are learnable (a bright square per class)."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 5)
            images[i, 4 + 10 * row : 12 + 10 * row, 1 + 5 * col : 6 + 5 * col] += 180
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)


# --- layers -------------------------------------------------------------------------------------
#: Each folder of tests is a depth, and a marker of the same name: ``pytest -m "not e2e"`` is the
#: fast loop (no training beyond a few images, no fuzzing or soak), ``make test`` runs them all.
LAYERS = ("unit", "integration", "e2e")
# Tests of one depth reuse the fixtures-as-functions of another (``from test_device import
# make_bundle``); with every folder on the path that works whichever folder pytest is given.
for _layer in LAYERS:
    sys.path.insert(0, str(Path(__file__).resolve().parent / _layer))


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = item.path.parts
        for layer in LAYERS:
            if layer in parts:
                item.add_marker(getattr(pytest.mark, layer))
                break
