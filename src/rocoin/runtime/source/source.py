"""The source: broadcasts each query to every device, takes the first answer of each group, and
runs the head — as soon as every group has answered, or at the deadline with the missing slots
zero-filled (SPEC.md §1). Usable as a library (:class:`Source`) and served over gRPC
(:func:`rocoin.runtime.api.server.serve_source`).

The source wires three parts together, each in its own module: the links to the devices
(:mod:`.link`: a gRPC stream per device, or any other :class:`~.link.DeviceLink`), the gather of
each query's answers and the record of each device (:mod:`.gather`: which answer wins, which
failures count, when a device is marked down or used again — pure decisions) and the head (an
onnxruntime session here). It owns what has a clock or a side effect: the deadline timer, the
health probes, the metrics and the log lines.

A device whose link breaks (the process died, the connection was lost) is marked down at once;
one whose answers fail or miss the deadline ``FAILURES_TO_MARK_DOWN`` times in a row is marked
down too. No query waits for a down device, and a probe asks its health every
``PROBE_INTERVAL_S``; it is used again once healthy (with a fresh stream if its stream broke).
A device marked down for failures keeps its stream and still gets every query, on trial (see
:mod:`.gather`).

Dynamic batching (as Triton's dynamic batcher): with ``max_queue_delay_ms`` above 0, a query that
arrives while a message is in flight to the devices waits in a queue for others to share one
message: every device then gets ONE request carrying the queued queries' images (at most
``max_batch_images``, and never more than a device says it accepts) and runs it in one
onnxruntime call; its answer is split back per query by rows. A query that finds nothing queued
and nothing in flight goes out at once (no added latency when the source is idle). The queue goes
out as one message as soon as the message in flight is decided (the devices are free again: Triton's
model instance), so the batches grow with the load; or when it holds a full batch; or when its
first query has waited the queue delay, and never later than :data:`QUEUE_HOLD_SHARE` of that
query's budget (a stalled device cannot hold the queue for long). The gather is
per query as before: each query completes as soon as its own groups have answered, keeps its own
deadline (its time in the queue counts; at its deadline its missing groups are zero-filled, the
other queries of the message are not affected) and gets exactly the answer it would get alone.
A device that misses or fails a batched message fails each query in it, as it would have failed
them one by one; a refusal or a bad answer is counted once per message.

Whose fault is it? The source checks every query before it sends it — the image batch against
the manifest (FP32 values in [0, 1]; finite after normalisation), the id, the deadline — and
answers the caller with :class:`RocoinError` (HTTP 400 / ``INVALID_ARGUMENT``). A device that
still refuses a query as invalid is counted (``rocoin_device_refusals``) and logged, never marked
down for it (:mod:`.gather` says why). A head that still produces non-finite logits is a
:class:`ServingError`, never a non-JSON number for the client.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from rocoin.contracts.errors import RocoinError, ServingError
from rocoin.contracts.fleet import Fleet
from rocoin.contracts.manifest import Manifest, load_manifest, verify_file
from rocoin.contracts.plan import Plan
from rocoin.contracts.text import short_repr
from rocoin.models.boxes import decode, pack_detections
from rocoin.runtime.source.gather import FAILURES_TO_MARK_DOWN, REFUSAL_LOG_INTERVAL_S, DeviceState, Query
from rocoin.runtime.source.link import CANCEL_FLUSH_S, MAX_OUTBOX, DeviceLink, GrpcStreamLink, LinkFull
from rocoin.runtime.source.messages import Answer, Request
from rocoin.runtime.source.settings import (
    DEFAULT_DEADLINE_S,
    DEFAULT_MAX_BATCH_IMAGES,
    DEFAULT_MAX_QUEUE_DELAY_MS,
    MAX_BATCH_IMAGES,
    MAX_DEADLINE_S,
    MIN_DEADLINE_S,
    check_max_batch_images,
    check_queue_delay,
)
from rocoin.runtime.transport.auth import check_authentication, token_metadata
from rocoin.runtime.transport.keepalive import KEEPALIVE, Keepalive
from rocoin.runtime.transport.metrics import SourceMetrics
from rocoin.runtime.transport.tls import ClientTLS

__all__ = [
    "CANCEL_FLUSH_S", "DEFAULT_DEADLINE_S", "FAILURES_TO_MARK_DOWN", "FP32_INPUT_RANGE", "INITIAL_RECONNECT_BACKOFF_MS", "MAX_BATCH",
    "MAX_CLIENT_ID_CHARS", "MAX_DEADLINE_S", "MAX_OUTBOX", "MAX_RECONNECT_BACKOFF_MS", "MESSAGE_SLACK_BYTES", "MIN_DEADLINE_S",
    "PROBE_INTERVAL_S", "PROBE_TIMEOUT_S", "REFUSAL_LOG_INTERVAL_S", "DeviceState", "InferResult", "Source", "check_deadline",
    "check_max_batch_images", "check_query_id", "check_queue_delay",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: How often a down device's health service is asked whether it is back.
PROBE_INTERVAL_S = 0.5
#: Time limit of one health probe.
PROBE_TIMEOUT_S = 0.5
#: Reconnection backoff towards a device that went away: short, so a restarted device is found soon.
INITIAL_RECONNECT_BACKOFF_MS = 100
MAX_RECONNECT_BACKOFF_MS = 1_000
#: Largest image batch one query (or one batched message) may carry.
MAX_BATCH = MAX_BATCH_IMAGES
#: Slack over the tensor payload for protobuf framing.
MESSAGE_SLACK_BYTES = 64 * 1024
#: Longest query id a client may give (a UUID has 36 characters); the ids sent to devices add a
#: per-query counter and stay within the devices' limit.
MAX_CLIENT_ID_CHARS = 128
#: FP32 images are 0..1 (uint8 images are 0..255): anything outside is a client's mistake (e.g.
#: an already normalised image) and could overflow the normalisation.
FP32_INPUT_RANGE = (0.0, 1.0)
#: Dynamic batching: the longest share of its budget a query waits in the queue, whatever the
#: queue delay (a query with a short deadline still has most of it for its answers).
QUEUE_HOLD_SHARE = 0.25


class MembershipControl(Protocol):
    """What the source and its REST API ask of the membership of a fleet that changes
    (:class:`~rocoin.runtime.source.membership.Membership`; it imports this module, not the
    other way round)."""

    def status(self) -> dict[str, Any]: ...

    def forget(self, device_id: str, reason: str) -> dict[str, Any]: ...

    async def drain(self, device_id: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class InferResult:
    query_id: str
    #: the head's output: class logits (B, K); for a detection bundle the class-centre heatmap logits (B, K, h, w)
    logits: np.ndarray
    missing_groups: list[int]
    answered_by: list[str]
    latency_s: float
    #: a detection bundle's answer (:func:`rocoin.models.boxes.pack_detections`): boxes (B, M, 4)
    #: float32 xyxy pixels of the input, scores (B, M) float32, labels (B, M) int32, count (B,) int32;
    #: image ``b``'s first ``count[b]`` rows, by decreasing score; padding rows are 0 with label -1
    detections: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


@dataclass(eq=False)
class _Replica:
    """A device's record (pure, :mod:`.gather`), its link, and its health probe while it is down."""

    state: DeviceState
    link: DeviceLink | None = None
    probe: asyncio.Task | None = None
    #: the largest image batch the device said it accepts (0: not said yet)
    max_batch: int = 0


