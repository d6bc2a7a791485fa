"""The failure simulator: Monte-Carlo (`simulate`) and exact (`analytic`) statistics of a plan."""

from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest

from rocoin.contracts.catalog import StudentSpec
from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fleet import DeviceProfile, Fleet
from rocoin.contracts.plan import GroupPlan, Plan
from rocoin.profiles.generate import generate_fleet
from rocoin.simulation import AnalyticResult, SimulationResult, analytic, simulate

CATALOG = {
    "small": StudentSpec(flops=1e6, memory_bytes=1000, params=500, out_dim=8),
    "big": StudentSpec(flops=4e6, memory_bytes=2000, params=2000, out_dim=16),
}


def device(name: str, flops: float, rate_bps: float, outage: float = 0.0) -> DeviceProfile:
    return DeviceProfile(id=name, flops=flops, memory_bytes=10_000, rate_bps=rate_bps, outage=outage)


def make_plan(groups: list[tuple[list[str], int, str]]) -> Plan:
    """Groups given as (device ids, number of filters, student); filters are numbered in order."""
    out, nxt = [], 0
    for ids, nf, student in groups:
        out.append(GroupPlan(devices=ids, filters=list(range(nxt, nxt + nf)), student=student, failure_prob=0.5, latency_s=1.0))
        nxt += nf
    return Plan(scheme="rocoin", epsilon=0.5, num_filters=nxt, groups=out, latency_s=1.0, p_complete=0.5, catalog=CATALOG)


def t(student: str, flops: float, rate_bps: float, nf: int) -> float:
    """t = c_s / f_d + 32·|P_k| / r_d, by hand."""
    return CATALOG[student].flops / flops + 32 * nf / rate_bps


# Two groups, all latencies chosen by hand:
#   g0 (2 filters, small): a = 1e6/1e6 + 64/1e3 = 1.064 s, b = 1e6/2e6 + 64/1e4 = 0.5064 s
#   g1 (1 filter, big):    c = 4e6/4e6 + 32/320 = 1.1 s,   d = 4e6/8e6 + 32/32 = 1.5 s
T_A, T_B, T_C, T_D = 1.064, 0.5064, 1.1, 1.5


def two_groups(outage: dict[str, float] | None = None) -> tuple[Plan, Fleet]:
    outage = outage or {}
    fleet = Fleet(
        devices=[
            device("a", 1e6, 1e3, outage.get("a", 0.0)),
            device("b", 2e6, 1e4, outage.get("b", 0.0)),
            device("c", 4e6, 320, outage.get("c", 0.0)),
            device("d", 8e6, 32, outage.get("d", 0.0)),
        ]
    )
    plan = make_plan([(["a", "b"], 2, "small"), (["c", "d"], 1, "big")])
    return plan, fleet


def test_hand_latencies_match_the_model() -> None:
    assert t("small", 1e6, 1e3, 2) == pytest.approx(T_A)
    assert t("small", 2e6, 1e4, 2) == pytest.approx(T_B)
    assert t("big", 4e6, 320, 1) == pytest.approx(T_C)
    assert t("big", 8e6, 32, 1) == pytest.approx(T_D)


def test_no_outage_every_trial_is_max_of_group_minima() -> None:
    plan, fleet = two_groups()
    expected = max(min(T_A, T_B), min(T_C, T_D))  # = 1.1 s
    res = simulate(plan, fleet, trials=1000, timeout_s=10.0, random_state=0)
    assert res.latency_mean_s == pytest.approx(expected)
    assert res.latency_p50_s == pytest.approx(expected)
    assert res.latency_p99_s == pytest.approx(expected)
    assert res.latency_std_s == pytest.approx(0.0, abs=1e-12)
    assert res.p_complete == 1.0
    assert res.missing_groups_mean == 0.0
    assert list(res.missing_rate_per_group) == [0.0, 0.0]
    exact = analytic(plan, fleet, timeout_s=10.0)
    assert exact.latency_mean_s == pytest.approx(expected)
    assert exact.latency_p50_s == pytest.approx(expected)
    assert exact.latency_p99_s == pytest.approx(expected)
    assert exact.p_complete == 1.0
    assert exact.missing_groups_mean == 0.0


def test_fast_replica_failing_falls_back_to_the_next_member() -> None:
    # b (0.5064 s) always fails, so group 0 answers with a at 1.064 s; d always fails: c at 1.1 s.
    plan, fleet = two_groups({"b": 0.999999, "d": 0.999999})
    res = simulate(plan, fleet, trials=2000, timeout_s=10.0, random_state=1)
    assert res.latency_p50_s == pytest.approx(max(T_A, T_C))
    assert res.p_complete == 1.0


