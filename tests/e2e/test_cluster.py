"""The runtime as processes: a local cluster of device workers and a source, with real kills,
the CLI against it, and device profiling. Helpers are shared with tests/integration/test_runtime.py."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("grpc_health")

import grpc  # noqa: E402
from test_runtime import (  # noqa: E402
    DEADLINE_S,
    LATE_SLACK_S,
    PROBE_INTERVAL_S,
    RECOVERY_LIMIT_S,
    expected_logits,
    fleet_for,
    images_batch,
    make_bundle,
    with_addresses,
)

from rocoin.runtime.cluster.local import LocalCluster  # noqa: E402
from rocoin.runtime.source.source import Source  # noqa: E402
from rocoin.runtime.transport.protocol import rocoin_pb2, rocoin_pb2_grpc  # noqa: E402


@pytest.fixture
def cluster(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    with LocalCluster(bundle, fleet_for(), tmp_path / "state", with_source=False) as running:
        yield running


def test_queries_survive_replica_deaths_and_whole_groups_go_missing_by_the_deadline(cluster):
    bundle = cluster.bundle

    async def scenario():
        async with Source(bundle, with_addresses(cluster), deadline_s=DEADLINE_S, token=cluster.token) as source:
            results = []
            for i in range(30):
                if i == 10:
                    cluster.kill_device("a1")  # SIGKILL: a replica of group 0
                if i == 20:
                    cluster.kill_device("b2")  # a replica of group 1
                results.append(await source.infer(images_batch(i)))
            # every group kept a live replica: every answer complete and exact
            for i, result in enumerate(results):
                assert result.missing_groups == [], (i, result)
                np.testing.assert_allclose(result.logits, expected_logits(bundle, images_batch(i)), rtol=1e-5, atol=1e-6)
            cluster.kill_device("c1")  # group 2's only device
            for i in range(30, 45):
                result = await source.infer(images_batch(i))
                assert result.missing_groups == [2]
                assert result.latency_s <= DEADLINE_S + LATE_SLACK_S
                np.testing.assert_allclose(result.logits, expected_logits(bundle, images_batch(i), {2}), rtol=1e-5, atol=1e-6)
            assert not next(d for d in source.devices if d.device_id == "c1").up  # marked down after repeated failures
            cluster.restart_device("c1")
            c1 = next(d for d in source.devices if d.device_id == "c1")
            for _ in range(int(RECOVERY_LIMIT_S / PROBE_INTERVAL_S)):  # the health probe finds it again
                if c1.up:
                    break
                await asyncio.sleep(PROBE_INTERVAL_S)
            assert c1.up
            result = await source.infer(images_batch(99))
            assert result.missing_groups == [] and result.answered_by[2] == "c1"

    asyncio.run(scenario())


def test_a_replica_killed_with_queries_in_flight_loses_none_of_them(cluster):
    bundle = cluster.bundle

    async def scenario():
        async with Source(bundle, with_addresses(cluster), deadline_s=DEADLINE_S, token=cluster.token) as source:
            answered = 0
            in_flight = asyncio.Semaphore(8)

            async def one(i: int):
                nonlocal answered
                async with in_flight:
                    result = await source.infer(images_batch(i))
                answered += 1
                return result

            async def killer():
                while answered < 10:
                    await asyncio.sleep(0.001)
                cluster.kill_device("b1")  # SIGKILL while queries are on its stream

            killing = asyncio.ensure_future(killer())
            results = await asyncio.gather(*(one(i) for i in range(60)))
            await killing
            return results, next(d for d in source.devices if d.device_id == "b1").up

    results, b1_up = asyncio.run(scenario())
    assert all(r.missing_groups == [] for r in results)  # b2 answered whatever b1 could not
    assert max(r.latency_s for r in results) <= DEADLINE_S + LATE_SLACK_S
    assert not b1_up and {r.answered_by[1] for r in results[-10:]} == {"b2"}


def test_source_service_and_cli_on_a_cluster(tmp_path):
    from test_cli import run

    bundle = make_bundle(tmp_path / "bundle")
    fleet_path = tmp_path / "fleet.yaml"
    fleet_path.write_text(fleet_for().to_yaml())
    state = tmp_path / "state"
    result = run("cluster", "up", "--bundle", bundle, "--fleet", fleet_path, "--state-dir", state, "--deadline-s", DEADLINE_S)
    assert result.exit_code == 0, result.output
    try:
        info = json.loads((state / "cluster.json").read_text())
        address = info["source"]["address"]
        assert len(info["devices"]) == 5
        images = images_batch(7, batch=3)

        async def ask():
            async with grpc.aio.insecure_channel(address) as channel:
                stub = rocoin_pb2_grpc.SourceStub(channel)
                from rocoin.runtime.transport.serde import tensor_from_proto, tensor_to_proto

                reply = await stub.Infer(rocoin_pb2.SourceInferRequest(input=tensor_to_proto(images)))
                np.testing.assert_allclose(
                    tensor_from_proto(reply.logits, max_bytes=1 << 20), expected_logits(bundle, images), rtol=1e-5, atol=1e-6
                )
                assert list(reply.missing_groups) == [] and len(reply.answered_by) == 3
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Infer(rocoin_pb2.SourceInferRequest(input=tensor_to_proto(np.zeros((1, 2, 8, 8), np.uint8))))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expected (B, 1, 8, 8)" in info.value.details()

        asyncio.run(ask())
        pytest.importorskip("sklearn")
        result = run("infer", "--source", address, "--dataset", "digits", "--count", 20, "--concurrency", 4, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["queries"] == 20 and report["queries_with_missing_groups"] == 0
    finally:
        result = run("cluster", "down", "--state-dir", state)
    assert result.exit_code == 0, result.output
    assert not (state / "cluster.json").exists()
    for member in info["devices"] + [info["source"]]:
        with pytest.raises(ProcessLookupError):
            import os

            os.kill(member["pid"], 0)


def test_devices_of_a_cluster_answer_only_the_source_with_the_token(cluster):
    async def scenario():
        async with Source(cluster.bundle, with_addresses(cluster), deadline_s=DEADLINE_S, insecure=True) as stranger:
            refused = await stranger.infer(images_batch(0))
        async with Source(cluster.bundle, with_addresses(cluster), deadline_s=DEADLINE_S, token=cluster.token) as source:
            accepted = await source.infer(images_batch(0))
        return refused, accepted

    refused, accepted = asyncio.run(scenario())
    assert refused.missing_groups == [0, 1, 2]  # every device said UNAUTHENTICATED
    assert refused.latency_s < DEADLINE_S  # refusals are immediate, nobody waits for the deadline
    assert accepted.missing_groups == []


def test_device_profile_and_fleet_collect(tmp_path):
    """A device measures itself against a running source; the entries make a valid fleet."""
    from test_cli import run

    bundle = make_bundle(tmp_path / "bundle")
    with LocalCluster(bundle, fleet_for(), tmp_path / "state") as cluster:
        source = cluster.state.source.address
        for name in ("a1", "c1"):
            result = run(
                "device",
                "profile",
                "--bundle",
                bundle,
                "--device-id",
                name,
                "--source",
                source,
                "--address",
                "127.0.0.1:5999",
                "-o",
                tmp_path / f"{name}.yaml",
            )
            assert result.exit_code == 0, result.output
            assert "MFLOP/s" in result.stdout
    result = run("fleet", "collect", tmp_path / "a1.yaml", tmp_path / "c1.yaml", "-o", tmp_path / "fleet.yaml")
    assert result.exit_code == 0, result.output
    from rocoin.contracts.fleet import load_fleet

    fleet = load_fleet(tmp_path / "fleet.yaml")
    assert fleet.ids == ["a1", "c1"]
    for d in fleet.devices:
        assert d.flops > 1e5 and d.memory_bytes > 1e6 and d.rate_bps > 1e5 and 0 < d.outage < 0.1
        assert d.address == "127.0.0.1:5999"
    bad = run("device", "profile", "--bundle", bundle, "--device-id", "a1", "--source", "127.0.0.1:1", "-o", tmp_path / "x.yaml")
    assert bad.exit_code == 2 and "no answer" in bad.stderr and not (tmp_path / "x.yaml").exists()