@dataclass(eq=False, slots=True)
class _Queued:
    """A query waiting in the dynamic batcher's queue: its normalised images and its budget."""

    query: Query
    inputs: np.ndarray
    budget_s: float


@dataclass(eq=False, slots=True)
class _Message:
    """One request to the devices carrying several queries: each query's rows of its batch."""

    wire_id: str
    #: (query, first row, rows)
    parts: list[tuple[Query, int, int]]
    rows: int
    #: queries of the message that have not ended yet
    open_queries: int


class _Rows:
    """A batched answer's features, decoded once and handed out per query by rows."""

    __slots__ = ("_answer", "_rows", "_features")

    def __init__(self, answer: Answer, rows: int) -> None:
        self._answer, self._rows, self._features = answer, rows, None

    def take(self, first: int, count: int) -> np.ndarray:
        if self._features is None:
            self._features = self._answer.features()
        features = self._features
        if features.ndim >= 1 and features.shape[0] == self._rows:
            return features[first : first + count]
        return features  # the wrong number of rows: the gather reports the whole shape as the device's failure


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
        joins: bool = False,
        max_queue_delay_ms: float = DEFAULT_MAX_QUEUE_DELAY_MS,
        max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES,
    ) -> None:
        check_deadline(deadline_s, "deadline-s")
        #: dynamic batching: the longest a query waits for others to share its message (0: never)
        self.max_queue_delay_ms = check_queue_delay(max_queue_delay_ms, "max-queue-delay-ms")
        #: the most images one batched message carries (each device's own limit applies too)
        self.max_batch_images = check_max_batch_images(max_batch_images, "max-batch-images")
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
        self.bundle = bundle
        self.fleet = fleet
        #: which device serves which group now: the manifest's plan at start, then each re-plan's
        self.plan = plan
        #: devices dial the source (``rocoin device join``): plan devices without an address wait for them
        self.joins = joins
        #: called with (device id, group) when a device is marked down (the membership re-plans)
        self.on_device_down: Callable[[str, int], None] | None = None
        #: who serves which group while devices join (:class:`~.membership.Membership`, set by the
        #: server with ``--joins``): ``/v2/fleet`` and the operator's forget and drain go to it
        self.membership: MembershipControl | None = None
        by_id = {d.id: d for d in fleet.devices}
        self._replicas: list[_Replica] = []
        for k, group in enumerate(plan.groups):
            for device_id in group.devices:
                address = by_id[device_id].address
                if not address and not joins:
                    raise RocoinError(
                        f"fleet: device {device_id!r} has no address (host:port of its worker); devices that dial the source need source serve --joins"
                    )
                self._replicas.append(_Replica(DeviceState(device_id, address or "", k)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self._head = ort.InferenceSession(str(verify_file(bundle, self.manifest.head)), options, providers=["CPUExecutionProvider"])
        self._head_input = self.manifest.head.input.name
        self._filters = [np.asarray(g.filters) for g in plan.groups]
        #: what each group's answer holds per image: (|P_k|,) pooled values or (|P_k|, h, w) a map
        self._slot_shapes = [tuple(m.output.shape) for m in self.manifest.groups]
        self._slot_dtypes = [np.dtype(m.wire_dtype) for m in self.manifest.groups]
        self._slot_bytes = [math.prod(shape) * dtype.itemsize for shape, dtype in zip(self._slot_shapes, self._slot_dtypes)]
        input_shape = tuple(self.manifest.input.shape)
        self.input_shape = input_shape
        self._mean = np.asarray(self.manifest.normalization.mean, dtype=np.float32).reshape(-1, 1, 1)
        self._std = np.asarray(self.manifest.normalization.std, dtype=np.float32).reshape(-1, 1, 1)
        # the largest message: a batch of inputs, or of the widest group's answers (a detector's maps can be larger)
        payload = MAX_BATCH * max(int(np.prod(input_shape)), *(int(np.prod(s)) for s in self._slot_shapes)) * 4
        self.max_message_bytes = payload + MESSAGE_SLACK_BYTES
        self._started = False
        self._sent = 0  # queries and batched messages: makes every id on the wire unique
        # --- the dynamic batcher
        self._queue: list[_Queued] = []
        self._queued_images = 0
        self._queue_timer: asyncio.TimerHandle | None = None
        self._in_flight = 0  # messages sent whose queries have not all ended
        self._messages: dict[str, _Message] = {}  # batched messages in flight, by wire id
        self._dispatched: dict[str, _Message | None] = {}  # queries sent, by wire id: their batched message (None: alone)

    @property
    def devices(self) -> list[DeviceState]:
        """Every replica the source sends queries to (or waits for), in group order of arrival."""
        return [r.state for r in self._replicas]

    @property
    def ready(self) -> bool:
        """Started, and every group has at least one device that is not marked down."""
        return self._started and all(any(d.up for d in self.devices if d.group == k) for k in range(self.num_groups))

    @property
    def num_groups(self) -> int:
        return len(self._filters)

    async def start(self) -> None:
        for replica in self._replicas:
            if replica.state.address:
                replica.link = self._connect(replica.state)
                self._open(replica)
            else:  # a device that dials the source: down until it joins
                replica.state.mark_down()
            self.metrics.device_up.labels(replica.state.device_id).set(1 if replica.state.up else 0)
        self._started = True

    # --- a fleet that changes (rocoin.runtime.source.membership drives these) ------------------

    def follow(self, plan: Plan) -> None:
        """Before :meth:`start`: wait for the devices that dial the source in ``plan``'s groups
        instead of the manifest's (a restarted source resumes its last assignment); the devices
        it dials keep theirs. ``plan`` has the manifest's groups (students, filters)."""
        if self._started:
            raise RocoinError("follow(): the source has started; re-plans move devices one by one")
        dialed = [r for r in self._replicas if r.state.address]
        named = {r.state.device_id for r in dialed}
        waiting = [_Replica(DeviceState(d, "", k)) for k, g in enumerate(plan.groups) for d in g.devices if d not in named]
        self._replicas = dialed + waiting
        self.plan = plan

    def replica(self, device_id: str) -> _Replica | None:
        return next((r for r in self._replicas if r.state.device_id == device_id), None)

    async def attach(self, device_id: str, group: int, link: DeviceLink) -> None:
        """``device_id`` serves ``group`` over ``link`` from now on (it answered a health check
        with the group's model): a new replica, or the device's replica with a fresh link."""
        replica = self.replica(device_id)
        address = next((d.address or "" for d in self.fleet.devices if d.id == device_id), "")  # a dialed device keeps its address
        if replica is not None and replica.state.group != group:
            await self.retire(device_id)
            replica = None
        if replica is None:
            replica = _Replica(DeviceState(device_id, address, group))
            self._replicas.append(replica)
        elif replica.link is not None and replica.link is not link:
            replica.state.disconnected()  # what the old stream owed will not come
            await replica.link.close()
        if replica.probe is not None:
            replica.probe.cancel()
            replica.probe = None
        replica.link = link
        self._open(replica)
        replica.state.revive()
        self.metrics.device_up.labels(device_id).set(1)

    async def retire(self, device_id: str, *, close_link: bool = False) -> None:
        """Stop using ``device_id`` for its group (moved, spare or gone): the queries that wait for
        it stop waiting (not its failure), and no new query goes to it."""
        replica = self.replica(device_id)
        if replica is None:
            return
        self._replicas.remove(replica)
        if replica.probe is not None:
            replica.probe.cancel()
            replica.probe = None
        replica.state.disconnected()
        if replica.link is not None:
            if close_link:
                await replica.link.close()
            elif hasattr(replica.link, "serve_nothing"):
                replica.link.serve_nothing()
        self.metrics.device_up.labels(device_id).set(0)

    def _connect(self, device: DeviceState) -> DeviceLink:
        """The link to ``device`` (called by :meth:`start`): a gRPC stream to its address. The one
        place that knows the transport; a subclass may return any :class:`DeviceLink` (the unit
        tests return in-memory ones)."""
        options = [
            *self.keepalive.client_options(),
            ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
            ("grpc.min_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        return GrpcStreamLink(
            device.address,
            options=options,
            credentials=self._credentials,
            metadata=self._metadata,
            max_message_bytes=self.max_message_bytes,
        )

    async def close(self) -> None:
        if self._queue_timer is not None:  # the queued queries end at their deadlines
            self._queue_timer.cancel()
            self._queue_timer = None
        for replica in self._replicas:
            if replica.probe is not None:
                replica.probe.cancel()
                replica.probe = None
            replica.state.disconnected()  # what the device owed will not come
            if replica.link is not None:
                await replica.link.close()
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
        done = loop.create_future()
        query = Query(
            wire_id,
            query_id,
            x.shape[0],
            self.num_groups,
            started,
            fair=budget >= self.deadline_s,
            decided=functools.partial(_resolve, done),
        )
        expire = loop.call_later(budget - (time.perf_counter() - started), query.expire)
        try:
            self._enqueue(_Queued(query, x, budget))
            if not query.done:
                await done
        finally:  # also when the caller gave up on the query (cancelled): nobody failed then
            expire.cancel()
            self._settle(query)
        missing = query.missing
        outputs = self._head_run(x.shape[0], query.slots)
        if not all(np.isfinite(o).all() for o in outputs):
            logger.error(
                "the head gave non-finite logits for query %s (groups missing: %s)", query_id, missing, extra={"query_id": query_id}
            )
            raise ServingError("the model gave non-finite logits for this input; nothing to return")
        logits = outputs[0]
        detections = self._detections(outputs) if self.manifest.detection is not None else None
        latency = time.perf_counter() - started
        self.metrics.queries.inc()
        self.metrics.query_latency.observe(latency)
        for k in missing:
            self.metrics.missing_groups.labels(str(k)).inc()
        if missing:
            logger.info("groups %s missing after %.3f s", missing, latency, extra={"query_id": query_id})
        else:
            logger.debug("answered in %.4f s by %s", latency, ",".join(query.answered_by), extra={"query_id": query_id})
        return InferResult(query_id, logits, missing, query.answered_by, latency, detections)

    # --- the dynamic batcher: which queries share a message to the devices ------------------

    def _enqueue(self, item: _Queued) -> None:
        """Send the query now (batching off, or the devices idle: nothing queued, nothing in
        flight), or queue it: the queue goes out as one message when the message in flight is
        decided (the devices are free again), when it holds a full batch, or when its first query
        has waited the queue delay (at most :data:`QUEUE_HOLD_SHARE` of that query's budget)."""
        if self.max_queue_delay_ms == 0 or (not self._queue and self._in_flight == 0):
            self._dispatch([item])
            return
        cap = self._batch_cap()
        if self._queued_images + item.query.batch > cap:
            self._flush()
        self._queue.append(item)
        self._queued_images += item.query.batch
        if self._queued_images >= cap:
            self._flush()
        elif self._queue_timer is None:
            wait_s = min(self.max_queue_delay_ms / 1e3, QUEUE_HOLD_SHARE * item.budget_s)
            self._queue_timer = asyncio.get_running_loop().call_later(wait_s, self._flush)

    def _batch_cap(self) -> int:
        """The most images one message may carry: the source's limit and every device's."""
        cap = self.max_batch_images
        for replica in self._replicas:
            if 0 < replica.max_batch < cap:
                cap = replica.max_batch
        return cap

    def _flush(self) -> None:
        """Send everything queued (in messages of at most :meth:`_batch_cap` images)."""
        if self._queue_timer is not None:
            self._queue_timer.cancel()
            self._queue_timer = None
        queued, self._queue, self._queued_images = self._queue, [], 0
        self._dispatch([item for item in queued if not item.query.done])  # a query whose deadline passed in the queue is over

    def _unqueue(self, query: Query) -> None:
        """A query that ends before it was sent (its caller gave up) leaves the queue."""
        for i, item in enumerate(self._queue):
            if item.query is query:
                del self._queue[i]
                self._queued_images -= query.batch
                return

    def _dispatch(self, items: list[_Queued]) -> None:
        cap = self._batch_cap()
        message: list[_Queued] = []
        rows = 0
        for item in items:
            if message and rows + item.query.batch > cap:
                self._send_message(message)
                message, rows = [], 0
            message.append(item)
            rows += item.query.batch
        if message:
            self._send_message(message)

    def _send_message(self, items: list[_Queued]) -> None:
        """One request to every device with an open stream: one query alone (under its own wire
        id), or several (under a message id; the answer is split back by rows)."""
        now = time.perf_counter()
        # the time left until the latest of the queries' deadlines (never 0: that would mean no limit)
        timeout_s = max(1e-6, max(item.budget_s - (now - item.query.started) for item in items))
        batched = None
        if len(items) == 1:
            request = Request(items[0].query.wire_id, items[0].inputs, timeout_s)
        else:
            self._sent += 1
            parts, rows = [], 0
            for item in items:
                parts.append((item.query, rows, item.query.batch))
                rows += item.query.batch
            # "#n" is never a query's wire id (those are "<client id>#n" with a non-empty client id)
            batched = _Message(f"#{self._sent:x}", parts, rows, len(items))
            self._messages[batched.wire_id] = batched
            request = Request(batched.wire_id, np.concatenate([item.inputs for item in items]), timeout_s)
        self.metrics.batch_queries.observe(len(items))
        queries = [item.query for item in items]
        for query in queries:
            self._dispatched[query.wire_id] = batched
        self._in_flight += 1
        for replica in self._replicas:
            if replica.link is not None and replica.link.is_open:  # up, or down with its stream open: on trial
                try:
                    replica.link.send(request)
                except LinkFull as full:
                    self._failed(replica, str(full), queries[0].query_id)
                    continue
                replica.state.bytes_sent += request.inputs.nbytes
                for query in queries:
                    replica.state.sent(query)
        for query in queries:
            query.start_waiting()

    def _settle(self, query: Query) -> None:
        """After a query: devices still working on it are told to drop it (a batched message once
        none of its queries wants it any more); those whose group went unanswered until the
        deadline failed it. Its message ending may send the queue."""
        if query.wire_id not in self._dispatched:
            self._unqueue(query)
            return
        batched = self._dispatched.pop(query.wire_id)
        for replica in self._replicas:
            owed, failed = replica.state.settle(query)
            if not owed:
                continue
            if batched is None:
                replica.link.cancel(query.wire_id)
            elif not any(q.wire_id in replica.state.waiting for q, _, _ in batched.parts):
                replica.link.cancel(batched.wire_id)
            if failed:
                self._failed(replica, "no answer by the deadline", query.query_id)
        if batched is not None:
            batched.open_queries -= 1
            if batched.open_queries:
                return
            del self._messages[batched.wire_id]
        self._in_flight -= 1
        if self._queue and self._in_flight == 0:  # the message's queries have all ended: the queue goes out now
            asyncio.get_running_loop().call_soon(self._flush_if_queued)

    def _flush_if_queued(self) -> None:
        if self._queue:
            self._flush()

    def _head_run(self, batch: int, slots: list[np.ndarray | None]) -> list[np.ndarray]:
        """The head on the assembled features (the plan's F values, or F × h × w maps), a missing
        group's channels zero; its outputs (classifier: logits; detector: heatmap, box map)."""
        features = np.zeros((batch, *self.manifest.head.input.shape), dtype=np.float32)
        for filters, values in zip(self._filters, slots):
            if values is not None:
                features[:, filters] = values  # float16 maps become float32 here
        return self._head.run(None, {self._head_input: features})

    def _detections(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Boxes from the detector head's maps (:func:`rocoin.models.boxes.decode`), packed to the API's fixed size."""
        spec = self.manifest.detection
        found = decode(
            outputs[0],
            outputs[1],
            stride=spec.stride_px,
            score_threshold=spec.score_threshold,
            max_detections=spec.max_detections,
            nms_iou=spec.iou_threshold,
            image_size=self.input_shape[1:],
        )
        return pack_detections(found, spec.max_detections)

    # --- what the devices say, and what the source does about it --------------------------

    def _open(self, replica: _Replica) -> None:
        replica.link.open(functools.partial(self._answer, replica), functools.partial(self._lost, replica))

    def _answer(self, replica: _Replica, answer: Answer) -> None:
        device = replica.state
        if answer.max_batch:
            replica.max_batch = answer.max_batch
        shape, dtype = self._slot_shapes[device.group], self._slot_dtypes[device.group]
        batched = self._messages.get(answer.wire_id)
        parts = [part for part in batched.parts if part[0].wire_id in device.waiting] if batched is not None else []
        if not parts:  # one query's answer (or one nobody waits for any more)
            verdicts = [device.take(answer, shape, dtype)]
        else:  # a batched message's: each query takes its rows
            rows = _Rows(answer, batched.rows)
            verdicts = [
                device.take(
                    Answer(query.wire_id, functools.partial(rows.take, first, count), code=answer.code, error=answer.error), shape, dtype
                )
                for query, first, count in parts
            ]
        # a refusal, a failure or a revival is counted once per message
        refused = next((v for v in verdicts if v.refused is not None), None)
        failed = next((v for v in verdicts if v.failure), None)
        if refused is not None:
            self._refused(replica, refused.refused, refused.query)
        elif failed is not None:
            self._failed(replica, failed.failure, failed.query.query_id)
        if any(v.revive for v in verdicts):
            self._revive(replica, "answers again")
        now = time.perf_counter()
        for verdict in verdicts:
            if verdict.answered:
                device.answered_in(now - verdict.query.started, verdict.query.batch * self._slot_bytes[device.group])
            if verdict.filled:
                self.metrics.group_latency.labels(str(device.group)).observe(now - verdict.query.started)

    def _lost(self, replica: _Replica, reason: str) -> None:
        """The device's stream broke: a failure, and the device is marked down at once."""
        device = replica.state
        self.metrics.device_failures.labels(device.device_id).inc()
        logger.warning("device %s: stream lost (%s)", device.device_id, reason)
        device.lost()
        self._mark_down(replica)

    def _failed(self, replica: _Replica, reason: str, query_id: str) -> None:
        device = replica.state
        mark_down = device.failed()
        self.metrics.device_failures.labels(device.device_id).inc()
        logger.info("device %s failed: %s", device.device_id, reason, extra={"query_id": query_id, "device": device.device_id})
        if mark_down:
            logger.warning("device %s marked down after %d failed calls (%s)", device.device_id, device.consecutive_failures, reason)
            self._mark_down(replica)

    def _refused(self, replica: _Replica, reason: str, query: Query) -> None:
        """A device refused a query the source had checked: misconfigured (another bundle?), and
        not the caller's fault nor a failure; counted and logged, at most one WARNING per
        :data:`REFUSAL_LOG_INTERVAL_S` per device."""
        device = replica.state
        self.metrics.device_refusals.labels(device.device_id).inc()
        if device.refused(time.monotonic()):
            logger.warning(
                "device %s refused a checked query as invalid (%d so far; is it serving another bundle?): %s",
                device.device_id,
                device.refusals,
                reason[:300],
                extra={"query_id": query.query_id},
            )

    def _mark_down(self, replica: _Replica) -> None:
        """New queries stop waiting for the device (those in flight still do); probe its health.
        While its stream stays open it still gets every query, on trial: its first answer brings
        it back."""
        if replica.state.mark_down():
            self.metrics.device_up.labels(replica.state.device_id).set(0)
            self.metrics.marked_down.labels(replica.state.device_id).inc()
            if self.on_device_down is not None:
                self.on_device_down(replica.state.device_id, replica.state.group)
        if replica.probe is None and self._started:
            replica.probe = asyncio.ensure_future(self._probe(replica))

    def _revive(self, replica: _Replica, why: str) -> None:
        if replica.probe is not None:
            replica.probe.cancel()
            replica.probe = None
        if not replica.link.is_open:
            self._open(replica)
        replica.state.revive()
        self.metrics.device_up.labels(replica.state.device_id).set(1)
        logger.warning("device %s %s: used again", replica.state.device_id, why)

    async def _probe(self, replica: _Replica) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            if await replica.link.healthy(PROBE_TIMEOUT_S):
                replica.probe = None
                self._revive(replica, "is healthy again")
                return

    def fleet_status(self) -> dict:
        """The membership and the current assignment (``/v2/fleet``, ``rocoin fleet status``)."""
        if self.membership is not None:
            return self.membership.status()
        groups = [
            {"group": k, "live_replicas": [d.device_id for d in self.devices if d.group == k and d.up]} for k in range(self.num_groups)
        ]
        return {"groups": groups, "members": self.status(), "replans": 0, "history": []}

    def status(self) -> list[dict]:
        return [
            {
                "device": d.device_id,
                "group": d.group,
                "address": d.address,
                "up": d.up,
                "answers": d.answers,
                "failures": d.failures,
                "refusals": d.refusals,
                "traffic": d.traffic(),
            }
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


def _resolve(done: asyncio.Future) -> None:
    if not done.done():
        done.set_result(None)
