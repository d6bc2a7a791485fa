"""The guarded HTTP server: header, body, idle and connection limits below aiohttp's parser.

Real sockets on 127.0.0.1 with raw HTTP/1.1 bytes, so each test controls exactly when which byte
is sent. Timeouts are fractions of a second and socket counts are small, so the file runs in a
few seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import socket
import ssl
import subprocess

import pytest

pytest.importorskip("aiohttp")

from aiohttp import web  # noqa: E402

from rocoin.contracts.errors import RocoinError  # noqa: E402
from rocoin.runtime.api.http_guard import LIMIT_REASONS, HttpLimits, serve_app  # noqa: E402

HEADER_S = 0.5
BODY_S = 0.5
IDLE_S = 0.6
LINGER_S = 0.5
#: Timers on a loaded 2-core machine fire late; a limit counts as enforced within this much more.
SLACK_S = 0.8
MAX_BODY = 5_000_000
LIMITS = HttpLimits(
    header_timeout_s=HEADER_S,
    body_timeout_s=BODY_S,
    idle_timeout_s=IDLE_S,
    max_connections=64,
    max_header_bytes=2048,
    max_body_bytes=MAX_BODY,
    close_linger_s=LINGER_S,
    shutdown_timeout_s=1.0,
)


def make_app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": "world"})

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"length": len(await request.read())})

    async def late_echo(request: web.Request) -> web.Response:
        # Starts reading after 1.2 deadlines, then reads slower than the client sends: the body
        # waits in aiohttp's buffers, which pause (and resume, and pause) the socket.
        await asyncio.sleep(1.2 * BODY_S)
        length = 0
        while chunk := await request.content.read(256 * 1024):
            length += len(chunk)
            await asyncio.sleep(0.05)
        return web.json_response({"length": length})

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_get("/hello", hello)
    app.router.add_post("/echo", echo)
    app.router.add_post("/late-echo", late_echo)
    return app


def serve(scenario, limits: HttpLimits = LIMITS, ssl_context=None):
    """Serve :func:`make_app` under ``limits``; run ``scenario(server)`` and close the server."""

    async def main():
        server = await serve_app(make_app(), "127.0.0.1", 0, limits=limits, ssl_context=ssl_context)
        try:
            return await scenario(server)
        finally:
            await server.close()

    return asyncio.run(main())


def get(path: str = "/hello") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


def post(body: bytes, path: str = "/echo") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: status, headers (lower-case), body."""
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, await reader.readexactly(int(headers.get("content-length", 0)))


async def read_to_close(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float]:
    """Everything until the server closes (EOF or reset), and the seconds that took."""
    loop = asyncio.get_running_loop()
    start, chunks = loop.time(), []

    async def drain():
        while chunk := await reader.read(65536):
            chunks.append(chunk)

    try:
        await asyncio.wait_for(drain(), within)
    except (ConnectionResetError, BrokenPipeError):
        pass
    return b"".join(chunks), loop.time() - start


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0


def error_of(response: bytes) -> str:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower() and b"connection: close" in head.lower(), head
    return json.loads(body)["error"]


async def connect(port: int, ssl_context=None):
    return await asyncio.open_connection("127.0.0.1", port, ssl=ssl_context)


async def exchange(port: int, raw: bytes, ssl_context=None) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await connect(port, ssl_context)
    writer.write(raw)
    try:
        return await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()


async def slowloris(port: int, ssl_context=None, lines_every_s: float = 0.1) -> tuple[bytes, float]:
    """A request line, then one header line every ``lines_every_s``, never the blank line."""
    reader, writer = await connect(port, ssl_context)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: test\r\n")

    async def drip():
        for n in range(1000):
            await asyncio.sleep(lines_every_s)
            if writer.is_closing():
                return
            writer.write(f"X-Slow-{n}: 1\r\n".encode())

    dripping = asyncio.create_task(drip())
    try:
        return await read_to_close(reader, HEADER_S + LINGER_S + 3)
    finally:
        dripping.cancel()
        writer.close()


