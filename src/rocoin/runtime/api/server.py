"""The source's gRPC service (``rocoin.v1.Source``) in front of a :class:`~rocoin.runtime.source.source.Source`.

Every malformed request is answered ``INVALID_ARGUMENT`` with one line (and logged as one line,
no traceback); a fault on the serving side is ``INTERNAL`` with one line. The health service and
the KServe ``ServerLive``/``ServerReady`` calls stay open when the API needs a token, as the REST
API's ``/v2/health/*`` do.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rocoin.contracts.errors import RocoinError, ServingError
from rocoin.contracts.fileio import write_json_atomic
from rocoin.runtime.api import kserve_grpc
from rocoin.runtime.source.join_service import JoinService, check_join_limits
from rocoin.runtime.source.registry import DEFAULT_FORGET_AFTER_S
from rocoin.runtime.source.settings import DEFAULT_JOINS_PER_S, DEFAULT_MAX_JOIN_STREAMS, JOIN_BURST
from rocoin.runtime.source.source import Source
from rocoin.runtime.transport.auth import OPEN_METHOD_PREFIXES
from rocoin.runtime.transport.grpc_server import create_server, refuse
from rocoin.runtime.transport.lifecycle import stop_on_signals
from rocoin.runtime.transport.protocol import rocoin_pb2, rocoin_pb2_grpc
from rocoin.runtime.transport.serde import tensor_from_proto, tensor_to_proto
from rocoin.runtime.transport.tls import ServerTLS

if TYPE_CHECKING:  # the REST API needs aiohttp (the ``source`` extra); gRPC alone does not
    from rocoin.runtime.api.http_limits import HttpLimits

logger = logging.getLogger(__name__)

#: Seconds given to in-flight queries when the server stops.
SHUTDOWN_GRACE_S = 2.0
#: gRPC calls served at once; more are refused by grpcio with RESOURCE_EXHAUSTED. Dynamic batching
#: makes many queries in flight cheap (they share messages to the devices): a client may keep 128
#: in flight, as bench/runtime.py does.
MAX_CONCURRENT_QUERIES = 256
SERVICE_NAME = "rocoin.v1.Source"
#: Calls that need no API token: health, and the KServe liveness/readiness probes.
OPEN_API_METHODS = (*OPEN_METHOD_PREFIXES, *kserve_grpc.HEALTH_METHODS)


#: The Join service's methods: open to the API's token interceptor (the service checks the device token).
JOIN_PREFIX = "/rocoin.v1.Fleet/"


def _membership(source: Source, state_dir: str | Path | None, grace_s: float | None, forget_after_s: float):
    from rocoin.runtime.source.membership import Membership, check_forget_after_s
    from rocoin.runtime.source.registry import MembershipRegistry

    if state_dir is None:
        raise RocoinError("state-dir: required when devices join (the membership registry is kept there)")
    check_forget_after_s(forget_after_s)  # before the registry is opened
    registry = MembershipRegistry.open(state_dir, **({"grace_s": grace_s} if grace_s is not None else {}))
    restarted = registry.mark_all_suspect("the source restarted")  # they rejoin on their own, or are gone after the grace period
    if restarted:
        logger.info("membership: %d devices known from before; waiting for them to rejoin", len(restarted))
    membership = Membership(source, registry, forget_after_s=forget_after_s)
    source.membership = membership
    return membership


class SourceService(rocoin_pb2_grpc.SourceServicer):
    def __init__(self, source: Source) -> None:
        self.source = source

    async def Infer(self, request: rocoin_pb2.SourceInferRequest, context: grpc.aio.ServicerContext) -> rocoin_pb2.SourceInferResponse:
        try:
            images = tensor_from_proto(request.input, max_bytes=self.source.max_message_bytes)
            deadline = request.deadline_s if request.deadline_s != 0 else None  # 0 (unset): the source's
            result = await self.source.infer(images, deadline_s=deadline, query_id=request.query_id or None)
        except (ValueError, RocoinError) as exc:
            await refuse(context, "Infer", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ServingError as exc:
            await refuse(context, "Infer", grpc.StatusCode.INTERNAL, str(exc))
        return rocoin_pb2.SourceInferResponse(
            query_id=result.query_id,
            logits=tensor_to_proto(result.logits.astype("float32")),
            missing_groups=result.missing_groups,
            answered_by=result.answered_by,
            latency_s=result.latency_s,
        )


async def serve_source(
    source: Source,
    listen: str = "127.0.0.1:0",
    *,
    http_listen: str | None = None,
    api_token: str | None = None,
    tls: ServerTLS | None = None,
    ready_file: str | Path | None = None,
    stop: asyncio.Event | None = None,
    http_limits: HttpLimits | None = None,
    device_token: str | None = None,
    state_dir: str | Path | None = None,
    grace_s: float | None = None,
    forget_after_s: float = DEFAULT_FORGET_AFTER_S,
    max_joins_per_s: float = DEFAULT_JOINS_PER_S,
    join_burst: int = JOIN_BURST,
    max_join_streams: int = DEFAULT_MAX_JOIN_STREAMS,
) -> None:
    """Serve ``source`` over gRPC (and the KServe v2 REST API on ``http_listen``) until ``stop``
    is set or SIGTERM/SIGINT arrives. ``api_token`` guards both client APIs (health stays open);
    ``tls`` serves both over TLS (its ``client_ca``, for joining devices, makes every gRPC client
    present a certificate of that CA; REST clients present none and use ``api_token``); ``http_limits`` bounds the REST API's connections (default: ``HttpLimits`` defaults).

    When ``source.joins``, devices may dial the source (``rocoin.v1.Fleet/Join`` on the same
    port), admitted with ``device_token`` (or mTLS); their membership is kept in ``state_dir``
    (required) and a device is gone after ``grace_s`` without its stream, and forgotten (its id free
    again) ``forget_after_s`` later. At most
    ``max_joins_per_s`` joins a second (bursts of ``join_burst``) and ``max_join_streams`` join
    streams at once are admitted; more are refused with ``RESOURCE_EXHAUSTED`` (devices dial again)."""
    membership, joins = None, None
    if source.joins:
        names = ("max_joins_per_s", "join_burst", "max_join_streams")
        check_join_limits(max_joins_per_s, join_burst, max_join_streams, names)  # before the registry is opened
        membership = _membership(source, state_dir, grace_s, forget_after_s)
        joins = JoinService(
            membership, token=device_token, tls_client_auth=tls is not None and tls.client_ca is not None,
            max_joins_per_s=max_joins_per_s, join_burst=join_burst, max_streams=max_join_streams,
        )  # fmt: skip
    server = create_server(
        max_receive_bytes=source.max_message_bytes,
        max_send_bytes=source.max_message_bytes,
        max_concurrent_rpcs=MAX_CONCURRENT_QUERIES + (joins.max_streams if joins is not None else 0),
        token=api_token,
        token_what="this source requires its API token",
        open_methods=(*OPEN_API_METHODS, *((JOIN_PREFIX,) if membership is not None else ())),  # joins check the device token
        keepalive=source.keepalive,
    )
    if joins is not None:
        server.add_generic_rpc_handlers((joins.handler(),))
    rocoin_pb2_grpc.add_SourceServicer_to_server(SourceService(source), server)
    kserve_grpc.add_to_server(source, server)  # inference.GRPCInferenceService on the same port
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host, _, _ = listen.rpartition(":")
    port = server.add_secure_port(listen, tls.credentials()) if tls is not None else server.add_insecure_port(listen)
    if port == 0:
        raise RocoinError(f"listen = {listen!r}: cannot bind")
    address = f"{host}:{port}"
    await source.start()
    if membership is not None:
        await membership.start()
    await server.start()
    http_server, http_address = None, None
    if http_listen is not None:
        from rocoin.runtime.api.http import start_http

        http_server = await start_http(
            source, http_listen, token=api_token, ssl_context=tls.ssl_context() if tls else None, limits=http_limits
        )
        http_address = http_server.address
        logger.info("source REST API (KServe v2) on %s://%s/v2", "https" if tls else "http", http_address)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("source serving on %s (%d groups, %d devices)", address, source.num_groups, len(source.devices))
    if ready_file is not None:
        write_json_atomic(ready_file, {"address": address, "http_address": http_address, "pid": os.getpid()})
    stop = stop or asyncio.Event()
    try:
        with stop_on_signals(stop):
            await stop.wait()
    finally:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if http_server is not None:
            await http_server.close()
        if membership is not None:
            membership.stopping()  # the streams that end now are the source's doing: nobody is moved for them
        await server.stop(SHUTDOWN_GRACE_S)
        if membership is not None:
            await membership.close()
            membership.registry.close()
        await source.close()
