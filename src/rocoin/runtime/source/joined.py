"""A device that dialed the source: its ``rocoin.v1.Fleet/Join`` stream, seen from the source.

:class:`JoinedLink` is a :class:`~.link.DeviceLink` like the one the source dials, so the gather
and the source treat both kinds alike; it also carries what only a joined device needs: its
assignment and the model's bytes (:meth:`JoinedLink.assign`), and health checks answered with the
hash of the model the device serves (:meth:`JoinedLink.check`). The join service
(:mod:`.join_service`) owns the gRPC stream: it hands every message from the device to
:meth:`JoinedLink.received` and writes what :meth:`JoinedLink.next_message` gives it.

Messages to the device are serialised ``SourceMessage`` bytes in an outbox of at most
:data:`~.link.MAX_OUTBOX`; a query's ``DeviceInferRequest`` is serialised once for every device (as
:class:`~.link.GrpcStreamLink` does) and wrapped here without decoding it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
from pathlib import Path

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.manifest import GroupModel
from rocoin.runtime.source.link import CANCEL_FLUSH_S, MAX_OUTBOX, DeviceLink, LinkFull, OnAnswer, OnLost, encode_request
from rocoin.runtime.source.messages import Answer, Request
from rocoin.runtime.transport.join import MODEL_CHUNK_BYTES, SPARE
from rocoin.runtime.transport.protocol import rocoin_pb2
from rocoin.runtime.transport.serde import tensor_from_proto

#: Longest wait for a device to say it verified and loaded the model it was sent.
READY_TIMEOUT_S = 60.0
#: Time limit of one health check on the stream.
CHECK_TIMEOUT_S = 2.0

# field numbers of SourceMessage (rocoin.proto): a query is wrapped as bytes, not re-encoded
_REQUEST_FIELD = 3


class JoinedLink(DeviceLink):
    """The source's end of one device's Join stream (one stream: a rejoin makes a new link)."""

    def __init__(self, device_id: str, *, max_message_bytes: int) -> None:
        self.device_id = device_id
        self.max_message_bytes = max_message_bytes
        self.connected = True  # the stream is up (until :meth:`broken` or :meth:`close`)
        self.model_sha256 = ""  # the model the device said it verified and loaded
        self.group = SPARE
        self.epoch = 0
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue(MAX_OUTBOX)
        self._serving = False  # open() was called: queries flow
        self._on_answer: OnAnswer | None = None
        self._on_lost: OnLost | None = None
        self._cancels: list[str] = []
        self._flush: asyncio.TimerHandle | None = None
        self._checks: dict[str, asyncio.Future[str]] = {}
        self._ready: dict[int, asyncio.Future[rocoin_pb2.ModelReady]] = {}

    # --- DeviceLink ------------------------------------------------------------------------

    def open(self, on_answer: OnAnswer, on_lost: OnLost) -> bool:
        if not self.connected:
            return False
        self._on_answer, self._on_lost, self._serving = on_answer, on_lost, True
        return True

    @property
    def is_open(self) -> bool:
        return self.connected and self._serving

    def send(self, request: Request) -> None:
        payload, self._cancels = encode_request(request, self._cancels), []
        self._put(_wrap(_REQUEST_FIELD, payload))

    def cancel(self, wire_id: str) -> None:
        if not self.is_open:
            return
        self._cancels.append(wire_id)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(CANCEL_FLUSH_S, self._flush_cancels)

    async def healthy(self, timeout_s: float) -> bool:
        return await self.check(timeout_s) == self.model_sha256 != ""

    async def close(self) -> None:
        """End the stream (without ``on_lost``): the join service stops writing and returns."""
        was = self.connected
        self._stop("the source closed the stream")
        if was:
            with contextlib.suppress(asyncio.QueueFull):
                self._outbox.put_nowait(None)

    # --- what only a joined device has ----------------------------------------------------------

    def serve_nothing(self) -> None:
        """Stop sending queries (before a move): nothing is lost, nobody is told."""
        self._serving = False
        self._on_answer = self._on_lost = None

    async def check(self, timeout_s: float = CHECK_TIMEOUT_S) -> str | None:
        """A health check on the stream: the hash of the model the device serves, or None when
        it does not answer in time."""
        if not self.connected:
            return None
        nonce = secrets.token_hex(8)
        future = self._checks[nonce] = asyncio.get_running_loop().create_future()
        try:
            self._put(rocoin_pb2.SourceMessage(health=rocoin_pb2.HealthCheck(nonce=nonce)).SerializeToString())
            return await asyncio.wait_for(future, timeout_s)
        except (asyncio.TimeoutError, LinkFull, ConnectionError):
            return None
        finally:
            self._checks.pop(nonce, None)

    async def assign(
        self, group: int, model: GroupModel | None, model_path: Path | None, *, send_model: bool, student_flops: float = 0.0
    ) -> str:
        """Tell the device its group (``SPARE``: none) and, when ``send_model``, send the model
        file in chunks; returns the hash the device verified and loaded. :class:`RocoinError` when
        it refuses the model, does not answer within :data:`READY_TIMEOUT_S` or goes away."""
        self.epoch += 1
        epoch = self.epoch
        ready = self._ready[epoch] = asyncio.get_running_loop().create_future()
        try:
            assignment = rocoin_pb2.Assignment(
                group=group,
                model_json=model.model_dump_json() if model is not None else "",
                send_model=send_model and model is not None,
                epoch=epoch,
                student_flops=student_flops,
            )
            await self._put_wait(rocoin_pb2.SourceMessage(assign=assignment).SerializeToString())
            if assignment.send_model:
                await self._send_file(model, model_path)
            reply = await asyncio.wait_for(ready, READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RocoinError(f"device {self.device_id}: no ModelReady within {READY_TIMEOUT_S:g} s") from None
        finally:
            self._ready.pop(epoch, None)
        if reply.error:
            raise RocoinError(f"device {self.device_id} refused group {group}'s model: {reply.error[:300]}")
        expected = model.sha256 if model is not None else ""
        if reply.sha256 != expected:
            raise RocoinError(f"device {self.device_id}: loaded model {reply.sha256[:12]!r}, expected {expected[:12]!r}")
        self.group, self.model_sha256 = group, reply.sha256
        return reply.sha256

    async def _send_file(self, model: GroupModel, path: Path) -> None:
        with open(path, "rb") as f:
            offset = 0
            while chunk := f.read(MODEL_CHUNK_BYTES):
                message = rocoin_pb2.ModelChunk(sha256=model.sha256, offset=offset, data=chunk)
                await self._put_wait(rocoin_pb2.SourceMessage(chunk=message).SerializeToString())
                offset += len(chunk)

    # --- the stream (called by the join service) ----------------------------------------------

    async def next_message(self) -> bytes | None:
        """The next serialised ``SourceMessage`` to write; None when the stream is to end."""
        return await self._outbox.get()

    def received(self, message: rocoin_pb2.DeviceMessage) -> None:
        """One message from the device (after its hello)."""
        kind = message.WhichOneof("kind")
        if kind == "answer":
            if self._serving and self._on_answer is not None:
                reply = message.answer
                features = functools.partial(tensor_from_proto, reply.features, max_bytes=self.max_message_bytes)
                self._on_answer(Answer(reply.query_id, features, code=reply.error_code, error=reply.error, max_batch=reply.max_batch))
        elif kind == "health":
            future = self._checks.get(message.health.nonce)
            if future is not None and not future.done():
                future.set_result(message.health.model_sha256)
        elif kind == "ready":
            future = self._ready.get(message.ready.epoch)
            if future is not None and not future.done():
                future.set_result(message.ready)
        else:
            raise RocoinError(f"device {self.device_id}: unexpected {kind or 'empty'} message after the hello")

    def broken(self, reason: str) -> None:
        """The stream ended (the device went away, or the connection was lost)."""
        serving, on_lost = self._serving, self._on_lost
        self._stop(reason)
        if serving and on_lost is not None:
            on_lost(reason)

    def _stop(self, reason: str) -> None:
        self.connected = self._serving = False
        self._on_answer = self._on_lost = None
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._cancels = []
        for future in (*self._checks.values(), *self._ready.values()):
            if not future.done():
                future.set_exception(ConnectionError(reason))

    def _put(self, message: bytes) -> None:
        if not self.connected:
            raise LinkFull(f"device {self.device_id}: the stream has ended")
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            raise LinkFull(f"{MAX_OUTBOX} messages waiting to be written: the device is not reading") from None

    async def _put_wait(self, message: bytes) -> None:
        """Queue ``message``, waiting while the outbox is full (a model's chunks), as long as the stream is up."""
        while True:
            if not self.connected:
                raise RocoinError(f"device {self.device_id}: the stream has ended")
            try:
                await asyncio.wait_for(self._outbox.put(message), 1.0)
                return
            except asyncio.TimeoutError:
                continue

    def _flush_cancels(self) -> None:
        self._flush = None
        if self._cancels and self.is_open:
            with contextlib.suppress(LinkFull):
                self._put(_wrap(_REQUEST_FIELD, rocoin_pb2.DeviceInferRequest(cancel=self._cancels).SerializeToString()))
        self._cancels = []


def _wrap(field: int, payload: bytes) -> bytes:
    """``payload`` (a serialised message) as the length-delimited ``field`` of an outer message."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
