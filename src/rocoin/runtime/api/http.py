"""The source's HTTP/REST API: the Open Inference Protocol (KServe v2), so existing clients work.

Endpoints: ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{model}``,
``/v2/models/{model}/ready`` and ``POST /v2/models/{model}/infer`` with JSON tensors, or with
binary ones (Triton's binary tensor data extension, :mod:`rocoin.runtime.api.binary_tensors`:
what ``tritonclient.http`` sends and asks for by default). The infer answer carries the logits
and the number of missing groups (output ``missing_groups`` and the response ``parameters``);
the request's ``outputs`` choose which outputs come back, each as JSON or binary. Errors are a
4xx status with ``{"error": "..."}``.

Hardening: a malformed request gets a 4xx with one line (never a 500 and a traceback), logged as
one line; the JSON body's nesting is bounded (:data:`MAX_JSON_DEPTH`) before it is parsed; the
answer is strict JSON (never ``NaN``/``Infinity``). Connections are served through
:mod:`rocoin.runtime.api.http_guard` (header, body and idle timeouts, a connection limit, 413 for
an oversized ``Content-Length`` before the body is read).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import re
from typing import Any

import numpy as np
from aiohttp import web

from rocoin.contracts.errors import RocoinError, ServingError
from rocoin.contracts.text import one_line, short_repr
from rocoin.runtime.api.binary_tensors import HEADER as BINARY_HEADER
from rocoin.runtime.api.binary_tensors import binary_inputs, encode_response, requested_outputs, split_body
from rocoin.runtime.api.http_guard import GuardedHttpServer, serve_app
from rocoin.runtime.api.http_limits import HttpLimits
from rocoin.runtime.api.oip import (
    DATATYPES,
    INPUT_NAME,
    MODEL_NAME,
    MODEL_VERSION,
    ProtocolError,
    check_model,
    images_from,
    result_tensors,
    server_metadata,
    source_metadata,
)
from rocoin.runtime.source.source import MAX_BATCH, MembershipControl, Source
from rocoin.runtime.transport.auth import bearer_matches

logger = logging.getLogger(__name__)

#: JSON bodies above this many bytes get 413 (a JSON number takes a few bytes per value).
JSON_BYTES_PER_VALUE = 24
#: Room in the body for everything but the values (names, shape, id, parameters).
BODY_SLACK_BYTES = 64 * 1024
#: Deepest nesting of arrays/objects in a request body: an inference request needs
#: {inputs: [{data: [[[[...]]]]}]}, 3 levels + a 4-D nested batch, plus parameters.
MAX_JSON_DEPTH = 16
#: A JSON string (for the depth check, which must not count brackets inside strings).
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_strict_dumps = functools.partial(json.dumps, allow_nan=False)


RequestError = ProtocolError


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets in strings do not count)."""
    skeleton = _JSON_STRING.sub(b'""', body).translate(None, _NOT_BRACKETS)
    if not skeleton:
        return 0
    steps = np.frombuffer(skeleton, dtype=np.uint8)
    return int(np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1)).max())


def create_app(source: Source, *, token: str | None = None) -> web.Application:
    """The REST app; with ``token`` every endpoint but ``/v2/health/*`` needs ``Authorization: Bearer``."""
    middlewares = [_errors_as_json] + ([_bearer(token)] if token else [])
    app = web.Application(client_max_size=max_body_bytes(source), middlewares=middlewares)
    api = _Api(source)
    app.router.add_get("/v2/health/live", api.live)
    app.router.add_get("/v2/health/ready", api.ready)
    app.router.add_get("/v2", api.server_metadata)
    app.router.add_get("/v2/models/{model}", api.model_metadata)
    app.router.add_get("/v2/models/{model}/versions/{version}", api.model_metadata)
    app.router.add_get("/v2/models/{model}/ready", api.model_ready)
    app.router.add_post("/v2/models/{model}/infer", api.infer)
    app.router.add_post("/v2/models/{model}/versions/{version}/infer", api.infer)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/v2/fleet", api.fleet)
    app.router.add_delete("/v2/fleet/members/{device}", api.forget_member)
    app.router.add_post("/v2/fleet/members/{device}/drain", api.drain_member)
    return app


