"""The source's KServe v2 REST API over real HTTP on 127.0.0.1, in front of real device workers."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("onnxruntime")

import aiohttp  # noqa: E402
from conftest import device as profile  # noqa: E402
from test_device import make_bundle, start_device  # noqa: E402

from rocoin.contracts.fleet import Fleet  # noqa: E402
from rocoin.runtime.api.http import start_http  # noqa: E402
from rocoin.runtime.source.source import Source  # noqa: E402


def run_with_server(bundle, scenario, *, token=None):
    """Start devices a, b, c and the source with its REST API; run ``scenario(session, base_url)``."""

    async def main():
        devices = [await start_device(bundle, name, insecure=True) for name in ("a", "b", "c")]
        fleet = Fleet(devices=[profile(d.worker.device_id, 20, 4, 300, 0.1, address=d.address) for d in devices])
        source = Source(bundle, fleet, deadline_s=2.0, insecure=True)
        await source.start()
        http = await start_http(source, "127.0.0.1:0", token=token)
        try:
            async with aiohttp.ClientSession() as session:
                return await scenario(session, f"http://{http.address}", devices)
        finally:
            await http.close()
            await source.close()
            for d in devices:
                await d.stop(0)

    return asyncio.run(main())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def infer_body(images: np.ndarray, datatype: str = "UINT8") -> dict:
    return {"id": "q1", "inputs": [{"name": "input", "shape": list(images.shape), "datatype": datatype, "data": images.ravel().tolist()}]}


def test_health_metadata_and_infer(bundle):
    images = np.random.default_rng(0).integers(0, 256, size=(2, 1, 8, 8), dtype=np.uint8)

    async def scenario(session, base, devices):
        out = {}
        for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/rocoin", "/v2/models/rocoin/ready"):
            async with session.get(base + path) as response:
                out[path] = (response.status, await response.json())
        async with session.post(base + "/v2/models/rocoin/infer", json=infer_body(images)) as response:
            out["infer"] = (response.status, await response.json())
        floats = (images / 255.0).astype(np.float32)
        async with session.post(base + "/v2/models/rocoin/versions/1/infer", json=infer_body(floats, "FP32")) as response:
            out["infer fp32"] = (response.status, await response.json())
        await devices[0].stop(0)  # group 0's only device is gone
        async with session.post(base + "/v2/models/rocoin/infer", json=infer_body(images)) as response:
            out["degraded"] = (response.status, await response.json())
        return out

    out = run_with_server(bundle, scenario)
    assert out["/v2/health/live"] == (200, {"live": True})
    assert out["/v2/health/ready"] == (200, {"ready": True})
    assert out["/v2"][1]["name"] == "rocoin" and out["/v2"][1]["extensions"] == ["binary_tensor_data"]
    status, meta = out["/v2/models/rocoin"]
    assert status == 200 and meta["inputs"][0]["shape"] == [-1, 1, 8, 8] and meta["outputs"][0]["shape"] == [-1, 3]
    assert out["/v2/models/rocoin/ready"] == (200, {"name": "rocoin", "ready": True})
    status, answer = out["infer"]
    assert status == 200 and answer["id"] == "q1" and answer["model_name"] == "rocoin"
    logits = next(o for o in answer["outputs"] if o["name"] == "logits")
    assert logits["shape"] == [2, 3] and len(logits["data"]) == 6
    assert answer["parameters"]["missing_groups"] == 0
    np.testing.assert_allclose(
        next(o for o in out["infer fp32"][1]["outputs"] if o["name"] == "logits")["data"], logits["data"], rtol=1e-5, atol=1e-6
    )
    status, degraded = out["degraded"]
    assert status == 200 and degraded["parameters"]["missing_groups"] == 1
    assert next(o for o in degraded["outputs"] if o["name"] == "missing_groups")["data"] == [0]


@pytest.mark.parametrize(
    "path, body, headers, status, message",
    [
        ("/v2/models/other/infer", {}, {}, 404, "unknown model 'other'"),
        ("/v2/models/rocoin/infer", b"{garbage", {"Content-Type": "application/json"}, 400, "not valid JSON"),
        ("/v2/models/rocoin/infer", b"", {"Content-Type": "application/json"}, 400, "not valid JSON"),
        ("/v2/models/rocoin/infer", {"inputs": []}, {}, 400, "inputs: expected a list with one tensor"),
        (
            "/v2/models/rocoin/infer",
            {"inputs": [{"name": "input", "shape": [1, 2, 8, 8], "datatype": "UINT8", "data": [0] * 128}]},
            {},
            400,
            "expected (B, 1, 8, 8)",
        ),
        (
            "/v2/models/rocoin/infer",
            {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "INT64", "data": [0] * 64}]},
            {},
            400,
            "datatype = 'INT64'",
        ),
        (
            "/v2/models/rocoin/infer",
            {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [float("nan")] + [0.0] * 63}]},
            {},
            400,
            "NaN or Inf",
        ),
        (
            "/v2/models/rocoin/infer",
            {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "UINT8", "data": [0] * 10}]},
            {},
            400,
            "10 values but shape",
        ),
        (
            "/v2/models/rocoin/infer",
            {"inputs": [{"name": "input", "shape": [0, 1, 8, 8], "datatype": "UINT8", "data": []}]},
            {},
            400,
            "empty tensor",
        ),
        (
            "/v2/models/rocoin/infer",
            {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "UINT8", "data": [300] * 64}]},
            {},
            400,
            "0..255",
        ),
        (
            "/v2/models/rocoin/infer",
            b"\x00" * 16,
            {"Inference-Header-Content-Length": "8"},
            400,
            "JSON header (the first 8 bytes) is not valid JSON",
        ),
        (
            "/v2/models/rocoin/infer",
            {"inputs": [{"name": "input", "shape": [100, 1, 8, 8], "datatype": "UINT8", "data": [0] * 6400}]},
            {},
            400,
            "expected 1..64",
        ),
    ],
)
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(bundle, path, body, headers, status, message):
    good = infer_body(np.zeros((1, 1, 8, 8), dtype=np.uint8))

    async def scenario(session, base, devices):
        kwargs = {"data": body} if isinstance(body, bytes) else {"data": json.dumps(body)}
        async with session.post(base + path, headers=headers or {"Content-Type": "application/json"}, **kwargs) as response:
            bad = (response.status, await response.json())
        async with session.post(base + "/v2/models/rocoin/infer", json=good) as response:
            return bad, response.status

    (bad_status, bad_body), after = run_with_server(bundle, scenario)
    assert bad_status == status and message in bad_body["error"], bad_body
    assert after == 200


def test_an_oversized_body_is_refused(bundle):
    async def scenario(session, base, devices):
        async with session.post(
            base + "/v2/models/rocoin/infer", data=b"[" + b"0," * 2_000_000 + b"0]", headers={"Content-Type": "application/json"}
        ) as response:
            return response.status, await response.json()

    status, body = run_with_server(bundle, scenario)
    assert status == 413 and "too large" in body["error"]


def test_prometheus_metrics_count_queries_missing_groups_and_device_health(bundle):
    images = np.zeros((1, 1, 8, 8), dtype=np.uint8)

    async def scenario(session, base, devices):
        for _ in range(2):
            async with session.post(base + "/v2/models/rocoin/infer", json=infer_body(images)) as response:
                assert response.status == 200
        await devices[0].stop(0)  # group 0 ("a") is gone: its stream breaks and it is marked down
        for _ in range(3):
            async with session.post(base + "/v2/models/rocoin/infer", json=infer_body(images)) as response:
                assert response.status == 200
        async with session.get(base + "/metrics") as response:
            return response.status, response.headers["Content-Type"], await response.text()

    status, content_type, text = run_with_server(bundle, scenario)
    assert status == 200 and content_type.startswith("text/plain")
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert lines["rocoin_queries_total"] == 5
    assert lines["rocoin_query_latency_seconds_count"] == 5
    assert lines['rocoin_missing_groups_total{group="0"}'] == 3
    assert lines['rocoin_device_failures_total{device="a"}'] == 1  # the lost stream; no query waited for it
    assert lines['rocoin_device_up{device="a"}'] == 0 and lines['rocoin_device_up{device="b"}'] == 1
    assert lines['rocoin_group_latency_seconds_count{group="1"}'] == 5


def test_a_device_counts_its_requests_and_serves_metrics(bundle):
    import urllib.request

    from test_device import Client, request

    async def main():
        device = await start_device(bundle, "a", insecure=True)
        try:
            async with Client(device.address) as stub:
                await stub.Infer(request(np.zeros((1, 1, 8, 8), dtype=np.float32)), timeout=5)
                bad = np.zeros((1, 2, 8, 8), dtype=np.float32)
                with pytest.raises(Exception):  # noqa: B017 - any refusal will do: the test is about the metrics
                    await stub.Infer(request(bad), timeout=5)
            port = device.worker.metrics.serve("127.0.0.1:0")
            return await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
        finally:
            await device.stop(0)

    text = asyncio.run(main())
    assert 'rocoin_device_requests_total{code="OK"} 1.0' in text
    assert 'rocoin_device_requests_total{code="INVALID_ARGUMENT"} 1.0' in text
    assert "rocoin_device_run_seconds_count 1.0" in text


def test_the_api_token_guards_everything_but_health(bundle):
    token = "client-api-token-0123456789"
    body = infer_body(np.zeros((1, 1, 8, 8), dtype=np.uint8))

    async def scenario(session, base, devices):
        out = {}
        async with session.get(base + "/v2/health/ready") as response:
            out["health"] = response.status
        for label, headers in (("none", {}), ("wrong", {"Authorization": "Bearer nope"}), ("right", {"Authorization": f"Bearer {token}"})):
            async with session.post(base + "/v2/models/rocoin/infer", json=body, headers=headers) as response:
                out[label] = (response.status, await response.json())
        async with session.get(base + "/metrics") as response:
            out["metrics"] = response.status
        return out

    out = run_with_server(bundle, scenario, token=token)
    assert out["health"] == 200 and out["metrics"] == 401
    assert out["none"][0] == 401 and "bearer token" in out["none"][1]["error"]
    assert out["wrong"][0] == 401
    assert out["right"][0] == 200


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_rocoin_infer_speaks_the_rest_api(bundle, binary):
    pytest.importorskip("sklearn")
    from rocoin.data import load_dataset
    from rocoin.runtime.api.client import run_queries_http

    test = load_dataset("digits").test

    async def scenario(session, base, devices):
        return await run_queries_http(base, test.images[:12], test.labels[:12], concurrency=3, token="t" * 20, binary=binary)

    report = run_with_server(bundle, scenario, token="t" * 20)
    assert report["queries"] == 12 and report["queries_with_missing_groups"] == 0
    assert 0.0 <= report["accuracy"] <= 1.0 and report["latency_s"]["p50"] > 0


def test_an_independent_kserve_client_works_unchanged(bundle):
    """Triton's own HTTP client library (tritonclient) drives the REST API."""
    httpclient = pytest.importorskip("tritonclient.http")
    images = np.random.default_rng(5).integers(0, 256, size=(2, 1, 8, 8), dtype=np.uint8)

    def use_client(address: str):
        client = httpclient.InferenceServerClient(url=address)
        try:
            assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("rocoin")
            metadata = client.get_model_metadata("rocoin")
            tensor = httpclient.InferInput("input", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images, binary_data=False)
            outputs = [httpclient.InferRequestedOutput(name, binary_data=False) for name in ("logits", "missing_groups")]
            result = client.infer("rocoin", [tensor], outputs=outputs, request_id="triton-1")
            return metadata, result.as_numpy("logits"), result.as_numpy("missing_groups"), result.get_response()["id"]
        finally:
            client.close()

    async def scenario(session, base, devices):
        via_triton = await asyncio.to_thread(use_client, base.removeprefix("http://"))
        async with session.post(base + "/v2/models/rocoin/infer", json=infer_body(images)) as response:
            ours = await response.json()
        return via_triton, ours

    (metadata, logits, missing, request_id), ours = run_with_server(bundle, scenario)
    assert metadata["name"] == "rocoin" and request_id == "triton-1"
    assert logits.shape == (2, 3) and logits.dtype == np.float32 and missing.size == 0
    expected = next(o for o in ours["outputs"] if o["name"] == "logits")["data"]
    np.testing.assert_allclose(logits.ravel(), expected, rtol=1e-6)
