"""The device's gRPC servicer (``rocoin.v1.Device``): :class:`DeviceWorker` checks every request
against the manifest, runs the group model (:mod:`.runner`) within a concurrency limit and, when
told to, emulates a fleet profile (:mod:`.emulation`). The server around it is :mod:`.server`.

``Infer`` accepts only what the manifest promises the model: a float32 ``(B, C, H, W)`` batch
with the manifest's ``(C, H, W)``, ``1 <= B <= max_batch`` and finite values; anything else gets
``INVALID_ARGUMENT`` naming the field, the value and what was expected, and the worker goes on
serving. A request larger than the worker's message limit (``max_batch`` inputs plus
:data:`MESSAGE_SLACK_BYTES`) gets ``RESOURCE_EXHAUSTED`` from gRPC before it is parsed.

``InferStream`` is the source's transport: one long-lived stream per source, each message a
request as above (plus ``timeout_s`` and ``cancel``), each answer written when it is ready and
matched by ``query_id``. A bad request on the stream gets an answer with ``error_code`` and
``error`` (the same codes and messages as ``Infer``) and the stream goes on. A stream message
costs about half a unary call in grpcio, which is most of the source's overhead on small models:
the source's dynamic batcher sends one message for many queued queries, which runs as one batch
(one onnxruntime call), and every answer says the device's ``max_batch`` so that no message
carries more images than the device accepts.

Concurrency: at most ``max_concurrency`` requests run the model (and their emulated delay) at a
time; further ones wait their turn, in arrival order. A unary call whose deadline passes while it
waits ends with gRPC's ``DEADLINE_EXCEEDED`` and never runs the model (a stream request past its
``timeout_s`` is answered ``DEADLINE_EXCEEDED`` when its turn comes). Beyond
``max_concurrency + MAX_QUEUED_CALLS`` calls in flight, gRPC answers ``RESOURCE_EXHAUSTED`` (a
stream: per stream). A model run expected to take at most :data:`INLINE_RUN_S` runs on the event
loop, and so does one of at most :data:`INLINE_SERIAL_RUN_S` on a worker running one request at a
time; the others run in a thread pool (in parallel, up to ``max_concurrency``) so health checks and
other calls go on meanwhile.

An emulated answer that is dropped silently never arrives: a unary call is held, without its
concurrency slot, until the caller's deadline (at most :data:`SILENT_DROP_HOLD_S`), then ends
``UNAVAILABLE "emulated outage"``; on a stream no answer is written. ``drop="error"`` answers
``UNAVAILABLE`` at once.

Nothing here imports torch or training code: a device needs numpy, onnxruntime, grpcio,
grpcio-health-checking and protobuf only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.manifest import GroupModel, Manifest, load_manifest
from rocoin.runtime.device.emulation import Emulation
from rocoin.runtime.device.models import ModelCache, ModelReceiver
from rocoin.runtime.device.options import DEFAULT_INTRA_OP_THREADS, DEFAULT_MAX_BATCH, DEFAULT_MAX_CONCURRENCY  # one default per setting
from rocoin.runtime.device.runner import ModelRunner
from rocoin.runtime.transport.grpc_server import Malformed
from rocoin.runtime.transport.metrics import DeviceMetrics
from rocoin.runtime.transport.protocol import rocoin_pb2, rocoin_pb2_grpc
from rocoin.runtime.transport.serde import DTYPES, TensorError, tensor_from_proto, tensor_to_proto

logger = logging.getLogger(__name__)

#: The gRPC service name (also the name the health service reports).
DEVICE_SERVICE = "rocoin.v1.Device"
#: Calls that may wait for a free slot on top of ``max_concurrency``; more get RESOURCE_EXHAUSTED.
MAX_QUEUED_CALLS = 256
#: Room in the gRPC message limits for everything but the tensor bytes (ids, shape, tags).
MESSAGE_SLACK_BYTES = 64 * 1024
#: Longest accepted ``query_id``.
MAX_QUERY_ID_CHARS = 256
#: Longest time a silently dropped call is held when the caller set no deadline.
SILENT_DROP_HOLD_S = 60.0
#: Requests whose model run is expected to take at most this long run on the event loop: a hop to
#: the thread pool and back costs more than the run itself (a small student at batch 1).
INLINE_RUN_S = 0.001
#: On a worker that runs one request at a time (``max_concurrency`` 1) a run expected to take at
#: most this long runs on the event loop too: no other run could go beside it in the pool, and the
#: hop to a thread and back costs 0.2-0.5 ms of CPU per onnxruntime call (a batch of 11 of the demo's
#: students: 4.7 ms on the loop, 4.9-5.3 ms through the pool). Calls arriving meanwhile wait at most
#: this long before gRPC hands them over.
INLINE_SERIAL_RUN_S = 0.05

_FLOAT32 = "float32"


@dataclasses.dataclass(frozen=True)
class _Serving:
    """What one request runs on, taken once when it starts: a model swapped in meanwhile
    (:meth:`DeviceWorker.serve`) does not change the runner, the checks or the group of its answer."""

    runner: ModelRunner
    model: GroupModel
    output_shape: tuple[int, ...]  # per image: (|P_k|,) pooled, or (|P_k|, h, w) a detector's map
    target_s: float  # emulated time of one request (0: no emulation)
    run_s_per_image: float  # the model's batch-1 time here (a warm-up run)

    @property
    def group(self) -> int:
        return self.model.group

    @property
    def output_size(self) -> int:
        return self.output_shape[0]


class _Refused(Exception):
    """A request the worker will not answer with features: a gRPC status code and why."""

    def __init__(self, code: grpc.StatusCode, message: str, group: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.group = group  # the group the request was run for (None: the one served now)


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
        model: GroupModel | None = None,
        student_flops: float = 0.0,
        models: ModelCache | None = None,
    ) -> None:
        """``bundle`` holds ``device_id``'s group model (from its manifest); or, with ``model``
        (a manifest entry), ``bundle`` is the folder holding that file and ``student_flops``
        its FLOPs per image (for emulation). ``models``: where models sent by the source
        (``Assign``) are kept (default: a ``models`` folder beside the bundle's files)."""
        for name, value in (("max_batch", max_batch), ("max_concurrency", max_concurrency), ("intra_op_threads", intra_op_threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RocoinError(f"{name.replace('_', '-')} = {value!r}: expected an integer >= 1")
        self.bundle = Path(bundle)
        self.device_id = device_id
        self.metrics = DeviceMetrics()
        self.manifest: Manifest | None = None
        if model is None:
            self.manifest = load_manifest(self.bundle)
            model = self.manifest.group_of(device_id)
            student_flops = self.manifest.plan.catalog[model.student].flops
        self.models = models
        self.max_batch = max_batch
        self.max_concurrency = max_concurrency
        self.emulation = emulation
        self.intra_op_threads = intra_op_threads
        self.input_shape = tuple(model.input.shape)  # (C, H, W)
        itemsize = DTYPES[_FLOAT32].itemsize
        self.max_input_bytes = math.prod(self.input_shape) * itemsize * max_batch
        #: gRPC message limits: the largest valid request/response plus the envelope (any group's
        #: partition, when the manifest says how large they can be: the device may be moved)
        widest = (self.manifest.plan.num_filters if self.manifest is not None else len(model.filters)) * math.prod(model.output.shape[1:])
        self.max_request_bytes = self.max_input_bytes + MESSAGE_SLACK_BYTES
        self.max_response_bytes = widest * itemsize * max_batch + MESSAGE_SLACK_BYTES
        self._rng = random.Random(emulation.seed if emulation else None)
        self.serve(self.bundle, model, student_flops)
        self._slots = asyncio.Semaphore(max_concurrency)
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=f"rocoin-{device_id}")
        #: requests one InferStream may have queued or running
        self.max_inflight = max_concurrency + MAX_QUEUED_CALLS
        self._active = 0  # requests being answered, on every call and stream
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False

    def serve(self, folder: Path, model: GroupModel, student_flops: float) -> None:
        """Serve ``model`` (its file in ``folder``, checked against the entry: size, SHA-256,
        input and output) from the next request on; requests already running finish on the
        model they started with. :class:`RocoinError` (and the old model stays) when it fails."""
        if tuple(model.input.shape) != self.input_shape:
            raise RocoinError(f"model input {model.input.shape}: this device serves inputs of shape {list(self.input_shape)}")
        runner = ModelRunner(folder, model, self.intra_op_threads)
        output_shape = (len(model.filters), *model.output.shape[1:])
        bits_per_filter = math.prod(output_shape[1:]) * DTYPES[model.wire_dtype].itemsize * 8  # 32: one pooled float32
        self._serving = _Serving(
            runner=runner,
            model=model,
            output_shape=output_shape,
            target_s=self.emulation.latency_s(student_flops, output_shape[0], bits_per_filter) if self.emulation else 0.0,
            run_s_per_image=runner.time_one_image(),
        )  # one assignment: a request sees the old model or the new one, never a mix

    @property
    def model(self) -> GroupModel:
        """The manifest entry of the model served now."""
        return self._serving.model

    @property
    def group(self) -> int:
        return self._serving.group

    @property
    def output_size(self) -> int:
        return self._serving.output_size

    @property
    def run_s_per_image(self) -> float:
        """The model's batch-1 time here: decides whether a request runs on the event loop
        (short) or in the thread pool (long enough to stall other calls)."""
        return self._serving.run_s_per_image

    @property
    def target_s(self) -> float:
        """The emulated time of one request (0 without emulation)."""
        return self._serving.target_s

    @target_s.setter
    def target_s(self, value: float) -> None:
        self._serving = dataclasses.replace(self._serving, target_s=value)

    async def Assign(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> rocoin_pb2.ModelReady:
        """The source moves this device to another group: an ``Assignment``, then the model's
        chunks (or none: the model is taken from the bundle or the cache after verifying it)."""

        models = self.models or ModelCache(self.bundle / "models")
        receiver: ModelReceiver | None = None
        try:
            async for message in request_iterator:
                if isinstance(message, Malformed):
                    raise RocoinError(message.message("AssignMessage"))
                kind = message.WhichOneof("kind")
                if kind == "assign" and receiver is None:
                    receiver = ModelReceiver(models, message.assign, extra_folders=[self.bundle])
                elif kind == "chunk" and receiver is not None:
                    receiver.add(message.chunk)
                else:
                    raise RocoinError(f"Assign: unexpected {kind or 'empty'} message")
            if receiver is None:
                raise RocoinError("Assign: no assignment")
            folder, model, flops = receiver.finish()
            self.serve(folder, model, flops)
        except RocoinError as exc:
            logger.warning("device %s: refused the assignment: %s", self.device_id, exc)
            return rocoin_pb2.ModelReady(epoch=receiver.epoch if receiver else 0, error=str(exc)[:500])
        logger.warning("device %s now serves group %d (model %s)", self.device_id, self.group, self.model.sha256[:12])
        return rocoin_pb2.ModelReady(sha256=self.model.sha256, epoch=receiver.epoch)

    async def Check(self, request: rocoin_pb2.HealthCheck, context: grpc.aio.ServicerContext) -> rocoin_pb2.HealthReply:
        """A health check naming the model this device serves."""
        return rocoin_pb2.HealthReply(nonce=request.nonce[:64], model_sha256=self.model.sha256)

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
        return self._serving.runner.run(batch)

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
                    batch = self._admit(request, inflight)
                except _Refused as refused:
                    self.metrics.requests.labels(refused.code.name).inc()
                    await send(self._error_reply(request.query_id, refused))
                    continue
                if batch is None:
                    continue  # only cancellations
                expires = loop.time() + request.timeout_s if request.timeout_s > 0 else None
                task = inflight[request.query_id] = asyncio.ensure_future(serve_one(request.query_id, batch, expires))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:  # the source closed its side: finish what it asked for
                await asyncio.gather(*running, return_exceptions=True)
        finally:
            for task in list(running):
                task.cancel()

    def _admit(self, request: rocoin_pb2.DeviceInferRequest, inflight: dict[str, asyncio.Task]) -> np.ndarray | None:
        """One message of a stream: drop the requests it cancels, then its batch (None when it
        only cancels), or :class:`_Refused` when the stream cannot take it."""
        if len(request.cancel) > self.max_inflight:
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT, f"cancel: {len(request.cancel)} query ids: expected at most {self.max_inflight}"
            )
        for query_id in request.cancel:
            task = inflight.get(query_id)
            if task is not None:
                task.cancel()
        if not request.query_id and not request.HasField("input"):
            return None
        if request.query_id in inflight:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"query_id: {request.query_id[:40]!r}: already in flight on this stream")
        if len(inflight) >= self.max_inflight:
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(inflight)} requests in flight on this stream: expected at most {self.max_inflight}",
            )
        if not (math.isfinite(request.timeout_s) and request.timeout_s >= 0):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"timeout_s: {request.timeout_s!r}: expected seconds >= 0 (0: no limit)")
        return self._checked(request)

    def _checked(self, request: rocoin_pb2.DeviceInferRequest) -> np.ndarray:
        """The request's batch, or :class:`_Refused` (INVALID_ARGUMENT) naming the field and value."""
        batch, problem = self.check_request(request)
        if batch is None:
            logger.info(
                "device %s rejected the query: %s", self.device_id, problem, extra={"query_id": request.query_id[:MAX_QUERY_ID_CHARS]}
            )
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return batch

    def _error_reply(self, query_id: str, refused: _Refused) -> rocoin_pb2.DeviceInferResponse:
        return rocoin_pb2.DeviceInferResponse(
            query_id=query_id[:MAX_QUERY_ID_CHARS],
            device_id=self.device_id,
            group=refused.group if refused.group is not None else self.group,
            error_code=refused.code.value[0],
            error=refused.message,
            max_batch=self.max_batch,
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
        serving = self._serving  # the model this request runs on, even if another is swapped in meanwhile
        release = True
        try:
            if expires is not None and asyncio.get_running_loop().time() > expires:
                raise _Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's timeout passed while it waited for a free slot")
            expected_s = batch.shape[0] * serving.run_s_per_image
            if expected_s <= INLINE_RUN_S or (self.max_concurrency == 1 and expected_s <= INLINE_SERIAL_RUN_S):
                features = self._run_checked(serving, query_id, batch)  # shorter than a hop to the thread pool, or serial
            else:
                work = asyncio.get_running_loop().run_in_executor(self._executor, self._run_checked, serving, query_id, batch)
                try:
                    features = await asyncio.shield(work)
                except asyncio.CancelledError:
                    # keep the slot until the thread is really done, so at most max_concurrency run
                    work.add_done_callback(lambda _: self._slots.release())
                    release = False
                    raise
            if self.emulation is not None and await self.emulation.hold(serving.target_s, started, self._rng):
                if self.emulation.drop == "silent":
                    return None
                raise _Refused(grpc.StatusCode.UNAVAILABLE, "emulated outage", serving.group)
            compute_s = time.perf_counter() - started
        finally:
            if release:
                self._slots.release()
        self.metrics.requests.labels("OK").inc()
        self.metrics.run_time.observe(compute_s)
        logger.debug("device %s answered in %.4f s", self.device_id, compute_s, extra={"query_id": query_id[:MAX_QUERY_ID_CHARS]})
        return rocoin_pb2.DeviceInferResponse(
            query_id=query_id,
            device_id=self.device_id,
            group=serving.group,
            features=tensor_to_proto(features),
            compute_s=compute_s,
            max_batch=self.max_batch,
        )

    def _run_checked(self, serving: _Serving, query_id: str, batch: np.ndarray) -> np.ndarray:
        """``serving``'s model on a checked batch, its failures and a wrong output turned into INTERNAL refusals."""
        try:
            features = serving.runner.run(batch)
        except Exception as exc:  # onnxruntime's own error types
            logger.exception("device %s: the model failed on query %r", self.device_id, query_id[:MAX_QUERY_ID_CHARS])
            raise _Refused(grpc.StatusCode.INTERNAL, f"model run failed: {' '.join(str(exc).split())[:300]}", serving.group) from None
        expected = (batch.shape[0], *serving.output_shape)
        if features.shape != expected or features.dtype != np.float32:
            logger.error("device %s: model gave %s %s, expected %s float32", self.device_id, features.shape, features.dtype, expected)
            raise _Refused(
                grpc.StatusCode.INTERNAL,
                f"model output: shape {list(features.shape)} {features.dtype}: expected {list(expected)} float32",
                serving.group,
            )
        if serving.model.wire_dtype == "float16":  # the manifest trades precision for half the bytes on the wire
            return features.astype(np.float16)
        return features

    def _expected_shape(self) -> str:
        return f"(B, {', '.join(str(n) for n in self.input_shape)}) with B in 1..{self.max_batch}"
