"""`rocoin device join`: the real device client against the real source on loopback. It opens no
port; it gets its model in verified chunks, caches it by hash, answers queries and health checks
on its own stream, dials again with backoff when the source goes away, and stops for good when
the source refuses its token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import device
from test_joins import TOKEN, joined_source, wait_for
from test_runtime import GROUPS, INPUT_CHW, expected_logits, images_batch

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fleet import DeviceProfile
from rocoin.contracts.manifest import GroupModel, load_manifest
from rocoin.runtime.device.join import JoinClient, backoff_s, device_key
from rocoin.runtime.device.models import ModelCache, ModelReceiver
from rocoin.runtime.transport.join import (
    INITIAL_JOIN_BACKOFF_S,
    JOIN_PROTOCOL,
    MAX_JOIN_BACKOFF_S,
    MAX_MODEL_BYTES,
    MODEL_CHUNK_BYTES,
)
from rocoin.runtime.transport.protocol import rocoin_pb2, rocoin_pb2_grpc
from rocoin.runtime.transport.serde import tensor_from_proto, tensor_to_proto

PLAN_DEVICES = [d for members, _ in GROUPS for d in members]


def clients(address: str, root: Path, ids=PLAN_DEVICES, token: str = TOKEN) -> dict[str, JoinClient]:
    return {d: JoinClient(address, device(d, 20, 4, 300, 0.1), root / d, token=token, seed=1) for d in ids}


def test_real_devices_join_serve_and_come_back_on_their_own_after_the_source_restarts(tmp_path):
    async def main():
        async with joined_source(tmp_path) as (source, join, bundle):
            devices = clients(join.ready["address"], tmp_path / "devices")
            tasks = [asyncio.ensure_future(c.run()) for c in devices.values()]
            await wait_for(lambda: sum(d.up for d in source.devices) == len(devices))
            images = images_batch(7, batch=3)
            result = await source.infer(images)
            assert result.missing_groups == []
            np.testing.assert_allclose(result.logits, expected_logits(bundle, images), rtol=1e-5, atol=1e-5)
            assert all(c.downloads == 1 and c.model_sha256 for c in devices.values())
            assert (await source.replica("a1").link.check()) == devices["a1"].model_sha256
        # the source went away (its streams ended); a new one on the same state directory
        (tmp_path / "ready.json").unlink()
        async with joined_source(tmp_path) as (source, join, bundle):
            for c in devices.values():  # the new source listens on another port: point the devices at it
                c.source = join.ready["address"]
            await wait_for(lambda: sum(d.up for d in source.devices) == len(devices), timeout_s=30)
            assert all(c.sessions >= 2 and c.downloads == 1 for c in devices.values())  # cached: not sent again
            assert (await source.infer(images_batch(8))).missing_groups == []
            for c in devices.values():
                c.stop()
            await asyncio.gather(*tasks)

    asyncio.run(main())


def test_a_wrong_token_stops_the_device_with_the_sources_reason(tmp_path):
    async def main():
        async with joined_source(tmp_path) as (_, join, _):
            (client,) = clients(join.ready["address"], tmp_path / "devices", ["a1"], token="not-the-device-token-000").values()
            with pytest.raises(RocoinError, match="UNAUTHENTICATED"):
                await asyncio.wait_for(client.run(), 10)
            assert client.sessions == 1  # no retry loop

    asyncio.run(main())


def test_a_corrupted_cached_model_is_refused_and_never_served(tmp_path):
    async def main():
        async with joined_source(tmp_path) as (source, join, _):
            (client,) = clients(join.ready["address"], tmp_path / "devices", ["c1"]).values()
            task = asyncio.ensure_future(client.run())
            await wait_for(lambda: client.assigned.is_set())
            client.stop()
            await task
            (cached,) = client.cache.hashes()
            path = client.cache.path(cached)
            data = bytearray(path.read_bytes())
            data[-1] ^= 1
            path.write_bytes(bytes(data))  # the device's disk was tampered with
            again = clients(join.ready["address"], tmp_path / "devices", ["c1"])["c1"]
            task = asyncio.ensure_future(again.run())
            await asyncio.sleep(1.5)
            assert again.worker is None and again.model_sha256 == ""
            replica = source.replica("c1")
            assert replica is None or not replica.state.up
            assert 2 in (await source.infer(images_batch(1), deadline_s=0.2)).missing_groups
            again.stop()
            await task

    asyncio.run(main())


def test_backoff_grows_with_full_jitter_up_to_its_cap():
    rng = random.Random(0)
    waits = [[backoff_s(attempt, rng) for _ in range(200)] for attempt in range(12)]
    for attempt, sample in enumerate(waits):
        cap = min(MAX_JOIN_BACKOFF_S, INITIAL_JOIN_BACKOFF_S * 2**attempt)
        assert 0.0 <= min(sample) and max(sample) <= cap
        assert max(sample) > 0.8 * cap and len(set(sample)) == len(sample)  # spread over [0, cap]: jitter
    assert np.mean(waits[5]) > 4 * np.mean(waits[1])


def test_the_device_key_is_made_once_and_kept_private(tmp_path):
    key = device_key(tmp_path)
    assert device_key(tmp_path) == key and len(key) >= 32
    assert (tmp_path / "device-key").stat().st_mode & 0o077 == 0


def receiver_for(tmp_path: Path, bundle: Path, group: int = 0) -> tuple[ModelReceiver, bytes]:
    model = load_manifest(bundle).groups[group]
    assignment = rocoin_pb2.Assignment(group=group, model_json=model.model_dump_json(), send_model=True, epoch=3)
    return ModelReceiver(ModelCache(tmp_path / "cache"), assignment), (bundle / model.file).read_bytes()


def test_the_receiver_refuses_chunks_out_of_order_for_another_model_or_past_the_size(tmp_path):
    from test_runtime import make_bundle

    bundle = make_bundle(tmp_path / "bundle")
    receiver, data = receiver_for(tmp_path, bundle)
    sha = receiver.model.sha256
    receiver.abort()
    for chunk, needle in (
        (rocoin_pb2.ModelChunk(sha256=sha, offset=5, data=data[5:10]), "offset 5"),
        (rocoin_pb2.ModelChunk(sha256="0" * 64, offset=0, data=data), "for model"),
        (rocoin_pb2.ModelChunk(sha256=sha, offset=0, data=data + b"x"), "more than"),
    ):
        receiver, _ = receiver_for(tmp_path, bundle)
        with pytest.raises(RocoinError, match=needle):
            receiver.add(chunk)
        assert not list((tmp_path / "cache").glob(".incoming-*"))  # the partial file is gone
    receiver, _ = receiver_for(tmp_path, bundle)
    for offset in range(0, len(data), MODEL_CHUNK_BYTES):
        receiver.add(rocoin_pb2.ModelChunk(sha256=sha, offset=offset, data=data[offset : offset + MODEL_CHUNK_BYTES]))
    folder, model, _ = receiver.finish()
    assert (folder / model.file).read_bytes() == data and ModelCache(tmp_path / "cache").hashes() == [sha]
    tampered, _ = receiver_for(tmp_path, bundle)
    tampered.add(rocoin_pb2.ModelChunk(sha256=sha, offset=0, data=data[:-1] + bytes([data[-1] ^ 1])))
    with pytest.raises(RocoinError, match="SHA-256"):
        tampered.finish()


def test_the_cache_keeps_the_most_recent_models(tmp_path):
    cache = ModelCache(tmp_path, max_models=2)
    for i in range(3):
        part = tmp_path / f"part{i}"
        part.write_bytes(b"x" * (i + 1))
        cache.store(part, f"{i:064d}")
    assert cache.hashes() == [f"{1:064d}", f"{2:064d}"]


def test_a_dialed_device_is_moved_with_assign_and_reports_its_model(tmp_path):
    from test_runtime import make_bundle

    from rocoin.runtime.device.server import start_device
    from rocoin.runtime.source.link import GrpcStreamLink

    async def main():
        bundle = make_bundle(tmp_path / "bundle")
        manifest = load_manifest(bundle)
        server = await start_device(bundle, "a1", token=TOKEN)
        link = GrpcStreamLink(server.address, options=[], metadata=(("authorization", f"Bearer {TOKEN}"),), max_message_bytes=1 << 20)
        try:
            assert await link.check() == manifest.groups[0].sha256
            # from its bundle (no chunks), then with chunks
            assert await link.assign(2, manifest.groups[2], bundle / manifest.groups[2].file, send_model=False) == manifest.groups[2].sha256
            assert await link.check() == manifest.groups[2].sha256 and server.worker.group == 2
            assert await link.assign(1, manifest.groups[1], bundle / manifest.groups[1].file, send_model=True) == manifest.groups[1].sha256
            assert server.worker.group == 1 and server.worker.output_size == len(manifest.groups[1].filters)
            bad = manifest.groups[0].model_copy(update={"sha256": "f" * 64})
            with pytest.raises(RocoinError, match="SHA-256"):
                await link.assign(0, bad, bundle / manifest.groups[0].file, send_model=True)
            assert await link.check() == manifest.groups[1].sha256  # the refused model changed nothing
        finally:
            await link.close()
            await server.stop(0)

    asyncio.run(main())


_ = grpc


def test_device_join_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from rocoin.cli.main import app

    monkeypatch.delenv("ROCOIN_DEVICE_TOKEN", raising=False)
    entry = tmp_path / "entry.yaml"
    entry.write_text("id: other\nflops: 2.0e7\nmemory_bytes: 4194304\nrate_bps: 300000\noutage: 0.1\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: a1\nflops: -1\nmemory_bytes: 4194304\nrate_bps: 300000\noutage: 0.1\n")
    base = ["device", "join", "--source", "127.0.0.1:1"]
    for args, needle in (
        ([*base], "--device-id"),
        ([*base, "--id", "a1"], "no token"),
        ([*base, "--id", "a1", "--insecure"], "--profile"),
        ([*base, "--id", "a1", "--insecure", "--profile", str(tmp_path / "missing.yaml")], "not found"),
        ([*base, "--id", "a1", "--insecure", "--profile", str(entry)], "differs from --device-id"),
        ([*base, "--id", "a1", "--insecure", "--intra-op-threads", "2"], "--profile"),  # the alias of --threads parses
        ([*base, "--id", "a1", "--insecure", "--profile", str(bad)], "flops"),
        ([*base, "--id", "a1", "--measure", "--tls-cert", str(entry), "--tls-key", str(entry)], "--tls-ca"),
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output
        if needle != "--device-id":  # click's own usage errors (a missing option) come in its box
            errors = [line for line in result.output.splitlines() if not line.startswith("rocoin: WARNING")]
            assert len(errors) == 1 and errors[0].startswith("error: ") and needle in errors[0], result.output


def test_a_local_cluster_of_joining_processes_heals_a_group_killed_whole(tmp_path):
    from test_runtime import fleet_for, make_bundle

    from rocoin.contracts.fleet import Fleet
    from rocoin.runtime.api.client import fetch_fleet_status
    from rocoin.runtime.cluster.local import LocalCluster

    bundle = make_bundle(tmp_path / "bundle")
    fleet = Fleet(devices=[*fleet_for().devices, device("spare", 20, 4, 300, 0.1)])
    with LocalCluster(bundle, fleet, tmp_path / "state", joins=True, spares=["spare"]) as cluster:
        http = cluster.state.source.http_address
        before = fetch_fleet_status(http)
        # behind NAT: a joined device opens no port at all (the source, which does, shows the check sees ports)
        assert listening_ports(cluster.processes["source"].pid)
        assert {d: listening_ports(p.pid) for d, p in cluster.processes.items() if d != "source"} == {d: [] for d in fleet.ids}
        group = next(g for g in before["groups"] if len(g["live_replicas"]) == 2)
        for victim in group["live_replicas"]:
            cluster.kill_device(victim)  # SIGKILL: the whole group is gone
        killed = time.monotonic()
        while True:
            live = fetch_fleet_status(http)["groups"][group["group"]]["live_replicas"]
            if live and not set(live) & set(group["live_replicas"]):
                break
            assert time.monotonic() - killed < 15, live
            time.sleep(0.05)
        result = asyncio.run(_one_query(cluster.state.source.address))
        assert result.missing_groups == []
        assert not any((tmp_path / "state").glob("*.entry.yaml.tmp*"))


def listening_ports(pid: int) -> list[int]:
    """The TCP ports process ``pid`` listens on (from /proc: its socket descriptors matched
    against the LISTEN entries of its network namespace's tcp tables)."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                sockets.add(target[len("socket:[") : -1])
    ports = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in sockets:  # st 0A: LISTEN; field 9: the socket's inode
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


async def _one_query(address: str):
    from rocoin.runtime.api.client import run_queries  # noqa: F401 - the client module is what users call

    channel = grpc.aio.insecure_channel(address)
    from rocoin.runtime.transport.protocol import rocoin_pb2_grpc
    from rocoin.runtime.transport.serde import tensor_to_proto

    try:
        stub = rocoin_pb2_grpc.SourceStub(channel)
        return await stub.Infer(rocoin_pb2.SourceInferRequest(input=tensor_to_proto(images_batch(3))), timeout=10)
    finally:
        await channel.close()


# --------------------------------------------------------------------------- against a fake source
# A scripted ``rocoin.v1.Fleet`` servicer: the tests below say what the source sends and check what
# the device answers, message by message, without the real source (its membership and gather).


class FakeStream:
    """One Join stream as the fake source sees it."""

    def __init__(self, hello: rocoin_pb2.JoinHello) -> None:
        self.hello = hello
        self.outbox: asyncio.Queue = asyncio.Queue()  # SourceMessage, None (end OK) or a StatusCode (abort)
        self.inbox: asyncio.Queue = asyncio.Queue()  # DeviceMessage after the hello

    def send(self, **kind) -> None:
        self.outbox.put_nowait(rocoin_pb2.SourceMessage(**kind))

    def end(self, code: grpc.StatusCode | None = None) -> None:
        self.outbox.put_nowait(code)

    async def expect(self, kind: str, timeout_s: float = 10.0):
        message = await asyncio.wait_for(self.inbox.get(), timeout_s)
        assert message.WhichOneof("kind") == kind, message
        return getattr(message, kind)

    def assign(self, group: int, model: GroupModel | None, epoch: int, *, data: bytes | None = None, chunk: int = 97) -> None:
        """An assignment; with ``data``, the model's bytes follow in ``chunk``-byte chunks."""
        self.send(
            assign=rocoin_pb2.Assignment(
                group=group, model_json=model.model_dump_json() if model else "", send_model=data is not None, epoch=epoch
            )
        )
        for offset in range(0, len(data or b""), chunk):
            self.send(chunk=rocoin_pb2.ModelChunk(sha256=model.sha256, offset=offset, data=data[offset : offset + chunk]))

    async def ready(self, epoch: int) -> rocoin_pb2.ModelReady:
        ready = await self.expect("ready")
        assert ready.epoch == epoch
        return ready

    async def health(self) -> str:
        nonce = f"n{random.random()}"
        self.send(health=rocoin_pb2.HealthCheck(nonce=nonce))
        reply = await self.expect("health")
        assert reply.nonce == nonce
        return reply.model_sha256

    async def query(self, query_id: str, batch: np.ndarray) -> rocoin_pb2.DeviceInferResponse:
        self.send(request=rocoin_pb2.DeviceInferRequest(query_id=query_id, input=tensor_to_proto(batch)))
        answer = await self.expect("answer")
        assert answer.query_id == query_id
        return answer


class FakeSource(rocoin_pb2_grpc.FleetServicer):
    def __init__(self, *, mtls: bool = False) -> None:
        self.streams: asyncio.Queue[FakeStream] = asyncio.Queue()
        self.opened = 0
        self.mtls = mtls  # admit by the client certificate instead of the token

    async def Join(self, request_iterator, context):
        self.opened += 1
        if self.mtls:
            if not context.auth_context().get("x509_common_name"):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        elif dict(context.invocation_metadata()).get("authorization") != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no or a wrong device token")
        first = await context.read()
        stream = FakeStream(first.hello)
        self.streams.put_nowait(stream)

        async def read():
            while (message := await context.read()) is not grpc.aio.EOF:
                stream.inbox.put_nowait(message)

        reader = asyncio.ensure_future(read())
        try:
            while (message := await stream.outbox.get()) is not None:
                if isinstance(message, grpc.StatusCode):
                    await context.abort(message, "the fake source broke the stream")
                await context.write(message)
        finally:
            reader.cancel()

    async def next_stream(self, timeout_s: float = 10.0) -> FakeStream:
        return await asyncio.wait_for(self.streams.get(), timeout_s)


@contextlib.asynccontextmanager
async def fake_source(tmp_path: Path, server_tls=None, **client_options):
    """The fake source on 127.0.0.1 (port 0; TLS with ``server_tls``), a bundle, and a JoinClient
    of device a1 running against it."""
    from test_runtime import make_bundle

    bundle = make_bundle(tmp_path / "bundle")
    fake = FakeSource(mtls=server_tls is not None and server_tls.client_ca is not None)
    server = grpc.aio.server()
    rocoin_pb2_grpc.add_FleetServicer_to_server(fake, server)
    if server_tls is not None:
        port = server.add_secure_port("127.0.0.1:0", server_tls.credentials())
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    options = {"token": TOKEN, "seed": 1, **client_options}
    client = JoinClient(f"127.0.0.1:{port}", device("a1", 20, 4, 300, 0.1), tmp_path / "device", **options)
    task = asyncio.ensure_future(client.run())
    try:
        yield fake, client, task, bundle
    finally:
        client.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await server.stop(0)


def features_of(bundle: Path, model: GroupModel, batch: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(bundle / model.file)).run(None, {"image": batch})[0]


def features(answer: rocoin_pb2.DeviceInferResponse) -> np.ndarray:
    return tensor_from_proto(answer.features, max_bytes=1 << 20)


def a_batch(seed: int, size: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(size, *INPUT_CHW)).astype(np.float32)


def test_with_a_fake_source_the_device_joins_gets_its_model_in_chunks_serves_it_and_moves(tmp_path):
    async def main():
        async with fake_source(tmp_path) as (fake, client, _, bundle):
            manifest = load_manifest(bundle)
            stream = await fake.next_stream()
            hello = stream.hello
            assert hello.device_id == "a1" and hello.protocol == JOIN_PROTOCOL and list(hello.cached_models) == []
            assert len(hello.device_key) >= 32
            profile = DeviceProfile.model_validate({"id": "a1", **json.loads(hello.profile_json)})
            assert profile == device("a1", 20, 4, 300, 0.1) and "address" not in hello.profile_json
            assert await stream.health() == ""  # nothing served yet

            first = manifest.groups[1]
            data = (bundle / first.file).read_bytes()
            stream.assign(1, first, epoch=1, data=data)  # many 97-byte chunks
            ready = await stream.ready(1)
            assert ready.error == "" and ready.sha256 == first.sha256
            assert client.cache.path(first.sha256).read_bytes() == data and client.downloads == 1
            assert await stream.health() == first.sha256
            batch = a_batch(0)
            answer = await stream.query("q1", batch)
            assert answer.error_code == 0 and answer.group == 1 and answer.device_id == "a1"
            np.testing.assert_allclose(features(answer), features_of(bundle, first, batch), rtol=1e-6, atol=1e-6)
            bad = await stream.query("q2", a_batch(0)[:, :, :4])  # the worker's own checks: an answer with the error
            assert bad.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "input.shape" in bad.error
            assert not bad.HasField("features")

            second = manifest.groups[2]  # moved: the new model swaps in, answers name the new group
            stream.assign(2, second, epoch=2, data=(bundle / second.file).read_bytes(), chunk=MODEL_CHUNK_BYTES)
            assert (await stream.ready(2)).sha256 == second.sha256
            answer = await stream.query("q3", batch)
            assert answer.group == 2
            np.testing.assert_allclose(features(answer), features_of(bundle, second, batch), rtol=1e-6, atol=1e-6)

            stream.assign(-1, None, epoch=3)  # a spare: serves nothing
            spare = await stream.ready(3)
            assert spare.sha256 == "" and spare.error == ""
            assert await stream.health() == ""
            refused = await stream.query("q4", batch)
            assert refused.error_code == grpc.StatusCode.UNAVAILABLE.value[0] and not refused.HasField("features")

    asyncio.run(main())


def test_with_a_fake_source_a_rejoin_after_a_broken_stream_takes_the_model_from_the_cache(tmp_path):
    async def main():
        async with fake_source(tmp_path) as (fake, client, _, bundle):
            model = load_manifest(bundle).groups[0]
            stream = await fake.next_stream()
            stream.assign(0, model, epoch=1, data=(bundle / model.file).read_bytes())
            assert (await stream.ready(1)).sha256 == model.sha256
            stream.end(grpc.StatusCode.UNAVAILABLE)  # the connection broke
            again = await fake.next_stream()
            assert list(again.hello.cached_models) == [model.sha256] and again.hello.device_key == stream.hello.device_key
            again.assign(0, model, epoch=1)  # send_model=False: the device has it
            assert (await again.ready(1)).sha256 == model.sha256
            assert client.downloads == 1 and client.sessions == 2
            batch = a_batch(1, 3)
            answer = await again.query("q", batch)
            np.testing.assert_allclose(features(answer), features_of(bundle, model, batch), rtol=1e-6, atol=1e-6)
            assert await again.health() == model.sha256

    asyncio.run(main())


def tampered(data: bytes, model: GroupModel, case: str) -> tuple[GroupModel, list[rocoin_pb2.ModelChunk]]:
    """A model entry and the chunks a broken or malicious source sends for it."""

    def chunks(body: bytes, sha: str = model.sha256, skip: int = 0) -> list[rocoin_pb2.ModelChunk]:
        return [rocoin_pb2.ModelChunk(sha256=sha, offset=o + skip, data=body[o : o + 50]) for o in range(0, len(body), 50)]

    if case == "one byte changed":
        return model, chunks(data[:-1] + bytes([data[-1] ^ 1]))
    if case == "longer than its size":
        return model.model_copy(update={"size_bytes": len(data) - 1}), chunks(data)
    if case == "an offset skipped":
        return model, chunks(data[:50]) + chunks(data[100:], skip=100)
    if case == "a chunk of another model":
        return model, chunks(data[:50]) + chunks(data[50:], sha="e" * 64)
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("one byte changed", "SHA-256"),
        ("longer than its size", "more than"),
        ("an offset skipped", "offset 100: expected 50"),
        ("a chunk of another model", "for model"),
    ],
)
def test_with_a_fake_source_a_bad_model_is_refused_never_served_and_the_stream_goes_on(tmp_path, case, needle):
    async def main():
        async with fake_source(tmp_path) as (fake, client, _, bundle):
            model = load_manifest(bundle).groups[0]
            data = (bundle / model.file).read_bytes()
            stream = await fake.next_stream()
            entry, chunks = tampered(data, model, case)
            stream.send(assign=rocoin_pb2.Assignment(group=0, model_json=entry.model_dump_json(), send_model=True, epoch=1))
            for chunk in chunks:
                stream.send(chunk=chunk)
            ready = await stream.ready(1)
            assert needle in ready.error and "\n" not in ready.error and ready.sha256 == ""
            assert await stream.health() == ""
            answer = await stream.query("q", a_batch(2))
            assert answer.error_code == grpc.StatusCode.UNAVAILABLE.value[0] and not answer.HasField("features")
            assert client.cache.hashes() == [] and not list(client.cache.folder.glob(".incoming-*"))  # nothing kept
            stream.assign(0, model, epoch=2, data=data)  # the same stream: a good model is taken
            assert (await stream.ready(2)).sha256 == model.sha256
            assert (await stream.query("q2", a_batch(2))).error_code == 0
            assert client.sessions == 1

    asyncio.run(main())


