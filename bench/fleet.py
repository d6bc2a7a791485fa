"""Fleet benchmark (issue 14): re-plan time with the students and partition fixed, for 10, 100
and 10,000 devices; and, on loopback with real devices that dial the source, the time a model
takes to reach a device and the time from a whole group's death to the first query answered with
every group present.

Run: ``.venv/bin/python bench/fleet.py [--bundle results/demo/bundle] [--sizes 10,100,10000] [--repeats 3] [--out FILE]``
(default ``docs/bench/fleet.txt``, the README's source). ``--skip-runtime`` runs the re-plan part only.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import platform
from pathlib import Path

import numpy as np
from planner import best_time
from report import report_to

from rocoin.contracts.fleet import Fleet
from rocoin.planning import filter_graph, make_plan, replan, synthetic_activations
from rocoin.profiles.generate import default_catalog, generate_fleet


def replan_times(sizes: list[int], repeats: int, filters: int = 64) -> None:
    """Plan half of a fleet, then re-plan: the other half joins; 10 % leave; a whole group dies."""
    catalog = default_catalog((1, 28, 28))
    weights = filter_graph(synthetic_activations(200, filters, random_state=0))
    print(f"re-plan time (best of {repeats}), F = {filters}, heterogeneity 3, success probability 0.8:")
    print(f"{'devices':>8} {'groups':>6} {'join':>9} {'churn':>9} {'group lost':>11} {'moves(lost)':>11} {'exact':>6}")
    for n in sizes:
        fleet = generate_fleet(n, 3, 0.8, random_state=n)
        half = Fleet(devices=fleet.devices[: max(2, n // 2)])
        plan = make_plan(half, weights, catalog, scheme="rocoin" if n <= 1000 else "hetnonn", epsilon=0.05)
        join_s, joined = best_time(functools.partial(replan, plan, fleet), repeats)
        churned = Fleet(devices=[d for i, d in enumerate(fleet.devices) if i % 10 != 3])
        churn_s, _ = best_time(functools.partial(replan, joined.plan, churned), repeats)
        dead = set(joined.plan.groups[0].devices)
        survivors = Fleet(devices=[d for d in fleet.devices if d.id not in dead])
        lost_s, healed = best_time(functools.partial(replan, joined.plan, survivors), repeats)
        print(
            f"{n:>8} {joined.plan.num_groups:>6} {join_s * 1e3:>7.1f}ms {churn_s * 1e3:>7.1f}ms {lost_s * 1e3:>9.1f}ms"
            f" {len(healed.moves):>11} {str(healed.exact):>6}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10,100,10000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-runtime", action="store_true", help="only the re-plan times")
    parser.add_argument("--trials", type=int, default=5, help="group deaths (and model transfers) measured")
    parser.add_argument(
        "--bundle",
        type=Path,
        default=Path("results/demo/bundle"),
        help="bundle served (its fleet.yaml beside it; make demo makes this one)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/bench/fleet.txt"), help="also write the report here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with report_to(args.out):
        print(f"# bench/fleet.py on {platform.node() or 'this machine'}: Python {platform.python_version()}, {platform.machine()}")
        replan_times([int(s) for s in args.sizes.split(",")], args.repeats)
        if not args.skip_runtime:
            from fleet_runtime import recovery_and_transfer

            asyncio.run(recovery_and_transfer(args.trials, args.bundle))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
