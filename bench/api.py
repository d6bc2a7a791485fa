"""Client-API benchmark: the source's KServe v2 REST API and its gRPC API on the same cluster.

Run: ``.venv/bin/python bench/api.py`` (after ``bench/runtime.py`` made its bundle). For
concurrency 1, 8 and 32 it prints p50/p99 latency and queries/s through each API, and the
overhead each adds over the source's own time per query (reported by the source itself).

``--binary``: JSON against binary tensors (Triton's binary tensor data extension) on the REST
API, one query of ``--batch`` images (64) at a time: per call, end to end (the client encodes,
sends, waits and decodes), with rocoin's encoder and with ``tritonclient.http`` (defaults:
binary; ``binary_data=False``: JSON); the bytes on the wire of one call each way (HTTP headers
included, counted by a loopback relay in a separate call, so the timings do not pass through
it), and the client's own encode+decode time. Written as Markdown (``--out``, default
``docs/bench/api-binary.md``) with the command and the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from report import report_to

from rocoin.contracts.fleet import load_fleet
from rocoin.contracts.manifest import load_manifest
from rocoin.data import load_dataset
from rocoin.runtime.api.binary_tensors import HEADER, decode_response, encode_request
from rocoin.runtime.api.client import run_queries, run_queries_http
from rocoin.runtime.cluster.local import LocalCluster

CONCURRENCY = (1, 8, 32)
#: With --binary: timed calls per variant before the next variant's turn.
ROUND = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("results/bench-runtime/bundle"))
    parser.add_argument("--fleet", type=Path, default=Path("results/bench-accuracy/fleet.yaml"))
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the report here (default docs/bench/api.txt, with --binary api-binary.md)"
    )
    parser.add_argument("--binary", action="store_true", help="JSON against binary tensors on the REST API, a batch per call")
    parser.add_argument("--batch", type=int, default=64, help="images per call with --binary")
    parser.add_argument("--calls", type=int, default=40, help="timed calls per row with --binary")
    args = parser.parse_args()
    if args.binary:
        with report_to(args.out or Path("docs/bench/api-binary.md")):
            json_vs_binary(args)
        return
    with report_to(args.out or Path("docs/bench/api.txt")):
        logging.basicConfig(level=logging.ERROR)
        test = load_dataset(load_manifest(args.bundle).dataset).test
        images, labels = test.images[: args.queries], test.labels[: args.queries]
        print(f"{'api':>6} {'conc':>5} {'p50 ms':>8} {'p99 ms':>8} {'q/s':>8} {'source p50 ms':>14} {'API overhead p50 ms':>20}")
        with tempfile.TemporaryDirectory() as state:
            with LocalCluster(args.bundle, load_fleet(args.fleet), state, deadline_s=0.5, http=True) as cluster:
                grpc_address, http_url = cluster.state.source.address, f"http://{cluster.state.source.http_address}"
                for concurrency in CONCURRENCY:
                    for api, run in (
                        ("grpc", lambda c: run_queries(grpc_address, images, labels, concurrency=c)),
                        # JSON tensors, as api.txt was measured (binary ones: --binary)
                        ("rest", lambda c: run_queries_http(http_url, images, labels, concurrency=c, binary=False)),
                    ):
                        asyncio.run(run(concurrency))  # warm-up
                        r = asyncio.run(run(concurrency))
                        p50, source = r["latency_s"]["p50"], r["source_latency_s"]["p50"]
                        print(
                            f"{api:>6} {concurrency:>5} {1e3 * p50:>8.2f} {1e3 * r['latency_s']['p99']:>8.2f} {r['queries_per_s']:>8.1f}"
                            f" {1e3 * source:>14.2f} {1e3 * (p50 - source):>20.2f}"
                        )


# -- JSON against binary tensors ------------------------------------------------------------------


class ByteCounter:
    """A loopback TCP relay in a thread of its own that counts the bytes each way."""

    def __init__(self, target: str) -> None:
        self.host, _, port = target.rpartition(":")
        self.target_port = int(port)
        self.sent = self.received = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self._server.close()
        relays = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, upstream: bool) -> None:
            while data := await source.read(65536):
                if upstream:
                    self.sent += len(data)
                else:
                    self.received += len(data)
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False), return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def rocoin_call(binary: bool):
    """One call with rocoin's encoder over aiohttp: ``call(session, url, images) -> (logits, source s)``."""

    async def call(session, url: str, images: np.ndarray):
        body, headers = encode_request(images, query_id="bench", binary_input=binary, binary_output=binary)
        async with session.post(f"{url}/v2/models/rocoin/infer", data=body, headers=headers) as response:
            raw = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {raw[:300]!r}")
            reply, arrays = decode_response(raw, response.headers.get(HEADER))
        return arrays["logits"], float(reply["parameters"]["latency_s"])

    return call


