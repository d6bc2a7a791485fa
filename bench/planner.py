"""Planner benchmark: planning time per scheme for 10 to 10,000 devices (F = 256).

Run: ``make bench`` or ``.venv/bin/python bench/planner.py [--repeats R] [--sizes 10,100,...] [--out FILE]``.
What it prints is also written to ``--out`` (default ``docs/bench/planner.txt``, the README's source).
Prints the time per plan (best of R), the time per device, the log-log slope between sizes
(the measured complexity), the gap of the heuristics to the exact optimum on 10-device fleets,
and the simulator's speed. The filter graph is built once per run and not counted: the planner
receives it (``rocoin plan`` builds it from ACT.npy before planning).
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
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
    parser.add_argument("--out", type=Path, default=Path("docs/bench/planner.txt"), help="also write the report here")
    args = parser.parse_args()
    with report_to(args.out):
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


if __name__ == "__main__":
    main()
