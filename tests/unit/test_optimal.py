"""The exact solver of the knowledge-assignment problem against a brute force and known answers."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rocoin.contracts.catalog import CatalogArrays
from rocoin.contracts.errors import InfeasiblePlanError, RocoinError
from rocoin.contracts.fleet import FleetArrays
from rocoin.contracts.latency import device_latency_s
from rocoin.planning.optimal import MAX_DEVICES, OptimalSolution, solve_optimal


def make_fleet(flops, rate_bps, outage, memory_bytes=None, input_s=None) -> FleetArrays:
    n = len(flops)
    return FleetArrays(
        ids=tuple(f"dev-{i}" for i in range(n)),
        flops=np.asarray(flops, dtype=float),
        memory_bytes=np.asarray(memory_bytes if memory_bytes is not None else [1e9] * n, dtype=float),
        rate_bps=np.asarray(rate_bps, dtype=float),
        outage=np.asarray(outage, dtype=float),
        input_s=np.asarray(input_s if input_s is not None else [0.0] * n, dtype=float),
    )


def make_catalog(flops, params, memory_bytes=None) -> CatalogArrays:
    s = len(flops)
    return CatalogArrays(
        names=tuple(f"student-{j}" for j in range(s)),
        flops=np.asarray(flops, dtype=float),
        memory_bytes=np.asarray(memory_bytes if memory_bytes is not None else [1.0] * s, dtype=float),
        params=np.asarray(params, dtype=float),
        out_dim=np.full(s, 8, dtype=int),
    )


# ----------------------------------------------------------------------------- brute force


def set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first], *partition]
        for i in range(len(partition)):
            yield [*partition[:i], [first, *partition[i]], *partition[i + 1 :]]


def compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def group_latency(fleet, catalog, group, student, size, epsilon, rho_min) -> float:
    """``T_k`` of one group, or ``inf`` when the configuration breaks a constraint."""
    members = np.array(group)
    if np.prod(fleet.outage[members]) > epsilon:
        return math.inf
    if np.any(catalog.memory_bytes[student] > fleet.memory_bytes[members]):
        return math.inf
    if rho_min is not None and catalog.params[student] / size < rho_min:
        return math.inf
    return float(
        device_latency_s(fleet.flops[members], fleet.rate_bps[members], fleet.input_s[members], catalog.flops[student], size).max()
    )


def brute_force(fleet, catalog, num_filters, epsilon, rho_min=None) -> float:
    """Every set partition x every composition of F x every student per group."""
    cache: dict = {}
    best = math.inf
    for partition in set_partitions(list(range(len(fleet)))):
        for sizes in compositions(num_filters, len(partition)):
            options = []
            for group, size in zip(partition, sizes):
                options.append(
                    [
                        cache.setdefault(
                            (tuple(group), s, size),
                            group_latency(fleet, catalog, group, s, size, epsilon, rho_min),
                        )
                        for s in range(len(catalog))
                    ]
                )
            for latencies in itertools.product(*options):
                best = min(best, max(latencies))
    return best


# ----------------------------------------------------------------------------- helpers


def check_solution(sol: OptimalSolution, fleet, catalog, num_filters, epsilon, rho_min=None) -> None:
    """Every constraint of SPEC.md §3 holds and ``latency_s`` is the configuration's own ``T``."""
    members = np.concatenate(sol.groups)
    assert sorted(members.tolist()) == list(range(len(fleet)))
    assert len(sol.groups) == len(sol.sizes) == len(sol.students) <= num_filters
    assert sum(sol.sizes) == num_filters and min(sol.sizes) >= 1
    latencies = []
    for group, size, student in zip(sol.groups, sol.sizes, sol.students):
        assert np.all(np.diff(group) > 0)
        assert np.prod(fleet.outage[group]) <= epsilon * (1 + 1e-12)
        assert np.all(catalog.memory_bytes[student] <= fleet.memory_bytes[group])
        if rho_min is not None:
            assert catalog.params[student] / size >= rho_min * (1 - 1e-12)
        latencies.append(
            device_latency_s(fleet.flops[group], fleet.rate_bps[group], fleet.input_s[group], catalog.flops[student], size).max()
        )
    assert sol.latency_s == pytest.approx(max(latencies), rel=1e-12)


