"""The gather's rules, by hand and through a :class:`Source` over in-memory links (no sockets):
the first replica of a group wins, a slow group is zero-filled at the deadline, which failures mark
a device down (fair ones; never refusals) and how a down device comes back."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import rocoin.runtime.source.source as source_module  # noqa: E402
from rocoin.contracts.catalog import StudentSpec  # noqa: E402
from rocoin.contracts.fleet import DeviceProfile, Fleet  # noqa: E402
from rocoin.contracts.manifest import MANIFEST_NAME, GroupModel, Manifest, ModelFile, Normalization, TensorSpec, file_sha256  # noqa: E402
from rocoin.contracts.plan import GroupPlan, Plan  # noqa: E402
from rocoin.runtime.source.gather import (  # noqa: E402
    DEADLINE_EXCEEDED,
    FAILURES_TO_MARK_DOWN,
    INVALID_ARGUMENT,
    STATUS_NAMES,
    DeviceState,
    Query,
    code_name,
)
from rocoin.runtime.source.link import MemoryLink  # noqa: E402
from rocoin.runtime.source.messages import Answer, Request  # noqa: E402
from rocoin.runtime.source.source import Source  # noqa: E402

UNAVAILABLE = STATUS_NAMES.index("UNAVAILABLE")
#: Two groups: "a1" and "a2" replicate group 0 (filters 0 and 2), "b" alone is group 1 (filter 1).
GROUPS = [(["a1", "a2"], [0, 2]), (["b"], [1])]
INPUT_CHW = (1, 2, 2)
#: The head adds filters 0 and 2 into logit 0 and copies filter 1 into logit 1.
HEAD = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)
DEADLINE_S = 0.1


# --------------------------------------------------------------------------- the gather by hand


def query(num_groups: int = 2, *, fair: bool = True) -> tuple[Query, list[int]]:
    decided = []
    return Query("q#1", "q", 1, num_groups, 0.0, fair=fair, decided=lambda: decided.append(1)), decided


def features(value: float, width: int = 2) -> np.ndarray:
    return np.full((1, width), value, dtype=np.float32)


def test_the_first_answer_of_a_group_wins_and_later_replicas_are_ignored():
    q, decided = query()
    a1, a2, b = DeviceState("a1", "", 0), DeviceState("a2", "", 0), DeviceState("b", "", 1)
    for device in (a1, a2, b):
        device.sent(q)
    q.start_waiting()
    assert a2.take(Answer("q#1", features(2.0)), 2).filled
    assert not a1.take(Answer("q#1", features(1.0)), 2).filled  # a later replica of the same group
    assert not decided and q.missing == [1]
    assert b.take(Answer("q#1", features(3.0, 1)), 1).filled
    assert decided == [1] and q.answered_by == ["a2", "b"] and float(q.slots[0][0, 0]) == 2.0
    assert (a1.answers, a2.answers) == (1, 1)  # an answer that came second is still an answer


def test_the_deadline_leaves_the_unanswered_groups_missing_and_fails_their_devices_only_when_fair():
    for fair in (True, False):
        q, decided = query(fair=fair)
        a1, b = DeviceState("a1", "", 0), DeviceState("b", "", 1)
        a1.sent(q)
        b.sent(q)
        q.start_waiting()
        a1.take(Answer("q#1", features(1.0)), 2)
        q.expire()
        assert decided == [1] and q.expired and q.missing == [1]
        assert a1.settle(q) == (False, False)  # it answered: owes nothing
        assert b.settle(q) == (True, fair)  # owes an answer; a failure only for the source's deadline


def test_a_replica_failure_leaves_the_group_to_the_other_replica():
    q, decided = query(num_groups=1)
    a1, a2 = DeviceState("a1", "", 0), DeviceState("a2", "", 0)
    a1.sent(q)
    a2.sent(q)
    q.start_waiting()
    verdict = a1.take(Answer("q#1", code=UNAVAILABLE, error="emulated outage"), 2)
    assert verdict.failure == "UNAVAILABLE: emulated outage" and not decided  # a2 may still answer
    assert a2.take(Answer("q#1", features(1.0)), 2).filled and decided == [1] and q.answered_by == ["a2"]


def test_bad_features_are_the_device_s_failure():
    for answer, needle in (
        (Answer("q#1", np.zeros((1, 3), np.float32)), "features float32(1, 3): expected float32(1, 2)"),
        (Answer("q#1", np.zeros((1, 2), np.float64)), "features float64(1, 2)"),
        (Answer("q#1", features(np.nan)), "not finite"),
        (Answer("q#1"), "features: missing"),
    ):
        q, _ = query(num_groups=1)
        device = DeviceState("a1", "", 0)
        device.sent(q)
        q.start_waiting()
        verdict = device.take(answer, 2)
        assert needle in verdict.failure and not verdict.filled and q.undecided == 0


def test_fair_failures_in_a_row_mark_a_device_down_and_an_answer_resets_the_count():
    device = DeviceState("a1", "", 0)
    assert [device.failed() for _ in range(FAILURES_TO_MARK_DOWN - 1)] == [False] * (FAILURES_TO_MARK_DOWN - 1)
    q, _ = query(num_groups=1)
    device.sent(q)
    device.take(Answer("q#1", features(1.0)), 2)
    assert device.consecutive_failures == 0
    assert [device.failed() for _ in range(FAILURES_TO_MARK_DOWN)][-1] is True
    assert device.mark_down() and not device.up and not device.mark_down()  # once
    assert not device.failed()  # already down


def test_a_refusal_is_counted_never_a_failure_and_logged_at_most_once_per_interval():
    device = DeviceState("a1", "", 0)
    for i in range(2 * FAILURES_TO_MARK_DOWN):
        q, _ = query(num_groups=1)
        device.sent(q)
        q.start_waiting()
        verdict = device.take(Answer("q#1", code=INVALID_ARGUMENT, error="input.shape: wrong"), 2)
        assert verdict.refused == "input.shape: wrong" and not verdict.failure and q.done  # the group is decided
        device.refused(now=float(i))  # what the source does with the verdict
    assert device.up and device.failures == 0 and device.refusals == 2 * FAILURES_TO_MARK_DOWN
    fresh = DeviceState("b", "", 1)
    assert [fresh.refused(now) for now in (0.0, 1.0, 10.0)] == [True, False, True]


def test_a_down_device_is_on_trial_its_answers_fill_empty_slots_and_revive_it():
    q, decided = query(num_groups=1)
    device = DeviceState("a1", "", 0)
    device.mark_down()
    device.sent(q)  # not counted: nobody waits for it
    q.start_waiting()
    assert q.undecided == 0 and q.open_calls == [0]
    verdict = device.take(Answer("q#1", features(1.0)), 2)
    assert verdict.filled and verdict.revive
    device.revive()
    assert device.up and device.consecutive_failures == 0
    device.mark_down()
    assert device.take(Answer("late#9", features(1.0)), 2).revive  # even an answer after its query ended
    assert not device.take(Answer("late#9", code=UNAVAILABLE), 2).revive  # but not an error


def test_a_lost_link_fails_the_device_and_stops_every_query_waiting_for_it():
    q, decided = query(num_groups=1)
    device = DeviceState("a1", "", 0)
    device.sent(q)
    q.start_waiting()
    device.lost()
    assert decided == [1] and device.failures == 1 and device.consecutive_failures == 0 and not device.waiting


def test_status_names_are_grpc_s():
    grpc = pytest.importorskip("grpc")
    assert {code.value[0]: code.name for code in grpc.StatusCode} == dict(enumerate(STATUS_NAMES))
    assert code_name(99) == "status 99"


# --------------------------------------------------------------------------- a source over in-memory links


class Replica:
    """A device that answers every request after ``delay_s`` (features of ``value``), or as told:
    ``mode`` "silent" never answers, "error" fails with UNAVAILABLE, "late" with DEADLINE_EXCEEDED,
    "refuse" with INVALID_ARGUMENT."""

    def __init__(self, width: int, value: float, delay_s: float = 0.0, mode: str = "answer", obey_cancel: bool = True):
        self.width, self.value, self.delay_s, self.mode = width, value, delay_s, mode
        self.healthy = True
        self.link = MemoryLink(self.serve, health=lambda: self.healthy, obey_cancel=obey_cancel)

    async def serve(self, request: Request) -> Answer | None:
        await asyncio.sleep(self.delay_s)
        if self.mode == "silent":
            return None
        if self.mode == "error":
            return Answer(request.wire_id, code=UNAVAILABLE, error="emulated outage")
        if self.mode == "late":
            return Answer(request.wire_id, code=DEADLINE_EXCEEDED, error="no slot in time")
        if self.mode == "refuse":
            return Answer(request.wire_id, code=INVALID_ARGUMENT, error="input.shape: another bundle")
        return Answer(request.wire_id, np.full((len(request.inputs), self.width), self.value, dtype=np.float32))


class MemorySource(Source):
    """The real source, with its devices in this process."""

    def __init__(self, bundle: Path, replicas: dict[str, Replica], **options):
        fleet = Fleet(
            devices=[
                DeviceProfile(id=d, flops=1e9, memory_bytes=1 << 24, rate_bps=1e6, outage=0.01, address=f"memory:{i + 1}")
                for i, d in enumerate(replicas)
            ]
        )
        super().__init__(bundle, fleet, insecure=True, **options)
        self.replicas = replicas

    def _connect(self, device):
        return self.replicas[device.device_id].link


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A manifest and a head (the source never opens the group models)."""
    folder = tmp_path_factory.mktemp("bundle")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pooled", "fc"], ["logits"])],
        "head",
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["B", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 2])],
        initializer=[numpy_helper.from_array(HEAD, "fc")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(folder / "head.onnx"))
    for k in range(len(GROUPS)):
        (folder / f"group{k}.onnx").write_bytes(b"not opened by the source")

    def entry(name: str) -> dict:
        return {"file": name, "sha256": file_sha256(folder / name), "size_bytes": (folder / name).stat().st_size}

    plan = Plan(
        scheme="rocoin",
        epsilon=0.05,
        num_filters=3,
        groups=[GroupPlan(devices=d, filters=f, student="tiny", failure_prob=0.01, latency_s=0.01) for d, f in GROUPS],
        latency_s=0.01,
        p_complete=0.98,
        catalog={"tiny": StudentSpec(flops=1e4, memory_bytes=10_000, params=10, out_dim=4)},
    )
    manifest = Manifest(
        plan=plan,
        dataset="digits",
        class_names=["zero", "one"],
        normalization=Normalization(mean=[0.0], std=[1.0]),
        groups=[
            GroupModel(
                **entry(f"group{k}.onnx"),
                input=TensorSpec(name="image", shape=list(INPUT_CHW)),
                output=TensorSpec(name="features", shape=[len(f)]),
                group=k,
                student="tiny",
                devices=d,
                filters=f,
            )
            for k, (d, f) in enumerate(GROUPS)
        ],
        head=ModelFile(**entry("head.onnx"), input=TensorSpec(name="pooled", shape=[3]), output=TensorSpec(name="logits", shape=[2])),
        rocoin_version="0.1.0",
    )
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest.model_dump(mode="json")))
    return folder


