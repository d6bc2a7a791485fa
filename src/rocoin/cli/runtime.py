"""Commands of the runtime: export a bundle, serve devices and the source, query, run a local cluster."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import typer
from rich.table import Table

from rocoin.cli.common import clean_errors, flag, out, require
from rocoin.contracts.errors import RocoinError
from rocoin.runtime.api.options import SourceOptions
from rocoin.runtime.device.options import DeviceOptions, JoinOptions
from rocoin.runtime.source.settings import DEFAULT_MAX_QUEUE_DELAY_MS

device_app = typer.Typer(help="Run a device worker (onnxruntime + gRPC; no torch needed).", no_args_is_help=True)
source_app = typer.Typer(help="Run the source: broadcasts queries, gathers groups, runs the head.", no_args_is_help=True)
cluster_app = typer.Typer(help="A local cluster: every device and the source as processes on loopback.", no_args_is_help=True)
DEFAULT_STATE_DIR = Path(".rocoin-cluster")


def _server_logging() -> None:
    """Servers log their events (address, devices marked down/up) at INFO unless asked otherwise."""
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)


@clean_errors
def export_command(
    students: Path = typer.Option(..., "--students", help="students.pt from rocoin distill."),
    plan: Path | None = typer.Option(None, "--plan", help="plan.json; must match the plan inside students.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle folder."),
    int8: bool = typer.Option(False, "--int8", help="Quantise the group models to int8 (static, calibrated on training images)."),
    calibration_images: int = typer.Option(256, "--calibration-images", help="With --int8: training images for calibration."),
    eval_images: int = typer.Option(1000, "--eval-images", help="With --int8: test images for the fp32 vs int8 report."),
    data_dir: str | None = typer.Option(None, "--data-dir", help="With --int8: where the students' dataset is."),
    output: Path = typer.Option(..., "--output", "-o", help="Bundle folder to write."),
) -> None:
    """Export the students to ONNX: one model per group, the head, and manifest.json (with a parity check)."""
    require("torch", "train")
    require("onnx", "train")
    import json

    from rocoin.export import export_bundle

    calibration, evaluation = (None, None)
    if int8:
        from rocoin.export.quantize import int8_data

        calibration, evaluation = int8_data(students, data_dir, calibration_images, eval_images)
    manifest = export_bundle(students, output, plan_path=plan, overwrite=overwrite, int8_calibration=calibration, int8_eval=evaluation)
    out.print(
        f"bundle {output}: {len(manifest.groups)} group models + head, parity with PyTorch checked"
        + (", groups quantised to int8" if int8 else "")
    )
    if int8:
        report = json.loads((output / "int8-report.json").read_text())
        table = Table(title=f"fp32 vs int8 on {report['images']} test images (agreement {report['agreement']:.4f})")
        for column in ("", "group models kB", "slowest group ms", "accuracy"):
            table.add_column(column)
        for name in ("fp32", "int8"):
            r = report[name]
            table.add_row(name, f"{r['size_bytes'] / 1e3:.1f}", f"{1e3 * r['slowest_group_s']:.3f}", f"{r['accuracy']:.4f}")
        out.print(table)


@device_app.command("serve")
@clean_errors
def device_serve(
    bundle: Path = flag(DeviceOptions, "bundle", "--bundle"),
    device_id: str = flag(DeviceOptions, "device_id", "--device-id"),
    listen: str = flag(DeviceOptions, "listen", "--listen"),
    fleet: Path | None = flag(DeviceOptions, "fleet", "--fleet"),
    emulate: bool = flag(DeviceOptions, "emulate", "--emulate"),
    max_batch: int = flag(DeviceOptions, "max_batch", "--max-batch"),
    max_concurrency: int = flag(DeviceOptions, "max_concurrency", "--max-concurrency"),
    threads: int = flag(DeviceOptions, "threads", "--threads"),
    ready_file: Path | None = flag(DeviceOptions, "ready_file", "--ready-file"),
    token_file: Path | None = flag(DeviceOptions, "token_file", "--token-file"),
    tls_cert: Path | None = flag(DeviceOptions, "tls_cert", "--tls-cert"),
    tls_key: Path | None = flag(DeviceOptions, "tls_key", "--tls-key"),
    tls_client_ca: Path | None = flag(DeviceOptions, "tls_client_ca", "--tls-client-ca"),
    insecure: bool = flag(DeviceOptions, "insecure", "--insecure"),
    metrics_listen: str | None = flag(DeviceOptions, "metrics_listen", "--metrics-listen"),
) -> None:
    """Serve this device's student over gRPC until SIGTERM/SIGINT."""
    options = _options(DeviceOptions, locals())
    require("onnxruntime", "device")
    require("grpc", "device")
    from rocoin.runtime.device.options import run_device

    _server_logging()
    run_device(options)


