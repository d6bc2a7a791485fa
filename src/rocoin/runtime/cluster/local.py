"""A local cluster: one device-worker process per device on loopback, plus the source.

``LocalCluster`` is what ``rocoin cluster up`` runs, and what the tests and benchmarks use to
kill and restart real processes. Its state (addresses, process ids, logs) lives in a folder, so
``rocoin cluster down`` can stop a cluster started by another command.

Each process is a runtime entry point (``python -m rocoin.runtime.device`` or ``python -m
rocoin.runtime.api``) started with its typed options (:class:`DeviceOptions`,
:class:`SourceOptions`) in ``STATE/NAME.options.json``: the same models, with the same defaults,
as ``rocoin device serve`` and ``rocoin source serve``.

The devices authenticate the source with a shared token, kept in the state folder as
:data:`TOKEN_FILE` (mode 0600) while the cluster runs: every worker and the source read it
(``token_file``), and an operator restarting a worker by hand passes the same file
(``rocoin device serve ... --token-file STATE/device-token``). It is removed when the cluster stops.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel

from rocoin.contracts.errors import RocoinError, UnavailableError
from rocoin.contracts.fileio import write_json_atomic, write_text_atomic
from rocoin.contracts.fleet import Fleet, load_fleet, save_fleet
from rocoin.contracts.manifest import load_manifest
from rocoin.runtime.api.options import SourceOptions
from rocoin.runtime.device.options import DeviceOptions
from rocoin.runtime.source.settings import check_max_batch_images, check_queue_delay
from rocoin.runtime.transport.lifecycle import READY_POLL_S, wait_ready_file

logger = logging.getLogger(__name__)

#: How long ``start`` waits for every worker to report its address and be SERVING.
STARTUP_TIMEOUT_S = 60.0
#: How long ``stop`` waits after SIGTERM before SIGKILL.
STOP_GRACE_S = 5.0
STATE_FILE = "cluster.json"
#: The source's membership registry (joined clusters), under the state folder.
MEMBERSHIP_DIR = "membership"
#: The shared device token, readable by the owner only.
TOKEN_FILE = "device-token"


@dataclass
class Member:
    name: str  # device id, or "source"
    address: str
    pid: int
    log: str
    http_address: str | None = None  # the source's REST API, when started with one


@dataclass
class ClusterState:
    bundle: str
    fleet: str  # the fleet with the workers' addresses filled in
    devices: list[Member] = field(default_factory=list)
    source: Member | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ClusterState:
        source = Member(**data["source"]) if data.get("source") else None
        return cls(bundle=data["bundle"], fleet=data["fleet"], devices=[Member(**m) for m in data["devices"]], source=source)


#: The runtime entry points a cluster starts (each takes ``--options FILE`` of its options model).
DEVICE_ENTRY_POINT = "rocoin.runtime.device"
JOIN_ENTRY_POINT = "rocoin.runtime.device.join_main"
SOURCE_ENTRY_POINT = "rocoin.runtime.api"


class LocalCluster:
    def __init__(
        self,
        bundle: str | Path,
        fleet: Fleet | str | Path,
        state_dir: str | Path,
        *,
        emulate: bool = False,
        deadline_s: float | None = None,
        with_source: bool = True,
        devices: list[str] | None = None,
        token: str | None = None,
        http: bool = False,
        joins: bool = False,
        spares: list[str] | None = None,
        grace_s: float | None = None,
        max_queue_delay_ms: float | None = None,
        max_batch_images: int | None = None,
    ) -> None:
        """``devices``: the plan devices to start (default: all); the others keep the fleet's address.

        ``joins``: the devices dial the source (``rocoin device join``, no port of their own) and the
        source re-plans as they come and go (its membership in ``STATE/membership``); ``spares``:
        ids of the fleet's devices outside the plan that join too (the re-plan decides their use)."""
        self.bundle = Path(bundle).resolve()
        self.manifest = load_manifest(self.bundle)
        self.fleet = fleet if isinstance(fleet, Fleet) else load_fleet(fleet)
        spare_ids = set(spares or [])
        self.manifest.plan.check_fleet(Fleet(devices=[d for d in self.fleet.devices if d.id not in spare_ids]) if spare_ids else self.fleet)
        self.state_dir = Path(state_dir).resolve()
        self.emulate = emulate
        self.deadline_s = deadline_s
        self.with_source = with_source
        self.http = http or joins  # a joined cluster is watched through /v2/fleet
        self.joins = joins
        self.grace_s = grace_s
        if max_queue_delay_ms is not None:  # checked here: the source process would only say so in its log
            check_queue_delay(max_queue_delay_ms, "max-queue-delay-ms")
        if max_batch_images is not None:
            check_max_batch_images(max_batch_images, "max-batch-images")
        if emulate and max_queue_delay_ms is None:
            # an emulated worker holds each request for one query's emulated time and draws one outage
            # per request, as the simulator models a query: batching would make that a message's
            max_queue_delay_ms = 0.0
        #: the source's dynamic batching (None: its defaults; off in an emulated cluster unless asked for)
        self.batching = {
            name: value
            for name, value in (("max_queue_delay_ms", max_queue_delay_ms), ("max_batch_images", max_batch_images))
            if value is not None
        }
        self.spares = list(spares or [])
        unknown_spares = sorted(set(self.spares) - set(self.fleet.ids))
        if unknown_spares:
            raise RocoinError(f"spare {unknown_spares[0]!r} is not in the fleet")
        plan_devices = self.manifest.plan.device_ids
        unknown = sorted(set(devices or []) - set(plan_devices))
        if unknown:
            raise RocoinError(f"device {unknown[0]!r} is not in the bundle's plan")
        self.device_ids = list(devices) if devices is not None else plan_devices
        #: the shared token between the source and the devices (a fresh random one by default); it
        #: reaches the workers through a 0600 file in the state folder, never their command line.
        self.token = token or secrets.token_urlsafe(32)
        self.token_file = self.state_dir / TOKEN_FILE
        self.processes: dict[str, subprocess.Popen] = {}
        self.state: ClusterState | None = None

    # --- starting ---------------------------------------------------------------------------

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> ClusterState:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if (self.state_dir / STATE_FILE).exists():
            raise RocoinError(f"{self.state_dir}: a cluster is already running here (rocoin cluster down --state-dir {self.state_dir})")
        plan_devices = self.device_ids
        original = self.state_dir / "fleet-profiles.yaml"
        save_fleet(self.fleet, original)
        write_secret(self.token_file, self.token)
        if self.joins:
            return self._start_joined(original, timeout_s)
        try:
            for device_id in plan_devices:
                self._spawn_device(device_id, "127.0.0.1:0", original)
            members = [self._await_ready(name, timeout_s) for name in plan_devices]
            addresses = {m.name: m.address for m in members}
            fleet = Fleet(
                devices=[d.model_copy(update={"address": addresses.get(d.id, d.address)}) for d in self.fleet.devices],
                input_bits=self.fleet.input_bits,
            )
            fleet_path = self.state_dir / "fleet.yaml"
            save_fleet(fleet, fleet_path)
            self.state = ClusterState(bundle=str(self.bundle), fleet=str(fleet_path), devices=members)
            for member in members:
                wait_serving(member.address, timeout_s)
            if self.with_source:
                self._spawn_source(fleet_path)
                self.state.source = self._await_ready("source", timeout_s)
                wait_serving(self.state.source.address, timeout_s)
        except BaseException:
            self.stop()
            raise
        write_json_atomic(self.state_dir / STATE_FILE, self.state.to_json())
        return self.state

    def _start_joined(self, profiles: Path, timeout_s: float) -> ClusterState:
        """The source first (it admits devices), then every device dialing it; ready once every
        device counts for a group or is a spare."""
        from rocoin.runtime.api.client import fetch_fleet_status

        planned = [d for d in self.fleet.devices if d.id not in self.spares]  # spares bring their own profile when they join
        fleet = Fleet(devices=[d.model_copy(update={"address": None}) for d in planned], input_bits=self.fleet.input_bits)
        fleet_path = self.state_dir / "fleet.yaml"
        save_fleet(fleet, fleet_path)
        self.state = ClusterState(bundle=str(self.bundle), fleet=str(fleet_path))
        try:
            self._spawn_source(fleet_path)
            self.state.source = self._await_ready("source", timeout_s)
            wait_serving(self.state.source.address, timeout_s)
            for device_id in [*self.device_ids, *self.spares]:
                self._spawn_joined(device_id)
                self.state.devices.append(Member(device_id, "", self.processes[device_id].pid, str(self.state_dir / f"{device_id}.log")))
            wanted = set(self.device_ids) | set(self.spares)
            limit = time.monotonic() + timeout_s
            while True:
                status = fetch_fleet_status(self.state.source.http_address)
                settled = {m["device_id"] for m in status["members"] if m["serving_group"] is not None or m.get("spare")}
                if wanted <= settled and not status.get("busy"):
                    break
                for name in wanted:
                    if self.processes[name].poll() is not None:
                        raise UnavailableError(
                            f"{name}: exited with {self.processes[name].returncode}; its log ends: {_tail(self.state_dir / f'{name}.log')}"
                        )
                if time.monotonic() > limit:
                    raise UnavailableError(f"devices {sorted(wanted - settled)} did not join within {timeout_s:g} s")
                time.sleep(READY_POLL_S)
        except BaseException:
            self.stop()
            raise
        write_json_atomic(self.state_dir / STATE_FILE, self.state.to_json())
        return self.state

    def _spawn_joined(self, device_id: str) -> None:
        import yaml

        from rocoin.runtime.device.options import JoinOptions

        entry = self.state_dir / f"{device_id}.entry.yaml"
        profile = next(d for d in self.fleet.devices if d.id == device_id)
        write_text_atomic(entry, yaml.safe_dump(profile.model_dump(mode="json", exclude_none=True, exclude={"address"}), sort_keys=False))
        options = JoinOptions(
            source=self.state.source.address, device_id=device_id, profile=entry, cache_dir=self.state_dir / "devices" / device_id,
            token_file=self.token_file, emulate=self.emulate, **self._device_concurrency,
        )  # fmt: skip
        self._spawn(device_id, JOIN_ENTRY_POINT, options)

    @property
    def _device_concurrency(self) -> dict[str, int]:
        """The workers share this machine's cores, as many workers as devices: each runs one request at
        a time (on its event loop: no hop to a thread), except emulating ones, whose emulated delay
        holds a slot while other requests run."""
        return {} if self.emulate else {"max_concurrency": 1}

    def _ready_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.ready.json"

    def _spawn(self, name: str, entry_point: str, options: BaseModel) -> None:
        """Start ``python -m entry_point --options STATE/name.options.json``; its output goes to ``name.log``."""
        ready = self._ready_file(name)
        ready.unlink(missing_ok=True)
        options_path = self.state_dir / f"{name}.options.json"
        write_json_atomic(options_path, options.model_dump(mode="json", exclude_defaults=True))
        log_path = self.state_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", entry_point, "--options", str(options_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _spawn_device(self, device_id: str, listen: str, profiles: Path) -> None:
        options = DeviceOptions(
            bundle=self.bundle, device_id=device_id, listen=listen, token_file=self.token_file, ready_file=self._ready_file(device_id),
            fleet=profiles if self.emulate else None, emulate=self.emulate, **self._device_concurrency,
        )  # fmt: skip
        self._spawn(device_id, DEVICE_ENTRY_POINT, options)

    def _spawn_source(self, fleet_path: Path) -> None:
        joins = {"joins": True, "state_dir": self.state_dir / MEMBERSHIP_DIR} if self.joins else {}
        if self.joins and self.grace_s is not None:
            joins["grace_s"] = self.grace_s
        options = SourceOptions(
            bundle=self.bundle, fleet=fleet_path, listen="127.0.0.1:0", token_file=self.token_file, ready_file=self._ready_file("source"),
            http_listen="127.0.0.1:0" if self.http else None, **({"deadline_s": self.deadline_s} if self.deadline_s else {}), **joins,
            **self.batching,
        )  # fmt: skip
        self._spawn("source", SOURCE_ENTRY_POINT, options)

    def _await_ready(self, name: str, timeout_s: float) -> Member:
        log = self.state_dir / f"{name}.log"
        try:
            info = wait_ready_file(self._ready_file(name), timeout_s=timeout_s, process=self.processes[name])
        except UnavailableError as exc:
            raise UnavailableError(f"{name}: {exc}; its log ends: {_tail(log)}") from None
        return Member(name=name, address=info["address"], pid=self.processes[name].pid, log=str(log), http_address=info.get("http_address"))

    # --- failures ---------------------------------------------------------------------------

    def member(self, name: str) -> Member:
        assert self.state is not None
        for m in self.state.devices:
            if m.name == name:
                return m
        raise RocoinError(f"device {name!r} is not in this cluster")

    def kill_device(self, device_id: str, sig: int = signal.SIGKILL) -> None:
        """Kill a device worker (SIGKILL by default: no goodbye)."""
        process = self.processes[device_id]
        process.send_signal(sig)
        process.wait()

    def restart_device(self, device_id: str, timeout_s: float = STARTUP_TIMEOUT_S) -> Member:
        """Start a killed device again on the same address, so the source finds it again."""
        old = self.member(device_id)
        if self.joins:  # it dials the source again, its model cached
            self._spawn_joined(device_id)
            old.pid = self.processes[device_id].pid
            write_json_atomic(self.state_dir / STATE_FILE, self.state.to_json())
            return old
        self._spawn_device(device_id, old.address, self.state_dir / "fleet-profiles.yaml")
        new = self._await_ready(device_id, timeout_s)
        wait_serving(new.address, timeout_s)
        old.pid = new.pid
        write_json_atomic(self.state_dir / STATE_FILE, self.state.to_json())
        return new

    # --- stopping ---------------------------------------------------------------------------

    def stop(self) -> None:
        stop_processes([p.pid for p in self.processes.values() if p.poll() is None])
        for process in self.processes.values():
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        self.token_file.unlink(missing_ok=True)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_processes(pids: list[int], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each process group, then SIGKILL whatever is left after ``grace_s``."""
    for pid in pids:
        _signal_group(pid, signal.SIGTERM)
    limit = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < limit:
        alive = [pid for pid in alive if _alive(pid)]
        if alive:
            time.sleep(READY_POLL_S)
    for pid in alive:
        _signal_group(pid, signal.SIGKILL)


def cluster_down(state_dir: str | Path) -> ClusterState:
    """Stop the cluster whose state is in ``state_dir`` (started by ``rocoin cluster up``)."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        raise RocoinError(f"{state_dir}: no running cluster here (no {STATE_FILE})")
    state = ClusterState.from_json(json.loads(path.read_text()))
    members = state.devices + ([state.source] if state.source else [])
    stop_processes([m.pid for m in members])
    path.unlink(missing_ok=True)
    (Path(state_dir) / TOKEN_FILE).unlink(missing_ok=True)
    return state


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (0600 from creation, then moved into place)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def wait_serving(address: str, timeout_s: float) -> None:
    """Block until the gRPC health service at ``address`` says SERVING."""
    limit = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0, wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > limit:
                raise UnavailableError(f"{address}: not SERVING within {timeout_s:g} s")
            time.sleep(READY_POLL_S)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"
