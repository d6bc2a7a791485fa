"""What the paper's experiments share: the schemes and their labels, a scheme's trained run
(plan, students, evaluation) from the :class:`Workspace`, the planner-only inputs, captions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rocoin.contracts.catalog import Catalog
from rocoin.contracts.errors import InfeasiblePlanError
from rocoin.contracts.fleet import Fleet
from rocoin.contracts.plan import Plan
from rocoin.experiments.setup import ExperimentSetup
from rocoin.experiments.workspace import Workspace, assumed_outage_fleet
from rocoin.pipeline.cache import Done
from rocoin.pipeline.steps import StudentsFile
from rocoin.planning import filter_graph, make_plan, synthetic_activations
from rocoin.profiles.generate import analytic_catalog

#: The distributed schemes of the paper's comparison, in its order.
SCHEMES = ("rocoin", "rocoin-g", "hetnonn", "nonn")
MINMAX_LABEL = "RoCoIn (minmax)"
LABELS = {"teacher": "Teacher", "rocoin": "RoCoIn", "rocoin-g": "RoCoIn-G", "hetnonn": "HetNoNN", "nonn": "NoNN"}
#: Input shape and classes of each dataset (for the planner-only experiments, which load no data).
DATASET_SHAPES = {
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "digits": ((1, 8, 8), 10),
}
#: The deadline of simulated queries: this multiple of the largest failure-free T of the plans
#: compared on a fleet (``scale``: of the one plan), so every plan can answer complete in time.
DEADLINE_FACTOR = 1.5
#: A finding says "lower" only when the mean paired difference exceeds this many standard errors.
SIGNIFICANT_SE = 2.0


def simulated_latency(plans: dict[str, Plan], fleet, trials: int, seed: int) -> tuple[float, dict[str, float]]:
    """The paper's latency of each plan on ``fleet``: the mean over ``trials`` simulated queries
    under independent device outages, a group with no surviving replica waiting until the deadline,
    which is :data:`DEADLINE_FACTOR` × the largest planned T of ``plans``. Returns (deadline, means)."""
    from rocoin.simulation import simulate

    deadline = DEADLINE_FACTOR * max(p.latency_s for p in plans.values())
    means = {k: simulate(p, fleet, trials=trials, timeout_s=deadline, random_state=seed).latency_mean_s for k, p in plans.items()}
    return deadline, means


def accuracy_verdict(
    a_pct: float, b_pct: float, test_images: int, *, a_std_pct: float = 0.0, b_std_pct: float = 0.0, trials: int = 1
) -> str:
    """Whether accuracy ``a`` is above ``b`` by more than :data:`SIGNIFICANT_SE` standard errors of
    the difference: "agrees", "does not agree" (below by as much) or "within noise (± x points)".

    The standard error combines the test sample (binomial, as if the two were measured on
    different images: conservative) and, for accuracies averaged over random failure draws, the
    spread of the draws (``std / sqrt(trials)`` each)."""
    p = min(max((a_pct + b_pct) / 200.0, 0.0), 1.0)
    sampling = 100.0 * np.sqrt(2.0 * p * (1.0 - p) / max(test_images, 1))
    draws = np.hypot(a_std_pct, b_std_pct) / np.sqrt(max(trials, 1))
    margin = SIGNIFICANT_SE * float(np.hypot(sampling, draws))
    if a_pct - b_pct > margin:
        return "agrees"
    if b_pct - a_pct > margin:
        return "does not agree"
    return f"within noise: ± {margin:.2f} points"


def paired_gap(better: list[float], worse: list[float]) -> tuple[float, float]:
    """Mean of ``worse - better`` over paired samples (fleets) and its standard error."""
    diff = np.asarray(worse, dtype=float) - np.asarray(better, dtype=float)
    if len(diff) < 2:
        return float(diff.mean()) if len(diff) else float("nan"), float("inf")
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


@dataclass
class Run:
    """One scheme's plan, its trained students and their evaluation."""

    scheme: str
    plan: Plan
    students: Done[StudentsFile]
    evaluation: dict[str, Any]
    failure_aware: bool = False
    #: The plan the students were distilled for: ``plan`` itself, or a known-outage plan with the
    #: same groups whose students it shares (see :func:`trained_runs`).
    trained_for: Plan | None = None

    @property
    def shares_students(self) -> bool:
        return self.trained_for is not None and self.trained_for != self.plan

    @property
    def label(self) -> str:
        """The scheme's name, with " + FA" for failure-aware training (our addition)."""
        return LABELS[self.scheme] + (FA_SUFFIX if self.failure_aware else "")


#: Marks the series of students trained failure-aware (with dropped slots), which the paper does not do.
FA_SUFFIX = " + FA"


def trained_runs(
    ws: Workspace,
    *,
    known: bool,
    schemes: tuple[str, ...] = SCHEMES,
    epsilon: float | None = None,
    train: bool = True,
    failure_aware: bool = False,
) -> list[Run]:
    """Plan and distill each scheme on the setup's fleet.

    ``known``: the planner sees each device's outage (Table II, Figs. 2, 3, 5); otherwise it
    assumes every device fails with the fleet's nominal ``1 − success_prob`` (Fig. 6). Students
    are trained as the paper does, without dropped slots, unless ``failure_aware`` (our addition:
    slots dropped with the plan's group failure probabilities; needs ``known``).
    ``train=False`` returns only the runs whose students are already cached.
    """
    runs = []
    for training in scheme_trainings(ws, known=known, schemes=schemes, epsilon=epsilon, failure_aware=failure_aware):
        students = ws.students(training.trained_as, failure_aware=training.failure_aware, train=train)
        if students is not None:
            runs.append(
                Run(
                    training.scheme,
                    training.plan,
                    students,
                    ws.evaluation(students),
                    failure_aware=training.failure_aware,
                    trained_for=training.trained_as,
                )
            )
    return runs


