"""The runtime half of ``bench/fleet.py``: a source with ``--joins`` and real device clients
(:class:`~rocoin.runtime.device.join.JoinClient`) in this process, on loopback, serving the demo's
students (``results/demo/bundle``, made by ``make demo``) or any bundle with its fleet.

- **Model transfer**: from a device's first dial to its model verified, loaded and counted for
  its group (health check passed) — and the same on a rejoin, when the model is cached.
- **Recovery**: every replica of a group stops (its streams end); time from then to the first
  query answered with every group present, while a client sends a query every 10 ms.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from rocoin.contracts.fleet import Fleet, load_fleet
from rocoin.contracts.manifest import load_manifest
from rocoin.runtime.api.server import serve_source
from rocoin.runtime.device.join import JoinClient
from rocoin.runtime.source.source import Source

TOKEN = "bench-fleet-device-token-0123456789"
QUERY_INTERVAL_S = 0.01


async def _wait(condition, timeout_s: float = 60.0) -> None:
    limit = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > limit:
            raise TimeoutError("the fleet did not settle")
        await asyncio.sleep(0.005)


async def recovery_and_transfer(trials: int, bundle: Path = Path("results/demo/bundle"), fleet_path: Path | None = None) -> None:
    fleet_path = fleet_path or bundle.parent / "fleet.yaml"
    if not (bundle / "manifest.json").exists():
        print(f"\nruntime part skipped: no bundle at {bundle} (make demo makes one)")
        return
    manifest = load_manifest(bundle)
    fleet = load_fleet(fleet_path)
    profiles = {d.id: d.model_copy(update={"address": None}) for d in fleet.devices}
    spare = next(iter(profiles.values())).model_copy(update={"id": "spare-1"})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = Source(bundle, Fleet(devices=list(profiles.values())), deadline_s=1.0, token=TOKEN, joins=True)
        stop = asyncio.Event()
        server = asyncio.ensure_future(
            serve_source(source, "127.0.0.1:0", ready_file=root / "ready.json", stop=stop, device_token=TOKEN, state_dir=root / "state")
        )
        await _wait(lambda: (root / "ready.json").exists() or server.done())
        address = json.loads((root / "ready.json").read_text())["address"]

        def client(profile, name: str | None = None) -> JoinClient:
            return JoinClient(address, profile, root / (name or profile.id), token=TOKEN, seed=0)

        def up(device_id: str) -> bool:
            replica = source.replica(device_id)
            return replica is not None and replica.state.up

        clients = {d: client(p) for d, p in profiles.items()}
        tasks = {}
        first: list[float] = []
        for d, c in clients.items():  # one at a time: the transfer of one model, not ten at once
            started = time.perf_counter()
            tasks[d] = asyncio.ensure_future(c.run())
            await _wait(lambda d=d: up(d))
            first.append(time.perf_counter() - started)
        clients["spare-1"] = client(spare)
        tasks["spare-1"] = asyncio.ensure_future(clients["spare-1"].run())
        await _wait(lambda: clients["spare-1"].assigned.is_set())
        sizes = [m.size_bytes for m in manifest.groups]
        print(
            f"\nmodel transfer on loopback ({bundle}, group models {min(sizes) / 1e3:.0f} to {max(sizes) / 1e3:.0f} kB): first join to"
            f" serving, median {statistics.median(first) * 1e3:.1f} ms (max {max(first) * 1e3:.1f} ms) over {len(first)} devices"
        )
        images = np.random.default_rng(0).integers(0, 256, size=(1, *manifest.input.shape), dtype=np.uint8)
        rejoin, recovery, answered = [], [], []
        for trial in range(trials):
            groups = [k for k in range(source.num_groups) if sum(up(d.device_id) for d in source.devices if d.group == k) >= 2]
            if not groups:
                groups = list(range(source.num_groups))
            k = groups[trial % len(groups)]
            victims = [d.device_id for d in source.devices if d.group == k and d.up]
            killed = time.perf_counter()
            for v in victims:
                clients[v].stop()
            healed = None
            queries = complete = 0
            while healed is None and time.perf_counter() - killed < 30:
                result = await source.infer(images)
                queries += 1
                if not result.missing_groups:
                    complete += 1
                    if all(v not in result.answered_by for v in victims):
                        healed = time.perf_counter() - killed
                await asyncio.sleep(QUERY_INTERVAL_S)
            recovery.append(healed if healed is not None else float("inf"))
            answered.append(complete / max(queries, 1))
            for v in victims:  # they come back (their models cached)
                await tasks[v]
                clients[v] = client(profiles.get(v, spare), v)
                started = time.perf_counter()
                tasks[v] = asyncio.ensure_future(clients[v].run())
                await _wait(lambda v=v: clients[v].assigned.is_set())
                rejoin.append(time.perf_counter() - started)
            await asyncio.sleep(0.5)
        print(f"rejoin with the model cached: median {statistics.median(rejoin) * 1e3:.1f} ms over {len(rejoin)} rejoins")
        print(
            f"recovery after a whole group stops (streams end), {trials} trials: median {statistics.median(recovery) * 1e3:.1f} ms,"
            f" max {max(recovery) * 1e3:.1f} ms to the first query answered with every group; queries complete meanwhile:"
            f" {100 * statistics.mean(answered):.1f} %"
        )
        print(f"re-plans: {source.fleet_status()['replans']}")
        for c in clients.values():
            c.stop()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        stop.set()
        await server
