"""Soak of the serving path: a local cluster (real worker processes and the source with its REST
API) under valid traffic mixed with bad requests, slow and idle sockets, idle periods and device
kills, for a stated duration. It reports what an operator would watch:

* answered share — valid queries answered 200 (anything else is a failure of the server);
* missing groups — per valid query, apart for the queries right after an idle period (the
  keepalive check: every group must be present) and while a killed replica is down (its group
  has another replica, so nothing should be missing either);
* bad requests — by status; any 5xx is a finding;
* false mark-downs — times the source marked a device down that was not killed;
* open sockets of the source process — before, at the peak of the slow/idle socket flood, after;
* the logs — bytes the source's log grew per bad request, and tracebacks in any log (none).

Run (any bundle and the fleet it was planned for, e.g. the demo's)::

    .venv/bin/python bench/soak.py --bundle results/demo/bundle --fleet results/demo/fleet.yaml \\
        --duration-s 300 --output docs/soak/mixed.json
    # the keepalive soak of issue 11: idle for 5 minutes, then queries
    .venv/bin/python bench/soak.py --bundle results/demo/bundle --fleet results/demo/fleet.yaml \\
        --cycles 1 --mix-s 10 --idle-s 300 --output docs/soak/idle-5min.json

One cycle: ``--mix-s`` of traffic (``--concurrency`` valid clients, one client of bad requests,
``--slow-sockets`` slowloris/idle sockets), during which one replica of a group with a spare is
killed (SIGKILL) and restarted after ``--down-s``; then ``--idle-s`` with no query at all; then
``--after-idle`` valid queries. Cycles repeat until ``--duration-s`` (at least ``--cycles``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import socket
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np

from rocoin.contracts.fileio import write_json_atomic
from rocoin.contracts.fleet import load_fleet
from rocoin.contracts.manifest import load_manifest
from rocoin.runtime.cluster.local import LocalCluster

INFER = "/v2/models/rocoin/infer"
#: Bad requests sent round-robin by the bad client: each must get a one-line 4xx.
BAD_BODIES = {
    "fp32 overflow": lambda shape: {
        "inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": [3e38] * int(np.prod(shape))}]
    },
    "fp32 near 1e36": lambda shape: {
        "inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": [1e36] * int(np.prod(shape))}]
    },
    "datatype a list": lambda shape: {
        "inputs": [{"name": "input", "shape": shape, "datatype": ["UINT8"], "data": [0] * int(np.prod(shape))}]
    },
    "70 dimensions": lambda shape: {"inputs": [{"name": "input", "shape": [1] * 70, "datatype": "UINT8", "data": [0]}]},
    "id with a newline": lambda shape: {
        "id": "q\nrocoin: WARNING: device forged",
        "inputs": [{"name": "input", "shape": shape, "datatype": "UINT8", "data": [0] * int(np.prod(shape))}],
    },
    "deep JSON": lambda shape: "[" * 5000 + "]" * 5000,
    "not JSON": lambda shape: "{'inputs': ",
}


def source_sockets(pid: int) -> int:
    """Open sockets of a process (Linux /proc)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def metric(text: str, name: str) -> dict[str, float]:
    """``{device: value}`` of a per-device counter in Prometheus text."""
    return {m[0]: float(m[1]) for m in re.findall(rf'^{name}{{device="([^"]+)"}} ([0-9.e+]+)$', text, re.M)}


