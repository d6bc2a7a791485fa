"""Forgetting devices: a gone device's id stays bound to its key (nobody else may join under it)
until an operator forgets it (``DELETE /v2/fleet/members/{id}``, ``rocoin fleet forget``) or it
has been gone for ``forget_after_s`` and is pruned — so a replaced camera can take its old id, and
a fleet whose phones come and go under new ids does not fill the registry."""

from __future__ import annotations

import asyncio

import grpc
import pytest

pytest.importorskip("onnxruntime")

from test_joins import joined_source, wait_for  # noqa: E402
from test_runtime import GROUPS, images_batch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from rocoin.cli.main import app  # noqa: E402
from rocoin.contracts.errors import RocoinError  # noqa: E402
from rocoin.runtime.api.client import fetch_fleet_status, forget_member  # noqa: E402
from rocoin.runtime.source import membership  # noqa: E402

GRACE_S = 0.3
OLD_KEY = "old-camera-key-" + "k" * 16
NEW_KEY = "new-camera-key-" + "k" * 16


def states(source) -> dict[str, str]:
    """Each member's state, as ``/v2/fleet`` shows it (read in-process: the test shares the source's event loop)."""
    return {m["device_id"]: m["state"] for m in source.fleet_status()["members"]}


def test_an_operator_forgets_a_gone_device_so_its_replacement_can_take_the_id(tmp_path):
    async def main():
        async with joined_source(tmp_path, http_listen="127.0.0.1:0", grace_s=GRACE_S) as (source, join, _):
            http = join.ready["http_address"]
            devices = {d: join(d, **({"key": OLD_KEY} if d == "c1" else {})) for members, _ in GROUPS for d in members}
            await wait_for(lambda: all(d.assigned.is_set() for d in devices.values()) and states(source)["c1"] == "serving")
            with pytest.raises(RocoinError, match="HTTP 409: device 'c1': serving: only a gone device can be forgotten"):
                await asyncio.to_thread(forget_member, http, "c1")
            with pytest.raises(RocoinError, match="HTTP 404: device 'nobody': not in the membership"):
                await asyncio.to_thread(forget_member, http, "nobody")

            await devices["c1"].stop()  # the camera breaks for good
            await wait_for(lambda: states(source)["c1"] == "gone")
            replacement = join("c1", key=NEW_KEY)  # a new camera under the old id: its key differs
            await wait_for(lambda: replacement.ended is not None)
            assert replacement.ended.code() == grpc.StatusCode.PERMISSION_DENIED

            forgotten = await asyncio.to_thread(forget_member, http, "c1", reason="camera replaced")
            assert forgotten["device_id"] == "c1" and forgotten["state"] == "gone"
            assert "c1" not in states(source)
            listed = await asyncio.to_thread(fetch_fleet_status, http)  # and over the REST API
            assert "c1" not in {m["device_id"] for m in listed["members"]}
            again = join("c1", key=NEW_KEY)
            await wait_for(lambda: again.assigned.is_set() and not source.fleet_status()["busy"])
            assert states(source)["c1"] == "serving"
            assert (await source.infer(images_batch(1))).missing_groups == []

    asyncio.run(main())


def test_rocoin_fleet_forget_says_what_it_did_and_refuses_a_device_still_in_the_fleet(tmp_path):
    async def main():
        async with joined_source(tmp_path, http_listen="127.0.0.1:0", grace_s=GRACE_S) as (source, join, _):
            http = join.ready["http_address"]
            d = join("c1")
            await wait_for(lambda: d.assigned.is_set() and states(source)["c1"] == "serving")
            runner = CliRunner()
            refused = await asyncio.to_thread(runner.invoke, app, ["fleet", "forget", "c1", "--source", http])
            assert refused.exit_code != 0 and "only a gone device can be forgotten" in refused.output
            assert len(refused.output.strip().splitlines()) == 1
            await d.stop()
            await wait_for(lambda: states(source)["c1"] == "gone")
            done = await asyncio.to_thread(runner.invoke, app, ["fleet", "forget", "c1", "--source", http, "--reason", "stolen"])
            assert done.exit_code == 0, done.output
            assert "forgot c1 (was gone)" in done.output
            assert "c1" not in states(source)

    asyncio.run(main())


def test_gone_devices_are_pruned_after_forget_after_s_and_their_ids_are_free_again(tmp_path, monkeypatch):
    monkeypatch.setattr(membership, "PRUNE_INTERVAL_S", 0.0)  # look every check (1 s), not every minute

    async def main():
        async with joined_source(tmp_path, http_listen="127.0.0.1:0", grace_s=GRACE_S, forget_after_s=1.0) as (source, join, _):
            fleet = [join(d) for members, _ in GROUPS for d in members]
            phones = [join(f"phone-{i}", key=f"phone-key-{i}-" + "k" * 16) for i in range(3)]
            await wait_for(lambda: all(d.assigned.is_set() for d in [*fleet, *phones]))
            for p in phones[:2]:
                await p.stop()
            await wait_for(lambda: [states(source).get(f"phone-{i}") for i in range(2)] == ["gone", "gone"])
            await wait_for(lambda: "phone-0" not in states(source) and "phone-1" not in states(source), timeout_s=10)
            left = states(source)
            assert left["phone-2"] != "gone" and all(left[d] == "serving" for members, _ in GROUPS for d in members)  # never pruned
            newcomer = join("phone-0", key="another-phone-key-" + "k" * 16)  # the id is free again
            await wait_for(lambda: newcomer.assigned.is_set())

    asyncio.run(main())
