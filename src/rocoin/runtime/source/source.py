"""The source: broadcasts each query to every device, takes the first answer of each group, and
runs the head — as soon as every group has answered, or at the deadline with the missing slots
zero-filled (SPEC.md §1). Usable as a library (:class:`Source`) and served over gRPC
(:func:`serve_source`).

Transport: one long-lived channel per device (keepalive) carrying one ``InferStream`` stream.
A query is one message to each device (serialised once), carrying the time left until the
query's deadline as its ``timeout_s``; answers are matched to their query by id as they arrive.
The replicas of a group that answered are told to drop the query with a ``cancel`` entry riding
on their next message (or, when no query follows within :data:`CANCEL_FLUSH_S`, a message of
its own). A stream message costs about half a unary gRPC call, which is most of the overhead on
small students.

A device whose stream breaks (the process died, the connection was lost) is marked down at once;
one whose answers fail or miss the deadline ``FAILURES_TO_MARK_DOWN`` times in a row is marked
down too. No query waits for a down device, and a probe asks its gRPC health service every
``PROBE_INTERVAL_S``; it is used again once SERVING (with a fresh stream if its stream broke).
A device marked down for failures keeps its stream and still gets every query, on trial: an
answer that comes before the head runs is used, and any answer brings it back at once — so a
device that drops a few answers in a row (a flaky link) is not left out for a whole probe
interval.

Whose fault is it? The source checks every query before it sends it — the image batch against
the manifest (FP32 values in [0, 1]; finite after normalisation), the id, the deadline — and
answers the caller with :class:`RocoinError` (HTTP 400 / ``INVALID_ARGUMENT``). A device that
still refuses a query as invalid (``INVALID_ARGUMENT``) is misconfigured, not down: its group
misses that answer, the refusal is counted (``rocoin_device_refusals``) and logged, and it never
counts towards marking the device down — else a client could knock every device out with three
bad requests. Likewise a deadline miss counts against a device only when the query had at least
the source's own deadline (a client may ask for 1 ms; no device meets that, and none should be
marked down for it). A device answer with non-finite values is that device's failure; a head that
still produces non-finite logits is a :class:`ServingError`, never a non-JSON number for the
client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rocoin.contracts.errors import RocoinError, ServingError
from rocoin.contracts.text import short_repr
from rocoin.contracts.fleet import Fleet
from rocoin.runtime.transport.auth import check_authentication, token_metadata
from rocoin.runtime.transport.keepalive import KEEPALIVE, Keepalive
from rocoin.runtime.transport.metrics import SourceMetrics
from rocoin.runtime.transport.tls import ClientTLS
from rocoin.contracts.manifest import Manifest, load_manifest, verify_file
from rocoin.runtime.transport.protocol import rocoin_pb2
from rocoin.runtime.transport.serde import tensor_from_proto, tensor_to_proto

logger = logging.getLogger(__name__)

#: Default time the source waits for the groups of one query.
DEFAULT_DEADLINE_S = 1.0
#: Deadlines accepted, per query or as the default: shorter than a millisecond no device can
#: answer (every group would be missing); longer than 5 minutes a lost device holds a caller
#: (and the query's memory) for longer than any edge application waits.
MIN_DEADLINE_S = 0.001
MAX_DEADLINE_S = 300.0
#: Consecutive failed calls after which a device is marked down.
FAILURES_TO_MARK_DOWN = 3
#: How often a down device's health service is asked whether it is back.
PROBE_INTERVAL_S = 0.5
#: Time limit of one health probe.
PROBE_TIMEOUT_S = 0.5
#: Reconnection backoff towards a device that went away: short, so a restarted device is found soon.
INITIAL_RECONNECT_BACKOFF_MS = 100
MAX_RECONNECT_BACKOFF_MS = 1_000
#: Largest image batch one query may carry.
MAX_BATCH = 64
#: Slack over the tensor payload for protobuf framing.
MESSAGE_SLACK_BYTES = 64 * 1024
#: Longest a cancellation waits to ride on the next query's message before it is sent on its own.
CANCEL_FLUSH_S = 0.005
#: Messages waiting to be written to one device's stream; beyond, the device fails the query
#: (a device that stopped reading must not make the source buffer without bound).
MAX_OUTBOX = 256
#: Longest query id a client may give (a UUID has 36 characters); the ids sent to devices add a
#: per-query counter and stay within the devices' limit.
MAX_CLIENT_ID_CHARS = 128
#: FP32 images are 0..1 (uint8 images are 0..255): anything outside is a client's mistake (e.g.
#: an already normalised image) and could overflow the normalisation.
FP32_INPUT_RANGE = (0.0, 1.0)
#: At most one WARNING per device this often about devices refusing queries as invalid.
REFUSAL_LOG_INTERVAL_S = 10.0

_STREAM_METHOD = "/rocoin.v1.Device/InferStream"


@dataclass
class DeviceState:
    device_id: str
    address: str
    group: int
    channel: grpc.aio.Channel | None = None
    up: bool = True
    consecutive_failures: int = 0
    probe: asyncio.Task | None = None
    failures: int = 0
    answers: int = 0
    #: the open stream, the queue of serialised messages for it, and its writer and reader tasks
    stream: grpc.aio.StreamStreamCall | None = None
    outbox: asyncio.Queue | None = None
    tasks: tuple[asyncio.Task, ...] = ()
    #: queries sent on the stream and not answered yet, by wire id, and whether they wait for it
    #: (False while the device is down: it still gets queries, on trial, and nobody waits)
    waiting: dict[str, tuple[_Query, bool]] = field(default_factory=dict)
    #: wire ids whose answers are no longer wanted, to send with the next message
    cancels: list[str] = field(default_factory=list)
    #: queries the device refused as invalid although the source had checked them
    refusals: int = 0
    refusals_logged_at: float = float("-inf")


@dataclass(frozen=True)
class InferResult:
    query_id: str
    logits: np.ndarray
    missing_groups: list[int]
    answered_by: list[str]
    latency_s: float


class _Query:
    """One query in flight: the groups' slots, and the calls it waits for in each group.

    A call is *counted* when the query waits for it (its device is up); a down device's call is
    not, but its answer still fills an empty slot if it comes before the head runs.
    """

    __slots__ = ("wire_id", "query_id", "batch", "started", "slots", "answered_by", "open_calls", "pending", "undecided", "done", "expired", "fair")

    def __init__(self, wire_id: str, query_id: str, batch: int, num_groups: int, started: float, done: asyncio.Future, fair: bool = True) -> None:
        self.wire_id = wire_id
        #: the deadline is one a healthy device must meet (the source's own, or longer): a miss is
        #: the device's failure; a client's shorter deadline is the client's choice, not evidence
        self.fair = fair
        self.query_id = query_id
        self.batch = batch
        self.started = started
        self.slots: list[np.ndarray | None] = [None] * num_groups
        self.answered_by = [""] * num_groups
        self.open_calls = [0] * num_groups  # counted calls not answered yet
        self.pending = [False] * num_groups  # groups the query still waits for
        self.undecided = 0  # how many of them
        self.done = done
        self.expired = False  # the deadline came before every group was decided

    def expire(self) -> None:
        if not self.done.done():
            self.expired = True
            self.done.set_result(None)

    def start_waiting(self) -> None:
        """After the query went out: wait for every group with a counted call."""
        self.pending = [calls > 0 for calls in self.open_calls]
        self.undecided = sum(self.pending)

    def answered(self, group: int, features: np.ndarray, device_id: str, counted: bool) -> bool:
        """Take a replica's answer; True when it filled the group's slot."""
        if counted:
            self.open_calls[group] -= 1
        if self.slots[group] is not None:
            return False
        self.slots[group] = features
        self.answered_by[group] = device_id
        self._decided(group)
        return True

    def call_failed(self, group: int, counted: bool) -> None:
        if counted:
            self.open_calls[group] -= 1
            if self.open_calls[group] == 0:
                self._decided(group)  # no replica left to answer: stop waiting for this group

    def _decided(self, group: int) -> None:
        if not self.pending[group]:
            return
        self.pending[group] = False
        self.undecided -= 1
        if self.undecided == 0 and not self.done.done():
            self.done.set_result(None)


class Source:
    """Serve a bundle's plan over the devices of ``fleet`` (each plan device needs an ``address``)."""

    def __init__(
        self,
        bundle: str | Path,
        fleet: Fleet,
        *,
        deadline_s: float = DEFAULT_DEADLINE_S,
        intra_op_threads: int = 1,
        token: str | None = None,
        tls: ClientTLS | None = None,
        insecure: bool = False,
        keepalive: Keepalive = KEEPALIVE,
    ) -> None:
        check_deadline(deadline_s, "deadline-s")
        check_authentication(
            "the source",
            token=token,
            tls_client_auth=tls is not None and tls.cert is not None,
            insecure=insecure,
            risk="it calls its devices without a token, so they must accept anyone's calls (device serve --insecure)",
        )
        bundle = Path(bundle)
        self.keepalive = keepalive
        self.manifest: Manifest = load_manifest(bundle)
        self.deadline_s = deadline_s
        self._metadata = token_metadata(token)
        self.metrics = SourceMetrics()
        self._credentials = tls.credentials() if tls is not None else None
        plan = self.manifest.plan
        plan.check_fleet(fleet)
        by_id = {d.id: d for d in fleet.devices}
        self.devices: list[DeviceState] = []
        for k, group in enumerate(plan.groups):
            for device_id in group.devices:
                address = by_id[device_id].address
                if not address:
                    raise RocoinError(f"fleet: device {device_id!r} has no address (host:port of its worker)")
                self.devices.append(DeviceState(device_id, address, k))
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self._head = ort.InferenceSession(str(verify_file(bundle, self.manifest.head)), options, providers=["CPUExecutionProvider"])
        self._head_input = self.manifest.head.input.name
        self._filters = [np.asarray(g.filters) for g in plan.groups]
        self._slot_sizes = [len(f) for f in self._filters]
        input_shape = tuple(self.manifest.input.shape)
        self.input_shape = input_shape
        self._mean = np.asarray(self.manifest.normalization.mean, dtype=np.float32).reshape(-1, 1, 1)
        self._std = np.asarray(self.manifest.normalization.std, dtype=np.float32).reshape(-1, 1, 1)
        payload = MAX_BATCH * int(np.prod(input_shape)) * 4
        self.max_message_bytes = payload + MESSAGE_SLACK_BYTES
        self._started = False
        self._sent = 0  # queries sent: makes every id on the wire unique
        self._flush: asyncio.TimerHandle | None = None

    @property
    def ready(self) -> bool:
        """Started, and every group has at least one device that is not marked down."""
        return self._started and all(any(d.up for d in self.devices if d.group == k) for k in range(self.num_groups))

    @property
    def num_groups(self) -> int:
        return len(self._filters)

    async def start(self) -> None:
        options = [
            *self.keepalive.client_options(),
            ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
            ("grpc.min_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        for device in self.devices:
            if self._credentials is not None:
                device.channel = grpc.aio.secure_channel(device.address, self._credentials, options=options)
            else:
                device.channel = grpc.aio.insecure_channel(device.address, options=options)
            self._open_stream(device)
            self.metrics.device_up.labels(device.device_id).set(1 if device.up else 0)
        self._started = True

    async def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        for device in self.devices:
            if device.probe is not None:
                device.probe.cancel()
            self._close_stream(device)
            if device.channel is not None:
                await device.channel.close()
        self._started = False

    async def __aenter__(self) -> Source:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- one query -----------------------------------------------------------------------

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """(B, C, H, W) uint8 0..255 or float32 0..1 -> the normalised float32 batch the students expect."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise RocoinError(f"input shape {tuple(images.shape)}: expected (B, {', '.join(map(str, self.input_shape))})")
        if not 1 <= images.shape[0] <= MAX_BATCH:
            raise RocoinError(f"input batch {images.shape[0]}: expected 1..{MAX_BATCH}")
        if images.dtype == np.uint8:
            x = images.astype(np.float32) / 255.0
        elif images.dtype == np.float32:
            low, high = FP32_INPUT_RANGE
            if not np.isfinite(images).all():
                raise RocoinError("input: contains NaN or Inf")
            if images.min() < low or images.max() > high:
                raise RocoinError(
                    f"input: FP32 values from {images.min():.6g} to {images.max():.6g}: expected {low:g}..{high:g} (or UINT8 0..255; the source normalises)"
                )
            x = images
        else:
            raise RocoinError(f"input dtype {images.dtype}: expected uint8 (0..255) or float32 (0..1)")
        x = np.ascontiguousarray((x - self._mean) / self._std, dtype=np.float32)
        if not np.isfinite(x).all():  # cannot happen with a checked manifest; never send it on
            raise RocoinError("input: not finite after the manifest's normalisation")
        return x

    async def infer(self, images: np.ndarray, *, deadline_s: float | None = None, query_id: str | None = None) -> InferResult:
        if not self._started:
            raise RuntimeError("Source.start() has not been called")
        started = time.perf_counter()
        query_id = check_query_id(query_id) if query_id else uuid.uuid4().hex[:16]
        budget = self.deadline_s if deadline_s is None else check_deadline(deadline_s, "deadline_s")
        x = self.normalise(images)
        self._sent += 1
        wire_id = f"{query_id}#{self._sent:x}"
        loop = asyncio.get_running_loop()
        query = _Query(wire_id, query_id, x.shape[0], self.num_groups, started, loop.create_future(), fair=budget >= self.deadline_s)
        message = rocoin_pb2.DeviceInferRequest(query_id=wire_id, input=tensor_to_proto(x), timeout_s=budget).SerializeToString()
        for device in self.devices:
            if device.outbox is not None:  # up, or down with its stream open: on trial
                self._send(device, query, message)
        query.start_waiting()
        if query.undecided:
            expire = loop.call_later(budget - (time.perf_counter() - started), query.expire)
            try:
                await query.done
            finally:  # also when the caller gave up on the query (cancelled): nobody failed then
                expire.cancel()
                self._settle(query)
        missing = [k for k, s in enumerate(query.slots) if s is None]
        logits = self._head_run(x.shape[0], query.slots)
        if not np.isfinite(logits).all():
            logger.error("the head gave non-finite logits for query %s (groups missing: %s)", query_id, missing, extra={"query_id": query_id})
            raise ServingError("the model gave non-finite logits for this input; nothing to return")
        latency = time.perf_counter() - started
        self.metrics.queries.inc()
        self.metrics.query_latency.observe(latency)
        for k in missing:
            self.metrics.missing_groups.labels(str(k)).inc()
        if missing:
            logger.info("groups %s missing after %.3f s", missing, latency, extra={"query_id": query_id})
        else:
            logger.debug("answered in %.4f s by %s", latency, ",".join(query.answered_by), extra={"query_id": query_id})
        return InferResult(query_id, logits, missing, query.answered_by, latency)

    def _send(self, device: DeviceState, query: _Query, message: bytes) -> None:
        if device.cancels:  # protobuf merges concatenated messages: the cancellations ride along
            message += rocoin_pb2.DeviceInferRequest(cancel=device.cancels).SerializeToString()
            device.cancels = []
        try:
            device.outbox.put_nowait(message)
        except asyncio.QueueFull:
            self._failed(device, f"{MAX_OUTBOX} messages waiting to be written: the device is not reading", query.query_id)
            return
        device.waiting[query.wire_id] = (query, device.up)
        if device.up:
            query.open_calls[device.group] += 1

    def _settle(self, query: _Query) -> None:
        """After a query: devices still working on it are told to drop it; those whose group
        went unanswered until the deadline failed it."""
        cancelled = False
        for device in self.devices:
            if device.waiting.pop(query.wire_id, None) is None:
                continue
            if device.outbox is not None:
                device.cancels.append(query.wire_id)
                cancelled = True
            if query.expired and query.fair and query.slots[device.group] is None:
                self._failed(device, "no answer by the deadline", query.query_id)  # may close its stream
        if cancelled and self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(CANCEL_FLUSH_S, self._flush_cancels)

    def _flush_cancels(self) -> None:
        self._flush = None
        for device in self.devices:
            if device.cancels and device.outbox is not None:
                with contextlib.suppress(asyncio.QueueFull):
                    device.outbox.put_nowait(rocoin_pb2.DeviceInferRequest(cancel=device.cancels).SerializeToString())
            device.cancels = []

    def _answer(self, device: DeviceState, reply: rocoin_pb2.DeviceInferResponse) -> None:
        entry = device.waiting.pop(reply.query_id, None)
        if entry is None:  # an answer after its query ended
            if not device.up and not reply.error_code:
                self._revive(device, "answers again")
            return
        query, counted = entry
        if reply.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]:
            self._refused(device, reply.error, query)
            query.call_failed(device.group, counted)
            return
        if reply.error_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and not query.fair:
            query.call_failed(device.group, counted)  # it had no free slot within the client's short deadline
            return
        try:
            if reply.error_code:
                raise ValueError(f"{_code_name(reply.error_code)}: {reply.error[:300]}")
            features = tensor_from_proto(reply.features, max_bytes=self.max_message_bytes)
            expected = (query.batch, self._slot_sizes[device.group])
            if features.shape != expected or features.dtype != np.float32:
                raise ValueError(f"features {features.dtype}{features.shape}: expected float32{expected}")
            if not np.isfinite(features).all():
                raise ValueError("features: not finite (the device's model gave NaN or Inf)")
        except ValueError as exc:
            self._failed(device, str(exc), query.query_id)
            query.call_failed(device.group, counted)
            return
        device.consecutive_failures = 0
        device.answers += 1
        if not device.up:
            self._revive(device, "answers again")
        if query.answered(device.group, features, device.device_id, counted):
            self.metrics.group_latency.labels(str(device.group)).observe(time.perf_counter() - query.started)

    # --- the device streams --------------------------------------------------------------

    def _open_stream(self, device: DeviceState) -> None:
        call = device.channel.stream_stream(_STREAM_METHOD, request_serializer=_as_is, response_deserializer=rocoin_pb2.DeviceInferResponse.FromString)(
            metadata=self._metadata
        )
        device.stream = call
        device.outbox = asyncio.Queue(MAX_OUTBOX)
        device.tasks = (asyncio.ensure_future(self._write(device, call, device.outbox)), asyncio.ensure_future(self._read(device, call)))

    def _close_stream(self, device: DeviceState) -> None:
        if device.stream is not None:
            device.stream.cancel()
        for task in device.tasks:
            task.cancel()
        device.stream, device.outbox, device.tasks = None, None, ()
        device.cancels = []
        waiting, device.waiting = device.waiting, {}
        for query, counted in waiting.values():
            query.call_failed(device.group, counted)

    async def _write(self, device: DeviceState, call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue) -> None:
        try:
            while True:
                await call.write(await outbox.get())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream ended under us (AioRpcError, or a write after the end)
            self._stream_broken(device, call, _reason(exc))

    async def _read(self, device: DeviceState, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    code = await call.code()
                    raise ConnectionError(f"the device ended the stream ({code.name}: {await call.details()})")
                self._answer(device, reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._stream_broken(device, call, _reason(exc))

    def _stream_broken(self, device: DeviceState, call: grpc.aio.StreamStreamCall, reason: str) -> None:
        if device.stream is not call:
            return  # already handled (the reader and the writer both saw it)
        device.failures += 1
        self.metrics.device_failures.labels(device.device_id).inc()
        logger.warning("device %s: stream lost (%s)", device.device_id, reason)
        self._close_stream(device)
        self._mark_down(device)

    def _failed(self, device: DeviceState, reason: str, query_id: str) -> None:
        device.failures += 1
        device.consecutive_failures += 1
        self.metrics.device_failures.labels(device.device_id).inc()
        logger.info("device %s failed: %s", device.device_id, reason, extra={"query_id": query_id, "device": device.device_id})
        if device.up and device.consecutive_failures >= FAILURES_TO_MARK_DOWN:
            logger.warning("device %s marked down after %d failed calls (%s)", device.device_id, device.consecutive_failures, reason)
            self._mark_down(device)

    def _refused(self, device: DeviceState, reason: str, query: _Query) -> None:
        """A device refused a query the source had checked: misconfigured (another bundle?), and
        not the caller's fault nor a failure; counted and logged, at most one WARNING per
        :data:`REFUSAL_LOG_INTERVAL_S` per device."""
        device.refusals += 1
        self.metrics.device_refusals.labels(device.device_id).inc()
        now = time.monotonic()
        if now - device.refusals_logged_at >= REFUSAL_LOG_INTERVAL_S:
            device.refusals_logged_at = now
            logger.warning(
                "device %s refused a checked query as invalid (%d so far; is it serving another bundle?): %s",
                device.device_id,
                device.refusals,
                reason[:300],
                extra={"query_id": query.query_id},
            )

    def _mark_down(self, device: DeviceState) -> None:
        """New queries stop waiting for the device (those in flight still do); probe its health.
        While its stream stays open it still gets every query, on trial: its first answer brings
        it back."""
        if device.up:
            device.up = False
            self.metrics.device_up.labels(device.device_id).set(0)
            self.metrics.marked_down.labels(device.device_id).inc()
        if device.probe is None and self._started:
            device.probe = asyncio.ensure_future(self._probe(device))

    def _revive(self, device: DeviceState, why: str) -> None:
        if device.probe is not None:
            device.probe.cancel()
            device.probe = None
        if device.stream is None:
            self._open_stream(device)
        device.consecutive_failures = 0
        device.up = True
        self.metrics.device_up.labels(device.device_id).set(1)
        logger.warning("device %s %s: used again", device.device_id, why)

    async def _probe(self, device: DeviceState) -> None:
        stub = health_pb2_grpc.HealthStub(device.channel)
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                device.probe = None
                self._revive(device, "is healthy again")
                return

    def _head_run(self, batch: int, slots: list[np.ndarray | None]) -> np.ndarray:
        features = np.zeros((batch, self.manifest.plan.num_filters), dtype=np.float32)
        for filters, values in zip(self._filters, slots):
            if values is not None:
                features[:, filters] = values
        return self._head.run(None, {self._head_input: features})[0]

    def status(self) -> list[dict]:
        return [
            {"device": d.device_id, "group": d.group, "address": d.address, "up": d.up, "answers": d.answers, "failures": d.failures, "refusals": d.refusals}
            for d in self.devices
        ]


def check_deadline(value: float, name: str) -> float:
    """``value`` if it is a deadline the source accepts, else :class:`RocoinError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not MIN_DEADLINE_S <= value <= MAX_DEADLINE_S:
        raise RocoinError(f"{name} = {short_repr(value)}: expected seconds in {MIN_DEADLINE_S:g}..{MAX_DEADLINE_S:g}")
    return float(value)


def check_query_id(value: object) -> str:
    """A client's query id: a string of 1..:data:`MAX_CLIENT_ID_CHARS` printable characters."""
    if not isinstance(value, str):
        raise RocoinError(f"id = {short_repr(value)}: expected a string")
    if not 1 <= len(value) <= MAX_CLIENT_ID_CHARS:
        raise RocoinError(f"id: {len(value)} characters: expected 1..{MAX_CLIENT_ID_CHARS}")
    if not value.isprintable():
        raise RocoinError(f"id = {short_repr(value)}: expected printable characters (no control characters or lone surrogates)")
    return value


def _as_is(message: bytes) -> bytes:
    return message


def _code_name(value: int) -> str:
    return next((code.name for code in grpc.StatusCode if code.value[0] == value), f"status {value}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
