"""Emulation: a fast machine behaving like a device of the fleet.

After the real compute, the answer is held until ``t(d, s, k)`` — the latency model of SPEC.md §3,
:func:`rocoin.contracts.latency.device_latency_s` — has passed since the call started running, then
dropped with probability ``p_d`` (the device's outage): by default the answer never arrives (the
caller waits until its deadline), as SPEC.md §1 models an outage; ``drop="error"`` fails it at
once instead. What a dropped answer looks like on the wire is the servicer's business
(:mod:`.servicer`).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from dataclasses import dataclass

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fleet import Fleet, load_fleet
from rocoin.contracts.latency import BITS_PER_VALUE, device_latency_s


@dataclass(frozen=True)
class Emulation:
    """A fleet profile to emulate: answer after ``t(d, s, k)`` and drop answers at the outage rate."""

    flops: float
    rate_bps: float
    outage: float
    input_s: float = 0.0
    seed: int | None = None
    #: "silent": a dropped answer never arrives (the caller waits until its deadline), as SPEC.md §1
    #: models an outage; "error": the call fails at once with UNAVAILABLE.
    drop: str = "silent"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.flops) and self.flops > 0):
            raise RocoinError(f"emulation flops = {self.flops!r}: expected a positive FLOP/s rate")
        if not (math.isfinite(self.rate_bps) and self.rate_bps > 0):
            raise RocoinError(f"emulation rate_bps = {self.rate_bps!r}: expected a positive bit/s rate")
        if not (0.0 <= self.outage < 1.0):
            raise RocoinError(f"emulation outage = {self.outage!r}: expected a probability in [0, 1)")
        if self.drop not in ("silent", "error"):
            raise RocoinError(f"emulation drop = {self.drop!r}: expected silent or error")
        if not (math.isfinite(self.input_s) and self.input_s >= 0):
            raise RocoinError(f"emulation input_s = {self.input_s!r}: expected seconds >= 0")

    @classmethod
    def from_fleet(cls, fleet: Fleet | str | os.PathLike[str], device_id: str, *, seed: int | None = None) -> Emulation:
        """The profile of ``device_id`` in ``fleet`` (a :class:`Fleet` or a fleet file).

        ``input_s`` is ``input_bits / downlink_bps`` when the fleet gives both, else 0.
        """
        if not isinstance(fleet, Fleet):
            fleet = load_fleet(fleet)
        arrays = fleet.arrays()
        if device_id not in arrays.ids:
            raise RocoinError(f"device-id = {device_id!r}: not a device of the fleet")
        i = arrays.ids.index(device_id)
        return cls(
            flops=float(arrays.flops[i]),
            rate_bps=float(arrays.rate_bps[i]),
            outage=float(arrays.outage[i]),
            input_s=float(arrays.input_s[i]),
            seed=seed,
        )

    def latency_s(self, student_flops: float, partition_size: int, bits_per_filter: int = BITS_PER_VALUE) -> float:
        """``t(d, s, k) = c_s / f_d + 32·|P_k| / r_d + input_s`` (SPEC.md §3), the planner's own
        formula; ``bits_per_filter`` replaces 32 for a student that sends a feature map."""
        return float(device_latency_s(self.flops, self.rate_bps, self.input_s, student_flops, partition_size, bits_per_filter))

    async def hold(self, target_s: float, started: float, rng: random.Random) -> bool:
        """Wait until ``target_s`` has passed since ``started`` (``time.perf_counter``); True when
        the answer is then dropped (probability :attr:`outage`)."""
        remaining = target_s - (time.perf_counter() - started)
        if remaining > 0:
            await asyncio.sleep(remaining)
        return rng.random() < self.outage
