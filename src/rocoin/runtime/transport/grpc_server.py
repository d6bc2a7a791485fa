"""What every gRPC server of the runtime shares: message limits, the keepalive policy that the
source's pings need, the token check, and one-line refusals of messages that do not parse.

A request whose bytes are not a valid protobuf message of the method's type (a string field that
is not UTF-8, a truncated varint) fails inside gRPC's own deserialisation, before any servicer
code runs; grpc.aio then answers ``UNKNOWN`` and logs a traceback per request. The
:class:`MalformedRequests` interceptor wraps each method's deserialiser instead: a message that
does not parse becomes a :class:`Malformed` value, which unary methods answer with
``INVALID_ARGUMENT`` and one log line, and which a stream's servicer sees (and answers) as one
bad message of the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from rocoin.contracts.text import one_line
from rocoin.runtime.transport.auth import OPEN_METHOD_PREFIXES, TokenInterceptor
from rocoin.runtime.transport.keepalive import KEEPALIVE, Keepalive

logger = logging.getLogger(__name__)


class Malformed:
    """A request message that did not parse: what the servicer gets instead of the message."""

    __slots__ = ("reason", "size_bytes")

    def __init__(self, reason: str, size_bytes: int) -> None:
        self.reason = reason
        self.size_bytes = size_bytes

    def message(self, method: str) -> str:
        return f"request: {self.size_bytes} bytes that are not a valid {method} message ({self.reason})"


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return Malformed(one_line(str(exc) or type(exc).__name__, 120), len(data))

    return deserialize


async def refuse(context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, message: str) -> None:
    """End the call with ``code`` and a one-line ``message``, logged as one line (no traceback)."""
    message = one_line(message)
    logger.info("gRPC %s refused (%s): %s", method, code.name, message)
    await context.abort(code, message)


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Answer requests that do not parse with ``INVALID_ARGUMENT`` (one line), never ``UNKNOWN``."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        deserializer = _tolerant(handler.request_deserializer)
        if handler.request_streaming:  # the servicer reads the stream and answers Malformed itself
            if handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(handler.stream_stream, deserializer, handler.response_serializer)
            return grpc.stream_unary_rpc_method_handler(handler.stream_unary, deserializer, handler.response_serializer)
        behaviour = handler.unary_unary if not handler.response_streaming else handler.unary_stream

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                await refuse(context, method, grpc.StatusCode.INVALID_ARGUMENT, request.message(method))
            return await behaviour(request, context)

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(checked, deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(checked, deserializer, handler.response_serializer)


def create_server(
    *,
    max_receive_bytes: int,
    max_send_bytes: int,
    max_concurrent_rpcs: int,
    token: str | None = None,
    token_what: str = "this device requires the source's token",
    open_methods: Sequence[str] = OPEN_METHOD_PREFIXES,
    keepalive: Keepalive = KEEPALIVE,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Server:
    """A grpc.aio server with the runtime's limits, keepalive policy and interceptors."""
    interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequests()]
    if token:
        interceptors.append(TokenInterceptor(token, what=token_what, open_methods=tuple(open_methods)))
    return grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", max_send_bytes),
            *keepalive.server_options(),
            *options,
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        interceptors=interceptors,
    )
