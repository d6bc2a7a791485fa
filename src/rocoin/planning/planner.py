"""The offline planner: RoCoIn (Algorithm 1), its baselines (SPEC.md §5) and the exact optimum.

Every scheme is a pure function of the fleet, the filter graph and the catalog, returning a
validated :class:`~rocoin.contracts.plan.Plan`. Devices that fit no student of the catalog are
listed in ``plan.unassigned`` with the reason (and logged), never dropped silently.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rocoin.contracts.catalog import Catalog, CatalogArrays
from rocoin.contracts.errors import InfeasiblePlanError, RocoinError
from rocoin.contracts.fleet import Fleet, FleetArrays
from rocoin.contracts.latency import device_latency_s
from rocoin.contracts.plan import SCHEMES, GroupPlan, Plan, UnassignedDevice
from rocoin.planning.assignment import Assignment, GroupCosts, match_greedy, match_minmax, match_paper
from rocoin.planning.grouping import best_achievable_failure, group_devices, theta_grid
from rocoin.planning.partition import SpectralPartitioner, equal_sizes, proportional_sizes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanRequest:
    """Everything a scheme needs, validated once."""

    fleet: Fleet
    arrays: FleetArrays  # the devices the scheme may use (those that fit some student)
    unassigned: tuple[UnassignedDevice, ...]
    partitioner: SpectralPartitioner
    catalog: Catalog
    students: CatalogArrays
    epsilon: float
    theta: float | None  # None: automatic search
    objective: str
    rho_min: float | None
    include_rate: bool
    seed: int | None

    @property
    def num_filters(self) -> int:
        return self.partitioner.num_filters


def make_plan(
    fleet: Fleet,
    filter_weights: np.ndarray,
    catalog: Catalog,
    *,
    scheme: str = "rocoin",
    epsilon: float = 0.05,
    theta: float | None = None,
    objective: str = "paper",
    rho_min: float | None = None,
    include_rate: bool = False,
    seed: int | None = 0,
) -> Plan:
    """Plan ``fleet`` with ``scheme``; ``filter_weights`` is the NoNN filter graph (F × F).

    ``theta=None`` searches θ automatically and keeps the plan with the lowest latency.
    """
    if scheme not in SCHEMES:
        raise RocoinError(f"scheme = {scheme!r}: expected one of {', '.join(SCHEMES)}")
    if objective not in ("paper", "minmax"):
        raise RocoinError(f"objective = {objective!r}: expected paper or minmax")
    if not (0.0 < epsilon < 1.0):
        raise RocoinError(f"epsilon = {epsilon}: expected a probability in (0, 1)")
    if theta is not None and not (theta >= 0 and math.isfinite(theta)):
        raise RocoinError(f"theta = {theta}: expected a non-negative distance or 'auto'")
    if rho_min is not None and not (rho_min > 0 and math.isfinite(rho_min)):
        raise RocoinError(f"rho-min = {rho_min}: expected a positive number of parameters per filter")
    arrays, unassigned = _eligible_devices(fleet, catalog)
    request = PlanRequest(
        fleet=fleet,
        arrays=arrays,
        unassigned=unassigned,
        partitioner=SpectralPartitioner(filter_weights, random_state=seed),
        catalog=catalog,
        students=catalog.arrays(),
        epsilon=epsilon,
        theta=theta,
        objective=objective,
        rho_min=rho_min,
        include_rate=include_rate,
        seed=seed,
    )
    return _SCHEME_FUNCTIONS[scheme](request)


def _eligible_devices(fleet: Fleet, catalog: Catalog) -> tuple[FleetArrays, tuple[UnassignedDevice, ...]]:
    arrays = fleet.arrays()
    smallest = min(catalog.names, key=lambda n: catalog[n].memory_bytes)
    need = catalog[smallest].memory_bytes
    fits = arrays.memory_bytes >= need
    unassigned = tuple(
        UnassignedDevice(
            id=arrays.ids[i],
            reason=f"memory_bytes {int(arrays.memory_bytes[i])} is below the smallest student ({smallest}, {need} bytes)",
        )
        for i in np.flatnonzero(~fits)
    )
    for item in unassigned:
        logger.warning("device %s gets no student: %s", item.id, item.reason)
    if not fits.any():
        raise InfeasiblePlanError(
            f"no device has memory for any student: the smallest ({smallest}) needs {need} bytes,"
            f" the largest device has {int(arrays.memory_bytes.max())}"
        )
    return arrays.subset(np.flatnonzero(fits)), unassigned


# --- RoCoIn and RoCoIn-G ---------------------------------------------------------------------


def _plan_rocoin(request: PlanRequest, *, greedy: bool = False, scheme: str = "rocoin") -> Plan:
    arrays = request.arrays
    if best_achievable_failure(arrays.outage) > request.epsilon:
        raise InfeasiblePlanError(
            f"epsilon = {request.epsilon:g} cannot be met: even one group of all {len(arrays)} usable devices"
            f" fails with probability {best_achievable_failure(arrays.outage):.6g} (the best achievable);"
            " raise --epsilon to at least that, or add devices"
        )
    dims = 3 if request.include_rate else 2
    thetas = [request.theta] if request.theta is not None else theta_grid(dims)
    floor = latency_floor(arrays, request.students, request.rho_min) if request.theta is None else math.inf  # one θ: no search to stop
    best: tuple[float, float, float, list[np.ndarray], list[np.ndarray], Assignment] | None = None
    seen: set[bytes] = set()
    for theta in thetas:
        if best is not None and best[0] <= floor and best[1] == -1.0:
            # No later θ can win: its T is at least the floor, its P(all groups) at most 1, and
            # on a tie the smaller θ is kept. Large fleets stop here after the first θ.
            logger.debug(
                "theta=%g and above skipped: the plan of theta=%g has T at the floor %.4g s and P(all groups) = 1", theta, best[2], floor
            )
            break
        groups = group_devices(
            arrays,
            request.epsilon,
            theta,
            max_groups=request.num_filters,
            include_rate=request.include_rate,
            random_state=request.seed,
        )
        key = np.concatenate(groups).tobytes() + np.array([len(g) for g in groups]).tobytes()
        if key in seen:
            continue
        seen.add(key)
        parts = request.partitioner.normalized_cut(len(groups))
        sizes = np.array([len(p) for p in parts])
        costs = GroupCosts.build(arrays, groups, sizes, request.students, request.rho_min)
        try:
            if greedy:
                assignment = match_greedy(costs, request.rho_min)
            elif request.objective == "minmax":
                assignment = match_minmax(costs, request.rho_min)
            else:
                assignment = match_paper(costs, request.rho_min)
        except InfeasiblePlanError:
            if request.theta is not None:
                raise
            logger.debug("theta=%g: no feasible assignment", theta)
            continue
        latency = float(assignment.latency_s.max())
        p_complete = float(np.prod([1.0 - np.prod(arrays.outage[g]) for g in groups]))
        # Lowest T first; among equal T, the more reliable plan, then the smaller θ.
        candidate = (latency, -p_complete, theta, groups, parts, assignment)
        logger.debug("theta=%g: %d groups, latency %.4g s, P(all groups) %.4f", theta, len(groups), latency, p_complete)
        if best is None or candidate[:3] < best[:3]:
            best = candidate
    if best is None:
        raise InfeasiblePlanError(
            f"rho-min = {request.rho_min:g} cannot be met by any grouping: no student has enough parameters"
            " per filter within the devices' memory; lower --rho-min"
        )
    _, _, theta, groups, parts, assignment = best
    return _build_plan(request, scheme, theta, groups, [parts[k] for k in assignment.partition], assignment.student)


def latency_floor(arrays: FleetArrays, students: CatalogArrays, rho_min: float | None) -> float:
    """A lower bound on ``T`` of any plan of these devices (every one of them in some group): each
    device alone runs its fastest student that fits its memory (and meets ``ρ_min`` for one filter)
    and sends one filter. :class:`GroupCosts` itself prices it, with every device a group of its own,
    so no plan's ``T`` can come out below it by rounding."""
    alone = list(np.arange(len(arrays))[:, None])
    fastest, _ = GroupCosts.build(arrays, alone, np.ones(1), students, rho_min).fastest()
    return float(fastest.max())