def test_with_a_fake_source_a_model_neither_sent_nor_cached_or_too_large_is_refused(tmp_path):
    async def main():
        async with fake_source(tmp_path) as (fake, client, _, bundle):
            model = load_manifest(bundle).groups[0]
            stream = await fake.next_stream()
            stream.assign(0, model, epoch=1)  # send_model=False but the cache is empty
            assert "not in this device's cache" in (await stream.ready(1)).error
            huge = model.model_copy(update={"size_bytes": MAX_MODEL_BYTES + 1})
            stream.send(assign=rocoin_pb2.Assignment(group=0, model_json=huge.model_dump_json(), send_model=True, epoch=2))
            assert "at most" in (await stream.ready(2)).error
            stream.send(assign=rocoin_pb2.Assignment(group=0, model_json='{"group": 0}', send_model=True, epoch=3))
            assert "model_json" in (await stream.ready(3)).error
            assert client.worker is None and client.sessions == 1

    asyncio.run(main())


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    root = tmp_path_factory.mktemp("certs")
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_certs.sh"
    for name in ("good", "other"):
        subprocess.run(["bash", str(script), str(root / name)], check=True, capture_output=True)
    return root


def test_with_a_fake_source_the_device_joins_over_mtls_and_a_wrong_ca_never_gets_through(tmp_path, certs):
    from rocoin.runtime.transport.tls import ClientTLS, ServerTLS

    good, other = certs / "good", certs / "other"
    server_tls = ServerTLS(good / "device.pem", good / "device.key", good / "ca.pem")  # the fake source's certificate

    async def main():
        mtls = ClientTLS(good / "ca.pem", good / "source.pem", good / "source.key")  # the device's client certificate
        async with fake_source(tmp_path / "good", server_tls, token=None, tls=mtls) as (fake, client, _, bundle):
            model = load_manifest(bundle).groups[0]
            stream = await fake.next_stream()
            stream.assign(0, model, epoch=1, data=(bundle / model.file).read_bytes())
            assert (await stream.ready(1)).sha256 == model.sha256
            assert (await stream.query("q", a_batch(4))).error_code == 0
        wrong = ClientTLS(other / "ca.pem", other / "source.pem", other / "source.key")
        async with fake_source(tmp_path / "other", server_tls, token=None, tls=wrong) as (fake, client, task, _):
            await wait_for(lambda: client.sessions >= 2)  # the handshake fails: dialed again (maybe a transient failure)
            assert fake.opened == 0 and not task.done()

    asyncio.run(main())


