"""``rocoin device join``: a device that dials the source instead of listening (it may sit behind
NAT or a firewall: it opens no port at all).

:class:`JoinClient` opens one ``rocoin.v1.Fleet/Join`` stream to the source (the exchange is in
:mod:`rocoin.runtime.transport.join`), says who it is (its id, its profile, the models it has
cached, and its device key — a random secret kept beside the cache, to which the source binds the
id), receives its group's model (:mod:`.models`: verified before it is loaded), then answers
queries on the same stream exactly as a worker answers ``InferStream`` (the same
:class:`~.servicer.DeviceWorker` code runs them) and health checks with the hash of the model it
serves. A new assignment swaps the model between queries.

When the stream breaks the client dials again after a random wait in [0, b] (full jitter), b
doubling from :data:`~rocoin.runtime.transport.join.INITIAL_JOIN_BACKOFF_S` to
:data:`~rocoin.runtime.transport.join.MAX_JOIN_BACKOFF_S` and reset once an assignment came; it
stops only when told to, or when the source refuses it for good (a wrong token, an id that is not
its own, a bad profile): then :meth:`JoinClient.run` raises :class:`RocoinError` with the source's
reason. Pings follow :data:`~rocoin.runtime.transport.keepalive.KEEPALIVE` (the device is the
client here; the source pings back on the same schedule).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import time
from pathlib import Path

import grpc

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fleet import DeviceProfile
from rocoin.runtime.device.emulation import Emulation
from rocoin.runtime.device.models import DEFAULT_MAX_MODELS, ModelCache, ModelReceiver
from rocoin.runtime.device.options import DEFAULT_INTRA_OP_THREADS, DEFAULT_MAX_BATCH, DEFAULT_MAX_CONCURRENCY
from rocoin.runtime.device.servicer import DeviceWorker
from rocoin.runtime.transport.auth import token_metadata
from rocoin.runtime.transport.join import (
    INITIAL_JOIN_BACKOFF_S,
    JOIN_METHOD,
    JOIN_PROTOCOL,
    MAX_JOIN_BACKOFF_S,
    PERMANENT_REFUSALS,
    SPARE,
)
from rocoin.runtime.transport.keepalive import KEEPALIVE, Keepalive
from rocoin.runtime.transport.protocol import rocoin_pb2
from rocoin.runtime.transport.tls import ClientTLS

logger = logging.getLogger(__name__)

#: The device's own secret, beside its model cache (mode 0600).
KEY_FILE = "device-key"
#: Message limit of the join channel: a model chunk or a full request, and any group's answer.
JOIN_MESSAGE_BYTES = 64 * 1024 * 1024
#: How long a failed write waits for the stream's final status (the source's reason for ending it).
WRITE_END_WAIT_S = 5.0


def backoff_s(attempt: int, rng: random.Random) -> float:
    """The wait before dial number ``attempt + 1`` after a broken stream: uniform in [0, b],
    ``b = min(MAX, INITIAL · 2^attempt)`` (exponential backoff with full jitter)."""
    return rng.uniform(0.0, min(MAX_JOIN_BACKOFF_S, INITIAL_JOIN_BACKOFF_S * 2.0 ** min(attempt, 30)))


def device_key(folder: Path) -> str:
    """The device's key in ``folder`` (made on first use: 32 random bytes, readable by the owner only)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / KEY_FILE
    if path.exists():
        key = path.read_text(encoding="utf-8").strip()
        if len(key) >= 16:
            return key
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key


class _Stream:
    """What :meth:`DeviceWorker.InferStream` reads requests from and writes answers to: the join
    stream's requests, and answers wrapped as ``DeviceMessage``."""

    def __init__(self, send) -> None:
        self.requests: asyncio.Queue = asyncio.Queue()
        self._send = send

    async def read(self):
        return await self.requests.get()

    async def write(self, reply: rocoin_pb2.DeviceInferResponse) -> None:
        await self._send(rocoin_pb2.DeviceMessage(answer=reply))


