"""Triton's binary tensor data extension on the source's REST API, over real HTTP on 127.0.0.1.

``tritonclient.http`` with its default calls (binary inputs, binary outputs asked for with
``binary_data_output``), JSON and binary mixed per tensor, and malformed binary bodies: each a
400 naming the field, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("onnxruntime")

import multidict  # noqa: E402
from test_device import make_bundle  # noqa: E402
from test_http_api import infer_body, run_with_server  # noqa: E402

from rocoin.runtime.api.binary_tensors import HEADER, decode_response, encode_request  # noqa: E402

INFER = "/v2/models/rocoin/infer"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


async def post(session, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, dict[str, np.ndarray]]:
    """POST ``body``; the status, the answer's JSON and its outputs as arrays."""
    async with session.post(url, data=body, headers=headers) as response:
        raw = await response.read()
        if response.status != 200:
            return response.status, json.loads(raw), {}
        reply, arrays = decode_response(raw, response.headers.get(HEADER))
        return response.status, reply, arrays


def json_logits(reply: dict) -> np.ndarray:
    logits = next(o for o in reply["outputs"] if o["name"] == "logits")
    return np.asarray(logits["data"], dtype=np.float32).reshape(logits["shape"])


def test_tritonclient_http_default_calls_send_and_get_binary_tensors(bundle):
    httpclient = pytest.importorskip("tritonclient.http")
    images = np.random.default_rng(11).integers(0, 256, size=(3, 1, 8, 8), dtype=np.uint8)
    floats = (images / 255.0).astype(np.float32)

    def use_client(address: str):
        client = httpclient.InferenceServerClient(address)  # every setting at its default
        try:
            out = {"server": client.get_server_metadata()}
            for label, x, datatype in (("uint8", images, "UINT8"), ("fp32", floats, "FP32")):
                tensor = httpclient.InferInput("input", list(x.shape), datatype)
                tensor.set_data_from_numpy(x)  # binary_data=True by default
                result = client.infer("rocoin", inputs=[tensor], outputs=None)  # asks for binary outputs
                response = result.get_response()
                out[label] = (result.as_numpy("logits"), result.as_numpy("missing_groups"), response)
            return out
        finally:
            client.close()

    async def use_aio_client(address: str):
        from tritonclient.http.aio import InferenceServerClient, InferInput

        client = InferenceServerClient(address)  # the asyncio flavour, defaults too
        try:
            tensor = InferInput("input", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images)
            result = await client.infer("rocoin", inputs=[tensor])
            return result.as_numpy("logits"), result.as_numpy("missing_groups"), result.get_response()
        finally:
            await client.close()

    async def scenario(session, base, devices):
        via_triton = await asyncio.to_thread(use_client, base.removeprefix("http://"))
        via_triton["aio"] = await use_aio_client(base.removeprefix("http://"))
        async with session.post(base + INFER, json=infer_body(images)) as response:
            return via_triton, response.status, await response.json()

    via_triton, status, ours = run_with_server(bundle, scenario)
    assert status == 200
    assert "binary_tensor_data" in via_triton["server"]["extensions"]
    expected = json_logits(ours)
    for label in ("uint8", "fp32", "aio"):
        logits, missing, response = via_triton[label]
        assert logits.shape == (3, 3) and logits.dtype == np.float32 and missing.size == 0
        # the answer really was binary: sizes instead of data
        assert {o["name"]: o["parameters"]["binary_data_size"] for o in response["outputs"]} == {"logits": 36, "missing_groups": 0}
        assert all("data" not in o for o in response["outputs"])
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(logits.argmax(axis=1), expected.argmax(axis=1))