def max_body_bytes(source: Source) -> int:
    """The largest JSON body of a valid request: a full batch of values plus the envelope (a
    binary body of the same batch is smaller: at most 4 bytes per value)."""
    return MAX_BATCH * int(np.prod(source.input_shape)) * JSON_BYTES_PER_VALUE + BODY_SLACK_BYTES


@web.middleware
async def _errors_as_json(request: web.Request, handler) -> web.StreamResponse:
    """Every error as ``{"error": one line}``; client errors logged as one line, bugs with a traceback."""
    try:
        return await handler(request)
    except RequestError as exc:
        return _client_error(request, exc.status, str(exc))
    except web.HTTPRequestEntityTooLarge:
        return _client_error(request, 413, f"request body too large (at most {request.app._client_max_size} bytes)")
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _client_error(request, exc.status, exc.reason)
        raise
    except ServingError as exc:
        logger.error("REST %s %s: %s", request.method, one_line(request.path, 120), exc)
        return _error(500, str(exc))
    except (asyncio.CancelledError, ConnectionError):  # the client went away: nobody to answer
        raise
    except Exception:  # a bug: one traceback in the log, one line for the client
        logger.exception("REST %s %s: unexpected error", request.method, one_line(request.path, 120))
        return _error(500, "internal error (logged at the server)")


def _client_error(request: web.Request, status: int, message: str) -> web.Response:
    message = one_line(message)
    logger.info("REST %s %s -> %d: %s", request.method, one_line(request.path, 120), status, message)
    return _error(status, message)


def _bearer(token: str):
    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        if not request.path.startswith("/v2/health/") and not bearer_matches(request.headers.get("Authorization"), token):
            raise RequestError(401, "missing or wrong bearer token (send Authorization: Bearer <token>)")
        return await handler(request)

    return check