def fleet_of(a1: Replica | None = None, a2: Replica | None = None, b: Replica | None = None) -> dict[str, Replica]:
    return {"a1": a1 or Replica(2, 1.0), "a2": a2 or Replica(2, 2.0, delay_s=0.05), "b": b or Replica(1, 3.0)}


IMAGE = np.zeros((1, *INPUT_CHW), dtype=np.uint8)


def run(bundle: Path, replicas: dict[str, Replica], scenario, **options):
    async def main():
        async with MemorySource(bundle, replicas, deadline_s=DEADLINE_S, **options) as source:
            return await scenario(source)

    return asyncio.run(main())


def test_the_source_takes_the_first_replica_runs_the_head_and_cancels_the_slower_one(bundle):
    replicas = fleet_of()

    async def scenario(source):
        return await source.infer(IMAGE)

    result = run(bundle, replicas, scenario)
    assert result.missing_groups == [] and result.answered_by == ["a1", "b"]
    np.testing.assert_allclose(result.logits, [[1.0 + 1.0, 3.0]])  # filters 0 and 2 from a1, 1 from b
    assert result.latency_s < 0.05  # nobody waited for a2
    assert replicas["a2"].link.cancelled == [replicas["a2"].link.requests[0].wire_id]


def test_a_slow_group_is_zero_filled_at_the_deadline(bundle):
    async def scenario(source):
        return await source.infer(IMAGE), source.status()

    started = time.perf_counter()
    result, status = run(bundle, fleet_of(b=Replica(1, 3.0, delay_s=10.0)), scenario)
    assert result.missing_groups == [1] and DEADLINE_S <= result.latency_s < DEADLINE_S + 0.5
    np.testing.assert_allclose(result.logits, [[2.0, 0.0]])
    assert {d["device"]: d["failures"] for d in status} == {"a1": 0, "a2": 0, "b": 1}
    assert time.perf_counter() - started < 2


