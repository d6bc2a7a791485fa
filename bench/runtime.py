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
4. Dynamic batching (``--max-queue-delay-ms``): two sources on the same device workers, one
   batching and one not (delay 0). The *compute limit*: cores / (sum over the devices of their
   model's measured time per image), model-only, and the full limit with the client's and the
   source's measured CPU per query added; the curve at concurrency 1, 8, 32, 128 for both
   sources with the share of the limits reached, where the CPU goes and how many queries shared a
   message; the p50 at concurrency 1 of both compared in interleaved rounds (the machine varies
   from run to run); and the issue's targets, met or not.

The batching report in ``docs/bench/runtime-batching.md`` comes from::

    .venv/bin/python bench/runtime.py --bundle results/demo/bundle --fleet results/demo/fleet.yaml \
        --skip-plain --skip-emulation --batching-out docs/bench/runtime-batching.md
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
from report import report_to

from rocoin.contracts.fleet import Fleet, load_fleet
from rocoin.contracts.manifest import Manifest, load_manifest
from rocoin.runtime.api.client import run_queries
from rocoin.runtime.cluster.local import LocalCluster
from rocoin.runtime.source.settings import DEFAULT_MAX_QUEUE_DELAY_MS
from rocoin.simulation import simulate

CONCURRENCY = (1, 8, 32)
KILLED = 3
#: The batching curve, and its targets (issue 16): queries/s at concurrency 32 at least twice that at
#: concurrency 1 and at least 55 % of the model-only compute limit; p50 at concurrency 1 no worse.
BATCHING_CONCURRENCY = (1, 8, 32, 128)
TARGET_SPEEDUP = 2.0
TARGET_LIMIT_SHARE = 0.55
#: "No worse": the median over interleaved rounds of (p50 batching - p50 not batching) is at most
#: this share of the p50 not batching (the rounds' own spread is larger).
P50_TOLERANCE = 0.03


def cores() -> int:
    """CPU cores this process (and the cluster it starts) may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def group_model_p50_s(bundle: Path, repeats: int = 200, batch: int = 1) -> list[float]:
    """onnxruntime time per image of every group model at ``batch`` images per run (median of
    ``repeats`` runs, divided by ``batch``), in-process (one thread, like a worker)."""
    manifest = load_manifest(bundle)
    x = np.random.default_rng(0).normal(size=(batch, *manifest.input.shape)).astype(np.float32)
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
        times.append(float(np.median(samples)) / batch)
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
    device_pids = [m.pid for m in cluster.state.devices]
    return [measure_one(cluster, device_pids, images, labels, queries, concurrency) for concurrency in CONCURRENCY]


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


# --- dynamic batching ----------------------------------------------------------------------------


def batch_counts(cluster: LocalCluster) -> tuple[float, float]:
    """(messages, queries) the cluster's source has sent to the devices so far (its /metrics)."""
    with urllib.request.urlopen(f"http://{cluster.state.source.http_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    count = re.search(r"^rocoin_batch_queries_count (\S+)$", text, re.M)
    total = re.search(r"^rocoin_batch_queries_sum (\S+)$", text, re.M)
    return float(count.group(1)), float(total.group(1))


def measure_one(
    cluster: LocalCluster, device_pids: list[int], images, labels, queries: int, concurrency: int, *, batches: bool = False
) -> dict:
    """One run of ``queries`` queries at ``concurrency`` (after a warm-up): the client's report and the
    CPU per query of the client, the source and the devices; with ``batches`` (the source serves its
    HTTP /metrics) also the queries per message to the devices."""
    address = cluster.state.source.address
    asyncio.run(run_queries(address, images[:concurrency], labels[:concurrency], concurrency=concurrency))  # warm-up
    messages_before = batch_counts(cluster) if batches else None
    before = (sum(os.times()[:2]), cpu_s(cluster.state.source.pid), sum(cpu_s(pid) for pid in device_pids))
    report = asyncio.run(run_queries(address, images[:queries], labels[:queries], concurrency=concurrency))
    after = (sum(os.times()[:2]), cpu_s(cluster.state.source.pid), sum(cpu_s(pid) for pid in device_pids))
    cpu_ms = [1e3 * (a - b) / queries for a, b in zip(after, before)]
    row = {"concurrency": concurrency, **report, "cpu_ms_per_query": dict(zip(("client", "source", "devices"), cpu_ms))}
    if batches:
        messages_after = batch_counts(cluster)
        messages = messages_after[0] - messages_before[0]
        row["queries_per_message"] = (messages_after[1] - messages_before[1]) / messages if messages else float("nan")
    return row


def batching_benchmark(bundle: Path, fleet: Fleet, state: Path, images, labels, args, manifest: Manifest, per_image_1: list[float]) -> None:
    """``manifest``: the bundle's; ``per_image_1``: its group models' batch-1 times (``group_model_p50_s``)."""
    per_image_32 = group_model_p50_s(bundle, repeats=50, batch=32)
    group_of = {d: k for k, g in enumerate(manifest.plan.groups) for d in g.devices}
    model_1_s = sum(per_image_1[group_of[d]] for d in manifest.plan.device_ids)  # CPU of the models per query (one image)
    model_32_s = sum(per_image_32[group_of[d]] for d in manifest.plan.device_ids)
    n_cores = cores()
    limit_1, limit_32 = n_cores / model_1_s, n_cores / model_32_s
    #: the target is judged against the higher (stricter) of the two model-only limits
    limit = max(limit_1, limit_32)
    delay = args.max_queue_delay_ms
    print("# Dynamic batching: throughput against the compute limit\n")
    print(f"Made by `{shlex.join(['.venv/bin/python', *sys.argv])}` (bench/runtime.py).\n")
    print(
        f"{len(manifest.plan.device_ids)} device workers (one request at a time each, as the local cluster starts them),"
        f" {len(manifest.groups)} groups, {n_cores} CPU cores, deadline {args.deadline_s} s;"
        f" batching: --max-queue-delay-ms {delay:g} (default {DEFAULT_MAX_QUEUE_DELAY_MS:g}), --max-batch-images 64;"
        f" not batching: --max-queue-delay-ms 0. 1-minute load average at the start: {os.getloadavg()[0]:.2f}.\n"
    )
    print("## Compute limit\n")
    print("| | per image, batch 1 | per image, batch 32 |")
    print("|---|---|---|")
    print(
        "| group models (ms) | "
        + ", ".join(f"{1e3 * t:.3f}" for t in per_image_1)
        + " | "
        + ", ".join(f"{1e3 * t:.3f}" for t in per_image_32)
        + " |"
    )
    print(f"| sum over the devices of their model (ms per query) | {1e3 * model_1_s:.3f} | {1e3 * model_32_s:.3f} |")
    print(f"| model-only compute limit = cores / sum (queries/s) | {limit_1:.0f} | {limit_32:.0f} |")
    print(
        f"\nThe share of the limit below is against {limit:.0f} queries/s (the higher of the two: batching may make the models"
        " cheaper per image); the *full limit* adds the client's and the source's measured CPU per query of that row:"
        " cores / (sum + client + source).\n"
    )
    with LocalCluster(bundle, fleet, state / "batching", deadline_s=args.deadline_s, http=True, max_queue_delay_ms=delay) as on:
        device_pids = [m.pid for m in on.state.devices]

        def source(name: str, queue_delay_ms: float) -> LocalCluster:  # another source process on the same workers
            cluster = LocalCluster(
                bundle, load_fleet(on.state.fleet), state / name, devices=[], token=on.token, deadline_s=args.deadline_s,
                http=True, max_queue_delay_ms=queue_delay_ms,
            )  # fmt: skip
            cluster.start()
            return cluster

        off, off_2, on_2 = source("unbatched", 0), source("unbatched-2", 0), source("batching-2", delay)
        try:
            clusters = {"not batching": off, "batching": on}
            # p50 at concurrency 1 first (before the load of the curve), each mode on two source processes
            # (a process's own placement on the cores shows in its p50), in alternating order
            p50, rate_1 = p50_rounds({"not batching": (off, off_2), "batching": (on, on_2)}, images, labels, args)
            rows = batching_curve(clusters, device_pids, images, labels, args, limit, model_1_s, n_cores)
        finally:
            for cluster in (off, off_2, on_2):
                cluster.stop()
    report_p50_and_targets(p50, rate_1, rows, limit, args)


def p50_rounds(sources: dict, images, labels, args) -> tuple[dict, dict]:
    """Per round and mode: the mean over its source processes of their p50 and queries/s at concurrency 1."""
    p50 = {name: [] for name in sources}
    rate_1 = {name: [] for name in sources}
    queries = min(len(images), args.p50_queries)
    for i in range(args.p50_rounds):
        measured = {name: [] for name in sources}
        order = [(name, c) for name, pair in sources.items() for c in pair]
        for name, cluster in order if i % 2 == 0 else order[::-1]:
            measured[name].append(asyncio.run(run_queries(cluster.state.source.address, images[:queries], labels[:queries], concurrency=1)))
        for name, reports in measured.items():
            p50[name].append(float(np.mean([r["latency_s"]["p50"] for r in reports])))
            rate_1[name].append(float(np.mean([r["queries_per_s"] for r in reports])))
    return p50, rate_1


def batching_curve(clusters: dict, device_pids: list[int], images, labels, args, limit: float, model_1_s: float, n_cores: int) -> dict:
    """The curve of both sources (each row: the median of ``--repeats`` alternating runs), printed; its rows by source."""
    rows: dict[str, list[dict]] = {name: [] for name in clusters}
    spread: dict[tuple[str, int], list[float]] = {}
    for concurrency in BATCHING_CONCURRENCY:
        queries = min(len(images), max(args.queries, 10 * concurrency))
        runs: dict[str, list[dict]] = {name: [] for name in clusters}
        for repeat in range(args.repeats):
            for name in list(clusters) if (concurrency + repeat) % 2 else list(clusters)[::-1]:  # alternate which goes first
                runs[name].append(measure_one(clusters[name], device_pids, images, labels, queries, concurrency, batches=True))
        for name, measured in runs.items():  # the run with the median queries/s stands for the row
            measured.sort(key=lambda r: r["queries_per_s"])
            rows[name].append(measured[len(measured) // 2])
            spread[name, concurrency] = [r["queries_per_s"] for r in measured]
    print("## Throughput and latency\n")
    print(
        "| source | concurrency | queries/s | runs' queries/s | share of limit | full limit | share of full | p50 ms | p99 ms | queries per message"
        " | missing | accuracy | CPU ms/query: client | source | devices | of which models | CPU busy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, measured in rows.items():
        for r in measured:
            cpu = r["cpu_ms_per_query"]
            full = n_cores / (model_1_s + 1e-3 * (cpu["client"] + cpu["source"]))
            busy = sum(cpu.values()) * 1e-3 * r["queries_per_s"] / n_cores
            print(
                f"| {name} | {r['concurrency']} | {r['queries_per_s']:.0f}"
                f" | {', '.join(f'{q:.0f}' for q in spread[name, r['concurrency']])} | {r['queries_per_s'] / limit:.0%} | {full:.0f}"
                f" | {r['queries_per_s'] / full:.0%} | {1e3 * r['latency_s']['p50']:.2f} | {1e3 * r['latency_s']['p99']:.2f}"
                f" | {r['queries_per_message']:.1f} | {r['missing_groups_mean']:.3f} | {r.get('accuracy', float('nan')):.4f}"
                f" | {cpu['client']:.2f} | {cpu['source']:.2f} | {cpu['devices']:.2f} | {1e3 * model_1_s:.2f} | {busy:.0%} |"
            )
    print(
        "\n*queries/s*: the run with the median of the runs listed beside it (each source's runs alternate with the other's);"
        " *CPU ms/query*: user + system CPU of the client (this process), the source and the ten workers together per query"
        " (/proc); *of which models*: the sum of the models' own batch-1 time; *CPU busy*: all of it times queries/s over"
        " the cores (100 %: the machine is the limit; the rest went to other processes).\n"
    )
    return rows


def report_p50_and_targets(p50: dict, rate_1: dict, rows: dict, limit: float, args) -> None:
    off_p50, on_p50 = np.array(p50["not batching"]), np.array(p50["batching"])
    differences = on_p50 - off_p50
    print(
        f"## p50 at concurrency 1, interleaved ({args.p50_rounds} rounds of {args.p50_queries} queries on each of two source"
        " processes per mode, alternating order, before the curve; per round the mean of the two processes)\n"
    )
    print("| round | " + " | ".join(str(i + 1) for i in range(args.p50_rounds)) + " | median |")
    print("|---|" + "---|" * (args.p50_rounds + 1))
    for name, values in (("not batching", off_p50), ("batching", on_p50), ("difference", differences)):
        print(f"| {name} (ms) | " + " | ".join(f"{1e3 * v:.2f}" for v in values) + f" | {1e3 * np.median(values):.2f} |")
    print(f"\nBatching faster in {int((differences < 0).sum())} of {len(differences)} rounds.\n")
    on_rows = {r["concurrency"]: r for r in rows["batching"]}
    # concurrency 1: the better of the two modes' median over the interleaved rounds (the stricter target)
    q1 = max(float(np.median(rate_1[name])) for name in rate_1)
    q32 = on_rows[32]["queries_per_s"]
    print(
        "Queries/s at concurrency 1 over the rounds (median): "
        + ", ".join(f"{name} {float(np.median(rate_1[name])):.0f}" for name in rate_1)
        + f"; the targets below take the higher, {q1:.0f}.\n"
    )
    median_off = float(np.median(off_p50))
    targets = [
        (f"queries/s at concurrency 32 (batching) >= {TARGET_SPEEDUP:g} x concurrency 1", f"{q32:.0f} vs {q1:.0f}: {q32 / q1:.2f} x", q32 >= TARGET_SPEEDUP * q1),
        (f"queries/s at concurrency 32 >= {TARGET_LIMIT_SHARE:.0%} of the compute limit", f"{q32:.0f} / {limit:.0f} = {q32 / limit:.0%}", q32 >= TARGET_LIMIT_SHARE * limit),
        (
            f"p50 at concurrency 1 no worse than without batching (median difference <= {P50_TOLERANCE:.0%})",
            f"median difference {1e3 * float(np.median(differences)):+.2f} ms on {1e3 * median_off:.2f} ms",
            float(np.median(differences)) <= P50_TOLERANCE * median_off,
        ),
    ]  # fmt: skip
    print("## Targets (issue 16)\n")
    print("| target | measured | met |")
    print("|---|---|---|")
    for target, measured, met in targets:
        print(f"| {target} | {measured} | {'yes' if met else 'NO'} |")
    print(f"\n1-minute load average at the end: {os.getloadavg()[0]:.2f}.")


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
    parser.add_argument("--skip-batching", action="store_true", help="no dynamic batching comparison")
    parser.add_argument("--max-queue-delay-ms", type=float, default=DEFAULT_MAX_QUEUE_DELAY_MS, help="the batching source's queue delay")
    parser.add_argument("--p50-rounds", type=int, default=20, help="interleaved rounds of the p50 comparison at concurrency 1")
    parser.add_argument("--p50-queries", type=int, default=200, help="queries per round of the p50 comparison")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per source and concurrency of the batching curve (the median is shown)"
    )
    parser.add_argument(
        "--batching-out", type=Path, default=Path("docs/bench/runtime-batching.md"), help="also write the batching report here"
    )
    parser.add_argument("--cpus", type=int, default=None, help="run everything on the first N CPU cores (Linux): latency against cores")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/runtime.txt"), help="also write the report here (the README's source)")
    args = parser.parse_args()
    # --out holds the plain and emulation sections: not rewritten by a run that skips both
    with report_to(None if args.skip_plain and args.skip_emulation else args.out):
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
            if not args.skip_batching:
                with report_to(args.batching_out):
                    batching_benchmark(args.bundle, fleet, Path(state), test.images, test.labels, args, manifest, model_times)


if __name__ == "__main__":
    main()
