"""The planner-only experiments (Fig. 4, Fig. 7, scale): students counted from their shapes and a
synthetic filter activity, so they need no torch and no data."""

from __future__ import annotations

import time

import numpy as np

from rocoin.contracts.errors import InfeasiblePlanError
from rocoin.experiments.common import (
    DEADLINE_FACTOR,
    LABELS,
    MINMAX_LABEL,
    SCHEMES,
    SIGNIFICANT_SE,
    paired_gap,
    planner_inputs,
    resource_totals,
    setup_caption,
    simulated_latency,
)
from rocoin.experiments.report import ExperimentResult
from rocoin.experiments.workspace import Workspace
from rocoin.planning import make_plan
from rocoin.planning.partition import contiguous_partition, normalized_cut_value, random_partition


def ncut_values(weights: np.ndarray, plan, *, random_state: int) -> dict[str, float]:
    """Eq. 3 of the plan's partitions, and of a random and a contiguous partition of the same sizes."""
    parts = [np.asarray(g.filters) for g in plan.groups]
    sizes = [len(p) for p in parts]
    return {
        "ncut": normalized_cut_value(weights, parts),
        "ncut_random": normalized_cut_value(weights, random_partition(sizes, random_state=random_state)),
        "ncut_contiguous": normalized_cut_value(weights, contiguous_partition(sizes)),
    }


# --- Fig. 4 -------------------------------------------------------------------------------------


def fig4(ws: Workspace) -> ExperimentResult:
    s = ws.setup
    weights, catalog, filters = planner_inputs(s)
    rows = []
    with ws.progress("fig4: planning fleets", len(s.epsilons) * s.fleets) as advance:
        for eps in s.epsilons:
            totals = []
            for f in range(s.fleets):
                try:
                    plan = make_plan(ws.fleet(seed=s.seed + f), weights, catalog, scheme="rocoin", epsilon=eps, seed=s.seed)
                    totals.append({**resource_totals(plan), **ncut_values(weights, plan, random_state=s.seed + f)})
                except InfeasiblePlanError:
                    pass
                advance()
            if totals:
                mean = {k: float(np.mean([t[k] for t in totals])) for k in totals[0]}
                rows.append(
                    {
                        "epsilon": eps,
                        "fleets": len(totals),
                        **{k: round(v, 4 if k.startswith("ncut") else 2) for k, v in mean.items()},
                        "valid_to_total_flops": round(mean["valid_mflops"] / mean["total_mflops"], 3),
                    }
                )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        x = np.arange(len(rows))
        labels = [str(r["epsilon"]) for r in rows]
        for ax, total, valid, unit in (
            (ax1, "total_mflops", "valid_mflops", "MFLOPs"),
            (ax2, "total_params_k", "valid_params_k", "k parameters"),
        ):
            ax.bar(x - 0.2, [r[total] for r in rows], 0.4, label="S-Total (with replicas)")
            ax.bar(x + 0.2, [r[valid] for r in rows], 0.4, label="S-Valid (distinct students)")
            ax.set_xticks(x, labels)
            ax.set_xlabel("ε")
            ax.set_ylabel(unit)
            ax.legend()

    ratios = [r["valid_to_total_flops"] for r in rows]
    below = sum(1 for r in rows if r["ncut"] < min(r["ncut_random"], r["ncut_contiguous"]))
    findings = [
        f"The normalised cut (eq. 3) of RoCoIn's partitions is below that of random and of contiguous partitions of the same sizes at "
        f"{below} of {len(rows)} ε values (means over fleets: "
        + "; ".join(
            f"ε = {r['epsilon']}: {r['ncut']:.3f} vs {r['ncut_random']:.3f} random, {r['ncut_contiguous']:.3f} contiguous" for r in rows
        )
        + ").",
        "Paper: a smaller ε buys failure resilience with more replicas, i.e. lower resource utilisation (S-Valid / S-Total). "
        f"Here S-Valid/S-Total FLOPs goes {' → '.join(f'{r:.2f}' for r in ratios)} for ε = {' → '.join(str(r['epsilon']) for r in rows)}"
        + (" (agrees)." if all(b >= a - 1e-9 for a, b in zip(ratios, ratios[1:], strict=False)) else " (not monotone)."),
    ]
    caption = (
        f"RoCoIn plans of {s.fleets} generated fleets per ε; "
        + setup_caption(s, trained=False)
        + f"; students {', '.join(s.students)} counted from their shapes; F = {filters}."
    )
    return ExperimentResult(
        "fig4", "Fig. 4: FLOPs and parameters of all students (S-Total) vs distinct ones (S-Valid)", caption, rows, plot, findings
    )


# --- Fig. 7 -------------------------------------------------------------------------------------

#: Fig. 7's series: (scheme key in the CSV, planner scheme, objective); rocoin-minmax is our addition.
FIG7_SERIES = (*((x, x, "paper") for x in SCHEMES), ("rocoin-minmax", "rocoin", "minmax"))
FIG7_LABELS = {**LABELS, "rocoin-minmax": MINMAX_LABEL}