class Soak:
    def __init__(self, args, cluster: LocalCluster, images: np.ndarray) -> None:
        self.args, self.cluster, self.images = args, cluster, images
        self.url = f"http://{cluster.state.source.http_address}"
        self.valid: list[dict] = []  # one record per valid query
        self.bad: Counter = Counter()  # (kind, status) -> count
        self.phase = "warm-up"
        self.down: set[str] = set()
        self.killed: Counter = Counter()
        self.sockets = {"start": 0, "peak": 0}  # "start": after the warm-up (the clients' pooled connections open)
        self.rng = random.Random(args.seed)

    async def query(self, session: aiohttp.ClientSession) -> None:
        image = self.images[self.rng.randrange(len(self.images))]
        body = {"inputs": [{"name": "input", "shape": [1, *image.shape], "datatype": "UINT8", "data": image.ravel().tolist()}]}
        record = {"phase": self.phase, "down": sorted(self.down), "t": time.monotonic()}
        try:
            async with session.post(self.url + INFER, json=body) as response:
                answer = await response.json(content_type=None)
                record["status"] = response.status
                record["missing"] = answer.get("parameters", {}).get("missing_groups") if response.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            record["status"], record["error"] = 0, type(exc).__name__
        self.valid.append(record)

    async def valid_client(self, session, until: float) -> None:
        while time.monotonic() < until:
            await self.query(session)

    async def bad_client(self, session, until: float) -> None:
        shape = [1, *self.images.shape[1:]]
        kinds = list(BAD_BODIES)
        i = 0
        while time.monotonic() < until:
            kind = kinds[i % len(kinds)]
            i += 1
            body = BAD_BODIES[kind](shape)
            data = body if isinstance(body, str) else json.dumps(body)
            try:
                async with session.post(self.url + INFER, data=data, headers={"Content-Type": "application/json"}) as response:
                    answer = await response.json(content_type=None)
                    one_line = isinstance(answer, dict) and "\n" not in str(answer.get("error", "\n"))
                    self.bad[(kind, response.status if one_line else f"{response.status} (not one line)")] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.bad[(kind, type(exc).__name__)] += 1
            await asyncio.sleep(0.02)

    async def slow_sockets(self, until: float) -> None:
        """Half the sockets never finish their headers (slowloris), half send nothing (idle)."""
        host, port = self.cluster.state.source.http_address.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        held = []
        for i in range(self.args.slow_sockets):
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, int(port)))
            if i % 2 == 0:
                await loop.sock_sendall(sock, b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: soak\r\n")
            held.append(sock)
        while time.monotonic() < until:
            self.sockets["peak"] = max(self.sockets["peak"], source_sockets(self.cluster.state.source.pid))
            for sock in held[::2]:
                try:
                    sock.send(b"X-Slow: 1\r\n")
                except OSError:
                    pass  # closed by the server: what should happen
            await asyncio.sleep(1.0)
        for sock in held:
            sock.close()

    async def kill_and_restart(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        groups = self.cluster.manifest.plan.groups
        spare = [d for g in groups if len(g.devices) > 1 for d in g.devices]
        victim = self.rng.choice(spare)
        self.down.add(victim)
        self.killed[victim] += 1
        self.cluster.kill_device(victim)
        logging.info("killed %s", victim)
        await asyncio.sleep(self.args.down_s)
        await asyncio.get_running_loop().run_in_executor(None, self.cluster.restart_device, victim)
        self.down.discard(victim)
        logging.info("restarted %s", victim)

    async def cycle(self, session, number: int) -> None:
        self.phase = f"mix {number}"
        until = time.monotonic() + self.args.mix_s
        await asyncio.gather(
            *(self.valid_client(session, until) for _ in range(self.args.concurrency)),
            self.bad_client(session, until),
            self.slow_sockets(until),
            self.kill_and_restart(time.monotonic() + self.args.mix_s / 4),
        )
        self.phase = f"idle {number}"
        logging.info("idle for %.0f s", self.args.idle_s)
        await asyncio.sleep(self.args.idle_s)
        self.phase = f"after idle {number}"
        for _ in range(self.args.after_idle):
            await self.query(session)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(self.args.warm_up):
                await self.query(session)
            self.sockets["start"] = source_sockets(self.cluster.state.source.pid)
            started, number = time.monotonic(), 0
            while number < self.args.cycles or time.monotonic() - started < self.args.duration_s:
                number += 1
                await self.cycle(session, number)
            self.elapsed_s = time.monotonic() - started
            async with session.get(self.url + "/metrics") as response:
                self.metrics = await response.text()
        self.sockets["end"] = source_sockets(self.cluster.state.source.pid)
        logs = [Path(m.log) for m in [*self.cluster.state.devices, self.cluster.state.source]]
        self.logs = {
            "source_bytes": Path(self.cluster.state.source.log).stat().st_size,
            "tracebacks": sum(path.read_text(errors="replace").count("Traceback") for path in logs),
        }

    def report(self) -> dict:
        valid = self.valid
        answered = [r for r in valid if r["status"] == 200]
        after_idle = [r for r in answered if r["phase"].startswith("after idle")]
        while_down = [r for r in answered if r["down"]]
        marked_down = metric(self.metrics, "rocoin_device_marked_down_total")
        false_downs = sum(max(0.0, n - self.killed.get(d, 0)) for d, n in marked_down.items())
        bad = {f"{kind}: {status}": n for (kind, status), n in sorted(self.bad.items(), key=str)}
        return {
            "command": "bench/soak.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(self.args).items() if v is not None),
            "duration_s": round(self.elapsed_s, 1),
            "valid_queries": len(valid),
            "answered_share": len(answered) / max(1, len(valid)),
            "missing_groups_mean": float(np.mean([r["missing"] for r in answered])) if answered else None,
            "queries_with_missing_groups": sum(1 for r in answered if r["missing"]),
            "after_idle": {"queries": len(after_idle), "with_missing_groups": sum(1 for r in after_idle if r["missing"])},
            "while_a_replica_was_down": {"queries": len(while_down), "with_missing_groups": sum(1 for r in while_down if r["missing"])},
            "bad_requests": bad,
            "bad_requests_5xx": sum(n for (_, status), n in self.bad.items() if str(status).startswith("5")),
            "kills": dict(self.killed),
            "marked_down": marked_down,
            "false_mark_downs": false_downs,
            "device_refusals": sum(metric(self.metrics, "rocoin_device_refusals_total").values()),
            "source_sockets": self.sockets,
            "source_log_bytes_per_bad_request": round(self.logs["source_bytes"] / max(1, sum(self.bad.values())), 1),
            "log_tracebacks": self.logs["tracebacks"],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--fleet", type=Path, required=True)
    parser.add_argument("--duration-s", type=float, default=120.0, help="keep cycling until this much time has passed")
    parser.add_argument("--cycles", type=int, default=1, help="at least this many cycles")
    parser.add_argument("--mix-s", type=float, default=30.0, help="traffic per cycle")
    parser.add_argument("--idle-s", type=float, default=20.0, help="no query at all per cycle")
    parser.add_argument("--after-idle", type=int, default=50, help="valid queries right after each idle period")
    parser.add_argument("--warm-up", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4, help="valid clients")
    parser.add_argument("--slow-sockets", type=int, default=40)
    parser.add_argument("--down-s", type=float, default=5.0, help="how long a killed replica stays down")
    parser.add_argument("--deadline-s", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write the report here (JSON)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    manifest = load_manifest(args.bundle)
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, size=(256, *manifest.input.shape), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as state:
        with LocalCluster(args.bundle, load_fleet(args.fleet), state, deadline_s=args.deadline_s, http=True) as cluster:
            soak = Soak(args, cluster, images)
            asyncio.run(soak.run())
    report = soak.report()
    print(json.dumps(report, indent=2))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.output, report)


if __name__ == "__main__":
    main()
