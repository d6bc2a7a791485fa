"""The demo's runtime part: a local emulated cluster serving the test images while devices die."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rocoin.contracts.progress import Progress, log_progress
from rocoin.experiments.demo import load
from rocoin.experiments.demo.victims import Victims

logger = logging.getLogger(__name__)

#: Default per-query deadline of the source: this multiple of the plan's failure-free latency T
#: under emulation, plus a fixed slack for the loopback overhead of every process sharing a
#: 2-core machine [decision: measured p99 of complete answers ≈ 1.8 × T at 8 queries in flight].
DEADLINE_FACTOR = 2.0
DEADLINE_SLACK_S = 0.05


def default_deadline_s(plan_latency_s: float, speedup: float) -> float:
    return DEADLINE_FACTOR * plan_latency_s / speedup + DEADLINE_SLACK_S


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the cluster runs, SIGTERM stops the demo like Ctrl-C, so the workers are stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def emulated_fleet(fleet, speedup: float):
    """Every device answers after t(d, s, k) of its profile and drops answers with its outage
    probability; FLOP/s and rates × ``speedup`` so a query takes ms, not s."""
    from rocoin.contracts.fleet import Fleet

    devices = [d.model_copy(update={"flops": d.flops * speedup, "rate_bps": d.rate_bps * speedup, "address": None}) for d in fleet.devices]
    return Fleet(devices=devices, input_bits=fleet.input_bits)


def run_cluster(
    out: Path,
    bundle: Path,
    fleet,
    plan,
    *,
    speedup: float,
    concurrency: int,
    images: np.ndarray,
    kill_index: int,
    victims: Victims,
    deadline_s: float,
    say: Callable[[str], None],
    progress: Progress = log_progress,
) -> tuple[load.QueryLog, dict[str, Any]]:
    """Start the workers and the source, send the queries (killing ``victims`` after
    ``kill_index``), stop everything; the query log and the cluster's facts."""
    from rocoin.runtime.cluster.local import MEMBERSHIP_DIR, STATE_FILE, LocalCluster, cluster_down

    state_dir = out / "cluster"
    if (state_dir / STATE_FILE).exists():
        say(f"stopping the cluster an interrupted run left in {state_dir}")
        cluster_down(state_dir)
    if state_dir.is_dir():
        for old_log in state_dir.glob("*.log"):
            old_log.unlink()
        # a run starts from the bundle's plan: a restarted source would resume the membership an
        # earlier run left (its healed assignment), and the kill would then not empty the group it names
        shutil.rmtree(state_dir / MEMBERSHIP_DIR, ignore_errors=True)
    # the devices dial the source (as devices behind NAT would), so it can move them and heal a lost group
    cluster = LocalCluster(bundle, emulated_fleet(fleet, speedup), state_dir, emulate=True, deadline_s=deadline_s, http=True, joins=True)
    started = time.perf_counter()
    with sigterm_as_interrupt():
        try:
            with progress(f"starting {len(plan.device_ids)} device workers and the source", 1) as advance:
                state = cluster.start()
                advance()
            startup_s = time.perf_counter() - started
            pids = {m.name: m.pid for m in [*state.devices, state.source]}

            def kill() -> None:
                for device_id in victims.devices:
                    cluster.kill_device(device_id)
                logger.info("killed %s", ", ".join(victims.devices))

            with progress(f"queries (SIGKILL {len(victims.devices)} devices after {kill_index})", len(images)) as advance:
                url = f"http://{state.source.http_address}"
                log = asyncio.run(
                    load.send_queries(url, images, concurrency=concurrency, kill_index=kill_index, kill=kill, advance=advance)
                )
            from rocoin.runtime.api.client import fetch_fleet_status

            membership = fetch_fleet_status(state.source.http_address)
        finally:
            cluster.stop()
    say(f"cluster stopped; worker logs in {state_dir}")
    info = {"startup_s": startup_s, "runtime_s": time.perf_counter() - started, "cluster_logs": str(state_dir), "pids": pids}
    info["membership"] = {"replans": membership["replans"], "history": membership["history"], "groups": membership["groups"]}
    # what each device exchanged with the source in the group it serves at the end (a device moved
    # by a re-plan: since its move; a killed one: gone with its stream)
    info["devices"] = [
        {"device": m["device_id"], "group": m["group"], "answers": m.get("answers"), "traffic": m.get("traffic")}
        for m in membership["members"]
    ]
    return log, info
