"""Triton's gRPC client library (``tritonclient.grpc``) with its default calls against the source.

``tritonclient[grpc]`` pins protobuf < 7 and rocoin needs protobuf >= 7.35, so the client lives in
a virtual environment of its own (``$VENV/tritonclient-grpc``: ``make test`` makes it, and so does
this test when it is missing and PyPI can be reached; ``ROCOIN_TRITONCLIENT_GRPC_VENV`` points
elsewhere). The source runs here, in rocoin's environment; the client runs there, as a process,
against 127.0.0.1. Without that environment the test is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("onnxruntime")

from test_device import make_bundle  # noqa: E402
from test_http_api import infer_body  # noqa: E402
from test_kserve_grpc import kserve_service  # noqa: E402

from rocoin.runtime.api.http import start_http  # noqa: E402

#: What ``make test`` installs there too (the Makefile's TRITONCLIENT_GRPC).
REQUIREMENT = "tritonclient[grpc]>=2.40"
VENV = Path(os.environ.get("ROCOIN_TRITONCLIENT_GRPC_VENV") or Path(sys.prefix) / "tritonclient-grpc")
#: Making the environment downloads grpcio and protobuf wheels: a minute on a slow link.
MAKE_TIMEOUT_S = 300

#: Runs in the client's environment: Triton's default calls; prints what came back as JSON.
CLIENT = """
import asyncio, json, sys
import numpy as np
import tritonclient.grpc as grpcclient

spec = json.load(sys.stdin)
client = grpcclient.InferenceServerClient(sys.argv[1])
out = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready("rocoin"),
    "extensions": list(client.get_server_metadata().extensions),
    "inputs": [(t.name, t.datatype, list(t.shape)) for t in client.get_model_metadata("rocoin").inputs],
}
pixels = np.asarray(spec["pixels"], dtype=np.uint8).reshape(spec["shape"])
for datatype, x in (("UINT8", pixels), ("FP32", (pixels / 255.0).astype(np.float32))):
    tensor = grpcclient.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    result = client.infer("rocoin", inputs=[tensor])
    logits = result.as_numpy("logits")
    out[datatype] = {"logits": logits.tolist(), "dtype": str(logits.dtype), "missing": result.as_numpy("missing_groups").tolist()}
client.close()


async def with_aio():  # the asyncio flavour, defaults too
    from tritonclient.grpc.aio import InferenceServerClient, InferInput

    client = InferenceServerClient(sys.argv[1])
    tensor = InferInput("input", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = await client.infer("rocoin", inputs=[tensor])
    await client.close()
    logits = result.as_numpy("logits")
    return {"logits": logits.tolist(), "dtype": str(logits.dtype), "missing": result.as_numpy("missing_groups").tolist()}


out["aio"] = asyncio.run(with_aio())
print(json.dumps(out))
"""


def _works(python: Path) -> bool:
    if not python.exists():
        return False
    check = subprocess.run([str(python), "-c", "import tritonclient.grpc"], capture_output=True, timeout=120)
    return check.returncode == 0


@pytest.fixture(scope="session")
def triton_grpc_python() -> Path:
    """The client environment's interpreter; made with ``python -m venv`` + pip when missing."""
    python = VENV / "bin" / "python"
    if _works(python):
        return python
    steps = (
        [sys.executable, "-m", "venv", str(VENV)],
        [str(python), "-m", "pip", "install", "--quiet", "--retries", "1", "--timeout", "20", REQUIREMENT],
    )
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=MAKE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"tritonclient[grpc] needs its own environment (protobuf < 7) and {VENV} could not be made: {exc}")
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"tritonclient[grpc] needs its own environment (protobuf < 7) and {VENV} could not be made ({step[2]}: {last})")
    if not _works(python):
        pytest.skip(f"{VENV} was made but cannot import tritonclient.grpc")
    return python


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def test_tritonclient_grpc_default_calls_get_the_json_paths_prediction(bundle, triton_grpc_python):
    import aiohttp

    pixels = np.random.default_rng(21).integers(0, 256, size=(3, 1, 8, 8), dtype=np.uint8)

    async def main():
        async with kserve_service(bundle) as (source, port):
            http = await start_http(source, "127.0.0.1:0")
            try:
                client = await asyncio.create_subprocess_exec(
                    str(triton_grpc_python),
                    "-c",
                    CLIENT,
                    f"127.0.0.1:{port}",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                spec = json.dumps({"pixels": pixels.ravel().tolist(), "shape": list(pixels.shape)}).encode()
                out, err = await asyncio.wait_for(client.communicate(spec), 60)
                assert client.returncode == 0, err.decode()[-2000:]
                async with aiohttp.ClientSession() as session:
                    async with session.post(f"http://{http.address}/v2/models/rocoin/infer", json=infer_body(pixels)) as response:
                        ours = await response.json()
                return json.loads(out), ours
            finally:
                await http.close()

    via_triton, ours = asyncio.run(main())
    assert via_triton["live"] and via_triton["ready"] and via_triton["model_ready"]
    assert "binary_tensor_data" in via_triton["extensions"]
    assert via_triton["inputs"] == [["input", "UINT8", [-1, 1, 8, 8]]]
    logits = next(o for o in ours["outputs"] if o["name"] == "logits")
    expected = np.asarray(logits["data"], dtype=np.float32).reshape(logits["shape"])
    for datatype in ("UINT8", "FP32", "aio"):
        answer = via_triton[datatype]
        got = np.asarray(answer["logits"], dtype=np.float32)
        assert answer["dtype"] == "float32" and got.shape == (3, 3) and answer["missing"] == []
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=datatype)
        np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
