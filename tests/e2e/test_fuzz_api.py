"""Fuzzing the client APIs and the device RPC (hypothesis): every request is a well-formed
envelope with ONE field mutated (replaced by any JSON value / protobuf value, deleted, or an
unknown one added), or the bytes of a valid request damaged, so that the mutations reach the
deeper checks instead of failing at the first.

The property: a 2xx with valid JSON (finite logits), or a 4xx / ``INVALID_ARGUMENT`` (``NOT_FOUND``
for an unknown model, ``RESOURCE_EXHAUSTED`` for a message over the size limit) with a one-line
message; never a 5xx / ``UNKNOWN`` / ``INTERNAL``; the server keeps serving and no device is
marked down. Bounded to well under a minute (the example counts below).
"""

from __future__ import annotations

import http.client
import json
import math
from typing import Any

import grpc
import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("aiohttp")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from serving import DEVICE_TOKEN, BackgroundStack, Stack  # noqa: E402
from test_device import make_bundle  # noqa: E402

from rocoin.runtime.api.binary_tensors import HEADER, decode_response, encode_request  # noqa: E402
from rocoin.runtime.transport.auth import token_metadata  # noqa: E402
from rocoin.runtime.transport.protocol import inference_pb2 as pb  # noqa: E402
from rocoin.runtime.transport.protocol import rocoin_pb2  # noqa: E402

REST_EXAMPLES = 250
BINARY_EXAMPLES = 150
GRPC_EXAMPLES = 150


def fuzz(examples: int) -> settings:
    """Fixed examples (derandomised: the same run every time, no example database)."""
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)


#: gRPC codes a malformed request may get: the client's fault, said in one line.
CLIENT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    bundle = make_bundle(tmp_path_factory.mktemp("bundle"))
    with BackgroundStack(bundle) as running:
        yield running


# ----------------------------------------------------------------------------- strategies

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),  # NaN and +-Infinity too: Python's json writes and reads them
    st.text(max_size=20),
    st.sampled_from(["UINT8", "FP32", "input", "rocoin", "\ud800", "q\nrocoin: WARNING: forged", "1" * 200]),
)
json_values = st.recursive(
    json_leaves, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=30
)
shapes = st.lists(st.one_of(st.integers(min_value=-3, max_value=70), st.integers(min_value=-(2**70), max_value=2**70)), max_size=12)


@st.composite
def damaged(draw, message: bytes) -> bytes:
    """``message`` truncated, or with a few random bytes inserted or written over."""
    at = draw(st.integers(min_value=0, max_value=len(message)))
    how = draw(st.sampled_from(["truncate", "insert", "replace"]))
    junk = draw(st.binary(min_size=1, max_size=4))
    return message[:at] if how == "truncate" else message[:at] + junk + message[at + (len(junk) if how == "replace" else 0) :]


def valid_rest_body(batch: int = 1) -> dict:
    data = np.random.default_rng(batch).integers(0, 256, size=(batch, 1, 8, 8)).ravel().tolist()
    return {"id": "fuzz", "inputs": [{"name": "input", "shape": [batch, 1, 8, 8], "datatype": "UINT8", "data": data}], "parameters": {}}


REST_PATHS = [
    ("id",),
    ("inputs",),
    ("inputs", 0),
    ("inputs", 0, "name"),
    ("inputs", 0, "shape"),
    ("inputs", 0, "datatype"),
    ("inputs", 0, "data"),
    ("parameters",),
]


def _at(body: Any, path: tuple) -> tuple[Any, Any]:
    for key in path[:-1]:
        body = body[key]
    return body, path[-1]


@st.composite
def rest_bodies(draw) -> bytes:
    body = valid_rest_body(draw(st.sampled_from([1, 2])))
    kind = draw(st.sampled_from(["replace", "delete", "add", "values", "shape", "bytes", "nest"]))
    if kind in ("replace", "delete"):
        parent, key = _at(body, draw(st.sampled_from(REST_PATHS)))
        if kind == "delete":
            del parent[key]
        else:
            parent[key] = draw(json_values)
    elif kind == "add":
        parent = draw(st.sampled_from([body, body["inputs"][0]]))
        parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    elif kind == "values":
        tensor = body["inputs"][0]
        tensor["datatype"] = draw(st.sampled_from(["UINT8", "FP32"]))
        values = (
            st.floats() | st.integers(min_value=-(2**40), max_value=2**40) | st.sampled_from([0.0, 1.0, 255, 256, -1, 3e38, 1e36, 1e-45])
        )
        tensor["data"] = draw(st.lists(values, min_size=len(tensor["data"]), max_size=len(tensor["data"])))
    elif kind == "shape":
        body["inputs"][0]["shape"] = draw(shapes)
    elif kind == "nest":
        depth = draw(st.integers(min_value=2, max_value=6000))
        return b'{"inputs": [{"name": "input", "shape": [1], "datatype": "UINT8", "data": ' + b"[" * depth + b"0" + b"]" * depth + b"}]}"
    raw = json.dumps(body).encode()
    return draw(damaged(raw)) if kind == "bytes" else raw


