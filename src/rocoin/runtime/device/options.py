"""The settings of a device worker process, with their one default each.

``rocoin device serve`` builds :class:`DeviceOptions` from its flags (and takes its defaults and
help from here); a local cluster writes them to a file and starts ``python -m
rocoin.runtime.device --options FILE``. Both end in :func:`run_device`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from rocoin.contracts.errors import RocoinError

#: Where a worker listens unless told otherwise (the source's default is 50051).
DEFAULT_DEVICE_LISTEN = "127.0.0.1:50061"
#: Largest batch one ``Infer`` may carry unless the worker is told otherwise.
DEFAULT_MAX_BATCH = 64
#: Calls that run the model (and their emulated delay) at the same time.
DEFAULT_MAX_CONCURRENCY = 4
#: onnxruntime intra-op threads (a small device has few cores; one leaves room for gRPC).
DEFAULT_INTRA_OP_THREADS = 1


class DeviceOptions(BaseModel):
    """Everything a device worker can be told (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle: Path = Field(description="Bundle folder from rocoin export.")
    device_id: str = Field(description="This device's id in the plan.")
    listen: str = Field(DEFAULT_DEVICE_LISTEN, description="host:port to serve on (port 0: any free port).")
    fleet: Path | None = Field(None, description="Fleet file with this device's profile (for --emulate).")
    emulate: bool = Field(False, description="Behave like the fleet profile: compute and link delays, random drops.")
    max_batch: int = Field(DEFAULT_MAX_BATCH, description="Largest image batch accepted.")
    max_concurrency: int = Field(DEFAULT_MAX_CONCURRENCY, description="Requests run at once.")
    threads: int = Field(DEFAULT_INTRA_OP_THREADS, description="onnxruntime intra-op threads.")
    ready_file: Path | None = Field(None, description="Write {address, pid} here once serving.")
    token_file: Path | None = Field(None, description="File with the shared token the source must send (default: $ROCOIN_DEVICE_TOKEN).")
    tls_cert: Path | None = Field(None, description="PEM certificate: serve TLS (see scripts/make_certs.sh).")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert.")
    tls_client_ca: Path | None = Field(None, description="Require client certificates signed by this CA (mTLS).")
    insecure: bool = Field(
        False, description="Serve without a token or mTLS (refused otherwise): anyone who reaches the port can use the device."
    )
    metrics_listen: str | None = Field(None, description="host:port for Prometheus /metrics (requests, run time).")


def run_device(options: DeviceOptions) -> None:
    """Serve the device of ``options`` until SIGTERM/SIGINT (see :func:`serve_device`)."""
    from rocoin.runtime.device.emulation import Emulation
    from rocoin.runtime.device.server import serve_device
    from rocoin.runtime.transport.auth import load_token
    from rocoin.runtime.transport.tls import server_tls

    emulation = None
    if options.emulate:
        if options.fleet is None:
            raise RocoinError("--emulate needs --fleet (the device's profile)")
        emulation = Emulation.from_fleet(options.fleet, options.device_id)
    asyncio.run(
        serve_device(
            options.bundle,
            options.device_id,
            options.listen,
            emulation=emulation,
            max_batch=options.max_batch,
            max_concurrency=options.max_concurrency,
            intra_op_threads=options.threads,
            ready_file=options.ready_file,
            token=load_token(options.token_file),
            tls=server_tls(options.tls_cert, options.tls_key, options.tls_client_ca),
            insecure=options.insecure,
            metrics_listen=options.metrics_listen,
        )
    )
