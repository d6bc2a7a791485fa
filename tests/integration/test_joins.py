"""Devices that dial the source (``rocoin.v1.Fleet/Join``), on loopback: the source admits them
with the device token, binds each id to its device key, sends each its group's model in
verified chunks, serves queries over their streams, and re-plans when a group loses its last
replica. The device here is a scripted one (raw gRPC stream), so the source's side of the
protocol is tested on its own; ``test_device_join.py`` tests the real device client."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import grpc  # noqa: E402
import onnxruntime as ort  # noqa: E402
from conftest import device  # noqa: E402
from test_runtime import GROUPS, expected_logits, images_batch, make_bundle  # noqa: E402

from rocoin.contracts.fleet import Fleet  # noqa: E402
from rocoin.contracts.manifest import GroupModel  # noqa: E402
from rocoin.runtime.api.server import serve_source  # noqa: E402
from rocoin.runtime.source.source import Source  # noqa: E402
from rocoin.runtime.transport.join import JOIN_METHOD, JOIN_PROTOCOL, SPARE  # noqa: E402
from rocoin.runtime.transport.protocol import rocoin_pb2  # noqa: E402
from rocoin.runtime.transport.serde import tensor_from_proto, tensor_to_proto  # noqa: E402

TOKEN = "device-token-0123456789"
DEADLINE_S = 0.5


def profile_json(device_id: str, outage: float = 0.1) -> str:
    return device(device_id, 20, 4, 300, outage).model_dump_json(exclude_none=True, exclude={"id"})


class ScriptedDevice:
    """A device that joins over a raw Join stream and answers as the protocol says."""

    def __init__(self, address: str, device_id: str, *, key: str = "key-of-" + "x" * 16, token: str = TOKEN, cached: dict | None = None):
        self.address, self.device_id, self.key, self.token = address, device_id, key, token
        self.cache: dict[str, bytes] = dict(cached or {})
        self.group = SPARE
        self.sha = ""
        self.session: ort.InferenceSession | None = None
        self.chunks_received = 0
        self.assigned = asyncio.Event()
        self.ended: grpc.aio.AioRpcError | None = None
        self.tamper = False
        self.error: Exception | None = None
        self._call = None
        self._channel = None

    async def run(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.address)
        call = self._channel.stream_stream(
            JOIN_METHOD,
            request_serializer=rocoin_pb2.DeviceMessage.SerializeToString,
            response_deserializer=rocoin_pb2.SourceMessage.FromString,
        )(metadata=(("authorization", f"Bearer {self.token}"),))
        self._call = call
        hello = rocoin_pb2.JoinHello(
            device_id=self.device_id, profile_json=profile_json(self.device_id), cached_models=list(self.cache), protocol=JOIN_PROTOCOL,
            device_key=self.key,
        )  # fmt: skip
        pending: tuple[rocoin_pb2.Assignment, GroupModel, bytearray] | None = None
        try:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):  # refused while saying hello:
                await self._write(call, rocoin_pb2.DeviceMessage(hello=hello))  # reading the stream gives the status
            async for message in call:
                kind = message.WhichOneof("kind")
                if kind == "assign":
                    a = message.assign
                    if a.group == SPARE:
                        self.group, self.sha, self.session = SPARE, "", None
                        await self._write(call, rocoin_pb2.DeviceMessage(ready=rocoin_pb2.ModelReady(epoch=a.epoch)))
                        self.assigned.set()
                        continue
                    model = GroupModel.model_validate_json(a.model_json)
                    pending = (a, model, bytearray())
                    if not a.send_model:
                        await self._load(call, a, model, self.cache[model.sha256])
                        pending = None
                elif kind == "chunk":
                    a, model, data = pending
                    assert message.chunk.offset == len(data) and message.chunk.sha256 == model.sha256
                    data += message.chunk.data
                    self.chunks_received += 1
                    if len(data) == model.size_bytes:
                        await self._load(call, a, model, bytes(data))
                        pending = None
                elif kind == "request":
                    if message.request.query_id:
                        await self.on_request(call, message.request)
                elif kind == "health":
                    await self.on_health(call, rocoin_pb2.HealthReply(nonce=message.health.nonce, model_sha256=self.sha))
        except grpc.aio.AioRpcError as exc:
            self.ended = exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the script: fail the test loudly
            self.error = exc
            raise

    async def on_request(self, call, r: rocoin_pb2.DeviceInferRequest) -> None:
        """A query: answered at once with the model served now (subclasses answer otherwise)."""
        features = self.session.run(None, {"image": tensor_from_proto(r.input, max_bytes=1 << 20)})[0]
        reply = rocoin_pb2.DeviceInferResponse(
            query_id=r.query_id, device_id=self.device_id, group=self.group, features=tensor_to_proto(features)
        )
        await self._write(call, rocoin_pb2.DeviceMessage(answer=reply))

    async def on_health(self, call, reply: rocoin_pb2.HealthReply) -> None:
        """A health check: answered at once with the hash of the model served now."""
        await self._write(call, rocoin_pb2.DeviceMessage(health=reply))

    async def _write(self, call, message: rocoin_pb2.DeviceMessage) -> None:
        await call.write(message)

    async def _load(self, call, a, model: GroupModel, data: bytes) -> None:
        if self.tamper:
            data = data[:-1] + bytes([data[-1] ^ 1])
        if hashlib.sha256(data).hexdigest() != model.sha256:
            await self._write(call, rocoin_pb2.DeviceMessage(ready=rocoin_pb2.ModelReady(epoch=a.epoch, error="SHA-256 does not match")))
            return
        self.cache[model.sha256] = data
        self.session = ort.InferenceSession(data)
        self.group, self.sha = a.group, model.sha256
        await self._write(call, rocoin_pb2.DeviceMessage(ready=rocoin_pb2.ModelReady(sha256=model.sha256, epoch=a.epoch)))
        self.assigned.set()

    async def stop(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()


@contextlib.asynccontextmanager
async def joined_source(tmp_path: Path, fleet: Fleet | None = None, *, crash: bool = False, **options):
    """A source on loopback that devices join (``join(id)``); at the end the devices stop, then
    the source, or (``crash``) the source stops first, as if it crashed under its devices."""
    bundle = make_bundle(tmp_path / "bundle")
    fleet = fleet or Fleet(devices=[device(d, 20, 4, 300, 0.1) for members, _ in GROUPS for d in members])
    source = Source(bundle, fleet, deadline_s=DEADLINE_S, token=TOKEN, joins=True)
    stop = asyncio.Event()
    ready = tmp_path / "ready.json"
    server = asyncio.ensure_future(
        serve_source(source, "127.0.0.1:0", ready_file=ready, stop=stop, device_token=TOKEN, state_dir=tmp_path / "state", **options)
    )
    for _ in range(200):
        if ready.exists() or server.done():
            break
        await asyncio.sleep(0.02)
    if server.done():
        server.result()
    ready_info = json.loads(ready.read_text())
    address = ready_info["address"]
    devices: list[ScriptedDevice] = []
    tasks: list[asyncio.Task] = []

    def join(device_id: str, **kwargs) -> ScriptedDevice:
        d = ScriptedDevice(address, device_id, **kwargs)
        devices.append(d)
        tasks.append(asyncio.ensure_future(d.run()))
        return d

    join.ready = ready_info  # addresses: gRPC, and REST when asked for
    try:
        yield source, join, bundle
    finally:
        if crash:
            stop.set()
            await server
        for d in devices:
            await d.stop()
        stop.set()
        await server
        for t in tasks:
            t.cancel()


async def wait_for(condition, timeout_s: float = 10.0) -> None:
    limit = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < limit, "timed out"
        await asyncio.sleep(0.02)


def test_devices_that_dial_the_source_get_their_models_and_serve_queries(tmp_path):
    async def main():
        async with joined_source(tmp_path) as (source, join, bundle):
            assert not source.ready  # no device has joined yet
            devices = {d: join(d) for members, _ in GROUPS for d in members}
            await wait_for(lambda: sum(d.up for d in source.devices) == len(devices))
            for name, d in devices.items():
                k = next(i for i, (members, _) in enumerate(GROUPS) if name in members)
                assert d.group == k and d.chunks_received >= 1
            images = images_batch(3)
            result = await source.infer(images)
            assert result.missing_groups == []
            np.testing.assert_allclose(result.logits, expected_logits(bundle, images), rtol=1e-5, atol=1e-5)
            status = source.fleet_status()
            assert [len(g["live_replicas"]) for g in status["groups"]] == [len(m) for m, _ in GROUPS]
            assert {m["device_id"]: m["state"] for m in status["members"]} == {d: "serving" for d in devices}

    asyncio.run(main())


def test_a_wrong_token_and_a_taken_id_are_refused(tmp_path):
    async def main():
        async with joined_source(tmp_path) as (source, join, _):
            first = join("a1", key="first-key-" + "k" * 16)
            await wait_for(lambda: first.assigned.is_set())
            wrong = join("a2", token="not-the-device-token-0000")
            thief = join("a1", key="another-key-" + "k" * 16)
            await wait_for(lambda: wrong.ended is not None and thief.ended is not None)
            assert wrong.ended.code() == grpc.StatusCode.UNAUTHENTICATED and "device token" in wrong.ended.details()
            assert thief.ended.code() == grpc.StatusCode.PERMISSION_DENIED
            assert source.replica("a1").link is not None and source.replica("a1").state.up  # the owner still serves

    asyncio.run(main())


def test_a_device_that_refuses_a_tampered_model_never_serves(tmp_path):
    async def main():
        async with joined_source(tmp_path) as (source, join, _):
            bad = ScriptedDevice  # noqa: F841 - for readability below
            d = join("c1")
            d.tamper = True
            await asyncio.sleep(1.0)
            replica = source.replica("c1")
            assert replica is None or not replica.state.up
            result = await source.infer(images_batch(1), deadline_s=0.2)
            assert 2 in result.missing_groups

    asyncio.run(main())


def test_a_new_device_strengthens_the_weakest_group_and_a_lost_group_is_healed(tmp_path):
    async def main():
        async with joined_source(tmp_path) as (source, join, bundle):
            devices = {d: join(d) for members, _ in GROUPS for d in members}
            await wait_for(lambda: sum(d.up for d in source.devices) == len(devices))
            extra = join("extra1")  # group 2 has one replica: the re-plan gives it a second
            await wait_for(lambda: source.replica("extra1") is not None and source.replica("extra1").state.up)
            assert extra.group == 2 and source.replica("extra1").state.group == 2
            for name in ("a1", "a2"):  # group 0 loses both replicas
                await devices[name].stop()
            await wait_for(lambda: any(d.up and d.device_id not in ("a1", "a2") for d in source.devices if d.group == 0))
            healer = next(d.device_id for d in source.devices if d.group == 0 and d.up)
            assert healer in {"b1", "b2", "c1", "extra1"}
            images = images_batch(5)
            result = await source.infer(images)
            assert result.missing_groups == [] and result.answered_by[0] == healer
            np.testing.assert_allclose(result.logits, expected_logits(bundle, images), rtol=1e-5, atol=1e-5)
            history = source.fleet_status()["history"]
            heal = next(r for r in history if "no live replica" in r["trigger"])
            assert {"device": healer, "to": 0} == {k: v for k, v in heal["moves"][0].items() if k != "from"}
            assert all(any(d.up for d in source.devices if d.group == k) for k in range(3))

    asyncio.run(main())


def test_a_device_back_within_the_grace_period_resumes_its_group_without_a_download_or_a_replan(tmp_path):
    async def main():
        async with joined_source(tmp_path, grace_s=30.0) as (source, join, _):
            devices = {d: join(d, key=f"key-{d}-" + "k" * 16) for members, _ in GROUPS for d in members}
            await wait_for(lambda: sum(d.up for d in source.devices) == len(devices))
            replans = source.fleet_status()["replans"]
            for _ in range(3):  # a flapping device of a group with two replicas
                old = devices["a1"]
                await old.stop()
                await wait_for(lambda: not source.replica("a1").state.up)
                again = devices["a1"] = join("a1", key=old.key, cached=old.cache)
                await wait_for(lambda: source.replica("a1") is not None and source.replica("a1").state.up)
                assert again.group == 0 and again.chunks_received == 0  # its cached model is used
            status = source.fleet_status()
            assert status["replans"] == replans  # no thrash: nobody moved
            assert {m["device_id"]: m["state"] for m in status["members"]}["a1"] == "serving"
            result = await source.infer(images_batch(2))
            assert result.missing_groups == []

    asyncio.run(main())


def test_a_device_away_longer_than_the_grace_period_is_gone_and_re_planned(tmp_path):
    async def main():
        async with joined_source(tmp_path, grace_s=0.3) as (source, join, _):
            devices = {d: join(d) for members, _ in GROUPS for d in members}
            await wait_for(lambda: sum(d.up for d in source.devices) == len(devices))
            await devices["b1"].stop()
            await wait_for(lambda: {m["device_id"]: m["state"] for m in source.fleet_status()["members"]}["b1"] == "gone", timeout_s=10)
            await wait_for(lambda: any(r["trigger"] == "gone: b1" for r in source.fleet_status()["history"]))
            assert all("b1" not in g.devices for g in source.plan.groups)  # the plan no longer counts on it
            assert source.fleet_status()["groups"][1]["live_replicas"] == ["b2"]

    asyncio.run(main())


def test_fleet_status_and_metrics_show_the_membership(tmp_path):
    from typer.testing import CliRunner

    from rocoin.cli.main import app

    async def main():
        async with joined_source(tmp_path, http_listen="127.0.0.1:0") as (source, join, _):
            devices = {d: join(d) for members, _ in GROUPS for d in members}
            await wait_for(lambda: sum(d.up for d in source.devices) == len(devices))
            http = join.ready["http_address"]
            await devices["c1"].stop()  # group 2 loses its only replica: a device of a 2-replica group moves there
            await wait_for(lambda: source.fleet_status()["groups"][2]["live_replicas"] not in ([], ["c1"]))
            result = await asyncio.to_thread(CliRunner().invoke, app, ["fleet", "status", "--source", http])
            assert result.exit_code == 0, result.output
            assert "a1" in result.output and "serving" in result.output and "suspect" in result.output
            as_json = await asyncio.to_thread(CliRunner().invoke, app, ["fleet", "status", "--source", http, "--json"])
            status = json.loads(as_json.output)
            assert sorted(len(g["live_replicas"]) for g in status["groups"]) == [1, 1, 2]
            assert {m["device_id"]: m["state"] for m in status["members"]}["c1"] == "suspect"
            import urllib.request

            text = (await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://{http}/metrics").read())).decode()
            assert 'rocoin_group_live_replicas{group="2"} 1.0' in text
            assert 'rocoin_replans_total{trigger="no_live_replica"} 1.0' in text

    asyncio.run(main())


def test_a_restarted_source_keeps_its_registry_and_takes_its_devices_back(tmp_path):
    async def main():
        keys = {d: f"key-{d}-" + "k" * 16 for members, _ in GROUPS for d in members}
        async with joined_source(tmp_path) as (source, join, _):
            devices = {d: join(d, key=keys[d]) for d in keys}
            await wait_for(lambda: sum(d.up for d in source.devices) == len(devices))
            caches = {d: dev.cache for d, dev in devices.items()}
        (tmp_path / "ready.json").unlink()
        async with joined_source(tmp_path) as (source, join, _):  # the same state directory
            status = source.fleet_status()
            assert {m["device_id"]: m["state"] for m in status["members"]} == {d: "suspect" for d in keys}
            thief = join("a1", key="not-the-key-of-a1-" + "k" * 16)
            again = {d: join(d, key=keys[d], cached=caches[d]) for d in keys}
            await wait_for(lambda: sum(d.up for d in source.devices) == len(again))
            await wait_for(lambda: thief.ended is not None)
            assert thief.ended.code() == grpc.StatusCode.PERMISSION_DENIED  # the binding survived the restart
            assert all(dev.chunks_received == 0 for dev in again.values())  # their cached models were reused
            assert (await source.infer(images_batch(4))).missing_groups == []

    asyncio.run(main())


def test_a_restarted_source_resumes_the_assignment_its_re_plans_made(tmp_path):
    async def main():
        keys = {d: f"key-{d}-" + "k" * 16 for members, _ in GROUPS for d in [*members, "extra1"]}
        async with joined_source(tmp_path, crash=True) as (source, join, _):
            devices = {d: join(d, key=keys[d]) for d in keys}
            await wait_for(lambda: sum(d.up for d in source.devices) == len(devices))
            await wait_for(lambda: source.fleet_status()["replans"] >= 1 and not source.fleet_status()["busy"])
            before = [sorted(g.devices) for g in source.plan.groups]
            assert "extra1" in before[2]  # a re-plan gave the weakest group a second replica
            caches = {d: dev.cache for d, dev in devices.items()}
        (tmp_path / "ready.json").unlink()
        async with joined_source(tmp_path) as (source, join, _):  # the same state directory
            assert [sorted(g.devices) for g in source.plan.groups] == before  # awaited where they served
            again = {d: join(d, key=keys[d], cached=caches[d]) for d in keys}
            await wait_for(lambda: sum(d.up for d in source.devices) == len(again))
            assert again["extra1"].group == 2 and source.replica("extra1").state.group == 2
            assert source.fleet_status()["replans"] == 0  # nobody moved back and forth
            assert (await source.infer(images_batch(4))).missing_groups == []

    asyncio.run(main())


def test_a_move_that_fails_leaves_the_device_out_of_the_plan(tmp_path):
    """A re-plan gives a new device a group; it refuses the model (tampered on its way): the plan
    does not count it as a replica, the group keeps its own device."""

    async def main():
        async with joined_source(tmp_path) as (source, join, _):
            devices = {d: join(d) for members, _ in GROUPS for d in members}
            await wait_for(lambda: sum(d.up for d in source.devices) == len(devices))
            extra = join("extra1")
            extra.tamper = True
            await wait_for(lambda: source.fleet_status()["replans"] >= 1 and not source.fleet_status()["busy"])
            assert source.replica("extra1") is None  # it never served
            assert all("extra1" not in g.devices for g in source.plan.groups)
            assert [m["device_id"] for m in source.fleet_status()["members"] if m["state"] == "serving"] == sorted(devices)
            assert (await source.infer(images_batch(3))).missing_groups == []

    asyncio.run(main())
