"""The paper's qualitative claims, asserted on generated fleets (SPEC.md §7)."""

from __future__ import annotations

import numpy as np
import pytest

from rocoin.planning import filter_graph, make_plan, synthetic_activations
from rocoin.profiles.generate import default_catalog, generate_fleet
from rocoin.simulation import simulate

SEEDS = range(5)
CATALOG = default_catalog((1, 28, 28))
WEIGHTS = filter_graph(synthetic_activations(120, 64, random_state=0))


def test_smaller_epsilon_means_more_replicas_and_fewer_failures():
    ladder = [0.2, 0.05, 0.01, 0.001]
    replicas, worst_q, p_complete = [], [], []
    for epsilon in ladder:
        plans = [make_plan(generate_fleet(20, 3, 0.8, random_state=s), WEIGHTS, CATALOG, epsilon=epsilon, seed=s) for s in SEEDS]
        replicas.append(np.mean([20 / p.num_groups for p in plans]))
        worst_q.append(max(max(g.failure_prob for g in p.groups) for p in plans))
        p_complete.append(np.mean([p.p_complete for p in plans]))
    assert all(a < b for a, b in zip(replicas, replicas[1:])), replicas
    assert all(q <= eps for q, eps in zip(worst_q, ladder))
    assert all(a > b for a, b in zip(worst_q, worst_q[1:])), worst_q
    assert all(a < b for a, b in zip(p_complete, p_complete[1:])), p_complete


@pytest.mark.parametrize("success_prob", [0.9, 0.8, 0.7])
def test_rocoin_beats_the_baselines_under_failures(success_prob):
    """Outage ≥ 0.1, heterogeneity 4: RoCoIn's simulated mean latency is lower than NoNN's and HetNoNN's."""
    for seed in SEEDS:
        fleet = generate_fleet(10, 4, success_prob, success_spread=0.05, random_state=seed)
        assert min(d.outage for d in fleet.devices) >= 0.05
        plans = {s: make_plan(fleet, WEIGHTS, CATALOG, scheme=s, epsilon=0.05, seed=seed) for s in ("rocoin", "nonn", "hetnonn")}
        deadline = 1.5 * max(p.latency_s for p in plans.values())
        mean = {s: simulate(p, fleet, trials=4000, timeout_s=deadline, random_state=seed).latency_mean_s for s, p in plans.items()}
        assert mean["rocoin"] < mean["nonn"] and mean["rocoin"] < mean["hetnonn"], (seed, mean)
