"""Regression tests for what a probe of bad input and faults found on the serving path (issue 11).

Each test fails on the code before the fix: the idle cluster that tore itself down, the client
that knocked every device out, the worker restarted without its token, the sockets held
forever, the 500s with tracebacks, the edge values, and the small ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

pytest.importorskip("onnxruntime")
aiohttp = pytest.importorskip("aiohttp")

from conftest import device as profile  # noqa: E402
from serving import DEVICE_TOKEN, serving_stack  # noqa: E402
from test_device import make_bundle  # noqa: E402

from rocoin.contracts.errors import RocoinError  # noqa: E402
from rocoin.contracts.fleet import Fleet  # noqa: E402
from rocoin.logs import TextFormatter  # noqa: E402
from rocoin.runtime.api.http_limits import HttpLimits  # noqa: E402
from rocoin.runtime.device.emulation import Emulation  # noqa: E402
from rocoin.runtime.device.server import start_device  # noqa: E402
from rocoin.runtime.source.source import Source  # noqa: E402
from rocoin.runtime.transport.auth import token_metadata  # noqa: E402
from rocoin.runtime.transport.keepalive import KEEPALIVE  # noqa: E402
from rocoin.runtime.transport.protocol import inference_pb2 as pb  # noqa: E402
from rocoin.runtime.transport.protocol import inference_pb2_grpc, rocoin_pb2, rocoin_pb2_grpc  # noqa: E402
from rocoin.runtime.transport.serde import tensor_to_proto  # noqa: E402

INFER = "/v2/models/rocoin/infer"


def rocoin_command() -> list[str]:
    """The ``rocoin`` command line of this installation, as an operator runs it."""
    return [sys.executable, "-m", "rocoin.cli.main"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def uint8_body(batch: int = 1, **overrides) -> dict:
    data = np.random.default_rng(0).integers(0, 256, size=(batch, 1, 8, 8)).ravel().tolist()
    tensor = {"name": "input", "shape": [batch, 1, 8, 8], "datatype": "UINT8", "data": data}
    tensor.update(overrides)
    return {"inputs": [tensor]}


async def post(session, base: str, body, **kwargs) -> tuple[int, dict]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with session.post(
        base + INFER, data=data, headers={"Content-Type": "application/json", **kwargs.pop("headers", {})}, **kwargs
    ) as response:
        return response.status, json.loads(await response.text(), parse_constant=_no_constants)


def _no_constants(name: str):
    raise AssertionError(f"the answer is not JSON: it contains {name}")


def every_device_up(stack) -> bool:
    return all(d["up"] for d in stack.source.status())


# --------------------------------------------------------------- 1. keepalive of an idle cluster


def test_the_keepalive_options_of_both_sides_agree():
    client, server = dict(KEEPALIVE.client_options()), dict(KEEPALIVE.server_options())
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert server["grpc.keepalive_permit_without_calls"] == 1 and client["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.http2.max_pings_without_data"] == 0  # an idle stream keeps being pinged


def test_the_device_server_and_the_source_channels_use_the_keepalive_configuration(bundle, monkeypatch):
    import rocoin.runtime.source.link as source_module
    import rocoin.runtime.transport.grpc_server as grpc_server

    seen = {}
    real_server, real_channel = grpc.aio.server, grpc.aio.insecure_channel
    monkeypatch.setattr(grpc_server.grpc.aio, "server", lambda **kw: seen.setdefault("server", kw) and real_server(**kw))
    monkeypatch.setattr(
        source_module.grpc.aio,
        "insecure_channel",
        lambda address, options: seen.setdefault("channel", options) and real_channel(address, options=options),
    )

    async def main():
        device = await start_device(bundle, "a", token=DEVICE_TOKEN)
        try:
            fleet = Fleet(devices=[profile(n, 20, 4, 300, 0.1, address=device.address) for n in ("a", "b", "c")])
            async with Source(bundle, fleet, token=DEVICE_TOKEN):
                pass
        finally:
            await device.stop(0)

    asyncio.run(main())
    assert set(KEEPALIVE.server_options()) <= set(seen["server"]["options"])
    assert set(KEEPALIVE.client_options()) <= set(seen["channel"])


# --------------------------------------------------------------- 2. clients cannot knock devices out


@pytest.mark.parametrize("value", [3e38, 1e36, 1.5, -0.5])
def test_fp32_values_outside_0_1_get_400_and_no_device_is_marked_down(bundle, value):
    async def main():
        async with serving_stack(bundle) as stack, aiohttp.ClientSession() as session:
            base = f"http://{stack.http_address}"
            bad = [await post(session, base, uint8_body(datatype="FP32", data=[value] * 64)) for _ in range(4)]
            async with session.get(base + "/v2/health/ready") as response:
                ready = response.status
            good = await post(session, base, uint8_body())
            return bad, ready, good, stack.marked_down(), stack.device_failures()

    bad, ready, (status, answer), downs, failures = asyncio.run(main())
    assert all(s == 400 and "FP32 values" in body["error"] for s, body in bad)
    assert ready == 200 and status == 200 and answer["parameters"]["missing_groups"] == 0
    assert downs == 0 and failures == 0


def test_the_grpc_apis_refuse_overflowing_values_as_invalid_argument(bundle):
    huge = np.full((1, 1, 8, 8), 3e38, dtype=np.float32)

    async def main():
        async with serving_stack(bundle) as stack, grpc.aio.insecure_channel(stack.grpc_address) as channel:
            codes = []
            kserve = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 1, 8, 8])
            for call in (
                lambda: kserve.ModelInfer(pb.ModelInferRequest(model_name="rocoin", inputs=[tensor], raw_input_contents=[huge.tobytes()])),
                lambda: rocoin_pb2_grpc.SourceStub(channel).Infer(rocoin_pb2.SourceInferRequest(input=tensor_to_proto(huge))),
            ):
                for _ in range(3):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call()
                    codes.append(refused.value.code())
            return codes, stack.marked_down(), every_device_up(stack)

    codes, downs, up = asyncio.run(main())
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT} and downs == 0 and up


def test_a_device_that_refuses_checked_queries_is_counted_and_logged_but_not_marked_down(bundle, caplog):
    async def main():
        async with serving_stack(bundle) as stack:
            device_a = stack.devices["a"].worker
            device_a.check_request = lambda request: (None, "input.shape: [1, 1, 8, 8]: expected (B, 3, 8, 8)")  # another bundle
            results = [await stack.source.infer(np.zeros((1, 1, 8, 8), dtype=np.uint8)) for _ in range(6)]
            status = {d["device"]: d for d in stack.source.status()}
            refusals = stack.source.metrics.registry.get_sample_value("rocoin_device_refusals_total", {"device": "a"})
            return results, status, refusals, stack.marked_down()

    with caplog.at_level(logging.WARNING, logger="rocoin.runtime.source.source"):
        results, status, refusals, downs = asyncio.run(main())
    assert all(r.missing_groups == [0] for r in results)  # a is the only replica of group 0
    assert status["a"]["up"] and status["a"]["failures"] == 0 and status["a"]["refusals"] == 6 and refusals == 6
    assert downs == 0
    warnings = [r for r in caplog.records if "refused a checked query" in r.getMessage()]
    assert len(warnings) == 1  # at most one per REFUSAL_LOG_INTERVAL_S


def test_a_client_asking_for_impossible_deadlines_does_not_mark_devices_down(bundle):
    async def main():
        async with serving_stack(bundle) as stack:
            for running in stack.devices.values():  # every answer takes 20 ms
                running.worker.emulation, running.worker.target_s = Emulation(flops=1e6, rate_bps=1e12, outage=0.0), 0.02
            tight = [await stack.source.infer(np.zeros((1, 1, 8, 8), dtype=np.uint8), deadline_s=0.001) for _ in range(5)]
            normal = await stack.source.infer(np.zeros((1, 1, 8, 8), dtype=np.uint8))
            return tight, normal, stack.marked_down(), stack.device_failures()

    tight, normal, downs, failures = asyncio.run(main())
    assert all(r.missing_groups == [0, 1] for r in tight)
    assert normal.missing_groups == [] and downs == 0 and failures == 0


def test_non_finite_logits_never_reach_a_client(bundle, monkeypatch):
    async def main():
        async with serving_stack(bundle) as stack, aiohttp.ClientSession() as session:
            monkeypatch.setattr(stack.source, "_head_run", lambda batch, slots: np.full((batch, 3), np.nan, dtype=np.float32))
            return await post(session, f"http://{stack.http_address}", uint8_body())

    status, body = asyncio.run(main())
    assert status == 500 and "non-finite" in body["error"]


# --------------------------------------------------------------- 3. authentication by default


def test_a_device_worker_refuses_to_start_without_a_token_unless_told_insecure(bundle, caplog):
    with pytest.raises(RocoinError, match="--insecure"):
        asyncio.run(start_device(bundle, "a"))

    async def insecure():
        device = await start_device(bundle, "a", insecure=True)
        await device.stop(0)

    with caplog.at_level(logging.WARNING):
        asyncio.run(insecure())
    assert any("WITHOUT AUTHENTICATION" in r.getMessage() for r in caplog.records)
    with pytest.raises(RocoinError, match="choose one"):
        asyncio.run(start_device(bundle, "a", token=DEVICE_TOKEN, insecure=True))


def test_the_cli_device_worker_refuses_to_start_without_a_token(bundle, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ROCOIN_DEVICE_TOKEN"}
    args = [*rocoin_command(), "device", "serve", "--bundle", str(bundle), "--device-id", "a", "--listen", "127.0.0.1:0"]
    refused = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--insecure" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------- 4. REST connection limits


def test_the_rest_api_closes_a_socket_that_never_finishes_its_headers_and_refuses_a_huge_content_length(bundle):
    limits = HttpLimits(header_timeout_s=0.4, idle_timeout_s=5.0)

    async def main():
        async with serving_stack(bundle, http_limits=limits) as stack:
            host, port = stack.http_address.rsplit(":", 1)
            loop = asyncio.get_running_loop()

            def slow_headers():
                with socket.create_connection((host, int(port)), timeout=5) as sock:
                    sock.sendall(b"POST /v2/models/rocoin/infer HTTP/1.1\r\nHost: x\r\n")
                    started = time.monotonic()
                    answer = sock.recv(4096)
                    while sock.recv(4096):
                        pass
                    return answer, time.monotonic() - started

            def huge_length():
                with socket.create_connection((host, int(port)), timeout=5) as sock:
                    started = time.monotonic()
                    sock.sendall(b"POST /v2/models/rocoin/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000000\r\n\r\n")
                    return sock.recv(4096), time.monotonic() - started

            slow, huge = await asyncio.gather(loop.run_in_executor(None, slow_headers), loop.run_in_executor(None, huge_length))
            return slow, huge

    (slow_answer, slow_s), (huge_answer, huge_s) = asyncio.run(main())
    assert slow_answer.startswith(b"HTTP/1.1 408") and 0.3 < slow_s < 2.0
    assert huge_answer.startswith(b"HTTP/1.1 413") and huge_s < 1.0


# --------------------------------------------------------------- 5. 500s, tracebacks and forged log lines

MALFORMED_BODIES = [
    ("datatype a list", uint8_body(datatype=["UINT8"]), "datatype"),
    ("datatype a dict", uint8_body(datatype={"x": 1}), "datatype"),
    ("JSON 5,000 deep", b"[" * 5000 + b"]" * 5000, "nested"),
    ("shape of 70 dimensions", uint8_body(shape=[1] * 70, data=[0]), "dimensions"),
    (
        "an integer of 400 digits",
        '{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "UINT8", "data": [1' + "0" * 400 + "]}]}",
        "data",
    ),
    ("a lone surrogate id", '{"id": "\\ud800", ' + json.dumps(uint8_body())[1:], "id"),
    ("an id with a newline", {"id": "q\nrocoin: WARNING: device a marked down", **uint8_body()}, "id"),
    ("a shape entry of 1e400", '{"inputs": [{"name": "input", "shape": [1' + "0" * 400 + '], "datatype": "UINT8", "data": [0]}]}', "shape"),
]


def test_malformed_rest_requests_get_one_line_4xx_and_log_one_line_without_a_traceback(bundle, caplog):
    async def main():
        async with serving_stack(bundle) as stack, aiohttp.ClientSession() as session:
            answers = [await post(session, f"http://{stack.http_address}", body) for _, body, _ in MALFORMED_BODIES]
            return answers, await post(session, f"http://{stack.http_address}", uint8_body()), stack.marked_down()

    with caplog.at_level(logging.INFO):
        answers, (status, _), downs = asyncio.run(main())
    for (label, _, field), (code, body) in zip(MALFORMED_BODIES, answers):
        assert code == 400 and field in body["error"] and "\n" not in body["error"], (label, code, body)
    assert status == 200 and downs == 0
    assert not [r for r in caplog.records if r.exc_info], "a client error logged a traceback"
    assert len([r for r in caplog.records if r.name == "rocoin.runtime.api.http"]) == len(MALFORMED_BODIES)
    formatted = [TextFormatter().format(r) for r in caplog.records]
    assert all("\n" not in line for line in formatted) and not any(
        line.startswith("rocoin: WARNING: device a marked down") for line in formatted
    )


def test_malformed_grpc_messages_get_invalid_argument_never_unknown(bundle, caplog):
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="UINT8", shape=[1] * 1000)
    good = pb.ModelInferRequest(
        model_name="rocoin",
        id="MARK",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="UINT8", shape=[1, 1, 8, 8])],
        raw_input_contents=[bytes(64)],
    )
    not_utf8 = good.SerializeToString().replace(b"MARK", b"\xff\xfeAB")

    async def main():
        async with serving_stack(bundle) as stack, grpc.aio.insecure_channel(stack.grpc_address) as channel:
            codes = {}
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            raw_model_infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            raw_source_infer = channel.unary_unary("/rocoin.v1.Source/Infer")
            for label, call in (
                (
                    "1,000 dimensions",
                    lambda: stub.ModelInfer(pb.ModelInferRequest(model_name="rocoin", inputs=[tensor], raw_input_contents=[b"\x00"])),
                ),
                ("non-UTF-8 id", lambda: raw_model_infer(not_utf8)),
                ("truncated message", lambda: raw_source_infer(b"\x0a\xff\xff")),
                (
                    "deadline inf",
                    lambda: rocoin_pb2_grpc.SourceStub(channel).Infer(
                        rocoin_pb2.SourceInferRequest(input=tensor_to_proto(np.zeros((1, 1, 8, 8), np.uint8)), deadline_s=float("inf"))
                    ),
                ),
            ):
                try:
                    await call()
                    codes[label] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    codes[label] = (exc.code(), exc.details())
            return codes, stack.marked_down()

    with caplog.at_level(logging.INFO):
        codes, downs = asyncio.run(main())
    for label, (code, details) in codes.items():
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "\n" not in details, (label, code, details)
    assert downs == 0 and not [r for r in caplog.records if r.exc_info]


def test_a_malformed_message_on_a_device_stream_is_answered_and_the_stream_goes_on(bundle):
    async def main():
        device = await start_device(bundle, "a", token=DEVICE_TOKEN)
        try:
            async with grpc.aio.insecure_channel(device.address) as channel:
                call = channel.stream_stream(
                    "/rocoin.v1.Device/InferStream", response_deserializer=rocoin_pb2.DeviceInferResponse.FromString
                )(metadata=token_metadata(DEVICE_TOKEN))
                await call.write(b"\x0a\x02\xff\xfe")  # query_id: 2 bytes that are not UTF-8
                good = rocoin_pb2.DeviceInferRequest(query_id="ok", input=tensor_to_proto(np.zeros((1, 1, 8, 8), np.float32)))
                await call.write(good.SerializeToString())
                answers = [await asyncio.wait_for(call.read(), 5) for _ in range(2)]
                await call.done_writing()
                return answers
        finally:
            await device.stop(0)

    bad, ok = asyncio.run(main())
    assert bad.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "not a valid" in bad.error
    assert ok.query_id == "ok" and not ok.error_code


def test_text_logs_escape_client_strings():
    record = logging.LogRecord(
        "rocoin.runtime.source.source", logging.INFO, "", 0, "groups %s missing for %s", ([1], "q\r\nrocoin: WARNING: forged\x1b[2J"), None
    )
    record.query_id = "q\nrocoin: WARNING: device a1 marked down"
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert 'query_id="q\\nrocoin: WARNING: device a1 marked down"' in line


# --------------------------------------------------------------- 6. edge values


@pytest.mark.parametrize("deadline", [float("inf"), float("nan"), 1e-9, -1.0, 1e9])
def test_absurd_deadlines_are_refused(bundle, deadline):
    async def main():
        async with serving_stack(bundle) as stack, grpc.aio.insecure_channel(stack.grpc_address) as channel:
            request = rocoin_pb2.SourceInferRequest(input=tensor_to_proto(np.zeros((1, 1, 8, 8), np.uint8)), deadline_s=deadline)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await rocoin_pb2_grpc.SourceStub(channel).Infer(request, timeout=5)
            default = await rocoin_pb2_grpc.SourceStub(channel).Infer(rocoin_pb2.SourceInferRequest(input=request.input), timeout=5)
            return refused.value.code(), refused.value.details(), list(default.missing_groups)

    code, details, missing = asyncio.run(main())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "deadline_s" in details and missing == []
    with pytest.raises(RocoinError, match="deadline-s"):
        Source(
            bundle,
            Fleet(devices=[profile(n, 20, 4, 300, 0.1, address="127.0.0.1:1") for n in ("a", "b", "c")]),
            deadline_s=deadline,
            insecure=True,
        )


# --------------------------------------------------------------- 7. small ones


def test_the_bearer_scheme_is_case_insensitive_and_the_kserve_probes_are_open(bundle):
    api_token = "client-token-0123456789abc"

    async def main():
        async with serving_stack(bundle, api_token=api_token) as stack:
            async with aiohttp.ClientSession() as session:
                statuses = [
                    (await post(session, f"http://{stack.http_address}", uint8_body(), headers={"Authorization": f"{scheme} {api_token}"}))[
                        0
                    ]
                    for scheme in ("Bearer", "bearer", "BEARER")
                ]
            async with grpc.aio.insecure_channel(stack.grpc_address) as channel:
                stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
                live, ready = await stub.ServerLive(pb.ServerLiveRequest()), await stub.ServerReady(pb.ServerReadyRequest())
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ModelReady(pb.ModelReadyRequest(name="rocoin"))
                lower = await stub.ModelReady(pb.ModelReadyRequest(name="rocoin"), metadata=(("authorization", f"bearer {api_token}"),))
            return statuses, live.live, ready.ready, refused.value.code(), lower.ready

    statuses, live, ready, refused, lower = asyncio.run(main())
    assert statuses == [200, 200, 200] and live and ready and lower
    assert refused == grpc.StatusCode.UNAUTHENTICATED


def test_the_start_up_log_names_https_for_a_tls_listener(bundle, tmp_path, caplog):
    from rocoin.runtime.transport.tls import ServerTLS

    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(tmp_path / "k.pem"),
            "-out",
            str(tmp_path / "c.pem"),
        ],
        check=True,
        capture_output=True,
    )

    async def main():
        async with serving_stack(bundle, tls=ServerTLS(tmp_path / "c.pem", tmp_path / "k.pem")):
            pass

    with caplog.at_level(logging.INFO, logger="rocoin.runtime.api.server"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "REST API" in r.getMessage()]
    assert lines and lines[0].startswith("source REST API (KServe v2) on https://")