# --- NoNN and HetNoNN ------------------------------------------------------------------------


def _baseline_devices(request: PlanRequest, scheme: str) -> tuple[FleetArrays, list[UnassignedDevice]]:
    """One device per partition; when there are more devices than filters, the strongest F."""
    arrays = request.arrays
    extra: list[UnassignedDevice] = []
    if len(arrays) > request.num_filters:
        keep = np.sort(np.argsort(-arrays.flops, kind="stable")[: request.num_filters])
        dropped = np.setdiff1d(np.arange(len(arrays)), keep)
        extra = [
            UnassignedDevice(
                id=arrays.ids[i],
                reason=f"{scheme} runs one device per partition and the teacher has only {request.num_filters} filters",
            )
            for i in dropped
        ]
        logger.warning("%s leaves %d devices idle: more devices than filters", scheme, len(extra))
        arrays = arrays.subset(keep)
    return arrays, extra


def _largest_fitting(students: CatalogArrays, memory_bytes: float, size: int, rho_min: float | None) -> int:
    ok = students.memory_bytes <= memory_bytes
    if rho_min is not None:
        ok &= students.params / size >= rho_min
    if not ok.any():
        raise InfeasiblePlanError(
            f"rho-min = {rho_min:g} cannot be met: no student that fits {int(memory_bytes)} bytes has"
            f" {rho_min:g} parameters per filter for a partition of {size} filters; lower --rho-min"
        )
    candidates = np.flatnonzero(ok)
    return int(candidates[np.argmax(students.params[candidates])])


