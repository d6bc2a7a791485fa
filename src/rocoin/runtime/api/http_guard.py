"""Serve an aiohttp app with connection, header and body deadlines that aiohttp itself lacks.

aiohttp's server has one timer per connection: ``keepalive_timeout``, which closes a connection
that waits for its next request. It has no deadline for a request that has *started*: a client
that sends one header line every few seconds (slowloris), or finishes its headers and trickles
the body, holds its socket and its handler for as long as it likes, and a request that claims a
50 GB ``Content-Length`` is only refused when the app reads its body. A probe held 700 sockets
open for 100 s that way. aiohttp's HTTP parser is not pluggable, so the deadlines live *below*
it: :func:`serve_app` listens with :meth:`asyncio.loop.create_server` and a protocol of its own,
:class:`_GuardedConnection`, that sees the raw byte stream (plaintext: asyncio's TLS layer sits
under it), frames the requests itself and forwards the bytes, unchanged, to the aiohttp
``RequestHandler`` that it wraps.

Per connection the wrapper is in one of four states:

* ``IDLE`` — no request in progress. Blank lines between requests are dropped (aiohttp skips
  them too). aiohttp's own keep-alive timer (``HttpLimits.idle_timeout_s``) closes the
  connection when it stays here too long; in aiohttp 3.14 that timer also runs from the moment
  the connection is made, so a client that connects and sends nothing is covered. aiohttp only
  sees a request once its header block is complete, so its timer keeps running through
  ``HEADERS``: a connection must deliver a complete header block within ``idle_timeout_s`` of
  becoming idle (connect, or the end of the last response) *and* within ``header_timeout_s`` of
  its first byte, whichever ends first; the idle deadline closes silently (no 408), as plain
  aiohttp does.
* ``HEADERS`` — from the first byte of a request: the header block is buffered (not forwarded)
  until ``\\r\\n\\r\\n``, under ``header_timeout_s`` (else ``408``) and ``max_header_bytes``
  (else ``431``). The complete block is checked for ``Transfer-Encoding`` (``411``: this API
  needs ``Content-Length``), a ``Content-Length`` that is not one decimal number (``400``) or
  one above ``max_body_bytes`` (``413``, before a byte of the body is read); a good block is
  forwarded to aiohttp in one piece.
* ``BODY`` — ``Content-Length`` bytes are forwarded as they come, under ``body_timeout_s``
  (else the connection is closed: aiohttp's handler sees the connection lost). Bytes after the
  body start the next request (keep-alive and pipelining; one read may hold several requests).
* ``CLOSING`` — the connection is being closed for a limit; further input is dropped, and
  the transport is aborted after ``close_linger_s`` if it is not closed by then.

A connection beyond ``max_connections`` is answered ``503`` and closed before aiohttp sees it.

The wrapper's refusals (408, 411, 413, 431, 400) are written *by aiohttp*, not onto the socket
directly: with pipelining, aiohttp may still owe the responses to earlier requests, and a
refusal written first would be read as the answer to one of those. So the wrapper forwards a
small marker request (a random per-refusal token in a header) instead of the refused one, and
:class:`GuardedHttpServer` answers that marker ahead of the app's middlewares with
``{"error": "..."}`` and ``Connection: close``; aiohttp then writes it after the earlier
responses and closes the connection. The app's ``on_response_prepare`` signal sees these
responses (the rocoin API uses no such signal). When the wrapper closes a connection for its
body deadline, the app's body read fails with a ``ConnectionError``; :meth:`_dispatch` swallows
it for that connection only, so aiohttp does not log an ERROR traceback per slow client.

Not covered: a client that sends its request and never reads the response (aiohttp's write
waits for the socket to drain, unbounded; the rocoin API's responses are small enough to fit in
the socket buffers), and TLS handshakes in progress, which are bounded in time
(``ssl_handshake_timeout`` = ``header_timeout_s``) but not counted in ``max_connections``
(asyncio calls the protocol only after the handshake).

What this relies on in aiohttp (3.14; checked by ``tests/test_http_guard.py``):
``AppRunner.server`` is a ``web.Server`` whose call returns a ``RequestHandler`` (an
``asyncio.Protocol``); each ``RequestHandler`` copies ``Server.request_handler`` when it is
created (so replacing that attribute after ``runner.setup()`` routes every request through
:meth:`GuardedHttpServer._dispatch`); the keep-alive timer starts at ``connection_made``; the
handler pauses the *transport* (``transport.pause_reading()``) for back-pressure, which the
deadlines here sample with ``transport.is_reading()`` and do not count against the client;
``request.protocol`` is the ``RequestHandler`` that parsed the request; and ``runner.cleanup()``
closes the transports of the handlers it knows. No ``WebSocket`` or other protocol upgrade is
supported: after a ``101`` the wrapper would still read the stream as HTTP requests (the rocoin
API has no upgrade endpoint).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import secrets
import sys
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from rocoin.contracts.errors import RocoinError
from rocoin.runtime.api.http_limits import HttpLimits

logger = logging.getLogger(__name__)

#: A header or body deadline checks 8 times per period whether aiohttp holds the socket paused
#: (back-pressure: the app has not read what arrived) and credits that time to the client, so a
#: slow app is not taken for a slow client; within 1/8 of the period, and cheap (a request that
#: is read within 1/8 of its deadline never wakes a timer).
DEADLINE_CHECKS_PER_PERIOD = 8
#: Pending connections the kernel queues before ``accept`` (aiohttp's TCPSite uses 128); those
#: beyond ``max_connections`` are answered 503 anyway, so this only absorbs bursts.
LISTEN_BACKLOG = 128

#: The reasons a connection is closed for a limit: the keys of ``closed_for_limit``.
LIMIT_REASONS = (
    "header_timeout",
    "body_timeout",
    "max_connections",
    "max_header_bytes",
    "max_body_bytes",
    "length_required",
    "bad_content_length",
)

_END_OF_HEADERS = b"\r\n\r\n"
_BLANK = b"\r\n"
_MARKER_HEADER = "X-Rocoin-Http-Guard-Refusal"
#: A Content-Length with more significant digits than this is above any max_body_bytes (and
#: int() of a very long digit string is slow, or refused by Python's digit limit).
_MAX_LENGTH_DIGITS = 18


def _nothing() -> None:
    pass


class _State(enum.Enum):
    IDLE = "idle"
    HEADERS = "headers"
    BODY = "body"
    CLOSING = "closing"


class _Refusal(Exception):
    """A request the wrapper answers itself; raised while checking a header block."""

    def __init__(self, reason: str, status: int, message: str) -> None:
        super().__init__(message)
        self.reason, self.status, self.message = reason, status, message


def _raw_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 error response, for the one case aiohttp never sees (503)."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedHttpServer:
    """A listening aiohttp app behind :class:`_GuardedConnection`; made by :func:`serve_app`.

    ``closed_for_limit`` counts connections closed per reason (:data:`LIMIT_REASONS`) so that
    the caller can export it as a metric; idle connections closed by aiohttp's keep-alive timer
    are not counted (that is ordinary keep-alive housekeeping, and aiohttp does not tell).
    """

    def __init__(self, runner: web.AppRunner, limits: HttpLimits) -> None:
        self.limits = limits
        self.address = ""
        self.port = 0
        self.closed_for_limit: dict[str, int] = dict.fromkeys(LIMIT_REASONS, 0)
        self._runner = runner
        self._web_server: web.Server = runner.server
        self._app_handler = self._web_server.request_handler
        self._web_server.request_handler = self._dispatch
        self._listener: asyncio.AbstractServer | None = None
        self._connections: set[_GuardedConnection] = set()
        self._by_handler: dict[Any, _GuardedConnection] = {}  # aiohttp's RequestHandler -> its wrapper
        self._all_gone = asyncio.Event()
        self._all_gone.set()
        self._refusals: dict[str, tuple[int, str]] = {}
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Admitted connections not yet closed (those refused with 503 are not counted)."""
        return len(self._connections)

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish (``shutdown_timeout_s``), close the rest."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.close()
        await self._runner.cleanup()
        for connection in list(self._connections):
            connection.close()
        try:
            await asyncio.wait_for(self._all_gone.wait(), self.limits.close_linger_s)
        except asyncio.TimeoutError:
            for connection in list(self._connections):
                connection.abort()
            await asyncio.sleep(0)
        if self._listener is not None:
            await self._listener.wait_closed()

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer the wrapper's marker requests with their refusal; pass the rest to the app.

        When the wrapper closed the connection for its body deadline, the app's body read fails
        with a ``ConnectionError`` that aiohttp would log at ERROR with a traceback, once per
        slow client; the wrapper has logged its one line already, and nobody is left to answer.
        """
        token = request.headers.get(_MARKER_HEADER)
        refusal = self._refusals.pop(token, None) if token is not None else None
        if refusal is None:
            connection = self._by_handler.get(request.protocol)
            try:
                return await self._app_handler(request)
            except ConnectionError:
                if connection is None or connection.closed_for is None:
                    raise
                return web.Response(status=408)  # never written: aiohttp finds the transport gone
        status, message = refusal
        response = web.json_response({"error": message}, status=status)
        response.force_close()
        return response

    def _admit(self, connection: _GuardedConnection) -> bool:
        if self._closed or len(self._connections) >= self.limits.max_connections:
            return False
        self._connections.add(connection)
        self._all_gone.clear()
        return True

    def _release(self, connection: _GuardedConnection) -> None:
        self._connections.discard(connection)
        self._by_handler.pop(connection._inner, None)
        if not self._connections:
            self._all_gone.set()

    def _note(self, reason: str, peer: Any, detail: str) -> None:
        # DEBUG, not INFO: a slowloris or a flood produces one such line per socket (hundreds a
        # minute); the counters are the operator's signal, the line is for debugging one client.
        self.closed_for_limit[reason] += 1
        logger.debug("http connection from %s closed for %s: %s", peer, reason, detail)


class _GuardedConnection(asyncio.Protocol):
    """One connection: frames requests on the raw stream, enforces the limits, feeds aiohttp."""

    def __init__(self, server: GuardedHttpServer) -> None:
        self._server = server
        self._limits = server.limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._inner: Any = None  # aiohttp's RequestHandler, once admitted
        self._state = _State.IDLE
        self._head = bytearray()  # a header block that has not ended yet
        self._remaining = 0  # body bytes still to forward
        self._deadline: asyncio.TimerHandle | None = None  # the next check of the deadline
        self._due = 0.0  # loop time when the deadline ends, pushed back while aiohttp pauses reading
        self._tick = 0.0
        self._expire: Callable[[], None] = _nothing
        self._backstop: asyncio.TimerHandle | None = None
        self._token: str | None = None
        self._peer: Any = None
        self.closed_for: str | None = None  # the reason, once closing for a limit

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._peer = transport.get_extra_info("peername")
        if not self._server._admit(self):
            message = f"too many open connections (max_connections = {self._limits.max_connections}); retry later"
            transport.write(_raw_response(503, message))  # type: ignore[attr-defined]
            self._enter_closing("max_connections", message)
            transport.close()
            return
        self._inner = self._server._web_server()
        self._server._by_handler[self._inner] = self
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._state is _State.CLOSING or self._inner is None:
            return
        out: list[bytes] = []
        try:
            self._frame(data, out)
        except _Refusal as refusal:
            out.append(self._refuse(refusal))
        if out:
            self._inner.data_received(out[0] if len(out) == 1 else b"".join(out))

    def eof_received(self) -> bool | None:
        if self._inner is None:
            return None
        if self._state is _State.CLOSING and self._token is not None and self._transport.get_extra_info("sslcontext") is None:
            return True  # keep the socket open for aiohttp to write the refusal, then it closes
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        if self._backstop is not None:
            self._backstop.cancel()
            self._backstop = None
        if self._token is not None:
            self._server._refusals.pop(self._token, None)
        if self._inner is not None:
            self._server._release(self)
            self._inner.connection_lost(exc)
        self._transport = None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- used by GuardedHttpServer.close() ----------------------------------------------------

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- framing ----------------------------------------------------------------------------

    def _frame(self, data: bytes, out: list[bytes]) -> None:
        """Walk ``data`` through the states, appending what aiohttp should see to ``out``."""
        limits = self._limits
        pos, end = 0, len(data)
        while pos < end:
            if self._state is _State.IDLE:
                while pos < end and data[pos] in _BLANK:
                    pos += 1
                if pos == end:
                    return
                self._state = _State.HEADERS
                self._arm(limits.header_timeout_s, self._header_timeout)
            if self._state is _State.HEADERS:
                if self._head:  # continues a block from an earlier read
                    start = max(0, len(self._head) - 3)
                    self._head += data[pos:]
                    stop = self._head.find(_END_OF_HEADERS, start, limits.max_header_bytes)
                    if stop < 0:
                        if len(self._head) >= limits.max_header_bytes:
                            raise self._too_many_header_bytes()
                        return
                    block = bytes(self._head[: stop + 4])
                    data, pos, end = bytes(self._head[stop + 4 :]), 0, len(self._head) - stop - 4
                    self._head.clear()
                else:
                    stop = data.find(_END_OF_HEADERS, pos, pos + limits.max_header_bytes)
                    if stop < 0:
                        if end - pos >= limits.max_header_bytes:
                            raise self._too_many_header_bytes()
                        self._head += data[pos:]
                        return
                    block, pos = data[pos : stop + 4], stop + 4
                length = self._body_length(block)
                out.append(block)
                if length:
                    self._state, self._remaining = _State.BODY, length
                    self._arm(limits.body_timeout_s, self._body_timeout)
                else:
                    self._state = _State.IDLE
                    self._cancel_deadline()
            else:  # BODY
                take = min(self._remaining, end - pos)
                out.append(data if take == end and pos == 0 else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _State.IDLE
                    self._cancel_deadline()

    def _body_length(self, block: bytes) -> int:
        """The body length that a header block announces, or a :class:`_Refusal`.

        Header names are matched leniently (case and surrounding blanks ignored), so that the
        wrapper never misses a length that aiohttp's stricter parser would honour.
        """
        limits = self._limits
        lengths: list[bytes] = []
        for line in block[:-4].split(b"\r\n")[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                continue  # not a header field; aiohttp answers 400
            name = name.strip().lower()
            if name == b"transfer-encoding":
                raise _Refusal(
                    "length_required",
                    411,
                    f"Transfer-Encoding is not accepted: send the request body with a Content-Length header "
                    f"(at most max_body_bytes = {limits.max_body_bytes} bytes)",
                )
            if name == b"content-length":
                lengths.append(value.strip())
        if not lengths:
            return 0
        if len(lengths) > 1 or not lengths[0].isdigit():
            shown = b", ".join(lengths).decode("latin-1")[:40]
            raise _Refusal("bad_content_length", 400, f"Content-Length = {shown!r}: expected one decimal number of bytes")
        digits = lengths[0].lstrip(b"0") or b"0"
        length = int(digits) if len(digits) <= _MAX_LENGTH_DIGITS else limits.max_body_bytes + 1
        if length > limits.max_body_bytes:
            shown = length if len(digits) <= _MAX_LENGTH_DIGITS else f"a {len(digits)}-digit number of"
            raise _Refusal(
                "max_body_bytes",
                413,
                f"request body too large: {shown} bytes (Content-Length), at most max_body_bytes = {limits.max_body_bytes}",
            )
        return length

    def _too_many_header_bytes(self) -> _Refusal:
        return _Refusal(
            "max_header_bytes", 431, f"request header block is larger than max_header_bytes = {self._limits.max_header_bytes} bytes"
        )

    # -- limits -----------------------------------------------------------------------------

    def _arm(self, seconds: float, expire: Callable[[], None]) -> None:
        """Call ``expire`` after ``seconds`` of the client's time (see :meth:`_check_deadline`)."""
        self._cancel_deadline()
        self._due = self._loop.time() + seconds
        self._tick = seconds / DEADLINE_CHECKS_PER_PERIOD
        self._expire = expire
        self._deadline = self._loop.call_later(self._tick, self._check_deadline)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _check_deadline(self) -> None:
        """Expire the deadline, or push it back by the time aiohttp held the socket paused.

        aiohttp pauses the transport while the app has not consumed what arrived (a body it
        reads late, many pipelined requests); no byte can arrive then, whatever the client
        does. asyncio reports no pause or resume to the protocol, so the deadline samples
        ``transport.is_reading()`` every ``1/DEADLINE_CHECKS_PER_PERIOD`` of its period and
        credits each tick found paused to the client.
        """
        self._deadline = None
        transport = self._transport
        if transport is not None and not transport.is_closing() and not transport.is_reading():
            self._due += self._tick
        left = self._due - self._loop.time()
        if left > 0:
            self._deadline = self._loop.call_later(min(self._tick, left), self._check_deadline)
        else:
            self._expire()

    def _header_timeout(self) -> None:
        if self._state is not _State.HEADERS:
            return
        message = f"request headers not complete within header_timeout_s = {self._limits.header_timeout_s} s"
        self._inner.data_received(self._refuse(_Refusal("header_timeout", 408, message)))

    def _body_timeout(self) -> None:
        if self._state is not _State.BODY:
            return
        self._enter_closing(
            "body_timeout",
            f"request body not complete within body_timeout_s = {self._limits.body_timeout_s} s ({self._remaining} bytes missing)",
        )
        self._transport.close()

    def _refuse(self, refusal: _Refusal) -> bytes:
        """Close for ``refusal``; returns the marker request that has aiohttp write the answer."""
        self._enter_closing(refusal.reason, refusal.message)
        self._token = secrets.token_hex(16)
        self._server._refusals[self._token] = (refusal.status, refusal.message)
        return (
            f"GET /.rocoin-http-guard HTTP/1.1\r\nHost: rocoin-http-guard\r\nConnection: close\r\n{_MARKER_HEADER}: {self._token}\r\n\r\n"
        ).encode("ascii")

    def _enter_closing(self, reason: str, detail: str) -> None:
        self._state = _State.CLOSING
        self.closed_for = reason
        self._cancel_deadline()
        self._head.clear()
        self._server._note(reason, self._peer, detail)
        self._backstop = self._loop.call_later(self._limits.close_linger_s, self.abort)


