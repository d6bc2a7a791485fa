"""The planner demo: a generated fleet planned by every scheme, each plan simulated under failures.

Until the full pipeline (distillation, runtime) exists this is what ``make demo`` runs. It uses
the real planner and simulator; the teacher's activity is the synthetic stand-in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from rocoin.fileio import atomic_path, write_json_atomic, write_text_atomic
from rocoin.planning import filter_graph, make_plan, save_plan, synthetic_activations
from rocoin.planning.plan import Plan
from rocoin.profiles.catalog import default_catalog
from rocoin.profiles.fleet import generate_fleet, save_fleet
from rocoin.simulation import analytic, simulate

logger = logging.getLogger(__name__)

#: The deadline is this multiple of the slowest plan's failure-free latency [decision], so
#: every scheme can answer in full when nothing fails.
DEADLINE_FACTOR = 1.5
DEMO_INPUT_SHAPE = (1, 28, 28)
DEMO_FILTERS = 128
DEMO_IMAGES = 400
OPTIMAL_MAX_DEVICES = 10


@dataclass
class DemoRow:
    scheme: str
    groups: int
    students: str
    latency_s: float
    p_complete: float
    sim: dict
    exact: dict


@dataclass
class DemoReport:
    deadline_s: float
    trials: int
    rows: list[DemoRow] = field(default_factory=list)

    def table(self) -> Table:
        table = Table(title=f"Planner demo: {self.trials} simulated queries per scheme, deadline {self.deadline_s:.3g} s")
        for column in ("scheme", "groups", "T no failure s", "mean latency s", "p99 s", "P(all groups)", "missing groups"):
            table.add_column(column)
        for r in self.rows:
            table.add_row(
                r.scheme,
                str(r.groups),
                f"{r.latency_s:.3g}",
                f"{r.sim['latency_s']['mean']:.3g}",
                f"{r.sim['latency_s']['p99']:.3g}",
                f"{r.sim['p_complete']:.3f}",
                f"{r.sim['missing_groups_mean']:.3f}",
            )
        return table

    def markdown(self, assumptions: list[str]) -> str:
        lines = [
            "# rocoin planner demo",
            "",
            "| scheme | groups | students | T without failures (s) | mean latency (s) | p99 (s) | P(all groups answer) | mean missing groups | exact P(all) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.scheme} | {r.groups} | {r.students} | {r.latency_s:.3g} | {r.sim['latency_s']['mean']:.3g} |"
                f" {r.sim['latency_s']['p99']:.3g} | {r.sim['p_complete']:.3f} | {r.sim['missing_groups_mean']:.3f} |"
                f" {r.exact['p_complete']:.3f} |"
            )
        lines += ["", "Assumptions:", ""] + [f"- {a}" for a in assumptions] + [""]
        return "\n".join(lines)


def run_planner_demo(
    output: Path,
    *,
    devices: int = 10,
    heterogeneity: int = 4,
    success_prob: float = 0.8,
    epsilon: float = 0.05,
    trials: int = 20000,
    seed: int = 0,
) -> DemoReport:
    output.mkdir(parents=True, exist_ok=True)
    fleet = generate_fleet(devices, heterogeneity, success_prob, random_state=seed)
    save_fleet(fleet, output / "fleet.yaml")
    activations = synthetic_activations(DEMO_IMAGES, DEMO_FILTERS, random_state=seed)
    with atomic_path(output / "activations.npy") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, activations, allow_pickle=False)
    weights = filter_graph(activations)
    catalog = default_catalog(DEMO_INPUT_SHAPE)
    schemes = ["rocoin", "rocoin-g", "hetnonn", "nonn"] + (["optimal"] if devices <= OPTIMAL_MAX_DEVICES else [])
    plans: dict[str, Plan] = {}
    for scheme in schemes:
        plans[scheme] = make_plan(fleet, weights, catalog, scheme=scheme, epsilon=epsilon, seed=seed)
        save_plan(plans[scheme], output / f"plan-{scheme}.json")
        logger.info("%s: %d groups, T = %.4g s", scheme, plans[scheme].num_groups, plans[scheme].latency_s)
    deadline = DEADLINE_FACTOR * max(p.latency_s for p in plans.values())
    report = DemoReport(deadline_s=deadline, trials=trials)
    for scheme, plan in plans.items():
        sim = simulate(plan, fleet, trials=trials, timeout_s=deadline, random_state=seed).to_dict()
        exact = analytic(plan, fleet, timeout_s=deadline).to_dict()
        report.rows.append(
            DemoRow(scheme, plan.num_groups, ", ".join(sorted(plan.catalog)), plan.latency_s, plan.p_complete, sim, exact)
        )
    assumptions = [
        f"fleet: {devices} devices, heterogeneity level {heterogeneity} (Table IV), mean success probability {success_prob}, seed {seed}",
        f"teacher activity: synthetic, {DEMO_IMAGES} images × {DEMO_FILTERS} filters (a trained teacher replaces it in the full pipeline)",
        f"students: built-in catalog for {'x'.join(map(str, DEMO_INPUT_SHAPE))} inputs (shape arithmetic, not measured)",
        f"epsilon = {epsilon}; deadline = {DEADLINE_FACTOR} × the slowest plan's failure-free latency = {deadline:.3g} s",
        "a device fails independently with its outage probability; a failed device never answers",
    ]
    write_text_atomic(output / "report.md", report.markdown(assumptions))
    write_json_atomic(output / "results.json", {"deadline_s": deadline, "trials": trials, "rows": [r.__dict__ for r in report.rows]})
    return report