def _plan_no_replication(
    request: PlanRequest, scheme: str, sizes_for: Callable[[FleetArrays], list[int]], per_device_student: bool
) -> Plan:
    arrays, extra = _baseline_devices(request, scheme)
    sizes = sizes_for(arrays)
    # Larger partitions to faster devices (harmless for NoNN, the point of HetNoNN).
    device_order = np.argsort(-arrays.flops, kind="stable")
    size_order = np.argsort(-np.asarray(sizes), kind="stable")
    parts_sorted = request.partitioner.with_sizes([sizes[i] for i in size_order])
    groups, parts, students = [], [], []
    shared = None
    if not per_device_student:
        shared = _largest_fitting(request.students, arrays.memory_bytes.min(), max(sizes), request.rho_min)
    for rank, device in enumerate(device_order.tolist()):
        part = parts_sorted[rank]
        groups.append(np.array([device]))
        parts.append(part)
        students.append(
            shared if shared is not None else _largest_fitting(request.students, arrays.memory_bytes[device], len(part), request.rho_min)
        )
    order = np.argsort([int(g[0]) for g in groups], kind="stable")
    return _build_plan(
        request,
        scheme,
        None,
        [groups[i] for i in order],
        [parts[i] for i in order],
        np.array([students[i] for i in order]),
        arrays=arrays,
        extra_unassigned=extra,
    )


def _capacity_weight(arrays: FleetArrays) -> np.ndarray:
    """HetNoNN's capacity [decision]: FLOP/s and memory, each relative to the fleet mean."""
    return arrays.flops / arrays.flops.mean() + arrays.memory_bytes / arrays.memory_bytes.mean()


def _plan_nonn(request: PlanRequest) -> Plan:
    return _plan_no_replication(request, "nonn", lambda a: equal_sizes(request.num_filters, len(a)), per_device_student=False)