def test_json_and_binary_mix_per_tensor(bundle):
    images = np.random.default_rng(12).integers(0, 256, size=(2, 1, 8, 8), dtype=np.uint8)

    async def scenario(session, base, devices):
        url = base + INFER
        out = {}
        body, headers = encode_request(images, query_id="bin-bin")
        out["binary both ways"] = await post(session, url, body, headers)
        body, headers = encode_request(images, query_id="json-bin", binary_input=False)
        out["JSON in, binary out"] = await post(session, url, body, headers)
        body, headers = encode_request(images, query_id="bin-json", binary_output=False)
        out["binary in, JSON out"] = await post(session, url, body, headers)
        # binary_data_output asks for all, a per-output binary_data overrides it; only named outputs come back
        header = {
            "id": "chosen",
            "parameters": {"binary_data_output": True},
            "inputs": [
                {"name": "input", "shape": list(images.shape), "datatype": "UINT8", "parameters": {"binary_data_size": images.size}}
            ],
            "outputs": [{"name": "missing_groups"}, {"name": "logits", "parameters": {"binary_data": False}}],
        }
        head = json.dumps(header).encode()
        async with session.post(url, data=head + images.tobytes(), headers={HEADER: str(len(head))}) as response:
            raw = await response.read()
            out["chosen"] = (response.status, response.headers.get(HEADER), raw)
        async with session.post(url, json=infer_body(images)) as response:
            out["JSON"] = await response.json()
        return out

    out = run_with_server(bundle, scenario)
    expected = json_logits(out.pop("JSON"))
    status, raw_header, raw = out.pop("chosen")
    assert status == 200 and raw_header is not None
    reply, arrays = decode_response(raw, raw_header)
    assert [o["name"] for o in reply["outputs"]] == ["missing_groups", "logits"]
    assert reply["outputs"][0]["parameters"] == {"binary_data_size": 0} and "data" in reply["outputs"][1]
    np.testing.assert_allclose(arrays["logits"], expected, rtol=1e-6)
    for label, (status, reply, arrays) in out.items():
        assert status == 200, (label, reply)
        assert reply["id"] == label.replace(" ", "") or reply["id"] in ("bin-bin", "json-bin", "bin-json")
        assert arrays["logits"].shape == (2, 3) and arrays["missing_groups"].size == 0
        np.testing.assert_allclose(arrays["logits"], expected, rtol=1e-6, err_msg=label)
    assert out["binary in, JSON out"][1]["outputs"][0]["data"]  # JSON answer: values inline
    assert "parameters" in out["JSON in, binary out"][1]["outputs"][0]


def _binary(header: dict | bytes, data: bytes, length: str | None = None) -> tuple[bytes, dict[str, str]]:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return head + data, {HEADER: str(len(head)) if length is None else length}


def _request(shape=(1, 1, 8, 8), datatype="UINT8", size=64, **tensor) -> dict:
    return {"inputs": [{"name": "input", "shape": list(shape), "datatype": datatype, "parameters": {"binary_data_size": size}, **tensor}]}