def random_instance(rng: np.random.Generator, *, integral: bool):
    n = int(rng.integers(1, 6))
    s = int(rng.integers(2, 4))
    num_filters = int(rng.integers(1, 8))
    if integral:  # exact breakpoints and ties: integer compute times, rates that divide 32
        flops = rng.choice([1.0, 2.0, 4.0], n)
        rate = rng.choice([8.0, 16.0, 32.0, 64.0], n)
        student_flops = rng.choice([1.0, 2.0, 4.0, 8.0], s)
        input_s = rng.choice([0.0, 0.5, 1.0], n)
        outage = rng.choice([0.5, 0.25, 0.125, 0.75], n)
    else:
        flops = rng.uniform(1.0, 4.0, n)
        rate = rng.uniform(8.0, 64.0, n)
        student_flops = rng.uniform(0.5, 8.0, s)
        input_s = rng.uniform(0.0, 1.0, n) * (rng.random() < 0.7)
        outage = rng.uniform(0.05, 0.8, n)
    device_memory = rng.integers(1, 4, n).astype(float)
    student_memory = rng.integers(1, 4, s).astype(float)
    student_memory[rng.integers(s)] = device_memory.min()  # every device fits some student
    params = rng.integers(1, 12, s).astype(float)
    epsilon = float(rng.choice([0.05, 0.1, 0.25, 0.3, 0.5, 0.8, 0.99]))
    rho_min = float(rng.choice([0.5, 1.0, 1.5, 2.0, 3.0])) if rng.random() < 0.4 else None
    fleet = make_fleet(flops, rate, outage, device_memory, input_s)
    catalog = make_catalog(student_flops, params, student_memory)
    return fleet, catalog, num_filters, epsilon, rho_min


def assert_matches_brute_force(fleet, catalog, num_filters, epsilon, rho_min) -> None:
    expected = brute_force(fleet, catalog, num_filters, epsilon, rho_min)
    if math.isinf(expected):
        with pytest.raises(InfeasiblePlanError):
            solve_optimal(fleet, catalog, num_filters, epsilon, rho_min)
        return
    sol = solve_optimal(fleet, catalog, num_filters, epsilon, rho_min)
    assert sol.latency_s == pytest.approx(expected, rel=1e-9)
    check_solution(sol, fleet, catalog, num_filters, epsilon, rho_min)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("integral", [False, True])
def test_matches_brute_force_on_random_small_instances(integral):
    rng = np.random.default_rng(20240617 + integral)
    feasible = 0
    for _ in range(150):
        instance = random_instance(rng, integral=integral)
        assert_matches_brute_force(*instance)
        feasible += not math.isinf(brute_force(*instance))
    assert feasible >= 50  # the loop exercises the solver, not only its error path


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), integral=st.booleans())
def test_matches_brute_force_hypothesis(seed, integral):
    assert_matches_brute_force(*random_instance(np.random.default_rng(seed), integral=integral))


def test_two_unreliable_devices_form_one_group():
    fleet = make_fleet([1.0, 1.0], [32.0, 32.0], [0.5, 0.5])
    catalog = make_catalog([1.0], [10.0])
    sol = solve_optimal(fleet, catalog, 5, epsilon=0.3)
    assert [g.tolist() for g in sol.groups] == [[0, 1]]
    assert sol.sizes == [5]
    assert sol.latency_s == pytest.approx(1.0 + 5.0)


def test_pairs_fast_with_fast_and_slow_with_slow():
    # every group needs two devices (0.5 * 0.5 = 0.25); t = c/f + n (32-bit values at 32 bit/s)
    # fast pair: 1 + n1, slow pair: 10 + n2 -> n2 = 1, n1 = 9, T = 11; mixed pairs give >= 15
    fleet = make_fleet([10.0, 1.0, 10.0, 1.0], [32.0] * 4, [0.5] * 4)
    catalog = make_catalog([10.0], [100.0])
    sol = solve_optimal(fleet, catalog, 10, epsilon=0.25)
    assert [g.tolist() for g in sol.groups] == [[0, 2], [1, 3]]
    assert sol.sizes == [9, 1]
    assert sol.latency_s == pytest.approx(11.0)


def test_memory_and_rho_min_shape_the_groups():
    # device 0 fits only student 0 (2 params -> at most 2 filters at rho_min = 1); together the
    # devices could only run student 0, which cannot take all 4 filters, so they split 2 + 2
    fleet = make_fleet([1.0, 1.0], [32.0, 32.0], [0.1, 0.1], memory_bytes=[1.0, 2.0])
    catalog = make_catalog([1.0, 1.0], [2.0, 10.0], memory_bytes=[1.0, 2.0])
    sol = solve_optimal(fleet, catalog, 4, epsilon=0.2, rho_min=1.0)
    assert [g.tolist() for g in sol.groups] == [[0], [1]]
    assert sol.sizes == [2, 2]
    assert sol.students == [0, 1]
    assert sol.latency_s == pytest.approx(3.0)


def test_slack_buys_the_student_with_more_parameters():
    # the slow device sets T* = 1 + 1 = 2; the fast one can afford the 5-FLOP student (0.5 + 1)
    fleet = make_fleet([10.0, 1.0], [32.0, 32.0], [0.1, 0.1])
    catalog = make_catalog([1.0, 5.0], [1.0, 100.0])
    sol = solve_optimal(fleet, catalog, 2, epsilon=0.5)
    assert [g.tolist() for g in sol.groups] == [[0], [1]]
    assert sol.sizes == [1, 1]
    assert sol.students == [1, 0]
    assert sol.latency_s == pytest.approx(2.0)


