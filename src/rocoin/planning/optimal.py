"""Exact solver of the knowledge-assignment problem (SPEC.md §3) for small fleets.

Which filters go to which partition does not change the latency, only the partition sizes do,
so the problem is: split the devices into groups ``g_1..g_K`` (``K ≤ F``), give each a size
``n_k ≥ 1`` with ``Σ n_k = F`` and a student ``s_k``, minimising
``T = max_k max_{d ∈ g_k} t(d, s_k, n_k)`` subject to ``Π_{d ∈ g_k} p_d ≤ ε`` (reliability),
``M_{s_k} ≤ m_d`` for every member (memory) and, when ``ρ_min`` is given, ``n_{s_k} / n_k ≥ ρ_min``.

Method. For a deadline ``T`` the *capacity* of a set of devices is the largest partition it can
serve within ``T``::

    cap_T(g) = max_{s fits every member} min( min_{d ∈ g} ⌊(T − c_s/f_d − input_s_d)·r_d / 32⌋ ,
                                              ⌊n_s / ρ_min⌋ )

``T`` is achievable iff the devices split into at most ``F`` groups, each meeting ``ε`` with
``cap_T ≥ 1``, whose capacities (each capped at ``F``) add up to at least ``F``: then sizes
``1 ≤ n_k ≤ cap_k`` summing to ``F`` exist. Achievability is monotone in ``T`` and can only change
where some ``(T − c_s/f_d − input_s_d)·r_d/32`` crosses an integer, so the optimum ``T*`` is the
smallest achievable *breakpoint* ``c_s/f_d + input_s_d + 32·n/r_d`` (``n = 1..F``). The solver
binary-searches the sorted breakpoints; each test is a dynamic programme over the ``2^N`` subsets
(layer ``k`` = best total capacity with exactly ``k`` groups, ``3^N / 2`` (set, first-group)
pairs per layer, vectorised with numpy).

Among the groupings that reach ``T*`` it keeps one with the fewest groups (more replicas per
partition, fewer students to train) [decision], splits the filters in proportion to the groups'
capacities (every group keeps latency slack) [decision] and gives each group the student with
the most parameters that still meets ``T*`` (the best capacity ratio ``ρ``) [decision].

Feasibility. Memory alone never makes the problem infeasible: the whole fleet as one group, with
a student that fits its smallest device, serves all ``F`` filters. So without ``ρ_min`` a plan
exists iff ``Π_d p_d ≤ ε``; with it, the error names the largest ``ρ_min`` any grouping meets.

Cost (measured, one CPU core, numpy 2): 10 devices, ``F = 256``, the 7 default students:
about 5 ms per solve (at most 7 ms over 60 random fleets); ``F = 2048`` with all 10 devices alone
in their groups: about 10 ms. The first call for a fleet size adds ~4 ms to build the subset
pairs. The work grows as ``3^N``, hence :data:`MAX_DEVICES`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from rocoin.contracts.catalog import CatalogArrays
from rocoin.contracts.errors import InfeasiblePlanError, RocoinError
from rocoin.contracts.fleet import FleetArrays
from rocoin.contracts.latency import device_latency_s

logger = logging.getLogger(__name__)

#: The largest fleet the exact solver accepts (its work grows as 3^N).
MAX_DEVICES = 10
#: Relative slack on ``ε`` (the grouping heuristic uses the same, in log space).
EPSILON_REL_TOL = 1e-12
#: Relative slack on ``(T − a)·r/32`` before taking the floor, so that a breakpoint computed in
#: floating point still reaches its integer.
CAPACITY_REL_TOL = 1e-12
#: Marks an invalid group / an unreachable DP state (sums of a few of these stay in int64).
_NEG = -(1 << 40)


@dataclass(frozen=True)
class OptimalSolution:
    """An optimal grouping: ``groups[k]`` (sorted fleet indices) serve ``sizes[k]`` filters
    with student ``students[k]`` (an index into the catalog arrays)."""

    groups: list[np.ndarray]
    sizes: list[int]
    students: list[int]
    #: the optimum ``T``: the largest group latency of this configuration
    latency_s: float


@functools.cache
def _subset_pairs(num_devices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All ``(mask, sub)`` with ``sub ⊆ mask`` and ``sub`` holding ``mask``'s lowest device,
    sorted by ``mask``; plus the start offset of every ``mask = 1..2^N−1`` in that list."""
    size = 1 << num_devices
    masks = np.arange(size, dtype=np.int64)
    low = masks & -masks
    is_pair = ((masks[None, :] & ~masks[:, None]) == 0) & ((masks[None, :] & low[:, None]) != 0)
    mask_of, sub_of = np.nonzero(is_pair)  # row-major: sorted by mask, mask 0 has no pair
    starts = np.searchsorted(mask_of, np.arange(1, size))
    return mask_of.astype(np.int64), sub_of.astype(np.int64), starts


