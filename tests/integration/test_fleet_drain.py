"""Draining a joined device before its maintenance (``POST /v2/fleet/members/{id}/drain``,
``rocoin fleet drain``): the source re-plans without it, so its group gets other devices before it
goes; it waits as a spare, and serves again once it joins again."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from test_joins import joined_source, wait_for  # noqa: E402
from test_runtime import GROUPS, expected_logits, images_batch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from rocoin.cli.main import app  # noqa: E402
from rocoin.contracts.errors import RocoinError  # noqa: E402
from rocoin.runtime.api.client import drain_member  # noqa: E402

PLAN_DEVICES = [d for members, _ in GROUPS for d in members]


def member(source, device_id: str) -> dict:
    return next(m for m in source.fleet_status()["members"] if m["device_id"] == device_id)


def test_a_drained_device_hands_its_group_over_before_it_goes_and_serves_again_when_back(tmp_path):
    async def main():
        async with joined_source(tmp_path, http_listen="127.0.0.1:0") as (source, join, bundle):
            http = join.ready["http_address"]
            devices = {d: join(d) for d in PLAN_DEVICES}
            await wait_for(lambda: sum(r.up for r in source.devices) == len(PLAN_DEVICES) and not source.fleet_status()["busy"])
            record = await asyncio.to_thread(drain_member, http, "c1")  # group 2's only replica
            assert record["trigger"] == "drain: c1" and {"device": "c1", "from": 2, "to": None} in record["moves"]
            assert devices["c1"].group == -1 and member(source, "c1")["draining"] and member(source, "c1")["spare"]
            taker = next(m["device"] for m in record["moves"] if m["to"] == 2)
            images = images_batch(3, batch=2)
            result = await source.infer(images)  # every group answers while c1 is still connected
            assert result.missing_groups == [] and result.answered_by[2] == taker
            np.testing.assert_allclose(result.logits, expected_logits(bundle, images), rtol=1e-5, atol=1e-5)
            replans = source.fleet_status()["replans"]
            await devices["c1"].stop()  # its maintenance: no group loses a replica, nothing to re-plan
            await asyncio.sleep(1.5)
            assert source.fleet_status()["replans"] == replans
            assert (await source.infer(images)).missing_groups == []
            back = join("c1")  # rebooted: it joins again and may serve
            await wait_for(lambda: back.assigned.is_set() and not source.fleet_status()["busy"])
            assert not member(source, "c1")["draining"]

    asyncio.run(main())


def test_a_drain_that_would_leave_a_group_without_a_device_is_refused_and_changes_nothing(tmp_path):
    async def main():
        async with joined_source(tmp_path, http_listen="127.0.0.1:0") as (source, join, _):
            http = join.ready["http_address"]
            devices = {d: join(d) for d in PLAN_DEVICES}
            await wait_for(lambda: sum(r.up for r in source.devices) == len(PLAN_DEVICES) and not source.fleet_status()["busy"])
            await asyncio.to_thread(drain_member, http, "a1")  # five devices, three groups: two can go
            said = await asyncio.to_thread(CliRunner().invoke, app, ["fleet", "drain", "b1", "--source", http])
            assert said.exit_code == 0 and "drained b1: it serves no group now (moves: b1 group 1 -> spare" in said.output, said.output
            serving = {d: devices[d].group for d in ("a2", "b2", "c1")}
            with pytest.raises(RocoinError, match="HTTP 409: device 'a2': the other devices cannot serve every group without it"):
                await asyncio.to_thread(drain_member, http, "a2")
            assert {d: devices[d].group for d in serving} == serving and not member(source, "a2")["draining"]
            assert (await source.infer(images_batch(1))).missing_groups == []
            with pytest.raises(RocoinError, match="HTTP 404"):
                await asyncio.to_thread(drain_member, http, "nobody")
            result = await asyncio.to_thread(CliRunner().invoke, app, ["fleet", "drain", "a2", "--source", http])
            errors = [line for line in result.output.splitlines() if not line.startswith("rocoin: WARNING")]  # the source's log, here
            assert (
                result.exit_code == 2 and len(errors) == 1 and errors[0].startswith("error: ") and "cannot serve every group" in errors[0]
            )

    asyncio.run(main())
