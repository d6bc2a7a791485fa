"""A shared token that authenticates the source to its devices (gRPC metadata, checked by a
server interceptor). The health service stays open, so probes and orchestration need no secret.

The token comes from a file (``--token-file``) or the ``ROCOIN_DEVICE_TOKEN`` environment
variable, never from the command line (where other users could read it in the process list).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from rocoin.errors import RocoinError

TOKEN_ENV = "ROCOIN_DEVICE_TOKEN"
#: The optional bearer token of the source's client API.
API_TOKEN_ENV = "ROCOIN_API_TOKEN"
#: Shortest token accepted: a guessable secret is worse than none, because it looks safe.
MIN_TOKEN_CHARS = 16
METADATA_KEY = "authorization"
#: Methods reachable without the token.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def load_token(token_file: str | os.PathLike[str] | None = None, env: str = TOKEN_ENV) -> str | None:
    """The token from ``token_file``, else from the ``env`` variable, else None (no authentication)."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise RocoinError(f"token-file = {str(token_file)!r}: cannot read it ({exc.strerror})") from None
        source = f"token-file {token_file}"
    else:
        token = os.environ.get(env, "").strip()
        source = env
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS:
        raise RocoinError(f"{source}: the token has {len(token)} characters; expected at least {MIN_TOKEN_CHARS}")
    return token


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return ((METADATA_KEY, f"Bearer {token}"),) if token else None


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without ``authorization: Bearer <token>`` (UNAUTHENTICATED)."""

    def __init__(self, token: str, *, what: str = "this device requires the source's token") -> None:
        self._expected = f"Bearer {token}".encode()
        self._what = what

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(details)
        given = next((value for key, value in (details.invocation_metadata or ()) if key == METADATA_KEY), None)
        if given is not None and hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return await continuation(details)
        reason = "missing token" if given is None else "wrong token"
        deny = _deny(f"{reason}: {self._what}")
        handler = await continuation(details)  # only to answer with the method's own kind of handler
        if handler is not None and handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def _deny(message: str) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return handler


def bearer_matches(header: str | None, token: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer ...`` header."""
    return header is not None and hmac.compare_digest(header.encode(), f"Bearer {token}".encode())