def _plan_hetnonn(request: PlanRequest) -> Plan:
    return _plan_no_replication(
        request, "hetnonn", lambda a: proportional_sizes(request.num_filters, _capacity_weight(a)), per_device_student=True
    )


# --- exact optimum ---------------------------------------------------------------------------


def _plan_optimal(request: PlanRequest) -> Plan:
    """The exact optimum of ``T`` over all groupings (small fleets; see ``rocoin.planning.optimal``)."""
    from rocoin.planning.optimal import solve_optimal

    solution = solve_optimal(request.arrays, request.students, request.num_filters, request.epsilon, request.rho_min)
    parts = request.partitioner.with_sizes(solution.sizes)
    return _build_plan(request, "optimal", None, list(solution.groups), parts, np.array(solution.students), objective="minmax")


# --- assembling the plan ---------------------------------------------------------------------


def _build_plan(
    request: PlanRequest,
    scheme: str,
    theta: float | None,
    groups: list[np.ndarray],
    parts: list[np.ndarray],
    students: np.ndarray,
    *,
    arrays: FleetArrays | None = None,
    extra_unassigned: list[UnassignedDevice] | None = None,
    objective: str | None = None,
) -> Plan:
    arrays = arrays if arrays is not None else request.arrays
    names = request.students.names
    group_plans = []
    for k, (members, part, student) in enumerate(zip(groups, parts, students.tolist())):
        spec = request.catalog[names[student]]
        latency = device_latency_s(
            arrays.flops[members], arrays.rate_bps[members], arrays.input_s[members], spec.flops, len(part), spec.bits_per_filter
        )
        _check_finite(arrays, members, latency, k)
        group_plans.append(
            GroupPlan(
                devices=[arrays.ids[i] for i in members],
                filters=[int(f) for f in part],
                student=names[student],
                failure_prob=float(np.prod(arrays.outage[members])),
                latency_s=float(latency.max()),
            )
        )
    used = sorted({g.student for g in group_plans})
    return Plan(
        scheme=scheme,  # type: ignore[arg-type]
        objective=objective or request.objective,  # type: ignore[arg-type]
        epsilon=request.epsilon,
        theta=theta,
        rho_min=request.rho_min,
        num_filters=request.num_filters,
        input_bits=request.fleet.input_bits,
        groups=group_plans,
        latency_s=max(g.latency_s for g in group_plans),
        p_complete=float(np.prod([1.0 - g.failure_prob for g in group_plans])),
        catalog={n: request.catalog[n] for n in used},
        unassigned=list(request.unassigned) + list(extra_unassigned or []),
        seed=request.seed,
    )


def _check_finite(arrays: FleetArrays, members: np.ndarray, latency: np.ndarray, group: int) -> None:
    """Refuse a group whose latency or failure probability is not a finite number (or not a probability).

    The fleet's validation keeps profiles in range; this is the second line of defence, for a
    fleet built in code without validation (``model_copy``, ``model_construct``).
    """
    outage = arrays.outage[members]
    bad = ~np.isfinite(latency) | ~np.isfinite(outage) | (outage < 0) | (outage > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RocoinError(
            f"device {arrays.ids[int(members[i])]!r} in group {group}: latency_s = {float(latency[i])!r}, outage = {float(outage[i])!r}:"
            " not finite or out of range (expected a finite latency and an outage in [0, 1]); check its profile"
            " (flops, rate_bps, downlink_bps, outage) and the fleet's input_bits"
        )


_SCHEME_FUNCTIONS: dict[str, Callable[[PlanRequest], Plan]] = {
    "rocoin": _plan_rocoin,
    "rocoin-g": lambda r: _plan_rocoin(r, greedy=True, scheme="rocoin-g"),
    "nonn": _plan_nonn,
    "hetnonn": _plan_hetnonn,
    "optimal": _plan_optimal,
}

__all__ = ["PlanRequest", "make_plan"]
