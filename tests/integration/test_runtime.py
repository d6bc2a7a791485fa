"""The runtime on loopback: real worker processes killed with SIGKILL, restarted and stalled; the
source (library and gRPC service) keeps answering by its deadline, and the CLI drives a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("grpc_health")

import grpc  # noqa: E402
import onnxruntime as ort  # noqa: E402
from conftest import device  # noqa: E402
from test_device import _save, head_model, student_model  # noqa: E402

from rocoin.contracts.catalog import StudentSpec  # noqa: E402
from rocoin.contracts.fleet import Fleet  # noqa: E402
from rocoin.contracts.manifest import MANIFEST_NAME, GroupModel, Manifest, ModelFile, Normalization, TensorSpec, file_sha256  # noqa: E402
from rocoin.contracts.plan import GroupPlan, Plan  # noqa: E402
from rocoin.runtime.cluster.local import LocalCluster  # noqa: E402
from rocoin.runtime.device.emulation import Emulation  # noqa: E402
from rocoin.runtime.device.server import start_device  # noqa: E402
from rocoin.runtime.source.source import CANCEL_FLUSH_S, FAILURES_TO_MARK_DOWN, PROBE_INTERVAL_S, Source  # noqa: E402
from rocoin.runtime.transport.protocol import rocoin_pb2, rocoin_pb2_grpc  # noqa: E402
from rocoin.runtime.transport.serde import tensor_to_proto  # noqa: E402

INPUT_CHW = (1, 8, 8)
CLASSES = ["zero", "one", "two"]
#: Three groups: two with two replicas, one with a single device.
GROUPS = [(["a1", "a2"], [0, 3]), (["b1", "b2"], [1, 4, 5]), (["c1"], [2])]
NUM_FILTERS = 6
DEADLINE_S = 0.5
#: Slack for scheduling on a loaded 2-core machine when checking "answered by the deadline".
LATE_SLACK_S = 0.25
#: How long a restarted device may take to be used again (probe interval + reconnect backoff).
RECOVERY_LIMIT_S = 5.0


def make_bundle(folder: Path, groups=GROUPS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for k, (_, filters) in enumerate(groups):
        _save(student_model(rng.normal(size=(1, len(filters)))), folder / f"group{k}.onnx")
    _save(head_model(rng.normal(size=(NUM_FILTERS, len(CLASSES)))), folder / "head.onnx")
    plan = Plan(
        scheme="rocoin",
        epsilon=0.05,
        num_filters=NUM_FILTERS,
        groups=[GroupPlan(devices=d, filters=f, student="tiny", failure_prob=0.01, latency_s=0.01) for d, f in groups],
        latency_s=0.01,
        p_complete=0.97,
        catalog={"tiny": StudentSpec(flops=1e4, memory_bytes=10_000, params=10, out_dim=4)},
    )

    def entry(name: str) -> dict:
        return {"file": name, "sha256": file_sha256(folder / name), "size_bytes": (folder / name).stat().st_size}

    manifest = Manifest(
        plan=plan,
        dataset="digits",
        class_names=CLASSES,
        normalization=Normalization(mean=[0.5], std=[0.25]),
        groups=[
            GroupModel(
                **entry(f"group{k}.onnx"),
                input=TensorSpec(name="image", shape=list(INPUT_CHW)),
                output=TensorSpec(name="features", shape=[len(f)]),
                group=k,
                student="tiny",
                devices=d,
                filters=f,
            )
            for k, (d, f) in enumerate(groups)
        ],
        head=ModelFile(
            **entry("head.onnx"),
            input=TensorSpec(name="pooled", shape=[NUM_FILTERS]),
            output=TensorSpec(name="logits", shape=[len(CLASSES)]),
        ),
        rocoin_version="0.1.0",
    )
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest.model_dump(mode="json")))
    return folder


def fleet_for(groups=GROUPS) -> Fleet:
    return Fleet(devices=[device(d, 20, 4, 300, 0.1) for members, _ in groups for d in members])


def expected_logits(bundle: Path, images: np.ndarray, missing: set[int] = frozenset()) -> np.ndarray:
    """The pipeline run locally with onnxruntime: what the source must answer."""
    x = ((images.astype(np.float32) / 255.0) - 0.5) / 0.25
    features = np.zeros((len(x), NUM_FILTERS), dtype=np.float32)
    for k, (_, filters) in enumerate(GROUPS):
        if k not in missing:
            features[:, filters] = ort.InferenceSession(str(bundle / f"group{k}.onnx")).run(None, {"image": x})[0]
    return ort.InferenceSession(str(bundle / "head.onnx")).run(None, {"pooled": features})[0]


def images_batch(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, *INPUT_CHW), dtype=np.uint8)


def with_addresses(cluster: LocalCluster) -> Fleet:
    from rocoin.contracts.fleet import load_fleet

    return load_fleet(cluster.state.fleet)


class StalledDevice(rocoin_pb2_grpc.DeviceServicer):
    """Accepts every call and every stream message, and never answers."""

    async def Infer(self, request, context):
        await asyncio.Event().wait()

    async def InferStream(self, request_iterator, context):
        async for _ in request_iterator:
            pass


def test_a_stalled_device_costs_at_most_the_deadline(tmp_path):
    groups = [(["a1", "a2"], [0, 3]), (["b1", "b2"], [1, 4, 5]), (["stall"], [2])]
    bundle = make_bundle(tmp_path / "bundle", groups)

    async def scenario():
        server = grpc.aio.server()
        rocoin_pb2_grpc.add_DeviceServicer_to_server(StalledDevice(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            live = ["a1", "a2", "b1", "b2"]
            with LocalCluster(bundle, fleet_for(groups), tmp_path / "state", with_source=False, devices=live) as running:
                fleet = with_addresses(running)
                fleet = Fleet(
                    devices=[d if d.id != "stall" else d.model_copy(update={"address": f"127.0.0.1:{port}"}) for d in fleet.devices]
                )
                async with Source(bundle, fleet, deadline_s=DEADLINE_S, token=running.token) as source:
                    stalled = next(d for d in source.devices if d.device_id == "stall")
                    for i in range(5):
                        started = time.perf_counter()
                        result = await source.infer(images_batch(i))
                        elapsed = time.perf_counter() - started
                        assert result.missing_groups == [2]
                        assert elapsed <= DEADLINE_S + LATE_SLACK_S
                        if i >= FAILURES_TO_MARK_DOWN:  # marked down: nobody waits for it any more
                            assert elapsed < DEADLINE_S / 2
                        assert stalled.up == (i + 1 < FAILURES_TO_MARK_DOWN)  # three silent deadlines: marked down
                    assert stalled.failures == FAILURES_TO_MARK_DOWN
        finally:
            await server.stop(0)

    asyncio.run(scenario())


class FlakyDevice(rocoin_pb2_grpc.DeviceServicer):
    """Ignores its first ``silent`` requests, then answers every one (zeros); no health service."""

    def __init__(self, silent: int, width: int):
        self.silent = silent
        self.width = width

    async def InferStream(self, request_iterator, context):
        seen = 0
        async for request in request_iterator:
            if not request.query_id:
                continue  # only cancellations
            seen += 1
            if seen > self.silent:
                features = tensor_to_proto(np.zeros((request.input.shape[0], self.width), np.float32))
                await context.write(
                    rocoin_pb2.DeviceInferResponse(query_id=request.query_id, device_id="flaky", group=2, features=features)
                )


def test_a_device_marked_down_is_used_again_as_soon_as_it_answers(tmp_path):
    groups = [(["a1", "a2"], [0, 3]), (["b1", "b2"], [1, 4, 5]), (["flaky"], [2])]
    bundle = make_bundle(tmp_path / "bundle", groups)

    async def scenario():
        server = grpc.aio.server()
        rocoin_pb2_grpc.add_DeviceServicer_to_server(FlakyDevice(silent=FAILURES_TO_MARK_DOWN, width=1), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        devices = {name: await start_device(bundle, name, insecure=True) for name in ("a1", "a2", "b1", "b2")}
        try:
            fleet = Fleet(
                devices=[
                    d.model_copy(update={"address": devices[d.id].address if d.id in devices else f"127.0.0.1:{port}"})
                    for d in fleet_for(groups).devices
                ]
            )
            async with Source(bundle, fleet, deadline_s=0.2, insecure=True) as source:
                flaky = next(d for d in source.devices if d.device_id == "flaky")
                silent = [await source.infer(images_batch(i)) for i in range(FAILURES_TO_MARK_DOWN)]
                assert not flaky.up
                started = time.perf_counter()
                on_trial = await source.infer(images_batch(10))  # not waited for; its answer revives it
                await asyncio.sleep(0.05)
                back = await source.infer(images_batch(11))
                return silent, on_trial, back, flaky.up, time.perf_counter() - started
        finally:
            for running in devices.values():
                await running.stop(0)
            await server.stop(0)

    silent, on_trial, back, up, elapsed = asyncio.run(scenario())
    assert all(r.missing_groups == [2] for r in silent)
    assert on_trial.latency_s < 0.1  # a down device's group is not waited for
    assert back.missing_groups == [] and back.answered_by[2] == "flaky"
    assert up and elapsed < PROBE_INTERVAL_S  # back before any health probe (it has no health service)


@contextlib.asynccontextmanager
async def in_process_devices(bundle: Path, slow: set[str], slow_s: float, **options):
    """Every device of GROUPS started in this process (those in ``slow`` emulate ``slow_s`` per
    query); yields the workers by name and the fleet with their addresses."""
    devices = {}
    try:
        for name in (d.id for d in fleet_for().devices):
            emulation = (
                Emulation(flops=1e4 / slow_s, rate_bps=1e12, outage=0.0) if name in slow else None
            )  # the bundle's student: 1e4 FLOPs
            devices[name] = await start_device(bundle, name, emulation=emulation, **options, insecure=True)
        yield devices, Fleet(devices=[d.model_copy(update={"address": devices[d.id].address}) for d in fleet_for().devices])
    finally:
        for running in devices.values():
            await running.stop(0)


def cancelled_requests(device) -> float | None:
    return device.worker.metrics.registry.get_sample_value("rocoin_device_requests_total", {"code": "CANCELLED"})


def test_the_source_takes_the_first_replica_and_cancels_the_slower_one(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    slow_s = 0.3

    async def scenario():
        async with in_process_devices(bundle, {"a2"}, slow_s, max_concurrency=1) as (devices, fleet):
            async with Source(bundle, fleet, deadline_s=2.0, insecure=True) as source:
                first = await source.infer(images_batch(0))
                second = await source.infer(images_batch(1))  # a2's cancellation of the first rides on it
                await asyncio.sleep(CANCEL_FLUSH_S + 0.05)  # the second's goes out on its own
                ok = devices["a2"].worker.metrics.registry.get_sample_value("rocoin_device_requests_total", {"code": "OK"})
                return first, second, {"OK": ok, "CANCELLED": cancelled_requests(devices["a2"])}

    first, second, counts = asyncio.run(scenario())
    for result in (first, second):
        assert result.missing_groups == [] and result.answered_by[0] == "a1"
        assert result.latency_s < slow_s / 2  # nobody waited for the slow replica
    # a2 dropped both queries before its answers were due: the source does not wait for them
    assert counts == {"OK": None, "CANCELLED": 2}


def test_the_fleet_status_reports_each_devices_latency_and_bytes_on_the_wire(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    slow_s, queries, batch = 0.2, 6, 2

    async def scenario():
        async with in_process_devices(bundle, {"a2"}, slow_s, max_concurrency=1) as (_, fleet):
            async with Source(bundle, fleet, deadline_s=2.0, insecure=True) as source:
                for i in range(queries):
                    await source.infer(images_batch(i, batch))
                return {m["device"]: m for m in source.fleet_status()["members"]}

    members = asyncio.run(scenario())
    image_kib = batch * np.prod(INPUT_CHW) * 4 / 1024  # float32 images, as the source sends them
    for name, filters in ((d, g[1]) for g in GROUPS for d in g[0]):
        traffic = members[name]["traffic"]
        assert traffic["kib_sent"] == pytest.approx(queries * image_kib), name  # every device gets every query
        if name == "a2":  # always cancelled before its answer was due: nothing came back
            assert traffic["kib_received"] == 0 and traffic["answer_ms_p50"] is None
        else:  # every valid answer counted (b1 and b2 race: the later one may be cancelled)
            answers = members[name]["answers"]
            assert answers == queries or name in ("b1", "b2"), name
            assert traffic["kib_received"] == pytest.approx(answers * batch * len(filters) * 4 / 1024), name
            if answers:
                assert 0 < traffic["answer_ms_p50"] <= traffic["answer_ms_p99"] < 1e3 * slow_s, name


def test_queries_the_caller_gives_up_on_are_cancelled_on_the_devices_and_fail_nobody(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    slow_s = 0.3

    async def scenario():
        async with in_process_devices(bundle, {"a1", "a2"}, slow_s) as (devices, fleet):
            async with Source(bundle, fleet, deadline_s=2.0, insecure=True) as source:
                for i in range(FAILURES_TO_MARK_DOWN + 1):  # e.g. HTTP clients that hang up
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(source.infer(images_batch(i)), 0.05)
                await asyncio.sleep(CANCEL_FLUSH_S + 0.05)
                status = {d["device"]: (d["up"], d["failures"]) for d in source.status()}
                complete = await source.infer(images_batch(9))
            return status, complete, {name: cancelled_requests(devices[name]) for name in ("a1", "a2")}

    status, complete, cancelled = asyncio.run(scenario())
    assert status["a1"] == status["a2"] == (True, 0)  # a query nobody waits for is not a device's failure
    assert cancelled == {"a1": FAILURES_TO_MARK_DOWN + 1, "a2": FAILURES_TO_MARK_DOWN + 1}  # and its work was dropped
    assert complete.missing_groups == [] and slow_s <= complete.latency_s < 2.0