@dataclass(frozen=True)
class Training:
    """The students a scheme's run needs: ``trained_as`` (``plan`` or a known-outage twin with
    its groups) distilled with or without dropped slots."""

    scheme: str
    plan: Plan
    trained_as: Plan
    failure_aware: bool


def scheme_trainings(
    ws: Workspace, *, known: bool, schemes: tuple[str, ...] = SCHEMES, epsilon: float | None = None, failure_aware: bool = False
) -> list[Training]:
    """What :func:`trained_runs` distils, without distilling it (the parallel scheduler's list)."""
    s = ws.setup
    fa = failure_aware and known
    known_fleet = ws.fleet()
    weights, catalog = ws.filter_weights(), ws.catalog()

    def plan_on(fleet: Fleet, scheme: str) -> Plan:
        return make_plan(fleet, weights, catalog, scheme=scheme, epsilon=epsilon or s.epsilon, seed=s.seed)

    # Students trained without dropped slots depend on each group's devices, filters and student, not on the
    # failure probabilities or the scheme's name: a plan with the groups of a known-outage plan (RoCoIn-G
    # finding RoCoIn's plan; Fig. 6's assumed outage changing nothing) reuses its students and evaluation.
    twins: list[Plan] = []
    if not fa:
        for scheme in SCHEMES:
            try:
                twins.append(plan_on(known_fleet, scheme))
            except InfeasiblePlanError:
                continue
    fleet = known_fleet if known else assumed_outage_fleet(known_fleet, 1.0 - s.success_prob)
    trainings = []
    for scheme in schemes:
        plan = plan_on(fleet, scheme)
        trained_as = next((twin for twin in twins if same_assignment(twin, plan)), plan)
        trainings.append(Training(scheme, plan, trained_as, fa))
    return trainings


def same_assignment(a: Plan, b: Plan) -> bool:
    """Whether two plans have the same groups (devices, filters, student)."""

    def key(plan: Plan) -> list[tuple]:
        return sorted((tuple(g.devices), tuple(g.filters), g.student) for g in plan.groups)

    return key(a) == key(b)


def planner_inputs(setup: ExperimentSetup) -> tuple[np.ndarray, Catalog, int]:
    """Filter graph, catalog and F for the planner-only experiments (no torch, no data)."""
    from rocoin.data.datasets import canonical_name
    from rocoin.models.analytic import arch_stats

    shape, classes = DATASET_SHAPES[canonical_name(setup.dataset)]
    filters = arch_stats(setup.teacher_arch, shape, classes).out_dim
    activity = synthetic_activations(500, filters, classes, random_state=setup.seed)
    return filter_graph(activity), analytic_catalog(shape, classes, list(setup.students)), filters


def describe_students(plan: Plan) -> str:
    """e.g. ``wrn-16-2 ×2, wrn-16-1 ×3`` (groups per architecture)."""
    counts: dict[str, int] = {}
    for g in plan.groups:
        counts[g.student] = counts.get(g.student, 0) + 1
    return ", ".join(f"{name} ×{n}" for name, n in sorted(counts.items()))


def resource_totals(plan: Plan) -> dict[str, float]:
    """FLOPs and parameters of every deployed student (S-Total) and of the distinct ones (S-Valid)."""
    total_flops = sum(plan.catalog[g.student].flops * len(g.devices) for g in plan.groups)
    total_params = sum(plan.catalog[g.student].params * len(g.devices) for g in plan.groups)
    valid_flops = sum(plan.catalog[g.student].flops for g in plan.groups)
    valid_params = sum(plan.catalog[g.student].params for g in plan.groups)
    return {
        "total_mflops": total_flops / 1e6,
        "valid_mflops": valid_flops / 1e6,
        "total_params_k": total_params / 1e3,
        "valid_params_k": valid_params / 1e3,
    }


def setup_caption(s: ExperimentSetup, *, trained: bool) -> str:
    fleet = f"N = {s.devices} generated devices, heterogeneity level {s.heterogeneity} (Table IV; FLOP/s 20 M ± half the range, rates in {'kbit/s' if s.rate_unit == 'kbps' else 'bit/s, as Table IV prints them'}), mean success probability {s.success_prob}"
    if not trained:
        return fleet
    teacher_images = f"first {s.max_train_images:,}" if s.max_train_images else "all"
    student_images = f"first {s.student_max_train_images:,}" if s.student_max_train_images else teacher_images
    return (
        f"{s.dataset}; teacher {s.teacher_arch} {s.teacher_epochs} epochs on {teacher_images} training images; "
        f"students from {{{', '.join(s.students)}}} distilled {s.student_epochs} epochs on {student_images}; {fleet}; "
        f"ε = {s.epsilon}; failed devices drawn at random, {s.trials} trials per count, their outputs zero-filled."
    )


def pct(x: float) -> float:
    return round(100.0 * x, 2)