def test_with_a_fake_source_a_wrong_token_stops_the_device_at_once(tmp_path):
    async def main():
        async with fake_source(tmp_path, token="a-wrong-token-0123456789") as (fake, client, task, _):
            with pytest.raises(RocoinError, match="UNAUTHENTICATED: no or a wrong device token") as error:
                await asyncio.wait_for(task, 10)
            assert "\n" not in str(error.value)
            assert fake.opened == 1 and client.sessions == 1  # no retry loop

    asyncio.run(main())


def test_the_backoff_starts_over_once_a_stream_was_assigned_even_if_it_broke(tmp_path, monkeypatch):
    import rocoin.runtime.device.join as join

    attempts: list[int] = []
    monkeypatch.setattr(join, "backoff_s", lambda attempt, rng: attempts.append(attempt) or 0.01)

    async def main():
        async with fake_source(tmp_path) as (fake, client, _, _):
            for _ in range(3):  # refused before any assignment: the backoff grows
                (await fake.next_stream()).end(grpc.StatusCode.UNAVAILABLE)
            stream = await fake.next_stream()
            stream.assign(-1, None, epoch=1)
            await stream.ready(1)
            stream.end(grpc.StatusCode.UNAVAILABLE)  # assigned, then broken: start over
            (await fake.next_stream()).end(grpc.StatusCode.UNAVAILABLE)
            await fake.next_stream()
            assert attempts == [0, 1, 2, 0, 1]

    asyncio.run(main())