MALFORMED = [
    ("header not a number", _binary(_request(), bytes(64), "abc"), "Inference-Header-Content-Length = 'abc'"),
    ("header negative", _binary(_request(), bytes(64), "-5"), "Inference-Header-Content-Length = '-5'"),
    ("header zero", _binary(_request(), bytes(64), "0"), "Inference-Header-Content-Length = '0'"),
    ("header past the body", _binary(_request(), bytes(64), "100000"), "an integer in 1.."),
    ("header of 40 digits", _binary(_request(), bytes(64), "9" * 40), "Inference-Header-Content-Length"),
    ("header twice", (_binary(_request(), bytes(64))[0], {"Content-Type": "application/octet-stream"}), "2 headers: expected one"),
    ("header cuts the JSON", _binary(_request(), bytes(64), "20"), "JSON header (the first 20 bytes) is not valid JSON"),
    ("header not JSON", _binary(b"\x00" * 8, bytes(8)), "is not valid JSON"),
    ("size below the shape", _binary(_request(size=63), bytes(63)), "binary_data_size = 63: expected 64"),
    ("size above the shape", _binary(_request(size=65), bytes(65)), "binary_data_size = 65: expected 64"),
    ("FP32 counted as bytes", _binary(_request(datatype="FP32", size=64), bytes(64)), "expected 256 (shape [1, 1, 8, 8] x 4 bytes"),
    ("bytes left over", _binary(_request(), bytes(70)), "70 bytes after the JSON header but the inputs' binary_data_size add up to 64"),
    ("bytes missing", _binary(_request(), bytes(10)), "only 10 bytes of binary data left"),
    ("size negative", _binary(_request(size=-64), bytes(64)), "binary_data_size = -64: expected a non-negative integer"),
    ("size a string", _binary(_request(size="64"), bytes(64)), "binary_data_size = '64': expected a non-negative integer"),
    ("size a bool", _binary(_request(size=True), bytes(1)), "binary_data_size = True"),
    ("size without the header", (json.dumps(_request()).encode(), {}), "needs the Inference-Header-Content-Length header"),
    ("data and size", _binary(_request(data=[0] * 64), bytes(64)), "both 'data' and parameters.binary_data_size"),
    ("BYTES refused", _binary(_request(datatype="BYTES", size=68), bytes(68)), "datatype = 'BYTES': expected one of FP32, UINT8"),
    ("INT64 refused", _binary(_request(datatype="INT64", size=512), bytes(512)), "datatype = 'INT64'"),
    ("NaN in FP32 bytes", _binary(_request(datatype="FP32", size=256), np.full(64, np.nan, "<f4").tobytes()), "NaN or Inf"),
    ("wrong image shape", _binary(_request(shape=(1, 2, 4, 8)), bytes(64)), "expected (B, 1, 8, 8)"),
    ("one-dimensional input", _binary(_request(shape=(1,), size=1), bytes(1)), "input shape (1,): expected (B, 1, 8, 8)"),
    ("parameters not an object", _binary({"inputs": [{"name": "input", "parameters": [1]}]}, b""), "inputs[0].parameters = [1]"),
    (
        "binary_data_output not a bool",
        _binary({**_request(), "parameters": {"binary_data_output": "yes"}}, bytes(64)),
        "binary_data_output = 'yes'",
    ),
    (
        "unknown output",
        _binary({**_request(), "outputs": [{"name": "probs"}]}, bytes(64)),
        "outputs[0].name = 'probs': expected one of logits",
    ),
    (
        "classification asked",
        _binary({**_request(), "outputs": [{"name": "logits", "parameters": {"classification": 2}}]}, bytes(64)),
        "classification extension is not supported",
    ),
]


def test_malformed_binary_bodies_get_one_clear_400_and_the_server_keeps_serving(bundle):
    good, good_headers = encode_request(np.zeros((1, 1, 8, 8), dtype=np.uint8), query_id="good")

    async def scenario(session, base, devices):
        answers = {}
        for label, (body, headers), _ in MALFORMED:
            if label == "header twice":
                length = str(len(json.dumps(_request()).encode()))
                headers = multidict.CIMultiDict([*headers.items(), (HEADER, length), (HEADER, length)])
            async with session.post(base + INFER, data=body, headers=headers) as response:
                answers[label] = (response.status, await response.json())
        answers["after"] = await post(session, base + INFER, good, good_headers)
        return answers

    answers = run_with_server(bundle, scenario)
    for label, _, message in MALFORMED:
        status, body = answers[label]
        assert status == 400 and message in body["error"] and "\n" not in body["error"], (label, body)
    assert answers["after"][0] == 200


def test_rocoin_client_reads_the_same_detections_binary_and_json(tmp_path):
    pytest.importorskip("torch")
    from test_detection_runtime import detection_source, make_detection_bundle
    from test_detection_runtime import images as detection_images

    from rocoin.runtime.api.client import http_infer
    from rocoin.runtime.api.http import start_http

    bundle = make_detection_bundle(tmp_path / "bundle")

    async def scenario():
        async with detection_source(bundle) as (source, _):
            http = await start_http(source, "127.0.0.1:0")
            try:
                image = detection_images(3, batch=1)
                answers = {}
                for binary in (True, False):
                    async with http_infer(f"http://{http.address}", binary=binary) as infer:
                        answers[binary] = await infer(image)
                return answers
            finally:
                await http.close()

    answers = asyncio.run(scenario())
    binary, as_json = answers[True], answers[False]
    assert binary.prediction == as_json.prediction == -1 and binary.missing_groups == as_json.missing_groups == ()
    boxes, scores, labels = binary.detections
    assert boxes.shape == (len(scores), 4) and labels.shape == scores.shape and len(scores) > 0
    for got, want in zip(binary.detections, as_json.detections):
        np.testing.assert_array_equal(got, want)  # float32 values survive JSON exactly
