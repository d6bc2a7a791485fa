"""The source: broadcasts each query to every device, takes the first answer of each group, and
runs the head — as soon as every group has answered, or at the deadline with the missing slots
zero-filled (SPEC.md §1). Usable as a library (:class:`Source`) and served over gRPC
(:func:`serve_source`).

Channels are long-lived (one per device, with keepalive). Every device call gets the time left
until the query's deadline. A device whose calls fail ``FAILURES_TO_MARK_DOWN`` times in a row is
marked down: queries skip it and a probe asks its gRPC health service every
``PROBE_INTERVAL_S`` until it is SERVING again, then it is used again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rocoin.errors import RocoinError
from rocoin.profiles.fleet import Fleet
from rocoin.runtime.auth import token_metadata
from rocoin.runtime.metrics import SourceMetrics
from rocoin.runtime.tls import ClientTLS
from rocoin.runtime.manifest import Manifest, load_manifest, verify_file
from rocoin.runtime.protocol import rocoin_pb2, rocoin_pb2_grpc
from rocoin.runtime.serde import tensor_from_proto, tensor_to_proto

logger = logging.getLogger(__name__)

#: Default time the source waits for the groups of one query.
DEFAULT_DEADLINE_S = 1.0
#: Consecutive failed calls after which a device is marked down.
FAILURES_TO_MARK_DOWN = 3
#: How often a down device's health service is asked whether it is back.
PROBE_INTERVAL_S = 0.5
#: Time limit of one health probe.
PROBE_TIMEOUT_S = 0.5
#: gRPC keepalive of the source's device channels.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
#: Reconnection backoff towards a device that went away: short, so a restarted device is found soon.
INITIAL_RECONNECT_BACKOFF_MS = 100
MAX_RECONNECT_BACKOFF_MS = 1_000
#: Largest image batch one query may carry.
MAX_BATCH = 64
#: Slack over the tensor payload for protobuf framing.
MESSAGE_SLACK_BYTES = 64 * 1024


@dataclass
class DeviceState:
    device_id: str
    address: str
    group: int
    stub: rocoin_pb2_grpc.DeviceStub | None = None
    channel: grpc.aio.Channel | None = None
    up: bool = True
    consecutive_failures: int = 0
    probe: asyncio.Task | None = None
    failures: int = 0
    answers: int = 0


@dataclass(frozen=True)
class InferResult:
    query_id: str
    logits: np.ndarray
    missing_groups: list[int]
    answered_by: list[str]
    latency_s: float


@dataclass
class _Pending:
    group: int
    device: DeviceState


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
    ) -> None:
        if not deadline_s > 0:
            raise RocoinError(f"deadline-s = {deadline_s}: expected a positive number of seconds")
        bundle = Path(bundle)
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

    @property
    def ready(self) -> bool:
        """Started, and every group has at least one device that is not marked down."""
        return self._started and all(any(d.up for d in self.devices if d.group == k) for k in range(self.num_groups))

    @property
    def num_groups(self) -> int:
        return len(self._filters)

    async def start(self) -> None:
        options = [
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
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
            device.stub = rocoin_pb2_grpc.DeviceStub(device.channel)
            self.metrics.device_up.labels(device.device_id).set(1 if device.up else 0)
        self._started = True

    async def close(self) -> None:
        for device in self.devices:
            if device.probe is not None:
                device.probe.cancel()
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
            if not np.isfinite(images).all():
                raise RocoinError("input: contains NaN or Inf")
            x = images
        else:
            raise RocoinError(f"input dtype {images.dtype}: expected uint8 (0..255) or float32 (0..1)")
        return np.ascontiguousarray((x - self._mean) / self._std, dtype=np.float32)

    async def infer(self, images: np.ndarray, *, deadline_s: float | None = None, query_id: str | None = None) -> InferResult:
        if not self._started:
            raise RuntimeError("Source.start() has not been called")
        started = time.perf_counter()
        query_id = query_id or uuid.uuid4().hex[:16]
        budget = self.deadline_s if not deadline_s else deadline_s
        x = self.normalise(images)
        request = rocoin_pb2.DeviceInferRequest(query_id=query_id, input=tensor_to_proto(x))
        slots: list[np.ndarray | None] = [None] * self.num_groups
        answered_by = [""] * self.num_groups
        pending: dict[asyncio.Task, _Pending] = {}
        for device in self.devices:
            if device.up:
                task = asyncio.ensure_future(device.stub.Infer(request, timeout=budget, metadata=self._metadata))
                pending[task] = _Pending(device.group, device)
        open_calls = [0] * self.num_groups
        for item in pending.values():
            open_calls[item.group] += 1
        end = started + budget
        while pending and any(s is None and open_calls[k] > 0 for k, s in enumerate(slots)):
            remaining = end - time.perf_counter()
            if remaining <= 0:
                break
            done, _ = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                item = pending.pop(task)
                open_calls[item.group] -= 1
                if self._settle(item, task, x.shape[0], slots, answered_by, query_id):
                    self.metrics.group_latency.labels(str(item.group)).observe(time.perf_counter() - started)
            for task, item in list(pending.items()):  # cancel the replicas of groups that answered
                if slots[item.group] is not None:
                    task.cancel()
                    pending.pop(task)
                    open_calls[item.group] -= 1
        for task, item in pending.items():  # past the deadline: stop waiting
            task.cancel()
            if slots[item.group] is None:
                self._failed(item.device, "no answer by the deadline", query_id)
        missing = [k for k, s in enumerate(slots) if s is None]
        logits = self._head_run(x.shape[0], slots)
        latency = time.perf_counter() - started
        self.metrics.queries.inc()
        self.metrics.query_latency.observe(latency)
        for k in missing:
            self.metrics.missing_groups.labels(str(k)).inc()
        if missing:
            logger.info("groups %s missing after %.3f s", missing, latency, extra={"query_id": query_id})
        else:
            logger.debug("answered in %.4f s by %s", latency, ",".join(answered_by), extra={"query_id": query_id})
        return InferResult(query_id, logits, missing, answered_by, latency)

    def _settle(self, item: _Pending, task: asyncio.Task, batch: int, slots: list, answered_by: list, query_id: str) -> bool:
        """Take a finished call's answer; True when it filled its group's slot."""
        device = item.device
        try:
            response = task.result()
            features = tensor_from_proto(response.features, max_bytes=self.max_message_bytes)
            expected = (batch, self._slot_sizes[item.group])
            if features.shape != expected or features.dtype != np.float32:
                raise ValueError(f"features {features.dtype}{features.shape}: expected float32{expected}")
        except asyncio.CancelledError:
            return False
        except grpc.aio.AioRpcError as exc:
            self._failed(device, f"{exc.code().name}: {exc.details()}", query_id)
            return False
        except ValueError as exc:
            self._failed(device, str(exc), query_id)
            return False
        device.consecutive_failures = 0
        device.answers += 1
        if slots[item.group] is None:
            slots[item.group] = features
            answered_by[item.group] = device.device_id
            return True
        return False

    def _failed(self, device: DeviceState, reason: str, query_id: str) -> None:
        device.failures += 1
        device.consecutive_failures += 1
        self.metrics.device_failures.labels(device.device_id).inc()
        logger.info("device %s failed: %s", device.device_id, reason, extra={"query_id": query_id, "device": device.device_id})
        if device.up and device.consecutive_failures >= FAILURES_TO_MARK_DOWN:
            device.up = False
            self.metrics.device_up.labels(device.device_id).set(0)
            logger.warning("device %s marked down after %d failed calls (%s)", device.device_id, device.consecutive_failures, reason)
            device.probe = asyncio.ensure_future(self._probe(device))

    async def _probe(self, device: DeviceState) -> None:
        stub = health_pb2_grpc.HealthStub(device.channel)
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                device.consecutive_failures = 0
                device.up = True
                self.metrics.device_up.labels(device.device_id).set(1)
                device.probe = None
                logger.warning("device %s is healthy again", device.device_id)
                return

    def _head_run(self, batch: int, slots: list[np.ndarray | None]) -> np.ndarray:
        features = np.zeros((batch, self.manifest.plan.num_filters), dtype=np.float32)
        for filters, values in zip(self._filters, slots):
            if values is not None:
                features[:, filters] = values
        return self._head.run(None, {self._head_input: features})[0]

    def status(self) -> list[dict]:
        return [
            {"device": d.device_id, "group": d.group, "address": d.address, "up": d.up, "answers": d.answers, "failures": d.failures}
            for d in self.devices
        ]