def test_a_replica_failure_then_another_replica_s_answer(bundle):
    async def scenario(source):
        return await source.infer(IMAGE), source.status()

    result, status = run(bundle, fleet_of(a1=Replica(2, 1.0, mode="error")), scenario)
    assert result.missing_groups == [] and result.answered_by == ["a2", "b"]
    assert {d["device"]: d["failures"] for d in status}["a1"] == 1


def test_fair_failures_mark_a_device_down_unfair_ones_do_not(bundle):
    async def scenario(source):
        b = next(d for d in source.devices if d.device_id == "b")
        unfair = [await source.infer(IMAGE, deadline_s=0.01) for _ in range(FAILURES_TO_MARK_DOWN)]
        after_unfair = (b.up, b.failures)
        fair = [await source.infer(IMAGE) for _ in range(FAILURES_TO_MARK_DOWN)]
        started = time.perf_counter()
        skipped = await source.infer(IMAGE)  # nobody waits for a down device
        return unfair, after_unfair, fair, (b.up, b.failures), skipped, time.perf_counter() - started, source.ready

    unfair, after_unfair, fair, after_fair, skipped, elapsed, ready = run(bundle, fleet_of(b=Replica(1, 3.0, mode="silent")), scenario)
    assert all(r.missing_groups == [1] for r in unfair + fair + [skipped])
    assert after_unfair == (True, 0)
    assert after_fair == (False, FAILURES_TO_MARK_DOWN) and not ready
    assert elapsed < DEADLINE_S / 2


