"""A small weighted k-means (k-means++ seeding, Lloyd iterations) that never leaves a cluster empty."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

#: Up to this many dimensions, nearest centres come from a k-d tree instead of all distances.
KD_TREE_MAX_DIMS = 8


def kmeans(
    points: np.ndarray,
    n_clusters: int,
    *,
    sample_weight: np.ndarray | None = None,
    n_init: int = 4,
    max_iter: int = 100,
    random_state: int | np.random.Generator | None = None,
) -> np.ndarray:
    """Labels ``0..n_clusters-1`` for ``points`` (n × d), every label used when ``n >= n_clusters``.

    Keeps the run with the lowest weighted inertia among ``n_init`` seedings.
    """
    points = np.asarray(points, dtype=float)
    n = len(points)
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters = {n_clusters}: expected 1..{n}")
    if n_clusters == n:
        return np.arange(n)
    if n_clusters == 1:
        return np.zeros(n, dtype=int)
    weight = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    rng = np.random.default_rng(random_state)
    best_labels, best_inertia = None, np.inf
    for _ in range(max(1, n_init)):
        labels, inertia = _lloyd(points, weight, _plus_plus(points, weight, n_clusters, rng), max_iter)
        if inertia < best_inertia - 1e-12:
            best_labels, best_inertia = labels, inertia
    assert best_labels is not None
    return best_labels


def _plus_plus(points: np.ndarray, weight: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    n = len(points)
    centers = np.empty((k, points.shape[1]))
    first = rng.choice(n, p=weight / weight.sum())
    centers[0] = points[first]
    closest = ((points - centers[0]) ** 2).sum(1)
    for j in range(1, k):
        prob = weight * closest
        total = prob.sum()
        index = rng.choice(n, p=prob / total) if total > 0 else rng.integers(n)
        centers[j] = points[index]
        closest = np.minimum(closest, ((points - centers[j]) ** 2).sum(1))
    return centers


def _nearest(points: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of and squared distance to the nearest centre of every point."""
    if points.shape[1] <= KD_TREE_MAX_DIMS:
        dist, labels = cKDTree(centers).query(points)
        return labels, dist**2
    d = (points**2).sum(1)[:, None] - 2.0 * points @ centers.T + (centers**2).sum(1)[None, :]
    labels = d.argmin(1)
    return labels, np.maximum(d[np.arange(len(points)), labels], 0.0)


def _lloyd(points: np.ndarray, weight: np.ndarray, centers: np.ndarray, max_iter: int) -> tuple[np.ndarray, float]:
    k = len(centers)
    labels = np.full(len(points), -1)
    for _ in range(max_iter):
        new_labels, own = _nearest(points, centers)
        new_labels = _fill_empty(new_labels, own, k)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        wsum = np.bincount(labels, weights=weight, minlength=k)
        for dim in range(points.shape[1]):
            centers[:, dim] = np.bincount(labels, weights=weight * points[:, dim], minlength=k) / np.maximum(wsum, 1e-300)
    inertia = float((weight * ((points - centers[labels]) ** 2).sum(1)).sum())
    return labels, inertia


def _fill_empty(labels: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Give every empty cluster the point farthest from its centre among clusters of size > 1."""
    counts = np.bincount(labels, minlength=k)
    if counts.min() > 0:
        return labels
    labels = labels.copy()
    order = np.argsort(-own, kind="stable")
    cursor = 0
    for empty in np.flatnonzero(counts == 0):
        while counts[labels[order[cursor]]] <= 1:
            cursor += 1
        point = order[cursor]
        counts[labels[point]] -= 1
        labels[point] = empty
        counts[empty] = 1
        cursor += 1
    return labels