def _subset_reduce(values: np.ndarray, start: float, op) -> np.ndarray:
    """``out[mask] = op`` over the rows ``values[d]`` of the devices in ``mask`` (``start`` for 0)."""
    n = values.shape[0]
    out = np.full((1 << n,) + values.shape[1:], start, dtype=values.dtype)
    for d in range(n):
        half = 1 << d
        out[half : 2 * half] = op(out[:half], values[d])
    return out


class _Model:
    """The fixed data of one instance; evaluates capacities and the grouping DP for a deadline."""

    def __init__(self, fleet: FleetArrays, catalog: CatalogArrays, num_filters: int, epsilon: float, rho_min: float | None) -> None:
        self.fleet, self.catalog = fleet, catalog
        self.n, self.num_filters = len(fleet), num_filters
        self.full = (1 << self.n) - 1
        #: a[d, s] = c_s / f_d + input_s_d, the size-independent part of t(d, s, ·)
        self.base_s = catalog.flops[None, :] / fleet.flops[:, None] + fleet.input_s[:, None]
        self.per_value_s = catalog.bits_per_filter / fleet.rate_bps  # seconds per sent filter's output, per device
        self.fits = catalog.memory_bytes[None, :] <= fleet.memory_bytes[:, None]  # (N, S)
        group_fits = _subset_reduce(self.fits, True, np.logical_and)  # (2^N, S)
        q = _subset_reduce(fleet.outage.astype(float), 1.0, np.multiply)
        self.reliable = q <= epsilon * (1.0 + EPSILON_REL_TOL)
        self.reliable[0] = False
        self.group_fits = group_fits & self.reliable[:, None]
        self.max_groups = min(self.n, num_filters)
        self.set_rho_min(rho_min)

    def set_rho_min(self, rho_min: float | None) -> None:
        """Largest partition each student may take: ``⌊n_s / ρ_min⌋`` (``F`` without ``ρ_min``)."""
        limit = np.full(len(self.catalog), self.num_filters, dtype=np.int64)
        if rho_min is not None:
            ratio = self.catalog.params / rho_min
            limit = np.minimum(limit, np.floor(ratio * (1.0 + CAPACITY_REL_TOL)).astype(np.int64))
        self.size_limit = limit

    def student_capacity(self, deadline_s: float) -> np.ndarray:
        """``(2^N, S)``: the largest size each subset serves with each student by ``deadline_s``
        (``_NEG`` where the student does not fit, the subset misses ``ε`` or nothing fits)."""
        if np.isinf(deadline_s):
            per_device = np.full(self.base_s.shape, self.num_filters, dtype=np.int64)
        else:
            x = (deadline_s - self.base_s) / self.per_value_s[:, None]
            x = x + CAPACITY_REL_TOL * (1.0 + abs(deadline_s) / self.per_value_s[:, None])
            per_device = np.floor(np.clip(x, -1.0, self.num_filters)).astype(np.int64)
        per_device = np.minimum(per_device, self.size_limit[None, :])
        cap = _subset_reduce(per_device, np.int64(self.num_filters), np.minimum)
        return np.where(self.group_fits & (cap >= 1), cap, _NEG)

    def layers(self, capacity: np.ndarray, stop_early: bool = True) -> list[np.ndarray]:
        """``best[k][mask]``: the largest total capacity of ``mask`` split into exactly ``k``
        valid groups (``< 0`` when impossible), for ``k = 0..`` until the fleet reaches ``F``."""
        mask_of, sub_of, starts = _subset_pairs(self.n)
        best = np.full(self.full + 1, _NEG, dtype=np.int64)
        best[0] = 0
        out = [best]
        cap_of_sub = capacity[sub_of]
        rest = mask_of ^ sub_of
        for _ in range(self.max_groups):
            total = np.maximum(cap_of_sub + out[-1][rest], _NEG)
            best = np.full(self.full + 1, _NEG, dtype=np.int64)
            best[1:] = np.maximum.reduceat(total, starts)
            out.append(best)
            if stop_early and best[self.full] >= self.num_filters:
                break
        return out

    def feasible(self, deadline_s: float) -> bool:
        capacity = self.student_capacity(deadline_s).max(axis=1)
        return bool(self.layers(capacity)[-1][self.full] >= self.num_filters)


