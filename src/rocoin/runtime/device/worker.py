"""The device worker: serves its group's student over gRPC (``rocoin.v1.Device``).

A worker loads a bundle (``manifest.json`` + ONNX files), finds the group of its device id,
checks the group model's size and SHA-256 against the manifest (a tampered or truncated file
stops it before it listens) and runs the model with onnxruntime on the CPU.

``Infer`` accepts only what the manifest promises the model: a float32 ``(B, C, H, W)`` batch
with the manifest's ``(C, H, W)``, ``1 <= B <= max_batch`` and finite values; anything else gets
``INVALID_ARGUMENT`` naming the field, the value and what was expected, and the worker goes on
serving. A request larger than the worker's message limit (``max_batch`` inputs plus
:data:`MESSAGE_SLACK_BYTES`) gets ``RESOURCE_EXHAUSTED`` from gRPC before it is parsed.

``InferStream`` is the source's transport: one long-lived stream per source, each message a
request as above (plus ``timeout_s`` and ``cancel``), each answer written when it is ready and
matched by ``query_id``. A bad request on the stream gets an answer with ``error_code`` and
``error`` (the same codes and messages as ``Infer``) and the stream goes on. A stream message
costs about half a unary call in grpcio, which is most of the source's overhead on small models.

Concurrency: at most ``max_concurrency`` requests run the model (and their emulated delay) at a
time; further ones wait their turn, in arrival order. A unary call whose deadline passes while it
waits ends with gRPC's ``DEADLINE_EXCEEDED`` and never runs the model (a stream request past its
``timeout_s`` is answered ``DEADLINE_EXCEEDED`` when its turn comes). Beyond
``max_concurrency + MAX_QUEUED_CALLS`` calls in flight, gRPC answers ``RESOURCE_EXHAUSTED`` (a
stream: per stream). A model run expected to take at most :data:`INLINE_RUN_S` runs on the event
loop; longer ones run in a thread pool so health checks and other calls go on meanwhile.

Emulation (:class:`Emulation`) makes a fast machine behave like a device of the fleet: after the
real compute, the answer is held until ``t(d, s, k) = c_s/f_d + 32·|P_k|/r_d + input_s`` has
passed since the call started running, then dropped with probability ``p_d``: by default the
answer never arrives (the call is held, without its concurrency slot, until the caller's
deadline, then ends ``UNAVAILABLE "emulated outage"``), as SPEC.md §1 models an outage;
``drop="error"`` fails it at once instead.

Nothing here imports torch or training code: a device needs numpy, onnxruntime, grpcio,
grpcio-health-checking and protobuf only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rocoin.contracts.errors import RocoinError
from rocoin.runtime.transport.auth import check_authentication
from rocoin.runtime.transport.grpc_server import Malformed, create_server
from rocoin.runtime.transport.keepalive import KEEPALIVE, Keepalive
from rocoin.runtime.transport.lifecycle import stop_on_signals, wait_ready_file  # noqa: F401 - wait_ready_file is part of this module's API
from rocoin.runtime.transport.metrics import DeviceMetrics
from rocoin.runtime.transport.tls import ServerTLS
from rocoin.contracts.fileio import write_json_atomic
from rocoin.contracts.latency import BITS_PER_VALUE
from rocoin.contracts.fleet import Fleet, load_fleet
from rocoin.contracts.manifest import GroupModel, Manifest, load_manifest, verify_file
from rocoin.runtime.transport.protocol import rocoin_pb2, rocoin_pb2_grpc
from rocoin.runtime.transport.serde import DTYPES, TensorError, tensor_from_proto, tensor_to_proto

logger = logging.getLogger(__name__)

#: The gRPC service name (also the name the health service reports).
DEVICE_SERVICE = "rocoin.v1.Device"
#: Largest batch one ``Infer`` may carry unless the worker is told otherwise.
DEFAULT_MAX_BATCH = 64
#: Calls that run the model (and their emulated delay) at the same time.
DEFAULT_MAX_CONCURRENCY = 4
#: onnxruntime intra-op threads (a small device has few cores; one leaves room for gRPC).
DEFAULT_INTRA_OP_THREADS = 1
#: Calls that may wait for a free slot on top of ``max_concurrency``; more get RESOURCE_EXHAUSTED.
MAX_QUEUED_CALLS = 256
#: Room in the gRPC message limits for everything but the tensor bytes (ids, shape, tags).
MESSAGE_SLACK_BYTES = 64 * 1024
#: Longest accepted ``query_id``.
MAX_QUERY_ID_CHARS = 256
#: Seconds in-flight calls get to finish after SIGTERM/SIGINT or cancellation.
SHUTDOWN_GRACE_S = 5.0
#: Longest time a silently dropped call is held when the caller set no deadline.
SILENT_DROP_HOLD_S = 60.0
#: Requests whose model run is expected to take at most this long run on the event loop: a hop to
#: the thread pool and back costs more than the run itself (a small student at batch 1).
INLINE_RUN_S = 0.001
#: Model runs at start that warm onnxruntime up and time one image.
WARMUP_RUNS = 5
#: The only execution provider a device uses.
EXECUTION_PROVIDER = "CPUExecutionProvider"

_FLOAT32 = "float32"


class _Refused(Exception):
    """A request the worker will not answer with features: a gRPC status code and why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Emulation:
    """A fleet profile to emulate: answer after ``t(d, s, k)`` and drop answers at the outage rate."""

    flops: float
    rate_bps: float
    outage: float
    input_s: float = 0.0
    seed: int | None = None
    #: "silent": a dropped answer never arrives (the caller waits until its deadline), as SPEC.md §1
    #: models an outage; "error": the call fails at once with UNAVAILABLE.
    drop: str = "silent"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.flops) and self.flops > 0):
            raise RocoinError(f"emulation flops = {self.flops!r}: expected a positive FLOP/s rate")
        if not (math.isfinite(self.rate_bps) and self.rate_bps > 0):
            raise RocoinError(f"emulation rate_bps = {self.rate_bps!r}: expected a positive bit/s rate")
        if not (0.0 <= self.outage < 1.0):
            raise RocoinError(f"emulation outage = {self.outage!r}: expected a probability in [0, 1)")
        if self.drop not in ("silent", "error"):
            raise RocoinError(f"emulation drop = {self.drop!r}: expected silent or error")
        if not (math.isfinite(self.input_s) and self.input_s >= 0):
            raise RocoinError(f"emulation input_s = {self.input_s!r}: expected seconds >= 0")

    @classmethod
    def from_fleet(cls, fleet: Fleet | str | os.PathLike[str], device_id: str, *, seed: int | None = None) -> Emulation:
        """The profile of ``device_id`` in ``fleet`` (a :class:`Fleet` or a fleet file).

        ``input_s`` is ``input_bits / downlink_bps`` when the fleet gives both, else 0.
        """
        if not isinstance(fleet, Fleet):
            fleet = load_fleet(fleet)
        arrays = fleet.arrays()
        if device_id not in arrays.ids:
            raise RocoinError(f"device-id = {device_id!r}: not a device of the fleet")
        i = arrays.ids.index(device_id)
        return cls(
            flops=float(arrays.flops[i]),
            rate_bps=float(arrays.rate_bps[i]),
            outage=float(arrays.outage[i]),
            input_s=float(arrays.input_s[i]),
            seed=seed,
        )

    def latency_s(self, student_flops: float, partition_size: int) -> float:
        """``t(d, s, k) = c_s / f_d + 32·|P_k| / r_d + input_s`` (SPEC.md §3)."""
        return student_flops / self.flops + BITS_PER_VALUE * partition_size / self.rate_bps + self.input_s


