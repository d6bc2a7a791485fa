"""Re-planning for a fleet that changes (issue 14): new replicas for a plan's fixed groups.

A plan's groups keep their students and knowledge partitions (the students are trained for
them); only *which devices* serve each group changes. Given the plan and the live fleet (plan
devices missing from it are gone, fleet devices not in the plan are new), :func:`replan` gives
every device a group or standby:

- **Objective**, lexicographic. (1) When every group can meet ``ε`` (``Π_{d∈k} p_d ≤ ε``):
  minimise ``T = max_k max_{d∈k} t(d, k)`` subject to ``ε`` in every group. (2) When ``ε`` cannot
  be met for every group: maximise ``P = Π_k (1 − Π_{d∈k} p_d)`` first, then minimise ``T``.
  A device serves group ``k`` only if its memory holds the group's student, and at most one
  group; every group gets at least one device (a plan cannot hold an empty group: when the live
  fleet cannot give each group its own device, :class:`InfeasiblePlanError`).
- **Then replicas**: every device left over joins a group where it does not raise ``T`` (the
  one that gains the most reliability, its current group first); a device that fits nowhere
  without raising ``T`` stays on standby, in ``plan.unassigned`` with the reason.
- **Few moves**: among assignments with the optimal objective the one that keeps the most
  devices in their current group. **Hysteresis**: when the current assignment (restricted to the
  live devices, with the standby and new devices added where they do not raise its ``T``) still
  meets ``ε`` in every group (case 2: still has a device in every group) and the best re-plan
  improves on it by at most ``margin`` (relative: ``(T_now − T_best) / T_now``, and in case 2 also
  ``(F_now − F_best) / F_now`` with ``F = 1 − P``), the current assignment is kept: a device that
  flaps in and out of the fleet moves nobody else. A group that lost every replica is first
  **repaired** with the fewest moves (a device on standby, else one spare replica of another
  group), and that repair is weighed against the best re-plan the same way: losing a group moves
  one device, not the fleet, unless a re-plan is more than ``margin`` better.

Method.

- **Exact** for at most :data:`EXACT_MAX_DEVICES` usable devices (devices that fit some group's
  student). For a deadline ``τ`` device ``d`` may serve group ``k`` iff ``t(d, k) ≤ τ`` (and it
  fits). A dynamic programme over the ``2^N`` device subsets, group by group (``K · 3^N`` subset
  pairs, numpy), gives the best value of any assignment within ``τ``: in case 1 the most devices
  kept in place among assignments meeting ``ε`` (−∞ when none exists), in case 2
  ``Σ_k log(1 − Q_k)`` (plus ``10⁻¹¹`` per device kept in place: a tie-break below
  :data:`P_REL_TOL`). Feasibility and the optimal ``P`` are monotone in ``τ`` and change only
  at some ``t(d, k)``, so ``T*`` is the smallest such value that is feasible (case 1), or that
  reaches ``P*`` within :data:`P_REL_TOL` (case 2): a binary search over the distinct ``t(d, k)``.
- **Heuristic** above that size (10,000 devices in 16-128 groups: 0.1-0.4 s, and about 0.7 s in
  case 2, measured on one core of a loaded 2-core machine). The same
  binary search over the ``t(d, k)`` (by median pivots, without sorting them all), with a greedy
  test per deadline. Case 1: the devices keep their current group where still fast enough;
  groups short of ``ε`` (fewest eligible devices first) take free devices (those eligible for the
  fewest groups first, then the most reliable, the last one the lightest that closes the gap),
  then spare replicas of groups that meet ``ε`` without them; if that fails, the same from
  scratch. Then up to :data:`HEURISTIC_ROUNDS` rounds of repairing its own solution below its
  ``T`` (a local search), and at the end devices return to their current group where that keeps
  ``ε``. Case 2: the most reliable devices first, each to the least reliable group it may serve
  (a bipartite matching first if a group would stay empty), then single-device moves that raise
  ``P``, best first (:data:`LOCAL_SEARCH_BUDGET`); the current groups are not preferred here.
  Guarantees: every constraint of the returned plan holds (memory, one group per device, every
  group served, ``ε`` in every group when ``epsilon_met``); when the current assignment meets
  ``ε``, the result's ``T`` is not above its ``T`` (the repair test passes at every deadline from
  there up); the optimum is not (covering groups with weighted devices is NP-hard). Measured on
  random tight instances (random students and partition sizes, 3-11 groups): with 20-80 devices
  its ``T`` was optimal in 23 of 26 (0.7 % above the MILP optimum on average, 17 % at worst), and
  in 1 more it found no assignment meeting ``ε`` where one exists (case 1 is recognised only when
  the greedy finds one); with 5-10 devices it matched the exact ``T`` in all 90; in case 2 its
  ``1 − P`` was 2.4 % above the exact optimum on average over 124 small fleets (44 % at worst).

Pure: no I/O, no randomness; ties go to the lower group index and the earlier device of the fleet.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from rocoin import __version__
from rocoin.contracts.errors import InfeasiblePlanError, RocoinError
from rocoin.contracts.fleet import Fleet
from rocoin.contracts.latency import device_latency_s
from rocoin.contracts.plan import GroupPlan, Plan, UnassignedDevice

logger = logging.getLogger(__name__)

#: Largest number of usable devices solved exactly (the DP does ``K · 3^N`` steps per deadline).
EXACT_MAX_DEVICES = 10
#: Default hysteresis: keep the current assignment unless a re-plan is more than 5 % better.
DEFAULT_MARGIN = 0.05
#: Slack on ``ε`` in log space (``−log Q ≥ −log ε − tol``), as the exact planner's ``1e-12``.
EPSILON_LOG_TOL = 1e-12
#: Two values of ``P`` within this relative distance count as equal (case 2's ``P*``).
P_REL_TOL = 1e-9
#: Heuristic: rounds of repairing its own solution below its ``T`` (a local search).
HEURISTIC_ROUNDS = 5
#: Heuristic, case 2: work of the improving moves per deadline (device × group evaluations).
LOCAL_SEARCH_BUDGET = 2_000_000
#: Case 2 (exact): value of one device kept in place, far below :data:`P_REL_TOL` in ``log P``.
_STAY_BONUS = 1e-11


class Move(NamedTuple):
    """A device whose group changed; ``None`` is standby (the plan's ``unassigned``)."""

    device: str
    from_group: int | None
    to_group: int | None


@dataclass(frozen=True)
class PlanObjective:
    """``T`` (``inf`` when some group has no replica) and ``P(every group answers)``."""

    latency_s: float
    p_complete: float


@dataclass(frozen=True)
class Replan:
    """The re-planned plan and what changed; ``moves`` lists devices of the plan (a group or
    standby) that changed group; new and gone devices are in ``added`` and ``removed``."""

    plan: Plan
    moves: list[Move]
    added: list[str]
    removed: list[str]
    #: the current assignment restricted to the live devices
    objective_before: PlanObjective
    objective_after: PlanObjective
    #: what the optimisation reached (the plan kept instead when within ``margin``)
    objective_best: PlanObjective
    epsilon_met: bool
    #: the current assignment (the live devices, standby and new ones added where they do not raise T) was kept
    kept_current: bool
    #: a group had lost every replica and took one with the fewest moves (devices on standby
    #: first, else a spare replica of another group): within ``margin`` of the best re-plan
    repaired: bool
    exact: bool
    reason: str


@dataclass(frozen=True)
class _Problem:
    """The live devices that fit some group, as arrays; ``x[d]`` is a group index or -1 (standby)."""

    latency: np.ndarray  # (N, K) t(d, k); inf where the student does not fit
    latency_t: np.ndarray  # (K, N) the same, rows contiguous per group
    log_q: np.ndarray  # (N,) log p_d (-inf for p_d = 0)
    weight: np.ndarray  # (N,) min(-log p_d, -log ε): a group meets ε iff its weights add up to `need`
    need: float
    current: np.ndarray  # (N,) the plan's group where the device still fits it, else -1
    home: np.ndarray  # (N,) the plan's group (-1: standby or new)

    @property
    def n(self) -> int:
        return len(self.log_q)

    @property
    def k(self) -> int:
        return self.latency.shape[1]


def replan(plan: Plan, fleet: Fleet, *, epsilon: float | None = None, margin: float = DEFAULT_MARGIN) -> Replan:
    """Re-assign ``fleet``'s devices to ``plan``'s groups (students and partitions fixed).

    ``epsilon`` defaults to the plan's; ``margin`` is the hysteresis (relative improvement a
    re-plan must exceed before devices move). Latencies and outages come from ``fleet`` (the plan's
    stored figures are not used), and the new plan takes the fleet's ``input_bits``. Raises :class:`RocoinError` for bad arguments and
    :class:`InfeasiblePlanError` when the live fleet cannot give every group a device.
    """
    epsilon = plan.epsilon if epsilon is None else epsilon
    if not 0.0 < float(epsilon) < 1.0:
        raise RocoinError(f"epsilon = {epsilon}: expected a probability in (0, 1)")
    if not (math.isfinite(float(margin)) and margin >= 0):
        raise RocoinError(f"margin = {margin}: expected a non-negative relative improvement (e.g. 0.05)")
    fleet_state = _FleetState.build(plan, fleet)
    problem = _problem(fleet_state, epsilon)
    exact = problem.n <= EXACT_MAX_DEVICES
    best, reliable = (_solve_exact if exact else _solve_heuristic)(problem)
    best = _add_replicas(problem, best, _latency_of(problem, best))
    best_obj = _objective(problem, best)

    # the current assignment, and the same with the standby and new devices added without raising T
    now = problem.current
    before = _objective(problem, now)
    served = np.bincount(now[now >= 0], minlength=problem.k) > 0
    lost = "" if served.all() else f"group {int(np.flatnonzero(~served)[0])} had no live replica that holds its student"
    if not lost:
        keep = _add_replicas(problem, now, before.latency_s)
    else:  # the fewest moves that give every group a replica, weighed against the best re-plan as the current one is
        fixed = _repair(problem, now)
        keep = None if fixed is None else _add_replicas(problem, fixed, _latency_of(problem, fixed))
    if keep is None:
        kept, why = False, lost
    else:
        kept, why = _hysteresis(problem, reliable, keep, best_obj, margin)
        if lost:
            why = f"{lost}; {'the fewest moves give it one, and' if kept else 'the fewest moves that give it one are not enough:'} {why}"
    repaired = kept and bool(lost)
    x = keep if kept and keep is not None else best

    new_plan = _build_plan(plan, fleet, epsilon, problem, fleet_state, x)
    after = PlanObjective(new_plan.latency_s, new_plan.p_complete)
    moves = fleet_state.moves(x)
    epsilon_met = _meets_epsilon(problem, x)
    action = "repaired the current assignment" if repaired else "kept the current assignment" if kept else "re-planned"
    reason = _reason(action, why, epsilon, epsilon_met, before, after, best_obj, moves, fleet_state, exact)
    logger.info("replan: %s", reason)
    return Replan(
        plan=new_plan,
        moves=moves,
        added=fleet_state.added,
        removed=fleet_state.removed,
        objective_before=before,
        objective_after=after,
        objective_best=best_obj,
        epsilon_met=epsilon_met,
        kept_current=kept and not repaired,
        repaired=repaired,
        exact=exact,
        reason=reason,
    )


def assign_devices(plan: Plan, fleet: Fleet, groups: Mapping[str, int | None]) -> Plan:
    """``plan`` with the devices of ``groups`` in the group given (``None``: standby), the plan's
    other devices of ``fleet`` in their plan group and the rest of ``fleet`` on standby; failure
    probabilities and latencies from ``fleet``. For a restarted source: its record of the last
    re-plans applied to the bundle's plan, without re-planning. Raises :class:`RocoinError` for a
    device not in ``fleet``, a group out of range or a student a device cannot hold, and
    :class:`InfeasiblePlanError` when a group is left without a device."""
    state = _FleetState.build(plan, fleet)
    problem = _problem(state, plan.epsilon)
    position = {state.ids[i]: j for j, i in enumerate(state.index.tolist())}
    every = set(state.ids)
    x = problem.home.copy()
    for device_id, group in groups.items():
        if device_id not in every:
            raise RocoinError(f"device {device_id!r}: not in the fleet")
        if group is not None and not 0 <= group < problem.k:
            raise RocoinError(f"device {device_id!r}: group = {group}: expected 0 to {problem.k - 1}")
        j = position.get(device_id)
        if j is None:
            if group is not None:
                raise RocoinError(f"device {device_id!r}: its memory holds no group's student, so it cannot serve group {group}")
            continue
        if group is not None and not math.isfinite(problem.latency[j, group]):
            raise RocoinError(f"device {device_id!r}: its memory does not hold group {group}'s student ({plan.groups[group].student})")
        x[j] = -1 if group is None else group
    empty = np.flatnonzero(np.bincount(x[x >= 0], minlength=problem.k) == 0)
    if empty.size:
        raise InfeasiblePlanError(f"group {int(empty[0])}: no device is assigned to it ({empty.size} such group(s))")
    return _build_plan(plan, fleet, plan.epsilon, problem, state, x)


# --- the problem ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FleetState:
    """The live fleet against the plan: who is usable, where each device was, who came and went."""

    ids: tuple[str, ...]  # every live device, in fleet order
    outage: np.ndarray
    memory_bytes: np.ndarray
    latency: np.ndarray  # (all live devices, K): t(d, k), inf where the student does not fit
    usable: np.ndarray  # (all live devices,) fits some group's student
    planned: dict[str, int]  # the plan's group of each of its devices
    added: list[str]
    removed: list[str]

    @classmethod
    def build(cls, plan: Plan, fleet: Fleet) -> _FleetState:
        arrays = fleet.arrays()
        latency = _latency_matrix(plan, fleet)
        usable = np.isfinite(latency).any(axis=1)
        _check_coverage(plan, latency, usable)
        live = set(arrays.ids)
        planned = {d: k for k, g in enumerate(plan.groups) for d in g.devices}
        standby = [u.id for u in plan.unassigned]
        known = set(planned) | set(standby)
        return cls(
            ids=arrays.ids,
            outage=arrays.outage,
            memory_bytes=arrays.memory_bytes,
            latency=latency,
            usable=usable,
            planned=planned,
            added=[d for d in arrays.ids if d not in known],
            removed=[d for d in list(planned) + standby if d not in live],
        )

    @property
    def index(self) -> np.ndarray:
        """Fleet positions of the usable devices (the problem's devices, in order)."""
        return np.flatnonzero(self.usable)

    def moves(self, x: np.ndarray) -> list[Move]:
        """Devices of the plan whose group changed (``x``: the usable devices' new groups)."""
        group = np.full(len(self.ids), -1, dtype=np.intp)
        group[self.index] = x
        new = set(self.added)
        out = []
        for d, k in zip(self.ids, group.tolist()):
            if d in new:
                continue
            was = self.planned.get(d)
            if (was if was is not None else -1) != k:
                out.append(Move(d, was, None if k < 0 else k))
        return out


def _problem(state: _FleetState, epsilon: float) -> _Problem:
    index = state.index
    lat = state.latency[index]
    home = np.array([state.planned.get(state.ids[i], -1) for i in index.tolist()], dtype=np.intp)
    has_home = home >= 0
    fits_home = np.zeros(len(index), dtype=bool)
    fits_home[has_home] = np.isfinite(lat[has_home, home[has_home]])
    with np.errstate(divide="ignore"):
        log_q = np.log(state.outage[index])
    limit = -math.log(epsilon)
    return _Problem(
        latency=lat,
        latency_t=np.ascontiguousarray(lat.T),
        log_q=log_q,
        weight=np.minimum(-log_q, limit),
        need=limit - EPSILON_LOG_TOL * (1.0 + limit),
        current=np.where(fits_home, home, -1),
        home=home,
    )


def _latency_matrix(plan: Plan, fleet: Fleet) -> np.ndarray:
    """``t(d, k)`` for every device and group (SPEC.md §3); ``inf`` where the student does not fit."""
    arrays = fleet.arrays()
    specs = [plan.catalog[g.student] for g in plan.groups]
    student_flops = np.array([s.flops for s in specs])
    student_memory = np.array([s.memory_bytes for s in specs], dtype=float)
    sizes = np.array([len(g.filters) for g in plan.groups])
    bits = np.array([s.bits_per_filter for s in specs])
    latency = device_latency_s(
        arrays.flops[:, None], arrays.rate_bps[:, None], arrays.input_s[:, None], student_flops[None, :], sizes[None, :], bits[None, :]
    )
    fits = arrays.memory_bytes[:, None] >= student_memory[None, :]
    bad = fits & ~(np.isfinite(latency) & (latency > 0))
    if bad.any():
        d, k = (int(v[0]) for v in np.nonzero(bad))
        raise RocoinError(
            f"device {arrays.ids[d]!r} in group {k}: latency_s = {float(latency[d, k])!r}: not a finite positive number;"
            " check its profile (flops, rate_bps, downlink_bps) and the fleet's input_bits"
        )
    outage = arrays.outage
    if not (np.isfinite(outage) & (outage >= 0) & (outage < 1)).all():
        d = int(np.flatnonzero(~(np.isfinite(outage) & (outage >= 0) & (outage < 1)))[0])
        raise RocoinError(f"device {arrays.ids[d]!r}: outage = {float(outage[d])!r}: expected a probability in [0, 1)")
    return np.where(fits, latency, np.inf)


def _check_coverage(plan: Plan, latency: np.ndarray, usable: np.ndarray) -> None:
    """Every group needs a device of its own that holds its student, or no plan exists."""
    fits = np.isfinite(latency)
    students = [g.student for g in plan.groups]
    if not usable.any():
        need = min(plan.catalog[s].memory_bytes for s in students)
        raise InfeasiblePlanError(
            f"fleet: no device has memory for any group's student (the smallest, {min(students, key=lambda s: plan.catalog[s].memory_bytes)},"
            f" needs {need} bytes); re-plan from scratch with `rocoin plan`"
        )
    empty = np.flatnonzero(~fits.any(axis=0))
    if empty.size:
        k = int(empty[0])
        raise InfeasiblePlanError(
            f"group {k} (student {students[k]}, {plan.catalog[students[k]].memory_bytes} bytes): no live device has the memory for it"
            f" ({empty.size} such group(s)); re-plan from scratch with `rocoin plan`"
        )
    matched = maximum_bipartite_matching(csr_matrix(fits.T.astype(np.int8)), perm_type="column")
    if (matched < 0).any():
        raise InfeasiblePlanError(
            f"fleet: {int(usable.sum())} device(s) fit the plan's students, but the {len(students)} groups cannot each get"
            f" a device of their own (group {int(np.flatnonzero(matched < 0)[0])} is left without one); add devices or"
            " re-plan from scratch with `rocoin plan`"
        )


def _group_weight(problem: _Problem, x: np.ndarray) -> np.ndarray:
    on = x >= 0
    # float even when no device is assigned (bincount then gives integers)
    return np.bincount(x[on], weights=problem.weight[on], minlength=problem.k).astype(float)


def _group_log_q(problem: _Problem, x: np.ndarray) -> np.ndarray:
    """``log Q_k`` (0 for an empty group: it always fails)."""
    on = x >= 0
    out = np.zeros(problem.k)
    np.add.at(out, x[on], problem.log_q[on])
    return out


def _group_latency(problem: _Problem, x: np.ndarray) -> np.ndarray:
    """Worst member's ``t`` per group (``inf`` for an empty group)."""
    on = np.flatnonzero(x >= 0)
    out = np.full(problem.k, -np.inf)
    np.maximum.at(out, x[on], problem.latency[on, x[on]])
    out[np.bincount(x[on], minlength=problem.k) == 0] = np.inf
    return out


def _latency_of(problem: _Problem, x: np.ndarray) -> float:
    return float(_group_latency(problem, x).max())


def _objective(problem: _Problem, x: np.ndarray) -> PlanObjective:
    q = np.exp(_group_log_q(problem, x))
    counts = np.bincount(x[x >= 0], minlength=problem.k)
    q[counts == 0] = 1.0
    return PlanObjective(latency_s=_latency_of(problem, x), p_complete=float(np.prod(1.0 - q)))


def _meets_epsilon(problem: _Problem, x: np.ndarray) -> bool:
    return bool((_group_weight(problem, x) >= problem.need).all())


# --- exact: a DP over device subsets ----------------------------------------------------------


@functools.cache
def _submask_pairs(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ``(mask, sub)`` with ``∅ ≠ sub ⊆ mask``, sorted by ``mask``, and where each
    ``mask = 1..2^n−1`` starts in that list."""
    masks = np.arange(1 << n, dtype=np.int64)
    is_sub = (masks[None, :] & ~masks[:, None]) == 0
    is_sub[:, 0] = False
    sup, sub = np.nonzero(is_sub)
    return sup.astype(np.int64), sub.astype(np.int64), np.searchsorted(sup, masks[1:])


def _per_mask(values: np.ndarray, start: float) -> np.ndarray:
    """``out[mask] = start + Σ_{d ∈ mask} values[d]``."""
    out = np.full(1 << len(values), start, dtype=float)
    for d, v in enumerate(values):
        half = 1 << d
        out[half : 2 * half] = out[:half] + v
    return out


class _ExactModel:
    def __init__(self, problem: _Problem) -> None:
        self.problem = problem
        n = problem.n
        self.masks = np.arange(1 << n, dtype=np.int64)
        self.bits = np.int64(1) << np.arange(n, dtype=np.int64)
        self.covers = _per_mask(problem.weight, 0.0) >= problem.need
        self.covers[0] = False
        with np.errstate(divide="ignore"):
            self.reliability = np.log1p(-np.exp(_per_mask(problem.log_q, 0.0)))  # -inf for the empty set
        popcount = _per_mask(np.ones(n), 0.0)
        self.stays = np.array([popcount[self.masks & self.bits[problem.current == k].sum()] for k in range(problem.k)])

    def allowed(self, deadline_s: float) -> np.ndarray:
        eligible = (self.problem.latency <= deadline_s).T @ self.bits  # (K,) mask of devices within the deadline
        out = (self.masks[None, :] & ~eligible[:, None]) == 0
        out[:, 0] = False
        return out

    def solve(self, deadline_s: float, reliability: bool, stay_bonus: float, reconstruct: bool = False) -> tuple[float, np.ndarray | None]:
        """Best value within the deadline (−inf if none) and, with ``reconstruct``, an assignment."""
        sup, sub, starts = _submask_pairs(self.problem.n)
        size = len(self.masks)
        allowed = self.allowed(deadline_s)
        best = np.full(size, -np.inf)
        best[0] = 0.0
        choices = []
        for k in range(self.problem.k):
            if reliability:
                value = np.where(allowed[k], self.reliability + stay_bonus * self.stays[k], -np.inf)
            else:
                value = np.where(allowed[k] & self.covers, stay_bonus * self.stays[k], -np.inf)
            total = best[sup ^ sub] + value[sub]
            best = np.full(size, -np.inf)
            best[1:] = np.maximum.reduceat(total, starts)
            if reconstruct:
                hit = np.flatnonzero(total == best[sup])
                first = hit[np.r_[True, sup[hit][1:] != sup[hit][:-1]]]
                choice = np.zeros(size, dtype=np.int64)
                choice[sup[first]] = sub[first]
                choices.append(choice)
        mask = int(np.argmax(best))
        if not reconstruct or best[mask] == -np.inf:
            return float(best[mask]), None
        x = np.full(self.problem.n, -1, dtype=np.intp)
        for k in range(self.problem.k - 1, -1, -1):
            part = int(choices[k][mask])
            x[(part & self.bits) != 0] = k
            mask ^= part
        return float(best[int(np.argmax(best))]), x


def _solve_exact(problem: _Problem) -> tuple[np.ndarray, bool]:
    """Optimal assignment (before replicas are added) and whether every group meets ε."""
    model = _ExactModel(problem)
    values = problem.latency[np.isfinite(problem.latency)]
    top = float(values.max())
    if model.solve(top, reliability=False, stay_bonus=1.0)[0] > -np.inf:
        deadline = _smallest_passing(values, lambda t: model.solve(t, reliability=False, stay_bonus=1.0)[0] > -np.inf)
        _, x = model.solve(deadline, reliability=False, stay_bonus=1.0, reconstruct=True)
        assert x is not None
        return x, True
    target = model.solve(top, reliability=True, stay_bonus=0.0)[0]
    deadline = _smallest_passing(values, lambda t: model.solve(t, reliability=True, stay_bonus=0.0)[0] >= target - P_REL_TOL)
    _, x = model.solve(deadline, reliability=True, stay_bonus=_STAY_BONUS, reconstruct=True)
    assert x is not None
    return x, False


def _smallest_passing(values: np.ndarray, passes) -> float:
    """The smallest of ``values`` that passes a monotone test known to pass at ``values.max()``
    (a binary search over the distinct values, without sorting them all)."""
    best = float(values.max())
    candidates = values[values < best]
    while candidates.size:
        middle = candidates.size // 2
        pivot = float(np.partition(candidates, middle)[middle])
        if passes(pivot):
            best = pivot
            candidates = candidates[candidates < pivot]
        else:
            candidates = candidates[candidates > pivot]
    return best


# --- heuristic: greedy tests per deadline -----------------------------------------------------


def _solve_heuristic(problem: _Problem) -> tuple[np.ndarray, bool]:
    finite = np.isfinite(problem.latency)
    # every group needs a device within T: no smaller deadline passes
    floor = float(np.where(finite, problem.latency, np.inf).min(axis=0).max())
    values = problem.latency[finite & (problem.latency >= floor)]
    top = float(values.max())
    if _cover(problem, top, problem.current) is None:
        return _solve_heuristic_reliability(problem, values), False
    deadline = _smallest_passing(values, lambda t: _cover(problem, t, problem.current) is not None)
    x = _cover(problem, deadline, problem.current)
    assert x is not None
    # local search: repair the solution (with its replicas, as the next call sees it) below its T
    for _ in range(HEURISTIC_ROUNDS):
        start = _add_replicas(problem, x, _latency_of(problem, x))
        lower = values[values < _latency_of(problem, x)]
        if not lower.size or _cover(problem, float(lower.max()), start, fresh=False) is None:
            break
        deadline = _smallest_passing(lower, functools.partial(_repairs, problem, start))
        better = _cover(problem, deadline, start, fresh=False)
        assert better is not None
        x = better
    # fewest moves at that deadline: the current assignment repaired, else back home where possible
    eligible = problem.latency_t <= _latency_of(problem, x)
    repaired = _fill(problem, eligible, _kept(problem, eligible))
    return (repaired if repaired is not None else _return_home(problem, eligible, x)), True


def _solve_heuristic_reliability(problem: _Problem, values: np.ndarray) -> np.ndarray:
    target = _reliable(problem, float(values.max()))
    assert target is not None  # _check_coverage found a matching
    goal = float(np.sum(_log_success(problem, target))) - P_REL_TOL

    def good(deadline: float) -> bool:
        x = _reliable(problem, deadline)
        return x is not None and float(np.sum(_log_success(problem, x))) >= goal

    x = _reliable(problem, _smallest_passing(values, good))
    assert x is not None
    return x


def _repairs(problem: _Problem, start: np.ndarray, deadline_s: float) -> bool:
    return _cover(problem, deadline_s, start, fresh=False) is not None


def _log_success(problem: _Problem, x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log1p(-np.exp(_group_log_q(problem, x)))


def _kept(problem: _Problem, eligible: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """``start`` (default: the current assignment), less devices too slow for their group."""
    x = (problem.current if start is None else start).copy()
    on = np.flatnonzero(x >= 0)
    x[on[~eligible[x[on], on]]] = -1
    return x


def _cover(problem: _Problem, deadline_s: float, start: np.ndarray, fresh: bool = True) -> np.ndarray | None:
    """An assignment within the deadline meeting ε in every group (greedy), or None: ``start``
    repaired, else (``fresh``) one built from scratch, with devices back home where possible."""
    eligible = problem.latency_t <= deadline_s
    x = _fill(problem, eligible, _kept(problem, eligible, start))
    if x is None and fresh:
        x = _fill(problem, eligible, np.full(problem.n, -1, dtype=np.intp))
        if x is not None:
            x = _return_home(problem, eligible, x)
    return x


def _fill(problem: _Problem, eligible: np.ndarray, x: np.ndarray) -> np.ndarray | None:
    """Groups short of ε (fewest eligible free devices first) take free devices (those eligible
    for the fewest groups first, then the most reliable), then spare replicas of other groups."""
    weight, need = problem.weight, problem.need
    total = _group_weight(problem, x)
    if (total >= need).all():
        return x
    free = np.flatnonzero((x < 0) & eligible.any(axis=0))
    sub = eligible[:, free]
    order = np.argsort(sub.sum(axis=0) * (need + 1.0) - weight[free], kind="stable")
    free, sub = free[order], sub[:, order]
    free_weight = weight[free]
    available = np.ones(len(free), dtype=bool)
    for k in np.argsort(sub.sum(axis=1), kind="stable").tolist():
        short = need - total[k]
        if short <= 0:
            continue
        candidates = np.flatnonzero(sub[k] & available)
        if candidates.size:
            reached = np.cumsum(free_weight[candidates])
            last = int(np.searchsorted(reached, short))
            take = candidates[: last + 1]
            if last < len(candidates) - 1:
                # best fit for the last one: the lightest later candidate that still closes the gap
                gap = short - (reached[last - 1] if last else 0.0)
                later = candidates[last:]
                fits = later[free_weight[later] >= gap]
                take = np.append(candidates[:last], fits[np.argmin(free_weight[fits])])
            available[take] = False
            x[free[take]] = k
            total[k] += free_weight[take].sum()
        if total[k] < need and not _borrow(problem, eligible, x, total, k):
            return None
    return x if (_group_weight(problem, x) >= need).all() else None


def _borrow(problem: _Problem, eligible: np.ndarray, x: np.ndarray, total: np.ndarray, k: int) -> bool:
    """Group ``k`` takes spare replicas (most reliable first) of groups that still meet ε without them."""
    weight, need = problem.weight, problem.need
    donors = np.flatnonzero(eligible[k] & (x >= 0) & (x != k))
    for d in donors[np.argsort(-weight[donors], kind="stable")].tolist():
        j = int(x[d])
        if total[j] - weight[d] >= need:
            x[d] = k
            total[j] -= weight[d]
            total[k] += weight[d]
            if total[k] >= need:
                return True
    return bool(total[k] >= need)


def _return_home(problem: _Problem, eligible: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Devices go back to their current group where their present one still meets ε without them."""
    total = _group_weight(problem, x)
    weight, need = problem.weight.tolist(), problem.need
    for d in np.flatnonzero((problem.current >= 0) & (x != problem.current)).tolist():
        k, j = int(problem.current[d]), int(x[d])
        if eligible[k, d] and (j < 0 or total[j] - weight[d] >= need):
            if j >= 0:
                total[j] -= weight[d]
            total[k] += weight[d]
            x[d] = k
    return x


def _reliable(problem: _Problem, deadline_s: float) -> np.ndarray | None:
    """Case 2 (greedy): the most reliable devices first, each to the least reliable group it may
    serve (a bipartite matching first when that leaves a group empty), then improving moves."""
    eligible = problem.latency_t <= deadline_s
    empty = np.full(problem.n, -1, dtype=np.intp)
    x = _add_replicas(problem, empty, deadline_s, home=False)
    if (np.bincount(x[x >= 0], minlength=problem.k) == 0).any():
        matched = maximum_bipartite_matching(csr_matrix(eligible.astype(np.int8)), perm_type="column")
        if (matched < 0).any():
            return None
        empty[matched] = np.arange(problem.k)
        x = _add_replicas(problem, empty, deadline_s, home=False)
    return _improve_reliability(problem, x, eligible)


def _improve_reliability(problem: _Problem, x: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Single-device moves that raise ``Σ_k log(1 − Q_k)``, best first, within a work budget."""
    rounds = max(1, LOCAL_SEARCH_BUDGET // (problem.n * problem.k))
    allowed = eligible.T
    for _ in range(rounds):
        log_q = _group_log_q(problem, x)
        counts = np.bincount(x[x >= 0], minlength=problem.k)
        with np.errstate(divide="ignore", invalid="ignore"):
            success = np.log1p(-np.exp(log_q))
            join = np.log1p(-np.exp(log_q[None, :] + problem.log_q[:, None])) - success[None, :]
            on = x >= 0
            leave = np.zeros(problem.n)
            left = log_q[x[on]] - problem.log_q[on]
            leave[on] = np.log1p(-np.exp(np.minimum(left, 0.0))) - success[x[on]]
            leave[on & (counts[np.maximum(x, 0)] == 1)] = -np.inf  # a group keeps a device
        gain = np.where(allowed, join + leave[:, None], -np.inf)
        gain[on, x[on]] = -np.inf
        d, k = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not gain[d, k] > 1e-12:
            break
        x[d] = k
    return x


# --- replicas, hysteresis, the new plan -------------------------------------------------------


def _add_replicas(problem: _Problem, x: np.ndarray, limit_s: float, home: bool = True) -> np.ndarray:
    """Devices on standby join a group without raising ``T`` above ``limit_s``: their current
    group where they may (``home``); the others, most reliable first, the least reliable group
    they may serve (an empty group first)."""
    x = x.copy()
    within = problem.latency <= limit_s
    pool = np.flatnonzero((x < 0) & within.any(axis=1))
    if not pool.size:
        return x
    current = problem.current[pool]
    at_home = home & (current >= 0) & within[pool, np.maximum(current, 0)]
    x[pool[at_home]] = current[at_home]
    rest = pool[~at_home]
    rest = rest[np.argsort(problem.log_q[rest], kind="stable")]
    log_q = _group_log_q(problem, x)
    log_q[np.bincount(x[x >= 0], minlength=problem.k) == 0] = 1.0  # above any group with a device
    barred = np.where(within[rest], 0.0, -np.inf)
    for i, d in enumerate(rest.tolist()):
        k = int((log_q + barred[i]).argmax())
        x[d] = k
        log_q[k] += problem.log_q[d]
    return x


def _repair(problem: _Problem, x: np.ndarray) -> np.ndarray | None:
    """``x`` with every empty group given one device, with the fewest moves: a device on standby
    (or new) that holds the group's student where one exists, else a spare replica of a group that
    keeps another; of those the one that leaves ``P`` highest, then the fastest for the group.
    None when some empty group can get no device so."""
    x = x.copy()
    fits = np.isfinite(problem.latency)
    counts = np.bincount(x[x >= 0], minlength=problem.k)
    for k in np.flatnonzero(counts == 0).tolist():
        free = np.flatnonzero((x < 0) & fits[:, k])
        candidates = free if free.size else np.flatnonzero((x >= 0) & fits[:, k] & (counts[np.maximum(x, 0)] >= 2))
        if not candidates.size:
            return None
        log_q = _group_log_q(problem, x)
        donor = x[candidates]
        own = problem.log_q[candidates]
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.log1p(-np.exp(own))  # log P of group k with the device alone
            rest = np.where(donor >= 0, log_q[np.maximum(donor, 0)] - own, 0.0)
            lost = np.log1p(-np.exp(np.minimum(rest, 0.0))) - np.log1p(-np.exp(log_q[np.maximum(donor, 0)]))
            score = score + np.where(donor >= 0, np.nan_to_num(lost, nan=-np.inf), 0.0)
        d = int(candidates[np.lexsort((problem.latency[candidates, k], -score))[0]])
        if x[d] >= 0:
            counts[x[d]] -= 1
        x[d] = k
        counts[k] += 1
    return x


def _improvement(now: float, best: float) -> float:
    """Relative improvement of a cost (lower is better) from ``now`` to ``best``."""
    if now == best or now == 0:
        return 0.0
    if math.isinf(now):
        return math.inf
    return (now - best) / now


def _hysteresis(problem: _Problem, reliable: bool, keep: np.ndarray, best_obj: PlanObjective, margin: float) -> tuple[bool, str]:
    """Keep the current assignment (``keep``: with the standby and new devices added) when the
    best re-plan is at most ``margin`` better, relatively, in ``T`` (and in ``1 − P``, case 2)."""
    keep_obj = _objective(problem, keep)
    if reliable and not _meets_epsilon(problem, keep):
        return False, "the current assignment no longer meets epsilon in every group"
    gain_t = _improvement(keep_obj.latency_s, best_obj.latency_s)
    gain_f = 0.0 if reliable else _improvement(1.0 - keep_obj.p_complete, 1.0 - best_obj.p_complete)
    if gain_t <= margin and gain_f <= margin:
        return (
            True,
            f"the best re-plan improves on the current assignment by {100 * max(gain_t, gain_f, 0.0):.2f} % (margin {100 * margin:g} %)",
        )
    return False, f"a re-plan improves on the current assignment by {100 * max(gain_t, gain_f):.2f} % (above the {100 * margin:g} % margin)"


def _build_plan(plan: Plan, fleet: Fleet, epsilon: float, problem: _Problem, state: _FleetState, x: np.ndarray) -> Plan:
    """The plan with the new members; everything else (students, filters, scheme, catalog, ...) kept."""
    index = state.index
    outage = state.outage[index]
    ids = [state.ids[i] for i in index.tolist()]
    position = {d: i for g in plan.groups for i, d in enumerate(g.devices)}
    # within a group: the members that stay, in their old order, then the newcomers in fleet order
    stays = problem.home == x
    rank = np.where(stays, [position.get(d, 0) for d in ids], len(ids) + np.arange(len(ids)))
    order = np.lexsort((rank, x))
    order = order[x[order] >= 0]
    bounds = np.searchsorted(x[order], np.arange(problem.k + 1))
    groups = []
    for k, old in enumerate(plan.groups):
        members = order[bounds[k] : bounds[k + 1]]
        groups.append(
            GroupPlan(
                devices=[ids[i] for i in members.tolist()],
                filters=list(old.filters),
                student=old.student,
                failure_prob=float(np.prod(outage[members])),
                latency_s=float(problem.latency[members, k].max()),
            )
        )
    latency_s = max(g.latency_s for g in groups)
    smallest = min(plan.catalog[g.student].memory_bytes for g in plan.groups)
    where = dict(zip(ids, range(len(ids))))
    unassigned = []
    for j, d in enumerate(state.ids):
        i = where.get(d)
        if i is None:
            reason = f"memory_bytes {int(state.memory_bytes[j])} is below every group's student (the smallest needs {smallest} bytes)"
        elif x[i] < 0:
            fastest = int(np.argmin(problem.latency[i]))
            reason = (
                f"standby: it would raise T = {latency_s:.6g} s (its fastest group, {fastest}, takes {problem.latency[i, fastest]:.6g} s)"
            )
        else:
            continue
        unassigned.append(UnassignedDevice(id=d, reason=reason))
    data = plan.model_dump()
    data.update(
        epsilon=epsilon,
        input_bits=fleet.input_bits,
        groups=groups,
        latency_s=latency_s,
        p_complete=float(np.prod([1.0 - g.failure_prob for g in groups])),
        unassigned=unassigned,
        rocoin_version=__version__,
    )
    return Plan.model_validate(data)


def _reason(
    action: str,
    why: str,
    epsilon: float,
    epsilon_met: bool,
    before: PlanObjective,
    after: PlanObjective,
    best: PlanObjective,
    moves: list[Move],
    state: _FleetState,
    exact: bool,
) -> str:
    if epsilon_met:
        head = f"epsilon = {epsilon:g} met in every group"
    elif exact:
        head = f"epsilon = {epsilon:g} cannot be met in every group: P(every group answers) maximised"
    else:
        head = f"epsilon = {epsilon:g} not met in every group (the greedy search found no assignment that meets it): P maximised"
    return (
        f"{head}; {action}: {why}; T {before.latency_s:.6g} -> {after.latency_s:.6g} s (best found {best.latency_s:.6g} s),"
        f" P {before.p_complete:.6g} -> {after.p_complete:.6g}; {len(moves)} move(s), {len(state.added)} added,"
        f" {len(state.removed)} removed ({'exact' if exact else 'heuristic'} search)"
    )


__all__ = ["DEFAULT_MARGIN", "EXACT_MAX_DEVICES", "Move", "PlanObjective", "Replan", "assign_devices", "replan"]
