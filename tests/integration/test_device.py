"""The device worker over a real gRPC channel on 127.0.0.1, with tiny ONNX models made without torch."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("grpc")
pytest.importorskip("grpc_health")

import grpc  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from rocoin.contracts.catalog import StudentSpec  # noqa: E402
from rocoin.contracts.errors import RocoinError  # noqa: E402
from rocoin.contracts.manifest import (  # noqa: E402
    MANIFEST_NAME,
    GroupModel,
    Manifest,
    ModelFile,
    Normalization,
    TensorSpec,
    file_sha256,
)
from rocoin.contracts.plan import GroupPlan, Plan  # noqa: E402
from rocoin.runtime.device.emulation import Emulation  # noqa: E402
from rocoin.runtime.device.server import start_device, wait_ready_file  # noqa: E402
from rocoin.runtime.device.servicer import DEVICE_SERVICE, DeviceWorker  # noqa: E402
from rocoin.runtime.transport.protocol import rocoin_pb2, rocoin_pb2_grpc  # noqa: E402
from rocoin.runtime.transport.serde import TensorError, tensor_from_proto, tensor_to_proto  # noqa: E402

INPUT_CHW = (1, 8, 8)
STUDENT = "tiny"
STUDENT_FLOPS = 1.0e6
GROUPS = [(["a"], [0, 2], 0.1), (["b", "c"], [1, 3, 4], 0.01)]
NUM_FILTERS = 5
CLASSES = ["zero", "one", "two"]
SRC = Path(__file__).resolve().parents[2] / "src"


# --------------------------------------------------------------------------- the tiny bundle


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def student_model(weight: np.ndarray) -> onnx.ModelProto:
    """(B, 1, 8, 8) -> GlobalAveragePool -> Flatten -> MatMul (1, k) + bias -> (B, k)."""
    k = weight.shape[1]
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "weight"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "student",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", *INPUT_CHW])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["B", k])],
        initializer=[
            numpy_helper.from_array(weight.astype(np.float32), "weight"),
            numpy_helper.from_array(np.arange(k, dtype=np.float32) / 10, "bias"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def head_model(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pooled", "fc"], ["logits"])],
        "head",
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["B", weight.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "fc")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write_manifest(bundle: Path) -> None:
    plan = Plan(
        scheme="rocoin",
        epsilon=0.05,
        num_filters=NUM_FILTERS,
        groups=[GroupPlan(devices=d, filters=f, student=STUDENT, failure_prob=q, latency_s=1.0) for d, f, q in GROUPS],
        latency_s=1.0,
        p_complete=float(np.prod([1 - q for *_, q in GROUPS])),
        catalog={STUDENT: StudentSpec(flops=STUDENT_FLOPS, memory_bytes=10_000, params=10, out_dim=4)},
    )

    def entry(name: str) -> dict:
        path = bundle / name
        return {"file": name, "sha256": file_sha256(path), "size_bytes": path.stat().st_size}

    groups = [
        GroupModel(
            **entry(f"group{k}.onnx"),
            input=TensorSpec(name="image", shape=list(INPUT_CHW)),
            output=TensorSpec(name="features", shape=[len(filters)]),
            group=k,
            student=STUDENT,
            devices=devices,
            filters=filters,
        )
        for k, (devices, filters, _) in enumerate(GROUPS)
    ]
    head = ModelFile(
        **entry("head.onnx"),
        input=TensorSpec(name="pooled", shape=[NUM_FILTERS]),
        output=TensorSpec(name="logits", shape=[len(CLASSES)]),
    )
    manifest = Manifest(
        plan=plan,
        dataset="digits",
        class_names=CLASSES,
        normalization=Normalization(mean=[0.5], std=[0.25]),
        groups=groups,
        head=head,
        rocoin_version="0.1.0",
    )
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2))


def make_bundle(bundle: Path) -> Path:
    bundle.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, (_, filters, _) in enumerate(GROUPS):
        _save(student_model(rng.normal(size=(1, len(filters)))), bundle / f"group{k}.onnx")
    _save(head_model(rng.normal(size=(NUM_FILTERS, len(CLASSES)))), bundle / "head.onnx")
    write_manifest(bundle)
    return bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def images(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *INPUT_CHW)).astype(np.float32)


def request(array: np.ndarray, query_id: str = "q") -> rocoin_pb2.DeviceInferRequest:
    return rocoin_pb2.DeviceInferRequest(query_id=query_id, input=tensor_to_proto(array))


def run(coro):
    return asyncio.run(coro)


class Client:
    """An aio channel + stub to one started device (async context manager)."""

    def __init__(self, address: str):
        self.address = address

    async def __aenter__(self):
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = rocoin_pb2_grpc.DeviceStub(self.channel)
        return self.stub

    async def __aexit__(self, *exc):
        await self.channel.close()


# --------------------------------------------------------------------------- serde


def test_serde_round_trips_float32_and_uint8():
    for array in (images(3), np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.zeros((0, 5), np.float32)):
        back = tensor_from_proto(tensor_to_proto(array), max_bytes=1 << 20)
        assert back.dtype == array.dtype and back.shape == array.shape
        np.testing.assert_array_equal(back, array)
    big_endian = images(1).astype(">f4")
    assert tensor_to_proto(big_endian).data == images(1).tobytes()  # little-endian on the wire
    strided = images(2)[:, :, ::2, ::2]
    np.testing.assert_array_equal(tensor_from_proto(tensor_to_proto(strided), max_bytes=1 << 20), strided)


@pytest.mark.parametrize(
    ("shape", "dtype", "data", "message"),
    [
        ([2, 2], "float64", b"\0" * 32, "dtype: 'float64': expected one of 'float32', 'float16', 'uint8'"),
        ([2, 2], "", b"", "dtype: '': expected one of"),
        ([2, -2], "float32", b"", "shape: [2, -2]: expected non-negative dimensions"),
        ([2, 2], "float32", b"\0" * 15, "data: 15 bytes: expected 16"),
        ([1 << 40, 1 << 40], "uint8", b"", "expected at most 1000 bytes"),
        ([1] * 9, "uint8", b"\0", "expected at most 8 dimensions"),
    ],
)
def test_serde_rejects_malformed_tensors(shape, dtype, data, message):
    with pytest.raises(TensorError, match=None) as info:
        tensor_from_proto(rocoin_pb2.Tensor(shape=shape, dtype=dtype, data=data), max_bytes=1000)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_serde_refuses_to_send_other_dtypes():
    with pytest.raises(TensorError, match="dtype: 'float64'"):
        tensor_to_proto(np.zeros(3))


# --------------------------------------------------------------------------- serving


@pytest.fixture(params=["event loop", "thread pool"])
def model_runs_in(request, monkeypatch):
    """Both places a worker may run the model: inline for a fast model, else its thread pool."""
    import rocoin.runtime.device.servicer as device_module

    if request.param == "thread pool":
        monkeypatch.setattr(device_module, "INLINE_RUN_S", 0.0)
        monkeypatch.setattr(device_module, "INLINE_SERIAL_RUN_S", 0.0)
    return request.param


def test_infer_matches_onnxruntime_and_reports_the_group(bundle, model_runs_in):
    x = images(5)
    session = ort.InferenceSession(str(bundle / "group1.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": x})[0]

    async def main():
        device = await start_device(bundle, "c", insecure=True)
        try:
            async with Client(device.address) as stub:
                reply = await stub.Infer(request(x, "query-7"), timeout=10)
        finally:
            await device.stop(0)
        return reply

    reply = run(main())
    assert (reply.query_id, reply.device_id, reply.group) == ("query-7", "c", 1)
    features = tensor_from_proto(reply.features, max_bytes=1 << 20)
    assert features.shape == (5, 3)
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6)
    assert 0 < reply.compute_s < 5


def _bad_requests() -> list[tuple[str, rocoin_pb2.DeviceInferRequest, grpc.StatusCode, str]]:
    good = images(1)
    nan, inf = good.copy(), good.copy()
    nan[0, 0, 0, 0] = np.nan
    inf[0, 0, 1, 1] = -np.inf
    proto = tensor_to_proto(good)
    return [
        (
            "wrong shape",
            request(images(1)[:, :, :4, :]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input.shape: [1, 1, 4, 8]: expected (B, 1, 8, 8)",
        ),
        ("wrong rank", request(good[0]), grpc.StatusCode.INVALID_ARGUMENT, "input.shape: [1, 8, 8]: expected (B, 1, 8, 8)"),
        ("wrong dtype", request((good * 0).astype(np.uint8)), grpc.StatusCode.INVALID_ARGUMENT, "input.dtype: 'uint8': expected 'float32'"),
        (
            "garbage dtype",
            rocoin_pb2.DeviceInferRequest(input=rocoin_pb2.Tensor(shape=proto.shape, dtype="complex<x>", data=proto.data)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input.dtype: 'complex<x>': expected 'float32'",
        ),
        ("NaN", request(nan), grpc.StatusCode.INVALID_ARGUMENT, "input.data: 1 NaN and 0 infinite values: expected finite values"),
        ("Inf", request(inf), grpc.StatusCode.INVALID_ARGUMENT, "input.data: 0 NaN and 1 infinite values: expected finite"),
        (
            "empty batch",
            request(np.zeros((0, *INPUT_CHW), np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input.shape[0]: 0: expected a batch size in 1..4",
        ),
        ("batch too large", request(images(5)), grpc.StatusCode.INVALID_ARGUMENT, "input.shape[0]: 5: expected a batch size in 1..4"),
        (
            "data too short",
            rocoin_pb2.DeviceInferRequest(input=rocoin_pb2.Tensor(shape=proto.shape, dtype="float32", data=proto.data[:-4])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input.data: 252 bytes: expected 256",
        ),
        (
            "data too long",
            rocoin_pb2.DeviceInferRequest(input=rocoin_pb2.Tensor(shape=proto.shape, dtype="float32", data=proto.data + b"\0" * 4)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input.data: 260 bytes: expected 256",
        ),
        (
            "negative dimension",
            rocoin_pb2.DeviceInferRequest(input=rocoin_pb2.Tensor(shape=[-1, 1, 8, 8], dtype="float32")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input.shape[0]: -1: expected a batch size",
        ),
        ("no input", rocoin_pb2.DeviceInferRequest(query_id="x"), grpc.StatusCode.INVALID_ARGUMENT, "input: missing"),
        (
            "long query id",
            rocoin_pb2.DeviceInferRequest(query_id="x" * 1000, input=proto),
            grpc.StatusCode.INVALID_ARGUMENT,
            "query_id: 1000 characters",
        ),
        (
            "oversized message",
            rocoin_pb2.DeviceInferRequest(input=rocoin_pb2.Tensor(shape=[1, 1, 8, 8], dtype="float32", data=b"\0" * 200_000)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "",
        ),
    ]


def test_malformed_requests_are_rejected_and_the_worker_keeps_serving(bundle):
    cases = _bad_requests()

    async def main():
        device = await start_device(bundle, "a", max_batch=4, insecure=True)
        outcomes = []
        try:
            async with Client(device.address) as stub:
                for name, bad, _, _ in cases:
                    try:
                        await stub.Infer(bad, timeout=10)
                        outcomes.append((name, None, "accepted"))
                    except grpc.aio.AioRpcError as exc:
                        outcomes.append((name, exc.code(), exc.details()))
                    good = await stub.Infer(request(images(2)), timeout=10)  # still serving
                    assert good.features.shape == [2, 2]
        finally:
            await device.stop(0)
        return outcomes

    outcomes = run(main())
    for (name, _, code, message), (_, got_code, details) in zip(cases, outcomes):
        assert got_code == code, f"{name}: {got_code} {details}"
        assert message in details, f"{name}: {details!r} lacks {message!r}"


def test_health_reports_serving_then_not_serving(bundle):
    async def main():
        device = await start_device(bundle, "b", insecure=True)
        try:
            async with grpc.aio.insecure_channel(device.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                serving = [
                    (await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status for name in ("", DEVICE_SERVICE)
                ]
                await device.health.enter_graceful_shutdown()
                after = (await health.Check(health_pb2.HealthCheckRequest(service=DEVICE_SERVICE), timeout=5)).status
        finally:
            await device.stop(0)
        return serving, after

    serving, after = run(main())
    assert serving == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert after == health_pb2.HealthCheckResponse.NOT_SERVING


# --------------------------------------------------------------------------- the source's stream


async def _stream_exchange(stub, messages, expected_answers: int, timeout_s: float = 10.0):
    """Send ``messages`` on one InferStream, read ``expected_answers`` answers (in arrival order), close."""
    call = stub.InferStream()
    for message in messages:
        await call.write(message)
    answers = []

    async def read_all():
        while len(answers) < expected_answers:
            reply = await call.read()
            assert reply is not grpc.aio.EOF, answers
            answers.append(reply)

    await asyncio.wait_for(read_all(), timeout_s)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF  # nothing else: no answer for cancelled requests
    return answers, await call.code()


def test_the_stream_answers_every_request_by_id_and_refuses_bad_ones_without_ending(bundle):
    cases = [case for case in _bad_requests() if case[0] != "oversized message"]
    x = images(2)
    expected = ort.InferenceSession(str(bundle / "group0.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    messages = []
    for i, (_, bad, _, _) in enumerate(cases):
        bad = rocoin_pb2.DeviceInferRequest.FromString(bad.SerializeToString())
        if len(bad.query_id) <= 256:
            bad.query_id = f"bad-{i}"
        messages += [bad, request(x, f"good-{i}")]
    messages.append(rocoin_pb2.DeviceInferRequest(query_id="bad-timeout", input=tensor_to_proto(x), timeout_s=-1.0))

    async def main():
        device = await start_device(bundle, "a", max_batch=4, insecure=True)
        try:
            async with Client(device.address) as stub:
                answers, code = await _stream_exchange(stub, messages, len(messages))
                return {reply.query_id: reply for reply in answers}, code
        finally:
            await device.stop(0)

    answers, code = run(main())
    assert code == grpc.StatusCode.OK  # the stream outlived every bad request
    for i, (name, _, status, message) in enumerate(cases):
        good = answers[f"good-{i}"]
        assert good.error_code == 0 and good.device_id == "a" and good.group == 0
        np.testing.assert_allclose(tensor_from_proto(good.features, max_bytes=1 << 20), expected, rtol=1e-6, atol=1e-6)
        bad = answers[f"bad-{i}" if name != "long query id" else "x" * 256]
        assert bad.error_code == status.value[0] and message in bad.error, (name, bad)
        assert not bad.HasField("features")
    assert answers["bad-timeout"].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "timeout_s: -1.0: expected seconds >= 0" in answers["bad-timeout"].error


def test_stopping_answers_the_requests_in_progress_then_ends_the_streams_without_waiting_the_grace(bundle):
    emulation = Emulation(flops=STUDENT_FLOPS / 0.3, rate_bps=1.0e12, outage=0.0)  # 0.3 s per request

    async def main():
        device = await start_device(bundle, "b", emulation=emulation, insecure=True)
        async with Client(device.address) as stub:
            idle = stub.InferStream()  # a source's stream with nothing in flight
            await idle.write(rocoin_pb2.DeviceInferRequest(cancel=["nothing"]))
            busy = stub.InferStream()
            await busy.write(request(images(1), "in-progress"))
            await asyncio.sleep(0.05)
            started = time.perf_counter()
            stopping = asyncio.ensure_future(device.stop(5.0))
            await asyncio.sleep(0.05)
            await busy.write(request(images(1), "too-late"))
            answers = [await busy.read(), await busy.read()]
            await stopping
            stopped_after = time.perf_counter() - started
            ended = []
            for call in (busy, idle):
                try:
                    ended.append(await call.read())
                except grpc.aio.AioRpcError as exc:
                    ended.append(exc.code())
        return answers, stopped_after, ended

    answers, stopped_after, ended = run(main())
    by_id = {a.query_id: a for a in answers}
    assert by_id["in-progress"].error_code == 0 and by_id["in-progress"].features.shape == [1, 3]
    assert by_id["too-late"].error_code == grpc.StatusCode.UNAVAILABLE.value[0] and "shutting down" in by_id["too-late"].error
    assert stopped_after < 1.0  # the answer's 0.25 s, not the 5 s grace the idle stream would cost
    assert all(e is grpc.aio.EOF or e in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) for e in ended), ended


def test_an_oversized_stream_message_ends_only_that_stream(bundle):
    oversized = rocoin_pb2.DeviceInferRequest(
        query_id="big", input=rocoin_pb2.Tensor(shape=[1, 1, 8, 8], dtype="float32", data=b"\0" * 200_000)
    )

    async def main():
        device = await start_device(bundle, "a", max_batch=4, insecure=True)
        try:
            async with Client(device.address) as stub:
                call = stub.InferStream()
                await call.write(oversized)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.read()
                answers, code = await _stream_exchange(stub, [request(images(1), "next")], 1)  # a new stream is served
                return info.value.code(), answers, code
        finally:
            await device.stop(0)

    refused, answers, code = run(main())
    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code == grpc.StatusCode.OK and answers[0].query_id == "next" and answers[0].error_code == 0


def test_the_stream_cancels_queued_requests_and_refuses_those_past_their_timeout(bundle, model_runs_in):
    emulation = Emulation(flops=STUDENT_FLOPS / 0.2, rate_bps=1.0e12, outage=0.0)  # 0.2 s per request
    x = tensor_to_proto(images(1))
    messages = [
        rocoin_pb2.DeviceInferRequest(query_id="first", input=x),
        rocoin_pb2.DeviceInferRequest(query_id="cancelled", input=x),
        rocoin_pb2.DeviceInferRequest(query_id="late", input=x, timeout_s=0.05),  # waits 0.2 s for the slot
        rocoin_pb2.DeviceInferRequest(cancel=["cancelled", "unknown-id"]),  # only cancellations
        rocoin_pb2.DeviceInferRequest(query_id="first", input=x),  # a duplicate of one in flight
    ]

    async def main():
        device = await start_device(bundle, "b", emulation=emulation, max_concurrency=1, insecure=True)
        try:
            async with Client(device.address) as stub:
                started = time.perf_counter()
                answers, code = await _stream_exchange(stub, messages, 3)
                elapsed = time.perf_counter() - started
            return answers, code, elapsed, device.worker.metrics.registry
        finally:
            await device.stop(0)

    answers, code, elapsed, registry = run(main())
    assert code == grpc.StatusCode.OK
    duplicate, first, late = answers  # in the order they were ready
    assert duplicate.query_id == "first" and "query_id: 'first': already in flight" in duplicate.error
    assert first.query_id == "first" and first.error_code == 0 and first.compute_s >= 0.2
    assert late.query_id == "late" and late.error_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    # the cancelled request never ran: the late one's refusal came when the first one ended
    assert 0.2 <= elapsed < 0.35
    count = {
        code: registry.get_sample_value("rocoin_device_requests_total", {"code": code})
        for code in ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT")
    }
    assert count == {"OK": 1, "CANCELLED": 1, "DEADLINE_EXCEEDED": 1, "INVALID_ARGUMENT": 1}


# --------------------------------------------------------------------------- refusing to start


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy


def test_a_tampered_model_is_refused(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    path = copy / "group0.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RocoinError, match=r"group0\.onnx: SHA-256 does not match"):
        DeviceWorker(copy, "a")
    with pytest.raises(RocoinError, match="group0.onnx"):
        run(start_device(copy, "a", insecure=True))
    DeviceWorker(copy, "b").close()  # the other group's file is intact


def test_a_truncated_model_is_refused(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    path = copy / "group1.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(RocoinError, match=r"group1\.onnx: \d+ bytes but the manifest says"):
        DeviceWorker(copy, "c")


def test_a_model_onnxruntime_cannot_load_is_refused(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    (copy / "group0.onnx").write_bytes(b"not an onnx model at all")
    write_manifest(copy)  # the manifest vouches for the garbage
    with pytest.raises(RocoinError, match=r"group0\.onnx: onnxruntime cannot load the model"):
        DeviceWorker(copy, "a")


def test_unknown_device_and_bad_options_are_refused(bundle, tmp_path):
    with pytest.raises(RocoinError, match=r"device-id = 'zz': not a device of this bundle's plan"):
        DeviceWorker(bundle, "zz")
    with pytest.raises(RocoinError, match="max-batch = 0"):
        DeviceWorker(bundle, "a", max_batch=0)
    with pytest.raises(RocoinError, match="bundle folder not found"):
        DeviceWorker(tmp_path / "nowhere", "a")
    with pytest.raises(RocoinError, match="listen = '127.0.0.1'"):
        run(start_device(bundle, "a", "127.0.0.1", insecure=True))
    with pytest.raises(RocoinError, match="outage = 1.0"):
        Emulation(flops=1e9, rate_bps=1e6, outage=1.0)


def test_emulation_from_a_fleet_file(tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "devices:\n  - {id: a, flops: 2.0e7, memory_bytes: 100000, rate_bps: 1000, outage: 0.2, downlink_bps: 1.0e6}\ninput_bits: 50000\n"
    )
    assert Emulation.from_fleet(fleet, "a", seed=1) == Emulation(flops=2.0e7, rate_bps=1000.0, outage=0.2, input_s=0.05, seed=1)
    with pytest.raises(RocoinError, match="device-id = 'zz': not a device of the fleet"):
        Emulation.from_fleet(fleet, "zz")


def test_a_busy_port_is_refused(bundle):
    async def main():
        first = await start_device(bundle, "a", insecure=True)
        try:
            with pytest.raises(RocoinError, match="cannot bind"):
                await start_device(bundle, "b", first.address, insecure=True)
        finally:
            await first.stop(0)

    run(main())


# --------------------------------------------------------------------------- emulation and concurrency


async def _timed_calls(stub, count: int, batch: int = 1) -> tuple[list, float]:
    started = time.perf_counter()

    async def one(i):
        t0 = time.perf_counter()
        try:
            reply = await stub.Infer(request(images(batch, i), f"q{i}"), timeout=20)
            return reply, time.perf_counter() - t0
        except grpc.aio.AioRpcError as exc:
            return exc, time.perf_counter() - t0

    results = await asyncio.gather(*(one(i) for i in range(count)))
    return results, time.perf_counter() - started


def test_emulated_latency_matches_the_profile(bundle):
    emulation = Emulation(flops=1.0e7, rate_bps=6400.0, outage=0.0, input_s=0.02)
    expected = STUDENT_FLOPS / 1.0e7 + 32 * 3 / 6400.0 + 0.02  # group 1 has 3 filters: 0.135 s
    assert emulation.latency_s(STUDENT_FLOPS, 3) == pytest.approx(expected)

    async def main():
        device = await start_device(bundle, "b", emulation=emulation, insecure=True)
        try:
            async with Client(device.address) as stub:
                await stub.Infer(request(images(1)), timeout=10)  # warm the channel
                return [(await _timed_calls(stub, 1))[0][0] for _ in range(5)]
        finally:
            await device.stop(0)

    results = run(main())
    compute = [reply.compute_s for reply, _ in results]
    latency = [seconds for _, seconds in results]
    assert min(compute) >= expected and min(latency) >= expected  # never early
    # typically a few ms late; the median keeps one late call on a loaded machine from failing the test
    assert np.median(compute) < expected + 0.05 and np.median(latency) < expected + 0.05


def test_emulated_outage_drops_answers_at_the_rate(bundle):
    emulation = Emulation(flops=1.0e12, rate_bps=1.0e12, outage=0.5, seed=3, drop="error")

    async def main():
        device = await start_device(bundle, "a", emulation=emulation, insecure=True)
        try:
            async with Client(device.address) as stub:
                results, _ = await _timed_calls(stub, 200)
        finally:
            await device.stop(0)
        return results

    results = run(main())
    dropped = [r for r, _ in results if isinstance(r, grpc.aio.AioRpcError)]
    assert all(e.code() == grpc.StatusCode.UNAVAILABLE and e.details() == "emulated outage" for e in dropped)
    assert abs(len(dropped) - 100) <= 25  # 200 draws at p = 0.5: sd ≈ 7
    answered = [r for r, _ in results if not isinstance(r, grpc.aio.AioRpcError)]
    assert all(r.device_id == "a" and r.features.shape == [1, 2] for r in answered)


def test_a_silently_dropped_answer_never_arrives_before_the_deadline(bundle):
    emulation = Emulation(flops=1.0e12, rate_bps=1.0e12, outage=0.99, seed=0)

    async def main():
        device = await start_device(bundle, "a", emulation=emulation, max_concurrency=1, insecure=True)
        try:
            async with Client(device.address) as stub:
                started = time.perf_counter()
                calls = [stub.Infer(request(images(1), f"q{i}"), timeout=0.3) for i in range(3)]
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
                return outcomes, time.perf_counter() - started
        finally:
            await device.stop(0)

    outcomes, elapsed = run(main())
    # all three are held to their deadline (the held calls free their slot, so they overlap)
    codes = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
    assert all(isinstance(o, grpc.aio.AioRpcError) and o.code() in codes for o in outcomes), outcomes
    assert 0.28 <= elapsed < 0.6


@pytest.mark.parametrize(("concurrency", "low", "high"), [(1, 3.0, 6.0), (3, 1.0, 1.9)])  # one at a time: at least 3 runs
def test_the_concurrency_limit_is_honoured(bundle, concurrency, low, high, model_runs_in):
    emulation = Emulation(flops=1.0e7, rate_bps=1.0e12, outage=0.0)  # 0.1 s per call

    async def main():
        device = await start_device(bundle, "a", emulation=emulation, max_concurrency=concurrency, insecure=True)
        try:
            async with Client(device.address) as stub:
                await stub.Infer(request(images(1)), timeout=10)
                return await _timed_calls(stub, 3)
        finally:
            await device.stop(0)

    results, elapsed = run(main())
    assert all(not isinstance(r, grpc.aio.AioRpcError) for r, _ in results)
    assert low * 0.1 <= elapsed < high * 0.1


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_serial_worker_runs_on_its_event_loop_and_a_concurrent_one_in_parallel(bundle, monkeypatch, concurrency):
    """With one request at a time (the local cluster's workers) no hop to a thread: the model runs
    on the event loop; with more, concurrent requests run side by side in the pool (a model blocking
    0.2 s per run here)."""
    import rocoin.runtime.device.servicer as device_module

    monkeypatch.setattr(device_module, "INLINE_RUN_S", 0.0)  # the model is fast: only being serial keeps it on the loop
    monkeypatch.setattr(device_module, "INLINE_SERIAL_RUN_S", 1.0)
    runs: list[tuple[str, float, float]] = []

    async def main():
        device = await start_device(bundle, "a", max_concurrency=concurrency, insecure=True)
        runner = device.worker._serving.runner
        model_run = runner.run

        def slow_run(batch):
            started = time.perf_counter()
            time.sleep(0.2)
            runs.append((threading.current_thread().name, started, time.perf_counter()))
            return model_run(batch)

        monkeypatch.setattr(runner, "run", slow_run)
        try:
            async with Client(device.address) as stub:
                return await _timed_calls(stub, 3)
        finally:
            await device.stop(0)

    results, elapsed = run(main())
    assert all(not isinstance(r, grpc.aio.AioRpcError) for r, _ in results)
    threads = {name for name, *_ in runs}
    if concurrency == 1:
        assert threads == {threading.main_thread().name}
        assert elapsed >= 0.6  # one after the other
    else:
        assert all(name.startswith("rocoin-a") for name in threads), threads
        assert elapsed < 0.5, runs  # side by side


def test_a_call_whose_deadline_passes_while_waiting_does_not_hold_a_slot(bundle):
    emulation = Emulation(flops=1.0e7 / 3, rate_bps=1.0e12, outage=0.0)  # 0.3 s per call

    async def main():
        device = await start_device(bundle, "a", emulation=emulation, max_concurrency=1, insecure=True)
        try:
            async with Client(device.address) as stub:
                first = asyncio.ensure_future(stub.Infer(request(images(1)), timeout=10))
                await asyncio.sleep(0.05)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Infer(request(images(1)), timeout=0.1)
                await first
                t0 = time.perf_counter()
                await stub.Infer(request(images(1)), timeout=10)
                return info.value.code(), time.perf_counter() - t0
        finally:
            await device.stop(0)

    code, latency = run(main())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.3 <= latency < 0.4


# --------------------------------------------------------------------------- a worker process


def test_a_worker_process_writes_its_ready_file_and_stops_on_sigterm(bundle, tmp_path):
    ready = tmp_path / "ready.json"
    code = (
        "import asyncio, logging, sys\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from rocoin.runtime.device.server import serve_device\n"
        f"asyncio.run(serve_device({str(bundle)!r}, 'b', '127.0.0.1:0', ready_file={str(ready)!r}, insecure=True))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        record = wait_ready_file(ready, timeout_s=30, process=process)
        assert record["pid"] == process.pid and record["device_id"] == "b" and record["group"] == 1
        assert record["address"] == f"127.0.0.1:{record['port']}"
        with grpc.insecure_channel(record["address"]) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=DEVICE_SERVICE), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            reply = rocoin_pb2_grpc.DeviceStub(channel).Infer(request(images(1)), timeout=5)
            assert reply.group == 1
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert f"serving on {record['address']}" in stderr
    assert not ready.exists()


def test_the_device_modules_import_without_torch_or_training_code():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch fails\n"
        "import rocoin.runtime.device.server, rocoin.runtime.device.options, rocoin.runtime.transport.serde\n"
        "training = ('rocoin.distillation', 'rocoin.models.wrn', 'rocoin.models.mobilenetv2', 'rocoin.models.registry', 'rocoin.data')\n"
        "bad = sorted(m for m, mod in sys.modules.items() if mod is not None and (m.split('.')[0] == 'torch' or m.startswith(training)))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_math_of_the_message_limits(bundle):
    worker = DeviceWorker(bundle, "a", max_batch=4)
    try:
        assert worker.max_input_bytes == math.prod(INPUT_CHW) * 4 * 4
        assert worker.max_request_bytes > worker.max_input_bytes
    finally:
        worker.close()


# --------------------------------------------------------------------------- authentication


def test_a_device_with_a_token_refuses_calls_without_it(bundle):
    from rocoin.runtime.transport.auth import token_metadata

    token = "s3cret-token-for-the-devices"

    async def main():
        device = await start_device(bundle, "a", token=token)
        try:
            async with Client(device.address) as stub:
                outcomes = {}
                for label, metadata in (
                    ("none", None),
                    ("wrong", token_metadata("another-token-of-16ch")),
                    ("garbage", (("authorization", "Basic xyz"),)),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.Infer(request(images(1)), timeout=5, metadata=metadata)
                    outcomes[label] = (info.value.code(), info.value.details())
                stream = stub.InferStream()  # the source's stream is guarded the same way
                await stream.write(request(images(1)))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stream.read()
                outcomes["stream"] = (info.value.code(), info.value.details())
                reply = await stub.Infer(request(images(1)), timeout=5, metadata=token_metadata(token))
                health_reply = await health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(device.address)).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=5
                )
                return outcomes, reply, health_reply
        finally:
            await device.stop(0)

    outcomes, reply, health_reply = run(main())
    assert outcomes["none"] == (grpc.StatusCode.UNAUTHENTICATED, "missing token: this device requires the source's token")
    assert outcomes["stream"] == outcomes["none"]
    assert outcomes["wrong"][0] == outcomes["garbage"][0] == grpc.StatusCode.UNAUTHENTICATED
    assert "wrong token" in outcomes["wrong"][1]
    assert reply.device_id == "a"  # the right token works, and the worker kept serving
    assert health_reply.status == health_pb2.HealthCheckResponse.SERVING  # health needs no token


def test_tokens_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from rocoin.runtime.transport.auth import TOKEN_ENV, load_token

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert load_token() is None
    monkeypatch.setenv(TOKEN_ENV, "x" * 20)
    assert load_token() == "x" * 20
    (tmp_path / "token").write_text("y" * 32 + "\n")
    assert load_token(tmp_path / "token") == "y" * 32
    (tmp_path / "short").write_text("abc")
    with pytest.raises(RocoinError, match="the token has 3 characters; expected at least 16"):
        load_token(tmp_path / "short")
    with pytest.raises(RocoinError, match="cannot read it"):
        load_token(tmp_path / "missing")


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    root = tmp_path_factory.mktemp("certs")
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_certs.sh"
    for name in ("good", "other"):
        subprocess.run(["bash", str(script), str(root / name)], check=True, capture_output=True)
    return root


def _tls_channel(address: str, ca: Path, cert: Path | None = None, key: Path | None = None):
    from rocoin.runtime.transport.tls import ClientTLS

    return grpc.aio.secure_channel(address, ClientTLS(ca, cert, key).credentials())


def test_tls_checks_the_certificate_authority(bundle, certs):
    from rocoin.runtime.transport.tls import ServerTLS

    good, other = certs / "good", certs / "other"

    async def main():
        device = await start_device(bundle, "a", tls=ServerTLS(good / "device.pem", good / "device.key"), insecure=True)
        outcomes = {}
        try:
            for label, channel in (
                ("right CA", _tls_channel(device.address, good / "ca.pem")),
                ("wrong CA", _tls_channel(device.address, other / "ca.pem")),
                ("plaintext", grpc.aio.insecure_channel(device.address)),
            ):
                async with channel:
                    try:
                        reply = await rocoin_pb2_grpc.DeviceStub(channel).Infer(request(images(1)), timeout=3)
                        outcomes[label] = reply.device_id
                    except grpc.aio.AioRpcError as exc:
                        outcomes[label] = exc.code()
            async with _tls_channel(device.address, good / "ca.pem") as channel:  # still serving
                outcomes["again"] = (await rocoin_pb2_grpc.DeviceStub(channel).Infer(request(images(1)), timeout=3)).device_id
        finally:
            await device.stop(0)
        return outcomes

    outcomes = run(main())
    assert outcomes["right CA"] == "a" and outcomes["again"] == "a"
    assert outcomes["wrong CA"] == grpc.StatusCode.UNAVAILABLE
    assert outcomes["plaintext"] == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(bundle, certs):
    from rocoin.runtime.transport.tls import ServerTLS

    good, other = certs / "good", certs / "other"

    async def main():
        tls = ServerTLS(good / "device.pem", good / "device.key", client_ca=good / "ca.pem")
        device = await start_device(bundle, "a", tls=tls)
        outcomes = {}
        try:
            for label, channel in (
                ("no client cert", _tls_channel(device.address, good / "ca.pem")),
                ("foreign client cert", _tls_channel(device.address, good / "ca.pem", other / "source.pem", other / "source.key")),
                ("client cert", _tls_channel(device.address, good / "ca.pem", good / "source.pem", good / "source.key")),
            ):
                async with channel:
                    try:
                        outcomes[label] = (await rocoin_pb2_grpc.DeviceStub(channel).Infer(request(images(1)), timeout=3)).device_id
                    except grpc.aio.AioRpcError as exc:
                        outcomes[label] = exc.code()
        finally:
            await device.stop(0)
        return outcomes

    outcomes = run(main())
    assert outcomes["client cert"] == "a"
    assert outcomes["no client cert"] == grpc.StatusCode.UNAVAILABLE
    assert outcomes["foreign client cert"] == grpc.StatusCode.UNAVAILABLE


def test_the_source_talks_mtls_with_a_token_to_every_device(bundle, certs):
    from conftest import device as profile

    from rocoin.contracts.fleet import Fleet
    from rocoin.runtime.source.source import Source
    from rocoin.runtime.transport.tls import ClientTLS, ServerTLS

    good = certs / "good"
    token = "a-token-shared-by-source-and-devices"

    async def main():
        tls = ServerTLS(good / "device.pem", good / "device.key", client_ca=good / "ca.pem")
        devices = [await start_device(bundle, name, tls=tls, token=token) for name in ("a", "b", "c")]
        try:
            fleet = Fleet(devices=[profile(d.worker.device_id, 20, 4, 300, 0.1, address=d.address) for d in devices])
            client_tls = ClientTLS(good / "ca.pem", good / "source.pem", good / "source.key")
            async with Source(bundle, fleet, deadline_s=2.0, token=token, tls=client_tls) as source:
                return await source.infer(np.zeros((1, 1, 8, 8), dtype=np.uint8))
        finally:
            for d in devices:
                await d.stop(0)

    result = run(main())
    assert result.missing_groups == [] and set(result.answered_by) <= {"a", "b", "c"}


def test_bad_certificate_files_get_one_line(tmp_path):
    from rocoin.runtime.transport.tls import ClientTLS, ServerTLS

    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(RocoinError, match="tls-key = .*not a PEM file"):
        ServerTLS(tmp_path / "junk.pem", tmp_path / "junk.pem").credentials()
    with pytest.raises(RocoinError, match="tls-ca = .*cannot read it"):
        ClientTLS(tmp_path / "missing.pem").credentials()


def test_the_source_client_apis_with_token_and_tls(bundle, certs):
    import ssl

    import aiohttp
    from conftest import device as profile

    from rocoin.contracts.fleet import Fleet
    from rocoin.runtime.api.server import serve_source
    from rocoin.runtime.source.source import Source
    from rocoin.runtime.transport.auth import token_metadata
    from rocoin.runtime.transport.tls import ServerTLS

    good = certs / "good"
    api_token = "client-token-0123456789abc"
    ready = Path(certs) / "source.ready.json"

    async def main():
        devices = [await start_device(bundle, name, insecure=True) for name in ("a", "b", "c")]
        fleet = Fleet(devices=[profile(d.worker.device_id, 20, 4, 300, 0.1, address=d.address) for d in devices])
        stop = asyncio.Event()
        task = asyncio.ensure_future(
            serve_source(
                Source(bundle, fleet, deadline_s=2.0, insecure=True),
                "127.0.0.1:0",
                http_listen="127.0.0.1:0",
                api_token=api_token,
                tls=ServerTLS(good / "device.pem", good / "device.key"),
                ready_file=ready,
                stop=stop,
            )
        )
        try:
            while not ready.exists():
                await asyncio.sleep(0.02)
            info = json.loads(ready.read_text())
            images = np.zeros((1, 1, 8, 8), dtype=np.uint8)
            req = rocoin_pb2.SourceInferRequest(input=tensor_to_proto(images))
            async with _tls_channel(info["address"], good / "ca.pem") as channel:
                stub = rocoin_pb2_grpc.SourceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Infer(req, timeout=5)
                reply = await stub.Infer(req, timeout=5, metadata=token_metadata(api_token))
            context = ssl.create_default_context(cafile=str(good / "ca.pem"))
            async with aiohttp.ClientSession() as session:
                url = f"https://{info['http_address']}/v2/models/rocoin/infer"
                body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "UINT8", "data": [0] * 64}]}
                async with session.post(url, json=body, ssl=context) as response:
                    no_token = response.status
                async with session.post(url, json=body, ssl=context, headers={"Authorization": f"Bearer {api_token}"}) as response:
                    with_token = response.status
            return refused.value.code(), list(reply.missing_groups), no_token, with_token
        finally:
            stop.set()
            await task
            for d in devices:
                await d.stop(0)

    refused, missing, no_token, with_token = run(main())
    assert refused == grpc.StatusCode.UNAUTHENTICATED and missing == []
    assert no_token == 401 and with_token == 200
