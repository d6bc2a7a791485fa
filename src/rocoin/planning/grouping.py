"""Device grouping (SPEC.md §4.1): the modified follow-the-leader with a reliability target.

Devices are visited in descending capacity (ties by position in the fleet). A device joins the
nearest *open* group — one whose failure probability ``q = Π p_d`` is still above ``ε`` — whose
centroid lies within ``θ``; otherwise it leads a new group. A group closes once it meets ``ε``.
Groups still above ``ε`` at the end are merged, in rounds, into their nearest group (by centroid)
until all meet it [decision]. When there are more groups than partitions allowed (``max_groups``,
normally the number of filters ``F``), the groups are clustered by centroid (weighted k-means) and
each cluster merged into one group [decision] — merging only lowers ``q``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.spatial import cKDTree

from rocoin.contracts.errors import InfeasiblePlanError
from rocoin.contracts.fleet import FleetArrays
from rocoin.planning.kmeans import kmeans

#: θ values tried by the automatic search, as fractions of the largest possible distance.
THETA_GRID_FRACTIONS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0)


def capacity_features(fleet: FleetArrays, *, include_rate: bool = False) -> np.ndarray:
    """Min–max normalised capacity vectors ``(f_d, m_d[, r_d])`` (eq. 2); constant columns are 0."""
    columns = [fleet.flops, fleet.memory_bytes] + ([fleet.rate_bps] if include_rate else [])
    out = np.zeros((len(fleet), len(columns)))
    for j, col in enumerate(columns):
        span = col.max() - col.min()
        if span > 0:
            out[:, j] = (col - col.min()) / span
    return out


def capacity_order(features: np.ndarray) -> np.ndarray:
    """Visit order: descending total normalised capacity, ties by fleet position."""
    return np.argsort(-features.sum(axis=1), kind="stable")


def theta_grid(num_features: int) -> list[float]:
    """The θ candidates of the automatic search (the largest distance is ``sqrt(num_features)``)."""
    top = math.sqrt(num_features)
    return [round(f * top, 6) for f in THETA_GRID_FRACTIONS]


def best_achievable_failure(outage: np.ndarray) -> float:
    """The lowest ``max_k q_k`` any grouping reaches: every device in one group."""
    return float(np.prod(outage))


def follow_the_leader(features: np.ndarray, outage: np.ndarray, epsilon: float, theta: float) -> np.ndarray:
    """Group label of every device after the modified follow-the-leader pass alone.

    Open groups are found through a grid of cells a little wider than ``2θ``: the ball of radius
    ``θ`` around a device meets at most two cells per dimension (4 in 2-D, 8 in 3-D), whose keys
    are computed for all devices at once; each device then looks only at the open groups filed
    under those cells. ``O(N)`` when groups stay small.
    """
    n, dims = features.shape
    # A device's two cells per dimension cover [x - reach, x - reach + cell), which holds
    # [x - θ, x + θ] with a margin far above rounding (features lie in [0, 1]); cells are at
    # least 1e-6 wide so that the integer keys stay below 2**63 in three dimensions.
    reach = theta + 1e-9
    cell = max(2.0 * reach + 1e-9, 1e-6)
    theta_sq = theta * theta
    lowest = np.floor((features - reach) / cell).astype(np.int64) + 1  # >= 0: features are >= 0
    base = int(np.floor(features.max(initial=0.0) / cell)) + 3
    weights = base ** np.arange(dims, dtype=np.int64)
    corners = np.array(list(itertools.product((0, 1), repeat=dims)), dtype=np.int64)  # (2**dims, dims)
    near = ((lowest[:, None, :] + corners[None, :, :]) * weights).sum(axis=2)  # (n, 2**dims) cell keys
    home = ((np.floor(features / cell).astype(np.int64) + 1) * weights).sum(axis=1)  # the cell of each device
    w0, w1, w2 = (weights.tolist() + [0, 0])[:3]
    padded = np.zeros((n, 3))
    padded[:, :dims] = features
    order = capacity_order(features)
    labels = np.empty(n, dtype=np.int64)
    group_of: list[int] = []  # the group of every device, in visit order
    # Per group: centroid (x, y, z), member count, failure probability, cell key (-1: closed).
    cx: list[float] = []
    cy: list[float] = []
    cz: list[float] = []
    count: list[int] = []
    q: list[float] = []
    key: list[int] = []
    grid: dict[int, set[int]] = {}
    floor = math.floor
    visits = zip(
        padded[order, 0].tolist(),
        padded[order, 1].tolist(),
        padded[order, 2].tolist(),
        outage[order].tolist(),
        home[order].tolist(),
        near[order].tolist(),
    )
    for x, y, z, p, own_cell, near_cells in visits:
        best, best_d = -1, math.inf
        for cell_key in near_cells:
            bucket = grid.get(cell_key)
            if bucket:
                for g in bucket:
                    dx, dy, dz = x - cx[g], y - cy[g], z - cz[g]
                    d = dx * dx + dy * dy + dz * dz
                    if d <= theta_sq and (d < best_d or (d == best_d and g < best)):
                        best, best_d = g, d
        if best < 0:
            g = len(q)
            group_of.append(g)
            cx.append(x), cy.append(y), cz.append(z), count.append(1), q.append(p)
            if p > epsilon:
                key.append(own_cell)
                grid.setdefault(own_cell, set()).add(g)
            else:
                key.append(-1)
            continue
        g = best
        group_of.append(g)
        m = count[g]
        gx, gy, gz = (cx[g] * m + x) / (m + 1), (cy[g] * m + y) / (m + 1), (cz[g] * m + z) / (m + 1)
        cx[g], cy[g], cz[g] = gx, gy, gz
        count[g] = m + 1
        q[g] *= p
        old = key[g]
        if q[g] > epsilon:
            new = (floor(gx / cell) + 1) * w0 + (floor(gy / cell) + 1) * w1 + (floor(gz / cell) + 1) * w2
            if new != old:
                grid[old].discard(g)
                grid.setdefault(new, set()).add(g)
                key[g] = new
        else:
            grid[old].discard(g)
            key[g] = -1
    labels[order] = group_of
    return labels


def _centroids(labels: np.ndarray, features: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    size = np.bincount(labels, minlength=num_groups).astype(float)
    sums = np.stack([np.bincount(labels, weights=features[:, j], minlength=num_groups) for j in range(features.shape[1])], 1)
    return sums / size[:, None], size


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 0..G-1 in order of each group's first device."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse], len(first)


def merge_unreliable(labels: np.ndarray, features: np.ndarray, outage: np.ndarray, epsilon: float) -> np.ndarray:
    """Merge groups above ``ε`` into their nearest group, in rounds, until every group meets ``ε``."""
    labels, num_groups = _relabel(labels)
    log_eps = math.log(epsilon)
    log_p = np.log(np.maximum(outage, 1e-300))
    while True:
        log_q = np.bincount(labels, weights=log_p, minlength=num_groups)
        bad = np.flatnonzero(log_q > log_eps + 1e-12)
        if len(bad) == 0:
            return labels
        if num_groups == 1:
            raise InfeasiblePlanError(
                f"epsilon = {epsilon:g} cannot be met: even one group of all {len(outage)} devices fails with"
                f" probability {best_achievable_failure(outage):.6g} (the best achievable); raise --epsilon"
                " to at least that, or add devices"
            )
        centroids, _ = _centroids(labels, features, num_groups)
        _, nearest = cKDTree(centroids).query(centroids[bad], k=2)
        parent = list(range(num_groups))

        def find(a: int, parent: list[int] = parent) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for g, (first, second) in zip(bad.tolist(), nearest.tolist()):
            ra, rb = find(g), find(second if first == g else first)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        roots = np.array([find(g) for g in range(num_groups)])
        labels, num_groups = _relabel(roots[labels])


def limit_groups(labels: np.ndarray, features: np.ndarray, max_groups: int, random_state: int | None) -> np.ndarray:
    """Merge groups by clustering their centroids (weighted by size) down to ``max_groups``."""
    labels, num_groups = _relabel(labels)
    if num_groups <= max_groups:
        return labels
    centroids, size = _centroids(labels, features, num_groups)
    clusters = kmeans(centroids, max_groups, sample_weight=size, n_init=1, n_local_trials=1, random_state=random_state)
    return _relabel(clusters[labels])[0]


def group_devices(
    fleet: FleetArrays,
    epsilon: float,
    theta: float,
    *,
    max_groups: int,
    include_rate: bool = False,
    random_state: int | None = None,
) -> list[np.ndarray]:
    """RoCoIn's device groups: every device in exactly one group, every group meeting ``ε``.

    Groups are returned with sorted member indices, ordered by their first member.
    """
    features = capacity_features(fleet, include_rate=include_rate)
    labels = follow_the_leader(features, fleet.outage, epsilon, theta)
    labels = merge_unreliable(labels, features, fleet.outage, epsilon)
    labels = limit_groups(labels, features, max_groups, random_state)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, bounds)
