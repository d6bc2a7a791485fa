"""The planner on hand-made fleets: exact groups, partitions and students."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from conftest import block_graph, device, small_catalog

from rocoin.contracts.catalog import Catalog, StudentSpec
from rocoin.contracts.errors import InfeasiblePlanError, RocoinError
from rocoin.contracts.fleet import Fleet
from rocoin.contracts.latency import device_latency_s
from rocoin.planning import filter_graph, make_plan, planner, synthetic_activations
from rocoin.planning.assignment import GroupCosts, match_minmax, match_paper
from rocoin.planning.grouping import capacity_features, follow_the_leader, group_devices
from rocoin.planning.partition import SpectralPartitioner, check_activations, equal_sizes, proportional_sizes
from rocoin.planning.planner import latency_floor
from rocoin.profiles.generate import default_catalog, generate_fleet


def test_two_tiers_become_two_replica_pairs(two_tier_fleet):
    groups = group_devices(two_tier_fleet.arrays(), epsilon=0.05, theta=0.5, max_groups=16)
    assert [[two_tier_fleet.ids[i] for i in g] for g in groups] == [["strong-a", "strong-b"], ["weak-a", "weak-b"]]


def test_reliable_devices_stay_alone():
    fleet = Fleet(devices=[device(f"d{i}", 10 + i, 4, 300, 0.01) for i in range(4)])
    groups = group_devices(fleet.arrays(), epsilon=0.05, theta=10.0, max_groups=16)
    assert sorted(len(g) for g in groups) == [1, 1, 1, 1]


def test_follow_the_leader_respects_theta_then_merges_for_reliability(two_tier_fleet):
    arrays = two_tier_fleet.arrays()
    features = capacity_features(arrays)
    labels = follow_the_leader(features, arrays.outage, 0.05, theta=0.1)
    assert len(set(labels[[0, 2]])) == 1 and len(set(labels[[1, 3]])) == 1  # only near twins join
    # θ = 0 still joins exact twins; a far device is merged in only because it is unreliable alone.
    fleet = Fleet(devices=[device("a", 30, 8, 400, 0.2), device("b", 30, 8, 400, 0.2), device("c", 10, 1, 200, 0.2)])
    groups = group_devices(fleet.arrays(), epsilon=0.05, theta=0.0, max_groups=16)
    assert len(groups) == 1 and len(groups[0]) == 3


def test_infeasible_epsilon_names_the_best_achievable_value(two_tier_fleet):
    with pytest.raises(InfeasiblePlanError, match=r"epsilon = 0.001 cannot be met.*0\.0016 \(the best achievable\)"):
        make_plan(two_tier_fleet, block_graph([4, 4]), small_catalog(), epsilon=0.001)


def test_too_many_groups_are_merged_down_to_the_filter_count():
    fleet = Fleet(devices=[device(f"d{i}", 10 + 2 * i, 1 + i, 300, 0.01) for i in range(12)])
    plan = make_plan(fleet, block_graph([2, 2, 2]), small_catalog(), epsilon=0.05)
    assert plan.num_groups == 6  # 12 reliable devices, but only 6 filters
    assert sorted(len(g.filters) for g in plan.groups) == [1] * 6


def test_normalized_cut_finds_the_blocks():
    weights = block_graph([5, 3, 4])
    parts = SpectralPartitioner(weights, random_state=0).normalized_cut(3)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11]]


def test_partition_into_exactly_k_parts_even_when_k_equals_f():
    weights = filter_graph(synthetic_activations(50, 16, random_state=0))
    partitioner = SpectralPartitioner(weights, random_state=0)
    for k in (1, 2, 5, 16):
        parts = partitioner.normalized_cut(k)
        assert len(parts) == k and min(len(p) for p in parts) >= 1
        assert sorted(np.concatenate(parts).tolist()) == list(range(16))
    with pytest.raises(RocoinError, match="partitions = 17"):
        partitioner.normalized_cut(17)


def test_partitions_with_prescribed_sizes_follow_the_blocks():
    parts = SpectralPartitioner(block_graph([6, 2]), random_state=0).with_sizes([2, 6])
    assert [p.tolist() for p in parts] == [[6, 7], [0, 1, 2, 3, 4, 5]]
    assert equal_sizes(10, 3) == [4, 3, 3]
    assert proportional_sizes(10, np.array([3.0, 1.0])) == [7, 3]
    assert proportional_sizes(4, np.array([100.0, 1.0, 1.0])) == [2, 1, 1]


def test_filter_graph_matches_the_nonn_rule():
    act = np.array([[1.0, 0.5, 0.0], [2.0, 2.0, 1.0]])
    # per-image normalisation by the largest activity: [1, .5, 0] and [1, 1, .5]
    w01 = 1 * 0.5 * 0.5 + 1 * 1 * 0
    w02 = 0 + 1 * 0.5 * 0.5
    w12 = 0 + 1 * 0.5 * 0.5
    expected = np.array([[0, w01, w02], [w01, 0, w12], [w02, w12, 0]])
    np.testing.assert_allclose(filter_graph(act), expected)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([[1.0, np.nan]]), r"\[0, 1\] = nan: expected finite"),
        (np.array([[1.0, -2.0]]), r"\[0, 1\] = -2: expected non-negative"),
        (np.ones(4), r"shape \(4,\): expected a 2-D array"),
    ],
)
def test_bad_activations_are_named(array, message):
    with pytest.raises(RocoinError, match=message):
        check_activations(array)


def test_kuhn_munkres_maximises_the_eq5_weights_and_minmax_the_latency(two_tier_fleet):
    arrays = two_tier_fleet.arrays()
    groups = [np.array([0, 2]), np.array([1, 3])]  # strong pair, weak pair
    sizes = np.array([2, 30])
    catalog = small_catalog()
    costs = GroupCosts.build(arrays, groups, sizes, catalog.arrays())
    weight, _ = costs.weights()
    paper = match_paper(costs)

    # eq. 5 by hand: w(g, k) = max_s (n_s / |P_k|) / T_g(s, k), the strong pair fits every student
    def w(mflops, kbps, fits, size):
        return max(catalog[s].params / size / device_latency_s(mflops * 1e6, kbps * 1e3, 0.0, catalog[s].flops, size) for s in fits)

    everything, small_only = catalog.names, ["small"]
    np.testing.assert_allclose(
        weight, [[w(30, 400, everything, 2), w(30, 400, everything, 30)], [w(10, 200, small_only, 2), w(10, 200, small_only, 30)]]
    )
    totals = {(0, 1): weight[0, 0] + weight[1, 1], (1, 0): weight[0, 1] + weight[1, 0]}
    assert tuple(paper.partition.tolist()) == max(totals, key=totals.get)
    assert catalog.names[paper.student[1]] == "small"  # the weak pair only fits the small student
    # Because ρ = n_s / |P_k|, eq. 5 favours whoever gets the small partition: here the strong pair
    # takes the 2 filters and the weak pair is left with 30. minmax pairs by latency instead.
    assert paper.partition.tolist() == [0, 1]
    minmax = match_minmax(costs)
    assert minmax.partition.tolist() == [1, 0]
    assert minmax.latency_s.max() < paper.latency_s.max()


def test_minmax_reaches_the_bottleneck_optimum_on_a_crossed_instance():
    # Two single-device groups, a fast and a slow one; the paper weights favour accuracy, minmax T.
    fleet = Fleet(devices=[device("fast", 40, 8, 1000, 0.01), device("slow", 10, 8, 1000, 0.01)])
    costs = GroupCosts.build(fleet.arrays(), [np.array([0]), np.array([1])], np.array([1, 200]), small_catalog().arrays())
    fastest, _ = costs.fastest()
    assignment = match_minmax(costs)
    brute = min(max(fastest[0, a], fastest[1, 1 - a]) for a in (0, 1))
    assert assignment.latency_s.max() == pytest.approx(brute)


def test_rho_min_forces_bigger_students_or_fails(two_tier_fleet):
    weights = block_graph([8, 8])
    plan = make_plan(two_tier_fleet, weights, small_catalog(), epsilon=0.05, rho_min=12_000)
    for group in plan.groups:
        assert small_catalog()[group.student].params / len(group.filters) >= 12_000
    with pytest.raises(InfeasiblePlanError, match="rho-min = 1e\\+06 cannot be met"):
        make_plan(two_tier_fleet, weights, small_catalog(), epsilon=0.05, rho_min=1e6)


def test_plan_contract_fields(two_tier_fleet):
    plan = make_plan(two_tier_fleet, block_graph([8, 8]), small_catalog(), epsilon=0.05, seed=3)
    assert plan.scheme == "rocoin" and plan.num_filters == 16 and plan.seed == 3
    arrays = two_tier_fleet.arrays()
    index = {d: i for i, d in enumerate(arrays.ids)}
    for group in plan.groups:
        members = [index[d] for d in group.devices]
        assert group.failure_prob == pytest.approx(np.prod(arrays.outage[members]))
        expected = device_latency_s(
            arrays.flops[members], arrays.rate_bps[members], 0.0, plan.catalog[group.student].flops, len(group.filters)
        ).max()
        assert group.latency_s == pytest.approx(expected)
    assert plan.latency_s == max(g.latency_s for g in plan.groups)
    assert plan.p_complete == pytest.approx(np.prod([1 - g.failure_prob for g in plan.groups]))
    assert set(plan.catalog) == {g.student for g in plan.groups}


def test_devices_without_memory_are_listed_not_dropped():
    fleet = Fleet(devices=[device("big", 20, 8, 300, 0.1), device("big2", 20, 8, 300, 0.1), device("tiny", 20, 0.1, 300, 0.1)])
    for scheme in ("rocoin", "nonn", "hetnonn", "rocoin-g"):
        plan = make_plan(fleet, block_graph([4, 4]), small_catalog(), scheme=scheme, epsilon=0.05 if scheme != "rocoin" else 0.02)
        assert [u.id for u in plan.unassigned] == ["tiny"]
        assert "smallest student" in plan.unassigned[0].reason
        assert "tiny" not in plan.device_ids


def test_baselines_follow_spec_section_5(two_tier_fleet):
    weights = block_graph([6, 6, 6, 6])
    catalog = small_catalog()
    nonn = make_plan(two_tier_fleet, weights, catalog, scheme="nonn")
    assert nonn.num_groups == 4 and all(len(g.devices) == 1 for g in nonn.groups)
    assert sorted(len(g.filters) for g in nonn.groups) == [6, 6, 6, 6]
    assert {g.student for g in nonn.groups} == {"small"}  # the largest fitting the 1 MiB devices
    het = make_plan(two_tier_fleet, weights, catalog, scheme="hetnonn")
    by_device = {g.devices[0]: g for g in het.groups}
    assert by_device["strong-a"].student == "large" and by_device["weak-a"].student == "small"
    assert len(by_device["strong-a"].filters) > len(by_device["weak-a"].filters)
    greedy = make_plan(two_tier_fleet, weights, catalog, scheme="rocoin-g", epsilon=0.05)
    rocoin = make_plan(two_tier_fleet, weights, catalog, scheme="rocoin", epsilon=0.05)
    # RoCoIn-G is RoCoIn's grouping, partition and student family with a greedy matching (Tables II/III).
    assert sorted(map(sorted, (g.devices for g in greedy.groups))) == sorted(map(sorted, (g.devices for g in rocoin.groups)))
    assert sorted(map(sorted, (g.filters for g in greedy.groups))) == sorted(map(sorted, (g.filters for g in rocoin.groups)))


def test_more_devices_than_filters_leaves_baseline_devices_idle_with_a_reason():
    fleet = Fleet(devices=[device(f"d{i}", 10 + i, 4, 300, 0.1) for i in range(6)])
    plan = make_plan(fleet, block_graph([2, 2]), small_catalog(), scheme="nonn")
    assert plan.num_groups == 4 and len(plan.unassigned) == 2
    assert {u.id for u in plan.unassigned} == {"d0", "d1"}  # the slowest stay idle
    assert "only 4 filters" in plan.unassigned[0].reason


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epsilon": 0.0}, "epsilon = 0.0"),
        ({"epsilon": 1.0}, "epsilon = 1.0"),
        ({"scheme": "magic"}, "scheme = 'magic'"),
        ({"objective": "fastest"}, "objective = 'fastest'"),
        ({"theta": -1.0}, "theta = -1.0"),
        ({"rho_min": 0.0}, "rho-min = 0.0"),
    ],
)
def test_bad_planner_arguments(two_tier_fleet, kwargs, message):
    with pytest.raises(RocoinError, match=message):
        make_plan(two_tier_fleet, block_graph([4, 4]), small_catalog(), **kwargs)


def test_same_seed_same_plan():
    from rocoin.profiles.generate import generate_fleet

    fleet = generate_fleet(30, 4, 0.8, random_state=5)
    weights = filter_graph(synthetic_activations(100, 64, random_state=5))
    catalog = small_catalog()
    assert make_plan(fleet, weights, catalog, seed=1) == make_plan(fleet, weights, catalog, seed=1)


def test_plan_and_fleet_must_agree(two_tier_fleet, caplog):
    from rocoin.contracts.plan import Plan, plan_members

    plan = make_plan(two_tier_fleet, block_graph([4, 4]), small_catalog(), epsilon=0.05)
    members = plan_members(plan, two_tier_fleet)
    assert len(members.latency_s) == 4 and members.starts.tolist() == [0, 2]
    with pytest.raises(RocoinError, match="input_bits = None but the fleet has input_bits = 6272"):
        plan_members(plan, two_tier_fleet.model_copy(update={"input_bits": 6272}))
    # Profiles measured after planning (e.g. true outage instead of the assumed one): used, and logged.
    changed = Fleet(devices=[d.model_copy(update={"outage": 0.3}) for d in two_tier_fleet.devices])
    with caplog.at_level("WARNING"):
        assert (plan_members(plan, changed).outage == 0.3).all()
    assert "failure probabilities differ" in caplog.text
    data = plan.model_dump()
    data["unassigned"] = [{"id": "x", "reason": "r"}, {"id": "x", "reason": "r"}]
    with pytest.raises(ValueError, match="listed twice"):
        Plan.model_validate(data)


def map_catalog(values_per_filter: int, bits: int) -> Catalog:
    """``small_catalog``'s students sending an h×w map per filter (detection's split point)."""
    return Catalog(
        {
            name: StudentSpec(**spec.model_dump(), output_values_per_filter=values_per_filter, output_bits_per_value=bits)
            for name, spec in small_catalog().items()
        }
    )


@pytest.mark.parametrize("scheme", ["rocoin", "rocoin-g", "nonn", "hetnonn"])
def test_students_that_send_feature_maps_pay_for_every_value_on_the_wire(two_tier_fleet, scheme):
    """A partition of an 8×8 map costs 64 values per filter: 32·64·|P_k| bits in float32, half in
    float16; every plan's latency and the simulator's follow from that."""
    from rocoin.simulation import simulate

    weights = block_graph([8, 8])
    arrays = two_tier_fleet.arrays()
    index = {d: i for i, d in enumerate(arrays.ids)}
    latencies = {}
    for bits in (32, 16):
        catalog = map_catalog(64, bits)
        assert catalog.bits_per_filter == 64 * bits
        plan = make_plan(two_tier_fleet, weights, catalog, scheme=scheme, epsilon=0.05)
        for group in plan.groups:
            members = [index[d] for d in group.devices]
            spec = plan.catalog[group.student]
            expected = (spec.flops / arrays.flops[members] + 64 * bits * len(group.filters) / arrays.rate_bps[members]).max()
            assert group.latency_s == pytest.approx(expected)
        assert (
            simulate(plan, two_tier_fleet, trials=200, timeout_s=10 * plan.latency_s, random_state=0).latency_mean_s <= 10 * plan.latency_s
        )
        latencies[bits] = plan.latency_s
    pooled = make_plan(two_tier_fleet, weights, small_catalog(), scheme=scheme, epsilon=0.05).latency_s
    assert pooled < latencies[16] < latencies[32]  # the wire costs more than one pooled value per filter


def test_a_catalog_sends_one_kind_of_output_and_a_classifiers_files_do_not_change():
    mixed = {**small_catalog().root, "map": map_catalog(64, 32)["small"]}
    with pytest.raises(ValueError, match="output_values_per_filter / output_bits_per_value differ between students"):
        Catalog(mixed)
    assert "output" not in small_catalog().to_json()  # the defaults are not written: hashes of old plans hold
    assert '"output_values_per_filter": 64' in map_catalog(64, 16).to_json().replace(" ", "").replace(":", ": ")
    with pytest.raises(ValueError, match="output_bits_per_value"):
        StudentSpec(flops=1e6, memory_bytes=1, params=1, out_dim=1, output_bits_per_value=8)


def test_the_theta_search_stops_early_only_when_no_later_theta_can_win(caplog, monkeypatch):
    fleet = generate_fleet(1000, 3, 0.8, random_state=5)  # 16 groups of 39+ devices: P(all groups) = 1.0
    weights = filter_graph(synthetic_activations(60, 16, random_state=0))
    catalog = default_catalog()
    with caplog.at_level(logging.DEBUG, logger="rocoin.planning.planner"):
        plan = make_plan(fleet, weights, catalog)
    assert "and above skipped" in caplog.text  # the search did stop early
    monkeypatch.setattr(planner, "latency_floor", lambda *args: -math.inf)  # never stops early
    assert make_plan(fleet, weights, catalog) == plan


@pytest.mark.parametrize("seed", range(4))
def test_no_plan_beats_the_latency_floor(seed):
    fleet = generate_fleet(8, 4, 0.8, random_state=seed)
    weights = filter_graph(synthetic_activations(40, 8, random_state=seed))
    catalog = default_catalog()
    floor = latency_floor(fleet.arrays(), catalog.arrays(), None)
    plans = [make_plan(fleet, weights, catalog, scheme=s) for s in ("rocoin", "rocoin-g", "nonn", "hetnonn", "optimal")]
    assert floor > 0 and min(p.latency_s for p in plans) >= floor