def _check_inputs(fleet: FleetArrays, catalog: CatalogArrays, num_filters: int, epsilon: float, rho_min: float | None) -> None:
    n = len(fleet)
    if n == 0:
        raise RocoinError("the exact solver needs at least one device; got 0")
    if n > MAX_DEVICES:
        raise RocoinError(f"the exact solver handles at most {MAX_DEVICES} devices; got {n}")
    if len(catalog) == 0:
        raise RocoinError("the exact solver needs at least one student; the catalog is empty")
    if int(num_filters) != num_filters or num_filters < 1:
        raise RocoinError(f"num_filters = {num_filters}: expected a positive integer")
    if not np.isfinite(epsilon) or not 0.0 <= epsilon <= 1.0:
        raise RocoinError(f"epsilon = {epsilon}: expected a probability in [0, 1]")
    if rho_min is not None and (not np.isfinite(rho_min) or rho_min <= 0):
        raise RocoinError(f"rho_min = {rho_min}: expected a positive number")
    fits_any = (catalog.memory_bytes[None, :] <= fleet.memory_bytes[:, None]).any(axis=1)
    if not fits_any.all():
        d = int(np.flatnonzero(~fits_any)[0])
        smallest = float(catalog.memory_bytes.min())
        raise RocoinError(
            f"device {fleet.ids[d]!r} has {fleet.memory_bytes[d]:.0f} bytes of memory and fits no student"
            f" (the smallest needs {smallest:.0f}); leave it out of the fleet"
        )


def _explain_infeasible(
    model: _Model, fleet: FleetArrays, catalog: CatalogArrays, num_filters: int, epsilon: float, rho_min: float | None
) -> InfeasiblePlanError:
    n = len(fleet)
    best_q = float(np.prod(fleet.outage))
    if best_q > epsilon * (1.0 + EPSILON_REL_TOL):
        return InfeasiblePlanError(
            f"epsilon = {epsilon:g} cannot be met: even one group of all {n} devices fails with"
            f" probability {best_q:.6g} (the best achievable); raise epsilon"
        )
    # Otherwise rho_min is the cause: without it, the whole fleet as one group, with a student
    # that fits its smallest device, serves all F filters and meets epsilon.
    assert rho_min is not None
    # the largest rho_min any grouping meets is one of n_s / n: bisect on those
    ratios = np.unique(catalog.params[:, None] / np.arange(1, num_filters + 1)[None, :])
    lo, hi = 0, len(ratios) - 1  # ratios[0] = min n_s / F: the one-group plan meets it
    while lo < hi:
        mid = (lo + hi + 1) // 2
        model.set_rho_min(float(ratios[mid]))
        if model.feasible(np.inf):
            lo = mid
        else:
            hi = mid - 1
    return InfeasiblePlanError(
        f"rho_min = {rho_min:g} cannot be met with epsilon = {epsilon:g} and {num_filters} filters:"
        f" the best achievable capacity ratio is {float(ratios[lo]):.6g} parameters per filter"
    )


