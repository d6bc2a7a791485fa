"""How many devices the source lets join, as an operator sees it: joins beyond the rate (after
the burst) and streams beyond the bound are refused with ``RESOURCE_EXHAUSTED`` and one line,
a refused device dials again and is admitted once there is room, streams still saying hello
count against the bound, and ``rocoin source serve`` refuses bounds it cannot keep."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

pytest.importorskip("onnxruntime")

import grpc  # noqa: E402
from test_cli import bad, run  # noqa: E402
from test_device_join import clients  # noqa: E402
from test_joins import TOKEN, joined_source, profile_json, wait_for  # noqa: E402

from rocoin.contracts.errors import RocoinError  # noqa: E402
from rocoin.runtime.source import join_service  # noqa: E402
from rocoin.runtime.transport.join import JOIN_METHOD, JOIN_PROTOCOL  # noqa: E402
from rocoin.runtime.transport.protocol import rocoin_pb2  # noqa: E402

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@contextlib.asynccontextmanager
async def admission_source(tmp_path, **options):
    """:func:`joined_source` without the bundle: ``(source, join)``."""
    async with joined_source(tmp_path, **options) as (source, join, _):
        yield source, join


class RawStreams:
    """Join streams opened by hand (the device token, nothing sent yet), all closed at the end."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channels: list[grpc.aio.Channel] = []

    def open(self):
        channel = grpc.aio.insecure_channel(self.address)
        self._channels.append(channel)
        return channel.stream_stream(
            JOIN_METHOD,
            request_serializer=rocoin_pb2.DeviceMessage.SerializeToString,
            response_deserializer=rocoin_pb2.SourceMessage.FromString,
        )(metadata=(("authorization", f"Bearer {TOKEN}"),))

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


@contextlib.asynccontextmanager
async def raw_streams(address: str):
    streams = RawStreams(address)
    try:
        yield streams
    finally:
        await streams.close()


def hello(device_id: str, *, protocol: int = JOIN_PROTOCOL) -> rocoin_pb2.DeviceMessage:
    return rocoin_pb2.DeviceMessage(
        hello=rocoin_pb2.JoinHello(
            device_id=device_id, profile_json=profile_json(device_id), protocol=protocol, device_key=f"key-of-{device_id}-" + "k" * 16
        )
    )


async def outcome(call, timeout_s: float = 5.0) -> tuple[grpc.StatusCode, str]:
    """How a stream ended: its status and its one line."""
    code = await asyncio.wait_for(call.code(), timeout_s)
    return code, await call.details()


async def assigned(call, timeout_s: float = 5.0) -> rocoin_pb2.Assignment:
    """The first message the source sends an admitted device: its assignment."""
    message = await asyncio.wait_for(call.read(), timeout_s)
    assert message is not grpc.aio.EOF, await outcome(call)
    assert message.WhichOneof("kind") == "assign", message
    return message.assign


async def settled(device) -> None:
    """Until a scripted device is assigned, or refused."""
    await wait_for(lambda: device.assigned.is_set() or device.ended is not None, timeout_s=5)


def serving(source, device_id: str) -> bool:
    replica = source.replica(device_id)
    return replica is not None and replica.state.up


def connected(source) -> set[str]:
    """The devices ``rocoin fleet status`` shows connected."""
    return {m["device_id"] for m in source.fleet_status()["members"] if m["connected"]}


async def probe(address: str, timeout_s: float = 2.0) -> tuple[grpc.StatusCode, str] | None:
    """How the source answers a new stream that sends nothing (the limits refuse before any
    hello): its status and line, or None if it is still open after ``timeout_s`` (let in)."""
    async with raw_streams(address) as streams:
        call = streams.open()
        try:
            return await outcome(call, timeout_s)
        except asyncio.TimeoutError:
            return None


async def admitted_after_retries(join, device_id: str, timeout_s: float = 5.0):
    """Join ``device_id`` again every 50 ms while the source refuses it, as a device would."""
    limit = time.monotonic() + timeout_s
    while True:
        d = join(device_id)
        await settled(d)
        if d.assigned.is_set():
            return d
        assert d.ended.code() == EXHAUSTED, d.ended  # the source's status, even when it overtook the hello being written
        assert time.monotonic() < limit, f"{device_id}: still refused: {d.ended.details()}"
        await asyncio.sleep(0.05)


