"""Real network faults: every device on its own host (a Linux network namespace) with a shaped
link, joining the source over it (``rocoin device join``); links are then cut so packets are
black-holed (``ip link set … down``), not refused — what killing a process never exercises.

Measured, while a client sends a query every ``--interval-s``:

1. a replica of a two-replica group is black-holed: the time until the source stops counting on
   it (its calls miss the deadline, or keepalive closes its stream), the p99 latency and the share
   of queries answered with every group during the fault;
2. the only replica of a group is black-holed (a spare has joined): the time until the first query
   answered with every group again (the source re-plans the spare into the group).

Every query must come back by its deadline (plus scheduling slack): none is lost.

Run (root, iproute2): ``.venv/bin/python bench/netns_faults.py [--out docs/bench/netns-faults.txt]
[--json FILE]``. The source and the client run in the hub namespace (``--driver``, started by
this script); the test suite runs it too (``tests/integration/test_netns_faults.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

TOKEN = "netns-faults-device-token-0123456789"
PORT = 50051
#: Keepalive of the source's server in this harness: a silent device is noticed within 2 s.
KEEPALIVE_TIME_MS = 1000
KEEPALIVE_TIMEOUT_MS = 1000
DEADLINE_S = 0.5
#: Link rate of every device (the test bundle's models are tiny: no speed-up needed).
RATE_BPS = 20e6


def orchestrate(args: argparse.Namespace) -> dict:
    from conftest import device
    from test_runtime import GROUPS, make_bundle

    from rocoin.contracts.fleet import Fleet, save_fleet
    from rocoin.runtime.cluster.netns import NetnsFabric, unavailable

    reason = unavailable()
    if reason is not None:
        raise SystemExit(f"skipped: network namespaces unavailable ({reason})")
    devices = [d for members, _ in GROUPS for d in members] + ["spare"]
    with tempfile.TemporaryDirectory() as tmp, NetnsFabric() as fabric:
        root = Path(tmp)
        make_bundle(root / "bundle")
        fleet = Fleet(devices=[device(d, 20, 4, RATE_BPS / 1e3, 0.05) for d in devices if d != "spare"])
        save_fleet(fleet, root / "fleet.yaml")
        (root / "token").write_text(TOKEN)
        fabric.create(devices, {d: RATE_BPS for d in devices})
        source = f"{fabric.hub_address}:{PORT}"
        result_path = root / "result.json"
        links = {d: {"hub_side": fabric.links[d].hub_side} for d in devices}
        driver = subprocess.Popen(
            fabric.command(fabric.hub, [sys.executable, __file__, "--driver", str(root), fabric.hub_address, json.dumps(links)]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        procs = []
        try:
            time.sleep(1.5)  # the source listens
            for d in devices:
                entry = root / f"{d}.yaml"
                entry.write_text(json.dumps(device(d, 20, 4, RATE_BPS / 1e3, 0.05).model_dump(mode="json", exclude_none=True)))
                options = root / f"{d}.join.json"
                options.write_text(
                    json.dumps(
                        {
                            "source": source,
                            "device_id": d,
                            "profile": str(entry),
                            "cache_dir": str(root / d),
                            "token_file": str(root / "token"),
                        }
                    )
                )
                log = open(root / f"{d}.log", "w")
                procs.append(subprocess.Popen(
                    fabric.command(fabric.links[d].namespace, [sys.executable, "-m", "rocoin.runtime.device.join_main", "--options", str(options)]),
                    stdout=log, stderr=subprocess.STDOUT,
                ))  # fmt: skip
            output, _ = driver.communicate(timeout=args.timeout_s)
        finally:
            if driver.poll() is None:
                driver.kill()
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        if not result_path.exists():
            raise SystemExit(f"the driver wrote no result; its output ends:\n{output[-3000:]}")
        return json.loads(result_path.read_text())


async def drive(root: Path, hub_address: str, links: dict) -> None:
    """In the hub namespace: the source, the client, the cuts."""
    import numpy as np
    from test_runtime import images_batch

    from rocoin.contracts.fleet import load_fleet
    from rocoin.runtime.api.server import serve_source
    from rocoin.runtime.source.source import Source
    from rocoin.runtime.transport.keepalive import Keepalive

    keepalive = Keepalive(time_ms=KEEPALIVE_TIME_MS, timeout_ms=KEEPALIVE_TIMEOUT_MS)
    source = Source(root / "bundle", load_fleet(root / "fleet.yaml"), deadline_s=DEADLINE_S, token=TOKEN, joins=True, keepalive=keepalive)
    stop = asyncio.Event()
    server = asyncio.ensure_future(
        serve_source(source, f"{hub_address}:{PORT}", stop=stop, device_token=TOKEN, state_dir=root / "state", grace_s=30.0)
    )

    def up(device_id: str) -> bool:
        replica = source.replica(device_id)
        return replica is not None and replica.state.up

    async def until(condition, timeout_s: float = 60.0) -> float:
        started = time.perf_counter()
        while not condition():
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError("timed out")
            await asyncio.sleep(0.01)
        return time.perf_counter() - started

    def cut(device_id: str) -> None:
        subprocess.run(["ip", "link", "set", links[device_id]["hub_side"], "down"], check=True)

    result: dict = {"deadline_s": DEADLINE_S, "keepalive_ms": [KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS], "rate_bps": RATE_BPS}
    try:
        await until(lambda: sum(up(d) for d in links if d != "spare") >= len(links) - 1 and "spare" in _members(source))
        await until(lambda: not source.fleet_status().get("busy"), 10)
        result["groups_before"] = [g["live_replicas"] for g in source.fleet_status()["groups"]]
        images = images_batch(1)

        async def load(seconds: float, watch) -> dict:
            """Queries every interval for ``seconds``; ``watch(result)`` is called on each answer."""
            latencies, complete = [], []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                started = time.perf_counter()
                answer = await source.infer(images)
                latencies.append(time.perf_counter() - started)
                complete.append(not answer.missing_groups)
                watch(answer)
                await asyncio.sleep(max(0.0, 0.02 - (time.perf_counter() - started)))
            return {
                "queries": len(latencies),
                "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
                "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
                "max_ms": 1e3 * max(latencies),
                "complete_share": float(np.mean(complete)),
            }

        result["baseline"] = await load(2.0, lambda a: None)
        # 1. a replica of a two-replica group goes silent
        groups = result["groups_before"]
        victim = next(g[0] for g in groups if len(g) >= 2)
        cut(victim)
        cut_at = time.perf_counter()
        detected: dict = {}

        def watch_detect(_answer) -> None:
            if "s" not in detected and not up(victim):
                detected["s"] = time.perf_counter() - cut_at

        result["replica_fault"] = await load(6.0, watch_detect)
        if "s" not in detected:
            detected["s"] = await until(lambda: not up(victim), 30) + (time.perf_counter() - cut_at)
        result["replica_fault"]["device"] = victim
        result["replica_fault"]["detected_s"] = detected["s"]
        # 2. the only replica of a group goes silent; the spare takes over
        groups = [g["live_replicas"] for g in source.fleet_status()["groups"]]
        lone_group = next(k for k, g in enumerate(groups) if len(g) == 1 and victim not in g)
        lone = groups[lone_group][0]
        cut(lone)
        cut_at = time.perf_counter()
        healed: dict = {}

        def watch_heal(answer) -> None:
            if "s" not in healed and not answer.missing_groups and lone not in answer.answered_by:
                healed["s"] = time.perf_counter() - cut_at

        result["group_fault"] = await load(8.0, watch_heal)
        result["group_fault"].update(device=lone, group=lone_group, healed_s=healed.get("s"))
        result["groups_after"] = [g["live_replicas"] for g in source.fleet_status()["groups"]]
        result["replans"] = source.fleet_status()["history"]
    finally:
        (root / "result.json").write_text(json.dumps(result, indent=1))
        stop.set()
        await server


def _members(source) -> set[str]:
    return {m["device_id"] for m in source.fleet_status()["members"] if m.get("spare") or m.get("serving_group") is not None}


def report(result: dict) -> None:
    r1, r2 = result["replica_fault"], result["group_fault"]
    print(
        f"devices in their own network namespaces, links shaped to {result['rate_bps'] / 1e6:g} Mbit/s with tbf; deadline"
        f" {1e3 * result['deadline_s']:.0f} ms; the source pings every {result['keepalive_ms'][0]} ms, timeout {result['keepalive_ms'][1]} ms"
    )
    print(
        f"baseline: {result['baseline']['queries']} queries, p99 {result['baseline']['p99_ms']:.1f} ms, every group {100 * result['baseline']['complete_share']:.1f} %"
    )
    print(
        f"replica {r1['device']} black-holed: noticed after {r1['detected_s']:.2f} s; {r1['queries']} queries meanwhile, p99 {r1['p99_ms']:.1f} ms"
        f" (max {r1['max_ms']:.1f}), every group {100 * r1['complete_share']:.1f} %"
    )
    healed = "never" if r2["healed_s"] is None else f"{r2['healed_s']:.2f} s"
    print(
        f"group {r2['group']}'s only replica {r2['device']} black-holed: every group again after {healed}; {r2['queries']} queries meanwhile,"
        f" p99 {r2['p99_ms']:.1f} ms (max {r2['max_ms']:.1f}), every group {100 * r2['complete_share']:.1f} %"
    )
    print(f"groups before {result['groups_before']}, after {result['groups_after']}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--driver":
        asyncio.run(drive(Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/netns-faults.txt"))
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements as JSON")
    parser.add_argument("--timeout-s", type=float, default=180.0)
    args = parser.parse_args()
    os.chdir(ROOT)
    result = orchestrate(args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    sys.path.insert(0, str(ROOT / "bench"))
    from report import report_to

    with report_to(args.out):
        report(result)


if __name__ == "__main__":
    main()