def test_single_member_group_with_outage_is_missing_at_its_rate() -> None:
    timeout = 5.0
    fleet = Fleet(devices=[device("a", 1e6, 1e3, 0.3), device("b", 2e6, 1e4, 0.0)])
    plan = make_plan([(["a"], 2, "small"), (["b"], 1, "small")])
    ta, tb = t("small", 1e6, 1e3, 2), t("small", 2e6, 1e4, 1)
    exact = analytic(plan, fleet, timeout_s=timeout)
    assert exact.p_complete == pytest.approx(0.7, abs=1e-15)
    assert exact.missing_groups_mean == pytest.approx(0.3, abs=1e-15)
    assert list(exact.missing_rate_per_group) == pytest.approx([0.3, 0.0])
    assert exact.latency_mean_s == pytest.approx(0.7 * max(ta, tb) + 0.3 * timeout)
    assert exact.latency_p50_s == pytest.approx(max(ta, tb))
    assert exact.latency_p99_s == timeout

    n = 100_000
    res = simulate(plan, fleet, trials=n, timeout_s=timeout, random_state=2)
    se = math.sqrt(0.3 * 0.7 / n)
    assert abs(res.missing_rate_per_group[0] - 0.3) < 5 * se
    assert res.missing_rate_per_group[1] == 0.0
    assert abs(res.p_complete - 0.7) < 5 * se
    # latency takes two values only: max(ta, tb) when a answers, the timeout when it is missing
    assert res.latency_p50_s == pytest.approx(max(ta, tb))
    assert res.latency_p99_s == timeout
    assert res.latency_mean_s == pytest.approx(max(ta, tb) + res.missing_groups_mean * (timeout - max(ta, tb)))


def test_member_slower_than_timeout_never_counts() -> None:
    # group 0: fast member f (t = 0.564 s, outage 0.5) and slow member s (t = 3 s, never fails)
    fleet = Fleet(devices=[device("f", 2e6, 1e3, 0.5), device("s", 1e6, 32.0, 0.0), device("x", 1e7, 1e6, 0.0)])
    plan = make_plan([(["f", "s"], 2, "small"), (["x"], 1, "small")])
    t_fast, t_slow = t("small", 2e6, 1e3, 2), t("small", 1e6, 32.0, 2)
    assert t_fast < 2.0 < t_slow

    res = simulate(plan, fleet, trials=50_000, timeout_s=2.0, random_state=3)
    exact = analytic(plan, fleet, timeout_s=2.0)
    assert exact.missing_rate_per_group[0] == 0.5
    assert exact.latency_mean_s == pytest.approx(0.5 * t_fast + 0.5 * 2.0)
    assert abs(res.missing_rate_per_group[0] - 0.5) < 5 * math.sqrt(0.25 / 50_000)
    assert res.latency_p99_s == 2.0  # the source gives up at the timeout, it never waits 3 s

    # with a timeout above the slow member, the group is never missing
    res = simulate(plan, fleet, trials=50_000, timeout_s=4.0, random_state=3)
    assert res.p_complete == 1.0
    assert res.latency_p99_s == pytest.approx(t_slow)
    assert analytic(plan, fleet, timeout_s=4.0).latency_mean_s == pytest.approx(0.5 * t_fast + 0.5 * t_slow)


def test_member_exactly_at_timeout_answers_in_time() -> None:
    fleet = Fleet(devices=[device("a", 1e6, 3200.0, 0.0)])  # t = 1 + 32/3200 = 1.01 s
    plan = make_plan([(["a"], 1, "small")])
    ta = t("small", 1e6, 3200.0, 1)
    res = simulate(plan, fleet, trials=10, timeout_s=ta)
    assert res.p_complete == 1.0 and res.latency_mean_s == pytest.approx(ta)
    assert analytic(plan, fleet, timeout_s=ta).p_complete == 1.0


def test_every_member_slower_than_timeout_means_always_missing() -> None:
    plan, fleet = two_groups()
    res = simulate(plan, fleet, trials=100, timeout_s=0.1)
    assert res.p_complete == 0.0
    assert res.missing_groups_mean == 2.0
    assert res.latency_mean_s == pytest.approx(0.1)
    exact = analytic(plan, fleet, timeout_s=0.1)
    assert exact.p_complete == 0.0 and exact.missing_groups_mean == 2.0
    assert exact.latency_mean_s == pytest.approx(0.1) and exact.latency_p50_s == pytest.approx(0.1)


