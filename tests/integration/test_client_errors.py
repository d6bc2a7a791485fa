"""The client's failures are rocoin's error types, each with one line naming the endpoint."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

pytest.importorskip("grpc")
aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from rocoin.contracts.errors import RocoinError, ServingError, UnavailableError  # noqa: E402
from rocoin.runtime.api.client import run_queries, run_queries_http  # noqa: E402

IMAGES = np.zeros((2, 1, 4, 4), dtype=np.uint8)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_source_that_is_not_there_is_unavailable():
    port = _closed_port()
    with pytest.raises(UnavailableError, match=f"127.0.0.1:{port}"):
        asyncio.run(run_queries_http(f"http://127.0.0.1:{port}", IMAGES))
    with pytest.raises(UnavailableError, match="UNAVAILABLE"):
        asyncio.run(run_queries(f"127.0.0.1:{port}", IMAGES))


async def _serve(infer) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/v2/models/rocoin/infer", infer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


#: An answer whose output claims 12 binary bytes that do not follow its JSON.
CLAIMS_12_BYTES = b'{"parameters": {"latency_s": 0.1}, "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": 12}}]}'


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b'{"outputs": []}xx', {"Inference-Header-Content-Length": "99"}, "Inference-Header-Content-Length = '99'"),
        (CLAIMS_12_BYTES, {"Inference-Header-Content-Length": str(len(CLAIMS_12_BYTES))}, "claims 12 bytes of binary data"),
        (b"{not json", {}, "malformed answer"),
        (b'{"outputs": []}', {}, "malformed answer ('parameters')"),
    ],
)
def test_a_malformed_answer_is_a_serving_error(body, headers, message):
    async def scenario():
        async def infer(request):
            return web.Response(body=body, headers=headers)

        runner, port = await _serve(infer)
        try:
            await run_queries_http(f"http://127.0.0.1:{port}", IMAGES)
        finally:
            await runner.cleanup()

    with pytest.raises(ServingError, match="malformed answer") as caught:
        asyncio.run(scenario())
    assert message in str(caught.value)


@pytest.mark.parametrize(("status", "error"), [(400, RocoinError), (503, UnavailableError), (500, ServingError)])
def test_an_error_status_becomes_its_type(status, error):
    async def scenario():
        async def infer(request):
            return web.json_response({"error": f"status {status} on purpose"}, status=status)

        runner, port = await _serve(infer)
        try:
            await run_queries_http(f"http://127.0.0.1:{port}", IMAGES)
        finally:
            await runner.cleanup()

    with pytest.raises(error, match=f"HTTP {status}: status {status} on purpose"):
        asyncio.run(scenario())


def test_concurrency_below_one_is_bad_input():
    with pytest.raises(RocoinError, match="concurrency = 0"):
        asyncio.run(run_queries_http("http://127.0.0.1:1", IMAGES, concurrency=0))
