"""Student assignment (SPEC.md §4.3): pair device groups with knowledge partitions.

``GroupCosts`` holds, for every group ``g``, partition ``k`` and student ``s``, the group latency
``T_g(s, k) = max_{d ∈ g} t(d, s, k)`` and whether ``s`` is feasible (fits every member's memory
and, when ``ρ_min`` is set, ``ρ(s, k) = n_s / |P_k| ≥ ρ_min``). Three matchings use it:

- ``paper``: Kuhn–Munkres on eq. 5, ``w(g, k) = max_s ρ(s, k) / T_g(s, k)``;
- ``minmax``: the exact bottleneck matching (smallest possible ``T``), then, among the students
  and pairings that keep ``T`` at that optimum, the one maximising the eq. 5 weights;
- ``greedy`` (RoCoIn-G, the paper's Tables II/III): the same eq. 5 weights and the same student
  per pair as ``paper``, but a greedy matching (the heaviest remaining pair first) instead of
  Kuhn–Munkres; its total weight is never above KM's (which is the maximum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from rocoin.contracts.catalog import CatalogArrays
from rocoin.contracts.errors import InfeasiblePlanError
from rocoin.contracts.fleet import FleetArrays


@dataclass(frozen=True)
class Assignment:
    """``partition[g]`` and ``student[g]`` for every group ``g``; ``latency_s[g] = T_g``."""

    partition: np.ndarray
    student: np.ndarray
    latency_s: np.ndarray


@dataclass(frozen=True)
class GroupCosts:
    latency_s: np.ndarray  # (G, K, S): T_g(s, k)
    feasible: np.ndarray  # (G, K, S) bool
    rho: np.ndarray  # (K, S): n_s / |P_k|

    @classmethod
    def build(
        cls,
        fleet: FleetArrays,
        groups: list[np.ndarray],
        sizes: np.ndarray,
        catalog: CatalogArrays,
        rho_min: float | None = None,
    ) -> GroupCosts:
        sizes = np.asarray(sizes, dtype=float)
        order = np.concatenate(groups)
        starts = np.cumsum([0] + [len(g) for g in groups[:-1]])
        flops, rate, input_s = fleet.flops[order], fleet.rate_bps[order], fleet.input_s[order]
        distinct, size_index = np.unique(sizes, return_inverse=True)
        # (U, S, members) -> worst member per group -> (U, S, G); t is separable in s and |P|.
        compute = catalog.flops[:, None] / flops[None, :] + input_s[None, :]  # (S, members)
        transmit = catalog.bits_per_filter * distinct[:, None] / rate[None, :]  # (U, members)
        worst = np.maximum.reduceat(compute[None, :, :] + transmit[:, None, :], starts, axis=2)
        latency = np.transpose(worst, (2, 0, 1))[:, size_index, :]  # (G, K, S)
        min_memory = np.minimum.reduceat(fleet.memory_bytes[order], starts)
        fits = catalog.memory_bytes[None, :] <= min_memory[:, None]  # (G, S)
        rho = catalog.params[None, :] / sizes[:, None]  # (K, S)
        accurate = np.ones_like(rho, dtype=bool) if rho_min is None else rho >= rho_min
        feasible = fits[:, None, :] & accurate[None, :, :]
        return cls(latency, feasible, rho)

    def weights(self, latency_cap: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
        """Eq. 5 weight and its argmax student per (g, k), over students with ``T_g ≤ latency_cap``."""
        allowed = self.feasible & (self.latency_s <= latency_cap)
        ratio = np.where(allowed, self.rho[None, :, :] / self.latency_s, -np.inf)
        best = ratio.argmax(axis=2)
        return np.take_along_axis(ratio, best[:, :, None], axis=2)[:, :, 0], best

    def fastest(self) -> tuple[np.ndarray, np.ndarray]:
        """Smallest feasible ``T_g(s, k)`` and its student per (g, k) (``inf`` when none fits)."""
        latency = np.where(self.feasible, self.latency_s, np.inf)
        best = latency.argmin(axis=2)
        return np.take_along_axis(latency, best[:, :, None], axis=2)[:, :, 0], best


def _infeasible(rho_min: float | None) -> InfeasiblePlanError:
    if rho_min is not None:
        return InfeasiblePlanError(
            f"rho-min = {rho_min:g} cannot be met: no one-to-one pairing of groups and partitions gives every"
            " group a student that fits its memory with enough parameters per filter; lower --rho-min"
        )
    return InfeasiblePlanError("no one-to-one pairing of groups and partitions gives every group a student that fits its memory")


def _finish(costs: GroupCosts, partition: np.ndarray, student: np.ndarray) -> Assignment:
    g = np.arange(len(partition))
    return Assignment(partition, student, costs.latency_s[g, partition, student])


def match_paper(costs: GroupCosts, rho_min: float | None = None) -> Assignment:
    """Maximum-weight matching on eq. 5 (Kuhn–Munkres)."""
    weight, student = costs.weights()
    finite = np.isfinite(weight)
    if not finite.any(axis=1).all():
        raise _infeasible(rho_min)
    scale = np.abs(weight[finite]).max()
    penalty = -(1.0 + len(weight)) * scale * 10.0 - 1.0
    rows, cols = linear_sum_assignment(np.where(finite, weight, penalty), maximize=True)
    if not finite[rows, cols].all():
        raise _infeasible(rho_min)
    partition = cols[np.argsort(rows)]
    return _finish(costs, partition, student[np.arange(len(partition)), partition])


def match_minmax(costs: GroupCosts, rho_min: float | None = None) -> Assignment:
    """Exact bottleneck matching (minimise ``max_g T_g``), ties broken by the eq. 5 weights."""
    fastest, _ = costs.fastest()
    candidates = np.unique(fastest[np.isfinite(fastest)])
    n = len(fastest)
    if len(candidates) == 0 or not _has_perfect_matching(fastest <= candidates[-1]):
        raise _infeasible(rho_min)
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _has_perfect_matching(fastest <= candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    cap = candidates[lo]
    weight, student = costs.weights(latency_cap=cap)
    finite = np.isfinite(weight)
    scale = np.abs(weight[finite]).max()
    penalty = -(1.0 + n) * scale * 10.0 - 1.0
    rows, cols = linear_sum_assignment(np.where(finite, weight, penalty), maximize=True)
    partition = cols[np.argsort(rows)]
    return _finish(costs, partition, student[np.arange(n), partition])


def _has_perfect_matching(allowed: np.ndarray) -> bool:
    matching = maximum_bipartite_matching(csr_matrix(allowed.astype(np.int8)), perm_type="column")
    return bool((matching >= 0).all())


def match_greedy(costs: GroupCosts, rho_min: float | None = None) -> Assignment:
    """RoCoIn-G: greedy matching on the eq. 5 weights (heaviest remaining (group, partition) pair
    first; ties: lower group, then lower partition), each pair with its eq. 5 student.

    Greedy may leave a group without a feasible partition where a perfect matching exists; that
    is :class:`InfeasiblePlanError`, as for any plan the scheme cannot make.
    """
    weight, student = costs.weights()
    groups, parts = weight.shape
    partition = np.full(groups, -1)
    taken = np.zeros(parts, dtype=bool)
    for flat in np.argsort(-weight, axis=None, kind="stable"):
        g, k = divmod(int(flat), parts)
        if not np.isfinite(weight[g, k]):
            break
        if partition[g] < 0 and not taken[k]:
            partition[g], taken[k] = k, True
    if (partition < 0).any():
        raise _infeasible(rho_min)
    return _finish(costs, partition, student[np.arange(groups), partition])


def matching_weight(costs: GroupCosts, assignment: Assignment) -> float:
    """The eq. 5 objective of an assignment: the sum over groups of ``ρ(s, k) / T_g(s, k)``."""
    g = np.arange(len(assignment.partition))
    return float((costs.rho[assignment.partition, assignment.student] / costs.latency_s[g, assignment.partition, assignment.student]).sum())
