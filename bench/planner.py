"""Planner benchmark: planning time per scheme for 10 to 10,000 devices (F = 256).

Run: ``make bench`` or ``.venv/bin/python bench/planner.py [--repeats R] [--sizes 10,100,...] [--out FILE]``.
What it prints is also written to ``--out`` (default ``docs/bench/planner.txt``, the README's source).
Prints the time per plan (best of R), the time per device, the log-log slope between sizes
(the measured complexity), the gap of the heuristics to the exact optimum on 10-device fleets,
and the simulator's speed. The filter graph is built once per run and not counted: the planner
receives it (``rocoin plan`` builds it from ACT.npy before planning).

``--scale`` instead times the whole ``rocoin plan`` process on fleet files of ``--scale-sizes``
devices (default 10,000 and 100,000), YAML and JSON, F = 256: wall time and peak RSS of the
process (``os.wait4``), and in a second process the split into start-up (imports), reading the
file, parsing, validating, planning and writing the plan. Each run notes the 1-minute load
average before it (the machine is shared); the best of ``--repeats`` runs is kept. It writes
``docs/bench/planner-scale.md`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import report_to

from rocoin.planning import filter_graph, make_plan, synthetic_activations
from rocoin.profiles.generate import default_catalog, generate_fleet
from rocoin.simulation import simulate

SCHEMES = ("rocoin", "rocoin-g", "nonn", "hetnonn")


def best_time(func, repeats: int) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = func()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--filters", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (default docs/bench/planner.txt)")
    parser.add_argument("--scale", action="store_true", help="time whole `rocoin plan` processes on large fleet files instead")
    parser.add_argument("--scale-sizes", default="10000,100000")
    args = parser.parse_args()
    out = args.out or Path("docs/bench/planner-scale.md" if args.scale else "docs/bench/planner.txt")
    with report_to(out):
        if args.scale:
            scale(args)
        else:
            run(args)


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR)  # baselines warn about idle devices at every size
    sizes = [int(s) for s in args.sizes.split(",")]
    catalog = default_catalog((3, 32, 32))
    weights = filter_graph(synthetic_activations(500, args.filters, random_state=0))
    print(
        f"# planner benchmark: F = {args.filters}, epsilon = {args.epsilon}, heterogeneity 3, success 0.8, "
        f"best of {args.repeats}; {platform.processor() or platform.machine()}, numpy {np.__version__}"
    )
    print(f"{'devices':>8} {'scheme':>9} {'groups':>7} {'plan s':>9} {'us/device':>10} {'T s':>8}")
    times: dict[str, list[float]] = {s: [] for s in SCHEMES}
    for n in sizes:
        fleet = generate_fleet(n, 3, 0.8, random_state=n)
        for scheme in SCHEMES:
            seconds, plan = best_time(
                lambda fleet=fleet, scheme=scheme: make_plan(fleet, weights, catalog, scheme=scheme, epsilon=args.epsilon), args.repeats
            )
            times[scheme].append(seconds)
            print(f"{n:>8} {scheme:>9} {plan.num_groups:>7} {seconds:>9.4f} {1e6 * seconds / n:>10.1f} {plan.latency_s:>8.3f}")
    print("\n# measured complexity: slope of log(time) vs log(devices) between consecutive sizes")
    for scheme in SCHEMES:
        slopes = [math.log(times[scheme][i + 1] / times[scheme][i]) / math.log(sizes[i + 1] / sizes[i]) for i in range(len(sizes) - 1)]
        print(f"{scheme:>9}: " + ", ".join(f"{sizes[i]}->{sizes[i + 1]}: {s:.2f}" for i, s in enumerate(slopes)))

    print("\n# gap to the exact optimum of T on 10-device fleets (20 fleets, heterogeneity 4)")
    gaps: dict[str, list[float]] = {"rocoin/paper": [], "rocoin/minmax": [], "rocoin-g": []}
    solve_times = []
    for seed in range(20):
        fleet = generate_fleet(10, 4, 0.8, random_state=1000 + seed)
        seconds, optimal = best_time(lambda fleet=fleet: make_plan(fleet, weights, catalog, scheme="optimal", epsilon=args.epsilon), 1)
        solve_times.append(seconds)
        for label, kwargs in (("rocoin/paper", {}), ("rocoin/minmax", {"objective": "minmax"}), ("rocoin-g", {"scheme": "rocoin-g"})):
            plan = make_plan(fleet, weights, catalog, epsilon=args.epsilon, **kwargs)
            gaps[label].append(plan.latency_s / optimal.latency_s - 1)
    for label, values in gaps.items():
        print(
            f"{label:>14}: mean gap {100 * np.mean(values):.2f} %, worst {100 * np.max(values):.2f} %, optimal in {sum(v < 1e-9 for v in values)}/20"
        )
    print(f"{'exact solver':>14}: {np.median(solve_times):.3f} s median per 10-device plan")

    experiments_setting_gaps(args.epsilon)

    fleet = generate_fleet(1000, 3, 0.8, random_state=7)
    plan = make_plan(fleet, weights, catalog, epsilon=args.epsilon)
    seconds, _ = best_time(lambda: simulate(plan, fleet, trials=100_000, timeout_s=2 * plan.latency_s, random_state=0), 1)
    print(f"\n# simulator: 100,000 queries of a 1,000-device plan ({plan.num_groups} groups) in {seconds:.2f} s")


def experiments_setting_gaps(epsilon: float) -> None:
    """The same gap in the setting of ``rocoin experiment`` (Fig. 7): there the built-in catalog's
    finding does not carry over, because eq. 5 no longer picks the fastest student."""
    from rocoin.experiments.common import planner_inputs
    from rocoin.experiments.setup import ExperimentSetup

    setup = ExperimentSetup()
    weights, catalog, filters = planner_inputs(setup)
    print(
        f"\n# gap to the exact optimum of T in rocoin experiment's setting (Fig. 7): 10 devices, students {', '.join(setup.students)}"
        f" counted for {setup.dataset}, F = {filters}, rates in {setup.rate_unit}; 20 fleets per heterogeneity level"
    )
    print(f"{'level':>5} " + " ".join(f"{label + ' mean/worst %':>26}" for label in ("rocoin/paper", "rocoin/minmax", "rocoin-g")))
    for level in range(6):
        gaps: dict[str, list[float]] = {"paper": [], "minmax": [], "rocoin-g": []}
        for seed in range(20):
            fleet = generate_fleet(10, level, setup.success_prob, random_state=1000 + seed, rate_unit=setup.rate_unit)
            optimal = make_plan(fleet, weights, catalog, scheme="optimal", epsilon=epsilon)
            for label, kwargs in (("paper", {}), ("minmax", {"objective": "minmax"}), ("rocoin-g", {"scheme": "rocoin-g"})):
                gaps[label].append(make_plan(fleet, weights, catalog, epsilon=epsilon, **kwargs).latency_s / optimal.latency_s - 1)
        print(f"{level:>5} " + " ".join(f"{f'{100 * np.mean(v):.1f} / {100 * np.max(v):.1f}':>26}" for v in gaps.values()))


# --- the whole `rocoin plan` process on large fleet files -----------------------------------------

ROCOIN = Path(sys.executable).with_name("rocoin")


#: Run by ``python -c`` in a fresh process: times the imports of this module and of split().
SPLIT = (
    "import sys, time; s = time.perf_counter(); sys.path.insert(0, sys.argv[1]); import planner; planner.split(*sys.argv[2:], started=s)"
)


def split(fleet_path: str, act_path: str, plan_path: str, *, started: float) -> None:
    """What ``rocoin plan FLEET --activations ACT -o PLAN`` does, step by step, timed (JSON on stdout).

    ``imports`` counts this module's imports too (numpy, rocoin.planning, the simulator); scikit-learn
    is imported by the first k-means, inside ``plan``.
    """
    times: dict[str, float] = {}
    from rocoin.contracts import fileio
    from rocoin.contracts.fleet import Fleet
    from rocoin.contracts.plan import save_plan
    from rocoin.planning import filter_graph, make_plan
    from rocoin.planning.activations import load_activations
    from rocoin.profiles.generate import default_catalog

    now = time.perf_counter()
    times["imports"], last = now - started, now

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        times[name], last = now - last, now

    text = fileio._read_document_text(Path(fleet_path))
    lap("read")
    if fleet_path.endswith(".json"):
        data = json.loads(text, object_pairs_hook=fileio._unique_pairs)
        times["reader"] = 0.0
    elif not hasattr(fileio, "_load_plain_yaml"):  # a tree from before the fast reader (PYTHONPATH=...)
        data = fileio.yaml.load(text, Loader=fileio._StrictLoader)
        times["reader"] = 2.0
    else:
        try:
            data = fileio._load_plain_yaml(text)
            times["reader"] = 1.0  # yaml-rs
        except fileio._NotPlain:
            data = fileio._load_yaml(text)
            times["reader"] = 2.0  # PyYAML
    fileio._check_document_shape(data, fleet_path)
    lap("parse")
    fleet = fileio.validate(Fleet, data, fleet_path)
    lap("validate")
    weights = filter_graph(load_activations(act_path))
    plan = make_plan(fleet, weights, default_catalog((3, 32, 32)))
    lap("plan")
    save_plan(plan, plan_path)
    lap("write")
    times["groups"], times["latency_s"] = plan.num_groups, plan.latency_s
    print(json.dumps(times))


def timed_process(command: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MiB) and exit status of ``command`` run alone in a child process."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def scale(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR)
    sizes = [int(s) for s in args.scale_sizes.split(",")]
    print(f"# `rocoin plan` on large fleets: whole process, F = {args.filters}, epsilon 0.05 (default), theta auto, heterogeneity 3")
    print()
    where = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    print(f"Command: `{where}{shlex.join(['.venv/bin/python', *sys.argv])}`")
    import rocoin

    print(f"rocoin from {Path(rocoin.__file__).parent.parent}")
    print(f"Machine: {os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}, numpy {np.__version__};")
    print(f"best of {args.repeats} runs; `load` is the 1-minute load average just before the run (the cores are shared).")
    print()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        act = tmp / "act.npy"
        np.save(act, synthetic_activations(500, args.filters, random_state=0), allow_pickle=False)
        rows = []
        for n in sizes:
            fleet = generate_fleet(n, 3, 0.8, random_state=n)
            (tmp / f"fleet-{n}.yaml").write_text(fleet.to_yaml())
            (tmp / f"fleet-{n}.json").write_text(json.dumps(fleet.model_dump(mode="json", exclude_none=True)))
            for suffix in ("yaml", "json"):
                path = tmp / f"fleet-{n}.{suffix}"
                runs = []
                for _ in range(args.repeats):
                    load = os.getloadavg()[0]
                    wall, rss, code = timed_process(
                        [str(ROCOIN), "plan", str(path), "--activations", str(act), "-o", str(tmp / "plan.json")]
                    )
                    if code != 0:
                        raise SystemExit(f"rocoin plan {path.name} exited with {code}")
                    parts = json.loads(
                        subprocess.run(
                            [sys.executable, "-c", SPLIT, str(Path(__file__).parent), str(path), str(act), str(tmp / "plan-split.json")],
                            check=True,
                            capture_output=True,
                            text=True,
                        ).stdout
                    )
                    runs.append((wall, rss, load, parts))
                    print(f"<!-- {n} {suffix}: {wall:.2f} s, {rss:.0f} MiB, load {load:.2f}; split {parts} -->", flush=True)
                wall, rss, load, parts = min(runs, key=lambda r: r[0])
                reader = {0.0: "json", 1.0: "yaml-rs", 2.0: "PyYAML"}[parts["reader"]]
                rows.append((n, suffix, wall, max(r[1] for r in runs), load, parts, reader, os.path.getsize(path) / 2**20))
    print()
    print(
        "| devices | file | MiB | reader | `rocoin plan` wall s | peak RSS MiB | load | imports | read | parse | validate | plan | write | groups | T s |"
    )
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, suffix, wall, rss, load, parts, reader, size in rows:
        steps = " | ".join(f"{parts[k]:.2f}" for k in ("imports", "read", "parse", "validate", "plan", "write"))
        print(
            f"| {n:,} | {suffix} | {size:.1f} | {reader} | {wall:.2f} | {rss:.0f} | {load:.2f} | {steps} | {int(parts['groups'])} | {parts['latency_s']:.4f} |"
        )
    print()
    print("Targets (issue 16, part 3): 100,000 devices, YAML or JSON, whole process <= 10 s and <= 1 GB (953 MiB) peak memory.")
    print("The split comes from a second process doing the same steps (`SPLIT`); parse includes the document checks (depth, values);")
    print(
        "imports are numpy, pydantic, scipy and rocoin (and the benchmark's own); scikit-learn is imported by the first k-means, in plan."
    )


if __name__ == "__main__":
    main()