class DeviceWorker(rocoin_pb2_grpc.DeviceServicer):
    """The ``rocoin.v1.Device`` servicer of one device: its group's model, checked and loaded.

    Raises :class:`RocoinError` (and does not start) when the bundle is unreadable, the device is
    not in the plan, or the group's model file does not match the manifest.
    """

    def __init__(
        self,
        bundle: str | os.PathLike[str],
        device_id: str,
        *,
        emulation: Emulation | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        intra_op_threads: int = DEFAULT_INTRA_OP_THREADS,
    ) -> None:
        for name, value in (("max_batch", max_batch), ("max_concurrency", max_concurrency), ("intra_op_threads", intra_op_threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RocoinError(f"{name.replace('_', '-')} = {value!r}: expected an integer >= 1")
        self.bundle = Path(bundle)
        self.device_id = device_id
        self.metrics = DeviceMetrics()
        self.manifest: Manifest = load_manifest(self.bundle)
        self.model: GroupModel = self.manifest.group_of(device_id)
        self.group = self.model.group
        self.max_batch = max_batch
        self.max_concurrency = max_concurrency
        self.emulation = emulation
        self.input_shape = tuple(self.model.input.shape)  # (C, H, W)
        self.output_size = len(self.model.filters)
        itemsize = DTYPES[_FLOAT32].itemsize
        self.max_input_bytes = math.prod(self.input_shape) * itemsize * max_batch
        #: gRPC message limits: the largest valid request/response plus the envelope.
        self.max_request_bytes = self.max_input_bytes + MESSAGE_SLACK_BYTES
        self.max_response_bytes = self.output_size * itemsize * max_batch + MESSAGE_SLACK_BYTES
        student_flops = self.manifest.plan.catalog[self.model.student].flops
        self.target_s = emulation.latency_s(student_flops, self.output_size) if emulation else 0.0
        self._rng = random.Random(emulation.seed if emulation else None)
        path = verify_file(self.bundle, self.model)
        self._session = _open_session(path, self.model, intra_op_threads)
        self._input_name = self.model.input.name
        self._output_name = self.model.output.name
        self._slots = asyncio.Semaphore(max_concurrency)
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=f"rocoin-{device_id}")
        #: requests one InferStream may have queued or running
        self.max_inflight = max_concurrency + MAX_QUEUED_CALLS
        self._active = 0  # requests being answered, on every call and stream
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        #: the model's batch-1 time here (a warm-up run at start): decides whether a request runs
        #: on the event loop (short) or in the thread pool (long enough to stall other calls)
        self.run_s_per_image = self._time_one_image()

    def _time_one_image(self, runs: int = WARMUP_RUNS) -> float:
        x = np.zeros((1, *self.input_shape), dtype=np.float32)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            self.run_model(x)
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    def _begin(self) -> None:
        self._active += 1
        self._idle.clear()

    def _end(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def drain(self, grace: float | None) -> None:
        """Refuse new requests (UNAVAILABLE) and wait up to ``grace`` seconds (None: no limit)
        for those in progress to be answered."""
        self._closing = True
        if self._active:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)

    def close(self) -> None:
        """Release the model's threads (running calls finish on their own)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def run_model(self, batch: np.ndarray) -> np.ndarray:
        """The group's features of a checked ``(B, C, H, W)`` float32 batch (blocking)."""
        return self._session.run([self._output_name], {self._input_name: batch})[0]

    def check_request(self, request: rocoin_pb2.DeviceInferRequest) -> tuple[np.ndarray | None, str]:
        """``(batch, "")`` for a valid request, else ``(None, message)`` naming the field and the value."""
        if len(request.query_id) > MAX_QUERY_ID_CHARS:
            return None, f"query_id: {len(request.query_id)} characters: expected at most {MAX_QUERY_ID_CHARS}"
        if not request.HasField("input"):
            return None, f"input: missing: expected a float32 tensor of shape {self._expected_shape()}"
        tensor = request.input
        if tensor.dtype not in DTYPES:
            return None, f"input.dtype: {tensor.dtype[:40]!r}: expected {_FLOAT32!r}"
        if tensor.dtype != _FLOAT32:
            return None, f"input.dtype: {tensor.dtype!r}: expected {_FLOAT32!r} (normalised images)"
        shape = list(tensor.shape)
        if len(shape) != 1 + len(self.input_shape) or tuple(shape[1:]) != self.input_shape:
            shown = shape if len(shape) <= 8 else shape[:8] + ["..."]
            return None, f"input.shape: {shown}: expected {self._expected_shape()}"
        if not 1 <= shape[0] <= self.max_batch:
            return None, f"input.shape[0]: {shape[0]}: expected a batch size in 1..{self.max_batch}"
        try:
            batch = tensor_from_proto(tensor, max_bytes=self.max_input_bytes)
        except TensorError as exc:
            return None, f"input.{exc}"
        finite = np.isfinite(batch)
        if not finite.all():
            bad = batch[~finite]
            nan = int(np.isnan(bad).sum())
            return None, f"input.data: {nan} NaN and {bad.size - nan} infinite values: expected finite values"
        return batch, ""

    async def Infer(self, request: rocoin_pb2.DeviceInferRequest, context: grpc.aio.ServicerContext) -> rocoin_pb2.DeviceInferResponse:
        """Answer one request (gRPC's deadline and cancellation apply), counting its outcome in :attr:`metrics`."""
        self._begin()
        try:
            batch = self._checked(request)
            reply = await self._answer(request.query_id, batch)
            if reply is None:  # silently dropped: hold the call, without its slot, until the caller gives up
                hold = context.time_remaining()
                await asyncio.sleep(min(hold, SILENT_DROP_HOLD_S) if hold is not None else SILENT_DROP_HOLD_S)
                raise _Refused(grpc.StatusCode.UNAVAILABLE, "emulated outage")
        except _Refused as refused:
            self.metrics.requests.labels(refused.code.name).inc()
            await context.abort(refused.code, refused.message)
        except asyncio.CancelledError:
            self.metrics.requests.labels("CANCELLED").inc()
            raise
        finally:
            self._end()
        return reply

    async def InferStream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """The source's long-lived stream: every request runs as :meth:`Infer` would, concurrently,
        and its answer (or an answer carrying ``error``) is written as soon as it is ready.

        A request's ``timeout_s`` bounds its wait for a free slot; ``cancel`` drops queued or running
        requests of this stream (no answer is sent for them). When the source closes its side, the
        requests still running are answered before the stream ends; when it cancels the stream,
        they are dropped.
        """
        inflight: dict[str, asyncio.Task] = {}  # by query id, until the answer is ready (cancellable)
        running: set[asyncio.Task] = set()  # until the answer is written
        writing = asyncio.Lock()
        loop = asyncio.get_running_loop()

        async def send(reply: rocoin_pb2.DeviceInferResponse) -> None:
            async with writing:
                await context.write(reply)

        async def serve_one(query_id: str, batch: np.ndarray, expires: float | None) -> None:
            self._begin()  # until the answer is written: a shutdown waits for it
            try:
                try:
                    reply = await self._answer(query_id, batch, expires)
                except _Refused as refused:
                    self.metrics.requests.labels(refused.code.name).inc()
                    reply = self._error_reply(query_id, refused)
                except asyncio.CancelledError:
                    self.metrics.requests.labels("CANCELLED").inc()
                    return
                finally:
                    inflight.pop(query_id, None)
                if reply is None:  # emulation dropped it silently: the source never hears back
                    self.metrics.requests.labels("DROPPED").inc()
                else:
                    with contextlib.suppress(Exception):  # the stream ended meanwhile: nobody to tell
                        await send(reply)
            finally:
                self._end()

        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    break
                if isinstance(request, Malformed):  # answered by id "": the stream goes on
                    self.metrics.requests.labels(grpc.StatusCode.INVALID_ARGUMENT.name).inc()
                    logger.info("device %s: %s", self.device_id, request.message("DeviceInferRequest"))
                    await send(self._error_reply("", _Refused(grpc.StatusCode.INVALID_ARGUMENT, request.message("DeviceInferRequest"))))
                    continue
                try:
                    if len(request.cancel) > self.max_inflight:
                        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"cancel: {len(request.cancel)} query ids: expected at most {self.max_inflight}")
                    for query_id in request.cancel:
                        task = inflight.get(query_id)
                        if task is not None:
                            task.cancel()
                    if not request.query_id and not request.HasField("input"):
                        continue  # only cancellations
                    if request.query_id in inflight:
                        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"query_id: {request.query_id[:40]!r}: already in flight on this stream")
                    if len(inflight) >= self.max_inflight:
                        raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{len(inflight)} requests in flight on this stream: expected at most {self.max_inflight}")
                    if not (math.isfinite(request.timeout_s) and request.timeout_s >= 0):
                        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"timeout_s: {request.timeout_s!r}: expected seconds >= 0 (0: no limit)")
                    batch = self._checked(request)
                except _Refused as refused:
                    self.metrics.requests.labels(refused.code.name).inc()
                    await send(self._error_reply(request.query_id, refused))
                    continue
                expires = loop.time() + request.timeout_s if request.timeout_s > 0 else None
                task = inflight[request.query_id] = asyncio.ensure_future(serve_one(request.query_id, batch, expires))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:  # the source closed its side: finish what it asked for
                await asyncio.gather(*running, return_exceptions=True)
        finally:
            for task in list(running):
                task.cancel()

    def _checked(self, request: rocoin_pb2.DeviceInferRequest) -> np.ndarray:
        """The request's batch, or :class:`_Refused` (INVALID_ARGUMENT) naming the field and value."""
        batch, problem = self.check_request(request)
        if batch is None:
            logger.info("device %s rejected the query: %s", self.device_id, problem, extra={"query_id": request.query_id[:MAX_QUERY_ID_CHARS]})
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return batch

    def _error_reply(self, query_id: str, refused: _Refused) -> rocoin_pb2.DeviceInferResponse:
        return rocoin_pb2.DeviceInferResponse(
            query_id=query_id[:MAX_QUERY_ID_CHARS], device_id=self.device_id, group=self.group, error_code=refused.code.value[0], error=refused.message
        )

    async def _answer(self, query_id: str, batch: np.ndarray, expires: float | None = None) -> rocoin_pb2.DeviceInferResponse | None:
        """Run the model on a checked batch within the concurrency limit (and emulate the profile).

        Returns the answer, or None when emulation drops it silently; raises :class:`_Refused`.
        ``expires`` (event-loop time) refuses the request if no slot was free before then.
        """
        if self._closing:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, "the device is shutting down")
        await self._slots.acquire()  # a cancellation here (deadline, source) has nothing to undo
        started = time.perf_counter()
        release = True
        try:
            if expires is not None and asyncio.get_running_loop().time() > expires:
                raise _Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's timeout passed while it waited for a free slot")
            if batch.shape[0] * self.run_s_per_image <= INLINE_RUN_S:
                features = self._run_checked(query_id, batch)  # shorter than a hop to the thread pool
            else:
                work = asyncio.get_running_loop().run_in_executor(self._executor, self._run_checked, query_id, batch)
                try:
                    features = await asyncio.shield(work)
                except asyncio.CancelledError:
                    # keep the slot until the thread is really done, so at most max_concurrency run
                    work.add_done_callback(lambda _: self._slots.release())
                    release = False
                    raise
            if self.emulation is not None:
                remaining = self.target_s - (time.perf_counter() - started)
                if remaining > 0:
                    await asyncio.sleep(remaining)
                if self._rng.random() < self.emulation.outage:
                    if self.emulation.drop == "silent":
                        return None
                    raise _Refused(grpc.StatusCode.UNAVAILABLE, "emulated outage")
            compute_s = time.perf_counter() - started
        finally:
            if release:
                self._slots.release()
        self.metrics.requests.labels("OK").inc()
        self.metrics.run_time.observe(compute_s)
        logger.debug("device %s answered in %.4f s", self.device_id, compute_s, extra={"query_id": query_id[:MAX_QUERY_ID_CHARS]})
        return rocoin_pb2.DeviceInferResponse(
            query_id=query_id, device_id=self.device_id, group=self.group, features=tensor_to_proto(features), compute_s=compute_s
        )

    def _run_checked(self, query_id: str, batch: np.ndarray) -> np.ndarray:
        """:meth:`run_model` with its failures and a wrong output turned into INTERNAL refusals."""
        try:
            features = self.run_model(batch)
        except Exception as exc:  # onnxruntime's own error types
            logger.exception("device %s: the model failed on query %r", self.device_id, query_id[:MAX_QUERY_ID_CHARS])
            raise _Refused(grpc.StatusCode.INTERNAL, f"model run failed: {' '.join(str(exc).split())[:300]}") from None
        expected = (batch.shape[0], self.output_size)
        if features.shape != expected or features.dtype != np.float32:
            logger.error("device %s: model gave %s %s, expected %s float32", self.device_id, features.shape, features.dtype, expected)
            raise _Refused(grpc.StatusCode.INTERNAL, f"model output: shape {list(features.shape)} {features.dtype}: expected {list(expected)} float32")
        return features

    def _expected_shape(self) -> str:
        return f"(B, {', '.join(str(n) for n in self.input_shape)}) with B in 1..{self.max_batch}"


