"""`rocoin device join`: the real device client against the real source on loopback. It opens no
port; it gets its model in verified chunks, caches it by hash, answers queries and health checks
on its own stream, dials again with backoff when the source goes away, and stops for good when
the source refuses its token."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import device
from test_joins import TOKEN, joined_source, wait_for
from test_runtime import GROUPS, expected_logits, images_batch

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.manifest import load_manifest
from rocoin.runtime.device.join import JoinClient, backoff_s, device_key
from rocoin.runtime.device.models import ModelCache, ModelReceiver
from rocoin.runtime.transport.join import INITIAL_JOIN_BACKOFF_S, MAX_JOIN_BACKOFF_S, MODEL_CHUNK_BYTES
from rocoin.runtime.transport.protocol import rocoin_pb2

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
    base = ["device", "join", "--source", "127.0.0.1:1"]
    for args, needle in (
        ([*base], "--device-id"),
        ([*base, "--id", "a1"], "no token"),
        ([*base, "--id", "a1", "--insecure"], "--profile"),
        ([*base, "--id", "a1", "--insecure", "--profile", str(tmp_path / "missing.yaml")], "not found"),
        ([*base, "--id", "a1", "--insecure", "--profile", str(entry)], "differs from --device-id"),
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output


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
