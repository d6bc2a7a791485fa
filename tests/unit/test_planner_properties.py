"""Property tests: every plan meets its constraints on random fleets; the exact optimum bounds them all."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MIB, small_catalog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rocoin.contracts.errors import InfeasiblePlanError
from rocoin.contracts.fleet import DeviceProfile, Fleet
from rocoin.contracts.latency import device_latency_s
from rocoin.planning import filter_graph, make_plan

device_strategy = st.tuples(
    st.floats(5e6, 40e6),  # FLOP/s
    st.floats(0.3, 8.0),  # MiB
    st.floats(50e3, 600e3),  # bit/s
    st.floats(0.0, 0.6),  # outage
)


@st.composite
def instances(draw, max_devices=14):
    rows = draw(st.lists(device_strategy, min_size=1, max_size=max_devices))
    fleet = Fleet(
        devices=[DeviceProfile(id=f"d{i}", flops=f, memory_bytes=int(m * MIB), rate_bps=r, outage=p) for i, (f, m, r, p) in enumerate(rows)]
    )
    num_filters = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**16))
    act = np.random.default_rng(seed).gamma(1.0, 1.0, size=(12, num_filters))
    epsilon = draw(st.sampled_from([0.3, 0.1, 0.05, 0.01]))
    return fleet, filter_graph(act), epsilon, seed


def check_plan(plan, fleet, catalog, epsilon, *, replicated: bool) -> None:
    arrays = fleet.arrays()
    index = {d: i for i, d in enumerate(arrays.ids)}
    planned = plan.device_ids + [u.id for u in plan.unassigned]
    assert sorted(planned) == sorted(fleet.ids)  # every device once: in a group or listed
    assert sorted(f for g in plan.groups for f in g.filters) == list(range(plan.num_filters))
    assert plan.num_groups <= plan.num_filters
    for group in plan.groups:
        members = np.array([index[d] for d in group.devices])
        spec = catalog[group.student]
        assert (arrays.memory_bytes[members] >= spec.memory_bytes).all()  # (1g)
        assert group.failure_prob == pytest.approx(np.prod(arrays.outage[members]), rel=1e-9, abs=1e-15)
        if replicated:
            assert group.failure_prob <= epsilon * (1 + 1e-9)  # (1f)
        t = device_latency_s(arrays.flops[members], arrays.rate_bps[members], 0.0, spec.flops, len(group.filters))
        assert group.latency_s == pytest.approx(t.max())
    assert plan.latency_s == pytest.approx(max(g.latency_s for g in plan.groups))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    instances(),
    st.sampled_from(["rocoin", "rocoin-g", "nonn", "hetnonn"]),
    st.sampled_from(["paper", "minmax"]),
    st.sampled_from([None, 0.0, 0.3, 2.0]),
    st.booleans(),
)
def test_every_plan_meets_its_constraints(instance, scheme, objective, theta, include_rate):
    fleet, weights, epsilon, seed = instance
    catalog = small_catalog()
    usable = [d for d in fleet.devices if d.memory_bytes >= min(s.memory_bytes for _, s in catalog.items())]
    try:
        plan = make_plan(
            fleet, weights, catalog, scheme=scheme, epsilon=epsilon, objective=objective, theta=theta, include_rate=include_rate, seed=seed
        )
    except InfeasiblePlanError as exc:
        if not usable:
            assert "no device has memory" in str(exc)
            return
        assert scheme in ("rocoin", "rocoin-g")
        assert np.prod([d.outage for d in usable]) > epsilon  # only an unreachable ε may fail
        assert "the best achievable" in str(exc)
        return
    check_plan(plan, fleet, catalog, epsilon, replicated=scheme in ("rocoin", "rocoin-g"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_devices=8))
def test_the_exact_optimum_bounds_every_heuristic(instance):
    fleet, weights, epsilon, seed = instance
    catalog = small_catalog()
    try:
        optimal = make_plan(fleet, weights, catalog, scheme="optimal", epsilon=epsilon, seed=seed)
    except InfeasiblePlanError:
        return
    check_plan(optimal, fleet, catalog, epsilon, replicated=True)
    for objective in ("paper", "minmax"):
        heuristic = make_plan(fleet, weights, catalog, scheme="rocoin", epsilon=epsilon, objective=objective, seed=seed)
        assert heuristic.latency_s >= optimal.latency_s * (1 - 1e-9)