def triton_call(binary: bool):
    """One call with ``tritonclient.http`` (defaults when ``binary``; ``binary_data=False`` else)."""
    import tritonclient.http as httpclient

    def call(client, images: np.ndarray):
        tensor = httpclient.InferInput("input", list(images.shape), "UINT8" if images.dtype == np.uint8 else "FP32")
        if binary:
            tensor.set_data_from_numpy(images)
            result = client.infer("rocoin", inputs=[tensor])
        else:
            tensor.set_data_from_numpy(images, binary_data=False)
            outputs = [httpclient.InferRequestedOutput(name, binary_data=False) for name in ("logits", "missing_groups")]
            result = client.infer("rocoin", inputs=[tensor], outputs=outputs)
        return result.as_numpy("logits"), float(result.get_response()["parameters"]["latency_s"])

    return call


def measure_rocoin(
    address: str, images: np.ndarray, binary: bool, calls: int, warmup: int = 3
) -> tuple[list[float], list[float], np.ndarray]:
    import aiohttp

    call = rocoin_call(binary)

    async def run():
        async with aiohttp.ClientSession() as session:
            for _ in range(warmup):
                await call(session, f"http://{address}", images)
            walls, sources = [], []
            for _ in range(calls):
                started = time.perf_counter()
                logits, source = await call(session, f"http://{address}", images)
                walls.append(time.perf_counter() - started)
                sources.append(source)
            return walls, sources, logits

    return asyncio.run(run())


def measure_triton(
    address: str, images: np.ndarray, binary: bool, calls: int, warmup: int = 3
) -> tuple[list[float], list[float], np.ndarray]:
    import tritonclient.http as httpclient

    call = triton_call(binary)
    client = httpclient.InferenceServerClient(address)
    try:
        for _ in range(warmup):
            call(client, images)
        walls, sources = [], []
        for _ in range(calls):
            started = time.perf_counter()
            logits, source = call(client, images)
            walls.append(time.perf_counter() - started)
            sources.append(source)
        return walls, sources, logits
    finally:
        client.close()


def wire_bytes(address: str, images: np.ndarray, client: str, binary: bool) -> tuple[int, int]:
    """Bytes sent and received by one call through a counting relay (HTTP headers included)."""
    counter = ByteCounter(address)
    try:
        (measure_rocoin if client == "rocoin" else measure_triton)(f"127.0.0.1:{counter.port}", images, binary, calls=1, warmup=0)
        return counter.sent, counter.received
    finally:
        counter.close()


def codec_ms(images: np.ndarray, binary: bool, answer: tuple[bytes, str | None], repeats: int = 50) -> float:
    """rocoin's client: encode the request and decode an answer, CPU milliseconds per call."""
    started = time.process_time()
    for _ in range(repeats):
        encode_request(images, query_id="bench", binary_input=binary, binary_output=binary)
        decode_response(*answer)
    return 1e3 * (time.process_time() - started) / repeats


def captured_answer(address: str, images: np.ndarray, binary: bool) -> tuple[bytes, str | None]:
    import aiohttp

    async def run():
        body, headers = encode_request(images, query_id="bench", binary_input=binary, binary_output=binary)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://{address}/v2/models/rocoin/infer", data=body, headers=headers) as response:
                return await response.read(), response.headers.get(HEADER)

    return asyncio.run(run())


