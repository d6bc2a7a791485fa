"""The one client rocoin ships: send images to a source (``rocoin.v1.Source`` over gRPC, or the
KServe v2 REST API), measure accuracy and latency. ``rocoin infer``, the demo and the benchmarks
use it.

Failures come as rocoin's error types: a request the source refused (HTTP 4xx, gRPC
``INVALID_ARGUMENT``) is a :class:`RocoinError`; a source that cannot be reached, is not ready or
did not answer in time is an :class:`UnavailableError`; one that failed a valid request (HTTP
500, ``INTERNAL``) a :class:`ServingError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import numpy as np

from rocoin.contracts.errors import RocoinError, ServingError, UnavailableError
from rocoin.contracts.text import one_line
from rocoin.runtime.api.binary_tensors import HEADER as BINARY_HEADER
from rocoin.runtime.api.binary_tensors import decode_response, encode_request
from rocoin.runtime.transport.protocol import rocoin_pb2, rocoin_pb2_grpc
from rocoin.runtime.transport.serde import tensor_from_proto, tensor_to_proto

#: Client-side limit on one call, beyond the source's own deadline.
CALL_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


#: ``ask(image) -> (prediction, missing groups, source latency s)`` for one (1, C, H, W) image.
Ask = Callable[[np.ndarray], Awaitable[tuple[int, int, float]]]


async def _drive(ask: Ask, images: np.ndarray, labels: np.ndarray | None, concurrency: int) -> dict:
    """Send each image through ``ask``, ``concurrency`` at a time; summarise what came back."""
    latencies = np.zeros(len(images))
    source_latencies = np.zeros(len(images))
    predictions = np.zeros(len(images), dtype=np.int64)
    missing = np.zeros(len(images), dtype=np.int64)

    async def one(i: int) -> None:
        started = time.perf_counter()
        predictions[i], missing[i], source_latencies[i] = await ask(np.asarray(images[i : i + 1]))
        latencies[i] = time.perf_counter() - started

    elapsed = await for_each(range(len(images)), concurrency, one)
    return _summary(latencies, source_latencies, predictions, missing, labels, elapsed)


async def run_queries(
    address: str,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    concurrency: int = 1,
    deadline_s: float = 0.0,
) -> dict:
    """Send each image as one query, ``concurrency`` at a time; summarise what came back."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = rocoin_pb2_grpc.SourceStub(channel)

        async def ask(image: np.ndarray) -> tuple[int, int, float]:
            request = rocoin_pb2.SourceInferRequest(query_id=uuid.uuid4().hex[:16], input=tensor_to_proto(image), deadline_s=deadline_s)
            try:
                reply = await stub.Infer(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                raise _grpc_error(address, exc) from None
            prediction = int(tensor_from_proto(reply.logits, max_bytes=MAX_MESSAGE_BYTES).argmax(axis=1)[0])
            return prediction, len(reply.missing_groups), reply.latency_s

        return await _drive(ask, images, labels, concurrency)


async def run_queries_http(
    url: str,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    concurrency: int = 1,
    token: str | None = None,
    model: str = "rocoin",
    binary: bool = True,
) -> dict:
    """The same as :func:`run_queries`, over the KServe v2 REST API at ``url`` (http://host:port);
    ``binary``: tensors as binary data (see :func:`http_infer`), else as JSON."""
    async with http_infer(url, token=token, model=model, binary=binary) as infer:

        async def ask(image: np.ndarray) -> tuple[int, int, float]:
            answer = await infer(image)
            return answer.prediction, len(answer.missing_groups), answer.latency_s

        return await _drive(ask, images, labels, concurrency)


@dataclass(frozen=True)
class Answer:
    """One query's answer: the predicted class, the groups that did not answer, the source's latency;
    from a detection bundle ``prediction`` is -1 and ``detections`` holds the image's boxes (n, 4)
    xyxy pixels, scores (n,) and labels (n,) (the first ``count`` rows of the fixed-size outputs)."""

    prediction: int
    missing_groups: tuple[int, ...]
    latency_s: float
    detections: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


#: ``infer(image, query_id=None) -> Answer`` for one (1, C, H, W) image.
Infer = Callable[..., Awaitable[Answer]]


@asynccontextmanager
async def http_infer(url: str, *, token: str | None = None, model: str = "rocoin", binary: bool = True) -> AsyncIterator[Infer]:
    """A session with the KServe v2 REST API at ``url``: yields ``infer(image, query_id=None)``,
    one ``POST /v2/models/MODEL/infer`` per call (errors: see the module docstring). ``binary``:
    the image and the outputs travel as binary tensors (Triton's binary tensor data extension,
    what ``tritonclient.http`` does by default: ~3x fewer bytes and no JSON numbers to print or
    parse); else as JSON ``data``."""
    import aiohttp

    endpoint = f"{url.rstrip('/')}/v2/models/{model}/infer"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:

        async def infer(image: np.ndarray, query_id: str | None = None) -> Answer:
            query_id = query_id or uuid.uuid4().hex[:16]
            body, body_headers = encode_request(image, query_id=query_id, binary_input=binary, binary_output=binary)
            try:
                async with session.post(endpoint, data=body, headers=body_headers) as response:
                    raw = await response.read()
                    json_length = response.headers.get(BINARY_HEADER)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise UnavailableError(f"{endpoint}: query {query_id} got no answer ({type(exc).__name__}: {exc})") from None
            if response.status != 200:
                raise _http_error(endpoint, response.status, _json_or_text(raw))
            try:
                reply, outputs = decode_response(raw, json_length)
                latency_s = float(reply["parameters"]["latency_s"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ServingError(f"{endpoint}: query {query_id}: malformed answer ({one_line(str(exc), 200)})") from None
            missing = tuple(int(k) for k in outputs["missing_groups"].ravel()) if "missing_groups" in outputs else ()
            if "logits" not in outputs:  # a detection bundle: the image's first `count` rows
                count = int(outputs["count"].ravel()[0])
                found = (
                    outputs["boxes"][0][:count].astype(np.float32),
                    outputs["scores"][0][:count].astype(np.float32),
                    outputs["labels"][0][:count].astype(np.int64),
                )
                return Answer(-1, missing, latency_s, found)
            return Answer(int(outputs["logits"].argmax(axis=1)[0]), missing, latency_s)

        yield infer


def _json_or_text(raw: bytes) -> object:
    import json

    try:
        return json.loads(raw)
    except ValueError:
        return raw[:300].decode("utf-8", "replace")


async def for_each(indices: Iterable[int], concurrency: int, call: Callable[[int], Awaitable[None]]) -> float:
    """Await ``call(i)`` for every index in order, ``concurrency`` at a time; the wall seconds taken."""
    if concurrency < 1:
        raise RocoinError(f"concurrency = {concurrency}: expected at least 1")
    queue = iter(indices)

    async def worker() -> None:
        for i in queue:
            await call(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


#: gRPC codes that mean the request itself was refused, and those that mean the source was not there.
_REFUSED_CODES = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)
_UNAVAILABLE_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
)


def _grpc_error(address: str, exc: grpc.aio.AioRpcError) -> Exception:
    message = f"{address}: {exc.code().name}: {exc.details()}"
    if exc.code() in _REFUSED_CODES:
        return RocoinError(message)
    return UnavailableError(message) if exc.code() in _UNAVAILABLE_CODES else ServingError(message)


def _http_error(endpoint: str, status: int, reply: object) -> Exception:
    detail = reply.get("error", reply) if isinstance(reply, dict) else reply
    message = f"{endpoint}: HTTP {status}: {detail}"
    if status < 500:
        return RocoinError(message)
    return UnavailableError(message) if status == 503 else ServingError(message)


def _summary(latencies, source_latencies, predictions, missing, labels, elapsed: float) -> dict:
    report = {
        "queries": len(latencies),
        "latency_s": {
            "mean": float(latencies.mean()),
            "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)),
        },
        "source_latency_s": {"p50": float(np.percentile(source_latencies, 50)), "p99": float(np.percentile(source_latencies, 99))},
        "queries_per_s": len(latencies) / elapsed,
        "queries_with_missing_groups": int((missing > 0).sum()),
        "missing_groups_mean": float(missing.mean()),
    }
    if labels is not None:
        report["accuracy"] = float((predictions == np.asarray(labels)).mean())
    return report


#: Longest fleet status document the client reads.
MAX_STATUS_BYTES = 16 * 1024 * 1024


def fetch_fleet_status(url: str, *, token: str | None = None, timeout_s: float = 10.0) -> dict:
    """``GET /v2/fleet`` of the source's REST API at ``url`` (``http[s]://host:port`` or
    ``host:port``): the membership and the device-to-group assignment."""
    return _fleet_request(url, "/v2/fleet", "GET", token=token, timeout_s=timeout_s)


def forget_member(url: str, device_id: str, *, reason: str | None = None, token: str | None = None, timeout_s: float = 10.0) -> dict:
    """``DELETE /v2/fleet/members/{device_id}``: the source forgets a gone device and the binding
    of its id to its credential (a device replaced, its key lost). Returns the member as it was;
    a device still in the fleet, or one the source dials, is a :class:`RocoinError` (HTTP 409)."""
    import urllib.parse

    path = _member_path(device_id)
    if reason:
        path += "?" + urllib.parse.urlencode({"reason": reason})
    return _fleet_request(url, path, "DELETE", token=token, timeout_s=timeout_s)["forgotten"]


def drain_member(url: str, device_id: str, *, token: str | None = None, timeout_s: float = 60.0) -> dict:
    """``POST /v2/fleet/members/{device_id}/drain``: the source re-plans without a joined device
    (before its maintenance) and keeps it as a spare until it joins again. Returns the re-plan's
    record; a device that cannot be drained is a :class:`RocoinError` (HTTP 409)."""
    path = _member_path(device_id) + "/drain"
    return _fleet_request(url, path, "POST", token=token, timeout_s=timeout_s)["replan"]


def _member_path(device_id: str) -> str:
    import urllib.parse

    return "/v2/fleet/members/" + urllib.parse.quote(device_id, safe="")


def _fleet_request(url: str, path: str, method: str, *, token: str | None, timeout_s: float) -> dict:
    """One JSON request to the source's REST API; errors as one line naming the endpoint."""
    import json
    import urllib.error
    import urllib.request

    base = url if "://" in url else f"http://{url}"
    endpoint = base.rstrip("/") + path
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(endpoint, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            body = reply.read(MAX_STATUS_BYTES + 1)
    except urllib.error.HTTPError as exc:
        detail = exc.read(2000).decode("utf-8", "replace")
        with contextlib.suppress(ValueError, TypeError, KeyError):
            detail = str(json.loads(detail)["error"])
        raise (RocoinError if exc.code < 500 else ServingError)(f"{endpoint}: HTTP {exc.code}: {one_line(detail, 300)}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UnavailableError(f"{endpoint}: cannot reach the source's REST API ({reason})") from None
    if len(body) > MAX_STATUS_BYTES:
        raise ServingError(f"{endpoint}: more than {MAX_STATUS_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise ServingError(f"{endpoint}: not JSON") from None