async def serve_app(app: web.Application, host: str, port: int, *, limits: HttpLimits, ssl_context=None) -> GuardedHttpServer:
    """Serve ``app`` on ``host:port`` (port 0: any free one) under ``limits``, with TLS if given.

    Replaces ``web.AppRunner`` + ``web.TCPSite``: aiohttp offers no header or body deadline, so
    the listening socket gets :class:`_GuardedConnection` in front of aiohttp's handler.
    """
    runner = web.AppRunner(
        app,
        access_log=None,
        keepalive_timeout=limits.idle_timeout_s,
        shutdown_timeout=limits.shutdown_timeout_s,
        # One header limit, ours (431): aiohttp's per-line limits (8190) would answer 400 first.
        max_line_size=limits.max_header_bytes,
        max_field_size=limits.max_header_bytes,
    )
    await runner.setup()
    server = GuardedHttpServer(runner, limits)
    options: dict[str, Any] = {"backlog": LISTEN_BACKLOG}
    if ssl_context is not None:
        # The TLS handshake happens before the wrapper sees a byte: bound it like a header block.
        options.update(ssl=ssl_context, ssl_handshake_timeout=limits.header_timeout_s)
        if sys.version_info >= (3, 11):
            options["ssl_shutdown_timeout"] = limits.close_linger_s
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        listener = await asyncio.get_running_loop().create_server(lambda: _GuardedConnection(server), host, port, **options)
    except OSError as exc:
        await runner.cleanup()
        raise RocoinError(f"http-listen = {listen!r}: cannot bind ({exc.strerror or exc})") from None
    server._listener = listener
    server.port = listener.sockets[0].getsockname()[1]
    server.address = f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"
    return server