def _no_constants(name: str):
    raise AssertionError(f"answer is not JSON: {name}")


def rest_post(address: str, raw: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST ``raw``; the status and the answer's JSON (a binary answer: its JSON with the outputs' values as lists)."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", "/v2/models/rocoin/infer", body=raw, headers=headers or {"Content-Type": "application/json"})
        response = connection.getresponse()
        body, json_length = response.read(), response.getheader(HEADER)
        if json_length is None:
            return response.status, json.loads(body, parse_constant=_no_constants)
        assert response.status == 200, (response.status, body[:300])
        reply, arrays = decode_response(body, json_length)
        for output in reply["outputs"]:
            output["data"] = arrays[output["name"]].ravel().tolist()
        return response.status, reply
    finally:
        connection.close()


def assert_rest_property(status: int, answer: Any) -> None:
    assert status < 500, (status, answer)
    if 200 <= status < 300:
        logits = answer["outputs"][0]["data"]
        assert all(isinstance(v, float) and math.isfinite(v) for v in logits)
    else:
        assert 400 <= status < 500 and set(answer) == {"error"} and "\n" not in answer["error"], (status, answer)


def assert_still_serving(stack: Stack) -> None:
    """The server answers a valid query with every group, and no device was marked down."""
    status, answer = rest_post(stack.http_address, json.dumps(valid_rest_body()).encode())
    assert status == 200 and answer["parameters"]["missing_groups"] == 0, answer
    assert stack.marked_down() == 0 and stack.device_failures() == 0, stack.source.status()


# ----------------------------------------------------------------------------- REST


def test_the_rest_infer_endpoint_under_fuzzing(stack):
    @fuzz(REST_EXAMPLES)
    @given(raw=rest_bodies())
    def one(raw):
        assert_rest_property(*rest_post(stack.http_address, raw))

    one()
    assert_still_serving(stack)


@st.composite
def binary_rest_bodies(draw) -> tuple[bytes, dict[str, str]]:
    """A valid binary-tensor request (Triton's extension) with its header, a size, the JSON or the bytes damaged."""
    batch = draw(st.sampled_from([1, 2]))
    images = np.random.default_rng(batch).integers(0, 256, size=(batch, 1, 8, 8)).astype(draw(st.sampled_from([np.uint8, np.float32])))
    raw, headers = encode_request(images, query_id="fuzz", binary_output=draw(st.booleans()))
    json_length = int(headers[HEADER])
    kind = draw(st.sampled_from(["header", "size", "json", "bytes", "tail"]))
    if kind == "header":
        headers[HEADER] = draw(
            st.integers(min_value=-5, max_value=len(raw) + 5).map(str) | st.sampled_from(["", " ", "1e3", "0x10", "9" * 40, "\u00b2"])
        )
    elif kind == "size":
        request = json.loads(raw[:json_length])
        request["inputs"][0]["parameters"]["binary_data_size"] = draw(json_values)
        head = json.dumps(request).encode()
        raw, headers[HEADER] = head + raw[json_length:], str(len(head))
    elif kind == "json":
        raw = draw(damaged(raw[:json_length])) + raw[json_length:]
    elif kind == "bytes":
        raw = raw[:json_length] + draw(damaged(raw[json_length:]))
    else:
        raw += draw(st.binary(min_size=1, max_size=8))
    return raw, headers


def test_the_rest_infer_endpoint_under_fuzzing_with_binary_bodies(stack):
    @fuzz(BINARY_EXAMPLES)
    @given(request=binary_rest_bodies())
    def one(request):
        assert_rest_property(*rest_post(stack.http_address, *request))

    one()
    assert_still_serving(stack)


# ----------------------------------------------------------------------------- gRPC

utf8_text = st.text(max_size=30).filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t))
protobuf_floats = st.floats(width=32) | st.sampled_from([3e38, 1e36, -1.0, 0.5, 256.0])


def valid_model_infer() -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="UINT8", shape=[1, 1, 8, 8])
    return pb.ModelInferRequest(model_name="rocoin", id="fuzz", inputs=[tensor], raw_input_contents=[bytes(range(64))])


@st.composite
def model_infer_requests(draw) -> bytes:
    request = valid_model_infer()
    tensor = request.inputs[0]
    kind = draw(st.sampled_from(["model", "id", "name", "datatype", "shape", "raw", "contents", "inputs", "parameters", "bytes"]))
    if kind == "model":
        request.model_name, request.model_version = draw(utf8_text), draw(utf8_text)
    elif kind == "id":
        request.id = draw(utf8_text | st.sampled_from(["q\nforged", "x" * 300]))
    elif kind == "name":
        tensor.name = draw(utf8_text)
    elif kind == "datatype":
        tensor.datatype = draw(utf8_text | st.sampled_from(["FP32", "INT8", "BYTES", "FP64"]))
    elif kind == "shape":
        del tensor.shape[:]
        tensor.shape.extend(draw(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=1100)))
    elif kind == "raw":
        del request.raw_input_contents[:]
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=300), max_size=3)))
        if draw(st.booleans()):
            tensor.datatype = "FP32"
    elif kind == "contents":
        del request.raw_input_contents[:]
        tensor.datatype = draw(st.sampled_from(["FP32", "UINT8"]))
        tensor.contents.fp32_contents.extend(draw(st.lists(protobuf_floats, max_size=70)))
        tensor.contents.uint_contents.extend(draw(st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=70)))
    elif kind == "inputs":
        request.inputs.add(name=draw(utf8_text), datatype="UINT8", shape=draw(st.lists(st.integers(min_value=0, max_value=9), max_size=4)))
    elif kind == "parameters":
        request.parameters[draw(utf8_text)].string_param = draw(utf8_text)
    raw = request.SerializeToString()
    return draw(damaged(raw)) if kind == "bytes" else raw


