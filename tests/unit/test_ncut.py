"""The normalised cut (eq. 3) of the partitions the planner makes, against partitions that ignore the graph."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import block_graph

from rocoin.planning import filter_graph, synthetic_activations
from rocoin.planning.partition import SpectralPartitioner, contiguous_partition, normalized_cut_value, random_partition


def test_the_value_of_known_partitions():
    weights = block_graph([3, 3], inside=1.0, across=0.0)
    assert normalized_cut_value(weights, [np.arange(3), np.arange(3, 6)]) == 0.0  # no edge cut
    # every edge of a complete graph on 4 nodes, halves {0,1} and {2,3}: each part keeps 2 of its 6 edge ends
    complete = np.ones((4, 4)) - np.eye(4)
    assert normalized_cut_value(complete, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(2 * 4 / 6)


def test_random_and_contiguous_partitions_have_the_sizes_asked_for():
    sizes = [5, 3, 8]
    for parts in (random_partition(sizes, random_state=0), contiguous_partition(sizes)):
        assert [len(p) for p in parts] == sizes
        assert sorted(np.concatenate(parts).tolist()) == list(range(16))


@pytest.mark.parametrize("k", [2, 5, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_spectral_partition_cuts_less_than_random_or_contiguous_ones_of_the_same_sizes(seed, k):
    weights = filter_graph(synthetic_activations(500, 128, random_state=seed))
    parts = SpectralPartitioner(weights, random_state=0).normalized_cut(k)
    sizes = [len(p) for p in parts]
    ours = normalized_cut_value(weights, parts)
    randoms = [normalized_cut_value(weights, random_partition(sizes, random_state=r)) for r in range(20)]
    contiguous = normalized_cut_value(weights, contiguous_partition(sizes))
    # Lower than the best of 20 random partitions, not only lower than their mean.
    assert ours < min(randoms) and ours < contiguous
    assert 0.0 <= ours <= k