def test_joins_beyond_the_burst_are_refused_until_the_bucket_refills(tmp_path):
    rate, burst = 0.5, 2  # one join every 2 s once the burst of 2 is spent

    async def main():
        async with admission_source(tmp_path, max_joins_per_s=rate, join_burst=burst) as (source, join):
            address = join.ready["address"]
            start = time.monotonic()
            for device_id in ("a1", "b1"):  # the burst: both let in
                join(device_id)
            await wait_for(lambda: connected(source) == {"a1", "b1"})
            assert await probe(address) == (EXHAUSTED, "too many joins: try again later")
            refused_again = await probe(address)  # at once: the bucket is still empty
            if time.monotonic() - start < 0.8 / rate:  # (a machine this slow has refilled a token by now)
                assert refused_again == (EXHAUSTED, "too many joins: try again later")
            await wait_for(lambda: serving(source, "a1") and serving(source, "b1"))
            await asyncio.sleep(max(0.0, start + 1.0 / rate + 0.1 - time.monotonic()))  # one token back
            late = join("c1")
            await settled(late)
            assert late.assigned.is_set(), late.ended
            await wait_for(lambda: serving(source, "c1"))
            assert connected(source) == {"a1", "b1", "c1"}

    asyncio.run(main())


def test_at_most_max_join_streams_devices_serve_and_a_freed_slot_admits_the_next(tmp_path):
    async def main():
        async with admission_source(tmp_path, max_join_streams=2) as (source, join):
            a1 = join("a1")
            join("b1")
            await wait_for(lambda: serving(source, "a1") and serving(source, "b1"))
            assert await probe(join.ready["address"]) == (EXHAUSTED, "2 devices connected: at most 2")
            await a1.stop()  # one leaves: its slot is free again
            await admitted_after_retries(join, "c1")
            await wait_for(lambda: serving(source, "c1") and serving(source, "b1"))
            assert connected(source) == {"b1", "c1"}
            assert await probe(join.ready["address"]) == (EXHAUSTED, "2 devices connected: at most 2")  # the bound holds again

    asyncio.run(main())


def test_streams_that_have_not_said_hello_yet_cannot_exceed_the_bound(tmp_path):
    """Five streams open at once and wait (a device has up to HELLO_TIMEOUT_S for its hello):
    with a bound of 2, three are refused before any hello, and only two devices ever serve."""
    ids = ["a1", "a2", "b1", "b2", "c1"]

    async def main():
        async with admission_source(tmp_path, max_join_streams=2) as (source, join):
            async with raw_streams(join.ready["address"]) as streams:
                calls = [streams.open() for _ in ids]
                limit = time.monotonic() + 3.0
                while sum(call.done() for call in calls) < 3 and time.monotonic() < limit:  # the refused end at once
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.2)  # the others wait for their hello
                refused = [i for i, call in enumerate(calls) if call.done()]
                assert len(refused) == 3, f"{len(refused)} of 5 streams refused before their hello: expected 3 (bound 2)"
                for i in refused:
                    assert await outcome(calls[i]) == (EXHAUSTED, "2 devices connected: at most 2")
                waiting = [i for i in range(len(ids)) if i not in refused]
                for i in waiting:
                    await calls[i].write(hello(ids[i]))
                await assigned(calls[waiting[0]])  # admitted (the second gets its turn once the first has its model)
                await wait_for(lambda: connected(source) == {ids[i] for i in waiting})
                assert await probe(join.ready["address"]) == (EXHAUSTED, "2 devices connected: at most 2")  # once joined, too
                assert connected(source) == {ids[i] for i in waiting}

    asyncio.run(main())


def test_every_way_a_stream_ends_gives_its_slot_back(tmp_path, monkeypatch):
    """With room for one stream, each stream below would be refused for want of a slot if the one
    before had kept it: no hello in time, the device hanging up before its hello, a hello the
    source refuses, an id another device owns, a device that served and left."""
    monkeypatch.setattr(join_service, "HELLO_TIMEOUT_S", 0.3)

    async def main():
        async with admission_source(tmp_path, max_join_streams=1) as (source, join):
            owner = join("a1")
            await wait_for(lambda: owner.assigned.is_set())
            await owner.stop()  # served and left
            async with raw_streams(join.ready["address"]) as streams:

                async def next_stream():  # the slot may be freed a moment after the last stream ended
                    limit = time.monotonic() + 5.0
                    while True:
                        call = streams.open()
                        await asyncio.sleep(0.05)
                        if not call.done():
                            return call
                        assert (await outcome(call))[0] == EXHAUSTED
                        assert time.monotonic() < limit, "the slot was never given back"

                call = await next_stream()  # no hello within HELLO_TIMEOUT_S
                assert await outcome(call) == (grpc.StatusCode.INVALID_ARGUMENT, "no hello within 0.3 s")
                call = await next_stream()  # hangs up before its hello
                await call.done_writing()
                assert (await outcome(call))[0] == grpc.StatusCode.OK
                call = await next_stream()  # a hello the source refuses
                await call.write(hello("b1", protocol=JOIN_PROTOCOL + 1))
                assert (await outcome(call))[0] == grpc.StatusCode.FAILED_PRECONDITION
                call = await next_stream()  # a1 is bound to the first device's key
                await call.write(hello("a1"))
                assert (await outcome(call))[0] == grpc.StatusCode.PERMISSION_DENIED
            c1 = await admitted_after_retries(join, "c1")
            assert c1.assigned.is_set()

    asyncio.run(main())


