"""The settings of a source process, with their one default each.

``rocoin source serve`` builds :class:`SourceOptions` from its flags (and takes its defaults and
help from here); a local cluster writes them to a file and starts ``python -m rocoin.runtime.api
--options FILE``. Both end in :func:`run_source`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from rocoin.contracts.errors import RocoinError
from rocoin.runtime.api import http_limits as limits
from rocoin.runtime.source.registry import DEFAULT_FORGET_AFTER_S, DEFAULT_GRACE_S
from rocoin.runtime.source.settings import (
    DEFAULT_DEADLINE_S,
    DEFAULT_JOINS_PER_S,
    DEFAULT_MAX_BATCH_IMAGES,
    DEFAULT_MAX_JOIN_STREAMS,
    DEFAULT_MAX_QUEUE_DELAY_MS,
    JOIN_BURST,
    MAX_BATCH_IMAGES,
    MAX_QUEUE_DELAY_MS,
)
from rocoin.runtime.transport.keepalive import DEFAULT_TIME_MS, DEFAULT_TIMEOUT_MS, Keepalive

#: Where the source's gRPC API listens unless told otherwise.
DEFAULT_SOURCE_LISTEN = "127.0.0.1:50051"


class SourceOptions(BaseModel):
    """Everything a source process can be told (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle: Path = Field(description="Bundle folder from rocoin export.")
    fleet: Path = Field(description="Fleet file whose devices carry their worker's address.")
    listen: str = Field(DEFAULT_SOURCE_LISTEN, description="host:port for clients (port 0: any free port).")
    http_listen: str | None = Field(None, description="host:port for the KServe v2 REST API (e.g. 127.0.0.1:8000).")
    api_token_file: Path | None = Field(
        None, description="Bearer token clients must send to the client APIs (default: $ROCOIN_API_TOKEN; none: open)."
    )
    api_tls_cert: Path | None = Field(None, description="Serve the client APIs (gRPC and REST) over TLS with this certificate.")
    api_tls_key: Path | None = Field(None, description="Private key of --api-tls-cert.")
    join_tls_client_ca: Path | None = Field(
        None,
        description="With --joins and --api-tls-cert: the gRPC port requires client certificates of this CA (mTLS); a joining device's certificate names its id, and gRPC API clients present one too (the REST API asks for none).",
    )
    deadline_s: float = Field(DEFAULT_DEADLINE_S, description="Per-query deadline; missing groups are zero-filled then.")
    max_queue_delay_ms: float = Field(
        DEFAULT_MAX_QUEUE_DELAY_MS,
        ge=0,
        le=MAX_QUEUE_DELAY_MS,
        description="Dynamic batching: longest a query waits in the queue while a message is in flight to the devices, to share the next one (0: off; an idle source sends at once).",
    )
    max_batch_images: int = Field(
        DEFAULT_MAX_BATCH_IMAGES,
        ge=1,
        le=MAX_BATCH_IMAGES,
        description="Dynamic batching: most images in one message to a device (each device's --max-batch applies too).",
    )
    ready_file: Path | None = Field(None, description="Write {address, pid} here once serving.")
    token_file: Path | None = Field(None, description="File with the token the devices expect (default: $ROCOIN_DEVICE_TOKEN).")
    tls_ca: Path | None = Field(None, description="Talk TLS to the devices, verifying them against this CA.")
    tls_cert: Path | None = Field(None, description="The source's certificate for mTLS.")
    tls_key: Path | None = Field(None, description="Private key of --tls-cert.")
    insecure: bool = Field(False, description="Call the devices without a token or mTLS (refused otherwise).")
    http_header_timeout_s: float = Field(
        limits.DEFAULT_HEADER_TIMEOUT_S, description="REST: seconds from a request's first byte to the end of its headers (else 408)."
    )
    http_body_timeout_s: float = Field(
        limits.DEFAULT_BODY_TIMEOUT_S, description="REST: seconds from the end of the headers to the end of the body (else closed)."
    )
    http_idle_timeout_s: float = Field(limits.DEFAULT_IDLE_TIMEOUT_S, description="REST: seconds an idle connection stays open.")
    http_max_connections: int = Field(limits.DEFAULT_MAX_CONNECTIONS, description="REST: open connections; one more gets 503.")
    joins: bool = Field(
        False,
        description="Let devices dial the source (rocoin device join; admitted with the device token or mTLS) and re-plan as they come and go.",
    )
    state_dir: Path | None = Field(None, description="With --joins: where the membership registry is kept (membership.sqlite3).")
    grace_s: float = Field(
        DEFAULT_GRACE_S, gt=0, description="With --joins: seconds a device may be away before it is gone and re-planned."
    )
    forget_after_s: float = Field(
        DEFAULT_FORGET_AFTER_S,
        gt=0,
        allow_inf_nan=False,
        description="With --joins: seconds a gone device stays in the membership, its id bound to its key or certificate, before it is forgotten (rocoin fleet forget: sooner).",
    )
    max_join_streams: int = Field(
        DEFAULT_MAX_JOIN_STREAMS,
        ge=1,
        description="With --joins: join streams open at once (joined devices and those still saying hello); one more is refused with RESOURCE_EXHAUSTED and dials again later.",
    )
    joins_per_s: float = Field(
        DEFAULT_JOINS_PER_S,
        gt=0,
        allow_inf_nan=False,
        description=f"With --joins: joins admitted per second (in bursts of up to {JOIN_BURST}); one more is refused with RESOURCE_EXHAUSTED and dials again later.",
    )
    keepalive_time_ms: int = Field(
        DEFAULT_TIME_MS,
        ge=100,
        description="Ping each device's connection this often (a black-holed device is noticed within time + timeout).",
    )
    keepalive_timeout_ms: int = Field(DEFAULT_TIMEOUT_MS, ge=100, description="A ping not acknowledged within this closes the connection.")


def run_source(options: SourceOptions) -> None:
    """Serve the source of ``options`` until SIGTERM/SIGINT (see :func:`serve_source`)."""
    from rocoin.contracts.fleet import load_fleet
    from rocoin.runtime.api.server import serve_source
    from rocoin.runtime.source.source import Source
    from rocoin.runtime.transport.auth import API_TOKEN_ENV, load_token
    from rocoin.runtime.transport.tls import ClientTLS, server_tls

    if options.tls_ca is None and (options.tls_cert or options.tls_key):
        raise RocoinError("tls-cert/tls-key need --tls-ca (the CA that signed the devices' certificates)")
    tls = ClientTLS(options.tls_ca, options.tls_cert, options.tls_key) if options.tls_ca else None
    device_token = load_token(options.token_file)
    if options.joins and options.state_dir is None:
        raise RocoinError("state-dir: required with --joins (the membership registry is kept there)")
    if options.join_tls_client_ca is not None and not (options.joins and options.api_tls_cert):
        raise RocoinError(
            "join-tls-client-ca: needs --joins and --api-tls-cert/--api-tls-key (joining devices' mTLS runs over the API's TLS)"
        )
    source = Source(
        options.bundle, load_fleet(options.fleet), deadline_s=options.deadline_s, token=device_token, tls=tls,
        insecure=options.insecure, joins=options.joins,
        max_queue_delay_ms=options.max_queue_delay_ms, max_batch_images=options.max_batch_images,
        keepalive=Keepalive(time_ms=options.keepalive_time_ms, timeout_ms=options.keepalive_timeout_ms),
    )  # fmt: skip
    http_limits = None
    if options.http_listen is not None:
        http_limits = limits.HttpLimits(
            header_timeout_s=options.http_header_timeout_s,
            body_timeout_s=options.http_body_timeout_s,
            idle_timeout_s=options.http_idle_timeout_s,
            max_connections=options.http_max_connections,
        )
    api_token = load_token(options.api_token_file, env=API_TOKEN_ENV)
    api_tls = server_tls(options.api_tls_cert, options.api_tls_key, options.join_tls_client_ca)
    asyncio.run(
        serve_source(
            source, options.listen, http_listen=options.http_listen, api_token=api_token, tls=api_tls, ready_file=options.ready_file,
            http_limits=http_limits, device_token=device_token, state_dir=options.state_dir, grace_s=options.grace_s,
            forget_after_s=options.forget_after_s, max_joins_per_s=options.joins_per_s, max_join_streams=options.max_join_streams,
        )
    )  # fmt: skip
