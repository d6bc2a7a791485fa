"""What one message costs in grpcio: a unary call against a message on a long-lived stream.

Run: ``.venv/bin/python bench/grpc_echo.py [--messages 3000]``. A server process answers rocoin's
own ``DeviceInferRequest`` (one 28×28 float32 image) with a ``DeviceInferResponse`` (26
features), without running any model; the client sends the messages one at a time, first as
unary calls, then on one bidirectional stream. Printed per message: the round trip, and the CPU
time the client and the server spent (from ``os.times`` and /proc). This is why the source talks
to its devices over ``InferStream``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from pathlib import Path

import grpc
import numpy as np
from report import report_to

from rocoin.runtime.transport.protocol import rocoin_pb2
from rocoin.runtime.transport.serde import tensor_to_proto

SERVICE = "bench.Echo"
WARMUP = 200


def _features() -> rocoin_pb2.Tensor:
    return tensor_to_proto(np.zeros((1, 26), np.float32))


def _serve(ready: multiprocessing.Queue) -> None:
    features = _features()

    async def unary(request, context):
        return rocoin_pb2.DeviceInferResponse(query_id=request.query_id, features=features)

    async def stream(requests, context):
        async for request in requests:
            yield rocoin_pb2.DeviceInferResponse(query_id=request.query_id, features=features)

    async def main() -> None:
        server = grpc.aio.server()
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(
                unary, rocoin_pb2.DeviceInferRequest.FromString, rocoin_pb2.DeviceInferResponse.SerializeToString
            ),
            "Stream": grpc.stream_stream_rpc_method_handler(
                stream, rocoin_pb2.DeviceInferRequest.FromString, rocoin_pb2.DeviceInferResponse.SerializeToString
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(port: int, pid: int, messages: int) -> None:
    request = rocoin_pb2.DeviceInferRequest(query_id="q", input=tensor_to_proto(np.zeros((1, 1, 28, 28), np.float32)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call_unary = channel.unary_unary(
            f"/{SERVICE}/Unary", rocoin_pb2.DeviceInferRequest.SerializeToString, rocoin_pb2.DeviceInferResponse.FromString
        )
        stream = channel.stream_stream(
            f"/{SERVICE}/Stream", rocoin_pb2.DeviceInferRequest.SerializeToString, rocoin_pb2.DeviceInferResponse.FromString
        )()

        async def unary_once() -> None:
            await call_unary(request, timeout=5)

        async def stream_once() -> None:
            await stream.write(request)
            await stream.read()

        print(f"{'':>8} {'round trip ms':>14} {'client CPU ms':>14} {'server CPU ms':>14}")
        for name, once in (("unary", unary_once), ("stream", stream_once)):
            for _ in range(WARMUP):
                await once()
            client, server, started = sum(os.times()[:2]), _cpu_s(pid), time.perf_counter()
            for _ in range(messages):
                await once()
            elapsed = time.perf_counter() - started
            client, server = sum(os.times()[:2]) - client, _cpu_s(pid) - server
            print(f"{name:>8} {1e3 * elapsed / messages:>14.3f} {1e3 * client / messages:>14.3f} {1e3 * server / messages:>14.3f}")
        await stream.done_writing()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument(
        "--out", type=Path, default=Path("docs/bench/grpc-echo.txt"), help="also write the report here (the README's source)"
    )
    args = parser.parse_args()
    ready: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=_serve, args=(ready,), daemon=True)
    server.start()
    try:
        with report_to(args.out):
            asyncio.run(_measure(ready.get(timeout=30), server.pid, args.messages))
    finally:
        server.kill()


if __name__ == "__main__":
    main()
