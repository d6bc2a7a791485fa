"""Profiles without measuring: the paper's synthetic fleets (Table IV) and catalogs counted from the
students' shapes (``rocoin.models.analytic``). Measured profiles come from ``rocoin profile`` and
``rocoin catalog --measure``; both kinds are the contracts of :mod:`rocoin.contracts`."""

from __future__ import annotations

import math

import numpy as np

from rocoin.contracts.catalog import Catalog, StudentSpec
from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fleet import DeviceProfile, Fleet
from rocoin.models.analytic import DEFAULT_STUDENTS, arch_stats

#: Table IV of the paper: width of the FLOP/s range (MFLOP/s) and of the rate range (in the
#: table's rate unit, see :data:`RATE_UNITS`) for heterogeneity levels 0..5.
HETEROGENEITY_FLOPS_RANGE_M = (0.0, 10.0, 15.0, 20.0, 25.0, 30.0)
HETEROGENEITY_RATE_RANGE_KBPS = (0.0, 100.0, 200.0, 300.0, 400.0, 500.0)
#: Centres of the generated ranges [decision: the paper's 10-30 MFLOP/s and 100-500 (unit) rates].
CENTER_FLOPS = 20e6
CENTER_RATE_BPS = 300e3
#: How to read Table IV's rates, "100-500 bps": ``kbps`` (SPEC.md's assumption, the default: 100-500
#: kbit/s) or ``bps`` (as printed: 100-500 bit/s). bit/s per unit of the table.
RATE_UNITS = {"kbps": 1e3, "bps": 1.0}
DEFAULT_RATE_UNIT = "kbps"
#: Memory [decision: the paper gives none]: log-uniform around 4 MiB, wider with heterogeneity.
CENTER_MEMORY_BYTES = 4 * 1024 * 1024
MEMORY_SPREAD_PER_LEVEL = 0.5


def generate_fleet(
    num_devices: int,
    heterogeneity: int = 3,
    success_prob: float = 0.8,
    *,
    success_spread: float = 0.1,
    input_bits: int | None = None,
    downlink_bps: float | None = None,
    rate_unit: str = DEFAULT_RATE_UNIT,
    random_state: int | np.random.Generator | None = None,
) -> Fleet:
    """A fleet like the paper's simulations (Table IV), with the assumptions of SPEC.md §7.

    - FLOP/s uniform in ``20 MFLOP/s ± W_f/2`` and rate uniform in ``300 ± W_r/2`` units, with
      ``(W_f, W_r)`` the Table IV widths of ``heterogeneity`` (0: identical devices; 5: widest)
      and the unit ``rate_unit`` (``kbps``: kbit/s, the default; ``bps``: bit/s, as printed).
    - memory log-uniform in ``[4 MiB / g, 4 MiB · g]`` with ``g = 1 + 0.5 · heterogeneity``.
    - success probability ``1 - outage`` uniform in ``success_prob ± success_spread``, clipped to
      ``[0.01, 0.999]`` (the fleet's mean success probability is ``success_prob`` unless clipped).
    """
    if num_devices < 1:
        raise RocoinError(f"devices = {num_devices}: expected at least 1")
    if heterogeneity not in range(len(HETEROGENEITY_FLOPS_RANGE_M)):
        raise RocoinError(f"heterogeneity = {heterogeneity}: expected an integer level 0..5 (Table IV)")
    if not 0.0 < success_prob <= 1.0:
        raise RocoinError(f"success-prob = {success_prob}: expected a probability in (0, 1]")
    if not 0.0 <= success_spread < 1.0:
        raise RocoinError(f"success-spread = {success_spread}: expected a value in [0, 1)")
    if rate_unit not in RATE_UNITS:
        raise RocoinError(f"rate-unit = {rate_unit!r}: expected one of {', '.join(RATE_UNITS)}")
    per_unit = RATE_UNITS[rate_unit]
    rng = np.random.default_rng(random_state)
    width_f = HETEROGENEITY_FLOPS_RANGE_M[heterogeneity] * 1e6
    width_r = HETEROGENEITY_RATE_RANGE_KBPS[heterogeneity] * per_unit
    flops = CENTER_FLOPS + rng.uniform(-0.5, 0.5, num_devices) * width_f
    rate = CENTER_RATE_BPS / 1e3 * per_unit + rng.uniform(-0.5, 0.5, num_devices) * width_r
    spread = 1.0 + MEMORY_SPREAD_PER_LEVEL * heterogeneity
    memory = CENTER_MEMORY_BYTES * np.exp(rng.uniform(-1.0, 1.0, num_devices) * math.log(spread))
    success = np.clip(success_prob + rng.uniform(-1.0, 1.0, num_devices) * success_spread, 0.01, 0.999)
    width = len(str(num_devices))
    devices = [
        DeviceProfile(
            id=f"dev-{i + 1:0{width}d}",
            flops=float(round(flops[i], 1)),
            memory_bytes=int(memory[i]),
            rate_bps=float(round(rate[i], 1)),
            outage=float(round(1.0 - success[i], 6)),
            downlink_bps=downlink_bps,
        )
        for i in range(num_devices)
    ]
    return Fleet(devices=devices, input_bits=input_bits)


def analytic_catalog(input_shape: tuple[int, int, int], num_classes: int, names: list[str] | tuple[str, ...] = DEFAULT_STUDENTS) -> Catalog:
    """A catalog counted from the architectures' shapes (see ``rocoin.models.analytic``)."""
    entries = {}
    for name in names:
        stats = arch_stats(name, input_shape, num_classes)
        entries[name] = StudentSpec(flops=float(stats.flops), memory_bytes=stats.memory_bytes, params=stats.params, out_dim=stats.out_dim)
    return Catalog(entries)


def default_catalog(input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> Catalog:
    """The built-in catalog: the default students counted from their shapes.

    These are estimates; ``rocoin catalog`` measures the students and ``--catalog FILE`` uses that.
    """
    return analytic_catalog(input_shape, num_classes)
