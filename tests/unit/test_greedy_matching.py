"""RoCoIn-G's greedy matching against Kuhn–Munkres on the same eq. 5 weights (issue 13, item 3)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rocoin.contracts.errors import InfeasiblePlanError
from rocoin.planning.assignment import GroupCosts, match_greedy, match_paper, matching_weight


@st.composite
def group_costs(draw) -> GroupCosts:
    groups = draw(st.integers(1, 6))
    students = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    latency = rng.uniform(0.1, 5.0, size=(groups, groups, students))
    feasible = rng.random((groups, groups, students)) < draw(st.sampled_from([1.0, 0.8, 0.5]))
    rho = rng.uniform(1.0, 100.0, size=(groups, students))
    return GroupCosts(latency, feasible, rho)


@settings(max_examples=300, deadline=None)
@given(group_costs())
def test_greedy_never_weighs_more_than_kuhn_munkres_and_keeps_its_students(costs):
    try:
        greedy = match_greedy(costs)
    except InfeasiblePlanError:
        return  # greedy can dead-end where a perfect matching exists; then the scheme has no plan
    optimal = match_paper(costs)
    assert matching_weight(costs, greedy) <= matching_weight(costs, optimal) * (1 + 1e-12)
    assert sorted(greedy.partition.tolist()) == list(range(len(greedy.partition)))  # one-to-one
    weight, student = costs.weights()
    g = np.arange(len(greedy.partition))
    assert (greedy.student == student[g, greedy.partition]).all()  # the eq. 5 student of each pair, as RoCoIn


def test_greedy_takes_the_heaviest_pair_first_where_kuhn_munkres_does_not():
    # w = rho / T: group 0 weighs 10 on partition 0 and 9 on 1; group 1 weighs 9 on 0 and 1 on 1.
    rho = np.ones((2, 1))
    latency = 1.0 / np.array([[10.0, 9.0], [9.0, 1.0]])[:, :, None]
    costs = GroupCosts(latency, np.ones_like(latency, dtype=bool), rho)
    greedy, optimal = match_greedy(costs), match_paper(costs)
    assert greedy.partition.tolist() == [0, 1] and matching_weight(costs, greedy) == pytest.approx(11.0)
    assert optimal.partition.tolist() == [1, 0] and matching_weight(costs, optimal) == pytest.approx(18.0)
