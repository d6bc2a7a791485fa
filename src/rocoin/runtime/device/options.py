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


class JoinOptions(BaseModel):
    """Everything a device that dials the source can be told (``rocoin device join``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="host:port of the source's gRPC port (source serve --joins).")
    device_id: str = Field(description="This device's id (bound to its device key on its first join).")
    profile: Path | None = Field(None, description="Its fleet entry (YAML/JSON, no address); without it, --measure.")
    measure: bool = Field(False, description="Measure FLOP/s (a numpy benchmark), free memory and the link to the source.")
    cache_dir: Path = Field(Path("rocoin-device"), description="Where received models (by SHA-256) and the device key are kept.")
    emulate: bool = Field(False, description="Behave like its profile: compute and link delays, random drops.")
    max_batch: int = Field(DEFAULT_MAX_BATCH, description="Largest image batch accepted.")
    max_concurrency: int = Field(DEFAULT_MAX_CONCURRENCY, description="Requests run at once.")
    threads: int = Field(DEFAULT_INTRA_OP_THREADS, description="onnxruntime intra-op threads.")
    token_file: Path | None = Field(None, description="File with the source's device token (default: $ROCOIN_DEVICE_TOKEN).")
    tls_ca: Path | None = Field(None, description="Talk TLS to the source, verifying it against this CA.")
    tls_cert: Path | None = Field(None, description="This device's certificate for mTLS (its common name must be the device id).")
    tls_key: Path | None = Field(None, description="Private key of --tls-cert.")
    insecure: bool = Field(False, description="Join without a token or mTLS (refused otherwise).")


def run_join(options: JoinOptions) -> None:
    """Join the source of ``options`` and serve until SIGTERM/SIGINT (see :mod:`.join`)."""
    from rocoin.contracts.fileio import load_validated
    from rocoin.contracts.fleet import DeviceProfile, check_device_id
    from rocoin.runtime.device.join import JoinClient, serve_joined
    from rocoin.runtime.transport.auth import check_authentication, load_token
    from rocoin.runtime.transport.tls import ClientTLS

    check_device_id(options.device_id)
    token = load_token(options.token_file)
    check_authentication(
        f"device {options.device_id}",
        token=token,
        tls_client_auth=options.tls_cert is not None,
        insecure=options.insecure,
        risk="it joins a source that admits anyone",
    )
    if (options.profile is None) == (not options.measure):
        raise RocoinError("profile: give --profile ENTRY.yaml or --measure (one of them)")
    if options.tls_ca is None and (options.tls_cert or options.tls_key):
        raise RocoinError("tls-cert/tls-key need --tls-ca (the CA that signed the source's certificate)")
    tls = ClientTLS(options.tls_ca, options.tls_cert, options.tls_key) if options.tls_ca else None
    if options.profile is not None:
        profile = load_validated(DeviceProfile, options.profile, "a fleet entry")
        if profile.id != options.device_id:
            raise RocoinError(f"profile {options.profile}: id {profile.id!r} differs from --device-id {options.device_id!r}")
    else:
        from rocoin.runtime.device.profiling import measure_join_profile

        profile = measure_join_profile(
            options.device_id, options.source, threads=options.threads, credentials=tls.credentials() if tls else None, token=token
        )
    client = JoinClient(
        options.source, profile.model_copy(update={"address": None}), options.cache_dir, token=token,
        tls=tls, emulate=options.emulate,
        max_batch=options.max_batch, max_concurrency=options.max_concurrency, intra_op_threads=options.threads,
    )  # fmt: skip
    asyncio.run(serve_joined(client))
