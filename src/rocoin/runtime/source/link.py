"""How the source reaches one device: a :class:`DeviceLink` carries :class:`~.messages.Request`
messages to the device and hands its :class:`~.messages.Answer` messages back by id, as they come.

The source (:mod:`.source`) does not care who dialed or how messages travel: :class:`GrpcStreamLink`
dials the device's worker and keeps one ``InferStream`` open; :class:`MemoryLink` answers with a
Python function in this process (tests). A link the device dials (a device behind NAT connecting
to the source) or one that coalesces requests into batches fits the same interface: requests and
answers are matched by wire id only, a link may open its stream lazily or fail to (``open`` says
so) and its health probe is whatever the transport can ask.

Transport (:class:`GrpcStreamLink`): one long-lived channel per device (keepalive) carrying one
``InferStream`` stream. A query, or a batch of queued queries (the source's dynamic batching), is
one message to each device (serialised once, by the first link that sends it), carrying the time
left until the (latest) query's deadline as its ``timeout_s``; answers
are matched to their query by id as they arrive. A replica whose answer is no longer wanted is
told to drop the query with a ``cancel`` entry riding on its next message (or, when no query
follows within :data:`CANCEL_FLUSH_S`, a message of its own). A stream message costs about half a
unary gRPC call, which is most of the overhead on small students.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rocoin.runtime.source.messages import Answer, Request
from rocoin.runtime.transport.protocol import rocoin_pb2
from rocoin.runtime.transport.serde import tensor_from_proto, tensor_to_proto

#: Longest a cancellation waits to ride on the next query's message before it is sent on its own.
CANCEL_FLUSH_S = 0.005
#: Messages waiting to be written to one device's stream; beyond, the device fails the query
#: (a device that stopped reading must not make the source buffer without bound).
MAX_OUTBOX = 256

_STREAM_METHOD = "/rocoin.v1.Device/InferStream"
_ASSIGN_METHOD = "/rocoin.v1.Device/Assign"
_CHECK_METHOD = "/rocoin.v1.Device/Check"
#: Longest a dialed device may take to receive, verify and load a model.
ASSIGN_TIMEOUT_S = 120.0

#: ``on_answer(answer)``: an answer came; ``on_lost(reason)``: the stream broke (once per stream).
OnAnswer = Callable[[Answer], None]
OnLost = Callable[[str], None]


class LinkFull(Exception):
    """The link cannot take another request now (the device is not reading); the message says why."""


class DeviceLink(abc.ABC):
    """One device, as the source talks to it. Used from the source's event loop only.

    Life: ``open`` a stream (again after it was lost, when the source uses the device again);
    ``send`` requests and ``cancel`` those whose answers are no longer wanted; answers and the loss
    of the stream come through the callbacks given to ``open``; ``healthy`` asks whether a lost
    device is back; ``close`` ends everything.
    """

    @abc.abstractmethod
    def open(self, on_answer: OnAnswer, on_lost: OnLost) -> bool:
        """Open the stream of requests and answers; False when it cannot be opened now (e.g. a
        device that dials the source has not). After a loss ``on_lost`` is called once and the
        stream is closed: nothing more comes from it."""

    @property
    @abc.abstractmethod
    def is_open(self) -> bool:
        """The stream is open: requests sent now may be answered."""

    @abc.abstractmethod
    def send(self, request: Request) -> None:
        """Send ``request`` on the open stream (without waiting); :class:`LinkFull` when it cannot
        take it. Its answer comes through ``on_answer``, unless it is cancelled or lost."""

    @abc.abstractmethod
    def cancel(self, wire_id: str) -> None:
        """The answer to ``wire_id`` is no longer wanted: the device may drop the request. Only a
        hint (it may go out later, with other messages); nothing when the stream is closed."""

    @abc.abstractmethod
    async def healthy(self, timeout_s: float) -> bool:
        """One health probe: is the device serving (False when it does not answer in time)?"""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the stream (without calling ``on_lost``) and release the connection."""


