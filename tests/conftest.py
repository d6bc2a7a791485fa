"""Shared helpers for the tests: small fleets and catalogs built by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rocoin.profiles.catalog import Catalog, StudentSpec
from rocoin.profiles.fleet import DeviceProfile, Fleet

MIB = 1024 * 1024


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
