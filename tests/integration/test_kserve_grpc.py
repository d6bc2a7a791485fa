"""The source's Open Inference Protocol gRPC API (inference.GRPCInferenceService) on a real port."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from conftest import device as profile  # noqa: E402
from test_device import make_bundle, start_device  # noqa: E402

from rocoin.contracts.fleet import Fleet  # noqa: E402
from rocoin.runtime.api import kserve_grpc  # noqa: E402
from rocoin.runtime.source.source import Source  # noqa: E402
from rocoin.runtime.transport.protocol import inference_pb2 as pb  # noqa: E402
from rocoin.runtime.transport.protocol import inference_pb2_grpc  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@contextlib.asynccontextmanager
async def kserve_service(bundle):
    """Three device workers, the source and its KServe gRPC API on loopback: ``(source, port)``."""
    devices = [await start_device(bundle, name, insecure=True) for name in ("a", "b", "c")]
    fleet = Fleet(devices=[profile(d.worker.device_id, 20, 4, 300, 0.1, address=d.address) for d in devices])
    source = Source(bundle, fleet, deadline_s=2.0, insecure=True)
    await source.start()
    server = grpc.aio.server()
    kserve_grpc.add_to_server(source, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield source, port
    finally:
        await server.stop(0)
        await source.close()
        for d in devices:
            await d.stop(0)


def with_service(bundle, scenario):
    async def main():
        async with kserve_service(bundle) as (_, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await scenario(inference_pb2_grpc.GRPCInferenceServiceStub(channel))

    return asyncio.run(main())


def raw_request(images: np.ndarray, **overrides) -> pb.ModelInferRequest:
    fields = dict(
        model_name="rocoin",
        id="q7",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="UINT8", shape=list(images.shape))],
        raw_input_contents=[images.tobytes()],
    )
    fields.update(overrides)
    return pb.ModelInferRequest(**fields)


def test_health_metadata_and_raw_infer(bundle):
    images = np.random.default_rng(3).integers(0, 256, size=(2, 1, 8, 8), dtype=np.uint8)

    async def scenario(stub):
        live = await stub.ServerLive(pb.ServerLiveRequest())
        ready = await stub.ServerReady(pb.ServerReadyRequest())
        model_ready = await stub.ModelReady(pb.ModelReadyRequest(name="rocoin"))
        server_meta = await stub.ServerMetadata(pb.ServerMetadataRequest())
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="rocoin"))
        raw = await stub.ModelInfer(raw_request(images))
        typed = await stub.ModelInfer(
            pb.ModelInferRequest(
                model_name="rocoin",
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name="input",
                        datatype="UINT8",
                        shape=[2, 1, 8, 8],
                        contents=pb.InferTensorContents(uint_contents=images.ravel().tolist()),
                    )
                ],
            )
        )
        return live, ready, model_ready, server_meta, meta, raw, typed

    live, ready, model_ready, server_meta, meta, raw, typed = with_service(bundle, scenario)
    assert live.live and ready.ready and model_ready.ready and server_meta.name == "rocoin"
    assert list(meta.inputs[0].shape) == [-1, 1, 8, 8] and meta.outputs[0].name == "logits"
    assert raw.id == "q7" and raw.outputs[0].name == "logits" and list(raw.outputs[0].shape) == [2, 3]
    logits = np.frombuffer(raw.raw_output_contents[0], dtype="<f4").reshape(2, 3)
    assert raw.parameters["missing_groups"].int64_param == 0
    np.testing.assert_allclose(np.frombuffer(typed.raw_output_contents[0], dtype="<f4").reshape(2, 3), logits, rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, code, message",
    [
        ({"model_name": "other"}, grpc.StatusCode.NOT_FOUND, "unknown model 'other'"),
        ({"raw_input_contents": [b"\x00" * 10]}, grpc.StatusCode.INVALID_ARGUMENT, "10 values but shape"),
        ({"inputs": []}, grpc.StatusCode.INVALID_ARGUMENT, "expected one named 'input'"),
        (
            {"inputs": [pb.ModelInferRequest.InferInputTensor(name="input", datatype="INT8", shape=[1, 1, 8, 8])]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "datatype = 'INT8'",
        ),
        (
            {
                "inputs": [pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 1, 8, 8])],
                "raw_input_contents": [np.full(64, np.nan, "<f4").tobytes()],
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "NaN or Inf",
        ),
        (
            {
                "inputs": [pb.ModelInferRequest.InferInputTensor(name="input", datatype="UINT8", shape=[1, 3, 8, 8])],
                "raw_input_contents": [bytes(192)],
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "expected (B, 1, 8, 8)",
        ),
        (
            {"outputs": [pb.ModelInferRequest.InferRequestedOutputTensor(name="probs")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "outputs[0].name = 'probs': expected one of logits, missing_groups",
        ),
        (
            {
                "outputs": [
                    pb.ModelInferRequest.InferRequestedOutputTensor(
                        name="logits", parameters={"shared_memory_region": pb.InferParameter(string_param="region")}
                    )
                ]
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "outputs[0].parameters.shared_memory_region: the shared memory extension is not supported",
        ),
    ],
)
def test_bad_requests_get_a_clear_status_and_the_service_keeps_serving(bundle, overrides, code, message):
    images = np.zeros((1, 1, 8, 8), dtype=np.uint8)

    async def scenario(stub):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(raw_request(images, **overrides))
        good = await stub.ModelInfer(raw_request(images))
        return info.value, good

    error, good = with_service(bundle, scenario)
    assert error.code() == code and message in error.details(), error.details()
    assert good.outputs[0].name == "logits"


def test_only_the_outputs_asked_for_come_back_in_their_order(bundle):
    images = np.zeros((1, 1, 8, 8), dtype=np.uint8)
    wanted = [pb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in ("missing_groups", "logits")]

    async def scenario(stub):
        return await stub.ModelInfer(raw_request(images, outputs=wanted)), await stub.ModelInfer(raw_request(images))

    chosen, everything = with_service(bundle, scenario)
    assert [o.name for o in chosen.outputs] == ["missing_groups", "logits"] and len(chosen.raw_output_contents) == 2
    assert chosen.raw_output_contents[1] == everything.raw_output_contents[0] and chosen.raw_output_contents[0] == b""
    assert [o.name for o in everything.outputs] == ["logits", "missing_groups"]
