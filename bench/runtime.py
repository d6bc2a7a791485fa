"""Runtime benchmark on a loopback cluster: latency, overhead and throughput of the real source
and device-worker processes, with and without failures, and emulation vs. the simulator.

Run: ``.venv/bin/python bench/runtime.py --students results/bench-accuracy/students-rocoin.pt
--fleet results/bench-accuracy/fleet.yaml`` (any students.pt and the fleet it was planned for).

1. Exports the students to a bundle (once).
2. Without emulation: p50/p99 query latency and queries/s at concurrency 1, 8, 32 through the
   source's gRPC API; the p50 overhead over the slowest group model's own onnxruntime time
   (batch 1, measured in-process); the CPU time per query of the client, the source and the
   device workers together (from /proc: on a machine with fewer cores than processes, their sum
   divided by the cores bounds the latency); then the same with 3 devices killed (SIGKILL).
   ``--cpus N`` runs it all on N cores, to see how the latency depends on them.
3. With emulation (each worker delays its answer to its profile's t(d, s, k) and drops answers
   with its outage probability; the fleet's FLOP/s and rates are scaled up by --speedup so a
   query takes tens of milliseconds): the measured latency distribution against ``rocoin
   simulate`` for the same plan, fleet and deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from report import report_to

from rocoin.contracts.fleet import Fleet, load_fleet
from rocoin.contracts.manifest import load_manifest
from rocoin.runtime.api.client import run_queries
from rocoin.runtime.cluster.local import LocalCluster
from rocoin.simulation import simulate

CONCURRENCY = (1, 8, 32)
KILLED = 3


def cores() -> int:
    """CPU cores this process (and the cluster it starts) may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def group_model_p50_s(bundle: Path, repeats: int = 200) -> list[float]:
    """Batch-1 onnxruntime time of every group model, in-process (one thread, like a worker)."""
    manifest = load_manifest(bundle)
    x = np.random.default_rng(0).normal(size=(1, *manifest.input.shape)).astype(np.float32)
    times = []
    for model in manifest.groups:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(bundle / model.file), options, providers=["CPUExecutionProvider"])
        for _ in range(10):
            session.run(None, {model.input.name: x})
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            session.run(None, {model.input.name: x})
            samples.append(time.perf_counter() - started)
        times.append(float(np.median(samples)))
    return times


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(cluster: LocalCluster, images: np.ndarray, labels: np.ndarray, queries: int) -> list[dict]:
    """Each concurrency: the client's report, plus the CPU time per query of the client, the source and the devices."""
    address = cluster.state.source.address
    rows = []
    for concurrency in CONCURRENCY:
        asyncio.run(run_queries(address, images[:concurrency], labels[:concurrency], concurrency=concurrency))  # warm-up
        devices = [m.pid for m in cluster.state.devices]
        before = (sum(os.times()[:2]), cpu_s(cluster.state.source.pid), sum(cpu_s(pid) for pid in devices))
        report = asyncio.run(run_queries(address, images[:queries], labels[:queries], concurrency=concurrency))
        after = (sum(os.times()[:2]), cpu_s(cluster.state.source.pid), sum(cpu_s(pid) for pid in devices))
        cpu_ms = [1e3 * (a - b) / queries for a, b in zip(after, before)]
        rows.append({"concurrency": concurrency, **report, "cpu_ms_per_query": dict(zip(("client", "source", "devices"), cpu_ms))})
    return rows


def print_rows(title: str, rows: list[dict], slowest_model_s: float) -> None:
    print(f"\n# {title}")
    print(
        f"{'conc':>5} {'p50 ms':>8} {'p99 ms':>8} {'q/s':>8} {'p50 overhead ms':>16} {'in source p50':>14} {'missing':>8} {'accuracy':>9}"
        f" | CPU ms/query: {'client':>7} {'source':>7} {'devices':>8} {'/ cores':>8}"
    )
    for r in rows:
        overhead = 1e3 * (r["latency_s"]["p50"] - slowest_model_s)
        cpu = r["cpu_ms_per_query"]
        print(
            f"{r['concurrency']:>5} {1e3 * r['latency_s']['p50']:>8.2f} {1e3 * r['latency_s']['p99']:>8.2f} {r['queries_per_s']:>8.1f}"
            f" {overhead:>16.2f} {1e3 * r['source_latency_s']['p50']:>14.2f} {r['missing_groups_mean']:>8.3f} {r.get('accuracy', float('nan')):>9.4f}"
            f" | {'':>13} {cpu['client']:>7.2f} {cpu['source']:>7.2f} {cpu['devices']:>8.2f} {sum(cpu.values()) / cores():>8.2f}"
        )


