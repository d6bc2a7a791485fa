"""Device profiling: measure what a device really offers and write its fleet entry.

- FLOP/s: each student model of the bundle (or the one of its group) runs with onnxruntime on
  batch-1 inputs; FLOP/s = the student's FLOPs (from the plan's catalog) / the median run time.
- memory: the memory available now (``MemAvailable`` of /proc/meminfo; the total elsewhere).
- link to the source: ``PROBES`` health checks give the loss rate (failed fraction); the uplink
  rate is the extra bytes of a large message over a small one divided by the extra time, using
  messages the source answers only after reading them whole: ``Fleet.Probe`` (a source that
  devices join; admitted with the device token or mTLS, whatever guards its client API), else
  requests its client API rejects after reading them (an ``int64`` ``Source.Infer`` input).
Like exo's device-capability probe, the result is a data object, here a fleet entry.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rocoin.contracts.errors import RocoinError, UnavailableError
from rocoin.contracts.fleet import DeviceProfile
from rocoin.contracts.manifest import load_manifest, verify_file
from rocoin.runtime.transport.auth import token_metadata
from rocoin.runtime.transport.join import PROBE_METHOD
from rocoin.runtime.transport.protocol import rocoin_pb2, rocoin_pb2_grpc

#: Model runs per student for the FLOP/s figure (after warm-up runs).
MODEL_RUNS = 30
WARMUP_RUNS = 3
#: Health checks for the loss rate, and their time limit.
PROBES = 50
PROBE_TIMEOUT_S = 1.0
#: Payloads of the uplink measurement (bytes) and repetitions of each.
SMALL_PAYLOAD_BYTES = 1_000
LARGE_PAYLOAD_BYTES = 60_000  # under the source's smallest message limit (its 64 KiB slack)
RATE_REPEATS = 7
#: The outage written when every probe succeeded (a measured 0 would promise too much).
MIN_OUTAGE = 0.001


def measure_flops(bundle: str | Path, *, threads: int = 1) -> float:
    """Median achieved FLOP/s over the bundle's group models (batch 1, onnxruntime)."""
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rates = []
    x = np.random.default_rng(0).normal(size=(1, *manifest.input.shape)).astype(np.float32)
    for model in manifest.groups:
        session = ort.InferenceSession(str(verify_file(bundle, model)), options, providers=["CPUExecutionProvider"])
        feeds = {model.input.name: x}
        for _ in range(WARMUP_RUNS):
            session.run(None, feeds)
        times = []
        for _ in range(MODEL_RUNS):
            started = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - started)
        rates.append(manifest.plan.catalog[model.student].flops / statistics.median(times))
    return float(statistics.median(rates))


def available_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def measure_link(source: str, credentials: grpc.ChannelCredentials | None = None, *, token: str | None = None) -> tuple[float, float]:
    """(uplink bit/s, loss rate) towards the source at ``source`` (host:port); ``credentials``:
    a TLS channel (a source that serves TLS), else plain; ``token``: the device token, for a
    source's ``Fleet.Probe``."""
    channel = grpc.secure_channel(source, credentials) if credentials is not None else grpc.insecure_channel(source)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        failures = 0
        for _ in range(PROBES):
            try:
                health.Check(health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S)
            except grpc.RpcError:
                failures += 1
        if failures == PROBES:
            raise UnavailableError(f"source = {source!r}: no answer to {PROBES} health checks; is `rocoin source serve` running there?")
        send = _probe_sender(channel, source, token)
        small = statistics.median(send(SMALL_PAYLOAD_BYTES) for _ in range(RATE_REPEATS))
        large = statistics.median(send(LARGE_PAYLOAD_BYTES) for _ in range(RATE_REPEATS))
    extra_s = max(large - small, 1e-6)
    return 8 * (LARGE_PAYLOAD_BYTES - SMALL_PAYLOAD_BYTES) / extra_s, failures / PROBES


def _probe_sender(channel: grpc.Channel, source: str, token: str | None) -> Callable[[int], float]:
    """A function sending ``size`` bytes the source reads whole and returning the seconds until
    its answer: ``Fleet.Probe`` where the source has it (devices join it), else ``Source.Infer``
    with an input it refuses after reading it (its client API must then be open to this device)."""
    probe = channel.unary_unary(
        PROBE_METHOD, request_serializer=rocoin_pb2.LinkProbe.SerializeToString, response_deserializer=rocoin_pb2.LinkProbeReply.FromString
    )
    metadata = token_metadata(token)

    def send_probe(size: int) -> float:
        started = time.perf_counter()
        probe(rocoin_pb2.LinkProbe(padding=bytes(size)), timeout=10, metadata=metadata)
        return time.perf_counter() - started

    try:
        send_probe(SMALL_PAYLOAD_BYTES)
        return send_probe
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise RocoinError(f"source = {source!r}: refused the link probe ({exc.code().name}: {exc.details()})") from None
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise UnavailableError(f"source = {source!r}: the link probe failed ({exc.code().name}: {exc.details()})") from None
    stub = rocoin_pb2_grpc.SourceStub(channel)  # a source without joins: time its client API

    def send_infer(size: int) -> float:
        request = rocoin_pb2.SourceInferRequest(input=rocoin_pb2.Tensor(shape=[size], dtype="int64", data=bytes(size)))
        started = time.perf_counter()
        try:
            stub.Infer(request, timeout=10)
        except grpc.RpcError:
            pass
        return time.perf_counter() - started

    return send_infer


def profile_device(device_id: str, bundle: str | Path, source: str, *, address: str | None = None, threads: int = 1) -> DeviceProfile:
    flops = measure_flops(bundle, threads=threads)
    rate_bps, loss = measure_link(source)
    return DeviceProfile(
        id=device_id,
        flops=round(flops, 1),
        memory_bytes=available_memory_bytes(),
        rate_bps=round(rate_bps, 1),
        outage=round(max(loss, MIN_OUTAGE), 6),
        address=address,
    )


#: Size of the generic benchmark's square matrices (a joining device has no bundle to time).
GENERIC_MATMUL_N = 256


def measure_generic_flops(*, runs: int = MODEL_RUNS) -> float:
    """Median FLOP/s of a float32 ``N×N`` matrix product with numpy (``2·N³`` FLOPs each): the
    generic workload of a device that has no bundle yet (``rocoin device join --measure``)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(GENERIC_MATMUL_N, GENERIC_MATMUL_N)).astype(np.float32)
    b = rng.normal(size=(GENERIC_MATMUL_N, GENERIC_MATMUL_N)).astype(np.float32)
    for _ in range(WARMUP_RUNS):
        a @ b
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2.0 * GENERIC_MATMUL_N**3 / statistics.median(times)


def measure_join_profile(
    device_id: str, source: str, *, threads: int = 1, credentials: grpc.ChannelCredentials | None = None, token: str | None = None
) -> DeviceProfile:
    """A joining device's fleet entry: the generic FLOP/s, free memory, the link to the source
    (over TLS with ``credentials``; ``Fleet.Probe`` admitted with the device ``token`` or mTLS)."""
    rate_bps, loss = measure_link(source, credentials, token=token)
    return DeviceProfile(
        id=device_id,
        flops=round(measure_generic_flops(), 1),
        memory_bytes=available_memory_bytes(),
        rate_bps=round(rate_bps, 1),
        outage=round(max(loss, MIN_OUTAGE), 6),
    )