class JoinClient:
    """One device that dials ``source`` (host:port) and serves what it is assigned."""

    def __init__(
        self,
        source: str,
        profile: DeviceProfile,
        cache_dir: str | os.PathLike[str],
        *,
        token: str | None = None,
        tls: ClientTLS | None = None,
        emulate: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        intra_op_threads: int = DEFAULT_INTRA_OP_THREADS,
        max_models: int = DEFAULT_MAX_MODELS,
        keepalive: Keepalive = KEEPALIVE,
        seed: int | None = None,
    ) -> None:
        if profile.address is not None:
            raise RocoinError("profile.address: a device that joins has no address (the source does not dial it)")
        self.source = source
        self.profile = profile
        self.device_id = profile.id
        self.cache = ModelCache(Path(cache_dir) / "models", max_models)
        self.cache.drop_partial()  # a download cut short by a crash or a kill
        self.key = device_key(Path(cache_dir))
        self.token = token
        self.tls = tls
        self.emulation = (
            Emulation(flops=profile.flops, rate_bps=profile.rate_bps, outage=profile.outage or 0.0, seed=seed) if emulate else None
        )
        self.worker_options = {"max_batch": max_batch, "max_concurrency": max_concurrency, "intra_op_threads": intra_op_threads}
        self.keepalive = keepalive
        self._rng = random.Random(seed)
        self.worker: DeviceWorker | None = None
        self.group = SPARE
        #: what a test or an operator can watch
        self.assigned = asyncio.Event()  # set at each assignment served (ModelReady sent)
        self.sessions = 0  # streams opened
        self.downloads = 0  # models received in chunks
        self._stopping = asyncio.Event()
        self._call = None
        self._session_assigned = False  # the current (or last) stream got an assignment

    @property
    def model_sha256(self) -> str:
        return self.worker.model.sha256 if self.worker is not None and self.group != SPARE else ""

    def stop(self) -> None:
        """End the stream and :meth:`run` (the models stay cached)."""
        self._stopping.set()
        if self._call is not None:
            self._call.cancel()

    async def run(self) -> None:
        """Join, serve, and join again whenever the stream breaks, until :meth:`stop`."""
        attempt = 0
        try:
            while not self._stopping.is_set():
                self._session_assigned = False
                try:
                    await self._session()
                except asyncio.CancelledError:
                    if self._stopping.is_set():  # stop() cancelled the call
                        break
                    raise
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in PERMANENT_REFUSALS:
                        raise RocoinError(
                            f"the source {self.source} refused device {self.device_id} ({exc.code().name}: {exc.details()})"
                        ) from None
                    logger.warning("device %s: join stream ended (%s: %s)", self.device_id, exc.code().name, exc.details())
                except RocoinError:  # its own settings (TLS files): dialing again cannot help
                    raise
                except Exception:  # a bug or an unexpected failure: a device keeps trying rather than dying
                    logger.exception("device %s: join stream failed", self.device_id)
                finally:
                    if self._session_assigned:  # the source took this device: start the backoff over
                        attempt = 0
                if self._stopping.is_set():
                    break
                wait = backoff_s(attempt, self._rng)
                attempt += 1
                logger.warning("device %s: joining %s again in %.2f s", self.device_id, self.source, wait)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), wait)
        finally:
            if self.worker is not None:
                self.worker.close()

    def _channel(self) -> grpc.aio.Channel:
        options = [
            *self.keepalive.client_options(),
            ("grpc.max_send_message_length", JOIN_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", JOIN_MESSAGE_BYTES),
        ]
        if self.tls is not None:
            return grpc.aio.secure_channel(self.source, self.tls.credentials(), options=options)
        return grpc.aio.insecure_channel(self.source, options=options)

    async def _session(self) -> None:
        """One stream, until it ends (:attr:`_session_assigned` tells whether the source assigned something on it)."""
        writing = asyncio.Lock()
        stream: _Stream | None = None
        streams: set[asyncio.Task] = set()  # InferStream of the worker(s) of this stream
        receiver: ModelReceiver | None = None
        async with self._channel() as channel:
            call = channel.stream_stream(
                JOIN_METHOD,
                request_serializer=rocoin_pb2.DeviceMessage.SerializeToString,
                response_deserializer=rocoin_pb2.SourceMessage.FromString,
            )(metadata=token_metadata(self.token))
            self._call = call
            self.sessions += 1
            if self._stopping.is_set():  # stop() came while dialing
                call.cancel()

            async def send(message: rocoin_pb2.DeviceMessage) -> None:
                async with writing:
                    if call.done():  # the stream ended: reading it tells how (its status)
                        return
                    try:
                        await call.write(message)
                    except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                        # it ended during the write (a refusal while the hello was on its way): the
                        # write's own error may be a bare INTERNAL; reading the stream gives its status
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(call.code(), WRITE_END_WAIT_S)
                        if not call.done():
                            raise

            hello = rocoin_pb2.JoinHello(
                device_id=self.device_id,
                profile_json=self.profile.model_dump_json(exclude_none=True, exclude={"id", "address"}),
                cached_models=self.cache.hashes(),
                protocol=JOIN_PROTOCOL,
                device_key=self.key,
            )
            try:
                await send(rocoin_pb2.DeviceMessage(hello=hello))
                async for message in call:
                    kind = message.WhichOneof("kind")
                    if kind == "assign":
                        if receiver is not None:
                            receiver.abort()
                        receiver = None
                        if not self._session_assigned:
                            logger.warning("device %s: joined %s", self.device_id, self.source)
                        self._session_assigned = True
                        if message.assign.group == SPARE:  # no model: serve nothing until the next assignment
                            self.group = SPARE
                            logger.warning("device %s: a spare (no group for now)", self.device_id)
                            await send(rocoin_pb2.DeviceMessage(ready=_ready(message.assign.epoch)))
                            self.assigned.set()
                            continue
                        logger.warning(
                            "device %s: assigned group %d (model %s)", self.device_id, message.assign.group,
                            "follows" if message.assign.send_model else "from the cache",
                        )  # fmt: skip
                        try:
                            receiver = ModelReceiver(self.cache, message.assign)
                        except RocoinError as exc:
                            await send(rocoin_pb2.DeviceMessage(ready=self._refused(message.assign.group, message.assign.epoch, exc)))
                            continue
                    elif kind == "chunk":
                        if receiver is None:
                            continue
                        try:
                            receiver.add(message.chunk)
                        except RocoinError as exc:
                            await send(rocoin_pb2.DeviceMessage(ready=self._refused(receiver.group, receiver.epoch, exc)))
                            receiver = None
                            continue
                    elif kind == "request":
                        if stream is not None and self.group != SPARE:
                            stream.requests.put_nowait(message.request)
                        elif message.request.query_id:
                            refusal = rocoin_pb2.DeviceInferResponse(
                                query_id=message.request.query_id[:256], device_id=self.device_id, group=SPARE,
                                error_code=grpc.StatusCode.UNAVAILABLE.value[0], error="this device serves no group now",
                            )  # fmt: skip
                            await send(rocoin_pb2.DeviceMessage(answer=refusal))
                        continue
                    elif kind == "health":
                        await send(
                            rocoin_pb2.DeviceMessage(
                                health=rocoin_pb2.HealthReply(nonce=message.health.nonce, model_sha256=self.model_sha256)
                            )
                        )
                        continue
                    if receiver is not None and receiver.complete:
                        done, receiver = receiver, None
                        before = self.worker
                        reply = await asyncio.to_thread(self._load, done)  # hashing, loading: queries running go on
                        if self.worker is not before and stream is not None:  # a new worker (another input shape)
                            stream.requests.put_nowait(grpc.aio.EOF)  # the old one finishes what it runs, then ends
                            if before is not None:
                                before.close()
                            stream = None
                        if reply.error == "" and self.worker is not None and stream is None:
                            stream = _Stream(send)
                            serving = asyncio.ensure_future(self.worker.InferStream(None, stream))
                            streams.add(serving)
                            serving.add_done_callback(streams.discard)
                        await send(rocoin_pb2.DeviceMessage(ready=reply))
                        if not reply.error:
                            self.assigned.set()
            finally:
                self._call = None
                if receiver is not None:
                    receiver.abort()
                if stream is not None:
                    stream.requests.put_nowait(grpc.aio.EOF)
                for task in list(streams):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    def _load(self, receiver: ModelReceiver) -> rocoin_pb2.ModelReady:
        """Verify the received (or cached) model and serve it; the ``ModelReady`` to answer (runs
        in a thread: the swap itself is one assignment in :meth:`DeviceWorker.serve`)."""
        started = time.perf_counter()
        try:
            folder, model, flops = receiver.finish()
            verified_s = time.perf_counter() - started
            if self.worker is None or tuple(model.input.shape) != self.worker.input_shape:
                self.worker = DeviceWorker(
                    folder, self.device_id, model=model, student_flops=flops, emulation=self.emulation, **self.worker_options
                )
            else:
                self.worker.serve(folder, model, flops)
        except Exception as exc:  # RocoinError, and whatever onnxruntime or the disk raise: one line, the stream goes on
            return self._refused(receiver.group, receiver.epoch, exc)
        if receiver.send_model:
            self.downloads += 1
        self.group = receiver.group
        logger.warning(
            "device %s serves group %d (model %s %s and verified in %.2f s, loaded in %.2f s)",
            self.device_id, self.group, model.sha256[:12], "received" if receiver.send_model else "from the cache",
            verified_s, time.perf_counter() - started - verified_s,
        )  # fmt: skip
        return _ready(receiver.epoch, sha256=model.sha256)

    def _refused(self, group: int, epoch: int, exc: Exception) -> rocoin_pb2.ModelReady:
        """A refused assignment: the device serves nothing (it was moved off its old group) until the next one."""
        line = " ".join(str(exc).split()) or type(exc).__name__
        logger.error("device %s: refused group %d's model: %s", self.device_id, group, line)
        self.group = SPARE
        return _ready(epoch, error=line)


def _ready(epoch: int, *, sha256: str = "", error: str = "") -> rocoin_pb2.ModelReady:
    return rocoin_pb2.ModelReady(sha256=sha256, epoch=epoch, error=error[:500])


async def serve_joined(client: JoinClient) -> None:
    """Run ``client`` until SIGTERM/SIGINT."""
    from rocoin.runtime.transport.lifecycle import stop_on_signals

    stop = asyncio.Event()
    task = asyncio.ensure_future(client.run())
    waiter = asyncio.ensure_future(stop.wait())
    with stop_on_signals(stop):
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    client.stop()
    waiter.cancel()
    await task