def scaled(fleet: Fleet, speedup: float) -> Fleet:
    return Fleet(
        devices=[
            d.model_copy(update={"flops": d.flops * speedup, "rate_bps": d.rate_bps * speedup, "address": None}) for d in fleet.devices
        ],
        input_bits=fleet.input_bits,
    )


def plain_benchmark(bundle: Path, fleet: Fleet, state: Path, images, labels, args, slowest: float) -> None:
    with LocalCluster(bundle, fleet, state, deadline_s=args.deadline_s) as cluster:
        print_rows("no failures", measure(cluster, images, labels, args.queries), slowest)
        doomed = [m.name for m in cluster.state.devices][:KILLED]
        for name in doomed:
            cluster.kill_device(name)
        print_rows(f"{KILLED} devices killed ({', '.join(doomed)})", measure(cluster, images, labels, args.queries), slowest)


def emulation_benchmark(bundle: Path, fleet: Fleet, state: Path, images, labels, args) -> None:
    emulated_fleet = scaled(fleet, args.speedup)
    plan = load_manifest(bundle).plan
    with LocalCluster(bundle, emulated_fleet, state, emulate=True, deadline_s=args.deadline_s) as cluster:
        # one query at a time, as in the simulator's model (queued queries would add waiting time)
        queries = args.emulated_queries
        report = asyncio.run(run_queries(cluster.state.source.address, images[:queries], labels[:queries], concurrency=1))
    sim = simulate(plan, emulated_fleet, trials=100_000, timeout_s=args.deadline_s, random_state=0)
    print(
        f"\n# emulation (FLOP/s and rates x{args.speedup:g}), {report['queries']} queries, vs rocoin simulate, deadline {args.deadline_s} s"
    )
    print(f"{'':>22} {'measured':>10} {'simulated':>10}")
    print(f"{'mean latency ms':>22} {1e3 * report['latency_s']['mean']:>10.1f} {1e3 * sim.latency_mean_s:>10.1f}")
    print(f"{'p50 latency ms':>22} {1e3 * report['latency_s']['p50']:>10.1f} {1e3 * sim.latency_p50_s:>10.1f}")
    print(f"{'p99 latency ms':>22} {1e3 * report['latency_s']['p99']:>10.1f} {1e3 * sim.latency_p99_s:>10.1f}")
    measured_complete = 1 - report["queries_with_missing_groups"] / report["queries"]
    print(f"{'P(all groups)':>22} {measured_complete:>10.3f} {sim.p_complete:>10.3f}")
    print(f"{'mean missing groups':>22} {report['missing_groups_mean']:>10.3f} {sim.missing_groups_mean:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--students", type=Path, default=Path("results/bench-accuracy/students-rocoin.pt"))
    parser.add_argument("--fleet", type=Path, default=Path("results/bench-accuracy/fleet.yaml"))
    parser.add_argument("--bundle", type=Path, default=Path("results/bench-runtime/bundle"))
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--deadline-s", type=float, default=0.5)
    parser.add_argument("--speedup", type=float, default=100.0, help="FLOP/s and rate multiplier for the emulated run")
    parser.add_argument("--emulated-queries", type=int, default=300)
    parser.add_argument("--skip-plain", action="store_true", help="only the emulation comparison")
    parser.add_argument("--skip-emulation", action="store_true", help="only the plain benchmark")
    parser.add_argument("--cpus", type=int, default=None, help="run everything on the first N CPU cores (Linux): latency against cores")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/runtime.txt"), help="also write the report here (the README's source)")
    args = parser.parse_args()
    with report_to(args.out):
        if args.cpus is not None:  # the cluster's processes inherit it
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpus])
        logging.basicConfig(level=logging.ERROR)
        if not (args.bundle / "manifest.json").exists():
            from rocoin.export import export_bundle

            args.bundle.parent.mkdir(parents=True, exist_ok=True)
            export_bundle(args.students, args.bundle)
        manifest = load_manifest(args.bundle)
        fleet = load_fleet(args.fleet)
        from rocoin.data import load_dataset

        test = load_dataset(manifest.dataset).test
        model_times = group_model_p50_s(args.bundle)
        print(
            f"# bundle {args.bundle}: {len(manifest.groups)} groups, {len(manifest.plan.device_ids)} devices, deadline {args.deadline_s} s, {cores()} CPU cores"
        )
        print("# group models, batch-1 onnxruntime p50 (ms): " + ", ".join(f"{1e3 * t:.2f}" for t in model_times))
        with tempfile.TemporaryDirectory() as state:
            if not args.skip_plain:
                plain_benchmark(args.bundle, fleet, Path(state) / "plain", test.images, test.labels, args, max(model_times))
            if not args.skip_emulation:
                emulation_benchmark(args.bundle, fleet, Path(state) / "emulated", test.images, test.labels, args)


if __name__ == "__main__":
    main()