def test_stop_ends_a_device_waiting_to_dial_again(tmp_path):
    async def main():
        client = JoinClient("127.0.0.1:1", device("a1", 20, 4, 300, 0.1), tmp_path / "device", token=TOKEN, seed=1)
        task = asyncio.ensure_future(client.run())  # nobody listens there: it keeps dialing
        await wait_for(lambda: client.sessions >= 2)
        client.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_a_partial_download_left_by_a_killed_device_is_deleted_when_it_starts_again(tmp_path):
    models = tmp_path / "device" / "models"
    models.mkdir(parents=True)
    (models / ".incoming-abc.part").write_bytes(b"half a model")
    JoinClient("127.0.0.1:1", device("a1", 20, 4, 300, 0.1), tmp_path / "device", token=TOKEN)
    assert list(models.iterdir()) == []


def test_a_request_running_while_the_model_is_swapped_finishes_on_its_model_and_names_its_group(tmp_path):
    import dataclasses

    from test_runtime import make_bundle

    from rocoin.runtime.device.join import _Stream
    from rocoin.runtime.device.servicer import DeviceWorker

    class Slow:
        def __init__(self, runner) -> None:
            self.runner = runner

        def run(self, batch):
            time.sleep(0.4)
            return self.runner.run(batch)

    async def main():
        bundle = make_bundle(tmp_path / "bundle")
        manifest = load_manifest(bundle)
        worker = DeviceWorker(bundle, "a1")  # group 0: 2 filters
        worker._serving = dataclasses.replace(worker._serving, runner=Slow(worker._serving.runner), run_s_per_image=1.0)
        answers: asyncio.Queue = asyncio.Queue()
        stream = _Stream(answers.put)
        serving = asyncio.ensure_future(worker.InferStream(None, stream))
        batch = a_batch(3)
        stream.requests.put_nowait(rocoin_pb2.DeviceInferRequest(query_id="old", input=tensor_to_proto(batch)))
        await asyncio.sleep(0.1)  # running in the thread pool
        worker.serve(bundle, manifest.groups[1], 1.0)  # 3 filters
        stream.requests.put_nowait(rocoin_pb2.DeviceInferRequest(query_id="new", input=tensor_to_proto(batch)))
        got = {}
        for _ in range(2):
            answer = (await asyncio.wait_for(answers.get(), 5)).answer
            got[answer.query_id] = answer
        stream.requests.put_nowait(grpc.aio.EOF)
        await serving
        worker.close()
        assert got["old"].error == "" and got["old"].group == 0
        np.testing.assert_allclose(features(got["old"]), features_of(bundle, manifest.groups[0], batch), rtol=1e-6)
        assert got["new"].group == 1 and features(got["new"]).shape == (2, 3)

    asyncio.run(main())