def valid_source_infer() -> rocoin_pb2.SourceInferRequest:
    return rocoin_pb2.SourceInferRequest(query_id="fuzz", input=rocoin_pb2.Tensor(shape=[1, 1, 8, 8], dtype="uint8", data=bytes(range(64))))


@st.composite
def source_infer_requests(draw) -> bytes:
    request = valid_source_infer()
    kind = draw(st.sampled_from(["id", "dtype", "shape", "data", "deadline", "bytes"]))
    if kind == "id":
        request.query_id = draw(utf8_text | st.sampled_from(["q\r\nforged", "x" * 300]))
    elif kind == "dtype":
        request.input.dtype = draw(utf8_text | st.sampled_from(["float32", "float64", "int8"]))
        if request.input.dtype == "float32":
            request.input.data = np.asarray(draw(st.lists(protobuf_floats, min_size=64, max_size=64)), dtype="<f4").tobytes()
    elif kind == "shape":
        del request.input.shape[:]
        request.input.shape.extend(draw(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=20)))
    elif kind == "data":
        request.input.data = draw(st.binary(max_size=200))
    elif kind == "deadline":
        request.deadline_s = draw(st.floats(width=32) | st.sampled_from([1e-9, 0.001, 299.0, 301.0]))
    raw = request.SerializeToString()
    return draw(damaged(raw)) if kind == "bytes" else raw


def grpc_call(address: str, method: str, raw: bytes, metadata=None):
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method)
        try:
            return grpc.StatusCode.OK, call(raw, timeout=30, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()


def assert_grpc_property(code, details) -> None:
    if code == grpc.StatusCode.OK:
        return
    assert code in CLIENT_CODES and details and "\n" not in details, (code, details)


def _model_infer_logits(reply: bytes) -> np.ndarray:
    return np.frombuffer(pb.ModelInferResponse.FromString(reply).raw_output_contents[0], dtype="<f4")


def _source_infer_logits(reply: bytes) -> np.ndarray:
    return np.frombuffer(rocoin_pb2.SourceInferResponse.FromString(reply).logits.data, dtype="<f4")


@pytest.mark.parametrize(
    "method, requests, logits",
    [
        ("/inference.GRPCInferenceService/ModelInfer", model_infer_requests, _model_infer_logits),
        ("/rocoin.v1.Source/Infer", source_infer_requests, _source_infer_logits),
    ],
    ids=["kserve ModelInfer", "Source Infer"],
)
def test_the_source_grpc_apis_under_fuzzing(stack, method, requests, logits):
    @fuzz(GRPC_EXAMPLES)
    @given(raw=requests())
    def one(raw):
        code, reply = grpc_call(stack.grpc_address, method, raw)
        assert_grpc_property(code, reply)
        if code == grpc.StatusCode.OK:
            assert np.isfinite(logits(reply)).all()

    one()
    assert_still_serving(stack)


def test_the_device_infer_rpc_under_fuzzing(stack):
    device_address = stack.devices["b"].address

    @st.composite
    def device_requests(draw) -> bytes:
        base = rocoin_pb2.DeviceInferRequest(
            query_id="fuzz", input=rocoin_pb2.Tensor(shape=[1, 1, 8, 8], dtype="float32", data=np.zeros(64, "<f4").tobytes())
        )
        kind = draw(st.sampled_from(["id", "dtype", "shape", "data", "timeout", "cancel", "bytes"]))
        if kind == "id":
            base.query_id = draw(utf8_text | st.sampled_from(["x" * 300]))
        elif kind == "dtype":
            base.input.dtype = draw(utf8_text)
        elif kind == "shape":
            del base.input.shape[:]
            base.input.shape.extend(draw(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=20)))
        elif kind == "data":
            base.input.data = np.asarray(draw(st.lists(protobuf_floats, min_size=64, max_size=64)), dtype="<f4").tobytes()
        elif kind == "timeout":
            base.timeout_s = draw(st.floats(width=32))
        elif kind == "cancel":
            base.cancel.extend(draw(st.lists(utf8_text, max_size=5)))
        raw = base.SerializeToString()
        return draw(damaged(raw)) if kind == "bytes" else raw

    @fuzz(GRPC_EXAMPLES)
    @given(raw=device_requests())
    def one(raw):
        code, reply = grpc_call(device_address, "/rocoin.v1.Device/Infer", raw, metadata=token_metadata(DEVICE_TOKEN))
        assert_grpc_property(code, reply)

    one()
    assert_still_serving(stack)
