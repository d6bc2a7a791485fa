"""Weighted k-means: scikit-learn's (k-means++ seeding, Lloyd iterations), never leaving a cluster empty.

scikit-learn may return fewer distinct clusters than asked for when points coincide (it warns
and leaves the rest empty); the planner needs every label used — one group or one partition per
label — so an empty cluster takes the point farthest from its centre among clusters of more than
one point.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np


def kmeans(
    points: np.ndarray,
    n_clusters: int,
    *,
    sample_weight: np.ndarray | None = None,
    n_init: int = 4,
    max_iter: int = 100,
    n_local_trials: int | None = None,
    random_state: int | np.random.Generator | None = None,
) -> np.ndarray:
    """Labels ``0..n_clusters-1`` for ``points`` (n × d), every label used when ``n >= n_clusters``.

    Keeps the run with the lowest weighted inertia among ``n_init`` k-means++ seedings drawn from
    ``random_state`` (an int, or a generator that supplies one). ``n_local_trials`` is the number
    of candidates k-means++ tries per centre (scikit-learn's default, ``2 + log k``, when None;
    1 is the original k-means++, much cheaper for many points).
    """
    # Imported here: scikit-learn takes about half a second to import and only planning needs it.
    from sklearn.cluster import KMeans, kmeans_plusplus
    from sklearn.exceptions import ConvergenceWarning

    points = np.asarray(points, dtype=float)
    n = len(points)
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters = {n_clusters}: expected 1..{n}")
    if n_clusters == n:
        return np.arange(n)
    if n_clusters == 1:
        return np.zeros(n, dtype=int)
    if isinstance(random_state, np.random.Generator):
        random_state = int(random_state.integers(2**31 - 1))
    rng = np.random.RandomState(random_state)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    # One thread: these problems are small (a few dimensions), and the machine is often shared;
    # more threads only add synchronisation (measured: 1.4 s with one thread, 2.4 s with two).
    with _thread_pools().limit(limits=1), warnings.catch_warnings():
        # "Number of distinct clusters found smaller than n_clusters": _fill_empty deals with it.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(max(1, n_init)):
            centers, _ = kmeans_plusplus(points, n_clusters, sample_weight=sample_weight, random_state=rng, n_local_trials=n_local_trials)
            # tol=0: iterate until no label changes (or max_iter), as Lloyd's algorithm does.
            model = KMeans(n_clusters, init=centers, n_init=1, max_iter=max_iter, tol=0.0, random_state=rng)
            model.fit(points, sample_weight=sample_weight)
            if best is None or model.inertia_ < best[0] - 1e-12:
                best = (float(model.inertia_), model.labels_.astype(np.int64), model.cluster_centers_)
    assert best is not None
    _, labels, centers = best
    own = ((points - centers[labels]) ** 2).sum(axis=1)
    return _fill_empty(labels, own, n_clusters)


@functools.cache
def _thread_pools():
    """threadpoolctl's view of the loaded thread pools, taken once: a ``threadpool_limits`` per call
    scans the loaded libraries again (about 4 ms, a third of a small k-means)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


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