def fig7(ws: Workspace) -> ExperimentResult:
    """Latency vs heterogeneity, as the paper measures it: the mean latency of simulated queries
    under device failures (deadline: 1.5 × the largest planned T on the fleet), beside planned T."""
    s = ws.setup
    weights, catalog, filters = planner_inputs(s)
    samples = _fig7_samples(ws, weights, catalog)
    rows = [_fig7_row(level, key, samples[level][key]) for level in range(6) for key, _, _ in FIG7_SERIES]
    findings = _fig7_findings(s, samples, rows)
    caption = (
        f"{s.fleets} generated fleets per level ({s.devices} devices, mean success {s.success_prob}, rates in {s.rate_unit}), "
        f"ε = {s.epsilon}; students {', '.join(s.students)} counted from their shapes; synthetic filter activity, F = {filters}. "
        f"Left: mean latency of {s.latency_trials} simulated queries per fleet under independent outages, a missing group waiting "
        f"until the deadline ({DEADLINE_FACTOR} × the largest planned T of the compared plans on that fleet). Right: planned T."
    )
    return ExperimentResult("fig7", "Fig. 7: latency vs heterogeneity level", caption, rows, _fig7_plot(s, rows), findings)


def _fig7_samples(ws: Workspace, weights: np.ndarray, catalog) -> dict[int, dict[str, list[tuple[float, float, float]]]]:
    """Per level and series: one (mean simulated latency, planned T, deadline) per fleet where every series has a plan."""
    s = ws.setup
    samples: dict[int, dict[str, list[tuple[float, float, float]]]] = {level: {k: [] for k, _, _ in FIG7_SERIES} for level in range(6)}
    with ws.progress("fig7: planning and simulating fleets", 6 * s.fleets) as advance:
        for level in range(6):
            for f in range(s.fleets):
                fleet = ws.fleet(heterogeneity=level, seed=s.seed + f)
                try:
                    plans = {
                        key: make_plan(fleet, weights, catalog, scheme=scheme, epsilon=s.epsilon, objective=objective, seed=s.seed)
                        for key, scheme, objective in FIG7_SERIES
                    }
                except InfeasiblePlanError:
                    advance()
                    continue  # compared on the same fleets only
                deadline, means = simulated_latency(plans, fleet, s.latency_trials, s.seed + f)
                for key, plan in plans.items():
                    samples[level][key].append((means[key], plan.latency_s, deadline))
                advance()
    return samples


def _fig7_row(level: int, key: str, values: list[tuple[float, float, float]]) -> dict:
    mean, planned, deadline = (np.array([v[i] for v in values]) for i in range(3)) if values else (np.array([np.nan]),) * 3
    return {
        "level": level,
        "scheme": key,
        "mean_latency_s": round(float(mean.mean()), 4),
        "planned_latency_s": round(float(planned.mean()), 4),
        "mean_latency_s_std": round(float(mean.std()), 4),
        "planned_latency_s_std": round(float(planned.std()), 4),
        "deadline_s": round(float(deadline.mean()), 4),
        "fleets": len(values),
    }


def _fig7_plot(s, rows: list[dict]):
    def plot(fig) -> None:
        axes = fig.subplots(1, 2)
        for ax, column, label in (
            (axes[0], "mean_latency_s", f"mean latency of simulated queries (s), {s.fleets} fleets"),
            (axes[1], "planned_latency_s", f"planned latency T (s), mean ± std of {s.fleets} fleets"),
        ):
            for i, (key, _, objective) in enumerate(FIG7_SERIES):
                mine = [r for r in rows if r["scheme"] == key]
                ax.errorbar(
                    [r["level"] for r in mine],
                    [r[column] for r in mine],
                    yerr=[r[f"{column}_std"] for r in mine],
                    marker="o",
                    linestyle="--" if objective == "minmax" else "-",
                    capsize=3,
                    color=f"C{i}",
                    label=FIG7_LABELS[key],
                )
            ax.set_xlabel("heterogeneity level (Table IV)")
            ax.set_ylabel(label)
            ax.legend()

    return plot