async def until(condition, within: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


# ----------------------------------------------------------------------------- the limits


#: The idle deadline also bounds a header block (see test_the_idle_deadline_also_bounds_a_late_header_block);
#: tests of the header deadline move it out of the way.
HEADERS_ONLY = dataclasses.replace(LIMITS, idle_timeout_s=5.0)


def test_slowloris_sockets_get_408_and_are_closed_while_normal_requests_are_served():
    async def scenario(server):
        attackers = [asyncio.create_task(slowloris(server.port)) for _ in range(40)]
        await until(lambda: server.open_connections >= 40)
        await asyncio.sleep(0.2)
        normal = await exchange(server.port, get())
        outcomes = await asyncio.gather(*attackers)
        await until(lambda: server.open_connections == 0)
        return normal, outcomes, dict(server.closed_for_limit)

    normal, outcomes, closed = serve(scenario, HEADERS_ONLY)
    assert normal[0] == 200 and json.loads(normal[2]) == {"hello": "world"}
    for data, seconds in outcomes:
        assert status_of(data) == 408, data
        assert "header_timeout_s = 0.5" in error_of(data)
        assert HEADER_S - 0.05 <= seconds <= HEADER_S + SLACK_S
    assert closed["header_timeout"] == 40


def test_without_the_guard_a_slowloris_socket_stays_open():
    """The same slowloris against plain ``web.TCPSite``: still connected after the header timeout."""

    async def main():
        runner = web.AppRunner(make_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            attack = asyncio.create_task(slowloris(port))
            await asyncio.sleep(HEADER_S + SLACK_S)
            still_open = not attack.done()
            attack.cancel()
            return still_open
        finally:
            await runner.cleanup()

    assert asyncio.run(main())


def test_a_trickled_body_is_closed_at_the_body_timeout_and_a_prompt_one_is_served(caplog):
    caplog.set_level(logging.DEBUG, logger="rocoin.runtime.api.http_guard")

    async def scenario(server):
        reader, writer = await connect(server.port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n")

        async def trickle():
            for _ in range(100):
                await asyncio.sleep(0.1)
                if writer.is_closing():
                    return
                writer.write(b"x")

        trickling = asyncio.create_task(trickle())
        data, seconds = await read_to_close(reader, BODY_S + LINGER_S + 3)
        trickling.cancel()
        writer.close()

        reader, writer = await connect(server.port)  # a body in two parts, well within the deadline
        writer.write(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 6\r\n\r\nabc")
        await asyncio.sleep(BODY_S / 3)
        writer.write(b"def")
        prompt = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
        return data, seconds, prompt, server.closed_for_limit["body_timeout"]

    data, seconds, prompt, closed = serve(scenario)
    assert data == b""  # the handler never answered: it saw the connection lost
    assert BODY_S - 0.05 <= seconds <= BODY_S + SLACK_S
    assert closed == 1
    assert prompt[0] == 200 and json.loads(prompt[2]) == {"length": 6}
    # One DEBUG line from the guard, no traceback; nothing from aiohttp about the lost connection.
    lines = [r for r in caplog.records if r.name == "rocoin.runtime.api.http_guard"]
    assert len(lines) == 1 and "body_timeout" in lines[0].getMessage() and lines[0].exc_info is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_huge_content_length_gets_413_at_once_without_a_body():
    async def scenario(server):
        loop = asyncio.get_running_loop()
        reader, writer = await connect(server.port)
        start = loop.time()
        writer.write(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 50000000000\r\n\r\n")
        data, _ = await read_to_close(reader, 5)
        writer.close()
        return data, loop.time() - start, server.closed_for_limit["max_body_bytes"]

    data, seconds, closed = serve(scenario)
    assert status_of(data) == 413
    assert "50000000000" in error_of(data) and f"max_body_bytes = {MAX_BODY}" in error_of(data)
    assert seconds < 0.3
    assert closed == 1


def test_an_idle_connection_is_closed_after_the_idle_timeout():
    async def scenario(server):
        reader, writer = await connect(server.port)
        await until(lambda: server.open_connections == 1)
        _, silent = await read_to_close(reader, IDLE_S + 3)  # connected, never sent a byte
        writer.close()

        reader, writer = await connect(server.port)  # idle after one keep-alive request
        writer.write(get())
        status = (await read_response(reader))[0]
        _, after_request = await read_to_close(reader, IDLE_S + 3)
        writer.close()
        await until(lambda: server.open_connections == 0)
        return silent, status, after_request

    silent, status, after_request = serve(scenario)
    assert IDLE_S - 0.05 <= silent <= IDLE_S + SLACK_S
    assert status == 200
    assert IDLE_S - 0.05 <= after_request <= IDLE_S + SLACK_S


def test_the_idle_deadline_also_bounds_a_late_header_block():
    """aiohttp's keep-alive timer runs until a header block is complete: a request that starts
    just before the idle deadline is cut there (no 408), as with plain aiohttp."""

    async def scenario(server):
        loop = asyncio.get_running_loop()
        start = loop.time()
        reader, writer = await connect(server.port)
        await asyncio.sleep(IDLE_S - 0.2)
        writer.write(b"GET /hello HTTP/1.1\r\n")  # the header deadline would end at IDLE_S + 0.3
        data, _ = await read_to_close(reader, 3)
        writer.close()
        return data, loop.time() - start, server.closed_for_limit["header_timeout"]

    data, seconds, header_timeouts = serve(scenario)
    assert data == b"" and header_timeouts == 0
    assert IDLE_S - 0.05 <= seconds <= IDLE_S + SLACK_S


def test_connections_beyond_the_limit_get_503_and_the_server_recovers():
    limits = dataclasses.replace(LIMITS, max_connections=4, idle_timeout_s=10.0)

    async def scenario(server):
        held = [await connect(server.port) for _ in range(4)]
        await until(lambda: server.open_connections == 4)
        extra = [await connect(server.port) for _ in range(5)]
        refused = [(await read_to_close(reader, 3))[0] for reader, _ in extra]
        for _, writer in extra:
            writer.close()
        for _, writer in held:
            writer.close()
        await until(lambda: server.open_connections == 0)
        after = await exchange(server.port, get())
        return refused, after, server.closed_for_limit["max_connections"]

    refused, after, closed = serve(scenario, limits)
    for data in refused:
        assert status_of(data) == 503 and "max_connections = 4" in error_of(data)
    assert closed == 5
    assert after[0] == 200


def test_keep_alive_and_pipelined_requests_are_all_answered():
    async def scenario(server):
        reader, writer = await connect(server.port)
        sequential = []
        for raw in (get(), post(b"0123456789")):
            writer.write(raw)
            sequential.append(await asyncio.wait_for(read_response(reader), 5))
        writer.write(get() + post(b"abc") + b"\r\n" + post(b"") + get())  # one send, with a stray blank line
        pipelined = [await asyncio.wait_for(read_response(reader), 5) for _ in range(4)]
        writer.write(post(b"xy")[:20])  # one request split over sends, in odd places
        await asyncio.sleep(0.05)
        writer.write(post(b"xy")[20:-1])
        await asyncio.sleep(0.05)
        writer.write(b"y")
        split = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
        return sequential, pipelined, split

    sequential, pipelined, split = serve(scenario)
    assert [(s, json.loads(b)) for s, _, b in sequential] == [(200, {"hello": "world"}), (200, {"length": 10})]
    assert [(s, json.loads(b)) for s, _, b in pipelined] == [
        (200, {"hello": "world"}),
        (200, {"length": 3}),
        (200, {"length": 0}),
        (200, {"hello": "world"}),
    ]
    assert split[0] == 200 and json.loads(split[2]) == {"length": 2}


def test_a_refusal_after_a_pipelined_request_comes_after_its_answer():
    async def scenario(server):
        reader, writer = await connect(server.port)
        writer.write(get() + b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 99999999\r\n\r\n")
        first = await asyncio.wait_for(read_response(reader), 5)
        rest, _ = await read_to_close(reader, 3)
        writer.close()
        return first, rest

    first, rest = serve(scenario)
    assert first[0] == 200 and json.loads(first[2]) == {"hello": "world"}
    assert status_of(rest) == 413


def test_a_chunked_body_gets_411():
    async def scenario(server):
        reader, writer = await connect(server.port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        data, _ = await read_to_close(reader, 3)
        writer.close()
        return data, server.closed_for_limit["length_required"]

    data, closed = serve(scenario)
    assert status_of(data) == 411 and "Content-Length" in error_of(data)
    assert closed == 1


def test_oversized_header_blocks_get_431():
    async def scenario(server):
        answers = []
        for raw in (
            b"GET /hello HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n",  # complete, too big
            b"GET /hello HTTP/1.1\r\nHost: test\r\n" + b"X-Many: 1\r\n" * 300,  # never ends
        ):
            reader, writer = await connect(server.port)
            writer.write(raw)
            answers.append((await read_to_close(reader, 3))[0])
            writer.close()
        return answers, server.closed_for_limit["max_header_bytes"]

    answers, closed = serve(scenario)
    for data in answers:
        assert status_of(data) == 431 and "max_header_bytes = 2048" in error_of(data)
    assert closed == 2


def test_bad_content_lengths_get_400():
    async def scenario(server):
        answers = []
        for lengths in (b"Content-Length: 3\r\nContent-Length: 3000000000000", b"Content-Length: -3", b"content-length : 1e9"):
            reader, writer = await connect(server.port)
            writer.write(b"POST /echo HTTP/1.1\r\nHost: test\r\n" + lengths + b"\r\n\r\nabc")
            answers.append((await read_to_close(reader, 3))[0])
            writer.close()
        return answers

    for data in serve(scenario):
        assert status_of(data) == 400 and "Content-Length" in error_of(data)


def test_a_body_held_back_by_a_slow_app_is_not_a_slow_client():
    """aiohttp pauses the socket while the app leaves the body unread; that is not the client's delay."""

    async def scenario(server):
        return await exchange(server.port, post(b"z" * 4_000_000, "/late-echo"))

    status, _, body = serve(scenario)
    assert status == 200 and json.loads(body) == {"length": 4_000_000}


# ----------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (server context, client context)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


def test_over_tls_requests_work_and_slowloris_is_closed(tls):
    server_context, client_context = tls

    async def scenario(server):
        normal = await exchange(server.port, get(), client_context)
        data, seconds = await slowloris(server.port, client_context)
        await until(lambda: server.open_connections == 0)
        return normal, data, seconds

    normal, data, seconds = serve(scenario, HEADERS_ONLY, ssl_context=server_context)
    assert normal[0] == 200 and json.loads(normal[2]) == {"hello": "world"}
    assert status_of(data) == 408
    assert HEADER_S - 0.05 <= seconds <= HEADER_S + SLACK_S


# ----------------------------------------------------------------------------- setup


def test_bad_limits_and_a_taken_port_are_one_line_errors():
    for bad in (
        {"header_timeout_s": 0},
        {"body_timeout_s": float("inf")},
        {"max_connections": True},
        {"max_header_bytes": 10},
        {"max_body_bytes": -1},
    ):
        with pytest.raises(RocoinError, match=f"^http limits: {next(iter(bad))} = "):
            HttpLimits(**{"max_body_bytes": 1, **bad})
    assert HttpLimits(max_body_bytes=1).header_timeout_s == 10

    async def main():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(RocoinError, match=f"http-listen = '127.0.0.1:{port}': cannot bind"):
                await serve_app(make_app(), "127.0.0.1", port, limits=LIMITS)

    asyncio.run(main())


def test_close_closes_open_connections_promptly():
    async def scenario():
        loop = asyncio.get_running_loop()
        server = await serve_app(make_app(), "127.0.0.1", 0, limits=HEADERS_ONLY)
        idle = await connect(server.port)
        partial = await connect(server.port)
        partial[1].write(b"GET /hello HTTP/1.1\r\nHost: te")
        body = await connect(server.port)
        body[1].write(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nabc")
        await until(lambda: server.open_connections == 3)
        await asyncio.sleep(0.05)
        start = loop.time()
        await server.close()
        seconds = loop.time() - start
        ends = [await read_to_close(reader, 3) for reader, _ in (idle, partial, body)]
        for _, writer in (idle, partial, body):
            writer.close()
        return seconds, server.open_connections, ends

    seconds, open_connections, ends = asyncio.run(scenario())
    # The request still receiving its body counts as in flight: close() lets it run, but no longer
    # than its body deadline (or shutdown_timeout_s).
    assert seconds < BODY_S + SLACK_S and open_connections == 0
    assert all(waited < 0.2 for _, waited in ends)


def test_the_server_reports_its_address_and_counts_every_reason():
    async def scenario(server):
        return server.address, server.port, server.open_connections, dict(server.closed_for_limit)

    address, port, open_connections, closed = serve(scenario)
    assert address == f"127.0.0.1:{port}" and port > 0
    assert open_connections == 0
    assert closed == dict.fromkeys(LIMIT_REASONS, 0)
