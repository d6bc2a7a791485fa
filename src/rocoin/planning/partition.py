"""Knowledge partition (SPEC.md §4.2): the NoNN filter graph and its spectral normalised cut."""

from __future__ import annotations

from functools import cached_property

import numpy as np
from scipy.optimize import linear_sum_assignment

from rocoin.contracts.errors import RocoinError
from rocoin.planning.kmeans import kmeans

#: Images per block when summing the filter graph (bounds memory at block × F² floats).
GRAPH_BLOCK_IMAGES = 64


def check_activations(activations: np.ndarray, source: str = "activations") -> np.ndarray:
    """Validate an (images × F) array of per-image average filter activity (post-ReLU, ≥ 0)."""
    act = np.asarray(activations)
    if act.ndim != 2 or act.shape[0] < 1 or act.shape[1] < 1:
        raise RocoinError(f"{source}: shape {act.shape}: expected a 2-D array (images × filters) with at least one of each")
    if not np.issubdtype(act.dtype, np.number) or np.iscomplexobj(act):
        raise RocoinError(f"{source}: dtype {act.dtype}: expected real numbers")
    act = act.astype(float, copy=False)
    bad = ~np.isfinite(act)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise RocoinError(f"{source}[{i}, {j}] = {act[i, j]}: expected finite values ({int(bad.sum())} non-finite in all)")
    if (act < 0).any():
        i, j = np.argwhere(act < 0)[0]
        raise RocoinError(f"{source}[{i}, {j}] = {act[i, j]:.6g}: expected non-negative (post-ReLU) average activity")
    return act


def filter_graph(activations: np.ndarray) -> np.ndarray:
    """NoNN's filter graph ``W_ij = Σ_x a_i(x)·a_j(x)·|a_i(x) − a_j(x)|``.

    ``a(x)`` is each image's activity divided by its largest value (images with no activity are
    skipped). Large weights join an important filter with a less important one, which spreads
    important filters over the partitions.
    """
    act = check_activations(activations)
    peak = act.max(axis=1)
    act = act[peak > 0] / peak[peak > 0, None]
    # a·b·|a − b| = a²b + ab² − 2ab·min(a, b): two matrix products and one blocked pass.
    squared = act * act
    weights = squared.T @ act + act.T @ squared
    for start in range(0, len(act), GRAPH_BLOCK_IMAGES):
        block = act[start : start + GRAPH_BLOCK_IMAGES]
        smaller = np.minimum(block[:, :, None], block[:, None, :])
        smaller *= block[:, :, None]
        smaller *= block[:, None, :]
        weights -= 2.0 * smaller.sum(axis=0)
    np.maximum(weights, 0.0, out=weights)  # rounding can leave -1e-16 where a_i = a_j
    np.fill_diagonal(weights, 0.0)
    return weights


class SpectralPartitioner:
    """Partitions of one filter graph into ``k`` parts; the eigen-decomposition is done once."""

    def __init__(self, weights: np.ndarray, *, random_state: int | None = None, n_init: int = 4) -> None:
        weights = np.asarray(weights, dtype=float)
        if weights.ndim != 2 or weights.shape[0] != weights.shape[1]:
            raise RocoinError(f"filter graph: shape {weights.shape}: expected a square matrix")
        self.weights = (weights + weights.T) / 2.0
        self.random_state = random_state
        self.n_init = n_init
        self._cache: dict[int, list[np.ndarray]] = {}

    @property
    def num_filters(self) -> int:
        return self.weights.shape[0]

    @cached_property
    def _eigenvectors(self) -> np.ndarray:
        """Eigenvectors of ``L_sym = I − D^{-1/2} W D^{-1/2}``, smallest eigenvalue first."""
        degree = self.weights.sum(axis=1)
        floor = degree.max() * 1e-12 if degree.max() > 0 else 1.0
        inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, floor))
        laplacian = np.eye(self.num_filters) - inv_sqrt[:, None] * self.weights * inv_sqrt[None, :]
        _, vectors = np.linalg.eigh(laplacian)
        return vectors

    def embedding(self, k: int) -> np.ndarray:
        """Rows of the first ``k`` eigenvectors, normalised to unit length."""
        rows = self._eigenvectors[:, :k].copy()
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.num_filters:
            raise RocoinError(f"partitions = {k}: expected 1..{self.num_filters} (one filter at least per partition)")

    def normalized_cut(self, k: int) -> list[np.ndarray]:
        """Exactly ``k`` non-empty partitions (sorted filter indices), ordered by their first filter."""
        self._check_k(k)
        if k not in self._cache:
            labels = kmeans(self.embedding(k), k, n_init=self.n_init, random_state=self.random_state)
            self._cache[k] = _labels_to_parts(labels, k)
        return self._cache[k]

    def with_sizes(self, sizes: list[int] | np.ndarray) -> list[np.ndarray]:
        """Partitions whose sizes are exactly ``sizes`` (in that order), following the spectral clusters.

        Filters are matched to size-slots around the k-means centres by a minimum-cost assignment.
        """
        sizes = [int(s) for s in sizes]
        k = len(sizes)
        self._check_k(k)
        if min(sizes) < 1 or sum(sizes) != self.num_filters:
            raise RocoinError(f"partition sizes {sizes}: expected positive sizes summing to {self.num_filters}")
        points = self.embedding(k)
        parts = self.normalized_cut(k)
        centres = np.array([points[p].mean(axis=0) for p in parts])
        # Pair the natural clusters with the requested sizes: largest with largest.
        by_natural = np.argsort([-len(p) for p in parts], kind="stable")
        by_target = np.argsort([-s for s in sizes], kind="stable")
        centre_of_target = np.empty(k, dtype=int)
        centre_of_target[by_target] = by_natural
        slot_target = np.repeat(np.arange(k), sizes)
        cost = ((points[:, None, :] - centres[centre_of_target[slot_target]][None, :, :]) ** 2).sum(-1)
        rows, cols = linear_sum_assignment(cost)
        target_of_filter = np.empty(self.num_filters, dtype=int)
        target_of_filter[rows] = slot_target[cols]
        return [np.flatnonzero(target_of_filter == t) for t in range(k)]