def _fig7_findings(s, samples: dict, rows: list[dict]) -> list[str]:
    at = {(r["scheme"], r["level"]): r for r in rows}
    lowest = []
    for level in range(6):
        rocoin = [v[0] for v in samples[level]["rocoin"]]
        gaps = [paired_gap(rocoin, [v[0] for v in samples[level][other]]) for other in ("nonn", "hetnonn")]
        if rocoin and all(gap > SIGNIFICANT_SE * se for gap, se in gaps):
            lowest.append(level)
    planned_lowest = sum(
        1
        for level in range(6)
        if at[("rocoin", level)]["planned_latency_s"] < min(at[(x, level)]["planned_latency_s"] for x in ("nonn", "hetnonn"))
    )
    grows = all(at[(k, 5)]["mean_latency_s"] > at[(k, 0)]["mean_latency_s"] for k in ("rocoin", "nonn", "hetnonn"))
    return [
        f"Paper: latency grows with heterogeneity. Here the mean simulated latency of RoCoIn goes {at[('rocoin', 0)]['mean_latency_s']:.3f} → "
        f"{at[('rocoin', 5)]['mean_latency_s']:.3f} s, NoNN's {at[('nonn', 0)]['mean_latency_s']:.3f} → {at[('nonn', 5)]['mean_latency_s']:.3f} s, "
        f"HetNoNN's {at[('hetnonn', 0)]['mean_latency_s']:.3f} → {at[('hetnonn', 5)]['mean_latency_s']:.3f} s"
        + (" (agrees)." if grows else " (does not grow for every scheme)."),
        f"Paper: RoCoIn has the lowest latency at every level, NoNN the highest. Here RoCoIn's mean simulated latency is below both NoNN's and "
        f"HetNoNN's by more than {SIGNIFICANT_SE:g} standard errors of the paired per-fleet difference at {len(lowest)} of 6 levels "
        f"({', '.join(map(str, lowest)) or 'none'}); at level 5: RoCoIn {at[('rocoin', 5)]['mean_latency_s']:.3f}, NoNN "
        f"{at[('nonn', 5)]['mean_latency_s']:.3f}, HetNoNN {at[('hetnonn', 5)]['mean_latency_s']:.3f}, RoCoIn-G {at[('rocoin-g', 5)]['mean_latency_s']:.3f} s. "
        f"With planned T instead (failure-free), RoCoIn is strictly lowest at {planned_lowest} of 6 levels.",
    ]


# --- scale --------------------------------------------------------------------------------------


def scale(ws: Workspace) -> ExperimentResult:
    from rocoin.simulation import simulate

    s = ws.setup
    weights, catalog, filters = planner_inputs(s)
    rows = []
    with ws.progress("scale: planning and simulating", len(s.scale_devices) * len(SCHEMES)) as advance:
        for n in s.scale_devices:
            fleet = ws.fleet(devices=n)
            for scheme in SCHEMES:
                started = time.perf_counter()
                plan = make_plan(fleet, weights, catalog, scheme=scheme, epsilon=s.epsilon, seed=s.seed)
                plan_s = time.perf_counter() - started
                deadline = DEADLINE_FACTOR * plan.latency_s
                sim = simulate(plan, fleet, trials=s.sim_queries, timeout_s=deadline, random_state=s.seed)
                rows.append(
                    {
                        "devices": n,
                        "scheme": LABELS[scheme],
                        "groups": plan.num_groups,
                        "idle_devices": len(plan.unassigned),
                        "plan_s": round(plan_s, 4),
                        "planned_latency_s": round(plan.latency_s, 4),
                        "sim_latency_mean_s": round(sim.latency_mean_s, 4),
                        "sim_latency_p99_s": round(sim.latency_p99_s, 4),
                        "p_all_groups": round(sim.p_complete, 4),
                        "missing_groups_mean": round(sim.missing_groups_mean, 3),
                        **{k: round(v, 4) for k, v in ncut_values(weights, plan, random_state=s.seed).items()},
                    }
                )
                advance()

    def plot(fig) -> None:
        ax1, ax2, ax3 = fig.subplots(1, 3)
        for i, scheme in enumerate(SCHEMES):
            mine = [r for r in rows if r["scheme"] == LABELS[scheme]]
            n = [r["devices"] for r in mine]
            ax1.loglog(n, [r["plan_s"] for r in mine], marker="o", color=f"C{i}", label=LABELS[scheme])
            ax2.semilogx(n, [r["sim_latency_mean_s"] for r in mine], marker="o", color=f"C{i}", label=LABELS[scheme])
            ax3.semilogx(n, [r["missing_groups_mean"] / r["groups"] for r in mine], marker="o", color=f"C{i}", label=LABELS[scheme])
        ax1.set_ylabel("planning time (s)")
        ax2.set_ylabel("simulated mean latency (s)")
        ax3.set_ylabel("fraction of groups missing per query")
        for ax in (ax1, ax2, ax3):
            ax.set_xlabel("devices")
        ax1.legend()

    big = max(s.scale_devices)
    rocoin_big = next(r for r in rows if r["devices"] == big and r["scheme"] == "RoCoIn")
    nonn_big = next(r for r in rows if r["devices"] == big and r["scheme"] == "NoNN")
    findings = [
        f"Beyond the paper: at {big:,} devices RoCoIn plans in {rocoin_big['plan_s']:.2f} s; a query misses {rocoin_big['missing_groups_mean'] / rocoin_big['groups']:.1%} of its groups "
        f"vs {nonn_big['missing_groups_mean'] / nonn_big['groups']:.1%} for NoNN (which leaves {nonn_big['idle_devices']} devices idle: it needs one partition per device and F = {filters})."
    ]
    caption = (
        f"Generated fleets (heterogeneity {s.heterogeneity}, mean success {s.success_prob}), ε = {s.epsilon}; students counted from their shapes; synthetic filter activity, F = {filters}; "
        f"{s.sim_queries} simulated queries per plan with a deadline of {DEADLINE_FACTOR} × the plan's T; planning time measured on this machine."
    )
    return ExperimentResult(
        "scale", "Scale: planning time and simulated behaviour from 10 to 10,000 devices", caption, rows, plot, findings
    )