@device_app.command("join")
@clean_errors
def device_join(
    source: str = flag(JoinOptions, "source", "--source"),
    device_id: str = flag(JoinOptions, "device_id", "--device-id", "--id"),
    profile: Path | None = flag(JoinOptions, "profile", "--profile"),
    measure: bool = flag(JoinOptions, "measure", "--measure"),
    cache_dir: Path = flag(JoinOptions, "cache_dir", "--cache-dir"),
    emulate: bool = flag(JoinOptions, "emulate", "--emulate"),
    max_batch: int = flag(JoinOptions, "max_batch", "--max-batch"),
    max_concurrency: int = flag(JoinOptions, "max_concurrency", "--max-concurrency"),
    threads: int = flag(JoinOptions, "threads", "--threads", "--intra-op-threads"),
    token_file: Path | None = flag(JoinOptions, "token_file", "--token-file"),
    tls_ca: Path | None = flag(JoinOptions, "tls_ca", "--tls-ca"),
    tls_cert: Path | None = flag(JoinOptions, "tls_cert", "--tls-cert"),
    tls_key: Path | None = flag(JoinOptions, "tls_key", "--tls-key"),
    insecure: bool = flag(JoinOptions, "insecure", "--insecure"),
) -> None:
    """Dial the source (from behind NAT: no port opened here), get a group and its model, and serve it until SIGTERM/SIGINT."""
    options = _options(JoinOptions, locals())
    require("onnxruntime", "device")
    require("grpc", "device")
    from rocoin.runtime.device.options import run_join

    _server_logging()
    run_join(options)


def _options(model, values: dict):
    """``model`` from a command's arguments (named as its fields), validated with one-line errors."""
    from rocoin.contracts.fileio import validate

    return validate(model, values, "options")


@device_app.command("profile")
@clean_errors
def device_profile(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle whose student models are timed on this device."),
    device_id: str = typer.Option(..., "--device-id", help="This device's id."),
    source: str = typer.Option(..., "--source", help="host:port of the running source (link rate and loss are measured to it)."),
    address: str | None = typer.Option(None, "--address", help="host:port this device's worker will listen on (written into the entry)."),
    threads: int = typer.Option(1, "--threads", help="onnxruntime intra-op threads, as the worker will use."),
    output: Path = typer.Option(..., "--output", "-o", help="Fleet entry to write (YAML)."),
) -> None:
    """Measure this device's FLOP/s, free memory and link to the source; write its fleet entry."""
    require("onnxruntime", "device")
    import yaml

    from rocoin.contracts.fileio import write_text_atomic
    from rocoin.runtime.device.profiling import profile_device

    entry = profile_device(device_id, bundle, source, address=address, threads=threads)
    write_text_atomic(output, yaml.safe_dump(entry.model_dump(mode="json", exclude_none=True), sort_keys=False))
    out.print(
        f"{device_id}: {entry.flops / 1e6:.1f} MFLOP/s, {entry.memory_bytes / 2**20:.0f} MiB free,"
        f" uplink {entry.rate_bps / 1e6:.1f} Mbit/s, outage {entry.outage:g}"
    )


