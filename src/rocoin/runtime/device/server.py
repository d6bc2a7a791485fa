"""The device worker's server: the :class:`~.servicer.DeviceWorker` servicer and a gRPC health
service on one port (:func:`start_device`), and the process around it (:func:`serve_device`: ready
file, signals, graceful shutdown).

A worker loads a bundle (``manifest.json`` + ONNX files), finds the group of its device id,
checks the group model against the manifest (:mod:`.runner`) before it listens, and serves it
until SIGTERM/SIGINT. The health service reports SERVING once the port is bound and NOT_SERVING
while it shuts down; the source's probes ask it whether a device that went away is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import write_json_atomic
from rocoin.runtime.device.emulation import Emulation
from rocoin.runtime.device.options import DEFAULT_INTRA_OP_THREADS, DEFAULT_MAX_BATCH, DEFAULT_MAX_CONCURRENCY
from rocoin.runtime.device.servicer import DEVICE_SERVICE, MAX_QUEUED_CALLS, DeviceWorker
from rocoin.runtime.transport.auth import check_authentication
from rocoin.runtime.transport.grpc_server import create_server
from rocoin.runtime.transport.keepalive import KEEPALIVE, Keepalive
from rocoin.runtime.transport.lifecycle import stop_on_signals, wait_ready_file  # noqa: F401 - wait_ready_file is part of this module's API
from rocoin.runtime.transport.protocol import rocoin_pb2_grpc
from rocoin.runtime.transport.tls import ServerTLS

logger = logging.getLogger(__name__)

#: Seconds in-flight calls get to finish after SIGTERM/SIGINT or cancellation.
SHUTDOWN_GRACE_S = 5.0


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); port 0 asks for a free port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise RocoinError(f"listen = {listen!r}: expected host:port with a port in 0..65535 (0 picks a free one)")
    return host, int(port)


@dataclass
class DeviceServer:
    """A started device worker: its gRPC server, servicer, health service and bound address."""

    server: grpc.aio.Server
    worker: DeviceWorker
    health: health.aio.HealthServicer
    address: str
    port: int

    async def stop(self, grace: float | None = SHUTDOWN_GRACE_S) -> None:
        """Report NOT_SERVING, let the requests in progress be answered for up to ``grace``
        seconds, then end every call and stream (the source's stream stays open while idle, so
        waiting for it to end would always cost the whole grace)."""
        await self.health.enter_graceful_shutdown()
        await self.worker.drain(grace)
        await self.server.stop(0)
        self.worker.close()


async def start_device(
    bundle: str | os.PathLike[str],
    device_id: str,
    listen: str = "127.0.0.1:0",
    *,
    emulation: Emulation | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    intra_op_threads: int = DEFAULT_INTRA_OP_THREADS,
    token: str | None = None,
    tls: ServerTLS | None = None,
    insecure: bool = False,
    keepalive: Keepalive = KEEPALIVE,
) -> DeviceServer:
    """Load and check the model, listen on ``listen`` and start serving; stop it with ``.stop()``.

    With ``token``, every call but the health service's must carry it (see ``rocoin.runtime.transport.auth``);
    with ``tls`` the port speaks TLS (mTLS when it names a client CA; see ``rocoin.runtime.transport.tls``).
    Without a token or mTLS the worker refuses to start unless ``insecure`` is True.
    ``keepalive`` must permit the source's pings (both sides use :data:`KEEPALIVE` by default).
    """
    host, _ = parse_listen(listen)
    check_authentication(
        f"device {device_id}",
        token=token,
        tls_client_auth=tls is not None and tls.client_ca is not None,
        insecure=insecure,
        risk="anyone who reaches its port can run queries on it",
    )
    worker = DeviceWorker(
        bundle, device_id, emulation=emulation, max_batch=max_batch, max_concurrency=max_concurrency, intra_op_threads=intra_op_threads
    )
    server = create_server(
        max_receive_bytes=worker.max_request_bytes,
        max_send_bytes=worker.max_response_bytes,
        max_concurrent_rpcs=max_concurrency + MAX_QUEUED_CALLS,
        token=token,
        keepalive=keepalive,
        options=[("grpc.so_reuseport", 0)],  # a second worker on a busy port fails instead of sharing it
    )
    rocoin_pb2_grpc.add_DeviceServicer_to_server(worker, server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    try:
        port = server.add_secure_port(listen, tls.credentials()) if tls is not None else server.add_insecure_port(listen)
    except RocoinError:
        worker.close()
        raise
    except RuntimeError as exc:
        worker.close()
        raise RocoinError(f"listen = {listen!r}: cannot bind ({exc})") from None
    if not port:
        worker.close()
        raise RocoinError(f"listen = {listen!r}: cannot bind (address in use or not local)")
    await server.start()
    for service in ("", DEVICE_SERVICE):
        await health_service.set(service, health_pb2.HealthCheckResponse.SERVING)
    return DeviceServer(server, worker, health_service, f"{host}:{port}", port)


async def serve_device(
    bundle: str | os.PathLike[str],
    device_id: str,
    listen: str = "127.0.0.1:0",
    *,
    emulation: Emulation | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    intra_op_threads: int = DEFAULT_INTRA_OP_THREADS,
    ready: Callable[[DeviceServer], Any] | None = None,
    ready_file: str | os.PathLike[str] | None = None,
    token: str | None = None,
    tls: ServerTLS | None = None,
    insecure: bool = False,
    metrics_listen: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT or cancellation, then shut down within :data:`SHUTDOWN_GRACE_S`.

    Once serving: ``ready_file`` (if given) is written atomically with
    ``{"address", "port", "pid", "device_id", "group"}`` (and removed at shutdown), one INFO log
    line gives the bound address, and ``ready(server)`` is called. Raises :class:`RocoinError`
    before listening when the bundle, the device id, the model file or ``listen`` is bad.
    """
    if ready_file is not None:
        folder = Path(ready_file).parent
        if not folder.is_dir():
            raise RocoinError(f"ready-file = {str(ready_file)!r}: folder {folder} does not exist")
    running = await start_device(
        bundle,
        device_id,
        listen,
        emulation=emulation,
        max_batch=max_batch,
        max_concurrency=max_concurrency,
        intra_op_threads=intra_op_threads,
        token=token,
        tls=tls,
        insecure=insecure,
    )
    if metrics_listen is not None:
        metrics_port = running.worker.metrics.serve(metrics_listen)
        logger.info("device %s metrics on http://%s:%d/metrics", device_id, metrics_listen.rpartition(":")[0], metrics_port)
    stop = asyncio.Event()
    try:
        if ready_file is not None:
            write_json_atomic(
                ready_file,
                {
                    "address": running.address,
                    "port": running.port,
                    "pid": os.getpid(),
                    "device_id": device_id,
                    "group": running.worker.group,
                },
            )
        worker = running.worker
        logger.info(
            "device %s (group %d, student %s, %d filters%s) serving on %s",
            device_id,
            worker.group,
            worker.model.student,
            worker.output_size,
            f", emulating t={worker.target_s:.4g} s outage={emulation.outage:g}" if emulation else "",
            running.address,
        )
        if ready is not None:
            ready(running)
        with stop_on_signals(stop):
            await stop.wait()
        logger.info("device %s: signal received, shutting down", device_id)
    finally:
        await running.stop(SHUTDOWN_GRACE_S)
        if ready_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ready_file)
        logger.info("device %s: stopped", device_id)
