"""The source's ``rocoin.v1.Fleet/Join`` service: devices that dial the source (from behind NAT
or a firewall: only the source needs a reachable port) keep one stream open on the source's gRPC
port, and get their group, their model and their queries over it (the exchange is described in
:mod:`rocoin.runtime.transport.join`).

Admission, in order, each refusal one gRPC status with one line:

1. **Who is it?** The device token (``authorization: Bearer …``, the *device* token, not the
   client API's) — or, with mTLS, a client certificate whose common name is the device's id. The
   API's token does not admit a device, nor the device token a client.
2. **How many?** At most ``max_joins_per_s`` joins per second (a token bucket with a burst of
   ``join_burst``) and ``max_streams`` streams at once: ``RESOURCE_EXHAUSTED`` (a device dials
   again later). A stream holds its slot from here, through its hello, until it ends: streams
   still waiting for their hello count against the bound too.
3. **The hello**, within :data:`HELLO_TIMEOUT_S`: the protocol version (``FAILED_PRECONDITION``),
   the profile (a fleet entry without an address: ``INVALID_ARGUMENT`` naming the field), the
   device key (``INVALID_ARGUMENT`` when missing).
4. **The id's owner**: the registry binds an id to the first device key that joined with it;
   another is ``PERMISSION_DENIED``. Under mTLS the certificate's common name is the identity: the
   CA vouches for it, so a renewed certificate naming the same id keeps the device's place. A
   device the source dials cannot be taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time

import grpc
from pydantic import ValidationError

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import format_validation_error
from rocoin.contracts.fleet import DeviceProfile
from rocoin.contracts.text import short_repr
from rocoin.runtime.source.joined import JoinedLink
from rocoin.runtime.source.membership import Membership
from rocoin.runtime.source.registry import DeviceLimitError, IdentityError
from rocoin.runtime.source.settings import DEFAULT_JOINS_PER_S, DEFAULT_MAX_JOIN_STREAMS, JOIN_BURST
from rocoin.runtime.transport.auth import METADATA_KEY, bearer_matches
from rocoin.runtime.transport.grpc_server import Malformed
from rocoin.runtime.transport.join import JOIN_PROTOCOL
from rocoin.runtime.transport.protocol import rocoin_pb2

logger = logging.getLogger(__name__)

SERVICE = "rocoin.v1.Fleet"
#: Time a device has to send its hello after opening the stream.
HELLO_TIMEOUT_S = 10.0
#: Longest profile JSON in a hello.
MAX_PROFILE_CHARS = 4096


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Bucket:
    """A token bucket: ``rate`` per second, at most ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class JoinService:
    """Admits devices to ``membership`` over their own streams."""

    def __init__(
        self,
        membership: Membership,
        *,
        token: str | None,
        tls_client_auth: bool = False,
        max_joins_per_s: float = DEFAULT_JOINS_PER_S,
        join_burst: int = JOIN_BURST,
        max_streams: int = DEFAULT_MAX_JOIN_STREAMS,
    ) -> None:
        check_join_limits(max_joins_per_s, join_burst, max_streams)
        if not token and not tls_client_auth:
            logger.warning("the Join service admits devices WITHOUT AUTHENTICATION (no device token, no mTLS): anyone may join")
        self.membership = membership
        self.token = token
        self.tls_client_auth = tls_client_auth
        self.max_streams = max_streams
        self._bucket = _Bucket(float(max_joins_per_s), join_burst)
        #: streams holding a slot: past the limits, waiting for their hello or joined
        self.streams = 0

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's handler for ``server.add_generic_rpc_handlers``."""
        join = grpc.stream_stream_rpc_method_handler(
            self.join, request_deserializer=rocoin_pb2.DeviceMessage.FromString, response_serializer=_as_is
        )
        probe = grpc.unary_unary_rpc_method_handler(
            self.probe,
            request_deserializer=rocoin_pb2.LinkProbe.FromString,
            response_serializer=rocoin_pb2.LinkProbeReply.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE, {"Join": join, "Probe": probe})

    async def probe(self, request: rocoin_pb2.LinkProbe, context: grpc.aio.ServicerContext) -> rocoin_pb2.LinkProbeReply:
        """A device times its uplink before it joins (``rocoin device join --measure``): the whole
        padding has been read when this answers. Admitted as a join is; not rate-limited (a
        device sends a handful), bounded by the message size limit and the server's concurrency."""
        try:
            self._authenticate(context)
        except _Refused as refused:
            await _refuse(context, refused)
        return rocoin_pb2.LinkProbeReply(received_bytes=len(request.padding))

    async def join(self, requests, context: grpc.aio.ServicerContext) -> None:
        try:
            peer_name = self._authenticate(context)
            self._take_slot()
        except _Refused as refused:
            await _refuse(context, refused)
            return
        try:  # the slot is this stream's until it ends, however it ends
            await self._joined(context, peer_name)
        finally:
            self.streams -= 1

    def _take_slot(self) -> None:
        """Count this stream against ``max_streams`` (and take a join from the bucket), or :class:`_Refused`."""
        if self.streams >= self.max_streams:
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.streams} devices connected: at most {self.max_streams}")
        if not self._bucket.take():
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many joins: try again later")
        self.streams += 1  # now, before any await: streams still saying hello count too

    async def _joined(self, context: grpc.aio.ServicerContext, peer_name: str | None) -> None:
        """The hello, the admission, then the stream until it ends (the caller holds its slot)."""
        try:
            try:
                first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"no hello within {HELLO_TIMEOUT_S:g} s") from None
            if first is grpc.aio.EOF:
                return
            if isinstance(first, Malformed):
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, first.message("DeviceMessage"))
            profile, credential = _hello(first, peer_name)
        except _Refused as refused:
            await _refuse(context, refused)
            return
        device_id = profile.id
        link = JoinedLink(device_id, max_message_bytes=self.membership.source.max_message_bytes)
        try:
            admit = self.membership.admit(profile, credential, link, list(first.hello.cached_models))
        except IdentityError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            return
        except DeviceLimitError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return
        except RocoinError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        logger.info("device %s joined from %s", device_id, context.peer(), extra={"device": device_id})
        reader = asyncio.ensure_future(self._read(context, link))
        assigning = asyncio.ensure_future(admit)
        reason = "the device closed the stream"
        try:
            while True:
                message = await link.next_message()
                if message is None:
                    reason = "the source closed the stream"
                    break
                await context.write(message)
        except asyncio.CancelledError:
            reason = "the stream was cancelled"
            raise
        except Exception as exc:  # the write failed: the stream is gone
            reason = f"write failed: {exc}"
        finally:
            for task in (reader, assigning):
                task.cancel()
            link.broken(reason)
            await self.membership.left(device_id, link, reason)
            logger.info("device %s: join stream ended (%s)", device_id, reason, extra={"device": device_id})

    async def _read(self, context: grpc.aio.ServicerContext, link: JoinedLink) -> None:
        reason = "the device closed the stream"
        try:
            while (message := await context.read()) is not grpc.aio.EOF:
                if isinstance(message, Malformed):
                    raise RocoinError(message.message("DeviceMessage"))
                link.received(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke, or the device sent something out of turn
            reason = str(exc) or type(exc).__name__
        link.broken(reason)
        with contextlib.suppress(asyncio.QueueFull):
            link._outbox.put_nowait(None)  # end the writer too

    def _authenticate(self, context: grpc.aio.ServicerContext) -> str | None:
        """The certificate's common name (mTLS), else None; :class:`_Refused` without the device token."""
        auth = context.auth_context() or {}
        names = [n.decode("utf-8", "replace") for n in auth.get("x509_common_name", [])]
        if self.tls_client_auth and names:
            return names[0]
        if self.token:
            given = next((v for k, v in (context.invocation_metadata() or ()) if k == METADATA_KEY), None)
            if isinstance(given, bytes):
                given = given.decode("latin-1")
            if not bearer_matches(given, self.token):
                reason = "missing token" if given is None else "wrong token"
                raise _Refused(grpc.StatusCode.UNAUTHENTICATED, f"{reason}: joining this source requires its device token")
        elif self.tls_client_auth:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "no client certificate: joining this source requires mTLS")
        return None