def test_refusals_never_mark_a_device_down(bundle):
    async def scenario(source):
        results = [await source.infer(IMAGE) for _ in range(2 * FAILURES_TO_MARK_DOWN)]
        refusals = source.metrics.registry.get_sample_value("rocoin_device_refusals_total", {"device": "b"})
        return results, {d["device"]: d for d in source.status()}["b"], refusals

    results, b, refusals = run(bundle, fleet_of(b=Replica(1, 3.0, mode="refuse")), scenario)
    assert all(r.missing_groups == [1] and r.latency_s < DEADLINE_S for r in results)  # a refusal decides the group at once
    assert b["up"] and b["failures"] == 0 and b["refusals"] == refusals == 2 * FAILURES_TO_MARK_DOWN


def test_a_device_out_of_time_for_a_client_s_short_deadline_is_not_failed_but_is_for_the_source_s(bundle):
    """A device answers DEADLINE_EXCEEDED when a query waited past its time for a free slot: the
    device's fault only if the query had the source's own deadline (moved here from test_hardening)."""

    async def scenario(source):
        device, outcomes = next(d for d in source.devices if d.device_id == "a1"), []
        for budget in (0.01, source.deadline_s):
            await source.infer(IMAGE, deadline_s=budget)
            outcomes.append(device.failures)
        return outcomes

    assert run(bundle, fleet_of(a1=Replica(2, 1.0, mode="late")), scenario) == [0, 1]


def test_a_down_device_revives_when_it_answers_again(bundle):
    b = Replica(1, 3.0, mode="silent", obey_cancel=False)  # a late answer still comes

    async def scenario(source):
        for _ in range(FAILURES_TO_MARK_DOWN):
            await source.infer(IMAGE)
        down = not source.ready
        b.mode, b.delay_s = "answer", 0.02
        on_trial = await source.infer(IMAGE)  # not waited for; its answer comes after the head ran
        await asyncio.sleep(0.05)
        back = await source.infer(IMAGE)
        return down, on_trial, back, source.ready

    down, on_trial, back, ready = run(bundle, fleet_of(b=b), scenario)
    assert down and on_trial.missing_groups == [1] and on_trial.latency_s < 0.02
    assert ready and back.missing_groups == [] and back.answered_by[1] == "b"


def test_a_lost_device_is_marked_down_and_revived_by_its_health_probe(bundle, monkeypatch):
    monkeypatch.setattr(source_module, "PROBE_INTERVAL_S", 0.01)
    b = Replica(1, 3.0, delay_s=10.0)

    async def scenario(source):
        asking = asyncio.ensure_future(source.infer(IMAGE))
        await asyncio.sleep(0.01)
        b.healthy = False
        b.link.lose("the device ended the stream")
        lost = await asking  # the query stops waiting for b at once
        await asyncio.sleep(0.05)
        still_down = not source.ready
        b.healthy, b.delay_s = True, 0.0
        for _ in range(100):
            if source.ready:
                break
            await asyncio.sleep(0.01)
        return lost, still_down, source.ready and b.link.is_open, await source.infer(IMAGE)

    lost, still_down, ready, back = run(bundle, fleet_of(b=b), scenario)
    assert lost.missing_groups == [1] and lost.latency_s < DEADLINE_S
    assert still_down and ready  # used again, on a fresh stream
    assert back.missing_groups == []
