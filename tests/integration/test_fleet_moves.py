"""Moves between groups while queries are in flight, and a fleet that mixes devices the source
dials (``address``) with devices that dial the source (``rocoin.v1.Fleet/Join``).

What a user would notice: every query returns; every answer is exactly the pipeline's output for
the groups it says answered (the others zero-filled), so no answer ever puts a device's features
into another group's slots; each group's answer comes from a device that served that group; and
once a lost group is healed the answers are complete again.

The bundle here has three groups of the SAME width (two filters each): a device answering with
another group's model would pass the source's shape check, so only the exact logits (and
``answered_by``) can tell — :func:`test_the_exact_check_tells_the_groups_apart` shows they do.
(With ``test_runtime.GROUPS`` the widths differ and such an answer would be refused as a wrong
shape and show up as a missing group: an exact check could not see it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import grpc  # noqa: E402
import onnxruntime as ort  # noqa: E402
from conftest import device  # noqa: E402
from test_joins import TOKEN, ScriptedDevice, wait_for  # noqa: E402
from test_runtime import NUM_FILTERS, images_batch, make_bundle  # noqa: E402

from rocoin.contracts.fleet import Fleet  # noqa: E402
from rocoin.contracts.manifest import load_manifest  # noqa: E402
from rocoin.runtime.api.server import serve_source  # noqa: E402
from rocoin.runtime.source.membership import Membership  # noqa: E402
from rocoin.runtime.source.source import InferResult, Source  # noqa: E402
from rocoin.runtime.transport.protocol import rocoin_pb2  # noqa: E402
from rocoin.runtime.transport.serde import tensor_from_proto, tensor_to_proto  # noqa: E402

#: Three groups of equal width (2 filters each): an answer in the wrong group's slots has the right shape.
EVEN_GROUPS = [(["a1", "a2"], [0, 3]), (["b1", "b2"], [1, 4]), (["c1"], [2, 5])]
#: Generous: devices stopped or moved fail their queries at once, so no test waits for it; a
#: healthy device on a loaded 2-core machine meets it.
DEADLINE_S = 3.0
LOOPS = 4
TOL = dict(rtol=1e-5, atol=1e-5)


class Reference:
    """The pipeline run locally with onnxruntime (sessions made once): what the source must answer."""

    def __init__(self, bundle: Path, groups=EVEN_GROUPS) -> None:
        self.filters = [f for _, f in groups]
        self.students = [ort.InferenceSession(str(bundle / f"group{k}.onnx")) for k in range(len(groups))]
        self.head = ort.InferenceSession(str(bundle / "head.onnx"))

    def features(self, images: np.ndarray) -> list[np.ndarray]:
        x = ((images.astype(np.float32) / 255.0) - 0.5) / 0.25
        return [s.run(None, {"image": x})[0] for s in self.students]

    def logits(self, images: np.ndarray, missing=frozenset(), slots: dict[int, int] | None = None) -> np.ndarray:
        """``slots`` {k: j}: group j's features put in group k's slots (a wrong-group answer)."""
        features = self.features(images)
        pooled = np.zeros((len(images), NUM_FILTERS), dtype=np.float32)
        for k, filters in enumerate(self.filters):
            if k not in missing:
                pooled[:, filters] = features[(slots or {}).get(k, k)]
        return self.head.run(None, {"pooled": pooled})[0]


class LaggyDevice(ScriptedDevice):
    """A joined device (``test_joins``' scripted protocol) that answers late, across its moves,
    as the real device client may (a move swaps its model while queries wait in its queue or
    run): most queries after ``lag_s``, every third after ``long_lag_s``, with the model it
    served when the query came or, every other time, the model it serves by then. So after a
    move its answers to queries of its old group carry the old group's features or the new
    group's (``late`` counts them); the source must take them for neither group."""

    def __init__(self, *args, lag_s: float = 0.01, long_lag_s: float = 0.4, check_delay_s: float = 0.05, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lag_s, self.long_lag_s, self.check_delay_s = lag_s, long_lag_s, check_delay_s
        self.late = 0
        self._requests = 0  # every device gets every query: they are slow on the same ones
        self._writing = asyncio.Lock()  # one write at a time on the stream
        self._answering: set[asyncio.Task] = set()

    async def _write(self, call, message: rocoin_pb2.DeviceMessage) -> None:
        async with self._writing:
            await call.write(message)

    async def _write_after(self, delay_s: float, call, message: rocoin_pb2.DeviceMessage) -> None:
        await asyncio.sleep(delay_s)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):  # the stream ended meanwhile
            await self._write(call, message)

    def _later(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def on_request(self, call, r: rocoin_pb2.DeviceInferRequest) -> None:
        self._later(self._answer(call, r))

    async def on_health(self, call, reply: rocoin_pb2.HealthReply) -> None:  # a little later, while queries go on
        self._later(self._write_after(self.check_delay_s, call, rocoin_pb2.DeviceMessage(health=reply)))

    async def _answer(self, call, r: rocoin_pb2.DeviceInferRequest) -> None:
        self._requests += 1
        slow, current = self._requests % 3 == 0, self._requests % 6 == 0
        session, group, sha = self.session, self.group, self.sha
        await asyncio.sleep(self.long_lag_s if slow else self.lag_s)
        if self.session is None:
            return  # a spare now: the source expects nothing
        self.late += self.sha != sha
        if current:
            session, group = self.session, self.group
        features = session.run(None, {"image": tensor_from_proto(r.input, max_bytes=1 << 20)})[0]
        reply = rocoin_pb2.DeviceInferResponse(
            query_id=r.query_id, device_id=self.device_id, group=group, features=tensor_to_proto(features)
        )
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):  # the stream ended meanwhile
            await self._write(call, rocoin_pb2.DeviceMessage(answer=reply))

    async def stop(self) -> None:
        for task in list(self._answering):
            task.cancel()
        await super().stop()


@dataclass
class Served:
    images: np.ndarray
    result: InferResult
    started: float  # time.time(), as the re-plan records' ``at``
    ended: float


class Load:
    """``LOOPS`` clients, each with one query in flight at a time, on distinct image batches,
    until :meth:`stop`; any exception from a query ends the test (through :meth:`stop`)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.served: list[Served] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._loop(i)) for i in range(LOOPS)]

    async def _loop(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            images = images_batch(10_000 * (i + 1) + n, batch=1 + n % 3)
            started = time.time()
            result = await self.source.infer(images, query_id=f"load{i}-{n}")
            assert result.query_id == f"load{i}-{n}"
            self.served.append(Served(images, result, started, time.time()))
            n += 1
            await asyncio.sleep(0.005)

    async def more(self, count: int, timeout_s: float = 20.0) -> None:
        """Wait until ``count`` more queries have been answered (and no client failed)."""
        target = len(self.served) + count
        limit = time.monotonic() + timeout_s
        while len(self.served) < target:
            for t in self._tasks:
                if t.done():
                    t.result()  # a client failed: raise its exception here
            assert time.monotonic() < limit, f"only {len(self.served)} of {target} queries answered"
            await asyncio.sleep(0.02)

    async def stop(self) -> list[Served]:
        self._stop.set()
        await asyncio.gather(*self._tasks)  # every query returned; an exception fails the test
        return self.served


@contextlib.asynccontextmanager
async def source_on_loopback(tmp_path: Path, bundle: Path, fleet: Fleet, **options):
    """A source that devices may join (and that dials the fleet's entries with an address)."""
    source = Source(bundle, fleet, deadline_s=DEADLINE_S, token=TOKEN, joins=True)
    stop = asyncio.Event()
    ready = tmp_path / "ready.json"
    server = asyncio.ensure_future(
        serve_source(source, "127.0.0.1:0", ready_file=ready, stop=stop, device_token=TOKEN, state_dir=tmp_path / "state", **options)
    )
    await wait_for(lambda: ready.exists() or server.done())
    if server.done():
        server.result()
    try:
        yield source, json.loads(ready.read_text())["address"]
    finally:
        stop.set()
        await server


def replans(source: Source, needle: str) -> list[dict]:
    return [r for r in source.fleet_status()["history"] if needle in r["trigger"]]


def live(source: Source, group: int) -> list[str]:
    return source.fleet_status()["groups"][group]["live_replicas"]


def settled(source: Source) -> bool:
    return not source.fleet_status()["busy"]


def check_answers(served: list[Served], reference: Reference, in_group: list[set[str]]) -> None:
    """Every answer: the exact logits for the groups it says answered; each answering device one
    that served that group."""
    assert served
    for s in served:
        r = s.result
        missing = set(r.missing_groups)
        np.testing.assert_allclose(r.logits, reference.logits(s.images, missing), **TOL, err_msg=f"{r.query_id} {r.answered_by}")
        for k, by in enumerate(r.answered_by):
            if k in missing:
                assert by == "", (r.query_id, r.answered_by)
            else:
                assert by in in_group[k], (r.query_id, k, by, in_group)


def groups_ever(groups, history: list[dict]) -> list[set[str]]:
    """Each group's devices: those of the bundle's plan and every device a re-plan moved there."""
    members = [set(d) for d, _ in groups]
    for record in history:
        for move in record["moves"]:
            if move["to"] is not None:
                members[move["to"]].add(move["device"])
    return members


def test_the_exact_check_tells_the_groups_apart(tmp_path):
    """The check the tests below rely on: features of one group in another's slots (same shape)
    give other logits."""
    reference = Reference(make_bundle(tmp_path / "bundle", EVEN_GROUPS))
    images = images_batch(3, batch=4)
    right = reference.logits(images)
    for k, j in ((0, 1), (1, 2), (2, 0), (1, 0)):
        wrong = reference.logits(images, slots={k: j})
        assert wrong.shape == right.shape and not np.allclose(wrong, right, **TOL), (k, j)
    assert not np.allclose(reference.logits(images, missing={1}), right, **TOL)


@contextlib.asynccontextmanager
async def joined_fleet(tmp_path: Path, bundle: Path, device_class=ScriptedDevice):
    """A source and the bundle's plan devices, each dialing it (``join(id)`` adds one), all serving."""
    fleet = Fleet(devices=[device(d, 20, 4, 300, 0.1) for members, _ in EVEN_GROUPS for d in members])
    async with source_on_loopback(tmp_path, bundle, fleet, grace_s=60.0) as (source, address):
        devices = {}
        tasks = []

        def join(device_id: str):
            d = devices[device_id] = device_class(address, device_id, key=f"key-{device_id}-" + "k" * 16)
            tasks.append(asyncio.ensure_future(d.run()))
            return d

        for members, _ in EVEN_GROUPS:
            for d in members:
                join(d)
        try:
            await wait_for(lambda: sum(d.up for d in source.devices) == 5)
            yield source, join, devices
        finally:
            for d in devices.values():
                await d.stop()
            for t in tasks:
                t.cancel()


async def join_and_lose_a_group(source: Source, join, devices: dict, load: Load | None = None) -> tuple[dict, dict]:
    """(a) ``extra1`` joins: a re-plan moves it into a group; (b) a group whose two replicas do
    not include it stops: a re-plan heals it with one move. Returns the two re-plan records."""
    join("extra1")
    await wait_for(lambda: any(m["device"] == "extra1" for r in source.fleet_status()["history"] for m in r["moves"]), timeout_s=20)
    await wait_for(lambda: settled(source) and "extra1" in {d.device_id for d in source.devices if d.up}, timeout_s=20)
    (joined,) = [r for r in source.fleet_status()["history"] if any(m["device"] == "extra1" for m in r["moves"])]
    assert [m for m in joined["moves"] if m["device"] == "extra1"][0]["to"] is not None, joined
    if load is not None:
        await load.more(20)
    lost = next(k for k in range(3) if "extra1" not in live(source, k) and len(live(source, k)) == 2)
    victims = live(source, lost)
    for name in victims:
        await devices[name].stop()
    await wait_for(lambda: replans(source, "no live replica") and settled(source), timeout_s=20)
    (heal,) = replans(source, "no live replica")
    assert [m["to"] for m in heal["moves"]] == [lost] and heal["moves"][0]["device"] not in victims, heal
    assert live(source, lost) == [heal["moves"][0]["device"]]
    return joined, heal


def test_queries_in_flight_during_moves_are_all_answered_and_exact(tmp_path):
    """Four clients keep queries in flight while (a) a new device joins and the re-plan moves it
    into a group, and (b) a whole group stops and a move heals it; the devices answer late,
    across their moves, some with the model they serve by then."""
    bundle = make_bundle(tmp_path / "bundle", EVEN_GROUPS)
    reference = Reference(bundle)

    async def main():
        async with joined_fleet(tmp_path, bundle, LaggyDevice) as (source, join, devices):
            load = Load(source)
            try:
                await load.more(20)
                joined, heal = await join_and_lose_a_group(source, join, devices, load)
                await load.more(30)
            finally:
                served = await load.stop()
            history = source.fleet_status()["history"]
            late = sum(d.late for d in devices.values())
        assert history == [joined, heal]  # no other re-plan
        (move,) = heal["moves"]
        lost, healer = move["to"], move["device"]
        assert late >= 1  # the healer answered queries of its old group after its move
        for record in (joined, heal):  # each move happened with queries running before, during and after it
            began = record["at"] - record["seconds"]
            assert sum(s.ended < began for s in served) >= 20
            assert sum(s.started < record["at"] and s.ended > began for s in served) >= 1
            assert sum(s.started > record["at"] for s in served) >= 20
        check_answers(served, reference, groups_ever(EVEN_GROUPS, history))
        before = [s for s in served if s.ended < joined["at"] - joined["seconds"]]
        assert all(s.result.missing_groups == [] for s in before)
        after = [s for s in served if s.started > heal["at"]]
        assert all(s.result.missing_groups == [] for s in after)  # healed: complete again
        assert {s.result.answered_by[lost] for s in after} == {healer}

    asyncio.run(main())


def test_a_move_under_way_is_not_taken_for_a_spare(tmp_path, monkeypatch):
    """The periodic check (every 10 ms here) runs while devices move: a device between its old
    group and its new one is no spare, and no extra re-plan follows a move."""
    init = Membership.__init__

    def checking_often(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.check_interval_s = 0.01

    monkeypatch.setattr(Membership, "__init__", checking_often)
    bundle = make_bundle(tmp_path / "bundle", EVEN_GROUPS)

    async def main():
        async with joined_fleet(tmp_path, bundle) as (source, join, devices):
            joined, heal = await join_and_lose_a_group(source, join, devices)
            await asyncio.sleep(0.2)  # 20 more checks
            assert source.fleet_status()["history"] == [joined, heal]
            assert joined["trigger"] == "device extra1 joined"

    asyncio.run(main())


def member(source, device_id: str) -> tuple[str, int | None]:
    """A member's state and group, as ``/v2/fleet`` shows them."""
    entry = next(m for m in source.fleet_status()["members"] if m["device_id"] == device_id)
    return entry["state"], entry["group"]


def test_a_fleet_mixing_dialed_and_joined_devices_heals_either_kind_of_group(tmp_path):
    """Group 0's devices are dialed by the source (fleet entries with an ``address``: device
    workers on loopback); the others dial the source (the real device client). Every group
    answers, exactly; a joining device cannot take a dialed device's id. Under load, group 2
    (joined devices only) stops: a dialed device is moved there with ``Device.Assign``; then
    group 0's last dialed device stops: a joined device is moved there over its stream. After
    each heal the answers are complete and exact again."""
    from rocoin.runtime.device.join import JoinClient
    from rocoin.runtime.device.server import start_device

    bundle = make_bundle(tmp_path / "bundle", EVEN_GROUPS)
    reference = Reference(bundle)
    sha = [m.sha256 for m in load_manifest(bundle).groups]

    async def main():
        servers = {d: await start_device(bundle, d, token=TOKEN) for d in ("a1", "a2")}
        try:
            fleet = Fleet(
                devices=[
                    device(d, 20, 4, 300, 0.1, **({"address": servers[d].address} if d in servers else {}))
                    for members, _ in EVEN_GROUPS
                    for d in members
                ]
            )
            async with source_on_loopback(tmp_path, bundle, fleet, grace_s=60.0) as (source, address):
                clients = {
                    d: JoinClient(address, device(d, 20, 4, 300, 0.1), tmp_path / "devices" / d, token=TOKEN, seed=1)
                    for d in ("b1", "b2", "c1", "extra1")
                }
                tasks = {d: asyncio.ensure_future(clients[d].run()) for d in ("b1", "b2", "c1")}
                await wait_for(lambda: sum(d.up for d in source.devices) == 5, timeout_s=20)
                tasks["extra1"] = asyncio.ensure_future(clients["extra1"].run())  # beyond the plan: a re-plan places it
                await wait_for(lambda: replans(source, "extra1") and settled(source), timeout_s=20)
                assert [sorted(live(source, k)) for k in range(3)] == [["a1", "a2"], ["b1", "b2"], ["c1", "extra1"]]
                await wait_for(lambda: member(source, "a1") == member(source, "a2") == ("serving", 0))  # dialed: as the source sees them
                images = images_batch(1, batch=3)
                first = await source.infer(images)
                assert first.missing_groups == [] and first.answered_by[0] in ("a1", "a2")
                np.testing.assert_allclose(first.logits, reference.logits(images), **TOL)
                thief = ScriptedDevice(address, "a1", key="another-key-" + "k" * 16)  # a dialed device's id
                thief_task = asyncio.ensure_future(thief.run())
                await wait_for(lambda: thief.ended is not None)
                assert thief.ended.code() == grpc.StatusCode.PERMISSION_DENIED and "dials" in thief.ended.details()
                await thief_task
                await thief.stop()

                load = Load(source)
                try:
                    await load.more(20)
                    for d in ("c1", "extra1"):  # group 2, joined devices only, stops
                        clients[d].stop()
                        await tasks.pop(d)
                    await wait_for(lambda: len(replans(source, "no live replica")) == 1 and settled(source), timeout_s=20)
                    (heal2,) = replans(source, "no live replica")
                    assert heal2["trigger"].startswith("group 2") and heal2["moves"] == [{"device": "a1", "from": 0, "to": 2}]
                    assert servers["a1"].worker.group == 2  # a dialed device, moved with Device.Assign
                    assert member(source, "a1") == ("serving", 2) and source.replica("a1").state.address == servers["a1"].address
                    await load.more(20)
                    await servers["a2"].stop(0)  # group 0 loses its last dialed device
                    await wait_for(lambda: len(replans(source, "no live replica")) == 2 and settled(source), timeout_s=20)
                    await wait_for(lambda: member(source, "a2")[0] == "suspect")  # unreachable (gone after the 60 s grace)
                    heal0 = replans(source, "no live replica")[1]
                    (move,) = heal0["moves"]
                    assert heal0["trigger"].startswith("group 0") and move["from"] == 1 and move["to"] == 0
                    healer = move["device"]
                    assert healer in ("b1", "b2") and clients[healer].group == 0 and clients[healer].model_sha256 == sha[0]
                    await load.more(20)
                finally:
                    served = await load.stop()
                status = source.fleet_status()
                for client in clients.values():
                    client.stop()
                await asyncio.gather(*tasks.values())
        finally:
            for server in servers.values():
                await server.stop(0)
        assert [g["live_replicas"] for g in status["groups"]] == [[healer], [{"b1": "b2", "b2": "b1"}[healer]], ["a1"]]
        history = status["history"]
        assert [r["trigger"] for r in history] == ["device extra1 joined", heal2["trigger"], heal0["trigger"]]
        check_answers(served, reference, groups_ever(EVEN_GROUPS, history))
        for heal, group, by in ((heal2, 2, "a1"), (heal0, 0, healer)):
            after = [s for s in served if s.started > heal["at"]]
            assert sum(s.ended < heal["at"] - heal["seconds"] for s in served) >= 10 and len(after) >= 10
            assert all(s.result.answered_by[group] == by for s in after)
        assert all(s.result.missing_groups == [] for s in served if s.started > heal0["at"])

    asyncio.run(main())


def test_a_dialed_device_the_source_cannot_reach_is_suspect_then_gone_and_serves_again_when_back(tmp_path):
    """A device the source dials has no join stream to tell its state: the membership records
    what the source sees — serving while up, suspect once unreachable, gone after the grace
    period — and takes it back when its worker answers again on the same address."""
    from rocoin.runtime.device.server import start_device

    bundle = make_bundle(tmp_path / "bundle", EVEN_GROUPS)
    reference = Reference(bundle)

    async def main():
        server = await start_device(bundle, "a1", token=TOKEN)
        where = server.address
        try:
            fleet = Fleet(
                devices=[
                    device(d, 20, 4, 300, 0.1, **({"address": where} if d == "a1" else {})) for members, _ in EVEN_GROUPS for d in members
                ]
            )
            async with source_on_loopback(tmp_path, bundle, fleet, grace_s=0.5) as (source, address):
                joined = {d: ScriptedDevice(address, d) for d in ("a2", "b1", "b2", "c1")}
                tasks = [asyncio.ensure_future(d.run()) for d in joined.values()]
                await wait_for(lambda: member(source, "a1") == ("serving", 0), timeout_s=20)
                await server.stop(0)  # the worker dies; its address stays in the fleet file
                await wait_for(lambda: member(source, "a1")[0] == "suspect", timeout_s=10)
                await wait_for(lambda: member(source, "a1")[0] == "gone", timeout_s=10)
                server = await start_device(bundle, "a1", where, token=TOKEN)  # back on the same address
                await wait_for(lambda: member(source, "a1")[0] == "serving" and source.replica("a1").state.up, timeout_s=20)
                images = images_batch(4, batch=2)
                result = await source.infer(images)
                assert result.missing_groups == []
                np.testing.assert_allclose(result.logits, reference.logits(images), **TOL)
                for d in joined.values():
                    await d.stop()
                for t in tasks:
                    t.cancel()
        finally:
            await server.stop(0)

    asyncio.run(main())