@source_app.command("serve")
@clean_errors
def source_serve(
    bundle: Path = flag(SourceOptions, "bundle", "--bundle"),
    fleet: Path = flag(SourceOptions, "fleet", "--fleet"),
    listen: str = flag(SourceOptions, "listen", "--listen"),
    http_listen: str | None = flag(SourceOptions, "http_listen", "--http-listen"),
    api_token_file: Path | None = flag(SourceOptions, "api_token_file", "--api-token-file"),
    api_tls_cert: Path | None = flag(SourceOptions, "api_tls_cert", "--api-tls-cert"),
    api_tls_key: Path | None = flag(SourceOptions, "api_tls_key", "--api-tls-key"),
    join_tls_client_ca: Path | None = flag(SourceOptions, "join_tls_client_ca", "--join-tls-client-ca"),
    deadline_s: float = flag(SourceOptions, "deadline_s", "--deadline-s"),
    max_queue_delay_ms: float = flag(SourceOptions, "max_queue_delay_ms", "--max-queue-delay-ms"),
    max_batch_images: int = flag(SourceOptions, "max_batch_images", "--max-batch-images"),
    ready_file: Path | None = flag(SourceOptions, "ready_file", "--ready-file"),
    token_file: Path | None = flag(SourceOptions, "token_file", "--token-file"),
    tls_ca: Path | None = flag(SourceOptions, "tls_ca", "--tls-ca"),
    tls_cert: Path | None = flag(SourceOptions, "tls_cert", "--tls-cert"),
    tls_key: Path | None = flag(SourceOptions, "tls_key", "--tls-key"),
    insecure: bool = flag(SourceOptions, "insecure", "--insecure"),
    http_header_timeout_s: float = flag(SourceOptions, "http_header_timeout_s", "--http-header-timeout-s"),
    http_body_timeout_s: float = flag(SourceOptions, "http_body_timeout_s", "--http-body-timeout-s"),
    http_idle_timeout_s: float = flag(SourceOptions, "http_idle_timeout_s", "--http-idle-timeout-s"),
    http_max_connections: int = flag(SourceOptions, "http_max_connections", "--http-max-connections"),
    joins: bool = flag(SourceOptions, "joins", "--joins"),
    state_dir: Path | None = flag(SourceOptions, "state_dir", "--state-dir"),
    grace_s: float = flag(SourceOptions, "grace_s", "--grace-s"),
    forget_after_s: float = flag(SourceOptions, "forget_after_s", "--forget-after-s"),
    max_join_streams: int = flag(SourceOptions, "max_join_streams", "--max-join-streams"),
    joins_per_s: float = flag(SourceOptions, "joins_per_s", "--joins-per-s"),
    keepalive_time_ms: int = flag(SourceOptions, "keepalive_time_ms", "--keepalive-time-ms"),
    keepalive_timeout_ms: int = flag(SourceOptions, "keepalive_timeout_ms", "--keepalive-timeout-ms"),
) -> None:
    """Serve queries: broadcast to every device, first answer per group, head at completion or deadline."""
    options = _options(SourceOptions, locals())
    require("onnxruntime", "device")
    require("grpc", "device")
    if http_listen is not None:
        require("aiohttp", "source")
    from rocoin.runtime.api.options import run_source

    _server_logging()
    run_source(options)


