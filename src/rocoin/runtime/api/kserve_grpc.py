"""The Open Inference Protocol's gRPC API (``inference.GRPCInferenceService``) on the source.

ModelInfer takes the image batch as ``raw_input_contents`` (little-endian, row-major) or as
typed ``contents``; the answer carries ``logits`` (FP32) and ``missing_groups`` (INT32) as raw
output contents (only those the request's ``outputs`` name, when it names any), plus the number
of missing groups and the latency in ``parameters``.

A malformed request gets ``INVALID_ARGUMENT`` (unknown model: ``NOT_FOUND``) with one line, and
one log line without a traceback; only a bug on our side is ``INTERNAL`` with a traceback.
"""

from __future__ import annotations

import grpc
import numpy as np

from rocoin.contracts.errors import RocoinError, ServingError
from rocoin.runtime.api.binary_tensors import check_requested_output
from rocoin.runtime.api.oip import (
    MAX_INPUT_VALUES,
    MODEL_NAME,
    MODEL_VERSION,
    ProtocolError,
    check_model,
    check_shape,
    images_from,
    result_tensors,
    server_metadata,
    source_metadata,
)
from rocoin.runtime.source.source import Source
from rocoin.runtime.transport.grpc_server import refuse
from rocoin.runtime.transport.protocol import inference_pb2 as pb
from rocoin.runtime.transport.protocol import inference_pb2_grpc

_STATUS_TO_CODE = {404: grpc.StatusCode.NOT_FOUND, 401: grpc.StatusCode.UNAUTHENTICATED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED}
#: The KServe probes, open without the API token like the REST API's /v2/health/*.
HEALTH_METHODS = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady")

_LITTLE_ENDIAN = {"UINT8": np.dtype("u1"), "FP32": np.dtype("<f4")}


class InferenceService(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, source: Source) -> None:
        self.source = source
        self.output_names = [output["name"] for output in source_metadata(source)["outputs"]]

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.source.ready)

    async def ModelReady(self, request, context):
        await self._check(context, request.name, request.version)
        return pb.ModelReadyResponse(ready=self.source.ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(self, request, context):
        await self._check(context, request.name, request.version)
        meta = source_metadata(self.source)
        tensors = lambda items: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in items]  # noqa: E731
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=tensors(meta["inputs"]),
            outputs=tensors(meta["outputs"]),
        )

    async def ModelInfer(self, request, context):
        await self._check(context, request.model_name, request.model_version)
        try:
            images = _images(request)
            wanted = self._requested_outputs(request)
            result = await self.source.infer(images, query_id=request.id or None)
        except ProtocolError as exc:
            await refuse(context, "ModelInfer", _STATUS_TO_CODE.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
        except RocoinError as exc:
            await refuse(context, "ModelInfer", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ServingError as exc:
            await refuse(context, "ModelInfer", grpc.StatusCode.INTERNAL, str(exc))
        tensors = result_tensors(result)
        missing = tensors[-1][2]
        if wanted:
            by_name = {name: (name, datatype, array) for name, datatype, array in tensors}
            tensors = [by_name[name] for name in wanted]
        return pb.ModelInferResponse(
            model_name=MODEL_NAME,
            model_version=MODEL_VERSION,
            id=result.query_id,
            parameters={
                "missing_groups": pb.InferParameter(int64_param=len(missing)),
                "latency_us": pb.InferParameter(int64_param=int(result.latency_s * 1e6)),
            },
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=list(array.shape))
                for name, datatype, array in tensors
            ],
            raw_output_contents=[array.tobytes() for _, _, array in tensors],
        )

    def _requested_outputs(self, request: pb.ModelInferRequest) -> list[str]:
        """The outputs the request names, in its order (none named: all of them)."""
        wanted: list[str] = []
        for i, output in enumerate(request.outputs):
            wanted.append(check_requested_output(f"outputs[{i}]", output.name, output.parameters, self.output_names, wanted))
        return wanted

    async def _check(self, context, name: str, version: str) -> None:
        try:
            check_model(name, version)
        except ProtocolError as exc:
            await refuse(context, "model lookup", grpc.StatusCode.NOT_FOUND, str(exc))


def _images(request: pb.ModelInferRequest) -> np.ndarray:
    if len(request.inputs) != 1:
        raise ProtocolError(400, f"inputs: {len(request.inputs)} tensors: expected one named 'input'")
    tensor = request.inputs[0]
    shape = check_shape(list(tensor.shape))
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise ProtocolError(400, f"raw_input_contents: {len(request.raw_input_contents)} entries: expected one per input (1)")
        dtype = _LITTLE_ENDIAN.get(tensor.datatype)
        if dtype is None:
            images_from(tensor.name, tensor.datatype, shape, np.zeros(0))  # raises the datatype error
        raw = request.raw_input_contents[0]
        if len(raw) > MAX_INPUT_VALUES * dtype.itemsize:
            raise ProtocolError(413, f"raw_input_contents[0]: {len(raw)} bytes: expected at most {MAX_INPUT_VALUES * dtype.itemsize}")
        if len(raw) % dtype.itemsize:
            raise ProtocolError(400, f"raw_input_contents[0]: {len(raw)} bytes is not a whole number of {tensor.datatype} values")
        values = np.frombuffer(raw, dtype=dtype).astype(np.float64)
    elif tensor.datatype == "FP32":
        values = np.asarray(tensor.contents.fp32_contents, dtype=np.float64)
    else:
        values = np.asarray(tensor.contents.uint_contents, dtype=np.float64)
    return images_from(tensor.name, tensor.datatype, shape, values)


def add_to_server(source: Source, server: grpc.aio.Server) -> None:
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(source), server)
