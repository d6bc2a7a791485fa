"""A device's emulation uses the planner's latency model, and holds and drops answers as told."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.latency import BITS_PER_VALUE, device_latency_s
from rocoin.runtime.device.emulation import Emulation


def test_the_emulated_latency_is_the_planner_s():
    emulation = Emulation(flops=1.0e7, rate_bps=6400.0, outage=0.0, input_s=0.02)
    assert emulation.latency_s(1.0e6, 3) == float(device_latency_s(1.0e7, 6400.0, 0.02, 1.0e6, 3))
    assert emulation.latency_s(1.0e6, 3) == pytest.approx(1.0e6 / 1.0e7 + BITS_PER_VALUE * 3 / 6400.0 + 0.02)
    assert isinstance(emulation.latency_s(1.0e6, 3), float)


def test_hold_waits_out_the_target_and_drops_at_the_outage_rate():
    async def held(emulation: Emulation, target_s: float, rng: random.Random) -> tuple[bool, float]:
        started = time.perf_counter()
        dropped = await emulation.hold(target_s, started, rng)
        return dropped, time.perf_counter() - started

    dropped, elapsed = asyncio.run(held(Emulation(flops=1.0, rate_bps=1.0, outage=0.0), 0.02, random.Random(0)))
    assert not dropped and elapsed >= 0.02
    rng = random.Random(0)
    drops = [asyncio.run(held(Emulation(flops=1.0, rate_bps=1.0, outage=0.5), 0.0, rng))[0] for _ in range(200)]
    assert 60 < sum(drops) < 140


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"flops": 0.0}, "emulation flops = 0.0"),
        ({"rate_bps": float("inf")}, "emulation rate_bps = inf"),
        ({"outage": 1.0}, "emulation outage = 1.0"),
        ({"drop": "loud"}, "emulation drop = 'loud'"),
        ({"input_s": -1.0}, "emulation input_s = -1.0"),
    ],
)
def test_a_bad_profile_is_one_line_naming_it(options, needle):
    with pytest.raises(RocoinError, match=needle.replace("(", r"\(")) as info:
        Emulation(**{"flops": 1.0, "rate_bps": 1.0, "outage": 0.0, **options})
    assert "\n" not in str(info.value)