@clean_errors
def infer_command(
    source: str | None = typer.Option(None, "--source", help="host:port of a source's gRPC API."),
    url: str | None = typer.Option(None, "--url", help="http://host:port of a source's KServe v2 REST API (instead of --source)."),
    dataset: str = typer.Option("fashion-mnist", "--dataset", help="Dataset whose test split is sent."),
    data_dir: str | None = typer.Option(None, "--data-dir"),
    count: int = typer.Option(100, "--count", help="Test images to send (one query each)."),
    concurrency: int = typer.Option(1, "--concurrency", help="Queries in flight at once."),
    deadline_s: float = typer.Option(0.0, "--deadline-s", help="Per-query deadline (0: the source's)."),
    api_token_file: Path | None = typer.Option(
        None, "--api-token-file", help="With --url: bearer token file (default: $ROCOIN_API_TOKEN)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Send test images to a source; print accuracy, latency percentiles and missing groups."""
    import json

    from rocoin.data import load_dataset

    if (source is None) == (url is None):
        raise RocoinError("infer: give exactly one of --source (gRPC) or --url (KServe v2 REST)")
    if count < 1:
        raise RocoinError(f"count = {count}: expected at least 1")
    splits = load_dataset(dataset, Path(data_dir) if data_dir else None)
    images, labels = splits.test.images[:count], splits.test.labels[:count]
    if url is not None:
        require("aiohttp", "source")
        from rocoin.runtime.api.client import run_queries_http
        from rocoin.runtime.transport.auth import API_TOKEN_ENV, load_token

        token = load_token(api_token_file, env=API_TOKEN_ENV)
        report = asyncio.run(run_queries_http(url, images, labels, concurrency=concurrency, token=token))
    else:
        require("grpc", "device")
        from rocoin.runtime.api.client import run_queries

        report = asyncio.run(run_queries(source, images, labels, concurrency=concurrency, deadline_s=deadline_s))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=f"{report['queries']} queries to {source or url}, concurrency {concurrency}")
    for column in ("accuracy", "p50 ms", "p99 ms", "queries/s", "with missing groups", "mean missing"):
        table.add_column(column)
    table.add_row(
        f"{report['accuracy']:.4f}",
        f"{1e3 * report['latency_s']['p50']:.1f}",
        f"{1e3 * report['latency_s']['p99']:.1f}",
        f"{report['queries_per_s']:.1f}",
        str(report["queries_with_missing_groups"]),
        f"{report['missing_groups_mean']:.3f}",
    )
    out.print(table)


@cluster_app.command("up")
@clean_errors
def cluster_up(
    bundle: Path = typer.Option(..., "--bundle"),
    fleet: Path = typer.Option(..., "--fleet"),
    emulate: bool = typer.Option(False, "--emulate", help="Each worker behaves like its fleet profile (delays, drops)."),
    deadline_s: float = flag(SourceOptions, "deadline_s", "--deadline-s"),
    max_queue_delay_ms: float | None = typer.Option(
        None,
        "--max-queue-delay-ms",
        help=f"Dynamic batching at the source (default {DEFAULT_MAX_QUEUE_DELAY_MS:g}; 0 with --emulate, whose workers emulate one query per request).",
    ),
    max_batch_images: int = flag(SourceOptions, "max_batch_images", "--max-batch-images"),
    http: bool = typer.Option(False, "--http", help="Also serve the source's KServe v2 REST API (any free port)."),
    state_dir: Path = typer.Option(DEFAULT_STATE_DIR, "--state-dir", help="Where the cluster keeps addresses, pids and logs."),
) -> None:
    """Start one worker per device and the source on loopback; wait until all are healthy."""
    require("onnxruntime", "device")
    require("grpc", "device")
    from rocoin.runtime.cluster.local import LocalCluster

    cluster = LocalCluster(
        bundle, fleet, state_dir, emulate=emulate, deadline_s=deadline_s, http=http,
        max_queue_delay_ms=max_queue_delay_ms, max_batch_images=max_batch_images,
    )  # fmt: skip
    started = time.perf_counter()
    state = cluster.start()
    table = Table(title=f"local cluster up in {time.perf_counter() - started:.1f} s (state in {state_dir})")
    for column in ("process", "address", "pid"):
        table.add_column(column)
    assert state.source is not None
    table.add_row("source", state.source.address, str(state.source.pid))
    if state.source.http_address:
        table.add_row("source REST", f"http://{state.source.http_address}/v2", str(state.source.pid))
    for member in state.devices:
        table.add_row(member.name, member.address, str(member.pid))
    out.print(table)
    out.print(f"query it: rocoin infer --source {state.source.address} --count 100; stop it: rocoin cluster down --state-dir {state_dir}")
    out.print(
        f"the devices' token is in {cluster.token_file} (mode 0600): restart a worker with rocoin device serve ... --token-file {cluster.token_file}"
    )


@cluster_app.command("down")
@clean_errors
def cluster_down_command(state_dir: Path = typer.Option(DEFAULT_STATE_DIR, "--state-dir")) -> None:
    """Stop the cluster started by ``rocoin cluster up``."""
    from rocoin.runtime.cluster.local import cluster_down

    state = cluster_down(state_dir)
    out.print(f"stopped {len(state.devices)} devices and the source")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
    app.command("infer")(infer_command)
    app.add_typer(device_app, name="device")
    app.add_typer(source_app, name="source")
    app.add_typer(cluster_app, name="cluster")