class GrpcStreamLink(DeviceLink):
    """A channel to the device's worker at ``address`` and one ``InferStream`` on it.

    Serialised messages wait in an outbox of at most :data:`MAX_OUTBOX` for a writer task; a
    reader task hands answers over as they come. When either sees the stream end, the stream is
    closed and ``on_lost`` called. The channel stays (and reconnects with gRPC's backoff) until
    :meth:`close`; the health probe uses it, and ``open`` starts a fresh stream on it.
    """

    def __init__(
        self,
        address: str,
        *,
        options: list[tuple[str, int]],
        credentials: grpc.ChannelCredentials | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
        max_message_bytes: int,
    ) -> None:
        self.address = address
        if credentials is not None:
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        self._metadata = metadata
        self._max_message_bytes = max_message_bytes
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._outbox: asyncio.Queue | None = None
        self._tasks: tuple[asyncio.Task, ...] = ()
        self._cancels: list[str] = []  # wire ids whose answers are no longer wanted, to send with the next message
        self._flush: asyncio.TimerHandle | None = None
        self._on_answer: OnAnswer | None = None
        self._on_lost: OnLost | None = None

    def open(self, on_answer: OnAnswer, on_lost: OnLost) -> bool:
        self._on_answer, self._on_lost = on_answer, on_lost
        call = self.channel.stream_stream(
            _STREAM_METHOD, request_serializer=_as_is, response_deserializer=rocoin_pb2.DeviceInferResponse.FromString
        )(metadata=self._metadata)
        self._call = call
        self._outbox = asyncio.Queue(MAX_OUTBOX)
        self._tasks = (asyncio.ensure_future(self._write(call, self._outbox)), asyncio.ensure_future(self._read(call)))
        return True

    @property
    def is_open(self) -> bool:
        return self._outbox is not None

    def send(self, request: Request) -> None:
        message, self._cancels = encode_request(request, self._cancels), []
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            raise LinkFull(f"{MAX_OUTBOX} messages waiting to be written: the device is not reading") from None

    def cancel(self, wire_id: str) -> None:
        if self._outbox is None:
            return
        self._cancels.append(wire_id)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(CANCEL_FLUSH_S, self._flush_cancels)

    def _flush_cancels(self) -> None:
        self._flush = None
        if self._cancels and self._outbox is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._outbox.put_nowait(rocoin_pb2.DeviceInferRequest(cancel=self._cancels).SerializeToString())
        self._cancels = []

    async def healthy(self, timeout_s: float) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        self._close_stream()
        await self.channel.close()

    async def assign(self, group: int, model, model_path, *, send_model: bool, student_flops: float = 0.0) -> str:
        """Move the device to ``group`` (``Device.Assign``): the assignment, then the model's
        chunks when ``send_model`` (else the device takes the model from its bundle or cache);
        returns the hash it verified and loaded. :class:`RocoinError` when it refuses or fails."""
        from rocoin.contracts.errors import RocoinError
        from rocoin.runtime.transport.join import MODEL_CHUNK_BYTES

        assignment = rocoin_pb2.Assignment(
            group=group, model_json=model.model_dump_json(), send_model=send_model, epoch=1, student_flops=student_flops
        )

        async def messages():
            yield rocoin_pb2.AssignMessage(assign=assignment)
            if send_model:
                with open(model_path, "rb") as f:
                    offset = 0
                    while chunk := f.read(MODEL_CHUNK_BYTES):
                        yield rocoin_pb2.AssignMessage(chunk=rocoin_pb2.ModelChunk(sha256=model.sha256, offset=offset, data=chunk))
                        offset += len(chunk)

        call = self.channel.stream_unary(
            _ASSIGN_METHOD,
            request_serializer=rocoin_pb2.AssignMessage.SerializeToString,
            response_deserializer=rocoin_pb2.ModelReady.FromString,
        )
        try:
            reply = await call(messages(), metadata=self._metadata, timeout=ASSIGN_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise RocoinError(f"device {self.address}: Assign failed ({_reason(exc)})") from None
        if reply.error or reply.sha256 != model.sha256:
            raise RocoinError(f"device {self.address} refused group {group}'s model: {reply.error[:300] or reply.sha256[:12]}")
        return reply.sha256

    async def check(self, timeout_s: float = 2.0) -> str | None:
        """``Device.Check``: the hash of the model the device serves, or None when it does not answer."""
        call = self.channel.unary_unary(
            _CHECK_METHOD,
            request_serializer=rocoin_pb2.HealthCheck.SerializeToString,
            response_deserializer=rocoin_pb2.HealthReply.FromString,
        )
        try:
            reply = await call(rocoin_pb2.HealthCheck(nonce="check"), metadata=self._metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return None
        return reply.model_sha256

    def serve_nothing(self) -> None:
        """Close the stream (without ``on_lost``) before a move: the channel stays for Assign."""
        self._close_stream()

    def _close_stream(self) -> None:
        if self._call is not None:
            self._call.cancel()
        for task in self._tasks:
            task.cancel()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._call, self._outbox, self._tasks = None, None, ()
        self._cancels = []

    def _answer(self, reply: rocoin_pb2.DeviceInferResponse) -> Answer:
        features = functools.partial(tensor_from_proto, reply.features, max_bytes=self._max_message_bytes)
        return Answer(reply.query_id, features, code=reply.error_code, error=reply.error, max_batch=reply.max_batch)

    async def _write(self, call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue) -> None:
        try:
            while True:
                await call.write(await outbox.get())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream ended under us (AioRpcError, or a write after the end)
            self._broken(call, _reason(exc))

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    code = await call.code()
                    raise ConnectionError(f"the device ended the stream ({code.name}: {await call.details()})")
                self._on_answer(self._answer(reply))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._broken(call, _reason(exc))

    def _broken(self, call: grpc.aio.StreamStreamCall, reason: str) -> None:
        if self._call is not call:
            return  # already handled (the reader and the writer both saw it)
        self._close_stream()
        self._on_lost(reason)


class MemoryLink(DeviceLink):
    """A device in this process, for tests: ``serve(request)`` is awaited for every request and
    its :class:`Answer` handed back (None: the answer never comes, an outage).

    ``health()`` answers the probes; :meth:`lose` breaks the stream as a dead device would;
    ``cancelled`` lists the wire ids the source cancelled (their ``serve`` is cancelled too, unless
    ``obey_cancel`` is False: a device that answers anyway).
    """

    def __init__(
        self, serve: Callable[[Request], Awaitable[Answer | None]], *, health: Callable[[], bool] = lambda: True, obey_cancel: bool = True
    ) -> None:
        self._serve = serve
        self._health = health
        self._obey_cancel = obey_cancel
        self._on_answer: OnAnswer | None = None
        self._on_lost: OnLost | None = None
        self._open = False
        self._running: dict[str, asyncio.Task] = {}
        self.requests: list[Request] = []
        self.cancelled: list[str] = []

    def open(self, on_answer: OnAnswer, on_lost: OnLost) -> bool:
        self._on_answer, self._on_lost, self._open = on_answer, on_lost, True
        return True

    @property
    def is_open(self) -> bool:
        return self._open

    def send(self, request: Request) -> None:
        self.requests.append(request)
        self._running[request.wire_id] = asyncio.ensure_future(self._answer(request))

    async def _answer(self, request: Request) -> None:
        try:
            answer = await self._serve(request)
        finally:
            self._running.pop(request.wire_id, None)
        if answer is not None and self._open:
            self._on_answer(answer)

    def cancel(self, wire_id: str) -> None:
        if not self._open:
            return
        self.cancelled.append(wire_id)
        task = self._running.pop(wire_id, None) if self._obey_cancel else None
        if task is not None:
            task.cancel()

    def lose(self, reason: str = "the device went away") -> None:
        """Break the stream: what runs is dropped and the source hears ``reason``."""
        self._drop()
        self._on_lost(reason)

    async def healthy(self, timeout_s: float) -> bool:
        return self._health()

    async def close(self) -> None:
        self._drop()

    def _drop(self) -> None:
        self._open = False
        running, self._running = self._running, {}
        for task in running.values():
            task.cancel()


def encode_request(request: Request, cancels: list[str]) -> bytes:
    """The serialised ``DeviceInferRequest`` of ``request`` (made once, by the first link that
    sends it) with ``cancels`` riding along (protobuf merges concatenated messages)."""
    if request.encoded is None:
        request.encoded = rocoin_pb2.DeviceInferRequest(
            query_id=request.wire_id, input=tensor_to_proto(request.inputs), timeout_s=request.timeout_s
        ).SerializeToString()
    if not cancels:
        return request.encoded
    return request.encoded + rocoin_pb2.DeviceInferRequest(cancel=cancels).SerializeToString()


def _as_is(message: bytes) -> bytes:
    return message


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