def _brute_force(plan: Plan, fleet: Fleet, timeout: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every failure pattern with its probability: (probability, latency, number of missing groups)."""
    profiles = {d.id: d for d in fleet.devices}
    members = [(k, d) for k, g in enumerate(plan.groups) for d in g.devices]
    lat = {d: t(g.student, profiles[d].flops, profiles[d].rate_bps, len(g.filters)) for g in plan.groups for d in g.devices}
    probs, lats, missing = [], [], []
    for pattern in itertools.product([False, True], repeat=len(members)):
        prob = 1.0
        group_time = [math.inf] * plan.num_groups
        for failed, (k, d) in zip(pattern, members):
            p = profiles[d].outage
            prob *= p if failed else 1 - p
            if not failed and lat[d] <= timeout:
                group_time[k] = min(group_time[k], lat[d])
        probs.append(prob)
        missing.append(sum(math.isinf(x) for x in group_time))
        lats.append(max(timeout if math.isinf(x) else x for x in group_time))
    return np.array(probs), np.array(lats), np.array(missing)


@pytest.mark.parametrize("timeout", [0.4, 0.9, 1.3, 3.0])
def test_analytic_is_exact_against_enumeration(timeout: float) -> None:
    rng = np.random.default_rng(7)
    ids = [f"d{i}" for i in range(7)]
    fleet = Fleet(
        devices=[device(i, float(rng.uniform(1e6, 4e6)), float(rng.uniform(100, 2000)), float(rng.uniform(0.05, 0.6))) for i in ids]
    )
    plan = make_plan([(ids[:3], 2, "small"), (ids[3:4], 1, "small"), (ids[4:], 3, "big")])
    probs, lats, missing = _brute_force(plan, fleet, timeout)
    exact = analytic(plan, fleet, timeout_s=timeout)
    assert exact.p_complete == pytest.approx(probs[missing == 0].sum(), abs=1e-12)
    assert exact.missing_groups_mean == pytest.approx((probs * missing).sum(), abs=1e-12)
    mean = (probs * lats).sum()
    assert exact.latency_mean_s == pytest.approx(mean, rel=1e-12)
    assert exact.latency_std_s == pytest.approx(math.sqrt((probs * (lats - mean) ** 2).sum()), rel=1e-9, abs=1e-12)
    order = np.argsort(lats, kind="stable")
    cdf = np.cumsum(probs[order])
    for q, got in ((0.5, exact.latency_p50_s), (0.99, exact.latency_p99_s), (0.25, exact.latency_quantile_s(0.25))):
        assert got == pytest.approx(lats[order][np.searchsorted(cdf, q - 1e-12)])


def test_monte_carlo_agrees_with_analytic_on_a_random_fleet() -> None:
    # 8 groups of 2-5 replicas whose latencies interleave in [1, 2] s, so the latency has many
    # possible values; the timeout (1.9 s) leaves some members too slow to count.
    rng = np.random.default_rng(21)
    sizes = [3, 4, 5, 3, 2, 4, 5, 3]
    ids = [f"d{i:02d}" for i in range(sum(sizes))]
    target = rng.uniform(1.0, 2.0, len(ids))
    fleet = Fleet(devices=[device(i, CATALOG["small"].flops / x, 1e9, float(rng.uniform(0.05, 0.35))) for i, x in zip(ids, target)])
    bounds = np.cumsum([0, *sizes])
    plan = make_plan([(ids[lo:hi], 1, "small") for lo, hi in zip(bounds[:-1], bounds[1:])])
    timeout = 1.9
    assert np.any(target > timeout)
    exact = analytic(plan, fleet, timeout_s=timeout)
    assert 0.5 < exact.p_complete < 0.95 and len(exact.cdf_x_s) > 8
    assert exact.latency_p50_s < timeout

    n = 200_000
    res = simulate(plan, fleet, trials=n, timeout_s=timeout, random_state=12)
    assert res.trials == n
    se_complete = math.sqrt(exact.p_complete * (1 - exact.p_complete) / n)
    assert abs(res.p_complete - exact.p_complete) < 5 * se_complete
    q = np.asarray(exact.missing_rate_per_group)
    assert abs(res.missing_groups_mean - exact.missing_groups_mean) < 5 * math.sqrt((q * (1 - q)).sum() / n)
    se_rate = np.sqrt(q * (1 - q) / n) + 1e-12
    assert np.all(np.abs(res.missing_rate_per_group - q) < 5 * se_rate)
    assert abs(res.latency_mean_s - exact.latency_mean_s) < 5 * exact.latency_std_s / math.sqrt(n)
    assert res.latency_std_s == pytest.approx(exact.latency_std_s, rel=0.02)
    # the latency is discrete, and 0.5 and 0.99 are far from its CDF's steps: the same values
    assert res.latency_p50_s == exact.latency_p50_s
    assert res.latency_p99_s == exact.latency_p99_s == timeout


def test_fail_all_devices_misses_every_group() -> None:
    plan, fleet = two_groups()
    res = simulate(plan, fleet, trials=500, timeout_s=3.0, fail_devices=4, random_state=0)
    assert res.p_complete == 0.0
    assert res.missing_groups_mean == 2.0
    assert list(res.missing_rate_per_group) == [1.0, 1.0]
    assert res.latency_mean_s == 3.0 and res.latency_p99_s == 3.0


def test_fail_one_device_with_replicas_always_completes() -> None:
    # outage is ignored in this mode: every device has a high one
    plan, fleet = two_groups({"a": 0.9, "b": 0.9, "c": 0.9, "d": 0.9})
    res = simulate(plan, fleet, trials=5000, timeout_s=3.0, fail_devices=1, random_state=0)
    assert res.p_complete == 1.0
    assert res.missing_groups_mean == 0.0
    # b fails in 1/4 of the trials (group 0 then answers at T_A < T_C: no effect), d in 1/4 (no
    # effect), c in 1/4 (group 1 answers at T_D): latency T_C or T_D, mean (3 T_C + T_D) / 4
    assert res.latency_p50_s == pytest.approx(T_C)
    assert res.latency_p99_s == pytest.approx(T_D)
    se = (T_D - T_C) * math.sqrt(0.25 * 0.75 / 5000)
    assert abs(res.latency_mean_s - (3 * T_C + T_D) / 4) < 5 * se
    res0 = simulate(plan, fleet, trials=100, timeout_s=3.0, fail_devices=0)
    assert res0.p_complete == 1.0 and res0.latency_mean_s == pytest.approx(max(T_B, T_C))


def test_fail_devices_fails_exactly_j_uniformly() -> None:
    # one device per group (no replication): exactly J groups are missing in every trial
    n_dev, j, trials = 12, 5, 40_000
    fleet = Fleet(devices=[device(f"d{i:02d}", 1e6 * (1 + i), 1e4, 0.5) for i in range(n_dev)])
    plan = make_plan([([f"d{i:02d}"], 1, "small") for i in range(n_dev)])
    res = simulate(plan, fleet, trials=trials, timeout_s=5.0, fail_devices=j, random_state=4)
    assert res.missing_groups_mean == j
    assert res.p_complete == 0.0
    se = math.sqrt((j / n_dev) * (1 - j / n_dev) / trials)
    assert np.all(np.abs(res.missing_rate_per_group - j / n_dev) < 5 * se)
    # j above half of the devices uses the complementary draw: still exactly j
    res = simulate(plan, fleet, trials=1000, timeout_s=5.0, fail_devices=n_dev - 1, random_state=4)
    assert res.missing_groups_mean == n_dev - 1


def test_same_seed_same_result_and_chunking_does_not_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = generate_fleet(20, random_state=1)
    plan = make_plan([(fleet.ids[i : i + 4], 2, "small") for i in range(0, 20, 4)])
    a = simulate(plan, fleet, trials=3000, timeout_s=0.3, random_state=42)
    b = simulate(plan, fleet, trials=3000, timeout_s=0.3, random_state=42)
    assert a == b and a.to_dict() == b.to_dict()
    c = simulate(plan, fleet, trials=3000, timeout_s=0.3, random_state=43)
    assert c.to_dict() != a.to_dict()
    assert simulate(plan, fleet, trials=3000, timeout_s=0.3, random_state=np.random.default_rng(42)) == a
    j1 = simulate(plan, fleet, trials=3000, timeout_s=0.3, fail_devices=7, random_state=5)
    # a chunk of 7 trials instead of thousands: the same draws, the same result
    import rocoin.simulation.montecarlo as mc

    monkeypatch.setattr(mc, "CHUNK_ENTRIES", 7 * 20)
    assert simulate(plan, fleet, trials=3000, timeout_s=0.3, random_state=42) == a
    assert simulate(plan, fleet, trials=3000, timeout_s=0.3, fail_devices=7, random_state=5) == j1


def test_progress_is_reported_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    import rocoin.simulation.montecarlo as mc

    monkeypatch.setattr(mc, "CHUNK_ENTRIES", 4 * 100)  # 100 trials per chunk for 4 devices
    plan, fleet = two_groups({"a": 0.2})
    calls: list[tuple[int, int]] = []
    simulate(plan, fleet, trials=350, timeout_s=3.0, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(100, 350), (200, 350), (300, 350), (350, 350)]


def test_to_dict_is_plain_json() -> None:
    plan, fleet = two_groups({"a": 0.2, "c": 0.4})
    res = simulate(plan, fleet, trials=100, timeout_s=3.0, random_state=0)
    d = res.to_dict()
    assert set(d) == {"trials", "latency_s", "p_complete", "missing_groups_mean", "missing_rate_per_group"}
    assert set(d["latency_s"]) == {"mean", "p50", "p99"}
    assert type(d["trials"]) is int and d["trials"] == 100
    assert all(type(v) is float for v in d["latency_s"].values())
    assert type(d["p_complete"]) is float and type(d["missing_groups_mean"]) is float
    assert all(type(v) is float for v in d["missing_rate_per_group"]) and len(d["missing_rate_per_group"]) == 2
    assert json.loads(json.dumps(d)) == d
    e = analytic(plan, fleet, timeout_s=3.0).to_dict()
    assert json.loads(json.dumps(e)) == e and set(e) == set(d) - {"trials"}
    assert isinstance(res, SimulationResult)
    with pytest.raises(ValueError):
        res.missing_rate_per_group[0] = 1.0  # read-only


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trials": 0}, "trials = 0: expected at least 1"),
        ({"trials": -5}, "trials = -5"),
        ({"trials": 2.5}, "trials = 2.5"),
        ({"trials": True}, "trials = True"),
        ({"timeout_s": 0.0}, "timeout_s = 0.0"),
        ({"timeout_s": -1}, "timeout_s = -1"),
        ({"timeout_s": float("inf")}, "timeout_s = inf"),
        ({"timeout_s": float("nan")}, "timeout_s = nan"),
        ({"timeout_s": "3"}, "timeout_s = '3'"),
        ({"fail_devices": -1}, "fail_devices = -1"),
        ({"fail_devices": 5}, "fail_devices = 5: expected at most 4"),
        ({"fail_devices": 1.0}, "fail_devices = 1.0"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    plan, fleet = two_groups()
    args = {"trials": 10, "timeout_s": 3.0, **kwargs}
    with pytest.raises(RocoinError, match=message.replace("(", r"\(").replace(".", r"\.")):
        simulate(plan, fleet, **args)
    if "timeout_s" in kwargs:
        with pytest.raises(RocoinError, match="timeout_s"):
            analytic(plan, fleet, timeout_s=kwargs["timeout_s"])


def test_plan_and_fleet_must_agree() -> None:
    plan, _ = two_groups()
    other = Fleet(devices=[device("a", 1e6, 1e3), device("b", 1e6, 1e3), device("c", 1e6, 1e3)])
    with pytest.raises(RocoinError, match="'d'"):
        simulate(plan, other, trials=10, timeout_s=1.0)
    with pytest.raises(RocoinError, match="'d'"):
        analytic(plan, other, timeout_s=1.0)


def test_analytic_quantile_argument() -> None:
    plan, fleet = two_groups({"b": 0.5})
    exact = analytic(plan, fleet, timeout_s=3.0)
    assert isinstance(exact, AnalyticResult)
    assert exact.latency_quantile_s(1.0) == pytest.approx(T_C)
    with pytest.raises(RocoinError, match="q = 0"):
        exact.latency_quantile_s(0)


def test_thousand_device_plan_100k_trials() -> None:
    fleet = generate_fleet(1000, heterogeneity=3, success_prob=0.7, random_state=5)
    plan = make_plan([(fleet.ids[i : i + 10], 1, "big" if i % 20 else "small") for i in range(0, 1000, 10)])
    start = time.perf_counter()
    res = simulate(plan, fleet, trials=100_000, timeout_s=0.5, random_state=6)
    elapsed = time.perf_counter() - start
    assert res.trials == 100_000 and len(res.missing_rate_per_group) == 100
    assert elapsed < 30.0
    exact = analytic(plan, fleet, timeout_s=0.5)
    assert abs(res.latency_mean_s - exact.latency_mean_s) < 5 * exact.latency_std_s / math.sqrt(100_000) + 1e-12
    assert abs(res.p_complete - exact.p_complete) < 5 * math.sqrt(exact.p_complete * (1 - exact.p_complete) / 1e5) + 1e-12