def json_vs_binary(args) -> None:
    logging.basicConfig(level=logging.ERROR)
    manifest = load_manifest(args.bundle)
    test = load_dataset(manifest.dataset).test
    pixels = np.asarray(test.images[: args.batch])
    if pixels.dtype != np.uint8:  # the datasets give floats in 0..1; the wire carries what a camera gives
        pixels = np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)
    load_before = os.getloadavg()[0]
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/api.py", *sys.argv[1:]])
    inputs = {"UINT8": pixels, "FP32": (pixels / 255.0).astype(np.float32)}
    variants = [(label, client, binary) for label in inputs for client in ("rocoin", "tritonclient") for binary in (False, True)]
    walls: dict = {v: [] for v in variants}
    sources: dict = {v: [] for v in variants}
    predictions: dict = {}
    wire: dict = {}
    codec: dict = {}
    with tempfile.TemporaryDirectory() as state:
        with LocalCluster(args.bundle, load_fleet(args.fleet), state, deadline_s=5.0, http=True) as cluster:
            address = cluster.state.source.http_address
            # round-robin rounds of ROUND calls per variant, so that the machine's load drifts over all of them alike
            for start in range(0, args.calls, ROUND):
                for label, client, binary in variants:
                    measure = measure_rocoin if client == "rocoin" else measure_triton
                    w, src, logits = measure(address, inputs[label], binary, min(ROUND, args.calls - start), warmup=1)
                    walls[label, client, binary] += w
                    sources[label, client, binary] += src
                    predictions[label, client, binary] = logits.argmax(axis=1)
            for label, client, binary in variants:
                wire[label, client, binary] = wire_bytes(address, inputs[label], client, binary)
                if client == "rocoin":
                    codec[label, client, binary] = codec_ms(inputs[label], binary, captured_answer(address, inputs[label], binary))
    reference = predictions[variants[0]]
    rows = []
    for variant in variants:
        label, client, binary = variant
        p50, source, mean = float(np.median(walls[variant])), float(np.median(sources[variant])), float(np.mean(walls[variant]))
        name = f"{client} {'binary' if binary else 'JSON'}" + (" (defaults)" if client == "tritonclient" and binary else "")
        same = bool(np.array_equal(predictions[variant], reference))
        rows.append(
            (
                label,
                name,
                *wire[variant],
                1e3 * p50,
                1 / mean,
                args.batch / mean,
                1e3 * source,
                1e3 * (p50 - source),
                codec.get(variant, float("nan")),
                same,
            )
        )
    load_after = os.getloadavg()[0]
    print(f"# REST API: JSON against binary tensors, {args.batch} images per call\n")
    print(f"Command: `{command}`\n")
    print(
        f"Bundle `{args.bundle}` ({manifest.dataset}, input {list(manifest.input.shape)}, {len(manifest.groups)} groups), fleet `{args.fleet}`: "
        f"a local cluster (one process per device, the source with its REST API) on loopback; {args.calls} calls per row, one at a time, "
        f"in rounds of {ROUND} per row taken in turn (each round after one warm-up call on a new connection). Machine: {os.cpu_count()} cores shared with other work, 1-minute load average {load_before:.2f} before and {load_after:.2f} after.\n"
    )
    print(
        "Columns: bytes on the wire per call (HTTP headers included) each way; p50 milliseconds per call end to end (encode, send, wait, decode);"
    )
    print(
        "calls and images per second (mean); the source's own p50 time per query (as it reports it); the API's share (p50 call minus the source's p50);"
    )
    print("rocoin's client encode+decode CPU ms per call; whether the predictions equal the first row's.\n")
    print(
        "| input | client | bytes sent | bytes received | p50 ms/call | calls/s | images/s | source p50 ms | API p50 ms | client codec ms | same prediction |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, name, sent, received, p50, calls_s, images_s, source, api, codec, same in rows:
        codec_text = f"{codec:.2f}" if codec == codec else "-"
        print(
            f"| {label} | {name} | {sent:,} | {received:,} | {p50:.2f} | {calls_s:.1f} | {images_s:.0f} | {source:.2f} | {api:.2f} | {codec_text} | {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()
