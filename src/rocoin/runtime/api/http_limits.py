"""The limits of the source's REST API connections (served by :mod:`rocoin.runtime.api.http_guard`).

A module of its own, without aiohttp, so the command line can show the defaults and build the
settings without importing the HTTP server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rocoin.contracts.errors import RocoinError

#: A client sends its whole header block in one or two packets; 10 s covers a slow mobile link
#: and still frees a slowloris socket quickly.
DEFAULT_HEADER_TIMEOUT_S = 10.0
#: A full batch of JSON tensors is a few MB (64 CIFAR-size images: under 5 MB); 30 s allows that
#: at ~1.3 Mbit/s, far slower than any client that should be sending inference requests.
DEFAULT_BODY_TIMEOUT_S = 30.0
#: An idle keep-alive connection costs a socket and a handler; a minute spans a client's pause
#: between queries (clients reconnect transparently) and is shorter than aiohttp's 3630 s.
DEFAULT_IDLE_TIMEOUT_S = 60.0
#: Well above the concurrent clients one source serves, well below the process's file limit
#: (1024 by default), so a flood is refused before ``accept`` starts failing for everyone.
DEFAULT_MAX_CONNECTIONS = 256
#: Real clients send well under 2 KiB of headers (a bearer token included); aiohttp allows
#: 8 KiB per line, so 16 KiB for the whole block rejects only abuse.
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
#: Time a connection being closed for a limit may keep its socket: for aiohttp to finish the
#: responses it owes before the refusal (pipelining), and for a TLS close_notify exchange.
DEFAULT_CLOSE_LINGER_S = 5.0
#: How long ``close()`` lets in-flight requests finish; an inference answers within the source's
#: deadline (seconds), and a stopping server should not hang for aiohttp's default minute.
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0
#: A body for a generic app; the source's REST API passes its own (a full batch of JSON values).
DEFAULT_MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class HttpLimits:
    """Deadlines and sizes of the guarded HTTP server; see the module docstring for the states."""

    #: The app's largest accepted body in bytes: a larger ``Content-Length`` gets 413 at once.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: From the first byte of a request until the end of its header block (else 408 and close).
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    #: From the end of the headers until ``Content-Length`` bytes have arrived (else close).
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    #: A connection with no request in progress, also before its first (aiohttp's keep-alive).
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    #: Open connections; one more is answered 503 and closed.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Size of a request's header block, request line included (else 431 and close).
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    #: Longest a connection being closed for a limit keeps its socket (also TLS shutdown).
    close_linger_s: float = DEFAULT_CLOSE_LINGER_S
    #: How long ``GuardedHttpServer.close()`` waits for requests in flight.
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s", "close_linger_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise RocoinError(f"http limits: {name} = {value!r}: expected a positive number of seconds")
        for name, least in (("max_connections", 1), ("max_header_bytes", 64), ("max_body_bytes", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise RocoinError(f"http limits: {name} = {value!r}: expected an integer >= {least}")
