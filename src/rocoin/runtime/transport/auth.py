"""A shared token that authenticates the source to its devices (gRPC metadata, checked by a
server interceptor). The health service stays open, so probes and orchestration need no secret.

The token comes from a file (``--token-file``) or the ``ROCOIN_DEVICE_TOKEN`` environment
variable, never from the command line (where other users could read it in the process list).

Secure by default: a device worker (and the source that calls devices) refuses to start without
a token or TLS client certificates unless it is told ``insecure`` explicitly, and then says so
at WARNING level (:func:`check_authentication`). The ``Authorization`` scheme is matched
case-insensitively (RFC 7235: ``bearer`` is ``Bearer``); the token itself is compared in
constant time.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from rocoin.contracts.errors import RocoinError

logger = logging.getLogger(__name__)

TOKEN_ENV = "ROCOIN_DEVICE_TOKEN"
#: The optional bearer token of the source's client API.
API_TOKEN_ENV = "ROCOIN_API_TOKEN"
#: Shortest token accepted: a guessable secret is worse than none, because it looks safe.
MIN_TOKEN_CHARS = 16
METADATA_KEY = "authorization"
SCHEME = "Bearer"
#: Methods reachable without the token.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def check_authentication(what: str, *, token: str | None, tls_client_auth: bool, insecure: bool, risk: str) -> None:
    """Refuse to run ``what`` unauthenticated unless ``insecure``; warn loudly (with ``risk``) when it is.

    ``tls_client_auth``: the caller is authenticated by its TLS certificate (mTLS).
    """
    authenticated = bool(token) or tls_client_auth
    if authenticated and insecure:
        raise RocoinError(f"{what}: insecure was asked for, but a token or TLS client authentication is configured: choose one")
    if not authenticated and not insecure:
        raise RocoinError(
            f"{what}: no token (--token-file or ${TOKEN_ENV}) and no TLS client authentication;"
            " refusing to run unauthenticated (pass --insecure to do so on a trusted network)"
        )
    if insecure:
        logger.warning("%s runs WITHOUT AUTHENTICATION (--insecure): %s", what, risk)


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
    return ((METADATA_KEY, f"{SCHEME} {token}"),) if token else None


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without ``authorization: Bearer <token>`` (UNAUTHENTICATED)."""

    def __init__(
        self, token: str, *, what: str = "this device requires the source's token", open_methods: tuple[str, ...] = OPEN_METHOD_PREFIXES
    ) -> None:
        self._token = token
        self._what = what
        self._open = open_methods

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(self._open):
            return await continuation(details)
        given = next((value for key, value in (details.invocation_metadata or ()) if key == METADATA_KEY), None)
        if isinstance(given, bytes):
            given = given.decode("latin-1")
        if bearer_matches(given, self._token):
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
    """Constant-time check of an ``Authorization: Bearer <token>`` header (any case of the scheme)."""
    if header is None:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    given = credentials.strip().encode("utf-8", "replace")
    return scheme.lower() == SCHEME.lower() and hmac.compare_digest(given, token.encode("utf-8"))