def check_join_limits(
    joins_per_s: float, burst: int, streams: int, names: tuple[str, str, str] = ("max_joins_per_s", "join_burst", "max_streams")
) -> None:
    """:class:`RocoinError` naming (with the caller's ``names``) the first of :class:`JoinService`'s limits it cannot keep."""
    if isinstance(joins_per_s, bool) or not isinstance(joins_per_s, (int, float)) or not (math.isfinite(joins_per_s) and joins_per_s > 0):
        raise RocoinError(f"{names[0]} = {short_repr(joins_per_s)}: expected a finite number of joins per second > 0")
    for name, value in zip(names[1:], (burst, streams), strict=True):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RocoinError(f"{name} = {short_repr(value)}: expected an integer >= 1")


async def _refuse(context: grpc.aio.ServicerContext, refused: _Refused) -> None:
    logger.warning("join refused (%s): %s", refused.code.name, refused.message)
    await context.abort(refused.code, refused.message)


#: The credential of a device admitted by its certificate (the hash of the name it gives).
_CERTIFICATE_CREDENTIAL = "x509-cn:"


def _hello(message: rocoin_pb2.DeviceMessage, peer_name: str | None) -> tuple[DeviceProfile, str]:
    """The profile and credential of a device's first message, or :class:`_Refused`."""
    if message.WhichOneof("kind") != "hello":
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"first message: {message.WhichOneof('kind') or 'empty'}: expected a hello")
    hello = message.hello
    if hello.protocol != JOIN_PROTOCOL:
        raise _Refused(
            grpc.StatusCode.FAILED_PRECONDITION, f"protocol = {hello.protocol}: this source speaks join protocol {JOIN_PROTOCOL}"
        )
    if len(hello.profile_json) > MAX_PROFILE_CHARS:
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT, f"profile_json: {len(hello.profile_json)} characters: expected at most {MAX_PROFILE_CHARS}"
        )
    try:
        raw = json.loads(hello.profile_json)
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object")
        raw.setdefault("id", hello.device_id)
        profile = DeviceProfile.model_validate(raw)
    except ValidationError as exc:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, format_validation_error(exc, "profile_json")) from None
    except ValueError as exc:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"profile_json: {exc}") from None
    if profile.id != hello.device_id:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"profile id {profile.id!r}: differs from device_id {hello.device_id!r}")
    if profile.address is not None:
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT, "profile.address: a device that joins has no address (the source does not dial it)"
        )
    if peer_name is not None:
        if peer_name != profile.id:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, f"device_id {profile.id!r}: the client certificate names {peer_name!r}")
        # the CA vouches for the id: any certificate of it naming the id is the device (a renewed one too)
        return profile, _CERTIFICATE_CREDENTIAL + hashlib.sha256(peer_name.encode("utf-8", "surrogatepass")).hexdigest()
    if not hello.device_key:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "device_key: missing: a joining device sends its own random key")
    if hello.device_key.startswith(_CERTIFICATE_CREDENTIAL):  # only a verified certificate yields these
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"device_key: starts with {_CERTIFICATE_CREDENTIAL!r}: expected a random key")
    return profile, hello.device_key


def _as_is(message: bytes) -> bytes:
    return message