def test_the_join_modules_import_without_torch_or_training_code():
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import rocoin.runtime.device.join, rocoin.runtime.device.models, rocoin.runtime.device.profiling, rocoin.runtime.device.options\n"
        "training = ('rocoin.distillation', 'rocoin.models.wrn', 'rocoin.models.mobilenetv2', 'rocoin.models.registry', 'rocoin.data')\n"
        "bad = sorted(m for m, mod in sys.modules.items() if mod is not None and (m.split('.')[0] == 'torch' or m.startswith(training)))\n"
        "assert not bad, bad\n"
    )
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_measure_times_the_link_with_probes_the_source_reads_whole_even_when_its_client_api_is_locked(tmp_path, monkeypatch):
    """``rocoin device join --measure`` times its uplink with ``Fleet.Probe`` (admitted with the
    device token), so a source whose client API needs another token still gives a real rate; a
    wrong device token is one clear error."""
    from rocoin.runtime.device import profiling
    from rocoin.runtime.source.join_service import JoinService

    received: list[int] = []
    original = JoinService.probe

    async def counting(self, request, context):
        reply = await original(self, request, context)
        received.append(reply.received_bytes)
        return reply

    monkeypatch.setattr(JoinService, "probe", counting)
    monkeypatch.setattr(profiling, "PROBES", 5)

    async def main():
        async with joined_source(tmp_path, api_token="the-client-api-token-0123456789") as (_, join, _):
            address = join.ready["address"]
            rate_bps, loss = await asyncio.to_thread(profiling.measure_link, address, token=TOKEN)
            assert rate_bps > 0 and loss == 0
            sizes = [profiling.SMALL_PAYLOAD_BYTES] * (1 + profiling.RATE_REPEATS) + [
                profiling.LARGE_PAYLOAD_BYTES
            ] * profiling.RATE_REPEATS
            assert received == sizes  # every timed message was read whole by the source
            with pytest.raises(RocoinError, match="refused the link probe \\(UNAUTHENTICATED"):
                await asyncio.to_thread(profiling.measure_link, address, token="not-the-device-token-000")
            entry = await asyncio.to_thread(profiling.measure_join_profile, "cam-9", address, token=TOKEN)
            assert entry.id == "cam-9" and entry.rate_bps > 0 and entry.flops > 0 and entry.address is None

    asyncio.run(main())