def _split_sizes(capacities: list[int], num_filters: int) -> list[int]:
    """Sizes ``1 ≤ n_k ≤ cap_k`` summing to ``F``: ``1`` each plus the rest in proportion to
    ``cap_k − 1`` (largest remainders, ties to the earlier group)."""
    k = len(capacities)
    spare = [c - 1 for c in capacities]
    extra_total = num_filters - k
    room = sum(spare)
    if extra_total == 0 or room == 0:
        return [1] * k
    extra = [extra_total * s // room for s in spare]
    remainders = [extra_total * s % room for s in spare]
    left = extra_total - sum(extra)
    for i in sorted(range(k), key=lambda i: (-remainders[i], i))[:left]:
        extra[i] += 1
    sizes = [1 + e for e in extra]
    assert sum(sizes) == num_filters and all(1 <= s <= c for s, c in zip(sizes, capacities))
    return sizes


def solve_optimal(
    fleet: FleetArrays,
    catalog: CatalogArrays,
    num_filters: int,
    epsilon: float,
    rho_min: float | None = None,
) -> OptimalSolution:
    """The minimum completion delay ``T`` over all groupings, sizes and students (SPEC.md §3).

    Raises :class:`RocoinError` for more than :data:`MAX_DEVICES` devices, bad arguments or a
    device that fits no student (leave it out first), and :class:`InfeasiblePlanError` when no
    grouping meets ``ε`` (the message gives the best achievable value), the memory limits or
    ``ρ_min`` (the message gives the best achievable ratio).
    """
    _check_inputs(fleet, catalog, num_filters, epsilon, rho_min)
    num_filters = int(num_filters)
    model = _Model(fleet, catalog, num_filters, epsilon, rho_min)
    if not model.feasible(np.inf):
        raise _explain_infeasible(model, fleet, catalog, num_filters, epsilon, rho_min)

    # breakpoints a[d, s] + n·32/r_d for every device, fitting student and admissible size
    sizes = np.arange(1, num_filters + 1, dtype=float)
    points = model.base_s[:, :, None] + model.per_value_s[:, None, None] * sizes[None, None, :]
    usable = model.fits[:, :, None] & (sizes[None, None, :] <= model.size_limit[None, :, None])
    candidates = np.unique(points[usable])
    # the largest breakpoint gives every group its T = ∞ capacity, so it is achievable
    lo, hi, steps = 0, len(candidates) - 1, 0
    while lo < hi:
        mid = (lo + hi) // 2
        steps += 1
        if model.feasible(float(candidates[mid])):
            hi = mid
        else:
            lo = mid + 1
    deadline_s = float(candidates[lo])
    logger.debug("exact solver: %d breakpoints, %d feasibility tests, T* = %.9g s", len(candidates), steps, deadline_s)

    # reconstruct: the fewest groups reaching F, then walk the DP back
    per_student = model.student_capacity(deadline_s)
    capacity = per_student.max(axis=1)
    layers = model.layers(capacity, stop_early=True)
    k = next(k for k, best in enumerate(layers) if best[model.full] >= num_filters)
    mask_of, sub_of, starts = _subset_pairs(model.n)
    ends = np.append(starts[1:], len(mask_of))
    chosen: list[int] = []
    mask = model.full
    while k > 0:
        subs = sub_of[starts[mask - 1] : ends[mask - 1]]
        totals = capacity[subs] + layers[k - 1][mask ^ subs]
        sub = int(subs[int(np.argmax(totals == layers[k][mask]))])
        chosen.append(sub)
        mask ^= sub
        k -= 1
    # groups in order of their lowest device
    chosen.sort(key=lambda m: m & -m)
    caps = [min(int(capacity[m]), num_filters) for m in chosen]
    group_sizes = _split_sizes(caps, num_filters)

    groups, students, latencies = [], [], []
    for m, size in zip(chosen, group_sizes):
        members = np.array([d for d in range(model.n) if m >> d & 1], dtype=int)
        ok = np.flatnonzero(per_student[m] >= size)
        group_latency = np.array(
            [
                float(
                    device_latency_s(
                        fleet.flops[members],
                        fleet.rate_bps[members],
                        fleet.input_s[members],
                        catalog.flops[s],
                        size,
                        catalog.bits_per_filter,
                    ).max()
                )
                for s in ok
            ]
        )
        # most parameters first, then the lower latency, then catalog order
        pick = min(range(len(ok)), key=lambda i: (-catalog.params[ok[i]], group_latency[i], ok[i]))
        groups.append(members)
        students.append(int(ok[pick]))
        latencies.append(group_latency[pick])
    latency_s = max(latencies)
    logger.info("exact solver: %d devices in %d groups, T = %.6g s", model.n, len(groups), latency_s)
    return OptimalSolution(groups=groups, sizes=group_sizes, students=students, latency_s=latency_s)