def _open_session(path: Path, model: GroupModel, intra_op_threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=[EXECUTION_PROVIDER])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        detail = " ".join(str(exc).split())[:300]
        raise RocoinError(f"{path}: onnxruntime cannot load the model ({detail}); refusing to serve it") from None
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    for kind, spec, found in (("input", model.input, inputs), ("output", model.output, outputs)):
        if spec.name not in found:
            raise RocoinError(f"{path}: the model has no {kind} named {spec.name!r} (it has {sorted(found)}); the manifest does not match it")
        dims = list(found[spec.name].shape)[1:]
        if len(dims) != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(dims, spec.shape)):
            raise RocoinError(f"{path}: {kind} {spec.name!r} has shape {found[spec.name].shape}, the manifest says (B, {', '.join(map(str, spec.shape))})")
    return session


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); port 0 asks for a free port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise RocoinError(f"listen = {listen!r}: expected host:port with a port in 0..65535 (0 picks a free one)")
    return host, int(port)


@dataclass
class DeviceServer:
    """A started device worker: its gRPC server, servicer, health service and bound address."""

    server: grpc.aio.Server
    worker: DeviceWorker
    health: health.aio.HealthServicer
    address: str
    port: int

    async def stop(self, grace: float | None = SHUTDOWN_GRACE_S) -> None:
        """Report NOT_SERVING, let the requests in progress be answered for up to ``grace``
        seconds, then end every call and stream (the source's stream stays open while idle, so
        waiting for it to end would always cost the whole grace)."""
        await self.health.enter_graceful_shutdown()
        await self.worker.drain(grace)
        await self.server.stop(0)
        self.worker.close()


