"""How a re-plan's moves are carried out (:meth:`Membership._move`): side by side, at most
``MAX_PARALLEL_MOVES`` at once, those that end an outage (into a group with no live replica)
first, and a failed or crashed move reported as failed without stopping the others."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("grpc")

from rocoin.runtime.source import membership as membership_module  # noqa: E402
from rocoin.runtime.source.membership import Membership  # noqa: E402
from rocoin.runtime.transport.join import SPARE  # noqa: E402


def stub(groups_up: list[bool], outcomes: dict[str, object], hold_s: float = 0.05) -> tuple[Membership, list[str], list[int]]:
    """A membership whose source has one replica per group (up or not) and whose moves take
    ``hold_s`` and end as ``outcomes`` says (True, False, or an exception to raise)."""
    m = Membership.__new__(Membership)
    m.source = SimpleNamespace(num_groups=len(groups_up), devices=[SimpleNamespace(group=k, up=up) for k, up in enumerate(groups_up)])
    started: list[str] = []
    running = [0, 0]  # now, most at once

    async def assign(device_id: str, group: int) -> bool:
        started.append(device_id)
        running[0] += 1
        running[1] = max(running[1], running[0])
        try:
            await asyncio.sleep(hold_s)
            outcome = outcomes.get(device_id, True)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        finally:
            running[0] -= 1

    m._assign = assign
    return m, started, running


def test_moves_that_end_an_outage_start_first_and_the_rest_run_side_by_side():
    m, started, running = stub([True, False, True], {})
    moves = [("d1", 0, 2), ("d2", 2, SPARE), ("d3", 0, 1), ("d4", SPARE, 0)]  # group 1 has no live replica
    failed = asyncio.run(m._move(moves))
    assert failed == {} and started[0] == "d3" and started[-1] == "d2"  # the outage first, a spare last
    assert running[1] == 4  # side by side, not one after the other


def test_at_most_max_parallel_moves_run_at_once(monkeypatch):
    monkeypatch.setattr(membership_module, "MAX_PARALLEL_MOVES", 3)
    m, started, running = stub([True, True], {}, hold_s=0.02)
    failed = asyncio.run(m._move([(f"d{i}", 0, 1) for i in range(10)]))
    assert failed == {} and len(started) == 10 and running[1] == 3


def test_a_failed_or_crashed_move_is_reported_and_the_others_still_happen():
    m, started, _ = stub([True, True], {"d1": False, "d2": RuntimeError("a bug")})
    failed = asyncio.run(m._move([("d1", 0, 1), ("d2", 1, 0), ("d3", 0, 1)]))
    assert failed == {"d1": None, "d2": None} and sorted(started) == ["d1", "d2", "d3"]