def test_fewer_filters_than_devices_limits_the_groups():
    # one filter: one partition, so every device joins the one group
    fleet = make_fleet([1.0, 2.0, 4.0], [32.0] * 3, [0.1, 0.2, 0.3])
    catalog = make_catalog([1.0, 2.0], [5.0, 9.0])
    sol = solve_optimal(fleet, catalog, 1, epsilon=0.5)
    assert [g.tolist() for g in sol.groups] == [[0, 1, 2]]
    assert sol.sizes == [1]
    assert sol.latency_s == pytest.approx(2.0)  # the slowest member with the 1-FLOP student, + 1


def test_infeasible_epsilon_names_the_best_achievable_value():
    fleet = make_fleet([1.0] * 3, [32.0] * 3, [0.5] * 3)
    catalog = make_catalog([1.0], [1.0])
    with pytest.raises(InfeasiblePlanError, match=r"epsilon = 0\.1 .*0\.125"):
        solve_optimal(fleet, catalog, 4, epsilon=0.1)


def test_unreachable_rho_min_names_the_best_achievable_ratio():
    fleet = make_fleet([1.0, 1.0], [32.0, 32.0], [0.1, 0.1], memory_bytes=[1.0, 2.0])
    catalog = make_catalog([1.0, 1.0], [2.0, 10.0], memory_bytes=[1.0, 2.0])
    # best: device 0 alone with 1 filter (2 / 1), device 1 with 3 (10 / 3) -> ratio 2
    with pytest.raises(InfeasiblePlanError, match=r"rho_min = 3 .*best achievable capacity ratio is 2\b"):
        solve_optimal(fleet, catalog, 4, epsilon=0.2, rho_min=3.0)


def test_memory_limits_the_shared_student():
    # device 1 has room only for the cheap 1-parameter student; ε forces one group, so the fast
    # 4-FLOP student (device 0 alone could run it) is out: T = 8/1 + 1 on the slow member
    fleet = make_fleet([8.0, 1.0], [32.0, 32.0], [0.5, 0.5], memory_bytes=[4.0, 1.0])
    catalog = make_catalog([8.0, 4.0], [1.0, 50.0], memory_bytes=[1.0, 4.0])
    sol = solve_optimal(fleet, catalog, 1, epsilon=0.25)
    assert [g.tolist() for g in sol.groups] == [[0, 1]]
    assert sol.students == [0]
    assert sol.latency_s == pytest.approx(9.0)


def test_too_many_devices_is_refused():
    n = MAX_DEVICES + 1
    fleet = make_fleet([1.0] * n, [32.0] * n, [0.1] * n)
    with pytest.raises(RocoinError, match=f"at most {MAX_DEVICES} devices; got {n}"):
        solve_optimal(fleet, make_catalog([1.0], [1.0]), 64, epsilon=0.5)


def test_device_that_fits_no_student_is_named():
    fleet = make_fleet([1.0, 1.0], [32.0, 32.0], [0.1, 0.1], memory_bytes=[5.0, 0.5])
    catalog = make_catalog([1.0, 2.0], [1.0, 2.0], memory_bytes=[1.0, 2.0])
    with pytest.raises(RocoinError, match="'dev-1'.*fits no student") as info:
        solve_optimal(fleet, catalog, 4, epsilon=0.5)
    assert not isinstance(info.value, InfeasiblePlanError)


def test_ten_devices_and_256_filters_solve_quickly():
    rng = np.random.default_rng(7)
    n = MAX_DEVICES
    catalog = make_catalog(
        flops=[19e6, 53e6, 56e6, 82e6, 176e6, 202e6, 446e6],
        params=[250e3, 175e3, 700e3, 272e3, 2.2e6, 690e3, 1.5e6],
        memory_bytes=[1.4e6, 0.8e6, 3.6e6, 1.2e6, 10e6, 3e6, 6.6e6],
    )
    for epsilon in (0.99, 0.05):  # singletons allowed (deepest DP) / groups of two or more
        fleet = make_fleet(
            rng.uniform(10e6, 30e6, n),
            rng.uniform(1e3, 5e3, n),
            rng.uniform(0.1, 0.3, n),
            memory_bytes=rng.uniform(2e6, 12e6, n),
            input_s=rng.uniform(0.0, 0.05, n),
        )
        start = time.perf_counter()
        sol = solve_optimal(fleet, catalog, 256, epsilon, rho_min=500.0)
        elapsed = time.perf_counter() - start
        check_solution(sol, fleet, catalog, 256, epsilon, rho_min=500.0)
        assert elapsed < 5.0