async def start_device(
    bundle: str | os.PathLike[str],
    device_id: str,
    listen: str = "127.0.0.1:0",
    *,
    emulation: Emulation | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    intra_op_threads: int = DEFAULT_INTRA_OP_THREADS,
    token: str | None = None,
    tls: ServerTLS | None = None,
    insecure: bool = False,
    keepalive: Keepalive = KEEPALIVE,
) -> DeviceServer:
    """Load and check the model, listen on ``listen`` and start serving; stop it with ``.stop()``.

    With ``token``, every call but the health service's must carry it (see ``rocoin.runtime.transport.auth``);
    with ``tls`` the port speaks TLS (mTLS when it names a client CA; see ``rocoin.runtime.transport.tls``).
    Without a token or mTLS the worker refuses to start unless ``insecure`` is True.
    ``keepalive`` must permit the source's pings (both sides use :data:`KEEPALIVE` by default).
    """
    host, _ = parse_listen(listen)
    check_authentication(
        f"device {device_id}",
        token=token,
        tls_client_auth=tls is not None and tls.client_ca is not None,
        insecure=insecure,
        risk="anyone who reaches its port can run queries on it",
    )
    worker = DeviceWorker(
        bundle, device_id, emulation=emulation, max_batch=max_batch, max_concurrency=max_concurrency, intra_op_threads=intra_op_threads
    )
    server = create_server(
        max_receive_bytes=worker.max_request_bytes,
        max_send_bytes=worker.max_response_bytes,
        max_concurrent_rpcs=max_concurrency + MAX_QUEUED_CALLS,
        token=token,
        keepalive=keepalive,
        options=[("grpc.so_reuseport", 0)],  # a second worker on a busy port fails instead of sharing it
    )
    rocoin_pb2_grpc.add_DeviceServicer_to_server(worker, server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    try:
        port = server.add_secure_port(listen, tls.credentials()) if tls is not None else server.add_insecure_port(listen)
    except RocoinError:
        worker.close()
        raise
    except RuntimeError as exc:
        worker.close()
        raise RocoinError(f"listen = {listen!r}: cannot bind ({exc})") from None
    if not port:
        worker.close()
        raise RocoinError(f"listen = {listen!r}: cannot bind (address in use or not local)")
    await server.start()
    for service in ("", DEVICE_SERVICE):
        await health_service.set(service, health_pb2.HealthCheckResponse.SERVING)
    return DeviceServer(server, worker, health_service, f"{host}:{port}", port)


async def serve_device(
    bundle: str | os.PathLike[str],
    device_id: str,
    listen: str = "127.0.0.1:0",
    *,
    emulation: Emulation | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    intra_op_threads: int = DEFAULT_INTRA_OP_THREADS,
    ready: Callable[[DeviceServer], Any] | None = None,
    ready_file: str | os.PathLike[str] | None = None,
    token: str | None = None,
    tls: ServerTLS | None = None,
    insecure: bool = False,
    metrics_listen: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT or cancellation, then shut down within :data:`SHUTDOWN_GRACE_S`.

    Once serving: ``ready_file`` (if given) is written atomically with
    ``{"address", "port", "pid", "device_id", "group"}`` (and removed at shutdown), one INFO log
    line gives the bound address, and ``ready(server)`` is called. Raises :class:`RocoinError`
    before listening when the bundle, the device id, the model file or ``listen`` is bad.
    """
    if ready_file is not None:
        folder = Path(ready_file).parent
        if not folder.is_dir():
            raise RocoinError(f"ready-file = {str(ready_file)!r}: folder {folder} does not exist")
    running = await start_device(
        bundle,
        device_id,
        listen,
        emulation=emulation,
        max_batch=max_batch,
        max_concurrency=max_concurrency,
        intra_op_threads=intra_op_threads,
        token=token,
        tls=tls,
        insecure=insecure,
    )
    if metrics_listen is not None:
        metrics_port = running.worker.metrics.serve(metrics_listen)
        logger.info("device %s metrics on http://%s:%d/metrics", device_id, metrics_listen.rpartition(":")[0], metrics_port)
    stop = asyncio.Event()
    try:
        if ready_file is not None:
            write_json_atomic(
                ready_file,
                {"address": running.address, "port": running.port, "pid": os.getpid(), "device_id": device_id, "group": running.worker.group},
            )
        worker = running.worker
        logger.info(
            "device %s (group %d, student %s, %d filters%s) serving on %s",
            device_id,
            worker.group,
            worker.model.student,
            worker.output_size,
            f", emulating t={worker.target_s:.4g} s outage={emulation.outage:g}" if emulation else "",
            running.address,
        )
        if ready is not None:
            ready(running)
        with stop_on_signals(stop):
            await stop.wait()
        logger.info("device %s: signal received, shutting down", device_id)
    finally:
        await running.stop(SHUTDOWN_GRACE_S)
        if ready_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ready_file)
        logger.info("device %s: stopped", device_id)