def _labels_to_parts(labels: np.ndarray, k: int) -> list[np.ndarray]:
    parts = [np.flatnonzero(labels == j) for j in range(k)]
    parts.sort(key=lambda p: int(p[0]))
    return parts


def equal_sizes(num_filters: int, k: int) -> list[int]:
    """``k`` sizes differing by at most one, larger first, summing to ``num_filters``."""
    base, extra = divmod(num_filters, k)
    return [base + 1] * extra + [base] * (k - extra)


def normalized_cut_value(weights: np.ndarray, parts: list[np.ndarray]) -> float:
    """Eq. 3 of the paper: ``Ncut = Σ_k cut(P_k, V \\ P_k) / vol(P_k)`` of a partition of the filter
    graph, with ``vol(P_k)`` the sum of its filters' degrees. 0 when no edge is cut; at most ``K``.
    The spectral partition minimises a relaxation of it; this is the value of the result."""
    weights = np.asarray(weights, dtype=float)
    weights = (weights + weights.T) / 2.0
    degree = weights.sum(axis=1)
    value = 0.0
    for part in parts:
        volume = float(degree[part].sum())
        if volume > 0:
            value += (volume - float(weights[np.ix_(part, part)].sum())) / volume
    return value


def random_partition(sizes: list[int] | np.ndarray, *, random_state: int | np.random.Generator | None = None) -> list[np.ndarray]:
    """Filters dealt at random into parts of ``sizes`` (the baseline of a partition that ignores the graph)."""
    order = np.random.default_rng(random_state).permutation(int(np.sum(sizes)))
    return [np.sort(p) for p in np.split(order, np.cumsum(sizes)[:-1])]


def contiguous_partition(sizes: list[int] | np.ndarray) -> list[np.ndarray]:
    """Filters split in index order into parts of ``sizes`` (the naive split)."""
    return np.split(np.arange(int(np.sum(sizes))), np.cumsum(sizes)[:-1])


def proportional_sizes(num_filters: int, weights: np.ndarray) -> list[int]:
    """Sizes proportional to ``weights`` (largest remainder), at least one filter each."""
    weights = np.asarray(weights, dtype=float)
    k = len(weights)
    if k > num_filters:
        raise RocoinError(f"partitions = {k}: expected at most {num_filters} (the number of filters)")
    spare = num_filters - k  # one filter each first, the rest in proportion
    share = weights / weights.sum() * spare
    sizes = np.floor(share).astype(int)
    remainder = spare - int(sizes.sum())
    order = np.argsort(-(share - sizes), kind="stable")
    sizes[order[:remainder]] += 1
    return [int(s) + 1 for s in sizes]


def synthetic_activations(
    num_images: int = 500,
    num_filters: int = 256,
    num_classes: int = 10,
    *,
    random_state: int | np.random.Generator | None = None,
) -> np.ndarray:
    """A stand-in for a teacher's filter activity: each filter prefers a few classes.

    Images of a class activate its preferred filters strongly; the result has the block
    structure real final-layer activity shows, so the normalised cut has something to find.
    """
    rng = np.random.default_rng(random_state)
    labels = rng.integers(num_classes, size=num_images)
    preference = rng.gamma(0.5, 1.0, size=(num_classes, num_filters))
    importance = rng.lognormal(0.0, 0.5, size=num_filters)
    signal = preference[labels] * importance
    noise = rng.normal(0.0, 0.3, size=(num_images, num_filters))
    return np.maximum(signal + noise + 0.2, 0.0).astype(np.float32)