def test_the_real_device_client_keeps_dialing_with_backoff_when_the_source_is_full(tmp_path, monkeypatch):
    """RESOURCE_EXHAUSTED is not a wrong token: the device dials again with a growing backoff
    (never stops on its own) and serves once a slot is free."""
    import rocoin.runtime.device.join as device_join

    attempts: list[int] = []
    monkeypatch.setattr(device_join, "backoff_s", lambda attempt, rng: attempts.append(attempt) or 0.05)

    async def main():
        async with admission_source(tmp_path, max_join_streams=1) as (source, join):
            holder = join("a1")
            await wait_for(lambda: holder.assigned.is_set())
            (client,) = clients(join.ready["address"], tmp_path / "devices", ["c1"]).values()
            task = asyncio.ensure_future(client.run())
            await wait_for(lambda: client.sessions >= 4, timeout_s=5)
            assert not task.done()  # still dialing: not stopped for good
            assert attempts[:3] == [0, 1, 2]  # refused before any assignment: the backoff grows
            assert not client.assigned.is_set()
            await holder.stop()
            await wait_for(lambda: client.assigned.is_set() and serving(source, "c1"))
            client.stop()
            await asyncio.wait_for(task, 10)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-join-streams", "0"], "max_join_streams = 0: Input should be greater than or equal to 1"),
        (["--max-join-streams", "-3"], "max_join_streams = -3"),
        (["--joins-per-s", "-1"], "joins_per_s = -1.0: Input should be greater than 0"),
        (["--joins-per-s", "0"], "joins_per_s = 0.0: Input should be greater than 0"),
        (["--joins-per-s", "nan"], "joins_per_s = nan: Input should be a finite number"),
        (["--forget-after-s", "0"], "forget_after_s = 0.0: Input should be greater than 0"),
        (["--forget-after-s", "inf"], "forget_after_s = inf: Input should be a finite number"),
    ],
)
def test_source_serve_refuses_join_bounds_it_cannot_keep(tmp_path, args, needle):
    bad(run("source", "serve", "--bundle", tmp_path / "bundle", "--fleet", tmp_path / "fleet.yaml", "--joins", *args), needle)


def test_source_serve_shows_the_join_bounds_and_their_defaults():
    from typer.testing import CliRunner

    from rocoin.cli.main import app

    text = CliRunner().invoke(app, ["source", "serve", "--help"], env={"COLUMNS": "250"}).output
    assert "--max-join-streams" in text and "[default: 256]" in text
    assert "--joins-per-s" in text and "[default: 20.0]" in text


@pytest.mark.parametrize(
    ("limits", "needle"),
    [
        ({"max_joins_per_s": 0.0}, "max_joins_per_s = 0.0"),
        ({"max_joins_per_s": float("inf")}, "max_joins_per_s = inf"),
        ({"join_burst": 0}, "join_burst = 0"),
        ({"max_streams": 0}, "max_streams = 0"),
        ({"max_streams": 2.5}, "max_streams = 2.5"),
    ],
)
def test_the_join_service_refuses_limits_it_cannot_keep(limits, needle):
    with pytest.raises(RocoinError, match=needle.replace(".", r"\.")):
        join_service.JoinService(None, token=TOKEN, **limits)


@pytest.mark.parametrize(
    ("limits", "needle"),
    [({"max_join_streams": 0}, "max_join_streams = 0"), ({"max_joins_per_s": float("nan")}, "max_joins_per_s = nan")],
)
def test_serve_source_refuses_join_limits_before_it_opens_anything(tmp_path, limits, needle):
    async def main():
        with pytest.raises(RocoinError, match=needle):
            async with joined_source(tmp_path, **limits):
                pass
        assert not (tmp_path / "state").exists()  # the registry was not opened

    asyncio.run(main())