class _Api:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.output_names = [output["name"] for output in source_metadata(source)["outputs"]]

    def _check_model(self, request: web.Request) -> None:
        check_model(request.match_info["model"], request.match_info.get("version"))

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(self.source.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def fleet(self, request: web.Request) -> web.Response:
        """The membership and the device-to-group assignment (rocoin's extension of the API)."""
        return web.json_response(self.source.fleet_status(), dumps=_strict_dumps)

    def _membership(self) -> MembershipControl:
        if self.source.membership is None:
            raise RequestError(404, "this source keeps no membership (devices join with source serve --joins)")
        return self.source.membership

    async def forget_member(self, request: web.Request) -> web.Response:
        """``DELETE /v2/fleet/members/{device}[?reason=…]``: forget a gone device and the binding of
        its id to its credential (404 unknown, 409 still in the fleet or dialed)."""
        from rocoin.runtime.source.membership import MemberConflict

        membership = self._membership()
        reason = request.query.get("reason") or "forgotten by an operator"
        try:
            member = membership.forget(request.match_info["device"], reason)
        except LookupError as exc:
            raise RequestError(404, str(exc)) from None
        except MemberConflict as exc:
            raise RequestError(409, str(exc)) from None
        except RocoinError as exc:  # an id or reason the registry refuses
            raise RequestError(400, str(exc)) from None
        return web.json_response({"forgotten": member}, dumps=_strict_dumps)

    async def drain_member(self, request: web.Request) -> web.Response:
        """``POST /v2/fleet/members/{device}/drain``: re-plan without a joined device before its
        maintenance; it waits as a spare until it joins again (404 unknown, 409 when it cannot)."""
        from rocoin.runtime.source.membership import MemberConflict

        membership = self._membership()
        try:
            record = await membership.drain(request.match_info["device"])
        except LookupError as exc:
            raise RequestError(404, str(exc)) from None
        except MemberConflict as exc:
            raise RequestError(409, str(exc)) from None
        except RocoinError as exc:
            raise RequestError(400, str(exc)) from None
        return web.json_response({"drained": request.match_info["device"], "replan": record}, dumps=_strict_dumps)

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.source.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(server_metadata())

    async def model_metadata(self, request: web.Request) -> web.Response:
        self._check_model(request)
        metadata = source_metadata(self.source)
        metadata["parameters"] = {
            "class_names": self.source.manifest.class_names,
            "groups": self.source.num_groups,
            "input_datatypes": sorted(DATATYPES),
        }
        return web.json_response(metadata)

    async def model_ready(self, request: web.Request) -> web.Response:
        self._check_model(request)
        ready = self.source.ready
        return web.json_response({"name": MODEL_NAME, "ready": ready}, status=200 if ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        self._check_model(request)
        lengths = request.headers.getall(BINARY_HEADER, [])
        if len(lengths) > 1:
            raise RequestError(400, f"{BINARY_HEADER}: {len(lengths)} headers: expected one (the JSON header's length in bytes)")
        header_length = lengths[0] if lengths else None
        head, binary = split_body(await request.read(), header_length)
        body = _json_body(head, "request body" if binary is None else f"JSON header (the first {header_length.strip()} bytes)")
        images, query_id = _parse_infer(body, binary)
        wanted = requested_outputs(body, self.output_names)
        try:
            result = await self.source.infer(images, query_id=query_id)
        except RocoinError as exc:
            raise RequestError(400, str(exc)) from None
        tensors = {name: (datatype, array) for name, datatype, array in result_tensors(result)}
        envelope = {
            "model_name": MODEL_NAME,
            "model_version": MODEL_VERSION,
            "id": result.query_id,
            "parameters": {"missing_groups": len(result.missing_groups), "latency_s": result.latency_s},
        }
        payload, json_length = encode_response(envelope, [(name, *tensors[name], binary) for name, binary in wanted])
        if json_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream", headers={BINARY_HEADER: str(json_length)})


def _json_body(raw: bytes, what: str = "request body") -> Any:
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise RequestError(400, f"{what}: JSON nested {depth} levels deep: expected at most {MAX_JSON_DEPTH}")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, an integer of > 4300 digits
        raise RequestError(400, f"{what} is not valid JSON ({one_line(str(exc), 120)})") from None


def _parse_infer(body: Any, binary: memoryview | None = None) -> tuple[np.ndarray, str | None]:
    """The image batch and query id of a request; ``binary``: the bytes after its JSON header."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body: expected a JSON object with 'inputs'")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise RequestError(400, f"inputs: expected a list with one tensor named {INPUT_NAME!r}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise RequestError(400, "inputs[0]: expected an object {name, shape, datatype, data}")
    values = binary_inputs(inputs, binary)[0]
    if values is None:
        if "data" not in tensor:
            raise RequestError(
                400,
                f"inputs[0].data: missing: expected the values as JSON, or parameters.binary_data_size with the bytes after a JSON header ({BINARY_HEADER})",
            )
        try:
            values = np.asarray(tensor["data"], dtype=np.float64).ravel()
        except (TypeError, ValueError, OverflowError):
            raise RequestError(400, "inputs[0].data: expected numbers (flat or nested lists of equal lengths)") from None
    images = images_from(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), values)
    query_id = body.get("id")
    if query_id is not None and not isinstance(query_id, str):
        raise RequestError(400, f"id = {short_repr(query_id)}: expected a string")
    return images, query_id


async def start_http(
    source: Source, listen: str, *, token: str | None = None, ssl_context=None, limits: HttpLimits | None = None
) -> GuardedHttpServer:
    """Serve the REST API on ``listen`` (host:port, port 0 for any) within ``limits`` (their
    ``max_body_bytes`` is the API's own: a full batch of JSON values); stop it with ``.close()``."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise RocoinError(f"http-listen = {listen!r}: expected host:port with a port in 0..65535")
    limits = dataclasses.replace(limits or HttpLimits(), max_body_bytes=max_body_bytes(source))
    return await serve_app(create_app(source, token=token), host, int(port), limits=limits, ssl_context=ssl_context)
